"""Configuration: the shipped presets are valid; bad values fail before any job runs, naming the key."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO, SCHEMA, run_snakemake
from deepssm_workflow import methods as registry
from deepssm_workflow.config import ConfigError, load


def preset(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name", ["config", "tiny", "paper"])
def test_shipped_presets_are_valid(name):
    datasets = load(preset(name), SCHEMA)
    assert {d.anatomy for d in datasets.values()} == {"femur", "metopic", "left_atrium"}


def test_a_multi_anatomy_dataset_alone_is_a_config_and_gets_massm_by_default():
    config = {"multi_anatomy": {"hip": {"source": "csv", "manifest": "hip.csv"}}}
    assert load(config, SCHEMA) == {}  # no single-anatomy dataset
    assert config["multi_anatomy"]["hip"]["methods"]["massm"]["presence_threshold"] == 0.3
    assert config["multi_anatomy"]["hip"]["scan_grid"] == {"spacing_mm": 4}


def test_paper_preset_has_the_papers_cohort_sizes():
    sizes = {name: {split: sum(groups.values()) for split, groups in d["synthetic"]["subjects"].items()}
             for name, d in preset("paper")["datasets"].items()}
    assert sizes == {"femur": {"train": 49, "test": 9}, "metopic": {"train": 105, "test": 15},
                     "left_atrium": {"train": 122, "test": 84}}
    femur = preset("paper")["datasets"]["femur"]["synthetic"]["subjects"]
    assert femur["train"]["cam"] + femur["test"]["cam"] == 9 and femur["train"]["cam"] == 7


def broken(edit) -> dict:
    config = copy.deepcopy(preset("tiny"))
    edit(config)
    return config


BAD = {
    "misspelt key": (lambda c: c["datasets"]["femur"]["synthetic"].update(n_particle=64),
                     "datasets.femur.synthetic.n_particle: unknown key"),
    "unknown top-level key": (lambda c: c.update(dataset={}), "dataset: unknown key"),
    "wrong type": (lambda c: c["datasets"]["femur"]["synthetic"].update(n_particles="many"),
                   "datasets.femur.synthetic.n_particles: 'many' is not of type 'integer'"),
    "negative count": (lambda c: c["datasets"]["metopic"]["synthetic"]["subjects"]["train"].update(control=-1),
                       "datasets.metopic.synthetic.subjects.train.control: -1 is less than the minimum of 0"),
    "unknown dataset": (lambda c: c["datasets"].update(femr=c["datasets"].pop("femur")),
                        "datasets.femr: unknown dataset 'femr'"),
    "unknown source": (lambda c: c["datasets"]["femur"].update(source="dicom"),
                       "datasets.femur.source: 'dicom' is not one of"),
    "csv source without manifest": (lambda c: c["datasets"]["femur"].update(source="csv"),
                                    "datasets.femur.manifest: required key is missing"),
    "both n_modes and variance": (lambda c: c["datasets"]["metopic"]["shape_space"].update(variance=0.9),
                                  "datasets.metopic.shape_space: give exactly one of n_modes or variance (found both)"),
    "unknown method": (lambda c: c["datasets"]["femur"]["methods"].update(vae={}),
                       "datasets.femur.methods.vae: unknown key (allowed: "
                       + ", ".join(sorted(registry.names())) + ")"),
    "a preset's fixed setting": (lambda c: c["datasets"]["femur"]["methods"]["base_focal"].update(loss="l2"),
                                 "datasets.femur.methods.base_focal.loss: unknown key"),
    "a method's own check": (lambda c: c["datasets"]["femur"]["methods"]["tl"].update(tflank_epochs=0, joint_epochs=0),
                             "datasets.femur.methods.tl: no phase with epochs that validates on images"),
    "a method setting in the engine's block": (lambda c: c["datasets"]["femur"]["training"].update(epochs=3),
                                               "datasets.femur.training.epochs: unknown key"),
    "study of another anatomy on a synthetic cohort": (
        lambda c: c["datasets"]["femur"].update(study="af_recurrence"),
        "datasets.femur.study: a synthetic femur cohort has the labels of its own study (cam_fai) only"),
    "unknown study": (lambda c: c["datasets"]["femur"].update(study="survival"),
                      "datasets.femur.study: unknown study 'survival'; choose one of cam_fai, metopic_severity, "
                      "af_recurrence, none"),
    "unknown sampler": (lambda c: c["datasets"]["left_atrium"]["augmentation"].update(sampler="gan"),
                        "datasets.left_atrium.augmentation.sampler: 'gan' is not one of"),
    "bad registration mode": (lambda c: c["datasets"]["femur"]["preprocess"].update(registration="affine"),
                              "datasets.femur.preprocess.registration: 'affine' is not one of"),
    "group of another anatomy": (lambda c: c["datasets"]["femur"]["synthetic"]["subjects"]["train"].update(metopic=2),
                                 "datasets.femur.synthetic.subjects.train.metopic: femur has no group 'metopic'"),
    "zero autoencoder learning rate": (lambda c: c["datasets"]["femur"]["methods"]["tl"].update(ae_lr=0),
                                       "datasets.femur.methods.tl.ae_lr: 0 is less than or equal to the minimum of 0"),
    "too few training subjects": (lambda c: c["datasets"]["left_atrium"]["synthetic"]["subjects"].update(
        train={"patient": 2}), "datasets.left_atrium.synthetic.subjects.train: 2 training subjects"),
    "nothing to run": (lambda c: c.clear(), "<top level>: give datasets or multi_anatomy (or both)"),
    "a multi-anatomy dataset named as a dataset": (lambda c: c.update(multi_anatomy={"femur": hip()}),
                                                   "multi_anatomy.femur: 'femur' is also a dataset of `datasets`"),
    "a single-anatomy method on a multi-anatomy dataset": (
        lambda c: c.update(multi_anatomy={"hip": hip(methods={"base": {}})}),
        "multi_anatomy.hip.methods.base: predicts one anatomy per scan; a multi-anatomy dataset trains massm"),
    "a multi-anatomy csv source without manifest": (lambda c: c.update(multi_anatomy={"hip": hip(source="csv")}),
                                                    "multi_anatomy.hip.manifest: required for source csv"),
    "an unknown part anatomy": (
        lambda c: c.update(multi_anatomy={"hip": hip(synthetic={**hip()["synthetic"], "parts": {
            "liver": {"anatomy": "liver", "centre_mm": [0, 0, 0]}, "bladder": {"anatomy": "bladder",
                                                                             "centre_mm": [0, 40, 0]}}})}),
        "multi_anatomy.hip.synthetic: parts.liver.anatomy: unknown part anatomy 'liver'"),
    "a misspelt multi-anatomy key": (lambda c: c.update(multi_anatomy={"hip": hip(scan_grid={"spacing": 4})}),
                                     "multi_anatomy.hip.scan_grid.spacing: unknown key"),
}


def hip(**changes) -> dict:
    """The default config's multi-anatomy dataset, with `changes`."""
    return {**copy.deepcopy(preset("config")["multi_anatomy"]["hip"]), **changes}


