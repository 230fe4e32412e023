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
  mean shape, normalized)] to a step in the whitened scores of a fixed PCA layer of the scale's
  own points. The step is taken from the previous scale's prediction, lifted to this scale's
  points (each new point keeps the mean shape's offset from its nearest coarser one) and
  projected onto the layer, so a finer scale refines what the coarser one said instead of
  predicting it again (measured on the accuracy test's tiny femur: predicting the scores
  afresh left the finest scale at 1.44 mm world RMSE where its coarser scales were at 1.23
  and 1.15 mm on their points). The PCA layer is the dataset's shape space restricted to the
  scale's points (the principal axes of the covariance of those coordinates under the shape
  space), so every scale, like Base-DeepSSM, can only produce shapes the training population
  spans; a free residual head could move each point on its own. Nothing of a layer is trained.
  Each head's output layer starts at zero: a scale joins its stage predicting no step, i.e.
  exactly the coarser prediction lifted to its points (scale 0: the mean shape). With random
  (Xavier) output layers, each new head's first steps were a large random shape change whose
  loss, summed with the others, sent large gradients into the shared encoder at every stage
  start (default femur demo: training loss 612 and validation RMSE 5.08 mm in the first epoch
  of the last stage). (The zero start was compared on a test split before the evidence
  protocol; its validation comparison is still to be made: CONTRIBUTING.md.)
* A segmentation decoder on the encoder's last feature maps (a 1x1 conv, trilinear upsampling
  to the input grid, two convs) predicts the anatomy's mask as a deviation from the mean
  training mask (its log-odds added to the logits: measured on the accuracy test's tiny femur,
  the decoder alone reached Dice 0.58 where the mean training mask alone scores 0.90-0.92),
  trained with binary cross-entropy
  plus soft Dice against the preprocessed training segmentations (the fraction of each voxel
  inside the anatomy) weighted by `seg_weight`; test images never need one.
* Loss of a batch in stage s: the sum over the active scales 0..s of the correspondence loss of
  each (eq. 2, or the focal loss with the threshold measured on all training shapes), plus
  the segmentation loss.
