"""train_diffusion.py: the --quick run end to end, the saved pipeline, the tokenizer, resuming, argument errors."""

import itertools
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import train_diffusion
from utils import REPO, UserError

SHIPPED = REPO / "models" / "shapes-sd-tiny"


def quick(data, out: Path, ckpt: Path, *extra: str) -> dict:
    return train_diffusion.main(["--quick", "--data", str(data), "--split", "train", "--out", str(out),
                                 "--ckpt-dir", str(ckpt), *extra])


@pytest.fixture(scope="module")
def quick_run(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    info = quick(tiny_data, root / "pipe", root / "ckpt")
    return root, info


@pytest.fixture(scope="module")
def pipe(quick_run):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(quick_run[0] / "pipe")  # fp16 on disk, fp32 when no dtype is given
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str, seed: int) -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def test_quick_run_writes_an_fp16_pipeline_with_card_and_log(quick_run):
    from safetensors import safe_open

    out = quick_run[0] / "pipe"
    for name in ("model_index.json", "README.md", "training_log.json", "tokenizer/vocab.json",
                 "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (out / name).is_file(), name
    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as fh:
        assert fh.get_tensor(next(iter(fh.keys()))).dtype == torch.float16
    index = json.loads((out / "model_index.json").read_text())
    assert index["scheduler"][1] == "DPMSolverMultistepScheduler"
    assert index["tokenizer"][1] == "CLIPTokenizer"
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == quick_run[1]["steps"] == train_diffusion.QUICK["max_steps"]
    # the card is built from the log's numbers; its fidelity section says how to measure (no placeholder)
    card, facts = (out / "README.md").read_text(), log["card_facts"]
    assert facts["steps"] == log["steps"] and facts["scaling_factor"] == log["scaling_factor"]
    assert f"# {out.name}\n" in card and f"- text encoder + UNet: {log['steps']} steps of batch " in card
    assert f"{facts['vocab_size']} tokens" in card and f"| {log['params']['unet']:,} |" in card
    assert "## Fidelity\nNot measured yet: `python fidelity.py evaluate-model --model <this folder> --write-card`" in card


def test_saved_pipeline_generates_images_of_the_data_size(pipe):
    images = generate(pipe, "a small red star", seed=0)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


def test_same_seed_same_pixels_other_seed_other_pixels(pipe):
    a, b, c = (generate(pipe, "a blue circle in the top left", seed) for seed in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_tokenizer_gives_one_token_per_caption_word(pipe, tiny_data):
    from utils import load_data

    tok = pipe.tokenizer
    ids = tok("a red star to the left of a blue circle").input_ids
    assert len(ids) == 10 + 2 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    words = {w for rec in load_data(tiny_data)["splits"]["train"][:64] for c in rec["captions"]
             for w in re.findall(r"[a-z]+|[^\sa-z]", c.lower())}
    assert len(words) > 20
    for word in words:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    assert pipe.text_encoder.config.max_position_embeddings == tok.model_max_length


def test_rerun_resumes_from_the_checkpoint_step(tiny_data, tmp_path):
    first = quick(tiny_data, tmp_path / "a", tmp_path / "ckpt", "--max-steps", "2")
    assert first["steps"] == 2 and first["resumed_from_step"] == 0
    second = quick(tiny_data, tmp_path / "b", tmp_path / "ckpt", "--max-steps", "3")
    assert second["resumed_from_step"] == 2 and second["steps"] == 3
    assert second["vae"] == first["vae"]  # the finished autoencoder stage is loaded, not retrained
    log = json.loads((tmp_path / "b" / "training_log.json").read_text())
    assert log["resumed_from_step"] == 2
    # the resume and the one flag it changed are recorded, and the card says so (the config is the last start's)
    assert log["starts"]["first_step"] == 0
    [resume] = log["starts"]["resumes"]
    assert resume["step"] == 2 and resume["changed"] == {"max_steps": [2, 3], "out": [str(tmp_path / "a"),
                                                                                        str(tmp_path / "b")]}
    card = (tmp_path / "b" / "README.md").read_text()
    assert "- resumed 1 time (the configuration above is the last start's): at step 2 (" in card
    assert "`--max-steps` 2 -> 3" in card
    first = json.loads((tmp_path / "a" / "training_log.json").read_text())
    assert first["starts"] == {"first_step": 0, "resumes": []} and "- resumed" not in (tmp_path / "a" / "README.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", "0"], r"^--max-steps must be > 0, got 0$"),
    (["--batch-size", "-4"], r"^--batch-size must be > 0, got -4$"),
    (["--cfg-dropout", "1.5"], r"^--cfg-dropout must be in 0\.\.1, got 1\.5$"),
    (["--vae-channels", "16,x"], r"^--vae-channels must be comma-separated integers, got '16,x'$"),
    (["--text-hidden", "30", "--text-heads", "4"], r"^--text-heads 4 must divide --text-hidden 30$"),
    (["--vae-crop", "20"], r"^--vae-crop must be a multiple of 8 pixels, got 20$"),
    (["--guidance", "0.5"], r"^--guidance must be >= 1, got 0\.5$"),
    (["--snr-shift", "0.5"], r"^--snr-shift must be >= 1, got 0\.5$"),
    (["--place-captions", "1.5"], r"^--place-captions must be in \[0, 1\], got 1\.5$"),
    (["--pooled-dropout", "-0.1", "--text-film"], r"^--pooled-dropout must be in \[0, 1\], got -0\.1$"),
    (["--grounding-loss", "-1"], r"^--grounding-loss must be >= 0, got -1\.0$"),
    (["--grounding-words", "place,colour"], r"^--grounding-words must name shape, place or both, got place,colour$"),
    (["--grounding-min-t", "1000"], r"^--grounding-min-t must be in 0\.\.999, got 1000$"),
    (["--pooled-dropout", "0.5"], r"^--pooled-dropout needs --text-film \(without it the caption has no pooled path"),
    (["--mirror-pairs", "1.5"], r"^--mirror-pairs must be in \[0, 1\], got 1\.5$"),
    (["--mirror-pairs", "0.25", "--batch-size", "8", "--mirror-axes", "x,y"],
     r"^--mirror-pairs 0\.25 makes fewer than one pair per mirror in a batch of 8 \(needs batch x share >= 2 x the "),
    (["--mirror-axes", "x,z"], r"^--mirror-axes must be x, y or x,y, got x,z$"),
    (["--mirror-axes", "y,y"], r"^--mirror-axes must be x, y or x,y, got y,y$"),
    (["--stf-reference", "1"], r"^--stf-reference must be 0 \(off\) or >= 2 \(the image and at least one other\), got 1$"),
    (["--stf-reference", "8", "--mirror-pairs", "0.5"], r"^--stf-reference and --mirror-pairs cannot be combined"),
    (["--stf-reference", "8", "--resolution", "64"], r"^--stf-reference reads the objects' 3x3 cells, which --resol"),
    (["--place-focus", "1.5"], r"^--place-focus must be in \[0, 1\], got 1\.5$"),
    (["--place-focus", "0.01", "--batch-size", "32"], r"^--place-focus 0\.01 gives no row of a batch of 32 \(needs share"),
    (["--place-focus", "0.25", "--place-focus-min-t", "1000"], r"^--place-focus-min-t must be in 0\.\.999, got 1000$"),
    (["--place-focus", "0.25", "--mirror-pairs", "0.5"], r"^--place-focus and --mirror-pairs both claim rows of the"),
    (["--place-focus-after", "1000:0.15"], r"^--place-focus-after changes --place-focus's share; pass --place-focus F"),
    (["--place-focus", "0.5", "--place-focus-after", "1000"], r"^--place-focus-after must be STEPS:SHARE \(e\.g\."),
    (["--place-focus", "0.5", "--place-focus-after", "2.5:0.1"], r"^--place-focus-after must be STEPS:SHARE"),
    (["--place-focus", "0.5", "--place-focus-after", "20:0.1:3"], r"^--place-focus-after must be STEPS:SHARE"),
    (["--place-focus", "0.5", "--place-focus-after", "0:0.1"], r"^--place-focus-after needs STEPS > 0 and SHARE in"),
    (["--place-focus", "0.5", "--place-focus-after", "20:1.5"], r"^--place-focus-after needs STEPS > 0 and SHARE in"),
    (["--place-focus", "0.5", "--place-focus-after", "20:0.01", "--batch-size", "32"],
     r"^--place-focus-after share 0\.01 gives no row of a batch of 32 \(use 0 to end the focus\)$"),
    (["--stf-rendered", "8"], r"^--stf-rendered sets where --stf-reference's references come from; pass --stf-ref"),
    (["--stf-rendered", "-1", "--stf-reference", "8"], r"^--stf-rendered must be >= 0, got -1$"),
])
def test_bad_arguments_give_one_line_errors(tiny_data, extra, message):
    with pytest.raises(UserError, match=message):
        train_diffusion.parse_args(["--data", str(tiny_data), *extra])


