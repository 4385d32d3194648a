"""train_diffusion.py: the --quick run end to end, the saved pipeline, the tokenizer, resuming, argument errors."""

import json
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
    assert "## Fidelity" in (out / "README.md").read_text()


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


@pytest.mark.parametrize("extra, message", [
    (["--max-steps", "0"], r"^--max-steps must be > 0, got 0$"),
    (["--batch-size", "-4"], r"^--batch-size must be > 0, got -4$"),
    (["--cfg-dropout", "1.5"], r"^--cfg-dropout must be in 0\.\.1, got 1\.5$"),
    (["--vae-channels", "16,x"], r"^--vae-channels must be comma-separated integers, got '16,x'$"),
    (["--text-hidden", "30", "--text-heads", "4"], r"^--text-heads 4 must divide --text-hidden 30$"),
    (["--vae-crop", "20"], r"^--vae-crop must be a multiple of 8 pixels, got 20$"),
    (["--guidance", "0.5"], r"^--guidance must be >= 1, got 0\.5$"),
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


@pytest.mark.parametrize("folder", [SHIPPED, SHIPPED.with_name("shapes-sd-tiny-4k")], ids=lambda p: p.name)
def test_shipped_model_generates_a_64px_image_on_cpu(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)  # as a new user calls it: no dtype given
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a small red star", num_inference_steps=2, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert len(pipe.tokenizer("a red star to the left of a blue circle").input_ids) == 12
