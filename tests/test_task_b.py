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
               "sec_per_image", "sec_per_image_median", "attributes", "experiment", "label", "timesteps"}
SHIPPED_SCHEDULER = utils.REPO / "models" / "shapes-sd-tiny" / "scheduler" / "scheduler_config.json"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    tiny_sd_pipeline(tmp / "parts", sample_size=8).save_pretrained(tmp / "sd")  # 16-px images: fast cells
    return str(tmp / "sd")


@pytest.fixture(scope="module")
def tiny_student(tiny_sd, tmp_path_factory):
    """The tiny pipeline saved with LCMScheduler: the shape of a distill.py student."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    folder = tmp_path_factory.mktemp("student") / "tiny-student"
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def quick_run(tiny_sd, tiny_student, tmp_path_factory):
    out = tmp_path_factory.mktemp("task_b")
    argv = ["--model", tiny_sd, "--quick", "--experiments", "all", "--zoo", "ddim,dpmpp_2m", "--x", "num_inference_steps=1,2",
            "--y", "guidance_scale=1:5:4", "--outputs", str(out), "--run-name", "q", "--threads", "1",
            "--student", tiny_student]
    return out / "task_b" / "q", task_b.main(argv), argv


def test_quick_run_writes_every_experiment(quick_run):
    run, metrics, _ = quick_run
    on_disk = json.loads((run / "metrics.json").read_text())
    assert (run.parent / "latest").resolve() == run.resolve()
    assert list(on_disk["experiments"]) == ["schedulers", "steps", "student", "cfg", "eta", "negative", "trajectory",
                                            "grid"]
    assert on_disk["n_prompts"] == 2 and on_disk["n_seeds"] == 2
    ex = on_disk["experiments"]
    for name in ("schedulers", "steps", "cfg", "eta", "grid"):
        for cell in ex[name]:
            assert SCORED_KEYS <= set(cell), (name, cell)
            lo, hi = cell["fidelity_ci95"]
            assert 0 <= lo <= cell["fidelity_mean"] <= hi <= 1
            assert 0 < cell["sec_per_image"] <= cell["sec_per_image_median"]
            assert cell["timed_calls"] == 1  # 4 images fill no batch of 16: one --time-repeats call
            # The model is evaluated from the top of the noise schedule (T = 1000), one timestep per step.
            assert cell["timesteps"][0] >= 900 and len(cell["timesteps"]) == cell["num_inference_steps"], cell
            assert cell["diversity"] > 0  # 2 seeds of a random-weight model are not identical images
            assert set(cell["attributes"]) == {"shape", "color", "size", "position", "count", "all"}
    assert [(c["scheduler"], c["num_inference_steps"]) for c in ex["schedulers"]] == [
        ("DDIMScheduler", 2), ("DPMSolverMultistepScheduler", 2)]
    assert [c["num_inference_steps"] for c in ex["steps"]] == [1, 2]
    # the student's curve: same steps list, its own scheduler, named by its model (a different model: new images)
    assert [(c["model"], c["scheduler"], c["num_inference_steps"]) for c in ex["student"]] == [
        ("tiny-student", "LCMScheduler", 1), ("tiny-student", "LCMScheduler", 2)]
    assert all(SCORED_KEYS <= set(c) for c in ex["student"])
    assert [c["guidance_scale"] for c in ex["cfg"]] == [1.0, 5.0]
    assert [c["eta"] for c in ex["eta"]] == [0.0, 1.0] and {c["scheduler"] for c in ex["eta"]} == {"DDIMScheduler"}
    assert [(c["num_inference_steps"], c["guidance_scale"]) for c in ex["grid"]] == [(1, 1), (1, 5), (2, 1), (2, 5)]
    # The same settings in two experiments are one cell: the same numbers, generated once.
    ddim2 = ex["schedulers"][0]  # the tiny pipeline's own scheduler is DDIM, which the steps experiment sweeps
    assert ex["steps"][1]["scheduler"] == "DDIMScheduler" and ex["steps"][1]["diversity"] == ddim2["diversity"]
    assert ex["grid"][3]["diversity"] == ex["cfg"][1]["diversity"] == ddim2["diversity"]  # 2 steps, guidance 5

    neg_off, neg_on = ex["negative"]
    assert neg_off["negative_prompt"] is None and neg_on["negative_prompt"] == "<per prompt colour>"
    assert len(neg_on["negatives"]) == 2 and all(n in task_b.gd.COLOR_NAMES for n in neg_on["negatives"])
    assert neg_on["colour_rate_drop"] == pytest.approx(neg_off["negative_colour_rate"] - neg_on["negative_colour_rate"])
    for cell in ex["trajectory"]:
        assert cell["n_frames"] == 2 and (run / cell["filmstrip"]).stat().st_size > 0
        assert cell["timesteps"][0] >= 900 and f"![trajectory {cell['label']}]({cell['filmstrip']})" in \
            (run / "findings.md").read_text()
        from PIL import Image

        assert Image.open(run / cell["gif"]).n_frames == 2
    assert {c["x0_from"][0] for c in ex["trajectory"]} == {"scheduler", "alphas_cumprod"}  # DPM++ has no x0 output

    for name in ("findings.md", "fidelity_vs_steps.png", "fidelity_vs_guidance.png", "pareto.png", "grid_grid.png",
                 "schedulers_grid.png", "cells.json", "config.json"):
        assert (run / name).stat().st_size > 0, name
    findings = (run / "findings.md").read_text()
    for heading in ("## schedulers", "## steps", "## student", "## cfg", "## eta", "## negative prompts", "## grid",
                    "## Fidelity vs time: the Pareto front", "## trajectory"):
        assert heading in findings
    best = max(ex["cfg"], key=lambda c: c["fidelity_mean"])
    assert f"Best guidance {best['guidance_scale']:g} (fidelity {best['fidelity_mean']:.3f}" in findings


def test_rerun_resumes_from_cells_json_without_generating(quick_run, monkeypatch):
    run, first, argv = quick_run
    sheet = (run / "schedulers_grid.png").read_bytes()
    monkeypatch.setattr(task_b, "generate", lambda *a, **k: pytest.fail("a finished cell was generated again"))
    again = task_b.main([a if a != "all" else "schedulers,cfg,grid" for a in argv])
    for name in ("schedulers", "cfg", "grid"):
        assert [c["fidelity_mean"] for c in again["experiments"][name]] == \
               [c["fidelity_mean"] for c in first["experiments"][name]]
    assert (run / "schedulers_grid.png").read_bytes() == sheet  # drawn again from the cells' stored images


def test_same_seed_same_image_in_any_cell_position(tiny_sd, tmp_path):
    args = task_b.parse_args(["--model", tiny_sd, "--quick", "--outputs", str(tmp_path)])
    pipe, settings = utils.load_pipeline(tiny_sd, device=utils.pick_device("cpu"))
    ctx = task_b.Context(args, pipe, settings, None, None, tmp_path, None)
    cell = {**ctx.defaults(), "scheduler": "EulerAncestralDiscreteScheduler", "num_inference_steps": 2}
    a, _, _ = task_b.generate(ctx, cell, ["a red star", "a blue ring", "a red star"], [0, 1, 0])
    b, _, _ = task_b.generate(ctx, cell, ["a red star", "a blue ring", "a red star"], [0, 1, 0])
    np.testing.assert_array_equal(a, b)  # an ancestral sampler too: its noise comes from the per-image generators
    assert np.abs(a[0].astype(int) - a[2].astype(int)).max() <= 1
    assert np.abs(a[0].astype(int) - a[1].astype(int)).mean() > 1


def test_a_cells_own_batches_are_timed_and_time_repeats_adds_calls(tiny_sd, tmp_path):
    args = task_b.parse_args(["--model", tiny_sd, "--quick", "--outputs", str(tmp_path), "--batch-size", "2",
                              "--time-repeats", "1"])
    pipe, settings = utils.load_pipeline(tiny_sd, device=utils.pick_device("cpu"))
    ctx = task_b.Context(args, pipe, settings, None, None, tmp_path, None)
    cell = {**ctx.defaults(), "num_inference_steps": 2}
    texts, seeds = ["a red star", "a blue ring", "a red star", "a cyan cross", "a pink moon"], [0, 1, 0, 2, 3]
    images, _, batch_times = task_b.generate(ctx, cell, texts, seeds)
    assert len(images) == 5 and len(batch_times) == 2  # two full batches of 2 timed; the short last one is not
    timing = task_b.time_cell(ctx, cell, texts, seeds, batch_times)
    assert timing["timed_calls"] == 3 and timing["timed_batch"] == 2  # and one more call on the first batch
    assert 0 < timing["sec_per_image"] <= min(batch_times) / 2  # the fastest of all 3 calls
    assert timing["sec_per_image"] <= timing["sec_per_image_median"]


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
    (["--experiments", "schedulers,fancy"], "unknown experiment 'fancy'; valid: schedulers, steps, student, cfg, eta, "
                                            "negative, trajectory, grid, cell, all"),
    (["--experiments", "grid"], "the grid experiment needs --x (and optionally --y)"),
    (["--experiments", "grid", "--x", "guidance_scale=1:9"], "malformed range '1:9'"),
    (["--experiments", "grid", "--x", "eta=0,1", "--y", "eta=0:1:1"], "--x and --y sweep the same argument 'eta'"),
    (["--steps-list", "1,two"], "argument --steps-list: must be comma-separated ints >= 1, got 'two'"),
    (["--fidelity-key", "vibe"], "unknown --fidelity-key 'vibe'; choose one of all, shape, color"),
    (["--model", "dalle"], "unknown model 'dalle': not a registry name"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(UserError) as err:
        task_b.parse_args(argv)
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("axis, message, then", [  # the message starts with `message`; `then` follows later
    ("guidance_scal=1,2", "StableDiffusionPipeline does not accept 'guidance_scal'; sweepable: scheduler, pipeline "
                          "arguments (height, width, num_inference_steps, ", "), scheduler arguments ("),
    ("generator=1,2", "'generator' is set by task_b itself", "cannot be swept"),
    ("scheduler=ddim,nope", "unknown scheduler 'nope'", "; valid: "),
    ("num_inference_steps=0.5,1", "num_inference_steps must be a positive integer", ", got 0.5"),
])
def test_grid_arguments_the_pipeline_does_not_accept(tiny_sd, tmp_path, axis, message, then):
    with pytest.raises(UserError) as err:
        task_b.main(["--model", tiny_sd, "--quick", "--experiments", "grid", "--x", axis, "--outputs", str(tmp_path)])
    assert str(err.value).startswith(message) and then in str(err.value)[len(message):]


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


# --------------------------------------------------------------------------- issue 12: the scheduler zoo
def _zoo_configs():
    """The shipped model's config (DPM-Solver++, "linspace") and a tiny pipeline's DDIM one ("leading" by default)."""
    from diffusers import DDIMScheduler

    return [json.loads(SHIPPED_SCHEDULER.read_text()),
            dict(DDIMScheduler(beta_schedule="scaled_linear", set_alpha_to_one=False).config)]


@pytest.mark.parametrize("steps", [1, 2, 3, 12])
@pytest.mark.parametrize("name", list(task_b.SCHEDULERS))
def test_every_zoo_scheduler_starts_at_the_top_of_the_noise_schedule(name, steps):
    for config in _zoo_configs():
        sched = utils.make_scheduler(task_b.SCHEDULERS[name], config)
        sched.set_timesteps(steps)
        assert float(sched.timesteps[0]) >= 0.9 * sched.config.num_train_timesteps, (config["_class_name"], list(
            sched.timesteps))


def _landings(sched, steps: int) -> tuple[list[int], list[int]]:
    """(evaluated timesteps, the timestep each step moved the sample to), read off step()'s output.

    With a zero epsilon prediction, x_t = sqrt(alpha_bar_t) * 1 is noise-free, and a step to s returns
    sqrt(alpha_bar_s) * 1: the level the sample landed on, whatever formula step() used to pick s. -1 = clean.
    """
    sched.set_timesteps(steps)
    ac = sched.alphas_cumprod
    evaluated = [int(t) for t in sched.timesteps]
    landed = []
    for t in evaluated:
        sample = ac[t].sqrt() * torch.ones(1, 4, 2, 2)
        level = float(sched.step(torch.zeros_like(sample), t, sample).prev_sample.mean()) ** 2
        landed.append(-1 if level > float(ac[0]) + 1e-6 else int(torch.argmin((ac - level).abs())))
    return evaluated, landed


@pytest.mark.parametrize("steps", [1, 2, 3, 12])
@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler"])
def test_ddim_and_pndm_steps_land_on_the_next_evaluated_timestep(name, steps):
    config = json.loads(SHIPPED_SCHEDULER.read_text())
    evaluated, landed = _landings(utils.make_scheduler(name, config, prediction_type="epsilon"), steps)
    # Within one training timestep: diffusers' step() moves by T // steps, "trailing" rounds T / steps; the end
    # (-1) is the clean sample, which PNDM reaches as alpha_bar_0.
    assert all(abs(a - b) <= 1 for a, b in zip(landed, evaluated[1:] + [-1])), (evaluated, landed)
    if steps == 3:  # the spacing the shipped config would have given it: step() lands 166 timesteps off
        evaluated, landed = _landings(utils.make_scheduler(name, config, prediction_type="epsilon",
                                                           timestep_spacing="linspace"), steps)
        assert max(abs(a - b) for a, b in zip(landed, evaluated[1:] + [-1])) > 100


def test_a_swept_spacing_wins_over_the_zoo_spacing():
    config = json.loads(SHIPPED_SCHEDULER.read_text())
    sched = utils.make_scheduler("DDIMScheduler", config, timestep_spacing="leading")
    sched.set_timesteps(3)
    assert sched.config.timestep_spacing == "leading" and list(sched.timesteps) == [667, 334, 1]


# --------------------------------------------------------------------------- issue 12: grid axes
# Two values the tiny SD pipeline takes for every axis the grid offers it (a new axis must be added here).
AXIS_VALUES = {
    "scheduler": "ddim,euler", "height": "32,64", "width": "48,64", "num_inference_steps": "1,2",
    "guidance_scale": "1,3", "negative_prompt": "none,red", "eta": "0,1", "guidance_rescale": "0,0.5",
    "beta_end": "0.012,0.02", "beta_schedule": "linear,scaled_linear",
    "beta_start": "0.0001,0.00085", "clip_sample": "true,false", "clip_sample_range": "1,2",
    "dynamic_thresholding_ratio": "0.9,0.995", "num_train_timesteps": "500,1000",
    "prediction_type": "epsilon,v_prediction", "rescale_betas_zero_snr": "false,true", "sample_max_value": "1,2",
    "set_alpha_to_one": "true,false", "steps_offset": "0,1", "thresholding": "false,true",
    "timestep_spacing": "leading,trailing",
}


@pytest.fixture(scope="module")
def grid_ctx(tiny_sd, tmp_path_factory):
    """A task_b context on the tiny pipeline: 1 prompt x 1 seed, 2 steps, one timed call per cell."""
    out = tmp_path_factory.mktemp("axes")
    args = task_b.parse_args(["--model", tiny_sd, "--quick", "--n-prompts", "1", "--seeds", "1", "--time-repeats",
                              "1", "--experiments", "grid", "--x", "eta=0,1", "--outputs", str(out)])
    device = utils.pick_device("cpu")
    pipe, settings = utils.load_pipeline(tiny_sd, device=device)
    oracle = task_b.Oracle.load(args.oracle, device)
    encoder = utils.load_image_encoder(utils.DEFAULT_IMAGE_ENCODER, device)
    return task_b.Context(args, pipe, settings, oracle, encoder, out, None)


def test_every_offered_grid_axis_runs_with_two_values(grid_ctx):
    call, sched = task_b.sweepable(grid_ctx.pipe)
    assert set(AXIS_VALUES) == {"scheduler", *call, *sched}
    # clip_skip is offered only where the installed diffusers + transformers can run it (see broken_arguments).
    assert ("clip_skip" in call) == hasattr(grid_ctx.pipe.text_encoder, "text_model")
    for name, values in AXIS_VALUES.items():
        grid_ctx.args.axes = [task_b.parse_axis(f"{name}={values}")]
        task_b.check_cells(grid_ctx, task_b.grid_cells(grid_ctx))
        cells = task_b.exp_grid(grid_ctx)
        assert [c.get("error") for c in cells] == [None, None], name
        assert len({c["label"] for c in cells}) == 2 and all(c["timesteps"] for c in cells), name


@pytest.mark.parametrize("axis, message", [
    ("height=60,64", "height must be a positive integer divisible by 8 (the VAE's latent grid), got 60"),
    ("width=0", "width must be a positive integer divisible by 8"),
    ("guidance_scale=-1,5", "guidance_scale must be a number >= 0, got -1"),
    ("eta=fast", "eta must be a number >= 0 (0 = deterministic DDIM), got 'fast'"),
    ("timestep_spacing=sideways", "timestep_spacing must be one of leading, trailing, linspace, got 'sideways'"),
    ("timesteps=1,2", "'timesteps' takes a list (list[int]), and a grid cell holds one value per argument"),
    ("guidance_rescale=0,0.5,-1", "guidance_rescale must be a number >= 0 (0 = off), got -1"),
    ("num_inference_steps=2,2000", "grid cell num_inference_steps=2000 fails, so no cell ran: ValueError: "
                                   "`num_inference_steps`: 2000 cannot be larger than"),
])
def test_a_bad_grid_value_is_one_line_before_any_cell_runs(tiny_sd, tmp_path, axis, message):
    with pytest.raises(UserError) as err:
        task_b.main(["--model", tiny_sd, "--quick", "--experiments", "grid", "--x", axis, "--outputs", str(tmp_path),
                     "--run-name", "bad"])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "task_b" / "bad" / "cells.json").exists()


def test_a_run_with_a_failed_cell_ends_with_an_error_listing_it(tiny_sd, tmp_path, monkeypatch):
    real = task_b.generate

    def fails_at_two_steps(ctx, settings, *a, **k):
        if settings["num_inference_steps"] == 2:
            raise RuntimeError("out of memory\n" + "a long config dump\n" * 40)
        return real(ctx, settings, *a, **k)

    monkeypatch.setattr(task_b, "generate", fails_at_two_steps)
    with pytest.raises(UserError) as err:
        task_b.main(["--model", tiny_sd, "--quick", "--experiments", "grid", "--x", "num_inference_steps=1,2",
                     "--outputs", str(tmp_path), "--run-name", "f", "--seeds", "1", "--n-prompts", "1"])
    assert "\n" not in str(err.value)
    assert str(err.value).startswith("1 of 2 cells failed (listed in ") and str(err.value).endswith(
        "grid num_inference_steps=2: RuntimeError: out of memory")
    run = tmp_path / "task_b" / "f"
    cells = json.loads((run / "metrics.json").read_text())["experiments"]["grid"]
    assert "error" not in cells[0] and cells[1]["error"] == "RuntimeError: out of memory"
    assert "## Cells that failed" in (run / "findings.md").read_text()


# --------------------------------------------------------------------------- issue 12: cells without effect
def test_settings_that_cannot_change_the_image_are_marked_and_not_ranked(tiny_sd, tmp_path):
    m = task_b.main(["--model", tiny_sd, "--quick", "--experiments", "grid", "--x", "scheduler=ddim,euler", "--y",
                     "eta=0,1", "--outputs", str(tmp_path), "--run-name", "n", "--seeds", "2", "--n-prompts", "1"])
    cells = {c["label"]: c for c in m["experiments"]["grid"]}
    assert "no_effect" not in cells["scheduler=ddim eta=0"] and "no_effect" not in cells["scheduler=ddim eta=1"]
    assert cells["scheduler=euler eta=1"]["no_effect"].startswith("euler's step() takes no eta")
    findings = (tmp_path / "task_b" / "n" / "findings.md").read_text()
    assert "- grid scheduler=euler eta=1: euler's step() takes no eta" in findings
    assert "scheduler=euler eta=1" not in findings.split("## Fidelity vs time")[1].split("##")[0]  # not on the front
    on_disk = json.loads((tmp_path / "task_b" / "n" / "metrics.json").read_text())
    assert on_disk["experiments"]["grid"][3]["no_effect"] == cells["scheduler=euler eta=1"]["no_effect"]


def test_same_images_or_a_negative_prompt_without_guidance_mark_no_effect(grid_ctx):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    off_by_one, changed = base.copy(), base.copy()
    off_by_one[0, 0, 0, 0] ^= 1  # float rounding between two samplers that compute the same thing
    changed[0, 0, 0, 0] = (int(changed[0, 0, 0, 0]) + 9) % 256
    cell = {"scheduler": "DDIMScheduler", "num_inference_steps": 2, "guidance_scale": 5.0, "fidelity_mean": 0.5}
    cells = [dict(cell, label=name) for name in ("a", "b", "c")]
    cells.append(dict(cell, label="d", guidance_scale=1.0, negative_prompt="red"))
    for c, images in zip(cells, (base, off_by_one, changed, changed + 50)):
        grid_ctx.images[c["label"] + "|t"] = images
    task_b.mark_no_effect(grid_ctx, "t", cells)
    assert [c.get("no_effect") for c in cells[:3]] == [None, "the same images as a", None]
    assert cells[3]["no_effect"].startswith("a negative prompt at guidance_scale 1 is never used")
    assert [c["label"] for c in task_b.ranked(cells)] == ["a", "c"]


# --------------------------------------------------------------------------- issue 12: timings
def test_time_call_warms_up_then_repeats_and_reports_the_fastest():
    import time

    calls = []

    def work():
        calls.append(len(calls))
        time.sleep(0.002 * (len(calls) % 3))
        return len(calls)

    timing, result = utils.time_call(work, warmup=2, repeats=3)
    assert len(calls) == 5 and result == 5  # 2 untimed warm-up calls, then 3 timed; the last result comes back
    assert len(timing["warmup_s"]) == 2 and len(timing["times_s"]) == 3
    assert timing["min_s"] == min(timing["times_s"]) <= timing["median_s"] == float(np.median(timing["times_s"]))
    timing, _ = utils.time_call(lambda: time.sleep(0.01), warmup=0, repeats=1, min_seconds=0.05)
    assert len(timing["times_s"]) >= 2 and sum(timing["times_s"]) >= 0.05  # repeats until min_seconds is timed
    with pytest.raises(UserError, match="time_call needs repeats >= 1"):
        utils.time_call(work, repeats=0)
