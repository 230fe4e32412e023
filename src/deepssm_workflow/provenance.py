"""Provenance of the workflow's artifacts, and detection of corrupted ones.

Each expensive step (augment, train, predict) writes a sidecar `provenance.json` into
its output folder, next to the files it made: the step's settings and command line, the
sha256 of every input and output, the code version (hash of this package's sources and
the git commit when installed from a checkout), the installed package versions, the
date and the host. The sidecar is a declared output of its rule, so it travels with
Snakemake's between-workflow cache.

The recorded output hashes are how corruption is caught: a consumer calls `verify` on
the artifacts it is about to read. A file whose bytes no longer match is removed (and,
when it is a link into Snakemake's output cache, the cache entry it links to), so that
the next run rebuilds it instead of fetching the same bad bytes again, and the step
fails with an error naming the file.

A training checkpoint changes every epoch; it carries a sha256sum-style checksum file
instead (`record_checksum`, `checksum_problem`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from .atomic import replaced

SIDECAR = "provenance.json"
FORMAT = 1
PACKAGE = "deepssm-workflow"
PACKAGE_DIR = Path(__file__).resolve().parent
# Dependencies that run the workflow but never touch an artifact's bytes: upgrading them
# must not invalidate cached models.
ENGINE_PACKAGES = ("snakemake",)


# -- hashes


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def sha256_of(path) -> str:
    """sha256 of a file's bytes; of a folder, over its files' relative paths and hashes (sorted). Hidden
    files are left out: Snakemake marks a finished folder output with a `.snakemake_timestamp` file."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))):
            digest.update(f"{item.relative_to(path).as_posix()}\0{sha256_of(item)}\n".encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def combined_sha256(paths) -> str:
    """One sha256 for several files, in order (e.g. the training data's identity)."""
    return hashlib.sha256("".join(sha256_of(path) for path in paths).encode()).hexdigest()


def source_sha256(package_dir=PACKAGE_DIR) -> str:
    """sha256 over this package's source files (relative path and bytes; caches and hidden files left out)."""
    package_dir = Path(package_dir)
    digest = hashlib.sha256()
    for item in sorted(package_dir.rglob("*")):
        relative = item.relative_to(package_dir)
        if not item.is_file() or "__pycache__" in relative.parts or item.suffix == ".pyc" or _hidden(relative):
            continue
        digest.update(relative.as_posix().encode() + b"\0" + item.read_bytes() + b"\0")
    return digest.hexdigest()


def git_version(package_dir=PACKAGE_DIR) -> dict | None:
    """{"commit", "uncommitted_changes"} of the git checkout the package is installed from (an editable
    install), else None: a copy installed into a virtual environment inside some checkout is not
    tracked there, and that checkout's commit would say nothing about it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=30)

    try:
        tracked, commit = git("ls-files", "--", "__init__.py"), git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not tracked.stdout.strip() or commit.returncode != 0 or status.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "uncommitted_changes": bool(status.stdout.strip())}


def package_versions() -> dict[str, str]:
    """Python, this package and every dependency it declares (extras left out), as installed."""
    versions = {"python": platform.python_version()}
    try:
        versions[PACKAGE] = metadata.version(PACKAGE)
        requirements = metadata.requires(PACKAGE) or []
    except metadata.PackageNotFoundError:
        versions[PACKAGE], requirements = "not installed", []
    for requirement in requirements:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def software_id(package_dir=PACKAGE_DIR) -> str:
    """One hash of what computes an artifact: this package's sources and the installed versions of
    Python and of the dependencies (the workflow engine left out)."""
    return _software_id(source_sha256(package_dir), package_versions())


def _software_id(source: str, versions: dict[str, str]) -> str:
    computing = {name: version for name, version in versions.items() if name not in ENGINE_PACKAGES}
    return hashlib.sha256(json.dumps({"source_sha256": source, "packages": computing}, sort_keys=True).encode()
                          ).hexdigest()


# -- sidecars


def _visible_gpu() -> str | None:
    """The CUDA device the step could use (the model card says which device training did use). Asked
    only when the step imported torch: importing it just for this costs seconds."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return None


def _cpu_kernels() -> str | None:
    """The instruction set torch's CPU kernels use here (AVX2, AVX512, ...): trained weights differ
    between CPUs that differ in it. Asked only when the step imported torch, like `_visible_gpu`."""
    torch = sys.modules.get("torch")
    return torch.backends.cpu.get_cpu_capability() if torch is not None else None


def write_sidecar(sidecar, step: str, inputs, outputs, settings=None, command: str | None = None) -> dict:
    """Write the provenance sidecar of a finished step; every output must lie in the sidecar's folder
    (outputs are recorded by their path relative to it, so the record survives moving the folder or
    Snakemake's cache renaming the files). The sidecar itself may be among `outputs`."""
    sidecar = Path(sidecar)
    folder = sidecar.parent.resolve()
    recorded = {}
    for output in map(Path, outputs):
        if output.resolve() == sidecar.resolve():
            continue
        if output.parent.resolve() != folder:
            raise ValueError(f"{output}: an output outside the sidecar's folder {sidecar.parent}")
        if not output.exists():
            raise ValueError(f"{output}: the step did not write this output")
        recorded[output.name] = sha256_of(output)
    source, versions = source_sha256(), package_versions()
    record = {
        "format": FORMAT,
        "step": step,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "command": command,
        "inputs": {str(path): sha256_of(path) for path in inputs},
        "outputs": recorded,
        "code": {"source_sha256": source, "git": git_version(), "software_id": _software_id(source, versions)},
        "packages": versions,
        "host": {"name": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
                 "cpu_kernels": _cpu_kernels(), "cuda_device": _visible_gpu()},
    }
    with replaced(sidecar) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_sidecar(sidecar) -> dict:
    """A sidecar's record; an unreadable one is an error naming it."""
    sidecar = Path(sidecar)
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{sidecar}: not a readable provenance sidecar ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
        raise ValueError(f"{sidecar}: not a provenance sidecar (no outputs recorded)")
    return record


def _discard(path: Path) -> str:
    """Remove a corrupted artifact, and the cache entry it links to; say what was removed."""
    if path.is_symlink():
        target = path.resolve()
        _remove(target)
        path.unlink()
        return f"removed it and the cache entry {target} it links to, so that the next run rebuilds it"
    _remove(path)
    return "removed it, so that the next run rebuilds it"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def verify(paths) -> None:
    """Check artifacts against the sha256 recorded in the provenance.json beside each.

    A corrupted artifact (or an unreadable sidecar) is removed together with the cache entry it
    links to, and the call fails naming every corrupted file: the producing rule then finds its
    output missing and reruns on the next `snakemake` call. An artifact that has no sidecar, or
    that its sidecar does not list, is an error too (the workflow always writes one)."""
    problems = []
    for path in map(Path, paths):
        sidecar = path.parent / SIDECAR
        if not sidecar.exists():
            raise ValueError(f"{path}: no provenance sidecar {sidecar} to verify it against")
        try:
            expected = read_sidecar(sidecar)["outputs"].get(path.name)
        except ValueError as error:
            problems.append(f"{error}; {_discard(sidecar)}")
            continue
        if expected is None:
            raise ValueError(f"{path}: not among the outputs recorded in {sidecar}")
        if not path.exists():
            raise ValueError(f"{path}: missing (recorded in {sidecar})")
        actual = sha256_of(path)
        if actual != expected:
            problems.append(f"{path}: corrupted (sha256 {actual} differs from {expected} recorded in {sidecar}); "
                            f"{_discard(path)}")
    if problems:
        raise ValueError("\n".join(problems))


def sidecar_rows(dataset_dir, folders) -> list[dict]:
    """For the report: per artifact folder, what its sidecar says (step, date, host, code) and whether
    the outputs still have the recorded bytes; a folder without a sidecar gets a row saying so."""
    rows = []
    for folder in folders:
        sidecar = Path(dataset_dir) / folder / SIDECAR
        if not sidecar.exists():
            rows.append({"artifact": folder, "step": "—", "created": "—", "host": "—", "git commit": "—",
                         "source sha256": "—", "outputs match": f"no {SIDECAR} (not made by the workflow)"})
            continue
        record = read_sidecar(sidecar)
        changed = [name for name, digest in record["outputs"].items()
                   if not (sidecar.parent / name).exists() or sha256_of(sidecar.parent / name) != digest]
        code, host = record.get("code", {}), record.get("host", {})
        git = code.get("git") or {"commit": "not a git checkout"}
        rows.append({"artifact": folder, "step": record.get("step", "?"), "created": record.get("created", "?"),
                     "host": f"{host.get('name', '?')} ({host.get('cuda_device') or 'no GPU'})",
                     "git commit": git["commit"][:12] + (" + uncommitted changes" if git.get("uncommitted_changes")
                                                         else ""),
                     "source sha256": code.get("source_sha256", "?")[:12],
                     "outputs match": "yes" if not changed else "NO: " + ", ".join(changed)})
    return rows


# -- checksums of files rewritten in place (the training checkpoint)


def _checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _listed(path: Path) -> list[str]:
    checksums = _checksum_file(path)
    if not checksums.is_file():
        return []
    return [line.split()[0] for line in checksums.read_text().splitlines() if line.strip()]


def record_checksum(path, new_content) -> None:
    """Call with `new_content` (a staged file) before it replaces `path`. `path.sha256` then lists the
    new content's sha256 and the previous one, so that a kill between the two atomic renames leaves a
    file that still verifies."""
    path = Path(path)
    hashes = [sha256_of(new_content)] + _listed(path)[:1]
    with replaced(_checksum_file(path)) as tmp:
        tmp.write_text("".join(f"{digest}  {path.name}\n" for digest in hashes))


def checksum_problem(path) -> str | None:
    """None when `path` matches a sha256 listed in `path.sha256`, else what is wrong."""
    path = Path(path)
    listed = _listed(path)
    if not listed:
        return f"no checksum recorded in {_checksum_file(path)}"
    actual = sha256_of(path)
    if actual not in listed:
        return f"sha256 {actual} matches none recorded in {_checksum_file(path)} (corrupted)"
    return None
