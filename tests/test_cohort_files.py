"""The files of every synthetic cohort, read back from disk as a user's tools would read them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pyvista as pv
import SimpleITK as sitk
from scipy import ndimage

from conftest import tiny_settings
from deepssm_workflow.io import apply_transform, read_particles, read_transform, resolve
from deepssm_workflow.synthetic.cohort import generate_cohort
from deepssm_workflow.synthetic.registry import ANATOMIES

FILE_COLUMNS = ["image", "segmentation", "mesh", "local_particles", "world_particles", "transform"]


def subjects_of(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "subjects.csv")


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_subjects_table_matches_the_design(tiny_cohort, anatomy):
    folder = tiny_cohort(anatomy)
    subjects = subjects_of(folder)
    design = tiny_settings(anatomy).subjects
    assert subjects["id"].is_unique
    assert set(subjects["split"]) == {"train", "test"}
    counts = subjects.groupby(["split", "group"]).size().to_dict()
    assert counts == {(s, g): n for s, groups in design.items() for g, n in groups.items() if n}
    for column in FILE_COLUMNS:
        assert all(resolve(folder / "subjects.csv", p).is_file() for p in subjects[column]), column
    # the ground truth (generator parameters) never leaks into the observed table
    truth = pd.read_csv(folder / "ground_truth.csv")
    assert list(truth["id"]) == list(subjects["id"])
    leaked = (set(truth.columns) - {"id"}) & set(subjects.columns)
    assert not leaked


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_points_lie_on_mesh_and_segmentation_boundary(tiny_cohort, anatomy):
    folder = tiny_cohort(anatomy)
    table = folder / "subjects.csv"
    for subject in subjects_of(folder).itertuples():
        points = read_particles(resolve(table, subject.local_particles))
        mesh = pv.read(resolve(table, subject.mesh))
        _, closest = mesh.find_closest_cell(points, return_closest_point=True)
        assert np.linalg.norm(points - closest, axis=1).max() < 1e-4, subject.id

        segmentation = sitk.ReadImage(str(resolve(table, subject.segmentation)))
        assert segmentation.GetDimension() == 3
        mask = sitk.GetArrayFromImage(segmentation)
        assert set(np.unique(mask)) == {0, 1}
        distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            segmentation, insideIsPositive=False, squaredDistance=False, useImageSpacing=True))
        spacing = np.array(segmentation.GetSpacing())
        index = (points - np.array(segmentation.GetOrigin())) / spacing  # x, y, z
        # voxel-centre distances put the boundary within one voxel diagonal of a surface point
        at_points = ndimage.map_coordinates(distance, index[:, ::-1].T, order=1)
        assert np.abs(at_points).max() < np.linalg.norm(spacing), subject.id


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_world_points_are_the_transform_of_image_points(tiny_cohort, anatomy):
    folder = tiny_cohort(anatomy)
    table = folder / "subjects.csv"
    margins = []
    for subject in subjects_of(folder).itertuples():
        transform = read_transform(resolve(table, subject.transform))
        rotation = transform[:3, :3]
        assert np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-8) and np.linalg.det(rotation) > 0
        local = read_particles(resolve(table, subject.local_particles))
        world = read_particles(resolve(table, subject.world_particles))
        assert np.abs(apply_transform(transform, local) - world).max() < 1e-4
        image = sitk.ReadImage(str(resolve(table, subject.image)))
        segmentation = sitk.ReadImage(str(resolve(table, subject.segmentation)))
        assert image.GetSize() == segmentation.GetSize() and image.GetOrigin() == segmentation.GetOrigin()
        margins.append(local.min(0) - np.array(image.GetOrigin()))
    # every subject has its own field of view: the gap between anatomy and image corner varies
    assert np.array(margins).std(0).min() > 1.0


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_images_are_not_trivially_segmented(tiny_cohort, anatomy):
    """Noise and blur: the segmentation is not a threshold of the image."""
    folder = tiny_cohort(anatomy)
    table = folder / "subjects.csv"
    subject = subjects_of(folder).iloc[0]
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(resolve(table, subject.image)))).astype(float)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(resolve(table, subject.segmentation)))).astype(bool)
    best_dice = 0.0
    for threshold in np.percentile(image, np.arange(5, 100, 2.5)):
        for guess in (image > threshold, image < threshold):
            best_dice = max(best_dice, 2 * (guess & mask).sum() / (guess.sum() + mask.sum()))
    assert best_dice < 0.95


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_another_cohort(tmp_path):
    settings = tiny_settings("femur", subjects={"train": {"control": 2, "cam": 1}, "test": {"control": 1}})
    generate_cohort("femur", settings, tmp_path / "a", workers=1)
    generate_cohort("femur", settings, tmp_path / "b", workers=2)  # worker count must not matter
    first, second = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert first == second and len(first) > 20

    other = tiny_settings("femur", seed=999, subjects={"train": {"control": 2, "cam": 1}, "test": {"control": 1}})
    generate_cohort("femur", other, tmp_path / "c", workers=1)
    third = _hashes(tmp_path / "c")
    changed = [name for name in first if name.endswith("_world.particles") and first[name] != third.get(name)]
    assert len(changed) == 4
    meta = json.loads((tmp_path / "c" / "data" / "cohort.json").read_text())
    assert meta["settings"]["seed"] == 999


def test_failed_generation_leaves_nothing_behind(tmp_path):
    # 1 m voxels put no voxel centre inside the bone: the first subjects fail after
    # the staging folder has been written to, and nothing may remain.
    settings = tiny_settings("femur", spacing_mm=1000.0)
    with pytest.raises(RuntimeError, match=r"femur_\d{3}: empty segmentation"):
        generate_cohort("femur", settings, tmp_path / "cohort", workers=2)
    assert list((tmp_path / "cohort").rglob("*")) == []


def test_too_many_particles_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="cannot sample 1000000 points"):
        generate_cohort("femur", tiny_settings("femur", n_particles=10**6), tmp_path / "cohort")
    assert not (tmp_path / "cohort").exists()
