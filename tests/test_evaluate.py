"""Evaluation: metrics against hand-computed values, surfaces, and the evaluation folder on a real cohort."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import pyvista as pv

from deepssm_workflow.evaluate import (
    MEAN_SHAPE,
    PCA_FLOOR,
    evaluate_dataset,
    gap_closed,
    per_point_rmse,
    rmse_against_baselines,
)
from deepssm_workflow.ingest import ingest_cohort
from deepssm_workflow.intervals import bootstrap_interval, mean_interval
from deepssm_workflow.io import write_particles
from deepssm_workflow.layout import DatasetLayout
from deepssm_workflow.surface import (
    TemplateMesh,
    distances_to_surface,
    surface_distance,
    template_from_training,
    values_at_vertices,
)


def test_errors_are_measured_in_the_scan_frame_against_both_baselines(tmp_path):
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(40, 3)) * 20
    modes = rng.normal(size=(2, 40, 3))
    train = mean + np.einsum("nk,kmd->nmd", rng.normal(size=(6, 2)) * 3, modes)
    truth = mean + np.einsum("nk,kmd->nmd", rng.normal(size=(2, 2)) * 3, modes) + rng.normal(size=(2, 40, 3)) * 0.5
    shift = np.array([5.0, -3.0, 2.0])  # scanner frame = world shifted; registration found it exactly
    image_to_world = np.tile(np.eye(4), (2, 1, 1))
    image_to_world[:, :3, 3] = shift
    ids = np.array(["a", "b"])
    layout = DatasetLayout(tmp_path)
    cohort, preprocess, predictions = layout.cohort_dir, layout.preprocess_dir, layout.predictions_dir("base")
    for folder in (cohort, preprocess, predictions):
        folder.mkdir(parents=True)
    np.savez(cohort / "shapes_train.npz", ids=np.array(list("cdefgh")), world=train,
             image_to_world=np.tile(np.eye(4), (6, 1, 1)))
    np.savez(cohort / "shapes_test.npz", ids=ids, world=truth, local=truth - shift, image_to_world=image_to_world)
    pd.DataFrame({"id": [*ids, *"cdefgh"], "split": ["test"] * 2 + ["train"] * 6}).to_csv(cohort / "subjects.csv")
    np.savez(preprocess / "test.npz", ids=ids, image_to_world=image_to_world)
    offset = np.array([0.3, 0.6, 0.9])  # every predicted point off by this
    rows = []
    for subject, shape in zip(ids, truth):
        write_particles(predictions / f"{subject}.particles", shape - shift + offset)
        rows.append({"id": subject, "local_particles": f"{subject}.particles"})
    pd.DataFrame(rows).to_csv(predictions / "predictions.csv", index=False)

    table = rmse_against_baselines(tmp_path, "base", {"n_modes": 2})
    assert table["rmse_mm"].to_numpy() == pytest.approx([offset.mean()] * 2)  # eq. 12: mean of per-axis RMSE
    expected_mean = [np.mean(np.sqrt(((train.mean(0) - t) ** 2).mean(0))) for t in truth]
    assert table["mean_shape_rmse_mm"].to_numpy() == pytest.approx(expected_mean)
    # two modes capture the structured part; the floor is the unstructured 0.5 mm noise
    assert (table["pca_floor_rmse_mm"] < table["mean_shape_rmse_mm"]).all()
    assert table["pca_floor_rmse_mm"].to_numpy() == pytest.approx([0.5, 0.5], abs=0.15)

    # a test subject without a prediction is named, with the table
    pd.DataFrame(rows[:1]).to_csv(predictions / "predictions.csv", index=False)
    with pytest.raises(ValueError, match=r"predictions\.csv: no prediction for test subject b"):
        rmse_against_baselines(tmp_path, "base", {"n_modes": 2})


def test_per_point_rmse_and_gap_closed_by_hand():
    true = np.zeros((2, 3, 3))
    pred = true.copy()
    pred[0, 0] = [3.0, 4.0, 0.0]  # |d|^2 = 25 over 3 axes
    pred[1, 2] = [1.0, 1.0, 1.0]
    expected = np.array([[np.sqrt(25 / 3), 0, 0], [0, 0, 1.0]])
    assert per_point_rmse(pred, true) == pytest.approx(expected)
    assert gap_closed(2.0, mean_shape=3.0, floor=1.0) == pytest.approx(0.5)
    assert gap_closed(3.0, mean_shape=3.0, floor=1.0) == pytest.approx(0.0)
    assert np.isnan(gap_closed(1.0, mean_shape=1.0, floor=1.0))
    with pytest.raises(ValueError, match="equal shape"):
        per_point_rmse(pred[:, :2], true)


def test_surface_distance_is_to_the_surface_not_its_vertices():
    triangle = pv.PolyData(np.array([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]]), faces=[3, 0, 1, 2])
    above = np.array([[2.0, 3.0, 1.5], [20.0, 0.0, 0.0]])
    # over the interior: straight down; beside it: to the nearest vertex (10, 0, 0)
    assert distances_to_surface(above, triangle) == pytest.approx([1.5, 10.0])

    lower = pv.Plane(i_size=20, j_size=20, i_resolution=8, j_resolution=8).triangulate()
    upper = lower.translate((0, 0, 0.7), inplace=False)
    distance = surface_distance(upper, lower)
    assert distance.to_true == pytest.approx(np.full(lower.n_points, 0.7))
    assert distance.mean_mm == pytest.approx(0.7) and distance.hausdorff_mm == pytest.approx(0.7)


def test_template_warp_reproduces_an_affine_change_exactly():
    sphere = pv.Sphere(radius=10, theta_resolution=24, phi_resolution=24)
    handles = np.asarray(sphere.points)[::7]
    matrix = np.array([[2.0, 0.1, 0], [0, 1.5, 0], [0.2, 0, 1]])
    template = TemplateMesh(mesh=sphere, handles=handles, subject="s")
    warped = template.warp(handles @ matrix.T + [5, -2, 1])
    assert np.asarray(warped.points) == pytest.approx(np.asarray(sphere.points) @ matrix.T + [5, -2, 1], abs=1e-6)
    assert warped.n_cells == sphere.n_cells
    with pytest.raises(ValueError, match="points to warp"):
        template.warp(handles[:-1])


def test_template_is_the_training_subject_nearest_the_mean_that_has_a_mesh(tmp_path):
    sphere = pv.Sphere(radius=5)
    sphere.save(tmp_path / "s.vtk")
    handles = np.asarray(sphere.points)[::10]
    world = np.stack([handles * 1.0, handles * 1.1, handles * 1.3])  # mean = 1.133: nearest is 1.1, then 1.0/1.3
    to_world = np.tile(np.eye(4), (3, 1, 1))
    to_world[:, :3, 3] = [10.0, 0, 0]  # meshes are in the scanner frame; the template lives in the world
    template = template_from_training(["a", "b", "c"], world, to_world, ["", str(tmp_path / "s.vtk"), "x"])
    assert template.subject == "b"
    assert np.asarray(template.mesh.points) == pytest.approx(np.asarray(sphere.points) + [10, 0, 0], abs=1e-5)
    with pytest.raises(ValueError, match="no training subject has a mesh"):
        template_from_training(["a"], world[:1], to_world[:1], [""])
    (tmp_path / "bad.vtk").write_text("not a mesh")
    with pytest.raises(ValueError, match=r"bad\.vtk: subject a: not a readable mesh"):
        template_from_training(["a"], world[:1], to_world[:1], [str(tmp_path / "bad.vtk")])


def test_values_at_vertices_interpolates_between_points():
    points = np.array([[0.0, 0, 0], [2.0, 0, 0]])
    values = np.array([1.0, 3.0])
    at = values_at_vertices(np.array([[0.0, 0, 0], [1.0, 0, 0]]), points, values, k=2)
    assert at == pytest.approx([1.0, 2.0])


# -- the evaluation folder on a real (tiny, generated) cohort

@pytest.fixture(scope="module")
def evaluated_layout(tiny_cohort, tmp_path_factory):
    """results/femur-like folder: the ingested tiny cohort, a perfect registration, two hand-made
    'methods' (the truth itself, and the truth shifted by 1 mm along x), model cards, timings."""
    root = tmp_path_factory.mktemp("results_femur")
    ingest_cohort({"source": "csv", "manifest": str(tiny_cohort("femur") / "subjects.csv")}, "femur", root / "cohort")
    truth = np.load(root / "cohort" / "shapes_test.npz")
    (root / "preprocess").mkdir()
    np.savez(root / "preprocess" / "test.npz", ids=truth["ids"], image_to_world=truth["image_to_world"])
    for variant, offset in (("base", 0.0), ("tl", 1.0)):
        folder = root / "predictions" / variant
        (folder / "particles").mkdir(parents=True)
        rows = []
        for subject, local in zip(truth["ids"], truth["local"]):
            write_particles(folder / "particles" / f"{subject}_local.particles", local + [offset, 0, 0])
            rows.append({"id": subject, "local_particles": f"particles/{subject}_local.particles",
                         "preprocess_seconds": 2.0, "network_seconds": 0.5, "seconds_per_scan": 2.5})
        pd.DataFrame(rows).to_csv(folder / "predictions.csv", index=False)
        (root / "models" / variant).mkdir(parents=True)
        (root / "models" / variant / "model_card.json").write_text(json.dumps(
            {"method": variant, "best_epoch": 3, "val_rmse": 1.5}))
    return root


def test_evaluation_folder_of_a_real_cohort(evaluated_layout, tmp_path):
    root = evaluated_layout
    subjects = pd.read_csv(root / "cohort" / "subjects.csv")
    test_ids = list(subjects.loc[subjects["split"] == "test", "id"])
    summary = evaluate_dataset(root, ["base", "tl"], {"n_modes": 4}, tmp_path / "evaluation")
    out = tmp_path / "evaluation"
    assert summary["n_test"] == len(test_ids) and summary["notes"] == []
    assert summary["surface_measured_subjects"] == test_ids
    methods = summary["methods"]
    assert methods["base"]["rmse_mm"] == pytest.approx(0.0, abs=1e-5)  # the truth itself
    assert methods["tl"]["rmse_mm"] == pytest.approx(1 / 3, abs=1e-5)  # eq. 12: (1 + 0 + 0) / 3
    assert methods[PCA_FLOOR]["gap_closed"] == pytest.approx(1.0) and methods[MEAN_SHAPE]["gap_closed"] == 0.0
    assert methods["base"]["gap_closed"] > 1.0  # better than the floor: it is not restricted to 4 modes
    # a mesh rebuilt from the true points lies close to the true mesh: the warp itself costs little
    assert methods["base"]["surface_mean_mm"] < 0.5 * methods[MEAN_SHAPE]["surface_mean_mm"]
    assert methods["base"]["surface_mean_mm"] < methods["tl"]["surface_mean_mm"]
    # the 1 mm shift: points are 1 mm off, the surface (which slides along itself) at most that
    assert 0.1 < methods["tl"]["surface_mean_mm"] < 1.0 + methods["base"]["surface_mean_mm"]

    per_point = np.load(out / "per_point.npz")
    assert list(per_point["methods"]) == ["base", "tl", MEAN_SHAPE, PCA_FLOOR]
    assert per_point["mean"][1] == pytest.approx(np.full(per_point["mean"].shape[1], np.sqrt(1 / 3)))
    timing = pd.read_csv(out / "tables" / "inference_time.csv").set_index("method")
    assert timing.loc["base", "per_scan_s"] == 2.5 and timing.loc["Base-DeepSSM", "network_s"] == 1.25
    assert "reported in the paper" in timing.loc["ShapeWorks", "source"]
    assert timing.loc["ShapeWorks", "per_scan_s"] == 65 * 60
    per_subject = pd.read_csv(out / "tables" / "accuracy_per_subject.csv")
    assert len(per_subject) == 4 * len(test_ids) and per_subject["surface_mean_mm"].notna().all()
    # paired: base (the truth) is below the mean shape and tl (1 mm off everywhere) on every one of the 3 test
    # scans, by exactly 1/3 mm against tl; with 3 scans the exact sign-flip p is 0.25: nothing can be called
    paired = pd.read_csv(out / "tables" / "paired_differences.csv").set_index(["method", "against"])
    assert list(paired.index) == [("base", MEAN_SHAPE), ("tl", MEAN_SHAPE), ("base", "tl")]
    assert paired.loc[("base", "tl"), "difference_mm"] == pytest.approx(-1 / 3, abs=1e-5)
    assert len(test_ids) == 3 and paired.loc[("base", "tl"), "p"] == pytest.approx(0.25)
    assert (paired["verdict"] == "cannot tell apart from").all() and paired["p_holm"].notna().all()
    figures = json.loads((out / "figures.json").read_text())
    assert [f["file"] for f in figures] == ["error_decomposition.png", "per_point_rmse.png", "surface_boxplot.png",
                                            "surface_heatmaps.png"]
    for entry in figures:
        image = mpimg.imread(out / entry["file"])
        assert image.shape[0] > 200 and image.std() > 0.05 and entry["caption"]
    for entry in json.loads((out / "tables.json").read_text()):
        assert (out / entry["file"]).is_file()
    assert not list(out.glob(".staging*"))


def test_subjects_without_meshes_are_named_not_dropped(evaluated_layout, tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    for name in ("preprocess", "predictions", "models"):
        (root / name).symlink_to(evaluated_layout / name)
    (root / "cohort").mkdir()
    for name in ("shapes_train.npz", "shapes_test.npz", "report.json"):
        (root / "cohort" / name).symlink_to(evaluated_layout / "cohort" / name)
    subjects = pd.read_csv(evaluated_layout / "cohort" / "subjects.csv")
    test = subjects.index[subjects["split"] == "test"]
    subjects.loc[test[0], "mesh"] = np.nan
    subjects.to_csv(root / "cohort" / "subjects.csv", index=False)
    summary = evaluate_dataset(root, ["base"], {"n_modes": 4}, tmp_path / "partial")
    unmeasured = subjects.loc[test[0], "id"]
    assert any(unmeasured in note for note in summary["notes"])
    assert unmeasured not in summary["surface_measured_subjects"]
    table = pd.read_csv(tmp_path / "partial" / "tables" / "accuracy_per_subject.csv")
    assert table.loc[table["id"] == unmeasured, "surface_mean_mm"].isna().all()
    assert table.loc[table["id"] != unmeasured, "surface_mean_mm"].notna().all()

    subjects["mesh"] = np.nan  # a cohort without meshes: the metric is skipped, visibly
    subjects.to_csv(root / "cohort" / "subjects.csv", index=False)
    summary = evaluate_dataset(root, ["base"], {"n_modes": 4}, tmp_path / "none")
    assert summary["surface_measured_subjects"] == [] and "Surface distance not measured" in summary["notes"][0]
    figures = json.loads((tmp_path / "none" / "figures.json").read_text())
    assert [f["file"] for f in figures] == ["error_decomposition.png", "per_point_rmse.png"]
    assert (tmp_path / "none" / "surface_boxplot.png").is_file()  # the note, as the declared output

    # a test subject's mesh that is gone: named with its subject, and nothing written
    subjects = pd.read_csv(evaluated_layout / "cohort" / "subjects.csv")
    subjects.loc[test[0], "mesh"] = str(tmp_path / "gone.vtk")
    subjects.to_csv(root / "cohort" / "subjects.csv", index=False)
    with pytest.raises(ValueError, match=rf"gone\.vtk: subject {unmeasured}: mesh file not found"):
        evaluate_dataset(root, ["base"], {"n_modes": 4}, tmp_path / "gone")
    assert not (tmp_path / "gone").exists()

    # a broken prediction file: named, and no partial evaluation left behind
    bad = tmp_path / "bad_predictions" / "base"
    bad.mkdir(parents=True)
    table = pd.read_csv(evaluated_layout / "predictions" / "base" / "predictions.csv")
    table.to_csv(bad / "predictions.csv", index=False)
    (bad / "particles").mkdir()
    for path in table["local_particles"]:
        (bad / path).write_text("1 2 3\n")
    (root / "predictions").unlink()
    (root / "predictions").symlink_to(bad.parent)
    with pytest.raises(ValueError, match=rf"{table['id'][0]}_local\.particles: subject {table['id'][0]} has 1 points"):
        evaluate_dataset(root, ["base"], {"n_modes": 4}, tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


# -- the error decomposition and the intervals


def test_a_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.normal(2.0, 1.0, 10), rng.normal(2.0, 1.0, 400)
    low, high = mean_interval(small)
    assert low < small.mean() < high and mean_interval(small) == (low, high)  # seeded
    wide = high - low
    low, high = mean_interval(large)
    assert low < large.mean() < high and high - low < wide / 3  # ~ 1 / sqrt(n)
    assert all(np.isnan(mean_interval([1.0])))


def test_a_paired_bootstrap_skips_undefined_resamples_and_refuses_when_most_are():
    def positive_share(labels):
        if labels.min() == labels.max():
            raise ValueError("one class")
        return labels.mean()

    mixed = np.array([0, 1] * 10)
    low, high = bootstrap_interval(positive_share, mixed)
    assert 0.2 < low < 0.5 < high < 0.8
    def at_least_two_positives(labels):
        if labels.sum() < 2:
            raise ValueError("fewer than two positives")
        return labels.mean()

    rare = np.array([1] + [0] * 39)  # ~74 % of the resamples draw the one positive once or never: no interval
    assert all(np.isnan(bootstrap_interval(at_least_two_positives, rare)))
    x = np.arange(30.0)
    low, high = bootstrap_interval(lambda a, b: np.corrcoef(a, b)[0, 1], x, x + np.sin(x))  # pairs stay paired
    assert 0.9 < low <= high <= 1.0


def test_the_error_is_split_into_alignment_and_network(evaluated_layout, tmp_path):
    """The registration of the evaluated layout, off by 2 mm along world x: a prediction equal to the
    true local shape has no scan-frame error and (2 + 0 + 0) / 3 mm (eq. 12) in the world frame, and
    the true shape placed by that registration is off by the same 2 mm, seen along each scan's own
    (rotated) axes: eq. 12 averages the coordinates' RMSEs, so it costs sum(|R^-1 (2, 0, 0)|) / 3."""
    root = tmp_path / "results"
    root.mkdir()
    for name in ("cohort", "predictions", "models"):
        (root / name).symlink_to(evaluated_layout / name)
    (root / "preprocess").mkdir()
    registered = dict(np.load(evaluated_layout / "preprocess" / "test.npz"))
    off = np.eye(4)
    off[0, 3] = 2.0
    perfect = registered["image_to_world"].copy()
    registered["image_to_world"] = off @ perfect
    np.savez(root / "preprocess" / "test.npz", **registered)

    summary = evaluate_dataset(root, ["base", "tl"], {"n_modes": 4}, tmp_path / "evaluation")
    split = summary["error_decomposition"]
    assert split["base"]["scan_rmse_mm"] == pytest.approx(0.0, abs=1e-5)
    assert split["base"]["world_rmse_mm"] == pytest.approx(2 / 3, abs=1e-5)
    assert split["base"]["world_rms3d_mm"] == pytest.approx(2.0, abs=1e-5)  # 2 mm from every point: 3D RMS
    assert split["base"]["scan_rms3d_mm"] == pytest.approx(0.0, abs=1e-5)
    # the world yardsticks do not depend on the alignment; the network's own gap is measured between them
    base = split["base"]
    assert base["world_mean_shape_mm"] == split["tl"]["world_mean_shape_mm"] > base["world_pca_floor_mm"]
    zero, one = base["world_mean_shape_mm"], base["world_pca_floor_mm"]
    assert base["world_gap_closed"] == pytest.approx((zero - base["world_rmse_mm"]) / (zero - one))
    in_scan = [np.abs(np.linalg.inv(t[:3, :3]) @ [2.0, 0, 0]).sum() / 3 for t in perfect]
    assert split["base"]["true_shape_aligned_mm"] == pytest.approx(np.mean(in_scan), abs=1e-5)
    assert split["base"]["pca_floor_aligned_mm"] >= split["base"]["true_shape_aligned_mm"] - 0.05
    assert split["tl"]["true_shape_aligned_mm"] == split["base"]["true_shape_aligned_mm"]  # the same alignment
    n = len(registered["ids"])
    for method in ("base", "tl"):
        row = split[method]
        assert row["n"] == n
        for term in ("scan_rmse_mm", "true_shape_aligned_mm", "pca_floor_aligned_mm", "mean_shape_rmse_mm"):
            assert row[f"{term}_low"] <= row[term] + 1e-9 and row[term] <= row[f"{term}_high"] + 1e-9, term
    # against the reachable floor the perfect prediction is past it; the old gap_closed is kept beside it
    assert split["base"]["reachable_gap_closed"] > 1.0 and "gap_closed_true_pose" in split["base"]
    for term in ("reachable_gap_closed", "gap_closed_true_pose"):  # paired bootstrap over the test subjects
        row = split["base"]
        assert row[f"{term}_low"] <= row[term] + 1e-9 <= row[f"{term}_high"] + 2e-9, term
    table = pd.read_csv(tmp_path / "evaluation" / "tables" / "error_decomposition.csv")
    assert list(table["method"]) == ["base", "tl"]
    per_subject = pd.read_csv(tmp_path / "evaluation" / "tables" / "error_decomposition_per_subject.csv")
    assert len(per_subject) == 2 * n
    accuracy = pd.read_csv(tmp_path / "evaluation" / "tables" / "accuracy_summary.csv").set_index("method")
    assert (accuracy["rmse_low_mm"] <= accuracy["rmse_mm"] + 1e-9).all() and (accuracy["n"] == n).all()
    image = mpimg.imread(tmp_path / "evaluation" / "error_decomposition.png")
    assert image.shape[0] > 150 and image.std() > 0.05


