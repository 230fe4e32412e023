"""Progressive DeepSSM (Aziz, Adams, Elhabian, arXiv 2310.01529): coarse-to-fine image-to-shape
training with a segmentation task and deep supervision.

The paper is available here as its abstract only. What is the paper's: training over several
scales, each scale using the previous scale's output, a loss at every scale (deep
supervision), a segmentation task as a shape prior (multi-task learning). Everything below
that is ours:

* Scales are prefixes of one ordering of the M correspondences, the farthest-point order on
  the training mean shape (`deepssm_workflow.scales`): `scales` (default 64, 128, 256) and
  then all M points. The order is computed from the dataset's shape space when the network
  is built and kept in the model (a buffer), so a prediction never depends on the order the
  cohort listed its particles in.
* One shared image encoder (Base-DeepSSM's: conv stack and FC layers). Scale s has its own
  head: an MLP from [image features, the previous scale's prediction (its deviation from the
  mean shape, normalized)] to the whitened scores of a fixed PCA layer of the scale's own
  points. That PCA layer is the dataset's shape space restricted to the scale's points (the
  principal axes of the covariance of those coordinates under the shape space), so every
  scale, like Base-DeepSSM, can only produce shapes the training population spans; a free
  residual head could move each point on its own. Nothing of a scale's layer is trained.
* A segmentation decoder on the encoder's last feature maps (a 1x1 conv, trilinear upsampling
  to the input grid, two convs) predicts the anatomy's mask, trained with binary cross-entropy
  plus soft Dice against the preprocessed training segmentations (the fraction of each voxel
  inside the anatomy) weighted by `seg_weight`; test images never need one.
* Loss of a batch in stage s: the sum over the active scales 0..s of the correspondence loss of
  each (eq. 2, or the focal loss with the threshold measured on all training shapes), plus
  the segmentation loss.
* Schedule: one phase per stage, coarsest first; stage s trains the encoder, the segmentation
  decoder and the heads 0..s, and the finer heads stay untouched until their stage. A stage
  validates on its finest active scale, lifted to all M points (each missing point keeps the
  mean shape's offset from its nearest predicted one), so the log shows what the model can
  predict at that stage; only the last stage (all points) competes for the kept model.
* Ablations as settings: `seg_weight: 0` (no segmentation task) and `previous_input: false`
  (each head gets the mean shape, i.e. zeros, in place of the previous scale's prediction).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import ImageEncoder, ModelConfig, xavier_init
from ..scales import nested_order
from ..shape_space import ShapeSpace
from . import register
from .deepssm import _NETWORK, _SHARED, _loss, _model_config, _point_threshold
from .interface import (
    AUGMENTATION,
    CORRESPONDENCES,
    PCA_SCORES,
    SCALES,
    SEGMENTATION,
    SEGMENTATIONS,
    SHAPES,
    TRAINING_IMAGES,
    Batch,
    Method,
    Phase,
)

SEG_CHANNELS = 16


def scale_layer(space: ShapeSpace, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (n, 3), whitened basis (K_s, 3n)) of the shape space restricted to `points` (indices).

    The coordinates of those points vary, under the shape space, as sqrt(var) * basis restricted
    to them; its SVD gives their own principal axes, scaled by their standard deviations (the
    network then predicts unit-variance scores, as `deepssm.pca_layer_basis`)."""
    coordinates = (np.asarray(points)[:, None] * 3 + np.arange(3)).ravel()
    spread = np.sqrt(space.variances)[:, None] * space.basis[:, coordinates]
    _, sd, axes = np.linalg.svd(spread, full_matrices=False)
    keep = sd > sd[0] * 1e-6
    return space.mean[points], sd[keep, None] * axes[keep]


def nearest_in_prefix(mean: np.ndarray, size: int) -> np.ndarray:
    """For every point of `mean` (M, 3, nested order), the index of its nearest point among the first `size`."""
    d2 = ((mean[:, None, :] - mean[None, :size, :]) ** 2).sum(-1)
    return d2.argmin(1)


