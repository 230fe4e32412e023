"""A cohort of any anatomy: config defaults for a real-data block, the `study` key, study labels
required only when that study runs, cohort QC for every dataset, and scans as declared inputs
(a changed scan reruns its own preprocessing and what follows, nothing else)."""

from __future__ import annotations

import copy
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from conftest import REPO, SCHEMA, run_snakemake
from deepssm_workflow.cli import build_parser
from deepssm_workflow.config import ConfigError, load
from deepssm_workflow.ingest import CohortError, ingest_cohort
from deepssm_workflow.sources import scan_files
from deepssm_workflow.studies.registry import CHOICES, STUDIES
from shapeworks_recipe import generate


def real(**entry) -> dict:
    return {"datasets": {"blobs": {"source": "csv", "manifest": "cohort/manifest.csv", **entry}}}


# ---------------------------------------------------------------- config


def test_a_real_data_block_of_source_and_manifest_validates_and_gets_the_defaults():
    config = real()
    datasets = load(config, SCHEMA)
    assert datasets["blobs"].anatomy == "blobs" and datasets["blobs"].study == "none"
    entry = config["datasets"]["blobs"]  # defaults written into the config, where the rules read them
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["datasets"]["femur"]
    assert entry["preprocess"] == {k: demo["preprocess"][k] for k in ("downsample", "margin_mm", "registration")}
    assert entry["augmentation"] == {**demo["augmentation"], "kde_kernel": "neighbour"}
    assert entry["shape_space"] == {"variance": 0.99}
    assert entry["training"] == {**demo["training"], "precision": "fp32"}
    # every default method, each with the schema's defaults: the demo's, less its focal percentile
    assert list(entry["methods"]) == ["base", "base_focal", "tl", "tl_focal"]
    for method, block in demo["methods"].items():
        for key, value in block.items():
            assert entry["methods"][method][key] == (90 if key == "focal_percentile" else value), (method, key)

    project = {"datasets": {"femur": {"source": "shapeworks", "project": "p.swproj", "shape_space": {"n_modes": 5}}}}
    assert load(project, SCHEMA)["femur"].study == "cam_fai"  # the anatomy (the name) has a study
    assert project["datasets"]["femur"]["shape_space"] == {"n_modes": 5}  # a given n_modes: no variance added


