"""Model-based augmentation (paper section 3.1) on the tiny synthetic femur cohort: stored
arrays, consistency with the shape space, images that are warps of their source subject,
determinism, and atomic failure."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from deepssm_workflow import holdout, samplers
from deepssm_workflow import preprocess as pp
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


def test_validation_subjects_stay_out_of_the_shape_model_but_keep_their_share_of_samples(prepared, tmp_path):
    cohort, preprocess = prepared
    world = np.load(cohort / "shapes_train.npz")["world"]
    ids = [str(i) for i in np.load(cohort / "shapes_train.npz")["ids"]]
    n_samples, validation = 24, {"val_fraction": 0.25, "seed": 3}
    held_out = holdout.validation_subjects(len(world), 0.25, 3)
    fitted = np.setdiff1d(np.arange(len(world)), held_out)
    summary = augment(cohort, preprocess, tmp_path / "out", n_samples, seed=0, validation=validation)
    samples = np.load(tmp_path / "out" / "samples.npz")
    space = ShapeSpace.load(tmp_path / "out" / "shape_space.npz")

    assert list(samples["validation_ids"]) == summary["validation_ids"] == [ids[i] for i in held_out]
    assert space.n_modes == len(fitted) - 1
    assert np.allclose(space.mean, world[fitted].mean(0))
    # a held-out shape is not in the span of the fitted ones: nothing of it reached the model
    residual = np.abs(space.inverse_transform(space.transform(world[held_out])) - world[held_out]).max()
    assert residual > 0.1
    # the held-out subjects get their share, and training's split puts those samples on its validation side
    source = samples["source_index"]
    from_held_out = np.isin(source, held_out)
    assert from_held_out.sum() == round(n_samples * len(held_out) / len(world))
    _, val_idx = holdout.split_by_source(len(world), source, 0.25, 3)
    assert np.array_equal(val_idx[val_idx >= len(world)] - len(world), np.flatnonzero(from_held_out))
    # training samples are points of the fitted model; held-out samples move their own shape by a drawn displacement
    points = samples["points"]
    train_points = points[~from_held_out]
    assert np.allclose(space.inverse_transform(space.transform(train_points)), train_points, atol=1e-6)
    displacement = points[from_held_out] - world[source[from_held_out]]
    shape_rms = np.sqrt(((world - world.mean(0)) ** 2).sum(-1).mean())
    assert 0 < np.sqrt((displacement**2).sum(-1).mean()) < shape_rms
    # each held-out sample's image is still a warp of its own source subject's image
    images = np.load(tmp_path / "out" / "images.npy", mmap_mode="r")
    train_images = np.load(preprocess / "train.npz")["images"]
    j = int(np.flatnonzero(from_held_out)[0])
    correlations = [np.corrcoef(images[j].ravel(), train_images[i].ravel())[0, 1] for i in range(len(world))]
    assert int(np.argmax(correlations)) == source[j]


def test_training_fits_its_pca_basis_without_the_validation_subjects_and_refuses_another_split(prepared, tmp_path):
    import torch

    from deepssm_workflow.methods import get
    from deepssm_workflow.train import train_from_artifacts

    cohort, preprocess = prepared
    shapes = np.load(cohort / "shapes_train.npz")
    augment(cohort, preprocess, tmp_path / "aug", 6, seed=0, validation={"val_fraction": 0.25, "seed": 3})
    settings = {"shape_space": {"n_modes": 2}, "method": dict(get("base").method.smoke),
                "training": {"batch_size": 4, "val_fraction": 0.25, "seed": 3}}
    train_from_artifacts(cohort, preprocess, tmp_path / "aug", "base", settings, tmp_path / "model", log=lambda _: None)
    held_out = holdout.validation_subjects(len(shapes["ids"]), 0.25, 3)
    fitted = np.setdiff1d(np.arange(len(shapes["ids"])), held_out)
    pca_mean = torch.load(tmp_path / "model" / "model.pt", map_location="cpu")["pca_bias"].numpy().reshape(-1, 3)
    assert np.allclose(pca_mean, shapes["world"][fitted].mean(0), atol=1e-4)
    assert not np.allclose(pca_mean, shapes["world"].mean(0), atol=1e-4)

    other = {**settings, "training": {**settings["training"], "seed": 4}}
    with pytest.raises(ValueError, match=r"samples.npz: made with validation subjects .* rerun the augmentation"):
        train_from_artifacts(cohort, preprocess, tmp_path / "aug", "base", other, tmp_path / "other",
                             log=lambda _: None)
    # a store made without a hold-out (a library call) trains, and the log says what that costs
    augment(cohort, preprocess, tmp_path / "plain", 6, seed=0)
    lines = []
    train_from_artifacts(cohort, preprocess, tmp_path / "plain", "base", settings, tmp_path / "plain_model",
                         log=lines.append)
    assert any(line.startswith("WARNING:") and "without a validation hold-out" in line for line in lines)
