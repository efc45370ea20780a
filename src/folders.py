"""Your own images: a folder with one subfolder of pictures per class, as torchvision's ImageFolder reads it.

    DIR/<class>/*.png                          a seeded, stratified split holds out the test images
    DIR/train/<class>/...  DIR/test/<class>/...   the test images are given

Class names are the folder names sorted as text ("10_shirt" comes before "2_coat": number them 00_, 01_, ...
to keep an order), and files are read in name order within each class. PNG, JPEG, BMP, GIF (its first frame),
WebP and .npy arrays are read; any other file is ignored. Each image is made the configured size (Pillow's
bilinear filter, which averages the pixels it shrinks) and colour (grey, or RGB with transparent pixels shown on
white). The decoded arrays are cached as one .npz keyed by the file list, sizes, modification times and
settings, so the second run of a large folder starts at once. main.load_data calls load_folder; a leaf module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from errors import DataError
from images import decode, grey_of
from plumbing import ProgressBar, plural, write_atomic

log = logging.getLogger("numpy_cnn")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".npy")
IDX_PREFIXES = ("train-images", "train-labels", "t10k-images", "t10k-labels")
CACHE_VERSION = 1  # bump when the decoding changes, so that old caches are not read as new ones
DEFAULT_TEST_SHARE = 0.2  # of a folder without test/: the share held out when neither n_test nor test_fraction is set


@dataclass
class FolderImages:
    """What load_folder read: uint8 images (N, H, W) grey or (N, H, W, 3) RGB with labels (N,), per split."""

    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    class_names: list[str]
    color: str  # grey or rgb
    source: str  # "folder", or "cache" when the decoded arrays came from the cache
    note: str
    skipped: list[str] = field(default_factory=list)  # "file: why" for each unreadable file


def is_folder_source(folder: Path) -> bool:
    """Whether `folder` holds class folders (directly, or under train/) and no IDX files."""
    if not folder.is_dir() or any(f.name.startswith(IDX_PREFIXES) for f in folder.iterdir()):
        return False
    return bool(_subfolders(folder / "train" if (folder / "train").is_dir() else folder))


def uses_folder(data_cfg: dict) -> bool:
    """Whether the data config reads a folder of class folders: dataset folder, or a data.path that holds them."""
    return data_cfg["dataset"] == "folder" or bool(data_cfg["path"] and is_folder_source(Path(data_cfg["path"])))


def check_dataset_flag(dataset_flag: str | None, path: str | None) -> None:
    """A --dataset flag other than `folder` for a --data-path of class folders contradicts it: DataError."""
    if dataset_flag and dataset_flag != "folder" and path and is_folder_source(Path(path)):
        raise DataError(f"--dataset {dataset_flag}: but --data-path {path} holds class folders of images; "
                        "use --dataset folder, or leave --dataset out")


def _subfolders(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def list_images(folder: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and, per split ('train', and 'test' when DIR/test exists), (file, label) in reading order.
    DataError with one line for a folder that cannot be a data set: no class folders, only one, a class folder
    with no image files, or a test/ whose classes are not those of train/."""
    if not folder.is_dir():
        raise DataError(f"data.path (--data-path): {folder} is not a folder")
    root = folder / "train" if (folder / "train").is_dir() else folder
    classes = _subfolders(root)
    kinds = ", ".join(suffix.lstrip(".") for suffix in IMAGE_SUFFIXES)
    if not classes:
        raise DataError(f"{root}: no class folders in it; put the images of each class in a folder of its own "
                        f"({root}/<class>/*.png)")
    if len(classes) == 1:
        raise DataError(f"{root}: only one class folder ({classes[0].name}); a classifier needs two or more")
    names = [d.name for d in classes]
    odd = next((name for name in names if len(name) > 100 or not name.isprintable()), None)
    if odd is not None:
        raise DataError(f"{root}: class folder {odd[:40]!r}: a class name is at most 100 printable characters")
    splits = {"train": root}
    if root != folder and (folder / "test").is_dir():
        test_names = [d.name for d in _subfolders(folder / "test")]
        if test_names != names:
            different = sorted(set(test_names) ^ set(names))[:3]
            raise DataError(f"{folder}: the class folders of test/ and train/ differ ({', '.join(different)}); "
                            "both need the same classes")
        splits["test"] = folder / "test"
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, split_root in splits.items():
        files[split] = []
        for label, name in enumerate(names):
            with os.scandir(split_root / name) as entries:  # is_file() from the listing: no stat per file
                found = sorted((Path(entry.path) for entry in entries if entry.name.lower().endswith(IMAGE_SUFFIXES)
                                and not entry.name.startswith(".") and entry.is_file()), key=lambda f: f.name)
            if not found and split == "train":
                raise DataError(f"{split_root / name}: no image files in this class folder ({kinds})")
            files[split] += [(f, label) for f in found]
    return names, files


