"""Shared fixtures: the repository, tiny synthetic cohorts, and running the real workflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deepssm_workflow.synthetic.cohort import SyntheticSettings, generate_cohort

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
TINY = REPO / "config" / "tiny.yaml"


def tiny_settings(anatomy: str, **overrides) -> SyntheticSettings:
    block = dict(yaml.safe_load(TINY.read_text())["datasets"][anatomy]["synthetic"])
    block.update(overrides)
    return SyntheticSettings.from_config(block)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """Generate (once per session) the tiny cohort of an anatomy; returns its folder."""
    made: dict[str, Path] = {}

    def make(anatomy: str) -> Path:
        if anatomy not in made:
            out = tmp_path_factory.mktemp(f"cohort_{anatomy}")
            generate_cohort(anatomy, tiny_settings(anatomy), out, workers=2)
            made[anatomy] = out
        return made[anatomy]

    return make


def run_snakemake(workdir: Path, *args: str, configfile: Path = TINY) -> subprocess.CompletedProcess:
    """Run the real workflow in `workdir` (outputs land there, not in the checkout)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # --configfile (like --resources) takes several values, so it goes last, after the targets
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               *args, "--configfile", str(configfile)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)


def run_config(tmp_path: Path, config: dict, *targets: str) -> tuple[Path, subprocess.CompletedProcess]:
    """Run `targets` (default: all) of the real workflow on 2 cores and a GPU slot, in tmp_path/work, with
    `config` written to tmp_path/config.yaml; the work folder and the run."""
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    return work, run_snakemake(work, *(targets or ("all",)), "--cores", "2", "--resources", "gpu=1",
                               configfile=configfile)


REPORT_DATASETS = ("femur", "metopic", "left_atrium")


@pytest.fixture(scope="session")
def tiny_reports(tmp_path_factory):
    """One real run of the tiny preset's `all` (the whole DAG up to every dataset's report.html:
    cohorts, training of every variant, evaluation, studies); returns the work folder and the run.
    Shared by the workflow and report tests so CI trains the tiny models once."""
    workdir = tmp_path_factory.mktemp("tiny_reports")
    return workdir, run_snakemake(workdir, "all", "--cores", "2", "--resources", "gpu=1")


@pytest.fixture(scope="session")
def chromium() -> str:
    """A headless Chromium executable; the Debian package is installed when missing and this
    runs as root with apt-get. Elsewhere the test is skipped, except in CI, where that fails."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=1200).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)  # stale package lists
            subprocess.run(install, capture_output=True, timeout=1200)
        found = shutil.which("chromium")
    if not found:
        reason = "headless Chromium is not installed and cannot be installed here (needs root and apt-get)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found
