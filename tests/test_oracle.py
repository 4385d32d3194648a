"""oracle.py: the shipped oracle on right and wrong labels, rejecting what is no shape, calibration, the by-eye
audit, scoring logic by hand, and bad inputs."""

import json

import numpy as np
import pytest

import generate_data as gd
import oracle
from utils import REPO, UserError, load_pipeline

OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}


# --------------------------------------------------------------------------- oracle (the shipped weights)
@pytest.fixture(scope="module")
def shipped():
    return oracle.Oracle.load(oracle.DEFAULT_ORACLE, device="cpu")


@pytest.fixture(scope="module")
def prompt_renders():
    prompts = gd.make_prompts("single", 25, seed=11) + gd.make_prompts("two", 25, seed=11)
    return prompts, gd.render_prompts(prompts, seed=11)


def test_oracle_is_right_on_renders_of_the_prompts(shipped, prompt_renders):
    prompts, images = prompt_renders
    scores = shipped.score(images, prompts)
    assert np.mean([s["all"] for s in scores]) >= 0.95
    assert all(s["size"] is None for s, p in zip(scores, prompts) if all(o["size"] is None for o in p["objects"]))


def _corrupt(prompt: dict, i: int) -> dict:
    """A prompt the rendered image does not show: another colour, another shape, or the opposite relation."""
    p = json.loads(json.dumps(prompt))
    obj = p["objects"][0]
    kind = i % 3 if p["relation"] else i % 2
    if kind == 0:
        used = {o["color"] for o in p["objects"]}
        obj["color"] = next(c for c in gd.COLOR_NAMES[i % 8:] + gd.COLOR_NAMES if c not in used)
    elif kind == 1:
        used = {o["shape"] for o in p["objects"]}
        obj["shape"] = next(s for s in gd.SHAPES[i % 12:] + gd.SHAPES if s not in used)
    else:
        p["relation"]["rel"] = OPPOSITE[p["relation"]["rel"]]
    p["text"] = gd.prompt_text(p)
    return p


def test_oracle_is_wrong_on_wrong_labels(shipped, prompt_renders):
    prompts, images = prompt_renders
    wrong = [_corrupt(p, i) for i, p in enumerate(prompts)]
    assert all(w["text"] != p["text"] for w, p in zip(wrong, prompts))
    scores = shipped.score(images, wrong)
    assert np.mean([not s["all"] for s in scores]) >= 0.95


def test_oracle_detects_scene_objects_and_resizes_large_inputs(shipped):
    from PIL import Image

    objects = [{"shape": "star", "color": "red", "size": "large", "cell": [0, 0]},
               {"shape": "ring", "color": "blue", "size": "small", "cell": [2, 1]}]
    image = np.asarray(gd.render_scene(objects, 64, gd.sample_background(objects, np.random.default_rng(0))))
    big = np.asarray(Image.fromarray(image).resize((512, 512), Image.BICUBIC))
    for im in (image, big):
        assert shipped.detect(im[None]) == [[{k: o[k] for k in ("shape", "color", "size", "cell")} for o in objects]]


# --------------------------------------------------------------------------- rejecting what is no shape (issue 11)
def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return np.clip(np.rint(ndimage.gaussian_filter(image.astype(np.float32), (sigma, sigma, 0))), 0, 255).astype(np.uint8)


def _melted(objects: list[dict], rng) -> np.ndarray:
    """The scene with every object pushed together with a shifted copy of itself, by scipy, not by oracle.py."""
    from scipy import ndimage

    canvas, layers = gd.render_layers(objects, 64, gd.sample_background(objects, rng))
    melted = [(np.maximum(a, ndimage.shift(a, (4, 5), order=1)), c) for a, c in layers]
    return np.asarray(gd.composite(canvas, melted))


