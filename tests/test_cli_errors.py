"""Command-line misuse: bad configs, flags, data, model files and values end in one clear `error:` line and a
documented exit code (2 for bad input), with no traceback; a fuzzer checks that any config and flags do."""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import (
    ROOT,
    assert_one_error_line,
    idx_bytes,
    rewrite_model,
    run_cli,
    small_config_file,
    untrained_model_scores,
    write_config,
    write_idx,
    write_idx_split,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

import config_schema
import datafiles
import images
import main
import plots
from errors import DataError

CONFIG_NAME = "cfg.yaml"
RESULTS_NAME = "results.json"
MODEL_NAME = "model.npz"
PREVIOUS_RESULTS = '{"status": "completed", "note": "a results file from an earlier run"}\n'
PREVIOUS_MODEL = b"an earlier model file"

# A config that is valid and finishes in a fraction of a second: every case changes one thing in it, so a
# mistake the validation wrongly accepts fails the test quickly instead of starting a long training run.
SAFE_CONFIG: dict = {
    "logging": {"level": "WARNING", "file": "log/app.log"},
    "data": {"dataset": "synthetic", "n_train": 16, "n_test": 8, "random_seed": 0},
    "model": {"layers": [{"conv2d": {"filters": 2, "kernel_size": 3, "padding": 1}}, "relu",
                         {"maxpool2d": {"pool_size": 2}},
                         {"conv2d": {"filters": 2, "kernel_size": 3, "padding": 1}}, "relu",
                         {"maxpool2d": {"pool_size": 2}},
                         "flatten", {"dense": {"units": 8}}, "relu", {"dense": {"units": 10}}]},
    "training": {"epochs": 0, "batch_size": 8},
}
IDX_DATA = {"dataset": "mnist", "path": "idx", "n_train": 10, "n_test": 5}  # data section for the IDX cases


# ---- IDX files built by hand ----------------------------------------------------------------------------------------


def write_file(path: Path, content: bytes, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)


def random_images(n: int, size: int = 28) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, size, size), dtype=np.uint8)


def random_labels(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint8) % 10


def idx_valid(n_train: int, n_test: int | None = None) -> Callable[[Path], None]:
    """A well-formed IDX folder 'idx' with n_train training images and, if n_test is given, a t10k split."""
    def build(run_dir: Path) -> None:
        write_idx_split(run_dir / "idx", "train", random_images(n_train), random_labels(n_train), gz=True)
        if n_test is not None:
            write_idx_split(run_dir / "idx", "t10k", random_images(n_test), random_labels(n_test), gz=True)
    return build


def idx_empty_folder(run_dir: Path) -> None:
    (run_dir / "idx").mkdir()


def idx_truncated_images(run_dir: Path) -> None:
    write_idx_split(run_dir / "idx", "train", random_images(30), random_labels(30))
    image_file = run_dir / "idx" / "train-images-idx3-ubyte"
    image_file.write_bytes(image_file.read_bytes()[:-100])  # as if the download stopped early


