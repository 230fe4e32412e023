"""Preprocessing of uncropped scans for a method that finds the anatomy itself (image2ssm): every scan,
training and test, resampled onto one grid size and spacing, centred on the scan's own field of view,
with no registration and no crop around the anatomy.

A scan's grid keeps the scan's physical frame (identity direction: an oblique scan is resampled into
its axes; particles stay where they are in millimetres). Each scan's grid has its own origin, so the
arrays store particles in the grid frame (scan frame minus the grid's origin) and the origins beside
them: the network then sees every scan with its first voxel at 0, and a prediction is put back into
its scan by adding the origin. The grid size is fixed by the config (`scan_grid.size`), or else by the
largest training scan: a test scan larger than that is cut to the grid around its centre, and the
record says how much of its field the grid kept.

Training subjects also get their segmentation as the fraction of each voxel inside the anatomy
(`segmentations.segmentation_on_grid`), and must lie whole in their grid: an anatomy, or particles,
outside it is an error naming the subject and the file. Test subjects are read as images only.
Intensities are normalized with the mean and standard deviation of the resampled training scans.

The training scans are augmented as the registered crops are (`augment_scans`): every sample of the
dataset's KDE augmentation (augmentation/samples.npz: a generated world shape and the training subject it
was drawn from) becomes an uncropped scan, its source subject's scan and segmentation warped by the
thin-plate spline that carries the subject's particles onto the generated shape placed in the subject's
scan by the subject's own transform. The samples keep the augmentation's validation hold-out: a sample
follows its source subject into training or validation.

Artifacts (results/{dataset}/scans/):
    grid.json   spacing, size, normalization, the rule that chose the size, settings
    train.npz   ids, images (N, Z, Y, X) float32, origins (N, 3), segmentations (N, Z, Y, X) uint8
                (fraction x 255), local (N, M, 3) grid-frame particles, world (N, M, 3), field_kept (N,)
    test.npz    ids, images, origins, field_kept, seconds (reading and resampling, per scan)
    augmentation/images.npy         (n, Z, Y, X) float32, row i = sample i of augmentation/samples.npz
    augmentation/segmentations.npy  (n, Z, Y, X) uint8 fractions
    augmentation/samples.npz        local (n, M, 3) grid frame, world (n, M, 3), source_index (n,),
                                    validation_ids (the augmentation's hold-out, when it has one)
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .atomic import staged
from .io import apply_transform
from .nrrd_voxels import TruncatedVoxels, voxel_slabs
from .preprocess import MIN_GRID_VOXELS, WorldGrid, antialias_sigma, read_image, resample_to_world
from .scan_checks import UNREADABLE_VOXELS, IntensityTally, ScanError, read_header
from .segmentations import fractions, quantize, segmentation_on_grid, segmentation_path, segmentation_table
from .tps import BLAS, warp_image


@dataclass(frozen=True)
class ScanGridSettings:
    spacing_mm: float
    size: tuple[int, int, int] | None = None  # x, y, z voxels; None: the largest training scan's field

    @classmethod
    def from_config(cls, cfg: dict) -> "ScanGridSettings":
        size = cfg.get("size")
        return cls(float(cfg["spacing_mm"]), None if size is None else tuple(int(n) for n in size))


def field_corners(image) -> np.ndarray:
    """(8, 3) physical positions of the centres of a scan's corner voxels (any direction), of an
    sitk.Image or of an ImageFileReader that has read the header."""
    size = np.array(image.GetSize()) - 1
    index = np.stack(np.meshgrid(*([0, n] for n in size), indexing="ij"), -1).reshape(-1, 3)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T


def field_extent_mm(image) -> np.ndarray:
    """(3,) size (x, y, z mm) of the axis-aligned box around a scan's voxel centres."""
    corners = field_corners(image)
    return corners.max(0) - corners.min(0)


def scan_grid(image, spacing: float, size) -> WorldGrid:
    """The grid of `size` (x, y, z) voxels of `spacing` centred on the scan's field, in its physical frame."""
    corners = field_corners(image)
    centre = 0.5 * (corners.min(0) + corners.max(0))
    size = np.asarray(size, dtype=int)
    origin = centre - 0.5 * spacing * (size - 1)
    return WorldGrid(tuple(origin.tolist()), (float(spacing),) * 3, tuple(int(n) for n in size))


def field_kept(image, grid: WorldGrid) -> float:
    """Fraction of the scan's field (its axis-aligned box) inside the grid."""
    corners = field_corners(image)
    low, high = corners.min(0), corners.max(0)
    grid_low = np.array(grid.origin)
    grid_high = grid_low + np.array(grid.spacing) * (np.array(grid.size) - 1)
    overlap = np.clip(np.minimum(high, grid_high) - np.maximum(low, grid_low), 0, None)
    return float(np.prod(overlap) / np.prod(np.maximum(high - low, 1e-9)))


