"""Task C: where does the retrieval system fail, and which categories should a fix target?

Loads the retrieval baseline (or trains one when there is none), measures each category's img2txt /
txt2img quality on the test split next to its training-set frequency, at two relevance levels:
instance (R@K: the one described image) and category (R@K and mAP@R: any image of the queried
category). It tests whether frequency predicts recall (Spearman, 95% bootstrap CI over test
images), shows which categories are mistaken for which (confusion of txt2img top-1 errors), picks
targets by a statistic whose CI separates them from the other categories (saying so when none is
separable), and writes a problem statement in the words the data supports: no shape, colour or
position wording on data without them.

The data is the one the --retrieval-run was trained on (its config.json); an explicit --data that
differs is an error. Without a usable run, a baseline is trained here on --data.

Quick (well under a minute; trains a small baseline when there is no retrieval run):
    python task_c.py --quick
Full (reuses the trained baseline: ~10 s on 2 cores, plus ~20 s for the UMAP):
    python task_c.py --retrieval-run outputs/retrieval/baseline --run-name baseline
Writes outputs/task_c/<run_name>/: problem.md, targets.json, metrics.json, confusion.csv, and, after
those, the figures confusion.png, recall_vs_frequency.png, umap.png (not with --quick / --no-umap).
"""

from __future__ import annotations

import argparse
import csv
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

import retrieval
from utils import (DEFAULT_DATA, category_names, check, ci_verdict, cli, cluster_bootstrap, common_args, fmt, fmt_ci,
                   load_data, md_table, parse_checked, percentile_ci, pyplot, read_json, start_run, write_json,
                   write_text)

# How each --rule ranks categories (lowest first): the per-category key of `category_rows` it ranks by, and what
# it means in words.
RULES: dict[str, tuple[str, str]] = {
    "bottom-txt2img-R@10": ("txt2img_R@10", "the {k} categories with the lowest txt2img Recall@10 (instance level) "
                                            "on the {split} split"),
    "bottom-img2txt-R@10": ("img2txt_R@10", "the {k} categories with the lowest img2txt Recall@10 (instance level) "
                                            "on the {split} split"),
    "bottom-txt2img-mAP@R": ("txt2img_mAP@R", "the {k} categories with the lowest txt2img mAP@R (category level: an "
                                              "image of the queried category is relevant) on the {split} split"),
    "bottom-hit@1": ("hit@1", "the {k} categories whose txt2img queries least often rank an image of the category "
                              "first (hit@1) on the {split} split"),
    "rarest": ("train_count", "the {k} categories in the fewest training images (ties: lower txt2img Recall@10 "
                              "first)"),
}
AUTO_RULE = "auto"
SHARED_CAPTIONS = 0.5  # above this share of test captions shared by several images, captions name a class
# --quick: a quick baseline when one is trained here, and eval_images test images (a seeded subset).
QUICK = {"bootstrap": 100, "no_umap": True, "eval_images": 200}
TOP_PAIRS = 5
# What a Spearman CI says (`utils.ci_verdict` of it) about frequency and recall.
CORRELATION_WORDS = {
    "better": "CI above 0: categories seen more often in training are retrieved better",
    "worse": "CI below 0: categories seen more often in training are retrieved worse",
    "no detectable difference": "CI includes 0: no evidence that training frequency predicts recall",
    "undefined": "undefined (fewer than 3 categories with test queries, or constant recall)",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="data.pkl from generate_data.py (default: the data the --retrieval-run was trained on; "
                        f"{DEFAULT_DATA} when a baseline is trained here). A --retrieval-run trained on other "
                        "data is an error")
    p.add_argument("--retrieval-run", default=None,
                   help="retrieval run folder with heads.pt and config.json (default: outputs/retrieval/latest when "
                        "it was trained on --data); a baseline is trained here when the folder has no heads")
    p.add_argument("--eval-split", default="test", help="split the failures are measured on")
    p.add_argument("--k-targets", type=int, default=3,
                   help="most target categories to pick (1..categories); fewer when fewer are separable")
    p.add_argument("--rule", default=AUTO_RULE,
                   help=f"how targets are ranked: {', '.join(RULES)}, or {AUTO_RULE} (bottom-txt2img-mAP@R when "
                        "most test captions are shared by several images, i.e. name a class; else "
                        "bottom-txt2img-R@10)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test images (>= 1)")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP figure (saves ~20 s)")
    common_args(p, "task_c", QUICK, helps={"seed": "seed of the bootstrap, the UMAP and any baseline trained here"})
    return parse_checked(p, argv, QUICK, check_args)


def check_args(args: argparse.Namespace) -> None:
    check(args.rule in RULES or args.rule == AUTO_RULE,
          f"unknown --rule {args.rule!r}; choose one of {', '.join(RULES)}, {AUTO_RULE}")
    check(args.k_targets >= 1, f"--k-targets must be >= 1, got {args.k_targets}")
    check(args.bootstrap >= 1, f"--bootstrap must be >= 1, got {args.bootstrap}")
    check(args.data is None or Path(args.data).is_file(),
          f"data file not found: {args.data} (run `python generate_data.py` first)")


