"""The seed spread: init_seed varies the initialisation and batch order and nothing else (the split,
the checkpoint signature of a run without it), the spread's summary and files, and a real run of
the target on the tiny preset."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import SCHEMA, TINY, run_snakemake
from deepssm_workflow import cli, methods
from deepssm_workflow.config import ConfigError, load
from deepssm_workflow.engine import EngineSettings, train
from deepssm_workflow.holdout import split_by_source, validation_subjects
from deepssm_workflow.io import write_particles
from deepssm_workflow.layout import DatasetLayout
from deepssm_workflow.provenance import software_id
from deepssm_workflow.seed_spread import DEFAULT_SEEDS, card_init_seed, plan, summarize, write_spread
from deepssm_workflow.shape_space import ShapeSpace
from test_train import make_data

N_REAL = 8
SMALL_NET = {"channels": [4, 8, 8, 16, 16], "fc_sizes": [32, 16]}
OLD_ENGINE_KEYS = {"batch_size", "val_fraction", "seed", "precision"}  # EngineSettings before init_seed


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    images, points, source = make_data(n_real=N_REAL)  # test_train's shapes and blob images, fewer of them
    train_idx, val_idx = split_by_source(N_REAL, source, 0.25, seed=0)
    return images, points, train_idx, val_idx, ShapeSpace(n_modes=3).fit(points[train_idx])


def fit(data, out, engine: EngineSettings):
    images, points, train_idx, val_idx, space = data
    chosen = methods.get("base").settings({"epochs": 3, "network": SMALL_NET})
    card = train("base", chosen, images, points, train_idx, val_idx, space, out, engine=engine, device="cpu",
                 log=lambda _: None)
    return card, torch.load(out / "model.pt", weights_only=True)


# -- init_seed in the engine


def test_init_seed_none_is_the_seed_bit_for_bit_and_keeps_the_old_signature(data, tmp_path):
    plain_card, plain = fit(data, tmp_path / "plain", EngineSettings(batch_size=4, val_fraction=0.25, seed=0))
    same_card, same = fit(data, tmp_path / "same", EngineSettings(batch_size=4, val_fraction=0.25, seed=0,
                                                                   init_seed=0))
    assert plain.keys() == same.keys() and all(torch.equal(plain[k], same[k]) for k in plain)
    assert plain_card["val_rmse"] == same_card["val_rmse"] and plain_card["best_epoch"] == same_card["best_epoch"]
    # a run without init_seed records the engine as before the field existed: its checkpoints still resume
    signature = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["signature"]
    assert set(signature) == {"format", "method", "settings", "engine", "network", "data_hash", "train_idx",
                              "val_idx"} and signature["format"] == 5
    assert signature["engine"] == {"batch_size": 4, "val_fraction": 0.25, "seed": 0, "precision": "fp32"}
    assert set(plain_card["engine"]) == OLD_ENGINE_KEYS
    assert same_card["engine"]["init_seed"] == 0 and card_init_seed(plain_card) == card_init_seed(same_card) == 0


def test_two_init_seeds_train_different_weights_on_the_same_split(data, tmp_path):
    one_card, one = fit(data, tmp_path / "one", EngineSettings(batch_size=4, val_fraction=0.25, init_seed=1))
    two_card, two = fit(data, tmp_path / "two", EngineSettings(batch_size=4, val_fraction=0.25, init_seed=2))
    assert any(not torch.equal(one[k], two[k]) for k in one if one[k].is_floating_point())
    assert one_card["val_rmse"] != two_card["val_rmse"]
    assert (card_init_seed(one_card), card_init_seed(two_card)) == (1, 2)
    assert one_card["engine"]["seed"] == two_card["engine"]["seed"] == 0
    signatures = [torch.load(tmp_path / n / "checkpoint.pt", weights_only=True)["signature"] for n in ("one", "two")]
    assert signatures[0]["val_idx"] == signatures[1]["val_idx"] and signatures[0] != signatures[1]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_a_bad_init_seed_is_refused(bad):
    with pytest.raises(ValueError, match="init_seed"):
        EngineSettings(init_seed=bad)


def write_artifacts(root):
    """The files `train_from_artifacts` reads: cohort/, preprocess/ and augmentation/ of a dataset."""
    images, points, source = make_data(n_real=N_REAL)
    ids = np.array([f"s{i}" for i in range(N_REAL)])
    layout = DatasetLayout(root)
    for folder in (layout.cohort_dir, layout.preprocess_dir, layout.augmentation_dir):
        folder.mkdir(parents=True)
    np.savez(layout.preprocessed("train"), ids=ids, images=images[:N_REAL])
    np.savez(layout.shapes("train"), ids=ids, world=points[:N_REAL])
    held_out = ids[validation_subjects(N_REAL, 0.25, 0)]  # the augmentation's record of training.seed 0
    np.savez(layout.samples_npz, points=points[N_REAL:], source_index=source, validation_ids=held_out)
    np.save(layout.augmentation_images, images[N_REAL:])
    return layout


def test_the_cli_flag_changes_the_initialisation_and_not_the_split(tmp_path):
    layout = write_artifacts(tmp_path / "femur")
    settings = json.dumps({"shape_space": {"n_modes": 3}, "method": {"epochs": 2, "network": SMALL_NET},
                           "training": {"batch_size": 4, "val_fraction": 0.25, "seed": 0}})
    common = ["train", "--cohort", str(layout.cohort_dir), "--preprocess-dir", str(layout.preprocess_dir),
              "--augmentation-dir", str(layout.augmentation_dir), "--method", "base", "--settings", settings,
              "--device", "cpu"]
    weights, signatures = {}, {}
    for name, extra in (("default", []), ("seed3", ["--init-seed", "3"]), ("seed0", ["--init-seed", "0"])):
        out = layout.seed_model_dir(name, "base")
        outputs = [str(out / f) for f in ("model.pt", "model_card.json")]
        assert cli.main([*common, "--out-dir", str(out), *extra, "--outputs", *outputs,
                         "--provenance", str(out / "provenance.json")]) == 0
        weights[name] = torch.load(out / "model.pt", weights_only=True)
        signatures[name] = torch.load(out / "checkpoint.pt", weights_only=True)["signature"]
        card = json.loads((out / "model_card.json").read_text())
        sidecar = json.loads((out / "provenance.json").read_text())
        if extra:
            assert card["engine"]["init_seed"] == sidecar["settings"]["training"]["init_seed"] == int(extra[1])
        else:
            assert "init_seed" not in card["engine"] and "init_seed" not in sidecar["settings"]["training"]
    # the split is the training seed's (the samples' validation_ids agree: train_from_artifacts checks it)
    expected = split_by_source(N_REAL, np.arange(N_REAL), 0.25, 0)
    for signature in signatures.values():
        assert signature["train_idx"] == expected[0].tolist() and signature["val_idx"] == expected[1].tolist()
    same = all(torch.equal(weights["default"][k], weights["seed0"][k]) for k in weights["default"])
    differ = any(not torch.equal(weights["default"][k], weights["seed3"][k]) for k in weights["default"])
    assert same and differ


# -- the plan and the summary


def test_plan_puts_the_training_seed_first_and_defaults_to_every_method_of_the_dataset():
    dataset = {"training": {"seed": 4}, "methods": {"base": {}, "tl": {}}}
    assert plan(dataset) == (["base", "tl"], [4, *DEFAULT_SEEDS])
    assert plan({**dataset, "seed_spread": {"seeds": [7, 4, 1]}}) == (["base", "tl"], [4, 7, 1])
    assert plan({**dataset, "seed_spread": {"seeds": [2], "methods": ["tl_focal"]}}) == (["tl_focal"], [4, 2])
    with pytest.raises(ValueError, match="datasets.femur.seed_spread.methods: unknown method"):
        plan({**dataset, "seed_spread": {"methods": ["nope"]}}, "femur")
    # the methods trained on the uncropped scans are spread too (seeds.smk's _on_scans rules)
    full_field = {**dataset, "methods": {"base": {}, "image2ssm": {}, "base_uncropped": {}}}
    assert plan(full_field) == (["base", "image2ssm", "base_uncropped"], [4, *DEFAULT_SEEDS])


def test_the_config_takes_a_seed_spread_block_and_the_presets_have_none():
    schema = yaml.safe_load(SCHEMA.read_text())
    assert schema["$defs"]["dataset"]["properties"]["seed_spread"]["properties"]["seeds"]["default"] == \
        list(DEFAULT_SEEDS)
    config = yaml.safe_load(TINY.read_text())
    good = copy.deepcopy(config)
    good["datasets"]["femur"]["seed_spread"] = {"methods": ["base"]}
    load(good, SCHEMA)
    assert good["datasets"]["femur"]["seed_spread"] == {"methods": ["base"], "seeds": list(DEFAULT_SEEDS)}
    assert "seed_spread" not in good["datasets"]["metopic"]  # no block is added where there was none
    for bad in ({"seeds": [-1]}, {"seeds": []}, {"seed": [1]}, {"seeds": [1, 1]}):
        wrong = copy.deepcopy(config)
        wrong["datasets"]["femur"]["seed_spread"] = bad
        with pytest.raises(ConfigError, match="datasets.femur.seed_spread"):
            load(wrong, SCHEMA)
    # the paper preset spreads nothing; the default config's spreads are read only by the seed-spread target
    # (test_workflow's dry run of the default config plans no train_seed job)
    assert "seed_spread" not in (TINY.parent / "paper.yaml").read_text()


def test_summary_gives_the_spread_of_each_method_against_the_mean_shape():
    rows = pd.DataFrame({"method": ["a", "a", "a", "b"], "init_seed": [0, 1, 2, 0],
                         "rmse_mm": [1.0, 2.0, 4.0, 0.5], "best_epoch": [3, 4, 5, 6]})
    summary = summarize(rows, 3.0)
    a, b = summary["a"], summary["b"]
    assert list(summary) == ["a", "b"]
    assert a["n_seeds"] == 3 and a["init_seeds"] == [0, 1, 2] and a["default_init_seed"] == 0
    assert a["default_rmse_mm"] == 1.0 and a["mean_rmse_mm"] == pytest.approx(7 / 3)
    assert a["sd_rmse_mm"] == pytest.approx(math.sqrt(7 / 3))  # sample SD: ((16 + 1 + 25) / 9) / 2
    assert (a["min_rmse_mm"], a["max_rmse_mm"], a["range_mm"]) == (1.0, 4.0, 3.0)
    assert a["seeds_beating_mean_shape"] == 2 and a["every_seed_beats_mean_shape"] is False
    assert b["n_seeds"] == 1 and b["sd_rmse_mm"] is None and b["range_mm"] == 0.0
    assert b["every_seed_beats_mean_shape"] is True and b["mean_shape_rmse_mm"] == 3.0


# -- the spread of a dataset folder


def card(method: str, seed: int, init_seed: int | None = None, best_epoch: int = 5, data_hash: str = "d") -> dict:
    engine = {"batch_size": 4, "val_fraction": 0.25, "seed": seed, "precision": "fp32"}
    if init_seed is not None:
        engine["init_seed"] = init_seed
    return {"method": method, "settings": {"epochs": 9}, "engine": engine, "best_epoch": best_epoch,
            "val_rmse": 1.0, "n_train": 10, "n_val": 2, "data_hash": data_hash,
            "device_facts": {"device": "cpu", "name": "cpu", "cpu_kernels": "AVX2", "torch": "2.13.0"}}


def write_run(model_dir, predictions_dir, model_card: dict, shapes: dict) -> None:
    model_dir.mkdir(parents=True)
    (model_dir / "model_card.json").write_text(json.dumps(model_card))
    (predictions_dir / "particles").mkdir(parents=True)
    for subject, points in shapes.items():  # identity poses: the world frame is the scan's
        write_particles(predictions_dir / "particles" / f"{subject}_local.particles", points)
        write_particles(predictions_dir / "particles" / f"{subject}_world.particles", points)
    pd.DataFrame({"id": list(shapes), "local_particles": [f"particles/{s}_local.particles" for s in shapes],
                  "world_particles": [f"particles/{s}_world.particles" for s in shapes]}
                 ).to_csv(predictions_dir / "predictions.csv", index=False)


@pytest.fixture
def dataset(tmp_path):
    """A results/{dataset} folder: 3 test shapes 2 mm (per axis) from the training mean shape, identity poses;
    method base trained with training seed 5 (default run, predictions 0.5 mm off) and init seed 1 (1.5 mm)."""
    layout = DatasetLayout(tmp_path / "femur")
    rng = np.random.default_rng(0)
    shape = rng.uniform(0, 50, (12, 3))
    ids, poses = ["t0", "t1", "t2"], np.repeat(np.eye(4)[None], 3, axis=0)
    layout.cohort_dir.mkdir(parents=True)
    layout.preprocess_dir.mkdir(parents=True)
    truth = np.stack([shape + 2.0] * 3)
    np.savez(layout.shapes("test"), ids=ids, local=truth, world=truth, image_to_world=poses)
    spread = rng.normal(0, 1, (4, 12, 3))
    np.savez(layout.shapes("train"), ids=["a", "b", "c", "d"], world=shape + spread - spread.mean(0),
             image_to_world=np.repeat(np.eye(4)[None], 4, axis=0))
    np.savez(layout.preprocessed("test"), ids=ids, image_to_world=poses)
    pd.DataFrame({"id": ["a", "b", "c", "d", *ids], "split": ["train"] * 4 + ["test"] * 3}
                 ).to_csv(layout.subjects_csv, index=False)
    write_run(layout.model_dir("base"), layout.predictions_dir("base"), card("base", 5, best_epoch=7),
              {s: t + 0.5 for s, t in zip(ids, truth)})
    write_run(layout.seed_model_dir(1, "base"), layout.seed_predictions_dir(1, "base"),
              card("base", 5, init_seed=1, best_epoch=3), {s: t - 1.5 for s, t in zip(ids, truth)})
    return layout


def test_the_spread_reads_the_default_seed_from_the_main_model(dataset):
    # seed 5 is the default run's (its card's training seed): listed again, it is not read from seeds/5/
    record = write_spread(dataset.root, ["base"], [1, 5], {"n_modes": 2}, dataset.seeds_dir)
    table = pd.read_csv(dataset.spread_csv)
    assert list(table.columns) == ["method", "init_seed", "rmse_mm", "best_epoch"]
    assert table[["method", "init_seed", "best_epoch"]].values.tolist() == [["base", 5, 7], ["base", 1, 3]]
    assert table["rmse_mm"].tolist() == pytest.approx([0.5, 1.5], abs=1e-6)
    base = record["methods"]["base"]
    assert base["mean_rmse_mm"] == pytest.approx(1.0, abs=1e-6)
    assert base["sd_rmse_mm"] == pytest.approx(math.sqrt(0.5), abs=1e-6)
    assert base["range_mm"] == pytest.approx(1.0, abs=1e-6) and base["default_init_seed"] == 5
    assert record["mean_shape_rmse_mm"] == pytest.approx(2.0) and base["every_seed_beats_mean_shape"] is True
    assert record["n_test_scans"] == 3 and record["one_machine"] is True
    assert record["training_machines"][0]["cpu_kernels"] == "AVX2"
    assert [run["model_dir"] for run in record["runs"]] == ["models/base", "seeds/1/models/base"]
    # the interval covers seeds x scans: here every scan is alike, so it spans the two seeds' values
    assert base["rmse_low_mm"] == pytest.approx(0.5, abs=1e-6) and base["rmse_high_mm"] == pytest.approx(1.5, abs=1e-6)
    assert base["world_rmse_mm"] == pytest.approx(1.0, abs=1e-6)  # identity poses: as the scan frame
    (paired,) = record["paired"]["comparisons"]  # base against the mean shape, over both seeds and every scan
    assert (paired["method"], paired["against"], paired["n_seeds"]) == ("base", "mean shape", 2)
    # 3 scans cannot decide it: the exact sign-flip p is 0.25 however far below the mean shape the method is
    assert paired["difference_mm"] == pytest.approx(-1.0, abs=1e-6) and paired["p"] == pytest.approx(0.25)
    assert paired["verdict"] == "cannot tell apart from"
    assert json.loads(dataset.spread_json.read_text()) == record
    assert dataset.spread_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_seed_run_on_other_data_or_with_another_seed_is_refused(dataset):
    path = dataset.seed_model_card(1, "base")
    path.write_text(json.dumps(card("base", 5, init_seed=1, data_hash="other")))
    with pytest.raises(ValueError, match="other data_hash"):
        write_spread(dataset.root, ["base"], [1], {"n_modes": 2}, dataset.seeds_dir)
    path.write_text(json.dumps(card("base", 5, init_seed=2)))
    with pytest.raises(ValueError, match="init seed 2, not 'base' with 1"):
        write_spread(dataset.root, ["base"], [1], {"n_modes": 2}, dataset.seeds_dir)
    assert not dataset.spread_csv.exists()


# -- the target in the real workflow


@pytest.mark.slow
def test_the_seed_spread_target_trains_the_extra_seed_only(tiny_reports, tmp_path):
    workdir, result = tiny_reports  # the tiny `all`: the default run's models exist
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(TINY.read_text())
    config["datasets"]["femur"]["seed_spread"] = {"seeds": [1], "methods": ["base"]}
    configfile = tmp_path / "spread.yaml"
    configfile.write_text(yaml.safe_dump(config))
    layout = DatasetLayout(workdir / "results" / "femur")
    main_model = layout.model_pt("base").stat().st_mtime_ns
    # the shared run's code is this code, unless the package's sources were edited since (a checkout being
    # worked on): then the default run is rebuilt through the params rerun trigger, as it should be
    same_code = json.loads(layout.provenance("augmentation").read_text())["code"]["software_id"] == software_id()

    run = run_snakemake(workdir, "results/femur/seeds/spread.csv", "--cores", "2", "--resources", "gpu=1",
                        configfile=configfile)
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert "rule train_seed:" in output and "rule predict_seed:" in output
    assert not layout.seed_dir(0).exists()  # the default run is the first seed: it is not trained again ...
    if same_code:  # ... and the seed_spread block changes none of its rules' params
        assert "rule train:" not in output and layout.model_pt("base").stat().st_mtime_ns == main_model

    table = pd.read_csv(layout.spread_csv)
    assert table[["method", "init_seed"]].values.tolist() == [["base", 0], ["base", 1]]
    assert table["rmse_mm"].nunique() == 2 and (table["rmse_mm"] > 0).all()
    main_card = json.loads(layout.model_card("base").read_text())
    seed_card = json.loads(layout.seed_model_card(1, "base").read_text())
    assert seed_card["engine"] == {**main_card["engine"], "init_seed": 1}
    assert seed_card["data_hash"] == main_card["data_hash"] and seed_card["n_val"] == main_card["n_val"]
    record = json.loads(layout.spread_json.read_text())
    assert record["methods"]["base"]["n_seeds"] == 2 and record["one_machine"] is True
    assert record["training_machines"][0]["cpu_kernels"] == torch.backends.cpu.get_cpu_capability()
    sidecar = json.loads(layout.provenance("seeds").read_text())
    assert set(sidecar["outputs"]) == {"spread.csv", "spread.json", "spread.png"}
    assert json.loads(layout.provenance("models", "base", 1).read_text())["settings"]["training"]["init_seed"] == 1
