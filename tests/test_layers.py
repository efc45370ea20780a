"""Every layer on its own: each backward pass against central differences, the max-pooling tie rule, the
vectorised layers against the slow loop references of tests/reference.py (worked cases and hypothesis properties),
BatchNorm's statistics, Dropout's masks, output shapes, evaluation that stores nothing, dtypes, and
main.gradient_check itself (it passes correct layers and fails broken ones).

Gradient checks run in float64 with an independent checker written here (not main.numeric_gradient), so a bug
shared by the layers and main's own checker cannot hide itself. BatchNorm, Dropout, AvgPool2D and Tanh are checked
in TRAINING mode: BatchNorm then normalises with the batch's own statistics (so the checked gradient goes through
the batch mean and variance) and Dropout uses a fixed mask, so that every forward of the check computes the same
function that backward differentiates.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import reference
from helpers import (
    TOLERANCE,
    assert_conv2d_matches_reference,
    central_differences,
    classifier_head,
    count_layers,
    gradient_error,
    model_section,
    to_float64,
)
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import datafiles
import main
from main import AvgPool2D, BatchNorm, Dropout, Tanh


def layer_gradient_errors(layer: Any, x: np.ndarray, rng: np.random.Generator,
                          training: bool = False) -> dict[str, float]:
    """Check one layer's backward on the objective sum(layer(x) * upstream), upstream random (in training mode
    for layers whose training forward differs: BatchNorm's batch statistics, Dropout's fixed mask).

    The gradient of that objective is layer.backward(upstream) with respect to x and layer.grads
    with respect to the weights. Returns the error of every tensor: 'input' and each parameter.
    """
    to_float64(layer)
    upstream = rng.standard_normal(layer.forward(x).shape)

    def objective() -> float:
        return float(np.sum(layer.forward(x, training=training) * upstream))

    layer.forward(x)
    analytic = {"input": layer.backward(upstream)}
    analytic.update({name: grad.copy() for name, grad in layer.grads.items()})
    tensors = {"input": x, **layer.params}
    return {name: gradient_error(analytic[name], central_differences(objective, tensors[name]))
            for name in tensors}


def away_from_zero(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random float64 values with |v| >= 0.1: no ReLU kink within a finite-difference step."""
    return rng.choice([-1.0, 1.0], shape) * (0.1 + np.abs(rng.standard_normal(shape)))


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Length of a convolution's output along one axis: (size + 2p - k) // s + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def pool_output_size(size: int, pool: int, stride: int) -> int:
    """Length of max pooling's output along one axis: (size - pool) // stride + 1."""
    return (size - pool) // stride + 1


# ------------------------------------------------------------------------------------------------
# Gradient checks, layer by layer (float64, every coordinate)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kernel_size", "stride", "padding"),
                         list(itertools.product([1, 2, 3, 4, 5], [1, 2, 3], [0, 1, 2])))
def test_conv2d_gradients_match_central_differences(kernel_size: int, stride: int, padding: int) -> None:
    """Conv2D's dx, dW and db agree with central differences for every kernel size 1-5, stride 1-3
    and padding 0-2 on a non-square, multi-channel input (including strides that skip pixels)."""
    rng = np.random.default_rng(100 * kernel_size + 10 * stride + padding)
    layer = main.Conv2D(2, 3, kernel_size, stride, padding, rng=rng)
    layer.params["b"] = rng.standard_normal(3)
    errors = layer_gradient_errors(layer, rng.standard_normal((2, 7, 6, 2)), rng)
    assert set(errors) == {"input", "W", "b"}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize(("pool_size", "stride"),
                         [*itertools.product([1, 2, 3, 4], [1, 2, 3]), (2, None), (3, None)])
def test_maxpool2d_gradient_matches_central_differences(pool_size: int, stride: int | None) -> None:
    """MaxPool2D's dx agrees with central differences for overlapping (stride < pool), disjoint and
    gapped windows and pool sizes that do not divide the non-square 7x6 input."""
    rng = np.random.default_rng(10 * pool_size + (stride or 0))
    errors = layer_gradient_errors(main.MaxPool2D(pool_size, stride), rng.standard_normal((2, 7, 6, 3)), rng)
    assert errors["input"] < TOLERANCE, errors


def test_relu_gradient_matches_central_differences() -> None:
    """ReLU's dx agrees with central differences (inputs kept away from the kink at 0)."""
    rng = np.random.default_rng(1)
    errors = layer_gradient_errors(main.ReLU(), away_from_zero(rng, (3, 5, 4, 2)), rng)
    assert errors["input"] < TOLERANCE, errors


def test_flatten_gradient_matches_central_differences() -> None:
    """Flatten's backward puts every gradient back at the pixel it came from."""
    rng = np.random.default_rng(2)
    errors = layer_gradient_errors(main.Flatten(), rng.standard_normal((2, 3, 5, 2)), rng)
    assert errors["input"] < TOLERANCE, errors


def test_dense_gradients_match_central_differences() -> None:
    """Dense's dx, dW and db agree with central differences."""
    rng = np.random.default_rng(3)
    layer = main.Dense(7, 4, rng=rng)
    layer.params["b"] = rng.standard_normal(4)
    errors = layer_gradient_errors(layer, rng.standard_normal((3, 7)), rng)
    assert set(errors) == {"input", "W", "b"}
    assert max(errors.values()) < TOLERANCE, errors


def assert_skipping_the_input_gradient_changes_no_weight_gradient(layer: Any, x: np.ndarray,
                                                                   upstream: np.ndarray) -> None:
    """backward returns dLoss/dx, then with need_input_grad off returns None, and the weight gradients are the
    same both times."""
    assert layer.backward(upstream) is not None
    with_input_grad = {name: grad.copy() for name, grad in layer.grads.items()}
    layer.need_input_grad = False
    layer.forward(x)
    assert layer.backward(upstream) is None
    for name, grad in layer.grads.items():
        np.testing.assert_array_equal(grad, with_input_grad[name])


@pytest.mark.parametrize("make_layer", [lambda rng: main.Conv2D(2, 3, 3, 2, 1, rng=rng),
                                        lambda rng: main.Dense(6, 4, rng=rng)], ids=["conv2d", "dense"])
def test_first_layer_skips_input_gradient_but_keeps_weight_gradients(make_layer: Callable) -> None:
    """With need_input_grad off (as Sequential sets it on its first layer), backward returns None
    but computes exactly the same weight gradients."""
    rng = np.random.default_rng(4)
    layer = make_layer(rng)
    to_float64(layer)
    x = rng.standard_normal((2, 5, 4, 2)) if isinstance(layer, main.Conv2D) else rng.standard_normal((2, 6))
    assert_skipping_the_input_gradient_changes_no_weight_gradient(layer, x, rng.standard_normal(layer.forward(x).shape))
    assert main.Sequential([make_layer(rng), main.Flatten()]).layers[0].need_input_grad is False


# ------------------------------------------------------------------------------------------------
# Max pooling with exact ties: the whole gradient goes to the FIRST maximum (row-major)
# ------------------------------------------------------------------------------------------------


def maxpool_input_gradient(x: np.ndarray, upstream: np.ndarray, pool_size: int, stride: int | None) -> np.ndarray:
    """dx of MaxPool2D(pool_size, stride) at input x for the upstream gradient dLoss/dy."""
    layer = main.MaxPool2D(pool_size, stride)
    layer.forward(x)
    return layer.backward(upstream)


