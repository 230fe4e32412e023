"""The synthetic left atrium: shape statistics measured on deformed templates (no
images) for a few hundred subjects, the deformation's validity, and one tiny cohort."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import statsmodels.api as sm
from scipy import stats

from deepssm_workflow.synthetic.cohort import SyntheticSettings, generate_cohort
from deepssm_workflow.synthetic.left_atrium import (
    ABS_ASYM_MEAN,
    ABS_ASYM_SD,
    RECURRENCE_COEFS,
    SPHERICITY_MEAN,
    SPHERICITY_SD,
    VEINS,
    LeftAtrium,
)

N_SUBJECTS = 300


@pytest.fixture(scope="module")
def anatomy() -> LeftAtrium:
    return LeftAtrium(3.0)


def triangle_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    n = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    return n / np.linalg.norm(n, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def population(anatomy) -> pd.DataFrame:
    """Parameters, covariates and shape measurements of N_SUBJECTS subjects."""
    template = anatomy.template
    verts = template.vertices
    # body wall points: firmly in the body part, split by template-space side
    body = anatomy.part_weights(verts)[:, 0] > 0.95
    left, right, middle = body & (verts[:, 0] > 5), body & (verts[:, 0] < -5), body & (np.abs(verts[:, 0]) < 5)
    names = list(template.anchors)
    anchors = np.array([template.anchors[n] for n in names])

    def lateral_ratio(points):
        # log of left over right half-width about the midline points (insensitive to a shift of the whole body)
        centre = points[middle, 0].mean()
        return np.log((points[left, 0].mean() - centre) / (centre - points[right, 0].mean()))

    baseline = lateral_ratio(verts)
    rng = np.random.default_rng(2024)
    rows = []
    for _ in range(N_SUBJECTS):
        params = anatomy.sample_parameters(rng, "patient")
        row = {**params, **anatomy.covariates(rng, "patient", params)}
        moved = anatomy.deform(np.vstack([verts, anchors]), params)
        points, a = moved[: len(verts)], dict(zip(names, moved[len(verts):]))
        eig = np.linalg.eigvalsh(np.cov(points[body].T))
        row["measured_sphericity"] = np.sqrt(eig[0] / eig[-1])  # smallest / largest principal sd
        row["measured_asymmetry"] = lateral_ratio(points) - baseline
        row["ostia_distance"] = np.linalg.norm(a["lspv_ostium"] - a["lipv_ostium"]) / params["size_scale"]
        for vein in VEINS:
            row[f"{vein}_measured_length"] = np.linalg.norm(a[f"{vein}_tip"] - a[f"{vein}_ostium"])
        row["volume"] = template.polydata(points).volume
        rows.append(row)
    return pd.DataFrame(rows)


def test_template_meshes_closed_with_resolved_veins():
    for resolution in (1.5, 4.0):
        template = LeftAtrium(resolution).template
        assert template.polydata().n_open_edges == 0
    assert len(LeftAtrium(2.0).template.vertices) >= 1500


def test_parameters_are_flat_floats_and_bimodal(population):
    assert population["sphericity"].between(0, 1).all()
    for flag in ("left_common_trunk", "laa_chicken_wing"):
        assert set(population[flag].unique()) == {0.0, 1.0}
    assert 0.15 < population["left_common_trunk"].mean() < 0.35
    bend = population.groupby("laa_chicken_wing")["laa_bend_deg"]
    assert bend.mean()[1.0] - bend.mean()[0.0] > 40  # straight vs "chicken wing"


def test_measured_sphericity_follows_parameter(population):
    rho = stats.spearmanr(population["sphericity"], population["measured_sphericity"])[0]
    assert rho > 0.8


def test_measured_asymmetry_follows_parameter(population):
    rho = stats.spearmanr(population["asymmetry"], population["measured_asymmetry"])[0]
    assert rho > 0.8


def test_volume_follows_size_not_sphericity(population):
    assert stats.spearmanr(population["size_scale"], population["volume"])[0] > 0.9
    normalized = population["volume"] / population["size_scale"] ** 3
    assert abs(stats.spearmanr(population["sphericity"], normalized)[0]) < 0.3


def test_recurrence_depends_on_measured_shape(population):
    recurrence = population["af_recurrence"] == 1
    assert 0.35 < recurrence.mean() < 0.65
    sphericity = population["measured_sphericity"]
    assert stats.mannwhitneyu(sphericity[recurrence], sphericity[~recurrence], alternative="greater").pvalue < 0.01
    # the drawn outcomes follow the generator's logistic model: its coefficients refitted within 3 standard errors
    z = np.column_stack([np.ones(len(population)),
                         (population["sphericity"] - SPHERICITY_MEAN) / SPHERICITY_SD,
                         (population["asymmetry"].abs() - ABS_ASYM_MEAN) / ABS_ASYM_SD])
    fit = sm.Logit(recurrence.to_numpy(float), z).fit(disp=0)
    assert np.all(np.abs(fit.params - np.array(RECURRENCE_COEFS)) < 3 * fit.bse), (fit.params, fit.bse)
    assert fit.params[1] > 3 * fit.bse[1]  # sphericity: the part a linear model of the shape can find
    assert set(population["sex"]) == {"F", "M"} and population["age_years"].between(18, 100).all()


def test_common_trunk_brings_left_ostia_together(population):
    trunk = population["left_common_trunk"] == 1
    distance = population["ostia_distance"]
    # two clusters with a clear gap between them
    assert distance[trunk].max() + 3.0 < distance[~trunk].min()
    assert distance[trunk].median() < 0.6 * distance[~trunk].median()


@pytest.mark.parametrize("vein", list(VEINS))
def test_vein_tips_move_with_length(population, vein):
    length = population[f"{vein}_measured_length"] / population["size_scale"]
    assert stats.spearmanr(population[f"{vein}_length"], length)[0] > 0.9


def test_deformation_does_not_fold(anatomy):
    """Random subjects with every bounded parameter pushed to an end of its range."""
    template = anatomy.template
    verts, faces = template.vertices, template.faces
    reference = triangle_normals(verts, faces)
    ends = {"sphericity": (0.0, 1.0), "asymmetry": (-0.25, 0.25), "left_vein_merge": (-0.15, 0.9),
            "laa_size": (0.75, 1.35), "laa_bend_deg": (0.0, 90.0)}
    rng = np.random.default_rng(7)
    for _ in range(40):
        params = anatomy.sample_parameters(rng, "patient")
        for key in params:
            if key in ends:
                params[key] = ends[key][rng.integers(2)]
            elif key.endswith("_deg") and "tilt" in key:
                params[key] = float(rng.choice([-15.0, 15.0]))
            elif key.endswith("_length"):
                params[key] = float(rng.choice([0.7, 1.3]))
        moved = anatomy.deform(verts, params)
        assert np.all(np.sum(triangle_normals(moved, faces) * reference, axis=1) > 0)
        # and the Jacobian of phi stays positive at every vertex (finite differences)
        jacobian = np.stack([(anatomy.deform(verts + 1e-3 * e, params) - moved) / 1e-3 for e in np.eye(3)], axis=2)
        assert np.linalg.det(jacobian).min() > 0


def test_ostia_ride_on_the_body(anatomy):
    """Veins translate with their ostia: vein tilt and length leave the ostium anchors in place."""
    rng = np.random.default_rng(3)
    params = anatomy.sample_parameters(rng, "patient")
    params["left_vein_merge"] = 0.0
    changed = dict(params, **{f"{v}_length": 1.3 for v in VEINS}, **{f"{v}_tilt_a_deg": 15.0 for v in VEINS})
    before, after = anatomy.deformed_anchors(params), anatomy.deformed_anchors(changed)
    for vein in VEINS:
        assert np.linalg.norm(before[f"{vein}_ostium"] - after[f"{vein}_ostium"]) < 0.5
        assert np.linalg.norm(before[f"{vein}_tip"] - after[f"{vein}_tip"]) > 3.0


def test_tiny_cohort(tmp_path):
    settings = SyntheticSettings(seed=5, subjects={"train": {"patient": 2}, "test": {"patient": 1}}, n_particles=64,
                                 spacing_mm=(3.0, 3.0, 3.0), mesh_resolution_mm=3.0, max_rotation_deg=15,
                                 fov_margin_mm=(5.0, 15.0))
    subjects = generate_cohort("left_atrium", settings, tmp_path)
    table = pd.read_csv(tmp_path / "subjects.csv")
    assert len(table) == 3 and set(table["af_recurrence"]) <= {0, 1}
    assert {"age_years", "sex"} <= set(table.columns)
    for row in subjects.itertuples():
        for column in ("image", "segmentation", "mesh", "local_particles", "world_particles", "transform"):
            assert (tmp_path / getattr(row, column)).is_file()
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / row.image)))
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / row.segmentation)))
        assert image.dtype == np.uint16 and image.shape == mask.shape
        # the blood pool is brighter than its surroundings, but noisy
        inside, outside = image[mask > 0].astype(float), image[mask == 0].astype(float)
        assert np.median(inside) > 1.5 * np.median(outside)
        assert inside.std() > 0.05 * inside.mean()


def test_the_recurrence_study_finds_the_signal_in_the_true_shapes(anatomy):
    """The AF study's own classifiers on PCA scores of true shapes (points only, 40 training and 40 test
    subjects): the planted signal is found at about the paper's level (68 % with the PDM), well above
    the no-information rate (the test set's most frequent class)."""
    from deepssm_workflow.points import farthest_point_sampling
    from deepssm_workflow.shape_space import ShapeSpace
    from deepssm_workflow.studies.left_atrium import classify

    points = anatomy.template.vertices[farthest_point_sampling(anatomy.template.vertices, 256)]
    rng = np.random.default_rng(7)
    shapes, outcome = [], []
    for _ in range(80):
        params = anatomy.sample_parameters(rng, "patient")
        shapes.append(anatomy.deform(points, params))
        outcome.append(anatomy.covariates(rng, "patient", params)["af_recurrence"])
    shapes, outcome = np.array(shapes), np.array(outcome)
    space = ShapeSpace(variance=0.95).fit(shapes[:40])
    result = classify(space.transform(shapes[:40]), outcome[:40], space.transform(shapes[40:]), outcome[40:])
    assert result["nir_accuracy"] == max(outcome[40:].mean(), 1 - outcome[40:].mean())
    assert result["logistic_accuracy"] >= result["nir_accuracy"] + 0.1, result
    assert result["mlp_accuracy_mean"] >= result["nir_accuracy"] + 0.1, result
    assert 0.6 <= result["mlp_accuracy_mean"] <= 0.85, result
