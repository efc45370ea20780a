"""numpy-cnn: a convolutional neural network from scratch in NumPy, trained on MNIST.

Read it top to bottom: layers -> loss -> model -> optimisers -> data -> training, then the tools around
them (gradient check, saving and predicting, configuration) and the command line.

Conventions used everywhere:
- Images are channels-last arrays of shape (N, H, W, C), as in Keras: N samples, H x W pixels, C channels.
- Everything is float32 (float64 only in gradient checks): half the memory traffic, about 2x faster.
- Every layer has `forward(x, training=True) -> y` and `backward(grad_out) -> grad_in`, where
  `grad_out` is dLoss/dy and `grad_in` is dLoss/dx. Weights live in `params`, their gradients in `grads`.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import gzip
import json
import logging
import math
import os
import platform
import signal
import socket
import struct
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from threadpoolctl import threadpool_info, threadpool_limits

from errors import CNNError, ConfigError, DataError, ModelFileError
from images import predict_files

DTYPE = np.float32
# Evaluation during training runs in batches of 32 images: a 30th of the memory of 1000 (the API's default,
# whose im2col columns take 226 MB in the second conv layer), and faster, since the arrays stay in the CPU's
# caches: 1,000 test images took 0.26-0.28 s at 32, 0.32 s at 128 and 0.42 s at 500 here.
EVAL_BATCH_SIZE = 32
log = logging.getLogger("numpy_cnn")


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


class Layer:
    """What every layer has: `params` and `grads`, dicts with the same keys (empty for a layer without
    weights), and the three methods below."""

    # A layer with weights skips dLoss/dx when this is False (Sequential sets it on its first such layer).
    need_input_grad = True

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """y for input x; when training, also keep what backward will need."""
        raise NotImplementedError

    def backward(self, grad_out: np.ndarray) -> np.ndarray | None:
        """dLoss/dx from dLoss/dy (grad_out), storing dLoss/dweights in self.grads."""
        raise NotImplementedError

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of y for an input of this shape, both without the batch axis."""
        return input_shape


def he_normal(shape: tuple[int, ...], fan_in: int, rng: np.random.Generator) -> np.ndarray:
    """He initialisation: mean 0, variance 2 / fan_in (standard deviation sqrt(2 / fan_in)), which keeps the
    activations' variance steady through ReLU layers (a ReLU zeroes half of them, so the weights make up 2x)."""
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(DTYPE)


def im2col(x_padded: np.ndarray, kernel_size: int, stride: int) -> np.ndarray:
    """Every k x k x C window of the (already padded) input, one window per row.

    x_padded: (N, Hp, Wp, C) -> cols: (N, Ho, Wo, k, k, C), contiguous, so that
    `cols.reshape(N * Ho * Wo, k * k * C) @ W.reshape(k * k * C, F)` is the whole convolution.
    """
    # sliding_window_view builds a view of all windows without copying; [::stride] keeps the strided ones.
    windows = sliding_window_view(x_padded, (kernel_size, kernel_size), axis=(1, 2))[:, ::stride, ::stride]
    if x_padded.shape[3] > 1:
        # (N, Ho, Wo, C, k, k) -> (N, Ho, Wo, k, k, C): the copy happens here, once.
        return np.ascontiguousarray(windows.transpose(0, 1, 2, 4, 5, 3))
    # With one channel (grey images into the first layer) that copy would move one float at a time; one
    # copy per kernel offset moves rows of Wo floats instead: 0.3 ms instead of 0.9 ms for conv2d_1 at batch 32.
    cols = np.empty((*windows.shape[:3], kernel_size, kernel_size, 1), dtype=x_padded.dtype)
    for di in range(kernel_size):
        for dj in range(kernel_size):
            cols[:, :, :, di, dj, :] = windows[:, :, :, :, di, dj]
    return cols


def col2im(grad_cols: np.ndarray, padded_shape: tuple[int, ...], stride: int) -> np.ndarray:
    """The adjoint of im2col: add every window's gradient back where the window came from.

    grad_cols: (N, Ho, Wo, k, k, C) -> grad_x_padded: padded_shape (N, Hp, Wp, C).
    Windows overlap when stride < k, so contributions must be summed, not assigned. One sliced `+=`
    per kernel offset (k * k of them) is vectorised over all samples and pixels; np.add.at made an epoch 2.4x
    slower on one thread, 1.8x with two worker threads (docs/HOW_IT_WORKS.md).
    """
    _, out_h, out_w, kernel_size, _, _ = grad_cols.shape
    grad_x = np.zeros(padded_shape, dtype=grad_cols.dtype)
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
        if p > 0:
            x_padded = np.zeros((n, height + 2 * p, width + 2 * p, channels), dtype=x.dtype)
            x_padded[:, p:p + height, p:p + width, :] = x
        else:
            x_padded = x
        cols = im2col(x_padded, k, self.stride)  # (N, Ho, Wo, k, k, C)
        _, out_h, out_w = cols.shape[:3]
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
        self.grads["W"][...] = (cols.T @ grad_rows).reshape(self.params["W"].shape)
        # db = sum of grad_out over every sample and pixel, as a vector-matrix product: for (25088, 32)
        # this is 4x faster than grad_rows.sum(axis=0), which adds row after row.
        self.grads["b"][...] = np.ones(len(grad_rows), dtype=grad_rows.dtype) @ grad_rows
        if not self.need_input_grad:
            return None
        n, out_h, out_w, k, _, channels = self.cols.shape
        # grad_cols = grad_out @ W^T, computed as one batched product per kernel offset, (k*k, N*Ho*Wo, C),
        # and viewed as (N, Ho, Wo, k, k, C): col2im's k*k slices are then contiguous blocks, which makes
        # the whole training step about 9% faster than one (N*Ho*Wo, k*k*C) product.
        weights_by_offset = self.params["W"].reshape(k * k, channels, filters).transpose(0, 2, 1)  # (k*k, F, C)
        grad_cols = np.matmul(grad_rows, weights_by_offset)
        grad_cols = grad_cols.reshape(k, k, n, out_h, out_w, channels).transpose(2, 3, 4, 0, 1, 5)
        grad_padded = col2im(grad_cols, self.padded_shape, self.stride)
        height, width = self.padded_shape[1] - 2 * p, self.padded_shape[2] - 2 * p
        # The padding zeros are constants, not inputs: their gradients are dropped.
        return grad_padded[:, p:p + height, p:p + width, :]


class MaxPool2D(Layer):
    """Max pooling per channel over pool x pool windows, 'valid' (leftover rows/columns are dropped).

    Input (N, H, W, C) -> output (N, Ho, Wo, C), Ho = (H - pool) // stride + 1. stride defaults to pool
    (non-overlapping windows); stride < pool gives overlapping windows.
    Backward: each window's gradient goes to the one input that was its maximum; with ties, to the
    first maximum in row-major order. (A mask `x == max` would send it to every tied input, and ties
    are common: after a ReLU, a window of the MNIST background is four exact zeros.)
    """

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
        grad_in = np.zeros(self.x_shape, dtype=grad_out.dtype)
        overlapping = self.stride < self.pool_size
        for offset, row_slice, col_slice in self._offsets(out_h, out_w):
            if overlapping:  # two windows can share an input pixel: their gradients add up
                grad_in[:, row_slice, col_slice, :] += grad_out * self.winner[offset]
            else:  # each input pixel is in at most one window: write in place, no temporary
                np.multiply(grad_out, self.winner[offset], out=grad_in[:, row_slice, col_slice, :])
        return grad_in


