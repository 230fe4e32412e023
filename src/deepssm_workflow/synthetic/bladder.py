"""Synthetic urinary bladder in CT: the soft, fluid-filled third anatomy of the
multi-anatomy hip cohort (multi_anatomy.py), between the femoral heads.

World frame: +x patient left, +y anterior, +z superior, mm; the template's
centre is the origin. The template is a rounded box (superellipsoid, exponent
2.5), flatter at the base than at the dome.

Shape parameters (one group; each a float in the ground truth):
  size_scale   N(1, 0.1) clipped to [0.75, 1.3]: overall size
  filling      U(0.75, 1.25): height of the dome (how full the bladder is)
  width_ratio  N(1, 0.08) clipped to [0.8, 1.2]: left-right against front-back width
  rbf_*        a smooth random field

It is not a dataset anatomy of its own (no study, no cohort kind): only a part
of multi-anatomy scans, so it is not in the anatomy registry.
"""

from __future__ import annotations

import numpy as np

from . import geometry as g
from .anatomy import Anatomy, Scan
from .imaging import blur, smooth_noise, soft_inside

RADII = np.array([34.0, 28.0, 24.0])
URINE_HU = 10.0
WALL_HU = 45.0


class Bladder(Anatomy):
    name = "bladder"
    modality = "CT"
    groups = ("control",)
    rbf_count = 10
    rbf_width = 15.0
    rbf_sd = 1.0

    def build_template(self, resolution_mm: float) -> g.Template:
        verts, faces = g.mesh_sdf(g.superellipsoid((0.0, 0.0, 0.0), RADII, 2.5), -RADII - 6.0, RADII + 6.0,
                                  resolution_mm)
        return g.Template(verts, faces, anchors={"dome": np.array([0.0, 0.0, RADII[2]])})

    def sample_parameters(self, rng: np.random.Generator, group: str) -> dict[str, float]:
        params = {
            "size_scale": np.clip(rng.normal(1.0, 0.1), 0.75, 1.3),
            "filling": rng.uniform(0.75, 1.25),
            "width_ratio": np.clip(rng.normal(1.0, 0.08), 0.8, 1.2),
        }
        params.update(self.sample_rbf(rng))
        return {k: float(v) for k, v in params.items()}

    def deform(self, x: np.ndarray, params: dict[str, float]) -> np.ndarray:
        x = np.array(x, dtype=np.float64)
        w = params["width_ratio"]
        # the dome rises with filling; the base (z < 0) stays where the pelvic floor holds it
        dome = g.smoothstep(x[:, 2], -RADII[2], RADII[2])
        x[:, 2] *= 1.0 + (params["filling"] - 1.0) * dome
        x[:, 0] *= np.sqrt(w)
        x[:, 1] /= np.sqrt(w)
        x = x + self.rbf_field(x, params)
        return x * params["size_scale"]

    def render(self, rng: np.random.Generator, scan: Scan) -> np.ndarray:
        """CT in Hounsfield units: urine inside a thin enhancing wall, in textured soft tissue."""
        spacing = min(scan.grid.spacing)
        d = scan.distance
        hu = 40.0 + 12.0 * smooth_noise(rng, d.shape, 3.0 / spacing)
        wall = soft_inside(d - 2.5, 0.5 * spacing)
        hu = hu * (1 - wall) + WALL_HU * wall
        inside = soft_inside(d, 0.5 * spacing)
        hu = hu * (1 - inside) + (URINE_HU + 4.0 * smooth_noise(rng, d.shape, 2.0 / spacing)) * inside
        hu = blur(hu.astype(np.float32), scan.grid, 0.6 * spacing)
        hu += rng.normal(0.0, rng.uniform(15.0, 40.0), size=hu.shape).astype(np.float32)
        return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
