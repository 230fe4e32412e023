"""The paper's studies on self-supervised landmark descriptors (Bhalodia et al., MedIA 2021, sec. 4), beside the
same study on the ground-truth PDM, on the subjects the cohort has and the landmarks of `landmark_results`
(the kept subset, world frame):

    metopic:      severity = Mahalanobis distance (PPCA, 95 % variance) from a model of the training controls'
                  landmarks only, scored on the test subjects; against the experts' severity (Pearson,
                  Spearman), the diagnosis (AUC) and the PDM's own severity score (paper: r = 0.64 with experts,
                  0.81 with the PDM's score), each with a 95 % bootstrap interval and n
    femur:        each landmark's deviation of the cam group's mean from the control mean (all subjects, the
                  paper's setting), a permutation test per landmark (BH FDR), where the most deviating landmark
                  lies against the generator's planted lesion, and the deviation mapped on the control mean mesh
    left_atrium:  AF recurrence from the landmarks' PCA scores by the same MLP as the DeepSSM study
                  (`left_atrium.classify`: trained on the training subjects, tested on the test subjects),
                  beside the PDM's scores (paper: 65.7 +- 1.3 % vs 68.3 +- 1.0 %)

    run_landmark_study(study, dataset_dir, landmarks_npz, out_dir, resources_dir=None) -> summary
writes into out_dir, all or nothing, what `run_study` writes (summary.json, tables/, figures/, figures.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import staged
from ..intervals import bootstrap_interval
from ..shape_space import ShapeSpace
from . import _nan_as_null
from . import figures as fig
from .data import Cohort, Shapes, load_cohort
from .left_atrium import classify, labels
from .metopic import GROUPS as METOPIC_GROUPS
from .metopic import VARIANCE, expert_severity, true_severity
from .output import StudyOutput
from .ppca import PPCA
from .registry import study_named
from .stats import auc, fdr, pearson, spearman

N_PERMUTATIONS = 999
SOURCE = "landmarks"


def landmark_shapes(landmarks_npz, cohort: Cohort) -> tuple[Shapes, Shapes]:
    """(train, test) Shapes of the kept landmarks (world frame), in the cohort's subject order."""
    stored = np.load(landmarks_npz)
    rows = {str(i): k for k, i in enumerate(stored["ids"])}
    kept = np.asarray(stored["kept"])
    out = []
    for shapes in (cohort.train, cohort.test):
        missing = [i for i in shapes.ids if str(i) not in rows]
        if missing:
            raise ValueError(f"{landmarks_npz}: no landmarks for subject {missing[0]}")
        world = stored["world"][[rows[str(i)] for i in shapes.ids]][:, kept]
        out.append(Shapes(np.asarray(shapes.ids), world.astype(np.float64)))
    return out[0], out[1]


def _add_figure(out: StudyOutput, figure, path: Path, title: str, caption: str) -> None:
    fig.save_figure(figure, path)
    out.figures.append({"file": path.name, "title": title, "caption": caption})


def _with_interval(row: dict, name: str, statistic, *samples) -> None:
    row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(statistic, *map(np.asarray, samples))


