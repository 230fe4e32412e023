"""Image-only registration of an unseen scan onto the world-frame reference image.

Every DeepSSM prediction starts here, so it is built to stay near a plausible pose
rather than to wander wherever the image metric leads:

1. The prior comes from the training cohort: the mean rotation of the shape model's own
   image -> world transforms (scans of one cohort share a scanner orientation, give or
   take), the spread of those rotations, the reference shape's centre and radius, and
   the range of scales the shape model allows (none when it is rigid).
2. Translation is found globally, not by descent: a masked normalized cross-correlation of
   the reference anatomy's box over every shift of the scan (FFT, coarse grid), with the scan
   turned by the prior rotation. A scan whose anatomy is far from its field's centre is
   found as easily as a centred one.
3. Rotation: a few starts around the prior (itself and +-`theta` about each axis, theta
   from the training spread), each a short coarse rigid descent; the best metric wins
   and is refined on the fine grid. No start lies near a 180-degree flip. Optimizer scales
   come from the anatomy's radius (squared surface displacement per unit of each
   parameter), so a step turns the anatomy by about as many millimetres as it shifts it;
   steps start at one voxel of the level and halve on every reversal.
4. A similarity stage refines the rigid pose (unless `registration: rigid`, which is rigid
   only). Its first step is small (it starts where only the scale has a gradient), and
   its result is rejected, with the reason kept, when the scale leaves the range of sizes
   seen in training or it turns or moves the anatomy far from the rigid pose. When the
   shape model is rigid (`auto`), the similarity fit's rotation and centre are kept
   without its scale: a rigid fit of a larger or smaller anatomy has no clear optimum,
   and this measured better on every synthetic anatomy and shape kind (README).
5. Every result carries its metric, iterations, winning start, rotation away from the
   prior, scale, fallback and warnings; a warning is raised when the metric is far worse
   than the training images' own metric at their true pose, when the rotation lies far
   outside the training poses, or when the anatomy is placed where no training scan has it:
   farther than its own radius outside the box of the training positions, both in scanner
   coordinates and as an offset from the scan's field centre (either alone would flag a
   correct registration of a scan with another origin, or a wider field). On the hip's
   bladder, the 13 registrations 170-240 mm off were all outside by over 150 mm, the 6
   that landed by under 1 mm (README).

Correlation (sitk's `Correlation`, -NCC^2) ignores the intensity gain that differs
between scans (MRI).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import fft

# Starts are spread by the training cohort's own pose spread, within these bounds (degrees):
# below 10 the starts coincide; beyond 30 a start could reach a symmetric shape's other basin.
START_ANGLE_DEG = (10.0, 30.0)
POSE_SLACK_DEG = 20.0  # a pose this far beyond the training spread is flagged
SIMILARITY_MAX_SHIFT = 0.25  # of the anatomy's radius: similarity may refine the rigid pose, not replace it
SIMILARITY_MAX_TURN_DEG = 10.0
SCALE_SLACK = 0.1  # widening of the training scale range
SEARCH_MARGIN_MM = 5.0  # around the reference shape: the region the translation search matches
MIN_OVERLAP = 0.5  # fraction of that region that must lie inside the scan for a shift to count
FINE_SAMPLING, SAMPLING_SEED = 0.25, 7  # fixed seed: reruns give identical transforms
# The similarity stage starts at the rigid optimum, where the gradient points along the scale alone;
# its first step (in the optimizer's parameter units: scale, about radians, mm) must stay small.
SIMILARITY_STEP = 0.15
METRIC_MAD_LIMIT = 4.0  # robust z-score (median / MAD of the training metrics) beyond which a metric is flagged
METRIC_MIN_MARGIN = 0.05  # ... and at least this much worse than the worst training metric


@dataclass(frozen=True)
class RegistrationPrior:
    """What the training cohort says about where an unseen scan's anatomy can be."""

    transform: str  # rigid | similarity: the class of the result
    scale_search: bool  # run the similarity stage (for a rigid result: its pose, without its scale)
    rotation: tuple  # 3x3 world -> image rotation, row-major (mean of the training poses)
    spread_deg: float  # largest angle between a training pose and the mean
    centre: tuple  # world centroid of the reference shape (rotation centre)
    radius_mm: float  # RMS radius of the reference shape (optimizer scales)
    search_box: tuple  # (lower, upper) world corners of the reference anatomy: what the translation search matches
    scale_range: tuple = (0.67, 1.5)  # scan / reference anatomy size ratios seen in training, widened
    metric_median: float | None = None  # the training images' metric at their true pose
    metric_mad: float | None = None
    metric_worst: float | None = None
    # where the reference anatomy's centre lies in the training scans at their true pose: (lower, upper)
    # corners of the box of its scanner coordinates, and of its offsets from each scan's field centre
    position_box: tuple | None = None
    offset_box: tuple | None = None

    @classmethod
    def from_training(cls, transform: str, scale_search: bool, image_to_world: np.ndarray, world: np.ndarray,
                      reference_index: int) -> "RegistrationPrior":
        linear = image_to_world[:, :3, :3]
        scales = np.cbrt(np.linalg.det(linear))
        # world -> image rotations, their chordal mean, and the angles to it
        rotations = np.array([np.linalg.inv(m / s) for m, s in zip(linear, scales)])
        mean = project_to_rotation(rotations.mean(0))
        spread = max(rotation_angle_deg(r @ mean.T) for r in rotations)
        reference = world[reference_index]
        centre = reference.mean(0)
        box = (tuple((reference.min(0) - SEARCH_MARGIN_MM).tolist()),
               tuple((reference.max(0) + SEARCH_MARGIN_MM).tolist()))
        radius = float(np.sqrt(((reference - centre) ** 2).sum(1).mean()))
        # sizes in the scans (mm), relative to the reference's: the scales a registration may find
        radii = np.sqrt(((world - world.mean(1, keepdims=True)) ** 2).sum(2).mean(1)) / scales
        ratio = radii / radii[reference_index]
        scale_range = (float(ratio.min() * (1 - SCALE_SLACK)), float(ratio.max() * (1 + SCALE_SLACK)))
        return cls(transform, scale_search, tuple(mean.ravel().tolist()), float(spread), tuple(centre.tolist()), radius,
                   box, scale_range)

    def with_training_scans(self, metrics: np.ndarray, world_to_image: np.ndarray,
                            field_centres: np.ndarray) -> "RegistrationPrior":
        """The prior with what the training scans look like at their true pose: their metrics, and where
        the anatomy lies in them (`world_to_image`: (N, 4, 4); `field_centres`: (N, 3), `field_centre`)."""
        metrics = np.asarray(metrics, dtype=float)
        median = float(np.median(metrics))
        mad = float(np.median(np.abs(metrics - median)))
        placed = world_to_image[:, :3, :3] @ np.array(self.centre) + world_to_image[:, :3, 3]
        return RegistrationPrior(**{**asdict(self), "metric_median": median, "metric_mad": mad,
                                    "metric_worst": float(metrics.max()), "position_box": _box(placed),
                                    "offset_box": _box(placed - field_centres)})

    @classmethod
    def from_dict(cls, data: dict) -> "RegistrationPrior":
        data = dict(data)
        data["scale_range"] = tuple(data["scale_range"])
        for key in ("search_box", "position_box", "offset_box"):
            if data.get(key) is not None:
                data[key] = tuple(tuple(corner) for corner in data[key])
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @property
    def rotation_matrix(self) -> np.ndarray:
        return np.array(self.rotation).reshape(3, 3)

    def metric_limit(self) -> float | None:
        """The metric beyond which a scan looks misregistered (None: nothing to compare with)."""
        if self.metric_median is None:
            return None
        return max(self.metric_median + METRIC_MAD_LIMIT * 1.4826 * self.metric_mad,
                   self.metric_worst + METRIC_MIN_MARGIN)

    def misplacement_mm(self, placed: np.ndarray, field: np.ndarray) -> float | None:
        """How far (mm) the anatomy's centre, placed at `placed` in a scan whose field centre is `field`, lies
        outside where the training scans have it: the lesser of the distances to the two boxes (None: a prior
        from before the boxes were recorded)."""
        if self.position_box is None or self.offset_box is None:
            return None
        return min(_distance_outside(placed, self.position_box), _distance_outside(placed - field, self.offset_box))


