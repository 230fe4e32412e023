# The four DeepSSM variants as GPU rules, and inference on the test images.

VARIANTS = ["base", "base_focal", "tl", "tl_focal"]


rule train:
    input:
        shapes_train="results/{dataset}/cohort/shapes_train.npz",
        train="results/{dataset}/preprocess/train.npz",
        samples="results/{dataset}/augmentation/samples.npz",
        images="results/{dataset}/augmentation/images.npy",
        augmentation_provenance="results/{dataset}/augmentation/provenance.json",
    output:
        model="results/{dataset}/models/{variant}/model.pt",
        card="results/{dataset}/models/{variant}/model_card.json",
        log_csv="results/{dataset}/models/{variant}/log.csv",
        curve=report(
            "results/{dataset}/models/{variant}/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="Training",
            subcategory="{dataset}",
        ),
        provenance="results/{dataset}/models/{variant}/provenance.json",
    log:
        "logs/{dataset}/train_{variant}.log",
    wildcard_constraints:
        variant="|".join(VARIANTS),
    cache: True
    conda:
        "../../envs/deepssm.yaml"
    threads: 2
    resources:
        gpu=1,
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["training"], sort_keys=True),
        software=SOFTWARE,  # only for the cache key and the params rerun trigger (see common.smk)
        cohort=subpath(input.shapes_train, parent=True),
        preprocess_dir=subpath(input.train, parent=True),
        augmentation_dir=subpath(input.samples, parent=True),
        out_dir=subpath(output.model, parent=True),
    shell:
        # out_dir/checkpoint.pt (+ .sha256) is written every epoch and not declared, so that a rerun of
        # a killed job (--rerun-incomplete) resumes from it instead of starting over. The augmentation
        # store is checked against its sidecar first: a corrupted one is removed and rebuilt next run.
        "deepssm-wf train --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --augmentation-dir {params.augmentation_dir} --variant {wildcards.variant}"
        " --settings {params.settings:q} --out-dir {params.out_dir} --threads {threads}"
        " --verify {input.samples} {input.images} --inputs {input} --outputs {output}"
        " --provenance {output.provenance} > {log} 2>&1"


rule predict:
    input:
        model="results/{dataset}/models/{variant}/model.pt",
        card="results/{dataset}/models/{variant}/model_card.json",
        model_provenance="results/{dataset}/models/{variant}/provenance.json",
        test="results/{dataset}/preprocess/test.npz",
    output:
        table="results/{dataset}/predictions/{variant}/predictions.csv",
        particles=directory("results/{dataset}/predictions/{variant}/particles"),
        provenance="results/{dataset}/predictions/{variant}/provenance.json",
    log:
        "logs/{dataset}/predict_{variant}.log",
    wildcard_constraints:
        variant="|".join(VARIANTS),
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
