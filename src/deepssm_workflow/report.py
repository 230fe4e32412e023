"""results/{dataset}/report.html: one self-contained page (figures embedded as base64 PNG,
tables as HTML, no script, no external reference) that opens offline.

Sections: the answer (first screen: per method the test RMSE with its 95 % interval and n
beside the mean shape and the floors, and the clinical study's headline with its interval),
what was run, quality control, augmentation, training, evaluation, clinical study (unless the
cohort's report.json says study "none"), provenance. The evaluation and the study folders
follow one contract, read here alike: figures.json (a list of {"file", "title", "caption"} in
display order), tables/*.csv (titled by tables.json, else by TABLE_TITLES, else by their name
in words; the file name in small print) and summary.json (its values folded below the tables).
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
from .evaluate import MEAN_SHAPE, PCA_FLOOR
from .intervals import LEVEL, RESAMPLES
from .layout import DatasetLayout
from .provenance import git_version, package_versions, sha256_of, sidecar_rows
from .studies.registry import STUDIES
from .synthetic.cohort import draw_description

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ANSWER = "The answer"
LANDMARKS_SECTION = "Self-supervised landmarks"
SECTIONS = (ANSWER, "What was run", "Quality control", "Augmentation", "Training", "Evaluation", "Clinical study",
            LANDMARKS_SECTION, "Provenance")

# Tables that come without a tables.json entry (the studies'), titled and explained in words.
TABLE_TITLES = {
    "metopic_severity_table2": (
        "Metopic severity against diagnosis and expert ratings, per source (paper Table 2)",
        "Per source (the ground truth and each method's predictions, on the same test subjects): the AUC of the "
        "PPCA severity against the diagnosis and its Pearson and Spearman correlation with the expert severity, "
        "with 95 % bootstrap intervals (_low, _high) where the study gives them; empty where not computed."),
    "metopic_severity_scores": (
        "Metopic severity score of every scored test subject",
        "The PPCA severity (Mahalanobis distance to the training controls) of each test subject per source, "
        "beside its diagnosis and expert severity."),
    "femur_group_difference": (
        "Cam-FAI group difference per source (paper Fig. 9)",
        "Peak and mean size of the difference mu_cam - mu_control per source, with the group sizes; where "
        "computed, the points that differ at q < 0.05 and the correlation of the source's difference map "
        "with the ground truth's."),
    "femur_group_difference_points": (
        "Cam-FAI group difference at every point",
        "The difference vector, its size and the FDR q-value of every correspondence point, per source."),
    "left_atrium_recurrence_table3": (
        "AF recurrence prediction accuracy per source (paper Table 3)",
        "Test accuracy of the MLP (mean and sd over seeds) and of logistic regression on each source's trimmed "
        "descriptors, with 95 % bootstrap intervals, beside the no-information rate (nir: always answering the test "
        "set's most frequent class); against it each classifier's one-sided exact binomial p (the MLP: its seed "
        "ensemble, mean probability > 0.5), balanced accuracy and AUC with a class-stratified bootstrap interval; "
        "Brier scores measure calibration."),
    "landmark_metopic_severity": (
        "Metopic severity from landmarks beside the PDM (landmarks paper sec. 4.2)",
        "Severity = Mahalanobis distance from a PPCA model of the training controls only, of the landmarks or of the "
        "ground-truth PDM, scored on the test subjects: AUC against the diagnosis, Pearson and Spearman with the "
        "experts' severity and, for the landmarks, Pearson with the PDM's severity (paper: 0.64 with the experts, "
        "0.81 with the PDM), with 95 % bootstrap intervals (_low, _high)."),
    "landmark_metopic_scores": ("Metopic severity of every test subject, landmarks and PDM", ""),
    "landmark_femur_group_difference": (
        "Cam-FAI deviation from the control mean at every landmark",
        "Distance between the cam and control group means of each landmark (all subjects), its permutation p "
        "(999 relabellings) and BH q, its place on the control mean and, where the generator's lesion is known, "
        "its distance to the lesion centre."),
    "landmark_left_atrium_recurrence": (
        "AF recurrence from landmarks beside the PDM (landmarks paper Table 4)",
        "The DeepSSM study's MLP and logistic regression on the PCA scores of the landmarks and of the ground-truth "
        "PDM (paper: 65.7 +- 1.3 % with landmarks, 68.3 +- 1.0 % with the PDM), with 95 % bootstrap intervals."),
    "accuracy_summary": ("Test accuracy per trained method and baselines", ""),
    "paired_differences": ("Paired differences between methods, Holm-adjusted", ""),
    "accuracy_per_subject": ("Accuracy per test subject", ""),
    "error_decomposition": ("Where the error comes from: alignment and network", ""),
    "error_decomposition_per_subject": ("Error decomposition per test subject", ""),
    "inference_time": ("Inference time per scan", ""),
}

# The headline of each study (its block in study/summary.json, keyed by the registry's module name):
# the numbers shown per source as (key, label, digits), the key whose interval and n make the sentence,
# and the group sizes shown as n.
STUDY_HEADLINES = {
    "metopic": {
        "metrics": (("auc", "AUC: severity vs diagnosis", 2), ("pearson", "Pearson r with the experts' severity", 2),
                    ("spearman", "Spearman rho with the experts' severity", 2),
                    # fidelity: ranks against the generator's severity, not the diagnosis (synthetic cohorts only)
                    ("spearman_true_severity", "Spearman rho with the true severity", 2)),
        "n": (("n_scored", "scored"), ("n_metopic", "metopic"), ("n_rated", "rated"))},
    "femur": {
        "metrics": (("peak_difference_mm", "peak |mu_cam - mu_control| (mm)", 2),
                    ("mean_difference_mm", "mean |mu_cam - mu_control| (mm)", 2),
                    ("n_significant_points", "points differing at q < 0.05", 0),
                    ("n_fwer_significant_points", "points differing at family-wise p < 0.05 (max-T)", 0),
                    ("fwer_sensitivity", "planted region found at family-wise p < 0.05 (share of its points)", 2),
                    ("map_correlation", "difference map: correlation with the ground truth's", 2)),
        "n": (("n_cam", "cam"), ("n_control", "control"))},
    "left_atrium": {
        "metrics": (("mlp_accuracy_mean", "MLP accuracy", 2), ("logistic_accuracy", "logistic regression accuracy", 2),
                    ("nir_accuracy", "no-information rate", 2), ("mlp_auc", "MLP AUC", 2)),
        "n": (("n_test", "test"), ("n_train", "train"))},
}
SOURCE_LABELS = {"ground_truth": "ground truth (test subjects)", "ground_truth_all": "ground truth (all subjects)"}

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
.answer p { max-width: 60em; } .answer td:last-child, .answer th:last-child { text-align: left; }
.scroll { overflow-x: auto; } .file { color: #888; font-size: .78em; margin-top: -.6em; }
details > summary { cursor: pointer; color: #444; }
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
    if value is None:
        return "—"
    if isinstance(value, float):
        return "—" if value != value else f"{value:.3g}"
    return str(value)


def _table(frame: pd.DataFrame, key_value: bool = False) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{_esc(_format(v))}</td>" for v in row) + "</tr>"
                   for row in frame.itertuples(index=False))
    kind = ' class="kv"' if key_value else ""  # key-value lists read left-aligned
    # a wide table scrolls by itself rather than widening the page
    return f'<div class="scroll"><table{kind}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


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


def table_title(file: str) -> str:
    """A table's title in words, from its file name: TABLE_TITLES, else the name humanised
    ("metopic_severity_table2.csv" -> "Metopic severity (Table 2)")."""
    stem = Path(file).stem
    if stem in TABLE_TITLES:
        return TABLE_TITLES[stem][0]
    words, refs = [], []
    for word in re.split(r"[_\-\s]+", stem):
        numbered = re.fullmatch(r"(table|fig|figure)(\d+)", word, re.I)
        if numbered:
            refs.append(f"{'Table' if numbered.group(1).lower() == 'table' else 'Fig.'} {numbered.group(2)}")
        elif word:
            words.append(word)
    title = " ".join(words) or stem
    title = title[:1].upper() + title[1:]
    return f"{title} ({', '.join(refs)})" if refs else title


def _is_file_name(title: str, file: str) -> bool:
    """A heading that is a bare file name or snake_case stem rather than words."""
    title = title.strip()
    return (not title or title in (Path(file).name, Path(file).stem)
            or bool(re.fullmatch(r"[\w.-]+", title) and ("_" in title or "." in title)))


def _table_entries(folder: Path) -> list[dict]:
    """Every table of a folder with its title in words and caption: tables.json where given, else
    TABLE_TITLES or the name in words."""
    listed = folder / "tables.json"
    if listed.is_file():
        entries = _read_json(listed)
    else:  # no titles given: every CSV under tables/
        order = list(TABLE_TITLES)  # the known tables in their order (a study's main table first), then the rest
        files = sorted((folder / "tables").glob("*.csv"),
                       key=lambda p: (order.index(p.stem) if p.stem in order else len(order), p.name))
        entries = [{"file": str(p.relative_to(folder))} for p in files]
    return [{**entry,
             "title": table_title(entry["file"]) if _is_file_name(entry.get("title") or "", entry["file"])
             else entry["title"],
             "caption": entry.get("caption") or TABLE_TITLES.get(Path(entry["file"]).stem, ("", ""))[1]}
            for entry in entries]


def _summary_values(summary: dict) -> str:
    """Every value of a summary.json (but its notes) as tables, folded: one table per block of
    per-source values (rows: sources), one key-value table for the rest."""
    parts, rest = [], []
    for key, value in summary.items():
        if key == "notes":
            continue
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            frame = pd.DataFrame([{"source": source, **dict(_flatten(row))} for source, row in value.items()])
            parts.append(f"<h4>Values per source: {_esc(key)}</h4>" + _table(frame))
        else:
            rest += _flatten(value, f"{key}.")
    if rest:
        parts.append("<h4>Other values</h4>" + _table(pd.DataFrame(rest, columns=["key", "value"]), key_value=True))
    count = sum(len(row) for block in summary.values() if isinstance(block, dict) for row in block.values()
                if isinstance(row, dict)) + len(rest)
    return (f"<details><summary>All values of summary.json ({count})</summary>{''.join(parts)}"
            f'<p class="file">summary.json</p></details>') if parts else ""


def _notes(summary) -> str:
    notes = summary.get("notes", []) if isinstance(summary, dict) else []
    boxes = "".join(f'<p class="note">{_esc(note)}</p>' for note in notes)
    if len(notes) > 4:  # many "not computed" notes would push the tables out of view
        return f"<details><summary>{len(notes)} notes: numbers not computed, and why</summary>{boxes}</details>"
    return boxes


def artifact_section(folder: Path, show_summary: bool) -> str:
    """The notes, tables, figures (and summary values, folded) of an evaluation or study folder, in its order."""
    summary = _read_json(folder / "summary.json")
    parts = [_notes(summary)]
    for entry in _table_entries(folder):
        frame = _csv(folder / entry["file"])
        body = _table(frame)
        if len(frame) > 12:  # long tables folded, so that the figures stay in view
            body = f"<details><summary>{len(frame)} rows</summary>{body}</details>"
        parts.append(f"<h3>{_esc(entry['title'])}</h3>{body}<p class=\"caption\">{_esc(entry['caption'])}</p>"
                     f'<p class="file">{_esc(entry["file"])}</p>')
    figures = _read_json(folder / "figures.json")
    for entry in figures:
        parts.append(_figure(folder / entry["file"], entry["title"], entry.get("caption", ""),
                             str(folder / "figures.json")))
    if show_summary and isinstance(summary, dict):
        parts.append(_summary_values(summary))
    return "\n".join(part for part in parts if part)


# -- the answer (first screen)

def _number(value) -> float:
    """A table or JSON value as a float; missing, null and non-numbers as NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _ci(value, low=None, high=None, digits: int = 2, missing: str = " (no interval)") -> str:
    """"1.53 [1.36, 1.63]": a value with its 95 % interval; `missing` added where there is none."""
    value, low, high = _number(value), _number(low), _number(high)
    if value != value:
        return "— (not computed)"

    def text(x):
        return f"{round(x, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.00"
    return f"{text(value)} [{text(low)}, {text(high)}]" if low == low and high == high else text(value) + missing


