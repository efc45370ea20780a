"""What a careless user does to a run's outputs, and what must still hold: a closed pipe, a full disk under the log
file or the model file, names too long for the disk, two outputs on one file, a model too big for memory, a
signal while the pictures are drawn; and a run that says plainly what it is (diagnostics on stderr, the result
line on stdout naming synthetic data, an evaluation that reads like one, a model scored on other data)."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MAIN, run_cli, write_config

import main
import modelfile

DIGITS = ["--dataset", "digits", "--n-train", "300", "--n-test", "60"]
SMALL_NET = {"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "relu", {"maxpool2d": {"pool_size": 2}}, "flatten",
                        {"dense": {"units": 10}}]}


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(MAIN), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ---- 1. a closed stdout ----------------------------------------------------------------------------


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


# ---- 2, 3. a full disk ------------------------------------------------------------------------------


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


# ---- 4. names too long -------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--output", "--save-model"])
def test_a_name_too_long_for_the_temporary_file_is_refused_before_training(tmp_path: Path, flag: str) -> None:
    """A name of 250 characters fits the disk's limit of 255, but the temporary file beside it (14 more) does
    not: refused up front, not after the training."""
    name = "r" * 245 + (".json" if flag == "--output" else ".npz")
    proc = run_cli([*DIGITS, "--epochs", "1", flag, str(tmp_path / name)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {flag} ") and "File name too long" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "epoch 1/1" not in proc.stdout


# ---- 8. too big for memory ---------------------------------------------------------------------------


@pytest.mark.parametrize(("layers", "batch", "message"), [
    ([{"conv2d": {"filters": 8}}, "flatten", {"dense": {"units": 10 ** 8}}, {"dense": {"units": 10}}], 32,
     "model.layers[2] (dense): 540,800,000,000 weights need about"),
    ([{"conv2d": {"filters": 512, "padding": 1}}, "relu", {"conv2d": {"filters": 512, "padding": 1}}, "flatten",
      {"dense": {"units": 10}}], 10 ** 6, "model: training needs about"),
])
def test_a_model_that_cannot_fit_in_memory_is_refused_before_building(tmp_path: Path, layers: list, batch: int,
                                                                       message: str) -> None:
    config = write_config(tmp_path, model={"layers": layers}, training={"batch_size": batch})
    started = time.monotonic()
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "GiB of memory available" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and time.monotonic() - started < 30


# ---- 10. two outputs on one file ---------------------------------------------------------------------


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


# ---- 13. a signal while the pictures are drawn -------------------------------------------------------


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


# ---- 14-16. a run that says what it is ----------------------------------------------------------------


def test_diagnostics_go_to_stderr_and_the_result_line_always_to_stdout(tmp_path: Path) -> None:
    """Offline, MNIST falls back to synthetic digits: the banner is on stderr, the last line on stdout names the
    synthetic data; with --log-level WARNING the result line is still printed."""
    proc = run_cli(["--n-train", "200", "--n-test", "50", "--epochs", "1", "--log-level", "WARNING"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [line for line in proc.stdout.splitlines() if line.startswith("test accuracy")]
    assert "on SYNTHETIC digits, not mnist" in proc.stdout
    assert "SYNTHETIC DATA" in proc.stderr and "SYNTHETIC" not in proc.stdout.replace("SYNTHETIC digits", "")


def test_an_evaluation_only_run_reads_like_one_and_warns_of_other_data(tmp_path: Path) -> None:
    """A model trained on synthetic digits, scored with --epochs 0 on 'mnist' (offline: synthetic digits too, but
    another data set): no training lines, an 'evaluation only' result, and a loud warning about the data."""
    assert run_cli(["--dataset", "synthetic", "--n-train", "200", "--n-test", "50", "--epochs", "1",
                    "--save-model", "m.npz"], cwd=tmp_path).returncode == 0
    proc = run_cli(["--n-train", "200", "--n-test", "50", "--load-model", "m.npz", "--epochs", "0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for absent in ("training:", "continuing with the saved", "training took", "Training on synthetic"):
        assert absent not in proc.stdout + proc.stderr, absent
    assert "evaluation only, no training" in proc.stdout
    assert "Evaluating on synthetic seven-segment digits instead" in proc.stderr
    assert "m.npz was trained on synthetic (source: synthetic), but is now evaluated on mnist" in proc.stderr



def test_weights_too_large_for_the_test_set_end_as_divergence(tmp_path: Path) -> None:
    """SGD at 1e20: one batch leaves finite but huge weights, whose test loss overflows: diverged, exit 3, not a
    'test loss nan' reported as success."""
    proc = run_cli(["--optimizer", "sgd", "--learning-rate", "1e20", "--dataset", "digits", "--n-train", "32",
                    "--n-test", "16", "--epochs", "1", "--output", "r.json"], cwd=tmp_path)
    assert proc.returncode == main.EXIT_DIVERGED == 3, proc.stderr
    assert "training diverged at epoch 1, batch 1 (the test loss became nan)" in proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "diverged"
