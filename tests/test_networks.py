"""Network layer lists and recipes: the default list, the recipes in configs/, LeNet-5, and any valid layer list
trains a step or raises ConfigError."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    ROOT,
    checked_model,
    colour_folder,
    run_cli,
    write_config,
)
from hypothesis import event, given, settings
from hypothesis import strategies as st

import config_schema
import errors
import main
import modelfile
from errors import ConfigError

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


# ---- the layer list -------------------------------------------------------------------------------------------------


def test_the_default_layer_list_is_the_network_of_earlier_versions() -> None:
    """config.yaml's list builds conv32-relu-pool-conv64-relu-pool-flatten-dense128-relu-dense10, 421,642 weights."""
    cfg = main.load_config(ROOT / "config.yaml")
    model = main.build_model(cfg["model"], (28, 28, 1), 10, np.random.default_rng(0))
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "ReLU", "MaxPool2D", "Conv2D", "ReLU", "MaxPool2D", "Flatten", "Dense", "ReLU", "Dense"]
    assert model.parameter_count() == 421_642
    assert cfg["model"] == config_schema.validate_config({})["model"]


@pytest.mark.parametrize(("layers", "message"), [
    ([{"conv2d": {"filters": 4}}, {"dense": {"units": 10}}],
     "model.layers[1] (dense): gets a 26x26x4 image; put flatten before it"),
    (["flatten", {"dense": {"units": 10}}, {"conv2d": {"filters": 2}}],
     "model.layers[2] (conv2d): needs an image (H, W, C) as its input, but gets a vector of 10"),
    (["flatten", {"dense": {"units": 7}}], "the last layer (model.layers[1], dense) outputs shape (7,), but the "
                                            "data has 10 classes"),
    ([{"maxpool2d": {"pool_size": 30}}, "flatten", {"dense": {"units": 10}}],
     "model.layers[0] (maxpool2d): pool_size 30 is larger than the 28x28 image"),
    ([{"conv2d": {"filters": 2, "kernel_size": 29}}, "flatten", {"dense": {"units": 10}}],
     "model.layers[0] (conv2d): kernel_size 29 is larger than its padded input 28x28"),
])
def test_an_impossible_network_is_one_line_naming_the_layer(layers: list, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        main.build_model(checked_model({"layers": layers}), (28, 28, 1), 10, np.random.default_rng(0))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("model", "message"), [
    ({"layers": ["flatten", {"dense": {"units": 10}}, "softmax"]},
     "model.layers[2]: softmax: leave it out: the loss (softmax cross-entropy) applies the softmax itself"),
    ({"layers": ["rleu"]}, "model.layers[0]: unknown layer 'rleu' (did you mean 'relu'?)"),
    ({"layers": [{"conv2d": {"filter": 8}}]}, "model.layers[0].conv2d.filter: unknown argument (did you mean "
                                               "'filters'?)"),
    ({"layers": [{"dense": {}}]}, "model.layers[0].dense: units is required"),
    ({"layers": [{"dropout": {"rate": 1}}]}, "model.layers[0].dropout.rate: got 1, expected a number >= 0 and < 1"),
    ({"layers": ["relu", {"relu": {"x": 1}}]}, "model.layers[1]: relu takes no arguments"),
    ({"layers": []}, "model.layers: got [], expected a non-empty list of layers"),
    ({"conv_layers": [{"filters": 8, "padding": 1}], "dense_units": 32},
     "model: conv_layers and dense_units were replaced by model.layers; the same network is layers: "
     "[{conv2d: {filters: 8, kernel_size: 3, stride: 1, padding: 1}}, relu, {maxpool2d: {pool_size: 2}}, flatten, "
     "{dense: {units: 32}}, relu, {dense: {units: 10}}]"),
])
def test_a_wrong_layer_list_is_one_line(model: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_schema.validate_config({"model": model})
    assert message in str(error.value)


def test_the_old_keys_message_gives_a_list_that_builds_the_same_network() -> None:
    """The layer list the error shows, pasted into a config, gives the network the old keys described."""
    import yaml

    old = {"conv_layers": [{"filters": 8, "padding": 1}, {"filters": 4, "pool_size": 0}], "dense_units": 32}
    with pytest.raises(ConfigError) as error:
        config_schema.validate_config({"model": old})
    pasted = yaml.safe_load(str(error.value).split("layers: ", 1)[1])
    model = main.build_model(checked_model({"layers": pasted}), (28, 28, 1), 10, np.random.default_rng(0))
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "ReLU", "MaxPool2D", "Conv2D", "ReLU", "Flatten", "Dense", "ReLU", "Dense"]
    assert model.layers[3].params["W"].shape == (3, 3, 8, 4) and model.layers[6].params["W"].shape == (12 * 12 * 4, 32)


# ---- the recipes ----------------------------------------------------------------------------------------------------


def test_every_recipe_is_in_configs() -> None:
    assert {path.stem for path in RECIPES} >= {"lenet5", "keras_mnist", "mnist_best", "fashion"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_each_recipe_validates_builds_and_trains_a_few_batches(recipe: Path, tmp_path: Path) -> None:
    """The recipe as a user runs it, on synthetic digits (no download here): 96 images, one epoch, exit 0,
    and the results file holds the recipe's layers and a learning rate per epoch."""
    proc = run_cli(["--config", str(recipe), "--dataset", "synthetic", "--n-train", "96", "--n-test", "32",
                    "--epochs", "1", "--output", "r.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["config"]["model"] == main.load_config(recipe)["model"]
    assert results["history"][0]["learning_rate"] > 0
    assert len(results["model"]["summary"]) == len(main.load_config(recipe)["model"]["layers"])


def test_lenet5_is_lecuns_network() -> None:
    """6 and 16 filters of 5x5, average pooling, tanh, 120-84-10: LeCun's 61,706 weights on 28x28 padded by 2."""
    cfg = main.load_config(ROOT / "configs" / "lenet5.yaml")
    model = main.build_model(cfg["model"], (28, 28, 1), 10, np.random.default_rng(0))
    shapes = [row["output_shape"] for row in model.summary_rows()]
    assert shapes[:6] == [[28, 28, 6], [28, 28, 6], [14, 14, 6], [10, 10, 16], [10, 10, 16], [5, 5, 16]]
    assert model.parameter_count() == 61_706


seeds = st.integers(0, 2**32 - 1)


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


# ---- a recipe for folders of colour pictures ------------------------------------------------------------------------


def test_the_folder_rgb_recipe_trains_on_a_folder_and_serves_its_pictures(tmp_path: Path) -> None:
    colour_folder(tmp_path / "pictures", 60)
    write_config(tmp_path)
    run = run_cli(["--config", str(ROOT / "configs" / "folder_rgb.yaml"), "--data-path", str(tmp_path / "pictures"),
                   "--epochs", "1", "--save-model", str(tmp_path / "m.npz"), "--output", str(tmp_path / "r.json")],
                  tmp_path)
    assert run.returncode == 0, run.stderr
    assert "left-right flips" in run.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["data"]["input_shape"] == [32, 32, 3] and results["data"]["n_test"] == 12  # a fifth, stratified
    meta = modelfile.load_model(tmp_path / "m.npz", main.build_model).meta
    assert meta["preprocess"]["size"] == [32, 32] and meta["examples"]["images"].shape == (12, 32, 32, 3)
