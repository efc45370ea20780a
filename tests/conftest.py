"""Fixtures shared by the test files (the helpers they share are in helpers.py), and one BLAS thread for all."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import find_data
from threadpoolctl import threadpool_limits

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
