"""Model-based augmentation (paper section 3.1) on the tiny synthetic femur cohort: stored
arrays, consistency with the shape space, images that are warps of their source subject,
determinism, and atomic failure."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from deepssm_workflow import preprocess as pp
from deepssm_workflow import samplers
from deepssm_workflow.augment import augment
from deepssm_workflow.ingest import ingest_cohort
from deepssm_workflow.shape_space import ShapeSpace

N_SAMPLES = 8


@pytest.fixture(scope="module")
def prepared(tiny_cohort, tmp_path_factory):
    """(cohort dir, preprocess dir) of the ingested and preprocessed tiny femur cohort."""
    root = tmp_path_factory.mktemp("augment_femur")
    folder = tiny_cohort("femur")
    ingest_cohort({"source": "synthetic", "manifest": str(folder / "subjects.csv")}, "femur", root / "cohort")
    pp.preprocess_training(root / "cohort", pp.PreprocessSettings(1.0, 5.0), root / "preprocess")
    return root / "cohort", root / "preprocess"


@pytest.fixture(scope="module")
def kde_run(prepared, tmp_path_factory):
    cohort, preprocess = prepared
    out = tmp_path_factory.mktemp("augment_kde") / "out"
    return out, augment(cohort, preprocess, out, N_SAMPLES, sampler="kde", seed=0)


def test_outputs_have_the_documented_shapes_and_dtypes(prepared, kde_run):
    cohort, preprocess = prepared
    out, summary = kde_run
    train = np.load(preprocess / "train.npz")
    world = np.load(cohort / "shapes_train.npz")["world"]
    n_train, m = len(train["ids"]), world.shape[1]

    images = np.load(out / "images.npy", mmap_mode="r")
    assert isinstance(images, np.memmap)
    assert images.shape == (N_SAMPLES, *train["images"].shape[1:]) and images.dtype == np.float32
    assert np.all(np.isfinite(images))

    samples = np.load(out / "samples.npz", allow_pickle=False)
    assert samples["points"].shape == (N_SAMPLES, m, 3) and samples["points"].dtype == np.float64
    assert samples["scores"].shape == (N_SAMPLES, n_train - 1)
    assert samples["source_index"].shape == (N_SAMPLES,) and samples["source_index"].dtype.kind == "i"
    assert samples["source_index"].min() >= 0 and samples["source_index"].max() < n_train
    assert samples["source_ids"].dtype.kind == "U"
    assert list(samples["source_ids"]) == [str(train["ids"][i]) for i in samples["source_index"]]
    assert samples["bandwidth"].shape == () and str(samples["sampler"]) == "kde"

    assert (out / "qc.png").stat().st_size > 10_000
    assert not list(out.glob(".staging-*"))
    assert summary["n"] == N_SAMPLES and summary["n_modes"] == n_train - 1
    assert summary["images_bytes"] == (out / "images.npy").stat().st_size
    assert summary["samples_per_second"] > 0 and summary["seconds"] > 0


def test_points_are_the_shape_space_reconstruction_of_the_scores(prepared, kde_run):
    cohort, _ = prepared
    out, _ = kde_run
    world = np.load(cohort / "shapes_train.npz")["world"]
    space = ShapeSpace.load(out / "shape_space.npz")
    assert space.n_modes == len(world) - 1  # all N - 1 modes
    assert np.allclose(space.mean, ShapeSpace(n_modes=len(world) - 1).fit(world).mean)
    samples = np.load(out / "samples.npz")
    assert np.allclose(samples["points"], space.inverse_transform(samples["scores"]))


def test_kde_bandwidth_is_the_mean_nearest_neighbour_distance_of_the_training_scores(prepared, kde_run):
    cohort, _ = prepared
    out, summary = kde_run
    world = np.load(cohort / "shapes_train.npz")["world"]
    train_scores = ShapeSpace.load(out / "shape_space.npz").transform(world)
    bandwidth = float(np.load(out / "samples.npz")["bandwidth"])
    assert bandwidth == pytest.approx(samplers.kde_bandwidth(train_scores))
    assert summary["bandwidth"] == pytest.approx(bandwidth)


def _correlation(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_each_image_is_a_warp_of_its_source_subject(prepared, kde_run):
    _, preprocess = prepared
    out, _ = kde_run
    real = np.load(preprocess / "train.npz")["images"]
    images = np.load(out / "images.npy", mmap_mode="r")
    source = np.load(out / "samples.npz")["source_index"]
    margins = []
    for image, s in zip(images, source):
        correlations = np.array([_correlation(np.asarray(image), r) for r in real])
        margins.append(correlations[s] - np.delete(correlations, s).mean())
    # on this cohort the margins are about 0.04-0.14 (mean 0.08); all subjects are aligned in one frame
    assert np.mean(margins) > 0.02
    assert np.mean(np.array(margins) > 0) > 0.5


def test_same_seed_gives_identical_outputs_and_another_seed_differs(prepared, kde_run, tmp_path):
    cohort, preprocess = prepared
    out, _ = kde_run
    augment(cohort, preprocess, tmp_path / "again", N_SAMPLES, sampler="kde", seed=0)
    augment(cohort, preprocess, tmp_path / "other", N_SAMPLES, sampler="kde", seed=1)
    assert (tmp_path / "again" / "images.npy").read_bytes() == (out / "images.npy").read_bytes()
    first, again, other = (np.load(d / "samples.npz") for d in (out, tmp_path / "again", tmp_path / "other"))
    for name in first.files:
        assert np.array_equal(first[name], again[name], equal_nan=first[name].dtype.kind == "f"), name
    assert not np.allclose(first["scores"], other["scores"])
    assert (tmp_path / "other" / "images.npy").read_bytes() != (out / "images.npy").read_bytes()


def test_gaussian_sampler_uses_the_nearest_training_subject(prepared, tmp_path):
    cohort, preprocess = prepared
    summary = augment(cohort, preprocess, tmp_path / "gauss", 4, sampler="gaussian", seed=3)
    samples = np.load(tmp_path / "gauss" / "samples.npz")
    world = np.load(cohort / "shapes_train.npz")["world"]
    train_scores = ShapeSpace.load(tmp_path / "gauss" / "shape_space.npz").transform(world)
    assert str(samples["sampler"]) == "gaussian" and np.isnan(samples["bandwidth"]) and np.isnan(summary["bandwidth"])
    assert np.array_equal(samples["source_index"], samplers.nearest(samples["scores"], train_scores))
    assert np.load(tmp_path / "gauss" / "images.npy", mmap_mode="r").shape[0] == 4


def test_invalid_requests_fail_clearly_and_leave_no_output(prepared, tmp_path):
    cohort, preprocess = prepared
    with pytest.raises(ValueError, match="n_samples"):
        augment(cohort, preprocess, tmp_path / "a", 0)
    with pytest.raises(ValueError, match="unknown sampler 'vae'"):
        augment(cohort, preprocess, tmp_path / "b", 2, sampler="vae")

    # preprocessing of another cohort order: the training ids no longer match the shapes
    broken = tmp_path / "preprocess"
    shutil.copytree(preprocess, broken)
    train = dict(np.load(broken / "train.npz"))
    train["ids"] = train["ids"][::-1]
    np.savez(broken / "train.npz", **train)
    with pytest.raises(ValueError, match=r"train\.npz.*shapes_train\.npz"):
        augment(cohort, broken, tmp_path / "c", 2)
    for name in ("a", "b", "c"):
        assert not (tmp_path / name).exists()
