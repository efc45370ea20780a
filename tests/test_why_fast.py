"""bench/why_fast.py: it runs to the end, prints one summary row per design choice, and every alternative it
times computes the same numbers as the project's code (otherwise its timing would compare different work)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Callable

import numpy as np
import pytest

import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "why_fast.py"
# The start of each summary row: one per comparison docs/HOW_IT_WORKS.md's "Why it is fast" relies on.
def why_fast_cpus() -> int:
    """The CPUs bench/why_fast.py's comparison 7 may use (it is skipped with one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


EXPECTED_ROWS = (
    "im2col + GEMM vs loops",
    "the same, per image at batch 32",
    "float32 vs float64",
    "NHWC vs NCHW",
    "NCHW by 4 transposes around Conv2D",
    "im2col's copy alone",
    "col2im += vs np.add.at: conv2d_2",
    "col2im += vs np.add.at: epoch",
    "winner masks vs argmax",
    "x * (x > 0) vs np.maximum(x, 0)",
) + (("worker threads vs BLAS threads", "default workers vs") if why_fast_cpus() >= 2 else ()) + (  # skipped on one CPU
    "a. column sums",
    "b. conv dx",
    "c. im2col, one channel",
    "d. ReLU",
    "e. max pool backward",
    "f. Adam",
    "g. kept buffers",
    "BLAS 1 vs 2 threads: 8x8 digits, 1 worker, idle",
    "BLAS 1 vs 2 threads: 8x8 digits, 1 worker, busy",
    "BLAS 1 vs 2 threads: default model 28x28, default workers (",
    "BLAS 1 vs 2 threads: default model 28x28, default workers (",
    "BLAS 1 vs 2 threads: default model 28x28, --workers 1, idle",
    "BLAS 1 vs 2 threads: default model 28x28, --workers 1, busy",
)
SPEED_TRICK_LETTERS = "abcdefg"
BLAS_ROWS = 6  # comparison 9: three configurations, each idle and beside a busy process


def load_why_fast() -> ModuleType:
    """bench/why_fast.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("why_fast", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


why_fast = load_why_fast()


def summary_rows(stdout: str) -> list[str]:
    """The rows of the summary table."""
    return table_rows(stdout.split("Summary:", 1)[1])


def table_rows(text: str) -> list[str]:
    """The rows of the first table in text: the lines after its dashed line, up to the first empty line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line)
    return rows


def test_quick_run_exits_0_and_prints_a_row_for_every_design_choice(tmp_path: Path) -> None:
    """`python bench/why_fast.py --quick` runs every comparison (each checks its numbers before timing) and
    ends with the summary table: one row per design choice, each with a positive, finite ratio."""
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    rows = summary_rows(done.stdout)
    assert len(rows) == len(EXPECTED_ROWS)
    for row, expected in zip(rows, EXPECTED_ROWS):
        assert row.strip().startswith(expected), f"summary row {row!r} should start with {expected!r}"
        cells = [cell.strip() for cell in row.split("  ") if cell.strip()]  # columns are 2+ spaces apart
        assert len(cells) == 5, f"expected choice, project, alternative, ratio, spread in {row!r}"
        ratio = float(cells[3].replace(",", ""))
        assert math.isfinite(ratio) and ratio > 0
    tricks = table_rows(done.stdout.split("Speed tricks:", 1)[1])  # the second table: the share of an epoch saved
    assert [row.split(".", 1)[0] for row in tricks] == list(SPEED_TRICK_LETTERS)
    for row in tricks:
        cells = re.split(r"\s{2,}", row.strip())
        assert len(cells) == 4, f"expected trick, in the core, share saved, range in {row!r}"
        assert cells[1] == ("yes" if row.startswith(("f.", "g.")) else "no")  # the tricks in src/main.py
        assert math.isfinite(float(cells[2].rstrip("%")))
    assert len(re.findall(r"^  trick (saves|costs) ", done.stdout, re.MULTILINE)) == len(SPEED_TRICK_LETTERS)
    blas = table_rows(done.stdout.rsplit("BLAS threads with one worker:", 1)[1])  # the last table
    assert len(blas) == BLAS_ROWS
    for row, load in zip(blas, ["idle", "busy"] * 3):
        cells = re.split(r"\s{2,}", row.strip())
        assert len(cells) == 6, f"expected configuration, project's, best, best epoch, ratio, verdict in {row!r}"
        assert cells[0].endswith(f", {load}") and cells[1] == "1 BLAS thread per worker"
        assert cells[2] in ("1 BLAS thread per worker", "2 BLAS threads per worker")
        slowdown = float(cells[4].rstrip("x"))
        assert math.isfinite(slowdown) and slowdown >= 1  # quick numbers are too rough to hold to the 1.5x goal
        assert cells[5] in ("yes (<= 1.5x)", "NO (<= 1.5x)")
        if cells[2] == cells[1]:  # the project's setting was the faster one
            assert slowdown == 1
    assert "NumPy" in done.stdout and "BLAS" in done.stdout and "CPUs usable" in done.stdout
    assert list(tmp_path.iterdir()) == [], "the script must not write files"


