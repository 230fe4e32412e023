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

from functools import cached_property

import numpy as np
import pandas as pd

from . import geometry as g
from .anatomy import Anatomy, Scan
from .imaging import blur, smooth_noise, soft_inside

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
NARROWING = 0.30  # forehead y compression at the very front
WIDENING = 0.12  # compensatory posterior y widening

TAPER_SD = 0.04  # normal forehead narrowness (same field as the trigonocephalic narrowing)
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
    "frontal_left": ((0, 0, 0), _direction(40, 20)),  # lateral forehead: bifrontal width
    "frontal_right": ((0, 0, 0), _direction(-40, 20)),
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
    """Approximate signed distance (float32) to an ellipsoid turned by `yaw_deg` about z."""
    c, s = np.cos(np.deg2rad(yaw_deg)), np.sin(np.deg2rad(yaw_deg))
    rel = points - np.asarray(center, np.float32)
    u = (c * rel[..., 0] + s * rel[..., 1]) / radii[0]
    v = (-s * rel[..., 0] + c * rel[..., 1]) / radii[1]
    w = rel[..., 2] / radii[2]
    return (np.sqrt(u * u + v * v + w * w) - 1.0) * np.float32(min(radii))


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


class Metopic(Anatomy):
    name = "metopic"
    modality = "CT"
    groups = ("control", "metopic")
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
            "age_months": age,
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
        return {"age_months": round(params["age_months"], 1), "sex": "M" if params["male"] else "F"}

    def render(self, rng: np.random.Generator, scan: Scan) -> np.ndarray:
        """CT in Hounsfield units: scalp, a thin infant skull with open sutures and anterior
        fontanelle, CSF and brain inside; below the cut plane the skull continues down
        around skull-base and facial structures, so the cut itself leaves no mark."""
        world = scan.world_points
        d = scan.distance
        spacing = min(scan.grid.spacing)
        edge = 0.5 * spacing
        p = scan.params
        size = p["size_scale"]
        a = {k: v.astype(np.float32) for k, v in scan.anchors.items()}
        x, y, z = world[..., 0], world[..., 1], world[..., 2]
        z_base = float(a["base_center"][2])
        front_x = float(a["nasion"][0])

        # the skull outside the segmented vault: a half-ellipsoid under the base, blended with the vault
        centre = 0.5 * (a["nasion"] + a["base_back"])
        centre[1] = 0.5 * (a["base_left"][1] + a["base_right"][1])
        centre[2] = z_base
        radii = (0.5 * (a["nasion"][0] - a["base_back"][0]) + 2.0,
                 0.5 * (a["base_left"][1] - a["base_right"][1]) + 2.0, 45.0 * size)
        skull = _smin(d, _ellipsoid(world, centre, radii), 6.0)  # outer skull surface, negative inside
        below = g.smoothstep(z, z_base + 2.0, z_base - 8.0).astype(np.float32)
        face = below * g.smoothstep(x, front_x - 45.0 * size, front_x - 25.0 * size).astype(np.float32)

        # scalp soft tissue over the skull, air beyond
        scalp = rng.uniform(4.0, 6.0)
        hu = np.full(d.shape, -1000.0, np.float32)
        tissue_hu = rng.uniform(30.0, 45.0) + 8.0 * smooth_noise(rng, d.shape, 3.0 / spacing)
        in_head = soft_inside(skull - scalp, edge)
        hu += (tissue_hu - hu) * in_head

        # brain: cortex brighter than the (less myelinated) white matter, CSF under the bone, ventricles
        bone_t = rng.uniform(2.0, 4.0)
        csf_t = rng.uniform(1.5, 3.0)
        brain_hu = (36.0 + 3.0 * smooth_noise(rng, d.shape, 6.0 / spacing)
                    - 8.0 * soft_inside(skull + bone_t + csf_t + 12.0, 4.0))
        vertex = a["vertex"]
        brain_centre = np.array([centre[0] - 5.0 * size, centre[1], z_base + 0.5 * (vertex[2] - z_base)], np.float32)
        for side in (1.0, -1.0):
            ventricle = _ellipsoid(world, brain_centre + np.float32(side * 9.0 * size) * np.array([0, 1, 0], np.float32),
                                   (30.0 * size, 4.5 * size, 9.0 * size), yaw_deg=side * 12.0)
            brain_hu += (5.0 - brain_hu) * soft_inside(ventricle, edge)
        brain_hu += (5.0 - brain_hu) * soft_inside(-bone_t - csf_t - skull, edge)  # CSF layer
        interior = brain_hu * (1 - face) + tissue_hu * face  # face soft tissue in front, under the base
        hu += (interior - hu) * soft_inside(skull + bone_t, edge)

        # skull bone: a thin shell (outer table, thin diploe, inner table), not on the facial side
        bone_hu = rng.uniform(750.0, 1100.0) + 50.0 * smooth_noise(rng, d.shape, 2.0 / spacing)
        bone_hu -= 250.0 * soft_inside(np.abs(skull + 0.5 * bone_t) - bone_t / 6, edge)
        bone_w = (soft_inside(skull, edge) - soft_inside(skull + bone_t, edge)) * (1 - face)
        # open sutures (fibrous, soft tissue) and the anterior fontanelle, which closes with age
        suture = rng.uniform(0.8, 1.5)
        bregma, lam = a["bregma"], a["lambda"]
        upper = g.smoothstep(z, z_base + 8.0, z_base + 18.0).astype(np.float32)
        gaps = [np.abs(y - bregma[1]) * np.where((x < bregma[0]) & (x > lam[0]), 1.0, 1e3),  # sagittal
                np.abs((x - bregma[0]) + 0.25 * (z - bregma[2])) / np.hypot(1.0, 0.25),  # coronal
                np.abs((x - lam[0]) + 0.7 * (z - lam[2])) / np.hypot(1.0, 0.7)]  # lambdoid
        open_w = np.maximum.reduce([soft_inside(gap - 0.5 * suture, edge) for gap in gaps]) * upper
        fontanelle = max(3.0, 14.0 - 0.8 * (p["age_months"] - 5.0)) * size
        open_w = np.maximum(open_w, soft_inside(np.linalg.norm(world - bregma, axis=-1) - fontanelle, 2.0))
        bone_w *= 1 - open_w
        hu += (bone_hu - hu) * bone_w

        # skull base and face under the cut: petrous ridges, clivus, orbits (fat, globe, bony walls),
        # nasal cavity and maxilla; positions follow the deformed base anchors and size
        def at(dx, dy, dz):
            return np.array([centre[0] + dx * size, centre[1] + dy * size, z_base + dz * size], np.float32)

        def orbit_at(dy):
            return np.array([front_x - 14.0 * size, centre[1] + dy * size, z_base - 12.0 * size], np.float32)

        for side in (1.0, -1.0):
            petrous = _ellipsoid(world, at(-15.0, side * 30.0, -6.0), (24.0 * size, 7.0 * size, 7.0 * size),
                                 yaw_deg=side * -45.0)
            hu += (1300.0 - hu) * soft_inside(petrous, edge)
            orbit = np.linalg.norm(world - orbit_at(side * 19.0), axis=-1) - 13.0 * size
            open_front = g.smoothstep((x - orbit_at(side * 19.0)[0]) / (13.0 * size), 0.5, 0.8).astype(np.float32)
            wall = (soft_inside(orbit - 2.0, edge) - soft_inside(orbit, edge)) * (1 - open_front)
            hu += (-80.0 - hu) * soft_inside(orbit, edge)
            globe = np.linalg.norm(world - orbit_at(side * 19.0) - np.float32(4.0 * size) * np.array([1, 0, 0], np.float32),
                                   axis=-1) - 9.0 * size
            hu += (15.0 - hu) * soft_inside(globe, edge)
            hu += (800.0 - hu) * wall
        clivus = _ellipsoid(world, at(-2.0, 0.0, -12.0), (20.0 * size, 9.0 * size, 8.0 * size))
        hu += (700.0 + 80.0 * smooth_noise(rng, d.shape, 1.5 / spacing) - hu) * soft_inside(clivus, edge)
        maxilla = _ellipsoid(world, orbit_at(0.0) + np.array([-6, 0, -26], np.float32) * size,
                             (16.0 * size, 24.0 * size, 13.0 * size))
        hu += (550.0 - hu) * soft_inside(maxilla, edge)
        nasal = _ellipsoid(world, orbit_at(0.0) + np.array([-2, 0, -8], np.float32) * size,
                           (14.0 * size, 6.0 * size, 14.0 * size))
        hu += (-900.0 - hu) * soft_inside(nasal, edge)

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
        noise = rng.uniform(0.05, 0.14, N_RATERS)
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
