"""Synthetic left atrium in late-gadolinium-enhancement (LGE) MRI, AF patients after ablation.

World frame: +x patient left, +y posterior, +z superior, mm; the LA body centre is
the origin. The template is a smooth union of an ellipsoidal body, four pulmonary
veins leaving the posterior wall as tapered tubes (superior and inferior, left at
+x and right at -x) and the left atrial appendage (LAA): a finger of two round
cones joined at an elbow, anterior-left-superior.

Shape parameters (all subjects are "patient"; each a float in the ground truth):
  size_scale          N(1, 0.1) clipped to [0.7, 1.35]: LA volume varies a lot in AF
  sphericity          Beta(2, 2) in [0, 1]: elongated/flattened -> nearly spherical body
                      at constant volume (the template is 0.5)
  asymmetry           N(0, 0.1) clipped to +-0.25: a > 0 stretches the left half along x
                      by 1 + a, a < 0 the right half by 1 - a
  {vein}_tilt_a/b_deg U(-15, 15) each: rotation about the ostium (lspv, lipv, rspv, ripv)
  {vein}_length       U(0.7, 1.3): stretch along the vein axis (where a vein ends is arbitrary)
  left_common_trunk   1 in 25 %, else 0
  left_vein_merge     U(0.7, 0.9) with a trunk, else N(0, 0.05): how far the left ostia merge
  laa_tilt_a/b_deg    U(-15, 15) each: LAA orientation about its ostium
  laa_size            lognormal(0, 0.12) clipped to [0.75, 1.35]
  laa_chicken_wing    1 in 50 %, else 0
  laa_bend_deg        N(70, 7) "chicken wing" or N(20, 7) straight, clipped to [0, 90]
  rbf_*               a small smooth random field
AF recurrence is drawn from a logistic model of sphericity and |asymmetry|
(standardized by their sampling distributions), about half of the subjects. Its
strength is set so that the study's MLP on the true shapes' PCA scores finds it at
about the paper's level (68 % with the PDM): simulated on 4 cohorts of 40 training
and 40 test subjects (points only), MLP 0.70 +- 0.03, logistic regression 0.70,
majority class 0.54, the Bayes rate of the model itself 0.85. The sphericity term
carries it: linear in the shape, so PCA scores see it; |asymmetry| is not.

Extent (config `synthetic.extent`): `vein_length_scale` shortens (or lengthens) the
template's veins, where the segmentation cuts them; absent, they are 22 mm (superior)
and 18 mm (inferior) long.

Deformation: linear blend skinning. Soft part memberships come from the
primitives' distances at the template-space point (softmin), before anything
moves; each part has its own transform (the body scales, veins and LAA ride on
their ostia without being scaled with the body). The common trunk is a separate
warp after the blend, an angular compression about the body centre plus a radial
extrusion, injective by construction.
"""

from __future__ import annotations

import functools

import numpy as np

from . import geometry as g
from .anatomy import Anatomy, Scan
from .imaging import blur, smooth_noise, soft_inside
from .registry import GROUPS

BODY_RADII = np.array([28.0, 20.0, 22.0])
# Volume-preserving endpoints of the sphericity axis (same product as BODY_RADII):
# elongated left-right and flattened front-back at 0, nearly spherical at 1.
ELONGATED = np.array([32.0, 17.5, 22.0])
ROUND = np.array([25.0, 22.0, 22.4])
TEMPERATURE = 3.0  # mm, softness of the part memberships
VEIN_RADII = (7.0, 6.0)  # at the root and at the tip
VEIN_ROOT = 6.0  # each vein tube starts this far inside its ostium (a funnel into the body)
LAA_RADII = (8.5, 6.5, 3.5)  # at the ostium, elbow and tip
LAA_BEND = 45.0  # degrees, template bend at the elbow
ASYMMETRY_SD = 0.1
MERGE_ANGLE_SD = 40.0  # degrees, angular window of the common-trunk compression
MERGE_PLANE_SD = 10.0  # mm, its window across the plane of the left veins
TRUNK_LENGTH = 10.0  # mm, outward extrusion of the merged ostium at full merge
TRUNK_ANGLE_SD = 20.0  # degrees, angular window of the extrusion
# AF recurrence: logit = B0 + B1 z(sphericity) + B2 z(|asymmetry|), z by the sampling distributions
RECURRENCE_COEFS = (0.0, 2.5, 0.6)
SPHERICITY_MEAN, SPHERICITY_SD = 0.5, np.sqrt(1.0 / 20.0)  # Beta(2, 2)
ABS_ASYM_MEAN = ASYMMETRY_SD * np.sqrt(2.0 / np.pi)  # half-normal
ABS_ASYM_SD = ASYMMETRY_SD * np.sqrt(1.0 - 2.0 / np.pi)


