"""Differentiable landmark-driven image warp and match losses of the self-supervised
landmarks method (Bhalodia et al., MedIA 2021; METHODS.md section 4), in torch.

A network places M landmarks on a source and a target image (plus the 8 fixed grid
corners, `append_corners`). A thin-plate spline through them maps the target grid onto
the source (`fit_spline(target_landmarks, source_landmarks)`), the source image is
sampled there (`warp`, a backward warp) and compared with the target (`match_loss`);
the training loss adds lambda times `condition_number(spline.system)`. Everything is
batched over image pairs and differentiable with respect to the landmarks; devices and
dtypes follow the inputs.

Design:
- The spline is tps.py's, so both agree on the same inputs: kernel U(r) = r (the 3D
  biharmonic kernel) plus an affine part, control points centred on their mean, system
  [[U - reg*I, 1, C], [1^T, 0, 0], [C^T, 0, 0]], solved by a batched
  `torch.linalg.solve`. The system is kept without the regularization, since the
  condition number penalises the landmarks' configuration, not the warm-up smoothing.
- |x - c| has a cone at x = c, where autograd's sqrt backward gives 0/0 = NaN (a
  landmark on a voxel centre, or a control in its own system). Distances are taken from
  exact differences (no |x|^2 - 2xc + |c|^2 cancellation, so the spline interpolates its
  controls exactly) and their gradient at 0 is set to 0, a subgradient of the cone.
- A dense grid is B x voxels x K distances: autograd would keep several such tensors per
  warp. The kernel sum is therefore one autograd function that works in chunks of points
  and recomputes the distances in its backward, so memory stays at one chunk.
- `warp(step=s)` evaluates the spline exactly on every s-th voxel (a lattice reaching one
  knot past the far end when a size is not a multiple of s) and trilinearly upsamples
  the mapped positions in between, as `tps.ThinPlateSpline.on_grid` does: ~s^3 times
  fewer kernel sums for a small position error, largest next to a control point.
- Coordinates: landmarks are millimetres in the image grid's own frame, x, y, z order,
  0 at the centre of the first voxel; images are (B, C, Z, Y, X); spacing is x, y, z.
  grid_sample runs with align_corners=True, so -1 and +1 are the first and last voxel
  centres, and with border padding, so points mapped outside take the edge value.
- Losses return one value per pair (B,). An optional mask (the localised variant) weights
  the voxels; for the patch-based losses (ncc, mind) the images are also multiplied by
  the mask first (the paper's m * I), so voxels where the mask is 0 cannot enter through
  a neighbourhood.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 22  # batch x points x controls x 3 per chunk of the kernel sum: 16 MiB of float32


def corner_anchors(size_zyx: Sequence[int], spacing_xyz: Sequence[float], *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """The 8 corners (voxel centres) of a (Z, Y, X) grid in mm, x, y, z order, shape (8, 3); x varies fastest."""
    size = [int(n) for n in size_zyx]
    if len(size) != 3 or min(size) < 2:
        raise ValueError(f"expected a (Z, Y, X) size of at least 2 voxels per axis, got {tuple(size_zyx)}")
    extent = [(size[2 - axis] - 1) * float(spacing_xyz[axis]) for axis in range(3)]  # x, y, z
    corners = [[x, y, z] for z in (0.0, extent[2]) for y in (0.0, extent[1]) for x in (0.0, extent[0])]
    return torch.tensor(corners, dtype=dtype or torch.get_default_dtype(), device=device)


def append_corners(landmarks: torch.Tensor, size_zyx: Sequence[int], spacing_xyz: Sequence[float]) -> torch.Tensor:
    """(B, M, 3) landmarks followed by the grid's 8 fixed corner anchors: (B, M + 8, 3)."""
    anchors = corner_anchors(size_zyx, spacing_xyz, dtype=landmarks.dtype, device=landmarks.device)
    return torch.cat([landmarks, anchors.expand(landmarks.shape[0], 8, 3)], 1)


