"""Self-supervised landmarks from image registration (Bhalodia et al., MedIA 2021), in 3D.

A landmark encoder (shared by both images of a pair) places L landmarks on an image; with the
grid's 8 corners as fixed anchors, a thin-plate spline through the target's and the source's
landmarks maps the target grid onto the source (`landmark_warp`), the source image is sampled
there, and the image-match loss against the target (l2, local NCC or MIND-SSC) plus lambda times
the condition number of the spline system drives the landmarks to places that explain the
anatomy. No particle, no segmentation: the images are the only supervision.

What is the paper's and what is ours:
* paper: 3D encoder of 4 blocks of 2 convs (3^3, leaky ReLU) and a max-pool each, then fully
  connected layers to the landmark coordinates through tanh; the last layer's weight starts at
  zero and its bias uniform in (-1, 1), so every image starts with the same random landmarks;
  corner anchors; the loss L_match + lambda * kappa(A), kappa = ||A||_F ||A^-1||_F; a Tikhonov
  term on the kernel's diagonal that decays linearly from 1e-5 to 0 over the first epoch; Adam
  at 1e-4, fixed rate; the best validation epoch kept.
* ours: the spline's kernel is the 3D biharmonic U(r) = r (`tps.py`'s, so the warp of the
  augmentation and this one agree), not the paper's 2D r^2 log r; a batch norm after each conv
  (the paper's 3D channel counts and normalization are not given); coordinates of the spline are
  millimetres divided by the grid's largest half-extent, so that lambda and the Tikhonov term act
  on the scale the paper's normalised coordinates had whatever the voxel size; pairs are the
  images of a shuffled batch with the next one in it (a new pairing every epoch, never N^2 pairs
  in memory); validation pairs are fixed, each validation image with the next in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from .. import landmark_warp as lw
from . import register
from .interface import LANDMARKS, SEGMENTATIONS, TRAINING_IMAGES, Batch, DataSpec, Method, Phase

MATCH_LOSSES = ("l2", "ncc", "mind")


@dataclass(frozen=True)
class LandmarkSettings:
    n_landmarks: int
    epochs: int
    lr: float
    weight_decay: float
    match_loss: str
    condition_weight: float
    tikhonov: float
    warp_step: int
    ncc_window: int
    mind_dilation: int
    kept_landmarks: int
    supervision: str
    supervision_weight: float
    localization: bool
    mask_margin_mm: float
    network: dict


class LandmarkEncoder(nn.Module):
    """(B, 1, Z, Y, X) images -> (B, L, 3) landmarks in the spline's units (mm / `unit_mm`, from the first voxel),
    each inside the grid's box."""

    def __init__(self, input_shape, spacing, n_landmarks: int, channels, fc_size: int):
        super().__init__()
        self.input_shape, self.spacing = tuple(int(s) for s in input_shape), tuple(float(s) for s in spacing)
        self.n_landmarks, self.channels, self.fc_size = int(n_landmarks), [int(c) for c in channels], int(fc_size)
        layers, width, size = [], 1, np.array(self.input_shape)
        for out in self.channels:
            for k in range(2):
                layers += [nn.Conv3d(width if k == 0 else out, out, 3, padding=1), nn.BatchNorm3d(out),
                           nn.LeakyReLU(0.1)]
            layers.append(nn.MaxPool3d(2, ceil_mode=True))
            width, size = out, -(-size // 2)
        self.features = nn.Sequential(*layers)
        self.hidden = nn.Linear(width * int(np.prod(size)), self.fc_size)
        self.out = nn.Linear(self.fc_size, 3 * self.n_landmarks)
        # the paper's start: every image gets the same random landmarks, which the images then move
        nn.init.zeros_(self.out.weight)
        nn.init.uniform_(self.out.bias, -1.0, 1.0)
        extent = (np.array(self.input_shape[::-1]) - 1) * np.array(self.spacing)  # x, y, z mm
        self.unit_mm = float(extent.max() / 2)
        self.register_buffer("half_extent", torch.tensor(extent / 2 / self.unit_mm, dtype=torch.float32))
        # where the match loss looks (the localised variant: set from the training segmentations by `prepare`)
        self.register_buffer("mask", torch.ones((1, 1, *self.input_shape)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = F.leaky_relu(self.hidden(self.features(images).flatten(1)), 0.1)
        unit = torch.tanh(self.out(hidden)).view(len(images), self.n_landmarks, 3)
        return self.half_extent * (unit + 1.0)

    def corners(self) -> torch.Tensor:
        """(8, 3) the grid's corners in the spline's units: the fixed anchors."""
        spacing = [s / self.unit_mm for s in self.spacing]
        return lw.corner_anchors(self.input_shape, spacing).to(self.half_extent)

    def unit_spacing(self) -> tuple[float, float, float]:
        return tuple(s / self.unit_mm for s in self.spacing)


def supervision_maps(kind: str, segmentations: torch.Tensor, model: LandmarkEncoder) -> torch.Tensor:
    """The weak variant's maps of a batch (B, 1, Z, Y, X) from its segmentations (B, Z, Y, X, fractions): the
    fractions themselves, or the signed distance to the anatomy's surface (negative inside) in the spline's
    units, so that a near miss costs less than a far one."""
    if kind == "segmentation":
        return segmentations.unsqueeze(1)
    inside = segmentations.detach().cpu().numpy() >= 0.5
    sampling = model.spacing[::-1]  # z, y, x
    distance = np.stack([ndimage.distance_transform_edt(~mask, sampling=sampling)
                         - ndimage.distance_transform_edt(mask, sampling=sampling) for mask in inside])
    scaled = torch.as_tensor(distance / model.unit_mm, dtype=segmentations.dtype, device=segmentations.device)
    return scaled.unsqueeze(1)


def localization_mask(data, spacing, margin_mm: float) -> torch.Tensor:
    """(1, 1, Z, Y, X) the localised variant's mask: the box around every training segmentation, grown by
    `margin_mm` and blurred (Gaussian, sigma margin / 2), peak 1; the paper's blurred box on the femur."""
    union = None
    for batch in data.segmentation_batches():
        found = (batch >= 0.5).any(0).cpu().numpy()
        union = found if union is None else union | found
    if union is None or not union.any():
        raise ValueError("the localised variant needs training segmentations with some anatomy in them")
    zyx_spacing = np.asarray(spacing[::-1], dtype=np.float64)
    grow = np.ceil(margin_mm / zyx_spacing).astype(int)
    box = np.zeros(union.shape, np.float64)
    low = [max(0, int(i.min()) - g) for i, g in zip(np.nonzero(union), grow)]
    high = [min(n, int(i.max()) + g + 1) for i, g, n in zip(np.nonzero(union), grow, union.shape)]
    box[tuple(slice(a, b) for a, b in zip(low, high))] = 1.0
    blurred = ndimage.gaussian_filter(box, sigma=margin_mm / 2 / zyx_spacing)
    return torch.as_tensor(blurred / blurred.max(), dtype=torch.float32)[None, None]


def pair_targets(n: int) -> torch.Tensor:
    """Index of each image's partner in a batch of n: the next one, the last with the first."""
    return torch.roll(torch.arange(n), -1)


class LandmarksMethod(Method):
    summary = ("Self-supervised landmarks (Bhalodia et al., MedIA 2021) in 3D: landmarks learnt from pairs of "
               "images by registering one onto the other through a thin-plate spline; no particles needed.")
    Settings = LandmarkSettings
    needs = frozenset({TRAINING_IMAGES})
    capabilities = frozenset({LANDMARKS})
    schema = {
        "n_landmarks": {"description": "Landmarks learnt per image, besides the 8 fixed corners (paper: 72-92).",
                        "type": "integer", "minimum": 1, "default": 32},
        "epochs": {"description": "Training epochs (each pairs every training image once).", "type": "integer",
                   "minimum": 2, "default": 30},
        "lr": {"description": "Adam learning rate, fixed (paper 1e-4).", "type": "number", "exclusiveMinimum": 0,
               "default": 1.0e-4},
        "weight_decay": {"description": "Adam weight decay (paper 0).", "type": "number", "minimum": 0, "default": 0.0},
        "match_loss": {"description": "Image match after the warp: l2, local NCC or MIND-SSC (paper: l2 for metopic "
                                      "and femur, MIND for the left atrium).", "enum": list(MATCH_LOSSES),
                       "default": "l2"},
        "condition_weight": {"description": "lambda: weight of the spline system's condition number (paper: 1e-5 "
                                            "metopic, 1e-6 femur, 1e-7 left atrium).", "type": "number",
                             "minimum": 0, "default": 1.0e-6},
        "tikhonov": {"description": "Tikhonov term on the spline kernel's diagonal at the first step, decaying "
                                    "linearly to 0 over the first epoch (paper 1e-5).", "type": "number",
                     "minimum": 0, "default": 1.0e-5},
        "warp_step": {"description": "The spline is evaluated on every step-th voxel and interpolated in between "
                                     "(1: on every voxel).", "type": "integer", "minimum": 1, "default": 2},
        "ncc_window": {"description": "Local NCC window (voxels, odd).", "type": "integer", "minimum": 3,
                       "default": 3},
        "mind_dilation": {"description": "MIND-SSC neighbour distance (voxels).", "type": "integer", "minimum": 1,
                          "default": 2},
        "kept_landmarks": {"description": "Landmarks kept by the redundancy removal after training (0: half of "
                                          "n_landmarks, the paper's ratio).", "type": "integer", "minimum": 0,
                           "default": 0},
        "supervision": {"description": "Weak supervision (landmarks_weak): the training segmentations (fractions) "
                                       "or their signed distance transforms, warped with each image and matched "
                                       "(l2) with the partner's; none for the images alone.",
                        "enum": ["none", "segmentation", "distance"], "default": "distance"},
        "supervision_weight": {"description": "beta: weight of the weak supervision's match loss.", "type": "number",
                               "minimum": 0, "default": 1.0},
        "localization": {"description": "The localised variant (landmarks_weak): the match losses only look inside a "
                                        "blurred box around the training segmentations (the paper's femur mask).",
                         "type": "boolean", "default": False},
        "mask_margin_mm": {"description": "Localised variant: the box's margin around the training segmentations, "
                                          "and twice its blur's sigma (mm). The preprocess grid is already the "
                                          "training shapes' box plus preprocess.margin_mm: the mask only cuts "
                                          "something off with a smaller margin than that.",
                           "type": "number", "exclusiveMinimum": 0, "default": 5.0},
        "network": {"description": "Encoder size: channels of the 4 blocks and the hidden fully connected width.",
                    "type": "object", "additionalProperties": False, "default": {},
                    "properties": {"channels": {"type": "array", "items": {"type": "integer", "minimum": 1},
                                                "minItems": 4, "maxItems": 4},
                                   "fc_size": {"type": "integer", "minimum": 1}}},
    }
    smoke = {"n_landmarks": 6, "epochs": 2, "lr": 1.0e-3, "network": {"channels": [2, 2, 4, 4], "fc_size": 8}}
    validation_measure = "match loss after warp"

    # -- network

    def build(self, settings, spec: DataSpec) -> nn.Module:
        network = {"channels": [8, 16, 32, 64], "fc_size": 128, **settings.network}
        return LandmarkEncoder(spec.input_shape, spec.spacing, settings.n_landmarks, **network)

    def network_config(self, model) -> dict:
        return {"input_shape": list(model.input_shape), "spacing": list(model.spacing),
                "n_landmarks": model.n_landmarks, "channels": model.channels, "fc_size": model.fc_size}

    def rebuild(self, network, state) -> nn.Module:
        return LandmarkEncoder(**network)

    # -- training

    def phases(self, settings):
        return [Phase("train", settings.epochs, settings.lr, settings.weight_decay, schedule="constant")]

    def prepare(self, model, settings, data) -> dict:
        if settings.localization:
            model.mask.copy_(localization_mask(data, model.spacing, settings.mask_margin_mm).to(model.mask))
        return {"steps_per_epoch": -(-len(data.train_idx) // data.batch_size), "step": 0}

    def register_pairs(self, model, settings, images: torch.Tensor, regularization: float = 0.0,
                       guides: torch.Tensor | None = None) -> dict:
        """Each image of the batch warped onto its partner (`pair_targets`) through the landmarks the model puts
        on both: see `warp_onto`."""
        landmarks = model(images)
        partner = pair_targets(len(images)).to(images.device)
        return self.warp_onto(model, settings, images, images[partner], landmarks, landmarks[partner],
                              regularization, guides, None if guides is None else guides[partner])

    def warp_onto(self, model, settings, moving: torch.Tensor, fixed: torch.Tensor, moving_landmarks: torch.Tensor,
                  fixed_landmarks: torch.Tensor, regularization: float = 0.0, moving_guides=None,
                  fixed_guides=None) -> dict:
        """Moving images (B, 1, Z, Y, X) warped onto fixed ones by the spline through their landmarks (B, L, 3, in
        the spline's units: the model's own, or a subset of them) and the grid's corners: the warped images,
        the fixed ones, the match loss per pair and the condition number of each pair's spline system; with
        guide maps (the weak variant's, B, 1, Z, Y, X), "guide_match": their l2 match after the same warp."""
        corners = model.corners().expand(len(moving), -1, -1)
        source = torch.cat([moving_landmarks, corners], 1)
        target = torch.cat([fixed_landmarks, corners], 1)
        # the map target -> source: each fixed voxel looks up where its anatomy is in the moving image
        spline = lw.fit_spline(target, source, regularization)
        warped = lw.warp(moving, spline, model.unit_spacing(), step=settings.warp_step)
        result = {"warped": warped, "fixed": fixed, "match": self.match(model, settings, warped, fixed),
                  "condition": lw.condition_number(spline.system)}
        if moving_guides is not None:
            moved = lw.warp(moving_guides, spline, model.unit_spacing(), step=settings.warp_step)
            result["guide_match"] = lw.match_loss("l2", moved, fixed_guides, self._mask(model, settings, len(moved)))
        return result

    def match(self, model, settings, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """(B,) the settings' match loss of each moving image against its fixed one (lower: more alike), inside
        the model's localization mask for the localised variant."""
        options = {"ncc": {"window": settings.ncc_window}, "mind": {"dilation": settings.mind_dilation}}
        return lw.match_loss(settings.match_loss, moving, fixed, self._mask(model, settings, len(moving)),
                             **options.get(settings.match_loss, {}))

    @staticmethod
    def _mask(model, settings, batch: int):
        return model.mask.expand(batch, -1, -1, -1, -1) if settings.localization else None

    def loss(self, model, settings, phase, batch: Batch, state) -> torch.Tensor:
        # the paper's Tikhonov warm-up: from `tikhonov` at the first step to 0 at the end of the first epoch
        warmup = max(0.0, 1.0 - state["step"] / max(1, state["steps_per_epoch"]))
        state["step"] += 1
        guides = None
        if settings.supervision != "none":
            guides = supervision_maps(settings.supervision, batch.segmentations, model)
        pairs = self.register_pairs(model, settings, batch.images, settings.tikhonov * warmup, guides)
        loss = pairs["match"].mean() + settings.condition_weight * pairs["condition"].mean()
        if guides is not None:  # the weak variant: the anatomy's maps must match too
            loss = loss + settings.supervision_weight * pairs["guide_match"].mean()
        return loss

    def validation_errors(self, model, settings, phase, batch: Batch, targets) -> np.ndarray:
        return self.register_pairs(model, settings, batch.images)["match"].double().cpu().numpy()

    def check(self, settings) -> list[str]:
        problems = super().check(settings)
        if settings.ncc_window % 2 == 0:
            problems.append(f"ncc_window must be odd, got {settings.ncc_window}")
        if settings.kept_landmarks > settings.n_landmarks:
            problems.append(f"kept_landmarks ({settings.kept_landmarks}) exceeds n_landmarks ({settings.n_landmarks})")
        return problems

    # -- inference

    def predict(self, model, images) -> torch.Tensor:
        """(B, L, 3) landmarks in mm from the grid's first voxel centre, x, y, z."""
        return model(images) * model.unit_mm



class WeakLandmarksMethod(LandmarksMethod):
    """The paper's variants that use the training segmentations: weak supervision (their maps warped and matched
    with the images'), the localization mask (the match looks only near the anatomy), or both."""

    summary = ("Self-supervised landmarks with the paper's weak supervision and/or localization mask, from the "
               "training segmentations (not needed at prediction).")
    needs = frozenset({TRAINING_IMAGES, SEGMENTATIONS})
    smoke = {**LandmarksMethod.smoke, "localization": True}  # the distance maps and the mask, both

    def check(self, settings) -> list[str]:
        problems = super().check(settings)
        if settings.supervision == "none" and not settings.localization:
            problems.append("neither supervision nor localization: that is the plain `landmarks` method")
        return problems


# the images alone; the variants that read the training segmentations
register("landmarks", LandmarksMethod(), fixed={"supervision": "none", "localization": False}, default=False)
register("landmarks_weak", WeakLandmarksMethod(), default=False)
