# Tuning sweeps (not part of `rule all`): one method trained once per named candidate of its settings
# (config `tuning`), each scored on the registered validation scans; results/{dataset}/tuning/{sweep}/summary.csv
# is the evidence a setting is chosen on (deepssm_workflow.validation).


rule train_tuning:
    input:
        unpack(method_needs_inputs),
        shapes_train=RESULTS.shapes("train"),
        train=RESULTS.preprocessed("train"),
        samples=RESULTS.samples_npz,
        images=RESULTS.augmentation_images,
        augmentation_provenance=RESULTS.provenance("augmentation"),
    output:
        model=RESULTS.tuning_model_pt("{sweep}", "{candidate}", "{method}"),
        card=RESULTS.tuning_model_card("{sweep}", "{candidate}", "{method}"),
        log_csv=RESULTS.tuning_training_log("{sweep}", "{candidate}", "{method}"),
        curve=RESULTS.tuning_loss_curve("{sweep}", "{candidate}", "{method}"),
        provenance=RESULTS.tuning_provenance("{sweep}", "{candidate}", "{method}"),
    log:
        "logs/{dataset}/tuning/{sweep}/{candidate}/train_{method}.log",
    wildcard_constraints:
        method="|".join(CROP_METHODS),
    cache: True
    conda:
        "../../envs/deepssm.yaml"
    threads: 2
    resources:
        gpu=1,
        checkpoint_seconds=60,  # as the train rule's
    params:
        settings=tuning_settings,
        software=SOFTWARE,  # only for the cache key and the params rerun trigger (see common.smk)
        cohort=subpath(input.shapes_train, parent=True),
        preprocess_dir=subpath(input.train, parent=True),
        augmentation_dir=subpath(input.samples, parent=True),
        out_dir=subpath(output.model, parent=True),
        verify=augmentation_stores,
    shell:
        # the train rule's command with the candidate's settings
        "deepssm-wf train --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --augmentation-dir {params.augmentation_dir} --method {wildcards.method}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads}"
        " --checkpoint-seconds {resources.checkpoint_seconds}"
        " --verify {params.verify} --inputs {input} --outputs {output}"
        " --provenance {output.provenance} > {log} 2>&1"


rule tuning_table:
    input:
        unpack(tuning_table_inputs),
    output:
        summary=RESULTS.tuning_file("{sweep}", "summary.csv"),
        per_subject=RESULTS.tuning_file("{sweep}", "per_subject.csv"),
        record=RESULTS.tuning_file("{sweep}", "summary.json"),
    log:
        "logs/{dataset}/tuning/{sweep}/validate.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        candidates=lambda wildcards: " ".join(tuning_sweep(wildcards)["candidates"]),
        model_dirs=lambda wildcards: " ".join(str(Path(p).parent) for p in tuning_table_inputs(wildcards)["models"]),
        reference=lambda wildcards: next(iter(tuning_sweep(wildcards)["candidates"])),
        candidate_settings=lambda wildcards: json.dumps(tuning_sweep(wildcards)["candidates"], sort_keys=True),
        shape_space=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["shape_space"], sort_keys=True),
        val_fraction=lambda wildcards: engine_setting(wildcards, "val_fraction"),
        seed=lambda wildcards: engine_setting(wildcards, "seed"),
        cohort=subpath(input.shapes_train, parent=True),
        preprocess_dir=subpath(input.grid, parent=True),
        out_dir=subpath(output.summary, parent=True),
    shell:
        "deepssm-wf validate --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --registered {input.registered} --methods {params.candidates} --model-dirs {params.model_dirs}"
        " --shape-space {params.shape_space:q} --val-fraction {params.val_fraction} --seed {params.seed}"
        " --reference {params.reference} --candidate-settings {params.candidate_settings:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"
