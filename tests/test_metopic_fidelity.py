"""Metopic severity as a check of shape fidelity (issue 34): the PPCA severity split into its
in-subspace and residual parts, and the fidelity keys that, unlike the AUC, penalise a
prediction that is a shrunken or projected copy of the true shapes.

The shapes are constructed: a few known control modes plus small isotropic noise, and a
severity axis along which each metopic subject is displaced by its known severity."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest

from deepssm_workflow.intervals import bootstrap_interval
from deepssm_workflow.studies import metopic
from deepssm_workflow.studies.data import Shapes
from deepssm_workflow.studies.metopic import fidelity, severity_scores
from deepssm_workflow.studies.output import StudyOutput
from deepssm_workflow.studies.ppca import PPCA
from deepssm_workflow.studies.stats import auc, spearman

N_POINTS = 20
MODE_SD = (3.0, 2.0, 1.5)  # the control modes; the reference PPCA keeps these 3
NOISE_SD = 0.05
N_REFERENCE, N_CONTROL, N_METOPIC = 40, 30, 30


@pytest.fixture(autouse=True)
def fewer_resamples(monkeypatch):
    """The study's 2000 Spearman resamples take about a second per source on a busy machine."""
    monkeypatch.setattr(metopic, "bootstrap_interval", partial(bootstrap_interval, resamples=300))


def population(seed: int, along_modes: float, off_modes: float):
    """(reference controls, scored shapes, their true severity, groups). A subject of severity s
    moves s * (along_modes * mode 1 + off_modes * a direction outside the control modes);
    controls have a little severity too (like the generator's latent severity) so ranks are defined."""
    rng = np.random.default_rng(seed)
    dims = 3 * N_POINTS
    basis = np.linalg.qr(rng.normal(size=(dims, dims)))[0].T  # orthonormal rows
    mean = rng.normal(0.0, 10.0, dims)
    axis = along_modes * basis[0] + off_modes * basis[len(MODE_SD) + 2]

    def draw(severity):
        n = len(severity)
        modes = rng.normal(size=(n, len(MODE_SD))) * MODE_SD @ basis[:len(MODE_SD)]
        flat = mean + modes + rng.normal(0.0, NOISE_SD, (n, dims)) + np.outer(severity, axis)
        return flat.reshape(n, N_POINTS, 3)

    reference = draw(np.zeros(N_REFERENCE))
    true = np.r_[rng.uniform(0.0, 0.15, N_CONTROL), rng.uniform(0.2, 1.0, N_METOPIC)]
    groups = np.array(["control"] * N_CONTROL + ["metopic"] * N_METOPIC)
    return reference, draw(true), true, groups


def score(ppca: PPCA, copies: dict[str, np.ndarray], groups: np.ndarray) -> dict[str, pd.DataFrame]:
    """Per-source scores tables of the copies, "ground_truth" among them."""
    ids = np.array([f"s{i:02d}" for i in range(len(groups))])
    scores = severity_scores(ppca, {name: Shapes(ids, x) for name, x in copies.items()}, pd.Series(groups, index=ids))
    return {source: table for source, table in scores.groupby("source", sort=False)}


def diagnosis_auc(table: pd.DataFrame) -> float:
    return auc(table["severity"], (table["group"] == "metopic").astype(int))


def shrunk(ppca: PPCA, shapes: np.ndarray, factor: float) -> np.ndarray:
    """The shapes pulled towards the reference mean, as a prediction regressing to the mean is."""
    mean = ppca.mean.reshape(-1, 3)
    return mean + factor * (shapes - mean)


def projected(ppca: PPCA, shapes: np.ndarray) -> np.ndarray:
    """The shapes with everything outside the PPCA subspace removed."""
    x = shapes.reshape(len(shapes), -1) - ppca.mean
    return (ppca.mean + x @ ppca.components.T @ ppca.components).reshape(shapes.shape)


def test_parts_compose_to_the_severity():
    reference, shapes, _, _ = population(0, 8.0, 3.0)
    ppca = PPCA(0.95).fit(reference)
    assert ppca.n_modes == len(MODE_SD)
    subspace, residual = ppca.mahalanobis_parts(shapes)
    np.testing.assert_allclose(np.hypot(subspace, residual), ppca.mahalanobis(shapes), rtol=1e-10)
    # the residual is the distance from the subspace in units of the isotropic noise sigma
    np.testing.assert_allclose(residual, ppca.distance_from_subspace(shapes) / np.sqrt(ppca.sigma2), rtol=1e-10)
    # both against the dense S of eq. 14: x^T S^-1 x, and x_L^T S^-1 x_L for the part in the subspace
    x = shapes.reshape(len(shapes), -1) - ppca.mean
    inside = projected(ppca, shapes).reshape(len(shapes), -1) - ppca.mean
    dense = ppca.covariance()
    np.testing.assert_allclose(np.einsum("ij,ij->i", x, np.linalg.solve(dense, x.T).T), subspace**2 + residual**2,
                               rtol=1e-8)
    np.testing.assert_allclose(np.einsum("ij,ij->i", inside, np.linalg.solve(dense, inside.T).T), subspace**2,
                               rtol=1e-8)
    # a projected shape keeps its subspace part and loses the rest
    sub_projected, res_projected = ppca.mahalanobis_parts(projected(ppca, shapes))
    np.testing.assert_allclose(sub_projected, subspace, rtol=1e-10)
    assert res_projected.max() < 1e-6 * residual.min()