class ReLU(Layer):
    """y = max(x, 0), elementwise, any shape. Backward: dx = grad_out * (x > 0)."""

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        positive = x > 0
        if training:
            self.positive = positive
        # x * (x > 0) is max(x, 0) for finite x (negative inputs give -0.0, which equals 0; -inf would give NaN,
        # in a run that is diverging anyway) and here about 1.5x faster than np.maximum(x, 0), whose NaN
        # handling costs more than the multiply (bench/why_fast.py).
        return x * positive

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return grad_out * self.positive


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


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, (N, K) -> (N, K); shifted by each row's max so that exp() cannot overflow."""
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels.

    logits (N, K), labels (N,) -> loss = mean_n( logsumexp(logits_n) - logits_n[label_n] ).
    Backward: dLoss/dlogits = (softmax(logits) - onehot(labels)) / N.
    """

    def forward(self, logits: np.ndarray, labels: np.ndarray) -> float:
        # Subtracting the row max changes nothing mathematically but keeps exp() from overflowing. The log
        # probabilities come from log-sum-exp, not log(softmax): a probability of exp(-20000) is 0 in
        # floating point, and log(0) would make the loss infinite where it is really 20000.
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_sum_exp = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        log_probs = shifted - log_sum_exp
        rows = np.arange(len(labels))
        self.probs, self.labels = np.exp(log_probs), labels
        return float(-log_probs[rows, labels].mean())

    def backward(self) -> np.ndarray:
        grad = self.probs.copy()
        grad[np.arange(len(self.labels)), self.labels] -= 1
        return grad / len(self.labels)


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


class Sequential:
    """A stack of layers applied in order; backward runs them in reverse (the chain rule).

    `timings`, when set to a dict, collects the seconds spent per (layer name, "forward", "backward" or
    "inference"), and in whatever else runs in a `timed` block (for --profile).
    """

    def __init__(self, layers: list[Layer], input_shape: tuple[int, ...] | None = None) -> None:
        self.layers = layers
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.names = layer_names(layers)
        self.timings: dict[tuple[str, str], float] | None = None
        # Nothing upstream of the first layer with weights needs dLoss/dx: skipping it saves a col2im per batch.
        first = next((layer for layer in layers if layer.params), None)
        if first is not None:
            first.need_input_grad = False

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        for name, layer in zip(self.names, self.layers):
            # Timed apart from training passes, so that the profile of training leaves evaluation out.
            with self.timed(name, "forward" if training else "inference"):
                x = layer.forward(x, training)
        return x

    def backward(self, grad_out: np.ndarray) -> np.ndarray | None:
        for name, layer in zip(reversed(self.names), reversed(self.layers)):
            with self.timed(name, "backward"):
                grad_out = layer.backward(grad_out)
            if grad_out is None:  # the first layer with weights skipped dx: nothing below needs it
                break
        return grad_out

    @contextmanager
    def timed(self, part: str, direction: str) -> Iterator[None]:
        """Add the seconds spent in the with-block to timings[(part, direction)] when profiling."""
        start = time.perf_counter()
        yield
        if self.timings is not None:
            self.timings[part, direction] = self.timings.get((part, direction), 0.0) + time.perf_counter() - start

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

    def replicate(self) -> Sequential:
        """A twin that shares this model's weights (the same arrays) but has its own gradients and its own
        saved activations, so that it can run another slice of the batch at the same time (DataParallel).
        This relies on every layer's forward and backward making new arrays rather than reusing a buffer kept
        on the layer: such a buffer would be shared by the twins, and their threads would overwrite it."""
        layers = []
        for layer in self.layers:
            twin = copy.copy(layer)  # shallow: twin.params is the very dict of the very arrays of layer.params
            twin.grads = {name: np.zeros_like(grad) for name, grad in layer.grads.items()}
            layers.append(twin)
        return Sequential(layers, self.input_shape)

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


def build_model(
    model_cfg: dict, input_shape: tuple[int, int, int], num_classes: int, rng: np.random.Generator
) -> Sequential:
    """Conv2D -> ReLU -> MaxPool2D for each entry of model_cfg['conv_layers'] (pooling skipped when
    pool_size is 0 or null), then Flatten -> Dense(dense_units) -> ReLU -> Dense(num_classes).

    Shapes are inferred from input_shape (H, W, C); a layer that would shrink the image below 1x1
    raises ConfigError naming it.
    """
    layers: list[Layer] = []
    shape = tuple(input_shape)
    for index, spec in enumerate(model_cfg["conv_layers"]):
        where = f"model.conv_layers[{index}]"
        k, p = spec["kernel_size"], spec["padding"]
        if k > shape[0] + 2 * p or k > shape[1] + 2 * p:
            raise ConfigError(
                f"{where}: kernel_size {k} is larger than its padded input "
                f"{shape[0] + 2 * p}x{shape[1] + 2 * p} (input {shape[0]}x{shape[1]}, padding {p})"
            )
        conv = Conv2D(shape[2], spec["filters"], k, spec["stride"], p, rng=rng)
        layers += [conv, ReLU()]
        shape = conv.output_shape(shape)
        if spec.get("pool_size"):
            pool = MaxPool2D(spec["pool_size"], spec.get("pool_stride"))
            if pool.pool_size > shape[0] or pool.pool_size > shape[1]:
                raise ConfigError(
                    f"{where}: pool_size {pool.pool_size} is larger than the {shape[0]}x{shape[1]} image "
                    "it pools (reduce pool_size, use padding, or drop a layer)"
                )
            layers.append(pool)
            shape = pool.output_shape(shape)
    flat = math.prod(shape)
    layers += [Flatten(), Dense(flat, model_cfg["dense_units"], rng=rng), ReLU(),
               Dense(model_cfg["dense_units"], num_classes, rng=rng)]
    return Sequential(layers, input_shape)


# ------------------------------------------------------------------------------------------------
# Optimisers
# ------------------------------------------------------------------------------------------------


def _slot(state: dict[str, np.ndarray], key: str, param: np.ndarray) -> np.ndarray:
    """The optimiser's array state[key], created as zeros shaped like param on first use. (Not
    state.setdefault(key, np.zeros_like(param)): that would allocate the zeros at every step.)"""
    if key not in state:
        state[key] = np.zeros_like(param)
    return state[key]


def _parameters(model: Sequential) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(key, weights, gradient) for every weight array; the key, like '3.W', is its layer number and name."""
    for index, layer in enumerate(model.layers):
        for name, param in layer.params.items():
            yield f"{index}.{name}", param, layer.grads[name]


class SGD:
    """Stochastic gradient descent with momentum (PyTorch's form): v = momentum * v + g;  w -= lr * v."""

    def __init__(self, learning_rate: float = 0.01, momentum: float = 0.9) -> None:
        self.learning_rate, self.momentum = learning_rate, momentum
        self.state: dict[str, np.ndarray] = {}

    def step(self, model: Sequential) -> None:
        for key, param, grad in _parameters(model):
            velocity = _slot(self.state, f"{key}.velocity", param)
            velocity *= self.momentum
            velocity += grad
            param -= self.learning_rate * velocity


