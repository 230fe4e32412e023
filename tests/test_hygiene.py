"""Workflow hygiene: ruff (pyflakes, pycodestyle, import order) clean on the package and the tests,
snakefmt formatting, a clean `snakemake --lint`, and the rules' conda env matching pyproject's pins
and installing this checkout."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO, TINY, run_snakemake

SNAKEFILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
ENVS = REPO / "envs"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _snakefmt(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakefmt", "--config", str(REPO / "pyproject.toml"), *args]
    return subprocess.run(command, capture_output=True, text=True)


def _ruff(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ruff", "check", "--config", str(REPO / "pyproject.toml"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO)


def test_ruff_is_clean_on_the_package_and_the_tests():
    result = _ruff("src", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_flags_an_unused_import_and_unsorted_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nprint(os.sep)\n")
    output = _ruff("--no-cache", str(bad)).stdout
    assert "F401" in output and "I001" in output


def test_snakefiles_are_formatted_with_snakefmt():
    result = _snakefmt("--check", *map(str, SNAKEFILES))
    assert result.returncode == 0, _snakefmt("--diff", *map(str, SNAKEFILES)).stdout
    assert f"All {len(SNAKEFILES)} file(s) would be left unchanged" in result.stderr


def test_snakefmt_check_flags_an_unformatted_rule(tmp_path):
    unformatted = tmp_path / "bad.smk"
    unformatted.write_text('rule a:\n    output: "a.txt"\n    shell: "touch {output}"\n')
    assert _snakefmt("--check", str(unformatted)).returncode == 1


def test_snakemake_lint_is_clean(tmp_path):
    result = run_snakemake(tmp_path, "--lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def _rules() -> dict[str, tuple[Path, str]]:
    """Each rule's block of text, from the snakefmt-formatted Snakefiles (the test above)."""
    blocks = {}
    for snakefile in SNAKEFILES:
        parts = re.split(r"^(?:rule|checkpoint) (\w+):\n", snakefile.read_text(), flags=re.M)
        for name, body in zip(parts[1::2], parts[2::2]):
            blocks[name] = (snakefile, re.split(r"^\S", body, maxsplit=1, flags=re.M)[0])
    return blocks


def test_every_rule_that_runs_a_command_uses_an_env_from_envs():
    used = set()
    for name, (snakefile, body) in _rules().items():
        if not re.search(r"^    (shell|script|notebook|wrapper):", body, re.M):
            continue
        conda = re.search(r'^    conda:\n        "([^"]+)"', body, re.M)
        assert conda, f"rule {name} in {snakefile} runs a command without a conda env"
        env = (snakefile.parent / conda.group(1)).resolve()
        assert env.parent == ENVS and env.is_file(), f"rule {name} in {snakefile}: {env} is not a file in {ENVS}"
        used.add(env)
    assert used == set(ENVS.glob("*.yaml")), "every env file is used by a rule"


def _env_pip(env: dict) -> list[str]:
    return next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))


def test_conda_env_has_the_pins_of_pyproject():
    env = yaml.safe_load((ENVS / "deepssm.yaml").read_text())
    python = next(spec for spec in env["dependencies"] if isinstance(spec, str) and spec.startswith("python="))
    assert python.removeprefix("python=") in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert "pip" in env["dependencies"]

    pinned = {req.name: req for req in map(Requirement, PYPROJECT["project"]["dependencies"])
              if any(spec.operator == "==" for spec in req.specifier)}
    assert "torch" in pinned
    env_requirements = [Requirement(line) for line in _env_pip(env) if not line.startswith("-e ")]
    # exactly pyproject's exact pins, nothing pinned differently or in addition
    assert {req.name: str(req.specifier) for req in env_requirements} == \
        {name: str(req.specifier) for name, req in pinned.items()}
    assert [line for line in _env_pip(env) if line.startswith("-e ")] == ["-e ${DEEPSSM_WORKFLOW_ROOT}"]


def test_conda_env_installs_this_checkout_from_the_copy_snakemake_builds_it_from(tmp_path):
    # The workflow exports the variable the env file's editable install names ...
    wrapper = tmp_path / "Snakefile"
    wrapper.write_text(f'include: "{REPO / "Snakefile"}"\n\n\nrule root:\n    output:\n        "root.txt",\n'
                       '    shell:\n        "printf %s $DEEPSSM_WORKFLOW_ROOT > {output}"\n')
    command = [sys.executable, "-m", "snakemake", "-s", str(wrapper), "--directory", str(tmp_path), "--cores", "1",
               "root.txt", "--configfile", str(TINY)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    root = (tmp_path / "root.txt").read_text()
    assert Path(root) == REPO

    # ... and pip, run on the pip section the way conda runs it (a requirements file beside
    # Snakemake's copy of the env file, in .snakemake/conda), installs this checkout from it.
    conda_dir = tmp_path / ".snakemake" / "conda"
    conda_dir.mkdir(parents=True, exist_ok=True)
    requirements = conda_dir / "condaenv.requirements.txt"
    requirements.write_text("\n".join(_env_pip(yaml.safe_load((ENVS / "deepssm.yaml").read_text()))) + "\n")
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", "--report", "-",
           "-r", requirements.name]
    if importlib.util.find_spec("setuptools"):  # the build backend at hand: pip need not fetch one
        pip.insert(4, "--no-build-isolation")
    result = subprocess.run(pip, cwd=conda_dir, capture_output=True, text=True,
                            env={**os.environ, "DEEPSSM_WORKFLOW_ROOT": root})
    assert result.returncode == 0, result.stderr
    installs = {item["metadata"]["name"]: item["download_info"] for item in json.loads(result.stdout)["install"]}
    assert installs["deepssm-workflow"] == {"url": REPO.as_uri(), "dir_info": {"editable": True}}
