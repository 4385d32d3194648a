"""task_e.py: a quick run end to end on a tiny random-weight pipeline, determinism and resume, query images per
query and seed, the fusion math by hand, the query draw, the editing cases and verdicts, and bad inputs."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import generate_data as gd
import retrieval
import task_e
from utils import UserError, ci_verdict, l2_normalize, load_data

METRIC_KEYS = {"R@1", "R@5", "R@10", "mAP"}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    from utils import load_pipeline

    pipe, settings = load_pipeline(str(tiny_model), task_e.pick_device("cpu"))
    return pipe, dict(settings, steps=2)


@pytest.fixture(scope="module")
def tiny_heads(tmp_path_factory):
    """Untrained heads with the real backbones' sizes: retrieval quality is irrelevant to what is tested here."""
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("heads") / "heads.pt"
    retrieval.save_heads(path, retrieval.build_heads(1280, 384, hidden=32, dim=16),
                         {"in_image": 1280, "in_text": 384, "hidden": 32, "dim": 16, "image_encoder": "efficientnet-lite0",
                          "text_encoder": "all-MiniLM-L6-v2", "image_res": 128})
    return path


def _args(tiny_data, tiny_heads, tiny_model, out, run_name, *extra):
    return ["--data", str(tiny_data), "--heads", str(tiny_heads), "--model", str(tiny_model), "--steps", "2",
            "--strengths", "0.5,1", "--targets", str(out / "no-targets.json"), "--quick", "--outputs", str(out),
            "--run-name", run_name, "--device", "cpu", "--k-max", "2", *extra]


