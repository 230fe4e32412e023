"""Faults in real Snakemake runs: a training job killed mid-run resumes from its checkpoint, a
corrupted checkpoint is retrained rather than resumed, a corrupted augmentation store is detected,
removed and rebuilt, and a job that fails on bad input leaves no partial outputs and says why."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from deepssm_workflow.provenance import checksum_problem, read_sidecar, record_checksum, verify, write_sidecar
from test_cache import run_workflow, small_config, snakemake_command, with_source, workflow_env

pytestmark = pytest.mark.slow  # real Snakemake runs of the workflow (deselect with -m 'not slow')

EPOCHS = 10
MODEL = "results/femur/models/base/model.pt"
MODEL_OUTPUTS = ("model.pt", "model_card.json", "log.csv", "loss_curve.png", "provenance.json")
STORE = ("images.npy", "samples.npz", "shape_space.npz", "qc.png", "provenance.json")


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def epochs_logged(log_csv: Path) -> int:
    """Complete rows of a training log.csv (header left out)."""
    if not log_csv.is_file():
        return 0
    return max(log_csv.read_text().count("\n") - 1, 0)


def same_weights(path_a: Path, path_b: Path) -> bool:
    a = torch.load(path_a, map_location="cpu", weights_only=True)
    b = torch.load(path_b, map_location="cpu", weights_only=True)
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A work folder with the cut-down preset built up to the augmentation store (no cache)."""
    tmp = tmp_path_factory.mktemp("faults")
    configfile = small_config(tmp / "config.yaml", epochs=EPOCHS)
    work = with_source(tmp / "prepared")
    result = run(work, "results/femur/augmentation/samples.npz", configfile=configfile)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, configfile


def run(work: Path, *args: str, configfile: Path):
    return run_workflow(work, *args, "--cores", "2", configfile=configfile)


def copy_of(prepared_work: Path, dest: Path) -> Path:
    shutil.copytree(prepared_work, dest, symlinks=True)
    return dest