def test_oracle_rejects_blurred_and_melted_renders_and_accepts_their_originals(shipped):
    rng = np.random.default_rng(5)
    clean_ok = rejected = total = 0
    for i in range(24):
        objects = gd.sample_objects(np.random.default_rng([77, i]))
        image = np.asarray(gd.render_scene(objects, 64, gd.sample_background(objects, np.random.default_rng([78, i]))))
        truth = [{k: o[k] for k in ("shape", "color", "size", "cell")} for o in objects]
        clean_ok += sorted(shipped.detect(image[None])[0], key=str) == sorted(truth, key=str)
        for bad in (_blurred(image, 3.0), _melted(objects, rng)):
            found = shipped.detect(bad[None])[0]
            named = {(o["shape"], tuple(o["cell"])) for o in found}
            rejected += sum((o["shape"], tuple(o["cell"])) not in named for o in objects)
            total += len(objects)
    assert clean_ok >= 23
    assert rejected / total >= 0.9


def test_unrecognisable_objects_fail_their_shape_but_count_as_objects():
    blob = _det(oracle.UNRECOGNISABLE, "red", "small", [0, 0])
    prompt = {"objects": [{"shape": "star", "color": "red", "size": None, "cell": None}], "relation": None}
    s = oracle.score_detections([blob], prompt)
    assert (s["shape"], s["color"], s["count"], s["all"]) == (False, True, True, False)
    assert oracle.filter_verdict([blob], prompt, 0.5)["keep"] is False


def test_a_low_confidence_shape_reads_as_unrecognisable(shipped):
    import torch

    logits = torch.full((1, 1, len(oracle.CLASSES)), -5.0)
    star = oracle.CLASSES.index("star")
    logits[0, 0, star] = 5.0  # sure: stays a star
    assert shipped.decide(logits)[0].item() == star
    logits[0, 0, oracle.CLASSES.index("circle")] = 5.0  # torn between two shapes: rejected
    assert shipped.decide(logits)[0].item() == oracle.CLASSES.index(oracle.UNRECOGNISABLE)
    logits[0, 0, 0] = 20.0  # empty stays empty whatever the threshold
    assert shipped.decide(logits)[0].item() == 0


def test_oracle_metrics_hold_the_issue_keys_and_the_card_prints_them():
    m = json.loads((oracle.DEFAULT_ORACLE / "metrics.json").read_text())
    for key in ("accuracy_on_renders", "false_reject_rate_renders", "reject_rate_heldout", "ece"):
        assert 0 <= m[key] <= 1, key
    assert set(m["reject_rate_heldout_by_recipe"]) == set(oracle.HELDOUT_NEGATIVES)
    assert not set(oracle.HELDOUT_NEGATIVES) & set(oracle.TRAIN_NEGATIVES)  # graded on a recipe never trained on
    card = (oracle.DEFAULT_ORACLE / "README.md").read_text()
    for key in ("accuracy_on_renders", "false_reject_rate_renders", "reject_rate_heldout"):
        assert f"{m[key]:.4f}" in card, key
    assert {"n", "precision", "recall"} <= set(m["audit"])


def test_expected_calibration_error_by_hand():
    # two bins: confidence 0.9 right 2 of 4 times (gap 0.4), confidence 0.3 right 1 of 2 (gap 0.2)
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.3, 0.3])
    right = np.array([1, 1, 0, 0, 1, 0])
    assert oracle.expected_calibration_error(conf, right, bins=10) == pytest.approx(4 / 6 * 0.4 + 2 / 6 * 0.2)


def test_temperature_scaling_recovers_a_known_temperature():
    import torch

    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 1, 5, generator=gen) * 3
    labels = torch.multinomial(torch.softmax(true_logits[:, 0], -1), 1, generator=gen).numpy()[:, None, :]
    fitted = oracle.fit_temperature(true_logits * 2.5, np.concatenate([labels] * 3, -1))
    assert fitted == pytest.approx(2.5, rel=0.1)


# --------------------------------------------------------------------------- the by-eye audit (issue 11)
def test_audit_labels_give_the_recorded_precision_and_match_the_shipped_oracle():
    audit = json.loads(oracle.DEFAULT_AUDIT.read_text())
    metrics = json.loads((oracle.DEFAULT_ORACLE / "metrics.json").read_text())
    assert len(audit["items"]) >= 128 and sum(it.get("stratum", it["accepted"]) for it in audit["items"]) >= 64
    # the card's numbers are the audit file's as it stands (labels, and verdicts of the oracle that ships)
    assert metrics["audit"] == oracle.audit_scores(audit)
    # the audit was made with the oracle that ships: retraining it without a new audit fails here
    assert audit["oracle_weights_sha256_12"] == oracle.weights_sha(oracle.DEFAULT_ORACLE)


