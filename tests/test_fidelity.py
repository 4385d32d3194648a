"""fidelity.py: Fréchet distance by hand, the alignment score, evaluate-model on a tiny random-weight pipeline
(its run folder, and the model card only with --write-card), and bad inputs."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

import fidelity
import generate_data as gd
import oracle
from tiny_models import bias_heads, tiny_sd_pipeline
from utils import REPO, UserError, model_card


# --------------------------------------------------------------------------- Fréchet distance
def _fd_with_sqrtm(a, b):
    """The textbook formula with scipy's sqrtm (full-rank cases only)."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * root))


def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(50, 8))
    assert fidelity.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_one_dimensional_by_hand():
    a = np.array([0.0, 1.0, 2.0, 3.0])         # mean 1.5, sample variance 5/3
    b = np.array([10.0, 14.0, 12.0, 16.0, 8.0])  # mean 12, sample variance 10
    expected = (1.5 - 12) ** 2 + (np.sqrt(5 / 3) - np.sqrt(10)) ** 2
    assert fidelity.frechet_distance(a[:, None], b[:, None]) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_sqrtm_and_both_routes_agree():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(30, 5)) * [1, 2, 3, 0.5, 1] + 0.3
    assert fidelity.frechet_distance(a, b) == pytest.approx(_fd_with_sqrtm(a, b), rel=1e-8)
    wide_a, wide_b = rng.normal(size=(12, 64)), rng.normal(size=(9, 64)) + 0.1  # n < d: singular covariances
    ac, bc = wide_a - wide_a.mean(0), wide_b - wide_b.mean(0)
    assert fidelity._trace_sqrt_product(ac, bc, "gram") == pytest.approx(
        fidelity._trace_sqrt_product(ac, bc, "cov"), rel=1e-6)


def test_frechet_distance_grows_with_a_mean_shift():
    x = np.random.default_rng(2).normal(size=(100, 6))
    shifts = [0.0, 0.5, 1.0, 2.0]
    fds = [fidelity.frechet_distance(x, x + s) for s in shifts]
    np.testing.assert_allclose(fds, [6 * s ** 2 for s in shifts], atol=1e-8)  # same covariance: ||shift||^2


def test_fd_real_vs_real_uses_two_disjoint_sets():
    ref, other = fidelity.real_reference_split(100, 40, seed=0)
    assert len(ref) == len(other) == 40 and not set(ref) & set(other)
    feats = np.random.default_rng(3).normal(size=(100, 4))
    assert 0 < fidelity.fd_real_vs_real(feats, 40) < fidelity.frechet_distance(feats[other], feats[ref] + 1.0)
    with pytest.raises(UserError, match=r"^the FD floor needs 2 x 60 real images, only 100 available; lower --n-fd$"):
        fidelity.real_reference_split(100, 60, seed=0)


# --------------------------------------------------------------------------- alignment score
@pytest.fixture(scope="module")
def heads_60(tmp_path_factory):
    return bias_heads(tmp_path_factory.mktemp("heads") / "heads.pt", 60)


def test_alignment_score_is_100_times_clipped_cosine(heads_60, tmp_path):
    prompts = gd.make_prompts("single", 3, seed=11)
    images = gd.render_prompts(prompts, seed=11)
    texts = [p["text"] for p in prompts[:3]]
    s = fidelity.alignment_score(images[:3], texts, heads_60, device="cpu")
    assert s.shape == (3,) and s.dtype == np.float32
    np.testing.assert_allclose(s, 50.0, atol=1e-3)  # cos 60 = 0.5
    opposite = fidelity.alignment_score(images[:2], texts[:2], bias_heads(tmp_path / "h.pt", 150), device="cpu")
    np.testing.assert_array_equal(opposite, [0.0, 0.0])  # negative cosine clips to 0


