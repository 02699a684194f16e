"""The HTML report of a small study: every section, self-contained, figures not blank, MLflow
artifacts; a folder that is not a study gives one clear line."""

import io
from html.parser import HTMLParser

import mlflow
import numpy as np
import pytest
from PIL import Image

from omgseg.dashboards.report import SECTIONS, build_report, main


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.current = None
        self.scripts = 0
        self.external = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.current = attrs["id"]
            self.sections[self.current] = {"img": [], "a": [], "text": []}
        if tag == "script":
            self.scripts += 1
        if "src" in attrs and not attrs["src"].startswith("data:image/png;base64,"):
            self.external.append(attrs["src"])  # links (href) may point anywhere; loaded resources may not
        if tag == "link":
            self.external.append(attrs.get("href", ""))
        if self.current and tag == "img":
            self.sections[self.current]["img"].append(attrs["src"])
        if self.current and tag == "a":
            self.sections[self.current]["a"].append(attrs["href"])

    def handle_data(self, data):
        if self.current:
            self.sections[self.current]["text"].append(data)


@pytest.fixture(scope="module")
def report(small_study, tmp_path_factory):
    _, result = small_study
    return result, build_report(result.out, samples=1)


def test_every_section_is_there_and_self_contained(report):
    result, built = report
    page = _Page()
    page.feed(built.html.read_text())
    assert list(page.sections) == list(SECTIONS)
    assert page.scripts == 0 and page.external == []  # works offline: no scripts, no files, no CDN
    for name in ("influence", "correlation", "metrics", "affinity", "samples"):
        assert page.sections[name]["img"], f"section {name} has no figure"
    runs = " ".join(page.sections["runs"]["text"])
    for trial in ("coco-s0", "coco-s1", "davis-s0", "davis-s1", "coco+davis-s0", "coco+davis-s1"):
        assert trial in runs
    links = page.sections["runs"]["a"]
    assert len(links) == 6 and all(link.startswith("http://127.0.0.1:5000/#/experiments/") for link in links)
    # one sample picture per (data set, task): coco panoptic, coco semantic, davis vos
    assert len(page.sections["samples"]["img"]) == 3


def test_figures_are_pngs_that_are_not_blank(report):
    _, built = report
    expected = {"influence_primary_pair", "influence_primary_leave_one_out", "correlation", "metrics", "affinity_vs_influence"}
    assert expected <= set(built.figures)
    for name, path in built.figures.items():
        pixels = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB")).astype(int)
        assert pixels.std() > 10, f"{name} looks blank"
    heat = np.asarray(Image.open(built.figures["influence_primary_pair"]).convert("RGB")).astype(int)
    coloured = (np.abs(heat[..., 0] - heat[..., 2]) > 60).sum()  # the diverging colour map's reds and blues
    assert coloured > 500


def test_the_report_is_logged_to_the_parent_run(report):
    result, built = report
    client = mlflow.MlflowClient(result.tracking_uri)
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert "report/index.html" in logged and "report/influence_primary_pair.png" in logged


def test_not_a_study_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a study folder" in err
