"""Prompt fidelity: does a text-to-image model draw what the prompt asks for, and how real do its images look?

GenEval's idea with exact ground truth. Structured prompts in the shapes world's caption grammar
("a small red star", "a blue hexagon in the top left", "a red star to the left of a small blue
circle") are generated with explicit seeds; an oracle CNN trained on rendered scenes with known
labels reads every image back (per 3x3 cell: empty or one of 12 shapes, 8 colours, 2 sizes), and
each image is scored on exactly the attributes its prompt names: shape, colour, size, position
(absolute cell or the relation), object count, and all of them at once. Next to it: a Fréchet
distance in EfficientNet-Lite0 feature space (an offline stand-in for FID) with its real-vs-real
floor, and an alignment score from our retrieval model (a CLIPScore stand-in).

Commands:
    python fidelity.py train-oracle --quick     # smoke run, ~1 min, writes outputs/fidelity/oracle-quick
    python fidelity.py train-oracle             # the shipped oracle in models/shapes-oracle (~20 min on 2 busy cores)
    python fidelity.py evaluate-model --model shapes-tiny --quick   # smoke run, < 1 min
    python fidelity.py evaluate-model --model shapes-tiny     # 200 + 200 prompts, FD on 400 caption images
    python fidelity.py evaluate-model --model sd-turbo --out outputs/fidelity/sd-turbo/metrics.json

The shipped oracle gets 0.995 of 5000 held-out rendered scenes entirely right (models/shapes-oracle/README.md).
Read FD next to fd_real_vs_real: with n = 400 images per set two real sets are already ~30 apart.

Outputs: models/shapes-oracle/{model.safetensors, config.json, metrics.json, README.md} (train-oracle);
<model folder>/metrics.json and fidelity_grid.png for a local model, else outputs/fidelity/<model>/ (evaluate-model).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import generate_data as gd
from utils import (DEFAULT_DATA, DEFAULT_IMAGE_ENCODER, OUTPUTS, REPO, UserError, bootstrap_ci, cached, check, cli, encode_images,
                   encode_texts, generate_images, image_grid, library_versions, load_data, load_image_encoder,
                   load_pipeline, load_rgb, load_text_encoder, make_run_dir, pick_device, read_json,
                   resolve_model,
                   update_latest, write_json, write_text)

COMMANDS = ("train-oracle", "evaluate-model", "audit")
DEFAULT_AUDIT = REPO / "models" / "shapes-oracle" / "audit.json"
KINDS = ("single", "two")
DEFAULT_ORACLE = REPO / "models" / "shapes-oracle"
DEFAULT_HEADS = OUTPUTS / "retrieval" / "latest" / "heads.pt"
IMAGE_SIZE = 64  # the oracle's input side; other sizes are resized to it
EMPTY = "empty"
UNRECOGNISABLE = "unrecognisable"
# Per-cell class: nothing, one of the shapes, or something that is no recognisable shape (blurred, melted, partial,
# a blob); the last is what lets the oracle reject instead of naming the nearest shape.
CLASSES = (EMPTY,) + gd.SHAPES + (UNRECOGNISABLE,)
SHAPE_IDS = range(1, len(gd.SHAPES) + 1)
COLOR_NAMES = tuple(gd.COLORS)
SIZE_NAMES = tuple(gd.SIZES)
ATTRIBUTES = ("shape", "color", "size", "position", "count", "all")
FD_RES = 128  # EfficientNet input side for 64-px images (2x, as retrieval.py uses)
TRAIN_SEED, HELDOUT_SEED = 0, 1  # oracle training scenes and held-out scenes never share a seed
VAL_SEED, TEST_SEED = 2, 3  # calibration/threshold scenes, and the scenes the ECE is measured on
# Negatives: the recipes the oracle learns "unrecognisable" from, and a different family it is graded on.
TRAIN_NEGATIVES = ("blur", "elastic", "melt", "fuse", "partial", "blob", "noise")
HELDOUT_NEGATIVES = ("ellipse", "irregular", "overlap", "boxblur")
MAX_FALSE_REJECT_VAL = 0.005  # the operating threshold keeps false rejects of clean val objects at most this
MIN_VAL_ACCURACY = 0.993  # ... and whole-scene accuracy on clean val scenes at least this (target 0.99, with margin)
SIZE_PROB, POSITION_PROB = 0.5, 0.5  # how often a prompt names an object's size / absolute cell


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("-h", "--help"):
        check(argv[0] in COMMANDS, f"unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}")
    check(bool(argv), f"no command given; choose one of {', '.join(COMMANDS)}")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = sub.add_parser("train-oracle", help="train the per-cell oracle CNN on rendered scenes", formatter_class=fmt)
    t.add_argument("--out", type=Path, default=None,
                   help=f"folder for weights, config, metrics and card (default {DEFAULT_ORACLE}; "
                        "--quick: outputs/fidelity/oracle-quick)")
    t.add_argument("--n-train", type=int, default=20000, help="rendered training scenes")
    t.add_argument("--n-heldout", type=int, default=5000, help="held-out rendered scenes (a different seed)")
    t.add_argument("--n-negatives", type=int, default=8000,
                   help=f"training scenes with 1-2 objects made unrecognisable ({', '.join(TRAIN_NEGATIVES)})")
    t.add_argument("--n-val", type=int, default=2000,
                   help="clean and as many negative validation scenes (seed 2) for the temperature and threshold")
    t.add_argument("--epochs", type=int, default=8, help="passes over the training scenes")
    t.add_argument("--batch-size", type=int, default=128, help="scenes per step")
    t.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (one-cycle schedule)")
    t.add_argument("--seed", type=int, default=TRAIN_SEED, help="seed of the training scenes, init and batches")
    t.add_argument("--heldout-seed", type=int, default=HELDOUT_SEED, help="seed of the held-out scenes (!= --seed)")
    t.add_argument("--data", default=str(DEFAULT_DATA),
                   help="data.pkl whose test split is also scored, if it exists ('' to skip)")
    t.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    t.add_argument("--device", default="auto", help="cpu, cuda or auto")
    t.add_argument("--quick", action="store_true", help="smoke run: 2000 train / 500 held-out scenes, 1 epoch")

    e = sub.add_parser("evaluate-model", help="score a text-to-image model with the oracle, FD and alignment",
                       formatter_class=fmt)
    e.add_argument("--model", default="shapes-tiny",
                   help="registry name (shapes-tiny, sd-turbo, ...), local pipeline folder or hub id")
    e.add_argument("--n-prompts", type=int, default=200, help="prompts per kind (one image each)")
    e.add_argument("--kinds", default="single,two", help=f"comma-separated prompt kinds: {', '.join(KINDS)}")
    e.add_argument("--seed", type=int, default=0, help="seed of the prompts and of image i's noise (seed + i)")
    e.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's recommended)")
    e.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: recommended)")
    e.add_argument("--scheduler", default=None, help="diffusers scheduler class to swap in (default: the model's)")
    e.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    e.add_argument("--n-fd", type=int, default=400,
                   help="images per set for the Fréchet distance (0 = skip); needs 2x this many real images")
    e.add_argument("--fd-from", default="captions",
                   help="what the FD images are generated from: 'captions' (one per real reference image, from "
                        "its first caption, as COCO FID does) or 'prompts' (reuse the fidelity images: no extra "
                        "generation, but their prompt mix differs from the real set's)")
    e.add_argument("--data", default=str(DEFAULT_DATA), help="data.pkl with the real images (test split, then val)")
    e.add_argument("--oracle", default=str(DEFAULT_ORACLE), help="oracle folder from train-oracle")
    e.add_argument("--heads", default=None,
                   help=f"retrieval heads.pt for the alignment score (default {DEFAULT_HEADS} when it exists; "
                        "'' to skip)")
    e.add_argument("--out", type=Path, default=None,
                   help="metrics.json path (default: <model folder>/metrics.json, or outputs/fidelity/<model>/ "
                        "for hub models)")
    e.add_argument("--grid-rows", type=int, default=8, help="prompts per kind shown in the sample grid")
    e.add_argument("--device", default="auto", help="cpu, cuda or auto")
    e.add_argument("--quick", action="store_true", help="smoke run: 4 prompts per kind, FD on 8 images, <= 4 steps")
    a = sub.add_parser("audit", help="by-eye audit of the oracle filter: contact sheets of accepted and rejected "
                                     "generated images (make), then precision and recall from the labels (score)",
                       formatter_class=fmt)
    a.add_argument("step", choices=("make", "score"), help="make: generate, filter and draw the sheets; score: "
                                                          "precision/recall from the labels in --audit")
    a.add_argument("--model", default="shapes-tiny", help="generator whose images are audited (registry name or folder)")
    a.add_argument("--n", type=int, default=64, help="accepted and as many rejected images to label")
    a.add_argument("--max-candidates", type=int, default=2400, help="give up after this many generated images")
    a.add_argument("--min-score", type=float, default=0.5, help="task_d's filter: fraction of named checks passed")
    a.add_argument("--seed", type=int, default=0, help="seed of the prompts, the noise and the sheet order")
    a.add_argument("--oracle", default=str(DEFAULT_ORACLE), help="oracle folder")
    a.add_argument("--audit", type=Path, default=DEFAULT_AUDIT, help="the audit file (labels kept in the repo)")
    a.add_argument("--sheets", type=Path, default=OUTPUTS / "fidelity" / "audit",
                   help="folder for the unlabelled contact sheets and the candidate images")
    a.add_argument("--device", default="auto", help="cpu, cuda or auto")
    args = p.parse_args(argv)
    {"train-oracle": check_train_args, "evaluate-model": check_evaluate_args,
     "audit": check_audit_args}[args.command](args)
    return args


def check_audit_args(args: argparse.Namespace) -> None:
    check(args.n > 0 and args.max_candidates >= 2 * args.n,
          f"--n must be > 0 and --max-candidates >= 2 x --n, got {args.n} and {args.max_candidates}")
    check(0 <= args.min_score <= 1, f"--min-score must be in 0..1, got {args.min_score}")
    if args.step == "score":
        check(args.audit.is_file(), f"audit file not found: {args.audit} (run `python fidelity.py audit make` first)")


def check_train_args(args: argparse.Namespace) -> None:
    if args.quick:
        args.n_train, args.n_heldout, args.epochs = min(args.n_train, 2000), min(args.n_heldout, 500), 1
        args.n_negatives, args.n_val = min(args.n_negatives, 800), min(args.n_val, 200)
        args.out = args.out or OUTPUTS / "fidelity" / "oracle-quick"
    args.out = args.out or DEFAULT_ORACLE
    for name in ("n_train", "n_heldout", "n_negatives", "n_val", "epochs", "batch_size"):
        check(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check(args.lr > 0, f"--lr must be positive, got {args.lr}")
    check(args.threads >= 0, f"--threads must be >= 0, got {args.threads}")
    check(args.seed != args.heldout_seed, f"--heldout-seed must differ from --seed (both {args.seed}): "
                                          "held-out scenes must be new")


def check_evaluate_args(args: argparse.Namespace) -> None:
    if args.quick:
        args.n_prompts, args.n_fd, args.grid_rows = min(args.n_prompts, 4), min(args.n_fd, 8), min(args.grid_rows, 4)
    check(args.n_prompts > 0, f"--n-prompts must be positive, got {args.n_prompts}")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    check(bool(args.kinds), "--kinds is empty")
    for kind in args.kinds:
        check(kind in KINDS, f"unknown prompt kind {kind!r} in --kinds; choose from {', '.join(KINDS)}")
    check(args.steps is None or args.steps > 0, f"--steps must be positive, got {args.steps}")
    check(args.guidance is None or args.guidance >= 0, f"--guidance must be >= 0, got {args.guidance}")
    check(args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}")
    check(args.n_fd == 0 or args.n_fd >= 2, f"--n-fd must be 0 (skip) or >= 2, got {args.n_fd}")
    check(args.fd_from in ("captions", "prompts"), f"unknown --fd-from {args.fd_from!r}; choose captions or prompts")
    check(args.grid_rows >= 0, f"--grid-rows must be >= 0, got {args.grid_rows}")
    n_images = args.n_prompts * len(args.kinds)
    check(args.fd_from == "captions" or args.n_fd <= n_images,
          f"--fd-from prompts reuses the {n_images} prompt images: --n-fd must be <= {n_images}, got {args.n_fd}")


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
    """The caption-grammar sentence for a structured prompt (the same phrases generate_data.py captions use)."""
    # generate_data's own phrase builder, so the wording is exactly what the diffusion model was trained on.
    def phrase(o: dict, position: bool = False) -> str:
        return gd._phrase(o, color=True, size=o["size"] is not None, position=position)

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
        {"a": 0, "rel": one of generate_data.RELATIONS, "b": 1}}.
    """
    check(kind in KINDS, f"unknown prompt kind {kind!r}; choose one of {', '.join(KINDS)}")
    check(isinstance(n, (int, np.integer)) and n > 0, f"number of prompts must be a positive integer, got {n}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])

    def maybe_size() -> str | None:
        return SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))] if rng.random() < SIZE_PROB else None

    prompts = []
    if kind == "single":
        pairs = _balanced(rng, list(itertools.product(gd.SHAPES, COLOR_NAMES)), n)
        for shape, color in pairs:
            size = maybe_size()
            cell = gd.CELLS[int(rng.integers(len(gd.CELLS)))] if rng.random() < POSITION_PROB else None
            prompts.append({"objects": [_obj(shape, color, size, cell)], "relation": None})
    else:
        shapes_a, shapes_b = _balanced(rng, gd.SHAPES, n), _balanced(rng, gd.SHAPES, n)
        colors_a, colors_b = _balanced(rng, COLOR_NAMES, n), _balanced(rng, COLOR_NAMES, n)
        relations = _balanced(rng, gd.RELATIONS, n)
        for sa, sb, ca, cb, rel in zip(shapes_a, shapes_b, colors_a, colors_b, relations):
            if (sa, ca) == (sb, cb):  # same shape and colour would make the two objects indistinguishable
                cb = COLOR_NAMES[(COLOR_NAMES.index(cb) + 1) % len(COLOR_NAMES)]
            prompts.append({"objects": [_obj(sa, ca, maybe_size()), _obj(sb, cb, maybe_size())],
                            "relation": {"a": 0, "rel": rel, "b": 1}})
    return [{"text": prompt_text(p), **p} for p in prompts]


