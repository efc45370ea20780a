"""Saving and loading models: one .npz file (never pickled) with the weights, the optimiser's state and a
JSON 'meta' entry (architecture, input shape, class names, training summary).

Called by main's command line (--save-model, --load-model, --predict). The model is rebuilt with the
build_model function passed in, so this leaf module never imports main.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from config_schema import check_model, shown
from errors import CNNError, ConfigError, DataError, ModelFileError
from images import preprocess_record
from plumbing import check_fits_in_memory, plural, write_atomic

log = logging.getLogger("numpy_cnn")

MODEL_FORMAT = "numpy-cnn-model"


def weight_key(index: int, name: str) -> str:
    """The name of layer `index`'s weight array `name` in a model file, e.g. 'layer3.W'."""
    return f"layer{index}.{name}"


def data_summary(data: Any) -> dict:
    """What a model file records of the data a model was trained on (main.Dataset): which set, from where."""
    return {"dataset": data.name, "source": data.source, "n_train": len(data.x_train), "n_test": len(data.x_test),
            "note": data.note}


MAX_EXAMPLES = 100  # test images a model file keeps, for the page to offer


def model_meta(model: Any, model_cfg: dict, data: Any, summary: dict) -> dict:
    """What a model file's meta entry records of a model trained on `data` (main.Dataset), with its first
    MAX_EXAMPLES test images as 'examples' ({images: uint8 (N, H, W, C), labels}: arrays, stored beside it)."""
    shown_images = np.round(data.x_test[:MAX_EXAMPLES] * 255).astype(np.uint8)
    return {"format": MODEL_FORMAT, "version": 3, "model": model_cfg, "input_shape": list(model.input_shape),
            "class_names": data.class_names, "dataset": data.name, "data": data_summary(data), "training": summary,
            "preprocess": preprocess_record(data.name, model.input_shape),
            "examples": {"images": shown_images, "labels": data.y_test[:MAX_EXAMPLES].astype(np.int64)}}


def model_file_arrays(model: Any, model_cfg: dict, data: Any, summary: dict, optimizer: Any = None,
                      **more_meta: Any) -> dict[str, np.ndarray]:
    """What a model file holds: every weight and buffer ('layer<i>.<name>', e.g. 'layer0.W',
    'layer1.running_mean'), the optimiser's state ('optimizer.<key>'), up to MAX_EXAMPLES test images
    ('examples.images' uint8 (N, H, W, C), 'examples.labels'), and a JSON 'meta' entry (model_meta without the
    examples, plus more_meta: checkpoints.py adds its own entry)."""
    arrays = {weight_key(i, name): array for i, layer in enumerate(model.layers)
              for name, array in {**layer.params, **layer.buffers}.items()}
    meta = {**model_meta(model, model_cfg, data, summary), **more_meta}
    examples = meta.pop("examples")
    arrays.update({"examples.images": examples["images"], "examples.labels": examples["labels"]})
    if optimizer is not None:
        meta["optimizer"] = {"name": optimizer.name, "t": getattr(optimizer, "t", 0)}
        arrays.update({f"optimizer.{key}": value for key, value in optimizer.state.items()})
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def save_model(path: Path, model: Any, model_cfg: dict, data: Any, summary: dict, optimizer: Any = None) -> None:
    """One .npz of model_file_arrays, written whole or not at all."""
    arrays = model_file_arrays(model, model_cfg, data, summary, optimizer)
    write_atomic(path, lambda f: np.savez(f, **arrays))


@dataclass
class LoadedModel:
    model: Any
    meta: dict
    optimizer_state: dict[str, np.ndarray]


MAX_SIDE = 4096  # pixels of an input image's side
MAX_CLASSES = 1000
MAX_OPTIMIZER_STEPS = 10**15  # Adam's step count: more steps than any run takes, and a float still holds it
MAX_META_CHARACTERS = 16_000_000  # the JSON 'meta' entry: a training history of thousands of epochs fits