def idx_truncated_gzip(run_dir: Path) -> None:
    write_idx_split(run_dir / "idx", "train", random_images(30), random_labels(30), gz=True)
    image_file = run_dir / "idx" / "train-images-idx3-ubyte.gz"
    image_file.write_bytes(image_file.read_bytes()[: len(image_file.read_bytes()) // 2])


def idx_corrupt_gzip(run_dir: Path) -> None:
    """A gzip file whose compressed stream is damaged (a flipped bit in the first deflate block header)."""
    write_idx_split(run_dir / "idx", "train", np.zeros((30, 28, 28), np.uint8), random_labels(30), gz=True)
    image_file = run_dir / "idx" / "train-images-idx3-ubyte.gz"
    damaged = bytearray(image_file.read_bytes())
    damaged[10] ^= 0xFF  # byte 10 is the first byte after gzip's 10-byte header
    image_file.write_bytes(bytes(damaged))


def idx_wrong_magic(run_dir: Path) -> None:
    write_idx_split(run_dir / "idx", "train", random_images(30), random_labels(30))
    image_file = run_dir / "idx" / "train-images-idx3-ubyte"
    image_file.write_bytes(b"\x1f\x8b\x08\x00" + image_file.read_bytes()[4:])  # a gzip magic, not IDX


def idx_count_mismatch(run_dir: Path) -> None:
    write_idx_split(run_dir / "idx", "train", random_images(30), random_labels(29))


def idx_label_out_of_range(run_dir: Path) -> None:
    bad_labels = random_labels(30)
    bad_labels[7] = 12
    write_idx_split(run_dir / "idx", "train", random_images(30), bad_labels)


def idx_labels_missing(run_dir: Path) -> None:
    write_file(run_dir / "idx" / "train-images-idx3-ubyte", idx_bytes(random_images(30)))


def idx_images_not_3d(run_dir: Path) -> None:
    write_idx_split(run_dir / "idx", "train", random_labels(30), random_labels(30))  # a 1-D array where images belong


def regular_file(name: str) -> Callable[[Path], None]:
    def build(run_dir: Path) -> None:
        (run_dir / name).write_text("I am a file, not a folder\n")
    return build


def folder(name: str) -> Callable[[Path], None]:
    def build(run_dir: Path) -> None:
        (run_dir / name).mkdir()
    return build


# ---- the table ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input. config: a dict deep-merged into SAFE_CONFIG, or raw YAML text written as is.
    culprit: strings the error line must contain. args: extra command-line arguments (later ones win)."""

    id: str
    culprit: tuple[str, ...]
    config: dict | str | None = None
    args: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    marks: tuple = ()  # pytest marks, e.g. an xfail for a known bug


def merged(base: dict, change: dict) -> dict:
    result = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def conv(**changes: object) -> dict:
    """A conv2d item of model.layers: SAFE_CONFIG's first one with some arguments changed."""
    return {"conv2d": dict(SAFE_CONFIG["model"]["layers"][0]["conv2d"], **changes)}


def with_layers(**replaced: object) -> dict:
    """The model section of SAFE_CONFIG with some items of its layer list replaced: with_layers(layer_3=...)
    puts the given item at model.layers[3]."""
    layers = copy.deepcopy(SAFE_CONFIG["model"]["layers"])
    for name, spec in replaced.items():
        layers[int(name.removeprefix("layer_"))] = spec
    return {"model": {"layers": layers}}


# SAFE_CONFIG's model in the old keys, as a config written before model.layers would have it, and the one line
# that answers it: the same network as a layer list.
OLD_MODEL_YAML = ("model:\n  conv_layers:\n    - {filters: 2, kernel_size: 3, padding: 1, pool_size: 2}\n"
                  "    - {filters: 2, kernel_size: 3, padding: 1, pool_size: 2}\n  dense_units: 8\n")
OLD_MODEL_AS_LAYERS = ("layers: [{conv2d: {filters: 2, kernel_size: 3, stride: 1, padding: 1}}, relu, "
                       "{maxpool2d: {pool_size: 2}}, {conv2d: {filters: 2, kernel_size: 3, stride: 1, padding: 1}}, "
                       "relu, {maxpool2d: {pool_size: 2}}, flatten, {dense: {units: 8}}, relu, {dense: {units: 10}}]")


CASES = [
    # Unknown or misspelled keys, at every level.
    Case("unknown-section-trainig", ("trainig", "training"), {"trainig": {"epochs": 3}}),
    Case("unknown-key-training.epoch", ("training.epoch",), {"training": {"epoch": 3}}),
    Case("unknown-key-data.n_trian", ("data.n_trian",), {"data": {"n_trian": 100}}),
    Case("unknown-argument-conv2d-filter", ("model.layers[3].conv2d.filter", "filters"),
         with_layers(layer_3=conv(filter=8))),
    Case("unknown-layer-conv2", ("model.layers[3]", "conv2", "did you mean 'conv2d'"),
         with_layers(layer_3={"conv2": {"filters": 2}})),
    Case("softmax-layer", ("model.layers[10]", "softmax", "loss"), {"model": {"layers": [
        *SAFE_CONFIG["model"]["layers"], "softmax"]}}),
    Case("old-model-keys", ("model", "conv_layers", "dense_units", "model.layers", OLD_MODEL_AS_LAYERS),
         OLD_MODEL_YAML),
    Case("unknown-key-output.plots", ("output.plots",), {"output": {"plots": "pics"}}),
    # Wrong types.
    Case("epochs-is-text", ("training.epochs", "ten"), {"training": {"epochs": "ten"}}),
    Case("epochs-is-float", ("training.epochs", "2.5"), {"training": {"epochs": 2.5}}),
    Case("learning-rate-is-a-word", ("training.learning_rate", "fast"),
         "training:\n  learning_rate: fast\n"),
    Case("learning-rate-is-infinite", ("training.learning_rate",), "training:\n  learning_rate: .inf\n"),
    Case("layers-is-a-number", ("model.layers",), {"model": {"layers": 5}}),
    Case("layer-is-a-number", ("model.layers[0]",), {"model": {"layers": [5]}}),
    Case("section-is-a-number", ("training",), {"training": 5}),
    Case("fallback-is-the-string-yes", ("data.allow_synthetic_fallback",),
         {"data": {"allow_synthetic_fallback": "yes"}}),
    Case("dense-units-is-a-boolean", ("model.layers[7].dense.units",), with_layers(layer_7={"dense": {"units": True}})),
    # Out-of-range values.
    Case("filters-zero", ("model.layers[0].conv2d.filters",), with_layers(layer_0=conv(filters=0))),
    Case("filters-negative", ("model.layers[3].conv2d.filters",), with_layers(layer_3=conv(filters=-3))),
    Case("kernel-size-zero", ("model.layers[3].conv2d.kernel_size",), with_layers(layer_3=conv(kernel_size=0))),
    Case("batch-size-zero", ("training.batch_size",), {"training": {"batch_size": 0}}),
    Case("n-train-zero", ("data.n_train",), {"data": {"n_train": 0}}),
    Case("n-test-negative", ("data.n_test",), {"data": {"n_test": -5}}),
    Case("epochs-negative", ("training.epochs",), {"training": {"epochs": -1}}),
    Case("learning-rate-zero", ("training.learning_rate",), {"training": {"learning_rate": 0}}),
    Case("learning-rate-negative", ("training.learning_rate",), {"training": {"learning_rate": -0.01}}),
    Case("momentum-1.5", ("training.momentum", "1.5"), {"training": {"momentum": 1.5}}),
    Case("random-seed-negative", ("data.random_seed",), {"data": {"random_seed": -1}}),
    Case("optimizer-unknown", ("training.optimizer", "rmsprop"), {"training": {"optimizer": "rmsprop"}}),
    Case("log-level-unknown", ("logging.level", "LOUD"), {"logging": {"level": "LOUD"}}),
    Case("dataset-not-in-list", ("data.dataset", "mnist2"), {"data": {"dataset": "mnist2"}}),
    Case("kernel-larger-than-padded-input", ("model.layers[0] (conv2d)", "kernel_size"),
         with_layers(layer_0=conv(kernel_size=31))),
    Case("pool-empties-the-image", ("model.layers[5] (maxpool2d)", "pool_size"),  # 28 -> 26 -> 13 -> 11 < 12
         with_layers(layer_0=conv(padding=0), layer_3=conv(padding=0), layer_5={"maxpool2d": {"pool_size": 12}})),
    Case("dense-on-an-image", ("model.layers[7] (dense)", "flatten"), with_layers(layer_6="relu")),
    Case("last-layer-not-the-classes", ("model.layers[9]", "10 classes"),
         with_layers(layer_9={"dense": {"units": 7}})),
    # The config file itself.
    Case("yaml-empty-file", (CONFIG_NAME, "empty"), ""),
    Case("yaml-is-a-list", (CONFIG_NAME, "list"), "- epochs: 3\n- batch_size: 2\n"),
    Case("yaml-is-a-string", (CONFIG_NAME, "str"), "just some words\n"),
    Case("yaml-bad-indentation", (CONFIG_NAME, "line 3"), "training:\n  epochs: 3\n   batch_size: 2\n"),
    Case("yaml-unclosed-brace", (CONFIG_NAME, "line 2"), "data: {n_train: 5\ntraining:\n  epochs: 2\n"),
    Case("yaml-tab-indentation", (CONFIG_NAME, "line 2"), "training:\n\tepochs: 2\n"),
    Case("yaml-python-object-tag", (CONFIG_NAME, "line 1"), "training: !!python/object:os.system ls\n"),
    Case("config-file-missing", ("missing.yaml",), args=("--config", "missing.yaml")),
    Case("config-file-is-a-folder", ("config_folder",), args=("--config", "config_folder"),
         setup=folder("config_folder")),
    Case("config-file-not-utf8", ("latin1.yaml",), args=("--config", "latin1.yaml"),
         setup=lambda run_dir: (run_dir / "latin1.yaml").write_bytes(b"# caf\xe9\nlogging: {}\n")),
    # The data folder.
    Case("data-path-missing", ("data.path", "no_such_folder"),
         {"data": dict(IDX_DATA, path="no_such_folder")}),
    Case("data-path-flag-missing", ("no_such_folder",), {"data": IDX_DATA},
         args=("--data-path", "no_such_folder")),
    Case("data-path-empty-folder", ("idx", "train-images-idx3-ubyte"), {"data": IDX_DATA}, setup=idx_empty_folder),
    Case("data-path-is-a-file", ("data.path", "idx"), {"data": IDX_DATA}, setup=regular_file("idx")),
    Case("idx-truncated", ("train-images-idx3-ubyte", "truncated"), {"data": IDX_DATA},
         setup=idx_truncated_images),
    Case("idx-truncated-gzip", ("train-images-idx3-ubyte.gz",), {"data": IDX_DATA}, setup=idx_truncated_gzip),
    Case("idx-corrupt-gzip", ("train-images-idx3-ubyte.gz",), {"data": IDX_DATA}, setup=idx_corrupt_gzip),
    Case("idx-wrong-magic", ("train-images-idx3-ubyte", "magic"), {"data": IDX_DATA}, setup=idx_wrong_magic),
    Case("idx-count-mismatch", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "30", "29"),
         {"data": IDX_DATA}, setup=idx_count_mismatch),
    Case("idx-label-out-of-range", ("train-labels-idx1-ubyte", "12"), {"data": IDX_DATA},
         setup=idx_label_out_of_range),
    Case("idx-labels-missing", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), {"data": IDX_DATA},
         setup=idx_labels_missing),
    Case("idx-images-not-3d", ("train-images-idx3-ubyte", "3 dimensions"), {"data": IDX_DATA},
         setup=idx_images_not_3d),
    Case("idx-n-train-beyond-train-split", ("n_train", "50", "30"), {"data": dict(IDX_DATA, n_train=50)},
         setup=idx_valid(30, n_test=20)),
    Case("idx-n-test-beyond-test-split", ("n_test", "25", "20"), {"data": dict(IDX_DATA, n_test=25)},
         setup=idx_valid(30, n_test=20)),
    Case("idx-n-train-beyond-without-t10k", ("n_train", "30"), {"data": dict(IDX_DATA, n_train=40)},
         setup=idx_valid(30)),
    Case("digits-n-train-5000", ("n_train", "1,797"),
         {"data": {"dataset": "digits", "n_train": 5000, "n_test": 50}}),
    # Output paths.
    Case("output-inside-a-regular-file", ("--output", "somefile.txt"), args=("--output", "somefile.txt/out.json"),
         setup=regular_file("somefile.txt")),
    Case("output-is-a-folder", ("--output", "out_folder"), args=("--output", "out_folder"),
         setup=folder("out_folder")),
    Case("save-model-inside-a-regular-file", ("--save-model", "somefile.txt"),
         args=("--save-model", "somefile.txt/model.npz"), setup=regular_file("somefile.txt")),
    Case("log-file-inside-a-regular-file", ("logging.file", "somefile.txt"),
         {"logging": {"file": "somefile.txt/app.log"}}, setup=regular_file("somefile.txt")),
    Case("plot-dir-is-a-regular-file", ("output.plot_dir", "somefile.txt"), {"output": {"plot_dir": "somefile.txt"}},
         setup=regular_file("somefile.txt")),
    # Flags and the environment.
    Case("flag-epochs-ten", ("--epochs", "ten"), args=("--epochs", "ten")),
    Case("flag-epochs-negative", ("--epochs", "-1"), args=("--epochs", "-1")),
    Case("flag-epochs-without-value", ("--epochs",), args=("--epochs",)),
    Case("flag-learning-rate-zero", ("--learning-rate",), args=("--learning-rate", "0")),
    Case("flag-learning-rate-word", ("--learning-rate", "fast"), args=("--learning-rate", "fast")),
    Case("flag-batch-size-zero", ("--batch-size",), args=("--batch-size", "0")),
    Case("flag-n-train-zero", ("--n-train",), args=("--n-train", "0")),
    Case("flag-seed-negative", ("--seed",), args=("--seed", "-3")),
    Case("flag-dataset-foo", ("--dataset", "foo"), args=("--dataset", "foo")),
    Case("flag-log-level-loud", ("--log-level", "LOUD"), args=("--log-level", "LOUD")),
    Case("flag-unknown-bogus", ("--bogus",), args=("--bogus",)),
    Case("env-random-seed-not-a-number", ("RANDOM_SEED", "abc"), env={"RANDOM_SEED": "abc"}),
    Case("load-model-missing", ("missing.npz",), args=("--load-model", "missing.npz")),
    Case("load-model-not-a-model", ("notes.npz",), args=("--load-model", "notes.npz"),
         setup=lambda run_dir: (run_dir / "notes.npz").write_text("not a zip archive\n")),
    Case("predict-without-load-model", ("--load-model",), args=("--predict", "digit.png")),
    Case("learning-rate-400-digits", ("training.learning_rate", "401 digits"),
         config={"training": {"learning_rate": 10 ** 400}}),
    Case("dense-units-beyond-memory", ("model.layers", "memory"),
         config=with_layers(layer_7={"dense": {"units": 10 ** 15}})),
    Case("workers-above-batch-size", ("training.workers", "9", "training.batch_size (8)"),
         config={"training": {"workers": 9}}),
]