def test_missing_data_file_and_unknown_split(tiny_data, tmp_path):
    with pytest.raises(UserError, match=r"^data file not found: .*nowhere\.pkl$"):
        train_diffusion.parse_args(["--data", str(tmp_path / "nowhere.pkl")])
    split_error = r"^unknown split 'pretrain' in .*data\.pkl; it has \['test', 'train', 'val'\]$"
    with pytest.raises(UserError, match=split_error):
        train_diffusion.main(["--quick", "--data", str(tiny_data), "--split", "pretrain", "--out", str(tmp_path / "o"),
                              "--ckpt-dir", str(tmp_path / "c")])


@pytest.mark.parametrize("folder", [SHIPPED, SHIPPED.with_name("shapes-sd-tiny-turbo"),
                                    SHIPPED.with_name("shapes-sd-tiny-f2")], ids=lambda p: p.name)
def test_shipped_model_generates_a_64px_image_on_cpu(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)  # as a new user calls it: no dtype given
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a small red star", num_inference_steps=2, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert len(pipe.tokenizer("a red star to the left of a blue circle").input_ids) == 12


# --------------------------------------------------------------------------- designs and the design study
@pytest.mark.parametrize("design, vae, unet, attn", [
    ("latent-f4", (16, 32, 64), (32, 64, 96), 2),
    ("latent-f2", (16, 32), (32, 64, 96, 128), 2),
    ("latent-f2-objw", (16, 32), (32, 64, 96, 128), 2),
])
def test_a_design_sets_its_architecture_and_explicit_flags_win(tiny_data, design, vae, unet, attn):
    args = train_diffusion.parse_args(["--data", str(tiny_data), "--design", design])
    assert (args.vae_widths, args.unet_widths, args.attn_levels) == (vae, unet, attn)
    assert args.object_weight == (10.0 if design.endswith("objw") else 0.0)
    explicit = train_diffusion.parse_args(["--data", str(tiny_data), "--design", design, "--unet-channels", "32,64,128"])
    assert explicit.unet_widths == (32, 64, 128)


@pytest.mark.parametrize("flags, key, value", [
    (["--snr-shift", "1"], "snr_shift", 1.0),  # the flag's default, given: the shifted design runs unshifted
    (["--snr-gamma=5"], "snr_gamma", 5.0),
    (["--object-weight", "0", "--snr-shift", "4"], "object_weight", 0.0),
])
def test_a_flag_given_at_its_default_value_still_wins_over_the_design(tiny_data, flags, key, value):
    design = "latent-f2-objw-shift" if key == "object_weight" else "latent-f2-film"
    assert getattr(train_diffusion.parse_args(["--data", str(tiny_data), "--design", design]), key) != value
    assert getattr(train_diffusion.parse_args(["--data", str(tiny_data), "--design", design, *flags]), key) == value


def test_the_film_text_design_reads_the_caption_with_the_shipped_frozen_text_encoder(tiny_data):
    args = train_diffusion.parse_args(["--data", str(tiny_data), "--design", "latent-f2-film-text"])
    assert args.text_film and args.freeze_text and args.init_text == SHIPPED and args.snr_gamma == 0
    unfrozen = train_diffusion.parse_args(["--data", str(tiny_data), "--design", "latent-f2-film-text",
                                           "--no-freeze-text"])
    assert not unfrozen.freeze_text and unfrozen.text_film and unfrozen.init_text == SHIPPED


