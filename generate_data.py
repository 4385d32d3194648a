"""Build captioned image data (COCO layout + one pickle) that every other script reads.

Question answered: which images, captions, categories and boxes do the diffusion and retrieval
experiments run on? Either a procedural world of coloured shapes (default, no download, with a
category-balanced `pretrain` split and a COCO-shaped long-tailed `train` split), or a real COCO
2014/2017 folder turned into the same pickle.

Commands:
    python generate_data.py --quick                         # smoke run, ~500 images, a few seconds
    python generate_data.py                                 # shapes: 10k pretrain, 5k train, 500 val, 1k test
    python generate_data.py --splits train,test --imbalance 50 --size 128
    python generate_data.py --source coco --coco-root ~/coco   # captions_val2017.json etc. under annotations/
    python generate_data.py --source coco --coco-root ~/coco --coco-splits train2017=train,val2017=val,val2017=test

Outputs (shapes): <out>/annotations/{instances,captions}_<split>.json, <out>/<split>/<image_id:012d>.png
and <out>/data.pkl (read it with `utils.load_data`). Outputs (coco): <out>/data.pkl only; its image
paths point into --coco-root. Every COCO image is decoded in full with the loader the other scripts use,
so any size, orientation or pixel mode works later; missing, truncated and unreadable files, and malformed
annotations (missing, null or blank captions, unknown or duplicate ids, boxes outside the image) are
dropped, counted by reason in the printed summary and kept in the pickle's `dropped` dict.

The caption grammar lives here too: the phrase builders the captions use, and the structured prompts written in
it (`make_prompts`, `parse_prompt`, `render_prompts`) that the oracle, fidelity.py and the tasks score against.
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import itertools
import multiprocessing as mp
import os
import pickle
import re
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from utils import (DEFAULT_DATA, REPO, UserError, check, cli, comma_list, common_args, load_data, load_rgb,
                   parse_checked, read_json, write_json)

SOURCES = ("shapes", "coco")
SPLITS = ("pretrain", "train", "val", "test")
SPLIT_IDS = {name: i + 1 for i, name in enumerate(SPLITS)}  # part of every image's seed and id
ID_BLOCK = 10**8  # image_id = split_id * ID_BLOCK + index + 1: unique across splits, stable across runs
DEFAULT_COUNTS = {"pretrain": 10000, "train": 5000, "val": 500, "test": 1000}
QUICK = {"n_pretrain": 200, "n_train": 200, "n_val": 50, "n_test": 50}
DEFAULT_COCO_OUT = REPO / "data" / "coco"
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart",
          "hexagon", "diamond", "ring", "pentagon", "crescent", "arrow")
# Shapes whose mirror image is another drawing, per mirror: "x" mirrors left and right (the crescent's bite and the
# arrow's point change sides), "y" top and bottom (the triangle, star, heart and pentagon turn upside down, the
# crescent's bite moves). Every other shape is drawn symmetric about that axis, so a scene of those, mirrored, is a
# scene of this world (train_diffusion --mirror-pairs).
CHIRAL_SHAPES = {"x": ("crescent", "arrow"), "y": ("triangle", "star", "heart", "pentagon", "crescent")}
SUPERCATEGORIES = {
    "circle": "round", "ring": "round", "crescent": "round",
    "square": "polygon", "triangle": "polygon", "hexagon": "polygon", "diamond": "polygon", "pentagon": "polygon",
    "star": "symbol", "cross": "symbol", "heart": "symbol", "arrow": "symbol",
}
CATEGORIES = tuple({"id": i + 1, "name": s, "supercategory": SUPERCATEGORIES[s]} for i, s in enumerate(SHAPES))
# Saturated, bright and about 30-60 degrees apart in hue, so a small object still reads as its colour.
COLORS = {
    "red": (220, 30, 30), "orange": (250, 140, 0), "yellow": (245, 225, 20), "green": (30, 190, 50),
    "cyan": (20, 200, 220), "blue": (30, 70, 235), "purple": (150, 50, 220), "pink": (245, 100, 190),
}
SIZES = {"small": 0.18, "large": 0.30}  # object extent as a fraction of the image side
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CELLS = tuple((r, c) for r in range(3) for c in range(3))
JITTER = 0.08  # centre jitter inside a cell, fraction of the image side
BRIGHTNESS = (0.85, 1.1)  # range of an object's colour scale
MAX_OBJECTS = 3
BACKGROUNDS = ("solid", "vgradient", "hgradient", "noise")
NUMBER_WORDS = ("one", "two", "three")
RELATIONS = ("to the left of", "to the right of", "above", "below")
COLOR_NAMES = tuple(COLORS)
SIZE_NAMES = tuple(SIZES)
KINDS = ("single", "two")  # structured prompts: one object, or two objects and a relation
SIZE_PROB, POSITION_PROB = 0.5, 0.5  # how often a prompt names an object's size / absolute cell

# COCO train2017 instances per category (instances_train2017.json, crowd annotations included), sorted
# descending: person 262,465 ... toaster 225, hair drier 198; 80 categories, 860,001 annotations in all.
# Checked number for number against two published tables: GabrielEug2/tcc-instance-segm,
# 0-informacoes_do_coco/classdist_train.json (per category name), and chenjie04's COCO statistics script
# (pycocotools over instances_train2017.json, printed per category id). tests/test_generate_data.py pins the sum.
COCO_TRAIN2017_INSTANCES = (
    262465, 43867, 38491, 24715, 24342, 20650, 15714, 14358, 12884, 12354, 11431, 10806, 10759, 9973,
    9838, 9509, 9458, 9076, 8725, 8720, 8652, 8147, 7913, 7852, 7770, 7308, 7179, 7113, 6646, 6613,
    6587, 6496, 6434, 6399, 6353, 6347, 6334, 6192, 6165, 6126, 6069, 5851, 5821, 5805, 5779, 5703,
    5610, 5543, 5513, 5508, 5479, 5303, 5135, 5131, 4970, 4812, 4793, 4768, 4571, 4373, 4192, 4157,
    3747, 3334, 3276, 2918, 2855, 2685, 2682, 2637, 2262, 1983, 1954, 1865, 1673, 1481, 1294, 1285,
    225, 198,
)
# The train split's default commonest/rarest ratio: COCO's own, person / hair drier = 1325.6.
COCO_IMBALANCE = COCO_TRAIN2017_INSTANCES[0] / COCO_TRAIN2017_INSTANCES[-1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="shapes", help=f"where images come from: {' or '.join(SOURCES)}")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {DEFAULT_DATA.parent} for shapes, {DEFAULT_COCO_OUT} for coco)")
    parser.add_argument("--splits", type=comma_list(), default=None,
                        help=f"comma-separated subset of {','.join(SPLITS)} (default: all that the source has)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    shapes = parser.add_argument_group("shapes source")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels, 32..256")
    for split in SPLITS:
        shapes.add_argument(f"--n-{split}", type=int, default=DEFAULT_COUNTS[split],
                            help=f"images in {split} (default {DEFAULT_COUNTS[split]}; 0 leaves the split out)")
    shapes.add_argument("--imbalance", type=float, default=COCO_IMBALANCE,
                        help=f"train split: commonest/rarest category instance ratio (>= 1; default "
                             f"{COCO_IMBALANCE:.1f}, COCO train2017's own person/hair drier ratio)")
    coco = parser.add_argument_group("coco source")
    coco.add_argument("--coco-root", type=Path, default=None,
                      help="folder with annotations/captions_<name>.json, instances_<name>.json and <name>/ images")
    coco.add_argument("--coco-splits", type=comma_list(), default=None,
                      help="NAME=SPLIT,... e.g. train2017=train,val2017=val,val2017=test; a name mapped to k splits "
                           "is divided into k seeded parts (default: train*=train, val*=val+test)")
    common_args(parser, "data", QUICK, omit=("run_name", "outputs", "device", "threads", "wandb"),
                helps={"seed": "seed of every random draw (>= 0)"})
    return parse_checked(parser, argv, QUICK, check_args)


def check_args(args: argparse.Namespace) -> None:
    check(args.source in SOURCES, f"unknown --source {args.source!r}; choose one of {', '.join(SOURCES)}")
    check(args.seed >= 0, f"--seed must be >= 0, got {args.seed}")
    check(args.workers >= 1, f"--workers must be >= 1, got {args.workers}")
    if args.splits is not None:
        for split in args.splits:
            check(split in SPLITS, f"unknown split {split!r} in --splits; valid splits: {', '.join(SPLITS)}")
        check(args.splits, "--splits is empty")
    if args.source == "shapes":
        check(32 <= args.size <= 256, f"--size must be in 32..256 pixels, got {args.size}")
        check(args.imbalance >= 1, f"--imbalance must be >= 1, got {args.imbalance}")
        for split in SPLITS:
            n = getattr(args, f"n_{split}")
            check(0 <= n < ID_BLOCK, f"--n-{split} must be in 0..{ID_BLOCK - 1}, got {n}")
        check(args.coco_root is None, "--coco-root needs --source coco")
    else:
        check(args.coco_root is not None, "--source coco needs --coco-root DIR")
    args.out = args.out or (DEFAULT_DATA.parent if args.source == "shapes" else DEFAULT_COCO_OUT)


# --------------------------------------------------------------------------- shapes: sampling
def category_probs(imbalance: float) -> np.ndarray:
    """Long-tail probabilities by rank, commonest first: COCO's sorted curve at 12 ranks, max/min = imbalance."""
    log_counts = np.log(np.asarray(COCO_TRAIN2017_INSTANCES, dtype=np.float64))
    ranks = np.linspace(0, len(log_counts) - 1, len(SHAPES))
    curve = np.interp(ranks, np.arange(len(log_counts)), log_counts)
    curve = (curve - curve.min()) / (curve.max() - curve.min()) * np.log(imbalance)
    probs = np.exp(curve)
    return probs / probs.sum()


