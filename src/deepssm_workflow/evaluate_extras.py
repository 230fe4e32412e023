"""What evaluation measures of a method beyond its correspondences, by capability:

* SCALES (Progressive DeepSSM): the test RMSE (eq. 12, world frame, against the true world
  shapes on the scale's own points) of every nested scale, coarse to fine;
* SEGMENTATION: Dice of the predicted mask (probability > 0.5 on the network grid) against the
  test subject's true segmentation resampled onto that grid through the same image-only
  registration as its image (`segmentations.label_fraction`, fraction > 0.5), so that the mask
  is judged on what the network saw, beside the baseline every such mask must beat: the mean
  of the training masks, the same for every subject. Evaluation only: the test path itself
  never reads a test segmentation.

* LOCALIZES (image2ssm): Dice of its mask on each uncropped test scan's grid (scans/test.npz) against
  the true segmentation resampled onto that grid (no registration is involved), beside the mean of the
  training masks on their grids, which knows nothing of where the anatomy is.

Both rerun the trained model on the preprocessed test images (a few small forward passes);
predictions.csv stays the finest scale's correspondences, as for every method.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .inference import load_trained
from .intervals import mean_interval
from .layout import DatasetLayout
from .methods import LOCALIZES, SCALES, SEGMENTATION, get
from .preprocess import WorldGrid, load_grid
from .scan_checks import read_scan
from .segmentations import fractions, label_fraction, supersampling
from .shape_space import rmse

MEAN_MASK = "mean training mask"  # the segmentation baseline's row
MEAN_SCAN_MASK = "mean training mask on the scan grid"  # its row for a method that localizes itself


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1 when both are empty)."""
    total = int(predicted.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((predicted & truth).sum()) / total


def _test_images(layout: DatasetLayout, ids) -> np.ndarray:
    with np.load(layout.preprocessed("test")) as data:
        order = {str(i): k for k, i in enumerate(data["ids"])}
        return data["images"][[order[i] for i in ids]]


@torch.no_grad()
def scale_accuracy(trained, method: str, images: torch.Tensor, true_world: np.ndarray) -> pd.DataFrame:
    """One row per scale of a SCALES method: points, n, world RMSE mean with its interval."""
    rows = []
    for indices, points in trained.method.predict_scales(trained.model, images):
        errors = rmse(points.double().numpy(), true_world[:, indices])
        low, high = mean_interval(errors)
        rows.append({"method": method, "scale_points": len(indices), "n": len(errors),
                     "world_rmse_mm": float(errors.mean()), "world_rmse_low_mm": low, "world_rmse_high_mm": high})
    return pd.DataFrame(rows)


def true_masks(layout: DatasetLayout, ids, registered_to_world: np.ndarray,
               segmentation_files: dict[str, str]) -> dict[str, np.ndarray]:
    """Each test subject's true segmentation on the network grid, through its image's registration
    (fraction > 0.5); subjects without a segmentation are left out."""
    _, grid = load_grid(layout.preprocess_dir)
    masks = {}
    for k, subject in enumerate(ids):
        path = segmentation_files.get(subject, "")
        if path:
            mask = read_scan(path, f"subject {subject}: {path}")
            world_to_image = np.linalg.inv(registered_to_world[k])
            k_sub = supersampling(mask.GetSpacing(), grid.spacing, world_to_image)
            masks[subject] = label_fraction(mask, world_to_image, grid, k_sub) > 0.5
    return masks


def _dice_rows(name: str, predicted: dict[str, np.ndarray], truths: dict[str, np.ndarray]) -> list[dict]:
    return [{"method": name, "id": subject, "dice": dice(predicted[subject], truth),
             "true_voxels": int(truth.sum()), "predicted_voxels": int(predicted[subject].sum())}
            for subject, truth in truths.items()]


@torch.no_grad()
def segmentation_dice(trained, method: str, images: torch.Tensor, ids, truths: dict[str, np.ndarray]) -> list[dict]:
    """Per test subject with a true mask: Dice of a SEGMENTATION method's mask (probability > 0.5)."""
    probability = trained.method.predict_segmentation(trained.model, images).numpy()
    return _dice_rows(method, {subject: probability[k] > 0.5 for k, subject in enumerate(ids)}, truths)


def mean_mask_dice(layout: DatasetLayout, truths: dict[str, np.ndarray]) -> list[dict]:
    """The baseline a segmentation task must beat: the mean of the training masks (fraction > 0.5), the
    same mask for every test subject."""
    with np.load(layout.train_segmentations) as data:
        mean = fractions(data["segmentations"]).mean(0) > 0.5
    return _dice_rows(MEAN_MASK, dict.fromkeys(truths, mean), truths)


def scan_masks(layout: DatasetLayout, ids, segmentation_files: dict[str, str]) -> dict[str, np.ndarray]:
    """Each test subject's true segmentation on its uncropped scan's grid (scans/test.npz: the grid's
    origin, grid.json: spacing and size), fraction > 0.5; subjects without a segmentation are left out."""
    meta = json.loads(layout.scans_grid_json.read_text())
    with np.load(layout.scans("test")) as data:
        origins = {str(i): o for i, o in zip(data["ids"], data["origins"])}
    masks = {}
    for subject in ids:
        path = segmentation_files.get(subject, "")
        if path:
            grid = WorldGrid(tuple(origins[subject].tolist()), (float(meta["spacing_mm"]),) * 3,
                             tuple(int(n) for n in meta["size"]))
            mask = read_scan(path, f"subject {subject}: {path}")
            k_sub = supersampling(mask.GetSpacing(), grid.spacing, np.eye(4))
            masks[subject] = label_fraction(mask, np.eye(4), grid, k_sub) > 0.5
    return masks


@torch.no_grad()
def scan_segmentation_dice(trained, method: str, layout: DatasetLayout, ids, truths: dict[str, np.ndarray]):
    """Per test subject with a true mask: Dice of a LOCALIZES method's mask on its scan's grid."""
    with np.load(layout.scans("test")) as data:
        order = {str(i): k for k, i in enumerate(data["ids"])}
        scans = torch.as_tensor(data["images"][[order[i] for i in ids]]).unsqueeze(1)
    found = trained.method.localize(trained.model, scans)
    if "probability" not in found:  # it localizes without segmenting (the uncropped DeepSSM baseline)
        return []
    probability = found["probability"].numpy()
    return _dice_rows(method, {subject: probability[k] > 0.5 for k, subject in enumerate(ids)}, truths)


def scan_mean_mask_dice(layout: DatasetLayout, truths: dict[str, np.ndarray]) -> list[dict]:
    """The baseline on the scans' grids: the mean of the training masks there (fraction > 0.5)."""
    with np.load(layout.scans("train")) as data:
        mean = fractions(data["segmentations"]).mean(0) > 0.5
    return _dice_rows(MEAN_SCAN_MASK, dict.fromkeys(truths, mean), truths)


def _dice_summary(per_subject: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for method, group in per_subject.groupby("method", sort=False):
        low, high = mean_interval(group["dice"])
        rows.append({"method": method, "n": len(group), "dice": float(group["dice"].mean()),
                     "dice_low": low, "dice_high": high})
    return pd.DataFrame(rows)


def capability_tables(dataset_dir, trained, ids, true_world: np.ndarray, registered_to_world: np.ndarray,
                      segmentation_files: dict[str, str]) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """The tables of the methods that have these capabilities ({} when none has), and notes."""
    layout = DatasetLayout(Path(dataset_dir))
    scales, dices, notes, truths, images = [], [], [], None, None
    scan_dices, scan_truths = [], None
    for method in trained:
        entry = get(method)
        if entry.has(LOCALIZES):
            scan_truths = scan_masks(layout, ids, segmentation_files) if scan_truths is None else scan_truths
            scan_dices += scan_segmentation_dice(load_trained(layout.model_dir(method)), method, layout, ids,
                                                 scan_truths) if scan_truths else []
            continue
        if not (entry.has(SCALES) or entry.has(SEGMENTATION)):
            continue
        model = load_trained(layout.model_dir(method))  # read once per method, the test images once in all
        images = torch.as_tensor(_test_images(layout, ids)).unsqueeze(1) if images is None else images
        if entry.has(SCALES):
            scales.append(scale_accuracy(model, method, images, true_world))
        if entry.has(SEGMENTATION):
            if truths is None:
                truths = true_masks(layout, ids, registered_to_world, segmentation_files)
                if not truths:
                    notes.append("No test subject has a segmentation: the segmentation Dice is not measured.")
            dices += segmentation_dice(model, method, images, ids, truths) if truths else []
    tables = {}
    if scales:
        tables["scale_accuracy"] = pd.concat(scales, ignore_index=True)
    if dices:
        per_subject = pd.DataFrame(dices + mean_mask_dice(layout, truths))
        tables["segmentation_dice"] = _dice_summary(per_subject)
        tables["segmentation_dice_per_subject"] = per_subject
    if scan_dices:
        per_subject = pd.DataFrame(scan_dices + scan_mean_mask_dice(layout, scan_truths))
        tables["scan_segmentation_dice"] = _dice_summary(per_subject)
        tables["scan_segmentation_dice_per_subject"] = per_subject
    return tables, notes

