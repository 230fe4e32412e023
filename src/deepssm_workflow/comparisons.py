"""Paired comparisons of methods on the same test scans, Holm-adjusted, with intervals that carry the
init seeds where several were trained.

An error table is one method's errors on the test subjects: a vector (one trained model), or a
(seeds, subjects) array (the same subjects predicted by models of several init seeds). Its mean's
bootstrap distribution resamples the subjects, and for an array also the seeds, each with replacement
and independently (a two-level, "hierarchical" bootstrap): the interval then covers what another
draw of subjects and another training run would change. Every error table of one call is resampled
with the same draws, so a difference of two methods stays paired subject by subject (and seed by seed
where both have the same seeds).

`paired_comparisons` tests each listed pair (a - b, mean error difference) with an exact two-sided
sign-flip (paired randomisation) test over the subjects, adjusts the family of comparisons shown by
Holm's step-down procedure, and gives each difference the percentile bootstrap interval at the level of
Holm's step that decided it: a comparison rejected at step k (of m) gets the 1 - alpha/(m - k)
interval, every comparison not rejected the interval of the first step that was not. "a beats b" is
said only where Holm rejects and that interval lies below 0. The sign-flip test keeps its level at
any n (with 3 subjects its smallest p is 0.25), where a bootstrap p would call 3 negative differences
certain; over seeds it flips each subject's mean difference over the seeds.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .intervals import LEVEL, SEED

RESAMPLES = 4000  # Holm's first step over ~10 comparisons reads a 0.25 % tail: 10 draws beyond it


def bootstrap_draws(n_subjects: int, n_seeds: int = 1, resamples: int = RESAMPLES,
                    seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The resampled (seed, subject) indices shared by every table of one comparison."""
    rng = np.random.default_rng(seed)
    subjects = rng.integers(0, n_subjects, (resamples, n_subjects))
    seeds = rng.integers(0, n_seeds, (resamples, n_seeds))
    return seeds, subjects


def resampled_means(errors, draws) -> np.ndarray:
    """The mean of an error table (subjects, or seeds x subjects) on each resample of `draws`."""
    table = np.asarray(errors, dtype=np.float64)
    seeds, subjects = draws
    if table.ndim == 1:
        return table[subjects].mean(1)
    if seeds.shape[1] != table.shape[0]:
        raise ValueError(f"an error table of {table.shape[0]} seeds resampled as {seeds.shape[1]}")
    return table[seeds[:, :, None], subjects[:, None, :]].mean((1, 2))


def _shape(errors) -> tuple[int, int]:
    table = np.asarray(errors)
    if table.ndim not in (1, 2) or table.shape[-1] < 1:
        raise ValueError(f"an error table must be (subjects,) or (seeds, subjects), not {table.shape}")
    return (1, table.shape[0]) if table.ndim == 1 else table.shape


def seeds_scans_interval(errors, level: float = LEVEL, resamples: int = RESAMPLES) -> tuple[float, float]:
    """The percentile interval of the mean error: over subjects, and over seeds for a (seeds, subjects)
    table. Fewer than 2 subjects: (nan, nan)."""
    n_seeds, n_subjects = _shape(errors)
    if n_subjects < 2:
        return float("nan"), float("nan")
    means = resampled_means(errors, bootstrap_draws(n_subjects, n_seeds, resamples))
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


EXACT_UP_TO = 16  # subjects: every sign pattern (65536) is enumerated; more, a Monte Carlo of FLIPS
FLIPS = 9999


def sign_flip_p(differences, seed: int = SEED) -> float:
    """Two-sided p of a zero mean paired difference: the share of sign patterns (the observed one included)
    whose mean is at least as far from 0 as the observed mean; exact up to EXACT_UP_TO subjects."""
    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n < 1:
        return float("nan")
    if n <= EXACT_UP_TO:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.vstack([np.ones(n), np.random.default_rng(seed).choice([-1.0, 1.0], (FLIPS, n))])
    means = np.abs(signs @ d) / n
    return float(np.mean(means >= abs(d.mean()) - 1e-12 * max(1.0, abs(d).max())))


