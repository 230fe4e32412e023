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


def synthetic_settings(wildcards):
    """The dataset's `synthetic` block as JSON, for the generator's command line."""
    return json.dumps(config["datasets"][wildcards.dataset]["synthetic"], sort_keys=True)
