"""report.html: the builder's parts on hand-made folders, and the real tiny workflow's reports
opened in headless Chromium (every section there, no broken image, nothing fetched from outside)."""

from __future__ import annotations

import hashlib
import html
import json
import re
import subprocess
import zipfile

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPORT_DATASETS, TINY, run_snakemake
from deepssm_workflow.evaluate import MEAN_SHAPE
from deepssm_workflow.report import ANSWER, LANDMARKS_SECTION, SECTIONS, artifact_section, build_report, table_title

pytestmark = pytest.mark.slow  # real Snakemake runs of the workflow (deselect with -m 'not slow')

INSPECT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const found = {
    images: images.length,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    sections: Array.from(document.querySelectorAll("h2")).map(h => h.textContent),
    headings: Array.from(document.querySelectorAll("h3")).map(h => h.textContent),
  };
  const out = document.createElement("pre");
  out.id = "inspection";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>"""

# the tiny preset lists no landmark method: its reports have every section but that one
WITHOUT_LANDMARKS = [name for name in SECTIONS if name != LANDMARKS_SECTION]


def inspect_in_chromium(chromium: str, report, tmp_path) -> dict:
    """Open a copy of the report (plus an inspecting script) in headless Chromium; what the page shows."""
    page = tmp_path / f"inspect_{report.parent.name}.html"
    page.write_text(report.read_text().replace("</body>", INSPECT + "</body>"))
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=300)
    found = re.search(r'<pre id="inspection">(.*?)</pre>', result.stdout, re.S)
    assert found, f"Chromium did not render the page: {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def png(path, color="tab:blue") -> None:
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1], color=color)
    fig.savefig(path)
    plt.close(fig)


def test_artifact_folders_are_read_alike_and_bad_ones_are_named(tmp_path):
    folder = tmp_path / "study"
    (folder / "tables").mkdir(parents=True)
    png(folder / "a.png")
    (folder / "figures.json").write_text(json.dumps([{"file": "a.png", "title": "Group difference",
                                                      "caption": "Look at the head-neck junction."}]))
    (folder / "summary.json").write_text(json.dumps({"auc": {"base": 0.81}, "dims": [1, 2], "notes": ["few subjects"]}))
    pd.DataFrame({"variant": ["base"], "pearson": [0.7]}).to_csv(folder / "tables" / "severity_vs_ratings.csv",
                                                                   index=False)
    pd.DataFrame({"id": range(20)}).to_csv(folder / "tables" / "per_subject.csv", index=False)
    pd.DataFrame({"source": ["base"], "auc": [0.9]}).to_csv(folder / "tables" / "metopic_severity_table2.csv",
                                                            index=False)
    pd.DataFrame({"source": ["base"]}).to_csv(folder / "tables" / "hip_angles_table4.csv", index=False)
    section = artifact_section(folder, show_summary=True)
    # titled in words: a known study table by its title, any other by its name in words; the file in small print
    assert "<h3>Severity vs ratings</h3>" in section and "<td>0.7</td>" in section
    assert "<h3>Metopic severity against diagnosis and expert ratings, per source (paper Table 2)</h3>" in section
    assert "<h3>Hip angles (Table 4)</h3>" in section and '<p class="file">tables/hip_angles_table4.csv</p>' in section
    assert section.index("(paper Table 2)") < section.index("Hip angles")  # a study's main table first
    assert not re.search(r"<h3>[\w.-]*_[\w.-]*</h3>", section)
    assert "<details><summary>20 rows</summary>" in section  # a long table is folded
    assert 'class="note">few subjects' in section and "Look at the head-neck junction." in section
    # the summary's values: still there, folded below the tables and figures
    folded = section.index("<details><summary>All values of summary.json")
    assert folded > section.index("<figure>")
    assert "<td>auc.base</td><td>0.81</td>" in section[folded:] and "<td>dims</td><td>1, 2</td>" in section[folded:]
    assert section.count('src="data:image/png;base64,') == 1

    (folder / "summary.json").write_text(json.dumps({"femur": {"base": {"peak_difference_mm": 1.5}},
                                                     "notes": [f"note {k}" for k in range(6)]}))
    section = artifact_section(folder, show_summary=True)
    assert "<summary>6 notes: numbers not computed, and why</summary>" in section  # many notes are folded
    assert "<h4>Values per source: femur</h4>" in section and "<th>peak_difference_mm</th>" in section

    (folder / "figures.json").write_text(json.dumps([{"file": "missing.png", "title": "t", "caption": "c"}]))
    with pytest.raises(ValueError, match=r"missing\.png: figure not found \(listed by .*figures\.json\)"):
        artifact_section(folder, show_summary=True)
    (folder / "fake.png").write_text("not a picture")
    (folder / "figures.json").write_text(json.dumps([{"file": "fake.png", "title": "t", "caption": "c"}]))
    with pytest.raises(ValueError, match=r"fake\.png: not a PNG image"):
        artifact_section(folder, show_summary=True)
    (folder / "summary.json").write_text("{broken")
    with pytest.raises(ValueError, match=r"summary\.json: not valid JSON"):
        artifact_section(folder, show_summary=True)


def test_tables_are_titled_in_words():
    assert table_title("tables/femur_group_difference.csv") == "Cam-FAI group difference per source (paper Fig. 9)"
    assert table_title("knee_widths_fig3.csv") == "Knee widths (Fig. 3)"
    assert table_title("scores.csv") == "Scores"


def test_a_report_with_a_missing_input_names_it_and_writes_nothing(tmp_path):
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "report.json").write_text(json.dumps({"anatomy": "femur"}))
    with pytest.raises(ValueError, match=r"evaluation/summary\.json: not found"):
        build_report(tmp_path, "femur", {}, ["base"], tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


def test_tiny_workflow_reports_render_completely_in_headless_chromium(tiny_reports, chromium, tmp_path):
    workdir, run = tiny_reports
    assert run.returncode == 0, run.stderr[-4000:]
    for dataset in REPORT_DATASETS:
        results = workdir / "results" / dataset
        report = results / "report.html"
        text = report.read_text()
        # self-contained: no script, stylesheet link or remote source of any kind
        assert "<script" not in text and "<link" not in text and not re.search(r'(src|href)="(?!data:|#)', text)
        page = inspect_in_chromium(chromium, report, tmp_path)
        assert page["sections"] == WITHOUT_LANDMARKS
        assert page["broken"] == []
        expected = [json.loads((results / folder / "figures.json").read_text()) for folder in ("evaluation", "study")]
        figures = [entry["title"] for entries in expected for entry in entries]
        figures += ["Cohort QC", "Preprocessing QC", "Augmentation QC"]
        figures += [f"Training curve: {v}" for v in ("base", "base_focal", "tl", "tl_focal")]
        tables = [entry["title"] for entry in json.loads((results / "evaluation" / "tables.json").read_text())]
        assert set(figures + tables) <= set(page["headings"]), set(figures + tables) - set(page["headings"])
        assert page["images"] == len(figures)  # every figure, no table, is an image
        # provenance: the hash of an input as it is now, and the pinned torch
        digest = hashlib.sha256((results / "cohort" / "subjects.csv").read_bytes()).hexdigest()
        assert f"<td>{dataset}/cohort/subjects.csv</td><td>{digest}</td>" in text
        assert re.search(r"<td>torch</td><td>2\.13\.0", text)
        # the evaluation tables carry the baselines and the paper's timing, labelled
        assert "mean shape" in text and "PCA floor" in text and "reported in the paper" in text

    # Snakemake's own report: every evaluation figure with its caption
    archive = workdir / "snakemake_report.zip"
    result = run_snakemake(workdir, *[f"results/{d}/report.html" for d in REPORT_DATASETS],
                           "--report", str(archive))
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(archive) as bundle:
        names = bundle.namelist()
        content = "".join(bundle.read(n).decode("utf-8", "replace") for n in names if n.endswith((".html", ".js")))
    for figure in ("per_point_rmse.png", "surface_boxplot.png", "surface_heatmaps.png"):
        assert sum(n.endswith(f"/{figure}") for n in names) == len(REPORT_DATASETS), figure
    assert sum("/figures/" in n and n.endswith(".png") for n in names) >= len(REPORT_DATASETS)  # the studies'
    for dataset in REPORT_DATASETS:
        for caption in ("Per-point RMSE on", "Surface-to-surface distance on", "Surface distance maps on",
                        "Clinical study on"):
            assert f"{caption} {dataset}" in content, (caption, dataset)


def _headings(text: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", h)) for h in re.findall(r"<h[1-4][^>]*>(.*?)</h[1-4]>", text, re.S)]


def test_tiny_workflow_reports_open_with_the_answer(tiny_reports):
    """The first screen of every real tiny report: each configured method's test RMSE with its interval
    and n beside the mean shape and the floors (the numbers of the evaluation's tables), the study's
    headline, before every other section; and no heading is a bare file name."""
    workdir, run = tiny_reports
    assert run.returncode == 0, run.stderr[-4000:]
    config = yaml.safe_load(TINY.read_text())["datasets"]
    for dataset in REPORT_DATASETS:
        results = workdir / "results" / dataset
        text = (results / "report.html").read_text()
        sections = re.findall(r'<section id="([^"]+)"><h2>(.*?)</h2>', text)
        assert [title for _, title in sections] == WITHOUT_LANDMARKS
        assert sections[0][1] == ANSWER and text.index("<section") < text.index("<nav>")  # first, before contents
        answer = text[text.index('<section id="the-answer">'):]
        answer = answer[:answer.index("</section>")]

        number = r"-?\d+\.\d\d"
        interval = rf"({number}) \[({number}), ({number})\]"
        summary = pd.read_csv(results / "evaluation" / "tables" / "accuracy_summary.csv").set_index("method")
        paired = pd.read_csv(results / "evaluation" / "tables" / "paired_differences.csv").set_index(
            ["method", "against"])
        for method in config[dataset]["methods"]:
            row = re.search(rf"<tr><td>{re.escape(method)}</td><td>{interval}</td><td>(\d+)</td>", answer)
            assert row, (dataset, method)
            expected = summary.loc[method, ["rmse_mm", "rmse_low_mm", "rmse_high_mm", "n"]]
            assert [float(v) for v in row.groups()] == pytest.approx(list(expected), abs=0.006)
            cell = answer[row.end():answer.index("</tr>", row.end())]
            verdict = paired.loc[(method, MEAN_SHAPE), "verdict"]  # the paired, Holm-adjusted comparison's
            assert "the mean shape" in cell and "paired difference" in cell and "Holm p" in cell
            assert ("beats the mean shape" in cell) == (verdict == "beats"), (dataset, method, cell)
        baselines = ("mean shape (baseline", "reachable floor:", "the true shape through the method",
                     "PCA floor with the true")
        for baseline in baselines:
            assert re.search(rf"<tr><td>{re.escape(baseline)}[^<]*</td><td>{interval}</td><td>\d+</td>", answer), \
                (dataset, baseline)
        assert re.search(r"beat", answer.split("</h3>")[1])  # the sentence says which methods beat the mean shape
        assert "test draw: generator seed" in answer  # which draw the headline was read on
        study = answer[answer.index("<h3>Clinical study: headline</h3>"):]
        assert re.search(interval, study) or "gives no interval" in study, dataset
        assert "<th>n</th>" in study

        files = {p.name for folder in ("evaluation", "study") for p in (results / folder).rglob("*") if p.is_file()}
        names = files | {name.rsplit(".", 1)[0] for name in files}
        names |= {name.replace("_", " ").lower() for name in names}  # "Metopic severity table2" is a file name
        for heading in _headings(text):
            assert heading.strip() not in names and heading.strip().lower() not in names, (dataset, heading)
            assert not re.fullmatch(r"[\w.-]*[_.][\w.-]*", heading.strip()), (dataset, heading)


def test_alignment_table_needs_the_registration_record(tmp_path):
    """A test.npz from before the registration record is named, with what to rerun."""
    from deepssm_workflow.report import _alignment

    old = tmp_path / "test.npz"
    np.savez(old, ids=np.array(["a"]), images=np.zeros((1, 2, 2, 2)), image_to_world=np.eye(4)[None],
             seconds=np.array([1.0]))
    with pytest.raises(ValueError, match=r"test.npz: no registration record .*rerun preprocess_test"):
        _alignment(old)
    with pytest.raises(ValueError, match=r"missing.npz: not found"):
        _alignment(tmp_path / "missing.npz")


def test_the_first_screen_names_flagged_registrations_of_the_registered_methods(tmp_path):
    from deepssm_workflow.layout import DatasetLayout
    from deepssm_workflow.report import _flagged_answer

    layout = DatasetLayout(tmp_path)
    layout.preprocessed("test").parent.mkdir(parents=True)
    np.savez(layout.preprocessed("test"), ids=np.array(["a", "b", "c"]), registration_metric=np.full(3, -0.9),
             registration_warning=np.array(["", "anatomy placed 170 mm outside where the training scans have it", ""]))
    line = _flagged_answer(layout, ["base", "tl", "image2ssm"])
    assert "The registration of 1 of the 3 test scans was flagged as failed (b); base and tl start from it" in line
    assert _flagged_answer(layout, ["image2ssm", "base_uncropped"]) == ""  # no method starts from it
    np.savez(layout.preprocessed("test"), ids=np.array(["a"]), registration_metric=np.array([-0.9]),
             registration_warning=np.array([""]))
    assert _flagged_answer(layout, ["base"]) == ""  # nothing flagged
