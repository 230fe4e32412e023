"""Synthetic proximal femur CT with cam-type femoroacetabular impingement.

World frame (right femur): +x medial, +y anterior, +z superior, mm. The shaft
axis is the z axis; the neck leaves the shaft at NECK_BASE towards the head.

Shape parameters (all subjects): neck-shaft angle, anteversion, head radius,
neck length, height of the distal shaft cut, shaft width, overall size and a
small smooth random field. Cam subjects add an outward bump at the
anterosuperior head-neck junction (the cam lesion) of amplitude 2.5-5 mm.

Extent (config `synthetic.extent`): `shaft_length_mm`, the shaft from its top
(z = SHAFT_TOP, under the neck) down to the distal cut; by default 65 mm, the cut
25 mm below the lesser trochanter (z -30 to -10). The cut height varies by
stretching the plain shaft below SHAFT_STRETCH_START, so a shaft cut above that
(through the lesser trochanter, as the papers' 2 mm crop needs; a plane through
everything below it) keeps its height:
`shaft_cut_scale` is still drawn (the random streams stay the same) but moves
the cut by well under a millimetre.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from . import geometry as g
from .anatomy import Anatomy, Scan
from .imaging import blur, smooth_noise, soft_inside
from .registry import GROUPS

NECK_SHAFT_ANGLE = 130.0  # degrees, template value
ANTEVERSION = 12.0  # degrees
HEAD_RADIUS = 23.0
NECK_LENGTH = 55.0  # neck base to head centre
NECK_BASE = np.array([6.0, 0.0, 12.0])
SHAFT_RADIUS = 13.0
SHAFT_TOP = 10.0
SHAFT_BOTTOM = -55.0  # the default distal cut: a shaft of 65 mm
SHAFT_STRETCH_START = -30.0  # below the lesser trochanter the shaft stretches with the cut height
LESSER_TROCHANTER = ((10.0, -9.0, -20.0), (7.0, 7.0, 10.0))  # ellipsoid centre and radii
LESSER_TROCHANTER_LOW = LESSER_TROCHANTER[0][2] - LESSER_TROCHANTER[1][2]
UNION_K = 6.0  # mm, fillets of the template's smooth union
CAM_WIDTH = 8.0  # mm, Gaussian width of the cam lesion


def neck_direction(neck_shaft_deg: float, anteversion_deg: float) -> np.ndarray:
    tilt = np.deg2rad(180.0 - neck_shaft_deg)
    ante = np.deg2rad(anteversion_deg)
    return np.array([np.sin(tilt) * np.cos(ante), np.sin(tilt) * np.sin(ante), np.cos(tilt)])


NECK_AXIS = neck_direction(NECK_SHAFT_ANGLE, ANTEVERSION)
HEAD_CENTER = NECK_BASE + NECK_LENGTH * NECK_AXIS


class Femur(Anatomy):
    name = "femur"
    modality = "CT"
    groups = GROUPS["femur"]
    rbf_count = 12
    rbf_width = 18.0
    rbf_sd = 0.8
    extent_keys = {"shaft_length_mm": f"length of the shaft above the distal cut, default {SHAFT_TOP - SHAFT_BOTTOM:g}"}

    @property
    def shaft_bottom(self) -> float:
        """z of the distal cut in the template."""
        if "shaft_length_mm" not in self.extent:
            return SHAFT_BOTTOM
        return SHAFT_TOP - self.extent["shaft_length_mm"]

    def build_template(self, resolution_mm: float) -> g.Template:
        bottom = self.shaft_bottom
        # a cut into the trochanters is a plane through everything below it; a lower cut is the shaft's own end
        plane_cut = bottom > LESSER_TROCHANTER_LOW - UNION_K
        sdf = g.smooth_union(
            g.capped_cylinder((0, 0, bottom - 10.0 if plane_cut else bottom), (0, 0, SHAFT_TOP), SHAFT_RADIUS),
            g.ellipsoid((0, -1, 10), (20, 16, 30)),  # metaphysis widening below the trochanters
            g.round_cone(NECK_BASE, HEAD_CENTER - 8 * NECK_AXIS, 16.0, 13.5),
            g.sphere(HEAD_CENTER, HEAD_RADIUS),
            g.ellipsoid((-15, -4, 22), (12, 15, 21)),  # greater trochanter
            g.ellipsoid(*LESSER_TROCHANTER),  # posteromedial
            k=UNION_K,
        )
        if plane_cut:
            sdf = g.smooth_intersection(sdf, lambda x: bottom - x[..., 2], k=2.0)
        verts, faces = g.mesh_sdf(sdf, (-40, -35, bottom - 5), (HEAD_CENTER[0] + 30, 35, HEAD_CENTER[2] + 30),
                                  resolution_mm)
        template = g.Template(verts, faces)
        # Cam lesion centre: the template vertex at the anterosuperior head-neck junction.
        anterosuperior = g.orthogonal_unit(NECK_AXIS, (0.0, 1.0, 1.0))
        junction = HEAD_CENTER - 17.0 * NECK_AXIS + 15.0 * anterosuperior
        cam_vertex = int(np.argmin(np.linalg.norm(verts - junction, axis=1)))
        self._cam_vertex = cam_vertex
        template.anchors = {
            "head_center": HEAD_CENTER.copy(),
            "neck_base": NECK_BASE.copy(),
            "cam_center": verts[cam_vertex].copy(),
            "shaft_bottom": np.array([0.0, 0.0, bottom]),
        }
        return template

    @cached_property
    def cam_normal(self) -> np.ndarray:
        """Outward surface normal at the cam lesion centre (direction of the bump)."""
        return self.template.normals()[self._cam_vertex]

    def sample_parameters(self, rng: np.random.Generator, group: str) -> dict[str, float]:
        params = {
            "neck_shaft_angle_deg": rng.normal(NECK_SHAFT_ANGLE, 5.0),
            "anteversion_deg": rng.normal(ANTEVERSION, 6.0),
            "head_radius_mm": rng.normal(HEAD_RADIUS, 1.8),
            "neck_length_mm": rng.normal(NECK_LENGTH, 4.0),
            "shaft_cut_scale": rng.uniform(0.7, 1.3),
            "shaft_width_scale": rng.normal(1.0, 0.06),
            "size_scale": rng.normal(1.0, 0.05),
            "cam_amplitude_mm": rng.uniform(2.5, 5.0) if group == "cam" else 0.0,
        }
        params.update(self.sample_rbf(rng))
        return {k: float(v) for k, v in params.items()}

    def deform(self, x: np.ndarray, params: dict[str, float]) -> np.ndarray:
        x = np.array(x, dtype=np.float64)
        anchors = self.template.anchors
        # Weights are functions of template-space position, computed before moving anything.
        rel = x - NECK_BASE
        along = (rel @ NECK_AXIS) / NECK_LENGTH  # 0 at the neck base, 1 at the head centre
        radial = np.linalg.norm(rel - np.outer(rel @ NECK_AXIS, NECK_AXIS), axis=1)
        # the neck region: along the neck axis and close to it (keeps the greater trochanter still)
        near_axis = np.maximum(g.smoothstep(radial, 34.0, 24.0), g.smoothstep(along, 0.35, 0.6))
        w_neck = g.smoothstep(along, -0.05, 0.3) * near_axis
        w_distal_neck = g.smoothstep(along, 0.15, 0.6) * near_axis
        w_head = g.smoothstep(along, 0.55, 0.8) * near_axis

        # 1. cam lesion, in template space so it stays at the same anatomical spot
        x = x + g.gaussian_bump(x, anchors["cam_center"], self.cam_normal, params["cam_amplitude_mm"], CAM_WIDTH)
        # 2. head size about the head centre
        x = x + (params["head_radius_mm"] / HEAD_RADIUS - 1.0) * w_head[:, None] * (x - HEAD_CENTER)
        # 3. neck length: head and distal neck slide along the neck axis
        x = x + (params["neck_length_mm"] - NECK_LENGTH) * w_distal_neck[:, None] * NECK_AXIS
        # 4. neck-shaft angle: rotate the neck in the plane of shaft and neck
        bend_axis = np.cross(NECK_AXIS, (0.0, 0.0, 1.0))
        delta = np.deg2rad(params["neck_shaft_angle_deg"] - NECK_SHAFT_ANGLE)
        x = g.blend_rotation(x, w_neck, g.rotation_matrix(bend_axis, delta), NECK_BASE)
        # 5. anteversion: rotate the neck about the shaft axis
        delta = np.deg2rad(params["anteversion_deg"] - ANTEVERSION)
        x = g.blend_rotation(x, w_neck, g.rotation_matrix((0, 0, 1), delta), (0.0, 0.0, NECK_BASE[2]))
        # 6. shaft width, fading out above the lesser trochanter
        w_shaft = g.smoothstep(x[:, 2], -5.0, -35.0)
        x[:, :2] *= (1.0 + (params["shaft_width_scale"] - 1.0) * w_shaft)[:, None]
        # 7. the distal cut height: stretch the shaft below SHAFT_STRETCH_START
        below = g.softplus(SHAFT_STRETCH_START - x[:, 2], 5.0)
        x[:, 2] -= (params["shaft_cut_scale"] - 1.0) * below
        # 8. small smooth normal variation, then overall size
        x = x + self.rbf_field(x, params)
        return x * params["size_scale"]

    def covariates(self, rng: np.random.Generator, group: str, params: dict[str, float]) -> dict[str, object]:
        return {"age_years": int(rng.integers(18, 51)), "sex": str(rng.choice(["F", "M"]))}

    def render(self, rng: np.random.Generator, scan: Scan) -> np.ndarray:
        """CT in Hounsfield units: cortical shell, trabecular interior, marrow canal,
        muscle and fat, the acetabulum around the head, partial-volume blur and noise."""
        world = scan.world_points
        d = scan.distance
        spacing = min(scan.grid.spacing)
        edge = 0.5 * spacing
        z = world[..., 2]

        # soft tissue: muscle with texture, a subcutaneous fat layer far from the bone
        hu = 45.0 + 12.0 * smooth_noise(rng, d.shape, 3.0 / spacing)
        radial = np.hypot(world[..., 0] + 15.0, world[..., 1])
        fat = 1.0 - soft_inside(radial - 85.0, 3.0)
        hu = hu * (1 - fat) + (-95.0) * fat

        # pelvis: acetabular cup (covering the head from superomedial) behind a joint space
        head = scan.anchors["head_center"]
        head_r = scan.params["head_radius_mm"] * scan.params["size_scale"]
        to_head = world - head.astype(np.float32)
        dist_head = np.linalg.norm(to_head, axis=-1)
        cup_axis = np.array([0.55, 0.0, 0.83], np.float32)
        cover = g.smoothstep((to_head @ cup_axis) / np.maximum(dist_head, 1e-3), 0.05, 0.35)
        cup_inner, cup_cortex = head_r + 3.0, head_r + 6.5
        in_cup = (soft_inside(cup_inner - dist_head, edge) * soft_inside(dist_head - (head_r + 22.0), 2.0) * cover)
        cup_hu = np.where(dist_head < cup_cortex, 1300.0, 320.0).astype(np.float32)
        hu = hu * (1 - in_cup) + cup_hu * in_cup

        # femur: cortex thickens down the shaft; marrow canal in the shaft
        cortex = 1.8 + 3.2 * g.smoothstep(z, 0.0, -40.0)
        interior_hu = 280.0 + 70.0 * smooth_noise(rng, d.shape, 1.0 / spacing)
        marrow = g.smoothstep(z, -10.0, -40.0)
        interior_hu = interior_hu * (1 - marrow) + (-20.0) * marrow
        in_cortex = soft_inside(-cortex - d, edge)  # 1 outside the cortex band, toward the surface
        bone_hu = interior_hu * (1 - in_cortex) + 1350.0 * in_cortex
        in_bone = soft_inside(d, edge)
        hu = hu * (1 - in_bone) + bone_hu * in_bone

        hu = blur(hu.astype(np.float32), scan.grid, 0.6 * spacing)
        hu += rng.normal(0.0, rng.uniform(15.0, 40.0), size=hu.shape).astype(np.float32)
        return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
