"""report.py: the one-page study report is filled in from the metrics files, and says what has not run."""

import json
import os

import pytest

import report
from utils import UserError


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _run(outputs, task, metrics, files=("results.md",)):
    run = outputs / task / "r1"
    _write(run / "metrics.json", metrics)
    for name in files:
        (run / name).write_text("x")
    os.symlink("r1", outputs / task / "latest")


def test_report_reads_numbers_and_lists_missing_tasks(tmp_path):
    outputs = tmp_path / "outputs"
    split = {"R@1": 0.111, "R@5": 0.222, "R@10": 0.333, "mAP": 0.444}
    _run(outputs, "retrieval", {"img2txt": split, "txt2img": dict(split, **{"R@10": 0.777}),
                                "n_train_images": 12, "n_eval_images": 5, "n_eval_captions": 25},
         files=("results.md", "umap.png"))
    out = report.main(["--outputs", str(outputs), "--model", str(tmp_path / "no-model")])
    text = out.read_text()
    assert out == outputs / "REPORT.md"
    assert "| txt2img | 0.111 | 0.222 | 0.777 | 0.444 |" in text
    assert "[umap.png](retrieval/r1/umap.png)" in text
    assert "Not run yet (no `" in text and "task_d/latest/metrics.json" in text
    assert "no-model/metrics.json` is missing" in text


def test_report_missing_outputs_folder(tmp_path):
    with pytest.raises(UserError, match="outputs folder not found: .*nope .run `make demo` first."):
        report.main(["--outputs", str(tmp_path / "nope")])


def test_task_d_summary_states_whether_the_target_is_met(tmp_path):
    outputs = tmp_path / "outputs"
    d = {"mean": 0.123, "ci95": [0.05, 0.2]}
    met = [{"target": "gap_closed", "threshold": 0.5, "measured": 0.6, "met": True},
           {"target": "overall_txt2img_R@10_delta", "threshold": -0.01, "measured": -0.004, "met": True}]
    _run(outputs, "task_d", {"filter": {"acceptance_rate": 0.5, "rule": "r"}, "rare_txt2img_R@10_delta": d,
                             "overall_txt2img_R@10_delta": {"mean": -0.004, "ci95": [-0.01, 0.002]},
                             "filtered_vs_oversample": {"rare": d}, "seeds": [0, 1, 2], "epochs": 3,
                             "targets_met": met}, files=("results.md", "deltas.png"))
    text = report.main(["--outputs", str(outputs)]).read_text()
    assert "on the target categories: +0.123 [+0.050, +0.200] (target: closes ≥ 50% of the gap" in text
    assert "the CI above 0: met); overall: -0.004 [-0.010, +0.002]" in text
    assert "![deltas](task_d/r1/deltas.png)" in text  # the key figure inline, not only linked


def _cell(experiment, label, f, lo, hi, sec, **extra):
    return {"experiment": experiment, "label": label, "fidelity_mean": f, "fidelity_ci95": [lo, hi],
            "sec_per_image": sec, "timestep_spacing": "trailing", **extra}


def test_task_b_section_shows_every_experiment_and_the_filmstrips_inline(tmp_path):
    outputs = tmp_path / "outputs"
    experiments = {
        "schedulers": [_cell("schedulers", "ddim 1 steps", 0.4, 0.3, 0.5, 0.02),
                       _cell("schedulers", "euler 1 steps", 0.9, 0.8, 1.0, 0.01, no_effect="the same images as x"),
                       _cell("schedulers", "ddim 3 steps", 0.7, 0.5, 0.9, 0.04)],
        "eta": [_cell("eta", "ddim eta 0", 0.5, 0.25, 0.75, 0.05, eta=0.0, num_inference_steps=12),
                _cell("eta", "ddim eta 1", 0.25, 0.0, 0.5, 0.05, eta=1.0, num_inference_steps=12)],
        "negative": [_cell("negative", "no negative", 0.6, 0.4, 0.8, 0.05, negative_colour_rate=0.75),
                     _cell("negative", "with negative colour", 0.5, 0.3, 0.7, 0.05, negative_colour_rate=0.25,
                           colour_rate_drop=0.5, colour_rate_drop_ci95=[0.25, 0.75])],
        "trajectory": [{"experiment": "trajectory", "label": "ddim", "filmstrip": "trajectory_ddim.png"},
                       {"experiment": "trajectory", "label": "euler", "filmstrip": "trajectory_euler.png"}],
    }
    _run(outputs, "task_b", {"experiments": experiments, "n_prompts": 8, "n_seeds": 4, "fidelity_key": "color",
                             "time_repeats": 3, "figures": ["fidelity_vs_steps.png", "pareto.png"]},
         files=("findings.md", "pareto.png", "trajectory_ddim.png"))
    text = report.main(["--outputs", str(outputs)]).read_text()
    # The no-effect cell (0.9) is neither the best nor the fastest.
    assert "- schedulers: best ddim 3 steps, 0.700 [0.500, 0.900] (0 of the other 1 inside its CI)." in text
    assert "- fastest: ddim 1 steps at 0.020 s/image (fidelity 0.400)" in text
    assert "1 cells cannot change the image and are not ranked" in text
    assert "- eta (DDIM, 12 steps): eta 0 0.500 [0.250, 0.750], eta 1 0.250 [0.000, 0.500]." in text
    assert "that colour's rate 0.750 -> 0.250, a drop of 0.500 [0.250, 0.750]; shape present 0.600 -> 0.500" in text
    for name in ("trajectory_ddim.png", "trajectory_euler.png", "pareto.png", "fidelity_vs_steps.png"):
        assert f"]({'task_b/r1/' + name})" in text and f"![" in text.split(name)[0].splitlines()[-1], name


