"""Augmentation samplers in score space: the KDE of paper eq. 1 and the Gaussian and mixture alternatives."""

from __future__ import annotations

import numpy as np
import pytest

from deepssm_workflow.samplers import GaussianSampler, KDESampler, MixtureSampler, kde_bandwidth, make_sampler
from deepssm_workflow.shape_space import ShapeSpace


def training_scores(n=30, dims=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dims)) * np.linspace(3.0, 0.5, dims)


def test_bandwidth_is_the_mean_nearest_neighbour_distance():
    scores = training_scores()
    brute = []
    for i, a in enumerate(scores):
        brute.append(min(np.sqrt(((a - b) ** 2).sum()) for j, b in enumerate(scores) if j != i))
    assert np.isclose(kde_bandwidth(scores), np.mean(brute), rtol=1e-10)


@pytest.mark.parametrize("kernel", ["paper", "neighbour"])
def test_kde_samples_follow_the_training_statistics_plus_the_kernel(kernel):
    scores = training_scores()
    sampler = KDESampler(kernel=kernel).fit(scores)
    # eq. 1 literally: sigma per mode; "neighbour": sigma over the whole displacement
    sigma = sampler.bandwidth if kernel == "paper" else sampler.bandwidth / np.sqrt(scores.shape[1])
    new, source = sampler.sample(np.random.default_rng(1), 100_000)
    assert new.shape == (100_000, scores.shape[1]) and source.shape == (100_000,)
    assert source.min() >= 0 and source.max() < len(scores)
    assert np.allclose(new.mean(0), scores.mean(0), atol=0.05)
    # a mixture of kernels on the training vectors: population variance plus sigma^2
    assert np.allclose(new.var(0), scores.var(0) + sigma**2, rtol=0.05)
    assert np.allclose((new - scores[source]).std(0), sigma, rtol=0.02)
    assert np.allclose(np.bincount(source, minlength=len(scores)) / len(source), 1 / len(scores), atol=0.005)
    if kernel == "neighbour":  # a sample lies about one nearest-neighbour gap from its source
        gap = np.linalg.norm(new - scores[source], axis=1)
        assert np.isclose(np.sqrt((gap**2).mean()), sampler.bandwidth, rtol=0.02)


def test_kde_on_all_modes_of_a_shape_space():
    # the intended use: every one of the N - 1 modes, and sampled shapes near real ones
    rng = np.random.default_rng(3)
    shapes = rng.normal(size=(15, 20, 3))
    space = ShapeSpace(n_modes=14).fit(shapes)
    scores = space.transform(shapes)
    new, source = KDESampler().fit(scores).sample(rng, 50)
    assert space.inverse_transform(new).shape == (50, 20, 3)
    assert KDESampler(sigma=0.0).fit(scores).sample(rng, 1)[0] in scores


def test_gaussian_sampler_reproduces_the_training_covariance():
    scores = training_scores()
    sampler = GaussianSampler().fit(scores)
    new, nearest = sampler.sample(np.random.default_rng(2), 200_000)
    covariance = np.cov(scores, rowvar=False)
    assert np.allclose(new.mean(0), scores.mean(0), atol=0.03)
    assert np.allclose(np.cov(new, rowvar=False), covariance, atol=0.03 * np.abs(covariance).max())
    brute = [np.argmin(((scores - x) ** 2).sum(1)) for x in new[:200]]
    assert np.array_equal(nearest[:200], brute)


def test_mixture_recovers_two_separated_clusters():
    rng = np.random.default_rng(4)
    centres = np.array([[10.0, 0.0, 0.0], [-10.0, 5.0, 0.0]])
    labels = np.repeat([0, 1], [60, 40])
    scores = centres[labels] + rng.normal(size=(100, 3)) * [1.0, 0.5, 2.0]
    sampler = MixtureSampler(n_components=2, seed=0).fit(scores)
    order = np.argsort(-sampler.means[:, 0])  # component order is arbitrary
    assert np.allclose(sampler.means[order], [scores[labels == k].mean(0) for k in (0, 1)], atol=1e-6)
    assert np.allclose(sampler.weights[order], [0.6, 0.4], atol=1e-6)
    new, nearest = sampler.sample(np.random.default_rng(5), 20_000)
    near_first = np.linalg.norm(new - centres[0], axis=1) < np.linalg.norm(new - centres[1], axis=1)
    assert abs(near_first.mean() - 0.6) < 0.02
    assert np.array_equal(labels[nearest], np.where(near_first, 0, 1))


def test_mixture_of_one_component_is_the_gaussian_fit():
    scores = training_scores()
    mixture = MixtureSampler(n_components=1).fit(scores)
    biased = np.cov(scores, rowvar=False, bias=True)  # EM's maximum-likelihood covariance
    assert np.allclose(mixture.means[0], scores.mean(0))
    assert np.allclose(mixture.covariances[0], biased, atol=1e-4)


@pytest.mark.parametrize("name, kwargs", [("kde", {}), ("gaussian", {}), ("mixture", {"n_components": 3})])
def test_samplers_are_deterministic_for_a_seed(name, kwargs):
    scores = training_scores()
    first = make_sampler(name, **kwargs).fit(scores).sample(np.random.default_rng(7), 100)
    second = make_sampler(name, **kwargs).fit(scores).sample(np.random.default_rng(7), 100)
    other = make_sampler(name, **kwargs).fit(scores).sample(np.random.default_rng(8), 100)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[0], other[0])
    assert first[0].shape == (100, scores.shape[1]) and first[1].dtype.kind == "i"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'gmm'"):
        make_sampler("gmm")
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        KDESampler().fit(np.zeros(5))
    with pytest.raises(ValueError, match="at least 2"):
        kde_bandwidth(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        GaussianSampler().fit(np.array([[0.0, 1.0], [np.inf, 0.0]]))
    with pytest.raises(ValueError, match="at least 4"):
        MixtureSampler(n_components=4).fit(training_scores(n=3))
    with pytest.raises(ValueError, match="positive integer"):
        MixtureSampler(n_components=0)
    with pytest.raises(ValueError, match="non-negative"):
        KDESampler(sigma=-1.0)
    with pytest.raises(ValueError, match="unknown KDE kernel 'wide'"):
        KDESampler(kernel="wide")
    with pytest.raises(ValueError, match="not fitted"):
        GaussianSampler().sample(np.random.default_rng(0), 3)