@pytest.mark.parametrize("model", ["shapes-sd-tiny", "shapes-sd-tiny-f2", "shapes-sd-tiny-turbo"])
def test_shipped_model_scores_were_made_by_the_shipped_oracle(model):
    """Retraining the oracle without re-scoring a shipped generator (`fidelity.py evaluate-model --write-card`)
    fails here, as the audit does above."""
    metrics = json.loads((REPO / "models" / model / "metrics.json").read_text())
    assert metrics["oracle_sha256_12"] == oracle.weights_sha(oracle.DEFAULT_ORACLE)

def test_audit_of_another_generator_is_kept_beside_the_filters_audit(tmp_path):
    """A by-hand audit of 8 items: 4 accepted (3 labelled yes), 4 rejected (1 yes), acceptance rate 0.1 ->
    precision 0.75, share recognisable by eye 0.1 * 0.75 + 0.9 * 0.25 = 0.3, recall 0.075 / 0.3 = 0.25.

    The shape check: every accepted item reads its shape; of the rejected, the "yes" one does not and one "no" does.
    P(yes & read) = 0.1 * 3/4 + 0.9 * 0 = 0.075, so its recall is 0.075 / 0.3 = 0.25; P(read) = 0.1 + 0.9 / 4 =
    0.325, precision 0.075 / 0.325 = 0.2308. Each item appears 8 times (same rates), so that no bootstrap resample
    of the shape check divides by zero."""
    import shutil

    folder = tmp_path / "oracle"
    shutil.copytree(oracle.DEFAULT_ORACLE, folder)
    before = json.loads((folder / "metrics.json").read_text())["audit"]
    labels = ([(True, "yes", True)] * 3 + [(True, "no", True)] + [(False, "yes", False), (False, "no", True)]
              + [(False, "no", False)] * 2)
    audit = {"acceptance_rate": 0.1, "model": "models/other", "model_weights_sha256_12": "abc",
             "oracle_weights_sha256_12": oracle.weights_sha(folder),
             "items": [{"accepted": a, "label": lab, "shape_read": r} for a, lab, r in labels * 8]}
    path = folder / "audit_other.json"
    path.write_text(json.dumps(audit))
    scores = oracle.main(["audit", "score", "--oracle", str(folder), "--audit", str(path)])
    assert (scores["precision"], scores["yes_rate"], scores["recall"]) == pytest.approx((0.75, 0.3, 0.25))
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["audit"] == before  # the filter's own audit (task_d's generator) is untouched
    other = metrics["other_audits"]["models/other"]
    assert other["yes_rate"] == pytest.approx(0.3) and other["yes_rate_ci"][0] < 0.3 < other["yes_rate_ci"][1]
    sc = other["shape_check"]
    assert (sc["recall"], sc["precision"], sc["read_rate"]) == pytest.approx((0.25, 0.075 / 0.325, 0.325))
    assert sc["recall_ci"][0] <= 0.25 <= sc["recall_ci"][1] and sc["precision_ci"][0] <= 0.2308 <= sc["precision_ci"][1]
    card = (folder / "README.md").read_text()
    assert "Other generator `models/other`" in card and "passes 0.250 [" in card
    # with one item each, some resamples have nobody labelled yes: the CI is undefined, and the card says so
    few = oracle.audit_scores(dict(audit, items=audit["items"][:8]))["shape_check"]
    assert few["recall"] == pytest.approx(0.25) and few["recall_ci"] is None
    assert "CI undefined" in oracle.shape_check_line({"shape_check": few})
    # a stratum of one item cannot be resampled: the CIs are undefined, not an error
    one = oracle.audit_scores(dict(audit, items=audit["items"][:5]))
    assert one["n_rejected"] == 1 and one["yes_rate_ci"] is None and one["precision"] == pytest.approx(0.75)
    # an audit made before `shape_read` was recorded scores as before, without the shape check
    for it in audit["items"]:
        del it["shape_read"]
    assert "shape_check" not in oracle.audit_scores(audit)


