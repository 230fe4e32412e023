"""Geometry of a method that finds the anatomy in an uncropped scan itself (image2ssm): crops of a
fixed physical size sampled anywhere in a scan, in any rigid pose, and the pose chain between the
scan (local) frame and the shape model's world frame. Torch, differentiable, batched.

Conventions. A scan tensor is (B, C, Z, Y, X) with per-item `origin` and `spacing` (B, 3) in (x, y, z)
mm, identity direction (the orientation of a real scan is resampled into its grid first). A pose
(R, c) places the canonical crop, centred on `world_centre` in the world frame with the world's
axes, into the scan:

    local = c + R (world - world_centre),   world = world_centre + R^T (local - c)

so that a crop sampled at c + R q (q: the canonical crop's offsets) shows the anatomy as the
world frame does, aligned with the mean shape. A crop's voxel size is its physical size over its
voxel count, never the anatomy's bounding box: the network sees absolute size, which world
particles keep (the released code's tight box resized to a cube discarded it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .io import procrustes_fit
from .models import ImageEncoder, ModelConfig, xavier_init


def crop_offsets(size_mm, shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """(D, H, W, 3) physical offsets (x, y, z) of the voxel centres of a crop of `size_mm` (x, y, z)
    with `shape` (D, H, W) = (z, y, x) voxels, about the crop's centre."""
    size = torch.as_tensor(size_mm, dtype=dtype, device=device)
    axes = []
    for axis, n in zip(range(3), (shape[2], shape[1], shape[0])):  # x, y, z
        step = size[axis] / n
        axes.append((torch.arange(n, dtype=dtype, device=device) - 0.5 * (n - 1)) * step)
    z, y, x = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def crop_points(centre: torch.Tensor, rotation: torch.Tensor | None, offsets: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, 3) scan-frame positions c + R q of a crop's voxels; `rotation` None: axis-aligned."""
    q = offsets.unsqueeze(0)
    if rotation is not None:
        q = torch.einsum("bij,bdhwj->bdhwi", rotation, q.expand(len(centre), *offsets.shape))
    return q + centre[:, None, None, None, :]


def sample_physical(volume: torch.Tensor, origin: torch.Tensor, spacing: torch.Tensor, points: torch.Tensor,
                    mode: str = "bilinear", padding: str = "zeros") -> torch.Tensor:
    """Values of `volume` (B, C, Z, Y, X) at scan-frame `points` (B, D, H, W, 3), (B, C, D, H, W):
    trilinear (`mode` bilinear, torch's name) or nearest; outside the scan `padding` (zeros, border)."""
    size = torch.tensor([volume.shape[4], volume.shape[3], volume.shape[2]], dtype=points.dtype,
                        device=points.device)
    index = (points - origin[:, None, None, None, :]) / spacing[:, None, None, None, :]
    # align_corners=True: -1 and +1 are the centres of the first and last voxels
    grid = 2.0 * index / (size - 1).clamp(min=1) - 1.0
    return F.grid_sample(volume, grid, mode=mode, padding_mode=padding, align_corners=True)


def rotation_from_vector(vector: torch.Tensor) -> torch.Tensor:
    """(B, 3) rotation vectors (axis * angle, rad) -> (B, 3, 3) matrices (Rodrigues), smooth at 0."""
    theta2 = (vector * vector).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2 + 1e-12)
    # sin(t)/t and (1 - cos(t))/t^2 by their series near 0, where the closed forms lose precision
    small = theta2 < 1e-6
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp(min=1e-12))
    x, y, z = vector.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=vector.dtype, device=vector.device).expand_as(k)
    return eye + a[..., None] * k + b[..., None] * (k @ k)


