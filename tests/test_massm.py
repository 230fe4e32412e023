"""MASSM's parts (peak decoding, heatmap targets, ROI sampling) and a tiny multi-anatomy run through the
engine: the synthetic hip cohort generated, ingested, resampled, trained and tested."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from deepssm_workflow.cli import main
from deepssm_workflow.inference import load_trained
from deepssm_workflow.methods.massm import DETECTION_STRIDE, boxes, decode_peaks, heatmap_targets, roi_features
from deepssm_workflow.synthetic.multi_anatomy import MultiAnatomySettings, generate_multi_anatomy_cohort


def test_peaks_decode_to_the_centres_that_made_the_targets():
    """A heatmap target built for known centres decodes (peak cell + offset) back to them; an absent anatomy's
    target is empty."""
    shape = (10, 12, 14)  # detection cells (z, y, x)
    centres = torch.tensor([[[5.3, 9.7, 3.1], [20.0, 4.4, 12.6]]])  # input voxels (x, y, z)
    present = torch.tensor([[True, False]])
    target = heatmap_targets(shape, present, centres, torch.full((1, 2, 3), 6.0))
    assert target[0, 0].max() == 1.0 and target[0, 1].max() == 0.0
    logits = torch.logit(target.clamp(1e-4, 1 - 1e-4))
    cell = ((centres - (DETECTION_STRIDE - 1) / 2) / DETECTION_STRIDE).round()
    offset = torch.zeros(1, 3, *shape)
    for k in range(2):
        x, y, z = cell[0, k].long().tolist()
        offset[0, :, z, y, x] = (centres[0, k] - (cell[0, k] * DETECTION_STRIDE + (DETECTION_STRIDE - 1) / 2)) \
            / DETECTION_STRIDE
    peak, decoded, _ = decode_peaks(logits, offset, torch.zeros(1, 3, *shape))
    torch.testing.assert_close(decoded[0, 0], centres[0, 0])
    assert peak[0, 0] > 0.99 and peak[0, 1] < 0.01


def test_boxes_mark_absent_anatomies_and_roi_features_follow_the_centre():
    points = torch.randn(2, 3, 20, 3) * 5 + 30
    points[1, 2] = float("nan")
    present, centre, half = boxes(points)
    assert present.tolist() == [[True, True, True], [True, True, False]]
    assert torch.isnan(centre[1, 2]).all() and torch.isfinite(centre[0]).all()
    torch.testing.assert_close(centre[0, 0], (points[0, 0].amax(0) + points[0, 0].amin(0)) / 2)
    pyramid = [torch.randn(2, 4, 16 // 2**i, 16 // 2**i, 16 // 2**i) for i in range(3)]
    where = torch.full((2, 3, 3), 12.0, requires_grad=True)
    features = roi_features(pyramid, where, torch.full((2, 3, 3), 5.0), samples=4)
    assert features.shape == (2, 3, 4 * (64 + 8 + 1))
    features.square().sum().backward()
    assert torch.isfinite(where.grad).all() and where.grad.abs().sum() > 0  # the features move with the centre


@pytest.mark.slow
def test_a_tiny_hip_run_detects_every_anatomy_and_beats_the_template_at_its_detection(tmp_path):
    """16 training scans of both femurs and the bladder at 8 mm, 80 epochs on the CPU: for every anatomy, the
    detected centre is within half the anatomy's half extent of the truth, and the local particles beat the
    anatomy's template placed at the detected centre (what the displacement head adds)."""
    generate_multi_anatomy_cohort(MultiAnatomySettings.from_config({
        "seed": 7, "subjects": {"train": {"control": 16}, "test": {"control": 6}}, "n_particles": 64,
        "spacing_mm": 3, "mesh_resolution_mm": 3, "size_mm": [360, 170, 180], "missing_fraction": 0.2}),
        tmp_path / "cohort", prefix="hip")
    # the steps a user runs by hand, through the command line
    source = json.dumps({"source": "csv", "manifest": str(tmp_path / "cohort/subjects.csv")})
    steps = [["ingest-multi", "--source", source, "--out-dir", str(tmp_path / "ingested")],
             ["preprocess-multi-scans", "--cohort", str(tmp_path / "ingested"), "--settings", '{"spacing_mm": 8}',
              "--out-dir", str(tmp_path / "scans")],
             ["train-multi", "--scans-dir", str(tmp_path / "scans"), "--method", "massm", "--settings",
              json.dumps({"method": {"detect_epochs": 20, "local_epochs": 20, "joint_epochs": 40},
                          "training": {"batch_size": 4, "val_fraction": 0.2}}),
              "--out-dir", str(tmp_path / "model"), "--threads", "2"]]
    for step in steps:
        assert main(step) == 0, step[0]
    meta = json.loads((tmp_path / "scans/grid.json").read_text())
    assert meta["anatomies"] == ["femur_right", "femur_left", "bladder"]
    assert json.loads((tmp_path / "model/model_card.json").read_text())["best_phase"] == "joint"
    trained = load_trained(tmp_path / "model")
    test = np.load(tmp_path / "scans/test.npz")
    with torch.no_grad():
        found = trained.method.detect(trained.model.eval(), torch.as_tensor(test["images"]).unsqueeze(1))
    k = len(meta["anatomies"])
    local = test["local"].reshape(len(test["ids"]), k, meta["n_points"], 3).astype(np.float64)
    template = trained.model.template_local.numpy().astype(np.float64)
    results = {}
    for a, name in enumerate(meta["anatomies"]):
        present = test["present"][:, a]
        truth = local[present, a]
        true_centre = (truth.max(1) + truth.min(1)) / 2
        centre = found["centre_mm"][present, a].numpy()
        predicted = found["local"][present, a].numpy()
        detected = found["present"][present, a].numpy()

        def rmse(points, truth=truth):
            return float(np.sqrt(((points - truth) ** 2).mean(1)).mean())

        results[name] = {"centre_error": float(np.linalg.norm(centre - true_centre, axis=1).mean()),
                         "half_extent": float(np.median((truth.max(1) - truth.min(1)).max(1) / 2)),
                         "rmse": rmse(predicted), "template_at_detection": rmse(template[a] + centre[:, None]),
                         "n_detected": int(detected.sum()),
                         # what a user gets: the scans where the anatomy was detected
                         "rmse_detected": rmse(predicted[detected], truth[detected]),
                         "template_detected": rmse((template[a] + centre[:, None])[detected], truth[detected])}
    print(json.dumps(results, indent=1))
    for name, r in results.items():
        assert r["centre_error"] < 0.5 * r["half_extent"], (name, r)
        assert r["rmse"] < r["template_at_detection"], (name, r)

    # the per-anatomy evaluation of what predict-multi delivered finds the same figures, each with its interval
    # and n: the prediction's over the scans where the anatomy was detected (it delivers nothing elsewhere),
    # the template's at the detection over every scan that has it (float32 rounding apart: predict's network
    # has its batch norms folded)
    assert main(["predict-multi", "--model-dir", str(tmp_path / "model"), "--scans-dir", str(tmp_path / "scans"),
                 "--split", "test", "--out-dir", str(tmp_path / "predictions")]) == 0
    assert main(["evaluate-multi", "--model-dir", str(tmp_path / "model"), "--scans-dir", str(tmp_path / "scans"),
                 "--predictions-dir", str(tmp_path / "predictions"), "--out-dir", str(tmp_path / "evaluation")]) == 0
    summary = pd.read_csv(tmp_path / "evaluation/summary.csv").set_index("anatomy")
    for a, name in enumerate(meta["anatomies"]):
        row, expected = summary.loc[name], results[name]
        assert row["n_present"] == test["present"][:, a].sum() and row["n_absent"] == (~test["present"][:, a]).sum()
        assert row["n_predicted"] == expected["n_detected"] > 0, name
        assert row["centre_error_mm"] == pytest.approx(expected["centre_error"], rel=1e-4)
        assert row["local_rmse_mm"] == pytest.approx(expected["rmse_detected"], rel=1e-4)
        assert row["template_at_detection_mm"] == pytest.approx(expected["template_at_detection"], rel=1e-4)
        assert row["local_rmse_mm_low"] <= row["local_rmse_mm"] <= row["local_rmse_mm_high"]
        assert expected["rmse_detected"] < expected["template_detected"]
        assert row["beats_template_at_detection"]
        # misses counted: every scan with the anatomy, a miss scored as the template at the detector's peak
        counted = row["local_rmse_misses_counted_mm"]
        if expected["n_detected"] == row["n_present"]:
            assert counted == pytest.approx(row["local_rmse_mm"], rel=1e-4)
        else:
            assert counted != pytest.approx(row["local_rmse_mm"], rel=1e-4)
    print(summary[["world_rmse_mm", "template_world_mm", "template_at_true_centre_mm"]])

    # a new scan from its file alone: every anatomy the model detects, in the scan's frame
    subjects = pd.read_csv(tmp_path / "ingested/subjects.csv", dtype={"id": str}).set_index("id")
    n = 0
    subject = str(test["ids"][n])
    assert main(["predict-image", "--model-dir", str(tmp_path / "model"), "--scans-dir", str(tmp_path / "scans"),
                 "--image", subjects.loc[subject, "image"], "--out-prefix", str(tmp_path / "new" / subject)]) == 0
    detections = json.loads((tmp_path / "new" / f"{subject}_detections.json").read_text())
    assert list(detections) == meta["anatomies"]
    for a, name in enumerate(meta["anatomies"]):
        file = tmp_path / "new" / f"{subject}_{name}_local.particles"
        assert detections[name]["detected"] == bool(found["present"][n, a]) == file.exists()
        if file.exists():
            expected = found["local"][n, a].numpy() + test["origins"][n]
            np.testing.assert_allclose(np.loadtxt(file), expected, atol=1e-3)
    for figure in ("rmse_boxplots.png", "best_worst.png"):
        assert (tmp_path / "evaluation" / figure).stat().st_size > 10_000


