# Config validation and helpers shared by the rules.
import json

from snakemake.utils import validate

from deepssm_workflow.config import check as check_config

validate(config, schema="../schemas/config.schema.yaml")
DATASETS = check_config(config)
SYNTHETIC = [name for name, ds in DATASETS.items() if ds.source == "synthetic"]


wildcard_constraints:
    dataset="|".join(DATASETS),


def synthetic_settings(wildcards):
    """The dataset's `synthetic` block as JSON, for the generator's command line."""
    return json.dumps(config["datasets"][wildcards.dataset]["synthetic"], sort_keys=True)
