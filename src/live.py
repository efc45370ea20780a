"""Watch it learn: the draw-a-digit page follows a training run while it trains (`--serve` without `--load-model`).

Three kinds of thread share one LiveRun, and only the first ever touches the model being trained:

    the trainer    calls on_step(position, result) between steps (train()'s hook). Every step it updates a
                   smoothed loss and honours pause; at most every SNAPSHOT_SECONDS, and at each epoch's end,
                   it hands over a Snapshot: the numbers of the moment and a twin of the model (twin_of: the
                   same layers holding copies of their weights). That is all it does: no socket, no JSON.
    the digester   (one thread, at low priority) turns each snapshot into an event: the first convolution's
                   filters and the probe images' answers; it also hands the twin to the page's predictor, so
                   that a drawing is answered by the weights of the latest snapshot.
    the server's   (serve.py, one per request) read the events and the latest digest under a lock, and write
    request threads  to their own socket: a client that stalls or vanishes holds only its own thread. The
                   confusion matrix of an epoch is scored by the first request that asks for it (scored).

The events (Server-Sent Events on GET /api/events, formats in docs/API.md): `progress` at most every
SNAPSHOT_SECONDS, `epoch` at each epoch's end, `done` once at the end; a `: ping` comment every PING_SECONDS.
A leaf module: it imports serve, images and errors, never main (main passes in what it needs).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import math
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np

from images import ink_fill, prepare_image
from serve import COMMON_HEADERS, RequestError, is_loopback, jsonable, make_server, quantise

log = logging.getLogger("numpy_cnn.live")

SNAPSHOT_SECONDS = 0.5  # the page's updates: at most two a second, whatever the batch rate
PING_SECONDS = 1.0  # a comment on every idle stream this often, so a dead connection is found and proxies wait
MAX_STREAMS = 32  # event streams open at once; more get 503
KEPT_EVENTS = 1000  # events kept for a client that reconnects with Last-Event-ID
PROBES = 8  # fixed test images the page follows: the first of each of the first PROBES classes
MISTAKES = 12  # the most confident mistakes shown after each epoch
CELL_IMAGES = 60  # images sent for one cell of the confusion matrix
LOSS_SMOOTHING = 0.95  # the curve's loss: an exponential moving average of the batch losses
EVAL_BATCH = 500
MAX_CONTROL_BYTES = 1024


def announce_line(line: str) -> None:
    """A line for the console, at once (the tests and scripts that start --serve read it from a pipe)."""
    print(line, flush=True)


def twin_of(model: Any) -> Any:
    """A copy of the model that shares no weight with it: each layer copied shallowly (its code and settings)
    with copies of its params and buffers, and without what training keeps on it (gradients, the caches of the
    last batch). Taken between two steps, it is the model of that moment, and forward(x, training=False) on it
    never touches the model being trained."""
    twin = copy.copy(model)
    twin.layers = []
    for layer in model.layers:
        copied = copy.copy(layer)
        for name in [name for name, value in vars(copied).items() if isinstance(value, np.ndarray)]:
            delattr(copied, name)
        copied.grads = {}
        copied.params = {name: array.copy() for name, array in layer.params.items()}
        copied.buffers = {name: array.copy() for name, array in layer.buffers.items()}
        twin.layers.append(copied)
    return twin


def finite(value: float | None, digits: int = 6) -> float | None:
    """A float for JSON: rounded, None when it is not a finite number."""
    return round(float(value), digits) if value is not None and math.isfinite(value) else None


def pack(array: np.ndarray) -> dict:
    """An array for the page: its shape, its range and its values quantised to 0-255 (serve.quantise), base64."""
    q, low, high = quantise(array)
    return {"shape": list(array.shape), "min": round(low, 6), "max": round(high, 6),
            "values": base64.b64encode(np.ascontiguousarray(q).tobytes()).decode("ascii")}


def grey_bytes(image: np.ndarray) -> str:
    """An (H, W, C) image in [0, 1] as base64 grey bytes, row by row."""
    grey = image.mean(axis=2) if image.ndim == 3 else image
    return base64.b64encode(np.rint(np.clip(grey, 0, 1) * 255).astype(np.uint8).tobytes()).decode("ascii")


def top3(probabilities: np.ndarray) -> list[list]:
    """[[class index, probability], ...] of the three most likely classes."""
    best = np.argsort(-probabilities)[:3]
    return [[int(k), round(float(probabilities[k]), 4)] for k in best]


@dataclass
class Snapshot:
    """The trainer's state between two steps, as handed to the digester: numbers and a twin of the model."""

    epoch: int
    batch: int
    n_batches: int
    step: int
    loss: float | None
    epoch_loss: float | None
    epoch_accuracy: float | None
    learning_rate: float
    images: int  # images trained on since the run started
    seconds: float  # training time since the run started, pauses left out
    epoch_ended: bool
    history: list[dict]
    twin: Any = field(repr=False)


