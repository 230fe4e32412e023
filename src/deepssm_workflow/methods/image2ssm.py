"""Localization-aware Image2SSM (Iyer, Adams, Elhabian, MIDL 2023; the authors' code is public as
j-void/LocalizedSSM): from an uncropped scan, segment the anatomy, crop around it, estimate its
rigid pose against the population with a spatial transformer, and predict the shape model from an
attention-weighted, aligned crop. Not to be confused with the other paper called Image2SSM (radial
basis function shape models from segmentations).

Registered as `image2ssm`; it trains on `full_field` preprocessing (scans/train.npz: uncropped scans,
their segmentations and both particle frames), the engine's points being the grid-frame particles.

What is the paper's (abstract and the authors' code): a 3D segmentation network on the whole scan;
a crop around the segmented anatomy; a spatial transformer aligning the crop with the population;
attention from the aligned segmentation; a DeepSSM head predicting world particles through a fixed
PCA layer; a staged schedule (segmentation first, then alignment, then shape). What is ours:

* Detection is the probability-weighted centroid of the voxels the segmentation calls inside (no
  gradient, as the authors' crop). A scan in which no voxel is called inside is reported as not
  found (`found` False), never cropped at an arbitrary place.
* The crop has a fixed physical size (`crop_mm`) and voxel count, so the network sees absolute size,
  which world particles keep; the released code crops the tight box of the mask and resizes it to a
  cube (discarding size), with a padding formula whose parentheses are misplaced.
* The pose is rigid by construction (`localize.PoseRegressor`: rotation vector and shift, identity at
  the start); the released code's 12 numbers could shear and scale. It is supervised by the pose that
  the subject's own local and world particles define (`localize.true_pose`, through `pose_loss`):
  every cohort with a shape model has it, where the released code matched the aligned mask to the
  mean shape's mask.
* The aligned crop is sampled at the predicted pose (differentiable: the shape losses train the
  pose too), or at the true pose when `teacher_pose` is given (teacher forcing, for the first shape
  epochs). Attention multiplies the aligned image by (1 + aligned mask probability): the anatomy
  counts double, the context stays visible (the released code adds the smoothed mask times the
  image's maximum).
* Local (scan-frame) particles are the world particles placed through the predicted pose
  (`localize.local_from_world`), so the losses can ask for both frames.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..localize import PoseRegressor, crop_offsets, crop_points, local_from_world, pose_loss, sample_physical
from ..models import ModelConfig, correspondence_loss, xavier_init
from . import register
from .deepssm import _NETWORK, BaseDeepSSM, _model_config, pca_layer_basis
from .interface import CORRESPONDENCES, LOCALIZES, SCANS, SHAPES, Method, Phase
from .progressive import segmentation_loss

STAGES = ("segmentation", "alignment", "shape")
# loss terms each stage adds (the authors' schedule: segmentation alone, then the alignment, then the points)
STAGE_TERMS = {"segmentation": ("segmentation",), "alignment": ("segmentation", "pose"),
               "shape": ("segmentation", "pose", "world", "local")}


def _block(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm3d(out_ch), nn.PReLU(),
                         nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm3d(out_ch), nn.PReLU())


class SegmentationNet(nn.Module):
    """A small 3D U-Net: (B, 1, Z, Y, X) scan -> (B, 1, Z, Y, X) logits of the anatomy. Any grid size:
    each decoder level is resized to its skip connection's size, so odd sizes need no padding."""

    def __init__(self, channels=(8, 16, 32)):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        self.down = nn.ModuleList(_block(i, o) for i, o in zip((1,) + channels[:-1], channels))
        self.up = nn.ModuleList(_block(deep + skip, skip) for deep, skip in zip(channels[:0:-1], channels[-2::-1]))
        self.out = nn.Conv3d(channels[0], 1, 1)

    def forward(self, scan: torch.Tensor) -> torch.Tensor:
        skips, x = [], scan
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else F.max_pool3d(x, 2, ceil_mode=True))
            skips.append(x)
        for block, skip in zip(self.up, skips[-2::-1]):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False),
                                 skip], 1))
        return self.out(x)


