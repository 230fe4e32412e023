"""The paper preset's network grids are the papers' input sizes, and its synthetic shapes fit them.

Checked from config/paper.yaml alone, without building a cohort (no images): the planned
subjects' shapes come from the generator's shape model (`synthetic.cohort.world_shapes`,
the cohort's own parameters and random streams), on a template meshed at 2 mm at most."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import REPO
from deepssm_workflow.preprocess import WorldGrid
from deepssm_workflow.synthetic.cohort import SyntheticSettings, build_anatomy, world_shapes

# the papers' input sizes (voxels) and voxel sizes (mm)
PAPER = {"femur": ((65, 46, 58), 2.0), "metopic": ((69, 51, 66), 4.0), "left_atrium": ((118, 69, 88), 1.25)}
# as x, y, z of the generator's world frames: the left atrium's 118 lies along y, the synthetic
# atrium's deepest axis (veins posterior, appendage anterior); see config/paper.yaml
AXES = {"femur": (65, 46, 58), "metopic": (69, 51, 66), "left_atrium": (88, 118, 69)}
# coarser templates, for speed: the training shapes' bounding box on them differs from that of
# the cohorts' particles (1024 vertices of a 1 or 2 mm mesh) by at most 0.3 mm per side at 2 mm
# and 0.9 mm at 4 mm (the metopic vaults, 27 mm or more from every side of their grid), which
# the tolerance, added to the margin, covers
MESH_MM = {"femur": 2.0, "metopic": 4.0, "left_atrium": 2.0}
TOLERANCE_MM = 1.0


@pytest.fixture(scope="module")
def paper():
    """The preset as written (test_config.py checks it against the schema)."""
    return yaml.safe_load((REPO / "config" / "paper.yaml").read_text())["datasets"]


@pytest.fixture(scope="module")
def shapes(paper):
    """Per dataset: the plan (id, split, group) and the world-frame shapes of every planned subject."""
    made = {}

    def make(name):
        if name not in made:
            settings = SyntheticSettings.from_config(paper[name]["synthetic"])
            anatomy = build_anatomy(name, settings, max(settings.mesh_resolution_mm, MESH_MM[name]))
            made[name] = world_shapes(anatomy, settings)
        return made[name]

    return make


def spacing(entry) -> float:
    raw = entry["synthetic"]["spacing_mm"]
    return entry["preprocess"]["downsample"] * min(raw if isinstance(raw, list) else [raw])


@pytest.mark.parametrize("name", list(PAPER))
def test_the_grid_is_the_papers_input(paper, name):
    size, voxel = PAPER[name]
    configured = tuple(paper[name]["preprocess"]["grid_size"])
    assert configured == AXES[name] and sorted(configured) == sorted(size)
    assert spacing(paper[name]) == pytest.approx(voxel)


@pytest.mark.parametrize("name", list(PAPER))
def test_the_shapes_plus_the_margin_fit_the_grid(paper, shapes, name):
    entry = paper[name]
    plan, world = shapes(name)
    train = np.concatenate([w for w, split in zip(world, plan["split"]) if split == "train"])
    size, margin = tuple(entry["preprocess"]["grid_size"]), entry["preprocess"]["margin_mm"]
    # what preprocessing does with the training shapes, with the tolerance added to the margin
    grid = WorldGrid.around(train, spacing(entry), margin + TOLERANCE_MM, size)
    assert grid.size == size
    # and the test subjects, registered into the same grid, lie inside it too
    lower = np.array(grid.origin)
    upper = lower + np.array(grid.spacing) * (np.array(size) - 1)
    every = np.concatenate(world)
    assert np.all(every.min(0) >= lower) and np.all(every.max(0) <= upper)


def test_the_paper_shapes_are_cut_to_fit_and_the_demos_are_not(paper):
    """The paper preset shortens the femur's shaft and the atrium's veins; the demo keeps the
    generator's own extents."""
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["datasets"]
    assert all("extent" not in entry["synthetic"] for entry in demo.values())
    femur = build_anatomy("femur", SyntheticSettings.from_config(paper["femur"]["synthetic"]), 4.0)
    assert femur.template.vertices[:, 2].min() > -22.0  # the cut through the lesser trochanter (z -30 to -10)
    atrium = build_anatomy("left_atrium", SyntheticSettings.from_config(paper["left_atrium"]["synthetic"]), 4.0)
    assert atrium.vein_length_scale == 0.6


def test_an_extent_setting_of_another_anatomy_is_refused_and_the_defaults_change_nothing():
    with pytest.raises(ValueError, match=r"synthetic.extent.vein_length_scale: not a setting of the femur; "
                                         r"its extent settings: shaft_length_mm"):
        build_anatomy("femur", {"mesh_resolution_mm": 4.0, "extent": {"vein_length_scale": 0.5}})
    for name, extent in (("femur", {"shaft_length_mm": 65}), ("left_atrium", {"vein_length_scale": 1})):
        stated = build_anatomy(name, {"mesh_resolution_mm": 4.0, "extent": extent}).template
        own = build_anatomy(name, {"mesh_resolution_mm": 4.0}).template
        assert np.array_equal(stated.vertices, own.vertices) and np.array_equal(stated.faces, own.faces)