def train_category_order(seed: int) -> list[str]:
    """Which shape gets which long-tail rank (commonest first): a permutation seeded by --seed only."""
    rng = np.random.default_rng([seed, 0])
    return [SHAPES[i] for i in rng.permutation(len(SHAPES))]


def shape_probs(order: list[str], rank_probs: np.ndarray) -> np.ndarray:
    """Per-shape probabilities in SHAPES order, from shapes ranked commonest first."""
    probs = np.zeros(len(SHAPES))
    for name, p in zip(order, rank_probs):
        probs[SHAPES.index(name)] = p
    return probs


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """One generator per image, so images can be made in any order, by any worker."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def sample_objects(rng: np.random.Generator, probs: np.ndarray | None = None) -> list[dict]:
    """Draw 1-3 objects in distinct cells; each object's category from `probs` (None: uniform)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(len(CELLS), size=n, replace=False)
    shapes = rng.choice(len(SHAPES), size=n, p=probs)
    objects = []
    for cell, shape in zip(cells, shapes):
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        row, col = CELLS[int(cell)]
        jitter = rng.uniform(-JITTER, JITTER, size=2)
        objects.append({
            "shape": SHAPES[int(shape)],
            "color": list(COLORS)[int(rng.integers(len(COLORS)))],
            "size": size,
            "cell": [row, col],
            "center": cell_center((row, col), jitter),
            "brightness": float(rng.uniform(*BRIGHTNESS)),
        })
    return objects


def cell_center(cell, jitter) -> list[float]:
    """[fx, fy], fractions of the image side: the middle of 3x3 cell (row, col) moved by jitter (dx, dy)."""
    row, col = cell
    return [float((col + 0.5) / 3 + jitter[0]), float((row + 0.5) / 3 + jitter[1])]


def posed_object(shape: str, color: str, size: str, cell, rng: np.random.Generator) -> dict:
    """One object of the given attributes with its centre jitter and brightness drawn as `sample_objects` draws them."""
    jitter = rng.uniform(-JITTER, JITTER, size=2)
    return {"shape": shape, "color": color, "size": size, "cell": list(cell), "center": cell_center(cell, jitter),
            "brightness": float(rng.uniform(*BRIGHTNESS))}


def _hue(rgb) -> float:
    return colorsys.rgb_to_hsv(*(v / 255 for v in rgb))[0] * 360


def _muted_color(rng: np.random.Generator, avoid_hues: list[float]) -> list[int]:
    """A dark-to-mid, low-saturation colour whose hue stays >= 45 degrees from every object's hue (else grey)."""
    value = rng.uniform(0.2, 0.5)
    saturation = rng.uniform(0.0, 0.25)
    hue = rng.uniform(0, 360)
    rgb = [int(round(v * 255)) for v in colorsys.hsv_to_rgb(hue / 360, saturation, value)]
    hue = _hue(rgb)  # rounding a dark, greyish colour can move its hue a lot: test the colour we draw
    if any(min(abs(hue - h), 360 - abs(hue - h)) < 45 for h in avoid_hues):
        rgb = [int(round(value * 255))] * 3
    return rgb


def sample_background(objects: list[dict], rng: np.random.Generator) -> dict:
    """A background spec (kind, two colours, noise seed) that contrasts with the scene's object colours."""
    hues = [_hue(COLORS[o["color"]]) for o in objects]
    return {
        "kind": BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        "colors": [_muted_color(rng, hues), _muted_color(rng, hues)],
        "noise_seed": int(rng.integers(2**31)),
    }


