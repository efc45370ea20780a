"""numpy-cnn: a convolutional neural network from scratch in NumPy, trained on MNIST.

Read it top to bottom, like a chapter of a textbook:
  1. Layers: Conv2D, MaxPool2D, AvgPool2D, ReLU, Tanh, Flatten, Dense, BatchNorm, Dropout, each with its
     forward and backward pass side by side.
  2. Loss: softmax cross-entropy.
  3. Model: Sequential, which chains the layers (forward in order, backward in reverse), and build_model, which
     makes them from the config's layer list.
  4. Optimisers: SGD with momentum, Adam, weight decay, learning-rate schedules.
  5. Data: MNIST, Fashion-MNIST, scikit-learn's digits or your own images, with labelled synthetic digits when
     offline; shifts, rotations and flips that augment it.
  6. Training: the loop of forward -> loss -> backward -> step.
  7. The gradient check, which proves every backward pass right with central differences.
  8. The configuration file and the command line.
The machinery around it (worker threads, profiling, model files, image files, the config schema, logging and
signals, pictures) lives in the sibling modules of src/, which never import this one.

Conventions used everywhere:
- Images are channels-last arrays of shape (N, H, W, C), as in Keras: N samples, H x W pixels, C channels.
- Everything is float32 (float64 only in gradient checks): half the memory traffic of float64, and faster.
- Every layer has `forward(x, training=True) -> y` and `backward(grad_out) -> grad_in`, where
  `grad_out` is dLoss/dy and `grad_in` is dLoss/dx. Weights live in `params`, their gradients in `grads`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

import checkpoints
import config_schema
import plumbing
from config_schema import layer_name_and_arguments
from datafiles import OPENML_NAMES, check_dataset_name, download_openml, load_cache, load_idx_folder, make_synthetic
from errors import CNNError, ConfigError, DataError
from exports import check_exports, write_exports
from folders import check_dataset_flag, load_folder, uses_folder
from images import report_predictions
from modelfile import continue_from, load_model, model_meta
from outputs import check_outputs, write_outputs
from parallel import DataParallel, default_workers, one_blas_thread
from plumbing import ProgressBar
from profiling import instrument, profile_table

DTYPE = np.float32
# Evaluation runs in batches of 32 images: the arrays stay in the CPU's caches, and the im2col columns of
# the second conv layer take a 30th of the memory they would for batches of 1,000.
EVAL_BATCH_SIZE = 32
log = logging.getLogger("numpy_cnn")


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


class Layer:
    """What every layer has: `params` and `grads`, dicts with the same keys (empty for a layer without
    weights), `buffers` (usually empty), and the three methods below."""

    # A layer with weights skips dLoss/dx when this is False (Sequential sets it on its first such layer).
    need_input_grad = True

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}  # state that is saved but not trained (BatchNorm's statistics)
        self.workspace: dict[str, np.ndarray] = {}  # arrays kept from one training batch to the next (kept_array)

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """y for input x; when training, also keep what backward will need."""
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray) -> np.ndarray | None:
        """dLoss/dx from dLoss/dy (grad_out), storing dLoss/dweights in self.grads."""
        raise NotImplementedError

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of y for an input of this shape, both without the batch axis."""
        return input_shape

    def kept_array(self, name: str, shape: tuple[int, ...], dtype: Any, keep: bool = True) -> np.ndarray:
        """np.zeros(shape, dtype), but with keep (training) made once: later calls with this name, shape and dtype
        get that array back as it was left, not megabytes allocated per batch (bench/why_fast.py: "kept buffers")."""
        if not keep:
            return np.zeros(shape, dtype)
        array = self.workspace.get(name)
        if array is None or array.shape != shape or array.dtype != dtype:
            array = self.workspace[name] = np.zeros(shape, dtype)
        return array


def he_normal(shape: tuple[int, ...], fan_in: int, rng: np.random.Generator) -> np.ndarray:
    """He initialisation: mean 0, variance 2 / fan_in (standard deviation sqrt(2 / fan_in)), which keeps the
    activations' variance steady through ReLU layers (a ReLU zeroes half of them, so the weights make up 2x)."""
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(DTYPE)


def im2col(x_padded: np.ndarray, kernel_size: int, stride: int, out: np.ndarray | None = None) -> np.ndarray:
    """Every k x k x C window of the (already padded) input, one window per row.

    x_padded: (N, Hp, Wp, C) -> cols: (N, Ho, Wo, k, k, C), contiguous (written into `out` if given), so that
    `cols.reshape(N * Ho * Wo, k * k * C) @ W.reshape(k * k * C, F)` is the whole convolution.
    """
    # sliding_window_view builds a view of all windows without copying; [::stride] keeps the strided ones.
    windows = sliding_window_view(x_padded, (kernel_size, kernel_size), axis=(1, 2))[:, ::stride, ::stride]
    # (N, Ho, Wo, C, k, k) -> (N, Ho, Wo, k, k, C): the copy happens here, once.
    if out is None:
        return np.ascontiguousarray(windows.transpose(0, 1, 2, 4, 5, 3))
    np.copyto(out, windows.transpose(0, 1, 2, 4, 5, 3))
    return out


def col2im(grad_cols: np.ndarray, padded_shape: tuple[int, ...], stride: int,
           out: np.ndarray | None = None) -> np.ndarray:
    """The adjoint of im2col: add every window's gradient back where the window came from.

    grad_cols: (N, Ho, Wo, k, k, C) -> grad_x_padded: padded_shape (N, Hp, Wp, C) (into `out`, if given).
    Windows overlap when stride < k, so contributions must be summed, not assigned. One sliced `+=`
    per kernel offset (k * k of them) is vectorised over all samples and pixels (np.add.at, which adds one
    element at a time, is far slower: bench/why_fast.py, "col2im").
    """
    _, out_h, out_w, kernel_size, _, _ = grad_cols.shape
    grad_x = np.empty(padded_shape, dtype=grad_cols.dtype) if out is None else out
    grad_x[...] = 0  # the windows' gradients are added up from here
    for di in range(kernel_size):
        for dj in range(kernel_size):
            # The input pixels that offset (di, dj) of every window read: rows di, di + s, ..., likewise columns.
            row_slice = slice(di, di + stride * (out_h - 1) + 1, stride)
            col_slice = slice(dj, dj + stride * (out_w - 1) + 1, stride)
            grad_x[:, row_slice, col_slice, :] += grad_cols[:, :, :, di, dj, :]
    return grad_x


