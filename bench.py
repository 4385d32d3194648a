"""Benchmarks: how much faster are our generation and retrieval paths than the plain way, measured side by side?

Three parts, each timed in this one run on this machine, reported as ratios of measured seconds. Every timing is
a warm-up call, then at least --repeats timed calls, more until they add up to --min-seconds (as faiss's benchs
repeat); the fastest (min) and the median are reported, and ratios use the min (other work on a shared machine only
adds time).
- generation: the shipped model on CPU called as a new user calls plain diffusers (from_pretrained, one
  image per call, the pipeline's defaults: 50 steps, its saved scheduler, guidance 7.5, PIL output) vs our
  path (utils.load_pipeline + utils.generate_images: batched, the registry's steps and guidance, numpy
  output), then each further CPU optimisation added ablation-style and kept only when it helps. Both image
  sets are scored by the fidelity oracle on the same structured prompts: equal fidelity is checked, not
  assumed. The limit: the UNet's FLOPs per image (torch.utils.flop_counter, per UNet evaluation x the evaluations
  one image takes: steps x 2 with classifier-free guidance) times images/s, as a fraction of this machine's
  matmul and conv2d peak FLOP/s measured in the same run (fp32; bf16 for the bf16_autocast configurations).
- sd21: an SD 2.1-architecture pipeline with random weights at 512 px on a GPU: fp32 one-image calls vs
  half precision + SDPA + batching + channels_last (+ torch.compile with --compile). Skipped without a
  GPU; `--sd21-scale tiny` builds the same architecture shrunk, to run the code path on a CPU.
- retrieval: FAISS exact search vs a per-row Python loop and vs vectorised numpy on the same embeddings
  (the retrieval run's test embeddings when present), with the top-k compared; then index build and
  search time at scale with flat, IVF and HNSW indexes and the approximate indexes' recall@10 against flat, on
  structured vectors: those image embeddings replicated with small Gaussian noise to 100k and 1M rows (--noise),
  queried with the held-out caption embeddings.

Quick (~1 min on 2 cores; `make demo` runs it as `--run-name demo`):
    python bench.py --quick
Default (several minutes on 2 idle cores: 1M-row indexes, HNSW at 100k):
    python bench.py --run-name default
One part only:
    python bench.py --only retrieval
On a GPU, with torch.compile:
    python bench.py --only sd21 --compile
Writes outputs/bench/<run_name>/: config.json (arguments and hardware), metrics.json, results.md,
generation_grid.png; outputs/bench/latest points at the newest run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from utils import (DEFAULT_DATA, MODEL_REGISTRY, UserError, bootstrap_ci, check, cli, comma_list, common_args, fmt,
                   fmt_ci, generate_images, image_grid, load_data, load_pipeline, md_table, parse_checked,
                   peak_memory_mb, pick_device, pick_dtype, read_json, repo_path, reset_peak_memory, resolve_model,
                   set_threads, start_run, time_call, write_text)

PARTS = ("generation", "sd21", "retrieval")
INDEX_KINDS = ("flat", "ivf", "hnsw")
SD21_SCALES = ("full", "tiny")
FIDELITY_TOLERANCE = 0.01  # "equal fidelity": oracle scores within 1 point
KEEP_MIN_GAIN = 1.02  # an optimisation is kept when it makes our path at least 2% faster (timing noise is ~1%)
TIE_TOLERANCE = 1e-5  # two scores this close are a tie: either id may come first
ANCHOR = ("diffusers' 'Speed up inference' / SDXL optimisation guide reports about 3x from bf16, SDPA, "
          "channels_last and torch.compile on SDXL")
MIN_SIZE = 100  # database sizes must be at least this (IVF needs training points)
BF16_FLAGS = {"amx_bf16", "avx512_bf16"}  # /proc/cpuinfo flags of CPU units that compute bf16 matmuls natively
PEAK_MATMUL_N = 2048  # (n, n) @ (n, n) fp32: 17 GFLOP a call, compute-bound on any CPU
PEAK_CONV = (16, 128, 32)  # batch, channels (in = out), height = width of a 3x3 fp32 conv2d: 4.8 GFLOP a call
# Where the CPU has no bf16 unit (no BF16_FLAGS) torch emulates bf16 kernels at ~0.3-2 GFLOP/s (an AMD EPYC, 2026-12-06):
# the ops above would take ~60 s a call there, so the bf16 peak is timed on ops this many times smaller per side
# (matmul n / 4: 64x fewer FLOPs; conv batch / 4 and side / 2: 16x fewer), which emulation runs as fast per FLOP.
PEAK_BF16_EMULATED_SHRINK = 4
QUICK = {"n_images": 2, "batch_size": 2, "min_seconds": 0.2, "compile": False, "fidelity_images": 0,
         "sizes": "10000,100000", "queries": 200,
         "naive_queries": 300, "hnsw_max_n": 10000, "sd21_images": 2, "sd21_steps": 2, "sd21_batch": 2,
         "head_images": 2000, "head_epochs": 1}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", type=comma_list(), default=",".join(PARTS),
                   help=f"comma-separated parts to run: {', '.join(PARTS)}")
    # generation on CPU
    p.add_argument("--model", default="shapes-tiny", help="registry name or pipeline folder for the CPU generation part")
    p.add_argument("--n-images", type=int, default=48,
                   help="images per configuration (half single-object, half two-object prompts)")
    p.add_argument("--batch-size", type=int, default=48,
                   help="images per pipeline call on our path (48: x1.08 over 16 at 50 steps on 2 cores, same images)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of every measurement after its warm-up (min and median reported; the min counts)")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="seconds: fast measurements repeat until their timed runs add up to this")
    p.add_argument("--student", default=None,
                   help="few-step student of --model timed on our path at its own registry sampling, with the kept "
                        "optimisations (default: the registry's student of --model, else none; '' skips it)")
    p.add_argument("--oracle", default=None, help="fidelity oracle folder (default: models/shapes-oracle)")
    # SD 2.1 architecture
    p.add_argument("--sd21-scale", default="full",
                   help=f"{' or '.join(SD21_SCALES)}: full = SD 2.1's sizes at 512 px (GPU only); tiny = the same "
                        "architecture shrunk, 64 px, runs on CPU")
    p.add_argument("--sd21-images", type=int, default=8, help="images per configuration in the sd21 part")
    p.add_argument("--sd21-steps", type=int, default=25, help="sampling steps in the sd21 part (same for every configuration)")
    p.add_argument("--sd21-batch", type=int, default=8, help="images per call in the batched sd21 configurations")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="try torch.compile of the UNet (inductor; C++ on CPU): in the generation ablation, where its "
                        "one-off compile time is reported beside it, and in the sd21 part")
    p.add_argument("--fidelity-images", type=int, default=400,
                   help="extra prompts, beyond the timed --n-images, on which the kept optimisations at the plain "
                        "path's settings are compared with the plain numerics (untimed; 0 = the timed prompts only)")
    # retrieval
    p.add_argument("--retrieval-run", default="outputs/retrieval/latest",
                   help="retrieval run folder whose test embeddings are searched (random vectors when it has no heads)")
    p.add_argument("--data", default=None, help="data.pkl for those embeddings (default: the one the run was trained on)")
    p.add_argument("--k", type=int, default=10, help="neighbours retrieved per query")
    p.add_argument("--naive-queries", type=int, default=0,
                   help="queries run through the Python loop and its competitors (0 = all test captions)")
    p.add_argument("--sizes", type=comma_list(int, lo=MIN_SIZE), default="100000,1000000",
                   help="comma-separated database sizes: the image embeddings replicated with noise to each")
    p.add_argument("--noise", type=float, default=0.1,
                   help="expected L2 norm of the Gaussian noise added to each replica of a unit embedding")
    p.add_argument("--dim", type=int, default=256, help="dimension of the random vectors used without a retrieval run")
    p.add_argument("--queries", type=int, default=1000, help="held-out caption embeddings searched per database size")
    p.add_argument("--indexes", type=comma_list(), default=",".join(INDEX_KINDS),
                   help=f"comma-separated FAISS indexes: {', '.join(INDEX_KINDS)}")
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (0 = round(sqrt(n)))")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists searched per query")
    p.add_argument("--hnsw-max-n", type=int, default=100000,
                   help="largest database HNSW is built for (its build takes ~50 s per 100k vectors on one core)")
    p.add_argument("--head-images", type=int, default=5000,
                   help="images of random features in the head-training timing (the default train split's size)")
    p.add_argument("--head-epochs", type=int, default=2, help="epochs of each timed head training")
    common_args(p, "bench", QUICK, helps={"seed": "seed of prompts, image seeds and random vectors"})
    return parse_checked(p, argv, QUICK, check_args)


def check_args(args: argparse.Namespace) -> None:
    check(bool(args.only), "--only names no part; choose from " + ", ".join(PARTS))
    for part in args.only:
        check(part in PARTS, f"unknown --only part {part!r}; choose from {', '.join(PARTS)}")
    for kind in args.indexes:
        check(kind in INDEX_KINDS, f"unknown index {kind!r} in --indexes; choose from {', '.join(INDEX_KINDS)}")
    check("flat" in args.indexes, "--indexes must include flat: it is the exact reference for recall@10")
    check(bool(args.sizes), f"--sizes names no size; give comma-separated integers >= {MIN_SIZE}")
    check(args.sd21_scale in SD21_SCALES, f"unknown --sd21-scale {args.sd21_scale!r}; choose {' or '.join(SD21_SCALES)}")
    for name in ("n_images", "batch_size", "repeats", "sd21_images", "sd21_steps", "sd21_batch", "k", "dim", "queries",
                 "nprobe", "hnsw_max_n", "head_images", "head_epochs"):
        check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("threads", "naive_queries", "nlist", "min_seconds", "noise", "fidelity_images"):
        check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    check(args.k <= min(args.sizes), f"--k {args.k} is more than the smallest database size {min(args.sizes)}")
    if args.student is None:
        args.student = MODEL_REGISTRY.get(args.model, {}).get("student", "")
    if "generation" in args.only:
        resolve_model(args.model)  # a one-line error for an unknown model or missing folder, before any work
        if args.student:
            resolve_model(args.student)


# --------------------------------------------------------------------------- shared measuring helpers
def hardware_info(threads: int) -> dict:
    """CPU model, its bf16 units (cpuinfo flags; empty where unknown), cores, torch / FAISS threads, GPU name and the
    load average (contention) at the start."""
    import torch

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields: dict[str, str] = {}
    for line in lines:  # the first processor's fields
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    cpu = fields.get("model name") or platform.processor() or "unknown"
    flags = set(fields.get("flags", "").split())
    info = {"cpu": cpu, "cpu_bf16_units": sorted(flags & BF16_FLAGS), "cores": os.cpu_count(),
            "cores_usable": usable_cores(),
            "torch_threads": torch.get_num_threads(), "threads_flag": threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_avg_1m_at_start": round(os.getloadavg()[0], 2), "platform": platform.platform()}
    # The 1-min load average before our work is other processes' demand: >= 0.5 means they share the CPU with us.
    info["contended"] = info["load_avg_1m_at_start"] >= 0.5
    try:
        import faiss

        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    return info


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def quiet_loading() -> None:
    """No "Loading pipeline components" bars from diffusers / transformers between the timing lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def ratio(baseline_s: float, other_s: float) -> float:
    """How many times faster `other` is than `baseline`: a ratio of two measured durations."""
    return float(baseline_s / other_s) if other_s > 0 else float("nan")


