"""task_c.py: the failure analysis end to end, its statistics and confusions by hand, targets, bad inputs, COCO data."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import generate_data
import task_c
from utils import UserError, cluster_bootstrap

TARGET_KEYS = {"category", "category_id", "train_count", "txt2img_R@10", "img2txt_R@10", "hit@1", "txt2img_mAP@R",
               "txt2img_R@10_ci95", "value", "value_ci95", "gap_to_others", "gap_ci95", "separated"}
SHAPES_WORDS = re.compile(r"shape|colou?r|size, count|position", re.IGNORECASE)


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
    assert targets["k"] == 3 and 1 <= len(targets["targets"]) <= 3
    assert targets["rule_name"] == "bottom-txt2img-R@10" and targets["rule_reason"].startswith("auto: ")
    assert targets["metric"] == "txt2img_R@10" and {"3", "test"} <= set(targets["rule"].split())  # k and split
    assert targets["baseline_run"] == str((out / "retrieval" / "task_c-q").resolve())
    for t in targets["targets"]:
        assert set(t) == TARGET_KEYS and isinstance(t["train_count"], int)
        assert t["txt2img_R@10_ci95"][0] <= t["txt2img_R@10"] <= t["txt2img_R@10_ci95"][1]
        assert t["value"] == t["txt2img_R@10"] and t["gap_ci95"][0] <= t["gap_to_others"] <= t["gap_ci95"][1]
    # Which categories are picked is worked by hand in the pick_targets tests below; here, what any pick must hold.
    rows = {r["category"]: r for r in metrics["categories"]}
    assert {n for n, r in rows.items() if r["gap_ci95"][1] < 0} == set(targets["separable"])  # CI of the gap below 0
    values = [t["value"] for t in targets["targets"]]
    assert values == sorted(values)  # lowest first
    assert {t["category"] for t in targets["targets"]} <= set(targets["separable"] or rows)

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

    for d in ("img2txt", "txt2img"):
        assert set(on_disk["overall"]["category_level"][d]) == {"R@1", "R@5", "R@10", "mAP@R"}
        # category level: any image of the category counts, so it is never below instance level
        assert on_disk["overall"]["category_level"][d]["R@10"] >= on_disk["overall"][d]["R@10"]
    assert on_disk["figures"] == {"confusion.png": "written", "recall_vs_frequency.png": "written"}

    problem = (run / "problem.md").read_text()
    # shapes data: its own words (shape confusions, colour/size/count/position errors) come from what it has
    assert "colour, size, count or position" in problem and "shape confusion" in problem
    assert on_disk["vocabulary"]["attributes"] == ["colour", "size", "count", "position"]
    rho = on_disk["spearman"]["txt2img"]["rho"]
    verdict = on_disk["spearman"]["txt2img"]["verdict"]
    assert verdict in task_c.CORRELATION_WORDS and f"Spearman rho = {rho:.3f}" in problem
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
    boot = cluster_bootstrap(*task_c.per_image_sums(hits, np.arange(len(hits)), has), 500, seed=0)[1]
    assert boot.shape == (500, 4)
    stats = task_c.spearman_with_ci(freq, np.array(recalls), boot)
    assert stats["rho"] == pytest.approx(sign)
    lo, hi = sorted(sign * np.array(stats["ci95"]))
    assert 0.5 <= lo <= hi <= 1
    assert stats["verdict"] == ("better" if sign > 0 else "worse") and stats["n_resamples"] <= 500


def test_per_image_sums_count_each_query_for_every_category_of_its_image():
    # image 0 (categories 0 and 1): captions hit, hit, miss; image 1 (category 1): one caption, a miss.
    sums, counts = task_c.per_image_sums(np.array([1.0, 1.0, 0.0, 0.0]), np.array([0, 0, 0, 1]),
                                         np.array([[True, True], [False, True]]))
    np.testing.assert_array_equal(sums, [[2, 2], [0, 0]])
    np.testing.assert_array_equal(counts, [[3, 3], [0, 1]])


def test_spearman_with_too_few_categories_is_undefined_not_an_error():
    stats = task_c.spearman_with_ci(np.array([1.0, 2.0]), np.array([0.1, 0.2]), np.array([[0.1, 0.2]]))
    assert np.isnan(stats["rho"]) and stats["verdict"] == "undefined"
    assert task_c.CORRELATION_WORDS["undefined"].startswith("undefined")


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


# --------------------------------------------------------------------------- separation and targets
def test_gap_to_the_other_categories_and_its_ci_by_hand():
    np.testing.assert_allclose(task_c.minus_others(np.array([0.1, 0.5, 0.9, np.nan])), [-0.6, 0.0, 0.6, np.nan])
    assert np.isnan(task_c.minus_others(np.array([0.3, np.nan]))).all()  # no other category to compare with
    # Category 0 is always 0.5 below the others; category 2 swings around them: only 0 is separated.
    boot = np.array([[0.2, 0.7, 0.9], [0.3, 0.8, 0.5], [0.1, 0.6, 0.7], [0.25, 0.75, 0.6]])
    gap, ci = task_c.separation(np.array([0.2, 0.7, 0.7]), boot)
    np.testing.assert_allclose(gap, [-0.5, 0.25, 0.25])
    assert ci[0, 1] < 0 and ci[2, 0] < 0 < ci[2, 1]


def test_per_image_category_sums_leave_out_what_a_query_does_not_ask():
    values = np.array([[1.0, np.nan], [0.0, 0.5], [np.nan, 1.0]])
    sums, counts = task_c.per_image_category_sums(values, np.array([0, 0, 1]), 2)
    np.testing.assert_array_equal(sums, [[1.0, 0.5], [0.0, 1.0]])
    np.testing.assert_array_equal(counts, [[2, 1], [0, 1]])
    boot = cluster_bootstrap(sums, counts, 50, seed=0)[1]
    assert boot.shape == (50, 2) and np.nanmax(boot[:, 0]) == 0.5


def test_shared_captions_and_the_instance_ceiling():
    caps = ["a photo of a cat", "A photo of a  cat", "a photo of a cat", "a red star"]
    owner = np.array([0, 1, 2, 3])
    assert task_c.shared_caption_share(caps, owner) == 0.75
    assert task_c.instance_ceiling(caps, owner, k=1) == pytest.approx((3 * (1 / 3) + 1) / 4)
    assert task_c.resolve_rule("auto", 0.75)[0] == "bottom-txt2img-mAP@R"
    assert task_c.resolve_rule("auto", 0.1)[0] == "bottom-txt2img-R@10"
    assert task_c.resolve_rule("rarest", 0.9) == ("rarest", "chosen with --rule")


def _row(name, train, t2i, i2t, separated=False, n_eval=10):
    return {"category": name, "train_count": train, "n_eval_images": n_eval, "txt2img_R@10": t2i,
            "img2txt_R@10": i2t, "hit@1": t2i, "txt2img_mAP@R": t2i, "separated": separated}


ROWS = [_row("star", 500, 0.70, 0.30), _row("ring", 5, 0.60, 0.90), _row("cross", 50, 0.20, 0.80, separated=True),
        _row("heart", 20, 0.40, 0.10, separated=True), _row("moon", 1, float("nan"), float("nan"), n_eval=0)]


@pytest.mark.parametrize("rule, k, expected", [
    ("bottom-txt2img-R@10", 1, ["cross"]),
    ("bottom-txt2img-R@10", 3, ["cross", "heart"]),  # only two are separable: fewer targets, never filler
    ("rarest", 3, ["ring", "heart", "cross"]),  # moon is rarer but has no test images: nothing to measure
])
def test_pick_targets_takes_the_separable_bottom_k(rule, k, expected):
    assert task_c.pick_targets(ROWS, rule, k)[0] == expected


def test_pick_targets_says_when_nothing_is_separable():
    rows = [dict(r, separated=False) for r in ROWS]
    chosen, separable = task_c.pick_targets(rows, "bottom-img2txt-R@10", 2)
    assert chosen == ["heart", "star"] and separable == []
    args = task_c.argparse.Namespace(k_targets=2, eval_split="test", data="d.pkl")
    rows = [dict(r, category_id=1, value=r["img2txt_R@10"], value_ci95=None, gap_to_others=None, gap_ci95=None,
                 **{"txt2img_R@10_ci95": None}) for r in rows]
    record = task_c.targets_record(rows, chosen, separable, "bottom-img2txt-R@10", "chosen with --rule", args,
                                   task_c.Path("r"))
    assert record["n_separable"] == 0 and record["selection"].startswith("no category's 95% CI")
    assert "not a demonstrated weakness" in record["selection"]


def test_rarest_breaks_ties_by_lower_recall():
    rows = [_row("a", 5, 0.9, 0.5), _row("b", 5, 0.3, 0.5), _row("c", 9, 0.1, 0.1)]
    assert task_c.pick_targets(rows, "rarest", 2)[0] == ["b", "a"]


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("flags, message", [
    (["--rule", "worst"], "unknown --rule 'worst'; choose one of bottom-txt2img-R@10, bottom-img2txt-R@10, "
                          "bottom-txt2img-mAP@R, bottom-hit@1, rarest, auto"),
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
        "error: unknown --rule 'worst'; choose one of bottom-txt2img-R@10, bottom-img2txt-R@10, bottom-txt2img-mAP@R, "
        "bottom-hit@1, rarest, auto"]


# --------------------------------------------------------------------------- which data: the run's own
def test_the_data_defaults_to_the_runs_and_a_mismatch_is_one_line(tmp_path, quick_run, tiny_data, coco_world):
    out, first = quick_run
    shapes_run = out / "retrieval" / "task_c-q"
    again = task_c.main(["--retrieval-run", str(shapes_run), "--quick", "--outputs", str(out), "--run-name", "nodata"])
    assert again["data"] == str(tiny_data.resolve()) and again["targets"]["targets"] == first["targets"]["targets"]

    generate_data.main(["--source", "coco", "--coco-root", str(coco_world), "--out", str(tmp_path / "data"),
                        "--workers", "1"])
    coco = tmp_path / "data" / "data.pkl"
    with pytest.raises(UserError, match=f"^--data {re.escape(str(coco))} is not the data {re.escape(str(shapes_run))} "
                                        "was trained on "):
        task_c.main(["--data", str(coco), "--retrieval-run", str(shapes_run), "--quick", "--outputs", str(tmp_path)])
    assert not (tmp_path / "retrieval").exists()  # never a silent retrain
    proc = subprocess.run([sys.executable, "task_c.py", "--data", str(coco), "--retrieval-run", str(shapes_run)],
                          capture_output=True, text=True, cwd=task_c.Path(task_c.__file__).parent, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_failing_figure_is_one_warning_and_the_results_stay(quick_run, tiny_data, monkeypatch, capsys):
    out, _ = quick_run

    def broken(*args, **kwargs):
        raise TypeError("Cannot use scipy.linalg.eigh for sparse A with k >= N.\nsecond line")

    monkeypatch.setattr(task_c, "plot_confusion", broken)
    monkeypatch.setattr(task_c.retrieval, "plot_umap", broken)
    m = task_c.main(["--retrieval-run", str(out / "retrieval" / "task_c-q"), "--quick", "--outputs", str(out),
                     "--run-name", "broken", "--bootstrap", "20"])
    run = out / "task_c" / "broken"
    assert (out / "task_c" / "latest").resolve() == run.resolve()
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["figures"]["confusion.png"].startswith("failed: TypeError: Cannot use scipy")
    assert on_disk["figures"]["recall_vs_frequency.png"] == "written" and not (run / "confusion.png").exists()
    assert (run / "problem.md").is_file() and (run / "targets.json").is_file() and m["targets"]["targets"]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: confusion.png not written (TypeError: Cannot use scipy.linalg.eigh for sparse A "
                        "with k >= N.)"]


# --------------------------------------------------------------------------- COCO-format data
def test_runs_on_a_coco_format_pickle_in_its_own_words(tmp_path, coco_world):
    generate_data.main(["--source", "coco", "--coco-root", str(coco_world), "--out", str(tmp_path / "data"),
                        "--workers", "1"])
    metrics = task_c.main(["--data", str(tmp_path / "data" / "data.pkl"), "--quick", "--k-targets", "2",
                           "--outputs", str(tmp_path / "out"), "--run-name", "coco",
                           "--retrieval-run", str(tmp_path / "out" / "no-run")])
    assert metrics["baseline_run"] == str((tmp_path / "out" / "retrieval" / "task_c-coco").resolve())
    assert set(metrics["per_category"]) == {"person", "car", "dog"}
    assert {r["category_id"] for r in metrics["categories"]} == {1, 3, 18}
    assert all(r["train_count"] > 0 for r in metrics["categories"])
    targets = json.loads((tmp_path / "out" / "task_c" / "coco" / "targets.json").read_text())
    assert 1 <= len(targets["targets"]) <= 2 and {t["category"] for t in targets["targets"]} <= {"person", "car", "dog"}
    assert metrics["spearman"]["txt2img"]["n_categories"] == 3
    problem = (tmp_path / "out" / "task_c" / "coco" / "problem.md").read_text()
    assert metrics["vocabulary"]["attributes"] == [] and not SHAPES_WORDS.search(problem)
    assert "category confusion" in problem or "no category substitutions" in problem