_OBJ_RE = (rf"an? (?:({'|'.join(SIZE_NAMES)}) )?({'|'.join(COLOR_NAMES)}) ({'|'.join(gd.SHAPES)})")
_SINGLE_RE = re.compile(rf"^{_OBJ_RE}(?: in the (center|(?:{'|'.join(gd.ROWS)}) (?:{'|'.join(gd.COLS)})))?$")
_TWO_RE = re.compile(rf"^{_OBJ_RE} ({'|'.join(gd.RELATIONS)}) {_OBJ_RE}$")


def parse_prompt(text: str) -> dict:
    """Turn a prompt written in the caption grammar back into a structured prompt (inverse of `prompt_text`).

    Args:
        text: e.g. "a small red star in the top left" or "a red star above a blue ring".
    """
    text = " ".join(text.strip().split())
    if m := _SINGLE_RE.match(text):
        size, color, shape, where = m.groups()
        cell = None
        if where == "center":
            cell = [1, 1]
        elif where:
            row, col = where.split()
            cell = [gd.ROWS.index(row), gd.COLS.index(col)]
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
        Objects for `generate_data.render_scene` (shape, color, size, cell, center, brightness).
    """
    objs = prompt["objects"]
    cells = [o["cell"] for o in objs]
    if prompt["relation"] is not None:
        rel = prompt["relation"]
        pairs = [(ca, cb) for ca in gd.CELLS for cb in gd.CELLS if ca != cb
                 and rel["rel"] in gd.true_relations({"cell": ca}, {"cell": cb})]
        ca, cb = pairs[int(rng.integers(len(pairs)))]
        cells[rel["a"]], cells[rel["b"]] = list(ca), list(cb)
    free = [c for c in gd.CELLS if list(c) not in [c2 for c2 in cells if c2 is not None]]
    scene = []
    for obj, cell in zip(objs, cells):
        if cell is None:
            cell = list(free.pop(int(rng.integers(len(free)))))
        row, col = cell
        jitter = rng.uniform(-gd.JITTER, gd.JITTER, size=2)
        scene.append({"shape": obj["shape"], "color": obj["color"],
                      "size": obj["size"] or SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))], "cell": [row, col],
                      "center": [float((col + 0.5) / 3 + jitter[0]), float((row + 0.5) / 3 + jitter[1])],
                      "brightness": float(rng.uniform(0.85, 1.1))})
    return scene


def render_prompts(prompts: Sequence[dict], seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """Render one scene per prompt with a sampled background, as the dataset does: uint8 (n, size, size, 3)."""
    images = []
    for i, prompt in enumerate(prompts):
        rng = np.random.default_rng([seed, 7, i])
        scene = scene_for_prompt(prompt, rng)
        images.append(np.asarray(gd.render_scene(scene, size, gd.sample_background(scene, rng))))
    return np.stack(images)


# --------------------------------------------------------------------------- the oracle
class OracleNet(nn.Module):
    """A small CNN that reads a 64-px scene as a 3x3 grid: per cell, class (empty or shape), colour and size.

    The stride-8 feature map (8x8) is resampled to 9x9, whose points sit at the centres of 9 equal bins of the
    image, so it splits exactly into 3x3 blocks, one per cell; one head, shared by all cells (plus a learned cell
    embedding for border effects), reads each block. BatchNorm halves the speed of a step on CPU but learns
    shapes far faster per step: with it (and the occupied-cell loss term) shapes were 0.93 right after 25k
    scenes; a first version with neither was at 0.20 after 30k.

    Args:
        widths: channels of the 5 conv layers.
        hidden: hidden units of the per-cell head.
    """

    def __init__(self, widths: Sequence[int] = (24, 32, 48, 64, 64), hidden: int = 128, n_classes: int = len(CLASSES)):
        super().__init__()
        w = list(widths)

        def conv(c_in, c_out, k=3, stride=1):
            return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(3, w[0], 5, stride=2),                        # 64 -> 32
            *conv(w[0], w[1], stride=2),                        # 32 -> 16
            *conv(w[1], w[2]), nn.MaxPool2d(2),                 # 16 -> 8
            *conv(w[2], w[3]),
            *conv(w[3], w[4]),
        )
        self.cell_embed = nn.Parameter(torch.zeros(9, 16))
        self.head = nn.Sequential(nn.Linear(w[4] * 9 + 16, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, n_classes + len(COLOR_NAMES) + len(SIZE_NAMES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 64, 64) in [-1, 1] -> logits (B, 9, classes + colours + sizes), cells in reading order."""
        f = F.interpolate(self.features(x), size=(9, 9), mode="bilinear", align_corners=False)
        b, c = f.shape[:2]
        cells = f.reshape(b, c, 3, 3, 3, 3).permute(0, 2, 4, 1, 3, 5).reshape(b, 9, c * 9)
        return self.head(torch.cat([cells, self.cell_embed.expand(b, -1, -1)], dim=-1))


def split_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class, colour, size) logits from the oracle's concatenated per-cell output."""
    a = logits.shape[-1] - len(COLOR_NAMES) - len(SIZE_NAMES)  # an oracle without the reject class has one less
    return logits[..., :a], logits[..., a:a + len(COLOR_NAMES)], logits[..., a + len(COLOR_NAMES):]


