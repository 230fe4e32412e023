"""The benchmark suite: the quick mode runs every section and writes its table (no timing is
asserted: the machine is shared), and the optimized inference copy gives the trained model's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from deepssm_workflow import bench, methods
from deepssm_workflow.inference import predict
from deepssm_workflow.predict import inference_model


def test_quick_benchmark_writes_its_table(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    table = (tmp_path / "bench.md").read_text()
    assert "| measure | baseline | this workflow | ratio | target | met |" in table
    for measure in ("inference base femur", "inference tl left_atrium", "training epoch", "augmentation, femur size",
                    "5000 femur-size samples", "coarse-lattice warp position error", "training peak RSS",
                    "uncropped scan (180 mm at 3 mm", "image2ssm, gzip NRRD file to particles",
                    "image2ssm, uncompressed NRRD file to particles"):
        assert measure in table, measure

    # what the timings stand on must hold: same outputs, same warp, both memory runs done
    assert len(result["inference"]) == 3 * 2 * 2  # datasets x networks (base, tl) x (batch 1, batched)
    assert bench.one_per_network() == ["base", "tl"]
    # float32 rounding on the CPU; a CUDA row's convolutions run in TF32 by default (10-bit mantissa:
    # ~1e-3 relative on coordinates of ~100 mm), a bound set from that precision, not yet measured
    for row in result["inference"]:
        assert row["max_abs_difference_mm"] < (1e-3 if row["device"] == "cpu" else 0.1), row
    assert [row["samples"] for row in result["training"]] == [bench.QUICK.train_samples] * 4
    augmentation = result["augmentation"]
    assert augmentation["samples"] == bench.QUICK.augment_samples
    assert augmentation["store_bytes_per_sample"] >= 4 * np.prod(bench.QUICK.inputs["femur"])
    assert augmentation["max_abs_difference_exact_vs_baseline"] < 1e-3
    assert [row["samples"] for row in result["memory"]] == list(bench.QUICK.memory_counts)
    assert all(row["peak_rss_kib"] >= row["peak_anon_kib"] > 0 for row in result["memory"])
    # the fast scan resampling gives what the Gaussian of the whole scan gives, on a real generated scan
    scans = result["scans"]
    assert scans["scan_voxels"] == [60, 60, 60] and scans["grid"] == [15, 15, 15]
    assert scans["rms_difference_over_std"] < 0.01


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ValueError, match="'speed'"):
        bench.run(["inference", "speed"], quick=True, out_dir=tmp_path, threads=1)
    assert not (tmp_path / "bench.md").exists()


@pytest.mark.parametrize("name", bench.one_per_network())
def test_inference_copy_matches_the_model(name):
    solver = methods.get(name).method
    model = bench._random_model(name, (12, 10, 14), n_points=40)
    fast = inference_model(model)
    # the batch norms are folded away in the copy and still there in the original
    assert not any(isinstance(m, nn.BatchNorm3d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm3d) for m in model.modules()) == 5
    images = np.random.default_rng(0).normal(size=(3, 12, 10, 14)).astype(np.float32)
    for batch in (1, 3):
        expected, _ = predict(solver, model, images, batch)
        got, _ = predict(solver, fast, images, batch)
        assert got.shape == expected.shape == (3, 40, 3)
        assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    assert not any(p.requires_grad for p in fast.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():  # the copy rejects images of another size, as the model does
        with pytest.raises(ValueError, match="built for"):
            fast(torch.zeros(1, 1, 12, 10, 12))
