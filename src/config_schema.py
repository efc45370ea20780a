"""The configuration's schema: every key, its default and its check, with one-line error messages.

validate_config() turns what PyYAML read from config.yaml into the full, checked config (every section and key
present, defaults filled in) or raises ConfigError naming the key path, the value and what is allowed.
Called by main.load_config and main's flag handling, and by modelfile.py for a stored architecture.
A leaf module: it never imports main.
"""

from __future__ import annotations

import builtins
import difflib
import functools
import logging
import math
import os
import reprlib
from collections.abc import Iterable
from itertools import islice
from typing import Any, Callable

from errors import CNNError, ConfigError

DATASETS = ("mnist", "fashion_mnist", "digits", "synthetic", "folder")
COLORS = ("grey", "rgb")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "step", "cosine", "one_cycle")
DEFAULT_LAYERS: list = [
    {"conv2d": {"filters": 32, "kernel_size": 3, "stride": 1, "padding": 1}}, "relu",
    {"maxpool2d": {"pool_size": 2, "stride": None}},
    {"conv2d": {"filters": 64, "kernel_size": 3, "stride": 1, "padding": 1}}, "relu",
    {"maxpool2d": {"pool_size": 2, "stride": None}},
    "flatten", {"dense": {"units": 128}}, "relu", {"dense": {"units": 10}},
]
DEFAULT_CONFIG: dict = {
    "logging": {"level": "INFO", "file": "logs/app.log"},
    "data": {"dataset": "mnist", "path": None, "cache_dir": "data", "allow_synthetic_fallback": True,
             "n_train": None, "n_test": None, "n_val": 0, "random_seed": 42,
             "augment": {"shift": 0, "rotate": 0, "flip": False}, "image_size": None, "color": None,
             "test_fraction": None},
    "model": {"layers": DEFAULT_LAYERS},
    "training": {"epochs": 10, "learning_rate": 0.001, "batch_size": 32, "optimizer": "adam", "momentum": 0.9,
                 "weight_decay": 0.0, "lr_schedule": {"name": "constant"}, "workers": None},
    "output": {"plot_dir": None, "checkpoint_dir": "checkpoints", "checkpoint_every": None},
}
MAX_SHOWN = 80  # characters of a value quoted in an error message


