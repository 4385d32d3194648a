"""The shared statistics layer (utils.bootstrap_ci, cluster_bootstrap, percentile_ci, ci_verdict), the report
formatters, and the diversity measure; checked against hand-computed cases and known rates."""

import numpy as np
import pytest

import fidelity
import utils


# --------------------------------------------------------------------------- bootstrap_ci (queries resampled)
def test_bootstrap_ci_covers_a_known_rate_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = [lo <= 0.3 <= hi for lo, hi in
               (utils.bootstrap_ci(rng.random(100) < 0.3, n_boot=400, seed=s)["ci95"] for s in range(200))]
    assert 0.88 <= np.mean(covered) <= 0.99


def test_bootstrap_ci_of_two_values_by_hand():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5th and 97.5th
    # percentiles of many resamples are 0 and 1.
    est = utils.bootstrap_ci([0.0, 1.0], n_boot=4000, seed=0)
    assert est == {"mean": 0.5, "ci95": [0.0, 1.0]}


def test_bootstrap_ci_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = (utils.bootstrap_ci(rng.normal(1.0, 1.0, n)) for n in (20, 2000))
    assert large["ci95"][1] - large["ci95"][0] < (small["ci95"][1] - small["ci95"][0]) / 4
    assert large["ci95"][0] < 1.0 < large["ci95"][1]


def test_paired_bootstrap_ci_sees_only_the_difference():
    spread = np.random.default_rng(2).normal(0, 10, 50)  # large between-query spread, the same in both arms
    paired = utils.bootstrap_ci(spread + 0.1, spread, seed=0)
    assert paired["mean"] == pytest.approx(0.1) and paired["ci95"] == pytest.approx([0.1, 0.1])
    unpaired = utils.bootstrap_ci(spread + 0.1, seed=0)
    assert unpaired["ci95"][1] - unpaired["ci95"][0] > 1


def test_bootstrap_ci_matches_scipy_percentile_bootstrap_on_a_tiny_case():
    from scipy.stats import bootstrap

    x = np.array([0.1, 0.4, 0.35, 0.8, 0.6])
    ref = bootstrap((x,), np.mean, n_resamples=999, method="percentile", rng=np.random.default_rng(3))
    ci = utils.bootstrap_ci(x, n_boot=999, seed=3)["ci95"]
    assert ci == pytest.approx(list(ref.confidence_interval))


def test_bootstrap_ci_edge_cases():
    assert utils.bootstrap_ci([3.0]) == {"mean": 3.0, "ci95": [3.0, 3.0]}
    empty = utils.bootstrap_ci([np.nan, np.nan])
    assert np.isnan(empty["mean"]) and all(np.isnan(empty["ci95"]))
    assert utils.bootstrap_ci([1.0, np.nan, 3.0])["mean"] == 2.0
    assert utils.bootstrap_ci([1.0, 2.0, 5.0], [0.0, np.nan, 1.0])["mean"] == 2.5  # the pair with a NaN is dropped
    with pytest.raises(utils.UserError, match="one reference value per unit, got 2 for 3"):
        utils.bootstrap_ci([1.0, 2.0, 3.0], [1.0, 2.0])


# --------------------------------------------------------------------------- cluster_bootstrap (images with captions)
def test_cluster_bootstrap_resamples_an_image_with_all_its_captions():
    # image 0 (group 0): captions hit, hit, miss; image 1 (group 1): one caption, a miss.
    sums, counts = np.array([[2.0, 0.0], [0.0, 0.0]]), np.array([[3.0, 0.0], [0.0, 1.0]])
    point, draws = utils.cluster_bootstrap(sums, counts, 200, seed=1)
    np.testing.assert_allclose(point, [2 / 3, 0.0])
    col = draws[:, 0][np.isfinite(draws[:, 0])]
    # Group 0's recall is 2/3 in every resample that holds image 0 (its captions travel together); a resample
    # without image 0 has no query of the group (NaN), which happens in about a quarter of them.
    assert np.allclose(col, 2 / 3) and 100 < len(col) < 200
    assert draws.shape == (200, 2) and np.nanmax(draws[:, 1]) == 0


