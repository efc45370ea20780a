"""Saved models (--save-model / --load-model) and predictions on image files (--predict).

A small model is trained and saved once for the whole file, through the real command line, on synthetic
seven-segment digits (offline, a few seconds); the other tests load it, continue it, damage it, and ask it
to read digits drawn with Pillow.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import helpers
import numpy as np
import pytest
from helpers import run_cli
from PIL import Image, ImageDraw

import config_schema
import datafiles
import errors
import images
import main
import modelfile

# A small model that learns the synthetic digits in 3 epochs of 2,000 images (a few seconds).
CONFIG = {
    "data": {"dataset": "synthetic", "n_train": 2000, "n_test": 300, "random_seed": 0},
    "model": helpers.model_section({"conv2d": {"filters": 8, "padding": 1}}, "relu", "maxpool2d",
                                   *helpers.classifier_head(64)),
    "training": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "learning_rate": 0.001},
}


@dataclass
class SavedModel:
    folder: Path
    config: Path
    path: Path
    results: dict  # the results JSON of the run that saved it


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    """Train for 3 epochs on the command line, save the model and the results JSON (once for this file)."""
    folder = tmp_path_factory.mktemp("saved_model")
    config = helpers.write_config(folder, **CONFIG)  # logs into folder/logs, not into the repo
    run = run_cli(["--config", str(config), "--save-model", "model.npz", "--output", "trained.json"], folder)
    assert run.returncode == 0, run.stderr
    results = json.loads((folder / "trained.json").read_text(encoding="utf-8"))
    assert results["epochs_completed"] == 3 and results["files"]["model"] == "model.npz"
    return SavedModel(folder, config, folder / "model.npz", results)


def one_error_line(stderr: str, must_name: str) -> str:
    """The single `error: ...` line the CLI printed, after checking it names `must_name`."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    assert must_name in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------


def test_save_then_load_gives_bit_identical_predictions_and_optimizer_state(tmp_path: Path) -> None:
    """A model saved and loaded again predicts exactly the same probabilities (np.array_equal, not close),
    the file holds only plain arrays (readable without pickle), and Adam's state and step count come back."""
    cfg = config_schema.validate_config({**CONFIG, "data": {**CONFIG["data"], "n_train": 300, "n_test": 50}})
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
    config = helpers.write_config(tmp_path, **{**CONFIG, "model": config_model})
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


# What the version before model.layers stored as the architecture of CONFIG's model: its checked model section.
OLD_ARCHITECTURE = {"conv_layers": [{"filters": 8, "kernel_size": 3, "stride": 1, "padding": 1, "pool_size": 2,
                                     "pool_stride": None}], "dense_units": 64}


def old_model_file(good: Path, folder: Path) -> Path:
    """A copy of the model file `good` as the version before model.layers wrote it: the same weights and
    optimiser state, with the architecture in the old keys conv_layers and dense_units."""
    path = folder / "old_model.npz"
    arrays = _model_arrays(good)
    meta = json.loads(str(arrays["meta"]))
    assert meta["model"] == CONFIG["model"]
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
    x = main.load_data(config_schema.validate_config(CONFIG)["data"]).x_test
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
    assert results["config"]["model"] == CONFIG["model"]
    assert modelfile.load_model(tmp_path / "again.npz", main.build_model).meta["model"] == CONFIG["model"]


# ------------------------------------------------------------------------------------------------
# Predicting image files
# ------------------------------------------------------------------------------------------------


