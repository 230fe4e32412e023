"""The training engine: trains any registered method (`deepssm_workflow.methods`) phase by
phase, with the guarantees every method gets by being registered:

* a seeded run: the network is built after `torch.manual_seed(seed)`, and batches are
  shuffled by a numpy Generator seeded by (seed, epoch); nothing else draws random numbers.
  `init_seed`, when set, replaces `seed` in these two (the initialisation and the batch order)
  and nowhere else: the data (the validation split, and upstream the augmentation) stay those
  of `seed`, so that a seed spread varies the training's trajectory with the data fixed;
* every epoch ends with the validation error, mean over validation samples: the eq. 12 RMSE of
  the correspondences the phase validates on, or what the method's `validation_errors` measures
  instead (its `validation_measure`; kept as `val_rmse` in the log and the card for every method);
  the kept model is the epoch of lowest validation error among the phases that select;
* the full training state is written atomically to `checkpoint.pt` (its sha256 in
  `checkpoint.pt.sha256`: a corrupted checkpoint is ignored with a warning) at most every
  `checkpoint_seconds` (0: every epoch), always at the end of a phase and before a planned
  stop; a rerun with the same method, settings, network, data and split resumes from it,
  redoes the epochs after it, and ends with the same weights as an uninterrupted run. The
  checkpoint is read onto the CPU and records the device and its numerics (`devices.facts`);
  resuming on another kind of device says that the weights will differ;
* a phase with `warmup_epochs` scales Adam's lr linearly over its first steps (`warmed_up`); the
  scheduler and `log.csv`'s lr column keep the scheduled lr;
* `log.csv` gets one row per epoch, flushed as it runs, and a log line per epoch says the
  loss, the validation RMSE and the time; the device chosen, and why, is stated first
  (`devices.choose`: no silent fallback to the CPU on a machine with a GPU);
* on CUDA the loss is summed on the device (no host sync per step) and the next batch is read
  ahead in a thread into pinned memory and copied without blocking; the CPU path reads each
  batch when it is used, as before, and its numbers are unchanged.

Outputs in `out_dir`: `model.pt` (the kept state_dict), `model_card.json` (see `card`),
`log.csv`, `loss_curve.png`, and `checkpoint.pt` (+ `.sha256`).
"""

from __future__ import annotations

import csv
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import card as cards
from . import devices
from .atomic import replaced
from .methods import SCANS, SEGMENTATIONS, Batch, DataSpec, TrainingData, get
from .plotting import figure, save_figure
from .provenance import checksum_problem, record_checksum
from .shape_space import ShapeSpace

LOG_COLUMNS = ("epoch", "phase", "train_loss", "val_rmse", "lr", "seconds")
CHECKPOINT_FORMAT = 5  # 4: method + settings + network in the signature; 5: device facts


@dataclass(frozen=True)
class EngineSettings:
    """The config's `training` block: what every method's training shares."""

    batch_size: int = 8
    val_fraction: float = 0.1  # of the real subjects (paper: 0.2 for the left atrium)
    seed: int = 0
    precision: str = "fp32"    # or bf16: autocast on the image conv stack only (see models.ModelConfig)
    # the seed of the network's initialisation (torch.manual_seed) and of the batch order; None: `seed`.
    # The validation split follows `seed` whatever this is (the seed-spread target varies this alone)
    init_seed: int | None = None

    def __post_init__(self):
        if self.init_seed is not None and (isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int)
                                           or self.init_seed < 0):
            raise ValueError(f"init_seed must be None or a non-negative integer, got {self.init_seed!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")

    @property
    def effective_init_seed(self) -> int:
        """The seed of the initialisation and of the batch order: `init_seed`, else `seed`."""
        return self.seed if self.init_seed is None else self.init_seed

    def record(self) -> dict:
        """The settings as the checkpoint's signature and the model card record them: without `init_seed`
        when it is None, so that a run that does not set it keeps the signature (and resumes from the
        checkpoints) of the runs made before the field existed."""
        record = asdict(self)
        if self.init_seed is None:
            del record["init_seed"]
        return record


# -- batches


