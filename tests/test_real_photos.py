"""Real photos end to end: a COCO folder of scikit-image photographs through every script.

The folder (conftest.write_real_photo_coco) holds crops of 10 photo classes in many sizes, orientations,
formats and pixel modes, class-level captions ("a photo of a cat") and a few broken annotations and
files. It runs generate_data --source coco -> retrieval --quick -> task_c -> task_d --quick ->
task_e --quick, and each test checks one script's output contract.
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import generate_data
import retrieval
import task_c
import task_d
import task_e
from conftest import REAL_PHOTO_CLASSES, REAL_PHOTO_COCO_SPLITS, REAL_PHOTO_DEFECTS, REAL_PHOTO_SPLITS
from utils import load_data, load_rgb

SHAPES_WORDS = re.compile(r"shape|colou?r|size, count|position", re.IGNORECASE)


@pytest.fixture(scope="module")
def chain(real_photo_coco, tmp_path_factory):
    """Every script once, in order, on the real-photo folder; returns the outputs root and each script's result."""
    out = tmp_path_factory.mktemp("real_photo_runs")
    os.environ.setdefault("FEATURE_CACHE", str(tmp_path_factory.mktemp("features")))
    data = generate_data.main(["--source", "coco", "--coco-root", str(real_photo_coco), "--out", str(out / "data"),
                               "--workers", "1", "--coco-splits", REAL_PHOTO_COCO_SPLITS])
    pkl = out / "data" / "data.pkl"
    ret = retrieval.main(["--data", str(pkl), "--quick", "--outputs", str(out), "--run-name", "photos"])
    run = out / "retrieval" / "photos"
    # no --data: task_c analyses the data the retrieval run was trained on
    c = task_c.main(["--retrieval-run", str(run), "--quick", "--outputs", str(out), "--run-name", "photos"])
    targets = out / "task_c" / "photos" / "targets.json"
    d = task_d.main(["--targets", str(targets), "--quick", "--outputs", str(out), "--run-name", "photos",
                     "--n-seeds", "2", "--ratios", "", "--epochs", "1"])
    e = task_e.main(["--data", str(pkl), "--heads", str(run / "heads.pt"), "--targets", str(targets), "--quick",
                     "--steps", "2", "--k-max", "2", "--n-edits", "0", "--strengths", "1", "--outputs", str(out),
                     "--run-name", "photos"])
    return {"out": out, "pkl": pkl, "data": data, "retrieval": ret, "task_c": c, "task_d": d, "task_e": e}


def test_generate_data_keeps_every_loadable_photo_and_counts_the_rest(chain):
    data = load_data(chain["pkl"])
    n_classes = len(REAL_PHOTO_CLASSES)
    expected = {"train": "train2017", "val": "val2017", "test": "test2017"}
    for split, name in expected.items():
        skipped = sum(REAL_PHOTO_DEFECTS["images"].get(split, {}).values())
        assert len(data["splits"][split]) == n_classes * REAL_PHOTO_SPLITS[name] - skipped
    assert data["dropped"]["annotations"]["train2017"] == REAL_PHOTO_DEFECTS["annotations"]["train2017"]
    for kind in ("images", "boxes"):
        assert {k: v for k, v in data["dropped"][kind].items() if v} == REAL_PHOTO_DEFECTS[kind]
    sizes = set()
    for rec in (r for recs in data["splits"].values() for r in recs):
        pixels = load_rgb(rec["path"])
        assert pixels.shape == (rec["height"], rec["width"], 3) and max(rec["width"], rec["height"]) <= 96
        assert pixels.std() > 3  # a photo, not a blank canvas (float, 16-bit and alpha files read right)
        assert len(rec["captions"]) == 5 and rec["category_ids"] and all(c.strip() for c in rec["captions"])
        sizes.add((rec["width"] > rec["height"]) - (rec["width"] < rec["height"]))
    assert sizes == {-1, 0, 1}  # portrait, square and landscape
    modes = {Path(rec["path"]).suffix for recs in data["splits"].values() for rec in recs}
    assert modes == {".jpg", ".png", ".tif"}


