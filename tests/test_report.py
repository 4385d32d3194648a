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
