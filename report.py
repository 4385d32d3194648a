"""The study on one page: collect every task's latest numbers into outputs/REPORT.md.

Reads `outputs/<task>/latest/metrics.json` of each step of the study (retrieval baseline, task_a ... task_e,
bench) and the study generator's `models/shapes-sd-tiny-f2/metrics.json` (utils.STUDY_MODEL), states the headline
results in sentences filled in from those numbers, shows its key figures and links its own tables and figures. A
step that has not run yet is listed as missing; nothing here is typed in by hand. With --readme it also fills every
measured-number block of the README, each between `<!-- name -->` and `<!-- /name -->`, from its metrics file:
`study-numbers` (outputs/<task>/latest), `retrieval-numbers` (outputs/retrieval/latest), `oracle-numbers`
(models/shapes-oracle) and `model-numbers` (models/*/metrics.json of the diffusion models). A block whose
metrics file is missing is left as it is, with a one-line note on stderr.

    python report.py                      # after the study's steps
    python report.py --readme README.md   # what `make demo` runs last
    python report.py --outputs outputs --out outputs/REPORT.md --readme README.md
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from oracle import TARGETS as ORACLE_TARGETS, target_met
from retrieval import headline_table
from utils import (FIDELITY_TARGETS, MODEL_REGISTRY, REPO, STUDY_MODEL, check, cli, common_args, fmt, fmt_ci, fmt_delta,
                   fmt_est, md_table, read_json, repo_path, resolve_model, total_unet_steps, write_text)

TASKS = ("retrieval", "task_a", "task_b", "task_c", "task_d", "task_e", "bench")
TITLES = {
    "retrieval": "Retrieval baseline (`retrieval.py`)",
    "task_a": "a. Open models side by side (`task_a.py`)",
    "task_b": "b. Inference parameters, measured (`task_b.py`)",
    "task_c": "c. Where retrieval fails (`task_c.py`)",
    "task_d": "d. The fix: targeted synthetic images (`task_d.py`)",
    "task_e": "e. Generative AI applied: imagine-then-retrieve and editing (`task_e.py`)",
    "bench": "Benchmarks (`bench.py`)",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="folder of the model that generated task_d's images (its metrics.json; default: the --model "
                        "of task_d's latest run, from its config.json, else the study's generator utils.STUDY_MODEL)")
    p.add_argument("--out", default=None, help="report path (default: <outputs>/REPORT.md)")
    p.add_argument("--readme", default=None,
                   help="a README whose measured-number blocks (<!-- study-numbers -->, retrieval-numbers, "
                        "oracle-numbers, model-numbers) to fill (default: none)")
    p.add_argument("--models", default=str(REPO / "models"),
                   help="folder of the model folders whose metrics.json fill the oracle-numbers and model-numbers blocks")
    common_args(p, "report", omit=("run_name", "device", "threads", "seed", "quick", "wandb"),
                helps={"outputs": "outputs root holding <task>/latest/"})
    args = p.parse_args(argv)
    check(Path(args.outputs).is_dir(), f"outputs folder not found: {args.outputs} (run `make demo` first)")
    args.out = Path(args.out or Path(args.outputs) / "REPORT.md")
    args.model = args.model or generator_folder(Path(args.outputs))
    check(args.readme is None or Path(args.readme).is_file(), f"README not found: {args.readme}")
    return args


def generator_folder(outputs: Path) -> str:
    """The folder of the model that generated task_d's latest images: its run's `--model` (config.json), resolved by
    the registry; the study's generator (utils.STUDY_MODEL) when task_d has not run or used a hub id."""
    config = outputs / "task_d" / "latest" / "config.json"
    name = read_json(config).get("args", {}).get("model", STUDY_MODEL) if config.is_file() else STUDY_MODEL
    if name in MODEL_REGISTRY or Path(name).is_dir():
        folder = Path(resolve_model(name)["id"])
        if folder.is_dir():
            return str(folder)
    return resolve_model(STUDY_MODEL)["id"]


# --------------------------------------------------------------------------- formatting
def links(run: Path, root: Path) -> str:
    """Markdown links to a run's tables and figures, relative to the report."""
    files = sorted(p for p in run.iterdir() if p.suffix in (".md", ".png", ".gif", ".csv") and p.is_file())
    return " · ".join(f"[{p.name}]({os.path.relpath(p, root)})" for p in files) or "no files"


