"""The DeepSSM networks and losses: real torch computations on CPU, small and seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepssm_workflow.methods import Phase
from deepssm_workflow.methods.deepssm import BaseDeepSSM, TLDeepSSM, TLDeepSSMMethod
from deepssm_workflow.models import (
    ImageEncoder,
    ModelConfig,
    correspondence_loss,
    focal_loss,
    focal_threshold,
    latent_focal_threshold,
    xavier_init,
)

TINY = (20, 16, 24)
M, K = 40, 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these tensors are small: one thread avoids thread start-up and contention on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pca_arrays(m: int = M, k: int = K, seed: int = 0):
    """A mean shape (m, 3) and an orthonormal (k, 3m) basis, like ShapeSpace's."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 30, (m, 3))
    basis = np.linalg.qr(rng.normal(size=(3 * m, k)))[0].T
    return mean, basis


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(**{"input_shape": TINY, "n_points": M, "n_modes": K, "latent_dim": 8,
                          "ae_hidden": 32, **overrides})


def network(kind: str, cfg: ModelConfig, mean, basis) -> nn.Module:
    """Base-DeepSSM's or TL-DeepSSM's network (their focal presets build the same)."""
    return BaseDeepSSM(cfg, mean, basis) if kind == "base" else TLDeepSSM(cfg, mean)


def set_phase(model: TLDeepSSM, phase: str) -> list[nn.Parameter]:
    """Freeze `model` as TL-DeepSSM's phase does; the parameters it trains."""
    return TLDeepSSMMethod().trainable(model, Phase(phase, 1, 1e-3, 0.0))


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict, module: nn.Module) -> set[str]:
    return {name for name, value in module.state_dict().items() if not torch.equal(before[name], value)}


# -- architecture and shapes


@pytest.mark.parametrize("shape", [TINY, (8, 8, 8), (33, 17, 9)])
@pytest.mark.parametrize("kind", ["base", "tl"])
def test_output_shapes_small_inputs(kind, shape):
    torch.manual_seed(0)
    cfg = tiny_config(input_shape=shape)
    mean, basis = pca_arrays()
    model = network(kind, cfg, mean, basis)
    descriptor, points = model(torch.randn(2, 1, *shape))
    assert descriptor.shape == (2, K if kind == "base" else cfg.latent_dim)
    assert points.shape == (2, M, 3)
    assert torch.isfinite(points).all()
    # a channel-less (B, Z, Y, X) batch is accepted too
    assert model(torch.randn(2, *shape))[1].shape == (2, M, 3)