class LiveRun:
    """One watched run: the trainer's callback (on_step), the digester thread and the answers to LIVE_ROUTES."""

    def __init__(self, model: Any, data: Any, *, epochs: int, first_epoch: int, batch_size: int,
                 learning_rate: Callable[[], float], softmax: Callable[[np.ndarray], np.ndarray],
                 ask_stop: Callable[[str], None], stopping: Callable[[], bool], config: dict) -> None:
        self.softmax, self.ask_stop, self.stopping, self.learning_rate = softmax, ask_stop, stopping, learning_rate
        self.class_names = [str(name) for name in data.class_names]
        self.epochs, self.first_epoch, self.batch_size = epochs, first_epoch, batch_size
        self.n_train = len(data.x_train)
        self.scored_on = "val" if len(data.x_val) else "test"
        self.x_scored, self.y_scored = (data.x_val, data.y_val) if len(data.x_val) else (data.x_test, data.y_test)
        self.probe_indices = [int(np.flatnonzero(data.y_test == k)[0]) for k in range(data.num_classes)
                              if (data.y_test == k).any()][:PROBES]
        self.x_probes = data.x_test[self.probe_indices]
        self.probe_images = [grey_bytes(image) for image in self.x_probes]
        self.probe_labels = [int(data.y_test[i]) for i in self.probe_indices]
        self.config = config
        self.model = model  # read by the trainer thread only
        self.server: Any = None  # the page's server, its address and its thread: set by watch_training
        self.url, self.thread = "", threading.Thread()
        self.latest = twin_of(model)
        # trainer side (only the trainer thread writes these)
        self.smoothed, self.smoothed_steps, self.last_handed = 0.0, 0, -math.inf
        self.started, self.paused_seconds = time.perf_counter(), 0.0
        self.paused, self.resumed = False, threading.Event()
        # shared: the digester's queue, the events, the digest of the run so far
        self.lock = threading.Condition()
        self.queue: deque[Snapshot] = deque()
        self.events: deque[tuple[int, str, bytes]] = deque(maxlen=KEPT_EVENTS)
        self.last_id, self.streams, self.finished = 0, 0, False
        self.curve: list[list] = []  # [step, smoothed loss, epoch accuracy so far, learning rate] per progress
        self.history: list[dict] = []
        self.progress: dict = {}
        # the last epoch's end: its twin, and its scoring once a page has asked for it (see scored)
        self.epoch_twin: Any = None
        self.epoch_digest: dict = {}
        self.cells: dict[tuple[int, int], np.ndarray] = {}
        self.scored_probabilities: np.ndarray | None = None
        self.scoring = threading.Lock()
        self.done: dict | None = None
        self.digester = threading.Thread(target=self.digest_forever, name="live-digester", daemon=True)
        self.digester.start()

    # --- the trainer's side -----------------------------------------------------------------------------

    def on_step(self, position: Any, result: Any) -> None:
        """train()'s on_step: smooth the loss, hand over a snapshot when it is time, wait while paused."""
        if math.isfinite(position.loss):  # each batch's loss once: train() calls after the last one at the epoch's end
            self.smoothed = LOSS_SMOOTHING * self.smoothed + (1 - LOSS_SMOOTHING) * position.loss
            self.smoothed_steps += 1
        now = time.perf_counter()
        if position.epoch_ended or now - self.last_handed >= SNAPSHOT_SECONDS:
            self.last_handed = now
            self.hand_over(position, result, now)
        if self.paused:
            paused_at = time.perf_counter()
            while self.paused and not self.stopping():
                self.resumed.wait(0.2)
            self.paused_seconds += time.perf_counter() - paused_at

    def hand_over(self, position: Any, result: Any, now: float) -> None:
        """Queue a Snapshot for the digester; a progress snapshot replaces one still waiting."""
        seen = min(position.batch * self.batch_size, self.n_train)
        loss = self.smoothed / (1 - LOSS_SMOOTHING ** self.smoothed_steps) if self.smoothed_steps else None
        snapshot = Snapshot(
            epoch=position.epoch, batch=position.batch, n_batches=position.n_batches, step=result.batches,
            loss=loss, epoch_loss=position.total_loss / seen if seen else None,
            epoch_accuracy=position.correct / seen if seen else None, learning_rate=float(self.learning_rate()),
            images=(position.epoch - self.first_epoch) * self.n_train + seen,
            seconds=now - self.started - self.paused_seconds, epoch_ended=position.epoch_ended,
            history=list(result.history), twin=twin_of(self.model))
        with self.lock:
            if not snapshot.epoch_ended:  # an older progress snapshot not yet digested is not worth digesting
                kept = [s for s in self.queue if s.epoch_ended]
                self.queue.clear()
                self.queue.extend(kept)
            self.queue.append(snapshot)
            self.lock.notify_all()

    # --- the digester: snapshots into events ------------------------------------------------------------

    def digest_forever(self) -> None:
        """Digest snapshots as they come, at low priority (training goes first), until the run is finished."""
        with_low_priority()
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.queue or self.finished)
                if not self.queue:
                    return
                snapshot = self.queue[0]
            try:
                self.digest(snapshot)
            except Exception as error:  # the page misses an update; training never notices
                log.warning("live page: an update failed (%s: %s)", type(error).__name__, error)
                log.debug("traceback", exc_info=True)
            with self.lock:
                if self.queue and self.queue[0] is snapshot:
                    self.queue.popleft()
                self.lock.notify_all()

    def digest(self, snapshot: Snapshot) -> None:
        """One snapshot into one event (`progress`, or `epoch` at an epoch's end), and its twin to the predictor."""
        twin = snapshot.twin
        self.server.predictor.model = twin  # drawings are answered by these weights from now on
        probes = self.softmax(twin.forward(self.x_probes, training=False))
        elapsed = max(snapshot.seconds, 1e-9)
        per_second = snapshot.images / elapsed
        left = (self.epochs * self.n_train - snapshot.images) / per_second if per_second > 0 else None
        progress = {
            "epoch": snapshot.epoch, "epochs": self.first_epoch + self.epochs - 1, "batch": snapshot.batch,
            "n_batches": snapshot.n_batches, "step": snapshot.step, "loss": finite(snapshot.loss),
            "epoch_loss": finite(snapshot.epoch_loss), "epoch_accuracy": finite(snapshot.epoch_accuracy),
            "learning_rate": finite(snapshot.learning_rate, 9), "images_per_second": finite(per_second, 1),
            "seconds": finite(snapshot.seconds, 2), "seconds_left": finite(left, 1),
            "filters": first_filters(twin), "probes": [top3(p) for p in probes],
        }
        payload = dict(progress)
        if snapshot.epoch_ended:
            payload.update({"row": snapshot.history[-1] if snapshot.history else None, "scored_on": self.scored_on})
        with self.lock:
            self.progress = progress
            if snapshot.loss is not None:
                self.curve.append([snapshot.step, progress["loss"], progress["epoch_accuracy"],
                                   progress["learning_rate"]])
            if snapshot.epoch_ended:
                self.history, self.epoch_twin, self.epoch_digest = snapshot.history, twin, {}
        self.publish("epoch" if snapshot.epoch_ended else "progress", payload)

    def scored(self) -> dict:
        """The last epoch's confusion matrix on the scored set, the accuracy of each class and the most confident
        mistakes ({} before the first epoch's end). Computed when a page first asks for it, once per epoch, on the
        asking thread at low priority: a pass over the scored set, which nobody pays for while no page looks."""
        with self.scoring:
            with self.lock:
                twin, digest = self.epoch_twin, self.epoch_digest
                epoch = self.history[-1]["epoch"] if self.history else None
            if twin is None or digest:
                return digest
            with_low_priority()
            digest = self.score(twin, epoch)
            with self.lock:
                if self.epoch_twin is twin:
                    self.epoch_digest = digest
            return digest

    def score(self, twin: Any, epoch: int | None) -> dict:
        """The scoring behind scored(), by the twin taken at an epoch's end (the model that train() scored)."""
        probabilities = np.concatenate([self.softmax(twin.forward(self.x_scored[i:i + EVAL_BATCH], training=False))
                                        for i in range(0, len(self.x_scored), EVAL_BATCH)])
        predicted, truth, k = probabilities.argmax(axis=1), self.y_scored, probabilities.shape[1]
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (truth, predicted), 1)
        per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
        wrong = np.flatnonzero(predicted != truth)
        wrong = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:MISTAKES]
        cells = {}
        order = np.lexsort((np.arange(len(truth)), predicted, truth))
        for t, p in zip(*np.nonzero(confusion)):
            cells[(int(t), int(p))] = order[(truth[order] == t) & (predicted[order] == p)]
        with self.lock:
            self.cells, self.scored_probabilities = cells, probabilities
        digest = {
            "epoch": epoch, "scored_on": self.scored_on, "confusion": confusion.tolist(),
            "per_class_accuracy": [round(float(a), 6) for a in per_class],
            "mistakes": [{"index": int(i), "true": int(truth[i]), "top3": top3(probabilities[i]),
                          "image": grey_bytes(self.x_scored[i])} for i in wrong],
        }
        return digest

    def publish(self, kind: str, payload: dict) -> None:
        """Add an event (the next id) for every stream, and wake them."""
        with self.lock:
            self.last_id += 1
            body = json.dumps({"id": self.last_id, "type": kind, **payload}, separators=(",", ":"), allow_nan=False,
                              default=jsonable)
            self.events.append((self.last_id, kind, body.encode()))
            self.lock.notify_all()

    # --- the end of the run -----------------------------------------------------------------------------

    def finish(self, model: Any, meta: dict, keep_serving: bool) -> None:
        """The run has ended and its files are written: digest what is left, answer drawings with the trained
        model, send the `done` event; then, unless keep_serving, close the server once the streams have it."""
        with self.lock:
            self.lock.wait_for(lambda: not self.queue, timeout=30)
            self.finished = True
            self.lock.notify_all()
        self.server.predictor.model = model
        training = meta.get("training") or {}
        self.server.model_json = json.dumps(self.server_model_document(model, meta), default=jsonable).encode()
        self.done = {"status": training.get("status"), "stopped_at": training.get("stopped_at"),
                     "test_accuracy": finite(training.get("test_accuracy"), 9),
                     "test_loss": finite(training.get("test_loss"), 9),
                     "epochs_completed": training.get("epochs_completed"),
                     "seconds": finite(time.perf_counter() - self.started - self.paused_seconds, 2),
                     "serving": keep_serving}
        self.publish("done", self.done)
        if not keep_serving:
            deadline = time.monotonic() + 2
            with self.lock:
                self.lock.wait_for(lambda: self.streams == 0, timeout=max(deadline - time.monotonic(), 0))
            self.close()

    def server_model_document(self, model: Any, meta: dict) -> dict:
        document = json.loads(self.server.model_json)
        training, data = meta.get("training") or {}, meta.get("data") or {}
        document["info"] = {"dataset": meta.get("dataset"), "source": data.get("source"),
                            "n_train": data.get("n_train"), "test_accuracy": training.get("test_accuracy"),
                            "epochs": training.get("epochs_completed"), "parameters": model.parameter_count()}
        return document

    def serve_until_interrupted(self, announce: Callable[[str], Any] = announce_line) -> None:
        """After training: keep serving the trained model (draw and inspect) until Ctrl-C, then close."""
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # before saying Ctrl-C stops it
        try:
            announce(f"training done: still serving the page at {self.url} (Ctrl-C stops)")
            while self.thread.is_alive() and not self.stopping():  # SIGTERM: main's handler asks for a stop
                self.thread.join(0.25)
        except KeyboardInterrupt:
            announce("stopped serving (Ctrl-C)")
        finally:
            signal.signal(signal.SIGINT, previous)
            self.close()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- the server's side: GET /api/events, /api/run, /api/confusion, /api/probe; POST /api/control --------

    def answer(self, handler: Any, path: str) -> None:
        """Answer one of serve.LIVE_ROUTES on a request thread (serve.Handler.route checked Host, Origin, method)."""
        query = parse_qs(urlsplit(handler.path).query)
        if path == "/api/events":
            self.stream(handler)
        elif path == "/api/run":
            handler.send_json(HTTPStatus.OK, self.run_document())
        elif path == "/api/control":
            handler.send_json(HTTPStatus.OK, self.control(read_action(handler)))
        elif path == "/api/confusion" and not query:
            handler.send_json(HTTPStatus.OK, self.matrix())
        elif path == "/api/confusion":
            handler.send_json(HTTPStatus.OK, self.cell(integer(query, "true"), integer(query, "predicted")))
        else:
            handler.send_json(HTTPStatus.OK, self.probe(integer(query, "index")))

    def run_document(self) -> dict:
        """GET /api/run: everything the page needs to catch up, as of the event `last_event_id`."""
        digest = self.scored()
        with self.lock:
            return {"live": True, "state": self.state(), "last_event_id": self.last_id, "config": self.config,
                    "class_names": self.class_names, "scored_on": self.scored_on, "history": self.history,
                    "input_shape": list(self.x_probes.shape[1:]),
                    "curve": self.curve, "progress": self.progress, "epoch": digest,
                    "probes": [{"index": i, "label": label, "image": image} for i, label, image
                               in zip(self.probe_indices, self.probe_labels, self.probe_images)],
                    "done": self.done}

    def state(self) -> str:
        return "done" if self.done is not None else "paused" if self.paused else "training"

    def control(self, action: str) -> dict:
        """POST /api/control: pause, resume or stop (the work so far kept, as with Ctrl-C)."""
        if self.done is not None:
            raise RequestError("the run has ended: there is nothing to pause, resume or stop", HTTPStatus.CONFLICT)
        if action == "pause":
            self.paused = True
            self.resumed.clear()
        elif action == "resume" or action == "stop":
            self.paused = False
            self.resumed.set()
            if action == "stop":
                self.ask_stop("stop pressed on the page")
        log.info("live page: %s", action)
        with self.lock:
            progress = dict(self.progress)
        self.publish("progress", {**progress, "paused": self.paused, "stopping": action == "stop"})
        return {"state": "stopping" if action == "stop" else self.state()}

    def matrix(self) -> dict:
        """GET /api/confusion: the last epoch's scoring (see scored)."""
        digest = self.scored()
        if not digest:
            raise RequestError("no epoch has ended yet: the confusion matrix comes at the end of the first",
                               HTTPStatus.NOT_FOUND)
        return digest

    def cell(self, true: int, predicted: int) -> dict:
        """GET /api/confusion?true=T&predicted=P: the scored images of that cell at the last epoch's end."""
        k = len(self.class_names)
        if not (0 <= true < k and 0 <= predicted < k):
            raise RequestError(f"true and predicted are class indices from 0 to {k - 1}")
        self.matrix()
        with self.lock:
            indices, probabilities = self.cells.get((true, predicted)), self.scored_probabilities
        indices = np.zeros(0, dtype=np.int64) if indices is None else indices
        shape = list(self.x_scored.shape[1:3])
        return {"true": true, "predicted": predicted, "count": len(indices), "shape": shape,
                "images": [{"index": int(i), "top3": top3(probabilities[i]), "image": grey_bytes(self.x_scored[i])}
                           for i in indices[:CELL_IMAGES]]}

    def probe(self, index: int) -> dict:
        """GET /api/probe?index=I: probe image I through every layer of the latest snapshot, as /api/predict."""
        if not 0 <= index < len(self.probe_indices):
            raise RequestError(f"index is a probe from 0 to {len(self.probe_indices) - 1}")
        answer = self.server.predictor.answer(self.x_probes[index])
        return {**answer, "label": self.probe_labels[index], "test_index": self.probe_indices[index]}

    def stream(self, handler: Any) -> None:
        """GET /api/events: the events after Last-Event-ID (or from now on), a ping every PING_SECONDS; the
        stream ends after `done`. At most MAX_STREAMS at once (503 beyond)."""
        with self.lock:
            if self.streams >= MAX_STREAMS:
                raise RequestError(f"{MAX_STREAMS} event streams are open already: close a page and retry",
                                   HTTPStatus.SERVICE_UNAVAILABLE)
            self.streams += 1
            last = self.last_id
        try:
            header = handler.headers.get("Last-Event-ID")
            if header is not None and header.strip().isdigit():
                last = int(header.strip())
            elif self.done is not None:  # a page opened after the end gets the end
                last = self.last_id - 1
            handler.close_connection = True
            handler.send_response(HTTPStatus.OK)
            handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
            for name, value in COMMON_HEADERS.items():
                handler.send_header(name, value)
            handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(b"retry: 1000\n\n")
            while True:
                with self.lock:
                    self.lock.wait_for(lambda: self.last_id > last, timeout=PING_SECONDS)
                    fresh = [event for event in self.events if event[0] > last]
                if not fresh:
                    handler.wfile.write(b": ping\n\n")
                for event_id, kind, body in fresh:
                    handler.wfile.write(b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, kind.encode(), body))
                    last = event_id
                    if kind == "done":
                        return
        except (OSError, ValueError):
            return  # the client went away, or stalled past the socket's timeout: only this stream ends
        finally:
            with self.lock:
                self.streams -= 1
                self.lock.notify_all()


