"""Training the four DeepSSM variants (Bhalodia et al., MedIA 2024, sec. 3.2-3.3, app. A.2).

One function, `train`, runs every variant:

* base / base_focal: one phase ("train"): Adam (lr 1e-3, weight decay 5e-5) with
  cosine annealing over `epochs`; the loss is eq. 2 on correspondences, or the focal
  loss (eq. 7, a = 10, c = `focal_threshold` of the training shapes). The encoder
  predicts whitened PCA scores (`pca_layer_basis`).
* tl / tl_focal: three phases, as the paper trains them:
  "autoencoder"  g and h on the correspondences, Adam at a fixed lr 1e-4;
  "tflank"       the T-flank f on the latent target g(C), autoencoder frozen;
  "joint"        everything, L_auto + L_tf.
  tflank and joint use lr 1e-3 with cosine annealing. The focal variant uses c from
  the training shapes for points (a = 10) and, computed once at the start of the
  tflank phase from the trained autoencoder's codes, c for latents (a = 1).
  The latent target g(C) is detached: L_tf then trains f only and cannot be lowered
  by shrinking the latent space; g and h learn from L_auto.

Every epoch ends with the validation RMSE (eq. 12, mean over validation samples) of
the correspondences predicted from the image (in the autoencoder phase, of the
autoencoder's reconstruction, which sees no image). The final model is the weights of
the epoch with the lowest image-based validation RMSE (per epoch, over all validation
samples; the reference code picked per sample). After each epoch the full training
state is written atomically to `checkpoint.pt` (its sha256 in `checkpoint.pt.sha256`: a
corrupted checkpoint is ignored with a warning); a rerun resumes from it and ends with
the same weights as an uninterrupted run: batches are shuffled by a numpy Generator
seeded by (seed, epoch), and nothing else in training draws random numbers.

Outputs in `out_dir`: `model.pt` (best state_dict), `model_card.json`, `log.csv` (one
row per epoch, flushed as it runs), `loss_curve.png`, and `checkpoint.pt` (+ `.sha256`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import struct
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import replaced
from .models import (
    VARIANTS, ModelConfig, build_model, correspondence_loss, focal_loss, focal_threshold, latent_focal_threshold,
)
from .plotting import figure, save_figure
from .provenance import checksum_problem, record_checksum
from .shape_space import ShapeSpace, rmse

LOG_COLUMNS = ("epoch", "phase", "train_loss", "val_rmse", "lr", "seconds")
CHECKPOINT_FORMAT = 3  # 2: TL models carry latent_shift/latent_scale; 3: latent_transform instead of scale


@dataclass
class TrainConfig:
    variant: str = "base"
    n_modes: int | None = None       # base: leading PCA modes used; None = all of the shape space's
    latent_dim: int = 64             # TL bottleneck
    epochs: int = 30                 # base
    ae_epochs: int = 30              # TL phases
    tflank_epochs: int = 30
    joint_epochs: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    ae_lr: float = 1e-4
    weight_decay: float = 5e-5
    val_fraction: float = 0.1        # of the real subjects (paper: 0.2 for the left atrium)
    focal_a_points: float = 10.0
    focal_a_latent: float = 1.0
    focal_percentile: float = 90.0   # c of eq. 7 = this percentile of the training deviations (sec. 3.3)
    seed: int = 0
    model: dict = field(default_factory=dict)  # further ModelConfig fields (channels, ae_hidden, ...)

    def __post_init__(self):
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for name in ("epochs", "ae_epochs", "tflank_epochs", "joint_epochs"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.is_tl and self.tflank_epochs + self.joint_epochs < 1:
            problems.append("a TL variant needs tflank_epochs + joint_epochs >= 1 (the model is chosen on them)")
        if not self.is_tl and self.epochs < 1:
            problems.append("a base variant needs epochs >= 1")
        if self.batch_size < 1:
            problems.append(f"batch_size must be positive, got {self.batch_size}")
        if not 0.0 < self.focal_percentile <= 100.0:
            problems.append(f"focal_percentile must be in (0, 100], got {self.focal_percentile}")
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def is_tl(self) -> bool:
        return self.variant.startswith("tl")

    @property
    def is_focal(self) -> bool:
        return self.variant.endswith("focal")

    def phases(self) -> list[tuple[str, int]]:
        if self.is_tl:
            return [("autoencoder", self.ae_epochs), ("tflank", self.tflank_epochs), ("joint", self.joint_epochs)]
        return [("train", self.epochs)]


def pca_layer_basis(space: ShapeSpace, k: int) -> np.ndarray:
    """The fixed output layer's weight: the leading k modes scaled by their standard deviations,
    so the encoder predicts whitened (unit-variance) scores. The layer is still the PCA
    reconstruction, mean + basis . z, only in whitened units: raw femur scores reach +-60
    while a freshly initialized linear head outputs about +-1, and Adam's ~1e-3 steps took
    most of a short run just to reach that scale."""
    return space.basis[:k] * np.sqrt(space.variances[:k])[:, None]


# -- data


def split_by_source(n_real: int, source_index, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices into [real subjects 0..n_real-1, generated samples ...].

    `source_index[j]` is the real subject (0..n_real-1) that generated sample j was made
    from (KDE augmentation warps that subject's image). round(val_fraction * n_real)
    real subjects (at least 1, at most n_real - 1) are drawn for validation, and every
    generated sample follows its source subject into the same split. No subject's
    anatomy is therefore on both sides, unlike the reference implementation, which
    split real and augmented samples together and so validated on warped copies of
    training images. Deterministic in `seed`; both arrays are sorted.
    """
    source = np.asarray(source_index, dtype=np.int64).reshape(-1)
    if n_real < 2:
        raise ValueError(f"need at least 2 real subjects to split, got {n_real}")
    if source.size and (source.min() < 0 or source.max() >= n_real):
        raise ValueError(f"source_index must name real subjects 0..{n_real - 1}")
    n_val = min(max(int(round(val_fraction * n_real)), 1), n_real - 1)
    val_real = np.random.default_rng(seed).choice(n_real, size=n_val, replace=False)
    is_val = np.zeros(n_real + source.size, dtype=bool)
    is_val[val_real] = True
    is_val[n_real:] = np.isin(source, val_real)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _batches(indices: np.ndarray, batch_size: int, seed: int, epoch: int, shuffle: bool = True):
    """Index batches; the order depends only on (seed, epoch), so a resumed run shuffles alike."""
    indices = np.asarray(indices)
    if shuffle:
        indices = np.random.default_rng([seed, epoch]).permutation(indices)
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def _tensor(array, idx, device) -> torch.Tensor:
    """Rows `idx` of an array or a row store (NpyRows, StackedRows: only those rows are read) as a float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(array[np.asarray(idx)], dtype=np.float32)).to(device)


def _memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last activations on CPU: oneDNN's 3D convs, pools and PReLUs run faster on them
    (the training benchmark measures it). CUDA keeps the default, where it was not measured."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def _image_tensor(images, idx, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Rows `idx` of (n, Z, Y, X) images as a (B, 1, Z, Y, X) float32 batch."""
    return _tensor(images, idx, device).unsqueeze(1).contiguous(memory_format=memory_format)


