"""A multi-anatomy dataset (the config's `multi_anatomy`) through the real workflow: the hip generated,
ingested, resampled, trained with massm, evaluated per anatomy beside the paper's DeepSSM baselines (each
anatomy exported as a single-anatomy dataset) and reported; the report opened in headless Chromium. And the
report's paired verdicts on a hand-made evaluation."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from conftest import run_config, run_snakemake
from deepssm_workflow.report_multi import _registration_sentence, paired_difference
from test_report import inspect_in_chromium

ANATOMIES = ["femur_right", "femur_left", "bladder"]
NETWORK = {"channels": [4, 8, 8, 16, 16], "fc_sizes": [32, 16]}
CONFIG = {"multi_anatomy": {"hip": {
    "source": "synthetic",
    "synthetic": {"seed": 7, "subjects": {"train": {"control": 10}, "test": {"control": 4}}, "n_particles": 64,
                  "spacing_mm": 3, "mesh_resolution_mm": 3, "size_mm": [360, 170, 180], "missing_fraction": 0.2},
    "scan_grid": {"spacing_mm": 8},
    "training": {"batch_size": 4, "val_fraction": 0.2},
    "methods": {"massm": {"detect_epochs": 2, "local_epochs": 2, "joint_epochs": 2, "channels": 4,
                          "fpn_channels": 4, "hidden": 16}},
    "baselines": {"methods": {m: {"epochs": 2, "network": NETWORK} for m in ("base", "base_uncropped")},
                  "preprocess": {"downsample": 1, "margin_mm": 5}, "augmentation": {"n_samples": 8, "n_control": 64},
                  "shape_space": {"n_modes": 4}},
}}}


def test_paired_difference_says_beats_only_when_the_interval_is_below_zero():
    rng = np.random.default_rng(0)
    rows = []
    for anatomy, shift in (("a", -1.0), ("b", 0.0), ("c", 1.0)):
        for n in range(20):
            baseline = 5 + rng.normal()
            rows.append({"anatomy": anatomy, "present": True, "local_rmse_mm": baseline + shift + 0.05 * rng.normal(),
                         "template_at_detection_mm": baseline})
    rows.append({"anatomy": "a", "present": False, "local_rmse_mm": np.nan, "template_at_detection_mm": np.nan})
    per_scan = pd.DataFrame(rows)
    found = {a: paired_difference(per_scan, a, "local_rmse_mm", "template_at_detection_mm") for a in "abc"}
    assert found["a"]["verdict"] == "beats" and found["a"]["n"] == 20 and found["a"]["high"] < 0
    assert found["b"]["verdict"] == "cannot tell apart from" and found["b"]["low"] < 0 < found["b"]["high"]
    assert found["c"]["verdict"] == "worse than" and found["c"]["low"] > 0
    assert paired_difference(per_scan, "d", "local_rmse_mm", "template_at_detection_mm")["verdict"] == \
        "has no scan to compare with"


def test_the_verdict_says_where_the_baselines_registration_was_flagged():
    flagged = {"bladder": ([f"hip_{i:03d}" for i in range(8)], 19), "femur_left": ([], 19)}
    said = _registration_sentence("bladder", flagged, ["base"])
    assert said == (" (the registration that base needs was flagged as failed on 8 of its 19 test scans: hip_000, "
                    "hip_001, hip_002, hip_003, hip_004, hip_005 and 2 more; its errors there are the "
                    "registration's, not the network's)")
    assert _registration_sentence("femur_left", flagged, ["base"]) == ""  # nothing flagged
    assert _registration_sentence("bladder", flagged, []) == ""  # no baseline needs the registration
    assert _registration_sentence("femur_right", flagged, ["base"]) == ""


def test_the_detection_table_says_none_delivered_where_nothing_was_detected():
    from deepssm_workflow.report_multi import MEASURES, _detection_rows

    row = {"anatomy": "bladder", "n_present": 19, "n_absent": 1, "n_predicted": 0, "detection_rate": 0.0,
           "detection_rate_low": 0.0, "detection_rate_high": 0.0, "false_detection_rate": 0.0,
           "false_detection_rate_low": np.nan, "false_detection_rate_high": np.nan}
    for column, _ in MEASURES:
        predicted = column in ("local_rmse_mm", "world_rmse_mm", "local_surface_mm", "world_surface_mm")
        row.update({column: np.nan if predicted else 7.0, f"{column}_low": 6.0, f"{column}_high": 8.0})
    table = _detection_rows(pd.DataFrame([row])).iloc[0]
    assert table["local RMSE, mm"] == table["world RMSE, mm"] == "— (none delivered)"
    assert table["template at the detection, mm"] == "7.00 [6.00, 8.00]"
    # never detected, yet scored: every miss counts with the template at the detector's peak
    assert table["local RMSE, misses counted (a miss: the template at the peak), mm"] == "7.00 [6.00, 8.00]"
    assert table["scans with a prediction (detected)"] == 0


@pytest.mark.slow
def test_a_multi_anatomy_dataset_runs_to_its_report(tmp_path, chromium):
    work, result = run_config(tmp_path, CONFIG)
    assert result.returncode == 0, result.stderr[-4000:]
    results = work / "results" / "hip"

    grid = json.loads((results / "scans" / "grid.json").read_text())
    assert grid["anatomies"] == ANATOMIES and grid["spacing_mm"] == 8
    card = json.loads((results / "models" / "massm" / "model_card.json").read_text())
    assert card["method"] == "massm" and card["n_train"] + card["n_val"] == 10
    provenance = json.loads((results / "models" / "massm" / "provenance.json").read_text())
    assert provenance["step"] == "train-multi" and set(provenance["outputs"]) >= {"model.pt", "model_card.json"}
    per_scan = pd.read_csv(results / "evaluation" / "massm" / "per_scan.csv")
    assert len(per_scan) == 4 * len(ANATOMIES)  # every test scan and anatomy, present or not
    cohort = pd.read_csv(results / "cohort" / "subjects.csv").set_index("id")
    for anatomy in ANATOMIES:
        rows = per_scan[per_scan["anatomy"] == anatomy].set_index("id")
        assert rows["present"].tolist() == [bool(cohort.loc[i, f"present_{anatomy}"]) for i in rows.index]

    # the predicted particles as files, in each scan's own frame: their error against the cohort's particles is
    # the evaluation's
    predictions = pd.read_csv(results / "predictions" / "massm" / "predictions.csv", keep_default_na=False)
    merged = predictions.merge(per_scan, on=["id", "anatomy"], suffixes=("", "_evaluated"))
    assert len(merged) == len(per_scan) and (merged["detected"] == merged["detected_evaluated"]).all()
    for anatomy in ANATOMIES:
        truth = np.load(results / "cohort" / f"shapes_test_{anatomy}.npz")
        for k, subject in enumerate(str(i) for i in truth["ids"]):
            row = merged[(merged["id"] == subject) & (merged["anatomy"] == anatomy)].iloc[0]
            if row["detected"]:
                local = np.loadtxt(results / "predictions" / "massm" / row["local_particles"])
                error = np.sqrt(((local - truth["local"][k]) ** 2).mean(0)).mean()  # eq. 12
                assert error == pytest.approx(row["local_rmse_mm"], rel=1e-4), (subject, anatomy)
            else:  # nothing delivered, so no error is scored
                assert row["local_particles"] == "" and row["world_particles"] == ""
                assert not np.isfinite(row["local_rmse_mm"]) and not np.isfinite(row["world_rmse_mm"])

    # each anatomy's baselines: a single-anatomy dataset of the subjects that have it, evaluated as any
    for anatomy in ANATOMIES:
        baseline = work / "results" / f"hip_{anatomy}"
        has = sorted(cohort.index[(cohort[f"present_{anatomy}"] == 1)])
        assert sorted(pd.read_csv(baseline / "cohort" / "subjects.csv")["id"]) == has
        errors = pd.read_csv(baseline / "evaluation" / "tables" / "error_decomposition_per_subject.csv")
        assert set(errors["method"]) == {"base", "base_uncropped"}
        assert sorted(errors["id"].unique()) == sorted(i for i in has if cohort.loc[i, "split"] == "test")

    # nothing left to do: the directory outputs and params are stable
    again = run_snakemake(work, "all", "--cores", "1", "-n", configfile=tmp_path / "config.yaml")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr, again.stdout[-2000:]

    report = results / "report.html"
    text = report.read_text()
    assert "<script" not in text and "<link" not in text and not re.search(r'(src|href)="(?!data:|#)', text)
    page = inspect_in_chromium(chromium, report, tmp_path)
    assert page["broken"] == [] and page["images"] == 3
    assert page["sections"] == ["Does it beat the baselines?", "massm", "What was run"]
    assert {"Local and world RMSE per anatomy (the MASSM paper's Figs 2-3)",
            "Best and worst test scan per anatomy (the paper's Fig. 4)", "Training of massm"} <= set(page["headings"])
    for anatomy in ANATOMIES:  # each anatomy's verdicts, with n, against each baseline
        rows = per_scan[(per_scan["anatomy"] == anatomy) & per_scan["present"]]
        present, detected = len(rows), int(rows["detected"].sum())
        assert f"{anatomy}: detected in {detected} of the {present} test scans that have it; massm " in text
        assert text.count(f"<tr><td>{anatomy}</td><td>local rmse</td>") == 2 + 2  # templates, then base and
        # base_uncropped; each pairs the scans where massm delivered a prediction (detected) with the baseline's
        for method in ("base", "base_uncropped"):
            assert text.count(f"<tr><td>{anatomy}</td><td>world rmse</td><td>{method}: DeepSSM on the ") == 1
            assert re.search(f"<tr><td>{anatomy}</td><td>local rmse</td><td>{method}: [^<]*</td><td>{detected}</td>",
                             text)
        assert f"<tr><td>{anatomy}</td><td>world rmse</td><td>the template&#x27;s world shape (the shape known " \
               f"without the scan)</td><td>{detected}</td>" in text
        # where the registration that base needs was flagged, the verdict says on how many of its scans
        record = np.load(work / "results" / f"hip_{anatomy}" / "preprocess" / "test.npz")
        flagged = [str(i) for i, warning in zip(record["ids"], record["registration_warning"]) if warning]
        said = (f"(the registration that base needs was flagged as failed on {len(flagged)} of its "
                f"{len(record['ids'])} test scans: ")
        assert (said in text) == bool(flagged), (anatomy, flagged)