def test_a_rescored_audit_weights_its_new_verdicts_by_the_strata_it_was_sampled_from():
    """Eight items sampled at make time from strata accepted (rate 0.1) and rejected, then re-read by a new oracle:
    accepted stratum (yes, acc), (yes, not), (yes, acc), (no, acc); rejected stratum (yes, acc), (no, not) x 2,
    (no, acc). P(yes) = 0.1 * 3/4 + 0.9 * 1/4 = 0.3; P(accepted) = 0.1 * 3/4 + 0.9 * 2/4 = 0.525;
    P(yes & accepted) = 0.1 * 2/4 + 0.9 * 1/4 = 0.275 -> precision 0.275 / 0.525 = 0.5238, recall 0.275 / 0.3 =
    0.9167. The same audit before the rescore (accepted = stratum) gives precision 0.75, recall 0.25."""
    rows = [(True, "yes", True), (True, "yes", False), (True, "yes", True), (True, "no", True),
            (False, "yes", True), (False, "no", False), (False, "no", False), (False, "no", True)]
    audit = {"acceptance_rate": 0.2, "stratum_rate": 0.1, "model": "m", "model_weights_sha256_12": "a",
             "oracle_weights_sha256_12": "new", "rescored_from": ["old"],
             "items": [{"stratum": s, "label": lab, "accepted": acc} for s, lab, acc in rows] * 4}
    scores = oracle.audit_scores(audit)
    assert (scores["yes_rate"], scores["acceptance_rate"], scores["precision"], scores["recall"]) == pytest.approx(
        (0.3, 0.525, 0.275 / 0.525, 0.275 / 0.3))
    assert scores["n_accepted"] == scores["n_rejected"] == 16 and scores["rescored_from"] == ["old"]
    assert scores["precision_ci"][0] <= 0.5238 <= scores["precision_ci"][1]
    assert "re-read by this oracle" in oracle.rescored_text(scores)
    before = dict(audit, items=[dict(it, accepted=it["stratum"]) for it in audit["items"]])
    del before["stratum_rate"]
    before["acceptance_rate"] = 0.1
    assert (oracle.audit_scores(before)["precision"], oracle.audit_scores(before)["recall"]) == pytest.approx(
        (0.75, 0.1 * 0.75 / 0.3))


def test_rescore_keeps_the_labels_and_records_the_new_oracles_verdicts(tmp_path):
    """Re-read two labelled images of the shipped audit with a copy of the shipped oracle."""
    import shutil

    folder = tmp_path / "oracle"
    shutil.copytree(oracle.DEFAULT_ORACLE, folder)
    audit = json.loads(oracle.DEFAULT_AUDIT.read_text())
    audit["items"] = audit["items"][:2]
    path = tmp_path / "audit.json"
    path.write_text(json.dumps(dict(audit, oracle_weights_sha256_12="0ld0racle000")))
    scores = oracle.main(["audit", "rescore", "--audit", str(path), "--oracle", str(folder), "--device", "cpu"])
    redone = json.loads(path.read_text())
    assert [it["label"] for it in redone["items"]] == [it["label"] for it in audit["items"]]
    assert [it["stratum"] for it in redone["items"]] == [it.get("stratum", it["accepted"]) for it in audit["items"]]
    assert all(isinstance(it["shape_read"], bool) for it in redone["items"]) and "shape_check" in scores
    assert redone["rescored_from"][-1] == "0ld0racle000"
    assert redone["oracle_weights_sha256_12"] == oracle.weights_sha(folder) and "stale" not in scores
    assert redone["stratum_rate"] == audit.get("stratum_rate", audit["acceptance_rate"])
    assert redone["rescore_threshold"] == oracle.Oracle.load(folder).config["threshold"]
    # a lower operating threshold can only read more shapes in the same images
    path.write_text(json.dumps(redone))
    oracle.main(["audit", "rescore", "--audit", str(path), "--oracle", str(folder), "--device", "cpu",
                 "--threshold", "0"])
    lowered = json.loads(path.read_text())
    assert lowered["rescore_threshold"] == 0 and lowered["rescored_from"] == ["0ld0racle000", redone[
        "oracle_weights_sha256_12"]]
    assert all(b["shape_read"] >= a["shape_read"] for a, b in zip(redone["items"], lowered["items"]))
    assert [it["stratum"] for it in lowered["items"]] == [it["stratum"] for it in redone["items"]]
    # other weights than the audited ones would draw other images: refused in one line
    path.write_text(json.dumps(dict(audit, model_weights_sha256_12="feedfeedfeed")))
    with pytest.raises(UserError, match=r"is not the audited model \(weights \w{12}, audited feedfeedfeed\): its "
                                        r"images would differ; pass the audited weights with --model"):
        oracle.main(["audit", "rescore", "--audit", str(path), "--oracle", str(folder), "--device", "cpu"])


