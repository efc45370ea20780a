"""The page of a colour model in a real browser: headless Chromium drops an image file on the page of a model
trained on a folder of colour digits, then clicks one of the test images the model file keeps, and must see
the picture in colour, an answer and every layer drawn.

Uses the same Chromium and chromedriver as test_browser.py (and skips the same way). The screenshot goes to
logs/picture_page.png, or, with UPDATE_SCREENSHOTS=1, to docs/images/picture_page.png.
"""

from __future__ import annotations

import base64
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, write_config
from PIL import Image
from test_browser import CHROMEDRIVER, CHROMIUM, WAIT_SECONDS, browser  # noqa: F401 (browser: a fixture)
from test_folders import SMALL_MODEL, colour_folder

import main
import modelfile
import serve

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = (ROOT / "docs" / "images" if os.environ.get("UPDATE_SCREENSHOTS") else ROOT / "logs") / "picture_page.png"

from selenium.webdriver.common.by import By  # noqa: E402 (test_browser skips first where selenium is missing)
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A small model trained from the command line on 600 colour digits, and a few colour digits it has not seen."""
    folder = tmp_path_factory.mktemp("colour")
    colour_folder(folder / "digits", 600)
    unseen, _ = colour_folder(folder / "unseen", 20, seed=7)
    write_config(folder, model=SMALL_MODEL, data={"n_test": 120})
    run = run_cli(["--data-path", str(folder / "digits"), "--epochs", "2", "--save-model", str(folder / "c.npz")],
                  folder, timeout=300)
    assert run.returncode == 0, run.stderr
    return folder / "c.npz", unseen


@pytest.fixture(scope="module")
def page(browser: object, colour_model: tuple[Path, np.ndarray]) -> Iterator[object]:  # noqa: F811
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


def wait_for_answer(page: object, answers: int) -> None:
    WebDriverWait(page, WAIT_SECONDS).until(lambda driver: driver.execute_script(
        "return window.numpyCnn.idle() && window.numpyCnn.state.answers >= arguments[0]", answers))


def every_layer_drawn(page: object) -> list[str]:
    """The names of the layer cards with nothing drawn (no range, or a map tile left blank)."""
    return page.execute_script("""
        return window.numpyCnn.state.cards.filter((entry) => !entry.range.textContent
          || entry.tiles.some((tile) => !tile.getContext('2d').getImageData(0, 0, tile.width, tile.height)
               .data.some((v, i) => i % 4 === 3 && v > 0))).map((entry) => entry.name);""")


def test_dropping_a_picture_on_a_colour_model_shows_it_in_colour_and_every_layer(
        page: object, colour_model: tuple[Path, np.ndarray]) -> None:
    assert not page.find_element(By.ID, "pad").is_displayed()
    assert page.find_element(By.ID, "drop").is_displayed()
    assert len(page.find_elements(By.CSS_SELECTOR, "#examples img")) == 100

    buffer = io.BytesIO()
    Image.fromarray(colour_model[1][0]).resize((84, 84)).save(buffer, format="PNG")  # any size: resized
    page.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'digit.png', { type: 'image/png' }));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', { dataTransfer: transfer,
          bubbles: true, cancelable: true }));""", base64.b64encode(buffer.getvalue()).decode())
    wait_for_answer(page, 1)
    assert page.find_element(By.ID, "status").get_attribute("class") != "error", \
        page.find_element(By.ID, "status").text
    assert every_layer_drawn(page) == []
    seen = page.execute_script("""
        const canvas = document.getElementById('seen');
        return [canvas.width, canvas.height,
                Array.from(canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data)];""")
    pixels = np.array(seen[2]).reshape(seen[1], seen[0], 4)[..., :3]
    assert seen[:2] == [28, 28] and (pixels[..., 0] != pixels[..., 1]).any()  # in colour

    page.find_elements(By.CSS_SELECTOR, "#examples img")[3].click()
    wait_for_answer(page, 2)
    assert every_layer_drawn(page) == []
    assert page.find_element(By.ID, "guess").text in [str(digit) for digit in range(10)]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.save_screenshot(str(SCREENSHOT))
