"""Where each artifact of a dataset lives: the one home of the results layout, read by the
Snakemake rules (through `patterns`) and by the library (through `DatasetLayout`) alike.

    results/{dataset}/                  DatasetLayout(root)
        cohort/                         cohort_dir
            subjects.csv                subjects_csv
            shapes_{split}.npz          shapes(split)
            report.json                 cohort_report
        preprocess/                     preprocess_dir
            grid.json                   grid_json
            reference.nrrd              reference_nrrd
            {split}.npz                 preprocessed(split); validation.npz: the validation subjects
                                        registered as test images are (validation.py)
            train_segmentations.npz     train_segmentations: only for a method that needs segmentations
        scans/                          scans_dir: only for a method that localizes the anatomy itself
            grid.json                   scans_grid_json
            {split}.npz                 scans(split): uncropped scans on their grids (full_field.py)
            augmentation/               scans_augmentation_dir: the augmented samples as uncropped scans
                images.npy, segmentations.npy, samples.npz   scans_augmentation(name)
        augmentation/                   augmentation_dir
            images.npy                  augmentation_images
            samples.npz                 samples_npz
            shape_space.npz             shape_space_npz
            qc.png                      augmentation_qc
            provenance.json             provenance("augmentation")
            segmentations/              augmentation_segmentations_dir: only for a method that needs segmentations
                segmentations.npy       augmentation_segmentations
                provenance.json         augmentation_segmentations_provenance
        models/{method}/                model_dir(method)
            model.pt                    model_pt(method)
            model_card.json             model_card(method)
            log.csv                     training_log(method)
            loss_curve.png              loss_curve(method)
            provenance.json             provenance("models", method)
        predictions/{method}/           predictions_dir(method)
            predictions.csv             predictions_csv(method)
            particles/                  predicted_particles(method)
            alignment.npz               predictions_alignment(method): a method that localizes itself
            provenance.json             provenance("predictions", method)
        landmarks/{method}/             landmarks_dir(method): a LANDMARKS method (learns from images alone)
            selection/selection.json, selection.png  landmark_selection(name, method): redundancy removal
            landmarks.npz, landmarks.csv  landmarks_npz(method), landmarks_csv(method): every subject's
            evaluation/                 landmark_evaluation_dir(method)
                landmark_evaluation.json, landmark_pairs.csv  landmark_evaluation(name, method)
            study/                      landmark_study_dir(method): the dataset's study on the landmarks
        evaluation/                     evaluation_dir
            summary.json                evaluation_summary
            figures.json                evaluation_figures_json
            tables.json                 evaluation_tables_json
            tables/{name}.csv           evaluation_table(name), name in EVALUATION_TABLES
            {name}.png                  evaluation_figure(name), name in EVALUATION_FIGURES
            per_point.npz               per_point_npz
        validation/                     validation_dir: every crop method on the registered validation scans
            summary.csv, per_subject.csv, summary.json   validation_file(name)
        tuning/{sweep}/                 tuning_dir(sweep): a sweep of one method's settings (not the default run)
            {candidate}/models/{method}/  tuning_model_dir(sweep, candidate, method): model.pt, ... as models/{method}/
                                        (tuning_model_pt, tuning_model_card)
            summary.csv, per_subject.csv, summary.json   tuning_file(sweep, name): the candidates on the
                                        registered validation scans
        study/                          study_dir
        seeds/                          seeds_dir: the seed spread (not part of the default run)
            {seed}/                     seed_dir(seed): a run with another init seed, same data
                models/{method}/        seed_model_dir(seed, method): model.pt, ... as models/{method}/
                                        (seed_model_pt, seed_model_card, seed_training_log, seed_loss_curve)
                                        and provenance("models", method, seed)
                predictions/{method}/   seed_predictions_dir(seed, method): as predictions/{method}/
                                        (seed_predictions_csv, seed_predicted_particles)
                                        and provenance("predictions", method, seed)
            spread.csv                  spread_csv
            spread.json                 spread_json
            spread.png                  spread_png
            provenance.json             provenance("seeds")
        qc/                             qc_dir
            cohort.png                  cohort_qc
            preprocess.png              preprocess_qc
        report.html                     report_html

A multi-anatomy dataset (the config's `multi_anatomy`) has cohort/ (ingest_multi: shapes_{split}_{anatomy}.npz
per anatomy), scans/ (multi_scans: every anatomy's particles packed), models/{method}/ and report.html as
above, and its evaluation per method and anatomy:

        evaluation/{method}/            multi_evaluation_dir(method)
            per_scan.csv, summary.csv, rmse_boxplots.png, best_worst.png   multi_evaluation(name, method)
        anatomies/{anatomy}/            with `baselines`: one anatomy as a single-anatomy cohort (multi_baselines)
            subjects.csv, data/         anatomy_export(name, anatomy)

Each step writes the files of its own folder under these names into the out-dir its rule
passes it; the readers of a whole dataset folder (evaluation, studies, report) find them here.
"""