# --------------------------------------------------------------------------- evaluate-model on a tiny pipeline
FACTS = {"n_images": 777, "vocab_size": 55, "max_length": 40, "latent_side": 16, "scaling_factor": 0.5,
         "hardware": "CPU, 3 torch thread(s) on a test machine", "steps": 123, "train_minutes": 2.5,
         "steps_per_second": 0.82, "final_loss": 0.0625, "resumed_from_step": None}


def _training_log() -> dict:
    """The shipped model's training log with the card's facts set by this test."""
    log = json.loads((REPO / "models" / "shapes-sd-tiny" / "training_log.json").read_text())
    return dict(log, card_facts=FACTS)


def _tiny_model(tmp_path, with_log: bool):
    model = tmp_path / "tiny-sd"
    tiny_sd_pipeline(tmp_path).save_pretrained(model)
    (model / "metrics.json").write_text(json.dumps({"train_loss": 0.25}))  # the trainer's keys must survive
    if with_log:
        (model / "training_log.json").write_text(json.dumps(_training_log()))
    return model


def test_evaluate_model_writes_a_run_folder_and_leaves_the_model_alone(tmp_path, tiny_data, heads_60):
    model = _tiny_model(tmp_path, with_log=False)
    before = sorted(p.name for p in model.iterdir())
    args = ["evaluate-model", "--model", str(model), "--quick", "--steps", "2", "--data", str(tiny_data),
            "--heads", str(heads_60), "--device", "cpu", "--outputs", str(tmp_path / "out"), "--run-name", "r1"]
    returned = fidelity.main(args)
    run = tmp_path / "out" / "fidelity" / "tiny-sd" / "r1"
    assert (run.parent / "latest").resolve() == run.resolve()
    assert json.loads((run / "config.json").read_text())["args"]["steps"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("oracle_accuracy_on_renders", "single_object_all_correct", "two_object_all_correct", "single_object",
                "two_object", "fd", "fd_real_vs_real", "sampler", "n_prompts", "seed", "timings",
                "prompt_renders_all_correct", "alignment"):
        assert key in metrics, key
    assert metrics["sampler"] == {**metrics["sampler"], "scheduler": "DDIMScheduler", "steps": 2, "guidance": 5.0,
                                  "size": 64}
    assert metrics["single_object"]["n"] == metrics["two_object"]["n"] == metrics["n_prompts"] == 4
    assert 0 <= metrics["single_object_all_correct"] <= 1 and 0 <= metrics["two_object_all_correct"] <= 1
    assert metrics["fd"] > 0 and metrics["fd_real_vs_real"] > 0 and metrics["fd_n"] == 8
    assert metrics["alignment"] == pytest.approx(50.0, abs=1e-3)
    assert metrics["prompt_renders_all_correct"]["single"] >= 0.75  # the oracle reads renders of the same prompts
    # the tiny pipeline's own autoencoder round trip (4 prompts per kind) and which oracle judged, as a reader types it
    assert set(metrics["representation_round_trip"]) == {"single", "two"}
    assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in metrics["representation_round_trip"].values())
    assert metrics["oracle"] == "models/shapes-oracle"
    assert metrics["oracle_sha256_12"] == oracle.weights_sha(oracle.DEFAULT_ORACLE)
    assert (run / "fidelity_grid.png").is_file()
    steps = {"generate_s", "oracle_s", "fd_s", "alignment_s"}
    assert steps | {"total_s"} == set(metrics["timings"])
    assert sum(metrics["timings"][k] for k in steps) <= metrics["timings"]["total_s"]  # the steps lie inside the run
    assert returned["single_object"] == metrics["single_object"]
    # each prompt's all-correct, for paired comparisons between models, and the rate's CI around it
    for kind, key in (("single", "single_object"), ("two", "two_object")):
        hits = metrics["all_correct_per_prompt"][kind]
        assert len(hits) == 4 and set(hits) <= {0, 1} and sum(hits) / 4 == metrics[f"{key}_all_correct"]
        lo, hi = metrics["all_correct_ci95"][kind]
        assert lo <= metrics[f"{key}_all_correct"] <= hi
    # without --write-card the model folder is not touched
    assert sorted(p.name for p in model.iterdir()) == before
    assert json.loads((model / "metrics.json").read_text()) == {"train_loss": 0.25}


