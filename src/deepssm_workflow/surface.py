"""Surfaces from correspondences, and surface-to-surface distances.

Predicted correspondences are points; to compare them with a true surface (paper,
section 4) a mesh is rebuilt from them by warping a template mesh whose own
correspondences are known: a 3D thin-plate spline carries the template's points
exactly onto the predicted ones and moves every template vertex with them. The
spline reproduces affine maps exactly, so a template in another pose or size costs
nothing; only the non-affine part of the shape difference is interpolated.

The template is the training subject whose world-frame shape is nearest the mean
shape (eq. 12 RMSE), taken with its true mesh mapped into the world frame: it is a
real surface whose points are on it by construction, and of all training subjects
it needs the smallest warp to reach a typical shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from .io import apply_transform
from .shape_space import rmse
from .tps import ThinPlateSpline


def read_mesh(path, subject: str = ""):
    """A surface mesh as pyvista PolyData (triangles); a bad file is an error naming it (and its subject)."""
    import pyvista as pv

    path = Path(path)
    where = f"{path}: subject {subject}" if subject else str(path)
    if not path.is_file():
        raise ValueError(f"{where}: mesh file not found")
    try:
        mesh = pv.read(str(path))
    except Exception as error:  # pyvista raises several types for unreadable files
        raise ValueError(f"{where}: not a readable mesh ({error})") from None
    mesh = mesh.extract_surface() if not isinstance(mesh, pv.PolyData) else mesh
    if mesh.n_points == 0 or mesh.n_cells == 0:
        raise ValueError(f"{where}: mesh has no surface (no points or no cells)")
    return mesh.triangulate()


@dataclass
class TemplateMesh:
    """A mesh (world frame) and its M correspondence points (world frame), the spline's handles."""

    mesh: object  # pyvista PolyData
    handles: np.ndarray  # (M, 3)
    subject: str

    def warp(self, points: np.ndarray):
        """The template mesh carried onto `points` (M, 3, any frame): same faces, moved vertices."""
        points = np.asarray(points, dtype=np.float64)
        if points.shape != self.handles.shape:
            raise ValueError(f"expected {self.handles.shape} points to warp the template onto, got {points.shape}")
        spline = ThinPlateSpline(self.handles, points)
        warped = self.mesh.copy()
        warped.points = spline(np.asarray(self.mesh.points, dtype=np.float64))
        return warped


def template_from_training(ids, world: np.ndarray, image_to_world: np.ndarray, meshes) -> TemplateMesh:
    """The template: among training subjects with a mesh, the one nearest the mean shape;
    its mesh (scanner frame) is mapped to the world frame with its image-to-world transform."""
    meshes = list(meshes)
    available = [k for k, path in enumerate(meshes) if path]
    if not available:
        raise ValueError("no training subject has a mesh: a template mesh cannot be chosen")
    world = np.asarray(world, dtype=np.float64)
    # nearest to the mean of all training shapes, chosen among the subjects that have a mesh
    distances = rmse(world[available], np.broadcast_to(world.mean(0), world[available].shape))
    k = available[int(np.argmin(distances))]
    mesh = read_mesh(meshes[k], str(ids[k]))
    mesh.points = apply_transform(np.asarray(image_to_world[k]), np.asarray(mesh.points, dtype=np.float64))
    return TemplateMesh(mesh=mesh, handles=world[k].copy(), subject=str(ids[k]))


def distances_to_surface(points: np.ndarray, surface) -> np.ndarray:
    """Distance (mm) from each point to the nearest point of a triangle mesh (not just its vertices)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    _, closest = surface.copy().find_closest_cell(points, return_closest_point=True)  # fresh locator
    return np.linalg.norm(points - closest, axis=1)


@dataclass
class SurfaceDistance:
    """Both directions of the distance between a rebuilt mesh and the true one."""

    to_true: np.ndarray  # per vertex of the rebuilt mesh: distance to the true surface
    from_true: np.ndarray  # per vertex of the true mesh: distance to the rebuilt surface

    @property
    def mean_mm(self) -> float:
        """Symmetric mean surface distance: the average of the two directions' vertex means."""
        return float((self.to_true.mean() + self.from_true.mean()) / 2)

    @property
    def hausdorff_mm(self) -> float:
        return float(max(self.to_true.max(), self.from_true.max()))


def surface_distance(rebuilt, true) -> SurfaceDistance:
    return SurfaceDistance(to_true=distances_to_surface(rebuilt.points, true),
                           from_true=distances_to_surface(true.points, rebuilt))


def values_at_vertices(vertices: np.ndarray, points: np.ndarray, values: np.ndarray, k: int = 6) -> np.ndarray:
    """Per-point values spread onto mesh vertices by inverse-distance weighting of the k nearest
    points (a point sitting on a vertex gives that vertex its value exactly), for heatmaps."""
    points, values = np.asarray(points, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if len(points) != len(values):
        raise ValueError(f"{len(points)} points but {len(values)} values")
    k = min(k, len(points))
    distance, index = cKDTree(points).query(np.asarray(vertices, dtype=np.float64), k=k)
    distance, index = distance.reshape(len(distance), k), index.reshape(len(index), k)
    weights = 1.0 / np.maximum(distance, 1e-9) ** 2
    return (weights * values[index]).sum(1) / weights.sum(1)
