"""The MASSM paper's DeepSSM baselines of a multi-anatomy dataset (its config block's `baselines`): each
anatomy exported (`ingest_multi.export_anatomy`) as a single-anatomy dataset named `{dataset}_{anatomy}`,
which the single-anatomy workflow ingests, preprocesses, trains with the listed methods and evaluates like any
user cohort; the multi-anatomy report then pairs its per-scan errors with the multi-anatomy method's.

* `base` on the registered crop is the paper's DeepSSM_w, its upper bound for world particles;
* `base_uncropped` on the whole scan, with no registration, is its DeepSSMF_w.

The anatomies must be known when Snakemake builds its DAG: a synthetic cohort's are its `parts` (the hip's by
default), a CSV manifest's or a ShapeWorks project's are read from it (its `anatomy` column, or its
per-anatomy columns).
"""

from __future__ import annotations

from pathlib import Path

from .layout import DatasetLayout

BASELINE_LABELS = {
    "base": "DeepSSM on the registered crop (the paper's DeepSSM_w, its upper bound for world particles)",
    "base_uncropped": "DeepSSM on the whole scan, no registration (the paper's DeepSSMF_w)",
}
# the baselines' methods when the block names none; the schema's default says the same (tested), but this
# module reads the config before the schema fills its defaults in
DEFAULT_METHODS = {name: {} for name in BASELINE_LABELS}
# what a baseline dataset takes from the `baselines` block; the rest comes from the multi-anatomy dataset
BASELINE_KEYS = ("preprocess", "augmentation", "shape_space")


def baseline_name(dataset: str, anatomy: str) -> str:
    return f"{dataset}_{anatomy}"


def anatomies_of(entry: dict, base_dir=".") -> list[str]:
    """The anatomies of a multi-anatomy dataset, from its config block alone (no generated file): a synthetic
    cohort's parts, a manifest's or project's anatomies. An unreadable table gives none: its ingestion names why."""
    if entry.get("source") == "synthetic":
        from .synthetic.multi_anatomy import HIP_PARTS

        return list((entry.get("synthetic") or {}).get("parts") or HIP_PARTS)
    from .ingest import CohortError, _read_manifest
    from .ingest_multi import _long_form, _project_rows

    if entry.get("source") == "shapeworks":
        path = Path(base_dir) / str(entry.get("project", ""))
        read = _project_rows
    else:
        path = Path(base_dir) / str(entry.get("manifest", ""))
        read = _read_manifest
    try:
        return list(dict.fromkeys(_long_form(read(path), path)["anatomy"]))
    except (CohortError, OSError, ValueError):
        return []


def baseline_datasets(config: dict, results: str = "results") -> dict[str, dict]:
    """The single-anatomy dataset blocks of every multi-anatomy dataset's baselines, by name; a name already
    in `datasets` is an error. The multi-anatomy block is checked by config.check afterwards: this only reads
    what is well-formed enough to read."""
    from .config import ConfigError

    taken, derived = set(config.get("datasets") or {}), {}
    for dataset, entry in (config.get("multi_anatomy") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("baselines"), dict):
            continue
        block = entry["baselines"]
        for anatomy in anatomies_of(entry):
            name = baseline_name(dataset, anatomy)
            if name in taken:
                raise ConfigError(f"multi_anatomy.{dataset}.baselines: the baselines of anatomy {anatomy} are the "
                                  f"dataset {name}, which `datasets` already has: rename it")
            derived[name] = {
                "anatomy": anatomy, "study": "none", "source": "csv",
                "manifest": str(DatasetLayout(Path(results) / dataset).anatomy_export("subjects.csv", anatomy)),
                "methods": block.get("methods", DEFAULT_METHODS),
                **{key: block[key] for key in BASELINE_KEYS if key in block},
                **{key: entry[key] for key in ("training", "scan_grid") if key in entry},
            }
    return derived
