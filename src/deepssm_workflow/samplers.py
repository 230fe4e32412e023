"""Generative models of PCA scores for data augmentation (paper section 3.1).

Every sampler is fit on the (N, L) training score vectors and draws new ones with
`sample(rng, n) -> (scores (n, L), source (n,))`. `source` indexes the training
subject whose real image is warped to make the augmented image: for the KDE the
training vector the sample was drawn around, for the Gaussian and the mixture the
nearest training vector.

* `KDESampler` is the paper's method (eq. 1): a random training vector plus
  isotropic Gaussian noise, its scale set by sigma, the average nearest-neighbour
  distance between training vectors. It is meant for all N - 1 modes (fit the
  shape space with `ShapeSpace(n_modes=N - 1)`), so augmentation keeps every
  direction the training shapes vary in. Two readings of the kernel width:
  `kernel="paper"` is eq. 1 literally, N(0, sigma^2 I) in each of the L modes, so
  a sample lies about sigma*sqrt(L) from its source: with 25 femurs in 24 modes,
  generated shapes were 3.6x farther from the mean than real ones (11.3 vs
  3.2 mm RMS), far outside the population. `kernel="neighbour"` (the default)
  scales the noise to sigma/sqrt(L) per mode, so a sample moves about one
  nearest-neighbour gap from its source and fills the space between neighbours.
* `GaussianSampler` (one multivariate normal) and `MixtureSampler` (a Gaussian
  mixture fit by EM) are the older DeepSSM alternatives; full covariances need
  far more vectors than modes, so fit them on the leading modes only.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular
from scipy.special import logsumexp


def _check_scores(scores, least: int = 2) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be an (N, L) array, got shape {scores.shape}")
    if len(scores) < least:
        raise ValueError(f"need at least {least} training score vectors, got {len(scores)}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain non-finite values (NaN or inf)")
    return scores


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d2, 0.0)  # rounding can make a zero distance slightly negative


def nearest(samples: np.ndarray, scores: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Index of the nearest training vector (Euclidean) for each sample; chunked to bound memory."""
    index = np.zeros(len(samples), dtype=np.int64)
    for i in range(0, len(samples), chunk):
        index[i:i + chunk] = _squared_distances(samples[i:i + chunk], scores).argmin(1)
    return index


def kde_bandwidth(scores: np.ndarray) -> float:
    """Average Euclidean distance from each training vector to its nearest other one."""
    scores = _check_scores(scores)
    d2 = _squared_distances(scores, scores)
    np.fill_diagonal(d2, np.inf)
    return float(np.sqrt(d2.min(1)).mean())


def _start(sampler, rng) -> np.random.Generator:
    if getattr(sampler, "scores", None) is None:
        raise ValueError(f"this {type(sampler).__name__} is not fitted yet; call fit(scores) first")
    return np.random.default_rng(rng)  # a Generator passes through; an int seeds one


KDE_KERNELS = ("neighbour", "paper")


