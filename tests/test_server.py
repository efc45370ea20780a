"""The HTTP server of --serve: predictions with activations, concurrency, limits on bodies, clients and hosts, and
the command line around it."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    CLASS_FOLDER_NAMES,
    CLASS_NAMES,
    EPS,
    MAIN,
    ROOT,
    SMALL_FOLDER_MODEL,
    Trained,
    encoded,
    prepare_for,
    running,
    small_config_file,
)
from PIL import Image

import images
import main
import modelfile
import serve
from errors import CNNError


def drawing(digit: np.ndarray, size: int = 280) -> bytes:
    """An MNIST digit as a drawing app would save it: dark ink on white, size x size pixels, PNG."""
    picture = Image.fromarray(255 - digit).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def request(server: serve.DrawServer, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request, with this server's Host unless `headers` gives another."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        headers = {"Host": f"127.0.0.1:{server.port}", **({"Content-Type": "application/json"} if body else {}),
                   **(headers or {})}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        for name, value in headers.items():
            if value is not None:
                connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def predict(server: serve.DrawServer, image: str, **fields: object) -> tuple[int, dict]:
    status, _, body = request(server, "POST", "/api/predict", json.dumps({"image": image, **fields}).encode())
    return status, json.loads(body)


def values_of(layer: dict) -> np.ndarray:
    """A layer's activations from the answer, dequantised, in the model's own layout (H, W, C) or (K,)."""
    if layer["encoding"] == "lists":
        q = np.array(layer["values"], dtype=np.float64)
    else:
        q = np.frombuffer(base64.b64decode(layer["values"]), dtype=np.uint8).astype(np.float64)
    if layer["kind"] == "maps":
        height, width, channels = layer["shape"]
        q = q.reshape(channels, height, width).transpose(1, 2, 0)
    return layer["min"] + q * (layer["max"] - layer["min"]) / 255


def in_process(trained: Trained, png: bytes) -> tuple[np.ndarray, list[np.ndarray]]:
    """The prepared image and every layer's output, computed here for the same PNG."""
    prepared = images.prepare_image(images.image_from_bytes(png), trained.model.input_shape, 20 / 28)
    outputs, x = [], prepared[None]
    for layer in trained.model.layers:
        x = layer.forward(x, training=False)
        outputs.append(x[0])
    return prepared, outputs


# ------------------------------------------------------------------------------------------------
# Predictions
# ------------------------------------------------------------------------------------------------


def test_the_model_learned_enough_to_be_worth_drawing_for(trained: Trained) -> None:
    assert trained.info["test_accuracy"] > (0.85 if trained.info["source"] == "idx" else 0.8)


def test_drawn_digits_come_back_as_the_right_class(server: serve.DrawServer, trained: Trained) -> None:
    """30 held-out digits sent as drawings: nearly all right, and each answer is what the model computes here."""
    right = 0
    for digit, label in zip(trained.test_images[:30], trained.test_labels[:30]):
        png = drawing(digit)
        status, answer = predict(server, data_url(png))
        assert status == 200, answer
        probabilities = np.array([row["probability"] for row in answer["probabilities"]])
        _, outputs = in_process(trained, png)
        expected = main.softmax(outputs[-1][None])[0]
        np.testing.assert_allclose(probabilities, expected, atol=2e-6)
        assert [row["class"] for row in answer["probabilities"]] == CLASS_NAMES
        assert answer["prediction"]["index"] == int(expected.argmax())
        assert answer["prediction"]["class"] == CLASS_NAMES[answer["prediction"]["index"]]
        right += answer["prediction"]["index"] == label
    assert right >= 25, f"only {right} of 30 held-out digits drawn at 280x280 came back as their class"


