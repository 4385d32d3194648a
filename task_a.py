"""Task A: open text-to-image models side by side, measured: size, speed, memory, prompt fidelity, Fréchet distance.

Every model runs at its own recommended settings (registry: steps, guidance, scheduler; turbo models 1-4 steps
and guidance 0) on one shared prompt list with shared seeds (image k uses seed + k). Prompt fidelity is the
oracle's "every named attribute right" rate in the shapes world (oracle.py), or the alignment score of our
retrieval model (a CLIPScore stand-in) with `--fidelity alignment` or on other data. The Fréchet distance in
EfficientNet-Lite0 space is printed next to its real-vs-real floor at the same n: at n ~ 100 two real sets are
already far apart, so only differences well above the floor mean anything.

Quick (tiny settings, well under a minute on one core):
    python task_a.py --quick --threads 1
Default (the study's generator shapes-tiny-f2 (utils.STUDY_MODEL) vs its few-step student shapes-tiny-f2-turbo, as
SD 2.1 vs SD-Turbo, and the older pair shapes-tiny / shapes-tiny-turbo beside them; 24 single + 24 two-object
prompts x 2 seeds):
    python task_a.py --run-name default
Hub models (need a cached download; GPU advised):
    python task_a.py --models sd21,sd-turbo,sdxl,sdxl-turbo,sd35-medium --fidelity alignment
Writes outputs/task_a/<run_name>/: metrics.json ({"models": {name: {params, sec_per_image, peak_mem_mb, fidelity,
fd, ...}}}), results.md, grid.png (rows prompts, columns models), config.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import fidelity
import generate_data as gd
from oracle import ATTRIBUTES, DEFAULT_ORACLE, Oracle, summarize_scores, to_uint8_64
from utils import (DEFAULT_DATA, DEFAULT_IMAGE_ENCODER, MODEL_REGISTRY, STUDY_MODEL, bootstrap_ci, check, cli,
                   comma_list, common_args, fmt, fmt_ci, generate_images, image_grid, load_data, load_image_encoder,
                   load_pipeline, md_table, parse_checked, peak_memory_mb, reset_peak_memory, resolve_model, start_run,
                   time_call, write_text)

DEFAULT_MODELS = ",".join([STUDY_MODEL, MODEL_REGISTRY[STUDY_MODEL]["student"], "shapes-tiny", "shapes-tiny-turbo"])
FIDELITY_MODES = ("auto", "oracle", "alignment")
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
QUICK = {"n_prompts": 2, "seeds_per_prompt": 2, "batch_size": 2, "max_steps": 2, "grid_rows": 2}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", type=comma_list(), default=DEFAULT_MODELS,
                   help="comma-separated registry names (shapes-tiny-f2, shapes-tiny-f2-turbo, shapes-tiny, sd21, "
                        "sd-turbo, sdxl, sdxl-turbo, sd35-medium), local pipeline folders or hub ids")
    p.add_argument("--n-prompts", type=int, default=24, help="prompts per kind (shapes world) or data captions")
    p.add_argument("--kinds", type=comma_list(), default="single,two",
                   help="prompt kinds in the shapes world: single, two")
    p.add_argument("--seeds-per-prompt", type=int, default=2, help="images per prompt (seeds seed + k)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps for every model (default: each model's own)")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call (= one timed batch)")
    p.add_argument("--timed-batches", type=int, default=3,
                   help="timed batches after the warm-up batch (>= 3): the generation's own full batches, and more "
                        "calls on the first batch when they are fewer")
    p.add_argument("--fidelity", default="auto",
                   help="auto (oracle on shapes data, else alignment), oracle, or alignment (retrieval heads)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="data.pkl with the real images for FD (test, then val)")
    p.add_argument("--oracle", default=str(DEFAULT_ORACLE), help="oracle folder (oracle.py train)")
    p.add_argument("--heads", default=str(fidelity.DEFAULT_HEADS), help="retrieval heads.pt for --fidelity alignment")
    p.add_argument("--no-fd", action="store_true", help="skip the Fréchet distance")
    p.add_argument("--grid-rows", type=int, default=6, help="prompts shown in grid.png (first seed of each)")
    run = common_args(p, "task_a", QUICK,
                      helps={"seed": "seed of the prompt list and of image k's noise (seed + k)"})
    run.add_argument("--dtype", default="auto", help="float32, float16, bfloat16 or auto (fp32 CPU, bf16/fp16 GPU)")
    return parse_checked(p, argv, QUICK, check_args)


def check_args(args: argparse.Namespace) -> None:
    check(bool(args.models), "--models is empty; give registry names, folders or hub ids separated by commas")
    args.specs = [resolve_model(m) for m in args.models]  # unknown names fail here, before anything slow
    names = [s["name"] for s in args.specs]
    check(len(set(names)) == len(names), f"--models names a model twice: {', '.join(names)}")
    for kind in args.kinds:
        check(kind in gd.KINDS, f"unknown prompt kind {kind!r} in --kinds; choose from {', '.join(gd.KINDS)}")
    check(bool(args.kinds), "--kinds is empty")
    check(args.fidelity in FIDELITY_MODES, f"unknown --fidelity {args.fidelity!r}; choose one of {', '.join(FIDELITY_MODES)}")
    for name in ("n_prompts", "seeds_per_prompt", "batch_size"):
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check(args.timed_batches >= 3, f"--timed-batches must be >= 3 (a median of fewer is not a timing), "
                                   f"got {args.timed_batches}")
    check(args.steps is None or args.steps > 0, f"--steps must be positive, got {args.steps}")
    check(args.grid_rows >= 0, f"--grid-rows must be >= 0, got {args.grid_rows}")
    check(args.threads >= 0, f"--threads must be >= 0, got {args.threads}")
    check(Path(args.data).is_file(), f"data file not found: {args.data} (run `python generate_data.py` first)")


# --------------------------------------------------------------------------- 1. prompts and scoring
def build_prompts(args: argparse.Namespace, data: dict) -> tuple[list[dict | None], list[str], str]:
    """(structured prompts or None, texts, source): the shapes grammar, or first captions of real test images."""
    if data.get("source") == "shapes":
        prompts = [p for kind in args.kinds for p in gd.make_prompts(kind, args.n_prompts, args.seed)]
        return prompts, [p["text"] for p in prompts], "shapes grammar (" + "+".join(args.kinds) + ")"
    records = data["splits"]["test"]
    pick = np.random.default_rng([args.seed, 5]).permutation(len(records))[:args.n_prompts]
    return [None] * len(pick), [records[i]["captions"][0] for i in pick], "first captions of random test images"


def fidelity_mode(args: argparse.Namespace, data: dict) -> str:
    """The oracle only reads the shapes world; anything else is scored by the alignment score."""
    if args.fidelity == "auto":
        return "oracle" if data.get("source") == "shapes" else "alignment"
    check(args.fidelity != "oracle" or data.get("source") == "shapes",
          f"--fidelity oracle needs shapes-world data; {args.data} is {data.get('source')!r} (use alignment)")
    return args.fidelity


def score_fidelity(mode: str, images: np.ndarray, prompts: list, texts: list[str], args, oracle=None,
                   device=None) -> dict:
    """Mean fidelity with a bootstrap 95% CI over images, plus the oracle's per-kind attribute rates.

    `oracle` scores in "oracle" mode; "alignment" mode runs the retrieval heads (`args.heads`) on `device`."""
    if mode == "oracle":
        scores = oracle.score(images, prompts)
        values = [float(s["all"]) for s in scores]
        kinds = {k: summarize_scores([s for s, p in zip(scores, prompts) if _kind(p) == k])
                 for k in args.kinds}
        detail = {"per_kind": kinds, "attributes": summarize_scores(scores)}
        metric = "oracle all-correct rate"
    else:
        values = fidelity.alignment_score(images, texts, args.heads, device=device)
        detail, metric = {}, "alignment score (0-100, retrieval heads)"
    est = bootstrap_ci(values, seed=args.seed)
    return {"fidelity": est["mean"], "fidelity_ci95": est["ci95"], "fidelity_metric": metric, **detail}


def _kind(prompt: dict) -> str:
    return "single" if prompt["relation"] is None else "two"


# --------------------------------------------------------------------------- 2. one model
def count_params(pipe) -> dict[str, int]:
    """Parameters per component (denoiser, text encoders, VAE) and their total."""
    out = {}
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None and hasattr(module, "parameters"):
            out[name] = int(sum(p.numel() for p in module.parameters()))
    out["total"] = int(sum(out.values()))
    return out


def weights_fingerprint(pipe) -> str:
    """A short hash of the denoiser's first and last weight tensors: equal fingerprints flag identical models."""
    import hashlib

    module = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    params = list(module.parameters())
    digest = hashlib.sha1()
    for p in (params[0], params[-1]):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:12]