# ---- running a case -------------------------------------------------------------------------------------------------


def prepare(case: Case, run_dir: Path, previous_outputs: bool) -> list[str]:
    """Create run_dir with the case's config and files; return the command-line arguments."""
    run_dir.mkdir()
    if isinstance(case.config, str):
        text = case.config
    else:
        text = yaml.safe_dump(merged(SAFE_CONFIG, case.config or {}), sort_keys=False)
    (run_dir / CONFIG_NAME).write_text(text, encoding="utf-8")
    if case.setup is not None:
        case.setup(run_dir)
    if previous_outputs:
        (run_dir / RESULTS_NAME).write_text(PREVIOUS_RESULTS)
        (run_dir / MODEL_NAME).write_bytes(PREVIOUS_MODEL)
    return ["--config", CONFIG_NAME, "--output", RESULTS_NAME, "--save-model", MODEL_NAME, *case.args]


def files_in(run_dir: Path) -> set[str]:
    return {str(path.relative_to(run_dir)) for path in run_dir.rglob("*")}


def check_error_line(stderr: str, culprit: tuple[str, ...]) -> str:
    """stderr must be exactly one line 'error: ...' naming every culprit; returns that line."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert not line.startswith("error: unexpected"), line
    assert len(line) < 400, f"an error line should be short enough to read: {line}"
    for word in culprit:
        assert word in line, f"{word!r} not named in: {line}"
    return line


def check_outputs(run_dir: Path, before: set[str], previous_outputs: bool) -> None:
    """No results or model file appeared, earlier ones are untouched, no temporary file was left."""
    if previous_outputs:
        assert (run_dir / RESULTS_NAME).read_text() == PREVIOUS_RESULTS
        assert (run_dir / MODEL_NAME).read_bytes() == PREVIOUS_MODEL
    else:
        assert not (run_dir / RESULTS_NAME).exists()
        assert not (run_dir / MODEL_NAME).exists()
    new_files = files_in(run_dir) - before
    assert not [name for name in new_files if not name.startswith("log")], f"unexpected new files {new_files}"


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=case.marks) for case in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_culprit(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The bad input is refused with exit code 2 and one 'error:' line naming the culprit; no results or
    model file is created, and the files of an earlier run survive unchanged."""
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    for previous_outputs in (False, True):
        run_dir = tmp_path / ("with_previous_outputs" if previous_outputs else "fresh")
        argv = prepare(case, run_dir, previous_outputs)
        before = files_in(run_dir)
        monkeypatch.chdir(run_dir)
        code = main.main(argv)
        captured = capsys.readouterr()
        check_error_line(captured.err, case.culprit)
        assert code == main.EXIT_USAGE == 2, captured.err
        assert "Traceback" not in captured.out
        check_outputs(run_dir, before, previous_outputs)


