"""One-call check of the GPU path: `python -m deepssm_workflow.gpu_check [--quick] [--out FILE]`.

Run it on a GPU node before a long run (under 8 minutes on one GPU). It prints the environment
(torch build, CUDA, driver, GPU, capability, TF32 and determinism flags), then asserts and
times, on the device `devices.choose` picks:

  device       the choice and its reason (on a GPU machine it must be CUDA)
  train        every registered method trained by the engine on a small synthetic cohort, finite
  run-to-run   the same training twice: bitwise identical weights
  resume       stopped after 2 epochs and resumed: bitwise identical to uninterrupted
  precision    a paper-size femur epoch (65 x 46 x 58 voxels, Base-DeepSSM): fp32 vs bf16 autocast
               on the conv stack, seconds and peak GPU memory
  read-ahead   training samples/s from a store on disk, with and without reading ahead
  inference    seconds per scan at batch 1 and 8
  cpu-vs-gpu   largest difference between the CPU's and the device's predictions (mm)

--quick shrinks every size so that it runs in seconds on a CPU: the tests run it so, and it
cannot rot. Each line is `check ... value`; the whole result also goes to --out as JSON. The
exit status is 1 when an assertion fails (the line says which), else 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import devices, methods
from .engine import EngineSettings, optional_inputs, train
from .holdout import split_by_source
from .inference import load_trained, predict
from .shape_space import ShapeSpace

PAPER_FEMUR = (58, 46, 65)  # (Z, Y, X): the paper's 65 x 46 x 58 femur input


def cohort(n_real: int, shape, n_points: int, seed: int = 0):
    """Shapes along 3 modes and images showing their first points as blobs, with one generated
    neighbour per real subject (as augmentation makes them): images, points, train/val split, space,
    and the blobs' cores as segmentations (for a method that needs them)."""
    rng = np.random.default_rng(seed)
    centre = np.array(shape[::-1], dtype=float) / 2
    mean = centre + rng.normal(0, min(shape) / 6, (n_points, 3))
    modes = rng.normal(0, 1, (3, n_points, 3))
    source = np.arange(n_real)
    scores = np.concatenate([rng.normal(0, 1, (n_real, 3)), rng.normal(0, 1, (n_real, 3))])
    points = (mean + np.einsum("nk,kmd->nmd", scores, modes)).astype(np.float32)
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    images = np.zeros((len(points), *shape), np.float32)
    masks = np.zeros((len(points), *shape), np.float32)
    for i, shape_points in enumerate(points):
        for x, y, z in shape_points[:4]:
            squared = (xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2
            images[i] += np.exp(-squared / 8.0)
            masks[i] = np.maximum(masks[i], squared < 8.0)
    train_idx, val_idx = split_by_source(n_real, source, 0.25)
    return images, points, train_idx, val_idx, ShapeSpace(n_modes=3).fit(points[train_idx]), masks


def same_weights(a: Path, b: Path) -> bool:
    x, y = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(device, precision: str, shape, n: int, batch: int) -> tuple[float, int | None]:
    """Seconds of one training epoch (n samples) of the paper-size Base-DeepSSM network, fastest of
    two, and the peak GPU memory in bytes (None on CPU)."""
    images, points, train_idx, val_idx, space, _ = cohort(n, shape, 64)
    entry = methods.get(methods.names(default_only=True)[0])  # Base-DeepSSM: the first registered
    torch.manual_seed(0)
    model = entry.method.build(entry.settings({}), methods.DataSpec(shape, 64, space, precision)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.as_tensor(images[:batch]).unsqueeze(1).to(device)
    y = torch.as_tensor(points[:batch]).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(2):
        _sync(device)
        start = time.perf_counter()
        for _ in range(max(1, n // batch)):
            loss = (entry.method.predict(model, x) - y).square().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return best, peak


def _cpu_has_bf16() -> bool | None:
    """Whether the CPU has bf16 arithmetic (AVX-512 BF16 or AMX), which CPU bf16 autocast needs to pay off."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return None
    flags = set(info.read_text().split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def run(quick: bool, out: Path | None = None, log=print) -> dict:
    result = {"checks": [], "environment": {}}
    failed = []

    def check(name: str, ok: bool, value) -> None:
        result["checks"].append({"check": name, "ok": bool(ok), "value": value})
        log(f"check {name:<12} {'ok  ' if ok else 'FAIL'} {value}")
        if not ok:
            failed.append(name)

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": str(torch.__version__),
           "torch_cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "nvidia_hardware": devices.nvidia_hardware(), "driver": devices.driver_version(),
           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
           "cpu_bf16_units": _cpu_has_bf16(), "quick": quick}
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(0),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
    result["environment"] = env
    for key, value in env.items():
        log(f"env {key}: {value}")

    device, why = devices.choose()
    check("device", quick or device.type == "cuda", why)
    shape, n_real = ((12, 10, 14), 8) if quick else ((32, 24, 40), 24)
    images, points, train_idx, val_idx, space, masks = cohort(n_real, shape, 32)
    engine = EngineSettings(batch_size=4, val_fraction=0.25)
    quiet = lambda _message: None  # noqa: E731

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)

        def fit(name, folder, **options):
            # a method trained on uncropped scans gets the points as both frames: these images are their own world
            return train(name, methods.get(name).smoke_settings(), images, points, train_idx, val_idx, space,
                         scratch / folder, engine=engine, device=device, log=quiet,
                         **optional_inputs(name, masks, points), **options)

        for name in methods.names():
            start = time.perf_counter()
            card = fit(name, f"train_{name}")
            check("train", np.isfinite(card["val_rmse"]) and card["device"] == str(device),
                  f"{name}: val RMSE {card['val_rmse']:.4g} on {card['device']} in {time.perf_counter() - start:.1f} s")

        name = methods.names()[0]
        fit(name, "again")
        check("run-to-run", same_weights(scratch / f"train_{name}/model.pt", scratch / "again/model.pt"),
              f"{name}: two runs, bitwise identical weights")
        fit(name, "resumed", stop_after_epochs=1)
        fit(name, "resumed")
        check("resume", same_weights(scratch / f"train_{name}/model.pt", scratch / "resumed/model.pt"),
              f"{name}: stopped after epoch 1 and resumed, bitwise identical weights")

        paper, n, batch = ((16, 12, 20), 8, 4) if quick else (PAPER_FEMUR, 64, 8)
        timings = {}
        for precision in ("fp32", "bf16"):
            seconds, peak = epoch_seconds(device, precision, paper, n, batch)
            timings[precision] = seconds
            check("precision", np.isfinite(seconds), f"{precision}: epoch of {n} samples at {paper[::-1]} voxels "
                  f"{seconds:.3f} s" + (f", peak GPU memory {peak / 2**20:.0f} MiB" if peak else ""))
        check("precision", True, f"bf16 speed-up {timings['fp32'] / timings['bf16']:.2f}x")

        store = scratch / "images.npy"
        np.save(store, images)
        rates = {}
        for ahead in (False, True):
            card = train(name, methods.get(name).smoke_settings(), np.load(store, mmap_mode="r"), points,
                         train_idx, val_idx, space, scratch / f"ahead_{ahead}", engine=engine, device=device,
                         log=quiet, read_ahead=ahead)
            rates[ahead] = len(train_idx) / card["mean_epoch_seconds"]
        check("read-ahead", same_weights(scratch / "ahead_False/model.pt", scratch / "ahead_True/model.pt"),
              f"samples/s without {rates[False]:.1f}, with {rates[True]:.1f} (same weights)")

        trained = load_trained(scratch / f"train_{name}", device=device)
        for batch_size in (1, 8):
            _, per_scan = predict(trained.method, trained.model, images, batch_size=batch_size)
            check("inference", per_scan > 0, f"batch {batch_size}: {per_scan * 1000:.2f} ms per scan")
        on_cpu = load_trained(scratch / f"train_{name}", device="cpu")
        here, _ = predict(trained.method, trained.model, images)
        there, _ = predict(on_cpu.method, on_cpu.model, images)
        difference = float(np.abs(here - there).max())
        check("cpu-vs-gpu", difference < 1e-2, f"largest |prediction difference| {difference:.2e} mm")

    result["failed"] = failed
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepssm_workflow.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    try:
        result = run(args.quick, args.out)
    except devices.DeviceError as error:
        print(f"check device       FAIL {error}", flush=True)
        return 1
    print("gpu_check: " + ("all checks passed" if not result["failed"] else f"FAILED: {', '.join(result['failed'])}"))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