class _BoundedRepr(reprlib.Repr):
    """reprlib's repr, whose work is bounded whatever the value (a billion-laughs list, a 1 MB string): a few
    items of each container, a few levels deep; mappings in their own (the YAML file's) order, not sorted."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 4, 6, 6, 6
        self.maxfrozenset = self.maxdeque = self.maxarray = 6
        self.maxstring = self.maxother = MAX_SHOWN + 1

    def repr_dict(self, x: dict, level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        pieces = [f"{self.repr1(key, level - 1)}: {self.repr1(value, level - 1)}"
                  for key, value in islice(x.items(), self.maxdict)]
        return "{" + ", ".join(pieces + (["..."] if len(x) > self.maxdict else [])) + "}"

    def repr_str(self, x: str, level: int) -> str:  # the start of a long string, not its two ends
        return builtins.repr(x[:self.maxstring])

    def repr_bytes(self, x: bytes, level: int) -> str:
        return builtins.repr(x[:self.maxstring])

    def repr_int(self, x: int, level: int) -> str:  # repr() itself refuses an integer of over 4,300 digits
        return builtins.repr(x) if x.bit_length() < 1000 else f"<an integer of about {x.bit_length() * 3 // 10} digits>"


_REPR = _BoundedRepr()


def shown(value: Any) -> str:
    """A repr of value for an error message: bounded work (reprlib-style: a few items, a few levels), then cut
    to MAX_SHOWN characters with an ellipsis, so that a message stays one readable line whatever the value."""
    text = _REPR.repr(value).replace("\n", " ")
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def _label(key: Any) -> str:
    """A mapping key for a key path in a message: as it is when it is a short plain word, else shown()."""
    if isinstance(key, str) and 0 < len(key) <= 40 and key.isprintable():
        return key
    return shown(key)


# What a YAML document may hold: a config is a few dozen values, a few levels deep, a few kilobytes.
MAX_YAML_CHARACTERS = 100_000
MAX_YAML_VALUES = 100_000  # keys, values and items, counted with every alias expanded
MAX_YAML_DEPTH = 50


def read_yaml(text: str, path: str) -> Any:
    """The value a YAML document (a config file's text) holds, as yaml.safe_load reads it, or ConfigError with one
    line starting with `path` for: a syntax error (line, column, problem), a key given twice in one mapping,
    nesting deeper than MAX_YAML_DEPTH, an alias that contains itself, and a document of more than
    MAX_YAML_VALUES values once its aliases are expanded (a 'billion laughs' document is refused after
    composing it, in time proportional to its text, before any of it is expanded)."""
    import yaml

    if len(text) > MAX_YAML_CHARACTERS:
        raise ConfigError(f"{path}: {len(text):,} characters, more than a config file may have "
                          f"({MAX_YAML_CHARACTERS:,})")
    loader = _bounded_loader()(text, path)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_nodes(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        if context is not None and getattr(error, "context", None):
            problem += f" ({error.context} started at line {context.line + 1})"
        raise ConfigError(f"{path}: YAML syntax error{where}: {_cut(problem)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read (at most {MAX_YAML_DEPTH} levels)") from None
    except (ValueError, TypeError, OverflowError) as error:  # a tagged value that is no such thing: !!int abc
        raise ConfigError(f"{path}: a value cannot be read ({_cut(str(error))})") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | os.PathLike) -> Any:
    """read_yaml of a config file: ConfigError naming the file when it is missing, a folder, unreadable, not
    UTF-8 or larger than a config can be (read no further than that: `--config /dev/zero` ends at once)."""
    limit = 4 * MAX_YAML_CHARACTERS  # UTF-8 takes at most 4 bytes a character
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than {limit:,} bytes; a config file has a few kilobytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError(f"{path}: cannot read the config file (line {line} is not UTF-8 text: byte "
                          f"0x{data[error.start]:02x}); save it as UTF-8") from None
    return read_yaml(text, str(path))


def _cut(text: str, limit: int = 160) -> str:
    """One line of at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@functools.cache
def _bounded_loader() -> type:
    """yaml.SafeLoader that stops composing beyond MAX_YAML_DEPTH levels or MAX_YAML_VALUES nodes (aliases not
    expanded: _check_yaml_nodes counts them), before Python's recursion limit or the memory runs out. Made on
    first use: importing PyYAML takes time that most imports of this module do not need."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        def __init__(self, text: str, path: str) -> None:
            super().__init__(text)
            self.path, self.depth, self.nodes = path, 0, 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.depth >= MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.path}: line {line}: nested more than {MAX_YAML_DEPTH} levels deep")
            self.nodes += 1
            if self.nodes > MAX_YAML_VALUES:
                raise ConfigError(f"{self.path}: more than {MAX_YAML_VALUES:,} values; a config has a few dozen")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return BoundedLoader


def _check_yaml_nodes(root: Any, path: str) -> None:
    """Walk the composed node graph once, each node once however many aliases point at it: refuse a key given
    twice in a mapping, an alias inside the value it names (a loop), and a document that, with its aliases
    expanded, holds more than MAX_YAML_VALUES values or nests deeper than MAX_YAML_DEPTH."""
    import yaml

    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes on the path from the root to the current one
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children: list = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        if children_done:
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            line = node.start_mark.line + 1
            if size[key] > MAX_YAML_VALUES:
                raise ConfigError(f"{path}: line {line}: this value expands to more than {MAX_YAML_VALUES:,} values "
                                  "through its aliases (*name); a config has a few dozen")
            if depth[key] > MAX_YAML_DEPTH:
                raise ConfigError(f"{path}: line {line}: nested more than {MAX_YAML_DEPTH} levels deep through its "
                                  "aliases (*name)")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise ConfigError(f"{path}: line {node.start_mark.line + 1}: an alias (*name) inside the value it names; "
                              "a config cannot hold a loop")
        if isinstance(node, yaml.MappingNode):
            _check_duplicate_keys(node, path)
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(children))


def _check_duplicate_keys(node: Any, path: str) -> None:
    """A key given twice in one mapping (say, two `training:` sections): YAML would silently keep the last."""
    first_line: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node.value, str):
            continue  # `<<: *defaults` merges a mapping; keys given beside it override it, as intended
        seen = (key_node.tag, key_node.value)
        line = key_node.start_mark.line + 1
        if seen in first_line:
            raise ConfigError(f"{path}: line {line}: key {shown(key_node.value)} appears twice in the same mapping "
                              f"(first at line {first_line[seen]}); YAML would keep only the last: merge them")
        first_line[seen] = line


def _fail(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: got {shown(value)}, expected {allowed}")


def _did_you_mean(word: Any, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option to a mistyped word, or ''."""
    if not isinstance(word, str) or len(word) > 100:  # a list, a mapping or a page of text is no typo
        return ""
    close = difflib.get_close_matches(word.lower().replace("-", "_"), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _integer(minimum: int, nullable: bool = False) -> Callable[[Any, str], Any]:
    def check(value: Any, path: str) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            on_command_line = path.startswith("--")  # a flag cannot be null: leave it out instead
            raise _fail(path, value, f"an integer >= {minimum}" + (" or null" if nullable and not on_command_line
                                                                    else ""))
        return value
    return check


def _number(low: float, high: float = math.inf, low_inclusive: bool = False) -> Callable[[Any, str], float]:
    allowed = f"a number {'>=' if low_inclusive else '>'} {low:g}" + (f" and < {high:g}" if high < math.inf else "")

    def check(value: Any, path: str) -> float:
        number = value
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string: take any string that is a number
            try:
                number = float(value)
            except ValueError:
                raise _fail(path, value, allowed) from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise _fail(path, value, allowed)
        try:
            number = float(number)  # an integer of 400 digits does not fit
        except OverflowError:
            raise _fail(path, f"{str(value)[:20]}... ({len(str(value))} digits)", allowed) from None
        if not math.isfinite(number):
            raise _fail(path, value, allowed)
        if number < low or (number == low and not low_inclusive) or number >= high:
            raise _fail(path, value, allowed)
        return float(number)
    return check


def _choice(options: tuple[str, ...], case_insensitive: bool = False) -> Callable[[Any, str], str]:
    def check(value: Any, path: str) -> str:
        candidate = value.upper() if case_insensitive and isinstance(value, str) else value
        if candidate not in options:
            raise ConfigError(f"{path}: got {shown(value)}{_did_you_mean(value, options)}, expected one of "
                              + ", ".join(options))
        return candidate
    return check


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, value, "true or false")
    return value


def _optional_path(value: Any, path: str) -> str | None:
    """A path or null; ~ and ~user at its start mean the home folder, as in a shell."""
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise _fail(path, value, "a path (a non-empty string) or null")
    return None if value is None else os.path.expanduser(value)


def _folder_or_none(value: Any, path: str) -> str | None:
    """A folder, or null or 'none' for none at all."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null"):
        return None
    try:
        return _optional_path(value, path)
    except ConfigError:
        raise _fail(path, value, "a folder (a non-empty string), or none or null for none") from None


def _path(value: Any, path: str) -> str:
    """A path; ~ and ~user at its start mean the home folder, as in a shell."""
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, value, "a path (a non-empty string)")
    return os.path.expanduser(value)


def check_mapping(path: str, raw: Any, schema: dict, defaults: dict) -> dict:
    """Check a mapping read from YAML against schema {key: check}, taking missing keys from defaults."""
    if not isinstance(raw, dict):
        raise _fail(path, raw, f"a mapping with keys {', '.join(schema)}")
    for key in raw:
        if key not in schema:
            raise ConfigError(f"{path}.{_label(key)}: unknown key{_did_you_mean(key, schema)}; "
                              f"allowed: {', '.join(schema)}")
    return {key: check(raw.get(key, defaults[key]), f"{path}.{key}") for key, check in schema.items()}


# Each layer type: {argument: (check, default)}; a default of REQUIRED means the argument must be given.
REQUIRED = object()
LAYER_ARGUMENTS: dict[str, dict[str, tuple[Callable[[Any, str], Any], Any]]] = {
    "conv2d": {"filters": (_integer(1), REQUIRED), "kernel_size": (_integer(1), 3), "stride": (_integer(1), 1),
               "padding": (_integer(0), 0)},
    "maxpool2d": {"pool_size": (_integer(1), 2), "stride": (_integer(1, nullable=True), None)},
    "avgpool2d": {"pool_size": (_integer(1), 2), "stride": (_integer(1, nullable=True), None)},
    "batchnorm": {"momentum": (_number(0, 1.0000001), 0.1), "eps": (_number(0), 1e-5)},
    "dropout": {"rate": (_number(0, 1, low_inclusive=True), 0.5)},
    "dense": {"units": (_integer(1), REQUIRED)},
    "relu": {}, "tanh": {}, "flatten": {},
}
# What people write that is no layer here, with the reason.
NOT_LAYERS = {
    "softmax": "leave it out: the loss (softmax cross-entropy) applies the softmax itself, and predictions "
               "report its probabilities",
    "conv": "write conv2d", "maxpool": "write maxpool2d", "avgpool": "write avgpool2d",
    "batchnorm2d": "write batchnorm (it normalises per channel after a conv layer, per feature after dense)",
    "linear": "write dense",
}


def check_layer(spec: Any, path: str) -> Any:
    """One item of model.layers: a layer name ("relu") or a one-key mapping ({conv2d: {filters: 32}}).
    Returns it spelled out: the name alone for a layer without arguments, else {name: {every argument}}."""
    if isinstance(spec, str):
        name, given = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        name, given = next(iter(spec.items()))
        given = {} if given is None else given
    else:
        raise _fail(path, spec, "a layer name like relu, or a one-key mapping like {conv2d: {filters: 32}}")
    if not isinstance(name, str) or name not in LAYER_ARGUMENTS:
        reason = NOT_LAYERS.get(name.lower()) if isinstance(name, str) else None
        if reason:
            raise ConfigError(f"{path}: {name}: {reason}")
        raise ConfigError(f"{path}: unknown layer {shown(name)}{_did_you_mean(name, LAYER_ARGUMENTS)}; "
                          f"layers: {', '.join(LAYER_ARGUMENTS)}")
    arguments = LAYER_ARGUMENTS[name]
    if not arguments:
        if given:
            raise ConfigError(f"{path}: {name} takes no arguments, got {shown(given)}")
        return name
    if not isinstance(given, dict):
        raise _fail(f"{path}.{name}", given, f"a mapping with keys {', '.join(arguments)}")
    for key in given:
        if key not in arguments:
            raise ConfigError(f"{path}.{name}.{_label(key)}: unknown argument{_did_you_mean(key, arguments)}; "
                              f"{name} takes {', '.join(arguments)}")
    checked = {}
    for key, (check, default) in arguments.items():
        if key not in given and default is REQUIRED:
            raise ConfigError(f"{path}.{name}: {key} is required (e.g. {{{name}: {{{key}: 32}}}})")
        checked[key] = check(given.get(key, default), f"{path}.{name}.{key}")
    return {name: checked}


def layer_name_and_arguments(spec: Any) -> tuple[str, dict]:
    """'relu' -> ('relu', {}); {'conv2d': {...}} -> ('conv2d', {...}), for a checked layer."""
    return (spec, {}) if isinstance(spec, str) else next(iter(spec.items()))


def layers_from_old_keys(model: dict) -> list:
    """The layer list that says what model.conv_layers + model.dense_units said: each conv layer followed by
    ReLU and (unless pool_size is 0 or null) max pooling, then flatten, dense, ReLU and the output layer.
    Missing keys mean what they meant then: the two default conv layers (32 and 64 filters, padding 1), 128 units."""
    layers: list = []
    default_convs = [{"filters": 32, "padding": 1}, {"filters": 64, "padding": 1}]
    convs = model.get("conv_layers", default_convs)
    for conv in convs if isinstance(convs, list) else []:
        conv = conv if isinstance(conv, dict) else {}
        layers += [{"conv2d": {"filters": conv.get("filters", 32), "kernel_size": conv.get("kernel_size", 3),
                               "stride": conv.get("stride", 1), "padding": conv.get("padding", 0)}}, "relu"]
        if conv.get("pool_size", 2):
            layers.append({"maxpool2d": {"pool_size": conv.get("pool_size", 2), "stride": conv.get("pool_stride")}})
    return [*layers, "flatten", {"dense": {"units": model.get("dense_units", 128)}}, "relu", {"dense": {"units": 10}}]


def flow(layers: list) -> str:
    """A layer list in YAML's one-line flow style, as a user would type it (null arguments left out)."""
    items = []
    for spec in layers:
        name, arguments = layer_name_and_arguments(spec)
        given = ", ".join(f"{_label(key)}: {value if type(value) in (int, float) else shown(value)}"
                          for key, value in arguments.items() if value is not None)
        items.append(f"{{{name}: {{{given}}}}}" if arguments else name)
    return "[" + ", ".join(items) + "]"


def _layers(value: Any, path: str) -> list:
    if not isinstance(value, list) or not value:
        raise _fail(path, value, "a non-empty list of layers, e.g. [{conv2d: {filters: 32}}, relu, flatten, "
                                 "{dense: {units: 10}}]")
    return [check_layer(spec, f"{path}[{i}]") for i, spec in enumerate(value)]


def check_model(raw: Any, path: str = "model", convert_old_keys: bool = False) -> dict:
    """The model section. The keys of older versions (conv_layers, dense_units) are an error that shows the
    equivalent layer list, or, for a model file saved by an older version (convert_old_keys), converted."""
    if isinstance(raw, dict) and ({"conv_layers", "dense_units"} & set(raw)):
        if convert_old_keys:
            raw = {"layers": layers_from_old_keys(raw)}
        else:
            same = flow(layers_from_old_keys(raw))
            same = same if len(same) <= 400 else same[:397] + "..."
            raise ConfigError(f"{path}: conv_layers and dense_units were replaced by model.layers; the same "
                              f"network is layers: {same}")
    return check_mapping(path, raw, SCHEMA["model"], DEFAULT_CONFIG["model"])


def _augment(raw: Any, path: str) -> dict:
    return check_mapping(path, {} if raw is None else raw, {"shift": _integer(0), "rotate": _number(0, 90, True),
                                                            "flip": _boolean}, DEFAULT_CONFIG["data"]["augment"])


def _image_size(value: Any, path: str) -> list[int] | None:
    """null, one side (32: square), [height, width] or the text 'HxW' (32x24: 32 rows, 24 columns)."""
    if value is None:
        return None
    sides = value
    if isinstance(value, str):
        sides = [int(side) if side.strip().isdigit() else -1 for side in value.lower().split("x")]
    elif isinstance(value, int) and not isinstance(value, bool):
        sides = [value, value]
    if (isinstance(sides, list) and len(sides) == 1) and not isinstance(value, list):
        sides = sides * 2
    if (not isinstance(sides, list) or len(sides) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and 1 <= side <= 4096 for side in sides)):
        raise _fail(path, value, "a side in pixels (32), HxW (32x24) or [height, width], sides 1 to 4096")
    return list(sides)


