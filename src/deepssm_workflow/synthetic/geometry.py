"""Geometry used to build synthetic anatomies.

Every anatomy is an implicit template (a smooth union of signed-distance
primitives) meshed once, plus a smooth deformation phi(x; params) of 3D space.
Subjects are phi applied to the template mesh vertices. Correspondence points are
a fixed subset of template vertices, so point i is the same anatomical spot in
every subject by construction and lies exactly on the subject's mesh.

All functions work on (N, 3) float arrays in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyvista as pv

SDF = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------
# Signed-distance primitives (negative inside). Ellipsoid and superellipsoid are
# first-order approximations; exact distances are not needed because only the
# zero level set is meshed.


def sphere(center, radius) -> SDF:
    c = np.asarray(center, float)
    return lambda x: np.linalg.norm(x - c, axis=-1) - radius


def ellipsoid(center, radii) -> SDF:
    c, r = np.asarray(center, float), np.asarray(radii, float)

    def f(x):
        k = np.linalg.norm((x - c) / r, axis=-1)
        return (k - 1.0) * r.min()

    return f


def superellipsoid(center, radii, exponent: float) -> SDF:
    """|x/a|^p + |y/b|^p + |z/c|^p = 1; p > 2 gives a boxier shape."""
    c, r = np.asarray(center, float), np.asarray(radii, float)

    def f(x):
        k = np.sum(np.abs((x - c) / r) ** exponent, axis=-1) ** (1.0 / exponent)
        return (k - 1.0) * r.min()

    return f


def round_cone(a, b, radius_a: float, radius_b: float) -> SDF:
    """Capsule from a to b whose radius changes linearly from radius_a to radius_b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    axis = b - a
    length2 = axis @ axis

    def f(x):
        t = np.clip(((x - a) @ axis) / length2, 0.0, 1.0)
        closest = a + t[..., None] * axis
        return np.linalg.norm(x - closest, axis=-1) - (radius_a + t * (radius_b - radius_a))

    return f


def capped_cylinder(bottom, top, radius: float) -> SDF:
    """Cylinder with flat ends (a cut bone shaft, a truncated vessel)."""
    a, b = np.asarray(bottom, float), np.asarray(top, float)
    axis = b - a
    length = np.linalg.norm(axis)
    axis = axis / length
    mid = 0.5 * (a + b)

    def f(x):
        rel = x - mid
        along = rel @ axis
        radial = np.linalg.norm(rel - along[..., None] * axis, axis=-1)
        dr, da = radial - radius, np.abs(along) - 0.5 * length
        outside = np.linalg.norm(np.stack([np.maximum(dr, 0), np.maximum(da, 0)]), axis=0)
        return outside + np.minimum(np.maximum(dr, da), 0.0)

    return f


def smooth_union(*sdfs: SDF, k: float) -> SDF:
    """Polynomial smooth minimum: fillets of size ~k where primitives meet."""

    def f(x):
        d = sdfs[0](x)
        for g in sdfs[1:]:
            e = g(x)
            h = np.clip(0.5 + 0.5 * (e - d) / k, 0.0, 1.0)
            d = e * (1 - h) + d * h - k * h * (1 - h)
        return d

    return f


def smooth_intersection(a: SDF, b: SDF, k: float) -> SDF:
    def f(x):
        d, e = a(x), b(x)
        h = np.clip(0.5 - 0.5 * (e - d) / k, 0.0, 1.0)
        return e * (1 - h) + d * h + k * h * (1 - h)

    return f


# ----------------------------------------------------------------------------
# Template meshing and correspondence sampling


@dataclass
class Template:
    """A meshed template anatomy in the world frame."""

    vertices: np.ndarray  # (V, 3)
    faces: np.ndarray  # (F, 3) int
    anchors: dict[str, np.ndarray] = field(default_factory=dict)  # named template-space points

    def polydata(self, vertices: np.ndarray | None = None) -> pv.PolyData:
        return polydata(self.vertices if vertices is None else vertices, self.faces)

    def normals(self) -> np.ndarray:
        return np.asarray(self.polydata().compute_normals(point_normals=True, cell_normals=False,
                                                         auto_orient_normals=True)["Normals"])


