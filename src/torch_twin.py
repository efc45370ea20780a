"""The PyTorch twin of a numpy-cnn model: the same layers as a torch.nn.Sequential, the same weights, the same
numbers; and the .pt files of --export FILE.pt and --load-model FILE.pt.

One PyTorch module per project layer, in order: Conv2D -> nn.Conv2d, Dense -> nn.Linear, BatchNorm ->
nn.BatchNorm2d on images and nn.BatchNorm1d on vectors (same momentum, eps and running statistics), ReLU, Tanh,
MaxPool2D -> nn.MaxPool2d, AvgPool2D -> nn.AvgPool2d, Flatten, Dropout. The layouts differ, the numbers do not:

    images                 project (N, H, W, C)        PyTorch (N, C, H, W)
    conv weights           project (k, k, C, F)        PyTorch (F, C, k, k)
    dense weights          project (in, out)           PyTorch (out, in)
    flatten of an image    project (H, W, C) order     PyTorch (C, H, W) order

so the rows of the dense layer after a Flatten (and the per-feature values of a BatchNorm between them) are
permuted (flatten_order). Every conversion here is a transpose or a permutation: weights go from one side to the
other and back bit for bit.

A .pt file is `torch.save({"state_dict": the twin's state_dict, "meta": {...}})`, meta being what a model file
records (architecture, input shape, class names, training summary). It is read with torch.load(weights_only=True):
tensors, dicts, lists, strings and numbers, never arbitrary pickled objects.

A leaf module: it never imports main, and layers are told apart by their class names. torch is imported only
inside the functions that need it, so that the program runs without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from errors import ModelFileError

PT_FORMAT = "numpy-cnn-torch-twin"
INSTALL_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
# The project's parameter names and PyTorch's for the same tensor.
TORCH_PARAMETER_NAMES = {"W": "weight", "b": "bias", "gamma": "weight", "beta": "bias"}


class TwinParameter(NamedTuple):
    """A project parameter and its PyTorch twin."""

    layer_index: int  # in model.layers, and in the twin (one PyTorch module per project layer)
    name: str  # the project's name: W, b, gamma or beta
    tensor: Any  # the PyTorch parameter
    to_torch_layout: Callable[[np.ndarray], np.ndarray]  # a project array (or its gradient) in PyTorch's layout


def flatten_order(shape: tuple[int, int, int]) -> np.ndarray:
    """For Flatten of an (H, W, C) image: PyTorch's feature j (in (C, H, W) order) is the project's feature
    flatten_order(shape)[j] (in (H, W, C) order)."""
    height, width, channels = shape
    return np.arange(height * width * channels).reshape(height, width, channels).transpose(2, 0, 1).reshape(-1)


def layouts(model: Any) -> list[dict[str, Callable[[np.ndarray], np.ndarray]]]:
    """For each layer of a project model, {project array name: the function that puts that array (a weight, its
    gradient or a BatchNorm statistic) in PyTorch's layout}. Each function is a transpose or a permutation."""
    result, shape, feature_order = [], tuple(model.input_shape), None  # feature_order: see flatten_order
    for layer in model.layers:
        kind, order = type(layer).__name__, feature_order
        if kind == "Conv2D":
            result.append({"W": lambda a: a.transpose(3, 2, 0, 1), "b": lambda a: a})
        elif kind == "Dense":
            result.append({"W": lambda a, o=order: (a if o is None else a[o]).T, "b": lambda a: a})
            feature_order = None
        elif kind == "BatchNorm":
            per_feature = (lambda a: a) if order is None else (lambda a, o=order: a[o])
            result.append(dict.fromkeys(("gamma", "beta", "running_mean", "running_var"), per_feature))
        else:
            result.append({})
            if kind == "Flatten" and len(shape) == 3:
                feature_order = flatten_order(shape)
        shape = layer.output_shape(shape)
    return result


def inverse_layouts(model: Any) -> list[dict[str, Callable[[np.ndarray], np.ndarray]]]:
    """The inverses of layouts(model): a PyTorch array -> the project's layout."""
    result = []
    for layer, forward in zip(model.layers, layouts(model)):
        inverse = {}
        for name, to_torch in forward.items():
            shape = {**layer.params, **layer.buffers}[name].shape
            # positions: PyTorch's layout of the project's flat indices; undo: where PyTorch keeps each of them.
            positions = to_torch(np.arange(int(np.prod(shape))).reshape(shape))
            undo = np.empty(positions.size, dtype=np.int64)
            undo[positions.reshape(-1)] = np.arange(positions.size)
            inverse[name] = lambda a, u=undo, s=shape: a.reshape(-1)[u].reshape(s)
        result.append(inverse)
    return result


def module_for(layer: Any, shape: tuple[int, ...]) -> Any:
    """The PyTorch module of one project layer whose input has `shape` (without N)."""
    from torch import nn

    kind = type(layer).__name__
    if kind == "Conv2D":
        k, _, channels, filters = layer.params["W"].shape
        return nn.Conv2d(channels, filters, k, stride=layer.stride, padding=layer.padding)
    if kind == "Dense":
        return nn.Linear(*layer.params["W"].shape)
    if kind == "BatchNorm":
        norm = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
        return norm(shape[-1], eps=layer.eps, momentum=layer.momentum)
    if kind == "Dropout":
        return nn.Dropout(layer.rate)
    if kind == "MaxPool2D":
        return nn.MaxPool2d(layer.pool_size, layer.stride)
    if kind == "AvgPool2D":
        return nn.AvgPool2d(layer.pool_size, layer.stride)
    simple = {"ReLU": nn.ReLU, "Tanh": nn.Tanh, "Flatten": nn.Flatten}
    if kind not in simple:
        raise ModelFileError(f"no PyTorch twin for the layer {kind}")
    return simple[kind]()


def torch_twin(model: Any) -> tuple[Any, list[TwinParameter]]:
    """The torch.nn.Sequential with the same layers and the same weights (and BatchNorm statistics) as the
    project's model, and the list of its parameters paired with the project's. The twin's tensors are copies,
    in the project's dtype (float32, or float64 for a model converted for a gradient check)."""
    import torch
    from torch import nn

    modules, pairs, shape = [], [], tuple(model.input_shape)
    for index, (layer, layout) in enumerate(zip(model.layers, layouts(model))):
        module = module_for(layer, shape)
        for name, array in layer.params.items():
            tensor = getattr(module, TORCH_PARAMETER_NAMES[name])
            tensor.data = torch.from_numpy(np.array(layout[name](array), order="C"))  # a copy
            pairs.append(TwinParameter(index, name, tensor, layout[name]))
        for name, array in layer.buffers.items():  # running_mean, running_var: PyTorch's names too
            setattr(module, name, torch.from_numpy(np.array(layout[name](array), order="C")))
        modules.append(module)
        shape = layer.output_shape(shape)
    return nn.Sequential(*modules), pairs


def torch_optimizer(twin: Any, training: dict) -> tuple[Any, list]:
    """The optimiser of the config for the twin: Adam, AdamW (Adam with weight decay) or SGD with momentum,
    with weight decay as the project's (main.Optimizer.decay_weights): decoupled, and only on conv kernels and
    dense matrices (one param group), not on biases or BatchNorm's weight and bias (the other group).

    Returns the optimiser and the tensors to decay by hand before each SGD step: torch.optim.SGD's weight_decay
    adds an L2 term to the gradient, which is not decoupled decay.
    """
    import torch
    from torch import nn

    weight_decay, learning_rate = training["weight_decay"], training["learning_rate"]
    decayed = [module.weight for module in twin if isinstance(module, (nn.Conv2d, nn.Linear))]
    decayed_ids = {id(tensor) for tensor in decayed}
    others = [tensor for tensor in twin.parameters() if id(tensor) not in decayed_ids]
    if training["optimizer"] == "sgd":
        sgd = torch.optim.SGD(twin.parameters(), lr=learning_rate, momentum=training["momentum"])
        return sgd, decayed if weight_decay else []
    if not weight_decay:  # one group, as a PyTorch user would write it
        return torch.optim.Adam(twin.parameters(), lr=learning_rate), []
    groups = [{"params": group, "weight_decay": decay}
              for group, decay in ((decayed, weight_decay), (others, 0.0)) if group]
    return torch.optim.AdamW(groups, lr=learning_rate), []


def decay_by_hand(optimizer: Any, tensors: list, weight_decay: float) -> None:
    """The decoupled weight decay of main.Optimizer.decay_weights on the tensors torch_optimizer returned (SGD's):
    each shrinks by lr * weight_decay * itself, before the optimiser's step."""
    if not tensors:
        return
    import torch

    with torch.no_grad():
        for tensor in tensors:
            tensor.mul_(1 - optimizer.param_groups[0]["lr"] * weight_decay)


def torch_schedule(optimizer: Any, schedule: dict, base_lr: float, steps_per_epoch: int, total_steps: int) -> Any:
    """PyTorch's scheduler for main.learning_rate_schedule(schedule, base_lr, steps_per_epoch, total_steps), to be
    stepped after every batch (None for a constant rate): OneCycleLR (cosine, two phases, momentum left alone, as
    the project's one-cycle), CosineAnnealingLR over total_steps, StepLR with the step size in batches."""
    from torch.optim import lr_scheduler

    name = schedule["name"]
    if name == "one_cycle":
        return lr_scheduler.OneCycleLR(optimizer, max_lr=base_lr, total_steps=total_steps,
                                       pct_start=schedule["pct_start"], anneal_strategy="cos", cycle_momentum=False,
                                       div_factor=schedule["div_factor"],
                                       final_div_factor=schedule["final_div_factor"], three_phase=False)
    if name == "cosine":
        return lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=schedule["min_lr"])
    if name == "step":
        return lr_scheduler.StepLR(optimizer, step_size=schedule["step_size"] * steps_per_epoch,
                                   gamma=schedule["gamma"])
    return None


