"""Latent swim (paper Figs. 10, 12, for TL-DeepSSM): decode points on the line between two group
means in a method's latent space, C_lambda = h((1 - lambda) mu_a + lambda mu_b), for every
method with the LATENT_CODE capability.

The group means are of the shape codes (TL-DeepSSM: g(C)) of the ground-truth shapes of all
subjects of each group: the latent codes the image network is trained to predict.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..inference import Trained, codes, decode
from . import figures as fig

LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def latent_swim(trained: Trained, shapes_a: np.ndarray, shapes_b: np.ndarray, lambdas=LAMBDAS) -> np.ndarray:
    """(len(lambdas), M, 3): decoded shapes from group a's latent mean (lambda 0) to group b's (1),
    in a trained model with the LATENT_CODE capability."""
    if len(shapes_a) == 0 or len(shapes_b) == 0:
        raise ValueError(f"a latent swim needs both groups; got {len(shapes_a)} and {len(shapes_b)} shapes")
    mu_a, mu_b = (codes(trained.method, trained.model, shapes=s).mean(0) for s in (shapes_a, shapes_b))
    lam = np.asarray(lambdas, dtype=np.float64)[:, None]
    return decode(trained.method, trained.model, (1 - lam) * mu_a + lam * mu_b)


def swim_figure(template, swims: dict[str, np.ndarray], path: Path, lambdas=LAMBDAS) -> None:
    """One row per LATENT_CODE method: the decoded shape at each lambda, coloured by its displacement
    from lambda = 0 along its own outward normal (red outward, blue inward)."""
    meshes = {v: [template.warp(s) for s in shapes] for v, shapes in swims.items()}
    fields = {v: [fig.normal_component(m, s, s - shapes[0]) for m, s in zip(meshes[v], shapes)]
              for v, shapes in swims.items()}
    clim = fig.symmetric_range(*[f for fs in fields.values() for f in fs])
    images = [[fig.render(m, f, clim, fig.DIVERGING) for m, f in zip(meshes[v], fields[v])] for v in swims]
    fig.panels(images, path, list(swims), [f"lambda = {x:g}" for x in lambdas], clim, fig.DIVERGING,
               "displacement from lambda = 0 along the normal (mm)")