def unit(v) -> np.ndarray:
    v = np.asarray(v, float)
    return v / np.linalg.norm(v)


def body_surface(x: float, z: float, side: float) -> np.ndarray:
    """The point of the template body at (x, z) on the posterior (side=+1) or anterior (-1) wall."""
    y = side * BODY_RADII[1] * np.sqrt(1.0 - (x / BODY_RADII[0]) ** 2 - (z / BODY_RADII[2]) ** 2)
    return np.array([x, y, z])


# name: (ostium, direction, template length mm)
VEINS = {
    "lspv": (body_surface(16.0, 9.0, 1), unit([0.55, 0.65, 0.5]), 22.0),
    "lipv": (body_surface(16.0, -8.0, 1), unit([0.6, 0.72, -0.35]), 18.0),
    "rspv": (body_surface(-16.0, 9.0, 1), unit([-0.55, 0.65, 0.5]), 22.0),
    "ripv": (body_surface(-16.0, -8.0, 1), unit([-0.6, 0.72, -0.35]), 18.0),
}
LAA_OSTIUM = body_surface(18.0, 10.0, -1)
LAA_AXIS = unit([0.45, -0.7, 0.55])
LAA_BEND_AXIS = unit(np.cross(LAA_AXIS, [0.0, 0.0, -1.0]))  # positive bend curls the tip inferiorly
LAA_ELBOW = LAA_OSTIUM + 15.0 * LAA_AXIS
LAA_TIP = LAA_ELBOW + 14.0 * g.rotation_matrix(LAA_BEND_AXIS, np.deg2rad(LAA_BEND)) @ LAA_AXIS
PARTS = ("body", *VEINS, "laa_neck", "laa_tip")


@functools.cache
def primitives(vein_length_scale: float = 1.0) -> tuple:
    """Signed distances of the parts, in PARTS order, with the veins' template lengths times
    `vein_length_scale` (module level, not on the anatomy: closures do not pickle to workers)."""
    return (
        g.ellipsoid((0, 0, 0), BODY_RADII),
        *[g.round_cone(o - VEIN_ROOT * u, o + vein_length_scale * length * u, *VEIN_RADII)
          for o, u, length in VEINS.values()],
        g.round_cone(LAA_OSTIUM - 5.0 * LAA_AXIS, LAA_ELBOW, LAA_RADII[0], LAA_RADII[1]),
        g.round_cone(LAA_ELBOW, LAA_TIP, LAA_RADII[1], LAA_RADII[2]),
    )


PRIMITIVES = primitives()


