"""Accuracy of predicted correspondences, with the baselines every table needs.

Errors are measured in each test scan's own (scanner) frame, where a user gets the
points: prediction and baselines alike pass through the image-only registration.

Two baselines sit beside every method: the mean-shape predictor (the training mean
shape placed in the scan by the same registration: what a network that learnt nothing
would score) and the PCA-truncation floor (the true shape projected onto the K modes
of the training shapes: the best any model predicting K scores through this basis can
do). A method's "gap closed" is how far it got from the first towards the second.

The error decomposition (`error_decomposition`) sets each method's scan-frame error beside what
its alignment alone costs: the true shape placed through the method's own alignment (the image-only
registration, or its own pose), the mean shape and the PCA floor through that alignment and the PCA
floor with the true pose; and in the world frame, the prediction's RMSE beside the world mean shape's
and the world PCA floor's (the network's own gap, free of the alignment). Scan-frame errors of
alignment and network add roughly in quadrature, so the aligned terms are yardsticks, not floors.
"Reachable gap closed" runs from the mean shape through the method's alignment (0) to the PCA floor
through it (1); gap_closed_true_pose against the true-pose floor. Each eq. 12 error has its 3D RMS
(rotation-invariant) beside it.

Methods are compared by paired differences on the same test scans, Holm-adjusted
(`paired_differences`, comparisons.py).

Every mean over test subjects comes with its 95 % bootstrap interval (`intervals`: percentile,
2000 resamples of the subjects, seed 0) and n.

`evaluate_dataset` writes results/{dataset}/evaluation/: summary.json, tables/*.csv
with tables.json (title and caption of each), the figures with figures.json, and
per_point.npz.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import staged
from .comparisons import comparison_pairs, paired_comparisons
from .evaluate_extras import capability_tables
from .intervals import bootstrap_interval, mean_interval
from .io import apply_transform, read_particles
from .layout import DatasetLayout
from .shape_space import ShapeSpace, rms3d, rmse

MEAN_SHAPE, PCA_FLOOR = "mean shape", "PCA floor"

# DeepSSM paper, Table 1: inference time for one scan (CPU, inference only; for ShapeWorks
# the optimization of a new shape, without the segmentation it needs first).
PAPER_TABLE1 = {
    "metopic": {"particles": 2048, "shapeworks_minutes": 39, "deepssm_seconds": 0.56},
    "left_atrium": {"particles": 1024, "shapeworks_minutes": 31, "deepssm_seconds": 0.28},
    "femur": {"particles": 1024, "shapeworks_minutes": 65, "deepssm_seconds": 1.25},
}
PAPER_MACHINE = "reported in the paper (Table 1): Xeon Gold 6252 CPU cluster, inference only"


def per_point_rmse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Paper's per-point RMSE_i = sqrt(((dx)^2 + (dy)^2 + (dz)^2) / 3) for each point: (..., M, 3) -> (..., M)."""
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim < 2 or pred.shape[-1] != 3:
        raise ValueError(f"per_point_rmse needs two arrays of equal shape (..., M, 3), "
                         f"got {pred.shape} and {true.shape}")
    return np.sqrt(((pred - true) ** 2).mean(axis=-1))


@dataclass
class TestCohort:
    """What evaluation needs of the test subjects (truth) and the training shapes."""

    ids: list[str]
    groups: list[str]
    true_local: np.ndarray  # (N, M, 3) scanner frame
    true_world: np.ndarray  # (N, M, 3) world frame
    true_to_world: np.ndarray  # (N, 4, 4) the shape model's image-to-world transforms
    registered_to_world: np.ndarray  # (N, 4, 4) the image-only registration's estimate
    meshes: list[str]  # true mesh per test subject, "" when the cohort has none
    train: dict  # ids, world, image_to_world, meshes of the training subjects


def _mesh_column(table: pd.DataFrame, ids) -> list[str]:
    if "mesh" not in table:
        return [""] * len(ids)
    meshes = table.set_index("id")["mesh"].astype(object).fillna("").astype(str)
    return [meshes.get(i, "") for i in ids]


def load_test_cohort(dataset_dir) -> TestCohort:
    layout = DatasetLayout(dataset_dir)
    truth = np.load(layout.shapes("test"))
    train = np.load(layout.shapes("train"))
    registered = np.load(layout.preprocessed("test"))
    subjects = pd.read_csv(layout.subjects_csv, dtype={"id": str})
    ids = [str(i) for i in truth["ids"]]
    estimated = {str(i): m for i, m in zip(registered["ids"], registered["image_to_world"])}
    missing = [i for i in ids if i not in estimated]
    if missing:
        raise ValueError(f"{layout.preprocessed('test')}: no registered image for test subject(s) {', '.join(missing)}")
    groups = subjects.set_index("id")["group"].astype(str) if "group" in subjects else pd.Series(dtype=str)
    train_ids = [str(i) for i in train["ids"]]
    return TestCohort(
        ids=ids, groups=[groups.get(i, "") for i in ids], true_local=truth["local"].astype(np.float64),
        true_world=truth["world"].astype(np.float64),
        true_to_world=truth["image_to_world"].astype(np.float64),
        registered_to_world=np.stack([estimated[i] for i in ids]).astype(np.float64),
        meshes=_mesh_column(subjects, ids),
        train={"ids": train_ids, "world": train["world"].astype(np.float64),
               "image_to_world": train["image_to_world"].astype(np.float64),
               "meshes": _mesh_column(subjects, train_ids)})


