"""Training: the split, the base and TL loops, checkpoints and exact resumption (CPU, tiny data)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from deepssm_workflow import methods
from deepssm_workflow.engine import EngineSettings, train
from deepssm_workflow.holdout import split_by_source
from deepssm_workflow.inference import load_trained, predict
from deepssm_workflow.rows import NpyRows, ScaledRows, StackedRows
from deepssm_workflow.shape_space import ShapeSpace, rmse

GRID, M, N_REAL, PER = 16, 24, 12, 1
SMALL_NET = {"channels": [4, 8, 8, 16, 16], "fc_sizes": [32, 16]}
ENGINE = EngineSettings(batch_size=4, val_fraction=0.25)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; also keeps float reductions identical across processes
    yield
    torch.set_num_threads(threads)


def make_data(seed: int = 0, n_real: int = N_REAL):
    """n_real real shapes (mean + 3 random modes) and one 'generated' neighbour of each; images are
    Gaussian blobs at four of the shape's points on a 16^3 grid, so the shape can be read off."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(5, 11, (M, 3))
    modes = rng.normal(0, 1, (3, M, 3))
    source = np.repeat(np.arange(n_real), PER)
    real = rng.normal(0, 1.2, (n_real, 3))
    scores = np.concatenate([real, real[source] + rng.normal(0, 0.3, (len(source), 3))])
    points = (mean + np.einsum("nk,kmd->nmd", scores, modes)).astype(np.float32)
    zz, yy, xx = np.meshgrid(*(np.arange(GRID),) * 3, indexing="ij")
    images = np.zeros((len(points), GRID, GRID, GRID), np.float32)
    for i, shape in enumerate(points):
        for x, y, z in shape[:4]:
            images[i] += np.exp(-((xx - x) ** 2 + (yy - y) ** 2 + (zz - z) ** 2) / (2 * 1.5 ** 2))
    return images, points, source


@pytest.fixture(scope="module")
def data():
    images, points, source = make_data()
    train_idx, val_idx = split_by_source(N_REAL, source, 0.25, seed=0)
    space = ShapeSpace(n_modes=3).fit(points[train_idx])
    return images, points, train_idx, val_idx, space


def settings(method: str = "base", **overrides):
    """Small settings of a DeepSSM method (the TL ones: 2 + 3 + 2 epochs)."""
    if methods.get(method).has(methods.LATENT_CODE):
        block = dict(ae_epochs=2, ae_lr=1e-4, tflank_epochs=3, joint_epochs=2, latent_dim=8,
                     network={**SMALL_NET, "ae_hidden": 32})
    else:
        block = dict(epochs=12, network=SMALL_NET)
    return methods.get(method).settings({**block, **overrides})


def fit(data, method, chosen, out, **options):
    images, points, train_idx, val_idx, space = data
    return train(method, chosen, images, points, train_idx, val_idx, space, out, engine=ENGINE, **options)


def read_log(out):
    with open(out / "log.csv") as handle:
        return list(csv.DictReader(handle))


def model_weights(path):
    return torch.load(path, weights_only=True)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- split


def test_split_by_source_keeps_subjects_on_one_side():
    rng = np.random.default_rng(3)
    n_real = 20
    source = rng.integers(0, n_real, 57)
    train_idx, val_idx = split_by_source(n_real, source, 0.2, seed=5)
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(n_real + len(source)))

    def subjects(idx):
        return {int(i) if i < n_real else int(source[i - n_real]) for i in idx}

    assert not subjects(train_idx) & subjects(val_idx)
    assert sum(i < n_real for i in val_idx) == 4  # 20 % of the real subjects
    again = split_by_source(n_real, source, 0.2, seed=5)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], val_idx)
    other = split_by_source(n_real, source, 0.2, seed=6)
    assert not np.array_equal(other[1], val_idx)
    with pytest.raises(ValueError):
        split_by_source(n_real, [n_real], 0.2)


# -- base


