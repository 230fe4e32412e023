# The seed spread (not part of `rule all`): every method of the dataset's `seed_spread` block trained
# again with other init seeds (the network's initialisation and batch order) on the default run's data,
# predicted, and the spread of the test RMSE over the seeds beside the mean shape. The training seed is
# not trained again: its models are the default run's.


rule train_seed:
    input:
        # what only some methods need (segmentations): see method_needs_inputs in common.smk
        unpack(method_needs_inputs),
        shapes_train=RESULTS.shapes("train"),
        train=RESULTS.preprocessed("train"),
        samples=RESULTS.samples_npz,
        images=RESULTS.augmentation_images,
        augmentation_provenance=RESULTS.provenance("augmentation"),
    output:
        model=RESULTS.seed_model_pt("{seed}", "{method}"),
        card=RESULTS.seed_model_card("{seed}", "{method}"),
        log_csv=RESULTS.seed_training_log("{seed}", "{method}"),
        curve=RESULTS.seed_loss_curve("{seed}", "{method}"),
        provenance=RESULTS.provenance("models", "{method}", "{seed}"),
    log:
        "logs/{dataset}/seeds/{seed}/train_{method}.log",
    wildcard_constraints:
        method="|".join(CROP_METHODS),
        seed="0|[1-9][0-9]*",
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
        preprocess_dir=subpath(input.train, parent=True),
        augmentation_dir=subpath(input.samples, parent=True),
        out_dir=subpath(output.model, parent=True),
        verify=augmentation_stores,
    shell:
        # the train rule's command with --init-seed: the same data and split, another initialisation
        "deepssm-wf train --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --augmentation-dir {params.augmentation_dir} --method {wildcards.method} --init-seed {wildcards.seed}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads}"
        " --checkpoint-seconds {resources.checkpoint_seconds}"
        " --verify {params.verify} --inputs {input} --outputs {output}"
        " --provenance {output.provenance} > {log} 2>&1"


rule predict_seed:
    input:
        model=RESULTS.seed_model_pt("{seed}", "{method}"),
        card=RESULTS.seed_model_card("{seed}", "{method}"),
        model_provenance=RESULTS.provenance("models", "{method}", "{seed}"),
        test=RESULTS.preprocessed("test"),
    output:
        table=RESULTS.seed_predictions_csv("{seed}", "{method}"),
        particles=directory(RESULTS.seed_predicted_particles("{seed}", "{method}")),
        provenance=RESULTS.provenance("predictions", "{method}", "{seed}"),
    log:
        "logs/{dataset}/seeds/{seed}/predict_{method}.log",
    wildcard_constraints:
        method="|".join(CROP_METHODS),
        seed="0|[1-9][0-9]*",
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


# The same for a method that finds the anatomy in the uncropped scan itself (train_on_scans, predict_from_scans).
rule train_seed_on_scans:
    input:
        shapes_train=RESULTS.shapes("train"),
        train=RESULTS.scans("train"),
        grid=RESULTS.scans_grid_json,
        samples=RESULTS.scans_augmentation("samples.npz"),
        images=RESULTS.scans_augmentation("images.npy"),
        segmentations=RESULTS.scans_augmentation("segmentations.npy"),
        augmentation_provenance=RESULTS.scans_augmentation("provenance.json"),
    output:
        model=RESULTS.seed_model_pt("{seed}", "{method}"),
        card=RESULTS.seed_model_card("{seed}", "{method}"),
        log_csv=RESULTS.seed_training_log("{seed}", "{method}"),
        curve=RESULTS.seed_loss_curve("{seed}", "{method}"),
        provenance=RESULTS.provenance("models", "{method}", "{seed}"),
    log:
        "logs/{dataset}/seeds/{seed}/train_{method}.log",
    wildcard_constraints:
        method="|".join(SCAN_METHODS),
        seed="0|[1-9][0-9]*",
    cache: True
    conda:
        "../../envs/deepssm.yaml"
    threads: 2
    resources:
        gpu=1,
        checkpoint_seconds=60,
    params:
        settings=training_settings,
        software=SOFTWARE,
        cohort=subpath(input.shapes_train, parent=True),
        scans_dir=subpath(input.train, parent=True),
        augmentation_dir=subpath(input.samples, parent=True),
        out_dir=subpath(output.model, parent=True),
    shell:
        "deepssm-wf train --cohort {params.cohort} --scans-dir {params.scans_dir}"
        " --augmentation-dir {params.augmentation_dir} --method {wildcards.method} --init-seed {wildcards.seed}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads}"
        " --checkpoint-seconds {resources.checkpoint_seconds}"
        " --inputs {input} --outputs {output} --provenance {output.provenance} > {log} 2>&1"


rule predict_seed_from_scans:
    input:
        model=RESULTS.seed_model_pt("{seed}", "{method}"),
        card=RESULTS.seed_model_card("{seed}", "{method}"),
        model_provenance=RESULTS.provenance("models", "{method}", "{seed}"),
        test=RESULTS.scans("test"),
    output:
        table=RESULTS.seed_predictions_csv("{seed}", "{method}"),
        particles=directory(RESULTS.seed_predicted_particles("{seed}", "{method}")),
        alignment=RESULTS.seed_predictions_alignment("{seed}", "{method}"),
        provenance=RESULTS.provenance("predictions", "{method}", "{seed}"),
    log:
        "logs/{dataset}/seeds/{seed}/predict_{method}.log",
    wildcard_constraints:
        method="|".join(SCAN_METHODS),
        seed="0|[1-9][0-9]*",
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


rule seed_spread:
    input:
        unpack(seed_spread_inputs),
    output:
        csv=RESULTS.spread_csv,
        json=RESULTS.spread_json,
        png=RESULTS.spread_png,
        provenance=RESULTS.provenance("seeds"),
    log:
        "logs/{dataset}/seed_spread.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        methods=lambda wildcards: " ".join(seed_spread_plan(wildcards)[0]),
        # the extra init seeds; the training seed's runs are the default run's, read from its model cards
        seeds=lambda wildcards: " ".join(map(str, seed_spread_plan(wildcards)[1][1:])),
        shape_space=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["shape_space"], sort_keys=True),
        dataset_dir=RESULTS.root,
        out_dir=subpath(output.csv, parent=True),
    shell:
        "deepssm-wf seed-spread --dataset-dir {params.dataset_dir} --methods {params.methods}"
        " --seeds {params.seeds} --shape-space {params.shape_space:q} --out-dir {params.out_dir}"
        " --inputs {input} --outputs {output} --provenance {output.provenance} > {log} 2>&1"