def to_uint8_64(images) -> np.ndarray:
    """uint8 (n, 64, 64, 3) from arrays / PIL images of any size (antialiased resize), as the oracle expects."""
    from PIL import Image

    out = []
    for im in images:
        if not isinstance(im, Image.Image):
            im = np.asarray(im)
            check(im.dtype == np.uint8, f"images must be uint8 in 0..255, got {im.dtype} (scale float images by 255)")
            im = Image.fromarray(im)
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)
        out.append(np.asarray(im))
    return np.stack(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def _to_input(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = (torch.from_numpy(np.array(batch)) if isinstance(batch, np.ndarray) else batch).permute(0, 3, 1, 2).float()
    return ((x / 127.5) - 1.0).contiguous(memory_format=torch.channels_last)


class Oracle:
    """The trained per-cell CNN with its labels: detect objects in images and score them against prompts.

    Args:
        net: an `OracleNet`.
        config: its constructor arguments and label lists (saved next to the weights).
    """

    def __init__(self, net: OracleNet, config: dict):
        self.net, self.config = net.eval(), config
        self.device = next(net.parameters()).device

    @classmethod
    def load(cls, path: str | Path = DEFAULT_ORACLE, device=None) -> "Oracle":
        """Load an oracle folder written by `python fidelity.py train-oracle`."""
        from safetensors.torch import load_file

        path = Path(path)
        check((path / "model.safetensors").is_file() and (path / "config.json").is_file(),
              f"oracle not found in {path} (train it with `python fidelity.py train-oracle`)")
        config = read_json(path / "config.json")
        # An oracle from before the reject class reads the same labels, only never "unrecognisable".
        check(config.get("classes") in (list(CLASSES), list(CLASSES[:-1])) and config.get("colors") == list(COLOR_NAMES),
              f"oracle in {path} was trained for other labels than generate_data.py has now; retrain it")
        net = OracleNet(config["widths"], config["hidden"], len(config["classes"]))
        net.load_state_dict(load_file(str(path / "model.safetensors")))
        return cls(net.to(device or pick_device()).to(memory_format=torch.channels_last), config)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        write_json(path / "config.json", self.config)

    def predict(self, images, batch_size: int = 256, progress: bool = False) -> dict[str, np.ndarray]:
        """Per-cell label indices {"class", "color", "size"}, int (n, 9), cells in reading order, and the calibrated
        class probability {"confidence"} (n, 9); a doubtful shape reads as "unrecognisable" (see `decide`)."""
        from tqdm.auto import tqdm

        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3)):
            images = to_uint8_64(images)
        out = {"class": [], "color": [], "size": [], "confidence": []}
        for s in tqdm(range(0, len(images), batch_size), desc="oracle", leave=False, disable=not progress):
            with torch.inference_mode():
                logits = self.net(_to_input(images[s:s + batch_size]).to(self.device))
            cls, col, siz = split_logits(logits)
            cls, conf = self.decide(cls)
            for key, part in zip(out, (cls, col.argmax(-1), siz.argmax(-1), conf)):
                out[key].append(part.cpu().numpy())
        return {k: np.concatenate(v) if v else np.zeros((0, 9), np.float32 if k == "confidence" else np.int64)
                for k, v in out.items()}

    def decide(self, class_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell class with the calibrated confidence: a shape read with confidence below the operating
        threshold becomes "unrecognisable" (config["temperature"], config["threshold"]; 1 and 0 when absent)."""
        probs = torch.softmax(class_logits.float() / self.config.get("temperature", 1.0), -1)
        conf, cls = probs.max(-1)
        is_shape = (cls >= SHAPE_IDS.start) & (cls < SHAPE_IDS.stop)
        cls = torch.where(is_shape & (conf < self.config.get("threshold", 0.0)), CLASSES.index(UNRECOGNISABLE), cls)
        return cls, conf

    def detect(self, images, progress: bool = False) -> list[list[dict]]:
        """Objects found in each image: [{"shape", "color", "size", "cell": [r, c]}], in reading order.

        Args:
            images: uint8 (n, H, W, 3) array or a list of arrays / PIL images; resized to 64x64.
            progress: show a progress bar.
        """
        return predictions_to_objects(self.predict(images, progress=progress))

    def score(self, images, prompts: Sequence[dict], progress: bool = False) -> list[dict]:
        """Per-image booleans for the attributes each prompt names (see `score_detections`)."""
        check(len(images) == len(prompts), f"{len(images)} images but {len(prompts)} prompts")
        return [score_detections(d, p) for d, p in zip(self.detect(images, progress), prompts)]


def predictions_to_objects(pred: dict[str, np.ndarray]) -> list[list[dict]]:
    """Per-cell label indices (from `Oracle.predict` or ground truth) -> object lists."""
    scenes = []
    for cls, col, siz in zip(pred["class"], pred["color"], pred["size"]):
        scenes.append([{"shape": CLASSES[k], "color": COLOR_NAMES[col[j]], "size": SIZE_NAMES[siz[j]],
                        "cell": list(gd.CELLS[j])} for j, k in enumerate(cls) if k != 0])
    return scenes


def score_detections(detections: list[dict], prompt: dict) -> dict:
    """Check a prompt's named attributes against one image's detections.

    Prompt objects are matched to detections by the assignment that satisfies the most checks (every injective
    assignment is tried; a prompt object may stay unmatched, which fails its checks). Keys: shape, color, size
    (None when the prompt names no size), position (the absolute cell for single-object prompts that name one, the
    relation for two-object prompts, else None), count (exactly as many objects as the prompt names) and all
    (every non-None key, count included: an extra object is a failure too).

    Args:
        detections: one image's objects (from `Oracle.detect`).
        prompt: a structured prompt.
    """
    objs, rel = prompt["objects"], prompt["relation"]
    options = list(range(len(detections))) + [None] * len(objs)
    best, best_points = None, -1
    for assign in dict.fromkeys(itertools.permutations(options, len(objs))):
        matched = [None if j is None else detections[j] for j in assign]
        checks = _checks(objs, rel, matched)
        points = sum(sum(v) for v in checks.values())
        if points > best_points:
            best, best_points = checks, points
    result = {k: (all(v) if v else None) for k, v in best.items()}
    result["count"] = len(detections) == len(objs)
    result["all"] = all(v for k, v in result.items() if v is not None)
    return result


def _checks(objs: list[dict], rel: dict | None, matched: list[dict | None]) -> dict[str, list[bool]]:
    """Per-object booleans of one assignment; an empty list means the prompt does not name that attribute."""
    out: dict[str, list[bool]] = {"shape": [], "color": [], "size": [], "position": []}
    for o, d in zip(objs, matched):
        out["shape"].append(d is not None and d["shape"] == o["shape"])
        out["color"].append(d is not None and d["color"] == o["color"])
        if o["size"] is not None:
            out["size"].append(d is not None and d["size"] == o["size"])
        if rel is None and o["cell"] is not None:
            out["position"].append(d is not None and list(d["cell"]) == list(o["cell"]))
    if rel is not None:
        a, b = matched[rel["a"]], matched[rel["b"]]
        out["position"].append(a is not None and b is not None and rel["rel"] in gd.true_relations(a, b))
    return out


def filter_verdict(detections: list[dict], prompt: dict, min_score: float) -> dict:
    """task_d's keep rule for one generated image: the prompt's first (target) object is found with its shape and
    colour, and at least `min_score` of the prompt's named checks pass. Returns the checks, score, target_found
    and keep."""
    full = score_detections(detections, prompt)
    named = [v for k, v in full.items() if k != "all" and v is not None]
    found = score_detections(detections, {"objects": [dict(prompt["objects"][0], size=None, cell=None)],
                                          "relation": None})
    target_ok = bool(found["shape"] and found["color"])
    score = float(np.mean(named)) if named else 0.0
    return {**full, "score": score, "target_found": target_ok, "keep": target_ok and score >= min_score}


def summarize_scores(scores: Sequence[dict]) -> dict:
    """Mean of each attribute over the images where it applies (None where it never does), plus n."""
    out: dict = {}
    for key in ATTRIBUTES:
        values = [s[key] for s in scores if s.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["n"] = len(scores)
    return out


# --------------------------------------------------------------------------- oracle training
def scene_labels(objects: list[dict]) -> np.ndarray:
    """Per-cell targets (9, 3): class index (0 = empty), colour index, size index (-1 where the cell is empty)."""
    y = np.full((9, 3), -1, np.int64)
    y[:, 0] = 0
    for o in objects:
        j = gd.CELLS.index(tuple(o["cell"]))
        y[j] = (CLASSES.index(o["shape"]), COLOR_NAMES.index(o["color"]), SIZE_NAMES.index(o["size"]))
    return y


def _sample_scene(seed: int, index: int) -> tuple[list[dict], dict]:
    rng = np.random.default_rng([seed, index])
    objects = gd.sample_objects(rng)  # the dataset's own sampler: 1-3 objects, uniform shapes, jitter, brightness
    return objects, gd.sample_background(objects, rng)


def render_scenes(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n random scenes rendered like the dataset (uint8 (n, 64, 64, 3), cached on disk) and labels (n, 9, 3)."""
    import hashlib

    from tqdm.auto import tqdm

    def compute() -> np.ndarray:
        images = []
        for i in tqdm(range(n), desc=f"render scenes (seed {seed})", leave=False):
            objects, background = _sample_scene(seed, i)
            images.append(np.asarray(gd.render_scene(objects, IMAGE_SIZE, background)))
        return np.stack(images)

    # The cache key holds generate_data.py's hash: a change to the renderer re-renders.
    renderer = hashlib.sha1((REPO / "generate_data.py").read_bytes()).hexdigest()
    images = cached(["oracle-scenes", seed, n, IMAGE_SIZE, renderer], compute)
    labels = np.stack([scene_labels(_sample_scene(seed, i)[0]) for i in range(n)])
    return images, labels


# --------------------------------------------------------------------------- negatives: nothing recognisable
def _centroid_radius(alpha: np.ndarray) -> tuple[float, float, float]:
    ys, xs = np.nonzero(alpha > 0.5)
    if len(xs) == 0:
        ys, xs = np.nonzero(alpha > 0)
    return float(xs.mean()), float(ys.mean()), max(2.0, float(np.sqrt((alpha > 0.5).sum() / np.pi)))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:size, 0:size].astype(np.float32)


