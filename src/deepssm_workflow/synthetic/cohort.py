"""Write a synthetic cohort: per-subject images, segmentations, meshes, particles
and transforms, plus the subjects table (which doubles as a CSV manifest).

Layout written under the cohort folder (paths in subjects.csv are relative to it):

    subjects.csv                 id, split, group, covariates, file columns
    ground_truth.csv             generator parameters and pose per subject (tests only)
    data/images/{id}.nrrd        scanner-frame image
    data/segmentations/{id}.nrrd binary segmentation, same grid
    data/meshes/{id}.vtk         surface mesh, scanner frame
    data/particles/{id}_local.particles   M points, scanner (image) frame
    data/particles/{id}_world.particles   M points, aligned world frame
    data/transforms/{id}.txt     4x4 image -> world transform
    data/template/               template mesh and points (world frame)
    data/{table}.csv             study tables (e.g. metopic expert ratings)
    data/cohort.json             what was generated, with which settings

Scans are cropped around the anatomy (random margins, the default) or, with
`full_field`, a fixed box of the same physical size for every subject in which the
anatomy lies anywhere (and turns further): what a method that finds the anatomy
itself (image2ssm) needs, and what a DeepSSM registration must cope with.

Every subject draws from its own random stream seeded by (seed, subject index),
so the cohort is identical for a seed whatever the number of workers. With a
`test_seed`, the test subjects draw from (seed, test_seed, index) instead: a fresh,
sealed test draw (new shapes, poses and scans) beside training subjects left
byte-identical, so headline numbers can be read on subjects no choice was made on.
The shapes alone (no images) come from `world_shapes`, by the same code and streams.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..atomic import staged
from ..io import apply_transform, procrustes_fit, write_particles, write_transform
from ..points import farthest_point_sampling
from . import geometry
from .anatomy import Anatomy, Scan
from .imaging import Grid, grid_around, signed_distance, voxelize, write_image
from .registry import anatomy_class

TEST_DRAW_STREAM = 2**31 - 3  # marks a test-draw subject's stream apart from every (seed, index) one
SCANNER_RANGE_MM = 120.0  # anatomy centre lands uniformly within +-this in scanner coordinates
FULL_FIELD_ROTATION_DEG = 45.0  # a full-field scan's default largest rotation


@dataclass(frozen=True)
class FullField:
    """A fixed scanner box for every subject: `size_mm` (x, y, z) centred on the scanner origin;
    the anatomy lies at a uniformly random position at least `min_margin_mm` inside it, rotated
    by up to `max_rotation_deg`."""

    size_mm: tuple[float, float, float]
    max_rotation_deg: float = FULL_FIELD_ROTATION_DEG
    min_margin_mm: float = 5.0

    @classmethod
    def from_config(cls, cfg: dict) -> "FullField":
        size = cfg["size_mm"]
        size = tuple(float(s) for s in (size if isinstance(size, list) else [size] * 3))
        return cls(size, float(cfg.get("max_rotation_deg", FULL_FIELD_ROTATION_DEG)),
                   float(cfg.get("min_margin_mm", 5.0)))

    def grid(self, spacing) -> Grid:
        """The box as a voxel grid whose centre is the scanner origin."""
        spacing = np.asarray(spacing, float)
        size = np.ceil(np.asarray(self.size_mm) / spacing).astype(int)
        origin = -0.5 * (size - 1) * spacing
        return Grid(tuple(origin.tolist()), tuple(spacing.tolist()), tuple(int(n) for n in size))

    def place(self, rng: np.random.Generator, centred: np.ndarray, grid: Grid, subject_id: str) -> np.ndarray:
        """A random scanner-frame centre for the anatomy whose scanner-frame points about their centroid
        are `centred`, such that every point stays min_margin_mm inside the grid's voxel centres."""
        lower_edge = np.asarray(grid.origin) + self.min_margin_mm
        upper_edge = np.asarray(grid.origin) + (np.asarray(grid.size) - 1) * np.asarray(grid.spacing) \
            - self.min_margin_mm
        low, high = lower_edge - centred.min(0), upper_edge - centred.max(0)
        if np.any(low > high):
            need = centred.max(0) - centred.min(0) + 2 * self.min_margin_mm
            raise ValueError(f"subject {subject_id}: the anatomy, {np.round(need, 1).tolist()} mm with its margins "
                             f"at this pose, does not fit synthetic.full_field.size_mm {list(self.size_mm)}")
        return rng.uniform(low, high)


