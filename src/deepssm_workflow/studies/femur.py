"""Cam-FAI group difference on the femur (paper sec. 4.2, Figs. 9, 10), plus significance.

Group difference mu_cam - mu_control of the world-frame shapes, shown on the mean cam
shape with arrows (direction) and the normalized magnitude. Sources: `ground_truth`
and each method on the test subjects (the only ones with predictions, so the maps
are comparable), and `ground_truth_all` on every subject, train and test, as the paper
computes its Fig. 9. Each source's map is compared with the ground truth's on the same
subjects (`map_correlation`: Pearson correlation of the two flattened difference fields).

Beyond the paper, to tell the lesion from chance differences between the groups (a few
cam subjects with larger heads by chance move every head point):

* Per point, the displacement of every subject along the outward surface normal of the
  source's pooled mean shape (all its subjects, both groups: the normals do not depend on
  the labels, so relabelling is fair), and a two-sided Welch t test of cam against
  control on it, with permutation p-values (9999 relabellings, or every labelling when
  there are fewer) and Benjamini-Hochberg FDR q-values over the points (`stats.
  permutation_welch`). `n_significant_points`, `min_q`, `test_method` and the `q` column
  are this test's; it needs 2 subjects per group.
* Per point, a Hotelling T^2 of the 3D positions with a permutation p-value and FDR
  q-value (`hotelling_*`; n_cam + n_control >= 5), which also sees sliding along the surface.
* Family-wise error control over all points (`fwer.westfall_young`): Westfall-Young step-down
  max-T of both statistics on one set of 9999 relabellings (every labelling when there are
  fewer), so the adjusted p (`p_fwer`, `hotelling_p_fwer`) can reach 1e-4 whatever the number
  of points. The FDR q cannot always reach 0.05: with k points at the p floor 1 / (B + 1) their
  q is M / (k (B + 1)), 0.051 for one point of 512 with 9999 relabellings (and 0.51 for the
  Hotelling test's 999). `n_fwer_significant_points`: points with p_fwer < 0.05; the chance
  that any point without an effect is among them is at most 5 %.

Where the lesion was planted (a synthetic femur cohort, found through the ingest report's
source table: data/cohort.json says femur, data/template/point_ids.txt says which template
vertex each correspondence point is), each point gets the generator's own bump profile,
planted_weight = exp(-|v - cam_center|^2 / (2 CAM_WIDTH^2)) at its template vertex v, and
the planted region is planted_weight >= exp(-2) (within two lesion widths of its centre).
The summary then splits the mean |normal difference| and the significant points into
inside and outside that region, scores the FWER map against it (`fwer_sensitivity`: share of
the region's points with p_fwer < 0.05; `fwer_false_positive_fraction`: share of the other
points, and `fwer_false_positive_area_fraction`: of the other points' surface area), and
gives the mean amplitude the generator planted in the source's cam subjects
(ground_truth.csv). The panels look at the lesion: along the cam direction with its
component along the neck axis removed (the neck in profile, the anterosuperior head-neck
junction facing the viewer), superior up, zoomed onto the head and neck. Without the
generator (real data) the panels are isometric views fitted to the mesh.

Latent swim (Fig. 10): control mean to cam mean in the latent space of each method that has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..io import read_particles
from ..surface import values_at_vertices
from . import figures as fig
from .data import Cohort, Shapes, trained_model
from .fwer import detection, westfall_young
from .output import StudyOutput
from .stats import pearson, permutation_hotelling, permutation_welch
from .swim import latent_swim, swim_figure

GROUPS = ("control", "cam")
Q_LEVEL = 0.05
PLANTED_LEVEL = float(np.exp(-2.0))  # the planted region: the generator's bump at >= 13.5 % of its amplitude
N_PERMUTATIONS = 9999  # p floor 1e-4: a max-T adjusted p can reach 0.05 with ~500 relabelling maxima to spare
FWER_LEVEL = 0.05
ROI_MARGIN = 1.4  # the panels frame the mesh within 1.4 x (lesion to far side of the head) of the lesion
WELCH = "two-sided Welch t on the displacement along the surface normal"
HOTELLING = "Hotelling T^2 of the 3D positions"


@dataclass
class PlantedLesion:
    """Where the synthetic femur generator plants the cam lesion, for the cohort's correspondence points."""

    weight: np.ndarray  # (M,) the generator's bump profile at each point's template vertex, 0..1
    center: np.ndarray  # lesion centre (template = world frame of a synthetic cohort)
    normal: np.ndarray  # direction of the bump (outward normal at the centre)
    neck_axis: np.ndarray  # unit, neck base to head centre
    shaft_axis: np.ndarray  # unit, superior along the shaft (the generator's +z)
    head_center: np.ndarray
    head_radius: float
    amplitude: pd.Series | None = None  # subject id -> planted amplitude (mm), 0 for controls
    origin: str = ""

    @property
    def region(self) -> np.ndarray:
        return self.weight >= PLANTED_LEVEL

    def reach(self) -> float:
        """From the lesion centre to the far side of the head (mm): the radius of the region shown."""
        return float(np.linalg.norm(self.head_center - self.center) + self.head_radius)


