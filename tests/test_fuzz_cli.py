"""Property-based: whatever YAML config and whatever flags a user tries, the command line ends with a documented
exit code and never with "unexpected" or a traceback.

Hypothesis draws YAML documents (random nestings of mappings, lists and scalars whose keys come from the real
sections, keys and layer names and from junk; config-like documents; YAML that does not parse) and flag lists
drawn from `python src/main.py --help` (never --serve, which would wait for Ctrl-C, nor --help) with random values,
and runs main.main in this process on tiny data. Where a run would train, it trains briefly: the data set is
forced to scikit-learn's 8x8 digits (or to a tiny IDX folder), at most 64 images and at most one epoch. The
pictures are not drawn (plots.write_plots is replaced by a stub: drawing takes seconds) and the network is
"offline" (no OpenML download can start). Derandomized, so CI sees the same examples on every run.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import write_idx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

import config_schema
import datafiles
import main
import plots

# ---- what the command line documents ---------------------------------------------------------------------------


def documented_exit_codes() -> set[int]:
    """Every exit code main.py names in an EXIT_* constant (an int, or a dict of them such as EXIT_BY_SIGNAL)."""
    codes: set[int] = set()
    for name in dir(main):
        if name.startswith("EXIT_"):
            value = getattr(main, name)
            codes.update(value.values() if isinstance(value, dict) else [value])
    return {int(code) for code in codes}


PARSER = main.build_parser()
# The flags `python src/main.py --help` lists, as argparse knows them (whether they take values, and how many).
HELP_FLAGS = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", PARSER.format_help())))
NEVER = {"--help", "--serve"}  # --serve waits for Ctrl-C; --help prints and exits through argparse's SystemExit
FLAGS = [flag for flag in HELP_FLAGS if flag not in NEVER and flag in PARSER._option_string_actions]


def crashed(text: str) -> bool:
    """Whether the console says the program failed unexpectedly. PyYAML's own words for a syntax error ("found
    unexpected end of stream"), quoted in the one-line config error, do not count."""
    return "Traceback" in text or "unexpected" in text.lower().replace("found unexpected", "")


