"""Hostile and careless input: every case ends in one line naming the culprit, in bounded time and memory.

- YAML configs: duplicate keys, alias bombs ("billion laughs"), deep nesting, loops; values quoted in messages are
  capped (config_schema.read_yaml, read_yaml_file, shown); `~` in path values means the home folder.
- A .env file that is not UTF-8 (plumbing.load_env_file).
- Model files whose metadata lies: colour input, absurd sizes, class names that are no names, NaN or infinite
  weights, buffers, optimiser state or test accuracy (modelfile.load_model).
- IDX gzip bombs: the header is checked first and no more than the declared bytes (plus one) are decompressed
  (datafiles.read_idx).
- --predict with bad files among good ones: one result per file, no Pillow or NumPy warning reaching the user
  (images.predict_files, read_image).

All files are made here, small.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import MAIN, ROOT, idx_bytes, run_cli, write_config
from PIL import Image, ImageDraw

import config_schema
import datafiles
import images
import main
import modelfile
import plumbing
from errors import CNNError, ConfigError, DataError, ModelFileError


def one_line(stderr: str) -> str:
    """The single line on stderr, after checking there is no traceback and nothing 'unexpected'."""
    assert "Traceback" not in stderr and "unexpected" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def run_limited(args: list[str], cwd: Path, memory: int = 2 << 30, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh process whose address space is capped at `memory` bytes: a case that would
    allocate gigabytes fails with MemoryError there instead of taking the machine's memory."""
    limit = (f"import os, resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory})); "
             "sys.argv = sys.argv[1:]; sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0])); "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("RANDOM_SEED", None)
    return subprocess.run([sys.executable, "-c", limit, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---- YAML --------------------------------------------------------------------------------------------------------


def laughs(levels: int = 9) -> str:
    """A 'billion laughs' document under training.optimizer: each item holds nine of the one before, so the
    last of `levels` items expands to 9**levels strings. Line n + 3 holds item n (0-based)."""
    lines = ["training:", "  optimizer:", "    - &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels):
        lines.append(f"    - &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_billion_laughs_is_refused_in_milliseconds() -> None:
    """A 600-byte document that expands to 387 million strings is refused after measuring it (each aliased
    node measured once), naming the line of the first item that expands beyond the limit (l5: 9**6 strings)."""
    text = laughs()
    assert len(text) < 700
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        config_schema.read_yaml(text, "bomb.yaml")
    assert time.perf_counter() - start < 0.5
    assert str(error.value) == ("bomb.yaml: line 8: this value expands to more than 100,000 values through its "
                                "aliases (*name); a config has a few dozen")


def test_aliases_within_the_limit_still_work() -> None:
    """Anchors, aliases and merge keys as people use them are read as yaml.safe_load reads them."""
    text = "base: &base {epochs: 3, batch_size: 8}\ntraining:\n  <<: *base\n  epochs: 4\nlist: [*base, *base]\n"
    assert config_schema.read_yaml(text, "c.yaml") == {
        "base": {"epochs": 3, "batch_size": 8}, "training": {"epochs": 4, "batch_size": 8},
        "list": [{"epochs": 3, "batch_size": 8}] * 2}
    assert config_schema.read_yaml("", "c.yaml") is None


@pytest.mark.parametrize(("text", "message"), [
    ("training:\n  epochs: 3\ndata:\n  n_train: 10\ntraining:\n  epochs: 4\n",
     "c.yaml: line 5: key 'training' appears twice in the same mapping (first at line 1); YAML would keep only "
     "the last: merge them"),
    ("training: {epochs: 3, batch_size: 8, epochs: 4}\n",
     "c.yaml: line 1: key 'epochs' appears twice in the same mapping (first at line 1); YAML would keep only the "
     "last: merge them"),
    ("[" * 5000 + "]" * 5000, "c.yaml: line 1: nested more than 50 levels deep"),
    ("".join("  " * depth + f"k{depth}:\n" for depth in range(60)), "c.yaml: line 50: nested more than 50 levels deep"),
    ("".join(f"a{i}: &a{i} [{f'*a{i - 1}' if i else 1}]\n" for i in range(60)),
     "c.yaml: line 50: nested more than 50 levels deep through its aliases (*name)"),
    ("a: &a [1, *a]\n", "c.yaml: line 1: an alias (*name) inside the value it names; a config cannot hold a loop"),
    ("training:\n  epochs: 3\n   batch_size: 2\n",
     "c.yaml: YAML syntax error at line 3, column 14: mapping values are not allowed here"),
    ("data: {n_train: 5\ntraining:\n  epochs: 2\n",
     "c.yaml: YAML syntax error at line 2, column 9: expected ',' or '}', but got ':' (while parsing a flow "
     "mapping started at line 1)"),
    ("training: {epochs: !!int ten}\n", "c.yaml: a value cannot be read (invalid literal for int() with base 10: "
                                        "'ten')"),
    ("x: [" + ", ".join(["0"] * 40000) + "]\n", "c.yaml: 120,004 characters, more than a config file may have "
                                                "(100,000)"),
], ids=["duplicate-section", "duplicate-key-in-flow", "5000-deep-flow", "60-deep-block", "alias-chain-60-deep",
        "alias-loop", "syntax-error", "unclosed-brace", "bad-tagged-int", "too-long"])
def test_yaml_problems_are_one_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        config_schema.read_yaml(text, "c.yaml")
    assert str(error.value) == message


def test_read_yaml_file_reads_no_further_than_a_config_can_be(tmp_path: Path) -> None:
    """`--config /dev/zero` (or any huge file) ends at once, and a file that is not UTF-8 names its line."""
    with pytest.raises(ConfigError) as error:
        config_schema.read_yaml_file("/dev/zero")
    assert str(error.value) == "/dev/zero: larger than 400,000 bytes; a config file has a few kilobytes"
    (tmp_path / "latin1.yaml").write_bytes(b"# ok\n# caf\xe9\n")
    with pytest.raises(ConfigError) as error:
        config_schema.read_yaml_file(tmp_path / "latin1.yaml")
    assert str(error.value) == (f"{tmp_path / 'latin1.yaml'}: cannot read the config file (line 2 is not UTF-8 text: "
                                "byte 0xe9); save it as UTF-8")
    with pytest.raises(ConfigError, match=r": is a folder, not a config file$"):
        config_schema.read_yaml_file(tmp_path)


def test_a_value_in_a_message_is_capped_and_its_repr_bounded() -> None:
    """A 6,561-item list is quoted in 80 characters, and the repr behind it does bounded work even for a value
    that shares one list 9**7 times (a repr in full would take seconds and build a 24-million-character text)."""
    with pytest.raises(ConfigError) as error:
        config_schema.validate_config({"training": {"optimizer": list(range(6561))}})
    assert str(error.value) == "training.optimizer: got [0, 1, 2, 3, 4, 5, ...], expected one of adam, sgd"
    with pytest.raises(ConfigError) as error:
        config_schema.validate_config(list(range(6561)))
    assert str(error.value) == ("expected a mapping with sections logging, data, model, training, output, got list "
                                "[0, 1, 2, 3, 4, 5, ...]")
    shared: list = ["lol"] * 9
    for _ in range(6):
        shared = [shared] * 9
    start = time.perf_counter()
    text = config_schema.shown(shared)
    assert time.perf_counter() - start < 0.05
    assert text == "[[[[...], [...], [...], [...], [...], [...], ...], [[...], [...], [...], [......"
    assert len(config_schema.shown("x" * 10**6)) == 80
    assert len(config_schema.shown({"k" * 10**6: 1})) == 80


def test_keys_in_messages_are_one_short_line() -> None:
    """An unknown key of many lines, or a megabyte long, is quoted and cut rather than printed as it is."""
    with pytest.raises(ConfigError) as error:
        config_schema.validate_config({"training": {"a\nb" * 100: 1}})
    message = str(error.value)
    assert "\n" not in message and message.startswith("training.'a\\nba\\nb") and len(message) < 250
    with pytest.raises(ConfigError) as error:
        config_schema.validate_config({"x" * 10**6: {}})
    assert len(str(error.value)) < 200


def test_the_yaml_bomb_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    """`python src/main.py --config bomb.yaml`: exit 2 and one line, in a process capped at 2 GB (the old
    validation printed the expanded value in full: 40 s, 3 GB and "unexpected MemoryError")."""
    (tmp_path / "bomb.yaml").write_text(laughs())
    run = run_limited([str(MAIN), "--config", "bomb.yaml"], tmp_path)
    assert one_line(run.stderr) == ("error: bomb.yaml: line 8: this value expands to more than 100,000 values "
                                    "through its aliases (*name); a config has a few dozen")
    assert run.returncode == 2


def test_duplicate_sections_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    """Two `training:` sections in one file are not merged (the last winning): exit 2 and one line naming them."""
    (tmp_path / "c.yaml").write_text("training:\n  epochs: 1\ntraining:\n  epochs: 2\n")
    monkeypatch.chdir(tmp_path)
    code = main.main(["--config", "c.yaml", "--gradcheck"])
    assert one_line(capsys.readouterr().err) == ("error: c.yaml: line 3: key 'training' appears twice in the same "
                                                 "mapping (first at line 1); YAML would keep only the last: merge them")
    assert code == 2


# ---- ~ in config paths -------------------------------------------------------------------------------------------


def test_a_tilde_in_a_config_path_means_the_home_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_schema.validate_config({"data": {"path": "~/mnist", "cache_dir": "~/cache"},
                                         "logging": {"file": "~/logs/app.log"}, "output": {"plot_dir": "~/pictures"}})
    assert cfg["data"]["path"] == str(tmp_path / "mnist") and cfg["data"]["cache_dir"] == str(tmp_path / "cache")
    assert cfg["logging"]["file"] == str(tmp_path / "logs" / "app.log")
    assert cfg["output"]["plot_dir"] == str(tmp_path / "pictures")
    assert config_schema.validate_config({"data": {"path": "a/~b"}})["data"]["path"] == "a/~b"  # only at the start


# ---- .env --------------------------------------------------------------------------------------------------------


def test_a_dotenv_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HARDENING_TEST_A", raising=False)
    (tmp_path / ".env").write_bytes(b"HARDENING_TEST_A=1\nRANDOM_SEED=caf\xe9\n")
    with pytest.raises(CNNError) as error:
        plumbing.load_env_file()
    assert str(error.value) == f"{tmp_path / '.env'}: line 2 is not UTF-8 text (byte 0xe9); save the .env file as UTF-8"
    assert "HARDENING_TEST_A" not in os.environ  # nothing half-loaded


def test_a_dotenv_is_loaded_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found from a subfolder, a byte-order mark ignored, a variable already set never overridden."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    monkeypatch.delenv("HARDENING_TEST_A", raising=False)
    monkeypatch.setenv("HARDENING_TEST_B", "kept")
    (tmp_path / ".env").write_bytes(b"\xef\xbb\xbfHARDENING_TEST_A=caf\xc3\xa9\nHARDENING_TEST_B=replaced\n")
    plumbing.load_env_file()
    assert os.environ["HARDENING_TEST_A"] == "café" and os.environ["HARDENING_TEST_B"] == "kept"
    monkeypatch.delenv("HARDENING_TEST_A")


def test_a_dotenv_that_is_not_utf8_on_the_command_line(tmp_path: Path) -> None:
    """`python src/main.py` from a folder whose .env has a Latin-1 byte: exit 2, one line naming the file, not
    an unexpected UnicodeDecodeError."""
    (tmp_path / ".env").write_bytes(b"RANDOM_SEED=7\n# caf\xe9\n")
    write_config(tmp_path, data={"dataset": "digits", "n_train": 20, "n_test": 10}, training={"epochs": 0})
    env = {key: value for key, value in os.environ.items() if key != "RANDOM_SEED"}
    run = run_cli([], tmp_path, env=env)
    assert one_line(run.stderr) == (f"error: {tmp_path / '.env'}: line 2 is not UTF-8 text (byte 0xe9); save the "
                                    ".env file as UTF-8")
    assert run.returncode == 2


# ---- model files whose metadata lies -----------------------------------------------------------------------------

LAYERS = [{"conv2d": {"filters": 2, "kernel_size": 3, "padding": 1}}, {"batchnorm": {}}, "relu", "flatten",
          {"dense": {"units": 10}}]


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 8x8 model (conv, batchnorm, dense) after one Adam step, saved as --save-model saves it."""
    folder = tmp_path_factory.mktemp("models")
    model_cfg = config_schema.check_model({"layers": LAYERS})
    rng = np.random.default_rng(0)
    model = main.build_model(model_cfg, (8, 8, 1), 10, rng)
    x, y = rng.random((4, 8, 8, 1), dtype=np.float32), np.arange(4)
    loss = main.SoftmaxCrossEntropy()
    loss.forward(model.forward(x), y)
    model.backward(loss.backward())
    optimizer = main.Adam()
    optimizer.step(model)
    data = SimpleNamespace(name="digits", source="sklearn", x_train=x, x_test=x, y_test=y, note="",
                           class_names=main.DIGIT_NAMES)
    summary = {"epochs_completed": 1, "test_accuracy": 0.25, "test_loss": 2.25, "history": [], "status": "completed"}
    modelfile.save_model(folder / "good.npz", model, model_cfg, data, summary, optimizer)
    return folder / "good.npz"


def arrays_of(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def lying_copy(good: Path, path: Path, meta: dict | None = None, training: dict | None = None,
               **arrays: np.ndarray) -> Path:
    """The good model file with meta entries, training-summary entries or arrays replaced."""
    stored = arrays_of(good)
    described = json.loads(str(stored["meta"]))
    described.update(meta or {})
    described["training"].update(training or {})
    np.savez(path, **{**stored, **arrays, "meta": np.array(json.dumps(described))})
    return path


def test_the_good_model_file_loads(good_model: Path) -> None:
    loaded = modelfile.load_model(good_model, main.build_model)
    assert loaded.model.input_shape == (8, 8, 1) and set(loaded.optimizer_state) >= {"0.W.m", "0.W.v"}


def with_nan(array: np.ndarray, value: float = np.nan) -> np.ndarray:
    array = array.copy()
    array.flat[0] = value
    return array


@pytest.mark.parametrize(("change", "problem"), [
    ({"meta": {"input_shape": [8, 8, 2]}},
     "not a valid numpy-cnn model file (meta: input_shape [8, 8, 2] has 2 channels, but numpy-cnn models read grey "
     "images (1 channel) or colour images (3: red, green, blue))"),
    ({"meta": {"input_shape": [100000, 8, 1]}},
     "not a valid numpy-cnn model file (meta: input_shape [100000, 8, 1]: an image's sides must be 1 to 4096 pixels)"),
    ({"meta": {"input_shape": [8.5, 8, 1]}},
     "not a valid numpy-cnn model file (meta: input_shape [8.5, 8, 1] is not [height, width, channels] (3 integers))"),
    ({"meta": {"class_names": list(range(10))}},
     "not a valid numpy-cnn model file (meta: class_names [0, 1, 2, 3, 4, 5, ...] is not a list of 2 to 1,000 names "
     "(short strings on one line))"),
    ({"meta": {"class_names": [str(i) for i in range(5000)]}},
     "not a valid numpy-cnn model file (meta: class_names ['0', '1', '2', '3', '4', '5', ...] is not a list of 2 to "
     "1,000 names (short strings on one line))"),
    ({"meta": {"class_names": ["seven\nfake: 100%", *main.DIGIT_NAMES[1:]]}},
     "not a valid numpy-cnn model file (meta: class_names ['seven\\nfake: 100%', '1', '2', '3', '4', '5', ...] is "
     "not a list of 2 to 1,000 names (short strings on one line))"),
    ({"training": {"test_accuracy": float("nan")}},
     "not a valid numpy-cnn model file (meta: training.test_accuracy is nan, not a finite number from 0 to 1)"),
    ({"training": {"test_loss": float("inf")}},
     "not a valid numpy-cnn model file (meta: training.test_loss is inf, not a finite number >= 0)"),
    ({"layer0.W": "nan"}, "layer0.W holds NaN or infinite values"),
    ({"layer4.b": "inf"}, "layer4.b holds NaN or infinite values"),
    ({"layer1.running_var": "inf"}, "layer1.running_var holds NaN or infinite values"),
    ({"optimizer.0.W.m": "nan"}, "optimizer.0.W.m holds NaN or infinite values"),
    ({"optimizer.0.W.v": "huge"}, "optimizer.0.W.v has shape (1000000,), larger than any weight of the model"),
], ids=["2-channels", "absurd-side", "fractional-side", "class-names-numbers", "5000-classes", "class-name-newline",
        "nan-accuracy", "infinite-loss", "nan-weight", "inf-bias", "inf-batchnorm-buffer", "nan-adam-state",
        "oversized-adam-state"])
def test_a_model_file_that_lies_is_one_line(good_model: Path, tmp_path: Path, change: dict, problem: str) -> None:
    stored = arrays_of(good_model)
    arrays = {}
    for key, kind in change.items():
        if key.startswith(("layer", "optimizer")):
            arrays[key] = (np.zeros(1_000_000, np.float32) if kind == "huge"
                           else with_nan(stored[key], np.nan if kind == "nan" else -np.inf))
    path = lying_copy(good_model, tmp_path / "lying.npz", meta=change.get("meta"), training=change.get("training"),
                      **arrays)
    with pytest.raises(ModelFileError) as error:
        modelfile.load_model(path, main.build_model)
    assert str(error.value) == f"{path}: {problem}"


def test_predict_with_a_nan_model_is_one_line(good_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    """--predict with a model whose weights are NaN: one error line and exit 2, not a prediction "9 (nan%)"."""
    path = lying_copy(good_model, tmp_path / "nan.npz", **{"layer4.W": np.full((128, 10), np.nan, np.float32)})
    np.save(tmp_path / "digit.npy", np.eye(8))
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main.main(["--load-model", str(path), "--predict", "digit.npy"])
    captured = capsys.readouterr()
    assert one_line(captured.err) == f"error: {path}: layer4.W holds NaN or infinite values"
    assert code == 2 and captured.out == ""


def test_a_colour_model_without_conv_layers_predicts_a_grey_file_with_a_note(
        good_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """A dense-only model whose stored weights really fit an 8x8x3 input (once "unexpected ValueError: operands
    could not be broadcast"): a grey file is given to it as equal red, green and blue, with a note."""
    layers = ["flatten", {"dense": {"units": 10}}]
    arrays = {"layer1.W": np.zeros((192, 10), np.float32), "layer1.b": np.zeros(10, np.float32)}
    meta = json.loads(str(arrays_of(good_model)["meta"]))
    meta.update(model={"layers": layers}, input_shape=[8, 8, 3])
    meta.pop("optimizer")
    np.savez(tmp_path / "colour.npz", **arrays, meta=np.array(json.dumps(meta)))
    np.save(tmp_path / "digit.npy", np.eye(8))
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main.main(["--load-model", "colour.npz", "--predict", "digit.npy"])
    captured = capsys.readouterr()
    assert code == 0 and captured.out.startswith("digit.npy: ")
    assert "the colour model sees the same grey in red, green and blue" in captured.out + captured.err


def test_an_array_header_that_lies_is_refused_before_reading_its_data(good_model: Path, tmp_path: Path) -> None:
    """A weight whose .npy header declares 2**40 floats (in a file of a few hundred bytes) is refused from its
    header: nothing of that size is allocated."""
    path = lying_copy(good_model, tmp_path / "liar.npz")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40,)})
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("optimizer.0.W.extra.npy", header.getvalue() + bytes(16))
    with pytest.raises(ModelFileError) as error:
        modelfile.load_model(path, main.build_model)
    assert str(error.value) == (f"{path}: optimizer.0.W.extra has shape (1099511627776,), larger than any weight "
                                "of the model")


def test_a_tiny_model_file_asking_for_1e9_filters_is_one_line(good_model: Path, tmp_path: Path) -> None:
    """A 1 KB model file whose architecture asks for a billion filters: one line naming the file and the layer,
    no MemoryError (the process is capped at 2 GB: allocating would fail there, not take the machine)."""
    meta = json.loads(str(arrays_of(good_model)["meta"]))
    meta["model"] = {"layers": [{"conv2d": {"filters": 10**9, "kernel_size": 3, "padding": 1}}, "relu", "flatten",
                                {"dense": {"units": 10}}]}
    meta.pop("optimizer")
    np.savez_compressed(tmp_path / "huge.npz", meta=np.array(json.dumps(meta)))
    assert (tmp_path / "huge.npz").stat().st_size < 2000
    np.save(tmp_path / "digit.npy", np.eye(8))
    write_config(tmp_path)
    run = run_limited([str(MAIN), "--load-model", "huge.npz", "--predict", "digit.npy"], tmp_path)
    line = one_line(run.stderr)
    assert line.startswith("error: huge.npz: the stored architecture cannot be built (model.layers[0] (conv2d): "
                           "9,000,000,000 weights need about "), line
    assert "MemoryError" not in line
    assert run.returncode == 2


# ---- IDX files and gzip bombs ------------------------------------------------------------------------------------

ZEROS = 16 << 20  # one gzip member of 16 MiB of zeros compresses to 16 KB


def gzip_bomb(path: Path, header: bytes, members: int = 192) -> Path:
    """A .gz of `members` gzip members of 16 MiB each (3 GiB for 192) in about 3 MB, starting with `header`:
    members are concatenated, so one compressed block of zeros is written many times."""
    zeros = gzip.compress(bytes(ZEROS), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(header + bytes(ZEROS - len(header)), compresslevel=9))
        for _ in range(members - 1):
            f.write(zeros)
    return path


IMAGES_HEADER = struct.pack(">HBB3I", 0, 8, 3, 1, 28, 28)  # declares one 28x28 image


@pytest.mark.parametrize(("header", "problem"), [
    (IMAGES_HEADER, "header promises 784 bytes of data for shape (1, 28, 28), file holds more (corrupt, or not "
                    "what its header says)"),
    (b"\x00\x00\x0d\x03" + IMAGES_HEADER[4:], "not an IDX file of unsigned bytes (magic number 00000d03, expected "
                                              "00000801 for labels or 00000803 for images)"),
    (struct.pack(">HBB3I", 0, 8, 3, 4_000_000_000, 28, 28),
     "header declares shape (4000000000, 28, 28), 3,136,000,000,000 bytes of data, more than the 1,073,741,824 an "
     "IDX file may hold here (corrupt, or not an MNIST-like set)"),
], ids=["lying-header", "bad-magic", "huge-declared-size"])
def test_an_idx_gzip_bomb_is_refused_at_once(tmp_path: Path, header: bytes, problem: str) -> None:
    """A 3 MB .gz that inflates to 3 GiB, read in a process capped at 1 GiB: refused in well under a second
    (measured inside the process), never decompressing more than the header declares plus one byte."""
    bomb = gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz", header)
    assert bomb.stat().st_size < 4_000_000
    script = tmp_path / "read.py"
    script.write_text(textwrap.dedent(f"""\
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT / 'src')!r})
        import datafiles
        from errors import DataError
        start = time.perf_counter()
        try:
            datafiles.read_idx(Path(sys.argv[1]))
        except DataError as error:
            print(f"{{time.perf_counter() - start:.3f}} {{error}}")
        """))
    run = run_limited([str(script), str(bomb)], tmp_path, memory=1 << 30)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    seconds, message = run.stdout.strip().split(" ", 1)
    assert message == f"{bomb}: {problem}"
    assert float(seconds) < 0.5


def test_an_idx_file_with_more_or_fewer_bytes_than_declared_is_one_line(tmp_path: Path) -> None:
    data = idx_bytes(np.arange(60, dtype=np.uint8).reshape(3, 4, 5))
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(data + bytes(7))
    with pytest.raises(DataError) as error:
        datafiles.read_idx(path)
    assert str(error.value) == (f"{path}: header promises 60 bytes of data for shape (3, 4, 5), file holds more "
                                "(7 more) (corrupt, or not what its header says)")
    path.write_bytes(data[:-10])
    with pytest.raises(DataError) as error:
        datafiles.read_idx(path)
    assert str(error.value) == (f"{path}: header promises 60 bytes of data for shape (3, 4, 5), file holds 50 "
                                "(truncated or corrupt)")
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(data + b"x"))
    with pytest.raises(DataError) as error:
        datafiles.read_idx(gz)
    assert str(error.value) == (f"{gz}: header promises 60 bytes of data for shape (3, 4, 5), file holds more "
                                "(corrupt, or not what its header says)")
    gz.write_bytes(gzip.compress(data))
    assert np.array_equal(datafiles.read_idx(gz), np.arange(60, dtype=np.uint8).reshape(3, 4, 5))


# ---- --predict with bad files among good ones --------------------------------------------------------------------


def bad_and_good_files(folder: Path) -> list[Path]:
    """A good drawing, a complex .npy, a folder, a missing file, an image over Pillow's pixel limit (lowered in
    the tests to 10,000) and one over twice that limit, and another good .npy."""
    picture = Image.new("L", (60, 60), 255)
    ImageDraw.Draw(picture).line([(15, 10), (45, 10), (25, 50)], fill=0, width=6)
    picture.save(folder / "seven.png")
    np.save(folder / "complex.npy", np.ones((8, 8), complex))
    (folder / "a_folder").mkdir()
    Image.new("L", (150, 100), 255).save(folder / "wide.png")  # 15,000 pixels: Pillow warns
    Image.new("L", (300, 300), 255).save(folder / "huge.png")  # 90,000 pixels: Pillow refuses
    np.save(folder / "bar.npy", np.pad(np.ones((6, 2)), ((1, 1), (3, 3))))
    return [folder / name for name in ("seven.png", "complex.npy", "a_folder", "missing.png", "wide.png", "huge.png",
                                       "bar.npy")]


EXPECTED_ERRORS = {
    "complex.npy": "holds complex numbers; expected grey values (real numbers)",
    "a_folder": "is a folder, not an image file",
    "missing.png": "no such image file",
    "wide.png": "150x100 pixels is more than the 10,000 allowed (a small file can hold a huge image)",
    "huge.png": "90,000 pixels is more than the 10,000 allowed (a small file can hold a huge image)",
}


def test_predict_files_gives_a_result_per_file_and_no_warning(good_model: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    model = modelfile.load_model(good_model, main.build_model).model
    paths = bad_and_good_files(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = images.predict_files(model, paths, main.DIGIT_NAMES, {"method": "digit", "fill": 1.0})
    assert [warning.category.__name__ for warning in caught] == []
    assert [result["file"] for result in results] == [str(path) for path in paths]
    assert {Path(result["file"]).name: result["error"] for result in results if "error" in result} == EXPECTED_ERRORS
    good = [result for result in results if "error" not in result]
    assert [Path(result["file"]).name for result in good] == ["seven.png", "bar.npy"]
    assert all(len(result["top"]) == 3 for result in good)
    # as if the bad files were not there
    alone = images.predict_files(model, [paths[0]], main.DIGIT_NAMES, {"method": "digit", "fill": 1.0})
    assert [top["class"] for top in alone[0]["top"]] == [top["class"] for top in good[0]["top"]]
    assert [top["probability"] for top in alone[0]["top"]] == pytest.approx([top["probability"] for top in
                                                                             good[0]["top"]], rel=1e-5)


def test_a_folder_is_not_reported_as_a_missing_image(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        images.read_image(tmp_path)
    assert str(error.value) == f"{tmp_path}: is a folder, not an image file"


def test_predict_on_the_command_line_prints_the_good_and_one_line_per_bad(
        good_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Each good file's line on stdout, one `error: FILE: why` line per bad file on stderr, exit 2, and the
    --output JSON lists both."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    paths = bad_and_good_files(tmp_path)
    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = main.main(["--load-model", str(good_model), "--output", "r.json", "--predict",
                      *(path.name for path in paths)])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err and "unexpected" not in captured.err and "Warning" not in captured.err
    printed = [line.split(":")[0] for line in captured.out.splitlines()]
    assert "seven.png" in printed and "bar.npy" in printed and not set(printed) & set(EXPECTED_ERRORS)
    assert [line for line in captured.err.splitlines() if line.startswith("error:")] == [
        f"error: {name}: {why}" for name, why in EXPECTED_ERRORS.items()]
    written = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert [entry["file"] for entry in written["predictions"]] == [path.name for path in paths]
    assert {entry["file"]: entry["error"] for entry in written["predictions"] if "error" in entry} == EXPECTED_ERRORS
