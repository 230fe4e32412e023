"""PCA shape space against brute-force linear algebra, and the paper's RMSE (eq. 12)."""

from __future__ import annotations

import numpy as np
import pytest

from deepssm_workflow.shape_space import ShapeSpace, rms3d, rmse


def make_shapes(n=12, m=40, seed=0):
    """Shapes with a decaying spectrum, like a real cohort: a few strong modes, many weak ones."""
    rng = np.random.default_rng(seed)
    template = rng.normal(size=(m, 3)) * 20
    modes = rng.normal(size=(n, 3 * m)) * (2.0 ** -np.arange(n))[:, None]
    return template + (rng.normal(size=(n, n)) @ modes).reshape(n, m, 3)


def covariance_eigenvalues(shapes):
    return np.linalg.eigvalsh(np.cov(shapes.reshape(len(shapes), -1), rowvar=False))[::-1]


def test_full_space_round_trip_is_exact():
    shapes = make_shapes()
    space = ShapeSpace(n_modes=len(shapes) - 1).fit(shapes)
    scores = space.transform(shapes)
    assert scores.shape == (len(shapes), len(shapes) - 1)
    assert np.allclose(space.inverse_transform(scores), shapes, rtol=0, atol=1e-8)
    assert np.allclose(space.mean, shapes.mean(0))
    assert np.allclose(scores.mean(0), 0, atol=1e-9)


def test_basis_is_orthonormal_and_signs_are_deterministic():
    shapes = make_shapes()
    space = ShapeSpace(n_modes=6).fit(shapes)
    assert space.basis.shape == (6, shapes.shape[1] * 3)
    assert np.allclose(space.basis @ space.basis.T, np.eye(6), atol=1e-10)
    largest = space.basis[np.arange(6), np.abs(space.basis).argmax(1)]
    assert np.all(largest > 0)
    # the shapes in another order give the same modes, signs included
    again = ShapeSpace(n_modes=6).fit(shapes[::-1])
    assert np.allclose(again.basis, space.basis, atol=1e-8)


def test_variances_are_the_top_covariance_eigenvalues():
    shapes = make_shapes()
    space = ShapeSpace(n_modes=5).fit(shapes)
    eigen = covariance_eigenvalues(shapes)
    assert np.allclose(space.variances, eigen[:5], rtol=1e-8)
    assert np.allclose(space.explained_variance_ratio, eigen[:5] / eigen.sum(), rtol=1e-8)
    # scores' variance along each mode is that mode's eigenvalue (unbiased, N - 1)
    assert np.allclose(space.transform(shapes).var(0, ddof=1), space.variances, rtol=1e-8)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_variance_threshold_picks_the_smallest_sufficient_count(fraction):
    shapes = make_shapes()
    eigen = covariance_eigenvalues(shapes)[: len(shapes) - 1]
    cumulative = np.cumsum(eigen) / eigen.sum()
    expected = next(k for k in range(1, len(eigen) + 1) if cumulative[k - 1] >= fraction - 1e-12)
    space = ShapeSpace(variance=fraction).fit(shapes)
    assert space.n_modes == expected
    assert space.explained_variance_ratio.sum() >= fraction - 1e-12
    if expected > 1:
        assert space.explained_variance_ratio[:-1].sum() < fraction


def test_save_load_round_trip(tmp_path):
    shapes = make_shapes()
    space = ShapeSpace(variance=0.99).fit(shapes)
    path = tmp_path / "shape_space.npz"
    space.save(path)
    loaded = ShapeSpace.load(path)
    assert sorted(path.parent.iterdir()) == [path]  # no staging leftovers, no doubled suffix
    for name, array in space.to_arrays().items():
        assert np.array_equal(getattr(loaded, name), array)
    assert loaded.n_modes == space.n_modes
    assert np.array_equal(loaded.transform(shapes), space.transform(shapes))
    assert np.array_equal(ShapeSpace.from_arrays(space.to_arrays()).basis, space.basis)


def test_truncation_rmse_vanishes_with_all_modes_and_falls_with_more():
    shapes = make_shapes()
    floors = [ShapeSpace(n_modes=k).fit(shapes).truncation_rmse(shapes).mean() for k in range(1, len(shapes))]
    assert floors[-1] < 1e-9
    assert np.all(np.diff(floors) < 0)
    # on held-out shapes the floor stays above zero even with every mode
    other = make_shapes(seed=1)
    assert np.all(ShapeSpace(n_modes=len(shapes) - 1).fit(shapes).truncation_rmse(other) > 0)


