"""A cohort this project did not make: star-shaped solids imaged by the recipe of ShapeWorks'
public cohort generator (ShapeCohortGen), written as a CSV manifest and as a .swproj.

The recipe, in our own code: a binary segmentation of a random solid in a random pose;
an image made from it by Gaussian intensities (foreground around 180, background around
80, SD 30) and a blur; exact correspondences, the same surface directions on every
subject. The kinds of solid differ in how symmetric they are, which is what decides
whether an image-only registration can recover the pose:

    ellipsoid   three distinct radii (only 180-degree flips leave it unchanged)
    spheroid    two radii within 3 %: nearly symmetric about its long axis
    bumpy       an ellipsoid with two bumps: no symmetry at all
    supershape  a spherical product of superformulas with three lobes

Nothing here imports the workflow's own generators; only its file readers read the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

KINDS = ("ellipsoid", "spheroid", "bumpy", "supershape")


def fibonacci_directions(n: int) -> np.ndarray:
    """n unit vectors spread evenly over the sphere (the same on every subject: correspondence)."""
    k = np.arange(n) + 0.5
    z = 1 - 2 * k / n
    phi = np.pi * (1 + 5**0.5) * k
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


def _superformula(angle, m, n1, n2, n3):
    return (np.abs(np.cos(m * angle / 4)) ** n2 + np.abs(np.sin(m * angle / 4)) ** n3) ** (-1 / n1)


def radius_function(kind: str, rng: np.random.Generator):
    """The subject's solid as r(u): distance from its centre to its surface along unit direction u."""
    if kind in ("ellipsoid", "bumpy"):
        radii = np.array([rng.uniform(18, 24), rng.uniform(11, 14), rng.uniform(6, 8)])
    elif kind == "spheroid":
        long, short = rng.uniform(18, 24), rng.uniform(9, 11)
        radii = np.array([long, short, short * rng.uniform(1.0, 1.03)])
    else:
        radii = np.array([rng.uniform(14, 17)] * 3)

    def ellipsoid(u):
        return 1.0 / np.sqrt(((u / radii) ** 2).sum(-1))

    if kind in ("ellipsoid", "spheroid"):
        return ellipsoid
    if kind == "bumpy":
        bumps = [(np.array([0.6, 0.0, 0.8]), rng.uniform(0.25, 0.35)),
                 (np.array([-0.3, 0.9, 0.3]), rng.uniform(0.15, 0.25))]

        def bumpy(u):
            r = ellipsoid(u)
            for centre, height in bumps:
                centre = centre / np.linalg.norm(centre)
                r = r * (1 + height * np.exp(-((u - centre) ** 2).sum(-1) / 0.15))
            return r

        return bumpy
    n1 = rng.uniform(2.5, 3.5)  # lobes about 1.4x the waist (ShapeWorks draws its own exponents)
    radii = radii * np.array([1.0, 1.0, 0.7])

    def supershape(u):
        # three lobes about z: the superformula of the azimuth scales a flattened sphere
        theta = np.arctan2(u[..., 1], u[..., 0])
        return ellipsoid(u) * _superformula(theta, 3, n1, 4, 4) / _superformula(0.0, 3, n1, 4, 4)

    return supershape