def timed(fn: Callable, args: argparse.Namespace, warmup: int = 1, repeats: int | None = None) -> tuple[dict, Any]:
    """Time `fn()` by utils.time_call: `warmup` untimed calls, then `repeats` (default --repeats) timed calls, more
    until they add up to --min-seconds.

    Returns:
        ({"min_s", "median_s", "runs": timed calls, "warmup_s": seconds of the warm-up calls}, the last result).
    """
    t, result = time_call(fn, warmup=warmup, repeats=args.repeats if repeats is None else repeats,
                          min_seconds=args.min_seconds)
    return {"min_s": t["min_s"], "median_s": t["median_s"], "runs": len(t["times_s"]),
            "warmup_s": float(sum(t["warmup_s"]))}, result


def _yes_no(flag) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


# --------------------------------------------------------------------------- 1. generation on CPU
def structured_prompts(n: int, seed: int) -> list[dict]:
    """`n` structured prompts, single-object and two-object alternating (first half of each kind)."""
    import generate_data as gd

    singles = gd.make_prompts("single", max(1, (n + 1) // 2), seed)
    twos = gd.make_prompts("two", max(1, n // 2), seed) if n > 1 else []
    mixed = [p for pair in zip(singles, twos) for p in pair] + singles[len(twos):]
    return mixed[:n]


def load_plain_pipeline(model_id: str):
    """The pipeline as a new user loads it: a bare `from_pretrained(folder)` (float32 on CPU)."""
    import diffusers

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_id)
    except Exception as err:  # offline hub id, another pipeline class: one line, not a stack of loader errors
        raise UserError(f"plain StableDiffusionPipeline.from_pretrained({model_id!r}) failed: "
                        f"{type(err).__name__}: {err}") from None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_defaults(pipe) -> dict:
    """The pipeline's own defaults for steps and guidance (what a call without them uses)."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    return {k: params[k].default for k in ("num_inference_steps", "guidance_scale")}


def plain_generate(pipe, prompts: Sequence[str], seeds: Sequence[int]) -> np.ndarray:
    """One `pipe(prompt, generator=...)` call per image with every other argument at the pipeline's default."""
    import torch

    images = [pipe(text, generator=torch.Generator().manual_seed(int(s))).images[0] for text, s in zip(prompts, seeds)]
    return np.stack([np.asarray(im.convert("RGB")) for im in images])


def fidelity_of(oracle, images: np.ndarray, prompts: list[dict]) -> tuple[dict, list[dict]]:
    """Oracle summary (per attribute and "all") and the per-image scores."""
    from oracle import summarize_scores

    scores = oracle.score(images, prompts)
    return summarize_scores(scores), scores


def compare_fidelity(a: list[dict], b: list[dict], seed: int) -> dict:
    """Per attribute: the difference b - a in oracle score, its paired 95% bootstrap CI over prompts, within 1 point?"""
    from oracle import ATTRIBUTES

    out = {}
    for key in ATTRIBUTES:
        pairs = [(x[key], y[key]) for x, y in zip(a, b) if x.get(key) is not None and y.get(key) is not None]
        if not pairs:
            continue
        d = bootstrap_ci([float(y) for _, y in pairs], [float(x) for x, _ in pairs], seed=seed)
        out[key] = {"diff": d["mean"], "ci95": d["ci95"], "within_1pt": abs(d["mean"]) <= FIDELITY_TOLERANCE,
                    "n": len(pairs)}
    return out


def ablation_configs(cores: int) -> list[tuple[str, str]]:
    """(name, what it changes) of each CPU optimisation tried on top of our path, in order."""
    return [("inference_mode", "run under torch.inference_mode() instead of the pipeline's no_grad"),
            ("channels_last", "UNet and VAE weights in channels_last memory format"),
            ("fused_qkv", "pipe.fuse_qkv_projections(): one matmul for q, k, v"),
            ("bf16_autocast", "torch.autocast('cpu', dtype=torch.bfloat16): matmuls and convolutions in bfloat16 "
                              "(AMX / AVX512-BF16 units where the CPU has them), weights and scheduler in float32"),
            ("torch_compile", "torch.compile(pipe.unet): inductor fuses the UNet's ops into generated C++ kernels "
                              "(compiled once per batch shape in the untimed warm-up; its seconds are reported)"),
            ("threads", f"torch.set_num_threads({cores}) (all usable cores)")]


def skip_reason(name: str, args: argparse.Namespace, cores: int, default_threads: int) -> str | None:
    """Why an ablation step is not tried in this run, or None to try it."""
    if name == "threads" and args.threads:
        return f"--threads {args.threads} pins the thread count"
    if name == "threads" and cores == default_threads:
        return f"no-op: torch already uses all {default_threads} usable cores"
    if name == "torch_compile" and not args.compile:
        return "--no-compile" + (" (--quick: compiling takes about a minute per batch shape)" if args.quick else "")
    return None


class OurPath:
    """Our generation path with switchable CPU optimisations; `generate` times one configuration."""

    def __init__(self, pipe, settings: dict, batch_size: int):
        self.pipe, self.settings, self.batch_size = pipe, settings, batch_size
        self.on: set[str] = set()
        self.eager_unet = pipe.unet

    def apply(self, name: str, enable: bool, cores: int, default_threads: int) -> None:
        import torch

        layout = torch.channels_last if enable else torch.contiguous_format
        if name == "channels_last":
            self.pipe.unet.to(memory_format=layout)
            self.pipe.vae.to(memory_format=layout)
        elif name == "fused_qkv":
            self.pipe.fuse_qkv_projections() if enable else self.pipe.unfuse_qkv_projections()
        elif name == "torch_compile":
            self.pipe.unet = torch.compile(self.eager_unet) if enable else self.eager_unet
        elif name == "threads":
            torch.set_num_threads(cores if enable else default_threads)
        (self.on.add if enable else self.on.discard)(name)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                 batch_size: int | None = None) -> np.ndarray:
        import contextlib

        import torch

        with contextlib.ExitStack() as stack:
            if "inference_mode" in self.on:
                stack.enter_context(torch.inference_mode())
            if "bf16_autocast" in self.on:
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            return generate_images(self.pipe, list(prompts), list(seeds), steps, guidance, self.settings["size"],
                                   batch_size=batch_size or self.batch_size, progress=False)

    def warm_up(self, prompts: Sequence[str], seeds: Sequence[int], guidance: float) -> float:
        """Untimed 2-step run over every prompt, so each batch shape the timed runs meet has been seen (a compiled
        UNet compiles once per shape); returns its seconds."""
        import time

        start = time.perf_counter()
        self.generate(prompts, seeds, 2, guidance)
        return time.perf_counter() - start


def bench_generation(args: argparse.Namespace, run_dir: Path) -> dict:
    """Plain diffusers vs our path on CPU, with per-optimisation ablation and the oracle's fidelity of each."""
    import torch

    from oracle import Oracle

    device = torch.device("cpu")
    spec = resolve_model(args.model)
    prompts = structured_prompts(args.n_images, args.seed)
    texts = [p["text"] for p in prompts]
    seeds = [args.seed * 100_000 + i for i in range(len(prompts))]
    oracle = Oracle.load(*([args.oracle] if args.oracle else []), device=device)
    default_threads = torch.get_num_threads()
    cores = usable_cores()
    rows: list[dict] = []
    images: dict[str, np.ndarray] = {}
    scores: dict[str, list[dict]] = {}

    def record(name: str, timing: dict, imgs: np.ndarray, **extra) -> dict:
        summary, per_image = fidelity_of(oracle, imgs, prompts)
        images[name], scores[name] = imgs, per_image
        seconds = timing["min_s"]
        row = {"config": name, "seconds": seconds, "median_s": timing["median_s"], "runs": timing["runs"],
               "images": len(imgs), "images_per_s": len(imgs) / seconds, "fidelity": summary, **extra}
        rows.append(row)
        base = rows[0]["seconds"]
        print(f"  {name:<44} {seconds:7.2f} s  {row['images_per_s']:6.2f} img/s  x{ratio(base, seconds):5.2f} vs plain"
              f"  oracle all {fmt(summary['all'])}")
        return row

    # Every configuration gets a short warm-up call (2 images, 2 steps) after each change, so `timed` adds none.
    # a. plain diffusers, as a new user calls it
    plain = load_plain_pipeline(spec["id"])
    defaults = call_defaults(plain)
    plain(texts[0], num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    plain_evals = unet_evals_per_image(plain.unet, lambda: plain_generate(plain, texts[:1], seeds[:1]))
    print(f"generation on CPU ({spec['name']}, {len(prompts)} images, torch threads {default_threads}):")
    timing, imgs = timed(lambda: plain_generate(plain, texts, seeds), args, warmup=0)
    record("plain diffusers (1 image/call)", timing, imgs, steps=defaults["num_inference_steps"],
           guidance=defaults["guidance_scale"], batch_size=1, scheduler=type(plain.scheduler).__name__, output="PIL",
           unet_evals_per_image=plain_evals)
    del plain
    plain_steps, plain_guidance = defaults["num_inference_steps"], defaults["guidance_scale"]

    # b. our path at the plain path's settings (50 steps, guidance 7.5): the batching speed-up alone
    pipe, settings = load_pipeline(args.model, device=device, dtype=torch.float32)
    ours = OurPath(pipe, settings, args.batch_size)
    steps, guidance = settings["steps"], settings["guidance"]
    evals = {(st, gd): unet_evals_per_image(pipe.unet, lambda: ours.generate(texts[:1], seeds[:1], st, gd))
             for st, gd in ((plain_steps, plain_guidance), (steps, guidance))}
    unet_flops = unet_eval_flops(pipe, settings["size"])  # on the eager UNet, before any optimisation
    ours.warm_up(texts, seeds, plain_guidance)
    timing, imgs = timed(lambda: ours.generate(texts, seeds, plain_steps, plain_guidance), args, warmup=0)
    record("batched, plain settings", timing, imgs, steps=plain_steps, guidance=plain_guidance,
           batch_size=args.batch_size, scheduler=settings["scheduler"], output="np",
           unet_evals_per_image=evals[plain_steps, plain_guidance])

    # c. our path: batched, the registry's steps and guidance
    timing, imgs = timed(lambda: ours.generate(texts, seeds, steps, guidance), args, warmup=0)
    record("ours: batched + registry sampling", timing, imgs, steps=steps, guidance=guidance,
           batch_size=args.batch_size, scheduler=settings["scheduler"], output="np", optimisations=[],
           unet_evals_per_image=evals[steps, guidance])
    best = rows[-1]

    # d. each CPU optimisation on top of the best so far; kept only when it makes the path >= 2% faster
    ablation = []
    for name, what in ablation_configs(cores):
        why = skip_reason(name, args, cores, default_threads)
        if why is None:
            ours.apply(name, True, cores, default_threads)
            try:
                warmup_s = ours.warm_up(texts, seeds, guidance)  # after the change; a compiled UNet compiles here
            except Exception as err:  # torch.compile without a working C++ compiler: say so, go on without it
                ours.apply(name, False, cores, default_threads)
                why = f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if why is not None:
            ablation.append({"optimisation": name, "what": what, "kept": False, "skipped": why})
            continue
        timing, imgs = timed(lambda: ours.generate(texts, seeds, steps, guidance), args, warmup=0)
        gain = ratio(best["seconds"], timing["min_s"])
        kept = gain >= KEEP_MIN_GAIN
        row = record(f"+ {name}", timing, imgs, steps=steps, guidance=guidance, batch_size=args.batch_size,
                     scheduler=settings["scheduler"], output="np", optimisations=sorted(ours.on),
                     unet_evals_per_image=evals[steps, guidance])
        ablation.append({"optimisation": name, "what": what, "seconds": timing["min_s"], "own_ratio": gain,
                         "kept": kept, "warmup_s": warmup_s})
        if kept:
            best = row
        else:
            ours.apply(name, False, cores, default_threads)

    # e. the kept optimisations at the plain path's own sampling settings: a speed-up that cannot cost fidelity
    more_scores = None
    if ours.on:
        ours.warm_up(texts, seeds, plain_guidance)
        timing, imgs = timed(lambda: ours.generate(texts, seeds, plain_steps, plain_guidance), args, warmup=0)
        record("batched + kept optimisations, plain settings", timing, imgs, steps=plain_steps,
               guidance=plain_guidance, batch_size=args.batch_size, scheduler=settings["scheduler"], output="np",
               optimisations=sorted(ours.on), unet_evals_per_image=evals[plain_steps, plain_guidance])
        if args.fidelity_images:
            more_scores = more_prompts_scores(args, ours, oracle, plain_steps, plain_guidance)

    # f. the few-step student on our path (its registry steps and guidance, the optimisations kept above)
    student_row = None
    if args.student:
        spipe, ssettings = load_pipeline(args.student, device=device, dtype=torch.float32)
        student = OurPath(spipe, ssettings, args.batch_size)
        sst, sgd = ssettings["steps"], ssettings["guidance"]
        sevals = unet_evals_per_image(spipe.unet, lambda: student.generate(texts[:1], seeds[:1], sst, sgd))
        sflops = unet_eval_flops(spipe, ssettings["size"])  # eager, as for the base model
        for name in ours.on:
            student.apply(name, True, cores, default_threads)
        student.warm_up(texts, seeds, sgd)
        timing, imgs = timed(lambda: student.generate(texts, seeds, sst, sgd), args, warmup=0)
        student_row = record(f"student {resolve_model(args.student)['name']}: batched + kept optimisations", timing,
                             imgs, steps=sst, guidance=sgd, batch_size=args.batch_size,
                             scheduler=ssettings["scheduler"], output="np", optimisations=sorted(student.on),
                             unet_evals_per_image=sevals, unet_flops_per_eval=sflops)
        del spipe, student
    torch.set_num_threads(default_threads)

    # g. the verdict: speed ratio of the best configuration and whether the oracle scores are within 1 point
    plain_row, batched_row, base_row = rows[0], rows[1], rows[2]
    equal = compare_fidelity(scores[plain_row["config"]], scores[best["config"]], args.seed)
    equal_batched = compare_fidelity(scores[plain_row["config"]], scores[batched_row["config"]], args.seed)
    within = all(v["within_1pt"] for v in equal.values())
    # The fastest configuration whose every oracle score is within 1 point of the plain path's (for the kept
    # optimisations at the plain settings: over the timed prompts and the --fidelity-images more, pooled).
    for row in rows[1:]:
        row["fidelity_minus_plain"] = compare_fidelity(scores[plain_row["config"]], scores[row["config"]], args.seed)
        verdict = row["fidelity_minus_plain"]
        if more_scores is not None and row["config"] == "batched + kept optimisations, plain settings":
            reference, optimised = more_scores
            verdict = row["fidelity_minus_plain_more_prompts"] = compare_fidelity(
                scores[plain_row["config"]] + reference, scores[row["config"]] + optimised, args.seed)
            row["more_prompts"] = {"n_prompts": len(reference), "seed": args.seed + 1,
                                   "reference": "a fresh float32 copy of the model, batched, no optimisation"}
        row["fidelity_within_1pt_of_plain"] = all(v["within_1pt"] for v in verdict.values())
    equal_rows = [r for r in rows[1:] if r["fidelity_within_1pt_of_plain"]]
    fastest_equal = min(equal_rows, key=lambda r: r["seconds"]) if equal_rows else None
    result = {
        "model": spec["name"], "model_id": spec["id"], "n_images": len(prompts), "repeats": args.repeats, "device": "cpu",
        "torch_threads_default": default_threads, "configs": rows, "ablation": ablation,
        "best_config": best["config"], "best_optimisations": best.get("optimisations", []),
        "ratio_ours_vs_plain": ratio(plain_row["seconds"], best["seconds"]),
        "ratio_batching_only": ratio(plain_row["seconds"], batched_row["seconds"]),
        "ratio_sampler_only": ratio(batched_row["seconds"], base_row["seconds"]),
        "ratio_optimisations_only": ratio(base_row["seconds"], best["seconds"]),
        "student": student_row["config"] if student_row else None,
        "ratio_student_vs_plain": ratio(plain_row["seconds"], student_row["seconds"]) if student_row else None,
        "fidelity_ours_minus_plain": equal, "fidelity_batched_minus_plain": equal_batched,
        "equal_fidelity": within, "fidelity_tolerance": FIDELITY_TOLERANCE,
        "fastest_equal_fidelity_config": fastest_equal["config"] if fastest_equal else None,
        "ratio_at_equal_fidelity": ratio(plain_row["seconds"], fastest_equal["seconds"]) if fastest_equal else None,
        "batched_vs_plain_max_pixel_diff": int(np.abs(images[plain_row["config"]].astype(int)
                                                      - images[batched_row["config"]].astype(int)).max()),
        "plain_call": "StableDiffusionPipeline.from_pretrained(folder); "
                      "pipe(prompt, generator=torch.Generator().manual_seed(seed)) per image",
        "unet_flops_per_eval": unet_flops,
    }
    save_generation_grid(run_dir / "generation_grid.png", images, [plain_row["config"], best["config"]], texts)
    return result


def more_prompts_scores(args: argparse.Namespace, ours: OurPath, oracle, steps: int,
                        guidance: float) -> tuple[list[dict], list[dict]]:
    """Oracle scores of --fidelity-images more prompts (seed + 1; untimed), each drawn twice at the plain path's
    steps and guidance: by a fresh float32 copy of the model, batched, with no optimisation (the plain numerics:
    on the timed prompts the batched path draws the plain path's images, `batched_vs_plain_max_pixel_diff`), and
    by our path with the kept optimisations. Returns (reference scores, optimised scores), one dict per prompt."""
    import torch

    prompts = structured_prompts(args.fidelity_images, args.seed + 1)
    texts = [p["text"] for p in prompts]
    seeds = [(args.seed + 1) * 100_000 + i for i in range(len(prompts))]
    print(f"  fidelity on {len(prompts)} more prompts at {steps} steps, guidance {guidance} (untimed):")
    fresh, _ = load_pipeline(args.model, device=torch.device("cpu"), dtype=torch.float32)
    reference = generate_images(fresh, texts, seeds, steps, guidance, ours.settings["size"],
                                batch_size=args.batch_size, progress=True)
    del fresh
    optimised = ours.generate(texts, seeds, steps, guidance)
    return oracle.score(reference, prompts), oracle.score(optimised, prompts)


def save_generation_grid(path: Path, images: dict[str, np.ndarray], names: list[str], texts: list[str]) -> None:
    """Plain vs our best images for the first 8 prompts, same seeds, one row each."""
    cols = min(8, len(texts))
    grid = image_grid([im for n in names for im in images[n][:cols]], len(names), cols,
                      row_labels=["plain" if i == 0 else "ours" for i in range(len(names))],
                      col_labels=[str(i) for i in range(cols)])
    grid.save(path)


# --------------------------------------------------------------------------- 1b. the limit: FLOPs vs this machine's peak
def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one `fn()` call (matmuls, convolutions and attention; elementwise ops are not counted), by
    torch.utils.flop_counter.FlopCounterMode. A multiply-add is 2 FLOPs.

    FlopCounterMode has no formula for the CPU flash-attention kernel that SDPA dispatches to on CPU (it would
    count 0), so that op gets torch's own SDPA formula.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa(query, key, value, *_, out_shape=None, **__) -> int:
        return sdpa_flop_count(query, key, value)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def unet_eval_flops(pipe, size: int) -> int:
    """FLOPs of one UNet evaluation on one latent: one image, one denoising step, no CFG.

    Args:
        pipe: a Stable Diffusion pipeline (its UNet, VAE scale factor and tokenizer length are read).
        size: image height = width in pixels.
    """
    import torch

    unet = pipe.unet
    latent = torch.zeros(1, unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor,
                         dtype=unet.dtype, device=unet.device)
    text = torch.zeros(1, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, dtype=unet.dtype,
                       device=unet.device)
    return count_flops(lambda: unet(latent, 500, encoder_hidden_states=text))


def unet_evals_per_image(unet, generate_one: Callable[[], Any]) -> int:
    """Latents the UNet evaluates while `generate_one()` makes one image: steps x 2 under classifier-free
    guidance, more for samplers with several evaluations per step. Counted by a forward hook, not assumed."""
    seen: list[int] = []

    def count(_module, args, kwargs):
        seen.append(int((args[0] if args else kwargs["sample"]).shape[0]))

    hook = unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        generate_one()
    finally:
        hook.remove()
    return sum(seen)


def peak_flops(args: argparse.Namespace, native_bf16: bool = True) -> dict:
    """This machine's matmul and conv2d FLOP/s in fp32 and in bf16: one large op of each, timed (warm-up, repeats,
    min, median). bf16 is the precision of the `bf16_autocast` configurations (AMX / AVX512-BF16 where present);
    without such a unit (`native_bf16` False: hardware_info's cpu_bf16_units is empty) the bf16 ops are
    PEAK_BF16_EMULATED_SHRINK times smaller per side, so that timing the emulated kernels takes seconds, not minutes.

    Returns:
        {"matmul", "conv2d", "matmul_bf16", "conv2d_bf16": {...}, "peak_flops_per_s": the faster fp32 kernel's FLOPs
        / its fastest call, "peak_flops_per_s_bf16": the same in bf16, "torch_threads"}; each kernel has "shape",
        "dtype", "flops" (per call), the timing and "flops_per_s" (from the min time) and "flops_per_s_median".
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(args.seed)
    n = PEAK_MATMUL_N
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    batch, ch, hw = PEAK_CONV
    x, w = torch.randn(batch, ch, hw, hw, generator=gen), torch.randn(ch, ch, 3, 3, generator=gen)
    k = 1 if native_bf16 else PEAK_BF16_EMULATED_SHRINK
    n16, batch16, hw16 = n // k, batch // k, hw // max(1, k // 2)
    a16, b16 = (t[:n16, :n16].to(torch.bfloat16) for t in (a, b))
    x16, w16 = x[:batch16, :, :hw16, :hw16].to(torch.bfloat16), w.to(torch.bfloat16)
    kernels = {"matmul": (f"({n}, {n}) @ ({n}, {n})", "float32", lambda: torch.mm(a, b)),
               "conv2d": (f"({batch}, {ch}, {hw}, {hw}) * ({ch}, {ch}, 3, 3), padding 1", "float32",
                          lambda: F.conv2d(x, w, padding=1)),
               "matmul_bf16": (f"({n16}, {n16}) @ ({n16}, {n16})", "bfloat16", lambda: torch.mm(a16, b16)),
               "conv2d_bf16": (f"({batch16}, {ch}, {hw16}, {hw16}) * ({ch}, {ch}, 3, 3), padding 1", "bfloat16",
                               lambda: F.conv2d(x16, w16, padding=1))}
    out: dict = {"torch_threads": torch.get_num_threads()}
    with torch.inference_mode():
        for name, (shape, dtype, fn) in kernels.items():
            flops = count_flops(fn)
            timing, _ = timed(fn, args)
            out[name] = dict(shape=shape, dtype=dtype, flops=flops, **timing, flops_per_s=flops / timing["min_s"],
                             flops_per_s_median=flops / timing["median_s"])
    out["peak_flops_per_s"] = max(out[k]["flops_per_s"] for k in ("matmul", "conv2d"))
    out["peak_flops_per_s_bf16"] = max(out[k]["flops_per_s"] for k in ("matmul_bf16", "conv2d_bf16"))
    return out


def precision_of(row: dict) -> str:
    """The precision a generation configuration computes in: "bf16" under `bf16_autocast`, else "fp32"."""
    return "bf16" if "bf16_autocast" in row.get("optimisations", []) else "fp32"


def bench_limit(args: argparse.Namespace, generation: dict, native_bf16: bool = True) -> dict:
    """Achieved UNet FLOP/s of each generation configuration as a fraction of the measured peak of its precision
    (`precision_of`: the bf16 peak for bf16_autocast configurations, else the fp32 peak).

    Args:
        args: parsed arguments (--repeats, --min-seconds, --seed).
        generation: bench_generation's result (its rows' images/s and UNet evaluations per image).
        native_bf16: whether the CPU has a bf16 unit (peak_flops times smaller bf16 ops without one).

    Returns:
        {"peak": peak_flops(...), "unet_flops_per_eval", "configs": one row per configuration with
        "flops_per_image", "achieved_flops_per_s", "precision", "fraction_of_peak"; "plain" and "ours": the plain
        path's and the best configuration's fraction}.
    """
    peak = peak_flops(args, native_bf16)
    per_eval = generation["unet_flops_per_eval"]
    rows = []
    for r in generation["configs"]:
        per_image = r.get("unet_flops_per_eval", per_eval) * r["unet_evals_per_image"]
        achieved = per_image * r["images_per_s"]
        precision = precision_of(r)
        top = peak["peak_flops_per_s_bf16" if precision == "bf16" else "peak_flops_per_s"]
        rows.append({"config": r["config"], "unet_evals_per_image": r["unet_evals_per_image"],
                     "flops_per_image": per_image, "images_per_s": r["images_per_s"],
                     "achieved_flops_per_s": achieved, "precision": precision, "fraction_of_peak": achieved / top})
    by_name = {r["config"]: r for r in rows}
    out = {"peak": peak, "unet_flops_per_eval": per_eval, "configs": rows,
           "plain": by_name[generation["configs"][0]["config"]]["fraction_of_peak"],
           "ours": by_name[generation["best_config"]]["fraction_of_peak"], "best_config": generation["best_config"]}
    print(f"limit: peak {peak['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s matmul, "
          f"{peak['conv2d']['flops_per_s'] / 1e9:.1f} conv2d (bf16: {peak['matmul_bf16']['flops_per_s'] / 1e9:.1f}, "
          f"{peak['conv2d_bf16']['flops_per_s'] / 1e9:.1f}); UNet {per_eval / 1e9:.3f} GFLOP per evaluation; "
          f"achieved {out['plain']:.1%} of peak (plain), {out['ours']:.1%} (ours)")
    return out


# --------------------------------------------------------------------------- 2. SD 2.1 architecture
def sd21_pipeline(scale: str, tokenizer_dir: Path):
    """A StableDiffusionPipeline with SD 2.1's architecture and random weights (float32, CPU).

    "full" uses SD 2.1's sizes (UNet 320/640/1280/1280, 5/10/20/20 heads, linear projections, 1024-d
    cross-attention; CLIP text model 1024 hidden, 23 layers; the SD VAE); "tiny" keeps every block type and
    layer count and shrinks the widths. The tokenizer is the shipped model's CLIP tokenizer (same class,
    77 tokens); its vocabulary size sets the text model's.
    """
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    check((tokenizer_dir / "vocab.json").is_file(), f"CLIP tokenizer not found in {tokenizer_dir}")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    full = scale == "full"
    width = (320, 640, 1280, 1280) if full else (32, 64, 64, 64)
    heads = (5, 10, 20, 20) if full else (2, 4, 4, 4)
    hidden = 1024 if full else 32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64 if full else 8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=width,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=heads,
        cross_attention_dim=hidden, use_linear_projection=True, upcast_attention=full, norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=23 if full else 2, num_attention_heads=16 if full else 4, max_position_embeddings=77,
        hidden_act="gelu", projection_dim=512 if full else 32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512) if full else (32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512 if full else 64)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            prediction_type="v_prediction", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_sd21(args: argparse.Namespace) -> dict:
    """fp32 one-image calls vs half precision + SDPA + batching + channels_last (+ compile), cumulative."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from utils import SHAPES_MODEL

    if args.sd21_scale == "full" and not torch.cuda.is_available():
        print("sd21: skipped: no GPU")
        return {"status": "skipped: no GPU", "scale": args.sd21_scale}
    device = pick_device()
    half = pick_dtype(device)  # bf16 (fp16 where unsupported) on a GPU; float32 on CPU, where that step is a no-op
    pipe = sd21_pipeline(args.sd21_scale, SHAPES_MODEL / "tokenizer").to(device)
    size = 512 if args.sd21_scale == "full" else 64
    texts = [p["text"] for p in structured_prompts(args.sd21_images, args.seed)]
    seeds = [args.seed * 100_000 + i for i in range(len(texts))]
    steps, guidance = args.sd21_steps, 7.5

    def one_per_call():
        for t, s in zip(texts, seeds):
            pipe(t, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(s))

    def batched():
        generate_images(pipe, texts, seeds, steps, guidance, size, batch_size=args.sd21_batch, progress=False)

    def set_attention(proc_cls):
        pipe.unet.set_attn_processor(proc_cls())
        pipe.vae.set_attn_processor(proc_cls())

    # Each step is added on top of the previous ones; every configuration gets an untimed warm-up run.
    steps_chain: list[tuple[str, Callable[[], None], Callable]] = [
        ("fp32, classic attention, 1 image/call", lambda: set_attention(AttnProcessor), one_per_call),
        (f"+ {str(half).replace('torch.', '')}" + ("" if device.type == "cuda" else " (half precision: GPU only)"),
         lambda: pipe.to(dtype=half), one_per_call),
        ("+ SDPA", lambda: set_attention(AttnProcessor2_0), one_per_call),
        (f"+ batching ({args.sd21_batch}/call)", lambda: None, batched),
        ("+ channels_last", lambda: pipe.unet.to(memory_format=torch.channels_last), batched),
    ]
    if args.compile:
        def compile_unet():
            # Default mode: max-autotune's kernel search takes many minutes before the first image.
            pipe.unet = torch.compile(pipe.unet, fullgraph=True)
        steps_chain.append(("+ torch.compile (UNet)", compile_unet, batched))

    rows = []
    print(f"sd21 ({args.sd21_scale}, {size} px, {len(texts)} images, {steps} steps, {device}):")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # random weights can decode to NaN: the timing is the point
        for name, change, run in steps_chain:
            change()
            reset_peak_memory(device)  # the warm-up is the same work as the timed run: the same peak
            timing, _ = timed(run, args)
            seconds = timing["min_s"]
            row = {"config": name, "seconds": seconds, "median_s": timing["median_s"], "runs": timing["runs"],
                   "images_per_s": len(texts) / seconds, "warmup_s": timing["warmup_s"],
                   "peak_memory_mb": peak_memory_mb(device)}
            row["ratio_vs_baseline"] = ratio(rows[0]["seconds"] if rows else seconds, seconds)
            row["ratio_vs_previous"] = ratio(rows[-1]["seconds"] if rows else seconds, seconds)
            rows.append(row)
            print(f"  {name:<38} {seconds:8.2f} s  x{row['ratio_vs_baseline']:5.2f} vs fp32  "
                  f"(step x{row['ratio_vs_previous']:.2f})")
    final = rows[-1]["ratio_vs_baseline"]
    return {"status": "ran", "scale": args.sd21_scale, "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None, "size": size,
            "steps": steps, "guidance": guidance, "n_images": len(texts), "half_dtype": str(half).replace("torch.", ""),
            "configs": rows, "ratio_optimised_vs_fp32": final, "anchor": ANCHOR,
            "anchor_ratio": 3.0, "reaches_anchor": bool(final >= 3.0)}