def test_audit_verdicts_reproduce_from_the_recorded_prompts_and_seeds(shipped):
    """Regenerate a few audit images from the recorded model, prompt and seed: the oracle gives the same verdicts."""
    audit = json.loads(oracle.DEFAULT_AUDIT.read_text())
    model = REPO / audit["model"]
    if oracle.weights_sha(model) != audit["model_weights_sha256_12"]:
        pytest.fail(f"{model} changed since the audit: redo `python oracle.py audit make` and label it")
    import torch

    pipe, settings = load_pipeline(str(model), device=torch.device("cpu"))
    picked = audit["items"][:4] + [it for it in audit["items"] if it["accepted"]][:2]
    items = {it["id"]: it for it in oracle.audit_items(max(p["index"] for p in picked) + 1, audit["seed"])}
    images = oracle.audit_generate(pipe, settings, [items[p["id"]] for p in picked])
    verdicts = [oracle.filter_verdict(d, items[p["id"]]["prompt"], audit["min_score"])["keep"]
                for p, d in zip(picked, shipped.detect(images))]
    assert verdicts == [p["accepted"] for p in picked]


def test_oracle_rejects_float_images(shipped):
    with pytest.raises(UserError, match=r"^images must be uint8 in 0..255, got float32 \(scale float images by 255\)$"):
        shipped.detect(np.zeros((1, 64, 64, 3), np.float32))


def test_oracle_card_reports_held_out_accuracy():
    metrics = json.loads((oracle.DEFAULT_ORACLE / "metrics.json").read_text())
    assert metrics["heldout"]["n_scenes"] >= 1000
    assert (oracle.DEFAULT_ORACLE / "model.safetensors").stat().st_size < 5 * 2**20
    assert f"{metrics['heldout']['all']:.4f}" in (oracle.DEFAULT_ORACLE / "README.md").read_text()


# --------------------------------------------------------------------------- scoring logic by hand
def _det(shape, color, size, cell):
    return {"shape": shape, "color": color, "size": size, "cell": list(cell)}


def test_score_detections_by_hand():
    single = gd.parse_prompt("a small red star in the top left")
    right = _det("star", "red", "small", (0, 0))
    s = oracle.score_detections([right], single)
    assert s == {"shape": True, "color": True, "size": True, "position": True, "count": True, "all": True}
    # a distractor does not steal the match, but an extra object fails the count (and so all)
    s = oracle.score_detections([_det("star", "blue", "large", (1, 1)), right], single)
    assert s["shape"] and s["color"] and s["size"] and s["position"] and not s["count"] and not s["all"]
    s = oracle.score_detections([_det("star", "red", "large", (0, 1))], single)
    assert (s["shape"], s["color"], s["size"], s["position"], s["all"]) == (True, True, False, False, False)
    s = oracle.score_detections([], single)
    assert not s["shape"] and not s["count"] and not s["all"]
    plain = oracle.score_detections([right], gd.parse_prompt("a red star"))
    assert plain["size"] is None and plain["position"] is None and plain["all"]

    two = gd.parse_prompt("a red star to the left of a small blue circle")
    star, circle = _det("star", "red", "large", (1, 0)), _det("circle", "blue", "small", (0, 2))
    assert oracle.score_detections([circle, star], two)["all"]
    s = oracle.score_detections([_det("star", "red", "large", (1, 2)), _det("circle", "blue", "small", (0, 0))], two)
    assert s["shape"] and s["color"] and not s["position"] and not s["all"]
    # colours bound to the wrong shapes: no assignment gets both shape and colour right
    s = oracle.score_detections([_det("star", "blue", "large", (1, 0)), _det("circle", "red", "small", (0, 2))], two)
    assert not (s["shape"] and s["color"]) and not s["all"]


