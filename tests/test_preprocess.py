"""Segmentation-free preprocessing on the tiny synthetic cohorts: reference, grid, normalization,
registration of test images from the image alone."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from conftest import run_snakemake, tiny_settings
from deepssm_workflow import preprocess as pp
from deepssm_workflow.ingest import ingest_cohort
from deepssm_workflow.synthetic.registry import ANATOMIES

SETTINGS = pp.PreprocessSettings(downsample=1.0, margin_mm=5.0)


def prepare(manifest, anatomy, root):
    ingest_cohort({"source": "synthetic", "manifest": str(manifest)}, anatomy, root / "cohort")
    pp.preprocess_training(root / "cohort", SETTINGS, root / "preprocess")
    pp.preprocess_unseen(root / "cohort", root / "preprocess", "test", root / "preprocess" / "test.npz")
    return root / "cohort", root / "preprocess"


@pytest.fixture(scope="module")
def prepared(tiny_cohort, tmp_path_factory):
    """Ingested and preprocessed tiny cohort of an anatomy: (cohort dir, preprocess dir)."""
    made = {}

    def make(anatomy):
        if anatomy not in made:
            made[anatomy] = prepare(tiny_cohort(anatomy) / "subjects.csv", anatomy, tmp_path_factory.mktemp(anatomy))
        return made[anatomy]

    return make


def test_reference_is_the_medoid_of_the_training_shapes():
    rng = np.random.default_rng(0)
    shapes = rng.normal(size=(9, 50, 3)) * rng.uniform(0.5, 2.0, size=(9, 1, 1))
    brute = [np.mean([np.sqrt(((a - b) ** 2).sum(1).mean()) for b in shapes]) for a in shapes]
    assert pp.choose_reference(shapes) == int(np.argmin(brute))


@pytest.mark.parametrize("anatomy", ANATOMIES)
def test_grid_covers_every_training_shape_at_the_configured_resolution(prepared, anatomy):
    cohort, preprocess = prepared(anatomy)
    meta = json.loads((preprocess / "grid.json").read_text())
    world = np.load(cohort / "shapes_train.npz")["world"].reshape(-1, 3)
    origin, spacing, size = (np.array(meta["grid"][k]) for k in ("origin", "spacing", "size"))
    upper = origin + spacing * (size - 1)
    assert np.all(world.min(0) - origin >= SETTINGS.margin_mm - 1e-6)
    assert np.all(upper - world.max(0) >= SETTINGS.margin_mm - 1e-6)
    assert np.allclose(spacing, SETTINGS.downsample * min(tiny_settings(anatomy).spacing_mm))
    train = np.load(preprocess / "train.npz")
    assert train["images"].shape[1:] == tuple(size[::-1])


@pytest.mark.parametrize("anatomy", ["femur", "left_atrium"])
def test_training_images_are_aligned_by_the_shape_model_transforms(prepared, anatomy):
    """Segmentations resampled with the same transforms overlap the reference's: the blur of
    the aligned training images is only the shapes' own variation."""
    cohort, preprocess = prepared(anatomy)
    meta = json.loads((preprocess / "grid.json").read_text())
    grid = pp.WorldGrid(**{k: tuple(v) for k, v in meta["grid"].items()})
    shapes = np.load(cohort / "shapes_train.npz")
    table = pd.read_csv(cohort / "subjects.csv").set_index("id")
    masks = {}
    for subject, transform in zip(shapes["ids"], shapes["image_to_world"]):
        segmentation = pp.read_image(table.loc[subject, "segmentation"])
        masks[subject] = pp.resample_to_world(segmentation, pp.affine(np.linalg.inv(transform)), grid) > 0.5
    reference = masks[meta["reference_id"]]
    dice = [2 * (m & reference).sum() / (m.sum() + reference.sum()) for m in masks.values()]
    assert min(dice) > 0.6 and np.median(dice) > 0.75