def test_base_learns_and_keeps_pca_layer(data, tmp_path):
    images, points, train_idx, val_idx, space = data
    messages = []
    card = fit(data, "base", settings(), tmp_path, log=messages.append, data_hash="abc")
    assert any("no CUDA device visible, using CPU" in m or "CUDA visible:" in m for m in messages)

    state = model_weights(tmp_path / "model.pt")  # weights_only=True
    # the fixed layer is the PCA reconstruction in whitened units, untouched by training
    whitened_basis = space.basis * np.sqrt(space.variances)[:, None]
    assert np.array_equal(state["pca_weight"].cpu().numpy(), whitened_basis.T.astype(np.float32))
    assert np.array_equal(state["pca_bias"].cpu().numpy(), space.mean.reshape(-1).astype(np.float32))

    rows = read_log(tmp_path)
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    val = [float(r["val_rmse"]) for r in rows]
    mean_rmse = rmse(np.broadcast_to(space.mean, points[val_idx].shape), points[val_idx]).mean()
    assert card["val_rmse"] == pytest.approx(min(val))
    assert card["val_rmse"] < val[0]
    assert card["val_rmse"] < 0.8 * mean_rmse

    on_disk = json.loads((tmp_path / "model_card.json").read_text())
    assert on_disk["best_epoch"] == int(np.argmin(val)) + 1
    assert on_disk["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and on_disk["data_hash"] == "abc"
    assert on_disk["n_train"] == len(train_idx) and on_disk["n_val"] == len(val_idx)
    assert (tmp_path / "loss_curve.png").stat().st_size > 0

    # the saved best model reproduces the best validation RMSE through predict (and from a memmap)
    np.save(tmp_path / "images.npy", images)
    memmap = np.load(tmp_path / "images.npy", mmap_mode="r")
    trained = load_trained(tmp_path, device=card["device"])
    pred, seconds = predict(trained.method, trained.model, memmap, batch_size=5)
    assert pred.shape == points.shape and seconds > 0
    assert rmse(pred[val_idx], points[val_idx]).mean() == pytest.approx(card["val_rmse"], rel=1e-3)


def test_focal_base_records_threshold(data, tmp_path):
    card = fit(data, "base_focal", settings("base_focal", epochs=2), tmp_path, log=lambda _: None)
    assert card["state"]["focal_c_points"] > 0 and card["state"]["focal_c_latent"] is None


# -- TL


def test_tl_phases_in_order_and_autoencoder_frozen_in_tflank(data, tmp_path):
    cfg = settings("tl_focal")
    quiet = lambda _: None  # noqa: E731
    assert fit(data, "tl_focal", cfg, tmp_path, log=quiet, device="cpu", stop_after_epochs=2) is None
    after_ae = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert fit(data, "tl_focal", cfg, tmp_path, log=quiet, device="cpu", stop_after_epochs=5) is None
    after_tf = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert after_tf["state"]["focal_c_latent"] > 0
    for name, value in after_tf["model"].items():
        if name.startswith(("encoder.", "decoder.", "mean_shape")):
            assert torch.equal(value, after_ae[name]), name
    assert any(not torch.equal(v, after_ae[n]) for n, v in after_tf["model"].items() if n.startswith("t_flank."))

    card = fit(data, "tl_focal", cfg, tmp_path, log=quiet, device="cpu")
    rows = read_log(tmp_path)
    assert [r["phase"] for r in rows] == ["autoencoder"] * 2 + ["tflank"] * 3 + ["joint"] * 2
    assert [int(r["epoch"]) for r in rows] == list(range(1, 8))
    assert [float(r["lr"]) for r in rows[:2]] == [1e-4, 1e-4]
    assert float(rows[2]["lr"]) == pytest.approx(1e-3)
    assert card["best_phase"] in ("tflank", "joint") and card["best_epoch"] >= 3  # image-based phases only
    assert card["val_rmse"] == pytest.approx(min(float(r["val_rmse"]) for r in rows[2:]))
    state = model_weights(tmp_path / "model.pt")
    assert "t_flank.head.0.weight" in state


# -- resumption


def test_resume_gives_identical_weights(data, tmp_path):
    cfg = settings(epochs=5)
    quiet = lambda _: None  # noqa: E731
    fit(data, "base", cfg, tmp_path / "full", log=quiet, device="cpu")
    assert fit(data, "base", cfg, tmp_path / "cut", log=quiet, device="cpu", stop_after_epochs=2) is None
    assert len(read_log(tmp_path / "cut")) == 2
    resumed = []
    fit(data, "base", cfg, tmp_path / "cut", log=resumed.append, device="cpu")
    assert any("resuming" in m and "after epoch 2" in m for m in resumed)
    assert sum(m.startswith("epoch ") for m in resumed) == 3  # only the remaining epochs ran
    assert len(read_log(tmp_path / "cut")) == 5
    assert_same_weights(model_weights(tmp_path / "full" / "model.pt"), model_weights(tmp_path / "cut" / "model.pt"))
    # a checkpoint of another configuration is not resumed
    messages = []
    fit(data, "base", settings(epochs=3), tmp_path / "cut", log=messages.append, device="cpu")
    assert any("starting afresh" in m for m in messages)
    assert len(read_log(tmp_path / "cut")) == 3


def test_warmup_ramps_the_lr_step_by_step_then_follows_the_schedule(data, tmp_path, monkeypatch):
    seen = []  # the lr of every optimizer step, as Adam used it

    class SpyAdam(torch.optim.Adam):
        def step(self, closure=None):
            seen.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    quiet = lambda _: None  # noqa: E731
    fit(data, "base", settings(epochs=3), tmp_path / "plain", log=quiet, device="cpu")
    plain, seen[:] = list(seen), []
    fit(data, "base", settings(epochs=3, warmup_epochs=2), tmp_path / "warm", log=quiet, device="cpu")
    steps = -(-len(data[2]) // ENGINE.batch_size)
    assert len(seen) == len(plain) == 3 * steps
    ramp = 2 * steps
    assert seen[:ramp] == pytest.approx([lr * (k + 1) / ramp for k, lr in enumerate(plain[:ramp])])
    assert seen[ramp:] == plain[ramp:]  # after the ramp: the cosine schedule, untouched by the scaling
    assert [r["lr"] for r in read_log(tmp_path / "warm")] == [r["lr"] for r in read_log(tmp_path / "plain")]
    warm, unwarmed = model_weights(tmp_path / "warm" / "model.pt"), model_weights(tmp_path / "plain" / "model.pt")
    assert any(not torch.equal(warm[name], unwarmed[name]) for name in warm)  # the ramp did change the training

    # killed inside the ramp and resumed: the same weights as the uninterrupted run
    cfg = settings(epochs=3, warmup_epochs=2)
    assert fit(data, "base", cfg, tmp_path / "cut", log=quiet, device="cpu", stop_after_epochs=1) is None
    fit(data, "base", cfg, tmp_path / "cut", log=quiet, device="cpu")
    assert_same_weights(model_weights(tmp_path / "warm" / "model.pt"), model_weights(tmp_path / "cut" / "model.pt"))


def test_a_negative_warmup_is_refused_by_name():
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        methods.Phase("train", 3, 1e-3, 0.0, warmup_epochs=-1)


def test_resume_after_sigkill(data, tmp_path):
    """Kill a real training process (SIGKILL) mid-run; the rerun ends with the same weights."""
    images, points, train_idx, val_idx, space = data
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "points.npy", points)
    np.save(tmp_path / "train_idx.npy", train_idx)
    np.save(tmp_path / "val_idx.npy", val_idx)
    space.save(tmp_path / "space.npz")
    epochs = 6
    script = textwrap.dedent(f"""
        import sys, time
        import numpy as np, torch
        from deepssm_workflow import methods
        from deepssm_workflow.engine import EngineSettings, train
        from deepssm_workflow.shape_space import ShapeSpace
        torch.set_num_threads(1)
        d = sys.argv[1]
        cfg = methods.get("base").settings({{"epochs": {epochs}, "network": {SMALL_NET!r}}})
        slow = lambda message: time.sleep(0.4)  # epochs last ~0.1 s: leave time to kill between them
        train("base", cfg, np.load(d + "/images.npy", mmap_mode="r"), np.load(d + "/points.npy"),
              np.load(d + "/train_idx.npy"), np.load(d + "/val_idx.npy"), ShapeSpace.load(d + "/space.npz"),
              d + "/" + sys.argv[2], engine=EngineSettings(batch_size=4, val_fraction=0.25), device="cpu",
              log=slow if sys.argv[2] == "killed" else print)
    """)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-c", script, str(tmp_path)]
    proc = subprocess.Popen(command + ["killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log_path = tmp_path / "killed" / "log.csv"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if log_path.exists() and len(read_log(tmp_path / "killed")) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_log(tmp_path / "killed"))
    assert 2 <= done < epochs and not (tmp_path / "killed" / "model.pt").exists()

    for name in ("killed", "full"):
        result = subprocess.run(command + [name], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    assert len(read_log(tmp_path / "killed")) == epochs
    assert_same_weights(model_weights(tmp_path / "full" / "model.pt"), model_weights(tmp_path / "killed" / "model.pt"))


def test_npy_rows_reads_the_rows_asked_for_and_refuses_bad_stores(tmp_path):
    stack = np.random.default_rng(0).normal(size=(6, 3, 4, 5)).astype(np.float32)
    np.save(tmp_path / "images.npy", stack)
    rows = NpyRows(tmp_path / "images.npy")
    assert rows.shape == stack.shape and len(rows) == 6
    assert np.array_equal(rows[[5, 0, 3, 3]], stack[[5, 0, 3, 3]])
    with pytest.raises(IndexError, match="row 6 outside"):
        rows[[6]]
    np.save(tmp_path / "integers.npy", stack.astype(np.int32))
    with pytest.raises(ValueError, match="integers.npy: expected a C-ordered float32, float64 or uint8"):
        NpyRows(tmp_path / "integers.npy")
    # uint8-quantized segmentations, read back as fractions
    np.save(tmp_path / "masks.npy", (stack > 0).astype(np.uint8) * 255)
    fractions = ScaledRows(NpyRows(tmp_path / "masks.npy"), 1 / 255)
    assert fractions.dtype == np.float32 and fractions.shape == stack.shape
    assert np.array_equal(fractions[[4, 1]], (stack[[4, 1]] > 0).astype(np.float32))
    data = (tmp_path / "images.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="cut.npy: truncated"):
        NpyRows(tmp_path / "cut.npy")


def test_npy_rows_read_an_array_inside_an_uncompressed_npz(tmp_path):
    rng = np.random.default_rng(1)
    points, source = rng.normal(size=(7, 5, 3)), np.arange(7)
    np.savez(tmp_path / "samples.npz", source_index=source, points=points)  # float64, after another array
    rows = NpyRows(tmp_path / "samples.npz", "points")
    assert rows.shape == points.shape and rows.dtype == np.float64
    assert np.array_equal(rows[[6, 2, 2]], points[[6, 2, 2]])
    assert np.array_equal(rows[:], points)
    # with real shapes in memory in front, as training stacks them
    real = rng.normal(size=(3, 5, 3))
    stacked = StackedRows(real, rows)
    assert np.array_equal(stacked[[0, 9, 3, 2]], np.concatenate([real, points])[[0, 9, 3, 2]])
    with pytest.raises(ValueError, match=r"samples.npz: no array 'scores' \(has source_index.npy, points.npy\)"):
        NpyRows(tmp_path / "samples.npz", "scores")
    np.savez_compressed(tmp_path / "packed.npz", points=points)
    with pytest.raises(ValueError, match="packed.npz: points.npy is compressed"):
        NpyRows(tmp_path / "packed.npz", "points")


def test_a_focal_percentile_outside_0_100_is_refused_by_name():
    for bad in (0.0, 101.0):
        with pytest.raises(ValueError, match=f"method base_focal: focal_percentile: {bad} is"):
            methods.get("base_focal").settings({"focal_percentile": bad})
