"""The web page in a real browser (headless Chromium): drawing a digit, dropping a picture on a colour model, and
following a live training run."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    ROOT,
    SMALL_FOLDER_MODEL,
    colour_folder,
    find_data,
    launched,
    run_cli,
    running,
    trained_model,
    write_config,
)
from PIL import Image

import main
import modelfile
import serve

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


PICTURE_SCREENSHOT = ((ROOT / "docs" / "images" if os.environ.get("UPDATE_SCREENSHOTS") else ROOT / "logs")
                      / "picture_page.png")


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A small model trained from the command line on 600 colour digits, and a few colour digits it has not seen."""
    folder = tmp_path_factory.mktemp("colour")
    colour_folder(folder / "digits", 600)
    unseen, _ = colour_folder(folder / "unseen", 20, seed=7)
    write_config(folder, model=SMALL_FOLDER_MODEL, data={"n_test": 120})
    run = run_cli(["--data-path", str(folder / "digits"), "--epochs", "2", "--save-model", str(folder / "c.npz")],
                  folder, timeout=300)
    assert run.returncode == 0, run.stderr
    return folder / "c.npz", unseen


@pytest.fixture(scope="module")
def picture_page(browser: object, colour_model: tuple[Path, np.ndarray]) -> Iterator[object]:
    loaded = modelfile.load_model(colour_model[0], main.build_model)
    server = serve.make_server(loaded.model, softmax=main.softmax, class_names=loaded.meta["class_names"],
                               info={"dataset": "folder"}, port=0, **serve.page_options(loaded.model, loaded.meta))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        WebDriverWait(browser, WAIT_SECONDS).until(
            lambda driver: driver.execute_script("return !!(window.numpyCnn && window.numpyCnn.state.model)"))
        yield browser
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def wait_for_answer(picture_page: object, answers: int) -> None:
    WebDriverWait(picture_page, WAIT_SECONDS).until(lambda driver: driver.execute_script(
        "return window.numpyCnn.idle() && window.numpyCnn.state.answers >= arguments[0]", answers))


def every_layer_drawn(picture_page: object) -> list[str]:
    """The names of the layer cards with nothing drawn (no range, or a map tile left blank)."""
    return picture_page.execute_script("""
        return window.numpyCnn.state.cards.filter((entry) => !entry.range.textContent
          || entry.tiles.some((tile) => !tile.getContext('2d').getImageData(0, 0, tile.width, tile.height)
               .data.some((v, i) => i % 4 === 3 && v > 0))).map((entry) => entry.name);""")


def test_dropping_a_picture_on_a_colour_model_shows_it_in_colour_and_every_layer(
        picture_page: object, colour_model: tuple[Path, np.ndarray]) -> None:
    assert not picture_page.find_element(By.ID, "pad").is_displayed()
    assert picture_page.find_element(By.ID, "drop").is_displayed()
    assert len(picture_page.find_elements(By.CSS_SELECTOR, "#examples img")) == 100

    buffer = io.BytesIO()
    Image.fromarray(colour_model[1][0]).resize((84, 84)).save(buffer, format="PNG")  # any size: resized
    picture_page.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'digit.png', { type: 'image/png' }));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', { dataTransfer: transfer,
          bubbles: true, cancelable: true }));""", base64.b64encode(buffer.getvalue()).decode())
    wait_for_answer(picture_page, 1)
    assert picture_page.find_element(By.ID, "status").get_attribute("class") != "error", \
        picture_page.find_element(By.ID, "status").text
    assert every_layer_drawn(picture_page) == []
    seen = picture_page.execute_script("""
        const canvas = document.getElementById('seen');
        return [canvas.width, canvas.height,
                Array.from(canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data)];""")
    pixels = np.array(seen[2]).reshape(seen[1], seen[0], 4)[..., :3]
    assert seen[:2] == [28, 28] and (pixels[..., 0] != pixels[..., 1]).any()  # in colour

    picture_page.find_elements(By.CSS_SELECTOR, "#examples img")[3].click()
    wait_for_answer(picture_page, 2)
    assert every_layer_drawn(picture_page) == []
    assert picture_page.find_element(By.ID, "guess").text in [str(digit) for digit in range(10)]
    PICTURE_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    picture_page.save_screenshot(str(PICTURE_SCREENSHOT))


ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "docs" / "images" if os.environ.get("UPDATE_SCREENSHOTS") else ROOT / "logs"
LIVE_SCREENSHOT = SHOTS / "watch_it_learn.png"
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


def test_the_page_follows_pauses_answers_and_stops_a_run(browser: object, tmp_path: Path) -> None:
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
        # In one script: a new epoch may redraw the table between finding a cell and clicking it.
        browser.execute_script("document.querySelector('#live-confusion tbody tr:nth-child(1) td.cell').click()")
        wait.until(lambda d: d.execute_script("return document.querySelectorAll('#live-cell canvas').length") > 0)
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors

        browser.execute_script("window.scrollTo(0, 0)")
        height = browser.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
        shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(height, 1500), "scale": 1}})
        LIVE_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        partial = LIVE_SCREENSHOT.with_suffix(".png.partial")
        partial.write_bytes(base64.b64decode(shot["data"]))
        shutil.move(partial, LIVE_SCREENSHOT)

        browser.find_element(By.ID, "live-stop").click()
        WebDriverWait(browser, WAIT_SECONDS * 3).until(lambda d: live(d, "done") is not None)
        assert live(browser, "done.status") == "interrupted"
        assert process.wait(60) == 130, process.stderr.read()
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "interrupted"
