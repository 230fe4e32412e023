"""Metopic craniosynostosis severity (paper sec. 4.1, Table 2, Fig. 7).

Reference: PPCA (95 % variance subspace) of the ground-truth shapes of the training
controls. Scored: the test subjects, from the ground-truth PDM (`ground_truth`) and
from each method's predictions, so every source is scored against the same reference
on the same scans (the paper fits on 72 controls and scores the 48 others; here the
test split plays the 48, since predictions exist only there).

Per source: AUC of the severity against the diagnosis (group metopic vs control),
Pearson and Spearman correlation with the aggregated expert severity (ratings.py),
and, for synthetic cohorts, Spearman with the generator's true latent severity.

Shape fidelity. The severity is not monotone in how well a shape is reproduced: a
prediction pulled towards the control mean, or projected onto the PPCA subspace, loses
the out-of-subspace part that the small isotropic variance sigma^2 weighs heavily, and
can score a higher AUC than the ground truth. So the scores table splits each severity
into `severity_subspace` and `severity_residual` (severity^2 = subspace^2 + residual^2,
ppca.py) with `distance_from_subspace_mm`, and each source's summary adds:

  severity_error_vs_truth_mean [_low, _high]  mean |severity - the ground-truth shapes'
      severity| over the same subjects (per subject in the scores table as
      `severity_error_vs_truth`); 0 for ground_truth, > 0 for a shrunken copy
  severity_bias_vs_truth  the mean signed difference (< 0: severities shrunk)
  severity_subspace_mean, severity_residual_mean
  spearman_true_severity [_low, _high]  Spearman with the generator's latent_severity
      (`{resources_dir}/ground_truth.csv`: the trigonocephaly severity plus a little
      normal forehead taper), a check that does not trust the ground truth's own
      severity; only a synthetic cohort has it: for a real cohort these keys are left
      out and a note says so. It is blind to a uniform shrink (ranks are kept), which
      the error against the ground truth is not.

Expert ratings come from `{resources_dir}/data/ratings.csv` (subject, rater, rating)
and are aggregated by the latent-trait model; without that file an `expert_severity`
column of the subjects table (one number per subject, already aggregated) is used;
with neither, the correlations are null and a note says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..intervals import bootstrap_interval, mean_interval
from . import figures as fig
from .data import Cohort, Shapes
from .output import StudyOutput
from .ppca import PPCA
from .ratings import aggregate_ratings
from .stats import auc, pearson, spearman

VARIANCE = 0.95
GROUPS = ("control", "metopic")
TRUTH_SOURCE = "ground_truth"  # the source whose severity the others are compared with


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
    """One row per source and subject: the severity, its two parts and, where the sources
    include TRUTH_SOURCE, the absolute difference from that subject's ground-truth severity."""
    tables = []
    for source, shapes in sources.items():
        subspace, residual = ppca.mahalanobis_parts(shapes.world)
        tables.append(pd.DataFrame({
            "source": source, "id": shapes.ids, "group": group[shapes.ids].to_numpy(),
            "severity": ppca.mahalanobis(shapes.world), "severity_subspace": subspace,
            "severity_residual": residual, "distance_from_subspace_mm": ppca.distance_from_subspace(shapes.world)}))
    scores = pd.concat(tables, ignore_index=True)
    truth = scores[scores["source"] == TRUTH_SOURCE].set_index("id")["severity"]
    scores["severity_minus_truth"] = scores["severity"] - scores["id"].map(truth)
    scores["severity_error_vs_truth"] = scores["severity_minus_truth"].abs()
    return scores


def fidelity(table: pd.DataFrame, true: pd.Series | None, out: StudyOutput) -> dict:
    """Fidelity keys of one source's scores (the module docstring lists them). `true` is the
    generator's severity by subject id, None for a real cohort: its keys are then left out."""
    source = table["source"].iloc[0]
    row = {"severity_subspace_mean": float(table["severity_subspace"].mean()),
           "severity_residual_mean": float(table["severity_residual"].mean())}
    error = table["severity_error_vs_truth"].dropna()
    if len(error):  # no ground-truth row for these subjects: nothing to compare with
        row["severity_error_vs_truth_mean"] = float(error.mean())
        row["severity_error_vs_truth_low"], row["severity_error_vs_truth_high"] = mean_interval(error)
        row["severity_bias_vs_truth"] = float(table["severity_minus_truth"].mean())
    if true is not None:
        pairs = (table["severity"].to_numpy(), table["id"].map(true).to_numpy(dtype=float))
        row["spearman_true_severity"] = out.attempt(f"{source} Spearman with the true severity",
                                                    lambda: spearman(*pairs))
        row["spearman_true_severity_low"], row["spearman_true_severity_high"] = bootstrap_interval(spearman, *pairs)
    return row


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
    if truth is None:
        out.notes.append("no true severity (no {resources_dir}/ground_truth.csv with latent_severity, as for a real "
                         "cohort): spearman_true_severity left out; severity_error_vs_truth still compares each "
                         "source with the ground-truth shapes")
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
        row.update(fidelity(table, truth, out))
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
