"""Plumbing around a run: console and file logging, Ctrl-C and SIGTERM, output paths, atomic writes.

None of it is about neural networks: main.py's command line calls it, and plots.py shares write_atomic.
A leaf module: it never imports main.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import logging
import math
import os
import platform
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from errors import CNNError, ConfigError, OutputError

log = logging.getLogger("numpy_cnn")


def write_atomic(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write to a temporary file beside `path`, then rename it into place: a crash or Ctrl-C midway
    leaves the old file (or none) rather than half a file.

    A symlink is followed: its target is replaced and the link kept. An existing character device or FIFO
    (/dev/null, /dev/stdout, a named pipe) is written through, never replaced; any other special file (a socket,
    a block device) is refused with an OSError. A write that fails (/dev/full: no space left) raises OSError."""
    path = Path(os.path.realpath(path)) if Path(path).is_symlink() else Path(path)
    kind = special_file_kind(path)
    if kind in ("character device", "FIFO"):
        with open_special(path, kind) as f:  # closing it flushes it: a write error is raised here
            if binary:
                write(f)
            else:
                text = io.TextIOWrapper(f, encoding="utf-8")
                write(text)
                text.flush()
                text.detach()  # else the wrapper, once dropped, would close f and swallow the error
        return
    if kind is not None:
        raise OSError(errno.EINVAL, f"is a {kind}, not a file")
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


def special_file_kind(path: Path) -> str | None:
    """What an existing non-regular file is ("character device", "FIFO", "socket", "block device"), else None
    (a regular file, a folder, or nothing there)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kinds = {stat.S_ISCHR: "character device", stat.S_ISFIFO: "FIFO", stat.S_ISSOCK: "socket",
             stat.S_ISBLK: "block device"}
    return next((kind for test, kind in kinds.items() if test(mode)), None)


def open_special(path: Path, kind: str) -> Any:
    """A character device or FIFO opened for writing. A FIFO is opened without waiting: with no program reading
    it, opening it would wait forever, so that is an OSError instead."""
    flags = os.O_WRONLY | (os.O_NONBLOCK if kind == "FIFO" else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as error:
        if error.errno == errno.ENXIO:
            raise OSError(errno.ENXIO, "a FIFO that no program is reading") from None
        raise
    if kind == "FIFO":
        os.set_blocking(descriptor, True)
    return os.fdopen(descriptor, "wb")


class GuardedStdout(io.TextIOBase):
    """Standard output that a failing console cannot take down with the run: the first error writing it (a full
    disk, `> /dev/full`; a reader that went away, `| head`) is kept, and what follows is dropped, so that training
    goes on and every file is still written. Used as a context manager that puts itself in place of sys.stdout;
    exit_code() then says how the program ends."""

    def __init__(self) -> None:
        super().__init__()
        self.stream: Any = None
        self.error: OSError | None = None

    def __enter__(self) -> GuardedStdout:
        self.stream, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.flush()
        sys.stdout = self.stream

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                self.stream.write(text)
            except OSError as error:
                self.failed(error)
        return len(text)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.stream.flush()
            except OSError as error:
                self.failed(error)

    def failed(self, error: OSError) -> None:
        """Keep the error; point the real stdout at /dev/null, so that nothing is left to fail at exit."""
        self.error = error
        with contextlib.suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def isatty(self) -> bool:
        return self.error is None and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")

    def exit_code(self, code: int, broken_pipe: int, output_failed: int) -> int:
        """The program's exit code once every file is written: `code` if stdout never failed; `broken_pipe` if
        its reader went away; else one line on stderr and `output_failed` (unless `code` already says a failure)."""
        if self.error is None:
            return code
        if isinstance(self.error, BrokenPipeError):
            return broken_pipe
        with contextlib.suppress(OSError):
            print(f"error: cannot write to standard output ({self.error.strerror or self.error}); every file asked "
                  "for was written", file=sys.stderr, flush=True)
        return code or output_failed


def guarding_stdout(broken_pipe: int, output_failed: int) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """A decorator for a command's main function: it runs with GuardedStdout in place of sys.stdout, and its exit
    code becomes `broken_pipe` or `output_failed` when stdout failed (GuardedStdout.exit_code)."""
    def decorate(run: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(run)
        def guarded(*args: Any, **kwargs: Any) -> int:
            with GuardedStdout() as stdout:
                return stdout.exit_code(run(*args, **kwargs), broken_pipe, output_failed)
        return guarded
    return decorate


class ProgressBar:
    """A one-line progress bar inside an epoch, redrawn at most 10 times a second; silent when the output
    is not a terminal (a log file or a pipe should not fill up with carriage returns)."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = self.stream.isatty()
        self.total, self.label, self.last_draw = total, label, 0.0

    def update(self, done: int, loss: float | None = None) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < 0.1 and done < self.total):
            return
        self.last_draw = now
        filled = 30 * done // self.total
        self.stream.write(f"\r{self.label} [{'=' * filled}{' ' * (30 - filled)}] {done}/{self.total}"
                          + ("" if loss is None else f" loss {loss:.4f}"))
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


