"""PCA shape space of world-frame correspondences, and the paper's RMSE (eq. 12).

A shape is M x 3 correspondence points; PCA runs on the flattened (N, 3M) training
shapes only. `ShapeSpace` is scikit-learn-like: `fit` on training shapes,
`transform` to scores, `inverse_transform` back to points, and its state is four
plain arrays (`to_arrays` / `from_arrays`, `save` / `load` as .npz).

The number of modes is either fixed (`n_modes`) or the smallest K whose modes
explain a fraction `variance` of the total (papers: femur 20 modes / 99 %,
metopic 20 / 99 %, left atrium 19 / 95 %). N shapes span at most N - 1 modes;
augmentation uses all of them (`ShapeSpace(n_modes=N - 1)`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import staged

ARRAYS = ("mean", "basis", "variances", "explained_variance_ratio")


def rmse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Paper eq. 12 per shape: (RMSE_x + RMSE_y + RMSE_z) / 3, RMSE_x over the M points.

    (N, M, 3) inputs give (N,); a single (M, 3) shape gives a scalar.
    """
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim < 2 or pred.shape[-1] != 3:
        raise ValueError(f"rmse needs two arrays of equal shape (..., M, 3), got {pred.shape} and {true.shape}")
    return np.sqrt(((pred - true) ** 2).mean(axis=-2)).mean(axis=-1)


