"""Watch it learn: `python src/main.py --serve` (no --load-model) serves the page while it trains, and the page
follows the run through Server-Sent Events. Every test runs the real command line on scikit-learn's digits (offline,
small) and reads the stream with urllib, as a page would."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import MAIN, launched

import live

TIMING_KEYS = {"seconds", "images_per_second", "train_seconds", "saved_at", "started_at", "versions"}
CONFIG = """
logging: {level: INFO, file: null}
data: {dataset: digits, n_train: 1000, n_test: 300, random_seed: 7}
model:
  layers:
    - conv2d: {filters: 8, kernel_size: 3, padding: 1}
    - relu
    - maxpool2d: {pool_size: 2}
    - flatten
    - dense: {units: 10}
training: {epochs: EPOCHS, batch_size: 16, learning_rate: 0.003, workers: 2}
"""


def write_live_config(folder: Path, epochs: int) -> Path:
    path = folder / "config.yaml"
    path.write_text(CONFIG.replace("EPOCHS", str(epochs)))
    return path


def wait_for_line(process: subprocess.Popen, start: str, seconds: float = 30) -> None:
    """Wait until the program has printed a line that starts with `start`."""
    deadline = time.monotonic() + seconds
    while not any(line.startswith(start) for line in process.lines):
        assert time.monotonic() < deadline, f"no line {start!r} in {process.lines}"
        time.sleep(0.1)


def events(url: str, last_event_id: int | None = None, timeout: float = 10) -> Iterator[tuple[float, str, dict]]:
    """(arrival time, event type, data) of each event on GET /api/events (pings as type "ping", data {})."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    with urllib.request.urlopen(urllib.request.Request(url + "api/events", headers=headers), timeout=timeout) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        kind = None
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line == ": ping":
                yield time.monotonic(), "ping", {}
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                yield time.monotonic(), kind, json.loads(line[6:])