def _color(value: Any, path: str) -> str | None:
    if value is None:
        return None
    return _choice(COLORS)("grey" if value == "gray" else value, path)


def _fraction(value: Any, path: str) -> float | None:
    return None if value is None else _number(0, 1)(value, path)


SCHEDULE_ARGUMENTS: dict[str, dict[str, tuple[Callable[[Any, str], Any], Any]]] = {
    "constant": {},
    "step": {"step_size": (_integer(1), 5), "gamma": (_number(0, 1), 0.5)},
    "cosine": {"min_lr": (_number(0, low_inclusive=True), 0.0)},
    "one_cycle": {"pct_start": (_number(0, 1), 0.3), "div_factor": (_number(0), 25.0),
                  "final_div_factor": (_number(0), 1e4)},
}


def _lr_schedule(raw: Any, path: str) -> dict:
    """A schedule name (cosine) or a mapping with its name and parameters ({name: step, step_size: 5})."""
    given = {"name": raw} if isinstance(raw, str) else raw
    if not isinstance(given, dict) or "name" not in given:
        raise _fail(path, raw, f"one of {', '.join(SCHEDULE_ARGUMENTS)}, or a mapping like {{name: step, "
                               "step_size: 5, gamma: 0.5}")
    name = _choice(tuple(SCHEDULE_ARGUMENTS))(given["name"], f"{path}.name")
    arguments = SCHEDULE_ARGUMENTS[name]
    return {"name": name, **check_mapping(path, {k: v for k, v in given.items() if k != "name"},
                                          {key: check for key, (check, _) in arguments.items()},
                                          {key: default for key, (_, default) in arguments.items()})}