def rotation_angle_deg(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """Angle (degrees) of the rotation between (B, 3, 3) rotations a and b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    relative = np.einsum("bji,bjk->bik", a, b)
    # atan2 of sine and cosine: arccos alone loses ~1e-3 degrees near 0, where poses are compared
    cosine = (np.trace(relative, axis1=1, axis2=2) - 1) / 2
    skew = relative - relative.transpose(0, 2, 1)
    sine = 0.5 * np.linalg.norm(np.stack([skew[:, 2, 1], skew[:, 0, 2], skew[:, 1, 0]], -1), axis=-1)
    return np.rad2deg(np.arctan2(sine, cosine))


def local_from_world(world: torch.Tensor, rotation: torch.Tensor, centre: torch.Tensor,
                     world_centre: torch.Tensor) -> torch.Tensor:
    """(B, M, 3) world-frame points -> scan frame through the pose (R, c)."""
    return torch.einsum("bij,bmj->bmi", rotation, world - world_centre) + centre[:, None, :]


def world_from_local(local: torch.Tensor, rotation: torch.Tensor, centre: torch.Tensor,
                     world_centre: torch.Tensor) -> torch.Tensor:
    """(B, M, 3) scan-frame points -> world frame: the inverse of `local_from_world`."""
    return torch.einsum("bji,bmj->bmi", rotation, local - centre[:, None, :]) + world_centre


class _TopEigenvector(torch.autograd.Function):
    """The unit eigenvector of the largest eigenvalue of symmetric (B, 4, 4) matrices, with the exact
    first-order gradient dv = (lambda I - N)^+ dN v. It is computed from the eigenvalue gaps to the top
    one only (torch's eigh backward also divides by the gaps between the other eigenvalues, which are
    zero for symmetric point sets and turn the gradient into nan), each gap kept above GAP_FLOOR times
    the spread of the eigenvalues: where the fit is truly ambiguous the gradient stays finite."""

    GAP_FLOOR = 1e-9

    @staticmethod
    def forward(ctx, matrix):
        values, vectors = torch.linalg.eigh(matrix)
        ctx.save_for_backward(values, vectors)
        return vectors[..., -1]

    @staticmethod
    def backward(ctx, grad):
        values, vectors = ctx.saved_tensors
        floor = _TopEigenvector.GAP_FLOOR * (values[..., -1:] - values[..., :1]).clamp_min(1e-30)
        gaps = (values[..., -1:] - values[..., :-1]).clamp_min(floor)  # (B, 3): to each lower eigenvalue
        others, top = vectors[..., :-1], vectors[..., -1]
        # (lambda I - N)^+ g restricted to the other eigenvectors, then the outer product with v
        solved = torch.einsum("bij,bj->bi", others, torch.einsum("bij,bi->bj", others, grad) / gaps)
        outer = solved[..., :, None] * top[..., None, :]
        return 0.5 * (outer + outer.transpose(-1, -2))


def rigid_fit(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares rigid map target ~ R source + t of each (B, M, 3) `source` onto `target`
    ((B, M, 3) or one (M, 3) for all): (R (B, 3, 3), t (B, 3)). Horn's unit-quaternion solution (1987):
    R is a proper rotation by construction (det +1, even where the best orthogonal map would reflect),
    and its gradient is finite wherever the rotation is determined: unlike an SVD's, which is infinite
    for a point set with two equal principal spreads (a round or symmetric shape). Computed in float64."""
    source = source.double()
    target = target.double().expand_as(source)
    source_centre, target_centre = source.mean(1, keepdim=True), target.mean(1, keepdim=True)
    s = (source - source_centre).transpose(1, 2) @ (target - target_centre)  # s[a, b] = sum source_a target_b
    xx, xy, xz, yx, yy, yz, zx, zy, zz = s.reshape(-1, 9).unbind(-1)
    quaternion_matrix = torch.stack([
        torch.stack([xx + yy + zz, yz - zy, zx - xz, xy - yx], -1),
        torch.stack([yz - zy, xx - yy - zz, xy + yx, zx + xz], -1),
        torch.stack([zx - xz, xy + yx, yy - xx - zz, yz + zy], -1),
        torch.stack([xy - yx, zx + xz, yz + zy, zz - xx - yy], -1),
    ], -2)
    w, x, y, z = _TopEigenvector.apply(quaternion_matrix).unbind(-1)
    rotation = torch.stack([
        torch.stack([w * w + x * x - y * y - z * z, 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), w * w - x * x + y * y - z * z, 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), w * w - x * x - y * y + z * z], -1),
    ], -2)
    shift = target_centre[:, 0] - torch.einsum("bij,bj->bi", rotation, source_centre[:, 0])
    return rotation, shift


def true_pose(local: np.ndarray, world: np.ndarray, world_centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rigid pose (R, c) of one subject from its own local and world particles (M, 3): the least-
    squares fit local ~ c + R (world - world_centre). Every cohort with a shape model has it (a
    ShapeWorks project's local and world particles), so the pose is supervised without extra labels."""
    matrix = procrustes_fit(world - world_centre, local, scaling=False)
    return matrix[:3, :3], matrix[:3, 3]


class PoseRegressor(nn.Module):
    """The spatial transformer's localisation network: a crop around the detected anatomy, in the scan's
    axes, -> the rigid pose that aligns it with the canonical frame, as a rotation R and a shift (mm)
    of the crop's centre. The last layer starts at zero, so the first pose is the identity at the
    detection; rigid by construction (the released code's 12-number affine could shear and scale)."""

    def __init__(self, config: ModelConfig, shift_scale_mm: float):
        super().__init__()
        self.encoder = xavier_init(ImageEncoder(config, 6))
        last = self.encoder.head[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.shift_scale_mm = float(shift_scale_mm)  # outputs ~1 mean shifts of this size

    def forward(self, crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(crop)
        return rotation_from_vector(out[:, :3]), out[:, 3:] * self.shift_scale_mm


def pose_loss(rotation: torch.Tensor, centre: torch.Tensor, world: torch.Tensor, local: torch.Tensor,
              world_centre: torch.Tensor) -> torch.Tensor:
    """Mean squared distance (mm^2) between a subject's true local particles and its true world particles
    placed through the pose: it weighs a rotation by how far it moves the anatomy, with no angle
    wrap-around, and it is the error the pose adds to the predicted local particles."""
    return (local_from_world(world, rotation, centre, world_centre) - local).square().sum(-1).mean()
