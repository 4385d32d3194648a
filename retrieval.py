"""Cross-modal retrieval: how well do captions find their images (and images their captions)?

A dual encoder: frozen pretrained backbones (EfficientNet-Lite0 for images, all-MiniLM-L6-v2
for text, both offline; any timm/torchvision/transformers model as an option) whose features
are cached on disk, and two small projection heads trained into one shared space with a
pytorch-metric-learning loss and miner. FAISS inner-product indexes serve both directions;
evaluation reports, overall and per category next to each category's training-set frequency,
two relevance levels: instance (R@1/5/10 and mAP: only the described image, or the image's own
captions, counts) and category (R@1/5/10 and mAP@R: any item whose image shares the queried
category counts; with class-level captions such as "a photo of a cat" this is the level that can
reach 1). metrics.json and `latest` are written before the figures, which are optional.

Quick (seconds, on existing data):
    python retrieval.py --quick
Full baseline (after `python generate_data.py`):
    python retrieval.py --run-name baseline
Tuning on val (the defaults below come from it): the search in sweeps/retrieval.yaml, offline and resumable,
writing outputs/retrieval_sweep/<run>/ (or `wandb sweep sweeps/retrieval.yaml` + `wandb agent <id>` with a server):
    python retrieval.py sweep --config sweeps/retrieval.yaml --max-runs 16 --run-name tune
Other options: --loss triplet, --index ivf, --text-encoder bert-base-uncased (cached), --wandb
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from utils import (DEFAULT_DATA, DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER, UserError, cached, category_names, check,
                   cli, common_args, encode_images, encode_texts, fmt, l2_normalize, load_data, load_image_encoder,
                   load_text_encoder, parse_checked, pick_device, pyplot, read_json, start_run, torch_threads,
                   write_json, write_text)

KS = (1, 5, 10)
LOSSES = ("triplet", "ntxent")
MINERS = ("semihard", "hard", "all", "none")
INDEXES = ("flat", "ivf", "hnsw")
# torch.optim.AdamW keyword arguments per --adamw-impl (torch's own CPU default is the loop).
ADAMW_IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
QUICK = {"max_train": 500, "max_eval": 200, "epochs": 10, "batch_size": 64, "no_umap": True}


def build_parser() -> argparse.ArgumentParser:
    """retrieval.py's flags (also what a sweep's parameters are checked against)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="data.pkl written by generate_data.py")
    p.add_argument("--train-split", default="train", help="split the heads are trained on")
    p.add_argument("--val-split", default="val", help="split used to pick the best epoch ('' to train for all epochs)")
    p.add_argument("--eval-split", default="test", help="split the reported metrics come from")
    p.add_argument("--image-encoder", default=DEFAULT_IMAGE_ENCODER,
                   help="efficientnet-lite0 (offline), timm:<name> or torchvision:<name>")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                   help="all-MiniLM-L6-v2 (offline), or any transformers id / local folder")
    p.add_argument("--image-res", type=int, default=0,
                   help="backbone input side in pixels; 0 = the encoder's own, capped at 2x the data's image size")
    # Defaults of --dim, --loss, --temperature, --epochs and --lr: the best of a 16-trial search on val
    # (`python retrieval.py sweep --config sweeps/retrieval.yaml --max-runs 16` on the default data).
    p.add_argument("--dim", type=int, default=128, help="shared embedding size")
    p.add_argument("--hidden", type=int, default=1024, help="hidden units of each projection head")
    p.add_argument("--loss", default="ntxent", help=f"metric-learning loss: {', '.join(LOSSES)}")
    p.add_argument("--miner", default="semihard", help=f"triplet miner: {', '.join(MINERS)} (triplet loss only)")
    p.add_argument("--margin", type=float, default=0.2, help="triplet margin (cosine units; --loss triplet)")
    p.add_argument("--temperature", type=float, default=0.03, help="NT-Xent temperature (--loss ntxent)")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training images (best one chosen on val)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (one caption each)")
    p.add_argument("--lr", type=float, default=1.26e-3, help="AdamW peak learning rate (one-cycle schedule)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--head-threads", type=int, default=0,
                   help="torch threads while the heads train (0: as --threads); on a CPU another job shares, one "
                        "can be faster (`python bench.py --only retrieval` times one thread against all cores)")
    p.add_argument("--adamw-impl", default="fused", choices=sorted(ADAMW_IMPLS),
                   help="torch's AdamW update: fused (one kernel for all parameters), foreach (one op per step for "
                        "all of them) or loop (one op per tensor, torch's CPU default); the same maths, and fused "
                        "trains the heads ~1.3x faster on 2 CPU cores (`python bench.py --only retrieval`)")
    p.add_argument("--index", default="flat", help=f"FAISS index: {', '.join(INDEXES)} (flat = exact)")
    p.add_argument("--nlist", type=int, default=64, help="IVF lists (--index ivf)")
    p.add_argument("--nprobe", type=int, default=8, help="IVF lists searched per query (--index ivf)")
    p.add_argument("--max-train", type=int, default=0, help="use at most this many training images (0 = all)")
    p.add_argument("--max-eval", type=int, default=0, help="evaluate on at most this many images (0 = all)")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP figure (saves ~20 s)")
    common_args(p, "retrieval", QUICK, helps={"seed": "seed for head init, batches and caption choice"})
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    return parse_checked(parser, argv, QUICK, check_args)


def check_args(args: argparse.Namespace) -> None:
    check(args.loss in LOSSES, f"unknown --loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
    check(args.miner in MINERS, f"unknown --miner {args.miner!r}; choose one of {', '.join(MINERS)}")
    check(args.index in INDEXES, f"unknown --index {args.index!r}; choose one of {', '.join(INDEXES)}")
    for name in ("dim", "hidden", "epochs", "batch_size", "nlist", "nprobe"):
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "temperature", "margin"):
        check(getattr(args, name) > 0, f"--{name} must be positive, got {getattr(args, name)}")
    check(args.image_res >= 0, f"--image-res must be >= 0, got {args.image_res}")
    check(args.max_train >= 0 and args.max_eval >= 0, "--max-train and --max-eval must be >= 0")
    check(args.batch_size >= 2, "--batch-size must be at least 2 (a batch needs negatives)")
    check(args.head_threads >= 0, f"--head-threads must be >= 0, got {args.head_threads}")


