# Cohort sources and their quality control.


rule synthesize_cohort:
    output:
        subjects="resources/{dataset}/subjects.csv",
        ground_truth="resources/{dataset}/ground_truth.csv",
        data=directory("resources/{dataset}/data"),
    log:
        "logs/{dataset}/synthesize_cohort.log",
    wildcard_constraints:
        dataset="|".join(SYNTHETIC) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    threads: 2
    params:
        anatomy=lambda wildcards: DATASETS[wildcards.dataset].anatomy,
        settings=synthetic_settings,
        out_dir=subpath(output.subjects, parent=True),
    shell:
        "deepssm-wf synthesize --anatomy {params.anatomy} --prefix {wildcards.dataset}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --workers {threads}"
        " > {log} 2>&1"


# Every dataset's, from its ingested cohort (absolute file paths; points from the shapes).
rule cohort_qc:
    input:
        subjects=RESULTS.subjects_csv,
        shapes_train=RESULTS.shapes("train"),
        shapes_test=RESULTS.shapes("test"),
        training_scans=training_scans,  # the figure shows some of them (see common.smk)
        test_scans=test_scans,
    output:
        report(
            RESULTS.cohort_qc,
            caption="../report/cohort_qc.rst",
            category="Cohort",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/cohort_qc.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        n_subjects=config.get("qc", {}).get("subjects", 4),
    shell:
        "deepssm-wf qc-cohort --subjects {input.subjects} --shapes {input.shapes_train} {input.shapes_test}"
        " --out {output} --count {params.n_subjects} > {log} 2>&1"
