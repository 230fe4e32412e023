"""What the studies read from a dataset's results folder: the ingested cohort (ground-truth
PDM, groups, meshes) and each method's predicted test shapes, checked on the way in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..inference import Trained, load_trained
from ..io import read_particles, resolve
from ..layout import DatasetLayout
from ..surface import TemplateMesh, template_from_training


@dataclass
class Shapes:
    """World-frame correspondences of some subjects: ids (N,), world (N, M, 3)."""

    ids: np.ndarray
    world: np.ndarray

    def subset(self, mask) -> "Shapes":
        mask = np.asarray(mask, dtype=bool)
        return Shapes(self.ids[mask], self.world[mask])

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Cohort:
    dataset_dir: Path
    subjects: pd.DataFrame  # cohort/subjects.csv indexed by id
    train: Shapes
    test: Shapes
    train_image_to_world: np.ndarray

    @property
    def layout(self) -> DatasetLayout:
        return DatasetLayout(self.dataset_dir)

    @property
    def table_path(self) -> Path:
        return self.layout.subjects_csv

    @property
    def all(self) -> Shapes:
        return Shapes(np.concatenate([self.train.ids, self.test.ids]),
                      np.concatenate([self.train.world, self.test.world]))

    def column(self, ids, name: str) -> np.ndarray:
        if name not in self.subjects.columns:
            raise ValueError(f"{self.table_path}: no column {name!r}, which this study needs")
        values = self.subjects.loc[list(ids), name]
        if values.isna().any():
            raise ValueError(f"{self.table_path}: subject {values[values.isna()].index[0]} has no {name}")
        return values.to_numpy()

    def template_mesh(self) -> TemplateMesh:
        """The training subject nearest the mean, its mesh in the world frame (surface.py),
        to be warped onto any mean shape for display."""
        meshes = [str(resolve(self.table_path, m)) if isinstance(m, str) and m else None
                  for m in self.subjects.reindex(self.train.ids).get("mesh", pd.Series(index=self.train.ids))]
        return template_from_training(self.train.ids, self.train.world, self.train_image_to_world, meshes)


def load_cohort(dataset_dir) -> Cohort:
    dataset_dir = Path(dataset_dir)
    layout = DatasetLayout(dataset_dir)
    table = layout.subjects_csv
    if not table.is_file():
        raise ValueError(f"{table}: the ingested subjects table is missing (run the ingest_cohort rule)")
    subjects = pd.read_csv(table, dtype={"id": str}).set_index("id")
    arrays = {}
    for split in ("train", "test"):
        path = layout.shapes(split)
        if not path.is_file():
            raise ValueError(f"{path}: missing (run the ingest_cohort rule)")
        with np.load(path) as data:
            ids = data["ids"].astype(str)
            arrays[split] = (Shapes(ids, data["world"].astype(np.float64)), data["image_to_world"])
        unknown = [i for i in ids if i not in subjects.index]
        if unknown:
            raise ValueError(f"{path}: subject {unknown[0]} is not in {table}")
    return Cohort(dataset_dir, subjects, arrays["train"][0], arrays["test"][0], arrays["train"][1])


def predicted_shapes(dataset_dir, method: str, ids) -> Shapes:
    """The method's predicted world-frame shapes of `ids` (test subjects), in that order."""
    table_path = DatasetLayout(dataset_dir).predictions_csv(method)
    if not table_path.is_file():
        raise ValueError(f"{table_path}: no predictions for method {method!r}")
    table = pd.read_csv(table_path, dtype={"id": str}).set_index("id")
    world = []
    for subject in ids:
        if subject not in table.index:
            raise ValueError(f"{table_path}: no prediction for test subject {subject}")
        path = resolve(table_path, table.loc[subject, "world_particles"])
        if not path.is_file():
            raise ValueError(f"{path}: predicted particles of subject {subject} are missing")
        world.append(read_particles(path))
    world = np.asarray(world)
    if not np.all(np.isfinite(world)):
        bad = int(np.argwhere(~np.isfinite(world).all((1, 2)))[0, 0])
        raise ValueError(f"{table_path}: subject {ids[bad]}'s predicted particles are not finite")
    return Shapes(np.asarray(ids), world)


def available_methods(dataset_dir, methods) -> list[str]:
    """The requested methods that have a predictions folder."""
    layout = DatasetLayout(dataset_dir)
    return [m for m in methods if layout.predictions_csv(m).is_file()]


def trained_model(dataset_dir, method: str) -> Trained:
    """The trained model of a method (results/{dataset}/models/{method}), rebuilt by its method."""
    return load_trained(DatasetLayout(dataset_dir).model_dir(method))
