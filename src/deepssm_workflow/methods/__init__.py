"""The registry of image-to-shape methods: the one place that knows which methods exist.

    register(name, method, fixed={}, default=True)   add a method (or a preset of one)
    get(name) -> Registered                           by config / CLI / model-card name
    names(default_only=False) -> list of names, in registration order

A registered name is a method with some settings fixed: `base_focal` is Base-DeepSSM with
the focal loss. The CLI's choices, the config schema's method blocks and the rules'
wildcard constraints all come from here; a model card names its method, and loading goes
through `get(card["method"])`. A new method is one module that calls `register` and is
imported at the bottom of this file.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field

import jsonschema

from .interface import (  # noqa: F401 (the interface, re-exported)
    AUGMENTATION,
    CAPABILITIES,
    CORRESPONDENCES,
    LANDMARKS,
    LATENT_CODE,
    LOCALIZES,
    MULTI_ANATOMY,
    NEEDS,
    PCA_SCORES,
    SCALES,
    SCANS,
    SEGMENTATION,
    SEGMENTATIONS,
    SHAPES,
    TRAINING_IMAGES,
    Batch,
    DataSpec,
    Method,
    Phase,
    TrainingData,
    learns_without_shapes,
)

NAME_PATTERN = "^[a-z][a-z0-9_]*$"


@dataclass(frozen=True)
class Registered:
    name: str
    method: Method
    fixed: dict = field(default_factory=dict)  # settings this name pins, absent from its config block
    default: bool = True                       # trained by a dataset that lists no `methods`

    def schema(self) -> dict:
        """JSON schema of this name's config block (closed: a misspelt key fails)."""
        properties = {k: v for k, v in self.method.schema.items() if k not in self.fixed}
        return {"type": "object", "additionalProperties": False, "properties": copy.deepcopy(properties),
                "description": self.method.summary}

    def settings(self, block: dict | None = None):
        """The method's Settings from a config block: schema defaults filled in, the fixed
        settings added, then validated by the schema and by the method's own checks."""
        block = dict(block or {})
        errors = sorted(jsonschema.Draft202012Validator(self.schema()).iter_errors(block), key=str)
        if errors:
            raise ValueError(f"method {self.name}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path)) or 'settings'}: {e.message}" for e in errors))
        values = {k: copy.deepcopy(v["default"]) for k, v in self.method.schema.items() if "default" in v}
        values.update(block)
        values.update(self.fixed)
        settings = self.method.Settings(**values)
        problems = self.method.check(settings)
        if problems:
            raise ValueError(f"method {self.name}: " + "; ".join(problems))
        return settings

    def smoke_settings(self):
        """The method's `smoke` settings (less what this name fixes): the smallest run of every phase."""
        return self.settings({k: v for k, v in self.method.smoke.items() if k not in self.fixed})

    def has(self, capability: str) -> bool:
        return capability in self.method.capabilities


_REGISTRY: dict[str, Registered] = {}


def register(name: str, method: Method, fixed: dict | None = None, default: bool = True) -> Registered:
    if not re.match(NAME_PATTERN, name):
        raise ValueError(f"method name {name!r} must match {NAME_PATTERN}")
    if name in _REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    fields = {f.name for f in dataclasses.fields(method.Settings)}
    unknown = set(method.schema) ^ fields
    if unknown:
        raise ValueError(f"method {name!r}: schema and Settings disagree on {', '.join(sorted(unknown))}")
    bad = set(fixed or {}) - fields
    if bad:
        raise ValueError(f"method {name!r}: fixed settings {', '.join(sorted(bad))} are not settings of the method")
    for capability in method.capabilities:
        if capability not in CAPABILITIES:
            raise ValueError(f"method {name!r}: unknown capability {capability!r}")
    entry = Registered(name, method, dict(fixed or {}), default)
    _REGISTRY[name] = entry
    return entry


def unregister(name: str) -> None:
    """For tests that register a toy method."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Registered:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_REGISTRY)}") from None


def names(default_only: bool = False) -> list[str]:
    return [name for name, entry in _REGISTRY.items() if entry.default or not default_only]


def config_schema() -> dict:
    """The `methods` block of a dataset: one optional block per registered name; the default
    is every default name with its schema defaults."""
    return {"type": "object", "additionalProperties": False, "minProperties": 1,
            "description": "Methods to train, evaluate and report, each with its settings.",
            "properties": {name: entry.schema() for name, entry in _REGISTRY.items()},
            "default": {name: {} for name in names(default_only=True)}}


# the method modules register their names (base, base_focal, tl, tl_focal; progressive, progressive_focal, ...;
# image2ssm; landmarks; massm)
from . import deepssm, image2ssm, landmarks, massm, progressive  # noqa: E402,F401