@pytest.fixture(scope="module")
def quick_run(tiny_data, tiny_heads, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("task_e")
    return out, task_e.main(_args(tiny_data, tiny_heads, tiny_model, out, "q"))


def _without_timings(metrics):
    m = dict(metrics)
    m.pop("timings")
    m.pop("cost")
    return m


# --------------------------------------------------------------------------- the quick run
def test_quick_run_writes_metrics_figures_and_report(quick_run, tiny_data):
    out, metrics = quick_run
    run = out / "task_e" / "q"
    assert (out / "task_e" / "latest").resolve() == run.resolve()
    for name in ("metrics.json", "config.json", "results.md", "recall_vs_k.png", "edit_success.png", "edit_grid.png"):
        assert (run / name).stat().st_size > 0, name
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))

    # queries: 4 random + 2 extra target + 2 extra relational, 2 val; subsets hold what they claim
    assert metrics["k_max"] == 2
    q = metrics["queries"]
    assert q["pools"] == {"overall": 4, "targets_extra": 2, "relational_extra": 2} and q["n_val"] == 2
    assert q["n_test"] == 8 and q["n_index_images"] == 200 and q["n_val_index_images"] == 100
    assert q["subsets"]["overall"] == 4 and q["subsets"]["targets"] >= 2 and q["subsets"]["relational"] >= 2
    # no targets.json: the 3 rarest training categories of this data
    train = load_data(tiny_data)["splits"]["train"]
    counts = retrieval.image_counts(train)
    all_counts = sorted(counts.get(c["id"], 0) for c in load_data(tiny_data)["categories"])
    assert metrics["targets"]["source"].startswith("the 3 rarest training categories")
    assert sorted(metrics["targets"]["train_counts"]) == all_counts[:3]

    grid = metrics["weight_grid"]
    for method in task_e.FUSIONS:
        assert set(metrics["fusion"][method]) == {"1", "2"}
        for k, row in metrics["fusion"][method].items():
            assert row["w"] in grid and len(row["val_mAP"]) == len(grid)
            assert row["val_mAP"][f"{row['w']:g}"] == max(row["val_mAP"].values())
    for subset in task_e.SUBSETS:
        r = metrics["retrieval"][subset]
        assert r["n"] == q["subsets"][subset]
        text = r["text"]
        assert set(text) == METRIC_KEYS
        assert all(set(text[m]) == {"mean", "ci95"} for m in METRIC_KEYS)  # the reference: no delta to itself
        for method in ("weighted", "rrf", "image_only"):
            assert set(r[method]) == {"1", "2"}
            for row in r[method].values():
                assert set(row) == METRIC_KEYS
                assert row["R@1"]["mean"] <= row["R@5"]["mean"] <= row["R@10"]["mean"]
                for m in METRIC_KEYS:
                    lo, hi = row[m]["ci95"]
                    assert 0 <= lo <= row[m]["mean"] <= hi <= 1
                    assert row[m]["delta"] == pytest.approx(row[m]["mean"] - text[m]["mean"])
                    assert row[m]["delta_ci95"][0] <= row[m]["delta"] <= row[m]["delta_ci95"][1]
        # w = 0 chosen on val means exactly text-only numbers on test
        for method in task_e.FUSIONS:
            for k, row in r[method].items():
                if metrics["fusion"][method][k]["w"] == 0:
                    assert all(row[m]["delta"] == 0 and row[m]["mean"] == text[m]["mean"] for m in METRIC_KEYS)
    # Text-only on the test queries, against both fusions at w = 0 ranked afresh for the test sweep: a text row
    # taken from the wrong queries, mask or ranking would differ here (its delta to itself is 0 whatever it holds).
    sweep = metrics["test_sweep_R@10_overall_at_k_max"]
    text_r10 = metrics["retrieval"]["overall"]["text"]["R@10"]["mean"]
    assert sweep["weighted"]["0"] == pytest.approx(text_r10) and sweep["rrf"]["0"] == pytest.approx(text_r10)

    cost = metrics["cost"]
    assert cost["generate_s_per_image"] > 0 and cost["embed_s_per_image"] > 0
    assert cost["generate_cpu_s_per_image"] > 0 and cost["embed_cpu_s_per_image"] > 0
    added = cost["added_s_per_query"]["weighted"]
    assert 0 < added["1"] < added["2"]

    e = metrics["editing"]
    assert 0 <= e["vae_roundtrip_oracle_correct"] <= 1 and e["source_oracle_correct"] in (0, 0.5, 1)
    assert e["n_cases"] == 2 and e["n_by_kind"] == {"color": 1, "shape": 1}
    assert e["steps"] == 2  # --quick edits at the model's sampling steps (--edit-steps 0)
    assert list(e["by_method"]) == ["img2img", "inversion"]
    for by_strength in e["by_method"].values():
        assert list(by_strength) == ["0.5", "1"]
        for row in by_strength.values():
            a = row["all"]
            assert a["n"] == 2 and a["success"]["rate"] <= min(a["edited"]["rate"], a["kept"]["rate"])
            assert row["color"]["n"] == row["shape"]["n"] == 1
            assert 0 <= a["reconstructed"]["rate"] <= 1
    best = e["by_method"][e["best"]["method"]][e["best"]["strength"]]["all"]["success"]["rate"]
    assert best == max(r["all"]["success"]["rate"] for b in e["by_method"].values() for r in b.values())

    report = (run / "results.md").read_text()
    assert f"| text only | - | {metrics['retrieval']['overall']['text']['R@1']['mean']:.3f} |" in report
    assert "(recall_vs_k.png)" in report and "(edit_grid.png)" in report
    stores = list((run / "generated" / "test").glob("*/manifest.jsonl"))  # one store: one model and sampler
    assert len(stores) == 1 and len(stores[0].read_text().splitlines()) == metrics["queries"]["n_test"] * 2
    # One store per method and strength, and one more for its no-change run, whose prompts are the sources'.
    assert len(list((run / "edited").glob("*/*/manifest.jsonl"))) == 8
    cases = task_e.edit_cases(["color", "shape"], 1, 0, 64)
    no_change = list((run / "edited" / "inversion-no-change").glob("*/manifest.jsonl"))
    assert len(no_change) == 2
    for store in no_change:
        texts = [json.loads(line)["text"] for line in store.read_text().splitlines()]
        assert texts == [c["source_prompt"]["text"] for c in cases] != [c["target_prompt"]["text"] for c in cases]


def test_a_rerun_resumes_and_gives_the_same_numbers(quick_run, tiny_data, tiny_heads, tiny_model):
    out, first = quick_run
    run = out / "task_e" / "q"
    # generated/test, generated/val, edited/<method>[-no-change]/<strength>
    manifests = sorted(run.rglob("manifest.jsonl"))
    before = [m.stat().st_mtime_ns for m in manifests]
    resumed = task_e.main(_args(tiny_data, tiny_heads, tiny_model, out, "q"))
    assert len(manifests) == 10 and [m.stat().st_mtime_ns for m in manifests] == before  # read back, not redone
    assert _without_timings(resumed) == _without_timings(first)  # fusion, bootstrap and edits are seeded
    assert resumed["cost"]["generate_s_per_image"] == first["cost"]["generate_s_per_image"]  # its saved cost


