"""Snakemake's between-workflow cache of augment and train: a second checkout reuses the models, a
changed training parameter reruns training and what follows it only, and a corrupted cache entry is
detected, removed and rebuilt. Real Snakemake runs of two checkouts on a cut-down tiny preset."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY
from deepssm_workflow.provenance import (
    PACKAGE_DIR,
    read_sidecar,
    sha256_of,
    sidecar_rows,
    software_id,
    source_sha256,
    verify,
)

pytestmark = pytest.mark.slow  # real Snakemake runs of the workflow (deselect with -m 'not slow')

TARGET = "results/femur/predictions/base/predictions.csv"
MODEL_FILES = ("model.pt", "model_card.json", "log.csv", "loss_curve.png", "provenance.json")


def small_config(path: Path, **base) -> Path:
    """The tiny preset's femur alone, with one method (base, its settings updated by `base`),
    6 mm images, 4 generated samples and a minute network: every rule takes seconds."""
    config = yaml.safe_load(TINY.read_text())
    femur = config["datasets"]["femur"]
    femur["methods"] = {"base": {**femur["methods"]["base"],
                                 "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8]}, **base}}
    femur["preprocess"]["downsample"] = 2
    femur["augmentation"].update(n_samples=4, n_control=32)
    config["datasets"] = {"femur": femur}
    path.write_text(yaml.safe_dump(config))
    return path


def snakemake_command(workdir: Path, *args: str, configfile: Path | None, snakefile: Path = REPO / "Snakefile"
                      ) -> list[str]:
    # --configfile takes several values, so it goes last, after the targets
    extra = ["--configfile", str(configfile)] if configfile else []
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(workdir), *args, *extra]


def with_source(workdir: Path) -> Path:
    """Copy the package's sources, as they are now, into workdir/src, whence the runs in workdir import
    them: the cache key hashes the sources, and the library being edited while the tests run must
    not change it under them."""
    shutil.copytree(PACKAGE_DIR, workdir / "src" / PACKAGE_DIR.name, ignore=shutil.ignore_patterns("__pycache__"))
    return workdir


def workflow_env(workdir: Path, cache: Path | None = None) -> dict[str, str]:
    """The environment of a run in `workdir`: its own copy of the sources, CPU only (these tests
    compare retrained weights bit for bit, which CUDA kernels do not promise), the cache if given."""
    assert (workdir / "src" / PACKAGE_DIR.name).is_dir(), f"{workdir} has no copy of the sources"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(workdir / "src"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SNAKEMAKE_OUTPUT_CACHE", None)
    if cache is not None:
        env["SNAKEMAKE_OUTPUT_CACHE"] = str(cache)
    return env


def run_workflow(workdir: Path, *args: str, configfile: Path | None, snakefile: Path = REPO / "Snakefile",
                 cache: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir, *args, configfile=configfile, snakefile=snakefile),
                          capture_output=True, text=True, env=workflow_env(workdir, cache), timeout=1200)


def planned_rules(dry_run: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", dry_run.stdout + dry_run.stderr, flags=re.M))


def checkout(root: Path) -> Path:
    """A copy of this checkout (workflow and package sources) whose config/config.yaml is the small preset."""
    with_source(root)
    shutil.copy2(REPO / "Snakefile", root / "Snakefile")
    for name in ("workflow", "config", "envs"):
        shutil.copytree(REPO / name, root / name)
    small_config(root / "config" / "config.yaml")
    return root


def run_checkout(root: Path, *args: str, cache: Path) -> subprocess.CompletedProcess:
    """Build the target in the checkout, as its user would: `snakemake TARGET --cores 2 --cache`."""
    return run_workflow(root, TARGET, "--cores", "2", *args, "--cache", configfile=None,
                        snakefile=root / "Snakefile", cache=cache)


def model_dir(root: Path) -> Path:
    return root / "results" / "femur" / "models" / "base"


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def two_checkouts(tmp_path_factory):
    """Checkout `a` builds the predictions with an empty cache, then checkout `b` with the same cache."""
    tmp = tmp_path_factory.mktemp("cache")
    cache = tmp / "cache"
    cache.mkdir()
    a, b = checkout(tmp / "a"), checkout(tmp / "b")
    run_a = run_checkout(a, cache=cache)
    assert run_a.returncode == 0, run_a.stderr[-3000:]
    run_b = run_checkout(b, cache=cache)
    assert run_b.returncode == 0, run_b.stderr[-3000:]
    return {"cache": cache, "a": a, "b": b, "run_a": run_a, "run_b": run_b}


def test_a_second_checkout_reuses_the_cached_models_instead_of_training(two_checkouts):
    a, b, cache = two_checkouts["a"], two_checkouts["b"], two_checkouts["cache"]
    out_a = two_checkouts["run_a"].stdout + two_checkouts["run_a"].stderr
    out_b = two_checkouts["run_b"].stdout + two_checkouts["run_b"].stderr

    # a trained: its log has the epochs, its checkpoint is there, the outputs moved into the cache
    assert "best epoch" in (a / "logs" / "femur" / "train_base.log").read_text()
    assert (model_dir(a) / "checkpoint.pt").is_file()
    assert "Moving output file results/femur/models/base/model.pt to cache." in out_a
    for name in MODEL_FILES:
        assert (model_dir(a) / name).is_symlink() and (model_dir(a) / name).resolve().parent == cache.resolve()

    # b did not: no training in its log, no checkpoint, the very same cache files
    assert "Symlinking output file results/femur/models/base/model.pt from cache." in out_b
    assert "results/femur/models/base/model.pt to cache" not in out_b
    assert (b / "logs" / "femur" / "train_base.log").read_text() == ""
    assert not (model_dir(b) / "checkpoint.pt").exists()
    for name in MODEL_FILES:
        assert (model_dir(b) / name).resolve() == (model_dir(a) / name).resolve()
    # the augmentation store too
    assert (b / "logs" / "femur" / "augment.log").read_text() == ""
    store = "results/femur/augmentation/images.npy"
    assert (b / store).is_symlink() and (b / store).resolve() == (a / store).resolve()

    # b's predictions, made from the reused model, are a's
    particles = sorted((a / "results/femur/predictions/base/particles").iterdir())
    assert particles
    for path in particles:
        assert (b / "results/femur/predictions/base/particles" / path.name).read_bytes() == path.read_bytes()


def test_the_cached_model_carries_its_provenance(two_checkouts):
    b = two_checkouts["b"]
    sidecar = read_sidecar(model_dir(b) / "provenance.json")
    assert sidecar["step"] == "train"
    configured = yaml.safe_load((b / "config" / "config.yaml").read_text())["datasets"]["femur"]
    # the method's block with the schema's defaults filled in, the shape space and the engine's settings
    assert configured["methods"]["base"].items() <= sidecar["settings"]["method"].items()
    assert sidecar["settings"]["shape_space"] == configured["shape_space"]
    assert configured["training"].items() <= sidecar["settings"]["training"].items()
    assert set(sidecar["outputs"]) == set(MODEL_FILES) - {"provenance.json"}
    # inputs as they are in b (made in a: the same bytes), code as installed
    store = b / "results/femur/augmentation/images.npy"
    assert sidecar["inputs"]["results/femur/augmentation/images.npy"] == sha256_of(store)
    package = b / "src" / PACKAGE_DIR.name
    assert sidecar["code"]["source_sha256"] == source_sha256(package)
    assert sidecar["code"]["software_id"] == software_id(package)
    assert sidecar["packages"]["torch"] == torch.__version__
    assert sidecar["host"]["cuda_device"] is None  # hidden from the workflow by these tests
    assert sidecar["host"]["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()  # e.g. AVX2, AVX512
    assert "--method base" in sidecar["command"]
    verify([model_dir(b) / "model.pt", model_dir(b) / "model_card.json", store])
    predictions = read_sidecar(b / "results/femur/predictions/base/provenance.json")
    assert predictions["step"] == "predict" and set(predictions["outputs"]) == {"predictions.csv", "particles"}
    assert predictions["inputs"]["results/femur/models/base/model.pt"] == sha256_of(model_dir(b) / "model.pt")
    # what the report shows: every artifact as recorded, a folder the workflow did not make said so
    rows = sidecar_rows(b / "results" / "femur", ["augmentation", "models/base", "predictions/base", "models/tl"])
    assert [(r["step"], r["outputs match"]) for r in rows[:3]] == [("augment", "yes"), ("train", "yes"),
                                                                   ("predict", "yes")]
    assert rows[3]["outputs match"] == "no provenance.json (not made by the workflow)"


def test_changing_a_training_parameter_reruns_training_and_what_follows_it_only(two_checkouts):
    b, cache = two_checkouts["b"], two_checkouts["cache"]
    original = model_dir(b) / "model.pt"
    original_entry = original.resolve()
    small_config(b / "config" / "config.yaml", epochs=3)

    dry = run_workflow(b, TARGET, "-n", "--cache", configfile=None, snakefile=b / "Snakefile", cache=cache)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert planned_rules(dry) == {"train", "predict"}
    assert "Params have changed since last execution" in dry.stdout + dry.stderr

    run = run_checkout(b, cache=cache)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (b / "logs" / "femur" / "train_base.log").read_text()
    assert "epoch 3 [train]" in log and "epoch 4" not in log
    assert (b / "logs" / "femur" / "augment.log").read_text() == ""  # nothing upstream ran
    assert original.resolve() != original_entry and original_entry.is_file()  # a second version, the first kept
    assert len(list(cache.glob("*_model.pt"))) == 2

    # back to 2 epochs: the first version comes back from the cache, nothing is trained
    small_config(b / "config" / "config.yaml")
    back = run_checkout(b, cache=cache)
    assert back.returncode == 0, back.stderr[-3000:]
    assert (b / "logs" / "femur" / "train_base.log").read_text() == ""
    assert original.resolve() == original_entry


def test_a_corrupted_cache_entry_is_detected_removed_and_rebuilt(two_checkouts):
    b, cache = two_checkouts["b"], two_checkouts["cache"]
    entry = (model_dir(b) / "model.pt").resolve()
    assert entry.parent == cache.resolve()
    good = weights(entry)
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))

    # predict reads the model: it refuses it, names it, and removes it with its cache entry
    failed = run_checkout(b, "--forcerun", "predict", cache=cache)
    assert failed.returncode != 0
    log = (b / "logs" / "femur" / "predict_base.log").read_text()
    assert "results/femur/models/base/model.pt: corrupted" in log and str(entry) in log, log
    assert not entry.exists() and not (model_dir(b) / "model.pt").is_symlink()
    predictions = b / "results" / "femur" / "predictions" / "base"
    assert not [name for name in ("predictions.csv", "particles", "provenance.json") if (predictions / name).exists()]

    # the next run retrains (the cache has no entry any more), stores the model again, predicts
    rebuilt = run_checkout(b, cache=cache)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert "best epoch" in (b / "logs" / "femur" / "train_base.log").read_text()
    assert (model_dir(b) / "model.pt").resolve() == entry and entry.is_file()
    verify([model_dir(b) / "model.pt"])
    rebuilt_weights = weights(entry)
    assert rebuilt_weights.keys() == good.keys()
    for name, value in good.items():
        assert torch.equal(rebuilt_weights[name], value), name
    assert (predictions / "predictions.csv").is_file() and (predictions / "provenance.json").is_file()


def test_the_cache_key_changes_with_the_library_source_only(tmp_path):
    package = tmp_path / "deepssm_workflow"
    shutil.copytree(PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    before = software_id(package)
    assert software_id(package) == before and source_sha256(package) == source_sha256(PACKAGE_DIR)
    # byte caches and editors' hidden files are not code
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0")
    (package / ".train.py.swp").write_bytes(b"\0")
    assert software_id(package) == before
    with open(package / "train.py", "a") as handle:
        handle.write("\n# an edit\n")
    assert software_id(package) != before
