"""Images as users really make them, for --predict: transparent drawings, rotated phone photos, grey paper,
broken arrays and blank images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import config_schema
import errors
import images
import main


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
