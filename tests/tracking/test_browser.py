"""End to end in headless Chromium: the MLflow UI shows the study, the dashboard renders offline.

Needs /usr/bin/chromium and Playwright; run with `pytest -m browser`. Screenshots go to
$DMDOPT_SCREENSHOT_DIR (else tmp_path/screenshots) and their paths are printed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dmdopt.tracking import StudyTracker, start_ui, stop_ui, wait_until_up
from dmdopt.tracking.dashboard import PLOT_IDS

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STUDY = "browser-study"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def populated(mlflow_store, make_summary):
    """A parent run, one child per finished trial and the dashboard artifact."""
    summary = make_summary(STUDY)
    summary["trials"] = [t for t in summary["trials"] if t["state"] != "RUNNING"]
    tracker = StudyTracker(mlflow_store, STUDY)
    assert tracker.sync(summary) == 4
    return tracker, tracker.ensure_parent(summary)


@pytest.fixture(scope="module")
def ui(mlflow_store, populated, tmp_path_factory):
    log = tmp_path_factory.mktemp("ui") / "server.log"
    port = _free_port()
    proc = start_ui(port=port, backend_store_uri=mlflow_store, log_file=log)
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_until_up(url, timeout=180, proc=proc):
            pytest.fail(f"MLflow server did not come up; log:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        stop_ui(proc)


@pytest.fixture
def shots(tmp_path) -> Path:
    where = Path(os.environ.get("DMDOPT_SCREENSHOT_DIR") or tmp_path / "screenshots")
    where.mkdir(parents=True, exist_ok=True)
    return where


def _console_errors(page) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return errors


def test_mlflow_ui_lists_study_runs_and_artifacts(chromium, ui, populated, shots):
    tracker, parent_id = populated
    page = chromium.new_page(viewport={"width": 1500, "height": 950})
    errors = _console_errors(page)
    # MLflow 3 opens experiments on its GenAI pages unless told the workflow is model training
    page.goto(f"{ui}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning")
    page.get_by_text(STUDY, exact=True).last.wait_for(timeout=90_000)
    row = page.locator("[role=row]", has_text=STUDY).last
    row.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # expand
    for number in range(4):
        page.get_by_text(f"trial-{number:03d}", exact=True).first.wait_for(timeout=30_000)
    runs_png = shots / "mlflow-runs.png"
    page.screenshot(path=str(runs_png))

    page.goto(f"{ui}/#/experiments/{tracker.experiment_id}/runs/{parent_id}/artifacts"
              "?workflowType=machine_learning")
    for name in ("dashboard.html", "pareto.csv", "pareto.html", "pareto.png"):
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
    page.get_by_text("pareto.png", exact=True).first.click()
    page.locator("img[src^='blob:']").first.wait_for(timeout=60_000)  # the PNG preview
    artifacts_png = shots / "mlflow-artifact-png.png"
    page.screenshot(path=str(artifacts_png))

    # the UI previews HTML artifacts in a sandboxed iframe that may run scripts: plots render
    page.get_by_text("dashboard.html", exact=True).first.click()
    frame = page.frame_locator("iframe").first
    for pid in PLOT_IDS:
        frame.locator(f".plot#{pid} .main-svg").first.wait_for(state="attached", timeout=60_000)
    dashboard_png = shots / "mlflow-artifact-dashboard.png"
    page.screenshot(path=str(dashboard_png))
    page.close()
    print(f"\nscreenshots: {runs_png}\n             {artifacts_png}\n             {dashboard_png}")
    # MLflow's own UI logs errors we don't own (e.g. 404 on /users/current without auth)
    print(f"MLflow UI console errors (not asserted): {errors}")


def test_dashboard_renders_every_plot_offline(chromium, mlflow_store, populated, shots):
    tracker, parent_id = populated
    html = Path(tracker.client.download_artifacts(parent_id, "dashboard.html"))
    context = chromium.new_context(offline=True, viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = _console_errors(page)
    remote: list[str] = []
    page.on("request", lambda req: remote.append(req.url)
            if not req.url.startswith(("file:", "data:", "blob:")) else None)
    page.goto(html.as_uri())
    assert page.locator(".plot").count() == len(PLOT_IDS)
    for pid in PLOT_IDS:
        page.locator(f".plot#{pid} .main-svg").first.wait_for(state="attached", timeout=30_000)
        assert page.locator(f".plot#{pid} .main-svg").count() >= 1, pid
    assert page.locator(".plot#pareto .scatterlayer .trace").count() >= 3  # trials, front, ref
    assert page.locator(".plot#knob-horizon .xtick text", has_text="inf").count() == 1
    dashboard_png = shots / "dashboard.png"
    page.screenshot(path=str(dashboard_png), full_page=True)
    context.close()
    print(f"\nscreenshot: {dashboard_png}")
    assert errors == [] and remote == []