def planted_from_generator(femur, point_ids, amplitude: pd.Series | None = None, origin: str = "") -> PlantedLesion:
    """The planted lesion of a synthetic `Femur` for the correspondence points `point_ids` (template vertices)."""
    from ..synthetic.femur import CAM_WIDTH, HEAD_RADIUS

    template = femur.template
    anchors = template.anchors
    vertices = template.vertices[np.asarray(point_ids, dtype=int)]
    weight = np.exp(-np.sum((vertices - anchors["cam_center"]) ** 2, axis=1) / (2 * CAM_WIDTH**2))
    neck = anchors["head_center"] - anchors["neck_base"]
    return PlantedLesion(weight=weight, center=anchors["cam_center"].copy(), normal=np.asarray(femur.cam_normal),
                         neck_axis=neck / np.linalg.norm(neck), shaft_axis=np.array([0.0, 0.0, 1.0]),
                         head_center=anchors["head_center"].copy(), head_radius=float(HEAD_RADIUS),
                         amplitude=amplitude, origin=origin)


def planted_lesion(cohort: Cohort, n_points: int) -> tuple[PlantedLesion | None, str]:
    """The generator's planted lesion when the cohort is a synthetic femur whose folder is still
    where it was ingested from (and whose template the generator rebuilds identically), else None;
    with a sentence saying which."""
    try:
        report = json.loads(cohort.layout.cohort_report.read_text())
        source = report.get("source", {})
        if source.get("kind") != "synthetic":
            return None, "not a synthetic cohort: the planted region is unknown"
        folder = Path(source["path"]).parent
        metadata = json.loads((folder / "data" / "cohort.json").read_text())
        if metadata.get("anatomy") != "femur":
            return None, f"{folder} is a synthetic {metadata.get('anatomy')} cohort, not a femur"
        point_ids = np.loadtxt(folder / "data" / "template" / "point_ids.txt", dtype=int).reshape(-1)
        if len(point_ids) != n_points:
            return None, f"{folder}: {len(point_ids)} template points against the cohort's {n_points}"
        from ..synthetic.cohort import build_anatomy

        femur = build_anatomy("femur", metadata["settings"])  # the generator rebuilds the cohort's template
        saved = read_particles(folder / "data" / "template" / "points.particles")
        if saved.shape != (n_points, 3) or np.abs(saved - femur.template.vertices[point_ids]).max() > 1e-3:
            return None, f"{folder}: the generator no longer rebuilds this cohort's template"
        truth = pd.read_csv(folder / "ground_truth.csv", dtype={"id": str})
        amplitude = truth.set_index("id")["cam_amplitude_mm"] if "cam_amplitude_mm" in truth else None
    except (OSError, KeyError, ValueError, TypeError) as error:
        return None, f"the planted region could not be read from the cohort's source ({error})"
    origin = (f"planted region from the femur generator ({folder}): template vertex of each point, "
              f"bump profile >= exp(-2)")
    return planted_from_generator(femur, point_ids, amplitude, origin), origin