def load_model(path: Path, build_model: Callable[..., Any], defaults: dict | None = None) -> LoadedModel:
    """Rebuild a model saved by save_model with build_model(model_cfg, input_shape, num_classes, rng) (main's),
    or a PyTorch twin's state_dict from a .pt file (load_pt).
    Never unpickles; any defect is a ModelFileError naming the file, with one line: metadata that lies (an input
    of other than 1 channel or of absurd size, class names that are not a short list of strings, a training
    summary with a non-finite accuracy), an architecture that cannot be built, arrays that do not fit it (checked
    from each array's header, before its data is read) and weights or optimiser state holding NaN or infinity."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a model file")
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if path.suffix.lower() == ".pt":
        return load_pt(path, build_model, defaults or {})
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a numpy-cnn model file (not an .npz archive)")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # damaged zip directory and the like
        raise _unreadable(path, error) from None
    with archive:
        if "meta" not in archive.files:
            raise ModelFileError(f"{path}: not a numpy-cnn model file (it has no 'meta' entry)")
        try:
            meta = _read_meta(archive)
            model_cfg, input_shape, class_names = _check_meta(meta)
        except (KeyError, TypeError, ValueError, RecursionError, ConfigError) as error:
            raise ModelFileError(f"{path}: not a valid numpy-cnn model file (meta: {error})") from None
        except ModelFileError:
            raise
        except Exception as error:  # a damaged member: bad CRC, truncated data
            raise _unreadable(path, error) from None
        try:
            model = build_model(model_cfg, input_shape, len(class_names), np.random.default_rng(0))
        except ConfigError as error:
            raise ModelFileError(f"{path}: the stored architecture cannot be built ({error})") from None
        except (MemoryError, ValueError):  # numpy cannot allocate the weights
            raise ModelFileError(f"{path}: the stored architecture's weights do not fit in memory") from None
        try:
            check_fits_in_memory(model, 1)
        except CNNError as error:
            raise ModelFileError(f"{path}: the stored architecture cannot run here ({error})") from None
        try:
            optimizer_state = _load_arrays(path, archive, model)
            meta["examples"] = _load_examples(path, archive, input_shape, len(class_names))
        except ModelFileError:
            raise
        except Exception as error:  # a damaged member: bad CRC, truncated data, a header numpy cannot parse
            raise _unreadable(path, error) from None
    return LoadedModel(model, meta, optimizer_state)


def load_pt(path: Path, build_model: Callable[..., Any], defaults: dict) -> LoadedModel:
    """--load-model FILE.pt: a numpy-cnn model from a state_dict of its PyTorch twin (torch_twin), e.g. trained
    in PyTorch. The file's meta (from --export FILE.pt or tools/train_torch.py) gives the layer list, input
    shape and class names; what it lacks (a bare state_dict has no meta) comes from `defaults`, the config's
    (main: the model section, the data set's input shape and class names). Read with torch.load(weights_only=True)."""
    from torch_twin import copy_from_state_dict, read_pt

    state_dict, stored = read_pt(path)
    meta = {**defaults, **{key: value for key, value in stored.items() if key != "format"}, "format": MODEL_FORMAT}
    missing = [key for key in ("model", "input_shape", "class_names") if key not in meta]
    if missing:
        raise ModelFileError(f"{path}: a state_dict without {', '.join(missing)}: pass the config whose model "
                             "section has its layer list (--config FILE)")
    meta.pop("optimizer", None)
    try:
        model_cfg, input_shape, class_names = _check_meta(meta)
        model = build_model(model_cfg, input_shape, len(class_names), np.random.default_rng(0))
    except (KeyError, TypeError, ValueError, ConfigError) as error:
        raise ModelFileError(f"{path}: its layer list, input shape or class names do not fit ({error})") from None
    copy_from_state_dict(model, state_dict, str(path))
    return LoadedModel(model, meta, {})


def _unreadable(path: Path, error: BaseException) -> ModelFileError:
    return ModelFileError(f"{path}: not a readable numpy-cnn model file ({type(error).__name__}: "
                          f"{' '.join(str(error).split())[:160]})")


def _name(key: str) -> str:
    """An array's name from the file for a message: as it is when short and on one line, else quoted and cut."""
    return key if len(key) <= 80 and key.isprintable() else shown(key)


def _header(archive: Any, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an .npz member declares in its .npy header, read without reading its data."""
    try:
        name = archive.zip.getinfo(key + ".npy").filename  # np.savez stores 'layer0.W' as 'layer0.W.npy'
    except KeyError:
        name = key
    with archive.zip.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"{_name(key)} is stored in .npy format version {version}, which no model file uses")
    return tuple(shape), dtype


def _read_meta(archive: Any) -> dict:
    shape, dtype = _header(archive, "meta")
    if shape != () or dtype.kind not in "US" or dtype.itemsize > 4 * MAX_META_CHARACTERS:
        raise ValueError(f"it is not one JSON text of at most {MAX_META_CHARACTERS:,} characters "
                         f"(an array of {dtype} and shape {shape})")
    meta = json.loads(str(archive["meta"]))
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"its format is not {MODEL_FORMAT!r}")
    return meta


def _finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _check_meta(meta: dict) -> tuple[dict, tuple[int, int, int], list[str]]:
    """(architecture, input shape, class names) of a model file's meta entry; ValueError saying what lies.
    The training summary, optimiser entry and data summary are checked too (and meta["model"] normalised)."""
    model_cfg = meta["model"] = check_model(meta["model"], convert_old_keys=True)
    shape, names = meta["input_shape"], meta["class_names"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(type(side) is int for side in shape):
        raise ValueError(f"input_shape {shown(shape)} is not [height, width, channels] (3 integers)")
    if shape[2] not in (1, 3):
        raise ValueError(f"input_shape {shape} has {shape[2]} channels, but numpy-cnn models read grey images "
                         "(1 channel) or colour images (3: red, green, blue)")
    if not (1 <= shape[0] <= MAX_SIDE and 1 <= shape[1] <= MAX_SIDE):
        raise ValueError(f"input_shape {shape}: an image's sides must be 1 to {MAX_SIDE} pixels")
    if (not isinstance(names, list) or not 2 <= len(names) <= MAX_CLASSES
            or not all(isinstance(name, str) and 0 < len(name) <= 100 and name.isprintable() for name in names)):
        raise ValueError(f"class_names {shown(names)} is not a list of 2 to {MAX_CLASSES:,} names (short strings "
                         "on one line)")
    training, optimizer = meta.setdefault("training", {}), meta.get("optimizer")
    epochs, history = (training.get("epochs_completed", 0), training.get("history", [])) \
        if isinstance(training, dict) else (None, None)
    if (type(epochs) is not int or epochs < 0  # type(), not isinstance(): True is an int too
            or not isinstance(history, list) or not all(isinstance(row, dict) for row in history)):
        raise ValueError(f"its training summary {shown(training)} is not a mapping with an integer "
                         "epochs_completed >= 0 and a list of history rows")
    for key, high in (("test_accuracy", 1), ("test_loss", math.inf)):
        value = training.get(key)
        if value is not None and not (_finite_number(value) and 0 <= value <= high):
            raise ValueError(f"training.{key} is {shown(value)}, not a finite number"
                             + (" from 0 to 1" if high == 1 else " >= 0"))
    if optimizer is not None and (not isinstance(optimizer, dict) or not isinstance(optimizer.get("name"), str)
                                  or type(optimizer.get("t", 0)) is not int
                                  or not 0 <= optimizer.get("t", 0) <= MAX_OPTIMIZER_STEPS):
        raise ValueError(f"its optimizer entry {shown(optimizer)} is not a mapping with a name and a step count "
                         f"from 0 to {MAX_OPTIMIZER_STEPS:,}")
    if not isinstance(meta.get("data") or {}, dict) or not isinstance(meta.get("dataset") or "", str):
        raise ValueError(f"its data entry {shown(meta.get('data'))} or dataset {shown(meta.get('dataset'))} is not "
                         "what save_model writes")
    return model_cfg, (shape[0], shape[1], shape[2]), names


def _load_arrays(path: Path, archive: Any, model: Any) -> dict[str, np.ndarray]:
    """Copy the stored weights and buffers into `model`; return the optimiser state. Each array's header is
    checked before its data is read: a small file can declare a huge array."""
    expected = {weight_key(i, name): param for i, layer in enumerate(model.layers)
                for name, param in {**layer.params, **layer.buffers}.items()}
    stored = {key for key in archive.files
              if key != "meta" and not key.startswith(("optimizer.", "checkpoint.", "examples."))}
    if stored != set(expected):
        raise ModelFileError(f"{path}: weights {shown(sorted(stored ^ set(expected))[:3])} do not fit the stored "
                             "architecture")
    for key, param in expected.items():
        shape, dtype = _header(archive, key)
        if shape != param.shape or dtype.kind != "f":
            raise ModelFileError(f"{path}: {key} has shape {shape} ({dtype}), the stored architecture needs "
                                 f"{param.shape} (float)")
        weights = archive[key]
        if not np.isfinite(weights).all():
            raise ModelFileError(f"{path}: {key} holds NaN or infinite values")
        if key.endswith(".running_var") and (weights < 0).any():
            raise ModelFileError(f"{path}: {key} holds negative values, but a variance is >= 0")
        param[...] = weights
    largest = max((param.size for param in expected.values()), default=0)
    optimizer_state = {}
    for key in (key for key in archive.files if key.startswith("optimizer.")):
        shape, dtype = _header(archive, key)
        if dtype.kind != "f":
            raise ModelFileError(f"{path}: {_name(key)} holds {dtype} values, not floats")
        if math.prod(shape) > largest:
            raise ModelFileError(f"{path}: {_name(key)} has shape {shape}, larger than any weight of the model")
        state = archive[key]
        if not np.isfinite(state).all():
            raise ModelFileError(f"{path}: {_name(key)} holds NaN or infinite values")
        optimizer_state[key.removeprefix("optimizer.")] = state
    return optimizer_state


def _load_examples(path: Path, archive: Any, input_shape: tuple[int, int, int], classes: int) -> dict:
    """The stored test images and labels ({images: uint8 (N, H, W, C), labels (N,)}), empty for older files."""
    none = {"images": np.zeros((0, *input_shape), np.uint8), "labels": np.zeros(0, np.int64)}
    if "examples.images" not in archive.files or "examples.labels" not in archive.files:
        return none
    shape, dtype = _header(archive, "examples.images")
    label_shape, label_dtype = _header(archive, "examples.labels")
    if (shape[1:] != input_shape or shape[0] > MAX_EXAMPLES or dtype != np.uint8 or label_shape != shape[:1]
            or label_dtype.kind not in "iu"):
        raise ModelFileError(f"{path}: examples.images {shape} ({dtype}) or examples.labels {label_shape} do not fit "
                             f"up to {MAX_EXAMPLES} images of {input_shape} (uint8) with their labels")
    labels = archive["examples.labels"].astype(np.int64)
    if labels.size and not 0 <= labels.min() <= labels.max() < classes:
        raise ModelFileError(f"{path}: examples.labels holds a label outside 0..{classes - 1}")
    return {"images": archive["examples.images"], "labels": labels}


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



def continue_from(path: Path, data: Any, optimizer: Any, build_model: Callable[..., Any],
                  parameters: Callable[[Any], Any], dropout_rng: Any, evaluating_only: bool,
                  defaults: dict | None = None) -> LoadedModel:
    """--load-model for a training run (main.model_for_run): the model, checked against the data it will see;
    a loud warning when that is not the data it was trained on; its Dropout layers drawing from dropout_rng; and,
    unless it is only evaluated, the saved optimiser state restored into `optimizer` when it fits.
    parameters: main.parameters (the optimiser's weight keys); defaults: see load_pt."""
    loaded = load_model(path, build_model, defaults)
    for layer in loaded.model.layers:
        if hasattr(layer, "draw_mask"):
            layer.rng = dropout_rng
    if loaded.model.input_shape != data.input_shape or len(loaded.meta["class_names"]) != data.num_classes:
        raise DataError(f"--load-model {path}: the model takes {loaded.model.input_shape} images and "
                        f"{len(loaded.meta['class_names'])} classes, the data has {data.input_shape} "
                        f"and {data.num_classes}")
    earlier = loaded.meta.get("training", {})
    log.info("loaded %s (trained for %s); its architecture replaces the config's model section", path,
             plural(int(earlier.get("epochs_completed", 0)), "epoch"))
    trained_on = loaded.meta.get("data") or {"dataset": loaded.meta.get("dataset")}
    synthetic_then, synthetic_now = trained_on.get("source") == "synthetic", data.source == "synthetic"
    if trained_on.get("dataset") != data.name or synthetic_then != synthetic_now:
        log.warning("%s was trained on %s%s, but is now %s on %s (source: %s): its accuracy here says little; "
                    "pass the data it was trained on (--data-path, --dataset)", path, trained_on.get("dataset"),
                    f" (source: {trained_on['source']})" if trained_on.get("source") else "",
                    "evaluated" if evaluating_only else "trained further", data.name, data.source)
    if evaluating_only:
        return loaded
    if restore_optimizer(optimizer, loaded, {key: param for key, param, _ in parameters(loaded.model)}):
        log.info("continuing with the saved %s state", optimizer.name)
    else:
        saved = (loaded.meta.get("optimizer") or {}).get("name", "no")
        log.info("starting %s afresh: the model file holds %s optimiser state", optimizer.name, saved)
    return loaded
