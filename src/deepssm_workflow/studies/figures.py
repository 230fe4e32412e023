"""Study figures: per-point fields shown on a surface, panels in one matplotlib figure.

Signed fields use one diverging map (blue inward, red outward, symmetric range) and
magnitudes one sequential map, in every study; panels of a figure share the range
(`column_panels`: each column its own range and colour bar).

A panel is seen from one of the fixed `VIEWS` (the whole scene, perspective) or through a
`Camera`: a direction chosen for the anatomy, parallel projection, zoomed so that a region
of interest fills the panel.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def normals_at_points(mesh, points: np.ndarray) -> np.ndarray:
    """Unit outward normals of a closed surface at `points` on (or next to) it: the normal of
    the nearest vertex, (M, 3)."""
    from scipy.spatial import cKDTree

    nearest = cKDTree(np.asarray(mesh.points, dtype=np.float64)).query(np.asarray(points, dtype=np.float64))[1]
    return outward_normals(mesh)[nearest]


@dataclass(frozen=True)
class Camera:
    """A view for `render`: the camera sits along `direction` from the focus (pointing from the
    scene towards the camera), `up` is screen up (its part across the line of sight), parallel
    projection, zoomed so that `fit` (points; None: the whole mesh) fills the panel up to
    `margin` (a fraction of the panel's half-size) on its tighter side. `focus` (None: the
    centre of `fit` as seen from the camera) lands in the panel's centre."""

    direction: tuple
    up: tuple = (0.0, 0.0, 1.0)
    focus: tuple | None = None
    fit: np.ndarray | None = None
    margin: float = 0.04

    def frame(self, mesh_points: np.ndarray, size) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(camera position, focal point, up, parallel scale) for a panel of `size` (width, height) pixels."""
        d = np.asarray(self.direction, dtype=np.float64)
        if not np.linalg.norm(d) > 0:
            raise ValueError("a camera needs a non-zero direction")
        d = d / np.linalg.norm(d)
        up = np.asarray(self.up, dtype=np.float64)
        up = up - (up @ d) * d
        if not np.linalg.norm(up) > 1e-9:
            raise ValueError("a camera's up must not be parallel to its direction")
        up = up / np.linalg.norm(up)
        right = np.cross(up, d)
        points = np.asarray(mesh_points if self.fit is None else self.fit, dtype=np.float64).reshape(-1, 3)
        if not len(points):
            raise ValueError("a camera needs points to fit")
        u, r, w = points @ up, points @ right, points @ d
        if self.focus is None:
            focus = (u.min() + u.max()) / 2 * up + (r.min() + r.max()) / 2 * right + w.mean() * d
        else:
            focus = np.asarray(self.focus, dtype=np.float64)
        half_u = np.abs(u - focus @ up).max()
        half_r = np.abs(r - focus @ right).max()
        width, height = size
        scale = max(half_u, half_r * height / width, 1e-6) * (1.0 + self.margin)
        reach = np.ptp(np.asarray(mesh_points, dtype=np.float64).reshape(-1, 3), axis=0)
        distance = 2.0 * float(np.linalg.norm(reach)) + 2.0 * float(np.abs(w - focus @ d).max()) + 1.0
        return focus + distance * d, focus, up, float(scale)


def render(mesh, scalars, clim, cmap: str, view: str = "iso", arrows=None, size=(360, 360),
           camera: Camera | None = None, outline=None, nan_color: str = "lightgrey") -> np.ndarray:
    """Off-screen rendering of `mesh` coloured by per-vertex `scalars`; `arrows` = (points, vectors).

    `camera` (a `Camera`) replaces the fixed `view`; `outline` = (per-vertex values, level) draws
    the level's contour in black (e.g. the edge of a region); vertices whose scalar is NaN are
    drawn in `nan_color`.
    """
    import pyvista as pv

    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {', '.join(VIEWS)}")
    plotter = pv.Plotter(off_screen=True, window_size=size)
    plotter.set_background("white")
    plotter.add_mesh(mesh.copy(), scalars=np.asarray(scalars, dtype=np.float64), cmap=cmap, clim=clim,
                     smooth_shading=True, show_scalar_bar=False, nan_color=nan_color)
    if outline is not None:
        values, level = outline
        surface = mesh.copy()
        surface.point_data["Normals"] = outward_normals(mesh)
        surface["outline"] = np.asarray(values, dtype=np.float64)
        lines = surface.contour([float(level)], scalars="outline")
        if lines.n_points:  # lifted off the surface a little, so that the surface does not hide it
            lift = 0.004 * float(np.linalg.norm(np.ptp(np.asarray(mesh.points), axis=0)))
            lines.points = np.asarray(lines.points) + lift * np.asarray(lines.point_data["Normals"])
            plotter.add_mesh(lines, color="black", line_width=2.5)
    if arrows is not None:
        points, vectors = (np.asarray(a, dtype=np.float64) for a in arrows)
        length = np.linalg.norm(vectors, axis=1)
        if length.max() > 0:
            cloud = pv.PolyData(points)
            cloud["vectors"] = vectors
            size_mm = 0.08 * np.linalg.norm(np.ptp(np.asarray(mesh.points), axis=0))  # longest arrow
            glyphs = cloud.glyph(orient="vectors", scale="vectors", factor=size_mm / length.max())
            plotter.add_mesh(glyphs, color="black")
    if camera is None:
        {"iso": plotter.view_isometric, "top": plotter.view_xy, "side": plotter.view_xz,
         "front": plotter.view_yz}[view]()
    else:
        position, focus, up, scale = camera.frame(np.asarray(mesh.points), size)
        plotter.camera_position = [tuple(position), tuple(focus), tuple(up)]
        plotter.enable_parallel_projection()
        plotter.camera.parallel_scale = scale
        plotter.reset_camera_clipping_range()
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


def column_panels(images, path, row_titles, columns) -> None:
    """A grid of rendered images (rows x columns, None for an empty cell) where every column has
    its own colour scale: `columns` is a list of (title, clim, cmap, label[, extend]), one colour bar under
    each (`extend`: "neither", "both", "min" or "max", the colour bar's arrows for values beyond clim)."""
    rows, cols = len(images), len(columns)
    fig, axes = figure(rows, cols, cell=(2.8, 2.8))
    for i, row in enumerate(images):
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if j < len(row) and row[j] is not None:
                ax.imshow(row[j])
            if i == 0:
                ax.set_title(columns[j][0])
        if row_titles:
            axes[i, 0].text(-0.05, 0.5, row_titles[i], transform=axes[i, 0].transAxes, rotation=90,
                            ha="right", va="center")
    for j, (_, clim, cmap, label, *extend) in enumerate(columns):
        mappable = cm.ScalarMappable(norm=colors.Normalize(*clim), cmap=cmap)
        fig.colorbar(mappable, ax=axes[:, j].tolist(), orientation="horizontal", shrink=0.85, pad=0.03,
                     label=label, extend=extend[0] if extend else "neither")
    save_figure(fig, path)


def fill_fraction(image: np.ndarray, background=(255, 255, 255)) -> float:
    """The fraction of a rendered panel's pixels that are not background: how much of it the scene fills."""
    image = np.asarray(image)
    return float(np.any(image[..., :3] != np.asarray(background, dtype=image.dtype), axis=-1).mean())


def symmetric_range(*fields) -> tuple[float, float]:
    top = max(float(np.abs(f).max()) for f in fields) if fields else 1.0
    top = top if top > 0 else 1.0
    return -top, top
