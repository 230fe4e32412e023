"""Shared fixtures: the repository, tiny synthetic cohorts, and running the real workflow."""

from __future__ import annotations

import os
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
