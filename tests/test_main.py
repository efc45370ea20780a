"""End-to-end behaviour of the trainer: data loading, config, learning on real digits, the CLI and its results."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import ROOT, classifier_head, model_section, run_cli, untrained_model_scores, write_config, write_idx

import config_schema
import datafiles
import errors
import main

# ---- data --------------------------------------------------------------------------------------


def test_read_idx_round_trip_plain_and_gzipped(tmp_path: Path) -> None:
    """read_idx returns exactly what was written, header dims and bytes, with or without gzip."""
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    for name in ("images-idx3-ubyte", "images-idx3-ubyte.gz"):
        write_idx(tmp_path / name, images)
        assert np.array_equal(datafiles.read_idx(tmp_path / name), images)


def test_real_mnist_sample_loads_with_held_out_test_set(mnist_5k: Path) -> None:
    """The 5k sample has no t10k files: the test set is held out of the training files, disjoint, seeded."""
    cfg = dict(config_schema.DEFAULT_CONFIG["data"], path=str(mnist_5k), n_train=4000, n_test=1000)
    data = main.load_data(cfg)
    assert data.source == "idx" and "held out" in data.note
    assert data.x_train.shape == (4000, 28, 28, 1) and data.x_test.shape == (1000, 28, 28, 1)
    assert data.x_train.dtype == np.float32 and data.x_train.min() >= 0 and data.x_train.max() <= 1
    # Disjoint: no test image is also a training image.
    train_rows = {row.tobytes() for row in data.x_train.reshape(4000, -1)}
    assert not any(row.tobytes() in train_rows for row in data.x_test.reshape(1000, -1))
    assert set(np.unique(data.y_test)) == set(range(10))
    again = main.load_data(cfg)
    assert np.array_equal(again.y_train, data.y_train), "same seed, same draw"


def test_idx_folder_with_test_files_draws_from_each_split(tmp_path: Path) -> None:
    """With t10k files present, training images come from train files and test images from t10k files."""
    rng = np.random.default_rng(1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.full((30, 28, 28), 10))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 30))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.full((20, 28, 28), 200))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 20))
    data = main.load_data(dict(config_schema.DEFAULT_CONFIG["data"], path=str(tmp_path), n_train=25, n_test=15))
    assert np.allclose(data.x_train, 10 / 255) and np.allclose(data.x_test, 200 / 255)
    with pytest.raises(errors.DataError, match="only 20 images"):
        main.load_data(dict(config_schema.DEFAULT_CONFIG["data"], path=str(tmp_path), n_train=25, n_test=21))


def test_cached_download_is_used_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache .npz in data.cache_dir is loaded (source 'cache') and the downloader is never called."""
    def no_download(*args: object) -> None:
        raise AssertionError("must not download when a cache exists")

    monkeypatch.setattr(main, "download_openml", no_download)
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "mnist.npz", x_train=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
             y_train=rng.integers(0, 10, 50).astype(np.uint8),
             x_test=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 20).astype(np.uint8))
    data = main.load_data(dict(config_schema.DEFAULT_CONFIG["data"], cache_dir=str(tmp_path), n_train=40, n_test=20))
    assert data.source == "cache" and len(data.x_train) == 40


