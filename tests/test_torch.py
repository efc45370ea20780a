"""Differential tests against PyTorch: same network, same weights, same batch -> same loss, logits, gradients
and Adam step; AdamW's decoupled weight decay over three steps; the learning-rate schedules against PyTorch's
schedulers; BatchNorm's running statistics inside a small model trained for a few steps; and the layers BatchNorm
(as BatchNorm2d and BatchNorm1d, training and evaluation), AvgPool2D (as AvgPool2d) and Tanh on their own.
Optional: skipped when torch is not installed (it is not a project dependency).

The PyTorch network is the project's twin (src/torch_twin.py), which handles the layout differences: images
channels-first, conv weights (F, C, k, k), dense weights (out, in), the features after Flatten in (C, H, W) order.
Each pair it returns puts a project array (a weight, its gradient) in PyTorch's layout. The single layers are
compared directly: 4-D inputs and gradients are transposed with (0, 3, 1, 2) on the way in and (0, 2, 3, 1) on
the way back; gamma and beta are PyTorch's weight and bias; running_mean and running_var have the same names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import to_float64

import config_schema
import main
from main import AvgPool2D, BatchNorm, Tanh
from torch_twin import layouts, torch_twin

torch = pytest.importorskip("torch", reason="PyTorch is not installed (requirements-test.txt); the program never "
                                                   "needs it, only these comparisons do")

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


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| / max |theirs|: the error relative to the tensor's scale (elementwise relative
    error is meaningless for entries that are ~0 by cancellation)."""
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"shapes differ: {ours.shape} vs {theirs.shape}"
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-300))


