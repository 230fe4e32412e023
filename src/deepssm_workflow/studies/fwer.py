"""Family-wise error control for per-point group tests: Westfall-Young max-T over all points.

Per-point permutation p-values with a Benjamini-Hochberg FDR cannot reach their level when the
permutation count is small (the p floor 1/(B+1) times the number of points exceeds it), and
they control the false discovery rate, not the chance of any false positive. Here:

* the group labels are relabelled B times (or every distinct labelling is enumerated when there
  are at most B of them); every statistic in one call sees the same relabellings;
* per point, the statistic (|Welch t| of a scalar, Hotelling T^2 of a 3-vector) is computed for
  the observed labels and for each relabelling;
* the single-step adjusted p of a point is (1 + #{relabellings whose maximum over all points
  >= the point's observed statistic}) / (1 + B); the step-down version (Westfall & Young 1993,
  Algorithm 2.8) takes the maximum only over the points not more significant than the point
  and then makes the adjusted p monotone. Both bound the family-wise error rate at the level
  (the chance that any point without an effect is called significant), step-down with more power.
  With enumeration the observed labelling is one of the labellings, so there is no +1.

The smallest reachable adjusted p is 1/(B+1) (`p_floor`): B = 9999 gives 1e-4, far below 0.05
whatever the number of points, since the max-T p does not multiply by the point count.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np

N_PERMUTATIONS = 9999
RELATIVE_TIE = 1e-9  # a relabelling's statistic within this relative distance of the observed one counts as reaching it


def labellings(group, n_permutations: int = N_PERMUTATIONS, seed: int = 0,
               chunk: int = 500) -> tuple[Callable[[], Iterator[np.ndarray]], int, bool]:
    """(batches, total, exact): `batches()` yields (L, N) boolean relabellings of `group`, `total` of
    them in all; exact is True when they are every distinct labelling (the observed one included),
    which happens when there are at most `n_permutations` of them. Random relabellings are
    `rng.permutation(group)` in turn from `default_rng(seed)`, so one seed gives the same ones
    whatever the chunk size."""
    group = np.asarray(group, dtype=bool).ravel()
    n, n1 = len(group), int(group.sum())
    if n1 == 0 or n1 == n:
        raise ValueError(f"relabelling needs both groups; got {n1} and {n - n1} subjects")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be positive, got {n_permutations}")
    if math.comb(n, n1) <= n_permutations:
        def every() -> Iterator[np.ndarray]:
            members = itertools.combinations(range(n), n1)
            while block := list(itertools.islice(members, chunk)):
                labels = np.zeros((len(block), n), dtype=bool)
                labels[np.repeat(np.arange(len(block)), n1), np.asarray(block).ravel()] = True
                yield labels
        return every, math.comb(n, n1), True

    def drawn() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        for start in range(0, n_permutations, chunk):
            yield np.stack([rng.permutation(group) for _ in range(min(chunk, n_permutations - start))])
    return drawn, n_permutations, False


def welch_statistics(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Signed Welch t (positive where the labelled group's mean is larger) of every column of
    x (N, M) for each of the (L, N) boolean `labels`: (L, M). A column constant within both
    groups gives 0 when the means agree and +-inf when they differ."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(0)  # centred columns keep the sums of squares below from cancelling
    labels = np.atleast_2d(np.asarray(labels, dtype=bool))
    n, n1 = x.shape[0], int(labels[0].sum())
    n2 = n - n1
    if n1 < 2 or n2 < 2:
        raise ValueError(f"Welch t needs at least 2 subjects per group; got {n1} and {n2}")
    g = labels.astype(np.float64)
    sum1, squares1 = g @ x, g @ (x * x)
    mean1, mean2 = sum1 / n1, (x.sum(0) - sum1) / n2
    var1 = np.maximum(squares1 - n1 * mean1**2, 0.0) / (n1 - 1)
    var2 = np.maximum((x * x).sum(0) - squares1 - n2 * mean2**2, 0.0) / (n2 - 1)
    difference, se = mean1 - mean2, np.sqrt(var1 / n1 + var2 / n2)
    scale = max(float(np.abs(x).max()) if x.size else 0.0, 1e-300)
    flat = se <= 1e-12 * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flat, np.where(np.abs(difference) <= 1e-12 * scale, 0.0, np.sign(difference) * np.inf),
                        difference / se)


def hotelling_statistics(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Two-sample Hotelling T^2 at every point of x (N, M, 3) for each of the (L, N) boolean
    `labels`: (L, M), the pooled within-group covariance inverted per point.

    With T the total scatter about the grand mean (the same for every labelling), d the
    difference of the group means and c = n1 n2 / n, the within-group scatter is T - c d d^T, so
    (Sherman-Morrison) T^2 = (n - 2) c q / (1 - c q) with q = d^T T^-1 d. Whitening the data once
    by T makes q a squared norm: one matrix product per batch of labellings."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.atleast_2d(np.asarray(labels, dtype=bool))
    n, m, k = x.shape
    n1 = int(labels[0].sum())
    n2 = n - n1
    if n - 2 < k or n1 == 0 or n2 == 0:
        raise ValueError(f"Hotelling T^2 needs n1 + n2 - 2 >= {k} for an invertible pooled covariance; "
                         f"got {n1} and {n2} subjects")
    centred = x - x.mean(0)
    scatter = np.einsum("nmi,nmj->mij", centred, centred)
    try:
        root = np.linalg.cholesky(scatter)  # T = R R^T, so d^T T^-1 d = |R^-1 d|^2
    except np.linalg.LinAlgError as error:
        raise ValueError("Hotelling T^2: a point's 3D positions are degenerate (singular scatter)") from error
    white = np.linalg.solve(root[None], centred[..., None])[..., 0]  # (N, M, k)
    c = n1 * n2 / n
    d = (labels.astype(np.float64) @ white.reshape(n, m * k)).reshape(len(labels), m, k) * (n / (n1 * n2))
    cq = c * np.einsum("lmi,lmi->lm", d, d)
    with np.errstate(divide="ignore"):
        return np.where(cq >= 1.0 - 1e-12, np.inf, (n - 2) * cq / np.maximum(1.0 - cq, 1e-300))


class MaxT:
    """Accumulates relabelled statistics (batches of (L, M)) against the observed ones (M,), larger
    meaning more significant, and gives per-point raw and max-T adjusted permutation p-values."""

    def __init__(self, observed: np.ndarray):
        observed = np.asarray(observed, dtype=np.float64).ravel()
        if observed.size == 0 or np.isnan(observed).any():
            raise ValueError("max-T: the observed statistics must be a non-empty array without NaN")
        self.observed = observed
        finite = np.where(np.isfinite(observed), observed, 0.0)
        self.threshold = observed - RELATIVE_TIE * np.abs(finite)
        self.order = np.argsort(-observed, kind="stable")  # most significant first
        self.raw = np.zeros(observed.size, dtype=np.int64)
        self.single_step = np.zeros(observed.size, dtype=np.int64)
        self.step_down = np.zeros(observed.size, dtype=np.int64)  # in `order`
        self.count = 0

    def add(self, permuted: np.ndarray) -> None:
        permuted = np.atleast_2d(np.asarray(permuted, dtype=np.float64))
        if permuted.shape[1] != self.observed.size:
            raise ValueError(f"max-T: {permuted.shape[1]} relabelled statistics against {self.observed.size} points")
        self.raw += (permuted >= self.threshold).sum(0)
        maxima = np.sort(permuted.max(1))
        self.single_step += len(maxima) - np.searchsorted(maxima, self.threshold, side="left")
        # the maximum over each point and every point less significant than it
        tail = np.maximum.accumulate(permuted[:, self.order][:, ::-1], axis=1)[:, ::-1]
        self.step_down += (tail >= self.threshold[self.order]).sum(0)
        self.count += len(permuted)

    def p_values(self, exact: bool = False, step_down: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(raw, adjusted) p per point. exact: the relabellings were every labelling, the observed
        one among them, so p = share of them reaching the statistic; else (1 + count) / (1 + B)."""
        if self.count == 0:
            raise ValueError("max-T: no relabellings were added")
        plus = 0 if exact else 1
        raw = (self.raw + plus) / (self.count + plus)
        if not step_down:
            return np.minimum(raw, 1.0), np.minimum((self.single_step + plus) / (self.count + plus), 1.0)
        # a point's adjusted p is never below that of a more significant point
        ordered = np.maximum.accumulate((self.step_down + plus) / (self.count + plus))
        adjusted = np.empty_like(ordered)
        adjusted[self.order] = ordered
        return np.minimum(raw, 1.0), np.minimum(adjusted, 1.0)