# --------------------------------------------------------------------------- one summary per task
def retrieval_summary(m: dict) -> list[str]:
    rows = md_table(["direction", "R@1", "R@5", "R@10", "mAP"],
                    [[d, *(fmt(m[d][k]) for k in ("R@1", "R@5", "R@10", "mAP"))] for d in ("img2txt", "txt2img")])
    return [f"{m['n_train_images']} training images, evaluated on {m['n_eval_images']} test images and "
            f"{m['n_eval_captions']} captions.", ""] + rows


def task_c_summary(m: dict) -> list[str]:
    s = m["spearman"]["txt2img"]
    targets = ", ".join(t["category"] for t in m["targets"]["targets"])
    return [f"Spearman rho between a category's training frequency and its txt2img R@10: {fmt(s['rho'])} "
            f"(95% CI {fmt_ci(s['ci95'])}, {s['n_categories']} categories). Targets chosen by "
            f"`{m['targets']['rule_name']}`: **{targets}**."]


def task_a_summary(m: dict) -> list[str]:
    rows = md_table(["model", "params (M)", "s/image", "peak MB", "fidelity [95% CI]", "FD (floor)"],
                    [[name, f"{r['params']['total'] / 1e6:.2f}", fmt(r["sec_per_image"]), f"{r['peak_mem_mb']:.0f}",
                      f"{fmt(r['fidelity'])} {fmt_ci(r.get('fidelity_ci95'))}",
                      f"{r['fd']:.1f} ({r['fd_real_vs_real']:.1f})" if r.get("fd") is not None else "n/a"]
                     for name, r in m["models"].items()])
    return [f"{m['n_images']} images per model ({m['fidelity_metric']}, {m['device']})."] + [""] + rows


def _best_sentence(cells: list[dict]) -> str:
    """'best <label> 0.406 [0.312, 0.469] (k of the other n inside its CI)' over cells that can change the image."""
    ranked = [c for c in cells if c.get("fidelity_mean") is not None and "no_effect" not in c]
    if not ranked:
        return "no ranked cell"
    best = max(ranked, key=lambda c: c["fidelity_mean"])
    inside = sum(best["fidelity_ci95"][0] <= c["fidelity_mean"] for c in ranked) - 1
    return (f"best {best['label']}, {fmt(best['fidelity_mean'])} {fmt_ci(best['fidelity_ci95'])} ({inside} of the "
            f"other {len(ranked) - 1} inside its CI)")


def task_b_summary(m: dict) -> list[str]:
    exps = m["experiments"]
    cells = [c for name, cs in exps.items() if name != "negative" for c in cs if c.get("fidelity_mean") is not None]
    if not cells and not exps.get("negative") and not exps.get("trajectory"):
        return ["No scored cells."]
    no_effect = [c for cs in exps.values() for c in cs if "no_effect" in c]
    spacings = sorted({str(c["timestep_spacing"]) for cs in exps.values() for c in cs if c.get("timestep_spacing")})
    lines = [f"{len(cells)} scored cells ({', '.join(exps)}), each {m['n_prompts']} prompts x {m['n_seeds']} seeds, "
             f"fidelity = oracle `{m['fidelity_key']}`; schedulers built with timestep spacing "
             f"{', '.join(spacings) or 'n/a'}; {len(no_effect)} cells cannot change the image and are not ranked. "
             "The conclusions are in findings.md.", ""]
    for name in ("schedulers", "steps", "student", "cfg", "grid"):
        if exps.get(name):
            lines.append(f"- {name}: {_best_sentence(exps[name])}.")
    eta = [c for c in exps.get("eta", []) if c.get("fidelity_mean") is not None]
    if eta:
        lines.append(f"- eta (DDIM, {eta[0]['num_inference_steps']} steps): " + ", ".join(
            f"eta {c['eta']:g} {fmt(c['fidelity_mean'])} {fmt_ci(c['fidelity_ci95'])}"
            + (" (no effect)" if "no_effect" in c else "") for c in eta) + ".")
    neg = exps.get("negative", [])
    if len(neg) == 2:
        off, on = neg
        lines.append(f"- negative prompt (the colour drawn most for each shape): that colour's rate "
                     f"{fmt(off['negative_colour_rate'])} -> {fmt(on['negative_colour_rate'])}, a drop of "
                     f"{fmt(on['colour_rate_drop'])} {fmt_ci(on['colour_rate_drop_ci95'])}; shape present "
                     f"{fmt(off['fidelity_mean'])} -> {fmt(on['fidelity_mean'])}"
                     + (f" (no effect: {on['no_effect']})" if "no_effect" in on else "") + ".")
    ranked = [c for c in cells if "no_effect" not in c and c.get("sec_per_image") is not None]
    if ranked:
        fastest = min(ranked, key=lambda c: c["sec_per_image"])
        calls = fastest.get("timed_calls", m.get("time_repeats", 1))  # cells cached before timed_calls: repeats only
        lines.append(f"- fastest: {fastest['label']} at {fmt(fastest['sec_per_image'])} s/image (fidelity "
                     f"{fmt(fastest['fidelity_mean'])}), the fastest of its {calls} timed calls.")
    if exps.get("trajectory"):
        lines.append(f"- trajectory: the predicted clean image at every step for {len(exps['trajectory'])} "
                     "schedulers (below).")
    return lines


