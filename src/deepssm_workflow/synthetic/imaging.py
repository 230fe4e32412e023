"""Scanner-frame image grids, voxelization and modality-like appearance helpers.

Arrays follow SimpleITK's numpy order (z, y, x); physical points are (x, y, z)
in millimetres. Grids have identity direction: the anatomy's pose lives in the
image-to-world transform, as it does for a real scan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyvista as pv
import SimpleITK as sitk
from scipy import ndimage
from scipy.special import erf
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkCommonCore import VTK_UNSIGNED_CHAR
from vtkmodules.vtkImagingStencil import vtkImageStencilToImage, vtkPolyDataToImageStencil


@dataclass(frozen=True)
class Grid:
    """An axis-aligned voxel grid in scanner coordinates."""

    origin: tuple[float, float, float]  # physical position of voxel (0, 0, 0)
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]  # voxels along x, y, z

    @property
    def shape(self) -> tuple[int, int, int]:
        """numpy array shape (z, y, x)."""
        return self.size[2], self.size[1], self.size[0]

    def physical_points(self, dtype=np.float32) -> np.ndarray:
        """(z, y, x, 3) array of voxel-centre positions (x, y, z) in mm."""
        axes = [np.asarray(self.origin[i] + self.spacing[i] * np.arange(self.size[i]), dtype) for i in range(3)]
        z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        return np.stack([x, y, z], axis=-1)

    def image(self, array: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(array)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        return img


def grid_around(points: np.ndarray, spacing, margin_lower, margin_upper) -> Grid:
    """Smallest grid containing `points` plus per-axis margins (mm) on each side."""
    spacing = np.broadcast_to(np.asarray(spacing, float), (3,))
    lower = points.min(0) - np.asarray(margin_lower, float)
    upper = points.max(0) + np.asarray(margin_upper, float)
    size = np.ceil((upper - lower) / spacing).astype(int) + 1
    return Grid(tuple(lower.tolist()), tuple(spacing.tolist()), tuple(int(s) for s in size))


def voxelize(mesh: pv.PolyData, grid: Grid) -> np.ndarray:
    """Binary (uint8) mask of voxel centres inside a closed surface, shape (z, y, x)."""
    stencil = vtkPolyDataToImageStencil()
    stencil.SetInputData(mesh)
    stencil.SetOutputOrigin(grid.origin)
    stencil.SetOutputSpacing(grid.spacing)
    stencil.SetOutputWholeExtent(0, grid.size[0] - 1, 0, grid.size[1] - 1, 0, grid.size[2] - 1)
    to_image = vtkImageStencilToImage()
    to_image.SetInputConnection(stencil.GetOutputPort())
    to_image.SetInsideValue(1)
    to_image.SetOutsideValue(0)
    to_image.SetOutputScalarType(VTK_UNSIGNED_CHAR)
    to_image.Update()
    flat = vtk_to_numpy(to_image.GetOutput().GetPointData().GetScalars())
    return flat.reshape(grid.shape).copy()


def signed_distance(mask: np.ndarray, grid: Grid) -> np.ndarray:
    """Signed distance (mm) to the mask boundary, negative inside, float32 (z, y, x).

    Maurer distances are measured between voxel centres, so the boundary sits half
    a voxel outside the last inside voxel; the shift keeps the zero level on it.
    """
    image = grid.image(mask.astype(np.uint8))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return (sitk.GetArrayFromImage(distance) - 0.5 * min(grid.spacing)).astype(np.float32)


def soft_inside(distance: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume occupancy: 1 deep inside (distance << 0), 0 outside, erf ramp of `width` mm."""
    return (0.5 * (1.0 - erf(distance / (np.sqrt(2.0) * width)))).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape, sigma_voxels) -> np.ndarray:
    """Spatially correlated Gaussian noise with unit standard deviation (texture, bias fields)."""
    white = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(white, sigma_voxels, mode="wrap")
    return field / max(float(field.std()), 1e-12)


def blur(array: np.ndarray, grid: Grid, sigma_mm: float) -> np.ndarray:
    """Scanner point-spread function: Gaussian blur with a physical width."""
    sigma = [sigma_mm / s for s in reversed(grid.spacing)]
    return ndimage.gaussian_filter(array, sigma, mode="nearest")


def write_image(array: np.ndarray, grid: Grid, path) -> None:
    sitk.WriteImage(grid.image(array), str(path), useCompression=True)
