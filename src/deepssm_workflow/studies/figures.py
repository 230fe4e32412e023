"""Study figures: per-point fields shown on a surface, panels in one matplotlib figure.

Signed fields use one diverging map (blue inward, red outward, symmetric range) and
magnitudes one sequential map, in every study; panels of a figure share the range.
"""

from __future__ import annotations

import numpy as np
from matplotlib import cm, colors

from ..plotting import figure, save_figure
from ..surface import values_at_vertices

DIVERGING = "RdBu_r"
SEQUENTIAL = "viridis"
VIEWS = ("iso", "top", "side", "front")


def outward_normals(mesh) -> np.ndarray:
    """Unit point normals of a closed surface, oriented outwards."""
    with_normals = mesh.compute_normals(point_normals=True, cell_normals=False, auto_orient_normals=True,
                                        consistent_normals=True, split_vertices=False)
    return np.asarray(with_normals.point_data["Normals"], dtype=np.float64)


def vectors_at_vertices(mesh, points: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per-point 3-vectors spread onto the mesh vertices (one component at a time)."""
    vertices = np.asarray(mesh.points)
    return np.stack([values_at_vertices(vertices, points, vectors[:, i]) for i in range(3)], axis=1)


def normal_component(mesh, points: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per-vertex signed component of a per-point vector field along the outward normal."""
    return (vectors_at_vertices(mesh, points, vectors) * outward_normals(mesh)).sum(1)


def render(mesh, scalars, clim, cmap: str, view: str = "iso", arrows=None, size=(360, 360)) -> np.ndarray:
    """Off-screen rendering of `mesh` coloured by per-vertex `scalars`; `arrows` = (points, vectors)."""
    import pyvista as pv

    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    plotter = pv.Plotter(off_screen=True, window_size=size)
    plotter.set_background("white")
    plotter.add_mesh(mesh.copy(), scalars=np.asarray(scalars, dtype=np.float64), cmap=cmap, clim=clim,
                     smooth_shading=True, show_scalar_bar=False)
    if arrows is not None:
        points, vectors = (np.asarray(a, dtype=np.float64) for a in arrows)
        length = np.linalg.norm(vectors, axis=1)
        if length.max() > 0:
            cloud = pv.PolyData(points)
            cloud["vectors"] = vectors
            size_mm = 0.08 * np.linalg.norm(np.ptp(np.asarray(mesh.points), axis=0))  # longest arrow
            glyphs = cloud.glyph(orient="vectors", scale="vectors", factor=size_mm / length.max())
            plotter.add_mesh(glyphs, color="black")
    {"iso": plotter.view_isometric, "top": plotter.view_xy, "side": plotter.view_xz,
     "front": plotter.view_yz}[view]()
    image = plotter.screenshot(return_img=True)
    plotter.close()
    return image


def panels(images, path, row_titles, col_titles, clim, cmap: str, label: str) -> None:
    """A grid of rendered images (rows x cols, None for an empty cell) with one colour bar."""
    rows, cols = len(images), max(len(r) for r in images)
    fig, axes = figure(rows, cols, cell=(2.6, 2.6))
    for i, row in enumerate(images):
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(row) and row[j] is not None:
                ax.imshow(row[j])
            if i == 0 and j < len(col_titles):
                ax.set_title(col_titles[j])
        if row_titles:
            axes[i, 0].text(-0.05, 0.5, row_titles[i], transform=axes[i, 0].transAxes, rotation=90,
                            ha="right", va="center")
    mappable = cm.ScalarMappable(norm=colors.Normalize(*clim), cmap=cmap)
    fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.7, label=label)
    save_figure(fig, path)


def gallery(images, titles, path, clim, cmap: str, label: str, cols: int = 4) -> None:
    """Single panels, each with its own title, laid out `cols` to a row."""
    rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    fig, axes = figure(len(rows), min(cols, len(images)), cell=(2.6, 2.6))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), images, titles):
        ax.imshow(image)
        ax.set_title(title)
    mappable = cm.ScalarMappable(norm=colors.Normalize(*clim), cmap=cmap)
    fig.colorbar(mappable, ax=axes.ravel().tolist(), shrink=0.7, label=label)
    save_figure(fig, path)


def symmetric_range(*fields) -> tuple[float, float]:
    top = max(float(np.abs(f).max()) for f in fields) if fields else 1.0
    top = top if top > 0 else 1.0
    return -top, top
