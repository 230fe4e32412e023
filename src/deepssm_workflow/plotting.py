"""One look for every figure: matplotlib style, off-screen mesh rendering, atomic saving."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .atomic import replaced  # noqa: E402

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
MESH_COLOR = "#d9d3c7"
POINT_COLOR = "#0077bb"
HEAT_CMAP = "magma_r"  # errors: light = small, dark = large


def figure(rows: int, cols: int, cell=(3.0, 3.0)):
    plt.rcParams.update(STYLE)
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    return fig, axes


def save_figure(fig, path) -> None:
    """Write via a temporary file so an interrupted job leaves no half-written figure."""
    try:
        with replaced(path) as tmp:  # the suffix stays .png, so matplotlib knows the format
            fig.savefig(tmp, bbox_inches="tight")
    finally:
        plt.close(fig)


def render_mesh(mesh_path, points: np.ndarray | None = None, size=(420, 420)) -> np.ndarray:
    """Off-screen pyvista rendering of a mesh (and points) as an RGB array; with no mesh
    (mesh_path None), the points alone."""
    import pyvista as pv

    plotter = pv.Plotter(off_screen=True, window_size=size)
    plotter.set_background("white")
    if mesh_path is not None:
        plotter.add_mesh(pv.read(str(mesh_path)), color=MESH_COLOR, smooth_shading=True)
    if points is not None:
        plotter.add_points(np.asarray(points), color=POINT_COLOR, point_size=5, render_points_as_spheres=True)
    plotter.view_isometric()
    image = plotter.screenshot(return_img=True)
    plotter.close()
    return image


def render_heatmap(mesh, scalars: np.ndarray, clim, size=(360, 360), azimuth: float = 0.0) -> np.ndarray:
    """Off-screen rendering of a pyvista surface (or point cloud: points as spheres) coloured by
    per-vertex `scalars` on a fixed colour range `clim` (so that panels are comparable), isometric
    view turned by `azimuth` degrees. The colour bar is drawn by the matplotlib figure around it."""
    import pyvista as pv

    plotter = pv.Plotter(off_screen=True, window_size=size)
    plotter.set_background("white")
    if mesh.faces.size:  # polygons; a point cloud has none
        plotter.add_mesh(mesh, scalars=np.asarray(scalars), cmap=HEAT_CMAP, clim=clim, smooth_shading=True,
                         show_scalar_bar=False)
    else:
        plotter.add_mesh(mesh, scalars=np.asarray(scalars), cmap=HEAT_CMAP, clim=clim, point_size=8,
                         render_points_as_spheres=True, show_scalar_bar=False)
    plotter.view_isometric()
    plotter.camera.azimuth = azimuth
    image = plotter.screenshot(return_img=True)
    plotter.close()
    return _trimmed(image)


def _trimmed(image: np.ndarray, margin: int = 4) -> np.ndarray:
    """The rendering cropped to its non-white content (plus a margin), so panels show the anatomy large."""
    rows, cols = np.nonzero((image < 250).any(-1))
    if not len(rows):
        return image
    return image[max(rows.min() - margin, 0):rows.max() + margin + 1,
                 max(cols.min() - margin, 0):cols.max() + margin + 1]