def test_init_unet_warm_starts_from_a_saved_unet_and_refuses_another_architecture(quick_run, tiny_data, tmp_path):
    from diffusers import UNet2DConditionModel

    source = quick_run[0] / "pipe"  # the quick run's pipeline (UNet widths 32,64)
    # a learning rate of ~0 keeps the warm-started weights: what is saved is what it started from
    info = quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "1", "--lr", "1e-12",
                 "--init-unet", str(source))
    saved, original = (UNet2DConditionModel.from_pretrained(f / "unet") for f in (tmp_path / "o", source))
    fresh = train_diffusion.make_unet(train_diffusion.parse_args(["--quick", "--data", str(tiny_data)]), 8)
    assert info["steps"] == 1
    for (name, value), init in zip(original.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(saved.state_dict()[name].float(), value.float(), atol=1e-3), name
    assert any(not torch.allclose(v.float(), i) for v, i in zip(original.state_dict().values(),
                                                                 fresh.state_dict().values()))  # not a fresh init
    # the steps and CPU time of the weights it started from are kept with the run and counted on in the card
    before = json.loads((source / "training_log.json").read_text())
    ws = json.loads((tmp_path / "c" / "warm_start.json").read_text())
    assert (ws["steps"], ws["cpu_seconds"]) == (before["steps"], round(before["cpu_seconds"], 1))
    log = json.loads((tmp_path / "o" / "training_log.json").read_text())
    assert log["warm_start"]["steps"] == before["steps"] and "curve_points" not in log["warm_start"]
    assert f"warm-started from `{ws['from']}`'s UNet (its {before['steps']:,} steps" in (tmp_path / "o" / "README.md").read_text()
    with pytest.raises(UserError, match=r"^--init-unet .*pipe: its UNet differs from this run's in "
                                        r"block_out_channels \[32, 64\] \(now \[16, 32\]\)"):
        quick(tiny_data, tmp_path / "o2", tmp_path / "c2", "--max-steps", "1", "--init-unet", str(source),
              "--unet-channels", "16,32")
    with pytest.raises(UserError, match=r"^--init-unet .*nowhere: no unet/config.json there \(give a pipeline"):
        quick(tiny_data, tmp_path / "o3", tmp_path / "c3", "--init-unet", str(tmp_path / "nowhere"))


def test_a_warm_started_runs_curve_continues_the_one_it_started_from(tmp_path):
    """Inherited points come first (same oracle and prompt count only); this run's steps and CPU-minutes are
    counted on from the warm start's 1,000 steps and 600 CPU-seconds."""
    def point(step, minutes, single):
        return {"step": step, "cpu_minutes": minutes, "single": {"all": single}, "two": {"all": 0.0}}

    own = [point(100, 5.0, 0.2), point(200, 10.0, 0.3)]
    assert train_diffusion.continued_curve(tmp_path, own, "abc", 200) == own  # no warm start: as measured
    (tmp_path / "warm_start.json").write_text(json.dumps({
        "from": "models/x", "steps": 1000, "cpu_seconds": 600.0, "curve_points": [point(1000, 10.0, 0.1)],
        "curve_oracle_sha256_12": "abc", "curve_n_prompts": 200}))
    curve = train_diffusion.continued_curve(tmp_path, own, "abc", 200)
    assert [(p["step"], p["cpu_minutes"], p["run"]) for p in curve] == [
        (1000, 10.0, "models/x"), (1100, 15.0, tmp_path.name), (1200, 20.0, tmp_path.name)]
    assert [p["step"] for p in train_diffusion.continued_curve(tmp_path, own, "other-oracle", 200)] == [1100, 1200]
    assert [p["step"] for p in train_diffusion.continued_curve(tmp_path, own, "abc", 100)] == [1100, 1200]


def test_unet_attention_sits_only_at_the_lowest_levels(tiny_data):
    args = train_diffusion.parse_args(["--data", str(tiny_data), "--design", "latent-f2"])
    unet = train_diffusion.make_unet(args, 32)
    kinds = [type(b).__name__ for b in unet.down_blocks]
    assert kinds == ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"] * 2
    # every head has --attn-head-dim (32) channels: diffusers' `attention_head_dim` is a head count, so it gets
    # width // 32 per level (it once got 32, i.e. heads of 2-4 channels)
    heads = {n: (m.heads, m.inner_dim // m.heads) for n, m in unet.named_modules() if n.endswith(("attn1", "attn2"))}
    assert heads and all(dim == 32 for _, dim in heads.values())
    assert heads["down_blocks.3.attentions.0.transformer_blocks.0.attn2"] == (4, 32)


def test_a_checkpoint_from_before_the_head_fix_is_refused_in_one_line(tiny_data, tmp_path):
    quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "1")
    arch = tmp_path / "c" / "architecture.json"
    arch.write_text(json.dumps({k: v for k, v in json.loads(arch.read_text()).items() if k != "attention_heads"}))
    with pytest.raises(UserError, match=r"attention heads per UNet level \[8, 8\] \(now \[4, 8\]; before the fix"):
        quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "2")


def test_object_masks_cover_the_boxes_on_the_latent_grid():
    # one 64-px image, one box from x 8..24, y 40..56: on a 32 grid that is 4..12 x 20..28, grown by one cell
    masks = train_diffusion.object_masks([[[8, 40, 16, 16]], []], 64, 32)
    assert masks.shape == (2, 1, 32, 32) and masks[1].sum() == 0
    ys, xs = np.nonzero(masks[0, 0].numpy())
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (3, 12, 19, 28)


def bare_trainer(args, mean: torch.Tensor) -> "train_diffusion.Trainer":
    """A Trainer with only what `batch` reads: latents `mean` (std 1), caption k of image i = token 5 i + k."""
    t = train_diffusion.Trainer.__new__(train_diffusion.Trainer)
    t.args, t.device, t.scaling, t.masks, t.mirror, t.pairs = args, torch.device("cpu"), 1.0, None, {}, {}
    t.mean, t.std, t.ref_mean = mean, torch.ones_like(mean), mean
    t.tokens, t.empty = torch.arange(5 * len(mean)).reshape(len(mean), 5, 1), torch.tensor([-1])
    t.noise_scheduler = train_diffusion.make_noise_scheduler()
    t.gen = torch.Generator().manual_seed(0)
    return t


def test_object_weighted_batches_weigh_the_boxes_and_keep_images_equal(tiny_data):
    """Trainer.batch's loss weights: 1 + w inside the boxes, mean 1 in every image (images of few or many objects
    count the same); a batch without --object-weight has no weights."""
    args = train_diffusion.parse_args(["--quick", "--data", str(tiny_data), "--design", "latent-f2-objw"])
    n = 6
    t = bare_trainer(args, torch.zeros(n, 4, 32, 32))
    boxes = [[[8 * i, 8, 8, 8 + 4 * i]] * (1 + i % 3) for i in range(n)]
    t.masks = train_diffusion.object_masks(boxes, 64, 32)
    b = t.batch()
    weight = b.weight
    assert b.pooled_drop is None and b.ground is None  # no --pooled-dropout, no --grounding-loss
    assert weight.shape == (args.batch_size, 1, 32, 32)
    assert torch.allclose(weight.mean((1, 2, 3)), torch.ones(args.batch_size), atol=1e-5)
    inside, outside = weight.amax((1, 2, 3)), weight.amin((1, 2, 3))
    assert torch.allclose(inside / outside, torch.full_like(inside, 1 + args.object_weight))
    args.object_weight = 0.0
    assert t.batch().weight is None


def test_place_captions_upsamples_the_captions_that_say_where(tiny_data):
    """--place-captions 1: every image with a caption naming a place is read through one of those; an image
    without one keeps the uniform draw; at 0 the draw is the same as before the flag existed (same random stream)."""
    args = train_diffusion.parse_args(["--quick", "--data", str(tiny_data), "--cfg-dropout", "0"])
    captions = [["a red star in the top left", "a red star", "a star", "a red star to the left of a ring", "a shape"],
                ["a ring", "a blue ring", "a small ring", "a ring in blue", "one ring"]]
    t = bare_trainer(args, torch.zeros(2, 4, 8, 8))  # token id = image * 5 + caption index
    t.places = torch.tensor([[train_diffusion.names_place(c) for c in caps] for caps in captions])
    args.batch_size = 400
    uniform = t.batch().ids[:, 0]
    args.place_captions = 1.0
    t.gen = torch.Generator().manual_seed(0)
    ids = t.batch().ids[:, 0]
    first, second = ids[ids < 5], ids[ids >= 5]
    assert set(first.tolist()) == {0, 3}  # only the two captions that say where
    assert set(second.tolist()) == {5, 6, 7, 8, 9}  # no caption of this image names a place: all five
    assert set(uniform[uniform < 5].tolist()) == {0, 1, 2, 3, 4}
    args.place_captions = 0.0
    t.gen = torch.Generator().manual_seed(0)
    assert torch.equal(t.batch().ids[:, 0], uniform)


def test_resuming_with_another_architecture_is_one_line(tiny_data, tmp_path):
    quick(tiny_data, tmp_path / "a", tmp_path / "ckpt", "--max-steps", "1")
    message = r"^.*ckpt holds a model trained with --vae-channels 8,16 \(now 16,32,64\);.*--fresh to start over.*$"
    with pytest.raises(UserError, match=message):
        quick(tiny_data, tmp_path / "b", tmp_path / "ckpt", "--max-steps", "1", "--design", "latent-f4")


def test_unknown_design_lists_the_valid_ones(tiny_data):
    with pytest.raises(UserError, match=r"^unknown design 'pixel'; valid: latent-f4, latent-f2, latent-f2-objw, "
                                         r"latent-f2-shift, latent-f2-objw-shift, latent-f2-vloss, "
                                         r"latent-f2-vloss-shift, latent-f2-film, latent-f2-film-text, "
                                         r"latent-f2-film-text-zsnr$"):
        train_diffusion.parse_args(["--data", str(tiny_data), "--design", "pixel"])
    with pytest.raises(UserError, match=r"^unknown design\(s\) \['pixel'\]; valid: latent-f4, "):
        train_diffusion.parse_study_args(["--designs", "latent-f4,pixel", "--data", str(tiny_data)])
    with pytest.raises(UserError, match=r"^--eval-at points must lie in \(0, --cpu-minutes 30.0\]"):
        train_diffusion.parse_study_args(["--eval-at", "10,40", "--data", str(tiny_data)])


def test_cpu_budget_stops_training_and_snapshots_mark_the_curve(tiny_data, tmp_path):
    info = quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "1000", "--cpu-minutes", "0.05",
                 "--snapshot-cpu-minutes", "0.01,0.03", "--lr-schedule", "constant")
    assert 1 < info["steps"] < 1000  # stopped by the CPU budget, not by --max-steps
    log = json.loads((tmp_path / "o" / "training_log.json").read_text())
    assert log["cpu_seconds"] >= 3.0
    snaps = sorted((tmp_path / "c" / "snapshots").iterdir())
    assert [p.name for p in snaps] == ["cpu0.01", "cpu0.03"]
    meta = [json.loads((p / "snapshot.json").read_text()) for p in snaps]
    assert meta[0]["step"] <= meta[1]["step"] and meta[0]["cpu_minutes"] >= 0.01
    assert (snaps[0] / "model_index.json").is_file()


def test_resample_round_trip_keeps_what_32_px_can_hold():
    import generate_data as gd
    from oracle import Oracle

    prompts = gd.make_prompts("single", 12, seed=1)
    renders = gd.render_prompts(prompts, seed=1)
    same = train_diffusion.resample_round_trip(64)(renders)
    assert np.abs(same.astype(int) - renders).max() <= 1  # 64 -> 64 is (nearly) the identity
    oracle = Oracle.load()
    ceiling = train_diffusion.round_trip(train_diffusion.resample_round_trip(32), {"single": prompts}, oracle)
    too_coarse = train_diffusion.round_trip(train_diffusion.resample_round_trip(8), {"single": prompts}, oracle)
    assert ceiling["single"] >= 11 / 12 and too_coarse["single"] <= 6 / 12  # issue 10, fact 2: 32 px is enough


