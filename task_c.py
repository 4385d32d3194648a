"""Task C: where does the retrieval system fail, and which categories should a fix target?

Loads the retrieval baseline (or trains one when none fits the data), measures each category's
img2txt / txt2img quality on the test split next to its training-set frequency, tests whether
frequency predicts recall (Spearman, 95% bootstrap CI over test images), shows which shapes are
mistaken for which (confusion of txt2img top-1 errors), picks the k weakest categories by a stated
rule, and writes a problem statement generated from those numbers.

Quick (well under a minute; trains a small baseline when the run below does not fit the data):
    python task_c.py --quick
Full (reuses the trained baseline: ~10 s on 2 cores, plus ~20 s for the UMAP):
    python task_c.py --retrieval-run outputs/retrieval/baseline --run-name baseline
Writes outputs/task_c/<run_name>/: problem.md, targets.json, metrics.json, confusion.csv,
confusion.png, recall_vs_frequency.png, umap.png (not with --quick / --no-umap).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import retrieval
from utils import (DEFAULT_DATA, category_names, check, cli, finish_run, fmt, fmt_ci, load_data, make_run_dir, pyplot,
                   read_json, write_json, write_text)

# How each --rule ranks categories (lowest first), the metric it ranks by, and what it means in words.
RULES: dict[str, tuple[Callable[[dict], float], str, str]] = {
    "bottom-txt2img-R@10": (lambda c: c["txt2img"]["R@10"], "txt2img_R@10",
                            "the {k} categories with the lowest txt2img Recall@10 on the {split} split"),
    "bottom-img2txt-R@10": (lambda c: c["img2txt"]["R@10"], "img2txt_R@10",
                            "the {k} categories with the lowest img2txt Recall@10 on the {split} split"),
    "rarest": (lambda c: c["train_count"], "train_count",
               "the {k} categories in the fewest training images (ties: lower txt2img Recall@10 first)"),
}
QUICK_EVAL_IMAGES = 200
QUICK_BOOTSTRAP = 100
TOP_PAIRS = 5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA),
                   help="data.pkl from generate_data.py (shapes world or --source coco)")
    p.add_argument("--retrieval-run", default="outputs/retrieval/latest",
                   help="retrieval run folder with heads.pt; a fresh baseline is trained when it has none or "
                        "was trained on other data")
    p.add_argument("--eval-split", default="test", help="split the failures are measured on")
    p.add_argument("--k-targets", type=int, default=3, help="number of target categories to pick (1..categories)")
    p.add_argument("--rule", default="bottom-txt2img-R@10", help=f"how targets are chosen: {', '.join(RULES)}")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test images (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap, the UMAP and any baseline trained here")
    p.add_argument("--run-name", default=None, help="run folder name under outputs/task_c (default: timestamp)")
    p.add_argument("--outputs", default="outputs", help="outputs root")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: quick baseline if one is trained, {QUICK_EVAL_IMAGES} test images, "
                        f"{QUICK_BOOTSTRAP} resamples, no UMAP")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP figure (saves ~20 s)")
    args = p.parse_args(argv)
    if args.quick:
        args.bootstrap = min(args.bootstrap, QUICK_BOOTSTRAP)
        args.no_umap = True
    args.run_name = args.run_name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    check(args.rule in RULES, f"unknown --rule {args.rule!r}; choose one of {', '.join(RULES)}")
    check(args.k_targets >= 1, f"--k-targets must be >= 1, got {args.k_targets}")
    check(args.bootstrap >= 1, f"--bootstrap must be >= 1, got {args.bootstrap}")
    check(Path(args.data).is_file(), f"data file not found: {args.data} (run `python generate_data.py` first)")


# --------------------------------------------------------------------------- 1. baseline and embeddings
def fits_data(run: Path, data_path: str) -> bool:
    """Whether a retrieval run folder has heads and was trained on `data_path`."""
    if not (run / "heads.pt").is_file() or not (run / "config.json").is_file():
        return False
    trained_on = read_json(run / "config.json").get("args", {}).get("data")
    return trained_on is not None and Path(trained_on).resolve() == Path(data_path).resolve()


def baseline_run(args: argparse.Namespace) -> Path:
    """The retrieval run to analyse: --retrieval-run when it fits --data, else a freshly trained baseline."""
    run = Path(args.retrieval_run)
    if fits_data(run, args.data):
        return run.resolve()
    # Prefixed so a task_c run name never overwrites a retrieval run of the same name.
    name = f"task_c-{args.run_name}"
    print(f"{run} has no heads trained on {args.data}: training a baseline as retrieval run {name!r}")
    retrieval.main(["--data", args.data, "--seed", str(args.seed), "--run-name", name, "--outputs", args.outputs,
                    "--no-umap", *(["--quick"] if args.quick else [])])
    return (Path(args.outputs) / "retrieval" / name).resolve()


def eval_embeddings(run: Path, records: list[dict]):
    """(image embeddings, caption embeddings, cap2img) of `records` under the run's heads (features cached)."""
    heads, meta = retrieval.load_heads(run / "heads.pt")
    fx = retrieval.FeatureExtractor(meta["image_encoder"], meta["text_encoder"], meta.get("image_res", 0))
    img_f, txt_f, cap2img = retrieval.split_features(fx, records)
    return retrieval.embed(heads, "image", img_f), retrieval.embed(heads, "text", txt_f), cap2img