SCHEMA: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    "logging": {"level": _choice(LOG_LEVELS, case_insensitive=True), "file": _optional_path},
    "data": {"dataset": _choice(DATASETS), "path": _optional_path, "cache_dir": _path,
             "allow_synthetic_fallback": _boolean, "n_train": _integer(1, nullable=True),
             "n_test": _integer(1, nullable=True), "n_val": _integer(0), "random_seed": _integer(0),
             "augment": _augment,
             "image_size": _image_size, "color": _color, "test_fraction": _fraction},
    "model": {"layers": _layers},
    "training": {"epochs": _integer(0), "learning_rate": _number(0), "batch_size": _integer(1),
                 "optimizer": _choice(OPTIMIZERS), "momentum": _number(0, 1, low_inclusive=True),
                 "weight_decay": _number(0, low_inclusive=True), "lr_schedule": _lr_schedule,
                 "workers": _integer(1, nullable=True)},
    "output": {"plot_dir": _optional_path, "checkpoint_dir": _folder_or_none,
               "checkpoint_every": _integer(1, nullable=True)},
}


def validate_config(raw: Any) -> dict:
    """The full, checked config: every section and key present, defaults filled in, values normalised.
    Raises ConfigError naming the key path, the value given and what is allowed."""
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"{type(raw).__name__} {shown(raw)}"
        raise ConfigError(f"expected a mapping with sections {', '.join(SCHEMA)}, got {got}")
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(f"{_label(section)}: unknown section{_did_you_mean(section, SCHEMA)}; "
                              f"allowed: {', '.join(SCHEMA)}")
    checked = {}
    for section, schema in SCHEMA.items():
        given = {} if raw.get(section) is None else raw[section]
        checked[section] = (check_model(given) if section == "model"
                            else check_mapping(section, given, schema, DEFAULT_CONFIG[section]))
    return checked