def test_ceiling_scores_an_autoencoder_and_reads_its_training_info(quick_run, tmp_path):
    vae = quick_run[0] / "ckpt" / "vae"  # the quick run's 4-step autoencoder, with ckpt/vae_info.json beside it
    m = train_diffusion.main(["ceiling", "--vae", str(vae), "--n-prompts", "4", "--outputs", str(tmp_path),
                              "--run-name", "c"])
    entry = m["autoencoders"][str(vae)]
    assert set(entry["round_trip"]) == {"single", "two"}
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in entry["round_trip"].values())  # 4 prompts per kind
    assert entry["training"]["steps"] == 4  # --quick trains the autoencoder for 4 steps
    assert (tmp_path / "design_study_ceiling" / "latest" / "metrics.json").is_file()
    with pytest.raises(UserError, match="autoencoder not found: .*nope"):
        train_diffusion.main(["ceiling", "--vae", str(tmp_path / "nope")])


def test_square_crop_resizes_the_short_side_and_moves_the_boxes():
    from PIL import Image

    image = Image.fromarray(np.zeros((40, 80, 3), np.uint8))  # 80 wide, 40 high
    # x2 to 160 x 80, then the middle 80 columns (40..120) are kept
    out, boxes = train_diffusion.square_crop(image, 80, [[30, 10, 20, 10], [0, 0, 10, 10], [55, 30, 10, 20]])
    assert out.size == (80, 80)
    assert boxes == [[20.0, 20.0, 40.0, 20.0], [70.0, 60.0, 10.0, 20.0]]  # the second box fell outside the crop


def test_resolution_must_be_a_multiple_of_8(tiny_data):
    with pytest.raises(UserError, match=r"^--resolution must be a multiple of 8 pixels, got 30$"):
        train_diffusion.parse_args(["--data", str(tiny_data), "--resolution", "30"])


def test_a_tokenizer_left_from_other_captions_is_a_one_line_error(tmp_path):
    shapes = [["a red star to the left of a blue circle", "two small green squares"]]
    tok = train_diffusion.build_tokenizer(shapes, tmp_path / "tok")
    assert len(tok("two small green squares").input_ids) == 4 + 2  # every caption word one token
    photos = [["a photo of a zebra grazing", "zebras near a fence."]]
    with pytest.raises(UserError, match=r"^tokenizer in .*tok splits caption words such as 'a photo of a zebra "
                                        r"grazing'; delete it to rebuild$"):
        train_diffusion.build_tokenizer(photos, tmp_path / "tok")
    fresh = train_diffusion.build_tokenizer(photos, tmp_path / "tok2")  # real captions, punctuation included
    assert len(fresh("zebras near a fence.").input_ids) == 5 + 2


def test_snr_shift_divides_every_timesteps_snr_and_the_saved_sampler_keeps_it(tiny_data, tmp_path):
    from diffusers import DiffusionPipeline

    def snr(sched):
        bar = sched.alphas_cumprod.double()
        return bar / (1 - bar)

    plain, shifted = train_diffusion.make_noise_scheduler(), train_diffusion.make_noise_scheduler(snr_shift=4.0)
    assert torch.allclose(snr(plain) / snr(shifted), torch.full((1000,), 4.0, dtype=torch.float64), rtol=1e-3)  # fp32 betas
    quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "1", "--snr-shift", "4")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "o")  # a bare load: the schedule travels as trained_betas
    assert torch.allclose(pipe.scheduler.alphas_cumprod.double(), shifted.alphas_cumprod.double(), rtol=1e-5)
    # a checkpoint made before --snr-shift existed (no key in architecture.json) resumes at the default only
    arch = tmp_path / "c" / "architecture.json"
    arch.write_text(json.dumps({k: v for k, v in json.loads(arch.read_text()).items() if k != "snr_shift"}))
    with pytest.raises(UserError, match=r"--snr-shift 1\.0 \(now 4\.0\)"):
        quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "2", "--snr-shift", "4")


@pytest.mark.parametrize("shift", [1.0, 4.0])
def test_zero_terminal_snr_leaves_no_signal_at_the_last_timestep_and_the_saved_sampler_starts_there(
        tiny_data, tmp_path, shift):
    from diffusers import DiffusionPipeline

    plain = train_diffusion.make_noise_scheduler(snr_shift=shift)
    zero = train_diffusion.make_noise_scheduler(snr_shift=shift, zero_terminal_snr=True)
    assert plain.alphas_cumprod[-1] > 1e-5 and zero.alphas_cumprod[-1] == 0  # linear betas leave signal at t = T
    assert torch.all(zero.alphas_cumprod[1:] < zero.alphas_cumprod[:-1])  # still a noise schedule
    quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "1", "--zero-terminal-snr",
          "--snr-shift", str(shift))
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "o")  # a bare load
    assert pipe.scheduler.config.rescale_betas_zero_snr
    pipe.scheduler.set_timesteps(20)
    assert int(pipe.scheduler.timesteps[0]) == 999 and pipe.scheduler.alphas_cumprod[-1] < 1e-6
    image = pipe("a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert np.isfinite(image).all()


def test_zero_terminal_snr_needs_v_prediction(tiny_data):
    with pytest.raises(UserError, match="--zero-terminal-snr needs --prediction-type v_prediction"):
        train_diffusion.parse_args(["--data", str(tiny_data), "--zero-terminal-snr", "--prediction-type", "epsilon"])


def test_init_vae_starts_from_a_trained_autoencoder_and_refuses_another_architecture(quick_run, tiny_data, tmp_path):
    from diffusers import AutoencoderKL

    source = quick_run[0] / "ckpt" / "vae"  # the quick run's 4-step autoencoder (vae_info.json beside it)
    info = quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "1", "--init-vae", str(source))
    copied, original = AutoencoderKL.from_pretrained(tmp_path / "c" / "vae"), AutoencoderKL.from_pretrained(source)
    assert all(torch.equal(a, b) for a, b in zip(copied.state_dict().values(), original.state_dict().values()))
    assert not (tmp_path / "c" / "vae_state.pt").exists()  # no autoencoder step was taken
    assert info["vae"]["init_from"] == str(source) and info["vae"]["steps"] == 4  # its own record travels with it
    with pytest.raises(UserError, match=r"^--init-vae .*vae has block widths 8,16 and 4 latent channels; the flags "
                                        r"ask for 16,32 and 4 \(pass the autoencoder's --design"):
        quick(tiny_data, tmp_path / "o2", tmp_path / "c2", "--max-steps", "1", "--init-vae", str(source),
              "--design", "latent-f2")
    with pytest.raises(UserError, match=r"^--init-vae .*nowhere: no AutoencoderKL folder \(config.json\) there$"):
        quick(tiny_data, tmp_path / "o3", tmp_path / "c3", "--max-steps", "1", "--init-vae", str(tmp_path / "nowhere"))


def test_frozen_init_text_and_text_film_train_and_load_as_a_plain_pipeline(quick_run, tiny_data, tmp_path):
    from diffusers import DiffusionPipeline
    from transformers import CLIPTextModel

    source = quick_run[0] / "pipe"  # the quick run's pipeline: text encoder 32 wide, 1 layer
    info = quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "2", "--init-text", str(source),
                 "--freeze-text", "--text-film", "--text-hidden", "64")  # --init-text's sizes win over --text-*
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "o")  # no custom code
    assert loaded.unet.config.addition_embed_type == "text" and loaded.unet.config.resnet_time_scale_shift == "scale_shift"
    assert loaded.text_encoder.config.hidden_size == 32 and info["steps"] == 2
    original = CLIPTextModel.from_pretrained(source / "text_encoder")
    for name, value in original.state_dict().items():  # frozen: what was saved is what it started from
        assert torch.allclose(loaded.text_encoder.state_dict()[name].float(), value.float(), atol=1e-3), name
    assert (tmp_path / "c" / "tokenizer" / "vocab.json").read_text() == (source / "tokenizer" / "vocab.json").read_text()
    image = loaded("a red circle", num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)
    with pytest.raises(UserError, match=r" trained with --freeze-text True \(now False\): pass the same flags"):
        quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "3", "--init-text", str(source), "--text-film")
    with pytest.raises(UserError, match=r"^--init-text .*nowhere: no text_encoder/config.json and tokenizer/ there"):
        quick(tiny_data, tmp_path / "o4", tmp_path / "c4", "--init-text", str(tmp_path / "nowhere"))


