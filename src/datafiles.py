"""Where MNIST and Fashion-MNIST come from: IDX files in a folder, the download cache, or OpenML.

main.load_data calls these in that order (and falls back to synthetic digits when all fail). Every defect of
a file is a DataError naming it. A leaf module: it never imports main.
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

import numpy as np

from errors import DataError

log = logging.getLogger("numpy_cnn")

OPENML_NAMES = {"mnist": "mnist_784", "fashion_mnist": "Fashion-MNIST"}
OPENML_HOST = "www.openml.org"  # where scikit-learn's fetch_openml downloads from
IDX_FILES = {  # split -> (images, labels), without the optional .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}




def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format, optionally gzipped) into a uint8 array.

    Layout: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions, one big-endian
    uint32 per dimension, then the data. Raises DataError naming the file for anything else.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as error:  # zlib.error: a damaged .gz
        raise DataError(f"{path}: cannot read it ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        magic = raw[:4].hex() if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic number {magic}, "
                        "expected 00000801 for labels or 00000803 for images)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape)
    if len(raw) - header != expected:
        raise DataError(f"{path}: header promises {expected:,} bytes of data for shape {shape}, "
                        f"file holds {len(raw) - header:,} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


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
        raise DataError(f"{folder}: no {IDX_FILES['train'][0]}[.gz] / {IDX_FILES['train'][1]}[.gz] in this folder")
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
    # fail at once instead: that is 5 s of the default run on a machine without internet. (A passing DNS
    # hiccup then costs a synthetic run, loudly labelled, where a retry might have got through.)
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