def test_normalization_uses_training_statistics_only(prepared, tmp_path):
    cohort, preprocess = prepared("femur")
    meta, grid, reference = pp.load_reference(preprocess)
    train = np.load(preprocess / "train.npz")["images"]
    assert abs(train.mean()) < 1e-3 and abs(train.std() - 1) < 1e-3
    # a test image is mapped with the stored statistics: doubling its intensities is not undone
    table = pd.read_csv(cohort / "subjects.csv")
    path = table.loc[table["split"] == "test", "image"].iloc[0]
    image = sitk.ReadImage(path)
    brighter = tmp_path / "brighter.nrrd"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32) * 2.0, str(brighter))
    original, _, _ = pp.preprocess_image(path, meta, grid, reference)
    doubled, _, _ = pp.preprocess_image(brighter, meta, grid, reference)
    norm = meta["normalization"]
    raw_mean = lambda a: (a * norm["std"] + norm["mean"]).mean()  # noqa: E731
    assert raw_mean(doubled) == pytest.approx(2 * raw_mean(original), rel=0.05)


# Registration against the known poses: tests/test_registration.py (the registration benchmark).


def test_unseen_images_need_neither_particles_nor_segmentations(prepared, tmp_path):
    """Delete everything of the test subjects but their images: preprocessing still works."""
    cohort, preprocess = prepared("femur")
    stripped = tmp_path / "cohort"
    shutil.copytree(cohort, stripped)
    (stripped / "shapes_test.npz").unlink()
    table = pd.read_csv(stripped / "subjects.csv")
    test = table["split"] == "test"
    copies = tmp_path / "images"
    copies.mkdir()
    for column in ("image",):
        table.loc[test, column] = [str(shutil.copy(p, copies)) for p in table.loc[test, column]]
    table.loc[test, ["segmentation", "mesh"]] = np.nan  # not even their paths
    table.to_csv(stripped / "subjects.csv", index=False)
    pp.preprocess_unseen(stripped, preprocess, "test", tmp_path / "test.npz")
    again = np.load(tmp_path / "test.npz")
    assert np.allclose(again["images"], np.load(preprocess / "test.npz")["images"], atol=1e-5)


def test_corrupt_test_image_is_named_and_leaves_no_output(prepared, tmp_path):
    cohort, preprocess = prepared("femur")
    broken = tmp_path / "cohort"
    shutil.copytree(cohort, broken)
    table = pd.read_csv(broken / "subjects.csv")
    row = table.index[table["split"] == "test"][0]
    corrupt = tmp_path / "corrupt.nrrd"
    data = open(table.loc[row, "image"], "rb").read()
    corrupt.write_bytes(data[: len(data) // 2])
    table.loc[row, "image"] = str(corrupt)
    table.to_csv(broken / "subjects.csv", index=False)
    out = tmp_path / "out" / "test.npz"
    with pytest.raises(ValueError, match=rf"subject {table.loc[row, 'id']}: .*corrupt.nrrd: image data cannot be read"):
        pp.preprocess_unseen(broken, preprocess, "test", out)
    assert not out.exists() and not any(out.parent.glob("*"))


def test_two_dimensional_new_image_is_refused(prepared, tmp_path):
    _, preprocess = prepared("femur")
    meta, grid, reference = pp.load_reference(preprocess)
    flat = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkFloat32), str(flat))
    with pytest.raises(ValueError, match="slice.nrrd: image is 2D; a 3D image is needed"):
        pp.preprocess_image(flat, meta, grid, reference)


def test_test_preprocessing_rule_is_not_given_test_particles(tmp_path):
    result = run_snakemake(tmp_path, "-n", "results/femur/preprocess/test.npz")
    assert result.returncode == 0, result.stderr
    block = result.stdout.split("rule preprocess_test:")[1].split("\n\n")[0]
    inputs = next(line for line in block.splitlines() if line.strip().startswith("input:"))
    assert "subjects.csv" in inputs and "reference.nrrd" in inputs
    assert "shapes_test" not in inputs and "segmentation" not in inputs and "particles" not in inputs


