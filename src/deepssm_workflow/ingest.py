"""Ingestion: turn a cohort source into one normalized, validated cohort folder.

Sources (the `source` entry of a dataset in the config; the caller resolves the table path):

    {"source": "csv",        "manifest": "subjects.csv"}    a CSV manifest
    {"source": "synthetic",  "manifest": ".../subjects.csv"} the synthetic cohort's table (a CSV manifest)
    {"source": "shapeworks", "project": "x.swproj" | "x.xlsx"} a single-domain ShapeWorks project

Relative paths in `source` resolve against `base_dir`; file paths inside a table resolve
against the table's folder.

CSV manifest columns: `id`, `split` (train/test), `image`, `local_particles` (alias
`particles`) and/or `world_particles`, optional `transform` (4x4 text file,
world = M @ [x, y, z, 1] of image-frame points), `mesh`, `segmentation`, `group`; every
other column is a covariate.

ShapeWorks columns: `name` (id), `shape_<d>` / `mesh_<d>` / `segmentation_<d>` (surface),
`image_<x>` or `feature_<x>` (image), `local_particles_<d>`, `world_particles_<d>`,
`alignment_<d>` and `procrustes_<d>` (16 numbers, row-major 4x4), `group_<x>` (group),
`split`; other columns are covariates. ShapeWorks places world particles by applying the
groom alignment first and the Procrustes transform second, so image -> world is
procrustes @ alignment (either alone when only one is given).

Everything is read and validated before anything is written; the folder is then written
to a staging folder next to `out_dir` and moved into place (see `ingest_cohort`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import staged
from .io import apply_transform, procrustes_fit, read_particles, read_transform, resolve
from .scan_checks import ScanError, check_scan_path, read_scan
from .studies.registry import NO_STUDY, STUDIES, default_study


class CohortError(ValueError):
    """An invalid cohort; the message names the subject (when there is one), the file and the problem."""


MIN_SUBJECTS = {"train": 3, "test": 1}  # a shape model needs 3 shapes; evaluation needs 1
SPLITS = tuple(MIN_SUBJECTS)
FILE_COLUMNS = ("image", "segmentation", "mesh", "local_particles", "world_particles", "transform")
MESH_SUFFIXES = (".vtk", ".vtp", ".ply", ".stl", ".obj")
FILE_KINDS = {"image": "image", "segmentation": "image", "mesh": "mesh", "local_particles": "particles",
              "world_particles": "particles", "transform": "transform"}
# a given or fitted transform must reproduce the world particles to this fraction of the
# shape's RMS radius; more means the wrong convention (e.g. an inverted matrix) or a non-rigid pair
RESIDUAL_TOLERANCE = 0.01
# subject ids name output files (particles/{id}_world.particles) and Snakemake targets: ASCII
# letters, digits and _ . + - only (no path separators, spaces, quotes or NUL), not starting
# with "." (a hidden file, or "..") or "-" (read as an option on a command line), at most 200
# characters (file names end at 255 bytes, and suffixes are added)
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
SAFE_ID_RULE = "letters, digits, _ . + - only, not starting with . or -, at most 200 characters"


def ingest_cohort(source: dict, anatomy: str, out_dir, base_dir=".", study: str | None = None) -> dict:
    """Read, validate and write a cohort into `out_dir`; return the report (also report.json).

    `anatomy` is any name (it is reported); `study` (a name of studies.registry.STUDIES or
    "none"; default: the anatomy's own study, if it has one) decides which labels the table
    must have: a study's groups or covariates are required only when that study runs.

    Writes subjects.csv (id, split, group, covariates, absolute image/segmentation/mesh
    paths), shapes_train.npz and shapes_test.npz (ids, world, local, image_to_world,
    residual_mm) and report.json. Raises CohortError before writing anything if the cohort
    is invalid; a failure while writing leaves `out_dir` untouched.
    """
    study = default_study(anatomy) if study is None else study
    if study != NO_STUDY and study not in STUDIES:
        raise CohortError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)} or {NO_STUDY}")
    kind, table_path = _table_path(source, Path(base_dir))
    if kind == "shapeworks":
        table, notes = _read_shapeworks(table_path, study)
    else:
        table, notes = _read_manifest(table_path), {}
    covariates = _normalize(table, table_path)
    _check_table(table, table_path, study)
    shapes = _read_subjects(table, table_path)

    subjects = table[["id", "split", "group", *covariates, "image", "segmentation", "mesh"]]
    arrays = {split: _stack(shapes, subjects["id"][subjects["split"] == split]) for split in SPLITS}
    residuals = np.array([shape["residual_mm"] for shape in shapes.values()])
    counts = {split: {str(g): int(n) for g, n in sub.groupby("group").size().items()}
              for split, sub in subjects.groupby("split")}
    mode = _transform_mode(table)
    report = {
        "source": {"kind": kind, "path": str(table_path), **notes},
        "anatomy": anatomy,
        "study": study,
        "n_subjects": len(subjects),
        "counts": {split: counts.get(split, {}) for split in SPLITS},
        "n_points": int(next(iter(shapes.values()))["world"].shape[0]),
        "particles_given": [k for k in ("local", "world") if f"{k}_particles" in table],
        "transforms": mode,
        "transforms_note": {
            "given": "image_to_world read from the source",
            "estimated": "least-squares similarity fit (rotation, translation, uniform scale), local to world",
            "identity": "only local particles given: world = local, image_to_world = identity",
        }[mode],
        "residual_mm": {"median": float(np.median(residuals)), "max": float(residuals.max())},
        # accepted (a mirrored scanner or a left side mapped onto a right-side model) but worth a look
        "reflections": [sid for sid, s in shapes.items() if np.linalg.det(s["image_to_world"][:3, :3]) < 0],
        "covariates": covariates,
        "files": {"subjects": "subjects.csv", "shapes": {s: f"shapes_{s}.npz" for s in SPLITS}},
    }
    if mode == "estimated":
        scales = [np.cbrt(np.linalg.det(s["image_to_world"][:3, :3])) for s in shapes.values()]
        report["estimated_scale"] = {"min": float(min(scales)), "max": float(max(scales))}

    names = ["subjects.csv", *(f"shapes_{split}.npz" for split in arrays), "report.json"]
    with staged(out_dir, names) as staging:
        subjects.to_csv(staging / "subjects.csv", index=False)
        for split, data in arrays.items():
            np.savez(staging / f"shapes_{split}.npz", **data)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---------------------------------------------------------------- reading the table

def _table_path(source: dict, base_dir: Path) -> tuple[str, Path]:
    kind = source.get("source")
    key = {"csv": "manifest", "synthetic": "manifest", "shapeworks": "project"}.get(kind)
    if key is None:
        raise CohortError(f"source: unknown kind {kind!r}; choose csv, synthetic or shapeworks")
    if not source.get(key):
        raise CohortError(f"source {kind!r} needs `{key}`: the path of its subjects table")
    path = Path(source[key])
    path = Path(os.path.abspath(path if path.is_absolute() else base_dir / path))
    if not path.is_file():
        raise CohortError(f"{path}: {key} file not found")
    return kind, path


def _read_manifest(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError) as error:
        raise CohortError(f"{path}: cannot read the manifest: {error}") from None
    if "particles" in table:
        if "local_particles" in table:
            raise CohortError(f"{path}: both `particles` and `local_particles` columns; keep one")
        table = table.rename(columns={"particles": "local_particles"})
    return table


def _read_shapeworks(path: Path, study: str) -> tuple[pd.DataFrame, dict]:
    """A ShapeWorks project's data table, renamed to the manifest's columns."""
    raw, notes = read_project(path)
    return shapeworks_table(raw, path, study, notes)


def read_project(path: Path) -> tuple[pd.DataFrame, dict]:
    """A ShapeWorks project's data sheet as it is (cells stripped strings), and where it was read from."""
    if path.suffix not in (".swproj", ".xlsx"):
        raise CohortError(f"{path}: a ShapeWorks project is a .swproj or .xlsx file")
    notes = {}
    try:
        if path.suffix == ".swproj":
            rows = json.loads(path.read_text())["data"]
            raw = pd.DataFrame([{k: "" if v is None else str(v) for k, v in row.items()} for row in rows])
        else:
            book = pd.ExcelFile(path)
            notes["sheet"] = "data" if "data" in book.sheet_names else book.sheet_names[0]
            raw = pd.read_excel(book, sheet_name=notes["sheet"], dtype=str)
    except Exception as error:  # JSON, zip, sheet and key errors alike: the project cannot be read
        raise CohortError(f"{path}: cannot read the ShapeWorks project: {error!r}") from None
    if "name" not in raw:
        raise CohortError(f"{path}: no `name` column (the subject id)")
    return raw.fillna("").astype(str).apply(lambda column: column.str.strip()), notes


# the columns of a ShapeWorks project that belong to one domain (their suffix)
PER_DOMAIN = ("shape_", "mesh_", "segmentation_", "local_particles_", "world_particles_", "alignment_", "procrustes_")


def project_domains(raw: pd.DataFrame) -> list[str]:
    """The domains of a project's sheet, by its per-domain columns; `*_global` is a multi-domain extra."""
    return sorted({c[len(p):] for c in raw.columns for p in PER_DOMAIN if c.startswith(p)} - {"global"})


def shapeworks_table(raw: pd.DataFrame, path: Path, study: str, notes: dict) -> tuple[pd.DataFrame, dict]:
    """A one-domain project's sheet renamed to the manifest's columns."""
    columns = list(raw.columns)
    per_domain = PER_DOMAIN
    domains = project_domains(raw)
    if len(domains) != 1:
        found = ", ".join(domains) if domains else "none"
        raise CohortError(f"{path}: ingestion needs exactly one ShapeWorks domain, found {found}")
    domain = notes["domain"] = domains[0]

    images = [c for c in columns if c.startswith(("image_", "feature_"))]
    if len(images) > 1:
        images = [c for c in images if c in (f"image_{domain}", f"feature_{domain}")]
    if len(images) != 1:
        raise CohortError(f"{path}: needs one image column (image_<name> or feature_<name>); "
                          f"found {', '.join(c for c in columns if c.startswith(('image_', 'feature_'))) or 'none'}")

    shape = raw.get(f"shape_{domain}", pd.Series([""] * len(raw)))
    table = pd.DataFrame({"id": _names(raw, domain), "image": raw[images[0]]})
    is_mesh = shape.str.lower().str.endswith(MESH_SUFFIXES)
    table["mesh"] = raw.get(f"mesh_{domain}", shape.where(is_mesh, ""))
    table["segmentation"] = raw.get(f"segmentation_{domain}", shape.where(~is_mesh, ""))
    for kind in ("local_particles", "world_particles"):
        if f"{kind}_{domain}" in raw:
            table[kind] = raw[f"{kind}_{domain}"]

    transforms = [c for c in (f"alignment_{domain}", f"procrustes_{domain}") if c in raw]
    if transforms:
        table["matrix"] = [_compose(row, transforms, path) for _, row in raw.assign(id=table["id"]).iterrows()]

    groups = [c for c in columns if c.startswith("group_")]
    if len(groups) > 1:  # several groupings: the study's own (values within its groups) is `group`
        wanted = set(STUDIES[study].groups) if study in STUDIES else set()
        fitting = [c for c in groups if wanted and set(raw[c].str.lower()) <= wanted]
        if wanted and len(fitting) != 1:
            raise CohortError(f"{path}: several group columns ({', '.join(groups)}); "
                              f"cannot tell which is the {study} study's group")
        groups = fitting  # a study without groups: every group_ column is a covariate
    if groups:
        table["group"] = raw[groups[0]]

    used = {"name", images[0], *groups, *transforms}
    used |= {f"{p}{domain}" for p in per_domain}
    # ShapeWorks' own grooming and optimization inputs are files, not covariates
    ignored = ("groomed_", "contour_", "landmarks_file_", "constraints_", "image_", "feature_")
    for column in columns:
        if column in used or column.startswith(ignored) or column.endswith("_global"):
            continue
        name = column[len("group_"):] if column.startswith("group_") else column
        table[name] = raw[column]
    return table, notes


def _names(raw: pd.DataFrame, domain: str) -> pd.Series:
    """The `name` column; an empty name is the stem of the subject's shape file (shape_, else
    mesh_ or segmentation_ column), as ShapeWorks names such subjects ("a.nii.gz" -> "a")."""
    files = [raw[c] for c in (f"shape_{domain}", f"mesh_{domain}", f"segmentation_{domain}") if c in raw]

    def stem(row: int) -> str:
        file = next((f.iloc[row] for f in files if f.iloc[row]), "")
        name = Path(file.replace("\\", "/")).name
        name = name[:-3] if name.lower().endswith(".gz") else name
        return Path(name).stem
    return pd.Series([name or stem(i) for i, name in enumerate(raw["name"])], index=raw.index)


def _compose(row: pd.Series, columns: list[str], path: Path) -> np.ndarray:
    """procrustes @ alignment from 16-number cells (the order ShapeWorks applies them in). An
    empty cell is the identity: ShapeWorks leaves it empty when that step is off."""
    matrix = np.eye(4)
    for column in columns:  # alignment first, then procrustes on the left
        text = row[column]
        if not text:
            continue
        try:
            values = np.array(text.split(), dtype=np.float64)
        except ValueError:
            values = np.array([])
        if values.size != 16:
            raise CohortError(f"subject {row['id']}: {path}: column {column}: expected 16 numbers "
                              f"(row-major 4x4), found {text!r}")
        matrix = values.reshape(4, 4) @ matrix
    return matrix


def _normalize(table: pd.DataFrame, path: Path) -> list[str]:
    """Check the columns, strip cells, resolve file paths to absolute ones; return the covariates."""
    for column in ("id", "image"):
        if column not in table:
            raise CohortError(f"{path}: no `{column}` column")
    if "local_particles" not in table and "world_particles" not in table:
        raise CohortError(f"{path}: no particles: give `local_particles` (alias `particles`) "
                          f"and/or `world_particles`")
    if "world_particles" in table and "local_particles" not in table and not _has_transform(table):
        raise CohortError(f"{path}: world particles without local particles or a transform: "
                          f"cannot place the points in the images; give `local_particles` or `transform`")
    for column in table.columns:
        if column != "matrix":
            table[column] = table[column].astype(str).str.strip()
    for column in ("group", "segmentation", "mesh"):
        if column not in table:
            table[column] = ""
    for column in FILE_COLUMNS:
        if column in table:
            table[column] = [str(Path(os.path.abspath(resolve(path, v)))) if v else "" for v in table[column]]
    known = {"id", "split", "group", "matrix", *FILE_COLUMNS}
    return [c for c in table.columns if c not in known]


def _has_transform(table: pd.DataFrame) -> bool:
    return "transform" in table or "matrix" in table


def _transform_mode(table: pd.DataFrame) -> str:
    if _has_transform(table):
        return "given"
    return "estimated" if "world_particles" in table and "local_particles" in table else "identity"


def _check_table(table: pd.DataFrame, path: Path, study: str) -> None:
    """Ids, splits, the study's groups and covariates, and subject counts."""
    for row, sid in enumerate(table["id"], start=1):
        if not sid:
            raise CohortError(f"{path}: data row {row} has no id")
        if not SAFE_ID.fullmatch(sid):
            raise CohortError(f"subject {sid}: {path}: id {sid!r} is not a safe file name "
                              f"(ids name output files: {SAFE_ID_RULE})")
    for sid, n in Counter(table["id"]).items():
        if n > 1:
            rows = [i for i, other in enumerate(table["id"], start=1) if other == sid]
            raise CohortError(f"subject {sid}: {path}: duplicate id (data rows {', '.join(map(str, rows))})")
    if "split" not in table:
        raise CohortError(f"{path}: no `split` column: add one with train or test for every subject "
                          f"(ingestion does not invent a split)")
    table["split"] = table["split"].str.lower()
    for sid, split in zip(table["id"], table["split"]):
        if split not in SPLITS:
            raise CohortError(f"subject {sid}: {path}: split {split!r} is neither train nor test")

    # the study's labels (studies.registry), checked here so that a cohort that cannot answer its
    # study question fails at ingestion, not in the final analysis; none: no labels needed
    if study not in STUDIES:
        groups, covariates = (), {}
    else:
        groups, covariates = STUDIES[study].groups, STUDIES[study].covariates
    hint = f"(or set `study: none` in the config to run without the {study} study)"
    if groups:
        if not table["group"].any():
            raise CohortError(f"{path}: the {study} study needs a `group` column with values "
                              f"{' and '.join(groups)}; none found {hint}")
        normalized = table["group"].str.lower()  # "Control", "CAM" -> the study's names
        _raise([f"subject {sid}: {path}: group {group!r} is not one of {', '.join(groups)}, the {study} "
                f"study's groups (matched ignoring case) {hint}"
                for sid, group, name in zip(table["id"], table["group"], normalized) if name not in groups], path)
        table["group"] = normalized
        missing = [g for g in groups if g not in set(table["group"])]
        if missing:
            raise CohortError(f"{path}: the {study} study compares {' and '.join(groups)}; "
                              f"no subject in group {', '.join(missing)}")
    for column, levels in covariates.items():
        if column not in table:
            raise CohortError(f"{path}: the {study} study needs covariate column `{column}` "
                              f"(values {'/'.join(levels)}); not found {hint}")
        values = [_level(v) for v in table[column]]
        _raise([f"subject {sid}: {path}: {column} {original!r} is not one of {'/'.join(levels)} {hint}"
                for sid, value, original in zip(table["id"], values, table[column]) if value not in levels], path)
        table[column] = values

    for split, minimum in MIN_SUBJECTS.items():
        n = int((table["split"] == split).sum())
        if n < minimum:
            raise CohortError(f"{path}: {n} {split} subjects; at least {minimum} needed")


def _level(value: str) -> str:
    """'1', '1.0' -> '1' (spreadsheets turn integers into floats)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else value


# ---------------------------------------------------------------- reading every subject's files

class _Invalid(Exception):
    """A problem with one file; the caller adds the subject id and the file."""


def _read_subjects(table: pd.DataFrame, path: Path) -> dict[str, dict]:
    """Read and check every file; collect the problems of all subjects into one CohortError."""
    problems, subjects = [], {}
    for row in table.to_dict("records"):
        subject, subject_problems = _read_files(row, path)
        problems += subject_problems
        subjects[row["id"]] = subject
    _raise(problems, path)

    # every particle file must have the count most files have
    counts = Counter(len(s[k]) for s in subjects.values() for k in ("local", "world") if s[k] is not None)
    expected = counts.most_common(1)[0][0]
    for sid, s in subjects.items():
        for kind in ("local", "world"):
            if s[kind] is not None and len(s[kind]) != expected:
                problems.append(f"subject {sid}: {s['files'][kind]}: {len(s[kind])} points, "
                                f"expected {expected} (the count of the other particle files)")
    _raise(problems, path)

    for sid, s in subjects.items():
        try:
            s.update(_place(s))
        except _Invalid as error:
            problems.append(f"subject {sid}: {error}")
    _raise(problems, path)
    return subjects


def _raise(problems: list[str], path: Path) -> None:
    if len(problems) == 1:
        raise CohortError(problems[0])
    if problems:
        raise CohortError(f"{len(problems)} problems in the cohort {path}:\n  " + "\n  ".join(problems))


def _read_files(row: dict, table_path: Path) -> tuple[dict, list[str]]:
    sid, problems = row["id"], []
    subject = {"local": None, "world": None, "matrix": row.get("matrix"), "geometry": None,
               "files": {"image": row["image"], "local": row.get("local_particles"),
                         "world": row.get("world_particles"), "transform": row.get("transform")}}

    def check(column, reader):
        file = row.get(column)
        if file is None:  # column absent: nothing to read
            return None
        if not file:
            if column in ("segmentation", "mesh"):  # optional per subject
                return None
            problems.append(f"subject {sid}: {table_path}: column {column} is empty")
            return None
        problem = check_scan_path(file, FILE_KINDS[column])
        if problem:
            problems.append(f"subject {sid}: {file}: {problem} (column {column})")
            return None
        try:
            return reader(file)
        except _Invalid as error:
            problems.append(f"subject {sid}: {file}: {error}")
            return None

    subject["geometry"] = check("image", _read_image)
    check("segmentation", _read_segmentation)
    check("mesh", _read_mesh)
    subject["local"] = check("local_particles", _read_points)
    subject["world"] = check("world_particles", _read_points)
    if "transform" in row:
        subject["matrix"] = check("transform", _read_matrix)
    elif subject["matrix"] is not None:
        try:
            _check_matrix(subject["matrix"])
        except _Invalid as error:
            problems.append(f"subject {sid}: {table_path}: alignment/procrustes columns: {error}")
    return subject, problems


def _read_image(file: str, intensities: bool = True) -> dict:
    """The scan read and checked in full (`scan_checks.read_scan`: header, voxels, intensities);
    its geometry."""
    try:
        image = read_scan(file, file, intensities=intensities)
    except ScanError as error:
        raise _Invalid(error.problem) from None
    return {"origin": np.array(image.GetOrigin()), "spacing": np.array(image.GetSpacing()),
            "direction": np.array(image.GetDirection()).reshape(3, 3), "size": np.array(image.GetSize())}


def _read_segmentation(file: str) -> None:
    """A readable 3D label image; its values are labels, not intensities, so are not checked."""
    _read_image(file, intensities=False)


def _read_mesh(file: str) -> None:
    import pyvista as pv  # deferred: VTK is slow to import and only needed here

    try:
        mesh = pv.read(file)
    except Exception as error:  # VTK readers raise many types
        raise _Invalid(f"not a readable mesh ({error})") from None
    if mesh.n_points == 0:
        raise _Invalid("mesh has no points (unreadable or empty)")


def _read_points(file: str) -> np.ndarray:
    try:
        if _is_blank(file):
            raise _Invalid("particles file is empty")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loadtxt warns on empty files; reported below
            points = read_particles(file)
    except OSError as error:
        raise _Invalid(f"cannot read the file ({error.strerror or error})") from None
    except ValueError:
        raise _Invalid("not a particles file (one line 'x y z' per point)") from None
    if points.size == 0:
        raise _Invalid("particles file has no points")
    bad = np.flatnonzero(~np.isfinite(points).all(1))
    if bad.size:
        more = f" and {bad.size - 1} more" if bad.size > 1 else ""
        raise _Invalid(f"non-finite coordinates (nan or inf) at point {bad[0] + 1}{more}")
    return points


def _is_blank(file: str) -> bool:
    """Empty or only whitespace (loadtxt would say "no data" or fail on the shape instead)."""
    with open(file, "rb") as handle:
        return not handle.read(1 << 16).strip() and not handle.read(1)


def _read_matrix(file: str) -> np.ndarray:
    try:
        matrix = read_transform(file)
    except OSError as error:
        raise _Invalid(f"cannot read the file ({error.strerror or error})") from None
    except ValueError:
        raise _Invalid("not a 4x4 transform (4 lines of 4 numbers)") from None
    _check_matrix(matrix)
    return matrix


def _check_matrix(matrix: np.ndarray) -> None:
    if not np.isfinite(matrix).all():
        raise _Invalid("transform has non-finite entries")
    if not np.allclose(matrix[3], [0, 0, 0, 1]) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise _Invalid("transform is not an invertible affine 4x4 matrix (last row must be 0 0 0 1)")


# ---------------------------------------------------------------- frames and transforms

def _place(s: dict) -> dict:
    """local (image frame), world and image_to_world of one subject, checked against its image."""
    local, world, matrix, files = s["local"], s["world"], s["matrix"], s["files"]
    if local is None:  # world + transform: bring the points into the image
        local = apply_transform(np.linalg.inv(matrix), world)
    _check_inside(local, s["geometry"], files)
    if world is None:
        world = local if matrix is None else apply_transform(matrix, local)
        matrix = np.eye(4) if matrix is None else matrix
    given = matrix is not None
    if not given:
        try:
            matrix = procrustes_fit(local, world, scaling=True)
        except ValueError as error:
            raise _Invalid(f"{files['world']}: {error}") from None
    residual = float(np.sqrt(((apply_transform(matrix, local) - world) ** 2).sum(1).mean()))
    radius = float(np.sqrt(((world - world.mean(0)) ** 2).sum(1).mean()))
    if residual > RESIDUAL_TOLERANCE * radius + 1e-6:
        transform = files["transform"] or "(alignment/procrustes columns)"
        what = (f"the transform {transform} does not map the local particles onto the world particles "
                "(expected world = M @ [x, y, z, 1] of image-frame points)" if given else
                "the world particles are not a similarity transform of the local particles")
        raise _Invalid(f"{files['world']}: {what}: RMS residual {residual:.3g} mm "
                       f"for a shape of RMS radius {radius:.3g} mm")
    return {"local": local, "world": world, "image_to_world": matrix, "residual_mm": residual}


def _check_inside(local: np.ndarray, geometry: dict, files: dict) -> None:
    """Points must lie in the image's physical extent grown by one voxel (else: wrong frame or units)."""
    axes = geometry["direction"] @ np.diag(geometry["spacing"])  # index -> physical offset
    index = (local - geometry["origin"]) @ np.linalg.inv(axes).T
    outside = ((index < -1.5) | (index > geometry["size"] + 0.5)).any(1)  # voxel i spans i +- 0.5
    if outside.any():
        corners = np.array([[-0.5] * 3, geometry["size"] - 0.5]) @ axes.T
        low, high = corners.min(0) + geometry["origin"], corners.max(0) + geometry["origin"]
        source = files["local"] or f"{files['world']} mapped by the inverse transform"
        raise _Invalid(f"{source}: {outside.sum()} of {len(local)} local particles lie outside the image "
                       f"{files['image']} (first at {_fmt(local[outside][0])} mm; the image spans "
                       f"{_fmt(low)} to {_fmt(high)} mm): wrong frame or units?")


def _fmt(point) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in point) + ")"


# ---------------------------------------------------------------- writing

def _stack(shapes: dict[str, dict], ids) -> dict[str, np.ndarray]:
    ids = list(ids)
    return {"ids": np.array(ids, dtype=str),
            **{key: np.array([shapes[i][key] for i in ids], dtype=np.float64)
               for key in ("world", "local", "image_to_world", "residual_mm")}}

