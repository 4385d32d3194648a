"""task_b.py: every experiment end to end on a tiny SD pipeline, SDXL / SD3 paths, grid syntax, x0, findings, inputs."""

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import task_b
import utils
from tiny_models import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from utils import UserError

SCORED_KEYS = {"scheduler", "num_inference_steps", "guidance_scale", "fidelity_mean", "fidelity_ci95", "diversity",
               "sec_per_image", "attributes", "experiment", "label"}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(tmp / "parts").save_pretrained(tmp / "sd")
    return str(tmp / "sd")


@pytest.fixture(scope="module")
def quick_run(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("task_b")
    argv = ["--model", tiny_sd, "--quick", "--experiments", "all", "--zoo", "ddim,dpmpp_2m", "--x", "num_inference_steps=1,2",
            "--y", "guidance_scale=1:5:4", "--outputs", str(out), "--run-name", "q", "--threads", "1"]
    return out / "task_b" / "q", task_b.main(argv), argv


def test_quick_run_writes_every_experiment(quick_run):
    run, metrics, _ = quick_run
    on_disk = json.loads((run / "metrics.json").read_text())
    assert (run.parent / "latest").resolve() == run.resolve()
    assert list(on_disk["experiments"]) == ["schedulers", "steps", "cfg", "eta", "negative", "trajectory", "grid"]
    assert on_disk["n_prompts"] == 2 and on_disk["n_seeds"] == 2
    ex = on_disk["experiments"]
    for name in ("schedulers", "steps", "cfg", "eta", "grid"):
        for cell in ex[name]:
            assert SCORED_KEYS <= set(cell), (name, cell)
            lo, hi = cell["fidelity_ci95"]
            assert 0 <= lo <= cell["fidelity_mean"] <= hi <= 1 and cell["sec_per_image"] > 0
            assert cell["diversity"] > 0  # 2 seeds of a random-weight model are not identical images
            assert set(cell["attributes"]) == {"shape", "color", "size", "position", "count", "all"}
    assert [(c["scheduler"], c["num_inference_steps"]) for c in ex["schedulers"]] == [
        ("DDIMScheduler", 2), ("DPMSolverMultistepScheduler", 2)]
    assert [c["num_inference_steps"] for c in ex["steps"]] == [1, 2]
    assert [c["guidance_scale"] for c in ex["cfg"]] == [1.0, 5.0]
    assert [c["eta"] for c in ex["eta"]] == [0.0, 1.0] and {c["scheduler"] for c in ex["eta"]} == {"DDIMScheduler"}
    assert [(c["num_inference_steps"], c["guidance_scale"]) for c in ex["grid"]] == [(1, 1), (1, 5), (2, 1), (2, 5)]
    # The same settings in two experiments are one cell: the same numbers, generated once.
    ddim2 = ex["schedulers"][0]  # the tiny pipeline's own scheduler is DDIM, which the steps experiment sweeps
    assert ex["steps"][1]["scheduler"] == "DDIMScheduler" and ex["steps"][1]["diversity"] == ddim2["diversity"]
    assert ex["grid"][3]["diversity"] == ex["cfg"][1]["diversity"] == ddim2["diversity"]  # 2 steps, guidance 5

    neg_off, neg_on = ex["negative"]
    assert neg_off["negative_prompt"] is None and neg_on["negative_prompt"] == "<per prompt colour>"
    assert len(neg_on["negatives"]) == 2 and all(n in task_b.fidelity.COLOR_NAMES for n in neg_on["negatives"])
    assert neg_on["colour_rate_drop"] == pytest.approx(neg_off["negative_colour_rate"] - neg_on["negative_colour_rate"])
    for cell in ex["trajectory"]:
        assert cell["n_frames"] == 2 and (run / cell["filmstrip"]).stat().st_size > 0
        from PIL import Image

        assert Image.open(run / cell["gif"]).n_frames == 2
    assert {c["x0_from"][0] for c in ex["trajectory"]} == {"scheduler", "alphas_cumprod"}  # DPM++ has no x0 output

    for name in ("findings.md", "fidelity_vs_steps.png", "fidelity_vs_guidance.png", "pareto.png", "grid_grid.png",
                 "schedulers_grid.png", "cells.json", "config.json"):
        assert (run / name).stat().st_size > 0, name
    findings = (run / "findings.md").read_text()
    for heading in ("## schedulers", "## steps", "## cfg", "## eta", "## negative prompts", "## grid",
                    "## Fidelity vs time: the Pareto front", "## trajectory"):
        assert heading in findings
    best = max(ex["cfg"], key=lambda c: c["fidelity_mean"])
    assert f"Best guidance {best['guidance_scale']:g} (fidelity {best['fidelity_mean']:.3f}" in findings


def test_rerun_resumes_from_cells_json_without_generating(quick_run, monkeypatch):
    run, first, argv = quick_run
    monkeypatch.setattr(task_b, "generate", lambda *a, **k: pytest.fail("a finished cell was generated again"))
    again = task_b.main([a if a != "all" else "schedulers,cfg,grid" for a in argv])
    for name in ("schedulers", "cfg", "grid"):
        assert [c["fidelity_mean"] for c in again["experiments"][name]] == \
               [c["fidelity_mean"] for c in first["experiments"][name]]


def test_same_seed_same_image_in_any_cell_position(tiny_sd, tmp_path):
    args = task_b.parse_args(["--model", tiny_sd, "--quick", "--outputs", str(tmp_path)])
    pipe, settings = utils.load_pipeline(tiny_sd, device=utils.pick_device("cpu"))
    ctx = task_b.Context(args, pipe, settings, None, None, tmp_path, None)
    cell = {**ctx.defaults(), "scheduler": "EulerAncestralDiscreteScheduler", "num_inference_steps": 2}
    a, _ = task_b.generate(ctx, cell, ["a red star", "a blue ring", "a red star"], [0, 1, 0])
    b, _ = task_b.generate(ctx, cell, ["a red star", "a blue ring", "a red star"], [0, 1, 0])
    np.testing.assert_array_equal(a, b)  # an ancestral sampler too: its noise comes from the per-image generators
    assert np.abs(a[0].astype(int) - a[2].astype(int)).max() <= 1
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 1


@pytest.mark.parametrize("make", [tiny_sdxl_pipeline, tiny_sd3_pipeline], ids=["sdxl", "sd3"])
def test_hub_pipeline_classes_run_a_cell_and_a_trajectory(make, tmp_path):
    make(tmp_path / "parts").save_pretrained(tmp_path / "pipe")
    m = task_b.main(["--model", str(tmp_path / "pipe"), "--quick", "--experiments", "cell,trajectory", "--steps", "2",
                     "--guidance", "3", "--zoo", "euler,FlowMatchEulerDiscrete", "--outputs", str(tmp_path),
                     "--run-name", "h"])
    (cell,) = m["experiments"]["cell"]
    assert cell["num_inference_steps"] == 2 and cell["guidance_scale"] == 3.0 and cell["sec_per_image"] > 0
    (traj,) = m["experiments"]["trajectory"]  # the zoo entry that does not fit the pipeline is skipped
    expected = {"sdxl": ("EulerDiscreteScheduler", "scheduler"), "sd3": ("FlowMatchEulerDiscreteScheduler", "flow sigma")}
    name = "sdxl" if make is tiny_sdxl_pipeline else "sd3"
    assert (traj["scheduler"], traj["x0_from"][0]) == expected[name] and traj["n_frames"] == 2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_from_alphas_cumprod_matches_ddim_own_estimate(prediction_type):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    t = sched.timesteps[3]
    out = sched.step(model_output, t, sample)
    ours, how = task_b.predicted_x0(sched, model_output, t, sample, argparse.Namespace())  # no pred_original_sample
    assert how == "alphas_cumprod"
    torch.testing.assert_close(ours, out.pred_original_sample)
    theirs, how = task_b.predicted_x0(sched, model_output, t, sample, out)
    assert how == "scheduler" and theirs is out.pred_original_sample


@pytest.mark.parametrize("text, name, values", [
    ("guidance_scale=1:9:2", "guidance_scale", [1, 3, 5, 7, 9]),
    ("num_inference_steps=5,10,20", "num_inference_steps", [5, 10, 20]),
    ("eta=0:1:0.25", "eta", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("guidance_scale=1:2:0.5,7", "guidance_scale", [1.0, 1.5, 2.0, 7]),
    ("scheduler=ddim,euler_a", "scheduler", ["ddim", "euler_a"]),
    (" use_karras_sigmas = true,false ", "use_karras_sigmas", [True, False]),
])
def test_parse_axis(text, name, values):
    got = task_b.parse_axis(text)
    assert got == (name, values) and [type(v) for v in got[1]] == [type(v) for v in values]


@pytest.mark.parametrize("text, message", [
    ("guidance_scale", "malformed sweep 'guidance_scale': write --x name=v1,v2,... or --x name=start:stop:step"),
    ("=5", "malformed sweep '=5'"),
    ("guidance_scale=1,,3", "malformed sweep 'guidance_scale=1,,3': empty value"),
    ("guidance_scale=1:9", "malformed range '1:9' in 'guidance_scale=1:9': a range is start:stop:step"),
    ("guidance_scale=9:1:2", "malformed range '9:1:2' in 'guidance_scale=9:1:2': needs step > 0 and stop >= start"),
    ("guidance_scale=1:9:0", "malformed range '1:9:0' in 'guidance_scale=1:9:0': needs step > 0"),
    ("guidance_scale=1:a:2", "malformed range '1:a:2' in 'guidance_scale=1:a:2': start, stop and step must be numbers"),
])
def test_malformed_sweep_syntax(text, message):
    with pytest.raises(UserError) as err:
        task_b.parse_axis(text)
    assert str(err.value).startswith(message)


def test_fewest_steps_and_pareto_front_by_hand():
    def cell(s, f, t, name="A"):
        return {"scheduler": name, "num_inference_steps": s, "fidelity_mean": f, "fidelity_ci95": [f - .1, f + .1],
                "sec_per_image": t, "label": f"{name}{s}", "experiment": "x"}

    cells = [cell(2, 0.2, 1), cell(5, 0.58, 2), cell(10, 0.6, 4), cell(20, 0.55, 8),
             cell(5, 0.0, 2, "B"), cell(10, 0.0, 4, "B")]
    r = task_b.fewest_steps_to_95(cells)
    assert r["A"]["best"] == 0.6 and r["A"]["best_steps"] == 10 and r["A"]["steps_to_95"] == 5  # 0.58 >= 0.57
    assert r["B"]["steps_to_95"] is None and r["B"]["best_steps"] is None  # best 0: undefined, not "5 steps"
    assert [c["label"] for c in task_b.pareto_front(cells)] == ["A2", "A5", "A10"]
    best, tied = task_b.indistinguishable_from_best(cells)
    assert best["label"] == "A10" and {c["label"] for c in tied} == {"A5", "A10", "A20"}


def test_sweep_yaml_parameters_are_task_b_flags():
    import yaml

    sweep = yaml.safe_load((utils.REPO / "sweeps" / "task_b.yaml").read_text())
    assert sweep["program"] == "task_b.py" and sweep["method"] == "grid"
    assert set(sweep["parameters"]) == {"scheduler", "steps", "guidance"}
    flags = set(task_b.build_parser()._option_string_actions)
    for name, spec in sweep["parameters"].items():
        assert f"--{name}" in flags, name
        assert len(spec["values"]) >= 3
    for value in sweep["parameters"]["scheduler"]["values"]:
        task_b.resolve_scheduler(value)  # raises on a name task_b would reject
    assert "--wandb" in sweep["command"] and "${args}" in sweep["command"]
    # One sweep run's arguments parse into the single-cell experiment.
    args = task_b.parse_args(["--scheduler=euler_a", "--steps=10", "--guidance=5.0"])
    assert args.experiments == ["cell"] and args.scheduler == "EulerAncestralDiscreteScheduler"


@pytest.mark.parametrize("argv, message", [
    (["--scheduler", "magic"], "unknown scheduler 'magic'; valid: ddim, ddpm, pndm, euler, euler_a, dpmpp_2m, unipc, "
                               "heun or a diffusers class (AmusedScheduler, "),
    (["--zoo", "ddim,warp"], "unknown scheduler 'warp'; valid: ddim, "),
    (["--experiments", "schedulers,fancy"], "unknown experiment 'fancy'; valid: schedulers, steps, cfg, eta, "
                                            "negative, trajectory, grid, cell, all"),
    (["--experiments", "grid"], "the grid experiment needs --x (and optionally --y)"),
    (["--experiments", "grid", "--x", "guidance_scale=1:9"], "malformed range '1:9'"),
    (["--experiments", "grid", "--x", "eta=0,1", "--y", "eta=0:1:1"], "--x and --y sweep the same argument 'eta'"),
    (["--steps-list", "1,two"], "--steps-list must be comma-separated ints, got '1,two'"),
    (["--fidelity-key", "vibe"], "unknown --fidelity-key 'vibe'; choose one of all, shape, color"),
    (["--model", "dalle"], "unknown model 'dalle': not a registry name"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(UserError) as err:
        task_b.parse_args(argv)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("axis, message", [
    ("guidance_scal=1,2", "StableDiffusionPipeline does not accept 'guidance_scal'; sweepable: scheduler, pipeline "
                          "arguments (height, width, num_inference_steps, "),
    ("generator=1,2", "'generator' is set by task_b itself"),
    ("scheduler=ddim,nope", "unknown scheduler 'nope'"),
    ("num_inference_steps=0.5,1", "num_inference_steps must be positive integers, got [0.5, 1]"),
])
def test_grid_arguments_the_pipeline_does_not_accept(tiny_sd, tmp_path, axis, message):
    with pytest.raises(UserError) as err:
        task_b.main(["--model", tiny_sd, "--quick", "--experiments", "grid", "--x", axis, "--outputs", str(tmp_path)])
    assert str(err.value).startswith(message)
    assert "scheduler arguments (" in str(err.value) or not message.startswith("StableDiffusionPipeline")


def test_scheduler_that_does_not_fit_the_pipeline(tmp_path):
    tiny_sd3_pipeline(tmp_path / "parts").save_pretrained(tmp_path / "sd3")
    with pytest.raises(UserError) as err:
        task_b.main(["--model", str(tmp_path / "sd3"), "--quick", "--scheduler", "ddim", "--outputs", str(tmp_path)])
    assert str(err.value) == ("scheduler DDIMScheduler does not fit StableDiffusion3Pipeline's "
                              "FlowMatchEulerDiscreteScheduler; compatible: FlowMatchEulerDiscreteScheduler")


def test_uncached_hub_model_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        task_b.main(["--model", "sdxl-turbo", "--quick", "--outputs", str(tmp_path)])
    assert str(err.value).startswith("model 'stabilityai/sdxl-turbo' is not in the local Hugging Face cache")


def test_cli_prints_one_line_and_exits_2():
    out = subprocess.run([sys.executable, "task_b.py", "--experiments", "fancy"], cwd=utils.REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: unknown experiment 'fancy'; valid: ")