def test_summarize_scores_averages_where_defined():
    scores = [{"shape": True, "color": True, "size": None, "position": True, "count": True, "all": True},
              {"shape": True, "color": False, "size": False, "position": None, "count": True, "all": False}]
    assert oracle.summarize_scores(scores) == {"shape": 1.0, "color": 0.5, "size": 0.0, "position": 1.0,
                                                 "count": 1.0, "all": 0.5, "n": 2}


# --------------------------------------------------------------------------- training (a tiny run)
def test_quick_presets_yield_to_explicit_flags_and_quick_weights_stay_under_outputs(tmp_path):
    args = oracle.parse_args(["train", "--quick", "--n-train", "64", "--outputs", str(tmp_path)])
    assert (args.n_train, args.n_heldout, args.epochs) == (64, 500, 1)  # given flag kept, the rest from QUICK
    assert args.out == tmp_path / "fidelity" / "oracle-quick"
    assert oracle.parse_args(["train"]).out == oracle.DEFAULT_ORACLE


def test_train_writes_a_loadable_oracle_and_a_run_folder(tmp_path):
    out = tmp_path / "oracle"
    out.mkdir()
    audit = json.loads((oracle.DEFAULT_ORACLE / "metrics.json").read_text())["audit"]  # an earlier by-eye audit
    (out / "metrics.json").write_text(json.dumps({"audit": audit}))
    metrics = oracle.main(["train", "--quick", "--n-train", "64", "--n-heldout", "32", "--n-negatives", "32",
                           "--n-val", "32", "--batch-size", "16", "--data", "", "--out", str(out), "--device", "cpu",
                           "--threads", "1", "--outputs", str(tmp_path / "runs"), "--run-name", "t1"])
    run = tmp_path / "runs" / "oracle" / "t1"
    assert (run.parent / "latest").resolve() == run.resolve()
    assert json.loads((run / "config.json").read_text())["args"]["n_train"] == 64
    assert metrics["heldout"]["n_scenes"] == 32 and len(metrics["history"]) == 1  # --quick's one epoch
    assert {"render_s", "train_s", "calibrate_s", "evaluate_s", "total_s"} == set(metrics["timings"])
    loaded = oracle.Oracle.load(out, device="cpu")
    assert 0.25 <= loaded.config["temperature"] <= 10 and 0 <= loaded.config["threshold"] < 1
    assert loaded.config["n_train"] == 64 and loaded.config["command"] == "python oracle.py train --quick"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["audit"] == dict(audit, stale="the oracle was retrained after this audit")
    card = (out / "README.md").read_text()
    assert f"| all | {saved['heldout']['all']:.4f} |" in card and "STALE: the oracle was retrained" in card

    # `evaluate` re-measures the same weights on other held-out scenes and keeps what training recorded
    again = oracle.main(["evaluate", "--oracle", str(out), "--n-heldout", "48", "--data", "", "--device", "cpu",
                         "--threads", "1", "--outputs", str(tmp_path / "runs"), "--run-name", "e1"])
    assert again["heldout"]["n_scenes"] == 48 and set(again["reject_rate_heldout_by_recipe"]) == set(
        oracle.HELDOUT_NEGATIVES)
    resaved = json.loads((out / "metrics.json").read_text())
    assert resaved["history"] == saved["history"] and resaved["timings"] == saved["timings"]
    assert resaved["audit"] == saved["audit"] and resaved["heldout"]["n_scenes"] == 48
    assert f"| all | {resaved['heldout']['all']:.4f} |" in (out / "README.md").read_text()
    assert (tmp_path / "runs" / "oracle_eval" / "e1" / "metrics.json").is_file()