def _radial_blob(cx, cy, radius, amplitudes, phases, size):
    """Alpha of a closed curve r(theta) = radius * (1 + sum_k a_k cos(k theta + phi_k)), anti-aliased."""
    yy, xx = _grid(size)
    theta = np.arctan2(yy - cy, xx - cx)
    r = radius * (1 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(zip(amplitudes, phases))))
    return np.clip(r - np.hypot(xx - cx, yy - cy) + 0.5, 0, 1).astype(np.float32)


def _polygon_alpha(points, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    big = Image.new("L", (size * 4, size * 4), 0)
    ImageDraw.Draw(big).polygon([(4 * x, 4 * y) for x, y in points], fill=255)
    return np.asarray(big.resize((size, size), Image.LANCZOS), np.float32) / 255.0


def degrade(recipe: str, alpha: np.ndarray, color: np.ndarray, rng: np.random.Generator):
    """Turn one rendered object (alpha size x size in 0..1, colour (3,)) into something with no recognisable shape.

    Training recipes (TRAIN_NEGATIVES): Gaussian blur (sigma 2-4 px) of the object, elastic warp, morphological
    melting into a blob, fused with another shape drawn across it, a partial shape (a half-plane cut away), a
    random smooth blob, a colour-noise patch.
    Held-out recipes (HELDOUT_NEGATIVES, never trained on): a rotated ellipse, an irregular polygon, the object
    melted with a shifted copy of itself, a box blur.

    Returns:
        (alpha, colour, colour_known): colour is (3,) or a per-pixel (size, size, 3) array.
    """
    from scipy import ndimage

    size = alpha.shape[0]
    cx, cy, r = _centroid_radius(alpha)
    yy, xx = _grid(size)
    if recipe == "blur":
        a = ndimage.gaussian_filter(alpha, rng.uniform(2.0, 4.0))
    elif recipe == "elastic":
        field = [ndimage.gaussian_filter(rng.uniform(-1, 1, alpha.shape), 3.0) for _ in range(2)]
        scale = rng.uniform(3.0, 6.0) / max(1e-6, max(np.abs(f).max() for f in field))
        a = ndimage.map_coordinates(alpha, [yy + scale * field[0], xx + scale * field[1]], order=1, mode="constant")
    elif recipe == "melt":  # corners and holes filled in, then pushed out of round (no clean circle comes out)
        disk = np.hypot(*np.mgrid[-3:4, -3:4]) <= rng.uniform(1.5, 2.5)
        a = ndimage.gaussian_filter(ndimage.grey_dilation(alpha, footprint=disk), 1.2)
        field = [ndimage.gaussian_filter(rng.uniform(-1, 1, alpha.shape), 4.0) for _ in range(2)]
        scale = rng.uniform(2.0, 4.0) / max(1e-6, max(np.abs(f).max() for f in field))
        a = ndimage.map_coordinates(a, [yy + scale * field[0], xx + scale * field[1]], order=1, mode="constant")
        a = np.clip((a - 0.3) / 0.4, 0, 1)
    elif recipe == "fuse":  # another shape of the same colour drawn across the object: one silhouette of two
        for attempt in range(6):  # until the other shape adds at least a third of the object's area
            other = gd.SHAPES[int(rng.integers(len(gd.SHAPES)))]
            angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.9) + 0.1 * attempt
            a = np.maximum(alpha, gd.shape_alpha(other, cx + dist * r * np.cos(angle), cy + dist * r * np.sin(angle),
                                                 r * rng.uniform(0.8, 1.2), size))
            if (a - alpha).sum() >= alpha.sum() / 3:
                break
    elif recipe == "partial":
        angle = rng.uniform(0, 2 * np.pi)
        side = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle) - rng.uniform(-0.3, 0.2) * r
        a = alpha * np.clip(side + 0.5, 0, 1)
    elif recipe == "blob":
        a = _radial_blob(cx, cy, r * rng.uniform(0.8, 1.1), rng.uniform(0.1, 0.25, 3), rng.uniform(0, 2 * np.pi, 3),
                         size)
    elif recipe == "noise":
        disk = (np.hypot(xx - cx, yy - cy) <= r * rng.uniform(0.8, 1.2)).astype(np.float32)
        noise = ndimage.gaussian_filter(rng.uniform(0, 255, (size, size, 3)), (0.7, 0.7, 0))
        return disk, noise.astype(np.float32), False
    elif recipe == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        rot, ratio = rng.uniform(0, np.pi), rng.uniform(0.45, 0.7)
        ex, ey = r * 1.1 * np.cos(t), r * 1.1 * ratio * np.sin(t)
        a = _polygon_alpha(list(zip(cx + ex * np.cos(rot) - ey * np.sin(rot), cy + ex * np.sin(rot) + ey * np.cos(rot))),
                           size)
    elif recipe == "irregular":
        t = np.sort(rng.uniform(0, 2 * np.pi, 7))
        rr = r * rng.uniform(0.45, 1.1, 7)
        a = _polygon_alpha(list(zip(cx + rr * np.cos(t), cy + rr * np.sin(t))), size)
    elif recipe == "overlap":
        angle = rng.uniform(0, 2 * np.pi)
        shifted = ndimage.shift(alpha, (0.6 * r * np.sin(angle), 0.6 * r * np.cos(angle)), order=1)
        a = np.maximum(alpha, shifted)
    elif recipe == "boxblur":
        a = ndimage.uniform_filter(alpha, int(rng.choice([5, 7, 9])))
    else:
        raise UserError(f"unknown negative recipe {recipe!r}; choose one of "
                        f"{', '.join(TRAIN_NEGATIVES + HELDOUT_NEGATIVES)}")
    if recipe in ("blur", "boxblur"):  # keep the blurred object as strong as the original at its core
        a = a / max(float(a.max()), 1e-6) * rng.uniform(0.8, 1.0)
    return np.clip(a, 0, 1).astype(np.float32), color, True


def negative_scene(seed: int, index: int, recipes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """A dataset-like scene with 1-2 of its objects made unrecognisable: uint8 (64, 64, 3) and labels (9, 3).

    The degraded cells are labelled "unrecognisable", with their colour when it is still one colour (-1 when
    not) and size -1 (not applicable).
    """
    rng = np.random.default_rng([seed, 11, index])
    objects, background = _sample_scene(seed + 1000, index)
    canvas, layers = gd.render_layers(objects, IMAGE_SIZE, background)
    labels = scene_labels(objects)
    n_bad = min(len(objects), 1 + int(rng.random() < 0.3))
    for j in rng.choice(len(objects), size=n_bad, replace=False):
        recipe = recipes[int(rng.integers(len(recipes)))]
        alpha, color, known = degrade(recipe, layers[j][0], layers[j][1], rng)
        layers[j] = (alpha, color)
        cell = gd.CELLS.index(tuple(objects[j]["cell"]))
        labels[cell] = (CLASSES.index(UNRECOGNISABLE), COLOR_NAMES.index(objects[j]["color"]) if known else -1, -1)
    return np.asarray(gd.composite(canvas, layers)), labels


def render_negatives(seed: int, n: int, recipes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """n `negative_scene`s (cached on disk like `render_scenes`): uint8 (n, 64, 64, 3) and labels (n, 9, 3)."""
    import hashlib

    from tqdm.auto import tqdm

    code = hashlib.sha1((REPO / "generate_data.py").read_bytes() + (REPO / "fidelity.py").read_bytes()).hexdigest()
    scenes = []

    def compute() -> np.ndarray:
        scenes.extend(negative_scene(seed, i, recipes) for i in tqdm(range(n), desc=f"negatives (seed {seed})",
                                                                     leave=False))
        return np.stack([im for im, _ in scenes])

    key = ["oracle-negatives", seed, n, list(recipes), code]
    images = cached(key, compute)
    labels = cached(key + ["labels"], lambda: np.stack([y for _, y in scenes or
                                                        (negative_scene(seed, i, recipes) for i in range(n))]))
    return images, labels


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur and noise on random halves of the batch, so the oracle tolerates soft generated images."""
    b = x.shape[0]
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        sigma = float(torch.empty(1).uniform_(0.4, 0.9, generator=gen))
        k = torch.exp(-torch.arange(-1, 2, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
        k = (k[:, None] * k[None, :]) / k.sum() ** 2
        xb = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous(), groups=3)
        x = x.clone()
        x[blur] = xb
    noise = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5) * torch.rand(b, 1, 1, 1, generator=gen) * 0.06
    return x + noise * torch.randn(x.shape, generator=gen)


def oracle_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the cell class over all cells and again over occupied cells, and of colour and size there.

    The second class term matters: 7 of 9 cells are empty on average, so the all-cells mean alone gives the
    shape signal a small weight and shapes are learned last.
    """
    cls, col, siz = split_logits(logits)
    occ = y[..., 0] > 0
    loss = F.cross_entropy(cls.reshape(-1, cls.shape[-1]), y[..., 0].reshape(-1))
    if occ.any():  # -1: unknown (the colour of a noise patch, the size of anything unrecognisable)
        loss = loss + sum(F.cross_entropy(part[occ], y[..., k][occ], ignore_index=-1)
                          for k, part in enumerate((cls, col, siz)) if (y[..., k][occ] >= 0).any())
    return loss


def train_oracle_net(images: np.ndarray, labels: np.ndarray, args: argparse.Namespace,
                     device) -> tuple[OracleNet, list]:
    """Train an `OracleNet` with AdamW and a one-cycle schedule; returns (net, per-epoch history)."""
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = OracleNet().to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(images) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=max(steps, 1), pct_start=0.15)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    history = []
    bar = tqdm(total=steps, desc="train oracle", leave=False)
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(images), generator=gen)
        losses = []
        for s in range(len(images) // args.batch_size):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            x = _augment(_to_input(x_all[idx]), gen).to(device)
            loss = oracle_loss(net(x), y_all[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses))})
    bar.close()
    return net.eval(), history


