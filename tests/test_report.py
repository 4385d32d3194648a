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
    _run(outputs, "task_d", {"filter": {"acceptance_rate": 0.5, "rule": "r"}, "rare_txt2img_R@10_delta": d,
                             "overall_txt2img_R@10_delta": {"mean": -0.004, "ci95": [-0.01, 0.002]},
                             "filtered_vs_oversample": {"rare": d}, "seeds": [0, 1, 2], "epochs": 3,
                             "targets_met": {"rare_txt2img_R@10_gain_ge_0.10_ci_above_0": True}})
    text = report.main(["--outputs", str(outputs)]).read_text()
    assert "on the target categories: +0.123 (95% CI [+0.050, +0.200]) (target ≥ +0.10 with the CI above 0: met)" in text
    assert "overall: -0.004 (95% CI [-0.010, +0.002])" in text