# --------------------------------------------------------------------------- shapes: rendering
@functools.lru_cache(maxsize=None)
def _unit_polygon(shape: str) -> tuple[tuple[float, float], ...]:
    """Outline of a polygonal shape, centred at 0, extent about [-1, 1], y pointing down."""
    def regular(k, radius=1.0, start=-90.0):
        angles = np.deg2rad(start + 360.0 * np.arange(k) / k)
        return np.stack([radius * np.cos(angles), radius * np.sin(angles)], 1)

    if shape == "square":
        pts = np.array([[-0.8, -0.8], [0.8, -0.8], [0.8, 0.8], [-0.8, 0.8]])
    elif shape == "triangle":
        pts = np.array([[0.0, -0.9], [1.0, 0.82], [-1.0, 0.82]])
    elif shape == "star":
        outer, inner = regular(5), regular(5, 0.45, -54.0)
        pts = np.stack([outer, inner], 1).reshape(-1, 2) + [0, 0.1]
    elif shape == "cross":
        a, w = 0.95, 0.32
        pts = np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a],
                        [-w, w], [-a, w], [-a, -w], [-w, -w]])
    elif shape == "heart":
        t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1)
        pts = (pts - (pts.max(0) + pts.min(0)) / 2) / (np.abs(pts).max() * 0.98)
    elif shape == "hexagon":
        pts = regular(6, 1.0, 0.0)
    elif shape == "diamond":
        pts = np.array([[0.0, -1.0], [0.68, 0.0], [0.0, 1.0], [-0.68, 0.0]])
    elif shape == "pentagon":
        pts = regular(5) + [0, 0.095]
    elif shape == "arrow":
        pts = np.array([[-1.0, -0.22], [0.15, -0.22], [0.15, -0.65], [1.0, 0.0],
                        [0.15, 0.65], [0.15, 0.22], [-1.0, 0.22]])
    else:
        raise KeyError(shape)
    return tuple(map(tuple, pts.tolist()))