def test_task_e_without_editing_is_reported_not_a_crash(tmp_path):
    outputs = tmp_path / "outputs"
    text_only = {"R@10": {"mean": 0.5, "ci95": [0.25, 0.75]}}  # the reference row: no delta to itself
    fused = {"R@10": {"mean": 0.625, "ci95": [0.375, 0.875], "delta": 0.125, "delta_ci95": [-0.25, 0.5]}}
    overall = {"n": 4, "text": text_only, "weighted": {"2": fused}}
    _run(outputs, "task_e", {"k_max": 2, "retrieval": {"overall": overall, "relational": {"n": 0}},
                             "fusion": {"weighted": {"2": {"w": 0.5}}},
                             "cost": {"added_s_per_query": {"weighted": {"2": 0.25}}}, "editing": None})
    text = report.main(["--outputs", str(outputs)]).read_text()
    assert "- overall (4 queries): text-only R@10 0.500; weighted fusion with k = 2 images (w = 0.5 " in text
    assert "ΔR@10 +0.125 [-0.250, +0.500]" in text
    assert "- relational: no queries drawn\n" in text  # an empty subset has no numbers to read
    assert "- added cost 0.25 s per query at k = 2; editing not run (--n-edits 0)" in text


def test_readme_block_is_filled_from_the_latest_metrics(tmp_path):
    outputs = tmp_path / "outputs"
    split = {"R@1": 0.25, "R@5": 0.5, "R@10": 0.625, "mAP": 0.375}
    _run(outputs, "retrieval", {"img2txt": split, "txt2img": split, "n_train_images": 12, "n_eval_images": 5,
                                "n_eval_captions": 25})
    s = {"rho": 0.14, "ci95": [-0.24, 0.53], "n_categories": 12}
    _run(outputs, "task_c", {"spearman": {"txt2img": s}, "targets": {"rule_name": "rule", "targets": [
        {"category": "hexagon"}, {"category": "circle"}]}})
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n<!-- study-numbers -->\nold hand copy 0.999\n<!-- /study-numbers -->\n"
                      "\nafter\n")
    report.main(["--outputs", str(outputs), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n<!-- study-numbers -->\n") and text.endswith("<!-- /study-numbers -->\n\nafter\n")
    assert "0.999" not in text
    block = text.split("<!-- study-numbers -->")[1]
    assert "| txt2img | 0.250 | 0.500 | 0.625 | 0.375 |" in block
    assert "0.140 (95% CI [-0.240, 0.530], 12 categories)" in block and "**hexagon, circle**" in block
    assert block.count("Not run yet.") == 5  # task_a, task_b, task_d, task_e, bench
    again = report.main(["--outputs", str(outputs), "--readme", str(readme)])  # filling twice changes nothing
    assert again.is_file() and readme.read_text() == text


def test_readme_without_the_markers_is_an_error(tmp_path):
    (tmp_path / "outputs").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(UserError, match="no <!-- study-numbers --> ... <!-- /study-numbers --> block to fill"):
        report.main(["--outputs", str(tmp_path / "outputs"), "--readme", str(readme)])
