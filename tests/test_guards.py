"""Tests that guard the guards: each one fails on a mutation of src/ that the rest of the suite let through.

- softmax() and Sequential.predict_proba on huge float32 logits: finite rows that sum to 1 and equal a float64
  reference (they fail when softmax loses its max shift: test_the_softmax_checks_fail_without_the_max_shift);
- --predict prepares a drawing as the model's data set was made: MNIST's ink fills 20 of 28 pixels, Fashion-MNIST's
  and the 8x8 digits' the whole frame, measured on what the model really received;
- a picture that cannot be drawn makes the run exit 1, with the problem in the results file;
- a second Ctrl-C stops a training run at once, in the middle of a batch.
"""

from __future__ import annotations

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
import yaml
from helpers import MAIN, classifier_head, write_idx_folder
from PIL import Image, ImageDraw

import main
import plots

# ---- softmax on large logits ---------------------------------------------------------------------------------

# Rows whose exp() overflows float32 (e^89 already does) unless the row's maximum is subtracted first, rows of
# -1e30 whose exp() underflows to 0 for every entry, and mixes of both.
LARGE_LOGITS = np.array([
    [1000, 999, 998],
    [1e30, 0, -1e30],
    [-1e30, -1e30, -1e30],
    [1e30, 1e30, -1e30],
    [-1e30, 5, -3],
    [88, 89, 90],
    [3e38, -3e38, 0],
], dtype=np.float32)


def softmax_float64(logits: np.ndarray) -> np.ndarray:
    """The reference: softmax computed in float64, written out here rather than taken from main."""
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_softmax_rows(probabilities: np.ndarray, logits: np.ndarray) -> None:
    """Finite probabilities, each row summing to 1, equal to the float64 reference (float32 rounding apart)."""
    assert probabilities.shape == logits.shape
    assert np.isfinite(probabilities).all(), f"non-finite probabilities:\n{probabilities}"
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probabilities, softmax_float64(logits), rtol=1e-5, atol=1e-7)


def identity_model(classes: int) -> main.Sequential:
    """A model whose logits are its input: one dense layer with the identity as weights and no bias."""
    dense = main.Dense(classes, classes, rng=np.random.default_rng(0))
    dense.params["W"][...] = np.eye(classes, dtype=np.float32)
    return main.Sequential([dense], (classes,))


def test_softmax_of_large_float32_logits_is_finite_and_exact() -> None:
    with np.errstate(over="ignore"):  # -3e38 - 3e38 is -inf in float32 (and its exp() the right 0)
        assert_softmax_rows(main.softmax(LARGE_LOGITS), LARGE_LOGITS)
    # The values the issue quotes: [[1000, 999, 998]] is e^0, e^-1, e^-2 over their sum.
    np.testing.assert_allclose(main.softmax(LARGE_LOGITS[:1])[0], [0.66524096, 0.24472847, 0.09003057], rtol=1e-6)


def test_predict_proba_of_large_float32_logits_is_finite_and_exact() -> None:
    """What --predict, the pictures and the benchmark call: in batches of 3 here, so that rows of every kind
    meet in one batch and the batches are joined."""
    model = identity_model(3)
    np.testing.assert_array_equal(model.forward(LARGE_LOGITS, training=False), LARGE_LOGITS)  # the logits as given
    with np.errstate(over="ignore"):
        assert_softmax_rows(model.predict_proba(LARGE_LOGITS, batch_size=3), LARGE_LOGITS)
    np.testing.assert_array_equal(model.predict(LARGE_LOGITS[:2]), [0, 0])


def test_the_softmax_checks_fail_without_the_max_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test of the tests: with the max shift taken out of main.log_softmax (through which softmax and
    predict_proba go), both checks above fail: e^1000 is inf in float32, so the rows become NaN or 0."""

    def log_softmax_unshifted(logits: np.ndarray) -> np.ndarray:
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    monkeypatch.setattr(main, "log_softmax", log_softmax_unshifted)
    with np.errstate(all="ignore"):
        np.testing.assert_allclose(main.softmax(np.array([[1.0, 2.0]])), softmax_float64(np.array([[1.0, 2.0]])),
                                   rtol=1e-6)  # harmless on small logits: the mutation alone is not a crash
        with pytest.raises(AssertionError):
            assert_softmax_rows(main.softmax(LARGE_LOGITS), LARGE_LOGITS)
        with pytest.raises(AssertionError):
            assert_softmax_rows(identity_model(3).predict_proba(LARGE_LOGITS, batch_size=3), LARGE_LOGITS)
        for row in LARGE_LOGITS:  # every row whose largest exp() overflows or underflows float32 breaks alone
            if not -103 < row.max() < 88:
                with pytest.raises(AssertionError):
                    assert_softmax_rows(main.softmax(row[None]), row[None])


# ---- --predict fills the frame as the model's data set did ---------------------------------------------------


def draw_a_one(path: Path) -> tuple[int, int]:
    """A tall '1' drawn in black on white paper, 200x160 pixels; returns its ink's (height, width)."""
    picture = Image.new("L", (160, 200), 255)
    draw = ImageDraw.Draw(picture)
    draw.line([(80, 20), (80, 180)], fill=0, width=16)
    draw.line([(80, 24), (50, 54)], fill=0, width=12)
    picture.save(path)
    ink = np.argwhere(np.asarray(picture) < 128)
    height, width = ink.max(axis=0) - ink.min(axis=0) + 1
    return int(height), int(width)


