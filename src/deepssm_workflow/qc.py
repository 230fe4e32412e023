"""Quality-control figures."""

from __future__ import annotations

import json
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


def _local_points(subjects_csv, shapes) -> dict:
    """Image-frame points by subject id: from the shapes .npz files (an ingested cohort), else
    from the table's local_particles column (a CSV manifest, e.g. the synthetic subjects.csv)."""
    if shapes:
        points = {}
        for path in shapes:
            with np.load(path) as data:
                points.update({str(i): local for i, local in zip(data["ids"], data["local"])})
        return points
    table = pd.read_csv(subjects_csv, dtype=str, keep_default_na=False)
    return {sid: read_particles(resolve(subjects_csv, file))
            for sid, file in zip(table["id"], table["local_particles"])}


def cohort_figure(subjects_csv, out_png, count: int = 4, shapes=None) -> None:
    """Mid-slices with segmentation outline and nearby points, and the mesh, for a few subjects.

    `subjects_csv` is an ingested cohort's subjects.csv with `shapes` its shapes_*.npz (points
    in the image frame: `local`), or a CSV manifest with a local_particles column. A subject
    without a segmentation gets no outline; one without a mesh, its points alone in 3D."""
    subjects = pd.read_csv(subjects_csv, dtype=str, keep_default_na=False)
    for column in ("group", "segmentation", "mesh"):
        if column not in subjects:
            subjects[column] = ""
    local = _local_points(subjects_csv, shapes)
    chosen = pick_subjects(subjects, count)
    fig, axes = figure(len(chosen), 4, cell=(3.2, 3.0))
    for row, subject in zip(np.atleast_2d(axes), chosen.itertuples()):
        image = sitk.ReadImage(str(resolve(subjects_csv, subject.image)))
        mask = (sitk.GetArrayFromImage(sitk.ReadImage(str(resolve(subjects_csv, subject.segmentation))))
                if subject.segmentation else None)
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        points = np.asarray(local[subject.id])
        label = f"{subject.id} ({subject.group})" if subject.group else subject.id
        origin, spacing = np.array(image.GetOrigin()), np.array(image.GetSpacing())
        index = (points - origin) / spacing  # continuous voxel index (x, y, z)
        centre = np.rint(index.mean(0)).astype(int)
        low, high = np.percentile(array, [1, 99.5])
        for ax, (view, (axis, (h, v))) in zip(row[:3], _VIEWS.items()):
            position = centre[2 - axis]  # array axis 0 is physical z
            plane = np.take(array, position, axis=axis)
            extent = [origin[h] - spacing[h] / 2, origin[h] + spacing[h] * (plane.shape[1] - 0.5),
                      origin[v] - spacing[v] / 2, origin[v] + spacing[v] * (plane.shape[0] - 0.5)]
            ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower", extent=extent)
            if mask is not None:
                outline = np.take(mask, position, axis=axis)
                ax.contour(outline, levels=[0.5], colors="#ffb000", linewidths=0.8, origin="lower", extent=extent)
            near = np.abs(index[:, 2 - axis] - position) < 1.5
            ax.scatter(points[near, h], points[near, v], s=4, c="#00c8ff", linewidths=0)
            ax.set_title(f"{label} {view}", fontsize=8)
            ax.set_axis_off()
        mesh = resolve(subjects_csv, subject.mesh) if subject.mesh else None
        row[3].imshow(render_mesh(mesh, points))
        row[3].set_title("mesh + points" if mesh else "points (no mesh given)", fontsize=8)
        row[3].set_axis_off()
    save_figure(fig, out_png)


def preprocess_figure(preprocess_dir, out_png, count: int = 4) -> None:
    """Reference and mean of the aligned training images, then registered test images with the
    reference's edges drawn on top: sharp means and edges that follow the anatomy mean success."""
    preprocess_dir = Path(preprocess_dir)
    meta = json.loads((preprocess_dir / "grid.json").read_text())
    train, test = np.load(preprocess_dir / "train.npz"), np.load(preprocess_dir / "test.npz")
    reference = train["images"][list(train["ids"]).index(meta["reference_id"])]
    rows = [(f"reference {meta['reference_id']}", reference, False),
            (f"mean of {len(train['images'])} training images", train["images"].mean(0), False)]
    rows += [(f"test {i} (registered)", image, True) for i, image in zip(test["ids"][:count], test["images"])]
    low, high = np.percentile(train["images"], [1, 99.5])
    edge_level = np.percentile(reference, 85)
    fig, axes = figure(len(rows), 3, cell=(3.0, 2.8))
    for row_axes, (title, volume, overlay) in zip(axes, rows):
        for ax, axis, name in zip(row_axes, range(3), ("world xy", "world xz", "world yz")):
            plane = np.take(volume, volume.shape[axis] // 2, axis=axis)
            ax.imshow(plane, cmap="gray", vmin=low, vmax=high, origin="lower")
            if overlay:
                ref_plane = np.take(reference, reference.shape[axis] // 2, axis=axis)
                ax.contour(ref_plane, levels=[edge_level], colors="#ffb000", linewidths=0.7, origin="lower")
            ax.set_title(f"{title}, {name}", fontsize=7)
            ax.set_axis_off()
    save_figure(fig, out_png)