def reference_model(work: Path, out_dir: Path) -> Path:
    """The same training, uninterrupted: the rule's command (recorded in the model's sidecar) with
    another output folder, on the work folder's artifacts."""
    command = shlex.split(read_sidecar(work / "results/femur/models/base/provenance.json")["command"])
    command = command[:command.index("--out-dir") + 1] + [str(out_dir), "--threads", "2"]
    done = subprocess.run(command, cwd=work, env=workflow_env(work), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out_dir / "model.pt"


@pytest.fixture(scope="module")
def killed_and_resumed(prepared, tmp_path_factory):
    """SIGKILL Snakemake and its training job (the whole process group) after a few epochs, then rerun."""
    work = copy_of(prepared[0], tmp_path_factory.mktemp("killed") / "work")
    configfile = prepared[1]
    models = work / "results" / "femur" / "models" / "base"
    # a checkpoint every epoch (the rule's default writes one at most every 60 s)
    every_epoch = ("--set-resources", "train:checkpoint_seconds=0")
    job = subprocess.Popen(snakemake_command(work, MODEL, "--cores", "2", *every_epoch, configfile=configfile),
                           env=workflow_env(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 600
    while epochs_logged(models / "log.csv") < 3:
        assert job.poll() is None, "the workflow ended before training was killed"
        assert time.monotonic() < deadline, "training did not reach epoch 3 in time"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    at_kill = {"epochs": epochs_logged(models / "log.csv"),
               # (a kill inside an atomic write can leave its hidden temporary file, never a partial output)
               "present": sorted(p.name for p in models.iterdir() if not p.name.startswith(".")),
               "checkpoint": checksum_problem(models / "checkpoint.pt")}
    unlock = run_workflow(work, "--unlock", configfile=configfile)
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    plain = run(work, MODEL, configfile=configfile)
    resumed = run(work, MODEL, "--rerun-incomplete", configfile=configfile)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = reference_model(work, tmp_path_factory.mktemp("uninterrupted"))
    return {"work": work, "config": configfile, "at_kill": at_kill, "plain": plain, "resumed": resumed,
            "uninterrupted": uninterrupted}


def test_a_killed_training_job_resumes_from_its_checkpoint_and_ends_as_if_uninterrupted(killed_and_resumed):
    at_kill, work = killed_and_resumed["at_kill"], killed_and_resumed["work"]
    # the kill left only what a rerun resumes from: a verified checkpoint and the epochs' log rows
    assert 3 <= at_kill["epochs"] < EPOCHS
    assert at_kill["present"] == ["checkpoint.pt", "checkpoint.pt.sha256", "log.csv"]
    assert at_kill["checkpoint"] is None

    # Snakemake knows the job was cut short and will not take its log.csv as done
    plain = killed_and_resumed["plain"]
    assert plain.returncode != 0
    assert "incomplete" in plain.stderr and "results/femur/models/base/log.csv" in plain.stderr

    log = (work / "logs" / "femur" / "train_base.log").read_text()
    marker = "resuming from results/femur/models/base/checkpoint.pt after epoch "
    assert marker in log, log
    resumed_after = int(log.split(marker)[1].split()[0])
    assert at_kill["epochs"] <= resumed_after < EPOCHS
    assert log.count(" [train] ") == EPOCHS - resumed_after  # only the remaining epochs ran
    assert epochs_logged(work / "results" / "femur" / "models" / "base" / "log.csv") == EPOCHS
    assert same_weights(work / MODEL, killed_and_resumed["uninterrupted"])


def test_a_corrupted_checkpoint_is_not_resumed_but_trained_again(killed_and_resumed, tmp_path):
    work = copy_of(killed_and_resumed["work"], tmp_path / "work")
    checkpoint = work / "results" / "femur" / "models" / "base" / "checkpoint.pt"
    flip_a_byte(checkpoint)
    rerun = run(work, MODEL, "--forcerun", "train", configfile=killed_and_resumed["config"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (work / "logs" / "femur" / "train_base.log").read_text()
    assert "WARNING: ignoring results/femur/models/base/checkpoint.pt: sha256" in log, log
    assert "(corrupted); starting afresh" in log and "resuming" not in log
    assert log.count(" [train] ") == EPOCHS
    assert checksum_problem(checkpoint) is None  # rewritten, and verified again
    assert same_weights(work / MODEL, killed_and_resumed["uninterrupted"])


def test_a_corrupted_augmentation_store_is_refused_removed_and_rebuilt(prepared, tmp_path):
    work, configfile = copy_of(prepared[0], tmp_path / "work"), prepared[1]
    store = work / "results" / "femur" / "augmentation" / "images.npy"
    original = store.read_bytes()
    flip_a_byte(store)

    failed = run(work, MODEL, configfile=configfile)
    assert failed.returncode != 0
    log = (work / "logs" / "femur" / "train_base.log").read_text()
    assert "results/femur/augmentation/images.npy: corrupted (sha256" in log, log
    assert "recorded in results/femur/augmentation/provenance.json" in log and "next run rebuilds it" in log
    assert "logs/femur/train_base.log" in failed.stderr  # Snakemake points at the log
    assert not store.exists()
    models = work / "results" / "femur" / "models" / "base"
    assert not (models.exists() and any(models.iterdir()))  # training never started: nothing at all

    rebuilt = run(work, MODEL, configfile=configfile)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "localrule augment:" in rebuilt.stdout + rebuilt.stderr
    assert store.read_bytes() == original  # the same store, made again
    assert sorted(p.name for p in models.iterdir()) == sorted(MODEL_OUTPUTS + ("checkpoint.pt", "checkpoint.pt.sha256"))


def test_a_job_failing_on_bad_input_leaves_no_partial_outputs_and_a_log_that_says_why(prepared, tmp_path):
    work, configfile = copy_of(prepared[0], tmp_path / "work"), prepared[1]
    # preprocessing output that lost a subject: the augmentation must refuse it
    train_npz = work / "results" / "femur" / "preprocess" / "train.npz"
    with np.load(train_npz) as data:
        arrays = dict(data)
    n = len(arrays["ids"])
    dropped = str(arrays["ids"][-1])
    arrays = {key: value[:-1] if value.shape[:1] == (n,) else value for key, value in arrays.items()}
    np.savez(train_npz, **arrays)

    failed = run(work, "results/femur/augmentation/samples.npz", configfile=configfile)
    assert failed.returncode != 0
    log = (work / "logs" / "femur" / "augment.log").read_text()
    assert "results/femur/preprocess/train.npz: training ids do not match" in log, log
    assert dropped in log
    augmentation = work / "results" / "femur" / "augmentation"
    assert not [name for name in STORE if (augmentation / name).exists()]
    assert not list(augmentation.glob(".*"))  # no staging folder or temporary file either


# -- the library under the rules


def test_verify_removes_a_corrupted_artifact_with_the_cache_entry_it_links_to(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    out.mkdir()
    cache.mkdir()
    (out / "table.csv").write_text("a,b\n1,2\n")
    (cache / "abc_model.pt").write_bytes(b"weights" * 100)
    (out / "model.pt").symlink_to(cache / "abc_model.pt")  # as Snakemake's --cache leaves an output
    (out / "particles").mkdir()
    (out / "particles" / "s1.particles").write_text("0 0 0\n")
    write_sidecar(out / "provenance.json", "demo", [], [out / "table.csv", out / "model.pt", out / "particles",
                                                        out / "provenance.json"], settings={"k": 1})
    verify([out / "table.csv", out / "model.pt", out / "particles"])

    flip_a_byte(cache / "abc_model.pt")
    (out / "particles" / "s1.particles").write_text("0 0 1\n")
    with pytest.raises(ValueError) as error:
        verify([out / "table.csv", out / "model.pt", out / "particles"])
    message = str(error.value)
    assert f"{out / 'model.pt'}: corrupted" in message and f"cache entry {cache / 'abc_model.pt'}" in message
    assert f"{out / 'particles'}: corrupted" in message and "table.csv" not in message
    assert not (out / "model.pt").is_symlink() and not (cache / "abc_model.pt").exists()
    assert not (out / "particles").exists() and (out / "table.csv").is_file()

    (out / "provenance.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not a readable provenance sidecar"):
        verify([out / "table.csv"])
    assert not (out / "provenance.json").exists()  # so that its rule reruns
    with pytest.raises(ValueError, match="no provenance sidecar"):
        verify([out / "table.csv"])


def test_write_sidecar_refuses_an_output_outside_its_folder_or_missing(tmp_path):
    (tmp_path / "elsewhere.txt").write_text("x")
    with pytest.raises(ValueError, match="outside the sidecar's folder"):
        write_sidecar(tmp_path / "out" / "provenance.json", "demo", [], [tmp_path / "elsewhere.txt"])
    with pytest.raises(ValueError, match="did not write this output"):
        write_sidecar(tmp_path / "provenance.json", "demo", [], [tmp_path / "never.txt"])
    assert not (tmp_path / "provenance.json").exists() and not (tmp_path / "out" / "provenance.json").exists()


def test_a_checkpoint_killed_between_its_checksum_and_its_rename_still_verifies(tmp_path):
    checkpoint, staged = tmp_path / "checkpoint.pt", tmp_path / "staged.pt"
    assert "no checksum recorded" in checksum_problem(checkpoint.with_name("absent.pt"))
    for epoch in (1, 2):
        staged.write_bytes(f"epoch {epoch}".encode())
        record_checksum(checkpoint, staged)
        os.replace(staged, checkpoint)
        assert checksum_problem(checkpoint) is None
    staged.write_bytes(b"epoch 3")
    record_checksum(checkpoint, staged)  # ... and killed here: epoch 2's checkpoint is still good
    assert checksum_problem(checkpoint) is None
    flip_a_byte(checkpoint)
    assert "(corrupted)" in checksum_problem(checkpoint)
