"""Ingestion of multi-anatomy cohorts (MASSM): several anatomies per scan.

Source: {"source": "csv" | "synthetic", "manifest": "subjects.csv"}, in either of two forms:

    long  one row per subject and anatomy: `id`, `split`, `image`, `anatomy`, the anatomy's
          `local_particles` and/or `world_particles`, `transform`, `mesh`, `segmentation`, and
          optionally `labels` (one label map per scan) with `label` (the anatomy's value in it).
          An anatomy a subject lacks has no row.
    wide  one row per subject; per anatomy P the ShapeWorks multi-domain columns
          `local_particles_P` and/or `world_particles_P`, `transform_P`, `mesh_P`,
          `segmentation_P`, `label_P`, and optionally `present_P` (0/1). An anatomy a subject
          lacks has empty particle cells (and present_P 0). The synthetic multi-anatomy cohort's
          subjects.csv is a wide manifest.

Every (subject, anatomy) is validated as a single-anatomy cohort's subject is (ingest.py: files,
point counts per anatomy, frames, transforms), with messages that name subject, anatomy and file.
Beyond that: a subject's rows agree on everything not per anatomy (split, image, covariates);
each anatomy has enough training and test subjects; an anatomy has one label value, and a
subject's label map has the image's grid, voxels of every anatomy it has and none of one it lacks.

Writes into `out_dir`: subjects.csv (id, split, group, covariates, image, labels and per anatomy
present_P, label_P, mesh_P, segmentation_P; absolute paths), per anatomy and split
shapes_{split}_{P}.npz (the single-anatomy format, of the subjects that have P) and report.json.
Nothing is written unless all of it is valid.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .atomic import staged
from .ingest import (
    MIN_SUBJECTS,
    PER_DOMAIN,
    SAFE_ID,
    SAFE_ID_RULE,
    SPLITS,
    CohortError,
    _check_table,
    _normalize,
    _raise,
    _read_manifest,
    _read_subjects,
    _stack,
    _table_path,
    _transform_mode,
    project_domains,
    read_project,
    shapeworks_table,
)
from .io import resolve
from .scan_checks import itk_reason
from .studies.registry import NO_STUDY

PER_ANATOMY = ("local_particles", "world_particles", "transform", "mesh", "segmentation", "label")
PARTICLES = ("local_particles", "world_particles")


def ingest_multi_anatomy(source: dict, out_dir, base_dir=".") -> dict:
    """Read, validate and write a multi-anatomy cohort into `out_dir`; return the report."""
    kind, path = _table_path(source, Path(base_dir))
    rows = _long_form(_project_rows(path) if kind == "shapeworks" else _read_manifest(path), path)
    anatomies = list(dict.fromkeys(rows["anatomy"]))
    subjects = _subjects(rows, path)
    labels = _label_values(rows, anatomies, path)

    parts, problems = {}, []
    for anatomy in anatomies:
        part = rows[rows["anatomy"] == anatomy].copy()
        counts = [f"{path}: anatomy {anatomy}: {n} {split} subjects; at least {minimum} needed"
                  for split, minimum in MIN_SUBJECTS.items() if (n := int((part["split"] == split).sum())) < minimum]
        if counts:
            problems += counts
            continue
        part["subject"] = part["id"]
        part["id"] = [f"{sid}, anatomy {anatomy}" for sid in part["id"]]  # how the single-anatomy checks name it
        part = part.drop(columns=[c for c in ("label", "labels") if c in part])
        try:
            _normalize(part, path)
            read = _read_subjects(part, path)
        except CohortError as error:
            problems.append(str(error))
            continue
        parts[anatomy] = (part, {sid: read[name] for sid, name in zip(part["subject"], part["id"])})
    _raise(problems, path)
    _raise([p for sid, labels_file, image in zip(subjects["id"], subjects["labels"], subjects["image"])
            if labels_file for p in _check_label_map(sid, labels_file, image, labels, rows[rows["id"] == sid])], path)

    arrays, report_parts = {}, {}
    for anatomy, (part, read) in parts.items():
        present = part.set_index("subject")
        subjects[f"present_{anatomy}"] = [int(sid in present.index) for sid in subjects["id"]]
        subjects[f"label_{anatomy}"] = labels.get(anatomy, "")
        for column in ("mesh", "segmentation"):
            subjects[f"{column}_{anatomy}"] = [present[column].get(sid, "") for sid in subjects["id"]]
        for split in SPLITS:
            arrays[f"shapes_{split}_{anatomy}.npz"] = _stack(read, present.index[present["split"] == split])
        residuals = np.array([s["residual_mm"] for s in read.values()])
        report_parts[anatomy] = {
            "counts": {split: int((part["split"] == split).sum()) for split in SPLITS},
            "n_points": int(next(iter(read.values()))["world"].shape[0]),
            "label": labels.get(anatomy),
            "transforms": _transform_mode(part),
            "residual_mm": {"median": float(np.median(residuals)), "max": float(residuals.max())},
            "reflections": [sid for sid, s in read.items() if np.linalg.det(s["image_to_world"][:3, :3]) < 0],
        }
    report = {"source": {"kind": kind, "path": str(path)}, "kind": "multi_anatomy", "anatomies": anatomies,
              "n_subjects": len(subjects), "counts": {s: int((subjects["split"] == s).sum()) for s in SPLITS},
              "parts": report_parts,
              "files": {"subjects": "subjects.csv",
                        "shapes": {a: {s: f"shapes_{s}_{a}.npz" for s in SPLITS} for a in anatomies}}}
    with staged(out_dir, ["subjects.csv", *arrays, "report.json"]) as staging:
        subjects.to_csv(staging / "subjects.csv", index=False)
        for name, data in arrays.items():
            np.savez(staging / name, **data)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _project_rows(path: Path) -> pd.DataFrame:
    """A multi-domain ShapeWorks project (.swproj or .xlsx) in the long form: each domain's columns read as a
    one-domain project, a row for each subject whose particle cells of that domain are filled."""
    raw, notes = read_project(path)
    domains = project_domains(raw)
    if not domains:
        raise CohortError(f"{path}: no per-domain columns (local_particles_<domain>, ...): not a shape project")
    pieces = []
    for domain in domains:
        # by exact name: a domain may end as another one does (top, lap_top)
        others = [f"{p}{d}" for p in PER_DOMAIN for d in domains if d != domain and f"{p}{d}" in raw]
        table, _ = shapeworks_table(raw.drop(columns=others), path, NO_STUDY, dict(notes))
        has = table[[c for c in PARTICLES if c in table]].ne("").any(axis=1)
        pieces.append(table[has].assign(anatomy=domain))
    return pd.concat(pieces, ignore_index=True).fillna("")


def _long_form(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One row per (subject, anatomy), cells stripped, from a long or a wide manifest."""
    # text cells stripped; a project's composed transforms (`matrix`, arrays) kept as they are
    table = table.apply(lambda column: column if column.name == "matrix" else column.str.strip())
    for column in ("id", "image"):
        if column not in table:
            raise CohortError(f"{path}: no `{column}` column")
    if "anatomy" not in table:
        table = _melt(table, path)
    problems = [f"{path}: anatomy {a!r} is not a safe name ({SAFE_ID_RULE})"
                for a in dict.fromkeys(table["anatomy"]) if not SAFE_ID.fullmatch(a)]
    twice = table[table.duplicated(["id", "anatomy"])]
    problems += [f"subject {sid}: {path}: anatomy {a} has two rows" for sid, a in zip(twice["id"], twice["anatomy"])]
    _raise(problems, path)
    return table.reset_index(drop=True)