def task_b_figures(m: dict, run: str) -> list[str]:
    """The key figures inline: fidelity vs steps, the Pareto front and every trajectory filmstrip."""
    shown = [f for f in ("fidelity_vs_steps.png", "pareto.png") if f in m.get("figures", [])]
    lines = [f"![{Path(f).stem}]({run}/{f})" for f in shown]
    lines += [f"![trajectory {c['label']}]({run}/{c['filmstrip']})" for c in m["experiments"].get("trajectory", [])]
    return [line for pair in zip(lines, [""] * len(lines)) for line in pair]


def task_d_summary(m: dict) -> list[str]:
    check(isinstance(m.get("targets_met", []), list),
          "task_d's metrics.json predates the target records (targets_met is not a list): rerun `python task_d.py`")
    gap = next((r for r in m.get("targets_met", []) if r["target"] == "gap_closed"), None)
    verdict = ("not judged" if gap is None or gap["met"] is None else "met" if gap["met"] else "not met")
    target = f"closes ≥ {gap['threshold']:.0%} of the gap with the CI above 0" if gap else "no target recorded"
    acceptance = (f"Filter acceptance {fmt(m['filter']['acceptance_rate'])} ({m['filter']['rule']}). "
                  if m.get("filter") else "No filter (no generated arm). ")
    return [acceptance + f"`synthetic_filtered` − `baseline`, txt2img R@10 on the target categories: "
            f"{fmt_delta(m['rare_txt2img_R@10_delta'])} (target: {target}: {verdict}); overall: "
            f"{fmt_delta(m['overall_txt2img_R@10_delta'])}; filtered − oversample on the targets: "
            f"{fmt_delta((m.get('filtered_vs_oversample') or {}).get('rare'))}"
            + (f"; recaptioned (the same images, captions from the oracle's reading) − baseline on the targets: "
               f"{fmt_delta(m['deltas']['synthetic_recaptioned']['rare'])}, − oversample: "
               f"{fmt_delta(m['vs_oversample']['synthetic_recaptioned']['rare'])}"
               if "synthetic_recaptioned" in m.get("vs_oversample", {}) else "")
            + f". Seeds {m['seeds']}, {m['epochs']} epochs per arm."]


def task_e_summary(m: dict) -> list[str]:
    k = str(m["k_max"])
    lines = []
    for subset, r in m["retrieval"].items():
        if r["n"] == 0:  # a subset none of the drawn queries fell in has no numbers
            lines.append(f"- {subset}: no queries drawn")
            continue
        w = r["weighted"][k]["R@10"]
        lines.append(f"- {subset} ({r['n']} queries): text-only R@10 {fmt(r['text']['R@10']['mean'])}; weighted "
                     f"fusion with k = {k} images (w = {m['fusion']['weighted'][k]['w']} chosen on val; 0 = "
                     f"text only): ΔR@10 {fmt_delta({'mean': w['delta'], 'ci95': w['delta_ci95']})}")
    added = f"- added cost {m['cost']['added_s_per_query']['weighted'][k]:.2f} s per query at k = {k}; "
    editing = m.get("editing")
    if not editing or not editing.get("by_method"):  # `--n-edits 0` skips editing: metrics hold `editing: null`
        lines.append(added + "editing not run (--n-edits 0)")
        return lines
    best = editing["best"]
    lines.append(added + f"editing success at the best method and strength ({best['method']}, {best['strength']}): "
                 f"{fmt(best['success']['rate'])} {fmt_ci(best['success']['ci95'])} of {best['n']} edits")
    return lines


