"""Task E: does imagining the query help retrieval, and can the same model edit an image by text?

Two applications of the diffusion model, both measured.

1. Imagine-then-retrieve (generative query expansion). For each text query (a test caption) the model
   draws k = 1..k_max images (one seeded generator per image); the retrieval model's image head embeds
   them, and they are fused with the query's text embedding in two ways, each with its weight w chosen
   on `val` queries against the `val` index (mAP, ties to the smaller w, so w = 0 = text-only can win):
   - weighted sum:  q = (1 - w) * text + w * normalise(mean of the k image embeddings), one FAISS search;
   - reciprocal-rank fusion: score(d) = (1 - w) / (c + rank_text(d)) + w * mean_j 1 / (c + rank_j(d)),
     ranks from one FAISS search per query and per image (c = 60, Cormack et al. 2009).
   R@1/5/10 and mAP on the test index, next to text-only, with 95% bootstrap CIs over queries of the
   metric and of the paired difference, overall, on queries whose image holds a target category
   (task_c's targets.json, else the 3 rarest training categories) and on two-object relational
   captions; plus the added seconds per query (generation + embedding + fusion).
2. Text-guided editing: rendered single-object scenes of known content, the colour or the shape changed by
   methods built from the same components (no reload), each at every `strength`:
   - img2img (StableDiffusionImg2ImgPipeline): the source noised with fresh noise to `strength`, then denoised
     with the target prompt;
   - DDIM inversion (`InversionEditor`): the source's latent run backwards by DDIMInverseScheduler with an
     empty prompt to the same noise level, then denoised from there with the target prompt: the noise is the
     source's own, so what the prompt does not change tends to stay;
   - null-text inversion (`NullTextEditor`, only when asked: ~20x inversion's time): inverted with the source's
     caption, and per step an unconditional embedding optimised so that guided denoising retraces the inversion.
   All run at --edit-steps (default 50, the inversion's step count in Mokady et al. 2023): DDIM inversion
   assumes the noise prediction barely changes over a step, so coarse steps lose the source.
   The oracle scores each edit (success = the edited attribute is now right AND shape/colour/size/cell/count
   otherwise kept).

Quick (smoke run: ~30 CPU-seconds with the shipped model, under a minute):
    python task_e.py --quick
Default (100 test and 24 val queries x 4 images; 16 edits x 5 strengths x 2 methods at 50 steps, each also run
asked for no change: with the teacher, 32 such edits took 360 s beside a training run; `make demo` runs it with the
student at its own 4 steps, `--model shapes-tiny-f2-turbo --edit-steps 0`):
    python task_e.py --run-name default
More queries for tighter CIs:
    python task_e.py --n-queries 500 --n-subset-queries 200 --n-val-queries 100
Writes outputs/task_e/<run_name>/: metrics.json, config.json, results.md, recall_vs_k.png,
edit_success.png, edit_grid.png (and generated/ and edited/, the resumable image stores).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from tqdm.auto import tqdm

import generate_data as gd
import retrieval
from oracle import DEFAULT_ORACLE, Oracle
from utils import (DEFAULT_DATA, OUTPUTS, STUDY_MODEL, ImageStore, bootstrap_ci, category_names, check, ci_verdict, cli,
                   comma_list, common_args, encode_images, fmt, fmt_delta, fmt_est, image_grid, l2_normalize,
                   load_data, load_image_encoder, load_pipeline, md_table, parse_checked, pick_device, pyplot,
                   read_json, start_run, time_call, write_json, write_text)

MAX_K = 8  # generated images per query at most; also the seed stride per query (seeds seed + MAX_K * caption + i)
FUSIONS = ("weighted", "rrf")
SUBSETS = ("overall", "targets", "relational")
METRICS = ("R@1", "R@5", "R@10", "AP")
EDIT_KINDS = ("color", "shape")
EDIT_METHODS = ("img2img", "inversion", "null-text")
KEPT_KEYS = ("shape", "color", "size", "position", "count")
DEFAULT_WEIGHTS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"
DEFAULT_STRENGTHS = "0.3,0.5,0.7,0.9,1.0"
DEFAULT_EDIT_STEPS = 50
VAL_SEED_OFFSET = 10**7  # val queries' seeds never coincide with test queries'
# What the CI of a paired difference to text-only says (`utils.ci_verdict` of it).
VERDICT_WORDS = {"better": "better than text-only (CI above 0)", "worse": "worse than text-only (CI below 0)",
                 "no detectable difference": "no detectable difference (CI includes 0)", "undefined": "undefined"}
QUICK = {"n_queries": 4, "n_subset_queries": 2, "n_val_queries": 2, "n_edits": 1, "edit_steps": 0, "bootstrap": 200}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="data.pkl from generate_data.py")
    p.add_argument("--heads", default=str(OUTPUTS / "retrieval" / "latest" / "heads.pt"),
                   help="retrieval heads.pt (retrieval.py); its encoders and input side are used")
    p.add_argument("--targets", default=str(OUTPUTS / "task_c" / "latest" / "targets.json"),
                   help="task_c targets.json naming the target categories; when missing, the 3 rarest training "
                        "categories are used")
    p.add_argument("--model", default=STUDY_MODEL, help="registry name, local diffusers folder or cached hub id")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's recommended)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: recommended)")
    p.add_argument("--k-max", type=int, default=4, help=f"images generated per query; k = 1..k_max is reported (1..{MAX_K})")
    p.add_argument("--n-queries", type=int, default=60, help="random test captions (the 'overall' queries)")
    p.add_argument("--n-subset-queries", type=int, default=20,
                   help="extra random test captions for each of the target and relational subsets (0 = none)")
    p.add_argument("--n-val-queries", type=int, default=24, help="random val captions the fusion weights are chosen on")
    p.add_argument("--eval-split", default="test", help="split of the reported queries and index")
    p.add_argument("--val-split", default="val", help="split the fusion weights are chosen on")
    p.add_argument("--weights", type=comma_list(float, lo=0, hi=1), default=DEFAULT_WEIGHTS,
                   help="comma-separated fusion weights w in [0, 1] to choose from")
    p.add_argument("--rrf-c", type=float, default=60.0, help="reciprocal-rank-fusion constant c (> 0)")
    p.add_argument("--n-edits", type=int, default=8, help="edited source scenes per edit kind (0 = skip editing)")
    p.add_argument("--edit-kinds", type=comma_list(), default=",".join(EDIT_KINDS),
                   help=f"comma-separated: {', '.join(EDIT_KINDS)}")
    p.add_argument("--edit-methods", type=comma_list(), default="img2img,inversion",
                   help="comma-separated editing methods: img2img (fresh noise), inversion (DDIM inversion, "
                        "the source's own noise), null-text (inversion with null-text optimisation: ~10 UNet "
                        "forward and backward passes per step, so ~20x inversion's time)")
    p.add_argument("--edit-steps", type=int, default=DEFAULT_EDIT_STEPS,
                   help="denoising steps of every editing method, a strength's share of them redone (0 = the model's "
                        "sampling steps). DDIM inversion's error shrinks with finer steps: Mokady et al. 2023 invert "
                        "with 50")
    p.add_argument("--strengths", type=comma_list(float), default=DEFAULT_STRENGTHS,
                   help="comma-separated strengths in (0, 1]: the share of the denoising steps redone (img2img: "
                        "noised to that level; inversion: inverted to it)")
    p.add_argument("--oracle", default=str(DEFAULT_ORACLE), help="oracle folder (oracle.py train)")
    p.add_argument("--grid-rows", type=int, default=8, help="edit examples shown in edit_grid.png")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the queries (>= 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per pipeline call")
    common_args(p, "task_e", QUICK, helps={
        "seed": "seed of the query draw, the bootstrap and every image's noise",
        "run_name": "run folder under <outputs>/task_e (default: the start time); the same name resumes the "
                    "generation"})
    return parse_checked(p, argv, QUICK, check_args)


def check_args(args: argparse.Namespace) -> None:
    check(1 <= args.k_max <= MAX_K, f"--k-max must be between 1 and {MAX_K}, got {args.k_max}")
    check(args.n_queries >= 1, f"--n-queries must be >= 1, got {args.n_queries}")
    check(args.n_subset_queries >= 0, f"--n-subset-queries must be >= 0, got {args.n_subset_queries}")
    check(args.n_val_queries >= 1, f"--n-val-queries must be >= 1, got {args.n_val_queries}")
    check(args.n_edits >= 0, f"--n-edits must be >= 0, got {args.n_edits}")
    check(args.bootstrap >= 1, f"--bootstrap must be >= 1, got {args.bootstrap}")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    check(args.grid_rows >= 1, f"--grid-rows must be >= 1, got {args.grid_rows}")
    check(args.threads >= 0, f"--threads must be >= 0, got {args.threads}")
    check(args.steps is None or args.steps >= 1, f"--steps must be >= 1, got {args.steps}")
    check(args.edit_steps >= 0, f"--edit-steps must be >= 0, got {args.edit_steps}")
    check(args.rrf_c > 0, f"--rrf-c must be > 0, got {args.rrf_c}")
    check(len(args.weights) > 0, "--weights needs at least one value")
    args.weight_grid = sorted(set(args.weights))
    check(len(args.strengths) > 0, "--strengths needs at least one value")
    args.strength_list = sorted(set(args.strengths))
    for s in args.strength_list:
        check(0 < s <= 1, f"--strengths must lie in (0, 1], got {s:g}")
    check(args.edit_kinds and set(args.edit_kinds) <= set(EDIT_KINDS), f"--edit-kinds must be a "
          f"comma-separated subset of {', '.join(EDIT_KINDS)}, got {','.join(args.edit_kinds)!r}")
    check(args.edit_methods and set(args.edit_methods) <= set(EDIT_METHODS), f"--edit-methods must be a "
          f"comma-separated subset of {', '.join(EDIT_METHODS)}, got {','.join(args.edit_methods)!r}")
    args.edit_methods = [m for m in EDIT_METHODS if m in args.edit_methods]
    check(Path(args.data).is_file(), f"data file not found: {args.data} (run `python generate_data.py` first)")
    check(Path(args.heads).is_file(), f"retrieval checkpoint not found: {args.heads} (run `python retrieval.py` first)")


# --------------------------------------------------------------------------- 1. queries and subsets
def is_relational(caption: str) -> bool:
    """Whether a caption states a two-object relation ("... to the left of ...", "above", ...)."""
    padded = f" {caption} "
    return any(f" {rel} " in padded for rel in gd.RELATIONS)


def target_categories(targets_path: str, data: dict, train: list[dict], k: int = 3) -> dict:
    """Target category ids: task_c's targets.json when it names categories of this data, else the k rarest."""
    ids = {name: cid for cid, name in category_names(data).items()}
    path = Path(targets_path)
    if path.is_file():
        names = [t["category"] for t in read_json(path).get("targets", [])]
        if names and all(n in ids for n in names):
            return {"source": str(path.resolve()), "names": names, "ids": [ids[n] for n in names]}
    counts = retrieval.image_counts(train)
    rarest = sorted(ids.values(), key=lambda c: (counts.get(c, 0), category_names(data)[c]))[:k]
    names = [category_names(data)[c] for c in rarest]
    return {"source": f"the {k} rarest training categories ({path} missing or names other categories)",
            "names": names, "ids": rarest, "train_counts": [counts.get(c, 0) for c in rarest]}


