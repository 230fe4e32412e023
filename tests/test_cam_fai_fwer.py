"""Westfall-Young max-T family-wise error control of the cam-FAI per-point tests, on constructed
data with a known answer: a planted effect is found with few false positives, null data are
rejected anywhere at about the nominal 5 %, and adjusted p never undercut the raw permutation p."""

from __future__ import annotations

import numpy as np
import pytest

from deepssm_workflow.studies.femur import FWER_LEVEL, PlantedLesion, fwer_summary, fwer_test, point_areas
from deepssm_workflow.studies.fwer import (
    detection,
    hotelling_statistics,
    labellings,
    max_t_adjust,
    welch_statistics,
    westfall_young,
)
from deepssm_workflow.studies.stats import hotelling_t2, welch_t


def planted_data(rng, n_cam=8, n_control=12, n_points=256, n_planted=24, shift=3.5):
    """Normal displacement (N, M) and 3D positions (N, M, 3) with unit noise, the cam group moved
    by `shift` (in noise SDs) on the first `n_planted` points only."""
    cam = np.arange(n_cam + n_control) < n_cam
    region = np.arange(n_points) < n_planted
    displacement = rng.normal(size=(len(cam), n_points))
    displacement[np.ix_(cam, region)] += shift
    world = rng.normal(size=(len(cam), n_points, 3))
    world[np.ix_(cam, region)] += shift / np.sqrt(3)  # the same length of shift, along (1, 1, 1)
    return cam, region, displacement, world


def test_batched_statistics_match_the_per_point_tests():
    rng = np.random.default_rng(1)
    x, positions = rng.normal(size=(15, 40)) + 10.0, rng.normal(size=(15, 40, 3))
    labels = np.stack([rng.permutation(np.arange(15) < 6) for _ in range(5)])
    for g, t, t2 in zip(labels, welch_statistics(x, labels), hotelling_statistics(positions, labels)):
        np.testing.assert_allclose(t, welch_t(x, g), rtol=1e-10)
        np.testing.assert_allclose(t2, hotelling_t2(positions, g), rtol=1e-8)


def test_max_t_by_hand():
    observed = np.array([3.0, 2.0, 1.0])
    permuted = np.array([[0.0, 0.0, 0.0], [2.5, 0.0, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 4.0]])
    # maxima 0, 2.5, 1.5, 4: single step counts those >= each observed value, +1 over 4 + 1
    raw, single = max_t_adjust(observed, permuted, step_down=False)
    np.testing.assert_allclose(raw, [1 / 5, 1 / 5, 2 / 5])
    np.testing.assert_allclose(single, [2 / 5, 3 / 5, 4 / 5])
    # step-down: point 1 against the maxima over points 1 and 2 only (0, 0, 1.5, 4) -> 2/5, then monotone
    np.testing.assert_allclose(max_t_adjust(observed, permuted)[1], [2 / 5, 2 / 5, 2 / 5])


def test_planted_effect_is_found_with_few_false_positives():
    cam, region, displacement, world = planted_data(np.random.default_rng(7))
    result = westfall_young(cam, welch=displacement, hotelling=world, n_permutations=999, seed=3)
    assert result["p_floor"] == pytest.approx(1e-3) and not result["exact"]
    assert "shared by the Welch and Hotelling tests" in result["method"]
    for name in ("welch", "hotelling"):
        rates = detection(result[name]["p_fwer"] < 0.05, region)
        assert rates["sensitivity"] >= 0.9
        assert rates["false_positive_fraction"] <= 1 / (~region).sum()  # at most one point outside
        # unadjusted, about 5 % of the 232 points without an effect would be flagged
        assert (result[name]["p"][~region] < 0.05).sum() >= 4
    assert np.all(result["welch"]["t"][region & (result["welch"]["p_fwer"] < 0.05)] > 0)


def test_family_wise_rejection_rate_on_null_data_is_nominal():
    """No group difference: the share of data sets where any of 30 points is called significant
    stays near 5 % (B = 199, so p < 0.05 means at most 8 of 199 relabelled maxima reach it: 4.5 %),
    while an unadjusted per-point p < 0.05 flags some point in most of them."""
    rng = np.random.default_rng(11)
    cam = np.arange(12) < 6
    repeats, any_fwer, any_hotelling, any_raw = 200, 0, 0, 0
    for repeat in range(repeats):
        result = westfall_young(cam, welch=rng.normal(size=(12, 30)), hotelling=rng.normal(size=(12, 30, 3)),
                                n_permutations=199, seed=repeat)
        any_fwer += bool((result["welch"]["p_fwer"] < 0.05).any())
        any_hotelling += bool((result["hotelling"]["p_fwer"] < 0.05).any())
        any_raw += bool((result["welch"]["p"] < 0.05).any())
    # Binomial(200, 0.045): mean 9, SD 2.9; 2 to 20 rejections hold with probability > 0.999
    for rejections in (any_fwer, any_hotelling):
        assert 0.01 <= rejections / repeats <= 0.10
    assert any_raw / repeats > 0.5


