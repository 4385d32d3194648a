"""task_c.py: the failure analysis end to end, its statistics and confusions by hand, targets, bad inputs, COCO data."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import generate_data
import task_c
from test_generate_data import _png  # the COCO fixture helper that writes a small PNG
from utils import UserError

TARGET_KEYS = {"category", "category_id", "train_count", "txt2img_R@10", "img2txt_R@10", "hit@1", "txt2img_R@10_ci95"}


# --------------------------------------------------------------------------- a quick run on tiny data
@pytest.fixture(scope="module")
def quick_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("task_c")
    metrics = task_c.main(["--data", str(tiny_data), "--quick", "--outputs", str(out), "--run-name", "q",
                           "--retrieval-run", str(out / "no-such-run")])
    return out, metrics


def test_quick_run_writes_problem_targets_metrics_and_figures(quick_run):
    out, metrics = quick_run
    run = out / "task_c" / "q"
    assert (out / "task_c" / "latest").resolve() == run.resolve()
    for name in ("problem.md", "targets.json", "metrics.json", "config.json", "confusion.csv", "confusion.png",
                 "recall_vs_frequency.png"):
        assert (run / name).stat().st_size > 0, name
    assert not (run / "umap.png").exists()  # --quick skips UMAP
    # No usable --retrieval-run: a baseline was trained under a prefixed name, never clobbering another run.
    assert (out / "retrieval" / "task_c-q" / "heads.pt").is_file()

    targets = json.loads((run / "targets.json").read_text())
    assert targets["k"] == 3 and len(targets["targets"]) == 3
    assert targets["rule"] == "the 3 categories with the lowest txt2img Recall@10 on the test split"
    assert targets["metric"] == "txt2img_R@10"
    assert targets["baseline_run"] == str((out / "retrieval" / "task_c-q").resolve())
    for t in targets["targets"]:
        assert set(t) == TARGET_KEYS and isinstance(t["train_count"], int)
        assert t["txt2img_R@10_ci95"][0] <= t["txt2img_R@10"] <= t["txt2img_R@10_ci95"][1]
    per_cat = metrics["per_category"]
    weakest = sorted(per_cat, key=lambda n: per_cat[n]["txt2img"]["R@10"])[:3]
    assert sorted(t["category"] for t in targets["targets"]) == sorted(weakest)

    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["n_eval_images"] == 200 and on_disk["n_bootstrap"] == 100
    for d in ("txt2img", "img2txt"):
        s = on_disk["spearman"][d]
        assert -1 <= s["ci95"][0] <= s["ci95"][1] <= 1 and -1 <= s["rho"] <= 1 and s["n_categories"] == 12
    conf = on_disk["confusion"]
    assert 0 < conf["n_wrong_missing"] <= conf["n_wrong"] <= conf["n_queries"] == 1000
    assert 0 < len(conf["top_pairs"]) <= 5
    assert [p["count"] for p in conf["top_pairs"]] == sorted((p["count"] for p in conf["top_pairs"]), reverse=True)
    rows = [line.split(",") for line in (run / "confusion.csv").read_text().splitlines()]
    assert len(rows) == 13 and all(abs(sum(map(float, r[2:])) - 1) < 1e-3 for r in rows[1:] if int(r[1]) > 0)

    problem = (run / "problem.md").read_text()
    rho = on_disk["spearman"]["txt2img"]["rho"]
    assert f"Spearman rho = {rho:.3f}" in problem and task_c.describe_correlation(on_disk["spearman"]["txt2img"]) in problem
    assert all(f"**{t['category']}**" in problem for t in targets["targets"])
    assert "(confusion.png)" in problem and "(recall_vs_frequency.png)" in problem


def test_reusing_the_trained_run_gives_the_same_numbers(quick_run, tiny_data):
    out, first = quick_run
    again = task_c.main(["--data", str(tiny_data), "--quick", "--outputs", str(out), "--run-name", "again",
                         "--retrieval-run", str(out / "retrieval" / "task_c-q")])
    assert not (out / "retrieval" / "task_c-again").exists()  # reused, not retrained
    assert again["spearman"] == first["spearman"] and again["targets"]["targets"] == first["targets"]["targets"]
    assert (out / "task_c" / "latest").resolve() == (out / "task_c" / "again").resolve()


# --------------------------------------------------------------------------- statistics by hand
def _one_category_per_image(recalls, per_cat=100):
    """Images each holding one category; the first `recall * per_cat` images of a category are hits."""
    hits, has = [], []
    for j, r in enumerate(recalls):
        for i in range(per_cat):
            hits.append(float(i < round(r * per_cat)))
            has.append(np.eye(len(recalls), dtype=bool)[j])
    return np.array(hits), np.array(has)


@pytest.mark.parametrize("recalls, sign", [([0.2, 0.4, 0.6, 0.8], 1), ([0.8, 0.6, 0.4, 0.2], -1)])
def test_spearman_bootstrap_on_a_monotone_case(recalls, sign):
    freq = np.array([10.0, 100.0, 1000.0, 10000.0])
    hits, has = _one_category_per_image(recalls)
    boot = task_c.bootstrap_category_recall(hits, np.ones(len(hits)), has, 500, seed=0)
    assert boot.shape == (500, 4)
    np.testing.assert_allclose(np.nanmean(boot, axis=0), recalls, atol=0.02)  # resampling is unbiased
    stats = task_c.spearman_with_ci(freq, np.array(recalls), boot)
    assert stats["rho"] == pytest.approx(sign)
    lo, hi = sorted(sign * np.array(stats["ci95"]))
    assert 0.5 <= lo <= hi <= 1
    assert task_c.describe_correlation(stats).startswith("CI above 0" if sign > 0 else "CI below 0")
    again = task_c.spearman_with_ci(freq, np.array(recalls),
                                    task_c.bootstrap_category_recall(hits, np.ones(len(hits)), has, 500, seed=0))
    assert again == stats  # seeded


def test_txt2img_bootstrap_resamples_images_with_all_their_captions():
    # image 0 (category 0): captions hit, hit, miss; image 1 (category 1): one caption, a miss.
    hit_sum, n_q = task_c.per_image_sums(np.array([1.0, 1.0, 0.0, 0.0]), np.array([0, 0, 0, 1]), 2)
    np.testing.assert_array_equal(hit_sum, [2, 0])
    np.testing.assert_array_equal(n_q, [3, 1])
    boot = task_c.bootstrap_category_recall(hit_sum, n_q, np.eye(2, dtype=bool), 200, seed=1)
    # Category 0's recall is 2/3 in every resample that holds image 0 (its captions travel together).
    col = boot[:, 0][np.isfinite(boot[:, 0])]
    assert len(col) > 100 and np.allclose(col, 2 / 3)


def test_spearman_with_too_few_categories_is_undefined_not_an_error():
    stats = task_c.spearman_with_ci(np.array([1.0, 2.0]), np.array([0.1, 0.2]), np.array([[0.1, 0.2]]))
    assert np.isnan(stats["rho"]) and task_c.describe_correlation(stats).startswith("undefined")


# --------------------------------------------------------------------------- confusions by hand
def test_confusion_matrix_and_hit_at_1_on_a_hand_built_ranking():
    # categories A=0, B=1, C=2; image 0 {A}, image 1 {B}, image 2 {A, C}
    has = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]], dtype=bool)
    query_img = np.array([0, 0, 2, 1, 0])
    top1 = np.array([1, 0, 0, 2, 2])
    # q0: A missing, B instead | q1: correct | q2: C missing, nothing instead | q3: B missing, A and C instead
    # q4: wrong image, but its A is there (an attribute error, not a shape confusion)
    counts, summary = task_c.confusion_counts(top1, query_img, has)
    np.testing.assert_array_equal(counts, [[0, 1, 0], [1, 0, 1], [0, 0, 0]])
    assert summary["n_queries"] == 5 and summary["n_wrong"] == 4 and summary["n_wrong_missing"] == 3
    np.testing.assert_array_equal(summary["missing_per_category"], [1, 1, 1])
    np.testing.assert_allclose(task_c.row_normalise(counts), [[0, 1, 0], [0.5, 0, 0.5], [0, 0, 0]])
    assert task_c.top_pairs(counts, ["A", "B", "C"]) == [
        {"query_category": "A", "retrieved_category": "B", "count": 1, "share_of_row": 1.0},
        {"query_category": "B", "retrieved_category": "A", "count": 1, "share_of_row": 0.5},
        {"query_category": "B", "retrieved_category": "C", "count": 1, "share_of_row": 0.5}]
    # hit@1: A asked by q0, q1, q2, q4 and found by q1, q2, q4; B asked by q3, not found; C asked by q2, not found
    np.testing.assert_allclose(task_c.category_hit_at_1(top1, query_img, has), [0.75, 0, 0])


# --------------------------------------------------------------------------- targets rule
def _cat(train, t2i, i2t, n_eval=10):
    return {"train_count": train, "n_eval_images": n_eval, "txt2img": {"R@10": t2i}, "img2txt": {"R@10": i2t}}


PER_CAT = {"star": _cat(500, 0.70, 0.30), "ring": _cat(5, 0.60, 0.90), "cross": _cat(50, 0.20, 0.80),
           "heart": _cat(20, 0.40, 0.10), "moon": _cat(1, float("nan"), float("nan"), n_eval=0)}


@pytest.mark.parametrize("rule, k, expected", [
    ("bottom-txt2img-R@10", 2, ["cross", "heart"]),
    ("bottom-img2txt-R@10", 2, ["heart", "star"]),
    ("rarest", 3, ["ring", "heart", "cross"]),  # moon is rarer but has no test images: nothing to measure
    ("bottom-txt2img-R@10", 4, ["cross", "heart", "ring", "star"]),
])
def test_pick_targets_takes_the_bottom_k(rule, k, expected):
    assert task_c.pick_targets(PER_CAT, rule, k) == expected


def test_rarest_breaks_ties_by_lower_recall():
    per_cat = {"a": _cat(5, 0.9, 0.5), "b": _cat(5, 0.3, 0.5), "c": _cat(9, 0.1, 0.1)}
    assert task_c.pick_targets(per_cat, "rarest", 2) == ["b", "a"]


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("flags, message", [
    (["--rule", "worst"], "unknown --rule 'worst'; choose one of bottom-txt2img-R@10, bottom-img2txt-R@10, rarest"),
    (["--k-targets", "0"], "--k-targets must be >= 1, got 0"),
    (["--bootstrap", "0"], "--bootstrap must be >= 1, got 0"),
])
def test_bad_arguments(flags, message, tiny_data):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        task_c.parse_args(["--data", str(tiny_data), *flags])


def test_missing_data_file(tmp_path):
    with pytest.raises(UserError, match=f"^{re.escape(f'data file not found: {tmp_path}/x.pkl')} "
                                        r"\(run `python generate_data.py` first\)$"):
        task_c.parse_args(["--data", str(tmp_path / "x.pkl")])


def test_more_targets_than_categories(tiny_data, tmp_path):
    with pytest.raises(UserError, match=r"^--k-targets 13 is more than the 12 categories with test images$"):
        task_c.main(["--data", str(tiny_data), "--k-targets", "13", "--quick", "--outputs", str(tmp_path)])
    assert not (tmp_path / "retrieval").exists()  # checked before any training


def test_cli_prints_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "task_c.py", "--rule", "worst"], capture_output=True, text=True,
                         cwd=task_c.Path(task_c.__file__).parent, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: unknown --rule 'worst'; choose one of bottom-txt2img-R@10, bottom-img2txt-R@10, rarest"]


# --------------------------------------------------------------------------- COCO-format data
COCO_CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"},
                   {"id": 18, "name": "dog", "supercategory": "animal"}]
COLOURS = {1: (200, 40, 40), 3: (40, 200, 40), 18: (40, 40, 200)}


def make_coco(root, n_train=24, n_val=24):
    """A tiny COCO folder: each image holds 1-2 of person/car/dog (non-contiguous ids, as in COCO), coloured
    by its first category, with 5 captions naming its categories."""
    ann = root / "annotations"
    ann.mkdir(parents=True)
    for name, ids in (("train2017", range(1, n_train + 1)), ("val2017", range(1000, 1000 + n_val))):
        images, captions, instances = [], [], []
        for i in ids:
            cats = [COCO_CATEGORIES[i % 3]["id"]] + ([COCO_CATEGORIES[(i // 3) % 3]["id"]] if i % 2 else [])
            cats = list(dict.fromkeys(cats))
            images.append({"id": i, "file_name": f"{i:012d}.png", "width": 8, "height": 6})
            words = " and a ".join(c["name"] for c in COCO_CATEGORIES if c["id"] in cats)
            captions += [{"id": 10 * i + k, "image_id": i, "caption": f"photo {k} of a {words}"} for k in range(5)]
            instances += [{"id": 100 * i + j, "image_id": i, "category_id": c, "bbox": [0, 0, 4, 3], "area": 12,
                           "iscrowd": 0} for j, c in enumerate(cats)]
            _png(root / name / f"{i:012d}.png", COLOURS[cats[0]])
        (ann / f"captions_{name}.json").write_text(json.dumps({"images": images, "annotations": captions}))
        (ann / f"instances_{name}.json").write_text(json.dumps(
            {"images": images, "annotations": instances, "categories": COCO_CATEGORIES}))
    return root


def test_runs_on_a_coco_format_pickle(tmp_path, quick_run):
    make_coco(tmp_path / "coco")
    generate_data.main(["--source", "coco", "--coco-root", str(tmp_path / "coco"), "--out", str(tmp_path / "data"),
                        "--workers", "1"])
    shapes_run = quick_run[0] / "retrieval" / "task_c-q"  # has heads, but trained on the shapes data
    metrics = task_c.main(["--data", str(tmp_path / "data" / "data.pkl"), "--quick", "--k-targets", "2",
                           "--outputs", str(tmp_path / "out"), "--run-name", "coco",
                           "--retrieval-run", str(shapes_run)])
    assert metrics["baseline_run"] == str((tmp_path / "out" / "retrieval" / "task_c-coco").resolve())
    assert set(metrics["per_category"]) == {"person", "car", "dog"}
    assert {r["category_id"] for r in metrics["categories"]} == {1, 3, 18}
    assert all(r["train_count"] > 0 for r in metrics["categories"])
    targets = json.loads((tmp_path / "out" / "task_c" / "coco" / "targets.json").read_text())
    assert len(targets["targets"]) == 2 and {t["category"] for t in targets["targets"]} <= {"person", "car", "dog"}
    assert metrics["spearman"]["txt2img"]["n_categories"] == 3
    assert (tmp_path / "out" / "task_c" / "coco" / "problem.md").is_file()
