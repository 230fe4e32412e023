"""Checks of the workflow configuration that a JSON schema cannot express.

The schema (workflow/schemas/config.schema.yaml) rejects unknown keys and wrong
types; these checks know the anatomies: a dataset name that is not an anatomy
needs an explicit `anatomy`, and group names must be the anatomy's groups.
Every message starts with the dotted path of the offending key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from .synthetic.registry import ANATOMIES, GROUPS


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Dataset:
    name: str
    anatomy: str
    source: str


def schema_errors(config: dict, schema_path) -> list[str]:
    """Schema violations as one line each, starting with the dotted key that is wrong."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    messages = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        key = ".".join(map(str, error.absolute_path)) or "<top level>"
        if error.validator == "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            for unknown in sorted(set(error.instance) - set(allowed)):
                messages.append(f"{key}.{unknown}: unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else ""))
        elif error.validator == "required":
            missing = error.message.split("'")[1]
            messages.append(f"{key}.{missing}: required key is missing")
        elif error.validator == "propertyNames":
            messages.append(f"{key}: invalid name {error.instance!r} (lower case letters, digits, underscores)")
        else:
            messages.append(f"{key}: {error.message}")
    return messages


def load(config: dict, schema_path) -> dict[str, "Dataset"]:
    """Validate a config (schema, then semantics); raise ConfigError naming every bad key."""
    messages = schema_errors(config, schema_path)
    if messages:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(messages))
    return check(config)


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
