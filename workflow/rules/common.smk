# Config validation and helpers shared by the rules.
import functools
import json
from pathlib import Path

from deepssm_workflow import methods as registry
from deepssm_workflow.config import load as load_config
from deepssm_workflow.layout import EVALUATION_FIGURES, EVALUATION_TABLES, patterns
from deepssm_workflow.multi_baselines import anatomies_of, baseline_datasets, baseline_name
from deepssm_workflow.provenance import software_id
from deepssm_workflow.seed_spread import plan as spread_plan
from deepssm_workflow.sources import scan_files

# Not snakemake.utils.validate: the schema's `methods` blocks come from the method registry, which
# deepssm_workflow.config adds. It fills the schema's defaults into `config` (and variance 0.99 in
# a `shape_space` block with neither n_modes nor variance), then names every bad key, one line each.
# A multi-anatomy dataset's DeepSSM baselines are single-anatomy datasets, one per anatomy, added here
# ({dataset}_{anatomy}: multi_baselines.py); their cohorts are exported by multi.smk's export_anatomy.
BASELINE_DATASETS = baseline_datasets(config)
if BASELINE_DATASETS:
    config["datasets"] = {**(config.get("datasets") or {}), **BASELINE_DATASETS}
DATASETS = load_config(config, workflow.source_path("../schemas/config.schema.yaml"))
# the registered methods: the train and predict rules' {method} wildcard. Those that find the anatomy in
# the uncropped scan themselves train and predict on results/{dataset}/scans (full_field), the others on
# the registered crops and their augmentation: each kind has its own train and predict rules.
METHODS = registry.names()
SCAN_METHODS = [m for m in METHODS if registry.SCANS in registry.get(m).method.needs]
# those that learn landmarks from the training images alone (no shapes): their own train, predict and evaluate
# rules (landmarks.smk), and no eq. 12 evaluation
LANDMARK_METHODS = [m for m in METHODS if registry.get(m).has(registry.LANDMARKS)]
CROP_METHODS = [m for m in METHODS if m not in SCAN_METHODS and m not in LANDMARK_METHODS]
SYNTHETIC = [name for name, ds in DATASETS.items() if ds.source == "synthetic"]
# datasets with a clinical study (config `study`, default the anatomy's own; none: no study rule)
WITH_STUDY = [name for name, ds in DATASETS.items() if ds.study != "none"]

# Snakemake's between-workflow cache (--cache) keys an artifact by its rule's command, params, the
# rules upstream and the conda env, but not by the code of this package, which the commands run.
# The cached rules take this hash of the installed package's sources and of its dependencies'
# versions as a param: a changed library (or torch) then misses the cache, and reruns those rules
# through the params rerun trigger, rather than reusing models that the new code would not make.
SOFTWARE = software_id()

# results/{dataset}/...: every rule's input and output path, as a pattern (see deepssm_workflow.layout)
RESULTS = patterns()


# multi-anatomy datasets (the config's `multi_anatomy`; multi.smk), trained with the methods that find several
# anatomies per scan
MULTI = list(config.get("multi_anatomy") or {})
MULTI_SYNTHETIC = [name for name in MULTI if config["multi_anatomy"][name]["source"] == "synthetic"]
MULTI_METHODS = [m for m in METHODS if registry.get(m).has(registry.MULTI_ANATOMY)]


wildcard_constraints:
    dataset="|".join(DATASETS) or "(?!)",


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
    if wildcards.dataset in BASELINE_DATASETS:  # exported from a multi-anatomy cohort, with its data folder
        return {"table": entry["manifest"], "data": str(Path(entry["manifest"]).parent / "data")}
    return {"table": entry["manifest"] if entry["source"] == "csv" else entry["project"]}


@functools.cache  # three rules ask for each list: the table is read once per dataset and split
def _scans(dataset, split):
    """A user cohort's scans of one split, read from its table when the DAG is built (see
    deepssm_workflow.sources), so that a changed scan reruns its own preprocessing and what
    follows. A synthetic cohort's scans are made by synthesize_cohort into resources/{dataset}/data,
    an input of the ingestion, so they are not listed again."""
    entry = config["datasets"][dataset]
    if entry["source"] == "synthetic" or dataset in BASELINE_DATASETS:  # their files come with their cohort
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


