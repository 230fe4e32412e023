"""Ingestion of cohort sources (synthetic table, CSV manifest, ShapeWorks project) into one
validated cohort folder, and its refusal of broken inputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import tiny_settings
from deepssm_workflow.ingest import SAFE_ID, CohortError, ingest_cohort
from deepssm_workflow.io import read_particles, read_transform, resolve, write_particles

SPLITS = ("train", "test")


def synthetic(folder: Path) -> dict:
    return {"source": "synthetic", "manifest": str(folder / "subjects.csv")}


def load(out: Path) -> dict[str, dict[str, np.ndarray]]:
    return {split: dict(np.load(out / f"shapes_{split}.npz")) for split in SPLITS}


@pytest.fixture(scope="module")
def femur_reference(tiny_cohort, tmp_path_factory):
    """The tiny femur cohort ingested from its own subjects.csv: the arrays other sources must match."""
    out = tmp_path_factory.mktemp("reference") / "cohort"
    ingest_cohort(synthetic(tiny_cohort("femur")), "femur", out)
    return load(out)


def assert_same_shapes(arrays, reference, atol=1e-4):
    for split in SPLITS:
        assert list(arrays[split]["ids"]) == list(reference[split]["ids"])
        for key in ("world", "local", "image_to_world"):
            np.testing.assert_allclose(arrays[split][key], reference[split][key], atol=atol, err_msg=key)


@pytest.mark.parametrize("anatomy", ["femur", "left_atrium"])
def test_synthetic_cohort_ingests_to_the_per_subject_files(tiny_cohort, tmp_path, anatomy):
    folder = tiny_cohort(anatomy)
    table = folder / "subjects.csv"
    source = pd.read_csv(table)
    out = tmp_path / "cohort"
    report = ingest_cohort({"source": "synthetic", "manifest": "subjects.csv"}, anatomy, out, base_dir=folder)

    subjects = pd.read_csv(out / "subjects.csv")
    assert list(subjects.columns[:3]) == ["id", "split", "group"]
    assert list(subjects.columns[-3:]) == ["image", "segmentation", "mesh"]
    assert not {"local_particles", "world_particles", "transform"} & set(subjects.columns)  # no particles
    assert list(subjects["id"]) == list(source["id"])
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in subjects["image"])

    arrays = load(out)
    for split in SPLITS:
        rows = source[source["split"] == split]
        data = arrays[split]
        assert list(data["ids"]) == list(rows["id"])
        assert data["world"].dtype == np.float64 and data["world"].shape == (len(rows), 128, 3)
        for i, row in enumerate(rows.itertuples()):
            np.testing.assert_array_equal(data["local"][i], read_particles(resolve(table, row.local_particles)))
            np.testing.assert_array_equal(data["world"][i], read_particles(resolve(table, row.world_particles)))
            np.testing.assert_array_equal(data["image_to_world"][i], read_transform(resolve(table, row.transform)))
        assert data["residual_mm"].max() < 1e-4

    design = tiny_settings(anatomy).subjects
    assert report == json.loads((out / "report.json").read_text())
    assert report["counts"] == {s: {g: n for g, n in design[s].items() if n} for s in SPLITS}
    assert report["source"] == {"kind": "synthetic", "path": str(table)}
    assert report["transforms"] == "given" and report["n_points"] == 128
    assert report["residual_mm"]["max"] < 1e-4
    assert report["covariates"] == [c for c in subjects.columns[3:-3]]

    # a second run replaces the folder; no staging folder is left next to it
    ingest_cohort(synthetic(folder), anatomy, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


def test_csv_manifest_without_transforms_fits_the_same_frames(tiny_cohort, femur_reference, tmp_path):
    """`particles` alias, paths relative to a manifest in another folder, no transform column:
    the similarity fit recovers the synthetic (rigid) transforms."""
    folder = tiny_cohort("femur")
    source = pd.read_csv(folder / "subjects.csv")
    manifest_dir = tmp_path / "elsewhere"
    manifest_dir.mkdir()

    def rel(column):
        return [os.path.relpath(folder / p, manifest_dir) for p in source[column]]

    manifest = pd.DataFrame({"id": source["id"], "image": rel("image"), "particles": rel("local_particles"),
                             "world_particles": rel("world_particles"), "group": source["group"],
                             "split": source["split"], "age_years": source["age_years"]})
    manifest.to_csv(manifest_dir / "manifest.csv", index=False)

    report = ingest_cohort({"source": "csv", "manifest": "elsewhere/manifest.csv"}, "femur",
                           tmp_path / "cohort", base_dir=tmp_path)
    assert_same_shapes(load(tmp_path / "cohort"), femur_reference)
    assert report["transforms"] == "estimated" and report["residual_mm"]["max"] < 1e-4
    assert report["estimated_scale"]["min"] == pytest.approx(1.0, abs=1e-6)
    subjects = pd.read_csv(tmp_path / "cohort" / "subjects.csv")
    assert list(subjects.columns) == ["id", "split", "group", "age_years", "image", "segmentation", "mesh"]
    assert subjects["mesh"].isna().all()  # absent files are empty cells


def _shapeworks_rows(folder: Path, project_dir: Path, split_transform: bool) -> list[dict]:
    """ShapeWorks-style rows, paths relative to the project's folder; with split_transform the
    transform is a rotation (alignment) then a translation (procrustes): only that order composes."""
    def rel(path):
        return os.path.relpath(folder / path, project_dir)

    rows = []
    for s in pd.read_csv(folder / "subjects.csv").itertuples():
        matrix = read_transform(folder / s.transform)
        alignment, procrustes = np.eye(4), np.eye(4)
        if split_transform:
            alignment[:3, :3], procrustes[:3, 3] = matrix[:3, :3], matrix[:3, 3]
        else:
            alignment = matrix
        row = {"name": s.id, "shape_femur": rel(s.mesh), "image_femur": rel(s.image),
               "local_particles_femur": rel(s.local_particles), "world_particles_femur": rel(s.world_particles),
               "alignment_femur": " ".join(f"{v:.10f}" for v in alignment.ravel()),
               "group_diagnosis": s.group, "split": s.split, "age_years": s.age_years}
        if split_transform:
            row["procrustes_femur"] = " ".join(f"{v:.10f}" for v in procrustes.ravel())
        rows.append(row)
    return rows


def test_shapeworks_projects_ingest_to_the_same_shapes(tiny_cohort, femur_reference, tmp_path):
    folder = tiny_cohort("femur")
    projects = tmp_path / "projects"
    projects.mkdir()
    with pd.ExcelWriter(projects / "femur.xlsx", engine="openpyxl") as writer:
        pd.DataFrame({"key": ["number_of_particles"], "value": ["128"]}).to_excel(
            writer, sheet_name="optimize", index=False)  # "data" is found by name, not position
        pd.DataFrame(_shapeworks_rows(folder, projects, split_transform=False)).to_excel(
            writer, sheet_name="data", index=False)
    swproj = projects / "femur.swproj"
    swproj.write_text(json.dumps({"data": _shapeworks_rows(folder, projects, split_transform=True),
                                  "parameters": {"optimize": {"number_of_particles": "128"}}}))
    for project in ("femur.xlsx", "femur.swproj"):
        out = tmp_path / project
        report = ingest_cohort({"source": "shapeworks", "project": f"projects/{project}"}, "femur", out,
                               base_dir=tmp_path)
        assert_same_shapes(load(out), femur_reference, atol=1e-8)
        assert report["source"]["kind"] == "shapeworks" and report["source"]["domain"] == "femur"
        assert report["transforms"] == "given" and report["residual_mm"]["max"] < 1e-4
        subjects = pd.read_csv(out / "subjects.csv")
        assert set(subjects["group"]) == {"control", "cam"} and subjects["segmentation"].isna().all()
        assert subjects["mesh"].str.endswith(".vtk").all() and "age_years" in subjects

    # a second domain is refused
    rows = _shapeworks_rows(folder, projects, split_transform=False)
    swproj.write_text(json.dumps({"data": [{**r, "shape_pelvis": r["shape_femur"]} for r in rows]}))
    with pytest.raises(CohortError, match="exactly one ShapeWorks domain, found femur, pelvis"):
        ingest_cohort({"source": "shapeworks", "project": str(swproj)}, "femur", tmp_path / "multi")
    assert not (tmp_path / "multi").exists()


# ---------------------------------------------------------------- broken inputs
# Each breaker edits a copy of a tiny cohort and returns (subject id or None, file name, problem).

VICTIM = 2  # a subject in the middle of the table


def _victim(folder: Path) -> str:
    return pd.read_csv(folder / "subjects.csv")["id"][VICTIM]


def _edit_table(folder: Path, edit) -> None:
    table = pd.read_csv(folder / "subjects.csv", dtype=str, keep_default_na=False)
    edit(table)
    table.to_csv(folder / "subjects.csv", index=False)


def truncated_image(folder):
    sid = _victim(folder)
    path = folder / f"data/images/{sid}.nrrd"
    path.write_bytes(path.read_bytes()[:-2000])
    return sid, path.name, "truncated or corrupt"


def image_2d(folder):
    sid = _victim(folder)
    sitk.WriteImage(sitk.Image([20, 20], sitk.sitkInt16), str(folder / f"data/images/{sid}.nrrd"))
    return sid, f"{sid}.nrrd", "image is 2D"


def missing_mesh(folder):
    sid = _victim(folder)
    (folder / f"data/meshes/{sid}.vtk").unlink()
    return sid, f"{sid}.vtk", "file not found"


def dropped_point(folder):
    sid = _victim(folder)
    path = folder / f"data/particles/{sid}_local.particles"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    return sid, path.name, "127 points, expected 128"


def nan_point(folder):
    sid = _victim(folder)
    path = folder / f"data/particles/{sid}_world.particles"
    points = read_particles(path)
    points[5, 1] = np.nan
    write_particles(path, points)
    return sid, path.name, "non-finite coordinates (nan or inf) at point 6"


def duplicate_id(folder):
    sid = pd.read_csv(folder / "subjects.csv")["id"][0]
    _edit_table(folder, lambda t: t.__setitem__("id", [sid if i == VICTIM else v for i, v in enumerate(t["id"])]))
    return sid, "subjects.csv", f"duplicate id (data rows 1, {VICTIM + 1})"


def validation_split(folder):
    sid = _victim(folder)
    _edit_table(folder, lambda t: t.__setitem__("split", t["split"].where(t["id"] != sid, "validation")))
    return sid, "subjects.csv", "split 'validation' is neither train nor test"


def no_split(folder):
    _edit_table(folder, lambda t: t.pop("split"))
    return None, "subjects.csv", "no `split` column"


def millimetres_as_micrometres(folder):
    sid = _victim(folder)
    path = folder / f"data/particles/{sid}_local.particles"
    write_particles(path, read_particles(path) * 1000)
    return sid, path.name, "128 of 128 local particles lie outside the image"


def no_group(folder):
    _edit_table(folder, lambda t: t.pop("group"))
    return None, "subjects.csv", "cam_fai study needs a `group` column"


def controls_only(folder):
    _edit_table(folder, lambda t: t.__setitem__("group", "control"))
    return None, "subjects.csv", "no subject in group cam"


def world_only(folder):
    _edit_table(folder, lambda t: (t.pop("local_particles"), t.pop("transform")))
    return None, "subjects.csv", "cannot place the points in the images"


def inverted_transform(folder):
    sid = _victim(folder)
    path = folder / f"data/transforms/{sid}.txt"
    np.savetxt(path, np.linalg.inv(read_transform(path)))
    return sid, path.name, "does not map the local particles onto the world particles"


def _rewrite_image(folder, edit):
    """The victim's image replaced by edit(float32 voxels, z y x), with the same geometry."""
    sid = _victim(folder)
    path = folder / f"data/images/{sid}.nrrd"
    image = sitk.ReadImage(str(path))
    array = edit(sitk.GetArrayFromImage(image).astype(np.float32))
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(path))
    return sid, path.name