# --------------------------------------------------------------------------- features
def subset(records: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded random subset of `n` records (all when n is 0 or too large), in original order."""
    if not n or n >= len(records):
        return records
    keep = np.sort(np.random.default_rng(seed).choice(len(records), n, replace=False))
    return [records[i] for i in keep]


def flatten_captions(records: list[dict]) -> tuple[list[str], np.ndarray]:
    """All captions of `records` and, for each, the index of its image.

    Args:
        records: image records from `load_data`.

    Returns:
        (captions, cap2img int64 array).
    """
    captions, owner = [], []
    for i, rec in enumerate(records):
        captions += rec["captions"]
        owner += [i] * len(rec["captions"])
    return captions, np.asarray(owner, dtype=np.int64)


class FeatureExtractor:
    """Frozen backbones with an on-disk feature cache; each backbone loads on first use.

    Args:
        image_encoder: name for `utils.load_image_encoder`.
        text_encoder: name for `utils.load_text_encoder`.
        image_res: backbone input side (0 = encoder default).
        device: torch device.
    """

    def __init__(self, image_encoder: str, text_encoder: str, image_res: int = 0, device=None):
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.image_res, self.device = image_res, device or pick_device()
        self._image, self._text = None, None

    def images(self, paths: Sequence[str]) -> np.ndarray:
        """Backbone features of image files (cached by encoder, resolution and file sizes/mtimes)."""
        stats = [(p, *_stat(p)) for p in paths]

        def compute():
            if self._image is None:
                model, info = load_image_encoder(self.image_encoder, self.device)
                info = dict(info, res=self.image_res or info["res"])
                self._image = (model, info)
            return encode_images(*self._image, paths)

        return cached(["image", self.image_encoder, self.image_res, stats], compute)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """Backbone features of strings; each distinct string is encoded once."""
        unique, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)

        def compute():
            if self._text is None:
                self._text = load_text_encoder(self.text_encoder, self.device)[:2]
            return encode_texts(*self._text, list(unique))

        return cached(["text", self.text_encoder, list(unique)], compute)[inverse]


def _stat(path: str) -> tuple[int, int]:
    try:
        st = Path(path).stat()
    except OSError:
        raise UserError(f"image file missing: {path} (regenerate the data)") from None
    return st.st_size, int(st.st_mtime)


def auto_image_res(data: dict, image_encoder: str) -> int:
    """Backbone input side: 0 (the encoder's own) unless the data's images are small (then 2x their side)."""
    size = data.get("image_size")
    if image_encoder == DEFAULT_IMAGE_ENCODER and size:
        return min(224, 2 * int(size))
    return 0


# --------------------------------------------------------------------------- model
def build_heads(in_image: int, in_text: int, hidden: int, dim: int):
    """Two projection heads (LayerNorm -> Linear -> GELU -> Linear) into the shared space.

    Args:
        in_image: image feature size.
        in_text: text feature size.
        hidden: hidden units.
        dim: shared embedding size.
    """
    import torch.nn as nn

    def head(d_in):
        return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, dim))

    return nn.ModuleDict({"image": head(in_image), "text": head(in_text)})


def embed(heads, kind: str, feats: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Project backbone features with one head and L2-normalise (float32 numpy).

    Args:
        heads: from `build_heads`.
        kind: "image" or "text".
        feats: (n, d) backbone features.
        batch: rows per forward pass.
    """
    import torch

    heads.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(feats), batch):
            out.append(heads[kind](torch.from_numpy(np.ascontiguousarray(feats[s:s + batch]))).numpy())
    return l2_normalize(np.concatenate(out) if out else np.zeros((0, heads[kind][-1].out_features), np.float32))


def make_loss(args: argparse.Namespace):
    """The pytorch-metric-learning loss (and miner) named by the arguments."""
    from pytorch_metric_learning import losses, miners
    from pytorch_metric_learning.distances import CosineSimilarity

    if args.loss == "ntxent":
        return OnePositiveNTXent(losses.NTXentLoss(temperature=args.temperature)), None
    loss = losses.TripletMarginLoss(margin=args.margin, distance=CosineSimilarity())
    if args.miner == "none":
        return loss, None
    miner = miners.TripletMarginMiner(margin=args.margin, type_of_triplets=args.miner, distance=CosineSimilarity())
    return loss, miner


class OnePositiveNTXent:
    """pytorch-metric-learning's NTXentLoss, computed as one cross-entropy when every query has exactly one positive.

    That is the case in every batch here (labels 0..B-1 on both sides): then NT-Xent is the cross-entropy of each
    row of the query x reference cosine matrix / temperature, with the positive as the class (CLIP's loss, one
    direction). PML's general code builds a positives x negatives matrix instead (256 x 65,280 per call: 2.5 s on
    one CPU core, 20x a whole triplet step); any other labelling falls back to it. tests/test_sweep.py checks
    that both give the same value and gradient.

    Args:
        pml_loss: the `losses.NTXentLoss` to match (its temperature is used).
    """

    def __init__(self, pml_loss):
        self.pml_loss, self.temperature = pml_loss, pml_loss.temperature

    def __call__(self, emb, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
        import torch
        import torch.nn.functional as F

        ref_emb = emb if ref_emb is None else ref_emb
        ref_labels = labels if ref_labels is None else ref_labels
        one_positive = (indices_tuple is None and ref_emb is not emb and len(labels) == len(ref_labels)
                        and torch.equal(labels, ref_labels) and len(torch.unique(labels)) == len(labels))
        if not one_positive:
            return self.pml_loss(emb, labels, indices_tuple, ref_emb=ref_emb, ref_labels=ref_labels)
        logits = F.normalize(emb, dim=1) @ F.normalize(ref_emb, dim=1).T / self.temperature
        return F.cross_entropy(logits, torch.arange(len(labels), device=logits.device))


def cross_modal_loss(loss_fn, miner, img_emb, txt_emb, labels):
    """Symmetric cross-modal loss: images query captions and captions query images (PML's ref_emb)."""
    # A distinct tensor for ref_labels: when `ref_labels is labels`, PML treats the pair as one set of
    # embeddings and drops the diagonal, i.e. every image-caption positive, and the loss is silently 0.
    ref_labels = labels.clone()
    total = 0.0
    for q, r in ((img_emb, txt_emb), (txt_emb, img_emb)):
        tuples = miner(q, labels, r, ref_labels) if miner is not None else None
        total = total + loss_fn(q, labels, tuples, ref_emb=r, ref_labels=ref_labels)
    return total


def train_heads(img_feats: np.ndarray, txt_feats: np.ndarray, cap2img: np.ndarray, args: argparse.Namespace,
                val: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, on_epoch=None):
    """Train the projection heads with `args.head_threads` torch threads; keep the epoch with the best validation
    txt2img R@10.

    Args:
        img_feats: (n_img, d_i) training image features.
        txt_feats: (n_cap, d_t) training caption features.
        cap2img: (n_cap,) image index of each caption.
        args: parsed arguments (dim, hidden, loss, lr, epochs, batch_size, seed, ...).
        val: optional (img_feats, txt_feats, cap2img) of a validation split.
        on_epoch: optional callback(epoch, dict) for logging.

    Returns:
        (heads, history list of per-epoch dicts).
    """
    with torch_threads(getattr(args, "head_threads", 0)):
        return _train_heads(img_feats, txt_feats, cap2img, args, val, on_epoch)


def _train_heads(img_feats, txt_feats, cap2img, args, val, on_epoch):
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    gen = np.random.default_rng(args.seed)
    heads = build_heads(img_feats.shape[1], txt_feats.shape[1], args.hidden, args.dim)
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            **ADAMW_IMPLS[args.adamw_impl])
    steps_per_epoch = max(1, len(img_feats) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    loss_fn, miner = make_loss(args)
    caps_of = _captions_by_image(cap2img, len(img_feats))
    img_t, txt_t = torch.from_numpy(img_feats), torch.from_numpy(txt_feats)
    history, best = [], (-1.0, None)
    for epoch in tqdm(range(args.epochs), desc="train heads", leave=False):
        heads.train()
        order = gen.permutation(len(img_feats))
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            cap = np.array([caps_of[i][gen.integers(len(caps_of[i]))] for i in idx])
            labels = torch.arange(len(idx))
            loss = cross_modal_loss(loss_fn, miner, heads["image"](img_t[idx]), heads["text"](txt_t[cap]), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        if val is not None:
            row["val_txt2img_R@10"] = txt2img_recall(heads, *val)
            if row["val_txt2img_R@10"] > best[0]:
                best = (row["val_txt2img_R@10"], {k: v.clone() for k, v in heads.state_dict().items()})
        history.append(row)
        if on_epoch:
            on_epoch(epoch + 1, row)
    if best[1] is not None:
        heads.load_state_dict(best[1])
    return heads.eval(), history


def txt2img_recall(heads, img_feats: np.ndarray, txt_feats: np.ndarray, cap2img: np.ndarray, k: int = 10) -> float:
    """txt2img R@k of heads on one split from a top-k search only: what best-epoch selection needs, the same value
    as `evaluate`'s, at a fraction of its cost (no full ranking, no img2txt), so every epoch can be checked.

    Args:
        heads: from `build_heads`.
        img_feats: (n_img, d_i) backbone image features.
        txt_feats: (n_cap, d_t) backbone caption features.
        cap2img: (n_cap,) image index of each caption.
        k: the cut-off.
    """
    _, ids = search(build_index(embed(heads, "image", img_feats)), embed(heads, "text", txt_feats), k)
    return float((ids == cap2img[:, None]).any(axis=1).mean())


def _captions_by_image(cap2img: np.ndarray, n_img: int) -> list[np.ndarray]:
    order = np.argsort(cap2img, kind="stable")
    bounds = np.searchsorted(cap2img[order], np.arange(n_img + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(n_img)]


# --------------------------------------------------------------------------- FAISS
def build_index(emb: np.ndarray, kind: str = "flat", nlist: int = 64, nprobe: int = 8, seed: int = 0):
    """A FAISS inner-product index over L2-normalised rows (cosine similarity).

    Args:
        emb: (n, d) float32, already normalised.
        kind: "flat" (exact), "ivf" (IVF-Flat, approximate) or "hnsw" (approximate).
        nlist: IVF lists (capped at n // 39 so k-means has enough points per list).
        nprobe: IVF lists searched per query.
        seed: k-means seed for IVF.
    """
    import faiss

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    d = emb.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = max(1, min(nlist, len(emb) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(emb)
        index.nprobe = min(nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    else:
        raise UserError(f"unknown index {kind!r}; choose one of {', '.join(INDEXES)}")
    add_to_index(index, emb)
    return index


def add_to_index(index, emb: np.ndarray) -> None:
    """Add normalised float32 rows to an index."""
    index.add(np.ascontiguousarray(emb, dtype=np.float32))


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) for each query row; k is capped at the index size."""
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def brute_force_search(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference exact search with numpy (ties broken by lower id, as FAISS's flat index does)."""
    sims = queries.astype(np.float64) @ db.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1).astype(np.float32), ids


# --------------------------------------------------------------------------- metrics
def ranking_metrics(ranked_groups: np.ndarray, query_groups: np.ndarray, n_relevant: np.ndarray,
                    ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per-query recall@k and average precision from ranked result lists.

    An item is relevant to a query when they share a group (an image id). AP is computed on the
    ranked list given; with the full ranking it is the exact AP.

    Args:
        ranked_groups: (n_q, depth) group of each retrieved item, best first (-1 for padding).
        query_groups: (n_q,) group of each query.
        n_relevant: (n_q,) number of relevant items in the whole database for each query.
        ks: cut-offs.

    Returns:
        {"R@k": (n_q,) 0/1 array per k, "AP": (n_q,) array}.
    """
    rel = ranked_groups == query_groups[:, None]
    out = {f"R@{k}": rel[:, :k].any(axis=1).astype(np.float64) for k in ks}
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    out["AP"] = (precision * rel).sum(axis=1) / np.maximum(n_relevant, 1)
    return out


def category_matrix(records: list[dict], cat_ids: Sequence[int]) -> np.ndarray:
    """(n_images, n_categories) bool: does image i contain category j (columns in `cat_ids` order).

    Args:
        records: image records with `category_ids`.
        cat_ids: the category ids, one per column.
    """
    col = {cid: j for j, cid in enumerate(cat_ids)}
    has = np.zeros((len(records), len(cat_ids)), dtype=bool)
    for i, rec in enumerate(records):
        for cid in rec["category_ids"]:
            if cid in col:
                has[i, col[cid]] = True
    return has


def _relevance_scores(rel: np.ndarray, n_rel: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """R@k and mAP@R of ranked 0/1 relevance rows, NaN where nothing in the database is relevant (n_rel == 0)."""
    out = {f"R@{k}": rel[:, :k].any(axis=1).astype(np.float64) for k in ks}
    width = min(rel.shape[1], max(int(n_rel.max(initial=0)), 1))
    head = rel[:, :width]
    ranks = np.arange(1, width + 1)
    precision = np.cumsum(head, axis=1) / ranks
    within_r = ranks[None, :] <= n_rel[:, None]
    out["mAP@R"] = (precision * head * within_r).sum(axis=1) / np.maximum(n_rel, 1)
    for v in out.values():
        v[n_rel == 0] = np.nan
    return out


def category_level_metrics(ranked_imgs: np.ndarray, query_img: np.ndarray, has: np.ndarray, db_count: np.ndarray,
                           ks: Sequence[int] = KS, chunk: int = 1024) -> dict:
    """Per-query category-level R@k and mAP@R: a retrieved item is relevant when it shares the queried category.

    With class-level captions ("a photo of a cat") every image of the class answers a query equally well, so
    the instance-level R@10 is capped near 10 / (images per class); these metrics do not have that cap.
    Overall, the queried categories are those of the query's own image, and an item is relevant when its
    image shares at least one (the usual multi-label convention). By category c, the queries are those
    whose image holds c and an item is relevant when its image holds c. mAP@R (Musgrave et al. 2020, "A
    Metric Learning Reality Check"): with R relevant items in the database, the sum of precision@i over
    the relevant ranks i <= R, divided by R. Written here rather than taken from pytorch-metric-learning's
    AccuracyCalculator, which takes one label per item and runs its own k-NN: images hold several
    categories, and the rankings come from the FAISS index under evaluation.

    Args:
        ranked_imgs: (n_q, depth) image index of each retrieved item, best first, -1 for padding (for
            img2txt, the image each retrieved caption belongs to).
        query_img: (n_q,) image index of each query (the query image, or the image a caption describes).
        has: (n_img, n_cat) bool category membership.
        db_count: (n_img,) database items per image (1 for an image index, captions per image for a
            caption index).
        ks: cut-offs.
        chunk: queries per block (bounds memory on large splits).

    Returns:
        {"R@k": (n_q,), "mAP@R": (n_q,), "by_category": {"R@k": (n_q, n_cat), "mAP@R": (n_q, n_cat)}},
        NaN where undefined (the query's image has no category, or lacks c).
    """
    n_q, n_cat = len(query_img), has.shape[1]
    valid = ranked_imgs >= 0
    safe = np.maximum(ranked_imgs, 0)
    q_has = has[query_img]
    has_f, db_count = has.astype(np.float32), np.asarray(db_count, dtype=np.float64)
    keys = [f"R@{k}" for k in ks] + ["mAP@R"]
    out = {key: np.full(n_q, np.nan) for key in keys}
    for s in range(0, n_q, chunk):
        rows = slice(s, s + chunk)
        shares = (q_has[rows].astype(np.float32) @ has_f.T) > 0  # (block, n_img): image shares a queried category
        rel = np.take_along_axis(shares, safe[rows], axis=1) & valid[rows]
        for key, v in _relevance_scores(rel, shares.astype(np.float64) @ db_count, ks).items():
            out[key][rows] = v
    by = {key: np.full((n_q, n_cat), np.nan) for key in keys}
    n_rel = has.T.astype(np.float64) @ db_count  # (n_cat,) database items whose image holds c
    for c in range(n_cat):
        queries = np.flatnonzero(q_has[:, c])
        for s in range(0, len(queries), chunk):
            rows = queries[s:s + chunk]
            rel = has[safe[rows], c] & valid[rows]
            for key, v in _relevance_scores(rel, np.full(len(rows), n_rel[c]), ks).items():
                by[key][rows, c] = v
    out["by_category"] = by
    return out


def retrieve_both(img_emb: np.ndarray, txt_emb: np.ndarray, cap2img: np.ndarray, index_kind: str = "flat",
                  depth: int | None = None, has: np.ndarray | None = None, cat_ids: Sequence[int] | None = None,
                  **index_kw) -> dict:
    """Per-query metrics for img2txt and txt2img on one split, at instance level and, given `has`, category level.

    Args:
        img_emb: (n_img, d) normalised image embeddings.
        txt_emb: (n_cap, d) normalised caption embeddings.
        cap2img: (n_cap,) image index of each caption.
        index_kind: FAISS index kind.
        depth: ranked-list length (default: the whole database, so mAP is exact).
        has: optional (n_img, n_cat) bool category membership (`category_matrix`).
        cat_ids: the category id of each column of `has`.
        **index_kw: passed to `build_index`.

    Returns:
        {"img2txt": {...}, "txt2img": {...}} instance-level per-query arrays (`ranking_metrics`: the one
        described image, or the image's own captions, is relevant); with `has` also "category":
        {"img2txt": ..., "txt2img": ..., "cat_ids": [...]} from `category_level_metrics`.
    """
    n_img = len(img_emb)
    caps_per_img = np.bincount(cap2img, minlength=n_img)
    txt_index = build_index(txt_emb, index_kind, **index_kw)
    img_index = build_index(img_emb, index_kind, **index_kw)
    _, t_ids = search(txt_index, img_emb, depth or len(txt_emb))
    _, i_ids = search(img_index, txt_emb, depth or n_img)
    t_imgs = np.where(t_ids >= 0, cap2img[np.maximum(t_ids, 0)], -1)
    out = {"img2txt": ranking_metrics(t_imgs, np.arange(n_img), caps_per_img),
           "txt2img": ranking_metrics(i_ids, cap2img, np.ones(len(cap2img)))}
    if has is not None:
        out["category"] = {"img2txt": category_level_metrics(t_imgs, np.arange(n_img), has, caps_per_img),
                           "txt2img": category_level_metrics(i_ids, cap2img, has, np.ones(n_img)),
                           "cat_ids": list(cat_ids) if cat_ids is not None else list(range(has.shape[1]))}
    return out


def summarize(per_query: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean of the 1-d per-query metrics (over `mask` when given; NaN = undefined, left out), named R@k and mAP."""
    out = {}
    for name, values in per_query.items():
        if not isinstance(values, np.ndarray) or values.ndim != 1:
            continue
        v = values if mask is None else values[mask]
        v = v[~np.isnan(v)]
        out["mAP" if name == "AP" else name] = float(v.mean()) if len(v) else float("nan")
    return out


def evaluate(heads, img_feats: np.ndarray, txt_feats: np.ndarray, cap2img: np.ndarray,
             index_kind: str = "flat", **index_kw) -> dict:
    """Overall img2txt / txt2img metrics of trained heads on one split (see `retrieve_both`)."""
    per_q = retrieve_both(embed(heads, "image", img_feats), embed(heads, "text", txt_feats), cap2img, index_kind,
                          **index_kw)
    return {d: summarize(v) for d, v in per_q.items()}


def per_category_metrics(per_q: dict, records: list[dict], cap2img: np.ndarray, names: dict[int, str],
                         train_counts: dict[int, int]) -> dict[str, dict]:
    """Metrics over the queries whose image contains each category, with its training frequency.

    With category-level results in `per_q` (`retrieve_both(..., has=...)`), each category also gets
    "category_level": R@k and mAP@R where a retrieved item is relevant when it holds the category.

    Args:
        per_q: output of `retrieve_both`.
        records: the evaluated image records (category_ids per image).
        cap2img: image index of each caption query.
        names: category id -> name.
        train_counts: category id -> number of training images containing it.
    """
    out = {}
    for cid, name in names.items():
        has = np.array([cid in rec["category_ids"] for rec in records], dtype=bool)
        out[name] = {
            "train_count": int(train_counts.get(cid, 0)),
            "n_eval_images": int(has.sum()),
            "img2txt": summarize(per_q["img2txt"], has),
            "txt2img": summarize(per_q["txt2img"], has[cap2img]),
        }
        if "category" in per_q and cid in per_q["category"]["cat_ids"]:
            j = per_q["category"]["cat_ids"].index(cid)
            out[name]["category_level"] = {
                d: summarize({k: v[:, j] for k, v in per_q["category"][d]["by_category"].items()})
                for d in ("img2txt", "txt2img")}
    return out


def image_counts(records: list[dict]) -> dict[int, int]:
    """Category id -> number of images containing it."""
    counts: dict[int, int] = {}
    for rec in records:
        for cid in set(rec["category_ids"]):
            counts[cid] = counts.get(cid, 0) + 1
    return counts


# --------------------------------------------------------------------------- heads on disk
def save_heads(path: Path, heads, meta: dict) -> None:
    """Save head weights with what is needed to rebuild them (sizes, encoders, resolution)."""
    import torch

    tmp = Path(str(path) + ".tmp")
    torch.save({"state_dict": heads.state_dict(), "meta": meta}, tmp)
    tmp.replace(path)


def load_heads(path: str | Path):
    """Rebuild heads saved by `save_heads`; returns (heads, meta)."""
    import torch

    path = Path(path)
    check(path.is_file(), f"retrieval checkpoint not found: {path} (run `python retrieval.py` first)")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    m = blob["meta"]
    heads = build_heads(m["in_image"], m["in_text"], m["hidden"], m["dim"])
    heads.load_state_dict(blob["state_dict"])
    return heads.eval(), m


# --------------------------------------------------------------------------- reports
def headline_table(metrics: dict, k_groups: int = 3) -> str:
    """Markdown table: overall, the k rarest and the k commonest training categories, both directions."""
    per_cat = metrics["per_category"]
    ranked = sorted(per_cat, key=lambda n: per_cat[n]["train_count"])
    groups = [("overall", None), (f"{k_groups} rarest", ranked[:k_groups]), (f"{k_groups} commonest", ranked[-k_groups:])]
    lines = ["| queries | categories (train images) | img2txt R@1 | R@5 | R@10 | txt2img R@1 | R@5 | R@10 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, cats in groups:
        if cats is None:
            row, desc = metrics, "all"
        else:
            row = {d: {k: float(np.mean([per_cat[c][d][k] for c in cats])) for k in ("R@1", "R@5", "R@10")}
                   for d in ("img2txt", "txt2img")}
            desc = ", ".join(f"{c} ({per_cat[c]['train_count']})" for c in cats)
        vals = [row[d][f"R@{k}"] for d in ("img2txt", "txt2img") for k in KS]
        lines.append(f"| {label} | {desc} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def levels_table(metrics: dict) -> str:
    """Markdown table of both relevance levels per direction: instance (the described image, or the image's
    own captions) and category (any item whose image shares the queried category)."""
    lines = ["| direction | relevant item | R@1 | R@5 | R@10 | mAP (instance) / mAP@R (category) |",
             "|---|---|---|---|---|---|"]
    for d in ("img2txt", "txt2img"):
        inst, cat = metrics[d], metrics["category_level"][d]
        lines.append(f"| {d} | instance | " + " | ".join(fmt(inst[f"R@{k}"]) for k in KS) + f" | {fmt(inst['mAP'])} |")
        lines.append(f"| {d} | same category | " + " | ".join(fmt(cat[f"R@{k}"]) for k in KS)
                     + f" | {fmt(cat['mAP@R'])} |")
    return "\n".join(lines)


def per_category_table(per_cat: dict) -> str:
    """Markdown table of every category, sorted by training frequency (descending); category-level
    txt2img R@1 and mAP@R as the last columns when the metrics have them."""
    cat_level = all("category_level" in c for c in per_cat.values())
    lines = ["| category | train images | test images | img2txt R@1 | R@10 | mAP | txt2img R@1 | R@10 | mAP |"
             + (" txt2img same-category R@1 | mAP@R |" if cat_level else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if cat_level else "")]
    for name in sorted(per_cat, key=lambda n: -per_cat[n]["train_count"]):
        c = per_cat[name]
        vals = [c[d][k] for d in ("img2txt", "txt2img") for k in ("R@1", "R@10", "mAP")]
        if cat_level:
            vals += [c["category_level"]["txt2img"][k] for k in ("R@1", "mAP@R")]
        lines.append(f"| {name} | {c['train_count']} | {c['n_eval_images']} | " + " | ".join(map(fmt, vals)) + " |")
    return "\n".join(lines)


def optional_figure(path: Path, draw, *args, **kwargs) -> str:
    """Draw one figure that the run's results do not depend on; a failure is one warning line, never a lost run.

    Args:
        path: the figure's file (passed to `draw` as its last positional argument).
        draw: the plotting function.
        *args: its arguments before the path.
        **kwargs: its keyword arguments.

    Returns:
        "written", or "failed: <error>" (also printed as a warning).
    """
    try:
        draw(*args, path, **kwargs)
    except Exception as err:  # any plotting / UMAP / scipy error: the metrics are already on disk
        first_line = (str(err).strip().splitlines() or [""])[0]
        print(f"warning: {Path(path).name} not written ({type(err).__name__}: {first_line})")
        return f"failed: {type(err).__name__}: {first_line}"
    return "written"


def plot_per_category(per_cat: dict, path: Path) -> None:
    """Recall@10 of each category against its training frequency (log x), both directions."""
    plt = pyplot()
    names = sorted(per_cat, key=lambda n: per_cat[n]["train_count"])
    x = [max(per_cat[n]["train_count"], 1) for n in names]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for d, marker in (("img2txt", "o"), ("txt2img", "s")):
        ax.scatter(x, [per_cat[n][d]["R@10"] for n in names], marker=marker, label=f"{d} R@10")
    for n, xi in zip(names, x):
        ax.annotate(n, (xi, per_cat[n]["txt2img"]["R@10"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training images containing the category (log)")
    ax.set_ylabel("Recall@10 on test")
    ax.set_title("Retrieval quality vs training frequency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_umap(img_emb: np.ndarray, txt_emb: np.ndarray, img_labels: Sequence[str], txt_labels: Sequence[str],
              path: Path, seed: int = 0, max_points: int = 1500) -> None:
    """UMAP of test image (dots) and caption (crosses) embeddings, coloured by category."""
    plt = pyplot()
    import umap

    rng = np.random.default_rng(seed)
    ii = np.sort(rng.choice(len(img_emb), min(max_points, len(img_emb)), replace=False))
    ti = np.sort(rng.choice(len(txt_emb), min(max_points, len(txt_emb)), replace=False))
    xy = umap.UMAP(n_neighbors=15, min_dist=0.1, metric="cosine", random_state=seed).fit_transform(
        np.concatenate([img_emb[ii], txt_emb[ti]]))
    labels = [img_labels[i] for i in ii] + [txt_labels[i] for i in ti]
    cats = sorted(set(labels))
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7, 6))
    for j, c in enumerate(cats):
        for part, (lo, hi), marker in ((0, (0, len(ii)), "o"), (1, (len(ii), len(xy)), "x")):
            sel = [k for k in range(lo, hi) if labels[k] == c]
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, marker=marker, color=cmap(j % 20), label=c if part == 0 else None)
    ax.set_title("Test embeddings (UMAP): images o, captions x, coloured by first object's category")
    ax.legend(markerscale=3, fontsize=7, ncol=2)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def split_features(fx: FeatureExtractor, records: list[dict]):
    """(image feats, caption feats, cap2img) of a list of records."""
    captions, cap2img = flatten_captions(records)
    return fx.images([r["path"] for r in records]), fx.texts(captions), cap2img


def main(argv: Sequence[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:  # `python retrieval.py sweep ...`: the offline sweep (see sweep_main)
        return sweep_main(argv[1:])
    args = parse_args(argv)

    # 1. data and splits
    splits = [args.train_split, args.eval_split] + ([args.val_split] if args.val_split else [])
    data = load_data(args.data, splits)
    names = category_names(data)
    train = subset(data["splits"][args.train_split], args.max_train, args.seed)
    test = subset(data["splits"][args.eval_split], args.max_eval, args.seed + 1)
    val = subset(data["splits"][args.val_split], args.max_eval, args.seed + 2) if args.val_split else None
    args.image_res = args.image_res or auto_image_res(data, args.image_encoder)
    run = start_run("retrieval", args)
    metrics: dict = {}

    # 2. frozen backbone features (cached on disk)
    with run.step("features"):
        fx = FeatureExtractor(args.image_encoder, args.text_encoder, args.image_res, run.device)
        tr, te = split_features(fx, train), split_features(fx, test)
        va = split_features(fx, val) if val is not None else None

    # 3. train the projection heads (best epoch on val)
    with run.step("train"):
        heads, history = train_heads(*tr, args, val=va, on_epoch=lambda e, row: run.log(row, step=e))
    metrics["history"] = history
    if va is not None and history:  # the sweep's metric (sweeps/retrieval.yaml): best val epoch, test plays no part
        metrics[SWEEP_METRIC] = max(h["val_txt2img_R@10"] for h in history)
    save_heads(run.dir / "heads.pt", heads, {
        "in_image": tr[0].shape[1], "in_text": tr[1].shape[1], "hidden": args.hidden, "dim": args.dim,
        "image_encoder": args.image_encoder, "text_encoder": args.text_encoder, "image_res": args.image_res})

    # 4. evaluate both directions with FAISS, overall and per category
    with run.step("eval"):
        img_emb, txt_emb = embed(heads, "image", te[0]), embed(heads, "text", te[1])
        metrics.update(split_metrics(img_emb, txt_emb, te[2], test, train, names, args))

    # 5. tables, then metrics.json and `latest`: the results are on disk before any optional figure runs
    headline = headline_table(metrics)
    write_text(run.dir / "results.md", "# Retrieval baseline\n\n" + headline + "\n\n## Both relevance levels\n\n"
               + levels_table(metrics) + "\n\n## Per category\n\n" + per_category_table(metrics["per_category"])
               + "\n")
    run.finish(metrics)

    # 6. figures: a failure is a warning line in the log and in metrics.json, never a lost run
    figures = {"per_category.png": optional_figure(run.dir / "per_category.png", plot_per_category,
                                                   metrics["per_category"])}
    if not args.no_umap:
        first = [names[r["category_ids"][0]] if r["category_ids"] else "none" for r in test]
        figures["umap.png"] = optional_figure(run.dir / "umap.png", plot_umap, img_emb, txt_emb, first,
                                              [first[i] for i in te[2]], seed=args.seed)
    metrics["figures"] = figures
    write_json(run.dir / "metrics.json", metrics)
    print(headline + "\n\n" + levels_table(metrics))
    print(f"\nwrote {run.dir}")
    return metrics


def split_metrics(img_emb: np.ndarray, txt_emb: np.ndarray, cap2img: np.ndarray, test: list[dict], train: list[dict],
              names: dict[int, str], args: argparse.Namespace) -> dict:
    """Both directions' metrics at both relevance levels, overall and per category, with the split sizes.

    Args:
        img_emb: (n_img, d) normalised test image embeddings.
        txt_emb: (n_cap, d) normalised test caption embeddings.
        cap2img: (n_cap,) image index of each caption.
        test: the test records; train: the training records (for each category's training frequency).
        names: category id -> name.
        args: retrieval.py's arguments (index kind, nlist, nprobe, seed).
    """
    per_q = retrieve_both(img_emb, txt_emb, cap2img, args.index, has=category_matrix(test, list(names)),
                          cat_ids=list(names), nlist=args.nlist, nprobe=args.nprobe, seed=args.seed)
    out = {d: summarize(per_q[d]) for d in ("img2txt", "txt2img")}
    out["category_level"] = {d: summarize(per_q["category"][d]) for d in ("img2txt", "txt2img")}
    out["per_category"] = per_category_metrics(per_q, test, cap2img, names, image_counts(train))
    out["n_eval_images"], out["n_eval_captions"] = len(test), len(cap2img)
    out["n_train_images"] = len(train)
    return out


# --------------------------------------------------------------------------- offline sweep
SWEEP_CONFIG = Path(__file__).resolve().parent / "sweeps" / "retrieval.yaml"
SWEEP_METRIC = "val/best_txt2img_R@10"  # what `wandb sweep` optimises: main() logs it, the offline sweep records it
SWEEP_METHODS = ("grid", "random")
SWEEP_DISTRIBUTIONS = ("uniform", "int_uniform", "log_uniform_values")


def parse_sweep_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Arguments of `retrieval.py sweep`, and the other flags (retrieval.py's own, fixed for every trial)."""
    p = argparse.ArgumentParser(
        prog="retrieval.py sweep", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run a wandb sweep YAML offline: grid or seeded random search over retrieval.py flags; every "
                    "trial trains on the train split and is scored on val (the test split is never read).",
        epilog="Any other retrieval.py flag (--data, --batch-size, --seed, ...) is fixed for every trial.")
    p.add_argument("--config", default=str(SWEEP_CONFIG), help="sweep YAML: method grid or random; parameters are "
                                                                "retrieval.py flags")
    p.add_argument("--max-runs", type=int, default=0,
                   help="trials, the incumbent (retrieval.py's defaults) included; 0 = the whole grid (random "
                        "search needs >= 1)")
    p.add_argument("--sweep-seed", type=int, default=0, help="seed of the random search's draws")
    # The sweep's device, threads and --wandb come from the fixed retrieval.py flags; an existing run folder resumes.
    common_args(p, "retrieval_sweep", omit=("device", "threads", "seed", "quick", "wandb"))
    args, fixed = p.parse_known_args(list(argv))
    check(args.max_runs >= 0, f"--max-runs must be >= 0, got {args.max_runs}")
    return args, fixed


def load_sweep_config(path: str | Path) -> dict:
    """A wandb sweep YAML, checked for what the offline runner supports.

    Args:
        path: the YAML file.

    Returns:
        The parsed dict (method, metric, parameters, ...).

    Raises:
        UserError: missing file, bad YAML, an unsupported method or distribution, or a parameter that is not a
            retrieval.py flag.
    """
    import yaml

    path = Path(path)
    check(path.is_file(), f"sweep config not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML ({str(err).splitlines()[0]})") from None
    check(isinstance(config, dict) and isinstance(config.get("parameters"), dict) and config["parameters"],
          f"{path} has no 'parameters' mapping")
    check(config.get("method") in SWEEP_METHODS,
          f"{path}: method {config.get('method')!r} cannot run offline; choose one of {', '.join(SWEEP_METHODS)} "
          "(bayes needs the wandb server: `wandb sweep` + `wandb agent`)")
    metric = config.get("metric") or {}
    check(metric.get("name") == SWEEP_METRIC and metric.get("goal") in ("maximize", "minimize"),
          f"{path}: metric must be {{name: {SWEEP_METRIC}, goal: maximize}} (the val metric retrieval.py logs)")
    flags = set(build_parser()._option_string_actions)
    for name, spec in config["parameters"].items():
        check(f"--{name}" in flags, f"{path}: parameter {name!r} is not a retrieval.py flag (--{name})")
        check(isinstance(spec, dict) and ("values" in spec or "value" in spec or "min" in spec),
              f"{path}: parameter {name!r} needs values, value or min/max")
        if "values" in spec:
            check(isinstance(spec["values"], list) and spec["values"], f"{path}: {name}.values must be a non-empty list")
        elif "min" in spec:
            check(config["method"] == "random", f"{path}: {name} has a distribution; grid needs values")
            check(spec.get("distribution", "uniform") in SWEEP_DISTRIBUTIONS,
                  f"{path}: {name}: distribution {spec.get('distribution')!r} is not supported offline; use one of "
                  f"{', '.join(SWEEP_DISTRIBUTIONS)} or values")
            check("max" in spec and spec["min"] <= spec["max"], f"{path}: {name} needs min <= max")
    return config


def _draw(spec: dict, rng: np.random.Generator):
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][int(rng.integers(len(spec["values"])))]
    lo, hi, kind = spec["min"], spec["max"], spec.get("distribution", "uniform")
    if kind == "int_uniform":
        return int(rng.integers(lo, hi + 1))
    x = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if kind == "log_uniform_values" else float(rng.uniform(lo, hi))
    return float(f"{x:.3g}")


def sweep_trials(config: dict, max_runs: int, seed: int, incumbent: dict) -> list[dict]:
    """The trials' parameter dicts: the incumbent first, then the grid in order or seeded random draws (no repeats).

    Args:
        config: from `load_sweep_config`.
        max_runs: trials in all (0: the whole grid).
        seed: random search seed.
        incumbent: the swept flags' current defaults.
    """
    import itertools

    params = config["parameters"]
    trials = [dict(incumbent)]
    if config["method"] == "grid":
        grid = itertools.product(*[p["values"] if "values" in p else [p["value"]] for p in params.values()])
        candidates = (dict(zip(params, combo)) for combo in grid)
    else:
        check(max_runs >= 1, "random search needs --max-runs N (trials in all, the incumbent included)")
        rng = np.random.default_rng(seed)
        candidates = ({name: _draw(spec, rng) for name, spec in params.items()} for _ in range(1000 * max_runs))
    for trial in candidates:
        if max_runs and len(trials) >= max_runs:
            break
        if trial not in trials:
            trials.append(trial)
    return trials


def sweep_markdown(metrics: dict) -> str:
    """results.md of a sweep: every trial, best first, scored on val."""
    names = list(metrics["trials"][0]["params"]) if metrics["trials"] else []
    lines = [f"# Retrieval sweep ({metrics['method']}, {len(metrics['trials'])} trials, chosen on "
             f"`{metrics['val_split']}`)", "", f"Best: `{metrics['best']['command']}`" if metrics.get("best") else "",
             "", "| trial | " + " | ".join(names) + f" | {SWEEP_METRIC} | best epoch | train s |",
             "|---" * (len(names) + 4) + "|"]
    for t in sorted(metrics["trials"], key=lambda t: -t[SWEEP_METRIC]):
        label = f"{t['trial']}" + (" (incumbent)" if t["trial"] == 0 else "")
        lines.append(f"| {label} | " + " | ".join(str(t["params"][n]) for n in names)
                     + f" | {fmt(t[SWEEP_METRIC])} | {t['best_epoch']} | {t['train_s']:.0f} |")
    return "\n".join(lines) + "\n"


def sweep_main(argv: Sequence[str]) -> dict:
    """`retrieval.py sweep`: the same search as `wandb sweep sweeps/retrieval.yaml`, offline and resumable.

    Writes <outputs>/retrieval_sweep/<run>/config.json, metrics.json (every trial, rewritten after each) and
    results.md; the best trial is chosen on the val split only.
    """
    sargs, fixed = parse_sweep_args(argv)

    # 1. the search space and the trials (the incumbent, i.e. today's defaults, is trial 0)
    config = load_sweep_config(sargs.config)
    for name in config["parameters"]:
        check(not any(a == f"--{name}" or a.startswith(f"--{name}=") for a in fixed),
              f"--{name} is swept by {sargs.config}; leave it out of the fixed flags")
    base = parse_args(fixed)
    check(bool(base.val_split), "the sweep chooses on --val-split; it cannot be empty")
    trials = sweep_trials(config, sargs.max_runs, sargs.sweep_seed,
                          {name: getattr(base, name.replace("-", "_")) for name in config["parameters"]})

    # 2. train and val features (cached on disk); the test split is not loaded
    data = load_data(base.data, [base.train_split, base.val_split])
    train = subset(data["splits"][base.train_split], base.max_train, base.seed)
    val = subset(data["splits"][base.val_split], base.max_eval, base.seed + 2)
    image_res = base.image_res or auto_image_res(data, base.image_encoder)
    run = start_run("retrieval_sweep", argparse.Namespace(**{**vars(base), **vars(sargs)}),
                    config={"sweep": vars(sargs), "fixed_flags": fixed, "sweep_config": config, "trials": trials})
    with run.step("features"):
        fx = FeatureExtractor(base.image_encoder, base.text_encoder, image_res, run.device)
        tr, va = split_features(fx, train), split_features(fx, val)

    # 3. one training per trial, resumable: a finished trial (same parameters) is read back, not retrained
    sign = 1 if config["metric"]["goal"] == "maximize" else -1
    metrics = {"method": config["method"], "metric": config["metric"], "val_split": base.val_split,
               "n_train_images": len(train), "n_val_images": len(val), "trials": []}
    with run.step("trials"):
        run_trials(trials, fixed, tr, va, image_res, sign, metrics, run.dir / "metrics.json")

    # 4. the choice (val only) and the command that trains it
    best = max(metrics["trials"], key=lambda t: sign * t[SWEEP_METRIC])
    flags = " ".join(fixed + [f"--{k} {v}" for k, v in best["params"].items()])
    metrics["best"] = {"trial": best["trial"], "params": best["params"], SWEEP_METRIC: best[SWEEP_METRIC],
                       "incumbent": metrics["trials"][0][SWEEP_METRIC], "command": f"python retrieval.py {flags}"}
    write_text(run.dir / "results.md", sweep_markdown(metrics))
    run.finish(metrics)
    print(sweep_markdown(metrics))
    print(f"wrote {run.dir}")
    return metrics


def run_trials(trials: list[dict], fixed: list[str], tr: tuple, va: tuple, image_res: int, sign: int, metrics: dict,
               path: Path) -> None:
    """Train heads once per trial, appending each result to metrics["trials"] and rewriting `path` after each.

    A trial whose parameters `path` already holds (an interrupted sweep) is read back, not retrained.

    Args:
        trials: parameter dicts (`sweep_trials`).
        fixed: the retrieval.py flags every trial shares.
        tr: train (image feats, caption feats, cap2img); va: the same for val.
        image_res: the backbone input side the features were made at.
        sign: 1 when the sweep metric is maximised, -1 when minimised.
        metrics: the sweep's metrics dict.
        path: its metrics.json.
    """
    from tqdm.auto import tqdm

    previous = {}
    if path.is_file():
        previous = {json_key(t["params"]): t for t in read_json(path).get("trials", [])}
    for i, params in enumerate(tqdm(trials, desc="sweep trials")):
        if json_key(params) in previous:
            metrics["trials"].append(dict(previous[json_key(params)], trial=i))
            continue
        targs = parse_args(fixed + [f"--{k}={v}" for k, v in params.items()])
        targs.image_res = image_res
        t = time.time()
        _, history = train_heads(*tr, targs, val=va)
        best = max(history, key=lambda h: sign * h["val_txt2img_R@10"])
        metrics["trials"].append({"trial": i, "params": params, SWEEP_METRIC: best["val_txt2img_R@10"],
                                  "best_epoch": best["epoch"], "train_s": round(time.time() - t, 2),
                                  "val_curve": [round(h["val_txt2img_R@10"], 4) for h in history]})
        write_json(path, metrics)


def json_key(params: dict) -> str:
    """A trial's parameters as a canonical string (resume matching)."""
    import json

    return json.dumps(params, sort_keys=True)


if __name__ == "__main__":
    cli(main)
