"""`nti app` in a real headless browser: Chromium driven through Selenium, as a user clicks.

The user uploads the demo image, first forgets the prompt (the page says so), inverts (the
progress bar shows the walk), then edits "red" to "blue" with a LocalBlend on "circle". The
colours are read from the image the page shows (drawn on a canvas in the browser): the circle
must be blue and the background still green. Then picking MasaCtrl as the editor shows its
controls in place of Prompt-to-Prompt's. A screenshot of the page is saved; with
`NTI_UPDATE_SCREENSHOT=1` it also replaces docs/app.png, the one the README shows.

Chromium and chromedriver come from the OS (`apt-get install chromium chromium-driver`; `.ci/run`
installs them). Without them this test is skipped, saying what is missing and how to install it;
under CI (`CI` set) it fails instead, so CI never passes without having driven the page.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason='the app needs its extra: pip install -e ".[app]"')
from app_server import (  # noqa: E402
    BLUE_PROMPT,
    DEMO_IMAGE,
    DEMO_PROMPT,
    assert_recoloured,
    running_app,
)

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "sudo apt-get install chromium chromium-driver (Debian/Ubuntu; .ci/run installs them)"
CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser_paths() -> tuple[str, str]:
    """(Chromium, chromedriver); without them a skip, or a failure under CI."""
    chromium = next((path for path in map(shutil.which, CHROMIUMS) if path), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if Path(p).is_file()), None
    )
    if chromium and driver:
        return chromium, driver
    missing = " and ".join(name for name, path in (("Chromium", chromium), ("chromedriver", driver)) if not path)
    if os.environ.get("CI"):
        pytest.fail(f"the browser test needs {missing} under CI: {INSTALL}", pytrace=False)
    pytest.skip(f"the browser test needs {missing}: {INSTALL}")


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--force-device-scale-factor=1",
        "--hide-scrollbars",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


#: Draws an `<img>` of the page on a canvas and returns it as a PNG data URL: the pixels the
#: browser shows (the image is served from the same origin, so the canvas can be read).
PIXELS_JS = """
const img = arguments[0];
if (!img.complete || img.naturalWidth === 0) { return null; }
const canvas = document.createElement('canvas');
canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
canvas.getContext('2d').drawImage(img, 0, 0);
return canvas.toDataURL('image/png');
"""


def page_image(driver, img) -> np.ndarray:
    data = wait_for(lambda: driver.execute_script(PIXELS_JS, img), 30, "the image to load")
    png = base64.b64decode(data.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def test_upload_invert_and_edit_red_to_blue_in_the_browser(browser, tmp_path):
    from selenium.webdriver.common.by import By

    def find(selector: str):
        return browser.find_element(By.CSS_SELECTOR, selector)

    def text(selector: str) -> str:
        return find(selector).text

    with running_app(tmp_path / "cache", tmp_path / "downloads") as app:
        started = time.monotonic()
        browser.get(app.url)
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#invert"), 60, "the page")
        print(f"\npage ready in the browser in {time.monotonic() - started:.2f} s")
        find("#image input[type=file]").send_keys(str(DEMO_IMAGE))
        wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#image img"), 30, "the uploaded image's preview")

        # A mistake first: no prompt. The page says what is wrong, and goes on serving.
        find("#invert").click()
        wait_for(
            lambda: "the source prompt is empty" in browser.find_element(By.TAG_NAME, "body").text,
            30,
            "the error message",
        )
        for close in browser.find_elements(By.CSS_SELECTOR, ".toast-close"):
            close.click()

        find("#prompt textarea").send_keys(DEMO_PROMPT)
        find("#invert").click()
        progress = wait_for(
            lambda: "iteration" in text("#inversion") and text("#inversion"), 120, "the walk's progress"
        )
        assert "step " in progress and "t = " in progress, progress
        status = wait_for(lambda: "dB" in text("#status") and text("#status"), 180, "the inversion")
        assert "Null-text inversion of a red circle on a green background" in status and "made in" in status

        find("#targets textarea").send_keys(BLUE_PROMPT)
        find("#blend textarea").send_keys("circle")
        wait_for(lambda: "auto: Replace" in text("#kind-note"), 30, "the kind chosen for the prompts")
        find("#edit").click()
        edited = wait_for(
            lambda: browser.find_elements(By.CSS_SELECTOR, f'#results img[alt="{BLUE_PROMPT}"]'), 120, "the edit"
        )[0]
        assert text("#kind-note").startswith("Replace, 1 edit(s)")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", edited)
        pixels = page_image(browser, edited)
        assert pixels.shape[0] == pixels.shape[1] and pixels.shape[0] % 32 == 0, pixels.shape
        print(f"red -> blue on the page: {assert_recoloured(pixels)}")
        grid = browser.find_elements(By.CSS_SELECTOR, '#results img[alt="input | reconstruction | edits"]')
        attention = browser.find_elements(
            By.CSS_SELECTOR, f"#results img[alt=\"cross-attention of '{DEMO_PROMPT}', per token\"]"
        )
        assert grid and attention
        assert len(browser.find_elements(By.CSS_SELECTOR, "#files a")) >= 3  # each result downloadable

        # The whole page, for the README.
        browser.execute_script("window.scrollTo(0, 0);")
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1400, min(int(height) + 40, 4000))
        time.sleep(0.5)
        shot = tmp_path / "app.png"
        assert browser.save_screenshot(str(shot))
        if os.environ.get("NTI_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, ROOT / "docs" / "app.png")

        # The Editor choice shows the chosen editor's controls alone.
        def shown(selector: str) -> bool:
            return any(element.is_displayed() for element in browser.find_elements(By.CSS_SELECTOR, selector))

        assert shown("#blend") and shown("#kind") and not shown("#masactrl-settings")
        find("#editor").find_element(By.XPATH, ".//label[contains(., 'MasaCtrl')]").click()
        wait_for(lambda: shown("#masactrl-settings") and not shown("#blend") and not shown("#kind"), 30,
                 "MasaCtrl's controls in place of Prompt-to-Prompt's")
        assert "MasaCtrl start step" in text("#masactrl-settings") and not shown("#pnp-settings")
        assert text("#kind-note").startswith("MasaCtrl")


def test_without_chromium_the_browser_test_is_skipped_saying_why_and_under_ci_it_fails(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(Path, "is_file", lambda self: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs Chromium and chromedriver: sudo apt-get install chromium"):
        browser_paths()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="needs Chromium and chromedriver under CI"):
        browser_paths()