def equal_fidelity_basis(g: dict) -> str:
    """How many prompts bench's equal-fidelity verdict rests on, and whether they are too few to show it: below
    1 / tolerance prompts one image moves a score by more than the tolerance, so "equal" only means the same readings
    on a handful of images (the quick form's 2)."""
    row = next((r for r in g["configs"] if r["config"] == g["fastest_equal_fidelity_config"]), {})
    n = g["n_images"] + row.get("more_prompts", {}).get("n_prompts", 0)
    few = n * g["fidelity_tolerance"] < 1
    return f" (fidelity compared on {n} prompts" + ("; too few to show equal fidelity)" if few else ")")


def bench_summary(m: dict) -> list[str]:
    """The speed section: the measured ratios, the share of the machine's peak FLOP/s, the index scale table."""
    hw = m["hardware"]
    lines = [f"{hw['cpu']}, {hw['cores_usable']} cores, GPU {hw['gpu'] or 'none'}"
             + (" (contended: other work shared the CPU)" if hw.get("contended") else "")
             + ". Ratios measured side by side (fastest of the repeats): "
             + ", ".join(f"{k} ×{v:.2f}" + (equal_fidelity_basis(m["generation"]) if k == "generation_at_equal_fidelity"
                                             else "")
                         for k, v in m["ratios"].items() if v is not None) + "."]
    lim = m.get("limit")
    if lim:
        best = next((r for r in lim.get("configs", []) if r["config"] == lim["best_config"]), {})
        bf16 = best.get("precision") == "bf16"
        ours_peak = lim["peak"]["peak_flops_per_s_bf16" if bf16 else "peak_flops_per_s"] / 1e9
        lines += ["", f"The limit: the UNet's FLOPs per image × images/s reach {lim['plain']:.1%} of this machine's "
                      f"measured fp32 peak ({lim['peak']['peak_flops_per_s'] / 1e9:.1f} GFLOP/s) on the plain "
                      f"diffusers path and {lim['ours']:.1%} on ours (`{lim['best_config']}`"
                      + (f", of the bf16 peak {ours_peak:.1f} GFLOP/s" if bf16 else "") + ")."]
    r = m.get("retrieval")
    if r and r.get("scale"):
        data = r["scale_data"]
        rows = [[f"{row['n']:,}", row["index"], fmt(row["build_s"], ".2f"), fmt(row["search_s"], ".3f"),
                 "exact" if row["index"] == "flat" else fmt(row[f"recall@{row['k']}"])]
                for row in r["scale"] if "skipped" not in row]
        lines += ["", f"Approximate indexes on {data['n_base']:,} retrieval embeddings replicated with noise "
                      f"{data['noise']} ({data['source']}), held-out caption queries:", "",
                  *md_table(["n", "index", "build s", "search s", "recall@10 vs flat"], rows)]
    return lines


SUMMARIES: dict[str, Callable[[dict], list[str]]] = {
    "retrieval": retrieval_summary, "task_a": task_a_summary, "task_b": task_b_summary, "task_c": task_c_summary,
    "task_d": task_d_summary, "task_e": task_e_summary, "bench": bench_summary}
# Each task's key figures, shown inline when the run wrote them (task_b's depend on its metrics).
KEY_FIGURES: dict[str, tuple[str, ...]] = {
    "retrieval": ("per_category.png",), "task_a": ("grid.png",), "task_c": ("recall_vs_frequency.png", "confusion.png"),
    "task_d": ("deltas.png", "samples.png"), "task_e": ("recall_vs_k.png", "edit_success.png")}
FIGURES: dict[str, Callable[[dict, str], list[str]]] = {"task_b": task_b_figures}


def key_figures(task: str, run: Path, rel: str) -> list[str]:
    """`![name](rel/name.png)` lines (each followed by a blank line) for the task's key figures that exist."""
    shown = [f for f in KEY_FIGURES.get(task, ()) if (run / f).is_file()]
    return [line for f in shown for line in (f"![{Path(f).stem}]({rel}/{f})", "")]


def _images(n: int) -> str:
    return f"{n} image" + ("" if n == 1 else "s")


