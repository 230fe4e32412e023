"""Self-supervised landmarks (methods.landmarks): trained on a small femur cohort's training images alone, then
judged against the cohort's exact ground truth (landmark_results); the workflow's landmark rules and report
section on the tiny preset; refusals of the wrong training path."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import TINY, run_snakemake, tiny_settings
from deepssm_workflow import methods
from deepssm_workflow import preprocess as pp
from deepssm_workflow.cli import main
from deepssm_workflow.inference import load_trained
from deepssm_workflow.ingest import ingest_cohort
from deepssm_workflow.landmark_results import (
    evaluate_landmarks,
    mean_pair_match,
    predict_landmarks,
    select_landmarks,
    spline_units,
)
from deepssm_workflow.methods.landmarks import pair_targets
from deepssm_workflow.synthetic.cohort import generate_cohort
from deepssm_workflow.train import train_from_artifacts, train_from_images

SUBJECTS = {"train": {"control": 10, "cam": 2}, "test": {"control": 3, "cam": 1}}
SETTINGS = {"epochs": 20, "lr": 1.0e-3, "n_landmarks": 24, "network": {"channels": [4, 8, 8, 16], "fc_size": 32}}
TRAINING = {"batch_size": 4, "val_fraction": 0.2, "seed": 0}
KEEP = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small femur cohort (12 training, 4 test subjects), preprocessed, a landmarks model trained on its
    training images alone, its landmarks and their evaluation. Returns the folder."""
    root = tmp_path_factory.mktemp("landmarks")
    generate_cohort("femur", tiny_settings("femur", subjects=SUBJECTS), root / "generated", workers=2)
    ingest_cohort({"source": "synthetic", "manifest": str(root / "generated" / "subjects.csv")}, "femur",
                  root / "cohort")
    pp.preprocess_training(root / "cohort", pp.PreprocessSettings(1.0, 5.0), root / "preprocess")
    pp.preprocess_unseen(root / "cohort", root / "preprocess", "test", root / "preprocess" / "test.npz")
    threads = torch.get_num_threads()
    try:
        train_from_images(root / "preprocess", "landmarks", {"training": TRAINING, "method": SETTINGS}, root / "model",
                          threads=2, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    select_landmarks(root / "model", root / "preprocess", root / "selection", keep=KEEP)
    predict_landmarks(root / "model", root / "preprocess", root / "landmarks", selection=root / "selection" /
                      "selection.json")
    evaluate_landmarks(root / "landmarks" / "landmarks.npz", root / "model", root / "preprocess", root / "cohort",
                       root / "evaluation")
    return root


def test_pairs_are_each_image_with_the_next():
    assert pair_targets(4).tolist() == [1, 2, 3, 0]
    assert pair_targets(2).tolist() == [1, 0]


def test_learnt_landmarks_register_held_out_pairs_and_correspond(trained):
    result = json.loads((trained / "evaluation" / "landmark_evaluation.json").read_text())
    registration, consistency = result["registration"], result["consistency_mm"]
    assert registration["after_warp"]["n"] == 4 and result["n_landmarks"] == SETTINGS["n_landmarks"]
    # the test pairs (never seen in training) match better after the learnt warp than without it
    assert registration["after_warp"]["mean"] < 0.7 * registration["no_warp"]["mean"]
    # the landmarks carry through the true correspondences better than fixed points of the grid do
    assert consistency["landmarks"]["mean"] < consistency["random_points"]["mean"]
    pairs = pd.read_csv(trained / "evaluation" / "landmark_pairs.csv")
    assert len(pairs) == 4 and np.isclose(pairs["match_after_warp"].mean(), registration["after_warp"]["mean"])
    card = json.loads((trained / "model" / "model_card.json").read_text())
    assert card["validation_measure"] == "match loss after warp" and card["n_val"] >= 2


def test_redundancy_removal_is_greedy(trained):
    selection = json.loads((trained / "selection" / "selection.json").read_text())
    count = SETTINGS["n_landmarks"]
    removed = selection["removal_order"][:count - KEEP]
    assert len(selection["kept"]) == KEEP and not set(selection["kept"]) & set(removed)
    curve = selection["curve"]
    assert [c["landmarks"] for c in curve] == list(range(count, KEEP // 2 - 1, -1))
    # the first landmark dropped is the one whose removal hurts the training pairs' registration least
    model = load_trained(trained / "model")
    settings = model.method.Settings(**model.card["settings"])
    images = torch.as_tensor(np.load(trained / "preprocess" / "train.npz")["images"]).unsqueeze(1)
    with torch.no_grad():
        units = spline_units(model, images)
        trials = [mean_pair_match(model, settings, images, units, [k for k in range(count) if k != drop])
                  for drop in range(count)]
        assert np.isclose(curve[0]["match"], mean_pair_match(model, settings, images, units, list(range(count))))
    assert selection["removal_order"][0] == int(np.argmin(trials)) and np.isclose(curve[1]["match"], min(trials))
    assert (trained / "selection" / "selection.png").stat().st_size > 10_000
    result = json.loads((trained / "evaluation" / "landmark_evaluation.json").read_text())
    assert result["n_kept"] == KEEP and result["registration"]["after_warp_kept"]["n"] == 4


def test_landmarks_of_every_subject_in_both_frames(trained):
    stored = np.load(trained / "landmarks" / "landmarks.npz")
    train, test = (np.load(trained / "preprocess" / f"{s}.npz") for s in ("train", "test"))
    assert list(stored["ids"]) == [*map(str, train["ids"]), *map(str, test["ids"])]
    assert list(stored["split"]) == ["train"] * len(train["ids"]) + ["test"] * len(test["ids"])
    assert stored["world"].shape == (16, SETTINGS["n_landmarks"], 3) and np.isfinite(stored["world"]).all()
    # the scan frame is the world frame through each subject's own image_to_world
    k = len(train["ids"])
    transform = test["image_to_world"][0]
    homogeneous = np.c_[stored["local"][k], np.ones(SETTINGS["n_landmarks"])]
    np.testing.assert_allclose((homogeneous @ transform.T)[:, :3], stored["world"][k], atol=1e-6)
    table = pd.read_csv(trained / "landmarks" / "landmarks.csv", dtype={"id": str})
    assert len(table) == 16 * SETTINGS["n_landmarks"] and table["kept"].sum() == 16 * KEEP
    assert sorted(stored["kept"]) == sorted(json.loads((trained / "selection" / "selection.json").read_text())["kept"])
    np.testing.assert_allclose(table[["world_x", "world_y", "world_z"]].to_numpy(), stored["world"].reshape(-1, 3))


def test_the_wrong_training_path_is_refused(trained, tmp_path):
    with pytest.raises(ValueError, match="learns from the training images alone.*train_from_images"):
        train_from_artifacts(trained / "cohort", trained / "preprocess", tmp_path, "landmarks",
                             {"training": TRAINING, "method": {}, "shape_space": {"n_modes": 2}}, tmp_path / "m")
    with pytest.raises(ValueError, match="learns from .*shapes.*not from the training images alone"):
        train_from_images(trained / "preprocess", "base", {"training": TRAINING, "method": {}}, tmp_path / "m")
    code = main(["train", "--preprocess-dir", str(trained / "preprocess"), "--augmentation-dir", str(tmp_path),
                 "--method", "landmarks", "--settings", json.dumps({"training": TRAINING, "method": {}}),
                 "--out-dir", str(tmp_path / "m")])
    assert code == 1 and not (tmp_path / "m").exists()
    shape_model = _shape_model(trained, tmp_path)
    with pytest.raises(ValueError, match="predicts no landmarks"):
        predict_landmarks(shape_model, trained / "preprocess", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_selection_and_missing_landmarks_are_refused_by_name(trained, tmp_path):
    with pytest.raises(ValueError, match=f"cannot keep 0 of its {SETTINGS['n_landmarks']} landmarks"):
        select_landmarks(trained / "model", trained / "preprocess", tmp_path / "selection", keep=0)
    assert not (tmp_path / "selection").exists()
    selection = tmp_path / "selection.json"
    for kept in ([], [0, 0], [SETTINGS["n_landmarks"]]):
        selection.write_text(json.dumps({"kept": kept}))
        with pytest.raises(ValueError, match="selection.json: kept landmarks .* not distinct indices"):
            predict_landmarks(trained / "model", trained / "preprocess", tmp_path / "landmarks", selection=selection)
        assert not (tmp_path / "landmarks").exists()
    # landmarks without one training subject: the evaluation names it and writes nothing
    with np.load(trained / "landmarks" / "landmarks.npz") as stored:
        arrays = {key: stored[key] for key in stored.files}
    dropped = str(arrays["ids"][1])
    keep = np.arange(len(arrays["ids"])) != 1
    np.savez(tmp_path / "landmarks.npz", **{k: v[keep] if k != "kept" else v for k, v in arrays.items()})
    with pytest.raises(ValueError, match=f"landmarks.npz: no landmarks for train subjects {dropped}$"):
        evaluate_landmarks(tmp_path / "landmarks.npz", trained / "model", trained / "preprocess",
                           trained / "cohort", tmp_path / "evaluation")
    assert not (tmp_path / "evaluation").exists()


def test_pairs_need_two_validation_images(trained, tmp_path):
    training = {**TRAINING, "val_fraction": 0.05}
    with pytest.raises(ValueError, match=r"train.npz: 1 validation image\(s\) from 12 training subjects.*at least 2"):
        train_from_images(trained / "preprocess", "landmarks", {"training": training, "method": SETTINGS},
                          tmp_path / "model", log=lambda _: None)
    assert not (tmp_path / "model").exists()


def _shape_model(trained, tmp_path):
    """A base model card and weights in a folder (a tiny one, trained for one epoch on the real shapes)."""
    from deepssm_workflow.engine import EngineSettings, train
    from deepssm_workflow.shape_space import ShapeSpace

    real, shapes = np.load(trained / "preprocess" / "train.npz"), np.load(trained / "cohort" / "shapes_train.npz")
    n = len(real["ids"])
    train("base", methods.get("base").settings({"epochs": 1, "network": {"channels": [2, 2, 2, 2, 2],
                                                                         "fc_sizes": [4, 4]}}),
          real["images"], shapes["world"], np.arange(n - 2), np.arange(n - 2, n),
          ShapeSpace(n_modes=2).fit(shapes["world"]), tmp_path / "base", engine=EngineSettings(batch_size=4),
          log=lambda _: None)
    return tmp_path / "base"


@pytest.mark.slow
def test_landmarks_through_the_workflow_beside_base(tmp_path, chromium):
    config = yaml.safe_load(TINY.read_text())
    femur = config["datasets"]["femur"]
    femur["methods"] = {"base": femur["methods"]["base"],
                        "landmarks": {"epochs": 3, "n_landmarks": 8,
                                      "network": {"channels": [4, 4, 8, 8], "fc_size": 16}}}
    config["datasets"] = {"femur": femur}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    result = run_snakemake(work, "results/femur/report.html", "--cores", "2", "--resources", "gpu=1",
                           configfile=configfile)
    assert result.returncode == 0, result.stderr[-4000:]
    results = work / "results" / "femur"
    card = json.loads((results / "models" / "landmarks" / "model_card.json").read_text())
    assert card["method"] == "landmarks" and card["validation_measure"] == "match loss after warp"
    evaluation = json.loads((results / "landmarks" / "landmarks" / "evaluation" / "landmark_evaluation.json")
                            .read_text())
    assert evaluation["n_landmarks"] == 8 and evaluation["registration"]["after_warp"]["n"] == 3
    # the shape evaluation is the shape methods' alone: no eq. 12 row for landmarks
    accuracy = pd.read_csv(results / "evaluation" / "tables" / "accuracy_summary.csv")
    assert "landmarks" not in set(accuracy.iloc[:, 0].astype(str))
    report = (results / "report.html").read_text()
    assert "Self-supervised landmarks" in report and "consistency, fixed random points (mm)" in report
    assert "Redundancy removal: landmarks" in report
    assert "Clinical study on the landmarks of landmarks" in report and "Cam-FAI deviation" in report
    assert json.loads((results / "landmarks" / "landmarks" / "selection" / "selection.json").read_text())["kept"]
    # in a real headless browser: every figure loads, and the landmarks have their own section
    from test_report import inspect_in_chromium

    page = inspect_in_chromium(chromium, results / "report.html", tmp_path)
    assert not page["broken"] and "Self-supervised landmarks" in page["sections"]
    assert any(h.startswith("Clinical study on the landmarks of landmarks") for h in page["headings"])


# -- the studies on landmark descriptors


def test_cam_fai_study_on_the_landmarks(trained, tmp_path):
    from deepssm_workflow.studies.landmark_descriptors import run_landmark_study

    summary = run_landmark_study("cam_fai", trained, trained / "landmarks" / "landmarks.npz", tmp_path / "study")
    femur = summary["femur"]["landmarks"]
    assert femur["n_landmarks"] == KEEP and femur["n_cam"] == 3 and femur["n_control"] == 13
    table = pd.read_csv(tmp_path / "study" / "tables" / "landmark_femur_group_difference.csv")
    assert len(table) == KEEP and table["q"].between(0, 1).all() and (table["q"] >= table["p"] - 1e-12).all()
    assert np.isclose(table["difference_mm"].max(), femur["peak_difference_mm"])
    assert "distance_to_lesion_mm" in table  # the generator's lesion is known for this cohort
    listing = json.loads((tmp_path / "study" / "figures.json").read_text())
    assert [(tmp_path / "study" / entry["file"]).stat().st_size > 10_000 for entry in listing] == [True]


def _cohort(tmp_path, ids_train, ids_test, columns: dict, world_train, world_test):
    from deepssm_workflow.studies.data import Cohort, Shapes

    subjects = pd.DataFrame({"id": [*ids_train, *ids_test], **columns}).set_index("id")
    return Cohort(tmp_path, subjects, Shapes(np.array(ids_train), world_train), Shapes(np.array(ids_test), world_test),
                  np.tile(np.eye(4), (len(ids_train), 1, 1)))


def test_metopic_severity_from_landmarks_separates_the_groups(tmp_path):
    """Metopic landmark configurations pulled along one direction: the severity from a model of controls alone
    must rank them above the controls and follow the PDM's severity."""
    from deepssm_workflow.studies.data import Shapes
    from deepssm_workflow.studies.landmark_descriptors import metopic

    rng = np.random.default_rng(0)
    n_train, n_test = 30, 20
    group = np.array(["control", "metopic"] * ((n_train + n_test) // 2))
    amount = np.where(group == "metopic", rng.uniform(2, 4, len(group)), 0.0)
    base = rng.normal(0, 10, (6, 3))
    shapes = base + rng.normal(0, 0.3, (len(group), 6, 3))
    shapes[:, 0, 0] += amount  # the "frontal ridge"
    ids = [f"s{i:02d}" for i in range(len(group))]
    cohort = _cohort(tmp_path, ids[:n_train], ids[n_train:], {"group": group}, shapes[:n_train], shapes[n_train:])
    out = metopic(cohort, Shapes(np.array(ids[:n_train]), shapes[:n_train]),
                  Shapes(np.array(ids[n_train:]), shapes[n_train:]), tmp_path)
    row = out.summary["landmarks"]
    assert row["auc"] > 0.9 and row["auc_low"] <= row["auc"] <= row["auc_high"] and row["n_scored"] == n_test
    assert row["pearson_with_pdm"] > 0.9  # here the PDM is the same configurations
    assert (tmp_path / "landmark_metopic_severity.png").stat().st_size > 10_000


def test_af_recurrence_from_landmarks_beats_the_no_information_rate(tmp_path):
    from deepssm_workflow.studies.data import Shapes
    from deepssm_workflow.studies.landmark_descriptors import left_atrium

    rng = np.random.default_rng(1)
    n = 120
    size = rng.normal(0, 1, n)
    recurrence = (size + rng.normal(0, 0.3, n) > 0.3).astype(int)
    shapes = rng.normal(0, 5, (8, 3)) * (1 + 0.1 * size)[:, None, None] + rng.normal(0, 0.05, (n, 8, 3))
    ids = [f"s{i:03d}" for i in range(n)]
    cohort = _cohort(tmp_path, ids[:80], ids[80:], {"af_recurrence": recurrence}, shapes[:80], shapes[80:])
    out = left_atrium(cohort, Shapes(np.array(ids[:80]), shapes[:80]), Shapes(np.array(ids[80:]), shapes[80:]),
                      tmp_path)
    row = out.summary["landmarks"]
    nir = max(recurrence[80:].mean(), 1 - recurrence[80:].mean())
    assert row["n_test"] == 40 and row["nir_accuracy"] == pytest.approx(nir)
    assert row["mlp_accuracy_mean"] > row["nir_accuracy"] + 0.1 and row["mlp_binomial_p"] < 0.05
    assert out.tables["landmark_left_atrium_recurrence"]["source"].tolist() == ["ground_truth", "landmarks"]


def test_weak_and_localised_variant_reads_the_training_segmentations(trained, tmp_path):
    """landmarks_weak: the distance maps of the training segmentations warped with the images, and the match
    looking only inside a blurred box around the anatomy; trained on the same cohort, a few epochs."""
    from deepssm_workflow.segmentations import TRAIN_FILE, preprocess_segmentations

    preprocess = tmp_path / "preprocess"
    preprocess.mkdir()
    for name in ("train.npz", "grid.json", "reference.nrrd"):
        (preprocess / name).symlink_to(trained / "preprocess" / name)
    # the preprocess grid is the training shapes' box plus 5 mm: a mask of a smaller margin has an outside here
    block = {**SETTINGS, "epochs": 3, "supervision": "distance", "localization": True, "mask_margin_mm": 1.0}
    with pytest.raises(ValueError, match="preprocess_segmentations step first"):
        train_from_images(preprocess, "landmarks_weak", {"training": TRAINING, "method": block}, tmp_path / "model")
    preprocess_segmentations(trained / "cohort", preprocess, preprocess / TRAIN_FILE)
    card = train_from_images(preprocess, "landmarks_weak", {"training": TRAINING, "method": block},
                             tmp_path / "model", log=lambda _: None)
    assert card["settings"]["supervision"] == "distance" and np.isfinite(card["val_rmse"])
    model = load_trained(tmp_path / "model")
    mask = model.model.mask[0, 0].numpy()
    segmentations = np.load(preprocess / TRAIN_FILE)["segmentations"]
    inside = (segmentations >= 128).any(0)
    # the whole anatomy of every training subject lies in the mask's plateau, and the grid's edges fall outside it
    assert mask.max() == pytest.approx(1.0) and mask[inside].min() > 0.9 and (mask < 0.1).any()
    with pytest.raises(ValueError, match="neither supervision nor localization"):
        methods.get("landmarks_weak").settings({"supervision": "none"})
