"""The leaderboard where researchers look, checked in a real browser: `make ui` (the tracking server on a sqlite
store) holding two tiny training runs and their leaderboard, the compared experiment's page loaded in headless
Chromium (``tests/browser.py``), and what it renders read from the DOM.

``NLPLATFORM_UPDATE_SCREENSHOTS=1`` (``make screenshots``) also writes the rendered page to the README's image."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.browser import HEIGHT, WIDTH, chromium, wait_for
from tests.train.conftest import FAST, ROOT, TINY_RECIPE, needs_corpus, run_cli

pytestmark = needs_corpus

EXPERIMENT = "ui-compare"
SCREENSHOT = ROOT / "docs" / "img" / "leaderboard-ui.png"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """(page link printed by `nlplatform leaderboard`, UI address printed by `make tracking-server`, tracking URI,
    runs best first): two tiny Transformer++ runs at two learning rates in one experiment of a fresh sqlite store
    served by `make tracking-server` (what `make ui` is), then the leaderboard of that experiment through the command
    line."""
    from tests.servers import start_tracking_server

    work = tmp_path_factory.mktemp("ui")
    server = start_tracking_server(f"sqlite:///{work / 'mlruns.db'}", work / "artifacts", work / "server.log")
    try:
        for lr in ("3e-3", "3e-2"):
            proc = run_cli(
                "train",
                str(TINY_RECIPE),
                *FAST,
                "trainer.max_steps=6",
                "trainer.val_check_interval=6",
                f"optim.lr={lr}",
                f"output_dir={work / 'runs'}",
                f"tracking.tracking_uri={server.uri}",
                f"tracking.experiment={EXPERIMENT}",
                cwd=work,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
        proc = run_cli("leaderboard", "--experiment", EXPERIMENT, "--tracking-uri", server.uri, cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        links = re.findall(rf"leaderboard of '{EXPERIMENT}' in the MLflow UI: (\S+)", proc.stderr)
        assert len(links) == 1, proc.stderr
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        runs = client.search_runs([experiment.experiment_id], order_by=["metrics.`summary/val_ppl` ASC"])
        (home,) = re.findall(r"^the UI: (\S+)", (work / "server.log").read_text(), flags=re.MULTILINE)
        yield links[0], home, server.uri, [r.info.run_name for r in runs]
    finally:
        server.stop()


def _open(driver, link: str):
    """Load ``link`` as a first-time visitor would, without the assistant panel MLflow opens once per browser (a
    user closes it once; it would cover a third of the page)."""
    home = link.split("#")[0]
    driver.get(home)
    driver.execute_script(
        "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
        "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
    )
    driver.get(link)
    driver.refresh()  # a new hash alone does not reload the app: reload it so that it reads the settings above


def _expand(driver) -> None:
    """Open the experiment's description (the UI shows its first line until then), once the button takes clicks (a
    page still settling can cover it for a moment)."""
    from selenium.webdriver.common.by import By

    button = "[data-component-id='mlflow.experiment.metadata_editor.expand_button']"
    wait_for(lambda: driver.find_element(By.CSS_SELECTOR, button).click() or True, what="the description's arrow")


def _leaderboard_rows(driver) -> list[list[str]]:
    """The visible rows of the leaderboard table in the experiment's description, as cell texts."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.XPATH, "//h4[starts-with(., 'Leaderboard')]/following-sibling::table//tbody/tr")
    return [[cell.text.strip() for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows if row.is_displayed()]


@pytest.mark.slow
def test_the_experiment_page_shows_the_leaderboard_rows_in_rank_order(ui):
    """The link `nlplatform leaderboard` prints opens the compared experiment in the model-training layout: its
    description's headline names the best run, one click expands the ranked table (every run, in val ppl order,
    linked to its page), and the runs table below is sorted the same way, with no marker text showing."""
    from selenium.webdriver.common.by import By

    link, _, uri, ranked = ui
    assert "workflowType=machine_learning" in link
    experiment = MlflowClient(uri).get_experiment_by_name(EXPERIMENT)  # created by training, marked as model training
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    with chromium() as driver:
        _open(driver, link)
        headline = wait_for(
            lambda: driver.find_element(By.XPATH, "//h4[starts-with(., 'Leaderboard')]"),
            what="the leaderboard's headline",
        )
        assert headline.is_displayed() and f"{ranked[0]} first" in headline.text
        # the runs table, sorted by val ppl (its run-name cells are links to the runs)
        names = wait_for(
            lambda: (
                [
                    e.text
                    for e in driver.find_elements(By.CSS_SELECTOR, "a[href*='/runs/']")
                    if e.text in ranked and not e.find_elements(By.XPATH, "ancestor::table")
                ]
                or None
            ),
            what="the runs table",
        )
        assert names == ranked
        _expand(driver)
        rows = wait_for(lambda: _leaderboard_rows(driver), what="the expanded leaderboard table")
        assert [row[0] for row in rows] == ["1", "2"]
        assert [row[1] for row in rows] == ranked
        assert all(row[2] == "transformer" for row in rows)
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "nlplatform:leaderboard" not in body and "<!--" not in body


@pytest.mark.slow
def test_two_clicks_from_make_ui_show_the_ranking_as_the_readmes_screenshot(ui, tmp_path):
    """From the address `make ui` prints: the first time, the layout switch ("Model training", which the browser
    keeps), the experiment and the description's arrow; on every later visit two clicks, experiment then arrow, show
    the ranked table on the experiment's runs page. That page is rendered to a PNG of the viewport's size (the README
    shows it; NLPLATFORM_UPDATE_SCREENSHOTS=1 writes it there)."""
    from selenium.webdriver.common.by import By

    _, home, _, ranked = ui

    def to_the_ranking(driver) -> list[list[str]]:
        wait_for(lambda: driver.find_element(By.LINK_TEXT, EXPERIMENT), what="the experiment list").click()
        headline = wait_for(
            lambda: driver.find_element(By.XPATH, "//h4[starts-with(., 'Leaderboard')]"),
            what="the leaderboard's headline",
        )
        assert f"{ranked[0]} first" in headline.text
        _expand(driver)
        return wait_for(lambda: _leaderboard_rows(driver), what="the expanded leaderboard table")

    with chromium() as driver:
        _open(driver, home)
        wait_for(
            lambda: driver.find_element(By.XPATH, "//*[normalize-space(text())='Model training']"),
            what="the layout switch",
        ).click()
        assert [row[1] for row in to_the_ranking(driver)] == ranked
        driver.get(home)  # a later visit: the browser kept the layout
        driver.refresh()
        assert [row[1] for row in to_the_ranking(driver)] == ranked
        assert "workflowType=genai" not in driver.current_url
        assert driver.find_element(By.XPATH, "//h2[normalize-space(.)='Runs'] | //*[normalize-space(text())='Runs']")
        png = driver.get_screenshot_as_png()
    assert png.startswith(PNG_MAGIC)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == WIDTH and HEIGHT // 2 < height <= HEIGHT  # the viewport: the window less the browser's frame
    (tmp_path / "page.png").write_bytes(png)
    if os.environ.get("NLPLATFORM_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)
    assert Path(SCREENSHOT).is_file(), "the README's screenshot is missing: run `make screenshots`"