def draw_queries(captions: list[str], cap2img: np.ndarray, records: list[dict], target_ids: Sequence[int],
                 n_overall: int, n_subset: int, seed: int) -> dict:
    """Seeded query draw: a random pool (overall) plus extra random pools for the two subsets.

    The target subset is (overall pool + target pool) restricted to captions whose image holds a target
    category (the per-category convention of retrieval.py); the relational subset is (overall pool +
    relational pool) restricted to relational captions. Each is a uniform random sample of its subset.

    Returns:
        {"ids": sorted caption indices, "masks": {subset: bool array over ids}, "pools": sizes}.
    """
    rng = np.random.default_rng([seed, 5])
    n_cap = len(captions)
    has_target = np.array([any(c in target_ids for c in records[i]["category_ids"]) for i in cap2img], dtype=bool)
    relational = np.array([is_relational(c) for c in captions], dtype=bool)
    pool_a = rng.choice(n_cap, min(n_overall, n_cap), replace=False)
    in_a = np.zeros(n_cap, dtype=bool)
    in_a[pool_a] = True

    def extra(member: np.ndarray) -> np.ndarray:
        cand = np.flatnonzero(member & ~in_a)
        return rng.choice(cand, min(n_subset, len(cand)), replace=False) if n_subset and len(cand) else cand[:0]

    pool_b, pool_c = extra(has_target), extra(relational)
    ids = np.unique(np.concatenate([pool_a, pool_b, pool_c]))
    in_b, in_c = np.isin(ids, pool_b), np.isin(ids, pool_c)
    masks = {"overall": in_a[ids], "targets": (in_a[ids] | in_b) & has_target[ids],
             "relational": (in_a[ids] | in_c) & relational[ids]}
    return {"ids": ids, "masks": masks, "pools": {"overall": len(pool_a), "targets_extra": len(pool_b),
                                                  "relational_extra": len(pool_c)}}


def choose_queries(test: list[dict], val: list[dict], target_ids: Sequence[int], args: argparse.Namespace):
    """The seeded test queries (`draw_queries`) and the val caption ids (sorted) the fusion weights are chosen on."""
    captions, cap2img = retrieval.flatten_captions(test)
    draw = draw_queries(captions, cap2img, test, target_ids, args.n_queries, args.n_subset_queries, args.seed)
    n_val = len(retrieval.flatten_captions(val)[0])
    val_ids = np.sort(np.random.default_rng([args.seed, 6]).choice(n_val, min(args.n_val_queries, n_val),
                                                                   replace=False))
    return draw, val_ids


class Queries(NamedTuple):
    """One split's query captions and the index they search."""
    index: object  # FAISS index of the split's images
    text_emb: np.ndarray  # (n, d) normalised query text embeddings
    owners: np.ndarray  # (n,) image id each caption belongs to (its one relevant image)
    texts: list[str]  # the n captions
    caption_ids: np.ndarray  # (n,) their indices among the split's captions (they fix the images' seeds)


def split_queries(fx, heads, records: list[dict], caption_ids: np.ndarray) -> Queries:
    """Index of a split's images and the embeddings / owners / texts of the chosen captions."""
    captions, cap2img = retrieval.flatten_captions(records)
    img_emb = retrieval.embed(heads, "image", fx.images([r["path"] for r in records]))
    texts = [captions[i] for i in caption_ids]
    txt_emb = retrieval.embed(heads, "text", fx.texts(texts))
    return Queries(retrieval.build_index(img_emb, "flat"), txt_emb, cap2img[caption_ids], texts, caption_ids)


# --------------------------------------------------------------------------- 2. generation (resumable)
def query_seeds(caption_ids: np.ndarray, k: int, base: int) -> np.ndarray:
    """(n, k) seeds: image i of caption c gets base + MAX_K * c + i, whatever the query subset or k_max."""
    return base + MAX_K * np.asarray(caption_ids, dtype=np.int64)[:, None] + np.arange(k)[None, :]


def generate_for_queries(pipe, settings: dict, texts: list[str], seeds: np.ndarray, folder: Path,
                         batch_size: int, desc: str) -> tuple[np.ndarray, dict, int]:
    """k images per query as uint8 (n, k, H, W, 3), kept in an ImageStore under `folder` so a rerun resumes.

    An image is reused only when its prompt, seed, model weights, sampler settings, dtype and device all match.

    Returns:
        (images, {"wall_s", "cpu_s"} spent generating them (kept with each image, so resumed images keep their
        cost; cpu_s is process CPU time, all threads), number of images generated in this call).
    """
    store = ImageStore(folder, settings, key=[settings["dtype"], settings["device"]])
    n, k = seeds.shape
    items = [{"id": f"seed{int(seed)}", "text": text, "seed": int(seed)}
             for text, row in zip(texts, seeds) for seed in row]
    fresh = store.generate(pipe, items, batch_size, desc=desc)["generated"]
    entries = store.entries()
    seconds = {key: float(sum(entries[it["id"]][key] for it in items)) for key in ("wall_s", "cpu_s")}
    images = store.load(items)
    return images.reshape(n, k, *images.shape[1:]), seconds, fresh


def image_encoder_for(meta: dict, device):
    """The heads' image backbone with the input side it was trained at (as retrieval.FeatureExtractor uses it)."""
    model, info = load_image_encoder(meta["image_encoder"], device)
    return model, dict(info, res=meta.get("image_res") or info["res"])


def embed_generated(heads, encoder, images: np.ndarray) -> np.ndarray:
    """Normalised retrieval embeddings (n, k, d) of generated images (n, k, H, W, 3), encoded as the data's are."""
    n, k = images.shape[:2]
    feats = encode_images(*encoder, list(images.reshape(n * k, *images.shape[2:])), desc="generated features")
    return retrieval.embed(heads, "image", feats).reshape(n, k, -1)