def _box(points: np.ndarray) -> tuple:
    return tuple(points.min(0).tolist()), tuple(points.max(0).tolist())


def _distance_outside(point: np.ndarray, box: tuple) -> float:
    lower, upper = (np.array(corner) for corner in box)
    return float(np.linalg.norm(np.maximum(0.0, np.maximum(lower - point, point - upper))))


def field_centre(image: sitk.Image) -> np.ndarray:
    """The physical point at the centre of a scan's field of view."""
    return np.array(image.TransformContinuousIndexToPhysicalPoint(((np.array(image.GetSize()) - 1) / 2).tolist()))


@dataclass
class Registration:
    """The result for one scan: world -> image transform and how it was reached."""

    world_to_image: sitk.Transform
    metric: float
    iterations: int
    start: int  # index of the winning start (0: the prior rotation itself)
    rotation_from_prior_deg: float
    scale: float
    fallback: str = ""  # why the similarity result was not kept
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def facts(self) -> dict:
        """The per-scan record stored in the preprocessing artifact."""
        return {"metric": self.metric, "iterations": self.iterations, "start": self.start,
                "rotation_from_prior_deg": self.rotation_from_prior_deg, "scale": self.scale,
                "fallback": self.fallback, "warning": "; ".join(self.warnings), "seconds": self.seconds}


