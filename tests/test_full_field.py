"""Full-field-of-view synthetic scans: one fixed box for every subject, the anatomy anywhere in it
and turned further; what a method that finds the anatomy itself is trained and tested on."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from conftest import REPO, SCHEMA, tiny_settings
from deepssm_workflow.config import ConfigError, load
from deepssm_workflow.io import apply_transform, read_particles, read_transform
from deepssm_workflow.synthetic.cohort import generate_cohort

SUBJECTS = {"train": {"control": 4, "cam": 1}, "test": {"control": 1}}
BOX_MM = 180.0
MARGIN_MM = 5.0


@pytest.fixture(scope="module")
def full_field_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("full_field")
    settings = tiny_settings("femur", subjects=SUBJECTS,
                             full_field={"size_mm": BOX_MM, "max_rotation_deg": 45, "min_margin_mm": MARGIN_MM})
    generate_cohort("femur", settings, out, workers=2)
    return out


def test_every_scan_is_the_same_box_with_the_whole_anatomy_inside(full_field_cohort):
    subjects = pd.read_csv(full_field_cohort / "subjects.csv")
    assert len(subjects) == 6
    grids, centres = set(), []
    for row in subjects.itertuples():
        image = sitk.ReadImage(str(full_field_cohort / row.image))
        grids.add((image.GetSize(), image.GetOrigin(), image.GetSpacing()))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(full_field_cohort / row.segmentation)))
        # the anatomy is a small part of the scan, and it is whole: no voxel of it on a face of the box
        assert 0 < mask.mean() < 0.1, row.id
        for axis in range(3):
            assert not np.take(mask, [0, -1], axis=axis).any(), f"{row.id}: anatomy cut by the box (axis {axis})"
        local = read_particles(full_field_cohort / row.local_particles)
        low = np.asarray(image.GetOrigin())
        high = low + (np.asarray(image.GetSize()) - 1) * np.asarray(image.GetSpacing())
        assert np.all(local >= low + MARGIN_MM - 1e-6) and np.all(local <= high - MARGIN_MM + 1e-6), row.id
        world = read_particles(full_field_cohort / row.world_particles)
        assert np.allclose(apply_transform(read_transform(full_field_cohort / row.transform), local), world,
                           atol=1e-4)
        centres.append(local.mean(0))
    assert len(grids) == 1
    size, origin, spacing = grids.pop()
    assert np.allclose(np.asarray(size) * np.asarray(spacing), BOX_MM, atol=spacing[0])
    assert np.allclose(np.asarray(origin) + 0.5 * (np.asarray(size) - 1) * np.asarray(spacing), 0.0)
    # the position is drawn, not fixed: the subjects' centres spread over the box
    assert np.ptp(np.asarray(centres), axis=0).max() > 20.0


def test_poses_reach_beyond_the_cropped_default(full_field_cohort):
    truth = pd.read_csv(full_field_cohort / "ground_truth.csv")
    angles = np.linalg.norm(truth[[f"pose_rotation_{a}_deg" for a in "xyz"]].to_numpy(), axis=1)
    assert angles.max() <= 45.0 + 1e-6
    assert angles.max() > 15.0  # the cropped default's largest rotation
    meta = json.loads((full_field_cohort / "data" / "cohort.json").read_text())
    assert meta["settings"]["full_field"] == {"size_mm": [BOX_MM] * 3, "max_rotation_deg": 45.0,
                                              "min_margin_mm": MARGIN_MM}


def test_a_box_too_small_for_the_anatomy_is_refused_naming_the_subject(tmp_path):
    settings = tiny_settings("femur", subjects=SUBJECTS, full_field={"size_mm": 40})
    with pytest.raises(ValueError, match=r"subject femur_\d{3}: .* does not fit synthetic.full_field.size_mm"):
        generate_cohort("femur", settings, tmp_path / "cohort", workers=1)
    assert not (tmp_path / "cohort").exists() or list((tmp_path / "cohort").rglob("*")) == []


def test_the_cropped_default_records_no_full_field(tiny_cohort):
    meta = json.loads((tiny_cohort("femur") / "data" / "cohort.json").read_text())
    assert "full_field" not in meta["settings"]


def test_config_accepts_the_full_field_block_and_names_a_bad_key():
    config = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    good = copy.deepcopy(config)
    good["datasets"]["femur"]["synthetic"]["full_field"] = {"size_mm": [200, 180, 220]}
    assert load(good, SCHEMA)["femur"]
    bad = copy.deepcopy(config)
    bad["datasets"]["femur"]["synthetic"]["full_field"] = {"size_mm": 200, "rotation": 30}
    with pytest.raises(ConfigError, match="full_field.rotation"):
        load(bad, SCHEMA)


def test_fast_downsampling_stays_within_the_gaussians_own_spread(full_field_cohort):
    """downsample_scan (one smoothing-and-interpolation matrix per axis) against resample_to_world (ITK's
    recursive Gaussian of the whole scan, then linear interpolation): closer to it than ITK's discrete Gaussian
    is, on a real full-field scan; a grid wider than the scan is filled outside its field."""
    from deepssm_workflow.full_field import downsample_scan, scan_grid
    from deepssm_workflow.preprocess import antialias_sigma, read_image, resample_to_world

    row = pd.read_csv(full_field_cohort / "subjects.csv").iloc[0]
    image = read_image(full_field_cohort / row.image)
    spacing = 4.0 * max(image.GetSpacing())
    grid = scan_grid(image, spacing, np.ceil(BOX_MM / spacing).astype(int) * np.ones(3, int))
    exact = resample_to_world(image, sitk.Transform(), grid)
    fast = downsample_scan(image, grid)
    sigma = antialias_sigma(image.GetSpacing(), spacing)
    discrete = sitk.DiscreteGaussian(image, sigma**2, 64, 0.001, True)
    other = sitk.GetArrayFromImage(sitk.Resample(discrete, grid.reference_image(), sitk.Transform(), sitk.sitkLinear,
                                                 float(np.median(sitk.GetArrayViewFromImage(image))),
                                                 sitk.sitkFloat32))
    assert fast.shape == exact.shape == tuple(grid.size[::-1])
    spread = np.sqrt(((other - exact) ** 2).mean()) / exact.std()
    deviation = np.sqrt(((fast - exact) ** 2).mean()) / exact.std()
    assert deviation < spread, (deviation, spread)
    assert abs(fast.mean() - exact.mean()) < 0.01 * exact.std()
    wide = scan_grid(image, spacing, np.ceil(1.5 * BOX_MM / spacing).astype(int) * np.ones(3, int))
    wide_exact, wide_fast = resample_to_world(image, sitk.Transform(), wide), downsample_scan(image, wide)
    outside = np.isclose(wide_exact, wide_exact[0, 0, 0]) & np.isclose(wide_exact, wide_exact[-1, -1, -1])
    assert outside.mean() > 0.3 and np.allclose(wide_fast[outside], wide_fast[0, 0, 0])
    assert np.sqrt(((wide_fast - wide_exact)[~outside] ** 2).mean()) / exact.std() < spread