def study_answer(outputs: Path, model_dir: Path) -> list[str]:
    """The study's answer in three sentences, from task_d's metrics (the gap, the fix, the filter) and the
    generator's metrics (why): where retrieval fails, whether targeted synthetic images closed it, and what limits it.
    An empty list when task_d has not run."""
    path = outputs / "task_d" / "latest" / "metrics.json"
    if not path.is_file():
        return []
    m = read_json(path)
    if "gap" not in m:
        return []
    gap, targets = m["gap"], ", ".join(t["category"] for t in m["targets"])
    where = (f"Retrieval fails most on **{targets}**: txt2img R@10 {fmt(gap['targets']['mean'])} against "
             f"{fmt(gap['others']['mean'])} for the other categories (gap {fmt_est(gap['gap'])}, test split).")
    closed = m.get("closed_fraction", {})
    delta, flt = m["rare_txt2img_R@10_delta"], m["filter"]
    gen = flt.get("per_target", {})
    n_gen = sum(v["generated"] for v in gen.values())
    n_acc = sum(v["accepted"] for v in gen.values())
    fixed = (f"Targeted synthetic images did {'' if delta['ci95'][0] > 0 else 'not '}close it: "
             f"`synthetic_filtered` − `baseline` on the targets is {fmt_delta(delta)}"
             + (f", {fmt(closed['synthetic_filtered']['mean'])} of the gap" if "synthetic_filtered" in closed else "")
             + f", with {n_acc} of {n_gen} generated candidates accepted by the oracle filter"
             + (f"; against repeating real target images as often (`oversample`) it is "
                f"{fmt_delta(m['filtered_vs_oversample']['rare'])}" if "rare" in m.get("filtered_vs_oversample", {})
                else "")
             + (f"; the same images captioned from what the oracle reads in them (`synthetic_recaptioned`) close "
                f"{fmt(closed['synthetic_recaptioned']['mean'])}, {fmt_delta(m['vs_oversample']['synthetic_recaptioned']['rare'])}"
                " against `oversample`" if closed.get("synthetic_recaptioned")
                and "synthetic_recaptioned" in m.get("vs_oversample", {}) else "")
             + (f"; perfect renders of the same prompts (`rendered`, {_images(m['arms']['rendered']['n_extra'])}) "
                f"close {fmt(closed['rendered']['mean'])}" if "rendered" in closed and "rendered" in m["arms"] else "")
             + ".")
    model = read_json(model_dir / "metrics.json") if (model_dir / "metrics.json").is_file() else None
    n_extra = m["arms"].get("synthetic_filtered", {}).get("n_extra", 0)
    drawn = (f"`{repo_path(model_dir)}` draws a single prompted object entirely right in "
             f"{fmt(model['single_object_all_correct'])} of prompts (target "
             f"{FIDELITY_TARGETS['single_object']:.2f}), so " if model else "")
    if flt["acceptance_rate"] < 0.5:
        why = (f"The limit is the generator: {drawn}the filter accepts {fmt(flt['acceptance_rate'])} of what it "
               f"draws and `synthetic_filtered` adds {_images(n_extra)}.")
    else:
        why = (f"The filter accepts {fmt(flt['acceptance_rate'])} of the generated candidates ({_images(n_extra)} "
               f"added), so the generator's fidelity is not what limits this result.")
    return ["## The answer", "", " ".join([where, fixed, why]), ""]


def model_section(model_dir: Path) -> list[str]:
    path = model_dir / "metrics.json"
    if not path.is_file():
        return ["## The study's generator", "",
                f"`{path}` is missing: run `python fidelity.py evaluate-model --write-card`.", ""]
    m = read_json(path)
    return [f"## The study's generator (`{repo_path(model_dir)}`)", "",
            f"Oracle accuracy on held-out renders {fmt(m['oracle_accuracy_on_renders'])}. Prompt fidelity (all "
            f"attributes right): single object {fmt(m['single_object_all_correct'])} (target "
            f"{FIDELITY_TARGETS['single_object']:.2f}), two objects with a relation "
            f"{fmt(m['two_object_all_correct'])} (target {FIDELITY_TARGETS['two_object']:.2f}). Single-object per "
            "attribute: shape "
            f"{fmt(m['single_object']['shape'])}, colour {fmt(m['single_object']['color'])}, position "
            f"{fmt(m['single_object']['position'])}. FD {fmt(m['fd'])} vs the real-vs-real floor "
            f"{fmt(m['fd_real_vs_real'])} (n = {m['fd_n']}). Sampler: {m['sampler']['scheduler']}, "
            f"{m['sampler']['steps']} steps, guidance {m['sampler']['guidance']}.", ""]


