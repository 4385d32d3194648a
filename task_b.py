"""Task B: which inference settings (scheduler, steps, guidance, eta, negative prompts) make better images, by measurement?

Each experiment is a sweep of cells; every cell generates the same prompts x seeds (one torch.Generator per image,
seed + j for the j-th seed of every prompt, so the same seed gives the same image in every cell) and records the
oracle's fidelity (share of images with every named attribute right; mean over prompts with a bootstrap 95% CI
over prompts), the per-attribute rates (shape / colour / size / position / count), diversity (mean pairwise
EfficientNet feature distance between the seeds of a prompt, averaged over prompts) and seconds per image.
findings.md is generated from those numbers; the plots show fidelity vs steps per scheduler, fidelity vs guidance
and fidelity vs time with the Pareto front.

Experiments (--experiments, comma-separated, or all):
    schedulers  a zoo of diffusers schedulers (DDIM, DDPM, PNDM, Euler, Euler ancestral, DPM-Solver++, UniPC, Heun)
                at several step counts; --true-ddpm adds DDPM at all its training timesteps (slow: 1000 steps)
    steps       the model's own scheduler over a range of step counts
    cfg         guidance scale
    eta         DDIM's eta (0 deterministic ... 1 as stochastic as DDPM)
    negative    prompts naming a shape only ("a star"); negative prompt = the colour the model draws most often for
                it (picked on separate seeds): how much does that colour's rate drop, and what does it cost
    trajectory  the predicted clean image at every step, as a filmstrip and a GIF per scheduler (one prompt)
    grid        an X/Y sweep over any two pipeline or scheduler arguments:
                --x num_inference_steps=5,10,20 --y guidance_scale=1:9:2 (start:stop:step, stop included)
    cell        one cell (--scheduler, --steps, --guidance): what a wandb sweep agent runs

Quick (smoke run, well under a minute on one core):
    python task_b.py --quick --threads 1
Default (schedulers, steps, cfg on shapes-tiny: 8 prompts x 4 seeds per cell, ~4 min on one busy core):
    python task_b.py --run-name default
Everything (adds eta, negative, trajectory and the true 1000-step DDPM; ~20 min on one core):
    python task_b.py --experiments all --true-ddpm
A grid, and one cell (as `wandb sweep sweeps/task_b.yaml` runs it):
    python task_b.py --experiments grid --x num_inference_steps=5,10,20 --y guidance_scale=1:9:2
    python task_b.py --scheduler euler_a --steps 10 --guidance 5 --wandb
Writes outputs/task_b/<run_name>/: metrics.json ({"experiments": {name: [cell, ...]}}), findings.md,
fidelity_vs_steps.png, fidelity_vs_guidance.png, pareto.png, <experiment>_grid.png (rows cells, columns prompts),
trajectory_<scheduler>.png / .gif, cells.json (finished cells: rerunning the same command resumes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import inspect
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import fidelity
import generate_data as gd
from task_a import weights_fingerprint
from utils import (DEFAULT_IMAGE_ENCODER, OUTPUTS, UserError, check, cli, finish_run, fmt, generate_images,
                   image_grid, init_wandb, load_image_encoder, load_pipeline, make_run_dir, mean_ci95, pick_device,
                   pyplot, read_json, resolve_model, write_json, write_text)

EXPERIMENTS = ("schedulers", "steps", "cfg", "eta", "negative", "trajectory", "grid", "cell")
DEFAULT_EXPERIMENTS = ("schedulers", "steps", "cfg")
# Short names of the scheduler zoo -> diffusers classes (any other diffusers scheduler class name works too).
SCHEDULERS = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
              "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
              "heun": "HeunDiscreteScheduler"}
# Arguments task_b sets itself (one generator per image, numpy output, the prompts) and so cannot be swept.
RESERVED = {"prompt", "prompt_2", "prompt_3", "generator", "latents", "output_type", "return_dict", "prompt_embeds",
            "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "callback",
            "callback_steps", "callback_on_step_end", "callback_on_step_end_tensor_inputs", "num_images_per_prompt",
            "ip_adapter_image", "ip_adapter_image_embeds", "cross_attention_kwargs", "joint_attention_kwargs",
            "self"}
# Settings a scheduler needs when built from another scheduler's config (SD's own PNDM config skips the
# Runge-Kutta warm-up steps; without that PNDM fails below 4 steps).
SCHEDULER_DEFAULTS = {"PNDMScheduler": {"skip_prk_steps": True}}
FIDELITY_KEYS = ("all", "shape", "color", "size", "position", "count")
QUICK = {"n_prompts": 2, "seeds": 2, "zoo": "ddim,euler_a,dpmpp_2m", "sched_steps": "2", "steps_list": "1,2",
         "cfg_list": "1,5", "cfg_steps": 2, "eta_list": "0,1", "eta_steps": 2, "traj_steps": 2, "neg_steps": 2}
GRID_SHOWN = 6  # prompts per row in the <experiment>_grid.png contact sheets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="shapes-tiny", help="registry name, local pipeline folder or hub id")
    p.add_argument("--experiments", default=None,
                   help=f"comma-separated: {', '.join(EXPERIMENTS)}, or all (default: {','.join(DEFAULT_EXPERIMENTS)}; "
                        "cell when --scheduler/--steps/--guidance is given)")
    p.add_argument("--n-prompts", type=int, default=8, help="single-object prompts per cell (>= 8 for the study)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (>= 4 for the study)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt list and of the noise (seed + j)")
    p.add_argument("--kinds", default="single", help="prompt kinds: single, two (comma-separated)")
    p.add_argument("--fidelity-key", default="all",
                   help=f"oracle rate reported as fidelity_mean: {', '.join(FIDELITY_KEYS)}")
    p.add_argument("--zoo", default=",".join(SCHEDULERS),
                   help=f"schedulers of the schedulers/trajectory experiments: short names ({', '.join(SCHEDULERS)}) "
                        "or diffusers class names")
    p.add_argument("--sched-steps", default="3,6,12", help="step counts of the schedulers experiment")
    p.add_argument("--true-ddpm", action="store_true",
                   help="schedulers experiment: add DDPM at all num_train_timesteps steps (the original sampler)")
    p.add_argument("--steps-list", default="1,2,3,6,12,24", help="step counts of the steps experiment")
    p.add_argument("--cfg-list", default="1,3,5,7,9", help="guidance scales of the cfg experiment")
    p.add_argument("--cfg-steps", type=int, default=12, help="steps of the cfg experiment")
    p.add_argument("--eta-list", default="0,0.5,1", help="DDIM eta values of the eta experiment")
    p.add_argument("--eta-steps", type=int, default=12, help="steps of the eta experiment")
    p.add_argument("--neg-steps", type=int, default=12, help="steps of the negative experiment")
    p.add_argument("--traj-steps", type=int, default=12, help="steps of the trajectory experiment")
    p.add_argument("--x", default=None, help="grid X axis: name=v1,v2,... or name=start:stop:step (stop included)")
    p.add_argument("--y", default=None, help="grid Y axis (optional), same syntax as --x")
    p.add_argument("--scheduler", default=None, help="cell experiment: scheduler (short or class name)")
    p.add_argument("--steps", type=int, default=None, help="cell experiment: num_inference_steps")
    p.add_argument("--guidance", type=float, default=None, help="cell experiment: guidance_scale")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    p.add_argument("--oracle", default=str(fidelity.DEFAULT_ORACLE), help="oracle folder (fidelity.py train-oracle)")
    p.add_argument("--run-name", default=None, help="run folder under outputs/task_b (default: timestamp); "
                                                   "an existing one is resumed")
    p.add_argument("--outputs", default=str(OUTPUTS), help="outputs root")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--wandb", action="store_true", help="log every cell to wandb (offline unless WANDB_MODE says)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['n_prompts']} prompts x {QUICK['seeds']} seeds, schedulers "
                        f"{QUICK['zoo']}, <= 2 steps")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.run_name = args.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    single = any(v is not None for v in (args.scheduler, args.steps, args.guidance))
    names = args.experiments or ("cell" if single else ",".join(DEFAULT_EXPERIMENTS))
    names = [e.strip() for e in names.split(",") if e.strip()]
    if names == ["all"]:
        names = [e for e in EXPERIMENTS if e not in ("grid", "cell")] + (["grid"] if args.x else [])
    for name in names:
        check(name in EXPERIMENTS, f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}, all")
    check(bool(names), f"--experiments is empty; valid: {', '.join(EXPERIMENTS)}, all")
    args.experiments = list(dict.fromkeys(names))
    if args.quick:
        args.n_prompts, args.seeds = min(args.n_prompts, QUICK["n_prompts"]), min(args.seeds, QUICK["seeds"])
        for key in ("zoo", "sched_steps", "steps_list", "cfg_list", "eta_list"):
            if getattr(args, key) == _default(key):
                setattr(args, key, QUICK[key])
        for key in ("cfg_steps", "eta_steps", "traj_steps", "neg_steps"):
            setattr(args, key, min(getattr(args, key), QUICK[key]))
    check(args.n_prompts > 0 and args.seeds > 0, f"--n-prompts and --seeds must be positive, got {args.n_prompts} "
                                                  f"and {args.seeds}")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    for kind in args.kinds:
        check(kind in fidelity.KINDS, f"unknown prompt kind {kind!r} in --kinds; choose from {', '.join(fidelity.KINDS)}")
    check(args.fidelity_key in FIDELITY_KEYS,
          f"unknown --fidelity-key {args.fidelity_key!r}; choose one of {', '.join(FIDELITY_KEYS)}")
    args.zoo = [resolve_scheduler(s) for s in args.zoo.split(",") if s.strip()]
    args.sched_steps = parse_list(args.sched_steps, "--sched-steps", int)
    args.steps_list = parse_list(args.steps_list, "--steps-list", int)
    args.cfg_list = parse_list(args.cfg_list, "--cfg-list", float)
    args.eta_list = parse_list(args.eta_list, "--eta-list", float)
    for name in ("cfg_steps", "eta_steps", "neg_steps", "traj_steps", "batch_size"):
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check(all(s > 0 for s in args.sched_steps + args.steps_list), "step counts must be positive")
    check(all(g >= 0 for g in args.cfg_list), f"guidance scales must be >= 0, got {args.cfg_list}")
    check(args.steps is None or args.steps > 0, f"--steps must be positive, got {args.steps}")
    check(args.guidance is None or args.guidance >= 0, f"--guidance must be >= 0, got {args.guidance}")
    if args.scheduler is not None:
        args.scheduler = resolve_scheduler(args.scheduler)
    check("grid" not in args.experiments or args.x is not None,
          "the grid experiment needs --x (and optionally --y), e.g. --x num_inference_steps=5,10,20 "
          "--y guidance_scale=1:9:2")
    args.axes = [parse_axis(a, flag) for a, flag in ((args.x, "--x"), (args.y, "--y")) if a is not None]
    if len(args.axes) == 2:
        check(args.axes[0][0] != args.axes[1][0], f"--x and --y sweep the same argument {args.axes[0][0]!r}")
    check(args.threads >= 0, f"--threads must be >= 0, got {args.threads}")
    resolve_model(args.model)  # a bad model name fails before anything slow


def _default(key: str) -> Any:
    return {"zoo": ",".join(SCHEDULERS), "sched_steps": "3,6,12", "steps_list": "1,2,3,6,12,24",
            "cfg_list": "1,3,5,7,9", "eta_list": "0,0.5,1"}[key]


def parse_list(text: str, flag: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated {kind.__name__}s, got {text!r}") from None
    check(bool(values), f"{flag} is empty")
    return values


def resolve_scheduler(name: str) -> str:
    """A zoo short name or a diffusers scheduler class name (with or without the suffix) -> the class name."""
    import diffusers

    name = name.strip()
    if name.lower() in SCHEDULERS:
        return SCHEDULERS[name.lower()]
    cls_name = name if name.endswith("Scheduler") else name + "Scheduler"
    valid = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith(("Flax", "Scheduler")))
    check(cls_name in valid, f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)} or a diffusers class "
                             f"({', '.join(valid)})")
    return cls_name


# --------------------------------------------------------------------------- grid syntax
def parse_value(text: str) -> Any:
    """'5' -> 5, '7.5' -> 7.5, 'true' -> True, anything else stays a string (scheduler names, prompts)."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_axis(text: str, flag: str = "--x") -> tuple[str, list]:
    """'name=v1,v2' or 'name=start:stop:step' (stop included; ranges and values may be mixed by commas)."""
    usage = f"write {flag} name=v1,v2,... or {flag} name=start:stop:step, e.g. guidance_scale=1:9:2"
    m = re.fullmatch(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.+?)\s*", text)
    check(m is not None, f"malformed sweep {text!r}: {usage}")
    name, spec = m.groups()
    values: list = []
    for part in spec.split(","):
        part = part.strip()
        check(part != "", f"malformed sweep {text!r}: empty value; {usage}")
        if ":" not in part:
            values.append(parse_value(part))
            continue
        pieces = part.split(":")
        check(len(pieces) == 3, f"malformed range {part!r} in {text!r}: a range is start:stop:step")
        try:
            start, stop, step = (float(v) for v in pieces)
        except ValueError:
            raise UserError(f"malformed range {part!r} in {text!r}: start, stop and step must be numbers") from None
        check(step > 0 and stop >= start, f"malformed range {part!r} in {text!r}: needs step > 0 and stop >= start")
        n = int(np.floor((stop - start) / step + 1e-9)) + 1
        check(n <= 1000, f"range {part!r} in {text!r} has {n} values; at most 1000")
        as_int = all(re.fullmatch(r"-?\d+", v.strip()) for v in pieces)
        values += [int(start + i * step) if as_int else round(start + i * step, 10) for i in range(n)]
    return name, list(dict.fromkeys(values))