def holm(p_values, alpha: float = 1 - LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Holm's step-down procedure: (adjusted p, rejected, the level alpha/(m - k) of the step that
    decided each hypothesis: its own step where rejected, the first non-rejected step otherwise)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    step_levels = alpha / (m - np.arange(m))
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    passed = p[order] <= step_levels
    first_fail = int(np.argmin(passed)) if not passed.all() else m
    rejected_sorted = np.arange(m) < first_fail
    deciding = np.where(rejected_sorted, step_levels, step_levels[min(first_fail, m - 1)])
    adjusted, rejected, levels = np.empty(m), np.empty(m, bool), np.empty(m)
    adjusted[order], rejected[order], levels[order] = adjusted_sorted, rejected_sorted, deciding
    return adjusted, rejected, levels


def paired_comparisons(errors: dict[str, np.ndarray], pairs, alpha: float = 1 - LEVEL,
                       resamples: int = RESAMPLES) -> pd.DataFrame:
    """One row per pair (a, b) of `errors`' keys: the mean difference a - b (negative: a has the lower
    error), its Holm-level interval, the bootstrap p, Holm's adjusted p and the verdict in words. Every
    table must have the same subjects in the same order; a seed-by-subject table may be compared with a
    subject vector (a baseline that was not trained: the same on every seed)."""
    pairs = [tuple(pair) for pair in pairs]
    shapes = {name: _shape(errors[name]) for pair in pairs for name in pair}
    n_subjects = {n for _, n in shapes.values()}
    if len(n_subjects) != 1:
        raise ValueError(f"paired comparisons need the same test subjects: subject counts {sorted(n_subjects)}")
    n_seed_counts = {s for s, _ in shapes.values() if s > 1}
    if len(n_seed_counts) > 1:
        raise ValueError(f"paired comparisons over seeds need the same seeds: seed counts {sorted(n_seed_counts)}")
    n_seeds, n_subject = (n_seed_counts.pop() if n_seed_counts else 1), n_subjects.pop()
    draws = bootstrap_draws(n_subject, n_seeds, resamples)
    means = {name: resampled_means(errors[name], draws) for name in shapes}
    rows = []
    for a, b in pairs:
        difference = means[a] - means[b]
        observed = float(np.mean(errors[a]) - np.mean(errors[b]))
        per_subject = np.atleast_2d(errors[a]).mean(0) - np.atleast_2d(errors[b]).mean(0)  # over the seeds
        rows.append({"method": a, "against": b, "n_subjects": n_subject, "n_seeds": max(shapes[a][0], shapes[b][0]),
                     "difference_mm": observed, "p": sign_flip_p(per_subject) if n_subject > 1 else np.nan,
                     "_distribution": difference})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    defined = table["p"].notna().to_numpy()
    adjusted, rejected, levels = (np.full(len(table), np.nan), np.zeros(len(table), bool),
                                  np.full(len(table), np.nan))
    if defined.any():
        adjusted[defined], rejected[defined], levels[defined] = holm(table.loc[defined, "p"], alpha)
    lows, highs = [], []
    for distribution, level in zip(table["_distribution"], levels):
        if level == level:
            lows.append(float(np.quantile(distribution, level / 2)))
            highs.append(float(np.quantile(distribution, 1 - level / 2)))
        else:
            lows.append(np.nan), highs.append(np.nan)
    table = table.drop(columns="_distribution")
    table["interval_level"] = 1 - levels
    table["difference_low_mm"], table["difference_high_mm"] = lows, highs
    table["p_holm"] = adjusted
    table["verdict"] = [_verdict(low, high, r) for low, high, r in zip(lows, highs, rejected)]
    return table[["method", "against", "difference_mm", "difference_low_mm", "difference_high_mm",
                  "interval_level", "p", "p_holm", "verdict", "n_subjects", "n_seeds"]]


def _verdict(low: float, high: float, rejected: bool) -> str:
    if not (low == low and high == high):
        return "no interval: cannot tell"
    if rejected and high < 0:
        return "beats"
    if rejected and low > 0:
        return "worse than"
    return "cannot tell apart from"


def comparison_pairs(methods, baselines) -> list[tuple[str, str]]:
    """Every method against each baseline, then every pair of methods (in the order given)."""
    methods = list(methods)
    return ([(m, b) for m in methods for b in baselines]
            + [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]])