def oracle_accuracy(oracle: Oracle, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy on labelled scenes: per cell (class, colour and size of occupied cells), per object, whole scene."""
    pred = oracle.predict(images, progress=True)
    cls_ok = pred["class"] == labels[..., 0]
    occ = labels[..., 0] > 0
    col_ok = np.where(occ, pred["color"] == labels[..., 1], True)
    siz_ok = np.where(occ, pred["size"] == labels[..., 2], True)
    obj_ok = cls_ok & col_ok & siz_ok
    return {
        "n_scenes": int(len(images)), "n_objects": int(occ.sum()),
        "cell_class": float(cls_ok.mean()),              # empty vs which shape, over all 9 cells
        "shape": float(cls_ok[occ].mean()),              # occupied cells read as the right shape
        "color": float(col_ok[occ].mean()), "size": float(siz_ok[occ].mean()),
        "object": float(obj_ok[occ].mean()),             # shape, colour and size all right
        "false_objects_per_scene": float(((pred["class"] > 0) & ~occ).sum() / len(images)),
        "count": float(((pred["class"] > 0).sum(1) == occ.sum(1)).mean()),
        "all": float(obj_ok.all(1).mean()),              # whole scene right: every cell's class, colour and size
    }


def class_logits(oracle: Oracle, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Raw per-cell class logits (n, 9, classes), float32 on the CPU."""
    out = []
    for s in range(0, len(images), batch_size):
        with torch.inference_mode():
            out.append(split_logits(oracle.net(_to_input(images[s:s + batch_size]).to(oracle.device)))[0].float().cpu())
    return torch.cat(out)


def fit_temperature(logits: torch.Tensor, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al. 2017): the T in 0.25..10 minimising the class NLL over all cells."""
    y = torch.from_numpy(labels[..., 0]).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])
    grid = np.geomspace(0.25, 10, 81)
    nll = [float(F.cross_entropy(flat / t, y)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Naeini et al. 2015): sum over bins of |accuracy - confidence| x share."""
    conf, correct = np.ravel(conf), np.ravel(correct).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(correct[which == b].mean() - conf[which == b].mean()) * (which == b).mean()
                     for b in range(bins) if (which == b).any()))


def reject_rates(pred_cls: np.ndarray, labels: np.ndarray) -> dict:
    """Per object: rejected = not read as any shape (unrecognisable or empty). Rates for degraded and clean objects."""
    true = labels[..., 0]
    degraded, clean = true == CLASSES.index(UNRECOGNISABLE), (true >= 1) & (true <= len(gd.SHAPES))
    unrec = pred_cls == CLASSES.index(UNRECOGNISABLE)
    not_shape = unrec | (pred_cls == 0)
    return {"reject_rate": float(not_shape[degraded].mean()) if degraded.any() else None,
            "n_degraded": int(degraded.sum()),
            "false_reject_rate": float(unrec[clean].mean()) if clean.any() else None, "n_clean": int(clean.sum())}


def choose_threshold(probs: torch.Tensor, labels: np.ndarray, max_false_reject: float = MAX_FALSE_REJECT_VAL,
                     min_accuracy: float = MIN_VAL_ACCURACY) -> float:
    """The operating threshold on validation scenes: the highest confidence below which a shape reading becomes
    "unrecognisable" while clean objects are rejected at most `max_false_reject` of the time and clean scenes
    (those without a degraded object) stay entirely right at least `min_accuracy` of the time."""
    conf, cls = probs.max(-1)
    is_shape = ((cls >= SHAPE_IDS.start) & (cls < SHAPE_IDS.stop)).numpy()
    clean = ~(labels[..., 0] == CLASSES.index(UNRECOGNISABLE)).any(1)
    best = 0.0
    for tau in np.linspace(0, 0.99, 100):
        pred = np.where(is_shape & (conf.numpy() < tau), CLASSES.index(UNRECOGNISABLE), cls.numpy())
        accuracy = float((pred[clean] == labels[clean][..., 0]).all(1).mean())  # cell classes of clean scenes
        if reject_rates(pred, labels)["false_reject_rate"] <= max_false_reject and accuracy >= min_accuracy:
            best = float(tau)
    return best


def rejection_metrics(oracle: Oracle, held_images: np.ndarray, held_labels: np.ndarray, n: int) -> dict:
    """The issue-11 numbers: false rejects on clean renders, rejection of held-out-recipe negatives
    (each recipe separately and together), of renders blurred with sigma = 2 px, and the ECE."""
    from scipy import ndimage

    pred = oracle.predict(held_images)
    out = {"false_reject_rate_renders": reject_rates(pred["class"], held_labels)["false_reject_rate"],
           "threshold": oracle.config.get("threshold"), "temperature": oracle.config.get("temperature")}
    per_recipe, all_pred, all_labels = {}, [], []
    for recipe in HELDOUT_NEGATIVES:
        images, labels = render_negatives(HELDOUT_SEED, max(1, n // (2 * len(HELDOUT_NEGATIVES))), [recipe])
        cls = oracle.predict(images)["class"]
        per_recipe[recipe] = reject_rates(cls, labels)["reject_rate"]
        all_pred.append(cls)
        all_labels.append(labels)
    out["reject_rate_heldout"] = reject_rates(np.concatenate(all_pred), np.concatenate(all_labels))["reject_rate"]
    out["reject_rate_heldout_by_recipe"] = per_recipe
    blurred = np.stack([ndimage.gaussian_filter(im.astype(np.float32), (2, 2, 0)) for im in held_images[:1000]])
    blurred = np.clip(np.rint(blurred), 0, 255).astype(np.uint8)
    cls = oracle.predict(blurred)["class"]
    read_as_shape = (cls >= SHAPE_IDS.start) & (cls < SHAPE_IDS.stop)
    out["blur_sigma2"] = {"rejected": float((~read_as_shape)[held_labels[:1000, :, 0] > 0].mean())}
    for kind in KINDS:
        prompts = make_prompts(kind, 200, seed=1)
        renders = np.stack([ndimage.gaussian_filter(im.astype(np.float32), (2, 2, 0))
                            for im in render_prompts(prompts, seed=1)])
        scores = oracle.score(np.clip(np.rint(renders), 0, 255).astype(np.uint8), prompts)
        out["blur_sigma2"][f"{kind}_shape_correct"] = summarize_scores(scores)["shape"]
    test = [render_scenes(TEST_SEED, 1000), render_negatives(TEST_SEED, 1000, TRAIN_NEGATIVES)]
    test_images, test_labels = np.concatenate([t[0] for t in test]), np.concatenate([t[1] for t in test])
    probs = torch.softmax(class_logits(oracle, test_images) / oracle.config.get("temperature", 1.0), -1)
    conf, cls = probs.max(-1)
    out["ece"] = expected_calibration_error(conf.numpy(), cls.numpy() == test_labels[..., 0])
    out["ece_uncalibrated"] = expected_calibration_error(
        *(lambda p: (p.max(-1).values.numpy(), p.argmax(-1).numpy() == test_labels[..., 0]))(
            torch.softmax(class_logits(oracle, test_images), -1)))
    return out


def dataset_scenes(path: str, split: str = "test") -> tuple[np.ndarray, np.ndarray] | None:
    """The real dataset's images and per-cell labels (None when the pickle is absent or not a shapes world)."""
    if not path or not Path(path).is_file():
        return None
    data = load_data(path)
    if data.get("source") != "shapes" or split not in data["splits"]:
        return None
    records = data["splits"][split]
    images = to_uint8_64([load_rgb(r["path"]) for r in records])
    return images, np.stack([scene_labels(r["objects"]) for r in records])


def oracle_card(config: dict, metrics: dict) -> str:
    """The model card (README.md) of a trained oracle."""
    h = metrics["heldout"]
    keys = ("cell_class", "shape", "color", "size", "object", "count", "all")
    rows = "\n".join(f"| {k} | {h[k]:.4f} |" for k in keys)
    data_line = ""
    if metrics.get("dataset_test"):
        d = metrics["dataset_test"]
        data_line = (f"\nOn the dataset's own test split ({d['n_scenes']} images of data/shapes/data.pkl): "
                     f"object {d['object']:.4f}, whole scene {d['all']:.4f}.\n")
    return f"""# shapes-oracle

A small CNN ({config['n_params']:,} parameters, {config['widths']} conv channels) that reads a 64x64 shapes-world
image as a 3x3 grid: for each cell, empty or one of {len(gd.SHAPES)} shapes, its colour ({len(COLOR_NAMES)}) and
size ({len(SIZE_NAMES)}). It is the judge of `python fidelity.py evaluate-model` (GenEval-style prompt fidelity).

Trained by `{config['command']}` on {config['n_train']:,} scenes drawn with `generate_data.sample_objects` and rendered
with the dataset's backgrounds, jitter and brightness (seed {config['seed']}), with mild blur/noise augmentation;
{config['epochs']} epochs, {config['train_seconds']:.0f} s on {config['device']}.

## Held-out accuracy ({h['n_scenes']:,} new scenes, seed {config['heldout_seed']}, {h['n_objects']:,} objects)

| metric | accuracy |
|---|---|
{rows}

`all` = every cell's class, colour and size right (whole scene). `cell_class` counts all 9 cells, the others
occupied cells only; `count` = number of objects right.
{data_line}
{rejection_section(config, metrics)}
## Limits
A proxy judge: it has seen renders, light blur/noise and the negatives above, not generated images. Objects are
assumed to sit one per cell of the 3x3 grid, as in the data. The by-eye audit is the check on generated images;
redo it (`python fidelity.py audit make`, label, `audit score`) whenever the oracle or the generator changes.
"""


def rejection_section(config: dict, m: dict) -> str:
    """The card's section on saying "no recognisable shape": calibration, threshold, rejection rates, audit."""
    if "reject_rate_heldout" not in m:
        return ""
    by = ", ".join(f"{k} {v:.3f}" for k, v in m["reject_rate_heldout_by_recipe"].items())
    blur = m["blur_sigma2"]
    audit = m.get("audit")
    audit_line = ("not done yet" if not audit else
                  f"{audit['n']} generated images ({audit['n_accepted']} accepted, {audit['n_rejected']} rejected by "
                  f"task_d's filter) labelled by eye: precision {audit['precision']:.3f} "
                  f"[{audit['precision_ci'][0]:.3f}, {audit['precision_ci'][1]:.3f}], recall {audit['recall']:.3f} "
                  f"(weighted by the acceptance rate {audit['acceptance_rate']:.3f}); model `{audit['model']}`"
                  + (f". STALE: {audit['stale']}" if audit.get("stale") else ""))
    return f"""
## Saying "no recognisable shape"
Each cell can also be read as `{UNRECOGNISABLE}`, learned from {config.get('n_negatives', 0):,} training scenes whose
objects were degraded by the renderer ({', '.join(TRAIN_NEGATIVES)}). The class confidence is calibrated by
temperature scaling (T = {config['temperature']:.3f}, fitted on validation scenes of seed {VAL_SEED}); a shape read
with calibrated confidence below the operating threshold {config['threshold']:.2f} becomes `{UNRECOGNISABLE}`
(the highest threshold that keeps false rejects of clean validation objects at most
{config.get('max_false_reject_val', MAX_FALSE_REJECT_VAL)} and clean validation scenes entirely right at least
{config.get('min_val_accuracy', MIN_VAL_ACCURACY)} of the time; the held-out scenes below turned out harder than the
validation ones, so the same threshold rejects more there).

| measurement (held-out seeds) | value | target |
|---|---|---|
| whole-scene accuracy on clean renders | {m['accuracy_on_renders']:.4f} | >= 0.99 |
| false rejects of clean objects | {m['false_reject_rate_renders']:.4f} | <= 0.01 |
| rejection of held-out negatives made by other recipes ({', '.join(HELDOUT_NEGATIVES)}) | {m['reject_rate_heldout']:.4f} | >= 0.95 |
| expected calibration error (15 bins; before scaling {m['ece_uncalibrated']:.4f}) | {m['ece']:.4f} | |
| objects of renders blurred with sigma = 2 px not read as a shape | {blur['rejected']:.4f} | |
| shape-correct on sigma = 2 blurred prompt renders, single / two objects (was 0.655 / 0.49) | {blur['single_shape_correct']:.3f} / {blur['two_shape_correct']:.3f} | |

By held-out recipe: {by}.

By-eye audit (`models/shapes-oracle/audit.json`): {audit_line}.
"""


# --------------------------------------------------------------------------- Fréchet distance
def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula), in float64.

    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)). The usual route (pytorch-fid,
    torchmetrics) takes scipy.linalg.sqrtm of S_a S_b: at d = 1280 that takes ~30 s on 2 cores and returns
    complex noise when n < d (singular covariances). We use the exact identity
    Tr((S_a S_b)^(1/2)) = ||A_c B_c^T||_* / sqrt((n_a - 1)(n_b - 1)) (A_c, B_c the centred features), or for
    n > d the symmetric form Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), which are real by construction.

    Args:
        feats_a: (n_a, d) features, n_a >= 2.
        feats_b: (n_b, d) features, n_b >= 2.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    a, b = (x[:, None] if x.ndim == 1 else x for x in (a, b))
    check(a.ndim == 2 and b.ndim == 2 and a.shape[1] == b.shape[1],
          f"feature sets must be (n, d) with the same d, got {a.shape} and {b.shape}")
    check(len(a) >= 2 and len(b) >= 2, f"Fréchet distance needs >= 2 rows per set, got {len(a)} and {len(b)}")
    ac, bc = a - a.mean(0), b - b.mean(0)
    na, nb, d = len(a) - 1, len(b) - 1, a.shape[1]
    method = "gram" if len(a) * len(b) <= d * d else "cov"
    tr_sqrt = _trace_sqrt_product(ac, bc, method)
    mean_term = float(np.sum((a.mean(0) - b.mean(0)) ** 2))
    return max(mean_term + float((ac ** 2).sum() / na + (bc ** 2).sum() / nb) - 2.0 * tr_sqrt, 0.0)