def batches(indices: np.ndarray, batch_size: int, seed: int = 0, epoch: int = 0, shuffle: bool = False):
    """Index batches; the order depends only on (seed, epoch), so a resumed run shuffles alike."""
    indices = np.asarray(indices)
    if shuffle:
        indices = np.random.default_rng([seed, epoch]).permutation(indices)
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


@contextmanager
def warmed_up(optimizer: torch.optim.Optimizer, phase_step: int, warmup_steps: int):
    """Within it, the optimizer's lr is scaled by (phase_step + 1) / warmup_steps while phase_step is
    below warmup_steps (a linear warm-up); the scheduled lr is put back after, so the scheduler, and a
    resumed run (the step follows from the epoch and the batch), never see the scaling."""
    if phase_step >= warmup_steps:
        yield
        return
    scheduled = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * (phase_step + 1) / warmup_steps
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, scheduled):
            group["lr"] = lr


def validation_batches(indices: np.ndarray, batch_size: int):
    """Index batches in order, never leaving a sample alone in the last one (it joins the batch before): a method
    validated on pairs within a batch (`landmarks`) has no pair for a lone sample."""
    row_batches = list(batches(indices, batch_size))
    if len(row_batches) > 1 and len(row_batches[-1]) == 1:
        row_batches[-2:] = [np.concatenate(row_batches[-2:])]
    return row_batches


def rows_tensor(array, idx, device) -> torch.Tensor:
    """Rows `idx` of an array or a row store (`rows.NpyRows`, `StackedRows`: only those rows are read)
    as a float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(array[np.asarray(idx)], dtype=np.float32)).to(device)


def image_batch(images, idx, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Rows `idx` of (n, Z, Y, X) images as a (B, 1, Z, Y, X) float32 batch."""
    return rows_tensor(images, idx, device).unsqueeze(1).contiguous(memory_format=memory_format)


def memory_format(device: torch.device) -> torch.memory_format:
    """Channels-last activations on CPU: oneDNN's 3D convs, pools and PReLUs run faster on them
    (the training benchmark measures it). CUDA keeps the default, where it was not measured."""
    return torch.channels_last_3d if device.type == "cpu" else torch.contiguous_format


def _batch(images, points, rows, device, layout, segmentations=None, extras=None) -> Batch:
    return Batch(rows, rows_tensor(points, rows, device), lambda: image_batch(images, rows, device, layout),
                 _segmentation_reader(segmentations, rows, device), _extra_readers(extras, rows, device))


def _segmentation_reader(segmentations, rows, device):
    """What reads a batch's segmentations when the method asks (None: this training has none)."""
    return None if segmentations is None else (lambda: rows_tensor(segmentations, rows, device))


def _extra_readers(extras, rows, device) -> dict:
    """What reads a batch's further targets (`train`'s extras), each when the method asks."""
    return {name: (lambda store=store: rows_tensor(store, rows, device)) for name, store in (extras or {}).items()}


def _host_batch(images, points, rows, with_images: bool, pin: bool):
    """A batch read into (pinned, for an asynchronous copy) host memory: (rows, points, images or None)."""
    host = [torch.from_numpy(np.ascontiguousarray(points[rows], dtype=np.float32))]
    if with_images:
        host.append(torch.from_numpy(np.ascontiguousarray(images[rows], dtype=np.float32)).unsqueeze(1))
    if pin:
        host = [t.pin_memory() for t in host]
    return rows, host[0], host[1] if with_images else None


def _read_ahead(images, points, row_batches, device, layout, with_images: bool, segmentations=None, extras=None):
    """Batches on `device`, each read in a thread while the one before is used, copied without blocking."""
    row_batches = list(row_batches)
    pin = device.type == "cuda"
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(_host_batch, images, points, row_batches[0], with_images, pin) if row_batches else None
        for k in range(len(row_batches)):
            rows, points_host, images_host = pending.result()
            if k + 1 < len(row_batches):
                pending = reader.submit(_host_batch, images, points, row_batches[k + 1], with_images, pin)
            on_device = points_host.to(device, non_blocking=True)
            read_segmentations = _segmentation_reader(segmentations, rows, device)
            read_extras = _extra_readers(extras, rows, device)
            if images_host is None:  # a phase that reads no images (it still may, synchronously)
                yield Batch(rows, on_device, lambda rows=rows: image_batch(images, rows, device, layout),
                            read_segmentations, read_extras)
            else:
                batch_images = images_host.to(device, non_blocking=True).contiguous(memory_format=layout)
                yield Batch(rows, on_device, lambda batch_images=batch_images: batch_images, read_segmentations,
                            read_extras)