def test_activations_have_the_summary_shapes_and_the_models_values(server: serve.DrawServer,
                                                                     trained: Trained) -> None:
    png = drawing(trained.test_images[0])
    prepared, outputs = in_process(trained, png)
    for encoding in ("base64", "lists"):
        status, answer = predict(server, data_url(png), encoding=encoding)
        assert status == 200, answer
        rows = trained.model.summary_rows()
        assert [f"{layer['name']} ({layer['type']})" for layer in answer["layers"]] == [row["layer"] for row in rows]
        assert [layer["shape"] for layer in answer["layers"]] == [row["output_shape"] for row in rows]
        assert [layer["kind"] for layer in answer["layers"]] == ["maps"] * 6 + ["vector"] * 4
        for layer, output in zip(answer["layers"], outputs):
            assert layer["encoding"] == encoding
            if encoding == "lists" and layer["kind"] == "maps":  # [C][H][W]
                assert np.array(layer["values"]).shape == (output.shape[2], *output.shape[:2])
            assert layer["min"] <= 0 <= layer["max"]
            step = (layer["max"] - layer["min"]) / 255
            np.testing.assert_allclose(values_of(layer), output, atol=step / 2 + 1e-4, err_msg=layer["name"])
        seen = np.array(answer["input"]["values"])
        assert answer["input"]["shape"] == [28, 28] and seen.shape == (28, 28)
        np.testing.assert_allclose(seen / 255, prepared[..., 0], atol=0.5 / 255 + 1e-6)


def test_fifty_concurrent_requests_are_all_answered_right(server: serve.DrawServer, trained: Trained) -> None:
    """Ten digits the server gets right, each sent five times, all 50 at once."""
    cases = []
    for digit, label in zip(trained.test_images, trained.test_labels):
        url = data_url(drawing(digit))
        if predict(server, url)[1]["prediction"]["index"] == label:
            cases.append((url, int(label)))
        if len(cases) == 10:
            break
    jobs = cases * 5
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda job: predict(server, job[0]), jobs))
    assert len(answers) == 50
    for (_, label), (status, answer) in zip(jobs, answers):
        assert status == 200, answer
        assert answer["prediction"]["index"] == label


def test_requests_keep_nothing_on_the_layers(server: serve.DrawServer, trained: Trained) -> None:
    """Evaluation (training=False) must not write to the layers, which every request thread shares."""
    def snapshot() -> list[dict]:
        return [{name: (value, value.copy() if isinstance(value, np.ndarray) else None)
                 for name, value in vars(layer).items()} for layer in trained.model.layers]

    def params() -> list[dict]:
        return [{name: array.copy() for name, array in layer.params.items()} for layer in trained.model.layers]

    before, weights = snapshot(), params()
    url = data_url(drawing(trained.test_images[1]))
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(status == 200 for status, _ in pool.map(lambda _: predict(server, url), range(8)))
    after = snapshot()
    for layer, old, new in zip(trained.model.layers, before, after):
        assert old.keys() == new.keys(), f"{type(layer).__name__} gained {set(new) - set(old)}"
        for name, (value, copy) in old.items():
            assert new[name][0] is value, f"{type(layer).__name__}.{name} was replaced"
            if copy is not None:
                np.testing.assert_array_equal(value, copy, err_msg=f"{type(layer).__name__}.{name} changed")
    for old, layer in zip(weights, trained.model.layers):
        for name, array in old.items():
            np.testing.assert_array_equal(layer.params[name], array)


def test_a_transparent_drawing_is_read_as_ink_on_white(server: serve.DrawServer, trained: Trained) -> None:
    """A canvas that was never filled sends its ink on transparent pixels: they must count as white paper."""
    digit = trained.test_images[2]
    ink = Image.fromarray(digit).resize((280, 280), Image.BILINEAR)
    rgba = Image.new("RGBA", ink.size, (0, 0, 0, 0))
    rgba.putalpha(ink)
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    status, answer = predict(server, data_url(buffer.getvalue()))
    assert status == 200, answer
    opaque = predict(server, data_url(drawing(digit)))[1]
    assert answer["prediction"]["index"] == opaque["prediction"]["index"]


# ------------------------------------------------------------------------------------------------
# The page and the model summary
# ------------------------------------------------------------------------------------------------