def task_section(task: str, outputs: Path, root: Path) -> list[str]:
    run = outputs / task / "latest"
    lines = [f"## {TITLES[task]}", ""]
    if not (run / "metrics.json").is_file():
        return lines + [f"Not run yet (no `{run}/metrics.json`).", ""]
    m = read_json(run / "metrics.json")
    summary = SUMMARIES.get(task)
    if summary:
        lines += summary(m) + [""]
    rel = os.path.relpath(run.resolve(), root)
    lines += FIGURES[task](m, rel) if task in FIGURES else key_figures(task, run.resolve(), rel)
    lines += [f"Run `{run.resolve().name}`: {links(run.resolve(), root)}", ""]
    return lines


def study_numbers(outputs: Path) -> list[str]:
    """The README's measured study numbers: each task's summary from outputs/<task>/latest/metrics.json."""
    lines = ["### Headline results", "",
             "Filled in by `python report.py --readme README.md` from each step's `outputs/<task>/latest/metrics.json`"
             " (`outputs/REPORT.md` has the figures and links).", ""]
    for task in TASKS:
        run = outputs / task / "latest"
        lines += [f"#### {TITLES[task]}", ""]
        if not (run / "metrics.json").is_file():
            lines += ["Not run yet.", ""]
            continue
        lines += SUMMARIES[task](read_json(run / "metrics.json")) + ["", f"Run `{run.resolve().name}`.", ""]
    return lines


def _verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def retrieval_numbers(m: dict, run: Path) -> list[str]:
    """The README's retrieval baseline: retrieval.py's headline table of a run, its settings from config.json, and
    the gap between the rarest and the commonest training categories.

    Args:
        m: the run's metrics.json.
        run: the run folder (its config.json gives the data, seed and split).
    """
    cfg = read_json(run / "config.json")["args"] if (run / "config.json").is_file() else {}
    per_cat = m["per_category"]
    ranked = sorted(per_cat, key=lambda n: per_cat[n]["train_count"])
    gap = {d: float(np.mean([per_cat[c][d]["R@10"] for c in ranked[:3]])
                    - np.mean([per_cat[c][d]["R@10"] for c in ranked[-3:]])) for d in ("txt2img", "img2txt")}
    by_t2i = sorted(per_cat, key=lambda n: per_cat[n]["txt2img"]["R@10"])
    worst, best = per_cat[by_t2i[0]], per_cat[by_t2i[-1]]
    return [f"`python retrieval.py --run-name {run.name}` (the run `outputs/retrieval/latest` points to), seed "
            f"{cfg.get('seed', 'n/a')}, data `{repo_path(cfg['data']) if cfg.get('data') else 'n/a'}`: "
            f"{m['n_train_images']:,} training images, {cfg.get('eval_split', 'test')} split of "
            f"{m['n_eval_images']:,} images and {m['n_eval_captions']:,} captions.", "",
            headline_table(m), "",
            f"The 3 rarest categories minus the 3 commonest: {gap['txt2img']:+.3f} txt2img R@10, "
            f"{gap['img2txt']:+.3f} img2txt R@10. The weakest category is {by_t2i[0]} ({worst['train_count']:,} "
            f"training images, txt2img R@10 {fmt(worst['txt2img']['R@10'])}), the best {by_t2i[-1]} "
            f"({best['train_count']:,}, {fmt(best['txt2img']['R@10'])})."]