def sweepable(pipe) -> tuple[list[str], list[str]]:
    """(pipeline __call__ arguments one may sweep, scheduler config arguments) for this pipeline."""
    call = [n for n, p in inspect.signature(pipe.__call__).parameters.items()
            if n not in RESERVED and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    sched = sorted(k for k in pipe.scheduler.config if not k.startswith("_"))
    return call, sched


def check_axes(axes: list[tuple[str, list]], pipe) -> None:
    """Every swept name is a pipeline or scheduler argument: else one line listing what this pipeline accepts."""
    call, sched = sweepable(pipe)
    for name, values in axes:
        check(name not in RESERVED, f"{name!r} is set by task_b itself (one generator per image, numpy output, the "
                                    "prompts) and cannot be swept")
        check(name in call or name in sched or name == "scheduler",
              f"{type(pipe).__name__} does not accept {name!r}; sweepable: scheduler, pipeline arguments "
              f"({', '.join(call)}), scheduler arguments ({', '.join(sched)})")
        if name == "scheduler":
            for i, v in enumerate(values):
                values[i] = resolve_scheduler(str(v))
        if name == "num_inference_steps":
            check(all(isinstance(v, int) and v > 0 for v in values),
                  f"num_inference_steps must be positive integers, got {values}")


# --------------------------------------------------------------------------- cells
class Context:
    """What every cell shares: the pipeline, its base scheduler config, prompts, seeds, the oracle and the encoder."""

    def __init__(self, args, pipe, settings, oracle, encoder, run_dir: Path, wandb_run):
        self.args, self.pipe, self.settings, self.oracle, self.encoder = args, pipe, settings, oracle, encoder
        self.base_scheduler = type(pipe.scheduler).__name__
        self.base_config = dict(pipe.scheduler.config)
        self.run_dir, self.wandb = run_dir, wandb_run
        self.prompts = [p for kind in args.kinds for p in fidelity.make_prompts(kind, args.n_prompts, args.seed)]
        self.cache_path = run_dir / "cells.json"
        self.cache = read_json(self.cache_path) if self.cache_path.is_file() else {}
        self.thumbs: dict[str, np.ndarray] = {}
        self.call_args, self.sched_args = sweepable(pipe)
        # In the cache key: a retrained model in the same folder must not reuse the old model's cells.
        self.fingerprint = weights_fingerprint(pipe)

    def defaults(self) -> dict:
        return {"scheduler": self.base_scheduler, "num_inference_steps": self.settings["steps"],
                "guidance_scale": self.settings["guidance"]}


def build_scheduler(ctx: Context, name: str, overrides: dict):
    import diffusers

    cls = getattr(diffusers, name)
    compatible = {c.__name__ for c in ctx.pipe.scheduler.compatibles} | {ctx.base_scheduler}
    check(name in compatible, f"scheduler {name} does not fit {type(ctx.pipe).__name__}'s "
                              f"{ctx.base_scheduler}; compatible: {', '.join(sorted(compatible))}")
    defaults = {k: v for k, v in SCHEDULER_DEFAULTS.get(name, {}).items() if k not in ctx.base_config}
    return cls.from_config({**ctx.base_config, **defaults, **overrides})


def prepare(ctx: Context, settings: dict) -> tuple[int, float, dict]:
    """Put the cell's scheduler on the pipeline; return (steps, guidance, extra pipeline kwargs)."""
    sched_over = {k: v for k, v in settings.items() if k in ctx.sched_args and k not in ctx.call_args}
    ctx.pipe.scheduler = build_scheduler(ctx, settings["scheduler"], sched_over)
    call_kw = {k: v for k, v in settings.items()
               if k not in ("scheduler", "num_inference_steps", "guidance_scale") and k not in sched_over}
    return int(settings["num_inference_steps"]), float(settings["guidance_scale"]), call_kw


def cell_key(ctx: Context, settings: dict, extra: Any = None) -> str:
    a = ctx.args
    blob = json.dumps([ctx.settings["id"], ctx.fingerprint, a.n_prompts, a.seeds, a.seed, a.kinds, a.fidelity_key, settings, extra],
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def generate(ctx: Context, settings: dict, texts: list[str], seeds: list[int], **more) -> tuple[np.ndarray, float]:
    steps, guidance, call_kw = prepare(ctx, settings)
    t0 = time.perf_counter()
    images = generate_images(ctx.pipe, texts, seeds, steps, guidance, ctx.settings["size"], ctx.args.batch_size,
                             progress=False, **call_kw, **more)
    return fidelity.to_uint8_64(images), (time.perf_counter() - t0) / len(texts)


def per_prompt_diversity(ctx: Context, images: np.ndarray, n_prompts: int) -> float:
    """Mean over prompts of the mean pairwise feature distance between that prompt's seeds (images prompt-major)."""
    model, info = ctx.encoder
    feats = fidelity.fd_features(model, info, images, "diversity features").reshape(n_prompts, ctx.args.seeds, -1)
    return float(np.nanmean([fidelity.diversity(f) for f in feats])) if ctx.args.seeds > 1 else float("nan")


def run_cell(ctx: Context, experiment: str, settings: dict, label: str) -> dict:
    """Generate every prompt x seed with these settings, score fidelity, diversity and time (cached by settings)."""
    key = cell_key(ctx, settings)
    if key not in ctx.cache:
        a = ctx.args
        texts = [p["text"] for p in ctx.prompts for _ in range(a.seeds)]
        seeds = [a.seed + j for _ in ctx.prompts for j in range(a.seeds)]
        try:
            images, sec = generate(ctx, settings, texts, seeds)
        except (ValueError, RuntimeError, IndexError, TypeError) as err:  # e.g. a step count a scheduler rejects
            print(f"  {experiment:10s} {label:40s} FAILED: {type(err).__name__}: {err}")
            return {**settings, "experiment": experiment, "label": label, "error": f"{type(err).__name__}: {err}"}
        scores = ctx.oracle.score(images, [p for p in ctx.prompts for _ in range(a.seeds)])
        per_prompt = np.array([[np.nan if s[a.fidelity_key] is None else float(s[a.fidelity_key])
                                for s in scores[i * a.seeds:(i + 1) * a.seeds]] for i in range(len(ctx.prompts))])
        mean, ci = mean_ci95(np.nanmean(per_prompt, axis=1), seed=a.seed)
        summary = fidelity.summarize_scores(scores)
        cell = {**settings, "fidelity_mean": mean, "fidelity_ci95": list(ci), "fidelity_key": a.fidelity_key,
                "attributes": {k: summary[k] for k in fidelity.ATTRIBUTES},
                "diversity": per_prompt_diversity(ctx, images, len(ctx.prompts)), "sec_per_image": sec,
                "n_prompts": len(ctx.prompts), "n_seeds": a.seeds}
        ctx.cache[key] = cell
        np.save(thumb_path(ctx, key), images[::a.seeds][:GRID_SHOWN])
        write_json(ctx.cache_path, ctx.cache)
    cell = dict(ctx.cache[key], experiment=experiment, label=label)
    ctx.thumbs[label + "|" + experiment] = np.load(thumb_path(ctx, key))
    if ctx.wandb is not None:
        ctx.wandb.log({"experiment": experiment, "label": label, **_loggable(cell)})
    print(f"  {experiment:10s} {label:40s} fidelity {cell['fidelity_mean']:.3f} "
          f"[{cell['fidelity_ci95'][0]:.3f}, {cell['fidelity_ci95'][1]:.3f}]  colour {fmt(cell['attributes']['color'])}"
          f"  shape {fmt(cell['attributes']['shape'])}  diversity {fmt(cell['diversity'])}  "
          f"{cell['sec_per_image']:.3f} s/image")
    return cell


def thumb_path(ctx: Context, key: str) -> Path:
    (ctx.run_dir / "cells").mkdir(exist_ok=True)
    return ctx.run_dir / "cells" / f"{key}.npy"


def _loggable(cell: dict) -> dict:
    out = {k: v for k, v in cell.items() if isinstance(v, (int, float, str, bool)) and k != "label"}
    out.update({f"attr_{k}": v for k, v in cell["attributes"].items() if v is not None})
    return out


# --------------------------------------------------------------------------- experiments
def zoo_for(ctx: Context) -> list[str]:
    """The requested zoo minus schedulers that do not fit this pipeline (e.g. DDIM on a flow-matching model)."""
    compatible = {c.__name__ for c in ctx.pipe.scheduler.compatibles} | {ctx.base_scheduler}
    zoo = [s for s in ctx.args.zoo if s in compatible]
    skipped = [s for s in ctx.args.zoo if s not in compatible]
    if skipped:
        print(f"note: skipping schedulers that do not fit {ctx.base_scheduler}: {', '.join(skipped)}")
    return zoo or [ctx.base_scheduler]


def exp_schedulers(ctx: Context) -> list[dict]:
    cells = []
    for name in zoo_for(ctx):
        for steps in ctx.args.sched_steps:
            settings = {**ctx.defaults(), "scheduler": name, "num_inference_steps": steps}
            cells.append(run_cell(ctx, "schedulers", settings, f"{short(name)} {steps} steps"))
    if ctx.args.true_ddpm and "DDPMScheduler" in zoo_for(ctx):
        n = int(ctx.base_config.get("num_train_timesteps", 1000))
        settings = {**ctx.defaults(), "scheduler": "DDPMScheduler", "num_inference_steps": n}
        cells.append(run_cell(ctx, "schedulers", settings, f"ddpm {n} steps (true DDPM)"))
    return cells


def exp_steps(ctx: Context) -> list[dict]:
    return [run_cell(ctx, "steps", {**ctx.defaults(), "num_inference_steps": s}, f"{short(ctx.base_scheduler)} {s} steps")
            for s in ctx.args.steps_list]


def exp_cfg(ctx: Context) -> list[dict]:
    return [run_cell(ctx, "cfg", {**ctx.defaults(), "num_inference_steps": ctx.args.cfg_steps, "guidance_scale": g},
                     f"guidance {g:g}") for g in ctx.args.cfg_list]


def exp_eta(ctx: Context) -> list[dict]:
    check("DDIMScheduler" in zoo_for(ctx), f"the eta experiment needs DDIM, which does not fit {ctx.base_scheduler}")
    return [run_cell(ctx, "eta", {**ctx.defaults(), "scheduler": "DDIMScheduler",
                                  "num_inference_steps": ctx.args.eta_steps, "eta": e}, f"ddim eta {e:g}")
            for e in ctx.args.eta_list]


def exp_cell(ctx: Context) -> list[dict]:
    a = ctx.args
    settings = ctx.defaults()
    if a.scheduler:
        settings["scheduler"] = a.scheduler
    if a.steps:
        settings["num_inference_steps"] = a.steps
    if a.guidance is not None:
        settings["guidance_scale"] = a.guidance
    label = f"{short(settings['scheduler'])} {settings['num_inference_steps']} steps g {settings['guidance_scale']:g}"
    return [run_cell(ctx, "cell", settings, label)]


def exp_grid(ctx: Context) -> list[dict]:
    axes = [(n, list(v)) for n, v in ctx.args.axes]
    check_axes(axes, ctx.pipe)
    cells = []
    for combo in itertools.product(*[v for _, v in axes]):
        settings = {**ctx.defaults(), **dict(zip([n for n, _ in axes], combo))}
        label = " ".join(f"{n}={short(v) if n == 'scheduler' else v}" for n, v in zip([n for n, _ in axes], combo))
        cells.append(run_cell(ctx, "grid", settings, label))
    return cells


def short(name: Any) -> str:
    inv = {v: k for k, v in SCHEDULERS.items()}
    return inv.get(name, str(name).replace("Scheduler", ""))


def exp_negative(ctx: Context) -> list[dict]:
    """Prompts naming a shape only; negative prompt = the colour drawn most for it on separate selection seeds."""
    a = ctx.args
    order = np.random.default_rng([a.seed, 13]).permutation(len(gd.SHAPES))
    shapes = [gd.SHAPES[i] for i in order[:min(a.n_prompts, len(gd.SHAPES))]]
    texts = [gd._phrase({"shape": s, "color": None, "size": None, "cell": None}, color=False) for s in shapes]
    base = {**ctx.defaults(), "num_inference_steps": a.neg_steps}
    # 1. which colour does the model draw for each shape? Seeds disjoint from the measured ones, so the drop below
    #    is not inflated by picking each prompt's luckiest colour on the same images (regression to the mean).
    sel_seeds = [a.seed + 100_000 + j for _ in shapes for j in range(a.seeds)]
    sel, _ = generate(ctx, base, [t for t in texts for _ in range(a.seeds)], sel_seeds)
    negatives = [modal_colour(ctx.oracle.detect(sel[i * a.seeds:(i + 1) * a.seeds]), s, i)
                 for i, s in enumerate(shapes)]
    # 2. the same seeds with and without the negative prompt
    rep_texts = [t for t in texts for _ in range(a.seeds)]
    rep_neg = [n for n in negatives for _ in range(a.seeds)]
    seeds = [a.seed + j for _ in shapes for j in range(a.seeds)]
    cells, rates = [], {}
    for use in (False, True):
        key = cell_key(ctx, dict(base, negative=use), [texts, negatives])
        if key not in ctx.cache:
            images, sec = generate(ctx, base, rep_texts, seeds, **({"negative_prompt": rep_neg} if use else {}))
            dets = ctx.oracle.detect(images)
            per = lambda f: np.array([np.mean([f(d, i) for d in dets[i * a.seeds:(i + 1) * a.seeds]])  # noqa: E731
                                      for i in range(len(shapes))])
            shape_rate = per(lambda d, i: any(o["shape"] == shapes[i] for o in d))
            colour_rate = per(lambda d, i: any(o["color"] == negatives[i] for o in d))
            count_rate = per(lambda d, i: len(d) == 1)
            mean, ci = mean_ci95(shape_rate, seed=a.seed)
            c_mean, c_ci = mean_ci95(colour_rate, seed=a.seed)
            ctx.cache[key] = {**base, "negative_prompt": "<per prompt colour>" if use else None,
                              "fidelity_mean": mean, "fidelity_ci95": list(ci), "fidelity_key": "shape present",
                              "negative_colour_rate": c_mean, "negative_colour_rate_ci95": list(c_ci),
                              "count_rate": float(count_rate.mean()), "per_prompt_colour_rate": colour_rate.tolist(),
                              "per_prompt_shape_rate": shape_rate.tolist(), "attributes": {},
                              "diversity": per_prompt_diversity(ctx, images, len(shapes)), "sec_per_image": sec,
                              "prompts": texts, "negatives": negatives, "n_prompts": len(shapes), "n_seeds": a.seeds}
            np.save(thumb_path(ctx, key), images[::a.seeds][:GRID_SHOWN])
            write_json(ctx.cache_path, ctx.cache)
        label = "with negative colour" if use else "no negative"
        cell = dict(ctx.cache[key], experiment="negative", label=label)
        ctx.thumbs[label + "|negative"] = np.load(thumb_path(ctx, key))
        rates[use] = np.array(cell["per_prompt_colour_rate"]), np.array(cell["per_prompt_shape_rate"])
        cells.append(cell)
        print(f"  negative   {label:40s} colour rate {cell['negative_colour_rate']:.3f}, shape present "
              f"{cell['fidelity_mean']:.3f}, {cell['sec_per_image']:.3f} s/image")
    drop, drop_ci = mean_ci95(rates[False][0] - rates[True][0], seed=a.seed)
    cost, cost_ci = mean_ci95(rates[False][1] - rates[True][1], seed=a.seed)
    cells[1].update({"colour_rate_drop": drop, "colour_rate_drop_ci95": list(drop_ci), "shape_rate_cost": cost,
                     "shape_rate_cost_ci95": list(cost_ci)})
    if ctx.wandb is not None:
        for cell in cells:
            ctx.wandb.log({"experiment": "negative", **_loggable(cell)})
    return cells


def modal_colour(detections: list[list[dict]], shape: str, index: int) -> str:
    """The colour the model most often gives `shape` (any object's colour when the shape is never drawn)."""
    colours = [o["color"] for d in detections for o in d if o["shape"] == shape] or \
              [o["color"] for d in detections for o in d]
    if not colours:  # nothing detected at all: cycle through the colours so each prompt still gets one
        return fidelity.COLOR_NAMES[index % len(fidelity.COLOR_NAMES)]
    values, counts = np.unique(colours, return_counts=True)
    return str(values[np.argmax(counts)])


# --------------------------------------------------------------------------- trajectory
class StepRecorder:
    """Wraps scheduler.step to keep its last inputs and output (the pipeline's step callback does not get them)."""

    def __init__(self, scheduler):
        self.scheduler, self.step, self.last = scheduler, scheduler.step, None

    def __call__(self, model_output, timestep, sample, *args, return_dict: bool = True, **kw):
        out = self.step(model_output, timestep, sample, *args, return_dict=True, **kw)
        self.last = (model_output, timestep, sample, out)
        return out if return_dict else out.to_tuple()


def predicted_x0(scheduler, model_output, timestep, sample, out):
    """The model's clean-latent estimate at this step: the scheduler's own when it reports one, else computed.

    Returns:
        (x0 latents, how: "scheduler", "alphas_cumprod" or "flow sigma").
    """
    x0 = getattr(out, "pred_original_sample", None)
    if x0 is not None:
        return x0, "scheduler"
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is not None and not getattr(scheduler.config, "use_flow_sigmas", False):
        # VP schedulers without pred_original_sample (DPM-Solver, UniPC, PNDM) work on the unscaled x_t.
        a = ac[int(timestep)].to(sample.device, sample.dtype)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return (sample - (1 - a).sqrt() * model_output) / a.sqrt(), "alphas_cumprod"
        if kind == "v_prediction":
            return a.sqrt() * sample - (1 - a).sqrt() * model_output, "alphas_cumprod"
        return model_output, "alphas_cumprod"
    sigma = scheduler.sigmas[scheduler.step_index - 1].to(sample.device, sample.dtype)
    return sample - sigma * model_output, "flow sigma"  # flow matching: x_t = (1 - s) x0 + s noise, v = noise - x0


def decode_latents(pipe, latents) -> np.ndarray:
    import torch

    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
    return (np.clip(pipe.image_processor.postprocess(image, output_type="np")[0], 0, 1) * 255).round().astype(np.uint8)


def exp_trajectory(ctx: Context) -> list[dict]:
    from PIL import Image

    a = ctx.args
    prompt = ctx.prompts[0]["text"]
    cells = []
    for name in zoo_for(ctx):
        steps, guidance, _ = prepare(ctx, {**ctx.defaults(), "scheduler": name, "num_inference_steps": a.traj_steps})
        recorder = StepRecorder(ctx.pipe.scheduler)
        ctx.pipe.scheduler.step = recorder
        frames, how = [], set()

        def on_step_end(pipe, i, t, callback_kwargs):
            x0, kind = predicted_x0(pipe.scheduler, *recorder.last)
            how.add(kind)
            frames.append(decode_latents(pipe, x0))
            return callback_kwargs

        final = generate_images(ctx.pipe, [prompt], [a.seed], steps, guidance, ctx.settings["size"], progress=False,
                                callback_on_step_end=on_step_end)[0]
        frames = [np.asarray(Image.fromarray(f).resize((64, 64))) for f in frames]
        strip = image_grid(frames + [fidelity.to_uint8_64([final])[0]], 1, len(frames) + 1,
                           col_labels=[str(i + 1) for i in range(len(frames))] + ["out"], cell=64)
        strip.save(ctx.run_dir / f"trajectory_{short(name)}.png")
        gif = [Image.fromarray(f).resize((128, 128), Image.NEAREST) for f in frames]
        gif[0].save(ctx.run_dir / f"trajectory_{short(name)}.gif", save_all=True, append_images=gif[1:], duration=250,
                    loop=0)
        cells.append({"scheduler": name, "num_inference_steps": steps, "guidance_scale": guidance, "prompt": prompt,
                      "seed": a.seed, "n_frames": len(frames), "x0_from": sorted(how),
                      "filmstrip": f"trajectory_{short(name)}.png", "gif": f"trajectory_{short(name)}.gif",
                      "experiment": "trajectory", "label": short(name)})
        print(f"  trajectory {short(name):40s} {len(frames)} frames (x0 from {', '.join(sorted(how))})")
    return cells


RUNNERS = {"schedulers": exp_schedulers, "steps": exp_steps, "cfg": exp_cfg, "eta": exp_eta,
           "negative": exp_negative, "trajectory": exp_trajectory, "grid": exp_grid, "cell": exp_cell}


# --------------------------------------------------------------------------- findings and plots
def scored(cells: list[dict]) -> list[dict]:
    return [c for c in cells if c.get("fidelity_mean") is not None
            and np.isfinite(c["fidelity_mean"])]


def fewest_steps_to_95(cells: list[dict]) -> dict[str, dict]:
    """Per scheduler: best fidelity over its step counts, and the fewest steps reaching 95% of that best."""
    out = {}
    for name in dict.fromkeys(c["scheduler"] for c in cells):
        mine = sorted((c for c in cells if c["scheduler"] == name), key=lambda c: c["num_inference_steps"])
        best = max(mine, key=lambda c: c["fidelity_mean"])
        # With a best of 0 every cell "reaches 95%" of it: undefined, not the smallest step count.
        first = next(c for c in mine if c["fidelity_mean"] >= 0.95 * best["fidelity_mean"]) \
            if best["fidelity_mean"] > 0 else None
        out[name] = {"best": best["fidelity_mean"], "best_ci95": best["fidelity_ci95"],
                     "best_steps": best["num_inference_steps"] if best["fidelity_mean"] > 0 else None,
                     "steps_to_95": first["num_inference_steps"] if first else None,
                     "tested_steps": [c["num_inference_steps"] for c in mine]}
    return out


def pareto_front(cells: list[dict]) -> list[dict]:
    """Cells no other cell beats on both fidelity (higher) and seconds per image (lower)."""
    front = [c for c in cells if not any(
        o["fidelity_mean"] >= c["fidelity_mean"] and o["sec_per_image"] <= c["sec_per_image"]
        and (o["fidelity_mean"] > c["fidelity_mean"] or o["sec_per_image"] < c["sec_per_image"]) for o in cells)]
    unique = {(c["fidelity_mean"], c["sec_per_image"]): c for c in reversed(front)}  # a cell shared by experiments
    return sorted(unique.values(), key=lambda c: c["sec_per_image"])


def indistinguishable_from_best(cells: list[dict]) -> tuple[dict, list[dict]]:
    """The best cell and every cell whose mean lies inside the best cell's 95% CI."""
    best = max(cells, key=lambda c: c["fidelity_mean"])
    return best, [c for c in cells if c["fidelity_mean"] >= best["fidelity_ci95"][0]]


def findings_markdown(m: dict) -> str:
    exps, key = m["experiments"], m["fidelity_key"]
    lines = [f"# Task B findings: {m['model']}", "",
             f"Generated from metrics.json. Every scored cell: {m['n_prompts']} prompts x {m['n_seeds']} seeds; "
             f"fidelity = oracle rate `{key}` (mean over prompts, bootstrap 95% CI over prompts); diversity = mean "
             f"pairwise EfficientNet distance between a prompt's seeds; time on {m['device']} "
             f"({m['threads']} torch threads). The model's own settings: {m['model_settings']}. One image moves a "
             f"cell's rate by {1 / (m['n_prompts'] * m['n_seeds']):.3f}.", ""]
    every = scored([c for name, cells in exps.items() if name != "negative" for c in cells])
    if every and max(c["fidelity_mean"] for c in every) == 0:
        lines += [f"**No cell got any image fully right by `{key}`: fidelity cannot rank these settings.** "
                  "The per-attribute rates in metrics.json (colour, shape, ...) still differ; rerun with "
                  "`--fidelity-key color` (or shape) to rank by one of them.", ""]
    for name in ("schedulers", "steps"):
        cells = scored(exps.get(name, []))
        if not cells:
            continue
        lines += [f"## {name}: fewest steps to reach 95% of each scheduler's best fidelity", "",
                  "| scheduler | steps tried | best fidelity [95% CI] | at steps | fewest steps to 95% of best |",
                  "|---|---|---|---|---|"]
        for sched, r in fewest_steps_to_95(cells).items():
            lines.append(f"| {short(sched)} | {', '.join(map(str, r['tested_steps']))} | {r['best']:.3f} "
                         f"[{r['best_ci95'][0]:.3f}, {r['best_ci95'][1]:.3f}] | {fmt(r['best_steps'], 'd')} | "
                         f"{'n/a (best is 0)' if r['steps_to_95'] is None else r['steps_to_95']} |")
        best, tied = indistinguishable_from_best(cells)
        lines += ["", f"Best cell: {best['label']} ({best['fidelity_mean']:.3f}); {len(tied) - 1} of the other "
                      f"{len(cells) - 1} cells have a mean inside its 95% CI"
                      + (f" ({', '.join(c['label'] for c in tied if c is not best)})." if len(tied) > 1 else ".")
                  + " A 95% step count is only as sharp as these CIs.", ""]
    cells = scored(exps.get("cfg", []))
    if cells:
        best, tied = indistinguishable_from_best(cells)
        g = sorted(c["guidance_scale"] for c in tied)
        div = sorted(cells, key=lambda c: c["guidance_scale"])
        lines += ["## cfg: guidance scale", "",
                  f"Best guidance {best['guidance_scale']:g} (fidelity {best['fidelity_mean']:.3f} "
                  f"[{best['fidelity_ci95'][0]:.3f}, {best['fidelity_ci95'][1]:.3f}], {best['num_inference_steps']} "
                  f"steps). Guidance scales whose mean lies inside that CI (the best range these numbers support): "
                  f"{', '.join(f'{v:g}' for v in g)}. Diversity from guidance {div[0]['guidance_scale']:g} to "
                  f"{div[-1]['guidance_scale']:g}: {fmt(div[0]['diversity'])} -> {fmt(div[-1]['diversity'])}.", ""]
    cells = scored(exps.get("eta", []))
    if cells:
        lines += ["## eta (DDIM)", "", "| eta | fidelity [95% CI] | diversity |", "|---|---|---|"]
        lines += [f"| {c['eta']:g} | {c['fidelity_mean']:.3f} [{c['fidelity_ci95'][0]:.3f}, {c['fidelity_ci95'][1]:.3f}]"
                  f" | {fmt(c['diversity'])} |" for c in cells]
        lines.append("")
    neg = exps.get("negative", [])
    if len(neg) == 2:
        c = neg[1]
        lines += ["## negative prompts", "",
                  f"Prompts naming only a shape ({', '.join(c['prompts'])}); negative prompt = the colour the model "
                  f"drew most for each on separate seeds ({', '.join(c['negatives'])}). Rate of that colour: "
                  f"{neg[0]['negative_colour_rate']:.3f} without, {c['negative_colour_rate']:.3f} with the negative "
                  f"prompt: a drop of {c['colour_rate_drop']:.3f} (95% CI {c['colour_rate_drop_ci95'][0]:.3f} to "
                  f"{c['colour_rate_drop_ci95'][1]:.3f}). Cost: the share of images showing the asked shape goes "
                  f"from {neg[0]['fidelity_mean']:.3f} to {c['fidelity_mean']:.3f} (change "
                  f"{0.0 - c['shape_rate_cost']:+.3f}, CI {0.0 - c['shape_rate_cost_ci95'][1]:+.3f} to "
                  f"{0.0 - c['shape_rate_cost_ci95'][0]:+.3f}).", ""]
    cells = scored(exps.get("grid", []))
    if cells:
        best, tied = indistinguishable_from_best(cells)
        lines += ["## grid", "", f"Best cell {best['label']}: {best['fidelity_mean']:.3f} "
                                 f"[{best['fidelity_ci95'][0]:.3f}, {best['fidelity_ci95'][1]:.3f}]; {len(tied) - 1} "
                                 "other cells inside its CI.", ""]
    if every:
        front = pareto_front(every)
        lines += ["## Fidelity vs time: the Pareto front", "",
                  "Cells no other cell beats on both fidelity and seconds per image (fastest first):", ""]
        lines += [f"- {c['label']} ({c['experiment']}): fidelity {c['fidelity_mean']:.3f}, {c['sec_per_image']:.3f} "
                  "s/image" for c in front]
        lines.append("")
    if every:
        lines += ["## Every scored cell: oracle rate of each attribute (over images)", "",
                  "| experiment | cell | all | shape | colour | size | position | count | diversity | s/image |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in every:
            a = c["attributes"]
            lines.append(f"| {c['experiment']} | {c['label']} | " + " | ".join(fmt(a.get(k)) for k in FIDELITY_KEYS)
                         + f" | {fmt(c['diversity'])} | {c['sec_per_image']:.3f} |")
        lines.append("")
    if exps.get("trajectory"):
        lines += ["## trajectory", "", "Predicted clean image at every step: "
                  + ", ".join(f"[{c['label']}]({c['filmstrip']}) ([gif]({c['gif']}))" for c in exps["trajectory"]), ""]
    failed = [c for cells in exps.values() for c in cells if "error" in c]
    if failed:
        lines += ["## Cells that failed", ""] + [f"- {c['experiment']} {c['label']}: {c['error']}" for c in failed] + [""]
    lines += ["## Figures", ""] + [f"- [{p}]({p})" for p in m["figures"]]
    return "\n".join(lines) + "\n"


def _errorbar(ax, cells, x_key, label, shift: float = 1.0):
    cells = sorted(cells, key=lambda c: c[x_key])
    x = [c[x_key] * shift for c in cells]  # a small per-series shift (log axis) keeps overlapping CIs readable
    y = np.array([c["fidelity_mean"] for c in cells])
    err = np.array([[c["fidelity_mean"] - c["fidelity_ci95"][0], c["fidelity_ci95"][1] - c["fidelity_mean"]]
                    for c in cells]).T
    ax.errorbar(x, y, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=label)


def make_plots(m: dict, run_dir: Path) -> list[str]:
    plt = pyplot()
    exps, made = m["experiments"], []
    steps_cells = scored(exps.get("schedulers", []) + exps.get("steps", []))
    if steps_cells:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = list(dict.fromkeys(c["scheduler"] for c in steps_cells))
        for k, name in enumerate(names):
            mine = {c["num_inference_steps"]: c for c in steps_cells if c["scheduler"] == name}
            _errorbar(ax, list(mine.values()), "num_inference_steps", short(name), 1 + 0.04 * (k - len(names) / 2))
        ax.set(xscale="log", xlabel="num_inference_steps", ylabel=f"fidelity ({m['fidelity_key']})",
               title="fidelity vs steps per scheduler (95% CI over prompts)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "fidelity_vs_steps.png", dpi=110)
        plt.close(fig)
        made.append("fidelity_vs_steps.png")
    cfg = scored(exps.get("cfg", []))
    if cfg:
        fig, ax = plt.subplots(figsize=(6, 4))
        _errorbar(ax, cfg, "guidance_scale", "fidelity")
        ax.set(xlabel="guidance_scale", ylabel=f"fidelity ({m['fidelity_key']})", title="fidelity vs guidance")
        ax2 = ax.twinx()
        ax2.plot([c["guidance_scale"] for c in cfg], [c["diversity"] for c in cfg], "s--", color="grey")
        ax2.set_ylabel("diversity (grey)")
        fig.tight_layout()
        fig.savefig(run_dir / "fidelity_vs_guidance.png", dpi=110)
        plt.close(fig)
        made.append("fidelity_vs_guidance.png")
    every = scored([c for name, cells in exps.items() if name != "negative" for c in cells])
    if every:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for exp in dict.fromkeys(c["experiment"] for c in every):
            mine = [c for c in every if c["experiment"] == exp]
            ax.scatter([c["sec_per_image"] for c in mine], [c["fidelity_mean"] for c in mine], label=exp, alpha=0.7)
        front = pareto_front(every)
        ax.plot([c["sec_per_image"] for c in front], [c["fidelity_mean"] for c in front], "k-", lw=1,
                label="Pareto front")
        for c in front:
            ax.annotate(c["label"], (c["sec_per_image"], c["fidelity_mean"]), fontsize=7)
        ax.set(xlabel="seconds per image", ylabel=f"fidelity ({m['fidelity_key']})", title="fidelity vs time")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "pareto.png", dpi=110)
        plt.close(fig)
        made.append("pareto.png")
    return made


def contact_sheets(ctx: Context, m: dict) -> list[str]:
    """<experiment>_grid.png: one row per cell, the first seed of the first prompts, for people who want to look."""
    made = []
    for exp, cells in m["experiments"].items():
        rows = [(c["label"], ctx.thumbs.get(c["label"] + "|" + exp)) for c in cells]
        rows = [(label, t) for label, t in rows if t is not None]
        if not rows:
            continue
        cols = min(len(t) for _, t in rows)
        images = [t[j] for _, t in rows for j in range(cols)]
        image_grid(images, len(rows), cols, row_labels=[label for label, _ in rows], cell=64).save(
            ctx.run_dir / f"{exp}_grid.png")
        made.append(f"{exp}_grid.png")
    return made


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    device = pick_device(args.device)

    # 1. model, oracle, feature encoder; grid names are checked against this pipeline before any cell runs
    pipe, settings = load_pipeline(args.model, device=device)
    if args.axes:
        check_axes(args.axes, pipe)
    oracle = fidelity.Oracle.load(args.oracle, device)
    encoder = load_image_encoder(DEFAULT_IMAGE_ENCODER, device)
    config = {k: v for k, v in vars(args).items()}
    run_dir = make_run_dir("task_b", args.run_name, config, args.outputs)
    wandb_run = init_wandb(args.wandb, "task_b", config, args.run_name)
    ctx = Context(args, pipe, settings, oracle, encoder, run_dir, wandb_run)
    # A warm-up call, so the first cell's time does not include one-off setup.
    generate_images(pipe, [ctx.prompts[0]["text"]], [args.seed], 1, settings["guidance"], settings["size"],
                    progress=False)

    # 2. the experiments, cell by cell (finished cells are read back from cells.json)
    metrics: dict = {"model": settings["name"], "model_id": settings["id"],
                     "model_settings": {k: settings[k] for k in ("scheduler", "steps", "guidance", "size")},
                     "prompts": [p["text"] for p in ctx.prompts], "n_prompts": len(ctx.prompts),
                     "n_seeds": args.seeds, "seed": args.seed, "fidelity_key": args.fidelity_key,
                     "device": str(device), "threads": torch.get_num_threads(), "experiments": {}, "timings": {}}
    for name in args.experiments:
        print(f"experiment {name}")
        t = time.time()
        metrics["experiments"][name] = RUNNERS[name](ctx)
        metrics["timings"][name + "_s"] = round(time.time() - t, 1)

    # 3. plots, contact sheets, findings, metrics
    metrics["figures"] = make_plots(metrics, run_dir) + contact_sheets(ctx, metrics)
    write_text(run_dir / "findings.md", findings_markdown(metrics))
    metrics["timings"]["total_s"] = round(time.time() - t0, 1)
    finish_run(run_dir, metrics)
    if wandb_run is not None:
        cells = [c for cs in metrics["experiments"].values() for c in scored(cs)]
        if len(cells) == 1:  # the sweep's metric
            wandb_run.summary["fidelity_mean"] = cells[0]["fidelity_mean"]
        wandb_run.finish()
    print(f"wrote {run_dir} ({metrics['timings']['total_s']} s)")
    return metrics


if __name__ == "__main__":
    cli(main)
