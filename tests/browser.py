"""A real browser for the UI tests: Debian's headless Chromium driven through its chromedriver by Selenium.

`make browser` installs both packages when they are missing (`make test` does it first), as `make postgres` does for
the server tests. Selenium is given the driver's path, so it never looks for one online.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

WIDTH, HEIGHT = 1400, 900  # the window: a laptop screen, the size the README's screenshot is taken at


def _find(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(f"{' / '.join(names)} is not installed: run `make browser` (make test does it first)")


@contextmanager
def chromium(width: int = WIDTH, height: int = HEIGHT) -> Iterator[Any]:
    """A headless Chromium (a Selenium ``WebDriver``), quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _find("chromium", "chromium-browser")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(_find("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout_s: float = 60.0, what: str = "the page") -> Any:
    """Poll ``condition`` until it returns something truthy (its value) or ``timeout_s`` passes (AssertionError
    naming ``what``). The single-page UI fills itself in after the page has loaded, so readiness is a condition on
    the DOM, not a fixed wait; the generous bound only matters on a loaded machine."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = condition()
        except Exception:  # an element replaced while React renders it
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not appear within {timeout_s:.0f} s")
        time.sleep(0.25)
