"""The seed spread: how much of a method's test RMSE is its network's initialisation.

Trained weights differ between CPUs whose kernels differ (AVX2, AVX-512: `devices.facts`
records which), and with a handful of test scans such a difference can flip whether a method
beats the mean shape. A change of machine changes the floating-point trajectory of training
with the data fixed; so does a change of the init seed (`EngineSettings.init_seed`: the
network's initialisation and the batch order). The spread therefore varies the init seed
alone: the augmentation and the validation split stay those of the dataset's `training.seed`,
and the default run's model is the first seed. A conclusion of the default report that holds
for every seed does not depend on which CPU ran it; one that the SD spans does not hold.

Every RMSE here is the evaluation's (`evaluate`): paper eq. 12 in each test scan's own frame,
the mean over the test scans, beside the mean-shape predictor's on the same scans.

`write_spread` writes results/{dataset}/seeds/: spread.csv (method, init_seed, rmse_mm,
best_epoch), spread.json (the summary per method and the device facts of every training run,
so that the spreads of two machines can be set side by side) and spread.png. spread.json also
carries each method's interval over init seeds x test subjects (a two-level bootstrap:
comparisons.py) and the paired differences of every method from the mean shape and from every
other method over the same seeds and scans, Holm-adjusted: the comparisons a single trained model
cannot support.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import methods as registry
from .atomic import staged
from .comparisons import comparison_pairs, paired_comparisons, seeds_scans_interval
from .evaluate import MEAN_SHAPE, baseline_shapes, load_test_cohort, read_predictions
from .layout import DatasetLayout
from .provenance import read_sidecar
from .shape_space import rmse

DEFAULT_SEEDS = (1, 2)  # the extra init seeds of a `seed_spread` block without `seeds` (the schema's default)
COLUMNS = ("method", "init_seed", "rmse_mm", "best_epoch")
OUTPUTS = ("spread.csv", "spread.json", "spread.png")
# what has to be alike between the default run and another seed's run for their difference to be the seed's
SAME_DATA = ("data_hash", "settings", "n_train", "n_val")
SAME_ENGINE = ("batch_size", "val_fraction", "seed", "precision")


def plan(dataset: dict, name: str = "dataset") -> tuple[list[str], list[int]]:
    """(methods, init seeds) of a dataset's spread, from its config block (defaults filled in): the
    `seed_spread` block's methods (default: every method of the dataset), and its training seed first,
    then the block's extra `seeds` (default DEFAULT_SEEDS) without it."""
    block = dataset.get("seed_spread") or {}
    chosen = list(block.get("methods") or dataset.get("methods") or registry.names(default_only=True))
    unknown = [m for m in chosen if m not in registry.names()]
    if unknown:
        raise ValueError(f"datasets.{name}.seed_spread.methods: unknown method(s) {', '.join(unknown)}; the "
                         f"registered methods are {', '.join(registry.names())}")
    landmarks = [m for m in chosen if registry.get(m).has(registry.LANDMARKS)]
    if landmarks and block.get("methods"):
        raise ValueError(f"datasets.{name}.seed_spread.methods: {', '.join(landmarks)} learn landmarks, not shapes: "
                         f"the seed spread compares test RMSE (eq. 12); list shape methods only")
    chosen = [m for m in chosen if m not in landmarks]  # a dataset's landmark methods are not spread by default
    default = int((dataset.get("training") or {}).get("seed", 0))
    extra = [int(s) for s in block.get("seeds", DEFAULT_SEEDS)]
    return list(dict.fromkeys(chosen)), list(dict.fromkeys([default, *extra]))


def card_init_seed(card: dict) -> int:
    """The init seed a model card's run used: its engine's init_seed, else its seed."""
    engine = card["engine"]
    return int(engine["seed"] if engine.get("init_seed") is None else engine["init_seed"])


def summarize(rows: pd.DataFrame, mean_shape_rmse: float) -> dict[str, dict]:
    """Per method (in order of appearance) of spread rows (COLUMNS; each method's default run first):
    n_seeds, mean, SD (n - 1; None for one seed), min, max and range of rmse_mm, the default run's
    value, and how many seeds beat the mean shape's RMSE on the same scans (every one, or not)."""
    summary = {}
    for method, table in rows.groupby("method", sort=False):
        values = table["rmse_mm"].to_numpy(dtype=np.float64)
        beating = int((values < mean_shape_rmse).sum())
        summary[str(method)] = {
            "n_seeds": int(len(values)),
            "init_seeds": [int(s) for s in table["init_seed"]],
            "default_init_seed": int(table["init_seed"].iloc[0]),
            "default_rmse_mm": float(values[0]),
            "mean_rmse_mm": float(values.mean()),
            "sd_rmse_mm": float(values.std(ddof=1)) if len(values) > 1 else None,
            "min_rmse_mm": float(values.min()),
            "max_rmse_mm": float(values.max()),
            "range_mm": float(values.max() - values.min()),
            "mean_shape_rmse_mm": float(mean_shape_rmse),
            "seeds_beating_mean_shape": beating,
            "every_seed_beats_mean_shape": beating == len(values),
        }
    return summary