class ProgressiveDeepSSM(nn.Module):
    """Shared image encoder, one head and fixed PCA layer per scale, and a segmentation decoder.

    `order` (M,) is the nested order of the points (position -> point index); `sizes` the point
    counts of the scales, the last M; `layers` each scale's (mean, whitened basis)."""

    def __init__(self, config: ModelConfig, order: np.ndarray, sizes: list[int], layers: list[tuple],
                 head_hidden: int, previous_input: bool = True):
        super().__init__()
        if sizes[-1] != config.n_points or len(layers) != len(sizes):
            raise ValueError(f"scales {sizes} must end at all {config.n_points} points, one layer each")
        self.config, self.sizes, self.head_hidden = config, list(sizes), head_hidden
        self.previous_input = previous_input
        feature = config.fc_sizes[-1]
        self.encoder = ImageEncoder(config, feature)
        self.register_buffer("order", torch.as_tensor(np.asarray(order), dtype=torch.long))
        self.register_buffer("inverse_order", torch.argsort(self.order))
        mean_ordered = np.asarray(layers[-1][0], dtype=np.float64)  # the finest scale's mean: nested order
        self.heads = nn.ModuleList()
        for s, (mean, basis) in enumerate(layers):
            self.register_buffer(f"mean_{s}", torch.as_tensor(np.asarray(mean, np.float32).reshape(-1)))
            self.register_buffer(f"basis_{s}", torch.as_tensor(np.asarray(basis, np.float32)))
            # a typical coordinate deviation of the scale: the previous-scale input of the next head is divided by it
            self.register_buffer(f"spread_{s}", torch.tensor(float(np.sqrt((basis**2).sum() / basis.shape[1]))))
            # where the points this scale does not predict sit: their nearest predicted point, and the offset to it
            nearest = nearest_in_prefix(mean_ordered, sizes[s])
            self.register_buffer(f"lift_index_{s}", torch.as_tensor(nearest, dtype=torch.long))
            self.register_buffer(f"lift_offset_{s}", torch.as_tensor(
                (mean_ordered - mean_ordered[nearest]).astype(np.float32)))
            previous = 3 * sizes[s - 1] if s else 0
            self.heads.append(nn.Sequential(nn.Linear(feature + previous, head_hidden), nn.PReLU(),
                                            nn.Linear(head_hidden, basis.shape[0])))
        channels = self.encoder.feature_shape[0]
        self.seg_reduce = nn.Sequential(nn.Conv3d(channels, SEG_CHANNELS, 1), nn.PReLU())
        self.seg_out = nn.Sequential(nn.Conv3d(SEG_CHANNELS, SEG_CHANNELS // 2, 3, padding=1), nn.PReLU(),
                                     nn.Conv3d(SEG_CHANNELS // 2, 1, 1))
        xavier_init(self)

    def layer(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"mean_{s}"), getattr(self, f"basis_{s}")

    def mean_shape(self) -> torch.Tensor:
        """The training mean shape (M, 3), the cohort's order."""
        return self.layer(len(self.sizes) - 1)[0].view(-1, 3)[self.inverse_order]

    def scale_scores(self, image: torch.Tensor, last: int | None = None) -> tuple[list, torch.Tensor]:
        """(per scale 0..last: (whitened scores, points (B, n_s, 3) in nested order), conv feature maps)."""
        maps, features = self.encoder.encode(image)
        last = len(self.sizes) - 1 if last is None else last
        outputs, previous = [], None
        for s in range(last + 1):
            if s == 0:
                head_input = features
            else:
                prior_mean = getattr(self, f"mean_{s - 1}")
                deviation = (previous.flatten(1) - prior_mean) / getattr(self, f"spread_{s - 1}")
                if not self.previous_input:  # ablation: the mean shape in place of the previous prediction
                    deviation = torch.zeros_like(deviation)
                head_input = torch.cat([features, deviation], dim=1)
            scores = self.heads[s](head_input)
            mean, basis = self.layer(s)
            points = (mean + scores @ basis).view(len(scores), -1, 3)
            outputs.append((scores, points))
            previous = points
        return outputs, maps

    def segment(self, maps: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (B, Z, Y, X) on the input grid from the encoder's feature maps."""
        reduced = F.interpolate(self.seg_reduce(maps), size=self.config.input_shape, mode="trilinear",
                                align_corners=False)
        return self.seg_out(reduced)[:, 0]

    def lift(self, points: torch.Tensor, s: int) -> torch.Tensor:
        """Scale s's points (B, n_s, 3, nested order) -> all M points in the cohort's order."""
        full = points[:, getattr(self, f"lift_index_{s}")] + getattr(self, f"lift_offset_{s}")
        return full[:, self.inverse_order]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """All M points, the cohort's order, from the finest scale."""
        outputs, _ = self.scale_scores(image)
        return outputs[-1][1][:, self.inverse_order]


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss, against the fraction of each voxel inside the anatomy."""
    target = target.to(logits.dtype)
    probability = torch.sigmoid(logits)
    overlap = (probability * target).flatten(1).sum(1)
    dice = 2 * overlap / (probability.flatten(1).sum(1) + target.flatten(1).sum(1) + 1e-6)
    return F.binary_cross_entropy_with_logits(logits, target) + (1 - dice).mean()


@dataclass(frozen=True)
class ProgressiveSettings:
    scales: list
    stage_epochs: int
    final_epochs: int
    seg_weight: float
    previous_input: bool
    head_hidden: int
    lr: float
    weight_decay: float
    loss: str
    focal_percentile: float
    focal_a_points: float
    network: dict


class ProgressiveMethod(Method):
    summary = ("Progressive DeepSSM: coarse-to-fine heads on nested particle scales, each fed the previous "
               "scale's prediction, a loss at every scale and a segmentation task (arXiv 2310.01529; the "
               "design beyond the abstract is the workflow's, see methods/progressive.py).")
    Settings = ProgressiveSettings
    schema = {
        "scales": {"description": "Point counts of the coarse scales, increasing; the finest scale is always all "
                                  "M points. Each is a prefix of the farthest-point order on the mean shape.",
                   "type": "array", "items": {"type": "integer", "minimum": 4}, "minItems": 1,
                   "default": [64, 128, 256]},
        "stage_epochs": {"description": "Epochs of each coarse stage (stage s trains scales 0..s).",
                         "type": "integer", "minimum": 0, "default": 3},
        "final_epochs": {"description": "Epochs of the last stage (every scale, all points); only its epochs "
                                        "compete for the kept model.", "type": "integer", "minimum": 1,
                         "default": 9},
        "seg_weight": {"description": "Weight of the segmentation loss (BCE + soft Dice); 0 is the ablation "
                                      "without the segmentation task.", "type": "number", "minimum": 0,
                       "default": 1.0},
        "previous_input": {"description": "Feed each head the previous scale's prediction; false is the ablation "
                                          "with the mean shape in its place.", "type": "boolean", "default": True},
        "head_hidden": {"description": "Hidden width of each scale's head.", "type": "integer", "minimum": 1,
                        "default": 128},
        **_SHARED,
        "network": _NETWORK,
    }
    needs = frozenset({TRAINING_IMAGES, SHAPES, AUGMENTATION, SEGMENTATIONS})
    capabilities = frozenset({CORRESPONDENCES, PCA_SCORES, SCALES, SEGMENTATION})
    smoke = {"scales": [8, 16], "stage_epochs": 1, "final_epochs": 1, "head_hidden": 8,
             "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8]}}

    def check(self, settings):
        problems = super().check(settings)
        if list(settings.scales) != sorted(set(settings.scales)):
            problems.append(f"scales must be strictly increasing, got {list(settings.scales)}")
        return problems

    def build(self, settings, spec):
        sizes = [*settings.scales, spec.n_points]
        if sizes[-2] >= spec.n_points:
            raise ValueError(f"scales {list(settings.scales)} must have fewer points than the shapes' "
                             f"{spec.n_points}")
        order = nested_order(spec.shape_space.mean)
        layers = [scale_layer(spec.shape_space, order[:size]) for size in sizes]
        config = _model_config(spec, settings.network, n_modes=layers[-1][1].shape[0])
        return ProgressiveDeepSSM(config, order, sizes, layers, settings.head_hidden, settings.previous_input)

    def network_config(self, model):
        return {"model": asdict(model.config), "sizes": model.sizes, "head_hidden": model.head_hidden,
                "previous_input": model.previous_input}

    def rebuild(self, network, state):
        sizes = network["sizes"]
        layers = [(state[f"mean_{s}"].cpu().numpy().reshape(-1, 3), state[f"basis_{s}"].cpu().numpy())
                  for s in range(len(sizes))]
        return ProgressiveDeepSSM(ModelConfig(**network["model"]), state["order"].cpu().numpy(), sizes, layers,
                                  network["head_hidden"], network["previous_input"])

    def phases(self, settings):
        n = len(settings.scales) + 1
        return [Phase(f"stage{s + 1}", settings.final_epochs if s == n - 1 else settings.stage_epochs, settings.lr,
                      settings.weight_decay, selects_best=s == n - 1) for s in range(n)]

    @staticmethod
    def stage(phase: Phase) -> int:
        return int(phase.name.removeprefix("stage")) - 1

    def trainable(self, model, phase):
        active = self.stage(phase)
        for s, head in enumerate(model.heads):
            head.requires_grad_(s <= active)
        return [p for p in model.parameters() if p.requires_grad]

    def prepare(self, model, settings, data):
        return _point_threshold(settings, data)

    def loss(self, model, settings, phase, batch: Batch, state):
        outputs, maps = model.scale_scores(batch.images, self.stage(phase))
        ordered = batch.points[:, model.order]
        loss = sum(_loss(settings, points, ordered[:, :points.shape[1]], "points", state) for _, points in outputs)
        if settings.seg_weight > 0:
            loss = loss + settings.seg_weight * segmentation_loss(model.segment(maps), batch.segmentations)
        return loss

    def validation_points(self, model, phase, batch):
        outputs, _ = model.scale_scores(batch.images, self.stage(phase))
        return model.lift(outputs[-1][1], self.stage(phase))

    def predict(self, model, images):
        return model(images)

    def predict_scales(self, model, images) -> list[tuple[np.ndarray, torch.Tensor]]:
        """Per scale, coarse to fine: (the cohort's indices of its points, their predictions (B, n_s, 3))."""
        outputs, _ = model.scale_scores(images)
        order = model.order.cpu().numpy()
        return [(order[:points.shape[1]], points) for _, points in outputs]

    def predict_segmentation(self, model, images) -> torch.Tensor:
        """(B, Z, Y, X) probability of each voxel being inside the anatomy."""
        maps, _ = model.encoder.encode(images)
        return torch.sigmoid(model.segment(maps))

    def training_mean(self, model):
        return model.mean_shape().detach().cpu().numpy().astype(np.float64)

    def shape_code(self, model, shapes):
        """Least-squares whitened scores of the finest scale's PCA layer (exact for its own output)."""
        mean, basis = model.layer(len(model.sizes) - 1)
        offsets = shapes[:, model.order].reshape(len(shapes), -1).double() - mean.double()
        return torch.linalg.lstsq(basis.double().T, offsets.T).solution.T

    def image_code(self, model, images):
        outputs, _ = model.scale_scores(images)
        return outputs[-1][0]


register("progressive", ProgressiveMethod(), fixed={"loss": "l2"}, default=False)
register("progressive_focal", ProgressiveMethod(), fixed={"loss": "focal"}, default=False)