def _decode_all(files: list[tuple[Path, int]], size: tuple[int, int] | None, label: str,
                skipped: list[str]) -> tuple[list[np.ndarray], list[int], tuple[int, int] | None]:
    """Decode every file (a progress bar on a terminal), adding 'file: why' to skipped for each unreadable one.
    With size None the first image's size is taken, and an image of another size is a DataError."""
    images, labels, first = [], [], None
    with ProgressBar(len(files), label, stream=None) as bar:
        for done, (path, class_index) in enumerate(files, 1):
            try:
                image, own = decode(path, size)
            except Exception as error:  # a damaged or foreign file: skipped, and named in the warning
                why = str(error).removeprefix(f"{path}: ")
                skipped.append(f"{path}: {why or type(error).__name__}")
                continue
            if size is None:
                if first is not None and own != first[1]:
                    raise DataError(f"{first[0]} is {first[1][0]}x{first[1][1]} but {path} is {own[0]}x{own[1]} "
                                    "(height x width); set data.image_size (--image-size 32 or HxW) to resize all")
                first = first or (path, own)
            images.append(image)
            labels.append(class_index)
            bar.update(done)
    return images, labels, size or (first[1] if first else None)


def _stack(images: list[np.ndarray], color: str) -> np.ndarray:
    """A list of grey (H, W) and RGB (H, W, 3) uint8 images as one array of the chosen colour mode."""
    if color == "rgb":
        return np.stack([np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image for image in images])
    return np.stack([grey_of(image) if image.ndim == 3 else image for image in images])


def cache_key(folder: Path, files: dict[str, list[tuple[Path, int]]], size: Any, color: Any) -> str:
    """A hash of every file's path, size and modification time, and of the settings that shape the arrays."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, str(folder.resolve()), size, color]).encode())
    for split, entries in files.items():
        for path, label in entries:
            stat = os.stat(path)
            digest.update(f"{split}\0{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        missing = {"x_train", "y_train", "x_test", "y_test", "class_names", "color", "skipped"} - set(arrays)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
        return arrays
    except Exception as error:  # a damaged cache is rebuilt, not fatal
        log.warning("%s: cannot read the cache (%s); decoding the images again", path, type(error).__name__)
        return None


def decoded_arrays(folder: Path, size: list[int] | None, color: str | None, cache_dir: Path) -> dict:
    """The folder's images decoded (from the cache when it matches): x_train, y_train, x_test, y_test (empty
    when there is no test/), class_names, color, skipped and source ('cache' or 'folder')."""
    names, files = list_images(folder)
    cache = cache_dir / f"folder-{cache_key(folder, files, size, color)}.npz"
    start = time.perf_counter()
    arrays = _read_cache(cache)
    if arrays is not None:
        log.info("data: %s decoded images from the cache %s in %.1fs",
                 f"{len(arrays['y_train']) + len(arrays['y_test']):,}", cache, time.perf_counter() - start)
        return {**arrays, "class_names": [str(n) for n in arrays["class_names"]], "color": str(arrays["color"]),
                "skipped": [str(s) for s in arrays["skipped"]], "source": "cache"}
    skipped: list[str] = []
    target = tuple(size) if size else None
    images, labels, target = _decode_all(files["train"], target, f"decoding {folder}", skipped)
    test_images, test_labels, _ = _decode_all(files.get("test", []), target, "decoding test/", skipped)
    total = sum(len(entries) for entries in files.values())
    if not images:
        raise DataError(f"{folder}: none of its {total:,} image files could be read (first: {skipped[0]})")
    empty = sorted(set(range(len(names))) - set(labels))
    if empty:
        raise DataError(f"{folder}: class folder {names[empty[0]]} has no readable image")
    if color is None:
        color = "rgb" if any(image.ndim == 3 and not (image == image[..., :1]).all()
                             for image in images + test_images) else "grey"
    x_train = _stack(images, color)
    x_test = _stack(test_images, color) if test_images else np.zeros((0, *x_train.shape[1:]), np.uint8)
    arrays = {"x_train": x_train, "y_train": np.array(labels, np.int64), "x_test": x_test,
              "y_test": np.array(test_labels, np.int64), "class_names": np.array(names), "color": np.array(color),
              "skipped": np.array(skipped, dtype=str)}
    log.info("data: decoded %s images of %s in %.1fs", f"{total - len(skipped):,}", folder,
             time.perf_counter() - start)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(cache, lambda f: np.savez(f, **arrays))
    except OSError as error:
        log.warning("could not write the cache %s (%s): the next run decodes the images again", cache,
                    error.strerror or error)
    return {**arrays, "class_names": names, "color": color, "skipped": skipped, "source": "folder"}


def stratified_split(labels: np.ndarray, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: n_test held out at random, each class giving its share of them (rounded by largest
    remainders, so that the shares add up to n_test); both sorted."""
    classes, counts = np.unique(labels, return_counts=True)
    shares = counts * n_test / len(labels)
    take = np.floor(shares).astype(int)
    take[np.argsort(take - shares)[:n_test - take.sum()]] += 1
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    test = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), test), test