def test_every_alternative_computes_what_the_project_computes() -> None:
    """Each comparison's check passes on the real shapes: the loop reference (on a 4x4 crop, to stay fast), the
    channels-first convolution, col2im with np.add.at, argmax pooling, np.maximum and the float64 model."""
    rng = np.random.default_rng(0)
    conv2 = main.Conv2D(32, 64, 3, 1, 1, rng=rng)
    x, grad_out = why_fast.random_array(rng, why_fast.CONV2_INPUT), why_fast.random_array(rng, (32, 14, 14, 64))
    why_fast.check_loop_reference(conv2, x[:1, :4, :4], grad_out[:1, :4, :4])
    why_fast.check_nchw(conv2, x, grad_out)
    why_fast.check_col2im(*why_fast.conv2_grad_cols(rng))
    pooled_input = why_fast.random_array(rng, why_fast.POOL1_INPUT)
    why_fast.check_pooling(pooled_input, why_fast.random_array(rng, (32, 14, 14, 32)))
    why_fast.check_relu(why_fast.random_array(rng, why_fast.POOL1_INPUT))
    images, labels = why_fast.synthetic_batch(8, rng)
    why_fast.check_dtypes(why_fast.default_model(np.float32), why_fast.default_model(np.float64), images, labels)
    why_fast.check_workers(images, labels, 2)


def test_a_wrong_alternative_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks can fail: a col2im that assigns instead of adding (the mistake the docs warn about) keeps
    only one window's gradient per pixel, and check_col2im rejects it."""

    def col2im_assigning(grad_cols: np.ndarray, padded_shape: tuple[int, ...], stride: int) -> np.ndarray:
        index = why_fast.scatter_index(grad_cols.shape, tuple(padded_shape), stride)
        grad_x = np.zeros(padded_shape, dtype=grad_cols.dtype)
        grad_x.reshape(-1)[index] = grad_cols.transpose(3, 4, 0, 1, 2, 5)
        return grad_x

    monkeypatch.setattr(why_fast, "col2im_add_at", col2im_assigning)
    with pytest.raises(why_fast.MismatchError, match="col2im"):
        why_fast.check_col2im(*why_fast.conv2_grad_cols(np.random.default_rng(0)))


def test_every_speed_trick_computes_what_the_core_computes() -> None:
    """Each speed trick of comparison 8 (a-g) gives the core's loss and gradients on one batch (f: the core's
    Adam state and weight updates), and the check sees the trick's code run."""
    assert "".join(trick.letter for trick in why_fast.SPEED_TRICKS) == SPEED_TRICK_LETTERS
    core = [getattr(trick.owner, trick.attribute) for trick in why_fast.SPEED_TRICKS]
    images, labels = why_fast.synthetic_batch(8, np.random.default_rng(0))
    for trick in why_fast.SPEED_TRICKS:
        why_fast.check_speed_trick(trick, images, labels)
    after = [getattr(trick.owner, trick.attribute) for trick in why_fast.SPEED_TRICKS]
    assert all(a is b for a, b in zip(after, core)), "a check left a trick patched into main"


def speed_trick(letter: str) -> why_fast.SpeedTrick:
    return next(trick for trick in why_fast.SPEED_TRICKS if trick.letter == letter)


def bias_as_column_means(self: main.Conv2D, grad_out: np.ndarray) -> np.ndarray | None:
    """Trick a with a classic slip: the bias gradient averaged over the rows instead of summed."""
    grad_in = why_fast.conv_backward_bias_by_ones(self, grad_out)
    self.grads["b"] /= grad_out.size // grad_out.shape[-1]
    return grad_in


def dx_with_untransposed_weights(self: main.Conv2D, grad_out: np.ndarray) -> np.ndarray | None:
    """Trick b with W reshaped to (k*k, F, C) instead of transposed to it: the same shape, other numbers."""
    weights = self.params["W"]
    k, _, channels, filters = weights.shape
    self.params["W"] = weights.reshape(k * k, filters, channels).transpose(0, 2, 1).reshape(weights.shape)
    try:
        return why_fast.conv_backward_dx_per_kernel_offset(self, grad_out)
    finally:
        self.params["W"] = weights