def _run_dirs(layout: DatasetLayout, method: str, seed: int, default: int) -> tuple[Path, Path]:
    """(model folder, predictions.csv) of one method and init seed: the default run's for its own seed."""
    if seed == default:
        return layout.model_dir(method), layout.predictions_csv(method)
    return layout.seed_model_dir(seed, method), layout.seed_predictions_csv(seed, method)


def _read_card(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the model card ({error})") from None


def _check_same_data(card: dict, main: dict, where: Path, main_where: Path) -> None:
    """A seed's run must differ from the default run in its init seed only."""
    differing = [key for key in SAME_DATA if card.get(key) != main.get(key)]
    differing += [f"engine.{key}" for key in SAME_ENGINE if card["engine"].get(key) != main["engine"].get(key)]
    if differing:
        raise ValueError(f"{where} was trained with other {', '.join(differing)} than {main_where}: a seed spread "
                         f"varies the init seed alone; retrain it (snakemake reruns it when its inputs changed)")


def _host(model_dir: Path) -> dict | None:
    """The training step's host, from its provenance sidecar (None without one)."""
    sidecar = model_dir / "provenance.json"
    if not sidecar.exists():
        return None
    host = read_sidecar(sidecar).get("host") or {}
    return {key: host.get(key) for key in ("name", "platform", "cpus", "cpu_kernels", "cuda_device")}


def collect(dataset_dir, methods, seeds, shape_space: dict) -> tuple[pd.DataFrame, list[dict], dict, int]:
    """The spread's rows (COLUMNS), one record per run (with its model card's device facts and its
    training host), the per-scan errors (each method's (seeds, scans) array, its world-frame one under
    "{method} (world)", and the mean shape's per scan under MEAN_SHAPE) and the number of test scans. Each
    method's default init seed is read from its default run's model card; `seeds` are the extra ones (that
    seed among them is the default run)."""
    layout = DatasetLayout(dataset_dir)
    cohort = load_test_cohort(layout.root)
    n_points = cohort.true_local.shape[1]
    baselines, _ = baseline_shapes(cohort, shape_space)
    errors = {MEAN_SHAPE: rmse(baselines[MEAN_SHAPE], cohort.true_local)}
    world_errors: dict[str, list] = {}
    rows, runs = [], []
    for method in methods:
        main = _read_card(layout.model_card(method))
        if main.get("method") != method:
            raise ValueError(f"{layout.model_card(method)}: a card of method {main.get('method')!r}, not {method!r}")
        default = card_init_seed(main)
        for seed in dict.fromkeys([default, *map(int, seeds)]):
            model_dir, predictions = _run_dirs(layout, method, seed, default)
            card = main if seed == default else _read_card(model_dir / "model_card.json")
            if card_init_seed(card) != seed or card.get("method") != method:
                raise ValueError(f"{model_dir}: its model card is of method {card.get('method')!r} with init seed "
                                 f"{card_init_seed(card)}, not {method!r} with {seed}")
            if seed != default:
                _check_same_data(card, main, model_dir, layout.model_dir(method))
            predicted = read_predictions(predictions, cohort.ids, n_points)
            per_scan = rmse(predicted, cohort.true_local)
            errors.setdefault(method, []).append(per_scan)
            world = read_predictions(predictions, cohort.ids, n_points, column="world_particles")
            world_errors.setdefault(method, []).append(rmse(world, cohort.true_world))
            value = float(per_scan.mean())
            rows.append({"method": method, "init_seed": seed, "rmse_mm": value, "best_epoch": int(card["best_epoch"])})
            runs.append({**rows[-1], "default_run": seed == default,
                         "model_dir": str(model_dir.relative_to(layout.root)),
                         "device_facts": card.get("device_facts"), "host": _host(model_dir)})
    errors.update({m: np.stack(errors[m]) for m in methods})
    errors.update({f"{m} (world)": np.stack(world_errors[m]) for m in methods})
    return pd.DataFrame(rows, columns=list(COLUMNS)), runs, errors, len(cohort.ids)


def _machines(runs: list[dict]) -> list[dict]:
    """The distinct machines (host, device, CPU kernels, torch) that trained the runs."""
    seen = {}
    for run in runs:
        facts, host = run["device_facts"] or {}, run["host"] or {}
        machine = {"host": host.get("name"), "platform": host.get("platform"), "device": facts.get("device"),
                   "device_name": facts.get("name"), "cpu_kernels": facts.get("cpu_kernels", host.get("cpu_kernels")),
                   "torch": facts.get("torch"), "cuda": facts.get("cuda")}
        seen.setdefault(json.dumps(machine, sort_keys=True), machine)
    return list(seen.values())


def write_spread(dataset_dir, methods, seeds, shape_space: dict, out_dir) -> dict:
    """Write spread.csv, spread.json and spread.png into out_dir (results/{dataset}/seeds) atomically;
    return spread.json's content. See `collect` for `methods` and `seeds`."""
    rows, runs, errors, n_scans = collect(dataset_dir, methods, seeds, shape_space)
    mean_shape = float(errors[MEAN_SHAPE].mean())
    machines = _machines(runs)
    summary = summarize(rows, mean_shape)
    for method in summary:
        low, high = seeds_scans_interval(errors[method])
        world = errors[f"{method} (world)"]
        world_low, world_high = seeds_scans_interval(world)
        summary[method].update({"rmse_low_mm": low, "rmse_high_mm": high, "world_rmse_mm": float(world.mean()),
                                "world_rmse_low_mm": world_low, "world_rmse_high_mm": world_high,
                                "interval": "95 % percentile bootstrap over init seeds x test scans"})
    # a paired comparison needs the same seeds on both sides: methods of other seed counts are left out
    counts = {m: len(errors[m]) for m in methods}
    most = max(counts.values(), default=0)
    compared = [m for m in methods if counts[m] == most]
    paired = paired_comparisons(errors, comparison_pairs(compared, [MEAN_SHAPE]))
    record = {
        "measure": f"test RMSE (paper eq. 12, mm, each scan's own frame), mean over the {n_scans} test scans, "
                   "as in the evaluation",
        "varies": "the init seed alone: the network's initialisation (torch.manual_seed) and the batch order",
        "fixed": "the data: augmentation and validation split follow the dataset's training.seed, as in the "
                 "default run, whose model is each method's first seed",
        "n_test_scans": n_scans,
        "mean_shape_rmse_mm": mean_shape,
        "methods": summary,
        "paired": {
            "measure": "mean over init seeds and test scans of method minus `against` (scan-frame RMSE, eq. 12, mm), "
                       "bootstrapped over seeds x scans, Holm-adjusted over every comparison listed",
            "left_out": [m for m in methods if m not in compared],
            "comparisons": [{key: _json_value(value) for key, value in row.items()}
                            for row in paired.to_dict("records")]},
        # a spread is compared with a result of another machine through these: the runs' CPU kernels,
        # devices and torch versions (one machine: a spread of the seed alone)
        "training_machines": machines,
        "one_machine": len(machines) == 1,
        "runs": runs,
    }
    with staged(out_dir, OUTPUTS) as staging:
        rows.to_csv(staging / "spread.csv", index=False)
        (staging / "spread.json").write_text(json.dumps(record, indent=2) + "\n")
        spread_figure(rows, record["methods"], mean_shape, n_scans, staging / "spread.png")
    return record


def _json_value(value):
    """A table cell as JSON: NaN as null, numpy scalars as Python ones."""
    if isinstance(value, (float, np.floating)):
        return None if value != value else float(value)
    return value.item() if isinstance(value, np.generic) else value


def spread_figure(rows: pd.DataFrame, summary: dict, mean_shape: float, n_scans: int, path) -> None:
    """Per method, each seed's test RMSE (the default run's as a diamond) with the mean ± SD over the
    seeds beside them; the mean shape's RMSE as a dashed line."""
    from .plotting import POINT_COLOR, figure, save_figure

    names = list(summary)
    fig, axes = figure(1, 1, cell=(max(3.5, 1.3 * len(names) + 1.5), 3.4))
    ax = axes[0, 0]
    for x, method in enumerate(names):
        table = rows[rows["method"] == method]
        values = table["rmse_mm"].to_numpy(dtype=np.float64)
        offsets = np.linspace(-0.18, 0.18, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(x - 0.1 + offsets[1:], values[1:], s=18, color=POINT_COLOR, zorder=3,
                   label="another init seed" if x == 0 else None)
        ax.scatter([x - 0.1 + offsets[0]], values[:1], s=40, marker="D", facecolor="white", edgecolor=POINT_COLOR,
                   zorder=4, label="the default run" if x == 0 else None)
        sd = summary[method]["sd_rmse_mm"]
        ax.errorbar([x + 0.28], [summary[method]["mean_rmse_mm"]], yerr=[sd or 0.0], fmt="o", color="black",
                    capsize=4, markersize=4, label="mean ± SD over seeds" if x == 0 else None)
    ax.axhline(mean_shape, color="black", linestyle="--", linewidth=1, label="mean shape")
    ax.set_xticks(range(len(names)), [f"{m}\n(n = {summary[m]['n_seeds']})" for m in names])
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(f"test RMSE (mm, eq. 12, mean of {n_scans} scans)")
    ax.set_title("Test RMSE over init seeds (data fixed)")
    ax.legend(frameon=False, fontsize=7, loc="best")
    save_figure(fig, path)