def first_filters(model: Any) -> dict | None:
    """The first convolution's weights W (k, k, C, F) for the page, as (F, k, k, C) packed (see pack)."""
    for layer in model.layers:
        weights = layer.params.get("W")
        if weights is not None and weights.ndim == 4:
            return pack(weights.transpose(3, 0, 1, 2))
    return None


def integer(query: dict, name: str) -> int:
    values = query.get(name)
    if not values or not values[0].strip().lstrip("-").isdigit():
        raise RequestError(f"give {name}= as a whole number")
    return int(values[0])


def read_action(handler: Any) -> str:
    """The "action" of a POST /api/control body {"action": "pause" | "resume" | "stop"}."""
    content_type = handler.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise RequestError(f"send application/json, not {content_type or 'no Content-Type'}",
                           HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
    length = handler.headers.get("Content-Length", "")
    if not length.isdigit() or int(length) > MAX_CONTROL_BYTES:
        handler.close_connection = True
        raise RequestError(f"send a Content-Length of at most {MAX_CONTROL_BYTES} bytes")
    try:
        document = json.loads(handler.rfile.read(int(length)))
    except (ValueError, RecursionError):
        raise RequestError("the request body is not valid JSON") from None
    action = document.get("action") if isinstance(document, dict) else None
    if action not in ("pause", "resume", "stop"):
        raise RequestError('send {"action": "pause"}, {"action": "resume"} or {"action": "stop"}')
    return action


def with_low_priority() -> None:
    """Lower the calling thread's priority where the system allows it (Linux: a thread has its own nice value)."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def watch_training(model: Any, data: Any, cfg: dict, optimizer: Any, stop: Any,
                   softmax: Callable[[np.ndarray], np.ndarray], *, host: str | None, port: int | None,
                   first_epoch: int = 1, announce: Callable[[str], Any] = announce_line
                   ) -> LiveRun:
    """--serve while training: bind the page's server, start serving it on a thread, announce its address, and
    return the LiveRun whose on_step the trainer calls. stop: main's plumbing.StopRequest (the page's Stop asks
    it, as Ctrl-C does; a pause ends when a stop is asked). Raises CNNError when the address cannot be bound."""
    training = cfg["training"]
    run = LiveRun(model, data, epochs=training["epochs"], first_epoch=first_epoch, batch_size=training["batch_size"],
                  learning_rate=lambda: optimizer.learning_rate, softmax=softmax, ask_stop=stop.ask,
                  stopping=lambda: stop.signum is not None,
                  config={"dataset": data.name, "source": data.source, "n_train": len(data.x_train),
                          "scored_on": "val" if len(data.x_val) else "test", "model": cfg["model"],
                          "training": training,
                          "seed": cfg["data"]["random_seed"], "parameters": model.parameter_count()})
    fill = ink_fill(data.name)
    host = host or "127.0.0.1"
    info = {"dataset": data.name, "source": data.source, "n_train": len(data.x_train), "training": "in progress",
            "parameters": model.parameter_count()}
    server = make_server(run.latest, prepare=lambda image: prepare_image(image, model.input_shape, fill),
                         softmax=softmax, class_names=data.class_names, info=info, host=host,
                         port=8000 if port is None else port)
    server.live, run.server = run, server
    everywhere = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}
    shown = everywhere.get(host, f"[{host}]" if ":" in host else host)
    run.url = f"http://{shown}:{server.port}/"
    run.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25}, name="live-server",
                                  daemon=True)
    run.thread.start()
    announce(f"serving the page at {run.url} (open it to watch training; Ctrl-C stops)")
    if not is_loopback(host):
        announce(f"WARNING: listening on {host or 'every address'}: anyone who can reach this machine on port "
                 f"{server.port} can use the page; --host 127.0.0.1 keeps it to this machine")
    return run
