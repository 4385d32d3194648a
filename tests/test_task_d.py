"""task_d.py: prompts the oracle can check, the filter, equal-sized arms, cached images reused by a rerun, the paired
bootstrap by hand, `accelerate launch` splitting the generation between two processes, bad inputs, and COCO-format
data through the alignment filter (the image store's kill, torn-line,
full-disk and shard tests are in test_store.py)."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import generate_data
import retrieval
import task_c
import task_d
from oracle import Oracle, to_uint8_64
import utils
from utils import UserError, load_data

N_PER_TARGET = 4


def write_targets(path, data_path, names=("hexagon", "circle"), baseline_run="no-such-run"):
    ids = {c["name"]: c["id"] for c in load_data(data_path)["categories"]}
    path.write_text(json.dumps({"rule": "test", "rule_name": "test", "metric": "txt2img_R@10", "k": len(names),
                                "targets": [{"category": n, "category_id": ids[n]} for n in names],
                                "baseline_run": str(baseline_run), "data": str(data_path)}))
    return path


def base_flags(tmp_path, tiny_data, tiny_model, targets=None):
    targets = targets or write_targets(tmp_path / "targets.json", tiny_data)
    return ["--targets", str(targets), "--model", str(tiny_model), "--quick", "--outputs", str(tmp_path / "out"),
            "--run-name", "q", "--n-per-target", str(N_PER_TARGET)]


# --------------------------------------------------------------------------- prompts
def test_prompts_name_the_target_every_attribute_and_the_oracle_reads_renders_of_them():
    target = {"category": "hexagon", "category_id": 7}
    items = [generate_data.target_prompt(target, i, seed=0) for i in range(24)]
    assert items == [generate_data.target_prompt(target, i, seed=0) for i in range(24)]  # seeded
    assert len({it["text"] for it in items}) >= 20 and len({it["seed"] for it in items}) == 24  # varied
    counts = {len(it["prompt"]["objects"]) for it in items}
    assert counts == {1, 2, 3}  # 0-2 co-occurring objects
    for it in items:
        objs = it["prompt"]["objects"]
        assert objs[0]["shape"] == "hexagon" and all(o["size"] and o["cell"] and o["color"] for o in objs)
        assert len(it["captions"]) == 5 == len(set(it["captions"])) and it["captions"][0] == it["text"]
        assert all("hexagon" in c for c in it["captions"])
        if len(objs) == 1:  # the structured prompts' single-object grammar round-trips
            assert generate_data.parse_prompt(it["text"])["objects"] == objs
        else:
            assert it["text"] == generate_data.describe(objs)
    # Renders of the prompts pass the filter (the oracle is ~0.995 right on renders): prompts are checkable.
    oracle = Oracle.load()
    renders = generate_data.render_prompts([it["prompt"] for it in items], seed=0)
    verdicts = task_d.oracle_verdicts(items, renders, oracle, min_score=1.0)
    assert sum(v["keep"] for v in verdicts) >= 22
    # A render of another shape in the target's place fails the target check.
    wrong = [dict(it["prompt"], objects=[dict(it["prompt"]["objects"][0], shape="star")]) for it in items[:6]]
    bad = task_d.oracle_verdicts(items[:6], generate_data.render_prompts(wrong, seed=1), oracle, min_score=0.0)
    assert not any(v["target_found"] or v["keep"] for v in bad)


# --------------------------------------------------------------------------- the whole run
@pytest.fixture(scope="module")
def quick_run(tiny_data, tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("task_d")
    metrics = task_d.main(base_flags(tmp, tiny_data, tiny_model))
    return tmp, metrics


def test_quick_run_writes_results_and_reports_the_issue_keys(quick_run):
    tmp, metrics = quick_run
    run = tmp / "out" / "task_d" / "q"
    assert (tmp / "out" / "task_d" / "latest").resolve() == run.resolve()
    for name in ("results.md", "metrics.json", "config.json", "deltas.png", "samples.png"):
        assert (run / name).stat().st_size > 0, name
    m = json.loads((run / "metrics.json").read_text())
    assert m["figures"] == {"deltas.png": "written", "samples.png": "written"}
    # Setup and generation run before the run folder exists, and still count in the run's time.
    t = m["timings"]
    assert t["total_s"] >= t["setup_s"] + t["generate_s"] + t["train_eval_s"] and t["generate_s"] > 0
    assert set(m["arms"]) == {"baseline", "oversample", "synthetic", "synthetic_filtered", "synthetic_filtered_x0.5",
                              "synthetic_filtered_x2", "synthetic_recaptioned", "rendered"}
    assert m["seeds"] == [0, 1, 2]
    for arm in m["arms"].values():
        assert len(arm["per_seed"]) == 3 and set(arm["txt2img"]) == {"R@1", "R@5", "R@10", "mAP"}
        seeds = [s["txt2img"]["R@10"] for s in arm["per_seed"]]
        assert min(seeds) <= arm["txt2img"]["R@10"] <= max(seeds)  # a summary of the seeds, not of something else
        assert set(arm["per_category"]) >= {"hexagon", "circle"}
    for key in ("rare_txt2img_R@10_delta", "overall_txt2img_R@10_delta"):
        d = m[key]
        assert d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    met = {r["target"]: r for r in m["targets_met"]}
    assert set(met) == {"gap_closed", "filtered_minus_oversample_ci_low", "overall_txt2img_R@10_delta",
                        "task_c_plus_d_s"}
    assert all(set(r) == {"target", "threshold", "measured", "met"} for r in met.values())
    assert met["overall_txt2img_R@10_delta"] == {"target": "overall_txt2img_R@10_delta", "threshold": -0.01,
                                                 "measured": m["overall_txt2img_R@10_delta"]["mean"],
                                                 "met": m["overall_txt2img_R@10_delta"]["mean"] >= -0.01}
    assert met["filtered_minus_oversample_ci_low"]["measured"] == m["filtered_vs_oversample"]["rare"]["ci95"][0]
    # The gap from the bootstrap's point estimates agrees with the baseline's per-category table (retrieval.py's
    # per_category_metrics, another route to the same recalls).
    base = m["arms"]["baseline"]["per_category"]
    others = [c for c, v in base.items() if v["n_eval_images"] > 0 and c not in ("hexagon", "circle")]
    targets_r10 = np.mean([base[c]["txt2img"]["R@10"] for c in ("hexagon", "circle")])
    others_r10 = np.mean([base[c]["txt2img"]["R@10"] for c in others])
    assert m["gap"]["targets"]["mean"] == pytest.approx(targets_r10)
    assert m["gap"]["others"]["mean"] == pytest.approx(others_r10)
    gap = m["gap"]["gap"]
    assert gap["mean"] == pytest.approx(others_r10 - targets_r10) and gap["ci95"][0] <= gap["mean"] <= gap["ci95"][1]
    added = {"synthetic_filtered", "synthetic_recaptioned", "rendered"}
    assert set(m["closed_fraction"]) == added and set(m["vs_oversample"]) == added
    # Candidates and acceptance come from the manifest and the oracle, whatever the (random) model drew.
    per_target = m["filter"]["per_target"]
    assert {k: v["generated"] for k, v in per_target.items()} == {"hexagon": N_PER_TARGET, "circle": N_PER_TARGET}
    assert m["generation"]["generated_now"] == 2 * N_PER_TARGET and m["generation"]["reused"] == 0
    results = (run / "results.md").read_text()
    rare = m["rare_txt2img_R@10_delta"]
    for x in (rare["mean"], *rare["ci95"], gap["mean"], *gap["ci95"]):
        assert f"{x:+.3f}" in results
    verdict = "**met**" if met["gap_closed"]["met"] else "**not met**"
    assert f"→ {verdict}" in results and f"gap (others − targets) {gap['mean']:+.3f}" in results
    for name, row in per_target.items():
        assert f"| {name} | {row['generated']} | {row['accepted']} |" in results


def test_arms_add_equal_numbers_of_samples_when_the_filter_accepts(quick_run, tiny_data, tiny_model, monkeypatch):
    tmp, _ = quick_run

    def accept_even(entries, images, oracle, min_score):  # stand-in for a good model: half the images pass
        return [{"score": 1.0, "target_found": True, "keep": i % 2 == 0, "shape": True, "scene": []}
                for i in range(len(entries))]

    logged = []

    class FakeWandb:  # --wandb: what the run hands to wandb
        @staticmethod
        def init(**kwargs):
            logged.append(kwargs)
            return FakeWandb

        @staticmethod
        def log(row, step=None):
            logged.append(row)

        @staticmethod
        def finish():
            logged.append("finished")

    monkeypatch.setattr(task_d, "oracle_verdicts", accept_even)
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    flags = base_flags(tmp, tiny_data, tiny_model, targets=tmp / "targets.json")
    m = task_d.main([*flags[:-4], "--run-name", "accept", "--n-per-target", str(N_PER_TARGET), "--n-seeds", "2",
                     "--ratios", "0.5", "--epochs", "1", "--wandb"])
    assert logged[0]["project"] == "task_d" and logged[0]["config"]["n_seeds"] == 2 and logged[-1] == "finished"
    assert logged[1]["rare_txt2img_R@10_delta/mean"] == m["rare_txt2img_R@10_delta"]["mean"]
    assert logged[1]["arms/synthetic_filtered/n_extra"] == 2 * (N_PER_TARGET // 2)
    assert m["generation"]["generated_now"] == 0  # every image reused from the cache
    n = {arm: a["n_extra"] for arm, a in m["arms"].items()}
    accepted = 2 * (N_PER_TARGET // 2)
    # rendered adds every planned prompt of each target: a generator whose every image passes
    assert n == {"baseline": 0, "oversample": accepted, "synthetic": accepted, "synthetic_filtered": accepted,
                 "synthetic_filtered_x0.5": accepted // 2, "synthetic_recaptioned": accepted,
                 "rendered": 2 * N_PER_TARGET}
    base = m["arms"]["baseline"]["per_seed"][0]["n_train_images"]
    assert m["arms"]["synthetic_filtered"]["per_seed"][1]["n_train_images"] == base + accepted
    assert m["arms"]["rendered"]["per_seed"][1]["n_train_images"] == base + 2 * N_PER_TARGET
    # --quick caps the candidates at --n-per-target: one round, however few were accepted
    assert m["generation"]["rounds"] == 1 and m["generation"]["max_candidates"] == N_PER_TARGET
    # an empty scene leaves the prompt's captions: synthetic_recaptioned's training set is synthetic_filtered's
    assert m["n_trainings"] == 7 * 2 and m["seeds"] == [0, 1]
    assert m["arms"]["synthetic_recaptioned"]["per_seed"] == m["arms"]["synthetic_filtered"]["per_seed"]
    assert m["rendering"]["n_images"] == 2 * N_PER_TARGET


def test_recaption_names_what_the_oracle_reads_not_what_the_prompt_asked():
    # A prompt asks for a small red hexagon in the top left; the image shows a large blue star in the bottom right
    # and a green circle in the center (a render, so the oracle reads it right).
    target = {"category": "hexagon", "category_id": 7}
    item = next(it for it in (generate_data.target_prompt(target, i, seed=0) for i in range(50))
                if len(it["prompt"]["objects"]) == 1)
    scene = [{"shape": "star", "color": "blue", "size": "large", "cell": [2, 2]},
             {"shape": "circle", "color": "green", "size": "small", "cell": [1, 1]}]
    image = generate_data.render_prompts([{"objects": scene, "relation": None}], seed=3)
    verdict = task_d.oracle_verdicts([item], to_uint8_64(image), Oracle.load(), min_score=0.0)[0]
    assert sorted(o["shape"] for o in verdict["scene"]) == ["circle", "star"] and not verdict["keep"]
    caps = task_d.recaption(item, verdict, seed=0)
    assert len(caps) == 5 == len(set(caps)) and caps == task_d.recaption(item, verdict, seed=0)  # seeded
    assert all("star" in c and "circle" in c and "hexagon" not in c for c in caps)
    assert not any("top left" in c for c in caps)
    places = [c for c in caps if "bottom right" in c or re.search("above|below|left of|right of", c)]
    assert places  # a place is named, the one in the image (a relation caption comes first with two objects)
    colours = {w for c in caps for w in c.replace(",", " ").split() if w in generate_data.COLOR_NAMES}
    assert colours <= {"blue", "green"}  # only the colours in the image
    # The oracle's "unrecognisable" objects are left out; with nothing readable the prompt's captions stay.
    blob = {"shape": "unrecognisable", "color": "red", "size": "small", "cell": [0, 0]}
    assert task_d.recaption(item, {"scene": [blob]}, seed=0) == item["captions"]
    assert "unrecognisable" not in " ".join(task_d.recaption(item, {"scene": [blob, scene[0]]}, seed=0))


def test_arm_extras_by_hand():
    entries = [{"target": t} for t in ["a"] * 4 + ["b"] * 2]
    verdicts = [{"keep": k} for k in (True, True, False, True, False, False)]
    train = [{"category_ids": [1]}, {"category_ids": [2]}, {"category_ids": [1, 3]}]
    targets = [{"category": "a", "category_id": 1}, {"category": "b", "category_id": 2}]
    ex = task_d.arm_extras(entries, verdicts, train, targets, [0.5, 3], seed=0, n_per_target=4, arms=task_d.ARMS)
    assert list(ex["synthetic_filtered"]["syn"]) == [0, 1, 3] and len(ex["synthetic_filtered"]["real"]) == 0
    # the same images, from the recaptioned features
    assert list(ex["synthetic_recaptioned"]["rec"]) == [0, 1, 3] and len(ex["synthetic_recaptioned"]["syn"]) == 0
    assert set(ex["oversample"]["real"]) <= {0, 2} and len(ex["oversample"]["real"]) == 3  # b accepted none
    assert set(ex["synthetic"]["syn"]) <= {0, 1, 2, 3} and len(ex["synthetic"]["syn"]) == 3
    assert len(ex["synthetic_filtered_x0.5"]["syn"]) == 2  # round(1.5) of a's 3
    assert sorted(ex["synthetic_filtered_x3"]["syn"]) == [0, 0, 0, 1, 1, 1, 3, 3, 3]
    # rendered draws the first n_per_target prompts of each target (renders are planned target by target);
    # asking for fewer arms does not change the others' draws
    some = task_d.arm_extras(entries, verdicts, train, targets, [], seed=0, n_per_target=4,
                             arms=["baseline", "oversample", "rendered"])
    assert set(some) == {"baseline", "oversample", "rendered"} and list(some["rendered"]["ren"]) == list(range(8))
    assert list(some["oversample"]["real"]) == list(ex["oversample"]["real"])
    # more accepted than wanted: synthetic_filtered keeps the first n_per_target, the others match that count
    few = task_d.arm_extras(entries, verdicts, train, targets, [], seed=0, n_per_target=1, arms=task_d.ARMS)
    assert list(few["synthetic_filtered"]["syn"]) == [0] and len(few["oversample"]["real"]) == 1
    assert list(few["rendered"]["ren"]) == [0, 1]


def test_next_counts_by_hand():
    # a: 2 of 10 accepted, 8 more wanted at rate 0.2 -> 1.1 * 8 / 0.2 = 44 more; b: none accepted -> doubled;
    # c: has its 10; d: at the cap already; e: the cap stops it
    counts = {"a": 10, "b": 10, "c": 12, "d": 40, "e": 30}
    accepted = {"a": 2, "b": 0, "c": 10, "d": 1, "e": 5}
    assert task_d.next_counts(counts, accepted, want=10, cap=40, step=4) == {"a": 40, "b": 20, "c": 12, "d": 40,
                                                                               "e": 40}
    assert task_d.next_counts({"a": 10}, {"a": 2}, want=10, cap=100, step=4) == {"a": 54}
    assert task_d.next_counts({"a": 10}, {"a": 9}, want=10, cap=100, step=4) == {"a": 14}  # at least one batch


def test_generation_rounds_until_the_accepted_count(tmp_path, tiny_data, tiny_model, monkeypatch):
    def accept_even(entries, images, oracle, min_score):  # half the candidates pass, by position in the target
        return [{"score": 1.0, "target_found": True, "keep": int(e["id"].rsplit("-", 1)[1]) % 2 == 0, "shape": True}
                for e in entries]

    monkeypatch.setattr(task_d, "oracle_verdicts", accept_even)
    flags = base_flags(tmp_path, tiny_data, tiny_model)
    m = task_d.main([*flags, "--max-candidates", "12", "--gen-batch-size", "4", "--arms", "synthetic_filtered",
                     "--ratios", "", "--n-seeds", "2", "--epochs", "1"])
    g = m["generation"]
    # round 1: 4 candidates, 2 accepted -> 1.1 * 2 * 4 / 2 = 4.4 -> 5 more (9); round 2: 4 accepted, done
    assert g["rounds"] == 2 and g["candidates_per_target"] == {"hexagon": 9, "circle": 9}
    assert g["generated_now"] == 18 and g["reused"] == 0 and g["n_candidates"] == 18
    assert {k: (v["generated"], v["accepted"]) for k, v in m["filter"]["per_target"].items()} == {
        "hexagon": (9, 5), "circle": (9, 5)}
    assert m["arms"]["synthetic_filtered"]["n_extra"] == 2 * N_PER_TARGET  # the first 4 accepted of each
    # nothing accepted: candidates double up to the cap, then the run goes on with what it has
    monkeypatch.setattr(task_d, "oracle_verdicts", lambda entries, *a: [
        {"score": 0.0, "target_found": False, "keep": False, "shape": False} for _ in entries])
    m = task_d.main([*flags[:-4], "--run-name", "none", "--n-per-target", "4", "--max-candidates", "12",
                     "--gen-batch-size", "4", "--arms", "synthetic_filtered", "--ratios", "", "--n-seeds", "2",
                     "--epochs", "1"])
    g = m["generation"]
    assert g["rounds"] == 3 and g["candidates_per_target"] == {"hexagon": 12, "circle": 12}
    assert g["generated_now"] == 6 and g["reused"] == 18  # 9 per target were made by the run above
    assert m["arms"]["synthetic_filtered"]["n_extra"] == 0


# --------------------------------------------------------------------------- statistics by hand
def test_arm_deltas_on_hand_built_hits():
    # 4 images with 2 captions each; category 0 on images 0-1 (the target), category 1 on images 2-3
    cap2img = np.repeat(np.arange(4), 2)
    has = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    ref = np.zeros((3, 8))
    new = ref.copy()
    new[:, :4] = 1  # the new arm finds every query of category 0 with every seed, nothing else changes
    out = task_d.arm_deltas({"new": new, "ref": ref}, "new", "ref", cap2img, has, [0], 300, seed=0)
    assert out["rare"] == {"mean": 1.0, "ci95": [1.0, 1.0]}
    assert [d["mean"] for d in out["per_category"]] == [1.0, 0.0]
    # overall: the share of drawn images that hold category 0; all 4 draws miss it (or all hit it) with
    # probability 1/16 > 2.5%, so the 95% CI reaches both ends
    assert out["overall"]["mean"] == 0.5 and out["overall"]["ci95"] == [0.0, 1.0]


def test_gap_closure_by_hand():
    # 4 images, 2 captions each; image 0-1 hold the target (col 0), image 2-3 the other category (col 1)
    cap2img = np.repeat(np.arange(4), 2)
    has = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=bool)
    base = np.zeros((3, 8))
    base[:, 4:] = 1  # baseline: targets 0, others 1 -> gap 1 in every resample
    arm = base.copy()
    arm[:, [0, 2]] = 1  # the arm finds one of the two captions of each target image: +0.5 everywhere
    out = task_d.gap_closure({"baseline": base, "rendered": arm}, ["rendered"], "baseline", cap2img, has, [0], 300, 0)
    assert out["gap"]["mean"] == pytest.approx(1) and out["gap"]["ci95"] == pytest.approx([1, 1])
    assert out["closed_fraction"]["rendered"]["mean"] == pytest.approx(0.5)
    assert out["closed_fraction"]["rendered"]["ci95"] == pytest.approx([0.5, 0.5])
    # no gap (targets as good as the others): nothing to close
    flat = np.ones((3, 8))
    assert task_d.gap_closure({"baseline": flat, "rendered": flat}, ["rendered"], "baseline", cap2img, has, [0], 50,
                              0)["closed_fraction"]["rendered"] is None


def test_rendered_arm_needs_no_generator_and_trains_with_the_baselines_recipe(tmp_path, tiny_data):
    # A baseline run whose recipe says 1 epoch: every arm gets it (no --epochs, no --quick). Its subsets are
    # --quick's, so the features cached by the quick run are reused.
    run = tmp_path / "baseline"
    run.mkdir()
    cfg = vars(retrieval.parse_args(["--data", str(tiny_data), "--epochs", "1", "--batch-size", "64",
                                     "--max-train", str(task_d.QUICK["max_train"]),
                                     "--max-eval", str(task_d.QUICK["max_eval"])]))
    (run / "config.json").write_text(json.dumps({"args": cfg}))
    targets = write_targets(tmp_path / "t.json", tiny_data, baseline_run=run)
    m = task_d.main(["--targets", str(targets), "--model", str(tmp_path / "no-such-model"), "--outputs",
                     str(tmp_path / "out"), "--run-name", "r", "--n-per-target", "3", "--n-seeds", "2",
                     "--bootstrap", "50", "--arms", "baseline,oversample,rendered"])
    assert m["epochs"] == 1 and m["training_hyperparameters"]["epochs"] == 1
    assert all(s["best_epoch"] == 1 for a in m["arms"].values() for s in a["per_seed"])
    assert set(m["arms"]) == {"baseline", "oversample", "rendered"} and m["generation"] is None and m["filter"] is None
    assert m["arms"]["rendered"]["n_extra"] == 6 == m["arms"]["oversample"]["n_extra"]  # all 3 prompts per target
    assert m["rendering"]["n_images"] == 6 and m["rendering"]["rendered_now"] == 6
    for name in ("results.md", "deltas.png"):
        assert (tmp_path / "out" / "task_d" / "r" / name).stat().st_size > 0
    assert not (tmp_path / "out" / "task_d" / "r" / "samples.png").exists()
    assert {r["target"]: r["met"] for r in m["targets_met"]}["gap_closed"] is None
    # the renders are the prompts: the oracle reads every target back (shape and colour of the named object)
    cache = task_d.Path(m["rendering"]["cache"])
    entries = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    images = np.stack([utils.load_rgb(cache / "images" / e["file"]) for e in entries])
    oracle = Oracle.load(task_d.DEFAULT_ORACLE, "cpu")
    verdicts = task_d.oracle_verdicts(entries, to_uint8_64(images), oracle, 0.5)
    # the oracle misreads about 1% of clean objects (models/shapes-oracle/metrics.json): allow one of the six
    assert sum(v["target_found"] for v in verdicts) >= len(verdicts) - 1
    again = task_d.main(["--targets", str(targets), "--outputs", str(tmp_path / "out"), "--run-name", "r2",
                         "--n-per-target", "3", "--n-seeds", "2", "--bootstrap", "50", "--arms", "rendered"])
    assert again["rendering"]["rendered_now"] == 0 and set(again["arms"]) == {"baseline", "rendered"}


# --------------------------------------------------------------------------- several processes
def test_accelerate_launch_splits_the_generation_between_two_processes(tmp_path, tiny_data, tiny_model):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("this torch has no gloo backend: two CPU processes cannot talk to each other")
    targets = write_targets(tmp_path / "targets.json", tiny_data)
    out = tmp_path / "out"
    # `--cpu` would start one process (accelerate's CPU launcher splits only through mpirun); --multi_gpu is
    # torchrun, which starts both, and --device cpu makes them talk over gloo on any machine.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", "task_d.py", "--device", "cpu", "--targets", str(targets), "--model",
           str(tiny_model), "--quick", "--outputs", str(out), "--run-name", "split", "--n-per-target", "3",
           "--arms", "synthetic", "--n-seeds", "2", "--ratios", "", "--epochs", "1", "--bootstrap", "50"]
    done = subprocess.run(cmd, cwd=task_d.Path(task_d.__file__).parent, capture_output=True, text=True, timeout=600,
                          env={**task_d.os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    # One store, its shards merged away; every planned candidate exactly once, 3 made by one process and 3 by the other.
    (store,) = (out / "task_d" / "cache").iterdir()
    assert not list(store.glob("manifest.*.jsonl"))
    entries = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines()]
    planned = task_d.plan_items(task_d.match_targets(json.loads(targets.read_text()), load_data(tiny_data),
                                                     str(targets)), load_data(tiny_data), 3, seed=0)
    ids = [e["id"] for e in entries]
    assert sorted(ids) == sorted(it["id"] for it in planned) and len(ids) == len(set(ids)) == 6
    assert all((store / "images" / e["file"]).is_file() for e in entries)
    assert sorted(e["process"] for e in entries) == [0, 0, 0, 1, 1, 1]
    # The main process alone went on: one run folder, one metrics.json, counting both processes' images.
    assert sorted(p.relative_to(out) for p in out.rglob("metrics.json")) == [task_d.Path("task_d/split/metrics.json")]
    gen = json.loads((out / "task_d" / "split" / "metrics.json").read_text())["generation"]
    assert gen["processes"] == 2 and gen["generated_now"] == 6 and gen["generated_by_process"] == [3, 3]


# --------------------------------------------------------------------------- bad inputs
def test_missing_targets_file(tmp_path):
    with pytest.raises(UserError, match=rf"^targets file not found: {re.escape(str(tmp_path))}/t.json "
                                        r"\(run `python task_c.py` first\)$"):
        task_d.read_targets(tmp_path / "t.json")


@pytest.mark.parametrize("text, message", [
    ("{not json", r"t.json is not valid JSON \(Expecting property name enclosed in double quotes at line 1\)$"),
    ('{"rule": "x"}', r"t.json is not a targets.json from task_c.py \(no 'targets' list\)$"),
    ('{"targets": []}', r"t.json lists no target categories: nothing to generate$"),
    ('{"targets": [{"category": "hexagon"}]}', r"every target needs a 'category' name and an integer 'category_id'"),
])
def test_malformed_or_empty_targets(tmp_path, text, message):
    (tmp_path / "t.json").write_text(text)
    with pytest.raises(UserError, match=message):
        task_d.read_targets(tmp_path / "t.json")


def test_target_not_in_the_data(tmp_path, tiny_data, tiny_model):
    path = write_targets(tmp_path / "t.json", tiny_data)
    raw = json.loads(path.read_text())
    raw["targets"][0]["category"] = "unicorn"
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"^target 'unicorn' \(id 7\) from .*t.json is not a category of .*data.pkl$"):
        task_d.main(base_flags(tmp_path, tiny_data, tiny_model, targets=path))


def test_unloadable_model(tmp_path, tiny_data):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "X"]}')
    with pytest.raises(UserError, match=rf"^cannot load the pipeline in {re.escape(str(broken))}: "):
        task_d.main(base_flags(tmp_path, tiny_data, broken))
    assert not (tmp_path / "out" / "task_d" / "q").exists()


@pytest.mark.parametrize("flags, message", [
    (["--n-seeds", "1"], "--n-seeds must be >= 2 (a spread needs several seeds), got 1"),
    (["--min-score", "1.5"], "--min-score must be in 0..1, got 1.5"),
    (["--ratios", "half"], "argument --ratios: must be comma-separated floats, got 'half'"),
    (["--n-per-target", "0"], "--n-per-target must be positive, got 0"),
    (["--arms", "baseline,magic"], "unknown arm 'magic' in --arms; choose from baseline, oversample, synthetic, "
                                   "synthetic_filtered, synthetic_recaptioned, rendered or all"),
    (["--epochs", "0"], "--epochs must be positive, got 0"),
])
def test_bad_arguments(flags, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        task_d.parse_args(flags)


def test_cli_prints_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "task_d.py", "--targets", str(tmp_path / "none.json")], capture_output=True,
                         text=True, cwd=task_d.Path(task_d.__file__).parent, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        f"error: targets file not found: {tmp_path}/none.json (run `python task_c.py` first)"]


# --------------------------------------------------------------------------- COCO-format data
def test_coco_format_data_goes_through_the_alignment_filter(tmp_path, tiny_model, coco_world):
    generate_data.main(["--source", "coco", "--coco-root", str(coco_world), "--out", str(tmp_path / "data"),
                        "--workers", "1"])
    out = tmp_path / "out"
    task_c.main(["--data", str(tmp_path / "data" / "data.pkl"), "--quick", "--k-targets", "2", "--outputs", str(out),
                 "--run-name", "coco", "--retrieval-run", str(out / "none")])
    targets = out / "task_c" / "coco" / "targets.json"
    m = task_d.main(["--targets", str(targets), "--model", str(tiny_model), "--quick", "--outputs", str(out),
                     "--run-name", "coco", "--n-per-target", "3", "--min-alignment", "0", "--n-seeds", "2",
                     "--ratios", "", "--epochs", "1"])
    names = [t["category"] for t in json.loads(targets.read_text())["targets"]]
    assert m["filter"]["rule"].startswith("alignment score") and "≥ 0.00" in m["filter"]["rule"]
    # threshold 0: every candidate passes (the score is 100 * max(cos, 0) >= 0)
    assert {k: (v["generated"], v["accepted"]) for k, v in m["filter"]["per_target"].items()} == {n: (3, 3) for n in names}
    assert m["arms"]["synthetic_filtered"]["n_extra"] == 3 * len(names) == m["arms"]["oversample"]["n_extra"]
    assert "rendered" not in m["arms"] and "synthetic_recaptioned" not in m["arms"]
    assert m["skipped_arms"] == {"rendered": "COCO-style data has no renderer",
                                 "synthetic_recaptioned": "COCO-style data: the alignment filter reads no scene to caption"}
    assert set(m["arms"]["baseline"]["per_category"]) == {"person", "car", "dog"}
    cache = task_d.Path(m["generation"]["cache"])
    entries = [json.loads(line) for line in (cache / "manifest.jsonl").read_text().splitlines()]
    assert len(entries) == 3 * len(names) and all(len(e["captions"]) == 5 and e["target"] in e["text"] for e in entries)
