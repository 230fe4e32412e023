# Ingestion of the cohort source and segmentation-free preprocessing.


rule ingest_cohort:
    input:
        unpack(cohort_source_files),
    output:
        subjects=RESULTS.subjects_csv,
        shapes_train=RESULTS.shapes("train"),
        shapes_test=RESULTS.shapes("test"),
        report=RESULTS.cohort_report,
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
        subjects=RESULTS.subjects_csv,
        shapes_train=RESULTS.shapes("train"),
        scans=training_scans,
    output:
        grid=RESULTS.grid_json,
        reference=RESULTS.reference_nrrd,
        train=RESULTS.preprocessed("train"),
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


# Training only, not part of `rule all`: the train rule asks for it when its method needs segmentations
# (common.smk: method_needs_inputs). Each training subject's segmentation, resampled with its image's
# transform as the fraction of each voxel inside the anatomy.
rule preprocess_segmentations:
    input:
        subjects=RESULTS.subjects_csv,
        train=RESULTS.preprocessed("train"),
        grid=RESULTS.grid_json,
    output:
        RESULTS.train_segmentations,
    log:
        "logs/{dataset}/preprocess_segmentations.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        cohort=subpath(input.subjects, parent=True),
        preprocess_dir=subpath(input.train, parent=True),
    shell:
        "deepssm-wf preprocess-segmentations --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --out {output} > {log} 2>&1"


# Test images are preprocessed from the image alone: this rule gets the subjects
# table (of which only id, split and image are read) and the reference, never the
# test subjects' particles (shapes_test.npz) or segmentations.
rule preprocess_test:
    input:
        subjects=RESULTS.subjects_csv,
        grid=RESULTS.grid_json,
        reference=RESULTS.reference_nrrd,
        scans=test_scans,
    output:
        RESULTS.preprocessed("test"),
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
        grid=RESULTS.grid_json,
        reference=RESULTS.reference_nrrd,
        train=RESULTS.preprocessed("train"),
        test=RESULTS.preprocessed("test"),
    output:
        report(
            RESULTS.preprocess_qc,
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


# For a method that finds the anatomy itself (train_on_scans): every scan, training and test, on one
# grid size centred on the scan, no registration. Training scans come with their particles and
# segmentations; test scans are read as images alone (never shapes_test.npz).
rule preprocess_scans:
    input:
        subjects=RESULTS.subjects_csv,
        shapes_train=RESULTS.shapes("train"),
        training_scans=training_scans,
        test_scans=test_scans,
    output:
        grid=RESULTS.scans_grid_json,
        train=RESULTS.scans("train"),
        test=RESULTS.scans("test"),
    log:
        "logs/{dataset}/preprocess_scans.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["scan_grid"], sort_keys=True),
        cohort=subpath(input.subjects, parent=True),
        out_dir=subpath(output.grid, parent=True),
    shell:
        "deepssm-wf preprocess-scans --cohort {params.cohort} --settings {params.settings:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"


# The validation subjects (training.val_fraction, training.seed) registered from the image alone, exactly as
# test images are: what every setting is chosen on (deepssm_workflow.validation). Reads only their images.
rule preprocess_validation:
    input:
        subjects=RESULTS.subjects_csv,
        shapes_train=RESULTS.shapes("train"),
        grid=RESULTS.grid_json,
        reference=RESULTS.reference_nrrd,
        scans=training_scans,
    output:
        RESULTS.preprocessed("validation"),
    log:
        "logs/{dataset}/preprocess_validation.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        cohort=subpath(input.subjects, parent=True),
        preprocess_dir=subpath(input.grid, parent=True),
        val_fraction=lambda wildcards: engine_setting(wildcards, "val_fraction"),
        seed=lambda wildcards: engine_setting(wildcards, "seed"),
    shell:
        "deepssm-wf preprocess-validation --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --val-fraction {params.val_fraction} --seed {params.seed} --out {output} > {log} 2>&1"