def group_difference(world: np.ndarray, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu_cam, mu_cam - mu_control), each (M, 3)."""
    cam = np.asarray(cam, dtype=bool)
    if cam.all() or not cam.any():
        raise ValueError(f"a group difference needs both groups; got {cam.sum()} cam and {(~cam).sum()} control")
    return world[cam].mean(0), world[cam].mean(0) - world[~cam].mean(0)


def normal_displacement(world: np.ndarray, template) -> tuple[np.ndarray, object, np.ndarray]:
    """(N, M) displacement of every subject from the pooled mean along its outward normal, the
    template mesh warped onto the pooled mean, and that mean (M, 3)."""
    world = np.asarray(world, dtype=np.float64)
    pooled = world.mean(0)
    mesh = template.warp(pooled)
    normals = fig.normals_at_points(mesh, pooled)
    return np.einsum("nmi,mi->nm", world - pooled, normals), mesh, pooled


def normal_test(world: np.ndarray, cam: np.ndarray, template, seed: int = 0,
                n_permutations: int = N_PERMUTATIONS) -> dict:
    """Per point: cam minus control mean displacement along the pooled mean's outward normal
    (`difference`, mm) and its permutation Welch test (t, p, q, method); with the pooled mean
    (`mean`), its mesh (`mesh`) and every subject's displacement (`displacement`, (N, M))."""
    cam = np.asarray(cam, dtype=bool)
    displacement, mesh, pooled = normal_displacement(world, template)
    test = permutation_welch(displacement, cam, n_permutations=n_permutations, seed=seed)
    difference = displacement[cam].mean(0) - displacement[~cam].mean(0)
    return {**test, "difference": difference, "mesh": mesh, "mean": pooled, "displacement": displacement}


def fwer_test(world: np.ndarray, cam: np.ndarray, displacement: np.ndarray | None = None, seed: int = 0,
              n_permutations: int = N_PERMUTATIONS) -> dict:
    """Westfall-Young max-T over all points (`fwer.westfall_young`) of the normal displacement's
    Welch t (when `displacement` is given and each group has 2 subjects) and of the Hotelling T^2
    of the positions (n_cam + n_control >= 5), on the same relabellings."""
    cam = np.asarray(cam, dtype=bool)
    welch = displacement if displacement is not None and min(cam.sum(), (~cam).sum()) >= 2 else None
    hotelling = world if len(cam) - 2 >= np.shape(world)[2] else None
    if welch is None and hotelling is None:
        raise ValueError(f"max-T needs 2 subjects per group (Welch t, with the displacement) or 5 in all (Hotelling "
                         f"T^2); got {int(cam.sum())} cam and {int((~cam).sum())} control")
    return westfall_young(cam, welch=welch, hotelling=hotelling, n_permutations=n_permutations, seed=seed)


def point_areas(mesh, points: np.ndarray) -> np.ndarray:
    """The surface area (mm^2) each correspondence point stands for: every mesh vertex's share
    (a third of its triangles' areas) given to its nearest point."""
    triangles = mesh.triangulate()
    corners = np.asarray(triangles.points, dtype=np.float64)[np.asarray(triangles.faces).reshape(-1, 4)[:, 1:]]
    area = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    vertex_area = np.bincount(np.asarray(triangles.faces).reshape(-1, 4)[:, 1:].ravel(),
                              weights=np.repeat(area / 3, 3), minlength=triangles.n_points)
    nearest = cKDTree(np.asarray(points, dtype=np.float64)).query(np.asarray(triangles.points))[1]
    return np.bincount(nearest, weights=vertex_area, minlength=len(points))