# -- files


def _save_checkpoint(state: dict, path: Path) -> None:
    """Atomically, with its sha256 recorded in path.sha256 (checked before a resume)."""
    with replaced(path) as tmp:
        torch.save(state, tmp)
        record_checksum(path, tmp)


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


def _plot_history(history: list[dict], best_epoch: int, path: Path, measure: str) -> None:
    fig, axes = figure(1, 2, cell=(4.0, 3.0))
    ax_loss, ax_rmse = axes[0]
    for phase in dict.fromkeys(row["phase"] for row in history):
        rows = [row for row in history if row["phase"] == phase]
        epochs = [row["epoch"] for row in rows]
        ax_loss.plot(epochs, [row["train_loss"] for row in rows], marker=".", label=phase)
        ax_rmse.plot(epochs, [row["val_rmse"] for row in rows], marker=".", label=phase)
    ax_rmse.axvline(best_epoch, color="0.5", linestyle="--", linewidth=0.8, label=f"best ({best_epoch})")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_rmse.set(xlabel="epoch", ylabel=measure, title="validation")
    ax_rmse.legend(frameon=False)
    save_figure(fig, path)


# -- training


def optional_inputs(method: str, segmentations=None, world=None) -> dict:
    """`train`'s optional inputs that `method` needs, from what the caller holds: the segmentations (a method
    that needs SEGMENTATIONS or SCANS) and, for SCANS, the world-frame points as the extra "world"."""
    needs = get(method).method.needs
    return {"segmentations": segmentations if needs & {SEGMENTATIONS, SCANS} else None,
            "extras": {"world": world} if SCANS in needs else None}


def pick_device(device, log) -> torch.device:
    """The caller's device (a torch device, or auto / cuda / cpu), else `devices.choose`; stated in the log."""
    if device is None or str(device) in devices.CHOICES:
        device, why = devices.choose(None if device is None else str(device))
    else:
        device, why = torch.device(device), f"{device} (given by the caller)"
    log(f"device: {why}")
    return device


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


def _resume_point(ckpt_path: Path, signature: dict, device: torch.device, log) -> dict | None:
    corrupted = checksum_problem(ckpt_path) if ckpt_path.exists() else None
    if corrupted:
        log(f"WARNING: ignoring {ckpt_path}: {corrupted}; starting afresh")
        return None
    if not ckpt_path.exists():
        return None
    # onto the CPU first: load_state_dict then copies into the model wherever it is, and nothing
    # saved later (model.pt, the best state) can carry another device's storages
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if ckpt.get("signature") != signature:
        log(f"ignoring {ckpt_path}: written for another method, settings, data or split; starting afresh")
        return None
    written_on = ckpt.get("device", {}).get("device", "?")
    if torch.device(written_on).type != device.type:
        log(f"WARNING: resuming on {device} a checkpoint written on {written_on}: the result will not be "
            f"bit-identical to an uninterrupted run on either device")
    return ckpt