def imagine(pipe, settings: dict, heads, encoder, test: Queries, val: Queries, args: argparse.Namespace,
            folder: Path) -> dict:
    """k_max generated images per test and val query, embedded (the first k serve every smaller k: same seeds).

    Returns:
        {"test": (n_test, k_max, d), "val": (n_val, k_max, d) embeddings, "per_image": {"generate_s",
        "generate_cpu_s", "embed_s", "embed_cpu_s"}}: wall and process CPU seconds per image, generation's
        as saved with each image (resumed images keep their cost).
    """
    test_seeds = query_seeds(test.caption_ids, args.k_max, args.seed)
    val_seeds = query_seeds(val.caption_ids, args.k_max, args.seed + VAL_SEED_OFFSET)
    test_gen, test_s, _ = generate_for_queries(pipe, settings, test.texts, test_seeds, folder / "test",
                                               args.batch_size, "imagine (test)")
    val_gen, val_s, _ = generate_for_queries(pipe, settings, val.texts, val_seeds, folder / "val", args.batch_size,
                                             "imagine (val)")
    n = (len(test.texts) + len(val.texts)) * args.k_max
    wall, cpu = time.perf_counter(), time.process_time()
    test_emb, val_emb = embed_generated(heads, encoder, test_gen), embed_generated(heads, encoder, val_gen)
    per_image = {"generate_s": (test_s["wall_s"] + val_s["wall_s"]) / n,
                 "generate_cpu_s": (test_s["cpu_s"] + val_s["cpu_s"]) / n,
                 "embed_s": (time.perf_counter() - wall) / n, "embed_cpu_s": (time.process_time() - cpu) / n}
    return {"test": test_emb, "val": val_emb, "per_image": per_image}


# --------------------------------------------------------------------------- 3. fusion
def weighted_queries(text_emb: np.ndarray, gen_emb: np.ndarray, w: float) -> np.ndarray:
    """(1 - w) * text + w * normalise(mean of the k image embeddings); w = 0 returns the text rows exactly.

    Not renormalised: an inner-product ranking does not change when a query is scaled, and leaving it
    keeps w = 0 bit-identical to text-only.

    Args:
        text_emb: (n, d) normalised text embeddings.
        gen_emb: (n, k, d) normalised embeddings of the k generated images.
        w: weight of the images in [0, 1].
    """
    mean = l2_normalize(gen_emb.mean(axis=1))
    return ((1.0 - w) * text_emb + w * mean).astype(np.float32)


def full_ranking(index, queries: np.ndarray) -> np.ndarray:
    """(n, N) database ids of every item, best first, from a FAISS search over the whole index."""
    return retrieval.search(index, queries, index.ntotal)[1]


def reciprocal_ranks(ids: np.ndarray, c: float) -> np.ndarray:
    """(n, N) 1 / (c + rank) per database item, rank 1 = best, from full rankings `ids` (n, N)."""
    n, size = ids.shape
    rr = np.empty((n, size), dtype=np.float64)
    np.put_along_axis(rr, ids, 1.0 / (c + np.arange(1, size + 1, dtype=np.float64))[None, :].repeat(n, 0), axis=1)
    return rr


def rrf_ranking(text_rr: np.ndarray, image_rr: np.ndarray, w: float) -> np.ndarray:
    """Ids ranked by (1 - w) * text_rr + w * image_rr, ties to the lower id.

    Args:
        text_rr: (n, N) reciprocal ranks of the text query's list.
        image_rr: (n, N) mean reciprocal ranks of the k image queries' lists.
        w: weight of the image lists.
    """
    return np.argsort(-((1.0 - w) * text_rr + w * image_rr), axis=1, kind="stable")


class Fuser:
    """Rankings of one query set under text-only, weighted-sum and RRF fusion, for any k <= k_max and w.

    Args:
        index: FAISS index of the split's images.
        text_emb: (n, d) query text embeddings.
        gen_emb: (n, k_max, d) generated-image embeddings.
        c: RRF constant.
    """

    def __init__(self, index, text_emb: np.ndarray, gen_emb: np.ndarray, c: float):
        self.index, self.text_emb, self.gen_emb, self.c = index, text_emb, gen_emb, c
        self.text_ids = full_ranking(index, text_emb)
        self.text_rr = reciprocal_ranks(self.text_ids, c)
        # One list per generated image; the first k serve every smaller k.
        self.image_rr = [reciprocal_ranks(full_ranking(index, gen_emb[:, j]), c) for j in range(gen_emb.shape[1])]

    def ranking(self, method: str, k: int, w: float) -> np.ndarray:
        if method == "text":
            return self.text_ids
        if method == "weighted":
            return full_ranking(self.index, weighted_queries(self.text_emb, self.gen_emb[:, :k], w))
        if method == "rrf":
            return rrf_ranking(self.text_rr, np.mean(self.image_rr[:k], axis=0), w)
        raise ValueError(f"unknown fusion {method!r}")


def per_query_metrics(ids: np.ndarray, query_img: np.ndarray) -> dict[str, np.ndarray]:
    """R@1/5/10 and AP per query (one relevant image per caption)."""
    return retrieval.ranking_metrics(ids, query_img, np.ones(len(query_img)))


def choose_weight(scores: dict[float, float]) -> float:
    """The w with the highest validation score; ties go to the smaller w (text-only when nothing helps)."""
    best = max(scores.values())
    return min(w for w, s in scores.items() if s == best)


def select_weights(val: Fuser, val_img: np.ndarray, grid: Sequence[float], k_max: int) -> dict:
    """Per fusion method and k: val mAP for every w and the chosen w."""
    out = {}
    for method in FUSIONS:
        out[method] = {}
        for k in range(1, k_max + 1):
            curve = {w: float(per_query_metrics(val.ranking(method, k, w), val_img)["AP"].mean()) for w in grid}
            out[method][str(k)] = {"w": choose_weight(curve), "val_mAP": {f"{w:g}": v for w, v in curve.items()}}
    return out


def estimates(values: dict[str, np.ndarray], mask: np.ndarray, n_boot: int, seed: int) -> dict:
    """Mean and 95% CI of each metric on `mask` (queries resampled): the text-only reference row.

    Args:
        values: metric name (METRICS) -> (n_queries,) per-query values of a ranking.
        mask: (n_queries,) bool, the queries of a subset.
        n_boot: resamples.
        seed: resampling seed.

    Returns:
        {"R@1" | "R@5" | "R@10" | "mAP": {"mean", "ci95"}}.
    """
    return {"mAP" if name == "AP" else name: bootstrap_ci(values[name][mask], n_boot=n_boot, seed=seed)
            for name in METRICS}


def vs_text_only(fused: dict[str, np.ndarray], text: dict[str, np.ndarray], mask: np.ndarray, n_boot: int,
                 seed: int) -> dict:
    """`estimates` of a fused ranking plus its paired difference to text-only on the same queries.

    Args:
        fused, text: metric name (METRICS) -> (n_queries,) per-query values of a ranking and of text-only.
        mask: (n_queries,) bool, the queries of a subset.
        n_boot: resamples.
        seed: resampling seed.

    Returns:
        {"R@1" | "R@5" | "R@10" | "mAP": {"mean", "ci95", "delta", "delta_ci95"}}.
    """
    out = estimates(fused, mask, n_boot, seed)
    for name in METRICS:
        delta = bootstrap_ci(fused[name][mask], text[name][mask], n_boot=n_boot, seed=seed)
        out["mAP" if name == "AP" else name].update(delta=delta["mean"], delta_ci95=delta["ci95"])
    return out


