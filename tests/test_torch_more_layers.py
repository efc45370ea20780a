"""The new layers against PyTorch: BatchNorm (as BatchNorm2d and BatchNorm1d) in training and evaluation mode and
its running statistics over several steps, AvgPool2D (as AvgPool2d) and Tanh. Optional: skipped when torch is
not installed (it is not a project dependency).

Layout: the project is channels-last (N, H, W, C), PyTorch channels-first (N, C, H, W): 4-D inputs and
gradients are transposed with (0, 3, 1, 2) on the way in and (0, 2, 3, 1) on the way back. (N, F) is the same
in both. gamma and beta are PyTorch's weight and bias; running_mean and running_var have the same names.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import to_float64

from main import AvgPool2D, BatchNorm, Tanh

torch = pytest.importorskip("torch", reason="PyTorch is not installed (requirements-test.txt); the program never "
                                                   "needs it, only these comparisons do")
from test_torch import one_thread  # noqa: E402, F401 (autouse: both libraries on one thread, as test_torch.py)

pytestmark = pytest.mark.torch

DTYPES = [(np.float64, torch.float64, 1e-10), (np.float32, torch.float32, 1e-5)]
DTYPE_IDS = ["float64", "float32"]


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A channels-last project array as a PyTorch tensor: (N, H, W, C) -> (N, C, H, W); (N, F) unchanged."""
    if array.ndim == 4:
        array = array.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array))


def from_torch(tensor: torch.Tensor) -> np.ndarray:
    """The inverse of to_torch."""
    array = tensor.detach().numpy()
    return array.transpose(0, 2, 3, 1) if array.ndim == 4 else array


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs|: the error relative to the tensor's scale."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"shapes differ: {ours.shape} vs {theirs.shape}"
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-300))


def shifted_input(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Random values whose channels have different means and spreads."""
    channels = shape[-1]
    x = rng.uniform(-2, 2, channels) + rng.uniform(0.5, 3, channels) * rng.standard_normal(shape)
    return x.astype(dtype)


def batchnorm_pair(channels: int, ndim: int, dtype: type, torch_dtype: torch.dtype,
                   rng: np.random.Generator) -> tuple[BatchNorm, torch.nn.Module]:
    """A project BatchNorm and its PyTorch twin (BatchNorm2d for 4-D input, BatchNorm1d for 2-D) with the same
    random gamma and beta and the same defaults; the project's arrays in `dtype` (float64: buffers too)."""
    ours = BatchNorm(channels)
    if dtype == np.float64:
        to_float64(ours)
    ours.params["gamma"][...] = rng.uniform(0.5, 2.0, channels) * rng.choice([-1.0, 1.0], channels)
    ours.params["beta"][...] = rng.standard_normal(channels)
    module_class = torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm1d
    theirs = module_class(channels, eps=ours.eps, momentum=ours.momentum, dtype=torch_dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.params["gamma"]))
        theirs.bias.copy_(torch.from_numpy(ours.params["beta"]))
    return ours, theirs


def assert_close_to_torch(name: str, ours: np.ndarray, theirs: np.ndarray, tolerance: float) -> None:
    error = relative_difference(ours, theirs)
    assert error < tolerance, f"{name}: relative difference {error:.2e} from PyTorch"


BATCHNORM_SHAPES = [(4, 5, 3, 3), (2, 3, 4, 2), (1, 6, 5, 4), (8, 5), (3, 7)]