def _names(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _paired_verdict(row, against: str) -> str:
    """A paired comparison's verdict in words, with its Holm-level interval and adjusted p."""
    difference = _ci(row["difference_mm"], row["difference_low_mm"], row["difference_high_mm"], missing="")
    evidence = (f"paired difference {difference} mm, {_number(row['interval_level']) * 100:.1f} % interval, "
                f"Holm p = {_number(row['p_holm']):.3g}")
    verdict = row["verdict"]
    if verdict == "beats":
        return f"beats {against} ({evidence})"
    if verdict == "worse than":
        return f"worse than {against} ({evidence})"
    if verdict == "cannot tell apart from":
        return f"cannot tell apart from {against}: the paired interval holds 0 ({evidence})"
    return "no interval: cannot tell"


def _floor_rows(decomposition: pd.DataFrame, methods, column: str, label: str, gap: str = "") -> list[dict]:
    """A floor of the methods' alignment: one row when every method's is the same, else one per method."""
    values = decomposition.loc[list(methods), column].astype(float)
    shared = np.allclose(values, values.iloc[0], rtol=0, atol=1e-9, equal_nan=True)
    rows = []
    for m in (methods[:1] if shared else methods):
        d = decomposition.loc[m]
        rows.append({"": label + ("" if shared else f" ({m})"),
                     "test RMSE (mm), mean [95 % interval]": _ci(d[column], d.get(f"{column}_low"),
                                                                  d.get(f"{column}_high")),
                     "n": int(d["n"]), "reachable gap closed [95 % interval]": gap, "against the mean shape": ""})
    return rows


def _accuracy_answer(layout: DatasetLayout, methods, n_modes, draw: str = "") -> str:
    path = layout.evaluation_table("accuracy_summary")
    accuracy = _csv(path).set_index("method")
    decomposition_path = layout.evaluation_table("error_decomposition")
    decomposition = _csv(decomposition_path).set_index("method")
    methods = list(methods)
    for table, where in ((accuracy, path), (decomposition, decomposition_path)):
        missing = [m for m in methods if m not in table.index]
        if missing:
            raise ValueError(f"{where}: no row for method(s) {', '.join(missing)} (made before they were "
                             "configured: rerun evaluate)")
    for baseline in (MEAN_SHAPE, PCA_FLOOR):
        if baseline not in accuracy.index:
            raise ValueError(f"{path}: no {baseline} row (needed by the report)")
    mean_shape = accuracy.loc[MEAN_SHAPE]
    paired_path = layout.evaluation_table("paired_differences")
    if not paired_path.is_file():
        raise ValueError(f"{paired_path}: missing (an evaluation made before paired comparisons: rerun evaluate)")
    paired = _csv(paired_path).set_index(["method", "against"])
    rmse_column, gap_column = "test RMSE (mm), mean [95 % interval]", "reachable gap closed [95 % interval]"
    rows = []
    for m in methods:
        a, d = accuracy.loc[m], decomposition.loc[m]
        if (m, MEAN_SHAPE) not in paired.index:
            raise ValueError(f"{paired_path}: no comparison of {m} with the mean shape (rerun evaluate)")
        rows.append({"": m, rmse_column: _ci(a["rmse_mm"], a["rmse_low_mm"], a["rmse_high_mm"]), "n": int(a["n"]),
                     gap_column: _ci(d["reachable_gap_closed"], d.get("reachable_gap_closed_low"),
                                     d.get("reachable_gap_closed_high")),
                     "against the mean shape": _paired_verdict(paired.loc[(m, MEAN_SHAPE)], "the mean shape")})
    modes = f"{n_modes}-mode " if n_modes not in (None, "") else ""
    rows.append({"": "mean shape (baseline: a predictor that learnt nothing)",
                 rmse_column: _ci(mean_shape["rmse_mm"], mean_shape["rmse_low_mm"], mean_shape["rmse_high_mm"]),
                 "n": int(mean_shape["n"]), gap_column: "0 by definition", "against the mean shape": ""})
    if "mean_shape_aligned_mm" in decomposition:
        # a method that aligns the scan itself has its own mean-shape baseline: the mean shape at its pose
        own = _floor_rows(decomposition, methods, "mean_shape_aligned_mm", "mean shape through the method's alignment")
        rows += own if len(own) > 1 else []
    rows += _floor_rows(decomposition, methods, "pca_floor_aligned_mm",
                        f"reachable floor: {modes}PCA of the true shape through the method's alignment",
                        gap="1 by definition")
    rows += _floor_rows(decomposition, methods, "true_shape_aligned_mm",
                        "the true shape through the method's alignment (what the alignment alone costs)")
    floor = accuracy.loc[PCA_FLOOR]
    rows.append({"": f"PCA floor with the true pose ({modes}PCA, no alignment error)",
                 rmse_column: _ci(floor["rmse_mm"], floor["rmse_low_mm"], floor["rmse_high_mm"]),
                 "n": int(floor["n"]), gap_column: "", "against the mean shape": ""})

    verdicts = {m: rows[k]["against the mean shape"] for k, m in enumerate(methods)}
    better = [m for m in methods if verdicts[m].startswith("beats")]
    worse = [m for m in methods if verdicts[m].startswith("worse")]
    unclear = [m for m in methods if m not in better and m not in worse]
    ms_text = _ci(mean_shape["rmse_mm"], mean_shape["rmse_low_mm"], mean_shape["rmse_high_mm"])
    sentences = [f"The mean shape, a predictor that learnt nothing, scores {ms_text} mm on these "
                 f"n = {int(mean_shape['n'])} test scans" + (f" (test draw: {draw})." if draw else ".")]
    if all(verdicts[m].startswith("no interval") for m in methods):
        sentences.append("Without intervals (fewer than 2 test subjects) the report cannot tell whether any method "
                         "beats the mean shape.")
    elif not better:
        sentences.append("No method beats the mean shape here: no method's paired difference from it has an "
                         "interval below 0.")
    else:
        sentences.append(f"{_names(better)} {'beats' if len(better) == 1 else 'beat'} it: the paired difference "
                         f"on the same scans has {'its interval' if len(better) == 1 else 'intervals'} below 0 "
                         "(Holm-adjusted over every comparison shown).")
    if unclear and better:
        sentences.append(f"{_names(unclear)} cannot be told apart from the mean shape: the paired interval holds 0.")
    if worse:
        sentences.append(f"{_names(worse)} {'is' if len(worse) == 1 else 'are'} worse than the mean shape "
                         "(paired interval above 0).")
    between = [f"{a} beats {b}" if r["verdict"] == "beats" else f"{b} beats {a}"
               for (a, b), r in paired.iterrows() if b in methods and r["verdict"] in ("beats", "worse than")]
    if len(methods) > 1:
        sentences.append("Between methods: " + ("; ".join(between) + "; no other pair can be told apart."
                                                if between else "no pair can be told apart (every paired interval "
                                                "holds 0)."))
    gaps = decomposition.loc[methods, "reachable_gap_closed"].astype(float)
    if gaps.notna().any():
        best = gaps.idxmax()
        reachable = decomposition.loc[best]
        reach, alone = ([reachable.get(f"{key}{end}") for end in ("", "_low", "_high")]
                        for key in ("pca_floor_aligned_mm", "true_shape_aligned_mm"))
        floor = (f"A {n_modes or ''}-mode PCA of the true shape through the alignment scores {_ci(*reach)} mm (the "
                 f"reachable floor; the true shape itself through the alignment {_ci(*alone)} mm)")
        gap = _ci(gaps[best], reachable.get("reachable_gap_closed_low"), reachable.get("reachable_gap_closed_high"),
                  missing="")
        if gaps[best] > 0:
            floor += f"; the closest, {best}, closed {gap} of the gap from the mean shape (0) to that floor (1)."
        else:
            floor += (f"; no method closed any of the gap from the mean shape (0) to that floor (1): the closest, "
                      f"{best}, scores {gap}.")
        sentences.append(floor)
    if "world_gap_closed" in decomposition:
        def term(row, key, missing=" (no interval)"):
            return _ci(*(row.get(f"{key}{end}") for end in ("", "_low", "_high")), missing=missing)

        first = decomposition.loc[methods[0]]
        world = [f"{m} {term(decomposition.loc[m], 'world_rmse_mm')} mm (world gap closed "
                 f"{term(decomposition.loc[m], 'world_gap_closed', missing='')})" for m in methods]
        sentences.append(f"In the world frame, free of the alignment, the mean shape scores "
                         f"{term(first, 'world_mean_shape_mm')} mm and the PCA floor "
                         f"{term(first, 'world_pca_floor_mm')} mm; the networks: {'; '.join(world)}.")
    return ("<h3>Test accuracy of every method beside the baselines</h3>"
            f"<p>{_esc(' '.join(sentences))}</p>" + _table(pd.DataFrame(rows))
            + '<p class="caption">Scan-frame RMSE (mm, paper eq. 12) over the test subjects with its '
            f"{LEVEL * 100:g} % bootstrap interval (percentile, {RESAMPLES} resamples of the subjects) and n. A "
            "method beats another only when their paired difference on the same scans has its interval below 0, "
            "at the level of the Holm step that decided it (every method against the mean shape and every pair "
            "of methods form the family: the Evaluation section's paired differences). "
            "Reachable gap closed: 0 is the mean shape through the method's alignment, 1 the reachable floor (a "
            "PCA model of the true shape after that alignment). The true shape through the alignment is what the "
            "alignment alone costs, not a floor: scan-frame errors of alignment and network add roughly in "
            "quadrature, and a network that followed a misaligned crop could beat it. The world-frame gap (mean "
            "shape 0, PCA floor 1) is the network's own. Details: the Evaluation section.</p>"
            f'<p class="file">{_esc(path.relative_to(layout.root))}, '
            f"{_esc(decomposition_path.relative_to(layout.root))}, {_esc(paired_path.relative_to(layout.root))}</p>")


def _headline_sentence(module: str, block: dict, missing: str) -> str:
    """The study's headline in words (`missing`: what a number without an interval gets)."""
    def interval(source, key):
        row = block.get(source, {})
        base = key.removesuffix("_mean")
        return _ci(row.get(key), row.get(f"{base}_low"), row.get(f"{base}_high"), missing=missing)

    methods = [s for s in block if not s.startswith("ground_truth") and isinstance(block[s], dict)]
    if module == "metopic":
        if "ground_truth" not in block:
            return ""
        n = block["ground_truth"]
        text = (f"Severity separates metopic from control subjects with AUC {interval('ground_truth', 'auc')} on "
                f"the ground-truth shapes (n = {n.get('n_scored', '?')} test subjects, {n.get('n_metopic', '?')} "
                f"metopic); from the predictions: " + "; ".join(f"{m} {interval(m, 'auc')}" for m in methods) + ". ")
        if all(np.isnan(_number(block[s].get("pearson"))) for s in ["ground_truth", *methods]):
            return text + "The correlation with the experts' severity was not computed (the study's notes say why)."
        return (text + f"Correlation with the experts' severity (Pearson r, n = {n.get('n_rated', '?')} rated): "
                f"ground truth {interval('ground_truth', 'pearson')}"
                + "".join(f"; {m} {interval(m, 'pearson')}" for m in methods) + ".")
    if module == "femur":
        reference = "ground_truth_all" if "ground_truth_all" in block else "ground_truth"
        if reference not in block:
            return ""
        n = block[reference]
        text = (f"On the ground truth of {'all' if reference == 'ground_truth_all' else 'the test'} subjects "
                f"(n = {n.get('n_cam', '?')} cam, {n.get('n_control', '?')} control) the cam-minus-control shape "
                f"difference peaks at {interval(reference, 'peak_difference_mm')} mm")
        if n.get("n_significant_points") is not None:
            text += f", with {n['n_significant_points']} points differing at q < 0.05"
        correlations = [f"{m} {interval(m, 'map_correlation')}" for m in methods if "map_correlation" in block[m]]
        if correlations:
            text += ("; on the test subjects the methods' difference maps correlate with the ground truth's by "
                     + "; ".join(correlations))
        return text + "."
    if module == "left_atrium":
        sources = [s for s in block if "mlp_accuracy_mean" in block[s]]
        if not sources:
            return ""
        nir = interval(sources[0], "nir_accuracy")
        above = [s for s in sources if _number(block[s].get("mlp_binomial_p")) < 0.05]
        text = (f"AF recurrence predicted from shape (MLP test accuracy, n = {block[sources[0]].get('n_test', '?')} "
                f"test subjects) against the no-information rate {nir} (always answering the test set's most "
                f"frequent class): "
                + "; ".join(f"{SOURCE_LABELS.get(s, s)} {interval(s, 'mlp_accuracy_mean')}" for s in sources) + ". ")
        if not any("mlp_binomial_p" in block[s] for s in sources):
            return text  # a summary from before the test: no verdict rather than a wrong one
        if above:
            return text + (f"Only {_names(SOURCE_LABELS.get(s, s) for s in above)} beat the no-information rate "
                           "(one-sided exact binomial test of the MLP seed ensemble's accuracy, p < 0.05).")
        return text + ("No source's MLP beats the no-information rate (one-sided exact binomial test, p < 0.05): "
                       "on this test set the shapes carry no demonstrated recurrence information.")
    return ""


def _study_answer(study: str | None, study_dir: Path) -> str:
    heading = "<h3>Clinical study: headline</h3>"
    if study == "none":
        return "<p>No clinical study was configured for this dataset (config <code>study: none</code>).</p>"
    summary = _read_json(study_dir / "summary.json")
    module = STUDIES[study].module if study in STUDIES else next((k for k in STUDY_HEADLINES if k in summary), None)
    title = STUDIES[study].title if study in STUDIES else (study or "the anatomy's study")
    block = summary.get(module) if module else None
    spec = STUDY_HEADLINES.get(module)
    if not spec or not isinstance(block, dict) or not block:
        return (heading + f"<p>{_esc(title)}: the study's summary.json has no headline numbers the report knows; "
                "its tables are in the Clinical study section.</p>")
    metrics = [(key, label, digits) for key, label, digits in spec["metrics"]
               if any(isinstance(row, dict) and key in row for row in block.values())]
    if not metrics:
        return (heading + f"<p>{_esc(title)}: none of the headline numbers ("
                + _esc(", ".join(key for key, _, _ in spec["metrics"])) + ") is in the study's summary.json.</p>")
    with_interval = any(f"{key.removesuffix('_mean')}_low" in row for row in block.values() if isinstance(row, dict)
                        for key, _, _ in metrics)
    missing = " (no interval)" if with_interval else ""  # else said once, in the caption
    rows = []
    for source, row in block.items():
        if not isinstance(row, dict) or not any(key in row for key, _, _ in metrics):
            continue  # e.g. a method with a latent swim only
        line = {"source": SOURCE_LABELS.get(source, source)}
        for key, label, digits in metrics:
            base = key.removesuffix("_mean")
            line[label] = _ci(row.get(key), row.get(f"{base}_low"), row.get(f"{base}_high"), digits,
                              missing=missing if digits else "") if key in row else "—"
        line["n"] = ", ".join(f"{row[key]} {word}" for key, word in spec["n"] if row.get(key) is not None)
        rows.append(line)
    sentence = _headline_sentence(module, block, missing)
    caption = ("Values with their 95 % bootstrap interval where the study gives one; — (not computed): undefined "
               "on these data (the study's notes say why). Details: the Clinical study section.")
    if not with_interval:
        caption = "The study gives no interval for these numbers. " + caption
    return (heading + f"<p><b>{_esc(title[:1].upper() + title[1:])}.</b> {_esc(sentence)}</p>"
            + _table(pd.DataFrame(rows)) + f'<p class="caption">{_esc(caption)}</p>'
            + f'<p class="file">{_esc(study_dir.name)}/summary.json</p>')


def _flagged_answer(layout: DatasetLayout, methods) -> str:
    """A line on the first screen when test registrations, which the registered-crop methods start from, were
    flagged as failed ('' when none was, or no method uses them)."""
    from .methods import LOCALIZES, get

    registered = [m for m in methods if not get(m).has(LOCALIZES)]
    data = _registration_record(layout.preprocessed("test"))
    flagged = [str(i) for i, warning in zip(data["ids"], data["registration_warning"]) if warning]
    if not flagged or not registered:
        return ""
    return (f'<p class="note">The registration of {len(flagged)} of the {len(data["ids"])} test scans was flagged '
            f"as failed ({_esc(', '.join(flagged))}); {_esc(_names(registered))} start from it, so their errors on "
            "these scans are the registration's, not the network's. See Alignment of the test scans.</p>")


def _answer(layout: DatasetLayout, methods, study: str | None, study_dir: Path, evaluation: dict,
            draw: str = "") -> str:
    return ('<div class="answer">' + _accuracy_answer(layout, methods, evaluation.get("n_modes"), draw)
            + _flagged_answer(layout, methods) + _study_answer(study, study_dir) + "</div>")


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

def build_report(dataset_dir, dataset: str, settings: dict, methods, out_path, study_dir=None,
                 landmark_methods=()) -> None:
    """Write results/{dataset}/report.html from the dataset's artifacts (every one must exist); the shape
    methods' (`methods`) and, in their own section, the landmark methods' (`landmark_methods`)."""
    layout = DatasetLayout(dataset_dir)
    study_dir = Path(study_dir) if study_dir else layout.study_dir
    cohort = _read_json(layout.cohort_report)
    study = cohort.get("study")  # "none": no study was configured, no study section
    evaluation = _read_json(layout.evaluation_summary)
    cards = {v: _read_json(layout.model_card(v)) for v in methods}
    sections = {
        ANSWER: _answer(layout, methods, study, study_dir, evaluation, headline_draw(settings)),
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
    if landmark_methods:
        sections[LANDMARKS_SECTION] = _landmarks(layout, landmark_methods)
    names = [name for name in SECTIONS if name in sections]
    nav = "".join(f'<li><a href="#{_anchor(name)}">{_esc(name)}</a></li>' for name in names)
    section = {name: f'<section id="{_anchor(name)}"><h2>{_esc(name)}</h2>\n{sections[name]}</section>'
               for name in names}
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>DeepSSM report: {_esc(dataset)}</title><style>{STYLE}</style></head><body>"
            f"<h1>DeepSSM report: {_esc(dataset)} ({_esc(cohort.get('anatomy', ''))})</h1>\n"
            f"{section[ANSWER]}\n"  # the first screen: the answer, before the contents
            f"<p>Made by the DeepSSM workflow from the artifacts under <code>{_esc(layout.root)}</code>; it opens "
            f"offline (figures embedded). Method: Bhalodia et al., DeepSSM: a blueprint for image-to-shape deep "
            f"learning models, MedIA 2024.</p><nav><ol>{nav}</ol></nav>\n"
            + "\n".join(section[name] for name in names if name != ANSWER) + "\n</body></html>\n")
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
    sizes.append(("test draw", headline_draw(settings)))
    sizes += [("correspondence points", cohort.get("n_points", "")),
              ("PCA modes (shape space: PCA layers, PCA floor)", evaluation.get("n_modes", "")),
              ("augmented samples", settings.get("augmentation", {}).get("n_samples", "")),
              ("network input", " x ".join(map(str, grid["size"])) + " voxels of "
               + " x ".join(f"{s:g}" for s in grid["spacing"]) + " mm")]
    return (_table(pd.DataFrame(sizes, columns=["", "value"]), key_value=True)
            + f"<h3>Configuration of {_esc(dataset)}</h3><pre>{_esc(yaml.safe_dump(settings, sort_keys=False))}</pre>")


def headline_draw(settings: dict) -> str:
    """Which test subjects the headline was read on: a synthetic cohort's draw, or a cohort's own split."""
    synthetic = settings.get("synthetic")
    if synthetic:
        return draw_description(synthetic["seed"], synthetic.get("test_seed"))
    return "the cohort's own test split"


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


def _registration_record(test_npz: Path):
    """preprocess_test's test.npz, with its per-scan registration record."""
    if not test_npz.is_file():
        raise ValueError(f"{test_npz}: not found (needed by the report)")
    data = np.load(test_npz)
    if "registration_metric" not in data or "registration_warning" not in data:
        raise ValueError(f"{test_npz}: no registration record (made by an older version: rerun preprocess_test)")
    return data


def _alignment(test_npz: Path) -> str:
    """Per test scan: how its image-only registration went, and a warning line when any looks wrong."""
    data = _registration_record(test_npz)
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
                 "metric is far worse than the training images' own at their true pose, the rotation far outside "
                 "the training poses, or the anatomy placed farther than its radius from where every training "
                 "scan has it; a similarity fallback means the size search was rejected and the rigid "
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
             "(paper eq. 12) on crops resampled with the validation subjects' true transforms.</p>",
             _registered_validation(layout, methods)]
    for v in methods:
        parts.append(_figure(layout.loss_curve(v), f"Training curve: {v}",
                             "Training loss and validation RMSE per epoch; look for a validation curve that "
                             "flattens rather than rises after the marked (kept) epoch.", "the report"))
    return "\n".join(parts)


