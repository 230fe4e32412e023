"""Probabilistic PCA severity (paper eqs. 13-15): Mahalanobis distance to a reference group.

Eq. 13: U Lambda U^T = (1/N) sum_i (C_i - C_bar)(C_i - C_bar)^T over the N reference
shapes (flattened, D = 3M). Eq. 14: S = U_L Lambda_L U_L^T + sigma^2 I with
sigma^2 = sum_{i > L} Lambda_i / (D - L), the variance outside the L-mode subspace
spread over the D - L remaining directions, so S is full rank although N << D.
Eq. 15: the whitened deviation C~ = S^{-1/2} (C - C_bar), a D-vector whose norm is
the Mahalanobis distance (the severity) and whose per-point parts show where it comes
from.

S is never formed: in the basis of U_L its eigenvalues are Lambda_l + sigma^2 and
sigma^2 on the orthogonal complement, so S^{-1/2} x costs O(L D).

The same split divides the severity in two (`mahalanobis_parts`): with x = C - C_bar,
x_L = U_L U_L^T x its part in the subspace and r = x - x_L the rest,

    severity^2 = sum_l (u_l^T x)^2 / (Lambda_l + sigma^2)  +  |r|^2 / sigma^2
               = subspace^2                                 +  residual^2

`residual` is the distance from the subspace (`distance_from_subspace`, |r| in shape
units) over sigma: the part the isotropic noise term carries. sigma^2 is small, so a
little out-of-subspace detail (or noise) weighs much; a shape projected onto the
subspace or pulled towards C_bar loses that part and can separate groups better
while being a worse copy of the shape (issue 34).

L is the smallest count explaining `variance` of the total (paper: 95 %), at most
rank - 1: with all rank modes sigma^2 would be 0 and S singular. `n_modes` and
`explained` record what was used.
"""

from __future__ import annotations

import numpy as np


class PPCA:
    def __init__(self, variance: float = 0.95):
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"variance must be a fraction in (0, 1], got {variance}")
        self.variance = variance
        self.mean = self.components = self.eigenvalues = self.sigma2 = None

    def fit(self, shapes: np.ndarray) -> "PPCA":
        flat = _flatten(shapes)
        n, d = flat.shape
        self.mean = flat.mean(0)
        _, singular, vt = np.linalg.svd(flat - self.mean, full_matrices=False)
        eigen = singular**2 / n  # eq. 13 divides by N
        total = eigen.sum()
        rank = int((eigen > 1e-12 * max(total, 1e-300)).sum())
        if rank < 2:
            raise ValueError(f"PPCA needs reference shapes spanning at least 2 modes; {n} shapes span {rank}")
        ratio = np.cumsum(eigen) / total
        wanted = int(np.searchsorted(ratio, self.variance - 1e-12)) + 1
        n_modes = min(wanted, rank - 1)
        self.components = vt[:n_modes]
        self.eigenvalues = eigen[:n_modes]
        self.sigma2 = float(eigen[n_modes:].sum() / (d - n_modes))
        self.explained = float(ratio[n_modes - 1])
        self.n_reference = n
        return self

    @property
    def n_modes(self) -> int:
        self._fitted()
        return len(self.components)

    def _fitted(self) -> None:
        if self.components is None:
            raise ValueError("this PPCA is not fitted yet; call fit(shapes) first")

    def covariance(self) -> np.ndarray:
        """The dense D x D S of eq. 14 (for checks on small shapes)."""
        self._fitted()
        u = self.components.T
        return u @ np.diag(self.eigenvalues) @ u.T + self.sigma2 * np.eye(len(self.mean))

    def whiten(self, shapes: np.ndarray) -> np.ndarray:
        """Eq. 15 for each shape: S^{-1/2} (C - C_bar), returned as (N, M, 3)."""
        inside, outside = self._split(shapes)
        whitened = (inside / np.sqrt(self.eigenvalues + self.sigma2)) @ self.components
        whitened += outside / np.sqrt(self.sigma2)
        return whitened.reshape(len(whitened), -1, 3)

    def mahalanobis(self, shapes: np.ndarray) -> np.ndarray:
        """Severity: sqrt((C - C_bar)^T S^-1 (C - C_bar)) per shape, (N,)."""
        whitened = self.whiten(shapes)
        return np.sqrt((whitened.reshape(len(whitened), -1) ** 2).sum(1))

    def mahalanobis_parts(self, shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(subspace, residual) per shape, each (N,): the Mahalanobis distance within the
        L-mode subspace and that of the rest, so mahalanobis = hypot(subspace, residual)."""
        inside, outside = self._split(shapes)
        subspace = np.sqrt((inside**2 / (self.eigenvalues + self.sigma2)).sum(1))
        return subspace, np.linalg.norm(outside, axis=1) / np.sqrt(self.sigma2)

    def distance_from_subspace(self, shapes: np.ndarray) -> np.ndarray:
        """|C - C_bar minus its projection on the subspace| per shape, (N,), in shape units."""
        return np.linalg.norm(self._split(shapes)[1], axis=1)

    def _split(self, shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """C - C_bar as (N, L) subspace coordinates and the (N, D) remainder outside it."""
        self._fitted()
        flat = _flatten(shapes)
        if flat.shape[1] != len(self.mean):
            raise ValueError(f"shapes have {flat.shape[1] // 3} points; this PPCA was fitted on {len(self.mean) // 3}")
        x = flat - self.mean
        inside = x @ self.components.T
        return inside, x - inside @ self.components


def _flatten(shapes) -> np.ndarray:
    shapes = np.asarray(shapes, dtype=np.float64)
    if shapes.ndim != 3 or shapes.shape[2] != 3:
        raise ValueError(f"shapes must be an (N, M, 3) array of correspondences, got shape {shapes.shape}")
    if not np.all(np.isfinite(shapes)):
        raise ValueError("shapes contain non-finite values (NaN or inf)")
    return shapes.reshape(len(shapes), -1)
