"""Headless Chromium for tests: load a local page, check its images, read its console, screenshot it.

Uses Debian's ``chromium`` and ``chromedriver`` (apt packages chromium, chromium-driver) through Selenium,
with both paths given explicitly so Selenium Manager never runs (it would try to download a browser).
The browser is started with networking features off and a fresh profile; pages are loaded from file://.

``require_chromium()`` returns the two paths or ends the test: it tries ``apt-get install`` once when the
process is root, then FAILS in CI (env CI=true) and SKIPS elsewhere, with a one-line reason.

As a command it screenshots a page, e.g. the docs' report image from a real ``wattledger bench --quick``::

    python tests/browser.py runs/latest/report.html docs/images/report-simulated.png --width 960 --max-height 2600
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from debian_packages import try_install, unavailable

CHROMIUM_NAMES = ("chromium", "chromium-browser")
DRIVER_NAMES = ("chromedriver",)
DRIVER_EXTRA_PATHS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-extensions", "--disable-default-apps", "--no-default-browser-check", "--mute-audio",
    "--hide-scrollbars", "--force-device-scale-factor=1",
)


@dataclass
class PageCheck:
    """What a page load showed: images, SEVERE console entries, the screenshot written."""

    images: list[dict] = field(default_factory=list)  # src (first 60 chars), complete, naturalWidth, alt
    severe: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    title: str = ""
    text: str = ""  # document.body.innerText: what a reader sees, tags and alt texts left out
    figures: list[dict] = field(default_factory=list)  # per <figure>: id, has an img, caption text

    @property
    def all_images_loaded(self) -> bool:
        return bool(self.images) and all(i["complete"] and i["naturalWidth"] > 0 for i in self.images)


def find_chromium() -> tuple[str, str] | None:
    browser = next((p for p in (shutil.which(n) for n in CHROMIUM_NAMES) if p), None)
    driver = next((p for p in (shutil.which(n) for n in DRIVER_NAMES) if p), None)
    driver = driver or next((p for p in DRIVER_EXTRA_PATHS if os.access(p, os.X_OK)), None)
    return (browser, driver) if browser and driver else None


def require_chromium() -> tuple[str, str]:
    """The chromium and chromedriver paths; else fail (CI=true) or skip, with a one-line reason."""
    found = find_chromium()
    if found is None:
        attempt = try_install("chromium", "chromium-driver")
        found = find_chromium()
        if found is None:
            unavailable(f"headless Chromium unavailable: chromium and chromedriver not on PATH ({attempt})")
    return found


def check_page(path: Path, screenshot: Path, width: int = 1280, chromium: tuple[str, str] | None = None,
               timeout_seconds: float = 20.0, max_height: int | None = None) -> PageCheck:
    """Load ``path`` (a local file) headless; report its images, visible text, figures and SEVERE console
    entries; save a PNG screenshot of the whole page (or its top ``max_height`` CSS pixels) to
    ``screenshot``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium or require_chromium()
    profile = tempfile.mkdtemp(prefix="wattledger-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},900")
    # No network at all: any request that is not file: or data: goes to an unreachable proxy.
    options.add_argument("--proxy-server=http://127.0.0.1:9")
    options.add_argument("--proxy-bypass-list=<-loopback>")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(timeout_seconds)
        driver.get(Path(path).resolve().as_uri())
        WebDriverWait(driver, timeout_seconds).until(
            lambda d: d.execute_script("return document.readyState") == "complete")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({src: i.src.slice(0, 60), complete: i.complete,"
            " naturalWidth: i.naturalWidth, alt: i.alt}));")
        severe = [f"{e.get('source', '')}: {e.get('message', '')}" for e in driver.get_log("browser")
                  if e.get("level") == "SEVERE"]
        text = driver.execute_script("return document.body.innerText;")
        figures = driver.execute_script(
            "return Array.from(document.querySelectorAll('figure')).map(f => ({id: f.id,"
            " img: f.querySelector('img') !== null, caption: (f.querySelector('figcaption') || {}).innerText"
            " || ''}));")
        metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        height = min(size["height"], max_height) if max_height else size["height"]
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": height, "scale": 1}})
        screenshot = Path(screenshot)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return PageCheck(images=images, severe=severe, screenshot=screenshot, title=driver.title, text=text,
                         figures=figures)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Screenshot a local page; exit 1 when an image did not load or the console logged a SEVERE entry."""
    import argparse

    parser = argparse.ArgumentParser(description="headless Chromium screenshot of a local page")
    parser.add_argument("page", type=Path)
    parser.add_argument("screenshot", type=Path)
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels")
    parser.add_argument("--max-height", type=int, default=None, help="keep only the top of the page")
    args = parser.parse_args(argv)
    found = find_chromium()
    if found is None:
        print("browser.py: chromium and chromedriver not on PATH (apt-get install chromium chromium-driver)")
        return 1
    result = check_page(args.page, args.screenshot, width=args.width, chromium=found, max_height=args.max_height)
    problems = ([] if result.all_images_loaded else ["an image did not load"]) + result.severe
    for problem in problems:
        print(f"browser.py: {problem}")
    print(f"browser.py: wrote {args.screenshot} ({len(result.images)} images, title {result.title!r})")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