def test_versus_is_the_paired_difference_on_the_same_prompt_set():
    a = {"n_prompts": 4, "seed": 0, "all_correct_per_prompt": {"single": [1, 0, 1, 1], "two": [0, 0, 0, 0]}}
    b = {"n_prompts": 4, "seed": 0, "all_correct_per_prompt": {"single": [0, 0, 1, 0], "two": [0, 0, 0, 1]}}
    d = fidelity.versus(a, b)
    assert d["single"]["mean"] == pytest.approx(0.5) and d["two"]["mean"] == pytest.approx(-0.25)
    assert d["single"]["n"] == 4 and d["single"]["ci95"][0] <= 0.5 <= d["single"]["ci95"][1]
    assert fidelity.versus(a, dict(b, seed=1)) is None  # other prompts: nothing to pair
    assert fidelity.versus(a, {"n_prompts": 4, "seed": 0}) is None  # an older run without per-prompt results


def test_write_card_updates_the_model_folder_with_the_measured_numbers(tmp_path, tiny_data):
    model = _tiny_model(tmp_path, with_log=True)
    args = ["evaluate-model", "--model", str(model), "--n-prompts", "2", "--kinds", "single", "--steps", "2",
            "--n-fd", "0", "--heads", "", "--grid-rows", "1", "--data", str(tiny_data), "--device", "cpu",
            "--outputs", str(tmp_path / "out"), "--write-card"]
    fidelity.main(args)
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["train_loss"] == 0.25 and metrics["single_object"]["n"] == 2
    assert (model / "fidelity_grid.png").is_file()
    card = (model / "README.md").read_text()
    s = metrics["single_object"]
    row = "| single object | " + " | ".join("n/a" if s[a] is None else f"{s[a]:.3f}"
                                           for a in ("shape", "color", "size", "position", "count", "all")) + " |"
    assert row in card and "two objects + relation" not in card
    assert "`python fidelity.py evaluate-model --model tiny-sd --write-card`" in card
    assert "# tiny-sd\n" in card and "- text encoder + UNet: 123 steps of batch 32 (2.5 min," in card


def test_model_card_is_built_from_the_log_and_the_metrics():
    attrs = {"shape": 0.5, "color": 1.0, "size": None, "position": 0.25, "count": 1.0, "all": 0.125, "n": 8}
    m = {"model": {"name": "m"}, "args": {"heads": None}, "n_prompts": 8, "seed": 3, "oracle_accuracy_on_renders": 0.99,
         "sampler": {"scheduler": "S", "steps": 7, "guidance": 2.0, "device": "cpu"},
         "single_object": attrs, "single_object_all_correct": 0.125, "two_object": None, "two_object_all_correct": None,
         "fd": 12.34, "fd_real_vs_real": 5.0, "fd_n": 8, "alignment": None}
    text = model_card("m", _training_log(), m)
    assert text.startswith("---\nlibrary_name: diffusers\n") and "\n# m\n" in text
    section = text[text.index("## Fidelity"):text.index("## Limitations")]
    assert "NOT met" in section.splitlines()[0]  # the verdict: 0.125 < 0.90 and no two-object number
    row = next(line for line in section.splitlines() if line.startswith("| single object |"))
    assert [c.strip() for c in row.split("|")[2:-1]] == ["0.500", "1.000", "n/a", "0.250", "1.000", "0.125"]
    assert {"0.90", "0.125", "12.3", "5.0"} <= set(re.findall(r"\d+\.\d+", section))  # target, measured, FD, floor
    assert "Representation ceiling" not in section  # not measured (e.g. a hub pipeline at 512 px)
    ceiling = model_card("m", _training_log(), dict(m, representation_round_trip={"single": 0.985, "two": 0.97}))
    assert "after this pipeline's autoencoder round trip, judged alike): single 0.985, two 0.970;" in ceiling
    both = dict(m, single_object_all_correct=0.95, two_object=attrs, two_object_all_correct=0.75)
    heading = next(line for line in model_card("m", _training_log(), both).splitlines() if line.startswith("## Fidelity"))
    assert "met" in heading and "NOT" not in heading  # both targets reached
    assert "777 images of split `pretrain`" in text and "55 tokens" in text and "0.82 steps/s" in text
    assert "- final loss (mean of the last 10 steps): 0.0625" in text
    assert "The UNet saw only 3,936 training examples (2 min on\nCPU, 3 torch thread(s) on a test machine)" in text
    assert text.index("## Fidelity") < text.index("## Limitations")


