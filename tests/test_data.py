"""Data sources: IDX files (plain and gzipped), the OpenML download and its cache, synthetic digits, folders of
pictures, and augmentation."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import struct
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import (
    CLASS_FOLDER_NAMES,
    ROOT,
    SMALL_FOLDER_MODEL,
    assert_one_error_line,
    idx_bytes,
    run_cli,
    run_limited,
    sample_digits,
    small_config_file,
    write_class_folders,
    write_config,
    write_idx,
    write_idx_split,
)
from PIL import Image

import config_schema
import datafiles
import errors
import folders
import main
from datafiles import IDX_FILES, read_idx
from errors import DataError

# ---- IDX files, the download and its cache, synthetic digits --------------------------------------------------------


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


# ---- IDX files and gzip bombs ---------------------------------------------------------------------------------------


ZEROS = 16 << 20  # one gzip member of 16 MiB of zeros compresses to 16 KB


def gzip_bomb(path: Path, header: bytes, members: int = 192) -> Path:
    """A .gz of `members` gzip members of 16 MiB each (3 GiB for 192) in about 3 MB, starting with `header`:
    members are concatenated, so one compressed block of zeros is written many times."""
    zeros = gzip.compress(bytes(ZEROS), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(header + bytes(ZEROS - len(header)), compresslevel=9))
        for _ in range(members - 1):
            f.write(zeros)
    return path


IMAGES_HEADER = struct.pack(">HBB3I", 0, 8, 3, 1, 28, 28)  # declares one 28x28 image


@pytest.mark.parametrize(("header", "problem"), [
    (IMAGES_HEADER, "header promises 784 bytes of data for shape (1, 28, 28), file holds more (corrupt, or not "
                    "what its header says)"),
    (b"\x00\x00\x0d\x03" + IMAGES_HEADER[4:], "not an IDX file of unsigned bytes (magic number 00000d03, expected "
                                              "00000801 for labels or 00000803 for images)"),
    (struct.pack(">HBB3I", 0, 8, 3, 4_000_000_000, 28, 28),
     "header declares shape (4000000000, 28, 28), 3,136,000,000,000 bytes of data, more than the 1,073,741,824 an "
     "IDX file may hold here (corrupt, or not an MNIST-like set)"),
], ids=["lying-header", "bad-magic", "huge-declared-size"])
def test_an_idx_gzip_bomb_is_refused_at_once(tmp_path: Path, header: bytes, problem: str) -> None:
    """A 3 MB .gz that inflates to 3 GiB, read in a process capped at 1 GiB: refused in well under a second
    (measured inside the process), never decompressing more than the header declares plus one byte."""
    bomb = gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz", header)
    assert bomb.stat().st_size < 4_000_000
    script = tmp_path / "read.py"
    script.write_text(textwrap.dedent(f"""\
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT / 'src')!r})
        import datafiles
        from errors import DataError
        start = time.perf_counter()
        try:
            datafiles.read_idx(Path(sys.argv[1]))
        except DataError as error:
            print(f"{{time.perf_counter() - start:.3f}} {{error}}")
        """))
    run = run_limited([str(script), str(bomb)], tmp_path, memory=1 << 30)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    seconds, message = run.stdout.strip().split(" ", 1)
    assert message == f"{bomb}: {problem}"
    assert float(seconds) < 0.5


def test_an_idx_file_with_more_or_fewer_bytes_than_declared_is_one_line(tmp_path: Path) -> None:
    data = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(data + bytes(7))
    with pytest.raises(DataError) as error:
        datafiles.read_idx(path)
    assert str(error.value) == (f"{path}: header promises 60 bytes of data for shape (3, 4, 5), file holds more "
                                "(7 more) (corrupt, or not what its header says)")
    path.write_bytes(data[:-10])
    with pytest.raises(DataError) as error:
        datafiles.read_idx(path)
    assert str(error.value) == (f"{path}: header promises 60 bytes of data for shape (3, 4, 5), file holds 50 "
                                "(truncated or corrupt)")
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(data + b"x"))
    with pytest.raises(DataError) as error:
        datafiles.read_idx(gz)
    assert str(error.value) == (f"{gz}: header promises 60 bytes of data for shape (3, 4, 5), file holds more "
                                "(corrupt, or not what its header says)")
    gz.write_bytes(gzip.compress(data))
    assert np.array_equal(datafiles.read_idx(gz), np.arange(60, dtype=np.uint8).reshape(3, 4, 5))


# ---- folders of pictures --------------------------------------------------------------------------------------------
def by_class(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    return images[order], labels[order]


def test_a_folder_written_from_idx_arrays_loads_to_them_and_trains_to_the_same_accuracy(tmp_path: Path) -> None:
    images, labels = sample_digits()
    held = np.random.default_rng(0).permutation(len(labels))[:2000]  # 1,500 for training, 500 for testing
    train, test = by_class(images[held[500:]], labels[held[500:]]), by_class(images[held[:500]], labels[held[:500]])
    idx, folder = tmp_path / "idx", tmp_path / "folder"
    idx.mkdir()
    for (x, y), (image_name, label_name) in zip((train, test), IDX_FILES.values()):
        write_idx(idx / image_name, x)
        write_idx(idx / label_name, y)
    write_class_folders(folder / "train", *train)
    write_class_folders(folder / "test", *test)

    arrays = folders.decoded_arrays(folder, None, None, tmp_path / "cache")
    assert arrays["class_names"] == CLASS_FOLDER_NAMES and arrays["color"] == "grey" and arrays["skipped"] == []
    for key, expected in zip(("x_train", "y_train", "x_test", "y_test"), (*train, *test)):
        assert np.array_equal(arrays[key], expected), key

    write_config(tmp_path, data={"cache_dir": str(tmp_path / "cache")})
    accuracies = {}
    for name, path in (("idx", idx), ("folder", folder)):
        run = run_cli(["--config", str(ROOT / "configs" / "lenet5.yaml"), "--data-path", str(path), "--epochs", "1",
                       "--n-train", "1200", "--n-test", "500", "--output", str(tmp_path / f"{name}.json")],
                      tmp_path, timeout=300)
        assert run.returncode == 0, run.stderr
        results = json.loads((tmp_path / f"{name}.json").read_text())
        accuracies[name] = results["test_accuracy"]
        assert results["data"]["dataset"] == ("folder" if name == "folder" else "mnist")
    assert results["data"]["class_names"] == CLASS_FOLDER_NAMES
    assert accuracies["folder"] == accuracies["idx"] > 0.7


def write_messy_folder(root: Path) -> None:
    """Two classes of pictures in every format and mode, of mixed sizes, with one corrupt PNG, one text file
    named .png and one file of another kind."""
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(root / name / "grey.png")
        Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)).save(root / name / "alpha.png")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(root / name / "pal.gif")
        Image.fromarray(rng.integers(0, 256, (25, 18, 3), dtype=np.uint8)).save(root / name / "photo.jpg")
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name / "old.bmp")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / "web.webp")
        np.save(root / name / "array.npy", rng.random((10, 14)))
        (root / name / "notes.txt").write_text("not an image, and not named like one")
    good = (root / "cats" / "grey.png").read_bytes()
    (root / "cats" / "broken.png").write_bytes(good[:len(good) // 2])
    (root / "dogs" / "text.png").write_text("this is text, not a PNG")


def test_a_messy_folder_loads_with_one_warning_then_from_the_cache(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    write_messy_folder(tmp_path / "messy")
    cfg = dict(config_schema.DEFAULT_CONFIG["data"], path=str(tmp_path / "messy"), image_size=[16, 16],
               cache_dir=str(tmp_path / "cache"), n_test=4)
    with caplog.at_level(logging.INFO, logger="numpy_cnn"):
        start = time.perf_counter()
        first = main.load_data(cfg)
        decoded_in = time.perf_counter() - start
        start = time.perf_counter()
        second = main.load_data(cfg)
        cached_in = time.perf_counter() - start
    print(f"messy folder: decoded in {decoded_in:.3f}s, from the cache in {cached_in:.3f}s")
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 2  # one per load: the second load reports the same skipped files
    assert "skipped 2 files" in warnings[0] and "broken.png" in warnings[0] and "text.png" in warnings[0]
    assert first.source == "folder" and second.source == "cache"
    assert first.input_shape == (16, 16, 3) and first.class_names == ["cats", "dogs"]
    assert len(first.x_train) + len(first.x_test) == 14 and np.bincount(first.y_test).tolist() == [2, 2]
    assert np.array_equal(first.x_train, second.x_train) and first.skipped == second.skipped
    alpha = np.asarray(Image.open(tmp_path / "messy" / "cats" / "alpha.png"))
    white = (alpha[..., :3] * (alpha[..., 3:] / 255) + 255 * (1 - alpha[..., 3:] / 255)).mean()
    decoded = folders.decode(tmp_path / "messy" / "cats" / "alpha.png", None)[0]
    assert decoded.shape == (30, 30, 3) and abs(decoded.mean() - white) < 1  # composited on white


def test_a_grey_folder_is_grey_unless_asked_for_colour(tmp_path: Path) -> None:
    images, labels = sample_digits()
    write_class_folders(tmp_path / "grey", images[::250], labels[::250])
    cfg = dict(config_schema.DEFAULT_CONFIG["data"], path=str(tmp_path / "grey"), cache_dir=str(tmp_path))
    grey = main.load_data(dict(cfg, n_test=5))
    colour = main.load_data(dict(cfg, n_test=5, color="rgb", image_size=[14, 10]))
    assert grey.input_shape == (28, 28, 1) and colour.input_shape == (14, 10, 3)
    assert np.array_equal(colour.x_train[..., 0], colour.x_train[..., 2])
    assert np.bincount(grey.y_test, minlength=10).max() == 1  # stratified: 5 of 10 classes of 2 images


@pytest.mark.parametrize("make, expected", [
    (lambda root: root.mkdir(), "no train-images-idx3-ubyte"),
    (lambda root: (root / "only").mkdir(parents=True), "only one class folder (only)"),
    (lambda root: [(root / name).mkdir(parents=True) for name in "ab"], "no image files in this class folder"),
    (lambda root: [((root / name).mkdir(parents=True), (root / name / "x.png").write_text("text")) for name in "ab"],
     "none of its 2 image files could be read"),
])
def test_bad_folders_get_one_line_and_exit_2(tmp_path: Path, make: object, expected: str) -> None:
    make(tmp_path / "d")
    write_config(tmp_path)
    run = run_cli(["--data-path", str(tmp_path / "d"), "--epochs", "1"], tmp_path)
    assert run.returncode == 2 and expected in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")


def test_contradictions_and_impossible_settings_are_exit_2(tmp_path: Path) -> None:
    images, labels = sample_digits()
    write_class_folders(tmp_path / "d", images[::100], labels[::100])
    Image.new("L", (30, 30)).save(tmp_path / "d" / CLASS_FOLDER_NAMES[3] / "99999.png")
    write_config(tmp_path)
    cases = [(["--dataset", "mnist"], "use --dataset folder"),
             (["--image-size", "28"], None),  # resized: it trains
             ([], "is 28x28 but"),
             (["--image-size", "28", "--n-train", "500"], "set it to at most"),
             (["--image-size", "3x"], "--image-size: got '3x'"),
             (["--image-size", "28", "--color", "blue"], "--color: got 'blue'")]
    for flags, expected in cases:
        run = run_cli(["--data-path", str(tmp_path / "d"), "--epochs", "1", "--n-test", "10", *flags], tmp_path)
        if expected is None:
            assert run.returncode == 0, run.stderr
            continue
        assert run.returncode == 2 and expected in run.stderr, (flags, run.stderr)
        assert run.stderr.count("\n") == 1


def test_flip_mirrors_about_half_of_the_images_exactly() -> None:
    images = np.random.default_rng(0).random((200, 5, 7, 3)).astype(np.float32)
    flipped = main.shift_and_rotate(images, np.random.default_rng(1), 0, 0, flip=True)
    same = np.all(np.isclose(flipped, images), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(flipped, images[:, :, ::-1]), axis=(1, 2, 3))
    assert np.all(same ^ mirrored) and 70 < mirrored.sum() < 130


def test_stratified_split_keeps_each_class_share() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = folders.stratified_split(labels, 10, np.random.default_rng(0))
    assert np.bincount(labels[test]).tolist() == [5, 3, 2]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))


FASHION_FOLDERS = ["0_T-shirt_top", "1_Trouser", "2_Pullover", "3_Dress", "4_Coat", "5_Sandal", "6_Shirt",
                   "7_Sneaker", "8_Bag", "9_Ankle boot"]


@pytest.mark.slow
def test_full_fashion_mnist_as_png_folders_equals_its_idx_files(tmp_path: Path, fashion_mnist: Path) -> None:
    """All 70,000 Fashion-MNIST images written as PNG folders load to the IDX arrays (ordered by class) and, with
    the IDX files written in that order, configs/lenet5.yaml reaches exactly the same accuracy on both. Prints
    the load times with and without the cache, and the accuracy on the original IDX files for comparison."""
    source = fashion_mnist
    splits = {split: by_class(read_idx(source / f"{images}.gz"), read_idx(source / f"{labels}.gz"))
              for split, (images, labels) in IDX_FILES.items()}
    (tmp_path / "idx").mkdir()
    for split, (images_name, labels_name) in IDX_FILES.items():
        write_idx(tmp_path / "idx" / images_name, splits[split][0])
        write_idx(tmp_path / "idx" / labels_name, splits[split][1])
        write_class_folders(tmp_path / "folder" / split, *splits[split], FASHION_FOLDERS)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        arrays = folders.decoded_arrays(tmp_path / "folder", None, None, tmp_path / "cache")
        times.append(time.perf_counter() - start)
    assert arrays["source"] == "cache" and arrays["class_names"] == FASHION_FOLDERS
    for key, expected in zip(("x_train", "y_train", "x_test", "y_test"), (*splits["train"], *splits["test"])):
        assert np.array_equal(arrays[key], expected), key
    write_config(tmp_path, data={"cache_dir": str(tmp_path / "cache")}, logging={"file": None})
    accuracies = {}
    for name, path in (("idx", tmp_path / "idx"), ("folder", tmp_path / "folder"), ("original idx", source)):
        start = time.perf_counter()
        run = run_cli(["--config", str(ROOT / "configs" / "lenet5.yaml"), "--data-path", str(path), "--output",
                       str(tmp_path / "r.json")], tmp_path, timeout=3600)
        assert run.returncode == 0, run.stderr
        accuracies[name] = json.loads((tmp_path / "r.json").read_text())["test_accuracy"]
        print(f"{name}: test accuracy {100 * accuracies[name]:.2f}% ({time.perf_counter() - start:.0f}s in all)")
    print(f"70,000 PNG files: decoded in {times[0]:.1f}s, from the cache in {times[1]:.1f}s")
    assert accuracies["folder"] == accuracies["idx"]


def test_the_results_file_lists_the_skipped_files(tmp_path: Path) -> None:
    write_messy_folder(tmp_path / "messy")
    two_classes = {"layers": [*SMALL_FOLDER_MODEL["layers"][:-1], {"dense": {"units": 2}}]}
    write_config(tmp_path, model=two_classes)
    run = run_cli(["--data-path", str(tmp_path / "messy"), "--image-size", "16", "--n-test", "4", "--epochs", "1",
                   "--batch-size", "4", "--output", str(tmp_path / "r.json")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert (run.stdout + run.stderr).count("WARNING") == 1
    data = json.loads((tmp_path / "r.json").read_text())["data"]
    assert [Path(line.split(":")[0]).name for line in data["skipped_files"]] == ["broken.png", "text.png"]
    assert data["class_names"] == ["cats", "dogs"] and data["input_shape"] == [16, 16, 3]


def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_messy_folder(tmp_path / "messy")
    first = folders.decoded_arrays(tmp_path / "messy", [8, 8], "grey", tmp_path / "cache")
    (cache,) = (tmp_path / "cache").iterdir()
    cache.write_bytes(b"not a zip archive")
    with caplog.at_level(logging.WARNING, logger="numpy_cnn"):
        again = folders.decoded_arrays(tmp_path / "messy", [8, 8], "grey", tmp_path / "cache")
    assert again["source"] == "folder" and np.array_equal(again["x_train"], first["x_train"])
    assert "cannot read the cache" in caplog.text
    assert folders.decoded_arrays(tmp_path / "messy", [8, 8], "grey", tmp_path / "cache")["source"] == "cache"


# ---- augmentation ---------------------------------------------------------------------------------------------------


def test_shifts_move_each_image_by_whole_pixels_filling_with_background() -> None:
    """Without rotation, each image is its own np.roll with the uncovered border set to 0."""
    rng = np.random.default_rng(3)
    images = rng.random((50, 9, 7, 1)).astype(np.float32)
    shifted = main.shift_and_rotate(images, np.random.default_rng(4), max_shift=2, max_degrees=0)
    draws = np.random.default_rng(4)
    draws.uniform(0, 0, (50, 1, 1))  # the angles come first
    shift_r, shift_c = draws.integers(-2, 3, (2, 50, 1, 1))[:, :, 0, 0]
    seen = set()
    for image, moved, dr, dc in zip(images, shifted, shift_r, shift_c):
        expected = np.zeros_like(image)
        src = image[max(-dr, 0):9 - max(dr, 0), max(-dc, 0):7 - max(dc, 0)]
        expected[max(dr, 0):max(dr, 0) + src.shape[0], max(dc, 0):max(dc, 0) + src.shape[1]] = src
        np.testing.assert_allclose(moved, expected, atol=1e-6)
        seen.add((int(dr), int(dc)))
    assert len(seen) >= 15 and shifted.dtype == np.float32


def test_rotation_turns_a_bar_about_the_centre() -> None:
    """A horizontal bar through the centre, turned by up to 90 degrees, keeps its centre and (roughly) its ink;
    at angles near 90 it becomes vertical."""
    image = np.zeros((1, 21, 21, 1), np.float32)
    image[0, 10, 3:18] = 1
    turned = main.shift_and_rotate(np.repeat(image, 200, axis=0), np.random.default_rng(0), 0, 89.9)
    assert turned[:, 10, 10, 0] == pytest.approx(1, abs=1e-4)
    assert np.abs(turned.sum(axis=(1, 2, 3)) - 15).max() < 2.0  # bilinear blur
    upright = turned[np.argmax(turned[:, 3, 10, 0] + turned[:, 17, 10, 0])]
    assert upright[3:18, 10, 0].min() > 0.5 and upright[10, 3, 0] < 0.1


def test_augmentation_is_seeded_and_learns_digits(tmp_path: Path) -> None:
    """A run with shifts and rotations is repeatable with the seed, and still learns the 8x8 digits."""
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 1000, "n_test": 300,
                                          "augment": {"shift": 1, "rotate": 10}},
                          model={"layers": [{"conv2d": {"filters": 8, "padding": 1}}, "relu", "flatten",
                                            {"dense": {"units": 10}}]},
                          training={"epochs": 4, "learning_rate": 0.003})
    accuracies = []
    for name in ("a.json", "b.json"):
        proc = run_cli(["--config", str(config), "--output", name], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "shifts of up to 1 px and rotations of up to 10 degrees" in proc.stdout
        accuracies.append(json.loads((tmp_path / name).read_text())["test_accuracy"])
    assert accuracies[0] == accuracies[1] >= 0.8


# ---- messages that name the fix -------------------------------------------------------------------------------------


def test_a_folder_of_garments_trained_as_mnist_is_named(tmp_path: Path) -> None:
    """Fashion-MNIST's garments fill much of the frame (mean brightness 0.29 against MNIST's 0.13)."""
    rng = np.random.default_rng(0)
    garments = np.zeros((300, 28, 28))
    garments[:, 4:24, 6:22] = rng.integers(100, 200, (300, 20, 16))
    folder = write_idx_split(tmp_path / "fashion", "train", garments, rng.integers(0, 10, 300), gz=True)
    args = ["--config", str(small_config_file(tmp_path, data={"dataset": "mnist"})), "--data-path", str(folder),
            "--n-train", "200", "--n-test", "50", "--epochs", "0"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "these images look like fashion_mnist, not mnist" in proc.stderr
    assert "add --dataset fashion_mnist" in proc.stderr
    proc = run_cli([*args, "--dataset", "fashion_mnist"], cwd=tmp_path)
    assert proc.returncode == 0 and "look like" not in proc.stderr, proc.stderr


def test_asking_for_more_images_than_a_folder_holds_ends_with_the_fix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 60, (500, 28, 28)), rng.integers(0, 10, 500)
    folder = write_idx_split(tmp_path / "small", "train", images, labels, gz=True)
    proc = run_cli(["--config", str(small_config_file(tmp_path, data={"dataset": "mnist"})), "--data-path", str(folder),
                    "--n-train", "1000", "--n-test", "200"], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "n_train + n_test = 1,200 but only 500 images", "add --n-train 400 --n-test 100")