# -- inference


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _predict_idx(model: nn.Module, images, idx, batch_size: int,
                 memory_format=torch.contiguous_format) -> np.ndarray:
    model.eval()
    device = _model_device(model)
    out = [model(_image_tensor(images, batch, device, memory_format))[1].cpu().numpy()
           for batch in _batches(idx, batch_size, 0, 0, shuffle=False)]
    return np.concatenate(out)


def predict(model: nn.Module, images, batch_size: int = 8) -> tuple[np.ndarray, float]:
    """Correspondences (n, M, 3) predicted from (n, Z, Y, X) images (array or memmap), and
    the wall-clock seconds per scan (data loading included). Leaves the model in eval mode."""
    device = _model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    points = _predict_idx(model, images, np.arange(len(images)), batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return points, (time.perf_counter() - start) / max(len(images), 1)


# -- files


def _atomic_torch_save(obj, path: Path) -> None:
    with replaced(path) as tmp:
        torch.save(obj, tmp)


def _save_checkpoint(state: dict, path: Path) -> None:
    """Atomically, with its sha256 recorded in path.sha256 (checked before a resume)."""
    with replaced(path) as tmp:
        torch.save(state, tmp)
        record_checksum(path, tmp)


def _atomic_json(obj, path: Path) -> None:
    with replaced(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _write_log(path: Path, history: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def _append_log(path: Path, row: dict) -> None:
    with open(path, "a", newline="") as handle:
        csv.DictWriter(handle, LOG_COLUMNS).writerow(row)
        handle.flush()
        os.fsync(handle.fileno())


def _plot_history(history: list[dict], best_epoch: int, path: Path) -> None:
    fig, axes = figure(1, 2, cell=(4.0, 3.0))
    ax_loss, ax_rmse = axes[0]
    for phase in dict.fromkeys(row["phase"] for row in history):
        rows = [row for row in history if row["phase"] == phase]
        epochs = [row["epoch"] for row in rows]
        ax_loss.plot(epochs, [row["train_loss"] for row in rows], marker=".", label=phase)
        ax_rmse.plot(epochs, [row["val_rmse"] for row in rows], marker=".", label=phase)
    ax_rmse.axvline(best_epoch, color="0.5", linestyle="--", linewidth=0.8, label=f"best ({best_epoch})")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_rmse.set(xlabel="epoch", ylabel="RMSE (eq. 12)", title="validation RMSE")
    ax_rmse.legend(frameon=False)
    save_figure(fig, path)


# -- training


def _pick_device(device, log) -> torch.device:
    if device is not None:
        device = torch.device(device)
        log(f"device: {device} (given by the caller)")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        log(f"device: cuda (CUDA visible: {torch.cuda.get_device_name(device)})")
    else:
        device = torch.device("cpu")
        log("device: cpu (no CUDA device visible, using CPU)")
    return device


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def train(images, points, train_idx, val_idx, shape_space: ShapeSpace, config: TrainConfig, out_dir,
          device=None, log=print, data_hash: str | None = None, stop_after_epochs: int | None = None) -> dict | None:
    """Train `config.variant` on images (n, Z, Y, X) and correspondences (n, M, 3).

    `train_idx` / `val_idx` index both arrays (see `split_by_source`); either may be a row store
    (np.memmap, NpyRows, StackedRows), read one batch at a time. `shape_space` gives the mean shape (and, for
    the base variants, the PCA layer). `data_hash` identifies the data for the model card
    and the checkpoint. Resumes from `out_dir/checkpoint.pt` when it was written for the
    same configuration, data and split. `stop_after_epochs=k` returns None after k
    epochs in total (checkpoint written), as if the run had been killed there.
    Returns the model card.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = np.asarray(train_idx, dtype=np.int64), np.asarray(val_idx, dtype=np.int64)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError(f"need training and validation samples, got {len(train_idx)} and {len(val_idx)}")
    if np.intersect1d(train_idx, val_idx).size:
        raise ValueError("train_idx and val_idx overlap")
    if len(images) != len(points) or points.shape[-1] != 3:
        raise ValueError(f"need n images and n (M, 3) shapes, got {len(images)} images and points {points.shape}")
    device = _pick_device(device, log)

    # -- model
    space = shape_space
    k = space.n_modes if config.n_modes is None else config.n_modes
    if k > space.n_modes:
        raise ValueError(f"n_modes={k} exceeds the shape space's {space.n_modes} modes")
    model_config = ModelConfig(input_shape=tuple(images.shape[1:]), n_points=points.shape[1], n_modes=k,
                               latent_dim=config.latent_dim, **config.model)
    torch.manual_seed(config.seed)
    layout = _memory_format(device)
    model = build_model(config.variant, model_config, space.mean, pca_layer_basis(space, k))
    model = model.to(device, memory_format=layout)

    val_points = np.asarray(points[val_idx], dtype=np.float64)
    point_c = focal_threshold(points, config.focal_percentile, rows=train_idx) if config.is_focal else None
    focal_c = {"points": point_c, "latent": None}

    # -- resume
    signature = {"format": CHECKPOINT_FORMAT, "config": asdict(config), "model_config": asdict(model_config),
                 "data_hash": data_hash, "train_idx": train_idx.tolist(), "val_idx": val_idx.tolist()}
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.csv"
    ckpt = None
    corrupted = checksum_problem(ckpt_path) if ckpt_path.exists() else None
    if corrupted:
        log(f"WARNING: ignoring {ckpt_path}: {corrupted}; starting afresh")
    elif ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ckpt.get("signature") != signature:
            log(f"ignoring {ckpt_path}: written for another configuration, data or split; starting afresh")
            ckpt = None
    if ckpt is None:
        history, best = [], {"epoch": None, "val_rmse": float("inf"), "state": None}
        start_phase, start_epoch = 0, 0
        _write_log(log_path, history)
    else:
        model.load_state_dict(ckpt["model"])
        history, best, focal_c = ckpt["history"], ckpt["best"], ckpt["focal_c"]
        start_phase, start_epoch = ckpt["phase_index"], ckpt["phase_epoch"]
        _write_log(log_path, history)  # drops a row written after the checkpoint, if any
        log(f"resuming from {ckpt_path} after epoch {len(history)}")

    def loss_fn(pred, target, kind):
        if config.is_focal:
            a = config.focal_a_points if kind == "points" else config.focal_a_latent
            return focal_loss(pred, target, a=a, c=focal_c[kind])
        return correspondence_loss(pred, target)

    # the first phase that trains the T-flank (tflank, or joint when tflank has no epochs)
    first_image_phase = next((phase for phase, n in config.phases() if phase != "autoencoder" and n > 0), None)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for phase_index, (phase, n_epochs) in enumerate(config.phases()):
            if phase_index < start_phase or n_epochs == 0:
                continue
            params = model.set_phase(phase) if config.is_tl else list(model.parameters())
            fixed = phase == "autoencoder"
            # fused: one kernel for all parameters instead of several passes over each tensor
            # (the encoder's first FC layer alone has 20 M weights at femur size)
            optimizer = torch.optim.Adam(params, lr=config.ae_lr if fixed else config.lr,
                                         weight_decay=config.weight_decay, fused=True)
            scheduler = (torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0) if fixed else
                         torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=n_epochs))
            first = 0
            if ckpt is not None and phase_index == start_phase:
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                first = start_epoch
            if config.is_tl and phase == first_image_phase and first == 0:
                # the trained autoencoder's codes of the training shapes set the T-flank's output
                # whitening and, for tl_focal, the latent focal threshold
                model.eval()
                with torch.no_grad():
                    codes = np.concatenate([model.encode(_tensor(points, b, device)).cpu().numpy()
                                            for b in _batches(train_idx, config.batch_size, 0, 0, shuffle=False)])
                model.whiten_latent(codes)
                if config.is_focal:
                    focal_c["latent"] = latent_focal_threshold(codes, config.focal_percentile)
                    log(f"latent focal threshold c = {focal_c['latent']:.4g}")

            for epoch_in_phase in range(first, n_epochs):
                epoch = len(history) + 1
                start = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                model.train()
                total, count = 0.0, 0
                for batch in _batches(train_idx, config.batch_size, config.seed, epoch):
                    target = _tensor(points, batch, device)
                    if phase == "train":
                        loss = loss_fn(model(_image_tensor(images, batch, device, layout))[1], target, "points")
                    else:
                        latent, recon = model.autoencode(target)
                        loss = 0.0
                        if phase in ("autoencoder", "joint"):
                            loss = loss_fn(recon, target, "points")
                        if phase in ("tflank", "joint"):
                            predicted = model.tflank(_image_tensor(images, batch, device, layout))
                            loss = loss + loss_fn(predicted, latent.detach(), "latent")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(batch)
                    count += len(batch)
                scheduler.step()

                if phase == "autoencoder":
                    model.eval()
                    with torch.no_grad():
                        pred = np.concatenate([model.autoencode(_tensor(points, b, device))[1].cpu().numpy()
                                               for b in _batches(val_idx, config.batch_size, 0, 0, shuffle=False)])
                else:
                    pred = _predict_idx(model, images, val_idx, config.batch_size, layout)
                val_rmse = float(rmse(pred, val_points).mean())
                if phase != "autoencoder" and val_rmse < best["val_rmse"]:
                    best = {"epoch": epoch, "val_rmse": val_rmse, "state": _clone_state(model)}

                row = {"epoch": epoch, "phase": phase, "train_loss": total / count, "val_rmse": val_rmse,
                       "lr": lr, "seconds": round(time.perf_counter() - start, 4)}
                history.append(row)
                _save_checkpoint({"signature": signature, "model": model.state_dict(),
                                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                  "phase_index": phase_index, "phase_epoch": epoch_in_phase + 1,
                                  "history": history, "best": best, "focal_c": focal_c}, ckpt_path)
                _append_log(log_path, row)
                log(f"epoch {epoch} [{phase}] loss {row['train_loss']:.5g} val RMSE {val_rmse:.4g} "
                    f"lr {lr:.3g} ({row['seconds']:.2f} s)")
                if stop_after_epochs is not None and epoch >= stop_after_epochs:
                    return None
            ckpt = None
    finally:
        torch.use_deterministic_algorithms(deterministic)

    # -- outputs
    _atomic_torch_save(best["state"], out_dir / "model.pt")
    seconds = [row["seconds"] for row in history]
    card = {
        "variant": config.variant,
        "config": asdict(config),
        "model_config": asdict(model_config),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "best_epoch": best["epoch"],
        "best_phase": history[best["epoch"] - 1]["phase"],
        "val_rmse": best["val_rmse"],
        "n_train": int(len(train_idx)),
        "n_val": int(len(val_idx)),
        "focal_c_points": focal_c["points"],
        "focal_c_latent": focal_c["latent"],
        "data_hash": data_hash,
        "epochs_run": len(history),
        "mean_epoch_seconds": float(np.mean(seconds)),
        "torch": torch.__version__,
    }
    _atomic_json(card, out_dir / "model_card.json")
    _plot_history(history, best["epoch"], out_dir / "loss_curve.png")
    log(f"best epoch {best['epoch']} ({card['best_phase']}): validation RMSE {best['val_rmse']:.4g}")
    return card


def load_model(out_dir, device="cpu") -> nn.Module:
    """The trained model of `out_dir` (model.pt + model_card.json) in eval mode.

    The base variants' PCA layer is rebuilt from the state_dict's own buffers.
    """
    out_dir = Path(out_dir)
    card = json.loads((out_dir / "model_card.json").read_text())
    config = ModelConfig(**card["model_config"])
    state = torch.load(out_dir / "model.pt", map_location=device, weights_only=True)
    if card["variant"].startswith("base"):
        mean = state["pca_bias"].cpu().numpy().reshape(-1, 3)
        basis = state["pca_weight"].cpu().numpy().T
    else:
        mean, basis = state["mean_shape"].cpu().numpy().reshape(-1, 3), None
    model = build_model(card["variant"], config, mean, basis)
    model.load_state_dict(state)
    return model.to(device).eval()


# -- from the workflow's artifacts


class NpyRows:
    """Rows of a C-ordered float .npy array read on demand with os.pread: a .npy file, or one
    array inside an uncompressed .npz (what np.savez writes), e.g. `NpyRows(samples.npz, "points")`.

    Unlike a memory map, the pages read stay in the kernel's page cache and out of this
    process's resident set, so training's peak RSS does not grow with the number of
    augmented samples (a memory map's touched pages count toward it, and np.load reads a
    whole array)."""

    def __init__(self, path, member: str | None = None):
        self.path = Path(path)
        where = f"{self.path}" + (f" [{member}]" if member else "")
        start = 0 if member is None else _stored_member_offset(self.path, member + ".npy")
        with open(self.path, "rb") as handle:
            handle.seek(start)
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                           np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(handle)
            self.data_offset = handle.tell()
        if fortran_order or dtype not in (np.float32, np.float64) or len(shape) < 2:
            raise ValueError(f"{where}: expected a C-ordered float32 or float64 stack of rows, got dtype {dtype}, "
                             f"shape {shape}{', Fortran order' if fortran_order else ''}")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        expected = self.data_offset + self.shape[0] * self.row_bytes
        if self.path.stat().st_size < expected:
            raise ValueError(f"{where}: truncated ({self.path.stat().st_size} bytes, header says {expected})")
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = _row_indices(idx, len(self))
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for k, row in enumerate(idx):
            if not 0 <= row < self.shape[0]:
                raise IndexError(f"row {row} outside the {self.shape[0]} rows of {self.path}")
            view = memoryview(out[k]).cast("B")
            if os.preadv(self._fd, [view], self.data_offset + int(row) * self.row_bytes) != self.row_bytes:
                raise OSError(f"{self.path}: short read at row {row}")
        return out

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _stored_member_offset(path: Path, name: str) -> int:
    """Byte offset of member `name`'s data in the zip file `path`; it must be stored uncompressed."""
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise ValueError(f"{path}: no array {name[:-4]!r} (has {', '.join(archive.namelist())})") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: {name} is compressed (np.savez_compressed?); rows can only be read "
                         f"from arrays stored uncompressed, as np.savez writes them")
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)  # the zip local file header; name and extra-field lengths at bytes 26-29
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length


def _row_indices(idx, n: int) -> np.ndarray:
    """A slice, an int or a sequence of rows as an int64 array of row numbers."""
    if isinstance(idx, slice):
        return np.arange(n)[idx]
    return np.atleast_1d(np.asarray(idx, dtype=np.int64))


class StackedRows:
    """Several row-indexable arrays (real data in memory, generated samples read by NpyRows)
    seen as one, reading only the rows asked for."""

    def __init__(self, *arrays):
        self.arrays = arrays
        self.offsets = np.cumsum([0] + [len(a) for a in arrays])
        self.shape = (int(self.offsets[-1]), *arrays[0].shape[1:])
        self.dtype = np.result_type(*(a.dtype for a in arrays))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = _row_indices(idx, len(self))
        out = np.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for k, array in enumerate(self.arrays):
            inside = (idx >= self.offsets[k]) & (idx < self.offsets[k + 1])
            if inside.any():
                out[inside] = array[idx[inside] - self.offsets[k]]
        return out


def file_hash(*paths) -> str:
    """sha256 over the bytes of the given files, in order (the training data's identity)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def train_from_artifacts(cohort_dir, preprocess_dir, augmentation_dir, variant: str, settings: dict, out_dir,
                         threads: int = 1, log=print) -> dict:
    """Train one variant on the real training images plus the augmented samples.

    `settings` is the config's `training` block: the shape space for the base variants
    (`n_modes` or `variance` of the real training shapes) and TrainConfig fields.
    """
    cohort_dir, preprocess_dir, augmentation_dir = Path(cohort_dir), Path(preprocess_dir), Path(augmentation_dir)
    paths = [preprocess_dir / "train.npz", cohort_dir / "shapes_train.npz", augmentation_dir / "samples.npz",
             augmentation_dir / "images.npy"]
    real, shapes, samples = (np.load(p) for p in paths[:3])
    if list(real["ids"]) != list(shapes["ids"]):
        raise ValueError(f"{paths[0]} and {paths[1]} list different training subjects")
    # generated samples are read a batch at a time, so memory does not grow with their number
    images = StackedRows(real["images"], NpyRows(paths[3]))
    points = StackedRows(shapes["world"], NpyRows(paths[2], "points"))
    space_settings = {key: settings[key] for key in ("n_modes", "variance") if key in settings}
    space = ShapeSpace(**space_settings).fit(shapes["world"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"variant", "n_modes"}
    config = TrainConfig(variant=variant, **{k: v for k, v in settings.items() if k in fields})
    train_idx, val_idx = split_by_source(len(real["ids"]), samples["source_index"], config.val_fraction, config.seed)
    torch.set_num_threads(max(1, threads))
    log(f"{variant}: {len(train_idx)} training / {len(val_idx)} validation samples, {space.n_modes} PCA modes")
    return train(images, points, train_idx, val_idx, space, config, out_dir, log=log, data_hash=file_hash(*paths))