def test_a_scan_where_massm_detects_nothing_is_refused_by_subject_with_its_reason(tmp_path):
    """Through the single-anatomy scan prediction: a scan whose heatmap peak stays under the presence threshold
    gets no particles, and the message says why in massm's terms (not image2ssm's segmentation)."""
    from deepssm_workflow.engine import EngineSettings, train
    from deepssm_workflow.methods import get
    from deepssm_workflow.predict import predict_scans
    from deepssm_workflow.shape_space import ShapeSpace

    rng = np.random.default_rng(0)
    images = rng.normal(0, 1, (8, 16, 16, 16)).astype(np.float32)
    points = (rng.uniform(4, 11, (1, 12, 3)) + rng.normal(0, 0.3, (8, 12, 3))).astype(np.float32)
    settings = get("massm").smoke_settings()
    train("massm", settings, images, points, np.arange(6), np.arange(6, 8), ShapeSpace(n_modes=2).fit(points[:6]),
          tmp_path / "model", engine=EngineSettings(batch_size=4), device="cpu", log=lambda _: None,
          segmentations=np.zeros_like(images), extras={"world": points})
    card = json.loads((tmp_path / "model/model_card.json").read_text())
    card["network"]["presence_threshold"] = 0.9999  # nothing passes it
    (tmp_path / "model/model_card.json").write_text(json.dumps(card))
    (tmp_path / "scans").mkdir()
    np.savez(tmp_path / "scans/test.npz", ids=np.array(["s1", "s2"]), images=images[:2], origins=np.zeros((2, 3)),
             seconds=np.zeros(2))
    with pytest.raises(ValueError, match=r"subject s1: .*test.npz: prediction refused: the heatmap's peak stayed "
                                         r"below presence_threshold"):
        predict_scans(tmp_path / "model", tmp_path / "scans", "test", tmp_path / "predictions")
    assert not (tmp_path / "predictions" / "predictions.csv").exists()
