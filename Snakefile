# DeepSSM workflow: statistical shape models predicted from unsegmented 3D images.
# Stages live in workflow/rules/; all logic lives in the deepssm_workflow package.
import os

from snakemake.utils import min_version

min_version("9.0")

# The rules' conda env (envs/deepssm.yaml) installs this checkout from this variable.
os.environ.update(DEEPSSM_WORKFLOW_ROOT=workflow.current_basedir.get_path_or_uri(secret_free=True))


# The embedded default. A config given with --configfile (config/tiny.yaml, config/paper.yaml, a
# user's) replaces it rather than being merged over it, which would mix the demo's settings into it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/cohort.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/augment.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/landmarks.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/seeds.smk"
include: "workflow/rules/tuning.smk"
include: "workflow/rules/multi.smk"


rule all:
    input:
        expand(RESULTS.cohort_qc, dataset=DATASETS),
        expand(RESULTS.report_html, dataset=DATASETS),
        expand(RESULTS.report_html, dataset=MULTI),