def test_maxpool_all_zero_windows_send_gradient_to_first_position_only() -> None:
    """All-zero 2x2 windows: each window's gradient lands, whole, on its top-left pixel (not 1/4 on
    each pixel, not 4x by a mask)."""
    x = np.zeros((1, 4, 6, 1))
    upstream = np.arange(1.0, 7.0).reshape(1, 2, 3, 1)
    expected = np.zeros_like(x)
    expected[0, ::2, ::2, 0] = upstream[0, :, :, 0]
    grad = maxpool_input_gradient(x, upstream, 2, None)
    np.testing.assert_array_equal(grad, expected)
    np.testing.assert_array_equal(grad, reference.maxpool_backward(x, upstream, 2))


@pytest.mark.parametrize(("pool_size", "stride"), [(2, None), (3, 1), (3, 2), (2, 1), (4, 3)])
def test_maxpool_ties_on_zero_input_match_reference(pool_size: int, stride: int | None) -> None:
    """On an all-zero input every window is one big tie; with overlapping and non-dividing windows
    the routed gradients accumulate exactly like the loop reference."""
    rng = np.random.default_rng(6)
    x = np.zeros((2, 7, 9, 2))
    upstream = rng.standard_normal(main.MaxPool2D(pool_size, stride).forward(x).shape)
    np.testing.assert_allclose(maxpool_input_gradient(x, upstream, pool_size, stride),
                               reference.maxpool_backward(x, upstream, pool_size, stride), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("pool_size", "stride"), [(2, None), (3, 2), (2, 1)])
def test_maxpool_on_mnist_like_digits_matches_reference(pool_size: int, stride: int | None) -> None:
    """Synthetic MNIST-like digits (exact-zero background, saturated strokes, float32): forward and
    backward equal the loop reference, and each non-overlapping window passes on exactly one value."""
    images, _ = datafiles.make_synthetic(3, np.random.default_rng(7))
    x = (images[..., None] / np.float32(255)).astype(np.float32)
    assert (x == 0).mean() > 0.3, "the background should be mostly exact zeros (many ties)"
    layer = main.MaxPool2D(pool_size, stride)
    y = layer.forward(x)
    upstream = np.random.default_rng(8).standard_normal(y.shape).astype(np.float32)
    grad = layer.backward(upstream)
    np.testing.assert_array_equal(y, reference.maxpool_forward(x, pool_size, stride))
    np.testing.assert_allclose(grad, reference.maxpool_backward(x, upstream, pool_size, stride), rtol=1e-6, atol=1e-6)
    if stride is None:
        assert np.count_nonzero(grad) == upstream.size
        np.testing.assert_allclose(grad.sum(), upstream.sum(), rtol=1e-5)


@pytest.mark.parametrize(("window", "first_max"), [
    ([[1.0, 5.0], [5.0, 2.0]], (0, 1)),  # two equal maxima: the first in row-major order wins
    ([[3.0, 3.0], [3.0, 3.0]], (0, 0)),  # four equal maxima
    ([[0.0, 2.0], [7.0, 7.0]], (1, 0)),  # tie in the second row
    ([[-4.0, -1.0], [-1.0, -9.0]], (0, 1)),  # negative values
])
def test_maxpool_window_with_tied_maxima_routes_to_first(window: list, first_max: tuple[int, int]) -> None:
    """A window with several equal maxima sends the whole gradient to exactly one of them: the first."""
    x = np.array(window).reshape(1, 2, 2, 1)
    grad = maxpool_input_gradient(x, np.array([[[[2.5]]]]), 2, None)
    expected = np.zeros_like(x)
    expected[0, first_max[0], first_max[1], 0] = 2.5
    np.testing.assert_array_equal(grad, expected)
    np.testing.assert_array_equal(grad, reference.maxpool_backward(x, np.array([[[[2.5]]]]), 2))


def test_maxpool_tie_gradient_is_a_true_one_sided_derivative() -> None:
    """At a tie the routed gradient is a real one-sided derivative: raising the chosen (first) maximum
    by h raises the output by h, and lowering a tied maximum that was not chosen changes nothing."""
    x = np.array([[2.0, 7.0, 1.0, 1.0],
                  [7.0, 1.0, 1.0, 1.0]]).reshape(1, 2, 4, 1)  # window 0: tie 7 = 7; window 1: four 1s
    upstream = np.array([3.0, -2.0]).reshape(1, 1, 2, 1)
    layer = main.MaxPool2D(2)
    baseline = float(np.sum(layer.forward(x) * upstream))
    grad = layer.backward(upstream)
    h = 1e-3
    for chosen, others in [((0, 1), [(1, 0)]), ((0, 2), [(0, 3), (1, 2), (1, 3)])]:
        raised = x.copy()
        raised[0, chosen[0], chosen[1], 0] += h
        rate = (float(np.sum(layer.forward(raised, training=False) * upstream)) - baseline) / h
        assert rate == pytest.approx(grad[0, chosen[0], chosen[1], 0], rel=1e-9)
        assert grad[0, chosen[0], chosen[1], 0] != 0
        for other in others:
            lowered = x.copy()
            lowered[0, other[0], other[1], 0] -= h
            assert float(np.sum(layer.forward(lowered, training=False) * upstream)) == baseline
            assert grad[0, other[0], other[1], 0] == 0


def mask_routing_gradient(x: np.ndarray, upstream: np.ndarray, pool_size: int) -> np.ndarray:
    """A classic WRONG max-pool backward (disjoint windows): gradient to EVERY input equal to its window's max."""
    window_max = np.repeat(np.repeat(reference.maxpool_forward(x, pool_size), pool_size, axis=1), pool_size, axis=2)
    spread = np.repeat(np.repeat(upstream, pool_size, axis=1), pool_size, axis=2)
    return np.where(x == window_max, spread, 0.0)


def test_tie_comparison_catches_mask_routing() -> None:
    """The tie tests can fail: a mask-based backward sends 4x the gradient into all-zero 2x2 windows
    and disagrees with both MaxPool2D and the reference, while on tie-free input it agrees."""
    upstream = np.random.default_rng(14).standard_normal((1, 2, 2, 1))
    zeros = np.zeros((1, 4, 4, 1))
    wrong = mask_routing_gradient(zeros, upstream, 2)
    right = maxpool_input_gradient(zeros, upstream, 2, None)
    np.testing.assert_allclose(wrong.sum(), 4 * right.sum())
    assert not np.allclose(wrong, reference.maxpool_backward(zeros, upstream, 2))
    distinct = np.random.default_rng(15).standard_normal((1, 4, 4, 1))
    np.testing.assert_array_equal(mask_routing_gradient(distinct, upstream, 2),
                                  maxpool_input_gradient(distinct, upstream, 2, None))


# ------------------------------------------------------------------------------------------------
# Vectorised layers against the loop reference
# ------------------------------------------------------------------------------------------------

# (N, H, W, C, F, kernel, stride, padding)
CONV_CASES = [
    (2, 6, 6, 1, 3, 3, 1, 0),
    (2, 7, 5, 3, 2, 3, 2, 1),  # stride 2, non-square, several channels
    (1, 8, 6, 2, 4, 2, 1, 0),  # even kernel
    (3, 5, 9, 2, 3, 4, 3, 2),  # even kernel, stride 3, padding 2
    (2, 4, 4, 3, 3, 5, 1, 2),  # kernel larger than the unpadded input
    (1, 9, 7, 1, 2, 1, 2, 1),  # 1x1 kernel, stride 2: padding-only pixels in the output
    (2, 10, 3, 2, 2, 3, 3, 0),  # stride leaves rows unused
    (2, 9, 8, 1, 3, 3, 2, 1),  # one channel, stride 2
]


