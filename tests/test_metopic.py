"""The synthetic metopic craniosynostosis anatomy: template, trigonocephaly effects
measured on deformed world-frame points, no folding, simulated ratings, and a
tiny end-to-end cohort."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import stats

from deepssm_workflow.synthetic.cohort import SyntheticSettings, generate_cohort
from deepssm_workflow.synthetic.metopic import N_RATERS, Metopic

N_PER_GROUP = 100


@pytest.fixture(scope="module")
def anatomy() -> Metopic:
    return Metopic(5.0)


def _anchor_ids(anatomy: Metopic) -> dict[str, int]:
    verts = anatomy.template.vertices
    return {name: int(np.argmin(np.linalg.norm(verts - point, axis=1)))
            for name, point in anatomy.template.anchors.items()}


def _measures(anatomy: Metopic, params: dict[str, float]) -> dict[str, float]:
    """Forehead width, posterior width and frontal midline protrusion of the deformed surface."""
    ids = _anchor_ids(anatomy)
    x = anatomy.deform(anatomy.template.vertices, params)
    left, right = x[ids["frontal_left"]], x[ids["frontal_right"]]
    return {
        "forehead_width": float(np.linalg.norm(left - right)),
        "posterior_width": float(np.linalg.norm(x[ids["parietal_left"]] - x[ids["parietal_right"]])),
        # how far the forehead midline sticks out in front of the lateral forehead
        "protrusion": float(x[ids["forehead"], 0] - 0.5 * (left[0] + right[0])),
    }


@pytest.fixture(scope="module")
def cohort(anatomy) -> pd.DataFrame:
    """Shape parameters and measures of N_PER_GROUP controls and metopic subjects."""
    rng = np.random.default_rng(7)
    rows = []
    for i, group in enumerate(["control", "metopic"] * N_PER_GROUP):
        params = anatomy.sample_parameters(rng, group)
        rows.append({"id": f"s{i:03d}", "group": group, **params, **_measures(anatomy, params)})
    return pd.DataFrame(rows)


def _triangle_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    n = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    return n / np.linalg.norm(n, axis=1, keepdims=True)


@pytest.mark.parametrize("resolution", [2.0, 3.0, 6.0])
def test_template_is_closed_and_fine_enough(resolution):
    template = Metopic(resolution).template
    surface = template.polydata()
    assert surface.n_open_edges == 0 and surface.is_manifold
    if resolution <= 3.0:
        assert len(template.vertices) >= 1500
    # the flat skull-base cut and a vault of infant proportions (mm)
    low, high = template.vertices.min(0), template.vertices.max(0)
    assert np.allclose(low[2], -25.0, atol=1.0)
    assert 140 < high[0] - low[0] < 160 and 115 < high[1] - low[1] < 135


def test_parameters_and_covariates(anatomy, cohort):
    controls, metopic = cohort[cohort.group == "control"], cohort[cohort.group == "metopic"]
    assert (controls.severity == 0).all()
    assert metopic.severity.between(0.2, 1.0).all() and metopic.severity.std() > 0.12
    assert cohort.age_exact_months.between(5, 15).all()
    # head size grows with age, and boys' heads are larger
    assert stats.spearmanr(cohort.age_exact_months, cohort.size_scale)[0] > 0.4
    assert cohort.size_scale[cohort.male == 1].mean() > cohort.size_scale[cohort.male == 0].mean()
    # latent severity: controls near 0 but not identical, metopic close to the true severity
    assert abs(controls.latent_severity.mean()) < 0.03 and 0.03 < controls.latent_severity.std() < 0.1
    assert np.abs(metopic.latent_severity - metopic.severity).max() < 0.25
    params = cohort.iloc[1].drop(["id", "group", "forehead_width", "posterior_width", "protrusion"]).to_dict()
    covariates = anatomy.covariates(np.random.default_rng(0), "metopic", params)
    assert set(covariates) == {"age_months", "sex"} and covariates["sex"] in ("F", "M")


def test_trigonocephaly_effects_scale_with_severity(cohort):
    metopic = cohort[cohort.group == "metopic"]
    severity = metopic.severity
    # forehead narrows and the midline protrudes; head-size-adjusted widths isolate the effect
    # from age growth (Spearman on raw widths is about -0.7 at these sample sizes)
    assert stats.spearmanr(severity, metopic.forehead_width / metopic.size_scale)[0] < -0.7
    assert stats.spearmanr(severity, metopic.forehead_width)[0] < -0.5
    assert stats.spearmanr(severity, metopic.protrusion)[0] > 0.7
    # compensatory posterior widening is milder but present
    assert stats.spearmanr(severity, metopic.posterior_width / metopic.size_scale)[0] > 0.3
    # severe metopic foreheads are clearly narrower than controls'
    controls = cohort[cohort.group == "control"]
    severe = metopic[metopic.severity > 0.7]
    assert len(severe) >= 20
    assert controls.forehead_width.mean() - severe.forehead_width.mean() > 10.0
    assert stats.mannwhitneyu(controls.forehead_width, severe.forehead_width).pvalue < 1e-8


def test_severity_alone_changes_shape_monotonically(anatomy, cohort):
    params = cohort.iloc[0].drop(["id", "group", "forehead_width", "posterior_width", "protrusion"]).to_dict()
    measures = pd.DataFrame([_measures(anatomy, {**params, "severity": s}) for s in np.linspace(0, 1, 6)])
    assert (np.diff(measures.forehead_width) < 0).all()
    assert (np.diff(measures.posterior_width) > 0).all()
    assert (np.diff(measures.protrusion) > 0).all()
    assert measures.protrusion.iloc[-1] - measures.protrusion.iloc[0] > 5.0  # the keel, ~8 mm at severity 1


def test_deformation_does_not_fold(anatomy, cohort):
    verts, faces = anatomy.template.vertices, anatomy.template.faces
    reference = _triangle_normals(verts, faces)
    extreme = cohort.iloc[1].drop(["id", "group", "forehead_width", "posterior_width", "protrusion"]).to_dict()
    extreme.update(severity=1.0, frontal_taper=0.09, frontal_bossing_mm=-4.5, occipital_flattening_mm=7.0)
    extreme.update({k: 3.0 * np.sign(v) * anatomy.rbf_sd for k, v in extreme.items() if k.startswith("rbf_")})
    subjects = [row.drop(["id", "group", "forehead_width", "posterior_width", "protrusion"]).to_dict()
                for _, row in cohort.iloc[::4].iterrows()] + [extreme]
    for params in subjects:
        normals = _triangle_normals(anatomy.deform(verts, params), faces)
        assert np.einsum("ij,ij->i", normals, reference).min() > 0.5


def test_ratings(anatomy, cohort):
    subjects = cohort[["id", "group"]]
    ratings = anatomy.cohort_tables(np.random.default_rng(3), subjects, cohort)["ratings"]
    assert list(ratings.columns) == ["subject", "rater", "rating"]
    assert ratings.rater.nunique() == N_RATERS == 36
    assert len(ratings) == N_RATERS * len(subjects)
    assert not ratings.duplicated(["subject", "rater"]).any()
    assert pd.api.types.is_integer_dtype(ratings.rating) and ratings.rating.between(1, 5).all()

    wide = ratings.pivot(index="subject", columns="rater", values="rating").loc[cohort.id]
    mean_rating = wide.mean(axis=1).to_numpy()
    assert stats.pearsonr(mean_rating, cohort.latent_severity)[0] > 0.8
    is_control = (cohort.group == "control").to_numpy()
    assert (wide.to_numpy()[is_control] <= 2).mean() > 0.9
    assert set(np.unique(wide.to_numpy()[~is_control])) >= {3, 4, 5}
    # raters differ: a systematic rater effect across the same subjects
    assert stats.friedmanchisquare(*wide.to_numpy().T).pvalue < 1e-6
    assert np.ptp(wide.mean(axis=0)) > 0.3


def test_tiny_cohort(tmp_path):
    settings = SyntheticSettings(seed=4, subjects={"train": {"control": 1, "metopic": 1}, "test": {"metopic": 1}},
                                 n_particles=64, spacing_mm=(4.0, 4.0, 4.0), mesh_resolution_mm=5.0,
                                 max_rotation_deg=15.0, fov_margin_mm=(10.0, 20.0))
    generate_cohort("metopic", settings, tmp_path)
    subjects = pd.read_csv(tmp_path / "subjects.csv")
    truth = pd.read_csv(tmp_path / "ground_truth.csv")
    assert {"age_months", "sex"} <= set(subjects.columns)
    assert not any("severity" in c for c in subjects.columns)
    assert not (set(truth.columns) - {"id"}) & set(subjects.columns)  # observed and ground truth stay apart
    assert "severity" in truth.columns and "latent_severity" in truth.columns
    ratings = pd.read_csv(tmp_path / "data/ratings.csv")
    assert len(ratings) == 3 * 36 and set(ratings.subject) == set(subjects.id)

    # the image looks like a head CT: air, brain-like interior, bone around it
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / subjects.image[0])))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / subjects.segmentation[0])))
    assert image.dtype == np.int16
    deep = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(mask), [3, 3, 3])).astype(bool)
    assert 0 < np.median(image[deep]) < 60
    assert np.percentile(image[mask.astype(bool) & ~deep], 99) > 300  # the skull, partial-volumed at 4 mm
    assert np.median(image[-1]) < -900  # the top slice, above the vertex, is mostly air
