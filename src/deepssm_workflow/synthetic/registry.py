"""Names of the synthetic anatomies and their classes."""

from __future__ import annotations

# groups of each anatomy's cohort design (the subjects table's `group` column)
GROUPS = {
    "femur": ("control", "cam"),
    "metopic": ("control", "metopic"),
    "left_atrium": ("patient",),  # every subject has AF; recurrence is an outcome, not a design group
}
ANATOMIES = tuple(GROUPS)


def anatomy_class(name: str):
    if name == "femur":
        from .femur import Femur
        return Femur
    if name == "metopic":
        from .metopic import Metopic
        return Metopic
    if name == "left_atrium":
        from .left_atrium import LeftAtrium
        return LeftAtrium
    raise ValueError(f"unknown anatomy {name!r}; choose one of {', '.join(ANATOMIES)}")