def dataset_methods(wildcards):
    """The shape methods a dataset trains, evaluates, studies and reports: the keys of its `methods` block, less
    the landmark methods (`dataset_landmark_methods`)."""
    return [m for m in config["datasets"][wildcards.dataset]["methods"] if m not in LANDMARK_METHODS]


def dataset_landmark_methods(wildcards):
    """The landmark methods a dataset lists in its `methods` block: trained, predicted, evaluated and reported
    apart from the shape methods (landmarks.smk)."""
    return [m for m in config["datasets"][wildcards.dataset]["methods"] if m in LANDMARK_METHODS]


def training_settings(wildcards):
    """JSON of what the train rule's method needs: the dataset's shape space, the engine's settings
    and the method's own block (a method not listed in `methods` trains with its defaults). Only
    these are in the rule's params, so changing one method's settings retrains that method alone."""
    entry = config["datasets"][wildcards.dataset]
    block = entry["methods"].get(wildcards.method, {})
    settings = {"shape_space": entry["shape_space"], "training": entry["training"], "method": block}
    if wildcards.method in LANDMARK_METHODS:  # no shapes: a new shape space must not retrain it
        del settings["shape_space"]
    return json.dumps(settings, sort_keys=True)


def method_needs_inputs(wildcards):
    """The train rules' inputs that only some methods need, from the method's `needs` (NEEDS names of
    deepssm_workflow.methods.interface), for `unpack`: segmentations (the training subjects' and the
    augmented samples', with the latter's sidecar) for a method that needs them; nothing for the others,
    so that the default DAG never builds them."""
    from deepssm_workflow.methods.interface import SEGMENTATIONS

    d, inputs = patterns(wildcards.dataset), {}
    if SEGMENTATIONS in registry.get(wildcards.method).method.needs:
        inputs["train_segmentations"] = d.train_segmentations
        inputs["segmentations"] = d.augmentation_segmentations
        inputs["segmentations_provenance"] = d.augmentation_segmentations_provenance
    return inputs


def landmark_needs_inputs(wildcards):
    """The train_landmarks rule's inputs that only some landmark methods need, for `unpack`: the training
    subjects' segmentations for the weak or localised variant (landmarks_weak)."""
    from deepssm_workflow.methods.interface import SEGMENTATIONS

    if SEGMENTATIONS in registry.get(wildcards.method).method.needs:
        return {"train_segmentations": patterns(wildcards.dataset).train_segmentations}
    return {}


def augmentation_stores(wildcards, input):
    """The augmentation's stores a training reads, checked against their sidecars before it starts (a
    corrupted one is removed and rebuilt on the next run): the images, and the segmentations if it needs them."""
    stores = [input.samples, input.images]
    return " ".join(stores + ([input.segmentations] if "segmentations" in input.keys() else []))


def engine_setting(wildcards, key: str):
    """The dataset's training.<key> (val_fraction, seed: the schema has filled in its default)."""
    return config["datasets"][wildcards.dataset]["training"][key]


def validated_methods(wildcards):
    """The dataset's methods that read registered crops: those the registered validation scores."""
    return [m for m in dataset_methods(wildcards) if m in CROP_METHODS]


def validation_inputs(wildcards):
    d = patterns(wildcards.dataset)
    return {
        "shapes_train": d.shapes("train"),
        "grid": d.grid_json,
        "registered": d.preprocessed("validation"),
        "cards": [d.model_card(m) for m in validated_methods(wildcards)],
        "models": [d.model_pt(m) for m in validated_methods(wildcards)],
    }


def tuning_sweep(wildcards):
    """The dataset's tuning sweep {sweep}: its method and named candidates (config `tuning`)."""
    sweeps = config["datasets"][wildcards.dataset].get("tuning") or {}
    if wildcards.sweep not in sweeps:
        raise ValueError(
            f"datasets.{wildcards.dataset}.tuning: no sweep {wildcards.sweep!r} (sweeps: "
            f"{', '.join(sweeps) or 'none'})"
        )
    return sweeps[wildcards.sweep]


def tuning_settings(wildcards):
    """The train rule's settings JSON for one candidate of a sweep: its keys replace the method's block's."""
    entry, sweep = config["datasets"][wildcards.dataset], tuning_sweep(wildcards)
    block = {**entry["methods"].get(sweep["method"], {}), **sweep["candidates"][wildcards.candidate]}
    return json.dumps(
        {"shape_space": entry["shape_space"], "training": entry["training"], "method": block}, sort_keys=True
    )


