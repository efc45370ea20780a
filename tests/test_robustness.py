"""Never crash, never lose a run.

- A diverging run stops at once with exit code 3, says what to do, and records where it happened.
- Ctrl-C (SIGINT) or SIGTERM stops after the current batch, keeps what was done (results and model) and
  exits 130 / 143 without a traceback.
- Files are written atomically: a failure midway leaves the previous file, never half a file.
- The same config and seed give the same run; the seed comes from --seed, else RANDOM_SEED, else the config.
- Evaluation is batched, so a large test set never goes through the network in one piece.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import classifier_head, model_section, write_config

import config_schema
import main
import modelfile
import plumbing

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"seconds", "images_per_second"}  # the only history fields allowed to differ between runs


def small_config(dataset: str = "digits", n_train: int = 500, n_test: int = 200, **training: Any) -> dict:
    """A tiny network on digits (8x8, offline: an epoch of 500 images takes milliseconds) or on synthetic
    28x28 digits (no scikit-learn import, which saves a subprocess a second or more)."""
    return {
        "logging": {"level": "INFO", "file": "log/app.log"},
        "data": {"dataset": dataset, "n_train": n_train, "n_test": n_test, "random_seed": 7},
        "model": {"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "relu", "maxpool2d", *classifier_head(16)]},
        "training": {"epochs": 2, "optimizer": "sgd", "learning_rate": 0.05, "batch_size": 32, **training},
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "src" / "main.py"), *args]


def environment_without_seed() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "RANDOM_SEED"}


# ---- divergence ----------------------------------------------------------------------------------------


def test_divergence_stops_at_once_with_exit_3(tmp_path: Path) -> None:
    """SGD with learning rate 1e20 makes the loss NaN within the first batches: the run stops in epoch 1
    (of 20), exits 3, suggests a lower learning rate, records status 'diverged' and where, saves no model
    with broken weights, and no NumPy RuntimeWarning leaks to the console."""
    config = write_config(tmp_path, small_config("synthetic", 320, 50, learning_rate=1e20, epochs=20))
    process = subprocess.run(cli("--config", str(config), "--output", "results.json", "--save-model", "model.npz"),
                             cwd=tmp_path, env=environment_without_seed(), capture_output=True, text=True,
                             timeout=120)
    console = process.stdout + process.stderr
    assert process.returncode == main.EXIT_DIVERGED == 3, console
    assert "lower learning rate" in console
    for noise in ("RuntimeWarning", "overflow encountered", "invalid value encountered", "Traceback"):
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "diverged"
    assert results["stopped_at"]["epoch"] == 1
    assert 1 <= results["stopped_at"]["batch"] <= 320 // 32
    assert results["history"] == [] and results["epochs_completed"] == 0
    assert not (tmp_path / "model.npz").exists()


def test_train_reports_divergence_at_the_first_non_finite_loss() -> None:
    """train() itself: with a NaN weight the very first batch has a non-finite loss, and training stops
    there (epoch 1, batch 1) instead of running the remaining epochs."""
    rngs = main.make_rngs(0)
    data = main.Dataset(rngs["data"].random((64, 8, 8, 1), dtype=np.float32), rngs["data"].integers(0, 10, 64),
                        rngs["data"].random((16, 8, 8, 1), dtype=np.float32), rngs["data"].integers(0, 10, 16),
                        main.DIGIT_NAMES, "random", "test")
    model = main.build_model(config_schema.validate_config(small_config())["model"], data.input_shape, 10, rngs["init"])
    model.layers[-1].params["b"][0] = np.nan
    with np.errstate(all="ignore"):
        result = main.train(model, main.SGD(0.05), data, epochs=5, batch_size=32, rng=rngs["shuffle"])
    assert result.status == "diverged"
    assert result.stopped_at["epoch"] == 1 and result.stopped_at["batch"] == 1
    assert result.history == []


# ---- interruption ------------------------------------------------------------------------------------


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


# ---- no half-written files ---------------------------------------------------------------------------


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


# ---- reproducibility ---------------------------------------------------------------------------------


def without_timing(results: dict) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in results["history"]]


def run_in_process(output: str, *flags: str) -> dict:
    """One CLI run in this process (cwd and environment already set by the test); returns the results."""
    assert main.main(["--config", "config.yaml", "--output", output, *flags]) == 0
    return json.loads(Path(output).read_text())


def test_same_seed_same_run_and_seed_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same config and seed: identical histories (all but timing), in this process and in a fresh one.
    A different seed gives a different run, and the seed is taken from --seed, else RANDOM_SEED in the
    environment, else data.random_seed in the config file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    write_config(tmp_path, small_config())  # data.random_seed: 7
    fresh_process = subprocess.Popen(cli("--config", "config.yaml", "--output", "fresh.json"), cwd=tmp_path,
                                     env=environment_without_seed(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    first, second = run_in_process("first.json"), run_in_process("second.json")
    assert first["config"]["data"]["random_seed"] == 7
    assert len(first["history"]) == 2
    assert without_timing(first) == without_timing(second)
    assert (first["test_loss"], first["test_accuracy"]) == (second["test_loss"], second["test_accuracy"])

    by_flag = run_in_process("flag.json", "--seed", "8")
    assert by_flag["config"]["data"]["random_seed"] == 8
    assert without_timing(by_flag) != without_timing(first)

    monkeypatch.setenv("RANDOM_SEED", "8")
    by_environment = run_in_process("environment.json")  # RANDOM_SEED beats the config file
    assert by_environment["config"]["data"]["random_seed"] == 8
    assert without_timing(by_environment) == without_timing(by_flag)

    monkeypatch.setenv("RANDOM_SEED", "9")
    flag_and_environment = run_in_process("both.json", "--seed", "8")  # --seed beats RANDOM_SEED
    assert flag_and_environment["config"]["data"]["random_seed"] == 8
    assert without_timing(flag_and_environment) == without_timing(by_flag)

    _, stderr = fresh_process.communicate(timeout=120)
    assert fresh_process.returncode == 0, stderr
    assert without_timing(json.loads((tmp_path / "fresh.json").read_text())) == without_timing(first)


# ---- memory: evaluation in batches -------------------------------------------------------------------


def test_evaluate_and_predict_proba_pass_at_most_one_batch_to_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """On 10,000 inputs with batch_size 1000, forward never sees more than 1000 samples at once, every
    sample is seen exactly once, and the results equal those of one big forward pass."""
    rng = np.random.default_rng(0)
    model = main.build_model(model_section(*classifier_head(16)), (8, 8, 1), 10, rng)  # fast: dense only
    x = rng.random((10_000, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 10_000)
    one_pass_logits = model.forward(x, training=False)

    batch_sizes: list[int] = []
    real_forward = model.forward

    def counting_forward(inputs: np.ndarray, training: bool = True) -> np.ndarray:
        batch_sizes.append(len(inputs))
        return real_forward(inputs, training)

    monkeypatch.setattr(model, "forward", counting_forward)
    loss, accuracy = model.evaluate(x, y, batch_size=1000)
    assert max(batch_sizes) <= 1000 and sum(batch_sizes) == 10_000
    assert loss == pytest.approx(main.SoftmaxCrossEntropy().forward(one_pass_logits, y), rel=1e-5)
    assert accuracy == np.mean(one_pass_logits.argmax(axis=1) == y)

    batch_sizes.clear()
    probabilities = model.predict_proba(x, batch_size=1000)
    assert max(batch_sizes) <= 1000 and sum(batch_sizes) == 10_000
    assert probabilities.shape == (10_000, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), one_pass_logits.argmax(axis=1))


@pytest.mark.parametrize("convs", [[], [{"conv2d": {"filters": 4, "padding": 1}}, "relu", "maxpool2d"]],
                         ids=["dense", "conv"])
def test_no_images_give_no_rows_of_k_probabilities(convs: list) -> None:
    """predict_proba of 0 images has shape (0, K), as documented, so predict gives (0,) and evaluate (0, 0)."""
    model = main.build_model(model_section(*convs, *classifier_head(16, 7)), (8, 8, 1), 7, np.random.default_rng(0))
    empty = np.zeros((0, 8, 8, 1), dtype=np.float32)
    assert model.predict_proba(empty).shape == (0, 7)
    assert model.predict(empty).shape == (0,)
    assert model.evaluate(empty, np.zeros(0, dtype=int)) == (0.0, 0.0)


def test_a_test_set_larger_than_one_batch_is_evaluated_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--n-test 1500 (far more than the evaluation batch, main.EVAL_BATCH_SIZE = 32) works from the command line:
    the network gets the test images in batches of 32 (the last one 1500 - 46 * 32 = 28), never more, every
    image once per evaluation, and the reported test accuracy is that of the logits those batches gave."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    write_config(tmp_path, small_config(epochs=1))
    evaluation_logits: list[np.ndarray] = []
    real_forward = main.Sequential.forward

    def counting_forward(self: main.Sequential, x: np.ndarray, training: bool = True) -> np.ndarray:
        logits = real_forward(self, x, training)
        if not training:
            evaluation_logits.append(logits)
        return logits

    monkeypatch.setattr(main.Sequential, "forward", counting_forward)
    # One worker: the batches then come one after the other, in the order of the test set.
    results = run_in_process("results.json", "--n-train", "200", "--n-test", "1500", "--workers", "1")
    assert results["data"]["n_test"] == 1500
    batch_sizes = [len(logits) for logits in evaluation_logits]
    size = main.EVAL_BATCH_SIZE
    assert size < 1500
    one_pass = [size] * (1500 // size) + ([1500 % size] if 1500 % size else [])
    assert len(batch_sizes) >= len(one_pass)
    assert batch_sizes == one_pass * (len(batch_sizes) // len(one_pass)), batch_sizes
    last_pass = np.concatenate(evaluation_logits[-len(one_pass):])
    y_test = main.load_data(results["config"]["data"]).y_test
    assert results["test_accuracy"] == np.mean(last_pass.argmax(axis=1) == y_test)