def metopic(cohort: Cohort, train: Shapes, test: Shapes, out_dir: Path, resources_dir=None) -> StudyOutput:
    out = StudyOutput()
    group = cohort.subjects["group"].astype(str)
    unknown = sorted(set(group) - set(METOPIC_GROUPS))
    if unknown:
        raise ValueError(f"{cohort.table_path}: metopic groups are {', '.join(METOPIC_GROUPS)}; found {unknown[0]!r}")
    controls = group[train.ids].to_numpy() == "control"
    severity = {
        "ground_truth": PPCA(VARIANCE).fit(cohort.train.world[controls]).mahalanobis(cohort.test.world),
        SOURCE: PPCA(VARIANCE).fit(train.world[controls]).mahalanobis(test.world),
    }
    experts, origin = expert_severity(cohort, resources_dir)
    truth = true_severity(resources_dir)
    label = (group[test.ids].to_numpy() == "metopic").astype(int)
    rated = np.array([experts is not None and i in experts.index for i in test.ids])
    expert = np.array([experts[i] if ok else np.nan for i, ok in zip(test.ids, rated)])
    rows = []
    for source, score in severity.items():
        row = {"source": source, "n_scored": len(score), "n_metopic": int(label.sum()),
               "n_reference_controls": int(controls.sum()), "n_rated": int(rated.sum()),
               "auc": out.attempt(f"{source} AUC", lambda: auc(score, label)),
               "pearson": out.attempt(f"{source} Pearson", lambda: pearson(score[rated], expert[rated])),
               "spearman": out.attempt(f"{source} Spearman", lambda: spearman(score[rated], expert[rated]))}
        _with_interval(row, "auc", auc, score, label)
        _with_interval(row, "pearson", pearson, score[rated], expert[rated])
        _with_interval(row, "spearman", spearman, score[rated], expert[rated])
        if source == SOURCE:  # the paper's 0.81: landmark severity against the PDM's
            pdm = severity["ground_truth"]
            row["pearson_with_pdm"] = out.attempt("landmarks vs PDM Pearson", lambda: pearson(score, pdm))
            _with_interval(row, "pearson_with_pdm", pearson, score, pdm)
        if truth is not None:
            row["spearman_true_severity"] = out.attempt(
                f"{source} Spearman with the true severity", lambda: spearman(score, truth[list(test.ids)]))
        rows.append(row)
        out.summary[source] = {k: v for k, v in row.items() if k != "source"}
    out.tables["landmark_metopic_severity"] = pd.DataFrame(rows)
    out.tables["landmark_metopic_scores"] = pd.DataFrame(
        {"id": test.ids, "group": group[test.ids].to_numpy(), "expert_severity": expert,
         "pdm_severity": severity["ground_truth"], "landmark_severity": severity[SOURCE]})
    out.notes.append(f"expert severity: {origin}")
    figure, axes = fig.figure(1, 2, cell=(3.0, 2.8))
    color = np.where(label == 1, "#ee7733", "#0077bb")
    axes[0][0].scatter(severity["ground_truth"], severity[SOURCE], c=color, s=18)
    axes[0][0].set(xlabel="PDM severity (Mahalanobis)", ylabel="landmark severity (Mahalanobis)",
                   title="landmarks vs PDM")
    axes[0][1].scatter(expert if rated.any() else label, severity[SOURCE], c=color, s=18)
    axes[0][1].set(xlabel="expert severity" if rated.any() else "diagnosis (0 control, 1 metopic)",
                   ylabel="landmark severity", title="landmarks vs experts")
    _add_figure(out, figure, out_dir / "landmark_metopic_severity.png",
                "Metopic severity from landmarks (paper Fig. 10 analogue)",
                "Each dot a test subject (orange metopic, blue control): the landmark severity should rise with the "
                "PDM's and with the experts' severity, and separate the groups.")
    return out


def femur(cohort: Cohort, train: Shapes, test: Shapes, out_dir: Path, seed: int = 0) -> StudyOutput:
    from ..synthetic.femur import CAM_WIDTH
    from .femur import GROUPS as FEMUR_GROUPS
    from .femur import planted_lesion

    out = StudyOutput()
    everyone = Shapes(np.concatenate([train.ids, test.ids]), np.concatenate([train.world, test.world]))
    group = cohort.subjects["group"].astype(str)[everyone.ids].str.lower().to_numpy()
    unknown = sorted(set(group) - set(FEMUR_GROUPS))
    if unknown:
        raise ValueError(f"{cohort.table_path}: femur groups are {', '.join(FEMUR_GROUPS)}; found {unknown[0]!r}")
    cam = group == "cam"
    difference = everyone.world[cam].mean(0) - everyone.world[~cam].mean(0)  # (L, 3)
    magnitude = np.linalg.norm(difference, axis=1)
    rng = np.random.default_rng(seed)
    exceed = np.zeros(len(magnitude))
    for _ in range(N_PERMUTATIONS):
        shuffled = rng.permutation(cam)
        null = np.linalg.norm(everyone.world[shuffled].mean(0) - everyone.world[~shuffled].mean(0), axis=1)
        exceed += null >= magnitude
    p = (exceed + 1) / (N_PERMUTATIONS + 1)
    q = fdr(p)
    control_mean = everyone.world[~cam].mean(0)
    table = pd.DataFrame({"landmark": np.arange(len(magnitude)), "difference_mm": magnitude, "p": p, "q": q,
                          **{f"control_mean_{a}": control_mean[:, k] for k, a in enumerate("xyz")}})
    peak = int(np.argmax(magnitude))
    summary = {"n_control": int((~cam).sum()), "n_cam": int(cam.sum()), "n_landmarks": len(magnitude),
               "peak_difference_mm": float(magnitude[peak]), "peak_landmark": peak,
               "n_significant_landmarks": int((q < 0.05).sum()), "min_q": float(q.min())}
    lesion, origin = planted_lesion(cohort, cohort.train.world.shape[1])
    if lesion is not None:  # the generator's bump reaches exp(-2) of its height at 2 widths from its centre
        distance = np.linalg.norm(control_mean - lesion.center, axis=1)
        table["distance_to_lesion_mm"] = distance
        near = distance <= 2 * CAM_WIDTH
        summary.update({"peak_distance_to_lesion_mm": float(distance[peak]), "n_landmarks_near_lesion": int(near.sum()),
                        "n_significant_near_lesion": int((near & (q < 0.05)).sum()),
                        "n_significant_elsewhere": int((~near & (q < 0.05)).sum()),
                        "lesion_radius_mm": 2 * CAM_WIDTH})
    out.notes.append(f"planted lesion: {origin}")
    out.summary[SOURCE] = summary
    out.tables["landmark_femur_group_difference"] = table

    # mapped on the control mean mesh: each vertex takes a Gaussian-weighted mean of the landmarks' deviations
    template = cohort.template_mesh()
    mesh = template.warp(cohort.all.world[cohort.subjects["group"].astype(str)[cohort.all.ids].str.lower().to_numpy()
                                          == "control"].mean(0))
    vertices = np.asarray(mesh.points)
    spacing = np.sort(np.linalg.norm(control_mean[:, None] - control_mean[None], axis=2), axis=1)[:, 1]
    sigma = float(np.median(spacing))
    weights = np.exp(-np.sum((vertices[:, None] - control_mean[None]) ** 2, axis=2) / (2 * sigma**2))
    field = (weights @ magnitude) / np.maximum(weights.sum(1), 1e-12)
    field[weights.max(1) < np.exp(-2)] = np.nan  # farther than 2 sigma from every landmark: no value
    clim = (0.0, float(np.nanmax(field)) if np.isfinite(field).any() else 1.0)
    images = [[fig.render(mesh, field, clim, "viridis", view) for view in ("front", "top")]]
    fig.panels(images, out_dir / "landmark_femur_deviation.png", ["landmarks"], ["front", "top"], clim, "viridis",
               "cam - control mean, mm")
    out.figures.append({"file": "landmark_femur_deviation.png",
                        "title": "Cam-FAI deviation from the control mean, from landmarks (paper Fig. 11 analogue)",
                        "caption": f"Each landmark's distance between the cam and control group means, spread on the "
                                   f"control mean mesh (Gaussian, sigma {sigma:.1f} mm, the median landmark spacing; "
                                   f"grey: no landmark within 2 sigma). The deviation should peak at the "
                                   f"anterolateral head-neck junction, where the cam lesion is."})
    return out