def max_t_adjust(observed, permuted, exact: bool = False, step_down: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(raw, adjusted) permutation p-values per point from the observed statistics (M,) and the
    relabelled ones (B, M), larger meaning more significant; see `MaxT.p_values`."""
    accumulator = MaxT(observed)
    accumulator.add(permuted)
    return accumulator.p_values(exact=exact, step_down=step_down)


def westfall_young(group, welch: np.ndarray | None = None, hotelling: np.ndarray | None = None,
                   n_permutations: int = N_PERMUTATIONS, seed: int = 0, step_down: bool = True,
                   chunk: int = 500) -> dict:
    """Max-T family-wise error control over all points of a two-group comparison, `group` (N,)
    boolean. `welch`: (N, M) scalars per subject and point (two-sided |Welch t|); `hotelling`:
    (N, M, 3) positions (Hotelling T^2); either or both, relabelled together.

    Returns {"welch": {"t", "statistic", "p", "p_fwer"}, "hotelling": {"statistic", "p", "p_fwer"}
    (those given), "n_labellings", "exact", "p_floor", "method"}: p is the per-point permutation p
    on the same relabellings, p_fwer the max-T adjusted p (never below p)."""
    group = np.asarray(group, dtype=bool).ravel()
    statistics: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if welch is not None:
        welch = np.asarray(welch, dtype=np.float64)
        if welch.ndim != 2 or len(welch) != len(group):
            raise ValueError(f"Welch max-T: expected (N, M) values for {len(group)} subjects, got {welch.shape}")
        statistics["welch"] = lambda labels: np.abs(welch_statistics(welch, labels))
    if hotelling is not None:
        hotelling = np.asarray(hotelling, dtype=np.float64)
        if hotelling.ndim != 3 or len(hotelling) != len(group):
            raise ValueError(f"Hotelling max-T: expected (N, M, 3) positions for {len(group)} subjects, "
                             f"got {hotelling.shape}")
        statistics["hotelling"] = lambda labels: hotelling_statistics(hotelling, labels)
    if not statistics:
        raise ValueError("max-T: give welch or hotelling data")
    batches, total, exact = labellings(group, n_permutations, seed, chunk)
    accumulators = {name: MaxT(statistic(group[None])[0]) for name, statistic in statistics.items()}
    for labels in batches():
        for name, statistic in statistics.items():
            accumulators[name].add(statistic(labels))
    result = {"n_labellings": total, "exact": exact, "p_floor": 1 / total if exact else 1 / (total + 1),
              "method": (f"Westfall-Young {'step-down' if step_down else 'single-step'} max-T over "
                         f"{len(accumulators[next(iter(accumulators))].observed)} points, "
                         + (f"exact ({total} labellings)" if exact else f"{total} random relabellings")
                         + (" shared by the Welch and Hotelling tests" if len(statistics) > 1 else ""))}
    for name, accumulator in accumulators.items():
        p, p_fwer = accumulator.p_values(exact=exact, step_down=step_down)
        result[name] = {"statistic": accumulator.observed, "p": p, "p_fwer": p_fwer}
    if "welch" in result:
        result["welch"]["t"] = welch_statistics(welch, group[None])[0]
    return result


def detection(significant, truth, weight=None) -> dict:
    """How a significance map matches a known effect region (both (M,) boolean): sensitivity (the
    share of the region called significant) and false-positive fraction (the share outside it
    called significant), each None where its denominator is empty; with `weight` (M,) (e.g. the
    surface area each point stands for) the same shares weighted."""
    significant, truth = np.asarray(significant, dtype=bool), np.asarray(truth, dtype=bool)
    if significant.shape != truth.shape:
        raise ValueError(f"detection: {significant.shape} flags against a {truth.shape} region")
    weight = np.ones(truth.shape) if weight is None else np.asarray(weight, dtype=np.float64)

    def share(inside: np.ndarray) -> float | None:
        total = float(weight[inside].sum())
        return float(weight[inside & significant].sum()) / total if total > 0 else None
    return {"sensitivity": share(truth), "false_positive_fraction": share(~truth)}
