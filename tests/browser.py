"""Headless Debian Chromium through selenium, for tests that open the HTML report in a real browser."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER_CANDIDATES = (Path("/usr/bin/chromedriver"), Path("/usr/lib/chromium/chromedriver"))


def chromedriver() -> Path | None:
    """The chromedriver of Debian's chromium-driver package, or one on PATH."""
    for path in CHROMEDRIVER_CANDIDATES:
        if path.is_file():
            return path
    found = shutil.which("chromedriver")
    return Path(found) if found else None


def missing_reason() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    if chromedriver() is None:
        return "chromedriver not found (apt-get install chromium-driver)"
    return None


@contextmanager
def headless_chromium(profile_dir: Path, width: int = 1200, height: int = 900) -> Iterator["object"]:
    """A selenium Chrome driver on headless Chromium, offline-friendly, console log captured."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile_dir}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(chromedriver())), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[dict]:
    """Browser console entries at level SEVERE (errors, CSP violations, failed loads)."""
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
