"""Nested particle scales for coarse-to-fine methods (Progressive DeepSSM).

A scale is a prefix of one ordering of the M correspondences: the farthest-point order on
the training mean shape (world frame), so that every prefix is spread over the whole surface
and each finer scale adds points between those it already has. The order comes from the
shapes, never from the file: a ShapeWorks project or a CSV manifest lists its particles in
no particular order (the synthetic generator happens to list them in farthest-point order
on its template, which this does not rely on).

How well spread a prefix is, measured on the mean shape (`spread`):
    covering radius  the largest distance from any of the M points to its nearest prefix point
    separation       the smallest distance between two prefix points
Farthest-point order guarantees separation >= covering radius for every prefix (each point
was the farthest from those before it when chosen), and a covering radius at most twice the
best any prefix of that size could reach (Gonzalez's k-centre bound).
"""

from __future__ import annotations

import numpy as np

from .points import farthest_point_sampling


def nested_order(mean_shape: np.ndarray) -> np.ndarray:
    """A permutation of the M points of `mean_shape` (M, 3) whose every prefix is well spread."""
    mean_shape = np.asarray(mean_shape, dtype=np.float64)
    if mean_shape.ndim != 2 or mean_shape.shape[1] != 3:
        raise ValueError(f"the mean shape must be (M, 3), got {mean_shape.shape}")
    return farthest_point_sampling(mean_shape, len(mean_shape))


def scale_sizes(n_points: int, coarsest: int = 64, factor: int = 2) -> list[int]:
    """Point counts of the scales, coarse to fine: coarsest, coarsest * factor, ..., then all n_points."""
    if coarsest < 4 or factor < 2:
        raise ValueError(f"scales need coarsest >= 4 points and a factor >= 2 (got {coarsest}, {factor})")
    if n_points < coarsest:
        raise ValueError(f"the shapes have {n_points} points, fewer than the coarsest scale's {coarsest}")
    sizes = [coarsest]
    while sizes[-1] * factor < n_points:
        sizes.append(sizes[-1] * factor)
    return sizes + [n_points] if sizes[-1] < n_points else sizes


def spread(points: np.ndarray, prefix: np.ndarray) -> tuple[float, float]:
    """(covering radius, separation) of the points `prefix` (indices) among all `points` (M, 3)."""
    chosen = points[prefix]
    to_chosen = np.sqrt(((points[:, None, :] - chosen[None, :, :]) ** 2).sum(-1))
    between = np.sqrt(((chosen[:, None, :] - chosen[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(between, np.inf)
    return float(to_chosen.min(1).max()), float(between.min())