class FakeWandb:
    """Stands in for `wandb.init`'s run: records what the script logs."""

    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, {}, False

    def log(self, row, step=None):
        self.logged.update(row)

    def finish(self):
        self.finished = True


def test_without_editing_results_metrics_and_wandb_survive_a_failing_figure(quick_run, tiny_data, tiny_heads,
                                                                             tiny_model, monkeypatch, capsys):
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeWandb(**kw)) or runs[-1])

    def broken_plot(*args):
        raise RuntimeError("no display\nsecond line")

    monkeypatch.setattr(task_e, "plot_recall_vs_k", broken_plot)
    out, _ = quick_run
    metrics = task_e.main(_args(tiny_data, tiny_heads, tiny_model, out, "no-edits", "--n-edits", "0", "--wandb"))
    run = out / "task_e" / "no-edits"
    report = (run / "results.md").read_text()
    assert metrics["editing"] is None
    assert "## Retrieval: overall (" in report and "## Text-guided editing" not in report
    assert not (run / "edit_grid.png").exists() and not (run / "recall_vs_k.png").exists()
    # the figure failed after the results were on disk: one warning line, recorded, and `latest` moved
    assert metrics["figures"] == {"recall_vs_k.png": "failed: RuntimeError: no display"}
    assert "warning: recall_vs_k.png not written (RuntimeError: no display)\n" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert (out / "task_e" / "latest").resolve() == run.resolve()
    # --wandb: one run named after the folder, given the config, logging the run's numbers
    (fake,) = runs
    assert fake.init["project"] == "task_e" and fake.init["name"] == "no-edits" and fake.init["config"]["wandb"]
    assert fake.logged["retrieval/overall/text/R@10/mean"] == metrics["retrieval"]["overall"]["text"]["R@10"]["mean"]
    assert fake.logged["queries/n_test"] == 8 and fake.finished


def test_quick_fills_only_the_flags_not_given(tiny_data, tiny_heads):
    args = task_e.parse_args(["--data", str(tiny_data), "--heads", str(tiny_heads), "--quick", "--n-queries", "7"])
    assert args.n_queries == 7  # given explicitly: kept
    assert (args.n_subset_queries, args.n_val_queries, args.n_edits, args.bootstrap) == (2, 2, 1, 200)
    assert task_e.parse_args(["--data", str(tiny_data), "--heads", str(tiny_heads)]).n_queries == 60


def test_query_images_come_back_per_query_in_seed_order(tiny_pipe, tmp_path):
    from utils import generate_images

    pipe, settings = tiny_pipe
    seeds = task_e.query_seeds(np.array([3, 7]), 2, base=5)
    np.testing.assert_array_equal(seeds, [[29, 30], [61, 62]])  # base + MAX_K * caption + i
    images, seconds, fresh = task_e.generate_for_queries(pipe, settings, ["a red star", "a blue ring"], seeds,
                                                         tmp_path, 1, "test")
    assert images.shape == (2, 2, 64, 64, 3) and images.dtype == np.uint8 and fresh == 4
    assert seconds["wall_s"] > 0 and seconds["cpu_s"] > 0
    alone = generate_images(pipe, ["a blue ring"], [62], settings["steps"], settings["guidance"], settings["size"],
                            batch_size=1, progress=False)
    np.testing.assert_array_equal(images[1, 1], alone[0])  # query 2's second image is its prompt at its seed
    again = task_e.generate_for_queries(pipe, settings, ["a red star", "a blue ring"], seeds, tmp_path, 1, "test")
    assert again[2] == 0 and again[1] == seconds and np.array_equal(again[0], images)  # reused with its cost


def test_vae_roundtrip_keeps_shape_and_dtype(tiny_pipe):
    pipe, _ = tiny_pipe
    images = np.stack([c["source"] for c in task_e.edit_cases(["color"], 2, seed=0, size=64)])
    out = task_e.vae_roundtrip(pipe, images)
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out, task_e.vae_roundtrip(pipe, images))  # no sampling: the latent mode