def _distances(points: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
    """|p - c| for (B, P, 3) and (B, K, 3): (B, P, K), from exact differences, with gradient 0 at 0."""
    squared = (points[:, :, None] - controls[:, None]).square().sum(-1)
    positive = squared > 0
    # the inner where keeps sqrt's backward away from 0 (0 * inf = NaN would leak through the outer where)
    return torch.where(positive, torch.where(positive, squared, 1.0).sqrt(), 0.0)


def _chunk_ranges(points: torch.Tensor, controls: torch.Tensor):
    size = max(1, CHUNK_ELEMENTS // (3 * points.shape[0] * controls.shape[1]))
    for start in range(0, points.shape[1], size):
        yield start, min(start + size, points.shape[1])


class _KernelSum(torch.autograd.Function):
    """sum_k |p - c_k| w_k for (B, P, 3) points, (B, K, 3) controls and (B, K, 3) weights.

    Forward and backward go over chunks of points and the backward recomputes the
    distances, so no (B, P, K) tensor outlives a chunk."""

    @staticmethod
    def forward(ctx, points, controls, weights):
        ctx.save_for_backward(points, controls, weights)
        out = weights.new_empty(points.shape[0], points.shape[1], 3)
        for start, stop in _chunk_ranges(points, controls):
            out[:, start:stop] = _distances(points[:, start:stop], controls) @ weights
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        points, controls, weights = ctx.saved_tensors
        need_points, need_controls, need_weights = ctx.needs_input_grad
        grad_points = points.new_zeros(points.shape) if need_points else None
        grad_controls = torch.zeros_like(controls) if need_controls else None
        grad_weights = torch.zeros_like(weights) if need_weights else None
        for start, stop in _chunk_ranges(points, controls):
            diff = points[:, start:stop, None] - controls[:, None]  # (B, c, K, 3)
            distance = diff.square().sum(-1).sqrt()
            chunk_grad = grad[:, start:stop]
            if need_weights:
                grad_weights += distance.transpose(1, 2) @ chunk_grad
            if need_points or need_controls:
                # d|p - c|/dp = (p - c)/|p - c|, taken as 0 at the cone's tip
                positive = distance > 0
                along = chunk_grad @ weights.transpose(1, 2)  # (B, c, K)
                scale = torch.where(positive, along / torch.where(positive, distance, 1.0), 0.0)
                pull = scale[..., None] * diff
                if need_points:
                    grad_points[:, start:stop] = pull.sum(2)
                if need_controls:
                    grad_controls -= pull.sum(1)
        return grad_points, grad_controls, grad_weights


@dataclass(frozen=True)
class Spline:
    """A batch of solved 3D thin-plate splines (tps.ThinPlateSpline's formulation):
    f(x) = offset + (x - center) @ linear + sum_k weights_k |x - center - controls_k|."""

    center: torch.Tensor  # (B, 1, 3) mean of the control points
    controls: torch.Tensor  # (B, K, 3) centred control points
    weights: torch.Tensor  # (B, K, 3) kernel weights
    offset: torch.Tensor  # (B, 3)
    linear: torch.Tensor  # (B, 3, 3)
    system: torch.Tensor  # (B, K + 4, K + 4) without regularization

    @property
    def batch(self) -> int:
        return self.weights.shape[0]


def fit_spline(control: torch.Tensor, values: torch.Tensor, regularization: float = 0.0) -> Spline:
    """Batched spline through (B, K, 3) `control` points onto (B, K, 3) `values`.

    For the backward warp `control` are the target landmarks and `values` the source ones.
    `regularization` >= 0 subtracts lambda from the kernel's diagonal as tps.py does (e.g. the
    paper's Tikhonov warm-up while landmarks start out random). A singular system (duplicate
    controls with no regularization, coplanar controls) makes torch.linalg.solve raise.
    """
    if control.ndim != 3 or control.shape[-1] != 3 or values.shape != control.shape:
        raise ValueError(f"expected (B, K, 3) control points and values, got {tuple(control.shape)} "
                         f"and {tuple(values.shape)}")
    if regularization < 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}")
    batch, k, _ = control.shape
    if k < 4:
        raise ValueError(f"a 3D thin-plate spline needs at least 4 control points, got {k}")
    values = values.to(control.dtype)
    center = control.mean(1, keepdim=True)  # centred coordinates keep the affine columns well scaled
    controls = control - center
    ones = control.new_ones(batch, k, 1)
    affine = torch.cat([ones, controls], 2)  # (B, K, 4)
    top = torch.cat([_distances(controls, controls), affine], 2)
    bottom = torch.cat([affine.transpose(1, 2), control.new_zeros(batch, 4, 4)], 2)
    system = torch.cat([top, bottom], 1)
    solved = system
    if regularization:
        diagonal = torch.cat([control.new_full((k,), float(regularization)), control.new_zeros(4)])
        solved = system - torch.diag(diagonal)
    rhs = torch.cat([values, values.new_zeros(batch, 4, 3)], 1)
    solution = torch.linalg.solve(solved, rhs)
    return Spline(center, controls, solution[:, :k], solution[:, k], solution[:, k + 1:], system)


def map_points(spline: Spline, points: torch.Tensor) -> torch.Tensor:
    """Map (B, P, 3) points (or (1, P, 3), shared by the batch) through the splines: (B, P, 3)."""
    if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] not in (1, spline.batch):
        raise ValueError(f"expected ({spline.batch}, P, 3) points, got {tuple(points.shape)}")
    local = points.to(spline.weights.dtype).expand(spline.batch, -1, -1) - spline.center
    return spline.offset[:, None] + local @ spline.linear + _KernelSum.apply(local, spline.controls, spline.weights)


