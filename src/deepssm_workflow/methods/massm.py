"""MASSM (Ukey, Kataria, Elhabian, ShapeMI 2024): several anatomies from one uncropped scan. A 3D
detector finds each anatomy (heatmap peak plus offset, and its size); features pooled from several
levels around each detection, with the anatomy's code, drive a head that moves the anatomy's template,
placed at the detected centre, by a bounded displacement: the local (scan-frame) correspondences. The
world correspondences are the local ones rigidly fitted onto the template's world shape.

Data (the engine's): images (B, 1, Z, Y, X) on the scans' grid; points (B, K * M, 3), K blocks of M
scan-frame particles in mm from the grid's first voxel, an anatomy a scan lacks being nan; the extra
"world" (B, K * M, 3) likewise. K is the DataSpec's `n_anatomies` (a single-anatomy scan is K = 1).

What is the paper's (and its released code's, j-void/MASSM, read for what the paper leaves out): a
CenterNet detector on an FPN (heatmap per anatomy with focal loss, offset, size); ROI features from
several FPN levels plus a one-hot anatomy code; a local head whose output, bounded by a tanh scaled by
the anatomy's size, displaces the template placed at the detected centre; world particles from a
differentiable rigid fit of the local ones onto the template's world particles (the released code's
path; the paper's conditional VAE is not built); staged loss weights and teacher forcing. What is ours:

* Presence is the heatmap's peak against `presence_threshold`, at test time too: the released code
  took presence from the ground truth even when testing (and `b = 0`, `.to("cuda")` hard-coded; the
  heatmap loss and save/load refer to undefined names; it does not run as released). On the hip demo
  (40 training scans at 4 mm) the femurs' peaks told a present femur (peaks 0.37 and up) from an
  absent one (0.15), the bladder's did not (0.20-0.28 present, 0.21 absent). A presence head tried
  instead (coarsest FPN level pooled, binary cross-entropy) learned only the prior: 0.86-0.93 for
  every scan, absent or not, with about 7 % of the training scans lacking each anatomy. Not kept.
* The ROI is sampled (trilinear, `grid_sample`) on a regular grid of the detected box at each level,
  in place of crop + adaptive max-pool: the same fixed-size summary, differentiable in the centre.
* The template of an anatomy is its medoid training subject (closest world shape to the mean), as
  the paper's; its local particles are placed by their box centre at the detected centre.
* The rigid fit is `localize.rigid_fit` (Horn's quaternion): proper rotations only and finite
  gradients for symmetric shapes, where the released SVD fit's reflection fix edits the SVD output in
  place (an autograd error) and its gradient is infinite.
* The staged schedule is three phases (the paper ramps the weights epoch by epoch): `detect`
  (heatmap, offset, size: lambda_h = 1, lambda_r = 0.01, lambda_o = 1), `local` (adds the local loss,
  lambda_l = 2, lambda_h = 40, with the true centres instead of the detected ones for a
  `teacher_forcing` fraction of the anatomies: the paper's teacher forcing) and `joint` (adds the world
  loss, lambda_w = 2, detected centres only). Only the last phase's epochs compete for the kept model.
* The point losses are mean squared distances in mm^2: the paper's focal weighting
  e^2 / (1 + exp(a (c - |e|))) with c = 0.2 grid units is 1 for every error worth learning from.
  Measured on the tiny hip run (tests/test_massm.py): in cm^2 the local term was ~1/50 of the
  weighted heatmap term and the bladder's head never beat its template at the detection.
* The heads see only the cells over the scan: a replicate-padded cell once won the bladder's peak
  (80 mm off, at the grid's edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..localize import rigid_fit
from . import register
from .interface import CORRESPONDENCES, LOCALIZES, MULTI_ANATOMY, SCANS, Method, Phase

LEVELS = 3  # FPN levels, at strides 2, 4, 8 of the input grid
DETECTION_STRIDE = 2  # the heatmap's cell, in voxels
FOCAL_ALPHA, FOCAL_BETA = 3.0, 4.0  # the paper's heatmap focal loss
WEIGHTS = {  # the paper's staged loss weights, per phase
    "detect": {"heatmap": 1.0, "size": 0.01, "offset": 1.0, "local": 0.0, "world": 0.0},
    "local": {"heatmap": 40.0, "size": 0.01, "offset": 1.0, "local": 2.0, "world": 0.0},
    "joint": {"heatmap": 40.0, "size": 0.01, "offset": 1.0, "local": 2.0, "world": 2.0},
}


def _conv(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1), nn.InstanceNorm3d(out_ch, affine=True),
                         nn.LeakyReLU(0.1))


class Detector(nn.Module):
    """A small 3D FPN: levels at strides 2, 4, 8 (`channels` * 1, 2, 4), each brought to `fpn` channels,
    summed top-down; the heads on the stride-2 map: a heatmap per anatomy, offset (3) and size (3)."""

    def __init__(self, channels: int, fpn: int, n_anatomies: int):
        super().__init__()
        widths = [channels * 2**i for i in range(LEVELS)]
        self.stem = _conv(1, channels)
        self.down = nn.ModuleList(_conv(c_in, c_out, stride=2) for c_in, c_out in zip([channels, *widths], widths))
        self.lateral = nn.ModuleList(nn.Conv3d(c, fpn, 1) for c in widths)
        self.heatmap = nn.Sequential(_conv(fpn, fpn), nn.Conv3d(fpn, n_anatomies, 1))
        self.regression = nn.Sequential(_conv(fpn, fpn), nn.Conv3d(fpn, 6, 1))
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # CenterNet's prior: every cell starts at p = 0.1

    def forward(self, images: torch.Tensor):
        multiple = DETECTION_STRIDE * 2 ** (LEVELS - 1)
        pad = [p for n in reversed(images.shape[2:]) for p in (0, (-n) % multiple)]
        x = self.stem(F.pad(images, pad, mode="replicate"))
        levels = []
        for down in self.down:
            x = down(x)
            levels.append(x)
        pyramid = [self.lateral[-1](levels[-1])]
        for level, lateral in zip(reversed(levels[:-1]), reversed(self.lateral[:-1])):
            pyramid.insert(0, lateral(level) + F.interpolate(pyramid[0], size=level.shape[2:], mode="trilinear"))
        finest = pyramid[0]
        # the heads on the cells over the scan only: a padded cell must never win a peak
        cells = [slice(0, -(-n // DETECTION_STRIDE)) for n in images.shape[2:]]
        heatmap, regression = (head(finest)[(..., *cells)] for head in (self.heatmap, self.regression))
        return heatmap, regression[:, :3], regression[:, 3:], pyramid


def _cell_centres(shape, device) -> torch.Tensor:
    """(Z, Y, X, 3) voxel coordinates (x, y, z) of the detection cells' centres."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) * DETECTION_STRIDE + (DETECTION_STRIDE - 1) / 2
            for n in shape]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([x, y, z], -1)


