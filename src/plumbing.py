"""Plumbing around a run: console and file logging, Ctrl-C and SIGTERM, output paths, atomic writes.

None of it is about neural networks: main.py's command line calls it, and plots.py shares write_atomic.
A leaf module: it never imports main.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from errors import CNNError

log = logging.getLogger("numpy_cnn")


def write_atomic(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write to a temporary file beside `path`, then rename it into place: a crash or Ctrl-C midway
    leaves the old file (or none) rather than half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ProgressBar:
    """A one-line progress bar inside an epoch, redrawn at most 10 times a second; silent when the output
    is not a terminal (a log file or a pipe should not fill up with carriage returns)."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = self.stream.isatty()
        self.total, self.label, self.last_draw = total, label, 0.0

    def update(self, done: int, loss: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < 0.1 and done < self.total):
            return
        self.last_draw = now
        filled = 30 * done // self.total
        self.stream.write(f"\r{self.label} [{'=' * filled}{' ' * (30 - filled)}] {done}/{self.total} loss {loss:.4f}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


def setup_logging(logging_cfg: dict) -> None:
    """Console (stdout at the configured level; errors on stderr) and, if logging.file is set, a file with
    timestamps."""
    close_logging()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging_cfg["level"])
    console.addFilter(lambda record: record.levelno < logging.ERROR)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    for handler in (console, errors):
        handler.setFormatter(ConsoleFormatter("%(message)s"))
        log.addHandler(handler)
    if logging_cfg["file"]:
        path = Path(logging_cfg["file"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as error:
            raise CNNError(f"logging.file: cannot write the log file {path} ({error.strerror or error})") from None
        handler.setLevel(logging_cfg["level"])
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def close_logging() -> None:
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


def log_to_file(level: int, message: str, with_traceback: bool = False) -> None:
    """Record something in the log file only (errors already go to stderr; tracebacks never to the console)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, sys.exc_info() if with_traceback else None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def check_writable(path: str | None, what: str, folder: bool = False) -> None:
    """Fail now, before any training, if `path` could not be written later. Leaves nothing behind: folders
    it has to create for the test are removed again (they are made for real when the file is written)."""
    if not path:
        return
    target = Path(path)
    if not folder and target.is_dir():
        raise CNNError(f"{what} {target}: is a folder, expected a file name")
    if folder and target.exists() and not target.is_dir():
        raise CNNError(f"{what} {target}: is a file, expected a folder")
    directory = target if folder else target.parent
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    if not directory.is_dir():
        raise CNNError(f"{what} {target}: {directory} is a file, not a folder")
    try:
        for new_folder in reversed(missing):
            new_folder.mkdir()
        with tempfile.TemporaryFile(dir=target if folder else target.parent):
            pass
    except OSError as error:
        raise CNNError(f"{what} {target}: cannot write there ({error.strerror or error})") from None
    finally:
        for new_folder in missing:
            if new_folder.is_dir():
                new_folder.rmdir()


class Interrupted(BaseException):
    """A signal that must stop the program now (a BaseException, like KeyboardInterrupt, so that no
    `except Exception` swallows it); `signum` gives the exit code."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM handler for the whole run.

    Before training, a signal stops the program at once. Once `graceful` is set (training has started), the
    first signal only asks training to stop after the current batch, so that the results and the model are
    still written; a second signal stops at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.graceful = False
        self.previous: dict = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.graceful or self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        log.warning("%s received: stopping after this batch and keeping what was done (again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def versions() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}


def write_json(path: str | Path, payload: dict) -> None:
    write_atomic(Path(path), lambda f: json.dump(payload, f, indent=2, default=str), binary=False)


