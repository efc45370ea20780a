"""What many test files share: the project's paths, running the CLI, config files, IDX files, where the real data
sets are, model sections from layer lists, and float64 layers checked against the loop references."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import reference
import yaml

import config_schema

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "src" / "main.py"

# ---- running the command line --------------------------------------------------------------------------------


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


# ---- IDX files (the MNIST format) ----------------------------------------------------------------------------


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


def write_idx_folder(folder: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> Path:
    """A new folder of random 28x28 images with labels 0-9 (each present once n >= 10) as gzipped train and t10k
    IDX files, like MNIST's."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


# ---- the real data sets, where this machine has them -----------------------------------------------------------

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


# ---- models ----------------------------------------------------------------------------------------------------


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
