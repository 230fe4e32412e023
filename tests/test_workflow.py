"""The real Snakemake DAG: dry run on the default config, and a real run on the tiny preset."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import yaml

from conftest import REPO, run_snakemake

pytestmark = pytest.mark.slow  # real Snakemake runs of the workflow (deselect with -m 'not slow')

DATASETS = ("femur", "metopic", "left_atrium")


def planned_jobs(dry_run_output: str) -> set[tuple[str, str]]:
    """(rule, dataset) pairs of a dry run's job listing."""
    jobs = set()
    for block in re.split(r"\n(?=rule \w+:)", dry_run_output):
        rule = re.match(r"rule (\w+):", block)
        dataset = re.search(r"wildcards: dataset=(\w+)", block)
        if rule and dataset:
            jobs.add((rule.group(1), dataset.group(1)))
    return jobs


STAGES = ("synthesize_cohort", "cohort_qc", "ingest_cohort", "preprocess_train", "preprocess_test", "preprocess_qc",
          "preprocess_validation", "augment", "train", "predict", "validate", "evaluate", "study", "report_html")
MULTI_STAGES = ("synthesize_multi_cohort", "ingest_multi_cohort", "preprocess_multi_scans", "train_multi",
                "predict_multi", "evaluate_multi", "export_anatomy", "report_multi_html")
# the multi-anatomy dataset's DeepSSM baselines: a user-like cohort per anatomy (no generator, no study), with
# base on the registered crops and base_uncropped on the uncropped scans
BASELINE_STAGES = tuple(s for s in STAGES if s not in ("synthesize_cohort", "study")) + (
    "preprocess_scans", "augment_scans", "train_on_scans", "predict_from_scans")


def test_dry_run_of_the_default_config_plans_every_stage_for_every_dataset(tmp_path):
    result = run_snakemake(tmp_path, "-n", configfile=REPO / "config" / "config.yaml")
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout + result.stderr)
    multi = {(stage, "hip") for stage in MULTI_STAGES}  # the default's multi-anatomy dataset and its baselines
    multi |= {(stage, f"hip_{anatomy}") for stage in BASELINE_STAGES for anatomy in ("femur_right", "femur_left",
                                                                                     "bladder")}
    assert jobs == {(stage, dataset) for stage in STAGES for dataset in DATASETS} | multi


def test_tiny_workflow_generates_ingests_and_preprocesses_every_cohort(tiny_reports):
    tmp_path, result = tiny_reports  # `all` of the tiny preset
    assert result.returncode == 0, result.stderr[-3000:]
    for dataset in DATASETS:
        subjects = pd.read_csv(tmp_path / "resources" / dataset / "subjects.csv")
        assert len(subjects) >= 4
        for name in ("cohort", "preprocess"):
            figure = mpimg.imread(tmp_path / "results" / dataset / "qc" / f"{name}.png")
            assert figure.shape[0] > 300 and figure.shape[1] > 600 and figure.std() > 0.05
        generated = np.load(tmp_path / "results" / dataset / "augmentation" / "images.npy", mmap_mode="r")
        assert generated.shape[0] == 12 and np.isfinite(generated).all()
        test = np.load(tmp_path / "results" / dataset / "preprocess" / "test.npz")
        assert list(test["ids"]) == list(subjects.loc[subjects["split"] == "test", "id"])
        log = (tmp_path / "logs" / dataset / "synthesize_cohort.log").read_text()
        assert f"generated {len(subjects)}" in log
    # a second run finds everything up to date
    again = run_snakemake(tmp_path, "all", "--cores", "2", "--resources", "gpu=1")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_a_csv_manifest_cohort_runs_through_the_workflow(tmp_path, tiny_cohort):
    """A user's cohort under its own name: the manifest's files, no generator."""
    manifest = tiny_cohort("femur") / "subjects.csv"
    config = {"datasets": {"my_hips": {
        "anatomy": "femur", "source": "csv", "manifest": str(manifest),
        "preprocess": {"downsample": 1, "margin_mm": 5, "registration": "auto"},
        "augmentation": {"n_samples": 4},
        "shape_space": {"n_modes": 3}, "methods": {"base": {"epochs": 1}}}}}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    # up to augmentation: training is the same code as for the synthetic cohorts, tested below
    targets = ("results/my_hips/qc/preprocess.png", "results/my_hips/augmentation/qc.png")
    result = run_snakemake(tmp_path / "work", *targets, "--cores", "2", configfile=configfile)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "work" / "results" / "my_hips" / "qc" / "preprocess.png").is_file()
    assert not (tmp_path / "work" / "resources").exists()  # nothing was generated
    report = (tmp_path / "work" / "results" / "my_hips" / "cohort" / "report.json").read_text()
    assert '"kind": "csv"' in report


