"""Property-based tests (hypothesis): on randomly drawn shapes, kernel sizes, strides, paddings and pool
sizes, the vectorised Conv2D and MaxPool2D equal the slow loop reference, and every model.layers list that
config_schema.validate_config accepts either trains for one step or is refused with a ConfigError naming the
first layer that cannot take its input (a kernel or pool that empties the image, a dense layer on an image, a
conv or pooling layer on a vector) or the last layer when it does not give one score per class.
"""

from __future__ import annotations

import re

import numpy as np
import reference
from helpers import assert_conv2d_matches_reference, to_float64
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import config_schema
import errors
import main

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


conv2d_layers = st.fixed_dictionaries(
    {"filters": st.integers(1, 3)},
    optional={"kernel_size": st.integers(1, 7), "stride": st.integers(1, 3), "padding": st.integers(0, 2)},
).map(lambda arguments: {"conv2d": arguments})
pooling_layers = st.builds(
    lambda name, arguments: {name: arguments}, st.sampled_from(["maxpool2d", "avgpool2d"]),
    st.fixed_dictionaries({}, optional={"pool_size": st.integers(1, 5),
                                        "stride": st.one_of(st.none(), st.integers(1, 3))}),
)
elementwise_layers = st.one_of(  # any shape in, the same shape out
    st.sampled_from(["relu", "tanh", "batchnorm"]),
    st.sampled_from([0.0, 0.25, 0.5, 0.9]).map(lambda rate: {"dropout": {"rate": rate}}),
)
image_layers = st.one_of(conv2d_layers, pooling_layers, elementwise_layers)
vector_layers = st.one_of(st.integers(1, 16).map(lambda units: {"dense": {"units": units}}), elementwise_layers)


@st.composite
def layer_lists(draw: st.DrawFn) -> list:
    """A model.layers list as a user writes it (arguments left out take their defaults): layers for images, flatten,
    layers for vectors, and a dense layer of 10 units; or, in half the examples, with one of the mistakes a user
    makes: no flatten, a conv or pooling layer after the flatten, or a last layer of another size."""
    mistake = draw(st.one_of(st.none(), st.sampled_from(["no flatten", "image layer on a vector",
                                                          "wrong class count"])))
    event(f"mistake: {mistake}")
    image_part = draw(st.lists(image_layers, max_size=5))
    vector_part = draw(st.lists(vector_layers, max_size=3))
    if mistake == "image layer on a vector":
        vector_part.insert(draw(st.integers(0, len(vector_part))), draw(st.one_of(conv2d_layers, pooling_layers)))
    flatten = [] if mistake == "no flatten" else ["flatten"]
    units = draw(st.sampled_from([*range(1, 10), *range(11, 17)])) if mistake == "wrong class count" else 10
    return [*image_part, *flatten, *vector_part, {"dense": {"units": units}}]


raw_configs = st.fixed_dictionaries({
    "model": st.fixed_dictionaries({"layers": layer_lists()}),
    "data": st.fixed_dictionaries({"dataset": st.sampled_from(["digits", "mnist"])}),
    "training": st.fixed_dictionaries({"optimizer": st.sampled_from(["adam", "sgd"]),
                                       "learning_rate": st.sampled_from([1e-3, 0.05])}),
})


def first_layer_that_does_not_fit(layers: list, input_shape: tuple[int, int, int], num_classes: int = 10) -> int | None:
    """Index of the first item of a checked layer list that cannot take its input (a kernel larger than its padded
    image, a pool larger than its image, a dense layer on an image, a conv or pooling layer on a vector); when all
    fit, the last layer's index if it does not output num_classes values; None if the model can be built.
    Worked out here from the shape formulas, following the list, independently of build_model."""
    shape = tuple(input_shape)
    for index, spec in enumerate(layers):
        name, arguments = (spec, {}) if isinstance(spec, str) else next(iter(spec.items()))
        if name in ("conv2d", "maxpool2d", "avgpool2d"):
            if len(shape) != 3:
                return index
            height, width, channels = shape
            if name == "conv2d":
                kernel, stride, padding = arguments["kernel_size"], arguments["stride"], arguments["padding"]
                if kernel > height + 2 * padding or kernel > width + 2 * padding:
                    return index
                shape = ((height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1,
                         arguments["filters"])
            else:
                pool = arguments["pool_size"]
                if pool > height or pool > width:
                    return index
                stride = arguments["stride"] or pool
                shape = ((height - pool) // stride + 1, (width - pool) // stride + 1, channels)
        elif name == "dense":
            if len(shape) != 1:
                return index
            shape = (arguments["units"],)
        elif name == "flatten":
            shape = (int(np.prod(shape)),)
    return None if shape == (num_classes,) else len(layers) - 1


@settings(max_examples=100, deadline=None)  # each example takes milliseconds
@given(raw=raw_configs, seed=seeds)
def test_valid_config_trains_one_step_or_raises_config_error(raw: dict, seed: int) -> None:
    """Every config validate_config accepts either builds a model that runs one training step (forward,
    loss, backward, optimiser step) on a small batch of 8x8 or 28x28 images, with finite loss and finite
    float32 weights, or raises ConfigError naming the item of model.layers (index and type) that cannot take
    its input or, the last, does not give one score per class -- never another exception."""
    cfg = config_schema.validate_config(raw)
    input_shape = main.input_shape_of(cfg["data"]["dataset"])
    rng = np.random.default_rng(seed)
    layers = cfg["model"]["layers"]
    bad_layer = first_layer_that_does_not_fit(layers, input_shape)
    event("refused" if bad_layer is not None else "trained one step")
    if bad_layer is not None:
        name = layers[bad_layer] if isinstance(layers[bad_layer], str) else next(iter(layers[bad_layer]))
        try:
            main.build_model(cfg["model"], input_shape, 10, rng, rng)
        except errors.ConfigError as error:
            assert re.search(re.escape(f"model.layers[{bad_layer}]") + r"\W+" + name + r"\b", str(error)), str(error)
            return
        raise AssertionError(f"build_model accepted a config whose layer {bad_layer} ({name}) does not fit")

    model = main.build_model(cfg["model"], input_shape, 10, rng, rng)
    optimizer = main.make_optimizer(cfg["training"])
    x = rng.random((4, *input_shape)).astype(np.float32)
    labels = rng.integers(0, 10, 4).astype(np.uint8)
    loss_fn = main.SoftmaxCrossEntropy()

    logits = model.forward(x)
    assert logits.shape == (4, 10)
    assert logits.dtype == np.float32
    loss = loss_fn.forward(logits, labels)
    assert np.isfinite(loss)
    grad_x = model.backward(loss_fn.backward())
    assert grad_x is None or grad_x.shape == x.shape  # None: the first layer skips dLoss/dx
    before = [param.copy() for layer in model.layers for param in layer.params.values()]
    optimizer.step(model)
    after = [param for layer in model.layers for param in layer.params.values()]
    assert all(param.dtype == np.float32 and np.isfinite(param).all() for param in after)
    assert any(not np.array_equal(old, new) for old, new in zip(before, after)), "the step changed no weight"
    assert model.summary_rows()[-1]["output_shape"] == [10]
