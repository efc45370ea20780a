"""Tests of the new layers BatchNorm, Dropout, AvgPool2D and Tanh: backward passes against central differences,
the vectorised layers against the loop references, BatchNorm's statistics, Dropout's masks, evaluation that
stores nothing, and dtypes.

Gradient checks run in float64 with an independent checker written here (as in tests/test_layers.py), in
TRAINING mode: BatchNorm then normalises with the batch's own statistics (so the checked gradient goes through
the batch mean and variance) and Dropout uses a fixed mask, so that every forward of the check computes the
same function that backward differentiates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import reference
import test_layers
from helpers import to_float64
from test_layers import TOLERANCE

import main
from main import AvgPool2D, BatchNorm, Dropout, Tanh

# The worst gradient-check error seen per layer, printed at the end of the module (visible with pytest -s).
WORST_ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def report_worst_errors() -> Iterator[None]:
    yield
    if WORST_ERRORS:
        print("\nworst relative gradient error per layer: "
              + ", ".join(f"{name} {error:.1e}" for name, error in sorted(WORST_ERRORS.items())))


# ------------------------------------------------------------------------------------------------
# Helpers: tests/test_layers.py's independent gradient checker, here in training mode
# ------------------------------------------------------------------------------------------------


def layer_gradient_errors(layer: Any, x: np.ndarray, rng: np.random.Generator) -> dict[str, float]:
    """test_layers' check of one layer's backward, in training mode; records the worst error in WORST_ERRORS."""
    errors = test_layers.layer_gradient_errors(layer, x, rng, training=True)
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
    errors = layer_gradient_errors(layer, shifted_input(rng, shape), rng)
    assert set(errors) == {"input", "gamma", "beta"}
    assert max(errors.values()) < TOLERANCE, errors


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(4, 7), (2, 5, 3, 2)], ids=str)
def test_dropout_gradient_matches_central_differences(rate: float, shape: tuple[int, ...]) -> None:
    """Dropout with a fixed mask: dx agrees with central differences (kept entries scaled by 1 / (1 - rate))."""
    rng = np.random.default_rng(int(rate * 100) + len(shape))
    layer = dropout_with_fixed_mask(rate, shape, seed=3)
    errors = layer_gradient_errors(layer, rng.standard_normal(shape), rng)
    assert errors["input"] < TOLERANCE, errors


@pytest.mark.parametrize(("pool_size", "stride"), AVGPOOL_CASES)
def test_avgpool2d_gradient_matches_central_differences(pool_size: int, stride: int | None) -> None:
    """AvgPool2D's dx agrees with central differences for disjoint, overlapping and gapped windows on a
    non-square input that most pool sizes do not divide."""
    rng = np.random.default_rng(10 * pool_size + (stride or 0))
    errors = layer_gradient_errors(AvgPool2D(pool_size, stride), rng.standard_normal((2, 7, 6, 3)), rng)
    assert errors["input"] < TOLERANCE, errors


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3, 2)], ids=str)
def test_tanh_gradient_matches_central_differences(shape: tuple[int, ...]) -> None:
    """Tanh's dx agrees with central differences, on inputs that reach its flat tails too."""
    rng = np.random.default_rng(len(shape))
    errors = layer_gradient_errors(Tanh(), 2 * rng.standard_normal(shape), rng)
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


@pytest.mark.parametrize(("layer_class", "broken", "make"), [
    (BatchNorm, batchnorm_backward_with_constant_statistics,
     lambda rng: (batchnorm_float64(3, rng), shifted_input(rng, (2, 3, 4, 3)))),
    (AvgPool2D, avgpool_backward_assigning, lambda rng: (AvgPool2D(3, 1), rng.standard_normal((2, 7, 6, 2)))),
    (Dropout, dropout_backward_unscaled, lambda rng: (dropout_with_fixed_mask(0.5, (4, 6), 1),
                                                      rng.standard_normal((4, 6)))),
], ids=["batchnorm_constant_statistics", "avgpool_assigns", "dropout_unscaled"])
def test_gradient_check_fails_on_broken_backward(monkeypatch: pytest.MonkeyPatch, layer_class: type,
                                                 broken: Callable, make: Callable) -> None:
    """The checker above can fail: with a classic mistake in backward, the input gradient is far off."""
    monkeypatch.setattr(layer_class, "backward", broken)
    rng = np.random.default_rng(9)
    layer, x = make(rng)
    worst_before = dict(WORST_ERRORS)
    errors = layer_gradient_errors(layer, x, rng)
    WORST_ERRORS.clear()
    WORST_ERRORS.update(worst_before)  # a deliberately broken layer is no measure of the real one
    assert errors["input"] > 100 * TOLERANCE, errors


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
POOL_CASES = [*test_layers.POOL_CASES, (2, 10, 10, 6, 5, 5)]


@pytest.mark.parametrize(("n", "height", "width", "channels", "pool_size", "stride"), POOL_CASES)
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
    rule; tests/test_new_layers_torch.py compares with PyTorch itself). Evaluation then uses them, not the batch."""
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
    assert layer.backward(upstream) is not None
    with_input_grad = {name: grad.copy() for name, grad in layer.grads.items()}
    layer.need_input_grad = False
    layer.forward(x)
    assert layer.backward(upstream) is None
    for name, grad in layer.grads.items():
        np.testing.assert_array_equal(grad, with_input_grad[name])


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
# All new layers: shapes, evaluation stores nothing, dtypes
# ------------------------------------------------------------------------------------------------

LAYER_MAKERS = {
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
