"""The training device, chosen out loud and never by silent fallback.

`choose()` returns CUDA when torch can use a GPU. When it cannot, and the machine has NVIDIA
hardware that is not hidden on purpose (CUDA_VISIBLE_DEVICES="" or -1), it refuses with the
reason (a CPU-only torch build, or a driver older than the build's CUDA needs) and the fix,
instead of holding a GPU allocation for hours while training on the CPU. Training on the CPU
on such a machine takes an explicit switch: DEEPSSM_DEVICE=cpu (or `deepssm-wf train --device
cpu`). `facts()` is what the checkpoint and the model card record about the device.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

# the kernel driver's version file: present wherever the NVIDIA driver is loaded
NVIDIA_PROC = Path("/proc/driver/nvidia/version")
NVIDIA_DEVICE = Path("/dev/nvidia0")
SWITCH = "DEEPSSM_DEVICE"  # auto (default) | cuda | cpu
CHOICES = ("auto", "cuda", "cpu")
# the oldest Linux driver each CUDA major version runs on (NVIDIA's minor-version compatibility)
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
INSTALL_HINT = ("install the torch build for this cluster's driver, e.g. `pip install torch==2.13.0 --index-url "
                "https://download.pytorch.org/whl/cu126` for a driver >= 525 (see the README, 'GPU'), then check it "
                "on the GPU partition with `python -m deepssm_workflow.gpu_check --quick`")


class DeviceError(RuntimeError):
    pass


def nvidia_hardware() -> str | None:
    """What says this machine has an NVIDIA GPU (its driver's version line, or its device file), or None."""
    if NVIDIA_PROC.is_file():
        first = NVIDIA_PROC.read_text(errors="replace").splitlines()[:1]
        return first[0].strip() if first else str(NVIDIA_PROC)
    if NVIDIA_DEVICE.exists():
        return str(NVIDIA_DEVICE)
    return None


def driver_version() -> int | None:
    """The NVIDIA kernel driver's major version (e.g. 535), from its version file."""
    line = nvidia_hardware() or ""
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+)\.", line)
    return int(found.group(1)) if found else None


def hidden_on_purpose() -> bool:
    return os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")


def why_cuda_is_unusable() -> str:
    build = torch.version.cuda
    if build is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    needed, driver = MIN_DRIVER.get(int(build.split(".")[0])), driver_version()
    if needed and driver is not None and driver < needed:
        return (f"this torch ({torch.__version__}) is built for CUDA {build}, which needs an NVIDIA driver >= "
                f"{needed}; this machine's driver is {driver}")
    return (f"torch {torch.__version__} (CUDA {build}) sees no usable GPU: torch.cuda.is_available() is False "
            f"(driver {driver if driver is not None else 'unknown'})")


def choose(requested: str | None = None) -> tuple[torch.device, str]:
    """(device, why) for training; `requested` (default: $DEEPSSM_DEVICE, else auto) is auto, cuda or cpu."""
    requested = (requested or os.environ.get(SWITCH) or "auto").lower()
    if requested not in CHOICES:
        raise DeviceError(f"device {requested!r} (from {SWITCH} or --device): choose one of {', '.join(CHOICES)}")
    if requested == "cpu":
        return torch.device("cpu"), f"cpu (asked for explicitly: {SWITCH}=cpu or --device cpu)"
    if torch.cuda.is_available():
        device = torch.device("cuda")
        return device, (f"cuda (CUDA visible: {torch.cuda.get_device_name(device)}; torch {torch.__version__}, "
                        f"CUDA {torch.version.cuda})")
    if requested == "cuda":
        raise DeviceError(f"CUDA was asked for but is unusable: {why_cuda_is_unusable()}. Fix: {INSTALL_HINT}.")
    hardware = nvidia_hardware()
    if hardware and not hidden_on_purpose():
        raise DeviceError(f"this machine has an NVIDIA GPU ({hardware}) but CUDA is unusable: "
                          f"{why_cuda_is_unusable()}. Refusing to train on the CPU instead. Fix: {INSTALL_HINT}; "
                          f"or, to train on the CPU on purpose, set {SWITCH}=cpu.")
    if hardware:
        return torch.device("cpu"), "cpu (an NVIDIA GPU is present but hidden: CUDA_VISIBLE_DEVICES is empty)"
    return torch.device("cpu"), "cpu (no CUDA device visible, using CPU)"


def facts(device: torch.device) -> dict:
    """What a checkpoint and a model card record about the device and its numerics."""
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "torch": str(torch.__version__),  # a str subclass that the safe checkpoint loader refuses
        # the instruction set of torch's CPU kernels (AVX2, AVX512): weights trained on CPUs that differ
        # in it differ, so a result is compared within one machine
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
