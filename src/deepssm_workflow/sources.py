"""The scans a cohort source lists, read when Snakemake builds its DAG (workflow/rules/common.smk),
so that the preprocessing rules declare them as inputs: a changed training scan reruns the
training preprocessing and what follows, a changed test scan the test preprocessing and what
follows, and nothing else (the ingestion rule depends on the table, not on the scans).
"""

from __future__ import annotations

import os
from pathlib import Path

from .io import resolve


def scan_files(source: dict, split: str, base_dir=".") -> list[str]:
    """Absolute paths of the images of one split (train or test) as the source's table lists
    them, in table order, those that exist only. A table that cannot be read, or a listed scan
    that does not exist, gives no path here: ingestion then refuses the cohort with a message
    naming the subject and file, which a missing-input error of Snakemake would not."""
    from .ingest import CohortError, _read_manifest, _read_shapeworks, _table_path
    from .studies.registry import NO_STUDY

    try:
        kind, table_path = _table_path(source, Path(base_dir))
        # the group-column choice of a project does not matter here: read it as if with no study
        table = _read_shapeworks(table_path, NO_STUDY)[0] if kind == "shapeworks" else _read_manifest(table_path)
    except (CohortError, OSError, ValueError):
        return []
    if "image" not in table or "split" not in table:
        return []
    files = []
    for image, row_split in zip(table["image"].astype(str).str.strip(), table["split"].astype(str)):
        if row_split.strip().lower() == split and image:
            path = os.path.abspath(resolve(table_path, image))
            if os.path.isfile(path):
                files.append(path)
    return files