GAUSSIAN_TRUNCATE = 4.0  # kernel half-width in sigmas


def _axis_resampling(n_in: int, spacing: float, origin: float, positions: np.ndarray,
                     sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(n_out, n_in) float32 matrix taking a scan's voxel values along one axis to the Gaussian-smoothed
    (sampled kernel, edge values extended as ITK's recursive Gaussian does), linearly interpolated values at
    `positions` (mm), and (n_out,) whether each position is inside the field (ITK's: within half a voxel of
    the outer voxel centres; beyond the last centre, the edge value)."""
    if sigma > 0:
        half = int(np.ceil(GAUSSIAN_TRUNCATE * sigma / spacing))
        offsets = np.arange(-half, half + 1)
        kernel = np.exp(-0.5 * (offsets * spacing / sigma) ** 2)
        smoothing, rows = np.zeros((n_in, n_in)), np.arange(n_in)
        for offset, weight in zip(offsets, kernel / kernel.sum()):  # clipped at the edges: edge values repeat
            smoothing[rows, np.clip(rows + offset, 0, n_in - 1)] += weight
    else:
        smoothing = np.eye(n_in)
    index = (positions - origin) / spacing
    inside = (index >= -0.5) & (index < n_in - 0.5)
    index = np.clip(index, 0, n_in - 1)
    low = np.minimum(np.floor(index).astype(int), max(n_in - 2, 0))
    weight = index - low
    interpolation = np.zeros((len(positions), n_in))
    rows = np.arange(len(positions))
    interpolation[rows, low] = 1 - weight
    interpolation[rows, np.minimum(low + 1, n_in - 1)] += weight
    return (interpolation @ smoothing).astype(np.float32), inside


class _SlabResampler:
    """`downsample_scan`'s three passes, the two in-plane ones slab by slab of z-planes as the slabs
    come (`add`), the z pass over their results (`values`). Axis-aligned scans only."""

    def __init__(self, image, grid: WorldGrid):
        sigma = antialias_sigma(image.GetSpacing(), grid.spacing[0])
        self.axes = [_axis_resampling(image.GetSize()[a], image.GetSpacing()[a], image.GetOrigin()[a],
                                      grid.origin[a] + grid.spacing[a] * np.arange(grid.size[a]), sigma)
                     for a in range(3)]
        self.planes = np.empty((image.GetSize()[2], grid.size[0], grid.size[1]), np.float32)  # (z, X, Y)
        self.sample = []  # every second voxel along each axis, for the value outside the field

    def add(self, z0: int, slab: np.ndarray) -> None:
        """Planes z0 .. z0 + len(slab) of the scan, (n, y, x)."""
        slab = slab.astype(np.float32, copy=False)
        values = np.tensordot(slab, self.axes[0][0], axes=([2], [1]))  # (n, y, X)
        self.planes[z0:z0 + len(slab)] = np.tensordot(values, self.axes[1][0], axes=([1], [1]))  # (n, X, Y)
        self.sample.append(slab[z0 % 2::2, ::2, ::2].ravel())

    def values(self) -> np.ndarray:
        values = np.tensordot(self.planes, self.axes[2][0], axes=([0], [1]))  # (X, Y, Z)
        values = np.ascontiguousarray(values.transpose(2, 1, 0), dtype=np.float32)
        inside = self.axes[2][1][:, None, None] & self.axes[1][1][None, :, None] & self.axes[0][1][None, None, :]
        if not inside.all():
            values[~inside] = float(np.median(np.concatenate(self.sample)))
        return values


def _oblique(image) -> bool:
    return not np.allclose(np.asarray(image.GetDirection()), np.eye(3).ravel())


def downsample_scan(image: sitk.Image, grid: WorldGrid) -> np.ndarray:
    """The scan's values on the (coarser, axis-aligned) scan grid, (z, y, x), as `preprocess.resample_to_world`
    gives them (Gaussian anti-aliasing of `antialias_sigma`, then linear interpolation), computed as one
    matrix per axis applied in turn: the smoothing is only evaluated where the grid samples it. Outside the
    scan's field: the median of every second voxel along each axis (the full median alone costs more than the
    rest). A 220 mm scan at 1 mm onto 4 mm: about 14 times faster than the Gaussian of the whole scan, and
    closer to it than ITK's discrete Gaussian is (tests/test_full_field.py; `python -m deepssm_workflow.bench
    --sections scans` times both). An oblique scan (direction not the identity) takes resample_to_world."""
    if _oblique(image):
        return resample_to_world(image, sitk.Transform(), grid)
    resampler = _SlabResampler(image, grid)
    resampler.add(0, sitk.GetArrayViewFromImage(image))
    return resampler.values()


def _streamed_scan(slabs, header, grid: WorldGrid, what: str) -> np.ndarray:
    """`downsample_scan` of a scan read slab by slab (`nrrd_voxels.voxel_slabs`), each slab resampled on a
    second thread while the next is read, and its intensities checked as `scan_checks.read_scan` does."""
    resampler, tally = _SlabResampler(header, grid), IntensityTally()

    def take(z0, slab):
        tally.add(slab)
        resampler.add(z0, slab)

    # one BLAS thread: the other core is inflating the next slab
    with BLAS.limit(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=1) as worker:
        done, z0 = [], 0
        try:
            for slab in slabs:
                done.append(worker.submit(take, z0, slab))
                z0 += len(slab)
        except TruncatedVoxels as error:
            raise ScanError(what, f"{UNREADABLE_VOXELS} ({error})") from None
        for future in done:
            future.result()
    problem = tally.problem()
    if problem:
        raise ScanError(what, problem)
    return resampler.values()


def _size_for(extents: np.ndarray, spacing: float) -> tuple[int, int, int]:
    return tuple(int(n) for n in np.ceil(extents.max(0) / spacing - 1e-6).astype(int) + 1)


def _table(cohort_dir: Path) -> pd.DataFrame:
    return pd.read_csv(cohort_dir / "subjects.csv", usecols=["id", "split", "image"], dtype={"id": str})


def preprocess_scans(cohort_dir, settings: ScanGridSettings, out_dir) -> dict:
    """grid.json, train.npz and test.npz of the module's doc, written together (all or nothing)."""
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    shapes = np.load(cohort_dir / "shapes_train.npz")
    table = _table(cohort_dir).set_index("id")
    ids = [str(i) for i in shapes["ids"]]
    scans = {}
    for subject in ids:
        path = table.loc[subject, "image"]
        scans[subject] = read_image(path, f"subject {subject}: {path}")
    spacing = settings.spacing_mm
    size = settings.size or _size_for(np.array([field_extent_mm(s) for s in scans.values()]), spacing)
    if min(size) < MIN_GRID_VOXELS:
        raise ValueError(f"{cohort_dir}: the scan grid would be {'x'.join(map(str, size))} voxels of {spacing:g} mm; "
                         f"the networks need at least {MIN_GRID_VOXELS} per axis: lower scan_grid.spacing_mm")

    segmentations_of = segmentation_table(cohort_dir)
    images, origins, fractions, local, kept = [], [], [], [], []
    for k, subject in enumerate(ids):
        grid = scan_grid(scans[subject], spacing, size)
        what = f"subject {subject}: {table.loc[subject, 'image']}"
        points = shapes["local"][k] - np.array(grid.origin)
        upper = np.array(grid.spacing) * (np.array(grid.size) - 1)
        if np.any(points < 0) or np.any(points > upper):
            raise ValueError(f"{what}: particles outside the scan grid ({'x'.join(map(str, size))} voxels of "
                             f"{spacing:g} mm around the scan's centre): raise scan_grid.size")
        seg_path = segmentation_path(segmentations_of, subject, cohort_dir)
        seg_what = f"subject {subject}: {seg_path}"
        fraction, record = segmentation_on_grid(seg_path, seg_what, np.eye(4), grid)
        if record["mask_volume_mm3"] < 0.999 * record["mask_total_mm3"]:
            raise ValueError(f"{seg_what}: {100 * (1 - record['mask_volume_mm3'] / record['mask_total_mm3']):.1f} % "
                             f"of the anatomy lies outside the scan grid: raise scan_grid.size")
        images.append(downsample_scan(scans[subject], grid))
        origins.append(grid.origin)
        fractions.append(quantize(fraction))
        local.append(points)
        kept.append(field_kept(scans[subject], grid))
    stack = np.stack(images).astype(np.float32)
    mean, std = float(stack.mean(dtype=np.float64)), float(stack.std(dtype=np.float64))
    if not std > 0:
        raise ValueError(f"{cohort_dir}: training scans have no intensity variation; cannot normalize")
    meta = {"spacing_mm": spacing, "size": list(size),
            "size_rule": "scan_grid.size" if settings.size else "the largest training scan's field",
            "normalization": {"mean": mean, "std": std, "from": "all voxels of the resampled training scans"},
            "settings": asdict(settings)}

    test_ids = table.index[table["split"] == "test"]
    test = {"images": [], "origins": [], "field_kept": [], "seconds": []}
    for subject in test_ids:
        start = time.perf_counter()
        image, origin, fraction_kept = preprocess_scan(table.loc[subject, "image"], meta,
                                                       f"subject {subject}: {table.loc[subject, 'image']}")
        test["seconds"].append(time.perf_counter() - start)
        test["images"].append(image)
        test["origins"].append(origin)
        test["field_kept"].append(fraction_kept)

    with staged(out_dir, ["grid.json", "train.npz", "test.npz"]) as staging:
        np.savez(staging / "train.npz", ids=np.array(ids), images=(stack - mean) / std, origins=np.array(origins),
                 segmentations=np.stack(fractions), local=np.stack(local).astype(np.float32),
                 world=shapes["world"].astype(np.float32), field_kept=np.array(kept))
        np.savez(staging / "test.npz", ids=np.array(list(test_ids), dtype=str),
                 **{key: np.asarray(value, dtype=np.float32 if key == "images" else np.float64)
                    for key, value in test.items()})
        (staging / "grid.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def preprocess_scan(path, meta: dict, what: str | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """One unseen scan from its file alone: (normalized (Z, Y, X) array, its grid's origin (3,), the fraction of
    its field the grid kept). A single-file NRRD is read in slabs, resampled as they are inflated
    (`nrrd_voxels`); any other file is read whole by ITK. Both refuse the same scans with the same words (the slab
    reader also refuses a gzip trailer cut short, which ITK reads)."""
    what = what or str(path)
    header = read_header(path, what)
    grid = scan_grid(header, meta["spacing_mm"], meta["size"])
    slabs = None if _oblique(header) else voxel_slabs(path, header)
    if slabs is None:
        values = downsample_scan(read_image(path, what), grid)
    else:
        values = _streamed_scan(slabs, header, grid, what)
    norm = meta["normalization"]
    array = (values - norm["mean"]) / norm["std"]
    return array.astype(np.float32), np.array(grid.origin), field_kept(header, grid)


AUGMENTATION_OUTPUTS = ("images.npy", "segmentations.npy", "samples.npz")


def augment_scans(cohort_dir, scans_dir, augmentation_dir, out_dir, n_control: int = 256) -> dict:
    """The uncropped counterpart of every augmented sample (see the module doc), written atomically to
    `out_dir` (images and segmentations through memory maps). Returns a summary."""
    start = time.perf_counter()
    cohort_dir, scans_dir, augmentation_dir = Path(cohort_dir), Path(scans_dir), Path(augmentation_dir)
    shapes, scans, samples = (np.load(p) for p in (cohort_dir / "shapes_train.npz", scans_dir / "train.npz",
                                                   augmentation_dir / "samples.npz"))
    ids = [str(i) for i in shapes["ids"]]
    if [str(i) for i in scans["ids"]] != ids:
        raise ValueError(f"{scans_dir / 'train.npz'} and {cohort_dir / 'shapes_train.npz'} list different training "
                         f"subjects (rerun preprocess_scans)")
    source = np.asarray(samples["source_index"], dtype=np.int64)
    if [ids[s] for s in source] != [str(i) for i in samples["source_ids"]]:
        raise ValueError(f"{augmentation_dir / 'samples.npz'}: made from another cohort's subjects (rerun augment)")
    spacing = (float(json.loads((scans_dir / "grid.json").read_text())["spacing_mm"]),) * 3
    images, segmentations = scans["images"], scans["segmentations"]
    world = np.asarray(samples["points"], dtype=np.float64)
    # each generated world shape into its source scan's grid frame, through the source's own transform
    to_grid = [np.linalg.inv(t) for t in shapes["image_to_world"]]
    local = np.stack([apply_transform(to_grid[s], w) - scans["origins"][s] for s, w in zip(source, world)])
    origin = (0.0, 0.0, 0.0)
    with staged(Path(out_dir), list(AUGMENTATION_OUTPUTS)) as staging:
        warped_images = np.lib.format.open_memmap(staging / "images.npy", mode="w+", dtype=np.float32,
                                                  shape=(len(world), *images.shape[1:]))
        warped_masks = np.lib.format.open_memmap(staging / "segmentations.npy", mode="w+", dtype=np.uint8,
                                                 shape=(len(world), *images.shape[1:]))
        for i, s in enumerate(source):
            warped_images[i] = warp_image(images[s], origin, spacing, scans["local"][s], local[i], int(n_control))
            warped_masks[i] = quantize(warp_image(fractions(segmentations[s]), origin, spacing, scans["local"][s],
                                                  local[i], int(n_control), fill=0.0))
        warped_images.flush()
        warped_masks.flush()
        del warped_images, warped_masks
        held_out = {"validation_ids": samples["validation_ids"]} if "validation_ids" in samples.files else {}
        np.savez(staging / "samples.npz", local=local.astype(np.float32), world=world.astype(np.float32),
                 source_index=source, **held_out)
    return {"n": len(world), "seconds": time.perf_counter() - start}
