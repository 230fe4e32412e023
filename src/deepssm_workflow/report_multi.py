"""results/{dataset}/report.html of a multi-anatomy dataset (the config's `multi_anatomy`): per method and
anatomy, detection and the local and world errors beside the baselines, from evaluate_multi's files.

The first screen answers, per anatomy, whether the method beat each baseline: the paired difference of
RMSE (method minus baseline, per test scan that has the anatomy) with its 95 % bootstrap interval and n,
in words only when the interval excludes 0. Then the tables (every mean with its interval and n), the
paper's figures (box plots per anatomy, Figs 2-3; best and worst scans with their heatmaps, Fig. 4), the
training curves and what was run. Every figure is embedded: the page opens offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .atomic import replaced
from .intervals import mean_interval
from .layout import DatasetLayout
from .methods import LOCALIZES, get
from .multi_baselines import BASELINE_LABELS, baseline_name
from .report import STYLE, _anchor, _ci, _csv, _esc, _figure, _read_json, _table, code_version

# (column of per_scan.csv, its baseline's column, what the baseline is)
COMPARISONS = (
    ("local_rmse_mm", "template_at_detection_mm", "the anatomy's template placed at the detected centre"),
    ("local_rmse_mm", "template_at_true_centre_mm", "the template placed at the true centre (a perfect detector)"),
    ("world_rmse_mm", "template_world_mm", "the template's world shape (the shape known without the scan)"),
    ("local_surface_mm", "template_at_detection_surface_mm", "the anatomy's template placed at the detected centre"),
    ("world_surface_mm", "template_world_surface_mm", "the template's world shape (the shape known without the scan)"),
)
MEASURES = (("centre_error_mm", "centre error, mm"), ("local_rmse_mm", "local RMSE, mm"),
            ("local_rmse_misses_counted_mm", "local RMSE, misses counted (a miss: the template at the peak), mm"),
            ("world_rmse_misses_counted_mm", "world RMSE, misses counted (a miss: the template's world shape), mm"),
            ("template_at_detection_mm", "template at the detection, mm"),
            ("template_at_true_centre_mm", "template at the true centre, mm"),
            ("world_rmse_mm", "world RMSE, mm"), ("template_world_mm", "template's world shape, mm"),
            ("local_surface_mm", "local surface distance, mm"),
            ("template_at_detection_surface_mm", "template at the detection: surface distance, mm"),
            ("world_surface_mm", "world surface distance, mm"),
            ("template_world_surface_mm", "template's world shape: surface distance, mm"))

# the errors of the method's own particles: none where it delivered none (evaluate_multi)
PREDICTED = ("local_rmse_mm", "world_rmse_mm", "local_surface_mm", "world_surface_mm")


def paired_difference(per_scan: pd.DataFrame, anatomy: str, column: str, baseline: str) -> dict:
    """Mean over the test scans that have `anatomy` of column - baseline, its 95 % interval, n and the
    verdict in words ("beats", "worse than" or "cannot tell" from the interval)."""
    rows = per_scan[(per_scan["anatomy"] == anatomy) & per_scan["present"].astype(bool)]
    pairs = rows[[column, baseline]].to_numpy(dtype=np.float64)
    pairs = pairs[np.isfinite(pairs).all(1)]  # a scan the baseline has no value for is left out, and n says so
    if not len(pairs):  # no scan has both: e.g. the method delivered no prediction of the anatomy
        return {"n": 0, "mean": float("nan"), "low": float("nan"), "high": float("nan"),
                "verdict": "has no scan to compare with",
                "method_mean": float("nan"), "baseline_mean": float("nan")}
    difference = pairs[:, 0] - pairs[:, 1]
    low, high = mean_interval(difference)
    verdict = ("beats" if high < 0 else "worse than" if low > 0
               else "cannot tell apart from" if low == low else "no interval for")
    return {"n": len(difference), "mean": float(difference.mean()), "low": low, "high": high, "verdict": verdict,
            "method_mean": float(pairs[:, 0].mean()), "baseline_mean": float(pairs[:, 1].mean())}


def _baseline_errors(dataset_dir: Path, dataset: str, anatomies: list[str]) -> pd.DataFrame:
    """Every baseline dataset's per-scan errors (error_decomposition_per_subject), with its anatomy."""
    frames = []
    for anatomy in anatomies:
        table = DatasetLayout(dataset_dir.parent / baseline_name(dataset, anatomy)).evaluation_table(
            "error_decomposition_per_subject")
        frames.append(_csv(table).assign(anatomy=anatomy))
    return pd.concat(frames)


