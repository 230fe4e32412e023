# A method that learns landmarks from the training images alone (self-supervised landmarks): trained on the
# preprocessed training images (no shapes, no augmentation), landmarks predicted for every subject, and
# evaluated against the cohort's exact ground truth (deepssm_workflow.landmark_results).


rule train_landmarks:
    input:
        # the training segmentations, for the weak or localised variant: see landmark_needs_inputs in common.smk
        unpack(landmark_needs_inputs),
        train=RESULTS.preprocessed("train"),
        grid=RESULTS.grid_json,
    output:
        model=RESULTS.model_pt("{method}"),
        card=RESULTS.model_card("{method}"),
        log_csv=RESULTS.training_log("{method}"),
        curve=report(
            RESULTS.loss_curve("{method}"),
            caption="../report/loss_curve.rst",
            category="Training",
            subcategory="{dataset}",
        ),
        provenance=RESULTS.provenance("models", "{method}"),
    log:
        "logs/{dataset}/train_{method}.log",
    wildcard_constraints:
        method="|".join(LANDMARK_METHODS) or "(?!)",
    cache: True
    conda:
        "../../envs/deepssm.yaml"
    threads: 2
    resources:
        gpu=1,
        checkpoint_seconds=60,  # as the train rule's
    params:
        settings=training_settings,
        software=SOFTWARE,  # only for the cache key and the params rerun trigger (see common.smk)
        preprocess_dir=subpath(input.train, parent=True),
        out_dir=subpath(output.model, parent=True),
    shell:
        "deepssm-wf train --preprocess-dir {params.preprocess_dir} --method {wildcards.method}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads}"
        " --checkpoint-seconds {resources.checkpoint_seconds}"
        " --inputs {input} --outputs {output} --provenance {output.provenance} > {log} 2>&1"


rule select_landmarks:
    input:
        model=RESULTS.model_pt("{method}"),
        card=RESULTS.model_card("{method}"),
        train=RESULTS.preprocessed("train"),
    output:
        selection=RESULTS.landmark_selection("selection.json", "{method}"),
        curve=report(
            RESULTS.landmark_selection("selection.png", "{method}"),
            caption="../report/landmark_selection.rst",
            category="Landmarks",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/select_{method}.log",
    wildcard_constraints:
        method="|".join(LANDMARK_METHODS) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    threads: 2
    params:
        model_dir=subpath(input.model, parent=True),
        preprocess_dir=subpath(input.train, parent=True),
        out_dir=subpath(output.selection, parent=True),
    shell:
        "deepssm-wf select-landmarks --model-dir {params.model_dir} --preprocess-dir {params.preprocess_dir}"
        " --out-dir {params.out_dir} --threads {threads} > {log} 2>&1"


rule predict_landmarks:
    input:
        model=RESULTS.model_pt("{method}"),
        card=RESULTS.model_card("{method}"),
        model_provenance=RESULTS.provenance("models", "{method}"),
        selection=RESULTS.landmark_selection("selection.json", "{method}"),
        train=RESULTS.preprocessed("train"),
        test=RESULTS.preprocessed("test"),
    output:
        npz=RESULTS.landmarks_npz("{method}"),
        csv=RESULTS.landmarks_csv("{method}"),
    log:
        "logs/{dataset}/predict_{method}.log",
    wildcard_constraints:
        method="|".join(LANDMARK_METHODS) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    threads: 1
    params:
        model_dir=subpath(input.model, parent=True),
        preprocess_dir=subpath(input.test, parent=True),
        out_dir=subpath(output.npz, parent=True),
    shell:
        "deepssm-wf predict-landmarks --model-dir {params.model_dir} --preprocess-dir {params.preprocess_dir}"
        " --selection {input.selection} --out-dir {params.out_dir} --threads {threads}"
        " --verify {input.model} {input.card} > {log} 2>&1"


rule evaluate_landmarks:
    input:
        landmarks=RESULTS.landmarks_npz("{method}"),
        model=RESULTS.model_pt("{method}"),
        card=RESULTS.model_card("{method}"),
        test=RESULTS.preprocessed("test"),
        shapes_train=RESULTS.shapes("train"),
        shapes_test=RESULTS.shapes("test"),
    output:
        evaluation=RESULTS.landmark_evaluation("landmark_evaluation.json", "{method}"),
        pairs=RESULTS.landmark_evaluation("landmark_pairs.csv", "{method}"),
    log:
        "logs/{dataset}/evaluate_{method}.log",
    wildcard_constraints:
        method="|".join(LANDMARK_METHODS) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    params:
        model_dir=subpath(input.model, parent=True),
        preprocess_dir=subpath(input.test, parent=True),
        cohort=subpath(input.shapes_train, parent=True),
        out_dir=subpath(output.evaluation, parent=True),
    shell:
        "deepssm-wf evaluate-landmarks --landmarks {input.landmarks} --model-dir {params.model_dir}"
        " --preprocess-dir {params.preprocess_dir} --cohort {params.cohort} --out-dir {params.out_dir} > {log} 2>&1"


rule study_landmarks:
    input:
        landmarks=RESULTS.landmarks_npz("{method}"),
        subjects=RESULTS.subjects_csv,
        shapes_train=RESULTS.shapes("train"),
        shapes_test=RESULTS.shapes("test"),
        cohort_report=RESULTS.cohort_report,
    output:
        directory(RESULTS.landmark_study_dir("{method}")),
    log:
        "logs/{dataset}/study_{method}.log",
    wildcard_constraints:
        method="|".join(LANDMARK_METHODS) or "(?!)",
        dataset="|".join(WITH_STUDY) or "(?!)",
    conda:
        "../../envs/deepssm.yaml"
    params:
        study=lambda wildcards: DATASETS[wildcards.dataset].study,
        dataset_dir=subpath(input.subjects, ancestor=2),  # the dataset folder, above cohort/
        resources=study_resources,
    shell:
        "deepssm-wf landmark-study --study {params.study} --dataset-dir {params.dataset_dir} {params.resources}"
        " --landmarks {input.landmarks} --out-dir {output} > {log} 2>&1"
