# Evaluation of the trained methods on the test images, beside the mean-shape and PCA-floor baselines.


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        summary=RESULTS.evaluation_summary,
        figures=RESULTS.evaluation_figures_json,
        tables=RESULTS.evaluation_tables_json,
        accuracy=RESULTS.evaluation_table("accuracy_summary"),
        per_subject=RESULTS.evaluation_table("accuracy_per_subject"),
        timing=RESULTS.evaluation_table("inference_time"),
        decomposition=RESULTS.evaluation_table("error_decomposition"),
        decomposition_per_subject=RESULTS.evaluation_table("error_decomposition_per_subject"),
        alignment=RESULTS.evaluation_table("alignment_accuracy"),
        paired=RESULTS.evaluation_table("paired_differences"),
        per_point=RESULTS.per_point_npz,
        per_point_figure=report(
            RESULTS.evaluation_figure("per_point_rmse"),
            caption="../report/per_point_rmse.rst",
            category="Evaluation",
            subcategory="{dataset}",
        ),
        surface_boxplot=report(
            RESULTS.evaluation_figure("surface_boxplot"),
            caption="../report/surface_boxplot.rst",
            category="Evaluation",
            subcategory="{dataset}",
        ),
        surface_heatmaps=report(
            RESULTS.evaluation_figure("surface_heatmaps"),
            caption="../report/surface_heatmaps.rst",
            category="Evaluation",
            subcategory="{dataset}",
        ),
        decomposition_figure=report(
            RESULTS.evaluation_figure("error_decomposition"),
            caption="../report/error_decomposition.rst",
            category="Evaluation",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/evaluate.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        methods=lambda wildcards: " ".join(dataset_methods(wildcards)),
        shape_space=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["shape_space"], sort_keys=True),
        dataset_dir=RESULTS.root,
        out_dir=subpath(output.summary, parent=True),
    shell:
        "deepssm-wf evaluate --dataset-dir {params.dataset_dir} --methods {params.methods}"
        " --shape-space {params.shape_space:q} --out-dir {params.out_dir} > {log} 2>&1"


# Every method that reads registered crops, scored on the registered validation scans (scan frame, eq. 12):
# the figures settings are chosen on, shown in the report beside the training curves.
rule validate:
    input:
        unpack(validation_inputs),
    output:
        summary=RESULTS.validation_file("summary.csv"),
        per_subject=RESULTS.validation_file("per_subject.csv"),
        record=RESULTS.validation_file("summary.json"),
    log:
        "logs/{dataset}/validate.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        methods=lambda wildcards: " ".join(validated_methods(wildcards)),
        model_dirs=lambda wildcards: " ".join(str(Path(p).parent) for p in validation_inputs(wildcards)["models"]),
        shape_space=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset]["shape_space"], sort_keys=True),
        val_fraction=lambda wildcards: engine_setting(wildcards, "val_fraction"),
        seed=lambda wildcards: engine_setting(wildcards, "seed"),
        cohort=subpath(input.shapes_train, parent=True),
        preprocess_dir=subpath(input.grid, parent=True),
        out_dir=subpath(output.summary, parent=True),
    shell:
        "deepssm-wf validate --cohort {params.cohort} --preprocess-dir {params.preprocess_dir}"
        " --registered {input.registered} --methods {params.methods} --model-dirs {params.model_dirs}"
        " --shape-space {params.shape_space:q} --val-fraction {params.val_fraction} --seed {params.seed}"
        " --out-dir {params.out_dir} > {log} 2>&1"
