"""The model card (`model_card.json` beside `model.pt`): what was trained, how, on what, and
all that is needed to build the network again (`method` names the registered method;
`network` is its `network_config`; the weights are in model.pt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .atomic import replaced


def write(path, *, method: str, settings: dict, engine: dict, network: dict, device: torch.device, facts: dict,
          history: list[dict], best: dict, state: dict, n_train: int, n_val: int, data_hash: str | None,
          validation_measure: str = "RMSE (eq. 12)") -> dict:
    card = {
        "method": method,
        "settings": settings,
        "engine": engine,
        "network": network,
        "device": str(device),
        "device_name": facts["name"],
        "device_facts": facts,  # torch, CUDA and cuDNN versions, TF32 and determinism flags
        "best_epoch": best["epoch"],
        "best_phase": history[best["epoch"] - 1]["phase"],
        "val_rmse": best["val_rmse"],  # the kept epoch's validation error, in `validation_measure`
        "validation_measure": validation_measure,
        "n_train": int(n_train),
        "n_val": int(n_val),
        "state": state,  # what the method measured before or while training (e.g. focal thresholds)
        "data_hash": data_hash,
        "epochs_run": len(history),
        "mean_epoch_seconds": float(np.mean([row["seconds"] for row in history])),
        "torch": torch.__version__,
    }
    with replaced(path) as tmp:
        Path(tmp).write_text(json.dumps(card, indent=2) + "\n")
    return card


def read(path) -> dict:
    path = Path(path)
    card = json.loads(path.read_text())
    if "method" not in card or "network" not in card:
        raise ValueError(f"{path}: not a model card of this version (no method or network); retrain the model")
    return card