def _trace_sqrt_product(ac: np.ndarray, bc: np.ndarray, method: str) -> float:
    """Tr((S_a S_b)^(1/2)) from centred features, by the n_a x n_b route ("gram") or the d x d route ("cov")."""
    na, nb = len(ac) - 1, len(bc) - 1
    if method == "gram":
        return float(np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt(na * nb))
    cov_a, cov_b = ac.T @ ac / na, bc.T @ bc / nb
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def real_reference_split(n_real: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded index sets of size n from n_real real images: the reference and the floor's second set."""
    check(n_real >= 2 * n, f"the FD floor needs 2 x {n} real images, only {n_real} available; lower --n-fd")
    perm = np.random.default_rng([seed, 11]).permutation(n_real)
    return np.sort(perm[:n]), np.sort(perm[n:2 * n])


def fd_features(model, info: dict, images, desc: str) -> np.ndarray:
    """EfficientNet-Lite0 pooled features at FD_RES (64-px images upsampled 2x, like retrieval.py)."""
    return encode_images(model, dict(info, res=FD_RES), images, desc=desc)


def real_fd_features(real: list[dict], indices: np.ndarray, model, info: dict) -> np.ndarray:
    """FD features of the real records at `indices` (in that order), cached on disk by path, size and mtime."""
    paths = [real[i]["path"] for i in indices]
    stats = [(p, Path(p).stat().st_size, int(Path(p).stat().st_mtime)) for p in paths]
    return cached(["fd-real", DEFAULT_IMAGE_ENCODER, FD_RES, stats],
                  lambda: fd_features(model, info, to_uint8_64([load_rgb(p) for p in paths]), "real features"))


def fd_real_vs_real(real_feats: np.ndarray, n: int, seed: int = 0) -> float:
    """The FD floor: FD between two disjoint random sets of n real images (what a perfect generator would score)."""
    ref, other = real_reference_split(len(real_feats), n, seed)
    return frechet_distance(real_feats[other], real_feats[ref])


def diversity(features: np.ndarray) -> float:
    """Mean pairwise distance between L2-normalised feature vectors (0: identical images; more: more varied).

    Used across seeds of one prompt: a sampler that collapses every seed to the same picture scores near 0.
    """
    f = features.astype(np.float64)
    if len(f) < 2:
        return float("nan")
    from scipy.spatial.distance import pdist

    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return float(pdist(f).mean())


# --------------------------------------------------------------------------- alignment
def alignment_score(images, texts: Sequence[str], heads_path: str | Path = DEFAULT_HEADS, device=None) -> np.ndarray:
    """A CLIPScore stand-in: 100 * max(cos, 0) between our retrieval model's image and text embeddings.

    Works for any images and captions (shapes, COCO); the encoders and input side come from the checkpoint.

    Args:
        images: arrays / PIL images / paths.
        texts: one caption per image.
        heads_path: heads.pt written by retrieval.py.
        device: torch device (default: automatic).

    Returns:
        float32 (n,) in [0, 100].
    """
    from retrieval import embed, load_heads

    check(Path(heads_path).is_file(), f"retrieval checkpoint not found: {heads_path} (run `python retrieval.py` first)")
    check(len(images) == len(texts), f"{len(images)} images but {len(texts)} texts")
    heads, meta = load_heads(heads_path)
    device = device or pick_device()
    model, info = load_image_encoder(meta["image_encoder"], device)
    img = encode_images(model, dict(info, res=meta.get("image_res") or info["res"]), list(images), desc="align images")
    tokenizer, text_model, _ = load_text_encoder(meta["text_encoder"], device)
    txt = encode_texts(tokenizer, text_model, list(texts), desc="align texts")
    cos = (embed(heads, "image", img) * embed(heads, "text", txt)).sum(1)
    return (100.0 * np.clip(cos, 0.0, None)).astype(np.float32)


# --------------------------------------------------------------------------- evaluate-model steps
def default_out(spec: dict, args: argparse.Namespace) -> Path:
    """metrics.json next to a local model's weights; a run folder under outputs/fidelity for hub models."""
    if args.out is not None:
        return args.out
    if Path(spec["id"]).is_dir():
        return Path(spec["id"]) / "metrics.json"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec["name"]).strip("-")
    return make_run_dir("fidelity", name, {k: str(v) for k, v in vars(args).items()}) / "metrics.json"


def real_pool(data_path: str, n_needed: int) -> list[dict]:
    """Real records for FD: the test split, topped up from val when the test split is too small."""
    data = load_data(data_path, splits=["test"])
    records = list(data["splits"]["test"])
    if len(records) < n_needed and "val" in data["splits"]:
        records += data["splits"]["val"]
    return records


def write_grid(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray, dict]]) -> None:
    """Sample grid: one row per prompt (label: prompt and the oracle's verdict), a render of it, the generation."""
    images, labels = [], []
    for text, render, generated, score in rows:
        images += [render, generated]
        verdict = "ok" if score["all"] else "wrong " + ",".join(k for k in ATTRIBUTES[:-1] if score[k] is False)
        labels.append(f"{text}  [{verdict}]")
    image_grid(images, len(rows), 2, row_labels=labels, col_labels=["render", "generated"], cell=96).save(path)


def merge_metrics(path: Path, metrics: dict) -> None:
    """Write metrics.json, keeping keys another script (e.g. training) already wrote there; ours win on clashes."""
    old = read_json(path) if path.is_file() else {}
    write_json(path, {**(old if isinstance(old, dict) else {}), **metrics})


