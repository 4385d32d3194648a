"""distill.py: the consistency-distilled student is a standard pipeline that samples in a few steps; its
boundary condition, x0/noise conversions and teacher step agree with diffusers' schedulers; resume; bad inputs."""

import json

import numpy as np
import pytest
import torch

import distill
from utils import UserError


def run(teacher, data, tmp, *extra):
    return distill.main(["--quick", "--teacher", str(teacher), "--out", str(tmp / "student"), "--data", str(data),
                         "--split", "train", "--ckpt-dir", str(tmp / "ckpt"), "--outputs", str(tmp / "out"),
                         "--run-name", "r", "--threads", "1", *extra])


def test_quick_student_loads_as_a_plain_pipeline_and_samples_in_two_steps(tiny_model, tiny_data, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline

    m = run(tiny_model, tiny_data, tmp_path, "--lr", "0.05")  # a large step, so 3 steps visibly move the weights
    assert m["steps"] == distill.QUICK["max_steps"] and m["resumed_from_step"] == 0
    assert json.loads((tmp_path / "out" / "distill" / "r" / "metrics.json").read_text())["steps"] == m["steps"]
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "student")
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    pipe.set_progress_bar_config(disable=True)

    def sample(seed):
        return pipe("a red star", num_inference_steps=2, guidance_scale=1.0, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images

    a, b, c = sample(0), sample(0), sample(1)
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    log = json.loads((tmp_path / "student" / "distill_log.json").read_text())
    assert log["recommended"] == {"steps": 4, "guidance": 1.0, "scheduler": "LCMScheduler"}
    # the student's UNet moved away from the teacher's (the copy it started from)
    teacher = DiffusionPipeline.from_pretrained(tiny_model).unet.state_dict()
    student = pipe.unet.state_dict()
    assert any(not torch.allclose(teacher[k].float(), student[k].float(), atol=1e-3) for k in teacher)
    card = (tmp_path / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "\n# student\n" in card
    assert "num_inference_steps=4," in card and "3 steps of batch 4" in card and "## Fidelity\nNot measured yet" in card
    # resume: the same command with more steps continues from the saved state
    again = run(tiny_model, tiny_data, tmp_path, "--lr", "0.05", "--max-steps", "4", "--run-name", "r2")
    assert again["resumed_from_step"] == 3 and again["steps"] == 4
    # evaluate-model --write-card measures the student and rebuilds its card with the numbers
    import fidelity

    m = fidelity.main(["evaluate-model", "--model", str(tmp_path / "student"), "--n-prompts", "2", "--kinds",
                       "single", "--n-fd", "0", "--heads", "", "--grid-rows", "1", "--data", str(tiny_data),
                       "--device", "cpu", "--outputs", str(tmp_path / "out"), "--write-card"])
    card = (tmp_path / "student" / "README.md").read_text()
    assert "## Fidelity (measured; targets NOT met)" in card and "4 steps of batch 4" in card
    assert "LCMScheduler 4 steps, guidance 1.0" in card  # a student folder is sampled as its log recommends
    assert json.loads((tmp_path / "student" / "metrics.json").read_text())["single_object"] == m["single_object"]


def test_card_compares_the_student_with_its_teacher_and_says_how_its_length_was_chosen():
    log = {"teacher": "models/t", "selection": "Step 600 of 200, 400, 600, chosen on seed-1 prompts."}
    vs = {"single": {"mean": -0.04, "ci95": [-0.1, 0.02], "n": 200}, "two": {"mean": 0.0, "ci95": [-0.01, 0.01]}}
    text = distill._vs_teacher_section(log, {"vs_teacher": vs})
    assert "minus `models/t`'s" in text and "single -0.040 [-0.100, +0.020], two +0.000 [-0.010, +0.010]" in text
    assert text.endswith("within 0.05 of the teacher: met on the point estimates.\n")
    vs["single"]["mean"] = -0.06
    assert "NOT met" in distill._vs_teacher_section(log, {"vs_teacher": vs})
    assert distill._vs_teacher_section(log, None) == "" and distill._vs_teacher_section(log, {"vs_teacher": None}) == ""
    assert distill._selection_section(log) == f"\n## Distillation length\n{log['selection']}\n"
    assert distill._selection_section({}) == ""


def test_boundary_scalings_match_diffusers_lcm_scheduler():
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    for t in (0, 19, 499, 999):
        c_skip, c_out = distill.boundary_scalings(torch.tensor([t]))
        ref_skip, ref_out = sched.get_scalings_for_boundary_condition_discrete(t)
        assert float(c_skip) == pytest.approx(ref_skip, rel=1e-5) and float(c_out) == pytest.approx(ref_out, rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_teacher_step_with_guidance_1_is_diffusers_ddim_step(prediction_type):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type=prediction_type,
                          clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
    sched.set_timesteps(50)  # DDIM's previous timestep is t - 1000 // 50 = t - 20, the distiller's grid spacing
    gen = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = 399
    a_t, a_prev = sched.alphas_cumprod[t].view(1, 1, 1, 1), sched.alphas_cumprod[t - 20].view(1, 1, 1, 1)
    ours = distill.guided_ddim_step(out, torch.zeros_like(out), x_t, a_t, a_prev, 1.0, prediction_type)
    ref = sched.step(out, t, x_t, eta=0.0)
    assert torch.allclose(ours, ref.prev_sample, atol=1e-5)
    x0, _ = distill.x0_and_eps(out, x_t, a_t, prediction_type)
    assert torch.allclose(x0, ref.pred_original_sample, atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--target-ema", "1"], r"^--target-ema must be in \(0, 1\), got 1\.0$"),
    (["--batch-size", "0"], r"^--batch-size must be > 0, got 0$"),
    (["--guidance", "0.5"], r"^--guidance must be >= 1, got 0\.5$"),
])
def test_bad_arguments_are_one_line(tiny_model, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        distill.parse_args(["--teacher", str(tiny_model), "--out", str(tmp_path / "s"), *extra])


def test_missing_teacher_and_out_over_the_teacher(tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"is not a diffusers pipeline folder \(no model_index\.json\)$"):
        distill.parse_args(["--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "s")])
    with pytest.raises(UserError, match=r"^--out must not be the teacher's folder$"):
        distill.parse_args(["--teacher", str(tiny_model), "--out", str(tiny_model)])
