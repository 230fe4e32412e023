"""Inference: correspondences for unsegmented images, in the world frame and back in each scan's frame.

Predictions are made on preprocessed images (world grid, training normalization);
the registration's image -> world transform of each scan maps them back into
the scanner frame, where a user's image lives.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .atomic import staged
from .io import apply_transform, write_particles
from .preprocess import load_reference, preprocess_image
from .train import load_model, predict


def predict_split(model_dir, preprocess_dir, split: str, out_dir, threads: int = 1) -> pd.DataFrame:
    """Predict every preprocessed image of a split; write particles/{id}_{world,local}.particles
    and predictions.csv (paths relative to it).

    Per-scan time = registration + resampling (from preprocessing) + the network.
    """
    torch.set_num_threads(max(1, threads))
    data = np.load(Path(preprocess_dir) / f"{split}.npz")
    model = load_model(model_dir)
    world, network_seconds = predict(model, data["images"], batch_size=1)
    rows = []
    files = []
    for i, subject in enumerate(data["ids"]):
        local = apply_transform(np.linalg.inv(data["image_to_world"][i]), world[i])
        files.append((f"particles/{subject}_world.particles", world[i]))
        files.append((f"particles/{subject}_local.particles", local))
        rows.append({"id": str(subject), "world_particles": f"particles/{subject}_world.particles",
                     "local_particles": f"particles/{subject}_local.particles",
                     "preprocess_seconds": float(data["seconds"][i]), "network_seconds": network_seconds,
                     "seconds_per_scan": float(data["seconds"][i]) + network_seconds})
    table = pd.DataFrame(rows)
    with staged(out_dir, ["particles", "predictions.csv"]) as staging:
        (staging / "particles").mkdir()
        for name, points in files:
            write_particles(staging / name, points)
        table.to_csv(staging / "predictions.csv", index=False)
    return table


def predict_image(model_dir, preprocess_dir, image_path, out_prefix) -> dict:
    """A brand-new image, from its file alone: writes {out_prefix}_world.particles and _local.particles."""
    start = time.perf_counter()
    meta, grid, reference = load_reference(preprocess_dir)
    try:
        array, image_to_world, _ = preprocess_image(image_path, meta, grid, reference)
    except RuntimeError as error:  # SimpleITK's way of saying it cannot read the file
        raise ValueError(f"{image_path}: cannot read the image: {str(error).strip()}") from None
    world, _ = predict(load_model(model_dir), array[None].astype(np.float32), batch_size=1)
    out_prefix = Path(out_prefix)
    names = [f"{out_prefix.name}_world.particles", f"{out_prefix.name}_local.particles"]
    with staged(out_prefix.parent, names) as staging:
        write_particles(staging / names[0], world[0])
        write_particles(staging / names[1], apply_transform(np.linalg.inv(image_to_world), world[0]))
    return {"world": str(out_prefix.parent / names[0]), "local": str(out_prefix.parent / names[1]),
            "seconds": time.perf_counter() - start}