# A few cases again in a real process: the exit code the shell sees, and nothing but the one line.
FRESH_PROCESS_CASES = ["unknown-key-training.epoch", "yaml-bad-indentation", "idx-truncated", "flag-epochs-ten",
                       "flag-unknown-bogus", "output-inside-a-regular-file"]


def test_bad_input_in_a_fresh_process(tmp_path: Path) -> None:
    """Run as `python src/main.py` (all cases in parallel), bad input gives exit status 2, one 'error:' line
    on stderr and no traceback anywhere, and writes no results file."""
    by_id = {case.id: case for case in CASES}
    env = {key: value for key, value in os.environ.items() if key != "RANDOM_SEED"}
    running = []
    for case_id in FRESH_PROCESS_CASES:
        run_dir = tmp_path / case_id
        argv = prepare(by_id[case_id], run_dir, previous_outputs=False)
        process = subprocess.Popen([sys.executable, str(ROOT / "src" / "main.py"), *argv], cwd=run_dir, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running.append((by_id[case_id], run_dir, process))
    for case, run_dir, process in running:
        stdout, stderr = process.communicate(timeout=60)
        check_error_line(stderr, case.culprit)
        assert process.returncode == 2, (case.id, stderr)
        assert "Traceback" not in stdout
        assert not (run_dir / RESULTS_NAME).exists()


# ---- values that look odd but are valid -----------------------------------------------------------------------------


def test_learning_rate_in_e_notation_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PyYAML reads `1e-3` (no dot) as the string '1e-3'; the config takes it as the number 0.001, and
    `epochs: 0` is valid: the run only evaluates and succeeds."""
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    monkeypatch.chdir(tmp_path)
    assert yaml.safe_load("learning_rate: 1e-3") == {"learning_rate": "1e-3"}  # the trap this test is about
    (tmp_path / CONFIG_NAME).write_text(
        "logging: {level: WARNING, file: log/app.log}\n"
        "data: {dataset: digits, n_train: 100, n_test: 50}\n"
        "model:\n  layers: [{conv2d: {filters: 2, kernel_size: 3, padding: 1}}, relu, {maxpool2d: {pool_size: 2}},\n"
        "           flatten, {dense: {units: 8}}, relu, {dense: {units: 10}}]\n"
        "training:\n  epochs: 0\n  learning_rate: 1e-3\n")
    assert main.main(["--config", CONFIG_NAME, "--output", RESULTS_NAME]) == 0
    results = json.loads((tmp_path / RESULTS_NAME).read_text())
    learning_rate = results["config"]["training"]["learning_rate"]
    assert isinstance(learning_rate, float) and learning_rate == 0.001
    assert results["config"]["training"]["epochs"] == 0
    assert results["status"] == "completed" and results["history"] == [] and results["epochs_completed"] == 0
    # The run succeeded at what epochs 0 asks: it scored the untrained model of the seed on the 50 test images
    # (recomputed here in float64; the accuracy may be one image apart, where float32 rounds a near-tie).
    loss, accuracy, n_test = untrained_model_scores(results)
    assert n_test == 50
    assert results["test_loss"] == pytest.approx(loss, rel=1e-4)
    assert abs(results["test_accuracy"] - accuracy) <= 1 / 50


@pytest.mark.parametrize(("argv", "message"), [
    (["--gradcheck", "--predict", "x.png"], "not allowed with argument"),
    (["--gradcheck", "--epochs", "3"], "--epochs has no effect with --gradcheck"),
    (["--gradcheck", "--save-model", "m.npz"], "--save-model has no effect with --gradcheck"),
    (["--predict", "x.png", "--load-model", "m.npz", "--plot-dir", "p"], "--plot-dir has no effect with --predict"),
    (["--predict", "x.png"], "--predict needs --load-model"),
    (["--gradcheck", "--epochs", "0"], "--epochs has no effect with --gradcheck"),  # 0 is a value, not "unset"
    (["--gradcheck", "--batch-size", "7"], "--batch-size has no effect with --gradcheck"),
    (["--gradcheck", "--no-fallback"], "--no-fallback has no effect with --gradcheck"),
    (["--predict", "x.png", "--load-model", "m.npz", "--seed", "3"], "--seed has no effect with --predict"),
    (["--predict", "x.png", "--load-model", "m.npz", "--n-test", "5"], "--n-test has no effect with --predict"),
    (["--predict", "x.png", "--load-model", "m.npz", "--dataset", "digits"], "--dataset has no effect with --predict"),
    (["--load-model", "", "--epochs", "0"], "argument --load-model: expected a path, got an empty string"),
    (["--output", " "], "argument --output: expected a path, got an empty string"),
    (["--config", ""], "argument --config: expected a path, got an empty string"),
    (["--predict", "", "--load-model", "m.npz"], "argument --predict: expected a path, got an empty string"),
])
def test_flags_a_mode_would_ignore_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main.main(argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was trained or written


def test_impossible_architecture_is_reported_before_the_data_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """The data folder does not exist either: the architecture error wins, so no download is ever waited for."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, data={"path": str(tmp_path / "nowhere")},
                          model={"layers": [{"conv2d": {"filters": 8, "kernel_size": 31, "padding": 1}}, "relu",
                                            "flatten", {"dense": {"units": 10}}]})
    assert main.main(["--config", str(config)]) == 2
    error = capsys.readouterr().err
    assert f"{config}: model.layers[0] (conv2d): kernel_size 31 is larger than its padded input 30x30" in error