def oracle_numbers(m: dict) -> list[str]:
    """The README's oracle table: accuracy, rejection and calibration on held-out seeds, against oracle.TARGETS,
    and the by-eye audit of the filter when it has been scored.

    Args:
        m: the oracle folder's metrics.json (`python oracle.py train`, `audit score`).
    """
    def target(key: str) -> str:
        op, threshold = ORACLE_TARGETS[key]
        return f"{op.replace('>=', '≥').replace('<=', '≤')} {threshold:g} ({_verdict(target_met(key, m[key]))})"

    blur = m["blur_sigma2"]
    by_recipe = ", ".join(f"{k} {v:.3f}" for k, v in m["reject_rate_heldout_by_recipe"].items())
    rows = [[f"whole-scene accuracy on clean renders ({m['heldout']['n_scenes']:,} scenes)",
             f"{m['accuracy_on_renders']:.3f}", target("accuracy_on_renders")],
            ["false rejects of clean objects", f"{m['false_reject_rate_renders']:.3f}",
             target("false_reject_rate_renders")],
            [f"rejection of negatives made by recipes never trained on (by recipe: {by_recipe})",
             f"{m['reject_rate_heldout']:.3f}", target("reject_rate_heldout")],
            [f"expected calibration error (15 bins; {m['ece_uncalibrated']:.4f} before temperature scaling)",
             f"{m['ece']:.4f}", ""],
            ["renders blurred with σ = 2 px: shape-correct, single / two objects",
             f"{blur['single_shape_correct']:.3f} / {blur['two_shape_correct']:.3f}", ""]]
    audits = ([("task_d's filter", m["audit"])] if m.get("audit") else []) + [
        (f"the filter on `{model}`", a) for model, a in m.get("other_audits", {}).items()]
    for what, audit in audits:
        rescored = " (labels kept, images re-read by this oracle)" if audit.get("rescored_from") else ""
        rows.append([f"by-eye audit of {what} on {audit['n']} generated images{rescored}: precision [95% CI], recall",
                     f"{fmt(audit['precision'])} {fmt_ci(audit['precision_ci'])}, {fmt(audit['recall'])}",
                     f"stale: {audit['stale']}" if audit.get("stale") else ""])
        if "yes_rate_ci" in audit:
            rows.append(["same audit: share of all candidates whose prompted shape is recognisable by eye, against "
                         "the filter's acceptance rate", f"{fmt(audit['yes_rate'])} {fmt_ci(audit['yes_rate_ci'])} "
                         f"vs {fmt(audit['acceptance_rate'])}", ""])
        if audit.get("shape_check"):
            sc = audit["shape_check"]
            rows.append(["same audit: fidelity's shape check (prompted shape read anywhere) against the eye: recall "
                         "P(read given recognisable) [95% CI], precision P(recognisable given read)",
                         f"{fmt(sc['recall'])} {fmt_ci(sc['recall_ci'])}, {fmt(sc['precision'])} "
                         f"{fmt_ci(sc['precision_ci'])}", ""])
    return md_table(["measurement (held-out seeds)", "value", "target"], rows)


def model_numbers(folders: list[Path]) -> list[str]:
    """The README's model table: each diffusion model's evaluate-model numbers (its metrics.json), sampling and UNet
    training steps (its training_log.json, or a student's distill_log.json), the first model's command, and the
    targets' verdicts.

    Args:
        folders: model folders whose metrics.json holds `fidelity.py evaluate-model` results, the study's generator
            first.
    """
    ms = [read_json(f / "metrics.json") for f in folders]
    first, sam = ms[0], ms[0]["sampler"]
    heads = first["args"].get("heads")
    lines = [f"`python fidelity.py evaluate-model --model {first['model']['name']}" + (f" --heads {heads}" if heads
             else "") + f"` ({first['n_prompts']} single- and {first['n_prompts']} two-object prompts, seed "
             f"{first['seed']}, {sam['scheduler']} {sam['steps']} steps, guidance {sam['guidance']}, {sam['device']}); "
             "each row from that model's `metrics.json`:", ""]
    rows = []
    for folder, m in zip(folders, ms):
        log, distilled = folder / "training_log.json", folder / "distill_log.json"
        steps = (total_unet_steps(read_json(log)) if log.is_file()
                 else read_json(distilled).get("steps") if distilled.is_file() else None)  # a student's distillation
        s, sm, rt = m["single_object"] or {}, m["sampler"], m.get("representation_round_trip") or {}
        rows.append([f"`{m['model']['name']}` (`{repo_path(folder)}`)", f"{sm['scheduler']}, {sm['steps']} steps, "
                     f"guidance {sm['guidance']}", f"{steps:,}" if steps else "n/a",
                     fmt(m["single_object_all_correct"]), fmt(s.get("shape")), fmt(s.get("color")),
                     fmt(s.get("position")), fmt(m["two_object_all_correct"]),
                     f"{fmt(m['fd'], '.1f')} ({fmt(m['fd_real_vs_real'], '.1f')})",
                     f"{fmt(rt.get('single'))} / {fmt(rt.get('two'))}"])
    lines += md_table(["model", "sampling", "UNet training steps", "single-object all-correct", "shape", "colour", "position",
                       "two-object all-correct", "FD (real-vs-real floor)",
                       "autoencoder ceiling single / two (renders after its round trip)"], rows)
    targets = ", ".join(f"{k.replace('_', '-')} all-correct ≥ {t:.2f}" for k, t in FIDELITY_TARGETS.items())
    verdicts = ", ".join(f"`{m['model']['name']}` " + _verdict(all(
        m.get(f"{k}_all_correct") is not None and m[f"{k}_all_correct"] >= t for k, t in FIDELITY_TARGETS.items()))
        for m in ms)
    return lines + ["", f"Targets ({targets}): {verdicts}."]


