"""The statistics the studies report: AUC, correlations, FDR, per-point Hotelling T^2.

Every function raises ValueError on input for which its number is undefined (a single
class, fewer than three pairs, a constant series) instead of returning something
that looks like a result.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests


def _paired(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} values against {len(y)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{name}: non-finite values")
    if len(x) < 3:
        raise ValueError(f"{name}: needs at least 3 pairs, got {len(x)}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError(f"{name}: undefined for a constant series")
    return x, y


def pearson(x, y) -> float:
    x, y = _paired(x, y, "Pearson correlation")
    return float(stats.pearsonr(x, y).statistic)


def spearman(x, y) -> float:
    x, y = _paired(x, y, "Spearman correlation")
    return float(stats.spearmanr(x, y).statistic)


def auc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive): the
    probability that a positive outscores a negative, ties counting one half
    (the Mann-Whitney U statistic over n_pos * n_neg)."""
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel()
    if len(scores) != len(labels):
        raise ValueError(f"AUC: {len(scores)} scores against {len(labels)} labels")
    if not set(np.unique(labels)) <= {0, 1}:
        raise ValueError(f"AUC: labels must be 0/1, got {sorted(set(np.unique(labels)))}")
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC: needs both classes, got {n_pos} positive and {n_neg} negative")
    ranks = stats.rankdata(scores)  # average ranks: a tie between classes counts one half
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fdr(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0 or np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ValueError("FDR: p-values must be a non-empty array of numbers in [0, 1]")
    return multipletests(p.ravel(), method="fdr_bh")[1].reshape(p.shape)


def hotelling_t2(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Two-sample Hotelling T^2 at every point: x (N, M, 3), group (N,) boolean.

    T^2 = n1 n2 / (n1 + n2) d^T S^-1 d with d the difference of the group means and S
    the pooled covariance of that point's 3 coordinates (n1 + n2 - 2 degrees of freedom).
    """
    x, group = np.asarray(x, dtype=np.float64), np.asarray(group, dtype=bool)
    n1, n2 = int(group.sum()), int((~group).sum())
    if n1 + n2 - 2 < x.shape[2]:
        raise ValueError(f"Hotelling T^2 needs n1 + n2 - 2 >= {x.shape[2]} for an invertible pooled covariance; "
                         f"got {n1} and {n2} subjects")
    a, b = x[group], x[~group]
    d = a.mean(0) - b.mean(0)  # (M, 3)
    ca, cb = a - a.mean(0), b - b.mean(0)
    pooled = (np.einsum("nmi,nmj->mij", ca, ca) + np.einsum("nmi,nmj->mij", cb, cb)) / (n1 + n2 - 2)
    return n1 * n2 / (n1 + n2) * np.einsum("mi,mi->m", d, np.linalg.solve(pooled, d[..., None])[..., 0])


def permutation_hotelling(x: np.ndarray, group: np.ndarray, n_permutations: int = 999, seed: int = 0) -> dict:
    """Per-point Hotelling T^2 with permutation p-values and FDR q-values.

    The same relabelling is applied to every point in a permutation. When the number of
    distinct labellings is at most `n_permutations` they are all enumerated (exact p,
    the observed one included); otherwise p = (1 + #{T^2_perm >= T^2}) / (1 + n_permutations).
    """
    group = np.asarray(group, dtype=bool)
    observed = hotelling_t2(x, group)
    n, n1 = len(group), int(group.sum())
    if math.comb(n, n1) <= n_permutations:
        labellings = []
        for members in itertools.combinations(range(n), n1):
            g = np.zeros(n, dtype=bool)
            g[list(members)] = True
            labellings.append(g)
        exceed = sum(hotelling_t2(x, g) >= observed - 1e-9 * np.abs(observed) for g in labellings)
        p, method = exceed / len(labellings), f"exact ({len(labellings)} labellings)"
    else:
        rng = np.random.default_rng(seed)
        exceed = sum(hotelling_t2(x, rng.permutation(group)) >= observed - 1e-9 * np.abs(observed)
                     for _ in range(n_permutations))
        p, method = (1 + exceed) / (1 + n_permutations), f"{n_permutations} random permutations"
    return {"t2": observed, "p": np.asarray(p, dtype=np.float64), "q": fdr(p), "method": method}
