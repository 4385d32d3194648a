"""Prompt fidelity: does a text-to-image model draw what the prompt asks for, and how real do its images look?

GenEval's idea with exact ground truth. Structured prompts in the shapes world's caption grammar
("a small red star", "a blue hexagon in the top left", "a red star to the left of a small blue
circle", generate_data.make_prompts) are generated with explicit seeds; the oracle (oracle.py), a CNN
trained on rendered scenes with known labels, reads every image back (per 3x3 cell: empty or one of
12 shapes, 8 colours, 2 sizes), and each image is scored on exactly the attributes its prompt names:
shape, colour, size, position (absolute cell or the relation), object count, and all of them at once.
Next to it: a Fréchet distance in EfficientNet-Lite0 feature space (an offline stand-in for FID) with
its real-vs-real floor, and an alignment score from our retrieval model (a CLIPScore stand-in).

Commands:
    python fidelity.py evaluate-model --model shapes-tiny --quick   # smoke run, < 1 min
    python fidelity.py evaluate-model --model shapes-tiny     # 200 + 200 prompts, FD on 400 caption images
    python fidelity.py evaluate-model --model shapes-tiny --write-card   # also update models/shapes-sd-tiny
    python fidelity.py evaluate-model --model sd-turbo --run-name turbo --wandb   # also log to wandb (offline)

Read FD next to fd_real_vs_real: with n = 400 images per set two real sets are already ~30 apart.

Outputs: outputs/fidelity/<model>/<run_name>/{config.json, metrics.json (with each step's timings),
fidelity_grid.png}, and `latest` beside them. With --write-card (a train_diffusion.py model folder): the folder's metrics.json (training keys
kept), fidelity_grid.png and README.md (the whole card, rebuilt by utils.model_card).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import re
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from generate_data import KINDS, make_prompts, render_prompts
from oracle import ATTRIBUTES, DEFAULT_ORACLE, Oracle, summarize_scores, to_uint8_64, weights_sha
from utils import (DEFAULT_DATA, DEFAULT_IMAGE_ENCODER, OUTPUTS, REPO, bootstrap_ci, cached, check, cli, comma_list,
                   common_args, encode_images, encode_texts, generate_images, image_grid, load_data, load_image_encoder,
                   load_pipeline, load_rgb, load_text_encoder, model_card, parse_checked, pick_device, read_json,
                   repo_path, resolve_model, start_run, subcommand, write_json, write_text)

COMMANDS = ("evaluate-model",)
DEFAULT_HEADS = OUTPUTS / "retrieval" / "latest" / "heads.pt"
FD_RES = 128  # EfficientNet input side for 64-px images (2x, as retrieval.py uses)
QUICK = {"n_prompts": 4, "n_fd": 8, "grid_rows": 4, "max_steps": 4}  # max_steps caps the model's recommended steps


def evaluate_parser() -> argparse.ArgumentParser:
    """`fidelity.py evaluate-model`'s flags."""
    p = argparse.ArgumentParser(prog="fidelity.py evaluate-model",
                                description="score a text-to-image model with the oracle, FD and alignment",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="shapes-tiny",
                   help="registry name (shapes-tiny, sd-turbo, ...), local pipeline folder or hub id")
    p.add_argument("--n-prompts", type=int, default=200, help="prompts per kind (one image each)")
    p.add_argument("--kinds", type=comma_list(), default="single,two",
                   help=f"comma-separated prompt kinds: {', '.join(KINDS)}")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's recommended)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: recommended)")
    p.add_argument("--scheduler", default=None, help="diffusers scheduler class to swap in (default: the model's)")
    p.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    p.add_argument("--n-fd", type=int, default=400,
                   help="images per set for the Fréchet distance (0 = skip); needs 2x this many real images")
    p.add_argument("--fd-from", default="captions",
                   help="what the FD images are generated from: 'captions' (one per real reference image, from "
                        "its first caption, as COCO FID does) or 'prompts' (reuse the fidelity images: no extra "
                        "generation, but their prompt mix differs from the real set's)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="data.pkl with the real images (test split, then val)")
    p.add_argument("--oracle", default=str(DEFAULT_ORACLE), help="oracle folder from `python oracle.py train`")
    p.add_argument("--heads", default=None,
                   help=f"retrieval heads.pt for the alignment score (default {DEFAULT_HEADS} when it exists; "
                        "'' to skip)")
    p.add_argument("--write-card", action="store_true",
                   help="also write metrics.json, fidelity_grid.png and the rebuilt README.md card into the model "
                        "folder (a train_diffusion.py model; git-tracked for the shipped ones)")
    p.add_argument("--grid-rows", type=int, default=8, help="prompts per kind shown in the sample grid")
    common_args(p, "fidelity/<model>", QUICK, helps={"seed": "seed of the prompts and of image i's noise (seed + i)"})
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command (argv[0], one of COMMANDS) and its flags; `-h` alone lists the commands."""
    _, flags = subcommand(argv, COMMANDS, __doc__)
    return parse_checked(evaluate_parser(), flags, QUICK, check_evaluate_args)


def check_evaluate_args(args: argparse.Namespace) -> None:
    check(args.n_prompts > 0, f"--n-prompts must be positive, got {args.n_prompts}")
    check(bool(args.kinds), "--kinds is empty")
    for kind in args.kinds:
        check(kind in KINDS, f"unknown prompt kind {kind!r} in --kinds; choose from {', '.join(KINDS)}")
    check(args.steps is None or args.steps > 0, f"--steps must be positive, got {args.steps}")
    check(args.guidance is None or args.guidance >= 0, f"--guidance must be >= 0, got {args.guidance}")
    check(args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    check(args.n_fd == 0 or args.n_fd >= 2, f"--n-fd must be 0 (skip) or >= 2, got {args.n_fd}")
    check(args.fd_from in ("captions", "prompts"), f"unknown --fd-from {args.fd_from!r}; choose captions or prompts")
    check(args.grid_rows >= 0, f"--grid-rows must be >= 0, got {args.grid_rows}")
    n_images = args.n_prompts * len(args.kinds)
    check(args.fd_from == "captions" or args.n_fd <= n_images,
          f"--fd-from prompts reuses the {n_images} prompt images: --n-fd must be <= {n_images}, got {args.n_fd}")
    check(not (args.write_card and args.quick), "--write-card with --quick would put smoke-run numbers in the card")


# --------------------------------------------------------------------------- Fréchet distance
def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula), in float64.

    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)). The usual route (pytorch-fid,
    torchmetrics) takes scipy.linalg.sqrtm of S_a S_b: at d = 1280 that takes ~30 s on 2 cores and returns
    complex noise when n < d (singular covariances). We use the exact identity
    Tr((S_a S_b)^(1/2)) = ||A_c B_c^T||_* / sqrt((n_a - 1)(n_b - 1)) (A_c, B_c the centred features), or for
    n > d the symmetric form Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), which are real by construction.

    Args:
        feats_a: (n_a, d) features, n_a >= 2.
        feats_b: (n_b, d) features, n_b >= 2.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    a, b = (x[:, None] if x.ndim == 1 else x for x in (a, b))
    check(a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[1],
          f"feature sets must be (n, d) with the same d, got {a.shape} and {b.shape}")
    check(len(a) >= 2 and len(b) >= 2, f"Fréchet distance needs >= 2 rows per set, got {len(a)} and {len(b)}")
    ac, bc = a - a.mean(0), b - b.mean(0)
    na, nb, d = len(a) - 1, len(b) - 1, a.shape[1]
    method = "gram" if len(a) * len(b) <= d * d else "cov"
    tr_sqrt = _trace_sqrt_product(ac, bc, method)
    mean_term = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    return max(mean_term + float((ac ** 2).sum() / na + (bc ** 2).sum() / nb) - 2.0 * tr_sqrt, 0.0)


def _trace_sqrt_product(ac: np.ndarray, bc: np.ndarray, method: str) -> float:
    """Tr((S_a S_b)^(1/2)) from centred features, by the n_a x n_b route ("gram") or the d x d route ("cov")."""
    na, nb = len(ac) - 1, len(bc) - 1
    if method == "gram":
        return float(np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt(na * nb))
    cov_a, cov_b = ac.T @ ac / na, bc.T @ bc / nb
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def real_reference_split(n_real: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded index sets of size n from n_real real images: the reference and the floor's second set."""
    check(n_real >= 2 * n, f"the FD floor needs 2 x {n} real images, only {n_real} available; lower --n-fd")
    perm = np.random.default_rng([seed, 11]).permutation(n_real)
    return np.sort(perm[:n]), np.sort(perm[n:2 * n])


def fd_features(model, info: dict, images, desc: str) -> np.ndarray:
    """EfficientNet-Lite0 pooled features at FD_RES (64-px images upsampled 2x, like retrieval.py)."""
    return encode_images(model, dict(info, res=FD_RES), images, desc=desc)


def real_fd_features(real: list[dict], indices: np.ndarray, model, info: dict) -> np.ndarray:
    """FD features of the real records at `indices` (in that order), cached on disk by path, size and mtime."""
    paths = [real[i]["path"] for i in indices]
    stats = [(p, Path(p).stat().st_size, int(Path(p).stat().st_mtime)) for p in paths]
    return cached(["fd-real", DEFAULT_IMAGE_ENCODER, FD_RES, stats],
                  lambda: fd_features(model, info, to_uint8_64([load_rgb(p) for p in paths]), "real features"))


def fd_real_vs_real(real_feats: np.ndarray, n: int, seed: int = 0) -> float:
    """The FD floor: FD between two disjoint random sets of n real images (what a perfect generator would score)."""
    ref, other = real_reference_split(len(real_feats), n, seed)
    return frechet_distance(real_feats[other], real_feats[ref])


def diversity(features: np.ndarray) -> float:
    """Mean pairwise distance between L2-normalised feature vectors (0: identical images; more: more varied).

    Used across seeds of one prompt: a sampler that collapses every seed to the same picture scores near 0.
    """
    f = features.astype(np.float64)
    if len(f) < 2:
        return float("nan")
    from scipy.spatial.distance import pdist

    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return float(pdist(f).mean())


# --------------------------------------------------------------------------- alignment
def alignment_score(images, texts: Sequence[str], heads_path: str | Path = DEFAULT_HEADS, device=None) -> np.ndarray:
    """A CLIPScore stand-in: 100 * max(cos, 0) between our retrieval model's image and text embeddings.

    Works for any images and captions (shapes, COCO); the encoders and input side come from the checkpoint.

    Args:
        images: arrays / PIL images / paths.
        texts: one caption per image.
        heads_path: heads.pt written by retrieval.py.
        device: torch device (default: automatic).

    Returns:
        float32 (n,) in [0, 100].
    """
    from retrieval import embed, load_heads

    check(Path(heads_path).is_file(), f"retrieval checkpoint not found: {heads_path} (run `python retrieval.py` first)")
    check(len(images) == len(texts), f"{len(images)} images but {len(texts)} texts")
    heads, meta = load_heads(heads_path)
    device = device or pick_device()
    model, info = load_image_encoder(meta["image_encoder"], device)
    img = encode_images(model, dict(info, res=meta.get("image_res") or info["res"]), list(images), desc="align images")
    tokenizer, text_model, _ = load_text_encoder(meta["text_encoder"], device)
    txt = encode_texts(tokenizer, text_model, list(texts), desc="align texts")
    cos = (embed(heads, "image", img) * embed(heads, "text", txt)).sum(1)
    return (100.0 * np.clip(cos, 0.0, None)).astype(np.float32)


# --------------------------------------------------------------------------- evaluate-model steps
def card_folder(spec: dict) -> Path:
    """The model folder `--write-card` writes to, checked before any slow step: a train_diffusion.py model.

    Raises:
        UserError: a hub model, or a folder without a training_log.json that has the card's facts.
    """
    folder = Path(spec["id"])
    check(folder.is_dir(), f"--write-card needs a local model folder; {spec['id']} is not one")
    if (folder / "distill_log.json").is_file():  # a distill.py student: its card is built from that log
        return folder
    log = folder / "training_log.json"
    check(log.is_file() and "card_facts" in read_json(log),
          f"--write-card needs {log} with card_facts (a model saved by train_diffusion.py)")
    return folder


def heads_path(flag: str | None) -> Path | None:
    """The retrieval checkpoint for the alignment score: `--heads`, else DEFAULT_HEADS when it exists, else None.

    Raises:
        UserError: an explicit `--heads` that is not a file.
    """
    heads = DEFAULT_HEADS if flag is None else (Path(flag) if flag else None)
    if flag:
        check(heads.is_file(), f"retrieval checkpoint not found: {heads} (run `python retrieval.py` first)")
    if heads is not None and not heads.is_file():
        print(f"note: no retrieval checkpoint at {heads}: alignment score skipped (run `python retrieval.py`)")
        return None
    return heads


def run_task(spec: dict) -> str:
    """The run's task folder, fidelity/<model> (a hub id's "/" becomes "-")."""
    return "fidelity/" + re.sub(r"[^A-Za-z0-9_.-]+", "-", spec["name"]).strip("-")


def real_pool(data_path: str, n_needed: int) -> list[dict]:
    """Real records for FD: the test split, topped up from val when the test split is too small."""
    data = load_data(data_path, splits=["test"])
    records = list(data["splits"]["test"])
    if len(records) < n_needed and "val" in data["splits"]:
        records += data["splits"]["val"]
    return records


def sampler_settings(settings: dict, args: argparse.Namespace) -> dict:
    """The sampler the run uses: the model's recommended steps and guidance unless given (--quick caps steps)."""
    steps = args.steps or (min(settings["steps"], QUICK["max_steps"]) if args.quick else settings["steps"])
    guidance = settings["guidance"] if args.guidance is None else args.guidance
    return {"scheduler": settings["scheduler"], "steps": steps, "guidance": guidance, "size": settings["size"],
            "dtype": settings["dtype"], "device": settings["device"]}


def run_header(settings: dict, sam: dict, args: argparse.Namespace) -> dict:
    """The metrics' first keys: model, sampler, prompt counts, seed, the oracle and its accuracy on renders."""
    oracle_metrics = Path(args.oracle) / "metrics.json"
    return {"model": {"name": settings["name"], "id": settings["id"]}, "sampler": sam,
            "n_prompts": args.n_prompts, "seed": args.seed, "oracle": repo_path(args.oracle),
            "oracle_sha256_12": weights_sha(args.oracle), "args": dict(vars(args)),
            "oracle_accuracy_on_renders": (read_json(oracle_metrics)["heldout"]["all"]
                                           if oracle_metrics.is_file() else None)}


def round_trip(encode_decode, prompts_by_kind: dict, oracle) -> dict:
    """Oracle all-correct of renders of the prompts (`render_prompts`, seed 1) after `encode_decode` (uint8 NHWC ->
    uint8 NHWC): a representation's ceiling, what no UNet on it can exceed (issue 10, fact 1). {kind: rate}."""
    out = {}
    for kind, prompts in prompts_by_kind.items():
        images = encode_decode(render_prompts(prompts, seed=1))
        out[kind] = summarize_scores(oracle.score(images, prompts))["all"]
    return out


def vae_round_trip(vae):
    """uint8 NHWC -> the autoencoder's posterior-mean reconstruction, uint8 NHWC (on the vae's device and dtype)."""
    import torch

    def fn(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.inference_mode():
            recon = torch.cat([vae.decode(vae.encode(b.to(vae.device, vae.dtype)).latent_dist.mean).sample.float().cpu()
                               for b in x.split(100)])
        return ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return fn


def representation_round_trip(pipe, sam: dict, oracle, n_prompts: int) -> dict | None:
    """The pipeline's own autoencoder round trip on `n_prompts` prompts per kind (seed 1, as the design study
    measures it), or None for a pipeline without an AutoencoderKL or that does not generate at the renders' 64 px."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "encode") or sam["size"] != 64:
        return None
    return round_trip(vae_round_trip(vae), {kind: make_prompts(kind, n_prompts, seed=1) for kind in KINDS}, oracle)


def structured_prompts(args: argparse.Namespace) -> tuple[list[dict], dict[str, slice]]:
    """make_prompts for every kind, concatenated, and each kind's slice of the list."""
    prompts = [p for kind in args.kinds for p in make_prompts(kind, args.n_prompts, args.seed)]
    part = {kind: slice(i * args.n_prompts, (i + 1) * args.n_prompts) for i, kind in enumerate(args.kinds)}
    return prompts, part


def generate(pipe, sam: dict, texts: Sequence[str], seeds: Sequence[int], batch_size: int) -> np.ndarray:
    """One image per (text, seed) with the run's sampler, as uint8 (n, 64, 64, 3)."""
    return to_uint8_64(generate_images(pipe, list(texts), list(seeds), sam["steps"], sam["guidance"], sam["size"],
                                       batch_size))


def oracle_metrics(scores: list[dict], render_scores: list[dict], part: dict[str, slice]) -> dict:
    """Per kind, the oracle's summary of the generated images, its all-correct rate on renders of the same
    prompts (its ceiling on this prompt set), and each prompt's all-correct (0/1, for paired comparisons between
    models: `versus`) with the rate's percentile-bootstrap 95% CI over prompts; None for kinds not run."""
    key = {"single": "single_object", "two": "two_object"}
    out: dict = {"prompt_renders_all_correct": {}, "all_correct_per_prompt": {}, "all_correct_ci95": {}}
    for kind in KINDS:
        out[f"{key[kind]}_all_correct"] = out[key[kind]] = None
        if kind in part:
            out[key[kind]] = summarize_scores(scores[part[kind]])
            out[f"{key[kind]}_all_correct"] = out[key[kind]]["all"]
            out["prompt_renders_all_correct"][kind] = summarize_scores(render_scores[part[kind]])["all"]
            hits = [int(bool(s["all"])) for s in scores[part[kind]]]
            out["all_correct_per_prompt"][kind] = hits
            out["all_correct_ci95"][kind] = bootstrap_ci(hits)["ci95"]
    return out


def versus(metrics: dict, ref: dict) -> dict | None:
    """Paired all-correct difference `metrics` − `ref` per prompt kind, over the same prompts and seeds, with its
    percentile-bootstrap 95% CI (utils.bootstrap_ci, paired): {kind: {"mean", "ci95", "n"}}; None unless both are
    evaluate-model runs with per-prompt results on the same prompt set (--n-prompts, --seed)."""
    a, b = metrics.get("all_correct_per_prompt"), ref.get("all_correct_per_prompt")
    if not a or not b or (metrics.get("n_prompts"), metrics.get("seed")) != (ref.get("n_prompts"), ref.get("seed")):
        return None
    return {kind: dict(bootstrap_ci(a[kind], b[kind]), n=len(a[kind])) for kind in a if kind in b}


def fd_metrics(pipe, sam: dict, real: list[dict], generated: np.ndarray, args: argparse.Namespace, device) -> dict:
    """FD of generated images to real test images and the real-vs-real floor at the same n (None with --n-fd 0).

    With --fd-from captions the FD images are generated from the reference images' first captions (seeds
    seed + 10^6 + i); with prompts they are the first n prompt images.
    """
    if not args.n_fd:
        return {"fd": None, "fd_real_vs_real": None}
    ref, other = real_reference_split(len(real), args.n_fd, args.seed)
    if args.fd_from == "captions":
        fd_images = generate(pipe, sam, [real[i]["captions"][0] for i in ref],
                             [args.seed + 10**6 + i for i in range(len(ref))], args.batch_size)
    else:
        fd_images = generated[:args.n_fd]
    enc, info = load_image_encoder(DEFAULT_IMAGE_ENCODER, device)
    real_feats = real_fd_features(real, np.concatenate([ref, other]), enc, info)
    gen_feats = fd_features(enc, info, fd_images, "generated features")
    return {"fd": frechet_distance(gen_feats, real_feats[:len(ref)]),
            "fd_real_vs_real": frechet_distance(real_feats[len(ref):], real_feats[:len(ref)]),
            "fd_n": int(args.n_fd), "fd_from": args.fd_from}


def write_grid(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray, dict]]) -> None:
    """Sample grid: one row per prompt (label: prompt and the oracle's verdict), a render of it, the generation."""
    images, labels = [], []
    for text, render, generated, score in rows:
        images += [render, generated]
        verdict = "ok" if score["all"] else "wrong " + ",".join(k for k in ATTRIBUTES[:-1] if score[k] is False)
        labels.append(f"{text}  [{verdict}]")
    image_grid(images, len(rows), 2, row_labels=labels, col_labels=["render", "generated"], cell=96).save(path)


