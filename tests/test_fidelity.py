"""fidelity.py: prompts and their grammar, the shipped oracle on right and wrong labels, Fréchet distance by hand,
the alignment score, evaluate-model on a tiny random-weight pipeline, and bad inputs."""

import json
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import scipy.linalg

import fidelity
import generate_data as gd
from tiny_models import bias_heads, tiny_sd_pipeline
from utils import UserError

OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


# --------------------------------------------------------------------------- prompts
def test_prompts_are_deterministic_and_balanced():
    single = fidelity.make_prompts("single", 192, seed=3)
    assert single == fidelity.make_prompts("single", 192, seed=3)
    assert single != fidelity.make_prompts("single", 192, seed=4)
    # 192 = two passes over the 96 shape x colour pairs: every shape 16 times, every colour 24 times.
    assert set(Counter(p["objects"][0]["shape"] for p in single).values()) == {16}
    assert set(Counter(p["objects"][0]["color"] for p in single).values()) == {24}
    for attr in ("size", "cell"):
        named = np.mean([p["objects"][0][attr] is not None for p in single])
        assert 0.35 < named < 0.65, f"{attr} named in {named:.2f} of prompts, expected about half"

    two = fidelity.make_prompts("two", 120, seed=3)
    assert two == fidelity.make_prompts("two", 120, seed=3)
    assert set(Counter(p["objects"][0]["shape"] for p in two).values()) == {10}
    assert set(Counter(p["relation"]["rel"] for p in two).values()) == {30}
    for p in two:
        a, b = p["objects"]
        assert (a["shape"], a["color"]) != (b["shape"], b["color"])


def test_prompt_wording_parses_back_to_the_structure():
    prompts = fidelity.make_prompts("single", 100, seed=1) + fidelity.make_prompts("two", 100, seed=1)
    for p in prompts:
        assert fidelity.parse_prompt(p["text"]) == p
    assert fidelity.parse_prompt("a small red star in the top left")["objects"] == [
        {"shape": "star", "color": "red", "size": "small", "cell": [0, 0]}]
    assert fidelity.parse_prompt("an orange ring in the center")["objects"][0]["cell"] == [1, 1]
    for p in prompts[100:]:  # relation prompts name two objects, one on each side of the relation
        assert len(p["objects"]) == 2 and (p["relation"]["a"], p["relation"]["b"]) == (0, 1)
        left, right = p["text"].split(f" {p['relation']['rel']} ")
        assert fidelity.parse_prompt(left)["objects"][0]["shape"] == p["objects"][0]["shape"]
        assert fidelity.parse_prompt(right)["objects"][0]["shape"] == p["objects"][1]["shape"]


def test_prompt_grammar_is_the_training_caption_grammar(tiny_data):
    from utils import load_data

    records = [r for r in load_data(tiny_data)["splits"]["train"] if len(r["objects"]) == 2
               and len({(o["shape"], o["color"]) for o in r["objects"]}) == 2]
    assert len(records) > 50
    for rec in records:  # with two objects the first caption is a relation caption
        p = fidelity.parse_prompt(rec["captions"][0])
        by_shape_color = {(o["shape"], o["color"]): o for o in rec["objects"]}
        a, b = (by_shape_color[(o["shape"], o["color"])] for o in p["objects"])
        assert p["relation"]["rel"] in gd.true_relations(a, b)


# --------------------------------------------------------------------------- oracle (the shipped weights)
@pytest.fixture(scope="module")
def oracle():
    return fidelity.Oracle.load(fidelity.DEFAULT_ORACLE, device="cpu")


@pytest.fixture(scope="module")
def prompt_renders():
    prompts = fidelity.make_prompts("single", 25, seed=11) + fidelity.make_prompts("two", 25, seed=11)
    return prompts, fidelity.render_prompts(prompts, seed=11)


def test_oracle_is_right_on_renders_of_the_prompts(oracle, prompt_renders):
    prompts, images = prompt_renders
    scores = oracle.score(images, prompts)
    assert np.mean([s["all"] for s in scores]) >= 0.95
    assert all(s["size"] is None for s, p in zip(scores, prompts) if all(o["size"] is None for o in p["objects"]))


def _corrupt(prompt: dict, i: int) -> dict:
    """A prompt the rendered image does not show: another colour, another shape, or the opposite relation."""
    p = json.loads(json.dumps(prompt))
    obj = p["objects"][0]
    kind = i % 3 if p["relation"] else i % 2
    if kind == 0:
        used = {o["color"] for o in p["objects"]}
        obj["color"] = next(c for c in fidelity.COLOR_NAMES[i % 8:] + fidelity.COLOR_NAMES if c not in used)
    elif kind == 1:
        used = {o["shape"] for o in p["objects"]}
        obj["shape"] = next(s for s in gd.SHAPES[i % 12:] + gd.SHAPES if s not in used)
    else:
        p["relation"]["rel"] = OPPOSITE[p["relation"]["rel"]]
    p["text"] = fidelity.prompt_text(p)
    return p