def category_matrix(records: list[dict], cat_ids: Sequence[int]) -> np.ndarray:
    """(n_images, n_categories) bool: does image i contain category j."""
    col = {cid: j for j, cid in enumerate(cat_ids)}
    has = np.zeros((len(records), len(cat_ids)), dtype=bool)
    for i, rec in enumerate(records):
        for cid in rec["category_ids"]:
            if cid in col:
                has[i, col[cid]] = True
    return has


# --------------------------------------------------------------------------- 3. frequency vs recall
def per_image_sums(hits: np.ndarray, owner: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum of per-query hits and number of queries per image (a query belongs to the image it is about)."""
    return (np.bincount(owner, weights=hits, minlength=n_images).astype(np.float64),
            np.bincount(owner, minlength=n_images).astype(np.float64))


def bootstrap_category_recall(hit_sum: np.ndarray, n_queries: np.ndarray, has: np.ndarray, n_boot: int,
                              seed: int) -> np.ndarray:
    """Per-category recall on `n_boot` resamples of the test images, drawn with replacement.

    An image is resampled together with all its queries (itself for img2txt, its captions for
    txt2img): the 5 captions of one image are not independent queries.

    Args:
        hit_sum: (n_img,) hits summed over each image's queries.
        n_queries: (n_img,) queries per image.
        has: (n_img, n_cat) bool category membership.
        n_boot: number of resamples.
        seed: seed of the numpy Generator.

    Returns:
        (n_boot, n_cat) recall; NaN where a resample has no query of a category.
    """
    rng = np.random.default_rng(seed)
    n = len(hit_sum)
    weights = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(np.float64)
    has = has.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ (hit_sum[:, None] * has)) / (weights @ (n_queries[:, None] * has))


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
        boot: (n_boot, n_cat) from `bootstrap_category_recall`.
    """
    keep = np.isfinite(recall)
    rho = _spearman(freq[keep], recall[keep])
    rhos = np.array([_spearman(freq[keep], b[keep]) for b in boot])
    rhos = rhos[np.isfinite(rhos)]
    ci = [float(v) for v in np.percentile(rhos, [2.5, 97.5])] if len(rhos) else [float("nan")] * 2
    return {"rho": rho, "ci95": ci, "n_categories": int(keep.sum()), "n_resamples": int(len(rhos))}


def describe_correlation(stats: dict) -> str:
    """What a Spearman estimate and its CI say, in words derived from their signs."""
    lo, hi = stats["ci95"]
    if not np.isfinite(stats["rho"]) or not np.isfinite(lo):
        return "undefined (fewer than 3 categories with test queries, or constant recall)"
    if lo > 0:
        return "CI above 0: categories seen more often in training are retrieved better"
    if hi < 0:
        return "CI below 0: categories seen more often in training are retrieved worse"
    return "CI includes 0: no evidence that training frequency predicts recall"


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
TARGET_KEYS = ("category", "category_id", "train_count", "txt2img_R@10", "img2txt_R@10", "hit@1", "txt2img_R@10_ci95")


def category_rows(per_cat: dict[str, dict], cat_ids: Sequence[int], cat_names: Sequence[str]) -> list[dict]:
    """One flat row per category (the fields of targets.json, plus n_eval_images), in category order."""
    return [{"category": name, "category_id": cid, "train_count": per_cat[name]["train_count"],
             "n_eval_images": per_cat[name]["n_eval_images"], "txt2img_R@10": per_cat[name]["txt2img"]["R@10"],
             "img2txt_R@10": per_cat[name]["img2txt"]["R@10"], "hit@1": per_cat[name]["hit@1"],
             "txt2img_R@10_ci95": per_cat[name]["txt2img_R@10_ci95"]} for cid, name in zip(cat_ids, cat_names)]


def targets_record(rows: list[dict], chosen: Sequence[str], args: argparse.Namespace, run: Path) -> dict:
    """The content of targets.json: the rule in words, the metric it ranks by and the chosen categories."""
    by_name = {r["category"]: r for r in rows}
    return {"rule": RULES[args.rule][2].format(k=args.k_targets, split=args.eval_split), "rule_name": args.rule,
            "metric": RULES[args.rule][1], "k": args.k_targets,
            "targets": [{k: by_name[n][k] for k in TARGET_KEYS} for n in chosen],
            "baseline_run": str(run), "data": str(Path(args.data).resolve())}


def pick_targets(per_cat: dict[str, dict], rule: str, k: int) -> list[str]:
    """The k lowest-ranked categories under `rule`, among those with test queries.

    Ties go to the lower txt2img R@10, then the rarer category, then the name, so the choice is
    deterministic.

    Args:
        per_cat: name -> row with train_count, n_eval_images, img2txt/txt2img {"R@10": ...}.
        rule: a key of RULES.
        k: number of targets.
    """
    value = RULES[rule][0]
    names = [n for n in per_cat if per_cat[n].get("n_eval_images", 1) > 0 and np.isfinite(value(per_cat[n]))]
    return sorted(names, key=lambda n: (value(per_cat[n]), per_cat[n]["txt2img"]["R@10"],
                                        per_cat[n]["train_count"], n))[:k]


# --------------------------------------------------------------------------- 7. problem statement


def summary_sentence(m: dict, scored: list[dict]) -> str:
    """One paragraph stating the problem: frequency effect or not, the targets, the commonest confusion."""
    s = m["spearman"]["txt2img"]
    targets = m["targets"]["targets"]
    names = ", ".join(f"{r['category']} ({r['train_count']} training images)" for r in targets)
    text = (f"txt2img R@10 is {fmt(m['overall']['txt2img']['R@10'])} overall"
            + (f" and {fmt(scored[0]['txt2img_R@10'])}-{fmt(scored[-1]['txt2img_R@10'])} across categories" if scored
               else "")
            + f"; against training frequency Spearman rho = {fmt(s['rho'])}, 95% CI {fmt_ci(s['ci95'])}: "
            f"{describe_correlation(s)}. Targets by `{m['targets']['rule_name']}`: {names}.")
    pairs = m["confusion"]["top_pairs"]
    if pairs:
        text += (f" The commonest shape confusion: {pairs[0]['query_category']} asked for, an image with "
                 f"{pairs[0]['retrieved_category']} instead ranked first ({pairs[0]['count']} queries).")
    return text


def problem_markdown(m: dict) -> str:
    """The problem statement, every sentence filled in from the metrics dict."""
    rows = sorted(m["categories"], key=lambda r: (r["txt2img_R@10"] if np.isfinite(r["txt2img_R@10"]) else 9,
                                                  r["category"]))
    scored = [r for r in rows if np.isfinite(r["txt2img_R@10"])]
    ov, conf = m["overall"], m["confusion"]
    lines = [
        "# Where does the retrieval system fail?", "",
        f"Baseline `{m['baseline_run']}` on `{m['data']}`, split `{m['eval_split']}`: "
        f"{m['n_eval_images']} images, {m['n_eval_captions']} captions; {m['n_bootstrap']} bootstrap resamples "
        f"of the {m['eval_split']} images (each with its captions).", "",
        "## Summary", "", summary_sentence(m, scored), "",
        "## Overall", "",
        "| direction | R@1 | R@5 | R@10 | mAP |", "|---|---|---|---|---|",
        *(f"| {d} | " + " | ".join(fmt(ov[d][k]) for k in ("R@1", "R@5", "R@10", "mAP")) + " |"
          for d in ("img2txt", "txt2img")), "",
        "## Does training frequency predict recall?", "",
    ]
    for d in ("txt2img", "img2txt"):
        s = m["spearman"][d]
        lines.append(f"- {d} R@10: Spearman rho = {fmt(s['rho'])}, 95% CI {fmt_ci(s['ci95'])} over "
                     f"{s['n_categories']} categories: {describe_correlation(s)}.")
    if scored:
        lo, hi = scored[0], scored[-1]
        widths = [r["txt2img_R@10_ci95"][1] - r["txt2img_R@10_ci95"][0] for r in scored]
        lines.append(f"- Per-category txt2img R@10 ranges from {fmt(lo['txt2img_R@10'])} ({lo['category']}, "
                     f"{lo['train_count']} training images) to {fmt(hi['txt2img_R@10'])} ({hi['category']}, "
                     f"{hi['train_count']}); the median 95% CI width of one category is {fmt(float(np.median(widths)))}.")
    lines += ["", "## Per category (weakest txt2img R@10 first)", "",
              "| category | train images | test images | txt2img R@10 | 95% CI | img2txt R@10 | hit@1 |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['category']} | {r['train_count']} | {r['n_eval_images']} | {fmt(r['txt2img_R@10'])} | "
                     f"{fmt_ci(r['txt2img_R@10_ci95'])} | {fmt(r['img2txt_R@10'])} | {fmt(r['hit@1'])} |")
    lines += ["", "hit@1: share of a category's txt2img queries whose top-1 image contains the category at all "
              "(shape recognition, which R@K mixes with colour, size, count and position).", "",
              "## Main confusions (txt2img top-1 errors)", ""]
    wrong = conf["n_wrong"]
    share = wrong / conf["n_queries"] if conf["n_queries"] else float("nan")
    miss = conf["n_wrong_missing"] / wrong if wrong else float("nan")
    lines.append(f"{wrong} of {conf['n_queries']} txt2img queries ({fmt(share)}) have a wrong top-1 image; in "
                 f"{conf['n_wrong_missing']} of them ({fmt(miss)}) that image lacks a category of the query's image, "
                 "in the rest every category is present and the error lies in colour, size, count or position.")
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
    lines += ["", "## Targets", "", f"Rule `{t['rule_name']}`: {t['rule']}.", ""]
    t2i_all = ov["txt2img"]["R@10"]
    rarity = {r["category"]: i + 1 for i, r in enumerate(sorted(scored, key=lambda r: (r["train_count"], r["category"])))}
    for r in t["targets"]:
        upper = "upper bound below" if r["txt2img_R@10_ci95"][1] < t2i_all else "reaches"
        lines.append(f"- **{r['category']}** ({r['train_count']} training images, rank {rarity[r['category']]} of "
                     f"{len(scored)} from the rarest): txt2img R@10 {fmt(r['txt2img_R@10'])} (95% CI "
                     f"{fmt_ci(r['txt2img_R@10_ci95'])}, {upper} the overall {fmt(t2i_all)}), img2txt R@10 "
                     f"{fmt(r['img2txt_R@10'])}, hit@1 {fmt(r['hit@1'])}")
    return "\n".join(lines) + "\n"


def print_summary(spearman: dict, targets: dict, run_dir: Path) -> None:
    for d in ("txt2img", "img2txt"):
        s = spearman[d]
        print(f"{d} R@10 vs training frequency: rho {fmt(s['rho'])}, 95% CI {fmt_ci(s['ci95'])} "
              f"({describe_correlation(s)})")
    print(f"targets ({targets['rule']}): " + ", ".join(
        f"{r['category']} (txt2img R@10 {fmt(r['txt2img_R@10'])}, {r['train_count']} training images)"
        for r in targets["targets"]))
    print(f"wrote {run_dir}")


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    timings: dict[str, float] = {}

    # 1. data, the baseline's heads (reused or trained) and test embeddings
    data = load_data(args.data, [args.eval_split])
    records = data["splits"][args.eval_split]
    if args.quick:
        records = retrieval.subset(records, QUICK_EVAL_IMAGES, args.seed + 1)
    cat_ids = [c["id"] for c in data["categories"]]
    names = category_names(data)
    cat_names = [names[c] for c in cat_ids]
    has = category_matrix(records, cat_ids)
    n_scored = int(has.any(axis=0).sum())
    check(args.k_targets <= n_scored, f"--k-targets {args.k_targets} is more than the {n_scored} categories "
                                      f"with {args.eval_split} images")
    run = baseline_run(args)
    cfg = read_json(run / "config.json")["args"]
    train_split = cfg.get("train_split", "train")
    check(train_split in data["splits"], f"split {train_split!r} not in {args.data}; it has {sorted(data['splits'])}")
    # The images the heads were trained on (retrieval.py's --max-train subset, same seed).
    train = retrieval.subset(data["splits"][train_split], cfg.get("max_train", 0), cfg.get("seed", 0))
    run_dir = make_run_dir("task_c", args.run_name, dict(vars(args), baseline_run=str(run)), args.outputs)
    img_emb, txt_emb, cap2img = eval_embeddings(run, records)
    timings["load_s"] = round(time.time() - t0, 2)

    # 2. per-category metrics next to training frequency (the retrieval run's own index kind)
    t = time.time()
    index_kw = {"nlist": cfg.get("nlist", 64), "nprobe": cfg.get("nprobe", 8), "seed": cfg.get("seed", 0)}
    per_q = retrieval.retrieve_both(img_emb, txt_emb, cap2img, cfg.get("index", "flat"), **index_kw)
    train_counts = retrieval.image_counts(train)
    per_cat = retrieval.per_category_metrics(per_q, records, cap2img, names, train_counts)
    overall = {d: retrieval.summarize(per_q[d]) for d in ("img2txt", "txt2img")}
    _, top = retrieval.search(retrieval.build_index(img_emb, cfg.get("index", "flat"), **index_kw), txt_emb, 1)
    top1 = top[:, 0]

    # 3. does frequency predict recall? bootstrap over test images
    freq = np.array([train_counts.get(c, 0) for c in cat_ids], dtype=np.float64)
    sums = {"img2txt": (per_q["img2txt"]["R@10"], np.ones(len(records))),
            "txt2img": per_image_sums(per_q["txt2img"]["R@10"], cap2img, len(records))}
    spearman, boots = {}, {}
    for d in ("txt2img", "img2txt"):
        # Same seed for both directions: the same resampled image sets, so the two CIs are comparable.
        boots[d] = bootstrap_category_recall(*sums[d], has, args.bootstrap, args.seed)
        recall = np.array([per_cat[n][d]["R@10"] for n in cat_names])
        spearman[d] = spearman_with_ci(freq, recall, boots[d])
    with warnings.catch_warnings():  # all-NaN columns: categories without test images
        warnings.simplefilter("ignore")
        t2i_ci = np.nanpercentile(boots["txt2img"], [2.5, 97.5], axis=0).T
    timings["metrics_s"] = round(time.time() - t, 2)

    # 4. confusions among txt2img top-1 errors, and per-category hit@1
    counts, conf = confusion_counts(top1, cap2img, has)
    hit1 = category_hit_at_1(top1, cap2img, has)
    write_confusion_csv(run_dir / "confusion.csv", counts, cat_names)
    for j, name in enumerate(cat_names):
        per_cat[name].update({"hit@1": float(hit1[j]), "txt2img_R@10_ci95": [float(v) for v in t2i_ci[j]],
                              "missing_in_wrong_top1": int(conf["missing_per_category"][j])})
    conf.pop("missing_per_category")
    rows = category_rows(per_cat, cat_ids, cat_names)
    conf["top_pairs"] = top_pairs(counts, cat_names)

    # 5. figures
    t = time.time()
    plot_confusion(counts, cat_names, run_dir / "confusion.png")
    plot_recall_vs_frequency(rows, run_dir / "recall_vs_frequency.png")
    if not args.no_umap:
        first = [names[r["category_ids"][0]] if r["category_ids"] else "none" for r in records]
        retrieval.plot_umap(img_emb, txt_emb, first, [first[i] for i in cap2img], run_dir / "umap.png", args.seed)
    timings["figures_s"] = round(time.time() - t, 2)

    # 6. targets: the k weakest categories by the rule
    chosen = pick_targets(per_cat, args.rule, args.k_targets)
    targets = targets_record(rows, chosen, args, run)
    write_json(run_dir / "targets.json", targets)

    # 7. problem statement and metrics, generated from the numbers above
    metrics = {"data": targets["data"], "baseline_run": str(run), "eval_split": args.eval_split,
               "n_eval_images": len(records), "n_eval_captions": int(len(cap2img)), "n_bootstrap": args.bootstrap,
               "overall": overall, "per_category": per_cat, "categories": rows, "spearman": spearman,
               "confusion": conf, "targets": targets, "umap": not args.no_umap}
    write_text(run_dir / "problem.md", problem_markdown(metrics))
    timings["total_s"] = round(time.time() - t0, 2)
    metrics["timings"] = timings
    finish_run(run_dir, metrics)
    print_summary(spearman, targets, run_dir)
    return metrics


if __name__ == "__main__":
    cli(main)