def train(method: str, settings, images, points, train_idx, val_idx, shape_space: ShapeSpace, out_dir,
          engine: EngineSettings = EngineSettings(), device=None, log=print, data_hash: str | None = None,
          stop_after_epochs: int | None = None, checkpoint_seconds: float = 0.0,
          read_ahead: bool | None = None, segmentations=None, extras: dict | None = None,
          spacing=(1.0, 1.0, 1.0), n_anatomies: int = 1) -> dict | None:
    """Train the registered `method` (its Settings: `methods.get(method).settings(block)`) on
    images (n, Z, Y, X) and correspondences (n, M, 3).

    `train_idx` / `val_idx` index both arrays (see `holdout.split_by_source`); either may be a row store
    (np.memmap, NpyRows, StackedRows), read one batch at a time. `shape_space` is the dataset's
    (mean shape, PCA). `data_hash` identifies the data for the model card and the checkpoint.
    `device`: None (auto, `devices.choose`), auto / cuda / cpu, or a torch device. Resumes from
    `out_dir/checkpoint.pt` when it was written for the same method, settings, network, data
    and split. A checkpoint is written at most every `checkpoint_seconds` (0: every epoch),
    always at a phase's end. `stop_after_epochs=k` returns None after k epochs in total
    (checkpoint written), as if the run had been killed there. `read_ahead` (default: on CUDA
    only) reads the next batch in a thread. `segmentations` (n, Z, Y, X), the fraction of each
    voxel inside the anatomy, for a method that needs SEGMENTATIONS (indexed like the images).
    `extras`: further per-sample targets by name (indexed like the images; a method that needs SCANS
    asks for "world"), and `spacing` the images' voxel size (x, y, z mm) and `n_anatomies` (the points'
    blocks, one per anatomy: a multi-anatomy method's data) for the method's DataSpec.
    Returns the model card.
    """
    entry = get(method)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_idx, val_idx = np.asarray(train_idx, dtype=np.int64), np.asarray(val_idx, dtype=np.int64)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError(f"need training and validation samples, got {len(train_idx)} and {len(val_idx)}")
    if np.intersect1d(train_idx, val_idx).size:
        raise ValueError("train_idx and val_idx overlap")
    if len(images) != len(points) or points.shape[-1] != 3:
        raise ValueError(f"need n images and n (M, 3) shapes, got {len(images)} images and points {points.shape}")
    if (SEGMENTATIONS in entry.method.needs or SCANS in entry.method.needs) and segmentations is None:
        raise ValueError(f"method {method} needs the training segmentations; none were given")
    if SCANS in entry.method.needs and "world" not in (extras or {}):
        raise ValueError(f"method {method} trains on uncropped scans: it needs the world-frame particles as the "
                         f"extra 'world' (its points are the scan-frame ones)")
    for name, store in (extras or {}).items():
        if len(store) != len(images):
            raise ValueError(f"extra {name!r} has {len(store)} rows for {len(images)} images")
    if segmentations is not None and tuple(segmentations.shape) != tuple(images.shape):
        raise ValueError(f"segmentations {tuple(segmentations.shape)} must match the images {tuple(images.shape)}")
    device = pick_device(device, log)
    read_ahead = device.type == "cuda" if read_ahead is None else read_ahead
    on_device_sum = device.type == "cuda"  # no host sync per step; on CPU the float sum, as before

    torch.manual_seed(engine.effective_init_seed)
    layout = memory_format(device)
    world_mean = (np.nanmean(np.asarray(extras["world"][train_idx], dtype=np.float64), 0)  # nan: an absent anatomy
                  if extras and "world" in extras else None)
    spec = DataSpec(tuple(images.shape[1:]), points.shape[1], shape_space, engine.precision,
                    tuple(float(s) for s in spacing), world_mean, n_anatomies)
    model = entry.method.build(settings, spec).to(device, memory_format=layout)
    network = entry.method.network_config(model)
    data = TrainingData(points, train_idx, engine.batch_size, device, segmentations, extras)
    phases = entry.method.phases(settings)

    signature = {"format": CHECKPOINT_FORMAT, "method": method, "settings": asdict(settings),
                 "engine": engine.record(), "network": network, "data_hash": data_hash,
                 "train_idx": train_idx.tolist(), "val_idx": val_idx.tolist()}
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.csv"
    ckpt = _resume_point(ckpt_path, signature, device, log)
    if ckpt is None:
        state = entry.method.prepare(model, settings, data)
        history, best = [], {"epoch": None, "val_rmse": float("inf"), "state": None}
        start_phase, start_epoch = 0, 0
        _write_log(log_path, history)
    else:
        model.load_state_dict(ckpt["model"])
        history, best, state = ckpt["history"], ckpt["best"], ckpt["state"]
        start_phase, start_epoch = ckpt["phase_index"], ckpt["phase_epoch"]
        _write_log(log_path, history)  # drops the rows of epochs after the checkpoint: they run again
        log(f"resuming from {ckpt_path} after epoch {len(history)}")

    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    facts = devices.facts(device)
    last_checkpoint = time.monotonic()
    try:
        for phase_index, phase in enumerate(phases):
            if phase_index < start_phase or phase.epochs == 0:
                continue
            params = entry.method.trainable(model, phase)
            # fused: one kernel for all parameters instead of several passes over each tensor
            # (the encoder's first FC layer alone has 20 M weights at femur size)
            optimizer = torch.optim.Adam(params, lr=phase.lr, weight_decay=phase.weight_decay, fused=True)
            scheduler = (torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
                         if phase.schedule == "constant" else
                         torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=phase.epochs))
            steps_per_epoch = -(-len(train_idx) // engine.batch_size)
            warmup_steps = round(phase.warmup_epochs * steps_per_epoch)
            first = 0
            if ckpt is not None and phase_index == start_phase:
                optimizer.load_state_dict(ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
                first = start_epoch
            if first == 0:
                entry.method.begin_phase(model, settings, phase, data, state, log)

            for epoch_in_phase in range(first, phase.epochs):
                epoch = len(history) + 1
                start = time.perf_counter()
                lr = optimizer.param_groups[0]["lr"]
                model.train()
                total, count = (torch.zeros((), device=device) if on_device_sum else 0.0), 0
                row_batches = batches(train_idx, engine.batch_size, engine.effective_init_seed, epoch, shuffle=True)
                if read_ahead:
                    loader = _read_ahead(images, points, row_batches, device, layout, phase.images, segmentations,
                                         extras)
                else:
                    loader = (_batch(images, points, rows, device, layout, segmentations, extras)
                              for rows in row_batches)
                for step_in_epoch, batch in enumerate(loader):
                    loss = entry.method.loss(model, settings, phase, batch, state)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    with warmed_up(optimizer, epoch_in_phase * steps_per_epoch + step_in_epoch, warmup_steps):
                        optimizer.step()
                    total = total + (loss.detach() if on_device_sum else float(loss.detach())) * len(batch)
                    count += len(batch)
                scheduler.step()

                model.eval()
                with torch.no_grad():
                    val_rmse = float(np.concatenate([
                        entry.method.validation_errors(model, settings, phase,
                                                       _batch(images, points, rows, device, layout),
                                                       np.asarray(points[rows], dtype=np.float64))
                        for rows in validation_batches(val_idx, engine.batch_size)]).mean())
                if phase.selects_best and val_rmse < best["val_rmse"]:
                    best = {"epoch": epoch, "val_rmse": val_rmse, "state": _clone_state(model)}

                row = {"epoch": epoch, "phase": phase.name, "train_loss": float(total) / count, "val_rmse": val_rmse,
                       "lr": lr, "seconds": round(time.perf_counter() - start, 4)}
                history.append(row)
                stopping = stop_after_epochs is not None and epoch >= stop_after_epochs
                if (epoch_in_phase + 1 == phase.epochs or stopping
                        or time.monotonic() - last_checkpoint >= checkpoint_seconds):
                    _save_checkpoint({"signature": signature, "model": model.state_dict(),
                                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                      "phase_index": phase_index, "phase_epoch": epoch_in_phase + 1,
                                      "history": history, "best": best, "state": state, "device": facts}, ckpt_path)
                    last_checkpoint = time.monotonic()
                _append_log(log_path, row)
                log(f"epoch {epoch} [{phase.name}] loss {row['train_loss']:.5g} val {val_rmse:.4g} "
                    f"lr {lr:.3g} ({row['seconds']:.2f} s)")
                if stopping:
                    return None
            ckpt = None
    finally:
        torch.use_deterministic_algorithms(deterministic)

    with replaced(out_dir / "model.pt") as tmp:
        torch.save(best["state"], tmp)
    card = cards.write(out_dir / "model_card.json", method=method, settings=asdict(settings), engine=engine.record(),
                       network=network, device=device, facts=facts, history=history, best=best, state=state,
                       n_train=len(train_idx), n_val=len(val_idx), data_hash=data_hash,
                       validation_measure=entry.method.validation_measure)
    _plot_history(history, best["epoch"], out_dir / "loss_curve.png", entry.method.validation_measure)
    log(f"best epoch {best['epoch']} ({card['best_phase']}): validation {entry.method.validation_measure} "
        f"{best['val_rmse']:.4g}")
    return card
