"""The draw-a-digit page: a local web server that runs a trained model on drawings (`--serve`).

make_server() binds a ThreadingHTTPServer that answers these and nothing else:

    GET  /              the page, src/web/index.html, and GET /app.js its script (both read once, at start-up)
    GET  /api/model     the model's summary (layers, output shapes, parameters) and where it was trained
    POST /api/predict   {"image": "data:image/png;base64,..."} -> the preprocessed image, the class
                        probabilities and every layer's activations (see docs/API.md for the format)
    LIVE_ROUTES         while a run trains (--serve without --load-model): its events, snapshot and controls,
                        answered by live.py; 404 otherwise
    anything else       404 (405 for a known path with the wrong method), always as a JSON {"error": ...}

serve() runs it until Ctrl-C. The model is evaluated with forward(x, training=False), which keeps nothing on
the layers, so any number of requests can run it at the same time. A leaf module: it imports images and errors,
never main (main passes in the model, the preprocessing and the softmax).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import io
import ipaddress
import json
import logging
import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from errors import CNNError
from images import image_from_bytes, model_input, picture_from_bytes, prepare_image, preprocess_of

log = logging.getLogger("numpy_cnn.serve")

PAGE_PATH = Path(__file__).resolve().parent / "web" / "index.html"
SCRIPT_PATH = PAGE_PATH.with_name("app.js")
MAX_BODY_BYTES = 2 * 1024 * 1024  # a drawing is a few kilobytes; a photo of a digit fits too
MAX_DRAIN_BYTES = 16 * 1024 * 1024  # an oversized body up to this is read and dropped, so the client gets its 413
MAX_IMAGE_PIXELS = 1024 * 1024  # checked before decoding: a small PNG can hold a huge image (the page sends 280x280)
MAX_BODIES_IN_FLIGHT = 8  # request bodies held at once (up to MAX_BODY_BYTES each, and their decoded copies)
MAX_DECODES_IN_FLIGHT = 2  # drawings decoded and run through the model at once (tens of MB each at the most)
SLOT_WAIT = 2.0  # seconds a request waits for one of those slots before it is answered 503
MAX_CONNECTIONS = 64  # open connections; beyond that a new one is answered 503 and closed at once
DEFAULT_TIMEOUT = 10.0  # seconds a client may take to send a whole request (line, headers and body)
BLANK_INK = 0.05  # a prepared image whose brightest pixel is below this has no ink

PAGE_HEADERS = {
    # The page runs only its own script (app.js, from this server) and styles, asks this server only, is not framed.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                               "img-src data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
}
BUSY_BODY = b'{"error":"the server has too many open connections: try again in a moment"}'
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: " + str(len(BUSY_BODY)).encode() + b"\r\n\r\n" + BUSY_BODY)
# The routes of a run being watched (--serve while training), answered by live.LiveRun.answer (see live.py).
LIVE_ROUTES = {"/api/events": "GET", "/api/run": "GET", "/api/control": "POST", "/api/confusion": "GET",
               "/api/probe": "GET"}
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


class RequestError(Exception):
    """A request the client must fix: answered with `status` and a JSON {"error": message}."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


# ------------------------------------------------------------------------------------------------
# The model's side: decoding a drawing, running every layer, packing the answer
# ------------------------------------------------------------------------------------------------


def decode_data_url(url: Any) -> bytes:
    """The bytes of an image sent as a data URL, 'data:image/png;base64,iVBOR...'; RequestError for anything else."""
    if not isinstance(url, str):
        raise RequestError(f'"image" must be a string (a data URL such as data:image/png;base64,...), '
                           f"not {type(url).__name__}")
    head, comma, payload = url.partition(",")
    if not head.lower().startswith("data:") or not comma:
        raise RequestError('"image" is not a data URL: expected data:image/png;base64,...')
    media_type, *parameters = head[5:].split(";")
    if not media_type.strip().lower().startswith("image/"):
        raise RequestError(f'"image" is a data URL of {media_type or "no media type"!r}, not of an image')
    if "base64" not in (p.strip().lower() for p in parameters):
        raise RequestError('"image" must be base64-encoded: data:image/png;base64,...')
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError('"image" holds invalid base64') from None
    if not data:
        raise RequestError('"image" is empty: the data URL holds no bytes')
    return data