def write_card(folder: Path, run_dir: Path, metrics: dict) -> None:
    """Put a run's results into the model folder: metrics.json (keys another script wrote there are kept, ours win
    on clashes), fidelity_grid.png, and README.md rebuilt whole from training_log.json and these metrics."""
    log = read_json(folder / "distill_log.json") if (folder / "distill_log.json").is_file() else None
    if log is not None:  # a distill.py student: compared with its teacher on the same prompts
        teacher = REPO / log["teacher"] / "metrics.json"
        metrics = dict(metrics, vs_teacher=versus(metrics, read_json(teacher)) if teacher.is_file() else None)
    old = read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
    write_json(folder / "metrics.json", {**(old if isinstance(old, dict) else {}), **metrics})
    if (run_dir / "fidelity_grid.png").is_file():
        shutil.copyfile(run_dir / "fidelity_grid.png", folder / "fidelity_grid.png")
    if log is not None:
        import distill

        write_text(folder / "README.md", distill.student_card(folder.name, log, metrics))
        return
    curve = folder / "learning_curve.json"
    write_text(folder / "README.md", model_card(folder.name, read_json(folder / "training_log.json"), metrics,
                                                read_json(curve) if curve.is_file() else None))


def evaluate_model(args: argparse.Namespace) -> dict:
    """`fidelity.py evaluate-model`: oracle scores, FD and alignment of one model; returns the metrics dict."""
    # 1. model, oracle and checkpoints: a bad name or an unwritable card fails before any slow step or run folder
    spec = resolve_model(args.model)
    card = card_folder(spec) if args.write_card else None
    heads = heads_path(args.heads)
    device = pick_device(args.device)
    oracle = Oracle.load(args.oracle, device)
    real = real_pool(args.data, 2 * args.n_fd) if args.n_fd else []
    pipe, settings = load_pipeline(args.model, device=device, scheduler=args.scheduler)
    run = start_run(run_task(spec), args)
    sam = sampler_settings(settings, args)
    metrics = run_header(settings, sam, args)

    # 2. structured prompts and one image per prompt (seed + i for image i, across kinds)
    prompts, part = structured_prompts(args)
    with run.step("generate"):
        generated = generate(pipe, sam, [p["text"] for p in prompts], [args.seed + i for i in range(len(prompts))],
                             args.batch_size)

    # 3. oracle scores, next to the same oracle on renders of the same prompts
    with run.step("oracle"):
        scores = oracle.score(generated, prompts, progress=True)
        renders = render_prompts(prompts, args.seed)
        metrics.update(oracle_metrics(scores, oracle.score(renders, prompts), part))
        metrics["representation_round_trip"] = representation_round_trip(pipe, sam, oracle, args.n_prompts)

    # 4. Fréchet distance to real test images, and the real-vs-real floor at the same n
    with run.step("fd"):
        metrics.update(fd_metrics(pipe, sam, real, generated, args, device))

    # 5. alignment score of the prompt images (our retrieval model as a CLIPScore stand-in)
    metrics["alignment"] = None
    if heads is not None:
        with run.step("alignment"):
            metrics["alignment"] = float(alignment_score(generated, [p["text"] for p in prompts], heads, device).mean())
        metrics["alignment_heads"] = repo_path(heads)

    # 6. sample grid, metrics and `latest`; the model's card only when asked
    shown = [part[kind].start + i for kind in args.kinds for i in range(min(args.grid_rows, args.n_prompts))]
    if shown:
        write_grid(run.dir / "fidelity_grid.png", [(prompts[j]["text"], renders[j], generated[j], scores[j])
                                                   for j in shown])
    metrics["evaluated"] = _dt.datetime.now().isoformat(timespec="seconds")
    run.finish(metrics)
    if card is not None:
        write_card(card, run.dir, metrics)
    print(format_summary(metrics))
    print(f"wrote {run.dir}" + (f" and the card, metrics and grid in {card}" if card is not None else ""))
    return metrics


def format_summary(m: dict) -> str:
    """The run's numbers in a few lines for the terminal."""
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"model {m['model']['name']}: {m['sampler']['steps']} steps, guidance {m['sampler']['guidance']}"]
    for key in ("single_object", "two_object"):
        if m.get(key):
            parts = ", ".join(f"{a} {f(m[key][a])}" for a in ATTRIBUTES if m[key][a] is not None)
            lines.append(f"{key} (n={m[key]['n']}): {parts}")
    lines.append(f"oracle on renders of these prompts: {m['prompt_renders_all_correct']}; "
                 f"held-out renders: {f(m['oracle_accuracy_on_renders'])}")
    if m.get("fd") is not None:
        lines.append(f"FD {m['fd']:.2f} vs real-vs-real floor {m['fd_real_vs_real']:.2f} (n={m['fd_n']}, "
                     f"from {m['fd_from']})")
    if m.get("alignment") is not None:
        lines.append(f"alignment {m['alignment']:.1f} / 100")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    return evaluate_model(parse_args(argv))


if __name__ == "__main__":
    cli(main)