def timed_generation(pipe, texts: list[str], seeds: list[int], steps: int, guidance: float, size, args):
    """All images in batches, each full batch timed (utils.generate_images' batch_times); the first is the warm-up.

    Every model generates the same prompts and seeds in the same batches, so two models differ only by themselves.
    When the prompts fill fewer than 1 + `--timed-batches` full batches, utils.time_call times more calls on the
    first batch until they do (their images are discarded).

    Returns:
        (uint8 images, seconds per image of each timed batch, in order; the warm-up is not among them).
    """
    bs = args.batch_size
    batch_times: list[float] = []
    images = generate_images(pipe, texts, seeds, steps, guidance, size, batch_size=bs, progress=False,
                             batch_times=batch_times)
    timed = batch_times[1:]
    if len(timed) < args.timed_batches:
        batch_texts, batch_seeds = (texts * bs)[:bs], (seeds * bs)[:bs]
        timing, _ = time_call(lambda: generate_images(pipe, batch_texts, batch_seeds, steps, guidance, size,
                                                      batch_size=bs, progress=False),
                              warmup=0 if batch_times else 1, repeats=args.timed_batches - len(timed))
        timed += timing["times_s"]
    return images, [t / bs for t in timed]


def evaluate_model(model: str, texts, prompts, seeds, mode, oracle, real_feats, enc, args, device, dtype) -> tuple:
    """Load one model (registry name, folder or hub id) at its recommended settings, time it, score it. Returns (row, 64-px images)."""
    reset_peak_memory(device)
    t0 = time.time()
    pipe, settings = load_pipeline(model, device=device, dtype=dtype)
    load_s = time.time() - t0
    steps = args.steps or settings["steps"]
    if args.quick:
        steps = min(steps, QUICK["max_steps"])
    guidance = settings["guidance"]
    generated, per_image = timed_generation(pipe, texts, seeds, steps, guidance, settings["size"], args)
    sec = min(per_image)  # the fastest timed batch: what the model costs without the machine's other work
    peak = peak_memory_mb(device)
    small = to_uint8_64(generated)
    row = {"id": settings["id"], "params": count_params(pipe), "weights_fingerprint": weights_fingerprint(pipe),
           "steps": steps, "guidance": guidance,
           "scheduler": settings["scheduler"], "size": int(generated.shape[1]), "dtype": settings["dtype"],
           "device": settings["device"], "sec_per_image": sec, "images_per_s": 1.0 / sec if sec > 0 else None,
           "sec_per_image_median": statistics.median(per_image), "sec_per_image_batches": per_image,
           "batch_size": args.batch_size, "peak_mem_mb": peak,
           "peak_mem_kind": "CUDA allocator peak" if device.type == "cuda" else
                            "process peak RSS so far (CPU peak cannot be reset between models)",
           "load_s": round(load_s, 2)}
    row.update(score_fidelity(mode, small, prompts, texts, args, oracle=oracle, device=device))
    row["fd"] = row["fd_real_vs_real"] = None
    if real_feats is not None:
        n = len(small)
        gen = fidelity.fd_features(enc[0], enc[1], small, "generated features")
        row["fd"] = fidelity.frechet_distance(gen, real_feats[:n])
        row["fd_real_vs_real"] = fidelity.frechet_distance(real_feats[n:2 * n], real_feats[:n])
        row["fd_n"] = n
    del pipe
    return row, small


