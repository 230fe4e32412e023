"""What a method is: the interface every image-to-shape method implements to be trained by
the engine (`deepssm_workflow.engine`), predicted from, evaluated and used by the studies.

A method says
* its settings: a frozen dataclass (`Settings`, fields without defaults) and the JSON-schema
  properties of its config block (`schema`, the one home of the defaults);
* `smoke`: settings of the smallest run that exercises every phase (the conformance tests);
* what it needs from the results layout (`needs`: NEEDS names) and what it can do
  (`capabilities`: CAPABILITIES names), so that evaluation and studies ask for a capability,
  never for a name;
* how to build its network from the data (`build`), what the model card must keep to build
  it again (`network_config`, `rebuild`);
* its training phases (`phases`: epochs, optimizer settings, schedule, whether the phase's
  epochs compete for the kept model), which parameters each phase trains (`trainable`), the
  loss of a batch (`loss`) and what a phase validates (`validation_points`);
* how it predicts (`predict`) and, with PCA_SCORES or LATENT_CODE, the codes it hands the
  studies (`shape_code`, `image_code`, `decode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..shape_space import ShapeSpace, rmse

# -- capabilities: what evaluation and the studies may ask of a method
CORRESPONDENCES = "correspondences"  # predicts (M, 3) world-frame correspondences from one image
PCA_SCORES = "pca_scores"            # its shape code is the scores of a fixed linear PCA layer
LATENT_CODE = "latent_code"          # its shape code is a learned latent that decodes to a shape (latent swims)
SCALES = "scales"                    # predicts nested scales of the correspondences too (`predict_scales`)
SEGMENTATION = "segmentation"        # predicts the anatomy's mask on the network grid (`predict_segmentation`)
LOCALIZES = "localizes"              # finds the anatomy in an uncropped scan itself: scan-frame correspondences
                                     # and its own alignment, with no registration (`localize`)
LANDMARKS = "landmarks"              # predicts (B, L, 3) landmarks on the input grid (mm from its first voxel) that
                                     # it learnt from pairs of images alone: no correspondence to the cohort's
                                     # shape model, so no eq. 12 RMSE (its `predict` returns them)
MULTI_ANATOMY = "multi_anatomy"      # finds several anatomies in one scan (`detect`), trained on multi_scans' packed
                                     # points (DataSpec.n_anatomies blocks)
CAPABILITIES = (CORRESPONDENCES, PCA_SCORES, LATENT_CODE, SCALES, SEGMENTATION, LOCALIZES, LANDMARKS, MULTI_ANATOMY)

# -- inputs a method can need from the results layout (`deepssm_workflow.layout`)
TRAINING_IMAGES = "training_images"  # preprocess/train.npz
SHAPES = "shapes"                    # cohort/shapes_train.npz: the correspondences
AUGMENTATION = "augmentation"        # augmentation/samples.npz + images.npy
SEGMENTATIONS = "segmentations"      # preprocess/train_segmentations.npz + augmentation/segmentations/ (training
                                     # only; deepssm_workflow.segmentations); the train rule then asks for them
SCANS = "scans"                      # scans/train.npz (deepssm_workflow.full_field): uncropped scans, their
                                     # segmentations and both particle frames, in place of the registered crops;
                                     # the engine's points are then the grid-frame (local) particles, and the
                                     # world ones come as the batch's extra "world"
NEEDS = (TRAINING_IMAGES, SHAPES, AUGMENTATION, SEGMENTATIONS, SCANS)


def learns_without_shapes(needs) -> bool:
    """Whether a method with these `needs` learns from the preprocessed training images (and, weakly supervised,
    their segmentations) with no shapes and no augmentation: `train.train_from_images` trains it."""
    return TRAINING_IMAGES in needs and not needs & {SHAPES, AUGMENTATION, SCANS}


@dataclass(frozen=True)
class DataSpec:
    """What a network is built for: preprocessed image size (Z, Y, X), correspondences per
    shape, the dataset's shape space (mean shape, PCA basis and variances), the precision
    of its image convolutions (fp32, or bf16 autocast on the conv stack only), and the input grid's
    voxel size (x, y, z mm: what a method that works in millimetres on its input, LOCALIZES, needs)."""

    input_shape: tuple[int, int, int]
    n_points: int
    shape_space: ShapeSpace
    precision: str = "fp32"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # (M, 3) mean world shape of the training rows, when the engine has their world particles (SCANS: the
    # points are then scan-frame ones)
    world_mean: np.ndarray | None = None
    # anatomies per scan: the points are that many blocks of n_points / n_anatomies, one per anatomy, an
    # anatomy a sample lacks being nan (a multi-anatomy method; every other method sees 1)
    n_anatomies: int = 1


@dataclass(frozen=True)
class Phase:
    """One training phase: `epochs` of Adam at `lr` (cosine-annealed over the phase, or
    constant), weight decay `weight_decay`, the lr ramped up linearly over the phase's first
    `warmup_epochs` (by step; 0: none). When `selects_best`, its epochs compete for the
    kept model (lowest validation RMSE); a phase that does not see images (an autoencoder)
    must not."""

    name: str
    epochs: int
    lr: float
    weight_decay: float
    schedule: str = "cosine"  # or "constant"
    selects_best: bool = True
    images: bool = True  # whether its loss reads the images (a read-ahead reads them only then)
    warmup_epochs: float = 0.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"phase {self.name}: schedule must be cosine or constant, got {self.schedule!r}")
        if self.epochs < 0:
            raise ValueError(f"phase {self.name}: epochs must be >= 0, got {self.epochs}")
        if self.warmup_epochs < 0:
            raise ValueError(f"phase {self.name}: warmup_epochs must be >= 0, got {self.warmup_epochs}")


class Batch:
    """One batch of training samples: their target correspondences (B, M, 3) on the device,
    their images, read only when a phase asks for them (an autoencoder phase never does), and,
    for a method that needs SEGMENTATIONS, their segmentations (B, Z, Y, X): the fraction of each
    voxel inside the anatomy, read when first asked for."""

    def __init__(self, rows: np.ndarray, points: torch.Tensor, read_images: Callable[[], torch.Tensor],
                 read_segmentations: Callable[[], torch.Tensor] | None = None,
                 read_extras: dict[str, Callable[[], torch.Tensor]] | None = None):
        self.rows, self.points, self._read_images, self._images = rows, points, read_images, None
        self._read_segmentations, self._segmentations = read_segmentations, None
        self._read_extras, self._extras = dict(read_extras or {}), {}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self._read_images()
        return self._images

    @property
    def segmentations(self) -> torch.Tensor:
        if self._read_segmentations is None:
            raise ValueError("this training was given no segmentations (a method needing them declares "
                             "SEGMENTATIONS in its `needs`)")
        if self._segmentations is None:
            self._segmentations = self._read_segmentations()
        return self._segmentations

    def extra(self, name: str) -> torch.Tensor:
        """A further per-sample target the training was given (SCANS: "world"), read when first asked for."""
        if name not in self._read_extras:
            raise ValueError(f"this training was given no {name!r} rows (given: {sorted(self._read_extras) or 'none'})")
        if name not in self._extras:
            self._extras[name] = self._read_extras[name]()
        return self._extras[name]


class Method:
    """Base class of a method; a subclass sets the class attributes and implements the hooks.
    Defaults here are those of a single-network method trained end to end on images."""

    summary: str = ""
    Settings: type
    schema: dict = {}  # JSON-schema `properties` of its config block, each with its default
    needs: frozenset = frozenset({TRAINING_IMAGES, SHAPES, AUGMENTATION})
    capabilities: frozenset = frozenset({CORRESPONDENCES})
    # the smallest settings that run every phase, on a tiny network: what the conformance tests
    # (tests/test_methods.py) train every registered method with
    smoke: dict = {}
    # what `validation_errors` measures: the engine's per-epoch validation figure and the kept model's
    validation_measure: str = "RMSE (eq. 12)"
    # the frame of the shapes its fixed PCA layer is fitted on (a SCANS method): "world", or "scan" for one that
    # predicts scan-frame particles without any alignment (the uncropped DeepSSM baseline)
    shape_frame: str = "world"
    # LOCALIZES: why a scan in which `localize` reports "found" False gets no prediction
    not_found: str = "the method did not find the anatomy in the scan"

    # -- network
    def build(self, settings, spec: DataSpec) -> nn.Module:
        raise NotImplementedError

    def network_config(self, model: nn.Module) -> dict:
        """JSON-able: with the state_dict, all `rebuild` needs."""
        raise NotImplementedError

    def rebuild(self, network: dict, state: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError

    # -- training
    def phases(self, settings) -> list[Phase]:
        raise NotImplementedError

    def check(self, settings) -> list[str]:
        """Problems of a settings combination the schema cannot see (e.g. no epoch that selects a model)."""
        if not any(p.epochs > 0 and p.selects_best for p in self.phases(settings)):
            return ["no phase with epochs that validates on images: the kept model would be chosen on none"]
        return []

    def trainable(self, model: nn.Module, phase: Phase) -> list[nn.Parameter]:
        return list(model.parameters())

    def prepare(self, model: nn.Module, settings, data: "TrainingData") -> dict:
        """Before the first epoch (not on resume): JSON-able state kept in the checkpoint and the card."""
        return {}

    def begin_phase(self, model: nn.Module, settings, phase: Phase, data: "TrainingData", state: dict, log) -> None:
        """When a phase starts afresh (not when it is resumed): may change fixed buffers and `state`."""

    def loss(self, model: nn.Module, settings, phase: Phase, batch: Batch, state: dict) -> torch.Tensor:
        raise NotImplementedError

    def validation_points(self, model: nn.Module, phase: Phase, batch: Batch) -> torch.Tensor:
        """(B, M, 3) correspondences the phase is validated on (default: predicted from the images)."""
        return self.predict(model, batch.images)

    def validation_errors(self, model: nn.Module, settings, phase: Phase, batch: Batch,
                          targets: np.ndarray) -> np.ndarray:
        """(B,) error of each validation sample, in `validation_measure` (lower is better); default: eq. 12
        RMSE of `validation_points` against `targets`, the batch's points as stored (float64)."""
        return rmse(self.validation_points(model, phase, batch).cpu().numpy(), targets)

    # -- inference and descriptors
    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, Z, Y, X) images -> (B, M, 3) world-frame correspondences (CORRESPONDENCES)."""
        raise NotImplementedError

    def localize(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 1, Z, Y, X) uncropped scans on their grids (LOCALIZES) -> "local" (B, M, 3) correspondences in
        each grid's frame (mm from its first voxel), "world" (B, M, 3), "image_to_world" (B, 4, 4) the rigid
        transform it found from the grid's frame to the world frame, "found" (B,) whether it found the
        anatomy at all and, for a method that segments it, "probability" (B, Z, Y, X) its mask of the anatomy
        on the scan's grid."""
        raise NotImplementedError

    def training_mean(self, model: nn.Module) -> np.ndarray:
        """The training mean shape (M, 3) the model carries, to judge its predictions by."""
        raise NotImplementedError

    def shape_code(self, model: nn.Module, shapes: torch.Tensor) -> torch.Tensor:
        """(B, M, 3) shapes -> (B, D) codes (PCA_SCORES or LATENT_CODE)."""
        raise NotImplementedError

    def image_code(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, Z, Y, X) images -> (B, D) codes predicted from the image, in shape_code's space."""
        raise NotImplementedError

    def decode(self, model: nn.Module, codes: torch.Tensor) -> torch.Tensor:
        """(B, D) codes -> (B, M, 3) shapes (LATENT_CODE)."""
        raise NotImplementedError


class TrainingData:
    """The training samples as a method's `prepare` / `begin_phase` sees them: the target shapes
    of the training rows (and their segmentations and further targets, for a method that needs them),
    a batch at a time, on the model's device."""

    def __init__(self, points, train_idx: np.ndarray, batch_size: int, device: torch.device, segmentations=None,
                 extras: dict | None = None):
        self.points, self.train_idx, self.batch_size, self.device = points, train_idx, batch_size, device
        self.segmentations, self.extras = segmentations, dict(extras or {})

    def _batches(self, store):
        for start in range(0, len(self.train_idx), self.batch_size):
            rows = self.train_idx[start:start + self.batch_size]
            yield torch.from_numpy(np.ascontiguousarray(store[rows], dtype=np.float32)).to(self.device)

    def point_batches(self):
        return self._batches(self.points)

    def extra_batches(self, name: str):
        """The training rows of a further target the training was given (SCANS: "world")."""
        if name not in self.extras:
            raise ValueError(f"this training was given no {name!r} rows (given: {sorted(self.extras) or 'none'})")
        return self._batches(self.extras[name])

    def segmentation_batches(self):
        if self.segmentations is None:
            raise ValueError("this training was given no segmentations")
        return self._batches(self.segmentations)