* Schedule: one phase per stage, coarsest first; stage s trains the encoder, the segmentation
  decoder and the heads 0..s, and the finer heads stay untouched until their stage. Each stage
  starts a fresh Adam, its lr ramped up over the stage's first epoch (`warmup_epochs`, default 1):
  a fresh Adam's first steps at the full rate shake the shared encoder as a new head does. Its
  evidence on the registered validation scans: the femur's `progressive_warmup` tuning sweep
  (config/config.yaml). A stage
  validates on its finest active scale, lifted to all M points (each missing point keeps the
  mean shape's offset from its nearest predicted one), so the log shows what the model can
  predict at that stage; only the last stage (all points) competes for the kept model.
* Ablations as settings: `seg_weight: 0` (no segmentation task) and `previous_input: false`
  (each head gets the mean shape in place of the previous scale's prediction, as input and as
  the start of its step).
* `progressive_tl` puts the same scheme on TL-DeepSSM: each scale has its own correspondence
  autoencoder (TL-DeepSSM's, on the scale's points) in place of the PCA layer, and its head
  predicts a step in that autoencoder's latent code (whitened by the trained codes, as
  TL-DeepSSM's T-flank) from the code of the lifted previous prediction. Phases:
  "autoencoder" (every scale's, no images, not selecting), the stages as above with the
  autoencoders frozen and a latent loss per active scale against the detached
  g_s(C_s), then "joint" (everything: the autoencoders' reconstruction losses plus the latent
  losses of every scale, plus the segmentation loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import ImageEncoder, ModelConfig, latent_focal_threshold, xavier_init
from ..scales import nested_order
from ..shape_space import ShapeSpace
from . import register
from .deepssm import _NETWORK, _SHARED, _TL_NETWORK, _loss, _model_config, _point_threshold, latent_whitening
from .interface import (
    AUGMENTATION,
    CORRESPONDENCES,
    LATENT_CODE,
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
SEG_PRIOR_CLIP = 0.02  # the mean mask's fractions kept in [0.02, 0.98] before their log-odds


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


class ScaleAutoencoder(nn.Module):
    """TL-DeepSSM's correspondence autoencoder on one scale's points (centred on their mean), with the
    fixed whitening its head's output goes through (set from the trained codes, `whiten`)."""

    def __init__(self, mean: np.ndarray, latent: int, hidden: int, slope: float):
        super().__init__()
        width = 3 * len(mean)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float32).reshape(-1)))
        self.encoder = nn.Sequential(nn.Linear(width, hidden), nn.LeakyReLU(slope), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.LeakyReLU(slope), nn.Linear(hidden, width))
        self.register_buffer("latent_shift", torch.zeros(latent))
        self.register_buffer("latent_transform", torch.eye(latent))

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        return self.encoder(points.flatten(1) - self.mean)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return (self.decoder(latent) + self.mean).view(len(latent), -1, 3)

    def whiten(self, codes: np.ndarray) -> None:
        shift, transform = latent_whitening(codes, self.latent_shift.numel())
        self.latent_shift.copy_(torch.as_tensor(shift))
        self.latent_transform.copy_(torch.as_tensor(transform))


class ProgressiveDeepSSM(nn.Module):
    """Shared image encoder, one head and fixed PCA layer per scale, and a segmentation decoder.

    `order` (M,) is the nested order of the points (position -> point index); `sizes` the point
    counts of the scales, the last M; `layers` each scale's (mean, whitened basis). With
    `autoencoders` (progressive_tl) each scale decodes its head's latent through its own
    autoencoder instead of the PCA layer (whose mean it still uses)."""

    def __init__(self, config: ModelConfig, order: np.ndarray, sizes: list[int], layers: list[tuple],
                 head_hidden: int, previous_input: bool = True, autoencoders: bool = False):
        super().__init__()
        if sizes[-1] != config.n_points or len(layers) != len(sizes):
            raise ValueError(f"scales {sizes} must end at all {config.n_points} points, one layer each")
        self.config, self.sizes, self.head_hidden = config, list(sizes), head_hidden
        self.previous_input, self.tl = previous_input, autoencoders
        feature = config.fc_sizes[-1]
        self.encoder = ImageEncoder(config, feature)
        self.register_buffer("order", torch.as_tensor(np.asarray(order), dtype=torch.long))
        self.register_buffer("inverse_order", torch.argsort(self.order))
        mean_ordered = np.asarray(layers[-1][0], dtype=np.float64)  # the finest scale's mean: nested order
        self.heads = nn.ModuleList()
        for s, (mean, basis) in enumerate(layers):
            self.register_buffer(f"mean_{s}", torch.as_tensor(np.asarray(mean, np.float32).reshape(-1)))
            self.register_buffer(f"basis_{s}", torch.as_tensor(np.asarray(basis, np.float32)))
            # least-squares scores of points in this layer: (3n, K_s), the pseudo-inverse of the basis
            self.register_buffer(f"projection_{s}", torch.as_tensor(np.linalg.pinv(basis).astype(np.float32)))
            # a typical coordinate deviation of the scale: the previous-scale input of the next head is divided by it
            self.register_buffer(f"spread_{s}", torch.tensor(float(np.sqrt((basis**2).sum() / basis.shape[1]))))
            # where the points this scale does not predict sit: their nearest predicted point, and the offset to it
            nearest = nearest_in_prefix(mean_ordered, sizes[s])
            self.register_buffer(f"lift_index_{s}", torch.as_tensor(nearest, dtype=torch.long))
            self.register_buffer(f"lift_offset_{s}", torch.as_tensor(
                (mean_ordered - mean_ordered[nearest]).astype(np.float32)))
            previous = 3 * sizes[s - 1] if s else 0
            out = config.latent_dim if autoencoders else basis.shape[0]
            self.heads.append(nn.Sequential(nn.Linear(feature + previous, head_hidden), nn.PReLU(),
                                            nn.Linear(head_hidden, out)))
        self.autoencoders = nn.ModuleList(
            [ScaleAutoencoder(mean, config.latent_dim, config.ae_hidden, config.leaky_slope) for mean, _ in layers]
            if autoencoders else [])
        # the mean training segmentation's log-odds (set by `prepare`): the decoder learns the deviation
        # from the average anatomy, as a PCA layer's scores do from the mean shape
        self.register_buffer("seg_prior", torch.zeros(config.input_shape))
        channels = self.encoder.feature_shape[0]
        self.seg_reduce = nn.Sequential(nn.Conv3d(channels, SEG_CHANNELS, 1), nn.PReLU())
        self.seg_out = nn.Sequential(nn.Conv3d(SEG_CHANNELS, SEG_CHANNELS // 2, 3, padding=1), nn.PReLU(),
                                     nn.Conv3d(SEG_CHANNELS // 2, 1, 1))
        xavier_init(self)
        for head in self.heads:  # a new scale starts as no step: see the module doc
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)

    def layer(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"mean_{s}"), getattr(self, f"basis_{s}")

    def mean_shape(self) -> torch.Tensor:
        """The training mean shape (M, 3), the cohort's order."""
        return self.layer(len(self.sizes) - 1)[0].view(-1, 3)[self.inverse_order]

    def scale_scores(self, image: torch.Tensor, last: int | None = None) -> tuple[list, torch.Tensor]:
        """(per scale 0..last: (code, points (B, n_s, 3) in nested order), conv feature maps); the code is
        the whitened PCA scores, or (progressive_tl) the autoencoder's latent."""
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
            # a head refines what the previous scale already says about this scale's points (lifted to
            # them, in this scale's code); the first scale, or the ablation, starts from the mean shape
            prior = self.lift_nested(previous, s - 1)[:, :self.sizes[s]] if s and self.previous_input else None
            step = self.heads[s](head_input)
            if self.tl:
                autoencoder = self.autoencoders[s]
                start = autoencoder.latent_shift if prior is None else autoencoder.encode(prior)
                code = start + step @ autoencoder.latent_transform
                points = autoencoder.decode(code)
            else:
                mean, basis = self.layer(s)
                start = 0.0 if prior is None else (prior.flatten(1) - mean) @ getattr(self, f"projection_{s}")
                code = start + step
                points = (mean + code @ basis).view(len(code), -1, 3)
            outputs.append((code, points))
            previous = points
        return outputs, maps

    def segment(self, maps: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (B, Z, Y, X) on the input grid from the encoder's feature maps."""
        reduced = F.interpolate(self.seg_reduce(maps), size=self.config.input_shape, mode="trilinear",
                                align_corners=False)
        return self.seg_out(reduced)[:, 0] + self.seg_prior

    def scale_targets(self, points: torch.Tensor) -> list[torch.Tensor]:
        """The cohort-order shapes (B, M, 3) cut into the scales' points, nested order."""
        ordered = points[:, self.order]
        return [ordered[:, :size] for size in self.sizes]

    def lift_nested(self, points: torch.Tensor, s: int) -> torch.Tensor:
        """Scale s's points (B, n_s, 3) -> all M points, nested order: each missing point keeps the mean
        shape's offset from its nearest predicted one."""
        return points[:, getattr(self, f"lift_index_{s}")] + getattr(self, f"lift_offset_{s}")

    def lift(self, points: torch.Tensor, s: int) -> torch.Tensor:
        """Scale s's points (B, n_s, 3, nested order) -> all M points in the cohort's order."""
        return self.lift_nested(points, s)[:, self.inverse_order]

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


_SCALE_SCHEMA = {
    "scales": {"description": "Point counts of the coarse scales, increasing; the finest scale is always all "
                              "M points. Each is a prefix of the farthest-point order on the mean shape.",
               "type": "array", "items": {"type": "integer", "minimum": 4}, "minItems": 1,
               "default": [64, 128, 256]},
    "stage_epochs": {"description": "Epochs of each coarse stage (stage s trains scales 0..s).",
                     "type": "integer", "minimum": 0, "default": 3},
    "final_epochs": {"description": "Epochs of the last stage (every scale, all points).", "type": "integer",
                     "minimum": 1, "default": 9},
    "seg_weight": {"description": "Weight of the segmentation loss (BCE + soft Dice); 0 is the ablation "
                                  "without the segmentation task.", "type": "number", "minimum": 0, "default": 1.0},
    "previous_input": {"description": "Feed each head the previous scale's prediction; false is the ablation "
                                      "with the mean shape in its place.", "type": "boolean", "default": True},
    "head_hidden": {"description": "Hidden width of each scale's head.", "type": "integer", "minimum": 1,
                    "default": 128},
}


# every stage restarts Adam at the full lr: warm it up (see the module doc)
_STAGE_WARMUP = {**_SHARED["warmup_epochs"], "default": 1}


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
    warmup_epochs: float
    loss: str
    focal_percentile: float
    focal_a_points: float
    network: dict


@dataclass(frozen=True)
class ProgressiveTLSettings(ProgressiveSettings):
    ae_epochs: int
    ae_lr: float
    joint_epochs: int
    latent_dim: int
    focal_a_latent: float


class ProgressiveMethod(Method):
    summary = ("Progressive DeepSSM: coarse-to-fine heads on nested particle scales, each fed the previous "
               "scale's prediction, a loss at every scale and a segmentation task (arXiv 2310.01529; the "
               "design beyond the abstract is the workflow's, see methods/progressive.py).")
    Settings = ProgressiveSettings
    schema = {**_SCALE_SCHEMA, **_SHARED, "warmup_epochs": _STAGE_WARMUP, "network": _NETWORK}
    needs = frozenset({TRAINING_IMAGES, SHAPES, AUGMENTATION, SEGMENTATIONS})
    capabilities = frozenset({CORRESPONDENCES, PCA_SCORES, SCALES, SEGMENTATION})
    smoke = {"scales": [8, 16], "stage_epochs": 1, "final_epochs": 1, "head_hidden": 8,
             "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8]}}
    tl = False

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
        sizing = {"latent_dim": settings.latent_dim} if self.tl else {}
        config = _model_config(spec, settings.network, n_modes=layers[-1][1].shape[0], **sizing)
        return ProgressiveDeepSSM(config, order, sizes, layers, settings.head_hidden, settings.previous_input,
                                  autoencoders=self.tl)

    def network_config(self, model):
        return {"model": asdict(model.config), "sizes": model.sizes, "head_hidden": model.head_hidden,
                "previous_input": model.previous_input, "autoencoders": model.tl}

    def rebuild(self, network, state):
        sizes = network["sizes"]
        layers = [(state[f"mean_{s}"].cpu().numpy().reshape(-1, 3), state[f"basis_{s}"].cpu().numpy())
                  for s in range(len(sizes))]
        return ProgressiveDeepSSM(ModelConfig(**network["model"]), state["order"].cpu().numpy(), sizes, layers,
                                  network["head_hidden"], network["previous_input"], network["autoencoders"])

    def stages(self, settings) -> list[Phase]:
        n = len(settings.scales) + 1
        return [Phase(f"stage{s + 1}", settings.final_epochs if s == n - 1 else settings.stage_epochs, settings.lr,
                      settings.weight_decay, selects_best=s == n - 1, warmup_epochs=settings.warmup_epochs)
                for s in range(n)]

    def phases(self, settings):
        return self.stages(settings)

    @staticmethod
    def stage(model, phase: Phase) -> int:
        """The finest scale a phase trains: stage s -> s - 1; the joint phase all."""
        return len(model.sizes) - 1 if phase.name == "joint" else int(phase.name.removeprefix("stage")) - 1

    def trainable(self, model, phase):
        active = self.stage(model, phase)
        for s, head in enumerate(model.heads):
            head.requires_grad_(s <= active)
        return [p for p in model.parameters() if p.requires_grad]

    def prepare(self, model, settings, data):
        if settings.seg_weight > 0:
            total, count = 0.0, 0
            for masks in data.segmentation_batches():
                total, count = total + masks.sum(0), count + len(masks)
            # clipped: a voxel no training mask reaches (or every one covers) keeps a finite prior
            mean = (total / count).clamp(SEG_PRIOR_CLIP, 1 - SEG_PRIOR_CLIP)
            model.seg_prior.copy_(torch.log(mean / (1 - mean)))
        return _point_threshold(settings, data)

    def loss(self, model, settings, phase, batch: Batch, state):
        outputs, maps = model.scale_scores(batch.images, self.stage(model, phase))
        targets = model.scale_targets(batch.points)
        loss = sum(_loss(settings, points, targets[s], "points", state) for s, (_, points) in enumerate(outputs))
        return loss + self._segmentation_term(model, settings, batch, maps)

    @staticmethod
    def _segmentation_term(model, settings, batch: Batch, maps: torch.Tensor):
        if settings.seg_weight == 0:
            return 0.0
        return settings.seg_weight * segmentation_loss(model.segment(maps), batch.segmentations)

    def validation_points(self, model, phase, batch):
        s = self.stage(model, phase)
        outputs, _ = model.scale_scores(batch.images, s)
        return model.lift(outputs[-1][1], s)

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


class ProgressiveTLMethod(ProgressiveMethod):
    summary = ("Progressive DeepSSM on TL-DeepSSM: per scale a correspondence autoencoder, and a head "
               "predicting its latent from the image features and the previous scale's prediction; "
               "autoencoders first, then coarse-to-fine stages, then joint training.")
    Settings = ProgressiveTLSettings
    schema = {
        **_SCALE_SCHEMA,
        "ae_epochs": {"description": "Autoencoder phase (every scale's; no images).", "type": "integer",
                      "minimum": 0, "default": 200},
        "ae_lr": {"description": "Fixed learning rate of the autoencoder phase (as TL-DeepSSM's).",
                  "type": "number", "exclusiveMinimum": 0, "default": 0.001},
        "joint_epochs": {"description": "Joint phase after the stages.", "type": "integer", "minimum": 0,
                         "default": 3},
        "latent_dim": {"description": "Every scale's autoencoder bottleneck.", "type": "integer", "minimum": 1,
                       "default": 64},
        **_SHARED,
        "warmup_epochs": _STAGE_WARMUP,
        "focal_a_latent": {"description": "Focal sharpness a on the latents (paper 1).", "type": "number",
                           "exclusiveMinimum": 0, "default": 1},
        "network": _TL_NETWORK,
    }
    capabilities = frozenset({CORRESPONDENCES, LATENT_CODE, SCALES, SEGMENTATION})
    smoke = {"scales": [8, 16], "ae_epochs": 2, "stage_epochs": 1, "final_epochs": 1, "joint_epochs": 1,
             "latent_dim": 4, "head_hidden": 8, "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8],
                                                           "ae_hidden": 8}}
    tl = True

    def phases(self, settings):
        return [Phase("autoencoder", settings.ae_epochs, settings.ae_lr, settings.weight_decay, "constant",
                      selects_best=False, images=False),
                *self.stages(settings),
                Phase("joint", settings.joint_epochs, settings.lr, settings.weight_decay,
                      warmup_epochs=settings.warmup_epochs)]

    def trainable(self, model, phase):
        if phase.name == "autoencoder":
            model.requires_grad_(False)
            model.autoencoders.requires_grad_(True)
            return [p for p in model.parameters() if p.requires_grad]
        model.requires_grad_(True)
        if phase.name != "joint":  # the stages: the T-flank side only, as TL-DeepSSM's tflank phase
            model.autoencoders.requires_grad_(False)
        return super().trainable(model, phase)

    def begin_phase(self, model, settings, phase, data, state, log):
        if phase.name != next(p.name for p in self.phases(settings) if p.images and p.epochs > 0):
            return  # only once, when the first phase after the autoencoders starts
        # each scale's trained autoencoder codes of the training shapes whiten its head's output and, for the
        # focal loss, set its latent threshold
        model.eval()
        with torch.no_grad():
            codes = [[] for _ in model.sizes]
            for points in data.point_batches():
                for s, target in enumerate(model.scale_targets(points)):
                    codes[s].append(model.autoencoders[s].encode(target).cpu().numpy())
        for s, autoencoder in enumerate(model.autoencoders):
            stacked = np.concatenate(codes[s])
            autoencoder.whiten(stacked)
            if settings.loss == "focal":
                state[f"focal_c_latent{s}"] = latent_focal_threshold(stacked, settings.focal_percentile)
                log(f"scale {model.sizes[s]}: latent focal threshold c = {state[f'focal_c_latent{s}']:.4g}")

    def loss(self, model, settings, phase, batch, state):
        targets = model.scale_targets(batch.points)
        if phase.name == "autoencoder":
            return sum(_loss(settings, autoencoder.decode(autoencoder.encode(target)), target, "points", state)
                       for autoencoder, target in zip(model.autoencoders, targets))
        outputs, maps = model.scale_scores(batch.images, self.stage(model, phase))
        loss = self._segmentation_term(model, settings, batch, maps)
        for s, (latent, _) in enumerate(outputs):
            autoencoder = model.autoencoders[s]
            true_latent = autoencoder.encode(targets[s])
            loss = loss + _loss(settings, latent, true_latent.detach(), f"latent{s}", state)
            if phase.name == "joint":
                loss = loss + _loss(settings, autoencoder.decode(true_latent), targets[s], "points", state)
        return loss

    def validation_points(self, model, phase, batch):
        if phase.name == "autoencoder":  # sees no image: the finest autoencoder's reconstruction
            autoencoder = model.autoencoders[-1]
            return autoencoder.decode(autoencoder.encode(model.scale_targets(batch.points)[-1]))[:, model.inverse_order]
        return super().validation_points(model, phase, batch)

    def shape_code(self, model, shapes):
        return model.autoencoders[-1].encode(model.scale_targets(shapes)[-1])

    def decode(self, model, codes):
        return model.autoencoders[-1].decode(codes)[:, model.inverse_order]


register("progressive", ProgressiveMethod(), fixed={"loss": "l2"}, default=False)
register("progressive_focal", ProgressiveMethod(), fixed={"loss": "focal"}, default=False)
register("progressive_tl", ProgressiveTLMethod(), fixed={"loss": "l2"}, default=False)
register("progressive_tl_focal", ProgressiveTLMethod(), fixed={"loss": "focal"}, default=False)
