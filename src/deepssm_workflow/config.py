"""Defaults and checks of the workflow configuration.

The schema (workflow/schemas/config.schema.yaml) rejects unknown keys and wrong
types and gives the defaults, which `load` writes into the config (so the rules see
them); a `shape_space` block with neither `n_modes` nor `variance` gets variance 0.99
(done here: a schema default cannot choose one branch of a `oneOf`). The schema of the
`methods` blocks comes from the method registry (`deepssm_workflow.methods`): `$defs.methods`
in the YAML file is a placeholder that `schema` fills. The checks
here know the anatomies and the studies: a synthetic cohort's anatomy must be one
the generator makes, its group names that anatomy's, and a dataset's `study` one
of `studies.registry.CHOICES`. Every message starts with the dotted path of the
offending key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from .studies.registry import CHOICES as STUDY_CHOICES
from .studies.registry import NO_STUDY, default_study
from .synthetic.registry import ANATOMIES, GROUPS

DEFAULT_VARIANCE = 0.99  # a `shape_space` block without n_modes or variance keeps 99 % of the shape variance


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Dataset:
    name: str
    anatomy: str  # any lower-case name; defaults to the dataset's name
    source: str
    study: str = NO_STUDY  # a name of studies.registry.STUDIES, or "none"


def schema(schema_path) -> dict:
    """The config's JSON schema: the YAML file, with the registered methods' blocks filled in."""
    from . import methods

    loaded = yaml.safe_load(Path(schema_path).read_text())
    loaded["$defs"]["methods"] = methods.config_schema()
    return loaded


def fill_defaults(config: dict, schema_path) -> dict:
    """Write the schema's defaults into `config` (in place; also returned): every absent key
    with a `default`, at every level, each a fresh copy; then variance 0.99 in a `shape_space`
    block with neither n_modes nor variance. Parts of the wrong type are left to the checks."""
    full = schema(schema_path)

    def resolve(node: dict) -> dict:
        while "$ref" in node:  # local references only: "#/$defs/name"
            target = full
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            node = target
        return node

    def fill(node: dict, instance) -> None:
        node = resolve(node)
        if not isinstance(instance, dict):
            return
        properties = node.get("properties", {})
        for key, sub in properties.items():
            default = sub if "default" in sub else resolve(sub)  # a default beside a $ref, or in its target
            if key not in instance and "default" in default:
                instance[key] = copy.deepcopy(default["default"])
        for key, value in instance.items():
            if key in properties:
                fill(properties[key], value)
            elif isinstance(node.get("additionalProperties"), dict):
                fill(node["additionalProperties"], value)

    fill(full, config)
    for entry in (config.get("datasets") or {}).values() if isinstance(config, dict) else ():
        space = entry.get("shape_space") if isinstance(entry, dict) else None
        if isinstance(space, dict) and "n_modes" not in space and "variance" not in space:
            space["variance"] = DEFAULT_VARIANCE
    return config


def schema_errors(config: dict, schema_path) -> list[str]:
    """Schema violations as one line each, starting with the dotted key that is wrong."""
    full = schema(schema_path)
    validator = jsonschema.Draft202012Validator(full)
    messages = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        key = ".".join(map(str, error.absolute_path)) or "<top level>"
        if error.validator == "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            for unknown in sorted(set(error.instance) - set(allowed)):
                listed = f" (allowed: {', '.join(allowed)})" if allowed else ""
                messages.append(f"{key}.{unknown}: unknown key{listed}")
        elif error.validator == "required":
            missing = error.message.split("'")[1]
            messages.append(f"{key}.{missing}: required key is missing")
        elif error.validator == "propertyNames":
            messages.append(f"{key}: invalid name {error.instance!r} (lower case letters, digits, underscores)")
        elif error.validator == "anyOf" and all(set(b) == {"required"} for b in error.validator_value):
            names = [name for b in error.validator_value for name in b["required"]]
            messages.append(f"{key}: give {' or '.join(names)} (or both): there is nothing to run")
        elif error.validator == "oneOf":
            messages.append(f"{key}: {_one_of_message(error)}")
        else:
            messages.append(f"{key}: {error.message}")
    return messages


def _one_of_message(error) -> str:
    """A failed `oneOf` said as what to add or remove: "give exactly one of n_modes or variance
    (found both)" for alternatives of required keys, else each allowed form and why it fails."""
    branches = error.validator_value
    if all(set(b) == {"required"} and len(b["required"]) == 1 for b in branches):
        names = [b["required"][0] for b in branches]
        found = [n for n in names if isinstance(error.instance, dict) and n in error.instance]
        said = "neither" if not found else ("both" if len(found) == len(names) == 2 else ", ".join(found))
        return f"give exactly one of {' or '.join(names)} (found {said})"
    forms = []
    for index, branch in enumerate(branches):
        kind = branch.get("type", "value")
        why = [e.message for e in error.context if e.relative_schema_path and e.relative_schema_path[0] == index]
        forms.append(f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}" + (f" ({'; '.join(why)})" if why else ""))
    return f"{error.instance!r} is none of the allowed forms: " + ", or ".join(forms)


