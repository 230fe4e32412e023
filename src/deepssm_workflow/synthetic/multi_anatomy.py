"""Multi-anatomy synthetic cohorts (MASSM): several anatomies in one full-field scan.

Each subject's scan is a fixed box centred on the scanner origin holding its
`parts`: each part is an anatomy of the shape generators (femur, bladder; a
part may be the mirror image of one, e.g. the left femur), with its own shape
(its own random stream, so a part's shape never depends on its neighbours), its
own small pose about a nominal place, and the whole body's pose on top (so the
parts' relative placement stays anatomical). Some subjects miss one part: it
is then absent from the image, the label map and every table but its `present_`
flag. Parts never share a voxel (a placement that would is drawn again).

Layout written under the cohort folder (paths in subjects.csv are relative to it):

    subjects.csv            id, split, group, image, labels, and per part P:
                            present_P (0/1), label_P (its value in the label
                            map), mesh_P, local_particles_P,
                            world_particles_P, transform_P (empty when absent);
                            the ShapeWorks multi-domain column names
    ground_truth.csv        per part P: P.present, P.<shape parameter>, the
                            part's pose and scanner-frame centre (tests only)
    data/images/{id}.nrrd   the CT
    data/labels/{id}.nrrd   uint8 label map, part P's voxels = its label
    data/meshes/{id}_{P}.vtk, data/particles/{id}_{P}_local|world.particles,
    data/transforms/{id}_{P}.txt   as a single-anatomy cohort's, per part
    data/template/{P}/      the part's template mesh, points and point ids
    data/cohort.json        the parts (anatomy, label, mirror) and the settings

Correspondences are exact by construction as in cohort.py: a part's particles
are fixed template vertices, its world frame the rigid Procrustes alignment onto
its (mirrored) template.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import __version__
from ..atomic import staged
from ..io import apply_transform, write_particles, write_transform
from ..points import farthest_point_sampling
from . import geometry
from .anatomy import Anatomy, Scan
from .cohort import _rotation_vector_deg, run_subjects, subject_entropy, subject_plan, world_shape
from .imaging import Grid, blur, signed_distance, smooth_noise, soft_inside, voxelize, write_image

MIRROR = np.diag([-1.0, 1.0, 1.0])  # patient left-right
PLACEMENT_TRIES = 50
# how far (mm) around a part its own renderer's surroundings are kept (the femur's acetabular cup)
CONTEXT_MM = {"femur": 28.0, "bladder": 4.0}
PART_ANATOMIES = tuple(CONTEXT_MM)


def part_anatomy(anatomy: str, mesh_resolution_mm: float, extent: dict | None = None) -> Anatomy:
    if anatomy == "femur":
        from .femur import Femur
        return Femur(mesh_resolution_mm, extent)
    if anatomy == "bladder":
        from .bladder import Bladder
        return Bladder(mesh_resolution_mm, extent)
    raise ValueError(f"unknown part anatomy {anatomy!r}; choose one of {', '.join(PART_ANATOMIES)}")


@dataclass(frozen=True)
class Part:
    """One anatomy of the scan: `centre_mm` is where its vertex centroid sits (scanner frame)
    before the body's pose, give or take `jitter_mm` per axis, turned by up to `max_rotation_deg`."""

    name: str
    anatomy: str
    centre_mm: tuple[float, float, float]
    jitter_mm: float = 6.0
    max_rotation_deg: float = 10.0
    mirror: bool = False
    extent: dict[str, float] = field(default_factory=dict)


# The hip: both proximal femurs (heads 160 mm apart, the left one the mirror image) and the bladder
# between and in front of them.
HIP_PARTS = {
    "femur_right": {"anatomy": "femur", "centre_mm": [-107.0, -4.0, -10.0], "extent": {"shaft_length_mm": 45}},
    "femur_left": {"anatomy": "femur", "centre_mm": [107.0, -4.0, -10.0], "mirror": True,
                   "extent": {"shaft_length_mm": 45}},
    "bladder": {"anatomy": "bladder", "centre_mm": [0.0, 22.0, 8.0], "jitter_mm": 5.0},
}