@pytest.mark.parametrize(("dtype", "torch_dtype", "tolerance"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", BATCHNORM_SHAPES, ids=str)
def test_batchnorm_training_step_matches_pytorch(shape: tuple[int, ...], dtype: type, torch_dtype: torch.dtype,
                                                 tolerance: float) -> None:
    """In training mode: the output, dx, dgamma and dbeta (through the batch statistics) and the running
    statistics after the step equal BatchNorm2d's / BatchNorm1d's."""
    rng = np.random.default_rng(sum(shape))
    ours, theirs = batchnorm_pair(shape[-1], len(shape), dtype, torch_dtype, rng)
    x, upstream = shifted_input(rng, shape, dtype), rng.standard_normal(shape).astype(dtype)

    y = ours.forward(x)
    grad_x = ours.backward(upstream)
    x_torch = to_torch(x).requires_grad_(True)
    theirs.train()
    y_torch = theirs(x_torch)
    y_torch.backward(to_torch(upstream))

    assert y.dtype == dtype
    assert_close_to_torch("y", y, from_torch(y_torch), tolerance)
    assert_close_to_torch("dx", grad_x, from_torch(x_torch.grad), tolerance)
    assert_close_to_torch("dgamma", ours.grads["gamma"], theirs.weight.grad.numpy(), tolerance)
    assert_close_to_torch("dbeta", ours.grads["beta"], theirs.bias.grad.numpy(), tolerance)
    assert_close_to_torch("running_mean", ours.buffers["running_mean"], theirs.running_mean.numpy(), tolerance)
    assert_close_to_torch("running_var", ours.buffers["running_var"], theirs.running_var.numpy(), tolerance)


@pytest.mark.parametrize(("dtype", "torch_dtype", "tolerance"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", BATCHNORM_SHAPES, ids=str)
def test_batchnorm_running_statistics_and_evaluation_after_five_steps_match_pytorch(
        shape: tuple[int, ...], dtype: type, torch_dtype: torch.dtype, tolerance: float) -> None:
    """After five training steps on batches of different means and spreads, running_mean and running_var equal
    PyTorch's (momentum 0.1, unbiased variance), and so does the evaluation output, which uses them."""
    rng = np.random.default_rng(len(shape) + sum(shape))
    ours, theirs = batchnorm_pair(shape[-1], len(shape), dtype, torch_dtype, rng)
    theirs.train()
    for _ in range(5):
        x = shifted_input(rng, shape, dtype)
        ours.forward(x)
        with torch.no_grad():
            theirs(to_torch(x))
    assert_close_to_torch("running_mean", ours.buffers["running_mean"], theirs.running_mean.numpy(), tolerance)
    assert_close_to_torch("running_var", ours.buffers["running_var"], theirs.running_var.numpy(), tolerance)

    x = shifted_input(rng, shape, dtype)
    theirs.eval()
    with torch.no_grad():
        y_torch = theirs(to_torch(x))
    y = ours.forward(x, training=False)
    assert y.dtype == dtype
    assert_close_to_torch("y (evaluation)", y, from_torch(y_torch), tolerance)
    # Evaluation really used the running statistics: the batch's own would give another output.
    assert relative_difference(ours.forward(x, training=True), from_torch(y_torch)) > 100 * tolerance


# (pool, stride) on a 9 x 8 input: disjoint, non-dividing, overlapping, gapped
AVGPOOL_CASES = [(2, None), (3, None), (2, 1), (3, 2), (4, 3), (2, 3)]


@pytest.mark.parametrize(("dtype", "torch_dtype", "tolerance"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("pool_size", "stride"), AVGPOOL_CASES)
def test_avgpool2d_matches_pytorch(pool_size: int, stride: int | None, dtype: type, torch_dtype: torch.dtype,
                                   tolerance: float) -> None:
    """AvgPool2D's output and input gradient equal AvgPool2d's (no padding, so count_include_pad is moot)."""
    rng = np.random.default_rng(10 * pool_size + (stride or 0))
    x = rng.standard_normal((2, 9, 8, 3)).astype(dtype)
    layer = AvgPool2D(pool_size, stride)
    y = layer.forward(x)
    upstream = rng.standard_normal(y.shape).astype(dtype)
    grad_x = layer.backward(upstream)

    x_torch = to_torch(x).requires_grad_(True)
    y_torch = torch.nn.AvgPool2d(pool_size, stride)(x_torch)
    y_torch.backward(to_torch(upstream))
    assert_close_to_torch("y", y, from_torch(y_torch), tolerance)
    assert_close_to_torch("dx", grad_x, from_torch(x_torch.grad), tolerance)


@pytest.mark.parametrize(("dtype", "torch_dtype", "tolerance"), DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (6, 7)], ids=str)
def test_tanh_matches_pytorch(shape: tuple[int, ...], dtype: type, torch_dtype: torch.dtype,
                              tolerance: float) -> None:
    """Tanh's output and input gradient equal torch.tanh's, including its flat tails."""
    rng = np.random.default_rng(len(shape))
    x, upstream = (3 * rng.standard_normal(shape)).astype(dtype), rng.standard_normal(shape).astype(dtype)
    layer = Tanh()
    y = layer.forward(x)
    grad_x = layer.backward(upstream)
    x_torch = to_torch(x).requires_grad_(True)
    y_torch = torch.tanh(x_torch)
    y_torch.backward(to_torch(upstream))
    assert_close_to_torch("y", y, from_torch(y_torch), tolerance)
    assert_close_to_torch("dx", grad_x, from_torch(x_torch.grad), tolerance)
