"""The loss and the model as a whole: softmax cross-entropy, whole-model gradients, build_model and its summary,
evaluation in batches."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import reference
from helpers import (
    TOLERANCE,
    central_differences,
    classifier_head,
    count_layers,
    gradient_error,
    model_section,
    run_in_process,
    small_config,
    to_float64,
    write_config,
)

import config_schema
import errors
import main

# ---- softmax on large logits ----------------------------------------------------------------------------------------


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


# ---- memory: evaluation in batches ----------------------------------------------------------------------------------


def test_evaluate_and_predict_proba_pass_at_most_one_batch_to_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """On 10,000 inputs with batch_size 1000, forward never sees more than 1000 samples at once, every
    sample is seen exactly once, and the results equal those of one big forward pass."""
    rng = np.random.default_rng(0)
    model = main.build_model(model_section(*classifier_head(16)), (8, 8, 1), 10, rng)  # fast: dense only
    x = rng.random((10_000, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 10, 10_000)
    one_pass_logits = model.forward(x, training=False)

    batch_sizes: list[int] = []
    real_forward = model.forward

    def counting_forward(inputs: np.ndarray, training: bool = True) -> np.ndarray:
        batch_sizes.append(len(inputs))
        return real_forward(inputs, training)

    monkeypatch.setattr(model, "forward", counting_forward)
    loss, accuracy = model.evaluate(x, y, batch_size=1000)
    assert max(batch_sizes) <= 1000 and sum(batch_sizes) == 10_000
    assert loss == pytest.approx(main.SoftmaxCrossEntropy().forward(one_pass_logits, y), rel=1e-5)
    assert accuracy == np.mean(one_pass_logits.argmax(axis=1) == y)

    batch_sizes.clear()
    probabilities = model.predict_proba(x, batch_size=1000)
    assert max(batch_sizes) <= 1000 and sum(batch_sizes) == 10_000
    assert probabilities.shape == (10_000, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), one_pass_logits.argmax(axis=1))


@pytest.mark.parametrize("convs", [[], [{"conv2d": {"filters": 4, "padding": 1}}, "relu", "maxpool2d"]],
                         ids=["dense", "conv"])
def test_no_images_give_no_rows_of_k_probabilities(convs: list) -> None:
    """predict_proba of 0 images has shape (0, K), as documented, so predict gives (0,) and evaluate (0, 0)."""
    model = main.build_model(model_section(*convs, *classifier_head(16, 7)), (8, 8, 1), 7, np.random.default_rng(0))
    empty = np.zeros((0, 8, 8, 1), dtype=np.float32)
    assert model.predict_proba(empty).shape == (0, 7)
    assert model.predict(empty).shape == (0,)
    assert model.evaluate(empty, np.zeros(0, dtype=int)) == (0.0, 0.0)


def test_a_test_set_larger_than_one_batch_is_evaluated_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--n-test 1500 (far more than the evaluation batch, main.EVAL_BATCH_SIZE = 32) works from the command line:
    the network gets the test images in batches of 32 (the last one 1500 - 46 * 32 = 28), never more, every
    image once per evaluation, and the reported test accuracy is that of the logits those batches gave."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    write_config(tmp_path, small_config(epochs=1))
    evaluation_logits: list[np.ndarray] = []
    real_forward = main.Sequential.forward

    def counting_forward(self: main.Sequential, x: np.ndarray, training: bool = True) -> np.ndarray:
        logits = real_forward(self, x, training)
        if not training:
            evaluation_logits.append(logits)
        return logits

    monkeypatch.setattr(main.Sequential, "forward", counting_forward)
    # One worker: the batches then come one after the other, in the order of the test set.
    results = run_in_process("results.json", "--n-train", "200", "--n-test", "1500", "--workers", "1")
    assert results["data"]["n_test"] == 1500
    batch_sizes = [len(logits) for logits in evaluation_logits]
    size = main.EVAL_BATCH_SIZE
    assert size < 1500
    one_pass = [size] * (1500 // size) + ([1500 % size] if 1500 % size else [])
    assert len(batch_sizes) >= len(one_pass)
    assert batch_sizes == one_pass * (len(batch_sizes) // len(one_pass)), batch_sizes
    last_pass = np.concatenate(evaluation_logits[-len(one_pass):])
    y_test = main.load_data(results["config"]["data"]).y_test
    assert results["test_accuracy"] == np.mean(last_pass.argmax(axis=1) == y_test)