def test_a_fixed_grid_size_is_centred_on_the_shapes_and_never_crops_them():
    points = np.array([[[0.0, 0.0, 0.0], [10.0, 4.0, 6.0]], [[2.0, 1.0, 1.0], [3.0, 2.0, 2.0]]])  # 2 shapes
    free = pp.WorldGrid.around(points, 2.0, 1.0)
    assert free == pp.WorldGrid((-1.0, -1.0, -1.0), (2.0, 2.0, 2.0), (7, 4, 5))  # box plus 1 mm, no fixed size
    fixed = pp.WorldGrid.around(points, 2.0, 1.0, (9, 4, 8))
    assert fixed.size == (9, 4, 8) and fixed.spacing == (2.0, 2.0, 2.0)
    origin, far = np.array(fixed.origin), np.array(fixed.origin) + 2.0 * (np.array(fixed.size) - 1)
    assert np.allclose((origin + far) / 2, [5.0, 2.0, 3.0])  # centred on the bounding box
    assert np.allclose(origin, [-3.0, -1.0, -4.0])
    with pytest.raises(pp.GridTooSmall, match=r"need a grid of 7x4x5 voxels of 2 mm, more than the fixed size "
                                              r"6x4x4 along x, z"):
        pp.WorldGrid.around(points, 2.0, 1.0, (6, 4, 4))


def test_the_grid_size_setting_is_optional():
    assert pp.PreprocessSettings.from_config({"downsample": 2, "margin_mm": 5}).grid_size is None
    fixed = pp.PreprocessSettings.from_config({"downsample": 2, "margin_mm": 5, "grid_size": [10, 11, 12]})
    assert fixed.grid_size == (10, 11, 12)


def test_a_fixed_grid_size_is_used_and_recorded_or_refused_naming_the_sizes(prepared, tmp_path):
    cohort, preprocess = prepared("femur")
    free = json.loads((preprocess / "grid.json").read_text())
    assert free["grid_size_fixed"] is False and free["settings"]["grid_size"] is None
    size = tuple(n + 3 for n in free["grid"]["size"])
    pp.preprocess_training(cohort, dataclasses.replace(SETTINGS, grid_size=size), tmp_path / "fixed")
    meta, grid = pp.load_grid(tmp_path / "fixed")
    assert meta["grid_size_fixed"] is True and "fixed size" in meta["grid_rule"] and grid.size == size
    assert np.load(tmp_path / "fixed" / "train.npz")["images"].shape[1:] == size[::-1]
    world = np.load(cohort / "shapes_train.npz")["world"].reshape(-1, 3)
    centre = np.array(grid.origin) + np.array(grid.spacing) * (np.array(size) - 1) / 2
    assert np.allclose(centre, (world.min(0) + world.max(0)) / 2)  # centred on the training shapes' box

    small = (free["grid"]["size"][0], free["grid"]["size"][1] - 1, free["grid"]["size"][2])
    needed = "x".join(map(str, free["grid"]["size"]))
    with pytest.raises(ValueError, match=rf"{cohort}: the training shapes plus preprocess.margin_mm 5 mm need "
                                         rf"{needed} voxels of .* preprocess.grid_size is {'x'.join(map(str, small))} "
                                         r"\(too small along y\)"):
        pp.preprocess_training(cohort, dataclasses.replace(SETTINGS, grid_size=small), tmp_path / "small")
    assert not (tmp_path / "small").exists()


def test_a_grid_too_coarse_for_the_networks_is_refused_naming_the_setting(prepared, tmp_path):
    cohort, _ = prepared("femur")
    coarse = pp.PreprocessSettings(downsample=40.0, margin_mm=0.0)
    with pytest.raises(ValueError, match=r"voxels of .* mm \(preprocess.downsample 40 x .*at least 8 per axis"):
        pp.preprocess_training(cohort, coarse, tmp_path / "preprocess")
    assert not (tmp_path / "preprocess").exists()
