"""The AF recurrence study's baseline and tests against it, on constructed data with known answers:
AUC and its stratified bootstrap interval, balanced accuracy, the exact binomial test of accuracy
against the no-information rate (NIR), and `classify` taking the NIR from the test set."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from deepssm_workflow.studies.stats import (
    accuracy_binomial_p,
    auc,
    auc_interval,
    balanced_accuracy,
    no_information_rate,
)


def test_auc_of_separated_and_reversed_scores():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert auc(scores, labels) == 1.0 and auc(-scores, labels) == 0.0
    # every resample of perfectly separated classes stays separated: a degenerate interval
    assert auc_interval(scores, labels) == (1.0, 1.0)
    assert auc_interval(-scores, labels) == (0.0, 0.0)


def test_auc_matches_a_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 50)
    scores = rng.integers(0, 5, 50) + labels  # few distinct values: many ties, within and across classes
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    assert auc(scores, labels) == pytest.approx(wins / (len(positives) * len(negatives)))


def test_auc_interval_is_deterministic_brackets_the_auc_and_needs_two_per_class():
    rng = np.random.default_rng(4)
    labels = np.r_[np.ones(12, int), np.zeros(28, int)]
    scores = rng.normal(0, 1, 40) + labels
    low, high = auc_interval(scores, labels)
    assert low < auc(scores, labels) < high and 0.0 <= low and high <= 1.0
    assert auc_interval(scores, labels) == (low, high)  # fixed seed
    assert auc_interval(scores, labels, seed=1) != (low, high)
    # one positive: resampling cannot show the positives' spread, so no interval rather than a narrow one
    assert all(np.isnan(auc_interval(scores[11:], labels[11:])))


def test_balanced_accuracy_from_a_hand_counted_confusion_matrix():
    # 10 positives (8 found), 30 negatives (21 rejected): sensitivity 0.8, specificity 0.7
    labels = np.r_[np.ones(10, int), np.zeros(30, int)]
    predicted = np.r_[np.ones(8, int), np.zeros(2, int), np.zeros(21, int), np.ones(9, int)]
    assert balanced_accuracy(predicted, labels) == pytest.approx(0.75)
    # always answering the majority is 0.75 accurate here, but no better than chance balanced
    assert balanced_accuracy(np.zeros(40, int), labels) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both classes"):
        balanced_accuracy([0, 1], [1, 1])


def _right_on(labels: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Predictions that are right exactly where `correct` is true."""
    return np.where(correct, labels, 1 - labels)


def test_binomial_test_finds_a_planted_effect():
    labels = np.r_[np.ones(36, int), np.zeros(24, int)]  # NIR 0.6
    correct = np.arange(60) % 20 >= 3  # 51 of 60 right: 85 %
    p = accuracy_binomial_p(_right_on(labels, correct), labels)
    tail = sum(math.comb(60, k) * 0.6**k * 0.4 ** (60 - k) for k in range(51, 61))  # P(X >= 51), X ~ B(60, 0.6)
    assert no_information_rate(labels) == pytest.approx(0.6)
    assert p == pytest.approx(tail) and p < 0.05
    # right exactly at the NIR: nothing to find
    assert accuracy_binomial_p(_right_on(labels, np.arange(60) < 36), labels) > 0.4


def test_binomial_test_holds_its_level_on_null_data():
    """A classifier right with probability NIR, independently per subject: the exact test rejects at
    most at about its nominal 5 % (less: the binomial is discrete)."""
    rng = np.random.default_rng(11)
    labels = np.r_[np.ones(24, int), np.zeros(36, int)]  # NIR 0.6, majority class 0
    p = np.array([accuracy_binomial_p(_right_on(labels, rng.random(60) < 0.6), labels) for _ in range(400)])
    # the exact size for n = 60 at 0.6, to which the simulated rate should come close
    critical = next(k for k in range(61) if scipy_stats.binom.sf(k - 1, 60, 0.6) <= 0.05)
    size = scipy_stats.binom.sf(critical - 1, 60, 0.6)
    assert size <= 0.05
    assert np.mean(p < 0.05) <= 0.05 + 0.03  # 0.03: about 2.5 binomial sd of a rate near 0.05 over 400 draws
    assert abs(np.mean(p < 0.05) - size) < 0.03


@pytest.fixture(scope="module")
def split():
    """20 training subjects, 14 with recurrence, and 10 test subjects, 3 with recurrence: the training
    majority (recurrence) is the test minority. One descriptor carries the outcome, two are noise."""
    rng = np.random.default_rng(0)
    train_y = np.r_[np.ones(14, int), np.zeros(6, int)]
    test_y = np.r_[np.ones(3, int), np.zeros(7, int)]

    def descriptors(y):
        return np.c_[2.0 * y + rng.normal(0, 1, len(y)), rng.normal(0, 1, (len(y), 2))]
    return descriptors(train_y), train_y, descriptors(test_y), test_y


def test_classify_scores_against_the_test_sets_majority(split):
    from deepssm_workflow.studies.left_atrium import classify

    train_x, train_y, test_x, test_y = split
    notes = []
    row = classify(train_x, train_y, test_x, test_y, seeds=(0, 1), notes=notes)
    # the training majority (1) scored on the test labels would be 0.3; the NIR is the test majority's 0.7
    assert row["nir_accuracy"] == pytest.approx(0.7)
    assert row["nir_accuracy_low"] <= 0.7 <= row["nir_accuracy_high"]
    assert not any(key.startswith("majority") for key in row) and notes == []
    for model in ("mlp", "logistic"):
        assert 0.0 <= row[f"{model}_auc_low"] <= row[f"{model}_auc"] <= row[f"{model}_auc_high"] <= 1.0
        assert 0.0 <= row[f"{model}_balanced_accuracy"] <= 1.0
    # the logistic regression's p is the binomial tail of its own accuracy against 0.7
    correct = round(row["logistic_accuracy"] * 10)
    assert row["logistic_binomial_p"] == pytest.approx(scipy_stats.binom.sf(correct - 1, 10, 0.7))
    correct = round(row["mlp_ensemble_accuracy"] * 10)
    assert row["mlp_binomial_p"] == pytest.approx(scipy_stats.binom.sf(correct - 1, 10, 0.7))


def test_classify_on_a_one_class_test_set_says_why_auc_is_missing(split):
    from deepssm_workflow.studies.left_atrium import classify

    train_x, train_y, test_x, test_y = split
    negatives = test_y == 0
    notes = []
    row = classify(train_x, train_y, test_x[negatives], test_y[negatives], seeds=(0,), notes=notes)
    assert row["nir_accuracy"] == 1.0
    assert np.isnan(row["mlp_auc"]) and np.isnan(row["logistic_balanced_accuracy"])
    assert 0.0 < row["mlp_binomial_p"] <= 1.0
    assert len(notes) == 2 and all("both classes" in note for note in notes)
