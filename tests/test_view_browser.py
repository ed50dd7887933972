"""The station view in a real browser: Debian's chromium, headless, driven by Selenium through
chromium-driver (.ci/run installs both), against ``edgead-run synthetic://metal`` with a real small
bundle. The page loads, the frame updates, an NG part appears in the strip with working links, the
counters equal summary.json when the run ends, and beyond localhost a request without the token is
refused. The screenshot it takes is the README's (docs/view.png: written when missing or when
EDGEAD_UPDATE_SCREENSHOT=1, so an ordinary test run leaves the tree clean)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("aiohttp")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")

from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from view_support import ROOT, Station, view_bundle  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FRAME = 192  # synthetic frame size; the model sees 32²
TOKEN = "browser-test-token-42"
COUNTERS = ("captured", "inspected", "dropped", "errored", "ng", "ok")

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them: "
                    "apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    except WebDriverException as err:
        pytest.skip(f"chromium does not start here: {err.msg}")
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return view_bundle(tmp_path_factory)


def page(driver, script: str):
    return driver.execute_script(f"return {script};")


def until(driver, script: str, timeout: float = 60.0, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: page(d, script), message=what or script)


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=20) as response:
        return response.read()


def test_live_page_strip_and_final_counters(browser, bundle, tmp_path):
    station = Station(tmp_path, f"synthetic://metal?size={FRAME}&seed=1&defect_rate=0.5", "--model", str(bundle),
                      "--output", "http://127.0.0.1:0", "--input-rate", "20")
    try:
        url = station.url()
        browser.get(url)
        assert browser.title == "edgead station view"
        until(browser, "document.body.dataset.state === 'live'", what="the page connects")

        # The frame updates: the image shows newer and newer frames.
        first = until(browser, "window.edgeadView.framesShown >= 1 && window.edgeadView.lastFrame",
                      what="a first frame") or 0
        until(browser, f"window.edgeadView.framesShown >= 3 && window.edgeadView.lastFrame > {first}",
              what="newer frames")
        image = browser.find_element(By.ID, "frame")
        assert page(browser, "window.edgeadView.frameSize") == [FRAME, FRAME]  # as loaded
        assert image.get_attribute("src").startswith("blob:") and image.get_attribute("data-verdict") in ("OK", "NG")
        assert browser.find_element(By.ID, "verdict").text in ("OK", "NG")
        assert browser.find_element(By.ID, "run-detector").text == "ssim_ae"
        assert browser.find_element(By.ID, "run-certificate").text == "certified"
        assert browser.find_element(By.ID, "run-engine").text == "onnxruntime / fp32"
        assert page(browser, "document.getElementById('banners').children.length") == 0

        # An NG part appears in the strip, linked to its full-size image and its JSONL record.
        until(browser, "document.querySelectorAll('#ng-list li').length >= 3", what="NG parts in the strip")
        # Read in one go: the strip is rebuilt whenever a new NG part arrives.
        frame_id, full, record_url = page(browser, "(li => [Number(li.dataset.frame), li.querySelector('a.ng-image')"
                                                   ".href, li.querySelector('a.ng-record').href])"
                                                   "(document.querySelector('#ng-list li'))")
        until(browser, "document.querySelector('#ng-list li img').naturalHeight > 0", what="a thumbnail loaded")
        decoded = cv2.imdecode(np.frombuffer(fetch(full), np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == (FRAME, FRAME, 3)
        record = json.loads(fetch(record_url))
        assert record["frame"] == frame_id and record["verdict"] == "NG" and record["score_norm"] > 0.5
        logged = [json.loads(line) for line in (station.results / "log.jsonl").read_text().splitlines()]
        assert any(r.get("frame") == frame_id and r["verdict"] == "NG" for r in logged)  # the same part

        shot = tmp_path / "view.png"
        browser.save_screenshot(str(shot))
        assert cv2.imread(str(shot)).shape[1] >= 1000
        readme_shot = ROOT / "docs" / "view.png"
        if os.environ.get("EDGEAD_UPDATE_SCREENSHOT") == "1" or not readme_shot.exists():
            readme_shot.parent.mkdir(exist_ok=True)
            shutil.copyfile(shot, readme_shot)

        # The run ends: the page keeps its final counts, and they are the summary's.
        station.proc.send_signal(signal.SIGTERM)
        code, out = station.wait()
        assert code == 143, station.stderr()[-2000:]
        until(browser, "document.body.dataset.state === 'ended'", what="the page shows the end of the run")
        summary = json.loads((station.results / "summary.json").read_text())
        shown = {name: int(browser.find_element(By.ID, f"count-{name}").text) for name in COUNTERS}
        assert shown == {name: summary["frames"][name] for name in COUNTERS}
        assert shown["ng"] >= 3 and shown["captured"] == shown["inspected"] + shown["dropped"] + shown["errored"]
        view = summary["sinks"]["http://127.0.0.1:0"]
        assert view["clients_served"] >= 1 and view["frames_shown"] >= 3
        assert view["frames_in"] == shown["inspected"] + shown["errored"]  # every frame reached the view
    finally:
        station.kill()


def test_beyond_localhost_the_browser_needs_the_token(browser, bundle, tmp_path):
    station = Station(tmp_path, f"synthetic://metal?size={FRAME}", "--model", str(bundle),
                      "--output", "http://0.0.0.0:0", "--input-rate", "10", EDGEAD_VIEW_TOKEN=TOKEN)
    try:
        port = station.url().rstrip("/").rsplit(":", 1)[1]
        base = f"http://127.0.0.1:{port}/"  # bound to every interface, reached over loopback only
        assert TOKEN not in station.stderr()  # a chosen token is never printed
        browser.delete_all_cookies()
        browser.get(base)
        body = browser.find_element(By.TAG_NAME, "body").text
        assert body.startswith("401") and not browser.find_elements(By.ID, "frame")
        browser.get(base + "status")
        assert browser.find_element(By.TAG_NAME, "body").text.startswith("401")

        browser.get(base + "?token=" + TOKEN)
        assert browser.current_url == base  # the token left the address bar for an HttpOnly cookie
        until(browser, "window.edgeadView && window.edgeadView.framesShown >= 2", what="frames with the token")
        assert page(browser, "document.cookie") == ""  # the page's script cannot read it
    finally:
        station.proc.send_signal(signal.SIGTERM)
        station.wait()
        station.kill()