def make_subject(kind: str, rng: np.random.Generator, n_points: int, spacing: float, max_rotation_deg: float,
                 noise_sd: float = 30.0):
    """(image, segmentation, local points, world points, image_to_world) of one random subject."""
    shape_r = radius_function(kind, rng)
    directions = fibonacci_directions(n_points)
    canonical = directions * shape_r(directions)[:, None]  # world frame: the solid at the origin, unrotated

    axis = rng.normal(size=3)
    angle = np.radians(rng.uniform(0, max_rotation_deg))
    rotation = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()
    extent = np.abs(canonical).max() + 6
    margin = rng.uniform(4, 16, size=(2, 3))
    size = np.ceil((2 * extent + margin.sum(0)) / spacing).astype(int)
    origin = rng.uniform(-80, 80, size=3)
    centre = origin + margin[0] + extent  # the solid's centre in the scanner frame

    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    voxels = np.stack([xx, yy, zz], -1) * spacing + origin  # physical (x, y, z) of each voxel
    body = (voxels - centre) @ rotation  # into the solid's own frame (rotation^-1 = rotation^T)
    distance = np.linalg.norm(body, axis=-1)
    inside = distance < shape_r(body / np.maximum(distance, 1e-9)[..., None])
    segmentation = inside.astype(np.uint8)

    foreground = rng.normal(180, noise_sd, size=inside.shape)
    background = rng.normal(80, noise_sd, size=inside.shape)
    image = gaussian_filter(np.where(inside, foreground, background), 1.0).astype(np.float32)

    local = canonical @ rotation.T + centre
    image_to_world = np.eye(4)
    image_to_world[:3, :3] = rotation.T
    image_to_world[:3, 3] = -rotation.T @ centre
    return image, segmentation, origin, local, canonical, image_to_world


def _write_image(array: np.ndarray, origin, spacing: float, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(spacing)] * 3)
    sitk.WriteImage(image, str(path), useCompression=True)


