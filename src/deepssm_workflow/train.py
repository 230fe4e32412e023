"""Training a registered method on the workflow's artifacts: the real training images and
shapes, the augmented samples, and the dataset's shape space (`engine.train` does the rest)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .engine import EngineSettings, train
from .holdout import split_by_source
from .methods import LANDMARKS, SCANS, SEGMENTATIONS, get, learns_without_shapes
from .preprocess import load_grid
from .provenance import combined_sha256
from .rows import NpyRows, ScaledRows, StackedRows
from .segmentations import SCALE, TRAIN_FILE
from .shape_space import ShapeSpace


def train_from_artifacts(cohort_dir, preprocess_dir, augmentation_dir, method: str, settings: dict, out_dir,
                         threads: int = 1, log=print, device: str | None = None,
                         checkpoint_seconds: float = 0.0) -> dict:
    """Train `method` on the real training images plus the augmented samples.

    `settings` holds the dataset's config blocks this needs: `shape_space` (n_modes or
    variance of the real training shapes), `training` (EngineSettings) and `method` (the
    method's own block, schema defaults filled in by the config). `device` and
    `checkpoint_seconds`: see `engine.train`.
    """
    if SCANS in get(method).method.needs:
        raise ValueError(f"method {method} trains on uncropped scans (full_field.py), not on the registered crops and "
                         f"their augmentation: train it with train_from_scans")
    if learns_without_shapes(get(method).method.needs):
        raise ValueError(f"method {method} learns from the training images alone, not from shapes and their "
                         f"augmentation: train it with train_from_images")
    cohort_dir, preprocess_dir, augmentation_dir = Path(cohort_dir), Path(preprocess_dir), Path(augmentation_dir)
    paths = [preprocess_dir / "train.npz", cohort_dir / "shapes_train.npz", augmentation_dir / "samples.npz",
             augmentation_dir / "images.npy"]
    real, shapes, samples = (np.load(p) for p in paths[:3])
    if list(real["ids"]) != list(shapes["ids"]):
        raise ValueError(f"{paths[0]} and {paths[1]} list different training subjects")
    # generated samples are read a batch at a time, so memory does not grow with their number
    images = StackedRows(real["images"], NpyRows(paths[3]))
    points = StackedRows(shapes["world"], NpyRows(paths[2], "points"))
    engine = EngineSettings(**settings["training"])
    method_settings = get(method).settings(settings["method"])
    n_real = len(real["ids"])
    train_idx, val_idx = split_by_source(n_real, samples["source_index"], engine.val_fraction, engine.seed)
    _check_hold_out(samples, paths[2], real["ids"], train_idx, val_idx, n_real, engine, log)
    # the PCA basis is fit without the validation subjects, so that they are judged in a space they did not build
    space = ShapeSpace(**settings["shape_space"]).fit(shapes["world"][train_idx[train_idx < n_real]])
    segmentations = None
    if SEGMENTATIONS in get(method).method.needs:
        segmentations, segmentation_paths = _segmentations(preprocess_dir, augmentation_dir, real["ids"], images)
        paths += segmentation_paths
    torch.set_num_threads(max(1, threads))
    log(f"{method}: {len(train_idx)} training / {len(val_idx)} validation samples, {space.n_modes} PCA modes")
    return train(method, method_settings, images, points, train_idx, val_idx, space, out_dir, engine=engine,
                 log=log, data_hash=combined_sha256(paths), device=device, checkpoint_seconds=checkpoint_seconds,
                 segmentations=segmentations)


def train_from_scans(cohort_dir, scans_dir, method: str, settings: dict, out_dir, threads: int = 1, log=print,
                     device: str | None = None, checkpoint_seconds: float = 0.0, augmentation_dir=None) -> dict:
    """Train a method that needs SCANS on the uncropped training scans of `full_field.preprocess_scans`
    and, with `augmentation_dir`, their augmented samples (`full_field.augment_scans`): images and
    segmentations, the grid-frame particles as the points and the world ones as the extra "world". The
    validation subjects are held out by `settings["training"]` as for the other methods, each sample with
    its source subject. `settings`: as `train_from_artifacts`."""
    cohort_dir, scans_dir = Path(cohort_dir), Path(scans_dir)
    if SCANS not in get(method).method.needs:
        raise ValueError(f"method {method} trains on the registered crops: train it with train_from_artifacts")
    paths = [scans_dir / "train.npz", cohort_dir / "shapes_train.npz"]
    scans, shapes = (np.load(p) for p in paths)
    if [str(i) for i in scans["ids"]] != [str(i) for i in shapes["ids"]]:
        raise ValueError(f"{paths[0]} and {paths[1]} list different training subjects (rerun preprocess_scans)")
    spacing = json.loads((scans_dir / "grid.json").read_text())["spacing_mm"]
    engine = EngineSettings(**settings["training"])
    n = len(scans["ids"])
    images, points, world = scans["images"], scans["local"], scans["world"]
    stored, source = scans["segmentations"], np.array([], dtype=np.int64)
    if augmentation_dir is not None:
        augmentation_dir = Path(augmentation_dir)
        generated = [augmentation_dir / name for name in ("samples.npz", "images.npy", "segmentations.npy")]
        paths += generated
        samples = np.load(generated[0])
        source = samples["source_index"]
        images = StackedRows(images, NpyRows(generated[1]))
        points = StackedRows(points, NpyRows(generated[0], "local"))
        world = StackedRows(world, NpyRows(generated[0], "world"))
        stored = StackedRows(stored, NpyRows(generated[2]))
    train_idx, val_idx = split_by_source(n, source, engine.val_fraction, engine.seed)
    if augmentation_dir is not None:
        _check_hold_out(samples, generated[0], scans["ids"], train_idx, val_idx, n, engine, log)
    frame = get(method).method.shape_frame
    real = train_idx[train_idx < n]
    space = ShapeSpace(**settings["shape_space"]).fit((shapes["world"] if frame == "world" else scans["local"])[real])
    torch.set_num_threads(max(1, threads))
    log(f"{method}: {len(train_idx)} training / {len(val_idx)} validation scans, {space.n_modes} PCA modes "
        f"({frame} frame)")
    return train(method, get(method).settings(settings["method"]), images, points, train_idx, val_idx, space,
                 out_dir, engine=engine, log=log, data_hash=combined_sha256(paths), device=device,
                 checkpoint_seconds=checkpoint_seconds, segmentations=ScaledRows(stored, 1.0 / SCALE),
                 extras={"world": world}, spacing=(float(spacing),) * 3)


def train_from_images(preprocess_dir, method: str, settings: dict, out_dir, threads: int = 1, log=print,
                      device: str | None = None, checkpoint_seconds: float = 0.0) -> dict:
    """Train a method that learns without shapes (`learns_without_shapes`: the self-supervised landmarks) on the
    preprocessed training images and, for one that needs SEGMENTATIONS (weak supervision), their segmentations
    (preprocess_segmentations); no particle is read. The validation images are held out by
    `settings["training"]` as for the other methods; a method that pairs images needs two."""
    needs = get(method).method.needs
    if not learns_without_shapes(needs):
        raise ValueError(f"method {method} learns from {', '.join(sorted(needs))}, not from the training images "
                         f"alone: train it with train_from_artifacts or train_from_scans")
    preprocess_dir = Path(preprocess_dir)
    paths = [preprocess_dir / "train.npz", preprocess_dir / "grid.json"]
    with np.load(paths[0]) as stored:
        images, ids = stored["images"], stored["ids"]
    grid = load_grid(preprocess_dir)[1]
    engine = EngineSettings(**settings["training"])
    train_idx, val_idx = split_by_source(len(ids), np.array([], dtype=np.int64), engine.val_fraction, engine.seed)
    if get(method).has(LANDMARKS) and len(val_idx) < 2:
        raise ValueError(f"{paths[0]}: {len(val_idx)} validation image(s) from {len(ids)} training subjects at "
                         f"training.val_fraction {engine.val_fraction}: pairs need at least 2")
    segmentations = None
    if SEGMENTATIONS in needs:
        segmentations = _training_segmentations(preprocess_dir, ids, images)
        paths.append(preprocess_dir / TRAIN_FILE)
    torch.set_num_threads(max(1, threads))
    log(f"{method}: {len(train_idx)} training / {len(val_idx)} validation images (no particles)")
    no_points = np.zeros((len(ids), 0, 3), np.float32)  # this method learns without shapes
    return train(method, get(method).settings(settings["method"]), images, no_points, train_idx, val_idx, None,
                 out_dir, engine=engine, log=log, data_hash=combined_sha256(paths), device=device,
                 checkpoint_seconds=checkpoint_seconds, segmentations=segmentations,
                 spacing=tuple(float(s) for s in grid.spacing))


def _check_hold_out(samples, path, ids, train_idx, val_idx, n_real: int, engine: EngineSettings, log) -> None:
    """The augmentation's validation subjects must be the ones this training holds out (a warning when it
    was made without a hold-out)."""
    held_out = [str(i) for i in ids[val_idx[val_idx < n_real]]]
    if "validation_ids" not in samples.files:
        log(f"WARNING: {path} was made without a validation hold-out (augment without --validation): the "
            f"validation subjects {held_out} helped build the augmentation's shape model")
    elif sorted(map(str, samples["validation_ids"])) != held_out:
        raise ValueError(f"{path}: made with validation subjects {sorted(map(str, samples['validation_ids']))} "
                         f"but training holds out {held_out} (training.val_fraction {engine.val_fraction}, seed "
                         f"{engine.seed}); rerun the augmentation with this training block")


def _real_segmentations(preprocess_dir: Path, ids) -> np.ndarray:
    """The training subjects' stored segmentations (`segmentations`: round(fraction x SCALE)), checked against
    the training images' subjects."""
    path = preprocess_dir / TRAIN_FILE
    if not path.is_file():
        raise ValueError(f"{path}: missing; a method that needs segmentations needs the preprocess_segmentations "
                         f"step first")
    with np.load(path) as real:
        if [str(i) for i in real["ids"]] != [str(i) for i in ids]:
            raise ValueError(f"{path} and {preprocess_dir / 'train.npz'} list different training subjects")
        return real["segmentations"]