def test_cluster_bootstrap_is_unbiased_on_one_category_per_image():
    recalls = [0.2, 0.4, 0.6, 0.8]
    has = np.repeat(np.eye(4, dtype=bool), 100, axis=0)
    hits = np.concatenate([np.arange(100) < r * 100 for r in recalls]).astype(float)
    point, draws = utils.cluster_bootstrap(hits[:, None] * has, has.astype(float), 500, seed=0)
    np.testing.assert_allclose(point, recalls)
    np.testing.assert_allclose(draws.mean(0), recalls, atol=0.02)
    again = utils.cluster_bootstrap(hits[:, None] * has, has.astype(float), 500, seed=0)[1]
    np.testing.assert_array_equal(draws, again)  # seeded


def _per_seed_sums(hits, groups):
    """(n_seeds, n_images, G) hit sums written out by hand for 2 captions per image."""
    per_image = hits.reshape(len(hits), -1, 2).sum(-1)
    return per_image[:, :, None] * groups


def test_paired_cluster_bootstrap_over_images_and_seeds_by_hand():
    # 4 images with 2 captions each; groups: images 0-1 ("g0"), images 2-3 ("g1")
    groups = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    counts = 2.0 * groups
    ref = np.zeros((3, 8))
    new = ref.copy()
    new[:, :4] = 1  # the new arm finds every query of g0 with every seed, nothing else changes
    point, draws = utils.cluster_bootstrap(_per_seed_sums(new, groups), counts, 300, 0,
                                           ref=_per_seed_sums(ref, groups))
    np.testing.assert_allclose(point, [1.0, 0.0])
    col0 = draws[:, 0][np.isfinite(draws[:, 0])]
    assert len(col0) > 200 and np.allclose(col0, 1.0) and np.allclose(draws[:, 1][np.isfinite(draws[:, 1])], 0)
    half = _per_seed_sums(ref + 0.5, groups)
    same, d_same = utils.cluster_bootstrap(half, counts, 100, 0, ref=half)
    assert np.allclose(same, 0) and np.allclose(d_same[np.isfinite(d_same)], 0)  # paired: no spurious spread
    # Seeds disagree (only seed 0 finds g0): the mean is 1/3, and resampling seeds spreads the CI over [0, 1].
    new2 = ref.copy()
    new2[0, :4] = 1
    p2, d2 = utils.cluster_bootstrap(_per_seed_sums(new2, groups), counts, 500, 0,
                                     ref=_per_seed_sums(ref, groups))
    est = utils.percentile_ci(p2[0], d2[:, 0])
    assert est["mean"] == pytest.approx(1 / 3) and est["ci95"] == pytest.approx([0, 1])


def test_percentile_ci_drops_undefined_draws():
    draws = np.concatenate([np.linspace(0, 1, 101), [np.nan, np.inf]])
    assert utils.percentile_ci(0.5, draws) == {"mean": 0.5, "ci95": pytest.approx([0.025, 0.975])}
    assert np.isnan(utils.percentile_ci(0.0, [np.nan])["ci95"]).all()


def test_ci_verdict():
    assert utils.ci_verdict([0.01, 0.2]) == "better"
    assert utils.ci_verdict([-0.2, -0.1]) == "worse"
    assert utils.ci_verdict([-0.1, 0.1]) == utils.ci_verdict([0.0, 0.1]) == "no detectable difference"
    assert utils.ci_verdict([np.nan, 0.1]) == utils.ci_verdict(None) == "undefined"
    assert utils.ci_verdict([0.1, 0.2], point=np.nan) == "undefined"


# --------------------------------------------------------------------------- report formatters
def test_formatters_and_table():
    assert utils.fmt_delta({"mean": 0.0123, "ci95": [-0.004, 0.03]}) == "+0.012 [-0.004, +0.030]"
    assert utils.fmt_delta({"mean": float("nan"), "ci95": [0, 0]}) == utils.fmt_delta(None) == "n/a"
    assert utils.fmt_est({"mean": 0.5, "ci95": [0.25, 0.75]}, ".2f") == "0.50 [0.25, 0.75]"
    assert utils.md_table(["a", "b"], [[1, "x"], [2.5, None]]) == ["| a | b |", "|---|---|", "| 1 | x |",
                                                                 "| 2.5 | None |"]


# --------------------------------------------------------------------------- other shared measures
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