# flag -> (section, key) that it overrides
OVERRIDES = {"epochs": ("training", "epochs"), "batch_size": ("training", "batch_size"),
             "learning_rate": ("training", "learning_rate"), "n_train": ("data", "n_train"),
             "n_test": ("data", "n_test"), "seed": ("data", "random_seed"), "dataset": ("data", "dataset"),
             "data_path": ("data", "path"), "log_level": ("logging", "level"), "plot_dir": ("output", "plot_dir"),
             "checkpoint_dir": ("output", "checkpoint_dir"),
             "optimizer": ("training", "optimizer"), "workers": ("training", "workers"),
             "image_size": ("data", "image_size"), "color": ("data", "color")}
# Flags that would do nothing in the --predict or --gradcheck mode: an error rather than silently ignored.
TRAINING_ONLY = ("epochs", "batch_size", "learning_rate", "optimizer", "workers", "n_train", "n_test", "data_path",
                 "image_size", "color", "no_fallback", "plot_dir", "save_model", "profile", "checkpoint_dir", "resume")
IGNORED_IN_MODE = {"predict": (*TRAINING_ONLY, "seed", "dataset", "export"),  # the saved model brings its own
                   # it uses the model section and the data's shape and classes (dataset, data path, size, colour)
                   "gradcheck": (*(flag for flag in TRAINING_ONLY if flag not in ("data_path", "image_size", "color")),
                                 "load_model", "export")}


