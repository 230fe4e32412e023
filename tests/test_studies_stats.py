"""Study metrics against hand-computed values, PPCA against its closed form, the ratings model."""

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import approx_fprime

from deepssm_workflow.studies.ppca import PPCA
from deepssm_workflow.studies.ratings import OrdinalRaterModel, aggregate_ratings, validate_ratings
from deepssm_workflow.studies.stats import auc, fdr, hotelling_t2, pearson, permutation_hotelling, spearman
from deepssm_workflow.synthetic.metopic import Metopic


def test_auc_counts_won_pairs_and_half_ties():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs won
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc([1.0, 1.0], [0, 1]) == pytest.approx(0.5)
    assert auc([3.0, 2.0, 1.0], [1, 0, 0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both classes"):
        auc([1.0, 2.0], [1, 1])


def test_correlations_match_hand_computation():
    # dx = (-1, 0, 1), dy = (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9)
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / np.sqrt(2 * 42 / 9))
    # rank differences (0, 1, -1, 0): rho = 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="at least 3"):
        pearson([1, 2], [2, 1])
    with pytest.raises(ValueError, match="constant"):
        spearman([1, 1, 1], [1, 2, 3])


def test_fdr_is_benjamini_hochberg():
    # sorted p 0.01, 0.03, 0.04, 0.2 times m / rank = 0.04, 0.06, 0.0533, 0.2; running minimum from the top
    q = fdr([0.01, 0.04, 0.03, 0.20])
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.20])
    with pytest.raises(ValueError):
        fdr([0.5, 1.5])


def test_hotelling_matches_the_two_sample_formula_and_finds_a_shifted_point():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(14, 6, 3))
    group = np.arange(14) < 6
    x[group, 2] += [5.0, 0.0, 0.0]  # only point 2 differs between the groups
    a, b = x[group, 4], x[~group, 4]
    pooled = (np.cov(a.T) * 5 + np.cov(b.T) * 7) / 12
    d = a.mean(0) - b.mean(0)
    assert hotelling_t2(x, group)[4] == pytest.approx(6 * 8 / 14 * d @ np.linalg.solve(pooled, d))
    test = permutation_hotelling(x, group, n_permutations=499)
    assert test["q"][2] < 0.05 and test["p"][2] == pytest.approx(1 / 500)
    assert (test["q"][[0, 1, 3, 4, 5]] > 0.05).all()
    small = permutation_hotelling(x[4:10], group[4:10], n_permutations=999)  # C(6, 2) = 15 labellings
    assert small["method"] == "exact (15 labellings)" and small["p"].min() >= 1 / 15
    with pytest.raises(ValueError, match="invertible"):
        hotelling_t2(x[:4], group[:4])


@pytest.fixture
def reference_shapes():
    rng = np.random.default_rng(1)
    modes = rng.normal(size=(3, 8 * 3)) * np.array([[5.0], [2.0], [0.5]])
    return (rng.normal(size=(12, 3)) @ modes + 0.05 * rng.normal(size=(12, 24))).reshape(12, 8, 3)


def test_ppca_covariance_and_whitening_match_the_closed_form(reference_shapes):
    ppca = PPCA(variance=0.95).fit(reference_shapes)
    flat = reference_shapes.reshape(12, -1)
    centred = flat - flat.mean(0)
    eigen, vectors = np.linalg.eigh(centred.T @ centred / 12)  # eq. 13, ascending
    eigen, vectors = eigen[::-1], vectors[:, ::-1]
    n = int(np.searchsorted(np.cumsum(eigen) / eigen.sum(), 0.95)) + 1
    sigma2 = eigen[n:].sum() / (24 - n)
    s = vectors[:, :n] @ np.diag(eigen[:n]) @ vectors[:, :n].T + sigma2 * np.eye(24)  # eq. 14
    assert ppca.n_modes == n and ppca.sigma2 == pytest.approx(sigma2)
    np.testing.assert_allclose(ppca.covariance(), s, atol=1e-9)
    # eq. 15 with the eigendecomposition of S, and the Mahalanobis distance it gives
    s_eigen, s_vectors = np.linalg.eigh(s)
    shape = reference_shapes[0] + 1.0
    x = shape.ravel() - flat.mean(0)
    expected = s_vectors @ np.diag(s_eigen**-0.5) @ s_vectors.T @ x
    np.testing.assert_allclose(ppca.whiten(shape[None])[0].ravel(), expected, atol=1e-9)
    assert ppca.mahalanobis(shape[None])[0] == pytest.approx(np.sqrt(x @ np.linalg.solve(s, x)))


def test_ppca_keeps_sigma2_positive_with_few_shapes(reference_shapes):
    ppca = PPCA(variance=1.0).fit(reference_shapes[:3])  # 3 shapes span 2 modes: 100 % needs both
    assert ppca.n_modes == 1 and ppca.sigma2 > 0
    with pytest.raises(ValueError, match="at least 2 modes"):
        PPCA().fit(reference_shapes[:2])


def _ratings(latent, seed=1):
    subjects = pd.DataFrame({"id": [f"s{i:02d}" for i in range(len(latent))]})
    truth = pd.DataFrame({"id": subjects["id"], "latent_severity": latent})
    return Metopic.cohort_tables(None, np.random.default_rng(seed), subjects, truth)["ratings"]


def test_latent_trait_recovers_the_simulated_severity():
    rng = np.random.default_rng(0)
    latent = np.r_[rng.normal(0, 0.06, 16), 0.2 + 0.8 * rng.beta(2, 2, 16)]
    table = aggregate_ratings(_ratings(latent))
    assert list(table["subject"]) == [f"s{i:02d}" for i in range(32)]
    assert spearman(table["latent_severity"], latent) > 0.95
    assert np.isfinite(table["latent_severity"]).all()  # even subjects rated 1 by everyone


def test_latent_trait_gradient_is_exact():
    table = validate_ratings(_ratings(np.linspace(0, 1, 8)), "t")
    index = [np.unique(table[c], return_inverse=True)[1] for c in ("subject", "rater", "rating")]
    model = OrdinalRaterModel(*index, 8, 36, table["rating"].nunique())
    x = np.random.default_rng(3).normal(0, 0.5, model.size)
    numeric = approx_fprime(x, lambda v: model(v)[0], 1e-6)
    np.testing.assert_allclose(model(x)[1], numeric, rtol=1e-4, atol=1e-3)


def test_bad_ratings_name_the_subject():
    table = pd.DataFrame({"subject": ["a", "b"], "rater": ["r", "r"], "rating": [1, 2.5]})
    with pytest.raises(ValueError, match="subject b, rater r"):
        aggregate_ratings(table, "ratings.csv")
    with pytest.raises(ValueError, match="lacks column"):
        aggregate_ratings(table.drop(columns="rater"), "ratings.csv")
