"""image2ssm through the real workflow on a tiny full-field cohort: uncropped scans preprocessed without
registration, trained and predicted beside Base-DeepSSM (which registers the same scans) and the baseline
of Base-DeepSSM given the whole uncropped scan (base_uncropped) and MASSM with one anatomy per scan, each
evaluated with its own alignment, and a new scan through `predict-image --scans-dir`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import run_snakemake
from deepssm_workflow.holdout import split_by_source
from deepssm_workflow.inference import load_trained

NETWORK = {"channels": [4, 8, 8, 16, 16], "fc_sizes": [32, 16]}
CONFIG = {"datasets": {"hips": {
    "anatomy": "femur", "source": "synthetic",
    "shape_space": {"n_modes": 4},
    "training": {"batch_size": 4, "val_fraction": 0.3, "seed": 0},
    "methods": {"base": {"epochs": 2, "network": NETWORK}, "base_uncropped": {"epochs": 2, "network": NETWORK},
                "image2ssm": {"segmentation_epochs": 2, "alignment_epochs": 2, "shape_epochs": 2,
                              "seg_channels": [4, 8], "crop_spacing_mm": 6.0, "network": NETWORK},
                # MASSM with one anatomy per scan: a scan method like image2ssm, through the same rules
                "massm": {"detect_epochs": 2, "local_epochs": 2, "joint_epochs": 2, "channels": 4,
                          "fpn_channels": 4, "hidden": 16}},
    "preprocess": {"downsample": 1, "margin_mm": 5, "registration": "auto"},
    "scan_grid": {"spacing_mm": 6.0},
    "seed_spread": {"seeds": [1], "methods": ["base_uncropped"]},
    "augmentation": {"n_samples": 8, "sampler": "kde", "n_control": 64, "seed": 0},
    "synthetic": {"seed": 21, "subjects": {"train": {"control": 6, "cam": 2}, "test": {"control": 2, "cam": 1}},
                  "n_particles": 128, "spacing_mm": 3.0, "mesh_resolution_mm": 3.0,
                  "full_field": {"size_mm": 150.0, "max_rotation_deg": 45, "min_margin_mm": 5.0}},
}}}


@pytest.mark.slow
def test_image2ssm_runs_beside_base_on_uncropped_scans(tmp_path):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(CONFIG))
    work = tmp_path / "work"
    result = run_snakemake(work, "results/hips/report.html", "--cores", "2", "--resources", "gpu=1",
                           configfile=configfile)
    assert result.returncode == 0, result.stderr[-4000:]
    results = work / "results" / "hips"

    # trained on the scans and their augmentation (the 8 KDE samples as uncropped scans), not on the crops
    card = json.loads((results / "models" / "image2ssm" / "model_card.json").read_text())
    assert card["method"] == "image2ssm" and card["n_train"] + card["n_val"] == 8 + 8
    assert np.load(results / "scans" / "augmentation" / "images.npy", mmap_mode="r").shape == (8, 26, 26, 26)
    phases = pd.read_csv(results / "models" / "image2ssm" / "log.csv")["phase"].tolist()
    assert phases == ["segmentation"] * 2 + ["alignment"] * 2 + ["shape"] * 2
    scans = json.loads((results / "scans" / "grid.json").read_text())
    assert scans["size"] == [26, 26, 26]  # 150 mm scans of 3 mm voxels span 147 mm: 24.5 steps of 6 mm, rounded up

    # the uncropped baseline: its PCA layer is of the training scans' grid-frame particles (the real training
    # subjects'), and its predictions are fitted onto the mean world shape of every training row
    train_scans = np.load(results / "scans" / "train.npz")
    samples = np.load(results / "scans" / "augmentation" / "samples.npz")
    train_idx, _ = split_by_source(8, samples["source_index"], 0.3, 0)
    baseline = load_trained(results / "models" / "base_uncropped")
    pca_mean = baseline.model.pca_bias.numpy().reshape(-1, 3)
    np.testing.assert_allclose(pca_mean, train_scans["local"][train_idx[train_idx < 8]].mean(0), atol=1e-3)
    world = np.concatenate([train_scans["world"], samples["world"]])[train_idx].mean(0)
    np.testing.assert_allclose(baseline.method.training_mean(baseline.model), world, atol=1e-3)

    # predicted with no registration: no time spent registering, its own alignment kept
    test_ids = list(np.load(results / "scans" / "test.npz")["ids"])
    table = pd.read_csv(results / "predictions" / "image2ssm" / "predictions.csv", dtype={"id": str})
    assert list(table["id"]) == test_ids
    base = pd.read_csv(results / "predictions" / "base" / "predictions.csv")
    assert table["preprocess_seconds"].mean() < base["preprocess_seconds"].mean()
    alignment = np.load(results / "predictions" / "image2ssm" / "alignment.npz")
    assert list(alignment["ids"]) == test_ids

    # evaluated in the scans' frame with its own alignment: floors of its own beside base's
    decomposition = pd.read_csv(results / "evaluation" / "tables" / "error_decomposition.csv").set_index("method")
    assert {"base", "image2ssm", "base_uncropped", "massm"} <= set(decomposition.index)
    for method in ("image2ssm", "base_uncropped", "massm"):
        for column in ("scan_rmse_mm", "true_shape_aligned_mm", "mean_shape_aligned_mm"):
            assert np.isfinite(decomposition.loc[method, column])
    assert decomposition.loc["image2ssm", "true_shape_aligned_mm"] != decomposition.loc["base", "true_shape_aligned_mm"]
    aligned = pd.read_csv(results / "evaluation" / "tables" / "alignment_accuracy.csv").set_index("method")
    assert (aligned.loc[["image2ssm", "base_uncropped", "massm"], "aligned_by"] == "its own pose").all()
    assert aligned.loc["base", "aligned_by"] == "registration"
    dice = pd.read_csv(results / "evaluation" / "tables" / "scan_segmentation_dice.csv").set_index("method")
    assert 0 <= dice.loc["image2ssm", "dice"] <= 1 and dice.loc["image2ssm", "n"] == 3
    assert "base_uncropped" not in dice.index and "massm" not in dice.index  # they segment nothing
    report = (results / "report.html").read_text()
    assert "image2ssm" in report and "mean shape through the method" in report

    # a new scan from its file alone, through the command line: the workflow's own prediction
    subjects = pd.read_csv(results / "cohort" / "subjects.csv", dtype={"id": str})
    subject = subjects[subjects["split"] == "test"].iloc[0]
    cli = subprocess.run([sys.executable, "-m", "deepssm_workflow", "predict-image", "--model-dir",
                          str(results / "models" / "image2ssm"), "--scans-dir", str(results / "scans"), "--image",
                          subject["image"], "--out-prefix", str(tmp_path / "new" / "scan")],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    mine = np.loadtxt(tmp_path / "new" / "scan_local.particles")
    workflow = np.loadtxt(results / "predictions" / "image2ssm" / "particles" / f"{subject['id']}_local.particles")
    assert np.abs(mine - workflow).max() < 1e-3
    # and the two sources are not mixed up: a registered-crop model refuses --scans-dir
    wrong = subprocess.run([sys.executable, "-m", "deepssm_workflow", "predict-image", "--model-dir",
                            str(results / "models" / "base"), "--scans-dir", str(results / "scans"), "--image",
                            subject["image"], "--out-prefix", str(tmp_path / "wrong" / "scan")],
                           capture_output=True, text=True)
    assert wrong.returncode != 0 and "does not find the anatomy in an uncropped scan itself" in wrong.stderr

    # the seed spread of a method trained on the scans: the extra seed trained and predicted on the scans
    spread = run_snakemake(work, "results/hips/seeds/spread.csv", "--cores", "2", "--resources", "gpu=1",
                           configfile=configfile)
    assert spread.returncode == 0, spread.stderr[-4000:]
    rows = pd.read_csv(results / "seeds" / "spread.csv")
    assert rows["method"].tolist() == ["base_uncropped"] * 2 and rows["init_seed"].tolist() == [0, 1]
    assert np.isfinite(rows["rmse_mm"]).all() and rows["rmse_mm"].nunique() == 2
    assert (results / "seeds" / "1" / "predictions" / "base_uncropped" / "alignment.npz").is_file()
    default = pd.read_csv(results / "evaluation" / "tables" / "error_decomposition.csv").set_index("method")
    assert rows["rmse_mm"].iloc[0] == pytest.approx(default.loc["base_uncropped", "scan_rmse_mm"], rel=1e-6)