def left_atrium(cohort: Cohort, train: Shapes, test: Shapes, out_dir: Path) -> StudyOutput:
    out = StudyOutput()
    train_y, test_y = labels(cohort, train.ids), labels(cohort, test.ids)
    if train_y.min() == train_y.max():
        raise ValueError(f"{cohort.table_path}: every training subject has af_recurrence {train_y[0]}")
    rows = []
    for source, (fit_on, scored) in {"ground_truth": (cohort.train.world, cohort.test.world),
                                     SOURCE: (train.world, test.world)}.items():
        space = ShapeSpace(variance=VARIANCE).fit(fit_on)
        notes = []
        row = {"source": source,
               **classify(space.transform(fit_on), train_y, space.transform(scored), test_y, notes=notes)}
        out.notes.extend(f"{source} {note}" for note in notes)
        rows.append(row)
        out.summary[source] = {k: v for k, v in row.items() if k not in ("source", "dims")}
    table = pd.DataFrame(rows)
    out.tables["landmark_left_atrium_recurrence"] = table
    figure, axes = fig.figure(1, 1, cell=(3.6, 2.8))
    ax = axes[0][0]
    means = table["mlp_accuracy_mean"].to_numpy()
    errors = np.abs(np.stack([table["mlp_accuracy_low"], table["mlp_accuracy_high"]]) - means)
    ax.bar(table["source"], means, yerr=errors, color=["#0077bb", "#ee7733"], capsize=4)
    ax.axhline(table["nir_accuracy"].iloc[0], color="0.4", linestyle="--", label="no-information rate")
    ax.set(ylabel="test accuracy (MLP)", ylim=(0, 1), title=f"AF recurrence, n = {len(test_y)} test subjects")
    ax.legend(frameon=False)
    _add_figure(out, figure, out_dir / "landmark_af_recurrence.png",
                "AF recurrence from landmarks beside the PDM (paper Table 4 analogue)",
                "MLP test accuracy (mean over seeds, 95 % bootstrap interval over the test subjects) on the PDM's and "
                "on the landmarks' PCA scores; dashed: the no-information rate, the accuracy of always answering the "
                "test set's most frequent class.")
    return out


def run_landmark_study(study: str, dataset_dir, landmarks_npz, out_dir, resources_dir=None) -> dict:
    """The dataset's study (`registry` name) on the landmarks of `landmarks_npz` beside the PDM."""
    spec = study_named(study)
    cohort = load_cohort(dataset_dir)
    train, test = landmark_shapes(landmarks_npz, cohort)
    with staged(out_dir, ["figures", "tables", "figures.json", "summary.json"]) as staging:
        (staging / "figures").mkdir()
        (staging / "tables").mkdir()
        if spec.module == "metopic":
            result = metopic(cohort, train, test, staging / "figures", resources_dir)
        elif spec.module == "femur":
            result = femur(cohort, train, test, staging / "figures")
        else:
            result = left_atrium(cohort, train, test, staging / "figures")
        for name, table in result.tables.items():
            table.to_csv(staging / "tables" / f"{name}.csv", index=False)
        listing = [{**entry, "file": f"figures/{entry['file']}"} for entry in result.figures]
        (staging / "figures.json").write_text(json.dumps(listing, indent=2) + "\n")
        summary = _nan_as_null({spec.module: result.summary, "landmarks": str(landmarks_npz), "notes": result.notes})
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