def nan_voxels(folder):
    def edit(array):
        array[2:4, 3, 3] = np.nan
        array[5, 5, 5] = np.inf
        return array
    return *_rewrite_image(folder, edit), "voxels are not finite (2 NaN, 1 inf)"


def all_zero_image(folder):
    return *_rewrite_image(folder, np.zeros_like), "image is constant (every voxel is 0)"


def scaled_by_1e30(folder):
    return *_rewrite_image(folder, lambda a: a * np.float32(1e30)), "absurd intensities"


def image_4d(folder):
    sid = _victim(folder)
    path = folder / f"data/images/{sid}.nrrd"
    image = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(path))  # a time series: dimension 4 in the header
    return sid, path.name, "image is 4D; a 3D image is needed"


def folder_as_image(folder):
    sid = _victim(folder)
    path = folder / f"data/images/{sid}.nrrd"
    path.unlink()
    path.mkdir()
    return sid, path.name, "is a folder, not an image file (column image)"


def empty_particles(folder):
    sid = _victim(folder)
    path = folder / f"data/particles/{sid}_local.particles"
    path.write_text("")
    return sid, path.name, "particles file is empty"


def _renamed(folder, new_id):
    sid = _victim(folder)
    _edit_table(folder, lambda t: t.__setitem__("id", t["id"].where(t["id"] != sid, new_id)))
    return new_id, "subjects.csv", f"id {new_id!r} is not a safe file name"


