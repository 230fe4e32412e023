"""Checks of the workflow configuration that a JSON schema cannot express.

The schema (workflow/schemas/config.schema.yaml) rejects unknown keys and wrong
types; these checks know the anatomies: a dataset name that is not an anatomy
needs an explicit `anatomy`, and group names must be the anatomy's groups.
Every message starts with the dotted path of the offending key.
"""

from __future__ import annotations

from dataclasses import dataclass

from .synthetic.registry import ANATOMIES, GROUPS


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Dataset:
    name: str
    anatomy: str
    source: str


def check(config: dict) -> dict[str, Dataset]:
    """Validate the semantic parts of a schema-valid config; return the datasets by name."""
    datasets = {}
    for name, entry in config["datasets"].items():
        key = f"datasets.{name}"
        anatomy = entry.get("anatomy", name)
        if anatomy not in ANATOMIES:
            raise ConfigError(f"{key}: unknown dataset {name!r}: not one of {', '.join(ANATOMIES)}; "
                              f"a cohort with another name must set `anatomy:`")
        if entry["source"] == "synthetic":
            _check_synthetic(f"{key}.synthetic", anatomy, entry["synthetic"])
        datasets[name] = Dataset(name, anatomy, entry["source"])
    return datasets


def _check_synthetic(key: str, anatomy: str, settings: dict) -> None:
    groups = GROUPS[anatomy]
    for split, counts in settings["subjects"].items():
        for group in counts:
            if group not in groups:
                raise ConfigError(f"{key}.subjects.{split}.{group}: {anatomy} has no group {group!r}; "
                                  f"its groups are {', '.join(groups)}")
    n_train = sum(settings["subjects"]["train"].values())
    n_test = sum(settings["subjects"]["test"].values())
    if n_train < 3:
        raise ConfigError(f"{key}.subjects.train: {n_train} training subjects; a shape model needs at least 3")
    if n_test < 1:
        raise ConfigError(f"{key}.subjects.test: no test subjects; at least 1 is needed for evaluation")
