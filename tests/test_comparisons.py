"""Paired, Holm-adjusted comparisons and the seeds x subjects bootstrap, on data with a known answer."""

import numpy as np
import pytest

from deepssm_workflow.comparisons import comparison_pairs, holm, paired_comparisons, seeds_scans_interval, sign_flip_p


def test_holm_matches_a_hand_computed_family():
    adjusted, rejected, levels = holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    # sorted 0.005, 0.01, 0.03, 0.04 tested at 0.05/4, 0.05/3, 0.05/2, 0.05/1
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    assert rejected.tolist() == [True, False, False, True]
    # the first step that fails (0.03 at 0.025) decides every hypothesis not rejected
    np.testing.assert_allclose(levels, [0.05 / 3, 0.025, 0.025, 0.0125])


def test_a_planted_improvement_is_found_and_the_rest_is_not_called():
    rng = np.random.default_rng(0)
    baseline = rng.gamma(4.0, 0.5, 40)
    errors = {"good": baseline - 0.4 + rng.normal(0, 0.15, 40),  # planted: 0.4 mm better, paired
              "same": baseline + rng.normal(0, 0.15, 40), "mean shape": baseline}
    table = paired_comparisons(errors, comparison_pairs(["good", "same"], ["mean shape"])).set_index(
        ["method", "against"])
    good = table.loc[("good", "mean shape")]
    assert good["verdict"] == "beats" and good["difference_high_mm"] < 0 and good["p_holm"] < 0.05
    assert good["difference_low_mm"] < -0.4 < good["difference_high_mm"]
    assert table.loc[("same", "mean shape"), "verdict"] == "cannot tell apart from"
    assert table.loc[("good", "same"), "verdict"] == "beats"
    # the intervals are at Holm's levels: never narrower than the family's first step
    assert (table["interval_level"] >= 0.95).all() and (table["interval_level"] <= 1 - 0.05 / 3 + 1e-12).all()


def test_on_null_data_the_family_rejects_at_about_its_level():
    rng = np.random.default_rng(1)
    repeats, false_families = 150, 0
    for _ in range(repeats):
        shared = rng.gamma(4.0, 0.5, 30)
        errors = {name: shared + rng.normal(0, 0.3, 30) for name in ("a", "b", "c")}
        table = paired_comparisons(errors, [("a", "b"), ("a", "c"), ("b", "c")], resamples=1000)
        false_families += (table["verdict"] != "cannot tell apart from").any()
    # a family-wise 5 % level; the percentile bootstrap at n = 30 is a little liberal, so a tolerance
    assert false_families / repeats <= 0.11


def test_the_seed_spread_widens_the_interval_and_a_baseline_compares_with_every_seed():
    rng = np.random.default_rng(2)
    subjects = rng.gamma(4.0, 0.5, 25)
    seeds = np.array([0.0, 0.5, -0.5])[:, None] + subjects[None, :]  # init seeds shift every scan alike
    one_seed_low, one_seed_high = seeds_scans_interval(seeds.mean(0))
    low, high = seeds_scans_interval(seeds)
    assert high - low > 1.5 * (one_seed_high - one_seed_low)
    table = paired_comparisons({"method": seeds, "mean shape": subjects + 2.0}, [("method", "mean shape")])
    row = table.iloc[0]
    assert row["n_seeds"] == 3 and row["n_subjects"] == 25 and row["verdict"] == "beats"
    assert row["difference_mm"] == pytest.approx(-2.0)


def test_tables_of_other_subjects_or_seeds_are_refused():
    with pytest.raises(ValueError, match="same test subjects"):
        paired_comparisons({"a": np.ones(5), "b": np.ones(6)}, [("a", "b")])
    with pytest.raises(ValueError, match="same seeds"):
        paired_comparisons({"a": np.ones((2, 5)), "b": np.ones((3, 5))}, [("a", "b")])


def test_the_sign_flip_test_is_exact_and_keeps_its_level_at_three_subjects():
    # every one of 3 differences negative: 2 of the 8 sign patterns are as extreme, p = 0.25
    assert sign_flip_p([-0.05, -0.04, -0.06]) == pytest.approx(0.25)
    table = paired_comparisons({"a": np.array([1.0, 2.0, 3.0]), "b": np.array([1.05, 2.04, 3.06])}, [("a", "b")])
    assert table.iloc[0]["verdict"] == "cannot tell apart from"  # a bootstrap would have called it certain
    rng = np.random.default_rng(3)
    d = rng.normal(0.2, 1.0, 10)
    signs = np.array([[1 if (k >> i) & 1 else -1 for i in range(10)] for k in range(2**10)])
    brute = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12)
    assert sign_flip_p(d) == pytest.approx(brute)
    assert 0.0 < sign_flip_p(rng.normal(0.5, 1.0, 40)) < 0.05  # Monte Carlo past 16 subjects
