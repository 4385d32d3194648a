"""Test setup: import the scripts from the repo root, never touch the network."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small shapes world (600 train / 100 val / 200 test images) shared by the tests; features cached per session."""
    import generate_data

    out = tmp_path_factory.mktemp("shapes")
    os.environ["FEATURE_CACHE"] = str(tmp_path_factory.mktemp("features"))
    generate_data.main(["--out", str(out), "--n-pretrain", "0", "--n-train", "600", "--n-val", "100",
                        "--n-test", "200", "--seed", "3"])
    return out / "data.pkl"