@pytest.mark.parametrize("damage", ["images 27x28", "float images", "a label of 12", "one label short"])
def test_a_cache_with_wrong_arrays_is_ignored_and_downloaded_again(damage: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache .npz that reads but holds the wrong arrays is ignored with a warning, like an unreadable one,
    and the data is downloaded again (here: a fake download)."""
    rng = np.random.default_rng(4)
    arrays = {"x_train": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8), "y_train": rng.integers(0, 10, 30),
              "x_test": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), "y_test": rng.integers(0, 10, 10)}
    if damage == "images 27x28":
        arrays["x_train"] = arrays["x_train"][:, 1:]
    elif damage == "float images":
        arrays["x_test"] = arrays["x_test"] / 255
    elif damage == "a label of 12":
        arrays["y_train"][3] = 12
    else:
        arrays["y_test"] = arrays["y_test"][1:]
    np.savez(tmp_path / "mnist.npz", **arrays)
    downloads = []
    fake = ((np.zeros((30, 28, 28), dtype=np.uint8), np.zeros(30, dtype=np.uint8)),
            (np.zeros((10, 28, 28), dtype=np.uint8), np.zeros(10, dtype=np.uint8)))
    monkeypatch.setattr(main, "download_openml", lambda name, cache_dir: downloads.append(name) or fake)
    data = main.load_data(dict(config_schema.DEFAULT_CONFIG["data"], cache_dir=str(tmp_path), n_train=20, n_test=10))
    assert data.source == "openml" and downloads == ["mnist"]


def test_download_is_cached_for_the_next_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a (simulated) successful download the arrays are cached, so the second load reads the cache."""
    rng = np.random.default_rng(3)
    fake = ((rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), rng.integers(0, 10, 60).astype(np.uint8)),
            (rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), rng.integers(0, 10, 10).astype(np.uint8)))
    calls = []
    monkeypatch.setattr(main, "download_openml", lambda name, cache_dir: calls.append(name) or fake)
    cfg = dict(config_schema.DEFAULT_CONFIG["data"], cache_dir=str(tmp_path), n_train=50, n_test=10)
    assert main.load_data(cfg).source == "openml"
    assert main.load_data(cfg).source == "cache"
    assert calls == ["mnist"] and (tmp_path / "mnist.npz").is_file()


def test_offline_falls_back_to_labelled_synthetic_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No path, no cache, download fails: synthetic data, labelled as such with the reason; or an error
    when the fallback is switched off."""
    def offline(name: str, cache_dir: Path) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(main, "download_openml", offline)
    cfg = dict(config_schema.DEFAULT_CONFIG["data"], cache_dir=str(tmp_path), n_train=100, n_test=50)
    data = main.load_data(cfg)
    assert data.source == "synthetic" and "URLError" in data.note and data.note.startswith("FALLBACK")
    with pytest.raises(errors.DataError, match="fallback is off"):
        main.load_data(dict(cfg, allow_synthetic_fallback=False))


class FakeOpenML:
    """Stands in for sklearn.datasets.fetch_openml: records its calls, returns 70 MNIST-shaped rows."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, name: str, **kwargs: object) -> SimpleNamespace:
        self.calls.append(name)
        rng = np.random.default_rng(0)
        return SimpleNamespace(data=rng.integers(0, 256, (70, 784)), target=rng.integers(0, 10, 70).astype(str))


def test_download_without_name_resolution_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (the OpenML host does not resolve, no proxy): a ConnectionError naming the host, without
    asking scikit-learn, whose retries would take seconds."""
    import sklearn.datasets

    def no_dns(host: str, *args: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    fake = FakeOpenML()
    monkeypatch.setattr(sklearn.datasets, "fetch_openml", fake)
    monkeypatch.setattr(datafiles.socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {})
    with pytest.raises(ConnectionError, match=r"cannot look up www\.openml\.org.*not known"):
        datafiles.download_openml("mnist", tmp_path)
    assert fake.calls == []
    # With a proxy, or with scikit-learn's own cached files, the name need not resolve here: it downloads.
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {"https": "http://proxy:3128"})
    (train_images, train_labels), _ = datafiles.download_openml("mnist", tmp_path)
    assert fake.calls == ["mnist_784"] and train_images.shape == (70, 28, 28) and train_labels.dtype == np.uint8
    monkeypatch.setattr(urllib.request, "getproxies", lambda: {})
    (tmp_path / "openml").mkdir()
    datafiles.download_openml("mnist", tmp_path)
    assert fake.calls == ["mnist_784"] * 2


def test_synthetic_digits_have_class_structure() -> None:
    """Seven-segment digits: every class present, images differ within a class, and a '1' has less ink
    than an '8' (it lights 2 segments of 7)."""
    images, labels = datafiles.make_synthetic(2000, np.random.default_rng(0))
    assert images.shape == (2000, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))
    ink = images.reshape(2000, -1).mean(axis=1)
    assert ink[labels == 1].mean() < 0.5 * ink[labels == 8].mean()
    ones = images[labels == 1]
    assert not np.array_equal(ones[0], ones[1])


# ---- configuration -----------------------------------------------------------------------------


def test_repo_config_is_the_default_config() -> None:
    """config.yaml keeps the seed's values, and a missing key takes the same default."""
    assert main.load_config(ROOT / "config.yaml") == config_schema.validate_config({})