@pytest.mark.parametrize(("n", "height", "width", "channels", "filters", "kernel", "stride", "padding"), CONV_CASES)
def test_conv2d_matches_loop_reference(n: int, height: int, width: int, channels: int, filters: int,
                                       kernel: int, stride: int, padding: int) -> None:
    """Vectorised Conv2D forward and backward (dx, dW, db) equal the loop reference in float64."""
    rng = np.random.default_rng(n * 1000 + height * 100 + width * 10 + kernel)
    layer = main.Conv2D(channels, filters, kernel, stride, padding, rng=rng)
    to_float64(layer)
    layer.params["b"] = rng.standard_normal(filters)
    assert_conv2d_matches_reference(layer, rng.standard_normal((n, height, width, channels)), rng)


# (N, H, W, C, pool, stride)
POOL_CASES = [
    (2, 6, 6, 2, 2, None),
    (1, 7, 5, 3, 2, None),  # non-dividing, non-square
    (2, 8, 7, 1, 3, 1),  # overlapping
    (2, 9, 9, 2, 3, 2),  # overlapping, non-dividing
    (1, 10, 6, 2, 2, 3),  # gaps between windows
    (3, 5, 8, 1, 4, 1),  # large overlapping pool
]


@pytest.mark.parametrize(("n", "height", "width", "channels", "pool_size", "stride"), POOL_CASES)
def test_maxpool2d_matches_loop_reference(n: int, height: int, width: int, channels: int, pool_size: int,
                                          stride: int | None) -> None:
    """Vectorised MaxPool2D forward and backward equal the loop reference, on random values and on
    small integers (frequent ties)."""
    rng = np.random.default_rng(n * 100 + height * 10 + width)
    for x in (rng.standard_normal((n, height, width, channels)),
              rng.integers(0, 3, (n, height, width, channels)).astype(np.float64)):
        layer = main.MaxPool2D(pool_size, stride)
        y = layer.forward(x)
        np.testing.assert_array_equal(y, reference.maxpool_forward(x, pool_size, stride))
        upstream = rng.standard_normal(y.shape)
        np.testing.assert_allclose(layer.backward(upstream), reference.maxpool_backward(x, upstream, pool_size, stride),
                                   rtol=1e-12, atol=1e-12)


def test_dense_matches_loop_reference() -> None:
    """Dense forward and backward (dx, dW, db) equal the loop reference."""
    rng = np.random.default_rng(9)
    layer = main.Dense(6, 5, rng=rng)
    to_float64(layer)
    layer.params["b"] = rng.standard_normal(5)
    x = rng.standard_normal((4, 6))
    y = layer.forward(x)
    np.testing.assert_allclose(y, reference.dense_forward(x, layer.params["W"], layer.params["b"]), rtol=1e-12)
    upstream = rng.standard_normal(y.shape)
    grad_x = layer.backward(upstream)
    ref_x, ref_w, ref_b = reference.dense_backward(x, layer.params["W"], upstream)
    np.testing.assert_allclose(grad_x, ref_x, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.grads["W"], ref_w, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.grads["b"], ref_b, rtol=1e-12, atol=1e-14)


def test_relu_gradient_at_exactly_zero_is_zero() -> None:
    """ReLU passes gradient only where x > 0: at x == 0 exactly (and below) the gradient is 0."""
    layer = main.ReLU()
    x = np.array([[-2.0, -0.0, 0.0, 1e-30, 3.0]])
    np.testing.assert_array_equal(layer.forward(x), [[0.0, 0.0, 0.0, 1e-30, 3.0]])
    np.testing.assert_array_equal(layer.backward(np.full((1, 5), 7.0)), [[0.0, 0.0, 0.0, 7.0, 7.0]])


# ------------------------------------------------------------------------------------------------
# Output shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "kernel", "stride", "padding"),
                         [(28, 28, 3, 1, 1), (28, 28, 5, 2, 0), (9, 6, 4, 3, 2), (5, 11, 1, 2, 0), (3, 3, 5, 1, 1)])
def test_conv2d_output_shape_follows_formula(height: int, width: int, kernel: int, stride: int, padding: int) -> None:
    """Conv2D's output is (H + 2p - k)//s + 1 by (W + 2p - k)//s + 1 by filters, both computed and predicted."""
    layer = main.Conv2D(2, 3, kernel, stride, padding, rng=np.random.default_rng(0))
    expected = (conv_output_size(height, kernel, stride, padding), conv_output_size(width, kernel, stride, padding), 3)
    assert layer.forward(np.zeros((2, height, width, 2), dtype=np.float32)).shape == (2, *expected)
    assert tuple(layer.output_shape((height, width, 2))) == expected


@pytest.mark.parametrize(("height", "width", "pool", "stride"),
                         [(28, 28, 2, 2), (7, 7, 2, 2), (9, 6, 3, 1), (10, 5, 3, 2), (4, 8, 4, 3)])
def test_maxpool2d_output_shape_follows_formula(height: int, width: int, pool: int, stride: int) -> None:
    """MaxPool2D's output is (H - pool)//stride + 1 by (W - pool)//stride + 1 (leftovers dropped)."""
    layer = main.MaxPool2D(pool, stride)
    expected = (pool_output_size(height, pool, stride), pool_output_size(width, pool, stride), 2)
    assert layer.forward(np.zeros((1, height, width, 2), dtype=np.float32)).shape == (1, *expected)
    assert tuple(layer.output_shape((height, width, 2))) == expected


# ------------------------------------------------------------------------------------------------
# main.gradient_check: passes on correct layers, fails on broken ones
# ------------------------------------------------------------------------------------------------


CHECKED_MODELS = {
    "conv_pool": ((8, 8, 1), model_section(
        {"conv2d": {"filters": 3, "padding": 1}}, "relu", "maxpool2d", {"conv2d": {"filters": 4, "padding": 1}}, "relu",
        "maxpool2d", *classifier_head(6))),
    "conv_no_pool": ((8, 8, 1), model_section(
        {"conv2d": {"filters": 3, "padding": 1}}, "relu", {"conv2d": {"filters": 4, "stride": 2}}, "relu", "flatten",
        {"dense": {"units": 6}}, "relu", {"dense": {"units": 10}})),
    "overlapping_pool": ((9, 7, 1), model_section(
        {"conv2d": {"filters": 3, "padding": 1}}, "relu", {"maxpool2d": {"pool_size": 3, "stride": 2}}, "flatten",
        {"dense": {"units": 5}}, "relu", {"dense": {"units": 10}})),
}


def run_gradient_check(name: str, seed: int = 0) -> list[dict]:
    """main.gradient_check on a freshly built CHECKED_MODELS[name] with two random inputs."""
    input_shape, model_cfg = CHECKED_MODELS[name]
    rng = np.random.default_rng(seed)
    model = main.build_model(model_cfg, input_shape, 10, rng)
    return main.gradient_check(model, rng.random((2, *input_shape)), rng.integers(0, 10, 2), rng)


def failed(rows: list[dict]) -> list[tuple[str, str]]:
    """(layer, tensor) of every row main.gradient_check marked as not ok."""
    return [(row["layer"], row["tensor"]) for row in rows if not row["ok"]]


@pytest.mark.parametrize("name", list(CHECKED_MODELS))
def test_gradient_check_passes_on_correct_model(name: str) -> None:
    """main.gradient_check reports every tensor ok on correct layers, including pooling after ReLU
    (whose zeros make exact ties) -- a checker that fails correct code cannot be trusted either."""
    rows = run_gradient_check(name)
    layers_with_weights = count_layers(CHECKED_MODELS[name][1], "conv2d") + 2
    assert {row["layer"] for row in rows} >= {"softmax_ce", "whole model"}
    assert sum(row["tensor"] == "W" for row in rows) == layers_with_weights
    assert failed(rows) == [], main.gradient_check_table(rows)


