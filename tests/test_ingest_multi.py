"""Multi-anatomy ingestion: the synthetic hip cohort's wide manifest and a long manifest written here
ingest to the same per-anatomy shapes; bad input is refused naming subject, anatomy and file, with
nothing written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from deepssm_workflow.ingest import CohortError
from deepssm_workflow.ingest_multi import ingest_multi_anatomy
from deepssm_workflow.io import read_particles
from deepssm_workflow.synthetic.multi_anatomy import MultiAnatomySettings, generate_multi_anatomy_cohort

SETTINGS = {"seed": 11, "subjects": {"train": {"control": 6}, "test": {"control": 2}}, "n_particles": 40,
            "spacing_mm": 4, "mesh_resolution_mm": 3, "size_mm": [360, 170, 180], "missing_fraction": 0.3}
PARTS = ("femur_right", "femur_left", "bladder")


@pytest.fixture(scope="module")
def hip(tmp_path_factory):
    root = tmp_path_factory.mktemp("hip")
    generate_multi_anatomy_cohort(MultiAnatomySettings.from_config(SETTINGS), root, prefix="hip")
    return root


@pytest.fixture
def cohort(hip, tmp_path):
    """A private copy of the cohort (tests break files in it)."""
    shutil.copytree(hip, tmp_path / "c")
    return tmp_path / "c"


def _long_manifest(root, path):
    """The wide manifest rewritten in the long form (one row per subject and anatomy), as another tool
    would export it: absolute paths, no presence columns."""
    wide = pd.read_csv(root / "subjects.csv", keep_default_na=False)
    rows = []
    for _, row in wide.iterrows():
        for part in PARTS:
            if row[f"present_{part}"]:
                rows.append({"id": row["id"], "split": row["split"], "anatomy": part,
                             "image": str(root / row["image"]), "labels": str(root / row["labels"]),
                             "label": row[f"label_{part}"],
                             **{k: str(root / row[f"{k}_{part}"])
                                for k in ("local_particles", "world_particles", "transform", "mesh")}})
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_wide_and_long_manifests_ingest_to_the_same_shapes(hip, tmp_path):
    wide = pd.read_csv(hip / "subjects.csv", keep_default_na=False)
    report = ingest_multi_anatomy({"source": "csv", "manifest": str(hip / "subjects.csv")}, tmp_path / "wide")
    assert report["anatomies"] == list(PARTS) and report["n_subjects"] == len(wide)
    assert any(not wide[f"present_{p}"].all() for p in PARTS)  # the seed gives absent parts
    subjects = pd.read_csv(tmp_path / "wide/subjects.csv", keep_default_na=False)
    for part in PARTS:
        assert subjects[f"present_{part}"].tolist() == wide[f"present_{part}"].tolist()
        for split in ("train", "test"):
            data = np.load(tmp_path / f"wide/shapes_{split}_{part}.npz")
            expected = wide[(wide["split"] == split) & (wide[f"present_{part}"] == 1)]
            assert data["ids"].tolist() == expected["id"].tolist()
            assert report["parts"][part]["counts"][split] == len(expected)
            for i, (_, row) in enumerate(expected.iterrows()):
                np.testing.assert_allclose(data["world"][i], read_particles(hip / row[f"world_particles_{part}"]))
                np.testing.assert_allclose(data["local"][i], read_particles(hip / row[f"local_particles_{part}"]))
            assert data["residual_mm"].max() < 1e-4
        assert report["parts"][part]["transforms"] == "given" and report["parts"][part]["label"] >= 1

    ingest_multi_anatomy({"source": "csv", "manifest": str(_long_manifest(hip, tmp_path / "long.csv"))},
                         tmp_path / "long")
    for part in PARTS:
        for split in ("train", "test"):
            a, b = (np.load(tmp_path / f"{form}/shapes_{split}_{part}.npz") for form in ("wide", "long"))
            assert a["ids"].tolist() == b["ids"].tolist()
            np.testing.assert_array_equal(a["world"], b["world"])
            np.testing.assert_array_equal(a["image_to_world"], b["image_to_world"])
    assert json.loads((tmp_path / "long/report.json").read_text())["parts"].keys() == set(PARTS)


def _refused(cohort, tmp_path, message, manifest=None):
    with pytest.raises(CohortError) as error:
        ingest_multi_anatomy({"source": "csv", "manifest": str(manifest or cohort / "subjects.csv")},
                             tmp_path / "out")
    assert message in str(error.value), str(error.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    return str(error.value)


def _first(table, part, present=1):
    return table.index[table[f"present_{part}"] == present][0]


def test_a_bad_file_is_named_by_subject_anatomy_and_file(cohort, tmp_path):
    table = pd.read_csv(cohort / "subjects.csv", keep_default_na=False)
    i = _first(table, "bladder")
    file = cohort / table.loc[i, "world_particles_bladder"]
    file.write_text("")
    _refused(cohort, tmp_path, f"subject {table.loc[i, 'id']}, anatomy bladder: {file}: particles file is empty")

    np.savetxt(file, np.zeros((7, 3)))
    _refused(cohort, tmp_path, f"subject {table.loc[i, 'id']}, anatomy bladder: {file}: 7 points, expected 40")


def test_presence_must_match_the_files_and_the_label_map(cohort, tmp_path):
    table = pd.read_csv(cohort / "subjects.csv", keep_default_na=False)
    absent = _first(table, "femur_left", present=0)
    sid = table.loc[absent, "id"]
    # a voxel of the absent left femur's label in the subject's label map
    labels_file = cohort / table.loc[absent, "labels"]
    image = sitk.ReadImage(str(labels_file))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = table.loc[absent, "label_femur_left"]
    painted = sitk.GetImageFromArray(array)
    painted.CopyInformation(image)
    sitk.WriteImage(painted, str(labels_file))
    _refused(cohort, tmp_path, f"subject {sid}, anatomy femur_left: {labels_file}: voxels of its label")

    table.loc[absent, "present_femur_left"] = 1
    table.to_csv(cohort / "subjects.csv", index=False)
    _refused(cohort, tmp_path, f"subject {sid}: {cohort / 'subjects.csv'}: present_femur_left is 1 but its "
                               f"particle cells are empty")


def test_long_form_rows_of_a_subject_must_agree_and_each_anatomy_needs_enough_subjects(hip, cohort, tmp_path):
    manifest = _long_manifest(hip, tmp_path / "long.csv")
    rows = pd.read_csv(manifest, keep_default_na=False)
    sid = rows["id"].iloc[0]
    changed = rows.copy()
    changed.loc[changed.index[(changed["id"] == sid)][-1], "split"] = "test" if rows["split"].iloc[0] == "train" \
        else "train"
    changed.to_csv(manifest, index=False)
    _refused(cohort, tmp_path, f"subject {sid}: {manifest}: its anatomies' rows disagree on `split`", manifest)

    few = rows[~((rows["anatomy"] == "bladder") & (rows["split"] == "train"))
               | rows.index.isin(rows.index[(rows["anatomy"] == "bladder") & (rows["split"] == "train")][:2])]
    few.to_csv(manifest, index=False)
    _refused(cohort, tmp_path, f"{manifest}: anatomy bladder: 2 train subjects; at least 3 needed", manifest)

    twice = pd.concat([rows, rows.iloc[[0]]])
    twice.to_csv(manifest, index=False)
    _refused(cohort, tmp_path, f"subject {sid}: {manifest}: anatomy {rows['anatomy'].iloc[0]} has two rows", manifest)


def test_the_command_line_ingests_and_refuses(hip, tmp_path, capsys):
    from deepssm_workflow.cli import main

    source = json.dumps({"source": "csv", "manifest": str(hip / "subjects.csv")})
    assert main(["ingest-multi", "--source", source, "--out-dir", str(tmp_path / "ok")]) == 0
    assert json.loads((tmp_path / "ok/report.json").read_text())["kind"] == "multi_anatomy"
    capsys.readouterr()
    missing = json.dumps({"source": "csv", "manifest": str(tmp_path / "none.csv")})
    assert main(["ingest-multi", "--source", missing, "--out-dir", str(tmp_path / "bad")]) == 1
    assert f"{tmp_path / 'none.csv'}: manifest file not found" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_one_anatomy_exports_as_a_single_anatomy_cohort(hip, tmp_path):
    """The left femur's subjects, as a CSV manifest the single-anatomy ingestion accepts, with the same shapes
    and its own segmentation cut from the label map; a subject without it is left out."""
    from deepssm_workflow.ingest import ingest_cohort
    from deepssm_workflow.ingest_multi import export_anatomy

    ingest_multi_anatomy({"source": "csv", "manifest": str(hip / "subjects.csv")}, tmp_path / "multi")
    table = export_anatomy(tmp_path / "multi", "femur_left", tmp_path / "left")
    wide = pd.read_csv(hip / "subjects.csv", keep_default_na=False)
    assert sorted(table["id"]) == sorted(wide.loc[wide["present_femur_left"] == 1, "id"])
    report = ingest_cohort({"source": "csv", "manifest": str(tmp_path / "left/subjects.csv")}, "femur",
                           tmp_path / "single", study="none")
    assert report["transforms"] == "given" and report["residual_mm"]["max"] < 1e-4
    for split in ("train", "test"):
        single, multi = np.load(tmp_path / f"single/shapes_{split}.npz"), \
            np.load(tmp_path / f"multi/shapes_{split}_femur_left.npz")
        assert single["ids"].tolist() == multi["ids"].tolist()
        np.testing.assert_allclose(single["world"], multi["world"], atol=1e-5)
        np.testing.assert_allclose(single["local"], multi["local"], atol=1e-5)
    row = table.iloc[0]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "left" / row["segmentation"])))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(hip / wide.set_index("id").loc[row["id"], "labels"])))
    assert mask.sum() == (labels == wide.set_index("id").loc[row["id"], "label_femur_left"]).sum() > 0
    with pytest.raises(CohortError, match="no anatomy 'kidney'"):
        export_anatomy(tmp_path / "multi", "kidney", tmp_path / "none")


def test_a_label_map_on_another_grid_and_a_bad_presence_flag_are_refused(cohort, tmp_path):
    table = pd.read_csv(cohort / "subjects.csv", keep_default_na=False)
    sid, labels_file = table.loc[0, "id"], cohort / table.loc[0, "labels"]
    labels = sitk.ReadImage(str(labels_file))
    labels.SetOrigin([o + 4.0 for o in labels.GetOrigin()])
    sitk.WriteImage(labels, str(labels_file))
    _refused(cohort, tmp_path, f"subject {sid}: {labels_file}: the label map's grid (size, origin, spacing, "
                               f"direction) is not its image's")
    table["present_bladder"] = table["present_bladder"].astype(str)
    table.loc[1, "present_bladder"] = "yes"
    table.to_csv(cohort / "subjects.csv", index=False)
    _refused(cohort, tmp_path, f"subject {table.loc[1, 'id']}: {cohort / 'subjects.csv'}: present_bladder is 'yes', "
                               f"neither 0 nor 1")


def test_multi_scans_refuse_a_grid_too_coarse_and_a_single_anatomy_method(hip, tmp_path):
    """Nothing is written when the grid would be too small; train-multi names a method that finds one anatomy."""
    from deepssm_workflow.full_field import ScanGridSettings
    from deepssm_workflow.multi_scans import preprocess_multi_scans, train_multi

    ingest_multi_anatomy({"source": "csv", "manifest": str(hip / "subjects.csv")}, tmp_path / "multi")
    with pytest.raises(ValueError, match="the scan grid would be .* voxels of 60 mm; the networks need at least"):
        preprocess_multi_scans(tmp_path / "multi", ScanGridSettings(60.0), tmp_path / "scans")
    assert not (tmp_path / "scans").exists() or not list((tmp_path / "scans").iterdir())
    with pytest.raises(ValueError, match="method base_uncropped predicts one anatomy per scan"):
        train_multi(tmp_path / "scans", "base_uncropped", {}, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_anatomies_with_different_particle_counts_ingest_but_are_refused_by_the_packing(cohort, tmp_path):
    """A multi-domain project may give each anatomy its own particle count: ingestion keeps them, and the
    packing for a multi-anatomy network (one count per anatomy) refuses the cohort naming both counts,
    writing nothing."""
    from deepssm_workflow.full_field import ScanGridSettings
    from deepssm_workflow.multi_scans import preprocess_multi_scans

    wide = pd.read_csv(cohort / "subjects.csv", keep_default_na=False)
    for _, row in wide[wide["present_bladder"] == 1].iterrows():  # the bladder's first 30 of 40 particles
        for column in ("local_particles_bladder", "world_particles_bladder"):
            path = cohort / row[column]
            np.savetxt(path, read_particles(path)[:30], fmt="%.6f")
    report = ingest_multi_anatomy({"source": "csv", "manifest": str(cohort / "subjects.csv")}, tmp_path / "ingested")
    assert {p: report["parts"][p]["n_points"] for p in PARTS} == {"femur_right": 40, "femur_left": 40, "bladder": 30}
    with pytest.raises(ValueError, match="different numbers of particles .*femur_right 40, femur_left 40, "
                                         "bladder 30.*packing needs one count"):
        preprocess_multi_scans(tmp_path / "ingested", ScanGridSettings.from_config({"spacing_mm": 12}),
                               tmp_path / "scans")
    assert not (tmp_path / "scans").exists()


def test_a_multi_domain_shapeworks_project_ingests_as_its_long_manifest(tmp_path):
    """The ShapeWorks ellipsoid-joint recipe's cohort as a multi-domain .swproj and as a long CSV manifest: the
    same anatomies, subjects and per-domain shapes (a subject without the top domain has none)."""
    from shapeworks_recipe import generate_joint

    manifest = generate_joint(tmp_path / "cohort", n_train=5, n_test=2, seed=1, n_points=24, spacing=4.0,
                              box_mm=120.0, missing_top=0.34)
    project = ingest_multi_anatomy({"source": "shapeworks", "project": str(manifest.parent / "project.swproj")},
                                   tmp_path / "from_project")
    table = ingest_multi_anatomy({"source": "csv", "manifest": str(manifest)}, tmp_path / "from_manifest")
    assert project["anatomies"] == table["anatomies"] == ["bottom", "top"]
    assert project["parts"]["top"]["counts"] == table["parts"]["top"]["counts"]
    assert sum(project["parts"]["top"]["counts"].values()) < project["n_subjects"]  # some lack the top
    for anatomy in ("bottom", "top"):
        for split in ("train", "test"):
            a = np.load(tmp_path / "from_project" / f"shapes_{split}_{anatomy}.npz")
            b = np.load(tmp_path / "from_manifest" / f"shapes_{split}_{anatomy}.npz")
            assert list(a["ids"]) == list(b["ids"])
            np.testing.assert_allclose(a["local"], b["local"])
            np.testing.assert_allclose(a["world"], b["world"])


def test_a_project_domain_that_ends_as_another_keeps_its_own_columns(tmp_path):
    """Domains `top` and `lap_top`: reading `top` drops only `lap_top`'s columns, reading `lap_top` keeps its own."""
    from shapeworks_recipe import generate_joint

    manifest = generate_joint(tmp_path / "cohort", n_train=4, n_test=1, seed=2, n_points=16, spacing=4.0,
                              box_mm=120.0, missing_top=0)
    project = manifest.parent / "project.swproj"
    text = project.read_text().replace('_bottom"', '_lap_top"')  # the column names' suffix, not the file names
    project.write_text(text)
    report = ingest_multi_anatomy({"source": "shapeworks", "project": str(project)}, tmp_path / "ingested")
    assert sorted(report["anatomies"]) == ["lap_top", "top"]
    for anatomy in ("lap_top", "top"):
        assert report["parts"][anatomy]["counts"] == {"train": 4, "test": 1}