# ---------------------------------------------------------------- rotations


def project_to_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation nearest a 3x3 matrix (Frobenius norm)."""
    u, _, vt = np.linalg.svd(matrix)
    return u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt


def rotation_angle_deg(rotation: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))


def axis_rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def start_rotations(prior: RegistrationPrior) -> list[np.ndarray]:
    theta = float(np.clip(prior.spread_deg, *START_ANGLE_DEG))
    base = prior.rotation_matrix
    return [base] + [base @ axis_rotation(axis, sign * theta) for axis in range(3) for sign in (1, -1)]


# ---------------------------------------------------------------- the translation search


def _grid_image(grid: dict) -> sitk.Image:
    image = sitk.Image([int(s) for s in grid["size"]], sitk.sitkFloat32)
    image.SetOrigin([float(v) for v in grid["origin"]])
    image.SetSpacing([float(v) for v in grid["spacing"]])
    return image


def initial_translation(moving: sitk.Image, reference: sitk.Image, prior: RegistrationPrior,
                        spacing: float) -> np.ndarray:
    """The shift b (image frame) for which moving(R0 x + b) best matches the reference anatomy's box,
    by masked normalized cross-correlation over every shift on a `spacing` grid (FFT)."""
    rotation = prior.rotation_matrix
    box_lower, box_upper = (np.array(corner) for corner in prior.search_box)

    # the reference on an axis-aligned world grid, the anatomy's box marked
    ref_origin = np.array(reference.GetOrigin())
    ref_upper = ref_origin + np.array(reference.GetSpacing()) * (np.array(reference.GetSize()) - 1)
    ref_size = np.floor((ref_upper - ref_origin) / spacing).astype(int) + 1
    fixed_grid = {"origin": ref_origin, "spacing": [spacing] * 3, "size": ref_size}
    fixed = sitk.GetArrayFromImage(sitk.Resample(reference, _grid_image(fixed_grid), sitk.Transform(),
                                                 sitk.sitkLinear, 0.0, sitk.sitkFloat32)).astype(np.float64)
    axes = [ref_origin[a] + spacing * np.arange(ref_size[a]) for a in range(3)]
    inside = [(axes[a] >= box_lower[a] - 1e-6) & (axes[a] <= box_upper[a] + 1e-6) for a in range(3)]
    fixed_mask = (inside[2][:, None, None] & inside[1][None, :, None] & inside[0][None, None, :]).astype(np.float64)

    # the scan seen through the prior rotation, on a world-axis grid whose lattice matches the fixed one
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)
    extent = np.array(moving.GetSize()) - 1
    physical = np.array([moving.TransformContinuousIndexToPhysicalPoint((c * extent).tolist()) for c in corners])
    seen = physical @ rotation  # R0^T p: where each corner lies in the rotated frame
    low = ref_origin - spacing * np.ceil((ref_origin - seen.min(0)) / spacing)
    size = np.floor((seen.max(0) - low) / spacing).astype(int) + 1
    grid = _grid_image({"origin": low, "spacing": [spacing] * 3, "size": size})
    turn = sitk.AffineTransform(3)
    turn.SetMatrix(rotation.ravel().tolist())
    values = sitk.GetArrayFromImage(sitk.Resample(moving, grid, turn, sitk.sitkLinear, 0.0,
                                                  sitk.sitkFloat32)).astype(np.float64)
    ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving)
    mask = sitk.GetArrayFromImage(sitk.Resample(ones, grid, turn, sitk.sitkNearestNeighbor, 0.0,
                                                sitk.sitkFloat32)).astype(np.float64)
    values *= mask

    # correlations of every fixed-side quantity with every moving-side one, for all shifts at once
    shape = [f + m - 1 for f, m in zip(fixed.shape, values.shape)]
    flip = (slice(None, None, -1),) * 3

    def spectrum(a, flipped=False):
        return fft.rfftn(a[flip] if flipped else a, shape)

    f_m, f_v = spectrum(fixed_mask, True), spectrum(fixed * fixed_mask, True)
    f_f = spectrum(fixed**2 * fixed_mask, True)
    m_m, m_v, m_v2 = spectrum(mask), spectrum(values), spectrum(values**2)

    def corr(a, b):
        return fft.irfftn(a * b, shape)

    n = corr(f_m, m_m)
    sum_f, sum_f2 = corr(f_v, m_m), corr(f_f, m_m)
    sum_m, sum_m2 = corr(f_m, m_v), corr(f_m, m_v2)
    sum_fm = corr(f_v, m_v)
    valid = n > MIN_OVERLAP * fixed_mask.sum()
    n_safe = np.where(valid, n, 1.0)
    covariance = sum_fm - sum_f * sum_m / n_safe
    variance = (sum_f2 - sum_f**2 / n_safe) * (sum_m2 - sum_m**2 / n_safe)
    score = np.where(valid & (variance > 1e-12), covariance / np.sqrt(np.maximum(variance, 1e-12)), -np.inf)
    if not np.isfinite(score).any():
        raise ValueError("the scan's field of view cannot hold the reference anatomy at any shift "
                         "(does the scan contain the anatomy, at this voxel size?)")
    best = np.array(np.unravel_index(int(np.argmax(score)), score.shape))  # (z, y, x)
    # full-correlation index q means moving voxel j = fixed voxel i + q - (n_fixed - 1)
    offset_voxels = (best - (np.array(fixed.shape) - 1))[::-1]
    shift_rotated = low + spacing * offset_voxels - ref_origin  # world-axis displacement c
    return rotation @ shift_rotated  # b = R0 c


# ---------------------------------------------------------------- descent


def _method(prior: RegistrationPrior, transform: sitk.Transform, shrink: int, spacing: float,
            iterations: int, step: float) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    if shrink == 1:  # a fixed random quarter of the fine grid's voxels: 4x faster, as accurate (README)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(FINE_SAMPLING, SAMPLING_SEED)
    else:
        method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=step, minStep=step / 200,
                                                    numberOfIterations=iterations, relaxationFactor=0.5,
                                                    gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScales(_scales(transform, prior.radius_mm))
    method.SetShrinkFactorsPerLevel([shrink])
    method.SetSmoothingSigmasPerLevel([spacing * (shrink - 1)])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    return method


def _scales(transform: sitk.Transform, radius: float) -> list[float]:
    """Optimizer scales = (surface displacement in mm per unit of each parameter)^2, so that
    a step of length L moves the anatomy by about L mm whichever parameter it changes."""
    if isinstance(transform, sitk.Similarity3DTransform):  # versor (~half angle), translation, scale
        return [(2 * radius) ** 2] * 3 + [1.0] * 3 + [radius**2]
    return [radius**2] * 3 + [1.0] * 3  # Euler angles, translation


def _descend(fixed, moving, prior, transform, shrink, spacing, iterations, step) -> tuple[float, int]:
    method = _method(prior, transform, shrink, spacing, iterations, step)
    method.Execute(fixed, moving)
    return float(method.GetMetricValue()), int(method.GetOptimizerIteration())


def _rigid(rotation: np.ndarray, centre: np.ndarray, image_centre: np.ndarray) -> sitk.Euler3DTransform:
    """x -> rotation (x - centre) + image_centre, as an Euler transform about `centre`."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter(centre.tolist())
    transform.SetMatrix(rotation.ravel().tolist())
    transform.SetTranslation((image_centre - centre).tolist())
    return transform


