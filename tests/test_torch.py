"""Differential tests against PyTorch: same network, same weights, same batch -> same loss, logits, gradients
and Adam step. Optional: skipped when torch is not installed (it is not a project dependency).

Layout differences handled here, once:
- images: the project is channels-last (N, H, W, C), PyTorch channels-first (N, C, H, W);
- conv weights: project (k, k, C, F), PyTorch (F, C, k, k)  -> transpose(3, 2, 0, 1);
- dense weights: project (in, out), PyTorch (out, in)       -> transpose;
- the dense layer after Flatten: the project flattens (H, W, C), PyTorch (C, H, W), so its input rows are
  permuted: PyTorch row (c, h, w) is project row (h, w, c).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

import config_schema
import main

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

INPUT_SHAPE = (28, 28, 1)
N_CLASSES = 10
BATCH = 8


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run both libraries on one thread: for these tiny matrices it is the fastest, and it cannot be stalled by
    the BLAS threads of a multithreaded matrix multiply waiting for each other on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it numpy keeps its threads
        limit = contextlib.nullcontext()
    else:
        limit = threadpool_limits(limits=1)
    with limit:
        yield
    torch.set_num_threads(previous)


def seed_model(dtype: type, seed: int = 0) -> main.Sequential:
    """The seed architecture (config_schema.DEFAULT_CONFIG["model"]) with its weights (and gradients) in `dtype`."""
    model = main.build_model(config_schema.DEFAULT_CONFIG["model"], INPUT_SHAPE, N_CLASSES, np.random.default_rng(seed))
    for layer in model.layers:
        for name in layer.params:
            layer.params[name] = layer.params[name].astype(dtype)
            layer.grads[name] = np.zeros_like(layer.params[name])
    # He initialisation leaves the biases at zero; random ones make the bias gradients' path count too.
    for layer in model.layers:
        if "b" in layer.params:
            layer.params["b"][...] = np.random.default_rng(seed + 1).normal(0, 0.1, layer.params["b"].shape)
    return model


def to_torch_layout(layer: object, name: str, array: np.ndarray, flattened_from: tuple | None) -> np.ndarray:
    """A project weight (or gradient) array rearranged into PyTorch's layout for the same layer."""
    if name == "b":
        return array
    if isinstance(layer, main.Conv2D):
        return array.transpose(3, 2, 0, 1)  # (k, k, C, F) -> (F, C, k, k)
    if flattened_from is not None:  # rows in (H, W, C) order -> (C, H, W) order
        height, width, channels = flattened_from
        array = array.reshape(height, width, channels, -1).transpose(2, 0, 1, 3).reshape(array.shape)
    return array.T  # (in, out) -> (out, in)


def torch_twin(model: main.Sequential, dtype: torch.dtype) -> tuple[torch.nn.Sequential, list[tuple]]:
    """The same network in PyTorch with copies of the project's weights, and a list pairing every project
    parameter with its PyTorch twin: (layer index, name, project layer, torch parameter, flattened_from)."""
    nn = torch.nn
    modules, pairs, shape, flattened_from = [], [], model.input_shape, None
    for index, layer in enumerate(model.layers):
        if isinstance(layer, main.Conv2D):
            k, _, channels, filters = layer.params["W"].shape
            module = nn.Conv2d(channels, filters, k, stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, main.Dense):
            module = nn.Linear(*layer.params["W"].shape)
        elif isinstance(layer, main.ReLU):
            module = nn.ReLU()
        elif isinstance(layer, main.MaxPool2D):
            module = nn.MaxPool2d(layer.pool_size, layer.stride)
        elif isinstance(layer, main.Flatten):
            module = nn.Flatten()
        else:
            raise TypeError(f"no PyTorch twin for {type(layer).__name__}")
        module = module.to(dtype)
        for name, torch_name in (("W", "weight"), ("b", "bias")):
            if name in layer.params:
                parameter = getattr(module, torch_name)
                arranged = to_torch_layout(layer, name, layer.params[name], flattened_from)
                with torch.no_grad():
                    parameter.copy_(torch.from_numpy(np.ascontiguousarray(arranged)))
                pairs.append((index, name, layer, parameter, flattened_from))
        if isinstance(layer, main.Dense):
            flattened_from = None
        if isinstance(layer, main.Flatten):
            flattened_from = shape
        modules.append(module)
        shape = layer.output_shape(shape)
    return nn.Sequential(*modules), pairs


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs|: the error relative to the tensor's scale (elementwise relative
    error is meaningless for entries that are ~0 by cancellation)."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"shapes differ: {ours.shape} vs {theirs.shape}"
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-300))


