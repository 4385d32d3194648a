"""Latent consistency distillation: a few-step student (1-4 steps) of a shapes text-to-image model.

The method is latent consistency distillation (Luo et al. 2023, "Latent Consistency Models", arXiv:2310.04378),
in the form of LCM-LoRA (arXiv:2311.05556) but with every UNet weight trained: the student starts as a copy of
the teacher's UNet; at each step a training latent is noised to a timestep t of a 50-step DDIM grid, the teacher
takes one classifier-free-guided DDIM step from t to t - 20 (guidance scale --guidance, distilled into the
student, which then samples without CFG), and the student's consistency output at t is pulled (pseudo-Huber) to
an EMA copy of itself at t - 20. The text encoder, tokenizer and autoencoder are the teacher's, unchanged. The
result is a standard StableDiffusionPipeline folder whose saved scheduler is diffusers' LCMScheduler, so
`DiffusionPipeline.from_pretrained(folder)` samples it in 1-4 steps with guidance_scale 1 (no CFG).

Commands:
    python distill.py --quick --teacher <pipeline folder> --out /tmp/turbo       # smoke run, < 1 min on CPU
    python distill.py --teacher models/shapes-sd-tiny --out models/shapes-sd-tiny-turbo --cpu-minutes 30 \
        --threads 1                                                                # the shipped student
Run the same command again to resume from <ckpt-dir>/state.pt (Ctrl-C saves it before exiting). Each run also
writes outputs/distill/<run>/{config,metrics}.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import train_diffusion as td
from utils import (DEFAULT_DATA, check, cli, common_args, parse_checked, pick_device, read_json, repo_path,
                   set_seed, start_run, write_json, write_text)

QUICK = dict(max_steps=3, batch_size=4, max_images=32, ckpt_every=2, eval_images=8)
SIGMA_DATA, TIMESTEP_SCALING, HUBER_C = 0.5, 10.0, 0.001  # LCM's boundary condition and loss constants


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True,
                   help="the teacher's pipeline folder (StableDiffusionPipeline)")
    p.add_argument("--out", type=Path, required=True, help="student pipeline folder to write")
    p.add_argument("--ckpt-dir", type=Path, default=None,
                   help="resumable state (default: checkpoints/distill/<--out's name>)")
    p.add_argument("--data", type=Path, nargs="+", default=[DEFAULT_DATA], help="data.pkl file(s) to distil on")
    p.add_argument("--split", default="pretrain", help="split whose images and captions are used")
    p.add_argument("--max-images", type=int, default=0, help="use at most this many images (0: all)")
    p.add_argument("--ddim-steps", type=int, default=50,
                   help="the DDIM grid the teacher steps on (LCM's 'original inference steps')")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale of the teacher's steps (default: the teacher's recommended, "
                        "from its training_log.json, else 5)")
    p.add_argument("--batch-size", type=int, default=32, help="latents per step")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant after 20 warm-up steps)")
    p.add_argument("--target-ema", type=float, default=0.95, help="EMA decay of the target network (LCM: 0.95)")
    p.add_argument("--max-steps", type=int, default=10**7, help="stop after this many steps")
    p.add_argument("--cpu-minutes", type=float, default=0,
                   help="stop after this much process CPU time (all threads, carried across resumes; 0: no limit)")
    p.add_argument("--ckpt-every", type=int, default=100, help="save the resumable state every this many steps")
    p.add_argument("--recommended-steps", type=int, default=4, help="sampling steps the student's card recommends")
    common_args(p, "distill", QUICK, helps={"seed": "seed of the batches, noise and timesteps"})
    # read by train_diffusion.load_images_and_captions
    p.set_defaults(eval_split="", eval_images=0, resolution=0)
    return parse_checked(p, argv, QUICK, check_args)


def check_args(args: argparse.Namespace) -> None:
    check((args.teacher / "model_index.json").is_file(),
          f"{args.teacher} is not a diffusers pipeline folder (no model_index.json)")
    for name in ("batch_size", "max_steps", "ddim_steps", "ckpt_every", "recommended_steps"):
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    check(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    check(0 < args.target_ema < 1, f"--target-ema must be in (0, 1), got {args.target_ema}")
    check(args.guidance is None or args.guidance >= 1, f"--guidance must be >= 1, got {args.guidance}")
    check(args.cpu_minutes >= 0 and args.max_images >= 0, "--cpu-minutes and --max-images must be >= 0")
    check(args.out.resolve() != args.teacher.resolve(), "--out must not be the teacher's folder")
    args.ckpt_dir = args.ckpt_dir or td.CHECKPOINTS / "distill" / args.out.name


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's c_skip(t), c_out(t) (Song et al. 2023 consistency models, with LCM's timestep scaling of 10), shaped
    (B, 1, 1, 1): the same as diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete."""
    s = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / (s**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def x0_and_eps(out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """The clean latent and the noise a model output implies at x_t (alpha_bar shaped (B, 1, 1, 1))."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "epsilon":
        return (x_t - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x_t - s * out, s * x_t + a * out
    if prediction_type == "sample":
        return out, (x_t - a * out) / s
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def guided_ddim_step(out_cond, out_uncond, x_t, alpha_bar, alpha_bar_prev, guidance: float, prediction_type: str):
    """One deterministic DDIM step (eta 0) from x_t to the previous grid timestep, with classifier-free guidance
    applied to the implied clean latent and noise (as diffusers' LCM distillation example does)."""
    x0_c, eps_c = x0_and_eps(out_cond, x_t, alpha_bar, prediction_type)
    x0_u, eps_u = x0_and_eps(out_uncond, x_t, alpha_bar, prediction_type)
    x0, eps = x0_u + guidance * (x0_c - x0_u), eps_u + guidance * (eps_c - eps_u)
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps


class Distiller:
    """Student, EMA target and frozen teacher UNets over precomputed latents and caption tokens."""

    def __init__(self, args, pipe, latents: torch.Tensor, tokens: torch.Tensor, device):
        self.args, self.device = args, device
        self.teacher = pipe.unet.to(device).eval().requires_grad_(False)
        self.text_encoder = pipe.text_encoder.to(device).eval().requires_grad_(False)
        self.student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.target = copy.deepcopy(self.teacher)
        self.latents, self.tokens = latents, tokens  # N x C x s x s (scaled), N x 5 x L
        self.empty = td.tokenize(pipe.tokenizer, [""])[0]
        cfg = pipe.scheduler.config
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        self.alphas = pipe.scheduler.alphas_cumprod.to(device)
        self.k = cfg["num_train_timesteps"] // args.ddim_steps  # DDIM grid spacing
        self.grid = torch.arange(1, args.ddim_steps + 1) * self.k - 1  # 19, 39, ..., 999 (as LCMScheduler's)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=args.lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / 20))
        self.gen = torch.Generator().manual_seed(args.seed)
        self.step, self.cpu_seconds, self.log = 0, 0.0, []
        self.state_path = args.ckpt_dir / "state.pt"
        if self.state_path.is_file():
            state = torch.load(self.state_path, map_location="cpu", weights_only=False)
            self.student.load_state_dict(state["student"])
            self.target.load_state_dict(state["target"])
            self.opt.load_state_dict(state["opt"])
            self.sched.load_state_dict(state["sched"])
            self.gen.set_state(state["gen"])
            self.step, self.cpu_seconds, self.log = state["step"], state["cpu_seconds"], state["log"]
        self.resumed_from_step = self.step

    def save(self) -> None:
        td.atomic_save({"student": self.student.state_dict(), "target": self.target.state_dict(),
                        "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "gen": self.gen.get_state(),
                        "step": self.step, "cpu_seconds": self.cpu_seconds, "log": self.log}, self.state_path)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.text_encoder(ids.to(self.device))[0]

    def train_step(self, guidance: float) -> float:
        args, n = self.args, len(self.latents)
        idx = torch.randint(n, (args.batch_size,), generator=self.gen)
        which = torch.randint(5, (args.batch_size,), generator=self.gen)
        x0 = self.latents[idx].float().to(self.device)
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        t = self.grid[torch.randint(args.ddim_steps, (args.batch_size,), generator=self.gen)].to(self.device)
        t_prev = (t - self.k).clamp(min=0)
        cond = self.embed(self.tokens[idx, which])
        uncond = self.embed(self.empty.expand(args.batch_size, -1))
        a_t, a_prev = self.alphas[t].view(-1, 1, 1, 1), self.alphas[t_prev].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

        # the student's consistency output at t
        c_skip, c_out = boundary_scalings(t)
        pred_x0, _ = x0_and_eps(self.student(x_t, t, cond).sample, x_t, a_t, self.prediction_type)
        student_out = c_skip * x_t + c_out * pred_x0

        with torch.no_grad():
            # one guided DDIM step of the teacher, t -> t_prev (both halves of CFG in one batch)
            out = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, uncond])).sample
            x_prev = guided_ddim_step(out[: len(t)], out[len(t):], x_t, a_t, a_prev, guidance, self.prediction_type)
            # the EMA target's consistency output at t_prev
            c_skip_p, c_out_p = boundary_scalings(t_prev)
            tgt_x0, _ = x0_and_eps(self.target(x_prev, t_prev, cond).sample, x_prev, a_prev, self.prediction_type)
            target = c_skip_p * x_prev + c_out_p * tgt_x0

        loss = (torch.sqrt((student_out.float() - target.float()) ** 2 + HUBER_C**2) - HUBER_C).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            for p_t, p_s in zip(self.target.parameters(), self.student.parameters()):
                p_t.lerp_(p_s, 1 - self.args.target_ema)
        self.step += 1
        return float(loss.detach())