def fwer_summary(fwer: dict, planted: PlantedLesion | None = None, areas: np.ndarray | None = None) -> dict:
    """Summary keys of a `fwer_test`: significant points (p_fwer < FWER_LEVEL) and the smallest
    p_fwer per statistic; against the planted region, where known, the sensitivity and the
    false-positive fraction of points (and of area, given each point's `areas`)."""
    row = {"fwer_method": fwer["method"], "fwer_p_floor": float(fwer["p_floor"])}
    for name, prefix in (("welch", ""), ("hotelling", "hotelling_")):
        if name not in fwer:
            continue
        significant = fwer[name]["p_fwer"] < FWER_LEVEL
        row.update({f"{prefix}n_fwer_significant_points": int(significant.sum()),
                    f"{prefix}min_p_fwer": float(fwer[name]["p_fwer"].min())})
        if planted is not None:
            rates = detection(significant, planted.region)
            row.update({f"{prefix}fwer_sensitivity": rates["sensitivity"],
                        f"{prefix}fwer_false_positive_fraction": rates["false_positive_fraction"]})
            if areas is not None:
                row[f"{prefix}fwer_false_positive_area_fraction"] = detection(
                    significant, planted.region, areas)["false_positive_fraction"]
    return row


def planted_summary(planted: PlantedLesion, test: dict, ids) -> dict:
    """Inside against outside the planted region: mean |normal difference|, significant points,
    and the mean amplitude the generator planted in the source's cam subjects."""
    inside = planted.region
    significant = test["q"] < Q_LEVEL
    row = {"n_planted_points": int(inside.sum()),
           "n_significant_planted": int((significant & inside).sum()),
           "n_significant_elsewhere": int((significant & ~inside).sum()),
           "normal_difference_planted_mm": float(np.abs(test["difference"][inside]).mean()) if inside.any() else None,
           "normal_difference_elsewhere_mm": float(np.abs(test["difference"][~inside]).mean())
           if (~inside).any() else None}
    if planted.amplitude is not None:
        amplitude = planted.amplitude.reindex(list(ids)).to_numpy(dtype=np.float64)
        if np.all(np.isfinite(amplitude)) and (amplitude > 0).any():
            row["planted_amplitude_mm"] = float(amplitude[amplitude > 0].mean())
    return row


def femur_camera(mesh, points: np.ndarray, planted: PlantedLesion | None) -> fig.Camera:
    """The view of a femur panel: at the planted lesion on the shape `points` (M, 3) when known,
    else isometric over the whole mesh."""
    if planted is None:
        return fig.Camera(direction=(1.0, 1.0, 1.0), up=(0.0, 0.0, 1.0))
    direction = planted.normal - (planted.normal @ planted.neck_axis) * planted.neck_axis
    lesion = np.asarray(points)[int(np.argmax(planted.weight))]
    vertices = np.asarray(mesh.points, dtype=np.float64)
    roi = vertices[np.linalg.norm(vertices - lesion, axis=1) <= ROI_MARGIN * planted.reach()]
    return fig.Camera(direction=tuple(direction), up=tuple(planted.shaft_axis), fit=roi if len(roi) else None)


