"""What a trained LANDMARKS method (`methods.landmarks`) gives the workflow: landmarks for every subject, and
their evaluation against the cohort's exact ground truth (there is no correspondence to the shape model, so
no eq. 12 RMSE).

    select_landmarks(model_dir, preprocess_dir, out_dir)      redundancy removal: selection.json + selection.png
    predict_landmarks(model_dir, preprocess_dir, out_dir)     landmarks.npz + landmarks.csv, train and test
    evaluate_landmarks(landmarks_npz, model_dir, preprocess_dir, cohort_dir, out_dir)
        registration_gain      match loss of test pairs after the learnt warp vs no warp
        consistency            subject i's landmarks carried to subject j through the true correspondences
                               (a thin-plate spline through both subjects' true particles, scan frames), against
                               the landmarks predicted on j; baseline: fixed random points of the network grid,
                               carried alike, against the same points on j (what a network that learnt nothing
                               would give, the registration still doing its part)
        shape_prediction       how well a linear model on the landmarks (train) predicts the true shape's PCA
                               scores (test): R^2 per mode
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .atomic import staged
from .inference import load_trained, predict
from .intervals import mean_interval
from .io import apply_transform
from .methods import LANDMARKS
from .plotting import figure, save_figure
from .preprocess import load_grid
from .shape_space import ShapeSpace
from .tps import ThinPlateSpline

SPLITS = ("train", "test")
RANDOM_POINTS_SEED = 0
SHAPE_MODES = 5  # PCA modes of the true shapes the linear model is judged on
LANDMARK_COMPONENTS = 8  # principal components of the landmarks it may use: few, for ~20-100 training subjects


def _landmark_model(model_dir):
    trained = load_trained(model_dir)
    if not trained.has(LANDMARKS):
        raise ValueError(f"{model_dir}: method {trained.entry.name} predicts no landmarks (it is no LANDMARKS method)")
    return trained


def grid_to_world(grid, points: np.ndarray) -> np.ndarray:
    """Points in mm from the preprocess grid's first voxel centre (x, y, z) -> the world frame (the grid is
    axis-aligned in it)."""
    return points + np.asarray(grid.origin, dtype=np.float64)


def predict_landmarks(model_dir, preprocess_dir, out_dir, selection=None, threads: int = 1) -> pd.DataFrame:
    """Landmarks of every preprocessed subject, train and test: landmarks.npz (ids, split, world (n, L, 3),
    local (n, L, 3): the scan's frame through the subject's image_to_world; kept: the indices the redundancy
    removal kept, from `selection` (its selection.json), else all) and landmarks.csv (one row per subject and
    landmark, both frames, whether it is kept)."""
    torch.set_num_threads(max(1, threads))
    trained = _landmark_model(model_dir)
    count = trained.model.n_landmarks
    kept = np.arange(count) if selection is None else np.array(json.loads(Path(selection).read_text())["kept"])
    if kept.size == 0 or kept.min() < 0 or kept.max() >= count or len(set(kept.tolist())) != kept.size:
        raise ValueError(f"{selection}: kept landmarks {kept.tolist()} are not distinct indices of the model's {count}")
    grid = load_grid(preprocess_dir)[1]
    ids, splits, world, local = [], [], [], []
    for split in SPLITS:
        path = Path(preprocess_dir) / f"{split}.npz"
        with np.load(path) as data:
            on_grid, _ = predict(trained.method, trained.model, data["images"], batch_size=4)
            points = grid_to_world(grid, on_grid.astype(np.float64))
            if not np.isfinite(points).all():
                bad = [str(i) for i, p in zip(data["ids"], points) if not np.isfinite(p).all()]
                raise ValueError(f"{path}: landmarks not finite for subjects {', '.join(bad)}")
            ids += [str(i) for i in data["ids"]]
            splits += [split] * len(points)
            world.append(points)
            local.append(np.stack([apply_transform(np.linalg.inv(t), p)
                                   for t, p in zip(data["image_to_world"], points)]))
    world, local = np.concatenate(world), np.concatenate(local)
    n = len(world)
    table = pd.DataFrame({"id": np.repeat(ids, count), "split": np.repeat(splits, count),
                          "landmark": np.tile(np.arange(count), n), "kept": np.tile(np.isin(np.arange(count), kept), n),
                          **{f"world_{a}": world[..., k].ravel() for k, a in enumerate("xyz")},
                          **{f"local_{a}": local[..., k].ravel() for k, a in enumerate("xyz")}})
    with staged(out_dir, ["landmarks.npz", "landmarks.csv"]) as staging:
        np.savez(staging / "landmarks.npz", ids=np.array(ids), split=np.array(splits), world=world, local=local,
                 kept=kept)
        table.to_csv(staging / "landmarks.csv", index=False)
    return table


PAIR_CHUNK = 8  # pairs warped at once (memory: a few images of the grid each)
SELECTION_PAIRS = 24  # training pairs the redundancy removal judges on (its cost grows with them)


def _settings(trained):
    return trained.method.Settings(**trained.card["settings"])


def pair_matches(trained, settings, images: torch.Tensor, units: torch.Tensor, subset) -> np.ndarray:
    """Match loss of every image warped onto the next (`pairs`) through the landmarks `subset` only, per pair."""
    order = torch.as_tensor(pairs(len(images)))
    values = []
    for start in range(0, len(order), PAIR_CHUNK):
        moving, fixed = order[start:start + PAIR_CHUNK].T
        result = trained.method.warp_onto(trained.model, settings, images[moving], images[fixed],
                                          units[moving][:, subset], units[fixed][:, subset])
        values.append(result["match"].double().numpy())
    return np.concatenate(values)


def unwarped_matches(trained, settings, images: torch.Tensor) -> np.ndarray:
    """Match loss of every image against the next (`pairs`) with no warp: what the learnt warp must beat."""
    order = pairs(len(images))
    return trained.method.match(trained.model, settings, images[order[:, 0]], images[order[:, 1]]).double().numpy()


def mean_pair_match(trained, settings, images: torch.Tensor, units: torch.Tensor, subset) -> float:
    return float(pair_matches(trained, settings, images, units, subset).mean())


def spline_units(trained, images: torch.Tensor) -> torch.Tensor:
    """The model's landmarks of every image, in the spline's units."""
    return torch.cat([trained.model(images[k:k + PAIR_CHUNK]) for k in range(0, len(images), PAIR_CHUNK)])


def select_landmarks(model_dir, preprocess_dir, out_dir, keep: int | None = None, threads: int = 1,
                     max_pairs: int = SELECTION_PAIRS) -> dict:
    """Redundancy removal as the paper describes it (sec. 2.3), on pairs of training images (each with the next,
    among at most `max_pairs` of them spread over the training set; the test pairs stay for the evaluation):
    repeatedly drop the landmark whose removal raises their mean match loss least, down to `keep` (default: the
    method's kept_landmarks, else half, the paper's 100 -> 50 and 80 -> 40), and on to half of that for the
    curve. Each step tries every remaining landmark: about L^2 / 2 registrations of every pair in all, hence the
    cap. Writes selection.json (kept indices, removal order, the curve, the no-warp loss) and selection.png
    (match loss against landmark count)."""
    torch.set_num_threads(max(1, threads))
    trained = _landmark_model(model_dir)
    settings = _settings(trained)
    with np.load(Path(preprocess_dir) / "train.npz") as data:
        rows = np.unique(np.linspace(0, len(data["ids"]) - 1, min(max_pairs, len(data["ids"]))).round().astype(int))
        images = torch.as_tensor(np.asarray(data["images"][rows], dtype=np.float32)).unsqueeze(1)
    count = trained.model.n_landmarks
    keep = (settings.kept_landmarks or count // 2) if keep is None else int(keep)
    if not 1 <= keep <= count:
        raise ValueError(f"{model_dir}: cannot keep {keep} of its {count} landmarks")
    with torch.no_grad():
        units = spline_units(trained, images)
        no_warp = float(unwarped_matches(trained, settings, images).mean())
        current = list(range(count))
        curve, removed, kept = [(count, mean_pair_match(trained, settings, images, units, current))], [], None
        while len(current) > max(1, keep // 2):
            trials = [mean_pair_match(trained, settings, images, units, current[:k] + current[k + 1:])
                      for k in range(len(current))]
            best = int(np.argmin(trials))
            removed.append(current.pop(best))
            curve.append((len(current), trials[best]))
            if len(current) == keep:
                kept = list(current)
    kept = list(current) if kept is None else kept  # keep == count: nothing removed
    result = {"n_landmarks": count, "kept": kept, "removal_order": removed, "no_warp": no_warp,
              "curve": [{"landmarks": n, "match": loss} for n, loss in curve], "pairs": int(len(images)),
              "match_loss": settings.match_loss}
    fig, axes = figure(1, 1, cell=(4.5, 3.2))
    ax = axes[0][0]
    ax.plot([n for n, _ in curve], [loss for _, loss in curve], marker=".", label="after warp")
    ax.axhline(no_warp, color="0.5", linestyle=":", label="no warp")
    ax.axvline(keep, color="0.5", linestyle="--", linewidth=0.8, label=f"kept ({keep})")
    ax.set(xlabel="landmarks (besides the 8 corners)", ylabel=f"match loss ({settings.match_loss})",
           title=f"redundancy removal, {len(images)} training pairs")
    ax.invert_xaxis()
    ax.legend(frameon=False)
    with staged(out_dir, ["selection.json", "selection.png"]) as staging:
        (staging / "selection.json").write_text(json.dumps(result, indent=2) + "\n")
        save_figure(fig, staging / "selection.png")
    return result


def pairs(n: int) -> np.ndarray:
    """(n, 2) the evaluation's subject pairs: each subject with the next, the last with the first."""
    return np.stack([np.arange(n), (np.arange(n) + 1) % n], 1)


