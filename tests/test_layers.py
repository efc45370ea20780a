"""Layer-level tests for numpy-cnn: every backward pass against central differences, the max-pooling
tie rule, the vectorised layers against the slow loop reference, the loss, the optimisers, shapes,
the model summary and main.gradient_check itself.

Gradient checks run in float64 with an independent checker written here (not main.numeric_gradient),
so a bug shared by the layers and main's own checker cannot hide itself.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, Callable

import numpy as np
import pytest
import reference
from helpers import assert_conv2d_matches_reference, classifier_head, count_layers, model_section, to_float64

import config_schema
import datafiles
import errors
import main

STEP = 1e-6  # central-difference step (float64)
TOLERANCE = 1e-6  # largest relative error accepted between analytic and numeric gradients


# ------------------------------------------------------------------------------------------------
# Helpers: an independent gradient checker
# ------------------------------------------------------------------------------------------------


def central_differences(objective: Callable[[], float], array: np.ndarray, step: float = STEP) -> np.ndarray:
    """d objective / d array at EVERY element, as (f(a + h) - f(a - h)) / 2h.

    `array` is changed in place (one element at a time) and restored; objective() must read it.
    """
    gradient = np.zeros(array.shape)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + step
        plus = objective()
        array[index] = original - step
        minus = objective()
        array[index] = original
        gradient[index] = (plus - minus) / (2 * step)
    return gradient


def gradient_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """max |analytic - numeric| relative to the tensor's largest gradient entry.

    Scaling by the tensor's largest entry (not entry by entry) keeps floating-point round-off in the
    numeric gradient (about 1e-10 absolute) from looking like a 100% error on entries that happen to
    be nearly zero, while still catching any single wrong entry.
    """
    assert analytic is not None, "backward returned None instead of a gradient"
    assert analytic.shape == numeric.shape
    scale = max(float(np.max(np.abs(analytic))), float(np.max(np.abs(numeric))), 1e-12)
    return float(np.max(np.abs(analytic - numeric))) / scale


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


@pytest.mark.parametrize("make_layer", [lambda rng: main.Conv2D(2, 3, 3, 2, 1, rng=rng),
                                        lambda rng: main.Dense(6, 4, rng=rng)], ids=["conv2d", "dense"])
def test_first_layer_skips_input_gradient_but_keeps_weight_gradients(make_layer: Callable) -> None:
    """With need_input_grad off (as Sequential sets it on its first layer), backward returns None
    but computes exactly the same weight gradients."""
    rng = np.random.default_rng(4)
    layer = make_layer(rng)
    to_float64(layer)
    x = rng.standard_normal((2, 5, 4, 2)) if isinstance(layer, main.Conv2D) else rng.standard_normal((2, 6))
    upstream = rng.standard_normal(layer.forward(x).shape)
    assert layer.backward(upstream) is not None
    with_input_grad = {name: grad.copy() for name, grad in layer.grads.items()}
    layer.need_input_grad = False
    layer.forward(x)
    assert layer.backward(upstream) is None
    for name, grad in layer.grads.items():
        np.testing.assert_array_equal(grad, with_input_grad[name])
    assert main.Sequential([make_layer(rng), main.Flatten()]).layers[0].need_input_grad is False


SMALL_MODELS = {
    # The default architecture (conv k3 p1 + pool 2, twice), scaled down to 8x8 digits.
    "default_8x8": ((8, 8, 1), model_section(
        {"conv2d": {"filters": 3, "padding": 1}}, "relu", "maxpool2d", {"conv2d": {"filters": 4, "padding": 1}}, "relu",
        "maxpool2d", *classifier_head(6))),
    # Non-square, two channels, even kernel, stride 2, padding 2, overlapping 3x3 pooling at stride 1.
    "nonsquare_overlap": ((9, 7, 2), model_section(
        {"conv2d": {"filters": 3, "kernel_size": 4, "stride": 2, "padding": 2}}, "relu",
        {"maxpool2d": {"pool_size": 3, "stride": 1}}, {"conv2d": {"filters": 2, "kernel_size": 2}}, "relu",
        *classifier_head(5))),
    # Kernel 5, stride 3, and a pool size that does not divide its input.
    "stride3_nondividing": ((11, 10, 1), model_section(
        {"conv2d": {"filters": 2, "kernel_size": 5, "stride": 3, "padding": 2}}, "relu",
        {"maxpool2d": {"pool_size": 3, "stride": 2}}, "flatten", {"dense": {"units": 4}}, "relu",
        {"dense": {"units": 10}})),
}


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_whole_model_gradients_match_central_differences(name: str) -> None:
    """A model from main.build_model plus SoftmaxCrossEntropy: the gradient of the loss with respect to
    the input and to EVERY weight of every layer agrees with central differences of the loss."""
    input_shape, model_cfg = SMALL_MODELS[name]
    rng = np.random.default_rng(5)
    model = main.build_model(model_cfg, input_shape, 10, rng)
    for layer in model.layers:
        to_float64(layer)
        if "b" in layer.params:  # non-zero biases: no pre-activation sits exactly on a ReLU kink
            layer.params["b"] = 0.1 * rng.standard_normal(layer.params["b"].shape)
    model.layers[0].need_input_grad = True  # so that backward also returns dLoss/dx
    x, labels = rng.random((3, *input_shape)), rng.integers(0, 10, 3)
    loss_fn = main.SoftmaxCrossEntropy()

    def loss() -> float:
        return loss_fn.forward(model.forward(x, training=False), labels)

    loss_fn.forward(model.forward(x), labels)
    grad_x = model.backward(loss_fn.backward())
    analytic = {("model", "input"): (grad_x, x)}
    for index, layer in enumerate(model.layers):
        for tensor, param in layer.params.items():
            analytic[(f"{index}:{type(layer).__name__}", tensor)] = (layer.grads[tensor].copy(), param)
    assert len(analytic) == 1 + 2 * (count_layers(model_cfg, "conv2d") + 2)
    errors = {key: gradient_error(grad, central_differences(loss, array)) for key, (grad, array) in analytic.items()}
    assert max(errors.values()) < TOLERANCE, errors


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
# Softmax cross-entropy
# ------------------------------------------------------------------------------------------------


def test_softmax_cross_entropy_matches_reference() -> None:
    """Loss and gradient equal the loop reference on random logits."""
    rng = np.random.default_rng(10)
    logits, labels = 3 * rng.standard_normal((6, 10)), rng.integers(0, 10, 6)
    loss_fn = main.SoftmaxCrossEntropy()
    ref_loss, ref_grad = reference.softmax_cross_entropy(logits, labels)
    assert loss_fn.forward(logits, labels) == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(loss_fn.backward(), ref_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_cross_entropy_is_exact_for_huge_logits(dtype: type) -> None:
    """Logits of +-1e4 (exp would overflow) give a finite loss equal to the exact value, worked out
    by hand: row 0 is right with margin 2e4 (loss ~0), row 1 wrong by 2e4 (loss 2e4), row 2 ties its
    two largest logits (loss log 2)."""
    logits = np.array([[1e4, -1e4, -1e4], [-1e4, 1e4, -1e4], [1e4, 1e4, -1e4]], dtype=dtype)
    labels = np.array([0, 0, 1])
    loss_fn = main.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, labels)
    exact = (0.0 + 2e4 + math.log(2)) / 3
    assert math.isfinite(loss)
    assert loss == pytest.approx(exact, rel=1e-6)
    grad = loss_fn.backward()
    assert np.isfinite(grad).all()
    expected = np.array([[0, 0, 0], [-1, 1, 0], [0.5, -0.5, 0]]) / 3
    np.testing.assert_allclose(grad, expected, atol=1e-7)


def test_softmax_cross_entropy_gradient_is_softmax_minus_onehot_over_n() -> None:
    """backward() equals (softmax - onehot) / N, and it is the derivative of the loss (central differences)."""
    rng = np.random.default_rng(11)
    logits, labels = rng.standard_normal((5, 4)), np.array([0, 3, 3, 1, 2])
    loss_fn = main.SoftmaxCrossEntropy()
    loss_fn.forward(logits, labels)
    grad = loss_fn.backward()
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(grad, (softmax - np.eye(4)[labels]) / 5, rtol=1e-12, atol=1e-15)
    numeric = central_differences(lambda: loss_fn.forward(logits, labels), logits)
    assert gradient_error(grad, numeric) < TOLERANCE


def test_softmax_cross_entropy_keeps_float32() -> None:
    """float32 logits give a float32 gradient (no silent upcast in the training loop)."""
    rng = np.random.default_rng(12)
    loss_fn = main.SoftmaxCrossEntropy()
    loss = loss_fn.forward(rng.standard_normal((4, 10)).astype(np.float32), rng.integers(0, 10, 4).astype(np.uint8))
    assert isinstance(loss, float)
    assert loss_fn.backward().dtype == np.float32


# ------------------------------------------------------------------------------------------------
# Optimisers, against steps worked out by hand
# ------------------------------------------------------------------------------------------------


def tiny_model(weights: list[float]) -> main.Sequential:
    """A model with a single Dense(1, len(weights)) layer whose weights we set directly (float64)."""
    layer = main.Dense(1, len(weights), rng=np.random.default_rng(0))
    layer.params = {"W": np.array([weights]), "b": np.zeros(len(weights))}
    layer.grads = {"W": np.zeros((1, len(weights))), "b": np.zeros(len(weights))}
    return main.Sequential([layer])


def test_sgd_momentum_matches_hand_computed_steps() -> None:
    """SGD with momentum (PyTorch form) v = mu*v + g, w -= lr*v, over three steps."""
    model = tiny_model([1.0, -2.0])
    optimizer = main.SGD(learning_rate=0.1, momentum=0.9)
    layer = model.layers[0]
    w, v = np.array([1.0, -2.0]), np.zeros(2)
    for g in ([0.5, -1.0], [0.25, 2.0], [-1.0, 0.0]):
        layer.grads["W"][0] = g
        optimizer.step(model)
        v = 0.9 * v + np.array(g)
        w = w - 0.1 * v
        np.testing.assert_allclose(layer.params["W"][0], w, rtol=1e-14)
    # The three steps written out for the first weight: v = 0.5, 0.7, -0.37.
    assert layer.params["W"][0, 0] == pytest.approx(1.0 - 0.1 * (0.5 + 0.7 - 0.37), rel=1e-14)
    np.testing.assert_array_equal(layer.params["b"], 0.0)  # zero gradient, zero velocity: bias unmoved


def test_adam_matches_hand_computed_steps_with_bias_correction() -> None:
    """Adam's first step moves every weight by ~lr*sign(g), whatever the gradient's size (bias
    correction: m_hat = g, v_hat = g^2); the second step follows the formulas at t=2."""
    grads1, grads2 = [1e-3, -5.0, 0.2], [2e-3, 1.0, -0.2]
    lr, beta1, beta2, eps = 0.01, 0.9, 0.999, 1e-8
    model = tiny_model([0.5, 0.5, 0.5])
    layer = model.layers[0]
    optimizer = main.Adam(learning_rate=lr)

    layer.grads["W"][0] = grads1
    optimizer.step(model)
    first_step = layer.params["W"][0] - 0.5
    np.testing.assert_allclose(first_step, -lr * np.sign(grads1), rtol=1e-4)  # g/(|g|+eps)
    for g, step in zip(grads1, first_step):
        assert step == pytest.approx(-lr * g / (abs(g) + eps), rel=1e-9)

    layer.grads["W"][0] = grads2
    optimizer.step(model)
    for i, (g1, g2) in enumerate(zip(grads1, grads2)):
        m = beta1 * (1 - beta1) * g1 + (1 - beta1) * g2
        v = beta2 * (1 - beta2) * g1 * g1 + (1 - beta2) * g2 * g2
        m_hat, v_hat = m / (1 - beta1 ** 2), v / (1 - beta2 ** 2)
        expected = 0.5 - lr * g1 / (abs(g1) + eps) - lr * m_hat / (math.sqrt(v_hat) + eps)
        assert layer.params["W"][0, i] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert optimizer.t == 2


def test_optimisers_keep_float32_weights() -> None:
    """An optimiser step on a float32 model leaves float32 weights (the product's dtype)."""
    for optimizer in (main.SGD(0.1, 0.9), main.Adam(0.01)):
        layer = main.Dense(3, 2, rng=np.random.default_rng(13))
        layer.grads["W"][...] = 1.0
        model = main.Sequential([layer])
        optimizer.step(model)
        assert layer.params["W"].dtype == np.float32
        assert layer.params["b"].dtype == np.float32


# ------------------------------------------------------------------------------------------------
# Shapes, summary, build_model
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


def default_mnist_model() -> main.Sequential:
    """The model of the default config for 28x28x1 MNIST images and 10 classes."""
    return main.build_model(config_schema.validate_config({})["model"], (28, 28, 1), 10, np.random.default_rng(0))


def test_summary_lists_every_layer_with_shapes_and_parameters() -> None:
    """The default MNIST model's summary shows each layer, its output shape and weight count, and the
    total 421,642 (= the sum of the weights computed from the architecture here)."""
    conv1, conv2 = 3 * 3 * 1 * 32 + 32, 3 * 3 * 32 * 64 + 64
    dense1, dense2 = 7 * 7 * 64 * 128 + 128, 128 * 10 + 10
    expected_rows = [("conv2d_1 (Conv2D)", (28, 28, 32), conv1), ("relu_1 (ReLU)", (28, 28, 32), 0),
                     ("maxpool2d_1 (MaxPool2D)", (14, 14, 32), 0), ("conv2d_2 (Conv2D)", (14, 14, 64), conv2),
                     ("relu_2 (ReLU)", (14, 14, 64), 0), ("maxpool2d_2 (MaxPool2D)", (7, 7, 64), 0),
                     ("flatten_1 (Flatten)", (3136,), 0), ("dense_1 (Dense)", (128,), dense1),
                     ("relu_3 (ReLU)", (128,), 0), ("dense_2 (Dense)", (10,), dense2)]
    model = default_mnist_model()
    total = conv1 + conv2 + dense1 + dense2
    assert total == 421_642
    assert model.parameter_count() == total
    lines = model.summary().splitlines()
    for name, shape, count in expected_rows:
        matching = [line for line in lines if line.startswith(name)]
        assert len(matching) == 1, f"{name} missing from the summary"
        assert str(shape) in matching[0] and matching[0].rstrip().endswith(f"{count:,}"), matching[0]
    assert "Total parameters: 421,642" in lines[-1]
    assert [(r["layer"], tuple(r["output_shape"]), r["parameters"]) for r in model.summary_rows()] == expected_rows


def test_summary_shapes_agree_with_a_real_forward_pass() -> None:
    """The shapes the summary predicts are the shapes a real batch has after every layer."""
    model = default_mnist_model()
    x = np.random.default_rng(1).random((2, 28, 28, 1)).astype(np.float32)
    for layer, row in zip(model.layers, model.summary_rows()):
        x = layer.forward(x, training=False)
        assert list(x.shape[1:]) == row["output_shape"], row["layer"]


CONV_32 = {"conv2d": {"filters": 32}}


@pytest.mark.parametrize(("input_shape", "layers", "message"), [
    # 8 -> conv 6 -> pool 3 -> conv k5: too large
    ((8, 8, 1), [CONV_32, "relu", "maxpool2d", {"conv2d": {"filters": 32, "kernel_size": 5}}],
     "model.layers[3] (conv2d): kernel_size 5"),
    # 8 -> conv 6 -> pool 3 -> conv 1 -> pool 2: too large
    ((8, 8, 1), [CONV_32, "relu", "maxpool2d", CONV_32, "relu", "maxpool2d"],
     "model.layers[5] (maxpool2d): pool_size 2"),
    ((28, 28, 1), [{"conv2d": {"filters": 32, "kernel_size": 31, "padding": 1}}],
     "model.layers[0] (conv2d): kernel_size 31"),
    # 28 -> conv s3 9 -> pool 4 2 -> conv k1 2 -> conv p1 2 -> pool 3: too large
    ((28, 28, 1), [{"conv2d": {"filters": 32, "stride": 3}}, "relu", {"maxpool2d": {"pool_size": 4}},
                   {"conv2d": {"filters": 32, "kernel_size": 1}}, "relu", {"conv2d": {"filters": 32, "padding": 1}},
                   "relu", {"maxpool2d": {"pool_size": 3}}],
     "model.layers[7] (maxpool2d): pool_size 3"),
])
def test_build_model_names_the_layer_that_empties_the_image(input_shape: tuple, layers: list, message: str) -> None:
    """A kernel larger than its padded input, or a pool larger than its image, raises ConfigError
    naming the offending item of model.layers and its type."""
    with pytest.raises(errors.ConfigError, match=re.escape(message)):
        main.build_model(model_section(*layers, *classifier_head(8)),
                         input_shape, 10, np.random.default_rng(0))


CONV = {"conv2d": {"filters": 2, "kernel_size": 3, "stride": 1, "padding": 0}}
DENSE_10 = {"dense": {"units": 10}}


@pytest.mark.parametrize(("layers", "message"), [
    ([CONV, "relu", DENSE_10], "model.layers[2] (dense): gets a 6x6x2 image; put flatten before it"),
    (["flatten", CONV, DENSE_10], "model.layers[1] (conv2d): needs an image (H, W, C) as its input, but gets a "
                                  "vector of 64 values"),
    (["flatten", DENSE_10, {"maxpool2d": {"pool_size": 2, "stride": None}}], "model.layers[2] (maxpool2d): needs "
                                                                             "an image"),
    ([CONV, "flatten", {"dense": {"units": 7}}], "model.layers[2], dense) outputs shape (7,), but the data has 10 "
                                                 "classes"),
    ([CONV, "relu"], "model.layers[1], relu) outputs shape (6, 6, 2), but the data has 10 classes"),
])
def test_build_model_names_the_layer_that_does_not_fit_its_input(layers: list, message: str) -> None:
    """A dense layer on an image (no flatten), a conv or pooling layer on a vector, or a last layer that does
    not output one value per class raises ConfigError naming the item of model.layers."""
    with pytest.raises(errors.ConfigError, match=re.escape(message)):
        main.build_model({"layers": layers}, (8, 8, 1), 10, np.random.default_rng(0))


@pytest.mark.parametrize("input_shape", [(8, 8, 1), (28, 28, 1)])
def test_default_architecture_builds_and_runs_on_digits_and_mnist_sizes(input_shape: tuple) -> None:
    """The default model config builds for 8x8 (digits) and 28x28 (MNIST) inputs and maps a batch to
    10 logits per image."""
    model = main.build_model(config_schema.validate_config({})["model"], input_shape, 10, np.random.default_rng(0))
    logits = model.forward(np.random.default_rng(1).random((3, *input_shape)).astype(np.float32))
    assert logits.shape == (3, 10)
    assert np.isfinite(logits).all()


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


@pytest.mark.parametrize(("target", "broken", "model", "expected_failure"), [
    ("col2im", col2im_assigning, "conv_no_pool", ("conv2d_1", "input")),
    ("Conv2D.backward", conv_backward_without_bias, "conv_no_pool", ("conv2d_2", "b")),
    ("MaxPool2D.backward", maxpool_backward_averaging, "overlapping_pool", ("maxpool2d_1", "input")),
], ids=["conv_col2im_assigns", "conv_drops_bias", "maxpool_averages"])
def test_gradient_check_fails_on_broken_backward(monkeypatch: pytest.MonkeyPatch, target: str, broken: Callable,
                                                 model: str, expected_failure: tuple[str, str]) -> None:
    """With a layer's backward deliberately broken, main.gradient_check marks that layer's tensor as
    failed: the checker can fail."""
    owner, _, attribute = target.rpartition(".")
    monkeypatch.setattr(getattr(main, owner) if owner else main, attribute, broken)
    rows = run_gradient_check(model)
    assert expected_failure in failed(rows), main.gradient_check_table(rows)


# ------------------------------------------------------------------------------------------------
# dtype: float32 in, float32 out
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make_layer", [
    lambda: main.Conv2D(2, 3, 3, 2, 1, rng=np.random.default_rng(0)),
    lambda: main.MaxPool2D(3, 2),
    lambda: main.ReLU(),
    lambda: main.Flatten(),
    lambda: main.Dense(2 * 9 * 7, 4, rng=np.random.default_rng(0)),
], ids=["conv2d", "maxpool2d", "relu", "flatten", "dense"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_preserve_dtype(make_layer: Callable, dtype: type) -> None:
    """float32 in gives float32 out of forward and backward, weight gradients included (and float64
    stays float64 when the weights are float64, as in gradient checks)."""
    layer = make_layer()
    if dtype == np.float64:
        to_float64(layer)
    x = np.random.default_rng(1).standard_normal((2, 9, 7, 2)).astype(dtype)
    if isinstance(layer, main.Dense):
        x = x.reshape(2, -1)
    y = layer.forward(x)
    assert y.dtype == dtype
    grad_in = layer.backward(np.ones_like(y))
    assert grad_in.dtype == dtype
    assert all(grad.dtype == dtype for grad in layer.grads.values())


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
