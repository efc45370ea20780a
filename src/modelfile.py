"""Saving and loading models: one .npz file (never pickled) with the weights, the optimiser's state and a
JSON 'meta' entry (architecture, input shape, class names, training summary).

Called by main's command line (--save-model, --load-model, --predict). The model is rebuilt with the
build_model function passed in, so this leaf module never imports main.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from config_schema import check_model
from errors import ConfigError, ModelFileError
from plumbing import write_atomic

MODEL_FORMAT = "numpy-cnn-model"


def weight_key(index: int, name: str) -> str:
    """The name of layer `index`'s weight array `name` in a model file, e.g. 'layer3.W'."""
    return f"layer{index}.{name}"


def data_summary(data: Any) -> dict:
    """What a model file records of the data a model was trained on (main.Dataset): which set, from where."""
    return {"dataset": data.name, "source": data.source, "n_train": len(data.x_train), "n_test": len(data.x_test),
            "note": data.note}


def save_model(path: Path, model: Any, model_cfg: dict, data: Any, summary: dict, optimizer: Any = None) -> None:
    """One .npz: every weight and buffer ('layer<i>.<name>', e.g. 'layer0.W', 'layer1.running_mean'), the
    optimiser's state ('optimizer.<key>'), and a JSON 'meta' entry with the architecture (the model section's
    layer list), input shape, class names, data set and training summary."""
    arrays = {weight_key(i, name): array for i, layer in enumerate(model.layers)
              for name, array in {**layer.params, **layer.buffers}.items()}
    meta = {"format": MODEL_FORMAT, "version": 2, "model": model_cfg, "input_shape": list(model.input_shape),
            "class_names": data.class_names, "dataset": data.name, "data": data_summary(data), "training": summary}
    if optimizer is not None:
        meta["optimizer"] = {"name": optimizer.name, "t": getattr(optimizer, "t", 0)}
        arrays.update({f"optimizer.{key}": value for key, value in optimizer.state.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    write_atomic(path, lambda f: np.savez(f, **arrays))


@dataclass
class LoadedModel:
    model: Any
    meta: dict
    optimizer_state: dict[str, np.ndarray]


def load_model(path: Path, build_model: Callable[..., Any]) -> LoadedModel:
    """Rebuild a model saved by save_model with build_model(model_cfg, input_shape, num_classes, rng) (main's).
    Never unpickles; any defect is a ModelFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a numpy-cnn model file (not an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # not a zip, truncated, pickled objects, bad CRC: all "not a model file"
        raise ModelFileError(f"{path}: not a readable numpy-cnn model file ({type(error).__name__}: {error})") from None
    if "meta" not in arrays:
        raise ModelFileError(f"{path}: not a numpy-cnn model file (it has no 'meta' entry)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"its format is not {MODEL_FORMAT!r}")
        model_cfg = meta["model"] = check_model(meta["model"], convert_old_keys=True)
        input_shape, class_names = tuple(int(v) for v in meta["input_shape"]), [str(c) for c in meta["class_names"]]
        if len(input_shape) != 3 or min(input_shape) < 1 or len(class_names) < 2:
            raise ValueError(f"input shape {input_shape} or class names {class_names} make no sense")
        training, optimizer = meta.setdefault("training", {}), meta.get("optimizer")
        epochs, history = (training.get("epochs_completed", 0), training.get("history", [])) \
            if isinstance(training, dict) else (None, None)
        if (type(epochs) is not int or epochs < 0  # type(), not isinstance(): True is an int too
                or not isinstance(history, list) or not all(isinstance(row, dict) for row in history)):
            raise ValueError(f"its training summary {training!r:.80} is not a mapping with an integer "
                             "epochs_completed >= 0 and a list of history rows")
        if optimizer is not None and (not isinstance(optimizer, dict) or not isinstance(optimizer.get("name"), str)
                                      or not isinstance(optimizer.get("t", 0), int)):
            raise ValueError(f"its optimizer entry {optimizer!r:.80} is not a mapping with a name and a step count")
    except (KeyError, TypeError, ValueError, ConfigError) as error:
        raise ModelFileError(f"{path}: not a valid numpy-cnn model file (meta: {error})") from None
    try:
        model = build_model(model_cfg, input_shape, len(class_names), np.random.default_rng(0))
    except ConfigError as error:
        raise ModelFileError(f"{path}: the stored architecture does not fit its input shape ({error})") from None
    expected = {weight_key(i, name) for i, layer in enumerate(model.layers)
                for name in {**layer.params, **layer.buffers}}
    stored = {key for key in arrays if not key.startswith("optimizer.")}
    if stored != expected:
        raise ModelFileError(f"{path}: weights {sorted(stored ^ expected)[:3]} do not fit the stored architecture")
    for i, layer in enumerate(model.layers):
        for name, param in {**layer.params, **layer.buffers}.items():
            weights = arrays[weight_key(i, name)]
            if weights.shape != param.shape or weights.dtype.kind != "f":
                raise ModelFileError(f"{path}: {weight_key(i, name)} has shape {weights.shape} ({weights.dtype}), "
                                     f"the stored architecture needs {param.shape} (float)")
            param[...] = weights
    optimizer_state = {key.removeprefix("optimizer."): arrays[key] for key in arrays if key.startswith("optimizer.")}
    for key, state in optimizer_state.items():
        if state.dtype.kind != "f":
            raise ModelFileError(f"{path}: optimizer.{key} holds {state.dtype} values, not floats")
    return LoadedModel(model, meta, optimizer_state)


def restore_optimizer(optimizer: Any, loaded: LoadedModel, params: dict[str, np.ndarray]) -> bool:
    """Continue with the saved optimiser state when it is the same kind of optimiser and fits the weights.
    params: the loaded model's weights by the optimiser's keys (main.parameters), e.g. {'0.W': ...}."""
    saved = loaded.meta.get("optimizer") or {}
    if saved.get("name") != optimizer.name:
        return False
    for key, value in loaded.optimizer_state.items():
        owner = key.rsplit(".", 1)[0]
        if owner not in params or params[owner].shape != value.shape:
            return False
    optimizer.state = {key: value.astype(np.float32) for key, value in loaded.optimizer_state.items()}
    if hasattr(optimizer, "t"):
        optimizer.t = int(saved.get("t", 0))
    return True