def ink_box(image: np.ndarray, threshold: float = 0.1) -> tuple[int, int]:
    """(height, width) of the bounding box of the pixels brighter than threshold."""
    ink = np.argwhere(image > threshold)
    assert len(ink), "the model got a blank image"
    height, width = ink.max(axis=0) - ink.min(axis=0) + 1
    return int(height), int(width)


def train_tiny_model(folder: Path, dataset: str, data_path: Path | None) -> Path:
    """A tiny model trained for one epoch through main.main and saved; returns the model file."""
    config = folder / f"{dataset}.yaml"
    config.write_text(yaml.safe_dump({
        "logging": {"level": "WARNING", "file": None},
        "data": {"n_train": 20, "n_test": 10},
        "model": {"layers": classifier_head(8)},
        "training": {"epochs": 1, "batch_size": 10, "workers": 1},
    }))
    model = folder / f"{dataset}.npz"
    flags = ["--config", str(config), "--dataset", dataset, "--save-model", str(model)]
    assert main.main(flags + (["--data-path", str(data_path)] if data_path else [])) == 0
    return model


@pytest.mark.parametrize(("dataset", "frame", "longer_side"), [
    ("mnist", 28, 20),  # MNIST fitted each digit into 20x20 pixels of its 28x28
    ("fashion_mnist", 28, 28),  # Fashion-MNIST's articles fill the frame
    ("digits", 8, 8),  # so do scikit-learn's 8x8 digits
])
def test_predict_fills_the_frame_as_the_models_data_set_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture, dataset: str,
                                                             frame: int, longer_side: int) -> None:
    """--predict on a drawing: the image the model receives (recorded at predict_proba, not recomputed with
    images.prepare_image) has its ink's longer side spanning `longer_side` pixels of the `frame` x `frame`
    input, and keeps the drawing's proportions. With MNIST's 20/28 for every data set, Fashion-MNIST's would
    span 20 and the digits' 6."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    data_path = write_idx_folder(tmp_path / "idx") if dataset in ("mnist", "fashion_mnist") else None
    model = train_tiny_model(tmp_path, dataset, data_path)
    drawn_height, drawn_width = draw_a_one(tmp_path / "one.png")
    assert drawn_height > 3 * drawn_width  # tall: its longer side is its height

    seen: list[np.ndarray] = []
    real_predict_proba = main.Sequential.predict_proba

    def recording_predict_proba(self: main.Sequential, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        seen.append(np.array(x))
        return real_predict_proba(self, x, batch_size)

    monkeypatch.setattr(main.Sequential, "predict_proba", recording_predict_proba)
    capsys.readouterr()
    assert main.main(["--load-model", str(model), "--predict", "one.png", "--output", "predicted.json"]) == 0
    assert "one.png: " in capsys.readouterr().out
    assert json.loads(Path("predicted.json").read_text())["predictions"][0]["file"] == "one.png"

    assert len(seen) == 1 and seen[0].shape == (1, frame, frame, 1)
    height, width = ink_box(seen[0][0, :, :, 0])
    assert height == longer_side, f"the ink spans {height} of {frame} rows, expected {longer_side}"
    # The width is scaled by the same factor: the drawing is not stretched.
    assert abs(width - drawn_width * longer_side / drawn_height) <= 1.5


# ---- a picture that fails ------------------------------------------------------------------------------------


def test_a_picture_that_fails_exits_1_and_is_recorded_in_the_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """plots.write_plots raising (a bug, a missing font, a full disk) must not cost the run: the model and the
    results are still written, the results file names the problem under "problems", one error line says it,
    and the exit code is 1, not 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)

    def failing_write_plots(*args: Any, **kwargs: Any) -> dict:
        raise RuntimeError("matplotlib ran out of ink")

    monkeypatch.setattr(plots, "write_plots", failing_write_plots)
    Path("cfg.yaml").write_text(yaml.safe_dump({
        "logging": {"level": "INFO", "file": "logs/app.log"},
        "data": {"dataset": "digits", "n_train": 64, "n_test": 32},
        "model": {"layers": classifier_head(8)},
        "training": {"epochs": 1, "workers": 1}}))
    code = main.main(["--config", "cfg.yaml", "--plot-dir", "pictures", "--output", "results.json",
                      "--save-model", "model.npz"])
    captured = capsys.readouterr()
    assert code == main.EXIT_UNEXPECTED == 1, captured.err
    results = json.loads(Path("results.json").read_text())
    assert len(results["problems"]) == 1, results["problems"]
    problem = results["problems"][0]
    assert "picture" in problem and "RuntimeError" in problem and "matplotlib ran out of ink" in problem
    assert results["status"] == "completed" and results["epochs_completed"] == 1
    assert results["test_accuracy"] is not None and "plots" not in results["files"]
    assert results["files"]["model"] == "model.npz" and Path("model.npz").is_file()
    error_lines = [line for line in captured.err.splitlines() if "matplotlib ran out of ink" in line]
    assert len(error_lines) == 1 and "Traceback" not in captured.err + captured.out
    assert "unexpected" not in captured.err


# ---- a second Ctrl-C -----------------------------------------------------------------------------------------

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