def test_model_card_says_how_the_captions_were_drawn():
    log = _training_log()
    plain = model_card("m", log)
    assert "In this run" not in plain  # the shipped f=4 model drew its captions uniformly
    config = dict(log["config"], place_captions=0.8, place_focus=0.5, place_focus_after="1000:0.15",
                  place_focus_switch=[1000, 0.15], place_focus_min_t=900)
    text = model_card("m", dict(log, config=config))
    assert ("augmentation that would change left/right/top/bottom. In this run with probability 0.8 the caption "
            "drawn is one that names a place, where the image has one; the first 50% (15% from this run's step "
            "1,000 on) of every batch are single-object images read with a caption that names their place, at "
            "timesteps 900..999 and never dropped (`--place-focus`).") in " ".join(text.split())
    focus_only = model_card("m", dict(log, config=dict(config, place_captions=0, place_focus_after="", place_focus_switch=None)))
    assert "In this run the first 50% of every batch are single-object images" in " ".join(focus_only.split())


def test_model_card_lists_each_resume_and_what_it_changed():
    log = _training_log()
    assert "- resumed" not in model_card("m", log) and "- resumed" not in model_card("m", dict(log, starts=None))
    # the `pf` run of 2026-12-06: resumed with its switch moved (its checkpoint predated the record, hence first_step)
    starts = {"first_step": 1000, "resumes": [
        {"step": 1500, "cpu_minutes": 52.3, "changed": {"place_focus_after": ["1000:0.15", "2000:0.15"],
                                                         "threads": [1, 2], "freeze_text": [True, False]}},
        {"step": 3000, "cpu_minutes": 90, "changed": {}}]}
    line = next(x for x in model_card("m", dict(log, starts=starts)).splitlines() if x.startswith("- resumed"))
    assert line == ("- resumed 2 times (the configuration above is the last start's; starts before step 1,000 were "
                    "not recorded): at step 1,500 (52.3 CPU-min): `--place-focus-after` 1000:0.15 -> 2000:0.15, "
                    "`--threads` 1 -> 2, `--freeze-text` on -> off; at step 3,000 (90 CPU-min): no argument changed")


def test_model_card_shows_the_learning_curve_and_whether_it_still_rises():
    def point(step, minutes, single, ci):
        score = {"all": single, "all_ci": ci, "shape": 0.5, "color": 0.75, "position": None, "count": 1.0}
        return {"step": step, "cpu_minutes": minutes, "single": score, "two": dict(score, all=0.0, all_ci=[0.0, 0.0])}

    curve = {"command": "python train_diffusion.py study --run-name x", "n_prompts": 200,
             "points": [point(600, 15, 0.1, [0.06, 0.14]), point(2400, 60, 0.3, [0.24, 0.36])]}
    text = model_card("m", _training_log(), None, curve)
    section = text[text.index("## Learning curve"):text.index("## Limitations")]
    assert "`python train_diffusion.py study --run-name x` scored" in section
    assert "| 600 | 0.25 | 0.100 [0.060, 0.140] | 0.000 [0.000, 0.000] | 0.500 / 0.750 / n/a |" in section
    assert "| 2,400 | 1.00 | 0.300 [0.240, 0.360] |" in section
    assert "moved +0.200: still rising" in section  # 0.24 > 0.10
    flat = dict(curve, points=[point(600, 15, 0.28, [0.2, 0.36]), point(2400, 60, 0.3, [0.24, 0.36])])
    assert "within the CI of the last point" in model_card("m", _training_log(), None, flat)
    assert "## Learning curve" not in model_card("m", _training_log())
    # a curve scored by an earlier oracle than the card's fidelity numbers says so
    m = {"model": {"name": "m"}, "args": {}, "n_prompts": 8, "seed": 0, "oracle_accuracy_on_renders": 0.99,
         "sampler": {"scheduler": "S", "steps": 7, "guidance": 2.0, "device": "cpu"}, "single_object": None,
         "two_object": None, "oracle_sha256_12": "newnewnewnew"}
    old = model_card("m", _training_log(), m, dict(curve, oracle_sha256_12="oldoldoldold"))
    assert "with an earlier oracle (weights oldoldoldold; the fidelity numbers above are by newnewnewnew" in old
    assert "scored EMA snapshots of this run with the oracle (" in model_card(
        "m", _training_log(), m, dict(curve, oracle_sha256_12="newnewnewnew"))