def post(url: str, document: dict, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(document).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def without_timings(value: object) -> object:
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_the_stream_follows_the_run_and_matches_the_results_file(tmp_path: Path) -> None:
    config = write_live_config(tmp_path, 16)
    with launched(["--config", str(config), "--output", "results.json"], tmp_path) as (process, url):
        received = list(events(url, last_event_id=0))
        wait_for_line(process, "training done: still serving the page")
        assert any(line.startswith("test accuracy") for line in process.lines)
        status, run = get(url + "api/run")
        matrix_status, matrix = get(url + "api/confusion")
        cell_status, cell = get(url + "api/confusion?true=3&predicted=3")
        process.send_signal(signal.SIGINT)  # Ctrl-C while only serving: exit 0, as without training
        assert process.wait(30) == 0, process.stderr.read()
    results = json.loads((tmp_path / "results.json").read_text())

    data = [(at, kind, event) for at, kind, event in received if kind != "ping"]
    assert [kind for _, kind, _ in data][-1] == "done"
    assert [event["id"] for _, _, event in data] == list(range(1, len(data) + 1))  # in order, none lost
    steps = [event["step"] for _, kind, event in data if kind != "done"]
    assert steps == sorted(steps) and steps[-1] == 16 * 63
    arrivals = [at for at, _, _ in received]
    assert max(np.diff(arrivals)) < 2.0  # an event (or a ping) at least every 2 s
    progress_arrivals = [at for at, kind, _ in data if kind in ("progress", "epoch")]
    assert max(np.diff(progress_arrivals)) < 2.0

    epochs = [event for _, kind, event in data if kind == "epoch"]
    assert [event["row"] for event in epochs] == results["history"]  # the same floats, to the last digit
    for event in epochs:
        filters = event["filters"]
        assert filters["shape"] == [8, 3, 3, 1] and len(filters["values"]) == 4 * -(-72 // 3)
        assert len(event["probes"]) == 8 and all(len(top3) == 3 for top3 in event["probes"])
    # the confusion matrix is the scoring of the last epoch's row
    assert matrix_status == 200 and matrix["epoch"] == 16 and run["epoch"] == matrix
    confusion = np.array(matrix["confusion"])
    assert confusion.sum() == 300 and np.trace(confusion) / 300 == results["history"][-1]["test_accuracy"]
    assert np.allclose(matrix["per_class_accuracy"], confusion.diagonal() / confusion.sum(axis=1), atol=1e-6)
    assert len(matrix["mistakes"]) == min(12, 300 - np.trace(confusion))
    for mistake in matrix["mistakes"]:
        assert mistake["top3"][0][0] != mistake["true"]
    assert cell_status == 200 and cell["count"] == confusion[3, 3] == len(cell["images"])
    assert all(image["top3"][0][0] == 3 for image in cell["images"])
    done = data[-1][2]
    assert done["status"] == "completed" and done["test_accuracy"] == round(results["test_accuracy"], 9)
    assert status == 200 and run["state"] == "done" and run["history"] == results["history"]
    assert run["last_event_id"] == done["id"] and len(run["curve"]) >= 1


def test_bit_identical_with_and_without_the_page_watched(tmp_path: Path) -> None:
    """Same seed, same workers: the same weights and results, with 20 clients watching, one that hangs up after
    three events and one that connects and never reads (its socket buffer fills)."""
    config = write_live_config(tmp_path, 6)
    outputs = ["--config", str(config), "--output", "results.json", "--save-model", "model.npz"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "watched").mkdir()
    plain = subprocess.run([sys.executable, str(MAIN), *outputs], cwd=tmp_path / "plain", capture_output=True,
                           text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    with launched(outputs, tmp_path / "watched") as (process, url):
        finished: list[str] = []

        def watch() -> None:
            finished.append(list(events(url, last_event_id=0, timeout=60))[-1][1])

        def hang_up() -> None:
            for count, _ in enumerate(events(url)):
                if count == 3:
                    return

        stalled = urllib.request.urlopen(url + "api/events", timeout=60)  # never read
        watchers = [threading.Thread(target=watch) for _ in range(20)] + [threading.Thread(target=hang_up)]
        for thread in watchers:
            thread.start()
        for thread in watchers:
            thread.join(120)
        assert finished == ["done"] * 20
        wait_for_line(process, "training done: still serving the page")
        process.send_signal(signal.SIGINT)  # Ctrl-C once only serving: exit 0
        assert process.wait(30) == 0, process.stderr.read()
        stalled.close()
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("plain", "watched"))
    assert without_timings(a) == without_timings(b)
    with np.load(tmp_path / "plain" / "model.npz") as left, np.load(tmp_path / "watched" / "model.npz") as right:
        weights = [key for key in left.files if key != "meta"]
        assert weights and sorted(weights) == sorted(k for k in right.files if k != "meta")
        for key in weights:
            assert np.array_equal(left[key], right[key]), key


def test_pause_resume_and_stop_from_the_page(tmp_path: Path) -> None:
    config = write_live_config(tmp_path, 500)
    with launched(["--config", str(config), "--output", "results.json"], tmp_path) as (process, url):
        stream = events(url, timeout=30)
        first = next(event for _, kind, event in stream if kind == "progress")
        assert post(url + "api/control", {"action": "pause"}) == (200, {"state": "paused"})
        paused = next(event for _, kind, event in stream if kind == "progress" and event.get("paused"))
        quiet_since, settled = time.monotonic(), time.monotonic() + 10
        for at, kind, event in stream:  # an update already on its way when the pause came may still arrive
            if kind != "ping":
                paused, quiet_since = event, at
            if at - quiet_since > 1 or at > settled:
                break
        held_from, later = time.monotonic(), []
        for at, kind, event in stream:  # then pings only: no progress for 2 s
            if kind != "ping":
                later.append(event)
            if at - held_from > 2.2:
                break
        assert later == [] and get(url + "api/run")[1]["progress"]["step"] == paused["step"]
        assert post(url + "api/control", {"action": "resume"}) == (200, {"state": "training"})
        moved = next(event for _, kind, event in stream if kind == "progress" and event["step"] > paused["step"])
        assert moved["step"] > first["step"]

        assert post(url + "api/control", {"action": "dance"})[0] == 400
        assert post(url + "api/control", {"action": "stop"}, {"Origin": "http://evil.example"})[0] == 403
        assert get(url + "api/confusion?true=10&predicted=0")[0] == 400
        assert post(url + "api/control", {"action": "stop"}) == (200, {"state": "stopping"})
        done = next(event for _, kind, event in stream if kind == "done")
        assert done["status"] == "interrupted" and done["serving"] is False
        assert process.wait(60) == 130, process.stderr.read()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "interrupted" and results["epochs_completed"] < 500


def test_ctrl_c_during_training_keeps_the_work_and_ends_the_stream(tmp_path: Path) -> None:
    config = write_live_config(tmp_path, 500)
    with launched(["--config", str(config), "--output", "results.json"], tmp_path) as (process, url):
        stream = events(url, timeout=30)
        next(event for _, kind, event in stream if kind == "epoch")
        process.send_signal(signal.SIGINT)
        done = next(event for _, kind, event in stream if kind == "done")
        assert done["status"] == "interrupted"
        assert process.wait(60) == 130, process.stderr.read()
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "interrupted"


def test_event_streams_are_capped(tmp_path: Path) -> None:
    config = write_live_config(tmp_path, 500)
    with launched(["--config", str(config)], tmp_path) as (process, url):
        opened = [urllib.request.urlopen(url + "api/events", timeout=30) for _ in range(32)]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "api/events", timeout=30)
        assert refused.value.code == 503
        for stream in opened:
            stream.close()
        time.sleep(2 * live.PING_SECONDS + 0.5)  # a stream's thread notices its client is gone at its next ping
        seen = next(event for _, kind, event in events(url) if kind != "ping")
        resumed = next(event for _, kind, event in events(url, last_event_id=seen["id"] - 1) if kind != "ping")
        assert resumed["id"] == seen["id"]  # a reconnecting page gets what it missed, from Last-Event-ID on
        status, probe = get(url + "api/probe?index=0")
        assert status == 200 and probe["label"] == 0 and len(probe["layers"]) == 5
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130


def test_a_twin_is_the_model_of_its_moment_and_shares_no_weight() -> None:
    import main
    from live import twin_of

    rng = np.random.default_rng(0)
    model = main.Sequential([main.Conv2D(1, 4, 3, 1, 1, rng=rng), main.BatchNorm(4), main.ReLU(), main.Flatten(),
                             main.Dense(256, 10, rng=rng)], (8, 8, 1))
    x, labels = rng.random((16, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 16)
    optimizer, loss = main.Adam(0.01), main.SoftmaxCrossEntropy()
    twin = twin_of(model)
    expected = model.forward(x, training=False)
    for _ in range(3):  # training goes on: weights and BatchNorm's statistics change in place
        loss.forward(model.forward(x), labels)
        model.backward(loss.backward())
        optimizer.step(model)
    assert np.array_equal(twin.forward(x, training=False), expected)
    assert not np.array_equal(model.forward(x, training=False), expected)
    for original, copied in zip(model.layers, twin.layers):
        for name in {**original.params, **original.buffers}:
            mine = original.params.get(name, original.buffers.get(name))
            theirs = copied.params.get(name, copied.buffers.get(name))
            assert not np.shares_memory(mine, theirs), name


def test_without_a_run_being_trained_api_run_says_so_and_the_rest_is_404() -> None:
    import main
    import serve

    model = main.Sequential([main.Flatten(), main.Dense(64, 10, rng=np.random.default_rng(0))], (8, 8, 1))
    server = serve.make_server(model, prepare=lambda image: image[..., None], softmax=main.softmax,
                               class_names=[str(k) for k in range(10)], info={}, port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.port}/"
        assert get(url + "api/run") == (200, {"live": False})
        for path in ("api/events", "api/confusion", "api/confusion?true=1&predicted=2", "api/probe?index=0"):
            status, answer = get(url + path)
            assert status == 404 and "no training run is being watched" in answer["error"], path
        assert post(url + "api/control", {"action": "pause"})[0] == 404
    finally:
        server.shutdown()
        server.server_close()


def test_sigterm_while_serving_the_trained_model_exits_143(tmp_path: Path) -> None:
    config = write_live_config(tmp_path, 2)
    with launched(["--config", str(config)], tmp_path) as (process, url):
        assert list(events(url, last_event_id=0))[-1][1] == "done"
        wait_for_line(process, "training done: still serving the page")
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 143, process.stderr.read()
