"""Torch thin-plate spline, backward warp and match losses of the self-supervised landmarks
method: agreement with tps.py, exact interpolation, coordinate conventions (known
translations on an anisotropic grid), the lattice shortcut, finite gradients at the
kernel's cone, mask and batch independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepssm_workflow import landmark_warp
from deepssm_workflow.landmark_warp import (
    append_corners,
    condition_number,
    corner_anchors,
    fit_spline,
    map_grid,
    map_points,
    match_loss,
    mind_ssc,
    warp,
)
from deepssm_workflow.tps import ThinPlateSpline

SIZE = (12, 10, 14)  # Z, Y, X
SPACING = (1.0, 1.5, 2.0)  # x, y, z mm: anisotropic, so swapped axes show
EXTENT = np.array([(SIZE[2 - a] - 1) * SPACING[a] for a in range(3)])  # x, y, z mm
LOSSES = ("l2", "ncc", "mind")


def inside_points(rng, count, batch=1, margin=0.2) -> torch.Tensor:
    """Random (batch, count, 3) float64 points in the grid's middle, mm."""
    return torch.from_numpy(rng.uniform(margin, 1 - margin, (batch, count, 3)) * EXTENT)


def voxel_centres() -> torch.Tensor:
    """(Z, Y, X, 3) mm positions x, y, z of the grid's voxel centres, float64."""
    axes = [torch.arange(SIZE[2 - a], dtype=torch.float64) * SPACING[a] for a in range(3)]
    z, y, x = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return torch.stack([x, y, z], -1)


def blob(shift_mm=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """(1, 1, Z, Y, X) float32 image of an off-centre anisotropic Gaussian, evaluated at x + shift."""
    where = voxel_centres() + torch.tensor(shift_mm, dtype=torch.float64)
    centre, width = torch.tensor([6.0, 7.0, 9.0]), torch.tensor([3.0, 2.5, 4.0])
    image = torch.exp(-(((where - centre) / width) ** 2).sum(-1) / 2) + 0.3 * torch.sin(where[..., 0] / 3)
    return image[None, None].float()


def test_spline_interpolates_and_matches_tps_py():
    rng = np.random.default_rng(0)
    control = inside_points(rng, 12, batch=2)
    values = control + torch.from_numpy(rng.normal(0, 1.5, control.shape))
    points = inside_points(rng, 50, batch=2, margin=-0.2)  # also outside the grid
    for regularization in (0.0, 0.5):
        spline = fit_spline(control, values, regularization)
        assert spline.system.shape == (2, 16, 16)
        mapped = map_points(spline, points)
        for b in range(2):
            reference = ThinPlateSpline(control[b].numpy(), values[b].numpy(), regularization)
            assert np.abs(mapped[b].numpy() - reference(points[b].numpy())).max() < 1e-9
    exact = map_points(fit_spline(control, values), control)
    assert (exact - values).abs().max() < 1e-8
    # shared points (1, P, 3) are broadcast over the batch
    shared = map_points(spline, points[:1])
    assert torch.allclose(shared[1], map_points(spline, points[:1].expand(2, -1, -1))[1])


def test_chunked_kernel_sum_matches_one_chunk(monkeypatch):
    rng = np.random.default_rng(1)
    control = inside_points(rng, 7).requires_grad_()
    values = (control + torch.from_numpy(rng.normal(0, 1, control.shape))).detach().requires_grad_()
    points = inside_points(rng, 9).requires_grad_()

    def run():
        out = map_points(fit_spline(control, values), points)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    (control, values, points))
        return out.detach(), grads

    whole = run()
    monkeypatch.setattr(landmark_warp, "CHUNK_ELEMENTS", 3 * 7 * 2)  # 2 points per chunk, 5 chunks
    chunked = run()
    assert torch.allclose(whole[0], chunked[0], atol=1e-12)
    for a, b in zip(whole[1], chunked[1]):
        assert torch.allclose(a, b, atol=1e-10)