def im2col_offsets_swapped(x_padded: np.ndarray, kernel_size: int, stride: int,
                           out: np.ndarray | None = None) -> np.ndarray:
    """Trick c with the two kernel offsets swapped: every window transposed."""
    return np.ascontiguousarray(why_fast.im2col_one_channel_by_offsets(x_padded, kernel_size, stride, out)
                                .transpose(0, 1, 2, 4, 3, 5))


def relu_forward_leaky(self: main.ReLU, x: np.ndarray, training: bool = True) -> np.ndarray:
    """Trick d, but letting a hundredth of the negative inputs through."""
    return why_fast.relu_forward_by_multiply(self, x, training) + 0.01 * np.minimum(x, 0)


def maxpool_backward_to_first_offset(self: main.MaxPool2D, grad_out: np.ndarray) -> np.ndarray:
    """Trick e writing every window's gradient to its top-left input, whoever won."""
    grad_in = np.zeros(self.x_shape, dtype=grad_out.dtype)
    out_h, out_w = grad_out.shape[1:3]
    _, row_slice, col_slice = next(self._offsets(out_h, out_w))
    np.multiply(grad_out, 1, out=grad_in[:, row_slice, col_slice, :])
    return grad_in


def adam_without_bias_correction(self: main.Adam, model: main.Sequential) -> None:
    """The textbook Adam that forgets m_hat and v_hat: its first steps are far too small."""
    self.t += 1
    for key, param, grad in main.parameters(model):
        m = self.state[f"{key}.m"] = self.beta1 * self.slot(f"{key}.m", param) + (1 - self.beta1) * grad
        v = self.state[f"{key}.v"] = self.beta2 * self.slot(f"{key}.v", param) + (1 - self.beta2) * grad ** 2
        param -= self.learning_rate * m / (np.sqrt(v) + self.eps)


def arrays_of_ones(self: main.Layer, name: str, shape: tuple[int, ...], dtype: type, keep: bool = True) -> np.ndarray:
    """Trick g's plain form handing out arrays of ones: the padded input's border is not zero."""
    return np.ones(shape, dtype)


@pytest.mark.parametrize(("letter", "wrong"), [
    ("a", bias_as_column_means),
    ("b", dx_with_untransposed_weights),
    ("c", im2col_offsets_swapped),
    ("d", relu_forward_leaky),
    ("e", maxpool_backward_to_first_offset),
    ("f", adam_without_bias_correction),
    ("g", arrays_of_ones),
])
def test_a_wrong_speed_trick_is_caught(letter: str, wrong: Callable) -> None:
    """The speed tricks' checks can fail: each trick with a deliberate mistake raises MismatchError."""
    images, labels = why_fast.synthetic_batch(8, np.random.default_rng(0))
    with pytest.raises(why_fast.MismatchError, match="speed trick"):
        why_fast.check_speed_trick(dataclasses.replace(speed_trick(letter), replacement=wrong), images, labels)


def test_a_speed_trick_whose_code_never_runs_is_caught() -> None:
    """A patch the core never calls would time the core against itself: the check refuses it."""
    images, labels = why_fast.synthetic_batch(8, np.random.default_rng(0))
    unused = SimpleNamespace(backward=None)  # the core never looks here
    with pytest.raises(why_fast.MismatchError, match="never ran"):
        why_fast.check_speed_trick(dataclasses.replace(speed_trick("a"), owner=unused), images, labels)


def test_the_blas_sides_train_with_the_threads_they_claim() -> None:
    """Comparison 9 checks, before timing, that training runs with one BLAS thread per worker on the project's
    side and two on the alternative's, with one worker (parallel.one_blas_thread) and with two (DataParallel),
    whatever the BLAS limit around it; and the project's limits are back afterwards."""
    from threadpoolctl import threadpool_limits

    import parallel

    data = why_fast.synthetic_dataset(why_fast.BATCH, 8, np.random.default_rng(0))
    project = (why_fast.main.one_blas_thread, parallel.DataParallel.__enter__)
    for outer in (1, 2):
        with threadpool_limits(limits=outer):
            for workers in (1, 2):
                why_fast.check_blas_sides(data, workers)
            assert parallel.blas_threads() == outer, "a side left its BLAS limit behind"
    assert (why_fast.main.one_blas_thread, parallel.DataParallel.__enter__) == project


