"""Study statistics on ground-truth shapes drawn from the synthetic generators (no images:
the shapes alone, aligned to the template as the cohort writer aligns them)."""

import numpy as np
import pandas as pd

from deepssm_workflow.io import apply_transform, procrustes_fit
from deepssm_workflow.points import farthest_point_sampling
from deepssm_workflow.studies.data import Shapes
from deepssm_workflow.studies.femur import group_difference
from deepssm_workflow.studies.metopic import severity_scores
from deepssm_workflow.studies.ppca import PPCA
from deepssm_workflow.studies.stats import auc, permutation_hotelling
from deepssm_workflow.synthetic.femur import CAM_WIDTH
from deepssm_workflow.synthetic.registry import anatomy_class


def world_shapes(anatomy_name: str, groups: list[str], n_points: int, seed: int):
    """(anatomy, point ids, (N, M, 3) world shapes, parameters) for subjects of the given groups."""
    anatomy = anatomy_class(anatomy_name)(mesh_resolution_mm=4.0)
    template = anatomy.template.vertices
    ids = farthest_point_sampling(template, n_points)
    shapes, params = [], []
    for index, group in enumerate(groups):
        p = anatomy.sample_parameters(np.random.default_rng([seed, index]), group)
        deformed = anatomy.deform(template, p)
        shapes.append(apply_transform(procrustes_fit(deformed, template, scaling=False), deformed)[ids])
        params.append(p)
    return anatomy, ids, np.asarray(shapes), params


def test_femur_group_difference_peaks_at_the_cam_lesion():
    # enough subjects that the variable distal cut (sd ~4 mm at the shaft end) averages out
    groups = ["control"] * 40 + ["cam"] * 20
    anatomy, _, shapes, _ = world_shapes("femur", groups, 256, seed=5)
    cam = np.array(groups) == "cam"
    mean_cam, difference = group_difference(shapes, cam)
    peak = int(np.linalg.norm(difference, axis=1).argmax())
    lesion = anatomy.template.anchors["cam_center"]
    assert np.linalg.norm(mean_cam[peak] - lesion) < CAM_WIDTH
    # the significance map agrees: the smallest q lies at the lesion, and it is significant
    test = permutation_hotelling(shapes, cam, n_permutations=999)
    assert test["q"].min() < 0.05
    assert np.linalg.norm(mean_cam[int(test["t2"].argmax())] - lesion) < CAM_WIDTH
    significant = mean_cam[test["q"] < 0.05]
    assert np.median(np.linalg.norm(significant - lesion, axis=1)) < 3 * CAM_WIDTH


def test_metopic_severity_ranks_metopic_above_controls():
    groups = ["control"] * 24 + ["control"] * 8 + ["metopic"] * 8
    _, _, shapes, params = world_shapes("metopic", groups, 128, seed=7)
    ppca = PPCA(0.95).fit(shapes[:24])  # reference: the first 24 controls; score the 16 others
    ids = np.array([f"s{i}" for i in range(40)])
    scores = severity_scores(ppca, {"ground_truth": Shapes(ids[24:], shapes[24:])}, pd.Series(groups, index=ids))
    labels = (scores["group"] == "metopic").astype(int)
    assert auc(scores["severity"], labels) > 0.85
    # more severe trigonocephaly, larger distance (the generator's severity of the metopic subjects)
    severity = np.array([p["severity"] for p in params[32:]])
    assert np.corrcoef(severity, scores["severity"].to_numpy()[8:])[0, 1] > 0.5
