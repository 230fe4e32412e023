"""Synthetic infant cranial vault CT (5-15 months) with metopic craniosynostosis.

World frame: +x anterior, +y left, +z superior, mm, origin near the head centre.
The template is the outer surface of the cranial vault: a superellipsoid-like
head (flatter forehead, rounder and slightly wider back) cut flat at the skull
base (z = BASE_Z), so it is a closed surface.

Shape parameters (all subjects): age (which, with sex, sets overall size via
head-circumference growth), cephalic index, vault height, frontal bossing,
forehead taper (normal forehead narrowness), positional occipital flattening
and a small smooth random field. Metopic subjects add trigonocephaly of
continuous `severity` in [0.2, 1]: a midline frontal keel, a forehead narrowed
increasingly towards the front and a compensatory parietal widening. Controls
have severity 0. `latent_severity` (severity plus a little of the normal
forehead taper) is what the simulated expert raters see.
"""

from __future__ import annotations

import itertools
from functools import cached_property

import numpy as np
import pandas as pd

from . import geometry as g
from .anatomy import Anatomy, Scan
from .imaging import blur, smooth_noise, soft_inside
from .registry import GROUPS

SEMI_AXES_FRONT = (73.0, 62.0, 60.0)  # x (anterior half), y, z
SEMI_AXES_BACK_X = 77.0  # the occiput reaches a little further back than the forehead forward
EXPONENT_FRONT = 2.4  # flatter forehead
EXPONENT = 2.3
EXPONENT_BACK = 2.1  # rounder occiput
BASE_Z = -25.0  # skull-base cut plane
# template width grows from front to back (parietal eminences): y semi-axis scale at x -> -inf / +inf
WIDTH_BACK, WIDTH_FRONT = 1.10, 0.90

# trigonocephaly at severity 1
KEEL_MM = 8.0  # forward protrusion of the forehead midline
KEEL_WIDTH = 15.0  # Gaussian width of the keel across the midline (|y|)
NARROWING = 0.35  # forehead y compression at the very front
WIDENING = 0.12  # compensatory posterior y widening

TAPER_SD = 0.03  # normal forehead narrowness (same field as the trigonocephalic narrowing)
LATENT_TAPER_WEIGHT = 0.06  # latent severity per sd of normal forehead taper
BOSSING_WIDTH = 18.0
FLATTENING_WIDTH = 26.0

# WHO median head circumference (cm) by age (months); girls are about 1.1 cm smaller
HC_MONTHS = np.array([5.0, 6.0, 9.0, 12.0, 15.0])
HC_BOYS = np.array([42.6, 43.3, 45.0, 46.1, 46.8])
HC_GIRL_OFFSET = -1.1
HC_TEMPLATE = 44.4  # the template is a typical 9-month-old

# simulated expert ratings: 5-point Likert over the latent severity
N_RATERS = 36
RATING_THRESHOLDS = np.array([0.12, 0.35, 0.58, 0.80])


