"""The real Snakemake DAG: dry run on the default config, and a real run on the tiny preset."""

from __future__ import annotations

import re

import matplotlib.image as mpimg
import pandas as pd

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


def test_dry_run_of_the_default_config_plans_generation_and_qc_for_every_dataset(tmp_path):
    result = run_snakemake(tmp_path, "-n", configfile=REPO / "config" / "config.yaml")
    assert result.returncode == 0, result.stderr
    jobs = planned_jobs(result.stdout + result.stderr)
    for dataset in DATASETS:
        assert ("synthesize_cohort", dataset) in jobs
        assert ("cohort_qc", dataset) in jobs


def test_tiny_workflow_generates_every_cohort_and_its_qc_figure(tmp_path):
    result = run_snakemake(tmp_path, "--cores", "2", "all")
    assert result.returncode == 0, result.stderr[-3000:]
    for dataset in DATASETS:
        subjects = pd.read_csv(tmp_path / "resources" / dataset / "subjects.csv")
        assert len(subjects) >= 4
        figure = mpimg.imread(tmp_path / "results" / dataset / "qc" / "cohort.png")
        assert figure.shape[0] > 300 and figure.shape[1] > 800 and figure.std() > 0.05
        log = (tmp_path / "logs" / dataset / "synthesize_cohort.log").read_text()
        assert f"generated {len(subjects)}" in log
    # a second run finds everything up to date
    again = run_snakemake(tmp_path, "--cores", "2", "all")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
