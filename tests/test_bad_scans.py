"""Bad scans and implausible predictions are refused, naming the scan, before anything is written:
the checks of `scan_checks` on their own, `deepssm-wf predict-image` on broken scan files, and
`predict` / `predict-image` on a model whose output is garbage."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from deepssm_workflow import methods
from deepssm_workflow.cli import main
from deepssm_workflow.engine import EngineSettings, train
from deepssm_workflow.ingest import ingest_cohort
from deepssm_workflow.methods.deepssm import BaseDeepSSM, TLDeepSSM
from deepssm_workflow.models import ModelConfig
from deepssm_workflow.predict import predict_split, prediction_problem
from deepssm_workflow.preprocess import PreprocessSettings, load_grid, preprocess_training
from deepssm_workflow.scan_checks import MAX_ABS_INTENSITY, ScanError, check_intensities, read_scan
from deepssm_workflow.shape_space import ShapeSpace

SMALL_NET = {"channels": [4, 8, 8, 16, 16], "fc_sizes": [32, 16]}


# ---------------------------------------------------------------- scan_checks on its own

@pytest.mark.parametrize("edit, problem", [
    (lambda a: a.__setitem__((0, 1, 2), np.nan), "1 of 60 voxels are not finite (1 NaN)"),
    (lambda a: a.__setitem__((slice(None), 0, 0), -np.inf), "3 of 60 voxels are not finite (3 inf)"),
    (lambda a: a.fill(0), "image is constant (every voxel is 0)"),
    (lambda a: a.fill(-1024), "image is constant (every voxel is -1024)"),
    (lambda a: a.__imul__(1e30), "absurd intensities (range"),
    (lambda a: a.__setitem__((1, 1, 1), -2e7), "|value| above 1e+07"),
])
def test_check_intensities_names_the_scan_and_the_problem(edit, problem):
    array = np.linspace(-1000, 3000, 60, dtype=np.float32).reshape(3, 4, 5)
    edit(array)
    with pytest.raises(ValueError) as error:
        check_intensities(array, "subject x: /data/x.nrrd")
    assert str(error.value).startswith("subject x: /data/x.nrrd: ") and problem in str(error.value), error.value
    assert isinstance(error.value, ScanError) and error.value.what == "subject x: /data/x.nrrd"


def test_check_intensities_accepts_real_ranges():
    ct = np.arange(-1024, 3072, dtype=np.int16).reshape(4, 32, 32)
    check_intensities(ct, "ct")
    check_intensities(np.linspace(0, 9e4, 60, dtype=np.float32).reshape(3, 4, 5), "mri")
    check_intensities(np.full((2, 2, 2), MAX_ABS_INTENSITY, np.float64) * np.eye(2)[0], "at the limit")
    check_intensities(np.iinfo(np.uint16).max * np.eye(3, dtype=np.uint16)[None], "16-bit")


def _write(path, array, vector=False):
    image = sitk.GetImageFromArray(np.asarray(array), isVector=vector)
    sitk.WriteImage(image, str(path))
    return path


def test_read_scan_checks_path_header_and_voxels(tmp_path, capfd):
    good = _write(tmp_path / "good.nrrd", np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    image = read_scan(good, "good")
    assert image.GetSize() == (5, 4, 3) and image.GetPixelID() == sitk.sitkInt16  # stored type kept

    series = sitk.JoinSeries([image, image])
    sitk.WriteImage(series, str(tmp_path / "series.nrrd"))
    (tmp_path / "folder.nrrd").mkdir()
    cases = {
        tmp_path / "folder.nrrd": "is a folder, not an image file",
        tmp_path / "missing.nrrd": "file not found",
        tmp_path / "series.nrrd": "image is 4D; a 3D image is needed",
        _write(tmp_path / "slice.nrrd", np.ones((4, 5), np.float32)): "image is 2D; a 3D image is needed",
        _write(tmp_path / "rgb.nrrd", np.ones((3, 4, 5, 3), np.uint8), vector=True): "image has 3 components per voxel",
        _write(tmp_path / "nan.nrrd", np.full((3, 4, 5), np.nan, np.float32)): "60 of 60 voxels are not finite",
        _write(tmp_path / "zero.nrrd", np.zeros((3, 4, 5), np.int16)): "image is constant (every voxel is 0)",
    }
    for path, problem in cases.items():
        with pytest.raises(ScanError, match="^" + re.escape(f"scan {path.name}: {problem}")):
            read_scan(path, f"scan {path.name}")
    assert "HDF5" not in capfd.readouterr().err  # a folder never reaches ITK's readers
    read_scan(tmp_path / "zero.nrrd", "a segmentation", intensities=False)  # labels are not intensities


# ---------------------------------------------------------------- a tiny trained model

@pytest.fixture(scope="module")
def trained(tiny_cohort, tmp_path_factory):
    """Tiny femur cohort, its training preprocessing, a base model trained for one epoch, and an
    `again` split (the training images, so predict needs no registration). Returns the folder."""
    root = tmp_path_factory.mktemp("bad_scans")
    ingest_cohort({"source": "synthetic", "manifest": str(tiny_cohort("femur") / "subjects.csv")}, "femur",
                  root / "cohort")
    preprocess_training(root / "cohort", PreprocessSettings(downsample=1.0, margin_mm=5.0), root / "preprocess")
    real, shapes = np.load(root / "preprocess" / "train.npz"), np.load(root / "cohort" / "shapes_train.npz")
    n = len(real["ids"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train("base", methods.get("base").settings({"epochs": 1, "network": SMALL_NET}), real["images"],
              shapes["world"], np.arange(n - 2), np.arange(n - 2, n), ShapeSpace(n_modes=4).fit(shapes["world"]),
              root / "model", engine=EngineSettings(batch_size=4), log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    np.savez(root / "preprocess" / "again.npz", ids=real["ids"], images=real["images"],
             image_to_world=real["image_to_world"], seconds=np.zeros(n))
    return root


@pytest.fixture(scope="module")
def test_scan(trained):
    subjects = pd.read_csv(trained / "cohort" / "subjects.csv")
    return subjects.loc[subjects["split"] == "test", "image"].iloc[0]


def predict_image_cli(trained, image, out_prefix, *options) -> int:
    return main(["predict-image", "--model-dir", str(trained / "model"), "--preprocess-dir",
                 str(trained / "preprocess"), "--image", str(image), "--out-prefix", str(out_prefix), *options])


def _scan_like(source, path, edit):
    image = sitk.ReadImage(str(source))
    broken = sitk.GetImageFromArray(edit(sitk.GetArrayFromImage(image).astype(np.float32)))
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(path))
    return path


def _nan_block(array):
    array[:2, :2, :2] = np.nan
    return array


BROKEN_SCANS = {
    "nan_voxels": (lambda src, p: _scan_like(src, p, _nan_block), "8 of "),
    "all_zero": (lambda src, p: _scan_like(src, p, np.zeros_like), "image is constant (every voxel is 0)"),
    "scaled_1e30": (lambda src, p: _scan_like(src, p, lambda a: a * np.float32(1e30)), "absurd intensities"),
    "four_d": (lambda src, p: sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(src))] * 2), str(p)),
               "image is 4D; a 3D image is needed"),
    "folder": (lambda src, p: p.mkdir(), "is a folder, not an image file"),
    "missing": (lambda src, p: None, "file not found"),
    "slice_2d": (lambda src, p: sitk.WriteImage(sitk.Image(16, 16, sitk.sitkFloat32), str(p)),
                 "image is 2D; a 3D image is needed"),
    "garbage": (lambda src, p: p.write_bytes(b"not an image"), "not a readable image"),
}


@pytest.mark.parametrize("case", list(BROKEN_SCANS))
def test_predict_image_refuses_a_broken_scan_naming_it(trained, test_scan, tmp_path, capfd, case):
    make, problem = BROKEN_SCANS[case]
    scan = tmp_path / f"{case}.nrrd"
    make(test_scan, scan)
    out = tmp_path / "out"
    assert predict_image_cli(trained, scan, out / "new") == 1
    err = capfd.readouterr().err
    assert f"deepssm-wf predict-image: error: {scan}: {problem}" in err, err
    assert "casting" not in err and "HDF5" not in err
    assert not out.exists()  # refused before anything was written


def test_predict_image_writes_a_plausible_prediction_and_refuses_garbage(trained, test_scan, tmp_path, capfd,
                                                                        monkeypatch):
    assert predict_image_cli(trained, test_scan, tmp_path / "good" / "new") == 0
    assert sorted(p.name for p in (tmp_path / "good").iterdir()) == ["new_local.particles", "new_world.particles"]

    # the same scan through a model whose output is 10 times too large: refused, nothing written
    forward = BaseDeepSSM.forward
    monkeypatch.setattr(BaseDeepSSM, "forward", lambda self, image: (forward(self, image)[0],
                                                                    forward(self, image)[1] * 10))
    capfd.readouterr()
    assert predict_image_cli(trained, test_scan, tmp_path / "bad" / "new") == 1
    err = capfd.readouterr().err
    assert f"{test_scan}: prediction refused: the predicted shape's RMS radius is" in err, err
    assert not (tmp_path / "bad").exists()


def _noise_like(array):
    """The scan's geometry and intensity range, no anatomy in it."""
    return np.random.default_rng(0).normal(array.mean(), array.std(), array.shape).astype(np.float32)


