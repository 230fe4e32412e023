"""The clinical studies by name: what each needs from the subjects table, and which anatomy it
was written for. The one list of study names: the config check, ingestion and the command
line take their choices from here. Imports nothing heavy (the command line reads it).

A dataset's `study` (config) picks one of these, or `none`; by default the study of its
anatomy when the anatomy has one (femur -> cam_fai, metopic -> metopic_severity,
left_atrium -> af_recurrence), else none.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Study:
    name: str
    module: str  # deepssm_workflow.studies.<module>; also the key of its block in summary.json
    anatomy: str  # the anatomy it was written for: the default study of a dataset of that anatomy
    title: str
    # `group` values it compares: the column must exist, every value must be one of these (matched
    # case-insensitively, stored lower-case), and each must occur
    groups: tuple[str, ...] = ()
    # covariate column -> its allowed levels (every subject must have one)
    covariates: dict[str, tuple[str, ...]] = field(default_factory=dict)


STUDIES = {
    study.name: study
    for study in (
        Study("cam_fai", "femur", "femur", "cam-FAI versus control: group difference of femur shape",
              groups=("control", "cam")),
        Study("metopic_severity", "metopic", "metopic", "metopic craniosynostosis severity (PPCA Mahalanobis "
              "distance) against expert ratings and diagnosis", groups=("control", "metopic")),
        Study("af_recurrence", "left_atrium", "left_atrium", "atrial-fibrillation recurrence predicted from "
              "left-atrium shape (MLP)", covariates={"af_recurrence": ("0", "1")}),
    )
}
NO_STUDY = "none"
CHOICES = (*STUDIES, NO_STUDY)  # the values of a dataset's `study`


def default_study(anatomy: str) -> str:
    """The study written for this anatomy, or `none`."""
    return next((s.name for s in STUDIES.values() if s.anatomy == anatomy), NO_STUDY)


def study_named(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(f"no study {name!r}; the studies are {', '.join(STUDIES)}")
    return STUDIES[name]
