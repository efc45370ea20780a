"""Why is numpy-cnn fast? Measure each design choice of docs/HOW_IT_WORKS.md ("Why it is fast") against the
obvious alternative, on the real shapes of the default model at batch 32.

Run from the project root:

    python bench/why_fast.py              # every comparison: about 7 minutes, 4-5 of them the speed tricks (8),
                                          # 1-3 the BLAS threads (9)
    python bench/why_fast.py --quick      # a smoke run: few rounds, numbers only roughly right
    python bench/why_fast.py --threads 1  # one BLAS thread: steadier on a busy machine
    python bench/why_fast.py --only 8     # one comparison, by its number or a word of its title
    python bench/why_fast.py --only 8 --config configs/mnist_best.yaml   # the speed tricks on a recipe's model

The comparisons (project's way first, the alternative second):

1. im2col + one BLAS matrix multiply against the loop reference of tests/reference.py (conv2d_2, one image).
2. float32 against float64: a whole training step (forward, loss, backward, Adam) of the default model.
3. channels-last (NHWC, the project) against channels-first (NCHW, like PyTorch): conv2d_2 forward + backward.
4. col2im with one sliced `+=` per kernel offset against np.add.at: conv2d_2's shapes, and a whole epoch.
5. max pooling with running maxima and winner masks against argmax + scatter: maxpool2d_1.
6. ReLU's operation alone, x * (x > 0) against np.maximum(x, 0), on relu_1's input (the core now writes
   np.maximum(x, 0): 8d measures the difference over whole epochs).
7. Worker threads (parallel.DataParallel: one slice of each batch per CPU, one BLAS thread each) against one thread
   whose BLAS uses every CPU: training epochs of the default model. This one uses every CPU the process may
   use, whatever --threads says: it is about how to use them. Then the other side of the trade: on 8x8 digits,
   whose slices are small, the one thread parallel.default_workers chooses against as many workers as CPUs.
8. Speed tricks, each against the core's plain form, over whole training epochs of the default model, or of
   --config's (2,000 synthetic images, batch 32, the default worker threads), reported as the share of an epoch
   the trick saves. Taken out of src/main.py, so here the project's side is the plain core and the alternative
   the trick:
   a. column sums (bias gradients, BatchNorm's means, dgamma and dbeta): rows.sum(axis=0) against
      np.ones(M) @ rows;
   b. Conv2D's dx: one (N*Ho*Wo, k*k*C) product against one batched product per kernel offset, laid out so that
      col2im's slices are contiguous;
   c. im2col with one channel: the transposing copy against one copy per kernel offset;
   d. ReLU: np.maximum(x, 0) against x * (x > 0);
   e. MaxPool2D.backward: += against writing in place (np.multiply(..., out=)) when windows do not overlap;
   f. Adam: the textbook form, a temporary array per operation, against m, v and the weights updated in place
      through one scratch array.
   Kept in the core, so here the project's side is the trick and the alternative the plain form:
   g. arrays kept across training batches (Layer.kept_array: Conv2D's padded input, im2col columns, dcols and
      col2im output, MaxPool2D's dx) against a new array for each, every batch.
9. BLAS threads with one worker: training holds BLAS to one thread per worker thread (parallel.one_blas_thread
   for one worker, parallel.DataParallel for more); the alternative lets BLAS use 2 threads per worker. Training
   epochs of three configurations (8x8 digits with 1 worker; the default model on 28x28 with its default workers;
   the same with --workers 1), each on the machine as it is ("idle") and with one competing process that keeps a
   core busy; reported: the best setting's epoch and how much slower the project's setting is than the best
   (at most 1.5x is the goal).

How it measures: the machine may be shared and noisy, so the two sides ALTERNATE (project, alternative,
project, alternative, ...), each round timing enough calls to last a moment, and the report gives the median
of each side and the median of the pair-by-pair ratios (alternative / project: above 1, the project's way is
faster), with the range of those ratios as the spread. The speed tricks' epochs (8) also swap the order within
each pair every round. Every alternative is first checked to compute the same numbers as the project's code; a
mismatch stops the script with exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

ROOT = Path(__file__).resolve().parent.parent
for _folder in ("src", "tests", "bench"):  # main.py, the loop reference tests/reference.py, benchmark.py
    if str(ROOT / _folder) not in sys.path:
        sys.path.insert(0, str(ROOT / _folder))

import reference  # noqa: E402
from benchmark import available_cpus, cpu_model  # noqa: E402

import config_schema  # noqa: E402
import datafiles  # noqa: E402
import main  # noqa: E402
import parallel  # noqa: E402

BATCH = 32
SEED = 42
CONV1_INPUT = (BATCH, 28, 28, 1)  # conv2d_1: 32 filters, 3x3, padding 1
CONV2_INPUT = (BATCH, 14, 14, 32)  # conv2d_2: 64 filters, 3x3, padding 1
POOL1_INPUT = (BATCH, 28, 28, 32)  # maxpool2d_1 (2x2) and relu_1 see this shape


class MismatchError(Exception):
    """An alternative computed different numbers from the project's code: its timing would mean nothing."""


@dataclass
class Settings:
    rounds: int  # alternating pairs per comparison
    min_seconds: float  # each side of a pair repeats its call until it has run this long
    loop_images: int  # how many single images the loop reference computes (about 5 s each)
    loop_crop: int | None  # quick mode: the loop reference runs on a crop of the image, scaled up
    epoch_images: int  # training images of each epoch of the per-epoch comparisons (4, 7 and 8)
    epoch_rounds: int
    trick_rounds: int  # alternating pairs of epochs per speed trick (8)
    blas_images: int = 1000  # training images of each epoch of the BLAS thread comparison (9)
    blas_rounds: int = 5  # alternating pairs of epochs per configuration and load there
    trick_model: dict | None = None  # the model of the speed tricks' epochs (8): None, the default; else --config's


FULL = Settings(rounds=30, min_seconds=0.12, loop_images=2, loop_crop=None, epoch_images=2000, epoch_rounds=3,
                trick_rounds=15)
QUICK = Settings(rounds=3, min_seconds=0.01, loop_images=1, loop_crop=5, epoch_images=160, epoch_rounds=1,
                 trick_rounds=1, blas_images=BATCH, blas_rounds=1)


