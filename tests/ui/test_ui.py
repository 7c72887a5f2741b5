"""The Dagster UI as a user drives it, in a real headless chromium (Debian's /usr/bin/chromium).

One world (tests/ui/world.py) and one `dagster dev` serve every test of this module. Each test
saves a screenshot of what it checked under ``$MLOC_TEST_ARTIFACTS`` (or pytest's temporary
directory), printed at the end of the run with ``-rA`` or ``-s``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ui.world import DIALECT, build_world, dagster_dev
from tests.world import copy_home

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("MLOC_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ASSETS = ["dataset_version", "base_model", "adapter_checkpoint", "merged_candidate", "gate_report",
          "production_adapter", "pool_report",
          # the TTS track beside it, on the same dialect partitions (its group "tts"); the graph
          # shortens longer names (tts_ad…_checkpoint, tts_produ…_adapter), so those are not listed
          "tts_base_model", "tts_candidate", "tts_gate_report"]
TIMEOUT_MS = 60_000

if not CHROMIUM.exists():
    pytest.skip(f"no chromium at {CHROMIUM} (scripts/setup.sh installs Debian's)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
# The page's default timeout covers actions only; assertions (expect) have their own 5 s default, too
# short for a tab that loads its data on a loaded CI machine ("Loading plots…" outlived it once).
sync_api.expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("MLOC_TEST_ARTIFACTS")
    path = Path(root) / "ui" if root else tmp_path_factory.mktemp("ui-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def ui(tmp_path_factory, base_home) -> Iterator[str]:
    """The world built on a copy of the suite's base home, and `dagster dev` serving it."""
    root = tmp_path_factory.mktemp("ui-world")
    home = root / "mloc"
    copy_home(base_home[0], home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLOC_HOME", str(home))
        mp.setenv("DAGSTER_HOME", str(home / "dagster"))
        mp.delenv("MLOC_DATABASE_URL", raising=False)
        build_world()
        with dagster_dev(home, root / "dagster-dev.log") as url:
            yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, ui, artifacts, request) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    page.screenshot(path=str(artifacts / f"{request.node.name}.png"), full_page=True)
    context.close()


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_load_state("networkidle")
    dismiss_dialogs(page)


def dismiss_dialogs(page) -> None:
    """The first load may greet with a community/newsletter dialog: close it, whatever it says."""
    for name in ("Dismiss", "No thanks", "Not now", "Skip", "Close", "Got it"):
        button = page.locator(".bp5-dialog").get_by_role("button", name=name)
        if button.count():
            button.first.click()
    if page.locator(".bp5-dialog").count():
        page.keyboard.press("Escape")


def test_lineage_shows_every_asset(page, ui) -> None:
    open_page(page, f"{ui}/asset-groups")
    page.get_by_text("Global asset lineage").wait_for()
    # Groups start collapsed; the graph's context menu expands them all (once the graph is drawn).
    page.get_by_text("candidates", exact=True).last.wait_for()
    expand = page.get_by_role("menuitem", name="Expand all groups")
    for _ in range(20):
        page.mouse.click(1300, 900, button="right")
        if expand.count():
            break
        page.keyboard.press("Escape")
        page.wait_for_timeout(500)
    expand.click()
    for asset in ASSETS:
        sync_api.expect(page.get_by_text(asset, exact=True).first).to_be_visible()


def test_dataset_version_partition_metadata(page, ui) -> None:
    open_page(page, f"{ui}/assets/dataset_version?view=partitions&partition={DIALECT}")
    for key in ("rows", "hours", "speakers", "train_rows", "dev_rows", "test_rows", "quarantined",
                "quarantined_by_reason", "quarantine_sample", "preview", "path"):
        sync_api.expect(page.locator("td").filter(has_text=re.compile(rf"^{key}$")).first).to_be_visible()
    sync_api.expect(page.get_by_text("No rejected rows.").first).to_be_visible()  # quarantine sample
    sync_api.expect(page.get_by_text("utt_id").first).to_be_visible()  # the preview table's header
    sync_api.expect(page.get_by_text(f"datasets/{DIALECT}/versions/").first).to_be_visible()


def test_materialize_one_partition_from_the_ui(page, ui) -> None:
    open_page(page, f"{ui}/assets/dataset_version")
    page.get_by_role("button", name="Materialize…").click()
    page.get_by_text("Select a partition or create one").click()
    page.get_by_role("menuitem").filter(has_text="en-us").click()
    page.keyboard.press("Escape")  # close the partition picker, keep the dialog
    page.locator(".bp5-dialog").get_by_role("button", name="Launch 1 run").click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    toast.wait_for()
    page.get_by_text("View", exact=True).last.click()  # the toast's link to the run
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    # The daemon of `dagster dev` dequeues and launches it; ingest of one batch takes seconds.
    sync_api.expect(page.get_by_text("Success", exact=True).first).to_be_visible(timeout=240_000)
    body = page.inner_text("body")
    assert "dataset_version" in body and "en-us" in body  # the step and the partition it ran


def test_gate_report_markdown_and_checks(page, ui, artifacts) -> None:
    open_page(page, f"{ui}/assets/gate_report?view=checks")
    for check in ("cer_gate", "wer_gate", "improvement_gate", "regression_gate"):
        sync_api.expect(page.get_by_text(check, exact=True).first).to_be_visible()
    sync_api.expect(page.get_by_text("Succeeded")).to_have_count(4)
    sync_api.expect(page.get_by_text("This is a blocking asset check.", exact=False).first).to_be_visible()
    page.screenshot(path=str(artifacts / "test_gate_report_checks.png"), full_page=True)

    open_page(page, f"{ui}/assets/gate_report?view=events")
    page.get_by_text("[Show Markdown]").first.click()
    report = page.locator(".bp5-dialog")
    sync_api.expect(report.get_by_text("Gate decision", exact=False).first).to_be_visible()
    assert "passed" in report.inner_text().lower()


def test_dev_cer_plot_across_materializations(page, ui) -> None:
    open_page(page, f"{ui}/assets/adapter_checkpoint")
    page.get_by_role("button", name="Plots").click()
    page.get_by_role("button", name="Events").click()  # one point per materialization, not per partition
    title = page.get_by_text("dev_cer", exact=True).first
    sync_api.expect(title).to_be_visible()
    title.scroll_into_view_if_needed()
    assert page.locator("canvas").count() >= 1


def test_pool_report_renders_with_its_charts(page, ui) -> None:
    open_page(page, f"{ui}/assets/pool_report")  # unpartitioned: the markdown renders inline
    for heading in ("Success rate per job kind", "Failure reasons", "GPU-hours per dialect", "GPU-hours per node",
                    "Dev CER per dialect over time"):
        sync_api.expect(page.get_by_text(heading, exact=True).first).to_be_visible()
    sync_api.expect(page.get_by_text(re.compile("█+")).first).to_be_visible()  # the text charts
