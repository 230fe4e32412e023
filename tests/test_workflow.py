"""The real Snakemake DAG: dry run on the default config, and a real run on the tiny preset."""

from __future__ import annotations

import re

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import yaml

from conftest import REPO, run_snakemake

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
          "augment")


def test_dry_run_of_the_default_config_plans_every_stage_for_every_dataset(tmp_path):
    result = run_snakemake(tmp_path, "-n", configfile=REPO / "config" / "config.yaml")
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout + result.stderr)
    assert jobs == {(stage, dataset) for stage in STAGES for dataset in DATASETS}


def test_tiny_workflow_generates_ingests_and_preprocesses_every_cohort(tmp_path):
    result = run_snakemake(tmp_path, "--cores", "2", "all")
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
    again = run_snakemake(tmp_path, "--cores", "2", "all")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_a_csv_manifest_cohort_runs_through_the_workflow(tmp_path, tiny_cohort):
    """A user's cohort under its own name: the manifest's files, no generator."""
    manifest = tiny_cohort("femur") / "subjects.csv"
    config = {"datasets": {"my_hips": {
        "anatomy": "femur", "source": "csv", "manifest": str(manifest),
        "preprocess": {"downsample": 1, "margin_mm": 5, "registration": "auto"},
        "augmentation": {"n_samples": 4}}}}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = run_snakemake(tmp_path / "work", "--cores", "2", "all", configfile=configfile)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "work" / "results" / "my_hips" / "qc" / "preprocess.png").is_file()
    assert not (tmp_path / "work" / "resources").exists()  # nothing was generated
    report = (tmp_path / "work" / "results" / "my_hips" / "cohort" / "report.json").read_text()
    assert '"kind": "csv"' in report