def load(config: dict, schema_path) -> dict[str, "Dataset"]:
    """Fill the schema's defaults into `config` (in place), validate it (schema, then semantics)
    and return the datasets by name; raise ConfigError naming every bad key."""
    fill_defaults(config, schema_path)
    messages = schema_errors(config, schema_path)
    if messages:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(messages))
    return check(config)


def effective_settings(config: dict, schema_path, dataset: str | None = None) -> dict:
    """What training will use, per dataset: the shape space, the engine's settings and each
    listed method's full settings (defaults and a preset's fixed settings filled in)."""
    from dataclasses import asdict

    from . import methods

    config = copy.deepcopy(config)
    load(config, schema_path)
    # a multi-anatomy dataset has no shape space of its own: each method keeps its templates
    entries = {**config.get("datasets", {}), **(config.get("multi_anatomy") or {})}
    if dataset is not None and dataset not in entries:
        raise ConfigError(f"no dataset {dataset!r} in the config (it has {', '.join(entries)})")
    return {name: {**({"shape_space": entry["shape_space"]} if "shape_space" in entry else {}),
                   "training": entry["training"],
                   "methods": {m: asdict(methods.get(m).settings(block)) for m, block in entry["methods"].items()}}
            for name, entry in entries.items() if dataset in (None, name)}


def check(config: dict) -> dict[str, Dataset]:
    """Validate the semantic parts of a schema-valid config; return the datasets by name."""
    from . import methods

    datasets = {}
    for name, entry in (config.get("multi_anatomy") or {}).items():
        _check_multi_anatomy(f"multi_anatomy.{name}", entry, config.get("datasets") or {})
    for name, entry in (config.get("datasets") or {}).items():
        key = f"datasets.{name}"
        anatomy = entry.get("anatomy", name)
        study = entry.get("study", default_study(anatomy))
        if study not in STUDY_CHOICES:
            raise ConfigError(f"{key}.study: unknown study {study!r}; choose one of {', '.join(STUDY_CHOICES)}")
        if entry["source"] == "synthetic":
            if anatomy not in ANATOMIES:
                where = f"{key}.anatomy" if "anatomy" in entry else f"{key}: unknown dataset {name!r}"
                raise ConfigError(f"{where}: a synthetic cohort's anatomy (default: the dataset's name) must be one "
                                  f"the generator makes: {', '.join(ANATOMIES)}; a cohort of another anatomy needs "
                                  f"source csv or shapeworks (a synthetic dataset of another name sets `anatomy:`)")
            if study not in (NO_STUDY, default_study(anatomy)):
                raise ConfigError(f"{key}.study: a synthetic {anatomy} cohort has the labels of its own study "
                                  f"({default_study(anatomy)}) only; choose that or none, not {study}")
            _check_synthetic(f"{key}.synthetic", anatomy, entry["synthetic"])
        for method, block in entry["methods"].items():
            try:
                methods.get(method).settings(block)
            except ValueError as error:  # a method's own checks (the schema has passed)
                raise ConfigError(f"{key}.methods.{method}: {str(error).removeprefix(f'method {method}: ')}") from None
        datasets[name] = Dataset(name, anatomy, entry["source"], study)
    return datasets


def _check_multi_anatomy(key: str, entry: dict, single: dict) -> None:
    """A multi-anatomy dataset: its own name, its source's keys, the generator's settings and multi-anatomy methods."""
    from . import methods
    from .synthetic.multi_anatomy import MultiAnatomySettings

    name = key.rsplit(".", 1)[1]
    if name in single:
        raise ConfigError(f"{key}: {name!r} is also a dataset of `datasets`; the two share results/{name}/: "
                          f"rename one")
    needed = {"synthetic": "synthetic", "csv": "manifest", "shapeworks": "project"}[entry["source"]]
    if needed not in entry:
        raise ConfigError(f"{key}.{needed}: required for source {entry['source']}")
    if entry["source"] == "synthetic":
        try:
            MultiAnatomySettings.from_config(entry["synthetic"])
        except ValueError as error:
            raise ConfigError(f"{key}.synthetic: {str(error).removeprefix('multi_anatomy.')}") from None
        n_train = sum(entry["synthetic"]["subjects"]["train"].values())
        n_test = sum(entry["synthetic"]["subjects"]["test"].values())
        if n_train < 3 or n_test < 1:
            raise ConfigError(f"{key}.synthetic.subjects: {n_train} training and {n_test} test subjects; at least "
                              f"3 and 1 are needed")
    for method, block in entry["methods"].items():
        if not methods.get(method).has(methods.MULTI_ANATOMY):
            multi = [m for m in methods.names() if methods.get(m).has(methods.MULTI_ANATOMY)]
            raise ConfigError(f"{key}.methods.{method}: predicts one anatomy per scan; a multi-anatomy dataset "
                              f"trains {', '.join(multi)}")
        try:
            methods.get(method).settings(block)
        except ValueError as error:
            raise ConfigError(f"{key}.methods.{method}: {str(error).removeprefix(f'method {method}: ')}") from None


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
