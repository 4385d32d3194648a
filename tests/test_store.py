"""utils.ImageStore on a tiny random-weight pipeline: a kill, a torn manifest line or a full disk resumes with every
image exactly once; process shards merge; a `--cpu` launch that asks for two processes warns that it runs one;
images are reused only under the same prompt, seed, model and sampler;
the img2img variant passes its sources through."""

import errno
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import utils
from utils import ImageStore, UserError


@pytest.fixture(scope="module")
def tiny(tiny_model):
    pipe, settings = utils.load_pipeline(str(tiny_model), utils.pick_device("cpu"))
    return pipe, dict(settings, steps=2)


def make_items(n, seed=0, text="a red star"):
    return [{"id": f"i{k:02d}", "text": f"{text} {k}", "seed": seed + k} for k in range(n)]


def manifest_ids(store):
    return [json.loads(line)["id"] for line in store.manifest.read_text().splitlines()]


# --------------------------------------------------------------------------- kill, torn line, full disk, shards
def fail_after(monkeypatch, method: str, n: int, error, label) -> list:
    """Make ImageStore.<method> raise `error` on its (n+1)-th call; returns the labels of the n calls that ran."""
    real = getattr(ImageStore, method)
    done = []

    def failing(self, *args):
        if len(done) == n:
            raise error
        done.append(label(*args))
        real(self, *args)

    monkeypatch.setattr(ImageStore, method, failing)
    return done


def test_killed_generation_resumes_with_every_item_exactly_once(tiny, tmp_path, monkeypatch):
    pipe, settings = tiny
    store, items = ImageStore(tmp_path, settings), make_items(7)
    real_append = ImageStore.append
    # a kill between an image and its manifest line
    calls = fail_after(monkeypatch, "append", 3, KeyboardInterrupt, lambda rank, entry: entry["id"])
    with pytest.raises(KeyboardInterrupt):
        store.generate(pipe, items, batch_size=2, progress=False)
    assert sorted(store.entries()) == sorted(calls) and len(calls) == 3
    first = {i: (store.images / f"{i}.png").read_bytes() for i in calls}
    # A torn last line (killed mid-write) is ignored, not fatal.
    with (store.folder / "manifest.0.jsonl").open("a") as fh:
        fh.write('{"id": "i06", "te')

    monkeypatch.setattr(ImageStore, "append", real_append)
    info = store.generate(pipe, items, batch_size=2, progress=False)
    assert info["reused"] == 3 and info["generated"] == len(items) - 3 and info["is_main"]
    ids = manifest_ids(store)
    assert sorted(ids) == sorted(it["id"] for it in items) and len(ids) == len(set(ids))  # each once
    assert not list(store.folder.glob("manifest.*.jsonl")) and not list(store.images.glob(".*.tmp"))
    assert all((store.images / f"{i}.png").read_bytes() == b for i, b in first.items())  # kept, not redone
    again = store.generate(pipe, items, batch_size=2, progress=False)  # nothing left: nothing generated
    assert again["generated"] == 0 and again["reused"] == len(items) and manifest_ids(store) == ids


def test_full_disk_keeps_finished_images_and_says_how_many(tiny, tmp_path, monkeypatch):
    pipe, settings = tiny
    store, items = ImageStore(tmp_path, settings), make_items(5)
    real_write = ImageStore.write_image
    written = fail_after(monkeypatch, "write_image", 3, OSError(errno.ENOSPC, "No space left on device"),
                         lambda name, image: name)
    with pytest.raises(UserError, match=rf"^disk full while writing images: 3 finished images are safely kept in "
                                        rf"{re.escape(str(store.folder))}; free some space and run the same command "
                                        rf"again to resume$"):
        store.generate(pipe, items, batch_size=2, progress=False)
    assert len(store.entries()) == 3 and all((store.images / n).is_file() for n in written)
    monkeypatch.setattr(ImageStore, "write_image", real_write)
    assert store.generate(pipe, items, batch_size=2, progress=False)["generated"] == len(items) - 3
    assert sorted(manifest_ids(store)) == sorted(it["id"] for it in items)


def test_shards_of_several_processes_merge_into_one_manifest(tmp_path):
    store = ImageStore(tmp_path, {"name": "renders"})
    for rank, ids in ((0, ["a", "b"]), (1, ["c", "a"])):  # "a" finished twice (two runs): kept once
        for i in ids:
            store.write_image(f"{i}.png", np.zeros((4, 4, 3), np.uint8))
            store.append(rank, {"id": i, "file": f"{i}.png"})
    store.append(1, {"id": "d", "file": "d.png"})  # a line whose image never landed is not "done"
    assert sorted(store.entries()) == ["a", "b", "c"]
    store.merge()
    assert manifest_ids(store) == ["a", "b", "c"] and not list(store.folder.glob("manifest.*.jsonl"))


