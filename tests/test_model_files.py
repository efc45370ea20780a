"""Model files: save and load give the same predictions and optimiser state, old formats load, and a file that is
damaged or lies is refused in one line."""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import helpers
import numpy as np
import pytest
from helpers import (
    BN_DROPOUT_NET,
    MAIN,
    SAVED_MODEL_CONFIG,
    SavedModel,
    arrays_of,
    assert_one_error_line,
    digits,
    one_error_line,
    one_line,
    rewrite_model,
    run_cli,
    run_limited,
    small_config_file,
    write_config,
)

import config_schema
import errors
import main
import modelfile
from errors import ModelFileError

# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------


def test_save_then_load_gives_bit_identical_predictions_and_optimizer_state(tmp_path: Path) -> None:
    """A model saved and loaded again predicts exactly the same probabilities (np.array_equal, not close),
    the file holds only plain arrays (readable without pickle), and Adam's state and step count come back."""
    cfg = config_schema.validate_config({**SAVED_MODEL_CONFIG,
                                         "data": {**SAVED_MODEL_CONFIG["data"], "n_train": 300, "n_test": 50}})
    data = main.load_data(cfg["data"])
    rngs = main.make_rngs(1)
    model = main.build_model(cfg["model"], data.input_shape, data.num_classes, rngs["init"])
    optimizer = main.make_optimizer(cfg["training"])
    main.train(model, optimizer, data, epochs=1, batch_size=32, rng=rngs["shuffle"])
    path = tmp_path / "model.npz"
    modelfile.save_model(path, model, cfg["model"], data, {"epochs_completed": 1}, optimizer)

    with np.load(path, allow_pickle=False) as archive:  # would raise on any pickled entry
        assert all(archive[key].dtype != object for key in archive.files)
    loaded = modelfile.load_model(path, main.build_model)
    assert np.array_equal(loaded.model.predict_proba(data.x_test), model.predict_proba(data.x_test))
    for original, restored in zip(model.layers, loaded.model.layers):
        for name, param in original.params.items():
            assert restored.params[name].dtype == main.DTYPE
            assert np.array_equal(restored.params[name], param)
    assert loaded.meta["class_names"] == data.class_names and loaded.meta["input_shape"] == [28, 28, 1]

    adam = main.Adam()
    assert modelfile.restore_optimizer(adam, loaded, {k: p for k, p, _ in main.parameters(loaded.model)})
    assert adam.t == optimizer.t > 0
    assert adam.state.keys() == optimizer.state.keys()
    assert all(np.array_equal(adam.state[key], value) for key, value in optimizer.state.items())
    assert not modelfile.restore_optimizer(main.SGD(), loaded, {}), "a different optimiser must start afresh"