def diffusion_models(models: Path, shipped: Path) -> list[Path]:
    """Model folders under `models` with a diffusers pipeline and evaluate-model metrics, `shipped` first."""
    found = [f for f in sorted(models.iterdir()) if (f / "model_index.json").is_file()
             and "single_object" in (read_json(f / "metrics.json") if (f / "metrics.json").is_file() else {})
             ] if models.is_dir() else []
    return sorted(found, key=lambda f: f.resolve() != shipped.resolve())


Sources = dict[str, tuple[list[Path], Callable[[], list[str]]]]


def readme_sources(outputs: Path, models: Path, shipped: Path) -> Sources:
    """Each README block: the metrics files its numbers come from (it is filled when any exists) and the renderer
    that reads them."""
    retrieval_run = outputs / "retrieval" / "latest"
    generators = diffusion_models(models, shipped)
    return {
        "study-numbers": ([outputs / task / "latest" / "metrics.json" for task in TASKS],
                          lambda: study_numbers(outputs)),
        "retrieval-numbers": ([retrieval_run / "metrics.json"],
                              lambda: retrieval_numbers(read_json(retrieval_run / "metrics.json"),
                                                        retrieval_run.resolve())),
        "oracle-numbers": ([models / "shapes-oracle" / "metrics.json"],
                           lambda: oracle_numbers(read_json(models / "shapes-oracle" / "metrics.json"))),
        "model-numbers": ([f / "metrics.json" for f in generators] or [models / "<model>" / "metrics.json"],
                          lambda: model_numbers(generators)),
    }


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(<!-- /{re.escape(name)} -->)", re.S)


def fill_block(text: str, name: str, lines: list[str]) -> str:
    """`text` with what lies between `<!-- name -->` and `<!-- /name -->` replaced by `lines`.

    Raises:
        UserError: when the text lacks the pair of markers.
    """
    pattern = block_pattern(name)
    check(pattern.search(text) is not None, f"no <!-- {name} --> ... <!-- /{name} --> block to fill")
    return pattern.sub(lambda mo: mo.group(1) + "\n".join(lines) + "\n" + mo.group(2), text, count=1)


def fill_readme(readme: Path, sources: Sources) -> list[str]:
    """Fill each block of `readme` whose sources exist (any of them); returns the names filled.

    Raises:
        UserError: the README lacks a block's markers (checked for every block before anything is written).
    """
    text = readme.read_text()
    for name in sources:
        check(block_pattern(name).search(text) is not None, f"no <!-- {name} --> ... <!-- /{name} --> block to fill")
    filled = []
    for name, (paths, render) in sources.items():
        if not any(path.is_file() for path in paths):
            others = f" nor any of the {len(paths) - 1} other metrics files it reads" if len(paths) > 1 else ""
            print(f"note: {name} left as it is in {readme}: no {paths[0]}{others}", file=sys.stderr)
            continue
        text = fill_block(text, name, render())
        filled.append(name)
    write_text(readme, text)
    return filled


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    outputs = Path(args.outputs)
    root = args.out.parent
    lines = ["# Study report", "",
             "Generated by `python report.py` from each task's `outputs/<task>/latest/metrics.json`; "
             "every number below is read from those files.", ""]
    lines += study_answer(outputs, Path(args.model))
    lines += model_section(Path(args.model))
    for task in TASKS:
        lines += task_section(task, outputs, root)
    write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")
    if args.readme:
        filled = fill_readme(Path(args.readme), readme_sources(outputs, Path(args.models), Path(args.model)))
        print(f"filled {', '.join(filled) or 'no'} block(s) of {args.readme}")
    return args.out


if __name__ == "__main__":
    cli(main)
