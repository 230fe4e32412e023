"""The statistics the studies report: AUC, correlations, FDR, per-point Hotelling T^2 and
per-point Welch t of a scalar (e.g. the displacement along the surface normal), and a binary
classifier against the no-information rate (exact binomial test, balanced accuracy, AUC interval).

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

from ..intervals import LEVEL, RESAMPLES, SEED


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


def welch_t(x: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Welch's two-sample t at every column: x (N, M) scalars, group (N,) boolean; t > 0 where
    the `group` mean is larger. A column constant within both groups gives t = 0 when the means
    agree and +-inf when they differ."""
    x, group = np.asarray(x, dtype=np.float64), np.asarray(group, dtype=bool)
    n1, n2 = int(group.sum()), int((~group).sum())
    if x.ndim != 2 or len(x) != len(group):
        raise ValueError(f"Welch t: expected (N, M) values for {len(group)} subjects, got shape {x.shape}")
    if n1 < 2 or n2 < 2:
        raise ValueError(f"Welch t needs at least 2 subjects per group; got {n1} and {n2}")
    return _welch(x - x.mean(0), group[None, :], n1, n2)[0]


def _welch(x: np.ndarray, labellings: np.ndarray, n1: int, n2: int) -> np.ndarray:
    """Welch t of the (L, N) boolean labellings at once: (L, M). x should be centred per column."""
    g = labellings.astype(np.float64)
    s1, ss1 = g @ x, g @ (x * x)
    s2, ss2 = x.sum(0) - s1, (x * x).sum(0) - ss1
    m1, m2 = s1 / n1, s2 / n2
    v1 = np.maximum(ss1 - n1 * m1 * m1, 0.0) / (n1 - 1)
    v2 = np.maximum(ss2 - n2 * m2 * m2, 0.0) / (n2 - 1)
    se = np.sqrt(v1 / n1 + v2 / n2)
    d = m1 - m2
    scale = np.abs(x).max() if x.size else 0.0
    tiny = se <= 1e-12 * max(scale, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(tiny, np.where(np.abs(d) <= 1e-12 * max(scale, 1e-300), 0.0, np.sign(d) * np.inf), d / se)
    return t


def permutation_welch(x: np.ndarray, group: np.ndarray, n_permutations: int = 9999, seed: int = 0,
                      chunk: int = 1000) -> dict:
    """Per-column two-sided Welch t test with permutation p-values and FDR q-values: x (N, M).

    As `permutation_hotelling`: one relabelling moves every column at once; every distinct
    labelling is enumerated when there are at most `n_permutations` of them (exact p, the
    observed one included), otherwise p = (1 + #{|t_perm| >= |t|}) / (1 + n_permutations).
    The permutation p does not assume normal data; q is Benjamini-Hochberg over the columns.
    """
    x, group = np.asarray(x, dtype=np.float64), np.asarray(group, dtype=bool)
    observed = welch_t(x, group)
    x = x - x.mean(0)
    n, n1 = len(group), int(group.sum())
    n2 = n - n1
    if math.comb(n, n1) <= n_permutations:
        def batches():
            members = itertools.combinations(range(n), n1)
            while True:
                block = list(itertools.islice(members, chunk))
                if not block:
                    return
                labels = np.zeros((len(block), n), dtype=bool)
                labels[np.repeat(np.arange(len(block)), n1), np.asarray(block).ravel()] = True
                yield labels
        total, method = math.comb(n, n1), f"exact ({math.comb(n, n1)} labellings)"
    else:
        rng = np.random.default_rng(seed)

        def batches():
            for start in range(0, n_permutations, chunk):
                size = min(chunk, n_permutations - start)
                yield np.stack([rng.permutation(group) for _ in range(size)])
        total, method = n_permutations, f"{n_permutations} random permutations"
    threshold = np.abs(observed) - 1e-9 * np.abs(np.where(np.isfinite(observed), observed, 0.0))
    exceed = np.zeros(x.shape[1])
    for labels in batches():
        exceed += (np.abs(_welch(x, labels, n1, n2)) >= threshold).sum(0)
    p = exceed / total if method.startswith("exact") else (1 + exceed) / (1 + total)
    return {"t": observed, "p": np.minimum(p, 1.0), "q": fdr(np.minimum(p, 1.0)), "method": method}


# -- a binary classifier against its baseline (the AF recurrence study)

def _zero_one(values, name: str) -> np.ndarray:
    values = np.asarray(values).ravel()
    if len(values) == 0:
        raise ValueError(f"{name}: no subjects")
    if not set(np.unique(values)) <= {0, 1}:
        raise ValueError(f"{name}: values must be 0/1, got {sorted(set(np.unique(values)))}")
    return values.astype(int)


def _binary(predicted, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    predicted, labels = _zero_one(predicted, name), _zero_one(labels, name)
    if len(predicted) != len(labels):
        raise ValueError(f"{name}: {len(predicted)} predictions against {len(labels)} labels")
    return predicted, labels


def no_information_rate(labels) -> float:
    """The accuracy of always answering the most frequent class of `labels` (caret's NIR): the
    baseline a classifier must beat on these subjects, whatever its training set's balance."""
    share = _zero_one(labels, "no-information rate").mean()
    return float(max(share, 1.0 - share))


def accuracy_binomial_p(predicted, labels) -> float:
    """One-sided exact binomial test of the accuracy against the no-information rate of `labels`
    (H1: accuracy > NIR), as caret's confusionMatrix reports it. Exact: on data at the NIR it rejects at
    most at the nominal rate (less, the binomial being discrete)."""
    predicted, labels = _binary(predicted, labels, "binomial test against the NIR")
    correct = int((predicted == labels).sum())
    return float(stats.binomtest(correct, len(labels), p=no_information_rate(labels), alternative="greater").pvalue)


def balanced_accuracy(predicted, labels) -> float:
    """Mean of sensitivity and specificity: 0.5 for any constant answer, however unbalanced the classes."""
    predicted, labels = _binary(predicted, labels, "balanced accuracy")
    positive = labels == 1
    if positive.all() or not positive.any():
        raise ValueError("balanced accuracy: needs both classes among the labels")
    return float(((predicted[positive] == 1).mean() + (predicted[~positive] == 0).mean()) / 2)


def auc_interval(scores, labels, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of `auc`, resampling positives and negatives separately (stratified),
    so every resample keeps the observed class sizes and its AUC is defined. (nan, nan) when a class has
    fewer than 2 subjects: resampling cannot show that class's variability."""
    value = auc(scores, labels)  # validates the input
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel()
    positives, negatives = scores[labels == 1], scores[labels == 0]
    if min(len(positives), len(negatives)) < 2 or not np.isfinite(value):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    drawn = np.concatenate([rng.choice(positives, (resamples, len(positives))),
                            rng.choice(negatives, (resamples, len(negatives)))], axis=1)
    ranks = stats.rankdata(drawn, axis=1)  # average ranks per resample: ties count one half, as in `auc`
    n_pos, n_neg = len(positives), len(negatives)
    values = (ranks[:, :n_pos].sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))
