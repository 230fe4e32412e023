"""The interface every synthetic anatomy implements, and shared pieces.

An anatomy knows its template (in the world frame), how to draw a subject's
shape parameters, the deformation phi(x; params) those parameters define, the
subject's observed covariates, and how its modality renders a scanner-frame
image. The cohort writer (cohort.py) does everything else identically.

Where an anatomy ends (a bone's distal cut, how far the veins reach) is arbitrary
in the papers' segmentations too; an anatomy may offer such cuts as `extent`
settings (config `synthetic.extent`), so that its shapes fit a fixed network
grid. Without them every anatomy keeps its own extents.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np
import pandas as pd

from ..io import apply_transform
from ..points import farthest_point_sampling
from . import geometry
from .imaging import Grid


@dataclass
class Scan:
    """What a renderer gets for one subject."""

    grid: Grid
    mask: np.ndarray  # uint8 (z, y, x), the segmentation
    distance: np.ndarray  # signed distance to the surface, mm, negative inside
    image_to_world: np.ndarray  # 4x4
    anchors: dict[str, np.ndarray]  # the anatomy's anchors after deformation (world frame)
    params: dict[str, float]

    @cached_property
    def world_points(self) -> np.ndarray:
        """(z, y, x, 3) world-frame position of every voxel centre."""
        return apply_transform(self.image_to_world.astype(np.float32), self.grid.physical_points())


class Anatomy(ABC):
    name: ClassVar[str]
    modality: ClassVar[str]
    groups: ClassVar[tuple[str, ...]]
    # the smooth "normal variation" field: RBF count, width (mm), coefficient sd (mm)
    rbf_count: ClassVar[int] = 12
    rbf_width: ClassVar[float] = 20.0
    rbf_sd: ClassVar[float] = 1.0
    # the `extent` settings the anatomy offers: name -> what it sets (absent: the anatomy's own extent)
    extent_keys: ClassVar[dict[str, str]] = {}

    def __init__(self, mesh_resolution_mm: float, extent: dict[str, float] | None = None):
        self.mesh_resolution_mm = mesh_resolution_mm
        self.extent = {key: float(value) for key, value in (extent or {}).items()}
        unknown = sorted(set(self.extent) - set(self.extent_keys))
        if unknown:
            offered = ", ".join(f"{k} ({v})" for k, v in self.extent_keys.items()) or "none"
            raise ValueError(f"synthetic.extent.{unknown[0]}: not a setting of the {self.name}; "
                             f"its extent settings: {offered}")

    @cached_property
    def template(self) -> geometry.Template:
        return self.build_template(self.mesh_resolution_mm)

    @cached_property
    def rbf_centers(self) -> np.ndarray:
        verts = self.template.vertices
        return verts[farthest_point_sampling(verts, self.rbf_count)]

    def sample_rbf(self, rng: np.random.Generator) -> dict[str, float]:
        coeffs = rng.normal(0.0, self.rbf_sd, size=(self.rbf_count, 3))
        return {f"rbf_{k}_{axis}": float(coeffs[k, i]) for k in range(self.rbf_count) for i, axis in enumerate("xyz")}

    def rbf_field(self, x: np.ndarray, params: dict[str, float]) -> np.ndarray:
        coeffs = np.array([[params[f"rbf_{k}_{axis}"] for axis in "xyz"] for k in range(self.rbf_count)])
        return geometry.rbf_displacement(x, self.rbf_centers, coeffs, self.rbf_width)

    def deformed_anchors(self, params: dict[str, float]) -> dict[str, np.ndarray]:
        names = list(self.template.anchors)
        moved = self.deform(np.array([self.template.anchors[n] for n in names]), params)
        return dict(zip(names, moved))

    @abstractmethod
    def build_template(self, resolution_mm: float) -> geometry.Template:
        """Mesh the mean-shape template in the world frame."""

    @abstractmethod
    def sample_parameters(self, rng: np.random.Generator, group: str) -> dict[str, float]:
        """Draw one subject's shape parameters (flat dict of floats, the ground truth)."""

    @abstractmethod
    def deform(self, x: np.ndarray, params: dict[str, float]) -> np.ndarray:
        """phi(x; params): map template-space points (N, 3) to the subject's world frame."""

    def covariates(self, rng: np.random.Generator, group: str, params: dict[str, float]) -> dict[str, object]:
        """Observed per-subject study variables written to the subjects table."""
        return {}

    @abstractmethod
    def render(self, rng: np.random.Generator, scan: Scan) -> np.ndarray:
        """The scanner-frame image (z, y, x) in the modality's units and dtype."""

    def cohort_tables(self, rng: np.random.Generator, subjects: pd.DataFrame,
                      ground_truth: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """Extra cohort-level tables (e.g. expert ratings), by file stem."""
        return {}