def baseline_shapes(cohort: TestCohort, shape_space: dict) -> tuple[dict[str, np.ndarray], ShapeSpace]:
    """The two baselines' shapes per test subject, in each scan's frame (N, M, 3). The PCA floor
    uses the dataset's shape space (config `shape_space`: n_modes or variance), fitted to the
    training shapes, as the workflow's PCA-based methods do."""
    space = ShapeSpace(**shape_space).fit(cohort.train["world"])
    projected = space.inverse_transform(space.transform(cohort.true_world))
    return {
        MEAN_SHAPE: np.stack([apply_transform(np.linalg.inv(t), space.mean) for t in cohort.registered_to_world]),
        PCA_FLOOR: np.stack([apply_transform(np.linalg.inv(t), p) for t, p in zip(cohort.true_to_world, projected)]),
    }, space


def read_predictions(table_path, ids, n_points: int, column: str = "local_particles") -> np.ndarray:
    """Predicted scanner-frame points (`column` world_particles: world-frame) of the given subjects, in that
    order (N, M, 3), from a predictions.csv (particle files relative to its folder)."""
    table_path = Path(table_path)
    table = pd.read_csv(table_path, dtype={"id": str}).set_index("id")
    shapes = []
    for subject in ids:
        if subject not in table.index:
            raise ValueError(f"{table_path}: no prediction for test subject {subject}")
        path = table_path.parent / table.loc[subject, column]
        points = read_particles(path)
        if points.shape != (n_points, 3):
            raise ValueError(f"{path}: subject {subject} has {len(points)} points, the cohort has {n_points}")
        if not np.isfinite(points).all():
            raise ValueError(f"{path}: subject {subject} has non-finite coordinates")
        shapes.append(points)
    return np.stack(shapes)


def rmse_against_baselines(dataset_dir, method: str, shape_space: dict) -> pd.DataFrame:
    """Per test subject: RMSE (paper eq. 12, mm) of the method's prediction, of the mean-shape
    predictor, and the PCA-truncation floor (the true shape projected on the modes of the
    dataset's shape space: the best any such linear model can do)."""
    cohort = load_test_cohort(dataset_dir)
    baselines, _ = baseline_shapes(cohort, shape_space)
    predicted = read_predictions(DatasetLayout(dataset_dir).predictions_csv(method), cohort.ids,
                                 cohort.true_local.shape[1])
    return pd.DataFrame({"id": cohort.ids, "rmse_mm": rmse(predicted, cohort.true_local),
                         "mean_shape_rmse_mm": rmse(baselines[MEAN_SHAPE], cohort.true_local),
                         "pca_floor_rmse_mm": rmse(baselines[PCA_FLOOR], cohort.true_local)})


def summarize(dataset_results, methods, shape_space: dict) -> pd.DataFrame:
    """Mean test RMSE of each trained method beside its baselines (results/{dataset} folder)."""
    layout = DatasetLayout(dataset_results)
    rows = []
    for method in methods:
        card = json.loads(layout.model_card(method).read_text())
        table = rmse_against_baselines(layout.root, method, shape_space)
        rows.append({"method": method, "rmse_mm": table["rmse_mm"].mean(),
                     "mean_shape_rmse_mm": table["mean_shape_rmse_mm"].mean(),
                     "pca_floor_rmse_mm": table["pca_floor_rmse_mm"].mean(),
                     "best_epoch": card["best_epoch"], "val_rmse_mm": card["val_rmse"]})
    return pd.DataFrame(rows)


def error_decomposition(cohort: TestCohort, predicted_local: dict, space: ShapeSpace,
                        alignments: dict | None = None) -> pd.DataFrame:
    """Per method and test subject (mm, eq. 12 unless named rms3d): the scan-frame RMSE (and its 3D RMS), the
    world-frame RMSE of the prediction (and its 3D RMS), the true shape placed through the method's alignment,
    the mean shape and the PCA floor through that alignment, the PCA floor with the true pose, and in the world
    frame the mean shape's and the PCA floor's RMSE (the world-frame yardsticks of the network's own error).
    Each method's alignment is the scan -> world transform its prediction went through: `alignments[method]`
    (N, 4, 4) for a method that aligns the scan itself (its own pose), else the image-only registration of
    preprocess/test.npz."""
    projected = space.inverse_transform(space.transform(cohort.true_world))
    pca_true_pose = np.stack([apply_transform(np.linalg.inv(t), p)
                              for t, p in zip(cohort.true_to_world, projected)])
    world_mean_shape = rmse(np.broadcast_to(space.mean, cohort.true_world.shape), cohort.true_world)
    world_pca_floor = rmse(projected, cohort.true_world)
    rows = []
    for method, local in predicted_local.items():
        to_world = (alignments or {}).get(method, cohort.registered_to_world)
        back = [np.linalg.inv(t) for t in to_world]
        world = np.stack([apply_transform(t, p) for t, p in zip(to_world, local)])
        for k, subject in enumerate(cohort.ids):
            rows.append({"method": method, "id": subject,
                         "scan_rmse_mm": float(rmse(local[k], cohort.true_local[k])),
                         "scan_rms3d_mm": float(rms3d(local[k], cohort.true_local[k])),
                         "world_rmse_mm": float(rmse(world[k], cohort.true_world[k])),
                         "world_rms3d_mm": float(rms3d(world[k], cohort.true_world[k])),
                         "true_shape_aligned_mm": float(rmse(apply_transform(back[k], cohort.true_world[k]),
                                                             cohort.true_local[k])),
                         "mean_shape_aligned_mm": float(rmse(apply_transform(back[k], space.mean),
                                                             cohort.true_local[k])),
                         "pca_floor_aligned_mm": float(rmse(apply_transform(back[k], projected[k]),
                                                            cohort.true_local[k])),
                         "pca_floor_true_pose_mm": float(rmse(pca_true_pose[k], cohort.true_local[k])),
                         "world_mean_shape_mm": float(world_mean_shape[k]),
                         "world_pca_floor_mm": float(world_pca_floor[k])})
    return pd.DataFrame(rows)