def perpendicular_axes(axis) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors completing `axis` to an orthonormal frame (tilt axes of a tube)."""
    a = g.orthogonal_unit(axis, (0.0, 0.0, 1.0) if abs(axis[2]) < 0.9 else (1.0, 0.0, 0.0))
    return a, np.cross(axis, a)


def tilt(axis, params: dict[str, float], prefix: str) -> np.ndarray:
    """Rotation by the angles {prefix}_tilt_a_deg and _b_deg about the axes perpendicular to `axis`."""
    a, b = perpendicular_axes(axis)
    rotvec = np.deg2rad(params[f"{prefix}_tilt_a_deg"]) * a + np.deg2rad(params[f"{prefix}_tilt_b_deg"]) * b
    angle = np.linalg.norm(rotvec)
    return g.rotation_matrix(rotvec, angle) if angle > 0 else np.eye(3)


def body_scale(sphericity: float) -> np.ndarray:
    """Per-axis body scale factors; geometric interpolation keeps the volume constant."""
    axes = ELONGATED ** (1 - sphericity) * ROUND**sphericity
    return axes / np.sqrt(ELONGATED * ROUND)  # template = sphericity 0.5


def recurrence_logit(params: dict[str, float]) -> float:
    b0, b1, b2 = RECURRENCE_COEFS
    z_sph = (params["sphericity"] - SPHERICITY_MEAN) / SPHERICITY_SD
    z_asym = (abs(params["asymmetry"]) - ABS_ASYM_MEAN) / ABS_ASYM_SD
    return b0 + b1 * z_sph + b2 * z_asym


class LeftAtrium(Anatomy):
    name = "left_atrium"
    modality = "LGE-MRI"
    groups = GROUPS["left_atrium"]
    rbf_count = 16
    rbf_width = 15.0
    rbf_sd = 0.5
    extent_keys = {"vein_length_scale": "the pulmonary veins' length as a multiple of the template's "
                                        f"({', '.join(f'{v[2]:g}' for v in VEINS.values())} mm), default 1"}

    @property
    def vein_length_scale(self) -> float:
        return self.extent.get("vein_length_scale", 1.0)

    @property
    def primitives(self) -> tuple:
        return primitives(self.vein_length_scale)

    def build_template(self, resolution_mm: float) -> g.Template:
        sdf = g.smooth_union(*self.primitives, k=4.0)
        verts, faces = g.mesh_sdf(sdf, (-58, -50, -45), (58, 52, 50), resolution_mm)
        template = g.Template(verts, faces)
        anchors = {}
        for name, (o, u, length) in VEINS.items():
            anchors[f"{name}_ostium"], anchors[f"{name}_tip"] = o.copy(), o + self.vein_length_scale * length * u
        anchors.update(laa_ostium=LAA_OSTIUM.copy(), laa_elbow=LAA_ELBOW.copy(), laa_tip=LAA_TIP.copy())
        for i, (neg, pos) in enumerate([("right", "left"), ("anterior", "posterior"), ("inferior", "superior")]):
            pole = np.zeros(3)
            pole[i] = BODY_RADII[i]
            anchors[f"pole_{pos}"], anchors[f"pole_{neg}"] = pole, -pole
        template.anchors = anchors
        return template

    def part_weights(self, x: np.ndarray) -> np.ndarray:
        """(N, parts) soft membership of template-space points: softmin of the part distances."""
        d = np.stack([f(np.asarray(x, float)) for f in self.primitives], axis=1)
        e = np.exp(-(d - d.min(1, keepdims=True)) / TEMPERATURE)
        return e / e.sum(1, keepdims=True)

    def sample_parameters(self, rng: np.random.Generator, group: str) -> dict[str, float]:
        trunk = rng.random() < 0.25
        chicken_wing = rng.random() < 0.5
        params = {
            "size_scale": np.clip(rng.normal(1.0, 0.1), 0.7, 1.35),
            "sphericity": rng.beta(2.0, 2.0),
            "asymmetry": np.clip(rng.normal(0.0, ASYMMETRY_SD), -0.25, 0.25),
            "left_common_trunk": float(trunk),
            # angular compression of the left ostia towards each other (about 0 without a trunk)
            "left_vein_merge": rng.uniform(0.7, 0.9) if trunk else rng.normal(0.0, 0.05),
        }
        for name in VEINS:
            params[f"{name}_tilt_a_deg"] = rng.uniform(-15.0, 15.0)
            params[f"{name}_tilt_b_deg"] = rng.uniform(-15.0, 15.0)
            params[f"{name}_length"] = rng.uniform(0.7, 1.3)
        params.update({
            "laa_tilt_a_deg": rng.uniform(-15.0, 15.0),
            "laa_tilt_b_deg": rng.uniform(-15.0, 15.0),
            "laa_size": np.clip(rng.lognormal(0.0, 0.12), 0.75, 1.35),
            "laa_chicken_wing": float(chicken_wing),
            "laa_bend_deg": np.clip(rng.normal(70.0, 7.0) if chicken_wing else rng.normal(20.0, 7.0), 0.0, 90.0),
        })
        params.update(self.sample_rbf(rng))
        return {k: float(v) for k, v in params.items()}

    @staticmethod
    def body_map(x: np.ndarray, params: dict[str, float]) -> np.ndarray:
        """Body transform: sphericity scaling, then one side stretched along x by 1 + |asymmetry|."""
        y = x * body_scale(params["sphericity"])
        a = params["asymmetry"]
        side = g.smoothstep(y[:, 0], -4.0, 4.0) if a > 0 else g.smoothstep(y[:, 0], 4.0, -4.0)
        y[:, 0] *= 1.0 + abs(a) * side
        return y

    def deform(self, x: np.ndarray, params: dict[str, float]) -> np.ndarray:
        x = np.array(x, dtype=np.float64)
        w = self.part_weights(x)  # in template space, before anything moves
        transforms = [self.body_map(x, params)]
        # veins: tilt about the ostium and stretch along the axis, riding on the moved ostium
        for name, (o, u, _) in VEINS.items():
            linear = tilt(u, params, name) @ (np.eye(3) + (params[f"{name}_length"] - 1.0) * np.outer(u, u))
            transforms.append(self.body_map(o[None], params) + (x - o) @ linear.T)
        # LAA: orientation and size about its ostium; the distal part also bends about the elbow
        base = self.body_map(LAA_OSTIUM[None], params)
        linear = params["laa_size"] * tilt(LAA_AXIS, params, "laa")
        bend = g.rotation_matrix(LAA_BEND_AXIS, np.deg2rad(params["laa_bend_deg"] - LAA_BEND))
        transforms.append(base + (x - LAA_OSTIUM) @ linear.T)
        transforms.append(base + ((x - LAA_ELBOW) @ bend.T + LAA_ELBOW - LAA_OSTIUM) @ linear.T)
        y = np.einsum("np,pnk->nk", w, np.stack(transforms))
        # left common trunk, about the moved left ostia
        ostia = self.body_map(np.array([VEINS["lspv"][0], VEINS["lipv"][0]]), params)
        y = merge_toward(y, ostia[0], ostia[1], params["left_vein_merge"])
        y = y + self.rbf_field(x, params)
        return y * params["size_scale"]

    def covariates(self, rng: np.random.Generator, group: str, params: dict[str, float]) -> dict[str, object]:
        p = 1.0 / (1.0 + np.exp(-recurrence_logit(params)))
        return {"af_recurrence": int(rng.random() < p),
                "age_years": int(np.clip(np.rint(rng.normal(63.0, 9.0)), 35, 85)),
                "sex": str(rng.choice(["F", "M"], p=[0.35, 0.65]))}

    def render(self, rng: np.random.Generator, scan: Scan) -> np.ndarray:
        """LGE-MRI: blood grey-bright, nulled (dark) myocardium with bright fibrosis and
        ablation scar, neighbouring chambers and vessels, dark lungs, bias field, Rician noise."""
        world = scan.world_points
        d = scan.distance
        spacing = min(scan.grid.spacing)
        edge = 0.5 * spacing
        a = {k: v.astype(np.float32) for k, v in scan.anchors.items()}
        size = scan.params["size_scale"]
        blood = 1.0

        image = 0.25 * (1.0 + 0.15 * smooth_noise(rng, d.shape, 2.5 / spacing))  # background tissue

        def paint(value, inside):
            nonlocal image
            image += inside * (value - image)

        # lungs, posterolateral, with faint vessel texture
        lungs = np.minimum(*[ellipsoid_sdf(world, pole + np.array([dx, 35.0, 0.0], np.float32), (38.0, 55.0, 110.0))
                             for pole, dx in ((a["pole_left"], 40.0), (a["pole_right"], -40.0))])
        paint(0.03 + 0.02 * np.clip(smooth_noise(rng, d.shape, 1.5 / spacing), 0, None), soft_inside(lungs, 2.0))
        # left ventricle anterior-inferior-left, its base on the LA (the mitral valve, no myocardium
        # there): blood pool inside a nulled myocardium that thickens from the base to the apex
        centre = np.mean([a[f"pole_{p}"] for p in ("left", "right", "anterior", "posterior")], axis=0)
        reach = np.mean([np.linalg.norm(a[f"pole_{p}"] - centre) for p in ("left", "right", "inferior")])
        lv_axis = unit([0.45, -0.55, -0.7]).astype(np.float32)
        lv_frame = np.stack([*perpendicular_axes(lv_axis), lv_axis], axis=1).astype(np.float32)
        lv_centre = centre + (reach + 37.0) * lv_axis
        paint(0.08, soft_inside(ellipsoid_sdf(world, lv_centre + 6.0 * lv_axis, (30.0, 30.0, 40.0), lv_frame), edge))
        # blood pools abutting the LA, separated only by its thin dark wall (2-3 mm gaps): LV,
        # descending aorta behind, ascending aorta in front, right atrium across the septum,
        # and the pulmonary veins continuing into the lungs beyond the segmentation's arbitrary cut
        post, ant, right = a["pole_posterior"], a["pole_anterior"], a["pole_right"]
        pools = [ellipsoid_sdf(world, lv_centre, (20.0, 20.0, 34.0), lv_frame),
                 tube_sdf(world, post + [4, 14, -90], post + [4, 14, 90], 11.0, 11.0),
                 tube_sdf(world, ant + [-5, -17, -30], ant + [-5, -12, 70], 14.0, 14.0),
                 ellipsoid_sdf(world, right + [-22.5, -6, 0], (20.0, 24.0, 28.0))]
        for name in VEINS:
            tip, ostium = a[f"{name}_tip"], a[f"{name}_ostium"]
            u = (tip - ostium) / np.linalg.norm(tip - ostium)
            r = VEIN_RADII[1] * size
            pools.append(tube_sdf(world, tip - 3 * u, tip + 35 * u, r, 0.6 * r))
        paint(blood, soft_inside(np.minimum.reduce(pools), edge))

        # LA wall: 0-2.5 mm outside the surface, nulled, with patchy fibrosis (thresholded
        # noise, extent varying by subject) and patchy ablation scar around the vein ostia
        thickness = np.clip(1.8 + 0.5 * smooth_noise(rng, d.shape, 3.0 / spacing), 0.8, 2.5)
        threshold = rng.uniform(0.3, 1.3)
        fibrosis = g.smoothstep(smooth_noise(rng, d.shape, 3.0 / spacing), threshold, threshold + 0.6)
        near_ostia = sum(np.exp(-sq_norm(world - a[f"{n}_ostium"]) / (2 * 9.0**2)) for n in VEINS)
        scar = np.minimum(near_ostia, 1.0) * g.smoothstep(smooth_noise(rng, d.shape, 2.0 / spacing), -0.6, 0.2)
        enhancement = np.maximum(fibrosis, scar).astype(np.float32)
        paint(0.1 + 1.5 * enhancement, soft_inside(d - thickness, edge))
        paint(blood * (1.0 + 0.05 * smooth_noise(rng, d.shape, 4.0 / spacing)), soft_inside(d, edge))

        image = blur(image.astype(np.float32), scan.grid, 0.7 * spacing)
        gain = 600.0 * rng.lognormal(0.0, 0.3)
        image *= gain * np.exp(0.25 * bias_field(rng, world))  # coil sensitivity, about +-30 %
        sigma = gain * blood / rng.uniform(4.0, 12.0)  # SNR of the blood pool
        real = image + rng.normal(0.0, sigma, d.shape).astype(np.float32)
        imag = rng.normal(0.0, sigma, d.shape).astype(np.float32)
        return np.clip(np.rint(np.hypot(real, imag)), 0, 65535).astype(np.uint16)


def merge_toward(x: np.ndarray, o1: np.ndarray, o2: np.ndarray, amount: float) -> np.ndarray:
    """Rotate the neighbourhoods of two ostia towards each other about the body centre (the origin),
    then extrude the merged ostium outwards into a short common trunk.

    In polar coordinates (rho, phi) of the plane through the origin and both ostia
    (phi = 0 midway between them) and height h across it: first phi -> phi (1 -
    amount w), with a window w Gaussian in phi and smooth in rho and h, so that
    d(phi')/d(phi) >= 1 - amount > 0; then rho -> rho + TRUNK_LENGTH amount v(phi, h)
    ramp(rho) with a non-decreasing ramp. Each step is injective (amount < 1), so
    the ostia merge and nothing folds. The compression fades beyond the ostia, so
    the veins splay out of the trunk.
    """
    if abs(amount) < 1e-9:
        return x
    n = unit(np.cross(o1, o2))
    m = unit(unit(o1) + unit(o2))
    b = np.cross(n, m)
    r0 = 0.5 * (np.linalg.norm(o1) + np.linalg.norm(o2))
    pm, pb, h = x @ m, x @ b, x @ n
    rho, phi = np.hypot(pm, pb), np.arctan2(pb, pm)
    across = np.exp(-0.5 * (h / MERGE_PLANE_SD) ** 2)
    window = (np.exp(-0.5 * (phi / np.deg2rad(MERGE_ANGLE_SD)) ** 2) * across
              * g.smoothstep(rho, 0.3 * r0, 0.7 * r0) * g.smoothstep(rho, 1.9 * r0, 1.1 * r0))
    phi = phi * (1.0 - amount * window)
    rho = rho + TRUNK_LENGTH * amount * np.exp(-0.5 * (phi / np.deg2rad(TRUNK_ANGLE_SD)) ** 2) * across \
        * g.smoothstep(rho, 0.5 * r0, r0)
    return x + (rho * np.cos(phi) - pm)[:, None] * m + (rho * np.sin(phi) - pb)[:, None] * b


# float32 distance functions for whole image grids (the geometry primitives work in float64)


def sq_norm(v: np.ndarray) -> np.ndarray:
    return np.einsum("...i,...i->...", v, v)


def ellipsoid_sdf(p: np.ndarray, centre, radii, frame: np.ndarray | None = None) -> np.ndarray:
    """Approximate signed distance to an ellipsoid; `frame` columns are its axes (default: world axes)."""
    radii = np.asarray(radii, np.float32)
    rel = p - np.asarray(centre, np.float32)
    rel = (rel @ frame if frame is not None else rel) / radii
    return (np.sqrt(sq_norm(rel)) - 1.0) * radii.min()


def tube_sdf(p: np.ndarray, a, b, radius_a: float, radius_b: float) -> np.ndarray:
    """Round cone from a to b (float32 version of geometry.round_cone)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    axis = b - a
    length2 = axis @ axis
    rel = p - a
    along = rel @ axis
    t = np.clip(along / length2, 0.0, 1.0)
    radial2 = np.maximum(sq_norm(rel) - 2 * t * along + t * t * length2, 0.0)  # |rel - t axis|^2
    return np.sqrt(radial2) - (radius_a + t * (radius_b - radius_a))


def bias_field(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """Smooth low-frequency field: a few random plane waves of 200-400 mm wavelength, unit sd."""
    field = np.zeros(p.shape[:-1], np.float32)
    for _ in range(3):
        k = (2 * np.pi / rng.uniform(200.0, 400.0)) * unit(rng.normal(size=3))
        field += np.cos(p @ k.astype(np.float32) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return field / np.sqrt(1.5)  # unit variance