@dataclass(frozen=True)
class SyntheticSettings:
    seed: int
    subjects: dict[str, dict[str, int]]  # split -> group -> count
    n_particles: int
    spacing_mm: tuple[float, float, float]
    mesh_resolution_mm: float
    max_rotation_deg: float
    fov_margin_mm: tuple[float, float]
    extent: dict[str, float] = field(default_factory=dict)  # the anatomy's cuts (Anatomy.extent_keys); {}: its own
    full_field: FullField | None = None  # None: scans cropped around the anatomy with fov_margin_mm
    test_seed: int | None = None  # None: test subjects draw from the generator's seed like training ones

    @classmethod
    def from_config(cls, cfg: dict) -> "SyntheticSettings":
        spacing = cfg["spacing_mm"]
        spacing = tuple(float(s) for s in (spacing if isinstance(spacing, list) else [spacing] * 3))
        return cls(
            seed=int(cfg["seed"]),
            subjects={split: {g: int(n) for g, n in groups.items()} for split, groups in cfg["subjects"].items()},
            n_particles=int(cfg["n_particles"]),
            spacing_mm=spacing,
            mesh_resolution_mm=float(cfg["mesh_resolution_mm"]),
            max_rotation_deg=float(cfg["max_rotation_deg"]),
            fov_margin_mm=tuple(float(m) for m in cfg["fov_margin_mm"]),
            extent={key: float(value) for key, value in (cfg.get("extent") or {}).items()},
            full_field=FullField.from_config(cfg["full_field"]) if cfg.get("full_field") else None,
            test_seed=None if cfg.get("test_seed") is None else int(cfg["test_seed"]),
        )

    def record(self) -> dict:
        """The settings as cohort.json stores them (`extent`, `full_field` and `test_seed` only when set)."""
        record = asdict(self)
        for optional in ("extent", "full_field", "test_seed"):
            if record[optional] is None or record[optional] == {}:
                del record[optional]
        return record


def subject_entropy(seed: int, test_seed: int | None, index: int, split: str) -> list[int]:
    """The seed of a planned subject's random stream: (seed, index), or for a test subject of a
    cohort with a test_seed, (seed, TEST_DRAW_STREAM, test_seed, index). Never a prefix of another
    stream's seed padded with zeros, which numpy's SeedSequence would take for the same seed."""
    if split == "test" and test_seed is not None:
        return [seed, TEST_DRAW_STREAM, test_seed, index]
    return [seed, index]


def tables_entropy(seed: int, test_seed: int | None) -> list[int]:
    """The seed of the cohort-level tables' stream (e.g. expert ratings): a fresh test draw rates afresh."""
    return [seed, 2**31 - 2] if test_seed is None else [seed, 2**31 - 2, test_seed + 1]


def draw_description(seed: int, test_seed: int | None) -> str:
    """Which test draw a cohort's seeds make, in words (reports name it beside their headline)."""
    if test_seed is None:
        return f"generator seed {seed} (test subjects drawn with the training subjects)"
    return f"generator seed {seed}, test seed {test_seed}"


def build_anatomy(anatomy_name: str, settings: SyntheticSettings | dict,
                  mesh_resolution_mm: float | None = None) -> Anatomy:
    """The generator's anatomy for a cohort's settings (a SyntheticSettings, or the `settings` of
    its data/cohort.json), so that it rebuilds the cohort's template; `mesh_resolution_mm` overrides
    the settings' (a coarser template for a quick look at the shapes)."""
    if isinstance(settings, SyntheticSettings):
        settings = asdict(settings)
    resolution = float(settings["mesh_resolution_mm"] if mesh_resolution_mm is None else mesh_resolution_mm)
    return anatomy_class(anatomy_name)(resolution, settings.get("extent") or None)