def method_alignments(layout: DatasetLayout, methods, ids: list[str]) -> dict[str, np.ndarray]:
    """The alignments (N, 4, 4, in the order of `ids`) of the methods that aligned the test scans themselves
    (their predictions' alignment.npz); a method without one went through the registration."""
    alignments = {}
    for method in methods:
        path = layout.predictions_alignment(method)
        if not path.is_file():
            continue
        with np.load(path) as found:
            by_id = {str(i): m for i, m in zip(found["ids"], found["image_to_world"])}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"{path}: no alignment for test subject(s) {', '.join(missing)}")
        alignments[method] = np.stack([by_id[i] for i in ids]).astype(np.float64)
    return alignments


def alignment_accuracy(cohort: TestCohort, alignments: dict, methods, world_centre: np.ndarray) -> pd.DataFrame:
    """Per method and test subject: how far its alignment (scan -> world: `alignments[method]`, else the
    registration) puts the mean shape's centroid from where the true transform puts it (mm, scan frame), and
    the angle (degrees) between the two rotations (a similarity's scale divided out). The registration and a
    method's own pose are measured alike, so the two ways of aligning compare directly."""
    from .localize import rotation_angle_deg

    def rotation(transforms: np.ndarray) -> np.ndarray:
        linear = transforms[:, :3, :3]
        return linear / np.cbrt(np.linalg.det(linear))[:, None, None]

    true_centre = np.stack([apply_transform(np.linalg.inv(t), world_centre[None])[0] for t in cohort.true_to_world])
    rows = []
    for method in methods:
        to_world = alignments.get(method, cohort.registered_to_world)
        centre = np.stack([apply_transform(np.linalg.inv(t), world_centre[None])[0] for t in to_world])
        angles = rotation_angle_deg(rotation(to_world), rotation(cohort.true_to_world))
        for k, subject in enumerate(cohort.ids):
            rows.append({"method": method, "id": subject, "aligned_by": "its own pose" if method in alignments
                         else "registration", "centre_error_mm": float(np.linalg.norm(centre[k] - true_centre[k])),
                         "rotation_error_deg": float(angles[k])})
    return pd.DataFrame(rows)