def test_divergence_is_reported_on_stderr_and_the_seed_origin_in_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANDOM_SEED", "5")
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 200, "n_test": 50},
                          training={"optimizer": "sgd", "learning_rate": 1e20, "epochs": 2})
    assert main.main(["--config", str(config)]) == 3
    captured = capsys.readouterr()
    assert "seed 5 (from RANDOM_SEED)" in captured.out
    assert "training diverged" in captured.err and "lower learning rate" in captured.err
    assert "training diverged" not in captured.out


# ---- bad input that ended as "unexpected" ---------------------------------------------------------------------------


HUGE_PADDING = {"layers": [{"conv2d": {"filters": 4, "padding": 100000, "stride": 50000}}, "relu", "flatten",
                           {"dense": {"units": 10}}]}


@pytest.mark.parametrize("mode", [[], ["--gradcheck"]])
def test_a_huge_padding_is_refused_for_its_padded_input(tmp_path: Path, mode: list[str]) -> None:
    proc = run_cli(["--config", str(small_config_file(tmp_path, model=HUGE_PADDING)), *mode], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "GiB", "but this machine has")


def test_an_absurd_shift_is_refused(tmp_path: Path) -> None:
    config = small_config_file(tmp_path, data={"augment": {"shift": 10**23}})
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "data.augment.shift: got 100000000000000000000000, expected less than the 8 "
                                       "pixels of a digits image's side")