def evaluate_model(args: argparse.Namespace) -> dict:
    t0 = time.time()
    # 1. model, oracle and where results go (fail on a bad name before any slow step)
    spec = resolve_model(args.model)
    device = pick_device(args.device)
    oracle = Oracle.load(args.oracle, device)
    heads = DEFAULT_HEADS if args.heads is None else (Path(args.heads) if args.heads else None)
    if args.heads:
        check(heads.is_file(), f"retrieval checkpoint not found: {heads} (run `python retrieval.py` first)")
    if heads is not None and not heads.is_file():
        print(f"note: no retrieval checkpoint at {heads}: alignment score skipped (run `python retrieval.py`)")
        heads = None
    real = real_pool(args.data, 2 * args.n_fd) if args.n_fd else []
    pipe, settings = load_pipeline(args.model, device=device, scheduler=args.scheduler)
    steps = args.steps or (min(settings["steps"], 4) if args.quick else settings["steps"])
    guidance = settings["guidance"] if args.guidance is None else args.guidance
    out = default_out(spec, args)
    metrics: dict = {"model": {"name": settings["name"], "id": settings["id"]},
                     "sampler": {"scheduler": settings["scheduler"], "steps": steps, "guidance": guidance,
                                 "size": settings["size"], "dtype": settings["dtype"], "device": settings["device"]},
                     "n_prompts": args.n_prompts, "seed": args.seed, "oracle": str(args.oracle),
                     "args": {k: v for k, v in vars(args).items() if k != "command"}}
    oracle_metrics = Path(args.oracle) / "metrics.json"
    metrics["oracle_accuracy_on_renders"] = (read_json(oracle_metrics)["heldout"]["all"]
                                             if oracle_metrics.is_file() else None)

    # 2. structured prompts and one image per prompt (seed + i for image i, across kinds)
    prompts = {kind: make_prompts(kind, args.n_prompts, args.seed) for kind in args.kinds}
    all_prompts = [p for kind in args.kinds for p in prompts[kind]]
    part = {kind: slice(i * args.n_prompts, (i + 1) * args.n_prompts) for i, kind in enumerate(args.kinds)}
    seeds = [args.seed + i for i in range(len(all_prompts))]
    generated = to_uint8_64(generate_images(pipe, [p["text"] for p in all_prompts], seeds, steps, guidance,
                                            settings["size"], args.batch_size))

    # 3. oracle scores, next to the same oracle on renders of the same prompts (its ceiling on this prompt set)
    scores = oracle.score(generated, all_prompts, progress=True)
    renders = render_prompts(all_prompts, args.seed)
    render_scores = oracle.score(renders, all_prompts)
    key = {"single": "single_object", "two": "two_object"}
    metrics["prompt_renders_all_correct"] = {}
    for kind in KINDS:
        metrics[f"{key[kind]}_all_correct"] = metrics[key[kind]] = None
        if kind in args.kinds:
            metrics[key[kind]] = summarize_scores(scores[part[kind]])
            metrics[f"{key[kind]}_all_correct"] = metrics[key[kind]]["all"]
            metrics["prompt_renders_all_correct"][kind] = summarize_scores(render_scores[part[kind]])["all"]

    # 4. Fréchet distance to real test images, and the real-vs-real floor at the same n
    metrics["fd"] = metrics["fd_real_vs_real"] = None
    if args.n_fd:
        ref, other = real_reference_split(len(real), args.n_fd, args.seed)
        if args.fd_from == "captions":
            fd_prompts = [real[i]["captions"][0] for i in ref]
            fd_images = to_uint8_64(generate_images(pipe, fd_prompts, [args.seed + 10**6 + i for i in range(len(ref))],
                                                    steps, guidance, settings["size"], args.batch_size))
        else:
            fd_images = generated[:args.n_fd]
        enc, info = load_image_encoder(DEFAULT_IMAGE_ENCODER, device)
        real_feats = real_fd_features(real, np.concatenate([ref, other]), enc, info)
        gen_feats = fd_features(enc, info, fd_images, "generated features")
        metrics["fd"] = frechet_distance(gen_feats, real_feats[:len(ref)])
        metrics["fd_real_vs_real"] = frechet_distance(real_feats[len(ref):], real_feats[:len(ref)])
        metrics["fd_n"], metrics["fd_from"] = int(args.n_fd), args.fd_from

    # 5. alignment score of the prompt images (our retrieval model as a CLIPScore stand-in)
    metrics["alignment"] = None
    if heads is not None:
        metrics["alignment"] = float(alignment_score(generated, [p["text"] for p in all_prompts], heads, device).mean())
        metrics["alignment_heads"] = str(heads.resolve())

    # 6. sample grid and metrics
    shown = [part[kind].start + i for kind in args.kinds for i in range(min(args.grid_rows, args.n_prompts))]
    rows = [(all_prompts[j]["text"], renders[j], generated[j], scores[j]) for j in shown]
    if rows:
        write_grid(out.parent / "fidelity_grid.png", rows)
    metrics["seconds"] = round(time.time() - t0, 1)
    metrics["evaluated"] = _dt.datetime.now().isoformat(timespec="seconds")
    merge_metrics(out, metrics)
    card = out.parent / "README.md"
    if args.out is None and card.is_file() and not args.quick:
        update_card(card, metrics)
    if out.parent.parent.name == "fidelity" and args.out is None:  # a run folder under outputs/fidelity
        update_latest(out.parent)
    print(format_summary(metrics))
    print(f"wrote {out}")
    return metrics


def card_fidelity_section(m: dict) -> str:
    """The model card's "## Fidelity" section, every number taken from an evaluate-model metrics dict."""
    targets = {"single_object": 0.90, "two_object": 0.60}
    met = all(m.get(f"{k}_all_correct") is not None and m[f"{k}_all_correct"] >= t for k, t in targets.items())
    sam = m["sampler"]
    lines = [f"## Fidelity (measured; targets {'met' if met else 'NOT met'})",
             f"`python fidelity.py evaluate-model --model {m['model']['name']}"
             + (f" --heads {m['args']['heads']}`" if m["args"].get("heads") else "`"),
             f"({m['n_prompts']} single-object and {m['n_prompts']} two-object prompts, seed {m['seed']}, "
             f"{sam['scheduler']} {sam['steps']} steps, guidance {sam['guidance']}, {sam['device']}; judged by the "
             f"oracle, whose whole-scene accuracy on held-out renders is {m['oracle_accuracy_on_renders']}). "
             "Fraction of images with each specified attribute right:", "",
             "| prompts | shape | colour | size | position | count | all |", "|---|---|---|---|---|---|---|"]
    for key, label in (("single_object", "single object"), ("two_object", "two objects + relation")):
        if m.get(key):
            lines.append(f"| {label} | " + " | ".join(
                "n/a" if m[key][a] is None else f"{m[key][a]:.3f}" for a in ATTRIBUTES) + " |")
    lines += ["", "Targets: " + ", ".join(
        f"{k.replace('_', '-')} all-correct >= {t:.2f} (measured "
        f"{'n/a' if m.get(k + '_all_correct') is None else format(m[k + '_all_correct'], '.3f')})"
        for k, t in targets.items()) + "."]
    if m.get("fd") is not None:
        lines.append(f"Fréchet distance in EfficientNet-Lite0 space {m['fd']:.1f} against a real-vs-real floor of "
                     f"{m['fd_real_vs_real']:.1f} (n = {m['fd_n']})"
                     + (f"; alignment score {m['alignment']:.1f}/100." if m.get("alignment") is not None else "."))
    lines.append("`fidelity_grid.png` shows renders of the prompts next to generations.")
    return "\n".join(lines) + "\n"


def update_card(card: Path, metrics: dict) -> None:
    """Replace the card's "## Fidelity" section (up to the next "## ") with the measured one."""
    text = card.read_text()
    match = re.search(r"^## Fidelity.*?(?=^## |\Z)", text, flags=re.S | re.M)
    if match is None:
        return
    write_text(card, text[:match.start()] + card_fidelity_section(metrics) + "\n" + text[match.end():])


def format_summary(m: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"model {m['model']['name']}: {m['sampler']['steps']} steps, guidance {m['sampler']['guidance']}"]
    for key in ("single_object", "two_object"):
        if m.get(key):
            parts = ", ".join(f"{a} {f(m[key][a])}" for a in ATTRIBUTES if m[key][a] is not None)
            lines.append(f"{key} (n={m[key]['n']}): {parts}")
    lines.append(f"oracle on renders of these prompts: {m['prompt_renders_all_correct']}; "
                 f"held-out renders: {f(m['oracle_accuracy_on_renders'])}")
    if m.get("fd") is not None:
        lines.append(f"FD {m['fd']:.2f} vs real-vs-real floor {m['fd_real_vs_real']:.2f} (n={m['fd_n']}, "
                     f"from {m['fd_from']})")
    if m.get("alignment") is not None:
        lines.append(f"alignment {m['alignment']:.1f} / 100")
    return "\n".join(lines)


