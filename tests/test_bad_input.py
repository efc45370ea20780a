"""Bad input never crashes the command line.

Every mistake a user can make -- in the config file, the data folder, the output paths, the flags or the
environment -- must end with exit code 2 and ONE readable line on stderr that starts with "error:" and names
the culprit (a key path such as `training.epochs`, a file name or a flag), never a traceback, and must not
create or damage an output file.

Most cases run in-process through `main.main` (they all fail before any training, so this is fast); a few
run again in a real, fresh Python process to prove the exit code and the absence of a traceback there too.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from helpers import idx_bytes, untrained_model_scores

import main

ROOT = Path(__file__).resolve().parents[1]
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


# ---- IDX files built by hand -----------------------------------------------------------------------


def write_file(path: Path, content: bytes, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)


def images(n: int, size: int = 28) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, size, size), dtype=np.uint8)


def labels(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint8) % 10


def write_split(folder: Path, prefix: str, image_array: np.ndarray, label_array: np.ndarray,
                gz: bool = False) -> None:
    """prefix 'train' or 't10k': writes <prefix>-images-idx3-ubyte and <prefix>-labels-idx1-ubyte."""
    write_file(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(image_array), gz)
    write_file(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(label_array), gz)


def idx_valid(n_train: int, n_test: int | None = None) -> Callable[[Path], None]:
    """A well-formed IDX folder 'idx' with n_train training images and, if n_test is given, a t10k split."""
    def build(run_dir: Path) -> None:
        write_split(run_dir / "idx", "train", images(n_train), labels(n_train), gz=True)
        if n_test is not None:
            write_split(run_dir / "idx", "t10k", images(n_test), labels(n_test), gz=True)
    return build


def idx_empty_folder(run_dir: Path) -> None:
    (run_dir / "idx").mkdir()


def idx_truncated_images(run_dir: Path) -> None:
    write_split(run_dir / "idx", "train", images(30), labels(30))
    image_file = run_dir / "idx" / "train-images-idx3-ubyte"
    image_file.write_bytes(image_file.read_bytes()[:-100])  # as if the download stopped early


def idx_truncated_gzip(run_dir: Path) -> None:
    write_split(run_dir / "idx", "train", images(30), labels(30), gz=True)
    image_file = run_dir / "idx" / "train-images-idx3-ubyte.gz"
    image_file.write_bytes(image_file.read_bytes()[: len(image_file.read_bytes()) // 2])


def idx_corrupt_gzip(run_dir: Path) -> None:
    """A gzip file whose compressed stream is damaged (a flipped bit in the first deflate block header)."""
    write_split(run_dir / "idx", "train", np.zeros((30, 28, 28), np.uint8), labels(30), gz=True)
    image_file = run_dir / "idx" / "train-images-idx3-ubyte.gz"
    damaged = bytearray(image_file.read_bytes())
    damaged[10] ^= 0xFF  # byte 10 is the first byte after gzip's 10-byte header
    image_file.write_bytes(bytes(damaged))


def idx_wrong_magic(run_dir: Path) -> None:
    write_split(run_dir / "idx", "train", images(30), labels(30))
    image_file = run_dir / "idx" / "train-images-idx3-ubyte"
    image_file.write_bytes(b"\x1f\x8b\x08\x00" + image_file.read_bytes()[4:])  # a gzip magic, not IDX


def idx_count_mismatch(run_dir: Path) -> None:
    write_split(run_dir / "idx", "train", images(30), labels(29))


def idx_label_out_of_range(run_dir: Path) -> None:
    bad_labels = labels(30)
    bad_labels[7] = 12
    write_split(run_dir / "idx", "train", images(30), bad_labels)


def idx_labels_missing(run_dir: Path) -> None:
    write_file(run_dir / "idx" / "train-images-idx3-ubyte", idx_bytes(images(30)))


def idx_images_not_3d(run_dir: Path) -> None:
    write_split(run_dir / "idx", "train", labels(30), labels(30))  # a 1-D array where images belong


def regular_file(name: str) -> Callable[[Path], None]:
    def build(run_dir: Path) -> None:
        (run_dir / name).write_text("I am a file, not a folder\n")
    return build


def folder(name: str) -> Callable[[Path], None]:
    def build(run_dir: Path) -> None:
        (run_dir / name).mkdir()
    return build


# ---- the table ---------------------------------------------------------------------------------------


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


# ---- running a case --------------------------------------------------------------------------------


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


# ---- values that look odd but are valid --------------------------------------------------------------


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
