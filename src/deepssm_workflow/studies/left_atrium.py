"""AF recurrence from left-atrium shape descriptors (paper sec. 4.3, Table 3, Fig. 12).

Descriptors, per source (a method's by its capabilities, `deepssm_workflow.methods`):
  ground_truth  PCA scores (95 % variance) of the ground-truth training shapes, for
                the training subjects and the test subjects' true shapes (pdm_scores);
  PCA_SCORES    scores in the method's own PCA layer (Base-DeepSSM): of the ground-truth
                training shapes, and predicted from each preprocessed test image;
  LATENT_CODE   the method's latent code (TL-DeepSSM: the autoencoder's g(C)) of the
                ground-truth training shapes, and predicted from each preprocessed test
                image (TL-DeepSSM: the T-flank's f(I));
  neither       pdm_scores, as for the ground truth, of the shapes it predicts.
So every classifier is trained on the training split's true shapes, as the network
was, and tested on the test split, where a deployed model sees only images.

The 10 dimensions with the largest |mean difference| between recurrence groups in
the training descriptors are kept (paper's trimming); an MLP (one hidden layer of 16,
ReLU, Adam, weight decay) is trained on the standardized trimmed descriptors for each
of several seeds (mean and sd of test accuracy), beside a ridge-penalized logistic
regression fitted by maximum likelihood with statsmodels (a calibrated probabilistic
baseline, deterministic). Brier scores measure the calibration of the predicted
probabilities.

The baseline is the no-information rate (nir_accuracy, caret's NIR): the accuracy of always
answering the test set's most frequent class, with its 95 % bootstrap interval. (The training
set's majority class, scored on the test labels, would be an unfair baseline where the two
splits' majorities differ.) Against it, for the MLP (its seed ensemble: mean probability over
seeds > 0.5) and the logistic regression: {mlp,logistic}_binomial_p, the one-sided exact
binomial test of accuracy > NIR; _balanced_accuracy, the mean of sensitivity and specificity;
_auc with _auc_low/_auc_high, a bootstrap interval stratified by class over the test subjects.
mlp_ensemble_accuracy is the accuracy those three describe.

Latent swim (Fig. 12): no-recurrence mean to recurrence mean in each LATENT_CODE method's space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels.api as sm
import torch
from torch import nn

from .. import methods
from ..inference import codes
from ..intervals import mean_interval
from ..shape_space import ShapeSpace
from . import figures as fig
from . import stats
from .data import Cohort, Shapes, trained_model
from .output import StudyOutput
from .swim import latent_swim, swim_figure

N_DIMS = 10
VARIANCE = 0.95
SEEDS = (0, 1, 2, 3, 4)
HIDDEN = 16
EPOCHS = 300
RIDGE = 0.01


def trim(train_x: np.ndarray, train_y: np.ndarray, n_dims: int = N_DIMS) -> np.ndarray:
    """Indices of the n_dims descriptor dimensions with the largest |mean difference| between classes."""
    difference = np.abs(train_x[train_y == 1].mean(0) - train_x[train_y == 0].mean(0))
    return np.argsort(-difference, kind="stable")[:min(n_dims, train_x.shape[1])]


def _standardize(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, sd = train_x.mean(0), train_x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return (train_x - mean) / sd, (test_x - mean) / sd


def mlp_probabilities(train_x, train_y, test_x, seed: int) -> np.ndarray:
    """P(recurrence) of the test descriptors from an MLP trained full-batch on the training ones."""
    torch.manual_seed(seed)
    x, t = (torch.as_tensor(a, dtype=torch.float32) for a in _standardize(train_x, test_x))
    y = torch.tensor(train_y, dtype=torch.float32)
    net = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(EPOCHS):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(net(x)[:, 0], y)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.sigmoid(net(t)[:, 0]).double().numpy()


def logistic_probabilities(train_x, train_y, test_x) -> np.ndarray:
    """Ridge-penalized logistic regression (statsmodels GLM, binomial) on standardized descriptors;
    the penalty keeps the coefficients finite when the training classes are separable."""
    x, t = _standardize(train_x, test_x)
    model = sm.GLM(train_y.astype(float), sm.add_constant(x, has_constant="add"), family=sm.families.Binomial())
    penalty = np.r_[0.0, np.full(x.shape[1], RIDGE)]  # the intercept is not penalized
    params = model.fit_regularized(alpha=penalty, L1_wt=0.0).params
    return 1.0 / (1.0 + np.exp(-(sm.add_constant(t, has_constant="add") @ params)))


def _against_nir(name: str, probability: np.ndarray, test_y: np.ndarray, notes: list | None) -> dict:
    """The subject-level yes/no answers (probability > 0.5) and the probabilities of one classifier
    against the test labels: balanced accuracy, AUC with its stratified bootstrap interval and the
    exact binomial p of its accuracy against the NIR. NaN where a number is undefined (one test class),
    with the reason in `notes`."""
    predicted = (probability > 0.5).astype(int)
    row = {f"{name}_binomial_p": stats.accuracy_binomial_p(predicted, test_y)}
    try:
        row[f"{name}_balanced_accuracy"] = stats.balanced_accuracy(predicted, test_y)
        row[f"{name}_auc"] = stats.auc(probability, test_y)
        row[f"{name}_auc_low"], row[f"{name}_auc_high"] = stats.auc_interval(probability, test_y)
    except ValueError as error:
        for key in ("balanced_accuracy", "auc", "auc_low", "auc_high"):
            row.setdefault(f"{name}_{key}", float("nan"))
        if notes is not None:
            notes.append(f"{name} balanced accuracy and AUC: not computed ({error})")
    return row


def classify(train_x, train_y, test_x, test_y, seeds=SEEDS, notes: list | None = None) -> dict:
    """Train on the training descriptors, score on the test ones (see the module docstring for the keys).

    The MLP's per-subject answer is that of its seed ensemble, the mean probability over seeds > 0.5:
    one score serves both its AUC (a ranking) and its balanced accuracy and binomial test (a threshold),
    which a majority vote over seeds could not give. mlp_accuracy_mean/_sd are over the single seeds."""
    dims = trim(train_x, train_y)
    train_x, test_x = train_x[:, dims], test_x[:, dims]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small only loses time to thread start-up and contention
    try:
        mlp = [mlp_probabilities(train_x, train_y, test_x, s) for s in seeds]
    finally:
        torch.set_num_threads(threads)
    mlp_accuracy = [float(((p > 0.5) == test_y).mean()) for p in mlp]
    ensemble = np.mean(mlp, axis=0)
    logistic = logistic_probabilities(train_x, train_y, test_x)
    # the intervals resample the test subjects: the MLP's correctness per subject is its share of seeds
    mlp_low, mlp_high = mean_interval(np.mean([(p > 0.5) == test_y for p in mlp], axis=0))
    logistic_low, logistic_high = mean_interval((logistic > 0.5) == test_y)
    # the baseline is the test set's own most frequent class: the training set's could be the rarer one here
    nir_class = int(test_y.mean() > 0.5)
    nir_low, nir_high = mean_interval(test_y == nir_class)
    return {"n_train": len(train_y), "n_test": len(test_y), "n_dims": len(dims), "dims": " ".join(map(str, dims)),
            "mlp_accuracy_mean": float(np.mean(mlp_accuracy)), "mlp_accuracy_sd": float(np.std(mlp_accuracy, ddof=1))
            if len(seeds) > 1 else 0.0, "mlp_brier": float(np.mean([((p - test_y) ** 2).mean() for p in mlp])),
            "mlp_accuracy_low": mlp_low, "mlp_accuracy_high": mlp_high,
            "mlp_ensemble_accuracy": float(((ensemble > 0.5) == test_y).mean()),
            **_against_nir("mlp", ensemble, test_y, notes),
            "logistic_accuracy": float(((logistic > 0.5) == test_y).mean()),
            "logistic_accuracy_low": logistic_low, "logistic_accuracy_high": logistic_high,
            "logistic_brier": float(((logistic - test_y) ** 2).mean()),
            **_against_nir("logistic", logistic, test_y, notes),
            "nir_accuracy": stats.no_information_rate(test_y), "nir_accuracy_low": nir_low,
            "nir_accuracy_high": nir_high, "n_seeds": len(seeds)}


def _test_images(path: Path, ids) -> np.ndarray:
    """The test subjects' preprocessed images (preprocess/test.npz), in the order of `ids`."""
    if not path.is_file():
        raise ValueError(f"{path}: the preprocessed test images an image code needs are missing")
    with np.load(path) as data:
        order = {str(i): k for k, i in enumerate(data["ids"])}
        missing = [i for i in ids if i not in order]
        if missing:
            raise ValueError(f"{path}: no preprocessed image of test subject {missing[0]}")
        return data["images"][[order[i] for i in ids]]


