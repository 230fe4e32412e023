"""Aggregate ordinal expert ratings into one latent severity per subject (latent-trait theory).

Model (ordinal probit with rater bias and inconsistency): rater r perceives subject s
as theta_s + b_r + sigma_r * eps, eps ~ N(0, 1), and reports category k when the
perception lies between thresholds tau_{k-1} and tau_k (shared by all raters):

    P(y_rs = k) = Phi((tau_k - theta_s - b_r) / sigma_r) - Phi((tau_{k-1} - theta_s - b_r) / sigma_r)

b_r is a rater's bias, sigma_r its inconsistency; the biases average to 0 and the
log sigma_r to 0, so theta is in units of a typical rater's noise. The latent
severities theta are estimated by maximum likelihood with weak priors: N(0, 10^2) on
theta, without which a subject every rater put in the lowest (or highest) category
would have theta = -inf (+inf), and N(0, 1) on log sigma_r, without which a rater whose
few ratings happen to be perfectly ordered would get sigma_r = 0. statsmodels' OrderedModel
was not used because it has no per-rater noise scale and no way to keep such subjects finite.

The ratings table has columns subject, rater, rating (integers; the categories are
the distinct values that occur, in order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import ndtr

PRIOR_SD = 10.0
LOG_SIGMA_SD = 1.0  # weak prior on each rater's log noise scale
OUTER = 1e4  # stands in for the infinite end thresholds


def validate_ratings(table: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in ("subject", "rater", "rating") if c not in table.columns]
    if missing:
        raise ValueError(f"{source}: ratings table lacks column(s) {', '.join(missing)} "
                         f"(needs subject, rater, rating)")
    rating = pd.to_numeric(table["rating"], errors="coerce")
    bad = table[rating.isna() | (rating != rating.round())]
    if len(bad):
        row = bad.iloc[0]
        raise ValueError(f"{source}: subject {row['subject']}, rater {row['rater']}: rating {row['rating']!r} "
                         f"is not an integer category")
    duplicated = table.duplicated(["subject", "rater"])
    if duplicated.any():
        row = table[duplicated].iloc[0]
        raise ValueError(f"{source}: subject {row['subject']} is rated twice by rater {row['rater']}")
    out = table[["subject", "rater"]].astype(str).assign(rating=rating.astype(int))
    if out["rating"].nunique() < 2:
        raise ValueError(f"{source}: every rating is {out['rating'].iloc[0]}; a latent trait needs two categories")
    return out


class OrdinalRaterModel:
    """The negative log-posterior of the model above and its analytic gradient, over one
    parameter vector: theta (S), biases (R - 1 free, the last makes the sum 0), log sigmas
    (R - 1, likewise), the first threshold and the log steps between thresholds (C - 2)."""

    def __init__(self, subject_index, rater_index, category_index, n_subjects: int, n_raters: int,
                 n_categories: int):
        self.s, self.r, self.k = (np.asarray(i, dtype=np.int64) for i in (subject_index, rater_index, category_index))
        self.n_s, self.n_r, self.n_c = n_subjects, n_raters, n_categories
        self.size = n_subjects + 2 * (n_raters - 1) + n_categories - 1

    def unpack(self, params: np.ndarray):
        n_s, n_r = self.n_s, self.n_r
        theta = params[:n_s]
        bias = _sum_to_zero(params[n_s:n_s + n_r - 1])
        log_sigma = _sum_to_zero(params[n_s + n_r - 1:n_s + 2 * n_r - 2])
        first, steps = params[n_s + 2 * n_r - 2], params[n_s + 2 * n_r - 1:]
        tau = np.concatenate([[-OUTER, first], first + np.cumsum(np.exp(steps)), [OUTER]])
        return theta, bias, log_sigma, tau, steps

    def __call__(self, params: np.ndarray) -> tuple[float, np.ndarray]:
        theta, bias, log_sigma, tau, steps = self.unpack(params)
        sigma = np.exp(log_sigma[self.r])
        centre = theta[self.s] + bias[self.r]
        upper, lower = (tau[self.k + 1] - centre) / sigma, (tau[self.k] - centre) / sigma
        # P = Phi(upper) - Phi(lower), taken in the tail where it does not cancel
        p = np.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
        p = np.maximum(p, 1e-300)
        g_up, g_low = _pdf(upper) / p, _pdf(lower) / p  # d log p / d upper, -d log p / d lower
        d_centre = (g_low - g_up) / sigma
        d_log_sigma = g_low * lower - g_up * upper
        d_tau = (np.bincount(self.k + 1, g_up / sigma, len(tau)) - np.bincount(self.k, g_low / sigma, len(tau)))[1:-1]
        d_theta = np.bincount(self.s, d_centre, self.n_s)
        d_bias = np.bincount(self.r, d_centre, self.n_r)
        d_ls = np.bincount(self.r, d_log_sigma, self.n_r)
        d_steps = np.exp(steps) * np.cumsum(d_tau[::-1])[::-1][1:]  # tau_j depends on every step before it
        grad_ll = np.concatenate([d_theta, d_bias[:-1] - d_bias[-1], d_ls[:-1] - d_ls[-1], [d_tau.sum()], d_steps])
        loss = -np.log(p).sum() + (theta**2).sum() / (2 * PRIOR_SD**2) + (log_sigma**2).sum() / (2 * LOG_SIGMA_SD**2)
        grad = -grad_ll
        grad[:self.n_s] += theta / PRIOR_SD**2
        d_prior = log_sigma / LOG_SIGMA_SD**2
        grad[self.n_s + self.n_r - 1:self.n_s + 2 * self.n_r - 2] += d_prior[:-1] - d_prior[-1]
        return float(loss), grad


def aggregate_ratings(table: pd.DataFrame, source: str = "ratings") -> pd.DataFrame:
    """One row per subject: latent_severity (theta), mean_rating, n_ratings."""
    table = validate_ratings(table, source)
    subjects, s_idx = np.unique(table["subject"], return_inverse=True)
    raters, r_idx = np.unique(table["rater"], return_inverse=True)
    categories, k_idx = np.unique(table["rating"], return_inverse=True)
    model = OrdinalRaterModel(s_idx, r_idx, k_idx, len(subjects), len(raters), len(categories))
    mean_rating = table.groupby("subject")["rating"].mean().reindex(subjects).to_numpy()
    spread = mean_rating.std() or 1.0
    n_c = len(categories)
    start = np.concatenate([
        2.0 * (mean_rating - mean_rating.mean()) / spread,  # theta
        np.zeros(2 * len(raters) - 2),  # biases and log sigmas
        [-2.0], np.full(n_c - 2, np.log(4.0 / max(n_c - 2, 1))),  # thresholds spread over [-2, 2]
    ])
    result = minimize(model, start, jac=True, method="L-BFGS-B", options={"maxiter": 5000})
    if not result.success:
        raise RuntimeError(f"{source}: the latent-trait fit did not converge ({result.message})")
    counts = table.groupby("subject").size().reindex(subjects).to_numpy()
    return pd.DataFrame({"subject": subjects, "latent_severity": result.x[:len(subjects)],
                         "mean_rating": mean_rating, "n_ratings": counts})


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)


def _sum_to_zero(free: np.ndarray) -> np.ndarray:
    return np.concatenate([free, [-free.sum()]])
