"""--predict: reading pictures and arrays of any size and format, preparing them as the model's data set was, and
one line per file that cannot be read."""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import (
    EPS,
    SavedModel,
    arrays_of,
    assert_one_error_line,
    classifier_head,
    encoded,
    one_error_line,
    run_cli,
    write_config,
    write_idx_folder,
)
from PIL import Image, ImageDraw, features

import config_schema
import datafiles
import errors
import images
import main
import modelfile
import plots
from errors import DataError

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


def test_bit_and_slightly_overshooting_images_read_like_8_bit_ones(tmp_path: Path) -> None:
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


def drawn_seven(size: int = 120, ink: int = 0, background: int = 255, mode: str = "L") -> Image.Image:
    picture = Image.new(mode, (size, size), background)
    ImageDraw.Draw(picture).line([(30, 20), (90, 20), (50, 100)], fill=ink, width=10)
    return picture


def test_transparent_background_is_read_as_white(tmp_path: Path) -> None:
    """Black ink on a transparent background (as drawing apps save it) must not become black on black."""
    picture = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
    ImageDraw.Draw(picture).line([(10, 30), (50, 30)], fill=(0, 0, 0, 255), width=6)
    picture.save(tmp_path / "transparent.png")
    image = images.read_image(tmp_path / "transparent.png")
    assert image[5, 5] == pytest.approx(1.0) and image[30, 30] == pytest.approx(0.0)
    prepared = images.prepare_image(image, (28, 28, 1))
    assert prepared.max() > 0.9 and prepared[0, 0, 0] == 0  # inverted: light ink on black, as in MNIST


def test_exif_rotation_of_a_photo_is_applied(tmp_path: Path) -> None:
    """A phone stores a portrait photo sideways with an orientation tag; read_image turns it upright."""
    landscape = Image.new("L", (80, 40), 255)
    ImageDraw.Draw(landscape).rectangle([0, 0, 9, 39], fill=0)  # a dark band along the left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    landscape.save(tmp_path / "photo.jpg", exif=exif)
    image = images.read_image(tmp_path / "photo.jpg")
    assert image.shape == (80, 40)  # upright: taller than wide
    assert image[:5].mean() < 0.2 and image[-5:].mean() > 0.8  # the band is now along the top


def test_grey_paper_becomes_black_background_and_the_ink_is_cropped() -> None:
    """A photo of a digit on grey paper: the background is stretched to 0, so the crop finds the ink."""
    photo = np.full((100, 100), 0.7)
    photo[30:70, 45:55] = 0.15  # a dark stroke
    prepared = images.prepare_image(photo, (28, 28, 1))[..., 0]
    assert prepared.max() == pytest.approx(1.0, abs=0.05)
    assert np.abs(prepared[0]).max() < 0.05 and np.abs(prepared[:, 0]).max() < 0.05
    rows = np.where(prepared.max(axis=1) > 0.5)[0]
    assert 18 <= len(rows) <= 22  # the stroke fills about 20 of 28 rows, as MNIST digits do


def test_a_model_sized_array_is_taken_as_it_is() -> None:
    array = np.random.default_rng(0).random((28, 28)) * 0.4  # dark background: not inverted, not rescaled
    assert np.array_equal(images.prepare_image(array, (28, 28, 1))[..., 0], array.astype(np.float32))


def test_nan_array_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "nan.npy", np.full((28, 28), np.nan))
    with pytest.raises(errors.DataError, match="NaN or infinite"):
        images.read_image(tmp_path / "nan.npy")


def test_blank_image_gets_a_warning(tmp_path: Path) -> None:
    model = main.build_model(config_schema.validate_config({})["model"], (28, 28, 1), 10, np.random.default_rng(0))
    drawn_seven().save(tmp_path / "seven.png")
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    results = images.predict_files(model, [tmp_path / "seven.png", tmp_path / "blank.png"], main.DIGIT_NAMES,
                                  {"method": "digit", "fill": 20 / 28})
    assert "warning" not in results[0] and "blank" in results[1]["warning"]


# ---- formats, frames and files that fail ----------------------------------------------------------------------------