def real_features(args: argparse.Namespace, n: int, device):
    """EfficientNet features of 2n real images (the reference set and the floor's second set), cached on disk."""
    real = fidelity.real_pool(args.data, 2 * n)
    ref, other = fidelity.real_reference_split(len(real), n, args.seed)
    enc = load_image_encoder(DEFAULT_IMAGE_ENCODER, device=device)
    return fidelity.real_fd_features(real, np.concatenate([ref, other]), *enc), enc


# --------------------------------------------------------------------------- 3. report


def results_markdown(m: dict) -> str:
    lines = [f"# Task A: {len(m['models'])} models side by side", "",
             f"{m['n_images']} images per model: {m['n_prompts']} prompts ({m['prompt_source']}) x "
             f"{m['seeds_per_prompt']} seeds, image k with seed {m['seed']} + k, the same for every model. "
             f"Fidelity: {m['fidelity_metric']}, mean with bootstrap 95% CI over images. Time: seconds per image of the "
             f"fastest of {min(len(r['sec_per_image_batches']) for r in m['models'].values())} or more timed "
             f"batches of {m['batch_size']} (the generation's own, after its first as the warm-up), on "
             f"{m['device']} ({m['threads']} torch threads).", ""]
    rows = []
    for name, r in m["models"].items():
        p = r["params"]
        den = p.get("unet", p.get("transformer", 0))
        text = sum(v for k, v in p.items() if k.startswith("text_encoder"))
        fd = "skipped" if r["fd"] is None else f"{r['fd']:.1f} ({r['fd_real_vs_real']:.1f}, n={r['fd_n']})"
        rows.append([name, r["steps"], r["guidance"], r["scheduler"],
                     f"{den / 1e6:.2f}M / {text / 1e6:.2f}M / {p.get('vae', 0) / 1e6:.2f}M", f"{r['sec_per_image']:.3f}",
                     fmt(r["images_per_s"], ".2f"), f"{r['peak_mem_mb']:.0f}",
                     f"{fmt(r['fidelity'])} {fmt_ci(r['fidelity_ci95'])}", fd])
    lines += md_table(["model", "steps", "guidance", "scheduler", "params (denoiser / text / VAE)", "s/image",
                       "images/s", "peak MB", "fidelity [95% CI]", "FD (real-vs-real floor)"], rows)
    lines += ["", comparison_sentence(m), ""]
    same = same_weights(m)
    if same:
        lines += ["**Identical weights**: " + "; ".join(" = ".join(g) for g in same) + " (same denoiser fingerprint), "
                  "so any difference between them above is timing noise, not the model.", ""]
    if any(r.get("per_kind") for r in m["models"].values()):
        lines += ["## Oracle attribute rates (share of images with the named attribute right)", "",
                  *md_table(["model", "prompts", "shape", "colour", "size", "position", "count", "all"],
                            [[name, f"{kind} (n={s['n']})", *(fmt(s[a]) for a in ATTRIBUTES)]
                             for name, r in m["models"].items() for kind, s in (r.get("per_kind") or {}).items()]),
                  ""]
    lines += [f"Peak memory: {next(iter(m['models'].values()))['peak_mem_kind']}.", "", "![grid](grid.png)", ""]
    return "\n".join(lines)