def test_sheet_of_accepted_held_out_negatives_tiles_their_cells(shipped, tmp_path):
    from PIL import Image

    path = tmp_path / "accepted.png"
    drawn = oracle.accepted_negatives_sheet(shipped, 800, path, n=8, cols=4)
    assert 1 <= drawn <= 8 and drawn % 4 == 0  # the last row is padded with empty tiles
    assert Image.open(path).size == (4 * 36 * 4, drawn // 4 * 36 * 4)  # 36-px tiles at 4x zoom


def test_recipe_sheets_pair_each_clean_shape_with_its_degraded_version(tmp_path):
    from PIL import Image

    pairs, names = oracle.recipe_pairs("melt", 2, seed=0)
    assert pairs.shape == (24, 2, 32, 32) and pairs.dtype == np.uint8 and names[:2] == ["circle", "circle"]
    clean, melted = pairs[:, 0].astype(int), pairs[:, 1].astype(int)
    assert (np.abs(clean - melted).mean((1, 2)) > 1).all()  # every melt changed its shape
    assert (melted.reshape(24, -1).max(1) > 200).all()  # and left something to see
    assert np.array_equal(oracle.recipe_pairs("melt", 2, seed=0)[0], pairs)  # same seed, same sheet
    sheets = oracle.main(["recipes", "--recipes", "melt,noise", "--per-shape", "1", "--outputs", str(tmp_path),
                          "--run-name", "r"])
    assert sheets == {"melt": {"pairs": 12, "sheet": "melt.png"}, "noise": {"pairs": 12, "sheet": "noise.png"}}
    # 12 rows of one pair, 32-px tiles at 5x zoom under a 14-px caption line
    assert Image.open(tmp_path / "oracle_recipes" / "r" / "melt.png").size == (2 * 160, 12 * (160 + 14))
    assert json.loads((tmp_path / "oracle_recipes" / "latest" / "metrics.json").read_text())["per_shape"] == 1


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("argv, message", [
    (["nope"], "unknown command 'nope'; choose one of train, evaluate, audit, recipes"),
    ([], "no command given; choose one of train, evaluate, audit, recipes"),
    (["recipes", "--recipes", "melt,smudge"], "unknown recipe(s) smudge; choose from blur, elastic, melt, fuse, "
                                              "partial, blob, noise, ellipse, irregular, overlap, boxblur"),
    (["recipes", "--per-shape", "0"], "--per-shape must be positive, got 0"),
    (["evaluate", "--oracle", "/nowhere"], "no trained oracle in /nowhere (run `python oracle.py train`)"),
    (["evaluate", "--n-heldout", "0"], "--n-heldout must be positive, got 0"),
    (["train", "--n-train", "-5"], "--n-train must be positive, got -5"),
    (["train", "--heldout-seed", "0"], "--heldout-seed must differ from --seed (both 0): held-out scenes must be new"),
    (["train", "--n-negatives", "0"], "--n-negatives must be positive, got 0"),
    (["audit", "make", "--n", "0"], "--n must be > 0 and --max-candidates >= 2 x --n, got 0 and 2400"),
    (["audit", "score", "--min-score", "2"], "--min-score must be in 0..1, got 2.0"),
    (["audit", "score", "--audit", "/nowhere/audit.json"],
     "audit file not found: /nowhere/audit.json (run `python oracle.py audit make` first)"),
    (["train", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["audit", "check"], "argument step: invalid choice: 'check' (choose from 'make', 'rescore', 'score')"),
    (["audit", "score", "--threshold", "0.5"],
     "--threshold is for `audit rescore` and must be in 0..1, got 0.5 with `audit score`"),
    (["audit", "rescore", "--threshold", "1.5"],
     "--threshold is for `audit rescore` and must be in 0..1, got 1.5 with `audit rescore`"),
    (["audit", "rescore", "--audit", "/nowhere/audit.json"],
     "audit file not found: /nowhere/audit.json (run `python oracle.py audit make` first)"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(UserError) as err:
        oracle.main(argv)
    assert str(err.value) == message


def test_missing_oracle_folder(tmp_path):
    with pytest.raises(UserError) as err:
        oracle.Oracle.load(tmp_path)
    assert str(err.value) == f"oracle not found in {tmp_path} (train it with `python oracle.py train`)"