def alignment_summary(per_subject: pd.DataFrame) -> pd.DataFrame:
    """One row per method: n and the mean centre and rotation errors with their 95 % bootstrap intervals."""
    rows = []
    for method, table in per_subject.groupby("method", sort=False):
        row = {"method": method, "aligned_by": table["aligned_by"].iloc[0], "n": len(table)}
        for column in ("centre_error_mm", "rotation_error_deg"):
            values = table[column].to_numpy()
            low, high = mean_interval(values)
            row.update({column: float(values.mean()), f"{column}_low": low, f"{column}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


DECOMPOSED = ("scan_rmse_mm", "scan_rms3d_mm", "world_rmse_mm", "world_rms3d_mm", "true_shape_aligned_mm",
              "mean_shape_aligned_mm", "pca_floor_aligned_mm", "pca_floor_true_pose_mm", "world_mean_shape_mm",
              "world_pca_floor_mm")


def decomposition_summary(per_subject: pd.DataFrame, mean_shape_rmse: np.ndarray) -> pd.DataFrame:
    """One row per method: n, and each DECOMPOSED mean with its bootstrap interval; the mean shape's
    scan RMSE (the same subjects) with its interval; gap closed against the reachable floor (PCA
    through the method's alignment) and against the true-pose PCA floor."""
    rows = []
    mean_shape = float(np.mean(mean_shape_rmse))
    for method, table in per_subject.groupby("method", sort=False):
        row = {"method": method, "n": len(table)}
        for column in DECOMPOSED:
            values = table[column].to_numpy()
            low, high = mean_interval(values)
            row.update({column: float(values.mean()), f"{column}_low": low, f"{column}_high": high})
        low, high = mean_interval(mean_shape_rmse)
        row.update(mean_shape_rmse_mm=mean_shape, mean_shape_rmse_mm_low=low, mean_shape_rmse_mm_high=high)
        # 0 of the reachable gap: the mean shape through the method's own alignment (for a method with its own
        # pose, not the registration's mean shape)
        gaps = (("reachable_gap_closed", "scan_rmse_mm", table["mean_shape_aligned_mm"].to_numpy(),
                 "pca_floor_aligned_mm"),
                ("gap_closed_true_pose", "scan_rmse_mm", np.asarray(mean_shape_rmse), "pca_floor_true_pose_mm"),
                # the network's own gap: world frame, from the world mean shape to the world PCA floor
                ("world_gap_closed", "world_rmse_mm", table["world_mean_shape_mm"].to_numpy(), "world_pca_floor_mm"))
        for name, error, zero, floor in gaps:
            # subjects resampled together: the method's, the mean shape's and the floor's errors stay paired
            low, high = bootstrap_interval(_defined_gap_closed, table[error].to_numpy(), zero, table[floor].to_numpy())
            row.update({name: gap_closed(row[error], float(np.mean(zero)), row[floor]), f"{name}_low": low,
                        f"{name}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def _defined_gap_closed(method_rmse, mean_shape_rmse, floor_rmse) -> float:
    """gap_closed of the means; undefined (ValueError, skipped by the bootstrap) where the floor is not
    below the mean shape."""
    value = gap_closed(np.mean(method_rmse), np.mean(mean_shape_rmse), np.mean(floor_rmse))
    if np.isnan(value):
        raise ValueError("no gap to close")
    return value


def gap_closed(value: float, mean_shape: float, floor: float) -> float:
    """Fraction of the way from the mean-shape predictor's error to the PCA floor's (1 = at the floor)."""
    return float((mean_shape - value) / (mean_shape - floor)) if mean_shape > floor else float("nan")


# -- the evaluation folder of a dataset

FIGURES = ("per_point_rmse.png", "surface_boxplot.png", "surface_heatmaps.png", "error_decomposition.png")


def evaluate_dataset(dataset_dir, trained, shape_space: dict, out_dir) -> dict:
    """Every metric of the test set for each method and both baselines: RMSE (eq. 12), per-point
    RMSE on the mean shape, surface-to-surface distance of meshes rebuilt from the points, and
    inference time. Writes out_dir atomically; returns the summary."""
    layout = DatasetLayout(dataset_dir)
    anatomy = json.loads(layout.cohort_report.read_text())["anatomy"]
    cohort = load_test_cohort(layout.root)
    n_points = cohort.true_local.shape[1]
    cards = {v: json.loads(layout.model_card(v).read_text()) for v in trained}
    shapes = {v: read_predictions(layout.predictions_csv(v), cohort.ids, n_points) for v in trained}
    baselines, space = baseline_shapes(cohort, shape_space)
    n_modes = space.n_modes
    shapes.update(baselines)
    methods = list(shapes)
    point_errors = {m: per_point_rmse(s, cohort.true_local) for m, s in shapes.items()}

    per_subject = pd.DataFrame([
        {"method": m, "kind": "method" if m in trained else "baseline", "id": subject, "group": group,
         "rmse_mm": float(rmse(shapes[m][k], cohort.true_local[k]))}
        for m in methods for k, (subject, group) in enumerate(zip(cohort.ids, cohort.groups))])

    template, measured, distances, surface_maps, notes = _surface_metrics(cohort, shapes, trained)
    per_subject = per_subject.merge(distances, on=["method", "id"], how="left")

    summary_table = _summary_table(per_subject, point_errors, methods, cards)
    paired = paired_differences(per_subject, list(trained), cohort.ids)
    timing = _timing_table(layout, trained, anatomy, n_points)
    mean_surface = template.warp(space.mean) if template else None
    alignments = method_alignments(layout, trained, cohort.ids)
    decomposed = error_decomposition(cohort, {m: shapes[m] for m in trained}, space, alignments)
    aligned = alignment_summary(alignment_accuracy(cohort, alignments, trained, space.mean.mean(0)))
    decomposition = decomposition_summary(decomposed, rmse(shapes[MEAN_SHAPE], cohort.true_local))
    extra_tables, extra_notes = capability_tables(layout.root, trained, cohort.ids, cohort.true_world,
                                                  cohort.registered_to_world, _segmentation_column(layout, cohort.ids))

    outputs = ["tables", "per_point.npz", "summary.json", "figures.json", "tables.json", *FIGURES]
    with staged(out_dir, outputs) as staging:
        (staging / "tables").mkdir()
        per_subject.to_csv(staging / "tables" / "accuracy_per_subject.csv", index=False)
        summary_table.to_csv(staging / "tables" / "accuracy_summary.csv", index=False)
        paired.to_csv(staging / "tables" / "paired_differences.csv", index=False)
        timing.to_csv(staging / "tables" / "inference_time.csv", index=False)
        decomposition.to_csv(staging / "tables" / "error_decomposition.csv", index=False)
        decomposed.to_csv(staging / "tables" / "error_decomposition_per_subject.csv", index=False)
        aligned.to_csv(staging / "tables" / "alignment_accuracy.csv", index=False)
        for name, table in extra_tables.items():  # only for methods with these capabilities
            table.to_csv(staging / "tables" / f"{name}.csv", index=False)
        _decomposition_figure(decomposition, staging / "error_decomposition.png")
        np.savez(staging / "per_point.npz", mean_shape=space.mean, methods=np.array(methods),
                 mean=np.stack([point_errors[m].mean(0) for m in methods]),
                 std=np.stack([point_errors[m].std(0) for m in methods]))
        _per_point_figure(mean_surface, space.mean, point_errors, trained, summary_table,
                          staging / "per_point_rmse.png")
        if measured:
            _surface_boxplot(per_subject, methods, staging / "surface_boxplot.png")
            _surface_heatmaps(cohort, measured, per_subject, surface_maps, trained,
                              staging / "surface_heatmaps.png")
        else:
            for name in ("surface_boxplot.png", "surface_heatmaps.png"):
                _note_figure(" ".join(notes), staging / name)
        figures = _figure_entries(n_modes, template, bool(measured), trained)
        (staging / "figures.json").write_text(json.dumps(figures, indent=2))
        entries = _table_entries(n_modes, anatomy) + [e for e in EXTRA_TABLE_ENTRIES
                                                      if Path(e["file"]).stem in extra_tables]
        (staging / "tables.json").write_text(json.dumps(entries, indent=2))
        summary = {
            "anatomy": anatomy, "trained": list(trained), "n_test": len(cohort.ids), "n_points": n_points,
            "n_modes": n_modes, "template_subject": template.subject if template else None,
            "surface_measured_subjects": [cohort.ids[k] for k in measured], "notes": notes + extra_notes,
            "methods": {row["method"]: {key: _plain(value) for key, value in row.items() if key != "method"}
                        for row in summary_table.to_dict("records")},
            "error_decomposition": {row["method"]: {key: _plain(value) for key, value in row.items()
                                                    if key != "method"}
                                    for row in decomposition.to_dict("records")},
        }
        if "segmentation_dice" in extra_tables:
            summary["segmentation_dice"] = {row["method"]: {key: _plain(value) for key, value in row.items()
                                                            if key != "method"}
                                            for row in extra_tables["segmentation_dice"].to_dict("records")}
        (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def paired_differences(per_subject: pd.DataFrame, methods: list[str], ids: list[str]) -> pd.DataFrame:
    """Every method against the mean shape, then every pair of methods: the paired difference of their
    scan-frame RMSE on the same test subjects, Holm-adjusted over the table's comparisons (comparisons.py)."""
    errors = {m: table.set_index("id").loc[ids, "rmse_mm"].to_numpy(dtype=np.float64)
              for m, table in per_subject.groupby("method", sort=False)}
    table = paired_comparisons(errors, comparison_pairs(methods, [MEAN_SHAPE]))
    table.insert(2, "metric", "scan-frame RMSE, paper eq. 12 (mm)")
    return table


def _segmentation_column(layout: DatasetLayout, ids) -> dict[str, str]:
    """Each test subject's segmentation file ("" when it has none): evaluation only."""
    table = pd.read_csv(layout.subjects_csv, dtype={"id": str})
    if "segmentation" not in table:
        return {}
    files = table.set_index("id")["segmentation"].astype(object).fillna("").astype(str)
    return {i: files.get(i, "") for i in ids}


EXTRA_TABLE_ENTRIES = [
    {"file": "tables/scale_accuracy.csv", "title": "Accuracy at every scale (coarse to fine)",
     "caption": "For each method that predicts nested scales (Progressive DeepSSM): the world-frame RMSE "
                "(eq. 12, mm) of each scale's points against the true world shapes, mean over the test subjects "
                "with its 95 % bootstrap interval and n; the finest scale is the method's prediction. Each finer "
                "scale should be at least as accurate on its points as the coarser ones were on theirs."},
    {"file": "tables/segmentation_dice.csv", "title": "Segmentation of the test images (Dice)",
     "caption": "For each method with a segmentation task: Dice of its mask (probability > 0.5 on the network "
                "grid) against the test subject's true segmentation resampled through the same image-only "
                "registration as its image (fraction > 0.5), mean with its 95 % bootstrap interval and n."},
    {"file": "tables/segmentation_dice_per_subject.csv", "title": "Segmentation Dice per test subject",
     "caption": "Each test subject's Dice, with the voxel counts of the true and predicted masks."},
    {"file": "tables/scan_segmentation_dice.csv", "title": "Segmentation of the uncropped test scans (Dice)",
     "caption": "For each method that finds the anatomy itself: Dice of its mask (probability > 0.5) on each "
                "uncropped test scan's grid against the true segmentation resampled onto that grid (no "
                "registration involved), mean with its 95 % bootstrap interval and n, beside the mean of the "
                "training masks on their grids, which knows nothing of where the anatomy lies."},
    {"file": "tables/scan_segmentation_dice_per_subject.csv", "title": "Scan segmentation Dice per test subject",
     "caption": "Each test subject's Dice on its scan's grid, with the voxel counts of the true and predicted "
                "masks."},
]


def _surface_metrics(cohort: TestCohort, shapes: dict, trained):
    """Surface distances of every method's rebuilt meshes, where meshes exist: the template (or
    None), the measured test subjects' indices, a (method, id) table, the trained methods' per-vertex
    distance maps on the true meshes, and notes naming what could not be measured."""
    from .surface import read_mesh, surface_distance, template_from_training

    def table(rows):
        frame = pd.DataFrame(rows, columns=["method", "id", "surface_mean_mm", "hausdorff_mm"])
        return frame.astype({"method": str, "id": str, "surface_mean_mm": float, "hausdorff_mm": float})

    try:
        template = template_from_training(cohort.train["ids"], cohort.train["world"],
                                          cohort.train["image_to_world"], cohort.train["meshes"])
    except ValueError as error:
        if any(cohort.train["meshes"]):  # a broken mesh file is an error; no meshes at all is allowed
            raise
        note = f"Surface distance not measured: {error} (meshes are optional in a cohort)."
        return None, [], table([]), {}, [note]
    measured = [k for k, path in enumerate(cohort.meshes) if path]
    notes = []
    if not measured:
        notes.append("Surface distance not measured: no test subject has a true mesh.")
    elif len(measured) < len(cohort.ids):
        unmeasured = [s for k, s in enumerate(cohort.ids) if k not in measured]
        notes.append(f"Surface distance not measured for test subject(s) without a true mesh: {', '.join(unmeasured)}.")
    true_meshes = {k: read_mesh(cohort.meshes[k], cohort.ids[k]) for k in measured}
    rows, maps = [], {}
    for method, points in shapes.items():
        for k in measured:
            distance = surface_distance(template.warp(points[k]), true_meshes[k])
            rows.append([method, cohort.ids[k], distance.mean_mm, distance.hausdorff_mm])
            if method in trained:
                maps[method, k] = distance.from_true
    return template, measured, table(rows), maps, notes


def _plain(value):
    """JSON-friendly scalar: NaN and missing become null."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    return value.item() if isinstance(value, np.generic) else value


def _summary_table(per_subject: pd.DataFrame, point_errors: dict, methods, cards: dict) -> pd.DataFrame:
    grouped = per_subject.groupby("method", sort=False)
    means = grouped[["rmse_mm", "surface_mean_mm", "hausdorff_mm"]].mean()
    sds = grouped[["rmse_mm", "surface_mean_mm"]].std()
    rows = []
    for m in methods:
        low, high = mean_interval(per_subject.loc[per_subject["method"] == m, "rmse_mm"])
        rows.append({
            "method": m, "kind": "method" if m in cards else "baseline", "n": int(grouped.size()[m]),
            "rmse_mm": means.loc[m, "rmse_mm"], "rmse_low_mm": low, "rmse_high_mm": high,
            "rmse_sd_mm": sds.loc[m, "rmse_mm"],
            "gap_closed": gap_closed(means.loc[m, "rmse_mm"], means.loc[MEAN_SHAPE, "rmse_mm"],
                                     means.loc[PCA_FLOOR, "rmse_mm"]),
            "worst_point_rmse_mm": float(point_errors[m].mean(0).max()),
            "surface_mean_mm": means.loc[m, "surface_mean_mm"], "surface_sd_mm": sds.loc[m, "surface_mean_mm"],
            "hausdorff_mm": means.loc[m, "hausdorff_mm"],
            "best_epoch": cards[m]["best_epoch"] if m in cards else None,
            "val_rmse_mm": cards[m]["val_rmse"] if m in cards else None,
        })
    table = pd.DataFrame(rows)
    table["best_epoch"] = table["best_epoch"].astype("Int64")  # integers, empty for the baselines
    return table


def _timing_table(layout: DatasetLayout, trained, anatomy: str, n_points: int) -> pd.DataFrame:
    rows = []
    for v in trained:
        table = pd.read_csv(layout.predictions_csv(v))
        rows.append({"method": v, "source": "this run (predict rule, CPU), mean over the test scans",
                     "particles": n_points, "registration_resampling_s": table["preprocess_seconds"].mean(),
                     "network_s": table["network_seconds"].mean(), "per_scan_s": table["seconds_per_scan"].mean()})
    paper = PAPER_TABLE1.get(anatomy)
    if paper:
        rows.append({"method": "Base-DeepSSM", "source": PAPER_MACHINE, "particles": paper["particles"],
                     "registration_resampling_s": np.nan, "network_s": paper["deepssm_seconds"],
                     "per_scan_s": paper["deepssm_seconds"]})
        rows.append({"method": "ShapeWorks", "source": PAPER_MACHINE + " (needs a segmentation first)",
                     "particles": paper["particles"], "registration_resampling_s": np.nan, "network_s": np.nan,
                     "per_scan_s": paper["shapeworks_minutes"] * 60.0})
    return pd.DataFrame(rows)


def _figure_entries(n_modes: int, template, surface: bool, trained) -> list[dict]:
    on = f"the mean training shape (subject {template.subject}'s mesh warped onto it)" if template else \
        "the mean training shape's points (the cohort has no meshes)"
    entries = [{"file": "error_decomposition.png", "title": "Where the error comes from: alignment and network",
                "caption": "Per method, the mean scan-frame RMSE (bar end, with its 95 % bootstrap interval) split "
                           "into what the alignment alone costs (true shape through the method's alignment), what "
                           f"the {n_modes}-mode PCA adds after it (the reachable floor), and what is left to the "
                           "network; the dashed line is the mean shape, with its interval shaded. A method whose "
                           "bar ends near its reachable floor is limited by its alignment, not its network."},
               {"file": "per_point_rmse.png", "title": "Per-point RMSE on the mean shape",
                "caption": f"Mean (top) and standard deviation (bottom) over the test subjects of each point's "
                           f"RMSE on {on}, per trained method and for the mean-shape predictor and the PCA floor "
                           f"({n_modes} modes), average eq. 12 RMSE below: look for where the methods' error "
                           f"concentrates (colours saturate at the methods' largest value)."}]
    if surface:
        entries += [
            {"file": "surface_boxplot.png", "title": "Surface-to-surface distance per test subject",
             "caption": "Symmetric mean distance (mm) between each true mesh and the mesh rebuilt from the "
                        "predicted points (one dot per test subject; black median, purple dashed mean): a "
                        "method's box should sit well below the mean-shape predictor and near the PCA floor."},
            {"file": "surface_heatmaps.png", "title": "Surface distance on the best, median and worst test subjects",
             "caption": f"Each true mesh coloured by its distance (mm) to the mesh rebuilt from the prediction, "
                        f"one row per trained method ({', '.join(trained)}) ranked by that method's mean surface "
                        f"distance: look for errors at thin or variable structures rather than everywhere."},
        ]
    return entries


def _table_entries(n_modes: int, anatomy: str) -> list[dict]:
    paper = "beside the paper's Table 1 figures, labelled as reported" if anatomy in PAPER_TABLE1 else \
        "(the paper reports no time for this anatomy)"
    return [
        {"file": "tables/error_decomposition.csv", "title": "Where the error comes from: alignment and network",
         "caption": "Per method, means over the test subjects (mm; paper eq. 12, with the rotation-invariant 3D RMS "
                    "as *_rms3d_mm) with 95 % bootstrap intervals (_low, _high) and n. Scan frame: the method's "
                    "RMSE; true_shape_aligned_mm is the true shape placed through the method's own alignment (the "
                    "registration, or its own pose): what the alignment alone costs; the mean shape and the PCA "
                    f"floor through that alignment and with the true pose ({n_modes} modes). Scan-frame errors of "
                    "alignment and network add roughly in quadrature, so the aligned terms are not floors a network "
                    "that followed the misaligned crop could not beat. reachable_gap_closed: from the mean shape "
                    "through the alignment (0) to the PCA floor through it (1). World frame: the prediction's "
                    "RMSE against the world mean shape's and the world PCA floor's; world_gap_closed is the "
                    "network's own gap, free of the alignment."},
        {"file": "tables/error_decomposition_per_subject.csv", "title": "Error decomposition per test subject",
         "caption": "The decomposition's terms for every method and test subject."},
        {"file": "tables/alignment_accuracy.csv", "title": "How well each method's alignment placed the scans",
         "caption": "Per method, the alignment its prediction went through (the image-only registration, or the "
                    "pose a method that localizes the anatomy found itself): mean over the test subjects, with 95 % "
                    "bootstrap intervals and n, of the distance (mm, scan frame) between where it and the true "
                    "transform put the mean shape's centroid, and of the angle (degrees) between their rotations."},
        {"file": "tables/paired_differences.csv", "title": "Paired differences between methods, Holm-adjusted",
         "caption": "Per comparison, the mean over the test subjects of method minus `against` (scan-frame RMSE, eq. "
                    "12, mm; negative: the method's error is lower), with its percentile bootstrap interval over the "
                    "subjects at the level of the Holm step that decided it (interval_level), the exact two-sided "
                    "sign-flip p (paired randomisation over the subjects) and Holm's adjusted p over every "
                    "comparison in the table. A method beats another only where Holm rejects and that interval "
                    "lies below 0."},
        {"file": "tables/accuracy_summary.csv", "title": "Test accuracy per trained method and baselines",
         "caption": f"Means over the test subjects (mm, scanner frame) of the eq. 12 RMSE, with its 95 % "
                    f"bootstrap interval (rmse_low_mm, rmse_high_mm) and n, and of the surface distances, where "
                    f"gap_closed says how far a method got from the mean-shape predictor (0) towards the PCA "
                    f"floor with {n_modes} modes and the true pose (1)."},
        {"file": "tables/accuracy_per_subject.csv", "title": "Accuracy per test subject",
         "caption": "Every test subject's RMSE and surface distances for each method and baseline."},
        {"file": "tables/inference_time.csv", "title": "Inference time per scan",
         "caption": f"Seconds per test scan in this run (image-only registration and resampling, then the "
                    f"network), {paper}."},
    ]


# -- figures (one look: plotting.py)

def _colorbar(fig, axes, top: float, label: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from .plotting import HEAT_CMAP

    fig.colorbar(ScalarMappable(Normalize(0.0, top), cmap=HEAT_CMAP), ax=list(np.ravel(axes)), shrink=0.8,
                 label=label)


def _decomposition_figure(decomposition: pd.DataFrame, path) -> None:
    from .plotting import figure, save_figure

    fig, axes = figure(1, 1, cell=(6.5, 0.55 * len(decomposition) + 1.6))
    ax = axes[0, 0]
    y = np.arange(len(decomposition))[::-1]
    alignment = decomposition["true_shape_aligned_mm"].to_numpy()
    reachable = np.maximum(decomposition["pca_floor_aligned_mm"].to_numpy(), alignment)
    total = decomposition["scan_rmse_mm"].to_numpy()
    ax.barh(y, alignment, color="#bbbbbb", label="the true shape through the alignment")
    ax.barh(y, reachable - alignment, left=alignment, color="#77aadd", label="+ PCA truncation (reachable floor)")
    ax.barh(y, np.maximum(total - reachable, 0), left=reachable, color="#ee8866", label="+ network")
    errors = np.stack([total - decomposition["scan_rmse_mm_low"], decomposition["scan_rmse_mm_high"] - total])
    ax.errorbar(total, y, xerr=np.nan_to_num(errors), fmt="none", color="black", capsize=3)
    mean_shape = decomposition["mean_shape_rmse_mm"].iloc[0]
    ax.axvline(mean_shape, color="black", linestyle="--", linewidth=1, label="mean shape")
    low, high = decomposition["mean_shape_rmse_mm_low"].iloc[0], decomposition["mean_shape_rmse_mm_high"].iloc[0]
    if np.isfinite(low):
        ax.axvspan(low, high, color="0.85", zorder=0)
    ax.set_yticks(y, decomposition["method"])
    ax.set_xlabel(f"scan-frame RMSE (mm, eq. 12), n = {int(decomposition['n'].iloc[0])} test subjects")
    ax.legend(frameon=False, fontsize=7, loc="lower right")
    save_figure(fig, path)


def _per_point_figure(mean_surface, mean_points, point_errors: dict, trained, summary: pd.DataFrame, path) -> None:
    import pyvista as pv

    from .plotting import figure, render_heatmap, save_figure
    from .surface import values_at_vertices

    methods = list(point_errors)
    shown = mean_surface if mean_surface is not None else pv.PolyData(np.asarray(mean_points))
    average = summary.set_index("method")["rmse_mm"]
    fig, axes = figure(2, len(methods), cell=(2.3, 2.5))
    for row, (name, statistic) in enumerate((("mean", np.mean), ("standard deviation", np.std))):
        values = {m: statistic(point_errors[m], axis=0) for m in methods}
        top = max(float(values[v].max()) for v in trained) or 1.0
        for col, m in enumerate(methods):
            scalars = values[m] if mean_surface is None else \
                values_at_vertices(shown.points, mean_points, values[m])
            ax = axes[row, col]
            ax.imshow(render_heatmap(shown, scalars, (0.0, top)))
            ax.set_axis_off()
            if row == 0:
                ax.set_title(m)
            else:
                ax.text(0.5, -0.04, f"RMSE {average[m]:.2f} mm", transform=ax.transAxes, ha="center", va="top")
        axes[row, 0].text(-0.08, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, ha="right", va="center")
        _colorbar(fig, axes[row], top, "per-point RMSE (mm)")
    save_figure(fig, path)


def _surface_boxplot(per_subject: pd.DataFrame, methods, path) -> None:
    from .plotting import POINT_COLOR, figure, save_figure

    fig, axes = figure(1, 1, cell=(max(4.0, 1.1 * len(methods)), 3.2))
    ax = axes[0, 0]
    data = [per_subject.loc[per_subject["method"] == m, "surface_mean_mm"].dropna().to_numpy() for m in methods]
    ax.boxplot(data, showmeans=True, meanline=True, showfliers=False,
               medianprops={"color": "black"}, meanprops={"color": "purple", "linestyle": "--"})
    jitter = np.random.default_rng(0)
    for position, values in enumerate(data, start=1):
        ax.scatter(position + jitter.uniform(-0.12, 0.12, len(values)), values, s=10, color=POINT_COLOR, zorder=3)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=20)
    ax.set_ylabel("surface-to-surface distance (mm)")
    ax.set_ylim(bottom=0)
    save_figure(fig, path)


def _ranked_picks(order: list[int]) -> list[tuple[str, int]]:
    """Best, median and worst of subjects ranked best first; each subject shown once."""
    picks, seen = [], set()
    for label, position in (("best", 0), ("median", (len(order) - 1) // 2), ("worst", len(order) - 1)):
        if order[position] not in seen:
            seen.add(order[position])
            picks.append((label, order[position]))
    return picks


def _surface_heatmaps(cohort: TestCohort, measured, per_subject, surface_maps: dict, trained, path) -> None:
    from .plotting import figure, render_heatmap, save_figure
    from .surface import read_mesh

    scores = per_subject.set_index(["method", "id"])["surface_mean_mm"]
    picks = {v: _ranked_picks(sorted(measured, key=lambda k: scores[v, cohort.ids[k]])) for v in trained}
    top = max(float(surface_maps[v, k].max()) for v in trained for _, k in picks[v]) or 1.0
    columns = max(len(p) for p in picks.values())
    fig, axes = figure(len(trained), columns, cell=(3.0, 2.7))
    world_meshes = {}
    for row, v in enumerate(trained):
        for col in range(columns):
            axes[row, col].set_axis_off()
        for col, (label, k) in enumerate(picks[v]):
            if k not in world_meshes:  # display in the world frame: one pose for every subject
                mesh = read_mesh(cohort.meshes[k])
                mesh.points = apply_transform(cohort.true_to_world[k], np.asarray(mesh.points, dtype=np.float64))
                world_meshes[k] = mesh
            ax = axes[row, col]
            ax.imshow(render_heatmap(world_meshes[k], surface_maps[v, k], (0.0, top)))
            ax.set_title(f"{v}: {label}\n{cohort.ids[k]} ({scores[v, cohort.ids[k]]:.2f} mm)")
    _colorbar(fig, axes, top, "distance to the rebuilt mesh (mm)")
    save_figure(fig, path)


def _note_figure(text: str, path) -> None:
    """A figure that says why there is nothing to show (kept so that the declared output exists)."""
    import textwrap

    from .plotting import figure, save_figure

    fig, axes = figure(1, 1, cell=(5.0, 1.6))
    axes[0, 0].set_axis_off()
    axes[0, 0].text(0.5, 0.5, textwrap.fill(text, 70), ha="center", va="center", transform=axes[0, 0].transAxes)
    save_figure(fig, path)