def state_dict_arrays(model: Any) -> dict[str, np.ndarray]:
    """The twin's state_dict as NumPy arrays ('0.weight', '0.bias', '1.running_mean', ...): the project's weights
    and statistics in PyTorch's layout, without building the twin (no torch needed). A BatchNorm's
    num_batches_tracked, which the project does not count (it only matters to PyTorch's momentum=None), is 0."""
    arrays = {}
    for index, (layer, layout) in enumerate(zip(model.layers, layouts(model))):
        for name, array in {**layer.params, **layer.buffers}.items():
            arrays[f"{index}.{TORCH_PARAMETER_NAMES.get(name, name)}"] = np.ascontiguousarray(layout[name](array))
        if layer.buffers:
            arrays[f"{index}.num_batches_tracked"] = np.array(0, dtype=np.int64)
    return arrays


def copy_from_state_dict(model: Any, state_dict: dict[str, Any], where: str) -> None:
    """Put a twin's state_dict (tensors or arrays) into the project's model, in the project's layout and dtype.
    ModelFileError (one line, naming `where`) when a weight is missing, extra, of another shape or not finite.
    BatchNorm's num_batches_tracked, which the project does not keep, is ignored."""
    expected = {f"{index}.{TORCH_PARAMETER_NAMES.get(name, name)}": (layer, name, layout[name], inverse[name])
                for index, (layer, layout, inverse) in enumerate(zip(model.layers, layouts(model),
                                                                     inverse_layouts(model)))
                for name in inverse}
    given = {key for key in state_dict if not key.endswith(".num_batches_tracked")}
    if given != set(expected):
        differing = sorted(given ^ set(expected))[:3]
        raise ModelFileError(f"{where}: weights {differing} do not fit the layer list (its state_dict has "
                             f"{len(given)} tensors, the layers need {len(expected)})")
    for key, (layer, name, to_torch, to_project) in expected.items():
        value = state_dict[key]
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        target = {**layer.params, **layer.buffers}[name]
        needed = to_torch(target).shape
        if array.shape != needed or array.dtype.kind != "f":
            raise ModelFileError(f"{where}: {key} has shape {tuple(array.shape)} ({array.dtype}), the layer "
                                 f"needs {tuple(needed)} (float)")
        if not np.isfinite(array).all():
            raise ModelFileError(f"{where}: {key} holds NaN or infinite values")
        target[...] = to_project(array)