def decode_peaks(heatmap_logits: torch.Tensor, offset: torch.Tensor, size: torch.Tensor):
    """Per scan and anatomy: the heatmap's peak probability (B, K), the centre (B, K, 3) in voxels (x, y, z)
    of the input grid (the peak cell's centre plus its offset, in cells) and the size (B, K, 3) (half extent
    in voxels) regressed there."""
    b, k = heatmap_logits.shape[:2]
    flat = heatmap_logits.flatten(2)
    peak, index = flat.max(-1)
    cells = _cell_centres(heatmap_logits.shape[2:], heatmap_logits.device).reshape(-1, 3)[index]  # (B, K, 3)
    take = index[:, :, None].expand(b, k, 3).transpose(1, 2)  # (B, 3, K)
    at_offset = offset.flatten(2).gather(2, take).transpose(1, 2)
    at_size = size.flatten(2).gather(2, take).transpose(1, 2)
    return torch.sigmoid(peak), cells + at_offset * DETECTION_STRIDE, F.softplus(at_size) * DETECTION_STRIDE


def roi_features(pyramid, centres: torch.Tensor, half_sizes: torch.Tensor, samples: int) -> torch.Tensor:
    """Features of each (B, K) box (centre and half size in input voxels, x y z): at FPN level i, a regular
    grid of max(1, samples / 2^i)^3 trilinear samples of the box; flattened and concatenated (B, K, F)."""
    b, k = centres.shape[:2]
    out = []
    for i, level in enumerate(pyramid):
        n = max(1, samples // 2**i)
        unit = (torch.arange(n, device=centres.device, dtype=torch.float32) + 0.5) / n * 2 - 1  # in (-1, 1)
        z, y, x = torch.meshgrid(unit, unit, unit, indexing="ij")
        offsets = torch.stack([x, y, z], -1).reshape(-1, 3)  # (n^3, 3)
        points = centres[:, :, None] + offsets * half_sizes[:, :, None]  # (B, K, n^3, 3) input voxels
        stride = DETECTION_STRIDE * 2**i
        extent = torch.tensor(level.shape[2:][::-1], device=centres.device, dtype=torch.float32)  # x, y, z cells
        normalized = (2 * ((points - (stride - 1) / 2) / stride) + 1) / extent - 1  # align_corners=False
        sampled = F.grid_sample(level, normalized.reshape(b, k, -1, 1, 3), mode="bilinear", padding_mode="border",
                                align_corners=False)  # (B, C, K, n^3, 1)
        out.append(sampled[..., 0].permute(0, 2, 1, 3).reshape(b, k, -1))
    return torch.cat(out, -1)


class MassmNet(nn.Module):
    def __init__(self, n_anatomies: int, n_points: int, channels: int, fpn: int, roi_samples: int, hidden: int,
                 presence_threshold: float, spacing, template_local: np.ndarray, template_world: np.ndarray,
                 training_mean: np.ndarray):
        super().__init__()
        self.n_anatomies, self.n_points, self.roi_samples = n_anatomies, n_points, roi_samples
        self.presence_threshold = float(presence_threshold)
        self.channels, self.fpn, self.hidden = channels, fpn, hidden
        self.detector = Detector(channels, fpn, n_anatomies)
        features = fpn * sum(max(1, roi_samples // 2**i) ** 3 for i in range(LEVELS)) + n_anatomies
        self.local_head = nn.Sequential(nn.Linear(features, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, hidden),
                                        nn.LeakyReLU(0.1), nn.Linear(hidden, 3 * n_points))
        nn.init.zeros_(self.local_head[-1].weight)  # the template itself to start
        nn.init.zeros_(self.local_head[-1].bias)
        self.register_buffer("spacing", torch.as_tensor(np.asarray(spacing), dtype=torch.float32))
        self.register_buffer("template_local", torch.zeros(n_anatomies, n_points, 3))  # about its box centre, mm
        self.register_buffer("template_world", torch.zeros(n_anatomies, n_points, 3))
        self.register_buffer("bound_mm", torch.ones(n_anatomies))  # the largest displacement per anatomy
        self.register_buffer("training_mean", torch.as_tensor(training_mean, dtype=torch.float32).reshape(-1, 3))
        self.set_templates(template_local, template_world)

    def set_templates(self, local: np.ndarray, world: np.ndarray) -> None:
        """Each anatomy's template: local particles (K, M, 3) placed at their box centre, world particles; the
        displacement bound is the template's largest half extent (the paper: twice the radius's maximum)."""
        local = torch.as_tensor(np.asarray(local, np.float64), dtype=torch.float32).reshape(self.template_local.shape)
        centre = (local.amax(1, keepdim=True) + local.amin(1, keepdim=True)) / 2
        self.template_local.copy_(local - centre)
        self.template_world.copy_(torch.as_tensor(np.asarray(world), dtype=torch.float32).reshape(local.shape))
        self.bound_mm.copy_((local - centre).abs().amax((1, 2)))

    def forward(self, images: torch.Tensor, centres_mm: torch.Tensor | None = None,
                sizes_mm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Detection, and the local and world particles at the detected boxes, or at `centres_mm` / `sizes_mm`
        (B, K, 3) where given (finite rows: teacher forcing)."""
        heatmap, offset, size, pyramid = self.detector(images)
        presence, centres, half = decode_peaks(heatmap, offset, size)
        detected_mm, detected_size_mm = centres * self.spacing, half * self.spacing
        centre_mm, size_mm = detected_mm, detected_size_mm
        if centres_mm is not None:
            forced = torch.isfinite(centres_mm).all(-1, keepdim=True)
            centre_mm = torch.where(forced, torch.nan_to_num(centres_mm), detected_mm)
            size_mm = torch.where(forced, torch.nan_to_num(sizes_mm), detected_size_mm)
        # the ROI: the box at the centre, at least the template's size (a small regressed size never starves it)
        half_box = torch.maximum(size_mm.detach(), self.bound_mm[None, :, None].expand_as(size_mm)) * 1.2
        b, k = centre_mm.shape[:2]
        features = roi_features(pyramid, centre_mm / self.spacing, half_box / self.spacing, self.roi_samples)
        code = torch.eye(k, device=images.device).expand(b, k, k)
        raw = self.local_head(torch.cat([features, code], -1)).view(b, k, self.n_points, 3)
        local = self.template_local + centre_mm[:, :, None] + self.bound_mm[None, :, None, None] * torch.tanh(raw)
        rotation, shift = rigid_fit(local.reshape(b * k, -1, 3), self.template_world.repeat(b, 1, 1))
        world = (torch.einsum("nij,nmj->nmi", rotation, local.reshape(b * k, -1, 3).double()) + shift[:, None])
        return {"heatmap": heatmap, "offset": offset, "size": size, "presence": presence,
                "centre_mm": detected_mm, "size_mm": detected_size_mm, "local": local,
                "world": world.to(local.dtype).view(b, k, self.n_points, 3),
                "image_to_world": _matrix(rotation, shift).to(local.dtype).view(b, k, 4, 4)}


def _matrix(rotation: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    matrix = torch.zeros(len(rotation), 4, 4, dtype=rotation.dtype, device=rotation.device)
    matrix[:, :3, :3], matrix[:, :3, 3], matrix[:, 3, 3] = rotation, shift, 1.0
    return matrix


def boxes(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From (B, K, M, 3) particles (nan: absent): presence (B, K), box centre and half extent (B, K, 3) in mm
    (nan where absent); the released code's centre and size are the particles' box too."""
    present = torch.isfinite(points).all(-1).all(-1)
    filled = torch.where(present[..., None, None], points, torch.zeros_like(points))
    high, low = filled.amax(2), filled.amin(2)
    nan = torch.full_like(high, float("nan"))
    centre = torch.where(present[..., None], (high + low) / 2, nan)
    return present, centre, torch.where(present[..., None], (high - low) / 2, nan)


def heatmap_targets(shape, present: torch.Tensor, centre_vox: torch.Tensor, half_vox: torch.Tensor) -> torch.Tensor:
    """(B, K, Z, Y, X): a Gaussian at each present anatomy's centre cell (sigma: a quarter of its mean half
    extent, in cells, at least one cell), exactly 1 at that cell; 0 everywhere for an absent anatomy."""
    cells = _cell_centres(shape, centre_vox.device)  # (Z, Y, X, 3)
    peak_cell = ((torch.nan_to_num(centre_vox) - (DETECTION_STRIDE - 1) / 2) / DETECTION_STRIDE).round()
    peak = peak_cell * DETECTION_STRIDE + (DETECTION_STRIDE - 1) / 2
    sigma = (torch.nan_to_num(half_vox).mean(-1) / 4 / DETECTION_STRIDE).clamp_min(1.0) * DETECTION_STRIDE
    squared = ((cells[None, None] - peak[:, :, None, None, None]) ** 2).sum(-1)
    gaussian = torch.exp(-squared / (2 * sigma[..., None, None, None] ** 2))
    return gaussian * present[..., None, None, None]


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (the paper's alpha 3, beta 4), per positive cell."""
    p = torch.sigmoid(logits).clamp(1e-6, 1 - 1e-6)
    positive = target >= 1 - 1e-6
    pos = -((1 - p) ** FOCAL_ALPHA * torch.log(p))[positive].sum()
    neg = -((1 - target) ** FOCAL_BETA * p**FOCAL_ALPHA * torch.log(1 - p))[~positive].sum()
    return (pos + neg) / positive.sum().clamp_min(1)


def massm_loss(model: MassmNet, phase: str, images: torch.Tensor, points: torch.Tensor, world: torch.Tensor,
               teacher_forcing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The phase's weighted sum of the heatmap, offset, size, local and world losses, and each term."""
    b, k = len(images), model.n_anatomies
    points, world = points.view(b, k, -1, 3), world.view(b, k, -1, 3)
    present, centre_mm, half_mm = boxes(points)
    forced = torch.rand(b, k, 1, device=images.device) < teacher_forcing if phase == "local" else None
    nan = torch.full_like(centre_mm, float("nan"))
    out = model(images, *((torch.where(forced, centre_mm, nan), torch.where(forced, half_mm, nan))
                          if forced is not None else (None, None)))
    heatmap = out["heatmap"]
    centre_vox, half_vox = centre_mm / model.spacing, half_mm / model.spacing
    terms = {"heatmap": focal_loss(heatmap, heatmap_targets(heatmap.shape[2:], present, centre_vox, half_vox))}
    # offset and size at each present anatomy's centre cell
    cell = ((torch.nan_to_num(centre_vox) - (DETECTION_STRIDE - 1) / 2) / DETECTION_STRIDE).round()
    cell = torch.minimum(cell.clamp_min(0), torch.tensor(heatmap.shape[2:][::-1], device=cell.device) - 1).long()
    flat = (cell[..., 2] * heatmap.shape[3] + cell[..., 1]) * heatmap.shape[4] + cell[..., 0]  # (B, K)
    take = flat[:, None].expand(b, 3, k)
    offset = out["offset"].flatten(2).gather(2, take).transpose(1, 2)
    size = F.softplus(out["size"].flatten(2).gather(2, take).transpose(1, 2)) * DETECTION_STRIDE
    offset_target = (torch.nan_to_num(centre_vox) - (cell * DETECTION_STRIDE + (DETECTION_STRIDE - 1) / 2)) \
        / DETECTION_STRIDE
    mask = present[..., None].float()
    n = mask.sum().clamp_min(1)
    terms["offset"] = ((offset - offset_target).abs() * mask).sum() / n
    terms["size"] = ((size - torch.nan_to_num(half_vox)).abs() * mask).sum() / n
    per_point = mask[..., None]
    terms["local"] = ((out["local"] - torch.nan_to_num(points)) ** 2 * per_point).sum() / (
        n * points.shape[2])
    terms["world"] = ((out["world"] - torch.nan_to_num(world)) ** 2 * per_point).sum() / (
        n * points.shape[2])
    weights = WEIGHTS[phase]
    return sum(weights[name] * value for name, value in terms.items()), terms


@dataclass(frozen=True)
class MassmSettings:
    detect_epochs: int
    local_epochs: int
    joint_epochs: int
    lr: float
    weight_decay: float
    channels: int
    fpn_channels: int
    roi_samples: int
    hidden: int
    teacher_forcing: float
    presence_threshold: float


class MassmMethod(Method):
    summary = ("MASSM (Ukey et al., ShapeMI 2024): detect every anatomy in an uncropped scan, predict each one's "
               "scan-frame particles from its template at the detection and its world particles by a rigid fit.")
    Settings = MassmSettings
    schema = {
        "detect_epochs": {"description": "Epochs of the first phase: heatmap, offset and size only.",
                          "type": "integer", "minimum": 0, "default": 10},
        "local_epochs": {"description": "Epochs of the second phase: adds the local particles, with teacher "
                                        "forcing of the centres.", "type": "integer", "minimum": 0, "default": 10},
        "joint_epochs": {"description": "Epochs of the last phase: adds the world particles, detected centres "
                                        "only; only its epochs compete for the kept model.",
                         "type": "integer", "minimum": 1, "default": 20},
        "lr": {"description": "Adam learning rate, cosine-annealed within each phase.", "type": "number",
               "exclusiveMinimum": 0, "default": 0.001},
        "weight_decay": {"description": "Adam weight decay.", "type": "number", "minimum": 0, "default": 0.0},
        "channels": {"description": "Channels of the detector's first level (doubled at each of its 3 levels; "
                                    "the paper's ResNet-101 FPN starts at 32).",
                     "type": "integer", "minimum": 1, "default": 8},
        "fpn_channels": {"description": "Channels of every FPN level (the paper's 20).", "type": "integer",
                         "minimum": 1, "default": 16},
        "roi_samples": {"description": "Samples per side of an anatomy's box at the finest level (halved at each "
                                       "coarser one; the paper pools 8, 4, 2, 1).",
                        "type": "integer", "minimum": 1, "default": 4},
        "hidden": {"description": "Width of the local head's hidden layers (the paper's 6144).", "type": "integer",
                   "minimum": 1, "default": 256},
        "teacher_forcing": {"description": "Fraction of the anatomies whose true centre and size, not the detected "
                                           "ones, place the template in the `local` phase.",
                            "type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
        "presence_threshold": {"description": "Heatmap peak above which an anatomy counts as present.",
                               "type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "default": 0.3},
    }
    needs = frozenset({SCANS})
    # LOCALIZES as the single-anatomy scan methods do (one anatomy per scan); several: `detect`
    capabilities = frozenset({CORRESPONDENCES, LOCALIZES, MULTI_ANATOMY})
    not_found = "the heatmap's peak stayed below presence_threshold: the anatomy was not detected"
    smoke = {"detect_epochs": 1, "local_epochs": 1, "joint_epochs": 1, "channels": 2, "fpn_channels": 4,
             "roi_samples": 2, "hidden": 8}

    def build(self, settings, spec):
        k = spec.n_anatomies
        m = spec.n_points // k
        mean = spec.shape_space.mean.reshape(k, m, 3)
        world = spec.world_mean if spec.world_mean is not None else spec.shape_space.mean
        return MassmNet(k, m, settings.channels, settings.fpn_channels, settings.roi_samples, settings.hidden,
                        settings.presence_threshold, spec.spacing, mean,
                        np.nan_to_num(np.asarray(world).reshape(k, m, 3)), spec.shape_space.mean)

    def network_config(self, model):
        return {"n_anatomies": model.n_anatomies, "n_points": model.n_points, "channels": model.channels,
                "fpn": model.fpn, "roi_samples": model.roi_samples, "hidden": model.hidden,
                "presence_threshold": model.presence_threshold}

    def rebuild(self, network, state):
        return MassmNet(network["n_anatomies"], network["n_points"], network["channels"], network["fpn"],
                        network["roi_samples"], network["hidden"], network["presence_threshold"],
                        state["spacing"].cpu().numpy(), state["template_local"].cpu().numpy(),
                        state["template_world"].cpu().numpy(), state["training_mean"].cpu().numpy())

    def prepare(self, model, settings, data):
        """Each anatomy's template: its medoid training subject (world shape closest to the anatomy's mean)."""
        local = np.concatenate([b.cpu().numpy() for b in data.point_batches()])
        world = np.concatenate([b.cpu().numpy() for b in data.extra_batches("world")])
        k = model.n_anatomies
        local, world = local.reshape(len(local), k, -1, 3), world.reshape(len(world), k, -1, 3)
        medoids = []
        for anatomy in range(k):
            present = np.flatnonzero(np.isfinite(world[:, anatomy]).all((1, 2)))
            if not len(present):
                raise ValueError(f"massm: anatomy {anatomy + 1} of {k} is absent from every training scan")
            shapes = world[present, anatomy]
            medoids.append(int(present[np.argmin(((shapes - shapes.mean(0)) ** 2).sum((1, 2)))]))
        model.set_templates(np.stack([local[i, a] for a, i in enumerate(medoids)]),
                            np.stack([world[i, a] for a, i in enumerate(medoids)]))
        return {"medoid_rows": [int(data.train_idx[i]) for i in medoids]}

    def phases(self, settings):
        return [Phase("detect", settings.detect_epochs, settings.lr, settings.weight_decay, selects_best=False),
                Phase("local", settings.local_epochs, settings.lr, settings.weight_decay, selects_best=False),
                Phase("joint", settings.joint_epochs, settings.lr, settings.weight_decay)]

    def trainable(self, model, phase):
        return list(model.detector.parameters()) if phase.name == "detect" else list(model.parameters())

    def loss(self, model, settings, phase, batch, state):
        return massm_loss(model, phase.name, batch.images, batch.points, batch.extra("world"),
                          settings.teacher_forcing)[0]

    def validation_errors(self, model, settings, phase, batch, targets):
        """Per scan, eq. 12 RMSE of the local particles from the detected boxes, averaged over its anatomies."""
        out = model(batch.images)
        predicted = out["local"].cpu().numpy().astype(np.float64)
        truth = targets.reshape(predicted.shape)
        squared = ((predicted - truth) ** 2).mean(2)  # (B, K, 3): over the points; nan where absent
        per_anatomy = np.sqrt(squared).mean(-1)
        return np.nanmean(per_anatomy, axis=1)

    def predict(self, model, images):
        out = model(images)
        return out["world"].reshape(len(images), -1, 3)

    def detect(self, model, images) -> dict[str, torch.Tensor]:
        """(B, 1, Z, Y, X) scans -> per anatomy (B, K, ...): "present" (peak above the threshold), "peak",
        "centre_mm" and "size_mm" (box centre and half extent, mm from the grid's first voxel), "local" and
        "world" particles and the rigid "image_to_world" (4x4) the world ones came from."""
        out = model(images)
        return {"present": out["presence"] > model.presence_threshold, "peak": out["presence"],
                "centre_mm": out["centre_mm"], "size_mm": out["size_mm"], "local": out["local"],
                "world": out["world"], "image_to_world": out["image_to_world"]}

    def localize(self, model, images):
        """One anatomy per scan (the single-anatomy full-field workflow): its local and world particles, the rigid
        fit's transform, and whether the heatmap found it."""
        if model.n_anatomies != 1:
            raise ValueError(f"massm: this model finds {model.n_anatomies} anatomies per scan; `localize` reports "
                             f"one: use `detect`")
        found = self.detect(model, images)
        return {"local": found["local"][:, 0], "world": found["world"][:, 0], "found": found["present"][:, 0],
                "image_to_world": found["image_to_world"][:, 0]}

    def training_mean(self, model):
        return model.training_mean.detach().cpu().numpy().astype(np.float64)


register("massm", MassmMethod(), default=False)
