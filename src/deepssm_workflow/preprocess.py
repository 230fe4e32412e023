"""Segmentation-free preprocessing: every image into the world frame and resolution of the networks.

Training images are resampled with the transforms of the shape model. Test and
new images use the image alone: rigid, then similarity registration to the
reference training image (keeping the scale only when the shape model's own
alignment scales). Both then share one crop (bounding box of all
training shapes plus a margin), one voxel size (the reference's finest spacing
times the downsampling factor, with Gaussian anti-aliasing) and one intensity
normalization (mean and standard deviation of the training images only).

Artifacts (results/{dataset}/preprocess/):
    grid.json      reference id, world grid, normalization, settings
    reference.nrrd reference image in the world frame (the registration target)
    train.npz      ids, images (N, Z, Y, X) float32, image_to_world (N, 4, 4)
    test.npz       same for test images, image_to_world estimated by registration
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

REGISTRATION_SEED = 7  # metric sampling is random; a fixed seed keeps reruns identical
CONTEXT_MM = 20.0  # extra field around the crop in the registration target
SCALE_RANGE = (0.67, 1.5)  # plausible size ratios between two subjects of one anatomy


@dataclass(frozen=True)
class WorldGrid:
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]  # x, y, z

    @classmethod
    def around(cls, points: np.ndarray, spacing: float, margin_mm: float) -> "WorldGrid":
        lower = points.reshape(-1, 3).min(0) - margin_mm
        upper = points.reshape(-1, 3).max(0) + margin_mm
        size = np.ceil((upper - lower) / spacing).astype(int) + 1
        return cls(tuple(lower.tolist()), (float(spacing),) * 3, tuple(int(s) for s in size))

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


def read_image(path) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


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


# ----------------------------------------------------------------------------
# registration of an image with no segmentation and no particles


def register_to_reference(moving: sitk.Image, reference: sitk.Image, keep_scale: bool,
                          seed: int = REGISTRATION_SEED) -> tuple[sitk.Transform, float]:
    """Rigid, then similarity registration of an image onto the world-frame reference.

    Returns the world -> image transform and the final metric. The similarity stage is
    what makes a smaller or larger head or bone align (a rigid fit of different sizes
    has no clear optimum). When the shape model itself is rigid (`keep_scale` False)
    the scale is then dropped: rotation and the mapping of the reference's centre are
    kept, so test images are aligned exactly as the training images are. Normalized
    correlation ignores the intensity scale that differs between scans (MRI gain).
    """
    spacing = reference.GetSpacing()[0]
    sigma = antialias_sigma(moving.GetSpacing(), spacing)
    moving = sitk.SmoothingRecursiveGaussian(moving, sigma) if sigma > 0 else moving
    initial = sitk.CenteredTransformInitializer(reference, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    rigid, _ = _register(reference, moving, initial, [2, 1], [2 * spacing, spacing], seed)
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(rigid.GetCenter())
    similarity.SetMatrix(rigid.GetMatrix())
    similarity.SetTranslation(rigid.GetTranslation())
    similarity, metric = _register(reference, moving, similarity, [1], [0.0], seed)
    if not SCALE_RANGE[0] < similarity.GetScale() < SCALE_RANGE[1]:
        # an implausible size change means the similarity stage diverged; the rigid result stands
        print(f"similarity registration gave scale {similarity.GetScale():.3f}; keeping the rigid result", flush=True)
        return rigid, float("nan")
    if keep_scale:
        return similarity, metric
    center = np.array(reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()]))
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(center.tolist())
    rigid.SetMatrix((np.array(similarity.GetMatrix()).reshape(3, 3) / similarity.GetScale()).ravel().tolist())
    rigid.SetTranslation((np.array(similarity.TransformPoint(center.tolist())) - center).tolist())
    return rigid, metric


def _register(fixed, moving, initial, shrink, smooth_mm, seed):
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.NONE)  # every voxel: the grids are small, the metric smooth
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=4.0, minStep=0.01, numberOfIterations=200,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smooth_mm)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(initial, inPlace=False)
    result = method.Execute(fixed, moving)
    # Execute wraps the optimized transform in a composite; unwrap it to its own type.
    optimized = type(initial)(sitk.CompositeTransform(result).GetBackTransform())
    return optimized, float(method.GetMetricValue())


def uses_scaling(image_to_world: np.ndarray, tolerance: float = 1e-3) -> bool:
    """Whether a shape model's image -> world transforms scale (similarity) or not (rigid)."""
    scales = np.cbrt(np.abs(np.linalg.det(image_to_world[:, :3, :3])))
    return bool(np.any(np.abs(scales - 1.0) > tolerance))


