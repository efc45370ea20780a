"""The networks the config can describe: the layer list, the recipes in configs/, learning-rate schedules, weight
decay, augmentation, a validation split, model files with BatchNorm's statistics, and worker threads with
Dropout and BatchNorm."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run_cli, to_float64, write_config

import config_schema
import main
import modelfile
import parallel
from errors import ConfigError

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
BN_DROPOUT_NET = {"layers": [
    {"conv2d": {"filters": 4, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu", {"avgpool2d": {"pool_size": 2}},
    {"conv2d": {"filters": 6, "kernel_size": 3}}, "tanh", {"maxpool2d": {"pool_size": 2}}, "flatten",
    {"dropout": {"rate": 0.3}}, {"dense": {"units": 12}}, "batchnorm", "relu", {"dense": {"units": 10}}]}


def checked_model(model: dict) -> dict:
    return config_schema.check_model(model)


def digits(n_train: int, n_test: int, n_val: int = 0) -> main.Dataset:
    cfg = config_schema.validate_config({"data": {"dataset": "digits", "n_train": n_train, "n_test": n_test,
                                                  "n_val": n_val}})
    return main.load_data(cfg["data"])


# ---- the layer list -----------------------------------------------------------------------------


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


# ---- the recipes ----------------------------------------------------------------------------------


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


# ---- learning-rate schedules and weight decay ------------------------------------------------------


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


# ---- augmentation --------------------------------------------------------------------------------


def test_shifts_move_each_image_by_whole_pixels_filling_with_background() -> None:
    """Without rotation, each image is its own np.roll with the uncovered border set to 0."""
    rng = np.random.default_rng(3)
    images = rng.random((50, 9, 7, 1)).astype(np.float32)
    shifted = main.shift_and_rotate(images, np.random.default_rng(4), max_shift=2, max_degrees=0)
    draws = np.random.default_rng(4)
    draws.uniform(0, 0, (50, 1, 1))  # the angles come first
    shift_r, shift_c = draws.integers(-2, 3, (2, 50, 1, 1))[:, :, 0, 0]
    seen = set()
    for image, moved, dr, dc in zip(images, shifted, shift_r, shift_c):
        expected = np.zeros_like(image)
        src = image[max(-dr, 0):9 - max(dr, 0), max(-dc, 0):7 - max(dc, 0)]
        expected[max(dr, 0):max(dr, 0) + src.shape[0], max(dc, 0):max(dc, 0) + src.shape[1]] = src
        np.testing.assert_allclose(moved, expected, atol=1e-6)
        seen.add((int(dr), int(dc)))
    assert len(seen) >= 15 and shifted.dtype == np.float32


def test_rotation_turns_a_bar_about_the_centre() -> None:
    """A horizontal bar through the centre, turned by up to 90 degrees, keeps its centre and (roughly) its ink;
    at angles near 90 it becomes vertical."""
    image = np.zeros((1, 21, 21, 1), np.float32)
    image[0, 10, 3:18] = 1
    turned = main.shift_and_rotate(np.repeat(image, 200, axis=0), np.random.default_rng(0), 0, 89.9)
    assert turned[:, 10, 10, 0] == pytest.approx(1, abs=1e-4)
    assert np.abs(turned.sum(axis=(1, 2, 3)) - 15).max() < 2.0  # bilinear blur
    upright = turned[np.argmax(turned[:, 3, 10, 0] + turned[:, 17, 10, 0])]
    assert upright[3:18, 10, 0].min() > 0.5 and upright[10, 3, 0] < 0.1


def test_augmentation_is_seeded_and_learns_digits(tmp_path: Path) -> None:
    """A run with shifts and rotations is repeatable with the seed, and still learns the 8x8 digits."""
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 1000, "n_test": 300,
                                          "augment": {"shift": 1, "rotate": 10}},
                          model={"layers": [{"conv2d": {"filters": 8, "padding": 1}}, "relu", "flatten",
                                            {"dense": {"units": 10}}]},
                          training={"epochs": 4, "learning_rate": 0.003})
    accuracies = []
    for name in ("a.json", "b.json"):
        proc = run_cli(["--config", str(config), "--output", name], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "shifts of up to 1 px and rotations of up to 10 degrees" in proc.stdout
        accuracies.append(json.loads((tmp_path / name).read_text())["test_accuracy"])
    assert accuracies[0] == accuracies[1] >= 0.8


# ---- a validation split ---------------------------------------------------------------------------


def test_a_validation_split_is_held_out_of_training_and_scored_each_epoch(tmp_path: Path) -> None:
    data = digits(500, 200, n_val=100)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (500, 100, 200)
    train_rows = {row.tobytes() for row in data.x_train}
    assert not any(row.tobytes() in train_rows for row in data.x_val)
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 500, "n_test": 200, "n_val": 100},
                          model={"layers": ["flatten", {"dense": {"units": 10}}]}, training={"epochs": 2})
    proc = run_cli(["--config", str(config), "--output", "r.json", "--plot-dir", "plots"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert all("val_accuracy" in row and "test_accuracy" not in row for row in results["history"])
    assert results["test_accuracy"] is not None and "100 validation" in proc.stdout
    assert (tmp_path / "plots" / "curves.png").is_file()


# ---- model files with BatchNorm and Dropout ---------------------------------------------------------


def test_a_batchnorm_model_file_keeps_its_running_statistics(tmp_path: Path) -> None:
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 300, "n_test": 100},
                          model=BN_DROPOUT_NET, training={"epochs": 1})
    proc = run_cli(["--config", str(config), "--save-model", "m.npz", "--output", "r.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    loaded = modelfile.load_model(tmp_path / "m.npz", main.build_model)
    norms = [layer for layer in loaded.model.layers if isinstance(layer, main.BatchNorm)]
    assert len(norms) == 2 and not np.allclose(norms[0].buffers["running_mean"], 0)
    proc = run_cli(["--config", str(config), "--load-model", "m.npz", "--epochs", "0", "--output", "e.json"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    trained = json.loads((tmp_path / "r.json").read_text())["test_accuracy"]
    assert json.loads((tmp_path / "e.json").read_text())["test_accuracy"] == trained  # the same statistics


def test_a_model_file_of_the_old_format_still_loads(tmp_path: Path) -> None:
    """A model saved before the layer list (meta.model with conv_layers and dense_units) is converted."""
    cfg = config_schema.validate_config({"model": {"layers": config_schema.layers_from_old_keys(
        {"conv_layers": [{"filters": 4, "padding": 1, "pool_size": 2}], "dense_units": 8})}})
    data = digits(100, 50)
    model = main.build_model(cfg["model"], data.input_shape, 10, np.random.default_rng(0))
    old_architecture = {"conv_layers": [{"filters": 4, "kernel_size": 3, "stride": 1, "padding": 1, "pool_size": 2,
                                         "pool_stride": None}], "dense_units": 8}
    modelfile.save_model(tmp_path / "old.npz", model, old_architecture, data, {"epochs_completed": 1})
    loaded = modelfile.load_model(tmp_path / "old.npz", main.build_model)
    assert loaded.meta["model"]["layers"][0] == {"conv2d": {"filters": 4, "kernel_size": 3, "stride": 1,
                                                            "padding": 1}}
    x = data.x_test[:5]
    np.testing.assert_array_equal(loaded.model.forward(x, training=False), model.forward(x, training=False))


# ---- worker threads with Dropout and BatchNorm ------------------------------------------------------


def test_dropout_and_batchnorm_on_worker_threads_compute_the_whole_batch() -> None:
    """float64: a network with Dropout and BatchNorm (after a conv and after a dense layer) on 1, 2 and 3 workers
    gives the same logits, weight gradients and running statistics: the masks are drawn for the whole batch in
    the calling thread, and BatchNorm combines the slices' sums into the whole batch's statistics."""
    layers = {"layers": [{"conv2d": {"filters": 3, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu",
                         {"dropout": {"rate": 0.4}}, "flatten", {"dropout": {"rate": 0.2}}, {"dense": {"units": 6}},
                         "batchnorm", "relu", {"dense": {"units": 10}}]}
    results = []
    for workers in (1, 2, 3):
        model = main.build_model(checked_model(layers), (8, 8, 1), 10, np.random.default_rng(0),
                                 np.random.default_rng(9))
        for layer in model.layers:
            to_float64(layer)
        loss_fn = main.SoftmaxCrossEntropy()
        x_rng = np.random.default_rng(5)
        with parallel.DataParallel(model, workers) if workers > 1 else parallel.one_blas_thread(model) as net:
            for batch in (7, 2):  # a batch of 2 on 3 workers: one slice fewer than workers
                x, labels = x_rng.random((batch, 8, 8, 1)), x_rng.integers(0, 10, batch)
                logits = net.forward(x)
                loss_fn.forward(logits, labels)
                net.backward(loss_fn.backward())
        buffers = [buffer.copy() for layer in model.layers for buffer in layer.buffers.values()]
        results.append((logits, [grad.copy() for _, _, grad in main.parameters(model)], buffers))
    assert len(results[0][2]) == 4
    for logits, grads, buffers in results[1:]:
        np.testing.assert_allclose(logits, results[0][0], rtol=1e-10)
        for grad, expected in zip(grads, results[0][1]):
            np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-13)
        for buffer, expected in zip(buffers, results[0][2]):
            np.testing.assert_allclose(buffer, expected, rtol=1e-12)


def test_batchnorm_models_train_on_the_default_workers_and_a_failing_worker_does_not_hang() -> None:
    """BatchNorm does not keep a model on one worker; and when one worker fails while the others wait for its
    share of the statistics, the error reaches the caller instead of leaving them waiting."""
    from threadpoolctl import threadpool_limits

    model = main.build_model(checked_model(BN_DROPOUT_NET), (28, 28, 1), 10, np.random.default_rng(0))
    with threadpool_limits(2):
        assert parallel.default_workers(model, 256) == 2
    x = np.random.default_rng(1).random((8, 28, 28, 1)).astype(np.float32)
    with parallel.DataParallel(model, 2) as net:
        def fail(rows: np.ndarray) -> np.ndarray:
            raise MemoryError("worker 2 ran out")

        net.replicas[1].layers[1].batch_mean = fail
        started = time.monotonic()
        with pytest.raises(MemoryError, match="worker 2"):
            net.forward(x)
        assert time.monotonic() - started < 10


def test_gradcheck_covers_batchnorm_dropout_avgpool_and_tanh(tmp_path: Path) -> None:
    config = write_config(tmp_path, data={"dataset": "digits"}, model=BN_DROPOUT_NET)
    proc = run_cli(["--gradcheck", "--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.endswith((" ok", " FAIL"))]
    checked = {row[0] for row in rows}
    assert {"batchnorm_1", "batchnorm_2", "dropout_1", "avgpool2d_1", "tanh_1"} <= checked
    assert {(row[0], row[1]) for row in rows} >= {("batchnorm_1", "gamma"), ("batchnorm_2", "beta")}
    assert all(row[-1] == "ok" and math.isfinite(float(row[-2])) for row in rows)
