"""Watch it learn in a real browser: headless Chromium opens the page while `python src/main.py --serve` trains,
sees the curves and the filters change, pauses (no progress for 2 s), resumes, draws a 7 that the network of the
moment answers, and stops the run from the page (exit 130, the results written).

Real MNIST digits where the sample is beside the project, scikit-learn's 8x8 digits elsewhere. The screenshot goes
to logs/watch_it_learn.png, or with UPDATE_SCREENSHOTS=1 to docs/images/watch_it_learn.png (the README's picture).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

from helpers import find_data
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_browser import SEVEN, WAIT_SECONDS, browser, draw  # noqa: F401 (browser is a fixture)
from test_live import launched

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "images" if os.environ.get("UPDATE_SCREENSHOTS") else ROOT / "logs"
SCREENSHOT = SHOTS / "watch_it_learn.png"
MNIST_5K, _ = find_data("NUMPY_CNN_MNIST")
MNIST = MNIST_5K is not None
CONFIG = f"""
logging: {{level: INFO, file: null}}
data: {{dataset: {"mnist" if MNIST else "digits"}, path: {str(MNIST_5K) if MNIST else "null"},
       n_train: {3000 if MNIST else 1000}, n_test: {500 if MNIST else 300}, random_seed: 3}}
model:
  layers:
    - conv2d: {{filters: 16, kernel_size: 5, padding: 2}}
    - relu
    - maxpool2d: {{pool_size: 2}}
    - conv2d: {{filters: 16, kernel_size: 3, padding: 1}}
    - relu
    - maxpool2d: {{pool_size: 2}}
    - flatten
    - dense: {{units: 10}}
training: {{epochs: 200, batch_size: 32, learning_rate: 0.002, workers: 1}}
"""

CANVASES = "return ['live-curves', 'live-filters'].map((id) => document.getElementById(id).toDataURL())"


def live(driver: object, expression: str) -> object:
    return driver.execute_script(f"return window.numpyCnn.live.{expression}")


def test_the_page_follows_pauses_answers_and_stops_a_run(browser: object, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "config.yaml").write_text(CONFIG)
    with launched(["--config", "config.yaml", "--output", "results.json"], tmp_path) as (process, url):
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.execute_script("return !!(window.numpyCnn.state.model && window.numpyCnn.live.run)"))
        assert browser.find_element(By.ID, "live").is_displayed()
        wait.until(lambda d: live(d, "updates") >= 2)
        before, updates = browser.execute_script(CANVASES), live(browser, "updates")
        wait.until(lambda d: live(d, "updates") >= updates + 3)
        after = browser.execute_script(CANVASES)
        assert before[0] != after[0], "the curves did not change"
        assert before[1] != after[1], "the filters did not change"

        browser.find_element(By.ID, "live-pause").click()
        wait.until(lambda d: d.find_element(By.ID, "live-state").text == "paused")
        step, quiet_since, deadline = live(browser, "progress.step"), time.monotonic(), time.monotonic() + 10
        # an update already on its way when the pause came may still arrive: wait for 1 s without one
        while time.monotonic() - quiet_since < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
            if live(browser, "progress.step") != step:
                step, quiet_since = live(browser, "progress.step"), time.monotonic()
        text = browser.find_element(By.ID, "live-progress").text
        time.sleep(2)
        assert live(browser, "progress.step") == step and browser.find_element(By.ID, "live-progress").text == text
        browser.find_element(By.ID, "live-resume").click()
        wait.until(lambda d: live(d, "progress.step") > step)
        assert browser.find_element(By.ID, "live-state").text == "training"

        wait.until(lambda d: live(d, "epoch") is not None)  # the confusion matrix and the mistakes are shown
        browser.execute_script("document.getElementById('pad').scrollIntoView({block: 'center'})")
        answered = draw(browser, SEVEN)
        assert answered in [str(k) for k in range(10)] and live(browser, "done") is None  # answered mid-run
        assert browser.execute_script("return document.querySelectorAll('#live-confusion td.cell').length") == 100
        browser.find_element(By.CSS_SELECTOR, "#live-confusion tbody tr:nth-child(1) td.cell").click()
        wait.until(lambda d: d.execute_script("return document.querySelectorAll('#live-cell canvas').length") > 0)
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors

        browser.execute_script("window.scrollTo(0, 0)")
        height = browser.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(height, 1500), "scale": 1}})
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        partial = SCREENSHOT.with_suffix(".png.partial")
        partial.write_bytes(base64.b64decode(shot["data"]))
        shutil.move(partial, SCREENSHOT)

        browser.find_element(By.ID, "live-stop").click()
        WebDriverWait(browser, WAIT_SECONDS * 3).until(lambda d: live(d, "done") is not None)
        assert live(browser, "done.status") == "interrupted"
        assert process.wait(60) == 130, process.stderr.read()
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "interrupted"
