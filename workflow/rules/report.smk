# The dataset's clinical study and its self-contained report.html.


rule study:
    input:
        unpack(study_inputs),
    output:
        report(
            directory(RESULTS.study_dir),
            patterns=["figures/{name}.png"],
            caption="../report/study.rst",
            category="Clinical study",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/study.log",
    wildcard_constraints:
        dataset="|".join(WITH_STUDY) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    params:
        study=lambda wildcards: DATASETS[wildcards.dataset].study,
        methods=lambda wildcards: " ".join(dataset_methods(wildcards)),
        dataset_dir=RESULTS.root,
        resources=study_resources,
    shell:
        "deepssm-wf study --study {params.study} --dataset-dir {params.dataset_dir} {params.resources}"
        " --methods {params.methods} --out-dir {output} > {log} 2>&1"


rule report_html:
    input:
        unpack(report_inputs),
    output:
        RESULTS.report_html,
    log:
        "logs/{dataset}/report_html.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset], sort_keys=True),
        methods=lambda wildcards: " ".join(dataset_methods(wildcards)),
        landmark_methods=lambda wildcards: " ".join(dataset_landmark_methods(wildcards)),
        dataset_dir=RESULTS.root,
    shell:
        "deepssm-wf report --dataset-dir {params.dataset_dir} --dataset {wildcards.dataset}"
        " --settings {params.settings:q} --methods {params.methods}"
        " --landmark-methods {params.landmark_methods} --out {output} > {log} 2>&1"
