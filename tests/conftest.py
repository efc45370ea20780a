"""Shared test fixtures: paths, the optional real-MNIST sample, and a helper that runs the CLI."""

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


def to_float64(layer: object) -> None:
    """Convert a layer's weights and gradient buffers to float64 in place (for exact comparisons)."""
    for name in layer.params:
        layer.params[name] = layer.params[name].astype(np.float64)
        layer.grads[name] = np.zeros_like(layer.params[name])


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