@pytest.mark.parametrize("format", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_every_allowed_format_opens(format: str) -> None:
    if format == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    picture = Image.fromarray((np.eye(16) * 255).astype(np.uint8)).convert("RGB")
    with images.open_image(encoded(picture, format), '"image"') as opened:
        assert opened.format == format and opened.size == (16, 16)


@pytest.mark.parametrize("name, data, kind", [
    ("digit.eps", EPS, "is a PostScript (EPS) file"),
    ("digit.tif", encoded(Image.fromarray(np.eye(8, dtype=np.float32)), "TIFF"), "is a TIFF file"),
    ("digit.ico", encoded(Image.fromarray((np.eye(16) * 255).astype(np.uint8)), "ICO"), "cannot read it as an image"),
])
def test_other_formats_are_refused_before_pillow_decodes_them(tmp_path: Path, model_file: Path, name: str,
                                                               data: bytes, kind: str) -> None:
    from PIL import EpsImagePlugin

    with pytest.raises(DataError, match=f"^x: {re.escape(kind)}; the formats read are PNG, JPEG, GIF, BMP or WebP"):
        images.open_image(data, "x")
    (tmp_path / name).write_bytes(data)
    calls: list = []
    original = EpsImagePlugin.Ghostscript
    EpsImagePlugin.Ghostscript = lambda *args, **kwargs: calls.append(args)  # type: ignore[assignment]
    try:
        with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / name))}: {re.escape(kind)}"):
            images.read_image(tmp_path / name)
    finally:
        EpsImagePlugin.Ghostscript = original
    assert not calls
    proc = run_cli(["--load-model", str(model_file), "--predict", name], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, f"{name}: {kind}")


# ---- --predict fills the frame as the model's data set did ----------------------------------------------------------


def draw_a_one(path: Path) -> tuple[int, int]:
    """A tall '1' drawn in black on white paper, 200x160 pixels; returns its ink's (height, width)."""
    picture = Image.new("L", (160, 200), 255)
    draw = ImageDraw.Draw(picture)
    draw.line([(80, 20), (80, 180)], fill=0, width=16)
    draw.line([(80, 24), (50, 54)], fill=0, width=12)
    picture.save(path)
    ink = np.argwhere(np.asarray(picture) < 128)
    height, width = ink.max(axis=0) - ink.min(axis=0) + 1
    return int(height), int(width)


def ink_box(image: np.ndarray, threshold: float = 0.1) -> tuple[int, int]:
    """(height, width) of the bounding box of the pixels brighter than threshold."""
    ink = np.argwhere(image > threshold)
    assert len(ink), "the model got a blank image"
    height, width = ink.max(axis=0) - ink.min(axis=0) + 1
    return int(height), int(width)


def train_tiny_model(folder: Path, dataset: str, data_path: Path | None) -> Path:
    """A tiny model trained for one epoch through main.main and saved; returns the model file."""
    config = folder / f"{dataset}.yaml"
    config.write_text(yaml.safe_dump({
        "logging": {"level": "WARNING", "file": None},
        "data": {"n_train": 20, "n_test": 10},
        "model": {"layers": classifier_head(8)},
        "training": {"epochs": 1, "batch_size": 10, "workers": 1},
    }))
    model = folder / f"{dataset}.npz"
    flags = ["--config", str(config), "--dataset", dataset, "--save-model", str(model)]
    assert main.main(flags + (["--data-path", str(data_path)] if data_path else [])) == 0
    return model


