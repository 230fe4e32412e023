"""Evaluation of a multi-anatomy method (massm) per anatomy on `multi_scans`'s test scans, beside its
baselines (the MASSM paper's Figs 2-3). It scores what `predict_multi` delivered (its predictions.csv and
particle files), not a second run of the network: an anatomy the detector did not pass has no prediction, so
the prediction's errors are over the scans where it was detected (n_predicted), and the template baselines
over every scan that has the anatomy.

* detection: of the scans that have the anatomy, the fraction where the heatmap's peak passed the
  threshold; of those that lack it, the fraction falsely detected; the detected centre's error (mm)
  against the particles' box centre;
* local (scan-frame) RMSE (eq. 12) of the prediction, against the anatomy's template placed at the
  detected centre (what the displacement head adds) and at the true centre (the template's floor with
  a perfect detector);
* world RMSE of the prediction against the template's world shape (the shape known without the scan);
* misses counted: over every scan that has the anatomy, the prediction's error where it was detected
  and, where it was missed, the error of what a user is left with: the template placed at the
  detector's peak below threshold (local; it always reports one) and the template's world shape
  (world). So a detector that passes only its easy scans does not look better than one that passes all
  (local_rmse_misses_counted_mm, world_rmse_misses_counted_mm);
* with the ingested cohort's meshes (`cohort_dir`), the symmetric mean surface distance of each anatomy's
  template mesh (its training subject nearest the mean) carried by a thin-plate spline onto the predicted
  particles, to the true mesh: local (scanner frame) and world (the true mesh through its transform), the
  paper's Figs 2b and 3b.

Every mean has its 95 % bootstrap interval and n. Writes per_scan.csv (one row per scan and anatomy),
summary.csv, rmse_boxplots.png and best_worst.png (the paper's Fig. 4: per anatomy, the test scans of
lowest and highest local RMSE, a slice through the true centre with the anatomy's heatmap, the true
and the predicted particles near the slice) into `out_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .atomic import staged
from .inference import load_trained
from .intervals import bootstrap_interval, mean_interval
from .io import read_particles
from .shape_space import rmse

LOCAL_COLUMNS = {"local_rmse_mm": "prediction", "template_at_detection_mm": "template at detection",
                 "template_at_true_centre_mm": "template at true centre"}
WORLD_COLUMNS = {"world_rmse_mm": "prediction", "template_world_mm": "template's world shape"}
MISSES_COUNTED = ("local_rmse_misses_counted_mm", "world_rmse_misses_counted_mm")  # every scan with the anatomy
SURFACE_COLUMNS = {"local_surface_mm": "local", "template_at_detection_surface_mm": "template at detection",
                   "world_surface_mm": "world", "template_world_surface_mm": "template's world shape"}


def delivered(predictions_dir, test, anatomies: list[str], n_points: int) -> dict:
    """What predict_multi wrote for the test scans, in the scan grid's frame (the test npz's): per scan and
    anatomy, detected, peak, box centre, local and world particles (nan where not detected) and the network's
    seconds. Every (scan, anatomy) must have exactly one row."""
    folder = Path(predictions_dir)
    table = pd.read_csv(folder / "predictions.csv", dtype={"id": str, "anatomy": str, "world_particles": str,
                                                            "local_particles": str}, keep_default_na=False)
    keys = list(zip(table["id"], table["anatomy"]))
    wanted = [(str(i), a) for i in test["ids"] for a in anatomies]
    if sorted(keys) != sorted(wanted):
        missing, extra = sorted(set(wanted) - set(keys)), sorted(set(keys) - set(wanted))
        raise ValueError(f"{folder / 'predictions.csv'}: its rows are not one per test scan and anatomy of the "
                         f"scans' test.npz (missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"{len(keys) - len(set(keys))} repeated): rerun predict_multi")
    rows = table.set_index(["id", "anatomy"])
    shape = (len(test["ids"]), len(anatomies))
    found = {"present": np.zeros(shape, bool), "peak": np.zeros(shape), "centre_mm": np.zeros(shape + (3,)),
             "local": np.full(shape + (n_points, 3), np.nan), "world": np.full(shape + (n_points, 3), np.nan),
             "network_seconds": np.zeros(len(test["ids"]))}
    for n, subject in enumerate(str(i) for i in test["ids"]):
        origin = np.asarray(test["origins"][n], dtype=np.float64)
        for k, anatomy in enumerate(anatomies):
            row = rows.loc[(subject, anatomy)]
            found["present"][n, k] = str(row["detected"]).lower() == "true"
            found["peak"][n, k] = float(row["peak"])
            found["centre_mm"][n, k] = [float(row[f"centre_{axis}_mm"]) for axis in "xyz"] - origin
            found["network_seconds"][n] = float(row["network_seconds"])
            if found["present"][n, k]:
                found["local"][n, k] = read_particles(folder / row["local_particles"]) - origin
                found["world"][n, k] = read_particles(folder / row["world_particles"])
    return found


def evaluate_multi(model_dir, scans_dir, predictions_dir, out_dir, threads: int = 1, cohort_dir=None
                   ) -> pd.DataFrame:
    """per_scan.csv, summary.csv, rmse_boxplots.png and best_worst.png of the module's doc; returns the summary.
    Surface distances need `cohort_dir` (ingest_multi's folder) and meshes there; without, their columns are nan."""
    torch.set_num_threads(max(1, threads))
    scans_dir = Path(scans_dir)
    meta = json.loads((scans_dir / "grid.json").read_text())
    test = np.load(scans_dir / "test.npz")
    model = load_trained(model_dir).model.eval()  # its templates, and its heatmaps for the figure
    anatomies, m = meta["anatomies"], meta["n_points"]
    found = delivered(predictions_dir, test, anatomies, m)
    local = test["local"].reshape(len(test["ids"]), len(anatomies), m, 3).astype(np.float64)
    world = test["world"].reshape(local.shape).astype(np.float64)
    template_local = model.template_local.numpy().astype(np.float64)
    template_world = model.template_world.numpy().astype(np.float64)

    rows = []
    for n, subject in enumerate(test["ids"]):
        for k, anatomy in enumerate(anatomies):
            row = {"id": str(subject), "anatomy": anatomy, "present": bool(test["present"][n, k]),
                   "detected": bool(found["present"][n, k]), "peak": float(found["peak"][n, k]),
                   "network_seconds": float(found["network_seconds"][n])}
            if row["present"]:
                truth = local[n, k]
                true_centre = (truth.max(0) + truth.min(0)) / 2
                centre = found["centre_mm"][n, k]
                row.update({
                    "centre_error_mm": float(np.linalg.norm(centre - true_centre)),
                    "template_at_detection_mm": float(rmse(template_local[k] + centre, truth)),
                    "template_at_true_centre_mm": float(rmse(template_local[k] + true_centre, truth)),
                    "template_world_mm": float(rmse(template_world[k], world[n, k])),
                    # nothing delivered where not detected: no error, rather than the error of what was not given
                    "local_rmse_mm": float(rmse(found["local"][n, k], truth)) if row["detected"] else np.nan,
                    "world_rmse_mm": float(rmse(found["world"][n, k], world[n, k])) if row["detected"] else np.nan,
                })
                # a miss counts with what is left without a detection (the module's doc)
                row["local_rmse_misses_counted_mm"] = (row["local_rmse_mm"] if row["detected"]
                                                       else row["template_at_detection_mm"])
                row["world_rmse_misses_counted_mm"] = (row["world_rmse_mm"] if row["detected"]
                                                       else row["template_world_mm"])
            rows.append(row)
    per_scan = pd.DataFrame(rows)
    surfaces = (_surface_distances(Path(cohort_dir), anatomies, test, found, template_local, template_world)
                if cohort_dir else {})
    for column in SURFACE_COLUMNS:
        per_scan[column] = [surfaces.get((str(row.id), row.anatomy), {}).get(column, np.nan)
                            for row in per_scan.itertuples()]
    summary = pd.DataFrame([_summary(anatomy, per_scan[per_scan["anatomy"] == anatomy]) for anatomy in anatomies])
    with staged(out_dir, ["per_scan.csv", "summary.csv", "rmse_boxplots.png", "best_worst.png"]) as staging:
        per_scan.to_csv(staging / "per_scan.csv", index=False)
        summary.to_csv(staging / "summary.csv", index=False)
        _boxplots(per_scan, anatomies, staging / "rmse_boxplots.png")
        _best_worst(model, test, per_scan, anatomies, local, found["local"], float(meta["spacing_mm"]),
                    staging / "best_worst.png")
    return summary


def _surface_distances(cohort_dir: Path, anatomies: list[str], test, found: dict, template_local: np.ndarray,
                       template_world: np.ndarray) -> dict:
    """{(id, anatomy): {column of SURFACE_COLUMNS: distance}} for the test scans whose anatomy has a true mesh,
    the prediction's and its template baselines'; an anatomy without training meshes is left out (meshes are
    optional in a cohort)."""
    from .io import apply_transform
    from .surface import read_mesh, surface_distance, template_from_training

    subjects = pd.read_csv(cohort_dir / "subjects.csv", dtype=str, keep_default_na=False).set_index("id")
    ids = [str(i) for i in test["ids"]]
    out = {}
    for k, anatomy in enumerate(anatomies):
        column = f"mesh_{anatomy}"
        if column not in subjects or not subjects[column].ne("").any():
            continue
        train = np.load(cohort_dir / f"shapes_train_{anatomy}.npz")
        template = template_from_training(train["ids"], train["world"], train["image_to_world"],
                                          [subjects.loc[str(i), column] for i in train["ids"]])
        shapes = np.load(cohort_dir / f"shapes_test_{anatomy}.npz")
        transforms = {str(i): t for i, t in zip(shapes["ids"], shapes["image_to_world"])}
        for n, subject in enumerate(ids):
            path = subjects.loc[subject, column]
            if subject not in transforms or not path:
                continue
            true = read_mesh(path, subject)
            true_world = true.copy()
            true_world.points = apply_transform(transforms[subject], np.asarray(true.points, dtype=np.float64))
            origin = np.asarray(test["origins"][n], dtype=np.float64)
            at_detection = template_local[k] + found["centre_mm"][n, k] + origin
            out[subject, anatomy] = {
                "template_at_detection_surface_mm": surface_distance(template.warp(at_detection), true).mean_mm,
                "template_world_surface_mm": surface_distance(template.warp(template_world[k]), true_world).mean_mm}
            if found["present"][n, k]:  # a prediction was delivered
                out[subject, anatomy].update({
                    "local_surface_mm": surface_distance(template.warp(found["local"][n, k] + origin), true).mean_mm,
                    "world_surface_mm": surface_distance(template.warp(found["world"][n, k]), true_world).mean_mm})
    return out


def _rate(flags: pd.Series) -> tuple[float, float, float]:
    values = flags.to_numpy(dtype=np.float64)
    if not len(values):
        return float("nan"), float("nan"), float("nan")
    return (float(values.mean()), *bootstrap_interval(np.mean, values))


def _summary(anatomy: str, rows: pd.DataFrame) -> dict:
    present = rows[rows["present"]]
    absent = rows[~rows["present"]]
    out = {"anatomy": anatomy, "n_present": len(present), "n_absent": len(absent)}
    for name, values in (("detection_rate", present["detected"]), ("false_detection_rate", absent["detected"])):
        out[name], out[f"{name}_low"], out[f"{name}_high"] = _rate(values)
    for column in ("centre_error_mm", *LOCAL_COLUMNS, *WORLD_COLUMNS, *SURFACE_COLUMNS, *MISSES_COUNTED):
        values = present[column].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]  # a prediction's errors: the scans where one was delivered
        out[column] = float(values.mean()) if len(values) else float("nan")
        out[f"{column}_low"], out[f"{column}_high"] = mean_interval(values)
    out["n_predicted"] = int(present["detected"].astype(bool).sum())
    out["n_surface"] = int(np.isfinite(present["local_surface_mm"].to_numpy(dtype=np.float64)).sum())
    # on the same scans: those with a prediction
    predicted = present[present["detected"].astype(bool)]
    out["beats_template_at_detection"] = bool(len(predicted)) and bool(
        predicted["local_rmse_mm"].mean() < predicted["template_at_detection_mm"].mean())
    out["beats_template_world"] = bool(len(predicted)) and bool(
        predicted["world_rmse_mm"].mean() < predicted["template_world_mm"].mean())
    return out