# ------------------------------------------------------------------------------------------------
# Timing: alternate the two sides, report medians and the ratios pair by pair
# ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One row of the final table: seconds per call of each side, one entry per alternating round."""

    choice: str  # the table's first column: "project's way vs alternative: where"
    project: str
    alternative: str
    project_seconds: list[float]
    alternative_seconds: list[float]
    unit: str = "ms"  # how the times are printed: "ms", "s" or "us"
    note: str = ""
    trick_side: str = ""  # for a speed trick (8): the side that uses it, "project" or "alternative"
    slowdown_limit: float = 0.0  # for 9: how much slower than the best side the project's may be (0: no limit)

    @property
    def ratios(self) -> list[float]:
        """alternative / project, pair by pair (above 1: the project's way is faster)."""
        return [a / p for p, a in zip(self.project_seconds, self.alternative_seconds)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    def spread(self) -> str:
        ratios = self.ratios
        if len(ratios) == 1:
            return "1 pair"
        return f"{show_ratio(min(ratios))}-{show_ratio(max(ratios))} ({len(ratios)} pairs)"

    @property
    def saved_shares(self) -> list[float]:
        """For a speed trick, pair by pair: the share of the epoch without the trick that the trick saves,
        (time without - time with) / time without (negative: the trick costs time)."""
        if self.trick_side == "alternative":
            return [1 - ratio for ratio in self.ratios]
        return [1 - 1 / ratio for ratio in self.ratios]

    @property
    def slowdown(self) -> float:
        """The project's median time over the best side's (1.0: the project's way is the best)."""
        project, alternative = statistics.median(self.project_seconds), statistics.median(self.alternative_seconds)
        return project / min(project, alternative)

    def savings(self) -> str:
        """'trick saves 2.7% of an epoch (pairs -0.4% to 5.1%)': the median share and the range of the pairs."""
        shares = self.saved_shares
        median = statistics.median(shares)
        text = f"trick saves {show_share(median)} of an epoch" if median >= 0 else \
            f"trick costs {show_share(-median)} of an epoch"
        if len(shares) == 1:
            return f"{text} (1 pair)"
        return f"{text} (pairs {show_share(min(shares))} to {show_share(max(shares))}, {len(shares)} pairs)"


def show_ratio(ratio: float) -> str:
    return f"{ratio:,.2f}" if ratio < 100 else f"{ratio:,.0f}"


def show_share(share: float) -> str:
    return f"{100 * share:.1f}%"


def show_time(seconds: float, unit: str) -> str:
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    value = seconds * scale
    digits = 3 if value < 10 else (1 if value < 1000 else 0)
    return f"{value:,.{digits}f} {unit}"


def seconds_per_call(function: Callable[[], object], calls: int) -> float:
    """Mean wall time of `calls` calls, with the garbage collector paused (as timeit does)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            function()
        return (time.perf_counter() - start) / calls
    finally:
        if collecting:
            gc.enable()


def calls_for(function: Callable[[], object], min_seconds: float) -> int:
    """How many calls last at least min_seconds (after one warm-up call, which allocates and starts threads)."""
    function()
    once = seconds_per_call(function, 1)
    return max(1, math.ceil(min_seconds / max(once, 1e-9)))


def alternate(project: Callable[[], object], alternative: Callable[[], object],
              settings: Settings) -> tuple[list[float], list[float]]:
    """Seconds per call of each side over settings.rounds rounds of project, alternative, project, ..."""
    project_calls = calls_for(project, settings.min_seconds)
    alternative_calls = calls_for(alternative, settings.min_seconds)
    project_seconds, alternative_seconds = [], []
    for _ in range(settings.rounds):
        project_seconds.append(seconds_per_call(project, project_calls))
        alternative_seconds.append(seconds_per_call(alternative, alternative_calls))
    return project_seconds, alternative_seconds


def report(result: Result) -> Result:
    """Print one comparison's medians, ratio and spread as soon as it is measured."""
    print(f"  {result.project}: median {show_time(statistics.median(result.project_seconds), result.unit)}")
    print(f"  {result.alternative}: median {show_time(statistics.median(result.alternative_seconds), result.unit)}")
    verdict = "faster" if result.ratio >= 1 else "SLOWER"
    print(f"  alternative / project: {show_ratio(result.ratio)} (the project's way is {verdict}); pair ratios "
          f"{result.spread()}")
    if result.note:
        print(f"  {result.note}")
    if result.trick_side:
        print(f"  {result.savings()}")
    return result


def check_close(what: str, actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """max |actual - expected| must be below tolerance times the largest |expected|."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise MismatchError(f"{what}: shape {actual.shape}, expected {expected.shape}")
    error = float(np.max(np.abs(actual.astype(np.float64) - expected))) / max(float(np.max(np.abs(expected))), 1e-30)
    if not error <= tolerance:
        raise MismatchError(f"{what}: relative difference {error:.2e} above {tolerance:.0e}")


def check_equal(what: str, actual: np.ndarray, expected: np.ndarray) -> None:
    if actual.shape != expected.shape or not np.array_equal(actual, expected):
        raise MismatchError(f"{what}: the two versions do not compute the same array")


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


# ------------------------------------------------------------------------------------------------
# 1. im2col + one BLAS multiply against the loop reference
# ------------------------------------------------------------------------------------------------


def check_loop_reference(conv: main.Conv2D, image: np.ndarray, grad_out: np.ndarray) -> None:
    """The project's Conv2D forward and backward on one image equal the loops of tests/reference.py."""
    W, b = conv.params["W"], conv.params["b"]
    expected_y = reference.conv2d_forward(image, W, b, conv.stride, conv.padding)
    expected_dx, expected_dW, expected_db = reference.conv2d_backward(image, W, grad_out, conv.stride, conv.padding)
    check_close("conv forward vs loops", conv.forward(image), expected_y, 1e-5)
    check_close("conv dx vs loops", conv.backward(grad_out), expected_dx, 1e-5)
    check_close("conv dW vs loops", conv.grads["W"], expected_dW, 1e-5)
    check_close("conv db vs loops", conv.grads["b"], expected_db, 1e-5)


def compare_loops(settings: Settings, rng: np.random.Generator) -> list[Result]:
    """conv2d_2 forward + backward, one image: loops against im2col + GEMM at batch 1 and at batch 32."""
    conv = main.Conv2D(CONV2_INPUT[3], 64, 3, 1, 1, rng=rng)
    x, grad_out = random_array(rng, CONV2_INPUT), random_array(rng, (*CONV2_INPUT[:3], 64))
    image, image_grad = x[:1], grad_out[:1]
    crop_scale = 1.0
    if settings.loop_crop:  # quick mode: a crop of the image, timed, then scaled by the number of output pixels
        size = settings.loop_crop
        image, image_grad = image[:, :size, :size], image_grad[:, :size, :size]
        crop_scale = (CONV2_INPUT[1] * CONV2_INPUT[2]) / (size * size)
    check_loop_reference(conv, image, image_grad)

    def loops() -> None:
        reference.conv2d_forward(image, conv.params["W"], conv.params["b"], 1, 1)
        reference.conv2d_backward(image, conv.params["W"], image_grad, 1, 1)

    def vectorised(batch: np.ndarray, batch_grad: np.ndarray) -> Callable[[], object]:
        return lambda: (conv.forward(batch), conv.backward(batch_grad))

    one_image = vectorised(x[:1], grad_out[:1])
    whole_batch = vectorised(x, grad_out)
    one_calls, batch_calls = calls_for(one_image, settings.min_seconds), calls_for(whole_batch, settings.min_seconds)
    loop_seconds, one_seconds, batch_seconds = [], [], []
    for _ in range(settings.loop_images):  # alternating, one slow loop image per round
        loop_seconds.append(seconds_per_call(loops, 1) * crop_scale)
        one_seconds.append(seconds_per_call(one_image, one_calls))
        batch_seconds.append(seconds_per_call(whole_batch, batch_calls) / BATCH)
    how = f"{len(loop_seconds)} single images, each alternated with the vectorised code"
    if len(loop_seconds) == 1:
        how = "1 single image, alternated with the vectorised code"
    if settings.loop_crop:
        how += f"; quick: the loops ran on a {settings.loop_crop}x{settings.loop_crop} crop, scaled x{crop_scale:.1f}"
    per_second = 1 / statistics.median(batch_seconds)
    print(f"  loop reference (tests/reference.py, float64 loops): {statistics.median(loop_seconds):.2f} s per image "
          f"({how})")
    print(f"  vectorised at batch 32: {1e3 * statistics.median(batch_seconds):.3f} ms per image, "
          f"{per_second:,.0f} images/s (forward + backward of conv2d_2)")
    return [
        report(Result("im2col + GEMM vs loops: conv2d_2 fwd+bwd, 1 image",
                      "im2col + GEMM, batch 1", "loops (tests/reference.py)", one_seconds, loop_seconds)),
        report(Result("  the same, per image at batch 32",
                      "im2col + GEMM, batch 32, per image", "loops (tests/reference.py)", batch_seconds,
                      loop_seconds, note=f"{per_second:,.0f} images/s through conv2d_2 forward + backward")),
    ]


# ------------------------------------------------------------------------------------------------
# 2. float32 against float64: a whole training step
# ------------------------------------------------------------------------------------------------


def default_model(dtype: type) -> main.Sequential:
    """The default model with the weights of seed 42, its weights and gradients converted to dtype."""
    model = main.build_model(config_schema.DEFAULT_CONFIG["model"], CONV1_INPUT[1:], 10, np.random.default_rng(SEED))
    for layer in model.layers:
        for name in layer.params:
            layer.params[name] = layer.params[name].astype(dtype)
            layer.grads[name] = np.zeros_like(layer.params[name])
    return model


def synthetic_batch(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic seven-segment digits as the project trains on them: float32 (n, 28, 28, 1) in [0, 1]."""
    images, labels = datafiles.make_synthetic(n, rng)
    return (images.astype(np.float32) / 255)[..., None], labels.astype(np.int64)


def training_step(model: main.Sequential, optimizer: main.Adam, x: np.ndarray, labels: np.ndarray) -> float:
    """What main.train does for one batch: forward, loss, backward, Adam."""
    loss_fn = main.SoftmaxCrossEntropy()
    loss = loss_fn.forward(model.forward(x), labels)
    model.backward(loss_fn.backward())
    optimizer.step(model)
    return loss


def check_dtypes(model32: main.Sequential, model64: main.Sequential, x: np.ndarray, labels: np.ndarray) -> None:
    """Both models give the same loss and gradients, and the float64 one really computes in float64."""
    losses, grads = [], []
    for model, dtype in ((model32, np.float32), (model64, np.float64)):
        loss_fn = main.SoftmaxCrossEntropy()
        logits = model.forward(x.astype(dtype))
        if logits.dtype != dtype:
            raise MismatchError(f"the {np.dtype(dtype).name} model computed logits in {logits.dtype}")
        losses.append(loss_fn.forward(logits, labels))
        model.backward(loss_fn.backward())
        grads.append([g.copy() for layer in model.layers for g in layer.grads.values()])
    check_close("float32 vs float64 loss", np.array(losses[0]), np.array(losses[1]), 1e-5)
    for index, (g32, g64) in enumerate(zip(*grads)):
        if g64.dtype != np.float64:
            raise MismatchError(f"a float64 gradient came out as {g64.dtype}")
        check_close(f"float32 vs float64 gradient {index}", g32, g64, 1e-3)


def compare_dtypes(settings: Settings, rng: np.random.Generator) -> list[Result]:
    x32, labels = synthetic_batch(BATCH, rng)
    x64 = x32.astype(np.float64)
    model32, model64 = default_model(np.float32), default_model(np.float64)
    check_dtypes(model32, model64, x32, labels)
    adam32, adam64 = main.Adam(1e-3), main.Adam(1e-3)  # Adam's state and scratch follow each param's dtype
    project, alternative = alternate(lambda: training_step(model32, adam32, x32, labels),
                                     lambda: training_step(model64, adam64, x64, labels), settings)
    if any(m.dtype != np.float64 for m in adam64.state.values()):
        raise MismatchError("Adam's float64 state is not float64")
    steps = math.ceil(5000 / BATCH)
    note = (f"per epoch of 5,000 images ({steps} steps, evaluation excluded): about "
            f"{steps * statistics.median(project):.1f} s vs {steps * statistics.median(alternative):.1f} s")
    return [report(Result("float32 vs float64: training step, batch 32", "float32", "float64",
                          project, alternative, note=note))]


# ------------------------------------------------------------------------------------------------
# 3. channels-last (the project) against channels-first, conv2d_2 forward + backward
# ------------------------------------------------------------------------------------------------


def nchw_im2col(x_padded: np.ndarray, kernel_size: int) -> np.ndarray:
    """Every k x k window of a channels-first (N, C, Hp, Wp) input, stride 1 -> (N, Ho, Wo, C, k, k), contiguous.

    One row per output pixel, like main.im2col. C comes before H and W in memory, so this copy gathers runs of
    k neighbouring numbers (3), where the project's im2col copies runs of C (32 in conv2d_2).
    """
    windows = sliding_window_view(x_padded, (kernel_size, kernel_size), axis=(2, 3))  # (N, C, Ho, Wo, k, k), a view
    return np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5))


def nchw_conv_forward(x: np.ndarray, weights: np.ndarray, bias: np.ndarray,
                      padding: int) -> tuple[np.ndarray, tuple[np.ndarray, tuple[int, ...]]]:
    """Channels-first convolution, stride 1, the same im2col + one GEMM as the project.

    x (N, C, H, W), weights (F, C, k, k) as in PyTorch -> y (N, F, Ho, Wo), and what backward needs.
    """
    n, channels, height, width = x.shape
    filters, _, k, _ = weights.shape
    x_padded = np.zeros((n, channels, height + 2 * padding, width + 2 * padding), dtype=x.dtype)
    x_padded[:, :, padding:padding + height, padding:padding + width] = x
    cols = nchw_im2col(x_padded, k)  # (N, Ho, Wo, C, k, k)
    _, out_h, out_w, _, _, _ = cols.shape
    y_rows = cols.reshape(n * out_h * out_w, -1) @ weights.reshape(filters, -1).T  # (N*Ho*Wo, F)
    y_rows += bias
    # The GEMM's rows are pixels and its columns filters: channels-first needs a transposing copy.
    y = np.ascontiguousarray(y_rows.reshape(n, out_h, out_w, filters).transpose(0, 3, 1, 2))
    return y, (cols, x_padded.shape)


def nchw_conv_backward(grad_out: np.ndarray, cache: tuple[np.ndarray, tuple[int, ...]], weights: np.ndarray,
                       padding: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of nchw_conv_forward: (dx (N, C, H, W), dW (F, C, k, k), db (F,))."""
    cols, padded_shape = cache
    n, filters, out_h, out_w = grad_out.shape
    _, channels, k, _ = weights.shape
    grad_rows = np.ascontiguousarray(grad_out.transpose(0, 2, 3, 1)).reshape(-1, filters)  # transposing copy
    grad_weights = (grad_rows.T @ cols.reshape(len(grad_rows), -1)).reshape(weights.shape)
    grad_bias = np.ones(len(grad_rows), dtype=grad_rows.dtype) @ grad_rows
    # grad_cols one kernel offset at a time, (k*k, N*Ho*Wo, C), as the project computes it.
    weights_by_offset = weights.reshape(filters, channels, k * k).transpose(2, 0, 1)  # (k*k, F, C)
    grad_cols = np.matmul(grad_rows, weights_by_offset).reshape(k, k, n, out_h, out_w, channels)
    grad_padded = np.zeros(padded_shape, dtype=grad_out.dtype)
    for di in range(k):
        for dj in range(k):
            grad_padded[:, :, di:di + out_h, dj:dj + out_w] += grad_cols[di, dj].transpose(0, 3, 1, 2)
    height, width = padded_shape[2] - 2 * padding, padded_shape[3] - 2 * padding
    return grad_padded[:, :, padding:padding + height, padding:padding + width], grad_weights, grad_bias


def check_nchw(conv: main.Conv2D, x: np.ndarray, grad_out: np.ndarray) -> None:
    """The channels-first version computes the project's numbers, transposed."""
    weights = np.ascontiguousarray(conv.params["W"].transpose(3, 2, 0, 1))  # (k, k, C, F) -> (F, C, k, k)
    y, cache = nchw_conv_forward(x.transpose(0, 3, 1, 2), weights, conv.params["b"], conv.padding)
    dx, dW, db = nchw_conv_backward(np.ascontiguousarray(grad_out.transpose(0, 3, 1, 2)), cache, weights,
                                    conv.padding)
    expected_y = conv.forward(x)
    expected_dx = conv.backward(grad_out)
    check_close("NCHW forward", y.transpose(0, 2, 3, 1), expected_y, 1e-5)
    check_close("NCHW dx", dx.transpose(0, 2, 3, 1), expected_dx, 1e-5)
    check_close("NCHW dW", dW.transpose(2, 3, 1, 0), conv.grads["W"], 1e-5)
    check_close("NCHW db", db, conv.grads["b"], 1e-5)
    x_padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    check_equal("NCHW im2col", nchw_im2col(x_padded.transpose(0, 3, 1, 2), 3),
                main.im2col(x_padded, 3, 1).transpose(0, 1, 2, 5, 3, 4))


def compare_layouts(settings: Settings, rng: np.random.Generator) -> list[Result]:
    conv = main.Conv2D(CONV2_INPUT[3], 64, 3, 1, 1, rng=rng)
    x, grad_out = random_array(rng, CONV2_INPUT), random_array(rng, (*CONV2_INPUT[:3], 64))
    check_nchw(conv, x, grad_out)
    # A channels-first network hands every layer channels-first arrays: convert once, outside the timing.
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    grad_nchw = np.ascontiguousarray(grad_out.transpose(0, 3, 1, 2))
    weights = np.ascontiguousarray(conv.params["W"].transpose(3, 2, 0, 1))

    def channels_first() -> None:
        _, cache = nchw_conv_forward(x_nchw, weights, conv.params["b"], conv.padding)
        nchw_conv_backward(grad_nchw, cache, weights, conv.padding)

    def channels_first_by_transposes() -> None:
        """What the transposes alone cost: channels-first arrays in and out, the project's Conv2D inside."""
        y = conv.forward(np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)))
        np.ascontiguousarray(y.transpose(0, 3, 1, 2))
        dx = conv.backward(np.ascontiguousarray(grad_nchw.transpose(0, 2, 3, 1)))
        np.ascontiguousarray(dx.transpose(0, 3, 1, 2))

    def channels_last() -> None:
        conv.forward(x)
        conv.backward(grad_out)

    project, alternative = alternate(channels_last, channels_first, settings)
    results = [report(Result("NHWC vs NCHW: conv2d_2 fwd+bwd", "NHWC (Conv2D)",
                             "NCHW, the same im2col + GEMM written channels-first", project, alternative))]
    project, alternative = alternate(channels_last, channels_first_by_transposes, settings)
    results.append(report(Result("  NCHW by 4 transposes around Conv2D", "NHWC (Conv2D)",
                                 "NCHW in and out, transposed to NHWC around Conv2D", project, alternative)))
    # Where the rest of the difference comes from: im2col's copy, on conv2d_2's padded input.
    x_padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x_padded_nchw = np.ascontiguousarray(x_padded.transpose(0, 3, 1, 2))
    project, alternative = alternate(lambda: main.im2col(x_padded, 3, 1), lambda: nchw_im2col(x_padded_nchw, 3),
                                     settings)
    results.append(report(Result("  im2col's copy alone", "main.im2col (runs of 32)", "NCHW im2col (runs of 3)",
                                 project, alternative)))
    return results


# ------------------------------------------------------------------------------------------------
# 4. col2im: sliced += per kernel offset against np.add.at
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def scatter_index(grad_cols_shape: tuple[int, ...], padded_shape: tuple[int, ...], stride: int) -> np.ndarray:
    """For every entry of the gradient columns, in (k, k, N, Ho, Wo, C) order, its flat position in the padded
    input (N, Hp, Wp, C): where im2col copied it from. Built once per shape (cached)."""
    n, out_h, out_w, k, _, channels = grad_cols_shape
    _, padded_h, padded_w, _ = padded_shape
    offset = np.arange(k)
    sample = np.arange(n).reshape(1, 1, n, 1, 1, 1)
    row = offset.reshape(k, 1, 1, 1, 1, 1) + stride * np.arange(out_h).reshape(1, 1, 1, out_h, 1, 1)
    col = offset.reshape(1, k, 1, 1, 1, 1) + stride * np.arange(out_w).reshape(1, 1, 1, 1, out_w, 1)
    channel = np.arange(channels).reshape(1, 1, 1, 1, 1, channels)
    return ((sample * padded_h + row) * padded_w + col) * channels + channel


def col2im_add_at(grad_cols: np.ndarray, padded_shape: tuple[int, ...], stride: int,
                  out: np.ndarray | None = None) -> np.ndarray:
    """main.col2im done with np.add.at: one unbuffered scatter-add of every entry to where it came from.

    The entries go in (k, k, N, Ho, Wo, C) order, which is how Conv2D.backward lays them out in memory, and
    which adds each pixel's contributions in the same order as main.col2im (so the sums are bit for bit equal).
    """
    index = scatter_index(grad_cols.shape, tuple(padded_shape), stride)
    grad_x = np.zeros(padded_shape, dtype=grad_cols.dtype)
    np.add.at(grad_x.reshape(-1), index, grad_cols.transpose(3, 4, 0, 1, 2, 5))
    return grad_x


@contextlib.contextmanager
def col2im_replaced_by(function: Callable) -> Iterator[None]:
    """main.col2im is `function` inside the block (Conv2D.backward looks it up in main at every call)."""
    original = main.col2im
    main.col2im = function
    try:
        yield
    finally:
        main.col2im = original


def conv2_grad_cols(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, ...], int]:
    """The arguments conv2d_2's backward really passes to col2im at batch 32 (recorded from a real call)."""
    conv = main.Conv2D(CONV2_INPUT[3], 64, 3, 1, 1, rng=rng)
    recorded = []

    def record(grad_cols: np.ndarray, padded_shape: tuple[int, ...], stride: int,
               out: np.ndarray | None = None) -> np.ndarray:
        recorded.append((grad_cols, tuple(padded_shape), stride))
        return np.zeros(padded_shape, dtype=grad_cols.dtype)

    with col2im_replaced_by(record):
        conv.forward(random_array(rng, CONV2_INPUT))
        conv.backward(random_array(rng, (*CONV2_INPUT[:3], 64)))
    return recorded[0]