def test_gradcheck_map_points_and_condition_number():
    rng = np.random.default_rng(2)
    control = inside_points(rng, 5).requires_grad_()
    values = (control + torch.from_numpy(rng.normal(0, 1, control.shape))).detach().requires_grad_()
    points = inside_points(rng, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda c, v, p: map_points(fit_spline(c, v, 0.1), p), (control, values, points))
    assert torch.autograd.gradcheck(lambda c: condition_number(fit_spline(c, values).system), (control,))


def test_gradient_finite_where_a_point_is_a_control_point():
    rng = np.random.default_rng(3)
    control = inside_points(rng, 6).requires_grad_()
    values = (control + 1.0).detach().requires_grad_()
    points = torch.cat([control.detach()[:, :2], inside_points(rng, 3)], 1).requires_grad_()
    spline = fit_spline(control, values)
    out = map_points(spline, points)
    assert torch.allclose(out[:, :2], values[:, :2], atol=1e-10)
    out.square().sum().backward()
    for tensor in (control, values, points):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_condition_number():
    rng = np.random.default_rng(4)
    control = inside_points(rng, 8, batch=2)
    system = fit_spline(control, control).system
    kappa = condition_number(system)
    assert kappa.shape == (2,)
    assert torch.allclose(kappa, torch.linalg.cond(system, "fro"), rtol=1e-10)
    for b in range(2):
        a = system[b].numpy()
        direct = np.linalg.norm(a, "fro") * np.linalg.norm(np.linalg.inv(a), "fro")
        assert abs(kappa[b].item() - direct) < 1e-9 * direct
    # two landmarks closing in on each other make the system ill-conditioned (what the regulariser prevents)
    close = control.clone()
    close[:, 1] = close[:, 0] + 1e-3
    assert (condition_number(fit_spline(close, close).system) > 10 * kappa).all()