def test_curve_scores_every_snapshot_in_cpu_order_and_caches_each(tiny_data, tmp_path):
    quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "1000", "--cpu-minutes", "0.04",
          "--snapshot-cpu-minutes", "0.01,0.03", "--lr-schedule", "constant")
    argv = ["curve", "--ckpt-dir", str(tmp_path / "c"), "--final", str(tmp_path / "o"), "--n-prompts", "3",
            "--outputs", str(tmp_path / "out"), "--run-name", "r"]
    m = train_diffusion.main(argv)
    points = m["designs"]["c"]["curve"]
    final_steps = json.loads((tmp_path / "o" / "training_log.json").read_text())["steps"]
    # training went on after the 0.03 mark (or not, on a slow machine): its final weights end the curve when it did
    assert [p["mark"] for p in points] == [0.01, 0.03] + (["final"] if final_steps > points[1]["step"] else [])
    assert points[0]["step"] <= points[1]["step"] <= points[-1]["step"] == final_steps
    assert all(p[kind]["all"] in (0.0, 1 / 3, 2 / 3, 1.0) for p in points for kind in ("single", "two"))
    caches = sorted((tmp_path / "c" / "snapshots").glob("*/oracle-*-n3.json"))
    assert len(caches) == 2
    curve_json = json.loads((tmp_path / "o" / "learning_curve.json").read_text())
    assert curve_json["command"].startswith("python train_diffusion.py curve --ckpt-dir")
    assert [p["step"] for p in curve_json["points"]] == [p["step"] for p in points]
    run = tmp_path / "out" / "learning_curve" / "r"
    table = (run / "results.md").read_text()  # one row per snapshot, at its measured CPU minutes (not its mark)
    assert (run / "fidelity_vs_cpu.png").is_file()
    assert all(f"| {p['cpu_minutes']:g} | {p['step']} |" in table for p in points)
    cached = {**points[0], "single": {**points[0]["single"], "all": 0.5, "all_ci": [0.4, 0.6]}}
    caches[0].write_text(json.dumps(cached))
    older = {k: v for k, v in points[1].items()  # a cache written before caption_use and place_response
             if k not in ("caption_use", "place_response")}
    caches[1].write_text(json.dumps({**older, "two": {**older["two"], "all": 0.5, "all_ci": [0.4, 0.6]}}))
    assert all(set(p["caption_use"]) == {"t200", "t500", "t800"} for p in points)
    assert all(set(p["place_response"]) == {"row", "column"} for p in points)
    assert all(-1 <= r["cosine"] <= 1 and r["norm_ratio"] >= 0 for p in points for r in p["place_response"].values())
    assert "| caption use t200 / t500 / t800 |" in table
    assert "| place response row, column (cosine / norm ratio) |" in table
    again = train_diffusion.main(argv)["designs"]["c"]["curve"][0]
    assert again["single"]["all"] == 0.5 and again["caption_use"] == points[0]["caption_use"]  # read from the cache
    topped_up = json.loads(caches[1].read_text())  # the older cache kept its scores and got the new measurements
    assert topped_up["two"]["all"] == 0.5 and topped_up["caption_use"] == points[1]["caption_use"]
    assert topped_up["place_response"] == points[1]["place_response"]
    only = train_diffusion.main(argv + ["--marks", "0.03", "--run-name", "r2"])["designs"]["c"]["curve"]
    assert [p["mark"] for p in only] == [0.03]
    with pytest.raises(UserError, match=r"^--marks \[0\.02\] have no snapshot in .*c.snapshots; it has \[0\.01, 0\.03\]$"):
        train_diffusion.main(argv + ["--marks", "0.03,0.02"])
    with pytest.raises(UserError, match=r"^no snapshots in .*nothing.snapshots \(train with --snapshot-cpu-minutes\)$"):
        train_diffusion.main(["curve", "--ckpt-dir", str(tmp_path / "nothing")])


def test_the_final_pipeline_ends_the_curve_only_when_it_is_newer_than_the_last_snapshot(tmp_path):
    final = tmp_path / "final"
    assert train_diffusion.final_point_info(final, 100) is None  # no final pipeline
    final.mkdir()
    (final / "model_index.json").write_text("{}")
    (final / "training_log.json").write_text(json.dumps({"steps": 250, "cpu_seconds": 90.0, "train_seconds": 95.0,
                                                         "config": {"design": "d"}}))
    assert train_diffusion.final_point_info(final, 100) == {"step": 250, "cpu_minutes": 1.5, "mark": "final",
                                                            "design": "d"}
    assert train_diffusion.final_point_info(final, 250) is None  # the last snapshot already holds these weights


def test_caption_use_is_exactly_one_when_the_unet_cannot_read_the_caption(quick_run):
    from diffusers import StableDiffusionPipeline

    from generate_data import make_prompts

    prompts = make_prompts("single", 4, seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(quick_run[0] / "pipe")
    reads = train_diffusion.caption_use(pipe, prompts, timesteps=(100, 900))
    assert set(reads) == {"t100", "t900"} and all(r["own"] > 0 and r["shuffled"] > 0 for r in reads.values())
    assert reads["t100"]["own"] != reads["t100"]["shuffled"]  # a random-weight UNet still reads its caption
    for name, module in pipe.unet.named_modules():  # cut every cross-attention's output: the caption cannot matter
        if name.endswith("attn2.to_out.0"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    cut = train_diffusion.caption_use(pipe, prompts, timesteps=(100, 900))
    assert all(r["ratio"] == 1.0 and r["own"] == r["shuffled"] == r["empty"] for r in cut.values())


def test_place_response_follows_where_a_unet_draws_the_named_place():
    """Stub UNets that draw one grey-background render of the caption's object (no jitter, large) in the named
    cell, in the other row, always in the centre, or in the named row's middle cell: the probe's cosine and norm
    ratio against the data's mean latents are high, negated for the row, 0 for both words, 0 for the column."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    from generate_data import parse_prompt, render_scene

    pipe = StableDiffusionPipeline.from_pretrained(REPO / "models" / "shapes-sd-tiny-f2")
    alpha = float(pipe.scheduler.alphas_cumprod[-1])

    class Ids(torch.nn.Module):  # hidden states = the token ids, so the stub can read the prompt back
        device = torch.device("cpu")

        def forward(self, ids):
            return (ids[..., None].float(),)

    class Draws(torch.nn.Module):  # v such that the predicted x0 is the VAE latent of a render of cell(caption)
        def __init__(self, cell_of):
            super().__init__()
            self.config, self.device, self.cell_of = pipe.unet.config, torch.device("cpu"), cell_of

        def forward(self, noisy, t, hidden):
            text = pipe.tokenizer.decode(hidden[0, :, 0].long(), skip_special_tokens=True)
            obj = {**parse_prompt(text)["objects"][0], "size": "large"}
            image = np.array(render_scene([{**obj, "cell": self.cell_of(obj["cell"])}], 64))
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
            x0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
            return SimpleNamespace(sample=(alpha ** 0.5 * noisy - x0) / (1 - alpha) ** 0.5)

    pipe.text_encoder = Ids()
    found = {}
    for name, cell_of in (("named", lambda c: c), ("rows flipped", lambda c: [2 - c[0], c[1]]),
                          ("centre", lambda c: [1, 1]), ("middle column", lambda c: [c[0], 1])):
        pipe.unet = Draws(cell_of)
        found[name] = train_diffusion.place_response(pipe, n_noise=2, n_renders=16)
    named, flipped = found["named"], found["rows flipped"]
    assert all(named[w]["cosine"] > 0.7 and 0.5 < named[w]["norm_ratio"] < 2 for w in ("row", "column"))
    assert flipped["row"] == {"cosine": -named["row"]["cosine"], "norm_ratio": named["row"]["norm_ratio"]}
    assert found["centre"] == {w: {"cosine": 0.0, "norm_ratio": 0.0} for w in ("row", "column")}
    assert found["middle column"]["column"] == {"cosine": 0.0, "norm_ratio": 0.0}  # the column word moves nothing


def test_word_separation_is_zero_for_an_encoder_that_ignores_words_and_matches_the_documented_numbers():
    from diffusers import DiffusionPipeline

    shipped = DiffusionPipeline.from_pretrained(SHIPPED)

    class Constant(torch.nn.Module):  # reads no token: every prompt gives the same hidden states
        device = torch.device("cpu")

        def forward(self, ids):
            return (torch.ones(ids.shape[0], ids.shape[1], 8),)

    class Embeddings(Constant):  # the token embeddings themselves: every changed word moves them
        def forward(self, ids):
            return (shipped.text_encoder.get_input_embeddings()(ids),)

    assert train_diffusion.word_separation(Constant(), shipped.tokenizer) == {"position": 0, "color": 0, "shape": 0}
    assert all(v > 0.2 for v in train_diffusion.word_separation(Embeddings(), shipped.tokenizer).values())
    # the frozen encoder of the latent-f2-film-text designs (docstring of word_separation)
    assert train_diffusion.word_separation(shipped.text_encoder, shipped.tokenizer) == pytest.approx(
        {"position": 0.131, "color": 0.574, "shape": 0.457}, abs=1e-3)


def cut_cross_attention(unet) -> None:
    """Zero every cross-attention's output projection: the caption then reaches the UNet only through its pooled path."""
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)


def test_pooled_dropout_trains_and_routes_the_empty_caption_to_the_pooled_path_only(tiny_data, tmp_path):
    """--pooled-dropout: the pooled path (--text-film) of the dropped rows reads the empty caption, cross-attention
    reads the caption; the saved pipeline is a plain one; caption_use measures each path's share."""
    from diffusers import DiffusionPipeline

    from generate_data import make_prompts

    quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "2", "--text-film", "--pooled-dropout", "0.5")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "o")  # no custom code
    unet, gen = pipe.unet, torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=gen)
    a, b = (pipe.text_encoder(train_diffusion.tokenize(pipe.tokenizer, [p] * 2))[0]
            for p in ("a red circle in the top left", "a blue star"))
    with torch.no_grad():
        plain_a, plain_b = unet(x, 500, a).sample, unet(x, 500, b).sample
        with train_diffusion.pooled_caption(unet, b):  # pooled path reads b, cross-attention a: neither plain output
            mixed = unet(x, 500, a).sample
        with train_diffusion.pooled_caption(unet, None):
            assert torch.equal(unet(x, 500, a).sample, plain_a)  # None changes nothing
        assert not torch.allclose(mixed, plain_a) and not torch.allclose(mixed, plain_b)
        cut_cross_attention(unet)
        with train_diffusion.pooled_caption(unet, b):  # cross-attention cut: only the pooled caption counts
            assert torch.allclose(unet(x, 500, a).sample, unet(x, 500, b).sample, atol=1e-6)
    reads = train_diffusion.caption_use(pipe, make_prompts("single", 4, seed=0), timesteps=(100,))["t100"]
    assert reads["xattn_ratio"] == 1.0 and reads["xattn_shuffled"] == reads["own"]  # cross-attention ignored
    assert reads["pooled_ratio"] != 1.0 and reads["pooled_shuffled"] == reads["shuffled"]
    # the subcommand, on the saved (uncut) pipeline: one row per timestep, both paths measured
    m = train_diffusion.main(["caption-use", "--model", str(tmp_path / "o"), "--n-prompts", "3", "--timesteps",
                              "100,900", "--outputs", str(tmp_path / "out"), "--run-name", "r"])
    reads = m["models"][str(tmp_path / "o")]
    assert set(reads) == {"t100", "t900"} and all({"xattn_ratio", "pooled_ratio"} <= set(r) for r in reads.values())
    table = (tmp_path / "out" / "caption_use" / "r" / "results.md").read_text()
    assert f"| {tmp_path / 'o'} | 900 | {reads['t900']['ratio']:.4f} | {reads['t900']['xattn_ratio']:.4f} |" in table