def _registered_validation(layout: DatasetLayout, methods) -> str:
    """The validation subjects registered as test scans are: what settings are chosen on (validation.py)."""
    path = layout.validation_file("summary.csv")
    if not path.is_file():
        return ""
    table = _csv(path)
    record = _read_json(layout.validation_file("summary.json"))
    columns = {"method": "method", "n": "n", "rmse_mm": "scan-frame RMSE (mm)", "world_rmse_mm": "world RMSE (mm)",
               "mean_shape_rmse_mm": "mean shape through the registration (mm)",
               "alignment_only_mm": "true shape through the registration (mm)"}
    left_out = record.get("left_out") or []
    return ("<h3>Registered validation: what settings are chosen on</h3>"
            + _table(table[list(columns)].rename(columns=columns))
            + '<p class="caption">The same validation subjects registered from the image alone, exactly as test '
              "scans are, and scored in the scan frame (paper eq. 12, mean over the subjects). A setting, a design "
              "or a default is chosen on these figures (and on a tuning sweep's), never on the test scans'."
            + (f" Left out: {_esc('; '.join(left_out))}." if left_out else "") + "</p>"
            + f'<p class="file">{_esc(path.relative_to(layout.root))}</p>')


def _landmarks(layout: DatasetLayout, methods) -> str:
    """Each landmark method's evaluation against the exact ground truth (`landmark_results`), its training curve."""
    rows = []
    for m in methods:
        result = _read_json(layout.landmark_evaluation("landmark_evaluation.json", m))
        registration, consistency = result["registration"], result["consistency_mm"]
        shape = result["shape_prediction"]
        rows.append({
            "method": m, "landmarks": result["n_landmarks"], "match loss": result["match_loss"],
            "test pairs (n)": registration["after_warp"]["n"],
            "match, no warp": _ci(registration["no_warp"]["mean"], registration["no_warp"]["ci_low"],
                                  registration["no_warp"]["ci_high"], digits=3),
            "match, after warp": _ci(registration["after_warp"]["mean"], registration["after_warp"]["ci_low"],
                                     registration["after_warp"]["ci_high"], digits=3),
            "after / no warp": f"{registration['ratio_of_means']:.2f}",
            f"after warp, {result['n_kept']} kept": _ci(registration["after_warp_kept"]["mean"],
                                                        registration["after_warp_kept"]["ci_low"],
                                                        registration["after_warp_kept"]["ci_high"], digits=3),
            "consistency, landmarks (mm)": _ci(consistency["landmarks"]["mean"], consistency["landmarks"]["ci_low"],
                                               consistency["landmarks"]["ci_high"]),
            "consistency, kept landmarks (mm)": _ci(consistency["kept_landmarks"]["mean"],
                                                    consistency["kept_landmarks"]["ci_low"],
                                                    consistency["kept_landmarks"]["ci_high"]),
            "consistency, fixed random points (mm)": _ci(consistency["random_points"]["mean"],
                                                         consistency["random_points"]["ci_low"],
                                                         consistency["random_points"]["ci_high"]),
            "shape scores R² (variance-weighted)": f"{shape['r2_weighted']:.2f} (n = {shape['n_test']})"})
    parts = [_table(pd.DataFrame(rows)),
             '<p class="caption">Landmarks learnt from pairs of training images alone (no particles, no '
             "segmentations), judged against the synthetic cohort's exact ground truth on the test subjects: the "
             "match loss of each test image warped onto the next by the spline through their landmarks, against no "
             "warp; consistency, the mean distance between a subject's landmarks carried to the next subject "
             "through the true correspondences (a spline through both subjects' true particles, scan frames) and "
             "the landmarks predicted there, beside the same for fixed random points of the network grid (what a "
             "network that learnt nothing gives, the registration still doing its part; lower is better); and the "
             "R² on the test subjects of a linear model from the landmarks to the true shapes' leading PCA scores. "
             "Intervals: 95 % bootstrap over the pairs.</p>"]
    for m in methods:
        if layout.landmark_study_dir(m).is_dir():
            parts.append(f"<h3>Clinical study on the landmarks of {_esc(m)}, beside the ground-truth PDM</h3>")
            parts.append(artifact_section(layout.landmark_study_dir(m), show_summary=True))
        parts.append(_figure(layout.landmark_selection("selection.png", m), f"Redundancy removal: {m}",
                             "Mean match loss of the training pairs as landmarks are dropped one at a time, each "
                             "time the one whose removal hurts the registration least (paper sec. 2.3); dashed: "
                             "the kept count, dotted: no warp.", "the report"))
        parts.append(_figure(layout.loss_curve(m), f"Training curve: {m}",
                             "Training loss and validation match loss (held-out pairs) per epoch.", "the report"))
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
