"""Outputs and signals: atomic writes, symlinks, devices, FIFOs and full disks, stdout that goes away, Ctrl-C and
SIGTERM keep what was done and exit with the documented code."""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import (
    MAIN,
    assert_one_error_line,
    cli,
    environment_without_seed,
    run_cli,
    small_config,
    small_config_file,
    write_config,
)

import main
import modelfile
import plumbing


def character_device(folder: Path, name: str, minor: int) -> Path:
    """A private copy of /dev/null (minor 3) or /dev/full (minor 7): the program may replace it by mistake
    without harming the machine's own. Needs root (mknod); skips otherwise."""
    path = folder / name
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except (PermissionError, AttributeError):
        pytest.skip("creating a character device needs root")
    return path


# ---- outputs and special files --------------------------------------------------------------------------------------


def test_an_output_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "target.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("target.json")
    proc = run_cli(["--config", str(small_config_file(tmp_path)), "--output", "link.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "link.json").is_symlink() and os.readlink(tmp_path / "link.json") == "target.json"
    assert json.loads((tmp_path / "target.json").read_text())["status"] == "completed"


def test_a_character_device_is_written_through_not_replaced(tmp_path: Path) -> None:
    null = character_device(tmp_path, "null", 3)
    proc = run_cli(["--config", str(small_config_file(tmp_path)), "--output", str(null), "--save-model", str(null)
                    .replace("null", "m.npz")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(null.stat().st_mode), "the device was replaced by a regular file"


def test_a_full_device_is_exit_4_with_one_line_and_the_other_files_are_written(tmp_path: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    proc = run_cli(["--config", str(small_config_file(tmp_path)), "--output", str(full), "--save-model", "m.npz"],
                   cwd=tmp_path)
    assert proc.returncode == main.EXIT_OUTPUT == 4, proc.stderr
    assert proc.stderr == f"ERROR: could not write the results {full} (No space left on device)\n"
    assert stat.S_ISCHR(full.stat().st_mode) and (tmp_path / "m.npz").is_file()


def test_a_fifo_is_written_through_to_its_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = run_cli(["--config", str(small_config_file(tmp_path)), "--output", "fifo"], cwd=tmp_path)
    reader.join(30)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert json.loads(received[0])["status"] == "completed"


def test_a_fifo_nobody_reads_is_exit_4_at_once_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    proc = run_cli(["--config", str(small_config_file(tmp_path)), "--output", "fifo"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == "ERROR: could not write the results fifo (a FIFO that no program is reading)\n"


def test_a_socket_is_refused_before_training(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    try:
        proc = run_cli(["--config", str(small_config_file(tmp_path)), "--output", "sock"], cwd=tmp_path)
    finally:
        listener.close()
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--output sock: is a socket, not a file")
    assert "epoch" not in proc.stdout


# ---- a stdout that cannot be written --------------------------------------------------------------------------------


def run_into(stdout_path: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    with open(stdout_path, "wb") as stdout:
        return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=120)


STDOUT_FULL = "error: cannot write to standard output (No space left on device); every file asked for was written\n"


def test_a_full_stdout_still_writes_the_model_and_results_then_exits_4(tmp_path: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    proc = run_into(full, ["--config", str(small_config_file(tmp_path)), "--save-model", "m.npz", "--output", "r.json"],
                    tmp_path)
    assert proc.returncode == 4
    assert proc.stderr == STDOUT_FULL
    assert (tmp_path / "m.npz").is_file() and json.loads((tmp_path / "r.json").read_text())["status"] == "completed"


def test_a_full_stdout_under_predict_and_gradcheck(tmp_path: Path, model_file: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    np.save(tmp_path / "digit.npy", np.eye(8))
    proc = run_into(full, ["--load-model", str(model_file), "--predict", "digit.npy", "--output", "p.json"], tmp_path)
    assert (proc.returncode, proc.stderr) == (4, STDOUT_FULL)
    assert json.loads((tmp_path / "p.json").read_text())["status"] == "predicted"
    proc = run_into(full, ["--config", str(small_config_file(tmp_path)), "--gradcheck", "--output", "g.json"], tmp_path)
    assert (proc.returncode, proc.stderr) == (4, STDOUT_FULL)
    assert json.loads((tmp_path / "g.json").read_text())["status"] == "passed"


def test_a_full_stdout_under_serve_serves_and_ends_with_exit_4(tmp_path: Path, model_file: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(full, "wb") as stdout:
        process = subprocess.Popen([sys.executable, str(MAIN), "--load-model", str(model_file), "--serve", "--port",
                                    str(port)], cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        import urllib.request

        deadline, page = time.monotonic() + 60, None
        while page is None and time.monotonic() < deadline:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/model", timeout=5).read()
            except OSError:
                time.sleep(0.2)
        assert page is not None and json.loads(page)["parameters"] > 0
    finally:
        process.send_signal(2)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 4 and stderr == STDOUT_FULL, stderr


def test_a_closed_pipe_is_still_141_but_after_the_files_are_written(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, str(MAIN), "--config", str(small_config_file(tmp_path, training={
        "epochs": 3})), "--save-model", "m.npz", "--output", "r.json"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert first.startswith("numpy-cnn: config from")
    assert process.returncode == 141 and stderr == "", stderr
    assert (tmp_path / "m.npz").is_file()
    assert json.loads((tmp_path / "r.json").read_text())["epochs_completed"] == 3


# ---- a second Ctrl-C ------------------------------------------------------------------------------------------------


# A training run whose first batch takes seconds (4,096 images through three 2048-unit layers: about 250 GFLOP),
# on synthetic digits, which need neither scikit-learn nor a download.
SLOW_BATCH_CONFIG = {
    "logging": {"level": "INFO", "file": "logs/app.log"},
    "data": {"dataset": "synthetic", "n_train": 4096, "n_test": 16, "random_seed": 1},
    "model": {"layers": ["flatten", {"dense": {"units": 2048}}, "relu", {"dense": {"units": 2048}}, "relu",
                         {"dense": {"units": 2048}}, "relu", {"dense": {"units": 10}}]},
    "training": {"epochs": 3, "batch_size": 4096, "optimizer": "sgd", "learning_rate": 0.01, "workers": 1},
}


def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    """The first Ctrl-C asks training to stop after the current batch; a second one, half a second later, stops
    the program at once: exit 130 within a few seconds, in the middle of the first batch (no epoch finished),
    and nothing more written (no results, no model), where stopping after the batch would write both."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(SLOW_BATCH_CONFIG))
    env = {key: value for key, value in os.environ.items() if key != "RANDOM_SEED"}
    process = subprocess.Popen([sys.executable, str(MAIN), "--config", "cfg.yaml", "--output", "results.json",
                                "--save-model", "model.npz"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    output: list[str] = []

    def read(stream: Any) -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, args=(process.stdout,), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("training:") for line in output):  # logged just before the first batch
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            assert line is not None, "the run ended before training:\n" + "".join(output) + process.stderr.read()
            output.append(line)
        time.sleep(0.3)  # well inside the first batch
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert process.poll() is None, "the first Ctrl-C alone ended the run: the batch was too short to test"
        process.send_signal(signal.SIGINT)
        second = time.monotonic()
        process.wait(timeout=30)
        seconds = time.monotonic() - second
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    while not lines.empty():
        output.append(lines.get_nowait() or "")
    stdout, stderr = "".join(output), process.stderr.read()
    process.stderr.close()
    assert process.returncode == main.EXIT_BY_SIGNAL[signal.SIGINT] == 130, stdout + stderr
    assert "SIGINT received" in stdout + stderr, "the first Ctrl-C must have asked for a stop after the batch"
    assert seconds < 5, f"the second Ctrl-C took {seconds:.1f} s to stop the run"
    assert "epoch 1/" not in stdout, "an epoch finished after the second Ctrl-C"
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "model.npz").exists()
    assert "interrupted (SIGINT)" in stderr and "Traceback" not in stdout + stderr


DIGITS = ["--dataset", "digits", "--n-train", "300", "--n-test", "60"]
SMALL_NET = {"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "relu", {"maxpool2d": {"pool_size": 2}}, "flatten",
                        {"dense": {"units": 10}}]}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(MAIN), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ---- a closed stdout ------------------------------------------------------------------------------------------------


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path: Path) -> None:
    """`... | grep -m1 epoch`: the program finishes its work (every file is still written), then ends with exit
    code 141 and nothing on stderr."""
    process = start([*DIGITS, "--epochs", "5"], tmp_path)
    first = process.stdout.readline()
    process.stdout.close()  # the reader has what it wanted
    _, stderr = process.communicate(timeout=60)
    assert first.startswith("numpy-cnn: config from")
    assert process.returncode == main.EXIT_BROKEN_PIPE == 141
    assert stderr == "", stderr


# ---- a full disk ----------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full (a device whose writes fail: disk full)")
def test_a_log_file_on_a_full_disk_is_reported_once_and_the_run_goes_on(tmp_path: Path) -> None:
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 300, "n_test": 60}, model=SMALL_NET,
                          training={"epochs": 2})
    text = config.read_text().replace(str(tmp_path / "logs" / "app.log"), "/dev/full")
    config.write_text(text)
    proc = run_cli(["--config", str(config), "--output", "r.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("cannot write the log file /dev/full (No space left on device)") == 1, proc.stderr
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "completed"
    assert "test accuracy" in proc.stdout


def test_a_model_file_on_a_full_disk_is_named_and_the_results_are_still_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(modelfile.np, "savez", disk_full)
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 300, "n_test": 60}, model=SMALL_NET,
                          training={"epochs": 1})
    code = main.main(["--config", str(config), "--save-model", "m.npz", "--output", "r.json",
                      "--checkpoint-dir", "none"])  # np.savez fails for checkpoints too
    stderr = capsys.readouterr().err
    assert code == main.EXIT_OUTPUT == 4
    assert stderr == "ERROR: could not write the model m.npz (No space left on device)\n", stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["problems"] == ["the model m.npz: No space left on device"] and "model" not in results["files"]
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".m.npz*"))


# ---- names too long -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--output", "--save-model"])
def test_a_name_too_long_for_the_temporary_file_is_refused_before_training(tmp_path: Path, flag: str) -> None:
    """A name of 250 characters fits the disk's limit of 255, but the temporary file beside it (14 more) does
    not: refused up front, not after the training."""
    name = "r" * 245 + (".json" if flag == "--output" else ".npz")
    proc = run_cli([*DIGITS, "--epochs", "1", flag, str(tmp_path / name)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {flag} ") and "File name too long" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "epoch 1/1" not in proc.stdout


# ---- two outputs on one file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--save-model", "o.npz", "--output", "o.npz"], "--save-model and --output are the same file (o.npz)"),
    (["--output", "logs/app.log"], "logging.file and --output are the same file"),
    (["--config", "c.yaml", "--output", "c.yaml"], "--output and the config are the same file (c.yaml)"),
    (["--plot-dir", "pics", "--output", "pics/curves.png"], "the picture curves.png and --output are the same file"),
])
def test_two_outputs_on_one_file_are_refused_before_any_work(tmp_path: Path, flags: list[str], message: str) -> None:
    (tmp_path / "c.yaml").write_text("data: {dataset: digits}\n")
    before = sorted(path.name for path in tmp_path.iterdir())
    proc = run_cli([*DIGITS, "--epochs", "1", *flags], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert (tmp_path / "c.yaml").read_text() == "data: {dataset: digits}\n"
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "logs") == [n for n in before if n != "logs"]


def test_continuing_a_model_into_its_own_file_is_allowed(tmp_path: Path) -> None:
    assert run_cli([*DIGITS, "--epochs", "1", "--save-model", "m.npz"], cwd=tmp_path).returncode == 0
    proc = run_cli([*DIGITS, "--epochs", "1", "--load-model", "m.npz", "--save-model", "m.npz"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert modelfile.load_model(tmp_path / "m.npz", main.build_model).meta["training"]["epochs_completed"] == 2


# ---- a signal while the pictures are drawn --------------------------------------------------------------------------


def test_sigterm_while_writing_the_outputs_gives_a_status_that_matches_the_exit_code(tmp_path: Path) -> None:
    process = start([*DIGITS, "--epochs", "1", "--save-model", "m.npz", "--plot-dir", "pics", "--output", "r.json"],
                    tmp_path)
    for line in process.stdout:
        if line.startswith("saved the model"):  # training is over: the pictures are being drawn now
            process.send_signal(signal.SIGTERM)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "SIGTERM received: stopping after the file being written" in stderr
    assert "stopping after this batch" not in stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["status"] == "interrupted" and results["stopped_at"] == {"after": "training, while writing the "
                                                                                       "outputs"}


# ---- a run that says what it is -------------------------------------------------------------------------------------


def test_diagnostics_go_to_stderr_and_the_result_line_always_to_stdout(tmp_path: Path) -> None:
    """Offline, MNIST falls back to synthetic digits: the banner is on stderr, the last line on stdout names the
    synthetic data; with --log-level WARNING the result line is still printed."""
    proc = run_cli(["--n-train", "200", "--n-test", "50", "--epochs", "1", "--log-level", "WARNING"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [line for line in proc.stdout.splitlines() if line.startswith("test accuracy")]
    assert "on SYNTHETIC digits, not mnist" in proc.stdout
    assert "SYNTHETIC DATA" in proc.stderr and "SYNTHETIC" not in proc.stdout.replace("SYNTHETIC digits", "")


# ---- interruption ---------------------------------------------------------------------------------------------------


def read_lines(stream: Any, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)  # end of output


def wait_for_line(lines: queue.Queue, prefix: str, timeout: float) -> list[str]:
    """Lines read so far, up to and including the first that starts with prefix; fails after timeout s."""
    seen, deadline = [], time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no line starting with {prefix!r} within {timeout}s:\n{''.join(seen)}"
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        assert line is not None, f"the process ended before printing {prefix!r}:\n{''.join(seen)}"
        seen.append(line)
        if line.startswith(prefix):
            return seen


@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_stops_training_and_keeps_what_was_done(tmp_path: Path, signum: int, exit_code: int) -> None:
    """A real training process gets the signal after its first epoch: it finishes the current batch, writes
    results with status 'interrupted' and the completed epochs, saves a loadable model, and exits with
    128 + signal number, without a traceback."""
    # Far more epochs than it can do before the signal; synthetic data spares the subprocess scikit-learn.
    config = write_config(tmp_path, small_config("synthetic", 100, 50, epochs=100_000))
    process = subprocess.Popen(cli("--config", str(config), "--output", "results.json", "--save-model", "model.npz"),
                               cwd=tmp_path, env=environment_without_seed(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(process.stdout, lines), daemon=True)
    reader.start()
    try:
        wait_for_line(lines, "epoch ", timeout=60)
        process.send_signal(signum)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(timeout=10)
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "interrupted"
    completed = results["epochs_completed"]
    assert completed == len(results["history"]) >= 1
    assert results["stopped_at"]["epoch"] in (completed, completed + 1)  # at an epoch's end, or inside the next
    assert results["test_accuracy"] is not None

    loaded = modelfile.load_model(tmp_path / "model.npz", main.build_model)
    assert loaded.meta["training"]["status"] == "interrupted"
    assert loaded.meta["training"]["epochs_completed"] == completed
    assert all(np.isfinite(p).all() for layer in loaded.model.layers for p in layer.params.values())


# ---- no half-written files ------------------------------------------------------------------------------------------


def half_then_fail(error: BaseException) -> Any:
    """A writer that writes some bytes, then fails as a full disk or a Ctrl-C would."""
    def write(f: Any) -> None:
        f.write(b"{\"status\": \"compl")
        f.flush()
        raise error
    return write


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path: Path, error: BaseException) -> None:
    """A write that fails midway leaves the previous file byte for byte, and no temporary file behind."""
    target = tmp_path / "results.json"
    target.write_text("previous run\n")
    with pytest.raises(type(error)):
        plumbing.write_atomic(target, half_then_fail(error))
    assert target.read_text() == "previous run\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.json"]


def test_write_atomic_creates_nothing_when_writing_fails(tmp_path: Path) -> None:
    """Without a previous file, a failed write leaves no file at all (not an empty or half one)."""
    with pytest.raises(OSError):
        plumbing.write_atomic(tmp_path / "model.npz", half_then_fail(OSError(errno.EIO, "I/O error")))
    assert list(tmp_path.iterdir()) == []


def test_write_json_keeps_the_old_file_when_a_value_cannot_be_written(tmp_path: Path) -> None:
    """json.dump streams its output: a value that fails to serialise midway must not truncate the file."""
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("cannot be shown")

    target = tmp_path / "results.json"
    target.write_text('{"status": "completed"}\n')
    with pytest.raises(RuntimeError):
        plumbing.write_json(target, {"status": "completed", "history": list(range(5000)), "odd": Unprintable()})
    assert target.read_text() == '{"status": "completed"}\n'
    assert [path.name for path in tmp_path.iterdir()] == ["results.json"]


def test_failed_run_keeps_the_previous_results_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """A run whose results write fails midway (a full disk, simulated) keeps the previous results.json
    intact, leaves no temporary file, and reports one error line without a traceback."""
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, small_config("synthetic", 64, 32, epochs=1))
    previous = '{"status": "completed", "test_accuracy": 0.99}\n'
    (tmp_path / "results.json").write_text(previous)
    real_dumps = json.dumps

    def dump_half_then_disk_full(payload: Any, f: Any, **options: Any) -> None:
        text = real_dumps(payload, **options)
        f.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plumbing.json, "dump", dump_half_then_disk_full)
    # json.dump fails for every file, so no checkpoints either
    code = main.main(["--config", str(config), "--output", "results.json", "--checkpoint-dir", "none"])
    stderr = capsys.readouterr().err
    assert code == main.EXIT_OUTPUT, stderr
    assert stderr == "ERROR: could not write the results results.json (No space left on device)\n", stderr
    assert (tmp_path / "results.json").read_text() == previous
    assert not list(tmp_path.glob(".results.json*"))