from __future__ import annotations

from pathlib import Path

from .provenance import SIDECAR

EVALUATION_TABLES = ("accuracy_summary", "accuracy_per_subject", "inference_time", "error_decomposition",
                     "error_decomposition_per_subject", "alignment_accuracy", "paired_differences")
EVALUATION_FIGURES = ("per_point_rmse", "surface_boxplot", "surface_heatmaps", "error_decomposition")
PROVENANCE_STAGES = ("augmentation", "models", "predictions", "seeds")  # the steps that write a provenance.json


def _part(name: str) -> str:
    """A method, split or file stem as one path component: one with a separator would leave its folder."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"{name!r}: not a valid name for a folder or file of the results layout")
    return name


class DatasetLayout:
    """The files and folders of one dataset's results folder (`results/{dataset}`), as paths."""

    def __init__(self, root):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"DatasetLayout({str(self.root)!r})"

    # -- cohort/: the ingested cohort

    @property
    def cohort_dir(self) -> Path:
        return self.root / "cohort"

    @property
    def subjects_csv(self) -> Path:
        return self.cohort_dir / "subjects.csv"

    def shapes(self, split: str) -> Path:
        """The split's ground-truth correspondences (ids, world, local, image_to_world)."""
        return self.cohort_dir / f"shapes_{_part(split)}.npz"

    @property
    def cohort_report(self) -> Path:
        return self.cohort_dir / "report.json"

    # -- preprocess/: the networks' input grid and the preprocessed images

    @property
    def preprocess_dir(self) -> Path:
        return self.root / "preprocess"

    @property
    def grid_json(self) -> Path:
        return self.preprocess_dir / "grid.json"

    @property
    def reference_nrrd(self) -> Path:
        return self.preprocess_dir / "reference.nrrd"

    def preprocessed(self, split: str) -> Path:
        """The split's images, registered and resampled onto the grid (train.npz, test.npz)."""
        return self.preprocess_dir / f"{_part(split)}.npz"

    # -- scans/: uncropped scans for a method that finds the anatomy itself (deepssm_workflow.full_field)

    @property
    def scans_dir(self) -> Path:
        return self.root / "scans"

    @property
    def scans_grid_json(self) -> Path:
        return self.scans_dir / "grid.json"

    def scans(self, split: str) -> Path:
        """The split's uncropped scans on their grids, no registration (train.npz with particles and
        segmentations, test.npz images only)."""
        return self.scans_dir / f"{_part(split)}.npz"

    @property
    def scans_augmentation_dir(self) -> Path:
        return self.scans_dir / "augmentation"

    def scans_augmentation(self, name: str) -> Path:
        """A file of the augmented uncropped scans: images.npy, segmentations.npy, samples.npz."""
        return self.scans_augmentation_dir / _part(name)

    # -- augmentation/

    @property
    def augmentation_dir(self) -> Path:
        return self.root / "augmentation"

    @property
    def augmentation_images(self) -> Path:
        return self.augmentation_dir / "images.npy"

    @property
    def samples_npz(self) -> Path:
        return self.augmentation_dir / "samples.npz"

    @property
    def shape_space_npz(self) -> Path:
        return self.augmentation_dir / "shape_space.npz"

    @property
    def augmentation_qc(self) -> Path:
        return self.augmentation_dir / "qc.png"

    # -- segmentations, for training only (deepssm_workflow.segmentations; not part of the default run)

    @property
    def train_segmentations(self) -> Path:
        """The training subjects' segmentations on the grid (fractions inside the anatomy)."""
        return self.preprocess_dir / "train_segmentations.npz"

    @property
    def augmentation_segmentations_dir(self) -> Path:
        """Its own folder: its provenance.json beside it, as `provenance.verify` wants."""
        return self.augmentation_dir / "segmentations"

    @property
    def augmentation_segmentations(self) -> Path:
        """Each augmented sample's segmentation, warped with its image (row i = sample i)."""
        return self.augmentation_segmentations_dir / "segmentations.npy"

    @property
    def augmentation_segmentations_provenance(self) -> Path:
        return self.augmentation_segmentations_dir / SIDECAR

    # -- models/{method}/: one trained network per method

    def model_dir(self, method: str) -> Path:
        return self.root / "models" / _part(method)

    def model_pt(self, method: str) -> Path:
        return self.model_dir(method) / "model.pt"

    def model_card(self, method: str) -> Path:
        return self.model_dir(method) / "model_card.json"

    def training_log(self, method: str) -> Path:
        """Per-epoch losses and timings (log.csv)."""
        return self.model_dir(method) / "log.csv"

    def loss_curve(self, method: str) -> Path:
        return self.model_dir(method) / "loss_curve.png"

    # -- predictions/{method}/: each method's predicted test shapes

    def predictions_dir(self, method: str) -> Path:
        return self.root / "predictions" / _part(method)

    def predictions_csv(self, method: str) -> Path:
        return self.predictions_dir(method) / "predictions.csv"

    def predicted_particles(self, method: str) -> Path:
        return self.predictions_dir(method) / "particles"

    def predictions_alignment(self, method: str) -> Path:
        """A method that localizes itself: its own alignment of each test scan (ids, image_to_world)."""
        return self.predictions_dir(method) / "alignment.npz"

    # -- landmarks/{method}/: a LANDMARKS method's landmarks of every subject and their evaluation

    def landmarks_dir(self, method: str) -> Path:
        return self.root / "landmarks" / _part(method)

    def landmark_selection(self, name: str, method: str) -> Path:
        """selection.json or selection.png of `method`'s redundancy removal."""
        return self.landmarks_dir(method) / "selection" / _part(name)

    def landmarks_npz(self, method: str) -> Path:
        return self.landmarks_dir(method) / "landmarks.npz"

    def landmarks_csv(self, method: str) -> Path:
        return self.landmarks_dir(method) / "landmarks.csv"

    def landmark_evaluation_dir(self, method: str) -> Path:
        return self.landmarks_dir(method) / "evaluation"

    def landmark_evaluation(self, name: str, method: str) -> Path:
        """landmark_evaluation.json or landmark_pairs.csv of `method`'s evaluation."""
        return self.landmark_evaluation_dir(method) / _part(name)

    def landmark_study_dir(self, method: str) -> Path:
        """The dataset's clinical study on `method`'s landmarks, beside the PDM (studies.landmark_descriptors)."""
        return self.landmarks_dir(method) / "study"

    # -- provenance sidecars of the expensive steps

    def provenance_dir(self, stage: str, method: str | None = None, seed=None) -> Path:
        """The folder of a step that writes a provenance.json: augmentation/ (no method), models/{method}/ or
        predictions/{method}/ (with a seed: seeds/{seed}/models/{method}/, ...), seeds/ (the spread)."""
        if seed is not None and stage in ("models", "predictions") and method is not None:
            return self._seed_run(seed).provenance_dir(stage, method)
        if stage == "augmentation" and method is None and seed is None:
            return self.augmentation_dir
        if stage == "models" and method is not None and seed is None:
            return self.model_dir(method)
        if stage == "predictions" and method is not None and seed is None:
            return self.predictions_dir(method)
        if stage == "seeds" and method is None and seed is None:
            return self.seeds_dir
        raise ValueError(f"no provenance folder for stage {stage!r}, method {method!r} and seed {seed!r}: the "
                         f"stages are {', '.join(PROVENANCE_STAGES)}, and only models and predictions are per "
                         f"method (and per seed)")

    def provenance(self, stage: str, method: str | None = None, seed=None) -> Path:
        return self.provenance_dir(stage, method, seed) / SIDECAR

    def provenance_dirs(self, methods) -> list[Path]:
        """Every folder with a provenance.json for these methods: augmentation, then models, then predictions."""
        return ([self.augmentation_dir] + [self.model_dir(m) for m in methods]
                + [self.predictions_dir(m) for m in methods])

    # -- validation/: the registered validation scans (validation.py)

    @property
    def validation_dir(self) -> Path:
        return self.root / "validation"

    def validation_file(self, name: str) -> Path:
        """summary.csv, per_subject.csv or summary.json of the registered validation."""
        return self.validation_dir / _part(name)

    # -- tuning/: sweeps of a method's settings, scored on the registered validation scans

    def tuning_dir(self, sweep: str) -> Path:
        return self.root / "tuning" / _part(sweep)

    def _tuning_run(self, sweep: str, candidate: str) -> "DatasetLayout":
        """tuning/{sweep}/{candidate}/ holds models/ under the names of the dataset's own."""
        return DatasetLayout(self.tuning_dir(sweep) / _part(candidate))

    def tuning_model_dir(self, sweep: str, candidate: str, method: str) -> Path:
        return self._tuning_run(sweep, candidate).model_dir(method)

    def tuning_model_pt(self, sweep: str, candidate: str, method: str) -> Path:
        return self._tuning_run(sweep, candidate).model_pt(method)

    def tuning_model_card(self, sweep: str, candidate: str, method: str) -> Path:
        return self._tuning_run(sweep, candidate).model_card(method)

    def tuning_training_log(self, sweep: str, candidate: str, method: str) -> Path:
        return self._tuning_run(sweep, candidate).training_log(method)

    def tuning_loss_curve(self, sweep: str, candidate: str, method: str) -> Path:
        return self._tuning_run(sweep, candidate).loss_curve(method)

    def tuning_provenance(self, sweep: str, candidate: str, method: str) -> Path:
        return self._tuning_run(sweep, candidate).provenance("models", method)

    def tuning_file(self, sweep: str, name: str) -> Path:
        """summary.csv, per_subject.csv or summary.json of a sweep."""
        return self.tuning_dir(sweep) / _part(name)

    # -- evaluation/

    @property
    def evaluation_dir(self) -> Path:
        return self.root / "evaluation"

    @property
    def evaluation_summary(self) -> Path:
        return self.evaluation_dir / "summary.json"

    @property
    def evaluation_figures_json(self) -> Path:
        return self.evaluation_dir / "figures.json"

    @property
    def evaluation_tables_json(self) -> Path:
        return self.evaluation_dir / "tables.json"

    def evaluation_table(self, name: str) -> Path:
        """A table of the evaluation, by file stem (EVALUATION_TABLES)."""
        return self.evaluation_dir / "tables" / f"{_part(name)}.csv"

    def evaluation_figure(self, name: str) -> Path:
        """A figure of the evaluation, by file stem (EVALUATION_FIGURES)."""
        return self.evaluation_dir / f"{_part(name)}.png"

    @property
    def per_point_npz(self) -> Path:
        return self.evaluation_dir / "per_point.npz"

    def multi_evaluation_dir(self, method: str) -> Path:
        """A multi-anatomy dataset's evaluation of one method, per anatomy (evaluate_multi)."""
        return self.evaluation_dir / _part(method)

    def anatomy_export(self, name: str, anatomy: str) -> Path:
        """subjects.csv or data/ of one anatomy exported as a single-anatomy cohort (the DeepSSM baselines)."""
        return self.root / "anatomies" / _part(anatomy) / _part(name)

    def multi_evaluation(self, name: str, method: str) -> Path:
        """per_scan.csv, summary.csv, rmse_boxplots.png or best_worst.png of `method`'s evaluation."""
        return self.multi_evaluation_dir(method) / _part(name)

    # -- seeds/: the seed spread, the default run's models beside ones trained with other init seeds

    @property
    def seeds_dir(self) -> Path:
        return self.root / "seeds"

    def seed_dir(self, seed) -> Path:
        """The runs of one init seed (an int, or a wildcard such as "{seed}")."""
        return self.seeds_dir / _part(str(seed))

    def _seed_run(self, seed) -> "DatasetLayout":
        """seeds/{seed}/ holds models/ and predictions/ under the names of the dataset's own."""
        return DatasetLayout(self.seed_dir(seed))

    def seed_model_dir(self, seed, method: str) -> Path:
        return self._seed_run(seed).model_dir(method)

    def seed_model_pt(self, seed, method: str) -> Path:
        return self._seed_run(seed).model_pt(method)

    def seed_model_card(self, seed, method: str) -> Path:
        return self._seed_run(seed).model_card(method)

    def seed_training_log(self, seed, method: str) -> Path:
        return self._seed_run(seed).training_log(method)

    def seed_loss_curve(self, seed, method: str) -> Path:
        return self._seed_run(seed).loss_curve(method)

    def seed_predictions_dir(self, seed, method: str) -> Path:
        return self._seed_run(seed).predictions_dir(method)

    def seed_predictions_csv(self, seed, method: str) -> Path:
        return self._seed_run(seed).predictions_csv(method)

    def seed_predicted_particles(self, seed, method: str) -> Path:
        return self._seed_run(seed).predicted_particles(method)

    def seed_predictions_alignment(self, seed, method: str) -> Path:
        return self._seed_run(seed).predictions_alignment(method)

    @property
    def spread_csv(self) -> Path:
        """One row per method and init seed: the test RMSE and the best epoch."""
        return self.seeds_dir / "spread.csv"

    @property
    def spread_json(self) -> Path:
        """Per method: n, mean, SD, min, max, range, against the mean shape; the machines that trained."""
        return self.seeds_dir / "spread.json"

    @property
    def spread_png(self) -> Path:
        return self.seeds_dir / "spread.png"

    # -- study/, qc/ and the report

    @property
    def study_dir(self) -> Path:
        return self.root / "study"

    @property
    def qc_dir(self) -> Path:
        return self.root / "qc"

    @property
    def cohort_qc(self) -> Path:
        return self.qc_dir / "cohort.png"

    @property
    def preprocess_qc(self) -> Path:
        return self.qc_dir / "preprocess.png"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"


class Patterns:
    """A DatasetLayout whose paths come back as str, which Snakemake's inputs and outputs want, with
    wildcards such as {dataset} and {method} kept as written (pathlib leaves braces alone)."""

    def __init__(self, layout: DatasetLayout):
        self._layout = layout

    def __repr__(self) -> str:
        return f"Patterns({self._layout!r})"

    def __getattr__(self, name: str):
        if name.startswith("_"):  # private and dunder lookups (copy, pickle) never reach the layout
            raise AttributeError(name)
        value = getattr(self._layout, name)
        if callable(value):
            return lambda *args, **kwargs: _as_str(value(*args, **kwargs))
        return _as_str(value)


def _as_str(value):
    return str(value) if isinstance(value, Path) else [str(path) for path in value]


def patterns(dataset: str = "{dataset}", results: str = "results") -> Patterns:
    """The layout of results/{dataset} for the Snakefile: `patterns().model_pt("{method}")` is
    "results/{dataset}/models/{method}/model.pt"; `patterns("femur")` gives one dataset's paths."""
    return Patterns(DatasetLayout(Path(results) / dataset))
