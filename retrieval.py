"""Cross-modal retrieval: how well do captions find their images (and images their captions)?

A dual encoder: frozen pretrained backbones (EfficientNet-Lite0 for images, all-MiniLM-L6-v2
for text, both offline; any timm/torchvision/transformers model as an option) whose features
are cached on disk, and two small projection heads trained into one shared space with a
pytorch-metric-learning loss and miner. FAISS inner-product indexes serve both directions;
evaluation reports R@1/5/10 and mAP overall and per category, next to each category's
training-set frequency.

Quick (seconds, on existing data):
    python retrieval.py --quick
Full baseline (after `python generate_data.py`):
    python retrieval.py --run-name baseline
Other options: --loss ntxent, --index ivf, --text-encoder bert-base-uncased (cached), --wandb
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from utils import (DEFAULT_DATA, DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER, UserError, cached, category_names,
                   check, cli, encode_images, encode_texts, init_wandb, l2_normalize, load_data, load_image_encoder,
                   finish_run, load_text_encoder, make_run_dir, pick_device)

KS = (1, 5, 10)
LOSSES = ("triplet", "ntxent")
MINERS = ("semihard", "hard", "all", "none")
INDEXES = ("flat", "ivf", "hnsw")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--dim", type=int, default=256, help="shared embedding size")
    p.add_argument("--hidden", type=int, default=1024, help="hidden units of each projection head")
    p.add_argument("--loss", default="triplet", help=f"metric-learning loss: {', '.join(LOSSES)}")
    p.add_argument("--miner", default="semihard", help=f"triplet miner: {', '.join(MINERS)} (triplet loss only)")
    p.add_argument("--margin", type=float, default=0.2, help="triplet margin (cosine units)")
    p.add_argument("--temperature", type=float, default=0.07, help="NT-Xent temperature")
    p.add_argument("--epochs", type=int, default=40, help="passes over the training images")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (one caption each)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--index", default="flat", help=f"FAISS index: {', '.join(INDEXES)} (flat = exact)")
    p.add_argument("--nlist", type=int, default=64, help="IVF lists (--index ivf)")
    p.add_argument("--nprobe", type=int, default=8, help="IVF lists searched per query (--index ivf)")
    p.add_argument("--max-train", type=int, default=0, help="use at most this many training images (0 = all)")
    p.add_argument("--max-eval", type=int, default=0, help="evaluate on at most this many images (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed for head init, batches and caption choice")
    p.add_argument("--run-name", default=None, help="run folder name under outputs/retrieval (default: timestamp)")
    p.add_argument("--outputs", default="outputs", help="outputs root")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP figure (saves ~20 s)")
    p.add_argument("--wandb", action="store_true", help="log to wandb (offline unless WANDB_MODE=online)")
    p.add_argument("--quick", action="store_true", help="smoke run: 500 train / 200 eval images, 10 epochs of batch 64, no UMAP")
    args = p.parse_args(argv)
    if args.quick:
        args.max_train = args.max_train or 500
        args.max_eval = args.max_eval or 200
        args.epochs = min(args.epochs, 10)
        args.batch_size = min(args.batch_size, 64)
        args.no_umap = True
    check_args(args)
    return args


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
        return losses.NTXentLoss(temperature=args.temperature), None
    loss = losses.TripletMarginLoss(margin=args.margin, distance=CosineSimilarity())
    if args.miner == "none":
        return loss, None
    miner = miners.TripletMarginMiner(margin=args.margin, type_of_triplets=args.miner, distance=CosineSimilarity())
    return loss, miner


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
    """Train the projection heads; keep the epoch with the best validation txt2img R@10.

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
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    gen = np.random.default_rng(args.seed)
    heads = build_heads(img_feats.shape[1], txt_feats.shape[1], args.hidden, args.dim)
    opt = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=args.weight_decay)
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
            row["val_txt2img_R@10"] = evaluate(heads, *val)["txt2img"]["R@10"]
            if row["val_txt2img_R@10"] > best[0]:
                best = (row["val_txt2img_R@10"], {k: v.clone() for k, v in heads.state_dict().items()})
        history.append(row)
        if on_epoch:
            on_epoch(epoch + 1, row)
    if best[1] is not None:
        heads.load_state_dict(best[1])
    return heads.eval(), history


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


def retrieve_both(img_emb: np.ndarray, txt_emb: np.ndarray, cap2img: np.ndarray, index_kind: str = "flat",
                  depth: int | None = None, **index_kw) -> dict[str, dict[str, np.ndarray]]:
    """Per-query metrics for img2txt and txt2img on one split.

    Args:
        img_emb: (n_img, d) normalised image embeddings.
        txt_emb: (n_cap, d) normalised caption embeddings.
        cap2img: (n_cap,) image index of each caption.
        index_kind: FAISS index kind.
        depth: ranked-list length (default: the whole database, so mAP is exact).
        **index_kw: passed to `build_index`.
    """
    n_img = len(img_emb)
    caps_per_img = np.bincount(cap2img, minlength=n_img)
    txt_index = build_index(txt_emb, index_kind, **index_kw)
    img_index = build_index(img_emb, index_kind, **index_kw)
    _, t_ids = search(txt_index, img_emb, depth or len(txt_emb))
    _, i_ids = search(img_index, txt_emb, depth or n_img)
    i2t = ranking_metrics(np.where(t_ids >= 0, cap2img[np.maximum(t_ids, 0)], -1), np.arange(n_img), caps_per_img)
    t2i = ranking_metrics(i_ids, cap2img, np.ones(len(cap2img)))
    return {"img2txt": i2t, "txt2img": t2i}


