# Config validation and helpers shared by the rules.
import json

from snakemake.utils import validate

from deepssm_workflow.config import load as load_config

# Our own pass first: one line per bad key. Snakemake's validate then fills schema defaults.
DATASETS = load_config(config, workflow.source_path("../schemas/config.schema.yaml"))
validate(config, schema="../schemas/config.schema.yaml")
SYNTHETIC = [name for name, ds in DATASETS.items() if ds.source == "synthetic"]


wildcard_constraints:
    dataset="|".join(DATASETS),


def cohort_source(wildcards):
    """The dataset's source for the ingestion command, as JSON; a synthetic cohort is read
    through its CSV manifest, the same path a user's CSV manifest takes."""
    entry = config["datasets"][wildcards.dataset]
    if entry["source"] == "synthetic":
        return json.dumps({"source": "synthetic", "manifest": f"resources/{wildcards.dataset}/subjects.csv"})
    return json.dumps({key: entry[key] for key in ("source", "manifest", "project") if key in entry})


def cohort_source_files(wildcards):
    """Input files of the ingestion: the generated cohort, or the user's table / project."""
    entry = config["datasets"][wildcards.dataset]
    if entry["source"] == "synthetic":
        return {"table": f"resources/{wildcards.dataset}/subjects.csv", "data": f"resources/{wildcards.dataset}/data"}
    return {"table": entry["manifest"] if entry["source"] == "csv" else entry["project"]}


def synthetic_settings(wildcards):
    """The dataset's `synthetic` block as JSON, for the generator's command line."""
    return json.dumps(config["datasets"][wildcards.dataset]["synthetic"], sort_keys=True)