@pytest.mark.parametrize("case", BAD)
def test_bad_config_names_the_key(case):
    edit, message = BAD[case]
    with pytest.raises(ConfigError) as error:
        load(broken(edit), SCHEMA)
    assert message in str(error.value)


@pytest.mark.parametrize("case", ["misspelt key", "wrong type", "unknown dataset"])
def test_snakemake_refuses_bad_config_before_any_job(tmp_path, case):
    edit, message = BAD[case]
    configfile = tmp_path / "bad.yaml"
    configfile.write_text(yaml.safe_dump(broken(edit)))
    result = run_snakemake(tmp_path / "work", "--cores", "1", "all", configfile=configfile)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "work" / "resources").exists() and not (tmp_path / "work" / "results").exists()


def test_a_baseline_dataset_named_as_a_dataset_is_refused():
    """A multi-anatomy dataset's baselines are the datasets {dataset}_{anatomy}: one already in `datasets` is an
    error naming both, not a silent merge."""
    from deepssm_workflow.multi_baselines import baseline_datasets

    config = {"datasets": {"hip_bladder": {}}, "multi_anatomy": {"hip": hip()}}
    with pytest.raises(ConfigError, match="multi_anatomy.hip.baselines: the baselines of anatomy bladder are the "
                                          "dataset hip_bladder, which `datasets` already has"):
        baseline_datasets(config)
    del config["datasets"]["hip_bladder"]
    assert sorted(baseline_datasets(config)) == ["hip_bladder", "hip_femur_left", "hip_femur_right"]


def test_the_baselines_default_methods_are_the_schemas():
    """multi_baselines reads the config before the schema fills its defaults: its own default must be the schema's."""
    from deepssm_workflow.config import schema
    from deepssm_workflow.multi_baselines import DEFAULT_METHODS, baseline_datasets

    block = schema(SCHEMA)["$defs"]["multi_dataset"]["properties"]["baselines"]["properties"]["methods"]
    assert block["default"] == DEFAULT_METHODS == {"base": {}, "base_uncropped": {}}
    unnamed = {key: value for key, value in hip()["baselines"].items() if key != "methods"}
    derived = baseline_datasets({"multi_anatomy": {"hip": hip(baselines=unnamed)}})
    assert len(derived) == 3 and all(entry["methods"] == DEFAULT_METHODS for entry in derived.values())
