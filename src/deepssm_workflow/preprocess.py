"""Segmentation-free preprocessing: every image into the world frame and resolution of the networks.

Training images are resampled with the transforms of the shape model. Test and
new images use the image alone: a registration to the reference training image
(rigid, or similarity when the shape model's own alignment scales) that stays
near the poses of the training cohort (see `registration`). Both then share one crop (bounding box of all
training shapes plus a margin; or, with `grid_size`, a grid of that many voxels centred on that box, which
the shapes plus the margin must fit), one voxel size (the reference's finest spacing
times the downsampling factor, with Gaussian anti-aliasing) and one intensity
normalization (mean and standard deviation of the training images only).

Artifacts (results/{dataset}/preprocess/):
    grid.json      reference id, world grid, normalization, settings
    reference.nrrd reference image in the world frame (the registration target)
    train.npz      ids, images (N, Z, Y, X) float32, image_to_world (N, 4, 4)
    test.npz       same for test images, image_to_world estimated by registration, and per scan
                   how the registration went: registration_{metric, iterations, start,
                   rotation_from_prior_deg, scale, fallback, warning}, seconds
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .atomic import staged
from .registration import RegistrationPrior, field_centre, metric_at, register, registration_errors
from .scan_checks import ScanError, read_scan
from .shape_space import rms3d, rmse

CONTEXT_MM = 20.0  # extra field around the crop in the registration target
MIN_GRID_VOXELS = 8  # the networks' three 2x max-pools (models.ModelConfig.pool_after) need 8 voxels per axis


class GridTooSmall(ValueError):
    """The shapes plus the margin need more voxels than a fixed grid size gives."""

    def __init__(self, needed: tuple[int, int, int], size: tuple[int, int, int], spacing: float):
        self.needed, self.size, self.spacing = needed, size, spacing
        super().__init__(f"the shapes plus the margin need a grid of {_voxels(needed)} voxels of "
                         f"{spacing:g} mm, more than the fixed size {_voxels(size)} along "
                         f"{', '.join(a for a, n, s in zip('xyz', needed, size) if n > s)}")


def _voxels(size) -> str:
    return "x".join(str(int(n)) for n in size)


@dataclass(frozen=True)
class WorldGrid:
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]  # x, y, z

    @classmethod
    def around(cls, points: np.ndarray, spacing: float, margin_mm: float, size=None) -> "WorldGrid":
        """The grid of `spacing` covering the bounding box of `points` plus `margin_mm` on every side:
        the smallest such grid, or, with `size` (x, y, z voxels), one of that size centred on the
        bounding box; GridTooSmall if the box plus the margin does not fit in it."""
        lower = points.reshape(-1, 3).min(0) - margin_mm
        upper = points.reshape(-1, 3).max(0) + margin_mm
        needed = np.ceil((upper - lower) / spacing).astype(int) + 1
        if size is None:
            return cls(tuple(lower.tolist()), (float(spacing),) * 3, tuple(int(s) for s in needed))
        size = np.array([int(s) for s in size])
        if size.shape != (3,):
            raise ValueError(f"a grid size is 3 voxel counts (x, y, z), not {size.tolist()}")
        if np.any(needed > size):
            raise GridTooSmall(tuple(int(n) for n in needed), tuple(int(s) for s in size), float(spacing))
        origin = 0.5 * (lower + upper) - 0.5 * spacing * (size - 1)
        return cls(tuple(origin.tolist()), (float(spacing),) * 3, tuple(int(s) for s in size))

    def reference_image(self) -> sitk.Image:
        image = sitk.Image([int(s) for s in self.size], sitk.sitkFloat32)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        return image

    def grown(self, margin_mm: float, spacing: float) -> "WorldGrid":
        """A grid covering this one plus `margin_mm` on every side, at another spacing."""
        lower = np.array(self.origin) - margin_mm
        upper = np.array(self.origin) + np.array(self.spacing) * (np.array(self.size) - 1) + margin_mm
        size = np.ceil((upper - lower) / spacing).astype(int) + 1
        return WorldGrid(tuple(lower.tolist()), (float(spacing),) * 3, tuple(int(s) for s in size))


# ----------------------------------------------------------------------------
# transforms


def affine(matrix: np.ndarray) -> sitk.AffineTransform:
    """A 4x4 matrix as a SimpleITK transform (maps resampling output points to input points)."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return transform


