"""The multi-anatomy synthetic cohort (MASSM): exact correspondences per part, absent parts absent
everywhere, parts that never share a voxel, and bad settings refused with nothing written."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import pyvista as pv
import SimpleITK as sitk

from deepssm_workflow.io import apply_transform, read_particles, read_transform
from deepssm_workflow.synthetic.cohort import world_shape
from deepssm_workflow.synthetic.imaging import Grid, voxelize
from deepssm_workflow.synthetic.multi_anatomy import (
    MIRROR,
    MultiAnatomySettings,
    PartModel,
    generate_multi_anatomy_cohort,
)

SETTINGS = {"seed": 5, "subjects": {"train": {"control": 4}, "test": {"control": 2}}, "n_particles": 48,
            "spacing_mm": 4, "mesh_resolution_mm": 3, "size_mm": [360, 170, 180], "missing_fraction": 0.5}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("hip")
    settings = MultiAnatomySettings.from_config(SETTINGS)
    generate_multi_anatomy_cohort(settings, root, prefix="hip")
    return root, settings, pd.read_csv(root / "subjects.csv", keep_default_na=False), \
        pd.read_csv(root / "ground_truth.csv")


def _read(path):
    image = sitk.ReadImage(str(path))
    grid = Grid(image.GetOrigin(), image.GetSpacing(), image.GetSize())
    return sitk.GetArrayFromImage(image), grid


def _params(truth_row, part_name):
    """A part's shape parameters from its ground-truth columns (pose and presence excluded)."""
    prefix = f"{part_name}."
    return {k[len(prefix):]: float(v) for k, v in truth_row.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(("present", "pose_", "centre_"))}


def test_every_part_has_exact_correspondences(cohort):
    """World particles are the part's template vertices deformed and aligned from its recorded parameters
    (mirrored for the left femur); local particles map onto them through the part's transform and lie on
    the boundary of the part's label."""
    root, settings, subjects, truth = cohort
    metadata = json.loads((root / "data/cohort.json").read_text())
    checked = 0
    for part in settings.parts:
        model = PartModel(part, settings)
        label = metadata["parts"][part.name]["label"]
        for (_, row), (_, true) in zip(subjects.iterrows(), truth.iterrows()):
            if not row[f"present_{part.name}"]:
                continue
            world = read_particles(root / row[f"world_particles_{part.name}"])
            expected = world_shape(model.anatomy, _params(true, part.name))[0][model.point_ids]
            if part.mirror:
                expected = expected @ MIRROR
            np.testing.assert_allclose(world, expected, atol=1e-5)
            local = read_particles(root / row[f"local_particles_{part.name}"])
            transform = read_transform(root / row[f"transform_{part.name}"])
            np.testing.assert_allclose(apply_transform(transform, local), world, atol=1e-5)
            np.testing.assert_allclose(transform[:3, :3] @ transform[:3, :3].T, np.eye(3), atol=1e-8)
            assert np.linalg.det(transform[:3, :3]) > 0  # rigid: the mirror lives in the world frame, not the pose
            # every local particle is within a voxel of the part's labelled voxels
            labels, grid = _read(root / row["labels"])
            index = np.rint((local - np.asarray(grid.origin)) / np.asarray(grid.spacing)).astype(int)
            near = np.zeros(len(local), bool)
            for offset in np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3):
                i = index + offset
                near |= labels[i[:, 2], i[:, 1], i[:, 0]] == label
            assert near.all(), (row["id"], part.name)
            checked += 1
    assert checked >= len(subjects) * 2