# --------------------------------------------------------------------------- 3. retrieval
def naive_search(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The naive exact search: per query, a Python loop over database rows, one dot product each, then a sort.

    Ties go to the lower id, as FAISS's flat index breaks them. Deliberately slow: it is the baseline.
    """
    out_ids = np.zeros((len(queries), k), np.int64)
    out_scores = np.zeros((len(queries), k), np.float32)
    for qi, q in enumerate(queries):
        scores = [float(np.dot(q, row)) for row in db]
        top = sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]
        out_ids[qi] = top
        out_scores[qi] = [scores[j] for j in top]
    return out_scores, out_ids


def topk_agreement(ref_scores: np.ndarray, ref_ids: np.ndarray, scores: np.ndarray, ids: np.ndarray,
                   tol: float = TIE_TOLERANCE) -> dict:
    """Do two exact searches return the same top-k? Ids may differ only where the scores tie.

    Args:
        ref_scores: (n, k) reference scores.
        ref_ids: (n, k) reference ids.
        scores: (n, k) the other method's scores.
        ids: (n, k) its ids.
        tol: scores closer than this are ties.

    Returns:
        {"identical": bool, "n_queries", "rows_with_different_ids", "rows_differing_only_by_ties",
         "rows_differing": rows whose ids differ beyond ties, "max_score_diff"}.
    """
    same_ids = (ref_ids == ids).all(axis=1)
    score_gap = np.abs(ref_scores.astype(np.float64) - scores.astype(np.float64))
    # Where ids differ but the score at every rank matches, the rows are permutations of tied items.
    kth = ref_scores[:, -1:].astype(np.float64)
    tie_ok = (score_gap <= tol).all(axis=1)
    differing = ~same_ids
    for i in np.flatnonzero(differing & tie_ok):
        # ids outside the tie at the k-th score must be the same set
        strict_ref = set(ref_ids[i][ref_scores[i] > kth[i, 0] + tol].tolist())
        strict = set(ids[i][scores[i] > kth[i, 0] + tol].tolist())
        tie_ok[i] = strict_ref == strict
    bad = differing & ~tie_ok
    return {"identical": bool(not bad.any()), "n_queries": int(len(ids)), "rows_with_different_ids": int(differing.sum()),
            "rows_differing_only_by_ties": int((differing & tie_ok).sum()), "rows_differing": int(bad.sum()),
            "max_score_diff": float(score_gap.max()) if score_gap.size else 0.0}


def random_unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """`n` random unit vectors (Gaussian, L2-normalised), float32."""
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def load_embeddings(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(image db, caption queries, source): the retrieval run's test embeddings, else random unit vectors."""
    import retrieval

    run = Path(args.retrieval_run)
    reason = f"no heads.pt in {run}"
    if (run / "heads.pt").is_file():
        trained_on = read_json(run / "config.json").get("args", {}).get("data") if (run / "config.json").is_file() else None
        data_path = args.data or trained_on or str(DEFAULT_DATA)
        if Path(data_path).is_file():
            records = load_data(data_path, ["test"])["splits"]["test"]
            heads, meta = retrieval.load_heads(run / "heads.pt")
            fx = retrieval.FeatureExtractor(meta["image_encoder"], meta["text_encoder"], meta.get("image_res", 0))
            img_f, txt_f, _ = retrieval.split_features(fx, records)
            return (retrieval.embed(heads, "image", img_f), retrieval.embed(heads, "text", txt_f),
                    f"test embeddings of {repo_path(run)} on {repo_path(data_path)} ({len(records)} images)")
        reason = f"data file {data_path} is missing"
    db = random_unit_vectors(1000, args.dim, args.seed)
    return db, random_unit_vectors(5000, args.dim, args.seed + 1), f"random unit vectors ({reason})"


def bench_equal_results(args: argparse.Namespace, db: np.ndarray, queries: np.ndarray, source: str) -> dict:
    """FAISS flat vs the Python loop vs vectorised numpy on the same embeddings: same top-k, and the time ratios.

    Args:
        args: parsed arguments (--naive-queries, --k, the timing flags).
        db: (n, d) unit image embeddings; queries: (m, d) unit caption embeddings; source: where they come from.
    """
    import retrieval

    if args.naive_queries:
        queries = queries[:args.naive_queries]
    k = min(args.k, len(db))
    print(f"retrieval, same embeddings ({source}): {len(queries)} queries x {len(db)} rows, top-{k}")
    loop, (loop_scores, loop_ids) = timed(lambda: naive_search(db, queries, k), args)
    numpy_t, (np_scores, np_ids) = timed(lambda: retrieval.brute_force_search(db, queries, k), args)
    build, index = timed(lambda: retrieval.build_index(db, "flat"), args)
    search, (faiss_scores, faiss_ids) = timed(lambda: retrieval.search(index, queries, k), args)
    loop_s, numpy_s, build_s, search_s = (t["min_s"] for t in (loop, numpy_t, build, search))
    vs_loop = topk_agreement(loop_scores, loop_ids, faiss_scores, faiss_ids)
    vs_numpy = topk_agreement(np_scores, np_ids, faiss_scores, faiss_ids)
    out = {"source": source, "n_db": len(db), "n_queries": len(queries), "dim": int(db.shape[1]), "k": k,
           "python_loop_s": loop_s, "numpy_s": numpy_s, "faiss_build_s": build_s, "faiss_search_s": search_s,
           "median_s": {"python_loop": loop["median_s"], "numpy": numpy_t["median_s"],
                        "faiss_build": build["median_s"], "faiss_search": search["median_s"]},
           "ratio_faiss_vs_python_loop": ratio(loop_s, search_s),
           "ratio_faiss_vs_python_loop_incl_build": ratio(loop_s, build_s + search_s),
           "ratio_faiss_vs_numpy": ratio(numpy_s, search_s),
           "same_topk_as_python_loop": vs_loop, "same_topk_as_numpy": vs_numpy}
    print(f"  python loop {loop_s:.3f} s, numpy {numpy_s:.4f} s, faiss flat {search_s:.4f} s (+{build_s:.4f} s build): "
          f"x{out['ratio_faiss_vs_python_loop']:.1f} vs loop, x{out['ratio_faiss_vs_numpy']:.1f} vs numpy; "
          f"same top-{k}: {vs_loop['identical']} (loop), {vs_numpy['identical']} (numpy)")
    return out


def replicate_with_noise(base: np.ndarray, n: int, noise: float, seed: int, chunk: int = 100_000) -> np.ndarray:
    """`n` unit rows: row i is base[i % len(base)] plus Gaussian noise of expected L2 norm `noise`, renormalised.

    Copies of real embeddings keep their cluster structure (unlike uniform random vectors), so an approximate
    index is measured on the kind of data it serves. Built in chunks: the noise never takes a second (n, d) array.

    Args:
        base: (m, d) unit float32 rows.
        n: rows wanted.
        noise: expected norm of each row's noise (0: exact copies).
        seed: noise seed.
        chunk: rows drawn at a time.

    Returns:
        (n, d) float32, L2-normalised.
    """
    d = base.shape[1]
    out = np.empty((n, d), np.float32)
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        rows = base[np.arange(start, min(n, start + chunk)) % len(base)].astype(np.float32)
        rows += rng.standard_normal(rows.shape, dtype=np.float32) * np.float32(noise / math.sqrt(d))
        out[start:start + len(rows)] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def bench_index_scale(args: argparse.Namespace, db: np.ndarray, queries: np.ndarray) -> list[dict]:
    """Build and search time of each index at each database size, and the approximate indexes' recall@k vs flat.

    The database is `db` replicated with noise to each of --sizes; the queries are --queries rows of `queries`
    (held-out captions), drawn with --seed. Builds are repeated until --min-seconds without a warm-up call (a build
    is a one-off cost, the slowest take tens of seconds); searches get a warm-up call and --repeats.

    Args:
        args: parsed arguments.
        db: (m, d) unit image embeddings.
        queries: (q, d) unit caption embeddings.

    Returns:
        One row per (size, index): "build_s"/"search_s" (min), their medians, queries/s and recall@k vs flat.
    """
    import retrieval

    rows = []
    pick = np.random.default_rng(args.seed).choice(len(queries), min(args.queries, len(queries)), replace=False)
    queries = queries[np.sort(pick)]
    k = args.k
    for n in args.sizes:
        data = replicate_with_noise(db, n, args.noise, args.seed + n)
        nlist = args.nlist or max(1, round(math.sqrt(n)))
        flat_scores = None
        for kind in args.indexes:
            row = {"n": n, "index": kind, "dim": int(db.shape[1]), "n_queries": len(queries), "k": k}
            if kind == "hnsw" and n > args.hnsw_max_n:
                row["skipped"] = f"n > --hnsw-max-n {args.hnsw_max_n} (build time grows to minutes on CPU)"
                rows.append(row)
                print(f"  n={n:>9,} {kind:<5} skipped ({row['skipped']})")
                continue
            kw = {"nlist": nlist, "nprobe": args.nprobe, "seed": args.seed} if kind == "ivf" else {}
            build, index = timed(lambda: retrieval.build_index(data, kind, **kw), args, warmup=0, repeats=1)
            search, (scores, _) = timed(lambda: retrieval.search(index, queries, k), args)
            if kind == "flat":
                flat_scores = scores
            row.update({"build_s": build["min_s"], "build_median_s": build["median_s"], "build_runs": build["runs"],
                        "search_s": search["min_s"], "search_median_s": search["median_s"],
                        "search_runs": search["runs"], "queries_per_s": len(queries) / search["min_s"],
                        f"recall@{k}": recall_at_k(scores, flat_scores) if flat_scores is not None else None})
            if kind == "ivf":
                row.update({"nlist": int(index.nlist), "nprobe": int(index.nprobe)})
            rows.append(row)
            print(f"  n={n:>9,} {kind:<5} build {build['min_s']:7.2f} s  search {search['min_s']:7.3f} s "
                  f"({row['queries_per_s']:,.0f} q/s)  recall@{k} vs flat {fmt(row[f'recall@{k}'])}")
            del index
        del data
    return rows


def recall_at_k(scores: np.ndarray, exact_scores: np.ndarray, tol: float = TIE_TOLERANCE) -> float:
    """Mean share of the k results that belong to the exact top-k: a result counts when its score reaches the exact
    k-th score (within `tol`), so among tied rows (exact copies) any of them is right.

    Args:
        scores: (q, k) inner products an index returned (missing results: -inf or FAISS's -3.4e38).
        exact_scores: (q, k) the exact search's scores, best first.
        tol: scores this close are ties.
    """
    kth = exact_scores[:, -1:].astype(np.float64)
    return float(np.mean(scores.astype(np.float64) >= kth - tol))


# --------------------------------------------------------------------------- 4. report
def bench_head_training(args: argparse.Namespace) -> dict:
    """retrieval.train_heads (the baseline's recipe) at one torch thread vs all usable cores, and its fused AdamW
    update vs torch's per-tensor loop (the CPU default) at all cores, side by side.

    The heads are two small MLPs over cached features, so each step is a few small matmuls: thread start-up and
    synchronisation can cost more than a second core gains, and the optimiser's ~10 elementwise passes per tensor
    are a fair share of a step. Times depend on the shapes only, so the features are seeded random ones of the
    default encoders' sizes (EfficientNet-Lite0 1280, all-MiniLM-L6-v2 384), 5 captions per image, --head-images
    images, --head-epochs epochs, no validation.

    Returns:
        {"n_images", "epochs", "threads": {n: {"min_s", "median_s", "runs"}}, "ratio_one_thread_vs_all",
         "adamw_loop": {"min_s", "median_s", "runs"}, "ratio_fused_vs_loop"}.
    """
    import retrieval

    rng = np.random.default_rng(args.seed)
    n, cores = args.head_images, usable_cores()
    img = rng.standard_normal((n, 1280), dtype=np.float32)
    txt = rng.standard_normal((5 * n, 384), dtype=np.float32)
    cap2img = np.repeat(np.arange(n), 5)
    batch = retrieval.parse_args([]).batch_size
    out: dict = {"n_images": n, "epochs": args.head_epochs, "batch_size": batch, "threads": {}}
    print(f"retrieval head training ({n} images, {args.head_epochs} epochs, batch {batch}):")
    for threads in sorted({1, cores}):  # train_heads sets --head-threads for its own run and restores them after
        targs = retrieval.parse_args(["--epochs", str(args.head_epochs), "--head-threads", str(threads)])
        t, _ = timed(lambda: retrieval.train_heads(img, txt, cap2img, targs), args)
        out["threads"][threads] = {"min_s": t["min_s"], "median_s": t["median_s"], "runs": t["runs"]}
        print(f"  {threads} thread(s): {t['min_s']:.2f} s (median {t['median_s']:.2f} s)")
    out["ratio_one_thread_vs_all"] = ratio(out["threads"][cores]["min_s"], out["threads"][1]["min_s"])
    targs = retrieval.parse_args(["--epochs", str(args.head_epochs), "--head-threads", str(cores), "--adamw-impl",
                                  "loop"])
    t, _ = timed(lambda: retrieval.train_heads(img, txt, cap2img, targs), args)
    out["adamw_loop"] = {"min_s": t["min_s"], "median_s": t["median_s"], "runs": t["runs"]}
    out["ratio_fused_vs_loop"] = ratio(t["min_s"], out["threads"][cores]["min_s"])
    print(f"  {cores} thread(s), AdamW per-tensor loop: {t['min_s']:.2f} s (median {t['median_s']:.2f} s): fused is "
          f"x{out['ratio_fused_vs_loop']:.2f} as fast")
    return out


def headline_ratios(m: dict) -> dict:
    """The measured ratios, flat: name -> number (absent parts are left out)."""
    out = {}
    g = m.get("generation")
    if g:
        for key in ("ratio_ours_vs_plain", "ratio_at_equal_fidelity", "ratio_batching_only", "ratio_sampler_only",
                    "ratio_optimisations_only", "ratio_student_vs_plain"):
            if g.get(key) is not None:
                out[f"generation_{key[6:]}"] = g[key]
    s = m.get("sd21")
    if s and s.get("status") == "ran":
        out["sd21_optimised_vs_fp32"] = s["ratio_optimised_vs_fp32"]
    r = m.get("retrieval")
    if r:
        e = r["equal_results"]
        for key in ("ratio_faiss_vs_python_loop", "ratio_faiss_vs_python_loop_incl_build", "ratio_faiss_vs_numpy"):
            out[f"retrieval_{key[6:]}"] = e[key]
        if r.get("head_training"):
            out["retrieval_head_training_one_thread_vs_all"] = r["head_training"]["ratio_one_thread_vs_all"]
            out["retrieval_head_training_fused_adamw_vs_loop"] = r["head_training"]["ratio_fused_vs_loop"]
    return out


def results_markdown(m: dict) -> str:
    """results.md, every sentence and table filled in from the metrics dict."""
    hw = m["hardware"]
    lines = ["# Benchmarks", "",
             f"Run `{m['run_name']}`: {hw['cpu']}, {hw['cores_usable']} usable cores, torch threads "
             f"{hw['torch_threads']}, GPU {hw['gpu'] or 'none'}. 1-min load average {hw['load_avg_1m_at_start']} "
             f"before this run (other processes; 0 on an idle machine) and {m['load_avg_1m_at_end']} at its end: "
             + ("**contended**: other work shared the CPU, so absolute times are slower than on an idle machine and "
                "the ratios noisier. " if hw.get("contended") else "the machine was idle at the start. ")
             + "Every ratio compares two times measured in this run, side by side.", ""]
    if m["ratios"]:
        lines += [*md_table(["ratio", "value"], [[k, fmt(v, ".2f")] for k, v in m["ratios"].items()]), ""]
    g = m.get("generation")
    if g:
        lines += [f"## Generation on CPU ({g['model']}, {g['n_images']} images per configuration)", "",
                  f"Plain: `{g['plain_call']}`.", ""]
        base = g["configs"][0]["seconds"]
        lines += md_table(["configuration", "steps", "guidance", "batch", "seconds (min / median)", "images/s",
                           "x vs plain", "oracle all", "colour", "shape", "all scores within 1 point of plain"],
                          [[r["config"], r["steps"], r["guidance"], r["batch_size"],
                            f"{fmt(r['seconds'], '.2f')} / {fmt(r['median_s'], '.2f')}",
                            fmt(r["images_per_s"], ".2f"), fmt(ratio(base, r["seconds"]), ".2f"),
                            *(fmt(r["fidelity"][k]) for k in ("all", "color", "shape")),
                            _yes_no(r.get("fidelity_within_1pt_of_plain"))] for r in g["configs"]])
        lines += ["", "Ablation (each optimisation on top of the best so far; kept when >= "
                      f"{KEEP_MIN_GAIN:.2f}x; fastest of at least {g['repeats']} timed runs per configuration, so "
                      "under contention a single ratio near 1 is within noise):", ""]
        for a in g["ablation"]:
            detail = a.get("skipped") or f"x{fmt(a['own_ratio'], '.3f')} ({'kept' if a['kept'] else 'dropped'})"
            if a["optimisation"] == "torch_compile" and a.get("warmup_s") is not None:
                detail += f"; one-off: its untimed warm-up, compiling included, took {a['warmup_s']:.0f} s"
            lines.append(f"- {a['optimisation']}: {a['what']}: {detail}")
        lines += ["", f"Best configuration: `{g['best_config']}`, x{fmt(g['ratio_ours_vs_plain'], '.2f')} vs plain "
                      f"(batching alone x{fmt(g['ratio_batching_only'], '.2f')}, the registry's sampling settings "
                      f"x{fmt(g['ratio_sampler_only'], '.2f')}, the kept optimisations x{fmt(g['ratio_optimisations_only'], '.2f')}).", "",
                  f"Fidelity, best minus plain (oracle, same prompts and seeds; paired 95% bootstrap CI over "
                  f"{g['n_images']} prompts):", ""]
        plain_f = g["configs"][0]["fidelity"]
        best_f = next(r for r in g["configs"] if r["config"] == g["best_config"])["fidelity"]
        lines += md_table(["attribute", "plain", "ours", "diff", "95% CI", "within 1 point"],
                          [[key, fmt(plain_f[key]), fmt(best_f[key]), fmt(d["diff"]), fmt_ci(d["ci95"]),
                            _yes_no(d["within_1pt"])] for key, d in g["fidelity_ours_minus_plain"].items()])
        lines.append("")
        if g["equal_fidelity"]:
            lines.append("Equal fidelity: every oracle score of our path is within 1 point of the plain path's.")
        else:
            off = [k for k, d in g["fidelity_ours_minus_plain"].items() if not d["within_1pt"]]
            same = [k for k, d in g["fidelity_batched_minus_plain"].items() if not d["within_1pt"]]
            lines.append(f"NOT equal fidelity within 1 point: {', '.join(off)} differ by more than "
                         f"{FIDELITY_TOLERANCE} (see the CIs: with {g['n_images']} prompts one image moves a score "
                         f"by {1 / g['n_images']:.3f}). At the plain path's own settings, batching alone is "
                         f"x{fmt(g['ratio_batching_only'], '.2f')} faster with "
                         + ("every oracle score within 1 point." if not same else
                            f"{', '.join(same)} differing by more than 1 point (batched numerics differ slightly)."))
        lines.append("")
        if g.get("student"):
            row = next(r for r in g["configs"] if r["config"] == g["student"])
            d = row["fidelity_minus_plain"]["all"]
            lines += [f"Few-step student: `{g['student']}` ({row['steps']} steps, guidance {row['guidance']}), "
                      f"x{fmt(g['ratio_student_vs_plain'], '.2f')} vs plain; oracle all-correct minus plain "
                      f"{fmt(d['diff'])} {fmt_ci(d['ci95'])} ({'within' if d['within_1pt'] else 'NOT within'} "
                      "1 point; every attribute's difference is in metrics.json).", ""]
        for row in g["configs"]:
            if row.get("more_prompts"):
                mp = row["more_prompts"]
                lines += [f"`{row['config']}` on {g['n_images']} + {mp['n_prompts']} prompts (the timed ones and "
                          f"{mp['n_prompts']} more, seed {mp['seed']}, untimed; their reference: {mp['reference']}, "
                          "which on the timed prompts drew the plain path's images up to "
                          f"{g['batched_vs_plain_max_pixel_diff']} grey levels), minus plain, paired 95% bootstrap CI:",
                          "", *md_table(["attribute", "diff", "95% CI", "n", "within 1 point"],
                                        [[k, fmt(d["diff"]), fmt_ci(d["ci95"]), d["n"], _yes_no(d["within_1pt"])]
                                         for k, d in row["fidelity_minus_plain_more_prompts"].items()]), ""]
        if g["fastest_equal_fidelity_config"]:
            lines.append(f"Fastest configuration at equal fidelity (every oracle score within 1 point of plain): "
                         f"`{g['fastest_equal_fidelity_config']}`, x{fmt(g['ratio_at_equal_fidelity'], '.2f')} vs plain.")
        else:
            lines.append("No configuration has every oracle score within 1 point of the plain path's.")
        lines += ["", "Images: [generation_grid.png](generation_grid.png) (top plain, bottom ours; same seeds).", ""]
    if m.get("limit"):
        lines += limit_markdown(m["limit"])
    s = m.get("sd21")
    if s:
        lines += ["## SD 2.1 architecture, random weights", ""]
        if s["status"] != "ran":
            lines += [f"{s['status']} (scale {s['scale']}).", ""]
        else:
            lines += [f"Scale {s['scale']}, {s['size']} px, {s['steps']} steps, {s['n_images']} images per configuration "
                      f"on {s['gpu'] or s['device']}.", "",
                      "| configuration | seconds (min / median) | images/s | x vs fp32 | step x | peak MiB |",
                      "|---|---|---|---|---|---|"]
            for r in s["configs"]:
                lines.append(f"| {r['config']} | {fmt(r['seconds'], '.2f')} / {fmt(r['median_s'], '.2f')} | "
                             f"{fmt(r['images_per_s'], '.2f')} | "
                             f"{fmt(r['ratio_vs_baseline'], '.2f')} | {fmt(r['ratio_vs_previous'], '.2f')} | "
                             f"{fmt(r['peak_memory_mb'], '.0f')} |")
            lines += ["", f"Anchor: {s['anchor']}; measured x{fmt(s['ratio_optimised_vs_fp32'], '.2f')} "
                          f"({'reaches' if s['reaches_anchor'] else 'below'} 3x).", ""]
    r = m.get("retrieval")
    if r:
        e = r["equal_results"]
        med = e["median_s"]
        lines += ["## Retrieval", "", f"Same embeddings: {e['source']}; {e['n_queries']} queries x {e['n_db']} rows, "
                  f"top-{e['k']}.", "", "| method | seconds (min / median) | FAISS flat is x faster | same top-k as FAISS |",
                  "|---|---|---|---|",
                  f"| Python loop (np.dot per row) | {fmt(e['python_loop_s'], '.4f')} / {fmt(med['python_loop'], '.4f')} | "
                  f"{fmt(e['ratio_faiss_vs_python_loop'], '.1f')} | {e['same_topk_as_python_loop']['identical']} |",
                  f"| numpy vectorised (retrieval.brute_force_search) | {fmt(e['numpy_s'], '.4f')} / "
                  f"{fmt(med['numpy'], '.4f')} | {fmt(e['ratio_faiss_vs_numpy'], '.1f')} | {e['same_topk_as_numpy']['identical']} |",
                  f"| FAISS IndexFlatIP search (+ build) | {fmt(e['faiss_search_s'], '.4f')} / {fmt(med['faiss_search'], '.4f')} "
                  f"(+{fmt(e['faiss_build_s'], '.4f')}) | 1 | - |",
                  "", f"Rows whose ids differ only by tied scores: {e['same_topk_as_python_loop']['rows_differing_only_by_ties']} "
                  f"(loop), {e['same_topk_as_numpy']['rows_differing_only_by_ties']} (numpy).", "",
                  *scale_markdown(r["scale"], r["scale_data"]), *head_training_markdown(r.get("head_training"))]
    return "\n".join(lines) + "\n"


def head_training_markdown(h: dict | None) -> list[str]:
    if not h:
        return []
    rows = [[str(k), "fused", f"{fmt(v['min_s'], '.2f')} / {fmt(v['median_s'], '.2f')}", str(v["runs"])]
            for k, v in h["threads"].items()]
    loop = h["adamw_loop"]
    rows.append([str(max(h["threads"], key=int)), "per-tensor loop", f"{fmt(loop['min_s'], '.2f')} / "
                 f"{fmt(loop['median_s'], '.2f')}", str(loop["runs"])])
    return ["", f"Head training (retrieval.train_heads, {h['n_images']} images of random features, {h['epochs']} "
            f"epochs, batch {h['batch_size']}): one thread is x{fmt(h['ratio_one_thread_vs_all'], '.2f')} as fast as "
            f"all usable cores; the fused AdamW update is x{fmt(h['ratio_fused_vs_loop'], '.2f')} as fast as torch's "
            "per-tensor loop.", "", *md_table(["torch threads", "AdamW update", "seconds (min / median)", "timed runs"],
                                              rows)]


def limit_markdown(lim: dict) -> list[str]:
    """The limit section of results.md: the measured peak, then each configuration's share of it."""
    peak = lim["peak"]
    lines = ["## The limit: achieved FLOP/s vs this machine's peak", "",
             f"Peak FLOP/s in fp32 and bf16, measured in this run with {peak['torch_threads']} torch thread(s) (FLOPs "
             "per call by torch.utils.flop_counter; GFLOP/s from the fastest and the median call); a configuration's "
             "share is of the peak of the precision it computes in:", "",
             *md_table(["kernel", "shape", "dtype", "GFLOP per call", "seconds (min / median)", "GFLOP/s (min time)",
                        "GFLOP/s (median time)"],
                       [[name, k["shape"], k["dtype"], fmt(k["flops"] / 1e9, ".2f"),
                         f"{fmt(k['min_s'], '.4f')} / {fmt(k['median_s'], '.4f')}", fmt(k["flops_per_s"] / 1e9, ".1f"),
                         fmt(k["flops_per_s_median"] / 1e9, ".1f")] for name, k in
                        ((n, peak[n]) for n in ("matmul", "conv2d", "matmul_bf16", "conv2d_bf16"))]), "",
             f"The UNet does {fmt(lim['unet_flops_per_eval'] / 1e9, '.4f')} GFLOP per evaluation of one latent "
             "(matmuls, convolutions and attention; elementwise ops, the text encoder and the VAE are not counted, "
             "so the achieved rates are lower bounds). Evaluations per image are counted during a one-image call "
             "(steps x 2 under classifier-free guidance).", "",
             *md_table(["configuration", "UNet evaluations per image", "GFLOP per image", "images/s",
                        "achieved GFLOP/s", "precision", "share of its peak"],
                       [[r["config"], r["unet_evals_per_image"], fmt(r["flops_per_image"] / 1e9, ".3f"),
                         fmt(r["images_per_s"], ".2f"), fmt(r["achieved_flops_per_s"] / 1e9, ".2f"), r["precision"],
                         f"{r['fraction_of_peak']:.1%}"] for r in lim["configs"]]), "",
             f"Plain diffusers runs at {lim['plain']:.1%} of this machine's peak, ours (`{lim['best_config']}`) at "
             f"{lim['ours']:.1%}.", ""]
    return lines


def scale_markdown(rows: list[dict], data: dict) -> list[str]:
    """The index-scale table of results.md: build and search (min / median) and recall@k vs flat per index."""
    lines = [f"Index build and search at scale: {data['source']}, {data['n_base']:,} image embeddings replicated "
             f"with Gaussian noise of norm {data['noise']} to each size, searched with held-out caption "
             "embeddings. Builds repeat until --min-seconds without a warm-up (the slowest take tens of seconds); "
             "searches get a warm-up call.", "",
             "| n | index | build s (min / median) | search s (min / median) | queries/s | recall@k vs flat |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['n']:,} | {row['index']} | skipped: {row['skipped']} | | | |")
            continue
        rk = row.get(f"recall@{row['k']}")
        lines.append(f"| {row['n']:,} | {row['index']} | {fmt(row['build_s'], '.2f')} / {fmt(row['build_median_s'], '.2f')}"
                     f" | {fmt(row['search_s'], '.3f')} / {fmt(row['search_median_s'], '.3f')} | "
                     f"{row['queries_per_s']:,.0f} | {fmt(rk) if row['index'] != 'flat' else 'exact'} |")
    return lines + [""]


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)

    # 1. threads and hardware, recorded with the arguments before anything is timed
    if args.threads:
        set_threads(args.threads)  # before hardware_info reads them (start_run pins the same)
    quiet_loading()
    hardware = hardware_info(args.threads)
    run = start_run("bench", args, config=dict(vars(args), hardware=hardware))
    metrics: dict = {"run_name": args.run_name, "quick": args.quick, "parts": args.only, "hardware": hardware}

    # 2. generation on CPU: plain diffusers vs our path, at equal fidelity; then how close each runs to the peak
    if "generation" in args.only:
        with run.step("generation"):
            metrics["generation"] = bench_generation(args, run.dir)
        with run.step("limit"):
            metrics["limit"] = bench_limit(args, metrics["generation"],
                                           native_bf16=bool(hardware["cpu_bf16_units"]))

    # 3. the SD 2.1 architecture (GPU; tiny scale on CPU)
    if "sd21" in args.only:
        with run.step("sd21"):
            metrics["sd21"] = bench_sd21(args)

    # 4. retrieval: same results as the loop, head training's threads, then index scaling on those embeddings
    # replicated with noise
    if "retrieval" in args.only:
        with run.step("retrieval"):
            db, queries, source = load_embeddings(args)
            equal = bench_equal_results(args, db, queries, source)
            heads = bench_head_training(args)
            print(f"index build + search, {len(db):,} image embeddings replicated with noise {args.noise}, "
                  f"held-out caption queries:")
            metrics["retrieval"] = {"equal_results": equal, "head_training": heads,
                                    "scale": bench_index_scale(args, db, queries),
                                    "scale_data": {"source": source, "n_base": len(db), "noise": args.noise}}

    # 5. ratios, results.md and metrics.json (latest moves last)
    metrics["ratios"] = headline_ratios(metrics)
    metrics["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    write_text(run.dir / "results.md", results_markdown(metrics))
    run.finish(metrics)
    print("ratios: " + ", ".join(f"{k} x{v:.2f}" for k, v in metrics["ratios"].items()))
    print(f"wrote {run.dir} in {metrics['timings']['total_s']:.0f} s")
    return metrics


if __name__ == "__main__":
    cli(main)
