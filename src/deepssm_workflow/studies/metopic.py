"""Metopic craniosynostosis severity (paper sec. 4.1, Table 2, Fig. 7).

Reference: PPCA (95 % variance subspace) of the ground-truth shapes of the training
controls. Scored: the test subjects, from the ground-truth PDM (`ground_truth`) and
from each method's predictions, so every source is scored against the same reference
on the same scans (the paper fits on 72 controls and scores the 48 others; here the
test split plays the 48, since predictions exist only there).

Per source: AUC of the severity against the diagnosis (group metopic vs control),
Pearson and Spearman correlation with the aggregated expert severity (ratings.py),
and, for synthetic cohorts, Spearman with the generator's true latent severity.

Expert ratings come from `{resources_dir}/data/ratings.csv` (subject, rater, rating)
and are aggregated by the latent-trait model; without that file an `expert_severity`
column of the subjects table (one number per subject, already aggregated) is used;
with neither, the correlations are null and a note says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..intervals import bootstrap_interval
from . import figures as fig
from .data import Cohort, Shapes
from .output import StudyOutput
from .ppca import PPCA
from .ratings import aggregate_ratings
from .stats import auc, pearson, spearman

VARIANCE = 0.95
GROUPS = ("control", "metopic")


def expert_severity(cohort: Cohort, resources_dir) -> tuple[pd.Series | None, str]:
    """Aggregated expert severity per subject id, and where it came from."""
    if resources_dir is not None:
        path = Path(resources_dir) / "data" / "ratings.csv"
        if path.is_file():
            table = aggregate_ratings(pd.read_csv(path, dtype={"subject": str, "rater": str}), str(path))
            return table.set_index("subject")["latent_severity"], f"latent trait of {path}"
    if "expert_severity" in cohort.subjects.columns:
        return cohort.subjects["expert_severity"].dropna().astype(float), f"expert_severity of {cohort.table_path}"
    return None, "none"


def true_severity(resources_dir) -> pd.Series | None:
    """The synthetic generator's latent severity (only a synthetic cohort has it)."""
    path = None if resources_dir is None else Path(resources_dir) / "ground_truth.csv"
    if path is None or not path.is_file():
        return None
    table = pd.read_csv(path, dtype={"id": str})
    return table.set_index("id")["latent_severity"] if "latent_severity" in table.columns else None


def severity_scores(ppca: PPCA, sources: dict[str, Shapes], group: pd.Series) -> pd.DataFrame:
    rows = []
    for source, shapes in sources.items():
        for subject, value in zip(shapes.ids, ppca.mahalanobis(shapes.world)):
            rows.append({"source": source, "id": subject, "group": group[subject], "severity": float(value)})
    return pd.DataFrame(rows)