@torch.no_grad()
def detect_centre(logits: torch.Tensor, origin: torch.Tensor, spacing: torch.Tensor,
                  threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3) scan-frame centroid (mm) of the voxels whose probability exceeds `threshold`, weighted by
    it, and (B,) whether any voxel did; a scan with none gets its grid's centre and found False."""
    probability = torch.sigmoid(logits[:, 0].float())
    weight = probability * (probability > threshold)
    total = weight.flatten(1).sum(1)
    z, y, x = (torch.arange(n, dtype=weight.dtype, device=weight.device) for n in weight.shape[1:])
    index = torch.stack([(weight.sum((1, 2)) * x).sum(1), (weight.sum((1, 3)) * y).sum(1),
                         (weight.sum((2, 3)) * z).sum(1)], 1) / total.clamp(min=1e-12)[:, None]
    middle = torch.tensor(weight.shape[1:][::-1], dtype=weight.dtype, device=weight.device).sub(1).div(2)
    found = total > 0
    index = torch.where(found[:, None], index, middle.expand_as(index))
    return origin + index * spacing, found


class Image2SSMNet(nn.Module):
    """Scan -> segmentation, detection, pose, world and local particles (see the module's docstring).

    `crop_mm` (x, y, z) and `config.input_shape` (Z, Y, X) are the crop's physical size and voxels;
    `mean` (M, 3) and `basis` (K, 3M) the fixed PCA layer (`deepssm.pca_layer_basis`); `world_centre`
    the world point the crop is centred on (the mean shape's centroid)."""

    def __init__(self, config: ModelConfig, crop_mm, mean: np.ndarray, basis: np.ndarray, world_centre,
                 seg_channels=(8, 16, 32), shift_scale_mm: float = 5.0, scan_spacing=(1.0, 1.0, 1.0)):
        super().__init__()
        self.config, self.seg_channels, self.shift_scale_mm = config, tuple(seg_channels), float(shift_scale_mm)
        self.segmenter = xavier_init(SegmentationNet(seg_channels))
        self.pose = PoseRegressor(config, shift_scale_mm)
        self.shape = BaseDeepSSM(config, mean, basis)
        self.crop_mm = tuple(float(v) for v in crop_mm)
        self.crop_shape = tuple(config.input_shape)
        # (voxels, 3), not (D, H, W, 3): a 4-D buffer would break the engine's channels-last conversion
        self.register_buffer("offsets", crop_offsets(self.crop_mm, self.crop_shape).reshape(-1, 3))
        self.register_buffer("world_centre", torch.as_tensor(np.asarray(world_centre), dtype=torch.float32))
        # the voxel size of the scans it reads when no spacing is given (the scan grid of full_field.py)
        self.register_buffer("scan_spacing", torch.as_tensor(np.asarray(scan_spacing), dtype=torch.float32))

    def _attended_crop(self, scan, probability, origin, spacing, centre, rotation):
        points = crop_points(centre, rotation, self.offsets.view(*self.crop_shape, 3))
        image = sample_physical(scan, origin, spacing, points)
        mask = sample_physical(probability, origin, spacing, points)
        return image * (1 + mask)

    def forward(self, scan: torch.Tensor, origin: torch.Tensor | None = None, spacing: torch.Tensor | None = None,
                teacher_pose: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """`scan` (B, 1, Z, Y, X) with `origin`, `spacing` (B, 3) mm (default: the grid frame, first voxel
        at 0, `scan_spacing`); `teacher_pose` (R, c): crop the shape head's input at the true pose instead
        of the predicted one (teacher forcing)."""
        if scan.ndim == 4:
            scan = scan.unsqueeze(1)
        if origin is None:
            origin = scan.new_zeros(len(scan), 3)
        if spacing is None:
            spacing = self.scan_spacing.expand(len(scan), 3)
        logits = self.segmenter(scan)
        detected, found = detect_centre(logits, origin, spacing)
        probability = torch.sigmoid(logits).detach()  # the crops do not train the segmentation (as the authors')
        rotation, shift = self.pose(self._attended_crop(scan, probability, origin, spacing, detected, None))
        centre = detected + shift
        crop_rotation, crop_centre = teacher_pose if teacher_pose is not None else (rotation, centre)
        aligned = self._attended_crop(scan, probability, origin, spacing, crop_centre, crop_rotation)
        scores, world = self.shape(aligned)
        return {"logits": logits, "detected": detected, "found": found, "rotation": rotation, "centre": centre,
                "scores": scores, "world": world,
                "local": local_from_world(world, rotation, centre, self.world_centre)}


def image_to_world(rotation: torch.Tensor, centre: torch.Tensor, world_centre: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) homogeneous transforms of the pose (R, c) from the scan (grid) frame to the world frame:
    world = world_centre + R^T (local - c) (`localize.world_from_local`)."""
    matrix = torch.zeros(len(rotation), 4, 4, dtype=rotation.dtype, device=rotation.device)
    transposed = rotation.transpose(1, 2)
    matrix[:, :3, :3] = transposed
    matrix[:, :3, 3] = world_centre - torch.einsum("bij,bj->bi", transposed, centre)
    matrix[:, 3, 3] = 1
    return matrix


def staged_loss(outputs: dict, stage: str, segmentation: torch.Tensor, world: torch.Tensor,
                local: torch.Tensor, world_centre: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss of a batch in `stage` (STAGES): the sum of that stage's terms (STAGE_TERMS), and each
    term's value. Segmentation: BCE + soft Dice against the fraction of each voxel inside; pose: mean
    squared distance (mm^2) of the true world particles placed through the predicted pose from the
    true local ones; world and local: eq. 2 on the predicted particles in each frame."""
    if stage not in STAGE_TERMS:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    terms = {}
    for term in STAGE_TERMS[stage]:
        if term == "segmentation":  # (B, Z, Y, X) fractions, as the engine's batches hold them, or (B, 1, ...)
            target = segmentation.unsqueeze(1) if segmentation.ndim == 4 else segmentation
            terms[term] = segmentation_loss(outputs["logits"], target)
        elif term == "pose":
            terms[term] = pose_loss(outputs["rotation"], outputs["centre"], world, local, world_centre)
        else:
            terms[term] = correspondence_loss(outputs[term], world if term == "world" else local)
    return sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}


