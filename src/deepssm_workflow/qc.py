"""Quality-control figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .io import read_particles, resolve
from .plotting import figure, render_mesh, save_figure

# scanner planes (the anatomy is posed randomly in its scanner, so anatomical names would mislead):
# name -> (array axis sliced, physical axes shown as (horizontal, vertical))
_VIEWS = {"scanner xy": (0, (0, 1)), "scanner xz": (1, (0, 2)), "scanner yz": (2, (1, 2))}


def pick_subjects(subjects: pd.DataFrame, count: int) -> pd.DataFrame:
    """Up to `count` subjects, covering every group before repeating one."""
    ranked = subjects.assign(_rank=subjects.groupby("group").cumcount()).sort_values(["_rank", "id"], kind="stable")
    return ranked.head(count).drop(columns="_rank")


def cohort_figure(subjects_csv, out_png, count: int = 4) -> None:
    """Mid-slices with segmentation outline and nearby points, and the mesh, for a few subjects."""
    subjects = pd.read_csv(subjects_csv)
    chosen = pick_subjects(subjects, count)
    fig, axes = figure(len(chosen), 4, cell=(3.2, 3.0))
    for row, subject in zip(np.atleast_2d(axes), chosen.itertuples()):
        image = sitk.ReadImage(str(resolve(subjects_csv, subject.image)))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(resolve(subjects_csv, subject.segmentation))))
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        points = read_particles(resolve(subjects_csv, subject.local_particles))
        origin, spacing = np.array(image.GetOrigin()), np.array(image.GetSpacing())
        index = (points - origin) / spacing  # continuous voxel index (x, y, z)
        centre = np.rint(index.mean(0)).astype(int)
        low, high = np.percentile(array, [1, 99.5])
        for ax, (view, (axis, (h, v))) in zip(row[:3], _VIEWS.items()):
            position = centre[2 - axis]  # array axis 0 is physical z
            plane = np.take(array, position, axis=axis)
            outline = np.take(mask, position, axis=axis)
            extent = [origin[h] - spacing[h] / 2, origin[h] + spacing[h] * (plane.shape[1] - 0.5),
                      origin[v] - spacing[v] / 2, origin[v] + spacing[v] * (plane.shape[0] - 0.5)]
            ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent)
            ax.contour(outline, levels=[0.5], colors="#ffb000", linewidths=0.8, origin="lower", extent=extent)
            near = np.abs(index[:, 2 - axis] - position) < 1.5
            ax.scatter(points[near, h], points[near, v], s=4, c="#00c8ff", linewidths=0)
            ax.set_title(f"{subject.id} ({subject.group}) {view}", fontsize=8)
            ax.set_axis_off()
        row[3].imshow(render_mesh(resolve(subjects_csv, subject.mesh), points))
        row[3].set_title("mesh + points", fontsize=8)
        row[3].set_axis_off()
    save_figure(fig, out_png)
