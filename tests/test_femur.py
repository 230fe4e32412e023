"""The femur generator's shape model: parameters move the right points, cam lesions sit where they should."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.spatial import cKDTree

from deepssm_workflow.points import farthest_point_sampling
from deepssm_workflow.synthetic.femur import CAM_WIDTH, NECK_AXIS, Femur


@pytest.fixture(scope="module")
def femur():
    return Femur(mesh_resolution_mm=3.0)


@pytest.fixture(scope="module")
def point_ids(femur):
    return farthest_point_sampling(femur.template.vertices, 256)


def population(femur, point_ids, groups, seed=0):
    """World-frame points (N, M, 3) and parameters of a shape-only population."""
    params, shapes = [], []
    for i, group in enumerate(groups):
        p = femur.sample_parameters(np.random.default_rng([seed, i]), group)
        params.append(p)
        shapes.append(femur.deform(femur.template.vertices[point_ids], p))
    return np.array(shapes), params


def test_points_move_consistently_with_their_parameters(femur, point_ids):
    shapes, params = population(femur, point_ids, ["control"] * 80)
    template = femur.template.vertices[point_ids]
    to_head = template - femur.template.anchors["head_center"]
    head = (np.linalg.norm(to_head, axis=1) < 27.0) & (to_head @ NECK_AXIS > 0)  # the head's far half
    shaft_end = template[:, 2] < template[:, 2].min() + 3.0
    assert head.sum() >= 5 and shaft_end.sum() >= 3

    # the shaft end moves down when the shaft is cut lower (overall size divided out)
    size = np.array([p["size_scale"] for p in params])
    cut = [p["shaft_cut_scale"] for p in params]
    assert stats.pearsonr(shapes[:, shaft_end, 2].mean(1) / size, cut)[0] < -0.9
    # head points spread with head radius
    anchors = [femur.deformed_anchors(p)["head_center"] for p in params]
    spread = np.array([np.linalg.norm(s[head] - a, axis=1).mean() for s, a in zip(shapes, anchors)])
    assert stats.pearsonr(spread, [p["head_radius_mm"] * p["size_scale"] for p in params])[0] > 0.9


def test_neck_length_slides_the_head_and_leaves_the_shaft(femur, point_ids):
    """One parameter changed, all else fixed: exactly the anatomically expected points move."""
    template = femur.template.vertices[point_ids]
    to_head = template - femur.template.anchors["head_center"]
    head = np.linalg.norm(to_head, axis=1) < 27.0
    shaft = template[:, 2] < -25.0
    for seed in range(5):
        p = femur.sample_parameters(np.random.default_rng(seed), "control")
        moved = femur.deform(template, {**p, "neck_length_mm": p["neck_length_mm"] + 5.0}) - femur.deform(template, p)
        # the head slides as a block by 5 mm (the small smooth random field, evaluated at the
        # moved position, adds a few tenths of a millimetre)
        length = np.linalg.norm(moved[head], axis=1)
        assert np.allclose(length, 5.0 * p["size_scale"], rtol=0.1)
        direction = moved[head] / length[:, None]
        assert np.min(direction @ direction.mean(0)) > np.cos(np.deg2rad(10))
        assert np.abs(moved[shaft]).max() < 1e-9


def test_point_neighbourhoods_are_the_same_in_every_subject(femur, point_ids):
    """Point i stays among the same neighbours: no subject scrambles the correspondence."""
    shapes, _ = population(femur, point_ids, ["control", "cam"] * 20)
    template = femur.template.vertices[point_ids]
    reference = cKDTree(template).query(template, k=7)[1][:, 1:]
    for shape in shapes:
        neighbours = cKDTree(shape).query(shape, k=11)[1][:, 1:]
        kept = np.mean([np.isin(reference[i], neighbours[i]).mean() for i in range(len(shape))])
        assert kept > 0.95


def test_extreme_parameters_do_not_fold_the_surface(femur):
    template = femur.template
    normals = template.polydata().compute_normals(cell_normals=True, point_normals=False)["Normals"]
    base = femur.sample_parameters(np.random.default_rng(1), "cam")
    extremes = {"neck_shaft_angle_deg": (115, 145), "anteversion_deg": (-6, 30), "head_radius_mm": (18, 28),
                "neck_length_mm": (43, 67), "shaft_cut_scale": (0.7, 1.3), "cam_amplitude_mm": (0, 5)}
    for name, values in extremes.items():
        for value in values:
            moved = template.polydata(femur.deform(template.vertices, {**base, name: value}))
            moved_normals = moved.compute_normals(cell_normals=True, point_normals=False)["Normals"]
            assert np.min(np.sum(normals * moved_normals, axis=1)) > 0.0, (name, value)


def test_cam_group_difference_peaks_at_the_head_neck_junction(femur, point_ids):
    groups = ["control", "cam"] * 150
    shapes, _ = population(femur, point_ids, groups, seed=5)
    is_cam = np.array(groups) == "cam"
    difference = np.linalg.norm(shapes[is_cam].mean(0) - shapes[~is_cam].mean(0), axis=1)
    template = femur.template.vertices[point_ids]
    to_lesion = np.linalg.norm(template - femur.template.anchors["cam_center"], axis=1)
    peak = int(np.argmax(difference))
    assert to_lesion[peak] < CAM_WIDTH
    assert difference[peak] > 2.0  # mm, mean lesion amplitude is 3.75 mm
    # away from the lesion the groups do not differ beyond sampling noise
    assert difference[to_lesion > 4 * CAM_WIDTH].max() < 0.35 * difference[peak]
