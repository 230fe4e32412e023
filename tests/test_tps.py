"""Thin-plate spline and the augmentation image warp: exact interpolation, affine reproduction,
features carried onto their target positions, fill outside the image, farthest point sampling."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from deepssm_workflow.tps import ThinPlateSpline, control_subset, warp_image

ORIGIN, SPACING, SIZE = (-40.0, -40.0, -40.0), (2.0, 2.0, 2.0), (40, 40, 40)  # x, y, z; image is (Z, Y, X)


def voxel_centres(origin=ORIGIN, spacing=SPACING, size=SIZE) -> np.ndarray:
    """World x, y, z of every voxel centre, shape (Z, Y, X, 3)."""
    z, y, x = np.meshgrid(*[origin[a] + spacing[a] * np.arange(size[a]) for a in (2, 1, 0)], indexing="ij")
    return np.stack([x, y, z], -1)


def smooth_displacement(points: np.ndarray) -> np.ndarray:
    return points + 3.0 * np.sin(points[:, [1, 2, 0]] / 12.0) + np.array([1.0, -2.0, 0.5])


def test_interpolates_control_points_exactly():
    source = np.random.default_rng(0).uniform(-30, 30, (200, 3))
    target = smooth_displacement(source)
    spline = ThinPlateSpline(source, target)
    assert np.abs(spline(source) - target).max() < 1e-6
    # smoothing gives up exactness and tends to the least-squares affine fit
    affine, *_ = np.linalg.lstsq(np.c_[np.ones(len(source)), source], target, rcond=None)
    errors = [np.abs(ThinPlateSpline(source, target, r)(source) - target).max() for r in (1.0, 100.0)]
    assert 1e-6 < errors[0] < errors[1]
    stiff = ThinPlateSpline(source, target, 1e7)(source)
    assert np.abs(stiff - np.c_[np.ones(len(source)), source] @ affine).max() < 1e-2


def test_reproduces_affine_maps_away_from_control_points():
    rng = np.random.default_rng(1)
    source = rng.uniform(-30, 30, (50, 3))
    matrix = np.eye(3) + rng.normal(0, 0.1, (3, 3))
    shift = np.array([5.0, -3.0, 2.0])
    spline = ThinPlateSpline(source, source @ matrix + shift)
    elsewhere = rng.uniform(-60, 60, (5000, 3))
    assert np.abs(spline(elsewhere) - (elsewhere @ matrix + shift)).max() < 1e-6
    assert np.abs(spline.weights).max() < 1e-9


def test_grid_evaluation_matches_pointwise_evaluation():
    source = np.random.default_rng(2).uniform(-35, 35, (300, 3))
    spline = ThinPlateSpline(source, smooth_displacement(source))
    size = (23, 17, 11)  # unequal axes catch any x/z mix-up
    on_grid = spline.on_grid(ORIGIN, SPACING, size)
    assert on_grid.shape == (11, 17, 23, 3) and on_grid.dtype == np.float32
    expected = spline(voxel_centres(size=size).reshape(-1, 3)).reshape(on_grid.shape)
    assert np.abs(on_grid - expected).max() < 1e-3  # float32 on the grid, mm


def test_coarse_lattice_is_exact_on_its_knots_and_close_between():
    source = np.random.default_rng(9).uniform(-35, 35, (200, 3))
    spline = ThinPlateSpline(source, smooth_displacement(source))
    size = (23, 17, 12)  # 12 is not 1 + a multiple of 2: the lattice reaches one knot past the far end
    exact = spline.on_grid(ORIGIN, SPACING, size)
    coarse = spline.on_grid(ORIGIN, SPACING, size, step=2)
    assert coarse.shape == exact.shape and coarse.dtype == np.float32
    assert np.abs(coarse[::2, ::2, ::2] - exact[::2, ::2, ::2]).max() < 1e-3
    error = np.linalg.norm(coarse - exact, axis=-1)
    assert 1e-3 < error.max() < 0.25 * SPACING[0] and error.mean() < 0.02 * SPACING[0]
    with pytest.raises(ValueError, match="step"):
        spline.on_grid(ORIGIN, SPACING, size, step=0)


def blob_image(centres: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    world = voxel_centres()
    image = np.zeros(world.shape[:3], np.float32)
    for centre in centres:
        image += np.exp(-((world - centre) ** 2).sum(-1) / (2 * sigma**2)).astype(np.float32)
    return image


def blob_centroid(image: np.ndarray, near: np.ndarray, radius: float = 8.0) -> np.ndarray:
    """Intensity-weighted centroid of the image within `radius` mm of a point."""
    world = voxel_centres()
    weight = image * (((world - near) ** 2).sum(-1) < radius**2)
    return (world * weight[..., None]).sum((0, 1, 2)) / weight.sum()


def test_warp_moves_features_onto_target_points():
    # a 3 x 3 x 2 lattice of blobs 18 mm apart, jittered; some translated, the others (off the axis)
    # rotated about the z axis. Each blob is carried by its centre and six landmarks 5 mm around it,
    # as a dense correspondence set would: a lone control point whose neighbours move differently
    # sits at the tip of the r-kernel's cone and skews its blob by up to a voxel.
    axes = ([-18.0, 0.0, 18.0], [-18.0, 0.0, 18.0], [-9.0, 9.0])
    lattice = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    centres = lattice + np.random.default_rng(3).uniform(-2, 2, lattice.shape)
    angle = np.radians(14.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    rotated = (np.arange(len(centres)) % 2 == 1) & (np.abs(lattice[:, :2]).sum(1) > 0)

    def move(points, rotate):
        return points @ rotation.T if rotate else points + np.array([3.0, -2.5, 2.0])

    arms = np.vstack([np.zeros(3), 5 * np.eye(3), -5 * np.eye(3)])
    source = np.vstack([centre + arms for centre in centres])
    target = np.vstack([move(centre + arms, rotate) for centre, rotate in zip(centres, rotated)])
    moved_centres = target[::len(arms)]
    assert np.linalg.norm(moved_centres - centres, axis=1).min() > 3.0  # every blob moves by over 1.5 voxels

    image = blob_image(centres)
    warped = warp_image(image, ORIGIN, SPACING, source, target, n_control=len(source))
    assert warped.shape == image.shape and warped.dtype == np.float32
    for after in moved_centres:
        assert np.linalg.norm(blob_centroid(warped, after) - after) < 0.5 * SPACING[0]
        assert np.linalg.norm(blob_centroid(image, after) - after) > SPACING[0]  # the original is elsewhere
    assert warped.max() > 0.75 * image.max()  # moved, not smeared away (trilinear sampling blunts peaks a little)


def test_identity_warp_returns_the_image():
    rng = np.random.default_rng(4)
    image = ndimage.gaussian_filter(rng.normal(size=SIZE[::-1]), 2.0).astype(np.float32)
    points = rng.uniform(-40, 38, (120, 3))
    warped = warp_image(image, ORIGIN, SPACING, points, points, n_control=64)
    assert np.abs(warped - image).max() < 1e-4 * np.abs(image).max()


def test_fill_outside_the_image():
    image = np.random.default_rng(5).uniform(1, 2, SIZE[::-1]).astype(np.float32)
    source = np.random.default_rng(6).uniform(-30, 30, (40, 3))
    target = source + np.array([30.0, 0.0, 0.0])  # 15 voxels along x: output voxels x < 15 see nothing
    warped = warp_image(image, ORIGIN, SPACING, source, target, n_control=40, fill=-7.0)
    assert np.all(warped[:, :, :15] == -7.0)
    assert np.abs(warped[:, :, 15:] - image[:, :, :-15]).max() < 1e-4
    default = warp_image(image, ORIGIN, SPACING, source, target, n_control=40)
    assert np.all(default[:, :, :15] == np.float32(np.median(image)))


def test_control_subset_is_deterministic_and_spread():
    rng = np.random.default_rng(7)
    points = rng.normal(size=(2000, 3)) * np.array([40.0, 25.0, 30.0])
    chosen = control_subset(points, 100)
    assert np.array_equal(chosen, control_subset(points.copy(), 100))
    assert len(np.unique(chosen)) == 100

    def min_gap(subset):
        distance = np.linalg.norm(subset[:, None] - subset[None], axis=-1)
        return distance[np.triu_indices(len(subset), 1)].min()

    random_gaps = [min_gap(points[rng.choice(len(points), 100, replace=False)]) for _ in range(20)]
    assert min_gap(points[chosen]) > max(random_gaps)
    assert np.array_equal(control_subset(points[:50], 100), np.arange(50))
    assert np.array_equal(control_subset(points[:50], 50), np.arange(50))


def test_invalid_control_points_are_rejected():
    rng = np.random.default_rng(8)
    points = rng.uniform(-10, 10, (20, 3))
    with pytest.raises(ValueError, match="shape"):
        ThinPlateSpline(points, points[:-1])
    with pytest.raises(ValueError, match="non-coplanar"):
        ThinPlateSpline(points[:3], points[:3])
    flat = points * np.array([1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="non-coplanar"):
        ThinPlateSpline(flat, flat)
    with pytest.raises(ValueError, match="duplicate"):
        ThinPlateSpline(np.vstack([points, points[:1]]), np.vstack([points, points[:1] + 1]))
    image = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="shape"):
        warp_image(image, (0, 0, 0), (1, 1, 1), points, points[:-1], n_control=10)
    with pytest.raises(ValueError, match="non-coplanar"):
        warp_image(image, (0, 0, 0), (1, 1, 1), points, points, n_control=3)