def test_oracle_is_wrong_on_wrong_labels(oracle, prompt_renders):
    prompts, images = prompt_renders
    wrong = [_corrupt(p, i) for i, p in enumerate(prompts)]
    assert all(w["text"] != p["text"] for w, p in zip(wrong, prompts))
    scores = oracle.score(images, wrong)
    assert np.mean([not s["all"] for s in scores]) >= 0.95


def test_oracle_detects_scene_objects_and_resizes_large_inputs(oracle):
    from PIL import Image

    objects = [{"shape": "star", "color": "red", "size": "large", "cell": [0, 0]},
               {"shape": "ring", "color": "blue", "size": "small", "cell": [2, 1]}]
    image = np.asarray(gd.render_scene(objects, 64, gd.sample_background(objects, np.random.default_rng(0))))
    big = np.asarray(Image.fromarray(image).resize((512, 512), Image.BICUBIC))
    for im in (image, big):
        assert oracle.detect(im[None]) == [[{k: o[k] for k in ("shape", "color", "size", "cell")} for o in objects]]


# --------------------------------------------------------------------------- rejecting what is no shape (issue 11)
def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return np.clip(np.rint(ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))), 0, 255).astype(np.uint8)


def _melted(objects: list[dict], rng) -> np.ndarray:
    """The scene with every object pushed together with a shifted copy of itself, by scipy, not by fidelity."""
    from scipy import ndimage

    canvas, layers = gd.render_layers(objects, 64, gd.sample_background(objects, rng))
    melted = [(np.maximum(a, ndimage.shift(a, (4, 5), order=1)), c) for a, c in layers]
    return np.asarray(gd.composite(canvas, melted))


def test_oracle_rejects_blurred_and_melted_renders_and_accepts_their_originals(oracle):
    rng = np.random.default_rng(5)
    clean_ok = rejected = total = 0
    for i in range(24):
        objects = gd.sample_objects(np.random.default_rng([77, i]))
        image = np.asarray(gd.render_scene(objects, 64, gd.sample_background(objects, np.random.default_rng([78, i]))))
        truth = [{k: o[k] for k in ("shape", "color", "size", "cell")} for o in objects]
        clean_ok += sorted(oracle.detect(image[None])[0], key=str) == sorted(truth, key=str)
        for bad in (_blurred(image, 3.0), _melted(objects, rng)):
            found = oracle.detect(bad[None])[0]
            named = {(o["shape"], tuple(o["cell"])) for o in found}
            rejected += sum((o["shape"], tuple(o["cell"])) not in named for o in objects)
            total += len(objects)
    assert clean_ok >= 23
    assert rejected / total >= 0.9


def test_unrecognisable_objects_fail_their_shape_but_count_as_objects():
    blob = _det(fidelity.UNRECOGNISABLE, "red", "small", [0, 0])
    prompt = {"objects": [{"shape": "star", "color": "red", "size": None, "cell": None}], "relation": None}
    s = fidelity.score_detections([blob], prompt)
    assert (s["shape"], s["color"], s["count"], s["all"]) == (False, True, True, False)
    assert fidelity.filter_verdict([blob], prompt, 0.5)["keep"] is False


def test_a_low_confidence_shape_reads_as_unrecognisable(oracle):
    import torch

    logits = torch.full((1, 1, len(fidelity.CLASSES)), -5.0)
    star = fidelity.CLASSES.index("star")
    logits[0, 0, star] = 5.0  # sure: stays a star
    assert oracle.decide(logits)[0].item() == star
    logits[0, 0, fidelity.CLASSES.index("circle")] = 5.0  # torn between two shapes: rejected
    assert oracle.decide(logits)[0].item() == fidelity.CLASSES.index(fidelity.UNRECOGNISABLE)
    logits[0, 0, 0] = 20.0  # empty stays empty whatever the threshold
    assert oracle.decide(logits)[0].item() == 0