def test_the_readme_real_data_block_validates_as_written():
    section = REPO.joinpath("README.md").read_text().split("## Real data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    datasets = load(yaml.safe_load(block), SCHEMA)
    assert datasets, block


@pytest.mark.parametrize("shape_space, found", [({"n_modes": 4, "variance": 0.9}, "both")])
def test_a_one_of_error_says_what_to_add_or_remove(shape_space, found):
    with pytest.raises(ConfigError) as error:
        load(real(shape_space=shape_space), SCHEMA)
    assert f"datasets.blobs.shape_space: give exactly one of n_modes or variance (found {found})" in str(error.value)


def test_a_one_of_of_types_names_each_allowed_form():
    config = copy.deepcopy(yaml.safe_load((REPO / "config" / "tiny.yaml").read_text()))
    config["datasets"]["femur"]["synthetic"]["spacing_mm"] = [1, 2]
    with pytest.raises(ConfigError) as error:
        load(config, SCHEMA)
    message = str(error.value)
    assert "datasets.femur.synthetic.spacing_mm: [1, 2] is none of the allowed forms: a number" in message
    assert "or an array ([1, 2] is too short)" in message


@pytest.mark.parametrize("entry, anatomy, study", [
    ({"anatomy": "scapula"}, "scapula", "none"),
    ({"anatomy": "femur"}, "femur", "cam_fai"),
    ({"anatomy": "femur", "study": "none"}, "femur", "none"),
    ({"anatomy": "hip", "study": "cam_fai"}, "hip", "cam_fai"),
    ({"anatomy": "liver", "study": "af_recurrence"}, "liver", "af_recurrence"),
])
def test_anatomy_is_a_free_name_and_study_is_chosen_apart(entry, anatomy, study):
    dataset = load(real(**entry), SCHEMA)["blobs"]
    assert (dataset.anatomy, dataset.study) == (anatomy, study)


@pytest.mark.parametrize("entry, message", [
    ({"anatomy": "Scapula"}, "datasets.blobs.anatomy: 'Scapula' does not match"),
    ({"study": "survival"}, "datasets.blobs.study: unknown study 'survival'; choose one of cam_fai, "
                            "metopic_severity, af_recurrence, none"),
    ({"source": "synthetic", "anatomy": "ellipsoid", "synthetic": {}},
     "datasets.blobs.anatomy: a synthetic cohort's anatomy (default: the dataset's name) must be one the "
     "generator makes: femur, metopic, left_atrium"),
])
def test_bad_anatomy_or_study_names_the_key(entry, message):
    config = real(**entry)
    if "synthetic" in entry:
        config["datasets"]["blobs"]["synthetic"] = yaml.safe_load(
            (REPO / "config" / "tiny.yaml").read_text())["datasets"]["femur"]["synthetic"]
    with pytest.raises(ConfigError) as error:
        load(config, SCHEMA)
    assert message in str(error.value)


def test_the_command_line_takes_its_study_choices_from_the_registry():
    steps = build_parser()._subparsers._group_actions[0].choices
    ingest = {a.dest: a for a in steps["ingest"]._actions}
    study = {a.dest: a for a in steps["study"]._actions}
    assert tuple(ingest["study"].choices) == CHOICES and ingest["anatomy"].choices is None
    assert tuple(study["study"].choices) == tuple(STUDIES)


# ---------------------------------------------------------------- ingestion


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """A tiny ShapeWorks-recipe cohort (not an anatomy of ours): its folder and manifest."""
    folder = tmp_path_factory.mktemp("blobs")
    paths = generate(folder, kind="ellipsoid", n_train=4, n_test=2, seed=3, n_points=32, spacing=3.0)
    return folder, paths


def with_column(blobs, tmp_path, name: str, values) -> str:
    folder, paths = blobs
    table = pd.read_csv(paths["manifest"])
    table["image"] = [str(folder / p) for p in table["image"]]
    for column in ("segmentation", "local_particles", "world_particles"):
        table[column] = [str(folder / p) for p in table[column]]
    table[name] = values
    manifest = tmp_path / "manifest.csv"
    table.to_csv(manifest, index=False)
    return str(manifest)


def test_a_cohort_without_study_labels_ingests_with_no_study(blobs, tmp_path):
    folder, paths = blobs
    report = ingest_cohort({"source": "csv", "manifest": str(paths["manifest"])}, "ellipsoid", tmp_path / "c")
    assert report["anatomy"] == "ellipsoid" and report["study"] == "none"
    with pytest.raises(CohortError, match="the cam_fai study needs a `group` column with values control and cam"):
        ingest_cohort({"source": "csv", "manifest": str(paths["manifest"])}, "ellipsoid", tmp_path / "d",
                      study="cam_fai")
    assert not (tmp_path / "d").exists()


def test_study_groups_match_ignoring_case_and_are_stored_lower_case(blobs, tmp_path):
    manifest = with_column(blobs, tmp_path, "group", ["Control", "CAM", "control", "Cam", "CONTROL", "cam"])
    report = ingest_cohort({"source": "csv", "manifest": manifest}, "hip", tmp_path / "c", study="cam_fai")
    subjects = pd.read_csv(tmp_path / "c" / "subjects.csv")
    assert report["study"] == "cam_fai" and list(subjects["group"]) == ["control", "cam"] * 3


def test_every_bad_study_label_is_one_line_naming_subject_and_table(blobs, tmp_path):
    manifest = with_column(blobs, tmp_path, "group", ["control", "cam", "kontrol", "cam", "", "control"])
    with pytest.raises(CohortError) as error:
        ingest_cohort({"source": "csv", "manifest": manifest}, "hip", tmp_path / "c", study="cam_fai")
    lines = str(error.value).splitlines()
    assert lines[0] == f"2 problems in the cohort {manifest}:"
    assert lines[1].startswith(f"  subject ellipsoid_002: {manifest}: group 'kontrol' is not one of control, cam")
    assert lines[2].startswith(f"  subject ellipsoid_004: {manifest}: group '' is not one of control, cam")
    assert len(lines) == 3 and not (tmp_path / "c").exists()

    manifest = with_column(blobs, tmp_path, "af_recurrence", ["0", "1", "yes", "1.0", "2", "0"])
    with pytest.raises(CohortError) as error:
        ingest_cohort({"source": "csv", "manifest": manifest}, "liver", tmp_path / "c", study="af_recurrence")
    lines = str(error.value).splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["subject ellipsoid_002", "subject ellipsoid_004"]
    assert "af_recurrence 'yes' is not one of 0/1" in lines[1] and not (tmp_path / "c").exists()


def test_the_scans_of_each_split_are_read_from_the_table(blobs):
    folder, paths = blobs
    for source in ({"source": "csv", "manifest": str(paths["manifest"])},
                   {"source": "shapeworks", "project": str(paths["project"])}):
        assert scan_files(source, "train") == [str(folder / "images" / f"ellipsoid_{i:03d}.nrrd") for i in range(4)]
        assert scan_files(source, "test") == [str(folder / "images" / f"ellipsoid_{i:03d}.nrrd") for i in (4, 5)]
    assert scan_files({"source": "csv", "manifest": str(folder / "missing.csv")}, "train") == []


# ---------------------------------------------------------------- the real workflow


def job_counts(dry_run_output: str) -> dict[str, int]:
    """rule -> jobs, from the "Job stats" table of a dry run."""
    counts = {}
    table = dry_run_output.split("Job stats:", 1)[1] if "Job stats:" in dry_run_output else ""
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        if parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def ellipsoid_run(tmp_path_factory):
    """One real run, up to report.html, of a tiny cohort of another anatomy given by a config of
    just source + manifest + anatomy and the overrides that make it fast."""
    root = tmp_path_factory.mktemp("any_anatomy")
    # 1 mm scans: the default downsample (4) then gives a 4 mm network input, at least 8 voxels a side
    paths = generate(root / "cohort", kind="ellipsoid", n_train=8, n_test=3, seed=5, n_points=64, spacing=1.0)
    config = {"datasets": {"ellipsoids": {
        "source": "csv", "manifest": str(paths["manifest"]), "anatomy": "ellipsoid",
        "methods": {"base": {"epochs": 2, "network": {"channels": [4, 8, 8, 16, 16], "fc_sizes": [32, 16]}}},
        "training": {"batch_size": 4, "val_fraction": 0.3},
        "augmentation": {"n_samples": 12, "n_control": 64}}}, "qc": {"subjects": 2}}
    configfile = root / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    workdir = root / "work"
    result = run_snakemake(workdir, "results/ellipsoids/report.html", "--cores", "2", "--resources", "gpu=1",
                           configfile=configfile)
    return root, workdir, configfile, result


@pytest.mark.slow
def test_a_cohort_of_another_anatomy_runs_to_its_report_without_a_study(ellipsoid_run):
    root, workdir, _, result = ellipsoid_run
    assert result.returncode == 0, result.stderr[-4000:]
    results = workdir / "results" / "ellipsoids"
    page = (results / "report.html").read_text()
    assert 'id="clinical-study"' not in page and "Clinical study</a>" not in page
    assert "none: no study was configured" in page
    assert (results / "qc" / "cohort.png").stat().st_size > 0 and 'alt="Cohort QC"' in page
    assert not (results / "study").exists() and not (workdir / "resources").exists()
    predictions = pd.read_csv(results / "predictions" / "base" / "predictions.csv")
    assert len(predictions) == 3
    cohort = json.loads((results / "cohort" / "report.json").read_text())
    assert (cohort["anatomy"], cohort["study"]) == ("ellipsoid", "none")
    settings = yaml.safe_load(re.search(r"<h3>Configuration of ellipsoids</h3><pre>(.*?)</pre>", page, re.S)
                              .group(1).replace("&#x27;", "'").replace("&quot;", '"'))
    assert settings["preprocess"]["downsample"] == 4 and settings["shape_space"]["variance"] == 0.99


@pytest.mark.slow
def test_a_changed_scan_reruns_its_own_preprocessing_and_what_follows_only(ellipsoid_run):
    root, workdir, configfile, result = ellipsoid_run
    assert result.returncode == 0, result.stderr[-4000:]

    def planned_jobs() -> dict[str, int]:
        # file-caused reruns only: the params trigger would also replan augment and train whenever the
        # package's sources change (their `software` param hashes them), e.g. while the code is edited
        dry_run = run_snakemake(workdir, "-n", "results/ellipsoids/report.html", "--rerun-triggers", "mtime",
                                "input", configfile=configfile)
        assert dry_run.returncode == 0, dry_run.stderr[-3000:]
        return job_counts(dry_run.stdout)

    assert planned_jobs() == {}

    def rewrite(scan):
        image = sitk.ReadImage(str(scan))
        changed = sitk.GetImageFromArray(sitk.GetArrayFromImage(image) + np.float32(1.0))
        changed.CopyInformation(image)
        before = os.stat(scan)
        sitk.WriteImage(changed, str(scan), useCompression=True)
        return before

    test_scan = root / "cohort" / "images" / "ellipsoid_009.nrrd"  # subjects 8, 9, 10 are the test split
    before = rewrite(test_scan)
    planned = planned_jobs()
    assert {"preprocess_test", "predict", "evaluate", "report_html"} <= set(planned), planned
    assert not {"ingest_cohort", "preprocess_train", "augment", "train"} & set(planned), planned

    os.utime(test_scan, ns=(before.st_atime_ns, before.st_mtime_ns))  # as if unchanged
    assert planned_jobs() == {}
    rewrite(root / "cohort" / "images" / "ellipsoid_002.nrrd")  # a training scan
    planned = planned_jobs()
    assert {"preprocess_train", "augment", "train", "preprocess_test", "predict", "report_html"} <= set(planned)
    assert "ingest_cohort" not in planned, planned
