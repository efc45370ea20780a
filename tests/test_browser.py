"""The draw-a-digit page in a real browser: headless Chromium draws a 7 and a 3 with the mouse, stroke by stroke,
on the page served by src/serve.py, and must show the right answer and every layer's feature maps.

It uses Debian's `chromium` and `chromium-driver` packages through selenium, given /usr/bin/chromedriver
explicitly so that nothing is downloaded; it skips, saying why, where any of the three is missing
(pip install -r requirements-test.txt; apt-get install chromium chromium-driver). The model is the one
test_serve.py trains (real MNIST digits where the sample is beside the project, synthetic ones elsewhere).
The screenshot it takes goes to logs/draw_a_digit.png (ignored by git), or, with UPDATE_SCREENSHOTS=1 in the
environment, to docs/images/draw_a_digit.png, the picture in the README.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve import running, trained_model

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = (ROOT / "docs" / "images" if os.environ.get("UPDATE_SCREENSHOTS") else ROOT / "logs") / "draw_a_digit.png"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_SECONDS = 10  # for the page, and for each answer: every wait is bounded, so the file stays under ~30 s

webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed (pip install -r requirements-test.txt)")
if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
    pytest.skip(f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium "
                f"chromium-driver)", allow_module_level=True)

from selenium.common.exceptions import WebDriverException  # noqa: E402 (after the skips above)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# Strokes on the 280x280 pad, in pixels from its top-left corner, as a person draws them: a 7 is a bar and a
# slanted line down (one stroke), a 3 two bumps in one stroke.
SEVEN = [[(70, 62), (205, 58), (120, 232)]]
THREE = [[(82, 70), (130, 46), (182, 58), (194, 96), (166, 126), (126, 136), (170, 146), (200, 180), (188, 218),
          (138, 238), (84, 222)]]


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--disable-gpu", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.binary_location = str(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except WebDriverException as error:
        pytest.skip(f"headless Chromium did not start: {error.msg}")
    driver.set_page_load_timeout(WAIT_SECONDS)
    driver.set_script_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(browser: webdriver.Chrome) -> Iterator[webdriver.Chrome]:
    """The page of a server for the trained model, loaded, with the model's layers laid out."""
    trained = trained_model()
    with running(trained.model, trained.info) as server:
        browser.get(f"http://127.0.0.1:{server.port}/")
        WebDriverWait(browser, WAIT_SECONDS).until(
            lambda driver: driver.execute_script("return !!(window.numpyCnn && window.numpyCnn.state.model)"))
        yield browser


def densify(points: list[tuple[float, float]], step: float = 12) -> list[tuple[int, int]]:
    """The points of a polyline every `step` pixels or so, as a mouse reports them."""
    dense = [points[0]]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        n = max(1, int(np.hypot(x1 - x0, y1 - y0) // step))
        dense += [(x0 + (x1 - x0) * k / n, y0 + (y1 - y0) * k / n) for k in range(1, n + 1)]
    return [(round(x), round(y)) for x, y in dense]


def draw(driver: webdriver.Chrome, strokes: list[list[tuple[float, float]]]) -> str:
    """Draw the strokes with the mouse (press, move, release), then wait for the answer to the whole drawing."""
    pad = driver.find_element(By.ID, "pad")
    half_width, half_height = pad.size["width"] // 2, pad.size["height"] // 2
    for stroke in strokes:
        points = densify(stroke)
        chain = ActionChains(driver, duration=10)
        chain.move_to_element_with_offset(pad, points[0][0] - half_width, points[0][1] - half_height)
        chain.click_and_hold()
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            chain.move_by_offset(x1 - x0, y1 - y0)
        chain.release().perform()
    WebDriverWait(driver, WAIT_SECONDS).until(
        lambda d: d.execute_script("return window.numpyCnn.idle() && window.numpyCnn.state.answers > 0"))
    return driver.execute_script("return window.numpyCnn.prediction()")


BLANK_TILES = """
    // For each layer shown as feature maps: its name, how many maps it has and how many are not one flat colour.
    return Array.from(document.querySelectorAll('.layer.maps-layer')).map((card) => {
      const tiles = Array.from(card.querySelectorAll('.maps canvas'));
      const lit = tiles.filter((tile) => {
        const data = tile.getContext('2d').getImageData(0, 0, tile.width, tile.height).data;
        for (let i = 4; i < data.length; i += 4) {
          if (data[i] !== data[0] || data[i + 1] !== data[1] || data[i + 2] !== data[2]) return true;
        }
        return false;
      });
      return [card.dataset.name, tiles.length, lit.length];
    });
"""


def test_drawing_a_7_and_a_3_shows_the_answer_and_every_layer(page: webdriver.Chrome) -> None:
    trained = trained_model()
    assert draw(page, SEVEN) == "7"
    assert page.find_element(By.ID, "guess").text == "7"

    page.find_element(By.ID, "clear").click()
    assert page.find_element(By.ID, "guess").text == "?"
    assert page.execute_script("return window.numpyCnn.prediction()") is None

    assert draw(page, THREE) == "3"
    assert page.find_element(By.ID, "guess").text == "3"
    best = page.find_elements(By.CSS_SELECTOR, "#probs .name.best")
    assert [element.text for element in best] == ["3"]

    # What the network sees: a 28x28 image with ink on black.
    seen = page.execute_script(
        "const c = document.getElementById('seen'); return Array.from(c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data).filter((v, i) => i % 4 === 0);")
    seen = np.array(seen).reshape(28, 28)
    assert seen.max() > 200 and (seen > 100).mean() < 0.4 and seen[0].max() == 0

    # Every layer has a card; every layer of feature maps has all its maps drawn, and not blank.
    rows = trained.model.summary_rows()
    names = page.execute_script("return Array.from(document.querySelectorAll('.layer')).map(c => c.dataset.name)")
    assert names == trained.model.names
    tiles = page.execute_script(BLANK_TILES)
    maps_layers = [(row["layer"].split()[0], row["output_shape"][2]) for row in rows if len(row["output_shape"]) == 3]
    assert [(name, count) for name, count, _ in tiles] == maps_layers
    for name, count, lit in tiles:
        assert lit >= 1, f"{name}: all {count} feature maps are blank"
    assert sum(lit for *_, lit in tiles) >= 0.5 * sum(count for _, count, _ in tiles)
    # the dense layers as bars
    assert page.execute_script("return document.querySelectorAll('.layer.vector canvas').length") == 4

    errors = [entry for entry in page.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors

    height = page.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    shot = page.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}})
    png = base64.b64decode(shot["data"])
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.width == 1280 and picture.height == height
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    partial = SCREENSHOT.with_suffix(".png.partial")
    partial.write_bytes(png)
    shutil.move(partial, SCREENSHOT)


def test_undo_and_a_blank_pad(page: webdriver.Chrome) -> None:
    """Undo takes the last stroke away and asks again; undoing every stroke leaves the empty page, with no error."""
    page.find_element(By.ID, "clear").click()
    draw(page, SEVEN)
    draw(page, [[(60, 150), (220, 150)]])  # a line through the 7
    page.find_element(By.ID, "undo").click()
    WebDriverWait(page, WAIT_SECONDS).until(lambda d: d.execute_script("return window.numpyCnn.idle()"))
    assert page.execute_script("return window.numpyCnn.prediction()") == "7"
    page.find_element(By.ID, "undo").click()
    assert page.find_element(By.ID, "guess").text == "?"
    assert page.find_element(By.ID, "status").text == ""