def test_retrieval_reports_both_levels_and_writes_its_run(chain):
    run = chain["out"] / "retrieval" / "photos"
    assert (chain["out"] / "retrieval" / "latest").resolve() == run.resolve()
    m = json.loads((run / "metrics.json").read_text())
    for d in ("img2txt", "txt2img"):
        assert set(m[d]) == {"R@1", "R@5", "R@10", "mAP"}
        assert set(m["category_level"][d]) == {"R@1", "R@5", "R@10", "mAP@R"}
    assert set(m["per_category"]) == set(REAL_PHOTO_CLASSES)
    assert all("category_level" in c for c in m["per_category"].values())
    # class-level captions: the category level is what a good model can reach; chance is 1 / 10 classes
    assert m["category_level"]["txt2img"]["R@1"] > 0.3
    assert m["figures"] == {"per_category.png": "written"}
    for name in ("heads.pt", "config.json", "results.md", "per_category.png"):
        assert (run / name).stat().st_size > 0, name


def test_task_c_takes_the_runs_data_and_speaks_of_categories(chain):
    m = chain["task_c"]
    run = chain["out"] / "task_c" / "photos"
    assert m["data"] == str(chain["pkl"].resolve())  # from the retrieval run's config.json
    assert not (chain["out"] / "retrieval" / "task_c-photos").exists()  # nothing retrained
    for name in ("problem.md", "targets.json", "metrics.json", "confusion.csv", "confusion.png",
                 "recall_vs_frequency.png"):
        assert (run / name).stat().st_size > 0, name
    targets = json.loads((run / "targets.json").read_text())
    assert targets["rule_name"] == "bottom-txt2img-mAP@R"  # captions name a class: category-level rule
    assert m["vocabulary"]["class_captions"] and m["vocabulary"]["attributes"] == []
    assert 1 <= len(targets["targets"]) <= 3 and targets["selection"]
    assert all(t["separated"] for t in targets["targets"]) or targets["n_separable"] == 0
    problem = (run / "problem.md").read_text()
    assert not SHAPES_WORDS.search(problem), SHAPES_WORDS.search(problem)
    assert "category" in problem and "mAP@R" in problem


def test_task_d_retrains_on_class_caption_data(chain):
    m = chain["task_d"]
    run = chain["out"] / "task_d" / "photos"
    for name in ("metrics.json", "results.md", "deltas.png", "samples.png", "config.json"):
        assert (run / name).stat().st_size > 0, name
    assert m["filter"]["rule"].startswith("alignment score")  # not the shapes oracle
    assert set(m["arms"]) == {"baseline", "oversample", "synthetic", "synthetic_filtered"}
    assert set(m["arms"]["baseline"]["per_category"]) == set(REAL_PHOTO_CLASSES)
    assert [t["category"] for t in m["targets"]] == [t["category"] for t in chain["task_c"]["targets"]["targets"]]
    manifest = Path(m["generation"]["cache"]) / "manifest.jsonl"
    assert len(manifest.read_text().splitlines()) == len(chain["task_c"]["targets"]["targets"]) * 4


def test_task_e_runs_imagine_then_retrieve_on_class_caption_data(chain):
    m = chain["task_e"]
    run = chain["out"] / "task_e" / "photos"
    assert (run / "metrics.json").is_file() and (run / "recall_vs_k.png").stat().st_size > 0
    assert m["targets"]["names"] == [t["category"] for t in chain["task_c"]["targets"]["targets"]]
    overall = m["retrieval"]["overall"]
    assert overall["n"] >= 1 and set(overall["text"]) >= {"R@10"}
    assert set(overall["weighted"]) == {"1", "2"} and m["editing"] is None
    assert np.isfinite(m["cost"]["generate_s_per_image"])


def test_train_diffusion_crops_photos_of_many_sizes_to_one_resolution(chain, tmp_path):
    import train_diffusion
    from utils import UserError

    flags = ["--quick", "--data", str(chain["pkl"]), "--split", "train", "--out", str(tmp_path / "pipe")]
    with pytest.raises(UserError, match=r"^training images must share one size; found .* \(--resolution N resizes"):
        train_diffusion.main([*flags, "--ckpt-dir", str(tmp_path / "a")])
    info = train_diffusion.main([*flags, "--ckpt-dir", str(tmp_path / "b"), "--resolution", "32"])
    assert info["steps"] == train_diffusion.QUICK["max_steps"]
    assert json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())["sample_size"] * 2 ** (
        len(json.loads((tmp_path / "pipe" / "vae" / "config.json").read_text())["block_out_channels"]) - 1) == 32