# --------------------------------------------------------------------------- 1. baseline and embeddings
def trained_on(run: Path) -> str | None:
    """The data a retrieval run folder's heads were trained on (its config.json), or None without heads."""
    if not (run / "heads.pt").is_file():
        return None
    check((run / "config.json").is_file(), f"{run} has heads.pt but no config.json: cannot tell its training data")
    data = read_json(run / "config.json").get("args", {}).get("data")
    check(bool(data), f"{run / 'config.json'} does not name the data the heads were trained on")
    return str(data)


def same_file(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def choose_run(args: argparse.Namespace) -> Path | None:
    """The retrieval run to analyse, with args.data settled to its data; None when a baseline must be trained.

    An explicit --retrieval-run with heads decides the data: --data defaults to it and a different
    --data is an error (its heads never saw that data). The default run (outputs/retrieval/latest) is
    used when it fits --data; otherwise, or when the run has no heads, a baseline is trained on --data.
    """
    explicit = args.retrieval_run is not None
    run = Path(args.retrieval_run if explicit else Path(args.outputs) / "retrieval" / "latest")
    data = trained_on(run)
    if data is not None and (args.data is None or same_file(args.data, data)):
        args.data = args.data or data
        check(Path(args.data).is_file(), f"data file not found: {args.data} (the data {run} was trained on; "
                                         "regenerate it with generate_data.py)")
        return run.resolve()
    check(not explicit or data is None,
          f"--data {args.data} is not the data {run} was trained on ({data}); leave --data out to analyse that "
          "data, or pass a --retrieval-run trained on this one")
    args.data = args.data or str(DEFAULT_DATA)
    check(Path(args.data).is_file(), f"data file not found: {args.data} (run `python generate_data.py` first)")
    return None


def train_baseline(args: argparse.Namespace) -> Path:
    """A quick (--quick) or default retrieval baseline on args.data, as retrieval run task_c-<run name>."""
    # Prefixed so a task_c run name never overwrites a retrieval run of the same name.
    name = f"task_c-{args.run_name}"
    where = args.retrieval_run or Path(args.outputs) / "retrieval" / "latest"
    print(f"{where} has no heads trained on {args.data}: training a baseline as retrieval run {name!r}")
    retrieval.main(["--data", args.data, "--seed", str(args.seed), "--run-name", name, "--outputs", args.outputs,
                    "--device", args.device, "--threads", str(args.threads), "--no-umap",
                    *(["--quick"] if args.quick else [])])
    return (Path(args.outputs) / "retrieval" / name).resolve()


def eval_embeddings(run: Path, records: list[dict]):
    """(image embeddings, caption embeddings, cap2img) of `records` under the run's heads (features cached)."""
    heads, meta = retrieval.load_heads(run / "heads.pt")
    fx = retrieval.FeatureExtractor(meta["image_encoder"], meta["text_encoder"], meta.get("image_res", 0))
    img_f, txt_f, cap2img = retrieval.split_features(fx, records)
    return retrieval.embed(heads, "image", img_f), retrieval.embed(heads, "text", txt_f), cap2img


# --------------------------------------------------------------------------- 3. frequency vs recall
def per_image_sums(hits: np.ndarray, owner: np.ndarray, has: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and category: the sum of its queries' hits and their number, for `utils.cluster_bootstrap`.

    A query belongs to the image it is about, and counts for every category of that image.

    Args:
        hits: (n_q,) per-query hits (or any per-query value).
        owner: (n_q,) the image each query belongs to.
        has: (n_images, n_cat) bool category membership.

    Returns:
        (sums, counts), both (n_images, n_cat).
    """
    g = has.astype(np.float64)
    n_images = len(has)
    return (np.bincount(owner, weights=hits, minlength=n_images).astype(np.float64)[:, None] * g,
            np.bincount(owner, minlength=n_images).astype(np.float64)[:, None] * g)


def per_image_category_sums(values: np.ndarray, owner: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Per image and category: the sum of its queries' values and their number (NaN values are not queries).

    Args:
        values: (n_q, n_cat) per-query value for each category, NaN where the query does not ask for it.
        owner: (n_q,) the image each query belongs to.
        n_images: number of images.
    """
    finite = np.isfinite(values)
    sums = np.zeros((n_images, values.shape[1]))
    counts = np.zeros((n_images, values.shape[1]))
    np.add.at(sums, owner, np.where(finite, values, 0.0))
    np.add.at(counts, owner, finite.astype(np.float64))
    return sums, counts


def minus_others(values: np.ndarray) -> np.ndarray:
    """Each category's value minus the mean of the other categories' values (NaN categories left out), on the
    last axis."""
    finite = np.isfinite(values)
    v = np.where(finite, values, 0.0)
    others = finite.sum(axis=-1, keepdims=True) - finite
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_others = (v.sum(axis=-1, keepdims=True) - v) / others
    return np.where(finite & (others > 0), values - mean_others, np.nan)


def separation(point: np.ndarray, boot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each category's gap to the mean of the others, with a percentile 95% CI over the same resamples.

    The categories share each resample's images, so the gap is paired. A category whose CI lies below 0
    is separably worse than the rest.

    Args:
        point: (n_cat,) per-category values on the full test set.
        boot: (n_boot, n_cat) the same values on resampled test sets.

    Returns:
        (gap (n_cat,), ci (n_cat, 2)), NaN for categories without queries.
    """
    gaps = minus_others(boot)
    with warnings.catch_warnings():  # all-NaN columns: categories without test queries
        warnings.simplefilter("ignore")
        ci = np.nanpercentile(gaps, [2.5, 97.5], axis=0).T
    return minus_others(point), ci


def shared_caption_share(captions: Sequence[str], cap2img: np.ndarray) -> float:
    """Share of captions whose text (case and spacing ignored) is also a caption of another image."""
    owners: dict[str, set] = {}
    keys = [" ".join(c.lower().split()) for c in captions]
    for key, img in zip(keys, cap2img):
        owners.setdefault(key, set()).add(int(img))
    return float(np.mean([len(owners[k]) > 1 for k in keys])) if keys else 0.0


def instance_ceiling(captions: Sequence[str], cap2img: np.ndarray, k: int = 10) -> float:
    """The txt2img instance-level R@k a perfect ranking reaches on average when identical captions of m images
    are tied: min(1, k / m) per caption."""
    owners: dict[str, set] = {}
    keys = [" ".join(c.lower().split()) for c in captions]
    for key, img in zip(keys, cap2img):
        owners.setdefault(key, set()).add(int(img))
    return float(np.mean([min(1.0, k / len(owners[key])) for key in keys])) if keys else float("nan")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or not np.all(np.isfinite(y)):
        return float("nan")
    with warnings.catch_warnings():  # constant input: undefined correlation, reported as NaN
        warnings.simplefilter("ignore")
        return float(spearmanr(x, y).statistic)


def spearman_with_ci(freq: np.ndarray, recall: np.ndarray, boot: np.ndarray) -> dict:
    """Spearman rho between training frequency and recall across categories, with a percentile 95% CI.

    Categories without test queries (NaN recall) are left out; so are resamples where the rank
    correlation is undefined.

    Args:
        freq: (n_cat,) training images per category.
        recall: (n_cat,) per-category recall on the full test set.
        boot: (n_boot, n_cat) the same recall on resampled test images (`utils.cluster_bootstrap`).

    Returns:
        {"rho", "ci95", "verdict" (`utils.ci_verdict`: "better" = CI above 0), "n_categories", "n_resamples"}.
    """
    keep = np.isfinite(recall)
    rho = _spearman(freq[keep], recall[keep])
    rhos = np.array([_spearman(freq[keep], b[keep]) for b in boot])
    ci = percentile_ci(rho, rhos)["ci95"]
    return {"rho": rho, "ci95": ci, "verdict": ci_verdict(ci, rho), "n_categories": int(keep.sum()),
            "n_resamples": int(np.isfinite(rhos).sum())}


# --------------------------------------------------------------------------- 4. confusions
def confusion_counts(top1: np.ndarray, query_img: np.ndarray, has: np.ndarray) -> tuple[np.ndarray, dict]:
    """Which categories replace which in txt2img queries whose top-1 image is wrong.

    counts[a, b] = number of wrong-top-1 queries whose own image contains category a, the retrieved
    image does not, and the retrieved image contains category b that the query image lacks.

    Args:
        top1: (n_q,) index of each query's top-1 image.
        query_img: (n_q,) index of each query's own image.
        has: (n_img, n_cat) bool category membership.

    Returns:
        (counts (n_cat, n_cat) int, summary with n_queries, n_wrong, n_wrong_missing (a query category
        absent from the retrieved image) and missing_per_category (n_cat,)).
    """
    wrong = top1 != query_img
    missing = has[query_img[wrong]] & ~has[top1[wrong]]
    extra = has[top1[wrong]] & ~has[query_img[wrong]]
    counts = missing.T.astype(np.int64) @ extra.astype(np.int64)
    summary = {"n_queries": int(len(top1)), "n_wrong": int(wrong.sum()),
               "n_wrong_missing": int(missing.any(axis=1).sum()), "missing_per_category": missing.sum(axis=0)}
    return counts, summary


def row_normalise(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows without counts stay 0)."""
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros(counts.shape, np.float64), where=total > 0)


def top_pairs(counts: np.ndarray, names: Sequence[str], n: int = TOP_PAIRS) -> list[dict]:
    """The `n` commonest (query category missing, other category present instead) pairs."""
    shares = row_normalise(counts)
    order = np.argsort(-counts, axis=None, kind="stable")[:n]
    pairs = []
    for a, b in zip(*np.unravel_index(order, counts.shape)):
        if counts[a, b] > 0:
            pairs.append({"query_category": names[a], "retrieved_category": names[b], "count": int(counts[a, b]),
                          "share_of_row": float(shares[a, b])})
    return pairs


def category_hit_at_1(top1: np.ndarray, query_img: np.ndarray, has: np.ndarray) -> np.ndarray:
    """Per category: fraction of its txt2img queries whose top-1 image contains the category (NaN if none)."""
    asked = has[query_img]
    found = asked & has[top1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return found.sum(axis=0) / asked.sum(axis=0)


def write_confusion_csv(path: Path, counts: np.ndarray, names: Sequence[str]) -> None:
    """Row-normalised confusion with each row's number of substitutions, written atomically."""
    shares = row_normalise(counts)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["query_category_missing", "n_substitutions", *names])
        for a, name in enumerate(names):
            w.writerow([name, int(counts[a].sum()), *(f"{v:.4f}" for v in shares[a])])
    tmp.replace(path)


# --------------------------------------------------------------------------- 5. figures


def plot_confusion(counts: np.ndarray, names: Sequence[str], path: Path) -> None:
    """Heatmap of the row-normalised confusion matrix."""
    plt = pyplot()
    side = 2.5 + 0.45 * len(names)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(row_normalise(counts), cmap="viridis", vmin=0)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("present in the wrong top-1 image instead")
    ax.set_ylabel("query image's category missing from it")
    ax.set_title("txt2img top-1 errors: which category replaces which")
    fig.colorbar(im, ax=ax, label="share of the row's substitutions")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_recall_vs_frequency(rows: list[dict], path: Path) -> None:
    """R@10 in both directions against log training frequency, txt2img with its 95% bootstrap CI."""
    plt = pyplot()
    rows = [r for r in rows if np.isfinite(r["txt2img_R@10"])]
    x = np.array([max(r["train_count"], 1) for r in rows], dtype=float)
    t2i = np.array([r["txt2img_R@10"] for r in rows])
    ci = np.array([r["txt2img_R@10_ci95"] for r in rows]).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.errorbar(x, t2i, yerr=np.abs(ci - t2i[:, None]).T, fmt="s", capsize=3, label="txt2img R@10 (95% CI)")
    ax.scatter(x, [r["img2txt_R@10"] for r in rows], marker="o", label="img2txt R@10")
    for r, xi, yi in zip(rows, x, t2i):
        ax.annotate(r["category"], (xi, yi), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("training images containing the category (log)")
    ax.set_ylabel("Recall@10 on the evaluation split")
    ax.set_title("Per-category recall vs training frequency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------------- 6. targets
TARGET_KEYS = ("category", "category_id", "train_count", "txt2img_R@10", "img2txt_R@10", "hit@1", "txt2img_mAP@R",
               "txt2img_R@10_ci95", "value", "value_ci95", "gap_to_others", "gap_ci95", "separated")


def category_rows(per_cat: dict[str, dict], cat_ids: Sequence[int], cat_names: Sequence[str]) -> list[dict]:
    """One flat row per category (the fields of targets.json, plus n_eval_images), in category order."""
    rows = []
    for cid, name in zip(cat_ids, cat_names):
        c = per_cat[name]
        rows.append({"category": name, "category_id": cid, "train_count": c["train_count"],
                     "n_eval_images": c["n_eval_images"], "txt2img_R@10": c["txt2img"]["R@10"],
                     "img2txt_R@10": c["img2txt"]["R@10"], "hit@1": c["hit@1"],
                     "txt2img_mAP@R": c.get("category_level", {}).get("txt2img", {}).get("mAP@R", float("nan")),
                     "txt2img_R@10_ci95": c["txt2img_R@10_ci95"]})
    return rows


def resolve_rule(rule: str, shared: float) -> tuple[str, str]:
    """The rule to apply and why: `auto` becomes the category-level rule when captions name a class."""
    if rule != AUTO_RULE:
        return rule, "chosen with --rule"
    if shared > SHARED_CAPTIONS:
        return "bottom-txt2img-mAP@R", (f"auto: {shared:.0%} of the test captions are also captions of other images, "
                                        "so a caption names a class and any image of it answers it")
    return "bottom-txt2img-R@10", (f"auto: {shared:.0%} of the test captions are shared by several images, so a "
                                   "caption describes one image")


def rule_values(rule: str, per_q: dict, has: np.ndarray, cap2img: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Per query and category, the value a rule ranks by (NaN where the query's image lacks the category), and
    each query's image; None for `rarest`, whose training counts are exact."""
    n_img = len(has)
    if rule == "rarest":
        return None
    if rule in ("bottom-txt2img-R@10", "bottom-img2txt-R@10"):
        d = rule.split("-")[1]
        owner = cap2img if d == "txt2img" else np.arange(n_img)
        return np.where(has[owner], per_q[d]["R@10"][:, None], np.nan), owner
    key = "mAP@R" if rule == "bottom-txt2img-mAP@R" else "R@1"
    return per_q["category"]["txt2img"]["by_category"][key], cap2img


def pick_targets(rows: list[dict], rule: str, k: int) -> tuple[list[str], list[str]]:
    """Up to k targets under `rule`: the categories whose gap to the others has a CI below 0, lowest value first.

    When none is separable, the k lowest values, flagged: they are not shown to be worse than the rest.
    `rarest` ranks by exact training counts, which need no CI. Ties go to the lower txt2img R@10, then
    the rarer category, then the name, so the choice is deterministic.

    Args:
        rows: `category_rows` (with "value", "gap_ci95" and "separated" for the rule's metric).
        rule: a key of RULES.
        k: most targets.

    Returns:
        (chosen names, names of every separable category).
    """
    key = RULES[rule][0]
    value = lambda r: r[key]  # noqa: E731
    t2i = lambda r: r["txt2img_R@10"] if np.isfinite(r["txt2img_R@10"]) else 9.0  # noqa: E731
    scored = [r for r in rows if r.get("n_eval_images", 1) > 0 and np.isfinite(value(r))]
    ranked = sorted(scored, key=lambda r: (value(r), t2i(r), r["train_count"], r["category"]))
    if rule == "rarest":
        return [r["category"] for r in ranked[:k]], []
    separable = [r["category"] for r in ranked if r.get("separated")]
    return (separable[:k] if separable else [r["category"] for r in ranked[:k]]), separable


def targets_record(rows: list[dict], chosen: Sequence[str], separable: Sequence[str], rule: str, why: str,
                   args: argparse.Namespace, run: Path) -> dict:
    """The content of targets.json: the rule in words, how targets were selected, and the chosen categories."""
    by_name = {r["category"]: r for r in rows}
    if rule == "rarest":
        selection = "the k rarest categories (training counts are exact: no CI needed)"
    elif separable:
        gap = "a 95% CI of (value - mean of the other categories) below 0"
        selection = (f"1 category has {gap}: it is the target" if len(separable) == 1 else
                     f"{len(separable)} categories have {gap}; the {len(chosen)} lowest of them are the targets")
    else:
        selection = ("no category's 95% CI of (value - mean of the other categories) lies below 0: nothing is "
                     f"separably worse than the rest; these are the {len(chosen)} lowest point estimates, not a "
                     "demonstrated weakness")
    return {"rule": RULES[rule][1].format(k=args.k_targets, split=args.eval_split), "rule_name": rule,
            "rule_reason": why, "metric": RULES[rule][0], "k": args.k_targets,
            "statistic": "per-category value minus the mean of the other categories, 95% percentile bootstrap CI "
                         f"over {args.eval_split} images (each with its captions)",
            "n_separable": len(separable), "separable": list(separable), "selection": selection,
            "targets": [{k: by_name[n].get(k) for k in TARGET_KEYS} for n in chosen],
            "baseline_run": str(run), "data": str(Path(args.data).resolve())}


# --------------------------------------------------------------------------- 7. problem statement
def data_vocabulary(data: dict, shared: float) -> dict:
    """What the data lets the problem statement talk about: the unit of a confusion and what else captions say."""
    records = [r for recs in data["splits"].values() for r in recs]
    attributes = [word for word, present in (
        ("colour", bool(data.get("colors"))), ("size", bool(data.get("sizes"))),
        ("count", any(len(r.get("objects") or []) > 1 for r in records)),
        ("position", any("cell" in o for r in records for o in (r.get("objects") or [])))) if present]
    shapes = data.get("source") == "shapes"
    return {"unit": "shape" if shapes else "category", "attributes": attributes,
            "class_captions": shared > SHARED_CAPTIONS, "shared_captions": shared}


def _or_join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def rest_sentence(vocab: dict) -> str:
    """Where a wrong top-1 image that holds every category of the query's image goes wrong, in the data's terms."""
    if vocab["attributes"]:
        return f"the error lies in {_or_join(vocab['attributes'])}"
    if vocab["class_captions"]:
        return "with captions that name a class, such an image answers the caption as well as the described one"
    return "the error lies in what the caption says beyond its categories"


def summary_sentence(m: dict, scored: list[dict]) -> str:
    """One paragraph stating the problem: frequency effect or not, the targets, the commonest confusion."""
    s = m["spearman"]["txt2img"]
    t = m["targets"]
    metric = t["metric"]
    names = ", ".join(f"{r['category']} ({metric} {fmt(r['value'])}, {r['train_count']} training images)"
                      for r in t["targets"])
    text = (f"txt2img R@10 is {fmt(m['overall']['txt2img']['R@10'])} overall at instance level (a perfect ranking "
            f"reaches {fmt(m['instance_ceiling_txt2img_R@10'])} here) and the category-level mAP@R "
            f"{fmt(m['overall']['category_level']['txt2img']['mAP@R'])}"
            + (f"; per category txt2img R@10 spans {fmt(scored[0]['txt2img_R@10'])}-{fmt(scored[-1]['txt2img_R@10'])}"
               if scored else "")
            + f"; against training frequency Spearman rho = {fmt(s['rho'])}, 95% CI {fmt_ci(s['ci95'])}: "
            f"{CORRELATION_WORDS[s['verdict']]}. Targets by `{t['rule_name']}`: {names} ({t['selection']}).")
    pairs = m["confusion"]["top_pairs"]
    if pairs:
        text += (f" The commonest {m['vocabulary']['unit']} confusion: {pairs[0]['query_category']} asked for, an "
                 f"image with {pairs[0]['retrieved_category']} instead ranked first ({pairs[0]['count']} queries).")
    return text


def problem_markdown(m: dict) -> str:
    """The problem statement, every sentence filled in from the metrics dict, in the words the data supports."""
    rows = sorted(m["categories"], key=lambda r: (r["txt2img_R@10"] if np.isfinite(r["txt2img_R@10"]) else 9,
                                                  r["category"]))
    scored = [r for r in rows if np.isfinite(r["txt2img_R@10"])]
    ov, conf, vocab = m["overall"], m["confusion"], m["vocabulary"]
    lines = [
        "# Where does the retrieval system fail?", "",
        f"Baseline `{m['baseline_run']}` on `{m['data']}`, split `{m['eval_split']}`: "
        f"{m['n_eval_images']} images, {m['n_eval_captions']} captions; {m['n_bootstrap']} bootstrap resamples "
        f"of the {m['eval_split']} images (each with its captions).", "",
        "## Summary", "", summary_sentence(m, scored), "",
        "## Overall", "",
        "Instance level: only the described image (txt2img) or the image's own captions (img2txt) count. "
        "Category level: any item whose image shares a category of the query's image counts.", "",
        *md_table(["direction", "level", "R@1", "R@5", "R@10", "mAP / mAP@R"],
                  [row for d in ("img2txt", "txt2img") for row in (
                      [d, "instance", *(fmt(ov[d][k]) for k in ("R@1", "R@5", "R@10", "mAP"))],
                      [d, "category", *(fmt(ov["category_level"][d][k]) for k in ("R@1", "R@5", "R@10", "mAP@R"))])]),
    ]
    lines += ["", f"{fmt(vocab['shared_captions'])} of the test captions are also captions of other images; with "
              f"such ties a perfect ranking reaches an instance-level txt2img R@10 of "
              f"{fmt(m['instance_ceiling_txt2img_R@10'])}.", "", "## Does training frequency predict recall?", ""]
    for d, label in (("txt2img", "txt2img R@10"), ("img2txt", "img2txt R@10"), ("txt2img_mAP@R", "txt2img mAP@R")):
        s = m["spearman"][d]
        lines.append(f"- {label}: Spearman rho = {fmt(s['rho'])}, 95% CI {fmt_ci(s['ci95'])} over "
                     f"{s['n_categories']} categories: {CORRELATION_WORDS[s['verdict']]}.")
    if scored:
        lo, hi = scored[0], scored[-1]
        widths = [r["txt2img_R@10_ci95"][1] - r["txt2img_R@10_ci95"][0] for r in scored]
        lines.append(f"- Per-category txt2img R@10 ranges from {fmt(lo['txt2img_R@10'])} ({lo['category']}, "
                     f"{lo['train_count']} training images) to {fmt(hi['txt2img_R@10'])} ({hi['category']}, "
                     f"{hi['train_count']}); the median 95% CI width of one category is {fmt(float(np.median(widths)))}.")
    lines += ["", "## Per category (weakest txt2img R@10 first)", "",
              *md_table(["category", "train images", "test images", "txt2img R@10", "95% CI", "img2txt R@10", "hit@1",
                         "mAP@R"],
                        [[r["category"], r["train_count"], r["n_eval_images"], fmt(r["txt2img_R@10"]),
                          fmt_ci(r["txt2img_R@10_ci95"]), fmt(r["img2txt_R@10"]), fmt(r["hit@1"]),
                          fmt(r["txt2img_mAP@R"])] for r in rows])]
    mixes = (f", which instance-level R@K mixes with {', '.join(vocab['attributes'])}" if vocab["attributes"]
             else "; instance-level R@K also asks for the one image a caption was written for")
    lines += ["", f"hit@1: share of a category's txt2img queries whose top-1 image contains the category at all "
              f"({vocab['unit']} recognition{mixes}). mAP@R: category-level mean average precision over the first R "
              "ranks, R = the number of test images of the category.", "",
              "## Main confusions (txt2img top-1 errors)", ""]
    wrong = conf["n_wrong"]
    share = wrong / conf["n_queries"] if conf["n_queries"] else float("nan")
    miss = conf["n_wrong_missing"] / wrong if wrong else float("nan")
    lines.append(f"{wrong} of {conf['n_queries']} txt2img queries ({fmt(share)}) have a wrong top-1 image; in "
                 f"{conf['n_wrong_missing']} of them ({fmt(miss)}) that image lacks a category of the query's image, "
                 f"in the rest every category is present and {rest_sentence(vocab)}.")
    lines.append("")
    for p in conf["top_pairs"]:
        lines.append(f"- {p['query_category']} missing, {p['retrieved_category']} instead: {p['count']} queries "
                     f"({fmt(p['share_of_row'])} of {p['query_category']}'s substitutions)")
    if not conf["top_pairs"]:
        lines.append("- no category substitutions")
    lines += ["", "## Figures", "", "- [recall vs training frequency](recall_vs_frequency.png)",
              "- [confusion heatmap](confusion.png) ([table](confusion.csv))"]
    if m.get("umap"):
        lines.append("- [UMAP of test embeddings](umap.png)")
    t = m["targets"]
    lines += ["", "## Targets", "", f"Rule `{t['rule_name']}` ({t['rule_reason']}): {t['rule']}.", "",
              f"Statistic: {t['statistic']}. Selection: {t['selection']}.", ""]
    by_rarity = sorted(scored, key=lambda r: (r["train_count"], r["category"]))
    rarity = {r["category"]: i + 1 for i, r in enumerate(by_rarity)}
    for r in t["targets"]:
        gap = (f", {fmt(r['gap_to_others'])} from the mean of the other categories (95% CI {fmt_ci(r['gap_ci95'])}"
               f"{', separated' if r['separated'] else ', not separated'})" if r.get("gap_ci95") else "")
        rank = rarity.get(r["category"], "?")
        lines.append(f"- **{r['category']}** ({r['train_count']} training images, rank {rank} "
                     f"of {len(scored)} from the rarest): {t['metric']} {fmt(r['value'])} (95% CI "
                     f"{fmt_ci(r['value_ci95'])}){gap}; txt2img R@10 {fmt(r['txt2img_R@10'])}, img2txt R@10 "
                     f"{fmt(r['img2txt_R@10'])}, hit@1 {fmt(r['hit@1'])}, mAP@R {fmt(r['txt2img_mAP@R'])}")
    return "\n".join(lines) + "\n"


def print_summary(spearman: dict, targets: dict, run_dir: Path) -> None:
    for d in ("txt2img", "img2txt"):
        s = spearman[d]
        print(f"{d} R@10 vs training frequency: rho {fmt(s['rho'])}, 95% CI {fmt_ci(s['ci95'])} "
              f"({CORRELATION_WORDS[s['verdict']]})")
    print(f"targets ({targets['rule']}; {targets['selection']}): " + ", ".join(
        f"{r['category']} ({targets['metric']} {fmt(r['value'])}, {r['train_count']} training images)"
        for r in targets["targets"]))
    print(f"wrote {run_dir}")


# --------------------------------------------------------------------------- steps of main
def baseline_training(run: Path, data: dict) -> tuple[dict, list[dict]]:
    """The retrieval run's arguments and the images its heads were trained on (its --max-train subset, same seed)."""
    cfg = read_json(run / "config.json")["args"]
    train_split = cfg.get("train_split", "train")
    check(train_split in data["splits"], f"split {train_split!r} not in {data['pickle_path']}; it has "
                                         f"{sorted(data['splits'])}")
    return cfg, retrieval.subset(data["splits"][train_split], cfg.get("max_train", 0), cfg.get("seed", 0))


def category_metrics(emb: tuple, records: list[dict], has: np.ndarray, cat_ids: list[int], names: dict[int, str],
                     train_counts: dict, cfg: dict) -> tuple[dict, dict, dict, np.ndarray]:
    """Per-query, per-category and overall metrics at both levels (the retrieval run's own index kind).

    Returns:
        (per_q from `retrieval.retrieve_both`, per_cat, overall, (n_cap,) txt2img top-1 image of each caption).
    """
    img_emb, txt_emb, cap2img = emb
    index_kw = {"nlist": cfg.get("nlist", 64), "nprobe": cfg.get("nprobe", 8), "seed": cfg.get("seed", 0)}
    per_q = retrieval.retrieve_both(img_emb, txt_emb, cap2img, cfg.get("index", "flat"), has=has, cat_ids=cat_ids,
                                    **index_kw)
    per_cat = retrieval.per_category_metrics(per_q, records, cap2img, names, train_counts)
    overall = {d: retrieval.summarize(per_q[d]) for d in ("img2txt", "txt2img")}
    overall["category_level"] = {d: retrieval.summarize(per_q["category"][d]) for d in ("img2txt", "txt2img")}
    _, top = retrieval.search(retrieval.build_index(img_emb, cfg.get("index", "flat"), **index_kw), txt_emb, 1)
    return per_q, per_cat, overall, top[:, 0]


def frequency_vs_recall(per_q: dict, per_cat: dict, freq: np.ndarray, cat_names: list[str], cap2img: np.ndarray,
                        has: np.ndarray, args: argparse.Namespace) -> tuple[dict, np.ndarray]:
    """Spearman of training frequency vs R@10 (both directions) and vs txt2img mAP@R, bootstrapped over test
    images (same seed: the same resampled image sets); and each category's txt2img R@10 95% CI, (n_cat, 2)."""
    n_images = has.shape[0]
    sums = {"img2txt": per_image_sums(per_q["img2txt"]["R@10"], np.arange(n_images), has),
            "txt2img": per_image_sums(per_q["txt2img"]["R@10"], cap2img, has)}
    spearman, boots = {}, {}
    for d in ("txt2img", "img2txt"):
        boots[d] = cluster_bootstrap(*sums[d], args.bootstrap, args.seed)[1]
        spearman[d] = spearman_with_ci(freq, np.array([per_cat[n][d]["R@10"] for n in cat_names]), boots[d])
    map_r = per_q["category"]["txt2img"]["by_category"]["mAP@R"]
    boots["txt2img_mAP@R"] = cluster_bootstrap(*per_image_category_sums(map_r, cap2img, n_images),
                                               args.bootstrap, args.seed)[1]
    spearman["txt2img_mAP@R"] = spearman_with_ci(
        freq, np.array([per_cat[n]["category_level"]["txt2img"]["mAP@R"] for n in cat_names]), boots["txt2img_mAP@R"])
    with warnings.catch_warnings():  # all-NaN columns: categories without test images
        warnings.simplefilter("ignore")
        t2i_ci = np.nanpercentile(boots["txt2img"], [2.5, 97.5], axis=0).T
    return spearman, t2i_ci


def confusions(run_dir: Path, top1: np.ndarray, cap2img: np.ndarray, has: np.ndarray, per_cat: dict,
               t2i_ci: np.ndarray, cat_ids: list[int], cat_names: list[str]) -> tuple[np.ndarray, dict, list[dict]]:
    """Confusions among txt2img top-1 errors (confusion.csv) and per-category hit@1 and R@10 CI added to per_cat.

    Returns:
        (confusion counts, confusion summary with its top pairs, `category_rows`).
    """
    counts, conf = confusion_counts(top1, cap2img, has)
    hit1 = category_hit_at_1(top1, cap2img, has)
    write_confusion_csv(run_dir / "confusion.csv", counts, cat_names)
    for j, name in enumerate(cat_names):
        per_cat[name].update({"hit@1": float(hit1[j]), "txt2img_R@10_ci95": [float(v) for v in t2i_ci[j]],
                              "missing_in_wrong_top1": int(conf["missing_per_category"][j])})
    conf.pop("missing_per_category")
    conf["top_pairs"] = top_pairs(counts, cat_names)
    return counts, conf, category_rows(per_cat, cat_ids, cat_names)


def rank_by_rule(rows: list[dict], rule: str, per_q: dict, has: np.ndarray, cap2img: np.ndarray,
                 args: argparse.Namespace) -> None:
    """Each row's value under `rule`, its gap to the other categories with a bootstrap CI, and whether the CI
    separates it (rows are updated in place; the rarest rule uses exact counts, without CIs)."""
    values = rule_values(rule, per_q, has, cap2img)
    if values is None:  # rarest: exact counts
        for r in rows:
            r.update({"value": float(r["train_count"]), "value_ci95": None, "gap_to_others": None, "gap_ci95": None,
                      "separated": None})
        return
    boot = cluster_bootstrap(*per_image_category_sums(values[0], values[1], has.shape[0]), args.bootstrap,
                             args.seed)[1]
    point = np.array([r[RULES[rule][0]] for r in rows], dtype=np.float64)
    gap, gap_ci = separation(point, boot)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value_ci = np.nanpercentile(boot, [2.5, 97.5], axis=0).T
    for j, r in enumerate(rows):
        r.update({"value": float(point[j]), "value_ci95": [float(v) for v in value_ci[j]],
                  "gap_to_others": float(gap[j]), "gap_ci95": [float(v) for v in gap_ci[j]],
                  "separated": bool(np.isfinite(gap_ci[j, 1]) and gap_ci[j, 1] < 0)})


def figures(run_dir: Path, counts: np.ndarray, cat_names: list[str], rows: list[dict], records: list[dict],
            names: dict[int, str], emb: tuple, args: argparse.Namespace) -> dict:
    """The figures, after the results: a failing one is a warning line in the log and in metrics.json."""
    img_emb, txt_emb, cap2img = emb
    out = {"confusion.png": retrieval.optional_figure(run_dir / "confusion.png", plot_confusion, counts, cat_names),
           "recall_vs_frequency.png": retrieval.optional_figure(run_dir / "recall_vs_frequency.png",
                                                                plot_recall_vs_frequency, rows)}
    if not args.no_umap:
        first = [names[r["category_ids"][0]] if r["category_ids"] else "none" for r in records]
        out["umap.png"] = retrieval.optional_figure(run_dir / "umap.png", retrieval.plot_umap, img_emb, txt_emb,
                                                    first, [first[i] for i in cap2img], seed=args.seed)
    return out


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)

    # 1. the run to analyse (it decides the data), the data, then the run's heads (reused or trained)
    baseline = choose_run(args)
    data = load_data(args.data, [args.eval_split])
    records = data["splits"][args.eval_split]
    if args.quick:
        records = retrieval.subset(records, QUICK["eval_images"], args.seed + 1)
    cat_ids = [c["id"] for c in data["categories"]]
    names = category_names(data)
    cat_names = [names[c] for c in cat_ids]
    has = retrieval.category_matrix(records, cat_ids)
    n_scored = int(has.any(axis=0).sum())
    check(args.k_targets <= n_scored, f"--k-targets {args.k_targets} is more than the {n_scored} categories "
                                      f"with {args.eval_split} images")
    baseline = baseline or train_baseline(args)
    cfg, train = baseline_training(baseline, data)
    run = start_run("task_c", args, config=dict(vars(args), baseline_run=str(baseline)))
    with run.step("load"):
        emb = eval_embeddings(baseline, records)
        cap2img = emb[2]
        captions = retrieval.flatten_captions(records)[0]
        shared = shared_caption_share(captions, cap2img)
        rule, why = resolve_rule(args.rule, shared)

    # 2. per-category metrics at both levels next to training frequency; does frequency predict recall?
    with run.step("metrics"):
        train_counts = retrieval.image_counts(train)
        per_q, per_cat, overall, top1 = category_metrics(emb, records, has, cat_ids, names, train_counts, cfg)
        freq = np.array([train_counts.get(c, 0) for c in cat_ids], dtype=np.float64)
        spearman, t2i_ci = frequency_vs_recall(per_q, per_cat, freq, cat_names, cap2img, has, args)

    # 3. confusions among txt2img top-1 errors; targets by the rule's value and its gap to the other categories
    counts, conf, rows = confusions(run.dir, top1, cap2img, has, per_cat, t2i_ci, cat_ids, cat_names)
    rank_by_rule(rows, rule, per_q, has, cap2img, args)
    chosen, separable = pick_targets(rows, rule, args.k_targets)
    targets = targets_record(rows, chosen, separable, rule, why, args, baseline)
    write_json(run.dir / "targets.json", targets)

    # 4. problem statement and metrics, generated from the numbers above; then `latest`
    metrics = {"data": targets["data"], "baseline_run": str(baseline), "eval_split": args.eval_split,
               "n_eval_images": len(records), "n_eval_captions": int(len(cap2img)), "n_bootstrap": args.bootstrap,
               "overall": overall, "instance_ceiling_txt2img_R@10": instance_ceiling(captions, cap2img),
               "vocabulary": data_vocabulary(data, shared), "per_category": per_cat, "categories": rows,
               "spearman": spearman, "confusion": conf, "targets": targets, "umap": not args.no_umap}
    write_text(run.dir / "problem.md", problem_markdown(metrics))
    run.finish(metrics)

    # 5. figures, after the results: a failing one is a warning line in the log and in metrics.json
    with run.step("figures"):
        metrics["figures"] = figures(run.dir, counts, cat_names, rows, records, names, emb, args)
    metrics["timings"]["figures_s"] = run.timings["figures_s"]
    write_json(run.dir / "metrics.json", metrics)
    print_summary(spearman, targets, run.dir)
    return metrics


if __name__ == "__main__":
    cli(main)