def _training_segmentations(preprocess_dir: Path, ids, images) -> ScaledRows:
    """The training subjects' segmentations as fractions, indexed like `images`."""
    stored = _real_segmentations(preprocess_dir, ids)
    if stored.shape != tuple(images.shape):
        raise ValueError(f"{preprocess_dir / TRAIN_FILE}: segmentations {stored.shape} do not match the images "
                         f"{tuple(images.shape)}")
    return ScaledRows(stored, 1.0 / SCALE)


def _segmentations(preprocess_dir: Path, augmentation_dir: Path, ids, images) -> tuple[ScaledRows, list[Path]]:
    """The training subjects' and the augmented samples' segmentations (`segmentations`) as one row store of
    fractions, indexed like `images`, checked against them."""
    real = _real_segmentations(preprocess_dir, ids)
    augmented_path = augmentation_dir / "segmentations" / "segmentations.npy"
    if not augmented_path.is_file():
        raise ValueError(f"{augmented_path}: missing; a method that needs segmentations needs the "
                         f"augment_segmentations step first")
    store = StackedRows(real, NpyRows(augmented_path))
    if store.shape != tuple(images.shape):
        raise ValueError(f"{augmented_path}: segmentations {store.shape} do not match the images {tuple(images.shape)}")
    return ScaledRows(store, 1.0 / SCALE), [preprocess_dir / TRAIN_FILE, augmented_path]
