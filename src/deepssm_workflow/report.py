"""results/{dataset}/report.html: one self-contained page (figures embedded as base64 PNG,
tables as HTML, no script, no external reference) that opens offline.

Sections: what was run, quality control, augmentation, training, evaluation, clinical
study (unless the cohort's report.json says study "none"), provenance. The evaluation and
the study folders follow one contract, read here alike: figures.json (a list of {"file",
"title", "caption"} in display order), tables/*.csv (titled by tables.json when there is
one) and summary.json.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .atomic import replaced
from .layout import DatasetLayout
from .provenance import git_version, package_versions, sha256_of, sidecar_rows

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("What was run", "Quality control", "Augmentation", "Training", "Evaluation", "Clinical study",
            "Provenance")

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 14px; color: #222;
       max-width: 1150px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-bottom: .3em; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, .caption { color: #444; font-size: .92em; max-width: 60em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .85em; }
.note { background: #fff6e0; border-left: 4px solid #e0a000; padding: .5em .8em; }
nav ol { columns: 2; } code { font-size: .9em; } .kv td { text-align: left; }
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _read_json(path: Path):
    if not path.is_file():
        raise ValueError(f"{path}: not found (needed by the report)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _png(path: Path, listed_by: str) -> str:
    """A PNG file as a data URI; a missing or non-PNG file is an error naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: figure not found (listed by {listed_by})")
    data = path.read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: not a PNG image (listed by {listed_by})")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure(path: Path, title: str, caption: str, listed_by: str) -> str:
    return (f'<figure><h3>{_esc(title)}</h3><img alt="{_esc(title)}" src="{_png(path, listed_by)}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _format(value) -> str:
    if isinstance(value, float):
        return "—" if value != value else f"{value:.3g}"
    return str(value)


def _table(frame: pd.DataFrame, key_value: bool = False) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_esc(_format(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    kind = ' class="kv"' if key_value else ""  # key-value lists read left-aligned
    return f"<table{kind}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"{path}: table not found (needed by the report)")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"{path}: not a readable CSV table ({error})") from None


def _flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    """Nested JSON as (dotted key, scalar) rows, lists of scalars joined."""
    if isinstance(value, dict):
        return [row for key, item in value.items() for row in _flatten(item, f"{prefix}{key}.")]
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        return [row for i, item in enumerate(value) for row in _flatten(item, f"{prefix}{i}.")]
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return [(prefix.rstrip("."), value)]


def artifact_section(folder: Path, show_summary: bool) -> str:
    """The notes, tables, figures (and summary values) of an evaluation or study folder, in its order."""
    parts = []
    summary = _read_json(folder / "summary.json")
    for note in summary.get("notes", []) if isinstance(summary, dict) else []:
        parts.append(f'<p class="note">{_esc(note)}</p>')
    listed = folder / "tables.json"
    if listed.is_file():
        tables = _read_json(listed)
    else:  # no titles given: every CSV under tables/, titled by its name
        tables = [{"file": str(p.relative_to(folder)), "title": p.stem.replace("_", " ").capitalize(), "caption": ""}
                  for p in sorted((folder / "tables").glob("*.csv"))]
    for entry in tables:
        frame = _csv(folder / entry["file"])
        body = _table(frame)
        if len(frame) > 12:  # long tables folded, so that the figures stay in view
            body = f"<details><summary>{len(frame)} rows</summary>{body}</details>"
        parts.append(f"<h3>{_esc(entry['title'])}</h3>{body}<p class=\"caption\">{_esc(entry.get('caption', ''))}</p>")
    figures = _read_json(folder / "figures.json")
    for entry in figures:
        parts.append(_figure(folder / entry["file"], entry["title"], entry.get("caption", ""),
                             str(folder / "figures.json")))
    rows = [(k, v) for k, v in _flatten(summary) if not k.startswith("notes")]
    if show_summary and rows:
        parts.append("<h3>Summary values</h3>" + _table(pd.DataFrame(rows, columns=["key", "value"]), key_value=True))
    return "\n".join(parts)


# -- provenance

def code_version() -> str:
    """Git commit of the checkout the package is installed from (marked when it has uncommitted
    changes), or "unknown" for an installed copy."""
    git = git_version()
    if git is None:
        return "unknown"
    return git["commit"] + (" + uncommitted changes" if git["uncommitted_changes"] else "")


def _inputs(layout: DatasetLayout, methods) -> list[Path]:
    paths = [layout.subjects_csv, layout.shapes("train"), layout.shapes("test"), layout.preprocessed("train"),
             layout.preprocessed("test"), layout.samples_npz]
    for v in methods:
        paths += [layout.model_pt(v), layout.predictions_csv(v)]
    return paths


# -- the page

def build_report(dataset_dir, dataset: str, settings: dict, methods, out_path, study_dir=None) -> None:
    """Write results/{dataset}/report.html from the dataset's artifacts (every one must exist)."""
    layout = DatasetLayout(dataset_dir)
    study_dir = Path(study_dir) if study_dir else layout.study_dir
    cohort = _read_json(layout.cohort_report)
    study = cohort.get("study")  # "none": no study was configured, no study section
    evaluation = _read_json(layout.evaluation_summary)
    cards = {v: _read_json(layout.model_card(v)) for v in methods}
    sections = {
        "What was run": _what_was_run(layout, dataset, settings, methods, cohort, evaluation),
        "Quality control": _quality_control(layout),
        "Augmentation": _figure(layout.augmentation_qc, "Augmentation QC",
                                "Generated PCA scores should cover the range of the real ones, and the generated "
                                "images' points should sit on their warped anatomy.", "the report"),
        "Training": _training(layout, methods, cards),
        "Evaluation": artifact_section(layout.evaluation_dir, show_summary=False),  # its tables say it all
        "Provenance": _provenance(layout, dataset, settings, methods),
    }
    if study != "none":
        sections["Clinical study"] = artifact_section(study_dir, show_summary=True)
    names = [name for name in SECTIONS if name in sections]
    nav = "".join(f'<li><a href="#{_anchor(name)}">{_esc(name)}</a></li>' for name in names)
    body = "\n".join(f'<section id="{_anchor(name)}"><h2>{_esc(name)}</h2>\n{sections[name]}</section>'
                     for name in names)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>DeepSSM report: {_esc(dataset)}</title><style>{STYLE}</style></head><body>"
            f"<h1>DeepSSM report: {_esc(dataset)} ({_esc(cohort.get('anatomy', ''))})</h1>"
            f"<p>Made by the DeepSSM workflow from the artifacts under <code>{_esc(layout.root)}</code>; it opens "
            f"offline (figures embedded). Method: Bhalodia et al., DeepSSM: a blueprint for image-to-shape deep "
            f"learning models, MedIA 2024.</p><nav><ol>{nav}</ol></nav>\n{body}\n</body></html>\n")
    with replaced(out_path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")


def _what_was_run(layout: DatasetLayout, dataset: str, settings: dict, methods, cohort: dict,
                  evaluation: dict) -> str:
    source = cohort.get("source", {})
    counts = cohort.get("counts", {})
    grid = _read_json(layout.grid_json)["grid"]
    study = cohort.get("study")
    sizes = [("dataset", dataset), ("anatomy", cohort.get("anatomy", "")),
             ("clinical study", "none: no study was configured (config `study: none`)" if study == "none" else
              study or "the anatomy's"),
             ("data source", f"{source.get('kind', '?')}: {source.get('path', '?')}"),
             ("methods", ", ".join(methods))]
    for split in ("train", "test"):
        groups = counts.get(split, {})
        sizes.append((f"{split} subjects", f"{sum(groups.values())} ("
                      + ", ".join(f"{g} {n}" for g, n in groups.items()) + ")"))
    sizes += [("correspondence points", cohort.get("n_points", "")),
              ("PCA modes (shape space: PCA layers, PCA floor)", evaluation.get("n_modes", "")),
              ("augmented samples", settings.get("augmentation", {}).get("n_samples", "")),
              ("network input", " x ".join(map(str, grid["size"])) + " voxels of "
               + " x ".join(f"{s:g}" for s in grid["spacing"]) + " mm")]
    return (_table(pd.DataFrame(sizes, columns=["", "value"]), key_value=True)
            + f"<h3>Configuration of {_esc(dataset)}</h3><pre>{_esc(yaml.safe_dump(settings, sort_keys=False))}</pre>")


def _quality_control(layout: DatasetLayout) -> str:
    parts = []
    cohort_qc = layout.cohort_qc
    if cohort_qc.is_file():  # made for every dataset by the workflow
        parts.append(_figure(cohort_qc, "Cohort QC", "Points should sit on the anatomy's boundary in the slices "
                             "(and on the segmentation outline, where one is given) and on the mesh, where one is "
                             "given.", "the report"))
    parts.append(_figure(layout.preprocess_qc, "Preprocessing QC",
                         "The mean of the aligned training images should be sharp and the reference's edges "
                         "should follow the anatomy of every registered test image.", "the report"))
    parts.append(_alignment(layout.preprocessed("test")))
    return "\n".join(parts)


def _alignment(test_npz: Path) -> str:
    """Per test scan: how its image-only registration went, and a warning line when any looks wrong."""
    if not test_npz.is_file():
        raise ValueError(f"{test_npz}: not found (needed by the report)")
    data = np.load(test_npz)
    if "registration_metric" not in data:
        raise ValueError(f"{test_npz}: no registration record (made by an older version: rerun preprocess_test)")
    frame = pd.DataFrame({
        "subject": data["ids"], "metric (-NCC²)": data["registration_metric"],
        "rotation from training poses (deg)": data["registration_rotation_from_prior_deg"],
        "scale": data["registration_scale"], "winning start": data["registration_start"],
        "iterations": data["registration_iterations"], "seconds": data["seconds"],
        "similarity fallback": data["registration_fallback"], "warning": data["registration_warning"]})
    flagged = frame[frame["warning"] != ""]
    parts = ["<h3>Alignment of the test scans</h3>"]
    if len(flagged):
        parts.append(f'<p class="note">{len(flagged)} of {len(frame)} test scans look misregistered: '
                     f'{_esc(", ".join(flagged["subject"]))}. Their predictions carry the registration\'s error; '
                     "check them in the preprocessing QC figure.</p>")
    body = _table(frame)
    if len(frame) > 12:
        body = f"<details><summary>{len(frame)} scans</summary>{body}</details>"
    parts.append(body + '<p class="caption">Every prediction starts with this image-only registration of the scan '
                 "to the reference; test errors in the evaluation include its error, validation errors in the "
                 "training table do not (they use the shape model's own alignment). A warning is raised when the "
                 "metric is far worse than the training images' own at their true pose, or the pose far outside "
                 "the training poses; a similarity fallback means the size search was rejected and the rigid "
                 "pose kept.</p>")
    return "".join(parts)


def _device(card: dict) -> str:
    """The device a model trained on; on a CPU with its kernels' instruction set, since weights
    trained on CPUs that differ in it differ."""
    kernels = card.get("device_facts", {}).get("cpu_kernels")
    name = card.get("device_name", "")
    return f"{name} ({kernels} kernels)" if name == "cpu" and kernels else name


def _training(layout: DatasetLayout, methods, cards: dict) -> str:
    rows = [{"method": v, "best epoch": c["best_epoch"], "phase": c.get("best_phase", ""),
             "validation RMSE (mm)": c["val_rmse"], "epochs run": c.get("epochs_run", ""),
             "seconds per epoch": c.get("mean_epoch_seconds", float("nan")), "device": _device(c),
             "train / validation samples": f"{c.get('n_train', '?')} / {c.get('n_val', '?')}"}
            for v, c in cards.items()]
    parts = [_table(pd.DataFrame(rows)),
             '<p class="caption">The kept model of each method is its epoch of lowest validation RMSE '
             "(paper eq. 12).</p>"]
    for v in methods:
        parts.append(_figure(layout.loss_curve(v), f"Training curve: {v}",
                             "Training loss and validation RMSE per epoch; look for a validation curve that "
                             "flattens rather than rises after the marked (kept) epoch.", "the report"))
    return "\n".join(parts)


def _provenance(layout: DatasetLayout, dataset: str, settings: dict, methods) -> str:
    root = layout.root
    hashes = [(f"{dataset}/{path.relative_to(root)}", sha256_of(path)) for path in _inputs(layout, methods)]
    hashes.append(("configuration block (JSON, sorted keys)",
                   hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()))
    folders = [str(folder.relative_to(root)) for folder in layout.provenance_dirs(methods)]  # e.g. models/base
    facts = [("date (UTC)", datetime.now(timezone.utc).isoformat(timespec="seconds")),
             ("code version (git commit)", code_version()),
             ("platform", f"{platform.platform()}, Python {sys.version.split()[0]}")]
    return ("<h3>Run</h3>" + _table(pd.DataFrame(facts, columns=["", "value"]), key_value=True)
            + "<h3>Package versions</h3>"
            + _table(pd.DataFrame(list(package_versions().items()), columns=["package", "version"]), key_value=True)
            + "<h3>Input files (SHA-256)</h3>"
            + _table(pd.DataFrame(hashes, columns=["file", "sha256"]), key_value=True)
            + "<h3>Artifacts</h3>" + _table(pd.DataFrame(sidecar_rows(root, folders)))
            + '<p class="caption">From the provenance.json written beside each expensive artifact (its settings, '
            "input and output SHA-256, code and package versions); <i>outputs match</i> re-hashes the files now.</p>")
