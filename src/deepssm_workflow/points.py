"""Point-set utilities shared by the generator and the method."""

from __future__ import annotations

import numpy as np


def farthest_point_sampling(points: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` points spread evenly over `points`, in selection order (every
    prefix is itself well spread). Deterministic: starts from the point farthest from the
    centroid, so the result does not depend on the order of `points`."""
    if count > len(points):
        raise ValueError(f"cannot sample {count} points from a mesh with {len(points)} vertices")
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    chosen = np.empty(count, dtype=np.int64)
    chosen[0] = int(np.argmax(((points - points.mean(0)) ** 2).sum(1)))
    nearest = ((points - points[chosen[0]]) ** 2).sum(1)  # squared distance to the chosen set
    for i in range(1, count):
        chosen[i] = int(np.argmax(nearest))
        np.minimum(nearest, ((points - points[chosen[i]]) ** 2).sum(1), out=nearest)
    return chosen