def _direction(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Unit vector: azimuth from +x towards +y (left), elevation towards +z."""
    az, el = np.deg2rad(azimuth_deg), np.deg2rad(elevation_deg)
    return np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])


def _ray_vertex(verts: np.ndarray, origin, direction) -> int:
    """The vertex seen from `origin` closest in angle to `direction` (surface is star-shaped)."""
    rel = verts - np.asarray(origin, float)
    return int(np.argmax((rel @ direction) / np.linalg.norm(rel, axis=1)))


# (ray origin, direction) of the named template surface spots
ANCHOR_RAYS = {
    "forehead": ((0, 0, 0), _direction(0, 20)),  # frontal midline, where the keel is
    "nasion": ((0, 0, BASE_Z + 5), _direction(0, 0)),  # front of the vault at the base
    "base_back": ((0, 0, BASE_Z + 5), _direction(180, 0)),
    "base_left": ((0, 0, BASE_Z + 5), _direction(90, 0)),
    "base_right": ((0, 0, BASE_Z + 5), _direction(-90, 0)),
    "vertex": ((0, 0, 0), _direction(0, 90)),
    "bregma": ((0, 0, 0), _direction(0, 63)),
    "lambda": ((0, 0, 0), _direction(180, 40)),
    "opisthocranion": ((0, 0, 0), _direction(180, 5)),
    "frontal_left": ((0, 0, 0), _direction(35, 20)),  # lateral forehead: bifrontal width
    "frontal_right": ((0, 0, 0), _direction(-35, 20)),
    "frontal_eminence_left": ((0, 0, 0), _direction(25, 35)),
    "frontal_eminence_right": ((0, 0, 0), _direction(-25, 35)),
    "eurion_left": ((0, 0, 0), _direction(95, 5)),
    "eurion_right": ((0, 0, 0), _direction(-95, 5)),
    "parietal_left": ((0, 0, 0), _direction(115, 25)),  # parietal eminences: posterior width
    "parietal_right": ((0, 0, 0), _direction(-115, 25)),
    "occipital_left": ((0, 0, 0), _direction(150, 10)),  # where positional flattening happens
    "occipital_right": ((0, 0, 0), _direction(-150, 10)),
}


def head_circumference_cm(age_months, male) -> np.ndarray:
    return np.interp(age_months, HC_MONTHS, HC_BOYS) + (1.0 - np.asarray(male, float)) * HC_GIRL_OFFSET


def _vault_sdf(x: np.ndarray) -> np.ndarray:
    """Egg-shaped superellipsoid: x semi-axis and exponent differ front/back (C1 at x = 0,
    where the x term vanishes), the y semi-axis grows smoothly towards the back."""
    front = x[..., 0] > 0
    u = np.abs(x[..., 0]) / np.where(front, SEMI_AXES_FRONT[0], SEMI_AXES_BACK_X)
    width = SEMI_AXES_FRONT[1] * (0.5 * (WIDTH_BACK + WIDTH_FRONT)
                                  + 0.5 * (WIDTH_FRONT - WIDTH_BACK) * np.tanh((x[..., 0] + 5.0) / 30.0))
    v = np.abs(x[..., 1]) / width
    w = np.abs(x[..., 2]) / SEMI_AXES_FRONT[2]
    k = (u ** np.where(front, EXPONENT_FRONT, EXPONENT_BACK) + v**EXPONENT + w**EXPONENT) ** (1.0 / EXPONENT)
    return (k - 1.0) * SEMI_AXES_FRONT[2]


def _ellipsoid(points: np.ndarray, center, radii, yaw_deg: float = 0.0) -> np.ndarray:
    """Approximate signed distance to an ellipsoid turned by `yaw_deg` about z (float32 throughout)."""
    c, s = np.float32(np.cos(np.deg2rad(yaw_deg))), np.float32(np.sin(np.deg2rad(yaw_deg)))
    r = np.asarray(radii, np.float32)
    rel = points - np.asarray(center, np.float32)
    u = (c * rel[..., 0] + s * rel[..., 1]) / r[0]
    v = (c * rel[..., 1] - s * rel[..., 0]) / r[1]
    w = rel[..., 2] / r[2]
    return (np.sqrt(u * u + v * v + w * w) - np.float32(1.0)) * r.min()


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum of two distance fields (as geometry.smooth_union), on arrays."""
    h = np.clip(0.5 + 0.5 * (b - a) / np.float32(k), 0.0, 1.0)
    return b * (1 - h) + a * h - np.float32(k) * h * (1 - h)


def _ramp(v: np.ndarray, edge0: float, edge1: float) -> np.ndarray:
    """geometry.smoothstep without the float64 copy of a whole volume."""
    t = np.clip((v - np.float32(edge0)) / np.float32(edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _box(scan: Scan, center, reach: float) -> tuple[slice, slice, slice]:
    """(z, y, x) slices of the scan grid covering the world-frame cube of half-size `reach` around `center`."""
    corners = np.asarray(center, float) + reach * np.array(list(itertools.product((-1.0, 1.0), repeat=3)))
    to_image = np.linalg.inv(scan.image_to_world)
    index = (corners @ to_image[:3, :3].T + to_image[:3, 3] - scan.grid.origin) / scan.grid.spacing
    size = np.array(scan.grid.size)
    lo = np.clip(np.floor(index.min(0)).astype(int), 0, size)
    hi = np.clip(np.ceil(index.max(0)).astype(int) + 1, 0, size)
    return slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0])


class Metopic(Anatomy):
    name = "metopic"
    modality = "CT"
    groups = GROUPS["metopic"]
    rbf_count = 16
    rbf_width = 28.0
    rbf_sd = 1.0

    def build_template(self, resolution_mm: float) -> g.Template:
        # the rounded rim (k) at the cut keeps marching cubes and smoothing well behaved
        sdf = g.smooth_intersection(_vault_sdf, lambda x: BASE_Z - x[..., 2], k=4.0)
        lower = (-SEMI_AXES_BACK_X - 8, -SEMI_AXES_FRONT[1] * WIDTH_BACK - 8, BASE_Z - 6)
        upper = (SEMI_AXES_FRONT[0] + 8, SEMI_AXES_FRONT[1] * WIDTH_BACK + 8, SEMI_AXES_FRONT[2] + 8)
        verts, faces = g.mesh_sdf(sdf, lower, upper, resolution_mm)
        template = g.Template(verts, faces)
        self._anchor_ids = {name: _ray_vertex(verts, o, d) for name, (o, d) in ANCHOR_RAYS.items()}
        template.anchors = {name: verts[i].copy() for name, i in self._anchor_ids.items()}
        template.anchors["base_center"] = np.array([0.0, 0.0, BASE_Z])
        return template

    @cached_property
    def anchor_normals(self) -> dict[str, np.ndarray]:
        """Outward template normals at the surface anchors (directions of bumps)."""
        normals = self.template.normals()
        return {name: normals[i] for name, i in self._anchor_ids.items()}

    def sample_parameters(self, rng: np.random.Generator, group: str) -> dict[str, float]:
        age = rng.uniform(5.0, 15.0)
        male = float(rng.random() < 0.5)
        taper = rng.normal(0.0, TAPER_SD)
        severity = 0.2 + 0.8 * rng.beta(2.0, 2.0) if group == "metopic" else 0.0
        params = {
            "age_exact_months": age,  # ground truth; the subjects table gets it rounded as age_months
            "male": male,
            "size_scale": head_circumference_cm(age, male) / HC_TEMPLATE * np.exp(rng.normal(0.0, 0.03)),
            "cephalic_index_scale": np.exp(rng.normal(0.0, 0.04)),  # width/length relative to the template
            "vault_height_scale": np.exp(rng.normal(0.0, 0.04)),
            "frontal_bossing_mm": rng.normal(0.0, 1.5),
            "frontal_taper": taper,
            # positional plagiocephaly: > 0 flattens the right occiput, < 0 the left
            "occipital_flattening_mm": np.clip(rng.normal(0.0, 2.5), -7.0, 7.0),
            "severity": severity,
            "latent_severity": severity + LATENT_TAPER_WEIGHT * taper / TAPER_SD,
        }
        params.update(self.sample_rbf(rng))
        return {k: float(v) for k, v in params.items()}

    def deform(self, x: np.ndarray, params: dict[str, float]) -> np.ndarray:
        x = np.array(x, dtype=np.float64)
        anchors, normals = self.template.anchors, self.anchor_normals
        s = params["severity"]
        # Weights are functions of template-space position, computed before moving anything.
        w_front = g.smoothstep(x[:, 0], 0.0, 70.0)  # frontal bone region, strongest at the front
        w_back = g.smoothstep(x[:, 0], 10.0, -45.0)  # parietal and occipital region
        # keel: forehead midline; rises with x, so d(dx)/dx >= 0 and the map cannot fold
        w_keel = g.smoothstep(x[:, 0], 20.0, 65.0) * np.exp(-x[:, 1] ** 2 / (2 * KEEL_WIDTH**2))

        # 1. bumps along the template normals: frontal bossing, occipital flattening (one side)
        bump = np.zeros_like(x)
        for side in ("left", "right"):
            name = f"frontal_eminence_{side}"
            bump += g.gaussian_bump(x, anchors[name], normals[name], params["frontal_bossing_mm"], BOSSING_WIDTH)
        flat = params["occipital_flattening_mm"]
        name = "occipital_right" if flat > 0 else "occipital_left"
        bump += g.gaussian_bump(x, anchors[name], normals[name], -abs(flat), FLATTENING_WIDTH)
        x = x + bump
        # 2. trigonocephaly keel: the forehead midline protrudes forward
        x[:, 0] += s * KEEL_MM * w_keel
        # 3. forehead narrowing (trigonocephaly plus normal taper) and compensatory posterior widening
        x[:, 1] *= 1.0 - (s * NARROWING + params["frontal_taper"]) * w_front + s * WIDENING * w_back
        # 4. cephalic index (width against length, area-preserving) and vault height above the base
        ci = params["cephalic_index_scale"]
        x[:, 0] /= np.sqrt(ci)
        x[:, 1] *= np.sqrt(ci)
        x[:, 2] = BASE_Z + (x[:, 2] - BASE_Z) * params["vault_height_scale"]
        # 5. small smooth normal variation, then overall size (head growth with age)
        x = x + self.rbf_field(x, params)
        return x * params["size_scale"]

    def covariates(self, rng: np.random.Generator, group: str, params: dict[str, float]) -> dict[str, object]:
        return {"age_months": round(params["age_exact_months"], 1), "sex": "M" if params["male"] else "F"}

    def render(self, rng: np.random.Generator, scan: Scan) -> np.ndarray:
        """CT in Hounsfield units: scalp, a thin infant skull with open sutures and anterior
        fontanelle, CSF and brain inside; below the cut plane the skull continues down
        around skull-base and facial structures, so the cut itself leaves no mark."""
        world = scan.world_points
        x, z = (np.ascontiguousarray(world[..., i]) for i in (0, 2))
        d = scan.distance
        spacing = min(scan.grid.spacing)
        edge = 0.5 * spacing
        p = scan.params
        size = p["size_scale"]
        a = {k: v.astype(np.float32) for k, v in scan.anchors.items()}
        z_base = float(a["base_center"][2])
        front_x = float(a["nasion"][0])

        def paint(target, center, reach, sdf, value):
            """Blend `value` into `target` inside sdf(points) < 0, evaluated only within `reach` mm of `center`."""
            box = _box(scan, center, reach)
            if world[box].size == 0:  # outside the field of view
                return
            occupancy = soft_inside(sdf(world[box]), edge)
            value = value(occupancy.shape) if callable(value) else value
            target[box] += (value - target[box]) * occupancy

        # the skull outside the segmented vault: a half-ellipsoid under the base, blended with the vault
        centre = np.array([0.5 * (a["nasion"][0] + a["base_back"][0]), 0.5 * (a["base_left"][1] + a["base_right"][1]),
                           z_base], np.float32)
        radii = (0.5 * (a["nasion"][0] - a["base_back"][0]) + 2.0,
                 0.5 * (a["base_left"][1] - a["base_right"][1]) + 2.0, 45.0 * size)
        skull = _smin(d, _ellipsoid(world, centre, radii), 6.0)  # outer skull surface, negative inside
        face = _ramp(z, z_base + 2.0, z_base - 8.0) * _ramp(x, front_x - 45.0 * size, front_x - 25.0 * size)

        # scalp soft tissue over the skull, air beyond
        hu = np.full(d.shape, -1000.0, np.float32)
        tissue_hu = np.float32(rng.uniform(30.0, 45.0)) + 8.0 * smooth_noise(rng, d.shape, 3.0 / spacing)
        hu += (tissue_hu - hu) * soft_inside(skull - rng.uniform(4.0, 6.0), edge)

        # brain: cortex brighter than the (less myelinated) white matter, CSF under the bone, ventricles
        bone_t, csf_t = rng.uniform(2.0, 4.0), rng.uniform(1.5, 3.0)
        brain_hu = (np.float32(36.0) + 3.0 * smooth_noise(rng, d.shape, 6.0 / spacing)
                    - 8.0 * soft_inside(skull + (bone_t + csf_t + 12.0), 4.0))
        brain_centre = centre + np.array([-5.0 * size, 0.0, 0.5 * (a["vertex"][2] - z_base)], np.float32)
        for side in (1.0, -1.0):
            c = brain_centre + np.array([0.0, side * 9.0 * size, 0.0], np.float32)
            r = (30.0 * size, 4.5 * size, 9.0 * size)
            paint(brain_hu, c, r[0], lambda q: _ellipsoid(q, c, r, yaw_deg=side * 12.0), 5.0)
        brain_hu += (5.0 - brain_hu) * soft_inside(-(skull + (bone_t + csf_t)), edge)  # CSF layer under the bone
        interior = brain_hu * (1 - face) + tissue_hu * face  # face soft tissue in front, under the base
        inner = soft_inside(skull + bone_t, edge)
        hu += (interior - hu) * inner

        # skull bone: a thin shell (outer table, thin diploe, inner table), not on the facial side
        bone_hu = np.float32(rng.uniform(750.0, 1100.0)) + 50.0 * smooth_noise(rng, d.shape, 2.0 / spacing)
        bone_w = (soft_inside(skull, edge) - inner) * (1 - face)
        shell = np.flatnonzero(bone_w > 1e-3)  # sutures and diploe only matter in the shell
        q, s = world.reshape(-1, 3)[shell], skull.ravel()[shell]
        diploe = soft_inside(np.abs(s + 0.5 * bone_t) - bone_t / 6.0, edge)
        # open sutures (fibrous, like soft tissue) and the anterior fontanelle, which closes with age
        width = rng.uniform(0.8, 1.5)
        bregma, lam = a["bregma"], a["lambda"]
        gaps = [np.where((q[:, 0] < bregma[0]) & (q[:, 0] > lam[0]), np.abs(q[:, 1] - bregma[1]), 1e3),  # sagittal
                np.abs((q[:, 0] - bregma[0]) + 0.25 * (q[:, 2] - bregma[2])) / np.hypot(1.0, 0.25),  # coronal
                np.abs((q[:, 0] - lam[0]) + 0.7 * (q[:, 2] - lam[2])) / np.hypot(1.0, 0.7)]  # lambdoid
        suture = np.maximum.reduce([soft_inside(gap - 0.5 * width, edge) for gap in gaps])
        suture *= _ramp(q[:, 2], z_base + 8.0, z_base + 18.0)
        fontanelle = max(3.0, 14.0 - 0.8 * (p["age_exact_months"] - 5.0)) * size
        suture = np.maximum(suture, soft_inside(np.linalg.norm(q - bregma, axis=1) - fontanelle, 2.0))
        w = bone_w.ravel()[shell] * (1 - suture)
        value = bone_hu.ravel()[shell] - 250.0 * diploe
        flat = hu.reshape(-1)  # a view: writing it writes hu
        flat[shell] += (value - flat[shell]) * w

        # skull base and face under the cut: petrous ridges, clivus, orbits (fat, globe, bony walls),
        # nasal cavity and maxilla; positions follow the deformed base anchors and size
        def at(dx, dy, dz):
            return np.array([centre[0] + dx * size, centre[1] + dy * size, z_base + dz * size], np.float32)

        orbit_r = 13.0 * size
        for side in (1.0, -1.0):
            c, r = at(-15.0, side * 30.0, -6.0), (24.0 * size, 7.0 * size, 7.0 * size)
            paint(hu, c, r[0], lambda q: _ellipsoid(q, c, r, yaw_deg=side * -45.0), 1300.0)
            o = np.array([front_x - 14.0 * size, centre[1] + side * 19.0 * size, z_base - 12.0 * size], np.float32)
            # orbital wall: a bony shell open at the front; fat inside; the globe in front
            paint(hu, o, orbit_r + 3.0,
                  lambda q: np.maximum(np.abs(np.linalg.norm(q - o, axis=-1) - orbit_r - 1.0) - 1.0,
                                       (q[..., 0] - o[0]) - 0.6 * orbit_r), 800.0)
            paint(hu, o, orbit_r, lambda q: np.linalg.norm(q - o, axis=-1) - orbit_r, -80.0)
            globe = o + np.array([4.0 * size, 0.0, 0.0], np.float32)
            paint(hu, globe, 9.0 * size, lambda q: np.linalg.norm(q - globe, axis=-1) - 9.0 * size, 15.0)
        c, r = at(-2.0, 0.0, -12.0), (20.0 * size, 9.0 * size, 8.0 * size)
        paint(hu, c, r[0], lambda q: _ellipsoid(q, c, r),
              lambda shape: 700.0 + 80.0 * smooth_noise(rng, shape, 1.5 / spacing))
        nose = np.array([front_x - 14.0 * size, centre[1], z_base - 12.0 * size], np.float32)
        c, r = nose + np.array([-6.0, 0.0, -26.0], np.float32) * size, (16.0 * size, 24.0 * size, 13.0 * size)
        paint(hu, c, r[1], lambda q: _ellipsoid(q, c, r), 550.0)
        c, r = nose + np.array([-2.0, 0.0, -8.0], np.float32) * size, (14.0 * size, 6.0 * size, 14.0 * size)
        paint(hu, c, r[0], lambda q: _ellipsoid(q, c, r), -900.0)

        hu = blur(hu, scan.grid, 0.6 * spacing)
        hu += rng.normal(0.0, rng.uniform(15.0, 40.0), size=hu.shape).astype(np.float32)
        return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    def cohort_tables(self, rng: np.random.Generator, subjects: pd.DataFrame,
                      ground_truth: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """Expert ratings of trigonocephaly: every rater rates every subject on a 5-point scale.

        Ordinal-threshold model: rater r perceives a_r * latent + b_r + N(0, sd_r) and
        reports 1 + the number of fixed thresholds it exceeds (1 normal ... 5 severe).
        Raters differ in bias b_r, discrimination a_r and noise sd_r.
        """
        latent = ground_truth.set_index("id").loc[subjects["id"], "latent_severity"].to_numpy(float)
        bias = rng.normal(0.0, 0.07, N_RATERS)
        discrimination = np.exp(rng.normal(0.0, 0.15, N_RATERS))
        noise = rng.uniform(0.08, 0.22, N_RATERS)
        perceived = (discrimination[:, None] * latent[None, :] + bias[:, None]
                     + noise[:, None] * rng.standard_normal((N_RATERS, len(latent))))
        rating = 1 + (perceived[..., None] > RATING_THRESHOLDS).sum(-1)  # (rater, subject)
        raters = [f"rater_{r + 1:02d}" for r in range(N_RATERS)]
        table = pd.DataFrame({
            "subject": np.tile(subjects["id"].to_numpy(), N_RATERS),
            "rater": np.repeat(raters, len(latent)),
            "rating": rating.ravel().astype(int),
        })
        return {"ratings": table}