def slash_in_id(folder):
    return _renamed(folder, "femur/003")


def backslash_in_id(folder):
    return _renamed(folder, "femur\\003")


def leading_dot_id(folder):
    return _renamed(folder, ".femur_003")


def space_in_id(folder):
    return _renamed(folder, "femur 003")


def two_training_subjects(folder):
    _edit_table(folder, lambda t: t.__setitem__("split", ["train"] * 2 + ["test"] * (len(t) - 2)))
    return None, "subjects.csv", "2 train subjects; at least 3 needed"


def no_af_recurrence(folder):
    _edit_table(folder, lambda t: t.pop("af_recurrence"))
    return None, "subjects.csv", "needs covariate column `af_recurrence`"


BREAKERS = [("femur", b) for b in (truncated_image, image_2d, missing_mesh, dropped_point, nan_point, duplicate_id,
                                   validation_split, no_split, millimetres_as_micrometres, no_group, controls_only,
                                   world_only, inverted_transform, two_training_subjects, nan_voxels,
                                   all_zero_image, scaled_by_1e30, image_4d, folder_as_image,
                                   empty_particles, slash_in_id, backslash_in_id, leading_dot_id, space_in_id)]
BREAKERS.append(("left_atrium", no_af_recurrence))


@pytest.mark.parametrize("anatomy, breaker", BREAKERS, ids=[b.__name__ for _, b in BREAKERS])
def test_broken_input_is_refused_naming_subject_file_and_problem(tiny_cohort, tmp_path, capfd, anatomy, breaker):
    folder = tmp_path / "source"
    shutil.copytree(tiny_cohort(anatomy), folder)
    sid, file_name, problem = breaker(folder)
    out = tmp_path / "results" / "cohort"
    with pytest.raises(CohortError) as error:
        ingest_cohort(synthetic(folder), anatomy, out)
    message = str(error.value)
    assert file_name in message and problem in message, message
    if sid is not None:
        assert f"subject {sid}:" in message, message
    assert not (tmp_path / "results").exists()  # validation happens before anything is written
    assert "HDF5" not in capfd.readouterr().err  # no reader noise beside the message