def check_flag_combinations(args: Any) -> None:
    """One line (CNNError) for flags that contradict each other or would do nothing in the chosen mode."""
    if args.resume is not None and args.load_model:
        raise CNNError("--resume continues a run from its checkpoint, --load-model starts one from a model file: "
                       "give one of them")
    if args.resume is not None and args.epochs == 0:
        raise CNNError("--resume continues training, --epochs 0 only evaluates: give one of them")
    if args.predict and not args.load_model:
        raise CNNError("--predict needs --load-model FILE (a model saved with --save-model)")
    if (args.host is not None or args.port is not None) and not args.serve:
        raise CNNError(f"{'--host' if args.host is not None else '--port'} goes with --serve")
    if args.serve and (args.predict or args.gradcheck):
        raise CNNError(f"--serve and --{'predict' if args.predict else 'gradcheck'} are separate commands: run one")
    if (args.serve or args.export) and args.load_model:  # nothing trains: the saved model is served or exported
        mode = "--serve, which serve" if args.serve else "--export, which export"
        for flag in (*TRAINING_ONLY, "seed", "dataset", "output"):
            value = getattr(args, flag)
            if value is not None and value is not False:
                raise CNNError(f"--{flag.replace('_', '-')} has no effect with --load-model and {mode} the saved "
                               f"model as it is (without --load-model, {mode.split(',')[0]} trains first)")
    for mode, ignored in IGNORED_IN_MODE.items():
        if getattr(args, mode):
            for flag in ignored:
                value = getattr(args, flag)
                if value is not None and value is not False:  # not `value in (None, False)`: 0 == False
                    option = "--" + flag.replace("_", "-")
                    raise CNNError(f"{option} has no effect with --{mode}, which "
                                   + ("only classifies images" if mode == "predict" else "trains nothing"))