def test_oracle_metrics_hold_the_issue_keys_and_the_card_prints_them():
    m = json.loads((fidelity.DEFAULT_ORACLE / "metrics.json").read_text())
    for key in ("accuracy_on_renders", "false_reject_rate_renders", "reject_rate_heldout", "ece"):
        assert 0 <= m[key] <= 1, key
    assert set(m["reject_rate_heldout_by_recipe"]) == set(fidelity.HELDOUT_NEGATIVES)
    assert not set(fidelity.HELDOUT_NEGATIVES) & set(fidelity.TRAIN_NEGATIVES)  # graded on a recipe never trained on
    card = (fidelity.DEFAULT_ORACLE / "README.md").read_text()
    for key in ("accuracy_on_renders", "false_reject_rate_renders", "reject_rate_heldout"):
        assert f"{m[key]:.4f}" in card, key
    assert {"n", "precision", "recall"} <= set(m["audit"])


def test_expected_calibration_error_by_hand():
    # two bins: confidence 0.9 right 2 of 4 times (gap 0.4), confidence 0.3 right 1 of 2 (gap 0.2)
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.3, 0.3])
    right = np.array([1, 1, 0, 0, 1, 0])
    assert fidelity.expected_calibration_error(conf, right, bins=10) == pytest.approx(4 / 6 * 0.4 + 2 / 6 * 0.2)


def test_temperature_scaling_recovers_a_known_temperature():
    import torch

    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 1, 5, generator=gen) * 3
    labels = torch.multinomial(torch.softmax(true_logits[:, 0], -1), 1, generator=gen).numpy()[:, None, :]
    fitted = fidelity.fit_temperature(true_logits * 2.5, np.concatenate([labels] * 3, -1))
    assert fitted == pytest.approx(2.5, rel=0.1)


# --------------------------------------------------------------------------- the by-eye audit (issue 11)
def test_audit_labels_give_the_recorded_precision_and_match_the_shipped_oracle():
    audit = json.loads(fidelity.DEFAULT_AUDIT.read_text())
    metrics = json.loads((fidelity.DEFAULT_ORACLE / "metrics.json").read_text())
    accepted = [it["label"] == "yes" for it in audit["items"] if it["accepted"]]
    assert len(audit["items"]) >= 128 and len(accepted) >= 64
    assert metrics["audit"]["precision"] == pytest.approx(np.mean(accepted))
    assert metrics["audit"]["n"] == len(audit["items"])
    # the audit was made with the oracle that ships: retraining it without a new audit fails here
    assert audit["oracle_weights_sha256_12"] == fidelity.weights_sha(fidelity.DEFAULT_ORACLE)


def test_audit_verdicts_reproduce_from_the_recorded_prompts_and_seeds(oracle):
    """Regenerate a few audit images from the recorded model, prompt and seed: the oracle gives the same verdicts."""
    audit = json.loads(fidelity.DEFAULT_AUDIT.read_text())
    model = fidelity.REPO / audit["model"]
    if fidelity.weights_sha(model) != audit["model_weights_sha256_12"]:
        pytest.fail(f"{model} changed since the audit: redo `python fidelity.py audit make` and label it")
    import torch

    pipe, settings = fidelity.load_pipeline(str(model), device=torch.device("cpu"))
    picked = audit["items"][:4] + [it for it in audit["items"] if it["accepted"]][:2]
    items = {it["id"]: it for it in fidelity.audit_items(max(p["index"] for p in picked) + 1, audit["seed"])}
    images = fidelity.audit_generate(pipe, settings, [items[p["id"]] for p in picked])
    verdicts = [fidelity.filter_verdict(d, items[p["id"]]["prompt"], audit["min_score"])["keep"]
                for p, d in zip(picked, oracle.detect(images))]
    assert verdicts == [p["accepted"] for p in picked]


def test_oracle_rejects_float_images(oracle):
    with pytest.raises(UserError, match=r"^images must be uint8 in 0..255, got float32 \(scale float images by 255\)$"):
        oracle.detect(np.zeros((1, 64, 64, 3), np.float32))


def test_oracle_card_reports_held_out_accuracy():
    metrics = json.loads((fidelity.DEFAULT_ORACLE / "metrics.json").read_text())
    assert metrics["heldout"]["n_scenes"] >= 1000
    assert (fidelity.DEFAULT_ORACLE / "model.safetensors").stat().st_size < 5 * 2**20
    assert f"{metrics['heldout']['all']:.4f}" in (fidelity.DEFAULT_ORACLE / "README.md").read_text()


# --------------------------------------------------------------------------- scoring logic by hand
def _det(shape, color, size, cell):
    return {"shape": shape, "color": color, "size": size, "cell": list(cell)}