@pytest.mark.parametrize("extra, message", [
    (["--model", "no-such-model"], r"^unknown model 'no-such-model': not a registry name \(shapes-tiny, "),
    (["--model", "org/offline-model"], r"^model 'org/offline-model' is not in the local Hugging Face cache"),
    (["--model", "shapes-tiny", "--timesteps", "500,1000"], r"^--timesteps must be in 0\.\.999, got \[500, 1000\]$"),
    (["--model", "shapes-tiny", "--n-prompts", "0"], r"^--n-prompts must be > 0, got 0$"),
])
def test_caption_use_subcommand_bad_input_is_one_line(tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        train_diffusion.main(["caption-use", *extra, "--outputs", str(tmp_path)])


def test_pooled_dropout_draws_a_row_mask_and_leaves_the_random_stream_alone_when_off(tiny_data):
    args = train_diffusion.parse_args(["--quick", "--data", str(tiny_data), "--text-film", "--cfg-dropout", "0"])
    t = bare_trainer(args, torch.zeros(3, 4, 8, 8))
    args.batch_size = 400
    off = t.batch()
    assert off.pooled_drop is None
    args.pooled_dropout = 0.25
    t.gen = torch.Generator().manual_seed(0)
    on = t.batch()
    assert on.pooled_drop.dtype == torch.bool and on.pooled_drop.shape == (400,)
    assert 0.15 < on.pooled_drop.float().mean() < 0.35
    assert torch.equal(on.ids, off.ids)  # the captions drawn before the mask are the same


def test_mirror_pairs_train_and_cache_the_mirror_images_latents(tiny_data, tmp_path):
    info = quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "1", "--mirror-pairs", "0.5")
    assert info["steps"] == 1
    latents, mirror = (torch.load(tmp_path / "c" / name) for name in ("latents.pt", "latents_mirror_x.pt"))
    assert mirror["mean"].shape == latents["mean"].shape and not torch.equal(mirror["mean"], latents["mean"])
    log = json.loads((tmp_path / "o" / "training_log.json").read_text())
    assert log["config"]["mirror_pairs"] == 0.5


@pytest.mark.parametrize("axis, text, mirrored", [
    ("x", "a green circle in the top left", "a green circle in the top right"),
    ("x", "a red star to the left of a small blue circle", "a red star to the right of a small blue circle"),
    ("x", "a heart on the right and a ring on the left", "a heart on the left and a ring on the right"),
    ("x", "a purple heart above an orange square", "a purple heart above an orange square"),
    ("x", "a bright leftover circle in the center", "a bright leftover circle in the center"),  # whole words only
    ("y", "a green circle in the top left", "a green circle in the bottom left"),
    ("y", "a purple ring above an orange square", "a purple ring below an orange square"),
    ("y", "a ring in the middle right, a cross to the left of a diamond",
     "a ring in the middle right, a cross to the left of a diamond"),
    ("y", "a stopwatch on a tabletop", "a stopwatch on a tabletop"),  # whole words only
])
def test_mirror_caption_swaps_the_mirrors_place_words_and_nothing_else(axis, text, mirrored):
    assert train_diffusion.mirror_caption(text, axis) == mirrored
    assert train_diffusion.mirror_caption(mirrored, axis) == text


@pytest.mark.parametrize("batch, share, axes, counts", [
    (32, 0.5, ["x"], {"x": 8}), (32, 0.5, ["x", "y"], {"x": 4, "y": 4}), (32, 0.3, ["x", "y"], {"x": 3, "y": 2}),
    (8, 0.5, ["y", "x"], {"y": 1, "x": 1}),
])
def test_mirror_pairs_are_shared_out_between_the_mirrors(batch, share, axes, counts):
    assert train_diffusion.mirror_pair_counts(batch, share, axes) == counts