def flagged_registrations(dataset_dir: Path, dataset: str, anatomies: list[str]) -> dict[str, tuple[list[str], int]]:
    """Per anatomy: the test scans whose image-only registration, the first step of the registered-crop
    baselines, was flagged (`registration.register`'s warnings), and the number of test scans."""
    flagged = {}
    for anatomy in anatomies:
        data = np.load(DatasetLayout(dataset_dir.parent / baseline_name(dataset, anatomy)).preprocessed("test"))
        flagged[anatomy] = ([str(i) for i, w in zip(data["ids"], data["registration_warning"]) if w], len(data["ids"]))
    return flagged


def _registration_sentence(anatomy: str, flagged: dict, registered: list[str]) -> str:
    """What the registered-crop baselines' comparisons on `anatomy` rest on, when their registration was flagged."""
    ids, n = flagged.get(anatomy, ([], 0))
    if not ids or not registered:
        return ""
    shown = ", ".join(ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
    return (f" (the registration that {', '.join(registered)} needs was flagged as failed on {len(ids)} of its {n} "
            f"test scans: {shown}; its errors there are the registration's, not the network's)")


def with_baselines(per_scan: pd.DataFrame, baselines: pd.DataFrame
                   ) -> tuple[pd.DataFrame, list[tuple[str, str, str]]]:
    """per_scan with, per DeepSSM baseline method m, its scan-frame and world RMSE of the same scan and anatomy
    (columns m_scan_mm, m_world_mm, from `_baseline_errors`), and the comparisons they add."""
    wide = baselines.pivot_table(index=["id", "anatomy"], columns="method",
                                 values=["scan_rmse_mm", "world_rmse_mm"], aggfunc="first")
    methods = list(dict.fromkeys(baselines["method"]))
    wide.columns = [f"{m}_{'scan' if v == 'scan_rmse_mm' else 'world'}_mm" for v, m in wide.columns]
    merged = per_scan.merge(wide.reset_index(), on=["id", "anatomy"], how="left")
    comparisons = []
    for m in methods:
        label = BASELINE_LABELS.get(m, f"DeepSSM method {m}")
        comparisons += [("local_rmse_mm", f"{m}_scan_mm", f"{m}: {label}"),
                        ("world_rmse_mm", f"{m}_world_mm", f"{m}: {label}")]
    return merged, comparisons


def _detection_rows(summary: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{
        "anatomy": row["anatomy"],
        "detected (of the scans that have it)": (
            f"{_ci(row['detection_rate'], row['detection_rate_low'], row['detection_rate_high'])}"
            f" (n {int(row['n_present'])})"),
        "scans with a prediction (detected)": int(row["n_predicted"]),
        "falsely detected (of those that lack it)": (
            f"{_ci(row['false_detection_rate'], row['false_detection_rate_low'], row['false_detection_rate_high'])}"
            f" (n {int(row['n_absent'])})" if int(row["n_absent"]) else "— (no test scan lacks it)"),
        **{label: "— (none delivered)" if column in PREDICTED and not int(row["n_predicted"])
           else _ci(row[column], row[f"{column}_low"], row[f"{column}_high"]) for column, label in MEASURES},
    } for _, row in summary.iterrows()])


def _answer(method: str, per_scan: pd.DataFrame, anatomies: list[str], comparisons,
            flagged: dict | None = None, registered: list[str] | None = None) -> tuple[str, pd.DataFrame]:
    """The first screen for one method: a sentence per anatomy and the table of paired differences. `flagged`
    (`flagged_registrations`) and `registered` (the baseline methods that need the registration) add what the
    registered-crop baselines' comparisons rest on."""
    rows, sentences = [], []
    for anatomy in anatomies:
        for column, baseline, what in comparisons:
            d = paired_difference(per_scan, anatomy, column, baseline)
            rows.append({"anatomy": anatomy, "error": column.removesuffix("_mm").replace("_", " "),
                         "baseline": what, "n": d["n"], f"{method}, mm": _ci(d["method_mean"], missing=""),
                         "baseline, mm": _ci(d["baseline_mean"], missing=""),
                         "method - baseline, mm [95 % interval]": _ci(d["mean"], d["low"], d["high"]),
                         "verdict": f"{method} {d['verdict']} the baseline"})
        main = paired_difference(per_scan, anatomy, *COMPARISONS[0][:2])
        present = per_scan[(per_scan["anatomy"] == anatomy) & per_scan["present"].astype(bool)]
        verdict = (f"{method} {main['verdict']} its template at its own detection (local RMSE, paired difference "
                   f"{_ci(main['mean'], main['low'], main['high'])} mm, n {main['n']})" if main["n"]
                   else f"{method} delivered no prediction of it, so there is nothing to compare")
        sentences.append(f"{anatomy}: detected in {int(present['detected'].astype(bool).sum())} of the "
                         f"{len(present)} test scans that have it; {verdict}"
                         + _registration_sentence(anatomy, flagged or {}, registered or []))
    return "; ".join(sentences) + ".", pd.DataFrame(rows)