IMAGE_SIDE = {"digits": 8}  # pixels of a data set's images when not 28 (MNIST, Fashion-MNIST, synthetic)


def apply_overrides(cfg: dict, origin: dict[str, str], args: Any, seed_text: str) -> None:
    """Put the environment's RANDOM_SEED (seed_text, '' when unset) and then the command line's flags (OVERRIDES)
    over the config, each value checked by its SCHEMA entry; origin["seed"] says which one set the seed."""
    if seed_text and args.seed is None:
        try:
            cfg["data"]["random_seed"] = SCHEMA["data"]["random_seed"](int(seed_text), "RANDOM_SEED")
        except ValueError:
            raise ConfigError(f"RANDOM_SEED (environment): got {seed_text!r}, expected an integer >= 0") from None
        origin["seed"] = "RANDOM_SEED"
    for flag, (section, key) in OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            cfg[section][key] = SCHEMA[section][key](value, f"--{flag.replace('_', '-')}")
    if args.seed is not None:
        origin["seed"] = "--seed"
    if args.no_fallback:
        cfg["data"]["allow_synthetic_fallback"] = False


def describe_training(training: dict, augment: dict, workers: int) -> str:
    """The log's `training:` line: epochs, batch, optimiser, learning rate and schedule, decay, augmentation and
    worker threads."""
    changes = [f"shifts of up to {augment['shift']} px"] if augment["shift"] else []
    changes += [f"rotations of up to {augment['rotate']:g} degrees"] if augment["rotate"] else []
    changes += ["left-right flips"] if augment["flip"] else []
    epochs, threads = training["epochs"], workers
    return (f"{epochs} epoch{'s' if epochs != 1 else ''}, batch {training['batch_size']}, {training['optimizer']}, "
            f"learning rate {training['learning_rate']:g} ({training['lr_schedule']['name']})"
            + (f", weight decay {training['weight_decay']:g}" if training["weight_decay"] else "")
            + (f", {' and '.join(changes)}" if changes else "")
            + f", {threads} worker thread{'s' if threads != 1 else ''}")