class Conv2D(Layer):
    """2-D convolution (cross-correlation, as in every framework), zero padding, any stride.

    Input (N, H, W, C) -> output (N, Ho, Wo, F), Ho = (H + 2p - k) // s + 1 (same for Wo).
    params: W (k, k, C, F), b (F,).
    Forward:  y = im2col(pad(x)) @ W + b.
    Backward: dW = cols^T @ grad_out,  db = sum(grad_out),  dx = crop(col2im(grad_out @ W^T))
              (None when need_input_grad is False).
    """

    def __init__(
        self,
        in_channels: int,
        filters: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        rng: np.random.Generator | None = None,
    ) -> None:
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        fan_in = kernel_size * kernel_size * in_channels
        self.params = {
            "W": he_normal((kernel_size, kernel_size, in_channels, filters), fan_in, rng),
            "b": np.zeros(filters, dtype=DTYPE),
        }
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}

    def output_shape(self, input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        height, width, _ = input_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        return (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1, self.params["W"].shape[3]

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        n, height, width, channels = x.shape
        k, p = self.kernel_size, self.padding
        out_h, out_w, _ = self.output_shape(x.shape[1:])
        # Training keeps the padded input and the columns from batch to batch (pad(x)'s zero border is never written).
        if p > 0:
            x_padded = self.kept_array("x_padded", (n, height + 2 * p, width + 2 * p, channels), x.dtype, training)
            x_padded[:, p:p + height, p:p + width, :] = x
        else:
            x_padded = x
        cols_shape = (n, out_h, out_w, k, k, channels)
        cols = im2col(x_padded, k, self.stride, self.kept_array("cols", cols_shape, x.dtype, training))
        weights = self.params["W"].reshape(k * k * channels, -1)  # (k*k*C, F)
        y = cols.reshape(n * out_h * out_w, -1) @ weights  # (N*Ho*Wo, F)
        y += self.params["b"]
        if training:
            self.cols, self.padded_shape = cols, x_padded.shape
        return y.reshape(n, out_h, out_w, -1)

    def backward(self, grad_out: np.ndarray) -> np.ndarray | None:
        filters, p = grad_out.shape[3], self.padding
        grad_rows = grad_out.reshape(-1, filters)  # (N*Ho*Wo, F)
        cols = self.cols.reshape(grad_rows.shape[0], -1)  # (N*Ho*Wo, k*k*C)
        weights = self.params["W"].reshape(cols.shape[1], filters)  # (k*k*C, F)
        self.grads["W"][...] = (cols.T @ grad_rows).reshape(self.params["W"].shape)
        self.grads["b"][...] = grad_rows.sum(axis=0)
        if not self.need_input_grad:
            return None
        grad_cols = np.matmul(grad_rows, weights.T, out=self.kept_array("grad_cols", cols.shape, cols.dtype))
        grad_padded = col2im(grad_cols.reshape(self.cols.shape), self.padded_shape, self.stride,
                             out=self.kept_array("grad_padded", self.padded_shape, cols.dtype))
        height, width = self.padded_shape[1] - 2 * p, self.padded_shape[2] - 2 * p
        # The padding zeros are constants, not inputs: their gradients are dropped.
        return grad_padded[:, p:p + height, p:p + width, :]


class Pooling(Layer):
    """What max and average pooling share: pool x pool windows moved by `stride` over each channel, 'valid'
    (leftover rows/columns are dropped). Input (N, H, W, C) -> output (N, Ho, Wo, C), Ho = (H - pool) // stride + 1.
    stride defaults to pool (non-overlapping windows); stride < pool gives overlapping windows."""

    def __init__(self, pool_size: int = 2, stride: int | None = None) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.stride = stride if stride is not None else pool_size

    def output_shape(self, input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        height, width, channels = input_shape
        return (height - self.pool_size) // self.stride + 1, (width - self.pool_size) // self.stride + 1, channels

    def _offsets(self, out_h: int, out_w: int) -> Iterator[tuple[int, slice, slice]]:
        """For each offset (di, dj) of the window, in row-major order: its number and the strided slices
        that pick, for all output pixels at once, the input pixel at that offset of their window."""
        s = self.stride
        for di in range(self.pool_size):
            for dj in range(self.pool_size):
                row_slice = slice(di, di + s * (out_h - 1) + 1, s)
                col_slice = slice(dj, dj + s * (out_w - 1) + 1, s)
                yield di * self.pool_size + dj, row_slice, col_slice


class MaxPool2D(Pooling):
    """Max pooling: y = the maximum of each window, per channel (see Pooling for the shapes).

    Backward: each window's gradient goes to the one input that was its maximum; with ties, to the
    first maximum in row-major order. (A mask `x == max` would send it to every tied input, and ties
    are common: after a ReLU, a window of the MNIST background is four exact zeros.)
    """

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        out_h, out_w, _ = self.output_shape(x.shape[1:])
        # Loop over the pool*pool offsets (not over pixels): each step handles every window at once.
        offsets = list(self._offsets(out_h, out_w))
        _, row_slice, col_slice = offsets[0]
        y = x[:, row_slice, col_slice, :].copy()
        for _, row_slice, col_slice in offsets[1:]:
            np.maximum(y, x[:, row_slice, col_slice, :], out=y)
        if training:
            # winner[k]: the window's maximum sits at offset k and no earlier offset had it (first max wins).
            self.winner = np.empty((self.pool_size ** 2, *y.shape), dtype=bool)
            unclaimed = np.ones(y.shape, dtype=bool)
            for offset, row_slice, col_slice in offsets[:-1]:
                is_max = np.equal(x[:, row_slice, col_slice, :], y, out=self.winner[offset])
                is_max &= unclaimed
                unclaimed ^= is_max
            # The maximum that no earlier offset had is at the last one (or the window holds a NaN, which
            # ends training anyway).
            self.winner[-1] = unclaimed
            self.x_shape = x.shape
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        out_h, out_w = grad_out.shape[1:3]
        grad_in = self.kept_array("grad_in", self.x_shape, grad_out.dtype)
        grad_in[...] = 0
        for offset, row_slice, col_slice in self._offsets(out_h, out_w):
            # += rather than =: with stride < pool, two windows can share an input pixel, and both gradients count.
            grad_in[:, row_slice, col_slice, :] += grad_out * self.winner[offset]
        return grad_in


class AvgPool2D(Pooling):
    """Average pooling: y = the mean of each window, per channel (see Pooling for the shapes), as in LeNet-5.

    Forward:  y[n, i, j, c] = sum over the window's offsets (di, dj) of x[n, i*s + di, j*s + dj, c] / pool^2.
    Backward: every input of a window gets grad_out / pool^2 of it; where windows overlap, these add up.
    """

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        out_h, out_w, _ = self.output_shape(x.shape[1:])
        y = np.zeros((x.shape[0], out_h, out_w, x.shape[3]), dtype=x.dtype)
        for _, row_slice, col_slice in self._offsets(out_h, out_w):  # each step adds one pixel to every window
            y += x[:, row_slice, col_slice, :]
        y /= self.pool_size ** 2
        if training:
            self.x_shape = x.shape
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        out_h, out_w = grad_out.shape[1:3]
        share = grad_out / self.pool_size ** 2  # what each input of a window gets
        grad_in = np.zeros(self.x_shape, dtype=grad_out.dtype)
        for _, row_slice, col_slice in self._offsets(out_h, out_w):
            grad_in[:, row_slice, col_slice, :] += share  # += : overlapping windows share input pixels
        return grad_in


class ReLU(Layer):
    """y = max(x, 0), elementwise, any shape. Backward: dx = grad_out * (x > 0)."""

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        if training:
            self.positive = x > 0
        return np.maximum(x, 0)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * self.positive


class Tanh(Layer):
    """y = tanh(x), elementwise, any shape (LeNet-5's squashing function). Backward: dx = grad_out * (1 - y^2)."""

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        y = np.tanh(x)
        if training:
            self.y = y
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * (1 - self.y * self.y)


class Flatten(Layer):
    """(N, H, W, C) -> (N, H*W*C). Backward reshapes the gradient back."""

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int]:
        return (math.prod(input_shape),)

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        if training:
            self.x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out.reshape(self.x_shape)


class Dense(Layer):
    """Fully connected layer: (N, in_features) -> (N, units), y = x @ W + b.

    params: W (in_features, units), b (units,).
    Backward: dW = x^T @ grad_out,  db = sum over N of grad_out,  dx = grad_out @ W^T.
    """

    def __init__(self, in_features: int, units: int, *, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        rng = rng if rng is not None else np.random.default_rng()
        self.params = {"W": he_normal((in_features, units), in_features, rng), "b": np.zeros(units, dtype=DTYPE)}
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}

    def output_shape(self, input_shape: tuple[int]) -> tuple[int]:
        return (self.params["W"].shape[1],)

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        if training:
            self.x = x
        y = x @ self.params["W"]
        y += self.params["b"]
        return y

    def backward(self, grad_out: np.ndarray) -> np.ndarray | None:
        self.grads["W"][...] = self.x.T @ grad_out
        self.grads["b"][...] = grad_out.sum(axis=0)
        if not self.need_input_grad:
            return None
        return grad_out @ self.params["W"].T


class BatchNorm(Layer):
    """Batch normalisation (Ioffe & Szegedy, 2015) per channel: over (N, H, W) for (N, H, W, C) input after a
    conv layer, over N for (N, F) input after a dense layer (every axis but the last is normalised over).

    Input and output of the same shape; C (or F) = num_features; M = values per channel in the batch; mean()
    below is the mean over those M values.
    params: gamma (C,) = ones, beta (C,) = zeros. buffers (not trained, saved with the model): running_mean (C,)
    = zeros, running_var (C,) = ones.
    Forward, training:   mu = mean(x),  var = mean((x - mu)^2),  xhat = (x - mu) / sqrt(var + eps),
                         y = gamma * xhat + beta;
                         running_mean = (1 - momentum) * running_mean + momentum * mu, and running_var likewise
                         from the unbiased variance var * M / (M - 1), as PyTorch (momentum 0.1, eps 1e-5).
    Forward, evaluation: y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta.
    Backward, through the batch mean and variance:
        dgamma = sum(grad_out * xhat),  dbeta = sum(grad_out),
        dx = gamma / sqrt(var + eps) * (grad_out - mean(grad_out) - xhat * mean(grad_out * xhat)).
    """

    def __init__(self, num_features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.params = {"gamma": np.ones(num_features, dtype=DTYPE), "beta": np.zeros(num_features, dtype=DTYPE)}
        self.grads = {name: np.zeros_like(p) for name, p in self.params.items()}
        # Statistics of the training data, not weights: the optimiser never sees them.
        self.buffers = {"running_mean": np.zeros(num_features, dtype=DTYPE),
                        "running_var": np.ones(num_features, dtype=DTYPE)}

    def batch_mean(self, rows: np.ndarray) -> np.ndarray:
        """The mean of each column over the batch, (M, C) -> (C,). (On worker threads, parallel.py gives each
        replica a version that averages over every worker's slice: the whole batch's mean.)"""
        return rows.sum(axis=0) / len(rows)

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        gamma, beta = self.params["gamma"], self.params["beta"]
        rows = x.reshape(-1, x.shape[-1])  # (M, C): every value of a channel in one column
        if not training:
            xhat = (rows - self.buffers["running_mean"]) / np.sqrt(self.buffers["running_var"] + self.eps)
            return (gamma * xhat + beta).reshape(x.shape)
        mu = self.batch_mean(rows)
        centred = rows - mu
        var = self.batch_mean(centred * centred)
        inv_std = 1 / np.sqrt(var + self.eps)
        xhat = centred * inv_std
        self.update_running_statistics(mu, var, len(rows))
        self.xhat, self.inv_std = xhat, inv_std
        return (gamma * xhat + beta).reshape(x.shape)

    def update_running_statistics(self, mu: np.ndarray, var: np.ndarray, m: int) -> None:
        """running = (1 - momentum) * running + momentum * batch statistic, the variance unbiased. One value per
        channel (a last batch of one image, after a dense layer) says nothing of the spread: no update."""
        if m > 1:
            running, momentum = self.buffers, self.momentum
            running["running_mean"][...] = (1 - momentum) * running["running_mean"] + momentum * mu
            running["running_var"][...] = (1 - momentum) * running["running_var"] + momentum * var * m / (m - 1)

    def backward(self, grad_out: np.ndarray) -> np.ndarray | None:
        grad_rows = grad_out.reshape(self.xhat.shape)  # (M, C)
        self.grads["gamma"][...] = (grad_rows * self.xhat).sum(axis=0)
        self.grads["beta"][...] = grad_rows.sum(axis=0)
        if not self.need_input_grad:
            return None
        grad_in = self.params["gamma"] * self.inv_std * (
            grad_rows - self.batch_mean(grad_rows) - self.xhat * self.batch_mean(grad_rows * self.xhat))
        return grad_in.reshape(grad_out.shape)


class Dropout(Layer):
    """Inverted dropout: in training each value is kept with probability 1 - rate and scaled by 1 / (1 - rate),
    so that the expected output is the input; evaluation is the identity. Any shape.

    Forward, training:   mask = (u >= rate) / (1 - rate) with u uniform in [0, 1) from self.rng,  y = x * mask.
    Forward, evaluation: y = x.
    Backward:            dx = grad_out * mask.
    The mask of a training forward is, in this order: fixed_mask when set (kept, so that repeated forwards of a
    gradient check compute the same function); next_mask when set (used once: parallel.DataParallel draws the
    whole batch's mask and hands each worker its slice); else a new draw_mask(x.shape).
    """

    def __init__(self, rate: float, rng: np.random.Generator | None = None) -> None:
        super().__init__()
        if not 0 <= rate < 1:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.rng = rng if rng is not None else np.random.default_rng()
        self.fixed_mask: np.ndarray | None = None
        self.next_mask: np.ndarray | None = None

    def draw_mask(self, shape: tuple[int, ...], dtype: Any = DTYPE) -> np.ndarray:
        """A new mask from self.rng: 1 / (1 - rate) where kept, 0 where dropped."""
        keep = self.rng.random(shape) >= self.rate
        return np.divide(keep, 1 - self.rate, dtype=dtype)

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        if not training:
            return x
        if self.fixed_mask is not None:
            mask = self.fixed_mask
        elif self.next_mask is not None:
            mask, self.next_mask = self.next_mask, None
        else:
            mask = self.draw_mask(x.shape, x.dtype)
        if mask.shape != x.shape:  # a mask of the wrong shape would broadcast silently
            raise ValueError(f"Dropout mask of shape {mask.shape} for an input of shape {x.shape}")
        self.mask = mask
        return x * mask

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * self.mask


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log of the softmax, (N, K) -> (N, K): log p_k = z_k - log(sum_j exp(z_j)).

    Subtracting each row's max first changes nothing mathematically but keeps exp() from overflowing. Taking
    the log this way rather than as log(softmax) also keeps tiny probabilities: exp(-20000) is 0 in floating
    point, and log(0) would make a loss infinite where it is really 20000.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, (N, K) -> (N, K): probabilities p_k = exp(z_k) / sum_j exp(z_j), each row sums to 1."""
    return np.exp(log_softmax(logits))


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels.

    logits (N, K), labels (N,) -> loss = mean_n( logsumexp(logits_n) - logits_n[label_n] ).
    Backward: dLoss/dlogits = (softmax(logits) - onehot(labels)) / N.
    """

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        log_probs = log_softmax(logits)
        self.probs, self.labels = np.exp(log_probs), labels
        return float(-log_probs[np.arange(len(labels)), labels].mean())

    def backward(self) -> np.ndarray:
        grad = self.probs.copy()
        grad[np.arange(len(self.labels)), self.labels] -= 1
        return grad / len(self.labels)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


class Sequential:
    """A stack of layers applied in order; backward runs them in reverse (the chain rule).

    forward: x -> layers[0] -> layers[1] -> ... -> logits.
    backward: grad_logits -> layers[-1].backward -> ... -> layers[0].backward, each layer turning dLoss/dy into
    dLoss/dx and storing dLoss/dweights in its grads on the way.
    """

    def __init__(self, layers: list[Layer], input_shape: tuple[int, ...] | None = None) -> None:
        self.layers = layers
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.names = layer_names(layers)
        # Nothing upstream of the first layer with weights needs dLoss/dx: skipping it saves a col2im per batch.
        first = next((layer for layer in layers if layer.params), None)
        if first is not None:
            first.need_input_grad = False

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, grad_out: np.ndarray) -> np.ndarray | None:
        for layer in reversed(self.layers):
            grad_out = layer.backward(grad_out)
            if grad_out is None:  # the first layer with weights skipped dx: nothing below needs it
                break
        return grad_out

    def predict_proba(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Softmax probabilities (N, K), computed batch by batch so memory stays bounded."""
        if len(x) == 0:  # still K columns: as many as one (blank) image gets
            return np.zeros((0, self.forward(np.zeros((1, *x.shape[1:]), DTYPE), training=False).shape[1]), DTYPE)
        return np.concatenate([softmax(self.forward(x[start:start + batch_size], training=False))
                               for start in range(0, len(x), batch_size)])

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Predicted class per sample (N,)."""
        return self.predict_proba(x, batch_size).argmax(axis=1)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> tuple[float, float]:
        """(mean loss, accuracy) over the whole set, batch by batch."""
        loss_fn, total_loss, correct = SoftmaxCrossEntropy(), 0.0, 0
        for start in range(0, len(x), batch_size):
            logits = self.forward(x[start:start + batch_size], training=False)
            labels = y[start:start + batch_size]
            total_loss += loss_fn.forward(logits, labels) * len(labels)
            correct += int((logits.argmax(axis=1) == labels).sum())
        return total_loss / max(len(x), 1), correct / max(len(x), 1)

    def parameter_count(self) -> int:
        return sum(p.size for layer in self.layers for p in layer.params.values())

    def summary_rows(self) -> list[dict]:
        """One row per layer: name, output shape (without N) and number of weights."""
        shape, rows = self.input_shape, []
        for name, layer in zip(self.names, self.layers):
            shape = layer.output_shape(shape)
            rows.append({
                "layer": f"{name} ({type(layer).__name__})",
                "output_shape": list(shape),
                "parameters": int(sum(p.size for p in layer.params.values())),
            })
        return rows

    def summary(self) -> str:
        """A Keras-like table: layer, output shape, parameter count, and the total."""
        rows = self.summary_rows()
        lines = [f"{'Layer (type)':<24}{'Output shape':<18}{'Params':>10}", "-" * 52]
        lines += [f"{r['layer']:<24}{tuple(r['output_shape'])!s:<18}{r['parameters']:>10,}" for r in rows]
        lines += ["-" * 52, f"Total parameters: {self.parameter_count():,}  (input {self.input_shape})"]
        return "\n".join(lines)


def layer_names(layers: list[Layer]) -> list[str]:
    """conv2d_1, relu_1, maxpool2d_1, conv2d_2, ...: each layer's type, numbered within its type."""
    counts: dict[str, int] = {}
    names = []
    for layer in layers:
        kind = type(layer).__name__.lower()
        counts[kind] = counts.get(kind, 0) + 1
        names.append(f"{kind}_{counts[kind]}")
    return names


def build_model(model_cfg: dict, input_shape: tuple[int, int, int], num_classes: int, rng: np.random.Generator,
                dropout_rng: np.random.Generator | None = None) -> Sequential:
    """The layers of model_cfg["layers"] in order (each spelled as config_schema.check_layer returns it), with
    weights drawn from rng and Dropout masks from dropout_rng.

    Each layer's input shape is the previous layer's output, starting from input_shape (H, W, C). A layer that
    cannot take its input (a window larger than the image, a dense layer on an image, a conv layer on a vector)
    and a last layer that does not output num_classes values raise ConfigError naming the layer.
    """
    layers: list[Layer] = []
    shape = tuple(input_shape)
    for index, spec in enumerate(model_cfg["layers"]):
        name, arguments = layer_name_and_arguments(spec)
        layer = make_layer(name, arguments, shape, rng, dropout_rng, f"model.layers[{index}] ({name})")
        shape = layer.output_shape(shape)
        layers.append(layer)
    if shape != (num_classes,):
        raise ConfigError(f"model.layers: the last layer (model.layers[{len(layers) - 1}], {name}) "
                          f"outputs shape {shape}, but the data has {num_classes} classes: end with "
                          f"{{dense: {{units: {num_classes}}}}} (after a flatten)")
    return Sequential(layers, input_shape)


def make_layer(name: str, arguments: dict, shape: tuple[int, ...], rng: np.random.Generator,
               dropout_rng: np.random.Generator | None, where: str) -> Layer:
    """One layer of the config for an input of `shape` (without N), or ConfigError saying why it cannot be."""
    if name in ("conv2d", "maxpool2d", "avgpool2d") and len(shape) != 3:
        raise ConfigError(f"{where}: needs an image (H, W, C) as its input, but gets a vector of {shape[0]} "
                          "values: put it before the flatten")
    if name == "dense" and len(shape) != 1:
        raise ConfigError(f"{where}: gets a {'x'.join(map(str, shape))} image; put flatten before it to make it a "
                          f"vector of {math.prod(shape)} values")
    if name == "conv2d":
        k, p = arguments["kernel_size"], arguments["padding"]
        if k > shape[0] + 2 * p or k > shape[1] + 2 * p:
            raise ConfigError(f"{where}: kernel_size {k} is larger than its padded input {shape[0] + 2 * p}x"
                              f"{shape[1] + 2 * p} (input {shape[0]}x{shape[1]}, padding {p})")
        plumbing.check_weights_fit(k * k * shape[2] * arguments["filters"], where)
        return Conv2D(shape[2], arguments["filters"], k, arguments["stride"], p, rng=rng)
    if name in ("maxpool2d", "avgpool2d"):
        pool = (MaxPool2D if name == "maxpool2d" else AvgPool2D)(arguments["pool_size"], arguments["stride"])
        if pool.pool_size > shape[0] or pool.pool_size > shape[1]:
            raise ConfigError(f"{where}: pool_size {pool.pool_size} is larger than the {shape[0]}x{shape[1]} image "
                              "it pools (reduce pool_size, use padding, or drop a layer)")
        return pool
    if name == "dense":
        plumbing.check_weights_fit(shape[0] * arguments["units"], where)
        return Dense(shape[0], arguments["units"], rng=rng)
    if name == "batchnorm":
        return BatchNorm(shape[-1], arguments["momentum"], arguments["eps"])
    if name == "dropout":
        return Dropout(arguments["rate"], dropout_rng)
    return {"relu": ReLU, "tanh": Tanh, "flatten": Flatten}[name]()


# ------------------------------------------------------------------------------------------------
# Optimisers
# ------------------------------------------------------------------------------------------------


def parameters(model: Sequential) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(key, weights, gradient) for every weight array; the key, like '3.W', is its layer number and name."""
    for index, layer in enumerate(model.layers):
        for name, param in layer.params.items():
            yield f"{index}.{name}", param, layer.grads[name]


class Optimizer:
    """What every optimiser has: a learning rate, its state (arrays per weight, such as SGD's velocity,
    saved in model files so that training can continue), and step(model), which moves every weight of the
    model against its gradient."""

    name = ""  # how config files and model files call it

    def __init__(self, learning_rate: float, weight_decay: float = 0.0) -> None:
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.state: dict[str, np.ndarray] = {}

    def slot(self, key: str, param: np.ndarray) -> np.ndarray:
        """The state array `key`, created as zeros shaped like param on first use."""
        if key not in self.state:
            self.state[key] = np.zeros_like(param)
        return self.state[key]

    def step(self, model: Sequential) -> None:
        raise NotImplementedError

    def decay_weights(self, model: Sequential) -> None:
        """Decoupled weight decay (Loshchilov & Hutter's AdamW): W -= lr * weight_decay * W, before the step.
        Only weight matrices and kernels (W) shrink; biases and BatchNorm's scale and shift do not."""
        if self.weight_decay:
            for key, param, _ in parameters(model):
                if key.endswith(".W"):
                    param *= 1 - self.learning_rate * self.weight_decay


class SGD(Optimizer):
    """Stochastic gradient descent with momentum (PyTorch's form): v = momentum * v + g;  w -= lr * v."""

    name = "sgd"

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        super().__init__(learning_rate, weight_decay)
        self.momentum = momentum

    def step(self, model: Sequential) -> None:
        self.decay_weights(model)
        for key, param, grad in parameters(model):
            velocity = self.slot(f"{key}.velocity", param)
            velocity *= self.momentum
            velocity += grad
            param -= self.learning_rate * velocity


class Adam(Optimizer):
    """Adam (Kingma & Ba, 2015) with bias correction.

    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  w -= lr * m_hat / (sqrt(v_hat) + eps),
    where m_hat = m / (1 - b1^t) and v_hat = v / (1 - b2^t) undo the zero start of m and v.
    """

    name = "adam"

    def __init__(self, learning_rate: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(learning_rate, weight_decay)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.t = 0
        self.scratch: dict[str, np.ndarray] = {}

    def step(self, model: Sequential) -> None:
        self.decay_weights(model)
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        step_size = self.learning_rate / (1 - b1 ** self.t)  # lr / (1 - b1^t) turns m into m_hat
        correction2_sqrt = math.sqrt(1 - b2 ** self.t)  # sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t)
        for key, param, grad in parameters(model):
            m, v = self.slot(f"{key}.m", param), self.slot(f"{key}.v", param)
            # The docstring's formula, in place through one scratch array per weight: with a fresh temporary for
            # each of its operations, the step costs a measurable share of an epoch (bench/why_fast.py: "f. Adam").
            scratch = self.scratch.get(key)
            if scratch is None or scratch.shape != param.shape or scratch.dtype != param.dtype:
                scratch = self.scratch[key] = np.empty_like(param)
            m *= b1
            m += np.multiply(grad, 1 - b1, out=scratch)  # m = b1*m + (1-b1)*g
            v *= b2
            v += np.multiply(np.square(grad, out=scratch), 1 - b2, out=scratch)  # v = b2*v + (1-b2)*g^2
            denominator = np.sqrt(v, out=scratch)
            denominator /= correction2_sqrt
            denominator += self.eps  # sqrt(v_hat) + eps
            param -= np.multiply(np.divide(m, denominator, out=scratch), step_size, out=scratch)


def make_optimizer(training_cfg: dict) -> Optimizer:
    if training_cfg["optimizer"] == "sgd":
        return SGD(training_cfg["learning_rate"], training_cfg["momentum"], training_cfg["weight_decay"])
    return Adam(training_cfg["learning_rate"], weight_decay=training_cfg["weight_decay"])


def learning_rate_schedule(schedule: dict, base_lr: float, steps_per_epoch: int,
                           total_steps: int) -> Callable[[int], float]:
    """The learning rate for each training step (batch) 0, 1, ..., total_steps - 1, as a function.

    constant:  base_lr.
    step:      base_lr * gamma ** (epoch // step_size), epoch counted from 0.
    cosine:    min_lr + (base_lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2.
    one_cycle: Smith's one-cycle policy, as PyTorch's OneCycleLR: from base_lr / div_factor up to base_lr (the
               peak) over the first pct_start of the steps, then down to base_lr / (div_factor * final_div_factor),
               both along half a cosine.
    """
    name = schedule["name"]

    def cosine_from_to(start: float, end: float, fraction: float) -> float:
        return end + (start - end) * (1 + math.cos(math.pi * fraction)) / 2

    def rate(step: int) -> float:
        if name == "step":
            return base_lr * schedule["gamma"] ** (step // steps_per_epoch // schedule["step_size"])
        if name == "cosine":
            return cosine_from_to(base_lr, schedule["min_lr"], step / max(total_steps, 1))
        if name == "one_cycle":
            low = base_lr / schedule["div_factor"]
            peak_step = schedule["pct_start"] * total_steps - 1
            if step <= peak_step:
                return cosine_from_to(low, base_lr, step / max(peak_step, 1e-12))
            return cosine_from_to(base_lr, low / schedule["final_div_factor"],
                                  (step - peak_step) / max(total_steps - 1 - peak_step, 1e-12))
        return base_lr
    return rate


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


DIGIT_NAMES = [str(digit) for digit in range(10)]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class Dataset:
    """Train, test and (optional) validation images (N, H, W, C) float32 in [0, 1] with integer labels (N,).
    The validation images are held out of the training split: with them, training scores each epoch on them
    and the test set is scored once, at the end."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    name: str
    source: str  # where the images came from: idx, cache, openml, sklearn or synthetic
    note: str = ""  # a sentence for humans: which files, what was held out, why a fallback happened
    x_val: np.ndarray = field(default_factory=lambda: np.zeros((0, 1, 1, 1), DTYPE))
    y_val: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    skipped: list[str] = field(default_factory=list)  # "file: why" for each unreadable file of a folder

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def make_rngs(seed: int) -> dict[str, np.random.Generator]:
    """Independent random streams for data sampling, weight initialisation, shuffling, Dropout masks and
    augmentation, all from one seed, so that changing (say) the model does not change which images are drawn."""
    names = ("data", "init", "shuffle", "dropout", "augment")
    return {name: np.random.default_rng(s) for name, s in zip(names, np.random.SeedSequence(seed).spawn(len(names)))}


def shift_and_rotate(images: np.ndarray, rng: np.random.Generator, max_shift: int, max_degrees: float,
                     flip: bool = False) -> np.ndarray:
    """Data augmentation: each image (N, H, W, C) moved by its own random shift of up to max_shift whole pixels
    in each direction and turned by a random angle of up to max_degrees either way, all images at once; with
    flip, half of them (at random) mirrored left to right first (right for photos, wrong for digits).

    Output pixel (r, c) reads the input at the point where the inverse rotation (about the image's centre) and
    shift take it, interpolated bilinearly between the four pixels around it; outside the image reads 0.
    """
    n, height, width, channels = images.shape
    angle = np.deg2rad(rng.uniform(-max_degrees, max_degrees, (n, 1, 1))).astype(DTYPE)
    shift_r, shift_c = rng.integers(-max_shift, max_shift + 1, (2, n, 1, 1)).astype(DTYPE)
    centre_r, centre_c = (height - 1) / 2, (width - 1) / 2
    rows, cols = np.mgrid[0:height, 0:width].astype(DTYPE)
    r, c = rows - shift_r - centre_r, cols - shift_c - centre_c  # (N, H, W), relative to the centre
    if flip:  # a mirrored image reads column -c (about the centre) where the image itself reads c
        c = np.where(rng.random((n, 1, 1)) < 0.5, -c, c)
    # The source point, in the coordinates of the image framed by a border of zeros (1 pixel before, 2 after, so
    # that a point outside, clipped onto the border, and its neighbours below and to the right all read 0).
    source_r = np.clip(np.cos(angle) * r - np.sin(angle) * c + centre_r + 1, 0, height + 1)
    source_c = np.clip(np.sin(angle) * r + np.cos(angle) * c + centre_c + 1, 0, width + 1)
    top, left = np.floor(source_r), np.floor(source_c)
    down, right = (source_r - top)[..., None], (source_c - left)[..., None]  # bilinear weights, (N, H, W, 1)
    framed = np.pad(images, ((0, 0), (1, 2), (1, 2), (0, 0))).reshape(n, -1, channels)  # pixels in one row
    row_length = width + 3
    corner = (top.astype(np.intp) * row_length + left.astype(np.intp)).reshape(n, -1, 1)

    def pixel(offset: int) -> np.ndarray:  # the framed pixel `offset` places after each top-left corner
        return np.take_along_axis(framed, corner + offset, axis=1).reshape(images.shape)

    return ((1 - down) * ((1 - right) * pixel(0) + right * pixel(1))
            + down * ((1 - right) * pixel(row_length) + right * pixel(row_length + 1))).astype(images.dtype)


def _draw(split: tuple[np.ndarray, np.ndarray], n: int, rng: np.random.Generator, what: str) -> tuple:
    images, labels = split
    if n > len(images):
        raise DataError(f"{what} = {n:,} but only {len(images):,} images are available: add "
                        f"--{what.removeprefix('data.').replace('_', '-')} {len(images)}")
    chosen = rng.choice(len(images), n, replace=False)
    return images[chosen], labels[chosen]


def _hold_out(images: np.ndarray, labels: np.ndarray, n_train: int, n_test: int, rng: np.random.Generator,
              what: str) -> tuple[tuple, tuple]:
    """Disjoint random train and test draws from one pool that has no official test split."""
    if n_train + n_test > len(images):
        test = min(n_test, len(images) // 5)
        raise DataError(f"{what}: n_train + n_test = {n_train + n_test:,} but only {len(images):,} images are "
                        f"available (they are split between training and test): add --n-train {len(images) - test} "
                        f"--n-test {test}")
    order = rng.permutation(len(images))
    test, train = order[:n_test], order[n_test:n_test + n_train]
    return (images[train], labels[train]), (images[test], labels[test])


def load_data(data_cfg: dict, evaluating_only: bool = False) -> Dataset:
    """Load data_cfg['dataset'] and draw n_train / n_test images from it with the seed.

    MNIST and Fashion-MNIST come from, in order: the IDX folder data_cfg['path'], the cache in
    data_cfg['cache_dir'], a download from OpenML (cached afterwards), and, if all fail and
    allow_synthetic_fallback is on, synthetic seven-segment digits, loudly labelled as such.
    """
    name, n_test, n_val = data_cfg["dataset"], data_cfg["n_test"] or 1000, data_cfg["n_val"]
    n_train = (data_cfg["n_train"] or 5000) + n_val  # the validation images come out of the training split
    rng = make_rngs(data_cfg["random_seed"])["data"]
    if uses_folder(data_cfg):  # your own images: a folder of class folders
        images = load_folder(data_cfg, rng)
        return _to_dataset(images.train, images.test, images.class_names, "folder", images.source, images.note,
                           n_val, images.skipped)
    class_names = FASHION_NAMES if name == "fashion_mnist" else DIGIT_NAMES
    if data_cfg["path"] and name in ("digits", "synthetic"):
        log.warning("data.path %s is ignored: the %s data set is built in", data_cfg["path"], name)
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = (bunch.images * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
        train, test = _hold_out(images, bunch.target, n_train, n_test, rng, "data (digits)")
        return _to_dataset(train, test, class_names, name, "sklearn",
                           "scikit-learn's 1,797 8x8 digits, split at random into training and test", n_val)
    if name == "synthetic":
        return _to_dataset(make_synthetic(n_train, rng), make_synthetic(n_test, rng), class_names, name,
                           "synthetic", "synthetic seven-segment digits (asked for in the config)", n_val)

    if data_cfg["path"]:
        folder = Path(data_cfg["path"])
        train, test = load_idx_folder(folder)
        check_dataset_name(name, folder, train[0])
        if test is None:
            train, test = _hold_out(*train, n_train, n_test, rng, f"data ({folder})")
            note = (f"IDX files in {folder}; it has no t10k files, so {n_test:,} training images were held out "
                    "as the test set")
            return _to_dataset(train, test, class_names, name, "idx", note, n_val)
        return _to_dataset(_draw(train, n_train, rng, "data.n_train"), _draw(test, n_test, rng, "data.n_test"),
                           class_names, name, "idx", f"IDX files in {folder}", n_val)

    cache = Path(data_cfg["cache_dir"]) / f"{name}.npz"
    splits, source, note = load_cache(cache), "cache", f"cached download {cache}"
    if splits is None:
        try:
            splits = download_openml(name, Path(data_cfg["cache_dir"]))
        except Exception as error:  # offline, firewall, OpenML down, broken download: all mean "fall back"
            reason = f"could not load {name}: no data.path, no cache at {cache}, and the download failed " \
                     f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            if not data_cfg["allow_synthetic_fallback"]:
                raise DataError(reason + "; synthetic fallback is off (--no-fallback)") from None
            log.warning("!" * 78)
            log.warning("SYNTHETIC DATA: %s", reason)
            log.warning("%s on synthetic seven-segment digits instead: the accuracy says nothing about %s.",
                        "Evaluating" if evaluating_only else "Training", name)
            log.warning("!" * 78)
            return _to_dataset(make_synthetic(n_train, rng), make_synthetic(n_test, rng), DIGIT_NAMES, name,
                               "synthetic", "FALLBACK: " + reason, n_val)
        source, note = "openml", f"downloaded from OpenML ({OPENML_NAMES[name]}), cached in {cache}"
        plumbing.write_atomic(cache, lambda f: np.savez_compressed(
            f, x_train=splits[0][0], y_train=splits[0][1], x_test=splits[1][0], y_test=splits[1][1]))
    train, test = splits
    return _to_dataset(_draw(train, n_train, rng, "data.n_train"), _draw(test, n_test, rng, "data.n_test"),
                       class_names, name, source, note, n_val)


def _to_dataset(train: tuple, test: tuple, class_names: list[str], name: str, source: str, note: str,
                n_val: int = 0, skipped: list[str] | None = None) -> Dataset:
    """uint8 images (N, H, W) or (N, H, W, C) -> float32 (N, H, W, C) in [0, 1]; labels -> int64. The last
    n_val of the training images become the validation set."""
    def scale(images: np.ndarray) -> np.ndarray:
        scaled = images.astype(DTYPE) / 255
        return scaled if scaled.ndim == 4 else scaled[..., None]

    keep = len(train[0]) - n_val
    return Dataset(scale(train[0][:keep]), train[1][:keep].astype(np.int64), scale(test[0]),
                   test[1].astype(np.int64), list(class_names), name, source, note,
                   scale(train[0][keep:]), train[1][keep:].astype(np.int64), skipped or [])


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What train() did: one history row per completed epoch, and how it ended.

    status: "completed", "interrupted" (a stop was requested) or "diverged" (loss or weights not finite);
    stopped_at: for the last two, the epoch and batch where it happened (and, when diverged, why);
    batches: how many training batches ran in all (the learning-rate schedule's step, --profile's count).
    """

    history: list[dict] = field(default_factory=list)
    status: str = "completed"
    stopped_at: dict | None = None
    batches: int = 0

    def stop(self, status: str, epoch: int, batch: int, reason: str | None = None) -> TrainResult:
        self.status, self.stopped_at = status, {"epoch": epoch, "batch": batch}
        if reason:
            self.stopped_at["reason"] = reason
        return self


@dataclass
class Position:
    """Where training is between two steps: enough to watch it, or to continue it exactly where it was.

    epoch: the epoch under way; batch: the batches of it done (n_batches when it has ended); order: its shuffle
    order; total_loss and correct: its running sums so far; loss: the last batch's loss.
    """

    epoch: int
    batch: int
    n_batches: int
    order: np.ndarray
    total_loss: float = 0.0
    correct: int = 0
    loss: float = float("nan")

    @property
    def epoch_ended(self) -> bool:
        return self.batch == self.n_batches


def train(
    model: Sequential,
    optimizer: Optimizer,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    workers: int = 1,
    learning_rate: Callable[[int], float] | None = None,
    augment: Callable[[np.ndarray], np.ndarray] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    first_epoch: int = 1,
    on_step: Callable[[Position, TrainResult], None] | None = None,
    resume: tuple[Position, TrainResult] | None = None,
) -> TrainResult:
    """Mini-batch training: each epoch shuffles the training set, and for every batch runs
    forward -> loss -> backward -> optimiser step; then it scores the epoch on the validation set, or on the
    test set when there is none.

    workers > 1 splits every batch over that many threads (parallel.DataParallel), which computes the same
    gradient; either way BLAS runs one thread per worker. learning_rate(step) sets the optimiser's rate before
    each step (see learning_rate_schedule); augment(x) changes each batch of images before it goes in (see
    shift_and_rotate). Stops early, with the matching status, when the loss or a weight stops being finite
    (diverged) or when should_stop() turns true after a batch (interrupted). first_epoch numbers the epochs of a
    continued run.

    on_step(position, result), if given, is called after every step and again when an epoch's row is in the
    history (position.epoch_ended), between steps, so it may copy the model but must not change it.
    resume=(position, result) continues a run from there (the model, optimiser and random generators restored
    by the caller): the epoch under way goes on with its own order and running sums.
    """
    result, loss_fn = (TrainResult() if resume is None else resume[1]), SoftmaxCrossEntropy()
    n_train, last_epoch = len(data.x_train), first_epoch + epochs - 1
    n_batches = math.ceil(n_train / batch_size)
    scored_on = "val" if len(data.x_val) else "test"
    x_scored, y_scored = (data.x_val, data.y_val) if len(data.x_val) else (data.x_test, data.y_test)
    # Guessing at random costs log(classes); a loss 1000 times that is an explosion, even while finite.
    loss_limit = 1000 * math.log(max(data.num_classes, 2))
    threads = DataParallel(model, workers) if workers > 1 else one_blas_thread(model)
    with threads as net:  # the model, or the model spread over worker threads: both have forward and backward
        for epoch in range(first_epoch if resume is None else resume[0].epoch, last_epoch + 1):
            start = time.perf_counter()
            if resume is not None and resume[0].epoch == epoch:
                at = resume[0]
            else:
                at = Position(epoch, 0, n_batches, rng.permutation(n_train))
            epoch_lr = optimizer.learning_rate if learning_rate is None else learning_rate(result.batches - at.batch)
            with ProgressBar(n_batches, f"epoch {epoch}/{last_epoch}") as bar:
                for batch in range(at.batch, n_batches):
                    chosen = at.order[batch * batch_size:(batch + 1) * batch_size]
                    x, labels = data.x_train[chosen], data.y_train[chosen]
                    if augment is not None:
                        x = augment(x)
                    if learning_rate is not None:
                        optimizer.learning_rate = learning_rate(result.batches)

                    logits = net.forward(x)
                    loss = loss_fn.forward(logits, labels)
                    if not loss < loss_limit:  # also catches NaN, for which every comparison is false
                        return result.stop("diverged", epoch, batch + 1, f"the loss became {loss:.4g}")
                    net.backward(loss_fn.backward())
                    optimizer.step(model)

                    result.batches += 1
                    at.batch, at.loss = batch + 1, loss
                    at.total_loss += loss * len(labels)
                    at.correct += int((logits.argmax(axis=1) == labels).sum())
                    bar.update(batch + 1, loss)
                    if on_step is not None and batch + 1 < n_batches:
                        on_step(at, result)
                    if should_stop():
                        return result.stop("interrupted", epoch, batch + 1)
            seconds = time.perf_counter() - start
            if not all(np.isfinite(p).all() for layer in model.layers for p in layer.params.values()):
                return result.stop("diverged", epoch, n_batches, "a weight became infinite or NaN")
            scored_loss, scored_accuracy = net.evaluate(x_scored, y_scored, EVAL_BATCH_SIZE)
            if not math.isfinite(scored_loss):  # finite weights so large that the logits overflow
                return result.stop("diverged", epoch, n_batches, f"the {scored_on} loss became {scored_loss:.4g}")
            row = {"epoch": epoch, "learning_rate": epoch_lr, "train_loss": at.total_loss / n_train,
                   "train_accuracy": at.correct / n_train, f"{scored_on}_loss": scored_loss,
                   f"{scored_on}_accuracy": scored_accuracy, "seconds": round(seconds, 3),
                   "images_per_second": round(n_train / seconds, 1)}
            result.history.append(row)
            log.info("epoch %*d/%d  lr %.3g  train loss %.4f acc %.2f%%  %s loss %.4f acc %.2f%%  %.1fs  %.0f img/s",
                     len(str(last_epoch)), epoch, last_epoch, epoch_lr, row["train_loss"],
                     100 * row["train_accuracy"], scored_on, scored_loss, 100 * scored_accuracy, seconds,
                     row["images_per_second"])
            if on_step is not None:
                on_step(at, result)
            if should_stop():
                return result.stop("interrupted", epoch, n_batches)
    return result


# ------------------------------------------------------------------------------------------------
# Gradient check: every backward pass against central differences, in float64
# ------------------------------------------------------------------------------------------------


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """max |a - n| / max(|a| + |n|), over the checked entries of one tensor.

    Relative to the tensor's largest gradient rather than entry by entry: central differences carry
    ~1e-10 of rounding noise, which would look like a large error on an entry that happens to be ~0.
    """
    scale = float(np.max(np.abs(analytic) + np.abs(numeric)))
    return float(np.max(np.abs(analytic - numeric))) / max(scale, 1e-12)


def numeric_gradient(objective: Callable[[], float], array: np.ndarray, coords: np.ndarray, eps: float = 1e-6,
                     kinks: Callable[[], bytes] | None = None) -> np.ndarray:
    """Central differences (f(a + eps) - f(a - eps)) / 2eps at the given flat coordinates of `array`,
    which objective() must read (it is changed in place and restored). kinks(), if given, says on which side of
    every kink (ReLU at 0, a pooling tie) the last objective() was: where a + eps and a - eps differ, the
    difference straddles a kink and measures no slope, so that coordinate's gradient is NaN (judged apart)."""
    flat = array.reshape(-1)  # a view: array must be contiguous
    grads = np.empty(len(coords))
    for i, coord in enumerate(coords):
        original = flat[coord]
        flat[coord] = original + eps
        plus, side = objective(), kinks and kinks()
        flat[coord] = original - eps
        minus = objective()
        flat[coord] = original
        grads[i] = (plus - minus) / (2 * eps) if not kinks or kinks() == side else np.nan
    return grads


def gradient_check(model: Sequential, x: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   n_coords: int = 20, tolerance: float = 1e-6) -> list[dict]:
    """Check each layer's backward pass near its real input inside the model, in float64.

    For layer L with input a and a random upstream gradient G, the objective sum(L(a) * G) has gradient
    L.backward(G) with respect to a, and L.grads with respect to its weights; both are compared with
    central differences on n_coords random coordinates per tensor, at the real input plus uniform noise of
    +-0.01 (so that no ReLU zero or pooling tie sits exactly on a kink). A last check runs the whole model
    and loss end to end, leaving out (as "kinks") coordinates whose +-eps moved a deep ReLU or max across its
    kink. Returns one row per tensor: layer, tensor, shape, coordinates judged, kinks, error, ok.
    Everything runs in training mode, the mode whose gradients training uses: BatchNorm normalises with the
    batch's own statistics (and its gradient flows through them), and each Dropout layer keeps one fixed mask,
    so that every evaluation of the objective computes the same function. The model's weights are converted
    to float64 in place.
    """
    for layer in model.layers:
        for name in layer.params:
            layer.params[name] = layer.params[name].astype(np.float64)
            layer.grads[name] = np.zeros_like(layer.params[name])
    names = model.names
    rows: list[dict] = []

    def check(layer_name: str, tensor: str, array: np.ndarray, analytic: np.ndarray, objective: Callable,
              kinks: Callable[[], bytes] | None = None) -> None:
        coords = rng.choice(array.size, min(n_coords, array.size), replace=False)
        numeric = numeric_gradient(objective, array, coords, kinks=kinks)
        judged = ~np.isnan(numeric)  # coordinates whose difference straddled a kink are left out, and counted
        error = relative_error(analytic.reshape(-1)[coords][judged], numeric[judged]) if judged.any() else np.inf
        rows.append({"layer": layer_name, "tensor": tensor, "shape": list(array.shape), "coords": int(judged.sum()),
                     "kinks": int((~judged).sum()), "max_rel_error": error, "ok": error < tolerance})

    activation = np.ascontiguousarray(x, dtype=np.float64)
    for name, layer in zip(names, model.layers):
        # A ReLU's output has exact zeros, so the next pooling window may hold a tie of zeros: there the slope
        # is undefined and central differences give half of it. Check each layer at a nearby tie-free point.
        probe = activation + rng.uniform(-0.01, 0.01, activation.shape)
        if isinstance(layer, Dropout):
            layer.fixed_mask = layer.draw_mask(probe.shape, np.float64)
        upstream = rng.standard_normal(layer.forward(probe).shape)

        def objective(layer: Any = layer, probe: np.ndarray = probe, upstream: np.ndarray = upstream) -> float:
            return float(np.sum(layer.forward(probe) * upstream))

        needed, layer.need_input_grad = layer.need_input_grad, True
        layer.forward(probe)
        grad_in = layer.backward(upstream)
        layer.need_input_grad = needed
        check(name, "input", probe, grad_in, objective)
        for tensor, param in layer.params.items():
            check(name, tensor, param, layer.grads[tensor].copy(), objective)
        activation = np.ascontiguousarray(layer.forward(activation))

    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(activation, labels)
    check("softmax_ce", "logits", activation, loss_fn.backward(), lambda: loss_fn.forward(activation, labels))

    def model_loss() -> float:
        return loss_fn.forward(model.forward(x), labels)

    first = next((layer for layer in model.layers if layer.params), None)
    if first is not None:
        loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward())
        tensor = next(iter(first.params))
        check("whole model", f"{names[model.layers.index(first)]}.{tensor}", first.params[tensor],
              first.grads[tensor].copy(), model_loss, lambda: b"".join(  # which side of each ReLU and max it is on
                  getattr(layer, kept).tobytes() for layer in model.layers for kept in ("positive", "winner")
                  if hasattr(layer, kept)))
    for layer in model.layers:
        if isinstance(layer, Dropout):
            layer.fixed_mask = None
    return rows


def gradient_check_table(rows: list[dict]) -> str:
    lines = [f"{'layer':<14}{'tensor':<12}{'shape':<20}{'coords':>7}{'max rel error':>15}  result", "-" * 76]
    for row in rows:
        lines.append(f"{row['layer']:<14}{row['tensor']:<12}{tuple(row['shape'])!s:<20}{row['coords']:>7}"
                     f"{row['max_rel_error']:>15.2e}  {'ok' if row['ok'] else 'FAIL'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def load_config(path: str | Path) -> dict:
    """Read and validate a YAML config file. Raises ConfigError (one line) for any problem: see
    config_schema.read_yaml_file (missing, a folder, not UTF-8, too large, YAML syntax, duplicate keys, alias
    bombs, deep nesting) and config_schema.validate_config (every key and value)."""
    path = Path(path)
    raw = config_schema.read_yaml_file(path)
    try:
        return config_schema.validate_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_DIVERGED, EXIT_OUTPUT = 0, 1, 2, 3, 4
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a Unix tool reports when the reader of its output went away
EXIT_BY_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report it


def path_argument(text: str) -> str:
    """argparse type for a path: an empty string (say, an unset shell variable) is an error, not 'not given'."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the whole usage; one line is clearer
        raise CNNError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python src/main.py",
        description="Train a convolutional neural network written from scratch in NumPy on MNIST.",
        epilog="Precedence: flags > environment (RANDOM_SEED, also from .env) > config file > defaults. "
               "Exit codes: 0 done, 1 unexpected error, 2 bad usage/config/data, 3 training diverged, "
               "4 an output file could not be written, 130 interrupted (Ctrl-C), 143 terminated, "
               "141 the output's reader went away.")
    parser.add_argument("--config", type=path_argument, metavar="FILE",
                        help="YAML config (default: ./config.yaml if present, else built-in defaults)")
    parser.add_argument("--output", type=path_argument, metavar="FILE", help="write results as JSON to FILE")
    group = parser.add_argument_group("overrides of config values")
    group.add_argument("--epochs", type=int, metavar="N", help="training.epochs (0: only evaluate)")
    group.add_argument("--batch-size", type=int, metavar="N", help="training.batch_size")
    group.add_argument("--learning-rate", metavar="LR", help="training.learning_rate")
    group.add_argument("--optimizer", metavar="NAME", help="training.optimizer: " + ", ".join(config_schema.OPTIMIZERS))
    group.add_argument("--workers", type=int, metavar="N", help="training.workers: threads that each take a slice "
                       "of every batch (default: one per BLAS thread, i.e. per CPU unless OPENBLAS_NUM_THREADS "
                       "says fewer, and fewer when slices would be too small)")
    group.add_argument("--n-train", type=int, metavar="N", help="data.n_train")
    group.add_argument("--n-test", type=int, metavar="N", help="data.n_test")
    group.add_argument("--seed", type=int, metavar="N", help="data.random_seed (seeds everything)")
    group.add_argument("--dataset", metavar="NAME", help="data.dataset: " + ", ".join(config_schema.DATASETS))
    group.add_argument("--data-path", type=path_argument, metavar="DIR", help="data.path: a folder of MNIST IDX "
                       "files, or of your own images in one folder per class (DIR/<class>/*.png)")
    group.add_argument("--image-size", metavar="HxW", help="data.image_size of a folder's images: 32 or 32x24")
    group.add_argument("--color", metavar="MODE", help="data.color of a folder's images: grey or rgb")
    group.add_argument("--no-fallback", action="store_true", help="fail instead of using synthetic data")
    group.add_argument("--log-level", metavar="LEVEL", help="logging.level: " + ", ".join(config_schema.LOG_LEVELS))
    group.add_argument("--plot-dir", type=path_argument, metavar="DIR",
                       help="output.plot_dir: write PNG pictures there")
    group.add_argument("--checkpoint-dir", type=path_argument, metavar="DIR", help="output.checkpoint_dir: "
                       "checkpoints of each run in a folder of its own there (default checkpoints; none: off)")
    group.add_argument("--resume", type=path_argument, metavar="DIR", nargs="?", const=True,
                       help="continue the latest run in DIR (default: the checkpoint folder) from its checkpoint, "
                            "exactly; give the original command line")
    extra = parser.add_argument_group("models, predictions and teaching")
    extra.add_argument("--save-model", type=path_argument, metavar="FILE", help="save the trained model (.npz)")
    extra.add_argument("--load-model", type=path_argument, metavar="FILE",
                       help="start from a saved model, .npz or a PyTorch twin's .pt (with --epochs 0: evaluate)")
    extra.add_argument("--export", type=path_argument, metavar="FILE", action="append", help="also write the model "
                       "as FILE.onnx or FILE.pt (PyTorch); repeatable; with --load-model: the saved model, no training")
    extra.add_argument("--profile", action="store_true", help="print time per layer after training")
    mode = extra.add_mutually_exclusive_group()
    mode.add_argument("--predict", type=path_argument, metavar="IMAGE", nargs="+",
                      help="classify image files with --load-model")
    mode.add_argument("--gradcheck", action="store_true", help="check every gradient of the configured model")
    page = parser.add_argument_group("draw a digit (a local web page)")
    page.add_argument("--serve", action="store_true", help="serve a page to draw digits into the model and watch "
                      "every layer: the --load-model model, or else the training run as it learns, then the model "
                      "it trained (Ctrl-C stops it)")
    page.add_argument("--host", metavar="ADDRESS", help="with --serve: the address to listen on (default "
                      "127.0.0.1, this machine only; 0.0.0.0 lets other machines in)")
    page.add_argument("--port", type=int, metavar="N", help="with --serve: the port (default 8000; 0: a free one)")
    return parser


def resolve_config(args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    """Config file (or defaults), then RANDOM_SEED from the environment, then flags; every value checked.

    Returns the config and where it came from: {"config": file or "built-in defaults", "seed": ...}.
    """
    if args.config:
        cfg, origin = load_config(args.config), {"config": args.config, "seed": args.config, "file": args.config}
    elif Path("config.yaml").is_file():
        cfg, origin = load_config("config.yaml"), {"config": "config.yaml", "seed": "config.yaml",
                                                   "file": "config.yaml"}
    else:
        cfg, origin = config_schema.validate_config({}), {"config": "built-in defaults", "seed": "built-in default"}
    config_schema.apply_overrides(cfg, origin, args, os.environ.get("RANDOM_SEED", "").strip())
    check_dataset_flag(args.dataset, cfg["data"]["path"])
    config_schema.check_together(cfg, origin)
    if not args.load_model and not uses_folder(cfg["data"]):  # a folder's shape is known once it is read
        # Build the configured model once on the data set's image size, so that an impossible architecture
        # is reported now, not after a minute of downloading. (A loaded model brings its own architecture.)
        try:
            model = build_model(cfg["model"], input_shape_of(cfg["data"]["dataset"]), 10, np.random.default_rng(0))
            plumbing.check_fits_in_memory(model, min(cfg["training"]["batch_size"], cfg["data"]["n_train"] or 5000))
        except ConfigError as error:
            raise ConfigError(f"{origin['config']}: {error}") from None
        except (MemoryError, ValueError) as error:  # numpy cannot allocate the weights
            raise ConfigError(f"{origin['config']}: model: the weights do not fit in memory ({error}); use fewer "
                              "filters or units in model.layers") from None
    return cfg, origin


def input_shape_of(dataset: str) -> tuple[int, int, int]:
    return (8, 8, 1) if dataset == "digits" else (28, 28, 1)


def pt_defaults(cfg: dict) -> dict:
    """What --load-model FILE.pt takes from the config when the file holds a bare state_dict (modelfile.load_pt)."""
    dataset = cfg["data"]["dataset"]
    return {"model": cfg["model"], "input_shape": list(input_shape_of(dataset)), "dataset": dataset,
            "class_names": FASHION_NAMES if dataset == "fashion_mnist" else DIGIT_NAMES}


def run_gradcheck(args: argparse.Namespace, cfg: dict, origin: dict[str, str]) -> int:
    """--gradcheck: the configured model, four random inputs, float64, every layer's backward checked.
    The table is the command's output, so it is printed whatever the log level."""
    plumbing.check_distinct_files({"the config": origin.get("file"), "--output": args.output,
                          "logging.file": cfg["logging"]["file"]})
    plumbing.check_writable(args.output, "--output")
    rngs = make_rngs(cfg["data"]["random_seed"])
    folder = load_data(cfg["data"], evaluating_only=True) if uses_folder(cfg["data"]) else None  # its images' shape
    rng, input_shape = rngs["init"], folder.input_shape if folder else input_shape_of(cfg["data"]["dataset"])
    classes = folder.num_classes if folder else 10
    model = build_model(cfg["model"], input_shape, classes, rng, rngs["dropout"])
    x, labels = rng.random((4, *input_shape)), rng.integers(0, classes, 4)  # BatchNorm needs a few values per feature
    start = time.perf_counter()
    rows = gradient_check(model, x, labels, rng)
    failed = [row for row in rows if not row["ok"]]
    table = gradient_check_table(rows)
    print(f"gradient check of the configured model, input {input_shape}, float64, central differences:\n{table}")
    plumbing.log_to_file(logging.INFO, f"gradient check:\n{table}")
    verdict = f"{len(rows) - len(failed)}/{len(rows)} tensors ok (tolerance 1e-6) in {time.perf_counter() - start:.1f}s"
    if args.output:
        plumbing.write_json(args.output, {"status": "failed" if failed else "passed", "rows": rows, "config": cfg,
                                 "versions": plumbing.versions()})
    if failed:
        log.error("gradient check FAILED: %s; broken: %s", verdict,
                  ", ".join(f"{row['layer']}.{row['tensor']}" for row in failed))
        return EXIT_UNEXPECTED
    print(f"gradient check passed: {verdict}")
    plumbing.log_to_file(logging.INFO, f"gradient check passed: {verdict}")
    return EXIT_OK


def run_predict(args: argparse.Namespace, cfg: dict) -> int:
    """--predict: classify image files with a saved model, one line each on stdout, no training (images.py).
    A file that cannot be read gets an error line instead, and the exit code is then 2."""
    for role, path in [("--load-model", args.load_model)] + [("an image of --predict", p) for p in args.predict]:
        plumbing.check_distinct_files({role: path, "--output": args.output})
    plumbing.check_writable(args.output, "--output")
    loaded = load_model(Path(args.load_model), build_model, pt_defaults(cfg))
    all_read = report_predictions(loaded.model, loaded.meta, [Path(p) for p in args.predict], args.load_model,
                                  args.output)
    return EXIT_OK if all_read else EXIT_USAGE


def model_for_run(args: argparse.Namespace, cfg: dict, data: Dataset,
                  rngs: dict[str, np.random.Generator]) -> tuple[Sequential, dict, Optimizer, dict]:
    """The model to train: loaded from --load-model (with its optimiser state) or built from the config.
    Returns the model, its architecture, the optimiser and what the model file says of earlier training."""
    optimizer = make_optimizer(cfg["training"])
    if not args.load_model:
        model = build_model(cfg["model"], data.input_shape, data.num_classes, rngs["init"], rngs["dropout"])
        return model, cfg["model"], optimizer, {}
    loaded = continue_from(Path(args.load_model), data, optimizer, build_model, parameters, rngs["dropout"],
                           evaluating_only=cfg["training"]["epochs"] == 0, defaults=pt_defaults(cfg))
    return loaded.model, loaded.meta["model"], optimizer, loaded.meta.get("training", {})


def run_training(args: argparse.Namespace, cfg: dict, origin: dict[str, str], stop: plumbing.StopRequest) -> int:
    """The default command: load data, build (or load) the model, train, evaluate, write what was asked."""
    training_cfg, seed = cfg["training"], cfg["data"]["random_seed"]
    check_outputs(args, cfg, origin.get("file"))  # before any work: each file can be written, none twice
    if args.resume is not None:  # and there is a run to resume
        checkpoints.resumable_run(cfg["output"]["checkpoint_dir"], args.resume)
    evaluating_only = training_cfg["epochs"] == 0
    log.info("numpy-cnn: config from %s, seed %d (from %s)", origin["config"], seed, origin["seed"])
    rngs = make_rngs(seed)
    data = load_data(cfg["data"], evaluating_only)
    log.info("data: %s (source: %s), %s training%s and %s test images of %s, %d classes; %s", data.name,
             data.source, f"{len(data.x_train):,}", f", {len(data.x_val):,} validation" if len(data.x_val) else "",
             f"{len(data.x_test):,}", data.input_shape, data.num_classes, data.note)
    model, model_cfg, optimizer, earlier = model_for_run(args, cfg, data, rngs)
    first_epoch = int(earlier.get("epochs_completed", 0)) + 1
    log.info("model:\n%s", model.summary())
    workers = training_cfg["workers"] or default_workers(model, training_cfg["batch_size"])
    schedule, augment_cfg = training_cfg["lr_schedule"], cfg["data"]["augment"]
    if not evaluating_only:
        log.info("training: %s", config_schema.describe_training(training_cfg, augment_cfg, workers))
    timings = instrument(model, optimizer) if args.profile else None
    steps_per_epoch = math.ceil(len(data.x_train) / training_cfg["batch_size"])
    config_schema.warn_odd_training(training_cfg, len(data.x_train))
    learning_rate = learning_rate_schedule(schedule, training_cfg["learning_rate"], steps_per_epoch,
                                           steps_per_epoch * training_cfg["epochs"])
    augment = None
    if augment_cfg["shift"] or augment_cfg["rotate"] or augment_cfg["flip"]:
        def augment(x: np.ndarray) -> np.ndarray:
            return shift_and_rotate(x, rngs["augment"], augment_cfg["shift"], augment_cfg["rotate"],
                                    augment_cfg["flip"])

    saved = checkpoints.for_run(None if evaluating_only else cfg["output"]["checkpoint_dir"], args.resume,
                                cfg["output"]["checkpoint_every"], model=model, model_cfg=model_cfg, rngs=rngs,
                                optimizer=optimizer, data=data, cfg=cfg, workers=workers, build_model=build_model,
                                parameters=parameters)
    resume = saved.resume(Position, TrainResult) if args.resume is not None else None
    live = None
    if args.serve and not evaluating_only:  # the page opens now and follows training (src/live.py)
        from live import watch_training

        live = watch_training(model, data, cfg, optimizer, stop, softmax, host=args.host, port=args.port,
                              first_epoch=first_epoch)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stop.graceful = True
    start = time.perf_counter()
    result = train(model, optimizer, data, epochs=training_cfg["epochs"], batch_size=training_cfg["batch_size"],
                   rng=rngs["shuffle"], workers=workers, learning_rate=learning_rate, augment=augment,
                   should_stop=lambda: stop.signum is not None, first_epoch=first_epoch,
                   on_step=plumbing.in_order([watcher.on_step for watcher in (saved, live) if watcher]), resume=resume)
    train_seconds = time.perf_counter() - start
    if saved:
        saved.finish(result)
    stop.after = "the file being written"

    test_loss = test_accuracy = None
    if result.status == "diverged":
        where = result.stopped_at
        log.error("training diverged at epoch %d, batch %d (%s): %s", where["epoch"], where["batch"], where["reason"],
                  config_schema.divergence_advice(training_cfg))
    elif result.history and result.status == "completed" and "test_loss" in result.history[-1]:
        test_loss, test_accuracy = result.history[-1]["test_loss"], result.history[-1]["test_accuracy"]
    else:
        test_loss, test_accuracy = model.evaluate(data.x_test, data.y_test, EVAL_BATCH_SIZE)
    if test_accuracy is not None:
        real = data.source != "synthetic" or data.name == "synthetic"
        on_what = "" if real else f" on SYNTHETIC digits, not {data.name} (offline fallback: see above)"
        took = "evaluation only, no training" if evaluating_only else f"training took {train_seconds:.1f}s"
        outcome = f"test accuracy {100 * test_accuracy:.2f}%{on_what}, test loss {test_loss:.4f}, {took}"
    if timings is not None and result.batches:
        log.info("%s", profile_table(timings, model.names, result.batches, workers))

    summary = {"epochs_completed": first_epoch - 1 + len(result.history), "test_accuracy": test_accuracy,
               "test_loss": test_loss, "status": result.status, "stopped_at": result.stopped_at, "seed": seed,
               "history": earlier.get("history", []) + result.history, "saved_at": started_at, "workers": workers,
               "resumed_from": saved.resumed_from if saved else None}
    problems, failed_writes = write_outputs(args, cfg, model_cfg, data, model, optimizer, result, summary,
                                            train_seconds, stop)
    if result.status == "interrupted":
        log.warning("%s", checkpoints.interrupted_line(result, saved, args.save_model if not failed_writes else None))
    if test_accuracy is not None:  # files first, then the line that says what the run achieved
        plumbing.result_line(outcome)
    meta = model_meta(model, model_cfg, data, summary)
    if live is not None:  # the done event; the page goes on serving the trained model only after a complete run
        live.finish(model, meta, keep_serving=stop.signum is None and result.status == "completed" and not
                    (failed_writes or problems))
    if result.status == "diverged":
        return EXIT_DIVERGED
    if stop.signum is not None:  # interrupted, or a signal came while the results were being written
        return EXIT_BY_SIGNAL[stop.signum]
    if failed_writes:
        return EXIT_OUTPUT
    if problems:
        return EXIT_UNEXPECTED
    stop.graceful = False  # nothing is left to finish: a signal stops the server at once, as with --load-model
    if live is not None:
        live.serve_until_interrupted()  # Ctrl-C: exit 0
    elif args.serve:
        from serve import serve_trained_model

        serve_trained_model(model, meta, softmax, args.host, args.port)
    return EXIT_OK


@plumbing.guarding_stdout(EXIT_BROKEN_PIPE, EXIT_OUTPUT)
def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 1 unexpected, 2 bad input, 3 diverged, 4 an output
    could not be written, 130 / 143 interrupted, 141 the reader of the output went away). A stdout that cannot be
    written stops nothing: every file is written first (plumbing.GuardedStdout)."""
    try:
        args = build_parser().parse_args(argv)
        config_schema.check_flag_combinations(args)
        plumbing.load_env_file()  # the nearest .env; never overrides variables already set
        cfg, origin = resolve_config(args)
        plumbing.setup_logging(cfg["logging"])
        # Overflow in a diverging run is reported as divergence, not as a NumPy warning.
        with np.errstate(all="ignore"), plumbing.StopRequest() as stop:
            if args.gradcheck:
                return run_gradcheck(args, cfg, origin)
            if args.predict:
                return run_predict(args, cfg)
            if (args.serve or args.export) and args.load_model:  # the saved model as it is, no training
                check_exports(args.export or [], args.load_model)
                loaded = load_model(Path(args.load_model), build_model, pt_defaults(cfg))
                if write_exports(args.export or [], loaded.model, loaded.meta):
                    return EXIT_OUTPUT
                if args.serve:
                    from serve import serve_trained_model

                    serve_trained_model(loaded.model, loaded.meta, softmax, args.host, args.port)
                return EXIT_OK
            return run_training(args, cfg, origin, stop)
    except CNNError as error:
        plumbing.log_to_file(logging.ERROR, str(error))
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # `python src/main.py ... | head`: the reader has all it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return EXIT_BROKEN_PIPE
    except (KeyboardInterrupt, plumbing.Interrupted) as stopped:
        signum = getattr(stopped, "signum", signal.SIGINT)
        plumbing.log_to_file(logging.WARNING, f"stopped by {signal.Signals(signum).name}")
        # Every file is written whole or not at all (plumbing.write_atomic), so none is left half-written.
        print(f"interrupted ({signal.Signals(signum).name}): stopped; no file was left half-written", file=sys.stderr)
        return EXIT_BY_SIGNAL[signum]
    except Exception as error:
        plumbing.log_to_file(logging.ERROR, "unexpected error", with_traceback=True)
        where = " (traceback in the log file)" if any(isinstance(h, logging.FileHandler) for h in log.handlers) else ""
        print(f"error: unexpected {type(error).__name__}: {error}{where}", file=sys.stderr)
        return EXIT_UNEXPECTED
    finally:
        plumbing.close_logging()


if __name__ == "__main__":
    sys.exit(main())