def check_col2im(grad_cols: np.ndarray, padded_shape: tuple[int, ...], stride: int) -> None:
    """np.add.at gives exactly main.col2im's sums."""
    check_equal("col2im with np.add.at", col2im_add_at(grad_cols, padded_shape, stride),
                main.col2im(grad_cols, padded_shape, stride))


def synthetic_dataset(n_train: int, n_test: int, rng: np.random.Generator) -> main.Dataset:
    x, y = synthetic_batch(n_train + n_test, rng)
    return main.Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], main.DIGIT_NAMES, "synthetic",
                        "synthetic", "bench/why_fast.py")


def epoch_model(data: main.Dataset, model_cfg: dict | None = None) -> main.Sequential:
    """The default model (or model_cfg's) for data's image size, with the weights (and Dropout masks) of seed 42."""
    return main.build_model(model_cfg or config_schema.DEFAULT_CONFIG["model"], data.input_shape, 10,
                            np.random.default_rng(SEED), np.random.default_rng(SEED + 1))


def epoch(data: main.Dataset, workers: int | None = None, model_cfg: dict | None = None) -> dict:
    """One epoch of main.train from the seed-42 weights; its history row ("seconds" excludes evaluation)."""
    model = epoch_model(data, model_cfg)
    if workers is None:
        workers = parallel.default_workers(model, BATCH)
    return main.train(model, main.Adam(1e-3), data, epochs=1, batch_size=BATCH,
                      rng=np.random.default_rng(SEED), workers=workers).history[0]