def test_safe_ids():
    safe = ["femur_003", "003", "case-1.left", "a+b", "_x", "A" * 200]
    unsafe = ["a/b", "a\\b", ".hidden", "..", "-rf", "a b", "a\x00b", "caf\u00e9", "a:b", "a*b", "A" * 201, ""]
    assert all(SAFE_ID.fullmatch(i) for i in safe)
    assert not any(SAFE_ID.fullmatch(i) for i in unsafe)


def test_every_problem_is_reported_at_once(tiny_cohort, tmp_path):
    folder = tmp_path / "source"
    shutil.copytree(tiny_cohort("femur"), folder)
    truncated_image(folder)
    missing_mesh(folder)
    ids = pd.read_csv(folder / "subjects.csv")["id"]
    (folder / f"data/images/{ids[0]}.nrrd").unlink()
    with pytest.raises(CohortError, match=r"^3 problems in the cohort .*subjects\.csv:\n") as error:
        ingest_cohort(synthetic(folder), "femur", tmp_path / "cohort")
    assert f"subject {ids[0]}: " in str(error.value) and str(error.value).count(f"subject {ids[VICTIM]}: ") == 2



def test_world_particles_with_transforms_and_local_particles_alone(tiny_cohort, femur_reference, tmp_path):
    folder = tiny_cohort("femur")
    table = pd.read_csv(folder / "subjects.csv")
    for column in ("image", "segmentation", "mesh", "local_particles", "world_particles", "transform"):
        table[column] = [str(folder / p) for p in table[column]]  # absolute paths work from anywhere

    # world particles + transforms: the inverse transform brings the points into the images
    table.drop(columns="local_particles").to_csv(tmp_path / "world.csv", index=False)
    report = ingest_cohort({"source": "csv", "manifest": str(tmp_path / "world.csv")}, "femur", tmp_path / "world")
    assert_same_shapes(load(tmp_path / "world"), femur_reference)
    assert report["particles_given"] == ["world"] and report["transforms"] == "given"

    # local particles alone: world = local, identity transforms
    table.drop(columns=["world_particles", "transform"]).to_csv(tmp_path / "local.csv", index=False)
    report = ingest_cohort({"source": "csv", "manifest": str(tmp_path / "local.csv")}, "femur", tmp_path / "local")
    for split, data in load(tmp_path / "local").items():
        np.testing.assert_array_equal(data["local"], femur_reference[split]["local"])
        np.testing.assert_array_equal(data["world"], data["local"])
        assert (data["image_to_world"] == np.eye(4)).all() and (data["residual_mm"] == 0).all()
    assert report["transforms"] == "identity" and report["particles_given"] == ["local"]


