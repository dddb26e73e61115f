"""The Dagster UI and the service's docs in a real browser: Debian's headless Chromium driven by
Playwright (nothing downloaded at run time; `make test-deps` installs the browser).

Screenshots go to the test artifacts folder (`$BRIDGE_TEST_ARTIFACTS`, else `test-artifacts/`).
The drift report's plots are not covered here yet: the session's `dagster dev` has no traffic,
so it has no drift report to show.
"""

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from bridge_assets_tests.dagster_dev import DagsterDev, FirstRound, artifacts_dir

CHROMIUM = Path("/usr/bin/chromium")
# Headless and quiet: no sandbox (root in CI), no GPU, and nothing that phones home.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
ARCHITECTURE_GROUPS = {"ingestion", "features", "training", "registry", "serving", "monitoring"}
GROUPS = "{ assetNodes { groupName } }"
TIMEOUT_MS = 120_000  # a loaded 2-core machine renders slowly; this bounds a hang, it times nothing


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Chromium is missing: run `make test-deps` (apt-get install chromium chromium-driver)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def first_visit(browser: Browser, dagster_dev: DagsterDev) -> SimpleNamespace:
    """The session's first visit to the UI: Dagster greets a new instance with a community
    dialog, which must be dismissed before anything else can be clicked."""
    page = _page(browser)
    page.goto(f"{dagster_dev.url}/asset-groups", wait_until="networkidle")
    dialog = page.get_by_role("dialog").filter(has_text="Join the Dagster community")
    dialog.wait_for()
    _screenshot(page, "dagster-community-dialog")
    dialog.get_by_role("button", name="Skip").click()
    dialog.wait_for(state="detached")
    return SimpleNamespace(page=page)


def _page(browser: Browser) -> Page:
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    page.set_default_timeout(TIMEOUT_MS)
    page.set_default_navigation_timeout(TIMEOUT_MS)
    return page


def _screenshot(page: Page, name: str) -> Path:
    path = artifacts_dir() / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    assert path.stat().st_size > 1_000, f"{path} is suspiciously small for a rendered page"
    return path


def test_the_asset_graph_shows_every_group(first_visit: SimpleNamespace, dagster_dev: DagsterDev):
    page = first_visit.page
    groups = {node["groupName"] for node in dagster_dev.graphql(GROUPS)["assetNodes"]}
    assert ARCHITECTURE_GROUPS <= groups
    expect(page.get_by_role("dialog")).to_have_count(0)  # dismissed for good
    for group in sorted(groups):
        # Each group is a node of the lineage graph (and a row of the sidebar beside it).
        expect(page.get_by_text(group, exact=True).first).to_be_visible()
        assert page.get_by_text(group, exact=True).count() >= 2, f"group {group} is not drawn in the graph"
    _screenshot(page, "dagster-asset-graph")


def test_a_training_materialization_renders_its_metrics_table_and_loss_plot(
    first_visit: SimpleNamespace, dagster_dev: DagsterDev, first_round: FirstRound
):
    assert first_round.candidate is not None
    page = first_visit.page
    page.goto(f"{dagster_dev.url}/assets/candidate_model?view=events", wait_until="networkidle")
    version = str(first_round.candidate.metadata["model_version"])
    expect(page.get_by_text(first_round.candidate.metadata["model_uri"], exact=True)).to_be_visible()
    metrics = page.locator("table").filter(has_text="baseline: linear").last
    expect(metrics).to_be_visible()
    for row in ("reference (best)", "baseline: linear", "baseline: log_linear"):
        expect(metrics.get_by_text(row, exact=True)).to_be_visible()
    _screenshot(page, "dagster-training-metadata")
    page.get_by_text("[Show Markdown]").last.click()
    plot = page.get_by_role("dialog").locator("img[alt='loss curve']")
    expect(plot).to_be_visible()
    complete, width, height = plot.evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert complete and width >= 300 and height >= 150, f"the loss plot of version {version} did not decode"
    _screenshot(page, "dagster-loss-curve")
    page.get_by_role("dialog").get_by_role("button", name="Close").click()


def test_the_service_docs_page_loads(browser: Browser, service: SimpleNamespace):
    """The docs page and the OpenAPI document it renders, as the browser fetches them. (Swagger
    UI's script and styles come from a CDN in FastAPI's default page, unreachable offline.)"""
    page = _page(browser)
    reply = page.goto(f"{service.url}/docs", wait_until="domcontentloaded")
    assert reply is not None and reply.status == 200
    expect(page).to_have_title("bridge house-price prediction - Swagger UI")
    spec = page.request.get(f"{service.url}/openapi.json")
    assert spec.ok and "/predict" in spec.json()["paths"]
    _screenshot(page, "service-docs")
    page.close()
