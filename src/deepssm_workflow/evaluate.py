"""Accuracy of predicted correspondences, with the baselines every table needs.

Errors are measured in each test scan's own (scanner) frame, where a user gets the
points: prediction and baselines alike pass through the image-only registration.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .io import apply_transform, read_particles
from .shape_space import ShapeSpace, rmse


def rmse_against_baselines(cohort_dir, preprocess_dir, predictions_dir, n_modes: int) -> pd.DataFrame:
    """Per test subject: RMSE (paper eq. 12, mm) of the prediction, of the mean-shape
    predictor, and the PCA-truncation floor (the true shape projected on `n_modes`
    modes of the training shapes: the best any such linear model can do)."""
    cohort_dir, predictions_dir = Path(cohort_dir), Path(predictions_dir)
    truth = np.load(cohort_dir / "shapes_test.npz")
    train_world = np.load(cohort_dir / "shapes_train.npz")["world"]
    registered = np.load(Path(preprocess_dir) / "test.npz")
    predictions = pd.read_csv(predictions_dir / "predictions.csv").set_index("id")
    space = ShapeSpace(n_modes=n_modes).fit(train_world)
    floor = space.truncation_rmse(truth["world"])
    estimated = {str(i): m for i, m in zip(registered["ids"], registered["image_to_world"])}
    rows = []
    for k, subject in enumerate(map(str, truth["ids"])):
        true_local = truth["local"][k]
        predicted = read_particles(predictions_dir / predictions.loc[subject, "local_particles"])
        mean_in_scan = apply_transform(np.linalg.inv(estimated[subject]), space.mean)
        rows.append({"id": subject, "rmse_mm": float(rmse(predicted, true_local)),
                     "mean_shape_rmse_mm": float(rmse(mean_in_scan, true_local)),
                     "pca_floor_rmse_mm": float(floor[k])})
    return pd.DataFrame(rows)


def summarize(dataset_results, variants) -> pd.DataFrame:
    """Mean test RMSE of each trained variant beside its baselines (results/{dataset} folder)."""
    root = Path(dataset_results)
    rows = []
    for variant in variants:
        card = json.loads((root / "models" / variant / "model_card.json").read_text())
        table = rmse_against_baselines(root / "cohort", root / "preprocess", root / "predictions" / variant,
                          card["model_config"]["n_modes"])
        rows.append({"variant": variant, "rmse_mm": table["rmse_mm"].mean(),
                     "mean_shape_rmse_mm": table["mean_shape_rmse_mm"].mean(),
                     "pca_floor_rmse_mm": table["pca_floor_rmse_mm"].mean(),
                     "best_epoch": card["best_epoch"], "val_rmse_mm": card["val_rmse"]})
    return pd.DataFrame(rows)