@pytest.mark.parametrize(("dataset", "frame", "longer_side"), [
    ("mnist", 28, 20),  # MNIST fitted each digit into 20x20 pixels of its 28x28
    ("fashion_mnist", 28, 28),  # Fashion-MNIST's articles fill the frame
    ("digits", 8, 8),  # so do scikit-learn's 8x8 digits
])
def test_predict_fills_the_frame_as_the_models_data_set_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture, dataset: str,
                                                             frame: int, longer_side: int) -> None:
    """--predict on a drawing: the image the model receives (recorded at predict_proba, not recomputed with
    images.prepare_image) has its ink's longer side spanning `longer_side` pixels of the `frame` x `frame`
    input, and keeps the drawing's proportions. With MNIST's 20/28 for every data set, Fashion-MNIST's would
    span 20 and the digits' 6."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    data_path = write_idx_folder(tmp_path / "idx") if dataset in ("mnist", "fashion_mnist") else None
    model = train_tiny_model(tmp_path, dataset, data_path)
    drawn_height, drawn_width = draw_a_one(tmp_path / "one.png")
    assert drawn_height > 3 * drawn_width  # tall: its longer side is its height

    seen: list[np.ndarray] = []
    real_predict_proba = main.Sequential.predict_proba

    def recording_predict_proba(self: main.Sequential, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        seen.append(np.array(x))
        return real_predict_proba(self, x, batch_size)

    monkeypatch.setattr(main.Sequential, "predict_proba", recording_predict_proba)
    capsys.readouterr()
    assert main.main(["--load-model", str(model), "--predict", "one.png", "--output", "predicted.json"]) == 0
    assert "one.png: " in capsys.readouterr().out
    assert json.loads(Path("predicted.json").read_text())["predictions"][0]["file"] == "one.png"

    assert len(seen) == 1 and seen[0].shape == (1, frame, frame, 1)
    height, width = ink_box(seen[0][0, :, :, 0])
    assert height == longer_side, f"the ink spans {height} of {frame} rows, expected {longer_side}"
    # The width is scaled by the same factor: the drawing is not stretched.
    assert abs(width - drawn_width * longer_side / drawn_height) <= 1.5


# ---- a picture that fails -------------------------------------------------------------------------------------------


def test_a_picture_that_fails_exits_1_and_is_recorded_in_the_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """plots.write_plots raising (a bug, a missing font, a full disk) must not cost the run: the model and the
    results are still written, the results file names the problem under "problems", one error line says it,
    and the exit code is 1, not 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)

    def failing_write_plots(*args: Any, **kwargs: Any) -> dict:
        raise RuntimeError("matplotlib ran out of ink")

    monkeypatch.setattr(plots, "write_plots", failing_write_plots)
    Path("cfg.yaml").write_text(yaml.safe_dump({
        "logging": {"level": "INFO", "file": "logs/app.log"},
        "data": {"dataset": "digits", "n_train": 64, "n_test": 32},
        "model": {"layers": classifier_head(8)},
        "training": {"epochs": 1, "workers": 1}}))
    code = main.main(["--config", "cfg.yaml", "--plot-dir", "pictures", "--output", "results.json",
                      "--save-model", "model.npz"])
    captured = capsys.readouterr()
    assert code == main.EXIT_UNEXPECTED == 1, captured.err
    results = json.loads(Path("results.json").read_text())
    assert len(results["problems"]) == 1, results["problems"]
    problem = results["problems"][0]
    assert "picture" in problem and "RuntimeError" in problem and "matplotlib ran out of ink" in problem
    assert results["status"] == "completed" and results["epochs_completed"] == 1
    assert results["test_accuracy"] is not None and "plots" not in results["files"]
    assert results["files"]["model"] == "model.npz" and Path("model.npz").is_file()
    error_lines = [line for line in captured.err.splitlines() if "matplotlib ran out of ink" in line]
    assert len(error_lines) == 1 and "Traceback" not in captured.err + captured.out
    assert "unexpected" not in captured.err


