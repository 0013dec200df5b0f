"""A real headless Chromium for the console's tests: Debian's ``chromium`` driven by its ``chromedriver``
through selenium, with the browser's console log collected (``goog:loggingPrefs``) so that tests can assert
that a page logged no error."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.helpers.data import REPO

CHROMIUM_BINARIES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
SCREENSHOTS = REPO / "tests" / "artifacts" / "screenshots"
LAPTOP = (1280, 900)
PHONE = (390, 844)


def _first(candidates: tuple[str, ...], name: str) -> str | None:
    for candidate in candidates:
        if Path(candidate).is_file():
            return candidate
    return shutil.which(name)


def missing() -> str | None:
    """Why no browser test can run here (None: all is there)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    if _first(CHROMIUM_BINARIES, "chromium") is None:
        return "Chromium is not installed (apt-get install chromium chromium-driver)"
    if _first(CHROMEDRIVERS, "chromedriver") is None:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    return None


def start_chromium(download_dir: Path):
    """A headless Chromium (selenium WebDriver) at a laptop's window size, logging the console; files the
    pages download land in ``download_dir`` (also ``driver.download_dir``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _first(CHROMIUM_BINARIES, "chromium")
    for argument in (
        "--headless=new",
        "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces it may not have
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        "--password-store=basic",
        f"--window-size={LAPTOP[0]},{LAPTOP[1]}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    prefs = {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    options.add_experimental_option("prefs", prefs)
    service = Service(executable_path=_first(CHROMEDRIVERS, "chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    # downloads (the console's "Download SVG") land in download_dir, without a prompt, in headless mode too
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)}
    )
    driver.download_dir = download_dir
    return driver


def console_errors(driver) -> list[str]:
    """The browser console's SEVERE entries since the last call (reading the log empties it)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, name: str) -> Path:
    """A PNG of the whole page under tests/artifacts/screenshots/ (not committed)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def screenshot_page(driver, name: str, *, height: int = 2400) -> Path:
    """A PNG of the top ``height`` pixels of the page at a laptop's width (the window is grown, then restored)."""
    driver.execute_script("window.scrollTo(0, 0)")
    driver.set_window_size(LAPTOP[0], height)
    try:
        return screenshot(driver, name)
    finally:
        driver.set_window_size(*LAPTOP)


def downloaded(driver, name: str, timeout: float = 30.0) -> bytes:
    """The bytes of the file ``name`` the page downloaded (waits for Chromium to finish writing it)."""
    import time

    path = Path(driver.download_dir) / name
    deadline = time.monotonic() + timeout
    while not path.is_file() or Path(str(path) + ".crdownload").exists():
        assert time.monotonic() < deadline, f"{name} was not downloaded"
        time.sleep(0.05)
    return path.read_bytes()