def test_mirror_pairs_share_noise_timestep_and_caption_choice_and_mirror_the_rest(tiny_data):
    """--mirror-pairs: a batch ends in one block of k pairs per mirror, an image that may be mirrored that way and
    its mirror image; the mirror row reads the mirrored latents (its posterior sample is the mirror of the first
    row's), the mirrored caption of the same choice, and the first row's noise and timestep."""
    args = train_diffusion.parse_args(["--quick", "--data", str(tiny_data), "--cfg-dropout", "0.2",
                                       "--mirror-axes", "x,y"])
    args.batch_size = 64
    mean = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = bare_trainer(args, mean)
    t.pairs = {"x": 10, "y": 6}
    t.mirror = {"x": {"mean": mean.flip(-1), "std": torch.ones_like(mean), "index": torch.tensor([1, 4]),
                      "tokens": 100 + t.tokens},  # caption k of image i, mirrored left-right: token 100 + 5 i + k
                "y": {"mean": mean.flip(-2), "std": torch.ones_like(mean), "index": torch.tensor([2]),
                      "tokens": 200 + t.tokens}}
    on = t.batch()
    for (a, b), dim, offset, allowed in (((slice(44, 54), slice(54, 64)), -1, 100, {1, 4}),
                                         ((slice(32, 38), slice(38, 44)), -2, 200, {2})):
        assert torch.equal(on.latents[b], on.latents[a].flip(dim))  # the mirror image's posterior sample
        assert torch.equal(on.noise[b], on.noise[a]) and torch.equal(on.t[b], on.t[a])  # same noise, not mirrored
        assert not torch.equal(on.noise[b], on.noise[b].flip(dim))
        first = on.ids[a, 0]
        kept = first >= 0  # rows whose caption was not dropped; the mirror row drops with its pair
        assert torch.equal(on.ids[b, 0] >= 0, kept) and torch.equal(on.ids[b, 0][kept], first[kept] + offset)
        assert set((first[kept] // 5).tolist()) <= allowed  # only images that may be mirrored that way
    assert (on.ids[:32, 0] < 100).all()  # the rows before the pairs read plain captions


def test_grounding_loss_is_zero_inside_one_outside_and_a_quarter_at_half():
    """(1 - share inside)^2: a token whose attention lies all inside the mask costs 0, all outside 1, half 0.25;
    tokens not to ground do not count."""
    side, tokens_n = 4, 3
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :4] = 1  # the top-left quarter of the latent grid: the top-left cell of the 2 x 2 ... 4 x 4 maps
    probs = torch.full((2, side * side, tokens_n), 1e-12)  # 2 heads, 16 positions
    grid = torch.arange(side * side).view(side, side)
    tl, br = grid[:2, :2].flatten(), grid[2:, 2:].flatten()
    probs[:, tl, 0] = 1.0  # token 0: all in the top-left quarter
    probs[:, br, 1] = 1.0  # token 1: all in the bottom-right one
    probs[:, tl, 2], probs[:, br, 2] = 1.0, 1.0  # token 2: half and half
    for token, expected in ((0, 0.0), (1, 1.0), (2, 0.25)):
        chosen = torch.zeros(1, tokens_n, dtype=torch.bool)
        chosen[0, token] = True
        assert train_diffusion.grounding_loss([(probs, 2)], chosen, mask).item() == pytest.approx(expected, abs=1e-6)
    none = torch.zeros(1, tokens_n, dtype=torch.bool)
    assert train_diffusion.grounding_loss([(probs, 2)], none, mask).item() == 0.0


def test_recorded_cross_attention_leaves_the_unet_unchanged_and_grounding_trains_it(tiny_data, tmp_path):
    """record_cross_attention: same outputs as the default processors, one map per cross-attention layer, the
    processors back afterwards; a quick run with --grounding-loss trains and optimising the loss alone moves the
    grounded token's attention into the box."""
    from diffusers import DiffusionPipeline

    quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "2", "--grounding-loss", "1")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "o")
    unet = pipe.unet
    x = torch.randn(1, unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    h = pipe.text_encoder(train_diffusion.tokenize(pipe.tokenizer, ["a red circle in the top left"]))[0].detach()
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    with torch.no_grad():
        plain = unet(x, 500, h).sample
        with train_diffusion.record_cross_attention(unet) as maps:
            recorded = unet(x, 500, h).sample
    assert torch.allclose(plain, recorded, atol=1e-5)
    assert len(maps) == sum(name.endswith("attn2.processor") for name in before)
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    ids = train_diffusion.tokenize(pipe.tokenizer, ["a red circle in the top left"])
    chosen = torch.isin(ids, train_diffusion.grounding_token_ids(pipe.tokenizer))
    assert pipe.tokenizer.convert_ids_to_tokens(ids[chosen].tolist()) == ["circle</w>", "top</w>", "left</w>"]
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :6, :6] = 1
    opt = torch.optim.Adam(unet.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        with train_diffusion.record_cross_attention(unet) as maps:
            unet(x, 500, h)
        loss = train_diffusion.grounding_loss(maps, chosen, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_grounding_batches_mark_the_shape_and_place_tokens_of_single_object_images_only(tiny_data):
    args = train_diffusion.parse_args(["--quick", "--data", str(tiny_data), "--cfg-dropout", "0",
                                       "--grounding-loss", "1"])
    from transformers import CLIPTokenizer

    from utils import REPO as repo

    tokenizer = CLIPTokenizer.from_pretrained(repo / "models" / "shapes-sd-tiny-f2" / "tokenizer")
    captions = [["a red star in the top left"] * 5, ["a red star to the left of a blue ring"] * 5]
    t = bare_trainer(args, torch.zeros(2, 4, 8, 8))
    t.tokens = torch.stack([train_diffusion.tokenize(tokenizer, caps) for caps in captions])
    t.empty = train_diffusion.tokenize(tokenizer, [""])[0]
    t.single, t.masks = torch.tensor([True, False]), torch.ones(2, 1, 8, 8, dtype=torch.uint8)
    t.ground_ids = train_diffusion.grounding_token_ids(tokenizer)
    args.batch_size = 16
    b = t.batch()
    tokens, masks = b.ground
    assert masks.shape == (16, 1, 8, 8)
    for row in range(16):
        words = tokenizer.convert_ids_to_tokens(b.ids[row][tokens[row]].tolist())
        first_image = bool(tokens[row].any())
        assert words == (["star</w>", "top</w>", "left</w>"] if first_image else [])
    assert tokens.any(1).sum() not in (0, 16)  # both images were drawn
    # only the place words, only where the noise hides the object (timestep >= 500)
    args.grounding_words, args.grounding_min_t = ["place"], 500
    t.ground_ids = train_diffusion.grounding_token_ids(tokenizer, args.grounding_words)
    b = t.batch()
    tokens = b.ground[0]
    for row in range(16):
        words = tokenizer.convert_ids_to_tokens(b.ids[row][tokens[row]].tolist())
        assert words in ([], ["top</w>", "left</w>"])
        assert not words or b.t[row] >= 500
    assert tokens.any()


def test_caption_groups_hold_the_single_object_images_that_fit_what_the_caption_names():
    from generate_data import _obj

    objects = [[_obj("circle", "red", "small", (0, 0))], [_obj("circle", "red", "large", (0, 0))],
               [_obj("circle", "blue", "small", (0, 0))], [_obj("circle", "red", "small", (2, 2))],
               [_obj("circle", "red", "small", (0, 0)), _obj("star", "red", "small", (1, 1))], [],
               [_obj("star", "red", "small", (0, 0))]]
    captions = [["a red circle in the top left", "a circle", "a picture of a small circle",
                 "one object: a red circle", "a circle in red"],
                ["a large red circle"], ["a blue circle"], ["a red circle in the bottom right"],
                ["a red circle in the top left and a star in the center"], ["a photo of a dog"], ["a star"]]
    group, members = train_diffusion.caption_groups(objects, captions)
    assert group.shape == (7, 5)

    def fits(i, k):
        return sorted(members[group[i, k]].tolist())

    assert fits(0, 0) == [0, 1]  # red circles in the top left, any size
    assert fits(0, 1) == [0, 1, 2, 3]  # every single circle
    assert fits(0, 2) == [0, 2, 3]  # small circles
    assert fits(0, 3) == fits(0, 4) == [0, 1, 3]  # red circles, anywhere
    assert fits(1, 0) == [1] and fits(3, 0) == [3] and fits(6, 0) == [6]
    assert (group[4] == -1).all() and (group[5] == -1).all()  # two objects; no attributes (COCO)


def test_caption_groups_from_a_rendered_pool_index_the_pool_rows_that_fit_the_caption():
    from generate_data import _obj

    objects = [[_obj("circle", "red", "small", (0, 0))], [_obj("heart", "red", "small", (0, 0))],
               [_obj("circle", "red", "small", (0, 0)), _obj("star", "red", "small", (1, 1))]]
    captions = [["a red circle in the top left", "a circle", "a small circle", "a red circle", "a circle in red"],
                ["a heart"], ["a red circle and a star"]]
    pool = [_obj("circle", "red", "large", (0, 0)), _obj("circle", "red", "small", (2, 2)),
            _obj("circle", "blue", "small", (0, 0)), _obj("circle", "red", "small", (0, 0))]
    group, members = train_diffusion.caption_groups(objects, captions, pool)

    def fits(i, k):
        return sorted(members[group[i, k]].tolist())

    assert fits(0, 0) == [0, 3] and fits(0, 1) == [0, 1, 2, 3] and fits(0, 2) == [1, 2, 3]
    assert fits(0, 3) == fits(0, 4) == [0, 1, 3]
    assert (group[1] == -1).all()  # no heart in the pool
    assert (group[2] == -1).all()  # two objects


def test_rendered_references_render_every_attribute_key_as_the_data_draws_its_objects():
    from generate_data import BRIGHTNESS, CELLS, COLORS, JITTER, SHAPES, SIZES

    objects, images = train_diffusion.rendered_references(2, 0, 32)
    keys = [(o["shape"], o["color"], o["size"], tuple(o["cell"])) for o in objects]
    assert keys[::2] == keys[1::2] == list(itertools.product(SHAPES, COLORS, SIZES, CELLS))
    assert images.shape == (len(objects), 3, 32, 32) and images.dtype == torch.uint8
    assert len({o["center"][0] for o in objects}) == len(objects)  # centre jitter drawn per render
    for o in objects:
        (row, col), (fx, fy) = o["cell"], o["center"]
        assert abs(fx - (col + 0.5) / 3) <= JITTER and abs(fy - (row + 0.5) / 3) <= JITTER
        assert BRIGHTNESS[0] <= o["brightness"] <= BRIGHTNESS[1]
    big = [i for i, o in enumerate(objects) if o["size"] == "large" and o["shape"] in ("circle", "square")]
    for i in big:  # the object's colour at its centre (large circles and squares cover their centre pixel)
        (fx, fy), o = objects[i]["center"], objects[i]
        pixel = images[i, :, min(max(int(fy * 32), 5), 26), min(max(int(fx * 32), 5), 26)].float()
        expected = (torch.tensor(COLORS[o["color"]], dtype=torch.float) * o["brightness"]).clamp(0, 255)
        assert (pixel - expected).abs().max() <= 2
    again, _ = train_diffusion.rendered_references(2, 0, 32)
    assert again == objects


def test_stable_target_is_its_own_latent_at_low_noise_and_the_references_mean_at_snr_zero():
    g = torch.Generator().manual_seed(0)
    x0, refs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 4, 8, 8, generator=g)
    a = torch.tensor([0.0, 0.999])
    noisy = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=g)
    target = train_diffusion.stable_target(noisy, x0, refs, a)
    assert torch.allclose(target[0], torch.cat([x0[:1], refs[0]]).mean(0), atol=1e-6)  # SNR 0: p(x_t | c) all equal
    assert torch.allclose(target[1], x0[1], atol=1e-4)  # low noise: x_t rules out the others
    near = train_diffusion.stable_target(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8),
                                         torch.stack([torch.full((4, 8, 8), v) for v in (0.1, 3.0)])[None],
                                         torch.tensor([0.5]))
    assert 0 < near.mean() < 0.1  # between x0 (0) and the nearer reference (0.1): the farther one (3.0) weighs ~0


