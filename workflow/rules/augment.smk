# Data augmentation: KDE sampling in PCA space, each sample's image a TPS warp of its source subject.


rule augment:
    input:
        shapes_train=RESULTS.shapes("train"),
        train=RESULTS.preprocessed("train"),
        grid=RESULTS.grid_json,
    output:
        images=RESULTS.augmentation_images,
        samples=RESULTS.samples_npz,
        shape_space=RESULTS.shape_space_npz,
        qc=report(
            RESULTS.augmentation_qc,
            caption="../report/augmentation_qc.rst",
            category="Augmentation",
            subcategory="{dataset}",
        ),
        provenance=RESULTS.provenance("augmentation"),
    log:
        "logs/{dataset}/augment.log",
    cache: True
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["augmentation"], sort_keys=True),
        # the subjects training holds out for validation stay out of the shape model
        validation=lambda wildcards: json.dumps(
            {key: config["datasets"][wildcards.dataset]["training"][key] for key in ("val_fraction", "seed")}
        ),
        software=SOFTWARE,  # only for the cache key and the params rerun trigger (see common.smk)
        cohort=subpath(input.shapes_train, parent=True),
        preprocess_dir=subpath(input.train, parent=True),
        out_dir=subpath(output.images, parent=True),
    shell:
        "deepssm-wf augment --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --settings {params.settings:q} --validation {params.validation:q} --out-dir {params.out_dir}"
        " --inputs {input} --outputs {output} --provenance {output.provenance} > {log} 2>&1"
