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


# Training only, not part of `rule all` (as preprocess_segmentations): each augmented sample's segmentation,
# its source subject's warped by the thin-plate spline of its image (the same correspondences and n_control).
rule augment_segmentations:
    input:
        shapes_train=RESULTS.shapes("train"),
        grid=RESULTS.grid_json,
        train_segmentations=RESULTS.train_segmentations,
        samples=RESULTS.samples_npz,
        augmentation_provenance=RESULTS.provenance("augmentation"),
    output:
        segmentations=RESULTS.augmentation_segmentations,
        provenance=RESULTS.augmentation_segmentations_provenance,
    log:
        "logs/{dataset}/augment_segmentations.log",
    cache: True
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["augmentation"], sort_keys=True),
        software=SOFTWARE,  # only for the cache key and the params rerun trigger (see common.smk)
        cohort=subpath(input.shapes_train, parent=True),
        preprocess_dir=subpath(input.grid, parent=True),
        augmentation_dir=subpath(input.samples, parent=True),
    shell:
        "deepssm-wf augment-segmentations --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --augmentation-dir {params.augmentation_dir} --settings {params.settings:q}"
        " --out {output.segmentations} --verify {input.samples} --inputs {input} --outputs {output}"
        " --provenance {output.provenance} > {log} 2>&1"


# For a method that finds the anatomy itself: the augmented samples above as uncropped scans (full_field).
rule augment_scans:
    input:
        shapes_train=RESULTS.shapes("train"),
        scans=RESULTS.scans("train"),
        grid=RESULTS.scans_grid_json,
        samples=RESULTS.samples_npz,
        augmentation_provenance=RESULTS.provenance("augmentation"),
    output:
        images=RESULTS.scans_augmentation("images.npy"),
        segmentations=RESULTS.scans_augmentation("segmentations.npy"),
        samples=RESULTS.scans_augmentation("samples.npz"),
        provenance=RESULTS.scans_augmentation("provenance.json"),
    log:
        "logs/{dataset}/augment_scans.log",
    cache: True
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["augmentation"], sort_keys=True),
        software=SOFTWARE,  # only for the cache key and the params rerun trigger (see common.smk)
        cohort=subpath(input.shapes_train, parent=True),
        scans_dir=subpath(input.scans, parent=True),
        augmentation_dir=subpath(input.samples, parent=True),
        out_dir=subpath(output.images, parent=True),
    shell:
        "deepssm-wf augment-scans --cohort {params.cohort} --scans-dir {params.scans_dir}"
        " --augmentation-dir {params.augmentation_dir} --settings {params.settings:q} --out-dir {params.out_dir}"
        " --inputs {input} --outputs {output} --provenance {output.provenance} > {log} 2>&1"
