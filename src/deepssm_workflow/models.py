"""Building blocks of the DeepSSM networks, and their losses (Bhalodia et al., MedIA 2024,
sec. 3.2, 3.3, app. A). The networks themselves live with their methods (`methods.deepssm`).

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
* `focal_loss` (eq. 7), `correspondence_loss` (eq. 2), and the heuristics for the
  focal threshold c (sec. 3.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")


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
    # bf16: the conv stack runs under bf16 autocast (GPUs, CPUs with bf16 units); the FC head, the
    # PCA layer and the decoder stay fp32, as they add world coordinates of ~100 mm that bf16's 8-bit
    # mantissa would round to ~0.3 mm
    precision: str = "fp32"

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
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
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
        self.bf16 = config.precision == "bf16"

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
        return self.encode(image)[1]

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv feature maps (B, C, z, y, x), FC output (B, out_dim)): the maps for a decoder."""
        if image.ndim == 4:
            image = image.unsqueeze(1)
        if tuple(image.shape[2:]) != self.input_shape:
            raise ValueError(f"image of size {tuple(image.shape[2:])}; this encoder was built for {self.input_shape}")
        with torch.autocast(image.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            features = self.features(image)
        features = features.float()
        return features, self.head(features.flatten(1))


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

    `shapes` is an (N, M, 3) array or a row store with a `shape` (rows.NpyRows, StackedRows);
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
