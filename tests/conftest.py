"""Shared test fixtures: paths, the optional real-MNIST sample, a helper that runs the CLI, and model sections."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference
import yaml
from threadpoolctl import threadpool_limits

import config_schema

# One BLAS thread for the tests and the programs they start: on a shared machine, two OpenBLAS threads
# competing with other processes for two cores can run 9x slower, and the suite's time should not depend
# on what else runs. The results are the same; only the benchmark (bench/) measures speed.
threadpool_limits(1)
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "src" / "main.py"
MNIST_5K = ROOT.parent / "shared" / "data" / "mnist-5k"


@pytest.fixture
def mnist_5k() -> Path:
    """The 5,000 real MNIST digits that developers and CI have beside the project; skip where absent."""
    if not (MNIST_5K / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST sample not found at {MNIST_5K}")
    return MNIST_5K


def write_config(folder: Path, **sections: dict) -> Path:
    """A config.yaml in `folder` whose log goes into `folder`, with the given sections merged in."""
    config = {"logging": {"level": "INFO", "file": str(folder / "logs" / "app.log")}}
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python src/main.py ARGS` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# What an entry of the old model.conv_layers meant by default (before model.layers replaced it).
OLD_CONV_DEFAULTS = {"filters": 32, "kernel_size": 3, "stride": 1, "padding": 0, "pool_size": 2, "pool_stride": None}


def conv_blocks(convs: list[dict], dense_units: int, num_classes: int = 10) -> dict:
    """The checked model section ({"layers": [...]}, every argument spelled out, as config_schema.check_model
    returns it) of the network the old keys described: for each entry of convs (keys filters, kernel_size,
    stride, padding, pool_size, pool_stride, defaults OLD_CONV_DEFAULTS) conv2d -> relu -> maxpool2d (no pooling
    when pool_size is 0 or None), then flatten -> dense(dense_units) -> relu -> dense(num_classes)."""
    layers: list = []
    for given in convs:
        conv = dict(OLD_CONV_DEFAULTS, **given)
        layers += [{"conv2d": {key: conv[key] for key in ("filters", "kernel_size", "stride", "padding")}}, "relu"]
        if conv["pool_size"]:
            layers.append({"maxpool2d": {"pool_size": conv["pool_size"], "stride": conv["pool_stride"]}})
    layers += ["flatten", {"dense": {"units": dense_units}}, "relu", {"dense": {"units": num_classes}}]
    return config_schema.check_model({"layers": layers})


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