# ---------------------------------------------------------------- ShapeWorks' own conventions

def _swproj(tmp_path: Path, rows: list[dict]) -> dict:
    project = tmp_path / "projects" / "femur.swproj"
    project.write_text(json.dumps({"data": rows}))
    return {"source": "shapeworks", "project": str(project)}


def test_shapeworks_empty_procrustes_cell_is_the_identity(tiny_cohort, femur_reference, tmp_path):
    """ShapeWorks writes procrustes_<domain> empty when Procrustes is off (and alignment_ when
    grooming did not align): the other cell alone is the transform."""
    (tmp_path / "projects").mkdir()
    rows = _shapeworks_rows(tiny_cohort("femur"), tmp_path / "projects", split_transform=False)
    rows = [{**row, "procrustes_femur": ""} for row in rows]
    ingest_cohort(_swproj(tmp_path, rows), "femur", tmp_path / "cohort")
    assert_same_shapes(load(tmp_path / "cohort"), femur_reference, atol=1e-8)

    # both empty: identity transforms, so the world particles must equal the local ones
    rows = [{**row, "alignment_femur": "", "world_particles_femur": row["local_particles_femur"]} for row in rows]
    ingest_cohort(_swproj(tmp_path, rows), "femur", tmp_path / "identity")
    for split, data in load(tmp_path / "identity").items():
        assert (data["image_to_world"] == np.eye(4)).all()
        np.testing.assert_array_equal(data["world"], femur_reference[split]["local"])


def test_shapeworks_empty_name_is_the_shape_file_stem(tiny_cohort, femur_reference, tmp_path):
    (tmp_path / "projects").mkdir()
    rows = _shapeworks_rows(tiny_cohort("femur"), tmp_path / "projects", split_transform=False)
    rows[VICTIM]["name"] = ""  # its shape file is data/meshes/<id>.vtk
    ingest_cohort(_swproj(tmp_path, rows), "femur", tmp_path / "cohort")
    assert_same_shapes(load(tmp_path / "cohort"), femur_reference, atol=1e-8)

    # no shape_ column: the mesh_ column's file, and a compound extension goes whole
    sid = rows[VICTIM]["name"] or Path(rows[VICTIM]["shape_femur"]).stem
    gz = tmp_path / "projects" / f"{sid}.nii.gz"
    gz.write_bytes(b"")  # only its name matters here: the subject is then refused for its empty image
    rows = [{**{k: v for k, v in row.items() if k != "shape_femur"}, "mesh_femur": row["shape_femur"]}
            for row in rows]
    rows[VICTIM] = {**rows[VICTIM], "mesh_femur": "", "segmentation_femur": gz.name}
    with pytest.raises(CohortError, match=rf"^subject {sid}: .*{sid}\.nii\.gz: not a readable image"):
        ingest_cohort(_swproj(tmp_path, rows), "femur", tmp_path / "gz")


def test_a_reflecting_transform_is_accepted_and_noted(tiny_cohort, tmp_path):
    folder = tmp_path / "source"
    shutil.copytree(tiny_cohort("femur"), folder)
    sid = _victim(folder)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    transform, world = folder / f"data/transforms/{sid}.txt", folder / f"data/particles/{sid}_world.particles"
    np.savetxt(transform, flip @ read_transform(transform))
    write_particles(world, read_particles(world) @ flip[:3, :3])
    report = ingest_cohort(synthetic(folder), "femur", tmp_path / "cohort")
    assert report["reflections"] == [sid]
    assert json.loads((tmp_path / "cohort" / "report.json").read_text())["reflections"] == [sid]

    # the same in a ShapeWorks project (alignment cells)
    (tmp_path / "projects").mkdir()
    rows = _shapeworks_rows(folder, tmp_path / "projects", split_transform=True)
    assert ingest_cohort(_swproj(tmp_path, rows), "femur", tmp_path / "sw")["reflections"] == [sid]
    # and none in the untouched cohort
    assert ingest_cohort(synthetic(tiny_cohort("femur")), "femur", tmp_path / "plain")["reflections"] == []
