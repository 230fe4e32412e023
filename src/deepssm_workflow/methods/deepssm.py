"""Base-DeepSSM and TL-DeepSSM (Bhalodia et al., MedIA 2024, sec. 3.2-3.3, app. A.2), and
their registered presets base, base_focal, tl, tl_focal (the focal ones differ in the loss).

* Base-DeepSSM, one phase ("train"): Adam (lr 1e-3, weight decay 5e-5) with cosine
  annealing; the loss is eq. 2 on correspondences, or the focal loss (eq. 7, a = 10,
  c = `focal_threshold` of the training shapes). The encoder predicts whitened PCA scores
  of the dataset's shape space (`pca_layer_basis`).
* TL-DeepSSM, three phases, as the paper trains them:
  "autoencoder"  g and h on the correspondences, Adam at a fixed lr (paper 1e-4);
  "tflank"       the T-flank f on the latent target g(C), autoencoder frozen;
  "joint"        everything, L_auto + L_tf.
  tflank and joint use lr with cosine annealing. The focal variant uses c from the
  training shapes for points (a = 10) and, computed once at the start of the first
  image phase from the trained autoencoder's codes, c for latents (a = 1). The latent
  target g(C) is detached: L_tf then trains f only and cannot be lowered by shrinking
  the latent space; g and h learn from L_auto. The autoencoder phase sees no image, so
  its epochs do not compete for the kept model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..localize import rigid_fit
from ..models import (
    ImageEncoder,
    ModelConfig,
    correspondence_loss,
    focal_loss,
    focal_threshold,
    latent_focal_threshold,
    xavier_init,
)
from ..shape_space import ShapeSpace
from . import register
from .interface import (
    CORRESPONDENCES,
    LATENT_CODE,
    LOCALIZES,
    PCA_SCORES,
    SCANS,
    SHAPES,
    Batch,
    DataSpec,
    Method,
    Phase,
    TrainingData,
)

# -- schema fragments (the defaults are the demo's, sized for a CPU; config/paper.yaml states the paper's)

_NETWORK = {
    "description": "Network size overrides (smaller networks for CPU presets); the default is the paper's.",
    "type": "object", "additionalProperties": False, "default": {},
    "properties": {
        "channels": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 5, "maxItems": 5},
        "fc_sizes": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2},
        "kernel_sizes": {"description": "Odd conv kernel sizes (default 5, 3, 3, 3, 3; the reference code's: all 5).",
                         "type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 5, "maxItems": 5},
    },
}
_SHARED = {
    "lr": {"description": "Adam learning rate of the image phases, cosine-annealed (paper 1e-3).",
           "type": "number", "exclusiveMinimum": 0, "default": 0.001},
    "weight_decay": {"description": "Adam weight decay (paper 5e-5).", "type": "number", "minimum": 0,
                     "default": 5.0e-5},
    "warmup_epochs": {"description": "The lr of each image phase rises linearly, step by step, from lr/steps to lr "
                                     "over its first this many epochs (each phase, each progressive stage, starts a "
                                     "new Adam and warms up again); 0: none, the paper's. Adam's first steps move "
                                     "every weight by about lr, which can throw a wide first FC layer off for good.",
                      "type": "number", "minimum": 0, "default": 0},
    "loss": {"description": "l2: eq. 2; focal: eq. 7 (fixed by the *_focal presets).",
             "enum": ["l2", "focal"], "default": "l2"},
    "focal_percentile": {
        "description": "Focal loss: c of eq. 7 is this percentile of the training shapes' per-point distances to "
                       "the mean (and of the latent deviations); the paper uses 90 (c of 1.1-1.3 mm on its "
                       "cohorts). Errors well below c get almost no gradient, so c should sit near the error the "
                       "network can reach.",
        "type": "number", "exclusiveMinimum": 0, "maximum": 100, "default": 90},
    "focal_a_points": {"description": "Focal sharpness a on correspondences (paper 10).", "type": "number",
                       "exclusiveMinimum": 0, "default": 10},
}
_TL_NETWORK = {**_NETWORK, "properties": {**_NETWORK["properties"],
                                          "ae_hidden": {"description": "Autoencoder hidden width (each side).",
                                                        "type": "integer", "minimum": 1}}}


def _loss(settings, pred, target, kind: str, state: dict) -> torch.Tensor:
    """Eq. 2, or the focal loss with the threshold measured for `kind` (points or latent)."""
    if settings.loss == "focal":
        a = settings.focal_a_points if kind == "points" else settings.focal_a_latent
        return focal_loss(pred, target, a=a, c=state[f"focal_c_{kind}"])
    return correspondence_loss(pred, target)


def _point_threshold(settings, data: TrainingData) -> dict:
    c = None
    if settings.loss == "focal":
        c = focal_threshold(data.points, settings.focal_percentile, rows=data.train_idx)
    return {"focal_c_points": c, "focal_c_latent": None}


def _model_config(spec: DataSpec, network: dict, **sizes) -> ModelConfig:
    return ModelConfig(input_shape=tuple(spec.input_shape), n_points=spec.n_points, precision=spec.precision,
                       **sizes, **network)


# -- Base-DeepSSM


class BaseDeepSSM(nn.Module):
    """Image -> K PCA scores -> correspondences through the fixed PCA layer (sec. 3.2).

    `basis` (K, 3M) rows are the modes, `mean` (M, 3) the mean shape, so that
    shape = mean + scores @ basis. With `ShapeSpace`'s orthonormal basis the network
    predicts raw scores; pass basis * sqrt(variances)[:, None] instead to have it
    predict whitened (unit-variance) scores.
    """

    def __init__(self, config: ModelConfig, mean: np.ndarray, basis: np.ndarray):
        super().__init__()
        mean, basis = np.asarray(mean, dtype=np.float32), np.asarray(basis, dtype=np.float32)
        m, k = config.n_points, config.n_modes
        if mean.shape != (m, 3) or basis.shape != (k, 3 * m):
            raise ValueError(f"need mean ({m}, 3) and basis ({k}, {3 * m}) for M={m}, K={k}; "
                             f"got mean {mean.shape} and basis {basis.shape}")
        self.config = config
        self.encoder = ImageEncoder(config, k)
        # buffers, not Parameters: never trained, never handed to an optimizer, still in state_dict
        self.register_buffer("pca_weight", torch.from_numpy(basis.T.copy()))      # (3M, K)
        self.register_buffer("pca_bias", torch.from_numpy(mean.reshape(-1).copy()))  # (3M,)
        xavier_init(self)

    def reconstruct(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, K) scores -> (B, M, 3) correspondences: the paper's r_phi(z) = W z + b."""
        return F.linear(scores, self.pca_weight, self.pca_bias).view(len(scores), -1, 3)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.encoder(image)
        return scores, self.reconstruct(scores)


