"""bench.py: a --quick run's metrics (ratios from measured times, FAISS equal to the loop), top-k ties, bad inputs."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import bench
import retrieval
from tiny_models import tiny_sd_pipeline
from utils import UserError, l2_normalize


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    model = tmp / "tiny-sd"
    tiny_sd_pipeline(tmp).save_pretrained(model)
    out = tmp / "outputs"
    metrics = bench.main(["--quick", "--threads", "1", "--model", str(model), "--sd21-scale", "tiny",
                          "--outputs", str(out), "--run-name", "q", "--retrieval-run", str(tmp / "no-such-run")])
    return out / "bench" / "q", metrics


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_quick_run_writes_files_and_hardware(quick_run):
    run, metrics = quick_run
    assert (run.parent / "latest").resolve() == run.resolve()
    for name in ("config.json", "metrics.json", "results.md", "generation_grid.png"):
        assert (run / name).stat().st_size > 0, name
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["parts"] == list(bench.PARTS) and on_disk["quick"] is True
    hw = json.loads((run / "config.json").read_text())["args"]["hardware"]
    assert hw["cpu"] and hw["cores"] >= 1 and hw["torch_threads"] == 1 and "gpu" in hw
    assert hw["contended"] == (hw["load_avg_1m_at_start"] >= 0.5)
    assert on_disk["hardware"] == hw
    results = (run / "results.md").read_text()
    for name, value in on_disk["ratios"].items():
        assert f"| {name} | {value:.2f} |" in results


def test_generation_ratios_come_from_the_measured_times(quick_run):
    _, metrics = quick_run
    g = metrics["generation"]
    rows = {r["config"]: r for r in g["configs"]}
    plain, batched, ours = g["configs"][:3]
    assert plain["batch_size"] == 1 and plain["output"] == "PIL" and plain["steps"] == 50 and plain["guidance"] == 7.5
    assert batched["steps"] == 50 and ours["steps"] == 25 and ours["batch_size"] == 2  # folder model: no registry entry
    assert all(_positive(r["seconds"]) and r["images"] == 2 for r in g["configs"])
    best = rows[g["best_config"]]
    assert g["ratio_ours_vs_plain"] == pytest.approx(plain["seconds"] / best["seconds"])
    assert g["ratio_batching_only"] == pytest.approx(plain["seconds"] / batched["seconds"])
    assert g["ratio_sampler_only"] == pytest.approx(batched["seconds"] / ours["seconds"])
    for key, value in metrics["ratios"].items():
        assert _positive(value), key
    # the ablation: every optimisation is reported; kept ones are exactly those >= KEEP_MIN_GAIN over the best so far
    names = [a["optimisation"] for a in g["ablation"]]
    assert g["ablation"][-1]["skipped"] == "--threads 1 pins the thread count"
    assert names == [n for n, _ in bench.ablation_configs(2)]
    for a in g["ablation"]:
        if "skipped" not in a:
            assert _positive(a["own_ratio"]) and a["kept"] == (a["own_ratio"] >= bench.KEEP_MIN_GAIN)
    assert set(g["best_optimisations"]) == {a["optimisation"] for a in g["ablation"] if a["kept"]}
    if g["best_optimisations"]:  # the kept optimisations are also timed at the plain path's settings
        last = g["configs"][-1]
        assert last["config"] == "batched + kept optimisations, plain settings" and last["steps"] == 50
        assert last["optimisations"] == g["best_optimisations"]


def test_fastest_equal_fidelity_config_is_the_fastest_within_1_point(quick_run):
    _, metrics = quick_run
    g = metrics["generation"]
    equal = [r for r in g["configs"][1:] if r["fidelity_within_1pt_of_plain"]]
    # batching alone at the plain settings draws the same images from the same seeds
    assert g["configs"][1]["fidelity_within_1pt_of_plain"]
    fastest = min(equal, key=lambda r: r["seconds"])
    assert g["fastest_equal_fidelity_config"] == fastest["config"]
    assert g["ratio_at_equal_fidelity"] == pytest.approx(g["configs"][0]["seconds"] / fastest["seconds"])
    assert metrics["ratios"]["generation_at_equal_fidelity"] == g["ratio_at_equal_fidelity"]


def test_fidelity_comparison_is_consistent(quick_run):
    _, metrics = quick_run
    g = metrics["generation"]
    cmp = g["fidelity_ours_minus_plain"]
    assert "all" in cmp and "color" in cmp
    plain_f = g["configs"][0]["fidelity"]
    best_f = next(r for r in g["configs"] if r["config"] == g["best_config"])["fidelity"]
    assert cmp["all"]["diff"] == pytest.approx(best_f["all"] - plain_f["all"])
    for d in cmp.values():
        assert d["within_1pt"] == (abs(d["diff"]) <= 0.01) and d["ci95"][0] <= d["diff"] + 1e-12 <= d["ci95"][1] + 2e-12
    assert g["equal_fidelity"] == all(d["within_1pt"] for d in cmp.values())


def test_sd21_tiny_runs_the_whole_chain(quick_run):
    _, metrics = quick_run
    s = metrics["sd21"]
    assert s["status"] == "ran" and s["scale"] == "tiny" and s["size"] == 64
    configs = [r["config"] for r in s["configs"]]
    assert configs[0].startswith("fp32") and configs[-1] == "+ channels_last" and len(configs) == 5
    assert configs[1] == "+ float32 (half precision: GPU only)"  # CPU: no half-precision step
    for r in s["configs"]:
        assert r["ratio_vs_baseline"] == pytest.approx(s["configs"][0]["seconds"] / r["seconds"])
    assert s["ratio_optimised_vs_fp32"] == s["configs"][-1]["ratio_vs_baseline"]


def test_sd21_full_scale_is_skipped_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = bench.bench_sd21(bench.parse_args(["--only", "sd21"]))
    assert out["status"] == "skipped: no GPU"
    md = bench.results_markdown({"run_name": "x", "hardware": {"cpu": "c", "cores_usable": 1, "torch_threads": 1,
                                 "gpu": None, "load_avg_1m_at_start": 0.0, "contended": False}, "load_avg_1m_at_end": 0.0,
                                 "ratios": {}, "sd21": out})
    assert "skipped: no GPU (scale full)." in md


def test_retrieval_faiss_equals_the_loop_and_ratios(quick_run):
    _, metrics = quick_run
    e = metrics["retrieval"]["equal_results"]
    assert e["source"].startswith("random unit vectors (no heads.pt in")
    assert e["n_queries"] == 300 and e["n_db"] == 1000 and e["k"] == 10
    for key in ("same_topk_as_python_loop", "same_topk_as_numpy"):
        assert e[key]["identical"] and e[key]["rows_differing"] == 0 and e[key]["n_queries"] == 300
    assert e["ratio_faiss_vs_python_loop"] == pytest.approx(e["python_loop_s"] / e["faiss_search_s"])
    assert e["ratio_faiss_vs_numpy"] == pytest.approx(e["numpy_s"] / e["faiss_search_s"])
    scale = metrics["retrieval"]["scale"]
    assert [(r["n"], r["index"]) for r in scale] == [(n, k) for n in (10000, 50000) for k in bench.INDEX_KINDS]
    for r in scale:
        if r["index"] == "hnsw" and r["n"] > 10000:
            assert "skipped" in r
            continue
        assert _positive(r["build_s"]) and _positive(r["search_s"]) and 0 <= r["recall@10"] <= 1
        if r["index"] == "flat":
            assert r["recall@10"] == 1.0


# --------------------------------------------------------------------------- exact search and ties
def test_naive_loop_matches_numpy_and_faiss():
    rng = np.random.default_rng(0)
    db, q = l2_normalize(rng.standard_normal((300, 16))), l2_normalize(rng.standard_normal((40, 16)))
    ls, li = bench.naive_search(db, q, 5)
    ns, ni = retrieval.brute_force_search(db, q, 5)
    fs, fi = retrieval.search(retrieval.build_index(db, "flat"), q, 5)
    np.testing.assert_array_equal(li, ni)
    np.testing.assert_array_equal(li, fi)
    np.testing.assert_allclose(ls, fs, atol=1e-5)
    assert bench.topk_agreement(ls, li, fs, fi)["identical"]


def test_topk_agreement_allows_ties_only():
    scores = np.array([[0.9, 0.5, 0.5], [0.9, 0.8, 0.7]], np.float32)
    ids = np.array([[3, 1, 2], [0, 1, 2]])
    swapped_tie = np.array([[3, 2, 1], [0, 1, 2]])
    tie = bench.topk_agreement(scores, ids, scores, swapped_tie)
    assert tie["identical"] and tie["rows_differing_only_by_ties"] == 1 and tie["rows_differing"] == 0
    # a tie at the k-th score may bring in another id with that score
    other_tied_id = np.array([[3, 1, 7], [0, 1, 2]])
    assert bench.topk_agreement(scores, ids, scores, other_tied_id)["identical"]
    # a different id above the tie is a real difference
    wrong = np.array([[4, 1, 2], [0, 1, 2]])
    bad = bench.topk_agreement(scores, ids, scores, wrong)
    assert not bad["identical"] and bad["rows_differing"] == 1
    # same ids, different scores beyond the tolerance
    assert not bench.topk_agreement(scores, ids, scores + np.array([[0, 0, 0], [0, 0.1, 0]], np.float32),
                                    np.array([[3, 1, 2], [0, 2, 1]]))["identical"]


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("argv, message", [
    (["--only", "generation,foo"], "unknown --only part 'foo'; choose from generation, sd21, retrieval"),
    (["--only", ","], "--only names no part; choose from generation, sd21, retrieval"),
    (["--sizes", "10000,abc"], "argument --sizes: must be comma-separated ints >= 100, got 'abc'"),
    (["--sizes", "0"], "argument --sizes: must be comma-separated ints >= 100, got '0'"),
    (["--sizes", "50"], "argument --sizes: must be comma-separated ints >= 100, got '50'"),
    (["--sizes", "100", "--k", "101"], "--k 101 is more than the smallest database size 100"),
    (["--indexes", "ivf,hnsw"], "--indexes must include flat: it is the exact reference for recall@10"),
    (["--indexes", "flat,lsh"], "unknown index 'lsh' in --indexes; choose from flat, ivf, hnsw"),
    (["--sd21-scale", "huge"], "unknown --sd21-scale 'huge'; choose full or tiny"),
    (["--n-images", "0"], "--n-images must be >= 1, got 0"),
    (["--threads", "-1"], "--threads must be >= 0, got -1"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_bad_inputs(argv, message):
    with pytest.raises(UserError) as err:
        bench.parse_args(argv)
    assert str(err.value).startswith(message)


def test_cli_prints_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "bench.py", "--only", "gen"], cwd=bench.__file__.rsplit("/", 1)[0],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown --only part 'gen'; choose from generation, sd21, retrieval"