def teacher_guidance(args) -> float:
    """--guidance, else the teacher's recommended scale from its training_log.json, else 5."""
    if args.guidance is not None:
        return args.guidance
    log = args.teacher / "training_log.json"
    if log.is_file():
        return float(read_json(log).get("config", {}).get("guidance", 5.0))
    return 5.0


def training_data(args, pipe, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior-mean latents of the split's images under the teacher's autoencoder (cached in the
    checkpoint folder), and 5 caption token rows per image."""
    path = args.ckpt_dir / "latents.pt"
    images, captions, *_ = td.load_images_and_captions(args)
    tokens = torch.stack([td.tokenize(pipe.tokenizer, caps) for caps in td._chunks_of_five(captions)])
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False), tokens
    # the teacher's own scaling factor, not one computed afresh: the student must match the teacher's latents
    latents = td.posterior(pipe.vae.to(device), images, device)[0] * pipe.vae.config.scaling_factor
    td.atomic_save(latents, path)
    return latents, tokens


def student_card(name: str, log: dict, fidelity: dict | None = None) -> str:
    """The student's model card (README.md), built from its distill_log.json and, once measured, the metrics of
    `python fidelity.py evaluate-model --model <folder> --write-card` (the same fidelity section as the base's)."""
    from utils import _card_fidelity_section

    rec = log["recommended"]
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, text-to-image, shapes, latent-consistency-model, distillation]
---

# {name}

A few-step student of `{log['teacher']}`, distilled with `distill.py` by {log['method']}: every UNet weight
trained (LCM-LoRA's recipe without the low-rank restriction), the teacher's text encoder, tokenizer and
autoencoder unchanged. The teacher's classifier-free guidance (scale {log['guidance_distilled']:g}) is distilled
into the student, so it samples without CFG.

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{name}", torch_dtype=torch.float32)  # LCMScheduler is saved with it
image = pipe("a red star to the left of a small blue circle", num_inference_steps={rec['steps']},
             guidance_scale={rec['guidance']:g}, generator=torch.Generator().manual_seed(0)).images[0]
```

## Recommended sampling
{rec['scheduler']} (saved), {rec['steps']} steps, guidance scale {rec['guidance']:g} (no CFG), 64x64.

## Distillation
- data: {log['n_images']:,} latents of split `{log['split']}` from {', '.join(log['data'])} (the teacher's autoencoder,
  posterior mean), one of each image's captions per step
- {log['steps']:,} steps of batch {log['batch_size']} ({log['cpu_minutes']:.1f} CPU-minutes on {log['hardware']}),
  AdamW lr {log['lr']:g}, target network EMA {log['target_ema']}, teacher DDIM grid of {log['ddim_steps']} steps,
  pseudo-Huber loss (c = {HUBER_C})
- loss curve: `distill_log.json`

{_card_fidelity_section(fidelity)}{_vs_teacher_section(log, fidelity)}{_selection_section(log)}
## Limitations
The student can only be as right as its teacher and was distilled for {log['cpu_minutes']:.0f} CPU-minutes; compare
its metrics.json with the teacher's before relying on it.
"""


STUDENT_TOLERANCE = 0.05  # issue "A few-step student": all-correct within 0.05 of the teacher's


def _vs_teacher_section(log: dict, fidelity: dict | None) -> str:
    """The card's paired comparison with the teacher (fidelity.versus), or nothing before it is measured."""
    vs = (fidelity or {}).get("vs_teacher")
    if not vs:
        return ""
    parts = [f"{kind} {d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" for kind, d in vs.items()]
    met = all(d["mean"] >= -STUDENT_TOLERANCE for d in vs.values())
    return (f"\n## Against the teacher\nAll-correct of this student minus `{log['teacher']}`'s at its recommended "
            f"sampling, paired over the same prompts and seeds (95% bootstrap CI): {', '.join(parts)}. Target: "
            f"within {STUDENT_TOLERANCE} of the teacher: {'met' if met else 'NOT met'} on the point estimates.\n")


def _selection_section(log: dict) -> str:
    """How the shipped number of distillation steps was chosen (distill_log.json's `selection`), if recorded."""
    return f"\n## Distillation length\n{log['selection']}\n" if log.get("selection") else ""


def save_student(args, pipe, distiller: Distiller, guidance: float, info: dict) -> None:
    """The student as a StableDiffusionPipeline folder with LCMScheduler, written atomically (temp folder, rename)."""
    import shutil

    from diffusers import LCMScheduler, StableDiffusionPipeline

    student = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                      unet=copy.deepcopy(distiller.target).half(),
                                      scheduler=LCMScheduler.from_config(pipe.scheduler.config,
                                                                         original_inference_steps=args.ddim_steps),
                                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    write_json(tmp / "distill_log.json", info)
    write_text(tmp / "README.md", student_card(args.out.name, info))
    if args.out.exists():
        shutil.rmtree(args.out)
    tmp.rename(args.out)


def main(argv=None) -> dict:
    from diffusers import StableDiffusionPipeline

    args = parse_args(argv)
    set_seed(args.seed)
    device = pick_device(args.device)
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    run = start_run("distill", args)
    pipe = StableDiffusionPipeline.from_pretrained(args.teacher, torch_dtype=torch.float32)
    guidance = teacher_guidance(args)
    with run.step("latents"):
        latents, tokens = training_data(args, pipe, device)
    distiller = Distiller(args, pipe, latents, tokens, device)
    bar = tqdm(total=args.max_steps, initial=distiller.step, desc="consistency distillation")
    cpu_start = time.process_time() - distiller.cpu_seconds
    recent: list[float] = []
    with run.step("distill"):
        try:
            while distiller.step < args.max_steps and (not args.cpu_minutes
                                                       or distiller.cpu_seconds < 60 * args.cpu_minutes):
                recent.append(distiller.train_step(guidance))
                distiller.cpu_seconds = time.process_time() - cpu_start
                bar.update(1)
                if distiller.step % 10 == 0:
                    distiller.log.append({"step": distiller.step, "loss": sum(recent) / len(recent),
                                          "cpu_minutes": round(distiller.cpu_seconds / 60, 2)})
                    bar.set_postfix(loss=f"{distiller.log[-1]['loss']:.4f}")
                    recent = []
                if distiller.step % args.ckpt_every == 0:
                    distiller.save()
        except KeyboardInterrupt:
            distiller.save()
            raise
        distiller.save()
    bar.close()
    info = {"teacher": repo_path(args.teacher), "method": "latent consistency distillation (LCM, arXiv:2310.04378)",
            "steps": distiller.step, "resumed_from_step": distiller.resumed_from_step, "batch_size": args.batch_size,
            "guidance_distilled": guidance, "ddim_steps": args.ddim_steps, "lr": args.lr,
            "target_ema": args.target_ema, "cpu_minutes": round(distiller.cpu_seconds / 60, 2),
            "n_images": len(latents), "data": [repo_path(d) for d in args.data], "split": args.split,
            "recommended": {"steps": args.recommended_steps, "guidance": 1.0, "scheduler": "LCMScheduler"},
            "hardware": td.hardware_text(device),
            "loss_curve": distiller.log}
    save_student(args, pipe, distiller, guidance, info)
    metrics = {k: v for k, v in info.items() if k != "loss_curve"}
    metrics["final_loss"] = distiller.log[-1]["loss"] if distiller.log else None
    run.finish(metrics)
    print(f"wrote {args.out} ({distiller.step} steps, {metrics['cpu_minutes']} CPU-min)")
    return metrics


if __name__ == "__main__":
    cli(main)