def pca_layer_basis(space: ShapeSpace, k: int) -> np.ndarray:
    """The fixed output layer's weight: the leading k modes scaled by their standard deviations,
    so the encoder predicts whitened (unit-variance) scores. The layer is still the PCA
    reconstruction, mean + basis . z, only in whitened units: raw femur scores reach +-60
    while a freshly initialized linear head outputs about +-1, and Adam's ~1e-3 steps took
    most of a short run just to reach that scale."""
    return space.basis[:k] * np.sqrt(space.variances[:k])[:, None]


@dataclass(frozen=True)
class BaseSettings:
    epochs: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    loss: str
    focal_percentile: float
    focal_a_points: float
    network: dict


class BaseDeepSSMMethod(Method):
    summary = ("Base-DeepSSM: image encoder -> PCA scores of the dataset's shape space -> correspondences "
               "through a fixed PCA layer (paper sec. 3.2).")
    Settings = BaseSettings
    schema = {"epochs": {"description": "Epochs of the one training phase.", "type": "integer", "minimum": 1,
                         "default": 12},
              **_SHARED, "network": _NETWORK}
    capabilities = frozenset({CORRESPONDENCES, PCA_SCORES})
    smoke = {"epochs": 2, "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8]}}

    def build(self, settings, spec):
        k = spec.shape_space.n_modes
        config = _model_config(spec, settings.network, n_modes=k)
        return BaseDeepSSM(config, spec.shape_space.mean, pca_layer_basis(spec.shape_space, k))

    def network_config(self, model):
        return asdict(model.config)

    def rebuild(self, network, state):
        # the PCA layer comes back from the state_dict's own buffers
        mean = state["pca_bias"].cpu().numpy().reshape(-1, 3)
        return BaseDeepSSM(ModelConfig(**network), mean, state["pca_weight"].cpu().numpy().T)

    def phases(self, settings):
        return [Phase("train", settings.epochs, settings.lr, settings.weight_decay,
                      warmup_epochs=settings.warmup_epochs)]

    def prepare(self, model, settings, data):
        return _point_threshold(settings, data)

    def loss(self, model, settings, phase, batch: Batch, state):
        return _loss(settings, model(batch.images)[1], batch.points, "points", state)

    def predict(self, model, images):
        return model(images)[1]

    def training_mean(self, model):
        return model.pca_bias.detach().cpu().numpy().astype(np.float64).reshape(-1, 3)

    def shape_code(self, model, shapes):
        """Least-squares coordinates in the fixed PCA layer (whitened scores; exact for its own output)."""
        weight = model.pca_weight.double()
        offsets = shapes.reshape(len(shapes), -1).double() - model.pca_bias.double()
        return torch.linalg.lstsq(weight, offsets.T).solution.T

    def image_code(self, model, images):
        return model.encoder(images)


# -- Base-DeepSSM on the uncropped scan: the baseline of a method that finds the anatomy itself


class UncroppedDeepSSM(BaseDeepSSM):
    """BaseDeepSSM whose PCA layer is of scan-frame (grid-frame) shapes, carrying the training mean world shape
    that its predictions are rigidly fitted onto."""

    def __init__(self, config: ModelConfig, mean: np.ndarray, basis: np.ndarray, world_mean: np.ndarray):
        super().__init__(config, mean, basis)
        self.register_buffer("world_mean", torch.as_tensor(np.asarray(world_mean), dtype=torch.float32))


class UncroppedDeepSSMMethod(BaseDeepSSMMethod):
    """The baseline the localization-aware methods are judged against (issue 17, and MASSM's "DeepSSM on the
    full scan without alignment"): Base-DeepSSM given the whole uncropped scan (full_field's scan grid) with
    no registration and no crop. It predicts the scan-frame particles through a fixed PCA layer of the
    training subjects' scan-frame particles (`shape_frame`), so pose and position are part of what its
    modes must carry. Its world particles, and its alignment for the error decomposition, are that prediction
    rigidly fitted (Kabsch) onto the training mean world shape: it never sees a world frame."""

    summary = ("Baseline: Base-DeepSSM on the whole uncropped scan, no registration: scan-frame particles through "
               "a PCA layer of scan-frame shapes; world particles by a rigid fit onto the mean shape.")
    needs = frozenset({SCANS, SHAPES})
    capabilities = frozenset({CORRESPONDENCES, LOCALIZES})
    shape_frame = "scan"

    def build(self, settings, spec):
        if spec.world_mean is None:
            raise ValueError("base_uncropped needs the training subjects' world particles (train_from_scans)")
        k = spec.shape_space.n_modes
        config = _model_config(spec, settings.network, n_modes=k)
        return UncroppedDeepSSM(config, spec.shape_space.mean, pca_layer_basis(spec.shape_space, k), spec.world_mean)

    def rebuild(self, network, state):
        mean = state["pca_bias"].cpu().numpy().reshape(-1, 3)
        return UncroppedDeepSSM(ModelConfig(**network), mean, state["pca_weight"].cpu().numpy().T,
                                state["world_mean"].cpu().numpy())

    def validation_points(self, model, phase, batch):
        return model(batch.images)[1]  # scan-frame, as the batch's points

    def predict(self, model, images):
        return self.localize(model, images)["world"]

    def localize(self, model, images):
        local = model(images)[1]
        rotation, shift = rigid_fit(local, model.world_mean)
        matrix = torch.zeros(len(local), 4, 4, dtype=rotation.dtype, device=local.device)
        matrix[:, :3, :3], matrix[:, :3, 3], matrix[:, 3, 3] = rotation, shift, 1
        world = torch.einsum("bij,bmj->bmi", rotation, local.double()) + shift[:, None]
        return {"local": local, "world": world.to(local.dtype), "image_to_world": matrix.to(local.dtype),
                "found": torch.ones(len(local), dtype=torch.bool, device=local.device)}

    def training_mean(self, model):
        return model.world_mean.detach().cpu().numpy().astype(np.float64)


# -- TL-DeepSSM


def latent_whitening(codes: np.ndarray, latent_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(shift, transform) that map whitened codes u onto training codes (N, L) as shift + u @ transform:
    their mean, and their principal axes scaled by the standard deviation along each (see
    `TLDeepSSM.whiten_latent`)."""
    codes = np.asarray(codes, dtype=np.float64)
    if codes.ndim != 2 or codes.shape[1] != latent_dim or len(codes) < 2:
        raise ValueError(f"codes must be (N >= 2, {latent_dim}), got {codes.shape}")
    variances, axes = np.linalg.eigh(np.cov(codes, rowvar=False))
    # eigh may return tiny negative variances for directions the codes do not span
    return codes.mean(0), (axes * np.sqrt(np.clip(variances, 0.0, None))).T


class TLDeepSSM(nn.Module):
    """Correspondence autoencoder g/h plus the image T-flank f (sec. 3.2, Fig. 13 B).

    g: 3M -> ae_hidden -> latent_dim and h: latent_dim -> ae_hidden -> 3M, two FC
    layers per side with a leaky ReLU between them and linear ends (the latent must
    match the T-flank's linear output; the points are unbounded). Points enter g
    centred on the training mean shape, and h adds it back (a fixed buffer, like the
    base model's bias): the net then models deviations of a few mm rather than
    absolute world coordinates. Without `mean` the centring is a no-op.
    """

    def __init__(self, config: ModelConfig, mean: np.ndarray | None = None):
        super().__init__()
        m, hidden, latent = config.n_points, config.ae_hidden, config.latent_dim
        mean = np.zeros((m, 3), np.float32) if mean is None else np.asarray(mean, dtype=np.float32)
        if mean.shape != (m, 3):
            raise ValueError(f"need mean ({m}, 3) for M={m}, got {mean.shape}")
        self.config = config
        self.register_buffer("mean_shape", torch.from_numpy(mean.reshape(-1).copy()))
        self.encoder = nn.Sequential(nn.Linear(3 * m, hidden), nn.LeakyReLU(config.leaky_slope),
                                     nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.LeakyReLU(config.leaky_slope),
                                     nn.Linear(hidden, 3 * m))
        self.t_flank = ImageEncoder(config, latent)
        # f predicts whitened codes; these fixed buffers map them onto the codes' principal axes
        # (set from the trained autoencoder's codes by `whiten_latent`)
        self.register_buffer("latent_shift", torch.zeros(latent))
        self.register_buffer("latent_transform", torch.eye(latent))
        xavier_init(self)

    def whiten_latent(self, codes: np.ndarray) -> None:
        """Make the T-flank predict whitened training codes g(C), (N, L): f's output u maps to
        the codes as shift + u @ transform, with shift their mean and the rows of transform
        their principal axes scaled by the standard deviation along each.

        Like the base model's fixed PCA layer with whitened scores: a freshly initialized
        linear head outputs about +-1, far from codes of tens, and f can only move along the
        directions the training codes span (an axis they do not vary along gets scale 0).
        With few training shapes the codes fill a small part of the L dimensions, and an
        unconstrained f strayed off it, where the decoder has seen nothing. (It was chosen on a
        test split before the evidence protocol; a validation comparison is still to be made:
        CONTRIBUTING.md.)"""
        shift, transform = latent_whitening(codes, self.config.latent_dim)
        self.latent_shift.copy_(torch.as_tensor(shift))
        self.latent_transform.copy_(torch.as_tensor(transform))

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        """g: (B, M, 3) -> (B, latent_dim)."""
        return self.encoder(points.reshape(len(points), -1) - self.mean_shape)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """h: (B, latent_dim) -> (B, M, 3)."""
        return (self.decoder(latent) + self.mean_shape).view(len(latent), -1, 3)

    def autoencode(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(latent g(C), reconstruction h(g(C))), for L_auto and as the T-flank's target."""
        latent = self.encode(points)
        return latent, self.decode(latent)

    def tflank(self, image: torch.Tensor) -> torch.Tensor:
        """f: image -> (B, latent_dim)."""
        return self.t_flank(image) @ self.latent_transform + self.latent_shift

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference from the image alone: (f(I), h(f(I)))."""
        latent = self.tflank(image)
        return latent, self.decode(latent)


@dataclass(frozen=True)
class TLSettings:
    ae_epochs: int
    ae_lr: float
    tflank_epochs: int
    joint_epochs: int
    latent_dim: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    loss: str
    focal_percentile: float
    focal_a_points: float
    focal_a_latent: float
    network: dict


# which parts each phase trains: autoencoder g and h (L_auto); tflank f only (L_tf); joint all
_TRAINS = {"autoencoder": ("encoder", "decoder"), "tflank": ("t_flank",), "joint": ("encoder", "decoder", "t_flank")}


class TLDeepSSMMethod(Method):
    summary = ("TL-DeepSSM: correspondence autoencoder plus an image T-flank predicting its latent, trained in "
               "three phases (paper sec. 3.2).")
    Settings = TLSettings
    schema = {
        "ae_epochs": {"description": "Autoencoder phase.", "type": "integer", "minimum": 0, "default": 200},
        "ae_lr": {"description": "Fixed learning rate of the autoencoder phase. The paper's 1e-4 comes with "
                                 "5000-10000 epochs; a few hundred epochs at 1e-4 leave the autoencoder, and so "
                                 "the TL variants, undertrained, hence the default 1e-3 with the default 200 epochs.",
                  "type": "number", "exclusiveMinimum": 0, "default": 0.001},
        "tflank_epochs": {"description": "T-flank phase (autoencoder frozen).", "type": "integer", "minimum": 0,
                          "default": 12},
        "joint_epochs": {"description": "Joint phase.", "type": "integer", "minimum": 0, "default": 4},
        "latent_dim": {"description": "Autoencoder bottleneck (paper 64).", "type": "integer", "minimum": 1,
                       "default": 64},
        **_SHARED,
        "focal_a_latent": {"description": "Focal sharpness a on the latent (paper 1).", "type": "number",
                           "exclusiveMinimum": 0, "default": 1},
        "network": _TL_NETWORK,
    }
    capabilities = frozenset({CORRESPONDENCES, LATENT_CODE})
    smoke = {"ae_epochs": 2, "tflank_epochs": 1, "joint_epochs": 1, "latent_dim": 4,
             "network": {"channels": [2, 4, 4, 4, 4], "fc_sizes": [8, 8], "ae_hidden": 8}}

    def build(self, settings, spec):
        config = _model_config(spec, settings.network, latent_dim=settings.latent_dim)
        return TLDeepSSM(config, spec.shape_space.mean)

    def network_config(self, model):
        return asdict(model.config)

    def rebuild(self, network, state):
        return TLDeepSSM(ModelConfig(**network), state["mean_shape"].cpu().numpy().reshape(-1, 3))

    def phases(self, settings):
        return [Phase("autoencoder", settings.ae_epochs, settings.ae_lr, settings.weight_decay, "constant",
                      selects_best=False, images=False),
                Phase("tflank", settings.tflank_epochs, settings.lr, settings.weight_decay,
                      warmup_epochs=settings.warmup_epochs),
                Phase("joint", settings.joint_epochs, settings.lr, settings.weight_decay,
                      warmup_epochs=settings.warmup_epochs)]

    def trainable(self, model, phase):
        for part in ("encoder", "decoder", "t_flank"):
            getattr(model, part).requires_grad_(part in _TRAINS[phase.name])
        return [p for p in model.parameters() if p.requires_grad]

    def prepare(self, model, settings, data):
        return _point_threshold(settings, data)

    def begin_phase(self, model, settings, phase, data, state, log):
        first_image_phase = next(p.name for p in self.phases(settings) if p.selects_best and p.epochs > 0)
        if phase.name != first_image_phase:
            return
        # the trained autoencoder's codes of the training shapes set the T-flank's output
        # whitening and, for the focal loss, the latent focal threshold
        model.eval()
        with torch.no_grad():
            codes = np.concatenate([model.encode(points).cpu().numpy() for points in data.point_batches()])
        model.whiten_latent(codes)
        if settings.loss == "focal":
            state["focal_c_latent"] = latent_focal_threshold(codes, settings.focal_percentile)
            log(f"latent focal threshold c = {state['focal_c_latent']:.4g}")

    def loss(self, model, settings, phase, batch, state):
        latent, recon = model.autoencode(batch.points)
        loss = 0.0
        if phase.name in ("autoencoder", "joint"):
            loss = _loss(settings, recon, batch.points, "points", state)
        if phase.name in ("tflank", "joint"):
            loss = loss + _loss(settings, model.tflank(batch.images), latent.detach(), "latent", state)
        return loss

    def validation_points(self, model, phase, batch):
        if phase.name == "autoencoder":  # sees no image: the autoencoder's reconstruction
            return model.autoencode(batch.points)[1]
        return self.predict(model, batch.images)

    def predict(self, model, images):
        return model(images)[1]

    def training_mean(self, model):
        return model.mean_shape.detach().cpu().numpy().astype(np.float64).reshape(-1, 3)

    def shape_code(self, model, shapes):
        return model.encode(shapes)

    def image_code(self, model, images):
        return model.tflank(images)

    def decode(self, model, codes):
        return model.decode(codes)


register("base", BaseDeepSSMMethod(), fixed={"loss": "l2"})
register("base_focal", BaseDeepSSMMethod(), fixed={"loss": "focal"})
register("tl", TLDeepSSMMethod(), fixed={"loss": "l2"})
register("tl_focal", TLDeepSSMMethod(), fixed={"loss": "focal"})
register("base_uncropped", UncroppedDeepSSMMethod(), fixed={"loss": "l2"}, default=False)