def registration_errors(estimated: np.ndarray, true: np.ndarray, world_points: np.ndarray) -> tuple[float, float]:
    """(rotation error in degrees, translation error in mm at the shape's centroid) of an
    estimated image -> world transform against the true one."""
    est_inv, true_inv = np.linalg.inv(estimated), np.linalg.inv(true)
    rotation = est_inv[:3, :3] / np.cbrt(np.linalg.det(est_inv[:3, :3]))
    cosine = (np.trace(rotation @ true_inv[:3, :3].T / np.cbrt(np.linalg.det(true_inv[:3, :3]))) - 1) / 2
    centroid = world_points.mean(0)
    shift = (est_inv[:3, :3] @ centroid + est_inv[:3, 3]) - (true_inv[:3, :3] @ centroid + true_inv[:3, 3])
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))), float(np.linalg.norm(shift))


# ----------------------------------------------------------------------------
# the two stages


@dataclass(frozen=True)
class PreprocessSettings:
    downsample: float
    margin_mm: float
    registration: str = "auto"  # rigid | similarity | auto: similarity iff the shape model's transforms scale

    @classmethod
    def from_config(cls, cfg: dict) -> "PreprocessSettings":
        return cls(float(cfg["downsample"]), float(cfg["margin_mm"]), cfg.get("registration", "auto"))