def matrix_of(transform: sitk.Transform) -> np.ndarray:
    """4x4 matrix of a SimpleITK rigid/similarity/affine transform: x -> A (x - c) + c + t."""
    a = np.array(transform.GetMatrix()).reshape(3, 3)
    c = np.array(transform.GetCenter())
    t = np.array(transform.GetTranslation())
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = a, c + t - a @ c
    return m


def choose_reference(world: np.ndarray) -> int:
    """Medoid of the training shapes: least mean RMS point distance to all others.

    Shapes are already aligned in the world frame, so plain point distances apply.
    """
    flat = world.reshape(len(world), -1)
    squared = (flat**2).sum(1)
    gram = flat @ flat.T
    rms = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * gram, 0.0) / world.shape[1])
    return int(np.argmin(rms.mean(1)))


# ----------------------------------------------------------------------------
# resampling


def read_image(path, what: str | None = None) -> sitk.Image:
    """A checked scan (see `scan_checks.read_scan`) as float32; errors name `what` (default: the path)."""
    return sitk.Cast(read_scan(path, what or str(path)), sitk.sitkFloat32)


def smoothed_to(image: sitk.Image, spacing: float) -> sitk.Image:
    """The scan anti-aliased and resampled to `spacing` on its own field of view: all the
    registration can use at that resolution, at a fraction of the voxels."""
    sigma = antialias_sigma(image.GetSpacing(), spacing)
    if sigma == 0:
        return image
    smoothed = sitk.SmoothingRecursiveGaussian(image, sigma)
    size = [max(2, int(np.ceil(n * s / spacing))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetOrigin(image.GetOrigin())
    grid.SetDirection(image.GetDirection())
    grid.SetSpacing([spacing] * 3)
    fill = float(np.median(sitk.GetArrayViewFromImage(image)))
    return sitk.Resample(smoothed, grid, sitk.Transform(), sitk.sitkLinear, fill, sitk.sitkFloat32)


def antialias_sigma(input_spacing, output_spacing: float) -> float:
    """Gaussian sigma (mm) that removes what the coarser grid cannot represent."""
    finest = float(min(input_spacing))
    if output_spacing <= finest:
        return 0.0
    return 0.5 * float(np.sqrt(output_spacing**2 - finest**2))


def resample_to_world(image: sitk.Image, world_to_image: sitk.Transform, grid: WorldGrid) -> np.ndarray:
    """Image values on the world grid (z, y, x); outside the scan's field, the scan's median."""
    sigma = antialias_sigma(image.GetSpacing(), grid.spacing[0])
    smoothed = sitk.SmoothingRecursiveGaussian(image, sigma) if sigma > 0 else image
    fill = float(np.median(sitk.GetArrayViewFromImage(image)))
    resampled = sitk.Resample(smoothed, grid.reference_image(), world_to_image, sitk.sitkLinear, fill, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def uses_scaling(image_to_world: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Whether a shape model's image -> world transforms scale (similarity) or not (rigid)."""
    scales = np.cbrt(np.abs(np.linalg.det(image_to_world[:, :3, :3])))
    return bool(np.any(np.abs(scales - 1.0) > tolerance))


# ----------------------------------------------------------------------------
# the two stages


@dataclass(frozen=True)
class PreprocessSettings:
    downsample: float
    margin_mm: float
    registration: str = "auto"  # rigid | similarity | auto: similarity iff the shape model's transforms scale
    grid_size: tuple[int, int, int] | None = None  # x, y, z voxels; None: the shapes' bounding box plus the margin

    @classmethod
    def from_config(cls, cfg: dict) -> "PreprocessSettings":
        size = cfg.get("grid_size")
        return cls(float(cfg["downsample"]), float(cfg["margin_mm"]), cfg.get("registration", "auto"),
                   None if size is None else tuple(int(n) for n in size))


def preprocess_training(cohort_dir, settings: PreprocessSettings, out_dir) -> dict:
    """Reference, grid, normalization and the training images, from the cohort's training shapes."""
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    shapes = np.load(cohort_dir / "shapes_train.npz")
    images = _image_table(cohort_dir).set_index("id")
    ids = [str(i) for i in shapes["ids"]]
    reference_index = choose_reference(shapes["world"])
    reference_id = ids[reference_index]
    reference_path = images.loc[reference_id, "image"]
    reference_raw = read_image(reference_path, f"subject {reference_id}: {reference_path}")
    spacing = settings.downsample * min(reference_raw.GetSpacing())
    try:
        grid = WorldGrid.around(shapes["world"], spacing, settings.margin_mm, settings.grid_size)
    except GridTooSmall as error:  # never crop the shapes
        raise ValueError(f"{cohort_dir}: the training shapes plus preprocess.margin_mm {settings.margin_mm:g} mm "
                         f"need {_voxels(error.needed)} voxels of {spacing:g} mm (preprocess.downsample "
                         f"{settings.downsample:g} x the scans' {min(reference_raw.GetSpacing()):g} mm), but "
                         f"preprocess.grid_size is {_voxels(error.size)} (too small along "
                         f"{', '.join(a for a, n, m in zip('xyz', error.needed, error.size) if n > m)}): raise "
                         f"grid_size or downsample, lower margin_mm, or shorten the shapes (a synthetic "
                         f"cohort's synthetic.extent)") from None
    if min(grid.size) < MIN_GRID_VOXELS:  # found here, not after augmentation when training starts
        raise ValueError(f"{cohort_dir}: the network grid would be {'x'.join(map(str, grid.size))} voxels of "
                         f"{spacing:g} mm (preprocess.downsample {settings.downsample:g} x the scans' "
                         f"{min(reference_raw.GetSpacing()):g} mm); the networks need at least {MIN_GRID_VOXELS} "
                         f"per axis: lower preprocess.downsample or raise preprocess.margin_mm")

    # registration target: the reference at the output resolution, with context around the crop
    target_grid = grid.grown(CONTEXT_MM, spacing)
    world_to_reference = affine(np.linalg.inv(shapes["image_to_world"][reference_index]))
    target = sitk.Resample(smoothed_to(reference_raw, spacing), target_grid.reference_image(), world_to_reference,
                           sitk.sitkLinear, float(np.median(sitk.GetArrayViewFromImage(reference_raw))),
                           sitk.sitkFloat32)
    mode = registration_mode(settings.registration, shapes["image_to_world"])
    prior = RegistrationPrior.from_training(mode["transform"], mode["scale_search"], shapes["image_to_world"],
                                            shapes["world"], reference_index)

    arrays, metrics, field_centres = [], [], []
    for subject_id, image_to_world in zip(ids, shapes["image_to_world"]):
        world_to_image = affine(np.linalg.inv(image_to_world))
        path = images.loc[subject_id, "image"]
        raw = reference_raw if subject_id == reference_id else read_image(path, f"subject {subject_id}: {path}")
        arrays.append(resample_to_world(raw, world_to_image, grid))
        # what a correct registration of this cohort's scans scores and where it puts the anatomy: the
        # yardsticks for unseen ones (measured on the scan as registration sees it)
        smoothed = smoothed_to(raw, spacing)
        metrics.append(metric_at(smoothed, target, world_to_image))
        field_centres.append(field_centre(smoothed))
    prior = prior.with_training_scans(np.array(metrics), np.linalg.inv(shapes["image_to_world"]),
                                      np.array(field_centres))
    stack = np.stack(arrays).astype(np.float32)
    mean, std = float(stack.mean(dtype=np.float64)), float(stack.std(dtype=np.float64))
    if not std > 0:
        raise ValueError(f"{cohort_dir}: training images have no intensity variation; cannot normalize")

    meta = {
        "reference_id": reference_id,
        "reference_rule": "medoid: least mean RMS point distance to the other training shapes (world frame)",
        "grid": asdict(grid),
        "grid_size_fixed": settings.grid_size is not None,
        "grid_rule": (f"fixed size (preprocess.grid_size), centred on the bounding box of all training shapes; "
                      f"they need {_voxels(WorldGrid.around(shapes['world'], spacing, settings.margin_mm).size)} "
                      f"with the margin" if settings.grid_size is not None
                      else "bounding box of all training shapes plus preprocess.margin_mm"),
        "normalization": {"mean": mean, "std": std, "from": "all voxels of the resampled training images"},
        "registration": {**mode, "prior": asdict(prior)},
        "settings": asdict(settings),
    }
    with staged(out_dir, ["train.npz", "reference.nrrd", "grid.json"]) as staging:
        np.savez(staging / "train.npz", ids=np.array(ids), images=(stack - mean) / std,
                 image_to_world=shapes["image_to_world"])
        sitk.WriteImage(target, str(staging / "reference.nrrd"), useCompression=True)
        (staging / "grid.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def registration_mode(requested: str, image_to_world: np.ndarray) -> dict:
    """How unseen images are registered: the transform class of the result (that of the shape
    model's own alignment unless forced) and whether a similarity stage searches the size."""
    scaling = uses_scaling(image_to_world)
    if requested == "auto":
        return {"transform": "similarity" if scaling else "rigid", "scale_search": True,
                "why": "the training transforms " + ("scale" if scaling else "are rigid (unit scale): rigid pose "
                                                     "from a checked similarity fit, scale dropped")}
    return {"transform": requested, "scale_search": requested == "similarity", "why": "set in the config"}


def load_grid(preprocess_dir) -> tuple[dict, WorldGrid]:
    """grid.json: its content and the world grid of the networks' input."""
    meta = json.loads((Path(preprocess_dir) / "grid.json").read_text())
    return meta, WorldGrid(**{k: tuple(v) for k, v in meta["grid"].items()})


def load_reference(preprocess_dir) -> tuple[dict, WorldGrid, sitk.Image]:
    meta, grid = load_grid(preprocess_dir)
    return meta, grid, read_image(Path(preprocess_dir) / "reference.nrrd")


def preprocess_image(path, meta: dict, grid: WorldGrid, reference: sitk.Image,
                     what: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """A new image, from its file alone: (normalized world-frame array, image_to_world, the
    registration's record: metric, iterations, warnings, ... see `Registration.facts`)."""
    image = read_image(path, what)
    prior = RegistrationPrior.from_dict(meta["registration"]["prior"])
    registration = register(smoothed_to(image, grid.spacing[0]), reference, prior)
    array = resample_to_world(image, registration.world_to_image, grid)
    norm = meta["normalization"]
    image_to_world = np.linalg.inv(matrix_of(registration.world_to_image))
    return (array - norm["mean"]) / norm["std"], image_to_world, registration.facts()


def preprocess_unseen(cohort_dir, preprocess_dir, split: str, out_path, ids=None) -> None:
    """Preprocess every image of a split (or its subjects `ids`: the registered validation subjects) from the
    image alone (no segmentation, no particles)."""
    table = _image_table(Path(cohort_dir))
    table = table[table["split"] == split]
    if ids is not None:  # checked before anything is read or written
        missing = sorted(set(ids) - set(table["id"]))
        if missing:
            raise ValueError(f"{cohort_dir}/subjects.csv: no {split} subject {missing[0]}")
        table = table.set_index("id").loc[list(ids)].reset_index()
    meta, grid, reference = load_reference(preprocess_dir)
    arrays, transforms, records = [], [], []
    for row in table.itertuples():
        start = time.perf_counter()
        what = f"subject {row.id}: {row.image}"
        try:
            array, image_to_world, record = preprocess_image(row.image, meta, grid, reference, what)
        except ScanError:
            raise
        except (RuntimeError, ValueError) as error:  # SimpleITK reports its failures as RuntimeError
            raise ValueError(f"{what}: cannot preprocess: {str(error).strip()}") from None
        record["seconds"] = time.perf_counter() - start
        arrays.append(array)
        transforms.append(image_to_world)
        records.append(record)
        print(f"{row.id}: registered in {record['seconds']:.2f}s (metric {record['metric']:.4f}, "
              f"{record['iterations']} iterations, start {record['start']}, "
              f"{record['rotation_from_prior_deg']:.1f} deg from the training poses)", flush=True)
        for message in filter(None, (record["fallback"], record["warning"])):
            print(f"WARNING: subject {row.id}: {row.image}: {message}", flush=True)
    out_path = Path(out_path)
    columns = {f"registration_{key}": np.array([r[key] for r in records])
               for key in records[0] if key != "seconds"} if records else {}
    with staged(out_path.parent, [out_path.name]) as staging:
        np.savez(staging / out_path.name, ids=table["id"].to_numpy(str), images=np.stack(arrays).astype(np.float32),
                 image_to_world=np.stack(transforms), seconds=np.array([r["seconds"] for r in records]), **columns)


def _image_table(cohort_dir: Path) -> pd.DataFrame:
    """Only the columns this stage may use: which image, which split. Never particles or segmentations."""
    return pd.read_csv(cohort_dir / "subjects.csv", usecols=["id", "split", "image"], dtype={"id": str})



def registration_accuracy(cohort_dir, preprocess_dir, split: str = "test") -> pd.DataFrame:
    """Per-subject error of the image-only registration against the shape model's transforms:
    rotation (deg), translation (mm, at the shape centroid), the angle (deg) between the true
    and estimated direction of the shape's longest principal axis (signed: a flip reads ~180,
    and it stays small on a shape symmetric about that axis, where the full rotation cannot be
    known from the image), and the alignment error (mm): the true world shape placed in the scan
    through the estimated transform, against the true scan-frame shape, as paper eq. 12
    (alignment_rmse_mm) and as 3D RMS (alignment_rms3d_mm, about sqrt(3) times larger). Evaluation
    only: it reads the split's particles, which preprocessing itself never does."""
    truth = np.load(Path(cohort_dir) / f"shapes_{split}.npz")
    estimated = np.load(Path(preprocess_dir) / f"{split}.npz")
    index = {subject: i for i, subject in enumerate(truth["ids"])}
    rows = []
    for subject, transform in zip(estimated["ids"], estimated["image_to_world"]):
        i = index[subject]
        true_transform, world = truth["image_to_world"][i], truth["world"][i]
        rotation, translation = registration_errors(transform, true_transform, world)
        centred = world - world.mean(0)
        axis = np.linalg.svd(centred, full_matrices=False)[2][0]  # longest principal axis (world frame)
        true_axis, est_axis = (np.linalg.inv(m)[:3, :3] @ axis for m in (true_transform, transform))
        cosine = true_axis @ est_axis / (np.linalg.norm(true_axis) * np.linalg.norm(est_axis))
        placed = world @ np.linalg.inv(transform)[:3, :3].T + np.linalg.inv(transform)[:3, 3]
        rows.append({"id": str(subject), "rotation_deg": rotation, "translation_mm": translation,
                     "long_axis_deg": float(np.degrees(np.arccos(np.clip(cosine, -1, 1)))),
                     # both metrics, named: eq. 12 as every error table has it, 3D RMS (rotation-invariant)
                     "alignment_rmse_mm": float(rmse(placed, truth["local"][i])),
                     "alignment_rms3d_mm": float(rms3d(placed, truth["local"][i]))})
    return pd.DataFrame(rows)
