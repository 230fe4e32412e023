"""Evaluation against baselines, on hand-made predictions with known errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepssm_workflow.evaluate import rmse_against_baselines
from deepssm_workflow.io import write_particles


def test_errors_are_measured_in_the_scan_frame_against_both_baselines(tmp_path):
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(40, 3)) * 20
    modes = rng.normal(size=(2, 40, 3))
    train = mean + np.einsum("nk,kmd->nmd", rng.normal(size=(6, 2)) * 3, modes)
    truth = mean + np.einsum("nk,kmd->nmd", rng.normal(size=(2, 2)) * 3, modes) + rng.normal(size=(2, 40, 3)) * 0.5
    shift = np.array([5.0, -3.0, 2.0])  # scanner frame = world shifted; registration found it exactly
    image_to_world = np.tile(np.eye(4), (2, 1, 1))
    image_to_world[:, :3, 3] = shift
    ids = np.array(["a", "b"])
    cohort, preprocess, predictions = (tmp_path / name for name in ("cohort", "preprocess", "predictions"))
    for folder in (cohort, preprocess, predictions):
        folder.mkdir()
    np.savez(cohort / "shapes_train.npz", ids=np.array(list("cdefgh")), world=train)
    np.savez(cohort / "shapes_test.npz", ids=ids, world=truth, local=truth - shift)
    np.savez(preprocess / "test.npz", ids=ids, image_to_world=image_to_world)
    offset = np.array([0.3, 0.6, 0.9])  # every predicted point off by this
    rows = []
    for subject, shape in zip(ids, truth):
        write_particles(predictions / f"{subject}.particles", shape - shift + offset)
        rows.append({"id": subject, "local_particles": f"{subject}.particles"})
    pd.DataFrame(rows).to_csv(predictions / "predictions.csv", index=False)

    table = rmse_against_baselines(cohort, preprocess, predictions, n_modes=2)
    assert table["rmse_mm"].to_numpy() == pytest.approx([offset.mean()] * 2)  # eq. 12: mean of per-axis RMSE
    expected_mean = [np.mean(np.sqrt(((train.mean(0) - t) ** 2).mean(0))) for t in truth]
    assert table["mean_shape_rmse_mm"].to_numpy() == pytest.approx(expected_mean)
    # two modes capture the structured part; the floor is the unstructured 0.5 mm noise
    assert (table["pca_floor_rmse_mm"] < table["mean_shape_rmse_mm"]).all()
    assert table["pca_floor_rmse_mm"].to_numpy() == pytest.approx([0.5, 0.5], abs=0.15)