def register(moving: sitk.Image, reference: sitk.Image, prior: RegistrationPrior) -> Registration:
    """World -> image transform of an unseen scan onto the world-frame reference (see the module doc).

    `moving` should already be smoothed to the reference's resolution."""
    start_time = time.perf_counter()
    spacing = float(reference.GetSpacing()[0])
    centre = np.array(prior.centre)
    shift = initial_translation(moving, reference, prior, 2 * spacing)
    image_centre = prior.rotation_matrix @ centre + shift  # where the reference's centre lands in the scan

    # coarse rigid descents from every start; the best metric wins and is refined on the fine grid
    results = []
    for rotation in start_rotations(prior):
        candidate = _rigid(rotation, centre, image_centre)
        metric, iterations = _descend(reference, moving, prior, candidate, 2, spacing, 40, 2 * spacing)
        results.append((metric, iterations, candidate))
    best = int(np.argmin([r[0] for r in results]))
    rigid = results[best][2]
    metric, fine_iterations = _descend(reference, moving, prior, rigid, 1, spacing, 60, spacing)
    iterations = sum(r[1] for r in results) + fine_iterations
    result, fallback, scale = rigid, "", 1.0

    if prior.scale_search:
        similarity = sitk.Similarity3DTransform()
        similarity.SetCenter(rigid.GetCenter())
        similarity.SetMatrix(rigid.GetMatrix())
        similarity.SetTranslation(rigid.GetTranslation())
        similarity_metric, more = _descend(reference, moving, prior, similarity, 1, spacing, 60, SIMILARITY_STEP)
        iterations += more
        fallback = _similarity_problem(similarity, rigid, prior)
        if not fallback and prior.transform == "similarity":
            result, metric, scale = similarity, similarity_metric, float(similarity.GetScale())
        elif not fallback:  # a rigid shape model: the similarity fit's rotation and centre, without its scale
            turn = np.array(similarity.GetMatrix()).reshape(3, 3) / similarity.GetScale()
            result = _rigid(turn, centre, np.array(similarity.TransformPoint(centre.tolist())))

    linear = np.array(result.GetMatrix()).reshape(3, 3) / scale
    turned = rotation_angle_deg(linear @ prior.rotation_matrix.T)
    registration = Registration(result, metric, iterations, best, turned, scale, fallback)
    limit = prior.metric_limit()
    if limit is not None and metric > limit:
        registration.warnings.append(f"metric {metric:.3f} is worse than every training image's at its true pose "
                                     f"(median {prior.metric_median:.3f}, flag beyond {limit:.3f})")
    if turned > prior.spread_deg + POSE_SLACK_DEG:
        registration.warnings.append(f"rotation {turned:.0f} deg from the training poses' mean, whose spread "
                                     f"is {prior.spread_deg:.0f} deg")
    outside = prior.misplacement_mm(np.array(result.TransformPoint(centre.tolist())), field_centre(moving))
    if outside is not None and outside > prior.radius_mm:
        registration.warnings.append(f"anatomy placed {outside:.0f} mm outside where the training scans have it "
                                     f"(more than its radius, {prior.radius_mm:.0f} mm)")
    registration.seconds = time.perf_counter() - start_time
    return registration