def test_absent_parts_are_absent_everywhere_and_parts_never_overlap(cohort):
    """A missing part has no voxel, no file and an empty column; a present part's label is exactly its own
    mesh voxelized (no neighbour painted over it), in a bright (femur) or fluid (bladder) intensity range."""
    root, settings, subjects, truth = cohort
    metadata = json.loads((root / "data/cohort.json").read_text())
    missing = 0
    for (_, row), (_, true) in zip(subjects.iterrows(), truth.iterrows()):
        labels, grid = _read(root / row["labels"])
        image, _ = _read(root / row["image"])
        assert image.dtype == np.int16 and labels.shape == image.shape
        assert sum(row[f"present_{p.name}"] for p in settings.parts) >= len(settings.parts) - 1
        for part in settings.parts:
            label = metadata["parts"][part.name]["label"]
            assert row[f"present_{part.name}"] == true[f"{part.name}.present"]
            if not row[f"present_{part.name}"]:
                missing += 1
                assert not (labels == label).any()
                assert all(row[f"{kind}_{part.name}"] == "" for kind in
                           ("mesh", "local_particles", "world_particles", "transform"))
                assert not list((root / "data").rglob(f"{row['id']}_{part.name}*"))
                continue
            own = voxelize(pv.read(root / row[f"mesh_{part.name}"]), grid)
            assert np.array_equal(own > 0, labels == label), (row["id"], part.name)
            inside = image[labels == label].mean()
            assert (inside > 300) if part.anatomy == "femur" else (-30 < inside < 40), (part.name, inside)
    assert 0 < missing < len(subjects)  # the seed gives both kinds of subject


def test_a_parts_shape_does_not_depend_on_its_neighbours(tmp_path, cohort):
    """Each part draws its shape from its own stream: dropping the bladder leaves the femurs' shapes."""
    _, _, _, truth = cohort
    fewer = dict(SETTINGS, subjects={"train": {"control": 1}}, missing_fraction=0.0,
                 parts={"femur_right": {"anatomy": "femur", "centre_mm": [-107, -4, -10],
                                        "extent": {"shaft_length_mm": 45}},
                        "femur_left": {"anatomy": "femur", "centre_mm": [107, -4, -10], "mirror": True,
                                       "extent": {"shaft_length_mm": 45}}})
    generate_multi_anatomy_cohort(MultiAnatomySettings.from_config(fewer), tmp_path / "two", prefix="hip")
    two = pd.read_csv(tmp_path / "two/ground_truth.csv")
    plan_index = 0  # the one subject of `fewer` is stream 0; find stream 0's row in the full cohort
    full = truth.iloc[plan_index]
    for part in ("femur_right", "femur_left"):
        assert _params(two.iloc[0], part) == _params(full, part)


def test_a_box_too_small_is_refused_by_subject_with_nothing_written(tmp_path):
    settings = MultiAnatomySettings.from_config(dict(SETTINGS, size_mm=[200, 170, 180]))
    with pytest.raises(ValueError, match=r"subject hip_\d+: no placement of its parts inside multi_anatomy.size_mm"):
        generate_multi_anatomy_cohort(settings, tmp_path / "c", prefix="hip")
    assert not list((tmp_path / "c").iterdir())
    on_top = {"a": {"anatomy": "bladder", "centre_mm": 0}, "b": {"anatomy": "bladder", "centre_mm": 10}}
    with pytest.raises(ValueError, match="without two parts sharing a voxel"):
        generate_multi_anatomy_cohort(MultiAnatomySettings.from_config(dict(SETTINGS, parts=on_top)),
                                      tmp_path / "d", prefix="hip")
    assert not list((tmp_path / "d").iterdir())
    with pytest.raises(ValueError, match="2 to 8 parts"):
        MultiAnatomySettings.from_config(dict(SETTINGS, parts={"bladder": {"anatomy": "bladder", "centre_mm": 0}}))
    with pytest.raises(ValueError, match="multi_anatomy.parts.a.anatomy: unknown part anatomy 'kidney'"):
        MultiAnatomySettings.from_config(dict(SETTINGS, parts={"a": {"anatomy": "kidney", "centre_mm": 0},
                                                               "b": {"anatomy": "bladder", "centre_mm": 0}}))
