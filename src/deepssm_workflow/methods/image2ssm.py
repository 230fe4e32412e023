"""Localization-aware Image2SSM (Iyer, Adams, Elhabian, MIDL 2023; the authors' code is public as
j-void/LocalizedSSM): from an uncropped scan, segment the anatomy, crop around it, estimate its
rigid pose against the population with a spatial transformer, and predict the shape model from an
attention-weighted, aligned crop. Not to be confused with the other paper called Image2SSM (radial
basis function shape models from segmentations).

This module holds the network and its staged loss; the method's registration (its training data:
full-field scans, their segmentations and both particle frames) is the next step of issue 17.

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..localize import PoseRegressor, crop_offsets, crop_points, local_from_world, pose_loss, sample_physical
from ..models import ModelConfig, correspondence_loss, xavier_init
from .deepssm import BaseDeepSSM
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
                 seg_channels=(8, 16, 32), shift_scale_mm: float = 5.0):
        super().__init__()
        self.segmenter = xavier_init(SegmentationNet(seg_channels))
        self.pose = PoseRegressor(config, shift_scale_mm)
        self.shape = BaseDeepSSM(config, mean, basis)
        self.crop_mm = tuple(float(v) for v in crop_mm)
        self.crop_shape = tuple(config.input_shape)
        # (voxels, 3), not (D, H, W, 3): a 4-D buffer would break the engine's channels-last conversion
        self.register_buffer("offsets", crop_offsets(self.crop_mm, self.crop_shape).reshape(-1, 3))
        self.register_buffer("world_centre", torch.as_tensor(np.asarray(world_centre), dtype=torch.float32))

    def _attended_crop(self, scan, probability, origin, spacing, centre, rotation):
        points = crop_points(centre, rotation, self.offsets.view(*self.crop_shape, 3))
        image = sample_physical(scan, origin, spacing, points)
        mask = sample_physical(probability, origin, spacing, points)
        return image * (1 + mask)

    def forward(self, scan: torch.Tensor, origin: torch.Tensor, spacing: torch.Tensor,
                teacher_pose: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """`scan` (B, 1, Z, Y, X) with `origin`, `spacing` (B, 3) mm; `teacher_pose` (R, c): crop the
        shape head's input at the true pose instead of the predicted one (teacher forcing)."""
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
        if term == "segmentation":
            terms[term] = segmentation_loss(outputs["logits"], segmentation)
        elif term == "pose":
            terms[term] = pose_loss(outputs["rotation"], outputs["centre"], world, local, world_centre)
        else:
            terms[term] = correspondence_loss(outputs[term], world if term == "world" else local)
    return sum(terms.values()), {k: float(v.detach()) for k, v in terms.items()}