def preprocess_training(cohort_dir, settings: PreprocessSettings, out_dir) -> dict:
    """Reference, grid, normalization and the training images, from the cohort's training shapes."""
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    shapes = np.load(cohort_dir / "shapes_train.npz")
    images = _image_table(cohort_dir).set_index("id")
    ids = [str(i) for i in shapes["ids"]]
    reference_index = choose_reference(shapes["world"])
    reference_id = ids[reference_index]
    reference_raw = read_image(images.loc[reference_id, "image"])
    spacing = settings.downsample * min(reference_raw.GetSpacing())
    grid = WorldGrid.around(shapes["world"], spacing, settings.margin_mm)

    arrays = []
    for subject_id, image_to_world in zip(ids, shapes["image_to_world"]):
        world_to_image = affine(np.linalg.inv(image_to_world))
        raw = reference_raw if subject_id == reference_id else read_image(images.loc[subject_id, "image"])
        arrays.append(resample_to_world(raw, world_to_image, grid))
    stack = np.stack(arrays).astype(np.float32)
    mean, std = float(stack.mean(dtype=np.float64)), float(stack.std(dtype=np.float64))
    if not std > 0:
        raise ValueError(f"{cohort_dir}: training images have no intensity variation; cannot normalize")

    # registration target: the reference at the output resolution, with context around the crop
    target_grid = grid.grown(CONTEXT_MM, spacing)
    world_to_reference = affine(np.linalg.inv(shapes["image_to_world"][reference_index]))
    target = target_grid.reference_image()
    target = sitk.Resample(reference_raw, target, world_to_reference, sitk.sitkLinear,
                           float(np.median(sitk.GetArrayViewFromImage(reference_raw))), sitk.sitkFloat32)

    meta = {
        "reference_id": reference_id,
        "reference_rule": "medoid: least mean RMS point distance to the other training shapes (world frame)",
        "grid": asdict(grid),
        "normalization": {"mean": mean, "std": std, "from": "all voxels of the resampled training images"},
        "registration": registration_mode(settings.registration, shapes["image_to_world"]),
        "settings": asdict(settings),
    }
    with staged(out_dir, ["train.npz", "reference.nrrd", "grid.json"]) as staging:
        np.savez(staging / "train.npz", ids=np.array(ids), images=(stack - mean) / std,
                 image_to_world=shapes["image_to_world"])
        sitk.WriteImage(target, str(staging / "reference.nrrd"), useCompression=True)
        (staging / "grid.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def registration_mode(requested: str, image_to_world: np.ndarray) -> dict:
    """Transform class for unseen images: that of the shape model's own alignment unless forced."""
    scaling = uses_scaling(image_to_world)
    if requested == "auto":
        return {"transform": "similarity" if scaling else "rigid",
                "why": "the training transforms " + ("scale" if scaling else "are rigid (unit scale)")}
    return {"transform": requested, "why": "set in the config"}


def load_reference(preprocess_dir) -> tuple[dict, WorldGrid, sitk.Image]:
    preprocess_dir = Path(preprocess_dir)
    meta = json.loads((preprocess_dir / "grid.json").read_text())
    grid = WorldGrid(**{k: tuple(v) for k, v in meta["grid"].items()})
    return meta, grid, read_image(preprocess_dir / "reference.nrrd")


def preprocess_image(path, meta: dict, grid: WorldGrid, reference: sitk.Image) -> tuple[np.ndarray, np.ndarray, float]:
    """A new image, from its file alone: (normalized world-frame array, image_to_world, metric)."""
    image = read_image(path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: a 3D scalar image is needed, found {image.GetDimension()}D with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel")
    keep_scale = meta["registration"]["transform"] == "similarity"
    world_to_image, metric = register_to_reference(image, reference, keep_scale)
    array = resample_to_world(image, world_to_image, grid)
    norm = meta["normalization"]
    return (array - norm["mean"]) / norm["std"], np.linalg.inv(matrix_of(world_to_image)), metric


def preprocess_unseen(cohort_dir, preprocess_dir, split: str, out_path) -> None:
    """Preprocess every image of a split from the image alone (no segmentation, no particles)."""
    meta, grid, reference = load_reference(preprocess_dir)
    table = _image_table(Path(cohort_dir))
    table = table[table["split"] == split]
    arrays, transforms, metrics, seconds = [], [], [], []
    for row in table.itertuples():
        start = time.perf_counter()
        try:
            array, image_to_world, metric = preprocess_image(row.image, meta, grid, reference)
        except (RuntimeError, ValueError) as error:  # SimpleITK reports unreadable files as RuntimeError
            raise ValueError(f"subject {row.id}: {row.image}: cannot preprocess: {str(error).strip()}") from None
        arrays.append(array)
        transforms.append(image_to_world)
        metrics.append(metric)
        seconds.append(time.perf_counter() - start)
        print(f"{row.id}: registered (metric {metric:.4f}) in {seconds[-1]:.1f}s", flush=True)
    out_path = Path(out_path)
    with staged(out_path.parent, [out_path.name]) as staging:
        np.savez(staging / out_path.name, ids=table["id"].to_numpy(str), images=np.stack(arrays).astype(np.float32),
                 image_to_world=np.stack(transforms), registration_metric=np.array(metrics), seconds=np.array(seconds))


def _image_table(cohort_dir: Path) -> pd.DataFrame:
    """Only the columns this stage may use: which image, which split. Never particles or segmentations."""
    return pd.read_csv(cohort_dir / "subjects.csv", usecols=["id", "split", "image"], dtype={"id": str})



def registration_accuracy(cohort_dir, preprocess_dir, split: str = "test") -> pd.DataFrame:
    """Per-subject rotation (deg) and translation (mm, at the shape centroid) error of the
    image-only registration against the shape model's transforms. Evaluation only: it reads
    the split's particles, which preprocessing itself never does."""
    truth = np.load(Path(cohort_dir) / f"shapes_{split}.npz")
    estimated = np.load(Path(preprocess_dir) / f"{split}.npz")
    index = {subject: i for i, subject in enumerate(truth["ids"])}
    rows = []
    for subject, transform in zip(estimated["ids"], estimated["image_to_world"]):
        i = index[subject]
        rotation, translation = registration_errors(transform, truth["image_to_world"][i], truth["world"][i])
        rows.append({"id": str(subject), "rotation_deg": rotation, "translation_mm": translation})
    return pd.DataFrame(rows)
