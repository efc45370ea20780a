"""What many test files share: the project's paths, running the CLI, config files, IDX files, where the real data
sets are, model sections from layer lists, float64 layers checked against the loop references, small runs and their
configs, one-line errors, model files, pictures and folders of pictures, gradient checks by central differences, and
a trained model served over HTTP. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import reference
import yaml
from PIL import Image

import config_schema
import images
import main
import serve
from datafiles import read_idx

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "src" / "main.py"

# ---- running the command line ---------------------------------------------------------------------------------------


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python src/main.py ARGS` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def write_config(folder: Path, config: dict | None = None, name: str = "config.yaml", **sections: dict) -> Path:
    """A YAML config file folder/name holding `config` (by default only a log file inside folder, so that runs do
    not log into the repository) with each keyword's section merged into it; returns its path."""
    merged = {key: dict(values) if isinstance(values, dict) else values for key, values in (config or {}).items()}
    if config is None:
        merged["logging"] = {"level": "INFO", "file": str(folder / "logs" / "app.log")}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    path = folder / name
    path.write_text(yaml.safe_dump(merged, sort_keys=False), encoding="utf-8")
    return path


# ---- IDX files (the MNIST format) -----------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of an array as unsigned bytes: magic 00 00 08 ndim, one big-endian uint32 per dimension,
    then the data in C order."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + np.asarray(array).astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An array as an IDX file at path, gzipped when the name ends in .gz."""
    content = idx_bytes(array)
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
    return path


def write_idx_split(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = False) -> Path:
    """images and labels as folder/<prefix>-images-idx3-ubyte and <prefix>-labels-idx1-ubyte (prefix "train" or
    "t10k"), gzipped with a .gz name when gz; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


def write_idx_folder(folder: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> Path:
    """A new folder of random 28x28 images with labels 0-9 (each present once n >= 10) as gzipped train and t10k
    IDX files, like MNIST's."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


# ---- the real data sets, where this machine has them ----------------------------------------------------------------

# Environment variable -> (the folders tried when it is not set, a file the folder must hold).
DATA_SETS = {
    "NUMPY_CNN_MNIST": ((ROOT.parent / "shared" / "data" / "mnist-5k",), "train-images-idx3-ubyte"),
    "NUMPY_CNN_FASHION": ((Path("/usr/share/datasets/fashion-mnist"),
                           Path("/tmp/fashion/usr/share/datasets/fashion-mnist")), "t10k-images-idx3-ubyte"),
}


def find_data(variable: str) -> tuple[Path | None, str]:
    """The IDX folder for one of DATA_SETS: the folder the environment variable names, else the first fallback
    that holds the data set's file (plain or .gz). (None, why not) when there is none."""
    fallbacks, needed = DATA_SETS[variable]
    given = os.environ.get(variable)
    candidates = [Path(given)] if given else list(fallbacks)
    for folder in candidates:
        if (folder / needed).is_file() or (folder / f"{needed}.gz").is_file():
            return folder, ""
    where = f"{variable}={given}" if given else f"{variable} is not set, and {' or '.join(map(str, fallbacks))}"
    return None, (f"{where} holds no {needed}[.gz]: set {variable} to a folder of its IDX files "
                  f"(e.g. {variable}=/path/to/folder pytest ...)")


# ---- models ---------------------------------------------------------------------------------------------------------


def model_section(*layers: str | dict) -> dict:
    """The model section of a layer list with every argument spelled out, as config_schema.check_model returns it
    (and load_config does for a config file)."""
    return config_schema.check_model({"layers": list(layers)})


def classifier_head(units: int, classes: int = 10) -> list:
    """The end of a layer list for a classifier: flatten -> dense(units) -> relu -> dense(classes)."""
    return ["flatten", {"dense": {"units": units}}, "relu", {"dense": {"units": classes}}]


def count_layers(model_cfg: dict, *names: str) -> int:
    """How many layers of a model section's list are of the given types (e.g. "conv2d", "dense")."""
    return sum(config_schema.layer_name_and_arguments(spec)[0] in names for spec in model_cfg["layers"])


def to_float64(layer: object) -> None:
    """Convert a layer's weights, gradient buffers and (BatchNorm's) running statistics to float64 in place."""
    for name in layer.params:
        layer.params[name] = layer.params[name].astype(np.float64)
        layer.grads[name] = np.zeros_like(layer.params[name])
    for name, buffer in getattr(layer, "buffers", {}).items():
        layer.buffers[name] = buffer.astype(np.float64)


