"""run_study and `deepssm-wf study` end to end on ingested tiny synthetic cohorts (ground truth only:
the trained variants come from the workflow tests)."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from deepssm_workflow.ingest import ingest_cohort
from deepssm_workflow.studies import run_study


def dataset(tiny_cohort, tmp_path, anatomy):
    folder = tiny_cohort(anatomy)
    results = tmp_path / "results" / anatomy
    ingest_cohort({"source": "synthetic", "manifest": "subjects.csv"}, anatomy, results / "cohort", base_dir=folder)
    return folder, results


def test_metopic_study_through_the_cli(tiny_cohort, tmp_path):
    resources, results = dataset(tiny_cohort, tmp_path, "metopic")
    out = results / "study"
    command = [sys.executable, "-m", "deepssm_workflow", "study", "--study", "metopic_severity", "--dataset-dir",
               str(results), "--resources-dir", str(resources), "--methods", "base", "tl", "--out-dir", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_methods"] == ["base", "tl"] and summary["methods"] == []
    truth = summary["metopic"]["ground_truth"]
    assert truth["n_scored"] == 2 and truth["n_metopic"] == 1 and truth["n_reference_controls"] == 5
    assert truth["auc"] in (0.0, 0.5, 1.0)  # one metopic against one control
    assert "auc_low" in truth and "pearson_low" in truth  # intervals: undefined on 2 subjects, said as null
    assert truth["pearson"] is None and any("Pearson" in n for n in summary["notes"])  # 2 subjects: undefined
    table = pd.read_csv(out / "tables" / "metopic_severity_table2.csv")
    assert list(table["source"]) == ["ground_truth"]
    figures = json.loads((out / "figures.json").read_text())
    assert [f["file"] for f in figures] == ["figures/metopic_pointwise_mahalanobis.png", "figures/metopic_severity.png"]
    assert all((out / f["file"]).stat().st_size > 1000 and f["title"] and f["caption"] for f in figures)


def test_left_atrium_study_and_bad_outcome(tiny_cohort, tmp_path):
    _, results = dataset(tiny_cohort, tmp_path, "left_atrium")
    out = tmp_path / "study"
    summary = run_study("af_recurrence", results, [], out)
    row = summary["left_atrium"]["ground_truth"]
    assert row["n_train"] == 8 and row["n_test"] == 3 and row["n_seeds"] == 5
    assert 0.0 <= row["mlp_accuracy_mean"] <= 1.0 and row["mlp_accuracy_sd"] >= 0.0
    for name in ("mlp_accuracy", "logistic_accuracy", "nir_accuracy"):  # 95 % intervals over the 3 test subjects
        value = row[name if name != "mlp_accuracy" else "mlp_accuracy_mean"]
        assert 0.0 <= row[f"{name}_low"] <= value <= row[f"{name}_high"] <= 1.0, name
    assert row["nir_accuracy"] >= 2 / 3  # the test set's most frequent class, of 3 subjects
    assert all(0.0 < row[f"{m}_binomial_p"] <= 1.0 and f"{m}_auc" in row for m in ("mlp", "logistic"))
    assert (out / "tables" / "left_atrium_recurrence_table3.csv").is_file()

    table_path = results / "cohort" / "subjects.csv"
    table = pd.read_csv(table_path)
    subject = table["id"].iloc[2]
    table.loc[2, "af_recurrence"] = 7
    table.to_csv(table_path, index=False)
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=f"subject {subject} has af_recurrence"):
        run_study("af_recurrence", results, [], fresh)
    assert not fresh.exists() or not any(fresh.iterdir())  # nothing partial