def test_missing_keys_take_defaults_and_numbers_in_strings_are_read(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1e-3\nmodel:\n  layers:\n    - conv2d: {filters: 8}\n    - relu\n"
                    "    - maxpool2d:\n    - flatten\n    - dense: {units: 10}\n")
    cfg = main.load_config(path)
    assert cfg["training"]["learning_rate"] == 0.001  # PyYAML reads 1e-3 as the string "1e-3"
    assert cfg["model"]["layers"] == [{"conv2d": {"filters": 8, "kernel_size": 3, "stride": 1, "padding": 0}}, "relu",
                                      {"maxpool2d": {"pool_size": 2, "stride": None}}, "flatten",
                                      {"dense": {"units": 10}}]
    assert cfg["data"] == config_schema.DEFAULT_CONFIG["data"]


@pytest.mark.parametrize(("text", "expected"), [
    ("training:\n  epochs: ten\n", "training.epochs: got 'ten', expected an integer >= 0"),
    ("trainig: {}\n", "did you mean 'training'"),
    ("model:\n  layers:\n    - conv2d: {filters: 8, kernel: 3}\n",
     "model.layers[0].conv2d.kernel: unknown argument (did you mean 'kernel_size'?)"),
    ("model:\n  layers:\n    - relu\n    - dens: {units: 10}\n", "model.layers[1]: unknown layer 'dens' (did you mean "
                                                                   "'dense'?)"),
    ("model:\n  layers:\n    - conv2d: {kernel_size: 3}\n", "model.layers[0].conv2d: filters is required"),
    ("data:\n  n_train: [1\n", "line 2"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(errors.ConfigError) as error:
        main.load_config(path)
    assert expected in str(error.value) and str(path) in str(error.value)


OLD_KEYS_ERROR = "model: conv_layers and dense_units were replaced by model.layers; the same network is layers: "


def layers_shown_for_old_keys(path: Path, old_model_yaml: str) -> str:
    """The layer list that the one-line error for a config with the old model keys shows, after checking that
    the error is one line naming the file."""
    path.write_text(old_model_yaml)
    with pytest.raises(errors.ConfigError) as error:
        main.load_config(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and OLD_KEYS_ERROR in message, message
    return message.split(OLD_KEYS_ERROR, 1)[1]


def test_old_model_keys_are_one_line_showing_the_same_network_as_a_layer_list(tmp_path: Path) -> None:
    """model.conv_layers + model.dense_units are refused with one line that spells out the same network as a
    layer list, and that list, pasted into the config as it is shown, is the network the old keys described."""
    path = tmp_path / "c.yaml"
    shown = layers_shown_for_old_keys(path, "model:\n  conv_layers:\n"
                                            "    - {filters: 8, kernel_size: 5, stride: 2, pool_size: 3, "
                                            "pool_stride: 1}\n    - {filters: 4, padding: 1, pool_size: 0}\n"
                                            "    - {pool_size: null}\n  dense_units: 24\n")
    assert shown == ("[{conv2d: {filters: 8, kernel_size: 5, stride: 2, padding: 0}}, relu, "
                     "{maxpool2d: {pool_size: 3, stride: 1}}, {conv2d: {filters: 4, kernel_size: 3, stride: 1, "
                     "padding: 1}}, relu, {conv2d: {filters: 32, kernel_size: 3, stride: 1, padding: 0}}, relu, "
                     "flatten, {dense: {units: 24}}, relu, {dense: {units: 10}}]")
    path.write_text(f"model:\n  layers: {shown}\n")
    expected = model_section({"conv2d": {"filters": 8, "kernel_size": 5, "stride": 2}}, "relu",
                             {"maxpool2d": {"pool_size": 3, "stride": 1}}, {"conv2d": {"filters": 4, "padding": 1}},
                             "relu", {"conv2d": {"filters": 32}}, "relu", *classifier_head(24))
    assert main.load_config(path)["model"] == expected


def test_old_conv_layers_alone_show_the_default_dense_units(tmp_path: Path) -> None:
    """`model: {conv_layers: [...]}` without dense_units kept the default 128 dense units: so does the list shown."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  layers: {layers_shown_for_old_keys(path, 'model: {conv_layers: [{filters: 8}]}')}")
    assert main.load_config(path)["model"] == model_section({"conv2d": {"filters": 8}}, "relu", "maxpool2d",
                                                            *classifier_head(128))


def test_old_dense_units_alone_show_the_default_conv_layers(tmp_path: Path) -> None:
    """`model: {dense_units: 64}` meant the default conv layers (32 and 64 filters, padding 1, pooling 2) and a
    dense layer of 64: the list shown is that network, not a dense-only one."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  layers: {layers_shown_for_old_keys(path, 'model: {dense_units: 64}')}")
    assert main.load_config(path)["model"] == model_section(
        {"conv2d": {"filters": 32, "padding": 1}}, "relu", "maxpool2d", {"conv2d": {"filters": 64, "padding": 1}},
        "relu", "maxpool2d", *classifier_head(64))


def test_precedence_flag_over_environment_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--seed beats RANDOM_SEED (also read from .env) beats data.random_seed in the file."""
    config = write_config(tmp_path, data={"random_seed": 1})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    parser = main.build_parser()
    assert main.resolve_config(parser.parse_args(["--config", str(config)]))[0]["data"]["random_seed"] == 1
    monkeypatch.setenv("RANDOM_SEED", "2")
    assert main.resolve_config(parser.parse_args(["--config", str(config)]))[0]["data"]["random_seed"] == 2
    args = parser.parse_args(["--config", str(config), "--seed", "3", "--epochs", "4", "--learning-rate", "5e-4"])
    cfg = main.resolve_config(args)[0]
    assert (cfg["data"]["random_seed"], cfg["training"]["epochs"], cfg["training"]["learning_rate"]) == (3, 4, 5e-4)


# ---- learning ----------------------------------------------------------------------------------


def digits_config(**training: object) -> dict:
    cfg = config_schema.validate_config({
        "data": {"dataset": "digits", "n_train": 1297, "n_test": 500, "random_seed": 0},
        "model": {"layers": [{"conv2d": {"filters": 16, "padding": 1}}, "relu", "maxpool2d", *classifier_head(64)]},
        "training": {"epochs": 8, "batch_size": 32, **training},
    })
    return cfg


def test_each_epoch_visits_every_training_image_once_in_a_new_order() -> None:
    """train() shuffles: each epoch's order is a permutation of all the training images, a different one every
    epoch, and the batches hold exactly the images of that order, in turn."""
    cfg = config_schema.validate_config({"data": {"dataset": "synthetic", "n_train": 40, "n_test": 10},
                                         "model": {"layers": classifier_head(8)}})
    data = main.load_data(cfg["data"])
    model = main.build_model(cfg["model"], data.input_shape, data.num_classes, np.random.default_rng(0))
    orders: dict[int, np.ndarray] = {}
    seen: list[np.ndarray] = []
    real_forward = model.forward

    def recording_forward(x: np.ndarray, training: bool = True) -> np.ndarray:
        if training:
            seen.append(x.copy())
        return real_forward(x, training)

    model.forward = recording_forward
    main.train(model, main.SGD(0.01), data, epochs=3, batch_size=16, rng=np.random.default_rng(1),
               on_step=lambda position, _: orders.setdefault(position.epoch, position.order.copy()))
    assert sorted(orders) == [1, 2, 3]
    for order in orders.values():
        assert sorted(order.tolist()) == list(range(40))
    assert len({tuple(order.tolist()) for order in orders.values()}) == 3
    np.testing.assert_array_equal(np.concatenate(seen), data.x_train[np.concatenate([orders[e] for e in (1, 2, 3)])])


def fit(cfg: dict) -> tuple[main.Dataset, main.TrainResult]:
    rngs = main.make_rngs(cfg["data"]["random_seed"])
    data = main.load_data(cfg["data"])
    model = main.build_model(cfg["model"], data.input_shape, data.num_classes, rngs["init"])
    result = main.train(model, main.make_optimizer(cfg["training"]), data, epochs=cfg["training"]["epochs"],
                        batch_size=cfg["training"]["batch_size"], rng=rngs["shuffle"])
    return data, result


def test_learns_sklearn_digits_to_95_percent() -> None:
    """Real 8x8 digits, always offline: >= 95% test accuracy after a few seconds of training."""
    data, result = fit(digits_config())
    assert data.input_shape == (8, 8, 1)
    assert result.status == "completed" and len(result.history) == 8
    assert result.history[-1]["test_accuracy"] >= 0.95
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_sgd_with_momentum_also_learns_digits() -> None:
    _, result = fit(digits_config(optimizer="sgd", learning_rate=0.05, momentum=0.9))
    assert result.history[-1]["test_accuracy"] >= 0.93


def test_learns_real_mnist_to_95_percent_in_3_epochs(mnist_5k: Path) -> None:
    """The default model on 4,000 real MNIST digits reaches >= 95% on 1,000 held-back ones in 3 epochs."""
    cfg = config_schema.validate_config({"data": {"path": str(mnist_5k), "n_train": 4000, "n_test": 1000},
                                "training": {"epochs": 3}})
    _, result = fit(cfg)
    assert result.history[-1]["test_accuracy"] >= 0.95


def test_synthetic_digits_are_learnable() -> None:
    """Chance is 10%; a small model gets most of the synthetic digits right within 3 short epochs (not all:
    about 1 digit in 10 misses a segment, and some of those become another digit)."""
    cfg = config_schema.validate_config({"data": {"dataset": "synthetic", "n_train": 2000, "n_test": 500},
                                "model": {"layers": [{"conv2d": {"filters": 8, "padding": 1}}, "relu", "maxpool2d",
                                                     *classifier_head(32)]},
                                "training": {"epochs": 3}})
    _, result = fit(cfg)
    assert result.history[-1]["test_accuracy"] >= 0.85


# ---- command line ------------------------------------------------------------------------------


def test_cli_run_writes_complete_results(tmp_path: Path) -> None:
    """A real run of `python src/main.py --config ... --output ...`: exit 0, a results file with every
    promised field, consistent numbers, a log file, a summary table and epoch lines on the console."""
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 600, "n_test": 200},
                          model={"layers": [{"conv2d": {"filters": 8, "padding": 1}}, "relu", "maxpool2d",
                                            *classifier_head(32)]},
                          training={"epochs": 2})
    started = time.monotonic()
    proc = run_cli(["--config", str(config), "--output", "out/results.json"], cwd=tmp_path)
    process_seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "Total parameters" in proc.stdout and "epoch 2/2" in proc.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["config"]["training"]["epochs"] == 2 and results["config"]["data"]["dataset"] == "digits"
    assert results["data"] | {"note": ""} == {"dataset": "digits", "source": "sklearn", "n_train": 600, "n_test": 200,
                                              "input_shape": [8, 8, 1], "note": "", "class_names": main.DIGIT_NAMES}
    assert [row["epoch"] for row in results["history"]] == [1, 2]
    for row in results["history"]:
        assert set(row) >= {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"}
    assert results["test_accuracy"] == results["history"][-1]["test_accuracy"]
    assert results["model"]["parameters"] == sum(r["parameters"] for r in results["model"]["summary"])
    # train_seconds is the training's wall time: its epochs' seconds (which leave out each epoch's evaluation) and
    # more, but less than the whole process took. (Each figure is rounded to the millisecond.)
    epoch_seconds = sum(row["seconds"] for row in results["history"])
    assert epoch_seconds > 0
    assert epoch_seconds - 0.002 <= results["train_seconds"] < process_seconds
    assert results["versions"]["numpy"] == np.__version__
    assert "epoch 2/2" in (tmp_path / "logs" / "app.log").read_text()
    assert not list((tmp_path / "out").glob(".*tmp")), "no temporary file left behind"


def test_cli_offline_fallback_is_labelled_in_log_and_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(main, "download_openml", lambda name, cache_dir: (_ for _ in ()).throw(
        urllib.error.URLError("offline")))
    config = write_config(tmp_path, data={"n_train": 200, "n_test": 100, "cache_dir": str(tmp_path / "cache")},
                          training={"epochs": 1})
    assert main.main(["--config", str(config), "--output", "r.json"]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["data"]["source"] == "synthetic" and "URLError" in results["data"]["note"]
    captured = capsys.readouterr()
    assert "SYNTHETIC DATA" in captured.err and "SYNTHETIC DATA" not in captured.out  # a diagnostic: on stderr
    last = captured.out.strip().splitlines()[-1]  # "results written to r.json", then the result line
    assert last.startswith("test accuracy") and "on SYNTHETIC digits, not mnist" in last
    assert "SYNTHETIC DATA" in (tmp_path / "logs" / "app.log").read_text()
    assert main.main(["--config", str(config), "--no-fallback", "--output", "r2.json"]) == 2
    assert "fallback is off" in capsys.readouterr().err and not (tmp_path / "r2.json").exists()


def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  batch_size: 0\n")
    proc = run_cli(["--config", str(config), "--output", "r.json"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "training.batch_size: got 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.json").exists()


def test_cli_epochs_zero_only_evaluates(tmp_path: Path) -> None:
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 100, "n_test": 100},
                          training={"epochs": 0})
    proc = run_cli(["--config", str(config), "--output", "r.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["history"] == [] and results["epochs_completed"] == 0
    # Only evaluated: the scores are those of the untrained model the seed builds, recomputed here in float64.
    loss, accuracy, n_test = untrained_model_scores(results)
    assert results["test_loss"] == pytest.approx(loss, rel=1e-4)
    # (at most one image apart: float32 sums in batches of 32 may round a near-tie the other way)
    assert abs(results["test_accuracy"] - accuracy) <= 1 / n_test


def test_cli_help_lists_every_flag(tmp_path: Path) -> None:
    proc = run_cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for flag in ("--config", "--output", "--epochs", "--batch-size", "--learning-rate", "--n-train", "--n-test",
                 "--seed", "--dataset", "--data-path", "--no-fallback", "--log-level", "--profile", "--gradcheck",
                 "--workers", "--plot-dir", "--save-model", "--load-model", "--predict"):
        assert flag in proc.stdout


def test_cli_profile_prints_a_row_per_layer(tmp_path: Path) -> None:
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 200, "n_test": 50}, training={"epochs": 1})
    proc = run_cli(["--config", str(config), "--profile"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("conv2d_1", "maxpool2d_2", "dense_2", "optimizer step", "total"):
        assert name in proc.stdout


def test_default_run_from_a_checkout_without_data_uses_fallback_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """A fresh checkout (no config file: the built-in defaults, MNIST; no data folder, no cache) on a machine without
    internet: the run falls back to labelled synthetic digits and trains the default model on them. Fast: the
    OpenML host does not resolve, so scikit-learn's download (its import and three retries a second apart) is
    never tried, and the fallback starts within a moment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANDOM_SEED", "7")
    for variable in list(os.environ):  # a proxy would make the download worth trying
        if variable.lower().endswith("_proxy"):
            monkeypatch.delenv(variable)

    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    downloads: list[tuple] = []

    def fetch_openml(*args: object, **kwargs: object) -> None:
        downloads.append(args)  # offline, the real one takes seconds of retries to fail
        raise OSError("no network")

    import sklearn.datasets

    monkeypatch.setattr(datafiles.socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(sklearn.datasets, "fetch_openml", fetch_openml)
    fallback_after: list[float] = []
    real_make_synthetic = main.make_synthetic

    def timed_make_synthetic(*args: object, **kwargs: object) -> object:
        fallback_after.append(time.monotonic() - started)
        return real_make_synthetic(*args, **kwargs)

    monkeypatch.setattr(main, "make_synthetic", timed_make_synthetic)
    started = time.monotonic()
    assert main.main(["--n-train", "60", "--n-test", "20", "--epochs", "1", "--output", "r.json"]) == 0
    captured = capsys.readouterr()
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["config"]["data"]["dataset"] == "mnist" and results["config"]["data"]["random_seed"] == 7
    assert results["data"]["source"] == "synthetic" and results["data"]["note"].startswith("FALLBACK")
    assert "SYNTHETIC DATA" in captured.out + captured.err
    assert downloads == [], "the download was tried although the host does not resolve"
    assert fallback_after and fallback_after[0] < 3, f"the fallback began after {fallback_after[:1]} s"
    assert results["model"]["parameters"] == 421_642  # the default architecture
    assert results["epochs_completed"] == 1 and results["status"] == "completed"
    assert (tmp_path / "logs" / "app.log").is_file()