# ---- the files a run may be pointed at -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of inputs, copied for every example: a tiny IDX data set (28x28, labels 0-9), a digits model trained
    for one epoch, a drawn digit, an array image, and files that are none of what they claim."""
    folder = tmp_path_factory.mktemp("fuzz_inputs")
    rng = np.random.default_rng(0)
    (folder / "idx").mkdir()
    for prefix, n in (("train", 80), ("t10k", 20)):
        write_idx(folder / "idx" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / "idx" / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    (folder / "model.yaml").write_text(yaml.safe_dump({
        "logging": {"level": "ERROR", "file": None}, "data": {"dataset": "digits", "n_train": 32, "n_test": 16},
        "model": {"layers": [{"conv2d": {"filters": 2, "padding": 1}}, "relu", "maxpool2d", "flatten",
                             {"dense": {"units": 8}}, "relu", {"dense": {"units": 10}}]},
        "training": {"epochs": 1}}))
    cwd = Path.cwd()
    try:
        os.chdir(folder)
        assert main.main(["--config", "model.yaml", "--save-model", "model.npz"]) == 0
    finally:
        os.chdir(cwd)
    picture = Image.new("L", (60, 60), 255)
    ImageDraw.Draw(picture).line([(15, 10), (45, 10), (25, 50)], fill=0, width=6)
    picture.save(folder / "digit.png")
    np.save(folder / "array.npy", rng.random((28, 28)))
    (folder / "junk.png").write_text("not a picture")
    (folder / "junk.npz").write_bytes(b"PK\x03\x04 not a model")
    (folder / "a_folder").mkdir()
    return folder


# ---- random YAML -----------------------------------------------------------------------------------------------

SECTIONS = list(config_schema.SCHEMA)
KEYS = sorted({key for section in config_schema.SCHEMA.values() for key in section}
              | set(config_schema.LAYER_ARGUMENTS)
              | {argument for arguments in config_schema.LAYER_ARGUMENTS.values() for argument in arguments}
              | set(config_schema.SCHEDULE_ARGUMENTS) | {"name", "shift", "rotate", "conv_layers", "dense_units"})
JUNK_KEYS = ["epoch", "Training", "lr", "", "0", "data ", "layers2", "softmax", "x" * 90]
WORDS = ["", " ", "adam", "sgd", "rmsprop", "digits", "mnist", "fashion_mnist", "synthetic", "cifar", "INFO", "debug",
         "LOUD", "relu", "flatten", "dense", "conv2d", "cosine", "step", "one_cycle", "1e-3", "1e400", "nan", "-1",
         "logs/app.log", "out/pictures", "idx", "model.npz", "a_folder", "/proc/no/such/folder/x", "~", "~/x",
         "x" * 200, "\u00e9t\u00e9"]
NUMBERS = [0, 1, 2, 3, 8, 32, 64, -1, -7, 10**30, 0.0, 0.001, 0.5, 0.9, 1.0, 1.5, 90.0, 1e20, -0.5,
           math.nan, math.inf, -math.inf]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.sampled_from(NUMBERS), st.sampled_from(WORDS))
keys = st.one_of(st.sampled_from(SECTIONS), st.sampled_from(KEYS), st.sampled_from(JUNK_KEYS))
nested = st.recursive(scalars, lambda children: st.one_of(st.lists(children, max_size=4),
                                                          st.dictionaries(keys, children, max_size=4)),
                      max_leaves=16)

LAYER_NAMES = [*config_schema.LAYER_ARGUMENTS, "softmax", "conv", "linear", "pool"]
layer = st.one_of(
    st.sampled_from(LAYER_NAMES),
    st.builds(lambda name, arguments: {name: arguments}, st.sampled_from(LAYER_NAMES),
              st.one_of(st.none(), st.dictionaries(st.sampled_from(KEYS), st.one_of(st.integers(-1, 9), scalars),
                                                   max_size=3), scalars, st.lists(scalars, max_size=2))))
VALID_MODELS = [
    {"layers": ["flatten", {"dense": {"units": 10}}]},
    {"layers": [{"conv2d": {"filters": 2, "kernel_size": 3, "padding": 1}}, "relu", {"maxpool2d": {"pool_size": 2}},
                "flatten", {"dense": {"units": 8}}, "tanh", {"dropout": {"rate": 0.3}}, {"dense": {"units": 10}}]},
    {"layers": [{"conv2d": {"filters": 3}}, {"batchnorm": {}}, "relu", {"avgpool2d": {"pool_size": 2}}, "flatten",
                {"dense": {"units": 10}}]},
]
models = st.one_of(st.sampled_from(VALID_MODELS), st.builds(lambda layers: {"layers": layers},
                                                            st.lists(layer, max_size=6)), nested)


def config_section(name: str) -> st.SearchStrategy:
    """A section of real keys (sometimes a junk one) with random scalar values, or for model a layer list."""
    if name == "model":
        return models
    real = list(config_schema.SCHEMA[name])
    return st.dictionaries(st.one_of(st.sampled_from(real), st.sampled_from(real), st.sampled_from(JUNK_KEYS)),
                           st.one_of(scalars, nested), max_size=4)


config_like = st.lists(st.sampled_from(SECTIONS), unique=True, max_size=5).flatmap(
    lambda names: st.fixed_dictionaries({name: config_section(name) for name in names}))
VALID_CONFIGS = [
    {},
    {"data": {"dataset": "digits", "n_train": 32, "n_test": 16}, "training": {"epochs": 1, "batch_size": 8}},
    {"training": {"optimizer": "sgd", "learning_rate": 0.05, "lr_schedule": {"name": "step", "step_size": 1}},
     "model": VALID_MODELS[1], "logging": {"level": "WARNING", "file": "logs/run.log"}},
    {"data": {"augment": {"shift": 2, "rotate": 10}, "n_val": 8}, "training": {"weight_decay": 0.01, "workers": 2},
     "model": VALID_MODELS[2], "output": {"plot_dir": "pictures"}},
]


def as_yaml(document: Any) -> str:
    return yaml.safe_dump(document, sort_keys=False, allow_unicode=True)


yaml_texts = st.one_of(
    st.sampled_from(VALID_CONFIGS).map(as_yaml),
    config_like.map(as_yaml),
    nested.map(as_yaml),
    st.text(alphabet=" \n\t:-[]{}&*!|>'\"#%@`,?abcdefgilnorstu019", max_size=80),  # mostly not YAML at all
    config_like.map(lambda document: as_yaml(document) + "training:\n  epochs: 1\n"),  # a section twice
)

# ---- random flags ----------------------------------------------------------------------------------------------

VALUES = {  # flag -> what a user might give it: valid values, and mistakes
    "--config": ["cfg.yaml", "config.yaml", "missing.yaml", "a_folder", "junk.png", "idx"],
    "--output": ["results.json", "out/r.json", "a_folder", ".", "model.npz", "cfg.yaml"],
    "--epochs": ["0", "1", "-1", "x", "1.5", "", "99999999999999999999"],
    "--batch-size": ["1", "8", "32", "0", "-4", "x", "100000"],
    "--learning-rate": ["0.01", "1e-3", "1e20", "0", "-1", "nan", "inf", "x", "1e400"],
    "--optimizer": ["adam", "sgd", "SGD", "rmsprop", ""],
    "--workers": ["1", "2", "3", "0", "-1", "x"],
    "--n-train": ["16", "32", "64", "0", "-5", "x", "100000"],
    "--n-test": ["8", "16", "64", "0", "x", "100000"],
    "--seed": ["0", "7", "-1", "x", "123456789012345678901234567890"],
    "--dataset": ["digits", "synthetic", "mnist", "fashion_mnist", "cifar10", "DIGITS", ""],
    "--data-path": ["idx", "missing_folder", "junk.png", "a_folder", ""],
    "--log-level": ["DEBUG", "INFO", "warning", "ERROR", "LOUD", ""],
    "--plot-dir": ["pictures", "junk.png", "a_folder", ""],
    "--save-model": ["saved.npz", "a_folder", "out/m.npz", ""],
    "--load-model": ["model.npz", "junk.npz", "missing.npz", "digit.png", ""],
    "--predict": ["digit.png", "array.npy", "junk.png", "missing.png", "a_folder"],
    "--host": ["127.0.0.1", "0.0.0.0", ""],
    "--port": ["0", "8000", "-1", "x"],
}
OTHER_VALUES = ["1", "x", "", "digits"]  # for a flag added after this test was written
JUNK_ARGUMENTS = ["--bogus", "--epoch", "-e", "extra", "--", "--n", "--log-level=INFO", "--epochs=1"]


def flag_and_values(flag: str) -> st.SearchStrategy:
    action = PARSER._option_string_actions[flag]
    if action.nargs == 0:  # --profile, --no-fallback, --gradcheck
        return st.just([flag])
    values = st.sampled_from(VALUES.get(flag, OTHER_VALUES))
    if action.nargs in ("+", "*"):
        return st.lists(values, min_size=1, max_size=3).map(lambda chosen: [flag, *chosen])
    return values.map(lambda value: [flag, value])


# Command lines that work, for the random flags to start from: without them, --predict would seldom meet a model.
STARTS = [
    [],
    ["--config", "cfg.yaml"],
    ["--load-model", "model.npz", "--predict", "digit.png", "array.npy"],
    ["--load-model", "model.npz", "--epochs", "0", "--output", "results.json"],
    ["--load-model", "model.npz", "--save-model", "again.npz"],
    ["--gradcheck", "--output", "check.json"],
    ["--dataset", "mnist", "--data-path", "idx", "--plot-dir", "pictures"],
    ["--optimizer", "sgd", "--learning-rate", "1e20", "--batch-size", "8"],  # diverges in its second batch
]
flag_lists = st.tuples(
    st.sampled_from(STARTS),
    st.lists(st.one_of(st.sampled_from(FLAGS).flatmap(flag_and_values),
                       st.sampled_from(JUNK_ARGUMENTS).map(lambda argument: [argument])), max_size=6),
).map(lambda drawn: drawn[0] + [argument for group in drawn[1] for argument in group])


def last_value(argv: list[str], flag: str) -> str | None:
    """The value argparse will keep for flag (the last one given), or None if absent."""
    value = None
    for index, argument in enumerate(argv[:-1]):
        if argument == flag:
            value = argv[index + 1]
    return value


def small_enough(value: str | None, limit: int) -> bool:
    """A value that validation refuses, or one at most `limit`: either way the run stays short."""
    try:
        return value is not None and int(value) <= limit
    except ValueError:
        return True  # argparse refuses it before anything runs


def keep_it_small(argv: list[str]) -> list[str]:
    """Append what keeps a run that would train short: the 8x8 digits (unless an IDX folder or the synthetic digits
    were asked for), at most 64 images and one epoch. Flags given later win in argparse."""
    if "--predict" in argv:
        return argv  # classifies the given images with the given model: nothing to train
    if "--gradcheck" in argv:
        return argv if "--dataset" in argv else [*argv, "--dataset", "digits"]  # 8x8: the quickest check
    extra = []
    dataset = last_value(argv, "--dataset")
    if dataset is None or (dataset in ("mnist", "fashion_mnist") and "--data-path" not in argv):
        extra += ["--dataset", "digits"]  # never the cache or a download (the config may name either)
    for flag, limit, safe in (("--n-train", 64, "32"), ("--n-test", 64, "16"), ("--epochs", 1, "1")):
        if not small_enough(last_value(argv, flag), limit):
            extra += [flag, safe]
    return [*argv, *extra]


# ---- the property ----------------------------------------------------------------------------------------------


@pytest.fixture
def offline_without_pictures(monkeypatch: pytest.MonkeyPatch) -> None:
    """No download can start, no picture is drawn, no seed comes from the environment."""
    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def no_pictures(plot_dir: Path, *args: object, **kwargs: object) -> dict:
        Path(plot_dir).mkdir(parents=True, exist_ok=True)
        return {}

    monkeypatch.setattr(datafiles.socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(plots, "write_plots", no_pictures)
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    for variable in list(os.environ):
        if variable.lower().endswith("_proxy"):
            monkeypatch.delenv(variable)


def test_documented_exit_codes_are_read_from_main() -> None:
    """The property below compares against main.py's EXIT_* constants: they must be there, with the usual ones."""
    assert {0, 1, 2, 3, 130, 143} <= documented_exit_codes()
    assert {"--config", "--epochs", "--predict", "--gradcheck"} <= set(FLAGS) and "--serve" not in FLAGS