def batch(dtype: type, seed: int = 2, input_shape: tuple = INPUT_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((BATCH, *input_shape)).astype(dtype), rng.integers(0, N_CLASSES, BATCH)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def forward_backward_both(dtype: type, torch_dtype: torch.dtype) -> dict:
    """One forward and backward pass of the same batch through the project's model and its PyTorch twin."""
    model = seed_model(dtype)
    twin, pairs = torch_twin(model)
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
    for index, name, parameter, to_torch_layout in run["pairs"]:
        layer = run["model"].layers[index]
        error = relative_difference(to_torch_layout(layer.grads[name]), parameter.grad.numpy())
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
    before = {(index, name): model.layers[index].params[name].copy() for index, name, _, _ in pairs}
    params = [parameter.detach() for _, _, parameter, _ in pairs]
    grads = [torch.from_numpy(np.ascontiguousarray(to_torch_layout(model.layers[index].grads[name])))
             for index, name, _, to_torch_layout in pairs]  # the very same gradients on both sides

    optimizer = main.Adam(learning_rate=1e-3)
    optimizer.step(model)
    torch_adam(
        params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [],
        [torch.tensor(0.0) for _ in params], foreach=False, amsgrad=False, beta1=optimizer.beta1,
        beta2=optimizer.beta2, lr=optimizer.learning_rate, weight_decay=0.0, eps=optimizer.eps, maximize=False)

    for (index, name, _, to_torch_layout), torch_param in zip(pairs, params):
        layer = model.layers[index]
        step = to_torch_layout(layer.params[name] - before[index, name])
        torch_step = torch_param.numpy() - to_torch_layout(before[index, name])
        assert np.abs(torch_step).max() > 5e-4  # the step really moved the weights (by about lr)
        error = relative_difference(step, torch_step)
        assert error < 1e-9, f"layer {index} ({type(layer).__name__}).{name}: Adam step differs by {error:.2e}"


def test_three_sgd_momentum_steps_match_pytorch() -> None:
    """From identical weights, three steps of main.SGD (lr 0.05, momentum 0.9) with the same gradients each time
    move every weight as PyTorch's SGD does (v = momentum * v + g; w -= lr * v). From the second step on, the
    velocity's sign and size show: a momentum of -0.9 or a velocity left out would miss by far.

    PyTorch's side is torch.optim.sgd.sgd, the functional form that torch.optim.SGD.step runs."""
    from torch.optim.sgd import sgd as torch_sgd

    run = forward_backward_both(np.float64, torch.float64)
    model, pairs = run["model"], run["pairs"]
    before = {(index, name): model.layers[index].params[name].copy() for index, name, _, _ in pairs}
    params = [parameter.detach() for _, _, parameter, _ in pairs]
    grads = [torch.from_numpy(np.ascontiguousarray(to_torch_layout(model.layers[index].grads[name])))
             for index, name, _, to_torch_layout in pairs]
    optimizer = main.SGD(learning_rate=0.05, momentum=0.9)
    velocities: list = [None] * len(params)
    for _ in range(3):
        optimizer.step(model)
        torch_sgd(params, grads, velocities, foreach=False, weight_decay=0.0, momentum=optimizer.momentum,
                  lr=optimizer.learning_rate, dampening=0.0, nesterov=False, maximize=False)

    for (index, name, _, to_torch_layout), torch_param in zip(pairs, params):
        layer = model.layers[index]
        step = to_torch_layout(layer.params[name] - before[index, name])
        torch_step = torch_param.numpy() - to_torch_layout(before[index, name])
        error = relative_difference(step, torch_step)
        assert error < 1e-9, f"layer {index} ({type(layer).__name__}).{name}: SGD steps differ by {error:.2e}"


# A small network with every layer type that has a PyTorch twin here, BatchNorm after a conv layer (BatchNorm2d),
# straight after Flatten (BatchNorm1d on permuted features) and after a dense layer, on 12x12 images.
SMALL_INPUT_SHAPE = (12, 12, 1)
SMALL_LAYERS = [{"conv2d": {"filters": 4, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu",
                {"maxpool2d": {"pool_size": 2}}, {"conv2d": {"filters": 8, "kernel_size": 3}}, "tanh",
                {"avgpool2d": {"pool_size": 2}}, "flatten", "batchnorm", {"dense": {"units": 16}}, "batchnorm",
                "relu", {"dense": {"units": N_CLASSES}}]


def small_model(seed: int) -> main.Sequential:
    """SMALL_LAYERS in float64, with random biases, BatchNorm scales and shifts (so that their paths count)."""
    model = main.build_model(config_schema.check_model({"layers": SMALL_LAYERS}), SMALL_INPUT_SHAPE, N_CLASSES,
                             np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    for layer in model.layers:
        to_float64(layer)
        for name in ("b", "beta"):
            if name in layer.params:
                layer.params[name][...] = rng.normal(0, 0.1, layer.params[name].shape)
        if "gamma" in layer.params:
            layer.params["gamma"][...] = rng.uniform(0.5, 1.5, layer.params["gamma"].shape)
    return model


def test_three_adamw_steps_with_weight_decay_match_pytorch() -> None:
    """Decoupled weight decay: three steps of main.Adam(lr, weight_decay=wd) move every weight as
    torch.optim.AdamW does with weight decay wd on the conv kernels and dense matrices (one param group) and
    none on the biases and BatchNorm's gamma and beta (the other group), in float64, from the same gradients.

    lr * wd = 5e-3 per step shrinks every W by about 1.5% over the three steps: decay applied to the wrong
    tensors, or added to the gradient (L2) rather than decoupled, would miss the tolerance by orders of magnitude.
    """
    learning_rate, weight_decay = 1e-2, 0.5
    model = small_model(seed=4)
    _, pairs = torch_twin(model)
    decayed = [parameter for _, name, parameter, _ in pairs if name == "W"]
    not_decayed = [parameter for _, name, parameter, _ in pairs if name != "W"]
    assert len(decayed) == 4 and len(not_decayed) == 4 + 2 * 3  # 2 conv + 2 dense; their biases, 3 gammas, betas
    torch_adamw = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                     {"params": not_decayed, "weight_decay": 0.0}], lr=learning_rate)
    optimizer = main.Adam(learning_rate, weight_decay=weight_decay)
    assert (optimizer.beta1, optimizer.beta2, optimizer.eps) == (*torch_adamw.defaults["betas"],
                                                                 torch_adamw.defaults["eps"])
    loss_fn = main.SoftmaxCrossEntropy()
    for step in range(3):
        x, labels = batch(np.float64, seed=10 + step, input_shape=SMALL_INPUT_SHAPE)
        loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward())
        for index, name, parameter, to_torch_layout in pairs:  # the very same gradients on both sides
            parameter.grad = torch.from_numpy(np.ascontiguousarray(to_torch_layout(model.layers[index].grads[name])))
        optimizer.step(model)
        torch_adamw.step()

    for index, name, parameter, to_torch_layout in pairs:
        layer = model.layers[index]
        error = relative_difference(to_torch_layout(layer.params[name]), parameter.detach().numpy())
        assert error < 1e-6, f"layer {index} ({type(layer).__name__}).{name}: differs by {error:.2e} after 3 steps"


def torch_learning_rates(scheduler_class: type, steps_per_epoch: int, n_steps: int, base_lr: float,
                         per_epoch: bool = False, **settings: float) -> list[float]:
    """The learning rate PyTorch uses at each of n_steps optimiser steps under scheduler_class(optimizer,
    **settings), stepped after every step, or after every epoch of steps_per_epoch steps (per_epoch)."""
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=base_lr)
    scheduler = scheduler_class(optimizer, **settings)
    rates = []
    for step in range(n_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradient: changes nothing, but keeps the scheduler's order check quiet
        if not per_epoch or (step + 1) % steps_per_epoch == 0:
            scheduler.step()
    return rates


def assert_same_rates(ours: list[float], theirs: list[float]) -> None:
    ours_array, theirs_array = np.array(ours), np.array(theirs)
    worst = int(np.argmax(np.abs(ours_array - theirs_array)))
    assert np.abs(ours_array - theirs_array).max() < 1e-12, \
        f"step {worst}: lr {ours[worst]!r}, PyTorch's {theirs[worst]!r}"
    assert np.max(np.abs(ours_array - theirs_array) / theirs_array) < 1e-9  # also where the rate is tiny


@pytest.mark.parametrize(("base_lr", "pct_start", "div_factor", "final_div_factor", "total_steps"), [
    (3e-3, 0.3, 25.0, 1e4, 50),  # the project's defaults, configs/mnist_best.yaml's peak
    (0.1, 0.25, 10.0, 100.0, 37),  # the peak between two steps
], ids=["defaults", "other-settings"])
def test_one_cycle_schedule_matches_onecyclelr(base_lr: float, pct_start: float, div_factor: float,
                                               final_div_factor: float, total_steps: int) -> None:
    """learning_rate_schedule("one_cycle") gives, step by step, the rate of PyTorch's OneCycleLR with the same
    max_lr, pct_start, div_factor and final_div_factor (cosine annealing, two phases), stepped after every batch."""
    schedule = {"name": "one_cycle", "pct_start": pct_start, "div_factor": div_factor,
                "final_div_factor": final_div_factor}
    rate = main.learning_rate_schedule(schedule, base_lr, steps_per_epoch=5, total_steps=total_steps)
    theirs = torch_learning_rates(torch.optim.lr_scheduler.OneCycleLR, 5, total_steps, base_lr, max_lr=base_lr,
                                  total_steps=total_steps, pct_start=pct_start, div_factor=div_factor,
                                  final_div_factor=final_div_factor, anneal_strategy="cos", three_phase=False,
                                  cycle_momentum=False)
    assert_same_rates([rate(step) for step in range(total_steps)], theirs)
    assert max(theirs) == pytest.approx(base_lr, rel=1e-2)  # the cycle really peaked (near a step)


def test_cosine_schedule_matches_cosineannealinglr() -> None:
    """learning_rate_schedule("cosine") gives, step by step, the rate of PyTorch's CosineAnnealingLR with
    T_max = total_steps and eta_min = min_lr, stepped after every batch."""
    base_lr, min_lr, total_steps = 3e-3, 1e-4, 50
    rate = main.learning_rate_schedule({"name": "cosine", "min_lr": min_lr}, base_lr, 5, total_steps)
    theirs = torch_learning_rates(torch.optim.lr_scheduler.CosineAnnealingLR, 5, total_steps, base_lr,
                                  T_max=total_steps, eta_min=min_lr)
    assert_same_rates([rate(step) for step in range(total_steps)], theirs)


def test_step_schedule_matches_steplr_stepped_per_epoch() -> None:
    """learning_rate_schedule("step") gives, at every batch, the rate of PyTorch's StepLR with the same
    step_size (in epochs) and gamma, stepped after every epoch."""
    base_lr, steps_per_epoch, epochs = 0.1, 7, 10
    schedule = {"name": "step", "step_size": 3, "gamma": 0.5}
    rate = main.learning_rate_schedule(schedule, base_lr, steps_per_epoch, steps_per_epoch * epochs)
    theirs = torch_learning_rates(torch.optim.lr_scheduler.StepLR, steps_per_epoch, steps_per_epoch * epochs,
                                  base_lr, per_epoch=True, step_size=3, gamma=0.5)
    assert_same_rates([rate(step) for step in range(steps_per_epoch * epochs)], theirs)
    assert theirs[-1] == pytest.approx(base_lr * 0.5 ** 3)  # epochs 9: three decays


def test_batchnorm_running_statistics_in_a_trained_model_match_pytorch() -> None:
    """Four SGD steps (momentum 0.9) of a small model with BatchNorm after a conv layer, after Flatten and
    after a dense layer, each side computing its own gradients on the same batches: afterwards every
    BatchNorm's running_mean and running_var equal PyTorch's, and so does the evaluation output, which uses
    them (float64). The statistics depend on the weights, which the steps changed, so this checks BatchNorm's
    training forward, its backward through the batch statistics and the running averages together."""
    model = small_model(seed=7)
    twin, _ = torch_twin(model)
    twin.train()
    learning_rate, momentum = 0.05, 0.9
    optimizer = main.SGD(learning_rate, momentum)
    torch_sgd = torch.optim.SGD(twin.parameters(), lr=learning_rate, momentum=momentum)
    loss_fn = main.SoftmaxCrossEntropy()
    for step in range(4):
        x, labels = batch(np.float64, seed=20 + step, input_shape=SMALL_INPUT_SHAPE)
        loss_fn.forward(model.forward(x), labels)
        model.backward(loss_fn.backward())
        optimizer.step(model)
        torch_sgd.zero_grad()
        torch.nn.functional.cross_entropy(twin(to_nchw(x)), torch.from_numpy(labels)).backward()
        torch_sgd.step()

    to_torch_layout = layouts(model)
    batchnorms = [index for index, layer in enumerate(model.layers) if isinstance(layer, main.BatchNorm)]
    assert [len(model.layers[index].buffers["running_mean"]) for index in batchnorms] == [4, 32, 16]
    for index in batchnorms:
        layer, module = model.layers[index], twin[index]
        assert int(module.num_batches_tracked) == 4
        for name in ("running_mean", "running_var"):
            ours = to_torch_layout[index][name](layer.buffers[name])
            error = relative_difference(ours, getattr(module, name).numpy())
            assert error < 1e-9, f"layer {index} {name}: relative difference {error:.2e} from PyTorch"
        # The statistics moved away from their start (zeros, ones) by what the four batches said.
        assert np.abs(layer.buffers["running_mean"]).max() > 1e-3

    x, _ = batch(np.float64, seed=30, input_shape=SMALL_INPUT_SHAPE)
    twin.eval()
    with torch.no_grad():
        torch_logits = twin(to_nchw(x)).numpy()
    error = relative_difference(model.forward(x, training=False), torch_logits)
    assert error < 1e-9, f"evaluation logits: relative difference {error:.2e} from PyTorch"


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
