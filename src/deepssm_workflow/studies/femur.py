"""Cam-FAI group difference on the femur (paper sec. 4.2, Figs. 9, 10), plus significance.

Group difference mu_cam - mu_control of the world-frame shapes, shown on the mean cam
shape with arrows (direction) and the normalized magnitude. Sources: `ground_truth`
and each method on the test subjects (the only ones with predictions, so the maps
are comparable), and `ground_truth_all` on every subject, train and test, as the paper
computes its Fig. 9. Each source's map is compared with the ground truth's on the same
subjects (`map_correlation`: Pearson correlation of the two flattened difference fields).

Beyond the paper: at every point a two-sample Hotelling T^2 of the 3D positions with a
permutation p-value and Benjamini-Hochberg FDR q-value, for every source with enough
subjects for an invertible pooled covariance (n_cam + n_control >= 5).

Latent swim (Fig. 10): control mean to cam mean in the latent space of each method that has one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..surface import values_at_vertices
from . import figures as fig
from .data import Cohort, Shapes, trained_model
from .output import StudyOutput
from .stats import pearson, permutation_hotelling
from .swim import latent_swim, swim_figure

GROUPS = ("control", "cam")
Q_LEVEL = 0.05


def group_difference(world: np.ndarray, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu_cam, mu_cam - mu_control), each (M, 3)."""
    cam = np.asarray(cam, dtype=bool)
    if cam.all() or not cam.any():
        raise ValueError(f"a group difference needs both groups; got {cam.sum()} cam and {(~cam).sum()} control")
    return world[cam].mean(0), world[cam].mean(0) - world[~cam].mean(0)


def run(cohort: Cohort, sources: dict[str, Shapes], out_dir: Path, latent_methods=(), seed: int = 0) -> StudyOutput:
    out = StudyOutput()
    group = cohort.subjects["group"].astype(str)
    unknown = sorted(set(group) - set(GROUPS))
    if unknown:
        raise ValueError(f"{cohort.table_path}: femur groups are {', '.join(GROUPS)}; found {unknown[0]!r}")
    sources = {"ground_truth_all": cohort.all, **sources}
    template = cohort.template_mesh()

    differences, rows, point_rows = {}, [], []
    for source, shapes in sources.items():
        cam = group[shapes.ids].to_numpy() == "cam"
        result = out.attempt(f"{source} group difference", lambda: group_difference(shapes.world, cam))
        row = {"source": source, "n_control": int((~cam).sum()), "n_cam": int(cam.sum())}
        if result is not None:
            mean_cam, difference = result
            differences[source] = (mean_cam, difference)
            magnitude = np.linalg.norm(difference, axis=1)
            row.update(peak_difference_mm=float(magnitude.max()), peak_point=int(magnitude.argmax()),
                       mean_difference_mm=float(magnitude.mean()))
            test = out.attempt(f"{source} Hotelling T^2", lambda: permutation_hotelling(shapes.world, cam, seed=seed))
            if test is not None:
                row.update(n_significant_points=int((test["q"] < Q_LEVEL).sum()), test_method=test["method"],
                           min_q=float(test["q"].min()))
                differences[source] += (test["q"],)
            point_rows.append(pd.DataFrame({"source": source, "point": np.arange(len(magnitude)),
                                            "dx": difference[:, 0], "dy": difference[:, 1], "dz": difference[:, 2],
                                            "magnitude_mm": magnitude,
                                            "q": test["q"] if test is not None else np.nan}))
        rows.append(row)
    reference = differences.get("ground_truth")
    for row in rows:
        if row["source"] not in ("ground_truth", "ground_truth_all") and row["source"] in differences and reference:
            row["map_correlation"] = out.attempt(
                f"{row['source']} map correlation",
                lambda: pearson(differences[row["source"]][1].ravel(), reference[1].ravel()))
        out.summary[row["source"]] = {k: v for k, v in row.items() if k != "source"}
    out.tables["femur_group_difference"] = pd.DataFrame(rows)
    if point_rows:
        out.tables["femur_group_difference_points"] = pd.concat(point_rows, ignore_index=True)

    if differences:
        images, names = [], []
        for source, (mean_cam, difference, *_) in differences.items():
            mesh = template.warp(mean_cam)
            magnitude = np.linalg.norm(fig.vectors_at_vertices(mesh, mean_cam, difference), axis=1)
            images.append(fig.render(mesh, magnitude / max(magnitude.max(), 1e-12), (0, 1), fig.SEQUENTIAL,
                                     arrows=(mean_cam, difference)))
            names.append(source)
        fig.gallery(images, names, out_dir / "femur_group_difference.png", (0, 1), fig.SEQUENTIAL,
                    "|mu_cam - mu_control| / its maximum")
        out.figures.append({"file": "femur_group_difference.png",
                            "title": "Cam-FAI group difference mu_cam - mu_control (Fig. 9)",
                            "caption": "Arrows show where the mean cam femur differs from the mean control and "
                                       "colour the normalized size of that difference; look for one bright spot at "
                                       "the anterosuperior head-neck junction (the cam lesion) in every panel."})
    significant = {s: d for s, d in differences.items() if len(d) == 3}
    if significant:
        top = max(2.0, max(float(-np.log10(d[2].min())) for d in significant.values()))
        images = []
        for source, (mean_cam, _, q) in significant.items():
            mesh = template.warp(mean_cam)
            images.append(fig.render(mesh, values_at_vertices(mesh.points, mean_cam, -np.log10(q)), (0, top),
                                     fig.SEQUENTIAL))
        fig.gallery(images, list(significant), out_dir / "femur_significance.png", (0, top), fig.SEQUENTIAL,
                    "-log10 q (FDR), 1.3 = q 0.05")
        out.figures.append({"file": "femur_significance.png",
                            "title": "Where the groups differ significantly (per-point Hotelling T^2, FDR)",
                            "caption": "Colour is -log10 of the FDR-adjusted permutation p-value of a per-point "
                                       "Hotelling T^2 test; points above 1.3 differ at q < 0.05, and they should "
                                       "sit at the cam lesion."})

    swims = {}
    for method in latent_methods:
        trained = trained_model(cohort.dataset_dir, method)
        shapes = cohort.all
        cam = group[shapes.ids].to_numpy() == "cam"
        swim = out.attempt(f"{method} latent swim", lambda: latent_swim(trained, shapes.world[~cam], shapes.world[cam]))
        if swim is not None:
            swims[method] = swim
            out.summary.setdefault(method, {})["swim_max_displacement_mm"] = float(
                np.linalg.norm(swim[-1] - swim[0], axis=1).max())
    if swims:
        swim_figure(template, swims, out_dir / "femur_latent_swim.png")
        out.figures.append({"file": "femur_latent_swim.png",
                            "title": "Latent swim, control to cam (TL-DeepSSM: Fig. 10)",
                            "caption": "Shapes decoded along the line from the control to the cam mean latent code; "
                                       "colour is the movement from the control end along the surface normal, which "
                                       "should grow smoothly at the head-neck junction as lambda increases."})
    return out