def test_corner_anchors():
    corners = corner_anchors(SIZE, SPACING, dtype=torch.float64)
    assert corners.shape == (8, 3)
    assert torch.equal(corners.amin(0), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(corners.amax(0), torch.from_numpy(EXTENT))
    assert len({tuple(c) for c in corners.tolist()}) == 8
    landmarks = inside_points(np.random.default_rng(5), 4, batch=3)
    assert torch.equal(append_corners(landmarks, SIZE, SPACING)[2, 4:], corners)
    with pytest.raises(ValueError):
        corner_anchors((1, 10, 14), SPACING)


@pytest.mark.parametrize("step", (1, 2))
def test_same_landmarks_give_the_identity(step):
    rng = np.random.default_rng(6)
    landmarks = append_corners(inside_points(rng, 6, batch=2), SIZE, SPACING)
    images = torch.from_numpy(rng.normal(0, 1, (2, 2, *SIZE))).float()
    warped = warp(images, fit_spline(landmarks, landmarks), SPACING, step=step)
    assert (warped - images).abs().max() < 1e-5
    # float32 landmarks: positions good to ~1e-5 mm
    spline32 = fit_spline(landmarks.float(), landmarks.float())
    assert (warp(images, spline32, SPACING, step=step) - images).abs().max() < 1e-3


@pytest.mark.parametrize("step", (1, 2))
def test_known_translation(step):
    """target(x) = source(x + t): the target -> source map is x + t, an affine map the spline reproduces."""
    voxels = (2, 1, -1)  # x, y, z
    t = [v * s for v, s in zip(voxels, SPACING)]
    source, target = blob(), blob(t)
    target_landmarks = inside_points(np.random.default_rng(7), 6)
    source_landmarks = target_landmarks + torch.tensor(t, dtype=torch.float64)
    warped = warp(source, fit_spline(target_landmarks, source_landmarks), SPACING, step=step)
    # interior: voxels whose shifted position lies inside the source grid
    interior = warped[0, 0, 1:, :-1, :-2]
    assert interior.shape == (11, 9, 12)
    assert (interior - target[0, 0, 1:, :-1, :-2]).abs().max() < 1e-5
    assert (warped - source).abs().max() > 0.1  # it did move


def smooth_random_landmarks(seed, batch=1):
    """Target and source landmarks with the corners, moved by a smooth random field of ~1 voxel."""
    rng = np.random.default_rng(seed)
    target = inside_points(rng, 8, batch)
    phase = torch.from_numpy(rng.uniform(0, 2 * np.pi, (batch, 1, 3)))
    source = target + 1.5 * torch.sin(target[..., [1, 2, 0]] / 5.0 + phase)
    return append_corners(target, SIZE, SPACING), append_corners(source, SIZE, SPACING)


def test_lattice_is_exact_on_its_knots():
    spline = fit_spline(*smooth_random_landmarks(8))
    exact = map_grid(spline, SIZE, SPACING, step=1)
    assert torch.allclose(exact, map_points(spline, voxel_centres().reshape(1, -1, 3)).reshape(exact.shape))
    for step in (2, 3, 5):  # 3 and 5 leave sizes that are not multiples: the lattice reaches past the far end
        coarse = map_grid(spline, SIZE, SPACING, step=step)
        assert coarse.shape == exact.shape
        assert (coarse[:, ::step, ::step, ::step] - exact[:, ::step, ::step, ::step]).abs().max() < 1e-10


def test_step_two_is_close_to_step_one():
    spline = fit_spline(*smooth_random_landmarks(9))
    exact, coarse = (map_grid(spline, SIZE, SPACING, step=s) for s in (1, 2))
    error_voxels = ((coarse - exact) / torch.tensor(SPACING, dtype=torch.float64)).norm(dim=-1)
    # measured: max 0.26 voxel (0.7 mm from a control, at the kernel's cone), mean 0.027, for
    # displacements of up to 1.6 voxels on this tiny grid
    assert error_voxels.max() < 0.4 and error_voxels.mean() < 0.05
    image = blob()
    difference = (warp(image, spline, SPACING, step=2) - warp(image, spline, SPACING, step=1)).abs()
    assert difference.max() < 0.06  # measured 0.026 for an image of range ~1.3


def landmark_pair(seed=10):
    """Target landmarks with one on a voxel centre (a step-1 and step-2 lattice point) and
    source landmarks with one on a voxel centre, both requiring gradients."""
    rng = np.random.default_rng(seed)
    target = inside_points(rng, 6)
    target[0, 0] = torch.tensor([4 * SPACING[0], 2 * SPACING[1], 6 * SPACING[2]], dtype=torch.float64)
    source = target + torch.from_numpy(rng.normal(0, 1.0, target.shape))
    source[0, 1] = torch.tensor([5 * SPACING[0], 3 * SPACING[1], 4 * SPACING[2]], dtype=torch.float64)
    return target.requires_grad_(), source.requires_grad_()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("step", (1, 2))
def test_gradients_finite_and_nonzero(name, step):
    target_landmarks, source_landmarks = landmark_pair()
    target, source = (append_corners(landmarks, SIZE, SPACING) for landmarks in (target_landmarks, source_landmarks))
    spline = fit_spline(target, source, regularization=1e-5)
    warped = warp(blob(), spline, SPACING, step=step)
    loss = match_loss(name, warped, blob((2.0, 0.0, 1.0))) + 1e-3 * condition_number(spline.system)
    loss.sum().backward()
    for grad in (target_landmarks.grad, source_landmarks.grad):
        assert torch.isfinite(grad).all()
        assert (grad.abs().sum(-1) > 0).all()  # every landmark, including those on voxel centres


def shifted_pair():
    image = blob()
    return image, blob((2.0, 1.5, 0.0))


@pytest.mark.parametrize("name", LOSSES)
def test_losses_zero_for_identical_and_grow_with_shift(name):
    image, shifted = shifted_pair()
    same = match_loss(name, image, image)
    assert same.shape == (1,) and same.abs().item() < 1e-6
    assert match_loss(name, shifted, image).item() > 100 * max(same.abs().item(), 1e-6)
    # a half-way shift costs less than the full one
    assert match_loss(name, blob((1.0, 0.75, 0.0)), image).item() < match_loss(name, shifted, image).item()


def test_ncc_and_mind_ignore_linear_intensity_changes():
    image, shifted = shifted_pair()
    rescaled = 3.0 * image + 2.0
    for name in ("ncc", "mind"):
        # ncc: not exactly 0, as eps is not rescaled with the intensities
        assert match_loss(name, rescaled, image).item() < 1e-2 * match_loss(name, shifted, image).item()
    assert match_loss("l2", rescaled, image).item() > 1.0


@pytest.mark.parametrize("name", LOSSES)
def test_mask_restricts_the_loss(name):
    image, shifted = shifted_pair()
    mask = torch.zeros_like(image)
    mask[..., 2:9, 2:8, 3:11] = 1.0
    base = match_loss(name, shifted, image, mask)
    outside = shifted.clone()
    outside[..., :2, :, :] += 5.0  # only where the mask is 0 (next to it, too)
    outside[..., :, :, 11:] -= 3.0
    assert torch.allclose(match_loss(name, outside, image, mask), base, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(match_loss(name, outside, image), match_loss(name, shifted, image))
    inside = shifted.clone()
    inside[..., 5, 5, 6] += 1.0
    assert not torch.allclose(match_loss(name, inside, image, mask), base)


def test_batch_elements_are_independent():
    target_landmarks, source_landmarks = smooth_random_landmarks(11, batch=2)
    spline = fit_spline(target_landmarks, source_landmarks)
    images = torch.cat([blob(), blob((1.0, 0.0, 2.0))])
    targets = torch.cat([blob((0.5, 1.0, 0.0)), 2 * blob()])
    mask = torch.ones_like(images)
    mask[1, ..., :4] = 0.0
    warped = warp(images, spline, SPACING, step=2)
    kappa = condition_number(spline.system)
    losses = {name: match_loss(name, warped, targets, mask) for name in LOSSES}
    for b in range(2):
        alone = fit_spline(target_landmarks[b:b + 1], source_landmarks[b:b + 1])
        warped_alone = warp(images[b:b + 1], alone, SPACING, step=2)
        assert torch.allclose(warped_alone, warped[b:b + 1], atol=1e-5)
        assert torch.allclose(condition_number(alone.system), kappa[b:b + 1], rtol=1e-9)
        for name in LOSSES:
            single = match_loss(name, warped[b:b + 1], targets[b:b + 1], mask[b:b + 1])
            assert torch.allclose(single, losses[name][b:b + 1], rtol=1e-5, atol=1e-7)


def test_mind_descriptor_shape_and_range():
    descriptor = mind_ssc(torch.cat([blob(), blob((1.0, 1.0, 1.0))]), dilation=2)
    assert descriptor.shape == (2, 12, *SIZE)
    assert descriptor.min() >= 0 and descriptor.max() <= 1
    assert torch.allclose(descriptor.amax(1), torch.ones(2, *SIZE))  # the smallest distance maps to 1
    assert torch.isfinite(mind_ssc(torch.ones(1, 1, *SIZE))).all()  # flat image: no 0 / 0
    # invariant to intensity scale, with each image's own variance level (not the batch's) bounding the clamp
    image = blob((0.5, 0.0, 0.0))
    pair = mind_ssc(torch.cat([image, 1000 * image]))
    assert torch.allclose(pair[1], pair[0], atol=1e-5) and torch.allclose(pair[:1], mind_ssc(image), atol=1e-6)


def test_bad_arguments():
    image, _ = shifted_pair()
    with pytest.raises(ValueError, match="unknown match loss"):
        match_loss("ssd", image, image)
    with pytest.raises(ValueError):
        fit_spline(torch.zeros(1, 3, 3), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError):
        match_loss("ncc", image, image, window=4)
