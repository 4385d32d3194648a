"""Test setup: import the scripts from the repo root, never touch the network."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one pytest-xdist worker per core: one torch thread each
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small shapes world (600 train / 100 val / 200 test images) shared by the tests; features cached per session."""
    import generate_data

    out = tmp_path_factory.mktemp("shapes")
    os.environ["FEATURE_CACHE"] = str(tmp_path_factory.mktemp("features"))
    generate_data.main(["--out", str(out), "--n-pretrain", "0", "--n-train", "600", "--n-val", "100",
                        "--n-test", "200", "--seed", "3"])
    return out / "data.pkl"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random-weight StableDiffusionPipeline (tests/tiny_models.py) saved as a folder, loaded like any model.
    Shared by the session: a test that changes it must copy it first."""
    from tiny_models import tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd") / "pipe"
    tiny_sd_pipeline(folder.parent).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- COCO-layout folders
def write_png(path, color, size=(8, 6)):
    """A one-colour RGB PNG of `size` (width, height), parent folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


COCO_CATEGORIES = [{"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"},
                   {"id": 18, "name": "dog", "supercategory": "animal"}]
COCO_COLOURS = {1: (200, 40, 40), 3: (40, 200, 40), 18: (40, 40, 200)}


def make_coco_world(root, n_train=24, n_val=24):
    """A tiny COCO folder: each image holds 1-2 of person/car/dog (non-contiguous ids, as in COCO), coloured
    by its first category, with 5 captions naming its categories."""
    import json

    ann = root / "annotations"
    ann.mkdir(parents=True)
    for name, ids in (("train2017", range(1, n_train + 1)), ("val2017", range(1000, 1000 + n_val))):
        images, captions, instances = [], [], []
        for i in ids:
            cats = [COCO_CATEGORIES[i % 3]["id"]] + ([COCO_CATEGORIES[(i // 3) % 3]["id"]] if i % 2 else [])
            cats = list(dict.fromkeys(cats))
            images.append({"id": i, "file_name": f"{i:012d}.png", "width": 8, "height": 6})
            words = " and a ".join(c["name"] for c in COCO_CATEGORIES if c["id"] in cats)
            captions += [{"id": 10 * i + k, "image_id": i, "caption": f"photo {k} of a {words}"} for k in range(5)]
            instances += [{"id": 100 * i + j, "image_id": i, "category_id": c, "bbox": [0, 0, 4, 3], "area": 12,
                           "iscrowd": 0} for j, c in enumerate(cats)]
            write_png(root / name / f"{i:012d}.png", COCO_COLOURS[cats[0]])
        (ann / f"captions_{name}.json").write_text(json.dumps({"images": images, "annotations": captions}))
        (ann / f"instances_{name}.json").write_text(json.dumps(
            {"images": images, "annotations": instances, "categories": COCO_CATEGORIES}))
    return root


@pytest.fixture
def coco_world(tmp_path):
    """`make_coco_world` under this test's tmp_path / "coco"; returns that folder."""
    return make_coco_world(tmp_path / "coco")


# --------------------------------------------------------------------------- real photos (scikit-image)
# Class name -> the skimage.data photos it is cropped from. Real photographs of different sizes and
# orientations (512x512, 400x600, 300x451, 427x640, 500x741, 25x25 faces), colour and grey.
REAL_PHOTO_CLASSES = {
    "cat": ["chelsea"], "coffee cup": ["coffee"], "rocket": ["rocket"], "astronaut": ["astronaut"],
    "camera": ["camera"], "coins": ["coins"], "clock": ["clock"], "moon": ["moon"],
    "motorcycle": ["stereo_motorcycle"], "face": ["lfw_subset"],
}
REAL_PHOTO_SPLITS = {"train2017": 5, "val2017": 2, "test2017": 3}  # images per class in each annotation set
REAL_PHOTO_COCO_SPLITS = "train2017=train,val2017=val,test2017=test"
# Defects the real-photo folder carries on purpose, as generate_data must count them (see write_real_photo_coco).
REAL_PHOTO_DEFECTS = {
    "annotations": {"train2017": {"blank caption": 1, "null caption": 1, "caption of an unknown image id": 1,
                                  "duplicate caption id": 1, "instance of an unknown category": 1}},
    "images": {"train": {"truncated": 1}, "val": {"unreadable": 1}},
    "boxes": {"test": {"box outside the image": 1}},
}


def _real_photos():
    """Class name -> list of (photo as an array, its one-line description from the skimage.data docstring)."""
    import skimage.data

    out = {}
    for cls, loaders in REAL_PHOTO_CLASSES.items():
        photos = []
        for name in loaders:
            fn = getattr(skimage.data, name)
            line = fn.__doc__.strip().splitlines()[0].rstrip(".")
            if name == "stereo_motorcycle":
                left, right, _ = fn()
                photos += [(left, line), (right, line)]
            elif name == "lfw_subset":
                photos += [(face, line) for face in fn()[:100]]  # the first 100 of the subset are faces
            else:
                photos.append((fn(), line))
        out[cls] = photos
    return out


def _crop(photo, rng, max_side):
    """A random crop of 50-100% of the photo's side, in landscape, portrait or square shape, flipped at random,
    downscaled so its longer side is at most `max_side`."""
    h, w = photo.shape[:2]
    aspect = [4 / 3, 3 / 4, 1.0, 16 / 9, 9 / 16][int(rng.integers(5))]
    ch = int(min(h, w / aspect) * rng.uniform(0.5, 1.0))
    cw = max(1, min(w, int(ch * aspect)))
    ch = max(1, ch)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = photo[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(crop))
    scale = min(1.0, max_side / max(image.size))
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)


def _save_real(image, path_stem, index):
    """Save one crop under a file format and pixel mode that cycle with `index` (JPEG, PNG, palette, alpha, CMYK,
    grey, 16-bit grey, float TIFF), as real folders mix them. Returns the file name."""
    mode = image.mode
    kind = index % 6
    if mode == "F":  # float faces: a float TIFF or an 8-bit grey PNG
        if kind % 2 == 0:
            image.save(path_stem.with_suffix(".tif"))
            return path_stem.with_suffix(".tif").name
        image = Image.fromarray(np.clip(np.asarray(image) * 255, 0, 255).astype(np.uint8))
        mode = "L"
    if mode == "L":
        if kind == 1:
            image = Image.fromarray((np.asarray(image).astype(np.uint16) * 257))  # 16-bit grey, I;16
            image.save(path_stem.with_suffix(".png"))
            return path_stem.with_suffix(".png").name
        suffix = ".jpg" if kind % 2 == 0 else ".png"
        image.save(path_stem.with_suffix(suffix))
        return path_stem.with_suffix(suffix).name
    converted = {0: ("RGB", ".jpg"), 1: ("RGB", ".png"), 2: ("P", ".png"), 3: ("RGBA", ".png"), 4: ("CMYK", ".jpg"),
                 5: ("RGB", ".jpg")}[kind]
    image = image.quantize(256) if converted[0] == "P" else image.convert(converted[0])
    image.save(path_stem.with_suffix(converted[1]))
    return path_stem.with_suffix(converted[1]).name


def write_real_photo_coco(root, seed=0):
    """A COCO folder of real photos from scikit-image: crops of 10 photo classes, <= 96 px, in several sizes,
    orientations, formats and modes; 5 class-level captions per image (4 templates of the class name and the
    photo's docstring line); one whole-image box per image. It also carries the defects in REAL_PHOTO_DEFECTS
    (blank, null, orphan and duplicate captions, an unknown category, a box outside its image, a truncated
    JPEG and an unreadable file), which generate_data must drop and count."""
    import json

    rng = np.random.default_rng(seed)
    photos = _real_photos()
    categories = [{"id": 10 + j, "name": cls, "supercategory": "photo"} for j, cls in enumerate(REAL_PHOTO_CLASSES)]
    ann = root / "annotations"
    ann.mkdir(parents=True)
    image_id = 0
    for set_name, per_class in REAL_PHOTO_SPLITS.items():
        folder = root / set_name
        folder.mkdir(parents=True)
        images, captions, instances = [], [], []
        for cat in categories:
            cls = cat["name"]
            for _ in range(per_class):
                image_id += 1
                photo, line = photos[cls][int(rng.integers(len(photos[cls])))]
                if photo.dtype != np.uint8:
                    photo = photo.astype(np.float32)
                image = _crop(photo, rng, max_side=int(rng.integers(40, 97)))
                file_name = _save_real(image, folder / f"{image_id:012d}", image_id)
                images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
                texts = [f"a photo of a {cls}", f"a picture of a {cls}", f"an image of a {cls}", f"a {cls}", line]
                captions += [{"id": 10 * image_id + k, "image_id": image_id, "caption": t} for k, t in enumerate(texts)]
                instances.append({"id": image_id, "image_id": image_id, "category_id": cat["id"], "iscrowd": 0,
                                  "bbox": [0, 0, image.width, image.height], "area": image.width * image.height})
        if set_name == "train2017":
            first = images[0]["id"]
            captions += [{"id": 9_000_001, "image_id": first, "caption": "   "},
                         {"id": 9_000_002, "image_id": first, "caption": None},
                         {"id": 9_000_003, "image_id": 424242, "caption": "a photo of nothing"},
                         {"id": captions[0]["id"], "image_id": first, "caption": "a duplicate id"}]
            instances.append({"id": 9_000_004, "image_id": first, "category_id": 999, "bbox": [0, 0, 2, 2]})
            path = folder / [im for im in images if im["file_name"].endswith(".jpg")][-1]["file_name"]
            data = path.read_bytes()  # the last training JPEG, cut to two thirds of its bytes
            path.write_bytes(data[: len(data) * 2 // 3])
        if set_name == "val2017":
            (folder / images[-1]["file_name"]).write_bytes(b"not an image at all" * 20)
        if set_name == "test2017":
            instances.append({"id": 9_000_005, "image_id": images[0]["id"], "category_id": categories[0]["id"],
                              "bbox": [500, 500, 10, 10]})
        (ann / f"captions_{set_name}.json").write_text(json.dumps({"images": images, "annotations": captions}))
        (ann / f"instances_{set_name}.json").write_text(json.dumps(
            {"images": images, "annotations": instances, "categories": categories}))
    return root


@pytest.fixture(scope="session")
def real_photo_coco(tmp_path_factory):
    """The real-photo COCO folder (written once per session)."""
    return write_real_photo_coco(tmp_path_factory.mktemp("real_photos") / "coco")
