"""End to end, every method learns something: its test RMSE beats the mean-shape predictor.

The tiny preset is too small for that (7 training femurs, 2 epochs), so this test scales
the tiny femur up just enough: 16 training femurs, 60 generated samples, 8 epochs of the
small network (TL: 300 autoencoder epochs at lr 1e-3, 8 T-flank epochs, 1 joint; Progressive
DeepSSM: scales of 32 and 64 of the 128 points, 2 epochs per coarse stage, 16 for the last). It
runs the real DAG from the synthetic cohort to predictions, the segmentation steps included.
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from conftest import TINY, run_snakemake
from deepssm_workflow.evaluate import evaluate_dataset, summarize

pytestmark = pytest.mark.slow  # real Snakemake runs of the workflow (deselect with -m 'not slow')

METHODS = ("base", "base_focal", "tl", "tl_focal", "progressive")


def accuracy_config() -> dict:
    femur = yaml.safe_load(TINY.read_text())["datasets"]["femur"]
    femur["synthetic"]["subjects"] = {"train": {"control": 12, "cam": 4}, "test": {"control": 3, "cam": 2}}
    femur["augmentation"]["n_samples"] = 60
    femur["shape_space"] = {"n_modes": 6}
    femur["training"].update(batch_size=8, val_fraction=0.2)
    tl = {"ae_epochs": 300, "ae_lr": 1e-3, "tflank_epochs": 8, "joint_epochs": 1}
    for method, block in femur["methods"].items():
        block.update(tl if "ae_epochs" in block else {"epochs": 8})
        if method.endswith("focal"):
            block["focal_percentile"] = 25
    # 16 final epochs: with 8 it beat the mean shape on one CPU and not on another (1.69 against 1.46 mm on an
    # AVX-512 one); with 16 it reaches 1.20 there
    femur["methods"]["progressive"] = {"scales": [32, 64], "stage_epochs": 2, "final_epochs": 16, "head_hidden": 32,
                                       "network": femur["methods"]["base"]["network"]}
    return {"datasets": {"femur": femur}, "qc": {"subjects": 2}}


def test_every_method_beats_the_mean_shape_predictor(tmp_path):
    config = tmp_path / "accuracy.yaml"
    config.write_text(yaml.safe_dump(accuracy_config()))
    targets = [f"results/femur/predictions/{method}/predictions.csv" for method in METHODS]
    result = run_snakemake(tmp_path, *targets, "--cores", "2", "--resources", "gpu=1", configfile=config)
    assert result.returncode == 0, result.stderr[-3000:]

    table = summarize(tmp_path / "results" / "femur", METHODS, {"n_modes": 6}).set_index("method")
    print(table.round(3).to_string())  # the numbers, for the log
    for method in METHODS:
        row = table.loc[method]
        assert row["rmse_mm"] < row["mean_shape_rmse_mm"], f"{method} does not beat the mean shape:\n{table}"
        assert row["rmse_mm"] > row["pca_floor_rmse_mm"]  # sanity: nothing beats the truncation floor

    # Progressive DeepSSM's scales and segmentation, as the evaluation measures them
    summary = evaluate_dataset(tmp_path / "results" / "femur", ["progressive"], {"n_modes": 6},
                               tmp_path / "evaluation")
    scales = pd.read_csv(tmp_path / "evaluation" / "tables" / "scale_accuracy.csv")
    print(scales.round(3).to_string())
    assert list(scales["scale_points"]) == [32, 64, 128] and (scales["n"] == 5).all()
    # the finest scale is the prediction itself: its RMSE is the decomposition's world-frame RMSE
    finest = summary["error_decomposition"]["progressive"]["world_rmse_mm"]
    assert scales["world_rmse_mm"].iloc[-1] == pytest.approx(finest, abs=1e-4)
    dice, baseline = (summary["segmentation_dice"][name] for name in ("progressive", "mean training mask"))
    print(dice, baseline)
    assert dice["n"] == baseline["n"] == 5 and dice["dice_low"] <= dice["dice"] <= dice["dice_high"]
    # a mask of the anatomy (the decoder without the mean-mask prior reached 0.58 here); whether it beats
    # the mean training mask is the evaluation's to report (here 0.90 against 0.91: it does not)
    assert dice["dice"] > 0.8 and baseline["dice"] > 0.8
