"""Reading image files and preparing them as the model's input, for `--predict` and the draw-a-digit page.

open_image() opens an image file of an allowed format (PNG, JPEG, GIF, BMP, WebP) without decoding it;
read_image() reads such a file (through Pillow) or a .npy array as grey values in [0, 1], and
image_from_bytes() does the same for the bytes of an image file (a drawing sent to the server);
prepare_image() turns any such image into what the network saw in training (MNIST's recipe: light ink on
black, cropped to the ink, scaled into 20x20 of 28x28, centred on its centre of mass); predict_files() runs a
model on a list of files. Called by main.py's --predict and by serve.py; it never imports main.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from errors import DataError
from plumbing import log_to_file, versions, write_json

log = logging.getLogger("numpy_cnn")


def as_fraction(grey: np.ndarray, integer: bool, sixteen_bit: bool = False) -> np.ndarray:
    """Grey values as fractions in [0, 1]: of 65535 for 16-bit values (or any above 255), of 255 for 0-255 pixels
    (integers above 1, floats above 2: floats get room for a resampling overshoot), else as they are."""
    if sixteen_bit or grey.max() > 255:
        return np.clip(grey / 65535, 0, 1)
    return np.clip(grey / 255 if grey.max() > (1 if integer else 2) else grey, 0, 1)


def read_image(path: Path) -> np.ndarray:
    """A grayscale image file (PNG, JPEG, ... via Pillow, or .npy) as a 2-D float array in [0, 1].
    Raises DataError with one line naming the file for anything else, including an image of more pixels than
    Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS, about 89 million): a small file can hold a huge image."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise DataError(f"{path}: {'not a regular file' if path.exists() else 'no such image file'}")
    try:
        if path.suffix.lower() == ".npy":
            try:
                return _read_npy(path)
            except DataError as error:
                raise DataError(f"{path}: {error}") from None
        with open(path, "rb") as f:
            return _read_picture(f, None, str(path))
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"{path}: cannot read it as an image ({type(error).__name__}: {_one_line(error)})") from None


def _read_npy(path: Path) -> np.ndarray:
    """A .npy array of grey values (H, W), or (H, W, C) with 1, 3 or 4 channels, as fractions in [0, 1].
    Its header is checked before its data is read (memory-mapped): a file can declare any size."""
    from PIL import Image

    raw = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(raw, np.ndarray):  # np.load reads an .npz archive whatever the file's name
        raw.close()
        raise DataError("is an .npz archive of arrays, not one .npy array")
    if raw.dtype.kind == "c":
        raise DataError("holds complex numbers; expected grey values (real numbers)")
    if raw.dtype.kind not in "biuf":
        raise DataError(f"holds {raw.dtype} values; expected grey values (numbers)")
    if not (raw.ndim == 2 or (raw.ndim == 3 and raw.shape[2] in (1, 3, 4))):
        raise DataError(f"expected a 2-D array (H, W), got shape {raw.shape}")
    if min(raw.shape[:2]) < 1:
        raise DataError(f"is empty (shape {raw.shape})")
    _check_pixels(raw.shape[1], raw.shape[0], Image.MAX_IMAGE_PIXELS)
    image = np.asarray(raw, dtype=np.float64)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=2)
    if not np.isfinite(image).all():
        raise DataError("it holds NaN or infinite values")
    return as_fraction(image, integer=raw.dtype.kind in "iub")