def test_score_detections_by_hand():
    single = fidelity.parse_prompt("a small red star in the top left")
    right = _det("star", "red", "small", (0, 0))
    s = fidelity.score_detections([right], single)
    assert s == {"shape": True, "color": True, "size": True, "position": True, "count": True, "all": True}
    # a distractor does not steal the match, but an extra object fails the count (and so all)
    s = fidelity.score_detections([_det("star", "blue", "large", (1, 1)), right], single)
    assert s["shape"] and s["color"] and s["size"] and s["position"] and not s["count"] and not s["all"]
    s = fidelity.score_detections([_det("star", "red", "large", (0, 1))], single)
    assert (s["shape"], s["color"], s["size"], s["position"], s["all"]) == (True, True, False, False, False)
    s = fidelity.score_detections([], single)
    assert not s["shape"] and not s["count"] and not s["all"]
    plain = fidelity.score_detections([right], fidelity.parse_prompt("a red star"))
    assert plain["size"] is None and plain["position"] is None and plain["all"]

    two = fidelity.parse_prompt("a red star to the left of a small blue circle")
    star, circle = _det("star", "red", "large", (1, 0)), _det("circle", "blue", "small", (0, 2))
    assert fidelity.score_detections([circle, star], two)["all"]
    s = fidelity.score_detections([_det("star", "red", "large", (1, 2)), _det("circle", "blue", "small", (0, 0))], two)
    assert s["shape"] and s["color"] and not s["position"] and not s["all"]
    # colours bound to the wrong shapes: no assignment gets both shape and colour right
    s = fidelity.score_detections([_det("star", "blue", "large", (1, 0)), _det("circle", "red", "small", (0, 2))], two)
    assert not (s["shape"] and s["color"]) and not s["all"]


def test_summarize_scores_averages_where_defined():
    scores = [{"shape": True, "color": True, "size": None, "position": True, "count": True, "all": True},
              {"shape": True, "color": False, "size": False, "position": None, "count": True, "all": False}]
    assert fidelity.summarize_scores(scores) == {"shape": 1.0, "color": 0.5, "size": 0.0, "position": 1.0,
                                                 "count": 1.0, "all": 0.5, "n": 2}


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


def test_alignment_score_is_100_times_clipped_cosine(heads_60, tmp_path, prompt_renders):
    prompts, images = prompt_renders
    texts = [p["text"] for p in prompts[:3]]
    s = fidelity.alignment_score(images[:3], texts, heads_60, device="cpu")
    assert s.shape == (3,) and s.dtype == np.float32
    np.testing.assert_allclose(s, 50.0, atol=1e-3)  # cos 60 = 0.5
    opposite = fidelity.alignment_score(images[:2], texts[:2], bias_heads(tmp_path / "h.pt", 150), device="cpu")
    np.testing.assert_array_equal(opposite, [0.0, 0.0])  # negative cosine clips to 0