def _melt(table: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The long form of a wide manifest: a row for each anatomy a subject has (filled particle cells)."""
    anatomies = list(dict.fromkeys(c[len(k) + 1:] for c in table.columns for k in PARTICLES if c.startswith(f"{k}_")))
    if not anatomies:
        raise CohortError(f"{path}: neither an `anatomy` column (long form) nor per-anatomy "
                          f"`local_particles_<anatomy>` / `world_particles_<anatomy>` columns (wide form)")
    per_anatomy = {f"{k}_{a}" for a in anatomies for k in (*PER_ANATOMY, "present")}
    shared = [c for c in table.columns if c not in per_anatomy]
    pieces, problems = [], []
    for anatomy in anatomies:
        has = table[[f"{k}_{anatomy}" for k in PARTICLES if f"{k}_{anatomy}" in table]].ne("").any(axis=1)
        if f"present_{anatomy}" in table:
            for sid, flag, filled in zip(table["id"], table[f"present_{anatomy}"], has):
                if flag not in ("0", "1"):
                    problems.append(f"subject {sid}: {path}: present_{anatomy} is {flag!r}, neither 0 nor 1")
                elif (flag == "1") != filled:
                    problems.append(f"subject {sid}: {path}: present_{anatomy} is {flag} but its particle cells "
                                    f"are {'filled' if filled else 'empty'}")
        piece = table.loc[has, shared].copy()
        piece.insert(1, "anatomy", anatomy)
        for k in PER_ANATOMY:
            if f"{k}_{anatomy}" in table:
                piece[k] = table.loc[has, f"{k}_{anatomy}"]
        pieces.append(piece)
    _raise(problems, path)
    # subjects keep the manifest's order, each with its anatomies in column order
    return pd.concat(pieces).sort_index(kind="stable").reset_index(drop=True).fillna("")


def _subjects(rows: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One row per subject from the columns that are not per anatomy (every row of a subject must agree
    on them), checked as a single-anatomy table is (ids, split, counts); paths absolute."""
    shared = [c for c in rows.columns if c not in ("anatomy", *PER_ANATOMY)]
    _raise([f"subject {sid}: {path}: its anatomies' rows disagree on `{column}` "
            f"({', '.join(map(repr, group[column].unique()))})"
            for sid, group in rows.groupby("id", sort=False) for column in shared if group[column].nunique() > 1],
           path)
    table = rows.drop_duplicates("id")[shared].reset_index(drop=True)
    table["local_particles"] = ""  # the subject-level table carries no points; _normalize wants a column
    covariates = [c for c in _normalize(table, path) if c not in ("labels", "local_particles")]
    _check_table(table, path, "none")
    if "labels" not in table:
        table["labels"] = ""
    table["labels"] = [os.path.abspath(resolve(path, v)) if v else "" for v in table["labels"]]
    return table[["id", "split", "group", *covariates, "image", "labels"]].copy()


def _label_values(rows: pd.DataFrame, anatomies: list[str], path: Path) -> dict[str, int]:
    """Each anatomy's one value in the label maps (anatomies without a `label` are left out)."""
    if "label" not in rows:
        return {}
    values, problems = {}, []
    for anatomy in anatomies:
        given = set(rows.loc[(rows["anatomy"] == anatomy) & rows["label"].ne(""), "label"])
        numbers = {v for v in given if v.isdigit() and int(v) > 0}
        if given - numbers:
            problems.append(f"{path}: anatomy {anatomy}: label {sorted(given - numbers)[0]!r} is not a positive "
                            f"integer")
        elif len(numbers) > 1:
            problems.append(f"{path}: anatomy {anatomy}: several label values ({', '.join(sorted(numbers))}); "
                            f"an anatomy has one value in every label map")
        elif numbers:
            values[anatomy] = int(numbers.pop())
    clash = [a for a in values if list(values.values()).count(values[a]) > 1]
    if clash:
        problems.append(f"{path}: anatomies {', '.join(clash)} share the label value {values[clash[0]]}")
    _raise(problems, path)
    return values


def _check_label_map(sid: str, labels_file: str, image_file: str, labels: dict[str, int],
                     rows: pd.DataFrame) -> list[str]:
    """The label map has the image's grid, voxels of each anatomy the subject has, none of one it lacks."""
    try:
        label_map = sitk.ReadImage(labels_file)
        reader = sitk.ImageFileReader()
        reader.SetFileName(image_file)
        reader.ReadImageInformation()
    except RuntimeError as error:
        return [f"subject {sid}: {labels_file}: not a readable label map ({itk_reason(error)})"]
    grid = (label_map.GetSize(), label_map.GetOrigin(), label_map.GetSpacing(), label_map.GetDirection())
    if grid[0] != reader.GetSize() or not all(np.allclose(a, b, atol=1e-4) for a, b in
                                              zip(grid[1:], (reader.GetOrigin(), reader.GetSpacing(),
                                                             reader.GetDirection()))):
        return [f"subject {sid}: {labels_file}: the label map's grid (size, origin, spacing, direction) is not "
                f"its image's {image_file}"]
    values = set(np.unique(sitk.GetArrayViewFromImage(label_map)).tolist())
    has = set(rows["anatomy"])
    problems = [f"subject {sid}, anatomy {a}: {labels_file}: no voxel has its label {v}"
                for a, v in labels.items() if a in has and v not in values]
    problems += [f"subject {sid}, anatomy {a}: {labels_file}: voxels of its label {v}, but the subject has no "
                 f"particles for it" for a, v in labels.items() if a not in has and v in values]
    return problems


def export_anatomy(cohort_dir, anatomy: str, out_dir) -> pd.DataFrame:
    """One anatomy of an ingested multi-anatomy cohort as a single-anatomy cohort (a CSV manifest): the
    subjects that have it, their scans, its local and world particles and transform, and its segmentation
    cut from the label map. What the single-anatomy workflow needs to run the MASSM paper's baselines on
    that anatomy: DeepSSM on the registered crop (`base`), DeepSSM on the whole scan (`base_uncropped`).
    Writes out_dir/subjects.csv and out_dir/data/; all or nothing."""
    cohort_dir = Path(cohort_dir)
    report = json.loads((cohort_dir / "report.json").read_text())
    if anatomy not in report["anatomies"]:
        raise CohortError(f"{cohort_dir}: no anatomy {anatomy!r}; the cohort's: {', '.join(report['anatomies'])}")
    subjects = pd.read_csv(cohort_dir / "subjects.csv", dtype=str, keep_default_na=False).set_index("id")
    label = report["parts"][anatomy]["label"]
    rows = []
    with staged(out_dir, ["subjects.csv", "data"]) as staging:
        for sub in ("particles", "transforms", "segmentations"):
            (staging / "data" / sub).mkdir(parents=True)
        for split in SPLITS:
            shapes = np.load(cohort_dir / f"shapes_{split}_{anatomy}.npz")
            for k, subject in enumerate(str(i) for i in shapes["ids"]):
                files = {"local_particles": f"data/particles/{subject}_local.particles",
                         "world_particles": f"data/particles/{subject}_world.particles",
                         "transform": f"data/transforms/{subject}.txt"}
                np.savetxt(staging / files["local_particles"], shapes["local"][k], fmt="%.6f")
                np.savetxt(staging / files["world_particles"], shapes["world"][k], fmt="%.6f")
                np.savetxt(staging / files["transform"], shapes["image_to_world"][k], fmt="%.10f")
                labels_file = subjects.loc[subject, "labels"]
                if labels_file and label is not None:
                    labels = sitk.ReadImage(labels_file)
                    mask = sitk.Cast(sitk.Equal(labels, int(label)), sitk.sitkUInt8)
                    files["segmentation"] = f"data/segmentations/{subject}.nrrd"
                    sitk.WriteImage(mask, str(staging / files["segmentation"]), useCompression=True)
                rows.append({"id": subject, "split": split, "group": subjects.loc[subject, "group"],
                             "image": subjects.loc[subject, "image"], **files})
        table = pd.DataFrame(rows)
        table.to_csv(staging / "subjects.csv", index=False)
    return table
