"""Task B: which inference settings (scheduler, steps, guidance, eta, negative prompts) make better images, by measurement?

Each experiment is a sweep of cells; every cell generates the same prompts x seeds (one torch.Generator per image,
seed + j for the j-th seed of every prompt, so the same seed gives the same image in every cell) and records the
oracle's fidelity (share of images with every named attribute right; mean over prompts with a bootstrap 95% CI
over prompts), the per-attribute rates (shape / colour / size / position / count), diversity (mean pairwise
EfficientNet feature distance between the seeds of a prompt, averaged over prompts), seconds per image (the fastest
of the cell's full generation batches and --time-repeats more calls on one batch, utils.time_call) and the
timesteps the model was evaluated at. Every scheduler is built with a timestep spacing it handles that starts at
the top of the noise schedule (utils.make_scheduler). A cell that cannot change the image (the same images as an
earlier cell of its experiment, or a setting the pipeline or scheduler ignores, e.g. eta on Euler, a negative
prompt at guidance 1) is marked `no_effect` and not ranked. findings.md is generated from those numbers; the plots
show fidelity vs steps per scheduler, fidelity vs guidance and fidelity vs time with the Pareto front.

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
A grid checks every value before any cell runs (one line naming a bad one) and exits non-zero, listing them,
when any cell failed.
A grid, and one cell (as `wandb sweep sweeps/task_b.yaml` runs it):
    python task_b.py --experiments grid --x num_inference_steps=5,10,20 --y guidance_scale=1:9:2
    python task_b.py --scheduler euler_a --steps 10 --guidance 5 --wandb
Writes outputs/task_b/<run_name>/: metrics.json ({"experiments": {name: [cell, ...]}}), findings.md,
fidelity_vs_steps.png, fidelity_vs_guidance.png, pareto.png, <experiment>_grid.png (rows cells, columns prompts),
trajectory_<scheduler>.png / .gif, cells.json (finished cells' scores: rerunning the same command resumes)
and cells/ (their images).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import json
import re
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import fidelity
import generate_data as gd
from oracle import ATTRIBUTES, DEFAULT_ORACLE, Oracle, summarize_scores, to_uint8_64
from utils import (DEFAULT_IMAGE_ENCODER, MODEL_REGISTRY, ImageStore, UserError, bootstrap_ci, check, cli, comma_list,
                   common_args, fmt, fmt_ci, fmt_delta, generate_images, image_grid, load_image_encoder, load_pipeline,
                   make_scheduler, md_table, model_fingerprint, parse_checked, pyplot, read_json, resolve_model,
                   start_run, time_call, write_json, write_text)

EXPERIMENTS = ("schedulers", "steps", "student", "cfg", "eta", "negative", "trajectory", "grid", "cell")
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
    p.add_argument("--kinds", type=comma_list(), default="single", help="prompt kinds: single, two (comma-separated)")
    p.add_argument("--fidelity-key", default="all",
                   help=f"oracle rate reported as fidelity_mean: {', '.join(FIDELITY_KEYS)}")
    p.add_argument("--zoo", type=comma_list(resolve_scheduler), default=",".join(SCHEDULERS),
                   help=f"schedulers of the schedulers/trajectory experiments: short names ({', '.join(SCHEDULERS)}) "
                        "or diffusers class names")
    p.add_argument("--sched-steps", type=comma_list(int, lo=1), default="3,6,12",
                   help="step counts of the schedulers experiment")
    p.add_argument("--true-ddpm", action="store_true",
                   help="schedulers experiment: add DDPM at all num_train_timesteps steps (the original sampler)")
    p.add_argument("--steps-list", type=comma_list(int, lo=1), default="1,2,3,6,12,24",
                   help="step counts of the steps experiment")
    p.add_argument("--student", default=None,
                   help="student experiment: a few-step model distilled from --model (registry name or folder), run "
                        "over --steps-list at its own recommended guidance and scheduler, its curve beside the "
                        "teacher's in fidelity_vs_steps.png (default: the registry's student of --model, "
                        "e.g. shapes-tiny-f2-turbo for shapes-tiny-f2; '' for none)")
    p.add_argument("--cfg-list", type=comma_list(float, lo=0), default="1,3,5,7,9",
                   help="guidance scales of the cfg experiment")
    p.add_argument("--cfg-steps", type=int, default=12, help="steps of the cfg experiment")
    p.add_argument("--eta-list", type=comma_list(float), default="0,0.5,1",
                   help="DDIM eta values of the eta experiment")
    p.add_argument("--eta-steps", type=int, default=12, help="steps of the eta experiment")
    p.add_argument("--neg-steps", type=int, default=12, help="steps of the negative experiment")
    p.add_argument("--traj-steps", type=int, default=12, help="steps of the trajectory experiment")
    p.add_argument("--x", default=None, help="grid X axis: name=v1,v2,... or name=start:stop:step (stop included)")
    p.add_argument("--y", default=None, help="grid Y axis (optional), same syntax as --x")
    p.add_argument("--scheduler", default=None, help="cell experiment: scheduler (short or class name)")
    p.add_argument("--steps", type=int, default=None, help="cell experiment: num_inference_steps")
    p.add_argument("--guidance", type=float, default=None, help="cell experiment: guidance_scale")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    p.add_argument("--time-repeats", type=int, default=1,
                   help="timed calls on one batch per cell after its generation, whose own full batches are timed "
                        "too; the fastest of all counts")
    p.add_argument("--oracle", default=str(DEFAULT_ORACLE), help="oracle folder (oracle.py train)")
    common_args(p, "task_b", QUICK, helps={
        "seed": "seed of the prompt list and of the noise (seed + j)",
        "run_name": "run folder under <outputs>/task_b (default: the start time); an existing one is resumed",
        "wandb": "log every cell, and the run's metrics, to wandb (offline unless WANDB_MODE=online)"})
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    return parse_checked(parser, argv, QUICK, check_args)


def check_args(args: argparse.Namespace) -> None:
    single = any(v is not None for v in (args.scheduler, args.steps, args.guidance))
    names = args.experiments or ("cell" if single else ",".join(DEFAULT_EXPERIMENTS))
    names = [e.strip() for e in names.split(",") if e.strip()]
    if args.student is None:
        args.student = MODEL_REGISTRY.get(args.model, {}).get("student", "")
    if names == ["all"]:
        names = [e for e in EXPERIMENTS if e not in ("grid", "cell")] + (["grid"] if args.x else [])
        if not args.student:
            names.remove("student")
    for name in names:
        check(name in EXPERIMENTS, f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}, all")
    check(bool(names), f"--experiments is empty; valid: {', '.join(EXPERIMENTS)}, all")
    args.experiments = list(dict.fromkeys(names))
    check(args.n_prompts > 0 and args.seeds > 0, f"--n-prompts and --seeds must be positive, got {args.n_prompts} "
                                                  f"and {args.seeds}")
    for kind in args.kinds:
        check(kind in gd.KINDS, f"unknown prompt kind {kind!r} in --kinds; choose from {', '.join(gd.KINDS)}")
    check(args.fidelity_key in FIDELITY_KEYS,
          f"unknown --fidelity-key {args.fidelity_key!r}; choose one of {', '.join(FIDELITY_KEYS)}")
    for name in ("zoo", "sched_steps", "steps_list", "cfg_list", "eta_list"):
        check(bool(getattr(args, name)), f"--{name.replace('_', '-')} is empty")
    for name in ("cfg_steps", "eta_steps", "neg_steps", "traj_steps", "batch_size", "time_repeats"):
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
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
    check("student" not in args.experiments or bool(args.student), "the student experiment needs --student MODEL")
    if "student" in args.experiments:
        resolve_model(args.student)


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


def _members(annotation) -> list:
    """The types of an annotation, unions unpacked (`int | None` -> [int, NoneType])."""
    import types
    import typing

    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


def _choices(param: inspect.Parameter | None) -> tuple | None:
    """The allowed values of a `Literal[...]` argument (e.g. timestep_spacing), else None."""
    import typing

    if param is None:
        return None
    literals = [m for m in _members(param.annotation) if typing.get_origin(m) is typing.Literal]
    return tuple(v for m in literals for v in typing.get_args(m)) or None


def takes_one_value(param: inspect.Parameter) -> bool:
    """Whether an argument accepts a single number, string or flag (a grid cell gives it one), not only a list."""
    import typing

    if param.annotation is param.empty:
        return True
    for m in _members(param.annotation):
        if isinstance(m, str):  # a postponed annotation: read its text
            return any(t.strip() in ("int", "float", "str", "bool") or t.strip().startswith("Literal")
                       for t in m.split("|"))
        if m in (int, float, str, bool) or typing.get_origin(m) is typing.Literal:
            return True
    return False


def sweepable(pipe) -> tuple[list[str], list[str]]:
    """(pipeline __call__ arguments one may sweep, scheduler config arguments) for this pipeline.

    Arguments that take only lists (timesteps, sigmas, trained_betas, SDXL's size tuples) are left out: a grid
    cell holds one value per argument.
    """
    call = [n for n, p in inspect.signature(pipe.__call__).parameters.items()
            if n not in RESERVED and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and takes_one_value(p)
            and n not in broken_arguments(pipe)]
    init = inspect.signature(type(pipe.scheduler).__init__).parameters
    sched = sorted(k for k in pipe.scheduler.config if not k.startswith("_")
                   and (k not in init or takes_one_value(init[k])))
    return call, sched


def broken_arguments(pipe) -> dict[str, str]:
    """Pipeline arguments that fail for every value with the installed libraries, and why (not offered to the grid)."""
    import diffusers

    broken = {}
    encoder = getattr(pipe, "text_encoder", None)
    if isinstance(pipe, diffusers.StableDiffusionPipeline) and encoder is not None \
            and not hasattr(encoder, "text_model"):
        broken["clip_skip"] = ("StableDiffusionPipeline applies clip_skip through text_encoder.text_model, which "
                               f"the installed transformers' {type(encoder).__name__} does not have")
    return broken


def check_axes(axes: list[tuple[str, list]], pipe) -> None:
    """Every swept name is a pipeline or scheduler argument and every value one it takes: else one line saying so."""
    call, sched = sweepable(pipe)
    every = inspect.signature(pipe.__call__).parameters
    init = inspect.signature(type(pipe.scheduler).__init__).parameters
    for name, values in axes:
        check(name not in RESERVED, f"{name!r} is set by task_b itself (one generator per image, numpy output, the "
                                    "prompts) and cannot be swept")
        check(name not in broken_arguments(pipe), f"{name!r} cannot be swept: {broken_arguments(pipe).get(name)}")
        check(name not in every or name in call,
              f"{name!r} takes a list ({every[name].annotation if name in every else ''}), and a grid cell holds one "
              "value per argument: sweep num_inference_steps or a scheduler argument such as timestep_spacing instead")
        check(name in call or name in sched or name == "scheduler",
              f"{type(pipe).__name__} does not accept {name!r}; sweepable: scheduler, pipeline arguments "
              f"({', '.join(call)}), scheduler arguments ({', '.join(sched)})")
        if name == "scheduler":
            for i, v in enumerate(values):
                values[i] = resolve_scheduler(str(v))
        choices = _choices(every.get(name) or init.get(name))
        for v in values:
            check_value(name, v)
            if choices is not None:
                check(v in choices, f"{name} must be one of {', '.join(map(str, choices))}, got {v!r}")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The values the pipelines accept, checked before any cell runs (everything else is caught by the dry run).
VALUE_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_inference_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                            "must be a positive integer"),
    "height": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0 and v % 8 == 0,
               "must be a positive integer divisible by 8 (the VAE's latent grid)"),
    "guidance_scale": (lambda v: _number(v) and v >= 0, "must be a number >= 0"),
    "eta": (lambda v: _number(v) and v >= 0, "must be a number >= 0 (0 = deterministic DDIM)"),
    "guidance_rescale": (lambda v: _number(v) and v >= 0, "must be a number >= 0 (0 = off)"),
    "clip_skip": (lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                  "must be none or an integer >= 0 (text-encoder layers to skip)"),
    "negative_prompt": (lambda v: v is None or isinstance(v, (str, int, float)), "must be a string or none"),
}
VALUE_RULES["width"] = VALUE_RULES["height"]
NEGATIVES = ("negative_prompt", "negative_prompt_2", "negative_prompt_3")  # SD, + SDXL's and SD3's other encoders
VALUE_RULES.update({name: VALUE_RULES["negative_prompt"] for name in NEGATIVES[1:]})
VALUE_RULES["denoising_end"] = (lambda v: v is None or (_number(v) and 0 < v <= 1), "must be none or in (0, 1]")


def check_value(name: str, value: Any) -> None:
    rule = VALUE_RULES.get(name)
    if rule is not None:
        check(rule[0](value), f"{name} {rule[1]}, got {value!r}")


def check_cells(ctx: "Context", cells: list[dict]) -> None:
    """Every cell once on one image before the sweep starts: a value the pipeline or scheduler rejects is one line.

    Catches what no rule above knows (a scheduler argument out of range, a step count a scheduler refuses, a
    clip_skip deeper than the text encoder) while it costs one image per cell.
    """
    prompt, seed = ctx.prompts[0]["text"], ctx.args.seed
    for settings in cells:
        label = cell_label(settings, [n for n, _ in ctx.args.axes])
        try:
            pipeline_call(ctx, settings)([prompt], [seed])
        except UserError as err:
            raise UserError(f"grid cell {label}: {err}") from None
        except Exception as err:  # noqa: BLE001 - any library error becomes one line naming the cell
            raise UserError(f"grid cell {label} fails, so no cell ran: {one_line(err)}") from None


def one_line(err: Exception) -> str:
    """'TypeError: first line of the message' (some library errors append a whole config dump)."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------- cells
class Context:
    """What every cell shares: the pipeline, its base scheduler config, prompts, seeds, the oracle and the encoder."""

    def __init__(self, args, pipe, settings, oracle, encoder, run_dir: Path, wandb_run):
        self.args, self.pipe, self.settings, self.oracle, self.encoder = args, pipe, settings, oracle, encoder
        self.base_scheduler = type(pipe.scheduler).__name__
        self.base_config = dict(pipe.scheduler.config)
        self.compatible = {c.__name__ for c in pipe.scheduler.compatibles} | {self.base_scheduler}
        self.run_dir, self.wandb = run_dir, wandb_run
        self.prompts = [p for kind in args.kinds for p in gd.make_prompts(kind, args.n_prompts, args.seed)]
        self.cache_path = run_dir / "cells.json"
        self.cache = read_json(self.cache_path) if self.cache_path.is_file() else {}
        self.thumbs: dict[str, np.ndarray] = {}  # "label|experiment" -> first seed of the first prompts
        self.images: dict[str, np.ndarray] = {}  # "label|experiment" -> every image of the cell (64 px)
        self.call_args, self.sched_args = sweepable(pipe)
        # In the cache key: a retrained model in the same folder must not reuse the old model's cells.
        self.fingerprint = model_fingerprint(settings["id"])

    def defaults(self) -> dict:
        steps = self.settings["steps"]
        if self.args.quick:  # --quick promises <= 2 steps, also to a grid or cell that does not set them
            steps = min(steps, QUICK["cfg_steps"])
        return {"scheduler": self.base_scheduler, "num_inference_steps": steps,
                "guidance_scale": self.settings["guidance"]}


def scheduler_overrides(ctx: Context, settings: dict) -> dict:
    """The cell's settings that are scheduler config arguments (the rest go to the pipeline call)."""
    return {k: v for k, v in settings.items() if k in ctx.sched_args and k not in ctx.call_args}


def scheduler_for(ctx: Context, settings: dict):
    """The cell's scheduler (not yet on the pipeline): utils.make_scheduler gives every class a timestep spacing it
    handles that starts at the top of the noise schedule; the cell's own scheduler arguments win over it."""
    name = settings["scheduler"]
    check(name in ctx.compatible, f"scheduler {name} does not fit {type(ctx.pipe).__name__}'s "
                                  f"{ctx.base_scheduler}; compatible: {', '.join(sorted(ctx.compatible))}")
    return make_scheduler(name, ctx.base_config, **scheduler_overrides(ctx, settings))


def prepare(ctx: Context, settings: dict) -> tuple[int, float, dict]:
    """Put the cell's scheduler on the pipeline; return (steps, guidance, extra pipeline kwargs)."""
    ctx.pipe.scheduler = scheduler_for(ctx, settings)
    sched_over = scheduler_overrides(ctx, settings)
    call_kw = {k: v for k, v in settings.items()
               if k not in ("scheduler", "num_inference_steps", "guidance_scale") and k not in sched_over}
    return int(settings["num_inference_steps"]), float(settings["guidance_scale"]), call_kw


def pipeline_call(ctx: Context, settings: dict, **more) -> Callable[[list[str], list[int]], np.ndarray]:
    """(texts, seeds) -> uint8 images at this cell's settings; its scheduler goes on the pipeline now."""
    steps, guidance, call_kw = prepare(ctx, settings)
    call_kw.update(more)
    size = ctx.settings["size"]
    if "height" in call_kw or "width" in call_kw:  # passed once: the cell's values, the model's size for the other
        call_kw.update(height=call_kw.get("height") or size, width=call_kw.get("width") or size)
        size = None
    negatives = {k: call_kw.pop(k) for k in NEGATIVES if call_kw.get(k) is not None}

    def run(texts: list[str], seeds: list[int], batch_times: list[float] | None = None) -> np.ndarray:
        kw = dict(call_kw)
        for k, v in negatives.items():
            # SD wants negative_prompt of the prompt's type (one per image, like the prompts; generate_images splits
            # it into batches); SDXL/SD3 turn a string negative_prompt_2/_3 into a list themselves.
            kw[k] = list(v) if isinstance(v, (list, tuple)) else [str(v)] * len(texts) if k == "negative_prompt" \
                else str(v)
        return generate_images(ctx.pipe, texts, seeds, steps, guidance, size, ctx.args.batch_size, progress=False,
                               batch_times=batch_times, **kw)

    return run


def evaluated_timesteps(scheduler) -> list:
    """The timesteps the model is called at (the scheduler's list after the pipeline set it; Heun repeats some)."""
    return [int(v) if float(v).is_integer() else round(float(v), 3) for v in scheduler.timesteps.tolist()]


def cell_key(ctx: Context, settings: dict, extra: Any = None) -> str:
    a = ctx.args
    # The scheduler's full config is in the key: a changed spacing or default must not reuse an old cell.
    sched = {k: v for k, v in dict(scheduler_for(ctx, settings).config).items() if not k.startswith("_")}
    blob = json.dumps([ctx.settings["id"], ctx.fingerprint, a.n_prompts, a.seeds, a.seed, a.kinds, a.fidelity_key,
                       settings, sched, extra], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def generate(ctx: Context, settings: dict, texts: list[str], seeds: list[int], **more) -> tuple[np.ndarray, list, list]:
    """(64-px uint8 images, the timesteps the model was evaluated at, wall seconds of each full batch's call)."""
    batch_times: list[float] = []
    images = pipeline_call(ctx, settings, **more)(texts, seeds, batch_times=batch_times)
    return to_uint8_64(images), evaluated_timesteps(ctx.pipe.scheduler), batch_times


def time_cell(ctx: Context, settings: dict, texts: list[str], seeds: list[int], batch_times: list[float],
              **more) -> dict:
    """Seconds per image of this cell: the fastest of its generation's full batches (`batch_times`, from `generate`)
    and --time-repeats more calls on its first batch (utils.time_call, no warm-up: the generation made this call).

    Timing the generation's own batches saves re-running them (task_b's cells spent 3 of every 5 batches on timing
    before); the run's first, cold call (one-off costs) only adds a slow time, which the minimum passes over.
    """
    n = min(ctx.args.batch_size, len(texts))
    run = pipeline_call(ctx, settings, **more)
    timing, _ = time_call(lambda: run(texts[:n], seeds[:n]), warmup=0, repeats=ctx.args.time_repeats)
    times = list(batch_times) + timing["times_s"]
    return {"sec_per_image": min(times) / n, "sec_per_image_median": statistics.median(times) / n, "timed_batch": n,
            "timed_calls": len(times)}


def per_prompt_diversity(ctx: Context, images: np.ndarray, n_prompts: int) -> float:
    """Mean over prompts of the mean pairwise feature distance between that prompt's seeds (images prompt-major)."""
    model, info = ctx.encoder
    feats = fidelity.fd_features(model, info, images, "diversity features").reshape(n_prompts, ctx.args.seeds, -1)
    return float(np.nanmean([fidelity.diversity(f) for f in feats])) if ctx.args.seeds > 1 else float("nan")


def run_cell(ctx: Context, experiment: str, settings: dict, label: str) -> dict:
    """Generate every prompt x seed with these settings, score fidelity, diversity and time (cached by settings)."""
    key = cell_key(ctx, settings)
    a = ctx.args
    texts = [p["text"] for p in ctx.prompts for _ in range(a.seeds)]
    seeds = [a.seed + j for _ in ctx.prompts for j in range(a.seeds)]
    store, items = cell_images(ctx, key, texts, seeds)
    if key not in ctx.cache:
        try:
            images, timesteps, batch_times = generate(ctx, settings, texts, seeds)
            timing = time_cell(ctx, settings, texts, seeds, batch_times)
        except (ValueError, RuntimeError, IndexError, TypeError) as err:  # e.g. a step count a scheduler rejects
            print(f"  {experiment:10s} {label:40s} FAILED: {one_line(err)}")
            return {**settings, "experiment": experiment, "label": label, "error": one_line(err)}
        scores = ctx.oracle.score(images, [p for p in ctx.prompts for _ in range(a.seeds)])
        per_prompt = np.array([[np.nan if s[a.fidelity_key] is None else float(s[a.fidelity_key])
                                for s in scores[i * a.seeds:(i + 1) * a.seeds]] for i in range(len(ctx.prompts))])
        est = bootstrap_ci(np.nanmean(per_prompt, axis=1), seed=a.seed)
        summary = summarize_scores(scores)
        cell = {**settings, "fidelity_mean": est["mean"], "fidelity_ci95": est["ci95"], "fidelity_key": a.fidelity_key,
                "attributes": {k: summary[k] for k in ATTRIBUTES},
                "diversity": per_prompt_diversity(ctx, images, len(ctx.prompts)), **timing,
                "timestep_spacing": getattr(ctx.pipe.scheduler.config, "timestep_spacing", None),
                "timesteps": timesteps, "n_prompts": len(ctx.prompts), "n_seeds": a.seeds}
        ctx.cache[key] = cell
        save_cell_images(store, items, images)
        write_json(ctx.cache_path, ctx.cache)
    cell = dict(ctx.cache[key], experiment=experiment, label=label)
    keep_images(ctx, label + "|" + experiment, store.load(items))
    if ctx.wandb is not None:
        ctx.wandb.log({"experiment": experiment, "label": label, **_loggable(cell)})
    print(f"  {experiment:10s} {label:40s} fidelity {cell['fidelity_mean']:.3f} "
          f"[{cell['fidelity_ci95'][0]:.3f}, {cell['fidelity_ci95'][1]:.3f}]  colour {fmt(cell['attributes']['color'])}"
          f"  shape {fmt(cell['attributes']['shape'])}  diversity {fmt(cell['diversity'])}  "
          f"{cell['sec_per_image']:.3f} s/image")
    return cell


def cell_images(ctx: Context, key: str, texts: list[str], seeds: list[int]) -> tuple[ImageStore, list[dict]]:
    """The store of a cell's 64-px images (run_dir/cells/, keyed by the model and the cell) and their items.

    cells.json holds the cell's scores; its images live here, so a rerun draws contact sheets without generating.
    """
    items = [{"id": f"{i:05d}", "text": text, "seed": int(seed)} for i, (text, seed) in enumerate(zip(texts, seeds))]
    return ImageStore(ctx.run_dir / "cells", ctx.settings, key=[key]), items


def save_cell_images(store: ImageStore, items: list[dict], images: np.ndarray) -> None:
    for item, image in zip(items, images):
        store.save(item, image)
    store.merge()


def keep_images(ctx: Context, name: str, images: np.ndarray) -> None:
    """A cell's images (prompt-major, --seeds per prompt) for the no-effect check and the contact sheets."""
    ctx.images[name] = images
    ctx.thumbs[name] = images[::ctx.args.seeds][:GRID_SHOWN]


# --------------------------------------------------------------------------- cells that cannot change the image
def ignored_setting(ctx: Context, cell: dict) -> str | None:
    """Why a cell's setting cannot change the image, for combinations known to be no-ops (else None)."""
    import diffusers

    guided = float(cell.get("guidance_scale", 0)) > 1  # diffusers' do_classifier_free_guidance
    if any(cell.get(k) not in (None, "") for k in NEGATIVES) and not guided:
        return (f"a negative prompt at guidance_scale {cell['guidance_scale']:g} is never used (classifier-free "
                "guidance needs guidance_scale > 1)")
    if cell.get("guidance_rescale") and not guided:
        return f"guidance_rescale rescales classifier-free guidance, which guidance_scale {cell['guidance_scale']:g} turns off"
    cls = getattr(diffusers, cell["scheduler"])
    if cell.get("eta") and "eta" not in inspect.signature(cls.step).parameters:
        return f"{short(cell['scheduler'])}'s step() takes no eta (the pipeline passes eta only to schedulers that do)"
    init = inspect.signature(cls.__init__).parameters
    for name in scheduler_overrides(ctx, cell):
        if name not in init:
            return f"{short(cell['scheduler'])} has no {name} argument"
    return None


def mark_no_effect(ctx: Context, experiment: str, cells: list[dict]) -> list[dict]:
    """Mark (`no_effect`: why) each cell with a known no-op setting or the same images as an earlier cell.

    "The same images" allows 1/255 per pixel: two samplers that compute the same thing in another order differ by
    float rounding only.
    """
    seen: list[tuple[str, np.ndarray]] = []
    for cell in cells:
        if "error" in cell:
            continue
        why = ignored_setting(ctx, cell)
        images = ctx.images.get(cell["label"] + "|" + experiment)
        if why is None and images is not None:
            why = next((f"the same images as {label}" for label, other in seen if other.shape == images.shape
                        and np.abs(other.astype(np.int16) - images.astype(np.int16)).max() <= 1), None)
        if why:
            cell["no_effect"] = why
            print(f"  {experiment:10s} {cell['label']:40s} no effect: {why}")
        elif images is not None:
            seen.append((cell["label"], images))
    return cells


def _loggable(cell: dict) -> dict:
    out = {k: v for k, v in cell.items() if isinstance(v, (int, float, str, bool)) and k != "label"}
    out.update({f"attr_{k}": v for k, v in cell["attributes"].items() if v is not None})
    return out


# --------------------------------------------------------------------------- experiments
def zoo_for(ctx: Context) -> list[str]:
    """The requested zoo minus schedulers that do not fit this pipeline (e.g. DDIM on a flow-matching model)."""
    zoo = [s for s in ctx.args.zoo if s in ctx.compatible]
    skipped = [s for s in ctx.args.zoo if s not in ctx.compatible]
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


def exp_student(ctx: Context) -> list[dict]:
    """The steps experiment again with the --student model (its own scheduler and guidance), same prompts and seeds;
    cells carry "model", and share the run's cell cache."""
    spipe, ssettings = load_pipeline(ctx.args.student, device=ctx.pipe.device)
    sctx = Context(ctx.args, spipe, ssettings, ctx.oracle, ctx.encoder, ctx.run_dir, ctx.wandb)
    sctx.cache = ctx.cache  # one cells.json: keys hold the model id and fingerprint
    cells = [run_cell(sctx, "student", {**sctx.defaults(), "num_inference_steps": s},
                      f"{ssettings['name']} {short(sctx.base_scheduler)} {s} steps") for s in ctx.args.steps_list]
    ctx.thumbs.update(sctx.thumbs)
    ctx.images.update(sctx.images)
    return [dict(c, model=ssettings["name"]) for c in cells]


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


def grid_cells(ctx: Context) -> list[dict]:
    """The settings of every grid cell: the model's defaults with the swept values (X outer, Y inner)."""
    axes = [(n, list(v)) for n, v in ctx.args.axes]
    check_axes(axes, ctx.pipe)
    return [{**ctx.defaults(), **dict(zip([n for n, _ in axes], combo))}
            for combo in itertools.product(*[v for _, v in axes])]


def cell_label(settings: dict, names: list[str]) -> str:
    return " ".join(f"{n}={short(settings[n]) if n == 'scheduler' else settings[n]}" for n in names)


def exp_grid(ctx: Context) -> list[dict]:
    names = [n for n, _ in ctx.args.axes]
    return [run_cell(ctx, "grid", settings, cell_label(settings, names)) for settings in grid_cells(ctx)]


def short(name: Any) -> str:
    inv = {v: k for k, v in SCHEDULERS.items()}
    return inv.get(name, str(name).replace("Scheduler", ""))


def exp_negative(ctx: Context) -> list[dict]:
    """Prompts naming a shape only; negative prompt = the colour drawn most for it on separate selection seeds."""
    a = ctx.args
    order = np.random.default_rng([a.seed, 13]).permutation(len(gd.SHAPES))
    shapes = [gd.SHAPES[i] for i in order[:min(a.n_prompts, len(gd.SHAPES))]]
    texts = [gd.object_phrase({"shape": s, "color": None, "size": None, "cell": None}, color=False) for s in shapes]
    base = {**ctx.defaults(), "num_inference_steps": a.neg_steps}
    # 1. which colour does the model draw for each shape? Seeds disjoint from the measured ones, so the drop below
    #    is not inflated by picking each prompt's luckiest colour on the same images (regression to the mean).
    sel_seeds = [a.seed + 100_000 + j for _ in shapes for j in range(a.seeds)]
    sel, timesteps, _ = generate(ctx, base, [t for t in texts for _ in range(a.seeds)], sel_seeds)
    negatives = [modal_colour(ctx.oracle.detect(sel[i * a.seeds:(i + 1) * a.seeds]), s, i)
                 for i, s in enumerate(shapes)]
    # 2. the same seeds with and without the negative prompt
    rep_texts = [t for t in texts for _ in range(a.seeds)]
    rep_neg = [n for n in negatives for _ in range(a.seeds)]
    seeds = [a.seed + j for _ in shapes for j in range(a.seeds)]
    cells, rates = [], {}
    for use in (False, True):
        key = cell_key(ctx, dict(base, negative=use), [texts, negatives])
        store, items = cell_images(ctx, key, rep_texts, seeds)
        if key not in ctx.cache:
            more = {"negative_prompt": rep_neg} if use else {}
            images, _, batch_times = generate(ctx, base, rep_texts, seeds, **more)
            timing = time_cell(ctx, base, rep_texts, seeds, batch_times, **more)
            dets = ctx.oracle.detect(images)
            per = lambda f: np.array([np.mean([f(d, i) for d in dets[i * a.seeds:(i + 1) * a.seeds]])  # noqa: E731
                                      for i in range(len(shapes))])
            shape_rate = per(lambda d, i: any(o["shape"] == shapes[i] for o in d))
            colour_rate = per(lambda d, i: any(o["color"] == negatives[i] for o in d))
            count_rate = per(lambda d, i: len(d) == 1)
            shape_est = bootstrap_ci(shape_rate, seed=a.seed)
            colour_est = bootstrap_ci(colour_rate, seed=a.seed)
            ctx.cache[key] = {**base, "negative_prompt": "<per prompt colour>" if use else None,
                              "fidelity_mean": shape_est["mean"], "fidelity_ci95": shape_est["ci95"],
                              "fidelity_key": "shape present", "negative_colour_rate": colour_est["mean"],
                              "negative_colour_rate_ci95": colour_est["ci95"],
                              "count_rate": float(count_rate.mean()), "per_prompt_colour_rate": colour_rate.tolist(),
                              "per_prompt_shape_rate": shape_rate.tolist(), "attributes": {},
                              "diversity": per_prompt_diversity(ctx, images, len(shapes)), **timing,
                              "timesteps": timesteps, "prompts": texts, "negatives": negatives,
                              "n_prompts": len(shapes), "n_seeds": a.seeds}
            save_cell_images(store, items, images)
            write_json(ctx.cache_path, ctx.cache)
        label = "with negative colour" if use else "no negative"
        cell = dict(ctx.cache[key], experiment="negative", label=label)
        keep_images(ctx, label + "|negative", store.load(items))
        rates[use] = np.array(cell["per_prompt_colour_rate"]), np.array(cell["per_prompt_shape_rate"])
        cells.append(cell)
        print(f"  negative   {label:40s} colour rate {cell['negative_colour_rate']:.3f}, shape present "
              f"{cell['fidelity_mean']:.3f}, {cell['sec_per_image']:.3f} s/image")
    drop = bootstrap_ci(rates[False][0], rates[True][0], seed=a.seed)
    cost = bootstrap_ci(rates[False][1], rates[True][1], seed=a.seed)
    cells[1].update({"colour_rate_drop": drop["mean"], "colour_rate_drop_ci95": drop["ci95"],
                     "shape_rate_cost": cost["mean"], "shape_rate_cost_ci95": cost["ci95"]})
    if ctx.wandb is not None:
        for cell in cells:
            ctx.wandb.log({"experiment": "negative", **_loggable(cell)})
    return cells


def modal_colour(detections: list[list[dict]], shape: str, index: int) -> str:
    """The colour the model most often gives `shape` (any object's colour when the shape is never drawn)."""
    colours = [o["color"] for d in detections for o in d if o["shape"] == shape] or \
              [o["color"] for d in detections for o in d]
    if not colours:  # nothing detected at all: cycle through the colours so each prompt still gets one
        return gd.COLOR_NAMES[index % len(gd.COLOR_NAMES)]
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
        timesteps = evaluated_timesteps(ctx.pipe.scheduler)
        heads = [f"t={t:g}" for t in timesteps] if len(timesteps) == len(frames) else \
            [str(i + 1) for i in range(len(frames))]
        strip = image_grid(frames + [to_uint8_64([final])[0]], 1, len(frames) + 1,
                           col_labels=heads + ["out"], cell=64)
        strip.save(ctx.run_dir / f"trajectory_{short(name)}.png")
        gif = [Image.fromarray(f).resize((128, 128), Image.NEAREST) for f in frames]
        gif[0].save(ctx.run_dir / f"trajectory_{short(name)}.gif", save_all=True, append_images=gif[1:], duration=250,
                    loop=0)
        cells.append({"scheduler": name, "num_inference_steps": steps, "guidance_scale": guidance, "prompt": prompt,
                      "seed": a.seed, "n_frames": len(frames), "x0_from": sorted(how), "timesteps": timesteps,
                      "filmstrip": f"trajectory_{short(name)}.png", "gif": f"trajectory_{short(name)}.gif",
                      "experiment": "trajectory", "label": short(name)})
        print(f"  trajectory {short(name):40s} {len(frames)} frames (x0 from {', '.join(sorted(how))})")
    return cells


RUNNERS = {"schedulers": exp_schedulers, "steps": exp_steps, "student": exp_student, "cfg": exp_cfg, "eta": exp_eta,
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


def ranked(cells: list[dict]) -> list[dict]:
    """Scored cells that can change the image: the ones a best cell or the Pareto front is chosen from."""
    return [c for c in scored(cells) if "no_effect" not in c]


def _timesteps(c: dict) -> str:
    t = c.get("timesteps") or []
    return f"{t[0]:g} … {t[-1]:g} ({len(t)})" if len(t) > 1 else (f"{t[0]:g} (1)" if t else "-")


def findings_markdown(m: dict) -> str:
    exps, key = m["experiments"], m["fidelity_key"]
    spacings = sorted({str(c.get("timestep_spacing")) for cells in exps.values() for c in cells if "timesteps" in c})
    lines = [f"# Task B findings: {m['model']}", "",
             f"Generated from metrics.json. Every scored cell: {m['n_prompts']} prompts x {m['n_seeds']} seeds; "
             f"fidelity = oracle rate `{key}` (mean over prompts, bootstrap 95% CI over prompts); diversity = mean "
             f"pairwise EfficientNet distance between a prompt's seeds; s/image = the fastest of the cell's timed "
             f"calls (every full batch of its generation, then {m.get('time_repeats', 1)} more on its first batch), on "
             f"{m['device']} ({m['threads']} torch threads). The model's own settings: {m['model_settings']}; every "
             f"scheduler is built with timestep spacing {', '.join(f'`{s}`' for s in spacings) or 'n/a'} (each cell's "
             f"evaluated timesteps are in metrics.json). One image moves a cell's rate by "
             f"{1 / (m['n_prompts'] * m['n_seeds']):.3f}. Cells marked no effect are not ranked.", ""]
    every = scored([c for name, cells in exps.items() if name != "negative" for c in cells])
    if every and max(c["fidelity_mean"] for c in every) == 0:
        lines += [f"**No cell got any image fully right by `{key}`: fidelity cannot rank these settings.** "
                  "The per-attribute rates in metrics.json (colour, shape, ...) still differ; rerun with "
                  "`--fidelity-key color` (or shape) to rank by one of them.", ""]
    for name in ("schedulers", "steps", "student"):
        cells = scored(exps.get(name, []))
        if not cells:
            continue
        lines += [f"## {name}: fewest steps to reach 95% of each scheduler's best fidelity", "",
                  *md_table(["scheduler", "steps tried", "best fidelity [95% CI]", "at steps",
                             "fewest steps to 95% of best"],
                            [[short(sched), ", ".join(map(str, r["tested_steps"])),
                              f"{fmt(r['best'])} {fmt_ci(r['best_ci95'])}", fmt(r["best_steps"], "d"),
                              "n/a (best is 0)" if r["steps_to_95"] is None else r["steps_to_95"]]
                             for sched, r in fewest_steps_to_95(cells).items()])]
        if ranked(cells):
            best, tied = indistinguishable_from_best(ranked(cells))
            lines += ["", f"Best cell: {best['label']} ({best['fidelity_mean']:.3f}); {len(tied) - 1} of the other "
                          f"{len(ranked(cells)) - 1} ranked cells have a mean inside its 95% CI"
                          + (f" ({', '.join(c['label'] for c in tied if c is not best)})." if len(tied) > 1 else ".")
                      + " A 95% step count is only as sharp as these CIs."]
        lines.append("")
    cells = ranked(exps.get("cfg", []))
    if cells:
        best, tied = indistinguishable_from_best(cells)
        g = sorted(c["guidance_scale"] for c in tied)
        div = sorted(cells, key=lambda c: c["guidance_scale"])
        lines += ["## cfg: guidance scale", "",
                  f"Best guidance {best['guidance_scale']:g} (fidelity {fmt(best['fidelity_mean'])} "
                  f"{fmt_ci(best['fidelity_ci95'])}, {best['num_inference_steps']} "
                  f"steps). Guidance scales whose mean lies inside that CI (the best range these numbers support): "
                  f"{', '.join(f'{v:g}' for v in g)}. Diversity from guidance {div[0]['guidance_scale']:g} to "
                  f"{div[-1]['guidance_scale']:g}: {fmt(div[0]['diversity'])} -> {fmt(div[-1]['diversity'])}.", ""]
    cells = scored(exps.get("eta", []))
    if cells:
        lines += ["## eta (DDIM)", "", f"DDIM at {cells[0]['num_inference_steps']} steps, the same seeds in every row.",
                  "", *md_table(["eta", "fidelity [95% CI]", "diversity", "s/image"],
                                [[f"{c['eta']:g}" + (" (no effect)" if "no_effect" in c else ""),
                                  f"{fmt(c['fidelity_mean'])} {fmt_ci(c['fidelity_ci95'])}", fmt(c["diversity"]),
                                  f"{c['sec_per_image']:.3f}"] for c in cells])]
        lines.append("")
    neg = exps.get("negative", [])
    if len(neg) == 2:
        c = neg[1]
        shape_change = {"mean": 0.0 - c["shape_rate_cost"], "ci95": [0.0 - v for v in c["shape_rate_cost_ci95"][::-1]]}
        lines += ["## negative prompts", "",
                  f"Prompts naming only a shape ({', '.join(c['prompts'])}); negative prompt = the colour the model "
                  f"drew most for each on separate seeds ({', '.join(c['negatives'])}); {c['num_inference_steps']} "
                  f"steps, guidance {c['guidance_scale']:g}. Rate of that colour: "
                  f"{neg[0]['negative_colour_rate']:.3f} without, {c['negative_colour_rate']:.3f} with the negative "
                  f"prompt: a drop of {fmt(c['colour_rate_drop'])} (95% CI {fmt_ci(c['colour_rate_drop_ci95'])}). "
                  f"Cost: the share of images showing the asked shape goes from {fmt(neg[0]['fidelity_mean'])} to "
                  f"{fmt(c['fidelity_mean'])} (change {fmt_delta(shape_change)}).", ""]
        if "no_effect" in c:
            lines += [f"**The negative prompt cannot change these images: {c['no_effect']}.**", ""]
    cells = ranked(exps.get("grid", []))
    if cells:
        best, tied = indistinguishable_from_best(cells)
        lines += ["## grid", "", f"Best cell {best['label']}: {fmt(best['fidelity_mean'])} "
                                 f"{fmt_ci(best['fidelity_ci95'])}; {len(tied) - 1} other cells inside its CI.", ""]
    if ranked(every):
        front = pareto_front(ranked(every))
        lines += ["## Fidelity vs time: the Pareto front", "",
                  "Cells no other cell beats on both fidelity and seconds per image (fastest first):", ""]
        lines += [f"- {c['label']} ({c['experiment']}): fidelity {c['fidelity_mean']:.3f}, {c['sec_per_image']:.3f} "
                  "s/image" for c in front]
        lines.append("")
    no_effect = [c for cells in exps.values() for c in cells if "no_effect" in c]
    if no_effect:
        lines += ["## Cells that cannot change the image (not ranked)", ""]
        lines += [f"- {c['experiment']} {c['label']}: {c['no_effect']}" for c in no_effect]
        lines.append("")
    if every:
        lines += ["## Every scored cell: oracle rate of each attribute (over images)", "",
                  "| experiment | cell | all | shape | colour | size | position | count | diversity | s/image | "
                  "timesteps (first … last (n)) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in every:
            a = c["attributes"]
            lines.append(f"| {c['experiment']} | {c['label']}{' (no effect)' if 'no_effect' in c else ''} | "
                         + " | ".join(fmt(a.get(k)) for k in FIDELITY_KEYS)
                         + f" | {fmt(c['diversity'])} | {c['sec_per_image']:.3f} | {_timesteps(c)} |")
        lines.append("")
    if exps.get("trajectory"):
        lines += ["## trajectory", "", "Predicted clean image at every evaluated timestep, then the output:", ""]
        for c in exps["trajectory"]:
            lines += [f"{c['label']} ({c['num_inference_steps']} steps, x0 from {', '.join(c['x0_from'])}; "
                      f"[gif]({c['gif']})):", "", f"![trajectory {c['label']}]({c['filmstrip']})", ""]
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
    steps_cells = scored(exps.get("schedulers", []) + exps.get("steps", []) + exps.get("student", []))
    if steps_cells:
        fig, ax = plt.subplots(figsize=(7, 4.5))

        def series(c):  # the teacher's schedulers by name; the student's curve named by its model
            return f"{c['model']} ({short(c['scheduler'])})" if c.get("model") else short(c["scheduler"])

        names = list(dict.fromkeys(series(c) for c in steps_cells))
        for k, name in enumerate(names):
            mine = {c["num_inference_steps"]: c for c in steps_cells if series(c) == name}
            _errorbar(ax, list(mine.values()), "num_inference_steps", name, 1 + 0.04 * (k - len(names) / 2))
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
    every = ranked([c for name, cells in exps.items() if name != "negative" for c in cells])
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

    # 1. model, oracle, feature encoder; grid names are checked against this pipeline before any cell runs
    run = start_run("task_b", args)
    pipe, settings = load_pipeline(args.model, device=run.device)
    if args.axes:
        check_axes(args.axes, pipe)
    oracle = Oracle.load(args.oracle, run.device)
    encoder = load_image_encoder(DEFAULT_IMAGE_ENCODER, run.device)
    ctx = Context(args, pipe, settings, oracle, encoder, run.dir, run.wandb)
    if "grid" in args.experiments:  # every grid cell once on one image: a value nothing above caught fails here
        check_cells(ctx, grid_cells(ctx))

    # 2. the experiments, cell by cell (finished cells are read back from cells.json)
    metrics: dict = {"model": settings["name"], "model_id": settings["id"],
                     "model_settings": {k: settings[k] for k in ("scheduler", "steps", "guidance", "size")},
                     "prompts": [p["text"] for p in ctx.prompts], "n_prompts": len(ctx.prompts),
                     "n_seeds": args.seeds, "seed": args.seed, "fidelity_key": args.fidelity_key,
                     "batch_size": args.batch_size, "time_repeats": args.time_repeats, "device": str(run.device),
                     "threads": torch.get_num_threads(), "experiments": {}}
    for name in args.experiments:
        print(f"experiment {name}")
        with run.step(name):
            cells = RUNNERS[name](ctx)
        metrics["experiments"][name] = cells if name == "trajectory" else mark_no_effect(ctx, name, cells)

    # 3. plots, contact sheets, findings, metrics
    metrics["figures"] = make_plots(metrics, run.dir) + contact_sheets(ctx, metrics)
    write_text(run.dir / "findings.md", findings_markdown(metrics))
    cells = [c for cs in metrics["experiments"].values() for c in scored(cs)]
    if run.wandb is not None and len(cells) == 1:  # the sweep's metric (sweeps/task_b.yaml)
        run.wandb.summary["fidelity_mean"] = cells[0]["fidelity_mean"]
    run.finish(metrics)
    print(f"wrote {run.dir} ({metrics['timings']['total_s']} s)")
    failed = [c for cells in metrics["experiments"].values() for c in cells if "error" in c]
    n_cells = sum(len(cells) for cells in metrics["experiments"].values())
    check(not failed, f"{len(failed)} of {n_cells} cells failed (listed in {run.dir / 'findings.md'}): "
                      + "; ".join(f"{c['experiment']} {c['label']}: {c['error']}" for c in failed))
    return metrics


if __name__ == "__main__":
    cli(main)
