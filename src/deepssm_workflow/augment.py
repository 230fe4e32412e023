"""Model-based data augmentation (DeepSSM paper, section 3.1).

A PCA shape space with all N - 1 modes is fit on the N training shapes (world frame);
new score vectors are drawn from a generative model of the training scores (the paper's
KDE, eq. 1, or the older Gaussian / Gaussian-mixture alternatives, see `samplers`), turned
back into correspondences, and each sample's image is its source training image (the
subject the sample was drawn around, or the nearest one) warped by a thin-plate spline so
that the anatomy lies at the generated correspondences.

With a validation hold-out (`validation`: the training's val_fraction and seed, see
`holdout`), the shape space and the generative model are fit on the other subjects only,
so that nothing of a validation shape shapes a training sample. The held-out subjects
still get their share of samples (n_samples x their fraction of the cohort), each a
held-out shape moved by the displacement of a sample the model drew from its own source:
validation keeps its warped copies, judged in a space it did not build.

Artifacts (out_dir, written atomically):
    images.npy       (n, Z, Y, X) float32 on the preprocessing grid, written sample by sample
                     through a memory map (memory does not grow with n); load with mmap_mode="r"
    samples.npz      points (n, M, 3) world, scores (n, K) in the shape space, source_index (n,),
                     source_ids (n,), validation_ids (the held-out subjects; only with a
                     hold-out), bandwidth (KDE sigma), noise_std (KDE kernel sd per mode; both NaN
                     for other samplers), sampler
    shape_space.npz  the ShapeSpace of the fitted subjects, all K = n_fitted - 1 modes (ShapeSpace.load)
    qc.png           real vs generated score distributions, a few generated images with points
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .atomic import staged
from .holdout import validation_subjects
from .plotting import POINT_COLOR, figure, save_figure
from .samplers import SAMPLERS, make_sampler
from .shape_space import ShapeSpace
from .tps import warp_image

OUTPUTS = ("images.npy", "samples.npz", "shape_space.npz", "qc.png")
QC_MODES = 4
QC_IMAGES = 4


def _load_inputs(cohort_dir: Path, preprocess_dir: Path):
    """(ids, world (N, M, 3), images (N, Z, Y, X), origin, spacing), checked for consistency."""
    shapes_path, train_path, grid_path = (cohort_dir / "shapes_train.npz", preprocess_dir / "train.npz",
                                          preprocess_dir / "grid.json")
    for path in (shapes_path, train_path, grid_path):
        if not path.is_file():
            raise ValueError(f"{path}: missing (run ingestion and preprocessing first)")
    with np.load(shapes_path, allow_pickle=False) as shapes:
        shape_ids = [str(i) for i in shapes["ids"]]
        world = np.asarray(shapes["world"], dtype=np.float64)
    with np.load(train_path, allow_pickle=False) as train:
        image_ids = [str(i) for i in train["ids"]]
        images = np.asarray(train["images"], dtype=np.float32)
    if image_ids != shape_ids:
        only_images = sorted(set(image_ids) - set(shape_ids))
        only_shapes = sorted(set(shape_ids) - set(image_ids))
        detail = (f"only in {train_path.name}: {only_images or 'none'}; only in {shapes_path.name}: "
                  f"{only_shapes or 'none'}" if only_images or only_shapes else "same ids in a different order")
        raise ValueError(f"{train_path}: training ids do not match {shapes_path} ({detail}); "
                         "rerun preprocessing on this cohort")
    if world.ndim != 3 or world.shape[0] != len(shape_ids) or world.shape[2] != 3:
        raise ValueError(f"{shapes_path}: world must be ({len(shape_ids)}, M, 3), got {world.shape}")
    if images.ndim != 4 or images.shape[0] != len(image_ids):
        raise ValueError(f"{train_path}: images must be ({len(image_ids)}, Z, Y, X), got {images.shape}")
    meta = json.loads(grid_path.read_text())
    origin, spacing, size = (tuple(float(v) for v in meta["grid"][k]) for k in ("origin", "spacing", "size"))
    if tuple(int(s) for s in size[::-1]) != images.shape[1:]:
        raise ValueError(f"{train_path}: images are {images.shape[1:]} (Z, Y, X) but {grid_path} has a grid of "
                         f"size {size} (X, Y, Z)")
    return shape_ids, world, images, origin, spacing


def _fit_sampler(name: str, scores: np.ndarray, seed: int, mixture_components: int, kde_kernel: str):
    if name == "mixture":
        return make_sampler(name, n_components=mixture_components, seed=seed).fit(scores)
    if name == "kde":
        return make_sampler(name, kernel=kde_kernel).fit(scores)
    return make_sampler(name).fit(scores)


def augment(cohort_dir, preprocess_dir, out_dir, n_samples: int, sampler: str = "kde", n_control: int = 256,
            seed: int = 0, mixture_components: int = 4, kde_kernel: str = "neighbour",
            validation: dict | None = None) -> dict:
    """Generate `n_samples` augmented (image, correspondences, scores) triples; see the module doc.

    `validation`: {"val_fraction", "seed"} of the training (`holdout.validation_subjects`), or
    None to fit on every subject. Returns a summary: n, seconds, samples_per_second,
    images_bytes, sampler, bandwidth, n_modes, validation_ids.
    """
    start = time.perf_counter()
    if isinstance(n_samples, bool) or int(n_samples) != n_samples or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    n_samples = int(n_samples)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if int(n_control) != n_control or n_control < 4:
        raise ValueError(f"n_control must be an integer >= 4 (a 3D thin-plate spline), got {n_control!r}")
    cohort_dir, preprocess_dir, out_dir = Path(cohort_dir), Path(preprocess_dir), Path(out_dir)
    ids, world, images, origin, spacing = _load_inputs(cohort_dir, preprocess_dir)

    held_out = (validation_subjects(len(world), float(validation["val_fraction"]), int(validation["seed"]))
                if validation else np.array([], dtype=np.int64))
    fitted = np.setdiff1d(np.arange(len(world)), held_out)
    if len(fitted) < 3:
        raise ValueError(f"{cohort_dir}: {len(fitted)} training subjects left after the validation hold-out; "
                         "the shape model needs at least 3")
    space = ShapeSpace(n_modes=len(fitted) - 1).fit(world[fitted])  # all modes of the fitted shapes (paper eq. 1)
    train_scores = space.transform(world[fitted])
    model = _fit_sampler(sampler, train_scores, seed, mixture_components, kde_kernel)
    rng = np.random.default_rng(seed)
    n_held_out = int(round(n_samples * len(held_out) / len(world)))
    scores, drawn_from = model.sample(rng, n_samples - n_held_out)
    source = fitted[np.asarray(drawn_from, dtype=np.int64)]
    points = space.inverse_transform(scores)
    if n_held_out:
        moved_scores, moved_from = model.sample(rng, n_held_out)
        displacement = space.inverse_transform(moved_scores) - world[fitted[np.asarray(moved_from)]]
        held_source = held_out[rng.integers(len(held_out), size=n_held_out)]
        held_points = world[held_source] + displacement
        source = np.concatenate([source, held_source])
        points = np.concatenate([points, held_points])
        scores = np.concatenate([scores, space.transform(held_points)])
    bandwidth = float(model.bandwidth) if sampler == "kde" else float("nan")
    noise_std = float(model.noise_std) if sampler == "kde" else float("nan")

    with staged(out_dir, list(OUTPUTS)) as staging:
        stack = np.lib.format.open_memmap(staging / "images.npy", mode="w+", dtype=np.float32,
                                          shape=(n_samples, *images.shape[1:]))
        for i in range(n_samples):
            stack[i] = warp_image(images[source[i]], origin, spacing, world[source[i]], points[i], int(n_control))
        stack.flush()
        preview = np.array(stack[:QC_IMAGES])  # a few images for the figure, copied before unmapping
        del stack
        # validation_ids only with a hold-out: training refuses a store made for another split
        held_out_ids = {"validation_ids": np.array(ids)[held_out].astype(str)} if validation else {}
        np.savez(staging / "samples.npz", points=points, scores=scores, source_index=source,
                 source_ids=np.array(ids)[source], **held_out_ids, bandwidth=np.float64(bandwidth),
                 noise_std=np.float64(noise_std), sampler=np.array(sampler))
        space.save(staging / "shape_space.npz")
        _qc_figure(staging / "qc.png", train_scores, scores, preview, points[:QC_IMAGES],
                   [ids[s] for s in source[:QC_IMAGES]], origin, spacing, sampler, noise_std,
                   _spread(world[fitted], space.mean), _spread(points, space.mean))
        images_bytes = (staging / "images.npy").stat().st_size

    seconds = time.perf_counter() - start
    return {"n": n_samples, "seconds": seconds, "samples_per_second": n_samples / seconds,
            "images_bytes": int(images_bytes), "sampler": sampler, "bandwidth": bandwidth, "noise_std": noise_std,
            "n_modes": int(space.n_modes), "validation_ids": [ids[i] for i in held_out],
            "real_spread_mm": _spread(world[fitted], space.mean),
            "generated_spread_mm": _spread(points, space.mean)}


def _spread(shapes: np.ndarray, mean: np.ndarray) -> float:
    """Mean over shapes of the RMS point distance to the mean shape (mm): generated shapes should
    spread about as far as the real ones."""
    return float(np.sqrt(((shapes - mean) ** 2).sum(-1).mean(-1)).mean())


def _qc_figure(path, real, generated, images, points, source_ids, origin, spacing, sampler, noise_std,
               real_spread, generated_spread) -> None:
    """Top row: per-mode histograms of generated scores with the real scores as ticks.
    Bottom row: mid-axial slices of generated images with their points (those near the slice bold)."""
    modes = min(QC_MODES, real.shape[1])
    cols = max(modes, len(images))
    fig, axes = figure(2, cols, cell=(2.8, 2.8))
    for k in range(cols):
        ax = axes[0, k]
        if k >= modes:
            ax.axis("off")
            continue
        both = np.concatenate([real[:, k], generated[:, k]])
        bins = np.linspace(both.min(), both.max(), 21) if np.ptp(both) > 0 else 10
        ax.hist(generated[:, k], bins=bins, density=True, color="#bbbbbb", label=f"generated (n={len(generated)})")
        ax.hist(real[:, k], bins=bins, density=True, histtype="step", color=POINT_COLOR, lw=1.5,
                label=f"training (n={len(real)})")
        ax.plot(real[:, k], np.zeros(len(real)), "|", color=POINT_COLOR, ms=12)
        ax.set_title(f"mode {k + 1} scores")
        if k == 0:
            ax.legend(fontsize=7, frameon=False)
    origin, spacing = np.asarray(origin), np.asarray(spacing)
    for k in range(cols):
        ax = axes[1, k]
        ax.axis("off")
        if k >= len(images):
            continue
        z = images.shape[1] // 2
        ax.imshow(images[k, z], cmap="gray")
        voxel = (points[k] - origin) / spacing  # x, y, z in voxel units
        near = np.abs(voxel[:, 2] - z) <= 1.5
        ax.scatter(voxel[~near, 0], voxel[~near, 1], s=2, color=POINT_COLOR, alpha=0.25, lw=0)
        ax.scatter(voxel[near, 0], voxel[near, 1], s=6, color="#ee7733", lw=0)
        ax.set_title(f"sample {k} (from {source_ids[k]}), z={z}")
    width = f", kernel sd {noise_std:.3g} per mode" if np.isfinite(noise_std) else ""
    fig.suptitle(f"augmentation: {sampler} sampler{width}, {real.shape[1]} modes; RMS distance to the mean shape: "
                 f"training {real_spread:.2f} mm, generated {generated_spread:.2f} mm")
    save_figure(fig, path)