def crop_size_mm(mean: np.ndarray, margin_mm: float) -> tuple[float, float, float]:
    """The crop's side (a cube): the mean shape's bounding sphere about its centroid plus the margin on each
    side, so that the anatomy fits in any rotation (the first crop, at the detection, is not yet aligned)."""
    radius = float(np.linalg.norm(mean - mean.mean(0), axis=1).max())
    return (2 * (radius + margin_mm),) * 3


@dataclass(frozen=True)
class Image2SSMSettings:
    segmentation_epochs: int
    alignment_epochs: int
    shape_epochs: int
    lr: float
    shape_lr: float
    weight_decay: float
    crop_margin_mm: float
    crop_spacing_mm: float | None
    seg_channels: list
    shift_scale_mm: float
    network: dict


class Image2SSMMethod(Method):
    summary = ("Localization-aware Image2SSM (Iyer et al., MIDL 2023): segment, detect, crop, align (rigid spatial "
               "transformer) and predict world and scan-frame particles from an uncropped scan, no registration.")
    Settings = Image2SSMSettings
    schema = {
        "segmentation_epochs": {"description": "Epochs of the first stage: the segmentation alone.",
                                "type": "integer", "minimum": 0, "default": 10},
        "alignment_epochs": {"description": "Epochs of the second stage: segmentation and pose.",
                             "type": "integer", "minimum": 0, "default": 10},
        "shape_epochs": {"description": "Epochs of the last stage: segmentation, pose, world and scan-frame "
                                        "particles; only its epochs compete for the kept model.",
                         "type": "integer", "minimum": 1, "default": 20},
        "lr": {"description": "Adam learning rate of the segmentation and alignment stages, cosine-annealed "
                              "within each.", "type": "number", "exclusiveMinimum": 0, "default": 0.001},
        "shape_lr": {"description": "Adam learning rate of the shape stage. On the femur demo (a 44-voxel crop: "
                                    "41 k inputs to the first FC layer) its first epoch at 1e-3 threw the "
                                    "validation scan-frame RMSE to 209 mm, as the left atrium's wide layer did "
                                    "(see the README); hence 1e-4.",
                     "type": "number", "exclusiveMinimum": 0, "default": 0.0001},
        "weight_decay": {"description": "Adam weight decay.", "type": "number", "minimum": 0, "default": 0.0},
        "crop_margin_mm": {"description": "Margin around the mean shape's bounding sphere: the crop's side is its "
                                          "diameter plus twice this (room for shape variation and detection error).",
                           "type": "number", "minimum": 0, "default": 10.0},
        "crop_spacing_mm": {"description": "Voxel size of the crop (null: the scan grid's).",
                            "type": ["number", "null"], "exclusiveMinimum": 0, "default": None},
        "seg_channels": {"description": "Channels of the segmentation U-Net's levels.", "type": "array",
                         "items": {"type": "integer", "minimum": 1}, "minItems": 2, "default": [8, 16, 32]},
        "shift_scale_mm": {"description": "Scale of the pose regressor's shift output (mm per unit).",
                           "type": "number", "exclusiveMinimum": 0, "default": 5.0},
        "network": _NETWORK,
    }
    needs = frozenset({SCANS, SHAPES})
    capabilities = frozenset({CORRESPONDENCES, LOCALIZES})
    not_found = "no voxel was segmented as the anatomy: nothing to crop or align"
    smoke = {"segmentation_epochs": 1, "alignment_epochs": 1, "shape_epochs": 1, "seg_channels": [2, 4],
             "crop_margin_mm": 1.0, "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8]}}

    def build(self, settings, spec):
        space = spec.shape_space
        crop_mm = crop_size_mm(space.mean, settings.crop_margin_mm)
        step = settings.crop_spacing_mm or min(spec.spacing)
        crop_shape = tuple(max(8, int(np.ceil(side / step))) for side in crop_mm[::-1])  # (z, y, x)
        config = replace(_model_config(spec, settings.network, n_modes=space.n_modes), input_shape=crop_shape)
        return Image2SSMNet(config, crop_mm, space.mean, pca_layer_basis(space, space.n_modes), space.mean.mean(0),
                            settings.seg_channels, settings.shift_scale_mm, spec.spacing)

    def network_config(self, model):
        return {"config": asdict(model.config), "crop_mm": list(model.crop_mm),
                "seg_channels": list(model.seg_channels), "shift_scale_mm": model.shift_scale_mm}

    def rebuild(self, network, state):
        mean = state["shape.pca_bias"].cpu().numpy().reshape(-1, 3)
        return Image2SSMNet(ModelConfig(**network["config"]), network["crop_mm"], mean,
                            state["shape.pca_weight"].cpu().numpy().T, state["world_centre"].cpu().numpy(),
                            network["seg_channels"], network["shift_scale_mm"], state["scan_spacing"].cpu().numpy())

    def phases(self, settings):
        # the authors' order: segmentation first, then the alignment, then the shape
        return [Phase("segmentation", settings.segmentation_epochs, settings.lr, settings.weight_decay,
                      selects_best=False),
                Phase("alignment", settings.alignment_epochs, settings.lr, settings.weight_decay,
                      selects_best=False),
                Phase("shape", settings.shape_epochs, settings.shape_lr, settings.weight_decay)]

    def trainable(self, model, phase):
        parts = {"segmentation": (model.segmenter,), "alignment": (model.segmenter, model.pose),
                 "shape": (model.segmenter, model.pose, model.shape)}[phase.name]
        return [p for part in parts for p in part.parameters()]

    def loss(self, model, settings, phase, batch, state):
        loss, _ = staged_loss(model(batch.images), phase.name, batch.segmentations, batch.extra("world"),
                              batch.points, model.world_centre)
        return loss

    def validation_points(self, model, phase, batch):
        """The scan-frame particles: what a user gets, the pose's error included."""
        return model(batch.images)["local"]

    def predict(self, model, images):
        return model(images)["world"]

    def localize(self, model, images):
        out = model(images)
        return {"local": out["local"], "world": out["world"], "found": out["found"],
                "image_to_world": image_to_world(out["rotation"], out["centre"], model.world_centre),
                "probability": torch.sigmoid(out["logits"][:, 0])}

    def training_mean(self, model):
        return model.shape.pca_bias.detach().cpu().numpy().astype(np.float64).reshape(-1, 3)


register("image2ssm", Image2SSMMethod(), default=False)