def build_multi_report(dataset_dir, dataset: str, settings: dict, methods, out_path) -> None:
    """Write the multi-anatomy dataset's report.html from its artifacts (every one must exist)."""
    layout = DatasetLayout(dataset_dir)
    cohort = _read_json(layout.cohort_report)
    grid = _read_json(layout.scans_grid_json)
    anatomies = list(grid["anatomies"])
    answers, sections = [], []
    # the DeepSSM baselines' errors per scan, read once for every method
    baselines = _baseline_errors(Path(dataset_dir), dataset, anatomies) if settings.get("baselines") else None
    flagged = flagged_registrations(Path(dataset_dir), dataset, anatomies) if baselines is not None else {}
    registered = ([m for m in dict.fromkeys(baselines["method"]) if not get(m).has(LOCALIZES)]
                  if baselines is not None else [])
    for method in methods:
        folder = layout.multi_evaluation_dir(method)
        per_scan, summary = _csv(folder / "per_scan.csv"), _csv(folder / "summary.csv")
        missing = sorted(set(anatomies) - set(summary["anatomy"]))
        if missing:
            raise ValueError(f"{folder / 'summary.csv'}: no row for anatomy {', '.join(missing)} of {layout.scans_dir}")
        comparisons = COMPARISONS
        if baselines is not None:
            per_scan, extra = with_baselines(per_scan, baselines)
            comparisons = COMPARISONS + tuple(extra)
        sentence, comparisons = _answer(method, per_scan, anatomies, comparisons, flagged, registered)
        answers.append(f"<p><b>{_esc(method)}</b>: {_esc(sentence)}</p>" + _table(comparisons))
        card = _read_json(layout.model_card(method))
        sections.append(
            f'<section id="{_anchor(method)}"><h2>{_esc(method)}</h2>'
            f"<h3>Detection and errors per anatomy (mean [95 % bootstrap interval] over the test scans that have "
            f"the anatomy)</h3>{_table(_detection_rows(summary))}"
            f'<p class="caption">Detected: the heatmap peak above the method\'s presence_threshold. The '
            f"prediction's errors are those of what predict-multi delivered, over the scans where the anatomy was "
            f"detected (nothing is delivered elsewhere); centre error and the templates' errors are over every "
            f"scan that has the anatomy. Centre error: the detected box centre (the heatmap's peak) against the "
            f"true particles' box centre. Local RMSE is in the scan frame (eq. 12), world RMSE after the rigid "
            f"fit onto the template's world shape.</p>"
            + _figure(folder / "rmse_boxplots.png", "Local and world RMSE per anatomy (the MASSM paper's Figs 2-3)",
                      "Box: quartiles; triangle: mean; n per panel in its title. Beside the prediction, the "
                      "template at the detected centre, at the true centre, and the template's world shape.",
                      str(folder))
            + _figure(folder / "best_worst.png", "Best and worst test scan per anatomy (the paper's Fig. 4)",
                      "A slice through the true centre, the anatomy's heatmap over it, true (green) and predicted "
                      "(red) particles near the slice.", str(folder))
            + _figure(layout.loss_curve(method), f"Training of {method}",
                      f"Training loss and validation RMSE per epoch, by phase; kept epoch "
                      f"{card.get('best_epoch', '?')}.", str(layout.model_dir(method)))
            + "</section>")
    counts = cohort.get("counts", {})
    run = pd.DataFrame([("dataset", dataset), ("anatomies", ", ".join(anatomies)),
                        ("subjects", json.dumps(counts, sort_keys=True)),
                        ("network grid", f"{'x'.join(map(str, grid['size']))} voxels of {grid['spacing_mm']:g} mm"),
                        ("particles per anatomy", grid["n_points"]), ("methods", ", ".join(methods)),
                        ("settings", json.dumps(settings, sort_keys=True)), ("code", code_version())],
                       columns=["", "value"])
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>Multi-anatomy report: {_esc(dataset)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Multi-anatomy report: {_esc(dataset)} ({_esc(', '.join(anatomies))})</h1>\n"
            f'<section id="answer" class="answer"><h2>Does it beat the baselines?</h2>'
            f"<p>Per anatomy, the paired difference of RMSE (method minus baseline) over the test scans that have "
            f"the anatomy, with its 95 % bootstrap interval: a method beats a baseline only where the interval is "
            f"below 0.</p>{''.join(answers)}</section>\n"
            f"<p>Made by the DeepSSM workflow from the artifacts under <code>{_esc(layout.root)}</code>; it opens "
            f"offline (figures embedded). Method: Ukey, Kataria, Elhabian, MASSM, ShapeMI 2024 "
            f"(deepssm_workflow.methods.massm).</p>\n"
            + "\n".join(sections)
            + f'<section id="what-was-run"><h2>What was run</h2>{_table(run, key_value=True)}</section>'
            + "\n</body></html>\n")
    with replaced(out_path) as tmp:
        Path(tmp).write_text(page, encoding="utf-8")