@pytest.mark.parametrize("step_down", [True, False])
def test_adjusted_p_is_above_the_raw_p_and_monotone_in_the_statistic(step_down):
    cam, _, displacement, world = planted_data(np.random.default_rng(3), n_points=120, n_planted=15, shift=2.0)
    result = westfall_young(cam, welch=displacement, hotelling=world, n_permutations=499, seed=0,
                            step_down=step_down)
    for name in ("welch", "hotelling"):
        statistic, p, p_fwer = result[name]["statistic"], result[name]["p"], result[name]["p_fwer"]
        assert np.all(p_fwer >= p) and np.all(p >= result["p_floor"]) and np.all(p_fwer <= 1)
        order = np.argsort(-statistic)
        assert np.all(np.diff(p_fwer[order]) >= 0)  # a larger statistic never gets a larger adjusted p
    if step_down:
        single = westfall_young(cam, welch=displacement, n_permutations=499, seed=0, step_down=False)
        assert np.all(result["welch"]["p_fwer"] <= single["welch"]["p_fwer"])  # step-down is never less powerful


def test_few_subjects_enumerate_every_labelling():
    rng = np.random.default_rng(0)
    cam = np.array([1, 1, 1, 0, 0, 0], bool)  # C(6, 3) = 20 labellings, the observed one among them
    result = westfall_young(cam, welch=rng.normal(size=(6, 10)), n_permutations=999)
    assert result["exact"] and result["n_labellings"] == 20 and result["p_floor"] == pytest.approx(1 / 20)
    assert result["welch"]["p"].min() >= 1 / 20 and "exact (20 labellings)" in result["method"]
    # random relabellings come from one seeded stream: the same whatever the batch size
    draws = [np.concatenate(list(labellings(np.arange(12) < 5, 50, seed=4, chunk=c)[0]())) for c in (7, 50)]
    np.testing.assert_array_equal(*draws)


def test_detection_counts_points_and_area():
    significant = np.array([1, 1, 0, 1, 0, 0], bool)
    truth = np.array([1, 1, 1, 0, 0, 0], bool)
    assert detection(significant, truth) == pytest.approx({"sensitivity": 2 / 3, "false_positive_fraction": 1 / 3})
    weighted = detection(significant, truth, weight=[1, 1, 1, 6, 1, 1])
    assert weighted["false_positive_fraction"] == pytest.approx(6 / 8)


def test_femur_summary_scores_the_planted_region():
    import pyvista as pv

    cam, region, displacement, world = planted_data(np.random.default_rng(5), n_points=200, n_planted=20)
    planted = PlantedLesion(weight=np.where(region, 1.0, 0.0), center=np.zeros(3), normal=np.array([1.0, 0, 0]),
                            neck_axis=np.array([0.0, 1, 0]), shaft_axis=np.array([0.0, 0, 1]),
                            head_center=np.zeros(3), head_radius=20.0)
    sphere = pv.Sphere(radius=10.0, theta_resolution=40, phi_resolution=40)
    points = np.asarray(sphere.points)[np.random.default_rng(0).choice(sphere.n_points, 200, replace=False)]
    areas = point_areas(sphere, points)
    assert areas.sum() == pytest.approx(sphere.area) and np.all(areas > 0)
    row = fwer_summary(fwer_test(world, cam, displacement, n_permutations=999), planted, areas)
    assert row["fwer_p_floor"] == pytest.approx(1e-3) and "step-down max-T" in row["fwer_method"]
    assert row["n_fwer_significant_points"] >= 18 and row["hotelling_n_fwer_significant_points"] >= 18
    assert row["fwer_sensitivity"] >= 0.9 and row["hotelling_fwer_sensitivity"] >= 0.9
    assert row["fwer_false_positive_fraction"] <= 1 / 180 and row["fwer_false_positive_area_fraction"] < 0.05
    assert row["min_p_fwer"] < FWER_LEVEL
    # one cam subject: no Welch t, but the Hotelling max-T still runs (on every one of its 20 labellings)
    few = fwer_test(world, np.arange(20) == 0, displacement)
    assert "welch" not in few and few["exact"] and few["n_labellings"] == 20
    assert "n_fwer_significant_points" not in fwer_summary(few)
