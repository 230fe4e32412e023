"""Command line of the workflow's steps: `deepssm-wf <step> ...`.

Each Snakemake rule calls one subcommand; the same commands work by hand.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from . import methods
from .provenance import verify, write_sidecar
from .studies.registry import CHOICES as STUDY_CHOICES
from .studies.registry import STUDIES
from .synthetic.registry import ANATOMIES


def _synthesize(args) -> None:
    from .synthetic.cohort import SyntheticSettings, generate_cohort

    settings = SyntheticSettings.from_config(json.loads(args.settings))
    start = time.perf_counter()
    subjects = generate_cohort(args.anatomy, settings, args.out_dir, prefix=args.prefix, workers=args.workers)
    print(f"generated {len(subjects)} {args.anatomy} subjects in {time.perf_counter() - start:.1f}s")


def _synthesize_multi(args) -> None:
    from .synthetic.multi_anatomy import MultiAnatomySettings, generate_multi_anatomy_cohort

    settings = MultiAnatomySettings.from_config(json.loads(args.settings))
    start = time.perf_counter()
    subjects = generate_multi_anatomy_cohort(settings, args.out_dir, prefix=args.prefix, workers=args.workers)
    print(f"generated {len(subjects)} multi-anatomy subjects in {time.perf_counter() - start:.1f}s")


def _ingest(args) -> None:
    from .ingest import ingest_cohort

    report = ingest_cohort(json.loads(args.source), args.anatomy, args.out_dir, study=args.study)
    print(json.dumps(report, indent=2))


def _ingest_multi(args) -> None:
    from .ingest_multi import ingest_multi_anatomy

    print(json.dumps(ingest_multi_anatomy(json.loads(args.source), args.out_dir), indent=2))


def _export_anatomy(args) -> None:
    from .ingest_multi import export_anatomy

    table = export_anatomy(args.cohort, args.anatomy, args.out_dir)
    print(f"{len(table)} subjects with {args.anatomy}: {args.out_dir}/subjects.csv")


def _preprocess_multi_scans(args) -> None:
    from .full_field import ScanGridSettings
    from .multi_scans import preprocess_multi_scans

    meta = preprocess_multi_scans(args.cohort, ScanGridSettings.from_config(json.loads(args.settings)), args.out_dir)
    print(json.dumps(meta, indent=2))


def _train_multi(args) -> None:
    from .multi_scans import train_multi

    card = train_multi(args.scans_dir, args.method, json.loads(args.settings), args.out_dir, threads=args.threads,
                       device=args.device)
    print(json.dumps(card, indent=2, default=str))


def _predict_multi(args) -> None:
    from .predict import predict_multi

    table = predict_multi(args.model_dir, args.scans_dir, args.split, args.out_dir)
    print(table.to_string(index=False))


def _evaluate_multi(args) -> None:
    from .evaluate_multi import evaluate_multi

    print(evaluate_multi(args.model_dir, args.scans_dir, args.predictions_dir, args.out_dir, threads=args.threads,
                         cohort_dir=args.cohort).to_string(index=False))


def _preprocess_train(args) -> None:
    from .preprocess import PreprocessSettings, preprocess_training

    meta = preprocess_training(args.cohort, PreprocessSettings.from_config(json.loads(args.settings)), args.out_dir)
    print(json.dumps(meta, indent=2))


def _preprocess_unseen(args) -> None:
    from .preprocess import preprocess_unseen

    preprocess_unseen(args.cohort, args.preprocess_dir, args.split, args.out)


def _preprocess_validation(args) -> None:
    from .validation import preprocess_validation

    kept = preprocess_validation(args.cohort, args.preprocess_dir, args.val_fraction, args.seed, args.out)
    print(f"registered {len(kept)} validation subjects: {' '.join(kept)}")


def _validate(args) -> None:
    from .validation import validate_methods

    if len(args.methods) != len(args.model_dirs):
        raise ValueError(f"validate: {len(args.methods)} names for {len(args.model_dirs)} model folders")
    models = dict(zip(args.methods, args.model_dirs))
    summary = validate_methods(models, args.registered, args.cohort, json.loads(args.shape_space), args.val_fraction,
                               args.seed, args.preprocess_dir, args.out_dir, reference=args.reference,
                               settings=json.loads(args.candidate_settings) if args.candidate_settings else None)
    print(summary.to_string(index=False, float_format="%.3f"))


def _augment(args) -> None:
    from .augment import augment

    cfg = json.loads(args.settings)
    summary = augment(args.cohort, args.preprocess_dir, args.out_dir, cfg["n_samples"], cfg.get("sampler", "kde"),
                      cfg.get("n_control", 256), cfg.get("seed", 0), kde_kernel=cfg.get("kde_kernel", "neighbour"),
                      validation=json.loads(args.validation) if args.validation else None)
    print(json.dumps(summary, indent=2))


def _preprocess_segmentations(args) -> None:
    from .segmentations import preprocess_segmentations

    print(json.dumps(preprocess_segmentations(args.cohort, args.preprocess_dir, args.out), indent=2))


def _augment_segmentations(args) -> None:
    from .segmentations import augment_segmentations

    cfg = json.loads(args.settings)  # the augmentation block: its n_control made the images' splines
    summary = augment_segmentations(args.cohort, args.preprocess_dir, args.augmentation_dir, args.out,
                                    cfg.get("n_control", 256))
    print(json.dumps(summary, indent=2))


def _one_source(args, *crops: str) -> bool:
    """Whether a step reads the uncropped scans (--scans-dir) or the registered crops (`crops`, all given): exactly
    one of the two, else an error saying what to give."""
    given = [name for name in crops if getattr(args, name) is not None]
    scans = args.scans_dir is not None
    if not ((scans and not given) or (not scans and len(given) == len(crops))):
        flags = " and ".join("--" + name.replace("_", "-") for name in crops)
        raise ValueError(f"give either {flags} (registered crops) or --scans-dir (uncropped scans), not both or "
                         f"neither")
    return args.scans_dir is not None


def _train(args) -> None:
    from .train import train_from_artifacts, train_from_images, train_from_scans

    settings = json.loads(args.settings)
    if args.init_seed is not None:  # into the engine's settings; the sidecar then records it with them
        settings["training"] = {**settings.get("training", {}), "init_seed": args.init_seed}
        args.settings = json.dumps(settings, sort_keys=True)
    options = {"threads": args.threads, "device": args.device, "checkpoint_seconds": args.checkpoint_seconds}
    if methods.learns_without_shapes(methods.get(args.method).method.needs):  # landmarks
        if args.preprocess_dir is None or args.scans_dir or args.augmentation_dir:
            raise ValueError(f"method {args.method} learns from the training images alone: give --preprocess-dir "
                             f"and neither --scans-dir nor --augmentation-dir")
        card = train_from_images(args.preprocess_dir, args.method, settings, args.out_dir, **options)
    elif args.cohort is None:
        raise ValueError(f"method {args.method} learns from the cohort's shapes: give --cohort")
    elif _one_source(args, "preprocess_dir"):
        card = train_from_scans(args.cohort, args.scans_dir, args.method, settings, args.out_dir,
                                augmentation_dir=args.augmentation_dir, **options)
    elif args.augmentation_dir is None:
        raise ValueError("--preprocess-dir needs --augmentation-dir (the registered crops' augmentation)")
    else:
        card = train_from_artifacts(args.cohort, args.preprocess_dir, args.augmentation_dir, args.method,
                                    settings, args.out_dir, **options)
    print(json.dumps(card, indent=2, default=str))


def _predict(args) -> None:
    from .predict import predict_scans, predict_split

    if _one_source(args, "preprocess_dir"):
        table = predict_scans(args.model_dir, args.scans_dir, args.split, args.out_dir, threads=args.threads)
    else:
        table = predict_split(args.model_dir, args.preprocess_dir, args.split, args.out_dir, threads=args.threads)
    print(table.to_string(index=False))


def _predict_image(args) -> None:
    from .predict import predict_image, predict_scan_image

    if _one_source(args, "preprocess_dir"):
        result = predict_scan_image(args.model_dir, args.scans_dir, args.image, args.out_prefix)
    else:
        result = predict_image(args.model_dir, args.preprocess_dir, args.image, args.out_prefix,
                               args.accept_flagged_registration)
    print(json.dumps(result, indent=2))


def _select_landmarks(args) -> None:
    from .landmark_results import select_landmarks

    result = select_landmarks(args.model_dir, args.preprocess_dir, args.out_dir, keep=args.keep, threads=args.threads,
                              max_pairs=args.max_pairs)
    print(json.dumps({key: result[key] for key in ("n_landmarks", "kept", "no_warp")}, indent=2))


def _predict_landmarks(args) -> None:
    from .landmark_results import predict_landmarks

    table = predict_landmarks(args.model_dir, args.preprocess_dir, args.out_dir, selection=args.selection,
                              threads=args.threads)
    print(f"{table['id'].nunique()} subjects, {table['landmark'].nunique()} landmarks each")


def _evaluate_landmarks(args) -> None:
    from .landmark_results import evaluate_landmarks

    print(json.dumps(evaluate_landmarks(args.landmarks, args.model_dir, args.preprocess_dir, args.cohort,
                                        args.out_dir), indent=2))


def _landmark_study(args) -> None:
    from .studies.landmark_descriptors import run_landmark_study

    print(json.dumps(run_landmark_study(args.study, args.dataset_dir, args.landmarks, args.out_dir,
                                        args.resources_dir), indent=2))


def _augment_scans(args) -> None:
    from .full_field import augment_scans

    settings = json.loads(args.settings)
    print(json.dumps(augment_scans(args.cohort, args.scans_dir, args.augmentation_dir, args.out_dir,
                                   settings.get("n_control", 256)), indent=2))


def _preprocess_scans(args) -> None:
    from .full_field import ScanGridSettings, preprocess_scans

    meta = preprocess_scans(args.cohort, ScanGridSettings.from_config(json.loads(args.settings)), args.out_dir)
    print(json.dumps(meta, indent=2))


def _seed_spread(args) -> None:
    from .seed_spread import write_spread

    summary = write_spread(args.dataset_dir, args.methods, args.seeds, json.loads(args.shape_space), args.out_dir)
    print(json.dumps(summary, indent=2))


def _evaluate(args) -> None:
    from .evaluate import evaluate_dataset, summarize

    if args.out_dir:
        summary = evaluate_dataset(args.dataset_dir, args.methods, json.loads(args.shape_space), args.out_dir)
        print(json.dumps(summary, indent=2))
    else:
        print(summarize(args.dataset_dir, args.methods, json.loads(args.shape_space))
              .to_string(index=False, float_format="%.3f"))


def _study(args) -> None:
    from .studies import run_study

    summary = run_study(args.study, args.dataset_dir, args.methods, args.out_dir, resources_dir=args.resources_dir)
    print(json.dumps(summary, indent=2))


def _report(args) -> None:
    from .report import build_report

    build_report(args.dataset_dir, args.dataset, json.loads(args.settings), args.methods, args.out,
                 landmark_methods=args.landmark_methods)
    print(f"wrote {args.out}")


def _report_multi(args) -> None:
    from .report_multi import build_multi_report

    build_multi_report(args.dataset_dir, args.dataset, json.loads(args.settings), args.methods, args.out)
    print(f"wrote {args.out}")


def _settings(args) -> None:
    from pathlib import Path

    import yaml

    from .config import effective_settings

    config = yaml.safe_load(Path(args.configfile).read_text())
    print(yaml.safe_dump(effective_settings(config, args.schema, args.dataset), sort_keys=False), end="")


def _qc_preprocess(args) -> None:
    from .qc import preprocess_figure

    preprocess_figure(args.preprocess_dir, args.out, count=args.count)


def _qc_cohort(args) -> None:
    from .qc import cohort_figure

    cohort_figure(args.subjects, args.out, count=args.count, shapes=args.shapes)


def _artifact_flags(parser: argparse.ArgumentParser) -> None:
    """Flags of the steps whose outputs carry a provenance sidecar (see `deepssm_workflow.provenance`)."""
    parser.add_argument("--verify", nargs="+", default=[], metavar="FILE",
                        help="input artifacts to check against the provenance.json beside them first; a corrupted "
                             "one is removed (with its cache entry) so that the next run rebuilds it")
    parser.add_argument("--inputs", nargs="+", default=[], metavar="FILE", help="input files, for the sidecar")
    parser.add_argument("--outputs", nargs="+", default=[], metavar="FILE", help="output files, for the sidecar")
    parser.add_argument("--provenance", metavar="JSON", help="write this provenance sidecar when the step succeeds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepssm-wf", description=__doc__)
    steps = parser.add_subparsers(dest="step", required=True)

    p = steps.add_parser("synthesize", help="generate a synthetic cohort")
    p.add_argument("--anatomy", required=True, choices=ANATOMIES)
    p.add_argument("--settings", required=True, help="JSON of the config's `synthetic` block")
    p.add_argument("--out-dir", required=True, help="cohort folder (subjects.csv, ground_truth.csv, data/)")
    p.add_argument("--prefix", help="subject id prefix (default: the anatomy)")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(run=_synthesize)

    p = steps.add_parser("synthesize-multi", help="generate a synthetic cohort of several anatomies per scan")
    p.add_argument("--settings", required=True,
                   help="JSON of the `multi_anatomy` settings (see synthetic/multi_anatomy.py)")
    p.add_argument("--out-dir", required=True, help="cohort folder (subjects.csv, ground_truth.csv, data/)")
    p.add_argument("--prefix", default="hip", help="subject id prefix")
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(run=_synthesize_multi)

    p = steps.add_parser("ingest", help="validate a cohort source and normalize it")
    p.add_argument("--anatomy", required=True, help="what the shapes are (any name; reported)")
    p.add_argument("--study", choices=STUDY_CHOICES, help="the clinical study whose labels the table must have, "
                   "or none (default: the anatomy's own study, if it has one)")
    p.add_argument("--source", required=True,
                   help='JSON, e.g. {"source": "csv", "manifest": "cohort.csv"} or '
                        '{"source": "shapeworks", "project": "p.swproj"}')
    p.add_argument("--out-dir", required=True, help="normalized cohort folder")
    p.set_defaults(run=_ingest)

    p = steps.add_parser("ingest-multi", help="validate a multi-anatomy cohort (several anatomies per scan) "
                         "and normalize it")
    p.add_argument("--source", required=True, help='JSON, e.g. {"source": "csv", "manifest": "subjects.csv"} '
                   "(long form with an `anatomy` column, or wide form with per-anatomy columns)")
    p.add_argument("--out-dir", required=True, help="normalized cohort folder")
    p.set_defaults(run=_ingest_multi)

    p = steps.add_parser("export-anatomy", help="one anatomy of an ingested multi-anatomy cohort as a single-anatomy "
                         "cohort (CSV manifest), for the single-anatomy methods and baselines")
    p.add_argument("--cohort", required=True, help="the ingested multi-anatomy cohort (ingest-multi)")
    p.add_argument("--anatomy", required=True)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(run=_export_anatomy)

    p = steps.add_parser("preprocess-multi-scans", help="a multi-anatomy cohort's scans on one network grid, "
                         "every anatomy's particles packed")
    p.add_argument("--cohort", required=True, help="the ingested multi-anatomy cohort (ingest-multi)")
    p.add_argument("--settings", required=True, help='JSON: {"spacing_mm": ..., "size": [x, y, z] or absent}')
    p.add_argument("--out-dir", required=True)
    p.set_defaults(run=_preprocess_multi_scans)

    p = steps.add_parser("train-multi", help="train a multi-anatomy method (massm) on preprocess-multi-scans")
    p.add_argument("--scans-dir", required=True)
    p.add_argument("--method", required=True,
                   choices=[m for m in methods.names() if methods.get(m).has(methods.MULTI_ANATOMY)])
    p.add_argument("--settings", required=True, help='JSON: {"method": {...}, "training": {...}}')
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"))
    _artifact_flags(p)
    p.set_defaults(run=_train_multi)

    p = steps.add_parser("predict-multi", help="every anatomy of every scan of a split with a multi-anatomy model: "
                         "particles per detected anatomy (scan frame and world) and predictions.csv")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--scans-dir", required=True, help="preprocess-multi-scans' folder")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--out-dir", required=True)
    p.set_defaults(run=_predict_multi)

    p = steps.add_parser("evaluate-multi", help="per-anatomy detection and RMSE of a multi-anatomy model on the "
                         "test scans, beside the template baselines")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--scans-dir", required=True)
    p.add_argument("--predictions-dir", required=True, help="predict-multi's folder for the test split: what is "
                   "scored (predictions.csv and its particle files)")
    p.add_argument("--cohort", help="the ingested multi-anatomy cohort (ingest-multi), for the surface distances "
                   "to its true meshes")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=_evaluate_multi)

    p = steps.add_parser("report-multi", help="self-contained report.html of a multi-anatomy dataset: per anatomy, "
                         "detection and local and world errors beside the baselines (figures embedded)")
    p.add_argument("--dataset-dir", required=True, help="results/{dataset} with cohort/, scans/, models/ and "
                   "evaluation/{method}/")
    p.add_argument("--dataset", required=True, help="the dataset's name in the config")
    p.add_argument("--settings", required=True, help="JSON of the dataset's config block")
    p.add_argument("--methods", nargs="+", required=True,
                   choices=[m for m in methods.names() if methods.get(m).has(methods.MULTI_ANATOMY)])
    p.add_argument("--out", required=True, help="report.html to write")
    p.set_defaults(run=_report_multi)

    p = steps.add_parser("preprocess-train", help="reference, world grid, normalization, training images")
    p.add_argument("--cohort", required=True, help="ingested cohort folder")
    p.add_argument("--settings", required=True, help="JSON of the config's `preprocess` block")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(run=_preprocess_train)

    p = steps.add_parser("preprocess-unseen", help="register and resample a split's images (image only)")
    p.add_argument("--cohort", required=True, help="ingested cohort folder (only its image column is read)")
    p.add_argument("--preprocess-dir", required=True, help="folder with grid.json and reference.nrrd")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True, help=".npz to write")
    p.set_defaults(run=_preprocess_unseen)

    p = steps.add_parser("preprocess-validation", help="register the validation subjects' images from the image "
                         "alone, as test images are (what settings are chosen on)")
    p.add_argument("--cohort", required=True, help="ingested cohort folder")
    p.add_argument("--preprocess-dir", required=True, help="folder with grid.json and reference.nrrd")
    p.add_argument("--val-fraction", type=float, required=True, help="the dataset's training.val_fraction")
    p.add_argument("--seed", type=int, required=True, help="the dataset's training.seed (which subjects are held out)")
    p.add_argument("--out", required=True, help=".npz to write (preprocess/validation.npz)")
    p.set_defaults(run=_preprocess_validation)

    p = steps.add_parser("validate", help="scan-frame RMSE of trained crop methods on the registered validation scans")
    p.add_argument("--cohort", required=True, help="ingested cohort folder (the validation subjects' particles)")
    p.add_argument("--preprocess-dir", required=True, help="folder with grid.json (the registration's reference)")
    p.add_argument("--registered", required=True, help="preprocess/validation.npz")
    p.add_argument("--methods", nargs="+", required=True, help="the methods' names, in the order of --model-dirs")
    p.add_argument("--model-dirs", nargs="+", required=True, help="each method's model folder")
    p.add_argument("--shape-space", required=True, help="JSON of the dataset's `shape_space` block")
    p.add_argument("--val-fraction", type=float, required=True, help="the dataset's training.val_fraction")
    p.add_argument("--seed", type=int, required=True, help="the dataset's training.seed")
    p.add_argument("--out-dir", required=True, help="writes summary.csv, per_subject.csv, summary.json")
    p.add_argument("--reference", help="a tuning sweep's first candidate: the others' paired differences from it")
    p.add_argument("--candidate-settings", help="JSON: what each tuning candidate changed (recorded in summary.json)")
    p.set_defaults(run=_validate)

    p = steps.add_parser("preprocess-scans", help="uncropped scans, training and test, on one grid size centred on "
                         "each scan, no registration (for a method that finds the anatomy itself)")
    p.add_argument("--cohort", required=True, help="ingested cohort folder")
    p.add_argument("--settings", required=True, help="JSON of the dataset's `scan_grid` block")
    p.add_argument("--out-dir", required=True, help="writes grid.json, train.npz, test.npz")
    p.set_defaults(run=_preprocess_scans)

    p = steps.add_parser("augment-scans", help="the augmented samples as uncropped scans: each source subject's "
                         "scan and segmentation warped onto the generated shape")
    p.add_argument("--cohort", required=True, help="ingested cohort folder (training transforms)")
    p.add_argument("--scans-dir", required=True, help="folder with train.npz and grid.json (preprocess-scans)")
    p.add_argument("--augmentation-dir", required=True, help="folder with samples.npz (augment)")
    p.add_argument("--settings", required=True, help="JSON of the config's `augmentation` block (its n_control)")
    p.add_argument("--out-dir", required=True)
    _artifact_flags(p)
    p.set_defaults(run=_augment_scans)

    p = steps.add_parser("augment", help="KDE augmentation: sampled shapes and TPS-warped images")
    p.add_argument("--cohort", required=True, help="ingested cohort folder (training shapes)")
    p.add_argument("--preprocess-dir", required=True, help="folder with train.npz and grid.json")
    p.add_argument("--settings", required=True, help="JSON of the config's `augmentation` block")
    p.add_argument("--validation", help="JSON {val_fraction, seed} of the training: the subjects it holds out are "
                   "left out of the shape model (omit to fit on every subject)")
    p.add_argument("--out-dir", required=True)
    _artifact_flags(p)
    p.set_defaults(run=_augment)

    p = steps.add_parser("preprocess-segmentations", help="training subjects' segmentations on the grid, as the "
                         "fraction of each voxel inside the anatomy (only for methods that need segmentations)")
    p.add_argument("--cohort", required=True, help="ingested cohort folder (its segmentation column)")
    p.add_argument("--preprocess-dir", required=True, help="folder with train.npz and grid.json")
    p.add_argument("--out", required=True, help=".npz to write (train_segmentations.npz)")
    p.set_defaults(run=_preprocess_segmentations)

    p = steps.add_parser("augment-segmentations", help="each augmented sample's segmentation: its source's warped "
                         "by the thin-plate spline of its image")
    p.add_argument("--cohort", required=True, help="ingested cohort folder (training shapes)")
    p.add_argument("--preprocess-dir", required=True, help="folder with train_segmentations.npz and grid.json")
    p.add_argument("--augmentation-dir", required=True, help="folder with samples.npz (and its provenance.json)")
    p.add_argument("--settings", required=True, help="JSON of the config's `augmentation` block (its n_control)")
    p.add_argument("--out", required=True, help=".npy to write")
    _artifact_flags(p)
    p.set_defaults(run=_augment_segmentations)

    p = steps.add_parser("train", help="train one registered method (CUDA when visible, else CPU)")
    p.add_argument("--cohort", help="the ingested cohort (its shapes); not for a method that learns from the "
                   "training images alone (landmarks)")
    p.add_argument("--preprocess-dir", help="registered crops: with --augmentation-dir (alone for landmarks)")
    p.add_argument("--augmentation-dir", help="the augmentation: of the crops, or with --scans-dir of the scans "
                   "(augment-scans; optional there)")
    p.add_argument("--scans-dir", help="uncropped scans (preprocess-scans), for a method that localizes itself")
    p.add_argument("--method", required=True, choices=methods.names())
    p.add_argument("--settings", required=True, help='JSON: {"shape_space": {...}, "training": {...}, '
                   '"method": {...}}, the dataset\'s blocks')
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), help="default: $DEEPSSM_DEVICE, else auto (CUDA when "
                   "usable; on a machine with an NVIDIA GPU whose CUDA is unusable, an error, never a silent CPU run)")
    p.add_argument("--checkpoint-seconds", type=float, default=0.0, help="write the checkpoint at most this often "
                   "(0: every epoch); always at a phase's end. A killed job redoes at most this much training")
    p.add_argument("--init-seed", type=int, help="seed of the network's initialisation and of the batch order "
                   "(default: the training block's seed); the validation split keeps following that seed")
    _artifact_flags(p)
    p.set_defaults(run=_train)

    p = steps.add_parser("predict", help="predict the preprocessed images of a split")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--preprocess-dir", help="registered crops")
    p.add_argument("--scans-dir", help="uncropped scans, for a method that localizes itself")
    p.add_argument("--split", default="test")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    _artifact_flags(p)
    p.set_defaults(run=_predict)

    p = steps.add_parser("select-landmarks", help="redundancy removal: greedily drop the landmarks whose removal "
                         "hurts the registration of training pairs least (selection.json, selection.png)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--preprocess-dir", required=True)
    p.add_argument("--keep", type=int, help="landmarks to keep (default: the method's kept_landmarks, else half)")
    p.add_argument("--max-pairs", type=int, default=24, help="training pairs judged on (the cost grows with them)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(run=_select_landmarks)

    p = steps.add_parser("predict-landmarks", help="a landmarks model's landmarks of every preprocessed subject, "
                         "train and test (landmarks.npz, landmarks.csv)")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--preprocess-dir", required=True)
    p.add_argument("--selection", help="select-landmarks' selection.json: which landmarks are kept (default: all)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=1)
    _artifact_flags(p)
    p.set_defaults(run=_predict_landmarks)

    p = steps.add_parser("evaluate-landmarks", help="landmarks against the exact ground truth: registration gain, "
                         "consistency through the true correspondences, shape prediction")
    p.add_argument("--landmarks", required=True, help="predict-landmarks' landmarks.npz")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--preprocess-dir", required=True)
    p.add_argument("--cohort", required=True, help="the ingested cohort (the true particles)")
    p.add_argument("--out-dir", required=True)
    _artifact_flags(p)
    p.set_defaults(run=_evaluate_landmarks)

    p = steps.add_parser("landmark-study", help="the dataset's clinical study on landmark descriptors, beside the "
                         "ground-truth PDM")
    p.add_argument("--study", required=True, choices=list(STUDIES))
    p.add_argument("--dataset-dir", required=True, help="results/{dataset} (cohort/)")
    p.add_argument("--landmarks", required=True, help="predict-landmarks' landmarks.npz")
    p.add_argument("--resources-dir", help="the synthetic cohort's resources (metopic expert ratings)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(run=_landmark_study)

    p = steps.add_parser("predict-image", help="correspondences for one new, unsegmented image")
    p.add_argument("--model-dir", required=True, help="results/{dataset}/models/{method}")
    p.add_argument("--preprocess-dir", help="results/{dataset}/preprocess (reference, grid): registered crops")
    p.add_argument("--scans-dir", help="results/{dataset}/scans (grid.json), for a method that localizes itself")
    p.add_argument("--image", required=True, help="3D image file (NRRD, NIfTI, ...)")
    p.add_argument("--out-prefix", required=True, help="writes PREFIX_world.particles and PREFIX_local.particles")
    p.add_argument("--accept-flagged-registration", action="store_true",
                   help="predict even when the scan's registration is flagged as failed (refused by default)")
    p.set_defaults(run=_predict_image)

    p = steps.add_parser("evaluate", help="mean test RMSE per method beside the mean-shape predictor and PCA floor")
    p.add_argument("--dataset-dir", required=True, help="results/{dataset}")
    p.add_argument("--methods", nargs="+", default=methods.names(default_only=True), choices=methods.names())
    p.add_argument("--shape-space", required=True, help='JSON of the dataset\'s `shape_space` block, e.g. '
                   '\'{"n_modes": 4}\' (the PCA floor\'s modes)')
    p.add_argument("--out-dir", help="write the full evaluation here (tables, figures, surface distances, timing)")
    p.set_defaults(run=_evaluate)

    p = steps.add_parser("seed-spread", help="test RMSE of each method over several initialisation seeds, beside "
                         "the mean shape (spread.csv, spread.json, spread.png)")
    p.add_argument("--dataset-dir", required=True, help="results/{dataset}: the default run's models and predictions "
                   "are the seed of its training block; the others are read from seeds/{seed}/")
    p.add_argument("--methods", nargs="+", required=True, choices=methods.names())
    p.add_argument("--seeds", nargs="*", type=int, default=[], help="the extra init seeds (the default run's is "
                   "always the first, read from each method's model card)")
    p.add_argument("--shape-space", required=True, help="JSON of the dataset's `shape_space` block (the mean "
                   "shape's fit, as in evaluate)")
    p.add_argument("--out-dir", required=True, help="results/{dataset}/seeds")
    _artifact_flags(p)
    p.set_defaults(run=_seed_spread)

    p = steps.add_parser("study", help="a clinical study (paper sec. 4) on ground truth and predictions")
    p.add_argument("--study", required=True, choices=tuple(STUDIES))
    p.add_argument("--dataset-dir", required=True, help="results/{dataset}")
    p.add_argument("--resources-dir", help="resources/{dataset}: expert ratings (data/ratings.csv), ground_truth.csv")
    p.add_argument("--methods", nargs="+", default=methods.names(default_only=True), choices=methods.names(),
                   help="those without predictions are skipped and listed in summary.json")
    p.add_argument("--out-dir", required=True, help="results/{dataset}/study")
    p.set_defaults(run=_study)

    p = steps.add_parser("report", help="self-contained report.html of a dataset (figures embedded)")
    p.add_argument("--dataset-dir", required=True, help="results/{dataset} with evaluation/ and study/")
    p.add_argument("--dataset", required=True, help="the dataset's name in the config")
    p.add_argument("--settings", required=True, help="JSON of the dataset's config block")
    p.add_argument("--methods", nargs="+", default=methods.names(default_only=True), choices=methods.names())
    p.add_argument("--landmark-methods", nargs="*", default=[], choices=methods.names(),
                   help="landmark methods, reported in their own section (landmarks/{method}/evaluation)")
    p.add_argument("--out", required=True, help="report.html to write")
    p.set_defaults(run=_report)

    p = steps.add_parser("settings", help="the effective settings of a config: every default filled in, each "
                         "method's full settings (what training will use)")
    p.add_argument("configfile", help="a config file, e.g. config/paper.yaml")
    p.add_argument("--dataset", help="only this dataset")
    p.add_argument("--schema", default="workflow/schemas/config.schema.yaml",
                   help="the config schema (default: the checkout's, run from its root)")
    p.set_defaults(run=_settings)

    p = steps.add_parser("qc-preprocess", help="QC figure of preprocessing: training overlay, registered test images")
    p.add_argument("--preprocess-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=4)
    p.set_defaults(run=_qc_preprocess)

    p = steps.add_parser("qc-cohort", help="QC figure of a cohort: slices, outlines, points, meshes")
    p.add_argument("--subjects", required=True, help="an ingested cohort's subjects.csv (with --shapes), or a CSV "
                   "manifest with a local_particles column")
    p.add_argument("--shapes", nargs="+", metavar="NPZ", help="the ingested cohort's shapes_train.npz and "
                   "shapes_test.npz (the points, image frame)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--count", type=int, default=4, help="subjects to show")
    p.set_defaults(run=_qc_cohort)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # a rule redirects stdout to its log file: line by line, so that training's progress shows as
    # it runs (and survives a killed job), not in one block at the end
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "verify", None):
            verify(args.verify)
        args.run(args)
        if getattr(args, "provenance", None):
            settings = json.loads(args.settings) if getattr(args, "settings", None) else None
            write_sidecar(args.provenance, args.step, args.inputs, args.outputs, settings=settings,
                          command=shlex.join(["deepssm-wf", *argv]))
    except (ValueError, OSError, RuntimeError) as error:
        print(f"deepssm-wf {args.step}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
