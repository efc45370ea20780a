"""The defects a hostile-use audit found, each run as a user would (a real process, real files, real devices),
each asserting what the program says now and its exit code. Numbered as the audit numbered them."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MAIN, run_cli, write_config

import main

DIGITS = ["--dataset", "digits", "--n-train", "200", "--n-test", "60", "--epochs", "1"]
SMALL_NET = {"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "relu", {"maxpool2d": {"pool_size": 2}}, "flatten",
                        {"dense": {"units": 10}}]}


def small_config(folder: Path, **sections: dict) -> Path:
    data = {"dataset": "digits", "n_train": 200, "n_test": 60, **sections.pop("data", {})}
    training = {"epochs": 1, **sections.pop("training", {})}
    return write_config(folder, data=data, model=sections.pop("model", SMALL_NET), training=training, **sections)


def character_device(folder: Path, name: str, minor: int) -> Path:
    """A private copy of /dev/null (minor 3) or /dev/full (minor 7): the program may replace it by mistake
    without harming the machine's own. Needs root (mknod); skips otherwise."""
    path = folder / name
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except (PermissionError, AttributeError):
        pytest.skip("creating a character device needs root")
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    proc = run_cli(["--config", str(small_config(folder)), "--save-model", "m.npz"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder / "m.npz"


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].lower().startswith("error: "), stderr
    assert "Traceback" not in stderr and "unexpected" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


# ---- 1. outputs and special files -------------------------------------------------------------------


def test_1_an_output_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "target.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("target.json")
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", "link.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "link.json").is_symlink() and os.readlink(tmp_path / "link.json") == "target.json"
    assert json.loads((tmp_path / "target.json").read_text())["status"] == "completed"


def test_1_a_character_device_is_written_through_not_replaced(tmp_path: Path) -> None:
    null = character_device(tmp_path, "null", 3)
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", str(null), "--save-model", str(null)
                    .replace("null", "m.npz")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(null.stat().st_mode), "the device was replaced by a regular file"


def test_1_a_full_device_is_exit_4_with_one_line_and_the_other_files_are_written(tmp_path: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", str(full), "--save-model", "m.npz"],
                   cwd=tmp_path)
    assert proc.returncode == main.EXIT_OUTPUT == 4, proc.stderr
    assert proc.stderr == f"ERROR: could not write the results {full} (No space left on device)\n"
    assert stat.S_ISCHR(full.stat().st_mode) and (tmp_path / "m.npz").is_file()


def test_1_a_fifo_is_written_through_to_its_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", "fifo"], cwd=tmp_path)
    reader.join(30)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert json.loads(received[0])["status"] == "completed"


def test_1_a_fifo_nobody_reads_is_exit_4_at_once_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", "fifo"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == "ERROR: could not write the results fifo (a FIFO that no program is reading)\n"


def test_1_a_socket_is_refused_before_training(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    try:
        proc = run_cli(["--config", str(small_config(tmp_path)), "--output", "sock"], cwd=tmp_path)
    finally:
        listener.close()
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--output sock: is a socket, not a file")
    assert "epoch" not in proc.stdout


# ---- 2. a stdout that cannot be written ----------------------------------------------------------------


def run_into(stdout_path: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    with open(stdout_path, "wb") as stdout:
        return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=120)


STDOUT_FULL = "error: cannot write to standard output (No space left on device); every file asked for was written\n"


def test_2_a_full_stdout_still_writes_the_model_and_results_then_exits_4(tmp_path: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    proc = run_into(full, ["--config", str(small_config(tmp_path)), "--save-model", "m.npz", "--output", "r.json"],
                    tmp_path)
    assert proc.returncode == 4
    assert proc.stderr == STDOUT_FULL
    assert (tmp_path / "m.npz").is_file() and json.loads((tmp_path / "r.json").read_text())["status"] == "completed"


def test_2_a_full_stdout_under_predict_and_gradcheck(tmp_path: Path, model_file: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    np.save(tmp_path / "digit.npy", np.eye(8))
    proc = run_into(full, ["--load-model", str(model_file), "--predict", "digit.npy", "--output", "p.json"], tmp_path)
    assert (proc.returncode, proc.stderr) == (4, STDOUT_FULL)
    assert json.loads((tmp_path / "p.json").read_text())["status"] == "predicted"
    proc = run_into(full, ["--config", str(small_config(tmp_path)), "--gradcheck", "--output", "g.json"], tmp_path)
    assert (proc.returncode, proc.stderr) == (4, STDOUT_FULL)
    assert json.loads((tmp_path / "g.json").read_text())["status"] == "passed"


def test_2_a_full_stdout_under_serve_serves_and_ends_with_exit_4(tmp_path: Path, model_file: Path) -> None:
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


def test_2_a_closed_pipe_is_still_141_but_after_the_files_are_written(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, str(MAIN), "--config", str(small_config(tmp_path, training={
        "epochs": 3})), "--save-model", "m.npz", "--output", "r.json"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert first.startswith("numpy-cnn: config from")
    assert process.returncode == 141 and stderr == "", stderr
    assert (tmp_path / "m.npz").is_file()
    assert json.loads((tmp_path / "r.json").read_text())["epochs_completed"] == 3


# ---- 12. the gradient check's results file ---------------------------------------------------------------


def test_12_gradcheck_output_has_its_documented_keys(tmp_path: Path) -> None:
    proc = run_cli(["--config", str(small_config(tmp_path)), "--gradcheck", "--output", "g.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    document = json.loads((tmp_path / "g.json").read_text())
    assert set(document) == {"status", "rows", "config", "versions"}
    assert set(document["versions"]) >= {"python", "numpy"}
