"""task_a.py: tiny SD / SDXL / SD3 pipelines side by side end to end, timing, alignment mode, bad inputs."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import task_a
import utils
from tiny_models import bias_heads, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from utils import UserError


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory):
    """The three hub pipeline classes (SD 2.1 / SD-Turbo, SDXL / SDXL-Turbo, SD 3.5) with random weights, saved.

    Returns name -> (folder, number of weights in all of the pipeline's torch modules, found without task_a).
    """
    import torch

    tmp = tmp_path_factory.mktemp("models")
    builds = {}
    for name, make in (("sd", tiny_sd_pipeline), ("sdxl", tiny_sdxl_pipeline), ("sd3", tiny_sd3_pipeline)):
        pipe = make(tmp / f"{name}-parts")
        pipe.save_pretrained(tmp / name)
        modules = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        builds[name] = (str(tmp / name), sum(p.numel() for m in modules for p in m.parameters()))
    return builds


@pytest.fixture(scope="module")
def tiny_models(tiny_builds):
    """Name -> folder of each saved tiny pipeline."""
    return {name: folder for name, (folder, _) in tiny_builds.items()}


# Seconds of each generation batch, per model in --models order: the warm-up, then the timed ones. A stand-in clock,
# so the timing summary is checked against numbers worked out by hand; the 5th value is there to catch a 5th batch.
BATCH_SECONDS = {"sd": [9.0, 0.3, 0.1, 0.2, 0.05], "sdxl": [9.0, 0.5, 0.4, 0.6, 0.05],
                 "sd3": [9.0, 0.8, 0.9, 0.7, 0.05]}
# By hand, one image per batch: (fastest, median, images per second of the fastest) of values 2-4 above.
EXPECTED_TIMING = {"sd": (0.1, 0.2, 10.0), "sdxl": (0.4, 0.5, 2.5), "sd3": (0.7, 0.8, 1 / 0.7)}


def scripted_generate_images(seconds: list[list[float]]):
    """utils.generate_images (the images are real) whose batch_times are the next model's scripted seconds."""
    calls = iter(seconds)

    def generate_images(*args, batch_times=None, **kw):
        times: list[float] = []
        images = utils.generate_images(*args, batch_times=times, **kw)
        if batch_times is not None:
            batch_times += next(calls)[:len(times)]
        return images

    return generate_images


def no_time_call(*args, **kw):
    raise AssertionError("the generation's own batches were enough: no extra timed call expected")


@pytest.fixture(scope="module")
def quick_run(tiny_models, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("task_a")
    # 1 prompt per kind x 2 seeds, one image per call: 4 calls, the first the warm-up and 3 timed ones.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(task_a, "generate_images", scripted_generate_images(list(BATCH_SECONDS.values())))
        mp.setattr(task_a, "time_call", no_time_call)
        metrics = task_a.main(["--models", ",".join(tiny_models.values()), "--quick", "--data", str(tiny_data),
                               "--outputs", str(out), "--run-name", "q", "--threads", "1", "--n-prompts", "1",
                               "--batch-size", "1"])
    return out / "task_a" / "q", metrics


def test_quick_run_compares_every_pipeline_class(quick_run, tiny_builds):
    run, metrics = quick_run
    assert (run.parent / "latest").resolve() == run.resolve()
    on_disk = json.loads((run / "metrics.json").read_text())
    assert list(on_disk["models"]) == ["sd", "sdxl", "sd3"]
    assert on_disk["n_images"] == 4 and on_disk["fidelity_mode"] == "oracle"  # 1 prompt x 2 kinds x 2 seeds
    for name, row in on_disk["models"].items():
        assert {"params", "sec_per_image", "peak_mem_mb", "fidelity", "fd"} <= set(row), name
        assert row["steps"] == 2  # --quick caps every model's recommended steps
        assert row["sec_per_image_batches"] == pytest.approx(BATCH_SECONDS[name][1:4])  # 3 timed, warm-up not among them
        fastest, median, per_s = EXPECTED_TIMING[name]
        assert row["sec_per_image"] == pytest.approx(fastest) and row["sec_per_image_median"] == pytest.approx(median)
        assert row["images_per_s"] == pytest.approx(per_s)
        assert row["peak_mem_mb"] > 0
        assert 0 <= row["fidelity_ci95"][0] <= row["fidelity"] <= row["fidelity_ci95"][1] <= 1
        assert row["fd"] > 0 and row["fd_real_vs_real"] > 0 and row["fd_n"] == 4
        assert set(row["per_kind"]) == {"single", "two"} and row["per_kind"]["two"]["n"] == 2
        assert row["params"]["total"] == tiny_builds[name][1]  # every weight of the pipeline, none left out
    p = {n: r["params"] for n, r in on_disk["models"].items()}
    assert {"unet", "text_encoder", "vae"} == set(p["sd"]) - {"total"}
    assert {"unet", "text_encoder", "text_encoder_2", "vae"} == set(p["sdxl"]) - {"total"}
    assert {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"} == set(p["sd3"]) - {"total"}
    assert len({r["weights_fingerprint"] for r in on_disk["models"].values()}) == 3 and not task_a.same_weights(on_disk)
    # All three share the real reference set, so the floor is the same number for each.
    assert len({r["fd_real_vs_real"] for r in on_disk["models"].values()}) == 1

    results = (run / "results.md").read_text()
    for name, row in on_disk["models"].items():
        assert f"| {name} | 2 | {row['guidance']} | {row['scheduler']} |" in results
        assert f"| {EXPECTED_TIMING[name][0]:.3f} |" in results  # its s/image column
    assert task_a.comparison_sentence(on_disk) in results
    from PIL import Image

    grid = Image.open(run / "grid.png")
    assert grid.size[0] > 3 * 96 and grid.size[1] == 18 + 2 * 96  # 3 model columns, 2 prompt rows (1 per kind)


def test_generation_is_seeded_and_timing_batches_do_not_change_images(tiny_models):
    import argparse

    pipe, _ = utils.load_pipeline(tiny_models["sd"], device=utils.pick_device("cpu"))
    args = argparse.Namespace(batch_size=2, timed_batches=3)
    texts, seeds = ["a red star", "a blue ring", "a red star"], [0, 1, 0]
    first, times = task_a.timed_generation(pipe, texts, seeds, 2, 3.0, None, args)
    again, _ = task_a.timed_generation(pipe, texts, seeds, 2, 3.0, None, args)
    # One full batch (the warm-up) and a short one: the first batch is timed 3 more times.
    assert first.shape == (3, 64, 64, 3) and len(times) == 3
    np.testing.assert_array_equal(first, again)
    assert np.abs(first[0].astype(int) - first[2].astype(int)).max() <= 1  # same seed, another batch position
    assert np.abs(first[0].astype(int) - first[1].astype(int)).mean() > 1


def test_alignment_mode_uses_the_retrieval_heads(tiny_models, tiny_data, tmp_path):
    heads = bias_heads(tmp_path / "heads.pt", 60)  # every image-text cosine is cos 60 = 0.5
    m = task_a.main(["--models", tiny_models["sd"], "--quick", "--data", str(tiny_data), "--outputs", str(tmp_path),
                     "--run-name", "a", "--fidelity", "alignment", "--heads", str(heads), "--no-fd", "--kinds", "single",
                     "--n-prompts", "1", "--batch-size", "1"])
    row = m["models"]["sd"]
    assert row["fidelity"] == pytest.approx(50.0, abs=1e-3) and row["fidelity_metric"].startswith("alignment")
    assert row["fd"] is None and "per_kind" not in row


def test_identical_weights_are_flagged(tiny_models, tiny_data, tmp_path):
    import shutil

    shutil.copytree(tiny_models["sd"], tmp_path / "copy")
    m = task_a.main(["--models", f"{tiny_models['sd']},{tmp_path / 'copy'}", "--quick", "--data", str(tiny_data),
                     "--outputs", str(tmp_path), "--run-name", "c", "--no-fd", "--kinds", "single",
                     "--n-prompts", "1", "--batch-size", "1"])
    assert task_a.same_weights(m) == [["sd", "copy"]]
    assert m["models"]["sd"]["fidelity"] == m["models"]["copy"]["fidelity"]  # same weights, seeds: same images
    assert "**Identical weights**: sd = copy" in (tmp_path / "task_a" / "c" / "results.md").read_text()


def test_comparison_sentence_reads_the_cis():
    rows = {"a": {"fidelity": 0.5, "fidelity_ci95": [0.4, 0.6], "sec_per_image": 2.0},
            "b": {"fidelity": 0.1, "fidelity_ci95": [0.0, 0.2], "sec_per_image": 1.0},
            "c": {"fidelity": 0.45, "fidelity_ci95": [0.3, 0.55], "sec_per_image": 3.0}}
    # Names and numbers in the order the verdict gives them: the best, those its CI separates, those it overlaps,
    # then the fastest; no other model or number.
    said = re.findall(r"\b[abc]\b|\d+\.\d+", task_a.comparison_sentence({"models": rows}))
    assert said == ["a", "0.500", "b", "c", "b", "1.000"]
    rows["b"]["fidelity_ci95"] = [0.0, 0.45]  # now every CI overlaps a's: no model is separated from it
    said = re.findall(r"\b[abc]\b|\d+\.\d+", task_a.comparison_sentence({"models": rows}))
    assert said == ["a", "0.500", "b", "1.000"]


@pytest.mark.parametrize("argv, message", [
    (["--models", "dalle"], "unknown model 'dalle': not a registry name"),
    (["--models", " , "], "--models is empty; give registry names, folders or hub ids separated by commas"),
    (["--models", "shapes-tiny,shapes-tiny"], "--models names a model twice: shapes-tiny, shapes-tiny"),
    (["--kinds", "three"], "unknown prompt kind 'three' in --kinds; choose from single, two"),
    (["--fidelity", "clip"], "unknown --fidelity 'clip'; choose one of auto, oracle, alignment"),
    (["--timed-batches", "2"], "--timed-batches must be >= 3 (a median of fewer is not a timing), got 2"),
    (["--n-prompts", "0"], "--n-prompts must be positive, got 0"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(UserError) as err:
        task_a.parse_args(argv)
    assert str(err.value).startswith(message)


def test_uncached_hub_model_offline_is_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        task_a.main(["--models", "sd-turbo", "--quick", "--data", str(tiny_data), "--outputs", str(tmp_path),
                     "--no-fd"])
    assert str(err.value) == ("model 'stabilityai/sd-turbo' is not in the local Hugging Face cache and cannot be "
                              "downloaded here: download it once while online (hf download "
                              "stabilityai/sd-turbo) or pass a local folder")


def test_alignment_without_heads(tiny_data, tmp_path):
    with pytest.raises(UserError) as err:
        task_a.main(["--quick", "--data", str(tiny_data), "--fidelity", "alignment", "--heads",
                     str(tmp_path / "none.pt"), "--outputs", str(tmp_path)])
    assert str(err.value) == f"retrieval checkpoint not found: {tmp_path / 'none.pt'} (run `python retrieval.py`)"


def test_cli_prints_one_line_and_exits_2():
    out = subprocess.run([sys.executable, "task_a.py", "--models", "dalle"], cwd=utils.REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: unknown model 'dalle': not a registry name (shapes-tiny, ")