def col2im_assigning(grad_cols: np.ndarray, padded_shape: tuple[int, ...], stride: int,
                     out: np.ndarray | None = None) -> np.ndarray:
    """BROKEN col2im: assigns instead of adding, so overlapping windows overwrite each other."""
    _, out_h, out_w, kernel_size, _, _ = grad_cols.shape
    grad_x = np.zeros(padded_shape, dtype=grad_cols.dtype)
    for di in range(kernel_size):
        for dj in range(kernel_size):
            rows = slice(di, di + stride * (out_h - 1) + 1, stride)
            cols = slice(dj, dj + stride * (out_w - 1) + 1, stride)
            grad_x[:, rows, cols, :] = grad_cols[:, :, :, di, dj, :]
    return grad_x


CORRECT_CONV_BACKWARD = main.Conv2D.backward


def conv_backward_without_bias(self: main.Conv2D, grad_out: np.ndarray) -> np.ndarray | None:
    """BROKEN Conv2D.backward: drops the bias term (db = 0)."""
    grad_in = CORRECT_CONV_BACKWARD(self, grad_out)
    self.grads["b"][...] = 0
    return grad_in


def maxpool_backward_averaging(self: main.MaxPool2D, grad_out: np.ndarray) -> np.ndarray:
    """BROKEN MaxPool2D.backward: spreads each window's gradient evenly (average-pool backward)."""
    out_h, out_w = grad_out.shape[1:3]
    pool, stride = self.pool_size, self.stride
    grad_in = np.zeros(self.x_shape, dtype=grad_out.dtype)
    for i, j in itertools.product(range(out_h), range(out_w)):
        window = (slice(None), slice(i * stride, i * stride + pool), slice(j * stride, j * stride + pool))
        grad_in[window] += grad_out[:, i:i + 1, j:j + 1, :] / pool**2
    return grad_in


@pytest.mark.parametrize(("kernel", "stride"), [(1, 1), (2, 2), (3, 1), (3, 2), (3, 3)])
def test_im2col_gives_every_strided_window_in_k_k_c_order(kernel: int, stride: int) -> None:
    """im2col(x)[n, i, j, di, dj, c] is x[n, i*s + di, j*s + dj, c], bit for bit, C-contiguous, with one channel
    and with several (the windows picked here by index arithmetic, not by sliding_window_view)."""
    for channels in (1, 3):
        x = np.random.default_rng(kernel * 10 + stride).standard_normal((2, 9, 8, channels)).astype(np.float32)
        out_h, out_w = (9 - kernel) // stride + 1, (8 - kernel) // stride + 1
        rows = stride * np.arange(out_h)[:, None] + np.arange(kernel)  # (Ho, k): input row of each window offset
        columns = stride * np.arange(out_w)[:, None] + np.arange(kernel)  # (Wo, k)
        expected = x[:, rows[:, None, :, None], columns[None, :, None, :], :]  # (N, Ho, Wo, k, k, C)
        cols = main.im2col(x, kernel, stride)
        assert cols.shape == expected.shape and cols.flags.c_contiguous and np.array_equal(cols, expected)


def test_conv_and_maxpool_keep_their_arrays_between_batches_and_compute_as_with_new_ones() -> None:
    """Layer.kept_array: a training pass reuses the arrays of the last one (same shape) and makes new ones when
    the batch size changes; every result equals that of fresh layers; evaluation keeps nothing."""
    rng = np.random.default_rng(3)
    conv, pool = main.Conv2D(3, 4, 3, padding=1, rng=np.random.default_rng(0)), main.MaxPool2D(2)
    conv.need_input_grad = True
    kept_by_step = []
    for n in [5, 5, 2, 5]:
        x = rng.standard_normal((n, 6, 6, 3))
        grad = rng.standard_normal((n, 3, 3, 4))
        y = pool.forward(conv.forward(x))
        dx = conv.backward(pool.backward(grad))
        fresh_conv, fresh_pool = main.Conv2D(3, 4, 3, padding=1, rng=np.random.default_rng(0)), main.MaxPool2D(2)
        fresh_conv.need_input_grad = True
        np.testing.assert_array_equal(y, fresh_pool.forward(fresh_conv.forward(x)))
        np.testing.assert_array_equal(dx, fresh_conv.backward(fresh_pool.backward(grad)))
        np.testing.assert_array_equal(conv.grads["W"], fresh_conv.grads["W"])
        kept_by_step.append({name: id(array) for name, array in conv.workspace.items()})
    assert kept_by_step[0] == kept_by_step[1] and kept_by_step[2] != kept_by_step[1]  # the same, then new ones
    assert set(conv.workspace) == {"x_padded", "cols", "grad_cols", "grad_padded"}
    assert set(pool.workspace) == {"grad_in"}
    evaluating = main.Conv2D(3, 4, 3, padding=1, rng=np.random.default_rng(0))
    evaluating.forward(rng.standard_normal((2, 6, 6, 3)), training=False)
    assert evaluating.workspace == {}


# The worst gradient-check error seen per layer, printed at the end of the module (visible with pytest -s).
WORST_ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors() -> Iterator[None]:
    yield
    if WORST_ERRORS:
        print("\nworst relative gradient error per layer: "
              + ", ".join(f"{name} {error:.1e}" for name, error in sorted(WORST_ERRORS.items())))


# ------------------------------------------------------------------------------------------------
# The independent gradient checker above, in training mode
# ------------------------------------------------------------------------------------------------