def test_a_method_that_aligns_the_scans_itself_is_measured_through_its_own_alignment(evaluated_layout, tmp_path):
    """The registration off by 2 mm along world x, as above; `tl` says (alignment.npz) it aligned the scans itself,
    exactly. Its floors and its mean-shape baseline follow its own alignment, base's the registration's; the
    alignment table measures both alike: 2 mm and 0 degrees off for the registration, nothing for tl."""
    root = tmp_path / "results"
    root.mkdir()
    for name in ("cohort", "models"):
        (root / name).symlink_to(evaluated_layout / name)
    (root / "preprocess").mkdir()
    registered = dict(np.load(evaluated_layout / "preprocess" / "test.npz"))
    perfect = registered["image_to_world"].copy()
    off = np.eye(4)
    off[0, 3] = 2.0
    registered["image_to_world"] = off @ perfect
    np.savez(root / "preprocess" / "test.npz", **registered)
    (root / "predictions").mkdir()
    (root / "predictions" / "base").symlink_to(evaluated_layout / "predictions" / "base")
    (root / "predictions" / "tl").mkdir()
    for name in ("particles", "predictions.csv"):
        (root / "predictions" / "tl" / name).symlink_to(evaluated_layout / "predictions" / "tl" / name)
    order = np.arange(len(perfect))[::-1]  # stored in another order than the cohort's: matched by id
    np.savez(root / "predictions" / "tl" / "alignment.npz", ids=registered["ids"][order], image_to_world=perfect[order])

    summary = evaluate_dataset(root, ["base", "tl"], {"n_modes": 4}, tmp_path / "evaluation")
    split = summary["error_decomposition"]
    assert split["tl"]["true_shape_aligned_mm"] == pytest.approx(0.0, abs=1e-6)
    assert split["base"]["true_shape_aligned_mm"] > 0.3
    assert split["tl"]["mean_shape_aligned_mm"] != pytest.approx(split["base"]["mean_shape_aligned_mm"], abs=1e-3)
    aligned = pd.read_csv(tmp_path / "evaluation" / "tables" / "alignment_accuracy.csv").set_index("method")
    assert aligned.loc["base", "aligned_by"] == "registration" and aligned.loc["tl", "aligned_by"] == "its own pose"
    assert aligned.loc["base", "centre_error_mm"] == pytest.approx(2.0, abs=1e-6)
    assert aligned.loc["tl", "centre_error_mm"] == pytest.approx(0.0, abs=1e-6)
    assert aligned["rotation_error_deg"].abs().max() < 1e-3
    assert (aligned["n"] == len(perfect)).all()
    # an alignment that misses a test subject is refused by name
    np.savez(root / "predictions" / "tl" / "alignment.npz", ids=registered["ids"][1:], image_to_world=perfect[1:])
    with pytest.raises(ValueError, match=f"alignment.npz: no alignment for test subject.*{registered['ids'][0]}"):
        evaluate_dataset(root, ["base", "tl"], {"n_modes": 4}, tmp_path / "again")