METHODS = ("base", "base_focal", "tl", "tl_focal")  # the tiny preset's


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepssm_workflow", *args], capture_output=True, text=True)


def test_tiny_training_and_prediction_of_every_method_and_of_a_new_image(tiny_reports, tmp_path):
    workdir, result = tiny_reports  # the tiny `all` trained every method of every dataset
    assert result.returncode == 0, result.stderr[-3000:]
    results = workdir / "results" / "femur"
    test_ids = list(np.load(results / "preprocess" / "test.npz")["ids"])
    # the device training chose, and said why: CUDA wherever torch can use a GPU
    device, why = ("cuda", "CUDA visible:") if torch.cuda.is_available() else ("cpu", "no CUDA device visible")
    for method in METHODS:
        card = json.loads((results / "models" / method / "model_card.json").read_text())
        assert card["method"] == method and card["device"] == device and card["best_epoch"] >= 1
        log = (workdir / "logs" / "femur" / f"train_{method}.log").read_text()
        assert f"device: {device} ({why}" in log
        table = pd.read_csv(results / "predictions" / method / "predictions.csv")
        assert list(table["id"]) == test_ids and (table["seconds_per_scan"] > 0).all()
        for path in table["local_particles"]:
            assert np.loadtxt(results / "predictions" / method / path).shape == (128, 3)

    summary = run_cli("evaluate", "--dataset-dir", str(results), "--shape-space", '{"n_modes": 4}')
    assert summary.returncode == 0, summary.stderr
    for word in ("rmse_mm", "mean_shape_rmse_mm", "pca_floor_rmse_mm", *METHODS):
        assert word in summary.stdout

    # a brand-new image through the command line gives the workflow's own prediction
    subjects = pd.read_csv(results / "cohort" / "subjects.csv")
    subject = subjects[subjects["split"] == "test"].iloc[0]
    model_dir, preprocess_dir = results / "models" / "base", results / "preprocess"
    cli = run_cli("predict-image", "--model-dir", str(model_dir), "--preprocess-dir", str(preprocess_dir),
                  "--image", subject["image"], "--out-prefix", str(tmp_path / "new" / "scan"))
    assert cli.returncode == 0, cli.stderr
    mine = np.loadtxt(tmp_path / "new" / "scan_local.particles")
    workflow = np.loadtxt(results / "predictions" / "base" / "particles" / f"{subject['id']}_local.particles")
    assert np.abs(mine - workflow).max() < 1e-3

    flat = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(flat))
    garbage = tmp_path / "garbage.nrrd"
    garbage.write_bytes(b"not an image")
    for path, message in ((flat, "image is 2D; a 3D image is needed"), (garbage, "not a readable image")):
        cli = run_cli("predict-image", "--model-dir", str(model_dir), "--preprocess-dir", str(preprocess_dir),
                      "--image", str(path), "--out-prefix", str(tmp_path / "bad" / "scan"))
        assert cli.returncode == 1 and str(path) in cli.stderr and message in cli.stderr, cli.stderr
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
