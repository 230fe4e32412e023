"""Progressive DeepSSM's parts (the conformance suite in test_methods.py covers the contract): per-scale
PCA layers that keep the shape space, lifting a coarse scale to all points, and a coarse-first schedule
that trains only what each stage should."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepssm_workflow import methods
from deepssm_workflow.methods.progressive import scale_layer
from deepssm_workflow.scales import nested_order
from deepssm_workflow.shape_space import ShapeSpace

SHAPE, M = (12, 10, 14), 40


@pytest.fixture(scope="module")
def space():
    rng = np.random.default_rng(0)
    mean, modes = rng.uniform(0, 30, (M, 3)), rng.normal(0, 1, (4, M, 3))
    shapes = mean + np.einsum("nk,kmd->nmd", rng.normal(0, 1, (30, 4)), modes)
    return ShapeSpace(n_modes=4).fit(shapes), shapes


def build(name, space, **settings):
    entry = methods.get(name)
    torch.manual_seed(0)
    block = {**entry.method.smoke, **settings}
    return entry, entry.settings(block), entry.method.build(entry.settings(block),
                                                            methods.DataSpec(SHAPE, M, space))


def test_a_scale_layer_spans_the_shape_space_on_its_points(space):
    space, shapes = space
    order = nested_order(space.mean)
    prefix = order[:10]
    mean, basis = scale_layer(space, prefix)
    in_space = space.inverse_transform(space.transform(shapes))[:, prefix]  # the shapes as the space knows them
    offsets = (in_space - mean).reshape(len(shapes), -1)
    scores = np.linalg.lstsq(basis.T, offsets.T, rcond=None)[0].T
    np.testing.assert_allclose(mean + (scores @ basis).reshape(len(shapes), -1, 3), in_space, atol=1e-8)
    # whitened: the scores of the shape space's own shapes have unit variance along each axis
    assert basis.shape[0] <= 4
    np.testing.assert_allclose(scores.var(0, ddof=1), 1.0, rtol=0.5)


def test_lifting_a_coarse_scale_keeps_the_mean_shape_offsets(space):
    space, _ = space
    _, _, model = build("progressive", space)
    mean = torch.as_tensor(space.mean, dtype=torch.float32)[None]
    for s, size in enumerate(model.sizes):
        coarse = mean[:, model.order[:size]]
        torch.testing.assert_close(model.lift(coarse, s), mean, atol=1e-5, rtol=0)
    shifted = mean[:, model.order[:model.sizes[0]]] + torch.tensor([1.0, -2.0, 0.5])
    torch.testing.assert_close(model.lift(shifted, 0), mean + torch.tensor([1.0, -2.0, 0.5]), atol=1e-5, rtol=0)


def _trained_names(entry, model, phase):
    return {name.split(".")[0] + ("." + name.split(".")[1] if name.startswith(("heads", "autoencoders")) else "")
            for name, p in model.named_parameters() if id(p) in {id(q) for q in entry.method.trainable(model, phase)}}


def test_the_coarse_first_schedule_trains_only_what_each_stage_should(space):
    space, _ = space
    entry, settings, model = build("progressive", space)
    phases = entry.method.phases(settings)
    assert [p.name for p in phases] == ["stage1", "stage2", "stage3"]
    assert [p.selects_best for p in phases] == [False, False, True]
    for s, phase in enumerate(phases):
        heads = {f"heads.{k}" for k in range(s + 1)}
        assert _trained_names(entry, model, phase) == {"encoder", "seg_reduce", "seg_out", *heads}

    entry, settings, model = build("progressive_tl", space)
    phases = entry.method.phases(settings)
    assert [p.name for p in phases] == ["autoencoder", "stage1", "stage2", "stage3", "joint"]
    every_autoencoder = {f"autoencoders.{k}" for k in range(3)}
    assert _trained_names(entry, model, phases[0]) == every_autoencoder
    for s, phase in enumerate(phases[1:4]):
        assert _trained_names(entry, model, phase) == {"encoder", "seg_reduce", "seg_out",
                                                       *{f"heads.{k}" for k in range(s + 1)}}
    assert _trained_names(entry, model, phases[4]) == {"encoder", "seg_reduce", "seg_out", *every_autoencoder,
                                                      *{f"heads.{k}" for k in range(3)}}


def test_without_the_previous_input_a_head_sees_only_the_image(space):
    space, _ = space
    _, _, with_previous = build("progressive", space)
    _, _, without = build("progressive", space, previous_input=False)
    images = torch.randn(2, 1, *SHAPE)
    with torch.no_grad():
        for model, depends in ((with_previous, True), (without, False)):
            model.eval()
            before = model.scale_scores(images)[0][1][0]
            model.heads[0][-1].bias.add_(3.0)  # change scale 0's prediction only
            after = model.scale_scores(images)[0][1][0]
            assert torch.equal(before, after) != depends


def test_bad_inputs_are_refused_by_name_and_leave_no_model(space, tmp_path):
    space, shapes = space
    with pytest.raises(ValueError, match=r"method progressive: scales must be strictly increasing, got \[16, 8\]"):
        methods.get("progressive").settings({"scales": [16, 8]})
    from deepssm_workflow.engine import train

    images = np.zeros((len(shapes), *SHAPE), np.float32)
    settings = methods.get("progressive").smoke_settings()
    with pytest.raises(ValueError, match="method progressive needs the training segmentations; none were given"):
        train("progressive", settings, images, shapes.astype(np.float32), np.arange(20), np.arange(20, 30), space,
              tmp_path / "model", device="cpu", log=lambda _: None)
    assert not (tmp_path / "model" / "model.pt").exists()
    from deepssm_workflow.train import _segmentations

    with pytest.raises(ValueError, match=r"train_segmentations.npz: missing; .* preprocess_segmentations"):
        _segmentations(tmp_path / "preprocess", tmp_path / "augmentation", ["a"], images)