def subject_plan(prefix: str, settings: SyntheticSettings) -> pd.DataFrame:
    """id, split, group of every subject, in an order that hides split and group."""
    rows = [(split, group) for split in ("train", "test")
            for group, n in settings.subjects.get(split, {}).items() for _ in range(n)]
    order = np.random.default_rng([settings.seed, 2**31 - 1]).permutation(len(rows))
    plan = pd.DataFrame([rows[i] for i in order], columns=["split", "group"])
    plan.insert(0, "id", [f"{prefix}_{i:03d}" for i in range(len(plan))])
    return plan


def _subject_files(subject_id: str) -> dict[str, str]:
    return {
        "image": f"data/images/{subject_id}.nrrd",
        "segmentation": f"data/segmentations/{subject_id}.nrrd",
        "mesh": f"data/meshes/{subject_id}.vtk",
        "local_particles": f"data/particles/{subject_id}_local.particles",
        "world_particles": f"data/particles/{subject_id}_world.particles",
        "transform": f"data/transforms/{subject_id}.txt",
    }


def synthesize_subject(anatomy: Anatomy, settings: SyntheticSettings, point_ids: np.ndarray, index: int,
                       subject_id: str, split: str, group: str, root: Path) -> tuple[dict, dict]:
    """Generate and write one subject; returns its covariates and ground-truth rows."""
    start = time.perf_counter()
    rng = np.random.default_rng(subject_entropy(settings.seed, settings.test_seed, index, split))
    params = anatomy.sample_parameters(rng, group)
    covariates = anatomy.covariates(rng, group, params)
    template = anatomy.template
    world_vertices, alignment = world_shape(anatomy, params)
    anchors = {name: apply_transform(alignment, point) for name, point in anatomy.deformed_anchors(params).items()}

    # pose: world = R @ local + t, with the anatomy somewhere in the scanner's field
    full_field = settings.full_field
    rotation = geometry.random_rotation(rng, full_field.max_rotation_deg if full_field else settings.max_rotation_deg)
    if full_field:
        grid = full_field.grid(settings.spacing_mm)
        scanner_center = full_field.place(rng, (world_vertices - world_vertices.mean(0)) @ rotation, grid, subject_id)
    else:
        scanner_center = rng.uniform(-SCANNER_RANGE_MM, SCANNER_RANGE_MM, 3)
    translation = world_vertices.mean(0) - rotation @ scanner_center
    image_to_world = np.eye(4)
    image_to_world[:3, :3], image_to_world[:3, 3] = rotation, translation
    local_vertices = (world_vertices - translation) @ rotation

    if not full_field:
        low, high = settings.fov_margin_mm
        grid = grid_around(local_vertices, settings.spacing_mm, rng.uniform(low, high, 3), rng.uniform(low, high, 3))
    mesh = template.polydata(local_vertices)
    mask = voxelize(mesh, grid)
    if not mask.any():
        raise RuntimeError(f"subject {subject_id}: empty segmentation; spacing {settings.spacing_mm} too coarse")
    scan = Scan(grid, mask, signed_distance(mask, grid), image_to_world, anchors, params)
    image = anatomy.render(rng, scan)

    files = _subject_files(subject_id)
    write_image(image, grid, root / files["image"])
    write_image(mask, grid, root / files["segmentation"])
    mesh.save(root / files["mesh"], binary=True)
    write_particles(root / files["local_particles"], local_vertices[point_ids])
    write_particles(root / files["world_particles"], world_vertices[point_ids])
    write_transform(root / files["transform"], image_to_world)

    rotvec_deg = _rotation_vector_deg(rotation)
    truth = {"id": subject_id, **params,
             **{f"pose_rotation_{a}_deg": v for a, v in zip("xyz", rotvec_deg)},
             **{f"pose_translation_{a}_mm": v for a, v in zip("xyz", translation)},
             "image_size": "x".join(map(str, grid.size))}
    print(f"{subject_id}: {group:>8s} grid {grid.size} in {time.perf_counter() - start:.1f}s", flush=True)
    return {**covariates, **files}, truth