def fuse(test: Queries, val: Queries, gen: dict, masks: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    """Choose each fusion's w per k on val, then measure every ranking on the test queries against text-only.

    Args:
        test, val: the two splits' queries.
        gen: `imagine`'s output (the generated-image embeddings of both splits).
        masks: subset -> (n_test,) bool over the test queries (`draw_queries`).
        args: the parsed arguments (k_max, weight_grid, rrf_c, bootstrap, seed).

    Returns:
        {"fusion": chosen w and val curves, "retrieval": per subset its size, text-only estimates and every
        ranking's `vs_text_only`, "test_sweep": overall test R@10 at k_max for each w (for reading only),
        "search_s": fastest seconds per query of the text search, one image search and each fusion at each k}.
    """
    chosen = select_weights(Fuser(val.index, val.text_emb, gen["val"], args.rrf_c), val.owners, args.weight_grid,
                            args.k_max)
    fuser = Fuser(test.index, test.text_emb, gen["test"], args.rrf_c)
    n, ks = len(test.texts), [str(k) for k in range(1, args.k_max + 1)]
    search_s = {"text": time_call(lambda: retrieval.search(test.index, test.text_emb, 10))[0]["min_s"] / n,
                # RRF's own searches (one per generated image) happened inside Fuser: time one image list.
                "image": time_call(lambda: full_ranking(test.index, gen["test"][:, 0]))[0]["min_s"] / n}
    per_q = {"text": per_query_metrics(fuser.text_ids, test.owners)}
    for method in FUSIONS:
        per_q[method], search_s[method] = {}, {}
        for k in ks:
            timing, ids = time_call(lambda: fuser.ranking(method, int(k), chosen[method][k]["w"]))
            per_q[method][k], search_s[method][k] = per_query_metrics(ids, test.owners), timing["min_s"] / n
    per_q["image_only"] = {k: per_query_metrics(fuser.ranking("weighted", int(k), 1.0), test.owners) for k in ks}
    # Fixed-w test curves for reading only (w was chosen on val above, never here).
    sweep = {method: {f"{w:g}": float(per_query_metrics(fuser.ranking(method, args.k_max, w), test.owners)["R@10"]
                                      [masks["overall"]].mean()) for w in args.weight_grid} for method in FUSIONS}
    return {"fusion": chosen, "retrieval": subset_metrics(per_q, masks, args.bootstrap, args.seed),
            "test_sweep": sweep, "search_s": search_s}


def subset_metrics(per_q: dict, masks: dict[str, np.ndarray], n_boot: int, seed: int) -> dict:
    """Per subset: its size, text-only's `estimates` and every other ranking's `vs_text_only` (none when empty).

    Args:
        per_q: "text" -> per-query metrics; "weighted" / "rrf" / "image_only" -> k -> per-query metrics.
        masks: subset -> (n_queries,) bool.
        n_boot: resamples.
        seed: resampling seed.
    """
    ret = {}
    for subset in SUBSETS:
        mask = masks[subset]
        ret[subset] = {"n": int(mask.sum())}
        if not mask.any():
            continue
        ret[subset]["text"] = estimates(per_q["text"], mask, n_boot, seed)
        for method in (*FUSIONS, "image_only"):
            ret[subset][method] = {k: vs_text_only(v, per_q["text"], mask, n_boot, seed)
                                   for k, v in per_q[method].items()}
    return ret


def cost_model(per_image: dict, search_s: dict, k_max: int) -> dict:
    """Seconds per image and the seconds a query adds at each k: k * (generate + embed) + fusion (+ k image
    searches for rrf). `per_image` from `imagine`, `search_s` from `fuse`."""
    image_s = per_image["generate_s"] + per_image["embed_s"]
    ks = [str(k) for k in range(1, k_max + 1)]
    return {"generate_s_per_image": per_image["generate_s"], "embed_s_per_image": per_image["embed_s"],
            "generate_cpu_s_per_image": per_image["generate_cpu_s"], "embed_cpu_s_per_image": per_image["embed_cpu_s"],
            "text_only_search_s_per_query": search_s["text"],
            "added_s_per_query": {"weighted": {k: int(k) * image_s + search_s["weighted"][k] for k in ks},
                                  "rrf": {k: int(k) * (image_s + search_s["image"]) + search_s["rrf"][k] for k in ks}},
            "note": "wall-clock seconds; generation and embedding per image are batch averages; searches and "
                    "fusion are the fastest of 3 calls after a warm-up (utils.time_call); added = k * "
                    "(generate + embed) + fusion (+ k image searches for rrf); *_cpu_s_* = process CPU seconds (all "
                    "threads), which contention on a shared machine does not inflate"}


def delta_of(metric: dict) -> dict:
    """A `vs_text_only` metric's paired difference as a `{"mean", "ci95"}` estimate."""
    return {"mean": metric["delta"], "ci95": metric["delta_ci95"]}


def rate(r: dict) -> str:
    """An edit rate `{"rate", "ci95"}` as "0.500 [0.250, 0.750]"."""
    return fmt_est({"mean": r["rate"], "ci95": r["ci95"]})


# --------------------------------------------------------------------------- 4. editing
def edit_cases(kinds: Sequence[str], n_per_kind: int, seed: int, size: int) -> list[dict]:
    """Rendered single-object scenes of known content and, for each, a target with one attribute changed.

    Returns:
        Dicts with kind, source (uint8 image), source_prompt and target_prompt (structured prompts that
        name shape, colour, size and cell), and the edit prompt text.
    """
    prompts = gd.make_prompts("single", n_per_kind * len(kinds), seed) if n_per_kind else []
    cases = []
    for i, prompt in enumerate(prompts):
        rng = np.random.default_rng([seed, 11, i])
        scene = gd.scene_for_prompt(prompt, rng)
        image = np.asarray(gd.render_scene(scene, size, gd.sample_background(scene, rng)))
        obj = {key: scene[0][key] for key in ("shape", "color", "size", "cell")}
        kind = kinds[i % len(kinds)]
        options = [v for v in (gd.COLOR_NAMES if kind == "color" else gd.SHAPES) if v != obj[kind]]
        target = dict(obj, **{kind: options[int(rng.integers(len(options)))]})
        source_prompt = {"objects": [obj], "relation": None}
        target_prompt = {"objects": [target], "relation": None}
        cases.append({"kind": kind, "source": image, "source_prompt": {"text": gd.prompt_text(source_prompt),
                                                                       **source_prompt},
                      "target_prompt": {"text": gd.prompt_text(target_prompt), **target_prompt}})
    return cases


def img2img_pipeline(pipe):
    """An img2img pipeline sharing the text-to-image pipeline's modules (same weights, nothing reloaded)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    components = {k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet",
                                                                      "scheduler", "safety_checker",
                                                                      "feature_extractor", "image_encoder")}
    edit = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    edit.set_progress_bar_config(disable=True)
    return edit


class InversionEditor:
    """Text-guided editing by DDIM inversion, called like an img2img pipeline (so an ImageStore keeps its edits).

    The source is encoded by the VAE (posterior mode), its latent run backwards through deterministic DDIM with an
    empty prompt and no guidance (Song et al. 2021, "Denoising Diffusion Implicit Models", sec. 4.3; the starting
    point of Mokady et al. 2023, "Null-text Inversion") for `int(num_inference_steps * strength)` of the
    `num_inference_steps` trailing-spaced steps, and denoised from that latent with the target prompt by
    DPM-Solver++ on the same timesteps. Both passes are StableDiffusionPipeline calls sharing `pipe`'s modules
    (DDIMInverseScheduler, then DPMSolverMultistepScheduler with custom `timesteps`); nothing is random. Each
    batch's inversion path (every step's latent) is kept, so further strengths of the same sources reuse it.
    """

    def __init__(self, pipe):
        from diffusers import DDIMInverseScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

        modules = {k: pipe.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet")}
        config = pipe.scheduler.config
        # DDIMInverseScheduler takes only leading or trailing spacing; trailing's last step reaches t = T - 1.
        self.inverse, self.forward = (
            StableDiffusionPipeline(**modules, scheduler=cls.from_config(config, timestep_spacing="trailing"),
                                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            for cls in (DDIMInverseScheduler, DPMSolverMultistepScheduler))
        for p in (self.inverse, self.forward):
            p.set_progress_bar_config(disable=True)
        self.paths: dict[tuple, list] = {}  # (sources' digest, steps, *prompts) -> [z0, latent after each step]

    def __call__(self, prompt: list[str], image: list, strength: float, num_inference_steps: int,
                 guidance_scale: float, output_type: str = "np", generator=None, **kw):
        """Edit `image` (PIL images) towards `prompt` (one per image); returns the forward pipeline's output
        (`.images`). `generator` is accepted for the img2img call signature and unused: both passes are
        deterministic.

        Raises:
            ValueError: `strength` leaves no inversion step at these steps.
        """
        steps = inverted_steps(strength, num_inference_steps)
        size = {"height": image[0].height, "width": image[0].width}
        _, path, timesteps = self.inversion(image, num_inference_steps)
        return self.forward(prompt, timesteps=timesteps[:steps][::-1], guidance_scale=guidance_scale,
                            latents=path[steps], output_type=output_type, **size, **kw)

    def inversion(self, image: list, num_inference_steps: int, prompts: list[str] | None = None
                  ) -> tuple[tuple, list, list[int]]:
        """(the sources' key, [z0, then the latent after each inverse step], the inverse steps' timesteps,
        ascending): path[i] is the latent at timesteps[i - 1]; computed once per batch of sources, step count and
        the `prompts` the inversion is conditioned on (default: empty)."""
        prompts = prompts or [""] * len(image)
        key = (hashlib.sha1(b"".join(im.tobytes() for im in image)).hexdigest(), num_inference_steps, *prompts)
        if key not in self.paths:
            z0 = vae_latents(self.inverse, image) * self.inverse.vae.config.scaling_factor
            path = [z0]

            def keep(pipe, i, t, tensors):
                path.append(tensors["latents"].clone())
                return tensors

            self.inverse(prompts, num_inference_steps=num_inference_steps, guidance_scale=1.0,
                         latents=z0, output_type="latent", callback_on_step_end=keep, height=image[0].height,
                         width=image[0].width)
            self.paths[key] = path  # only a finished path is kept
        self.inverse.scheduler.set_timesteps(num_inference_steps)
        return key, self.paths[key], [int(t) for t in self.inverse.scheduler.timesteps]


class NullTextEditor(InversionEditor):
    """DDIM inversion with null-text optimisation (Mokady et al. 2023, "Null-text Inversion for Editing Real Images
    using Guided Diffusion Models", CVPR, sec. 3.2), called like an img2img pipeline.

    Plain inversion denoises at guidance w > 1 along a path inverted at w = 1, so classifier-free guidance pulls
    every step off it and the source is lost even when nothing is asked to change. Here the source is inverted with
    its own caption (at w = 1, the paper's pivot) and, for each denoising step from the top of that path down, the
    unconditional embedding of every source is optimised (Adam, `inner_steps` iterations, learning rate
    lr * (1 - i / 100) at the i-th step, floored at lr / 10 beyond 90 steps, stopping early below loss 1e-5) so
    that the guided step with the source's own caption lands on the path's next latent; editing then
    swaps in the target caption and keeps those per-step null embeddings (fed to the pipeline through
    callback_on_step_end). The steps use first-order DPM-Solver++ (= DDIM, Lu et al. 2022), whose update the
    optimisation differentiates. The embeddings are optimised once per batch of sources, along the whole path,
    and shared by every strength (a shorter edit starts lower on the same path) and by the no-change run.

    Args:
        pipe: the loaded StableDiffusionPipeline (its modules are shared, not copied).
        captions: `source_digest` of a source image -> that source's caption.
        inner_steps: optimiser iterations per denoising step (10 in the paper).
        lr: Adam's learning rate at the first step (1e-2 in the paper).
    """

    def __init__(self, pipe, captions: dict[str, str], inner_steps: int = 10, lr: float = 1e-2):
        from diffusers import DPMSolverMultistepScheduler

        super().__init__(pipe)
        self.forward.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing", solver_order=1, algorithm_type="dpmsolver++")
        self.captions, self.inner_steps, self.lr = captions, inner_steps, lr
        self.nulls: dict[tuple, list] = {}  # (sources' key, guidance) -> null embeddings per inverse step

    def __call__(self, prompt: list[str], image: list, strength: float, num_inference_steps: int,
                 guidance_scale: float, output_type: str = "np", generator=None, **kw):
        """Edit `image` towards `prompt` as `InversionEditor` does, with the optimised null embeddings.

        Raises:
            ValueError: `strength` leaves no inversion step at these steps.
            KeyError: a source image that is not among `captions`.
        """
        import torch

        steps = inverted_steps(strength, num_inference_steps)
        source = [self.captions[source_digest(im)] for im in image]
        key, path, timesteps = self.inversion(image, num_inference_steps, source)
        pipe = self.forward
        cond = pipe.encode_prompt(list(prompt), pipe.device, 1, False)[0]
        if guidance_scale <= 1:  # no guidance, nothing to correct: plain inversion
            nulls = [pipe.encode_prompt([""] * len(image), pipe.device, 1, False)[0]] * num_inference_steps
        else:
            nulls = self.null_embeddings(key, source, path, timesteps, guidance_scale)

        def next_null(pipe, i, t, tensors):  # the pipeline's step i denoises from timesteps[steps - 1 - i]
            if steps - 2 - i >= 0:
                tensors["prompt_embeds"] = torch.cat([nulls[steps - 2 - i], cond])
            return tensors

        return pipe(prompt_embeds=cond, negative_prompt_embeds=nulls[steps - 1], timesteps=timesteps[:steps][::-1],
                    guidance_scale=guidance_scale, latents=path[steps], output_type=output_type,
                    height=image[0].height, width=image[0].width, callback_on_step_end=next_null,
                    callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kw)

    def null_embeddings(self, key: tuple, source: list[str], path: list, timesteps: list[int], guidance: float
                        ) -> list:
        """The optimised null embedding of every source for each inverse step (index j: the step that denoises
        from timesteps[j] to path[j]), cached per batch of sources and guidance scale."""
        import torch
        import torch.nn.functional as F

        if (key, guidance) in self.nulls:
            return self.nulls[key, guidance]
        pipe, n = self.forward, len(timesteps)
        cond = pipe.encode_prompt(source, pipe.device, 1, False)[0]
        # The embeddings are optimised in float32 (Adam's eps underflows in half precision) and cast for the UNet.
        null = pipe.encode_prompt([""] * len(source), pipe.device, 1, False)[0].float()
        alphas = pipe.scheduler.alphas_cumprod.to(cond.device, path[0].dtype)
        unet = pipe.unet.requires_grad_(False)
        nulls, x = [None] * n, path[n]
        for i, j in enumerate(reversed(range(n))):
            t = timesteps[j]
            a_prev = alphas[timesteps[j - 1]] if j else torch.ones((), dtype=alphas.dtype, device=alphas.device)
            with torch.no_grad():
                v_cond = unet(x, t, encoder_hidden_states=cond).sample
            null = null.detach().requires_grad_(True)
            opt = torch.optim.Adam([null], lr=self.lr * max(1 - i / 100, 0.1))

            def step(e):
                v = unet(x, t, encoder_hidden_states=e.to(cond.dtype)).sample
                return first_order_step(v + guidance * (v_cond - v), x, alphas[t], a_prev,
                                        pipe.scheduler.config.prediction_type)

            for _ in range(self.inner_steps):
                loss = F.mse_loss(step(null), path[j])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if loss.item() < 1e-5:
                    break
            null = null.detach()
            with torch.no_grad():
                x = step(null)
            nulls[j] = null.to(cond.dtype)
        self.nulls[key, guidance] = nulls
        return nulls


def source_digest(image) -> str:
    """sha1 of an image's pixel bytes: the same for a uint8 (H, W, 3) array and the RGB PIL image made from it, so
    an editor handed PIL images finds the caption of the array it came from."""
    return hashlib.sha1(image.tobytes()).hexdigest()


def inverted_steps(strength: float, num_inference_steps: int) -> int:
    """How many of the steps an edit at `strength` inverts and redoes.

    Raises:
        ValueError: `strength` leaves no step.
    """
    steps = int(num_inference_steps * strength)
    if steps < 1:
        raise ValueError(f"strength {strength:g} leaves no step of {num_inference_steps}")
    return steps


def first_order_step(model_output, sample, alpha_t, alpha_prev, prediction_type: str):
    """One deterministic DDIM step (Song et al. 2021, eq. 12 with sigma = 0; first-order DPM-Solver++ is the same
    update) from `sample` at cumulative alpha `alpha_t` to `alpha_prev`, differentiable in `model_output`.

    Args:
        model_output: the (guided) UNet output, shaped like `sample`.
        sample: latents (n, c, h, w).
        alpha_t, alpha_prev: scalar tensors, the noise schedule's alphas_cumprod at both ends (1 at the clean end).
        prediction_type: the scheduler's: "epsilon" or "v_prediction".
    """
    s_t, s_prev = (1 - alpha_t).sqrt(), (1 - alpha_prev).sqrt()
    if prediction_type == "v_prediction":
        x0 = alpha_t.sqrt() * sample - s_t * model_output
    elif prediction_type == "epsilon":
        x0 = (sample - s_t * model_output) / alpha_t.sqrt()
    else:
        raise ValueError(f"null-text inversion supports epsilon and v_prediction models, not {prediction_type!r}")
    return alpha_prev.sqrt() * x0 + s_prev / s_t * (sample - alpha_t.sqrt() * x0)


def vae_latents(pipe, images: list):
    """The VAE's posterior mode (unscaled) of PIL images: a torch tensor (n, latent channels, H / f, W / f) on the
    VAE's device."""
    import torch

    vae = pipe.vae
    x = pipe.image_processor.preprocess(images).to(vae.device, vae.dtype)
    with torch.inference_mode():
        return vae.encode(x).latent_dist.mode()


def vae_roundtrip(pipe, images: np.ndarray) -> np.ndarray:
    """Images encoded and decoded by the pipeline's VAE (latent mode, no noise): uint8 like the input."""
    import torch
    from PIL import Image

    latents = vae_latents(pipe, [Image.fromarray(im) for im in images])
    with torch.inference_mode():
        decoded = pipe.vae.decode(latents).sample
    out = pipe.image_processor.postprocess(decoded.float(), output_type="np")
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def run_edits(edit_pipe, cases: list[dict], strength: float, settings: dict, seed: int, batch_size: int,
              folder: Path, prompt: str = "target_prompt") -> np.ndarray:
    """Edit every source towards its `prompt` (a case key: target_prompt, or source_prompt for the no-change
    check) at one strength; case i's noise comes from seed + i.

    The edits are kept in an ImageStore under `folder` (keyed by the strength too), so a rerun resumes.
    """
    store = ImageStore(folder, settings, key=[strength, settings["dtype"], settings["device"]])
    items = [{"id": f"{i:05d}", "text": c[prompt]["text"], "seed": seed + i, "image": c["source"]}
             for i, c in enumerate(cases)]
    store.generate(edit_pipe, items, batch_size, progress=False, strength=strength)
    return store.load(items)


def edit_verdicts(scores: list[dict], cases: list[dict]) -> dict[str, np.ndarray]:
    """Per case: edited attribute right, every other named attribute kept, and both (success)."""
    edited = np.array([bool(s[c["kind"]]) for s, c in zip(scores, cases)])
    kept = np.array([all(s[k] is not False for k in KEPT_KEYS if k != c["kind"]) for s, c in zip(scores, cases)])
    return {"edited": edited, "kept": kept, "success": edited & kept}


def summarize_edits(verdicts: dict[str, np.ndarray], kinds: np.ndarray, n_boot: int, seed: int) -> dict:
    """Rates with 95% bootstrap CIs, for all cases and per edit kind."""
    out = {}
    for group in ("all", *EDIT_KINDS):
        mask = np.ones(len(kinds), bool) if group == "all" else kinds == group
        if not mask.any():
            continue
        out[group] = {"n": int(mask.sum())}
        for key, values in verdicts.items():
            est = bootstrap_ci(values[mask].astype(float), n_boot=n_boot, seed=seed)
            out[group][key] = {"rate": est["mean"], "ci95": est["ci95"]}
    return out


def edit(pipe, oracle: Oracle, settings: dict, args: argparse.Namespace, folder: Path) -> tuple[dict, dict]:
    """Rendered scenes, one attribute changed by each editing method at each strength, scored by the oracle.

    Each method and strength also runs once with every source's own prompt (asked for no change): the share of
    sources the oracle still reads entirely right ("reconstructed") is what the editor loses by itself, before any
    edit (an inversion at coarse steps loses much; the VAE round trip bounds it from above).

    Returns:
        (the editing metrics, with "by_method": method -> strength -> rates; the edit grid's examples:
        {"cases": the first `--grid-rows` cases, "edited": (method, strength) -> their uint8 (rows, H, W, 3)
        edits, "success": (method, strength) -> (rows,) bool}).
    """
    cases = edit_cases(args.edit_kinds, args.n_edits, args.seed, settings["size"])
    kinds = np.array([c["kind"] for c in cases])
    sources = np.stack([c["source"] for c in cases])
    source_prompts = [c["source_prompt"] for c in cases]
    source_ok = [s["all"] for s in oracle.score(sources, source_prompts)]
    # What survives the VAE alone bounds what any strength can keep.
    roundtrip_ok = [s["all"] for s in oracle.score(vae_roundtrip(pipe, sources), source_prompts)]
    captions = {source_digest(c["source"]): c["source_prompt"]["text"] for c in cases}
    editors = {"img2img": img2img_pipeline, "inversion": InversionEditor,
               "null-text": lambda pipe: NullTextEditor(pipe, captions)}
    rows = min(args.grid_rows, len(cases))
    by_method, examples = {}, {"cases": cases[:rows], "edited": {}, "success": {}}
    edit_settings = dict(settings, steps=edit_steps(args, settings))
    for method in args.edit_methods:
        editor, by_method[method] = editors[method](pipe), {}
        for strength in tqdm(args.strength_list, desc=f"{method} strengths", leave=False):
            edited = run_edits(editor, cases, strength, edit_settings, args.seed, args.batch_size, folder / method)
            verdicts = edit_verdicts(oracle.score(edited, [c["target_prompt"] for c in cases]), cases)
            redrawn = run_edits(editor, cases, strength, edit_settings, args.seed, args.batch_size,
                                folder / f"{method}-no-change", prompt="source_prompt")
            verdicts["reconstructed"] = np.array([bool(s["all"]) for s in oracle.score(redrawn, source_prompts)])
            by_method[method][f"{strength:g}"] = summarize_edits(verdicts, kinds, args.bootstrap, args.seed)
            examples["edited"][method, strength] = edited[:rows]
            examples["success"][method, strength] = verdicts["success"][:rows]
    editing = {"n_cases": len(cases), "n_by_kind": {k: int((kinds == k).sum()) for k in args.edit_kinds},
               "source_oracle_correct": float(np.mean(source_ok)),
               "vae_roundtrip_oracle_correct": float(np.mean(roundtrip_ok)), "steps": edit_settings["steps"],
               "guidance": settings["guidance"], "strengths": args.strength_list,
               "methods": args.edit_methods, "by_method": by_method, "best": best_edit(by_method),
               "examples": [{"kind": c["kind"], "source": c["source_prompt"]["text"],
                             "target": c["target_prompt"]["text"]} for c in examples["cases"]]}
    return editing, examples


def best_edit(by_method: dict) -> dict:
    """The method and strength with the highest success rate over all edits (ties: the lower strength, then the
    first method): {"method", "strength", "success": {"rate", "ci95"}, "n"}."""
    method, strength = max(((m, s) for m in by_method for s in by_method[m]),
                           key=lambda ms: (by_method[ms[0]][ms[1]]["all"]["success"]["rate"], -float(ms[1])))
    row = by_method[method][strength]["all"]
    return {"method": method, "strength": strength, "success": row["success"], "n": row["n"]}


def framed(image: np.ndarray, ok: bool, width: int = 2) -> np.ndarray:
    """The image with a green (success) or red (failure) frame, for the edit grid."""
    image = image.copy()
    colour = (40, 200, 60) if ok else (220, 40, 40)
    for sl in (np.s_[:width], np.s_[-width:]):
        image[sl, :] = colour
        image[:, sl] = colour
    return image


# --------------------------------------------------------------------------- 5. figures and report


def plot_recall_vs_k(ret: dict, path: Path) -> None:
    """R@10 (95% CI) against k for each fusion, text-only as a band, one panel per subset."""
    plt = pyplot()
    subsets = [s for s in SUBSETS if ret[s]["n"] > 0]
    fig, axes = plt.subplots(1, len(subsets), figsize=(4.2 * len(subsets), 3.8), squeeze=False)
    for ax, subset in zip(axes[0], subsets):
        r = ret[subset]
        text = r["text"]["R@10"]
        ax.axhspan(*text["ci95"], color="grey", alpha=0.2)
        ax.axhline(text["mean"], color="grey", label="text only")
        ks = sorted(int(k) for k in r["weighted"])
        for method, marker in (("weighted", "o"), ("rrf", "s"), ("image_only", "^")):
            y = np.array([r[method][str(k)]["R@10"]["mean"] for k in ks])
            ci = np.array([r[method][str(k)]["R@10"]["ci95"] for k in ks]).reshape(-1, 2)
            ax.errorbar(np.array(ks) + {"weighted": -0.08, "rrf": 0, "image_only": 0.08}[method], y,
                        yerr=np.abs(ci - y[:, None]).T, fmt=marker + "-", capsize=3, label=method.replace("_", " "))
        ax.set_xticks(ks)
        ax.set_xlabel("generated images per query (k)")
        ax.set_title(f"{subset} ({r['n']} queries)")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("txt2img Recall@10 (95% CI)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_edit_success(edits: dict, path: Path) -> None:
    """Edit success rate (95% CI) against strength, one panel per method, for all edits and per kind."""
    plt = pyplot()
    methods = list(edits["by_method"])
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.8), squeeze=False, sharey=True)
    for ax, method in zip(axes[0], methods):
        by_strength = edits["by_method"][method]
        strengths = [float(s) for s in by_strength]
        for group, marker in (("all", "o"), ("color", "s"), ("shape", "^")):
            rows = [by_strength[f"{s:g}"].get(group) for s in strengths]
            if any(r is None for r in rows):
                continue
            y = np.array([r["success"]["rate"] for r in rows])
            ci = np.array([r["success"]["ci95"] for r in rows])
            ax.errorbar(strengths, y, yerr=np.abs(ci - y[:, None]).T, fmt=marker + "-", capsize=3,
                        label=f"{group} ({rows[0]['n']} edits)")
        ax.set_xlabel(f"{method} strength")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(method, fontsize=10)
    axes[0][0].set_ylabel("edit success (oracle, 95% CI)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Edit success: edited attribute right, the rest kept", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def edit_grid(examples: dict, path: Path) -> None:
    """edit_grid.png: a row per example (source, then its edit by each method at each strength, framed green =
    success, red = failure); `examples` from `edit`."""
    columns = list(examples["edited"])
    cells, labels = [], []
    for i, case in enumerate(examples["cases"]):
        src, tgt = case["source_prompt"]["objects"][0], case["target_prompt"]["objects"][0]
        labels.append(f"{src['color']} {src['shape']} -> {tgt['color']} {tgt['shape']}")
        cells.append(case["source"])
        cells += [framed(examples["edited"][c][i], bool(examples["success"][c][i])) for c in columns]
    image_grid(cells, len(labels), 1 + len(columns), row_labels=labels,
               col_labels=["source"] + [f"{'inv' if m == 'inversion' else m} {s:g}" for m, s in columns]).save(path)


def figures(run_dir: Path, metrics: dict, examples: dict | None) -> dict:
    """The figures, after the results: a failing one is a warning line in the log and in metrics.json."""
    out = {"recall_vs_k.png": retrieval.optional_figure(run_dir / "recall_vs_k.png", plot_recall_vs_k,
                                                        metrics["retrieval"])}
    if examples is not None:
        out["edit_success.png"] = retrieval.optional_figure(run_dir / "edit_success.png", plot_edit_success,
                                                            metrics["editing"])
        out["edit_grid.png"] = retrieval.optional_figure(run_dir / "edit_grid.png", edit_grid, examples)
    return out


def retrieval_table(r: dict, chosen: dict, k_max: int) -> list[str]:
    t = r["text"]
    rows = [["text only", "-", fmt(t["R@1"]["mean"]), fmt(t["R@5"]["mean"]), fmt_est(t["R@10"]), fmt(t["mAP"]["mean"]),
             "-", "-"]]
    for method in ("weighted", "rrf", "image_only"):
        for k in range(1, k_max + 1):
            m = r[method][str(k)]
            w = "1" if method == "image_only" else f"{chosen[method][str(k)]['w']:g}"
            rows.append([f"{method.replace('_', ' ')}, k={k}", w, fmt(m["R@1"]["mean"]), fmt(m["R@5"]["mean"]),
                         fmt_est(m["R@10"]), fmt(m["mAP"]["mean"]), fmt_delta(delta_of(m["R@10"])),
                         fmt_delta(delta_of(m["mAP"]))])
    return md_table(["query", "w (val)", "R@1", "R@5", "R@10 [95% CI]", "mAP", "ΔR@10 [95% CI]", "ΔmAP [95% CI]"],
                    rows)


def summary_lines(m: dict) -> list[str]:
    """Headline sentences, each filled in from the metrics."""
    lines = []
    k = m["k_max"]
    for subset in SUBSETS:
        r = m["retrieval"][subset]
        if r["n"] == 0:
            lines.append(f"- {subset}: no queries drawn.")
            continue
        parts = []
        for method in FUSIONS:
            d, w = r[method][str(k)]["R@10"], m["fusion"][method][str(k)]["w"]
            if w == 0:
                parts.append(f"{method} (k={k}): val chose w=0, i.e. text-only rankings (generated images did not "
                             "raise val mAP at any w > 0)")
                continue
            parts.append(f"{method} (k={k}, w={w:g}) ΔR@10 {fmt_delta(delta_of(d))}: "
                         f"{VERDICT_WORDS[ci_verdict(d['delta_ci95'])]}")
        io = r["image_only"][str(k)]["R@10"]
        lines.append(f"- {subset} ({r['n']} queries, text-only R@10 {fmt(r['text']['R@10']['mean'])}): "
                     + "; ".join(parts) + f"; generated images alone (w=1) ΔR@10 {fmt_delta(delta_of(io))}.")
    c = m["cost"]
    lines.append(f"- Cost: {fmt(c['generate_s_per_image'])} s to generate and {fmt(c['embed_s_per_image'])} s to embed "
                 f"one image ({m['model']['device']}, batch {m['batch_size']}): k={k} adds "
                 f"{fmt(c['added_s_per_query']['weighted'][str(k)])} s per query (weighted) vs "
                 f"{c['text_only_search_s_per_query'] * 1e3:.2f} ms for a text-only search.")
    e = m.get("editing")
    if e and e["by_method"]:
        per_method = "; ".join(f"{b['method']} {rate(b['success'])} at strength {b['strength']}"
                               for b in (best_edit({meth: by_s}) for meth, by_s in e["by_method"].items()))
        lines.append(f"- Editing: best success {rate(e['best']['success'])} ({e['best']['method']}, strength "
                     f"{e['best']['strength']}) over {e['best']['n']} edits (each method at its best: {per_method}); "
                     f"the oracle reads {fmt(e['source_oracle_correct'])} of the unedited sources entirely right, "
                     f"{fmt(e['vae_roundtrip_oracle_correct'])} after a VAE round trip.")
    return lines


def results_markdown(m: dict) -> str:
    q = m["queries"]
    lines = ["# Task E: imagine-then-retrieve and text-guided editing", "",
             f"Model `{m['model']['name']}` ({m['model']['steps']} steps, guidance {m['model']['guidance']}, "
             f"{m['model']['size']} px); retrieval heads `{m['heads']}`; data `{m['data']}`. "
             f"{q['n_test']} {m['eval_split']} queries ({q['pools']['overall']} random, "
             f"{q['pools']['targets_extra']} extra target, {q['pools']['relational_extra']} extra relational; "
             f"index of {q['n_index_images']} images), {q['n_val']} {m['val_split']} queries for choosing w "
             f"(index of {q['n_val_index_images']} images). 95% CIs: {m['n_bootstrap']} bootstrap resamples of the "
             "queries; Δ = paired difference to text-only on the same queries.", "",
             f"Target categories: {', '.join(m['targets']['names'])} (from {m['targets']['source']}); a query "
             "counts as a target query when its image holds one. Relational: captions with "
             f"{', '.join(repr(r) for r in gd.RELATIONS)}.", "",
             "## Summary", "", *summary_lines(m), ""]
    for subset in SUBSETS:
        r = m["retrieval"][subset]
        lines += [f"## Retrieval: {subset} ({r['n']} queries)", ""]
        lines += retrieval_table(r, m["fusion"], m["k_max"]) if r["n"] else ["no queries"]
        lines.append("")
    lines += ["## How w was chosen", "",
              f"On the {m['val_split']} queries, the w with the highest mAP (ties to the smaller w); w = 0 is "
              "text-only. The curves are in metrics.json (`fusion.<method>.<k>.val_mAP`).", "",
              "| method | " + " | ".join(f"k={k}" for k in range(1, m["k_max"] + 1)) + " |",
              "|---|" + "---|" * m["k_max"]]
    for method in FUSIONS:
        lines.append(f"| {method} | " + " | ".join(f"{m['fusion'][method][str(k)]['w']:g}"
                                                  for k in range(1, m["k_max"] + 1)) + " |")
    sweep = m["test_sweep_R@10_overall_at_k_max"]
    lines += ["", f"For reading only (not used to choose w): overall test R@10 at k={m['k_max']} for each w, text-only "
              f"{fmt(m['retrieval']['overall']['text']['R@10']['mean'])}:", "",
              "| method | " + " | ".join(f"w={w}" for w in sweep["weighted"]) + " |",
              "|---|" + "---|" * len(sweep["weighted"])]
    for method in FUSIONS:
        lines.append(f"| {method} | " + " | ".join(fmt(v) for v in sweep[method].values()) + " |")
    c = m["cost"]
    lines += ["", "## Cost", "",
              f"Generation {fmt(c['generate_s_per_image'])} s per image, embedding {fmt(c['embed_s_per_image'])} s per "
              f"image (wall clock, batched, {m['model']['device']}, {m['threads']} torch threads, under whatever else "
              f"the machine ran; in CPU seconds {fmt(c['generate_cpu_s_per_image'])} and "
              f"{fmt(c['embed_cpu_s_per_image'])}). Added wall-clock seconds per query:", "",
              *md_table(["k", "weighted", "rrf"], [[k, *(fmt(c["added_s_per_query"][f][str(k)]) for f in FUSIONS)]
                                                   for k in range(1, m["k_max"] + 1)])]
    e = m.get("editing")
    if e and e["by_method"]:
        lines += ["", f"## Text-guided editing (same components: {', '.join(e['methods'])})", "",
                  f"{e['n_cases']} rendered single-object scenes ({', '.join(f'{v} {k}' for k, v in e['n_by_kind'].items())}"
                  f" edits, {e['steps']} denoising steps, guidance {fmt(e['guidance'], 'g')}); the prompt "
                  "describes the target (shape, colour, size, cell). Success: the oracle finds the "
                  "edited attribute right and shape, colour, size, cell and object count otherwise unchanged. "
                  f"The oracle reads {fmt(e['source_oracle_correct'])} of the unedited sources entirely right, and "
                  f"{fmt(e['vae_roundtrip_oracle_correct'])} of them after a round trip through the model's VAE (no "
                  "denoising): an upper bound on what any strength can keep. img2img noises the source with fresh "
                  "noise to the strength's level; inversion runs it backwards by DDIM (empty prompt) to the same "
                  "level, so the noise it starts from is the source's own"
                  + ("; null-text inverts with the source's caption and optimises a null embedding per step to "
                     "retrace that path" if "null-text" in e["methods"] else "")
                  + ". The last column runs each method with every source's own prompt: the share the oracle still "
                  "reads entirely right is what the method loses by itself, before any edit.", "",
                  *md_table(["method", "strength", "success (all) [95% CI]", "colour edits", "shape edits",
                             "edited attr. right", "rest kept", "source kept, asked for no change"],
                            [[meth, s, rate(row["all"]["success"]), *(rate(row[k]["success"]) if k in row else "-"
                                                                      for k in EDIT_KINDS),
                              fmt(row["all"]["edited"]["rate"]), fmt(row["all"]["kept"]["rate"]),
                              rate(row["all"]["reconstructed"])]
                             for meth, by_s in e["by_method"].items() for s, row in by_s.items()])]
        lines += ["", "img2img at strength 1.0 replaces the source by pure noise: it is text-to-image generation, the "
                  "reference an edit has to beat on keeping the rest; inversion at 1.0 starts from the source's "
                  "fully inverted latent instead."]
    lines += ["", "## Figures", "", "- [R@10 vs k](recall_vs_k.png)"]
    if e and e["by_method"]:
        lines += ["- [edit success vs strength](edit_success.png)",
                  "- [edit grid](edit_grid.png) (rows: examples; columns: source, then each method at each strength; "
                  "frame green = success, red = failure)"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def load_heads(args: argparse.Namespace):
    """The retrieval heads and their meta, and the data they were trained on (a warning when it is not --data)."""
    heads, meta = retrieval.load_heads(args.heads)
    config = Path(args.heads).parent / "config.json"
    heads_data = read_json(config).get("args", {}).get("data") if config.is_file() else None
    if heads_data and Path(heads_data).resolve() != Path(args.data).resolve():
        print(f"warning: {args.heads} was trained on {heads_data}, not {args.data}")
    return heads, meta, heads_data


def load_generator(args: argparse.Namespace, device):
    """The text-to-image pipeline and its sampler settings (--steps / --guidance applied).

    Raises:
        UserError: a strength that leaves no denoising step at the editing steps.
    """
    pipe, settings = load_pipeline(args.model, device)
    settings["steps"] = args.steps or settings["steps"]
    settings["guidance"] = settings["guidance"] if args.guidance is None else args.guidance
    steps = edit_steps(args, settings)
    for s in args.strength_list if args.n_edits else ():
        check(int(steps * s) >= 1, f"--strengths {s:g} gives no denoising step at {steps} editing steps; use at "
                                   f"least {1 / steps:g} or more --edit-steps")
    return pipe, settings


def edit_steps(args: argparse.Namespace, settings: dict) -> int:
    """The editing pipelines' denoising steps: --edit-steps, or the model's sampling steps when it is 0."""
    return args.edit_steps or settings["steps"]


def run_settings(args: argparse.Namespace, settings: dict, heads_data: str | None, targets: dict) -> dict:
    """What the run's numbers depend on, for metrics.json and results.md: model, heads, data, targets, sizes."""
    return {"model": settings, "heads": str(Path(args.heads).resolve()), "heads_data": heads_data,
            "data": str(Path(args.data).resolve()), "eval_split": args.eval_split, "val_split": args.val_split,
            "targets": targets, "k_max": args.k_max, "batch_size": args.batch_size,
            "threads": args.threads or "default", "n_bootstrap": args.bootstrap, "rrf_c": args.rrf_c,
            "weight_grid": args.weight_grid}


def query_counts(draw: dict, test: Queries, val: Queries) -> dict:
    """How many queries of each kind and split were drawn, the index sizes, and the first test captions."""
    return {"n_test": len(test.texts), "n_val": len(val.texts), "pools": draw["pools"],
            "subsets": {s: int(draw["masks"][s].sum()) for s in SUBSETS}, "n_index_images": test.index.ntotal,
            "n_val_index_images": val.index.ntotal, "examples": test.texts[:5]}


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)

    # 1. load: heads, data, targets, queries, model and oracle (every bad input fails before the run folder exists)
    heads, meta, heads_data = load_heads(args)
    data = load_data(args.data, [args.eval_split, args.val_split, "train"])
    test, val = data["splits"][args.eval_split], data["splits"][args.val_split]
    targets = target_categories(args.targets, data, data["splits"]["train"])
    draw, val_ids = choose_queries(test, val, targets["ids"], args)
    device = pick_device(args.device)
    pipe, settings = load_generator(args, device)
    oracle = Oracle.load(args.oracle, device) if args.n_edits else None
    run = start_run("task_e", args, config=dict(vars(args), heads_data=heads_data))

    # 2. encode: the text-only side, both splits' image indexes and query embeddings
    with run.step("encode"):
        fx = retrieval.FeatureExtractor(meta["image_encoder"], meta["text_encoder"], meta.get("image_res", 0),
                                        run.device)
        test_q, val_q = split_queries(fx, heads, test, draw["ids"]), split_queries(fx, heads, val, val_ids)

    # 3. imagine: k_max images per query, embedded by the heads' image side (resumable image stores)
    with run.step("imagine"):
        gen = imagine(pipe, settings, heads, image_encoder_for(meta, run.device), test_q, val_q, args,
                      run.dir / "generated")

    # 4. fuse: choose w on val, then measure on the test queries against text-only
    with run.step("fuse"):
        fused = fuse(test_q, val_q, gen, draw["masks"], args)

    # 5. edit: rendered scenes, one attribute changed by img2img at each strength, scored by the oracle
    with run.step("edit"):
        editing, examples = edit(pipe, oracle, settings, args, run.dir / "edited") if args.n_edits else (None, None)

    # 6. results: results.md (with or without editing), metrics.json and `latest`; then the figures
    metrics = {**run_settings(args, settings, heads_data, targets), "queries": query_counts(draw, test_q, val_q),
               "fusion": fused["fusion"], "retrieval": fused["retrieval"],
               "test_sweep_R@10_overall_at_k_max": fused["test_sweep"],
               "cost": cost_model(gen["per_image"], fused["search_s"], args.k_max), "editing": editing}
    write_text(run.dir / "results.md", results_markdown(metrics))
    run.finish(metrics)
    with run.step("figures"):
        metrics["figures"] = figures(run.dir, metrics, examples)
    metrics["timings"]["figures_s"] = run.timings["figures_s"]
    write_json(run.dir / "metrics.json", metrics)
    print("\n".join(summary_lines(metrics)))
    print(f"wrote {run.dir} in {metrics['timings']['total_s']:.0f} s")
    return metrics


if __name__ == "__main__":
    cli(main)
