"""The configuration's schema: every key, its default and its check, with one-line error messages.

validate_config() turns what PyYAML read from config.yaml into the full, checked config (every section and key
present, defaults filled in) or raises ConfigError naming the key path, the value and what is allowed.
Called by main.load_config and main's flag handling, and by modelfile.py for a stored architecture.
A leaf module: it never imports main.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any, Callable

from errors import ConfigError

DATASETS = ("mnist", "fashion_mnist", "digits", "synthetic")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
OPTIMIZERS = ("adam", "sgd")
CONV_LAYER_DEFAULTS = {"filters": 32, "kernel_size": 3, "stride": 1, "padding": 0, "pool_size": 2, "pool_stride": None}
DEFAULT_CONFIG: dict = {
    "logging": {"level": "INFO", "file": "logs/app.log"},
    "data": {"dataset": "mnist", "path": None, "cache_dir": "data", "allow_synthetic_fallback": True,
             "n_train": 5000, "n_test": 1000, "random_seed": 42},
    "model": {"conv_layers": [dict(CONV_LAYER_DEFAULTS, filters=32, padding=1),
                              dict(CONV_LAYER_DEFAULTS, filters=64, padding=1)],
              "dense_units": 128},
    "training": {"epochs": 10, "learning_rate": 0.001, "batch_size": 32, "optimizer": "adam", "momentum": 0.9,
                 "workers": None},
    "output": {"plot_dir": None},
}


def _fail(path: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{path}: got {value!r}, expected {allowed}")


def _did_you_mean(word: Any, options: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest option to a mistyped word, or ''."""
    close = difflib.get_close_matches(str(word).lower().replace("-", "_"), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _integer(minimum: int, nullable: bool = False) -> Callable[[Any, str], Any]:
    allowed = f"an integer >= {minimum}" + (" or null" if nullable else "")

    def check(value: Any, path: str) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _fail(path, value, allowed)
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
            raise ConfigError(f"{path}: got {value!r}{_did_you_mean(value, options)}, expected one of "
                              + ", ".join(options))
        return candidate
    return check


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, value, "true or false")
    return value


def _optional_path(value: Any, path: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise _fail(path, value, "a path (a non-empty string) or null")
    return value


def _path(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, value, "a path (a non-empty string)")
    return value


def check_mapping(path: str, raw: Any, schema: dict, defaults: dict) -> dict:
    """Check a mapping read from YAML against schema {key: check}, taking missing keys from defaults."""
    if not isinstance(raw, dict):
        raise _fail(path, raw, f"a mapping with keys {', '.join(schema)}")
    for key in raw:
        if key not in schema:
            raise ConfigError(f"{path}.{key}: unknown key{_did_you_mean(key, schema)}; allowed: {', '.join(schema)}")
    return {key: check(raw.get(key, defaults[key]), f"{path}.{key}") for key, check in schema.items()}


CONV_LAYER_SCHEMA = {"filters": _integer(1), "kernel_size": _integer(1), "stride": _integer(1),
                     "padding": _integer(0), "pool_size": _integer(0, nullable=True),
                     "pool_stride": _integer(1, nullable=True)}


def _conv_layers(value: Any, path: str) -> list[dict]:
    if not isinstance(value, list):
        raise _fail(path, value, "a list of layers, each a mapping like {filters: 32, kernel_size: 3}")
    return [check_mapping(f"{path}[{i}]", layer, CONV_LAYER_SCHEMA, CONV_LAYER_DEFAULTS)
            for i, layer in enumerate(value)]


SCHEMA: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    "logging": {"level": _choice(LOG_LEVELS, case_insensitive=True), "file": _optional_path},
    "data": {"dataset": _choice(DATASETS), "path": _optional_path, "cache_dir": _path,
             "allow_synthetic_fallback": _boolean, "n_train": _integer(1), "n_test": _integer(1),
             "random_seed": _integer(0)},
    "model": {"conv_layers": _conv_layers, "dense_units": _integer(1)},
    "training": {"epochs": _integer(0), "learning_rate": _number(0), "batch_size": _integer(1),
                 "optimizer": _choice(OPTIMIZERS), "momentum": _number(0, 1, low_inclusive=True),
                 "workers": _integer(1, nullable=True)},
    "output": {"plot_dir": _optional_path},
}


def validate_config(raw: Any) -> dict:
    """The full, checked config: every section and key present, defaults filled in, values normalised.
    Raises ConfigError naming the key path, the value given and what is allowed."""
    if not isinstance(raw, dict):
        shown = "an empty file" if raw is None else f"{type(raw).__name__} {raw!r:.60}"
        raise ConfigError(f"expected a mapping with sections {', '.join(SCHEMA)}, got {shown}")
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(f"{section}: unknown section{_did_you_mean(section, SCHEMA)}; "
                              f"allowed: {', '.join(SCHEMA)}")
    return {section: check_mapping(section, {} if raw.get(section) is None else raw[section], schema,
                                    DEFAULT_CONFIG[section])
            for section, schema in SCHEMA.items()}

