"""Inference: correspondences for unsegmented images, in the world frame and back in each scan's frame.

Predictions are made on preprocessed images (world grid, training normalization);
the registration's image -> world transform of each scan maps them back into
the scanner frame, where a user's image lives.

Nothing is written for a scan whose prediction cannot be a shape of the training anatomy
(`prediction_problem`): a network fed a scan unlike its training scans, or a broken model,
returns finite-looking garbage that would otherwise flow silently into evaluation and studies.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .atomic import staged
from .full_field import preprocess_scan
from .inference import load_trained, localize, predict
from .io import apply_transform, write_particles
from .methods import LOCALIZES, MULTI_ANATOMY
from .preprocess import WorldGrid, load_grid, load_reference, preprocess_image

# A predicted shape's RMS radius about its centroid, as a multiple of the training mean shape's
# (the model's own buffer). Shapes of one anatomy differ in size by tens of percent (PCA modes,
# a similarity alignment's scale near 1); a factor of 4 either way is no shape of it.
RADIUS_RATIO = (0.25, 4.0)
ALIGNMENT_FILE = "alignment.npz"  # a LOCALIZES method's own alignment of each test scan (predict_scans)


class _OneDNNConv3d(nn.Module):
    """A frozen Conv3d run through oneDNN, with channels-last output.

    PyTorch sends a CPU conv3d with a batch of one to its im2col path, ~4x slower than
    oneDNN on the paper's layer sizes; channels-last activations also make the max-pools
    and PReLUs after it several times faster than on NCDHW tensors.
    """

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        self.register_buffer("weight", conv.weight.detach().contiguous(memory_format=torch.channels_last_3d))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.args = [list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten.mkldnn_convolution(x, self.weight, self.bias, *self.args)
        return out.contiguous(memory_format=torch.channels_last_3d)


def _fold(layers: nn.Sequential, onednn: bool) -> nn.Sequential:
    """The same layers with every Conv3d + BatchNorm3d pair folded into one conv."""
    out, pending = [], None
    for layer in layers:
        if isinstance(layer, nn.BatchNorm3d) and pending is not None:
            out[-1] = fuse_conv_bn_eval(pending, layer)
            pending = None
            continue
        out.append(layer)
        pending = layer if isinstance(layer, nn.Conv3d) else None
    if onednn:
        out = [_OneDNNConv3d(layer) if isinstance(layer, nn.Conv3d) else layer for layer in out]
    return nn.Sequential(*out)


def inference_model(model: nn.Module) -> nn.Module:
    """An evaluation-only copy of a trained model giving the same outputs (to float32
    rounding) faster: batch norms folded into the convs before them and, on a CPU with
    oneDNN, convs run through oneDNN on channels-last activations (see `_OneDNNConv3d`).
    The original model is left as it is."""
    fast = copy.deepcopy(model).eval().requires_grad_(False)
    device = next(fast.parameters()).device
    onednn = device.type == "cpu" and torch.backends.mkldnn.is_available()
    for module in list(fast.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential) and any(isinstance(c, nn.BatchNorm3d) for c in child):
                setattr(module, name, _fold(child, onednn))
    return fast


def _crop_model(model_dir):
    """A trained model that predicts from registered crops; one that localizes itself is refused (it reads scans)."""
    trained = load_trained(model_dir)
    if trained.has(LOCALIZES):
        raise ValueError(f"{model_dir}: method {trained.entry.name} finds the anatomy in the uncropped scan itself: "
                         f"predict it from the scans (--scans-dir), not from registered crops")
    return trained


def _scan_model(model_dir):
    """A trained model that finds the anatomy in an uncropped scan itself; one needing registered crops is refused."""
    trained = load_trained(model_dir)
    if not trained.has(LOCALIZES):
        raise ValueError(f"{model_dir}: method {trained.entry.name} does not find the anatomy in an uncropped scan "
                         f"itself: predict it from registered crops (--preprocess-dir), not from --scans-dir")
    return trained


def _scan_problem(method, found: bool, world: np.ndarray, mean: np.ndarray) -> str | None:
    """Why a prediction from an uncropped scan cannot stand (`prediction_problem`, or nothing found: the method's
    own `not_found` reason), or None."""
    if not found:
        return method.not_found
    return prediction_problem(world, mean, plausible_world_box(mean))


def predict_split(model_dir, preprocess_dir, split: str, out_dir, threads: int = 1) -> pd.DataFrame:
    """Predict every preprocessed image of a split; write particles/{id}_{world,local}.particles
    and predictions.csv (paths relative to it).

    Per-scan time = registration + resampling (from preprocessing) + the network.
    """
    torch.set_num_threads(max(1, threads))
    source = Path(preprocess_dir) / f"{split}.npz"
    data = np.load(source)
    trained = _crop_model(model_dir)
    model = inference_model(trained.model)
    world, network_seconds = predict(trained.method, model, data["images"], batch_size=1)
    mean, grid = trained.method.training_mean(model), load_grid(preprocess_dir)[1]
    _refuse([f"subject {subject}: {source}: prediction refused: {problem}"
             for subject, points in zip(data["ids"], world) if (problem := prediction_problem(points, mean, grid))])
    local = [apply_transform(np.linalg.inv(t), w) for t, w in zip(data["image_to_world"], world)]
    return _write_predictions(out_dir, data["ids"], world, local, data["seconds"], network_seconds)


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else
                         f"{len(problems)} predictions refused:\n  " + "\n  ".join(problems))


def _write_predictions(out_dir, ids, world, local, preprocess_seconds, network_seconds: float,
                       alignment: np.ndarray | None = None) -> pd.DataFrame:
    """particles/{id}_{world,local}.particles, predictions.csv (paths relative to it, per-scan times) and, for a
    method with its own alignment, alignment.npz (ids, image_to_world), all written together."""
    rows, files = [], []
    for i, subject in enumerate(ids):
        files.append((f"particles/{subject}_world.particles", world[i]))
        files.append((f"particles/{subject}_local.particles", local[i]))
        rows.append({"id": str(subject), "world_particles": f"particles/{subject}_world.particles",
                     "local_particles": f"particles/{subject}_local.particles",
                     "preprocess_seconds": float(preprocess_seconds[i]), "network_seconds": network_seconds,
                     "seconds_per_scan": float(preprocess_seconds[i]) + network_seconds})
    table = pd.DataFrame(rows)
    names = ["particles", "predictions.csv"] + ([ALIGNMENT_FILE] if alignment is not None else [])
    with staged(out_dir, names) as staging:
        (staging / "particles").mkdir()
        for name, points in files:
            write_particles(staging / name, points)
        table.to_csv(staging / "predictions.csv", index=False)
        if alignment is not None:
            np.savez(staging / ALIGNMENT_FILE, ids=np.array([str(i) for i in ids]), image_to_world=alignment)
    return table


def predict_scans(model_dir, scans_dir, split: str, out_dir, threads: int = 1) -> pd.DataFrame:
    """Predict every uncropped scan of a split with a method that finds the anatomy itself (LOCALIZES) from
    `full_field.preprocess_scans`'s {split}.npz: no registration. Writes what `predict_split` writes, the
    local particles put back into each scan's frame, and alignment.npz: ids and each scan's image_to_world
    (4x4, scan frame -> world), the method's own alignment, for the error decomposition.

    Per-scan time = reading and resampling the scan + the network."""
    torch.set_num_threads(max(1, threads))
    source = Path(scans_dir) / f"{split}.npz"
    data = np.load(source)
    trained = _scan_model(model_dir)
    model = inference_model(trained.model)
    found, network_seconds = localize(trained.method, model, data["images"], batch_size=1)
    mean = trained.method.training_mean(model)
    _refuse([f"subject {subject}: {source}: prediction refused: {problem}"
             for subject, hit, world in zip(data["ids"], found["found"], found["world"])
             if (problem := _scan_problem(trained.method, hit, world, mean))])
    scan_to_grid = np.tile(np.eye(4), (len(data["ids"]), 1, 1))
    scan_to_grid[:, :3, 3] = -data["origins"]  # the grid's frame is the scan's, less the grid's origin
    alignment = found["image_to_world"].astype(np.float64) @ scan_to_grid
    local = found["local"] + data["origins"][:, None].astype(found["local"].dtype)
    return _write_predictions(out_dir, data["ids"], found["world"], local, data["seconds"], network_seconds,
                              alignment)


def predict_scan_image(model_dir, scans_dir, image_path, out_prefix) -> dict:
    """A brand-new uncropped scan, from its file alone, with a method that finds the anatomy itself: writes
    {out_prefix}_world.particles and _local.particles (in the scan's frame); no registration."""
    start = time.perf_counter()
    meta = json.loads((Path(scans_dir) / "grid.json").read_text())
    array, origin, kept = preprocess_scan(image_path, meta)
    trained = _scan_model(model_dir)
    model = inference_model(trained.model)
    if len(meta.get("anatomies", [])) > 1:  # multi_scans' grid: several anatomies per scan
        return _predict_anatomies(trained, model, meta["anatomies"], array, origin, image_path, out_prefix, start)
    found, _ = localize(trained.method, model, array[None], batch_size=1)
    problem = _scan_problem(trained.method, found["found"][0], found["world"][0], trained.method.training_mean(model))
    if problem:
        raise ValueError(f"{image_path}: prediction refused: {problem}")
    out_prefix = Path(out_prefix)
    names = [f"{out_prefix.name}_world.particles", f"{out_prefix.name}_local.particles"]
    with staged(out_prefix.parent, names) as staging:
        write_particles(staging / names[0], found["world"][0])
        write_particles(staging / names[1], found["local"][0] + origin)
    if kept < 1.0:
        print(f"WARNING: {image_path}: the scan is larger than the network's grid; {100 * kept:.0f} % of its field "
              f"was kept around its centre", file=sys.stderr, flush=True)
    return {"world": str(out_prefix.parent / names[0]), "local": str(out_prefix.parent / names[1]),
            "seconds": time.perf_counter() - start, "field_kept": kept}


def _multi_model(trained, model, anatomies: list[str]) -> None:
    """Refuse a model that does not find these scans' anatomies (another method, or another cohort's model)."""
    if not trained.has(MULTI_ANATOMY) or model.n_anatomies != len(anatomies):
        raise ValueError(f"method {trained.entry.name} does not find the {len(anatomies)} anatomies these scans list "
                         f"({', '.join(anatomies)}): not the model of these scans")


def _detections(found: dict, n: int, anatomies: list[str], origin) -> dict[str, dict]:
    """Scan n's detection of each anatomy: detected or not, the heatmap's peak, the box centre (scan frame) and
    half extent."""
    return {anatomy: {"detected": bool(found["present"][n, k]), "peak": float(found["peak"][n, k]),
                      "centre_mm": (found["centre_mm"][n, k].numpy() + origin).tolist(),
                      "half_extent_mm": found["size_mm"][n, k].tolist()} for k, anatomy in enumerate(anatomies)}


def _predict_anatomies(trained, model, anatomies: list[str], array, origin, image_path, out_prefix, start) -> dict:
    """Every anatomy a multi-anatomy model (massm) detects in one scan: {out_prefix}_{anatomy}_world.particles and
    _local.particles (in the scan's frame) of each detected one, and {out_prefix}_detections.json for all of them
    (detected or not, the heatmap's peak, the box centre and half extent in the scan's frame)."""
    _multi_model(trained, model, anatomies)
    with torch.no_grad():
        found = trained.method.detect(model, torch.as_tensor(array[None, None]))
    out_prefix = Path(out_prefix)
    detections = _detections(found, 0, anatomies, origin)
    files = {anatomy: {frame: f"{out_prefix.name}_{anatomy}_{frame}.particles" for frame in ("world", "local")}
             for anatomy, d in detections.items() if d["detected"]}
    names = [name for pair in files.values() for name in pair.values()] + [f"{out_prefix.name}_detections.json"]
    with staged(out_prefix.parent, names) as staging:
        for k, anatomy in enumerate(anatomies):
            if anatomy in files:
                write_particles(staging / files[anatomy]["world"], found["world"][0, k].numpy())
                write_particles(staging / files[anatomy]["local"], found["local"][0, k].numpy() + origin)
        (staging / names[-1]).write_text(json.dumps(detections, indent=2) + "\n")
    return {"detections": str(out_prefix.parent / names[-1]),
            "particles": {a: {frame: str(out_prefix.parent / name) for frame, name in pair.items()}
                          for a, pair in files.items()},
            "seconds": time.perf_counter() - start}


def predict_multi(model_dir, scans_dir, split: str, out_dir) -> pd.DataFrame:
    """Every anatomy of every scan of a multi-anatomy split (multi_scans' {split}.npz), all or nothing:
    particles/{id}_{anatomy}_world.particles and _local.particles (the scan's frame) of each detected one, and
    predictions.csv, a row per scan and anatomy (detected or not, peak, box centre in the scan's frame, files)."""
    scans_dir = Path(scans_dir)
    meta = json.loads((scans_dir / "grid.json").read_text())
    data = np.load(scans_dir / f"{split}.npz")
    trained = _scan_model(model_dir)
    model = inference_model(trained.model)
    anatomies = list(meta["anatomies"])
    _multi_model(trained, model, anatomies)
    rows, particles = [], {}
    for n, subject in enumerate(str(i) for i in data["ids"]):
        start = time.perf_counter()
        with torch.no_grad():
            found = trained.method.detect(model, torch.as_tensor(data["images"][n:n + 1]).unsqueeze(1))
        seconds = time.perf_counter() - start
        origin = np.asarray(data["origins"][n], dtype=np.float64)
        for k, (anatomy, d) in enumerate(_detections(found, 0, anatomies, origin).items()):
            files = {f: f"particles/{subject}_{anatomy}_{f}.particles" for f in ("world", "local")} \
                if d["detected"] else {"world": "", "local": ""}
            if d["detected"]:
                particles[files["world"]] = found["world"][0, k].numpy()
                particles[files["local"]] = found["local"][0, k].numpy() + origin
            rows.append({"id": subject, "anatomy": anatomy, "detected": d["detected"], "peak": d["peak"],
                         **{f"centre_{axis}_mm": v for axis, v in zip("xyz", d["centre_mm"])},
                         "world_particles": files["world"], "local_particles": files["local"],
                         "network_seconds": seconds})
    table = pd.DataFrame(rows)
    with staged(out_dir, ["predictions.csv", "particles"]) as staging:
        (staging / "particles").mkdir()
        for name, points in particles.items():
            write_particles(staging / name, points)
        table.to_csv(staging / "predictions.csv", index=False)
    return table


def plausible_world_box(mean: np.ndarray) -> WorldGrid:
    """Where a shape of the anatomy may lie in the world frame, for a method with no preprocess grid: the mean
    shape's bounding box plus half its size on every side."""
    return WorldGrid.around(mean, 1.0, float(np.ptp(mean, axis=0).max()) / 2)


def predict_image(model_dir, preprocess_dir, image_path, out_prefix, accept_flagged_registration: bool = False
                  ) -> dict:
    """A brand-new image, from its file alone: writes {out_prefix}_world.particles and _local.particles.

    The scan is checked as it is read (`scan_checks.read_scan`: path, 3D scalar header, voxels,
    intensities), so that a broken file is named as such rather than failing inside registration.
    A registration its checks flag as failed (`registration.register`'s warnings) refuses the scan, since
    the particles would carry its error; `accept_flagged_registration` predicts anyway, with the warning
    printed. The registration's record (metric, warnings, ...) is returned with the files.
    """
    start = time.perf_counter()
    meta, grid, reference = load_reference(preprocess_dir)
    try:
        array, image_to_world, registration = preprocess_image(image_path, meta, grid, reference)
    except RuntimeError as error:  # SimpleITK's way of failing (the file itself is checked as it is read)
        raise ValueError(f"{image_path}: cannot preprocess the image: {str(error).strip()}") from None
    if registration["warning"] and not accept_flagged_registration:
        raise ValueError(f"{image_path}: prediction refused: its registration to the reference looks failed: "
                         f"{registration['warning']}. Check that the scan shows the anatomy the model was trained "
                         f"on, or pass --accept-flagged-registration to predict from this registration anyway")
    trained = _crop_model(model_dir)
    model = inference_model(trained.model)
    world, _ = predict(trained.method, model, array[None].astype(np.float32), batch_size=1)
    problem = prediction_problem(world[0], trained.method.training_mean(model), grid)
    if problem:
        raise ValueError(f"{image_path}: prediction refused: {problem}")
    out_prefix = Path(out_prefix)
    names = [f"{out_prefix.name}_world.particles", f"{out_prefix.name}_local.particles"]
    with staged(out_prefix.parent, names) as staging:
        write_particles(staging / names[0], world[0])
        write_particles(staging / names[1], apply_transform(np.linalg.inv(image_to_world), world[0]))
    for message in filter(None, (registration["fallback"], registration["warning"])):
        print(f"WARNING: {image_path}: {message}", file=sys.stderr, flush=True)
    return {"world": str(out_prefix.parent / names[0]), "local": str(out_prefix.parent / names[1]),
            "seconds": time.perf_counter() - start, "registration": registration}


# ---------------------------------------------------------------- plausibility of a prediction

def _rms_radius(points: np.ndarray) -> float:
    return float(np.sqrt(((points - points.mean(0)) ** 2).sum(1).mean()))


def prediction_problem(world: np.ndarray, mean: np.ndarray, grid: WorldGrid) -> str | None:
    """Why world-frame points (M, 3) cannot be a shape of the training anatomy, or None.

    Every point finite; RMS radius within RADIUS_RATIO of the training mean shape's; centroid
    inside the world grid (the bounding box of all training shapes plus a margin, so it holds
    the mean's centroid and every training centroid); no point farther outside the grid than
    half its size on that axis (which, for a shape filling the grid, also caps growth at about
    twice the training extent along any one axis).
    """
    bad = ~np.isfinite(world).all(1)
    if bad.any():
        return f"{int(bad.sum())} of {len(world)} predicted points are not finite (NaN or inf)"
    radius, expected = _rms_radius(world), _rms_radius(mean)
    ratio = radius / expected if expected > 0 else np.inf
    if not RADIUS_RATIO[0] <= ratio <= RADIUS_RATIO[1]:
        return (f"the predicted shape's RMS radius is {radius:.3g} mm, {ratio:.3g} times the training mean "
                f"shape's {expected:.3g} mm (plausible: {RADIUS_RATIO[0]:g} to {RADIUS_RATIO[1]:g} times)")
    low = np.array(grid.origin)
    high = low + np.array(grid.spacing) * (np.array(grid.size) - 1)
    box = f"the world grid spans {_fmt(low)} to {_fmt(high)} mm"
    centroid = world.mean(0)
    if ((centroid < low) | (centroid > high)).any():
        return f"the predicted shape's centroid {_fmt(centroid)} mm lies outside the training shapes ({box})"
    reach = (high - low) / 2
    outside = ((world < low - reach) | (world > high + reach)).any(1)
    if outside.any():
        return (f"{int(outside.sum())} of {len(world)} predicted points lie far outside the world grid "
                f"(first at {_fmt(world[outside][0])} mm; {box})")
    return None


def _fmt(point) -> str:
    return "(" + ", ".join(f"{v:.1f}" for v in point) + ")"
