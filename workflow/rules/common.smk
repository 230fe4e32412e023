# Config validation and helpers shared by the rules.
import functools
import json

from snakemake.utils import validate

from deepssm_workflow.config import load as load_config
from deepssm_workflow.provenance import software_id
from deepssm_workflow.sources import scan_files

# Our own pass first: it fills the schema's defaults into `config` (and variance 0.99 in a `training`
# block with neither n_modes nor variance), then names every bad key, one line each. Snakemake's
# validate then finds nothing left to fill.
DATASETS = load_config(config, workflow.source_path("../schemas/config.schema.yaml"))
validate(config, schema="../schemas/config.schema.yaml")
SYNTHETIC = [name for name, ds in DATASETS.items() if ds.source == "synthetic"]
# datasets with a clinical study (config `study`, default the anatomy's own; none: no study rule)
WITH_STUDY = [name for name, ds in DATASETS.items() if ds.study != "none"]

# Snakemake's between-workflow cache (--cache) keys an artifact by its rule's command, params, the
# rules upstream and the conda env, but not by the code of this package, which the commands run.
# The cached rules take this hash of the installed package's sources and of its dependencies'
# versions as a param: a changed library (or torch) then misses the cache, and reruns those rules
# through the params rerun trigger, rather than reusing models that the new code would not make.
SOFTWARE = software_id()


wildcard_constraints:
    dataset="|".join(DATASETS),


def cohort_source(wildcards):
    """The dataset's source for the ingestion command, as JSON; a synthetic cohort is read
    through its CSV manifest, the same path a user's CSV manifest takes."""
    entry = config["datasets"][wildcards.dataset]
    if entry["source"] == "synthetic":
        return json.dumps({"source": "synthetic", "manifest": f"resources/{wildcards.dataset}/subjects.csv"})
    return json.dumps(_user_source(entry))


def _user_source(entry):
    return {key: entry[key] for key in ("source", "manifest", "project") if key in entry}


def cohort_source_files(wildcards):
    """Input files of the ingestion: the generated cohort, or the user's table / project."""
    entry = config["datasets"][wildcards.dataset]
    if entry["source"] == "synthetic":
        return {"table": f"resources/{wildcards.dataset}/subjects.csv", "data": f"resources/{wildcards.dataset}/data"}
    return {"table": entry["manifest"] if entry["source"] == "csv" else entry["project"]}


@functools.cache  # three rules ask for each list: the table is read once per dataset and split
def _scans(dataset, split):
    """A user cohort's scans of one split, read from its table when the DAG is built (see
    deepssm_workflow.sources), so that a changed scan reruns its own preprocessing and what
    follows. A synthetic cohort's scans are made by synthesize_cohort into resources/{dataset}/data,
    an input of the ingestion, so they are not listed again."""
    entry = config["datasets"][dataset]
    if entry["source"] == "synthetic":
        return ()
    return tuple(scan_files(_user_source(entry), split))


def training_scans(wildcards):
    return list(_scans(wildcards.dataset, "train"))


def test_scans(wildcards):
    return list(_scans(wildcards.dataset, "test"))


def synthetic_settings(wildcards):
    """The dataset's `synthetic` block as JSON, for the generator's command line."""
    return json.dumps(config["datasets"][wildcards.dataset]["synthetic"], sort_keys=True)


# Inputs of the evaluation, study and report rules.


def dataset_variants(wildcards):
    """The variants a dataset's evaluation, study and report cover (config `variants`, default all four)."""
    return config["datasets"][wildcards.dataset].get("variants", VARIANTS)


def evaluation_inputs(wildcards):
    variants = dataset_variants(wildcards)
    return {
        "subjects": f"results/{wildcards.dataset}/cohort/subjects.csv",
        "cohort_report": f"results/{wildcards.dataset}/cohort/report.json",
        "shapes_train": f"results/{wildcards.dataset}/cohort/shapes_train.npz",
        "shapes_test": f"results/{wildcards.dataset}/cohort/shapes_test.npz",
        "test": f"results/{wildcards.dataset}/preprocess/test.npz",
        "cards": [f"results/{wildcards.dataset}/models/{v}/model_card.json" for v in variants],
        "predictions": [f"results/{wildcards.dataset}/predictions/{v}/predictions.csv" for v in variants],
    }


def study_inputs(wildcards):
    variants = dataset_variants(wildcards)
    inputs = {
        "subjects": f"results/{wildcards.dataset}/cohort/subjects.csv",
        "shapes_train": f"results/{wildcards.dataset}/cohort/shapes_train.npz",
        "shapes_test": f"results/{wildcards.dataset}/cohort/shapes_test.npz",
        "test": f"results/{wildcards.dataset}/preprocess/test.npz",
        "models": [f"results/{wildcards.dataset}/models/{v}/model.pt" for v in variants],
        "cards": [f"results/{wildcards.dataset}/models/{v}/model_card.json" for v in variants],
        "predictions": [f"results/{wildcards.dataset}/predictions/{v}/predictions.csv" for v in variants],
    }
    if wildcards.dataset in SYNTHETIC:  # the generator's extra data (metopic expert ratings)
        inputs["data"] = f"resources/{wildcards.dataset}/data"
    return inputs


def study_resources(wildcards):
    return f"--resources-dir resources/{wildcards.dataset}" if wildcards.dataset in SYNTHETIC else ""


def report_inputs(wildcards):
    d, variants = wildcards.dataset, dataset_variants(wildcards)
    inputs = {
        "cohort_report": f"results/{d}/cohort/report.json",
        "subjects": f"results/{d}/cohort/subjects.csv",
        "shapes_train": f"results/{d}/cohort/shapes_train.npz",
        "shapes_test": f"results/{d}/cohort/shapes_test.npz",
        "train": f"results/{d}/preprocess/train.npz",
        "test": f"results/{d}/preprocess/test.npz",
        "grid": f"results/{d}/preprocess/grid.json",
        "preprocess_qc": f"results/{d}/qc/preprocess.png",
        "samples": f"results/{d}/augmentation/samples.npz",
        "augmentation_qc": f"results/{d}/augmentation/qc.png",
        "models": [f"results/{d}/models/{v}/model.pt" for v in variants],
        "cards": [f"results/{d}/models/{v}/model_card.json" for v in variants],
        "curves": [f"results/{d}/models/{v}/loss_curve.png" for v in variants],
        "predictions": [f"results/{d}/predictions/{v}/predictions.csv" for v in variants],
        "provenance": [f"results/{d}/augmentation/provenance.json"]
        + [f"results/{d}/{stage}/{v}/provenance.json" for stage in ("models", "predictions") for v in variants],
        "evaluation": [
            f"results/{d}/evaluation/{name}"
            for name in (
                "summary.json",
                "figures.json",
                "tables.json",
                "tables/accuracy_summary.csv",
                "tables/accuracy_per_subject.csv",
                "tables/inference_time.csv",
                "per_point_rmse.png",
                "surface_boxplot.png",
                "surface_heatmaps.png",
            )
        ],
        "cohort_qc": f"results/{d}/qc/cohort.png",
    }
    if d in WITH_STUDY:
        inputs["study"] = f"results/{d}/study"
    return inputs
