"""The results layout: the rules' patterns are the library's paths, every path stays under its
dataset's folder, and no rule spells a results path by hand."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from deepssm_workflow.layout import EVALUATION_FIGURES, EVALUATION_TABLES, DatasetLayout, patterns

RULES = Path(__file__).resolve().parents[1] / "workflow" / "rules"
# an argument for each parameter of the layout's methods
ARGUMENTS = {"split": "test", "method": "base", "name": "accuracy_summary", "stage": "models", "methods": ["base"],
             "seed": "1", "anatomy": "bladder", "sweep": "warmup", "candidate": "four"}


def every_path(layout) -> dict[str, object]:
    """Each public member of a layout by name, called with ARGUMENTS where it is a method."""
    found = {}
    for name, member in inspect.getmembers(DatasetLayout):
        if name.startswith("_") or name == "root":
            continue
        if isinstance(member, property):
            found[name] = getattr(layout, name)
        else:
            parameters = inspect.signature(member).parameters
            found[name] = getattr(layout, name)(*(ARGUMENTS[p] for p in list(parameters)[1:]))
    return found


def test_patterns_are_the_paths_the_rules_declare():
    results = patterns()
    expected = {
        results.subjects_csv: "results/{dataset}/cohort/subjects.csv",
        results.shapes("train"): "results/{dataset}/cohort/shapes_train.npz",
        results.cohort_report: "results/{dataset}/cohort/report.json",
        results.grid_json: "results/{dataset}/preprocess/grid.json",
        results.reference_nrrd: "results/{dataset}/preprocess/reference.nrrd",
        results.preprocessed("test"): "results/{dataset}/preprocess/test.npz",
        results.augmentation_images: "results/{dataset}/augmentation/images.npy",
        results.samples_npz: "results/{dataset}/augmentation/samples.npz",
        results.shape_space_npz: "results/{dataset}/augmentation/shape_space.npz",
        results.augmentation_qc: "results/{dataset}/augmentation/qc.png",
        results.train_segmentations: "results/{dataset}/preprocess/train_segmentations.npz",
        results.augmentation_segmentations: "results/{dataset}/augmentation/segmentations/segmentations.npy",
        results.augmentation_segmentations_provenance:
            "results/{dataset}/augmentation/segmentations/provenance.json",
        results.provenance("augmentation"): "results/{dataset}/augmentation/provenance.json",
        results.model_pt("{method}"): "results/{dataset}/models/{method}/model.pt",
        results.model_card("{method}"): "results/{dataset}/models/{method}/model_card.json",
        results.training_log("{method}"): "results/{dataset}/models/{method}/log.csv",
        results.loss_curve("{method}"): "results/{dataset}/models/{method}/loss_curve.png",
        results.provenance("models", "{method}"): "results/{dataset}/models/{method}/provenance.json",
        results.predictions_csv("{method}"): "results/{dataset}/predictions/{method}/predictions.csv",
        results.predicted_particles("{method}"): "results/{dataset}/predictions/{method}/particles",
        results.provenance("predictions", "{method}"): "results/{dataset}/predictions/{method}/provenance.json",
        results.evaluation_summary: "results/{dataset}/evaluation/summary.json",
        results.evaluation_figures_json: "results/{dataset}/evaluation/figures.json",
        results.evaluation_tables_json: "results/{dataset}/evaluation/tables.json",
        results.evaluation_table("inference_time"): "results/{dataset}/evaluation/tables/inference_time.csv",
        results.evaluation_figure("surface_heatmaps"): "results/{dataset}/evaluation/surface_heatmaps.png",
        results.per_point_npz: "results/{dataset}/evaluation/per_point.npz",
        results.study_dir: "results/{dataset}/study",
        results.seed_model_pt("{seed}", "{method}"): "results/{dataset}/seeds/{seed}/models/{method}/model.pt",
        results.seed_model_card("{seed}", "{method}"): "results/{dataset}/seeds/{seed}/models/{method}/model_card.json",
        results.seed_training_log("{seed}", "{method}"): "results/{dataset}/seeds/{seed}/models/{method}/log.csv",
        results.seed_loss_curve("{seed}", "{method}"): "results/{dataset}/seeds/{seed}/models/{method}/loss_curve.png",
        results.provenance("models", "{method}", "{seed}"):
            "results/{dataset}/seeds/{seed}/models/{method}/provenance.json",
        results.seed_predictions_csv("{seed}", "{method}"):
            "results/{dataset}/seeds/{seed}/predictions/{method}/predictions.csv",
        results.seed_predicted_particles("{seed}", "{method}"):
            "results/{dataset}/seeds/{seed}/predictions/{method}/particles",
        results.provenance("predictions", "{method}", "{seed}"):
            "results/{dataset}/seeds/{seed}/predictions/{method}/provenance.json",
        results.spread_csv: "results/{dataset}/seeds/spread.csv",
        results.spread_json: "results/{dataset}/seeds/spread.json",
        results.spread_png: "results/{dataset}/seeds/spread.png",
        results.provenance("seeds"): "results/{dataset}/seeds/provenance.json",
        results.cohort_qc: "results/{dataset}/qc/cohort.png",
        results.preprocess_qc: "results/{dataset}/qc/preprocess.png",
        results.report_html: "results/{dataset}/report.html",
        results.root: "results/{dataset}",
    }
    for actual, wanted in expected.items():
        assert isinstance(actual, str) and actual == wanted
    assert results.provenance_dirs(["tl"]) == ["results/{dataset}/augmentation", "results/{dataset}/models/tl",
                                               "results/{dataset}/predictions/tl"]
    assert EVALUATION_TABLES == ("accuracy_summary", "accuracy_per_subject", "inference_time", "error_decomposition",
                                 "error_decomposition_per_subject", "alignment_accuracy", "paired_differences")
    assert EVALUATION_FIGURES == ("per_point_rmse", "surface_boxplot", "surface_heatmaps", "error_decomposition")


def test_a_filled_in_pattern_is_the_librarys_path():
    concrete = every_path(DatasetLayout("results/femur"))
    for name, pattern in every_path(patterns()).items():
        # ARGUMENTS are plain names: only {dataset} is left, filled in as Snakemake would
        filled = [p.replace("{dataset}", "femur") for p in ([pattern] if isinstance(pattern, str) else pattern)]
        wanted = [str(p) for p in ([concrete[name]] if isinstance(concrete[name], Path) else concrete[name])]
        assert filled == wanted, name
    assert patterns("femur").model_pt("base") == "results/femur/models/base/model.pt"
    assert patterns("femur").seed_model_pt(2, "tl") == "results/femur/seeds/2/models/tl/model.pt"
    assert patterns("femur").tuning_model_pt("warmup", "four", "base") == \
        "results/femur/tuning/warmup/four/models/base/model.pt"
    assert patterns("femur").validation_file("summary.csv") == "results/femur/validation/summary.csv"


def test_every_path_lies_under_the_dataset_folder(tmp_path):
    layout = DatasetLayout(tmp_path / "results" / "femur")
    paths = every_path(layout)
    assert len(paths) > 30
    for name, found in paths.items():
        for path in [found] if isinstance(found, Path) else found:
            assert isinstance(path, Path) and path.is_relative_to(layout.root) and path != layout.root, name


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../base", "a\\b"])
def test_a_name_that_would_leave_its_folder_is_refused(name):
    with pytest.raises(ValueError, match="not a valid name"):
        DatasetLayout("results/femur").model_dir(name)
    with pytest.raises(ValueError, match="not a valid name"):
        DatasetLayout("results/femur").seed_model_dir(name, "base")


def test_provenance_is_per_method_and_per_seed_only_for_models_and_predictions():
    layout = DatasetLayout("results/femur")
    with pytest.raises(ValueError, match="no provenance folder"):
        layout.provenance("augmentation", "base")
    with pytest.raises(ValueError, match="no provenance folder"):
        layout.provenance("models")
    with pytest.raises(ValueError, match="no provenance folder"):
        layout.provenance("evaluation")
    with pytest.raises(ValueError, match="no provenance folder"):
        layout.provenance("augmentation", seed=1)
    with pytest.raises(ValueError, match="no provenance folder"):
        layout.provenance("seeds", "base")
    with pytest.raises(ValueError, match="no provenance folder"):
        layout.provenance("models", seed=1)


def test_no_rule_spells_a_results_path_by_hand():
    files = [*RULES.glob("*.smk"), RULES.parents[1] / "Snakefile"]
    for path in files:
        code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        assert not [line for line in code if "results/" in line], path
        assert "{variant}" not in "\n".join(code), path


def test_the_slurm_profile_sends_every_gpu_rule_to_the_gpu_partition():
    """A rule that declares gpu=1 asks Slurm for a GPU: without its entry in the profile it would go to the CPU
    partition with an hour's wall time (train_on_scans, train_landmarks and train_multi once did)."""
    import re

    import yaml

    gpu_rules = {name for path in RULES.glob("*.smk")
                 for name, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", path.read_text(), re.S | re.M)
                 if re.search(r"^\s+gpu=1,", body, re.M)}
    assert {"train", "train_multi"} <= gpu_rules
    profile = yaml.safe_load((RULES.parents[1] / "profiles" / "slurm" / "config.yaml").read_text())
    on_gpu = {rule for rule, resources in profile["set-resources"].items()
              if resources.get("slurm_partition") == "YOUR_GPU_PARTITION"}
    assert gpu_rules == on_gpu
