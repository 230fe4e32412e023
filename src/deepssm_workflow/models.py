"""The DeepSSM networks and losses (Bhalodia et al., MedIA 2024, sec. 3.2, 3.3, app. A).

Images are (B, 1, Z, Y, X) tensors (a (B, Z, Y, X) batch gets its channel axis added);
shapes are (B, M, 3) world-frame correspondences, flattened point by point
(x0, y0, z0, x1, ...) exactly as `ShapeSpace` flattens them.

* `ImageEncoder`: the paper's CNN. Five conv3d layers (12, 24, 48, 96, 192 channels),
  each followed by batch norm and PReLU, max-pool by 2 after the 1st, 3rd and 5th;
  FC 384 -> 96 -> out_dim. Kernels are 5 for the first conv and 3 after it, all
  "same"-padded: the sizes then halve exactly as Fig. 13's (1), (1/2), (1/4) factors
  say, any image of at least 8 voxels per axis works (the reference code's unpadded
  5^3 kernels lose 4 voxels per conv and fail on the femur's 46-voxel axis), and two
  stacked 3^3 convs see as far as one 5^3 conv at ~1/4.6 of its weights and FLOPs.
  `ModelConfig.kernel_sizes = (5, 5, 5, 5, 5)` gives the reference's kernel size back.
* `BaseDeepSSM`: encoder -> K PCA scores -> fixed PCA reconstruction (weight = basis^T,
  bias = mean shape). The PCA layer is made of buffers: no optimizer can ever see it,
  and state_dict still saves it.
* `TLDeepSSM`: correspondence autoencoder (g: 3M -> hidden -> latent,
  h: latent -> hidden -> 3M, leaky ReLU) plus a T-flank image encoder predicting
  the latent; inference is h(f(image)). `set_phase` freezes what each of the
  paper's three training phases must not change.
* `focal_loss` (eq. 7), `correspondence_loss` (eq. 2), and the heuristics for the
  focal threshold c (sec. 3.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("base", "base_focal", "tl", "tl_focal")
PHASES = ("autoencoder", "tflank", "joint")


@dataclass(frozen=True)
class ModelConfig:
    input_shape: tuple[int, int, int]      # (Z, Y, X) voxels of the preprocessed images
    n_points: int                          # M correspondences per shape
    n_modes: int = 20                      # K PCA scores (Base-DeepSSM)
    latent_dim: int = 64                   # TL-DeepSSM bottleneck (paper: 64)
    channels: tuple[int, ...] = (12, 24, 48, 96, 192)
    kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 3)  # odd, "same" padding
    pool_after: tuple[int, ...] = (0, 2, 4)           # conv indices followed by max-pool 2
    fc_sizes: tuple[int, ...] = (384, 96)
    fc_batch_norm: bool = False            # the authors' code has none; BatchNorm1d breaks on a batch of 1
    ae_hidden: int = 256                   # autoencoder hidden width, each side
    leaky_slope: float = 0.01              # autoencoder LeakyReLU

    def __post_init__(self):
        # tuples even when read from YAML/JSON lists, so the config stays hashable and comparable
        for name in ("input_shape", "channels", "kernel_sizes", "pool_after", "fc_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        problems = []
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            problems.append(f"input_shape must be three positive sizes (Z, Y, X), got {self.input_shape}")
        if len(self.kernel_sizes) != len(self.channels):
            problems.append(f"kernel_sizes {self.kernel_sizes} needs one kernel per channel count {self.channels}")
        if any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            problems.append(f"kernel_sizes must be odd (for 'same' padding), got {self.kernel_sizes}")
        if any(not 0 <= i < len(self.channels) for i in self.pool_after):
            problems.append(f"pool_after {self.pool_after} names convs outside 0..{len(self.channels) - 1}")
        for name in ("n_points", "n_modes", "latent_dim", "ae_hidden"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))


class ImageEncoder(nn.Module):
    """3D image -> out_dim vector: the paper's five-conv, three-FC encoder (App. A, Fig. 13)."""

    def __init__(self, config: ModelConfig, out_dim: int):
        super().__init__()
        layers, in_ch = [], 1
        for i, (ch, k) in enumerate(zip(config.channels, config.kernel_sizes)):
            # no conv bias: the batch norm right after subtracts any per-channel offset
            layers += [nn.Conv3d(in_ch, ch, k, padding=k // 2, bias=False), nn.BatchNorm3d(ch), nn.PReLU()]
            if i in config.pool_after:
                layers.append(nn.MaxPool3d(2))
            in_ch = ch
        self.features = nn.Sequential(*layers)

        shrink = 2 ** len(config.pool_after)
        if min(config.input_shape) < shrink:
            raise ValueError(f"input_shape {config.input_shape} is too small: {len(config.pool_after)} "
                             f"max-pools need at least {shrink} voxels per axis")
        # dry run in eval mode, so the batch-norm running statistics stay untouched
        self.features.eval()
        with torch.no_grad():
            self.feature_shape = tuple(self.features(torch.zeros(1, 1, *config.input_shape)).shape[1:])
        self.features.train()
        self.input_shape = config.input_shape

        fc, width = [], int(np.prod(self.feature_shape))
        for size in config.fc_sizes:
            fc.append(nn.Linear(width, size))
            if config.fc_batch_norm:
                fc.append(nn.BatchNorm1d(size))
            fc.append(nn.PReLU())
            width = size
        fc.append(nn.Linear(width, out_dim))  # linear output: scores and latents are signed, unbounded
        self.head = nn.Sequential(*fc)
        self.out_dim = out_dim

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim == 4:
            image = image.unsqueeze(1)
        if tuple(image.shape[2:]) != self.input_shape:
            raise ValueError(f"image of size {tuple(image.shape[2:])}; this encoder was built for {self.input_shape}")
        return self.head(self.features(image).flatten(1))


class BaseDeepSSM(nn.Module):
    """Image -> K PCA scores -> correspondences through the fixed PCA layer (sec. 3.2).

    `basis` (K, 3M) rows are the modes, `mean` (M, 3) the mean shape, so that
    shape = mean + scores @ basis. With `ShapeSpace`'s orthonormal basis the network
    predicts raw scores; pass basis * sqrt(variances)[:, None] instead to have it
    predict whitened (unit-variance) scores.
    """

    def __init__(self, config: ModelConfig, mean: np.ndarray, basis: np.ndarray):
        super().__init__()
        mean, basis = np.asarray(mean, dtype=np.float32), np.asarray(basis, dtype=np.float32)
        m, k = config.n_points, config.n_modes
        if mean.shape != (m, 3) or basis.shape != (k, 3 * m):
            raise ValueError(f"need mean ({m}, 3) and basis ({k}, {3 * m}) for M={m}, K={k}; "
                             f"got mean {mean.shape} and basis {basis.shape}")
        self.config = config
        self.encoder = ImageEncoder(config, k)
        # buffers, not Parameters: never trained, never handed to an optimizer, still in state_dict
        self.register_buffer("pca_weight", torch.from_numpy(basis.T.copy()))      # (3M, K)
        self.register_buffer("pca_bias", torch.from_numpy(mean.reshape(-1).copy()))  # (3M,)
        xavier_init(self)

    def reconstruct(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K) scores -> (B, M, 3) correspondences: the paper's r_phi(z) = W z + b."""
        return F.linear(scores, self.pca_weight, self.pca_bias).view(len(scores), -1, 3)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.encoder(image)
        return scores, self.reconstruct(scores)


class TLDeepSSM(nn.Module):
    """Correspondence autoencoder g/h plus the image T-flank f (sec. 3.2, Fig. 13 B).

    g: 3M -> ae_hidden -> latent_dim and h: latent_dim -> ae_hidden -> 3M, two FC
    layers per side with a leaky ReLU between them and linear ends (the latent must
    match the T-flank's linear output; the points are unbounded). Points enter g
    centred on the training mean shape, and h adds it back (a fixed buffer, like the
    base model's bias): the net then models deviations of a few mm rather than
    absolute world coordinates. Without `mean` the centring is a no-op.
    """

    def __init__(self, config: ModelConfig, mean: np.ndarray | None = None):
        super().__init__()
        m, hidden, latent = config.n_points, config.ae_hidden, config.latent_dim
        mean = np.zeros((m, 3), np.float32) if mean is None else np.asarray(mean, dtype=np.float32)
        if mean.shape != (m, 3):
            raise ValueError(f"need mean ({m}, 3) for M={m}, got {mean.shape}")
        self.config = config
        self.register_buffer("mean_shape", torch.from_numpy(mean.reshape(-1).copy()))
        self.encoder = nn.Sequential(nn.Linear(3 * m, hidden), nn.LeakyReLU(config.leaky_slope),
                                     nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.LeakyReLU(config.leaky_slope),
                                     nn.Linear(hidden, 3 * m))
        self.t_flank = ImageEncoder(config, latent)
        # f predicts whitened codes; these fixed buffers map them onto the codes' principal axes
        # (set from the trained autoencoder's codes by `whiten_latent`)
        self.register_buffer("latent_shift", torch.zeros(latent))
        self.register_buffer("latent_transform", torch.eye(latent))
        xavier_init(self)

    def whiten_latent(self, codes: np.ndarray) -> None:
        """Make the T-flank predict whitened training codes g(C), (N, L): f's output u maps to
        the codes as shift + u @ transform, with shift their mean and the rows of transform
        their principal axes scaled by the standard deviation along each.

        Like the base model's fixed PCA layer with whitened scores: a freshly initialized
        linear head outputs about +-1, far from codes of tens, and f can only move along the
        directions the training codes span (an axis they do not vary along gets scale 0).
        With few training shapes the codes fill a small part of the L dimensions, and an
        unconstrained f strayed off it, where the decoder has seen nothing: on the accuracy
        test's 16 femurs (300 autoencoder epochs at lr 1e-3, 8 T-flank epochs), scaling each
        dimension alone gave a test RMSE of 1.38 mm, this 1.21 mm (mean shape 1.37 mm)."""
        codes = np.asarray(codes, dtype=np.float64)
        if codes.ndim != 2 or codes.shape[1] != self.config.latent_dim or len(codes) < 2:
            raise ValueError(f"codes must be (N >= 2, {self.config.latent_dim}), got {codes.shape}")
        variances, axes = np.linalg.eigh(np.cov(codes, rowvar=False))
        # eigh may return tiny negative variances for directions the codes do not span
        transform = (axes * np.sqrt(np.clip(variances, 0.0, None))).T
        self.latent_shift.copy_(torch.as_tensor(codes.mean(0)))
        self.latent_transform.copy_(torch.as_tensor(transform))

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        """g: (B, M, 3) -> (B, latent_dim)."""
        return self.encoder(points.reshape(len(points), -1) - self.mean_shape)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """h: (B, latent_dim) -> (B, M, 3)."""
        return (self.decoder(latent) + self.mean_shape).view(len(latent), -1, 3)

    def autoencode(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent g(C), reconstruction h(g(C))), for L_auto and as the T-flank's target."""
        latent = self.encode(points)
        return latent, self.decode(latent)

    def tflank(self, image: torch.Tensor) -> torch.Tensor:
        """f: image -> (B, latent_dim)."""
        return self.t_flank(image) @ self.latent_transform + self.latent_shift

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference from the image alone: (f(I), h(f(I)))."""
        latent = self.tflank(image)
        return latent, self.decode(latent)

    def set_phase(self, phase: str) -> list[nn.Parameter]:
        """Freeze for one training phase and return the parameters it trains.

        autoencoder: g and h (L_auto); tflank: f only, g and h frozen (L_tf); joint: all.
        """
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
        train_ae, train_tf = phase in ("autoencoder", "joint"), phase in ("tflank", "joint")
        for module, on in ((self.encoder, train_ae), (self.decoder, train_ae), (self.t_flank, train_tf)):
            module.requires_grad_(on)
        return [p for p in self.parameters() if p.requires_grad]


# -- losses and their thresholds


def _focal_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The l of eq. 7: per point for (B, M, 3) shapes, per dimension for (B, L) latents."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.ndim == 3 and pred.shape[-1] == 3:
        return (pred - target).norm(dim=-1)
    if pred.ndim == 2:
        return (pred - target).abs()
    raise ValueError(f"expected (B, M, 3) correspondences or (B, L) latents, got {tuple(pred.shape)}")


def focal_loss(pred: torch.Tensor, target: torch.Tensor, a: float, c: float) -> torch.Tensor:
    """Eq. 7, l^2 / (1 + exp(a (c - l))), averaged over points (or latent dims) and batch.

    a scales (paper: 10 on points, 1 on latents), c is the threshold below which errors
    are damped; for l >> c the weight tends to 1 and the loss to eq. 2's l^2. Points:
    l = ||x - x_hat|| over the three coordinates (eqs. 8, 9). Latents (eq. 11 applies it
    "similarly"): l = |z_d - z_hat_d| per dimension, so the damping acts on each latent
    coordinate like on each point, and `latent_focal_threshold` measures c the same way.
    """
    l = _focal_distance(pred, target)
    # 1 / (1 + exp(t)) = sigmoid(-t), without overflow for large a (c - l)
    return (l.square() * torch.sigmoid(a * (l - c))).mean()


def correspondence_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 2: squared point-to-point distance, averaged over points and batch.

    On (B, L) latents: the squared error per dimension, averaged (the focal loss's l >> c limit).
    """
    return _focal_distance(pred, target).square().mean()


def focal_threshold(shapes, percentile: float = 90.0, rows=None, chunk: int = 256) -> float:
    """c for points (sec. 3.3): the percentile of ||C_ij - mu_j|| over all training shapes i, points j.

    `shapes` is an (N, M, 3) array or a row store with a `shape` (train.NpyRows, StackedRows);
    `rows` picks the training shapes (default: all). Shapes are read `chunk` at a time, so memory
    holds the distances (N * M floats), never the shapes themselves."""
    if len(shapes.shape) != 3 or shapes.shape[2] != 3:
        raise ValueError(f"shapes must be (N, M, 3), got {tuple(shapes.shape)}")
    rows = np.arange(len(shapes)) if rows is None else np.asarray(rows, dtype=np.int64)
    chunks = [rows[start:start + chunk] for start in range(0, len(rows), chunk)]
    mean = sum(np.asarray(shapes[c], dtype=np.float64).sum(0) for c in chunks) / len(rows)
    distances = np.concatenate([np.linalg.norm(np.asarray(shapes[c], dtype=np.float64) - mean, axis=2).ravel()
                                for c in chunks])
    return float(np.percentile(distances, percentile))


def latent_focal_threshold(latents: np.ndarray, percentile: float = 90.0) -> float:
    """c for latents (sec. 3.3): the percentile of |S_id - mean_d| over training codes i, dims d.

    Per dimension, like the latent focal loss's l (see `focal_loss`); `latents` are the
    trained autoencoder's codes g(C) of the training shapes, (N, L).
    """
    latents = np.asarray(latents, dtype=np.float64)
    if latents.ndim != 2:
        raise ValueError(f"latents must be (N, L), got {latents.shape}")
    return float(np.percentile(np.abs(latents - latents.mean(0)), percentile))


# -- initialization and construction


def xavier_init(module: nn.Module) -> nn.Module:
    """Xavier-uniform weights and zero biases for every conv and linear layer (App. A.2).

    Buffers (the fixed PCA layer, the mean shape) are not layers and stay as they are;
    batch norm and PReLU keep PyTorch's defaults.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv3d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def build_model(variant: str, config: ModelConfig, mean: np.ndarray, basis: np.ndarray | None = None) -> nn.Module:
    """The network of a variant; the focal variants differ only in their loss."""
    if variant in ("base", "base_focal"):
        if basis is None:
            raise ValueError(f"variant {variant!r} needs the PCA basis")
        return BaseDeepSSM(config, mean, basis)
    if variant in ("tl", "tl_focal"):
        return TLDeepSSM(config, mean)
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
