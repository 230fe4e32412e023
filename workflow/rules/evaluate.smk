# Evaluation of the trained variants on the test images, beside the mean-shape and PCA-floor baselines.


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        summary="results/{dataset}/evaluation/summary.json",
        figures="results/{dataset}/evaluation/figures.json",
        tables="results/{dataset}/evaluation/tables.json",
        accuracy="results/{dataset}/evaluation/tables/accuracy_summary.csv",
        per_subject="results/{dataset}/evaluation/tables/accuracy_per_subject.csv",
        timing="results/{dataset}/evaluation/tables/inference_time.csv",
        per_point="results/{dataset}/evaluation/per_point.npz",
        per_point_figure=report(
            "results/{dataset}/evaluation/per_point_rmse.png",
            caption="../report/per_point_rmse.rst",
            category="Evaluation",
            subcategory="{dataset}",
        ),
        surface_boxplot=report(
            "results/{dataset}/evaluation/surface_boxplot.png",
            caption="../report/surface_boxplot.rst",
            category="Evaluation",
            subcategory="{dataset}",
        ),
        surface_heatmaps=report(
            "results/{dataset}/evaluation/surface_heatmaps.png",
            caption="../report/surface_heatmaps.rst",
            category="Evaluation",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/evaluate.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        variants=lambda wildcards: " ".join(dataset_variants(wildcards)),
        dataset_dir=lambda wildcards: f"results/{wildcards.dataset}",
        out_dir=subpath(output.summary, parent=True),
    shell:
        "deepssm-wf evaluate --dataset-dir {params.dataset_dir} --variants {params.variants}"
        " --out-dir {params.out_dir} > {log} 2>&1"
