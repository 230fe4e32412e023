# Cohort sources and their quality control.


rule synthesize_cohort:
    output:
        subjects="resources/{dataset}/subjects.csv",
        ground_truth="resources/{dataset}/ground_truth.csv",
        data=directory("resources/{dataset}/data"),
    wildcard_constraints:
        dataset="|".join(SYNTHETIC) or "(?!)",
    params:
        anatomy=lambda wildcards: DATASETS[wildcards.dataset].anatomy,
        settings=synthetic_settings,
        out_dir=subpath(output.subjects, parent=True),
    log:
        "logs/{dataset}/synthesize_cohort.log",
    threads: 2
    conda:
        "../../envs/deepssm.yaml"
    shell:
        "deepssm-wf synthesize --anatomy {params.anatomy} --prefix {wildcards.dataset}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --workers {threads}"
        " > {log} 2>&1"


rule cohort_qc:
    input:
        subjects="resources/{dataset}/subjects.csv",
        data="resources/{dataset}/data",
    output:
        report(
            "results/{dataset}/qc/cohort.png",
            caption="../report/cohort_qc.rst",
            category="Cohort",
            subcategory="{dataset}",
        ),
    params:
        n_subjects=config.get("qc", {}).get("subjects", 4),
    log:
        "logs/{dataset}/cohort_qc.log",
    conda:
        "../../envs/deepssm.yaml"
    shell:
        "deepssm-wf qc-cohort --subjects {input.subjects} --out {output} --count {params.n_subjects} > {log} 2>&1"
