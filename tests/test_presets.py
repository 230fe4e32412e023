"""The README's preset commands, run as a user runs them: from a checkout that has
config/config.yaml. A preset given with --configfile replaces the embedded default (a merge
mixed the demo's settings into it, or failed on the schema), and the paper preset trains with
the paper's settings."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

# the README's command lines that run a preset, e.g. "snakemake --cores 2 --configfile config/tiny.yaml"
README_COMMANDS = [line.split("#")[0].strip() for line in (REPO / "README.md").read_text().splitlines()
                   if re.match(r"\s+snakemake .*--configfile config/\w+\.yaml", line)]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A copy of the checkout's workflow files, config/config.yaml included, to run from."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copy(REPO / "Snakefile", root)
    for folder in ("config", "workflow", "envs"):
        shutil.copytree(REPO / folder, root / folder)
    return root


def run(checkout: Path, command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(shlex.split(command), cwd=checkout, capture_output=True, text=True, env=env, timeout=600)


def train_settings(output: str, dataset: str, method: str) -> dict:
    """The --settings JSON of one train job in a dry run's printed shell commands (-p)."""
    for line in output.splitlines():
        if f"--augmentation-dir results/{dataset}/augmentation --method {method} " in line:
            return json.loads(shlex.split(line.split("--settings ", 1)[1])[0])
    raise AssertionError(f"no train job of {dataset}/{method} in:\n{output[-3000:]}")


def test_the_readme_names_the_preset_commands():
    assert any("config/tiny.yaml" in c for c in README_COMMANDS)
    assert any("config/paper.yaml" in c for c in README_COMMANDS)


@pytest.mark.parametrize("command", README_COMMANDS)
def test_each_readme_preset_command_plans_from_a_checkout(checkout, command):
    dry = run(checkout, command if " -n" in command else command.replace("snakemake ", "snakemake -n ", 1))
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-3000:]
    assert "This was a dry-run" in dry.stdout + dry.stderr


def test_a_preset_replaces_the_default_and_the_paper_preset_is_the_papers(checkout):
    out = {}
    for preset in ("config", "tiny", "paper"):
        dry = run(checkout, f"snakemake -n -p results/femur/report.html --cores 2 --configfile config/{preset}.yaml")
        assert dry.returncode == 0, dry.stderr[-3000:]
        out[preset] = dry.stdout
    # nothing of the default leaks into a preset: its shape space and its methods' blocks are its own
    assert train_settings(out["tiny"], "femur", "base")["shape_space"] == {"n_modes": 4}
    assert train_settings(out["tiny"], "femur", "base")["method"]["epochs"] == 2
    paper = {m: train_settings(out["paper"], "femur", m) for m in ("base", "base_focal", "tl", "tl_focal")}
    assert paper["base"]["shape_space"] == {"n_modes": 20}
    assert paper["base"]["method"]["epochs"] == 50 and paper["base"]["method"]["lr"] == 0.001
    assert paper["base_focal"]["method"]["focal_percentile"] == 90  # the demo's 25 stays in the demo
    assert paper["tl"]["method"]["ae_lr"] == 0.0001 and paper["tl"]["method"]["ae_epochs"] == 10000
    assert paper["tl_focal"]["method"]["focal_percentile"] == 90
    assert train_settings(out["config"], "femur", "base_focal")["method"]["focal_percentile"] == 25


def test_the_effective_settings_command_prints_the_papers(checkout):
    shown = run(checkout, f"{sys.executable} -m deepssm_workflow settings config/paper.yaml --dataset femur")
    assert shown.returncode == 0, shown.stderr
    femur = yaml.safe_load(shown.stdout)["femur"]
    assert femur["shape_space"] == {"n_modes": 20}
    tl_focal = femur["methods"]["tl_focal"]
    assert (tl_focal["ae_lr"], tl_focal["focal_percentile"], tl_focal["loss"], tl_focal["latent_dim"]) == \
        (0.0001, 90, "focal", 64)
    assert femur["methods"]["base"]["loss"] == "l2" and femur["methods"]["base"]["weight_decay"] == 5e-5
    hip = run(checkout, f"{sys.executable} -m deepssm_workflow settings config/paper.yaml --dataset hip")
    massm = yaml.safe_load(hip.stdout)["hip"]["methods"]["massm"]  # a multi-anatomy dataset's, at the paper's depth
    epochs = massm["detect_epochs"] + massm["local_epochs"] + massm["joint_epochs"]
    assert (massm["lr"], massm["fpn_channels"], epochs) == (0.0001, 20, 300)
    bad = run(checkout, f"{sys.executable} -m deepssm_workflow settings config/paper.yaml --dataset knee")
    assert bad.returncode != 0 and "no dataset 'knee'" in bad.stderr