class KDESampler:
    """Paper eq. 1: mixture of N isotropic Gaussians centred on the training vectors.

    `bandwidth` is sigma (the average nearest-neighbour distance, or the given `sigma`);
    `noise_std` is the per-mode standard deviation of the kernel, sigma for
    kernel="paper" and sigma / sqrt(L) for kernel="neighbour" (see the module doc).
    """

    def __init__(self, sigma: float | None = None, kernel: str = "neighbour"):
        if sigma is not None and not sigma >= 0:
            raise ValueError(f"sigma must be a non-negative number, got {sigma}")
        if kernel not in KDE_KERNELS:
            raise ValueError(f"unknown KDE kernel {kernel!r} (choose from {', '.join(KDE_KERNELS)})")
        self.sigma, self.kernel = sigma, kernel  # sigma None: kde_bandwidth of the training scores
        self.scores = self.bandwidth = self.noise_std = None

    def fit(self, scores: np.ndarray) -> "KDESampler":
        self.scores = _check_scores(scores)
        self.bandwidth = kde_bandwidth(self.scores) if self.sigma is None else float(self.sigma)
        per_mode = 1.0 if self.kernel == "paper" else np.sqrt(self.scores.shape[1])
        self.noise_std = self.bandwidth / per_mode
        return self

    def sample(self, rng, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = _start(self, rng)
        source = rng.integers(len(self.scores), size=n)
        noise = rng.standard_normal((n, self.scores.shape[1])) * self.noise_std
        return self.scores[source] + noise, source


class GaussianSampler:
    """One multivariate normal with the training mean and (unbiased) sample covariance."""

    scores = None

    def fit(self, scores: np.ndarray) -> "GaussianSampler":
        self.scores = _check_scores(scores)
        self.mean = self.scores.mean(0)
        self.covariance = np.atleast_2d(np.cov(self.scores, rowvar=False))
        # eigen-factor rather than Cholesky: N vectors give a covariance of rank <= N - 1
        w, v = np.linalg.eigh(self.covariance)
        self.factor = v * np.sqrt(np.clip(w, 0.0, None))
        return self

    def sample(self, rng, n: int) -> tuple[np.ndarray, np.ndarray]:
        z = _start(self, rng).standard_normal((n, len(self.mean)))
        new = self.mean + z @ self.factor.T
        return new, nearest(new, self.scores)


class MixtureSampler:
    """Gaussian mixture with full covariances, fit by EM from a k-means++ start.

    Each covariance gets `ridge` times the mean per-dimension variance of the data on
    its diagonal, so a component with fewer vectors than dimensions stays invertible.
    EM stops after `max_iter` iterations or when the mean log-likelihood per vector
    improves by less than `tol`. With fewer vectors per component than dimensions the
    likelihood is unbounded and EM can shrink a component onto a few vectors: fit on
    the leading modes (or raise `ridge`).
    """

    def __init__(self, n_components: int, seed: int = 0, max_iter: int = 200, tol: float = 1e-6,
                 ridge: float = 1e-6):
        if int(n_components) != n_components or n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {n_components}")
        self.n_components, self.seed = int(n_components), seed
        self.max_iter, self.tol, self.ridge = max_iter, tol, ridge
        self.scores = None

    def fit(self, scores: np.ndarray) -> "MixtureSampler":
        x = self.scores = _check_scores(scores, least=max(2, self.n_components))
        rng = np.random.default_rng(self.seed)
        floor = self.ridge * max(x.var(0).mean(), np.finfo(float).tiny)
        # k-means++: each next centre drawn with probability proportional to its squared distance
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, self.n_components):
            d2 = _squared_distances(x, np.array(centres)).min(1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1.0 / len(x))
            centres.append(x[rng.choice(len(x), p=p)])
        resp = np.eye(self.n_components)[_squared_distances(x, np.array(centres)).argmin(1)]
        previous = -np.inf
        for iteration in range(1, self.max_iter + 1):
            self._m_step(x, resp, floor)
            log_joint = self._log_joint(x)
            norm = logsumexp(log_joint, axis=1)
            resp = np.exp(log_joint - norm[:, None])
            self.log_likelihood = float(norm.mean())
            if self.log_likelihood - previous < self.tol:
                break
            previous = self.log_likelihood
        self.n_iter = iteration
        self._m_step(x, resp, floor)  # parameters consistent with the final responsibilities
        return self

    def _m_step(self, x: np.ndarray, resp: np.ndarray, floor: float) -> None:
        counts = resp.sum(0) + 10 * np.finfo(float).eps  # an emptied component keeps a finite update
        self.weights = counts / counts.sum()
        self.means = resp.T @ x / counts[:, None]
        self.covariances = np.empty((self.n_components, x.shape[1], x.shape[1]))
        for k in range(self.n_components):
            d = x - self.means[k]
            self.covariances[k] = (resp[:, k, None] * d).T @ d / counts[k] + floor * np.eye(x.shape[1])
        self.cholesky = np.linalg.cholesky(self.covariances)

    def _log_joint(self, x: np.ndarray) -> np.ndarray:
        """log(weight_k) + log N(x | mean_k, cov_k), shape (N, K)."""
        out = np.empty((len(x), self.n_components))
        for k in range(self.n_components):
            y = solve_triangular(self.cholesky[k], (x - self.means[k]).T, lower=True)
            log_det = 2 * np.log(np.diag(self.cholesky[k])).sum()
            out[:, k] = np.log(self.weights[k]) - 0.5 * ((y**2).sum(0) + log_det + x.shape[1] * np.log(2 * np.pi))
        return out

    def sample(self, rng, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = _start(self, rng)
        component = rng.choice(self.n_components, size=n, p=self.weights)
        z = rng.standard_normal((n, self.means.shape[1]))
        new = np.empty_like(z)
        for k in range(self.n_components):
            chosen = component == k
            new[chosen] = self.means[k] + z[chosen] @ self.cholesky[k].T
        return new, nearest(new, self.scores)


SAMPLERS = {"kde": KDESampler, "gaussian": GaussianSampler, "mixture": MixtureSampler}


def make_sampler(name: str, **kwargs):
    """A sampler by name: "kde" (paper eq. 1; optional kernel), "gaussian" or "mixture" (needs n_components)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLERS)})")
    return SAMPLERS[name](**kwargs)
