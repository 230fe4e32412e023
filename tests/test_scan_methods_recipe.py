"""The methods that find the anatomy themselves (image2ssm, base_uncropped), and progressive, the one that trains on
segmentations through the registration, on a cohort this project did not make: solids imaged by the recipe of
ShapeWorks' cohort generator (tests/shapeworks_recipe.py), scans of different sizes and origins, given by a CSV
manifest, through the real workflow to the report."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from conftest import run_snakemake
from shapeworks_recipe import generate

NETWORK = {"channels": [4, 8, 8, 16, 16], "fc_sizes": [32, 16]}


@pytest.mark.slow
def test_scan_methods_run_on_a_shapeworks_recipe_cohort(tmp_path):
    paths = generate(tmp_path / "cohort", kind="bumpy", n_train=8, n_test=3, seed=11, n_points=64, spacing=2.0)
    config = {"datasets": {"solids": {
        "source": "csv", "manifest": str(paths["manifest"]), "anatomy": "solid",
        "methods": {"image2ssm": {"segmentation_epochs": 2, "alignment_epochs": 2, "shape_epochs": 2,
                                  "seg_channels": [4, 8], "network": NETWORK},
                    "base_uncropped": {"epochs": 2, "network": NETWORK},
                    # the manifest's particles come in the recipe's order: the scales must be ordered by the workflow
                    "progressive": {"scales": [16, 32], "stage_epochs": 1, "final_epochs": 2, "head_hidden": 16,
                                    "network": NETWORK}},
        "training": {"batch_size": 4, "val_fraction": 0.3},
        "scan_grid": {"spacing_mm": 4.0},
        "preprocess": {"downsample": 2, "margin_mm": 10},  # the registration the evaluation compares with
        "augmentation": {"n_samples": 8, "n_control": 64}}}, "qc": {"subjects": 2}}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    work = tmp_path / "work"
    result = run_snakemake(work, "results/solids/report.html", "--cores", "2", "--resources", "gpu=1",
                           configfile=configfile)
    assert result.returncode == 0, result.stderr[-4000:]
    results = work / "results" / "solids"

    # every test scan predicted in its own frame, within its own field of view (the scans differ in size and
    # origin: the particles are put back through each scan's own grid)
    manifest = pd.read_csv(paths["manifest"], dtype={"id": str}).set_index("id")
    test_ids = list(manifest.index[manifest["split"] == "test"])
    for method in ("image2ssm", "base_uncropped"):
        table = pd.read_csv(results / "predictions" / method / "predictions.csv", dtype={"id": str})
        assert list(table["id"]) == test_ids
        for subject in test_ids:
            local = np.loadtxt(results / "predictions" / method / "particles" / f"{subject}_local.particles")
            image = sitk.ReadImage(str(paths["manifest"].parent / manifest.loc[subject, "image"]))
            low = np.asarray(image.GetOrigin())
            high = low + np.asarray(image.GetSpacing()) * (np.asarray(image.GetSize()) - 1)
            assert np.isfinite(local).all() and (local > low - 20).all() and (local < high + 20).all(), (method,
                                                                                                      subject)
    decomposition = pd.read_csv(results / "evaluation" / "tables" / "error_decomposition.csv").set_index("method")
    assert {"image2ssm", "base_uncropped"} <= set(decomposition.index)
    assert np.isfinite(decomposition.loc[["image2ssm", "base_uncropped"], "scan_rmse_mm"]).all()
    dice = pd.read_csv(results / "evaluation" / "tables" / "scan_segmentation_dice.csv").set_index("method")
    assert dice.loc["image2ssm", "n"] == 3
    report = (results / "report.html").read_text()
    assert "base_uncropped" in report and "progressive" in report

    # progressive: every scale measured on the test scans, and its mask against the recipe's own segmentations,
    # resampled through each test image's registration, beside the mean training mask
    predicted = pd.read_csv(results / "predictions" / "progressive" / "predictions.csv", dtype={"id": str})
    assert list(predicted["id"]) == test_ids
    scales = pd.read_csv(results / "evaluation" / "tables" / "scale_accuracy.csv")
    assert list(scales["scale_points"]) == [16, 32, 64]
    assert np.isfinite(scales["world_rmse_mm"]).all() and (scales["n"] == 3).all()
    assert np.isfinite(decomposition.loc["progressive", "scan_rmse_mm"])
    masks = pd.read_csv(results / "evaluation" / "tables" / "segmentation_dice.csv").set_index("method")
    assert masks.loc["progressive", "n"] == 3 and 0 <= masks.loc["progressive", "dice"] <= 1
    # the mean training mask overlaps the registered truth: the segmentations came through the same frame
    assert masks.loc["mean training mask", "dice"] > 0.5