def _wrapped(label: str) -> str:
    return label.replace(" at ", "\nat ").replace("'s world", "'s\nworld")


def _boxplots(per_scan: pd.DataFrame, anatomies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(anatomies), figsize=(3.6 * len(anatomies), 9.4), squeeze=False)
    for k, anatomy in enumerate(anatomies):
        present = per_scan[(per_scan["anatomy"] == anatomy) & per_scan["present"]]
        panels = ((LOCAL_COLUMNS, "local (scan frame)", "RMSE (eq. 12), mm"),
                  (WORLD_COLUMNS, "world", "RMSE (eq. 12), mm"),
                  (SURFACE_COLUMNS, "surface distance", "mean surface distance, mm"))
        for row, (columns, frame, unit) in enumerate(panels):
            ax = axes[row, k]
            values = [(label, present[c].to_numpy(dtype=np.float64)) for c, label in columns.items()]
            values = [(label, v[np.isfinite(v)]) for label, v in values]
            drawn = [(label, v) for label, v in values if len(v)]
            title = f"{anatomy}: {frame}"
            if not drawn:  # said, not drawn empty
                ax.set_title(title, fontsize=9)
                ax.text(0.5, 0.5, "not measured (no meshes)" if row == 2 and len(present) else
                        "no test scan has it" if not len(present) else "nothing delivered", ha="center",
                        va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            missing = [label for label, v in values if not len(v)]  # the prediction, where never detected
            ax.set_title(title + (f"\n{', '.join(missing)}: none delivered" if missing else ""), fontsize=9)
            ax.boxplot([v for _, v in drawn], showmeans=True)
            ax.set_xticks(range(1, len(drawn) + 1),
                          [_wrapped(label) + f"\nn = {len(v)}" for label, v in drawn], fontsize=7)
            ax.set_ylabel(unit)
    fig.suptitle("Per-anatomy RMSE and surface distance of the test scans (box: quartiles; triangle: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _best_worst(model, test, per_scan: pd.DataFrame, anatomies: list[str], truth: np.ndarray, predicted: np.ndarray,
                spacing: float, path: Path) -> None:
    """Per anatomy, its best and worst test scans by local RMSE: the coronal (x, z) slice through the true box
    centre, the anatomy's heatmap over it, true (green) and predicted (red) particles within 2 voxels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(anatomies), 2, figsize=(9, 2.6 * len(anatomies)), squeeze=False)
    for k, anatomy in enumerate(anatomies):
        rows = per_scan[(per_scan["anatomy"] == anatomy) & per_scan["present"]]
        rows = rows[np.isfinite(rows["local_rmse_mm"].to_numpy(dtype=np.float64))]
        for column, pick in enumerate(("idxmin", "idxmax")):
            ax = axes[k, column]
            ax.set_axis_off()
            if rows.empty:
                ax.set_title(f"{anatomy}: no prediction (no test scan has it, or none detected it)", fontsize=8)
                continue
            n = int(np.flatnonzero(test["ids"] == rows.loc[getattr(rows["local_rmse_mm"], pick)(), "id"])[0])
            points = truth[n, k]
            y = int(round(((points.max(0) + points.min(0)) / 2)[1] / spacing))
            image = test["images"][n]
            with torch.no_grad():
                heatmap = torch.sigmoid(model.detector(torch.as_tensor(image[None, None]))[0][0, k]).numpy()
            cells = heatmap[:, min(y // 2, heatmap.shape[1] - 1), :]
            extent = (-0.5 * spacing, (image.shape[2] - 0.5) * spacing, -0.5 * spacing,
                      (image.shape[0] - 0.5) * spacing)  # superior up
            ax.imshow(image[:, y, :], cmap="gray", extent=extent, origin="lower")
            ax.imshow(cells, cmap="magma", alpha=0.45, extent=extent, origin="lower", vmin=0, vmax=1)
            for shape, colour in ((points, "lime"), (predicted[n, k], "red")):
                near = np.abs(shape[:, 1] - y * spacing) < 2 * spacing
                ax.scatter(shape[near, 0], shape[near, 2], s=3, c=colour)
            row = rows[rows["id"] == str(test["ids"][n])].iloc[0]
            ax.set_title(f"{anatomy}, {'best' if pick == 'idxmin' else 'worst'}: {row['id']}, local RMSE "
                         f"{row['local_rmse_mm']:.2f} mm, peak {row['peak']:.2f}", fontsize=8)
    fig.suptitle("Best and worst test scans per anatomy: heatmap (magma), true (green) and predicted (red) particles")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
