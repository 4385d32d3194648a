"""The model registry and loader: tiny hub-class pipelines round-trip, generation is seeded, errors are one line."""

from pathlib import Path

import numpy as np
import pytest

import utils
from tiny_models import tiny_sd_pipeline, tiny_sdxl_pipeline
from utils import UserError


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def saved_pipeline(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    pipe = (tiny_sd_pipeline if request.param == "sd" else tiny_sdxl_pipeline)(tmp)
    pipe.save_pretrained(tmp / "pipe")
    return tmp / "pipe", type(pipe).__name__


def test_saved_pipeline_loads_through_the_registry_code_and_generates(saved_pipeline):
    path, cls_name = saved_pipeline
    pipe, settings = utils.load_pipeline(str(path), device=utils.pick_device("cpu"))
    assert type(pipe).__name__ == cls_name
    assert settings["size"] == 64 and settings["dtype"] == "float32"
    images = utils.generate_images(pipe, ["a red star", "a blue ring", "a red star"], [0, 1, 0], steps=2,
                                   guidance=3.0, batch_size=2, progress=False)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    again = utils.generate_images(pipe, ["a red star", "a blue ring", "a red star"], [0, 1, 0], steps=2,
                                  guidance=3.0, batch_size=2, progress=False)
    np.testing.assert_array_equal(images, again)  # same seeds, same calls -> same pixels
    # The noise depends on the seed only, not on the batch an image falls in: the copy of image 0 generated in
    # another batch differs by float rounding of batched matmuls (at most one 8-bit level), never more.
    assert np.abs(images[0].astype(int) - images[2].astype(int)).max() <= 1
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 1


def test_scheduler_swap_by_name(saved_pipeline):
    pipe, settings = utils.load_pipeline(str(saved_pipeline[0]), device=utils.pick_device("cpu"),
                                         scheduler="EulerAncestralDiscrete")
    assert settings["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert utils.generate_images(pipe, ["a star"], [3], steps=2, guidance=1.0, progress=False).shape == (1, 64, 64, 3)


def test_registry_names_cover_the_issue():
    assert {"shapes-tiny", "shapes-tiny-turbo", "sd21", "sd-turbo", "sdxl", "sdxl-turbo", "sd35-medium"} <= set(
        utils.MODEL_REGISTRY)
    assert utils.MODEL_REGISTRY["sd-turbo"]["guidance"] == 0.0 and utils.MODEL_REGISTRY["sd-turbo"]["steps"] <= 4
    # each base model names its student, which samples as its distill_log.json recommends, as sd-turbo does: few
    # steps, no CFG, and was distilled from that base
    for base in ("shapes-tiny", "shapes-tiny-f2"):
        turbo = utils.MODEL_REGISTRY[utils.MODEL_REGISTRY[base]["student"]]
        log = utils.read_json(Path(turbo["id"]) / "distill_log.json")
        assert (turbo["steps"], turbo["guidance"]) == (log["recommended"]["steps"], log["recommended"]["guidance"])
        assert turbo["steps"] <= 4 and log["teacher"] == utils.repo_path(utils.MODEL_REGISTRY[base]["id"])
    # every shipped model of ours: a card with measured fidelity, within the issue's 40 MB
    for name in ("shapes-tiny", "shapes-tiny-turbo", "shapes-tiny-f2", "shapes-tiny-f2-turbo"):
        folder = Path(utils.MODEL_REGISTRY[name]["id"])
        assert "single_object_all_correct" in utils.read_json(folder / "metrics.json"), name
        assert (folder / "README.md").is_file()
        assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 40e6, name


def test_uncached_hub_model_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"model 'stabilityai/sd-turbo' is not in the local Hugging Face cache .*"
                                        r"\(hf download stabilityai/sd-turbo\) or pass a local folder"):
        utils.load_pipeline("sd-turbo", device=utils.pick_device("cpu"))


@pytest.mark.parametrize("name, message", [
    ("dalle", "unknown model 'dalle': not a registry name"),
    ("./no/such/folder", "unknown model './no/such/folder'"),
])
def test_unknown_model_names(name, message):
    with pytest.raises(UserError, match=message):
        utils.resolve_model(name)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(UserError, match="is not a diffusers pipeline folder"):
        utils.resolve_model(str(tmp_path))


def test_missing_shipped_model_folder(monkeypatch, tmp_path):
    monkeypatch.setitem(utils.MODEL_REGISTRY, "shapes-tiny", dict(utils.MODEL_REGISTRY["shapes-tiny"],
                                                                  id=str(tmp_path / "gone")))
    with pytest.raises(UserError, match="model folder .*gone is missing"):
        utils.resolve_model("shapes-tiny")


def test_unknown_scheduler(saved_pipeline):
    with pytest.raises(UserError, match="unknown scheduler 'Magic'; valid: .*DDIMScheduler"):
        utils.load_pipeline(str(saved_pipeline[0]), device=utils.pick_device("cpu"), scheduler="Magic")