@dataclass(frozen=True)
class MultiAnatomySettings:
    seed: int
    subjects: dict[str, dict[str, int]]  # split -> group -> count
    n_particles: int  # per part
    spacing_mm: tuple[float, float, float]
    mesh_resolution_mm: float
    size_mm: tuple[float, float, float]  # the scan box (x, y, z), centred on the scanner origin
    parts: tuple[Part, ...]
    missing_fraction: float = 0.2  # subjects missing one part (which one: uniform)
    body_rotation_deg: float = 8.0
    body_shift_mm: float = 12.0
    min_margin_mm: float = 4.0  # every part this far inside the box
    test_seed: int | None = None  # a sealed test draw (synthetic.cohort.subject_entropy); None: the seed's

    @classmethod
    def from_config(cls, cfg: dict) -> "MultiAnatomySettings":
        def triple(value):
            return tuple(float(v) for v in (value if isinstance(value, list) else [value] * 3))

        for name, p in (cfg.get("parts") or {}).items():
            if p.get("anatomy") not in PART_ANATOMIES:
                raise ValueError(f"multi_anatomy.parts.{name}.anatomy: unknown part anatomy {p.get('anatomy')!r}; "
                                 f"choose one of {', '.join(PART_ANATOMIES)}")
        parts = tuple(Part(name, p["anatomy"], triple(p["centre_mm"]), float(p.get("jitter_mm", 6.0)),
                           float(p.get("max_rotation_deg", 10.0)), bool(p.get("mirror", False)),
                           {k: float(v) for k, v in (p.get("extent") or {}).items()})
                      for name, p in (cfg.get("parts") or HIP_PARTS).items())
        if not 2 <= len(parts) <= 8:
            raise ValueError(f"multi_anatomy.parts: a multi-anatomy scan holds 2 to 8 parts, not {len(parts)}")
        return cls(
            seed=int(cfg["seed"]),
            subjects={split: {g: int(n) for g, n in groups.items()} for split, groups in cfg["subjects"].items()},
            n_particles=int(cfg["n_particles"]), spacing_mm=triple(cfg["spacing_mm"]),
            mesh_resolution_mm=float(cfg["mesh_resolution_mm"]), size_mm=triple(cfg["size_mm"]), parts=parts,
            missing_fraction=float(cfg.get("missing_fraction", 0.2)),
            body_rotation_deg=float(cfg.get("body_rotation_deg", 8.0)),
            body_shift_mm=float(cfg.get("body_shift_mm", 12.0)),
            min_margin_mm=float(cfg.get("min_margin_mm", 4.0)),
            test_seed=None if cfg.get("test_seed") is None else int(cfg["test_seed"]),
        )

    def grid(self) -> Grid:
        spacing = np.asarray(self.spacing_mm)
        size = np.ceil(np.asarray(self.size_mm) / spacing).astype(int)
        origin = -0.5 * (size - 1) * spacing
        return Grid(tuple(origin.tolist()), tuple(spacing.tolist()), tuple(int(n) for n in size))


