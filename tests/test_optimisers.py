"""Optimisers and schedules: SGD with momentum and Adam by hand, float32 weights, learning-rate schedules and weight
decay."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import (
    BN_DROPOUT_NET,
    checked_model,
    digits,
)

import config_schema
import main

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


# ---- learning-rate schedules and weight decay -----------------------------------------------------------------------


def rates(schedule: dict, base_lr: float = 0.01, steps_per_epoch: int = 10, epochs: int = 4) -> list[float]:
    schedule = config_schema.validate_config({"training": {"lr_schedule": schedule}})["training"]["lr_schedule"]
    rate = main.learning_rate_schedule(schedule, base_lr, steps_per_epoch, steps_per_epoch * epochs)
    return [rate(step) for step in range(steps_per_epoch * epochs)]


def test_schedules_follow_their_formulas() -> None:
    assert rates("constant") == [0.01] * 40
    assert rates({"name": "step", "step_size": 2, "gamma": 0.1}) == pytest.approx([0.01] * 20 + [0.001] * 20)
    cosine = rates({"name": "cosine", "min_lr": 0.001})
    assert cosine[0] == pytest.approx(0.01) and cosine[20] == pytest.approx(0.0055)
    assert all(a > b for a, b in zip(cosine, cosine[1:])) and cosine[-1] > 0.001
    cycle = rates({"name": "one_cycle", "pct_start": 0.25, "div_factor": 10, "final_div_factor": 100})
    peak = int(np.argmax(cycle))
    assert cycle[0] == pytest.approx(0.001) and cycle[peak] == pytest.approx(0.01) and peak == 9
    assert all(a < b for a, b in zip(cycle[:peak], cycle[1:peak + 1]))
    assert all(a > b for a, b in zip(cycle[peak:], cycle[peak + 1:]))
    assert cycle[-1] == pytest.approx(0.001 / 100)


def test_training_uses_the_schedule_and_records_the_rate_per_epoch() -> None:
    data = digits(256, 64)
    model = main.build_model(checked_model({"layers": ["flatten", {"dense": {"units": 10}}]}), data.input_shape, 10,
                             np.random.default_rng(0))
    optimizer = main.Adam(0.01)
    schedule = main.learning_rate_schedule({"name": "step", "step_size": 1, "gamma": 0.5}, 0.01, 8, 24)
    result = main.train(model, optimizer, data, epochs=3, batch_size=32, rng=np.random.default_rng(1),
                        learning_rate=schedule)
    assert [row["learning_rate"] for row in result.history] == pytest.approx([0.01, 0.005, 0.0025])
    assert optimizer.learning_rate == pytest.approx(0.0025)


def test_weight_decay_shrinks_weights_but_not_biases_or_batchnorm() -> None:
    """With zero gradients, one step of decoupled weight decay multiplies every W by 1 - lr * wd, and leaves
    biases and BatchNorm's gamma and beta alone (Adam's own update is 0 for a zero gradient)."""
    model = main.build_model(checked_model(BN_DROPOUT_NET), (8, 8, 1), 10, np.random.default_rng(0))
    before = {key: param.copy() for key, param, _ in main.parameters(model)}
    for _, _, grad in main.parameters(model):
        grad[...] = 0
    for optimizer in (main.Adam(0.1, weight_decay=0.5), main.SGD(0.1, momentum=0.9, weight_decay=0.5)):
        for key, param, _ in main.parameters(model):
            param[...] = before[key]
        optimizer.step(model)
        for key, param, _ in main.parameters(model):
            expected = before[key] * (0.95 if key.endswith(".W") else 1.0)
            np.testing.assert_allclose(param, expected, rtol=1e-6, err_msg=key)