def test_rmse_matches_a_hand_computed_example():
    true = np.zeros((2, 2, 3))
    pred = true.copy()
    pred[0, :, 0] = [3.0, 4.0]  # x errors 3 and 4: RMSE_x = sqrt(12.5), y and z exact
    pred[1, 0] = [1.0, 2.0, 2.0]  # one point off by (1, 2, 2): RMSE = (sqrt(1/2) + sqrt(2) + sqrt(2)) / 3
    expected = [np.sqrt(12.5) / 3, (np.sqrt(0.5) + 2 * np.sqrt(2.0)) / 3]
    assert np.allclose(rmse(pred, true), expected)
    assert np.isclose(rmse(pred[0], true[0]), expected[0])  # one (M, 3) shape gives a scalar


@pytest.mark.parametrize("shapes, message", [
    (np.zeros((5, 4)), r"\(N, M, 3\)"),
    (np.zeros((5, 4, 2)), r"\(N, M, 3\)"),
    (np.zeros((1, 4, 3)), "at least 2 shapes"),
    (np.full((5, 4, 3), np.nan), "non-finite"),
    (np.zeros((5, 4, 3)), "identical"),
])
def test_bad_shapes_are_refused(shapes, message):
    with pytest.raises(ValueError, match=message):
        ShapeSpace(n_modes=1).fit(shapes)


def test_bad_settings_and_mismatched_inputs_are_refused():
    shapes = make_shapes(n=6)
    with pytest.raises(ValueError, match="exactly one"):
        ShapeSpace()
    with pytest.raises(ValueError, match="exactly one"):
        ShapeSpace(n_modes=2, variance=0.9)
    with pytest.raises(ValueError, match="fraction"):
        ShapeSpace(variance=1.5)
    with pytest.raises(ValueError, match="positive integer"):
        ShapeSpace(n_modes=0)
    with pytest.raises(ValueError, match="N - 1"):
        ShapeSpace(n_modes=6).fit(shapes)
    with pytest.raises(ValueError, match="not fitted"):
        ShapeSpace(n_modes=2).transform(shapes)
    space = ShapeSpace(n_modes=3).fit(shapes)
    with pytest.raises(ValueError, match="points each"):
        space.transform(shapes[:, :-1])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        space.inverse_transform(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="equal shape"):
        rmse(shapes, shapes[:, :-1])
    with pytest.raises(ValueError, match="lack"):
        ShapeSpace.from_arrays({"mean": space.mean})


def test_rank_deficient_shapes_still_get_an_orthonormal_full_basis():
    # 10 shapes made of 3 modes: modes 4..9 carry no variance but must not blow up (the KDE adds noise there)
    rng = np.random.default_rng(5)
    shapes = (rng.normal(size=(10, 3)) @ rng.normal(size=(3, 60))).reshape(10, 20, 3) + 7.0
    space = ShapeSpace(n_modes=9).fit(shapes)
    assert np.allclose(space.basis @ space.basis.T, np.eye(9), atol=1e-10)
    assert np.allclose(space.variances[3:], 0, atol=1e-12)
    assert np.allclose(space.inverse_transform(space.transform(shapes)), shapes, atol=1e-8)
    assert ShapeSpace(variance=0.999999).fit(shapes).n_modes == 3


def test_paper_scale_cohort_round_trips():
    # 200 shapes of 1024 points: the (N, 3M) thin SVD never forms a 3072 x 3072 covariance
    shapes = np.random.default_rng(2).normal(size=(200, 1024, 3))
    space = ShapeSpace(n_modes=199).fit(shapes)
    assert np.allclose(space.inverse_transform(space.transform(shapes)), shapes, atol=1e-8)


def test_3d_rms_is_rotation_invariant_where_eq_12_is_not():
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    true = rng.normal(0, 10, (50, 3))
    pred = true + np.array([0.5, 0.0, 0.0]) + rng.normal(0, 0.05, (50, 3))  # an error along one axis
    turned = [Rotation.from_euler("z", angle, degrees=True).as_matrix() for angle in (0, 15, 45)]
    eq12 = [rmse(pred @ r.T, true @ r.T) for r in turned]
    rms = [rms3d(pred @ r.T, true @ r.T) for r in turned]
    assert max(eq12) - min(eq12) > 0.05  # eq. 12 reads the same error differently as the frame turns
    assert np.ptp(rms) < 1e-9 and rms[0] == pytest.approx(np.sqrt(((pred - true) ** 2).sum(1).mean()))