def condition_number(system: torch.Tensor) -> torch.Tensor:
    """Frobenius condition number ||A||_F ||A^-1||_F of (B, N, N) systems: (B,), differentiable (paper eq. 7)."""
    return torch.linalg.matrix_norm(system) * torch.linalg.matrix_norm(torch.linalg.inv(system))


def _size(size_zyx: Sequence[int]) -> tuple[int, int, int]:
    size = tuple(int(n) for n in size_zyx)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"expected a (Z, Y, X) grid size, got {tuple(size_zyx)}")
    return size


def map_grid(spline: Spline, size_zyx: Sequence[int], spacing_xyz: Sequence[float], step: int = 1) -> torch.Tensor:
    """Mapped positions (mm, x, y, z) of a grid's voxel centres: (B, Z, Y, X, 3).

    With `step` > 1 the spline is evaluated on every step-th voxel along each axis and the
    positions are interpolated trilinearly in between (exact on the lattice)."""
    if int(step) != step or step < 1:
        raise ValueError(f"step must be a positive integer, got {step!r}")
    step, size = int(step), _size(size_zyx)
    knots = [-(-(n - 1) // step) + 1 for n in size]  # ceil((n - 1) / step) + 1 per axis, z, y, x
    dtype, device = spline.weights.dtype, spline.weights.device
    spacing = [float(s) for s in spacing_xyz]
    axes = [torch.arange(knots[2 - axis], dtype=dtype, device=device) * (step * spacing[axis]) for axis in range(3)]
    z, y, x = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    lattice = torch.stack([x, y, z], -1).reshape(1, -1, 3)
    mapped = map_points(spline, lattice).reshape(spline.batch, *knots, 3)
    if step == 1:
        return mapped
    fine = [step * (k - 1) + 1 for k in knots]  # with align_corners=True, output o sits at input o / step
    mapped = F.interpolate(mapped.permute(0, 4, 1, 2, 3), size=fine, mode="trilinear", align_corners=True)
    return mapped[:, :, :size[0], :size[1], :size[2]].permute(0, 2, 3, 4, 1)


def _normalized(positions: torch.Tensor, size_zyx: Sequence[int], spacing_xyz: Sequence[float]) -> torch.Tensor:
    """mm positions (x, y, z) as grid_sample coordinates for align_corners=True."""
    extent = [(size_zyx[2 - axis] - 1) * float(spacing_xyz[axis]) for axis in range(3)]
    # a 1-voxel axis has no extent; grid_sample reads its only voxel whatever the coordinate
    scale = torch.tensor([2.0 / e if e > 0 else 0.0 for e in extent], dtype=positions.dtype, device=positions.device)
    return positions * scale - 1.0


def warp(source_images: torch.Tensor, spline: Spline, spacing_xyz: Sequence[float], step: int = 2,
         mode: str = "bilinear") -> torch.Tensor:
    """Backward warp of (B, C, Z, Y, X) source images onto the target grid: each target voxel
    centre is mapped by the spline (target -> source) and the source sampled there
    (trilinear for mode "bilinear", grid_sample's name in 3D; border padding). Warping
    segmentations or distance transforms with the same spline is another call."""
    if source_images.ndim != 5 or source_images.shape[0] != spline.batch:
        raise ValueError(f"expected ({spline.batch}, C, Z, Y, X) images, got {tuple(source_images.shape)}")
    size = tuple(source_images.shape[2:])
    grid = _normalized(map_grid(spline, size, spacing_xyz, step), size, spacing_xyz).to(source_images.dtype)
    return F.grid_sample(source_images, grid, mode=mode, padding_mode="border", align_corners=True)


def _weighted_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all but the batch axis, weighted by a (B or 1, 1, Z, Y, X) mask: (B,)."""
    if mask is None:
        return values.flatten(1).mean(1)
    weights = mask.to(values.dtype).expand_as(values)
    return (values * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(torch.finfo(values.dtype).tiny)


def _check_pair(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> None:
    if warped.ndim != 5 or warped.shape != target.shape:
        raise ValueError(f"expected two (B, C, Z, Y, X) images of one shape, got {tuple(warped.shape)} "
                         f"and {tuple(target.shape)}")
    if mask is not None and (mask.ndim != 5 or mask.shape[1] != 1 or mask.shape[2:] != warped.shape[2:]):
        raise ValueError(f"expected a (B, 1, {', '.join(map(str, warped.shape[2:]))}) mask, got {tuple(mask.shape)}")


def l2_loss(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared intensity difference per pair (mask-weighted mean with a mask): (B,)."""
    _check_pair(warped, target, mask)
    return _weighted_mean((warped - target).square(), mask)


def _box_mean(images: torch.Tensor, window: int) -> torch.Tensor:
    # count_include_pad=False: windows cut by the border average over their voxels inside
    return F.avg_pool3d(images, window, stride=1, padding=window // 2, count_include_pad=False)


def ncc_loss(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, window: int = 3,
             eps: float = 1e-5) -> torch.Tensor:
    """1 - mean local normalized cross-correlation over cubic windows of `window` voxels: (B,), 0 when identical.

    Local NCC = (cov + eps) / sqrt((var_w + eps) (var_t + eps)), eps in squared intensity
    units: with eps on the covariance as well, two flat patches count as matched (NCC 1)
    rather than unrelated (0), and NCC stays in (-1, 1]."""
    _check_pair(warped, target, mask)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of voxels, got {window}")
    if mask is not None:
        warped, target = warped * mask, target * mask
    # local statistics do not depend on a constant offset; removing the image mean avoids
    # E[I^2] - E[I]^2 cancellation for offset intensities (CT in HU)
    warped = warped - warped.mean((2, 3, 4), keepdim=True).detach()
    target = target - target.mean((2, 3, 4), keepdim=True).detach()
    mean_w, mean_t = _box_mean(warped, window), _box_mean(target, window)
    var_w = (_box_mean(warped * warped, window) - mean_w * mean_w).clamp_min(0)
    var_t = (_box_mean(target * target, window) - mean_t * mean_t).clamp_min(0)
    cov = _box_mean(warped * target, window) - mean_w * mean_t
    ncc = ((cov + eps) / torch.sqrt((var_w + eps) * (var_t + eps))).clamp(-1.0, 1.0)
    return 1.0 - _weighted_mean(ncc, mask)


# six-neighbourhood offsets (z, y, x) in opposite pairs; MIND-SSC compares the 12 pairs of
# neighbours that are not opposite (sqrt(2) apart), not the centre with each neighbour
_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_SSC_PAIRS = tuple((i, j) for i in range(6) for j in range(i + 1, 6) if i // 2 != j // 2)


def mind_ssc(images: torch.Tensor, dilation: int = 2, patch: int = 3, eps: float = 1e-8) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al. 2013) of (B, C, Z, Y, X) images: (B, 12 C, Z, Y, X).

    For each of the 12 pairs of six-neighbours at `dilation` voxels, the patch (`patch`
    voxels wide) mean squared difference D; the smallest D per voxel is subtracted and D
    divided by its mean over the 12 pairs, a local variance estimate clamped to
    [0.001, 1000] times its image mean (per sample and channel); descriptor exp(-D / V)."""
    if images.ndim != 5:
        raise ValueError(f"expected (B, C, Z, Y, X) images, got {tuple(images.shape)}")
    if dilation < 1 or patch < 1 or patch % 2 == 0:
        raise ValueError(f"need dilation >= 1 and an odd patch size, got {dilation} and {patch}")
    batch, channels, nz, ny, nx = images.shape
    padded = F.pad(images, (dilation,) * 6, mode="replicate")

    def shifted(offset):
        z, y, x = (dilation * (1 + o) for o in offset)
        return padded[:, :, z:z + nz, y:y + ny, x:x + nx]

    neighbours = [shifted(offset) for offset in _SIX]
    squared = torch.stack([(neighbours[i] - neighbours[j]).square() for i, j in _SSC_PAIRS], 2)
    distance = _box_mean(squared.flatten(1, 2), patch).unflatten(1, (channels, len(_SSC_PAIRS)))
    distance = distance - distance.amin(2, keepdim=True)
    variance = distance.mean(2, keepdim=True)
    # clamp bounds are constants (detached), as in the reference implementation; eps keeps flat images finite
    level = variance.mean((3, 4, 5), keepdim=True).detach().clamp_min(eps)
    variance = torch.clamp(variance, min=0.001 * level, max=1000.0 * level)
    return torch.exp(-distance / variance).flatten(1, 2)


def mind_loss(warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None, dilation: int = 2,
              patch: int = 3, p: int = 1) -> torch.Tensor:
    """Mean absolute (p=1, the paper's eq. 6) or squared (p=2) difference of MIND-SSC descriptors: (B,)."""
    _check_pair(warped, target, mask)
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p}")
    if mask is not None:
        warped, target = warped * mask, target * mask
    diff = mind_ssc(warped, dilation, patch) - mind_ssc(target, dilation, patch)
    per_voxel = (diff.abs() if p == 1 else diff.square()).mean(1, keepdim=True)
    return _weighted_mean(per_voxel, mask)


MATCH_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"l2": l2_loss, "ncc": ncc_loss, "mind": mind_loss}


def match_loss(name: str, warped: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               **options) -> torch.Tensor:
    """The image-match loss `name` ("l2", "ncc" or "mind") per pair: (B,); `options` go to that loss
    (ncc: window, eps; mind: dilation, patch, p)."""
    if name not in MATCH_LOSSES:
        raise ValueError(f"unknown match loss {name!r}; expected one of {sorted(MATCH_LOSSES)}")
    return MATCH_LOSSES[name](warped, target, mask, **options)