@pytest.mark.parametrize("shape", [(65, 46, 58), (69, 51, 66), (118, 69, 88)], ids=["femur", "metopic", "left_atrium"])
def test_encoder_handles_paper_sizes(shape):
    # the image encoder is all that depends on the image size; the heads are covered above
    torch.manual_seed(0)
    cfg = ModelConfig(input_shape=shape, n_points=M, n_modes=20, fc_sizes=(8, 8))  # small FCs: fast
    encoder = ImageEncoder(cfg, 20)
    # "same" padding: three pools by 2 take each axis to floor(n / 8)
    assert encoder.feature_shape == (192, *(n // 8 for n in shape))
    with torch.no_grad():
        assert encoder(torch.randn(2, 1, *shape)).shape == (2, 20)


def test_paper_femur_size_both_networks():
    torch.manual_seed(0)
    cfg = ModelConfig(input_shape=(65, 46, 58), n_points=M, n_modes=K)
    mean, basis = pca_arrays()
    for kind in ("base", "tl"):
        model = network(kind, cfg, mean, basis).eval()
        with torch.no_grad():
            descriptor, points = model(torch.randn(2, 1, 65, 46, 58))
        assert descriptor.shape == (2, K if kind == "base" else 64) and points.shape == (2, M, 3)


def test_encoder_structure_follows_the_paper():
    encoder = ImageEncoder(tiny_config(), 5)
    convs = [m for m in encoder.features if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [12, 24, 48, 96, 192]
    assert [c.kernel_size[0] for c in convs] == [5, 3, 3, 3, 3]
    kinds = [type(m).__name__ for m in encoder.features]
    # conv, batch norm, PReLU each time; pools after the 1st, 3rd and 5th conv
    assert kinds == ["Conv3d", "BatchNorm3d", "PReLU", "MaxPool3d",
                     "Conv3d", "BatchNorm3d", "PReLU", "Conv3d", "BatchNorm3d", "PReLU", "MaxPool3d",
                     "Conv3d", "BatchNorm3d", "PReLU", "Conv3d", "BatchNorm3d", "PReLU", "MaxPool3d"]
    linears = [m for m in encoder.head if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [384, 96, 5]


def test_dry_run_leaves_batch_norm_statistics_alone():
    encoder = ImageEncoder(tiny_config(), 5)
    assert encoder.training
    for bn in (m for m in encoder.modules() if isinstance(m, nn.BatchNorm3d)):
        assert int(bn.num_batches_tracked) == 0
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_fc_batch_norm_option():
    encoder = ImageEncoder(tiny_config(fc_batch_norm=True), 5)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in encoder.head) == 2
    assert encoder(torch.randn(2, 1, *TINY)).shape == (2, 5)


def test_bad_configs_and_inputs_are_refused():
    with pytest.raises(ValueError, match="too small"):
        ImageEncoder(tiny_config(input_shape=(7, 16, 24)), 5)
    with pytest.raises(ValueError, match="odd"):
        tiny_config(kernel_sizes=(4, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="one kernel per"):
        tiny_config(kernel_sizes=(5, 3))
    mean, basis = pca_arrays()
    with pytest.raises(ValueError, match="basis"):
        BaseDeepSSM(tiny_config(), mean, basis[:, :-3])
    model = BaseDeepSSM(tiny_config(), mean, basis)
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(2, 1, 20, 16, 25))


# -- the fixed PCA layer


def test_pca_layer_is_mean_plus_basis_and_never_trained():
    torch.manual_seed(0)
    mean, basis = pca_arrays()
    model = BaseDeepSSM(tiny_config(), mean, basis)
    fixed = {"pca_weight", "pca_bias"}
    assert fixed <= set(dict(model.named_buffers())) and fixed <= set(model.state_dict())
    assert not fixed & set(dict(model.named_parameters()))

    # zero scores give the mean shape; a unit score adds one mode
    zeros = torch.zeros(2, K)
    np.testing.assert_allclose(model.reconstruct(zeros).numpy(), np.broadcast_to(mean, (2, M, 3)), atol=1e-4)
    unit = torch.zeros(1, K)
    unit[0, 2] = 5.0
    np.testing.assert_allclose(model.reconstruct(unit)[0].numpy(), mean + 5.0 * basis[2].reshape(M, 3), atol=1e-4)
    # ...and so does the whole network when its last layer outputs zeros
    last = model.encoder.head[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    np.testing.assert_allclose(model(torch.randn(2, 1, *TINY))[1].detach().numpy(),
                               np.broadcast_to(mean, (2, M, 3)), atol=1e-4)

    torch.manual_seed(1)
    xavier_init(model)
    before = snapshot(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-5)
    assert not any(p is model.pca_weight or p is model.pca_bias
                   for group in optimizer.param_groups for p in group["params"])
    images, target = torch.randn(4, 1, *TINY), torch.from_numpy(mean).float() + torch.randn(4, M, 3)
    for _ in range(3):
        optimizer.zero_grad()
        correspondence_loss(model(images)[1], target).backward()
        optimizer.step()
    moved = changed(before, model)
    assert "encoder.head.0.weight" in moved and "encoder.features.0.weight" in moved  # it did train
    assert not moved & fixed
    assert torch.equal(model.pca_bias, torch.from_numpy(mean.reshape(-1)).float())


# -- TL-DeepSSM phases


def tl_step(model: TLDeepSSM, phase: str, seed: int = 0) -> set[str]:
    """One Adam step of a phase's loss; returns the state_dict entries that changed."""
    torch.manual_seed(seed)
    params = set_phase(model, phase)
    before = snapshot(model)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    images, points = torch.randn(3, 1, *TINY), torch.randn(3, M, 3) * 5
    latent, recon = model.autoencode(points)
    if phase == "autoencoder":
        loss = correspondence_loss(recon, points)
    elif phase == "tflank":
        loss = correspondence_loss(model.tflank(images), latent)
    else:
        loss = correspondence_loss(recon, points) + correspondence_loss(model.tflank(images), latent)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return changed(before, model)


def test_tl_phases_freeze_what_they_should():
    mean, _ = pca_arrays()
    torch.manual_seed(0)
    model = TLDeepSSM(tiny_config(), mean)
    n_ae = sum(p.numel() for m in (model.encoder, model.decoder) for p in m.parameters())
    n_tf = sum(p.numel() for p in model.t_flank.parameters())

    assert sum(p.numel() for p in set_phase(model, "autoencoder")) == n_ae
    assert sum(p.numel() for p in set_phase(model, "tflank")) == n_tf
    assert sum(p.numel() for p in set_phase(model, "joint")) == n_ae + n_tf

    def split(names):
        return ({n for n in names if n.startswith(("encoder.", "decoder."))},
                {n for n in names if n.startswith("t_flank.")})

    ae, tf = split(tl_step(model, "autoencoder"))
    assert ae and not tf
    ae, tf = split(tl_step(model, "tflank"))
    assert tf and not ae
    ae, tf = split(tl_step(model, "joint"))
    assert ae and tf
    # every autoencoder and T-flank weight moves in the joint phase
    assert {f"{side}.{i}.weight" for side in ("encoder", "decoder") for i in (0, 2)} <= ae
    assert "mean_shape" not in tl_step(model, "joint", seed=1)


def test_tl_inference_is_decoder_of_tflank_and_mean_centred():
    torch.manual_seed(0)
    mean, _ = pca_arrays()
    model = TLDeepSSM(tiny_config(), mean).eval()
    image = torch.randn(2, 1, *TINY)
    latent, points = model(image)
    assert torch.equal(latent, model.tflank(image))
    assert torch.allclose(points, model.decode(latent))
    # a zero decoder output is the mean shape
    with torch.no_grad():
        model.decoder[-1].weight.zero_()
        model.decoder[-1].bias.zero_()
        np.testing.assert_allclose(model.decode(torch.randn(2, 8)).numpy(), np.broadcast_to(mean, (2, M, 3)),
                                   atol=1e-4)


def test_tflank_predicts_whitened_codes_mapped_back_by_fixed_buffers():
    torch.manual_seed(0)
    mean, _ = pca_arrays()
    model = TLDeepSSM(tiny_config(), mean).eval()
    rng = np.random.default_rng(0)
    # codes that vary in 3 of the 8 dimensions only, along mixed (non-axis) directions
    mixing = rng.normal(size=(3, 8))
    codes = 5.0 + rng.normal(scale=[10.0, 3.0, 1.0], size=(200, 3)) @ mixing
    model.whiten_latent(codes)
    shift, transform = model.latent_shift.numpy(), model.latent_transform.numpy().astype(np.float64)
    np.testing.assert_allclose(shift, codes.mean(0), rtol=1e-5)
    # unit-variance, uncorrelated outputs u map to codes with the training codes' covariance
    np.testing.assert_allclose(transform.T @ transform, np.cov(codes, rowvar=False), atol=1e-3)
    # every output lands in the span of the codes: the 5 unused directions are scaled to 0
    assert np.linalg.matrix_rank(transform, tol=1e-3) == 3
    u = rng.normal(size=(50, 8))
    residual = (u @ transform) - np.linalg.lstsq(mixing.T, (u @ transform).T, rcond=None)[0].T @ mixing
    assert np.abs(residual).max() < 1e-3
    image = torch.randn(2, 1, *TINY)
    with torch.no_grad():
        expected = model.t_flank(image) @ model.latent_transform + model.latent_shift
        assert torch.allclose(model.tflank(image), expected)
    # buffers: in the state dict, never trained in any phase
    assert {"latent_shift", "latent_transform"} <= set(model.state_dict())
    assert all(p is not model.latent_transform for p in set_phase(model, "joint"))
    with pytest.raises(ValueError, match="codes must be"):
        model.whiten_latent(codes[:, :3])


# -- losses


def focal_by_hand(pred, target, a, c, per_point):
    diff = np.asarray(pred, np.float64) - np.asarray(target, np.float64)
    l = np.sqrt((diff ** 2).sum(-1)) if per_point else np.abs(diff)
    return float(np.mean(l ** 2 / (1.0 + np.exp(a * (c - l)))))


def test_focal_loss_matches_eq7_on_points():
    target = torch.zeros(2, 3, 3, dtype=torch.float64)
    pred = torch.tensor([[[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                         [[0.0, 1.2, 0.0], [2.0, 2.0, 1.0], [0.3, 0.0, 0.4]]], dtype=torch.float64)
    # l per point: 5, 1, 0, 1.2, 3, 0.5
    a, c = 10.0, 1.5
    value = focal_loss(pred, target, a, c).item()
    assert value == pytest.approx(focal_by_hand(pred, target, a, c, True), rel=1e-12)
    l = np.array([5.0, 1.0, 0.0, 1.2, 3.0, 0.5])
    assert value == pytest.approx(np.mean(l ** 2 / (1 + np.exp(a * (c - l)))), rel=1e-12)


def test_focal_loss_matches_eq7_on_latents():
    rng = np.random.default_rng(3)
    pred, target = rng.normal(0, 10, (4, 7)), rng.normal(0, 10, (4, 7))
    value = focal_loss(torch.from_numpy(pred), torch.from_numpy(target), 1.0, 8.0).item()
    assert value == pytest.approx(focal_by_hand(pred, target, 1.0, 8.0, False), rel=1e-12)


def test_focal_loss_a_and_c_are_not_interchangeable():
    # the reference code swapped a and c in one path; a swap must show
    rng = np.random.default_rng(4)
    pred, target = torch.from_numpy(rng.normal(0, 2, (3, 10, 3))), torch.zeros(3, 10, 3, dtype=torch.float64)
    right = focal_loss(pred, target, a=10.0, c=1.5).item()
    assert right == pytest.approx(focal_by_hand(pred, target, 10.0, 1.5, True), rel=1e-12)
    assert abs(right - focal_loss(pred, target, a=1.5, c=10.0).item()) > 0.1 * right
    # keyword names are the paper's
    assert focal_loss(pred, target, c=1.5, a=10.0).item() == right


def test_focal_loss_limits():
    target = torch.zeros(1, 4, 3, dtype=torch.float64)
    far = torch.zeros(1, 4, 3, dtype=torch.float64)
    far[..., 0] = torch.tensor([20.0, 30.0, 40.0, 50.0])
    # l >> c: weight -> 1, the loss is eq. 2's mean l^2
    expected = correspondence_loss(far, target).item()
    assert focal_loss(far, target, 10.0, 1.5).item() == pytest.approx(expected, rel=1e-12)
    # l << c: each l^2 damped by at least exp(-a (c - l)), here exp(-10) (largest l is 0.5)
    near = far / 100.0
    assert focal_loss(near, target, 10.0, 1.5).item() < np.exp(-10.0) * correspondence_loss(near, target).item()
    at_c = torch.zeros(1, 1, 3, dtype=torch.float64)
    at_c[..., 2] = 1.5
    assert focal_loss(at_c, torch.zeros_like(at_c), 10.0, 1.5).item() == pytest.approx(0.5 * 1.5 ** 2)
    # finite and differentiable even where exp(a (c - l)) overflows float32
    pred = torch.zeros(1, 2, 3, requires_grad=True)
    loss = focal_loss(pred, torch.zeros(1, 2, 3), a=100.0, c=10.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_correspondence_loss_is_eq2():
    rng = np.random.default_rng(5)
    pred, target = rng.normal(size=(3, 11, 3)), rng.normal(size=(3, 11, 3))
    expected = np.mean([[np.sum((pred[b, i] - target[b, i]) ** 2) for i in range(11)] for b in range(3)])
    assert correspondence_loss(torch.from_numpy(pred), torch.from_numpy(target)).item() == pytest.approx(expected)
    with pytest.raises(ValueError):
        correspondence_loss(torch.zeros(2, 5, 3), torch.zeros(2, 5, 2))


def test_focal_thresholds_match_brute_force():
    rng = np.random.default_rng(6)
    shapes = rng.normal(0, 1, (9, 25, 3)) * rng.uniform(0.1, 3, (1, 25, 1)) + 50
    mean = [[sum(shapes[i, j, d] for i in range(9)) / 9 for d in range(3)] for j in range(25)]
    distances = sorted(np.sqrt(sum((shapes[i, j, d] - mean[j][d]) ** 2 for d in range(3)))
                       for i in range(9) for j in range(25))
    # numpy's default ("linear") percentile: interpolate at rank q/100 * (n - 1)
    rank = 0.9 * (len(distances) - 1)
    lo = int(np.floor(rank))
    expected = distances[lo] + (rank - lo) * (distances[lo + 1] - distances[lo])
    assert focal_threshold(shapes) == pytest.approx(expected, rel=1e-12)
    assert focal_threshold(shapes, 50) == pytest.approx(np.median(distances), rel=1e-12)
    with pytest.raises(ValueError, match=r"shapes must be \(N, M, 3\), got \(9, 25, 2\)"):
        focal_threshold(shapes[:, :, :2])
    # read in chunks of rows, from a subset of rows: the same as on that subset's array
    rows = [7, 1, 2, 4, 0]
    assert focal_threshold(shapes, 75, rows=rows, chunk=2) == pytest.approx(focal_threshold(shapes[rows], 75),
                                                                           rel=1e-12)

    latents = rng.normal(0, 10, (12, 5))
    deviations = sorted(abs(latents[i, d] - latents[:, d].mean()) for i in range(12) for d in range(5))
    rank = 0.9 * (len(deviations) - 1)
    lo = int(np.floor(rank))
    expected = deviations[lo] + (rank - lo) * (deviations[lo + 1] - deviations[lo])
    assert latent_focal_threshold(latents) == pytest.approx(expected, rel=1e-12)


# -- initialization and saving


def test_xavier_init_bounds_and_zero_biases():
    torch.manual_seed(0)
    mean, basis = pca_arrays()
    for model in (BaseDeepSSM(tiny_config(), mean, basis), TLDeepSSM(tiny_config(), mean)):
        for module in model.modules():
            # nn.Linear and nn.Conv3d start with nonzero biases; zeros prove the init ran
            for param in module.parameters(recurse=False):
                with torch.no_grad():
                    param.add_(1.0)
        fixed = {n: b.clone() for n, b in model.named_buffers() if n in ("pca_weight", "pca_bias", "mean_shape")}
        assert fixed
        xavier_init(model)
        layers = [m for m in model.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
        assert len(layers) >= 8
        for layer in layers:
            fan_in = layer.weight.shape[1] * layer.weight[0, 0].numel()
            fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel()
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            w = layer.weight.detach()
            assert w.abs().max().item() <= bound
            assert w.abs().max().item() > 0.5 * bound  # really uniform on the bound, not shrunk
            if layer.bias is not None:
                assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        for name, value in fixed.items():
            assert torch.equal(dict(model.named_buffers())[name], value)


@pytest.mark.parametrize("kind", ["base", "tl"])
def test_state_dict_round_trip(kind, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    mean, basis = pca_arrays()
    model = network(kind, cfg, mean, basis)
    # one training step so batch-norm statistics and PReLU slopes are not at their defaults
    model(torch.randn(3, 1, *TINY))[1].square().mean().backward()
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    model.eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)

    # a differently seeded copy, loaded with the safe loader
    torch.manual_seed(123)
    other = network(kind, cfg, np.zeros_like(mean), np.zeros_like(basis)).eval()
    image = torch.randn(2, 1, *TINY)
    assert not torch.equal(other(image)[1], model(image)[1])
    other.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        for mine, theirs in zip(model(image), other(image)):
            assert torch.equal(mine, theirs)