def tuning_table_inputs(wildcards):
    d, sweep = patterns(wildcards.dataset), tuning_sweep(wildcards)
    candidates, method = list(sweep["candidates"]), sweep["method"]
    return {
        "shapes_train": d.shapes("train"),
        "grid": d.grid_json,
        "registered": d.preprocessed("validation"),
        "cards": [d.tuning_model_card(wildcards.sweep, v, method) for v in candidates],
        "models": [d.tuning_model_pt(wildcards.sweep, v, method) for v in candidates],
    }


def check_tuning_sweeps():
    """Every sweep names a method that reads registered crops, and each candidate's settings are the method's."""
    for name, entry in config.get("datasets", {}).items():
        for sweep_name, sweep in (entry.get("tuning") or {}).items():
            where = f"datasets.{name}.tuning.{sweep_name}"
            if sweep["method"] not in CROP_METHODS:
                raise ValueError(
                    f"{where}.method: {sweep['method']!r} is not a method that reads registered crops "
                    f"(one of {', '.join(CROP_METHODS)})"
                )
            for candidate, changes in sweep["candidates"].items():
                try:
                    registry.get(sweep["method"]).settings({**entry["methods"].get(sweep["method"], {}), **changes})
                except (TypeError, ValueError) as error:
                    raise ValueError(f"{where}.candidates.{candidate}: {error}") from None


check_tuning_sweeps()


def evaluation_inputs(wildcards):
    d, methods = patterns(wildcards.dataset), dataset_methods(wildcards)
    return {
        "subjects": d.subjects_csv,
        "cohort_report": d.cohort_report,
        "shapes_train": d.shapes("train"),
        "shapes_test": d.shapes("test"),
        "test": d.preprocessed("test"),
        "cards": [d.model_card(m) for m in methods],
        "predictions": [d.predictions_csv(m) for m in methods],
        # the models themselves, for what evaluation measures by capability (scales, segmentation)
        "models": [d.model_pt(m) for m in methods],
    }


def study_inputs(wildcards):
    d, methods = patterns(wildcards.dataset), dataset_methods(wildcards)
    inputs = {
        "subjects": d.subjects_csv,
        "shapes_train": d.shapes("train"),
        "shapes_test": d.shapes("test"),
        "test": d.preprocessed("test"),
        "models": [d.model_pt(m) for m in methods],
        "cards": [d.model_card(m) for m in methods],
        "predictions": [d.predictions_csv(m) for m in methods],
    }
    if wildcards.dataset in SYNTHETIC:  # the generator's extra data (metopic expert ratings)
        inputs["data"] = f"resources/{wildcards.dataset}/data"
    return inputs


def study_resources(wildcards):
    return f"--resources-dir resources/{wildcards.dataset}" if wildcards.dataset in SYNTHETIC else ""


def report_inputs(wildcards):
    d, methods = patterns(wildcards.dataset), dataset_methods(wildcards)
    inputs = {
        "cohort_report": d.cohort_report,
        "subjects": d.subjects_csv,
        "shapes_train": d.shapes("train"),
        "shapes_test": d.shapes("test"),
        "train": d.preprocessed("train"),
        "test": d.preprocessed("test"),
        "grid": d.grid_json,
        "preprocess_qc": d.preprocess_qc,
        "samples": d.samples_npz,
        "augmentation_qc": d.augmentation_qc,
        "models": [d.model_pt(m) for m in methods],
        "cards": [d.model_card(m) for m in methods],
        "curves": [d.loss_curve(m) for m in methods],
        "predictions": [d.predictions_csv(m) for m in methods],
        "provenance": [d.provenance("augmentation")]
        + [d.provenance(stage, m) for stage in ("models", "predictions") for m in methods],
        "evaluation": [d.evaluation_summary, d.evaluation_figures_json, d.evaluation_tables_json]
        + [d.evaluation_table(name) for name in EVALUATION_TABLES]
        + [d.evaluation_figure(name) for name in EVALUATION_FIGURES],
        "cohort_qc": d.cohort_qc,
    }
    if validated_methods(wildcards):
        inputs["validation"] = d.validation_file("summary.csv")
    if wildcards.dataset in WITH_STUDY:
        inputs["study"] = d.study_dir
    landmark_methods = dataset_landmark_methods(wildcards)
    inputs["landmark_evaluations"] = [d.landmark_evaluation("landmark_evaluation.json", m) for m in landmark_methods]
    inputs["landmark_selections"] = [d.landmark_selection("selection.png", m) for m in landmark_methods]
    if wildcards.dataset in WITH_STUDY:
        inputs["landmark_studies"] = [d.landmark_study_dir(m) for m in landmark_methods]
    return inputs


