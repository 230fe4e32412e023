"""The paper's clinical studies (sec. 4), one per anatomy, on the ground-truth PDM and on
each method's predictions: `run_study` is the one entry point.

    run_study(study, dataset_dir, method_names, out_dir, resources_dir=None)

`study` is a name of `registry.STUDIES` (cam_fai, metopic_severity, af_recurrence: the femur,
metopic and left-atrium studies). It reads
results/{dataset} (cohort/, predictions/{method}/, models/{method}/, preprocess/test.npz
for image codes; see deepssm_workflow.layout) and writes, atomically (all or nothing), into out_dir:

  summary.json   {"<femur|metopic|left_atrium>": {"<source>": {"<name>": number | null, ...}, ...},
                  "methods": [...used], "skipped_methods": [...no predictions],
                  "notes": ["why a number is null", ...]}
                 sources: ground_truth, each method used, and for the femur
                 ground_truth_all (every subject, the paper's setting). null = not defined
                 on these data (e.g. one class only); the notes say which and why.
                   metopic: n_scored, n_metopic, n_reference_controls, ppca_modes, ppca_explained,
                            n_rated, pearson, spearman, auc, severity_subspace_mean, severity_residual_mean
                            (the Mahalanobis distance in the PPCA subspace and the residual out of it, apart),
                            severity_error_vs_truth_mean [_low, _high] and severity_bias_vs_truth (against
                            the ground-truth shapes' severity: the fidelity check a shrunken shape fails)
                            [, spearman_true_severity [_low, _high]: with the generator's true severity]
                   femur:   n_control, n_cam, peak_difference_mm, peak_point, mean_difference_mm
                            [, n_significant_points, min_q, test_method: per-point Welch permutation test
                            of the normal displacement, BH FDR; hotelling_n_significant_points,
                            hotelling_min_q, hotelling_test_method: the 3D Hotelling T2 test]
                            [, n_planted_points, n_significant_planted, n_significant_elsewhere,
                            normal_difference_planted_mm, normal_difference_elsewhere_mm,
                            planted_amplitude_mm, peak_normal_difference_mm: where the generator is
                            known] [, map_correlation]; fwer_method, fwer_p_floor, n_fwer_significant_points,
                            min_p_fwer (Westfall-Young step-down max-T over every point: family-wise error
                            control that can reach its level), the same with hotelling_, and where the lesion
                            is known fwer_sensitivity, fwer_false_positive_fraction,
                            fwer_false_positive_area_fraction (and hotelling_);
                            a LATENT_CODE method also swim_max_displacement_mm
                   left_atrium: n_train, n_test, n_dims, mlp_accuracy_mean, mlp_accuracy_sd, mlp_brier,
                            mlp_ensemble_accuracy, logistic_accuracy, logistic_brier, nir_accuracy (the
                            no-information rate: the test set's most frequent class), and for mlp_ and
                            logistic_: binomial_p (one-sided exact test of accuracy > NIR), balanced_accuracy,
                            auc [_low, _high]; accuracies with _low, _high; n_seeds;
                            a LATENT_CODE method also swim_max_displacement_mm
  tables/*.csv   with a `source` column: metopic_severity_table2 (Table 2), metopic_severity_scores,
                 femur_group_difference, femur_group_difference_points,
                 left_atrium_recurrence_table3 (Table 3)
  figures/*.png  and figures.json: [{"file": "figures/<name>.png", "title", "caption"}] in display
                 order (file relative to out_dir)

Splits (predictions exist for the test split only): each study's module docstring says
which subjects fit and which are scored; in short, reference models and classifiers are
fitted on the training split's ground-truth shapes and every source is scored on the
same test subjects. Methods asked for without a predictions folder are skipped and
listed; the latent swims use the methods with the LATENT_CODE capability among those used.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..atomic import staged
from .registry import STUDIES, study_named  # noqa: F401 (STUDIES: the studies by name)


def run_study(study: str, dataset_dir, method_names, out_dir, resources_dir=None) -> dict:
    """`study` is a name of `registry.STUDIES`; `method_names` are registered methods."""
    import importlib

    from .. import methods  # deferred: torch
    from .data import available_methods, load_cohort, predicted_shapes

    spec = study_named(study)
    module = importlib.import_module(f"{__name__}.{spec.module}")
    if resources_dir is not None and not Path(resources_dir).is_dir():
        raise ValueError(f"{resources_dir}: resources folder not found")
    dataset_dir = Path(dataset_dir)
    cohort = load_cohort(dataset_dir)
    used = available_methods(dataset_dir, method_names)
    sources = {"ground_truth": cohort.test}
    for method in used:
        shapes = predicted_shapes(dataset_dir, method, list(cohort.test.ids))
        if shapes.world.shape != cohort.test.world.shape:
            raise ValueError(f"{cohort.layout.predictions_dir(method)}: predictions have {shapes.world.shape[1]} "
                             f"points per shape; the cohort has {cohort.test.world.shape[1]}")
        sources[method] = shapes
    latent_methods = [m for m in used if methods.get(m).has(methods.LATENT_CODE)]

    with staged(out_dir, ["figures", "tables", "figures.json", "summary.json"]) as staging:
        (staging / "figures").mkdir()
        (staging / "tables").mkdir()
        if spec.module == "metopic":
            result = module.run(cohort, sources, staging / "figures", resources_dir)
        else:
            result = module.run(cohort, sources, staging / "figures", latent_methods=latent_methods)
        for name, table in result.tables.items():
            table.to_csv(staging / "tables" / f"{name}.csv", index=False)
        listing = [{**entry, "file": f"figures/{entry['file']}"} for entry in result.figures]
        (staging / "figures.json").write_text(json.dumps(listing, indent=2) + "\n")
        summary = _nan_as_null({spec.module: result.summary, "methods": used,
                                "skipped_methods": [m for m in method_names if m not in used],
                                "notes": result.notes})
        (staging / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _nan_as_null(value):
    """NaN (an interval undefined on these data) as JSON null, like every other undefined number here."""
    if isinstance(value, dict):
        return {k: _nan_as_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_as_null(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value
