"""A sealed test draw (synthetic.test_seed): fresh test subjects, training subjects untouched."""

import numpy as np

from conftest import tiny_settings
from deepssm_workflow.report import headline_draw
from deepssm_workflow.synthetic.cohort import build_anatomy, draw_description, subject_entropy, world_shapes


def _shapes(settings):
    plan, shapes = world_shapes(build_anatomy("femur", settings), settings)
    return plan, np.stack(shapes)


def test_a_test_seed_redraws_the_test_subjects_alone():
    before = tiny_settings("femur")
    plan, old = _shapes(before)
    _, new = _shapes(tiny_settings("femur", test_seed=7))
    _, again = _shapes(tiny_settings("femur", test_seed=7))
    train, test = (plan["split"] == "train").to_numpy(), (plan["split"] == "test").to_numpy()
    assert train.any() and test.any()
    np.testing.assert_array_equal(new[train], old[train])  # training subjects byte-identical
    assert all(np.abs(new[k] - old[k]).max() > 1e-3 for k in np.flatnonzero(test))  # every test subject anew
    np.testing.assert_array_equal(new, again)  # and the draw is reproducible


def test_the_draw_is_named_and_streams_never_collide():
    assert draw_description(1, 7) == "generator seed 1, test seed 7"
    assert "drawn with the training subjects" in draw_description(1, None)
    assert "test seed 1" in headline_draw({"synthetic": {"seed": 3, "test_seed": 1}})
    assert headline_draw({"source": "manifest"}) == "the cohort's own test split"
    streams = {tuple(subject_entropy(1, test_seed, index, split)) for test_seed in (None, 0, 1)
               for index in range(50) for split in ("train", "test")}
    # (seed, index) streams for training (and test subjects without a test seed), 50 more per test seed; numpy
    # pads seeds with zeros, so no stream may be another's with zeros appended
    stripped = {tuple(np.trim_zeros(np.array(s), "b")) for s in streams}
    assert len(stripped) == len(streams) == 50 + 2 * 50