def test_a_cpu_launch_asking_for_two_processes_runs_one_and_says_so(tiny, tmp_path, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    # accelerate's own launcher: `--cpu --num_processes 2` runs the script once, with no mpirun in front of it.
    launch = launch_command_parser().parse_args(["--cpu", "--num_processes", "2", "task_d.py", "--quick"])
    cmd, env = prepare_simple_launcher_cmd_env(_validate_launch_command(launch)[0])
    assert cmd == [sys.executable, "task_d.py", "--quick"]
    for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, env[name])
    pipe, settings = tiny
    with pytest.warns(UserWarning, match=r"^`accelerate launch --cpu` started one process: .* run `accelerate launch "
                                         r"--multi_gpu --num_processes N` with --device cpu$"):
        info = ImageStore(tmp_path, settings).generate(pipe, make_items(2), batch_size=2, progress=False)
    assert info["processes"] == 1 and info["generated"] == 2 and info["generated_by_process"] == [2]


def test_manifest_appends_leave_no_blank_lines_and_fence_off_a_torn_one(tmp_path):
    store = ImageStore(tmp_path, {"name": "renders"})
    for i in range(3):
        store.append(0, {"id": f"a{i}"})
    shard = store.folder / "manifest.0.jsonl"
    assert shard.read_text().splitlines() == [json.dumps({"id": f"a{i}"}) for i in range(3)]
    with shard.open("ab") as fh:
        fh.write(b'{"id": "torn')  # a kill mid-line
    store.append(0, {"id": "b"})
    assert shard.read_text().splitlines()[-2:] == ['{"id": "torn', json.dumps({"id": "b"})]


# --------------------------------------------------------------------------- what is reused
def test_images_are_reused_only_for_the_same_prompt_seed_and_sampler(tiny, tmp_path):
    pipe, settings = tiny
    items = make_items(4)
    store = ImageStore(tmp_path, settings)
    assert store.generate(pipe, items, batch_size=4, progress=False)["generated"] == 4
    images = store.load(items)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])  # one generator per image
    assert store.generate(pipe, items, batch_size=4, progress=False)["generated"] == 0
    np.testing.assert_array_equal(store.load(items), images)  # PNG round trip: the same bytes
    other = ImageStore(tmp_path / "other", settings)
    assert other.generate(pipe, items, batch_size=4, progress=False)["generated"] == 4
    np.testing.assert_array_equal(other.load(items), images)  # same seeds, same images
    # Under the same id: another seed or another prompt is redone, and the newer manifest line wins.
    changed = [dict(items[0], seed=99), dict(items[1], text="a blue ring"), *items[2:]]
    assert store.generate(pipe, changed, batch_size=4, progress=False)["generated"] == 2
    entries = store.entries()
    assert entries["i00"]["seed"] == 99 and entries["i01"]["text"] == "a blue ring"
    assert not np.array_equal(store.load(changed)[0], images[0])
    # Other sampler settings: another store, so everything is generated again.
    guided = ImageStore(tmp_path, dict(settings, guidance=7.0))
    assert guided.folder != store.folder
    assert guided.generate(pipe, items, batch_size=4, progress=False)["generated"] == 4


def test_the_key_changes_when_the_weights_settings_or_extra_key_do(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    settings = {"name": "model", "id": str(folder), "steps": 2, "guidance": 5.0, "size": 64, "scheduler": None}
    before = ImageStore(tmp_path, settings).folder
    assert ImageStore(tmp_path, dict(settings)).folder == before
    assert ImageStore(tmp_path, dict(settings, steps=3)).folder != before
    assert ImageStore(tmp_path, dict(settings, scheduler="EulerDiscreteScheduler")).folder != before
    assert ImageStore(tmp_path, settings, key=["float16"]).folder != before
    assert ImageStore(tmp_path, dict(settings, dtype="float16", device="cuda")).folder == before  # not sampler keys
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "retrained"
    assert ImageStore(tmp_path, settings).folder != before
    assert before.parent == tmp_path and before.name.startswith("model-")


def test_a_model_name_is_loaded_only_when_there_is_work(tiny, tiny_model, tmp_path, monkeypatch):
    pipe, settings = tiny
    items = make_items(2)
    store = ImageStore(tmp_path, settings)
    assert store.generate(str(tiny_model), items, batch_size=2, progress=False)["generated"] == 2
    monkeypatch.setattr(utils, "load_pipeline", lambda *a, **k: pytest.fail("loaded with nothing to generate"))
    assert store.generate(str(tiny_model), items, batch_size=2, progress=False)["reused"] == 2


# --------------------------------------------------------------------------- img2img
def test_img2img_items_pass_their_sources_to_the_pipeline(tiny, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe, settings = tiny
    edit = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
    edit.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    sources = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)  # smaller than the model's 64 px
    items = [{"id": f"e{k}", "text": "a red star", "seed": 10 + k, "image": sources[k]} for k in range(3)]
    store = ImageStore(tmp_path, settings, key=[0.6])
    store.generate(edit, items, batch_size=2, progress=False, strength=0.6)
    got = store.load(items)
    assert got.shape == (3, 32, 32, 3)  # the sources' size, not settings["size"]
    assert "image" not in store.entries()["e0"]
    by_hand = edit(["a red star"] * 2, image=[Image.fromarray(s) for s in sources[:2]], strength=0.6,
                   num_inference_steps=2, guidance_scale=settings["guidance"], output_type="np",
                   generator=[torch.Generator("cpu").manual_seed(10 + k) for k in range(2)]).images
    np.testing.assert_array_equal(got[:2], (np.clip(by_hand, 0, 1) * 255).round().astype(np.uint8))