def comparison_sentence(m: dict) -> str:
    """Which model is most faithful and fastest, and whether the fidelity CIs separate them (from the numbers)."""
    rows = m["models"]
    if len(rows) < 2:
        return "One model only: nothing to compare."
    best = max(rows, key=lambda n: rows[n]["fidelity"])
    fastest = min(rows, key=lambda n: rows[n]["sec_per_image"])
    others = [n for n in rows if n != best]
    separated = [n for n in others if rows[n]["fidelity_ci95"][1] < rows[best]["fidelity_ci95"][0]]
    sep = ("its CI lies above that of " + ", ".join(separated)) if separated else "but the 95% CIs overlap"
    if separated and len(separated) < len(others):
        sep += "; it overlaps with " + ", ".join(n for n in others if n not in separated)
    return (f"Highest fidelity: {best} ({rows[best]['fidelity']:.3f}); {sep}. Fastest: {fastest} "
            f"({rows[fastest]['sec_per_image']:.3f} s/image).")


def same_weights(m: dict) -> list[list[str]]:
    """Groups of models whose denoiser weights are identical (by fingerprint)."""
    groups: dict[str, list[str]] = {}
    for name, r in m["models"].items():
        groups.setdefault(r["weights_fingerprint"], []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def write_grid(path: Path, images: dict[str, np.ndarray], texts: list[str], rows: list[int]) -> None:
    names = list(images)
    cells = [images[n][i] for i in rows for n in names]
    labels = [texts[i][:40] for i in rows]
    image_grid(cells, len(rows), len(names), row_labels=labels, col_labels=names).save(path)


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    # 1. data, prompts, shared seeds, and the scorer (oracle or retrieval heads)
    data = load_data(args.data, splits=["test"])
    mode = fidelity_mode(args, data)
    prompts, texts, source = build_prompts(args, data)
    texts = [t for t in texts for _ in range(args.seeds_per_prompt)]
    prompts = [p for p in prompts for _ in range(args.seeds_per_prompt)]
    seeds = [args.seed + k for k in range(len(texts))]
    if mode == "alignment":
        check(Path(args.heads).is_file(), f"retrieval checkpoint not found: {args.heads} (run `python retrieval.py`)")
    run = start_run("task_a", args, config={k: v for k, v in vars(args).items() if k != "specs"})
    oracle = Oracle.load(args.oracle, run.device) if mode == "oracle" else None

    # 2. real features for FD (the reference set and, for the floor, a second disjoint set of the same size)
    with run.step("real_features"):
        real_feats, enc = (None, None) if args.no_fd else real_features(args, len(texts), run.device)

    # 3. every model at its own settings on the same prompts and seeds
    metrics = {"models": {}, "n_prompts": len(texts) // args.seeds_per_prompt, "seeds_per_prompt": args.seeds_per_prompt,
               "n_images": len(texts), "seed": args.seed, "prompt_source": source, "fidelity_mode": mode,
               "batch_size": args.batch_size, "timed_batches": args.timed_batches, "device": str(run.device),
               "threads": torch.get_num_threads()}
    images = {}
    for model, spec in zip(args.models, args.specs):
        print(f"{spec['name']}: generating {len(texts)} images")
        with run.step(spec["name"]):
            row, images[spec["name"]] = evaluate_model(model, texts, prompts, seeds, mode, oracle, real_feats, enc,
                                                       args, run.device, run.dtype)
        metrics["models"][spec["name"]] = row
        metrics["fidelity_metric"] = row["fidelity_metric"]
        run.log({f"{spec['name']}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
        print(f"  {row['sec_per_image']:.3f} s/image, fidelity {row['fidelity']:.3f} "
              f"[{row['fidelity_ci95'][0]:.3f}, {row['fidelity_ci95'][1]:.3f}], FD {fmt(row['fd'], '.1f')} "
              f"(floor {fmt(row['fd_real_vs_real'], '.1f')})")

    # 4. grid, table, metrics
    shown = [i * args.seeds_per_prompt for i in range(min(args.grid_rows, metrics["n_prompts"]))]
    if shown:
        write_grid(run.dir / "grid.png", images, texts, shown)
    write_text(run.dir / "results.md", results_markdown(metrics))
    run.finish(metrics)
    print(comparison_sentence(metrics))
    for group in same_weights(metrics):
        print(f"note: {' and '.join(group)} have identical denoiser weights")
    print(f"wrote {run.dir} ({metrics['timings']['total_s']} s)")
    return metrics


if __name__ == "__main__":
    cli(main)
