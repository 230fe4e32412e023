# Ingestion of the cohort source and segmentation-free preprocessing.


rule ingest_cohort:
    input:
        unpack(cohort_source_files),
    output:
        subjects="results/{dataset}/cohort/subjects.csv",
        shapes_train="results/{dataset}/cohort/shapes_train.npz",
        shapes_test="results/{dataset}/cohort/shapes_test.npz",
        report="results/{dataset}/cohort/report.json",
    log:
        "logs/{dataset}/ingest_cohort.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        anatomy=lambda wildcards: DATASETS[wildcards.dataset].anatomy,
        study=lambda wildcards: DATASETS[wildcards.dataset].study,
        source=cohort_source,
        out_dir=subpath(output.subjects, parent=True),
    shell:
        "deepssm-wf ingest --anatomy {params.anatomy} --study {params.study} --source {params.source:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule preprocess_train:
    input:
        subjects="results/{dataset}/cohort/subjects.csv",
        shapes_train="results/{dataset}/cohort/shapes_train.npz",
        scans=training_scans,
    output:
        grid="results/{dataset}/preprocess/grid.json",
        reference="results/{dataset}/preprocess/reference.nrrd",
        train="results/{dataset}/preprocess/train.npz",
    log:
        "logs/{dataset}/preprocess_train.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["preprocess"], sort_keys=True),
        cohort=subpath(input.subjects, parent=True),
        out_dir=subpath(output.grid, parent=True),
    shell:
        "deepssm-wf preprocess-train --cohort {params.cohort} --settings {params.settings:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# Test images are preprocessed from the image alone: this rule gets the subjects
# table (of which only id, split and image are read) and the reference, never the
# test subjects' particles (shapes_test.npz) or segmentations.
rule preprocess_test:
    input:
        subjects="results/{dataset}/cohort/subjects.csv",
        grid="results/{dataset}/preprocess/grid.json",
        reference="results/{dataset}/preprocess/reference.nrrd",
        scans=test_scans,
    output:
        "results/{dataset}/preprocess/test.npz",
    log:
        "logs/{dataset}/preprocess_test.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        cohort=subpath(input.subjects, parent=True),
        preprocess_dir=subpath(input.grid, parent=True),
    shell:
        "deepssm-wf preprocess-unseen --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --split test --out {output} > {log} 2>&1"


rule preprocess_qc:
    input:
        grid="results/{dataset}/preprocess/grid.json",
        reference="results/{dataset}/preprocess/reference.nrrd",
        train="results/{dataset}/preprocess/train.npz",
        test="results/{dataset}/preprocess/test.npz",
    output:
        report(
            "results/{dataset}/qc/preprocess.png",
            caption="../report/preprocess_qc.rst",
            category="Preprocessing",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/preprocess_qc.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        preprocess_dir=subpath(input.grid, parent=True),
        n_subjects=config.get("qc", {}).get("subjects", 4),
    shell:
        "deepssm-wf qc-preprocess --preprocess-dir {params.preprocess_dir} --out {output}"
        " --count {params.n_subjects} > {log} 2>&1"
