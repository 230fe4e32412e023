"""The GPU path on any machine: no silent CPU fallback (simulated NVIDIA hardware with an unusable
CUDA, and the explicit CPU switch), line-buffered training logs visible while a job runs,
throttled checkpoints with exact resume, the device facts in checkpoint and card, and the GPU
check's quick mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from deepssm_workflow import devices, engine, gpu_check, methods
from deepssm_workflow.augment import augment
from deepssm_workflow.cli import main
from deepssm_workflow.engine import EngineSettings, train
from deepssm_workflow.ingest import ingest_cohort
from deepssm_workflow.preprocess import PreprocessSettings, preprocess_training

DRIVER_535 = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"


@pytest.fixture
def nvidia_machine(tmp_path, monkeypatch):
    """This machine as one with an NVIDIA driver loaded whose CUDA torch cannot use."""
    proc = tmp_path / "nvidia_version"
    proc.write_text(DRIVER_535)
    monkeypatch.setattr(devices, "NVIDIA_PROC", proc)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(devices.SWITCH, raising=False)
    return proc


def test_a_cpu_only_build_on_a_gpu_machine_is_refused_with_the_reason_and_the_fix(nvidia_machine, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(devices.DeviceError) as error:
        devices.choose()
    message = str(error.value)
    assert "this machine has an NVIDIA GPU (NVRM version" in message and "is a CPU-only build" in message
    assert "Refusing to train on the CPU instead" in message and "DEEPSSM_DEVICE=cpu" in message
    assert "--index-url" in message  # how to install a CUDA build


def test_a_driver_too_old_for_the_builds_cuda_is_named(nvidia_machine, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert devices.driver_version() == 535
    with pytest.raises(devices.DeviceError, match="built for CUDA 13.0, which needs an NVIDIA driver >= 580; "
                                                  "this machine's driver is 535"):
        devices.choose("auto")


def test_cpu_on_a_gpu_machine_only_by_the_explicit_switch_or_a_hidden_gpu(nvidia_machine, monkeypatch):
    monkeypatch.setenv(devices.SWITCH, "cpu")
    assert devices.choose() == (torch.device("cpu"), "cpu (asked for explicitly: DEEPSSM_DEVICE=cpu or --device cpu)")
    monkeypatch.delenv(devices.SWITCH)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    device, why = devices.choose()
    assert device.type == "cpu" and "hidden" in why
    with pytest.raises(devices.DeviceError, match="CUDA was asked for but is unusable"):
        devices.choose("cuda")
    with pytest.raises(devices.DeviceError, match="device 'gpu'"):
        devices.choose("gpu")


def test_a_machine_without_nvidia_hardware_trains_on_the_cpu_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "NVIDIA_PROC", tmp_path / "absent")
    monkeypatch.setattr(devices, "NVIDIA_DEVICE", tmp_path / "absent_too")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(devices.SWITCH, raising=False)
    assert devices.choose() == (torch.device("cpu"), "cpu (no CUDA device visible, using CPU)")


# -- real training artifacts, for the CLI


@pytest.fixture(scope="module")
def artifacts(tiny_cohort, tmp_path_factory):
    """The tiny femur ingested, preprocessed (2 mm) and augmented (4 samples): what `deepssm-wf train` reads."""
    root = tmp_path_factory.mktemp("gpu_path")
    ingest_cohort({"source": "synthetic", "manifest": str(tiny_cohort("femur") / "subjects.csv")}, "femur",
                  root / "cohort")
    preprocess_training(root / "cohort", PreprocessSettings(downsample=1.0, margin_mm=5.0), root / "preprocess")
    augment(root / "cohort", root / "preprocess", root / "augmentation", 4, "kde", 32, 0)
    return root


def train_command(root, out, epochs: int, *extra: str) -> list[str]:
    settings = {"shape_space": {"n_modes": 3}, "training": {"batch_size": 4, "val_fraction": 0.3},
                "method": {"epochs": epochs, "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8]}}}
    return ["train", "--cohort", str(root / "cohort"), "--preprocess-dir", str(root / "preprocess"),
            "--augmentation-dir", str(root / "augmentation"), "--method", methods.names()[0],
            "--settings", json.dumps(settings), "--out-dir", str(out), *extra]


def test_the_train_step_refuses_a_gpu_machine_without_usable_cuda_and_writes_nothing(
        artifacts, nvidia_machine, tmp_path, capsys):
    assert main(train_command(artifacts, tmp_path / "model", 2)) == 1
    assert "this machine has an NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "model" / "model.pt").exists() and not (tmp_path / "model" / "checkpoint.pt").exists()
    assert main(train_command(artifacts, tmp_path / "model", 2, "--device", "cpu")) == 0
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    assert card["device"] == "cpu" and card["device_facts"]["torch"] == str(torch.__version__)
    assert card["device_facts"]["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()


def test_the_training_log_shows_each_epoch_while_the_job_runs(artifacts, tmp_path):
    """stdout redirected to a file, as a rule does: the epochs appear there before the process ends."""
    log = tmp_path / "train.log"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    with open(log, "w") as handle:
        job = subprocess.Popen([sys.executable, "-m", "deepssm_workflow",
                                *train_command(artifacts, tmp_path / "model", 60, "--threads", "1")],
                               stdout=handle, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while "epoch 2 [train]" not in log.read_text():
            assert job.poll() is None, f"the job ended before its log showed epoch 2:\n{log.read_text()}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        running = job.poll() is None
        job.wait(timeout=600)
    assert running, "the log showed its epochs only once the job had ended"
    assert job.returncode == 0 and "\ndevice: cpu (" in log.read_text()


# -- checkpoints


def tl_data():
    rng = np.random.default_rng(0)
    points = (rng.uniform(3, 9, (1, 12, 3)) + rng.normal(0, 0.5, (16, 12, 3))).astype(np.float32)
    images = rng.normal(0, 1, (16, 10, 10, 10)).astype(np.float32)
    from deepssm_workflow.shape_space import ShapeSpace

    return images, points, np.arange(12), np.arange(12, 16), ShapeSpace(n_modes=3).fit(points[:12])


class Killed(Exception):
    pass


def test_throttled_checkpoints_resume_exactly_and_are_written_at_phase_ends(tmp_path, monkeypatch):
    name = next(n for n in methods.names() if methods.get(n).has(methods.LATENT_CODE))  # several phases
    entry = methods.get(name)
    settings = entry.settings({"ae_epochs": 3, "tflank_epochs": 4, "joint_epochs": 2, "latent_dim": 4,
                               "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8], "ae_hidden": 8}})
    images, points, train_idx, val_idx, space = tl_data()
    setup = EngineSettings(batch_size=4, val_fraction=0.25)
    written = []
    save = engine._save_checkpoint
    monkeypatch.setattr(engine, "_save_checkpoint", lambda state, path: (written.append(len(state["history"])),
                                                                         save(state, path)))

    def fit(out, log=lambda _: None):
        return train(name, settings, images, points, train_idx, val_idx, space, out, engine=setup, device="cpu",
                     log=log, checkpoint_seconds=1e9)

    fit(tmp_path / "full")
    assert written == [3, 7, 9]  # only at the end of each phase

    def dies_at_epoch_6(message):  # a kill in the middle of the T-flank phase, after its epoch 6 log row
        if message.startswith("epoch 6 "):
            raise Killed

    written.clear()
    with pytest.raises(Killed):
        fit(tmp_path / "cut", dies_at_epoch_6)
    assert written == [3] and (tmp_path / "cut" / "log.csv").read_text().count("\n") == 7  # header + 6 rows
    messages = []
    fit(tmp_path / "cut", messages.append)
    assert "resuming from" in messages[1] and messages[1].endswith("after epoch 3")  # epochs 4-6 are redone
    assert sum(m.startswith("epoch ") for m in messages) == 6
    full = torch.load(tmp_path / "full" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert checkpoint["device"]["device"] == "cpu" and checkpoint["device"]["deterministic"] is True


def test_a_resume_on_another_device_kind_warns(tmp_path, monkeypatch):
    images, points, train_idx, val_idx, space = tl_data()
    name = methods.names()[0]
    settings = methods.get(name).settings({"epochs": 3, "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8]}})
    setup = EngineSettings(batch_size=4, val_fraction=0.25)
    train(name, settings, images, points, train_idx, val_idx, space, tmp_path, engine=setup, device="cpu",
          log=lambda _: None, stop_after_epochs=1)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    checkpoint["device"]["device"] = "cuda"  # as if written on a GPU
    engine._save_checkpoint(checkpoint, tmp_path / "checkpoint.pt")
    messages = []
    train(name, settings, images, points, train_idx, val_idx, space, tmp_path, engine=setup, device="cpu",
          log=messages.append)
    assert any(m.startswith("WARNING: resuming on cpu a checkpoint written on cuda") for m in messages)


def test_the_gpu_check_runs_in_quick_mode_on_any_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    lines = []
    result = gpu_check.run(quick=True, out=tmp_path / "check.json", log=lines.append)
    assert result["failed"] == [], "\n".join(lines)
    names = [c["check"] for c in result["checks"]]
    for expected in ("device", "train", "run-to-run", "resume", "precision", "read-ahead", "inference", "cpu-vs-gpu"):
        assert expected in names, expected
    assert sum(c["check"] == "train" for c in result["checks"]) == len(methods.names())
    assert json.loads((tmp_path / "check.json").read_text())["environment"]["torch"] == str(torch.__version__)
