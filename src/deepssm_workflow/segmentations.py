"""Segmentations for training only: each training subject's segmentation on the networks' grid,
and warped into every augmented sample by the thin-plate spline of its image.

Not part of the default run: only a method whose `needs` include SEGMENTATIONS (an auxiliary
segmentation task, Progressive DeepSSM) asks for these two steps. Preprocessing itself stays
segmentation-free, and nothing here reads a test subject: the test path is image-only.

A segmentation is resampled as a label, not as an intensity: each network voxel gets the
fraction of its volume inside the anatomy. The voxel is split into k x k x k sub-voxels
(k = the grid spacing over the segmentation's finest spacing, rounded up, at most
MAX_SUPERSAMPLING), the binary mask is sampled (linearly) at their centres through the
subject's shape-model transform, the same one as its image, and the samples are averaged.
Measured on femurs of 1 mm scans on the 4 mm grid of the default config, this box average
gave each voxel's fraction to 0.009 per foreground voxel (the image's Gaussian anti-aliasing
followed by linear resampling: 0.08, and above 1 by overshoot), Dice 0.997 against the true
fractions thresholded at 0.5 (Gaussian: 0.994), and kept the mask's volume to 0.0001 %.
It keeps thin parts that the image's anti-aliasing blurs away: of 3 mm plates on 4 mm voxels
it kept 99 % of the voxels that are at least half inside (the Gaussian: 70 %), of 2 mm plates
79 % (Gaussian: none), of 4 mm rods 86 % (Gaussian: none), of 6 mm rods 97 % (Gaussian: 52 %);
see tests/test_segmentations.py.

Fractions are stored as uint8 (fraction x 255, rounded; `fractions` reads them back): a
quarter of the float32 image store of the same shape, for a rounding error of at most 0.002,
far below what resampling and warping change.

Artifacts:
    preprocess/train_segmentations.npz   ids (the order of train.npz), segmentations (N, Z, Y, X) uint8,
                                         volume_mm3 (N,): the resampled volume (sum of fractions),
                                         mask_volume_mm3 (N,): the full-resolution mask's volume inside the
                                         grid, mask_total_mm3 (N,): all of it, supersampling (k)
    augmentation/segmentations/segmentations.npy
                                         (n, Z, Y, X) uint8, row i = sample i of samples.npz, written sample by
                                         sample through a memory map; load with mmap_mode="r"
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .atomic import staged
from .preprocess import WorldGrid, affine, load_grid
from .provenance import SIDECAR
from .scan_checks import read_scan
from .tps import warp_image

TRAIN_FILE = "train_segmentations.npz"  # in the preprocess folder (layout.train_segmentations)
SCALE = 255  # stored value = round(fraction x SCALE)
MAX_SUPERSAMPLING = 8  # sub-voxels per axis: at most 512 samples per network voxel
CHUNK_VOXELS = 1 << 24  # sub-voxels resampled at once (64 MiB of float32)
# The resampled volume must match the full-resolution mask's volume inside the grid to this fraction (plus one
# grid voxel, for tiny structures). Measured: at most 0.0001 % on 1 mm femurs on a 4 mm grid (k = 4), 0.003 % on
# the tiny preset's 3 mm femurs on a 3 mm grid (k = 1), 0.09 % on rotated ellipsoids of 8-25 mm radii over
# 1-3 mm (also anisotropic) masks on 1.5-4 mm grids
VOLUME_TOLERANCE = 0.01


def fractions(stored: np.ndarray) -> np.ndarray:
    """Stored uint8 segmentations as float32 fractions of each voxel inside the anatomy, in [0, 1]."""
    return np.asarray(stored, dtype=np.float32) / np.float32(SCALE)


def quantize(fraction: np.ndarray) -> np.ndarray:
    return np.round(np.clip(fraction, 0.0, 1.0) * SCALE).astype(np.uint8)


def supersampling(input_spacing, grid_spacing, world_to_image: np.ndarray) -> int:
    """Sub-voxels per axis: enough that each samples about one voxel of the segmentation."""
    scale = float(np.cbrt(abs(np.linalg.det(world_to_image[:3, :3]))))  # world mm -> image mm
    ratio = max(grid_spacing) * scale / min(input_spacing)
    return int(min(MAX_SUPERSAMPLING, max(1, math.ceil(ratio - 1e-6))))


def label_fraction(mask: sitk.Image, world_to_image: np.ndarray, grid: WorldGrid, k: int) -> np.ndarray:
    """(Z, Y, X) float32: the fraction of each grid voxel inside `mask` (0/1, any pixel type): the mask
    sampled linearly at the centres of k^3 sub-voxels per voxel, through `world_to_image` (4x4), and
    averaged. Outside the mask's field: background."""
    mask = sitk.Cast(mask, sitk.sitkFloat32)
    transform = affine(world_to_image)
    nx, ny, nz = (int(n) for n in grid.size)
    spacing = np.array(grid.spacing, dtype=np.float64)
    fine_spacing = spacing / k
    corner = np.array(grid.origin) - spacing / 2 + fine_spacing / 2  # centre of the first sub-voxel
    planes = max(1, CHUNK_VOXELS // (nx * ny * k**3))
    out = np.empty((nz, ny, nx), dtype=np.float32)
    for z0 in range(0, nz, planes):
        z1 = min(nz, z0 + planes)
        fine = sitk.Image([nx * k, ny * k, (z1 - z0) * k], sitk.sitkFloat32)
        fine.SetOrigin((corner + [0.0, 0.0, z0 * spacing[2]]).tolist())
        fine.SetSpacing(fine_spacing.tolist())
        sampled = sitk.GetArrayFromImage(sitk.Resample(mask, fine, transform, sitk.sitkLinear, 0.0,
                                                       sitk.sitkFloat32))
        out[z0:z1] = sampled.reshape(z1 - z0, k, ny, k, nx, k).mean((1, 3, 5))
    return out


def _mask_volumes(foreground: np.ndarray, image: sitk.Image, image_to_world: np.ndarray,
                  grid: WorldGrid) -> tuple[float, float]:
    """World-frame volume (mm^3) of a full-resolution mask: inside the grid's voxels, and all of it."""
    index_to_physical = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    to_world = image_to_world[:3, :3] @ index_to_physical
    offset = image_to_world[:3, :3] @ np.array(image.GetOrigin()) + image_to_world[:3, 3]
    spacing = np.array(grid.spacing)
    lower = np.array(grid.origin) - spacing / 2
    upper = lower + spacing * np.array(grid.size)
    voxel = float(abs(np.linalg.det(to_world)))
    inside = 0
    step = max(1, (1 << 22) // max(1, foreground[0].size))
    for z0 in range(0, len(foreground), step):
        zyx = np.argwhere(foreground[z0:z0 + step])
        if not len(zyx):
            continue
        zyx[:, 0] += z0
        world = zyx[:, ::-1] @ to_world.T + offset
        inside += int(np.all((world >= lower) & (world < upper), axis=1).sum())
    return inside * voxel, int(foreground.sum()) * voxel


def binary_foreground(array: np.ndarray, what: str) -> np.ndarray:
    """The foreground of a binary segmentation (0 and one positive label); else an error naming `what`."""
    foreground = array != 0  # NaN counts as foreground here and fails the label check below
    labels = array[foreground]
    if labels.size == 0:
        raise ValueError(f"{what}: segmentation is empty (every voxel is 0)")
    low, high = labels.min(), labels.max()
    if not (low == high and low > 0):
        values = np.unique(np.ravel(array)[:: max(1, array.size // 1_000_000)])  # a sample: enough to show
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise ValueError(f"{what}: not a binary segmentation: a label image of 0 (background) and one positive "
                         f"value (the anatomy) is needed; found values {shown}")
    return foreground


def segmentation_table(cohort_dir: Path) -> pd.DataFrame:
    path = cohort_dir / "subjects.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "segmentation" not in table:
        raise ValueError(f"{path}: no `segmentation` column (reingest the cohort with one)")
    return table.set_index("id")


def segmentation_path(table: pd.DataFrame, subject: str, cohort_dir: Path) -> str:
    """A training subject's segmentation file from the cohort table; an error naming the subject if it has none."""
    if subject not in table.index:
        raise ValueError(f"subject {subject}: {cohort_dir / 'subjects.csv'}: not in the cohort table "
                         f"(the preprocessed images are of another cohort: rerun preprocessing)")
    path = table.loc[subject, "segmentation"].strip()
    if not path:
        raise ValueError(f"subject {subject}: {cohort_dir / 'subjects.csv'}: no segmentation (the `segmentation` "
                         f"column is empty); a method that needs segmentations needs one for every training "
                         f"subject")
    return path


def segmentation_on_grid(path, what: str, image_to_world: np.ndarray, grid: WorldGrid) -> tuple[np.ndarray, dict]:
    """One binary segmentation file as the fraction of each voxel of `grid` inside it (Z, Y, X), through
    `image_to_world` (4x4: the segmentation's frame -> the grid's), and what was measured: supersampling,
    the resampled volume, the full-resolution mask's volume inside the grid and in all. A mask that is not
    binary, nothing left on the grid, or a resampled volume that does not match: an error naming `what`."""
    image = read_scan(path, what, intensities=False)
    foreground = binary_foreground(sitk.GetArrayViewFromImage(image), what)
    mask = sitk.GetImageFromArray(foreground.astype(np.uint8))
    mask.CopyInformation(image)
    world_to_image = np.linalg.inv(image_to_world)
    k = supersampling(image.GetSpacing(), grid.spacing, world_to_image)
    fraction = label_fraction(mask, world_to_image, grid, k)
    if not (fraction >= 0.5).any():
        raise ValueError(f"{what}: nothing of the segmentation is left on the network grid (no voxel at least "
                         f"half inside): is it in the frame of the subject's image, over its anatomy?")
    inside, total = _mask_volumes(foreground, image, image_to_world, grid)
    voxel_volume = float(np.prod(grid.spacing))
    volume = float(fraction.sum(dtype=np.float64)) * voxel_volume
    # the check of this step's own result: resampling kept the mask's volume
    if abs(volume - inside) > VOLUME_TOLERANCE * inside + voxel_volume:
        raise ValueError(f"{what}: the resampled segmentation's volume {volume:.0f} mm^3 differs from the "
                         f"full-resolution mask's {inside:.0f} mm^3 inside the grid by more than "
                         f"{100 * VOLUME_TOLERANCE:g} % (and a voxel)")
    return fraction, {"supersampling": k, "volume_mm3": volume, "mask_volume_mm3": inside, "mask_total_mm3": total}


def preprocess_segmentations(cohort_dir, preprocess_dir, out_path) -> dict:
    """Every training subject's segmentation on the preprocess grid (see the module doc), written
    atomically to `out_path` (train_segmentations.npz) in the order of train.npz. A subject without a
    segmentation, one that is not binary, or one with nothing left on the grid: an error naming the
    subject and the file, and nothing written. Returns a summary (per subject: k, volumes)."""
    start = time.perf_counter()
    cohort_dir, preprocess_dir, out_path = Path(cohort_dir), Path(preprocess_dir), Path(out_path)
    _, grid = load_grid(preprocess_dir)
    with np.load(preprocess_dir / "train.npz", allow_pickle=False) as train:
        ids = [str(i) for i in train["ids"]]
        transforms = np.asarray(train["image_to_world"], dtype=np.float64)
    table = segmentation_table(cohort_dir)
    stored, records = [], []
    for subject, image_to_world in zip(ids, transforms):
        path = segmentation_path(table, subject, cohort_dir)
        fraction, record = segmentation_on_grid(path, f"subject {subject}: {path}", image_to_world, grid)
        stored.append(quantize(fraction))
        records.append({"id": subject, **record})
    with staged(out_path.parent, [out_path.name]) as staging:
        np.savez(staging / out_path.name, ids=np.array(ids), segmentations=np.stack(stored),
                 **{key: np.array([r[key] for r in records]) for key in
                    ("volume_mm3", "mask_volume_mm3", "mask_total_mm3", "supersampling")})
    return {"n": len(ids), "seconds": time.perf_counter() - start, "subjects": records}


def _augmentation_n_control(augmentation_dir: Path) -> int | None:
    """The n_control the augmentation recorded in its provenance sidecar, if it has one."""
    sidecar = augmentation_dir / SIDECAR
    if not sidecar.is_file():
        return None
    try:
        settings = json.loads(sidecar.read_text()).get("settings") or {}
    except (OSError, json.JSONDecodeError):
        return None
    return int(settings["n_control"]) if "n_control" in settings else None


def augment_segmentations(cohort_dir, preprocess_dir, augmentation_dir, out_path, n_control: int = 256) -> dict:
    """For every augmented sample (augmentation/samples.npz), its source subject's resampled
    segmentation warped by the thin-plate spline that warped its image (`tps.warp_image` with the same
    correspondences and `n_control`, the augmentation's setting), written atomically through a memory
    map to `out_path` (.npy, uint8 fractions, row i = sample i). Returns a summary."""
    start = time.perf_counter()
    cohort_dir, preprocess_dir = Path(cohort_dir), Path(preprocess_dir)
    augmentation_dir, out_path = Path(augmentation_dir), Path(out_path)
    recorded = _augmentation_n_control(augmentation_dir)
    if recorded is not None and recorded != int(n_control):
        raise ValueError(f"{augmentation_dir / SIDECAR}: the images were warped with n_control {recorded}, not "
                         f"{n_control}: the segmentations must follow the same splines")
    shapes_path, segmentations_path, samples_path = (cohort_dir / "shapes_train.npz", preprocess_dir / TRAIN_FILE,
                                                     augmentation_dir / "samples.npz")
    for path in (shapes_path, segmentations_path, samples_path):
        if not path.is_file():
            raise ValueError(f"{path}: missing (run ingestion, the segmentations' preprocessing and augmentation "
                             f"first)")
    _, grid = load_grid(preprocess_dir)
    with np.load(shapes_path, allow_pickle=False) as shapes:
        ids, world = [str(i) for i in shapes["ids"]], np.asarray(shapes["world"], dtype=np.float64)
    with np.load(segmentations_path, allow_pickle=False) as stored:
        segmentation_ids, segmentations = [str(i) for i in stored["ids"]], stored["segmentations"]
    with np.load(samples_path, allow_pickle=False) as samples:
        points, source = samples["points"], np.asarray(samples["source_index"], dtype=np.int64)
        source_ids = [str(i) for i in samples["source_ids"]]
    if segmentation_ids != ids:
        raise ValueError(f"{segmentations_path}: its subjects differ from {shapes_path}'s; rerun it")
    if segmentations.shape[1:] != tuple(int(n) for n in grid.size[::-1]):
        raise ValueError(f"{segmentations_path}: segmentations are {segmentations.shape[1:]} (Z, Y, X), the grid "
                         f"{grid.size} (X, Y, Z): rerun it")
    if len(source) and (source.min() < 0 or source.max() >= len(ids)
                        or [ids[s] for s in source] != source_ids):
        raise ValueError(f"{samples_path}: its sources are not the subjects of {shapes_path}; rerun augmentation")

    with staged(out_path.parent, [out_path.name]) as staging:
        stack = np.lib.format.open_memmap(staging / out_path.name, mode="w+", dtype=np.uint8,
                                          shape=(len(points), *segmentations.shape[1:]))
        for i, s in enumerate(source):
            warped = warp_image(fractions(segmentations[s]), grid.origin, grid.spacing, world[s], points[i],
                                int(n_control), fill=0.0)
            if not (warped >= 0.5).any():
                raise ValueError(f"{samples_path}: sample {i} (from {ids[s]}): its warped segmentation is empty")
            stack[i] = quantize(warped)
        stack.flush()
        del stack
        size = (staging / out_path.name).stat().st_size
    seconds = time.perf_counter() - start
    return {"n": len(points), "seconds": seconds, "bytes": int(size), "n_control": int(n_control)}
