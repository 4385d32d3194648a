"""utils' script lifecycle: common flags, --quick presets (explicit flags win), comma lists, runs and their steps."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import utils
from utils import UserError

QUICK = {"epochs": 2, "sizes": "10,20", "note": "read by the script itself"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--sizes", type=utils.comma_list(int, lo=10), default="100,1000")
    utils.common_args(p, "demo", QUICK, omit=("wandb",))
    return p


def parse(argv):
    p = parser()
    args = p.parse_args(argv)
    utils.apply_quick(args, p, QUICK, argv)
    return args


def test_common_flags_and_their_defaults():
    args = parse([])
    assert Path(args.outputs).is_absolute() and Path(args.outputs) == utils.OUTPUTS
    assert (args.device, args.threads, args.seed, args.quick) == ("auto", 0, 0, False)
    assert len(args.run_name) == len("20261130-120000") and args.run_name[8] == "-"
    assert not hasattr(args, "wandb")  # omitted: the flag does not exist
    with pytest.raises(UserError, match="^unrecognized arguments: --wandb$"):
        parse(["--wandb"])


def test_quick_applies_its_settings_but_explicit_flags_win():
    assert (parse([]).epochs, parse([]).sizes) == (20, [100, 1000])
    quick = parse(["--quick"])
    assert (quick.epochs, quick.sizes) == (2, [10, 20])  # the string preset goes through the flag's type
    assert not hasattr(quick, "note")  # a key that is no flag is left to the script
    explicit = parse(["--quick", "--epochs", "7", "--sizes", "30"])
    assert (explicit.epochs, explicit.sizes) == (7, [30])
    at_default = parse(["--quick", "--epochs", "20", "--sizes=100,1000"])  # given, though equal to the defaults
    assert (at_default.epochs, at_default.sizes) == (20, [100, 1000])
    assert parse(["--epochs", "7"]).epochs == 7


def test_quick_help_lists_the_settings():
    text = parser().format_help()
    assert "epochs 2, sizes 10,20, note read by the script itself (flags given explicitly win)" in " ".join(text.split())


def test_apply_preset_sets_only_flags_left_at_their_default():
    p = parser()
    args = p.parse_args(["--epochs", "5"])
    utils.apply_preset(args, p, {"epochs": 1, "sizes": "50"}, ["--epochs", "5"])
    assert (args.epochs, args.sizes) == (5, [50])


def test_given_dests_sees_a_flag_given_at_its_default_and_keeps_the_defaults():
    p = parser()
    assert utils.given_dests(p, ["--epochs", "20", "--quick"]) == {"epochs", "quick"}
    assert p.parse_args([]).epochs == 20 and p.parse_args([]).sizes == [100, 1000]  # defaults restored


@pytest.mark.parametrize("text, values", [("1,2,3", [1, 2, 3]), (" 4 , 5,", [4, 5]), ("", [])])
def test_comma_list_parses(text, values):
    assert utils.comma_list(int)(text) == values


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "10,abc"], "argument --sizes: must be comma-separated ints >= 10, got 'abc'"),
    (["--sizes", "10,9"], "argument --sizes: must be comma-separated ints >= 10, got '9'"),
    (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
])
def test_bad_values_are_one_line_user_errors(argv, message):
    with pytest.raises(UserError) as err:
        parse(argv)
    assert str(err.value) == message


def test_comma_list_upper_bound_and_float_names():
    parse_weight = utils.comma_list(float, lo=0, hi=1)
    assert parse_weight("0,0.5,1") == [0.0, 0.5, 1.0]
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be comma-separated floats >= 0 and <= 1, got '1.5'$"):
        parse_weight("0.5,1.5")


def test_cli_prints_a_bad_list_value_as_one_line(tmp_path):
    script = tmp_path / "demo.py"
    script.write_text("import argparse, utils\n"
                      "def main():\n"
                      "    p = argparse.ArgumentParser()\n"
                      "    p.add_argument('--k', type=utils.comma_list(int))\n"
                      "    utils.common_args(p, 'demo')\n"
                      "    p.parse_args()\n"
                      "utils.cli(main)\n")
    proc = subprocess.run([sys.executable, str(script), "--k", "1,b"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(utils.REPO)})
    assert proc.returncode == 2
    assert proc.stderr == "error: argument --k: must be comma-separated ints, got 'b'\n"


def test_run_records_steps_and_moves_latest_only_at_finish(tmp_path):
    args = parse(["--outputs", str(tmp_path), "--run-name", "first", "--device", "cpu"])
    run = utils.start_run("demo", args)
    assert run.dir == tmp_path / "demo" / "first" and run.device.type == "cpu"
    assert json.loads((run.dir / "config.json").read_text())["args"]["epochs"] == 20
    with run.step("load"):
        time.sleep(0.05)
    assert run.timings["load_s"] >= 0.05
    with pytest.raises(RuntimeError), run.step("broken"):
        raise RuntimeError("stop")
    assert "broken_s" not in run.timings  # only finished steps are timed
    assert not (tmp_path / "demo" / "latest").exists() and not (run.dir / "metrics.json").exists()
    metrics = {"score": 0.5}
    run.finish(metrics)
    on_disk = json.loads((run.dir / "metrics.json").read_text())
    assert on_disk["score"] == 0.5 and on_disk["timings"]["load_s"] == run.timings["load_s"]
    assert on_disk["timings"]["total_s"] >= on_disk["timings"]["load_s"]
    assert (tmp_path / "demo" / "latest").resolve() == run.dir.resolve()
    second = utils.start_run("demo", parse(["--outputs", str(tmp_path), "--run-name", "second"]))
    assert (tmp_path / "demo" / "latest").resolve() == run.dir.resolve()  # a started run is not yet the latest
    second.finish({})
    assert (tmp_path / "demo" / "latest").resolve() == second.dir.resolve()


def test_a_clock_started_before_the_run_carries_its_steps_and_start_into_the_run(tmp_path):
    clock = utils.Clock()
    with clock.step("generate"):  # work that must come before the run folder (task_d's generation)
        time.sleep(0.1)
    assert not (tmp_path / "demo").exists()
    run = utils.start_run("demo", parse(["--outputs", str(tmp_path), "--run-name", "late"]), clock=clock)
    with run.step("train"):
        time.sleep(0.05)
    metrics: dict = {}
    run.finish(metrics)
    timings = json.loads((run.dir / "metrics.json").read_text())["timings"]
    assert set(timings) == {"generate_s", "train_s", "total_s"} and timings["generate_s"] >= 0.1
    assert timings["total_s"] >= 0.15  # counted from the clock's start, not from start_run


def test_threads_flag_pins_torch_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        utils.start_run("demo", parse(["--outputs", str(tmp_path), "--threads", "1"]))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_wandb_logs_the_metrics(tmp_path, monkeypatch):
    logged = []

    class FakeRun:
        def log(self, row, step=None):
            logged.append(row)

        def finish(self):
            logged.append("finished")

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            logged.append(kwargs["project"])
            return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    args = argparse.Namespace(outputs=str(tmp_path), run_name="w", wandb=True)
    run = utils.start_run("demo", args)
    run.finish({"img2txt": {"R@1": 0.25, "per_query": [1, 2]}, "n": 3, "name": "x"})
    assert logged[0] == "demo" and logged[-1] == "finished"
    assert logged[1] == {"img2txt/R@1": 0.25, "n": 3, "timings/total_s": logged[1]["timings/total_s"]}


def test_image_grid_cells_widen_to_fit_the_longest_column_label():
    import numpy as np

    tile = np.zeros((8, 8, 3), np.uint8)
    short = utils.image_grid([tile] * 2, 1, 2, col_labels=["a", "b"])
    assert short.size == (2 * 96, 18 + 96)  # the default cell
    from PIL import Image, ImageDraw

    names = ["shapes-tiny-f2", "shapes-tiny-f2-turbo-long-name"]  # wider than a 96-px cell in PIL's default font
    width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(names[1])
    assert width > 96 - 4
    grid = utils.image_grid([tile] * 2, 1, 2, col_labels=names)
    cell = grid.size[0] // 2
    assert grid.size == (2 * cell, 18 + cell) and width <= cell - 4  # the label ends inside its own column