# --------------------------------------------------------------------------- evaluate-model on a tiny pipeline
def test_evaluate_model_on_a_tiny_pipeline(tmp_path, tiny_data, heads_60):
    model = tmp_path / "tiny-sd"
    tiny_sd_pipeline(tmp_path).save_pretrained(model)
    (model / "metrics.json").write_text(json.dumps({"train_loss": 0.25}))  # the trainer's keys must survive
    args = ["evaluate-model", "--model", str(model), "--quick", "--steps", "2", "--data", str(tiny_data),
            "--heads", str(heads_60), "--device", "cpu"]
    returned = fidelity.main(args)
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["train_loss"] == 0.25
    for key in ("oracle_accuracy_on_renders", "single_object_all_correct", "two_object_all_correct", "single_object",
                "two_object", "fd", "fd_real_vs_real", "sampler", "n_prompts", "seed", "seconds",
                "prompt_renders_all_correct", "alignment"):
        assert key in metrics, key
    assert metrics["sampler"] == {**metrics["sampler"], "scheduler": "DDIMScheduler", "steps": 2, "guidance": 5.0,
                                  "size": 64}
    assert metrics["single_object"]["n"] == metrics["two_object"]["n"] == metrics["n_prompts"] == 4
    assert 0 <= metrics["single_object_all_correct"] <= 1 and 0 <= metrics["two_object_all_correct"] <= 1
    assert metrics["fd"] > 0 and metrics["fd_real_vs_real"] > 0 and metrics["fd_n"] == 8
    assert metrics["alignment"] == pytest.approx(50.0, abs=1e-3)
    assert metrics["prompt_renders_all_correct"]["single"] >= 0.75  # the oracle reads renders of the same prompts
    assert (model / "fidelity_grid.png").is_file()
    assert returned["single_object"] == metrics["single_object"]


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown command 'nope'; choose one of train-oracle, evaluate-model, audit"),
    ([], "no command given; choose one of train-oracle, evaluate-model, audit"),
    (["evaluate-model", "--n-prompts", "0"], "--n-prompts must be positive, got 0"),
    (["evaluate-model", "--kinds", "single,triple"],
     "unknown prompt kind 'triple' in --kinds; choose from single, two"),
    (["evaluate-model", "--fd-from", "noise"], "unknown --fd-from 'noise'; choose captions or prompts"),
    (["train-oracle", "--n-train", "-5"], "--n-train must be positive, got -5"),
    (["train-oracle", "--heldout-seed", "0"],
     "--heldout-seed must differ from --seed (both 0): held-out scenes must be new"),
    (["train-oracle", "--n-negatives", "0"], "--n-negatives must be positive, got 0"),
    (["audit", "make", "--n", "0"], "--n must be > 0 and --max-candidates >= 2 x --n, got 0 and 2400"),
    (["audit", "score", "--min-score", "2"], "--min-score must be in 0..1, got 2.0"),
    (["audit", "score", "--audit", "/nowhere/audit.json"],
     "audit file not found: /nowhere/audit.json (run `python fidelity.py audit make` first)"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(UserError) as err:
        fidelity.main(argv)
    assert str(err.value) == message


def test_bad_prompt_inputs():
    with pytest.raises(UserError, match=r"^unknown prompt kind 'triple'; choose one of single, two$"):
        fidelity.make_prompts("triple", 3)
    with pytest.raises(UserError, match=r"^number of prompts must be a positive integer, got 0$"):
        fidelity.make_prompts("single", 0)
    with pytest.raises(UserError, match=r"^cannot parse prompt 'a red blob'"):
        fidelity.parse_prompt("a red blob")


def test_missing_files(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(UserError) as err:
        fidelity.alignment_score(np.zeros((1, 64, 64, 3), np.uint8), ["a red star"], missing)
    assert str(err.value) == f"retrieval checkpoint not found: {missing} (run `python retrieval.py` first)"
    with pytest.raises(UserError) as err:
        fidelity.Oracle.load(tmp_path)
    assert str(err.value) == f"oracle not found in {tmp_path} (train it with `python fidelity.py train-oracle`)"
    with pytest.raises(UserError) as err:
        fidelity.main(["evaluate-model", "--model", str(tmp_path)])
    assert str(err.value) == f"{tmp_path} is not a diffusers pipeline folder (no model_index.json)"
    with pytest.raises(UserError) as err:
        fidelity.main(["evaluate-model", "--model", str(tmp_path / "nope")])
    assert str(err.value).startswith(f"unknown model '{tmp_path / 'nope'}': not a registry name (shapes-tiny, ")


def test_cli_prints_one_line_and_exits_2():
    out = subprocess.run([sys.executable, "fidelity.py", "evaluate-model", "--n-prompts", "-1"],
                         cwd=fidelity.REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr == "error: --n-prompts must be positive, got -1\n"


def test_update_card_rewrites_only_the_fidelity_section(tmp_path):
    attrs = {"shape": 0.5, "color": 1.0, "size": None, "position": 0.25, "count": 1.0, "all": 0.125, "n": 8}
    m = {"model": {"name": "m"}, "args": {"heads": None}, "n_prompts": 8, "seed": 3, "oracle_accuracy_on_renders": 0.99,
         "sampler": {"scheduler": "S", "steps": 7, "guidance": 2.0, "device": "cpu"},
         "single_object": attrs, "single_object_all_correct": 0.125, "two_object": None, "two_object_all_correct": None,
         "fd": 12.34, "fd_real_vs_real": 5.0, "fd_n": 8, "alignment": None}
    card = tmp_path / "README.md"
    card.write_text("# m\n\n## Fidelity\nold numbers\n\n## Limitations\nkeep me\n")
    fidelity.update_card(card, m)
    text = card.read_text()
    assert "old numbers" not in text and text.endswith("## Limitations\nkeep me\n")
    section = text[text.index("## Fidelity"):text.index("## Limitations")]
    assert "NOT met" in section.splitlines()[0]  # the verdict: 0.125 < 0.90 and no two-object number
    row = next(line for line in section.splitlines() if line.startswith("| single object |"))
    assert [c.strip() for c in row.split("|")[2:-1]] == ["0.500", "1.000", "n/a", "0.250", "1.000", "0.125"]
    assert {"0.90", "0.125", "12.3", "5.0"} <= set(re.findall(r"\d+\.\d+", section))  # target, measured, FD, floor
    both = dict(m, single_object_all_correct=0.95, two_object=attrs, two_object_all_correct=0.75)
    heading = fidelity.card_fidelity_section(both).splitlines()[0]
    assert "met" in heading and "NOT" not in heading  # both targets reached
