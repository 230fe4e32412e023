"""The femur study's figures and significance: the generator's group model puts the cam group's
difference at the planted head-neck junction, the per-point test flags that region and not the
rest, and the panels look at it and fill their frame."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from deepssm_workflow.ingest import ingest_cohort
from deepssm_workflow.io import apply_transform, procrustes_fit
from deepssm_workflow.points import farthest_point_sampling
from deepssm_workflow.studies import figures as fig
from deepssm_workflow.studies import run_study
from deepssm_workflow.studies.femur import (
    PLANTED_LEVEL,
    femur_camera,
    normal_displacement,
    normal_test,
    planted_from_generator,
)
from deepssm_workflow.studies.stats import permutation_welch, welch_t
from deepssm_workflow.surface import TemplateMesh, values_at_vertices
from deepssm_workflow.synthetic.femur import CAM_WIDTH, Femur


@pytest.fixture(scope="module")
def femur():
    return Femur(mesh_resolution_mm=4.0)


@pytest.fixture(scope="module")
def point_ids(femur):
    return farthest_point_sampling(femur.template.vertices, 256)


@pytest.fixture(scope="module")
def template(femur, point_ids):
    """The generator's template mesh with the correspondence points as the handles, as a cohort's template."""
    return TemplateMesh(femur.template.polydata(), femur.template.vertices[point_ids].copy(), "template")


def world_shapes(femur, point_ids, groups, seed):
    """World-frame points (N, M, 3) of a shape-only cohort, aligned to the template as the cohort writer aligns."""
    vertices, shapes = femur.template.vertices, []
    for index, group in enumerate(groups):
        deformed = femur.deform(vertices, femur.sample_parameters(np.random.default_rng([seed, index]), group))
        shapes.append(apply_transform(procrustes_fit(deformed, vertices, scaling=False), deformed)[point_ids])
    return np.asarray(shapes)


def test_welch_permutation_test():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)) + 50.0
    group = np.arange(30) < 10
    x[group, 3] += 2.5  # only column 3 differs between the groups
    np.testing.assert_allclose(welch_t(x, group), stats.ttest_ind(x[group], x[~group], equal_var=False).statistic)
    test = permutation_welch(x, group, n_permutations=1999)
    assert test["method"] == "1999 random permutations"
    assert test["p"][3] == pytest.approx(1 / 2000) and test["q"][3] < 0.05
    assert (test["q"][[0, 1, 2, 4, 5, 6, 7]] > 0.05).all()
    # the permutation p follows the t distribution's p where the data are normal
    parametric = stats.ttest_ind(x[group], x[~group], equal_var=False).pvalue
    assert np.abs(test["p"] - parametric)[[0, 1, 2, 4, 5, 6, 7]].max() < 0.05
    small = permutation_welch(x[:6], np.array([1, 1, 0, 0, 0, 0], bool))  # C(6, 2) = 15 labellings
    assert small["method"] == "exact (15 labellings)" and small["p"].min() >= 1 / 15
    with pytest.raises(ValueError, match="2 subjects per group"):
        welch_t(x[:4], np.array([1, 0, 0, 0], bool))


def test_camera_fits_what_it_is_given():
    import pyvista as pv

    sphere = pv.Sphere(radius=10.0, center=(3.0, -2.0, 5.0), theta_resolution=60, phi_resolution=60)
    image = fig.render(sphere, np.zeros(sphere.n_points), (0, 1), fig.SEQUENTIAL,
                       camera=fig.Camera(direction=(0.3, -1.0, 0.2)))
    # a disc filling a square panel up to the 4 % margin covers pi / 4 / 1.04^2 of it
    assert fig.fill_fraction(image) == pytest.approx(np.pi / 4 / 1.04**2, abs=0.03)
    # the fixed views (what the other studies use) are unchanged and leave the scene smaller
    assert fig.fill_fraction(fig.render(sphere, np.zeros(sphere.n_points), (0, 1), fig.SEQUENTIAL)) < 0.6


def test_cam_group_model_concentrates_at_the_planted_junction(femur, point_ids, template):
    """The generator's group model: cam minus control along the normal is large inside the planted
    region and small elsewhere; two halves of the controls show no such pattern."""
    groups = ["control"] * 60 + ["cam"] * 60
    shapes = world_shapes(femur, point_ids, groups, seed=21)
    cam = np.array(groups) == "cam"
    planted = planted_from_generator(femur, point_ids)
    inside = planted.region
    assert 8 <= inside.sum() <= 40  # a patch at the head-neck junction, not the whole head
    to_centre = np.linalg.norm(femur.template.vertices[point_ids] - planted.center, axis=1)
    assert to_centre[inside].max() <= 2 * CAM_WIDTH + 1e-9

    displacement = normal_displacement(shapes, template)[0]
    difference = displacement[cam].mean(0) - displacement[~cam].mean(0)
    assert inside[int(np.abs(difference).argmax())]
    assert difference[inside].mean() > 0.5  # outward, mm (the generator plants 2.5-5 mm at the centre)
    assert np.abs(difference[inside]).mean() > 3 * np.abs(difference[~inside]).mean()
    assert stats.pearsonr(difference, planted.weight)[0] > 0.6

    controls = displacement[~cam]  # the same comparison between two halves of the controls
    null = controls[:30].mean(0) - controls[30:].mean(0)
    assert np.abs(null[inside]).mean() < 2 * np.abs(null[~inside]).mean()


def test_significance_flags_the_planted_region_and_not_elsewhere(femur, point_ids, template):
    groups = ["control"] * 40 + ["cam"] * 20
    shapes = world_shapes(femur, point_ids, groups, seed=5)
    cam = np.array(groups) == "cam"
    planted = planted_from_generator(femur, point_ids)
    test = normal_test(shapes, cam, template)
    significant, inside = test["q"] < 0.05, planted.region
    assert test["method"] == "9999 random permutations"
    assert significant[inside].sum() >= 3
    assert significant[inside].mean() > 0.25 > 0.02 >= significant[~inside].mean()
    assert np.all(test["difference"][significant] > 0)  # the lesion sticks out
    # the same test between controls alone flags (almost) nothing
    controls = shapes[~cam]
    null = normal_test(controls, np.arange(len(controls)) < 20, template)
    assert (null["q"] < 0.05).mean() <= 0.02


def test_femur_panels_look_at_the_lesion_and_fill_the_panel(femur, point_ids, template):
    planted = planted_from_generator(femur, point_ids)
    mesh = template.warp(template.handles)
    weight = values_at_vertices(mesh.points, template.handles, planted.weight)
    camera = femur_camera(mesh, template.handles, planted)
    # the bump direction faces the camera, the neck is seen across (in profile)
    direction = np.asarray(camera.direction) / np.linalg.norm(camera.direction)
    assert direction @ planted.normal > 0.7 and abs(direction @ planted.neck_axis) < 1e-9
    size = (300, 300)
    image = fig.render(mesh, (weight >= PLANTED_LEVEL).astype(float), (0, 1), "gray_r", camera=camera, size=size)
    before = fig.render(mesh, (weight >= PLANTED_LEVEL).astype(float), (0, 1), "gray_r", size=size)
    assert fig.fill_fraction(image) > 0.35 > 0.2 > fig.fill_fraction(before)
    # the planted region (dark) is in view, large and near the centre of the panel
    dark = image[..., :3].max(-1) < 60
    assert dark.mean() > 0.03
    rows, cols = np.nonzero(dark)
    assert np.hypot(rows.mean() - size[1] / 2, cols.mean() - size[0] / 2) < 0.25 * size[0]
    # the whole head is in the frame: camera.fit reaches past the head's far side
    assert np.linalg.norm(camera.fit - planted.head_center, axis=1).max() > planted.head_radius


def test_study_reports_the_planted_region_and_captions(tiny_cohort, tmp_path):
    folder = tiny_cohort("femur")
    results = tmp_path / "results" / "femur"
    ingest_cohort({"source": "synthetic", "manifest": "subjects.csv"}, "femur", results / "cohort", base_dir=folder)
    summary = run_study("cam_fai", results, [], tmp_path / "study")
    row = summary["femur"]["ground_truth_all"]
    assert (row["n_cam"], row["n_control"]) == (3, 7)
    assert row["test_method"].startswith("two-sided Welch t on the displacement along the surface normal, exact")
    assert row["n_planted_points"] > 0
    assert row["n_significant_points"] == row["n_significant_planted"] + row["n_significant_elsewhere"]
    assert row["normal_difference_planted_mm"] > row["normal_difference_elsewhere_mm"]
    assert 2.5 <= row["planted_amplitude_mm"] <= 5.0
    assert any(n.startswith("planted region from the femur generator") for n in summary["notes"])
    assert any("ground_truth per-point Welch test: not computed" in n for n in summary["notes"])  # 1 cam subject
    figures = json.loads((tmp_path / "study" / "figures.json").read_text())
    assert [f["file"] for f in figures] == ["figures/femur_group_difference.png", "figures/femur_significance.png"]
    for entry in figures:
        assert "ground_truth_all: 3 cam, 7 control" in entry["caption"]
        assert (tmp_path / "study" / entry["file"]).stat().st_size > 1000
    assert "Welch t" in figures[1]["caption"] and "Benjamini-Hochberg" in figures[1]["caption"]
    assert "black line" in figures[1]["caption"]

    # without the generator's folder (moved away, or a real cohort) the study still runs, and says why
    # there is no planted region
    report_path = results / "cohort" / "report.json"
    report = json.loads(report_path.read_text())
    report["source"]["path"] = str(tmp_path / "moved" / "subjects.csv")
    report_path.write_text(json.dumps(report))
    summary = run_study("cam_fai", results, [], tmp_path / "study_real")
    row = summary["femur"]["ground_truth_all"]
    assert "n_planted_points" not in row and "n_significant_points" in row
    assert any("planted region could not be read" in n for n in summary["notes"])
    figures = json.loads((tmp_path / "study_real" / "figures.json").read_text())
    assert "black line" not in figures[1]["caption"] and "isometric" in figures[1]["caption"]