def digits_dataset() -> main.Dataset:
    """scikit-learn's 8x8 digits: 1,400 to train on, 100 to test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = (digits.images / 16).astype(np.float32)[..., None], digits.target.astype(np.int64)
    return main.Dataset(images[:1400], labels[:1400], images[1400:1500], labels[1400:1500], main.DIGIT_NAMES,
                        "digits", "sklearn", "bench/why_fast.py")


def compare_col2im(settings: Settings, rng: np.random.Generator) -> list[Result]:
    grad_cols, padded_shape, stride = conv2_grad_cols(rng)
    check_col2im(grad_cols, padded_shape, stride)
    scatter_index(grad_cols.shape, padded_shape, stride)  # built before the timing
    project, alternative = alternate(lambda: main.col2im(grad_cols, padded_shape, stride),
                                     lambda: col2im_add_at(grad_cols, padded_shape, stride), settings)
    results = [report(Result("col2im += vs np.add.at: conv2d_2, batch 32", "col2im (9 sliced +=)", "np.add.at",
                             project, alternative))]

    data = synthetic_dataset(settings.epoch_images, 100, rng)
    warm_up = synthetic_dataset(10 * BATCH, 100, rng)
    epoch(warm_up)
    with col2im_replaced_by(col2im_add_at):
        epoch(warm_up)  # also builds the index arrays of a full batch
    project_epochs, alternative_epochs = [], []
    for _ in range(settings.epoch_rounds):
        project_epochs.append(epoch(data))
        with col2im_replaced_by(col2im_add_at):
            alternative_epochs.append(epoch(data))
    # The same seed and bit-for-bit equal gradients: both runs must train identically.
    for a, b in zip(project_epochs, alternative_epochs):
        check_close("training loss with np.add.at", np.array(b["train_loss"]), np.array(a["train_loss"]), 1e-6)
    results.append(report(Result(f"col2im += vs np.add.at: epoch of {settings.epoch_images:,} images",
                                 "main.col2im", "np.add.at", [row["seconds"] for row in project_epochs],
                                 [row["seconds"] for row in alternative_epochs], unit="s")))
    return results


# ------------------------------------------------------------------------------------------------
# 5. max pooling: winner masks against argmax + scatter
# ------------------------------------------------------------------------------------------------


def argmax_pool_forward(x: np.ndarray, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """Max pooling (stride = pool) by copying every window into a last axis and taking np.argmax there.

    x (N, H, W, C) -> y (N, Ho, Wo, C), and the winner's position 0..pool*pool-1 in each window (the first
    maximum in row-major order, as np.argmax picks the first).
    """
    windows = sliding_window_view(x, (pool, pool), axis=(1, 2))[:, ::pool, ::pool]  # (N, Ho, Wo, C, pool, pool)
    windows = windows.reshape(*windows.shape[:4], pool * pool)  # the copy: (N, Ho, Wo, C, pool*pool)
    winner = np.argmax(windows, axis=-1)[..., None]
    return np.take_along_axis(windows, winner, axis=-1)[..., 0], winner


def argmax_pool_backward(grad_out: np.ndarray, winner: np.ndarray, input_shape: tuple[int, ...],
                         pool: int) -> np.ndarray:
    """Scatter each window's gradient to its winner, then lay the windows back out as an image."""
    n, out_h, out_w, channels = grad_out.shape
    grad_windows = np.zeros((n, out_h, out_w, channels, pool * pool), dtype=grad_out.dtype)
    np.put_along_axis(grad_windows, winner, grad_out[..., None], axis=-1)
    grad_in = np.zeros(input_shape, dtype=grad_out.dtype)
    grad_in[:, :out_h * pool, :out_w * pool, :] = (
        grad_windows.reshape(n, out_h, out_w, channels, pool, pool).transpose(0, 1, 4, 2, 5, 3)
        .reshape(n, out_h * pool, out_w * pool, channels))
    return grad_in


def check_pooling(x: np.ndarray, grad_out: np.ndarray) -> None:
    """Same maxima and same gradients as MaxPool2D on tie-free inputs."""
    layer = main.MaxPool2D(2)
    y, winner = argmax_pool_forward(x, 2)
    check_equal("argmax pooling forward", y, layer.forward(x))
    check_equal("argmax pooling backward", argmax_pool_backward(grad_out, winner, x.shape, 2),
                layer.backward(grad_out))


