"""Configuration: config.yaml is the default, missing keys take defaults, precedence of flags over environment over
file, old keys, YAML and .env files read safely."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import (
    MAIN,
    ROOT,
    classifier_head,
    model_section,
    one_line,
    run_cli,
    run_limited,
    write_config,
)

import config_schema
import errors
import main
import plumbing
from errors import CNNError, ConfigError

# ---- YAML -----------------------------------------------------------------------------------------------------------


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


# ---- ~ in config paths ----------------------------------------------------------------------------------------------


def test_a_tilde_in_a_config_path_means_the_home_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_schema.validate_config({"data": {"path": "~/mnist", "cache_dir": "~/cache"},
                                         "logging": {"file": "~/logs/app.log"}, "output": {"plot_dir": "~/pictures"}})
    assert cfg["data"]["path"] == str(tmp_path / "mnist") and cfg["data"]["cache_dir"] == str(tmp_path / "cache")
    assert cfg["logging"]["file"] == str(tmp_path / "logs" / "app.log")
    assert cfg["output"]["plot_dir"] == str(tmp_path / "pictures")
    assert config_schema.validate_config({"data": {"path": "a/~b"}})["data"]["path"] == "a/~b"  # only at the start


# ---- .env -----------------------------------------------------------------------------------------------------------


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


# ---- configuration --------------------------------------------------------------------------------------------------


def test_repo_config_is_the_default_config() -> None:
    """config.yaml keeps the seed's values, and a missing key takes the same default."""
    assert main.load_config(ROOT / "config.yaml") == config_schema.validate_config({})


def test_missing_keys_take_defaults_and_numbers_in_strings_are_read(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1e-3\nmodel:\n  layers:\n    - conv2d: {filters: 8}\n    - relu\n"
                    "    - maxpool2d:\n    - flatten\n    - dense: {units: 10}\n")
    cfg = main.load_config(path)
    assert cfg["training"]["learning_rate"] == 0.001  # PyYAML reads 1e-3 as the string "1e-3"
    assert cfg["model"]["layers"] == [{"conv2d": {"filters": 8, "kernel_size": 3, "stride": 1, "padding": 0}}, "relu",
                                      {"maxpool2d": {"pool_size": 2, "stride": None}}, "flatten",
                                      {"dense": {"units": 10}}]
    assert cfg["data"] == config_schema.DEFAULT_CONFIG["data"]


