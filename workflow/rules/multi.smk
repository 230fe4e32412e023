# Multi-anatomy datasets (the config's `multi_anatomy`): several anatomies per scan, found and predicted by a
# multi-anatomy method (massm) in the uncropped scans, evaluated per anatomy and reported (report_multi.py).
# Their {dataset} names are not those of `datasets` (config.py checks), so each rule here matches only them.


rule synthesize_multi_cohort:
    output:
        subjects="resources/{dataset}/subjects.csv",
        ground_truth="resources/{dataset}/ground_truth.csv",
        data=directory("resources/{dataset}/data"),
    log:
        "logs/{dataset}/synthesize_multi_cohort.log",
    wildcard_constraints:
        dataset="|".join(MULTI_SYNTHETIC) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    threads: 2
    params:
        settings=lambda wildcards: json.dumps(multi_entry(wildcards)["synthetic"], sort_keys=True),
        out_dir=subpath(output.subjects, parent=True),
    shell:
        "deepssm-wf synthesize-multi --prefix {wildcards.dataset} --settings {params.settings:q}"
        " --out-dir {params.out_dir} --workers {threads} > {log} 2>&1"


rule ingest_multi_cohort:
    input:
        unpack(multi_cohort_source_files),
    output:
        directory(RESULTS.cohort_dir),
    log:
        "logs/{dataset}/ingest_multi_cohort.log",
    wildcard_constraints:
        dataset="|".join(MULTI) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    params:
        source=multi_cohort_source,
    shell:
        "deepssm-wf ingest-multi --source {params.source:q} --out-dir {output} > {log} 2>&1"


# One anatomy as a single-anatomy cohort, for the DeepSSM baselines (the dataset's `baselines`)
rule export_anatomy:
    input:
        cohort=RESULTS.cohort_dir,
        scans=multi_scans,
    output:
        subjects=RESULTS.anatomy_export("subjects.csv", "{anatomy}"),
        data=directory(RESULTS.anatomy_export("data", "{anatomy}")),
    log:
        "logs/{dataset}/export_anatomy_{anatomy}.log",
    wildcard_constraints:
        dataset="|".join(MULTI) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    params:
        out_dir=subpath(output.subjects, parent=True),
    shell:
        "deepssm-wf export-anatomy --cohort {input.cohort} --anatomy {wildcards.anatomy}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule preprocess_multi_scans:
    input:
        cohort=RESULTS.cohort_dir,
        scans=multi_scans,  # a user cohort's scan files: a changed scan reruns from here (see common.smk)
    output:
        directory(RESULTS.scans_dir),
    log:
        "logs/{dataset}/preprocess_multi_scans.log",
    wildcard_constraints:
        dataset="|".join(MULTI) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(multi_entry(wildcards)["scan_grid"], sort_keys=True),
    shell:
        "deepssm-wf preprocess-multi-scans --cohort {input.cohort} --settings {params.settings:q}"
        " --out-dir {output} > {log} 2>&1"


rule train_multi:
    input:
        scans=RESULTS.scans_dir,
    output:
        model=RESULTS.model_pt("{method}"),
        card=RESULTS.model_card("{method}"),
        log_csv=RESULTS.training_log("{method}"),
        curve=RESULTS.loss_curve("{method}"),
        provenance=RESULTS.provenance("models", "{method}"),
    log:
        "logs/{dataset}/train_{method}.log",
    wildcard_constraints:
        dataset="|".join(MULTI) or "(?!)",
        method="|".join(MULTI_METHODS) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        settings=multi_training_settings,
        software=SOFTWARE,  # the params rerun trigger (see common.smk)
        out_dir=subpath(output.model, parent=True),
    shell:
        "deepssm-wf train-multi --scans-dir {input.scans} --method {wildcards.method}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads}"
        " --inputs {input.scans}/train.npz {input.scans}/grid.json --outputs {output}"
        " --provenance {output.provenance} > {log} 2>&1"


rule predict_multi:
    input:
        scans=RESULTS.scans_dir,
        model=RESULTS.model_pt("{method}"),
        card=RESULTS.model_card("{method}"),
    output:
        table=RESULTS.predictions_csv("{method}"),
        particles=directory(RESULTS.predicted_particles("{method}")),
    log:
        "logs/{dataset}/predict_multi_{method}.log",
    wildcard_constraints:
        dataset="|".join(MULTI) or "(?!)",
        method="|".join(MULTI_METHODS) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    threads: 1
    params:
        model_dir=subpath(input.model, parent=True),
        out_dir=subpath(output.table, parent=True),
    shell:
        "deepssm-wf predict-multi --model-dir {params.model_dir} --scans-dir {input.scans} --split test"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule evaluate_multi:
    input:
        cohort=RESULTS.cohort_dir,
        scans=RESULTS.scans_dir,
        model=RESULTS.model_pt("{method}"),
        card=RESULTS.model_card("{method}"),
        predictions=RESULTS.predictions_csv("{method}"),
        particles=RESULTS.predicted_particles("{method}"),
    output:
        directory(RESULTS.multi_evaluation_dir("{method}")),
    log:
        "logs/{dataset}/evaluate_multi_{method}.log",
    wildcard_constraints:
        dataset="|".join(MULTI) or "(?!)",
        method="|".join(MULTI_METHODS) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    threads: 1
    params:
        model_dir=subpath(input.model, parent=True),
        predictions_dir=subpath(input.predictions, parent=True),
    shell:
        "deepssm-wf evaluate-multi --model-dir {params.model_dir} --scans-dir {input.scans}"
        " --predictions-dir {params.predictions_dir} --cohort {input.cohort} --out-dir {output} --threads {threads}"
        " > {log} 2>&1"


rule report_multi_html:
    input:
        unpack(multi_report_inputs),
    output:
        RESULTS.report_html,
    log:
        "logs/{dataset}/report_multi_html.log",
    wildcard_constraints:
        dataset="|".join(MULTI) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(multi_entry(wildcards), sort_keys=True),
        methods=lambda wildcards: " ".join(multi_entry(wildcards)["methods"]),
        dataset_dir=RESULTS.root,
    shell:
        "deepssm-wf report-multi --dataset-dir {params.dataset_dir} --dataset {wildcards.dataset}"
        " --settings {params.settings:q} --methods {params.methods} --out {output} > {log} 2>&1"
