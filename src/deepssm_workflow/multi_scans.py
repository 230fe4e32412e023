"""Multi-anatomy scans on one network grid (MASSM): an ingested multi-anatomy cohort (ingest_multi.py)
resampled as full_field.py resamples single-anatomy scans, with every anatomy's particles packed.

    grid.json   spacing, size, normalization (full_field's), the anatomies and points per anatomy
    train.npz   ids, images (N, Z, Y, X) normalized, origins (N, 3), segmentations (N, Z, Y, X): the
                fraction of each voxel in any anatomy (nearest label), present (N, K), local and world
                (N, K * M, 3): anatomy k's M particles at rows k*M..(k+1)*M, local in mm from the grid's
                first voxel, nan for an anatomy the scan lacks
    test.npz    the same for the test scans, and seconds (reading and resampling each)

A packed row is what `methods.massm` trains on through the engine (`train_multi`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch

from .atomic import staged
from .engine import EngineSettings, train
from .full_field import ScanGridSettings, _size_for, downsample_scan, field_extent_mm, scan_grid
from .holdout import split_by_source
from .methods import MULTI_ANATOMY, get
from .preprocess import MIN_GRID_VOXELS, read_image
from .provenance import combined_sha256
from .shape_space import ShapeSpace


def _packed(cohort_dir: Path, anatomies: list[str], split: str, ids: list[str]) -> dict[str, np.ndarray]:
    """local, world (N, K * M, 3) with nan for absent anatomies, and present (N, K), of `ids` in that order."""
    blocks = {}
    for anatomy in anatomies:
        data = np.load(cohort_dir / f"shapes_{split}_{anatomy}.npz")
        blocks[anatomy] = {str(i): (data["local"][k], data["world"][k]) for k, i in enumerate(data["ids"])}
    sizes = {a: next(iter(b.values()))[0].shape[0] for a, b in blocks.items() if b}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{cohort_dir}: the anatomies have different numbers of particles "
                         f"({', '.join(f'{a} {m}' for a, m in sizes.items())}); packing needs one count")
    m = next(iter(sizes.values()))
    local = np.full((len(ids), len(anatomies) * m, 3), np.nan)
    world = np.full_like(local, np.nan)
    present = np.zeros((len(ids), len(anatomies)), bool)
    for k, anatomy in enumerate(anatomies):
        for n, subject in enumerate(ids):
            if subject in blocks[anatomy]:
                local[n, k * m:(k + 1) * m], world[n, k * m:(k + 1) * m] = blocks[anatomy][subject]
                present[n, k] = True
    return {"local": local, "world": world, "present": present}


def _label_fraction(path: str, grid) -> np.ndarray:
    """Where any anatomy is (label > 0), nearest label on the grid, as float32 (Z, Y, X)."""
    labels = sitk.ReadImage(path)
    reference = sitk.Image([int(n) for n in grid.size], sitk.sitkUInt8)
    reference.SetOrigin(grid.origin)
    reference.SetSpacing(grid.spacing)
    on_grid = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return (sitk.GetArrayFromImage(on_grid) > 0).astype(np.float32)


def preprocess_multi_scans(cohort_dir, settings: ScanGridSettings, out_dir) -> dict:
    """grid.json, train.npz and test.npz of the module's doc, all or nothing."""
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    report = json.loads((cohort_dir / "report.json").read_text())
    anatomies = list(report["anatomies"])
    table = pd.read_csv(cohort_dir / "subjects.csv", dtype=str, keep_default_na=False).set_index("id")
    splits = {split: [str(i) for i in table.index[table["split"] == split]] for split in ("train", "test")}
    scans = {s: read_image(table.loc[s, "image"], f"subject {s}: {table.loc[s, 'image']}") for s in table.index}
    spacing = settings.spacing_mm
    size = settings.size or _size_for(np.array([field_extent_mm(scans[s]) for s in splits["train"]]), spacing)
    if min(size) < MIN_GRID_VOXELS:
        raise ValueError(f"{cohort_dir}: the scan grid would be {'x'.join(map(str, size))} voxels of {spacing:g} mm; "
                         f"the networks need at least {MIN_GRID_VOXELS} per axis: lower scan_grid.spacing_mm")
    arrays, mean, std = {}, None, None
    for split in ("train", "test"):
        ids = splits[split]
        packed = _packed(cohort_dir, anatomies, split, ids)
        images, origins, masks, seconds = [], [], [], []
        for n, subject in enumerate(ids):
            start = time.perf_counter()
            grid = scan_grid(scans[subject], spacing, size)
            images.append(downsample_scan(scans[subject], grid))
            seconds.append(time.perf_counter() - start)
            origins.append(grid.origin)
            packed["local"][n] -= np.array(grid.origin)
            upper = np.array(grid.spacing) * (np.array(grid.size) - 1)
            points = packed["local"][n][np.isfinite(packed["local"][n]).all(1)]
            if np.any(points < 0) or np.any(points > upper):
                raise ValueError(f"subject {subject}: {table.loc[subject, 'image']}: particles outside the scan grid "
                                 f"({'x'.join(map(str, size))} voxels of {spacing:g} mm): raise scan_grid.size")
            labels = table.loc[subject, "labels"] if "labels" in table else ""
            masks.append(_label_fraction(labels, grid) if labels else np.zeros(images[-1].shape, np.float32))
        stack = np.stack(images).astype(np.float32)
        if split == "train":
            mean, std = float(stack.mean(dtype=np.float64)), float(stack.std(dtype=np.float64))
            if not std > 0:
                raise ValueError(f"{cohort_dir}: training scans have no intensity variation; cannot normalize")
        arrays[split] = {"ids": np.array(ids, dtype=str), "images": (stack - mean) / std, "origins": np.array(origins),
                         "segmentations": np.stack(masks), "seconds": np.array(seconds),
                         **{k: v.astype(np.float32) if k != "present" else v for k, v in packed.items()}}
    meta = {"spacing_mm": spacing, "size": list(size), "anatomies": anatomies,
            "n_points": int(arrays["train"]["local"].shape[1] // len(anatomies)),
            "normalization": {"mean": mean, "std": std, "from": "all voxels of the resampled training scans"}}
    with staged(out_dir, ["grid.json", "train.npz", "test.npz"]) as staging:
        for split, data in arrays.items():
            np.savez(staging / f"{split}.npz", **data)
        (staging / "grid.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def train_multi(scans_dir, method: str, settings: dict, out_dir, threads: int = 1, log=print,
                device: str | None = None) -> dict:
    """Train a multi-anatomy method (massm) on `preprocess_multi_scans`'s train.npz through the engine: the
    packed local particles as the points, the world ones as the extra "world". `settings`: {"method": block,
    "training": the engine's settings}."""
    if not get(method).has(MULTI_ANATOMY):
        raise ValueError(f"method {method} predicts one anatomy per scan: train it with train_from_scans")
    scans_dir = Path(scans_dir)
    meta = json.loads((scans_dir / "grid.json").read_text())
    data = np.load(scans_dir / "train.npz")
    engine = EngineSettings(**settings.get("training", {}))
    n = len(data["ids"])
    train_idx, val_idx = split_by_source(n, np.array([], dtype=np.int64), engine.val_fraction, engine.seed)
    # the engine's shape space: only its mean is used (each anatomy's mean where a scan lacks it)
    local = data["local"].astype(np.float64)
    filled = np.where(np.isfinite(local), local, np.nanmean(local[train_idx], 0))
    space = ShapeSpace(n_modes=1).fit(filled[train_idx])
    torch.set_num_threads(max(1, threads))
    log(f"{method}: {len(train_idx)} training / {len(val_idx)} validation scans, anatomies "
        f"{', '.join(meta['anatomies'])}")
    return train(method, get(method).settings(settings.get("method", {})), data["images"], data["local"], train_idx,
                 val_idx, space, out_dir, engine=engine, log=log, device=device,
                 data_hash=combined_sha256([scans_dir / "train.npz"]), segmentations=data["segmentations"],
                 extras={"world": data["world"]}, spacing=(float(meta["spacing_mm"]),) * 3,
                 n_anatomies=len(meta["anatomies"]))