@settings(max_examples=250, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=yaml_texts, config_name=st.sampled_from(["cfg.yaml", "config.yaml"]), flags=flag_lists)
def test_any_config_and_flags_end_in_a_documented_exit_code(inputs: Path, offline_without_pictures: None,
                                                            capsys: pytest.CaptureFixture, config: str,
                                                            config_name: str, flags: list[str]) -> None:
    """main.main on the random config file (cfg.yaml, or config.yaml, which is read without --config) and flags:
    the exit code is one main.py documents, and nothing printed says "unexpected" or shows a traceback."""
    argv = keep_it_small(flags)
    capsys.readouterr()
    cwd = Path.cwd()
    with tempfile.TemporaryDirectory() as folder:
        run_dir = Path(folder) / "run"
        shutil.copytree(inputs, run_dir)
        (run_dir / config_name).write_text(config, encoding="utf-8")
        os.chdir(run_dir)
        try:
            code = main.main(argv)
        except BaseException as error:  # anything escaping main() is a failure
            pytest.fail(f"main.main({argv!r}) raised {type(error).__name__}: {error}\nconfig:\n{config}")
        finally:
            os.chdir(cwd)
    printed = capsys.readouterr()
    mode = "predict" if "--predict" in argv else "gradcheck" if "--gradcheck" in argv else "train"
    event(f"{mode}: exit code {code}")  # pytest --hypothesis-show-statistics: how often each ending was reached
    context = f"main.main({argv!r}) -> {code}\nconfig {config_name}:\n{config}\nstdout:\n{printed.out}\n" \
              f"stderr:\n{printed.err}"
    assert code in documented_exit_codes(), context
    assert not crashed(printed.out) and not crashed(printed.err), context