def summarize(per_query: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean of per-query metrics (over `mask` when given), named R@k and mAP."""
    out = {}
    for name, values in per_query.items():
        v = values if mask is None else values[mask]
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


def per_category_table(per_cat: dict) -> str:
    """Markdown table of every category, sorted by training frequency (descending)."""
    lines = ["| category | train images | test images | img2txt R@1 | R@10 | mAP | txt2img R@1 | R@10 | mAP |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(per_cat, key=lambda n: -per_cat[n]["train_count"]):
        c = per_cat[name]
        vals = [c[d][k] for d in ("img2txt", "txt2img") for k in ("R@1", "R@10", "mAP")]
        lines.append(f"| {name} | {c['train_count']} | {c['n_eval_images']} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    return "\n".join(lines)


def plot_per_category(per_cat: dict, path: Path) -> None:
    """Recall@10 of each category against its training frequency (log x), both directions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    args = parse_args(argv)
    t0 = time.time()

    # 1. data and splits
    splits = [args.train_split, args.eval_split] + ([args.val_split] if args.val_split else [])
    data = load_data(args.data, splits)
    names = category_names(data)
    train = subset(data["splits"][args.train_split], args.max_train, args.seed)
    test = subset(data["splits"][args.eval_split], args.max_eval, args.seed + 1)
    val = subset(data["splits"][args.val_split], args.max_eval, args.seed + 2) if args.val_split else None
    args.image_res = args.image_res or auto_image_res(data, args.image_encoder)
    run_dir = make_run_dir("retrieval", args.run_name, vars(args), args.outputs)
    wb = init_wandb(args.wandb, "retrieval", vars(args), args.run_name)
    metrics: dict = {"timings": {}}

    # 2. frozen backbone features (cached on disk)
    fx = FeatureExtractor(args.image_encoder, args.text_encoder, args.image_res, pick_device(args.device))
    tr, te = split_features(fx, train), split_features(fx, test)
    va = split_features(fx, val) if val is not None else None
    metrics["timings"]["features_s"] = round(time.time() - t0, 2)

    # 3. train the projection heads (best epoch on val)
    t1 = time.time()
    heads, history = train_heads(*tr, args, val=va,
                                 on_epoch=(lambda e, row: wb.log(row, step=e)) if wb else None)
    metrics["timings"]["train_s"] = round(time.time() - t1, 2)
    metrics["history"] = history
    save_heads(run_dir / "heads.pt", heads, {
        "in_image": tr[0].shape[1], "in_text": tr[1].shape[1], "hidden": args.hidden, "dim": args.dim,
        "image_encoder": args.image_encoder, "text_encoder": args.text_encoder, "image_res": args.image_res})

    # 4. evaluate both directions with FAISS, overall and per category
    t2 = time.time()
    img_emb, txt_emb = embed(heads, "image", te[0]), embed(heads, "text", te[1])
    per_q = retrieve_both(img_emb, txt_emb, te[2], args.index, nlist=args.nlist, nprobe=args.nprobe, seed=args.seed)
    for d in ("img2txt", "txt2img"):
        metrics[d] = summarize(per_q[d])
    metrics["per_category"] = per_category_metrics(per_q, test, te[2], names, image_counts(train))
    metrics["n_eval_images"], metrics["n_eval_captions"] = len(test), len(te[2])
    metrics["n_train_images"] = len(train)
    metrics["timings"]["eval_s"] = round(time.time() - t2, 2)

    # 5. tables and figures
    headline = headline_table(metrics)
    (run_dir / "results.md").write_text("# Retrieval baseline\n\n" + headline + "\n\n## Per category\n\n"
                                        + per_category_table(metrics["per_category"]) + "\n")
    plot_per_category(metrics["per_category"], run_dir / "per_category.png")
    if not args.no_umap:
        first = [names[r["category_ids"][0]] if r["category_ids"] else "none" for r in test]
        plot_umap(img_emb, txt_emb, first, [first[i] for i in te[2]], run_dir / "umap.png", args.seed)
    metrics["timings"]["total_s"] = round(time.time() - t0, 2)
    finish_run(run_dir, metrics)
    if wb:
        wb.log({f"{d}/{k}": v for d in ("img2txt", "txt2img") for k, v in metrics[d].items()})
        wb.finish()
    print(headline)
    print(f"\nwrote {run_dir}")
    return metrics


if __name__ == "__main__":
    cli(main)