class ConsoleHandler(logging.StreamHandler):
    """A console stream whose reader went away (`| head`) ends the program quietly: the BrokenPipeError goes
    up to main, which exits as a Unix tool does, instead of logging's "--- Logging error ---" report."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        if isinstance(error, BrokenPipeError):
            raise error
        super().handleError(record)


class LogFileHandler(logging.FileHandler):
    """The log file. When it cannot be written (a full disk), it says so once on stderr and stops trying:
    a log must not take the run, or its results, down with it."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        error = sys.exc_info()[1]
        log.removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()
        reason = getattr(error, "strerror", None) or error
        with contextlib.suppress(OSError):
            print(f"warning: cannot write the log file {self.baseFilename} ({reason}); logging to the console only",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last flush on a full disk: the file keeps what it had
            self.stream = None


def setup_logging(logging_cfg: dict) -> None:
    """Information on stdout at the configured level; warnings and errors on stderr (diagnostics, which a
    pipe of the results should not carry); and, if logging.file is set, a file with timestamps."""
    close_logging()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    console = ConsoleHandler(sys.stdout)
    console.setLevel(logging_cfg["level"])
    console.addFilter(lambda record: record.levelno < logging.WARNING)
    diagnostics = ConsoleHandler(sys.stderr)
    diagnostics.setLevel(max(logging.WARNING, logging.getLevelName(logging_cfg["level"])))
    for handler in (console, diagnostics):
        handler.setFormatter(ConsoleFormatter("%(message)s"))
        log.addHandler(handler)
    if logging_cfg["file"]:
        path = Path(logging_cfg["file"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = LogFileHandler(path, encoding="utf-8")
        except OSError as error:
            raise CNNError(f"logging.file: cannot write the log file {path} ({error.strerror or error})") from None
        handler.setLevel(logging_cfg["level"])
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def close_logging() -> None:
    for handler in list(log.handlers):
        with contextlib.suppress(OSError):
            handler.close()
        log.removeHandler(handler)


def result_line(message: str) -> None:
    """The line that says what a run achieved: on stdout whatever the log level (a diagnostic it is not), and
    in the log file."""
    print(message, flush=True)
    log_to_file(logging.INFO, message)


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
    kind = None if folder else special_file_kind(target)
    if kind in ("character device", "FIFO"):  # written through, not replaced (write_atomic)
        return
    if kind is not None:
        raise CNNError(f"{what} {target}: is a {kind}, not a file; give a file name")
    if target.is_symlink():  # write_atomic replaces the link's target
        target = Path(os.path.realpath(target))
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
        if folder:
            with tempfile.TemporaryFile(dir=target):
                pass
        else:  # the very name write_atomic will create: the file's name and 14 more characters
            descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(descriptor)
            os.unlink(temporary)
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
    first signal only asks the run to stop after the current batch (or, once training is over, after the file
    being written), so that the results and the model are still written; a second signal stops at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.graceful = False
        self.after = "this batch"  # what the run finishes before it stops; main sets it as the run goes on
        self.previous: dict = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.graceful or self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        log.warning("%s received: stopping after %s and keeping what was done (again to stop at once)",
                    signal.Signals(signum).name, self.after)

    def ask(self, why: str) -> None:
        """Stop after this batch, as a first Ctrl-C does (from another thread too); nothing when already asked."""
        if self.signum is None:
            self.signum = signal.SIGINT
            log.warning("%s: stopping after %s and keeping what was done", why, self.after)

    def __enter__(self) -> StopRequest:
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def in_order(callbacks: list[Callable[..., Any]]) -> Callable[..., None] | None:
    """One callback that calls each of `callbacks` in turn with the same arguments; None when there are none."""
    if not callbacks:
        return None

    def each(*arguments: Any) -> None:
        for callback in callbacks:
            callback(*arguments)
    return each


def versions() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}


def write_json(path: str | Path, payload: dict, what: str = "--output") -> None:
    """`payload` as indented JSON, through write_atomic; OutputError (one line, exit code 4, the OSError as its
    cause) when the file cannot be written."""
    try:
        write_atomic(Path(path), lambda f: json.dump(payload, f, indent=2, default=str), binary=False)
    except OSError as error:
        raise OutputError(f"{what} {path}: cannot write it ({error.strerror or error})") from error


def check_distinct_files(files: dict[str, str | None]) -> None:
    """Refuse, before any work, two roles (config, results, model, log, a picture, ...) given the same file: one
    would overwrite the other. files: {role: path or None}."""
    seen: dict[str, str] = {}
    for role, path in files.items():
        if not path:
            continue
        resolved = os.path.realpath(os.path.expanduser(path))
        if resolved in seen:
            raise CNNError(f"{role} and {seen[resolved]} are the same file ({path}): one would overwrite the other; "
                           "give each its own name")
        seen[resolved] = role


def machine_memory() -> int | None:
    """Bytes of memory this process could use: the machine's available memory (Linux), else its total."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(model: Any, batch_size: int) -> None:
    """CNNError when training the model at this batch size would need more memory than the machine has: its
    weights (16 bytes each: weight, gradient, Adam's two moments) and one batch's activations (each layer's
    output, kept for backward, and its gradient; a conv layer's zero-padded input, its im2col columns and their
    gradients too)."""
    memory = machine_memory()
    if memory is None or model.input_shape is None:
        return
    weights = sum(param.size for layer in model.layers for param in layer.params.values())
    values, shape = 0, tuple(model.input_shape)
    for layer in model.layers:
        out = layer.output_shape(shape)
        values += 2 * math.prod(out)
        if hasattr(layer, "kernel_size"):  # the zero-padded input, and im2col: every output pixel's k x k x C window
            padding = getattr(layer, "padding", 0)
            values += 2 * (shape[0] + 2 * padding) * (shape[1] + 2 * padding) * shape[2]
            values += 2 * math.prod(out[:2]) * layer.kernel_size ** 2 * shape[2]
        shape = out
    needed = 16 * weights + 4 * batch_size * values
    if needed > memory:
        raise CNNError(f"model: training needs about {needed / 2**30:,.1f} GiB ({weights:,} weights, and the "
                       f"activations of a batch of {batch_size}), but this machine has {memory / 2**30:.1f} GiB of "
                       "memory available: use fewer filters or units, less padding, or a smaller training.batch_size")


MAX_ENV_FILE_BYTES = 1_000_000  # a .env holds a few variables


def load_env_file() -> None:
    """What dotenv's load_dotenv(find_dotenv(usecwd=True)) does (set the variables of the nearest .env, from the
    current folder up, never overriding one already set), but a .env that cannot be read, is not UTF-8 text or
    is absurdly large raises CNNError naming it. A UTF-8 byte-order mark (Windows editors write one) is ignored."""
    import io

    from dotenv import find_dotenv, load_dotenv

    try:
        found = find_dotenv(usecwd=True)
    except OSError:  # the current folder was deleted: there is no .env to look for
        return
    if not found:
        return
    try:
        with open(found, "rb") as f:
            data = f.read(MAX_ENV_FILE_BYTES + 1)
    except OSError as error:
        raise CNNError(f"{found}: cannot read the .env file ({error.strerror or error})") from None
    if len(data) > MAX_ENV_FILE_BYTES:
        raise CNNError(f"{found}: larger than {MAX_ENV_FILE_BYTES:,} bytes; a .env file holds a few VARIABLE=value "
                       "lines")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise CNNError(f"{found}: line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}); save the .env file "
                       "as UTF-8") from None
    load_dotenv(stream=io.StringIO(text))


def check_weights_fit(weights: int, where: str) -> None:
    """CNNError, before anything is allocated, for a layer whose weights could not fit in memory: in training
    each weight takes 16 bytes (float32 weight, gradient and Adam's two moments)."""
    memory = machine_memory()
    if memory is not None and 16 * weights > memory:
        raise ConfigError(f"{where}: {weights:,} weights need about {16 * weights / 2**30:,.1f} GiB in training, "
                          f"but this machine has {memory / 2**30:.1f} GiB of memory available; use fewer filters or "
                          "units")


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