def test_an_optimiser_step_count_of_400_digits_is_refused(tmp_path: Path, model_file: Path) -> None:
    meta = json.loads(str(np.load(model_file)["meta"]))
    meta["optimizer"]["t"] = 10**400
    rewrite_model(model_file, tmp_path / "t.npz", meta=meta)
    proc = run_cli(["--config", str(small_config_file(tmp_path)), "--load-model", "t.npz"], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "t.npz: not a valid numpy-cnn model file", "a step count from 0 to")


# ---- wrong answers accepted -----------------------------------------------------------------------------------------


def test_a_float_image_with_a_nan_is_refused_in_every_float_input(tmp_path: Path, model_file: Path) -> None:
    grey = np.full((28, 28), 0.5, dtype=np.float32)
    grey[3, 3] = np.nan
    np.save(tmp_path / "nan.npy", grey)
    Image.fromarray(grey).save(tmp_path / "nan.tif")
    proc = run_cli(["--load-model", str(model_file), "--predict", "nan.npy", "nan.tif", "--output", "p.json"],
                   cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: nan.npy: it holds NaN or infinite values",
        "error: nan.tif: is a TIFF file; the formats read are PNG, JPEG, GIF, BMP or WebP (and .npy arrays)"]
    json.loads((tmp_path / "p.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))


def test_the_float_image_path_refuses_a_nan_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should an allowed format ever decode to float ("F") greys, a NaN in them is still refused."""
    grey = np.full((28, 28), 0.5, dtype=np.float32)
    grey[3, 3] = np.nan
    monkeypatch.setattr(images, "open_image", lambda *args, **kwargs: Image.fromarray(grey))
    with pytest.raises(DataError, match=r"^x: it holds NaN or infinite values$"):
        images._read_picture(None, None, "x")


# ---- misleading messages --------------------------------------------------------------------------------------------


def test_a_batch_larger_than_the_data_is_sized_by_the_data(tmp_path: Path) -> None:
    proc = run_cli(["--config", str(small_config_file(tmp_path)), "--batch-size", str(10**9), "--output", "r.json"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["epochs_completed"] == 1


def test_divergence_advice_names_the_key_that_caused_it(tmp_path: Path) -> None:
    config = small_config_file(tmp_path, training={"epochs": 2, "optimizer": "sgd", "learning_rate": 0.01,
                                                   "weight_decay": 1000})
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 3
    assert "try a smaller training.weight_decay than 1000" in proc.stderr and "learning rate" not in proc.stderr
    config = small_config_file(tmp_path, training={"lr_schedule": {"name": "one_cycle", "div_factor": 1e-6},
                                                   "learning_rate": 0.01})
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 3
    assert "training.lr_schedule.div_factor 1e-06 is below 1" in proc.stderr


@pytest.mark.parametrize("sections, message", [
    ({"training": {"lr_schedule": {"name": "cosine", "min_lr": 0.1}}},
     "training.lr_schedule.min_lr: got 0.1, expected at most training.learning_rate (0.001)"),
    ({"data": {"augment": {"shift": 8}}}, "data.augment.shift: got 8, expected less than the 8 pixels"),
])
def test_values_that_cannot_work_together_are_refused(tmp_path: Path, sections: dict, message: str) -> None:
    proc = run_cli(["--config", str(small_config_file(tmp_path, **sections))], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, message)


def test_a_one_cycle_schedule_of_one_step_warns(tmp_path: Path) -> None:
    config = small_config_file(tmp_path, training={"lr_schedule": "one_cycle", "batch_size": 256})
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: training.lr_schedule one_cycle over 1 step never reaches training.learning_rate" in proc.stderr


def test_serve_with_load_model_refuses_output(tmp_path: Path, model_file: Path) -> None:
    proc = run_cli(["--serve", "--load-model", str(model_file), "--output", "x.json"], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--output has no effect with --load-model and --serve")


def test_the_start_line_names_where_the_seed_came_from(tmp_path: Path) -> None:
    proc = run_cli(["--config", str(small_config_file(tmp_path)), "--epochs", "0"], cwd=tmp_path)
    assert "seed 42 (from built-in default)" in proc.stdout.splitlines()[0]
    config = small_config_file(tmp_path, data={"random_seed": 7})
    proc = run_cli(["--config", str(config), "--epochs", "0"], cwd=tmp_path)
    assert f"seed 7 (from {tmp_path / 'config.yaml'})" in proc.stdout.splitlines()[0]


# ---- what the command line documents --------------------------------------------------------------------------------


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


# ---- the files a run may be pointed at ------------------------------------------------------------------------------


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


# ---- random YAML ----------------------------------------------------------------------------------------------------

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

# ---- random flags ---------------------------------------------------------------------------------------------------

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


# ---- the property ---------------------------------------------------------------------------------------------------


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


# ---- too big for memory ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layers", "batch", "message"), [
    ([{"conv2d": {"filters": 8}}, "flatten", {"dense": {"units": 10 ** 8}}, {"dense": {"units": 10}}], 32,
     "model.layers[2] (dense): 540,800,000,000 weights need about"),
    ([{"conv2d": {"filters": 512, "padding": 1}}, "relu", {"conv2d": {"filters": 512, "padding": 1}}, "flatten",
      {"dense": {"units": 10}}], 10 ** 6, "model: training needs about"),
])
def test_a_model_that_cannot_fit_in_memory_is_refused_before_building(tmp_path: Path, layers: list, batch: int,
                                                                       message: str) -> None:
    config = write_config(tmp_path, model={"layers": layers}, training={"batch_size": batch})
    started = time.monotonic()
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "GiB of memory available" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and time.monotonic() - started < 30


def test_cli_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  batch_size: 0\n")
    proc = run_cli(["--config", str(config), "--output", "r.json"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "training.batch_size: got 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.json").exists()
