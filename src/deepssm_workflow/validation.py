"""Registered validation: the scans every setting is chosen on, aligned exactly as test scans are.

The validation subjects (training.val_fraction and training.seed: `holdout.validation_subjects`) are
held out of the PCA, the augmentation and the training. During training they pick the epoch on
crops resampled with their true transforms, which never see a registration error. Here the same
subjects' images are registered from the image alone against the training reference, as test scans
are (`preprocess.preprocess_unseen`), and every trained method that reads registered crops is scored
on them in the scan frame (paper eq. 12) beside the mean shape and the alignment-only error (the true
shape placed through the registration). A setting, a design or a default is chosen on these figures
(and on `tuning` sweeps of them), never on the test split's.

The reference subject of the registration is left out when it is a validation subject: registering
a scan onto itself would flatter the alignment.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import staged
from .comparisons import paired_comparisons
from .holdout import validation_subjects
from .inference import load_trained, predict
from .io import apply_transform
from .preprocess import preprocess_unseen
from .shape_space import ShapeSpace, rmse

METRIC = "scan-frame RMSE, paper eq. 12 (mm), on the validation subjects registered from the image alone"


def validation_ids(cohort_dir, preprocess_dir, val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(the validation subjects that are registered, those left out with the reason) in training order."""
    ids = [str(i) for i in np.load(Path(cohort_dir) / "shapes_train.npz")["ids"]]
    held_out = [ids[k] for k in validation_subjects(len(ids), val_fraction, seed)]
    reference = json.loads((Path(preprocess_dir) / "grid.json").read_text())["reference_id"]
    kept = [i for i in held_out if i != reference]
    left_out = [f"{reference}: the registration's reference image"] if reference in held_out else []
    if not kept:
        raise ValueError(f"{cohort_dir}: the only validation subject, {reference}, is the registration's reference; "
                         f"raise training.val_fraction to validate on registered scans")
    return kept, left_out


def preprocess_validation(cohort_dir, preprocess_dir, val_fraction: float, seed: int, out_path) -> list[str]:
    """preprocess/validation.npz: the validation subjects' images registered as test images are (the same
    arrays and registration record as test.npz); returns the registered ids."""
    kept, _ = validation_ids(cohort_dir, preprocess_dir, val_fraction, seed)
    preprocess_unseen(cohort_dir, preprocess_dir, "train", out_path, ids=kept)
    return kept


def score(trained, registered_npz, cohort_dir, shape_space: dict, val_fraction: float, seed: int) -> pd.DataFrame:
    """Per registered validation subject: the method's scan-frame and world RMSE, the mean shape's through the
    registration, and the alignment-only error (the true world shape placed through the registration)."""
    data, truth = np.load(registered_npz), np.load(Path(cohort_dir) / "shapes_train.npz")
    index = {str(i): k for k, i in enumerate(truth["ids"])}
    ids = [str(i) for i in data["ids"]]
    rows = [index[i] for i in ids]
    held_out = set(validation_subjects(len(truth["ids"]), val_fraction, seed).tolist())
    fitted_on = [k for k in range(len(truth["ids"])) if k not in held_out]
    mean = ShapeSpace(**shape_space).fit(truth["world"][fitted_on]).mean  # as the trained models' PCA: no val
    world, _ = predict(trained.method, trained.model, data["images"], batch_size=1)
    to_scan = [np.linalg.inv(t) for t in data["image_to_world"]]
    local = np.stack([apply_transform(m, w) for m, w in zip(to_scan, world)])
    mean_local = np.stack([apply_transform(m, mean) for m in to_scan])
    aligned_truth = np.stack([apply_transform(m, truth["world"][k]) for m, k in zip(to_scan, rows)])
    true_local = truth["local"][rows]
    return pd.DataFrame({"id": ids, "rmse_mm": rmse(local, true_local),
                         "world_rmse_mm": rmse(world, truth["world"][rows]),
                         "mean_shape_rmse_mm": rmse(mean_local, true_local),
                         "alignment_only_mm": rmse(aligned_truth, true_local)})


def summarize(per_subject: pd.DataFrame) -> dict:
    """Means (mm) over the registered validation subjects, with n (the metric: METRIC)."""
    return {"n": int(len(per_subject)),
            **{column: float(per_subject[column].mean()) for column in per_subject.columns if column != "id"}}


def validate_methods(models: dict[str, Path], registered_npz, cohort_dir, shape_space: dict, val_fraction: float,
                     seed: int, preprocess_dir, out_dir, reference: str | None = None,
                     settings: dict | None = None) -> pd.DataFrame:
    """summary.csv (one row per model: a method, or a tuning sweep's candidate), per_subject.csv and summary.json,
    written together. With `reference` (a tuning sweep's first candidate), summary.json also holds every other
    model's paired difference from it on the same subjects, Holm-adjusted, and `settings` what each changed."""
    _, left_out = validation_ids(cohort_dir, preprocess_dir, val_fraction, seed)
    frames, rows, errors = [], [], {}
    for name, model_dir in models.items():
        per_subject = score(load_trained(model_dir), registered_npz, cohort_dir, shape_space, val_fraction, seed)
        frames.append(per_subject.assign(method=name))
        rows.append({"method": name, **summarize(per_subject)})
        errors[name] = per_subject["rmse_mm"].to_numpy()
    summary = pd.DataFrame(rows)
    record = {"metric": METRIC, "left_out": left_out, "methods": {r.pop("method"): r for r in
                                                                  summary.to_dict("records")}}
    if settings is not None:
        record["settings"] = settings
    if reference is not None:
        paired = paired_comparisons(errors, [(name, reference) for name in models if name != reference])
        record["paired"] = {"against": reference, "comparisons": json.loads(paired.to_json(orient="records"))}
    with staged(out_dir, ["summary.csv", "per_subject.csv", "summary.json"]) as staging:
        summary.to_csv(staging / "summary.csv", index=False)
        pd.concat(frames).to_csv(staging / "per_subject.csv", index=False)
        (staging / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    return summary