def test_scores_table_reports_the_parts_apart():
    reference, shapes, _, groups = population(0, 8.0, 3.0)
    ppca = PPCA(0.95).fit(reference)
    tables = score(ppca, {"ground_truth": shapes, "projected": projected(ppca, shapes)}, groups)
    for table in tables.values():
        np.testing.assert_allclose(np.hypot(table["severity_subspace"], table["severity_residual"]),
                                   table["severity"], rtol=1e-10)
    np.testing.assert_allclose(tables["projected"]["severity_subspace"], tables["ground_truth"]["severity_subspace"])
    assert tables["projected"]["distance_from_subspace_mm"].max() < 1e-6
    assert (tables["ground_truth"]["severity_error_vs_truth"] == 0).all()


def test_a_shrunken_copy_keeps_the_auc_but_not_the_fidelity():
    reference, shapes, true, groups = population(1, 8.0, 3.0)
    ppca = PPCA(0.95).fit(reference)
    tables = score(ppca, {"ground_truth": shapes, "shrunk": shrunk(ppca, shapes, 0.6)}, groups)
    truth, copy = tables["ground_truth"], tables["shrunk"]
    # the old headline cannot tell them apart: severities scale by 0.6, ranks and AUC are kept
    assert diagnosis_auc(copy) == diagnosis_auc(truth)
    np.testing.assert_allclose(copy["severity"].to_numpy(), 0.6 * truth["severity"].to_numpy())
    true = pd.Series(true, index=truth["id"].to_numpy())
    out = StudyOutput()
    exact, shrunken = fidelity(truth, true, out), fidelity(copy, true, out)
    assert not out.notes
    assert exact["spearman_true_severity"] > 0.9
    assert shrunken["spearman_true_severity"] == exact["spearman_true_severity"]  # ranks kept: blind to it too
    # the error against the ground-truth shapes' severity does: 0 for the truth, 40 % of it for the copy
    assert exact["severity_error_vs_truth_mean"] == 0 and exact["severity_bias_vs_truth"] == 0
    np.testing.assert_allclose(shrunken["severity_error_vs_truth_mean"], 0.4 * truth["severity"].mean())
    assert 0 < shrunken["severity_error_vs_truth_low"] < shrunken["severity_error_vs_truth_mean"] \
        < shrunken["severity_error_vs_truth_high"]
    assert shrunken["severity_bias_vs_truth"] < 0  # shrunk, not just wrong


def test_a_projected_copy_can_beat_the_truth_on_auc():
    """The issue's paradox: when the severity lies in the control modes, dropping the
    out-of-subspace detail (which sigma^2 weighs heavily) raises the AUC; the error does not fall for it."""
    reference, shapes, _, groups = population(4, 12.0, 0.0)
    ppca = PPCA(0.95).fit(reference)
    tables = score(ppca, {"ground_truth": shapes, "projected": projected(ppca, shapes)}, groups)
    assert diagnosis_auc(tables["projected"]) > diagnosis_auc(tables["ground_truth"])
    keys = fidelity(tables["projected"], None, StudyOutput())
    assert keys["severity_error_vs_truth_low"] > 0 and keys["severity_bias_vs_truth"] < 0
    assert keys["severity_residual_mean"] < 1e-6 < keys["severity_subspace_mean"]


def test_spearman_with_the_true_severity_falls_with_noise_and_vanishes_when_permuted():
    reference, shapes, true, groups = population(3, 8.0, 3.0)
    ppca = PPCA(0.95).fit(reference)
    noisy = shrunk(ppca, shapes, 0.6) + np.random.default_rng(4).normal(0.0, 4 * NOISE_SD, shapes.shape)
    tables = score(ppca, {"ground_truth": shapes, "noisy": noisy}, groups)
    permuted = tables["ground_truth"].assign(source="permuted")
    permuted["severity"] = np.random.default_rng(5).permutation(permuted["severity"].to_numpy())
    true = pd.Series(true, index=permuted["id"].to_numpy())
    keys = {source: fidelity(table, true, StudyOutput())
            for source, table in {**tables, "permuted": permuted}.items()}
    assert keys["ground_truth"]["spearman_true_severity"] > 0.9
    assert keys["noisy"]["spearman_true_severity"] < keys["ground_truth"]["spearman_true_severity"] - 0.05
    assert keys["noisy"]["severity_error_vs_truth_low"] > 0
    null = keys["permuted"]
    assert abs(null["spearman_true_severity"]) < 0.3
    assert null["spearman_true_severity_low"] < 0 < null["spearman_true_severity_high"]


def test_the_spearman_interval_covers_zero_on_null_data():
    """Roughly 95 % of the bootstrap intervals of unrelated severities contain 0 (few, short repeats)."""
    repeats, covered, widths = 30, 0, []
    for repeat in range(repeats):
        x, y = np.random.default_rng([6, repeat]).normal(size=(2, 30))
        low, high = bootstrap_interval(spearman, x, y, resamples=250, seed=repeat)
        covered += low < 0 < high
        widths.append(high - low)
    assert covered >= 26  # 95 % of 30 is 28.5; binomial sd about 1.2
    assert 0.5 < np.mean(widths) < 1.0  # not covering by being uninformatively wide


def test_without_a_true_severity_or_ground_truth_the_keys_are_left_out():
    reference, shapes, _, groups = population(0, 8.0, 3.0)
    ppca = PPCA(0.95).fit(reference)
    table = score(ppca, {"method": shapes}, groups)["method"]  # no ground_truth source scored
    assert table["severity_error_vs_truth"].isna().all()
    keys = fidelity(table, None, StudyOutput())
    assert set(keys) == {"severity_subspace_mean", "severity_residual_mean"}