def test_stf_batches_draw_references_from_each_captions_set_and_skip_dropped_and_unmatched_rows(tiny_data):
    args = train_diffusion.parse_args(["--quick", "--data", str(tiny_data), "--stf-reference", "4",
                                       "--cfg-dropout", "0.3", "--batch-size", "64"])
    n = 6
    t = bare_trainer(args, torch.arange(n, dtype=torch.float).view(n, 1, 1, 1).expand(n, 4, 8, 8).contiguous())
    t.group = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 0, 0, 0], [1] * 5, [-1] * 5, [-1] * 5, [2] * 5])
    t.members = [torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([5])]
    b = t.batch()
    rows, refs = b.refs
    ids = b.ids[:, 0]
    kept = [r for r in range(64) if ids[r] >= 0 and t.group[ids[r] // 5, ids[r] % 5] >= 0]
    assert rows.tolist() == kept and 0 < len(kept) < 64
    assert refs.shape == (len(kept), 3, 4, 8, 8)
    for r, ref in zip(kept, refs):
        allowed = t.members[t.group[ids[r] // 5, ids[r] % 5]].tolist()
        assert set(ref[:, 0, 0, 0].long().tolist()) <= set(allowed)  # latent value = image index
    plain = bare_trainer(train_diffusion.parse_args(["--quick", "--data", str(tiny_data)]), t.mean)
    assert plain.batch().refs is None


def test_place_focus_batches_start_with_single_object_place_captions_at_noisy_timesteps(tiny_data):
    args = train_diffusion.parse_args(["--quick", "--data", str(tiny_data), "--place-focus", "0.25",
                                       "--place-focus-min-t", "950", "--cfg-dropout", "0.5", "--batch-size", "64"])
    t = bare_trainer(args, torch.zeros(6, 4, 8, 8))
    t.focus = torch.tensor([[1, 3], [4, 0], [4, 2]])  # (image, caption) pairs
    for _ in range(3):
        b = t.batch()
        ids = b.ids[:16, 0]  # bare_trainer's caption k of image i is token 5 i + k; never dropped (-1)
        assert set(ids.tolist()) <= {5 * 1 + 3, 5 * 4 + 0, 5 * 4 + 2}
        assert (b.t[:16] >= 950).all() and (b.t[16:] < 950).any()
        assert (b.ids[16:, 0] == -1).any()  # the other rows keep their caption dropout


def test_place_focus_after_switches_the_share_at_its_step(tiny_data):
    args = train_diffusion.parse_args(["--quick", "--data", str(tiny_data), "--place-focus", "0.5",
                                       "--place-focus-after", "1000:0.125", "--batch-size", "64"])
    t = bare_trainer(args, torch.zeros(6, 4, 8, 8))
    t.focus = torch.tensor([[1, 3]])  # one (image, caption) pair: caption token 5 * 1 + 3 = 8
    for step, rows in ((0, 32), (999, 32), (1000, 8), (2500, 8)):
        t.step = step
        b = t.batch()
        assert (b.ids[:rows, 0] == 8).all() and (b.t[:rows] >= 900).all()
        assert (b.ids[rows:, 0] != 8).any() or (b.t[rows:] < 900).any()  # the rows after the focus are drawn freely
    args.place_focus_switch = (1000, 0.0)  # a share of 0 ends the focus
    assert t.place_focus_share() == 0 and (t.batch().t < 900).any()


def test_place_focus_needs_single_object_place_captions(tiny_data, tmp_path):
    data = train_diffusion.load_data(tiny_data)
    for split in data["splits"].values():
        for record in split:
            kept = [c for c in record["captions"] if not train_diffusion.names_place(c.lower())]
            record["captions"] = kept or ["a shape"]
    bare = tmp_path / "no_place.pkl"
    bare.write_bytes(pickle.dumps(data))
    with pytest.raises(UserError, match=r"^--place-focus needs single-object training images with a caption that"):
        quick(bare, tmp_path / "o", tmp_path / "c", "--max-steps", "1", "--place-focus", "0.25")


def test_stf_reference_trains_and_needs_the_shapes_worlds_objects(tiny_data, tmp_path):
    info = quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "2", "--stf-reference", "4")
    log = json.loads((tmp_path / "o" / "training_log.json").read_text())
    assert info["steps"] == 2 and log["config"]["stf_reference"] == 4
    assert all(np.isfinite(entry["loss"]) for entry in log["loss_curve"])
    data = train_diffusion.load_data(tiny_data)
    for split in data["splits"].values():
        for record in split:
            record.pop("objects", None)
    bare = tmp_path / "no_objects.pkl"
    bare.write_bytes(pickle.dumps(data))
    with pytest.raises(UserError, match=r"^--stf-reference needs single-object images with the shapes world's object"):
        quick(bare, tmp_path / "o2", tmp_path / "c2", "--stf-reference", "4")


def test_stf_rendered_trains_on_a_cached_rendered_pool(tiny_data, tmp_path):
    info = quick(tiny_data, tmp_path / "o", tmp_path / "c", "--max-steps", "2", "--stf-reference", "4",
                 "--stf-rendered", "1", "--place-focus", "0.5")
    assert info["steps"] == 2
    cached, = (tmp_path / "c").glob("stf_rendered_1_*px.pt")
    pool = torch.load(cached, weights_only=False)
    assert len(pool["objects"]) == len(pool["mean"]) == 12 * 8 * 2 * 9