def compare_pooling(settings: Settings, rng: np.random.Generator) -> list[Result]:
    # Standard normal float32: ties inside a 2x2 window practically never happen (both versions pick the
    # first maximum anyway).
    x = random_array(rng, POOL1_INPUT)
    grad_out = random_array(rng, (BATCH, 14, 14, POOL1_INPUT[3]))
    check_pooling(x, grad_out)
    layer = main.MaxPool2D(2)

    def argmax_version() -> None:
        _, winner = argmax_pool_forward(x, 2)
        argmax_pool_backward(grad_out, winner, x.shape, 2)

    project, alternative = alternate(lambda: (layer.forward(x), layer.backward(grad_out)), argmax_version, settings)
    return [report(Result("winner masks vs argmax: maxpool2d_1 fwd+bwd", "MaxPool2D",
                          "argmax + put_along_axis", project, alternative))]


# ------------------------------------------------------------------------------------------------
# 6. ReLU: x * (x > 0) against np.maximum(x, 0)
# ------------------------------------------------------------------------------------------------


def check_relu(x: np.ndarray) -> None:
    """x * (x > 0) is np.maximum(x, 0) (its -0.0 for negative x equals 0)."""
    check_equal("np.maximum(x, 0) vs x * (x > 0)", np.maximum(x, 0), x * (x > 0))


def compare_relu(settings: Settings, rng: np.random.Generator) -> list[Result]:
    x = random_array(rng, POOL1_INPUT)
    check_relu(x)
    project, alternative = alternate(lambda: x * (x > 0), lambda: np.maximum(x, 0), settings)
    return [report(Result("x * (x > 0) vs np.maximum(x, 0): relu_1", "x * (x > 0)",
                          "np.maximum(x, 0)", project, alternative, unit="us"))]


# ------------------------------------------------------------------------------------------------
# 7. worker threads (DataParallel) against BLAS threads alone, on the same CPUs
# ------------------------------------------------------------------------------------------------


def check_workers(x: np.ndarray, labels: np.ndarray, workers: int) -> None:
    """Slices of the batch on worker threads give the whole batch's loss and gradients (float32 rounding)."""
    model = default_model(np.float32)
    loss_fn = main.SoftmaxCrossEntropy()
    expected_loss = loss_fn.forward(model.forward(x), labels)
    model.backward(loss_fn.backward())
    expected = [grad.copy() for layer in model.layers for grad in layer.grads.values()]
    with parallel.DataParallel(model, workers) as net:
        loss = loss_fn.forward(net.forward(x), labels)
        net.backward(loss_fn.backward())
    check_close("loss with worker threads", np.array(loss), np.array(expected_loss), 1e-5)
    grads = [grad for layer in model.layers for grad in layer.grads.values()]
    for index, (grad, want) in enumerate(zip(grads, expected)):
        check_close(f"gradient {index} with worker threads", grad, want, 1e-4)


def compare_workers(settings: Settings, rng: np.random.Generator) -> list[Result]:
    from threadpoolctl import threadpool_limits

    cpus = available_cpus()
    if cpus < 2:
        print("  skipped: this process may use only one CPU")
        return []
    x, labels = synthetic_batch(BATCH, rng)
    check_workers(x, labels, cpus)
    data, warm_up = synthetic_dataset(settings.epoch_images, 100, rng), synthetic_dataset(10 * BATCH, 100, rng)
    project, alternative = [], []
    with threadpool_limits(limits=cpus):  # BLAS may use every CPU (DataParallel holds it to 1 while it runs)
        workers = parallel.default_workers(epoch_model(data), BATCH)  # what training picks: at most 3 at batch 32
        epoch(warm_up, workers)
        epoch(warm_up, 1)
        for _ in range(settings.epoch_rounds):
            project.append(epoch(data, workers)["seconds"])
            alternative.append(epoch(data, 1)["seconds"])
        results = [report(Result(f"worker threads vs BLAS threads: epoch of {settings.epoch_images:,} images",
                                 f"{workers} workers x 1 BLAS thread", f"1 thread, BLAS {cpus} threads", project,
                                 alternative, unit="s"))]
        # Small images make small slices, where threads cost more than they save: parallel.default_workers then
        # keeps training on one thread. The alternative forces the workers anyway.
        digits = digits_dataset()
        workers = parallel.default_workers(epoch_model(digits), BATCH)
        epoch(digits, workers)
        epoch(digits, cpus)
        project, alternative = [], []
        for _ in range(3 * settings.epoch_rounds):  # these epochs are short: more rounds
            project.append(epoch(digits, workers)["seconds"])
            alternative.append(epoch(digits, cpus)["seconds"])
    results.append(report(Result(f"default workers vs {cpus} workers: 8x8 digits epoch",
                                 f"{workers} worker (default_workers)", f"{cpus} workers", project, alternative,
                                 unit="s")))
    return results


# ------------------------------------------------------------------------------------------------
# 8. speed tricks: each against the core's plain form, over whole training epochs
# ------------------------------------------------------------------------------------------------
# src/main.py writes each backward pass as its formula reads, and keeps a speed trick only where it is worth a
# real share of an epoch. The tricks below were taken out of the core (a-f) or kept (g). Each one is an
# alternative implementation of one method or function of main, patched in for the alternative side's epochs and
# restored afterwards. The copies of a core method (a, b, e) differ from it only in the trick's lines (marked):
# when the core method changes, change them too (the equivalence check notices only a change of the numbers).

CORE_IM2COL = main.im2col  # the core's im2col, which trick c calls for inputs with more than one channel


def column_sums(rows: np.ndarray) -> np.ndarray:
    """Trick a: rows.sum(axis=0), (M, C) -> (C,), as the product ones(M) @ rows, which BLAS computes, instead of
    NumPy's reduction."""
    return np.ones(len(rows), dtype=rows.dtype) @ rows


def conv_backward_bias_by_ones(self: main.Conv2D, grad_out: np.ndarray) -> np.ndarray | None:
    """Conv2D.backward with trick a: db = ones @ grad_rows."""
    filters, p = grad_out.shape[3], self.padding
    grad_rows = grad_out.reshape(-1, filters)  # (N*Ho*Wo, F)
    cols = self.cols.reshape(grad_rows.shape[0], -1)  # (N*Ho*Wo, k*k*C)
    weights = self.params["W"].reshape(cols.shape[1], filters)  # (k*k*C, F)
    self.grads["W"][...] = (cols.T @ grad_rows).reshape(self.params["W"].shape)
    self.grads["b"][...] = column_sums(grad_rows)  # the trick
    if not self.need_input_grad:
        return None
    grad_cols = np.matmul(grad_rows, weights.T, out=self.kept_array("grad_cols", cols.shape, cols.dtype))
    grad_padded = main.col2im(grad_cols.reshape(self.cols.shape), self.padded_shape, self.stride,
                              out=self.kept_array("grad_padded", self.padded_shape, cols.dtype))
    height, width = self.padded_shape[1] - 2 * p, self.padded_shape[2] - 2 * p
    return grad_padded[:, p:p + height, p:p + width, :]


def dense_backward_bias_by_ones(self: main.Dense, grad_out: np.ndarray) -> np.ndarray | None:
    """Dense.backward with trick a: db = ones @ grad_out."""
    self.grads["W"][...] = self.x.T @ grad_out
    self.grads["b"][...] = column_sums(grad_out)  # the trick
    if not self.need_input_grad:
        return None
    return grad_out @ self.params["W"].T


def batch_mean_by_ones(self: main.BatchNorm, rows: np.ndarray) -> np.ndarray:
    """BatchNorm.batch_mean with trick a: ones @ rows / M."""
    return column_sums(rows) / len(rows)


def batchnorm_backward_sums_by_ones(self: main.BatchNorm, grad_out: np.ndarray) -> np.ndarray | None:
    """BatchNorm.backward with trick a: dgamma and dbeta as ones @ rows."""
    grad_rows = grad_out.reshape(self.xhat.shape)  # (M, C)
    self.grads["gamma"][...] = column_sums(grad_rows * self.xhat)  # the trick
    self.grads["beta"][...] = column_sums(grad_rows)  # the trick
    if not self.need_input_grad:
        return None
    grad_in = self.params["gamma"] * self.inv_std * (
        grad_rows - self.batch_mean(grad_rows) - self.xhat * self.batch_mean(grad_rows * self.xhat))
    return grad_in.reshape(grad_out.shape)