def rms3d(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """3D RMS per shape: the root mean squared point-to-point distance (mm). Unlike eq. 12 it does not depend
    on how the frame's axes are turned, so it is the secondary metric beside eq. 12 in every error table."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim < 2 or pred.shape[-1] != 3:
        raise ValueError(f"rms3d needs two arrays of equal shape (..., M, 3), got {pred.shape} and {true.shape}")
    return np.sqrt(((pred - true) ** 2).sum(axis=-1).mean(axis=-1))


def _check_shapes(shapes, n_points: int | None = None) -> np.ndarray:
    shapes = np.asarray(shapes, dtype=np.float64)
    if shapes.ndim != 3 or shapes.shape[2] != 3:
        raise ValueError(f"shapes must be an (N, M, 3) array of correspondences, got shape {shapes.shape}")
    if n_points is not None and shapes.shape[1] != n_points:
        raise ValueError(f"shapes have {shapes.shape[1]} points each; this shape space has {n_points}")
    if not np.all(np.isfinite(shapes)):
        raise ValueError("shapes contain non-finite values (NaN or inf)")
    return shapes


class ShapeSpace:
    """PCA of (N, M, 3) shapes: mean (M, 3), basis (K, 3M) orthonormal rows, variances (K,)."""

    def __init__(self, n_modes: int | None = None, variance: float | None = None):
        if (n_modes is None) == (variance is None):
            raise ValueError("give exactly one of n_modes (a fixed count) or variance (a fraction to explain)")
        if n_modes is not None and (int(n_modes) != n_modes or n_modes < 1):
            raise ValueError(f"n_modes must be a positive integer, got {n_modes}")
        if variance is not None and not 0.0 < variance <= 1.0:
            raise ValueError(f"variance must be a fraction in (0, 1], got {variance}")
        self.requested_modes = None if n_modes is None else int(n_modes)
        self.variance = variance
        self.mean = self.basis = self.variances = self.explained_variance_ratio = None

    @property
    def n_modes(self) -> int | None:
        return self.requested_modes if self.basis is None else len(self.basis)

    def fit(self, shapes: np.ndarray) -> "ShapeSpace":
        shapes = _check_shapes(shapes)
        n = len(shapes)
        if n < 2:
            raise ValueError(f"a shape space needs at least 2 shapes, got {n}")
        flat = shapes.reshape(n, -1)
        most = min(n - 1, flat.shape[1])  # centring removes one dimension
        if self.requested_modes is not None and self.requested_modes > most:
            raise ValueError(f"n_modes={self.requested_modes} exceeds the {most} modes that {n} shapes "
                             f"of {shapes.shape[1]} points span (at most N - 1)")
        mean = flat.mean(0)
        # thin SVD of the (N, 3M) centred data: cost O(N^2 M), never a 3M x 3M covariance
        _, singular, vt = np.linalg.svd(flat - mean, full_matrices=False)
        eigen = singular[:most] ** 2 / (n - 1)
        total = eigen.sum()
        if total <= 0:
            raise ValueError("all shapes are identical: there is no shape variation to model")
        ratio = eigen / total
        if self.requested_modes is not None:
            k = self.requested_modes
        else:
            # smallest K reaching the fraction; the tolerance keeps variance=1.0 reachable despite rounding
            k = min(int(np.searchsorted(np.cumsum(ratio), self.variance - 1e-12)) + 1, most)
        basis = vt[:k]
        # SVD signs are arbitrary: make each mode's largest-magnitude component positive
        signs = np.sign(basis[np.arange(k), np.abs(basis).argmax(1)])
        self.mean = mean.reshape(-1, 3)
        self.basis = basis * signs[:, None]
        self.variances = eigen[:k]
        self.explained_variance_ratio = ratio[:k]
        return self

    def _fitted(self) -> None:
        if self.basis is None:
            raise ValueError("this ShapeSpace is not fitted yet; call fit(shapes) first")

    def transform(self, shapes: np.ndarray) -> np.ndarray:
        """(N, M, 3) shapes -> (N, K) scores."""
        self._fitted()
        shapes = _check_shapes(shapes, len(self.mean))
        return (shapes.reshape(len(shapes), -1) - self.mean.ravel()) @ self.basis.T

    def inverse_transform(self, scores: np.ndarray) -> np.ndarray:
        """(N, K) scores -> (N, M, 3) shapes: mean + scores @ basis."""
        self._fitted()
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[1] != self.n_modes:
            raise ValueError(f"scores must be an (N, {self.n_modes}) array, got shape {scores.shape}")
        return (self.mean.ravel() + scores @ self.basis).reshape(len(scores), -1, 3)

    def truncation_rmse(self, shapes: np.ndarray) -> np.ndarray:
        """Per-shape RMSE (eq. 12) of each shape's projection on the K modes: the floor any
        model predicting K scores through this basis can reach."""
        shapes = _check_shapes(shapes)
        return rmse(self.inverse_transform(self.transform(shapes)), shapes)

    # -- state as plain arrays

    def to_arrays(self) -> dict[str, np.ndarray]:
        self._fitted()
        return {name: getattr(self, name).copy() for name in ARRAYS}

    @classmethod
    def from_arrays(cls, arrays) -> "ShapeSpace":
        missing = [name for name in ARRAYS if name not in arrays]
        if missing:
            raise ValueError(f"shape-space arrays lack {', '.join(missing)}")
        mean, basis, variances, ratio = (np.asarray(arrays[name], dtype=np.float64) for name in ARRAYS)
        k = len(variances)
        if mean.ndim != 2 or mean.shape[1] != 3 or basis.shape != (k, mean.size) or ratio.shape != (k,) or k < 1:
            raise ValueError(f"inconsistent shape-space arrays: mean {mean.shape}, basis {basis.shape}, "
                             f"variances {variances.shape}, explained_variance_ratio {ratio.shape}")
        space = cls(n_modes=k)
        space.mean, space.basis, space.variances, space.explained_variance_ratio = mean, basis, variances, ratio
        return space

    def save(self, path) -> None:
        path = Path(path)
        with staged(path.parent, [path.name]) as staging:
            with open(staging / path.name, "wb") as handle:  # a handle: np.savez would append ".npz"
                np.savez(handle, **self.to_arrays())

    @classmethod
    def load(cls, path) -> "ShapeSpace":
        with np.load(path, allow_pickle=False) as data:
            return cls.from_arrays({name: data[name] for name in data.files})
