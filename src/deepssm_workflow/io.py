"""Readers and writers of the file formats a point distribution model uses.

`.particles` is ShapeWorks' plain-text format: one point per line, "x y z".
Transforms are 4x4 homogeneous matrices as text (4 lines of 4 numbers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_particles(path, points: np.ndarray) -> None:
    np.savetxt(path, np.asarray(points, dtype=np.float64), fmt="%.6f")


def read_particles(path) -> np.ndarray:
    points = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if points.shape[1] != 3:
        raise ValueError(f"{path}: expected 3 coordinates per line, found {points.shape[1]}")
    return points


def write_transform(path, matrix: np.ndarray) -> None:
    np.savetxt(path, np.asarray(matrix, dtype=np.float64), fmt="%.10f",
               header="4x4 transform: world = M @ [x, y, z, 1] for image (scanner) frame points")


def read_transform(path) -> np.ndarray:
    matrix = np.loadtxt(path, dtype=np.float64, ndmin=2)
    if matrix.shape != (4, 4):
        raise ValueError(f"{path}: expected a 4x4 matrix, found shape {matrix.shape}")
    return matrix


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def procrustes_fit(source: np.ndarray, target: np.ndarray, scaling: bool) -> np.ndarray:
    """4x4 matrix of the rigid (or, with `scaling`, similarity) transform mapping `source`
    points onto `target` in the least-squares sense (Umeyama 1991; no reflections)."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    a, b = source - mu_s, target - mu_t
    variance = (a**2).sum() / len(a)
    if variance < 1e-12:
        raise ValueError("all source points coincide; no transform can be estimated")
    u, singular, vt = np.linalg.svd(b.T @ a / len(a))
    signs = np.array([1.0, 1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) >= 0 else -1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / variance if scaling else 1.0
    matrix = np.eye(4)
    matrix[:3, :3] = scale * rotation
    matrix[:3, 3] = mu_t - scale * rotation @ mu_s
    return matrix


def resolve(table_path, relative: str) -> Path:
    """A file column of a subjects table, relative to the table's folder."""
    path = Path(relative)
    return path if path.is_absolute() else Path(table_path).parent / path
