"""3D thin-plate splines and the image warp of model-based augmentation.

An augmented sample's image is the nearest real training image warped so that its
anatomy lies at the sampled correspondences (DeepSSM paper, section 3.1). The warp is
a backward mapping: every output voxel centre is carried by the spline that maps the
sampled (target) correspondences onto the real subject's (source) ones, and the real
image is sampled there.

Speed matters (thousands of warps per dataset): the (K+4)x(K+4) system is solved once
per spline, and on an image grid the squared distances to the control points are sums
of three small per-axis tables, so one warp is a few broadcast additions, a square
root and a matrix product per chunk of voxels; no loop over voxels. The warp evaluates
the spline exactly on every `grid_step`-th voxel along each axis and interpolates the
mapped positions trilinearly in between: the spline is smooth away from its control
points, so a step of 2 costs ~1/8 of the kernel sums for a position error of a small
fraction of a voxel (see `warp_image`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial.distance import cdist
from threadpoolctl import ThreadpoolController

from .points import farthest_point_sampling

CHUNK_ELEMENTS = 1 << 19  # voxels x control points per chunk: 2 MiB of float32, cache-sized between passes
# A warp's BLAS calls (a ~260x260 solve, (chunk x K) @ (K x 3) products) are too small to
# share among threads: on a busy machine OpenBLAS's spinning threads made one solve 200x slower.
BLAS = ThreadpoolController()


def _points(points) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"expected an (N, 3) array of points, got shape {points.shape}")
    return points


def _flat(centred: np.ndarray) -> bool:
    """Whether centred points lie on a plane (or line): the affine part would be undetermined."""
    singular = np.linalg.svd(centred, compute_uv=False)
    return bool(singular[2] <= 1e-9 * max(singular[0], 1e-12))


class ThinPlateSpline:
    """3D thin-plate spline (kernel U(r) = r, the 3D biharmonic kernel, plus an affine part)
    mapping `source` control points exactly onto `target` points.

    f(x) = b + A x + sum_i w_i |x - c_i|, with sum_i w_i = 0 and sum_i w_i c_i = 0.
    `regularization` (lambda >= 0) trades exactness for smoothness: the kernel's diagonal
    becomes -lambda (the 3D biharmonic Green's function is -r/8pi, so smoothing subtracts,
    which keeps the system nonsingular for every lambda); lambda -> inf gives the
    least-squares affine fit.
    """

    def __init__(self, source, target, regularization: float = 0.0):
        source, target = _points(source), _points(target)
        if source.shape != target.shape:
            raise ValueError(f"source and target differ in shape: {source.shape} vs {target.shape}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        self.center = source.mean(0)  # centred coordinates keep the affine columns well scaled
        controls = source - self.center
        if len(source) < 4 or _flat(controls):
            raise ValueError(f"a 3D thin-plate spline needs at least 4 non-coplanar control points (got {len(source)})")
        if regularization == 0 and len(np.unique(source, axis=0)) < len(source):
            raise ValueError("duplicate control points cannot be interpolated exactly")
        k = len(source)
        system = np.zeros((k + 4, k + 4))
        system[:k, :k] = cdist(controls, controls) - regularization * np.eye(k)
        system[:k, k], system[:k, k + 1:] = 1.0, controls
        system[k, :k], system[k + 1:, :k] = 1.0, controls.T
        rhs = np.zeros((k + 4, 3))
        rhs[:k] = target
        solution = np.linalg.solve(system, rhs)
        self.controls = controls
        self.weights = solution[:k]  # (K, 3) kernel weights
        self.offset, self.linear = solution[k], solution[k + 1:]  # f(x) = offset + (x - center) @ linear + ...

    def __call__(self, points) -> np.ndarray:
        """Map (P, 3) points; float64, evaluated in chunks to bound memory."""
        points = _points(points) - self.center
        out = points @ self.linear + self.offset
        step = max(1, CHUNK_ELEMENTS // len(self.controls))
        for start in range(0, len(points), step):
            # cdist takes differences (no |x|^2 - 2xc + |c|^2 cancellation): exact at the control points
            out[start:start + step] += cdist(points[start:start + step], self.controls) @ self.weights
        return out

    def on_grid(self, origin, spacing, size, step: int = 1) -> np.ndarray:
        """Mapped world positions of the voxel centres of a grid (origin, spacing and size in
        x, y, z order, as WorldGrid), shape (Z, Y, X, 3) in x, y, z order, float32.

        Squared distances are sums of per-axis tables, so each chunk costs two broadcast
        additions, a square root and one float32 matrix product. With `step` > 1 the spline
        is evaluated exactly on every step-th voxel along each axis (a lattice reaching one
        knot past the far end where the size is not a multiple) and linearly interpolated
        along each axis in between: exact on the lattice, ~step**3 times fewer kernel sums.
        """
        if int(step) != step or step < 1:
            raise ValueError(f"step must be a positive integer, got {step!r}")
        step, size = int(step), tuple(int(s) for s in size)
        if step == 1:
            return self._on_uniform_grid(origin, spacing, size)
        knots = tuple(-(-(n - 1) // step) + 1 for n in size)  # ceil((n - 1) / step) + 1 per axis
        coarse = self._on_uniform_grid(origin, [step * s for s in spacing], knots)
        for axis, n in zip((2, 1, 0), size):  # (Z, Y, X) array axes of x, y, z
            coarse = _upsample(coarse, axis, step, n)
        return coarse

    def _on_uniform_grid(self, origin, spacing, size) -> np.ndarray:
        axes = [origin[a] + spacing[a] * np.arange(size[a]) - self.center[a] for a in range(3)]
        table = [(np.subtract.outer(axes[a], self.controls[:, a]) ** 2).astype(np.float32) for a in range(3)]
        nx, ny, nz = (int(s) for s in size)
        out = (self.offset + axes[2][:, None, None, None] * self.linear[2]
               + axes[1][None, :, None, None] * self.linear[1]
               + axes[0][None, None, :, None] * self.linear[0]).astype(np.float32).reshape(nz * ny, nx, 3)
        weights = self.weights.astype(np.float32)
        rows = max(1, CHUNK_ELEMENTS // (nx * len(self.controls)))  # (z, y) rows of nx voxels per chunk
        for start in range(0, nz * ny, rows):
            stop = min(start + rows, nz * ny)
            row = np.arange(start, stop)
            distance = (table[2][row // ny] + table[1][row % ny])[:, None, :] + table[0][None]
            np.sqrt(distance, out=distance)
            out[start:stop] += distance @ weights
        return out.reshape(nz, ny, nx, 3)


def _upsample(values: np.ndarray, axis: int, step: int, n: int) -> np.ndarray:
    """Linear interpolation along `axis` from knots every `step` samples to `n` samples."""
    values = np.moveaxis(values, axis, 0)
    out = np.empty((step * (len(values) - 1) + 1, *values.shape[1:]), dtype=values.dtype)
    out[::step] = values
    for offset in range(1, step):
        t = np.float32(offset / step)
        out[offset::step] = (1 - t) * values[:-1] + t * values[1:]
    return np.moveaxis(out[:n], 0, axis)


def control_subset(points, count: int) -> np.ndarray:
    """Indices of `count` well-spread points by farthest point sampling, in selection order
    (every prefix is itself well spread); all of them if count >= M. Deterministic: it
    starts from the point farthest from the centroid."""
    points = _points(points)
    if count >= len(points):
        return np.arange(len(points))
    return farthest_point_sampling(points, count)


def warp_image(image, origin, spacing, source_points, target_points, n_control: int,
               fill: float | None = None, grid_step: int = 2) -> np.ndarray:
    """The image of the subject whose correspondences are `source_points`, warped so that its
    anatomy lies at `target_points`.

    `image` is (Z, Y, X) on a grid with `origin` and `spacing` in x, y, z order (WorldGrid);
    the output is on the same grid. Backward mapping: each output voxel centre is carried by
    the spline mapping `n_control` target points (farthest point sampling) onto their source
    points, and the image is sampled there trilinearly. Points more than half a voxel outside the image
    get `fill` (default: the image median), as SimpleITK's linear resampling does.

    The mapping is evaluated exactly on every `grid_step`-th voxel and trilinearly in
    between (`ThinPlateSpline.on_grid`); `grid_step=1` evaluates it at every voxel. On
    femur-sized KDE samples (paper input size, 256 control points) a step of 2 moved
    sampling positions by 0.005 voxel on average, 0.11 at the 99.9th percentile and 0.5 at
    most (next to a control point, where the kernel |x - c| has its cone), for ~40 % of the
    exact warp's time; `python -m deepssm_workflow.bench` measures both.
    """
    image = np.asarray(image, dtype=np.float32)
    source, target = _points(source_points), _points(target_points)
    if source.shape != target.shape:
        raise ValueError(f"source and target points differ in shape: {source.shape} vs {target.shape}")
    if image.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) image, got shape {image.shape}")
    keep = control_subset(target, n_control)
    with BLAS.limit(limits=1, user_api="blas"):
        spline = ThinPlateSpline(target[keep], source[keep])
        where = spline.on_grid(origin, spacing, image.shape[::-1], grid_step)
    index = ((where - np.asarray(origin, np.float32)) / np.asarray(spacing, np.float32))[..., ::-1]  # z, y, x
    warped = ndimage.map_coordinates(image, np.moveaxis(index, -1, 0), order=1, mode="nearest")
    outside = ((index < -0.5) | (index > np.array(image.shape, np.float32) - 0.5)).any(-1)
    warped[outside] = float(np.median(image)) if fill is None else fill
    return warped