def generate(out_dir, kind: str = "ellipsoid", n_train: int = 12, n_test: int = 6, seed: int = 0,
             n_points: int = 256, spacing: float = 1.0, max_rotation_deg: float = 30.0) -> dict:
    """Write the cohort into out_dir; return the paths of its manifest.csv and project.swproj.

    The manifest gives local and world particles (ingestion fits the transforms, as it would
    for a user's cohort); the project gives them with ShapeWorks' `alignment_<domain>`
    column and an empty `procrustes_<domain>` (Procrustes off)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    out = Path(out_dir)
    for folder in ("images", "segmentations", "particles"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, project = [], []
    for index in range(n_train + n_test):
        sid = f"{kind}_{index:03d}"
        image, segmentation, origin, local, world, image_to_world = make_subject(
            kind, rng, n_points, spacing, max_rotation_deg)
        _write_image(image, origin, spacing, out / "images" / f"{sid}.nrrd")
        _write_image(segmentation, origin, spacing, out / "segmentations" / f"{sid}.nrrd")
        np.savetxt(out / "particles" / f"{sid}_local.particles", local, fmt="%.6f")
        np.savetxt(out / "particles" / f"{sid}_world.particles", world, fmt="%.6f")
        split = "train" if index < n_train else "test"
        rows.append({"id": sid, "split": split, "image": f"images/{sid}.nrrd",
                     "segmentation": f"segmentations/{sid}.nrrd",
                     "local_particles": f"particles/{sid}_local.particles",
                     "world_particles": f"particles/{sid}_world.particles"})
        project.append({"name": sid, "split": split, "shape_solid": f"segmentations/{sid}.nrrd",
                        "image_ct": f"images/{sid}.nrrd",
                        "local_particles_solid": f"particles/{sid}_local.particles",
                        "world_particles_solid": f"particles/{sid}_world.particles",
                        "alignment_solid": " ".join(f"{v:.10g}" for v in image_to_world.ravel()),
                        "procrustes_solid": ""})
        np.savetxt(out / "particles" / f"{sid}_true_image_to_world.txt", image_to_world)
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    (out / "project.swproj").write_text(json.dumps({"data": project}, indent=2))
    return {"manifest": out / "manifest.csv", "project": out / "project.swproj"}


JOINT_DOMAINS = ("bottom", "top")


def generate_joint(out_dir, n_train: int = 12, n_test: int = 4, seed: int = 0, n_points: int = 64,
                   spacing: float = 2.0, box_mm: float = 160.0, missing_top: float = 0.2) -> Path:
    """A multi-domain cohort by the recipe of ShapeWorks' ellipsoid-joint generator (EllipsoidJoints): two
    stacked ellipsoids, the top one with its own radii and rotated about the joint's long axis against the
    bottom one, the joint in a random pose and place of a fixed scan box; images of Gaussian intensities
    (foreground around 180, background around 80, SD 30) and a blur, one label map (1 bottom, 2 top).
    A `missing_top` fraction of the subjects has no top ellipsoid. Written as a long-form CSV manifest (one row
    per subject and domain, as another tool would export it; no meshes), whose path is returned, and as a
    multi-domain ShapeWorks project (project.swproj: per-domain `shape_`, `local_particles_`, `world_particles_`
    columns, empty where a subject lacks the domain)."""
    out = Path(out_dir)
    for folder in ("images", "labels", "particles"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    directions = fibonacci_directions(n_points)
    size = int(np.ceil(box_mm / spacing))
    origin = np.full(3, -box_mm / 2)
    zz, yy, xx = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    voxels = np.stack([xx, yy, zz], -1) * spacing + origin
    rows, project = [], []
    for index in range(n_train + n_test):
        sid = f"joint_{index:03d}"
        split = "train" if index < n_train else "test"
        has_top = index % int(round(1 / missing_top)) != 2 if missing_top else True
        radii = {"bottom": np.array([rng.uniform(15, 25), rng.uniform(8, 12), rng.uniform(10, 14)]),
                 "top": np.array([rng.uniform(15, 25), rng.uniform(8, 12), rng.uniform(10, 14)])}
        twist = Rotation.from_euler("y", rng.uniform(-45, 45), degrees=True).as_matrix()  # about the long axis
        gap = rng.uniform(2, 6)
        # each domain in the joint's frame: its rotation and centre (the bottom at the origin)
        placed = {"bottom": (np.eye(3), np.zeros(3)),
                  "top": (twist, np.array([0.0, radii["bottom"][1] + radii["top"][1] + gap, 0.0]))}
        axis = rng.normal(size=3)
        pose = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(rng.uniform(0, 20))).as_matrix()
        reach = max(np.linalg.norm(c) + r.max() for (_, c), r in zip(placed.values(), radii.values()))
        middle = placed["top"][1] / 2
        shift = rng.uniform(-(box_mm / 2 - reach - 8), box_mm / 2 - reach - 8, size=3) - pose @ middle
        labels = np.zeros(voxels.shape[:3], np.uint8)
        for value, domain in enumerate(JOINT_DOMAINS, start=1):
            if domain == "top" and not has_top:
                continue
            rotation = pose @ placed[domain][0]  # the domain's frame to the scanner's
            centre = pose @ placed[domain][1] + shift
            canonical = directions / np.sqrt(((directions / radii[domain]) ** 2).sum(1))[:, None]
            body = (voxels - centre) @ rotation
            labels[((body / radii[domain]) ** 2).sum(-1) < 1] = value
            local = canonical @ rotation.T + centre
            np.savetxt(out / "particles" / f"{sid}_{domain}_local.particles", local, fmt="%.6f")
            np.savetxt(out / "particles" / f"{sid}_{domain}_world.particles", canonical, fmt="%.6f")
            rows.append({"id": sid, "split": split, "anatomy": domain, "image": f"images/{sid}.nrrd",
                         "labels": f"labels/{sid}.nrrd", "label": value,
                         "local_particles": f"particles/{sid}_{domain}_local.particles",
                         "world_particles": f"particles/{sid}_{domain}_world.particles"})
        project.append({"name": sid, "split": split, "image_ct": f"images/{sid}.nrrd",
                        **{f"{k}_{d}": next((r[k] for r in rows if r["id"] == sid and r["anatomy"] == d), "")
                           for d in JOINT_DOMAINS for k in ("local_particles", "world_particles")},
                        **{f"shape_{d}": "" for d in JOINT_DOMAINS}})
        inside = labels > 0
        image = np.where(inside, rng.normal(180, 30, inside.shape), rng.normal(80, 30, inside.shape))
        _write_image(gaussian_filter(image, 1.0).astype(np.float32), origin, spacing, out / "images" / f"{sid}.nrrd")
        _write_image(labels, origin, spacing, out / "labels" / f"{sid}.nrrd")
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    (out / "project.swproj").write_text(json.dumps({"data": project}, indent=2))
    return out / "manifest.csv"