def descriptor_kind(source: str) -> str:
    """What a source's descriptors are (see the module docstring)."""
    if source == "ground_truth":
        return "pdm_scores"
    entry = methods.get(source)
    if entry.has(methods.LATENT_CODE):
        return "latent"
    return "pca_scores" if entry.has(methods.PCA_SCORES) else "pdm_scores"


def descriptors(cohort: Cohort, source: str, test_shapes: Shapes) -> tuple[np.ndarray, np.ndarray]:
    """(training descriptors, test descriptors) of one source (see the module docstring)."""
    if descriptor_kind(source) == "pdm_scores":
        space = ShapeSpace(variance=VARIANCE).fit(cohort.train.world)
        return space.transform(cohort.train.world), space.transform(test_shapes.world)
    trained = trained_model(cohort.dataset_dir, source)
    images = _test_images(cohort.layout.preprocessed("test"), list(test_shapes.ids))
    return (codes(trained.method, trained.model, shapes=cohort.train.world),
            codes(trained.method, trained.model, images=images))


def labels(cohort: Cohort, ids) -> np.ndarray:
    values = pd.to_numeric(pd.Series(cohort.column(ids, "af_recurrence"), index=list(ids)), errors="coerce")
    bad = values[~values.isin([0, 1])]
    if len(bad):
        raise ValueError(f"{cohort.table_path}: subject {bad.index[0]} has af_recurrence "
                         f"{cohort.subjects.loc[bad.index[0], 'af_recurrence']!r}; expected 0 or 1")
    return values.to_numpy(dtype=int)