def _draw(images: np.ndarray, labels: np.ndarray, n: int | None, rng: np.random.Generator,
          what: str) -> tuple[np.ndarray, np.ndarray]:
    """n images drawn at random without replacement (all of them, in random order, for None), as main draws
    from IDX files: the same seed draws the same images from the same arrays."""
    n = len(images) if n is None else n
    if n > len(images):
        raise DataError(f"{what} = {n:,} but the folder holds only {len(images):,} such images; set it to at most "
                        f"{len(images):,}, or to null for all of them")
    chosen = rng.choice(len(images), n, replace=False)
    return images[chosen], labels[chosen]


def load_folder(data_cfg: dict, rng: np.random.Generator) -> FolderImages:
    """The data set of data_cfg['path'] with data_cfg's image_size, color, n_train (+ n_val), n_test and
    test_fraction; rng draws the images as main draws them from IDX files."""
    if not data_cfg["path"]:
        raise DataError("data.dataset folder needs data.path (--data-path DIR): a folder with one subfolder of "
                        "images per class")
    folder = Path(data_cfg["path"])
    arrays = decoded_arrays(folder, data_cfg["image_size"], data_cfg["color"], Path(data_cfg["cache_dir"]))
    skipped, names = arrays["skipped"], arrays["class_names"]
    log.info("data: classes (folder names, sorted as text): %s%s", ", ".join(names[:20]),
             f", ... ({len(names)} in all)" if len(names) > 20 else "")
    if skipped:
        log.warning("skipped %s that could not be read: %s%s", plural(len(skipped), "file"), "; ".join(skipped[:3]),
                    "; ..." if len(skipped) > 3 else "")
    n_train = None if data_cfg["n_train"] is None else data_cfg["n_train"] + data_cfg["n_val"]
    images, labels = arrays["x_train"], arrays["y_train"]
    if len(arrays["y_test"]):
        train = _draw(images, labels, n_train, rng, "data.n_train (+ n_val)")
        test = _draw(arrays["x_test"], arrays["y_test"], data_cfg["n_test"], rng, "data.n_test")
        note = f"class folders in {folder}/train and {folder}/test"
    else:
        fraction = data_cfg["test_fraction"]
        n_test = (round(fraction * len(labels)) if fraction is not None else data_cfg["n_test"]
                  or round(DEFAULT_TEST_SHARE * len(labels)))
        if not 1 <= n_test < len(labels):
            raise DataError(f"data.n_test = {n_test:,}: the folder holds {len(labels):,} images, and some must "
                            f"be left for training; set data.n_test or data.test_fraction lower")
        kept, held = stratified_split(labels, n_test, rng)
        train = _draw(images[kept], labels[kept], n_train, rng, "data.n_train (+ n_val)")
        test = images[held], labels[held]
        note = f"class folders in {folder}; {n_test:,} images held out as the test set (stratified)"
    if skipped:
        note += f"; {plural(len(skipped), 'unreadable file')} skipped"
    return FolderImages(train, test, names, arrays["color"], arrays["source"], note, skipped)