def run(cohort: Cohort, sources: dict[str, Shapes], out_dir: Path, latent_methods=(), seed: int = 0,
        planted="cohort") -> StudyOutput:
    """`planted`: the generator's `PlantedLesion`, None (unknown), or "cohort" (look it up from the cohort)."""
    out = StudyOutput()
    group = cohort.subjects["group"].astype(str)
    unknown = sorted(set(group) - set(GROUPS))
    if unknown:
        raise ValueError(f"{cohort.table_path}: femur groups are {', '.join(GROUPS)}; found {unknown[0]!r}")
    sources = {"ground_truth_all": cohort.all, **sources}
    template = cohort.template_mesh()
    n_points = cohort.all.world.shape[1]
    if isinstance(planted, str):
        planted, origin = planted_lesion(cohort, n_points)
        out.notes.append(origin)
    elif planted is not None and planted.origin:
        out.notes.append(planted.origin)
    if planted is not None and len(planted.weight) != n_points:
        raise ValueError(f"the planted lesion has {len(planted.weight)} points; the cohort has {n_points}")

    differences, normal_tests, fwer_tests, counts, rows, point_rows = {}, {}, {}, {}, [], []
    for source, shapes in sources.items():
        cam = group[shapes.ids].to_numpy() == "cam"
        counts[source] = (int(cam.sum()), int((~cam).sum()))
        result = out.attempt(f"{source} group difference", lambda: group_difference(shapes.world, cam))
        row = {"source": source, "n_control": int((~cam).sum()), "n_cam": int(cam.sum())}
        if result is not None:
            mean_cam, difference = result
            differences[source] = (mean_cam, difference)
            magnitude = np.linalg.norm(difference, axis=1)
            row.update(peak_difference_mm=float(magnitude.max()), peak_point=int(magnitude.argmax()),
                       mean_difference_mm=float(magnitude.mean()))
            test = out.attempt(f"{source} per-point Welch test",
                               lambda: normal_test(shapes.world, cam, template, seed=seed))
            if test is not None:
                normal_tests[source] = test
                row.update(n_significant_points=int((test["q"] < Q_LEVEL).sum()), min_q=float(test["q"].min()),
                           test_method=f"{WELCH}, {test['method']}, BH FDR",
                           peak_normal_difference_mm=float(np.abs(test["difference"]).max()))
                if planted is not None:
                    row.update(planted_summary(planted, test, shapes.ids[cam]))
            hotelling = out.attempt(f"{source} Hotelling T^2",
                                    lambda: permutation_hotelling(shapes.world, cam, seed=seed))
            if hotelling is not None:
                row.update(hotelling_n_significant_points=int((hotelling["q"] < Q_LEVEL).sum()),
                           hotelling_min_q=float(hotelling["q"].min()),
                           hotelling_test_method=f"{HOTELLING}, {hotelling['method']}, BH FDR")
            fwer = out.attempt(f"{source} FWER (max-T)", lambda: fwer_test(
                shapes.world, cam, test["displacement"] if test is not None else None, seed=seed))
            if fwer is not None:
                fwer_tests[source] = fwer
                areas = point_areas(test["mesh"], test["mean"]) if test is not None and planted is not None else None
                row.update(fwer_summary(fwer, planted, areas))
            nan = np.full(len(magnitude), np.nan)
            table = {"source": source, "point": np.arange(len(magnitude)),
                     "dx": difference[:, 0], "dy": difference[:, 1], "dz": difference[:, 2],
                     "magnitude_mm": magnitude,
                     "normal_difference_mm": test["difference"] if test is not None else nan,
                     "t": test["t"] if test is not None else nan, "p": test["p"] if test is not None else nan,
                     "q": test["q"] if test is not None else nan,
                     "hotelling_q": hotelling["q"] if hotelling is not None else nan,
                     "p_fwer": fwer["welch"]["p_fwer"] if fwer is not None and "welch" in fwer else nan,
                     "hotelling_p_fwer": fwer["hotelling"]["p_fwer"]
                     if fwer is not None and "hotelling" in fwer else nan}
            if planted is not None:
                table.update(planted_weight=planted.weight, in_planted_region=planted.region)
            point_rows.append(pd.DataFrame(table))
        rows.append(row)
    reference = differences.get("ground_truth")
    for row in rows:
        if row["source"] not in ("ground_truth", "ground_truth_all") and row["source"] in differences and reference:
            row["map_correlation"] = out.attempt(
                f"{row['source']} map correlation",
                lambda: pearson(differences[row["source"]][1].ravel(), reference[1].ravel()))
        out.summary[row["source"]] = {k: v for k, v in row.items() if k != "source"}
    out.tables["femur_group_difference"] = pd.DataFrame(rows)
    if point_rows:
        out.tables["femur_group_difference_points"] = pd.concat(point_rows, ignore_index=True)

    def sizes(names) -> str:
        return "; ".join(f"{s}: {counts[s][0]} cam, {counts[s][1]} control" for s in names)

    where = ("The black line encloses the region where the generator planted the lesion (its bump at >= 13.5 % "
             "of the amplitude). " if planted is not None else "")
    view = ("Each panel looks at the anterosuperior head-neck junction (the neck in profile, superior up), "
            "zoomed onto the head and neck. " if planted is not None else
            "Each panel is an isometric view of the whole mean shape. ")
    if differences:
        images, names = [], []
        for source, (mean_cam, difference) in differences.items():
            mesh = template.warp(mean_cam)
            magnitude = np.linalg.norm(fig.vectors_at_vertices(mesh, mean_cam, difference), axis=1)
            images.append(fig.render(mesh, magnitude / max(magnitude.max(), 1e-12), (0, 1), fig.SEQUENTIAL,
                                     arrows=(mean_cam, difference), camera=femur_camera(mesh, mean_cam, planted),
                                     outline=_outline(mesh, mean_cam, planted)))
            names.append(_label(source, counts))
        fig.gallery(images, names, out_dir / "femur_group_difference.png", (0, 1), fig.SEQUENTIAL,
                    "|mu_cam - mu_control| / its maximum")
        out.figures.append({
            "file": "femur_group_difference.png",
            "title": "Cam-FAI group difference mu_cam - mu_control (Fig. 9)",
            "caption": "Arrows show where the mean cam femur differs from the mean control and colour the size of "
                       "that difference, normalized to its maximum in each panel, on the mean cam shape (n per group: "
                       f"{sizes(differences)}). {view}{where}This is the raw difference: with few cam subjects, "
                       "chance differences in head size and neck shape between the groups show too (often as a "
                       "whole-head change)" + ("; the next figure tells which points differ beyond chance."
                                               if normal_tests else ".")})
    if normal_tests:
        top = max(-np.log10(Q_LEVEL) + 0.5, max(float(-np.log10(t["q"].min())) for t in normal_tests.values()))
        # one range for every row, set by the source with the most subjects (ground_truth_all) so that the
        # large chance differences of a few test subjects do not wash it out; they saturate instead
        reference_source = max(normal_tests, key=lambda s: sum(counts[s]))
        clim = fig.symmetric_range(normal_tests[reference_source]["difference"])
        pooled = np.abs(np.concatenate([t["difference"] for t in normal_tests.values()]))
        extend = "both" if pooled.max() > clim[1] else "neither"
        images = []
        for source, test in normal_tests.items():
            mesh, mean = test["mesh"], test["mean"]
            camera, outline = femur_camera(mesh, mean, planted), _outline(mesh, mean, planted)
            difference = values_at_vertices(mesh.points, mean, test["difference"])
            significant = values_at_vertices(mesh.points, mean, (test["q"] < Q_LEVEL).astype(float)) >= 0.5
            images.append([fig.render(mesh, field, limits, cmap, camera=camera, outline=outline)
                           for field, limits, cmap in (
                               (difference, clim, fig.DIVERGING),
                               (values_at_vertices(mesh.points, mean, -np.log10(test["q"])), (0, top),
                                fig.SEQUENTIAL),
                               (np.where(significant, difference, np.nan), clim, fig.DIVERGING))])
            welch_fwer = fwer_tests.get(source, {}).get("welch")
            if welch_fwer is not None:  # else an empty cell: the max-T test could not run
                flagged = values_at_vertices(mesh.points, mean,
                                             (welch_fwer["p_fwer"] < FWER_LEVEL).astype(float)) >= 0.5
                images[-1].append(fig.render(mesh, np.where(flagged, difference, np.nan), clim, fig.DIVERGING,
                                             camera=camera, outline=outline))
        methods = sorted({t["method"] for t in normal_tests.values()})
        fig.column_panels(images, out_dir / "femur_significance.png",
                          [_label(s, counts) for s in normal_tests],
                          [("mean cam - control\nalong the normal", clim, fig.DIVERGING, "mm (red: cam outward)",
                            extend),
                           ("-log10 q", (0, top), fig.SEQUENTIAL, f"-log10 q ({-np.log10(Q_LEVEL):.1f} = q 0.05)"),
                           (f"where q < {Q_LEVEL:g}", clim, fig.DIVERGING, "mm (grey: q >= 0.05)", extend),
                           (f"where FWER p < {FWER_LEVEL:g}", clim, fig.DIVERGING, "mm (grey: FWER p >= 0.05)",
                            extend)])
        fwer_methods = sorted({fwer_tests[s]["method"] for s in normal_tests if "welch" in fwer_tests.get(s, {})})
        out.figures.append({
            "file": "femur_significance.png",
            "title": "The cam lesion against chance: raw difference beside per-point significance",
            "caption": "Left: mean displacement of the cam group minus the control group along the outward surface "
                       "normal (red: cam femurs stick out), shown on each source's pooled mean shape, in one "
                       f"colour range set by {reference_source} (the most subjects; other rows saturate beyond it). "
                       "Second: "
                       "-log10 q of a per-point two-sided Welch t test of that displacement, cam against control, "
                       f"with permutation p-values ({'; '.join(methods)}) and Benjamini-Hochberg FDR over the "
                       f"points. Third: the difference only where q < {Q_LEVEL:g} (grey elsewhere). Right: the "
                       f"difference only where the same Welch t's family-wise adjusted p < {FWER_LEVEL:g} (grey "
                       f"elsewhere; {'; '.join(fwer_methods) or 'not computed'}): the chance that any point without "
                       "an effect shows there is at most 5 %. n per group: "
                       f"{sizes(normal_tests)}. {view}{where}"
                       + ("The planted lesion shows as a red spot inside the black line that stays in the two "
                          "right columns; " if planted is not None else
                          "A real effect stays in the two right columns; ")
                       + "colour that turns grey there (e.g. spread over the whole head) is not told apart from "
                       "chance differences between the groups. With few cam "
                       "subjects the test has little power: no point below q 0.05 (or FWER p 0.05) means that the "
                       "lesion was not told apart from chance, not that there is none."})

    swims = {}
    for method in latent_methods:
        trained = trained_model(cohort.dataset_dir, method)
        shapes = cohort.all
        cam = group[shapes.ids].to_numpy() == "cam"
        swim = out.attempt(f"{method} latent swim", lambda: latent_swim(trained, shapes.world[~cam], shapes.world[cam]))
        if swim is not None:
            swims[method] = swim
            out.summary.setdefault(method, {})["swim_max_displacement_mm"] = float(
                np.linalg.norm(swim[-1] - swim[0], axis=1).max())
    if swims:
        swim_figure(template, swims, out_dir / "femur_latent_swim.png")
        out.figures.append({"file": "femur_latent_swim.png",
                            "title": "Latent swim, control to cam (TL-DeepSSM: Fig. 10)",
                            "caption": "Shapes decoded along the line from the control to the cam mean latent code; "
                                       "colour is the movement from the control end along the surface normal, which "
                                       "should grow smoothly at the head-neck junction as lambda increases."})
    return out


def _outline(mesh, points: np.ndarray, planted: PlantedLesion | None):
    """The planted region's edge on a mesh warped onto `points`, for `figures.render`."""
    if planted is None:
        return None
    return values_at_vertices(mesh.points, points, planted.weight), PLANTED_LEVEL


def _label(source: str, counts: dict) -> str:
    return f"{source}\n{counts[source][0]} cam, {counts[source][1]} control"