def carried_error(points_i: np.ndarray, points_j: np.ndarray, truth_i: np.ndarray, truth_j: np.ndarray) -> float:
    """Mean distance (mm) between subject i's points carried to subject j through the true correspondences (the
    spline through the true particles of i onto those of j) and subject j's own points."""
    carried = ThinPlateSpline(truth_i, truth_j)(points_i)
    return float(np.linalg.norm(carried - points_j, axis=1).mean())


def random_grid_points(grid, count: int, seed: int = RANDOM_POINTS_SEED) -> np.ndarray:
    """`count` fixed random points (world frame) uniform in the preprocess grid's box."""
    low = np.asarray(grid.origin, dtype=np.float64)
    high = low + np.asarray(grid.spacing) * (np.asarray(grid.size) - 1)
    return np.random.default_rng(seed).uniform(low, high, (count, 3))


def _summary(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    low, high = mean_interval(values)
    return {"mean": float(values.mean()), "ci_low": low, "ci_high": high, "n": int(len(values))}


def _read_npz(path) -> dict:
    """Every array of an npz, read at once and the file closed."""
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def evaluate_landmarks(landmarks_npz, model_dir, preprocess_dir, cohort_dir, out_dir) -> dict:
    """landmark_evaluation.json and landmark_pairs.csv (per test pair: match losses, carried errors)."""
    trained = _landmark_model(model_dir)
    settings = _settings(trained)
    grid = load_grid(preprocess_dir)[1]
    stored = _read_npz(landmarks_npz)
    test = _read_npz(Path(preprocess_dir) / "test.npz")
    truth = {split: _read_npz(Path(cohort_dir) / f"shapes_{split}.npz") for split in SPLITS}
    rows = {str(i): k for k, i in enumerate(stored["ids"])}
    test_ids = [str(i) for i in test["ids"]]
    if [str(i) for i in truth["test"]["ids"]] != test_ids:
        raise ValueError(f"{cohort_dir}/shapes_test.npz and {preprocess_dir}/test.npz list different test subjects")
    for split in SPLITS:  # the shape prediction reads the training subjects' landmarks too
        missing = [str(i) for i in truth[split]["ids"] if str(i) not in rows]
        if missing:
            raise ValueError(f"{landmarks_npz}: no landmarks for {split} subjects {', '.join(missing)}")

    # registration of test pairs: the learnt warp against no warp, in the method's own match loss, through all the
    # landmarks and through those the redundancy removal kept
    images = torch.as_tensor(np.asarray(test["images"], dtype=np.float32)).unsqueeze(1)
    order = pairs(len(test_ids))
    subsets = {"all": np.arange(stored["world"].shape[1]), "kept": np.asarray(stored["kept"])}
    with torch.no_grad():
        units = spline_units(trained, images)
        before = unwarped_matches(trained, settings, images)
        after = {name: pair_matches(trained, settings, images, units, subset) for name, subset in subsets.items()}

    # consistency through the true correspondences, scan frames
    local = stored["local"][[rows[i] for i in test_ids]]
    fixed = random_grid_points(grid, local.shape[1])
    fixed_local = np.stack([apply_transform(np.linalg.inv(t), fixed) for t in test["image_to_world"]])
    true_local = truth["test"]["local"]
    carried = {name: [] for name in ("all", "kept", "random_points")}
    for i, j in order:
        for name, subset in subsets.items():
            carried[name].append(carried_error(local[i][subset], local[j][subset], true_local[i], true_local[j]))
        carried["random_points"].append(carried_error(fixed_local[i], fixed_local[j], true_local[i], true_local[j]))

    prediction = shape_prediction(stored, rows, truth)
    table = pd.DataFrame({"source": [test_ids[i] for i, _ in order], "target": [test_ids[j] for _, j in order],
                          "match_no_warp": before, "match_after_warp": after["all"],
                          "match_after_warp_kept": after["kept"], "landmark_error_mm": carried["all"],
                          "kept_landmark_error_mm": carried["kept"],
                          "random_points_error_mm": carried["random_points"]})
    result = {
        "method": trained.entry.name, "match_loss": settings.match_loss, "n_landmarks": int(local.shape[1]),
        "n_kept": int(len(subsets["kept"])),
        "registration": {"no_warp": _summary(before), "after_warp": _summary(after["all"]),
                         "after_warp_kept": _summary(after["kept"]),
                         "ratio_of_means": float(after["all"].mean() / before.mean()),
                         "ratio_of_means_kept": float(after["kept"].mean() / before.mean())},
        "consistency_mm": {"landmarks": _summary(carried["all"]), "kept_landmarks": _summary(carried["kept"]),
                           "random_points": _summary(carried["random_points"]),
                           "ratio_of_means": float(np.mean(carried["all"]) / np.mean(carried["random_points"]))},
        "shape_prediction": prediction,
    }
    with staged(out_dir, ["landmark_evaluation.json", "landmark_pairs.csv"]) as staging:
        (staging / "landmark_evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
        table.to_csv(staging / "landmark_pairs.csv", index=False)
    return result


def shape_prediction(stored, rows: dict, truth: dict, modes: int = SHAPE_MODES,
                     components: int = LANDMARK_COMPONENTS) -> dict:
    """R^2 on the test subjects of a least-squares linear model from the landmarks (world frame, flattened,
    reduced to `components` principal components of the training landmarks, at most n_train - 2) to the
    true shapes' PCA scores (space of the true training shapes), per mode and variance-weighted over the
    first `modes`."""
    def features(split):
        return stored["world"][[rows[str(i)] for i in truth[split]["ids"]]].reshape(len(truth[split]["ids"]), -1)

    train_x, test_x = features("train"), features("test")
    space = ShapeSpace(n_modes=modes).fit(truth["train"]["world"])
    train_y, test_y = space.transform(truth["train"]["world"]), space.transform(truth["test"]["world"])
    centre = train_x.mean(0)
    _, _, vt = np.linalg.svd(train_x - centre, full_matrices=False)
    basis = vt[:max(1, min(components, len(train_x) - 2, vt.shape[0]))]
    design = np.column_stack([np.ones(len(train_x)), (train_x - centre) @ basis.T])
    coefficients = np.linalg.lstsq(design, train_y, rcond=None)[0]
    predicted = np.column_stack([np.ones(len(test_x)), (test_x - centre) @ basis.T]) @ coefficients
    residual = ((test_y - predicted) ** 2).sum(0)
    total = ((test_y - test_y.mean(0)) ** 2).sum(0)
    r2 = 1 - residual / total
    weights = space.variances[:modes] / space.variances[:modes].sum()
    return {"r2_per_mode": [float(v) for v in r2], "r2_weighted": float((weights * r2).sum()),
            "components": int(len(basis)), "n_train": int(len(train_x)), "n_test": int(len(test_x))}