class PartModel:
    """A part's anatomy with its (mirrored) template and correspondence points."""

    def __init__(self, part: Part, settings: MultiAnatomySettings):
        self.part = part
        self.anatomy = part_anatomy(part.anatomy, settings.mesh_resolution_mm, part.extent)
        template = self.anatomy.template
        self.point_ids = farthest_point_sampling(template.vertices, settings.n_particles)
        self.flip = MIRROR if part.mirror else np.eye(3)
        # a mirror image turns the triangles inside out: reverse them to keep normals outward
        self.faces = template.faces[:, ::-1] if part.mirror else template.faces
        self.template_vertices = template.vertices @ self.flip

    def world(self, params: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The subject's world-frame vertices (mirrored for a mirror part) and its anatomy's anchors
        in the anatomy's own (unmirrored) world frame, as its renderer expects them."""
        vertices, alignment = world_shape(self.anatomy, params)
        anchors = {n: apply_transform(alignment, p) for n, p in self.anatomy.deformed_anchors(params).items()}
        return vertices @ self.flip, anchors

    def polydata(self, vertices: np.ndarray):
        return geometry.polydata(vertices, self.faces)


def _inside(points: np.ndarray, grid: Grid, margin: float) -> bool:
    low = np.asarray(grid.origin) + margin
    high = np.asarray(grid.origin) + (np.asarray(grid.size) - 1) * np.asarray(grid.spacing) - margin
    return bool(np.all(points >= low) and np.all(points <= high))


def _place(rng, models, worlds, present, settings, grid, subject_id):
    """Scanner-frame vertices and 4x4 image-to-world transforms of the present parts, with no
    shared voxel and every part inside the box; masks per part."""
    for _ in range(PLACEMENT_TRIES):
        body = geometry.random_rotation(rng, settings.body_rotation_deg)
        shift = rng.uniform(-settings.body_shift_mm, settings.body_shift_mm, 3)
        placed = {}
        for k, model in enumerate(models):
            part = model.part
            rotation = body @ geometry.random_rotation(rng, part.max_rotation_deg)
            centre = body @ (np.asarray(part.centre_mm) + rng.uniform(-part.jitter_mm, part.jitter_mm, 3)) + shift
            if not present[k]:
                continue
            world = worlds[k]
            # world = R @ local + t: the part's centroid lands on `centre` (rotation: scanner axes -> world)
            local = (world - world.mean(0)) @ rotation + centre
            image_to_world = np.eye(4)
            image_to_world[:3, :3], image_to_world[:3, 3] = rotation, world.mean(0) - rotation @ centre
            placed[k] = (local, image_to_world)
        if not all(_inside(local, grid, settings.min_margin_mm) for local, _ in placed.values()):
            continue
        masks = {k: voxelize(models[k].polydata(local), grid) for k, (local, _) in placed.items()}
        if sum(m.astype(np.int32) for m in masks.values()).max() <= 1:
            return placed, masks
    raise ValueError(f"subject {subject_id}: no placement of its parts inside multi_anatomy.size_mm "
                     f"{list(settings.size_mm)} without two parts sharing a voxel in {PLACEMENT_TRIES} tries; "
                     f"enlarge the box or move the parts' centre_mm apart")


def _body(rng, grid: Grid, shape) -> np.ndarray:
    """Soft tissue inside an elliptic body outline (fat under the skin), air outside."""
    points = grid.physical_points()
    half = 0.5 * np.asarray(grid.size) * np.asarray(grid.spacing)
    radial = np.hypot(points[..., 0] / (0.95 * half[0]), points[..., 1] / (0.95 * half[1]))
    spacing = min(grid.spacing)
    hu = 40.0 + 12.0 * smooth_noise(rng, shape, 3.0 / spacing)
    fat = soft_inside((0.85 - radial) * half[1], 3.0)
    hu = hu * (1 - fat) - 95.0 * fat
    air = soft_inside((1.0 - radial) * half[1], 1.0)
    hu = hu * (1 - air) - 1000.0 * air
    hu = blur(hu.astype(np.float32), grid, 0.6 * spacing)
    return hu + rng.normal(0.0, 20.0, size=hu.shape).astype(np.float32)


def synthesize_subject(models: list[PartModel], settings: MultiAnatomySettings, index: int, subject_id: str,
                       split: str, group: str, root: Path) -> tuple[dict, dict]:
    start = time.perf_counter()
    entropy = subject_entropy(settings.seed, settings.test_seed, index, split)
    rng = np.random.default_rng(entropy)
    present = np.ones(len(models), bool)
    if rng.random() < settings.missing_fraction:
        present[rng.integers(len(models))] = False
    params, worlds, anchors = [], [], []
    for k, model in enumerate(models):
        p = model.anatomy.sample_parameters(np.random.default_rng([*entropy, k + 1]),
                                            model.anatomy.groups[0])
        world, anchor = model.world(p)
        params.append(p), worlds.append(world), anchors.append(anchor)
    grid = settings.grid()
    placed, masks = _place(rng, models, worlds, present, settings, grid, subject_id)

    image = _body(rng, grid, grid.shape)
    labels = np.zeros(grid.shape, np.uint8)
    files = {"image": f"data/images/{subject_id}.nrrd", "labels": f"data/labels/{subject_id}.nrrd"}
    truth = {"id": subject_id}
    for k, model in enumerate(models):
        name = model.part.name
        truth[f"{name}.present"] = int(present[k])
        truth.update({f"{name}.{key}": value for key, value in params[k].items()})
        part_files = {"mesh": f"data/meshes/{subject_id}_{name}.vtk",
                      "local_particles": f"data/particles/{subject_id}_{name}_local.particles",
                      "world_particles": f"data/particles/{subject_id}_{name}_world.particles",
                      "transform": f"data/transforms/{subject_id}_{name}.txt"}
        files[f"present_{name}"], files[f"label_{name}"] = int(present[k]), k + 1
        files.update({f"{kind}_{name}": (path if present[k] else "") for kind, path in part_files.items()})
        if not present[k]:
            continue
        local, image_to_world = placed[k]
        mask = masks[k]
        labels[mask > 0] = k + 1
        # the part's own renderer draws it and its surroundings in its anatomy's (unmirrored) world frame
        own_frame = np.eye(4)
        own_frame[:3, :3] = model.flip
        distance = signed_distance(mask, grid)
        scan = Scan(grid, mask, distance, own_frame @ image_to_world, anchors[k], params[k])
        rendered = model.anatomy.render(rng, scan).astype(np.float32)
        keep = soft_inside(distance - CONTEXT_MM[model.part.anatomy], 2.0)
        image = image * (1 - keep) + rendered * keep
        model.polydata(local).save(root / part_files["mesh"], binary=True)
        write_particles(root / part_files["local_particles"], local[model.point_ids])
        write_particles(root / part_files["world_particles"], worlds[k][model.point_ids])
        write_transform(root / part_files["transform"], image_to_world)
        truth.update({f"{name}.pose_rotation_{a}_deg": v
                      for a, v in zip("xyz", _rotation_vector_deg(image_to_world[:3, :3]))})
        truth.update({f"{name}.centre_{a}_mm": v for a, v in zip("xyz", local.mean(0))})
    write_image(np.clip(np.rint(image), -1024, 3071).astype(np.int16), grid, root / files["image"])
    write_image(labels, grid, root / files["labels"])
    print(f"{subject_id}: parts {[m.part.name for m, p in zip(models, present) if p]} grid {grid.size} "
          f"in {time.perf_counter() - start:.1f}s", flush=True)
    return files, truth


def generate_multi_anatomy_cohort(settings: MultiAnatomySettings, out_dir: Path, prefix: str = "subject",
                                  workers: int = 1) -> pd.DataFrame:
    """Generate the cohort into out_dir (subjects.csv, ground_truth.csv, data/), staged so that a
    failure leaves no partial cohort."""
    out_dir = Path(out_dir)
    models = [PartModel(part, settings) for part in settings.parts]
    plan = subject_plan(prefix, settings)
    with staged(out_dir, ["data", "subjects.csv", "ground_truth.csv"]) as staging:
        for sub in ("images", "labels", "meshes", "particles", "transforms"):
            (staging / "data" / sub).mkdir(parents=True)
        jobs = [(models, settings, i, row.id, row.split, row.group, staging)
                for i, row in enumerate(plan.itertuples())]
        subjects, ground_truth = run_subjects(synthesize_subject, jobs, plan, workers)
        subjects.to_csv(staging / "subjects.csv", index=False)
        ground_truth.to_csv(staging / "ground_truth.csv", index=False)
        for model in models:
            folder = staging / "data/template" / model.part.name
            folder.mkdir(parents=True)
            model.polydata(model.template_vertices).save(folder / "mesh.vtk", binary=True)
            write_particles(folder / "points.particles", model.template_vertices[model.point_ids])
            np.savetxt(folder / "point_ids.txt", model.point_ids, fmt="%d")
        record = asdict(settings)
        if record["test_seed"] is None:
            del record["test_seed"]
        record["parts"] = {p.name: {k: v for k, v in asdict(p).items() if k != "name"} for p in settings.parts}
        metadata = {
            "kind": "multi_anatomy", "modality": "CT", "generator_version": __version__,
            "parts": {m.part.name: {"anatomy": m.part.anatomy, "label": k + 1, "mirror": m.part.mirror}
                      for k, m in enumerate(models)},
            "settings": record, "n_subjects": len(subjects), "n_particles": settings.n_particles,
            "units": "mm", "transform": "4x4 per part, maps image (scanner) frame points to the part's world frame",
            "labels": "data/labels/{id}.nrrd: 0 background, each part's label as in `parts`",
        }
        (staging / "data/cohort.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return subjects