def test_a_blas_side_that_does_not_hold_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a project that stops limiting BLAS (one_blas_thread doing nothing) is seen training
    with two BLAS threads, and an alternative whose patch no longer reaches training with one."""
    from threadpoolctl import threadpool_limits


    data = why_fast.synthetic_dataset(why_fast.BATCH, 8, np.random.default_rng(0))
    with threadpool_limits(limits=2):
        with monkeypatch.context() as patch:
            @contextlib.contextmanager
            def no_limit(model: object) -> Iterator[object]:
                yield model

            patch.setattr(why_fast.main, "one_blas_thread", no_limit)
            with pytest.raises(why_fast.MismatchError, match="the project's setting trained with \\[2\\]"):
                why_fast.check_blas_sides(data, 1)
        with threadpool_limits(limits=1), monkeypatch.context() as patch:
            patch.setattr(why_fast, "training_blas_threads", lambda threads: contextlib.nullcontext())
            with pytest.raises(why_fast.MismatchError, match="the alternative"):
                why_fast.check_blas_sides(data, 2)


def test_the_busy_process_spins_while_the_block_runs_and_is_gone_after() -> None:
    """busy_core's competing process is running (and burning CPU time) inside the block, and killed and reaped
    when the block ends, even when it ends with an error."""
    with pytest.raises(KeyError), why_fast.busy_core() as spinner:
        assert spinner.poll() is None
        stat = Path(f"/proc/{spinner.pid}/stat")
        if stat.is_file():
            time.sleep(0.3)
            user_ticks = int(stat.read_text().rsplit(")", 1)[1].split()[11])  # utime, in clock ticks
            assert user_ticks > 0, "the busy process does not use the CPU"
        raise KeyError("the block failed")
    assert spinner.returncode is not None


def test_blas_table_reports_the_best_setting_and_the_slowdown() -> None:
    """The table of comparison 9: the faster side's median epoch, the project's over it, and the verdict."""
    def result(load: str, project: list[float], alternative: list[float]) -> why_fast.Result:
        return why_fast.Result(f"BLAS 1 vs 2 threads: digits, {load}", "1 BLAS thread per worker",
                               "2 BLAS threads per worker", project, alternative, unit="s", slowdown_limit=1.5)

    results = [result("idle", [1.0, 1.2, 1.1], [3.0, 2.0, 4.0]), result("busy", [2.0, 2.2, 2.1], [1.0, 1.6, 1.4]),
               result("odd", [1.6, 1.6, 1.6], [1.0, 1.0, 1.0])]
    lines = why_fast.blas_table(results).splitlines()
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]
    assert [row[0] for row in cells] == ["digits, idle", "digits, busy", "digits, odd"]
    assert [row[2] for row in cells] == ["1 BLAS thread per worker", "2 BLAS threads per worker",
                                         "2 BLAS threads per worker"]
    assert [row[3] for row in cells] == ["1.100 s", "1.400 s", "1.000 s"]
    assert [row[4] for row in cells] == ["1.00x", "1.50x", "1.60x"]
    assert [row[5] for row in cells] == ["yes (<= 1.5x)", "yes (<= 1.5x)", "NO (<= 1.5x)"]


def test_only_selects_comparisons_by_number_or_title() -> None:
    """--only 8 and --only 'speed tricks' pick comparison 8; a name that matches nothing is an error."""
    assert [title[:2] for title, _ in why_fast.selected_comparisons("8")] == ["8."]
    assert [title[:2] for title, _ in why_fast.selected_comparisons("Speed Tricks")] == ["8."]
    assert [title[:2] for title, _ in why_fast.selected_comparisons("9")] == ["9."]
    assert [title[:2] for title, _ in why_fast.selected_comparisons("BLAS threads with one worker")] == ["9."]
    assert len(why_fast.selected_comparisons(None)) == len(why_fast.COMPARISONS)
    with pytest.raises(SystemExit) as exit_info:
        why_fast.main_cli(["--only", "no such comparison"])
    assert exit_info.value.code == 2


def test_config_gives_the_speed_tricks_its_model_and_a_bad_one_is_refused(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    """--config: comparison 8's epochs train the config's model (here mnist_best's, with BatchNorm and Dropout);
    a config for other images is one line on stderr and exit code 2, before any measuring."""
    recipe = importlib.import_module("benchmark").load_recipe(str(ROOT / "configs" / "mnist_best.yaml"))
    data = why_fast.synthetic_dataset(4, 2, np.random.default_rng(0))
    kinds = [type(layer).__name__ for layer in why_fast.epoch_model(data, recipe["model"]).layers]
    assert kinds.count("BatchNorm") == 2 and kinds.count("Dropout") == 2
    assert "BatchNorm" not in [type(layer).__name__ for layer in why_fast.epoch_model(data).layers]
    config = tmp_path / "digits.yaml"
    config.write_text("data: {dataset: digits}\n")
    with pytest.raises(SystemExit) as exit_info:
        why_fast.main_cli(["--only", "8", "--config", str(config)])
    assert exit_info.value.code == 2 and "28x28" in capsys.readouterr().err