def _draw_mask(shape: str, cx: float, cy: float, radius: float, side: int) -> Image.Image:
    """The object's mask on a side x side 8-bit canvas (supersampled side), 255 inside."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)

    def disc(x, y, r, fill):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if shape == "circle":
        disc(cx, cy, 0.92 * radius, 255)
    elif shape == "ring":
        disc(cx, cy, 0.95 * radius, 255)
        disc(cx, cy, 0.55 * radius, 0)
    elif shape == "crescent":  # a disc minus an offset disc
        disc(cx, cy, 0.95 * radius, 255)
        disc(cx + 0.42 * radius, cy - 0.12 * radius, 0.78 * radius, 0)
    else:
        draw.polygon([(cx + x * radius, cy + y * radius) for x, y in _unit_polygon(shape)], fill=255)
    return mask


def _background_array(spec: dict, size: int) -> np.ndarray:
    a, b = (np.asarray(c, dtype=np.float32) for c in spec["colors"])
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if spec["kind"] == "vgradient":
        bg = a + (b - a) * ramp[:, None, None] + np.zeros((1, size, 1), np.float32)
    elif spec["kind"] == "hgradient":
        bg = a + (b - a) * ramp[None, :, None] + np.zeros((size, 1, 1), np.float32)
    else:
        bg = np.broadcast_to(a, (size, size, 3)).astype(np.float32)
    if spec["kind"] == "noise":  # light grey grain, same on all channels so it adds no hue
        noise = np.random.default_rng(spec["noise_seed"]).normal(0.0, 5.0, size=(size, size, 1))
        bg = bg + noise.astype(np.float32)
    return bg


def _place(obj: dict, size: int) -> tuple[float, float, float]:
    """Centre (x, y) and radius in output pixels; the centre is kept far enough in for the object to fit."""
    check(obj["size"] in SIZES, f"unknown size {obj['size']!r}; choose one of {', '.join(SIZES)}")
    frac = SIZES[obj["size"]]
    row, col = obj["cell"]
    fx, fy = obj.get("center") or ((col + 0.5) / 3, (row + 0.5) / 3)
    lo, hi = frac / 2 + 0.02, 1 - frac / 2 - 0.02
    return float(np.clip(fx, lo, hi)) * size, float(np.clip(fy, lo, hi)) * size, frac * size / 2


def _mask_bbox(mask: np.ndarray) -> list[float]:
    """Tight [x, y, w, h] of a boolean mask, in pixels (COCO convention: the box bounds the mask)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def shape_alpha(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Anti-aliased alpha (float32 size x size, 0..1) of one shape centred at (cx, cy) px with `radius` px."""
    mask = _draw_mask(shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, radius * SUPERSAMPLE, size * SUPERSAMPLE)
    return np.asarray(mask.resize((size, size), Image.LANCZOS), dtype=np.float32) / 255.0


def render_layers(objects: list[dict], size: int = 64, background=None) -> tuple[np.ndarray, list[tuple]]:
    """A scene as layers: the background (float32 size x size x 3, 0..255) and per object (alpha float32
    size x size in 0..1, anti-aliased; colour float32 (3,)). `composite` flattens them into the rendered image.

    Args:
        objects: dicts with shape, color, size, cell; optional center [fx, fy] and brightness.
        size: image side in pixels.
        background: None (flat grey), a spec from `sample_background`, or a numpy Generator to draw one from.
    """
    if background is None:
        background = {"kind": "solid", "colors": [[96, 96, 96], [96, 96, 96]], "noise_seed": 0}
    elif isinstance(background, np.random.Generator):
        background = sample_background(objects, background)
    layers = []
    for obj in objects:
        check(obj["shape"] in SHAPES, f"unknown shape {obj['shape']!r}; choose one of {', '.join(SHAPES)}")
        check(obj["color"] in COLORS, f"unknown colour {obj['color']!r}; choose one of {', '.join(COLORS)}")
        alpha = shape_alpha(obj["shape"], *_place(obj, size), size)
        color = np.clip(np.asarray(COLORS[obj["color"]], np.float32) * obj.get("brightness", 1.0), 0, 255)
        layers.append((alpha, color))
    return _background_array(background, size), layers


def composite(background: np.ndarray, layers: list[tuple]) -> Image.Image:
    """Alpha-blend (alpha, colour) layers over a float background, in order; an 8-bit RGB image."""
    canvas = background
    for alpha, color in layers:
        canvas = canvas * (1.0 - alpha[..., None]) + color * alpha[..., None]
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def _render(objects: list[dict], size: int, background) -> tuple[Image.Image, list[np.ndarray], list[list[float]]]:
    """Render a scene; also return each object's output-resolution mask and tight bbox [x, y, w, h]."""
    canvas, layers = render_layers(objects, size, background)
    masks = [alpha >= 0.5 for alpha, _ in layers]  # the pixels the object covers at least half of
    return composite(canvas, layers), masks, [_mask_bbox(m) for m in masks]


def render_scene(objects: list[dict], size: int = 64, background=None) -> Image.Image:
    """Render objects (dicts with shape, color, size, cell; optional center [fx, fy] and brightness) to an RGB image.

    Without `center` an object sits in the middle of its cell. `background` is None (flat grey), a spec from
    `sample_background`, or a numpy Generator to draw one from.
    """
    return _render(objects, size, background)[0]


# --------------------------------------------------------------------------- shapes: captions
def article(word: str) -> str:
    """The indefinite article for `word`: "an" before a vowel, else "a"."""
    return "an" if word[0] in "aeiou" else "a"


def position_phrase(cell) -> str:
    """'in the top left', ..., 'in the center'."""
    row, col = cell
    return "in the center" if (row, col) == (1, 1) else f"in the {ROWS[row]} {COLS[col]}"


def object_phrase(obj: dict, color: bool = True, size: bool = False, position: bool = False) -> str:
    """One object in the caption grammar: "a [size] [colour] <shape> [in the <row> <col>]", the parts asked for."""
    words = ([obj["size"]] if size else []) + ([obj["color"]] if color else []) + [obj["shape"]]
    text = f"{article(words[0])} {' '.join(words)}"
    return f"{text} {position_phrase(obj['cell'])}" if position else text


def join_phrases(parts: list[str]) -> str:
    """"x", "x and y", "x, y and z": the caption grammar's list of one or more phrases."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def true_relations(a: dict, b: dict) -> list[str]:
    """Relation words that hold for `a <relation> b`, from their cells (rows top to bottom, cols left to right)."""
    (ra, ca), (rb, cb) = a["cell"], b["cell"]
    rels = []
    if ca < cb:
        rels.append("to the left of")
    if ca > cb:
        rels.append("to the right of")
    if ra < rb:
        rels.append("above")
    if ra > rb:
        rels.append("below")
    return rels


def _caption(kind: str, objects: list[dict], rng: np.random.Generator) -> str:
    def coin(p: float = 0.5) -> bool:
        return bool(rng.random() < p)

    prefix = ("", "", "a picture of ", "an image of ", "a drawing of ")[int(rng.integers(5))]
    n = len(objects)
    order = [objects[i] for i in rng.permutation(n)]
    if kind == "list":
        return prefix + join_phrases([object_phrase(o, color=coin(0.8), size=coin(0.4)) for o in order])
    if kind == "count":
        noun = ("shape", "object")[int(rng.integers(2))] + ("s" if n > 1 else "")
        return f"{NUMBER_WORDS[n - 1]} {noun}: " + join_phrases([object_phrase(o, color=coin(0.7), size=coin(0.4))
                                                                 for o in order])
    if kind == "color":
        if coin():
            return prefix + join_phrases([f"{article(o['shape'])} {o['shape']} in {o['color']}" for o in order])
        colors = list(dict.fromkeys(o["color"] for o in order))
        head = f"{join_phrases(colors)} shapes" if n > 1 else f"{article(colors[0])} {colors[0]} shape"
        return f"{head}: " + join_phrases([object_phrase(o, color=False) for o in order])
    if kind == "size":
        return prefix + join_phrases([object_phrase(o, color=coin(), size=True) for o in order])
    if kind == "position":
        return prefix + join_phrases([object_phrase(o, color=coin(0.7), size=coin(0.4), position=True) for o in order])
    if kind == "relation":
        pairs = [(a, b) for a in order for b in order if a is not b]
        a, b = pairs[int(rng.integers(len(pairs)))]
        rels = true_relations(a, b)
        # draw order: a's size, the relation, b's size (the seeded captions depend on it)
        phrase_a = object_phrase(a, size=coin(0.4))
        rel = rels[int(rng.integers(len(rels)))]
        text = f"{phrase_a} {rel} {object_phrase(b, size=coin(0.4))}"
        rest = [o for o in order if o is not a and o is not b]
        if rest:
            text += ", and " + object_phrase(rest[0], color=coin(0.7), position=coin())
        return text
    raise KeyError(kind)


def make_captions(objects: list[dict], rng: np.random.Generator, n: int = 5) -> list[str]:
    """`n` different captions from varied templates; each names every object's shape, relations are true.

    A relation caption comes first whenever two objects exist (they always sit in different cells).
    """
    kinds = ["list", "count", "color", "size", "position"]
    first = ["relation"] if len(objects) >= 2 else []
    plan = first + [kinds[i] for i in rng.permutation(len(kinds))]
    all_kinds = kinds + first
    captions: list[str] = []
    for attempt in range(200 * n):
        kind = plan[attempt] if attempt < len(plan) else all_kinds[int(rng.integers(len(all_kinds)))]
        text = _caption(kind, objects, rng)
        if text not in captions:
            captions.append(text)
        if len(captions) == n:
            return captions
    raise ValueError(f"cannot make {n} different captions for {describe(objects)!r}")


def describe(objects: list[dict]) -> str:
    """One canonical caption: every object with size, colour, shape and position, in reading order."""
    if not objects:
        return "an empty background"
    ordered = sorted(objects, key=lambda o: tuple(o["cell"]))
    return join_phrases([object_phrase(o, color=True, size=True, position=True) for o in ordered])


# --------------------------------------------------------------------------- structured prompts
def _balanced(rng: np.random.Generator, items: Sequence, n: int) -> list:
    """`n` items as back-to-back seeded permutations of `items`, so each appears n/len(items) times (+-1)."""
    out: list = []
    while len(out) < n:
        out += [items[i] for i in rng.permutation(len(items))]
    return out[:n]


def _obj(shape: str, color: str, size: str | None = None, cell: Sequence[int] | None = None) -> dict:
    return {"shape": shape, "color": color, "size": size, "cell": None if cell is None else [int(c) for c in cell]}


def prompt_text(prompt: dict) -> str:
    """The caption-grammar sentence for a structured prompt (the same phrases the captions use)."""
    # The captions' own phrase builder, so the wording is exactly what the diffusion model was trained on.
    def phrase(o: dict, position: bool = False) -> str:
        return object_phrase(o, color=True, size=o["size"] is not None, position=position)

    objs = prompt["objects"]
    if prompt["relation"] is None:
        return phrase(objs[0], position=objs[0]["cell"] is not None)
    rel = prompt["relation"]
    return f"{phrase(objs[rel['a']])} {rel['rel']} {phrase(objs[rel['b']])}"


def make_prompts(kind: str, n: int, seed: int = 0) -> list[dict]:
    """Structured prompts with their text, deterministic for a seed, every shape and colour about equally often.

    Args:
        kind: "single" (shape + colour, a size in about half, an absolute cell in about half) or "two" (two
            objects with shape + colour and an optional size, and a relation between them).
        n: number of prompts (> 0).
        seed: the seed.

    Returns:
        Dicts {"text", "objects": [{"shape", "color", "size" or None, "cell" [r, c] or None}], "relation": None or
        {"a": 0, "rel": one of RELATIONS, "b": 1}}.

    Raises:
        UserError: an unknown kind or n <= 0.
    """
    check(kind in KINDS, f"unknown prompt kind {kind!r}; choose one of {', '.join(KINDS)}")
    check(isinstance(n, (int, np.integer)) and n > 0, f"number of prompts must be a positive integer, got {n}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])

    def maybe_size() -> str | None:
        return SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))] if rng.random() < SIZE_PROB else None

    prompts = []
    if kind == "single":
        pairs = _balanced(rng, list(itertools.product(SHAPES, COLOR_NAMES)), n)
        for shape, color in pairs:
            size = maybe_size()
            cell = CELLS[int(rng.integers(len(CELLS)))] if rng.random() < POSITION_PROB else None
            prompts.append({"objects": [_obj(shape, color, size, cell)], "relation": None})
    else:
        shapes_a, shapes_b = _balanced(rng, SHAPES, n), _balanced(rng, SHAPES, n)
        colors_a, colors_b = _balanced(rng, COLOR_NAMES, n), _balanced(rng, COLOR_NAMES, n)
        relations = _balanced(rng, RELATIONS, n)
        for sa, sb, ca, cb, rel in zip(shapes_a, shapes_b, colors_a, colors_b, relations):
            if (sa, ca) == (sb, cb):  # same shape and colour would make the two objects indistinguishable
                cb = COLOR_NAMES[(COLOR_NAMES.index(cb) + 1) % len(COLOR_NAMES)]
            prompts.append({"objects": [_obj(sa, ca, maybe_size()), _obj(sb, cb, maybe_size())],
                            "relation": {"a": 0, "rel": rel, "b": 1}})
    return [{"text": prompt_text(p), **p} for p in prompts]


_OBJ_RE = (rf"an? (?:({'|'.join(SIZE_NAMES)}) )?({'|'.join(COLOR_NAMES)}) ({'|'.join(SHAPES)})")
_SINGLE_RE = re.compile(rf"^{_OBJ_RE}(?: in the (center|(?:{'|'.join(ROWS)}) (?:{'|'.join(COLS)})))?$")
_TWO_RE = re.compile(rf"^{_OBJ_RE} ({'|'.join(RELATIONS)}) {_OBJ_RE}$")


def parse_prompt(text: str) -> dict:
    """Turn a prompt written in the caption grammar back into a structured prompt (inverse of `prompt_text`).

    Args:
        text: e.g. "a small red star in the top left" or "a red star above a blue ring".

    Raises:
        UserError: the text is not in the grammar.
    """
    text = " ".join(text.strip().split())
    if m := _SINGLE_RE.match(text):
        size, color, shape, where = m.groups()
        cell = None
        if where == "center":
            cell = [1, 1]
        elif where:
            row, col = where.split()
            cell = [ROWS.index(row), COLS.index(col)]
        return {"text": text, "objects": [_obj(shape, color, size, cell)], "relation": None}
    if m := _TWO_RE.match(text):
        g = m.groups()
        return {"text": text, "objects": [_obj(g[2], g[1], g[0]), _obj(g[6], g[5], g[4])],
                "relation": {"a": 0, "rel": g[3], "b": 1}}
    raise UserError(f"cannot parse prompt {text!r}: write 'a [small|large] <colour> <shape> [in the <row> <col>]' "
                    "or '<object> <relation> <object>'")


def scene_for_prompt(prompt: dict, rng: np.random.Generator) -> list[dict]:
    """A random scene that satisfies a structured prompt: unspecified sizes and cells drawn, jitter as in the data.

    Args:
        prompt: from `make_prompts` / `parse_prompt`.
        rng: the generator every draw comes from.

    Returns:
        Objects for `render_scene` (shape, color, size, cell, center, brightness).
    """
    objs = prompt["objects"]
    cells = [o["cell"] for o in objs]
    if prompt["relation"] is not None:
        rel = prompt["relation"]
        pairs = [(ca, cb) for ca in CELLS for cb in CELLS if ca != cb
                 and rel["rel"] in true_relations({"cell": ca}, {"cell": cb})]
        ca, cb = pairs[int(rng.integers(len(pairs)))]
        cells[rel["a"]], cells[rel["b"]] = list(ca), list(cb)
    free = [c for c in CELLS if list(c) not in [c2 for c2 in cells if c2 is not None]]
    scene = []
    for obj, cell in zip(objs, cells):
        if cell is None:
            cell = list(free.pop(int(rng.integers(len(free)))))
        row, col = cell
        jitter = rng.uniform(-JITTER, JITTER, size=2)
        scene.append({"shape": obj["shape"], "color": obj["color"],
                      "size": obj["size"] or SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))], "cell": [row, col],
                      "center": cell_center((row, col), jitter), "brightness": float(rng.uniform(*BRIGHTNESS))})
    return scene


def render_prompts(prompts: Sequence[dict], seed: int = 0, size: int = 64) -> np.ndarray:
    """Render one scene per prompt with a sampled background, as the dataset does: uint8 (n, size, size, 3)."""
    images = []
    for i, prompt in enumerate(prompts):
        rng = np.random.default_rng([seed, 7, i])
        scene = scene_for_prompt(prompt, rng)
        images.append(np.asarray(render_scene(scene, size, sample_background(scene, rng))))
    return np.stack(images)


# --------------------------------------------------------------------------- targeted prompts (task_d)
TARGET_PROMPT_VERSION = 1  # bump when target_prompt or task_d's COCO prompts change: generated images are keyed by it
N_CAPTIONS = 5  # captions per image, as in the data


def target_rng(seed: int, category_id: int, index: int) -> np.random.Generator:
    """The generator of a target category's item `index`: item i is the same whatever else is drawn."""
    return np.random.default_rng([seed, TARGET_PROMPT_VERSION, category_id, index])


def target_prompt(target: dict, index: int, seed: int) -> dict:
    """One structured prompt for a target shape and 0-2 other objects, every attribute named, with its captions.

    Every object gets a colour, size and cell, so the oracle can check all of them and the paraphrases
    (`make_captions`) only say what the prompt says. One object uses the structured prompts' single-object grammar
    ("a small red hexagon in the top left", parseable by `parse_prompt`); more objects use the dataset's canonical
    caption (`describe`), scored object by object by cell.

    Args:
        target: {"category": a name in SHAPES, "category_id": its id}.
        index: the item's index within the target (ids and draws depend on it, not on how many are made).
        seed: the prompts' seed.

    Returns:
        {"id", "target", "category_id", "text", "prompt" (structured, with "text"), "captions" (N_CAPTIONS, the
        text first), "category_ids" (every object's), "seed" (the image noise seed)}.
    """
    rng = target_rng(seed, target["category_id"], index)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    shapes = [target["category"]] + [SHAPES[int(k)] for k in rng.integers(len(SHAPES), size=n - 1)]
    cells = rng.choice(len(CELLS), size=n, replace=False)
    objects = [{"shape": s, "color": list(COLORS)[int(rng.integers(len(COLORS)))],
                "size": list(SIZES)[int(rng.integers(len(SIZES)))], "cell": list(CELLS[int(c)])}
               for s, c in zip(shapes, cells)]
    prompt = {"objects": objects, "relation": None}
    text = prompt_text(prompt) if n == 1 else describe(objects)
    paraphrases = [c for c in make_captions(objects, rng, N_CAPTIONS) if c != text][:N_CAPTIONS - 1]
    return {"id": f"c{target['category_id']}-{index:05d}", "target": target["category"],
            "category_id": target["category_id"], "text": text, "prompt": dict(prompt, text=text),
            "captions": [text] + paraphrases, "category_ids": [SHAPES.index(s) + 1 for s in shapes],
            "seed": int(rng.integers(2**31 - 1))}


# --------------------------------------------------------------------------- shapes: one split
def image_id_for(split: str, index: int) -> int:
    return SPLIT_IDS[split] * ID_BLOCK + index + 1


def make_image(seed: int, split: str, index: int, size: int, probs: np.ndarray | None):
    """Sample, render and caption one image. Returns (image, record, areas)."""
    rng = image_rng(seed, split, index)
    objects = sample_objects(rng, probs)
    image, masks, boxes = _render(objects, size, sample_background(objects, rng))
    image_id = image_id_for(split, index)
    record = {
        "image_id": image_id,
        "path": f"{split}/{image_id:012d}.png",
        "width": size,
        "height": size,
        "captions": make_captions(objects, rng),
        "category_ids": [SHAPES.index(o["shape"]) + 1 for o in objects],
        "bboxes": boxes,
        "objects": [{"shape": o["shape"], "color": o["color"], "size": o["size"], "cell": list(o["cell"])}
                    for o in objects],
    }
    return image, record, [float(m.sum()) for m in masks]


def _make_chunk(task):
    """Worker: make images [start, stop) of a split and write their PNGs."""
    out, seed, split, start, stop, size, probs = task
    results = []
    for index in range(start, stop):
        image, record, areas = make_image(seed, split, index, size, probs)
        image.save(Path(out) / record["path"], format="PNG")
        results.append((record, areas))
    return results


def _pool_map(fn, tasks: list, workers: int, total: int, desc: str, weight=lambda result: 1):
    """Ordered map with a progress bar; processes only when they help."""
    results = []
    with tqdm(total=total, desc=desc, unit="img", leave=False) as bar:
        if workers == 1 or len(tasks) == 1:
            iterator = map(fn, tasks)
            pool = None
        else:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            pool = ctx.Pool(min(workers, len(tasks)))
            iterator = pool.imap(fn, tasks)
        try:
            for result in iterator:
                results.append(result)
                bar.update(weight(result))
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    return results


def make_split(out: Path, seed: int, split: str, n: int, size: int, probs, workers: int):
    """All images of a split (PNG files written); returns (records, areas per record)."""
    (out / split).mkdir(parents=True, exist_ok=True)
    chunk = max(1, min(250, -(-n // (4 * workers))))
    tasks = [(str(out), seed, split, s, min(s + chunk, n), size, probs) for s in range(0, n, chunk)]
    chunks = _pool_map(_make_chunk, tasks, workers, n, f"{split} images", weight=len)
    pairs = [pair for part in chunks for pair in part]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def write_coco_json(out: Path, split: str, records: list[dict], areas: list[list[float]], seed: int) -> None:
    info = {"description": f"procedural shapes, split {split}, from generate_data.py", "version": "1.0", "seed": seed}
    images = [{"id": r["image_id"], "file_name": r["path"], "width": r["width"], "height": r["height"]}
              for r in records]
    instances, captions = [], []
    for rec, rec_areas in zip(records, areas):
        for j, (obj, bbox, area) in enumerate(zip(rec["objects"], rec["bboxes"], rec_areas)):
            instances.append({
                "id": rec["image_id"] * 10 + j + 1, "image_id": rec["image_id"],
                "category_id": rec["category_ids"][j], "bbox": bbox, "area": area, "iscrowd": 0,
                "attributes": {"color": obj["color"], "size": obj["size"], "cell": obj["cell"]},
            })
        for j, text in enumerate(rec["captions"]):
            captions.append({"id": rec["image_id"] * 10 + j + 1, "image_id": rec["image_id"], "caption": text})
    ann = out / "annotations"
    write_json(ann / f"instances_{split}.json", {"info": info, "licenses": [], "images": images,
                                                   "annotations": instances, "categories": list(CATEGORIES)})
    write_json(ann / f"captions_{split}.json", {"info": info, "licenses": [], "images": images,
                                                  "annotations": captions})


def build_shapes(args: argparse.Namespace) -> dict:
    """Render every requested split; write COCO json files; return the pickle's dict."""
    order = train_category_order(args.seed)
    rank_probs = category_probs(args.imbalance)
    counts = {s: getattr(args, f"n_{s}") for s in SPLITS}
    data = {
        "version": 1, "source": "shapes", "seed": args.seed, "image_size": args.size,
        "categories": [dict(c) for c in CATEGORIES], "colors": list(COLORS), "sizes": list(SIZES),
        "train_category_order": order, "train_category_probs": [float(p) for p in rank_probs],
        "splits": {},
    }
    for split in args.splits or SPLITS:
        if counts[split] == 0:
            continue
        probs = shape_probs(order, rank_probs) if split == "train" else None
        records, areas = make_split(args.out, args.seed, split, counts[split], args.size, probs, args.workers)
        write_coco_json(args.out, split, records, areas, args.seed)
        data["splits"][split] = records
    check(data["splits"], "no images to make: every requested split has 0 images")
    return data


# --------------------------------------------------------------------------- coco source
def parse_coco_mapping(items: list[str] | None, names: list[str]) -> dict[str, list[str]]:
    """COCO annotation name -> our splits, from --coco-splits' NAME=SPLIT items. Default (None): train* -> train,
    val* -> val and test."""
    mapping: dict[str, list[str]] = {}
    if items is None:
        for name in names:
            if name.startswith("train"):
                mapping[name] = ["train"]
            elif name.startswith("val"):
                mapping[name] = ["val", "test"]
    else:
        for item in items:
            name, sep, split = item.partition("=")
            check(sep == "=", f"bad --coco-splits item {item!r}; write NAME=SPLIT, e.g. val2017=test")
            check(split in SPLITS, f"unknown split {split!r} in --coco-splits; valid splits: {', '.join(SPLITS)}")
            check(name in names, f"no captions_{name}.json for --coco-splits item {item!r}; found: {', '.join(names)}")
            mapping.setdefault(name, []).append(split)
    targets = [s for splits in mapping.values() for s in splits]
    dup = sorted({s for s in targets if targets.count(s) > 1})
    if dup:
        raise UserError(f"split {dup[0]!r} would get images from several COCO sets; choose with --coco-splits")
    return mapping


def read_coco_json(path: Path) -> dict:
    check(path.is_file(), f"COCO annotation file not found: {path}")
    data = read_json(path)
    check(isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(data.get("annotations"), list),
          f"{path} is not a COCO annotation file (needs 'images' and 'annotations' lists)")
    return data


def find_image_dir(root: Path, name: str) -> Path:
    for folder in (root / name, root / "images" / name):
        if folder.is_dir():
            return folder
    raise UserError(f"no image folder for {name}: looked for {root / name} and {root / 'images' / name}")


def probe_image(path: str) -> tuple[str | None, tuple[int, int] | None]:
    """Whether an image file is usable: (None, (width, height)), or ('missing' | 'truncated' | 'unreadable', None).

    Decodes the whole file with the loader every script uses (`utils.load_rgb`): PIL's verify() reads a JPEG
    without decoding it and passes a truncated one, which then fails in the middle of a later run.
    """
    if not os.path.isfile(path):
        return "missing", None
    try:
        height, width = load_rgb(path).shape[:2]
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, struct.error, ...) for broken files
        return ("truncated" if "truncated" in str(err) else "unreadable"), None
    return None, (int(width), int(height))


def _probe_chunk(paths: list[str]) -> list[tuple[str | None, tuple[int, int] | None]]:
    return [probe_image(p) for p in paths]


def _as_id(value) -> int | None:
    """A COCO id as an int (ints and digit strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _caption_problem(ann: dict) -> str | None:
    """Why a caption annotation's text is unusable, or None."""
    if "caption" not in ann:
        return "missing caption"
    text = ann["caption"]
    if text is None:
        return "null caption"
    if not isinstance(text, str):
        return "caption not text"
    return None if text.strip() else "blank caption"


def _box_problem(box) -> str | None:
    """Why a bbox is malformed (not 4 finite numbers with positive width and height), or None."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in box):
        return "malformed box"
    return None if box[2] > 0 and box[3] > 0 else "box without area"


def clean_coco_annotations(captions: dict, instances: dict) -> tuple[dict, dict, dict, dict, Counter]:
    """The usable images, categories, captions and instances of one COCO annotation set, and what was dropped.

    Dropped (and counted by reason): image entries without an id or file name, or with an id seen before;
    categories without an id or name; captions that are missing, null, not text or blank, whose id repeats an
    earlier caption's, or whose image id is unknown; instances whose id repeats, whose image or category is
    unknown, or whose box is not 4 finite numbers with positive width and height. Boxes are checked against
    the image's pixels later (`fit_boxes`), once the file has been read.

    Returns:
        (images id -> entry, categories id -> {id, name, supercategory}, captions image id -> texts,
        instances image id -> [(category id, box)], Counter of dropped items by reason).
    """
    dropped: Counter = Counter()
    images: dict[int, dict] = {}
    for img in captions["images"]:
        image_id = _as_id(img.get("id")) if isinstance(img, dict) else None
        name = img.get("file_name") if isinstance(img, dict) else None
        if image_id is None or not isinstance(name, str) or not name.strip():
            dropped["image entries without id or file name"] += 1
        elif image_id in images:
            dropped["image entries with a duplicate id"] += 1
        else:
            images[image_id] = img
    categories: dict[int, dict] = {}
    for cat in instances.get("categories") or []:
        cat_id = _as_id(cat.get("id")) if isinstance(cat, dict) else None
        if cat_id is None or not isinstance(cat.get("name"), str) or not cat["name"].strip():
            dropped["categories without id or name"] += 1
        elif cat_id not in categories:
            categories[cat_id] = {"id": cat_id, "name": cat["name"].strip(),
                                  "supercategory": str(cat.get("supercategory") or "")}
    texts: dict[int, list[str]] = {}
    seen: set = set()
    for ann in captions["annotations"]:
        ann = ann if isinstance(ann, dict) else {}
        image_id, ann_id = _as_id(ann.get("image_id")), _as_id(ann.get("id"))
        problem = _caption_problem(ann)
        if problem is None and ann_id is not None and ann_id in seen:
            problem = "duplicate caption id"
        if problem is None and image_id not in images:
            problem = "caption of an unknown image id"
        if problem:
            dropped[problem] += 1
            continue
        seen.add(ann_id)
        texts.setdefault(image_id, []).append(" ".join(ann["caption"].split()))
    objects: dict[int, list[tuple[int, list[float]]]] = {}
    seen = set()
    for ann in instances["annotations"]:
        ann = ann if isinstance(ann, dict) else {}
        image_id, cat_id, ann_id = (_as_id(ann.get(k)) for k in ("image_id", "category_id", "id"))
        problem = None
        if ann_id is not None and ann_id in seen:
            problem = "duplicate instance id"
        elif image_id not in images:
            problem = "instance of an unknown image id"
        elif cat_id not in categories:
            problem = "instance of an unknown category"
        else:
            problem = _box_problem(ann.get("bbox"))
        if problem:
            dropped[problem] += 1
            continue
        seen.add(ann_id)
        objects.setdefault(image_id, []).append((cat_id, [float(v) for v in ann["bbox"]]))
    return images, categories, texts, objects, dropped


def coco_records(root: Path, name: str, captions: dict, instances: dict, out: Path) -> tuple[list[dict], dict, Counter]:
    """One record per usable image entry of a COCO annotation set (paths relative to `out`), before probing files.

    Returns:
        (records sorted by image id, categories id -> entry, Counter of dropped annotations by reason).
    """
    folder = find_image_dir(root, name)
    images, categories, texts, objects, dropped = clean_coco_annotations(captions, instances)
    records = []
    for image_id in sorted(images):
        anns = objects.get(image_id, [])
        records.append({
            "image_id": image_id,
            "path": Path(os.path.relpath(folder / images[image_id]["file_name"], out.resolve())).as_posix(),
            "width": 0, "height": 0,  # the file's own size, filled in when it is probed
            "captions": texts.get(image_id, []),
            "category_ids": [cat_id for cat_id, _ in anns],
            "bboxes": [box for _, box in anns],
            "objects": [],
        })
    return records, categories, dropped


def fit_boxes(record: dict) -> Counter:
    """Clip a record's boxes to its image; drop (with their category) those entirely outside it. Returns counts."""
    width, height = record["width"], record["height"]
    counts: Counter = Counter()
    kept_ids, kept_boxes = [], []
    for cat_id, (x, y, w, h) in zip(record["category_ids"], record["bboxes"]):
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
        if x1 <= x0 or y1 <= y0:
            counts["box outside the image"] += 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            counts["box clipped to the image"] += 1
        kept_ids.append(cat_id)
        kept_boxes.append([x0, y0, x1 - x0, y1 - y0])
    record["category_ids"], record["bboxes"] = kept_ids, kept_boxes
    return counts


def _counts_text(counter: Counter) -> str:
    return ", ".join(f"{v} {k}" for k, v in sorted(counter.items()))


def build_coco(args: argparse.Namespace) -> dict:
    """Read a COCO folder into the pickle's dict: clean annotations, split, probe images, drop the unusable ones.

    Every dropped annotation and skipped image is counted by reason, printed, and kept in the pickle's
    `dropped` dict ({"annotations": {coco set: counts}, "images": {split: counts}, "boxes": {split: counts}}).
    """
    root = args.coco_root.expanduser().resolve()  # physical paths, so '..' in relative paths resolves right
    check(root.is_dir(), f"COCO root not found: {root}")
    ann_dir = root / "annotations"
    check(ann_dir.is_dir(), f"no annotations folder in {root} (expected {ann_dir})")
    names = sorted(p.name[len("captions_"):-len(".json")] for p in ann_dir.glob("captions_*.json"))
    check(names, f"no captions_<name>.json files in {ann_dir}")
    mapping = parse_coco_mapping(args.coco_splits, names)
    available = {s for splits in mapping.values() for s in splits}
    wanted = args.splits or [s for s in SPLITS if s in available]
    for split in wanted:
        check(split in available, f"split {split!r} has no COCO source here; map one with --coco-splits NAME={split}")

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)  # paths like out/../coco/x.jpg only resolve once out exists
    categories: dict[int, dict] = {}
    splits: dict[str, list[dict]] = {}
    dropped: dict[str, dict[str, Counter]] = {"annotations": {}, "images": {}, "boxes": {}}
    for name, targets in mapping.items():
        if not set(targets) & set(wanted):
            continue
        captions = read_coco_json(ann_dir / f"captions_{name}.json")
        instances = read_coco_json(ann_dir / f"instances_{name}.json")
        records, cats, dropped["annotations"][name] = coco_records(root, name, captions, instances, out)
        for cat_id, cat in cats.items():
            categories.setdefault(cat_id, cat)
        # A seeded shuffle divides one COCO set (e.g. val2017) into several splits (val, test).
        rng = np.random.default_rng([args.seed, *name.encode()])
        parts = np.array_split(rng.permutation(len(records)), len(targets))
        for split, part in zip(targets, parts):
            if split in wanted:
                splits[split] = [records[i] for i in sorted(part)]

    for name, counter in dropped["annotations"].items():
        if counter:
            print(f"{name}: dropped {sum(counter.values())} annotations ({_counts_text(counter)})")
    for split in [s for s in SPLITS if s in splits]:
        splits[split], dropped["images"][split] = drop_unusable(out, splits[split], args.workers, split)
        counter = dropped["images"][split]
        check(splits[split], f"no usable images left for split {split!r} ({_counts_text(counter)})")
        if counter:
            print(f"{split}: skipped {sum(counter.values())} of {sum(counter.values()) + len(splits[split])} "
                  f"images ({_counts_text(counter)})")
        dropped["boxes"][split] = sum((fit_boxes(rec) for rec in splits[split]), Counter())
        if dropped["boxes"][split]:
            print(f"{split}: {_counts_text(dropped['boxes'][split])} (a box outside its image is dropped with its "
                  "category)")
    return {"version": 1, "source": "coco", "seed": args.seed, "image_size": None,
            "categories": [categories[k] for k in sorted(categories)], "colors": [], "sizes": [],
            "splits": {s: splits[s] for s in SPLITS if s in splits},
            "dropped": {kind: {k: dict(sorted(v.items())) for k, v in per.items()} for kind, per in dropped.items()}}


def drop_unusable(out: Path, records: list[dict], workers: int, split: str) -> tuple[list[dict], Counter]:
    """Keep records with captions whose image file exists and decodes in full (its size recorded); count the rest."""
    kept, skipped = [], Counter()
    with_captions = []
    for rec in records:
        if rec["captions"]:
            with_captions.append(rec)
        else:
            skipped["without captions"] += 1
    paths = [str(out / r["path"]) for r in with_captions]
    chunk = 64
    tasks = [paths[s:s + chunk] for s in range(0, len(paths), chunk)]
    verdicts = [v for part in _pool_map(_probe_chunk, tasks, workers, len(paths), f"{split} images", weight=len)
                for v in part]
    for rec, (verdict, size) in zip(with_captions, verdicts):
        if verdict:
            skipped[verdict] += 1
        else:
            rec["width"], rec["height"] = size
            kept.append(rec)
    return kept, skipped


# --------------------------------------------------------------------------- output
def write_pickle(path: Path, data: dict) -> None:
    """Atomic write: a crash never leaves a half pickle where the other scripts look."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        pickler = pickle.Pickler(fh, protocol=pickle.HIGHEST_PROTOCOL)
        # No memo: bytes then depend only on content, not on which strings the worker processes happened
        # to share, so a seed gives the same file with any --workers. The data has no cycles.
        pickler.fast = True
        pickler.dump(data)
    os.replace(tmp, path)


def print_summary(data: dict, path: Path, seconds: float) -> None:
    sizes = ", ".join(f"{split} {len(recs)}" for split, recs in data["splits"].items())
    print(f"wrote {path} ({data['source']}): {sizes} images in {seconds:.1f} s")
    if "train" in data["splits"]:
        names = {c["id"]: c["name"] for c in data["categories"]}
        counts = Counter(c for rec in data["splits"]["train"] for c in rec["category_ids"])
        present = [counts.get(k, 0) for k in names]
        print("train instances per category: " + ", ".join(
            f"{names[k]} {counts[k]}" for k in sorted(names, key=lambda k: -counts.get(k, 0))))
        if present and min(present) > 0:
            print(f"train commonest/rarest instance ratio: {max(present) / min(present):.1f}")
        else:
            print(f"train commonest/rarest instance ratio: inf ({present.count(0)} of {len(present)} categories "
                  "have no instance)")


def main(argv=None) -> dict:
    # 1. arguments
    args = parse_args(argv)
    start = time.perf_counter()
    # 2. images, captions and annotations
    data = build_shapes(args) if args.source == "shapes" else build_coco(args)
    # 3. the pickle every other script reads; check that the loader accepts it
    path = args.out / "data.pkl"
    write_pickle(path, data)
    load_data(path, splits=list(data["splits"]))
    print_summary(data, path, time.perf_counter() - start)
    return data


if __name__ == "__main__":
    cli(main)