def test_loaded_model_continues_training_where_it_stopped(saved: SavedModel, tmp_path: Path) -> None:
    """`--load-model m.npz --epochs 1` trains one more epoch numbered 4 (after the saved 3), continues with
    the saved Adam state, says where it came from, and a model saved again knows it has 4 epochs."""
    run = run_cli(["--config", str(saved.config), "--load-model", str(saved.path), "--epochs", "1",
                   "--save-model", "more.npz", "--output", "results.json"], tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert [row["epoch"] for row in results["history"]] == [4]
    assert results["epochs_completed"] == 4
    assert results["model"]["loaded_from"] == str(saved.path)
    assert "continuing with the saved adam state" in run.stdout
    assert "epoch 4/4" in run.stdout
    assert modelfile.load_model(tmp_path / "more.npz", main.build_model).meta["training"]["epochs_completed"] == 4


def test_epochs_0_only_evaluates_and_reproduces_the_saved_accuracy(saved: SavedModel, tmp_path: Path) -> None:
    """`--load-model m.npz --epochs 0` trains nothing and, on the same data and seed, reports exactly the
    test accuracy that the training run reported and stored in the file."""
    run = run_cli(["--config", str(saved.config), "--load-model", str(saved.path), "--epochs", "0",
                   "--output", "results.json"], tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["history"] == [] and results["epochs_completed"] == 3
    stored = modelfile.load_model(saved.path, main.build_model).meta["training"]
    assert results["test_accuracy"] == saved.results["test_accuracy"] == stored["test_accuracy"]
    assert results["test_loss"] == pytest.approx(stored["test_loss"], rel=1e-6)


def test_results_record_the_loaded_architecture_as_the_model_config(saved: SavedModel, tmp_path: Path) -> None:
    """With --load-model, the results' config shows the architecture that ran (the file's), not the config
    file's model section, which the loaded model replaced."""
    config_model = {"layers": [{"conv2d": {"filters": 8, "padding": 1}}, "relu", "maxpool2d",
                               *helpers.classifier_head(16)]}
    config = helpers.write_config(tmp_path, **{**SAVED_MODEL_CONFIG, "model": config_model})
    run = run_cli(["--config", str(config), "--load-model", str(saved.path), "--epochs", "0", "--output", "r.json"],
                  tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    stored = modelfile.load_model(saved.path, main.build_model).meta["model"]
    assert results["config"]["model"] == stored and first_dense_units(stored) != 16
    dense = [row for row in results["model"]["summary"] if row["layer"].startswith("dense_1")]
    assert dense[0]["output_shape"] == [first_dense_units(stored)]


def first_dense_units(model_cfg: dict) -> int:
    """The units of the first dense layer of a model section's layer list."""
    return next(spec["dense"]["units"] for spec in model_cfg["layers"] if isinstance(spec, dict) and "dense" in spec)


def _model_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _with_meta(arrays: dict[str, np.ndarray], change: dict, section: str | None = "model") -> dict[str, np.ndarray]:
    """The arrays with meta[section] updated by change (section None: meta itself)."""
    meta = json.loads(str(arrays["meta"]))
    (meta if section is None else meta[section]).update(change)
    return {**arrays, "meta": np.array(json.dumps(meta))}


def make_bad_model_file(kind: str, good: Path, folder: Path) -> Path:
    """A damaged copy of the good model file `good`, of the given kind, in folder."""
    path = folder / f"{kind.replace(' ', '_')}.npz"
    content = good.read_bytes()
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(content)))
    elif kind == "truncated":
        path.write_bytes(content[:len(content) // 2])
    elif kind == "pickled npz":  # a real model plus an object array, which only unpickling could read
        np.savez(path, **_model_arrays(good), extra=np.array([{"runs": "code"}, None], dtype=object))
    elif kind == "plain pickle":
        with open(path, "wb") as f:
            pickle.dump(_model_arrays(good), f)
    elif kind == "no meta":
        np.savez(path, **{k: v for k, v in _model_arrays(good).items() if k != "meta"})
    elif kind == "wrong weight shape":
        np.savez(path, **{**_model_arrays(good), "layer0.W": np.zeros((5, 5, 1, 8), dtype=np.float32)})
    elif kind == "changed architecture":  # the first dense layer gets 65 units instead of the stored weights' 64
        arrays = _model_arrays(good)
        layers = [{"dense": {"units": 65}} if isinstance(spec, dict) and "dense" in spec else spec
                  for spec in json.loads(str(arrays["meta"]))["model"]["layers"]]
        layers[-1] = {"dense": {"units": 10}}
        np.savez(path, **_with_meta(arrays, {"layers": layers}))
    elif kind == "training summary null":
        np.savez(path, **_with_meta(_model_arrays(good), {"training": None}, section=None))
    elif kind == "epochs completed a word":
        np.savez(path, **_with_meta(_model_arrays(good), {"epochs_completed": "one"}, section="training"))
    elif kind == "optimizer a string":
        np.savez(path, **_with_meta(_model_arrays(good), {"optimizer": "adam"}, section=None))
    elif kind == "optimizer state of strings":
        arrays = _model_arrays(good)
        key = next(key for key in arrays if key.startswith("optimizer."))
        np.savez(path, **{**arrays, key: np.full(arrays[key].shape, "x")})
    elif kind != "missing":
        raise ValueError(kind)
    return path


BAD_KINDS = ["random bytes", "truncated", "pickled npz", "plain pickle", "no meta", "wrong weight shape",
             "changed architecture", "training summary null", "epochs completed a word", "optimizer a string",
             "optimizer state of strings", "missing"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_model_files_are_rejected_with_one_line_naming_the_file(
        kind: str, saved: SavedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Corrupt, truncated, pickled, mismatched or missing model files: load_model raises ModelFileError
    naming the file (never unpickling anything), and the CLI exits with 2 and one `error:` line naming it."""
    path = make_bad_model_file(kind, saved.path, tmp_path)
    with pytest.raises(errors.ModelFileError, match=re.escape(str(path))):
        modelfile.load_model(path, main.build_model)

    monkeypatch.chdir(tmp_path)
    code = main.main(["--config", str(saved.config), "--n-train", "20", "--n-test", "10", "--epochs", "0",
                      "--load-model", str(path)])
    assert code == main.EXIT_USAGE
    one_error_line(capsys.readouterr().err, str(path))


# What the version before model.layers stored as the architecture of SAVED_MODEL_CONFIG's model (its checked
# model section).
OLD_ARCHITECTURE = {"conv_layers": [{"filters": 8, "kernel_size": 3, "stride": 1, "padding": 1, "pool_size": 2,
                                     "pool_stride": None}], "dense_units": 64}


def old_model_file(good: Path, folder: Path) -> Path:
    """A copy of the model file `good` as the version before model.layers wrote it: the same weights and
    optimiser state, with the architecture in the old keys conv_layers and dense_units."""
    path = folder / "old_model.npz"
    arrays = _model_arrays(good)
    meta = json.loads(str(arrays["meta"]))
    assert meta["model"] == SAVED_MODEL_CONFIG["model"]
    meta["model"] = OLD_ARCHITECTURE
    np.savez(path, **{**arrays, "meta": np.array(json.dumps(meta))})
    return path


def test_a_model_file_saved_with_the_old_architecture_keys_still_loads(saved: SavedModel, tmp_path: Path) -> None:
    """A model file from before model.layers (architecture in conv_layers + dense_units) loads as the same
    network: the same layers and summary, bit-identical predictions, the Adam state back; and on the command
    line `--epochs 0` reproduces the saved test accuracy."""
    old = old_model_file(saved.path, tmp_path)
    new_loaded, old_loaded = (modelfile.load_model(path, main.build_model) for path in (saved.path, old))
    assert old_loaded.model.summary_rows() == new_loaded.model.summary_rows()
    x = main.load_data(config_schema.validate_config(SAVED_MODEL_CONFIG)["data"]).x_test
    assert np.array_equal(old_loaded.model.predict_proba(x), new_loaded.model.predict_proba(x))
    adam = main.Adam()
    params = {key: param for key, param, _ in main.parameters(old_loaded.model)}
    assert modelfile.restore_optimizer(adam, old_loaded, params) and adam.t > 0

    run = run_cli(["--config", str(saved.config), "--load-model", str(old), "--epochs", "0", "--output", "r.json"],
                  tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert results["test_accuracy"] == saved.results["test_accuracy"] and results["epochs_completed"] == 3


def test_a_model_loaded_from_an_old_file_is_recorded_and_saved_again_as_a_layer_list(saved: SavedModel,
                                                                                    tmp_path: Path) -> None:
    """Trained on from an old model file, the results' config shows the architecture as the layer list (a model
    section the config accepts) and the model file saved again stores that list, not the old keys."""
    old = old_model_file(saved.path, tmp_path)
    run = run_cli(["--config", str(saved.config), "--load-model", str(old), "--epochs", "1", "--save-model",
                   "again.npz", "--output", "r.json"], tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert results["config"]["model"] == SAVED_MODEL_CONFIG["model"]
    assert modelfile.load_model(tmp_path / "again.npz", main.build_model).meta["model"] == SAVED_MODEL_CONFIG["model"]


# ---- model files with BatchNorm and Dropout -------------------------------------------------------------------------


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


# ---- model files that lie, or ask for too much ----------------------------------------------------------------------


def test_a_model_file_with_a_huge_padding_is_refused_by_predict(tmp_path: Path, model_file: Path) -> None:
    meta = json.loads(str(np.load(model_file)["meta"]))
    meta["model"]["layers"][0] = {"conv2d": {"filters": 4, "kernel_size": 3, "stride": 50000, "padding": 100000}}
    rewrite_model(model_file, tmp_path / "pad.npz", meta=meta)
    np.save(tmp_path / "digit.npy", np.eye(8))
    proc = run_cli(["--load-model", "pad.npz", "--predict", "digit.npy"], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "pad.npz: the stored architecture cannot run here", "GiB")


def test_a_model_file_with_a_negative_variance_is_refused(tmp_path: Path) -> None:
    config = small_config_file(tmp_path, model={"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "batchnorm",
                                                           "relu", "flatten", {"dense": {"units": 10}}]})
    assert run_cli(["--config", str(config), "--save-model", "bn.npz"], cwd=tmp_path).returncode == 0
    variance = np.load(tmp_path / "bn.npz")["layer1.running_var"].copy()
    variance[0] = -1.0
    rewrite_model(tmp_path / "bn.npz", tmp_path / "bad.npz", **{"layer1.running_var": variance})
    np.save(tmp_path / "digit.npy", np.eye(8))
    for args in (["--predict", "digit.npy"], ["--config", str(config), "--save-model", "again.npz"]):
        proc = run_cli(["--load-model", "bad.npz", *args], cwd=tmp_path)
        assert proc.returncode == 2
        assert_one_error_line(proc.stderr, "bad.npz: layer1.running_var holds negative values, but a variance is >= 0")
    assert not (tmp_path / "again.npz").exists()


def lying_copy(good: Path, path: Path, meta: dict | None = None, training: dict | None = None,
               **arrays: np.ndarray) -> Path:
    """The good model file with meta entries, training-summary entries or arrays replaced."""
    stored = arrays_of(good)
    described = json.loads(str(stored["meta"]))
    described.update(meta or {})
    described["training"].update(training or {})
    np.savez(path, **{**stored, **arrays, "meta": np.array(json.dumps(described))})
    return path


def test_the_good_model_file_loads(good_model: Path) -> None:
    loaded = modelfile.load_model(good_model, main.build_model)
    assert loaded.model.input_shape == (8, 8, 1) and set(loaded.optimizer_state) >= {"0.W.m", "0.W.v"}


def with_nan(array: np.ndarray, value: float = np.nan) -> np.ndarray:
    array = array.copy()
    array.flat[0] = value
    return array


@pytest.mark.parametrize(("change", "problem"), [
    ({"meta": {"input_shape": [8, 8, 2]}},
     "not a valid numpy-cnn model file (meta: input_shape [8, 8, 2] has 2 channels, but numpy-cnn models read grey "
     "images (1 channel) or colour images (3: red, green, blue))"),
    ({"meta": {"input_shape": [100000, 8, 1]}},
     "not a valid numpy-cnn model file (meta: input_shape [100000, 8, 1]: an image's sides must be 1 to 4096 pixels)"),
    ({"meta": {"input_shape": [8.5, 8, 1]}},
     "not a valid numpy-cnn model file (meta: input_shape [8.5, 8, 1] is not [height, width, channels] (3 integers))"),
    ({"meta": {"class_names": list(range(10))}},
     "not a valid numpy-cnn model file (meta: class_names [0, 1, 2, 3, 4, 5, ...] is not a list of 2 to 1,000 names "
     "(short strings on one line))"),
    ({"meta": {"class_names": [str(i) for i in range(5000)]}},
     "not a valid numpy-cnn model file (meta: class_names ['0', '1', '2', '3', '4', '5', ...] is not a list of 2 to "
     "1,000 names (short strings on one line))"),
    ({"meta": {"class_names": ["seven\nfake: 100%", *main.DIGIT_NAMES[1:]]}},
     "not a valid numpy-cnn model file (meta: class_names ['seven\\nfake: 100%', '1', '2', '3', '4', '5', ...] is "
     "not a list of 2 to 1,000 names (short strings on one line))"),
    ({"training": {"test_accuracy": float("nan")}},
     "not a valid numpy-cnn model file (meta: training.test_accuracy is nan, not a finite number from 0 to 1)"),
    ({"training": {"test_loss": float("inf")}},
     "not a valid numpy-cnn model file (meta: training.test_loss is inf, not a finite number >= 0)"),
    ({"layer0.W": "nan"}, "layer0.W holds NaN or infinite values"),
    ({"layer4.b": "inf"}, "layer4.b holds NaN or infinite values"),
    ({"layer1.running_var": "inf"}, "layer1.running_var holds NaN or infinite values"),
    ({"optimizer.0.W.m": "nan"}, "optimizer.0.W.m holds NaN or infinite values"),
    ({"optimizer.0.W.v": "huge"}, "optimizer.0.W.v has shape (1000000,), larger than any weight of the model"),
], ids=["2-channels", "absurd-side", "fractional-side", "class-names-numbers", "5000-classes", "class-name-newline",
        "nan-accuracy", "infinite-loss", "nan-weight", "inf-bias", "inf-batchnorm-buffer", "nan-adam-state",
        "oversized-adam-state"])
def test_a_model_file_that_lies_is_one_line(good_model: Path, tmp_path: Path, change: dict, problem: str) -> None:
    stored = arrays_of(good_model)
    arrays = {}
    for key, kind in change.items():
        if key.startswith(("layer", "optimizer")):
            arrays[key] = (np.zeros(1_000_000, np.float32) if kind == "huge"
                           else with_nan(stored[key], np.nan if kind == "nan" else -np.inf))
    path = lying_copy(good_model, tmp_path / "lying.npz", meta=change.get("meta"), training=change.get("training"),
                      **arrays)
    with pytest.raises(ModelFileError) as error:
        modelfile.load_model(path, main.build_model)
    assert str(error.value) == f"{path}: {problem}"


def test_predict_with_a_nan_model_is_one_line(good_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """--predict with a model whose weights are NaN: one error line and exit 2, not a prediction "9 (nan%)"."""
    path = lying_copy(good_model, tmp_path / "nan.npz", **{"layer4.W": np.full((128, 10), np.nan, np.float32)})
    np.save(tmp_path / "digit.npy", np.eye(8))
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main.main(["--load-model", str(path), "--predict", "digit.npy"])
    captured = capsys.readouterr()
    assert one_line(captured.err) == f"error: {path}: layer4.W holds NaN or infinite values"
    assert code == 2 and captured.out == ""


def test_an_array_header_that_lies_is_refused_before_reading_its_data(good_model: Path, tmp_path: Path) -> None:
    """A weight whose .npy header declares 2**40 floats (in a file of a few hundred bytes) is refused from its
    header: nothing of that size is allocated."""
    path = lying_copy(good_model, tmp_path / "liar.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("optimizer.0.W.extra.npy", header.getvalue() + bytes(16))
    with pytest.raises(ModelFileError) as error:
        modelfile.load_model(path, main.build_model)
    assert str(error.value) == (f"{path}: optimizer.0.W.extra has shape (1099511627776,), larger than any weight "
                                "of the model")


def test_a_tiny_model_file_asking_for_1e9_filters_is_one_line(good_model: Path, tmp_path: Path) -> None:
    """A 1 KB model file whose architecture asks for a billion filters: one line naming the file and the layer,
    no MemoryError (the process is capped at 2 GB: allocating would fail there, not take the machine)."""
    meta = json.loads(str(arrays_of(good_model)["meta"]))
    meta["model"] = {"layers": [{"conv2d": {"filters": 10**9, "kernel_size": 3, "padding": 1}}, "relu", "flatten",
                                {"dense": {"units": 10}}]}
    meta.pop("optimizer")
    np.savez_compressed(tmp_path / "huge.npz", meta=np.array(json.dumps(meta)))
    assert (tmp_path / "huge.npz").stat().st_size < 2000
    np.save(tmp_path / "digit.npy", np.eye(8))
    write_config(tmp_path)
    run = run_limited([str(MAIN), "--load-model", "huge.npz", "--predict", "digit.npy"], tmp_path)
    line = one_line(run.stderr)
    assert line.startswith("error: huge.npz: the stored architecture cannot be built (model.layers[0] (conv2d): "
                           "9,000,000,000 weights need about "), line
    assert "MemoryError" not in line
    assert run.returncode == 2