def test_predict_image_refuses_a_scan_whose_registration_is_flagged(trained, test_scan, tmp_path, capfd):
    scan = _scan_like(test_scan, tmp_path / "noise.nrrd", _noise_like)
    assert predict_image_cli(trained, scan, tmp_path / "refused" / "new") == 1
    err = capfd.readouterr().err
    assert f"{scan}: prediction refused: its registration to the reference looks failed: metric" in err, err
    assert "--accept-flagged-registration" in err
    assert not (tmp_path / "refused").exists()

    # asked to, it predicts from the flagged registration, says so, and returns the warning in its record
    assert predict_image_cli(trained, scan, tmp_path / "accepted" / "new", "--accept-flagged-registration") == 0
    out, err = capfd.readouterr()
    assert f"WARNING: {scan}: metric" in err, err
    assert json.loads(out)["registration"]["warning"].startswith("metric")
    assert sorted(p.name for p in (tmp_path / "accepted").iterdir()) == ["new_local.particles", "new_world.particles"]


def _patched_output(monkeypatch, change):
    """BaseDeepSSM's correspondences passed through `change` (a broken model, for the guard)."""
    forward = BaseDeepSSM.forward

    def broken(self, image):
        scores, points = forward(self, image)
        return scores, change(points.clone())
    monkeypatch.setattr(BaseDeepSSM, "forward", broken)


