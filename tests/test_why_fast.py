"""bench/why_fast.py: it runs to the end, prints one summary row per design choice, and every alternative it
times computes the same numbers as the project's code (otherwise its timing would compare different work)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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
) + (("worker threads vs BLAS threads", "default workers vs") if why_fast_cpus() >= 2 else ())  # skipped on one CPU


def load_why_fast() -> ModuleType:
    """bench/why_fast.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("why_fast", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


why_fast = load_why_fast()


def summary_rows(stdout: str) -> list[str]:
    """The rows of the summary table: the lines after the dashed line, up to the first empty line."""
    lines = stdout.split("Summary:", 1)[1].splitlines()
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
