"""Preprocessing of uncropped scans (full_field.py): one grid size per cohort centred on each scan, no
registration, particles and segmentations in the same frame as the images, bad input refused by name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import tiny_settings
from deepssm_workflow.full_field import ScanGridSettings, preprocess_scan, preprocess_scans
from deepssm_workflow.ingest import ingest_cohort
from deepssm_workflow.segmentations import fractions
from deepssm_workflow.synthetic.cohort import generate_cohort

SPACING = 4.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("full_field_cohort")
    settings = tiny_settings("femur", subjects={"train": {"control": 4, "cam": 1}, "test": {"control": 2}},
                             full_field={"size_mm": 160.0, "max_rotation_deg": 45, "min_margin_mm": 5.0})
    generate_cohort("femur", settings, out / "raw", workers=2)
    ingest_cohort({"source": "synthetic", "manifest": str(out / "raw" / "subjects.csv")}, "femur", out / "cohort")
    return out / "cohort"


@pytest.fixture(scope="module")
def scans(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("scans")
    meta = preprocess_scans(cohort, ScanGridSettings(SPACING), out)
    return out, meta


def test_particles_segmentations_and_images_share_the_grid_frame(cohort, scans):
    out, meta = scans
    train = np.load(out / "train.npz")
    shapes = np.load(cohort / "shapes_train.npz")
    assert meta["size"] == [41, 41, 41]  # 54 voxels of 3 mm span 159 mm: 39.75 steps of 4 mm, rounded up, + 1
    assert list(train["ids"]) == list(shapes["ids"])
    # a prediction goes back into its scan by adding the grid's origin
    np.testing.assert_allclose(train["local"] + train["origins"][:, None], shapes["local"], atol=1e-4)
    assert np.abs(train["images"].mean()) < 1e-3 and abs(train["images"].std() - 1) < 1e-3
    for k, subject in enumerate(train["ids"]):
        fraction = fractions(train["segmentations"][k])
        inside = np.argwhere(fraction >= 0.5)[:, ::-1] * SPACING  # (x, y, z) mm in the grid frame
        points = train["local"][k]
        # the mask and the particles cover the same box, to about a voxel
        assert np.abs(inside.min(0) - points.min(0)).max() < 1.5 * SPACING, subject
        assert np.abs(inside.max(0) - points.max(0)).max() < 1.5 * SPACING, subject
        # and the image shows it there: the bone is brighter than what surrounds it
        image = train["images"][k]
        assert image[fraction >= 0.5].mean() > image[fraction == 0].mean() + 0.5, subject
        assert train["field_kept"][k] == pytest.approx(1.0)


def test_test_scans_are_read_as_images_alone(cohort, scans):
    out, meta = scans
    test = np.load(out / "test.npz")
    assert set(test.files) == {"ids", "images", "origins", "field_kept", "seconds"}
    assert len(test["ids"]) == 2 and test["images"].shape == (2, 41, 41, 41)
    row = pd.read_csv(cohort / "subjects.csv", dtype={"id": str}).set_index("id").loc[str(test["ids"][0])]
    image, origin, kept = preprocess_scan(row["image"], meta)
    np.testing.assert_allclose(image, test["images"][0], atol=1e-5)
    np.testing.assert_allclose(origin, test["origins"][0])
    assert kept == pytest.approx(1.0)
    # a scan larger than the grid is cut around its centre, and the record says how much was kept
    _, _, kept_small = preprocess_scan(row["image"], {**meta, "size": [20, 41, 41]})
    assert kept_small == pytest.approx(19 * SPACING / 159, rel=1e-6)


def test_an_anatomy_outside_the_grid_is_refused_by_name(cohort, tmp_path):
    with pytest.raises(ValueError, match=r"subject femur_\d+: .*particles outside the scan grid") as error:
        preprocess_scans(cohort, ScanGridSettings(SPACING, (16, 16, 16)), tmp_path / "small")
    assert "raise scan_grid.size" in str(error.value)
    assert not (tmp_path / "small").exists()


def test_a_broken_training_scan_is_refused_by_name(cohort, tmp_path):
    table = pd.read_csv(cohort / "subjects.csv", dtype={"id": str})
    victim = table[table["split"] == "train"].iloc[1]
    image = sitk.ReadImage(victim["image"])
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[3, 4, 5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    copy = tmp_path / "cohort"
    copy.mkdir()
    for name in ("shapes_train.npz", "shapes_test.npz", "report.json"):
        (copy / name).write_bytes((cohort / name).read_bytes())
    sitk.WriteImage(broken, str(tmp_path / "broken.nrrd"))
    table.loc[table["id"] == victim["id"], "image"] = str(tmp_path / "broken.nrrd")
    table.to_csv(copy / "subjects.csv", index=False)
    with pytest.raises(Exception, match=f"subject {victim['id']}: .*broken.nrrd"):
        preprocess_scans(copy, ScanGridSettings(SPACING), tmp_path / "out")
    assert not (tmp_path / "out").exists()


SMOKE = {"shape_space": {"n_modes": 3}, "training": {"batch_size": 2, "val_fraction": 0.2, "seed": 0},
         "method": {"segmentation_epochs": 1, "alignment_epochs": 1, "shape_epochs": 1, "seg_channels": [2, 4],
                    "crop_spacing_mm": 8.0, "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8]}}}


def _set_segmenter_bias(model_dir, value: float) -> None:
    """Every voxel called inside (value > 0) or none (value < 0): a model whose detection is known."""
    import torch

    state = torch.load(model_dir / "model.pt", weights_only=True)
    state["segmenter.out.bias"].fill_(value)
    torch.save(state, model_dir / "model.pt")


def test_a_localizing_method_trains_on_the_scans_and_predicts_into_each_scan(cohort, scans, tmp_path):
    from deepssm_workflow.io import apply_transform, read_particles
    from deepssm_workflow.predict import predict_scans
    from deepssm_workflow.train import train_from_scans

    out, _ = scans
    card = train_from_scans(cohort, out, "image2ssm", SMOKE, tmp_path / "model", log=lambda _: None)
    assert card["method"] == "image2ssm" and card["n_train"] + card["n_val"] == 5
    _set_segmenter_bias(tmp_path / "model", 30.0)  # found: the whole grid, centred on each scan
    table = predict_scans(tmp_path / "model", out, "test", tmp_path / "predictions")
    test = np.load(out / "test.npz")
    alignment = np.load(tmp_path / "predictions" / "alignment.npz")
    assert list(table["id"]) == list(test["ids"]) == list(alignment["ids"])
    for k, row in enumerate(table.itertuples()):
        local = read_particles(tmp_path / "predictions" / row.local_particles)
        world = read_particles(tmp_path / "predictions" / row.world_particles)
        # the alignment the method found takes its scan-frame particles onto its world ones
        np.testing.assert_allclose(apply_transform(alignment["image_to_world"][k], local), world, atol=1e-3)
        # detected at the grid's centre (every voxel inside), the crop's centre is there in the scan's frame
        centre = test["origins"][k] + 0.5 * SPACING * (np.array([41, 41, 41]) - 1)
        assert np.linalg.norm(local.mean(0) - centre) < 60.0
        assert row.seconds_per_scan == pytest.approx(row.preprocess_seconds + row.network_seconds)

    _set_segmenter_bias(tmp_path / "model", -30.0)  # nothing found: refused by name, nothing written
    with pytest.raises(ValueError, match=r"subject femur_\d+: .*test.npz: prediction refused: no voxel was segmented"):
        predict_scans(tmp_path / "model", out, "test", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_a_localizing_mask_is_judged_on_each_scans_grid(cohort, scans, tmp_path):
    """A model that calls every voxel inside: its Dice on a scan is 2 |truth| / (|truth| + voxels), exactly."""
    from deepssm_workflow.evaluate_extras import capability_tables
    from deepssm_workflow.layout import DatasetLayout
    from deepssm_workflow.train import train_from_scans

    out, meta = scans
    root = tmp_path / "results"
    layout = DatasetLayout(root)
    layout.model_dir("image2ssm").parent.mkdir(parents=True)
    (root / "scans").symlink_to(out)
    train_from_scans(cohort, out, "image2ssm", SMOKE, layout.model_dir("image2ssm"), log=lambda _: None)
    _set_segmenter_bias(layout.model_dir("image2ssm"), 30.0)
    table = pd.read_csv(cohort / "subjects.csv", dtype={"id": str})
    test = table[table["split"] == "test"]
    files = dict(zip(test["id"], test["segmentation"]))
    tables, _ = capability_tables(root, ["image2ssm"], list(test["id"]), None, None, files)
    per_subject = tables["scan_segmentation_dice_per_subject"].set_index(["method", "id"])
    voxels = int(np.prod(meta["size"]))
    for subject in test["id"]:
        row = per_subject.loc[("image2ssm", subject)]
        assert row["predicted_voxels"] == voxels and 0 < row["true_voxels"] < voxels
        assert row["dice"] == pytest.approx(2 * row["true_voxels"] / (row["true_voxels"] + voxels))
    summary = tables["scan_segmentation_dice"].set_index("method")
    assert list(summary.index) == ["image2ssm", "mean training mask on the scan grid"]
    assert (summary["n"] == len(test)).all()


def test_augmented_samples_become_uncropped_scans_with_their_shapes(cohort, scans, tmp_path):
    """augment_scans: each KDE sample's source scan warped so that its anatomy lies at the sample's shape, placed
    by the source's own transform; its segmentation moves with it; training reads both, hold-out kept."""
    from deepssm_workflow.augment import augment
    from deepssm_workflow.full_field import augment_scans
    from deepssm_workflow.preprocess import PreprocessSettings, preprocess_training
    from deepssm_workflow.train import train_from_scans

    out, _ = scans
    preprocess_training(cohort, PreprocessSettings(downsample=1, margin_mm=5), tmp_path / "preprocess")
    validation = {"val_fraction": 0.2, "seed": 0}
    augment(cohort, tmp_path / "preprocess", tmp_path / "augmentation", 6, n_control=64, validation=validation)
    summary = augment_scans(cohort, out, tmp_path / "augmentation", tmp_path / "scans_aug", n_control=64)
    assert summary["n"] == 6
    samples = np.load(tmp_path / "scans_aug" / "samples.npz")
    crop_samples = np.load(tmp_path / "augmentation" / "samples.npz")
    np.testing.assert_allclose(samples["world"], crop_samples["points"], atol=1e-3)
    images = np.load(tmp_path / "scans_aug" / "images.npy")
    masks = np.load(tmp_path / "scans_aug" / "segmentations.npy")
    train = np.load(out / "train.npz")
    assert images.shape == masks.shape == (6, *train["images"].shape[1:])
    for k in range(6):
        fraction = fractions(masks[k])
        inside = np.argwhere(fraction >= 0.5)[:, ::-1] * SPACING
        points = samples["local"][k]
        assert np.abs(inside.min(0) - points.min(0)).max() < 1.5 * SPACING, k
        assert np.abs(inside.max(0) - points.max(0)).max() < 1.5 * SPACING, k
        assert images[k][fraction >= 0.5].mean() > images[k][fraction == 0].mean() + 0.5, k
        # the generated shape differs from its source's: the warp moved the anatomy
        source = samples["source_index"][k]
        assert np.abs(points - train["local"][source]).max() > 0.5

    settings = {**SMOKE, "training": {**SMOKE["training"], **validation}}
    card = train_from_scans(cohort, out, "image2ssm", settings, tmp_path / "model", log=lambda _: None,
                            augmentation_dir=tmp_path / "scans_aug")
    assert card["n_train"] + card["n_val"] == 5 + 6
    other = {**SMOKE, "training": {**SMOKE["training"], "val_fraction": 0.2, "seed": 1}}  # holds out another
    with pytest.raises(ValueError, match="made with validation subjects .* but training holds out"):
        train_from_scans(cohort, out, "image2ssm", other, tmp_path / "other", log=lambda _: None,
                         augmentation_dir=tmp_path / "scans_aug")


def test_the_two_sources_are_never_mixed_up(tmp_path, capsys):
    """A step given both sources, or neither, or a scan method sent down the crops' path, says so by name."""
    from deepssm_workflow.cli import main
    from deepssm_workflow.seed_spread import plan
    from deepssm_workflow.train import train_from_artifacts

    base = ["train", "--cohort", "c", "--method", "base", "--settings", "{}", "--out-dir", str(tmp_path / "o")]
    for extra, message in ((["--scans-dir", "s", "--preprocess-dir", "p"], "not both or neither"),
                           ([], "not both or neither"),
                           (["--preprocess-dir", "p"], "--preprocess-dir needs --augmentation-dir")):
        assert main(base + extra) == 1
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="method image2ssm trains on uncropped scans"):
        train_from_artifacts("c", "p", "a", "image2ssm", {}, tmp_path / "m")
    # a scan method is spread like any shape method (its seeds train on the scans; see seeds.smk)
    assert plan({"methods": {"base": {}, "image2ssm": {}}}, "hips")[0] == ["base", "image2ssm"]
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()