def draw_digit(digit: int, path: Path, size: int = 112) -> None:
    """A seven-segment digit (the segments datafiles.make_synthetic draws) in black ink on white paper,
    size x size pixels: what a user might draw, and a light background that --predict must invert."""
    picture = Image.new("L", (size, size), color=255)
    pen = ImageDraw.Draw(picture)
    left, top, width, height = 0.34 * size, 0.2 * size, 0.32 * size, 0.6 * size
    for (x0, y0, x1, y1), lit in zip(datafiles.SEGMENTS, datafiles.SEGMENTS_ON[digit]):
        if lit:
            pen.line([(left + width * x0, top + height * y0), (left + width * x1, top + height * y1)],
                     fill=0, width=size // 10)
    picture.save(path)


@dataclass
class Predictions:
    folder: Path
    run: subprocess.CompletedProcess
    files: list[str]
    json: dict
    synthetic_image: np.ndarray  # the uint8 28x28 digit saved as digit.npy and digit_float.npy


@pytest.fixture(scope="module")
def predictions(saved: SavedModel, tmp_path_factory: pytest.TempPathFactory) -> Predictions:
    """One `--predict` run over ten drawn digits (0.png .. 9.png) and a synthetic digit saved as .npy twice
    (uint8 0..255 and float 0..1), with --output."""
    folder = tmp_path_factory.mktemp("predict")
    files = []
    for digit in range(10):
        draw_digit(digit, folder / f"{digit}.png")
        files.append(f"{digit}.png")
    images, _ = datafiles.make_synthetic(1, np.random.default_rng(7))
    np.save(folder / "digit.npy", images[0])
    np.save(folder / "digit_float.npy", images[0] / 255)
    files += ["digit.npy", "digit_float.npy"]
    run = run_cli(["--config", str(saved.config), "--load-model", str(saved.path), "--predict", *files,
                   "--output", "predictions.json"], folder)
    assert run.returncode == 0, run.stderr
    written = json.loads((folder / "predictions.json").read_text(encoding="utf-8"))
    return Predictions(folder, run, files, written, images[0])


PREDICTION_LINE = re.compile(r"^(?P<file>\S+): (?P<top>\S+) \((?P<percent>\d+\.\d)%\)(, \S+ \(\d+\.\d%\)){2}$")


def printed_top_classes(stdout: str) -> dict[str, tuple[str, float]]:
    """{file: (top class, percent)} from the lines `FILE: CLASS (NN.N%), CLASS (NN.N%), CLASS (NN.N%)`."""
    found = {}
    for line in stdout.splitlines():
        match = PREDICTION_LINE.match(line)
        if match:
            found[match["file"]] = (match["top"], float(match["percent"]))
    return found


def test_predict_prints_one_line_per_file_matching_the_model(saved: SavedModel, predictions: Predictions) -> None:
    """Each image gets one line `FILE: CLASS (NN.N%), ...` with the top 3 classes, and the top class is the
    one the loaded model gives the same prepared image in-process (read_image -> prepare_image -> model)."""
    printed = printed_top_classes(predictions.run.stdout)
    assert list(printed) == predictions.files
    loaded = modelfile.load_model(saved.path, main.build_model)
    for name in predictions.files:
        image = images.prepare_image(images.read_image(predictions.folder / name), loaded.model.input_shape, 20 / 28)
        probabilities = loaded.model.predict_proba(image[None])[0]
        assert printed[name][0] == str(probabilities.argmax()), name
        assert printed[name][1] == pytest.approx(100 * probabilities.max(), abs=0.051)


def test_predict_writes_the_predictions_into_the_output_json(predictions: Predictions) -> None:
    """--output with --predict: status 'predicted', and per file the top 3 classes with descending
    probabilities, the first being the one printed."""
    written = predictions.json
    assert written["status"] == "predicted"
    printed = printed_top_classes(predictions.run.stdout)
    assert [p["file"] for p in written["predictions"]] == predictions.files
    for prediction in written["predictions"]:
        top = prediction["top"]
        probabilities = [t["probability"] for t in top]
        assert len(top) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
        assert top[0]["class"] == printed[prediction["file"]][0]


def test_npy_images_work_in_bytes_or_fractions(saved: SavedModel, predictions: Predictions) -> None:
    """A 28x28 .npy image is read as is: uint8 0..255 and float 0..1 give the same answer, the one the
    model gives that array directly."""
    by_file = {p["file"]: p["top"] for p in predictions.json["predictions"]}
    as_bytes, as_fractions = by_file["digit.npy"], by_file["digit_float.npy"]
    assert [t["class"] for t in as_bytes] == [t["class"] for t in as_fractions]
    assert [t["probability"] for t in as_bytes] == pytest.approx([t["probability"] for t in as_fractions])
    model = modelfile.load_model(saved.path, main.build_model).model
    direct = model.predict((predictions.synthetic_image / 255).astype(np.float32)[None, :, :, None])[0]
    assert by_file["digit.npy"][0]["class"] == str(direct)


def test_16_bit_and_slightly_overshooting_images_read_like_8_bit_ones(tmp_path: Path) -> None:
    """A 16-bit grey PNG is scaled by 65535 (Pillow's convert("L") would clip it to white), and a float .npy
    whose maximum overshoots 1 a little (as after resampling) stays in [0, 1] instead of being taken as 0-255."""
    picture = np.full((40, 40), 50000, dtype=np.uint16)
    picture[5:35, 18:22] = 10000
    Image.fromarray(picture).save(tmp_path / "deep.png")
    Image.fromarray((picture / 65535 * 255).round().astype(np.uint8)).save(tmp_path / "flat.png")
    deep, flat = images.read_image(tmp_path / "deep.png"), images.read_image(tmp_path / "flat.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_allclose(deep, flat, atol=1 / 255)
    assert deep.min() == pytest.approx(10000 / 65535) and deep.max() == pytest.approx(50000 / 65535)

    bar = np.zeros((28, 28))
    bar[5:20, 10:13] = 1.0
    np.save(tmp_path / "exact.npy", bar)
    bar[6, 11] = 1.02
    np.save(tmp_path / "overshoot.npy", bar)
    np.save(tmp_path / "bytes.npy", (np.clip(bar, 0, 1) * 255).astype(np.uint8))
    for name in ("exact.npy", "overshoot.npy", "bytes.npy"):
        image = images.read_image(tmp_path / name)
        assert image.min() == 0 and image.max() == 1, name
        np.testing.assert_allclose(image, np.clip(bar, 0, 1), err_msg=name)


def test_drawn_digits_are_recognised(predictions: Predictions) -> None:
    """Every digit 0..9 drawn black on white at 112x112 is read as itself: the light background is
    inverted and the digit is scaled and centred the way the model's training digits were."""
    printed = printed_top_classes(predictions.run.stdout)
    read_as = {digit: printed[f"{digit}.png"][0] for digit in range(10)}
    assert read_as == {digit: str(digit) for digit in range(10)}


@pytest.mark.parametrize("problem", ["missing", "not an image", "3-D array"])
def test_unreadable_image_files_exit_2_naming_the_file(
        problem: str, saved: SavedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """A missing image, a file that is no image, or a .npy that is not 2-D: exit 2, one line naming it."""
    if problem == "missing":
        path = tmp_path / "nowhere.png"
    elif problem == "not an image":
        path = tmp_path / "broken.png"
        path.write_bytes(b"this is not a PNG")
    else:
        path = tmp_path / "cube.npy"
        np.save(path, np.zeros((4, 28, 28)))
    monkeypatch.chdir(tmp_path)
    code = main.main(["--config", str(saved.config), "--load-model", str(saved.path), "--predict", str(path)])
    assert code == main.EXIT_USAGE
    one_error_line(capsys.readouterr().err, str(path))


# ------------------------------------------------------------------------------------------------
# prepare_image
# ------------------------------------------------------------------------------------------------


def test_prepare_image_inverts_a_light_background() -> None:
    """A dark stroke on white becomes a light stroke on black (like MNIST); at the model's own size
    nothing else changes."""
    paper = np.ones((28, 28))
    paper[4:24, 12:16] = 0.0  # a black vertical bar
    prepared = images.prepare_image(paper, (28, 28, 1))
    np.testing.assert_array_equal(prepared[:, :, 0], (1 - paper).astype(np.float32))


def test_prepare_image_keeps_a_dark_background() -> None:
    """An image that is already light on black is passed through unchanged."""
    night = np.zeros((28, 28))
    night[4:24, 12:16] = 0.9
    np.testing.assert_array_equal(images.prepare_image(night, (28, 28, 1))[:, :, 0], night.astype(np.float32))


@pytest.mark.parametrize("size", [(5, 7), (28, 28), (40, 100), (300, 20), (111, 113)])
@pytest.mark.parametrize("input_shape", [(28, 28, 1), (8, 8, 1)])
def test_prepare_image_gives_the_model_input_shape_for_any_size(size: tuple[int, int],
                                                                input_shape: tuple[int, int, int]) -> None:
    """Any image size becomes the model's (H, W, 1) float32 in [0, 1], with the ink still there."""
    rng = np.random.default_rng(0)
    image = np.zeros(size)
    image[size[0] // 4:3 * size[0] // 4 + 1, size[1] // 4:3 * size[1] // 4 + 1] = rng.uniform(0.5, 1.0)
    prepared = images.prepare_image(image, input_shape)
    assert prepared.shape == input_shape and prepared.dtype == np.float32
    assert prepared.min() >= 0 and 0 < prepared.max() <= 1


def test_prepare_image_centres_the_ink_by_its_mass() -> None:
    """A blob in the corner of a large image ends up with its centre of mass in the middle of the frame,
    scaled so that its longer side fills 20 of 28 pixels, as MNIST's digits were made."""
    image = np.zeros((200, 200))
    image[10:50, 150:170] = 1.0  # 40 tall, 20 wide, top right
    prepared = images.prepare_image(image, (28, 28, 1))[:, :, 0]
    rows, cols = np.indices(prepared.shape)
    centre = ((rows * prepared).sum() / prepared.sum(), (cols * prepared).sum() / prepared.sum())
    assert centre == pytest.approx((14, 14), abs=1.0)
    inked_rows = np.flatnonzero(prepared.max(axis=1) > 0.5)
    assert inked_rows[-1] - inked_rows[0] + 1 == pytest.approx(20, abs=1)


def test_prepare_image_of_a_blank_page_is_blank() -> None:
    """A page with no ink at all (white, so inverted to black) gives an all-zero image, not a crash."""
    prepared = images.prepare_image(np.ones((50, 40)), (28, 28, 1))
    assert prepared.shape == (28, 28, 1) and not prepared.any()