def test_a_colour_model_without_conv_layers_predicts_a_grey_file_with_a_note(
        good_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A dense-only model whose stored weights really fit an 8x8x3 input (once "unexpected ValueError: operands
    could not be broadcast"): a grey file is given to it as equal red, green and blue, with a note."""
    layers = ["flatten", {"dense": {"units": 10}}]
    arrays = {"layer1.W": np.zeros((192, 10), np.float32), "layer1.b": np.zeros(10, np.float32)}
    meta = json.loads(str(arrays_of(good_model)["meta"]))
    meta.update(model={"layers": layers}, input_shape=[8, 8, 3])
    meta.pop("optimizer")
    np.savez(tmp_path / "colour.npz", **arrays, meta=np.array(json.dumps(meta)))
    np.save(tmp_path / "digit.npy", np.eye(8))
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main.main(["--load-model", "colour.npz", "--predict", "digit.npy"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("digit.npy: ")
    assert "the colour model sees the same grey in red, green and blue" in captured.out + captured.err


# ---- --predict with bad files among good ones -----------------------------------------------------------------------


def bad_and_good_files(folder: Path) -> list[Path]:
    """A good drawing, a complex .npy, a folder, a missing file, an image over Pillow's pixel limit (lowered in
    the tests to 10,000) and one over twice that limit, and another good .npy."""
    picture = Image.new("L", (60, 60), 255)
    ImageDraw.Draw(picture).line([(15, 10), (45, 10), (25, 50)], fill=0, width=6)
    picture.save(folder / "seven.png")
    np.save(folder / "complex.npy", np.ones((8, 8), complex))
    (folder / "a_folder").mkdir()
    Image.new("L", (150, 100), 255).save(folder / "wide.png")  # 15,000 pixels: Pillow warns
    Image.new("L", (300, 300), 255).save(folder / "huge.png")  # 90,000 pixels: Pillow refuses
    np.save(folder / "bar.npy", np.pad(np.ones((6, 2)), ((1, 1), (3, 3))))
    return [folder / name for name in ("seven.png", "complex.npy", "a_folder", "missing.png", "wide.png", "huge.png",
                                       "bar.npy")]


EXPECTED_ERRORS = {
    "complex.npy": "holds complex numbers; expected grey values (real numbers)",
    "a_folder": "is a folder, not an image file",
    "missing.png": "no such image file",
    "wide.png": "150x100 pixels is more than the 10,000 allowed (a small file can hold a huge image)",
    "huge.png": "90,000 pixels is more than the 10,000 allowed (a small file can hold a huge image)",
}


def test_predict_files_gives_a_result_per_file_and_no_warning(good_model: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    model = modelfile.load_model(good_model, main.build_model).model
    paths = bad_and_good_files(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = images.predict_files(model, paths, main.DIGIT_NAMES, {"method": "digit", "fill": 1.0})
    assert [warning.category.__name__ for warning in caught] == []
    assert [result["file"] for result in results] == [str(path) for path in paths]
    assert {Path(result["file"]).name: result["error"] for result in results if "error" in result} == EXPECTED_ERRORS
    good = [result for result in results if "error" not in result]
    assert [Path(result["file"]).name for result in good] == ["seven.png", "bar.npy"]
    assert all(len(result["top"]) == 3 for result in good)
    # as if the bad files were not there
    alone = images.predict_files(model, [paths[0]], main.DIGIT_NAMES, {"method": "digit", "fill": 1.0})
    assert [top["class"] for top in alone[0]["top"]] == [top["class"] for top in good[0]["top"]]
    assert [top["probability"] for top in alone[0]["top"]] == pytest.approx([top["probability"] for top in
                                                                             good[0]["top"]], rel=1e-5)


def test_a_folder_is_not_reported_as_a_missing_image(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        images.read_image(tmp_path)
    assert str(error.value) == f"{tmp_path}: is a folder, not an image file"


def test_predict_on_the_command_line_prints_the_good_and_one_line_per_bad(
        good_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Each good file's line on stdout, one `error: FILE: why` line per bad file on stderr, exit 2, and the
    --output JSON lists both."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    paths = bad_and_good_files(tmp_path)
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main.main(["--load-model", str(good_model), "--output", "r.json", "--predict",
                      *(path.name for path in paths)])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err and "unexpected" not in captured.err and "Warning" not in captured.err
    printed = [line.split(":")[0] for line in captured.out.splitlines()]
    assert "seven.png" in printed and "bar.npy" in printed and not set(printed) & set(EXPECTED_ERRORS)
    assert [line for line in captured.err.splitlines() if line.startswith("error:")] == [
        f"error: {name}: {why}" for name, why in EXPECTED_ERRORS.items()]
    written = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert [entry["file"] for entry in written["predictions"]] == [path.name for path in paths]
    assert {entry["file"]: entry["error"] for entry in written["predictions"] if "error" in entry} == EXPECTED_ERRORS