def save_pt(path: Path, model: Any, meta: dict, write: Callable[[Path, Callable[[Any], None]], None]) -> None:
    """--export FILE.pt: torch.save({"state_dict": the twin's state_dict, "meta": meta}) through write(path,
    writer) (plumbing.write_atomic: whole or not at all). torch.load(FILE, weights_only=True) reads it back, and
    build_twin(meta["model"], meta["input_shape"], len(meta["class_names"])).load_state_dict(...) gives the twin."""
    import torch

    state = {key: torch.from_numpy(array) for key, array in state_dict_arrays(model).items()}
    document = {"state_dict": state, "meta": dict(meta, format=PT_FORMAT)}
    write(path, lambda f: torch.save(document, f))


def read_pt(path: Path) -> tuple[dict[str, Any], dict]:
    """(state_dict, meta) of a .pt file: {"state_dict": ..., "meta": ...} as save_pt writes it, or a bare
    state_dict (meta {}). Read with torch.load(weights_only=True) only: never unpickles anything but tensors and
    plain containers. ModelFileError (one line) for anything else, and when torch is not installed."""
    try:
        import torch
    except ImportError:
        raise ModelFileError(f"{path}: reading a .pt file needs PyTorch, which is not installed: {INSTALL_TORCH}"
                             ) from None

    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a torch file, damaged, or holding objects weights_only refuses
        text = " ".join(str(error).split())[:160]
        raise ModelFileError(f"{path}: not a readable PyTorch state_dict ({type(error).__name__}: {text})") from None
    if isinstance(document, dict) and "state_dict" in document:
        state_dict, meta = document["state_dict"], document.get("meta") or {}
    else:
        state_dict, meta = document, {}
    if not isinstance(state_dict, dict) or not all(hasattr(value, "detach") for value in state_dict.values()):
        raise ModelFileError(f"{path}: not a PyTorch state_dict (a mapping of names to tensors)")
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: its meta entry is not a mapping")
    return state_dict, meta


def build_twin(model_cfg: dict, input_shape: tuple[int, int, int], num_classes: int,
               build_model: Callable[..., Any], seed: int = 0) -> Any:
    """The twin of a layer list (a config's model section), with the weights numpy-cnn would start from with
    this seed: build_model (main.build_model) builds the project's model, torch_twin copies it."""
    model = build_model(model_cfg, tuple(input_shape), num_classes, np.random.default_rng(seed))
    return torch_twin(model)[0]