def training_layer_gradient_errors(layer: Any, x: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """layer_gradient_errors in training mode; records the worst error in WORST_ERRORS."""
    errors = layer_gradient_errors(layer, x, rng, training=True)
    name = type(layer).__name__
    WORST_ERRORS[name] = max(WORST_ERRORS.get(name, 0.0), *errors.values())
    return errors


def batchnorm_float64(channels: int, rng: np.random.Generator) -> BatchNorm:
    """A float64 BatchNorm with random gamma (some negative) and beta, so that both take part in the checks."""
    layer = BatchNorm(channels)
    to_float64(layer)
    layer.params["gamma"] = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    layer.params["beta"] = rng.standard_normal(channels)
    return layer


def shifted_input(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random values whose channels have different means and spreads (as real activations do)."""
    channels = shape[-1]
    return rng.uniform(-2, 2, channels) + rng.uniform(0.5, 3, channels) * rng.standard_normal(shape)


def dropout_with_fixed_mask(rate: float, shape: tuple[int, ...], seed: int) -> Dropout:
    layer = Dropout(rate, np.random.default_rng(seed))
    layer.fixed_mask = layer.draw_mask(shape, np.float64)
    return layer


BATCHNORM_SHAPES = [
    (5, 3), (2, 4), (7, 1), (3, 6),  # 2-D: per feature over N (N = 2 is the smallest batch)
    (2, 3, 4, 3), (1, 5, 3, 2), (3, 2, 1, 4), (2, 5, 5, 1), (4, 3, 3, 5),  # 4-D: per channel over (N, H, W)
]
# (pool, stride): disjoint, overlapping (stride < pool), gapped, and pools that do not divide 7 x 6
AVGPOOL_CASES = [(2, None), (3, None), (2, 1), (3, 1), (3, 2), (4, 3), (2, 3), (1, 1)]


# ------------------------------------------------------------------------------------------------
# Gradient checks (float64, every coordinate, training mode)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", BATCHNORM_SHAPES, ids=str)
def test_batchnorm_gradients_match_central_differences(shape: tuple[int, ...]) -> None:
    """BatchNorm's dx (through the batch mean and variance), dgamma and dbeta agree with central differences,
    for 2-D and 4-D inputs, odd sizes, one channel, and a 4-D batch of one sample.

    With two values per feature, xhat = +-(x1 - x2) / 2 / sqrt((x1 - x2)^2 / 4 + eps) hardly depends on x
    (dx ~ eps / |x1 - x2|^3 ~ 1e-5), and central differences' round-off (~1e-10) would be 1e-5 of it: that
    case runs with eps = 0.5, which also checks where eps enters the formulas."""
    rng = np.random.default_rng(sum(shape) * 10 + len(shape))
    layer = batchnorm_float64(shape[-1], rng)
    if shape[0] == 2 and len(shape) == 2:
        layer.eps = 0.5
    errors = training_layer_gradient_errors(layer, shifted_input(rng, shape), rng)
    assert set(errors) == {"input", "gamma", "beta"}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(4, 7), (2, 5, 3, 2)], ids=str)
def test_dropout_gradient_matches_central_differences(rate: float, shape: tuple[int, ...]) -> None:
    """Dropout with a fixed mask: dx agrees with central differences (kept entries scaled by 1 / (1 - rate))."""
    rng = np.random.default_rng(int(rate * 100) + len(shape))
    layer = dropout_with_fixed_mask(rate, shape, seed=3)
    errors = training_layer_gradient_errors(layer, rng.standard_normal(shape), rng)
    assert errors["input"] < TOLERANCE, errors


@pytest.mark.parametrize(("pool_size", "stride"), AVGPOOL_CASES)
def test_avgpool2d_gradient_matches_central_differences(pool_size: int, stride: int | None) -> None:
    """AvgPool2D's dx agrees with central differences for disjoint, overlapping and gapped windows on a
    non-square input that most pool sizes do not divide."""
    rng = np.random.default_rng(10 * pool_size + (stride or 0))
    errors = training_layer_gradient_errors(AvgPool2D(pool_size, stride), rng.standard_normal((2, 7, 6, 3)), rng)
    assert errors["input"] < TOLERANCE, errors


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3, 2)], ids=str)
def test_tanh_gradient_matches_central_differences(shape: tuple[int, ...]) -> None:
    """Tanh's dx agrees with central differences, on inputs that reach its flat tails too."""
    rng = np.random.default_rng(len(shape))
    errors = training_layer_gradient_errors(Tanh(), 2 * rng.standard_normal(shape), rng)
    assert errors["input"] < TOLERANCE, errors


CORRECT_BATCHNORM_BACKWARD = BatchNorm.backward


def batchnorm_backward_with_constant_statistics(self: BatchNorm, grad_out: np.ndarray) -> np.ndarray:
    """BROKEN BatchNorm.backward: treats the batch mean and variance as constants (dx = gamma * g / std)."""
    CORRECT_BATCHNORM_BACKWARD(self, grad_out)  # the correct parameter gradients
    return grad_out * self.params["gamma"] * self.inv_std.reshape((1,) * (grad_out.ndim - 1) + (-1,))


def avgpool_backward_assigning(self: AvgPool2D, grad_out: np.ndarray) -> np.ndarray:
    """BROKEN AvgPool2D.backward: assigns instead of adding, so overlapping windows overwrite each other."""
    out_h, out_w = grad_out.shape[1:3]
    grad_in = np.zeros(self.x_shape, dtype=grad_out.dtype)
    for _, row_slice, col_slice in self._offsets(out_h, out_w):
        grad_in[:, row_slice, col_slice, :] = grad_out / self.pool_size ** 2
    return grad_in


def dropout_backward_unscaled(self: Dropout, grad_out: np.ndarray) -> np.ndarray:
    """BROKEN Dropout.backward: forgets the 1 / (1 - rate) scale of the kept entries."""
    return grad_out * (self.mask != 0)


def caught_by_gradient_check(model: str, expected_failure: tuple[str, str]) -> Callable[[], str]:
    """main.gradient_check on CHECKED_MODELS[model]: "" when it marks expected_failure (layer, tensor) as failed,
    else its table."""
    def check() -> str:
        rows = run_gradient_check(model)
        return "" if expected_failure in failed(rows) else main.gradient_check_table(rows)
    return check


def caught_by_layer_check(make: Callable) -> Callable[[], str]:
    """The independent checker above, in training mode, on the layer and input make(rng) returns: "" when the
    input gradient is far off, else the errors."""
    def check() -> str:
        rng = np.random.default_rng(9)
        layer, x = make(rng)
        worst_before = dict(WORST_ERRORS)
        errors = training_layer_gradient_errors(layer, x, rng)
        WORST_ERRORS.clear()
        WORST_ERRORS.update(worst_before)  # a deliberately broken layer is no measure of the real one
        return "" if errors["input"] > 100 * TOLERANCE else str(errors)
    return check


@pytest.mark.parametrize(("target", "broken", "caught"), [
    ("col2im", col2im_assigning, caught_by_gradient_check("conv_no_pool", ("conv2d_1", "input"))),
    ("Conv2D.backward", conv_backward_without_bias, caught_by_gradient_check("conv_no_pool", ("conv2d_2", "b"))),
    ("MaxPool2D.backward", maxpool_backward_averaging,
     caught_by_gradient_check("overlapping_pool", ("maxpool2d_1", "input"))),
    ("BatchNorm.backward", batchnorm_backward_with_constant_statistics,
     caught_by_layer_check(lambda rng: (batchnorm_float64(3, rng), shifted_input(rng, (2, 3, 4, 3))))),
    ("AvgPool2D.backward", avgpool_backward_assigning,
     caught_by_layer_check(lambda rng: (AvgPool2D(3, 1), rng.standard_normal((2, 7, 6, 2))))),
    ("Dropout.backward", dropout_backward_unscaled,
     caught_by_layer_check(lambda rng: (dropout_with_fixed_mask(0.5, (4, 6), 1), rng.standard_normal((4, 6))))),
], ids=["conv_col2im_assigns", "conv_drops_bias", "maxpool_averages", "batchnorm_constant_statistics",
        "avgpool_assigns", "dropout_unscaled"])
def test_gradient_check_fails_on_broken_backward(monkeypatch: pytest.MonkeyPatch, target: str, broken: Callable,
                                                 caught: Callable[[], str]) -> None:
    """The checkers can fail: with a classic mistake deliberately put into a layer's backward, main.gradient_check
    marks that layer's tensor as failed (whole models), or the independent checker finds the input gradient far
    off (the layers checked in training mode)."""
    owner, _, attribute = target.rpartition(".")
    monkeypatch.setattr(getattr(main, owner) if owner else main, attribute, broken)
    assert caught() == ""


# ------------------------------------------------------------------------------------------------
# Vectorised layers against the loop references (float64, 1e-10)
# ------------------------------------------------------------------------------------------------


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", BATCHNORM_SHAPES, ids=str)
def test_batchnorm_training_matches_loop_reference(shape: tuple[int, ...]) -> None:
    """Training forward, backward (dx, dgamma, dbeta) and the running statistics equal the loop reference,
    whose backward is the explicit Jacobian, not the compact formula."""
    rng = np.random.default_rng(len(shape) * 100 + sum(shape))
    layer = batchnorm_float64(shape[-1], rng)
    gamma, beta = layer.params["gamma"], layer.params["beta"]
    x = shifted_input(rng, shape)
    y = layer.forward(x)
    assert_close(y, reference.batchnorm_forward_training(x, gamma, beta, layer.eps))
    upstream = rng.standard_normal(shape)
    grad_x = layer.backward(upstream)
    ref_x, ref_gamma, ref_beta = reference.batchnorm_backward(x, gamma, upstream, layer.eps)
    assert_close(grad_x, ref_x)
    assert_close(layer.grads["gamma"], ref_gamma)
    assert_close(layer.grads["beta"], ref_beta)
    running_mean, running_var = reference.batchnorm_running_statistics([x], layer.momentum)
    assert_close(layer.buffers["running_mean"], running_mean)
    assert_close(layer.buffers["running_var"], running_var)


@pytest.mark.parametrize("shape", [(5, 3), (1, 4), (2, 3, 4, 3), (1, 1, 1, 2)], ids=str)
def test_batchnorm_evaluation_matches_loop_reference(shape: tuple[int, ...]) -> None:
    """Evaluation normalises with the running statistics (any batch size, even one value per channel)."""
    rng = np.random.default_rng(sum(shape))
    layer = batchnorm_float64(shape[-1], rng)
    layer.buffers["running_mean"][...] = rng.standard_normal(shape[-1])
    layer.buffers["running_var"][...] = rng.uniform(0.1, 3.0, shape[-1])
    x = shifted_input(rng, shape)
    expected = reference.batchnorm_forward_eval(x, layer.params["gamma"], layer.params["beta"],
                                                layer.buffers["running_mean"], layer.buffers["running_var"], layer.eps)
    assert_close(layer.forward(x, training=False), expected)


@pytest.mark.parametrize("shape", [(3, 8), (2, 4, 3, 2)], ids=str)
def test_dropout_matches_loop_reference(shape: tuple[int, ...]) -> None:
    """draw_mask is the reference mask of the same uniform draws; forward and backward are x * mask and
    grad_out * mask."""
    rate = 0.4
    layer = Dropout(rate, np.random.default_rng(11))
    expected_mask = reference.dropout_mask(np.random.default_rng(11).random(shape), rate)
    x, upstream = np.random.default_rng(12).standard_normal((2, *shape))
    y = layer.forward(x)
    assert_close(layer.mask, expected_mask)
    assert_close(y, reference.dropout_forward(x, expected_mask))
    assert_close(layer.backward(upstream), reference.dropout_backward(upstream, expected_mask))


# (N, H, W, C, pool, stride): test_layers' max-pooling cases, and 5x5 windows (bigger than LeNet-5's usual 2x2)
AVGPOOL_LOOP_CASES = [*POOL_CASES, (2, 10, 10, 6, 5, 5)]


@pytest.mark.parametrize(("n", "height", "width", "channels", "pool_size", "stride"), AVGPOOL_LOOP_CASES)
def test_avgpool2d_matches_loop_reference(n: int, height: int, width: int, channels: int, pool_size: int,
                                          stride: int | None) -> None:
    """Vectorised AvgPool2D forward and backward equal the loop reference."""
    rng = np.random.default_rng(n * 1000 + height * 100 + width * 10 + pool_size)
    layer = AvgPool2D(pool_size, stride)
    x = rng.standard_normal((n, height, width, channels))
    y = layer.forward(x)
    assert_close(y, reference.avgpool_forward(x, pool_size, stride))
    upstream = rng.standard_normal(y.shape)
    assert_close(layer.backward(upstream), reference.avgpool_backward(x, upstream, pool_size, stride))


@pytest.mark.parametrize("shape", [(4, 6), (2, 5, 4, 3)], ids=str)
def test_tanh_matches_loop_reference(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    x, upstream = 3 * rng.standard_normal(shape), rng.standard_normal(shape)
    layer = Tanh()
    assert_close(layer.forward(x), reference.tanh_forward(x))
    assert_close(layer.backward(upstream), reference.tanh_backward(x, upstream))


# ------------------------------------------------------------------------------------------------
# BatchNorm: statistics, running averages, buffers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 5), (4, 6, 5, 3)], ids=str)
def test_batchnorm_training_normalises_each_channel(shape: tuple[int, ...]) -> None:
    """With gamma = 1 and beta = 0, each channel of the output has mean 0 and variance var / (var + eps) ~ 1
    over every axis but the last; with gamma and beta, mean beta and standard deviation |gamma| of that."""
    rng = np.random.default_rng(20)
    x = shifted_input(rng, shape)
    axes = tuple(range(len(shape) - 1))
    layer = BatchNorm(shape[-1])
    to_float64(layer)
    y = layer.forward(x)
    np.testing.assert_allclose(y.mean(axis=axes), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), x.var(axis=axes) / (x.var(axis=axes) + layer.eps), rtol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), 1, atol=1e-4)
    layer = batchnorm_float64(shape[-1], rng)
    y = layer.forward(x)
    np.testing.assert_allclose(y.mean(axis=axes), layer.params["beta"], atol=1e-12)
    np.testing.assert_allclose(y.std(axis=axes), np.abs(layer.params["gamma"]), rtol=1e-4)


def test_batchnorm_running_statistics_follow_pytorch_rule_over_several_steps() -> None:
    """After five training steps on batches of different means and spreads, the running statistics are
    (1 - momentum) * running + momentum * statistic from (0, 1), with the UNBIASED batch variance (PyTorch's
    rule; tests/test_torch.py compares with PyTorch itself). Evaluation then uses them, not the batch."""
    rng = np.random.default_rng(21)
    layer = BatchNorm(3, momentum=0.2)
    to_float64(layer)
    batches = [shifted_input(rng, (2, 3, 4, 3)) for _ in range(5)]
    for x in batches:
        layer.forward(x)
    running_mean, running_var = reference.batchnorm_running_statistics(batches, momentum=0.2)
    assert_close(layer.buffers["running_mean"], running_mean)
    assert_close(layer.buffers["running_var"], running_var)
    # The unbiased variance differs from the biased one by M / (M - 1) = 24 / 23: the test can tell them apart.
    last_step = layer.buffers["running_var"] - 0.8 * reference.batchnorm_running_statistics(batches[:4], 0.2)[1]
    np.testing.assert_allclose(last_step, 0.2 * batches[-1].reshape(-1, 3).var(axis=0, ddof=1), rtol=1e-10)
    x = batches[0]
    expected = reference.batchnorm_forward_eval(x, layer.params["gamma"], layer.params["beta"], running_mean,
                                                running_var, layer.eps)
    assert_close(layer.forward(x, training=False), expected)
    assert not np.allclose(layer.forward(x, training=False), layer.forward(x, training=True))


def test_batchnorm_defaults_and_buffers_are_not_parameters() -> None:
    """Defaults as PyTorch's (momentum 0.1, eps 1e-5); gamma ones, beta zeros, running mean zeros and
    variance ones, float32; the running statistics are buffers, which an optimiser step leaves alone, and
    training updates them in place (a model that holds the arrays sees the new values)."""
    layer = BatchNorm(4)
    assert (layer.momentum, layer.eps) == (0.1, 1e-5)
    assert set(layer.params) == set(layer.grads) == {"gamma", "beta"}
    assert set(layer.buffers) == {"running_mean", "running_var"}
    np.testing.assert_array_equal(layer.params["gamma"], 1)
    np.testing.assert_array_equal(layer.params["beta"], 0)
    np.testing.assert_array_equal(layer.buffers["running_mean"], 0)
    np.testing.assert_array_equal(layer.buffers["running_var"], 1)
    arrays = [*layer.params.values(), *layer.grads.values(), *layer.buffers.values()]
    assert all(array.dtype == np.float32 for array in arrays)
    held = dict(layer.buffers)
    x = shifted_input(np.random.default_rng(22), (8, 4)).astype(np.float32)
    layer.forward(x)
    assert all(layer.buffers[name] is held[name] for name in held)
    assert not np.array_equal(held["running_mean"], np.zeros(4))
    layer.backward(np.ones_like(x))
    running = {name: buffer.copy() for name, buffer in layer.buffers.items()}
    main.SGD(learning_rate=0.1, momentum=0.9).step(main.Sequential([layer]))
    assert not np.array_equal(layer.params["beta"], np.zeros(4))  # the step did move the parameters
    for name, buffer in layer.buffers.items():
        np.testing.assert_array_equal(buffer, running[name])


@pytest.mark.parametrize("shape", [(1, 5), (1, 1, 1, 3)], ids=str)
def test_batchnorm_training_on_one_value_per_channel_leaves_the_running_statistics(shape: tuple[int, ...]) -> None:
    """One value per channel (a last batch of one image after a dense layer) has no spread: the output is beta
    (the normalised value is 0) and the running statistics stay as they were, rather than PyTorch's error or a
    running variance dragged towards 0."""
    layer = BatchNorm(shape[-1])
    layer.params["beta"][...] = 0.5
    y = layer.forward(np.full(shape, 3.0, dtype=np.float32))
    np.testing.assert_array_equal(y, np.full(shape, 0.5, dtype=np.float32))
    np.testing.assert_array_equal(layer.buffers["running_mean"], 0.0)
    np.testing.assert_array_equal(layer.buffers["running_var"], 1.0)


def test_batchnorm_first_layer_skips_input_gradient_but_keeps_parameter_gradients() -> None:
    """With need_input_grad off (Sequential sets it on its first layer with weights), backward returns None
    and computes the same dgamma and dbeta."""
    rng = np.random.default_rng(23)
    layer = batchnorm_float64(3, rng)
    x, upstream = shifted_input(rng, (2, 4, 4, 3)), rng.standard_normal((2, 4, 4, 3))
    layer.forward(x)
    assert_skipping_the_input_gradient_changes_no_weight_gradient(layer, x, upstream)


# ------------------------------------------------------------------------------------------------
# Dropout: masks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_dropout_training_drops_about_rate_and_keeps_the_expected_value(rate: float) -> None:
    """On 100,000 ones, the share of zeros is rate (within 0.01, > 15 standard deviations), every kept entry
    is exactly 1 / (1 - rate), and the mean output stays 1 (within 0.015, > 5 standard deviations)."""
    layer = Dropout(rate, np.random.default_rng(30))
    y = layer.forward(np.ones((200, 500), dtype=np.float32))
    assert abs(np.mean(y == 0) - rate) < 0.01
    np.testing.assert_array_equal(y[y != 0], np.float32(1) / np.float32(1 - rate))
    assert abs(float(y.mean()) - 1) < 0.015


def test_dropout_evaluation_and_rate_zero_are_the_identity() -> None:
    """Evaluation returns x unchanged; rate 0 drops nothing in training either (and its gradient is grad_out)."""
    x = np.random.default_rng(31).standard_normal((3, 4, 5, 2)).astype(np.float32)
    np.testing.assert_array_equal(Dropout(0.5, np.random.default_rng(0)).forward(x, training=False), x)
    layer = Dropout(0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(layer.forward(x), x)
    np.testing.assert_array_equal(layer.backward(x), x)


def test_dropout_same_seed_same_masks_and_fresh_masks_per_forward() -> None:
    """Two layers with equally seeded generators draw the same sequence of masks; one layer draws a new mask
    at every training forward; another seed gives other masks."""
    x = np.ones((6, 10), dtype=np.float32)
    first, second = Dropout(0.5, np.random.default_rng(5)), Dropout(0.5, np.random.default_rng(5))
    masks = [first.forward(x) for _ in range(3)]
    for mask in masks:
        np.testing.assert_array_equal(second.forward(x), mask)
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(Dropout(0.5, np.random.default_rng(6)).forward(x), masks[0])


def test_dropout_next_mask_is_used_once_and_fixed_mask_every_time() -> None:
    """next_mask is used by the next training forward (and its backward), then cleared, without advancing the
    generator; evaluation leaves it in place; fixed_mask wins over next_mask and stays."""
    x, upstream = np.random.default_rng(32).standard_normal((2, 4, 6)).astype(np.float32)
    layer = Dropout(0.5, np.random.default_rng(7))
    given = Dropout(0.5, np.random.default_rng(99)).draw_mask(x.shape)
    layer.next_mask = given
    np.testing.assert_array_equal(layer.forward(x, training=False), x)
    assert layer.next_mask is given
    np.testing.assert_array_equal(layer.forward(x), x * given)
    np.testing.assert_array_equal(layer.backward(upstream), upstream * given)
    assert layer.next_mask is None
    np.testing.assert_array_equal(layer.forward(x), x * Dropout(0.5, np.random.default_rng(7)).draw_mask(x.shape))

    fixed = layer.draw_mask(x.shape)
    layer.fixed_mask, layer.next_mask = fixed, given
    for _ in range(2):
        np.testing.assert_array_equal(layer.forward(x), x * fixed)
    assert layer.fixed_mask is fixed and layer.next_mask is given
    layer.fixed_mask = None
    np.testing.assert_array_equal(layer.forward(x), x * given)


def test_dropout_whole_batch_mask_sliced_for_workers_matches_one_pass() -> None:
    """The intended use with worker threads: the main thread draws the batch's mask with draw_mask and gives
    each replica its slice as next_mask; the replicas' outputs and gradients, put together, are the one-pass ones."""
    x, upstream = np.random.default_rng(33).standard_normal((2, 6, 3, 3, 2))
    layer = Dropout(0.3, np.random.default_rng(8))
    mask = layer.draw_mask(x.shape, x.dtype)
    layer.fixed_mask = mask
    whole_y, whole_grad = layer.forward(x), layer.backward(upstream)
    layer.fixed_mask = None
    outputs, grads = [], []
    for part in (slice(0, 4), slice(4, 6)):
        replica = copy.copy(layer)  # as Sequential.replicate does
        replica.next_mask = mask[part]
        outputs.append(replica.forward(x[part]))
        grads.append(replica.backward(upstream[part]))
    np.testing.assert_array_equal(np.concatenate(outputs), whole_y)
    np.testing.assert_array_equal(np.concatenate(grads), whole_grad)


def test_dropout_rejects_bad_rates_and_mismatched_masks() -> None:
    for rate in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="rate"):
            Dropout(rate)
    layer = Dropout(0.5, np.random.default_rng(0))
    layer.next_mask = np.ones((1, 4), dtype=np.float32)  # would broadcast silently over a batch of 3
    with pytest.raises(ValueError, match="mask of shape"):
        layer.forward(np.ones((3, 4), dtype=np.float32))


# ------------------------------------------------------------------------------------------------
# Every layer, from one table: output shapes, evaluation stores nothing, dtypes
# ------------------------------------------------------------------------------------------------

# name -> (a fresh layer, the shape of a batch of its inputs)
LAYER_MAKERS = {
    "conv2d": (lambda: main.Conv2D(2, 3, 3, 2, 1, rng=np.random.default_rng(0)), (2, 9, 7, 2)),
    "maxpool2d": (lambda: main.MaxPool2D(3, 2), (2, 9, 7, 2)),
    "relu": (lambda: main.ReLU(), (2, 9, 7, 2)),
    "flatten": (lambda: main.Flatten(), (2, 9, 7, 2)),
    "dense": (lambda: main.Dense(2 * 9 * 7, 4, rng=np.random.default_rng(0)), (2, 2 * 9 * 7)),
    "batchnorm_4d": (lambda: BatchNorm(2), (3, 7, 6, 2)),
    "batchnorm_2d": (lambda: BatchNorm(5), (4, 5)),
    "dropout": (lambda: Dropout(0.5, np.random.default_rng(0)), (3, 7, 6, 2)),
    "avgpool2d": (lambda: AvgPool2D(3, 2), (3, 7, 6, 2)),
    "tanh": (lambda: Tanh(), (3, 7, 6, 2)),
}


@pytest.mark.parametrize("name", list(LAYER_MAKERS))
def test_output_shape_agrees_with_forward(name: str) -> None:
    make, shape = LAYER_MAKERS[name]
    layer = make()
    assert layer.forward(np.zeros(shape, dtype=np.float32) + 1).shape[1:] == tuple(layer.output_shape(shape[1:]))


@pytest.mark.parametrize(("height", "width", "pool", "stride"),
                         [(28, 28, 2, 2), (7, 7, 2, 2), (9, 6, 3, 1), (10, 5, 3, 2), (4, 8, 4, 3), (32, 32, 2, 2)])
def test_avgpool2d_output_shape_follows_formula(height: int, width: int, pool: int, stride: int) -> None:
    """AvgPool2D's output is (H - pool)//stride + 1 by (W - pool)//stride + 1 (leftovers dropped)."""
    expected = ((height - pool) // stride + 1, (width - pool) // stride + 1, 2)
    assert tuple(AvgPool2D(pool, stride).output_shape((height, width, 2))) == expected


def attributes(layer: Any) -> dict[str, tuple[int, Any]]:
    """Every attribute of the layer with the id of its value, and a copy of the arrays in its dicts."""
    snapshot = {}
    for name, value in vars(layer).items():
        contents = {key: (id(array), array.copy()) for key, array in value.items()} if isinstance(value, dict) else None
        snapshot[name] = (id(value), contents)
    return snapshot


def assert_same_attributes(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name, (identity, contents) in before.items():
        assert after[name][0] == identity, name
        if contents is not None:
            assert contents.keys() == after[name][1].keys(), name
            for key, (array_id, array) in contents.items():
                assert after[name][1][key][0] == array_id, (name, key)
                np.testing.assert_array_equal(after[name][1][key][1], array)


@pytest.mark.parametrize("trained_first", [False, True], ids=["fresh", "after_training"])
@pytest.mark.parametrize("name", list(LAYER_MAKERS))
def test_evaluation_stores_nothing_on_the_layer(name: str, trained_first: bool) -> None:
    """forward(training=False) neither adds, replaces nor changes anything on the layer (no attribute, no
    buffer value, no pending Dropout mask), on a fresh layer and after a training step: evaluation is
    thread-safe."""
    make, shape = LAYER_MAKERS[name]
    layer = make()
    x = np.random.default_rng(40).standard_normal(shape).astype(np.float32)
    if trained_first:
        layer.backward(np.ones_like(layer.forward(x)))
    if isinstance(layer, Dropout):
        layer.next_mask = layer.draw_mask(shape)
    before = attributes(layer)
    layer.forward(x, training=False)
    layer.forward(2 * x, training=False)
    assert_same_attributes(before, attributes(layer))


@pytest.mark.parametrize("name", list(LAYER_MAKERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_preserve_dtype(name: str, dtype: type) -> None:
    """float32 in gives float32 out of forward (training and evaluation) and backward, parameter gradients
    included; float64 stays float64 when the parameters are float64 (as in gradient checks). BatchNorm's
    running statistics stay float32 either way (they are saved in model files as float32)."""
    make, shape = LAYER_MAKERS[name]
    layer = make()
    if dtype == np.float64:
        for param_name in layer.params:  # as the gradient checks convert: params and grads only
            layer.params[param_name] = layer.params[param_name].astype(np.float64)
            layer.grads[param_name] = np.zeros_like(layer.params[param_name])
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    assert layer.forward(x, training=False).dtype == dtype
    y = layer.forward(x)
    assert y.dtype == dtype
    assert layer.backward(np.ones_like(y)).dtype == dtype
    assert all(grad.dtype == dtype for grad in layer.grads.values())
    assert all(buffer.dtype == np.float32 for buffer in getattr(layer, "buffers", {}).values())


# Modest example counts and no deadline: the loop reference is slow and the machine is shared.
FEW = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

seeds = st.integers(0, 2**32 - 1)


@FEW
@given(n=st.integers(1, 3), height=st.integers(1, 12), width=st.integers(1, 12), channels=st.integers(1, 3),
       filters=st.integers(1, 3), kernel=st.integers(1, 5), stride=st.integers(1, 3), padding=st.integers(0, 2),
       seed=seeds)
def test_conv2d_equals_loop_reference(n: int, height: int, width: int, channels: int, filters: int, kernel: int,
                                      stride: int, padding: int, seed: int) -> None:
    """For any shape where the output is at least 1x1, Conv2D's output shape follows
    (H + 2p - k)//s + 1 and its forward and backward (dx, dW, db) equal the loop reference (float64)."""
    assume(kernel <= height + 2 * padding and kernel <= width + 2 * padding)
    rng = np.random.default_rng(seed)
    layer = main.Conv2D(channels, filters, kernel, stride, padding, rng=rng)
    to_float64(layer)
    layer.params["b"] = rng.standard_normal(filters)
    x = rng.standard_normal((n, height, width, channels))

    out_h, out_w = (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1
    assert layer.forward(x).shape == (n, out_h, out_w, filters)
    assert tuple(layer.output_shape((height, width, channels))) == (out_h, out_w, filters)
    assert_conv2d_matches_reference(layer, x, rng)


@st.composite
def pool_cases(draw: st.DrawFn) -> tuple[int, int | None, int, int]:
    """(pool_size, stride, height, width) with the image at least one window large. The stride is the
    default (None = pool_size), smaller than the pool (overlapping windows), or at least the pool
    (disjoint or gapped windows): every kind of tiling gets its share of examples."""
    pool_size = draw(st.integers(1, 5))
    overlapping = st.integers(1, pool_size - 1) if pool_size > 1 else st.just(1)
    stride = draw(st.one_of(st.none(), overlapping, st.integers(pool_size, pool_size + 2)))
    return pool_size, stride, draw(st.integers(pool_size, 12)), draw(st.integers(pool_size, 12))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), case=pool_cases(), channels=st.integers(1, 3),
       value_range=st.sampled_from([1, 2, 3, None]), seed=seeds)
def test_maxpool2d_equals_loop_reference(n: int, case: tuple[int, int | None, int, int], channels: int,
                                         value_range: int | None, seed: int) -> None:
    """For any pool size and stride (overlapping, disjoint, gapped; dividing the input or not) MaxPool2D's
    output shape follows (H - pool)//stride + 1 and forward and backward equal the loop reference, also on
    inputs full of exact ties (small integers, even all zeros) where the first maximum must win."""
    pool_size, stride, height, width = case
    event("overlapping windows" if (stride or pool_size) < pool_size else "disjoint windows")
    rng = np.random.default_rng(seed)
    if value_range is None:
        x = rng.standard_normal((n, height, width, channels))
    else:  # integers 0 .. value_range-1 as floats: ties everywhere (all zeros when value_range is 1)
        x = rng.integers(0, value_range, (n, height, width, channels)).astype(np.float64)
    layer = main.MaxPool2D(pool_size, stride)

    y = layer.forward(x)
    step = pool_size if stride is None else stride
    assert y.shape == (n, (height - pool_size) // step + 1, (width - pool_size) // step + 1, channels)
    np.testing.assert_array_equal(y, reference.maxpool_forward(x, pool_size, stride))

    upstream = rng.standard_normal(y.shape)
    np.testing.assert_allclose(layer.backward(upstream), reference.maxpool_backward(x, upstream, pool_size, stride),
                               rtol=1e-12, atol=1e-12)
