"""Inference: correspondences for unsegmented images, in the world frame and back in each scan's frame.

Predictions are made on preprocessed images (world grid, training normalization);
the registration's image -> world transform of each scan maps them back into
the scanner frame, where a user's image lives.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .atomic import staged
from .io import apply_transform, write_particles
from .preprocess import load_reference, preprocess_image
from .train import load_model, predict


class _OneDNNConv3d(nn.Module):
    """A frozen Conv3d run through oneDNN, with channels-last output.

    PyTorch sends a CPU conv3d with a batch of one to its im2col path, ~4x slower than
    oneDNN on the paper's layer sizes; channels-last activations also make the max-pools
    and PReLUs after it several times faster than on NCDHW tensors.
    """

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().contiguous(memory_format=torch.channels_last_3d))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.args = [list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, *self.args)
        return out.contiguous(memory_format=torch.channels_last_3d)


def _fold(layers: nn.Sequential, onednn: bool) -> nn.Sequential:
    """The same layers with every Conv3d + BatchNorm3d pair folded into one conv."""
    out, pending = [], None
    for layer in layers:
        if isinstance(layer, nn.BatchNorm3d) and pending is not None:
            out[-1] = fuse_conv_bn_eval(pending, layer)
            pending = None
            continue
        out.append(layer)
        pending = layer if isinstance(layer, nn.Conv3d) else None
    if onednn:
        out = [_OneDNNConv3d(layer) if isinstance(layer, nn.Conv3d) else layer for layer in out]
    return nn.Sequential(*out)


def inference_model(model: nn.Module) -> nn.Module:
    """An evaluation-only copy of a trained model giving the same outputs (to float32
    rounding) faster: batch norms folded into the convs before them and, on a CPU with
    oneDNN, convs run through oneDNN on channels-last activations (see `_OneDNNConv3d`).
    The original model is left as it is."""
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    device = next(fast.parameters()).device
    onednn = device.type == "cpu" and torch.backends.mkldnn.is_available()
    for module in list(fast.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential) and any(isinstance(c, nn.BatchNorm3d) for c in child):
                setattr(module, name, _fold(child, onednn))
    return fast


def predict_split(model_dir, preprocess_dir, split: str, out_dir, threads: int = 1) -> pd.DataFrame:
    """Predict every preprocessed image of a split; write particles/{id}_{world,local}.particles
    and predictions.csv (paths relative to it).

    Per-scan time = registration + resampling (from preprocessing) + the network.
    """
    torch.set_num_threads(max(1, threads))
    data = np.load(Path(preprocess_dir) / f"{split}.npz")
    model = inference_model(load_model(model_dir))
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
    world, _ = predict(inference_model(load_model(model_dir)), array[None].astype(np.float32), batch_size=1)
    out_prefix = Path(out_prefix)
    names = [f"{out_prefix.name}_world.particles", f"{out_prefix.name}_local.particles"]
    with staged(out_prefix.parent, names) as staging:
        write_particles(staging / names[0], world[0])
        write_particles(staging / names[1], apply_transform(np.linalg.inv(image_to_world), world[0]))
    return {"world": str(out_prefix.parent / names[0]), "local": str(out_prefix.parent / names[1]),
            "seconds": time.perf_counter() - start}