# Inputs of the seed spread (seeds.smk).


def seed_spread_plan(wildcards):
    """(methods, init seeds) of the dataset's seed spread (config `seed_spread`, see
    deepssm_workflow.seed_spread.plan); the first seed is the training seed: the default run's models."""
    return spread_plan(config["datasets"][wildcards.dataset], wildcards.dataset)


def seed_spread_inputs(wildcards):
    d = patterns(wildcards.dataset)
    methods, seeds = seed_spread_plan(wildcards)
    runs = [(None, m) for m in methods] + [(s, m) for s in seeds[1:] for m in methods]  # None: the default run
    return {
        "subjects": d.subjects_csv,
        "shapes_train": d.shapes("train"),
        "shapes_test": d.shapes("test"),
        "test": d.preprocessed("test"),
        "cards": [d.model_card(m) if s is None else d.seed_model_card(s, m) for s, m in runs],
        "predictions": [d.predictions_csv(m) if s is None else d.seed_predictions_csv(s, m) for s, m in runs],
        "provenance": [d.provenance("models", m, s) for s, m in runs],
    }


# Inputs and settings of the multi-anatomy rules (multi.smk).


def multi_entry(wildcards):
    """A multi-anatomy dataset's block of the config (its defaults filled in)."""
    return config["multi_anatomy"][wildcards.dataset]


def multi_cohort_source(wildcards):
    """The multi-anatomy dataset's source for ingest-multi, as JSON; a synthetic cohort through its CSV manifest."""
    entry = multi_entry(wildcards)
    if entry["source"] == "synthetic":
        return json.dumps({"source": "csv", "manifest": f"resources/{wildcards.dataset}/subjects.csv"})
    return json.dumps(_user_source(entry))


def multi_cohort_source_files(wildcards):
    entry = multi_entry(wildcards)
    if entry["source"] == "synthetic":
        return {"table": f"resources/{wildcards.dataset}/subjects.csv", "data": f"resources/{wildcards.dataset}/data"}
    return {"table": entry["manifest"] if entry["source"] == "csv" else entry["project"]}


def multi_scans(wildcards):
    """A user multi-anatomy cohort's scan files, both splits, each once (a long-form manifest lists a scan once
    per anatomy); none for a synthetic one, whose files come with its generation."""
    entry = multi_entry(wildcards)
    if entry["source"] == "synthetic":
        return []
    return list(dict.fromkeys(path for split in ("train", "test") for path in scan_files(_user_source(entry), split)))


def multi_training_settings(wildcards):
    """JSON of what train-multi needs: the engine's settings and the method's block."""
    entry = multi_entry(wildcards)
    return json.dumps(
        {"training": entry["training"], "method": entry["methods"].get(wildcards.method, {})}, sort_keys=True
    )


def multi_report_inputs(wildcards):
    entry = multi_entry(wildcards)
    d, methods = patterns(wildcards.dataset), entry["methods"]
    baseline_anatomies = anatomies_of(entry) if "baselines" in entry else ()
    return {
        "cohort": d.cohort_dir,
        "scans": d.scans_dir,
        "cards": [d.model_card(m) for m in methods],
        "curves": [d.loss_curve(m) for m in methods],
        "provenance": [d.provenance("models", m) for m in methods],
        "evaluation": [d.multi_evaluation_dir(m) for m in methods],
        "predictions": [d.predictions_csv(m) for m in methods],
        "baselines": [
            patterns(baseline_name(wildcards.dataset, anatomy)).evaluation_table("error_decomposition_per_subject")
            for anatomy in baseline_anatomies
        ],
        # their test scans' registration records: the report says where it was flagged
        "baseline_registrations": [
            patterns(baseline_name(wildcards.dataset, anatomy)).preprocessed("test") for anatomy in baseline_anatomies
        ],
    }