def assert_conv2d_matches_reference(layer: object, x: np.ndarray, rng: np.random.Generator) -> None:
    """A float64 Conv2D's forward and backward (dx, dW, db) equal the loop reference on input x."""
    y = layer.forward(x)
    expected = reference.conv2d_forward(x, layer.params["W"], layer.params["b"], layer.stride, layer.padding)
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)
    upstream = rng.standard_normal(y.shape)
    grad_x = layer.backward(upstream)
    ref_x, ref_w, ref_b = reference.conv2d_backward(x, layer.params["W"], upstream, layer.stride, layer.padding)
    np.testing.assert_allclose(grad_x, ref_x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grads["W"], ref_w, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.grads["b"], ref_b, rtol=1e-10, atol=1e-12)


def untrained_model_scores(results: dict) -> tuple[float, float, int]:
    """The test loss and accuracy of the untrained model that the seed of a results file builds, recomputed here
    in float64 (what a run with --epochs 0 must report), and the number of test images."""
    import main

    cfg = results["config"]
    data = main.load_data(cfg["data"])
    model = main.build_model(cfg["model"], data.input_shape, data.num_classes,
                             main.make_rngs(cfg["data"]["random_seed"])["init"])
    logits = model.forward(data.x_test, training=False).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(data.y_test)), data.y_test].mean())
    return loss, float(np.mean(logits.argmax(axis=1) == data.y_test)), len(data.y_test)


# ---- small runs and their configs -----------------------------------------------------------------------------------

DIGITS = ["--dataset", "digits", "--n-train", "200", "--n-test", "60", "--epochs", "1"]

SMALL_NET = {"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "relu", {"maxpool2d": {"pool_size": 2}}, "flatten",
                        {"dense": {"units": 10}}]}


def small_config_file(folder: Path, **sections: dict) -> Path:
    """A config file in folder for a one-epoch run of SMALL_NET on 200 digits; each keyword updates its section."""
    data = {"dataset": "digits", "n_train": 200, "n_test": 60, **sections.pop("data", {})}
    training = {"epochs": 1, **sections.pop("training", {})}
    return write_config(folder, data=data, model=sections.pop("model", SMALL_NET), training=training, **sections)


def small_config(dataset: str = "digits", n_train: int = 500, n_test: int = 200, **training: Any) -> dict:
    """A tiny network on digits (8x8, offline: an epoch of 500 images takes milliseconds) or on synthetic
    28x28 digits (no scikit-learn import, which saves a subprocess a second or more)."""
    return {
        "logging": {"level": "INFO", "file": "log/app.log"},
        "data": {"dataset": dataset, "n_train": n_train, "n_test": n_test, "random_seed": 7},
        "model": {"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "relu", "maxpool2d", *classifier_head(16)]},
        "training": {"epochs": 2, "optimizer": "sgd", "learning_rate": 0.05, "batch_size": 32, **training},
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "src" / "main.py"), *args]


def environment_without_seed() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "RANDOM_SEED"}


def run_in_process(output: str, *flags: str) -> dict:
    """One CLI run in this process (cwd and environment already set by the test); returns the results."""
    assert main.main(["--config", "config.yaml", "--output", output, *flags]) == 0
    return json.loads(Path(output).read_text())


# A small model that learns the synthetic digits in 3 epochs of 2,000 images (a few seconds).
SAVED_MODEL_CONFIG = {
    "data": {"dataset": "synthetic", "n_train": 2000, "n_test": 300, "random_seed": 0},
    "model": model_section({"conv2d": {"filters": 8, "padding": 1}}, "relu", "maxpool2d",
                                   *classifier_head(64)),
    "training": {"epochs": 3, "batch_size": 32, "optimizer": "adam", "learning_rate": 0.001},
}


@dataclass
class SavedModel:
    folder: Path
    config: Path
    path: Path
    results: dict  # the results JSON of the run that saved it