def test_model_card_before_any_measurement_says_how_to_measure():
    text = model_card("m", _training_log())
    assert "## Fidelity\nNot measured yet: `python fidelity.py evaluate-model --model <this folder> --write-card`" in text
    assert "TO BE FILLED IN" not in text and "(measured" not in text


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown command 'nope'; choose one of evaluate-model"),
    ([], "no command given; choose one of evaluate-model"),
    (["evaluate-model", "--n-prompts", "0"], "--n-prompts must be positive, got 0"),
    (["evaluate-model", "--kinds", "single,triple"],
     "unknown prompt kind 'triple' in --kinds; choose from single, two"),
    (["evaluate-model", "--fd-from", "noise"], "unknown --fd-from 'noise'; choose captions or prompts"),
    (["evaluate-model", "--quick", "--write-card"], "--write-card with --quick would put smoke-run numbers in the card"),
    (["evaluate-model", "--n-fd", "many"], "argument --n-fd: invalid int value: 'many'"),
    (["evaluate-model", "--kinds", " , "], "--kinds is empty"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(UserError) as err:
        fidelity.main(argv)
    assert str(err.value) == message


def test_missing_files(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(UserError) as err:
        fidelity.alignment_score(np.zeros((1, 64, 64, 3), np.uint8), ["a red star"], missing)
    assert str(err.value) == f"retrieval checkpoint not found: {missing} (run `python retrieval.py` first)"
    with pytest.raises(UserError) as err:
        fidelity.main(["evaluate-model", "--model", str(tmp_path)])
    assert str(err.value) == f"{tmp_path} is not a diffusers pipeline folder (no model_index.json)"
    with pytest.raises(UserError) as err:
        fidelity.main(["evaluate-model", "--model", str(tmp_path / "nope")])
    assert str(err.value).startswith(f"unknown model '{tmp_path / 'nope'}': not a registry name (shapes-tiny, ")
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(UserError) as err:
        fidelity.main(["evaluate-model", "--model", str(tmp_path), "--write-card"])
    assert str(err.value) == (f"--write-card needs {tmp_path / 'training_log.json'} with card_facts "
                              "(a model saved by train_diffusion.py)")
    with pytest.raises(UserError) as err:
        fidelity.main(["evaluate-model", "--model", "org/some-hub-model", "--write-card"])
    assert str(err.value) == "--write-card needs a local model folder; org/some-hub-model is not one"
    log = _training_log()
    del log["card_facts"]
    with pytest.raises(UserError) as err:
        model_card("old", log)
    assert str(err.value) == ("training_log.json of old has no card_facts: retrain it with train_diffusion.py "
                              "(the card is built from them)")


def test_cli_prints_one_line_and_exits_2():
    out = subprocess.run([sys.executable, "fidelity.py", "evaluate-model", "--n-prompts", "-1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr == "error: --n-prompts must be positive, got -1\n"
