# Every registered method (deepssm_workflow.methods) as a GPU rule, and inference on the test images.


rule train:
    input:
        # what only some methods need (segmentations): see method_needs_inputs in common.smk
        unpack(method_needs_inputs),
        shapes_train=RESULTS.shapes("train"),
        train=RESULTS.preprocessed("train"),
        samples=RESULTS.samples_npz,
        images=RESULTS.augmentation_images,
        augmentation_provenance=RESULTS.provenance("augmentation"),
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
        method="|".join(CROP_METHODS),
    cache: True
    conda:
        "../../envs/deepssm.yaml"
    threads: 2
    resources:
        gpu=1,
        # a checkpoint at most this often (always at a phase's end): a killed job redoes at most this
        # much training, and a GPU epoch of a fraction of a second does not wait on a ~0.3 GB write each
        # time. The Slurm profile sets its own; results do not depend on it (exact resume).
        checkpoint_seconds=60,
    params:
        settings=training_settings,
        software=SOFTWARE,  # only for the cache key and the params rerun trigger (see common.smk)
        cohort=subpath(input.shapes_train, parent=True),
        preprocess_dir=subpath(input.train, parent=True),
        augmentation_dir=subpath(input.samples, parent=True),
        out_dir=subpath(output.model, parent=True),
        verify=augmentation_stores,
    shell:
        # out_dir/checkpoint.pt (+ .sha256) is written as training goes and not declared, so that a rerun of
        # a killed job (--rerun-incomplete) resumes from it instead of starting over. The augmentation
        # store is checked against its sidecar first: a corrupted one is removed and rebuilt next run.
        "deepssm-wf train --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --augmentation-dir {params.augmentation_dir} --method {wildcards.method}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads}"
        " --checkpoint-seconds {resources.checkpoint_seconds}"
        " --verify {params.verify} --inputs {input} --outputs {output}"
        " --provenance {output.provenance} > {log} 2>&1"


rule predict:
    input:
        model=RESULTS.model_pt("{method}"),
        card=RESULTS.model_card("{method}"),
        model_provenance=RESULTS.provenance("models", "{method}"),
        test=RESULTS.preprocessed("test"),
    output:
        table=RESULTS.predictions_csv("{method}"),
        particles=directory(RESULTS.predicted_particles("{method}")),
        provenance=RESULTS.provenance("predictions", "{method}"),
    log:
        "logs/{dataset}/predict_{method}.log",
    wildcard_constraints:
        method="|".join(CROP_METHODS),
    conda:
        "../../envs/deepssm.yaml"
    threads: 1
    params:
        model_dir=subpath(input.model, parent=True),
        preprocess_dir=subpath(input.test, parent=True),
        out_dir=subpath(output.table, parent=True),
    shell:
        "deepssm-wf predict --model-dir {params.model_dir} --preprocess-dir {params.preprocess_dir}"
        " --split test --out-dir {params.out_dir} --threads {threads} --verify {input.model} {input.card}"
        " --inputs {input} --outputs {output} --provenance {output.provenance} > {log} 2>&1"


# A method that finds the anatomy in the uncropped scan itself (image2ssm): trained on the scans of
# preprocess_scans and their augmentation (augment_scans), and predicted on the test scans with no registration.
rule train_on_scans:
    input:
        shapes_train=RESULTS.shapes("train"),
        train=RESULTS.scans("train"),
        grid=RESULTS.scans_grid_json,
        samples=RESULTS.scans_augmentation("samples.npz"),
        images=RESULTS.scans_augmentation("images.npy"),
        segmentations=RESULTS.scans_augmentation("segmentations.npy"),
        augmentation_provenance=RESULTS.scans_augmentation("provenance.json"),
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
        method="|".join(SCAN_METHODS),
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
        cohort=subpath(input.shapes_train, parent=True),
        scans_dir=subpath(input.train, parent=True),
        augmentation_dir=subpath(input.samples, parent=True),
        out_dir=subpath(output.model, parent=True),
    shell:
        "deepssm-wf train --cohort {params.cohort} --scans-dir {params.scans_dir}"
        " --augmentation-dir {params.augmentation_dir} --method {wildcards.method}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads}"
        " --checkpoint-seconds {resources.checkpoint_seconds}"
        " --inputs {input} --outputs {output} --provenance {output.provenance} > {log} 2>&1"


rule predict_from_scans:
    input:
        model=RESULTS.model_pt("{method}"),
        card=RESULTS.model_card("{method}"),
        model_provenance=RESULTS.provenance("models", "{method}"),
        test=RESULTS.scans("test"),
    output:
        table=RESULTS.predictions_csv("{method}"),
        particles=directory(RESULTS.predicted_particles("{method}")),
        alignment=RESULTS.predictions_alignment("{method}"),
        provenance=RESULTS.provenance("predictions", "{method}"),
    log:
        "logs/{dataset}/predict_{method}.log",
    wildcard_constraints:
        method="|".join(SCAN_METHODS),
    conda:
        "../../envs/deepssm.yaml"
    threads: 1
    params:
        model_dir=subpath(input.model, parent=True),
        scans_dir=subpath(input.test, parent=True),
        out_dir=subpath(output.table, parent=True),
    shell:
        "deepssm-wf predict --model-dir {params.model_dir} --scans-dir {params.scans_dir}"
        " --split test --out-dir {params.out_dir} --threads {threads} --verify {input.model} {input.card}"
        " --inputs {input} --outputs {output} --provenance {output.provenance} > {log} 2>&1"