BN_DROPOUT_NET = {"layers": [
    {"conv2d": {"filters": 4, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu", {"avgpool2d": {"pool_size": 2}},
    {"conv2d": {"filters": 6, "kernel_size": 3}}, "tanh", {"maxpool2d": {"pool_size": 2}}, "flatten",
    {"dropout": {"rate": 0.3}}, {"dense": {"units": 12}}, "batchnorm", "relu", {"dense": {"units": 10}}]}


def checked_model(model: dict) -> dict:
    return config_schema.check_model(model)


def digits(n_train: int, n_test: int, n_val: int = 0) -> main.Dataset:
    cfg = config_schema.validate_config({"data": {"dataset": "digits", "n_train": n_train, "n_test": n_test,
                                                  "n_val": n_val}})
    return main.load_data(cfg["data"])


# ---- one-line errors ------------------------------------------------------------------------------------------------


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    """stderr is one `error: ...` line holding every fragment, with no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].lower().startswith("error: "), stderr
    assert "Traceback" not in stderr and "unexpected" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


def one_line(stderr: str) -> str:
    """The single line on stderr, after checking there is no traceback and nothing 'unexpected'."""
    assert "Traceback" not in stderr and "unexpected" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def one_error_line(stderr: str, must_name: str) -> str:
    """The single `error: ...` line the CLI printed, after checking it names `must_name`."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    assert must_name in lines[0], lines[0]
    return lines[0]


def run_limited(args: list[str], cwd: Path, memory: int = 2 << 30, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh process whose address space is capped at `memory` bytes: a case that would
    allocate gigabytes fails with MemoryError there instead of taking the machine's memory."""
    limit = (f"import os, resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory})); "
             "sys.argv = sys.argv[1:]; sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0])); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("RANDOM_SEED", None)
    return subprocess.run([sys.executable, "-c", limit, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- model files ----------------------------------------------------------------------------------------------------


GOOD_MODEL_LAYERS = [{"conv2d": {"filters": 2, "kernel_size": 3, "padding": 1}}, {"batchnorm": {}}, "relu", "flatten",
                     {"dense": {"units": 10}}]


def rewrite_model(source: Path, target: Path, meta: dict | None = None, **arrays: np.ndarray) -> None:
    """A copy of the model file source at target, with meta and the given arrays replaced."""
    with np.load(source) as archive:
        contents = {key: archive[key] for key in archive.files}
    if meta is not None:
        contents["meta"] = np.array(json.dumps(meta))
    contents.update(arrays)
    np.savez(target, **contents)


def arrays_of(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


# ---- pictures and folders of pictures -------------------------------------------------------------------------------


def encoded(image: Image.Image, format: str) -> bytes:
    """The image as a file of that format would hold it."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 0 0 moveto 28 28 lineto stroke\nshowpage\n"

CLASS_FOLDER_NAMES = ["0_zero", "1_one", "2_two", "3_three", "4_four", "5_five", "6_six", "7_seven", "8_eight",
                      "9_nine"]

SMALL_FOLDER_MODEL = {"layers": [{"conv2d": {"filters": 8, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu",
                                 {"maxpool2d": {"pool_size": 2}}, "flatten", {"dense": {"units": 10}}]}


def sample_digits() -> tuple[np.ndarray, np.ndarray]:
    folder, missing = find_data("NUMPY_CNN_MNIST")
    if folder is None:
        pytest.skip(missing)
    return read_idx(folder / "train-images-idx3-ubyte.gz"), read_idx(folder / "train-labels-idx1-ubyte.gz")


def write_class_folders(root: Path, images: np.ndarray, labels: np.ndarray,
                        names: list[str] = CLASS_FOLDER_NAMES) -> None:
    """images[i] as root/<names[label]>/<i>.png, numbered so that name order within a class is array order."""
    for index, (image, label) in enumerate(zip(images, labels)):
        path = root / names[label] / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


def colour_digits(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each grey digit (N, H, W) drawn in a random colour on a random background colour: (N, H, W, 3) uint8.
    The two colours differ by at least 200 in the sum of their red, green and blue, so every digit stays legible."""
    ink, paper = rng.integers(0, 256, (2, len(images), 3))
    close = np.abs(ink - paper).sum(axis=1) < 200
    while close.any():
        ink[close], paper[close] = rng.integers(0, 256, (2, int(close.sum()), 3))
        close = np.abs(ink - paper).sum(axis=1) < 200
    alpha = images[..., None] / 255
    return (paper[:, None, None] * (1 - alpha) + ink[:, None, None] * alpha).round().astype(np.uint8)


def colour_folder(root: Path, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    images, labels = sample_digits()
    chosen = np.random.default_rng(seed).choice(len(labels), n, replace=False)
    coloured = colour_digits(images[chosen], np.random.default_rng(seed))
    write_class_folders(root, coloured, labels[chosen], [str(digit) for digit in range(10)])
    return coloured, labels[chosen]


# ---- gradient checks by central differences -------------------------------------------------------------------------


STEP = 1e-6  # central-difference step (float64)

TOLERANCE = 1e-6  # largest relative error accepted between analytic and numeric gradients


def central_differences(objective: Callable[[], float], array: np.ndarray, step: float = STEP) -> np.ndarray:
    """d objective / d array at EVERY element, as (f(a + h) - f(a - h)) / 2h.

    `array` is changed in place (one element at a time) and restored; objective() must read it.
    """
    gradient = np.zeros(array.shape)
    for index in np.ndindex(array.shape):
        original = array[index]
        array[index] = original + step
        plus = objective()
        array[index] = original - step
        minus = objective()
        array[index] = original
        gradient[index] = (plus - minus) / (2 * step)
    return gradient


def gradient_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """max |analytic - numeric| relative to the tensor's largest gradient entry.

    Scaling by the tensor's largest entry (not entry by entry) keeps floating-point round-off in the
    numeric gradient (about 1e-10 absolute) from looking like a 100% error on entries that happen to
    be nearly zero, while still catching any single wrong entry.
    """
    assert analytic is not None, "backward returned None instead of a gradient"
    assert analytic.shape == numeric.shape
    scale = max(float(np.max(np.abs(analytic))), float(np.max(np.abs(numeric))), 1e-12)
    return float(np.max(np.abs(analytic - numeric))) / scale


# ---- the server and the live page -----------------------------------------------------------------------------------


CLASS_NAMES = [str(digit) for digit in range(10)]


@dataclass
class Trained:
    model: main.Sequential
    info: dict
    test_images: np.ndarray  # (N, 28, 28) uint8, light ink on black, as in MNIST
    test_labels: np.ndarray


def read_idx_gz(path: Path) -> np.ndarray:
    """An IDX file (gzip-compressed, unsigned bytes) as an array: zero bytes, type, rank, sizes, data."""
    raw = gzip.decompress(path.read_bytes())
    rank = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


@lru_cache(maxsize=1)
def trained_model() -> Trained:
    """A small CNN trained for 4 epochs on 4,000 digits (a couple of seconds); 1,000 held out for testing.
    Trained once per test session: the browser test uses it too."""
    rng = np.random.default_rng(0)
    mnist, _ = find_data("NUMPY_CNN_MNIST")
    if mnist is not None and (mnist / "train-images-idx3-ubyte.gz").is_file():
        pixels = read_idx_gz(mnist / "train-images-idx3-ubyte.gz")[:5000]
        labels = read_idx_gz(mnist / "train-labels-idx1-ubyte.gz")[:5000].astype(np.int64)
        source = "idx"
    else:
        pixels, labels = main.make_synthetic(5000, rng)
        labels, source = labels.astype(np.int64), "synthetic"
    order = rng.permutation(len(pixels))  # the sample's files are sorted by label
    pixels, labels = pixels[order], labels[order]
    x = (pixels.astype(np.float32) / 255)[..., None]
    model = main.Sequential([
        main.Conv2D(1, 8, 3, 1, 1, rng=rng), main.ReLU(), main.MaxPool2D(2),
        main.Conv2D(8, 16, 3, 1, 1, rng=rng), main.ReLU(), main.MaxPool2D(2),
        main.Flatten(), main.Dense(7 * 7 * 16, 32, rng=rng), main.ReLU(), main.Dense(32, 10, rng=rng),
    ], (28, 28, 1))
    optimizer, loss = main.Adam(2e-3), main.SoftmaxCrossEntropy()
    for _ in range(4):
        shuffled = rng.permutation(4000)
        for start in range(0, 4000, 32):
            batch = shuffled[start:start + 32]
            loss.forward(model.forward(x[batch]), labels[batch])
            model.backward(loss.backward())
            optimizer.step(model)
    _, accuracy = model.evaluate(x[4000:], labels[4000:])
    info = {"dataset": "mnist", "source": source, "test_accuracy": round(accuracy, 4), "epochs": 4, "n_train": 4000,
            "parameters": model.parameter_count()}
    return Trained(model, info, pixels[4000:], labels[4000:])


def prepare_for(model: main.Sequential) -> Callable[[np.ndarray], np.ndarray]:
    """What main passes for an MNIST model: --predict's preprocessing."""
    return lambda image: images.prepare_image(image, model.input_shape, 20 / 28)


@contextlib.contextmanager
def running(model: main.Sequential, info: dict, **options: object) -> Iterator[serve.DrawServer]:
    """A server for the model on a free port, serving in a thread until the block ends."""
    server = serve.make_server(model, prepare=prepare_for(model), softmax=main.softmax, class_names=CLASS_NAMES,
                               info=info, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def launched(arguments: list[str], cwd: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """The command line running with --serve --port 0, and the page's address once it is announced."""
    process = subprocess.Popen([sys.executable, str(MAIN), *arguments, "--serve", "--port", "0"], cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = None
        for line in process.stdout:
            found = re.search(r"serving the page at (http://\S+/)", line)
            if found:
                url = found.group(1)
                break
        assert url, f"no address announced; stderr: {process.stderr.read()}"
        process.lines = []  # the rest of stdout, read as it comes so that the pipe never fills
        threading.Thread(target=lambda: process.lines.extend(process.stdout), daemon=True).start()
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
