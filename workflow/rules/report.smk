# The dataset's clinical study and its self-contained report.html.


def study_inputs(wildcards):
    variants = dataset_variants(wildcards)
    inputs = {
        "subjects": f"results/{wildcards.dataset}/cohort/subjects.csv",
        "shapes_train": f"results/{wildcards.dataset}/cohort/shapes_train.npz",
        "shapes_test": f"results/{wildcards.dataset}/cohort/shapes_test.npz",
        "test": f"results/{wildcards.dataset}/preprocess/test.npz",
        "models": [f"results/{wildcards.dataset}/models/{v}/model.pt" for v in variants],
        "cards": [f"results/{wildcards.dataset}/models/{v}/model_card.json" for v in variants],
        "predictions": [f"results/{wildcards.dataset}/predictions/{v}/predictions.csv" for v in variants],
    }
    if wildcards.dataset in SYNTHETIC:  # the generator's extra data (metopic expert ratings)
        inputs["data"] = f"resources/{wildcards.dataset}/data"
    return inputs


def study_resources(wildcards):
    return f"--resources-dir resources/{wildcards.dataset}" if wildcards.dataset in SYNTHETIC else ""


rule study:
    input:
        unpack(study_inputs),
    output:
        report(
            directory("results/{dataset}/study"),
            patterns=["figures/{name}.png"],
            caption="../report/study.rst",
            category="Clinical study",
            subcategory="{dataset}",
        ),
    log:
        "logs/{dataset}/study.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        anatomy=lambda wildcards: DATASETS[wildcards.dataset].anatomy,
        variants=lambda wildcards: ",".join(dataset_variants(wildcards)),
        dataset_dir=lambda wildcards: f"results/{wildcards.dataset}",
        resources=study_resources,
    shell:
        "deepssm-wf study --anatomy {params.anatomy} --dataset-dir {params.dataset_dir} {params.resources}"
        " --variants {params.variants} --out-dir {output} > {log} 2>&1"


def report_inputs(wildcards):
    d, variants = wildcards.dataset, dataset_variants(wildcards)
    inputs = {
        "cohort_report": f"results/{d}/cohort/report.json",
        "subjects": f"results/{d}/cohort/subjects.csv",
        "shapes_train": f"results/{d}/cohort/shapes_train.npz",
        "shapes_test": f"results/{d}/cohort/shapes_test.npz",
        "train": f"results/{d}/preprocess/train.npz",
        "test": f"results/{d}/preprocess/test.npz",
        "grid": f"results/{d}/preprocess/grid.json",
        "preprocess_qc": f"results/{d}/qc/preprocess.png",
        "samples": f"results/{d}/augmentation/samples.npz",
        "augmentation_qc": f"results/{d}/augmentation/qc.png",
        "models": [f"results/{d}/models/{v}/model.pt" for v in variants],
        "cards": [f"results/{d}/models/{v}/model_card.json" for v in variants],
        "curves": [f"results/{d}/models/{v}/loss_curve.png" for v in variants],
        "predictions": [f"results/{d}/predictions/{v}/predictions.csv" for v in variants],
        "evaluation": [
            f"results/{d}/evaluation/{name}"
            for name in (
                "summary.json",
                "figures.json",
                "tables.json",
                "tables/accuracy_summary.csv",
                "tables/accuracy_per_subject.csv",
                "tables/inference_time.csv",
                "per_point_rmse.png",
                "surface_boxplot.png",
                "surface_heatmaps.png",
            )
        ],
        "study": f"results/{d}/study",
    }
    if d in SYNTHETIC:
        inputs["cohort_qc"] = f"results/{d}/qc/cohort.png"
    return inputs


rule report_html:
    input:
        unpack(report_inputs),
    output:
        "results/{dataset}/report.html",
    log:
        "logs/{dataset}/report_html.log",
    conda:
        "../../envs/deepssm.yaml"
    params:
        settings=lambda wildcards: json.dumps(config["datasets"][wildcards.dataset], sort_keys=True),
        variants=lambda wildcards: " ".join(dataset_variants(wildcards)),
        dataset_dir=lambda wildcards: f"results/{wildcards.dataset}",
    shell:
        "deepssm-wf report --dataset-dir {params.dataset_dir} --dataset {wildcards.dataset}"
        " --settings {params.settings:q} --variants {params.variants} --out {output} > {log} 2>&1"