def batch(dtype: type, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((BATCH, *INPUT_SHAPE)).astype(dtype), rng.integers(0, N_CLASSES, BATCH)


def forward_backward_both(dtype: type, torch_dtype: torch.dtype) -> dict:
    """One forward and backward pass of the same batch through the project's model and its PyTorch twin."""
    model = seed_model(dtype)
    twin, pairs = torch_twin(model, torch_dtype)
    x, labels = batch(dtype)

    loss_fn = main.SoftmaxCrossEntropy()
    logits = model.forward(x)
    loss = loss_fn.forward(logits, labels)
    model.backward(loss_fn.backward())

    x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    torch_logits = twin(x_torch)
    torch_loss = torch.nn.functional.cross_entropy(torch_logits, torch.from_numpy(labels))
    torch_loss.backward()
    return {"model": model, "twin": twin, "pairs": pairs, "logits": logits, "loss": loss,
            "torch_logits": torch_logits.detach().numpy(), "torch_loss": float(torch_loss.detach())}


@pytest.mark.parametrize(("dtype", "torch_dtype", "tolerance"), [
    (np.float64, torch.float64, 1e-10),
    (np.float32, torch.float32, 1e-4),
], ids=["float64", "float32"])
def test_loss_logits_and_every_gradient_match_pytorch(dtype: type, torch_dtype: torch.dtype,
                                                      tolerance: float) -> None:
    """With identical weights and inputs, the seed model's logits, loss and the gradient of every conv and
    dense weight and bias agree with PyTorch's autograd (so conv, pooling, ReLU, flatten order, dense,
    softmax cross-entropy and all their backward passes compute what PyTorch computes)."""
    run = forward_backward_both(dtype, torch_dtype)
    assert run["logits"].dtype == dtype
    logits_error = relative_difference(run["logits"], run["torch_logits"])
    assert logits_error < tolerance, f"logits: relative difference {logits_error:.2e}"
    loss_error = abs(run["loss"] - run["torch_loss"]) / abs(run["torch_loss"])
    assert loss_error < tolerance, f"loss {run['loss']} vs PyTorch's {run['torch_loss']}"
    assert len(run["pairs"]) == 8  # W and b of two convs and two dense layers
    for index, name, layer, parameter, flattened_from in run["pairs"]:
        ours = to_torch_layout(layer, name, layer.grads[name], flattened_from)
        error = relative_difference(ours, parameter.grad.numpy())
        assert error < tolerance, f"layer {index} ({type(layer).__name__}).{name}: relative difference {error:.2e}"


def test_one_adam_step_matches_pytorch() -> None:
    """From identical weights and identical gradients, one step of main.Adam (lr 1e-3) moves every weight
    exactly as PyTorch's Adam does (bias correction included: without it the first step would be ~3x off).

    PyTorch's side is torch.optim.adam.adam, the functional form that torch.optim.Adam.step runs (public, in
    the module's __all__): constructing the torch.optim.Adam class imports torch._dynamo, 2-5 s on this machine.
    """
    from torch.optim.adam import adam as torch_adam

    run = forward_backward_both(np.float64, torch.float64)
    model, pairs = run["model"], run["pairs"]
    before = {(index, name): layer.params[name].copy() for index, name, layer, _, _ in pairs}
    params = [parameter.detach() for *_, parameter, _ in pairs]
    grads = [torch.from_numpy(np.ascontiguousarray(to_torch_layout(layer, name, layer.grads[name], flattened_from)))
             for _, name, layer, _, flattened_from in pairs]  # the very same gradients on both sides

    optimizer = main.Adam(learning_rate=1e-3)
    optimizer.step(model)
    torch_adam(
        params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [],
        [torch.tensor(0.0) for _ in params], foreach=False, amsgrad=False, beta1=optimizer.beta1,
        beta2=optimizer.beta2, lr=optimizer.learning_rate, weight_decay=0.0, eps=optimizer.eps, maximize=False)

    for (index, name, layer, _, flattened_from), torch_param in zip(pairs, params):
        step = to_torch_layout(layer, name, layer.params[name] - before[index, name], flattened_from)
        torch_step = torch_param.numpy() - to_torch_layout(layer, name, before[index, name], flattened_from)
        assert np.abs(torch_step).max() > 5e-4  # the step really moved the weights (by about lr)
        error = relative_difference(step, torch_step)
        assert error < 1e-9, f"layer {index} ({type(layer).__name__}).{name}: Adam step differs by {error:.2e}"