def run(cohort: Cohort, sources: dict[str, Shapes], out_dir: Path, latent_methods=()) -> StudyOutput:
    out = StudyOutput()
    train_y = labels(cohort, cohort.train.ids)
    if train_y.min() == train_y.max():
        raise ValueError(f"{cohort.table_path}: every training subject has af_recurrence {train_y[0]}; "
                         f"a recurrence classifier needs both outcomes in the training split")
    rows = []
    for source, shapes in sources.items():
        train_x, test_x = descriptors(cohort, source, shapes)
        notes = []
        row = {"source": source, "descriptor": descriptor_kind(source),
               **classify(train_x, train_y, test_x, labels(cohort, shapes.ids), notes=notes)}
        out.notes.extend(f"{source} {note}" for note in notes)
        rows.append(row)
        out.summary[source] = {k: v for k, v in row.items() if k not in ("source", "descriptor", "dims")}
    table = pd.DataFrame(rows)
    out.tables["left_atrium_recurrence_table3"] = table
    _accuracy_figure(table, out_dir / "left_atrium_recurrence.png")
    out.figures.append({"file": "left_atrium_recurrence.png", "title": "AF recurrence prediction accuracy (Table 3)",
                        "caption": f"Test accuracy of the MLP (mean over seeds) and of logistic regression on "
                                   f"each source's 10 trimmed descriptors, with 95 % bootstrap intervals over the "
                                   f"n = {int(table['n_test'].iloc[0])} test subjects; the dashed line is the "
                                   f"no-information rate, the accuracy of always answering the test set's most "
                                   f"frequent class (its interval shaded); a bar whose interval clears it carries "
                                   f"demonstrated shape information, and the study summary's binomial p tests "
                                   f"each classifier against it."})

    swims = {}
    everyone = cohort.all
    recurrence = labels(cohort, everyone.ids) == 1
    for method in latent_methods:
        trained = trained_model(cohort.dataset_dir, method)
        swims[method] = latent_swim(trained, everyone.world[~recurrence], everyone.world[recurrence])
        out.summary.setdefault(method, {})["swim_max_displacement_mm"] = float(
            np.linalg.norm(swims[method][-1] - swims[method][0], axis=1).max())
    if swims:
        swim_figure(cohort.template_mesh(), swims, out_dir / "left_atrium_latent_swim.png")
        out.figures.append({"file": "left_atrium_latent_swim.png",
                            "title": "Latent swim, no recurrence to recurrence (TL-DeepSSM: Fig. 12)",
                            "caption": "Shapes decoded along the line from the no-recurrence to the recurrence mean "
                                       "latent code, coloured by movement along the normal; red growing on the body "
                                       "means the atrium bulges (becomes rounder) towards recurrence."})
    return out


def _accuracy_figure(table: pd.DataFrame, path: Path) -> None:
    figure, axes = fig.figure(1, 1, cell=(1.2 * len(table) + 2.0, 2.8))
    ax = axes[0, 0]
    x = np.arange(len(table))
    for offset, name, label, colour in ((-0.2, "mlp_accuracy", "MLP", "#0077bb"),
                                        (0.2, "logistic_accuracy", "logistic", "#ee7733")):
        value = table[f"{name}_mean" if name == "mlp_accuracy" else name]
        spread = np.nan_to_num(np.stack([value - table[f"{name}_low"], table[f"{name}_high"] - value]))
        ax.bar(x + offset, value, 0.4, yerr=spread, capsize=3, label=label, color=colour)
    for k, row in table.reset_index(drop=True).iterrows():
        ax.hlines(row["nir_accuracy"], k - 0.45, k + 0.45, colors="black", linestyles="dashed")
        if np.isfinite(row["nir_accuracy_low"]):
            ax.fill_between([k - 0.45, k + 0.45], row["nir_accuracy_low"], row["nir_accuracy_high"],
                            color="0.85", zorder=0)
    ax.set_xticks(x, table["source"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.legend(frameon=False)
    fig.save_figure(figure, path)