def world_shape(anatomy: Anatomy, params: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """A subject's template vertices in the world frame, and the 4x4 alignment that put them there.

    The world frame is the subject's rigid Procrustes alignment onto the template, as a
    shape model's world particles are: shape differences never masquerade as pose.
    """
    template = anatomy.template
    deformed = anatomy.deform(template.vertices, params)
    alignment = procrustes_fit(deformed, template.vertices, scaling=False)
    return apply_transform(alignment, deformed), alignment


def world_shapes(anatomy: Anatomy, settings: SyntheticSettings, splits=("train", "test"),
                 prefix: str = "subject") -> tuple[pd.DataFrame, list[np.ndarray]]:
    """The world-frame shapes (all template vertices) of a cohort's planned subjects of `splits`,
    without images: each subject's parameters from its own random stream, deformed and aligned
    as `generate_cohort` does. The cohort's particles are a subset of these vertices (with the
    anatomy built at the cohort's mesh resolution: `build_anatomy`). Returns the plan's rows of
    those subjects and their shapes."""
    plan = subject_plan(prefix, settings)
    plan = plan[plan["split"].isin(splits)]
    shapes = []
    for index, split, group in zip(plan.index, plan["split"], plan["group"]):
        rng = np.random.default_rng(subject_entropy(settings.seed, settings.test_seed, index, split))
        params = anatomy.sample_parameters(rng, group)
        shapes.append(world_shape(anatomy, params)[0])
    return plan, shapes


def _rotation_vector_deg(rotation: np.ndarray) -> np.ndarray:
    angle = np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))
    if angle < 1e-12:
        return np.zeros(3)
    axis = np.array([rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0],
                     rotation[1, 0] - rotation[0, 1]]) / (2 * np.sin(angle))
    return np.rad2deg(angle) * axis


def run_subjects(synthesize, jobs: list[tuple], plan: pd.DataFrame, workers: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run `synthesize(*job)` for every subject (on `workers` processes) and gather its (files, truth)
    rows: the subjects table (the plan's columns first) and the ground-truth table."""
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(synthesize, *zip(*jobs)))
    else:
        results = [synthesize(*job) for job in jobs]
    return pd.concat([plan, pd.DataFrame([r[0] for r in results])], axis=1), pd.DataFrame([r[1] for r in results])


def generate_cohort(anatomy_name: str, settings: SyntheticSettings, out_dir: Path, prefix: str | None = None,
                    workers: int = 1) -> pd.DataFrame:
    """Generate the cohort into out_dir (subjects.csv, ground_truth.csv, data/).

    Everything is written to a staging folder first and moved into place only
    when complete, so a failure leaves no partial cohort behind.
    """
    out_dir = Path(out_dir)
    anatomy = build_anatomy(anatomy_name, settings)
    template = anatomy.template
    point_ids = farthest_point_sampling(template.vertices, settings.n_particles)
    plan = subject_plan(prefix or anatomy_name, settings)

    with staged(out_dir, ["data", "subjects.csv", "ground_truth.csv"]) as staging:
        for sub in ("images", "segmentations", "meshes", "particles", "transforms", "template"):
            (staging / "data" / sub).mkdir(parents=True)
        jobs = [(anatomy, settings, point_ids, i, row.id, row.split, row.group, staging)
                for i, row in enumerate(plan.itertuples())]
        subjects, ground_truth = run_subjects(synthesize_subject, jobs, plan, workers)
        subjects.to_csv(staging / "subjects.csv", index=False)
        ground_truth.to_csv(staging / "ground_truth.csv", index=False)

        tables = anatomy.cohort_tables(np.random.default_rng(tables_entropy(settings.seed, settings.test_seed)),
                                        subjects, ground_truth)
        for name, table in tables.items():
            table.to_csv(staging / "data" / f"{name}.csv", index=False)

        template.polydata().save(staging / "data/template/mesh.vtk", binary=True)
        write_particles(staging / "data/template/points.particles", template.vertices[point_ids])
        np.savetxt(staging / "data/template/point_ids.txt", point_ids, fmt="%d")
        metadata = {
            "anatomy": anatomy_name, "modality": anatomy.modality, "groups": list(anatomy.groups),
            "generator_version": __version__, "settings": settings.record(),
            "n_subjects": len(subjects), "n_particles": settings.n_particles,
            "units": "mm", "transform": "4x4, maps image (scanner) frame points to the world frame",
            "tables": {name: f"data/{name}.csv" for name in tables},
        }
        (staging / "data/cohort.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return subjects