def test_the_page_is_served_once_read(server: serve.DrawServer) -> None:
    status, headers, body = request(server, "GET", "/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert body == serve.PAGE_PATH.read_bytes()
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"/api/predict" in body and b"<canvas" in body
    assert b"http://" not in body and b"https://" not in body  # nothing fetched from elsewhere: works offline


def test_the_script_is_served_apart_so_the_page_runs_no_inline_script(server: serve.DrawServer) -> None:
    _, _, page = request(server, "GET", "/")
    status, headers, body = request(server, "GET", "/app.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert body == serve.SCRIPT_PATH.read_bytes() and b"api/predict" in body
    assert b'<script src="app.js"></script>' in page and b"<script>" not in page and b" onclick=" not in page
    policy = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'"
    assert request(server, "POST", "/app.js")[0] == 405


def test_the_model_summary_and_where_it_was_trained(server: serve.DrawServer, trained: Trained) -> None:
    status, headers, body = request(server, "GET", "/api/model")
    assert status == 200 and headers["Content-Type"] == "application/json"
    document = json.loads(body)
    assert document["layers"] == trained.model.summary_rows()
    assert document["parameters"] == trained.model.parameter_count()
    assert document["input_shape"] == [28, 28, 1]
    assert document["class_names"] == CLASS_NAMES
    assert document["info"] == trained.info


# ------------------------------------------------------------------------------------------------
# Bad requests: one JSON line, never a traceback or a dropped connection
# ------------------------------------------------------------------------------------------------


def png_of(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def assert_json_error(status: int, body: bytes, expected_status: int, *words: str) -> str:
    assert status == expected_status, body
    message = json.loads(body)["error"]
    assert isinstance(message, str) and message and "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, message
    return message


BAD_BODIES = {
    "not JSON": (b"{not json", "not valid JSON"),
    "not UTF-8": (b"\xff\xfe\x00", "not valid JSON"),
    "nested too deep": (b"[" * 200_000, "not valid JSON"),
    "a list": (b"[1, 2]", "JSON object"),
    "no image": (b'{"picture": "data:image/png;base64,"}', "JSON object"),
    "image not a string": (b'{"image": 5}', "must be a string"),
    "not a data URL": (b'{"image": "hello"}', "not a data URL"),
    "not an image": (b'{"image": "data:text/plain;base64,aGVsbG8="}', "not of an image"),
    "not base64": (b'{"image": "data:image/png,abc"}', "base64"),
    "bad base64": (b'{"image": "data:image/png;base64,@@@="}', "invalid base64"),
    "empty": (b'{"image": "data:image/png;base64,"}', "empty"),
    "undecodable": (json.dumps({"image": data_url(b"this is not a PNG")}).encode(), "cannot read it as an image"),
    "truncated PNG": (json.dumps({"image": data_url(png_of(np.full((64, 64), 90, np.uint8))[:60])}).encode(),
                      "cannot read it as an image"),
    "blank": (json.dumps({"image": data_url(png_of(np.full((280, 280), 255, np.uint8)))}).encode(), "blank"),
    "too many pixels": (json.dumps({"image": data_url(png_of(np.zeros((2100, 2100), np.uint8)))}).encode(),
                        "more than"),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_a_bad_drawing_gets_400_with_one_line(server: serve.DrawServer, case: str) -> None:
    body, words = BAD_BODIES[case]
    status, _, answer = request(server, "POST", "/api/predict", body)
    assert_json_error(status, answer, 400, words)


def test_a_bad_encoding_gets_400(server: serve.DrawServer, trained: Trained) -> None:
    status, answer = predict(server, data_url(drawing(trained.test_images[0])), encoding="hex")
    assert status == 400 and "encoding" in answer["error"]


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("GET", "/favicon.ico", 404),
    ("GET", "/index.htm", 404),
    ("GET", "/api", 404),
    ("GET", "/web/index.html", 404),
    ("GET", "/serve.py", 404),
    ("GET", "/../../etc/passwd", 404),
    ("GET", "/%2e%2e/%2e%2e/etc/passwd", 404),
    ("GET", "//etc/passwd", 404),
    ("BREW", "/", 404),
    ("DELETE", "/api/model", 405),
    ("GET", "/api/predict", 405),
    ("POST", "/api/model", 405),
])
def test_anything_else_is_not_served(server: serve.DrawServer, method: str, path: str, expected: int) -> None:
    status, headers, body = request(server, method, path, b"{}" if method == "POST" else None)
    assert_json_error(status, body, expected)
    assert headers["Content-Type"] == "application/json"
    assert b"root:" not in body


def test_a_body_over_2_mb_gets_413(server: serve.DrawServer) -> None:
    big = json.dumps({"image": "data:image/png;base64," + "A" * serve.MAX_BODY_BYTES}).encode()
    status, _, body = request(server, "POST", "/api/predict", big)
    assert_json_error(status, body, 413, "limit")


def test_a_huge_announced_body_gets_413_at_once(server: serve.DrawServer) -> None:
    """A client that announces 3 GB and sends nothing is answered, not waited for."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: 3000000000\r\n\r\n".encode())
        started = time.perf_counter()
        answer = receive_all(client)
    assert answer.startswith(b"HTTP/1.0 413")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Content-Type": "text/plain"}, 415),
    ({"Content-Type": None}, 415),
])
def test_a_drawing_must_be_sent_as_json(server: serve.DrawServer, headers: dict, expected: int) -> None:
    status, _, body = request(server, "POST", "/api/predict", b'{"image": ""}', headers)
    assert_json_error(status, body, expected)


def receive_all(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_garbled_request_line_gets_a_json_answer(server: serve.DrawServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"this is not http at all\r\n\r\n")
        answer = receive_all(client)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400")
    assert "error" in json.loads(body)


# ------------------------------------------------------------------------------------------------
# DNS rebinding, slow clients, quiet logs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:{port}", True),
    ("localhost:{port}", True),
    ("LOCALHOST:{port}", True),
    ("[::1]:{port}", True),
    ("evil.example:{port}", False),
    ("localhost.evil.example:{port}", False),
    ("127.0.0.1:1", False),
    ("127.0.0.1", False),
    ("192.168.1.20:{port}", False),
    ("", False),
])
def test_requests_for_another_host_are_refused(server: serve.DrawServer, host: str, allowed: bool) -> None:
    """A page on evil.example whose name was made to resolve to 127.0.0.1 sends Host: evil.example."""
    for method, path in (("GET", "/"), ("GET", "/api/model")):
        status, _, body = request(server, method, path, headers={"Host": host.format(port=server.port)})
        if allowed:
            assert status == 200
        else:
            assert_json_error(status, body, 403, "answers requests for")


def test_a_request_without_a_host_is_refused(server: serve.DrawServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"GET /api/model HTTP/1.0\r\n\r\n")
        answer = receive_all(client)
    assert answer.startswith(b"HTTP/1.0 403")


def test_a_cross_site_origin_is_refused(server: serve.DrawServer, trained: Trained) -> None:
    body = json.dumps({"image": data_url(drawing(trained.test_images[0]))}).encode()
    status, _, answer = request(server, "POST", "/api/predict", body, {"Origin": "http://evil.example"})
    assert_json_error(status, answer, 403, "evil.example")
    status, _, answer = request(server, "POST", "/api/predict", body, {"Origin": "null"})  # a sandboxed frame
    assert_json_error(status, answer, 403)
    status, _, _ = request(server, "POST", "/api/predict", body, {"Origin": f"http://localhost:{server.port}"})
    assert status == 200


def test_a_slow_client_times_out_and_the_server_goes_on(trained: Trained) -> None:
    with running(trained.model, trained.info, timeout=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"ima".encode())
            started = time.perf_counter()
            assert slow.recv(100) == b""  # closed by the server, without an answer
            assert time.perf_counter() - started < 5
        status, _, _ = request(server, "GET", "/api/model")
        assert status == 200


def test_nothing_is_printed_for_requests_good_or_bad(server: serve.DrawServer, trained: Trained,
                                                     capfd: pytest.CaptureFixture) -> None:
    capfd.readouterr()
    predict(server, data_url(drawing(trained.test_images[0])))
    request(server, "GET", "/nowhere")
    request(server, "POST", "/api/predict", b"{bad")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:  # hangs up mid-request
        client.sendall(f"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode())
    time.sleep(0.2)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# ------------------------------------------------------------------------------------------------
# Starting and stopping
# ------------------------------------------------------------------------------------------------


def test_a_port_in_use_is_one_line(trained: Trained) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(CNNError, match="already in use") as caught:
            serve.make_server(trained.model, prepare=prepare_for(trained.model), softmax=main.softmax,
                              class_names=CLASS_NAMES, info={}, port=port)
    assert "\n" not in str(caught.value) and str(port) in str(caught.value)


def test_a_host_that_cannot_be_bound_is_one_line(trained: Trained) -> None:
    with pytest.raises(CNNError, match=r"cannot serve on 203\.0\.113\.7"):  # a documentation address, not ours
        serve.make_server(trained.model, prepare=prepare_for(trained.model), softmax=main.softmax,
                          class_names=CLASS_NAMES, info={}, host="203.0.113.7", port=0)


def test_the_server_shuts_down_when_asked(trained: Trained) -> None:
    with running(trained.model, trained.info) as server:
        port = server.port
        assert request(server, "GET", "/api/model")[0] == 200
        started = time.perf_counter()
    assert time.perf_counter() - started < 5
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def port_in(message: str) -> int:
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", message)
    assert match, message
    return int(match.group(1))


def test_serve_announces_the_real_port_and_stops_on_ctrl_c(trained: Trained) -> None:
    """serve() in the main thread, as main runs it: Ctrl-C (SIGINT) ends it normally, with the port closed and
    the SIGINT handler that was there before put back."""
    messages: list[str] = []
    serving = threading.Event()

    def announce(message: str) -> None:
        messages.append(message)
        serving.set()

    def press_ctrl_c() -> None:
        serving.wait(10)
        port = port_in(messages[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/model")
        statuses.append((port, connection.getresponse().status))
        connection.close()
        os.kill(os.getpid(), signal.SIGINT)

    statuses: list[tuple[int, int]] = []
    callers_handler_calls: list[int] = []  # like main's handler, which turns SIGINT into its own exception
    original = signal.signal(signal.SIGINT, lambda signum, frame: callers_handler_calls.append(signum))
    try:
        callers_handler = signal.getsignal(signal.SIGINT)
        helper = threading.Thread(target=press_ctrl_c)
        helper.start()
        serve.serve(trained.model, prepare=prepare_for(trained.model), softmax=main.softmax, class_names=CLASS_NAMES,
                    info=trained.info, port=0, announce=announce)
        helper.join(10)
        assert signal.getsignal(signal.SIGINT) is callers_handler
    finally:
        signal.signal(signal.SIGINT, original)
    assert callers_handler_calls == []
    port, status = statuses[0]
    assert port > 0 and status == 200
    assert messages[0] == f"serving the model at http://127.0.0.1:{port}/ (open it in a browser; Ctrl-C stops)"
    assert messages[-1] == "stopped serving (Ctrl-C)"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_serving_beyond_this_machine_warns(trained: Trained) -> None:
    """--host 0.0.0.0 says that anyone on the network can reach the page; an exception while serving (here from
    announce) still closes the server and propagates."""
    messages: list[str] = []

    class StopError(Exception):
        pass

    def announce(message: str) -> None:
        messages.append(message)
        if message.startswith("WARNING"):
            raise StopError

    with pytest.raises(StopError):
        serve.serve(trained.model, prepare=prepare_for(trained.model), softmax=main.softmax, class_names=CLASS_NAMES,
                    info={}, host="0.0.0.0", port=0, announce=announce)
    assert "anyone" in messages[1] and "--host 127.0.0.1" in messages[1]
    port = port_in(messages[0])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_serving_on_localhost_gives_no_warning() -> None:
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("localhost") and serve.is_loopback("::1")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("") and not serve.is_loopback("192.168.1.2")


# ------------------------------------------------------------------------------------------------
# images.image_from_bytes, which read_image uses for every Pillow format
# ------------------------------------------------------------------------------------------------


def test_image_from_bytes_matches_read_image(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[5:15, 10:20] = (0, 0, 0, 255)  # black ink on transparent
    path = tmp_path / "ink.png"
    Image.fromarray(rgba).save(path)
    from_bytes = images.image_from_bytes(path.read_bytes())
    np.testing.assert_array_equal(from_bytes, images.read_image(path))
    assert from_bytes.shape == (20, 30) and from_bytes[0, 0] == 1.0 and from_bytes[10, 15] == 0.0


def test_image_from_bytes_refuses_non_images_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(CNNError, match="cannot read it as an image") as caught:
        images.image_from_bytes(b"GIF89a but not really")
    assert "BytesIO" not in str(caught.value)
    path = tmp_path / "fake.png"
    path.write_bytes(b"not a png")
    with pytest.raises(CNNError, match=r"fake\.png: cannot read it as an image"):
        images.read_image(path)


# ------------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------------


def test_a_prediction_of_the_default_model_with_all_activations_feels_instant(trained: Trained) -> None:
    """The default architecture (conv32-relu-pool-conv64-relu-pool-flatten-dense128-relu-dense10, untrained: the
    time does not depend on the weights): a whole request, from the PNG to every layer's activations, in well
    under a tenth of a second."""
    rng = np.random.default_rng(1)
    model = main.Sequential([
        main.Conv2D(1, 32, 3, 1, 1, rng=rng), main.ReLU(), main.MaxPool2D(2),
        main.Conv2D(32, 64, 3, 1, 1, rng=rng), main.ReLU(), main.MaxPool2D(2),
        main.Flatten(), main.Dense(7 * 7 * 64, 128, rng=rng), main.ReLU(), main.Dense(128, 10, rng=rng),
    ], (28, 28, 1))
    url = data_url(drawing(trained.test_images[3]))
    with running(model, {}) as server:
        seconds = []
        for _ in range(7):
            started = time.perf_counter()
            status, answer = predict(server, url)
            seconds.append(time.perf_counter() - started)
            assert status == 200 and len(answer["layers"]) == 10
    assert np.median(seconds) < 0.1, f"median {1000 * np.median(seconds):.0f} ms per prediction"


# ------------------------------------------------------------------------------------------------
# The command line: --serve after training, --load-model --serve, and what goes wrong
# ------------------------------------------------------------------------------------------------


def start_cli_server(args: list[str], cwd: Path) -> tuple[subprocess.Popen, str]:
    """`python src/main.py ARGS` in the background; returns it and the URL it announces."""
    process = subprocess.Popen([sys.executable, str(ROOT / "src" / "main.py"), *args], cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    for line in process.stdout:
        found = re.search(r"http://[\w.\[\]:]+:\d+/", line)
        if found:
            return process, found.group(0)
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError(f"no URL announced; stderr: {process.stderr.read()}")


def get_json(url: str) -> dict:
    host, port = re.match(r"http://([\w.]+):(\d+)/", url).groups()
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", "/api/model")
    return json.loads(connection.getresponse().read())


def stop_with_ctrl_c(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, process.stderr.read()


def test_serve_trains_first_then_serves_the_trained_model_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """Without --load-model: serves the page while it trains as configured (live.py), saves, then serves the
    trained model (which says it was trained on synthetic digits); Ctrl-C ends it with exit code 0. Then the
    saved model is served with --load-model."""
    process, url = start_cli_server(["--dataset", "synthetic", "--n-train", "300", "--n-test", "60", "--epochs",
                                     "1", "--save-model", "m.npz", "--serve", "--port", "0"], tmp_path)
    assert any(line.startswith("training done: still serving the page") for line in process.stdout)
    info = get_json(url)["info"]
    assert info["dataset"] == "synthetic" and info["source"] == "synthetic" and info["n_train"] == 300
    assert info["epochs"] == 1 and 0 <= info["test_accuracy"] <= 1
    code, stderr = stop_with_ctrl_c(process)
    assert code == 0, stderr
    assert "Traceback" not in stderr

    process, url = start_cli_server(["--load-model", "m.npz", "--serve", "--port", "0"], tmp_path)
    model = get_json(url)
    assert model["info"]["epochs"] == 1 and len(model["layers"]) == 10
    code, stderr = stop_with_ctrl_c(process)
    assert code == 0, stderr


def test_serve_refuses_a_busy_port_and_stray_flags_with_one_line(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        main_args = ["--dataset", "synthetic", "--n-train", "64", "--n-test", "16", "--epochs", "1", "--save-model",
                     "m.npz"]
        assert subprocess.run([sys.executable, str(ROOT / "src" / "main.py"), *main_args], cwd=tmp_path,
                              capture_output=True).returncode == 0
        for args, message in [
            (["--load-model", "m.npz", "--serve", "--port", str(busy.getsockname()[1])], "the port is already in use"),
            (["--port", "8000"], "--port goes with --serve"),
            (["--load-model", "m.npz", "--serve", "--epochs", "3"], "--epochs has no effect with --load-model and "
                                                                    "--serve"),
            (["--load-model", "m.npz", "--serve", "--port", "70000"], "a port is a number from 0 to 65535"),
        ]:
            proc = subprocess.run([sys.executable, str(ROOT / "src" / "main.py"), *args], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 2, (args, proc.stderr)
            assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    finally:
        busy.close()


# ---- pictures the server refuses, hostile clients, and what the page is offered -------------------------------------
def test_the_server_refuses_an_eps_drawing(model_file: Path) -> None:
    loaded = modelfile.load_model(model_file, main.build_model)
    predictor = serve.Predictor(loaded.model, lambda image: images.prepare_image(image, loaded.model.input_shape),
                                main.softmax, loaded.meta["class_names"])
    url = "data:image/png;base64," + base64.b64encode(EPS).decode()
    with pytest.raises(serve.RequestError, match=r'^"image": is a PostScript \(EPS\) file'):
        predictor.predict(url)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail("the server did not start")


def post_png(port: int, png: bytes, timeout: float = 60) -> int:
    import http.client

    body = json.dumps({"image": "data:image/png;base64," + base64.b64encode(png).decode()}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/api/predict", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def big_png(side: int) -> bytes:
    """An RGBA PNG of side x side pixels that compresses well (under the 2 MB body limit), with ink in it."""
    rows, cols = np.indices((side, side))
    rgba = np.zeros((side, side, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[side // 4:3 * side // 4, side // 2 - side // 16:side // 2 + side // 16, :3] = 255
    rgba[..., 0] |= ((rows + cols) % 7 == 0).astype(np.uint8)
    return encoded(Image.fromarray(rgba), "PNG")


def test_thirty_concurrent_big_uploads_keep_the_server_under_200_mb(tmp_path: Path, model_file: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    process = subprocess.Popen([sys.executable, str(MAIN), "--load-model", str(model_file), "--serve", "--port",
                                str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_server(port, process)
        assert post_png(port, big_png(2048)) == 400  # refused from its header, before decoding
        upload = big_png(1024)
        assert len(upload) < 2 * 1024 * 1024
        with ThreadPoolExecutor(30) as pool:
            statuses = list(pool.map(lambda _: post_png(port, upload), range(30)))
        status = Path(f"/proc/{process.pid}/status").read_text()
        peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2, statuses
    print(f"peak RSS of the server under 30 concurrent 1024x1024 RGBA uploads: {peak_kb / 1024:.0f} MB; "
          f"answers: {statuses.count(200)} x 200, {statuses.count(503)} x 503")
    assert peak_kb < 200 * 1024


def test_the_page_sends_its_drawing_at_the_pad_size() -> None:
    """The page never sends more than MAX_IMAGE_PIXELS: it posts its 280x280 drawing pad, whatever the screen."""
    web = Path(__file__).resolve().parents[1] / "src" / "web"
    page, script = (web / "index.html").read_text(), (web / "app.js").read_text()
    assert '<canvas id="pad" width="280" height="280"' in page and 'pad.toDataURL("image/png")' in script
    assert 280 * 280 <= serve.MAX_IMAGE_PIXELS == 1024 * 1024


@pytest.fixture
def small_server(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[serve.DrawServer]:
    """The server in this process, with a 2-second deadline per request and at most 20 connections."""
    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 20)
    loaded = modelfile.load_model(model_file, main.build_model)
    server = serve.make_server(loaded.model, prepare=lambda image: images.prepare_image(image, (8, 8, 1)),
                               softmax=main.softmax, class_names=loaded.meta["class_names"], info={}, port=0,
                               timeout=2.0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def run_state(port: int) -> str:
    """The live run's state from GET /api/run: training, paused or done."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/run", timeout=10) as response:
        return json.loads(response.read())["state"]


def get_model(port: int, timeout: float = 10) -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/api/model")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_a_client_that_trickles_its_request_is_cut_off_at_the_deadline(small_server: serve.DrawServer) -> None:
    """A byte every 0.3 s never trips a per-read timeout; the total deadline (2 s here) closes it all the same."""
    client = socket.create_connection(("127.0.0.1", small_server.port), timeout=10)
    start, closed_after = time.monotonic(), None
    try:
        for byte in b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:
            try:
                client.send(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - start
                break
            client.settimeout(0.3)
            try:
                if client.recv(1024) == b"":
                    closed_after = time.monotonic() - start
                    break
            except socket.timeout:
                pass
    finally:
        client.close()
    assert closed_after is not None and closed_after < 5, "the trickling connection was kept open"


def test_beyond_the_connection_cap_a_client_gets_503_and_a_normal_request_is_answered_soon(
        small_server: serve.DrawServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", small_server.port), timeout=10) for _ in range(20)]
    try:
        time.sleep(0.3)
        over = socket.create_connection(("127.0.0.1", small_server.port), timeout=10)
        answer = over.recv(4096)
        over.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many open connections" in answer
        start = time.monotonic()
        status = None
        while status != 200 and time.monotonic() - start < 10:  # the idle ones are cut off at their deadline
            try:
                status = get_model(small_server.port)
            except OSError:
                time.sleep(0.2)
        assert status == 200 and time.monotonic() - start < 6
    finally:
        for connection in idle:
            connection.close()


def test_a_client_that_announces_a_body_and_sends_none_is_closed_not_answered_500(
        small_server: serve.DrawServer) -> None:
    client = socket.create_connection(("127.0.0.1", small_server.port), timeout=10)
    try:
        client.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000\r\n\r\n{" % small_server.port)
        answer = b""
        while True:
            chunk = client.recv(4096)
            if not chunk:
                break
            answer += chunk
    finally:
        client.close()
    assert b" 500 " not in answer, answer


def test_sigterm_stops_a_server_that_trained_first_with_143(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(MAIN), "--config", str(small_config_file(tmp_path)), "--serve",
                                "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for_server(port, process)
        deadline = time.monotonic() + 120
        while run_state(port) != "done":  # the page follows training: wait until it only serves
            assert time.monotonic() < deadline, "training did not end"
            time.sleep(0.2)
        assert get_model(port) == 200
        process.send_signal(15)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, stderr
    assert "stopping after" not in stderr and "interrupted (SIGTERM)" in stderr


def test_the_page_offers_the_pad_to_digit_models_and_a_file_drop_to_the_others() -> None:
    import serve

    rng = np.random.default_rng(0)
    grey = main.build_model(main.config_schema.check_model(SMALL_FOLDER_MODEL), (28, 28, 1), 10, rng)
    colour = main.build_model(main.config_schema.check_model(SMALL_FOLDER_MODEL), (20, 16, 3), 10, rng)
    examples = {"images": rng.integers(0, 256, (3, 20, 16, 3), dtype=np.uint8), "labels": np.array([0, 4, 9])}
    assert serve.page_options(grey, {"dataset": "mnist", "class_names": CLASS_FOLDER_NAMES})["mode"] == "draw"
    fashion = serve.page_options(grey, {"dataset": "fashion_mnist", "class_names": CLASS_FOLDER_NAMES})
    assert fashion["mode"] == "picture" and fashion["decode"] is None  # the digit recipe, but no pad
    options = serve.page_options(colour, {"dataset": "folder", "class_names": CLASS_FOLDER_NAMES,
                                          "examples": examples})
    assert options["mode"] == "picture"
    assert [e["class"] for e in options["examples"]] == [CLASS_FOLDER_NAMES[i] for i in (0, 4, 9)]
    predictor = serve.Predictor(colour, options["prepare"], main.softmax, CLASS_FOLDER_NAMES, options["decode"])
    answer = predictor.predict(options["examples"][1]["image"], "lists")
    assert answer["input"]["shape"] == [20, 16, 3] and np.array_equal(answer["input"]["values"], examples["images"][1])
    assert len(answer["layers"]) == len(colour.layers)
    with pytest.raises(serve.RequestError, match="the formats read are PNG, JPEG, GIF, BMP or WebP"):
        predictor.predict("data:image/png;base64,aGVsbG8=")
