"""Headless Chromium (driven by Playwright) opens the report and the MLflow UI served on
loopback: screenshots, the heatmap image is rendered and not blank, and the study's runs
appear in the UI.

Needs Debian's `chromium` (`.ci/run` installs it); Playwright's own browser download is not
used. Without chromium the tests are skipped, saying so.
"""

import os
import re
import shutil
import signal
import subprocess

import mlflow
import numpy as np
import pytest
from localserver import free_port, wait_for_http
from PIL import Image

from omgseg.dashboards.report import build_report
from omgseg.dashboards.ui import ui_command

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine notes say: no background connections (the network is closed), no sandbox as root.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs Debian's chromium)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def _not_blank(path) -> float:
    return float(np.asarray(Image.open(path).convert("RGB")).astype(int).std())


def test_the_report_renders_its_heatmap(small_study, browser, tmp_path):
    _, result = small_study
    built = build_report(result.out, out=tmp_path / "report" / "index.html", samples=0, log_to_mlflow=False)
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(built.html.as_uri())
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    heatmap = page.locator("#influence img").first
    assert heatmap.evaluate("img => img.complete && img.naturalWidth > 0"), "the heatmap image did not load"
    heatmap.screenshot(path=str(tmp_path / "heatmap.png"))
    pixels = np.asarray(Image.open(tmp_path / "heatmap.png").convert("RGB")).astype(int)
    assert pixels.std() > 10 and (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).sum() > 500, "the heatmap is blank"
    assert _not_blank(tmp_path / "report.png") > 10
    for section in ("summary", "influence", "correlation", "metrics", "affinity", "runs", "samples"):
        assert page.locator(f"section#{section} h2").is_visible()
    page.close()


def test_the_mlflow_ui_shows_the_study_runs(small_study, browser, tmp_path):
    _, result = small_study
    port = free_port()
    command, _, state = ui_command(result.out, "127.0.0.1", port)
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", "the MLflow UI", process=server)
        experiment = mlflow.MlflowClient(result.tracking_uri).get_run(state.parent_run_id).info.experiment_id
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs")
        page.get_by_text(re.compile(r"[1-9]\d* matching runs")).wait_for(timeout=60_000)
        page.get_by_role("link", name=result.summary.study, exact=True).wait_for(timeout=30_000)  # the parent run
        # Trials are nested under the study's parent run: open it.
        page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
        trials = ["coco-s0", "coco-s1", "davis-s0", "davis-s1", "coco+davis-s0", "coco+davis-s1"]
        for trial in trials:
            page.get_by_text(trial, exact=True).wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "mlflow.png"))
        assert _not_blank(tmp_path / "mlflow.png") > 5
        assert set(re.findall(r">([a-z+]+-s\d)<", page.content())) == set(trials)
        page.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
