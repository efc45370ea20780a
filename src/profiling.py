"""--profile: seconds per layer and direction, and the optimiser step, over the training batches.

instrument() gives every layer (and the optimiser) a timed subclass of its own class, so that the layers'
code and main.Sequential stay free of timers; profile_table() prints what was collected. Called by main's
command line. A leaf module: it never imports main.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class Timings:
    """Seconds per (part, direction), added up from any number of threads."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()

    def add(self, part: str, direction: str, seconds: float) -> None:
        with self.lock:
            self.seconds[part, direction] = self.seconds.get((part, direction), 0.0) + seconds


def _timed_class(cls: type, name: str, timings: Timings) -> type:
    """A subclass of a layer's class whose forward and backward add their seconds to timings under `name`
    ("forward" for training passes, "inference" for evaluation, so that the profile leaves evaluation out).
    It keeps the class's name, so that summaries and model files see the same layer."""

    def forward(self: Any, x: Any, training: bool = True) -> Any:
        start = time.perf_counter()
        try:
            return cls.forward(self, x, training)
        finally:
            timings.add(name, "forward" if training else "inference", time.perf_counter() - start)

    def backward(self: Any, grad_out: Any) -> Any:
        start = time.perf_counter()
        try:
            return cls.backward(self, grad_out)
        finally:
            timings.add(name, "backward", time.perf_counter() - start)

    return type(cls.__name__, (cls,), {"forward": forward, "backward": backward, "__module__": cls.__module__})


def _timed_optimizer_class(cls: type, timings: Timings) -> type:
    def step(self: Any, model: Any) -> None:
        start = time.perf_counter()
        try:
            cls.step(self, model)
        finally:
            timings.add("optimizer", "step", time.perf_counter() - start)

    return type(cls.__name__, (cls,), {"step": step, "__module__": cls.__module__})


def instrument(model: Any, optimizer: Any) -> Timings:
    """Time every layer of the model, and the optimiser's step, from now on. Worker-thread replicas made
    afterwards (parallel.replicate copies each layer) are timed too, into the same Timings."""
    timings = Timings()
    for name, layer in zip(model.names, model.layers):
        layer.__class__ = _timed_class(type(layer), name, timings)
    optimizer.__class__ = _timed_optimizer_class(type(optimizer), timings)
    return timings


def profile_table(timings: Timings, names: list[str], n_batches: int, workers: int = 1) -> str:
    """Seconds per layer and direction, as a table with each row's share. With several worker threads, which
    run side by side, a layer's seconds are the mean over the threads, so that the total is wall time."""
    seconds = timings.seconds
    rows = [(name, seconds.get((name, "forward"), 0.0) / workers, seconds.get((name, "backward"), 0.0) / workers)
            for name in names]
    # The optimiser step is no backward pass, but it runs after it: its seconds go in that column, so that the
    # columns add up to the time of the training batches.
    rows.append(("optimizer step", 0.0, seconds.get(("optimizer", "step"), 0.0)))
    total = sum(forward + backward for _, forward, backward in rows) or 1.0
    side_by_side = f"; layers: mean of {workers} worker threads, which run side by side" if workers > 1 else ""
    lines = [f"time per layer over {n_batches} training batches (evaluation not included{side_by_side}):",
             f"{'layer':<18}{'forward s':>11}{'backward s':>12}{'ms/batch':>10}{'share':>8}", "-" * 59]
    for name, forward, backward in rows:
        per_batch = 1000 * (forward + backward) / max(n_batches, 1)
        share = 100 * (forward + backward) / total
        lines.append(f"{name:<18}{forward:>11.3f}{backward:>12.3f}{per_batch:>10.2f}{share:>7.1f}%")
    lines += ["-" * 59, f"{'total':<18}{sum(r[1] for r in rows):>11.3f}{sum(r[2] for r in rows):>12.3f}"
              f"{1000 * total / max(n_batches, 1):>10.2f}{100.0:>7.1f}%"]
    return "\n".join(lines)