def check_together(cfg: dict, origin: dict[str, str]) -> None:
    """ConfigError (one line) for values each allowed alone but not together, once flags have overridden the
    file: an augment.shift that moves every image out of its frame, a cosine min_lr above the learning rate.
    Also corrects origin["seed"] (main's start line) when the config file it names sets no data.random_seed."""
    data, training = cfg["data"], cfg["training"]
    side = IMAGE_SIDE.get(data["dataset"], 28)
    if data["augment"]["shift"] >= side:
        raise ConfigError(f"data.augment.shift: got {shown(data['augment']['shift'])}, expected less than the "
                          f"{side} pixels of a {data['dataset']} image's side: a shift that large moves the whole "
                          "image out of its frame (2 or 3 is usual)")
    schedule, learning_rate = training["lr_schedule"], training["learning_rate"]
    if schedule.get("min_lr", 0) > learning_rate:
        raise ConfigError(f"training.lr_schedule.min_lr: got {schedule['min_lr']:g}, expected at most "
                          f"training.learning_rate ({learning_rate:g}): the cosine schedule falls from the learning "
                          "rate to min_lr")
    workers, batch_size = training["workers"], training["batch_size"]
    if workers is not None and workers > batch_size:
        raise ConfigError(f"training.workers: got {workers}, expected at most training.batch_size ({batch_size}): "
                          "each worker takes a slice of every batch")
    if origin.get("file") and origin["seed"] == origin["file"]:
        raw = read_yaml_file(origin["file"])
        if "random_seed" not in ((raw.get("data") or {}) if isinstance(raw, dict) else {}):
            origin["seed"] = "built-in default"


def divergence_advice(training: dict) -> str:
    """What to change after a run diverged: the key that most likely made the steps too large, by name."""
    schedule, learning_rate, decay = training["lr_schedule"], training["learning_rate"], training["weight_decay"]
    if schedule["name"] == "one_cycle" and schedule["div_factor"] < 1:
        return (f"training.lr_schedule.div_factor {schedule['div_factor']:g} is below 1, so the schedule starts "
                f"above training.learning_rate, at {learning_rate / schedule['div_factor']:g}: use 25 (the default)")
    if schedule["name"] == "one_cycle" and schedule["div_factor"] * schedule["final_div_factor"] < 1:
        return (f"training.lr_schedule.final_div_factor {schedule['final_div_factor']:g} makes the schedule end "
                "above training.learning_rate: use 1e4 (the default)")
    if decay * learning_rate >= 0.1 or decay >= 1:
        return f"try a smaller training.weight_decay than {decay:g} (0.0001 to 0.01 is usual)"
    return f"try a lower learning rate (training.learning_rate) than {learning_rate:g}"


def warn_odd_training(training: dict, n_train: int) -> None:
    """Warnings on the log for a run that would not do what its numbers suggest: a batch_size above the number of
    training images (each batch is then all of them), and a one_cycle schedule with too few steps to reach its
    peak (a single step runs at learning_rate / (div_factor * final_div_factor): 4e-9 for 0.001 by default)."""
    log = logging.getLogger("numpy_cnn")
    batch_size, schedule = training["batch_size"], training["lr_schedule"]
    if training["epochs"] and batch_size > n_train:
        log.warning("training.batch_size %d is more than the %d training images: each batch is all %d of them",
                    batch_size, n_train, n_train)
    total_steps = math.ceil(n_train / batch_size) * training["epochs"]
    if schedule["name"] == "one_cycle" and total_steps > 0 and schedule["pct_start"] * total_steps < 1:
        log.warning("training.lr_schedule one_cycle over %d step%s never reaches training.learning_rate: it ends at "
                    "the learning rate / (div_factor * final_div_factor) at once; train for more steps (more epochs "
                    "or a smaller batch) or use another schedule", total_steps, "" if total_steps == 1 else "s")