def run(cohort: Cohort, sources: dict[str, Shapes], out_dir: Path, resources_dir=None) -> StudyOutput:
    out = StudyOutput()
    group = cohort.subjects["group"].astype(str)
    unknown = sorted(set(group) - set(GROUPS))
    if unknown:
        raise ValueError(f"{cohort.table_path}: metopic groups are {', '.join(GROUPS)}; found {unknown[0]!r}")
    reference = cohort.train.subset(group[cohort.train.ids].to_numpy() == "control")
    ppca = PPCA(VARIANCE).fit(reference.world)
    scores = severity_scores(ppca, sources, group)
    experts, expert_origin = expert_severity(cohort, resources_dir)
    truth = true_severity(resources_dir)
    if experts is None:
        out.notes.append("no expert ratings: give {resources_dir}/data/ratings.csv (subject, rater, rating) "
                         "or an expert_severity column in the subjects table to get the correlations")
    scores["expert_severity"] = scores["id"].map(experts) if experts is not None else np.nan

    rows = []
    for source, table in scores.groupby("source", sort=False):
        rated = table.dropna(subset=["expert_severity"])
        label = (table["group"] == "metopic").astype(int)
        row = {"source": source, "n_scored": len(table), "n_metopic": int(label.sum()),
               "n_reference_controls": len(reference), "ppca_modes": ppca.n_modes,
               "ppca_explained": ppca.explained, "n_rated": len(rated),
               "pearson": out.attempt(f"{source} Pearson",
                                      lambda: pearson(rated["severity"], rated["expert_severity"])),
               "spearman": out.attempt(f"{source} Spearman",
                                       lambda: spearman(rated["severity"], rated["expert_severity"])),
               "auc": out.attempt(f"{source} AUC", lambda: auc(table["severity"], label))}
        # 95 % bootstrap intervals over the scored subjects (pairs resampled together)
        for name, statistic, samples in (("pearson", pearson, (rated["severity"], rated["expert_severity"])),
                                         ("spearman", spearman, (rated["severity"], rated["expert_severity"])),
                                         ("auc", auc, (table["severity"], label))):
            row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(statistic, *map(np.asarray, samples))
        if truth is not None:
            row["spearman_true_severity"] = out.attempt(
                f"{source} Spearman with the true severity", lambda: spearman(table["severity"], truth[table["id"]]))
        rows.append(row)
        out.summary[source] = {k: v for k, v in row.items() if k != "source"}
    out.tables["metopic_severity_table2"] = pd.DataFrame(rows)
    out.tables["metopic_severity_scores"] = scores
    out.notes.append(f"expert severity: {expert_origin}")

    template = cohort.template_mesh()
    control_mean = ppca.mean.reshape(-1, 3)
    mesh = template.warp(control_mean)
    fields, names = [], []
    for source, shapes in sources.items():
        metopic = group[shapes.ids].to_numpy() == "metopic"
        if not metopic.any():
            out.notes.append(f"{source}: no metopic subject scored, no point-wise Mahalanobis map")
            continue
        average = ppca.whiten(shapes.world[metopic]).mean(0)
        fields.append(fig.normal_component(mesh, control_mean, average))
        names.append(source)
    if fields:
        clim = fig.symmetric_range(*fields)
        images = [[fig.render(mesh, f, clim, fig.DIVERGING, view) for view in ("top", "side")] for f in fields]
        fig.panels(images, out_dir / "metopic_pointwise_mahalanobis.png", names, ["top", "side"], clim,
                   fig.DIVERGING, "whitened deviation along the normal")
        out.figures.append({"file": "metopic_pointwise_mahalanobis.png",
                            "title": "Average point-wise Mahalanobis deviation of metopic subjects (Fig. 7)",
                            "caption": "Red marks where metopic skulls bulge outward from the mean control shape "
                                       "and blue where they are drawn in, in units of control variability; look for "
                                       "a protruding frontal midline with narrowed sides (trigonocephaly) and for "
                                       "the same pattern in every row."})
    _scatter(scores, out_dir / "metopic_severity.png", experts is not None)
    out.figures.append({"file": "metopic_severity.png", "title": "Severity scores against experts and diagnosis",
                        "caption": "Each dot is a scored test subject (orange metopic, blue control); severity should "
                                   "separate the groups and, where ratings exist, rise with the expert severity."})
    return out


def _scatter(scores: pd.DataFrame, path: Path, have_experts: bool) -> None:
    sources = list(dict.fromkeys(scores["source"]))
    figure, axes = fig.figure(1, len(sources), cell=(2.8, 2.6))
    for ax, source in zip(axes[0], sources):
        table = scores[scores["source"] == source]
        color = np.where(table["group"] == "metopic", "#ee7733", "#0077bb")
        x = table["expert_severity"] if have_experts else (table["group"] == "metopic").astype(float)
        ax.scatter(x, table["severity"], c=color, s=18)
        ax.set_title(source)
        ax.set_xlabel("expert severity (latent trait)" if have_experts else "diagnosis (0 control, 1 metopic)")
        ax.set_ylabel("PPCA severity (Mahalanobis)")
    fig.save_figure(figure, path)