def _nan_first_subject(points):
    points[0, 5] = float("nan")
    return points


@pytest.mark.parametrize("change, problem", [
    (_nan_first_subject, "1 of 128 predicted points are not finite (NaN or inf)"),
    (lambda p: p * 0.1, "times the training mean shape's"),
    (lambda p: p + 1000.0, "lies outside the training shapes (the world grid spans"),
])
def test_predict_refuses_implausible_output_and_writes_nothing(trained, tmp_path, monkeypatch, change, problem):
    _patched_output(monkeypatch, change)
    out = tmp_path / "predictions"
    with pytest.raises(ValueError, match=r"subject femur_\d+: .*again\.npz: prediction refused: ") as error:
        predict_split(trained / "model", trained / "preprocess", "again", out)
    assert problem in str(error.value), error.value
    assert not out.exists() or not any(out.iterdir())


def test_predict_writes_the_plausible_predictions_of_real_models(trained, tmp_path):
    table = predict_split(trained / "model", trained / "preprocess", "again", tmp_path / "predictions")
    assert len(table) == 7 and (tmp_path / "predictions" / "predictions.csv").is_file()

    # a barely trained TL model (its mean shape is the `mean_shape` buffer) passes the guard too
    real, shapes = np.load(trained / "preprocess" / "train.npz"), np.load(trained / "cohort" / "shapes_train.npz")
    settings = methods.get("tl").settings({"ae_epochs": 2, "tflank_epochs": 1, "joint_epochs": 0, "latent_dim": 4,
                                           "network": {**SMALL_NET, "ae_hidden": 16}})
    train("tl", settings, real["images"], shapes["world"], np.arange(5), np.arange(5, 7),
          ShapeSpace(n_modes=4).fit(shapes["world"]), tmp_path / "tl", engine=EngineSettings(batch_size=4),
          log=lambda message: None)
    assert len(predict_split(tmp_path / "tl", trained / "preprocess", "again", tmp_path / "tl_predictions")) == 7


def test_prediction_problem_by_hand(trained):
    grid = load_grid(trained / "preprocess")[1]
    low = np.array(grid.origin)
    high = low + np.array(grid.spacing) * (np.array(grid.size) - 1)
    rng = np.random.default_rng(0)
    mean = (low + high) / 2 + rng.normal(0, 10, (50, 3))
    assert prediction_problem(mean, mean, grid) is None
    def scaled(factor):
        return (mean - mean.mean(0)) * factor + mean.mean(0)
    assert prediction_problem(scaled(1.8), mean, grid) is None and prediction_problem(scaled(0.3), mean, grid) is None
    assert "0.2 times the training mean shape's" in prediction_problem(scaled(0.2), mean, grid)
    assert "5 times the training mean shape's" in prediction_problem(scaled(5), mean, grid)
    far = mean.copy()
    far[7] = high + (high - low)  # one point a whole grid beyond it
    assert prediction_problem(far, mean, grid).startswith("1 of 50 predicted points lie far outside the world grid")
    inf = mean.copy()
    inf[3, 2] = np.inf
    assert prediction_problem(inf, mean, grid) == "1 of 50 predicted points are not finite (NaN or inf)"


def test_training_mean_of_both_model_kinds():
    config = ModelConfig(input_shape=(8, 8, 8), n_points=4, n_modes=2, latent_dim=2, channels=(2, 2, 2, 2, 2),
                         fc_sizes=(4, 4), ae_hidden=4)
    mean = np.arange(12, dtype=np.float64).reshape(4, 3)
    base = BaseDeepSSM(config, mean, np.zeros((2, 12)))
    assert np.array_equal(methods.get("base").method.training_mean(base), mean)
    assert np.array_equal(methods.get("tl").method.training_mean(TLDeepSSM(config, mean)), mean)