def conv_backward_dx_per_kernel_offset(self: main.Conv2D, grad_out: np.ndarray) -> np.ndarray | None:
    """Conv2D.backward with trick b: grad_cols = grad_out @ W^T as one batched product per kernel offset,
    (k*k, N*Ho*Wo, C), viewed as (N, Ho, Wo, k, k, C), so that each of col2im's k*k slices is one contiguous
    block, instead of one (N*Ho*Wo, k*k*C) product."""
    filters, p = grad_out.shape[3], self.padding
    grad_rows = grad_out.reshape(-1, filters)  # (N*Ho*Wo, F)
    cols = self.cols.reshape(grad_rows.shape[0], -1)  # (N*Ho*Wo, k*k*C)
    self.grads["W"][...] = (cols.T @ grad_rows).reshape(self.params["W"].shape)
    self.grads["b"][...] = grad_rows.sum(axis=0)
    if not self.need_input_grad:
        return None
    n, out_h, out_w, k, _, channels = self.cols.shape
    weights_by_offset = self.params["W"].reshape(k * k, channels, filters).transpose(0, 2, 1)  # (k*k, F, C)
    grad_cols = np.matmul(grad_rows, weights_by_offset)  # the trick: (k*k, N*Ho*Wo, C)
    grad_cols = grad_cols.reshape(k, k, n, out_h, out_w, channels).transpose(2, 3, 4, 0, 1, 5)
    grad_padded = main.col2im(grad_cols, self.padded_shape, self.stride,
                              out=self.kept_array("grad_padded", self.padded_shape, grad_cols.dtype))
    height, width = self.padded_shape[1] - 2 * p, self.padded_shape[2] - 2 * p
    return grad_padded[:, p:p + height, p:p + width, :]


def im2col_one_channel_by_offsets(x_padded: np.ndarray, kernel_size: int, stride: int,
                                  out: np.ndarray | None = None) -> np.ndarray:
    """main.im2col with trick c: with one channel (grey images into the first layer), one copy per kernel offset,
    each moving rows of Wo numbers, instead of the transposing copy, which moves one number at a time there."""
    if x_padded.shape[3] > 1:
        return CORE_IM2COL(x_padded, kernel_size, stride, out)
    windows = sliding_window_view(x_padded, (kernel_size, kernel_size), axis=(1, 2))[:, ::stride, ::stride]
    cols = np.empty((*windows.shape[:3], kernel_size, kernel_size, 1), dtype=x_padded.dtype) if out is None else out
    for di in range(kernel_size):
        for dj in range(kernel_size):
            cols[:, :, :, di, dj, :] = windows[:, :, :, :, di, dj]
    return cols


def relu_forward_by_multiply(self: main.ReLU, x: np.ndarray, training: bool = True) -> np.ndarray:
    """ReLU.forward with trick d: x * (x > 0), reusing the mask backward needs, instead of np.maximum(x, 0).
    The same numbers for finite x (a negative x gives -0.0, which equals 0)."""
    positive = x > 0
    if training:
        self.positive = positive
    return x * positive


def maxpool_backward_in_place(self: main.MaxPool2D, grad_out: np.ndarray) -> np.ndarray:
    """MaxPool2D.backward with trick e: when the windows do not overlap, each offset's gradient is written
    straight into its slice of grad_in (np.multiply(..., out=)), with no temporary and no addition."""
    out_h, out_w = grad_out.shape[1:3]
    grad_in = self.kept_array("grad_in", self.x_shape, grad_out.dtype)
    grad_in[...] = 0
    overlapping = self.stride < self.pool_size
    for offset, row_slice, col_slice in self._offsets(out_h, out_w):
        if overlapping:
            grad_in[:, row_slice, col_slice, :] += grad_out * self.winner[offset]
        else:  # the trick
            np.multiply(grad_out, self.winner[offset], out=grad_in[:, row_slice, col_slice, :])
    return grad_in


def adam_step_textbook(self: main.Adam, model: main.Sequential) -> None:
    """Adam.step without trick f: the docstring's formula as it reads, a new temporary array for each operation."""
    self.decay_weights(model)
    self.t += 1
    b1, b2 = self.beta1, self.beta2
    for key, param, grad in main.parameters(model):
        m = self.state[f"{key}.m"] = b1 * self.slot(f"{key}.m", param) + (1 - b1) * grad
        v = self.state[f"{key}.v"] = b2 * self.slot(f"{key}.v", param) + (1 - b2) * grad ** 2
        m_hat = m / (1 - b1 ** self.t)
        v_hat = v / (1 - b2 ** self.t)
        param -= self.learning_rate * m_hat / (np.sqrt(v_hat) + self.eps)


def fresh_array(self: main.Layer, name: str, shape: tuple[int, ...], dtype: Any, keep: bool = True) -> np.ndarray:
    """Layer.kept_array in its plain form: a new array for every batch, as the layers allocated them before trick
    g (zeros for the padded input, whose border must be zero; uninitialised for the arrays that are written
    whole or zeroed by the layer itself)."""
    return np.zeros(shape, dtype) if name == "x_padded" else np.empty(shape, dtype)


@dataclass(frozen=True)
class SpeedTrick:
    """One speed trick, and where the alternative side's code goes: `alternative` replaces attribute
    `attribute` of `owner` (a class of main, or main itself) during the alternative side's epochs."""

    label: str  # the summary row: "a. bias gradient: ..."
    project: str  # what the project's side runs
    alternative: str  # what the alternative side runs
    owner: Any
    attribute: str
    replacement: Callable
    in_core: bool = False  # True: the project's side is the trick and the alternative the plain form (g)
    more: tuple[tuple[Any, str, Callable], ...] = ()  # further (owner, attribute, replacement) patched alike

    @property
    def letter(self) -> str:
        return self.label[0]


SPEED_TRICKS = [
    SpeedTrick("a. column sums: rows.sum(axis=0) vs ones @ rows", "rows.sum(axis=0)",
               "np.ones(M) @ rows (bias gradients, BatchNorm's means and dgamma, dbeta)", main.Conv2D, "backward",
               conv_backward_bias_by_ones, more=((main.Dense, "backward", dense_backward_bias_by_ones),
                                                 (main.BatchNorm, "batch_mean", batch_mean_by_ones),
                                                 (main.BatchNorm, "backward", batchnorm_backward_sums_by_ones))),
    SpeedTrick("b. conv dx: one product vs one per kernel offset", "grad_rows @ W.reshape(k*k*C, F).T",
               "np.matmul per kernel offset, contiguous for col2im", main.Conv2D, "backward",
               conv_backward_dx_per_kernel_offset),
    SpeedTrick("c. im2col, one channel: transposing copy vs copy per offset", "one transposing copy",
               "one copy per kernel offset when C = 1", main, "im2col", im2col_one_channel_by_offsets),
    SpeedTrick("d. ReLU: np.maximum(x, 0) vs x * (x > 0)", "np.maximum(x, 0)", "x * (x > 0)", main.ReLU,
               "forward", relu_forward_by_multiply),
    SpeedTrick("e. max pool backward: += vs in-place np.multiply", "grad_in[slice] += grad_out * winner",
               "np.multiply(grad_out, winner, out=grad_in[slice])", main.MaxPool2D, "backward",
               maxpool_backward_in_place),
    SpeedTrick("f. Adam: in place vs textbook temporaries", "in place through a scratch array (main.Adam)",
               "textbook: m = b1*m + (1-b1)*g, ..., a temporary per operation", main.Adam, "step",
               adam_step_textbook, in_core=True),
    SpeedTrick("g. kept buffers: arrays kept across batches vs new per batch",
               "Conv2D's padded input, columns, dcols, dx_padded and MaxPool2D's dx kept (Layer.kept_array)",
               "a new array for each, every batch", main.Layer, "kept_array", fresh_array, in_core=True),
]


@contextlib.contextmanager
def replaced(owner: Any, attribute: str, replacement: Any) -> Iterator[None]:
    """owner.attribute is `replacement` inside the block, and its old value again after it."""
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        setattr(owner, attribute, original)