# --------------------------------------------------------------------------- train-oracle steps
def train_oracle(args: argparse.Namespace) -> dict:
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    # 1. rendered scenes, and scenes with objects made unrecognisable: training, validation and held-out seeds differ
    images, labels = render_scenes(args.seed, args.n_train)
    neg_images, neg_labels = render_negatives(args.seed, args.n_negatives, TRAIN_NEGATIVES)
    images, labels = np.concatenate([images, neg_images]), np.concatenate([labels, neg_labels])
    held_images, held_labels = render_scenes(args.heldout_seed, args.n_heldout)
    val = [render_scenes(VAL_SEED, args.n_val), render_negatives(VAL_SEED, args.n_val, TRAIN_NEGATIVES)]
    val_images, val_labels = np.concatenate([v[0] for v in val]), np.concatenate([v[1] for v in val])
    render_s = time.time() - t0

    # 2. train
    t1 = time.time()
    net, history = train_oracle_net(images, labels, args, device)
    train_s = time.time() - t1
    config = {"widths": [m.out_channels for m in net.features if isinstance(m, nn.Conv2d)],
              "hidden": net.head[0].out_features, "image_size": IMAGE_SIZE, "classes": list(CLASSES),
              "colors": list(COLOR_NAMES), "sizes": list(SIZE_NAMES), "cells": [list(c) for c in gd.CELLS],
              "n_params": int(sum(p.numel() for p in net.parameters())), "n_train": args.n_train,
              "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
              "heldout_seed": args.heldout_seed, "train_seconds": round(train_s, 1), "device": str(device),
              "n_negatives": args.n_negatives, "n_val": args.n_val,
              "command": "python fidelity.py train-oracle" + (" --quick" if args.quick else ""),
              "versions": library_versions()}
    oracle = Oracle(net, config)

    # 3. calibration on validation scenes: the temperature, then the operating threshold
    val_logits = class_logits(oracle, val_images)
    config["temperature"] = fit_temperature(val_logits, val_labels)
    config["threshold"] = choose_threshold(torch.softmax(val_logits / config["temperature"], -1), val_labels)
    config["max_false_reject_val"], config["min_val_accuracy"] = MAX_FALSE_REJECT_VAL, MIN_VAL_ACCURACY

    # 4. held-out accuracy (new seed), rejection of a recipe never trained on, calibration error
    metrics = {"heldout": oracle_accuracy(oracle, held_images, held_labels), "history": history}
    metrics["accuracy_on_renders"] = metrics["heldout"]["all"]
    metrics.update(rejection_metrics(oracle, held_images, held_labels, args.n_heldout))
    real = dataset_scenes(args.data)
    metrics["dataset_test"] = oracle_accuracy(oracle, *real) if real is not None else None
    metrics["timings"] = {"render_s": round(render_s, 1), "train_s": round(train_s, 1),
                          "total_s": round(time.time() - t0, 1)}

    # 5. weights, config, metrics and card (an earlier by-eye audit is kept, marked stale: see `audit`)
    old_metrics = Path(args.out) / "metrics.json"
    if old_metrics.is_file() and read_json(old_metrics).get("audit"):
        metrics["audit"] = dict(read_json(old_metrics)["audit"], stale="the oracle was retrained after this audit")
    oracle.save(args.out)
    write_json(Path(args.out) / "metrics.json", metrics)
    (Path(args.out) / "README.md").write_text(oracle_card(config, metrics))
    h = metrics["heldout"]
    print(f"held-out ({h['n_scenes']} scenes): " + ", ".join(f"{k} {h[k]:.4f}" for k in
          ("shape", "color", "size", "object", "count", "all")))
    if metrics["dataset_test"]:
        print(f"dataset test split: object {metrics['dataset_test']['object']:.4f}, "
              f"all {metrics['dataset_test']['all']:.4f}")
    print(f"wrote {args.out}")
    return metrics


# --------------------------------------------------------------------------- by-eye audit of the filter
def weights_sha(folder: str | Path) -> str:
    """sha256 (first 12 hex digits) of every weight file of a model or oracle folder, in path order."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.safetensors")):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def _repo_relative(path: str) -> str:
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO).as_posix() if resolved.is_relative_to(REPO) else str(path)


def audit_items(n: int, seed: int) -> list[dict]:
    """task_d's prompts (its `shapes_item`: a target shape plus 0-2 other objects, every attribute named), taking
    the 12 shapes in turn."""
    from task_d import shapes_item  # the prompt builder lives with the task that uses it

    return [shapes_item({"category": gd.SHAPES[i % len(gd.SHAPES)], "category_id": i % len(gd.SHAPES) + 1},
                        i // len(gd.SHAPES), seed) for i in range(n)]


def audit_generate(pipe, settings: dict, items: list[dict]) -> np.ndarray:
    """The audit's images: one per item, noise from the item's own seed, the model's recommended sampler."""
    return to_uint8_64(generate_images(pipe, [it["text"] for it in items], [it["seed"] for it in items],
                                       settings["steps"], settings["guidance"], settings["size"], batch_size=32,
                                       progress=False))


def contact_sheet(images: np.ndarray, captions: list[str], zoom: int = 4, cols: int = 4):
    """Images at `zoom` x (nearest neighbour) in a grid, each with its caption above it; a PIL image."""
    from PIL import Image, ImageDraw

    side = images.shape[1] * zoom
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * side, rows * (side + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (im, cap) in enumerate(zip(images, captions)):
        x, y = (k % cols) * side, (k // cols) * (side + 14)
        draw.text((x + 2, y + 1), cap, fill="black")
        sheet.paste(Image.fromarray(im).resize((side, side), Image.NEAREST), (x, y + 14))
    return sheet


def audit_make(args: argparse.Namespace) -> dict:
    """Generate candidates with task_d's prompts until n are accepted and n rejected by the filter, then write
    unlabelled contact sheets (shuffled, no verdicts) and the audit file with empty labels."""
    device = pick_device(args.device)
    oracle = Oracle.load(args.oracle, device)
    pipe, settings = load_pipeline(args.model, device=device)
    accepted, rejected, kept_images = [], [], {}
    total, n_keep, chunk = 0, 0, 96
    while (len(accepted) < args.n or len(rejected) < args.n) and total < args.max_candidates:
        items = audit_items(total + chunk, args.seed)[total:]
        images = audit_generate(pipe, settings, items)
        for item, image, dets in zip(items, images, oracle.detect(images)):
            verdict = filter_verdict(dets, item["prompt"], args.min_score)
            bucket = accepted if verdict["keep"] else rejected
            n_keep += bool(verdict["keep"])
            if len(bucket) < args.n:
                bucket.append({"id": item["id"], "index": total, "target": item["target"], "text": item["text"],
                               "seed": item["seed"], "accepted": bool(verdict["keep"])})
                kept_images[item["id"]] = image
            total += 1
        print(f"{total} candidates: {len(accepted)} accepted, {len(rejected)} rejected kept")
    # A generator whose images the filter rarely accepts cannot fill the accepted half: audit what there is.
    check(len(accepted) >= 8 and len(rejected) == args.n,
          f"only {len(accepted)} accepted / {len(rejected)} rejected in {total} candidates; raise --max-candidates")
    if len(accepted) < args.n:
        print(f"note: the filter accepted only {len(accepted)} of {total} candidates; all of them are audited")
    shown = accepted + rejected
    order = np.random.default_rng(args.seed).permutation(len(shown))
    shown = [dict(shown[i], sheet_position=k, label=None) for k, i in enumerate(order)]
    args.sheets.mkdir(parents=True, exist_ok=True)
    per_sheet = 16
    for s in range(0, len(shown), per_sheet):
        part = shown[s:s + per_sheet]
        contact_sheet(np.stack([kept_images[it["id"]] for it in part]),
                      [f"#{it['sheet_position']}: {it['target']}" for it in part]).save(
            args.sheets / f"sheet_{s // per_sheet:02d}.png")
    audit = {"question": "is the prompted shape (named above each image) clearly recognisable? yes / no",
             "how_to_regenerate": f"python fidelity.py audit make --model {args.model} --n {args.n} --seed {args.seed}"
                                  f" --min-score {args.min_score}: item i of fidelity.audit_items(), generated with "
                                  "the model's recommended sampler and the item's seed",
             "model": _repo_relative(settings["id"]), "model_weights_sha256_12": weights_sha(settings["id"]),
             "oracle_weights_sha256_12": weights_sha(args.oracle), "sampler": {k: settings[k] for k in
                                                                             ("scheduler", "steps", "guidance", "size")},
             "min_score": args.min_score, "seed": args.seed, "candidates": total,
             "acceptance_rate": n_keep / total, "items": shown}  # every candidate counts, kept for a sheet or not
    write_json(args.audit, audit)
    print(f"wrote {args.audit} and {len(range(0, len(shown), per_sheet))} sheets in {args.sheets}: label each item "
          f"('yes' or 'no' in its 'label') by looking, then run `python fidelity.py audit score`")
    return audit


def audit_scores(audit: dict) -> dict:
    """Precision and recall of the filter against the by-eye labels.

    Precision = P(yes | accepted). The audit shows as many rejected as accepted images, so the sample's recall
    over-weights the rejected; `recall` re-weights by the filter's acceptance rate a:
    a*P(yes|acc) / (a*P(yes|acc) + (1-a)*P(yes|rej)). `recall_in_sample` is the unweighted one.
    """
    items = audit["items"]
    check(all(it["label"] in ("yes", "no") for it in items),
          f"{sum(it['label'] not in ('yes', 'no') for it in items)} audit items have no yes/no label yet")
    acc = [it["label"] == "yes" for it in items if it["accepted"]]
    rej = [it["label"] == "yes" for it in items if not it["accepted"]]
    p_acc, p_rej = float(np.mean(acc)), float(np.mean(rej))
    a = audit["acceptance_rate"]
    return {"n": len(items), "n_accepted": len(acc), "n_rejected": len(rej), "precision": p_acc,
            "precision_ci": bootstrap_ci(acc)["ci95"],
            "recall": a * p_acc / (a * p_acc + (1 - a) * p_rej) if p_acc + p_rej else None,
            "recall_in_sample": sum(acc) / max(1, sum(acc) + sum(rej)), "acceptance_rate": a,
            "yes_among_rejected": p_rej, "model": audit["model"],
            "model_weights_sha256_12": audit["model_weights_sha256_12"],
            "oracle_weights_sha256_12": audit["oracle_weights_sha256_12"]}


def audit_score(args: argparse.Namespace) -> dict:
    audit = read_json(args.audit)
    scores = audit_scores(audit)
    metrics_path = Path(args.oracle) / "metrics.json"
    current = weights_sha(args.oracle)
    if current != audit["oracle_weights_sha256_12"]:
        scores["stale"] = f"oracle weights changed since the audit ({current}): redo `audit make`"
    if metrics_path.is_file():
        metrics = read_json(metrics_path)
        metrics["audit"] = scores
        write_json(metrics_path, metrics)
        write_text(Path(args.oracle) / "README.md", oracle_card(read_json(Path(args.oracle) / "config.json"), metrics))
    print(f"audit of {scores['n']} images: precision {scores['precision']:.3f} "
          f"[{scores['precision_ci'][0]:.3f}, {scores['precision_ci'][1]:.3f}], recall {scores['recall']:.3f} "
          f"(acceptance rate {scores['acceptance_rate']:.3f})")
    return scores


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.command == "audit":
        return audit_make(args) if args.step == "make" else audit_score(args)
    return train_oracle(args) if args.command == "train-oracle" else evaluate_model(args)


if __name__ == "__main__":
    cli(main)