def polydata(vertices: np.ndarray, faces: np.ndarray) -> pv.PolyData:
    cells = np.hstack([np.full((len(faces), 1), 3, dtype=np.int64), faces.astype(np.int64)])
    return pv.PolyData(np.asarray(vertices, dtype=np.float64), cells.ravel())


def mesh_sdf(sdf: SDF, lower, upper, resolution: float,
             smoothing_iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Mesh the zero level set of `sdf` inside the box [lower, upper].

    Returns (vertices, faces) of the largest connected, closed triangle surface.
    """
    lower, upper = np.asarray(lower, float), np.asarray(upper, float)
    dims = np.ceil((upper - lower) / resolution).astype(int) + 1
    grid = pv.ImageData(dimensions=dims, spacing=(resolution,) * 3, origin=lower)
    values = sdf(np.asarray(grid.points))
    if values.min() >= 0 or values.max() <= 0:
        raise ValueError("template SDF has no zero crossing inside its bounds")
    grid.point_data["sdf"] = values
    surface = grid.contour([0.0], scalars="sdf", method="flying_edges")
    surface = surface.extract_largest().clean().triangulate().extract_surface(algorithm=None)
    if smoothing_iterations:
        # windowed-sinc smoothing removes marching-cubes terracing without shrinking
        surface = surface.smooth_taubin(n_iter=smoothing_iterations, pass_band=0.1)
    if surface.n_open_edges:
        raise ValueError("template surface is not closed; enlarge its bounds")
    faces = np.asarray(surface.regular_faces)
    return np.asarray(surface.points, dtype=np.float64), faces


# ----------------------------------------------------------------------------
# Deformation building blocks


def smoothstep(x, edge0: float, edge1: float):
    """C1 ramp from 0 at edge0 to 1 at edge1 (edge0 > edge1 gives a falling ramp)."""
    t = np.clip((np.asarray(x, float) - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def rotation_matrix(axis, angle_rad: float) -> np.ndarray:
    """Rodrigues rotation about a unit axis."""
    axis = np.asarray(axis, float)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def random_rotation(rng: np.random.Generator, max_angle_deg: float) -> np.ndarray:
    """Rotation about a uniformly random axis by an angle uniform in [0, max]."""
    axis = rng.normal(size=3)
    angle = np.deg2rad(rng.uniform(0.0, max_angle_deg))
    return rotation_matrix(axis, angle)


def blend_rotation(x: np.ndarray, weight: np.ndarray, rotation: np.ndarray, pivot) -> np.ndarray:
    """Move x towards its rotation about `pivot`, by `weight` in [0, 1] (linear blend skinning)."""
    pivot = np.asarray(pivot, float)
    rotated = (x - pivot) @ rotation.T + pivot
    return x + weight[:, None] * (rotated - x)


def gaussian_bump(x: np.ndarray, center, direction, amplitude: float, width: float) -> np.ndarray:
    """Displacement of `amplitude` mm along `direction`, Gaussian in distance to `center`."""
    r2 = np.sum((x - np.asarray(center, float)) ** 2, axis=1)
    return amplitude * np.exp(-r2 / (2 * width**2))[:, None] * np.asarray(direction, float)


def rbf_displacement(x: np.ndarray, centers: np.ndarray, coefficients: np.ndarray, width: float) -> np.ndarray:
    """Smooth random field: sum of Gaussian RBFs with vector coefficients (K, 3)."""
    r2 = np.sum((x[:, None, :] - centers[None, :, :]) ** 2, axis=2)
    return np.exp(-r2 / (2 * width**2)) @ coefficients


def softplus(x, sharpness: float):
    """Smooth max(x, 0); `sharpness` is the width (mm) of the rounded corner."""
    x = np.asarray(x, float) / sharpness
    return sharpness * np.logaddexp(0.0, x)


def orthogonal_unit(vector, towards) -> np.ndarray:
    """Unit vector along the part of `towards` orthogonal to `vector`."""
    v = np.asarray(vector, float) / np.linalg.norm(vector)
    t = np.asarray(towards, float)
    t = t - (t @ v) * v
    return t / np.linalg.norm(t)