def _one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line of at most `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise DataError(f"{width}x{height} pixels is more than the {max_pixels:,} allowed (a small file can hold a "
                        "huge image)")


def image_from_bytes(data: bytes, max_pixels: int | None = None, what: str = '"image"') -> np.ndarray:
    """The bytes of an image file (PNG, JPEG, GIF, BMP or WebP: see open_image) as a 2-D float array in [0, 1].

    Ink on a transparent background is shown on white, as a screen shows it; a photo's orientation tag is
    applied. `max_pixels` refuses, before decoding, an image with more pixels than that (a small compressed
    file can hold a huge image); Pillow's own limit (PIL.Image.MAX_IMAGE_PIXELS) applies in any case. Raises
    DataError with one line, starting with `what`, for anything that is not such an image.
    """
    return _read_picture(io.BytesIO(data), max_pixels, what)


IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # what Pillow may decode; .npy arrays are read by suffix
FORMAT_NAMES = "PNG, JPEG, GIF, BMP or WebP"
OTHER_FORMATS = {b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"%!PS": "PostScript (EPS)", b"\xc5\xd0\xd3\xc6": "EPS",
                 b"%PDF": "PDF"}  # named in the message when a file is one of these


def open_image(source: str | Path | bytes | Any, what: str, max_pixels: int | None = None) -> Any:
    """An image file (a path, its bytes, or an open binary file) opened by Pillow as a PIL.Image.Image, not yet
    decoded: only the formats of IMAGE_FORMATS are tried (never EPS, which Pillow hands to Ghostscript, nor
    the dozens of others it knows), and an image of more than `max_pixels` pixels (at most Pillow's own limit,
    PIL.Image.MAX_IMAGE_PIXELS) is refused before its pixels are decoded. Raises DataError with one line that
    starts with `what` (a file name, or '"image"' for a drawing) for anything else. Use it as a context manager."""
    from PIL import Image

    # Pillow warns (DecompressionBombWarning) about an image between its limit and twice it, and refuses one
    # beyond: the check below turns both into one DataError line, so the warning itself must not reach the user.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    file = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        picture = Image.open(file, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:  # beyond twice Pillow's limit: refused while opening
        size = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(size.group(1)):,} pixels" if size else "the image"
        raise DataError(f"{what}: {pixels} is more than the {limit:,} allowed (a small file can hold a huge "
                        "image)") from None
    except Image.UnidentifiedImageError:
        kind = _sniff(source)
        raise DataError(f"{what}: {f'is a {kind} file' if kind else 'cannot read it as an image'}; the formats "
                        f"read are {FORMAT_NAMES} (and .npy arrays)") from None
    except OSError as error:
        raise DataError(f"{what}: cannot read it ({error.strerror or _one_line(error)})") from None
    if limit is not None and picture.width * picture.height > limit:
        picture.close()
        raise DataError(f"{what}: {picture.width}x{picture.height} pixels is more than the {limit:,} allowed (a "
                        "small file can hold a huge image)")
    return picture


def _sniff(source: Any) -> str | None:
    """The name of a well-known format that is not read (TIFF, EPS, PDF) from a file's first bytes, else None."""
    try:
        if isinstance(source, (bytes, bytearray)):
            head = bytes(source[:4])
        elif isinstance(source, (str, Path)):
            with open(source, "rb") as f:
                head = f.read(4)
        else:
            source.seek(0)
            head = source.read(4)
    except (OSError, AttributeError, ValueError):
        return None
    return OTHER_FORMATS.get(head)


def _read_picture(file: Any, max_pixels: int | None, what: str = "the image") -> np.ndarray:
    """image_from_bytes for an open binary file (of bytes or on disk, so that a large file is not read whole)."""
    from PIL import Image, ImageOps

    with open_image(file, what, max_pixels) as picture:
        try:
            # A phone photo is stored sideways with a tag saying how to turn it.
            upright = ImageOps.exif_transpose(picture)
            if upright.mode in ("RGBA", "LA", "PA") or "transparency" in upright.info:
                # Ink on a transparent background, as drawing apps save it: show it on white, as a screen does.
                upright = Image.alpha_composite(Image.new("RGBA", upright.size, "white"), upright.convert("RGBA"))
            if upright.mode.startswith("I") or upright.mode == "F":  # 16/32-bit or float greys: convert("L") clips
                grey = np.asarray(upright, dtype=np.float64)
                if not np.isfinite(grey).all():
                    raise DataError(f"{what}: it holds NaN or infinite values")
                return as_fraction(grey, integer=upright.mode != "F", sixteen_bit=upright.mode.startswith("I;16"))
            return np.asarray(upright.convert("L"), dtype=np.float64) / 255
        except DataError:
            raise
        except Exception as error:
            raise DataError(f"{what}: cannot read it as an image ({type(error).__name__}: {_one_line(error)})") \
                from None


def decode(path: Path, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """One image file as uint8 (H, W) grey or (H, W, 3) RGB, resized to size (height, width) unless None; and
    its own size (height, width). Transparent pixels are composited on white, palettes converted, a GIF's first
    frame taken. Raises DataError (or Pillow's error) for a file that is not such an image."""
    from PIL import Image

    if path.suffix.lower() != ".npy":
        with open_image(path, str(path)) as picture:  # closed at once: a folder can hold 60,000 files
            picture.load()
            return fit_picture(picture, size)
    array = np.load(path, mmap_mode="r", allow_pickle=False)  # its header is checked before its data is read
    if (not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf"
            or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3)))):
        raise DataError("expected one .npy array of numbers of shape (H, W) or (H, W, 1 or 3)")
    _check_pixels(array.shape[1], array.shape[0], Image.MAX_IMAGE_PIXELS)
    values = np.asarray(array, dtype=np.float64)
    if not np.isfinite(values).all() or values.size == 0:
        raise DataError("is empty or holds NaN or infinite values")
    pixels = (as_fraction(values, integer=array.dtype.kind in "biu") * 255).round().astype(np.uint8)
    return fit_picture(Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels), size)


def fit_picture(picture: Any, size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int]]:
    """decode() for an open Pillow image."""
    from PIL import Image

    if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
        picture = Image.alpha_composite(Image.new("RGBA", picture.size, "white"), picture.convert("RGBA"))
    picture = picture.convert("L" if picture.mode in ("1", "L", "I", "I;16", "F") else "RGB")
    own = (picture.height, picture.width)
    if size is not None and own != tuple(size):
        picture = picture.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(picture), own


def picture_from_bytes(data: bytes, size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """The bytes of a PNG, JPEG, GIF, BMP or WebP file as decode() reads a file: uint8 grey (H, W) or RGB
    (H, W, 3), resized to size (height, width). `max_pixels` refuses a larger image before decoding it.
    DataError with one line for anything else."""
    picture = open_image(data, '"image"', max_pixels)
    try:
        picture.load()
        return fit_picture(picture, size)[0]
    except Exception as error:
        raise DataError(f'"image": cannot read it as an image ({type(error).__name__}: {_one_line(error)})') from None


def grey_of(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) -> grey uint8 (...), with Pillow's ITU-R 601 weights and rounding (convert('L'))."""
    weighted = rgb[..., 0] * np.uint32(19595) + rgb[..., 1] * np.uint32(38470) + rgb[..., 2] * np.uint32(7471)
    return ((weighted + 0x8000) >> 16).astype(np.uint8)


def prepare_image(image: np.ndarray, input_shape: tuple[int, int, int], fill: float = 20 / 28) -> np.ndarray:
    """Turn any grayscale image into what the model saw in training: (H, W, 1) float32 in [0, 1].

    A light background (a digit drawn dark on white) is inverted, since MNIST digits are light on black.
    An image of the model's size is then taken as it is. Any other image (a drawing, a photo) is stretched so
    that its background is 0 and its brightest ink 1 (a photo of grey paper is not black), cropped to its
    ink, scaled so that its longer side fills `fill` of the frame (MNIST fitted each digit into 20x20 of
    28x28) and centred on its centre of mass, as MNIST was made.
    """
    from PIL import Image

    height, width = input_shape[:2]
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    if np.median(border) > 0.5:
        image, border = 1 - image, 1 - border
    if image.shape != (height, width):
        background = np.percentile(border, 90)
        image = np.clip((image - background) / max(image.max() - background, 1e-6), 0, 1)
        ink = np.argwhere(image > 0.2)
        if len(ink):
            (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0) + 1
            image = image[top:bottom, left:right]
        scale = fill * min(height / image.shape[0], width / image.shape[1])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        resized = np.asarray(Image.fromarray(image.astype(np.float32)).resize(size, Image.BILINEAR))
        resized = np.clip(resized, 0, 1)
        framed = np.zeros((height, width), dtype=np.float32)
        mass = resized.sum()
        rows, cols = np.indices(resized.shape)
        centre_r = (rows * resized).sum() / mass if mass > 0 else resized.shape[0] / 2
        centre_c = (cols * resized).sum() / mass if mass > 0 else resized.shape[1] / 2
        top = int(np.clip(round(height / 2 - centre_r), 0, height - resized.shape[0]))
        left = int(np.clip(round(width / 2 - centre_c), 0, width - resized.shape[1]))
        framed[top:top + resized.shape[0], left:left + resized.shape[1]] = resized
        image = framed
    return image.astype(np.float32)[..., None]


def model_input(picture: np.ndarray, channels: int) -> tuple[np.ndarray, str | None]:
    """A decoded uint8 picture, grey (H, W) or RGB (H, W, 3), as a model input (H, W, channels) float32 in
    [0, 1]; and a note when its colour had to change for the model (None when it did not)."""
    in_colour = picture.ndim == 3 and not (picture == picture[..., :1]).all()
    if channels == 1:
        grey = grey_of(picture) if picture.ndim == 3 else picture
        note = "it is in colour: the grey model sees it in grey" if in_colour else None
        return (grey.astype(np.float32) / 255)[..., None], note
    rgb = picture if picture.ndim == 3 else np.repeat(picture[..., None], 3, axis=2)
    note = None if picture.ndim == 3 else "it is grey: the colour model sees the same grey in red, green and blue"
    return rgb.astype(np.float32) / 255, note


def prepare_file(path: Path, preprocess: dict, input_shape: tuple[int, int, int]) -> tuple[np.ndarray, str | None]:
    """An image file as the model's input (H, W, C) float32 in [0, 1], prepared as the model's preprocess
    record says (preprocess_record), and a note when its colour was converted for the model. DataError (one
    line naming the file) for a file that is not a usable image."""
    path = Path(path)
    if preprocess["method"] == "digit":
        image = prepare_image(read_image(path), input_shape, preprocess.get("fill", 20 / 28))
        try:
            _, note = model_input(decode(path, None)[0], 1)
        except Exception:  # read_image read it (a 16-bit or float image that decode does not take): it is grey
            note = None
        return image, note
    try:
        return model_input(decode(path, (input_shape[0], input_shape[1]))[0], input_shape[2])
    except DataError as error:
        raise DataError(f"{path}: {str(error).removeprefix(f'{path}: ')}") from None
    except Exception as error:
        raise DataError(f"{path}: cannot read it as an image ({type(error).__name__}: {_one_line(error)})") from None


def predict_files(model: Any, paths: list[Path], class_names: list[str], preprocess: dict) -> list[dict]:
    """One result per image file, in order: {"file", "top": the top-3 classes with probabilities} (with a
    "warning" for a digit image with no ink, a "note" for a colour conversion), or {"file", "error": one line
    saying why it cannot be read} for a file that is not a usable image, so that one bad file does not cost the
    predictions of the others. preprocess: the model's record (preprocess_record)."""
    results: list[dict] = []
    prepared: list[tuple[dict, np.ndarray]] = []
    for path in paths:
        result: dict = {"file": str(path)}
        try:
            image, note = prepare_file(path, preprocess, model.input_shape)
        except DataError as error:
            message = str(error)
            result["error"] = message.removeprefix(f"{path}: ")
        else:
            prepared.append((result, image))
            if note:
                result["note"] = note
        results.append(result)
    if prepared:
        probabilities = model.predict_proba(np.stack([image for _, image in prepared]))
        for (result, image), probs in zip(prepared, probabilities):
            top = np.argsort(probs)[::-1][:3]
            result["top"] = [{"class": class_names[i], "probability": float(probs[i])} for i in top]
            if preprocess["method"] == "digit" and image.max() < 0.05:
                result["warning"] = "the image is blank (no ink found): the prediction means nothing"
    return results


def ink_fill(dataset: str | None) -> float:
    """How much of the frame a drawn or photographed image's ink should fill to look like the training images:
    MNIST fitted its digits into 20x20 pixels of 28x28 (and the synthetic digits copy it); the others fill it."""
    return 20 / 28 if dataset in ("mnist", "synthetic") else 1.0


def preprocess_record(dataset: str | None, input_shape: tuple[int, ...]) -> dict:
    """How an image file becomes the model's input, as the model file records it (and --predict, the page and
    an export apply it). 'digit': MNIST's recipe for grey digit models (a light background inverted, cropped to
    the ink, its longer side scaled to `fill` of the frame, centred on its centre of mass: images.prepare_image).
    'resize': a folder model's, the whole picture resized to `size` [height, width] (bilinear) in `color`."""
    if dataset == "folder" or input_shape[2] != 1:
        return {"method": "resize", "size": [int(input_shape[0]), int(input_shape[1])], "filter": "bilinear",
                "color": "rgb" if input_shape[2] == 3 else "grey"}
    return {"method": "digit", "fill": ink_fill(dataset), "color": "grey"}


def preprocess_of(meta: dict, input_shape: tuple[int, ...]) -> dict:
    """The model file's preprocess record; for a file written before models recorded it, what it then was."""
    record = meta.get("preprocess")
    known = isinstance(record, dict) and record.get("method") in ("digit", "resize")
    fits = known and (record["method"] == "resize" or input_shape[2] == 1)  # the digit recipe makes grey images
    return record if fits else preprocess_record(meta.get("dataset"), input_shape)


def report_predictions(model: Any, meta: dict, paths: list[Path], model_path: str, output: str | None) -> bool:
    """--predict's output: one line per image on stdout (its three likeliest classes), or one `error: FILE: why`
    line on stderr for a file that cannot be read; --output lists every file, its top classes or its error.
    Returns whether every file could be read."""
    predictions = predict_files(model, paths, meta["class_names"], preprocess_of(meta, model.input_shape))
    failed = [prediction for prediction in predictions if "error" in prediction]
    for prediction in predictions:
        if "error" in prediction:
            sys.stdout.flush()  # keep the lines in order when stdout and stderr go to the same terminal or file
            print(f"error: {prediction['file']}: {prediction['error']}", file=sys.stderr, flush=True)
            log_to_file(logging.ERROR, f"{prediction['file']}: {prediction['error']}")
            continue
        ranked = ", ".join(f"{t['class']} ({100 * t['probability']:.1f}%)" for t in prediction["top"])
        print(f"{prediction['file']}: {ranked}")
        if "note" in prediction:
            log.info("note: %s: %s", prediction["file"], prediction["note"])
        if "warning" in prediction:
            log.warning("%s: %s", prediction["file"], prediction["warning"])
        log_to_file(logging.INFO, f"prediction {prediction['file']}: {ranked}")
    if output:
        status = "predicted" if not failed else "failed" if len(failed) == len(predictions) else "partly predicted"
        write_json(output, {"status": status, "model": model_path, "predictions": predictions,
                            "failed_files": len(failed), "versions": versions()})
    return not failed
