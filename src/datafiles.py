"""Where the images come from: IDX files in a folder, the download cache, OpenML, or synthetic digits.

main.load_data tries the first three in that order for MNIST and Fashion-MNIST, and falls back to the
synthetic seven-segment digits drawn here when all fail (or when the config asks for them). Every defect of a
file is a DataError naming it. A leaf module: it never imports main.
"""

from __future__ import annotations

import gzip
import logging
import math
import socket
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from errors import DataError

log = logging.getLogger("numpy_cnn")

OPENML_NAMES = {"mnist": "mnist_784", "fashion_mnist": "Fashion-MNIST"}
OPENML_HOST = "www.openml.org"  # where scikit-learn's fetch_openml downloads from
IDX_FILES = {  # split -> (images, labels), without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


MAX_IDX_BYTES = 1 << 30  # the data an IDX file may declare: MNIST's training images are 47 MB
IDX_CHUNK = 1 << 22  # bytes read (and, for .gz, decompressed) at a time


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a uint8 array.

    Layout: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, one big-endian
    uint32 per dimension, then the data. The header is read and checked first, a declared size beyond
    MAX_IDX_BYTES is refused before any data is read, and then exactly the declared bytes are read, plus one
    to find out whether more follow: a .gz file is never decompressed further than that (a gzip bomb of
    zeros stops at once). Raises DataError naming the file for anything else, with one line.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = _read_up_to(f, 4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08 or not 1 <= head[3] <= 3:
                magic = head.hex() if len(head) >= 4 else f"only {len(head)} bytes"
                raise DataError(f"{path}: not an IDX file of unsigned bytes (magic number {magic}, "
                                "expected 00000801 for labels or 00000803 for images)")
            ndim = head[3]
            dims = _read_up_to(f, 4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataError(f"{path}: truncated header ({4 + len(dims)} bytes)")
            shape = struct.unpack(f">{ndim}I", dims)
            expected = math.prod(shape)
            if expected > MAX_IDX_BYTES:
                raise DataError(f"{path}: header declares shape {shape}, {expected:,} bytes of data, more than the "
                                f"{MAX_IDX_BYTES:,} an IDX file may hold here (corrupt, or not an MNIST-like set)")
            data = np.empty(expected, dtype=np.uint8)
            held = _read_into(f, memoryview(data))
            more = held == expected and len(_read_up_to(f, 1)) > 0
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as error:  # zlib.error, EOFError: a damaged or truncated .gz
        raise DataError(f"{path}: cannot read it ({error})") from None
    if held < expected:
        raise DataError(f"{path}: header promises {expected:,} bytes of data for shape {shape}, "
                        f"file holds {held:,} (truncated or corrupt)")
    if more:
        extra = "" if path.suffix == ".gz" else f" ({path.stat().st_size - 4 - 4 * ndim - expected:,} more)"
        raise DataError(f"{path}: header promises {expected:,} bytes of data for shape {shape}, file holds more"
                        f"{extra} (corrupt, or not what its header says)")
    return data.reshape(shape)


def _read_up_to(f: Any, size: int) -> bytes:
    """`size` bytes from f, fewer only at its end (a read may return less than asked before the end)."""
    parts, held = [], 0
    while held < size:
        part = f.read(size - held)
        if not part:
            break
        parts.append(part)
        held += len(part)
    return b"".join(parts)


def _read_into(f: Any, target: memoryview) -> int:
    """Fill target from f, IDX_CHUNK bytes at a time; returns how many bytes f had (fewer only at its end)."""
    held = 0
    while held < len(target):
        part = f.read(min(IDX_CHUNK, len(target) - held))
        if not part:
            break
        target[held:held + len(part)] = part
        held += len(part)
    return held


def _find_idx(folder: Path, stem: str) -> Path | None:
    # Besides the standard names, accept the 'train-images.idx3-ubyte' spelling some archives use.
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_idx_split(folder: Path, split: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray] | None:
    """Images (N, H, W) uint8 and labels (N,) of one split from an IDX folder; None if its files are absent."""
    image_stem, label_stem = IDX_FILES[split]
    image_path, label_path = _find_idx(folder, image_stem), _find_idx(folder, label_stem)
    if image_path is None and label_path is None:
        return None
    if image_path is None or label_path is None:
        present, missing = (image_path, label_stem) if label_path is None else (label_path, image_stem)
        raise DataError(f"{folder}: found {present.name} but not {missing}[.gz] beside it")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3:
        raise DataError(f"{image_path}: expected images of 3 dimensions (N, H, W), found shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{label_path}: expected labels of 1 dimension (N,), found shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{image_path.name} holds {len(images):,} images but {label_path.name} "
                        f"holds {len(labels):,} labels")
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{label_path}: label {int(labels.max())} is out of range 0..{num_classes - 1}")
    return images, labels


def load_idx_folder(folder: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """(train, test) from a folder of IDX files; test is None when the folder has no t10k files."""
    if not folder.is_dir():
        raise DataError(f"data.path (--data-path): {folder} is not a folder")
    train = load_idx_split(folder, "train")
    if train is None:
        raise DataError(f"{folder}: no {IDX_FILES['train'][0]}[.gz] / {IDX_FILES['train'][1]}[.gz] in this folder, "
                        "and no class folders of images (<class>/*.png)")
    test = load_idx_split(folder, "test")
    if test is not None and test[0].shape[1:] != train[0].shape[1:]:
        raise DataError(f"{folder}: test images are {test[0].shape[1:]} but training images {train[0].shape[1:]}")
    return train, test


def load_cache(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """The .npz written after a successful download, or None (with a warning) if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = [archive[key] for key in ("x_train", "y_train", "x_test", "y_test")]
    except Exception as error:  # any damage means: ignore the cache and download again
        log.warning("ignoring the unreadable cache %s (%s)", path, error)
        return None
    for images, labels in (arrays[:2], arrays[2:]):
        if (images.shape[1:] != (28, 28) or images.dtype != np.uint8 or labels.shape != images.shape[:1]
                or labels.dtype.kind not in "iu" or (len(labels) and labels.max() > 9)):
            log.warning("ignoring the cache %s: it does not hold 28x28 uint8 images with labels 0-9", path)
            return None
    return (arrays[0], arrays[1]), (arrays[2], arrays[3])


def download_openml(name: str, cache_dir: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """MNIST or Fashion-MNIST from OpenML: the first 60,000 rows are the official training split,
    the last 10,000 the test split. Imported lazily: scikit-learn takes a second to import."""
    import urllib.request

    # Offline, fetch_openml fails only after scikit-learn's import and three retries a second apart; when
    # the host's name does not resolve (and no proxy would resolve it, and scikit-learn has no files cached),
    # fail at once instead, rather than keep a machine without internet waiting. (A passing DNS hiccup then costs
    # a synthetic run, loudly labelled, where a retry might have got through.)
    if not urllib.request.getproxies().get("https") and not (cache_dir / "openml").exists():
        try:
            socket.getaddrinfo(OPENML_HOST, 443)
        except OSError as error:
            raise ConnectionError(f"cannot look up {OPENML_HOST}: {error}") from None
    from sklearn.datasets import fetch_openml

    log.info("downloading %s from OpenML (the first download and parse can take a minute) ...", OPENML_NAMES[name])
    with warnings.catch_warnings():  # scikit-learn warns at each retry; the failure itself is reported below
        warnings.simplefilter("ignore")
        bunch = fetch_openml(OPENML_NAMES[name], version=1, as_frame=False, parser="liac-arff",
                             data_home=str(cache_dir))
    images = np.asarray(bunch.data, dtype=np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(bunch.target).astype(np.uint8)
    return (images[:60000], labels[:60000]), (images[60000:], labels[60000:])


# The seven segments of a pocket-calculator display, as (x0, y0, x1, y1) in a unit box (y downwards),
# and which segments light up for each digit: the synthetic fallback draws these, so it has real
# class structure (and the same labels as MNIST) while needing no download.
SEGMENTS = np.array([(0, 0, 1, 0), (1, 0, 1, .5), (1, .5, 1, 1), (0, 1, 1, 1),
                     (0, .5, 0, 1), (0, 0, 0, .5), (0, .5, 1, .5)], dtype=np.float32)
SEGMENTS_ON = np.array([[1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0], [1, 1, 0, 1, 1, 0, 1],
                        [1, 1, 1, 1, 0, 0, 1], [0, 1, 1, 0, 0, 1, 1], [1, 0, 1, 1, 0, 1, 1],
                        [1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1],
                        [1, 1, 1, 1, 0, 1, 1]], dtype=bool)


def make_synthetic(n: int, rng: np.random.Generator, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic digits (see draw_seven_segments), drawn 1,000 at a time to keep the temporaries small."""
    chunks = [draw_seven_segments(min(1000, n - start), rng, size) for start in range(0, n, 1000)]
    if not chunks:
        return np.zeros((0, size, size), dtype=np.uint8), np.zeros(0, dtype=np.uint8)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def draw_seven_segments(n: int, rng: np.random.Generator, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """n seven-segment digits (uint8 images (n, size, size), labels (n,)) with random size, slant, stroke
    width, segment brightness and noise, centred on their centre of mass give or take 1.5 pixels, as MNIST's
    digits are (and as prepare_image centres image files). About 1 digit in 10 misses a segment, which can
    make it another digit (an 8 without its middle is a 0): like handwriting, not every image is certain.
    """
    labels = rng.integers(0, 10, n)
    width, height = rng.uniform(7, 12, (n, 1)), rng.uniform(14, 20, (n, 1))
    slant, stroke = rng.uniform(-0.25, 0.25, (n, 1)), rng.uniform(0.8, 2.0, (n, 1))
    lit = SEGMENTS_ON[labels] & (rng.random((n, len(SEGMENTS))) > 0.02)  # (n, 7): each segment drops out 2%
    brightness = rng.uniform(0.5, 1.0, (n, len(SEGMENTS))) * lit
    x0, y0, x1, y1 = SEGMENTS.T  # each (7,)
    # Segment end points (n, 7) of a digit whose box starts at (0, 0); slant shifts x in proportion to
    # the height above the middle.
    ax, ay = width * x0 + slant * height * (0.5 - y0), height * y0
    bx, by = width * x1 + slant * height * (0.5 - y1), height * y1
    # Centre of mass: the lit segments' midpoints weighted by their lengths. Move it to the middle.
    mass = np.hypot(bx - ax, by - ay) * brightness + 1e-6  # + 1e-6: a digit with no segment left
    centre_x = (mass * (ax + bx) / 2).sum(axis=1, keepdims=True) / mass.sum(axis=1, keepdims=True)
    centre_y = (mass * (ay + by) / 2).sum(axis=1, keepdims=True) / mass.sum(axis=1, keepdims=True)
    shift_x = size / 2 - centre_x + rng.uniform(-1.5, 1.5, (n, 1))
    shift_y = size / 2 - centre_y + rng.uniform(-1.5, 1.5, (n, 1))
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((n, size, size), dtype=np.float32)
    # The drawing below touches every pixel of every digit: float32 halves its memory traffic.
    ax, ay, bx, by = (end.astype(np.float32) for end in (ax + shift_x, ay + shift_y, bx + shift_x, by + shift_y))
    stroke, brightness = stroke.astype(np.float32), brightness.astype(np.float32)
    for segment in range(len(SEGMENTS)):
        start_x, start_y = ax[:, segment, None, None], ay[:, segment, None, None]
        dx, dy = (bx - ax)[:, segment, None, None], (by - ay)[:, segment, None, None]
        # Distance from every pixel to the segment: project onto it, clip to its ends.
        t = np.clip(((cols - start_x) * dx + (rows - start_y) * dy) / (dx * dx + dy * dy), 0, 1)
        distance = np.hypot(cols - (start_x + t * dx), rows - (start_y + t * dy))
        ink = np.clip(stroke[:, :, None] + 0.5 - distance, 0, 1) * brightness[:, segment, None, None]
        np.maximum(images, ink, out=images)
    images += rng.normal(0, 0.08, images.shape).astype(np.float32)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.uint8)


MEAN_BRIGHTNESS = {"mnist": 0.1307, "fashion_mnist": 0.2860}  # of each training set's pixels, as fractions of 255


def check_dataset_name(name: str, folder: Path, images: np.ndarray) -> None:
    """A warning when a folder's IDX images look like the other data set than `name` says: MNIST and
    Fashion-MNIST use the same file names, but a garment covers far more of its frame than a digit (mean
    brightness 0.29 against 0.13), so --data-path at Fashion-MNIST with the default dataset would train on
    clothes labelled as digits."""
    if name not in MEAN_BRIGHTNESS or len(images) < 100:  # too few images to judge
        return
    brightness = float(images[:1000].mean()) / 255
    other = min(MEAN_BRIGHTNESS, key=lambda candidate: abs(MEAN_BRIGHTNESS[candidate] - brightness))
    if other != name and abs(brightness - MEAN_BRIGHTNESS[other]) < 0.05:  # other data sets are neither
        log.warning("%s: these images look like %s, not %s (mean brightness %.2f; %s's is %.2f): add --dataset %s "
                    "if they are", folder, other, name, brightness, other, MEAN_BRIGHTNESS[other], other)
