"""Registered validation: the validation subjects aligned from the image alone, as test scans are."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TINY, run_snakemake
from deepssm_workflow.holdout import validation_subjects
from deepssm_workflow.validation import validation_ids

DATASETS = ("femur", "metopic", "left_atrium")


def _folders(tmp_path, ids, reference):
    cohort, preprocess = tmp_path / "cohort", tmp_path / "preprocess"
    cohort.mkdir(), preprocess.mkdir()
    np.savez(cohort / "shapes_train.npz", ids=np.array(ids))
    (preprocess / "grid.json").write_text(json.dumps({"reference_id": reference}))
    return cohort, preprocess


def test_the_registration_reference_is_left_out_of_validation(tmp_path):
    ids = [f"s{k}" for k in range(10)]
    held = [ids[k] for k in validation_subjects(10, 0.3, 0)]
    cohort, preprocess = _folders(tmp_path, ids, reference=held[0])
    kept, left_out = validation_ids(cohort, preprocess, 0.3, 0)
    assert kept == held[1:] and left_out == [f"{held[0]}: the registration's reference image"]
    other = next(i for i in ids if i not in held)
    (preprocess / "grid.json").write_text(json.dumps({"reference_id": other}))
    assert validation_ids(cohort, preprocess, 0.3, 0) == (held, [])


def test_a_lone_validation_subject_that_is_the_reference_is_refused(tmp_path):
    ids = [f"s{k}" for k in range(4)]
    (only,) = [ids[k] for k in validation_subjects(4, 0.1, 0)]
    cohort, preprocess = _folders(tmp_path, ids, reference=only)
    with pytest.raises(ValueError, match=f"the only validation subject, {only}, is the registration's reference"):
        validation_ids(cohort, preprocess, 0.1, 0)


@pytest.mark.slow
def test_the_tiny_run_validates_every_crop_method_on_registered_scans(tiny_reports):
    workdir, run = tiny_reports
    assert run.returncode == 0, run.stderr[-3000:]
    for dataset in DATASETS:
        results = workdir / "results" / dataset
        summary = pd.read_csv(results / "validation" / "summary.csv").set_index("method")
        per_subject = pd.read_csv(results / "validation" / "per_subject.csv")
        registered = np.load(results / "preprocess" / "validation.npz")
        assert len(summary) and (summary["n"] == len(registered["ids"])).all()
        # registered, not placed with the true transform: the true shape through the alignment is off
        assert (per_subject["alignment_only_mm"] > 1e-3).all()
        assert "registration_metric" in registered.files  # the test scans' registration record
        assert np.isfinite(summary[["rmse_mm", "world_rmse_mm", "mean_shape_rmse_mm"]].to_numpy()).all()
        text = (results / "report.html").read_text()
        assert "Registered validation: what settings are chosen on" in text


@pytest.mark.slow
def test_a_tuning_sweep_trains_each_candidate_and_tables_it_on_registered_validation(tiny_reports, tmp_path):
    """A sweep in the tiny run's folder: only the candidates train (the cohort, registration and augmentation are
    the run's), and the table pairs each with the first candidate on the same registered validation scans."""
    workdir, run = tiny_reports
    assert run.returncode == 0, run.stderr[-3000:]
    config = yaml.safe_load(TINY.read_text())
    femur = config["datasets"]["femur"]
    femur["tuning"] = {"epochs": {"method": "base", "candidates": {"one": {"epochs": 1}, "two": {"epochs": 2}}}}
    configfile = tmp_path / "tuning.yaml"
    configfile.write_text(yaml.safe_dump(config))
    target = "results/femur/tuning/epochs/summary.csv"
    result = run_snakemake(workdir, target, "--cores", "2", "--resources", "gpu=1", configfile=configfile)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = set(re.findall(r"rule (\w+):", result.stdout + result.stderr))
    assert ran == {"train_tuning", "tuning_table"}, ran
    results = workdir / "results" / "femur" / "tuning" / "epochs"
    table = pd.read_csv(results / "summary.csv").set_index("method")
    assert list(table.index) == ["one", "two"] and (table["n"] >= 1).all()
    record = json.loads((results / "summary.json").read_text())
    assert record["settings"] == {"one": {"epochs": 1}, "two": {"epochs": 2}}
    (paired,) = record["paired"]["comparisons"]
    assert (paired["method"], paired["against"]) == ("two", "one")
    for candidate, epochs in (("one", 1), ("two", 2)):
        card = json.loads((results / candidate / "models" / "base" / "model_card.json").read_text())
        assert card["settings"]["epochs"] == epochs, card["settings"]

    bad = yaml.safe_load(configfile.read_text())
    bad["datasets"]["femur"]["tuning"]["epochs"]["candidates"]["two"] = {"epoch": 2}
    configfile.write_text(yaml.safe_dump(bad))
    refused = run_snakemake(workdir, target, "-n", configfile=configfile)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "tuning.epochs.candidates.two" in said and "'epoch' was unexpected" in said


def test_a_sweep_of_a_method_that_reads_no_registered_crops_is_refused_before_any_job(tmp_path):
    config = yaml.safe_load(TINY.read_text())
    config["datasets"]["femur"]["tuning"] = {"pose": {"method": "image2ssm",
                                                      "candidates": {"a": {"epochs": 1}, "b": {"epochs": 2}}}}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    refused = run_snakemake(tmp_path / "work", "results/femur/tuning/pose/summary.csv", "-n", configfile=configfile)
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "datasets.femur.tuning.pose.method" in said
    assert "is not a method that reads registered crops" in said and not (tmp_path / "work" / "results").exists()


def test_validation_ids_absent_from_the_split_and_a_names_folders_mismatch_are_refused(tmp_path, capsys):
    from deepssm_workflow.cli import main
    from deepssm_workflow.preprocess import preprocess_unseen

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    pd.DataFrame({"id": ["a", "b"], "split": ["train", "test"], "image": ["a.nrrd", "b.nrrd"]}).to_csv(
        cohort / "subjects.csv", index=False)
    out = tmp_path / "preprocess" / "validation.npz"
    with pytest.raises(ValueError, match=r"subjects.csv: no train subject b"):
        preprocess_unseen(cohort, tmp_path / "preprocess", "train", out, ids=["a", "b"])
    assert not out.parent.exists()
    code = main(["validate", "--cohort", str(cohort), "--preprocess-dir", str(tmp_path), "--registered", str(out),
                 "--methods", "base", "tl", "--model-dirs", str(tmp_path / "m"), "--shape-space", "{}",
                 "--val-fraction", "0.2", "--seed", "0", "--out-dir", str(tmp_path / "validation")])
    captured = capsys.readouterr()
    assert code != 0 and "2 names for 1 model folders" in captured.out + captured.err
    assert not (tmp_path / "validation").exists()