def test_inversion_editing_denoises_the_inverted_latent_on_the_same_timesteps(tiny_pipe):
    """The forward pass runs the inverted steps back in reverse order; at one step of 50 it returns (nearly) the
    VAE round trip, since it undoes one small inversion step; it is deterministic whatever the generator."""
    import torch
    from PIL import Image

    from utils import STUDY_MODEL, load_pipeline

    pipe, _ = tiny_pipe
    sources = np.stack([c["source"] for c in task_e.edit_cases(["color"], 2, seed=0, size=64)])
    editor = task_e.InversionEditor(pipe)
    images = [Image.fromarray(im) for im in sources]
    out = editor(["a red star"] * 2, images, strength=0.3, num_inference_steps=10, guidance_scale=2.0).images
    assert out.shape == (2, 64, 64, 3)
    inverted = [int(t) for t in editor.inverse.scheduler.timesteps]
    assert inverted == sorted(inverted) and inverted[-1] == 999  # trailing spacing: up to T - 1
    assert [int(t) for t in editor.forward.scheduler.timesteps] == inverted[:3][::-1]
    again = editor(["a red star"] * 2, images, strength=0.3, num_inference_steps=10, guidance_scale=2.0,
                   generator=[torch.Generator().manual_seed(i) for i in (5, 6)]).images
    np.testing.assert_array_equal(out, again)
    # A trained model (random weights predict noise that jumps between neighbouring timesteps): one step of 50
    # inverted and undone comes back to the VAE round trip, to within a grey level on average.
    study, _ = load_pipeline(STUDY_MODEL, task_e.pick_device("cpu"))
    one_step = task_e.InversionEditor(study)(["a red star"] * 2, images, strength=1 / 50, num_inference_steps=50,
                                             guidance_scale=1.0).images
    roundtrip = task_e.vae_roundtrip(study, sources).astype(float)
    assert np.abs(one_step * 255 - roundtrip).mean() < 1.0
    with pytest.raises(ValueError, match="strength 0.05 leaves no step of 10"):
        editor(["a red star"], images[:1], strength=0.05, num_inference_steps=10, guidance_scale=1.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_first_order_step_is_diffusers_first_order_dpm_solver_step(prediction_type):
    """The update the null-text optimisation differentiates is the step the editing pipeline takes."""
    import torch
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(solver_order=1, prediction_type=prediction_type)
    sched.set_timesteps(timesteps=[999, 519, 39])
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    ac = sched.alphas_cumprod
    for t, a_prev in ((999, ac[519]), (519, ac[39]), (39, torch.tensor(1.0))):  # the last step ends clean
        out = torch.randn(2, 4, 8, 8, generator=gen)
        expected = sched.step(out, t, sample).prev_sample
        ours = task_e.first_order_step(out, sample, ac[t], a_prev, prediction_type)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
        sample = expected


def test_null_text_optimisation_brings_a_guided_reconstruction_closer_to_the_source():
    """Asked for no change at guidance 5, the study model redraws the source closer to its VAE round trip with the
    optimised null embeddings than with the plain empty-prompt one (the same editor, 0 optimiser steps)."""
    from PIL import Image

    from utils import STUDY_MODEL, load_pipeline

    study, _ = load_pipeline(STUDY_MODEL, task_e.pick_device("cpu"))
    cases = task_e.edit_cases(["color"], 1, seed=0, size=64)
    sources = np.stack([c["source"] for c in cases])
    captions = {task_e.source_digest(c["source"]): c["source_prompt"]["text"] for c in cases}
    prompts = [c["source_prompt"]["text"] for c in cases]
    roundtrip = task_e.vae_roundtrip(study, sources).astype(float)
    error = {}
    for inner in (0, 10):
        editor = task_e.NullTextEditor(study, captions, inner_steps=inner)
        out = editor(prompts, [Image.fromarray(im) for im in sources], strength=1.0, num_inference_steps=8,
                     guidance_scale=5.0).images
        error[inner] = np.abs(out * 255 - roundtrip).mean()
    assert error[10] < 0.8 * error[0]  # measured: 20.5 vs 34.6 grey levels
    with pytest.raises(KeyError):  # a source it was not given the caption of
        editor(prompts, [Image.fromarray(255 - sources[0])], strength=1.0, num_inference_steps=8, guidance_scale=5.0)


# --------------------------------------------------------------------------- fusion by hand
def _unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_weighted_query_at_w0_is_the_text_query_bit_for_bit_and_at_w1_the_image_mean():
    rng = np.random.default_rng(0)
    text, gen = _unit(rng, 5, 8), _unit(rng, 5, 3, 8)
    np.testing.assert_array_equal(task_e.weighted_queries(text, gen, 0.0), text)
    np.testing.assert_allclose(task_e.weighted_queries(text, gen, 1.0), l2_normalize(gen.mean(1)), atol=1e-7)
    half = task_e.weighted_queries(text, gen, 0.5)
    np.testing.assert_allclose(half, 0.5 * text + 0.5 * l2_normalize(gen.mean(1)), atol=1e-7)


def test_both_fusions_at_w0_rank_exactly_as_text_only():
    rng = np.random.default_rng(1)
    db, text, gen = _unit(rng, 50, 8), _unit(rng, 6, 8), _unit(rng, 6, 4, 8)
    fuser = task_e.Fuser(retrieval.build_index(db), text, gen, c=60.0)
    _, expected = retrieval.brute_force_search(db, text, 50)
    np.testing.assert_array_equal(fuser.text_ids, expected)
    for method in task_e.FUSIONS:
        for k in (1, 4):
            np.testing.assert_array_equal(fuser.ranking(method, k, 0.0), expected)
            assert not np.array_equal(fuser.ranking(method, k, 1.0), expected)  # the images do change the ranking


def test_reciprocal_rank_fusion_on_a_toy_ranking():
    text_rr = task_e.reciprocal_ranks(np.array([[0, 1, 2]]), c=1.0)
    np.testing.assert_allclose(text_rr, [[1 / 2, 1 / 3, 1 / 4]])  # rank 1 -> 1 / (c + 1)
    image_rr = task_e.reciprocal_ranks(np.array([[2, 1, 0]]), c=1.0)
    # w = 0.6: doc 0 = 0.4/2 + 0.6/4 = 0.35, doc 1 = 1/3, doc 2 = 0.4/4 + 0.6/2 = 0.40
    np.testing.assert_array_equal(task_e.rrf_ranking(text_rr, image_rr, 0.6), [[2, 0, 1]])
    # w = 0.4: doc 0 = 0.6/2 + 0.4/4 = 0.40, doc 1 = 1/3, doc 2 = 0.6/4 + 0.4/2 = 0.35
    np.testing.assert_array_equal(task_e.rrf_ranking(text_rr, image_rr, 0.4), [[0, 2, 1]])
    # w = 0.5: docs 0 and 2 tie at 0.375; the tie goes to the lower id
    np.testing.assert_array_equal(task_e.rrf_ranking(text_rr, image_rr, 0.5), [[0, 2, 1]])
    # two image lists are averaged: [1, 0, 2] and [2, 1, 0] -> doc 1 = (1/2 + 1/3) / 2 wins at w = 1
    two = np.mean([task_e.reciprocal_ranks(np.array([[1, 0, 2]]), 1.0), image_rr], axis=0)
    np.testing.assert_allclose(two, [[(1 / 3 + 1 / 4) / 2, (1 / 2 + 1 / 3) / 2, (1 / 4 + 1 / 2) / 2]])
    np.testing.assert_array_equal(task_e.rrf_ranking(text_rr, two, 1.0), [[1, 2, 0]])


def test_choose_weight_takes_the_best_and_ties_go_to_the_smaller_w():
    assert task_e.choose_weight({0.0: 0.3, 0.5: 0.4, 1.0: 0.2}) == 0.5
    assert task_e.choose_weight({0.0: 0.4, 0.5: 0.4, 1.0: 0.4}) == 0.0
    assert task_e.choose_weight({0.2: 0.1, 0.7: 0.3, 0.9: 0.3}) == 0.7


def test_vs_text_only_gives_the_paired_difference_on_the_mask():
    fused = {"R@1": np.array([1.0, 0, 1, 1, 0]), "R@5": np.ones(5), "R@10": np.ones(5), "AP": np.full(5, 0.5)}
    text = {"R@1": np.array([0.0, 0, 1, 1, 1]), "R@5": np.ones(5), "R@10": np.ones(5), "AP": np.full(5, 0.25)}
    mask = np.array([True, True, True, True, False])
    reference = task_e.estimates(text, mask, 500, seed=0)  # the text-only row: estimates, no delta
    assert set(reference) == METRIC_KEYS and all(set(v) == {"mean", "ci95"} for v in reference.values())
    assert reference["R@1"]["mean"] == 0.5 and reference["mAP"] == {"mean": 0.25, "ci95": [0.25, 0.25]}
    out = task_e.vs_text_only(fused, text, mask, 500, seed=0)
    assert set(out) == METRIC_KEYS
    assert out["R@1"]["mean"] == 0.75 and out["R@1"]["delta"] == 0.25  # the 5th query is masked out
    assert out["mAP"]["delta"] == 0.25 and out["mAP"]["delta_ci95"] == [0.25, 0.25]
    assert 0 <= out["R@1"]["delta_ci95"][0] < 0.25 < out["R@1"]["delta_ci95"][1] <= 1
    assert ci_verdict(out["mAP"]["delta_ci95"]) == "better"
    assert set(task_e.VERDICT_WORDS) == {"better", "worse", "no detectable difference", "undefined"}


# --------------------------------------------------------------------------- query draw
def test_relational_captions():
    assert task_e.is_relational("a red star to the left of a blue ring")
    assert task_e.is_relational("a green pentagon above a large purple cross")
    assert not task_e.is_relational("a red star in the top left")
    assert not task_e.is_relational("two shapes: a star and a ring")


def test_query_draw_is_seeded_and_each_subset_holds_only_its_queries(tiny_data):
    records = load_data(tiny_data)["splits"]["test"]
    captions, cap2img = retrieval.flatten_captions(records)
    targets = [1, 2]
    draw = task_e.draw_queries(captions, cap2img, records, targets, 30, 10, seed=4)
    again = task_e.draw_queries(captions, cap2img, records, targets, 30, 10, seed=4)
    np.testing.assert_array_equal(draw["ids"], again["ids"])
    assert not np.array_equal(draw["ids"], task_e.draw_queries(captions, cap2img, records, targets, 30, 10, 5)["ids"])
    assert draw["masks"]["overall"].sum() == 30 and draw["pools"] == {"overall": 30, "targets_extra": 10,
                                                                      "relational_extra": 10}
    ids = draw["ids"]
    for i in ids[draw["masks"]["targets"]]:
        assert set(records[cap2img[i]]["category_ids"]) & set(targets)
    for i in ids[draw["masks"]["relational"]]:
        assert any(rel in captions[i] for rel in gd.RELATIONS)
    assert draw["masks"]["targets"].sum() >= 10 and draw["masks"]["relational"].sum() >= 10
    assert len(ids) == len(set(ids.tolist()))


# --------------------------------------------------------------------------- editing
def test_edit_cases_change_exactly_one_attribute():
    cases = task_e.edit_cases(["color", "shape"], 3, seed=2, size=64)
    assert [c["kind"] for c in cases] == ["color", "shape"] * 3
    again = task_e.edit_cases(["color", "shape"], 3, seed=2, size=64)
    for c, c2 in zip(cases, again):
        assert c["source"].shape == (64, 64, 3) and c["source"].dtype == np.uint8
        np.testing.assert_array_equal(c["source"], c2["source"])
        src, tgt = c["source_prompt"]["objects"][0], c["target_prompt"]["objects"][0]
        assert [k for k in src if src[k] != tgt[k]] == [c["kind"]]
        assert src["size"] in gd.SIZES and src["cell"] is not None  # everything the oracle checks is named
        assert c["target_prompt"]["text"] == gd.prompt_text(c["target_prompt"])
    assert task_e.edit_cases(["color"], 0, seed=2, size=64) == []


def test_edit_verdicts_need_the_edit_and_everything_else_kept():
    cases = [{"kind": "color"}, {"kind": "color"}, {"kind": "shape"}, {"kind": "shape"}]
    ok = {"shape": True, "color": True, "size": True, "position": True, "count": True, "all": True}
    scores = [ok, dict(ok, shape=False, all=False), dict(ok, shape=False, all=False), dict(ok, count=False, all=False)]
    v = task_e.edit_verdicts(scores, cases)
    np.testing.assert_array_equal(v["edited"], [True, True, False, True])
    np.testing.assert_array_equal(v["kept"], [True, False, True, False])
    np.testing.assert_array_equal(v["success"], [True, False, False, False])
    s = task_e.summarize_edits(v, np.array([c["kind"] for c in cases]), 200, seed=0)
    assert s["all"]["n"] == 4 and s["all"]["success"]["rate"] == 0.25
    assert s["color"]["success"]["rate"] == 0.5 and s["shape"]["success"]["rate"] == 0.0


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("flags, message", [
    (["--k-max", "0"], "--k-max must be between 1 and 8, got 0"),
    (["--k-max", "9"], "--k-max must be between 1 and 8, got 9"),
    (["--strengths", "0,0.5"], "--strengths must lie in (0, 1], got 0"),
    (["--strengths", "0.5,1.5"], "--strengths must lie in (0, 1], got 1.5"),
    (["--strengths", "0.5,high"], "argument --strengths: must be comma-separated floats, got 'high'"),
    (["--weights", "0,1.2"], "argument --weights: must be comma-separated floats >= 0 and <= 1, got '1.2'"),
    (["--n-queries", "0"], "--n-queries must be >= 1, got 0"),
    (["--edit-kinds", "size"], "--edit-kinds must be a comma-separated subset of color, shape, got 'size'"),
    (["--edit-methods", "img2img,diffedit"],
     "--edit-methods must be a comma-separated subset of img2img, inversion, null-text, got 'img2img,diffedit'"),
    (["--rrf-c", "0"], "--rrf-c must be > 0, got 0.0"),
])
def test_bad_arguments(flags, message, tiny_data, tiny_heads):
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        task_e.parse_args(["--data", str(tiny_data), "--heads", str(tiny_heads), *flags])


def test_missing_heads(tiny_data, tmp_path):
    with pytest.raises(UserError, match=f"^{re.escape(f'retrieval checkpoint not found: {tmp_path}/h.pt')} "
                                        r"\(run `python retrieval.py` first\)$"):
        task_e.parse_args(["--data", str(tiny_data), "--heads", str(tmp_path / "h.pt")])


@pytest.mark.parametrize("model, message", [
    ("nobody/no-such-model", "model 'nobody/no-such-model' is not in the local Hugging Face cache and cannot be "
                             "downloaded here"),
    ("no-such-model", "unknown model 'no-such-model': not a registry name"),
])
def test_unknown_model_offline(model, message, tiny_data, tiny_heads, tmp_path):
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        task_e.main(["--data", str(tiny_data), "--heads", str(tiny_heads), "--model", model, "--quick",
                     "--outputs", str(tmp_path)])
    assert not (tmp_path / "task_e").exists()  # nothing written before the model loads


def test_strength_too_small_for_the_steps(tiny_data, tiny_heads, tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"^--strengths 0\.3 gives no denoising step at 2 editing steps; use at least 0\.5 "
                                          r"or more --edit-steps$"):
        task_e.main(_args(tiny_data, tiny_heads, tiny_model, tmp_path, "x") + ["--strengths", "0.3,0.5"])


def test_edit_steps_set_the_editing_pipelines_steps(tiny_data, tiny_heads, tiny_model, tmp_path):
    """--edit-steps 4 makes strength 0.3 legal: int(4 * 0.3) = 1 inversion step, where the 2 sampling steps leave
    none (InversionEditor would raise), so the editing pipelines ran at 4 steps, and the run records them; null-text
    editing (at guidance 3, where it optimises) runs and is reported beside inversion."""
    args = _args(tiny_data, tiny_heads, tiny_model, tmp_path, "s4") + ["--strengths", "0.3", "--edit-methods",
                                                                       "null-text,inversion", "--edit-steps", "4",
                                                                       "--guidance", "3"]
    e = task_e.main(args)["editing"]
    assert e["steps"] == 4 and list(e["by_method"]) == ["inversion", "null-text"]
    assert all(list(rows) == ["0.3"] for rows in e["by_method"].values())
    assert "| null-text | 0.3 |" in (tmp_path / "task_e" / "s4" / "results.md").read_text()


def test_cli_prints_one_line_error():
    out = subprocess.run([sys.executable, "task_e.py", "--k-max", "0"], capture_output=True, text=True,
                         cwd=task_e.Path(task_e.__file__).parent, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["error: --k-max must be between 1 and 8, got 0"]
