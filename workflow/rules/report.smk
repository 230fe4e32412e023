# The dataset's clinical study and its self-contained report.html.


rule study:
    input:
        unpack(study_inputs),
    output:
        report(
            directory("results/{dataset}/study"),
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
        variants=lambda wildcards: ",".join(dataset_variants(wildcards)),
        dataset_dir=lambda wildcards: f"results/{wildcards.dataset}",
        resources=study_resources,
    shell:
        "deepssm-wf study --study {params.study} --dataset-dir {params.dataset_dir} {params.resources}"
        " --variants {params.variants} --out-dir {output} > {log} 2>&1"


rule report_html:
    input:
        unpack(report_inputs),
    output:
        "results/{dataset}/report.html",
    log:
        "logs/{dataset}/report_html.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset], sort_keys=True),
        variants=lambda wildcards: " ".join(dataset_variants(wildcards)),
        dataset_dir=lambda wildcards: f"results/{wildcards.dataset}",
    shell:
        "deepssm-wf report --dataset-dir {params.dataset_dir} --dataset {wildcards.dataset}"
        " --settings {params.settings:q} --variants {params.variants} --out {output} > {log} 2>&1"
