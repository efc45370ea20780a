"""Fixtures shared by the test files (the helpers they share are in helpers.py), and one BLAS thread for all."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import helpers
import numpy as np
import pytest
from helpers import (
    GOOD_MODEL_LAYERS,
    SAVED_MODEL_CONFIG,
    SavedModel,
    Trained,
    find_data,
    run_cli,
    running,
    small_config_file,
    trained_model,
)
from threadpoolctl import threadpool_limits

import config_schema
import main
import modelfile
import serve

# One BLAS thread for the tests and the programs they start: on a shared machine, two OpenBLAS threads
# competing with other processes for two cores can run 9x slower, and the suite's time should not depend
# on what else runs. The results are the same; only the benchmark (bench/) measures speed.
threadpool_limits(1)
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")


def data_set(request: pytest.FixtureRequest, variable: str) -> Path:
    """The folder of a real data set (helpers.find_data). Where it is missing, a slow test fails, saying which
    variable to set (`pytest -m slow` must not pass by skipping everything), and a default test skips."""
    folder, missing = find_data(variable)
    if folder is None:
        if request.node.get_closest_marker("slow") is not None:
            pytest.fail(missing, pytrace=False)
        pytest.skip(missing)
    return folder


@pytest.fixture
def mnist_5k(request: pytest.FixtureRequest) -> Path:
    """A folder of real MNIST IDX files: $NUMPY_CNN_MNIST, else the 5,000-digit sample that developers and CI have
    beside the project (../shared/data/mnist-5k)."""
    return data_set(request, "NUMPY_CNN_MNIST")


@pytest.fixture
def fashion_mnist(request: pytest.FixtureRequest) -> Path:
    """A folder of Fashion-MNIST's IDX files with its 10,000 test images: $NUMPY_CNN_FASHION, else where Debian's
    dataset-fashion-mnist puts them."""
    return data_set(request, "NUMPY_CNN_FASHION")


@pytest.fixture(autouse=True)
def fresh_logger() -> Iterator[None]:
    """main.main sets up the program's logger (its own handlers, no propagation): undo that after each test, so
    that a test's caplog sees what the code under test logs whatever ran before it."""
    yield
    logger = logging.getLogger("numpy_cnn")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate, logger.level = True, logging.NOTSET


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    proc = run_cli(["--config", str(small_config_file(folder)), "--save-model", "m.npz"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder / "m.npz"


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 8x8 model (conv, batchnorm, dense) after one Adam step, saved as --save-model saves it."""
    folder = tmp_path_factory.mktemp("models")
    model_cfg = config_schema.check_model({"layers": GOOD_MODEL_LAYERS})
    rng = np.random.default_rng(0)
    model = main.build_model(model_cfg, (8, 8, 1), 10, rng)
    x, y = rng.random((4, 8, 8, 1), dtype=np.float32), np.arange(4)
    loss = main.SoftmaxCrossEntropy()
    loss.forward(model.forward(x), y)
    model.backward(loss.backward())
    optimizer = main.Adam()
    optimizer.step(model)
    data = SimpleNamespace(name="digits", source="sklearn", x_train=x, x_test=x, y_test=y, note="",
                           class_names=main.DIGIT_NAMES)
    summary = {"epochs_completed": 1, "test_accuracy": 0.25, "test_loss": 2.25, "history": [], "status": "completed"}
    modelfile.save_model(folder / "good.npz", model, model_cfg, data, summary, optimizer)
    return folder / "good.npz"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    """Train for 3 epochs on the command line, save the model and the results JSON (once for this file)."""
    folder = tmp_path_factory.mktemp("saved_model")
    config = helpers.write_config(folder, **SAVED_MODEL_CONFIG)  # logs into folder/logs, not into the repo
    run = run_cli(["--config", str(config), "--save-model", "model.npz", "--output", "trained.json"], folder)
    assert run.returncode == 0, run.stderr
    results = json.loads((folder / "trained.json").read_text(encoding="utf-8"))
    assert results["epochs_completed"] == 3 and results["files"]["model"] == "model.npz"
    return SavedModel(folder, config, folder / "model.npz", results)


@pytest.fixture(scope="module")
def trained() -> Trained:
    return trained_model()


@pytest.fixture(scope="module")
def server(trained: Trained) -> Iterator[serve.DrawServer]:
    with running(trained.model, trained.info) as server:
        yield server
