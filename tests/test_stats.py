"""Shared statistics helpers: bootstrap CIs and the diversity measure."""

import numpy as np

import fidelity
import utils


def test_mean_ci95_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, 20)
    large = rng.normal(1.0, 1.0, 2000)
    m_small, (lo_s, hi_s) = utils.mean_ci95(small)
    m_large, (lo_l, hi_l) = utils.mean_ci95(large)
    assert lo_s < m_small < hi_s and lo_l < m_large < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 4
    assert lo_l < 1.0 < hi_l


def test_mean_ci95_edge_cases():
    assert utils.mean_ci95([3.0]) == (3.0, (3.0, 3.0))
    mean, (lo, hi) = utils.mean_ci95([np.nan, np.nan])
    assert np.isnan(mean) and np.isnan(lo) and np.isnan(hi)
    assert utils.mean_ci95([1.0, np.nan, 3.0])[0] == 2.0


def test_diversity_zero_for_copies_and_larger_for_spread():
    same = np.tile(np.arange(1, 5, dtype=np.float32), (4, 1))
    assert fidelity.diversity(same) == 0.0
    assert np.isclose(fidelity.diversity(np.eye(4)), np.sqrt(2))
    assert np.isnan(fidelity.diversity(same[:1]))


def test_write_json_is_strict_json(tmp_path):
    import json

    path = tmp_path / "m.json"
    utils.write_json(path, {"a": float("nan"), "b": [1.0, np.float32("inf")], "c": np.array([np.nan, 2.0])})
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None], "c": [None, 2.0]}
    assert "NaN" not in path.read_text()
