"""The training loop end to end: learning digits and MNIST, each epoch's order, the command line's results file,
validation splits, divergence, seeds, colour models trained from folders, and runs that only evaluate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    CLASS_FOLDER_NAMES,
    SMALL_FOLDER_MODEL,
    classifier_head,
    cli,
    colour_digits,
    colour_folder,
    digits,
    environment_without_seed,
    run_cli,
    run_in_process,
    sample_digits,
    small_config,
    untrained_model_scores,
    write_class_folders,
    write_config,
)
from PIL import Image

import config_schema
import datafiles
import main
import modelfile

# ---- learning -------------------------------------------------------------------------------------------------------


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


# ---- command line ---------------------------------------------------------------------------------------------------


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


# ---- a validation split ---------------------------------------------------------------------------------------------


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


TIMING_KEYS = {"seconds", "images_per_second"}  # the only history fields allowed to differ between runs


# ---- divergence -----------------------------------------------------------------------------------------------------


def test_divergence_stops_at_once_with_exit_3(tmp_path: Path) -> None:
    """SGD with learning rate 1e20 makes the loss NaN within the first batches: the run stops in epoch 1
    (of 20), exits 3, suggests a lower learning rate, records status 'diverged' and where, saves no model
    with broken weights, and no NumPy RuntimeWarning leaks to the console."""
    config = write_config(tmp_path, small_config("synthetic", 320, 50, learning_rate=1e20, epochs=20))
    process = subprocess.run(cli("--config", str(config), "--output", "results.json", "--save-model", "model.npz"),
                             cwd=tmp_path, env=environment_without_seed(), capture_output=True, text=True,
                             timeout=120)
    console = process.stdout + process.stderr
    assert process.returncode == main.EXIT_DIVERGED == 3, console
    assert "lower learning rate" in console
    for noise in ("RuntimeWarning", "overflow encountered", "invalid value encountered", "Traceback"):
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "diverged"
    assert results["stopped_at"]["epoch"] == 1
    assert 1 <= results["stopped_at"]["batch"] <= 320 // 32
    assert results["history"] == [] and results["epochs_completed"] == 0
    assert not (tmp_path / "model.npz").exists()


def test_train_reports_divergence_at_the_first_non_finite_loss() -> None:
    """train() itself: with a NaN weight the very first batch has a non-finite loss, and training stops
    there (epoch 1, batch 1) instead of running the remaining epochs."""
    rngs = main.make_rngs(0)
    data = main.Dataset(rngs["data"].random((64, 8, 8, 1), dtype=np.float32), rngs["data"].integers(0, 10, 64),
                        rngs["data"].random((16, 8, 8, 1), dtype=np.float32), rngs["data"].integers(0, 10, 16),
                        main.DIGIT_NAMES, "random", "test")
    model = main.build_model(config_schema.validate_config(small_config())["model"], data.input_shape, 10, rngs["init"])
    model.layers[-1].params["b"][0] = np.nan
    with np.errstate(all="ignore"):
        result = main.train(model, main.SGD(0.05), data, epochs=5, batch_size=32, rng=rngs["shuffle"])
    assert result.status == "diverged"
    assert result.stopped_at["epoch"] == 1 and result.stopped_at["batch"] == 1
    assert result.history == []


# ---- reproducibility ------------------------------------------------------------------------------------------------


def without_timing(results: dict) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in results["history"]]


def test_same_seed_same_run_and_seed_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same config and seed: identical histories (all but timing), in this process and in a fresh one.
    A different seed gives a different run, and the seed is taken from --seed, else RANDOM_SEED in the
    environment, else data.random_seed in the config file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    write_config(tmp_path, small_config())  # data.random_seed: 7
    fresh_process = subprocess.Popen(cli("--config", "config.yaml", "--output", "fresh.json"), cwd=tmp_path,
                                     env=environment_without_seed(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)

    first, second = run_in_process("first.json"), run_in_process("second.json")
    assert first["config"]["data"]["random_seed"] == 7
    assert len(first["history"]) == 2
    assert without_timing(first) == without_timing(second)
    assert (first["test_loss"], first["test_accuracy"]) == (second["test_loss"], second["test_accuracy"])

    by_flag = run_in_process("flag.json", "--seed", "8")
    assert by_flag["config"]["data"]["random_seed"] == 8
    assert without_timing(by_flag) != without_timing(first)

    monkeypatch.setenv("RANDOM_SEED", "8")
    by_environment = run_in_process("environment.json")  # RANDOM_SEED beats the config file
    assert by_environment["config"]["data"]["random_seed"] == 8
    assert without_timing(by_environment) == without_timing(by_flag)

    monkeypatch.setenv("RANDOM_SEED", "9")
    flag_and_environment = run_in_process("both.json", "--seed", "8")  # --seed beats RANDOM_SEED
    assert flag_and_environment["config"]["data"]["random_seed"] == 8
    assert without_timing(flag_and_environment) == without_timing(by_flag)

    _, stderr = fresh_process.communicate(timeout=120)
    assert fresh_process.returncode == 0, stderr
    assert without_timing(json.loads((tmp_path / "fresh.json").read_text())) == without_timing(first)


# ---- colour pictures from a folder, and runs that only evaluate -----------------------------------------------------


def test_a_colour_model_trains_saves_reloads_and_predicts(tmp_path: Path) -> None:
    colour_folder(tmp_path / "colour", 400)
    write_config(tmp_path, model=SMALL_FOLDER_MODEL, data={"n_test": 100})
    run = run_cli(["--data-path", str(tmp_path / "colour"), "--epochs", "1", "--save-model", str(tmp_path / "c.npz"),
                   "--output", str(tmp_path / "r.json")], tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["data"]["input_shape"] == [28, 28, 3] and results["data"]["dataset"] == "folder"

    loaded = modelfile.load_model(tmp_path / "c.npz", main.build_model)
    assert loaded.model.input_shape == (28, 28, 3)
    assert loaded.meta["preprocess"] == {"method": "resize", "size": [28, 28], "filter": "bilinear", "color": "rgb"}
    examples = loaded.meta["examples"]
    assert examples["images"].shape == (100, 28, 28, 3) and examples["images"].dtype == np.uint8
    with np.load(tmp_path / "c.npz") as stored:
        for i, layer in enumerate(loaded.model.layers):
            for name, array in {**layer.params, **layer.buffers}.items():
                assert array.tobytes() == stored[modelfile.weight_key(i, name)].tobytes()
    test_accuracy = loaded.model.evaluate(examples["images"].astype(np.float32) / 255, examples["labels"])[1]
    assert test_accuracy == pytest.approx(results["test_accuracy"])  # the examples are the test set's first 100

    Image.fromarray(examples["images"][0]).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(examples["images"][0]).resize((56, 40)).save(tmp_path / "big.jpg")
    run = run_cli(["--predict", str(tmp_path / "grey.png"), str(tmp_path / "big.jpg"), "--load-model",
                   str(tmp_path / "c.npz"), "--output", str(tmp_path / "p.json")], tmp_path)
    assert run.returncode == 0, run.stderr
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert "colour model sees the same grey" in predictions[0]["note"] and "note" not in predictions[1]
    assert "note: " in run.stdout + run.stderr


@pytest.mark.slow
def test_colour_digits_train_to_95_percent(tmp_path: Path) -> None:
    """4,000 sample digits, each drawn twice in random colours, train; 1,000 other digits in colour test."""
    images, labels = sample_digits()
    order, rng, names = np.random.default_rng(0).permutation(len(labels)), np.random.default_rng(1), CLASS_FOLDER_NAMES
    train, test = order[1000:], order[:1000]
    write_class_folders(tmp_path / "colour" / "train", np.concatenate([colour_digits(images[train], rng),
                                                                       colour_digits(images[train], rng)]),
                        np.concatenate([labels[train], labels[train]]), names)
    write_class_folders(tmp_path / "colour" / "test", colour_digits(images[test], rng), labels[test], names)
    model = {"layers": [{"conv2d": {"filters": 32, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu",
                        {"maxpool2d": {"pool_size": 2}}, {"conv2d": {"filters": 64, "kernel_size": 3, "padding": 1}},
                        "batchnorm", "relu", {"maxpool2d": {"pool_size": 2}}, "flatten", {"dense": {"units": 128}},
                        "relu", {"dense": {"units": 10}}]}
    write_config(tmp_path, model=model, training={"epochs": 5, "learning_rate": 0.003, "batch_size": 32,
                                                  "lr_schedule": "one_cycle"})
    run = run_cli(["--data-path", str(tmp_path / "colour"), "--color", "rgb", "--output", str(tmp_path / "r.json"),
                   "--save-model", str(tmp_path / "c.npz")], tmp_path, timeout=1800)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["data"]["n_train"] == 8000 and results["data"]["n_test"] == 1000
    assert results["test_accuracy"] >= 0.95


def test_an_evaluation_only_run_reads_like_one_and_warns_of_other_data(tmp_path: Path) -> None:
    """A model trained on synthetic digits, scored with --epochs 0 on 'mnist' (offline: synthetic digits too, but
    another data set): no training lines, an 'evaluation only' result, and a loud warning about the data."""
    assert run_cli(["--dataset", "synthetic", "--n-train", "200", "--n-test", "50", "--epochs", "1",
                    "--save-model", "m.npz"], cwd=tmp_path).returncode == 0
    proc = run_cli(["--n-train", "200", "--n-test", "50", "--load-model", "m.npz", "--epochs", "0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for absent in ("training:", "continuing with the saved", "training took", "Training on synthetic"):
        assert absent not in proc.stdout + proc.stderr, absent
    assert "evaluation only, no training" in proc.stdout
    assert "Evaluating on synthetic seven-segment digits instead" in proc.stderr
    assert "m.npz was trained on synthetic (source: synthetic), but is now evaluated on mnist" in proc.stderr


def test_weights_too_large_for_the_test_set_end_as_divergence(tmp_path: Path) -> None:
    """SGD at 1e20: one batch leaves finite but huge weights, whose test loss overflows: diverged, exit 3, not a
    'test loss nan' reported as success."""
    proc = run_cli(["--optimizer", "sgd", "--learning-rate", "1e20", "--dataset", "digits", "--n-train", "32",
                    "--n-test", "16", "--epochs", "1", "--output", "r.json"], cwd=tmp_path)
    assert proc.returncode == main.EXIT_DIVERGED == 3, proc.stderr
    assert "training diverged at epoch 1, batch 1 (the test loss became nan)" in proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "diverged"