def quantise(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Values as integers 0-255 on a scale from `low` to `high` (which always includes 0):
    value ~= low + q * (high - low) / 255. Returns (q as uint8, low, high)."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = min(float(values.min(initial=0.0)), 0.0), max(float(values.max(initial=0.0)), 0.0)
    if high - low <= 0:
        return np.zeros(values.shape, dtype=np.uint8), low, high
    return np.rint((values - low) * (255 / (high - low))).astype(np.uint8), low, high


def layer_outputs(model: Any, x: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(name, type, output) of every layer for the batch x, in order, evaluated with training=False."""
    outputs = []
    for name, layer in zip(model.names, model.layers):
        x = layer.forward(x, training=False)
        outputs.append((name, type(layer).__name__, x))
    return outputs


def describe_layer(name: str, kind: str, output: np.ndarray, encoding: str = "base64") -> dict:
    """One layer's output (without the batch axis) for the page, quantised to 0-255 (see quantise).

    An (H, W, C) output is sent as C feature maps of H x W ("kind": "maps"), anything else as one vector of
    all its values ("vector"). "values" is a base64 string of the uint8 values, maps one after another, each
    row by row (encoding "base64"), or nested lists: [C][H][W] or [K] (encoding "lists")."""
    q, low, high = quantise(output)
    form = "maps" if q.ndim == 3 else "vector"
    ordered = q.transpose(2, 0, 1) if form == "maps" else q.reshape(-1)
    if encoding == "lists":
        values: Any = ordered.tolist()
    else:
        values = base64.b64encode(np.ascontiguousarray(ordered).tobytes()).decode("ascii")
    return {"name": name, "type": kind, "shape": list(output.shape), "kind": form, "min": round(low, 6),
            "max": round(high, 6), "encoding": encoding, "values": values}


class Predictor:
    """Runs the model on drawings. Shared by every request thread: it holds nothing that a request changes."""

    def __init__(self, model: Any, prepare: Callable[[np.ndarray], np.ndarray],
                 softmax: Callable[[np.ndarray], np.ndarray], class_names: list[str],
                 decode: Callable[[bytes], np.ndarray] | None = None) -> None:
        self.model, self.prepare, self.softmax, self.decode = model, prepare, softmax, decode
        self.class_names = [str(name) for name in class_names]

    def predict(self, data_url: Any, encoding: Any = "base64") -> dict:
        """The answer to POST /api/predict for one drawing (RequestError for a drawing that cannot be used)."""
        start = time.perf_counter()
        if encoding not in ("base64", "lists"):
            raise RequestError(f'"encoding" must be "base64" (the default) or "lists", not {str(encoding)[:40]!r}')
        data = decode_data_url(data_url)
        try:
            drawing = self.decode(data) if self.decode else image_from_bytes(data, max_pixels=MAX_IMAGE_PIXELS)
        except CNNError as error:  # its line starts with "image"
            raise RequestError(str(error)) from None
        if drawing.size == 0:
            raise RequestError('"image" has no pixels')
        try:
            prepared = np.asarray(self.prepare(drawing), dtype=np.float32)
        except CNNError as error:
            raise RequestError(f'"image": {error}') from None
        if self.decode is None and (not prepared.size or float(prepared.max()) < BLANK_INK):  # drawings only
            raise RequestError('"image" is blank (no ink found): draw something first')
        return self.answer(prepared, encoding, start)

    def answer(self, prepared: np.ndarray, encoding: str = "base64", start: float | None = None) -> dict:
        """The answer for one prepared image (H, W, C) in [0, 1]: prediction, probabilities, input, layers."""
        start = time.perf_counter() if start is None else start
        outputs = layer_outputs(self.model, prepared[None])
        probabilities = np.nan_to_num(self.softmax(outputs[-1][2])[0].astype(np.float64))
        best = int(probabilities.argmax())
        shown = prepared[..., 0] if prepared.ndim == 3 and prepared.shape[2] == 1 else prepared  # grey: (H, W)
        seen = np.rint(np.clip(np.nan_to_num(shown), 0, 1) * 255).astype(np.uint8)  # the input is in [0, 1]
        return {
            "prediction": {"index": best, "class": self.name_of(best),
                           "probability": round(float(probabilities[best]), 6)},
            "probabilities": [{"class": self.name_of(i), "probability": round(float(p), 6)}
                              for i, p in enumerate(probabilities)],
            "input": {"shape": list(seen.shape), "values": seen.tolist()},
            "layers": [describe_layer(name, kind, output[0], encoding) for name, kind, output in outputs],
            "milliseconds": round(1000 * (time.perf_counter() - start), 2),
        }

    def name_of(self, index: int) -> str:
        """The name of class `index` (its number when the model has more outputs than names)."""
        return self.class_names[index] if index < len(self.class_names) else str(index)


def model_document(model: Any, class_names: list[str], info: dict, mode: str = "draw",
                   examples: list[dict] | None = None) -> dict:
    """The answer to GET /api/model: the summary rows, the totals, the classes, where the model was trained, the
    page's mode ("draw": the drawing pad; "picture": a file drop and the example images) and the examples."""
    rows = model.summary_rows()
    return {"layers": rows, "parameters": int(sum(int(row["parameters"]) for row in rows)),
            "input_shape": [int(v) for v in model.input_shape], "class_names": [str(c) for c in class_names],
            "info": info, "mode": mode, "examples": examples or []}


def example_images(examples: dict | None, class_names: list[str]) -> list[dict]:
    """A model file's example test images ({images: uint8 (N, H, W, C), labels}) as [{class, image: a PNG data
    URL}] for the page to show and send back to /api/predict."""
    from PIL import Image

    if not examples:
        return []
    shown = []
    for image, label in zip(examples["images"], examples["labels"]):
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
        shown.append({"class": str(class_names[int(label)]),
                      "image": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")})
    return shown


# ------------------------------------------------------------------------------------------------
# The HTTP side
# ------------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.x.x.x, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, str]:
    """A Host header's (host, port), with IPv6 brackets removed and the host in lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else ""
    host, _, port = value.rpartition(":") if ":" in value else (value, "", "")
    return host, port


class DeadlineReader(io.RawIOBase):
    """A connection's incoming bytes, each read given only the time left until `deadline()` (time.monotonic):
    a client that sends one byte every few seconds (slowloris) times out as one that sends nothing, instead of
    holding its thread and connection for as long as it keeps trickling."""

    def __init__(self, connection: socket.socket, deadline: Callable[[], float], write_timeout: float) -> None:
        super().__init__()
        self.connection, self.deadline, self.write_timeout = connection, deadline, write_timeout

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline() - time.monotonic()
        if left <= 0:
            raise socket.timeout("the request took longer than the server allows")
        self.connection.settimeout(left)
        try:
            return self.connection.recv_into(buffer)
        finally:
            self.connection.settimeout(self.write_timeout)  # the answer gets the usual timeout per write


class Handler(BaseHTTPRequestHandler):
    """One request: checks the Host, routes by exact path, answers with the page or JSON."""

    server: DrawServer
    server_version = "numpy-cnn"
    sys_version = ""
    error_content_type = "application/json"

    def setup(self) -> None:
        """Give the connection the server's socket timeout before http.server wraps it in files, and read it
        through a DeadlineReader: each request (its line, headers and body) must arrive within client_timeout
        of the connection's opening or of the previous answer."""
        self.timeout = self.server.client_timeout  # a slow client gets a timeout, then its connection closed
        super().setup()
        self.deadline = time.monotonic() + self.server.client_timeout
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, lambda: self.deadline, self.timeout))

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except socket.timeout:  # before Python 3.10 not a TimeoutError, which http.server catches
            self.close_connection = True
        self.deadline = time.monotonic() + self.server.client_timeout  # the next request's time starts now

    # --- routing: http.server calls do_<METHOD>; every method goes through route() ----------------

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def do_HEAD(self) -> None:
        self.route("HEAD")

    def do_PUT(self) -> None:
        self.route("PUT")

    def do_DELETE(self) -> None:
        self.route("DELETE")

    def do_PATCH(self) -> None:
        self.route("PATCH")

    def do_OPTIONS(self) -> None:
        self.route("OPTIONS")

    def route(self, method: str) -> None:
        """Answer one request: a refused Host or Origin (403), an exact path (200), a known path with another
        method (405) or anything else (404); errors as JSON {"error": ...}, a bug as 500."""
        allowed = None
        try:
            self.check_origin()
            path = urlsplit(self.path).path
            allowed = {**dict.fromkeys(self.server.files, "GET"), "/api/model": "GET", "/api/predict": "POST",
                       **LIVE_ROUTES}.get(path)
            if allowed is None:
                raise RequestError(f"not found: {path[:200]} (this server answers /, /api/model and /api/predict)",
                                   HTTPStatus.NOT_FOUND)
            if method != allowed:
                raise RequestError(f"{path} takes {allowed}, not {method}", HTTPStatus.METHOD_NOT_ALLOWED)
            if path == "/api/run" and self.server.live is None:
                self.send_json(HTTPStatus.OK, {"live": False})  # how the page learns that nothing trains
            elif path in LIVE_ROUTES:
                if self.server.live is None:
                    raise RequestError(f"{path}: no training run is being watched (this page serves a saved model)",
                                       HTTPStatus.NOT_FOUND)
                self.server.live.answer(self, path)
            elif path == "/api/predict":
                with self.server.slot(self.server.bodies, "requests"):
                    document = self.read_json()
                    with self.server.slot(self.server.decodes, "drawings"):
                        answer = self.server.decoder.submit(self.server.predictor.predict, document["image"],
                                                            document.get("encoding", "base64")).result()
                self.send_json(HTTPStatus.OK, answer)
            elif path == "/api/model":
                self.send_bytes(HTTPStatus.OK, self.server.model_json, "application/json")
            else:
                self.send_bytes(HTTPStatus.OK, *self.server.files[path], PAGE_HEADERS)
        except RequestError as error:
            self.send_json(error.status, {"error": str(error)},
                           {"Allow": allowed} if error.status == HTTPStatus.METHOD_NOT_ALLOWED else None)
        except (socket.timeout, TimeoutError, ConnectionError):
            raise  # the client is gone or too slow: nothing to answer (handle_one_request closes the connection)
        except Exception as error:  # a bug: one line for the client and the console, the traceback at debug level
            log.error("serve: %s %s failed (%s: %s)", method, self.path[:200], type(error).__name__, error)
            log.debug("traceback", exc_info=True)
            self.send_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                           {"error": f"the server failed on this request ({type(error).__name__})"})

    def check_origin(self) -> None:
        """Refuse a Host (or Origin) that is not this server's address: a page on another site that made its own
        name resolve to 127.0.0.1 (DNS rebinding) sends its own name as the Host."""
        host = self.headers.get("Host")
        if host is None or not self.server.host_allowed(host):
            raise RequestError(f"this server answers requests for {self.server.url_host}, not for "
                               f"{host[:100] if host else 'a request without a Host header'}", HTTPStatus.FORBIDDEN)
        origin = self.headers.get("Origin")
        if origin is not None:  # the page's own requests carry its origin; "null" comes from sandboxes and files
            parts = urlsplit(origin)
            if parts.scheme != "http" or not self.server.host_allowed(parts.netloc):
                raise RequestError(f"requests from pages of {origin[:100]} are not served", HTTPStatus.FORBIDDEN)

    def read_json(self) -> dict:
        """The request body as a JSON object with an "image"; RequestError (400, 411, 413, 415) otherwise."""
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(f"send the drawing as application/json, not {content_type or 'no Content-Type'}",
                               HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError("send a Content-Length (chunked bodies are not accepted)", HTTPStatus.LENGTH_REQUIRED)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            raise RequestError("send a Content-Length", HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise RequestError(f"Content-Length {length_header[:40]!r} is not a number of bytes") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self.drain(length)
            raise RequestError(f"the request body is {length:,} bytes; the limit is {MAX_BODY_BYTES:,}",
                               HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        body = self.rfile.read(length)
        if len(body) < length:
            self.close_connection = True
            raise RequestError(f"the request body ended after {len(body):,} of {length:,} bytes")
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise RequestError(f"the request body is not valid JSON ({str(error)[:120]})") from None
        if not isinstance(document, dict) or "image" not in document:
            raise RequestError('the request body must be a JSON object {"image": "data:image/png;base64,..."}')
        return document

    def drain(self, length: int) -> None:
        """Read and drop an oversized body (up to MAX_DRAIN_BYTES, while it keeps coming), so that a client that
        is still sending receives the 413 rather than a reset connection."""
        remaining = min(length, MAX_DRAIN_BYTES)
        self.deadline = min(self.deadline, time.monotonic() + 1.0)
        try:
            while remaining > 0:
                chunk = self.rfile.read1(min(remaining, 65536))
                if not chunk:
                    return
                remaining -= len(chunk)
        except (socket.timeout, TimeoutError):
            return  # a client that announced a large body and stopped sending: answer now

    # --- answering ----------------------------------------------------------------------------

    def send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        """Answer with a compact JSON document."""
        body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
        self.send_bytes(status, body, "application/json", headers)

    def send_bytes(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        """Answer with a body of known length and the headers every answer gets."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {**COMMON_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by http.server itself (a malformed request line, headers too long, an unknown method):
        JSON like every other answer, and the connection closed."""
        self.close_connection = True
        try:
            text = message or HTTPStatus(code).phrase
        except ValueError:
            text = f"error {code}"
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, text = HTTPStatus.NOT_FOUND, f"not found: this server answers GET and POST, not {self.command}"
        self.log_error("code %d, message %s", code, text)
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":  # a garbled request line: answer with a
            self.request_version = "HTTP/1.0"  # status line and headers all the same
        self.send_json(code, {"error": text})

    def log_message(self, format: str, *args: Any) -> None:
        """Each request and error goes to the log at debug level, not to stderr."""
        log.debug("serve: %s %s", self.address_string(), format % args)


class DrawServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the predictor, the page and the addresses it answers to.

    files: path -> (body, content type) of what GET serves as is: the page at / and /index.html, its script at
    /app.js."""

    live: Any = None  # while a run trains: the live.LiveRun that answers LIVE_ROUTES
    daemon_threads = True  # a request still running does not keep the program alive after Ctrl-C
    request_queue_size = 128  # connections waiting to be accepted (socketserver's 5 refuses a burst of requests)

    def __init__(self, address: tuple[str, int], predictor: Predictor, files: dict[str, tuple[bytes, str]],
                 model_json: bytes, client_timeout: float) -> None:
        self.predictor, self.files, self.model_json, self.client_timeout = predictor, files, model_json, client_timeout
        self.bodies = threading.BoundedSemaphore(MAX_BODIES_IN_FLIGHT)
        self.decodes = threading.BoundedSemaphore(MAX_DECODES_IN_FLIGHT)
        # The drawings are decoded and run on this many threads only (not on each connection's thread): the memory
        # a decode frees is then reused by the next one instead of staying with the allocator of every thread.
        self.decoder = ThreadPoolExecutor(MAX_DECODES_IN_FLIGHT, thread_name_prefix="decode")
        self.connections, self.connections_lock = 0, threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.bound_host, self.port = address[0], int(self.server_address[1])
        shown = f"[{self.bound_host}]" if ":" in self.bound_host else self.bound_host
        self.url_host = f"{shown}:{self.port}"
        self.names = {"localhost", self.bound_host.lower()}
        if self.bound_host in ("", "0.0.0.0", "::") or not is_loopback(self.bound_host):
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host's name up in DNS (getfqdn), which can take seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def host_allowed(self, value: str) -> bool:
        """True for 'HOST:PORT' naming this server: its port, and its bound host, localhost, or an IP address
        (an IP address is no rebinding risk: a page's origin is then the address itself)."""
        host, port = split_host(value)
        if port != str(self.port) and not (port == "" and self.port == 80):  # browsers leave out :80
            return False
        if host in self.names:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return address.is_loopback or not is_loopback(self.bound_host)

    @contextlib.contextmanager
    def slot(self, semaphore: threading.BoundedSemaphore, what: str) -> Iterator[None]:
        """Hold one of a bounded number of places (bodies read, drawings decoded); RequestError 503 when none
        frees up within SLOT_WAIT seconds, so that memory stays bounded whatever clients send."""
        if not semaphore.acquire(timeout=SLOT_WAIT):
            raise RequestError(f"the server is busy with other {what}: try again in a moment",
                               HTTPStatus.SERVICE_UNAVAILABLE)
        try:
            yield
        finally:
            semaphore.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread per connection, up to MAX_CONNECTIONS open at once; beyond that, 503 and closed at once."""
        with self.connections_lock:
            full = self.connections >= MAX_CONNECTIONS
            self.connections += 0 if full else 1
        if full:
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.send(BUSY_ANSWER)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.connections_lock:
                self.connections -= 1

    def server_close(self) -> None:
        super().server_close()
        self.decoder.shutdown(wait=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (a client that hung up or timed out): a debug line, no traceback on stderr."""
        log.debug("serve: connection from %s failed", client_address, exc_info=True)


def make_server(model: Any, *, prepare: Callable[[np.ndarray], np.ndarray],
                softmax: Callable[[np.ndarray], np.ndarray], class_names: list[str], info: dict,
                host: str = "127.0.0.1", port: int = 8000, timeout: float = DEFAULT_TIMEOUT,
                decode: Callable[[bytes], np.ndarray] | None = None, mode: str = "draw",
                examples: list[dict] | None = None) -> ThreadingHTTPServer:
    """A bound, listening server for the model (not yet serving: call serve_forever(), or use serve()).

    model: a Sequential (layers, names, input_shape, summary_rows()); prepare: a 2-D grey image in [0, 1] ->
    the model's input (H, W, 1), as --predict prepares files; softmax: logits (N, K) -> probabilities;
    class_names: one per output; info: where the model was trained (dataset, source, test_accuracy, ...), shown
    on the page; port 0 picks a free port (see server.server_address); timeout: seconds a client may take to
    send its request; decode: the bytes of a posted image -> what prepare takes (default: a 2-D grey drawing,
    images.image_from_bytes; a picture model reads colour); mode and examples: see model_document. Raises
    CNNError (one line) when the address cannot be bound.
    """
    if not 0 <= int(port) <= 65535:
        raise CNNError(f"--port {port}: a port is a number from 0 to 65535 (0 picks a free one)")
    try:
        page, script = PAGE_PATH.read_bytes(), SCRIPT_PATH.read_bytes()
    except OSError as error:
        raise CNNError(f"cannot read the page {error.filename} ({error.strerror or error})") from None
    files = {"/": (page, "text/html; charset=utf-8"), "/index.html": (page, "text/html; charset=utf-8"),
             "/app.js": (script, "text/javascript; charset=utf-8")}
    model_json = json.dumps(model_document(model, class_names, info, mode, examples), default=jsonable).encode()
    predictor = Predictor(model, prepare, softmax, class_names, decode)
    try:
        return DrawServer((host, int(port)), predictor, files, model_json, timeout)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise CNNError(f"cannot serve on {host}:{port}: the port is already in use (another --port, or "
                           f"--port 0 for a free one)") from None
        if error.errno in (errno.EACCES, errno.EPERM):
            raise CNNError(f"cannot serve on {host}:{port}: permission denied (ports below 1024 need "
                           f"administrator rights; try --port 8000)") from None
        raise CNNError(f"cannot serve on {host}:{port}: {error.strerror or error}") from None


def jsonable(value: Any) -> Any:
    """NumPy numbers and arrays (and anything else) in `info` as JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def serve(model: Any, *, prepare: Callable[[np.ndarray], np.ndarray], softmax: Callable[[np.ndarray], np.ndarray],
          class_names: list[str], info: dict, host: str = "127.0.0.1", port: int = 8000,
          announce: Callable[[str], Any] = print, decode: Callable[[bytes], np.ndarray] | None = None,
          mode: str = "draw", examples: list[dict] | None = None) -> None:
    """Serve the model until Ctrl-C, then close the server and return.

    Announces the URL (with the real port when port is 0) and, for an address other machines can reach
    (0.0.0.0, a LAN address), a warning. While it serves, Ctrl-C raises KeyboardInterrupt (whatever SIGINT
    handler was installed before; the old one is put back), so it ends this function normally; any other
    exception (SIGTERM turned into one by the caller's handler) also closes the server, and propagates.
    """
    server = make_server(model, prepare=prepare, softmax=softmax, class_names=class_names, info=info, host=host,
                         decode=decode, mode=mode, examples=examples,
                         port=port)
    everywhere = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}  # open it here at this address
    shown = everywhere.get(host, f"[{host}]" if ":" in host else host)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        announce(f"serving the model at http://{shown}:{server.port}/ (open it in a browser; Ctrl-C stops)")
        if not is_loopback(host):
            elsewhere = socket.gethostname() if host in ("", "0.0.0.0", "::") else shown
            announce(f"WARNING: listening on {host or 'every address'}: anyone who can reach this machine on port "
                     f"{server.port} can use the page (other devices: http://{elsewhere}:{server.port}/); "
                     f"--host 127.0.0.1 keeps it to this machine")
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        announce("stopped serving (Ctrl-C)")
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


DRAWN_DATASETS = ("mnist", "digits", "synthetic")  # digit models: the page offers the drawing pad


def page_options(model: Any, meta: dict) -> dict:
    """make_server's prepare, decode, mode and examples for a model with a model file's meta entry: a digit
    model of DRAWN_DATASETS gets the drawing pad, any other a file drop and its example test images; each image
    is prepared as the model's preprocess record says (images.preprocess_record)."""
    shape, preprocess = model.input_shape, preprocess_of(meta, model.input_shape)
    drawn = meta.get("dataset") in DRAWN_DATASETS and shape[2] == 1
    options = {"mode": "draw" if drawn else "picture",
               "examples": example_images(meta.get("examples"), meta["class_names"])}
    if preprocess["method"] == "resize":
        return {**options, "decode": lambda data: picture_from_bytes(data, shape[:2], MAX_IMAGE_PIXELS),
                "prepare": lambda picture: model_input(picture, shape[2])[0]}
    return {**options, "decode": None,
            "prepare": lambda image: prepare_image(image, shape, preprocess.get("fill", 20 / 28))}


def serve_trained_model(model: Any, meta: dict, softmax: Callable[[np.ndarray], np.ndarray], host: str | None,
                        port: int | None) -> None:
    """--serve: the page for a model, until Ctrl-C. meta: the model file's meta entry (or what a model file of
    the model just trained would hold): class names, data set, where the data came from, training summary,
    preprocess record and example test images."""
    training, data = meta.get("training") or {}, meta.get("data") or {}
    info = {"dataset": meta.get("dataset"), "source": data.get("source"), "n_train": data.get("n_train"),
            "test_accuracy": training.get("test_accuracy"), "epochs": training.get("epochs_completed"),
            "parameters": model.parameter_count()}
    serve(model, softmax=softmax, class_names=meta["class_names"], info=info, host=host or "127.0.0.1",
          port=8000 if port is None else port, **page_options(model, meta),
          announce=lambda line: print(line, file=sys.stderr if line.startswith("WARNING") else sys.stdout, flush=True))