@pytest.mark.parametrize(("text", "expected"), [
    ("training:\n  epochs: ten\n", "training.epochs: got 'ten', expected an integer >= 0"),
    ("trainig: {}\n", "did you mean 'training'"),
    ("model:\n  layers:\n    - conv2d: {filters: 8, kernel: 3}\n",
     "model.layers[0].conv2d.kernel: unknown argument (did you mean 'kernel_size'?)"),
    ("model:\n  layers:\n    - relu\n    - dens: {units: 10}\n", "model.layers[1]: unknown layer 'dens' (did you mean "
                                                                   "'dense'?)"),
    ("model:\n  layers:\n    - conv2d: {kernel_size: 3}\n", "model.layers[0].conv2d: filters is required"),
    ("data:\n  n_train: [1\n", "line 2"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(errors.ConfigError) as error:
        main.load_config(path)
    assert expected in str(error.value) and str(path) in str(error.value)


OLD_KEYS_ERROR = "model: conv_layers and dense_units were replaced by model.layers; the same network is layers: "


def layers_shown_for_old_keys(path: Path, old_model_yaml: str) -> str:
    """The layer list that the one-line error for a config with the old model keys shows, after checking that
    the error is one line naming the file."""
    path.write_text(old_model_yaml)
    with pytest.raises(errors.ConfigError) as error:
        main.load_config(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and OLD_KEYS_ERROR in message, message
    return message.split(OLD_KEYS_ERROR, 1)[1]


def test_old_model_keys_are_one_line_showing_the_same_network_as_a_layer_list(tmp_path: Path) -> None:
    """model.conv_layers + model.dense_units are refused with one line that spells out the same network as a
    layer list, and that list, pasted into the config as it is shown, is the network the old keys described."""
    path = tmp_path / "c.yaml"
    shown = layers_shown_for_old_keys(path, "model:\n  conv_layers:\n"
                                            "    - {filters: 8, kernel_size: 5, stride: 2, pool_size: 3, "
                                            "pool_stride: 1}\n    - {filters: 4, padding: 1, pool_size: 0}\n"
                                            "    - {pool_size: null}\n  dense_units: 24\n")
    assert shown == ("[{conv2d: {filters: 8, kernel_size: 5, stride: 2, padding: 0}}, relu, "
                     "{maxpool2d: {pool_size: 3, stride: 1}}, {conv2d: {filters: 4, kernel_size: 3, stride: 1, "
                     "padding: 1}}, relu, {conv2d: {filters: 32, kernel_size: 3, stride: 1, padding: 0}}, relu, "
                     "flatten, {dense: {units: 24}}, relu, {dense: {units: 10}}]")
    path.write_text(f"model:\n  layers: {shown}\n")
    expected = model_section({"conv2d": {"filters": 8, "kernel_size": 5, "stride": 2}}, "relu",
                             {"maxpool2d": {"pool_size": 3, "stride": 1}}, {"conv2d": {"filters": 4, "padding": 1}},
                             "relu", {"conv2d": {"filters": 32}}, "relu", *classifier_head(24))
    assert main.load_config(path)["model"] == expected


def test_old_conv_layers_alone_show_the_default_dense_units(tmp_path: Path) -> None:
    """`model: {conv_layers: [...]}` without dense_units kept the default 128 dense units: so does the list shown."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  layers: {layers_shown_for_old_keys(path, 'model: {conv_layers: [{filters: 8}]}')}")
    assert main.load_config(path)["model"] == model_section({"conv2d": {"filters": 8}}, "relu", "maxpool2d",
                                                            *classifier_head(128))


def test_old_dense_units_alone_show_the_default_conv_layers(tmp_path: Path) -> None:
    """`model: {dense_units: 64}` meant the default conv layers (32 and 64 filters, padding 1, pooling 2) and a
    dense layer of 64: the list shown is that network, not a dense-only one."""
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  layers: {layers_shown_for_old_keys(path, 'model: {dense_units: 64}')}")
    assert main.load_config(path)["model"] == model_section(
        {"conv2d": {"filters": 32, "padding": 1}}, "relu", "maxpool2d", {"conv2d": {"filters": 64, "padding": 1}},
        "relu", "maxpool2d", *classifier_head(64))


def test_precedence_flag_over_environment_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--seed beats RANDOM_SEED (also read from .env) beats data.random_seed in the file."""
    config = write_config(tmp_path, data={"random_seed": 1})
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANDOM_SEED", raising=False)
    parser = main.build_parser()
    assert main.resolve_config(parser.parse_args(["--config", str(config)]))[0]["data"]["random_seed"] == 1
    monkeypatch.setenv("RANDOM_SEED", "2")
    assert main.resolve_config(parser.parse_args(["--config", str(config)]))[0]["data"]["random_seed"] == 2
    args = parser.parse_args(["--config", str(config), "--seed", "3", "--epochs", "4", "--learning-rate", "5e-4"])
    cfg = main.resolve_config(args)[0]
    assert (cfg["data"]["random_seed"], cfg["training"]["epochs"], cfg["training"]["learning_rate"]) == (3, 4, 5e-4)


def test_cli_help_lists_every_flag(tmp_path: Path) -> None:
    proc = run_cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for flag in ("--config", "--output", "--epochs", "--batch-size", "--learning-rate", "--n-train", "--n-test",
                 "--seed", "--dataset", "--data-path", "--no-fallback", "--log-level", "--profile", "--gradcheck",
                 "--workers", "--plot-dir", "--save-model", "--load-model", "--predict"):
        assert flag in proc.stdout