def _similarity_problem(similarity: sitk.Similarity3DTransform, rigid: sitk.Euler3DTransform,
                        prior: RegistrationPrior) -> str:
    """Why the similarity result should not replace the rigid one ('' when it may)."""
    scale = similarity.GetScale()
    low, high = prior.scale_range
    if not low <= scale <= high:
        return f"similarity scale {scale:.3f} outside the training range {low:.2f}-{high:.2f}"
    turn = rotation_angle_deg((np.array(similarity.GetMatrix()).reshape(3, 3) / scale)
                              @ np.array(rigid.GetMatrix()).reshape(3, 3).T)
    if turn > SIMILARITY_MAX_TURN_DEG:
        return f"similarity turned {turn:.1f} deg away from the rigid pose"
    centre = list(prior.centre)
    moved = np.linalg.norm(np.array(similarity.TransformPoint(centre)) - np.array(rigid.TransformPoint(centre)))
    if moved > SIMILARITY_MAX_SHIFT * prior.radius_mm:
        return f"similarity moved the anatomy's centre {moved:.1f} mm from the rigid pose"
    return ""


def metric_at(moving: sitk.Image, reference: sitk.Image, world_to_image: sitk.Transform) -> float:
    """The registration metric of a scan at a given pose (the training images at their true one)."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsCorrelation()
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(world_to_image)
    return float(method.MetricEvaluate(reference, moving))


def registration_errors(estimated: np.ndarray, true: np.ndarray, world_points: np.ndarray) -> tuple[float, float]:
    """(rotation error in degrees, translation error in mm at the shape's centroid) of an
    estimated image -> world transform against the true one."""
    est_inv, true_inv = np.linalg.inv(estimated), np.linalg.inv(true)
    rotation = est_inv[:3, :3] / np.cbrt(np.linalg.det(est_inv[:3, :3]))
    truth = true_inv[:3, :3] / np.cbrt(np.linalg.det(true_inv[:3, :3]))
    centroid = world_points.mean(0)
    shift = (est_inv[:3, :3] @ centroid + est_inv[:3, 3]) - (true_inv[:3, :3] @ centroid + true_inv[:3, 3])
    return rotation_angle_deg(rotation @ truth.T), float(np.linalg.norm(shift))
