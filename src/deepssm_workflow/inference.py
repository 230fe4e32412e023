"""A trained model back from its folder, through the method registry, and batched prediction.

    trained = load_trained("results/femur/models/base")   # model.pt + model_card.json
    points, seconds_per_scan = predict(trained.method, trained.model, images)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import card as cards
from .engine import batches, image_batch
from .methods import Method, Registered, get


@dataclass
class Trained:
    entry: Registered  # the registered name the model was trained as
    model: nn.Module   # in eval mode
    card: dict

    @property
    def method(self) -> Method:
        return self.entry.method

    def has(self, capability: str) -> bool:
        return self.entry.has(capability)


def load_trained(model_dir, device="cpu") -> Trained:
    """The trained model of `model_dir` (model.pt + model_card.json), rebuilt by its method."""
    model_dir = Path(model_dir)
    for name in ("model.pt", "model_card.json"):
        if not (model_dir / name).is_file():
            raise ValueError(f"{model_dir}: the trained model's {name} is missing")
    card = cards.read(model_dir / "model_card.json")
    entry = get(card["method"])
    state = torch.load(model_dir / "model.pt", map_location=device, weights_only=True)
    model = entry.method.rebuild(card["network"], state)
    model.load_state_dict(state)
    return Trained(entry, model.to(device).eval(), card)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(method: Method, model: nn.Module, images, batch_size: int = 8) -> tuple[np.ndarray, float]:
    """Correspondences (n, M, 3) predicted from (n, Z, Y, X) images (array, memmap or row store),
    and the wall-clock seconds per scan (data loading included). Leaves the model in eval mode."""
    model.eval()
    device = _device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    points = np.concatenate([method.predict(model, image_batch(images, rows, device)).cpu().numpy()
                             for rows in batches(np.arange(len(images)), batch_size)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return points, (time.perf_counter() - start) / max(len(images), 1)


@torch.no_grad()
def localize(method: Method, model: nn.Module, scans, batch_size: int = 1) -> tuple[dict[str, np.ndarray], float]:
    """What a LOCALIZES method finds in (n, Z, Y, X) uncropped scans on their grids (`Method.localize`: local,
    world, image_to_world, found; numpy), and the wall-clock seconds per scan. Leaves the model in eval mode."""
    model.eval()
    device = _device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    parts = [method.localize(model, image_batch(scans, rows, device))
             for rows in batches(np.arange(len(scans)), batch_size)]
    found = {key: torch.cat([part[key] for part in parts]).cpu().numpy() for key in parts[0]} if parts else {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return found, (time.perf_counter() - start) / max(len(scans), 1)


@torch.no_grad()
def codes(method: Method, model: nn.Module, *, shapes=None, images=None, batch_size: int = 8) -> np.ndarray:
    """(n, D) float64 codes of shapes (n, M, 3) or of images (n, Z, Y, X), in the method's code space
    (`shape_code` / `image_code`: PCA_SCORES or LATENT_CODE)."""
    model.eval()
    device = _device(model)
    if (shapes is None) == (images is None):
        raise ValueError("give shapes or images")
    source = shapes if shapes is not None else images
    out = []
    for rows in batches(np.arange(len(source)), batch_size):
        if shapes is not None:
            out.append(method.shape_code(model, torch.as_tensor(np.asarray(shapes[rows]), dtype=torch.float32,
                                                                device=device)))
        else:
            out.append(method.image_code(model, image_batch(images, rows, device)))
    return torch.cat(out).double().cpu().numpy()


@torch.no_grad()
def decode(method: Method, model: nn.Module, codes: np.ndarray) -> np.ndarray:
    """(n, M, 3) float64 shapes of (n, D) codes (LATENT_CODE)."""
    model.eval()
    shapes = method.decode(model, torch.as_tensor(codes, dtype=torch.float32, device=_device(model)))
    return shapes.double().cpu().numpy()