class Adam:
    """Adam (Kingma & Ba, 2015) with bias correction.

    m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;  w -= lr * m_hat / (sqrt(v_hat) + eps),
    where m_hat = m / (1 - b1^t) and v_hat = v / (1 - b2^t) undo the zero start of m and v.
    """

    def __init__(self, learning_rate: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        self.learning_rate, self.beta1, self.beta2, self.eps = learning_rate, beta1, beta2, eps
        self.t = 0
        self.state: dict[str, np.ndarray] = {}
        self.scratch: dict[str, np.ndarray] = {}

    def step(self, model: Sequential) -> None:
        self.t += 1
        step_size = self.learning_rate / (1 - self.beta1 ** self.t)
        correction2_sqrt = math.sqrt(1 - self.beta2 ** self.t)
        for key, param, grad in _parameters(model):
            m, v = _slot(self.state, f"{key}.m", param), _slot(self.state, f"{key}.v", param)
            # In plain NumPy this step is
            #     m = b1 * m + (1 - b1) * g;  v = b2 * v + (1 - b2) * g**2
            #     param -= lr * (m / c1) / (np.sqrt(v / c2) + eps)
            # It runs for every weight at every batch, so it works in place through one scratch array:
            # fresh temporaries for each of the ~10 operations would cost more than the arithmetic.
            scratch = self.scratch.get(key)
            if scratch is None or scratch.shape != param.shape or scratch.dtype != param.dtype:
                scratch = self.scratch[key] = np.empty_like(param)
            m *= self.beta1
            m += np.multiply(grad, 1 - self.beta1, out=scratch)
            v *= self.beta2
            np.multiply(grad, grad, out=scratch)
            v += np.multiply(scratch, 1 - self.beta2, out=scratch)
            # Same arithmetic as PyTorch: w -= (lr / c1) * m / (sqrt(v) / sqrt(c2) + eps). The denominator is
            # built in scratch, then scratch is overwritten with the step itself.
            denominator = np.sqrt(v, out=scratch)
            denominator /= correction2_sqrt
            denominator += self.eps
            step = np.divide(m, denominator, out=scratch)
            param -= np.multiply(step, step_size, out=scratch)


def make_optimizer(training_cfg: dict) -> SGD | Adam:
    if training_cfg["optimizer"] == "sgd":
        return SGD(training_cfg["learning_rate"], training_cfg["momentum"])
    return Adam(training_cfg["learning_rate"])


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def write_atomic(path: Path, write: Callable[[Any], None], binary: bool = True) -> None:
    """Write to a temporary file beside `path`, then rename it into place: a crash or Ctrl-C midway
    leaves the old file (or none) rather than half a file."""
    path = Path(path)
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


DATASETS = ("mnist", "fashion_mnist", "digits", "synthetic")
DIGIT_NAMES = [str(digit) for digit in range(10)]
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
OPENML_NAMES = {"mnist": "mnist_784", "fashion_mnist": "Fashion-MNIST"}
OPENML_HOST = "www.openml.org"  # where scikit-learn's fetch_openml downloads from
IDX_FILES = {  # split -> (images, labels), without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class Dataset:
    """Train and test images (N, H, W, C) float32 in [0, 1] with integer labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    name: str
    source: str  # where the images came from: idx, cache, openml, sklearn or synthetic
    note: str = ""  # a sentence for humans: which files, what was held out, why a fallback happened

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def make_rngs(seed: int) -> dict[str, np.random.Generator]:
    """Independent random streams for data sampling, weight initialisation and shuffling, all from one seed,
    so that changing (say) the model does not change which images are drawn."""
    streams = np.random.SeedSequence(seed).spawn(3)
    return {name: np.random.default_rng(s) for name, s in zip(("data", "init", "shuffle"), streams)}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a uint8 array.

    Layout: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, one big-endian
    uint32 per dimension, then the data. Raises DataError naming the file for anything else.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:  # zlib.error: a damaged .gz
        raise DataError(f"{path}: cannot read it ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        magic = raw[:4].hex() if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic number {magic}, "
                        "expected 00000801 for labels or 00000803 for images)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise DataError(f"{path}: header promises {expected:,} bytes of data for shape {shape}, "
                        f"file holds {len(raw) - header:,} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    # Besides the standard names, accept the 'train-images.idx3-ubyte' spelling some archives use.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_split(folder: Path, split: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray] | None:
    """Images (N, H, W) uint8 and labels (N,) of one split from an IDX folder; None if its files are absent."""
    image_stem, label_stem = IDX_FILES[split]
    image_path, label_path = _find_idx(folder, image_stem), _find_idx(folder, label_stem)
    if image_path is None and label_path is None:
        return None
    if image_path is None or label_path is None:
        present, missing = (image_path, label_stem) if label_path is None else (label_path, image_stem)
        raise DataError(f"{folder}: found {present.name} but not {missing}[.gz] beside it")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3:
        raise DataError(f"{image_path}: expected images of 3 dimensions (N, H, W), found shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{label_path}: expected labels of 1 dimension (N,), found shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{image_path.name} holds {len(images):,} images but {label_path.name} "
                        f"holds {len(labels):,} labels")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{label_path}: label {int(labels.max())} is out of range 0..{num_classes - 1}")
    return images, labels


def load_idx_folder(folder: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """(train, test) from a folder of IDX files; test is None when the folder has no t10k files."""
    if not folder.is_dir():
        raise DataError(f"data.path (--data-path): {folder} is not a folder")
    train = load_idx_split(folder, "train")
    if train is None:
        raise DataError(f"{folder}: no {IDX_FILES['train'][0]}[.gz] / {IDX_FILES['train'][1]}[.gz] in this folder")
    test = load_idx_split(folder, "test")
    if test is not None and test[0].shape[1:] != train[0].shape[1:]:
        raise DataError(f"{folder}: test images are {test[0].shape[1:]} but training images {train[0].shape[1:]}")
    return train, test


def load_cache(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """The .npz written after a successful download, or None (with a warning) if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = [archive[key] for key in ("x_train", "y_train", "x_test", "y_test")]
    except Exception as error:  # any damage means: ignore the cache and download again
        log.warning("ignoring the unreadable cache %s (%s)", path, error)
        return None
    for images, labels in (arrays[:2], arrays[2:]):
        if (images.shape[1:] != (28, 28) or images.dtype != np.uint8 or labels.shape != images.shape[:1]
                or labels.dtype.kind not in "iu" or (len(labels) and labels.max() > 9)):
            log.warning("ignoring the cache %s: it does not hold 28x28 uint8 images with labels 0-9", path)
            return None
    return (arrays[0], arrays[1]), (arrays[2], arrays[3])


def download_openml(name: str, cache_dir: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST or Fashion-MNIST from OpenML: the first 60,000 rows are the official training split,
    the last 10,000 the test split. Imported lazily: scikit-learn takes a second to import."""
    import urllib.request

    # Offline, fetch_openml fails only after scikit-learn's import and three retries a second apart; when
    # the host's name does not resolve (and no proxy would resolve it, and scikit-learn has no files cached),
    # fail at once instead: that is 5 s of the default run on a machine without internet. (A passing DNS
    # hiccup then costs a synthetic run, loudly labelled, where a retry might have got through.)
    if not urllib.request.getproxies().get("https") and not (cache_dir / "openml").exists():
        try:
            socket.getaddrinfo(OPENML_HOST, 443)
        except OSError as error:
            raise ConnectionError(f"cannot look up {OPENML_HOST}: {error}") from None
    from sklearn.datasets import fetch_openml

    log.info("downloading %s from OpenML (the first download and parse can take a minute) ...", OPENML_NAMES[name])
    with warnings.catch_warnings():  # scikit-learn warns at each retry; the failure itself is reported below
        warnings.simplefilter("ignore")
        bunch = fetch_openml(OPENML_NAMES[name], version=1, as_frame=False, parser="liac-arff",
                             data_home=str(cache_dir))
    images = np.asarray(bunch.data, dtype=np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(bunch.target).astype(np.uint8)
    return (images[:60000], labels[:60000]), (images[60000:], labels[60000:])


# The seven segments of a pocket-calculator display, as (x0, y0, x1, y1) in a unit box (y downwards),
# and which segments light up for each digit: the synthetic fallback draws these, so it has real
# class structure (and the same labels as MNIST) while needing no download.
SEGMENTS = np.array([(0, 0, 1, 0), (1, 0, 1, .5), (1, .5, 1, 1), (0, 1, 1, 1),
                     (0, .5, 0, 1), (0, 0, 0, .5), (0, .5, 1, .5)], dtype=np.float32)
SEGMENTS_ON = np.array([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0], [1, 1, 0, 1, 1, 0, 1],
                        [1, 1, 1, 1, 0, 0, 1], [0, 1, 1, 0, 0, 1, 1], [1, 0, 1, 1, 0, 1, 1],
                        [1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1],
                        [1, 1, 1, 1, 0, 1, 1]], dtype=bool)


def make_synthetic(n: int, rng: np.random.Generator, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic digits (see draw_seven_segments), drawn 1,000 at a time to keep the temporaries small."""
    chunks = [draw_seven_segments(min(1000, n - start), rng, size) for start in range(0, n, 1000)]
    if not chunks:
        return np.zeros((0, size, size), dtype=np.uint8), np.zeros(0, dtype=np.uint8)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def draw_seven_segments(n: int, rng: np.random.Generator, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """n seven-segment digits (uint8 images (n, size, size), labels (n,)) with random size, slant, stroke
    width, segment brightness and noise, centred on their centre of mass give or take 1.5 pixels, as MNIST's
    digits are (and as prepare_image centres image files). About 1 digit in 10 misses a segment, which can
    make it another digit (an 8 without its middle is a 0): like handwriting, not every image is certain.
    """
    labels = rng.integers(0, 10, n)
    width, height = rng.uniform(7, 12, (n, 1)), rng.uniform(14, 20, (n, 1))
    slant, stroke = rng.uniform(-0.25, 0.25, (n, 1)), rng.uniform(0.8, 2.0, (n, 1))
    lit = SEGMENTS_ON[labels] & (rng.random((n, len(SEGMENTS))) > 0.02)  # (n, 7): each segment drops out 2%
    brightness = rng.uniform(0.5, 1.0, (n, len(SEGMENTS))) * lit
    x0, y0, x1, y1 = SEGMENTS.T  # each (7,)
    # Segment end points (n, 7) of a digit whose box starts at (0, 0); slant shifts x in proportion to
    # the height above the middle.
    ax, ay = width * x0 + slant * height * (0.5 - y0), height * y0
    bx, by = width * x1 + slant * height * (0.5 - y1), height * y1
    # Centre of mass: the lit segments' midpoints weighted by their lengths. Move it to the middle.
    mass = np.hypot(bx - ax, by - ay) * brightness + 1e-6  # + 1e-6: a digit with no segment left
    centre_x = (mass * (ax + bx) / 2).sum(axis=1, keepdims=True) / mass.sum(axis=1, keepdims=True)
    centre_y = (mass * (ay + by) / 2).sum(axis=1, keepdims=True) / mass.sum(axis=1, keepdims=True)
    shift_x = size / 2 - centre_x + rng.uniform(-1.5, 1.5, (n, 1))
    shift_y = size / 2 - centre_y + rng.uniform(-1.5, 1.5, (n, 1))
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((n, size, size), dtype=np.float32)
    # The drawing below touches every pixel of every digit: in float32 rather than float64, 6,000 digits take
    # 0.6 s instead of 1.6 s.
    ax, ay, bx, by = (end.astype(np.float32) for end in (ax + shift_x, ay + shift_y, bx + shift_x, by + shift_y))
    stroke, brightness = stroke.astype(np.float32), brightness.astype(np.float32)
    for segment in range(len(SEGMENTS)):
        start_x, start_y = ax[:, segment, None, None], ay[:, segment, None, None]
        dx, dy = (bx - ax)[:, segment, None, None], (by - ay)[:, segment, None, None]
        # Distance from every pixel to the segment: project onto it, clip to its ends.
        t = np.clip(((cols - start_x) * dx + (rows - start_y) * dy) / (dx * dx + dy * dy), 0, 1)
        distance = np.hypot(cols - (start_x + t * dx), rows - (start_y + t * dy))
        ink = np.clip(stroke[:, :, None] + 0.5 - distance, 0, 1) * brightness[:, segment, None, None]
        np.maximum(images, ink, out=images)
    images += rng.normal(0, 0.08, images.shape).astype(np.float32)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.uint8)


def _draw(split: tuple[np.ndarray, np.ndarray], n: int, rng: np.random.Generator, what: str) -> tuple:
    images, labels = split
    if n > len(images):
        raise DataError(f"{what} = {n:,} but only {len(images):,} images are available")
    chosen = rng.choice(len(images), n, replace=False)
    return images[chosen], labels[chosen]


def _hold_out(images: np.ndarray, labels: np.ndarray, n_train: int, n_test: int, rng: np.random.Generator,
              what: str) -> tuple[tuple, tuple]:
    """Disjoint random train and test draws from one pool that has no official test split."""
    if n_train + n_test > len(images):
        raise DataError(f"{what}: n_train + n_test = {n_train + n_test:,} but only {len(images):,} images "
                        "are available (they are split between training and test)")
    order = rng.permutation(len(images))
    test, train = order[:n_test], order[n_test:n_test + n_train]
    return (images[train], labels[train]), (images[test], labels[test])


def load_data(data_cfg: dict) -> Dataset:
    """Load data_cfg['dataset'] and draw n_train / n_test images from it with the seed.

    MNIST and Fashion-MNIST come from, in order: the IDX folder data_cfg['path'], the cache in
    data_cfg['cache_dir'], a download from OpenML (cached afterwards), and, if all fail and
    allow_synthetic_fallback is on, synthetic seven-segment digits, loudly labelled as such.
    """
    name, n_train, n_test = data_cfg["dataset"], data_cfg["n_train"], data_cfg["n_test"]
    rng = make_rngs(data_cfg["random_seed"])["data"]
    class_names = FASHION_NAMES if name == "fashion_mnist" else DIGIT_NAMES
    if data_cfg["path"] and name in ("digits", "synthetic"):
        log.warning("data.path %s is ignored: the %s data set is built in", data_cfg["path"], name)
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = (bunch.images * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
        train, test = _hold_out(images, bunch.target, n_train, n_test, rng, "data (digits)")
        return _to_dataset(train, test, class_names, name, "sklearn",
                           "scikit-learn's 1,797 8x8 digits, split at random into training and test")
    if name == "synthetic":
        return _to_dataset(make_synthetic(n_train, rng), make_synthetic(n_test, rng), class_names, name,
                           "synthetic", "synthetic seven-segment digits (asked for in the config)")

    if data_cfg["path"]:
        folder = Path(data_cfg["path"])
        train, test = load_idx_folder(folder)
        if test is None:
            train, test = _hold_out(*train, n_train, n_test, rng, f"data ({folder})")
            note = (f"IDX files in {folder}; it has no t10k files, so {n_test:,} training images were held out "
                    "as the test set")
            return _to_dataset(train, test, class_names, name, "idx", note)
        return _to_dataset(_draw(train, n_train, rng, "data.n_train"), _draw(test, n_test, rng, "data.n_test"),
                           class_names, name, "idx", f"IDX files in {folder}")

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
            log.warning("Training on synthetic seven-segment digits instead: the accuracy says nothing about %s.", name)
            log.warning("!" * 78)
            return _to_dataset(make_synthetic(n_train, rng), make_synthetic(n_test, rng), DIGIT_NAMES, name,
                               "synthetic", "FALLBACK: " + reason)
        source, note = "openml", f"downloaded from OpenML ({OPENML_NAMES[name]}), cached in {cache}"
        write_atomic(cache, lambda f: np.savez_compressed(
            f, x_train=splits[0][0], y_train=splits[0][1], x_test=splits[1][0], y_test=splits[1][1]))
    train, test = splits
    return _to_dataset(_draw(train, n_train, rng, "data.n_train"), _draw(test, n_test, rng, "data.n_test"),
                       class_names, name, source, note)


def _to_dataset(train: tuple, test: tuple, class_names: list[str], name: str, source: str, note: str) -> Dataset:
    """uint8 images (N, H, W) -> float32 (N, H, W, 1) in [0, 1]; labels -> int64."""
    def scale(images: np.ndarray) -> np.ndarray:
        return (images.astype(DTYPE) / 255)[..., None]

    return Dataset(scale(train[0]), train[1].astype(np.int64), scale(test[0]), test[1].astype(np.int64),
                   list(class_names), name, source, note)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What train() did: one history row per completed epoch, and how it ended.

    status: "completed", "interrupted" (a stop was requested) or "diverged" (loss or weights not finite);
    stopped_at: for the last two, the epoch and batch where it happened (and, when diverged, why);
    batches: how many training batches ran in all (for --profile's time per batch).
    """

    history: list[dict] = field(default_factory=list)
    status: str = "completed"
    stopped_at: dict | None = None
    batches: int = 0


class ProgressBar:
    """A one-line progress bar inside an epoch, redrawn at most 10 times a second; silent when the output
    is not a terminal (a log file or a pipe should not fill up with carriage returns)."""

    def __init__(self, total: int, label: str, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = self.stream.isatty()
        self.total, self.label, self.last_draw = total, label, 0.0

    def update(self, done: int, loss: float) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last_draw < 0.1 and done < self.total):
            return
        self.last_draw = now
        filled = 30 * done // self.total
        self.stream.write(f"\r{self.label} [{'=' * filled}{' ' * (30 - filled)}] {done}/{self.total} loss {loss:.4f}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()


# A worker thread pays off only for a big slice of the batch. With small arrays NumPy's time goes to Python's
# own overhead, which holds the GIL, so threads wait for each other: on 2 cores (bench/why_fast.py), 8x8 digits
# at batch 32 trained 1.66x slower on 2 workers than on 1, while 28x28 images trained 1.12-1.20x faster. The
# size of the largest activation of a slice tells the two cases apart.
MIN_ACTIVATION_PER_WORKER = 250_000


def default_workers(model: Sequential | None = None, batch_size: int | None = None) -> int:
    """As many training threads as BLAS would use (every usable CPU, unless OPENBLAS_NUM_THREADS,
    OMP_NUM_THREADS, MKL_NUM_THREADS or a threadpoolctl limit says fewer); given the model and the batch size,
    fewer, so that each worker's slice holds at least MIN_ACTIVATION_PER_WORKER values in its largest layer."""
    threads = max(min((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"),
                      default=1), 1)
    if model is None or model.input_shape is None or batch_size is None:
        return threads
    largest = max(math.prod(row["output_shape"]) for row in model.summary_rows())
    return max(min(threads, batch_size * largest // MIN_ACTIVATION_PER_WORKER), 1)


def forward_backward(model: Sequential, x: np.ndarray, labels: np.ndarray,
                     share: float = 1.0) -> tuple[np.ndarray, float]:
    """Forward, loss and backward for one batch: returns logits (N, K) and the mean loss, and leaves
    share * dLoss/dweights in the layers' grads. (No backward from a loss that is not finite.)"""
    loss_fn = SoftmaxCrossEntropy()
    logits = model.forward(x)
    loss = loss_fn.forward(logits, labels)
    if math.isfinite(loss):
        grad_logits = loss_fn.backward()
        if share != 1.0:
            grad_logits *= share
        model.backward(grad_logits)
    return logits, loss


class DataParallel:
    """Runs every batch as `workers` slices at once: one thread and one replica of the model per slice.

    Why: NumPy does the elementwise work (im2col, col2im, ReLU, pooling) on one core; only the matrix
    multiplies spread over cores, through BLAS. A slice of the batch per thread keeps every core busy all
    the time: NumPy releases Python's GIL inside its loops, so the threads really do run at once. BLAS is
    held to one thread meanwhile, or its threads and the workers would fight over the cores. On 2 cores an
    epoch of 2,000 images took 1.14-1.17 s, against 1.30-1.33 s on one thread with 2 BLAS threads (two runs of
    bench/why_fast.py).

    The gradient is the whole batch's: the loss is a mean over N samples, so for slices s of N_s samples,
    dLoss/dw = sum_s (N_s / N) * dLoss_s/dw. Each replica starts its backward from (N_s / N) * dLoss_s/dlogits
    and the model's grads are the sum of the replicas'. Use as `with DataParallel(model, workers) as parallel:`.
    """

    def __init__(self, model: Sequential, workers: int = 1) -> None:
        self.model, self.workers = model, max(workers, 1)
        self.replicas: list[Sequential] = []

    def __enter__(self) -> DataParallel:
        if self.workers > 1:
            self.replicas = [self.model.replicate() for _ in range(self.workers)]
            for replica in self.replicas:
                replica.timings = None if self.model.timings is None else {}
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="worker")
            self.blas_limit = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.replicas:
            return
        try:
            self.pool.shutdown()  # first: a worker still running (after another one failed) keeps one BLAS thread
        finally:  # even when a second Ctrl-C interrupts the wait
            self.blas_limit.restore_original_limits()
        if self.model.timings is not None:  # the workers ran side by side, so their mean is the wall time
            for replica in self.replicas:
                for key, seconds in (replica.timings or {}).items():
                    self.model.timings[key] = self.model.timings.get(key, 0.0) + seconds / self.workers
        self.replicas = []

    def _map(self, function: Callable, *iterables: Iterable) -> list:
        """pool.map(function, *iterables), each call under the calling thread's np.errstate: NumPy keeps its
        error settings per thread, and a new thread starts from the defaults (which warn on overflow)."""
        settings = np.geterr()

        def with_settings(*args: Any) -> Any:
            with np.errstate(**settings):
                return function(*args)
        return list(self.pool.map(with_settings, *iterables))

    def _parts(self, n: int) -> list[slice]:
        """`workers` contiguous slices of range(n), as equal as can be."""
        bounds = [n * worker // self.workers for worker in range(self.workers + 1)]
        return [slice(start, stop) for start, stop in zip(bounds, bounds[1:])]

    def forward_backward(self, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        """forward_backward() of the whole batch, leaving dLoss/dweights in the model's grads."""
        if not self.replicas or len(x) < self.workers:  # fewer samples than workers: one slice would be empty
            return forward_backward(self.model, x, labels)
        parts = self._parts(len(x))
        sizes = [part.stop - part.start for part in parts]

        def slice_pass(replica: Sequential, part: slice, size: int) -> tuple[np.ndarray, float]:
            return forward_backward(replica, x[part], labels[part], share=size / len(x))

        results = self._map(slice_pass, self.replicas, parts, sizes)
        for layer, twins in zip(self.model.layers, zip(*(replica.layers for replica in self.replicas))):
            for name, grad in layer.grads.items():  # into the model's own arrays, which the optimiser reads
                np.add(twins[0].grads[name], twins[1].grads[name], out=grad)
                for twin in twins[2:]:
                    grad += twin.grads[name]
        loss = sum(part_loss * size for (_, part_loss), size in zip(results, sizes)) / len(x)
        return np.concatenate([logits for logits, _ in results]), loss

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """model.evaluate(x, y) in batches of EVAL_BATCH_SIZE, each worker taking a contiguous part of the set."""
        if not self.replicas or len(x) < self.workers:
            return self.model.evaluate(x, y, EVAL_BATCH_SIZE)
        parts = self._parts(len(x))
        results = self._map(lambda replica, part: replica.evaluate(x[part], y[part], EVAL_BATCH_SIZE),
                            self.replicas, parts)
        sizes = [part.stop - part.start for part in parts]
        loss = sum(part_loss * size for (part_loss, _), size in zip(results, sizes)) / len(x)
        correct = sum(round(accuracy * size) for (_, accuracy), size in zip(results, sizes))
        return loss, correct / len(x)


def weights_finite(model: Sequential) -> bool:
    return all(np.isfinite(p).all() for layer in model.layers for p in layer.params.values())


def train(
    model: Sequential,
    optimizer: SGD | Adam,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    should_stop: Callable[[], bool] = lambda: False,
    first_epoch: int = 1,
    workers: int | None = None,
) -> TrainResult:
    """Mini-batch training: each epoch shuffles the training set, and for every batch runs
    forward -> loss -> backward -> optimiser step; then it evaluates on the test set.

    workers: threads that each take a slice of every batch (DataParallel); None: default_workers(model, batch_size).
    Stops early, with the matching status, when the loss or a weight stops being finite (diverged) or
    when should_stop() turns true after a batch (interrupted). first_epoch numbers the epochs of a
    continued run.
    """
    result = TrainResult()
    n_train = len(data.x_train)
    # Guessing at random costs log(classes); a loss 1000 times that is an explosion, even while finite.
    loss_limit = 1000 * math.log(max(data.num_classes, 2))
    n_batches = math.ceil(n_train / batch_size)
    with DataParallel(model, workers if workers is not None else default_workers(model, batch_size)) as parallel:
        for epoch in range(first_epoch, first_epoch + epochs):
            start = time.perf_counter()
            order = rng.permutation(n_train)
            bar = ProgressBar(n_batches, f"epoch {epoch}/{first_epoch + epochs - 1}")
            total_loss, correct = 0.0, 0
            for batch in range(n_batches):
                chosen = order[batch * batch_size:(batch + 1) * batch_size]
                x, labels = data.x_train[chosen], data.y_train[chosen]
                logits, loss = parallel.forward_backward(x, labels)
                if not loss < loss_limit:  # also catches NaN, for which every comparison is false
                    bar.close()
                    result.status = "diverged"
                    result.stopped_at = {"epoch": epoch, "batch": batch + 1, "reason": f"the loss became {loss:.4g}"}
                    return result
                with model.timed("optimizer", "step"):
                    optimizer.step(model)
                result.batches += 1
                total_loss += loss * len(labels)
                correct += int((logits.argmax(axis=1) == labels).sum())
                bar.update(batch + 1, loss)
                if should_stop():
                    bar.close()
                    result.status, result.stopped_at = "interrupted", {"epoch": epoch, "batch": batch + 1}
                    return result
            bar.close()
            seconds = time.perf_counter() - start
            if not weights_finite(model):
                result.status = "diverged"
                result.stopped_at = {"epoch": epoch, "batch": n_batches, "reason": "a weight became infinite or NaN"}
                return result
            test_loss, test_accuracy = parallel.evaluate(data.x_test, data.y_test)
            row = {"epoch": epoch, "train_loss": total_loss / n_train, "train_accuracy": correct / n_train,
                   "test_loss": test_loss, "test_accuracy": test_accuracy, "seconds": round(seconds, 3),
                   "images_per_second": round(n_train / seconds, 1)}
            result.history.append(row)
            log.info("epoch %*d/%d  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%%  %.1fs  %.0f img/s",
                     len(str(first_epoch + epochs - 1)), epoch, first_epoch + epochs - 1, row["train_loss"],
                     100 * row["train_accuracy"], test_loss, 100 * test_accuracy, seconds,
                     row["images_per_second"])
            if should_stop():
                result.status, result.stopped_at = "interrupted", {"epoch": epoch, "batch": n_batches}
                return result
    return result


def profile_table(model: Sequential, n_batches: int) -> str:
    """Seconds per layer and direction collected in model.timings, as a table with each row's share."""
    timings = model.timings or {}
    rows = [(name, timings.get((name, "forward"), 0.0), timings.get((name, "backward"), 0.0)) for name in model.names]
    # The optimiser step is no backward pass, but it runs after it: its seconds go in that column, so that the
    # columns add up to the time of the training batches.
    rows.append(("optimizer step", 0.0, timings.get(("optimizer", "step"), 0.0)))
    total = sum(forward + backward for _, forward, backward in rows) or 1.0
    lines = [f"{'layer':<18}{'forward s':>11}{'backward s':>12}{'ms/batch':>10}{'share':>8}", "-" * 59]
    for name, forward, backward in rows:
        per_batch = 1000 * (forward + backward) / max(n_batches, 1)
        share = 100 * (forward + backward) / total
        lines.append(f"{name:<18}{forward:>11.3f}{backward:>12.3f}{per_batch:>10.2f}{share:>7.1f}%")
    lines += ["-" * 59, f"{'total':<18}{sum(r[1] for r in rows):>11.3f}{sum(r[2] for r in rows):>12.3f}"
              f"{1000 * total / max(n_batches, 1):>10.2f}{100.0:>7.1f}%"]
    return "\n".join(lines)


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


def numeric_gradient(objective: Callable[[], float], array: np.ndarray, coords: np.ndarray,
                     eps: float = 1e-6) -> np.ndarray:
    """Central differences (f(a + eps) - f(a - eps)) / 2eps at the given flat coordinates of `array`,
    which objective() must read (it is changed in place and restored)."""
    flat = array.reshape(-1)  # a view: array must be contiguous
    grads = np.empty(len(coords))
    for i, coord in enumerate(coords):
        original = flat[coord]
        flat[coord] = original + eps
        plus = objective()
        flat[coord] = original - eps
        minus = objective()
        flat[coord] = original
        grads[i] = (plus - minus) / (2 * eps)
    return grads


def gradient_check(model: Sequential, x: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                   n_coords: int = 20, tolerance: float = 1e-6) -> list[dict]:
    """Check each layer's backward pass near its real input inside the model, in float64.

    For layer L with input a and a random upstream gradient G, the objective sum(L(a) * G) has gradient
    L.backward(G) with respect to a, and L.grads with respect to its weights; both are compared with
    central differences on n_coords random coordinates per tensor, at the real input plus uniform noise of
    +-0.01 (so that no ReLU zero or pooling tie sits exactly on a kink). A last check runs the whole model
    and loss end to end. Returns one row per tensor: layer, tensor, shape, coordinates, error, ok.
    The model's weights are converted to float64 in place.
    """
    for layer in model.layers:
        for name in layer.params:
            layer.params[name] = layer.params[name].astype(np.float64)
            layer.grads[name] = np.zeros_like(layer.params[name])
    names = model.names
    rows: list[dict] = []

    def check(layer_name: str, tensor: str, array: np.ndarray, analytic: np.ndarray, objective: Callable) -> None:
        coords = rng.choice(array.size, min(n_coords, array.size), replace=False)
        error = relative_error(analytic.reshape(-1)[coords], numeric_gradient(objective, array, coords))
        rows.append({"layer": layer_name, "tensor": tensor, "shape": list(array.shape), "coords": len(coords),
                     "max_rel_error": error, "ok": error < tolerance})

    activation = np.ascontiguousarray(x, dtype=np.float64)
    for name, layer in zip(names, model.layers):
        # A ReLU's output has exact zeros, so the next pooling window may hold a tie of zeros: there the slope
        # is undefined and central differences give half of it. Check each layer at a nearby tie-free point.
        probe = activation + rng.uniform(-0.01, 0.01, activation.shape)
        upstream = rng.standard_normal(layer.forward(probe).shape)

        def objective(layer: Any = layer, probe: np.ndarray = probe, upstream: np.ndarray = upstream) -> float:
            return float(np.sum(layer.forward(probe, training=False) * upstream))

        needed, layer.need_input_grad = layer.need_input_grad, True
        layer.forward(probe)
        grad_in = layer.backward(upstream)
        layer.need_input_grad = needed
        check(name, "input", probe, grad_in, objective)
        for tensor, param in layer.params.items():
            check(name, tensor, param, layer.grads[tensor].copy(), objective)
        activation = np.ascontiguousarray(layer.forward(activation, training=False))

    loss_fn = SoftmaxCrossEntropy()
    loss_fn.forward(activation, labels)
    check("softmax_ce", "logits", activation, loss_fn.backward(), lambda: loss_fn.forward(activation, labels))

    def model_loss() -> float:
        return loss_fn.forward(model.forward(x, training=False), labels)

    first = next((i for i, layer in enumerate(model.layers) if layer.params), None)
    if first is not None:
        loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward())
        check("whole model", f"{names[first]}.W", model.layers[first].params["W"],
              model.layers[first].grads["W"].copy(), model_loss)
    return rows


def gradient_check_table(rows: list[dict]) -> str:
    lines = [f"{'layer':<14}{'tensor':<12}{'shape':<20}{'coords':>7}{'max rel error':>15}  result", "-" * 76]
    for row in rows:
        lines.append(f"{row['layer']:<14}{row['tensor']:<12}{tuple(row['shape'])!s:<20}{row['coords']:>7}"
                     f"{row['max_rel_error']:>15.2e}  {'ok' if row['ok'] else 'FAIL'}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Saving and loading models (.npz, no pickle), predicting image files
# ------------------------------------------------------------------------------------------------

MODEL_FORMAT = "numpy-cnn-model"


def save_model(path: Path, model: Sequential, model_cfg: dict, data: Dataset, summary: dict,
               optimizer: SGD | Adam | None = None) -> None:
    """One .npz: every weight ('layer<i>.<name>'), the optimiser's state ('optimizer.<key>'), and a JSON
    'meta' entry with the architecture, input shape, class names and training summary."""
    arrays = {f"layer{i}.{name}": p for i, layer in enumerate(model.layers) for name, p in layer.params.items()}
    meta = {"format": MODEL_FORMAT, "version": 1, "model": model_cfg, "input_shape": list(model.input_shape),
            "class_names": data.class_names, "dataset": data.name, "training": summary}
    if optimizer is not None:
        meta["optimizer"] = {"name": type(optimizer).__name__.lower(), "t": getattr(optimizer, "t", 0)}
        arrays.update({f"optimizer.{key}": value for key, value in optimizer.state.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    write_atomic(path, lambda f: np.savez(f, **arrays))


@dataclass
class LoadedModel:
    model: Sequential
    meta: dict
    optimizer_state: dict[str, np.ndarray]


def load_model(path: Path) -> LoadedModel:
    """Rebuild a model saved by save_model. Never unpickles; any defect is a ModelFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a numpy-cnn model file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # not a zip, truncated, pickled objects, bad CRC: all "not a model file"
        raise ModelFileError(f"{path}: not a readable numpy-cnn model file ({type(error).__name__}: {error})") from None
    if "meta" not in arrays:
        raise ModelFileError(f"{path}: not a numpy-cnn model file (it has no 'meta' entry)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"its format is not {MODEL_FORMAT!r}")
        model_cfg = _check_mapping("model", meta["model"], SCHEMA["model"], DEFAULT_CONFIG["model"])
        input_shape, class_names = tuple(int(v) for v in meta["input_shape"]), [str(c) for c in meta["class_names"]]
        if len(input_shape) != 3 or min(input_shape) < 1 or len(class_names) < 2:
            raise ValueError(f"input shape {input_shape} or class names {class_names} make no sense")
        training, optimizer = meta.setdefault("training", {}), meta.get("optimizer")
        epochs, history = (training.get("epochs_completed", 0), training.get("history", [])) \
            if isinstance(training, dict) else (None, None)
        if (type(epochs) is not int or epochs < 0  # type(), not isinstance(): True is an int too
                or not isinstance(history, list) or not all(isinstance(row, dict) for row in history)):
            raise ValueError(f"its training summary {training!r:.80} is not a mapping with an integer "
                             "epochs_completed >= 0 and a list of history rows")
        if optimizer is not None and (not isinstance(optimizer, dict) or not isinstance(optimizer.get("name"), str)
                                      or not isinstance(optimizer.get("t", 0), int)):
            raise ValueError(f"its optimizer entry {optimizer!r:.80} is not a mapping with a name and a step count")
    except (KeyError, TypeError, ValueError, ConfigError) as error:
        raise ModelFileError(f"{path}: not a valid numpy-cnn model file (meta: {error})") from None
    try:
        model = build_model(model_cfg, input_shape, len(class_names), np.random.default_rng(0))
    except ConfigError as error:
        raise ModelFileError(f"{path}: the stored architecture does not fit its input shape ({error})") from None
    expected = {f"layer{i}.{name}" for i, layer in enumerate(model.layers) for name in layer.params}
    stored = {key for key in arrays if not key.startswith("optimizer.")}
    if stored != expected:
        raise ModelFileError(f"{path}: weights {sorted(stored ^ expected)[:3]} do not fit the stored architecture")
    for i, layer in enumerate(model.layers):
        for name, param in layer.params.items():
            weights = arrays[f"layer{i}.{name}"]
            if weights.shape != param.shape or weights.dtype.kind != "f":
                raise ModelFileError(f"{path}: layer{i}.{name} has shape {weights.shape} ({weights.dtype}), "
                                     f"the stored architecture needs {param.shape} (float)")
            param[...] = weights
    optimizer_state = {key.removeprefix("optimizer."): arrays[key] for key in arrays if key.startswith("optimizer.")}
    for key, state in optimizer_state.items():
        if state.dtype.kind != "f":
            raise ModelFileError(f"{path}: optimizer.{key} holds {state.dtype} values, not floats")
    return LoadedModel(model, meta, optimizer_state)


def restore_optimizer(optimizer: SGD | Adam, loaded: LoadedModel) -> bool:
    """Continue with the saved optimiser state when it is the same kind of optimiser and fits the weights."""
    saved = loaded.meta.get("optimizer") or {}
    if saved.get("name") != type(optimizer).__name__.lower():
        return False
    params = {f"{i}.{name}": p for i, layer in enumerate(loaded.model.layers) for name, p in layer.params.items()}
    for key, value in loaded.optimizer_state.items():
        owner = key.rsplit(".", 1)[0]
        if owner not in params or params[owner].shape != value.shape:
            return False
    optimizer.state = {key: value.astype(DTYPE) for key, value in loaded.optimizer_state.items()}
    if isinstance(optimizer, Adam):
        optimizer.t = int(saved.get("t", 0))
    return True


# ------------------------------------------------------------------------------------------------
# Configuration: defaults, YAML loading and validation
# ------------------------------------------------------------------------------------------------

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
OPTIMIZERS = ("adam", "sgd")
CONV_LAYER_DEFAULTS = {"filters": 32, "kernel_size": 3, "stride": 1, "padding": 0, "pool_size": 2, "pool_stride": None}
DEFAULT_CONFIG: dict = {
    "logging": {"level": "INFO", "file": "logs/app.log"},
    "data": {"dataset": "mnist", "path": None, "cache_dir": "data", "allow_synthetic_fallback": True,
             "n_train": 5000, "n_test": 1000, "random_seed": 42},
    "model": {"conv_layers": [dict(CONV_LAYER_DEFAULTS, filters=32, padding=1),
                              dict(CONV_LAYER_DEFAULTS, filters=64, padding=1)],
              "dense_units": 128},
    "training": {"epochs": 10, "learning_rate": 0.001, "batch_size": 32, "optimizer": "adam", "momentum": 0.9,
                 "workers": None},
    "output": {"plot_dir": None},
}


def _fail(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: got {value!r}, expected {allowed}")


def _did_you_mean(word: Any, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option to a mistyped word, or ''."""
    close = difflib.get_close_matches(str(word).lower().replace("-", "_"), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _integer(minimum: int, nullable: bool = False) -> Callable[[Any, str], Any]:
    allowed = f"an integer >= {minimum}" + (" or null" if nullable else "")

    def check(value: Any, path: str) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _fail(path, value, allowed)
        return value
    return check


def _number(low: float, high: float = math.inf, low_inclusive: bool = False) -> Callable[[Any, str], float]:
    allowed = f"a number {'>=' if low_inclusive else '>'} {low:g}" + (f" and < {high:g}" if high < math.inf else "")

    def check(value: Any, path: str) -> float:
        number = value
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string: take any string that is a number
            try:
                number = float(value)
            except ValueError:
                raise _fail(path, value, allowed) from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise _fail(path, value, allowed)
        try:
            number = float(number)  # an integer of 400 digits does not fit
        except OverflowError:
            raise _fail(path, f"{str(value)[:20]}... ({len(str(value))} digits)", allowed) from None
        if not math.isfinite(number):
            raise _fail(path, value, allowed)
        if number < low or (number == low and not low_inclusive) or number >= high:
            raise _fail(path, value, allowed)
        return float(number)
    return check


def _choice(options: tuple[str, ...], case_insensitive: bool = False) -> Callable[[Any, str], str]:
    def check(value: Any, path: str) -> str:
        candidate = value.upper() if case_insensitive and isinstance(value, str) else value
        if candidate not in options:
            raise ConfigError(f"{path}: got {value!r}{_did_you_mean(value, options)}, expected one of "
                              + ", ".join(options))
        return candidate
    return check


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, value, "true or false")
    return value


def _optional_path(value: Any, path: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise _fail(path, value, "a path (a non-empty string) or null")
    return value


def _path(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, value, "a path (a non-empty string)")
    return value


def _check_mapping(path: str, raw: Any, schema: dict, defaults: dict) -> dict:
    """Check a mapping read from YAML against schema {key: check}, taking missing keys from defaults."""
    if not isinstance(raw, dict):
        raise _fail(path, raw, f"a mapping with keys {', '.join(schema)}")
    for key in raw:
        if key not in schema:
            raise ConfigError(f"{path}.{key}: unknown key{_did_you_mean(key, schema)}; allowed: {', '.join(schema)}")
    return {key: check(raw.get(key, defaults[key]), f"{path}.{key}") for key, check in schema.items()}


CONV_LAYER_SCHEMA = {"filters": _integer(1), "kernel_size": _integer(1), "stride": _integer(1),
                     "padding": _integer(0), "pool_size": _integer(0, nullable=True),
                     "pool_stride": _integer(1, nullable=True)}


def _conv_layers(value: Any, path: str) -> list[dict]:
    if not isinstance(value, list):
        raise _fail(path, value, "a list of layers, each a mapping like {filters: 32, kernel_size: 3}")
    return [_check_mapping(f"{path}[{i}]", layer, CONV_LAYER_SCHEMA, CONV_LAYER_DEFAULTS)
            for i, layer in enumerate(value)]


SCHEMA: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    "logging": {"level": _choice(LOG_LEVELS, case_insensitive=True), "file": _optional_path},
    "data": {"dataset": _choice(DATASETS), "path": _optional_path, "cache_dir": _path,
             "allow_synthetic_fallback": _boolean, "n_train": _integer(1), "n_test": _integer(1),
             "random_seed": _integer(0)},
    "model": {"conv_layers": _conv_layers, "dense_units": _integer(1)},
    "training": {"epochs": _integer(0), "learning_rate": _number(0), "batch_size": _integer(1),
                 "optimizer": _choice(OPTIMIZERS), "momentum": _number(0, 1, low_inclusive=True),
                 "workers": _integer(1, nullable=True)},
    "output": {"plot_dir": _optional_path},
}


def validate_config(raw: Any) -> dict:
    """The full, checked config: every section and key present, defaults filled in, values normalised.
    Raises ConfigError naming the key path, the value given and what is allowed."""
    if not isinstance(raw, dict):
        shown = "an empty file" if raw is None else f"{type(raw).__name__} {raw!r:.60}"
        raise ConfigError(f"expected a mapping with sections {', '.join(SCHEMA)}, got {shown}")
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(f"{section}: unknown section{_did_you_mean(section, SCHEMA)}; "
                              f"allowed: {', '.join(SCHEMA)}")
    return {section: _check_mapping(section, {} if raw.get(section) is None else raw[section], schema,
                                    DEFAULT_CONFIG[section])
            for section, schema in SCHEMA.items()}


def load_config(path: str | Path) -> dict:
    """Read and validate a YAML config file. Raises ConfigError (one line) for any problem."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file ({error})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        if context is not None and getattr(error, "context", None):
            problem += f" ({error.context} started at line {context.line + 1})"
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    try:
        return validate_config(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_DIVERGED = 0, 1, 2, 3
EXIT_BY_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report it
# flag -> (section, key) that it overrides
OVERRIDES = {"epochs": ("training", "epochs"), "batch_size": ("training", "batch_size"),
             "learning_rate": ("training", "learning_rate"), "n_train": ("data", "n_train"),
             "n_test": ("data", "n_test"), "seed": ("data", "random_seed"), "dataset": ("data", "dataset"),
             "data_path": ("data", "path"), "log_level": ("logging", "level"), "plot_dir": ("output", "plot_dir"),
             "optimizer": ("training", "optimizer"), "workers": ("training", "workers")}
# Flags that would do nothing in the --predict or --gradcheck mode: an error rather than silently ignored.
TRAINING_ONLY = ("epochs", "batch_size", "learning_rate", "optimizer", "workers", "n_train", "n_test", "data_path",
                 "no_fallback", "plot_dir", "save_model", "profile")
IGNORED_IN_MODE = {"predict": (*TRAINING_ONLY, "seed", "dataset"),  # the saved model brings its own
                   "gradcheck": (*TRAINING_ONLY, "load_model")}  # it uses the model section, dataset and seed


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
               "130 interrupted (Ctrl-C), 143 terminated.")
    parser.add_argument("--config", type=path_argument, metavar="FILE",
                        help="YAML config (default: ./config.yaml if present, else built-in defaults)")
    parser.add_argument("--output", type=path_argument, metavar="FILE", help="write results as JSON to FILE")
    group = parser.add_argument_group("overrides of config values")
    group.add_argument("--epochs", type=int, metavar="N", help="training.epochs (0: only evaluate)")
    group.add_argument("--batch-size", type=int, metavar="N", help="training.batch_size")
    group.add_argument("--learning-rate", metavar="LR", help="training.learning_rate")
    group.add_argument("--optimizer", metavar="NAME", help="training.optimizer: " + ", ".join(OPTIMIZERS))
    group.add_argument("--workers", type=int, metavar="N", help="training.workers: threads that each take a slice "
                       "of every batch (default: one per BLAS thread, i.e. per CPU unless OPENBLAS_NUM_THREADS "
                       "says fewer, and fewer when slices would be too small)")
    group.add_argument("--n-train", type=int, metavar="N", help="data.n_train")
    group.add_argument("--n-test", type=int, metavar="N", help="data.n_test")
    group.add_argument("--seed", type=int, metavar="N", help="data.random_seed (seeds everything)")
    group.add_argument("--dataset", metavar="NAME", help="data.dataset: " + ", ".join(DATASETS))
    group.add_argument("--data-path", type=path_argument, metavar="DIR",
                       help="data.path: a folder of MNIST IDX files")
    group.add_argument("--no-fallback", action="store_true", help="fail instead of using synthetic data")
    group.add_argument("--log-level", metavar="LEVEL", help="logging.level: " + ", ".join(LOG_LEVELS))
    group.add_argument("--plot-dir", type=path_argument, metavar="DIR",
                       help="output.plot_dir: write PNG pictures there")
    extra = parser.add_argument_group("models, predictions and teaching")
    extra.add_argument("--save-model", type=path_argument, metavar="FILE", help="save the trained model (.npz)")
    extra.add_argument("--load-model", type=path_argument, metavar="FILE",
                       help="start from a saved model (with --epochs 0: evaluate)")
    extra.add_argument("--profile", action="store_true", help="print time per layer after training")
    mode = extra.add_mutually_exclusive_group()
    mode.add_argument("--predict", type=path_argument, metavar="IMAGE", nargs="+",
                      help="classify image files with --load-model")
    mode.add_argument("--gradcheck", action="store_true", help="check every gradient of the configured model")
    return parser


def check_flag_combinations(args: argparse.Namespace) -> None:
    if args.predict and not args.load_model:
        raise CNNError("--predict needs --load-model FILE (a model saved with --save-model)")
    for mode, ignored in IGNORED_IN_MODE.items():
        if getattr(args, mode):
            for flag in ignored:
                value = getattr(args, flag)
                if value is not None and value is not False:  # not `value in (None, False)`: 0 == False
                    option = "--" + flag.replace("_", "-")
                    raise CNNError(f"{option} has no effect with --{mode}, which "
                                   + ("only classifies images" if mode == "predict" else "trains nothing"))


def resolve_config(args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    """Config file (or defaults), then RANDOM_SEED from the environment, then flags; every value checked.

    Returns the config and where it came from: {"config": file or "built-in defaults", "seed": ...}.
    """
    if args.config:
        cfg, origin = load_config(args.config), {"config": args.config, "seed": args.config}
    elif Path("config.yaml").is_file():
        cfg, origin = load_config("config.yaml"), {"config": "config.yaml", "seed": "config.yaml"}
    else:
        cfg, origin = validate_config({}), {"config": "built-in defaults", "seed": "built-in default"}
    seed_text = os.environ.get("RANDOM_SEED", "").strip()
    if seed_text and args.seed is None:
        try:
            cfg["data"]["random_seed"] = SCHEMA["data"]["random_seed"](int(seed_text), "RANDOM_SEED")
        except ValueError:
            raise _fail("RANDOM_SEED (environment)", seed_text, "an integer >= 0") from None
        origin["seed"] = "RANDOM_SEED"
    for flag, (section, key) in OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            cfg[section][key] = SCHEMA[section][key](value, f"--{flag.replace('_', '-')}")
    if args.seed is not None:
        origin["seed"] = "--seed"
    if args.no_fallback:
        cfg["data"]["allow_synthetic_fallback"] = False
    if not args.load_model:
        # Build the configured model once on the data set's image size, so that an impossible architecture
        # is reported now, not after a minute of downloading. (A loaded model brings its own architecture.)
        try:
            build_model(cfg["model"], input_shape_of(cfg["data"]["dataset"]), 10, np.random.default_rng(0))
        except ConfigError as error:
            raise ConfigError(f"{origin['config']}: {error}") from None
        except (MemoryError, ValueError) as error:  # numpy cannot allocate the weights
            raise ConfigError(f"{origin['config']}: model: the weights do not fit in memory ({error}); reduce "
                              "model.dense_units or the filters of model.conv_layers") from None
    workers, batch_size = cfg["training"]["workers"], cfg["training"]["batch_size"]
    if workers is not None and workers > batch_size:
        raise ConfigError(f"training.workers: got {workers}, expected at most training.batch_size ({batch_size}): "
                          "each worker takes a slice of every batch")
    return cfg, origin


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname}: {message}"


def setup_logging(logging_cfg: dict) -> None:
    """Console (stdout at the configured level; errors on stderr) and, if logging.file is set, a file with
    timestamps."""
    close_logging()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging_cfg["level"])
    console.addFilter(lambda record: record.levelno < logging.ERROR)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    for handler in (console, errors):
        handler.setFormatter(ConsoleFormatter("%(message)s"))
        log.addHandler(handler)
    if logging_cfg["file"]:
        path = Path(logging_cfg["file"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
        except OSError as error:
            raise CNNError(f"logging.file: cannot write the log file {path} ({error.strerror or error})") from None
        handler.setLevel(logging_cfg["level"])
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def close_logging() -> None:
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


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
        with tempfile.TemporaryFile(dir=target if folder else target.parent):
            pass
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
    first signal only asks training to stop after the current batch, so that the results and the model are
    still written; a second signal stops at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.graceful = False
        self.previous: dict = {}

    def __call__(self, signum: int, frame: Any) -> None:
        if not self.graceful or self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum
        log.warning("%s received: stopping after this batch and keeping what was done (again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        self.previous = {s: signal.signal(s, self) for s in EXIT_BY_SIGNAL}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def versions() -> dict:
    return {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform()}


def write_json(path: str | Path, payload: dict) -> None:
    write_atomic(Path(path), lambda f: json.dump(payload, f, indent=2, default=str), binary=False)


def input_shape_of(dataset: str) -> tuple[int, int, int]:
    return (8, 8, 1) if dataset == "digits" else (28, 28, 1)


def run_gradcheck(args: argparse.Namespace, cfg: dict) -> int:
    """--gradcheck: the configured model, two random inputs, float64, every layer's backward checked.
    The table is the command's output, so it is printed whatever the log level."""
    check_writable(args.output, "--output")
    rng = make_rngs(cfg["data"]["random_seed"])["init"]
    input_shape = input_shape_of(cfg["data"]["dataset"])
    model = build_model(cfg["model"], input_shape, 10, rng)
    x, labels = rng.random((2, *input_shape)), rng.integers(0, 10, 2)
    start = time.perf_counter()
    rows = gradient_check(model, x, labels, rng)
    failed = [row for row in rows if not row["ok"]]
    table = gradient_check_table(rows)
    print(f"gradient check of the configured model, input {input_shape}, float64, central differences:\n{table}")
    log_to_file(logging.INFO, f"gradient check:\n{table}")
    verdict = f"{len(rows) - len(failed)}/{len(rows)} tensors ok (tolerance 1e-6) in {time.perf_counter() - start:.1f}s"
    if args.output:
        write_json(args.output, {"status": "failed" if failed else "passed", "rows": rows, "config": cfg,
                                 "versions": versions()})
    if failed:
        log.error("gradient check FAILED: %s; broken: %s", verdict,
                  ", ".join(f"{row['layer']}.{row['tensor']}" for row in failed))
        return EXIT_UNEXPECTED
    print(f"gradient check passed: {verdict}")
    log_to_file(logging.INFO, f"gradient check passed: {verdict}")
    return EXIT_OK


def run_predict(args: argparse.Namespace) -> int:
    """--predict: classify image files with a saved model, one line each, no training."""
    check_writable(args.output, "--output")
    loaded = load_model(Path(args.load_model))
    # MNIST fitted its digits into 20x20 pixels of 28x28; the other data sets fill the frame.
    fill = 20 / 28 if loaded.meta.get("dataset") in ("mnist", "synthetic") else 1.0
    predictions = predict_files(loaded.model, [Path(p) for p in args.predict], loaded.meta["class_names"], fill)
    for prediction in predictions:
        ranked = ", ".join(f"{t['class']} ({100 * t['probability']:.1f}%)" for t in prediction["top"])
        print(f"{prediction['file']}: {ranked}")
        if "warning" in prediction:
            log.warning("%s: %s", prediction["file"], prediction["warning"])
        log_to_file(logging.INFO, f"prediction {prediction['file']}: {ranked}")
    if args.output:
        write_json(args.output, {"status": "predicted", "model": args.load_model, "predictions": predictions,
                                 "versions": versions()})
    return EXIT_OK


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def model_for_run(args: argparse.Namespace, cfg: dict, data: Dataset,
                  rng: np.random.Generator) -> tuple[Sequential, dict, SGD | Adam, dict]:
    """The model to train: loaded from --load-model (with its optimiser state) or built from the config.
    Returns the model, its architecture, the optimiser and what the model file says of earlier training."""
    optimizer = make_optimizer(cfg["training"])
    if not args.load_model:
        return build_model(cfg["model"], data.input_shape, data.num_classes, rng), cfg["model"], optimizer, {}
    loaded = load_model(Path(args.load_model))
    if loaded.model.input_shape != data.input_shape or len(loaded.meta["class_names"]) != data.num_classes:
        raise DataError(f"--load-model {args.load_model}: the model takes {loaded.model.input_shape} images and "
                        f"{len(loaded.meta['class_names'])} classes, the data has {data.input_shape} "
                        f"and {data.num_classes}")
    earlier = loaded.meta.get("training", {})
    log.info("loaded %s (trained for %s); its architecture replaces the config's model section", args.load_model,
             plural(int(earlier.get("epochs_completed", 0)), "epoch"))
    if restore_optimizer(optimizer, loaded):
        log.info("continuing with the saved %s state", cfg["training"]["optimizer"])
    else:
        saved = (loaded.meta.get("optimizer") or {}).get("name", "no")
        log.info("starting %s afresh: the model file holds %s optimiser state", cfg["training"]["optimizer"], saved)
    return loaded.model, loaded.meta["model"], optimizer, earlier


def results_document(args: argparse.Namespace, cfg: dict, model_cfg: dict, data: Dataset, model: Sequential,
                     result: TrainResult, summary: dict, train_seconds: float, files: dict,
                     problems: list[str]) -> dict:
    """Everything --output records about a training run (the README's 'Results file' table)."""
    return {
        "status": result.status, "stopped_at": result.stopped_at, "started_at": summary["saved_at"],
        "config": dict(cfg, model=model_cfg),
        "data": {"dataset": data.name, "source": data.source, "n_train": len(data.x_train), "n_test": len(data.x_test),
                 "input_shape": list(data.input_shape), "note": data.note, "class_names": data.class_names},
        "model": {"summary": model.summary_rows(), "parameters": model.parameter_count(),
                  "loaded_from": args.load_model},
        "history": result.history, "epochs_completed": summary["epochs_completed"],
        "test_accuracy": summary["test_accuracy"], "test_loss": summary["test_loss"], "workers": summary["workers"],
        "train_seconds": round(train_seconds, 3), "files": files, "problems": problems, "versions": versions(),
    }


def run_training(args: argparse.Namespace, cfg: dict, origin: dict[str, str], stop: StopRequest) -> int:
    """The default command: load data, build (or load) the model, train, evaluate, write what was asked."""
    plot_dir = cfg["output"]["plot_dir"]
    check_writable(args.output, "--output")
    check_writable(args.save_model, "--save-model")
    check_writable(plot_dir, "output.plot_dir", folder=True)
    seed, training_cfg = cfg["data"]["random_seed"], cfg["training"]
    log.info("numpy-cnn: config from %s, seed %d (from %s)", origin["config"], seed, origin["seed"])
    rngs = make_rngs(seed)
    data = load_data(cfg["data"])
    log.info("data: %s (source: %s), %s training and %s test images of %s, %d classes; %s", data.name,
             data.source, f"{len(data.x_train):,}", f"{len(data.x_test):,}", data.input_shape, data.num_classes,
             data.note)
    model, model_cfg, optimizer, earlier = model_for_run(args, cfg, data, rngs["init"])
    first_epoch = int(earlier.get("epochs_completed", 0)) + 1
    log.info("model:\n%s", model.summary())
    workers = training_cfg["workers"] or default_workers(model, training_cfg["batch_size"])
    log.info("training: %s, batch %d, %s, learning rate %g, %s", plural(training_cfg["epochs"], "epoch"),
             training_cfg["batch_size"], training_cfg["optimizer"], training_cfg["learning_rate"],
             plural(workers, "worker thread"))
    if args.profile:
        model.timings = {}

    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    stop.graceful = True
    start = time.perf_counter()
    result = train(model, optimizer, data, epochs=training_cfg["epochs"], batch_size=training_cfg["batch_size"],
                   rng=rngs["shuffle"], should_stop=lambda: stop.signum is not None, first_epoch=first_epoch,
                   workers=workers)
    train_seconds = time.perf_counter() - start

    test_loss = test_accuracy = None
    if result.status == "diverged":
        where = result.stopped_at
        log.error("training diverged at epoch %d, batch %d (%s): try a lower learning rate than %g",
                  where["epoch"], where["batch"], where["reason"], training_cfg["learning_rate"])
    elif result.history and result.status == "completed":
        test_loss, test_accuracy = result.history[-1]["test_loss"], result.history[-1]["test_accuracy"]
    else:
        test_loss, test_accuracy = model.evaluate(data.x_test, data.y_test, EVAL_BATCH_SIZE)
    if result.status == "interrupted":
        log.warning("interrupted after %s", plural(len(result.history), "completed epoch"))
    if test_accuracy is not None:
        log.info("test accuracy %.2f%%, test loss %.4f, training took %.1fs", 100 * test_accuracy, test_loss,
                 train_seconds)
    if args.profile and result.batches:
        side_by_side = f"; layers: mean of {workers} worker threads, which run side by side" if workers > 1 else ""
        log.info("time per layer over %d training batches (evaluation not included%s):\n%s", result.batches,
                 side_by_side, profile_table(model, result.batches))

    files: dict[str, Any] = {}
    summary = {"epochs_completed": first_epoch - 1 + len(result.history), "test_accuracy": test_accuracy,
               "test_loss": test_loss, "status": result.status, "stopped_at": result.stopped_at, "seed": seed,
               "history": earlier.get("history", []) + result.history, "saved_at": started_at, "workers": workers}
    if args.save_model:
        if result.status == "diverged":
            log.warning("not saving the model: its weights are not finite")
        else:
            save_model(Path(args.save_model), model, model_cfg, data, summary, optimizer)
            files["model"] = args.save_model
            log.info("saved the model to %s", args.save_model)
    problems = []
    if plot_dir and result.status != "diverged":
        try:  # a picture that fails must not cost the results of the run
            from plots import write_plots

            files["plots"] = write_plots(Path(plot_dir), model, data, result.history)
            log.info("pictures written to %s: %s", plot_dir, ", ".join(Path(p).name for p in files["plots"].values()))
        except Exception as error:
            log_to_file(logging.ERROR, "drawing the pictures failed", with_traceback=True)
            problems.append(f"pictures: {type(error).__name__}: {error}")
            log.error("could not draw the pictures (%s: %s)", type(error).__name__, error)
    if cfg["logging"]["file"]:
        files["log"] = cfg["logging"]["file"]
    if args.output:
        files["results"] = args.output
        write_json(args.output, results_document(args, cfg, model_cfg, data, model, result, summary, train_seconds,
                                                 files, problems))
        log.info("results written to %s", args.output)
    if result.status == "diverged":
        return EXIT_DIVERGED
    if stop.signum is not None:  # interrupted, or a signal came while the results were being written
        return EXIT_BY_SIGNAL[stop.signum]
    return EXIT_UNEXPECTED if problems else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 1 unexpected, 2 bad input, 3 diverged,
    130 / 143 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        check_flag_combinations(args)
        from dotenv import find_dotenv, load_dotenv

        load_dotenv(find_dotenv(usecwd=True))  # never overrides variables already set
        cfg, origin = resolve_config(args)
        setup_logging(cfg["logging"])
        # Overflow in a diverging run is reported as divergence, not as a NumPy warning.
        with np.errstate(all="ignore"), StopRequest() as stop:
            if args.gradcheck:
                return run_gradcheck(args, cfg)
            if args.predict:
                return run_predict(args)
            return run_training(args, cfg, origin, stop)
    except CNNError as error:
        log_to_file(logging.ERROR, str(error))
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Interrupted) as stopped:
        signum = getattr(stopped, "signum", signal.SIGINT)
        log_to_file(logging.WARNING, f"stopped by {signal.Signals(signum).name}")
        # Every file is written whole or not at all (write_atomic), so none is left half-written.
        print(f"interrupted ({signal.Signals(signum).name}): stopped; no file was left half-written", file=sys.stderr)
        return EXIT_BY_SIGNAL[signum]
    except Exception as error:
        log_to_file(logging.ERROR, "unexpected error", with_traceback=True)
        where = " (traceback in the log file)" if any(isinstance(h, logging.FileHandler) for h in log.handlers) else ""
        print(f"error: unexpected {type(error).__name__}: {error}{where}", file=sys.stderr)
        return EXIT_UNEXPECTED
    finally:
        close_logging()


if __name__ == "__main__":
    sys.exit(main())