@contextlib.contextmanager
def alternative_side(trick: SpeedTrick, replacement: Callable | None = None) -> Iterator[None]:
    """The block in which main runs the alternative side of the trick (with `replacement` for the trick's first
    patch, if given)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(replaced(trick.owner, trick.attribute, replacement or trick.replacement))
        for owner, attribute, more in trick.more:
            stack.enter_context(replaced(owner, attribute, more))
        yield


def gradients_of_one_batch(x: np.ndarray, labels: np.ndarray) -> tuple[float, list[np.ndarray]]:
    """The default model (seed 42 weights): the loss of one batch and a copy of every gradient."""
    model = default_model(np.float32)
    loss_fn = main.SoftmaxCrossEntropy()
    loss = loss_fn.forward(model.forward(x), labels)
    model.backward(loss_fn.backward())
    return loss, [grad.copy() for layer in model.layers for grad in layer.grads.values()]


def adam_steps(steps: int, seed: int) -> tuple[main.Adam, list[np.ndarray], list[np.ndarray]]:
    """`steps` Adam steps on the default model, with gradients drawn from seed at every step (the same ones on
    each call): the optimiser, the weights before and the weights after."""
    model, adam, rng = default_model(np.float32), main.Adam(1e-3), np.random.default_rng(seed)
    before = [param.copy() for _, param, _ in main.parameters(model)]
    for _ in range(steps):
        for _, param, grad in main.parameters(model):
            grad[...] = rng.standard_normal(param.shape) * rng.choice([1e-6, 1e-3, 1.0])
        adam.step(model)
    return adam, before, [param.copy() for _, param, _ in main.parameters(model)]


def check_speed_trick(trick: SpeedTrick, x: np.ndarray, labels: np.ndarray) -> None:
    """Both sides of the trick compute the same numbers (float32 rounding apart), and the alternative side's
    code really runs. For a-e and g: the default model's loss and every gradient on one batch. For f: three Adam steps
    from the same gradients give the same m, v and weight updates."""
    calls = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return trick.replacement(*args, **kwargs)

    what = f"speed trick {trick.label}"
    if trick.owner is main.Adam:
        adam, before, after = adam_steps(3, SEED)
        with replaced(trick.owner, trick.attribute, counted):
            other, other_before, other_after = adam_steps(3, SEED)
        if calls:
            for key, value in adam.state.items():
                check_close(f"{what}: Adam's {key}", other.state[key], value, 1e-5)
            for index, (w0, w1, v0, v1) in enumerate(zip(before, after, other_before, other_after)):
                # An update is about the learning rate, and a float32 weight rounds to about 1e-4 of it.
                check_close(f"{what}: update of weight {index}", v1.astype(np.float64) - v0,
                            w1.astype(np.float64) - w0, 1e-3)
    else:
        loss, grads = gradients_of_one_batch(x, labels)
        with alternative_side(trick, counted):
            other_loss, other_grads = gradients_of_one_batch(x, labels)
        if calls:
            check_close(f"{what}: loss", np.array(other_loss), np.array(loss), 1e-5)
            for index, (grad, want) in enumerate(zip(other_grads, grads)):
                check_close(f"{what}: gradient {index}", grad, want, 1e-4)
    if not calls:
        raise MismatchError(f"{what}: the alternative code never ran (does the core still call "
                            f"{trick.attribute}?)")


def compare_speed_tricks(settings: Settings, rng: np.random.Generator) -> list[Result]:
    """For each trick, whole epochs of the default model or settings.trick_model (main.train, Adam 1e-3, default
    workers), the two sides alternating and swapping their order every round, so that a drifting machine speed
    favours neither."""
    x, labels = synthetic_batch(BATCH, rng)
    for trick in SPEED_TRICKS:  # every check before any timing
        check_speed_trick(trick, x, labels)
    data = synthetic_dataset(settings.epoch_images, 100, rng)
    warm_up = synthetic_dataset(10 * BATCH, 100, rng)
    model_cfg = settings.trick_model
    workers = parallel.default_workers(epoch_model(data, model_cfg), BATCH)  # what epoch() and training use
    print(f"  {'the default model' if model_cfg is None else 'the model of --config'}: "
          f"epochs of {settings.epoch_images:,} synthetic images, batch {BATCH}, {workers} worker thread"
          f"{'s' if workers > 1 else ''} (parallel.default_workers); {settings.trick_rounds} pairs per trick")
    epoch(warm_up, model_cfg=model_cfg)
    results = []
    for trick in SPEED_TRICKS:
        print(f"  {trick.label}", flush=True)
        with alternative_side(trick):
            epoch(warm_up, model_cfg=model_cfg)
        project_epochs, alternative_epochs = [], []
        for round_number in range(settings.trick_rounds):
            sides = [(project_epochs, contextlib.nullcontext()), (alternative_epochs, alternative_side(trick))]
            for epochs, side in sides[::-1] if round_number % 2 else sides:
                gc.collect()
                with side:
                    epochs.append(epoch(data, model_cfg=model_cfg))
        for project_row, alternative_row in zip(project_epochs, alternative_epochs):  # the same training
            check_close(f"speed trick {trick.label}: training loss of an epoch",
                        np.array(alternative_row["train_loss"]), np.array(project_row["train_loss"]), 1e-3)
        results.append(report(Result(
            trick.label, trick.project, trick.alternative, [row["seconds"] for row in project_epochs],
            [row["seconds"] for row in alternative_epochs], unit="s",
            trick_side="project" if trick.in_core else "alternative")))
    return results


# ------------------------------------------------------------------------------------------------
# 9. BLAS threads with one worker: the project's one BLAS thread per worker against two, idle and busy
# ------------------------------------------------------------------------------------------------
# With one training worker, a second BLAS thread gains little on these small matrices, and when the other core is
# busy the two BLAS threads wait for each other, spinning: epochs many times slower. Training
# therefore holds BLAS to one thread per worker. Here each configuration trains with that setting and with two
# BLAS threads per worker, alternating, once on the machine as it is and once beside a process that keeps a core
# busy; the project's setting must stay within MAX_SLOWDOWN of the faster of the two.

MAX_SLOWDOWN = 1.5
ALTERNATIVE_BLAS_THREADS = 2


@contextlib.contextmanager
def training_blas_threads(threads: int) -> Iterator[None]:
    """main.train with BLAS held to `threads` threads per worker instead of the project's one: on one worker
    (one_blas_thread, which main imports from parallel) and on several (parallel.DataParallel, whose __enter__
    sets the limit)."""
    from threadpoolctl import threadpool_limits

    @contextlib.contextmanager
    def blas_threads_for_one_worker(model: main.Sequential) -> Iterator[main.Sequential]:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield model

    project_enter = parallel.DataParallel.__enter__

    def enter_with_blas_threads(self: parallel.DataParallel) -> parallel.DataParallel:
        net = project_enter(self)
        self.blas_limit.restore_original_limits()
        self.blas_limit = threadpool_limits(limits=threads, user_api="blas")
        return net

    with replaced(main, "one_blas_thread", blas_threads_for_one_worker), \
            replaced(parallel.DataParallel, "__enter__", enter_with_blas_threads):
        yield


def blas_side(threads: int | None) -> contextlib.AbstractContextManager[None]:
    """The block in which main.train runs the project's setting (None) or `threads` BLAS threads per worker."""
    return contextlib.nullcontext() if threads is None else training_blas_threads(threads)


def blas_threads_while_training(data: main.Dataset, workers: int, threads: int | None) -> set[int]:
    """The BLAS thread counts in force while main.train runs the layers (one batch), on the given side."""
    seen: set[int] = set()
    project_forward = main.Dense.forward

    def recording_forward(self: main.Dense, x: np.ndarray, training: bool = True) -> np.ndarray:
        seen.add(parallel.blas_threads())
        return project_forward(self, x, training)

    small = main.Dataset(data.x_train[:BATCH], data.y_train[:BATCH], data.x_test[:BATCH],
                         data.y_test[:BATCH], data.class_names, data.name, data.source, data.note)
    with replaced(main.Dense, "forward", recording_forward), blas_side(threads):
        main.train(epoch_model(small), main.Adam(1e-3), small, epochs=1, batch_size=BATCH,
                   rng=np.random.default_rng(SEED), workers=workers)
    return seen


def check_blas_sides(data: main.Dataset, workers: int) -> None:
    """The project's side trains with one BLAS thread per worker and the alternative with two, as the report says
    (were training to stop calling parallel.one_blas_thread or DataParallel, the patch would change nothing)."""
    for threads, expected in ((None, 1), (ALTERNATIVE_BLAS_THREADS, ALTERNATIVE_BLAS_THREADS)):
        seen = blas_threads_while_training(data, workers, threads)
        if seen != {expected}:
            side = "the project's setting" if threads is None else f"the alternative ({threads} BLAS threads)"
            raise MismatchError(f"BLAS threads with {workers} worker{'s' if workers > 1 else ''}: {side} trained "
                                f"with {sorted(seen)} BLAS threads, expected {expected}")


@contextlib.contextmanager
def busy_core() -> Iterator[Any]:
    """One competing process, a tight Python loop that keeps one core busy, for as long as the block runs (the
    block gets its subprocess.Popen)."""
    import subprocess

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.2)  # started and spinning
        if spinner.poll() is not None:
            raise RuntimeError("the busy process ended at once")
        yield spinner
    finally:
        spinner.kill()
        spinner.wait()


def blas_epoch_seconds(data: main.Dataset, workers: int, threads: int | None) -> float:
    """One training epoch (main.train, the default model from the seed-42 weights, batch 32) on the given side;
    its seconds leave out the evaluation."""
    with blas_side(threads):
        row = main.train(epoch_model(data), main.Adam(1e-3), data, epochs=1, batch_size=BATCH,
                         rng=np.random.default_rng(SEED), workers=workers).history[0]
    return row["seconds"]


