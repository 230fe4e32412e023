"""What the studies read from a dataset's results folder: the ingested cohort (ground-truth
PDM, groups, meshes) and each variant's predicted test shapes, checked on the way in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import read_particles, resolve
from ..train import load_model
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
    def table_path(self) -> Path:
        return self.dataset_dir / "cohort" / "subjects.csv"

    @property
    def all(self) -> Shapes:
        return Shapes(np.concatenate([self.train.ids, self.test.ids]), np.concatenate([self.train.world, self.test.world]))

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
    table = dataset_dir / "cohort" / "subjects.csv"
    if not table.is_file():
        raise ValueError(f"{table}: the ingested subjects table is missing (run the ingest_cohort rule)")
    subjects = pd.read_csv(table, dtype={"id": str}).set_index("id")
    arrays = {}
    for split in ("train", "test"):
        path = dataset_dir / "cohort" / f"shapes_{split}.npz"
        if not path.is_file():
            raise ValueError(f"{path}: missing (run the ingest_cohort rule)")
        with np.load(path) as data:
            ids = data["ids"].astype(str)
            arrays[split] = (Shapes(ids, data["world"].astype(np.float64)), data["image_to_world"])
        unknown = [i for i in ids if i not in subjects.index]
        if unknown:
            raise ValueError(f"{path}: subject {unknown[0]} is not in {table}")
    return Cohort(dataset_dir, subjects, arrays["train"][0], arrays["test"][0], arrays["train"][1])


def predicted_shapes(dataset_dir, variant: str, ids) -> Shapes:
    """The variant's predicted world-frame shapes of `ids` (test subjects), in that order."""
    folder = Path(dataset_dir) / "predictions" / variant
    table_path = folder / "predictions.csv"
    if not table_path.is_file():
        raise ValueError(f"{table_path}: no predictions for variant {variant!r}")
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


def available_variants(dataset_dir, variants) -> list[str]:
    """The requested variants that have a predictions folder."""
    return [v for v in variants if (Path(dataset_dir) / "predictions" / v / "predictions.csv").is_file()]


def variant_model(dataset_dir, variant: str):
    """The trained model of a variant (results/{dataset}/models/{variant})."""
    folder = Path(dataset_dir) / "models" / variant
    if not (folder / "model.pt").is_file() or not (folder / "model_card.json").is_file():
        raise ValueError(f"{folder}: the trained {variant} model (model.pt, model_card.json) is missing")
    return load_model(folder)