def compare_blas_threads(settings: Settings, rng: np.random.Generator) -> list[Result]:
    from threadpoolctl import threadpool_limits

    cpus = available_cpus()
    digits, images = digits_dataset(), synthetic_dataset(settings.blas_images, 100, rng)
    n = min(settings.blas_images, len(digits.x_train))
    digits = main.Dataset(digits.x_train[:n], digits.y_train[:n], digits.x_test, digits.y_test, digits.class_names,
                          digits.name, digits.source, digits.note)
    results = []
    # BLAS may use every CPU, as in a user's process; training then holds it to one thread per worker.
    with threadpool_limits(limits=max(cpus, ALTERNATIVE_BLAS_THREADS)):
        default_workers = parallel.default_workers(epoch_model(images), BATCH)  # what training picks for 28x28
        configurations = [
            ("8x8 digits, 1 worker", digits, 1),
            (f"default model 28x28, default workers ({default_workers})", images, default_workers),
            ("default model 28x28, --workers 1", images, 1),
        ]
        print(f"  {n:,} 8x8 digits or {settings.blas_images:,} synthetic 28x28 images per epoch, batch {BATCH}; "
              f"{settings.blas_rounds} pair{'s' if settings.blas_rounds > 1 else ''} of epochs per configuration "
              f"and load; {cpus} CPUs usable")
        for label, data, workers in configurations:
            check_blas_sides(data, workers)
            for load, competing in (("idle", contextlib.nullcontext), ("busy", busy_core)):
                with competing():
                    if settings.blas_rounds > 1:  # warm-up: allocations, worker threads, BLAS threads
                        blas_epoch_seconds(data, workers, None)
                        blas_epoch_seconds(data, workers, ALTERNATIVE_BLAS_THREADS)
                    project, alternative = [], []
                    for _ in range(settings.blas_rounds):
                        project.append(blas_epoch_seconds(data, workers, None))
                        alternative.append(blas_epoch_seconds(data, workers, ALTERNATIVE_BLAS_THREADS))
                note = ("the machine as it is" if load == "idle" else "beside one process that keeps a core busy")
                result = Result(f"BLAS 1 vs {ALTERNATIVE_BLAS_THREADS} threads: {label}, {load}",
                                "1 BLAS thread per worker", f"{ALTERNATIVE_BLAS_THREADS} BLAS threads per worker",
                                project, alternative, unit="s", note=note, slowdown_limit=MAX_SLOWDOWN)
                results.append(report(result))
                print(f"  best: {show_time(min(map(statistics.median, (project, alternative))), 's')}; the "
                      f"project's setting is {result.slowdown:.2f}x the best (limit {MAX_SLOWDOWN}x)", flush=True)
    return results


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def blas_description() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS unknown (pip install threadpoolctl)"
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return "; ".join(f"{p['internal_api']} {p['version']} ({p.get('architecture', '?')}), {p['num_threads']} "
                     "threads" for p in pools) or "no BLAS found by threadpoolctl"


def machine_description() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{cpu_model()}, {cpus} CPUs usable{load}; Python {platform.python_version()}, NumPy {np.__version__}, "
            f"BLAS {blas_description()}; {time.strftime('%Y-%m-%d %H:%M')}")


def table(results: list[Result]) -> str:
    """The summary: one row per comparison, times per call (medians), ratio and its spread."""
    header = ("design choice: project's way vs alternative", "project", "alternative", "alt / project",
              "range of pair ratios")
    rows = [header] + [(r.choice, show_time(statistics.median(r.project_seconds), r.unit),
                        show_time(statistics.median(r.alternative_seconds), r.unit),
                        show_ratio(r.ratio), r.spread()) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def tricks_table(results: list[Result]) -> str:
    """The speed tricks' rows (8): the share of an epoch each one saves, median and range over the pairs."""
    header = ("speed trick", "in the core", "saves (median)", "range over the pairs")
    rows = [header]
    for result in results:
        if result.trick_side:
            shares = result.saved_shares
            pairs = "1 pair" if len(shares) == 1 else f"{len(shares)} pairs"
            rows.append((result.choice, "yes" if result.trick_side == "project" else "no",
                         show_share(statistics.median(shares)),
                         f"{show_share(min(shares))} to {show_share(max(shares))} ({pairs})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def blas_table(results: list[Result]) -> str:
    """The BLAS rows (9): the best setting's epoch and the project's setting's time over it, against the limit."""
    header = ("configuration, load", "project's setting", "best setting", "best epoch", "project / best",
              "within limit")
    rows = [header]
    for result in results:
        if result.slowdown_limit:
            project = statistics.median(result.project_seconds)
            alternative = statistics.median(result.alternative_seconds)
            best = result.project if project <= alternative else result.alternative
            rows.append((result.choice.split(": ", 1)[1], result.project, best,
                         show_time(min(project, alternative), result.unit), f"{result.slowdown:.2f}x",
                         f"{'yes' if round(result.slowdown, 2) <= result.slowdown_limit else 'NO'} "
                         f"(<= {result.slowdown_limit:g}x)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i < 3 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


COMPARISONS = [
    ("1. im2col + one BLAS multiply vs the loop reference (conv2d_2, one image)", compare_loops),
    ("2. float32 vs float64 (one training step of the default model, batch 32)", compare_dtypes),
    ("3. channels-last vs channels-first (conv2d_2 forward + backward, batch 32)", compare_layouts),
    ("4. col2im: sliced += per kernel offset vs np.add.at (conv2d_2, batch 32; and one epoch)", compare_col2im),
    ("5. max pooling: winner masks vs argmax + scatter (maxpool2d_1 forward + backward, batch 32)", compare_pooling),
    ("6. ReLU: x * (x > 0) vs np.maximum(x, 0) on (32, 28, 28, 32)", compare_relu),
    ("7. worker threads vs BLAS threads alone (training epochs of the default model, every usable CPU)",
     compare_workers),
    ("8. speed tricks: each against the core's plain form, over whole training epochs", compare_speed_tricks),
    ("9. BLAS threads with one worker: 1 vs 2 BLAS threads per worker, idle and beside a busy process",
     compare_blas_threads),
]


def selected_comparisons(name: str | None) -> list[tuple[str, Callable[[Settings, np.random.Generator],
                                                                        list[Result]]]]:
    """Every comparison; the one numbered `name` (a number); or those whose title contains name (case ignored)."""
    if name is None:
        return COMPARISONS
    name = name.strip()
    if name.isdigit():
        return [(title, compare) for title, compare in COMPARISONS if title.split(".", 1)[0] == name]
    return [(title, compare) for title, compare in COMPARISONS if name.lower() in title.lower()]


def run(settings: Settings, comparisons: list | None = None) -> list[Result]:
    rng = np.random.default_rng(SEED)
    results: list[Result] = []
    for title, compare in COMPARISONS if comparisons is None else comparisons:
        print(f"\n{title}", flush=True)
        results += compare(settings, rng)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure each design choice of docs/HOW_IT_WORKS.md ('Why it is fast') against its "
                    "alternative, on the default model's shapes at batch 32. Run from the project root.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds (numbers only rough)")
    parser.add_argument("--threads", type=int, help="BLAS threads (default: what NumPy's BLAS picks)")
    parser.add_argument("--only", metavar="NAME",
                        help="run only the comparison with this number, or whose title contains NAME "
                             "(e.g. 8 or 'speed tricks')")
    parser.add_argument("--config", metavar="FILE", help="the speed tricks (8) train this config's model (for "
                        "28x28 images) instead of the default one; its other settings are not used")
    return parser


def main_cli(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.config:
        from benchmark import load_recipe

        from errors import CNNError

        try:
            settings = dataclasses.replace(settings, trick_model=load_recipe(args.config)["model"])
        except CNNError as error:
            parser.error(str(error))
    comparisons = selected_comparisons(args.only)
    if not comparisons:
        parser.error(f"--only {args.only}: no comparison has that number or a title containing it")
    limits = contextlib.nullcontext()
    if args.threads:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(limits=args.threads)
    with limits:
        print(f"numpy-cnn: why it is fast ({'quick smoke run' if args.quick else 'full run'}: "
              f"{settings.rounds} alternating rounds per comparison)")
        print(f"machine: {machine_description()}")
        start = time.perf_counter()
        try:
            results = run(settings, comparisons)
        except MismatchError as error:
            print(f"error: an alternative disagrees with the project's code: {error}", file=sys.stderr)
            return 1
        print(f"\nSummary: medians per call; 'alt / project' is the median of the pair-by-pair ratios "
              f"(above 1: the project's way is faster)\n\n{table(results)}")
        if any(result.trick_side for result in results):
            print(f"\nSpeed tricks: the share of an epoch each trick saves, (epoch without it - epoch with it) / "
                  f"epoch without it, pair by pair\n\n{tricks_table(results)}")
        if any(result.slowdown_limit for result in results):
            print(f"\nBLAS threads with one worker: the best setting's median epoch, and the project's setting's "
                  f"median epoch over it (the goal: at most {MAX_SLOWDOWN}x)\n\n{blas_table(results)}")
        print(f"\nmachine: {machine_description()}")
        command = " ".join(["python bench/why_fast.py", *sys.argv[1:]])
        print(f"total {time.perf_counter() - start:.0f} s; `{command}`")
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
