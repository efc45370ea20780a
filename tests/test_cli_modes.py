"""The command line's modes and their flags: --gradcheck and --predict refuse flags they would ignore,
--gradcheck writes JSON, an impossible architecture is reported before any data is loaded, errors go to
stderr and the log says where the seed came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_config

import main


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


def test_gradcheck_writes_its_rows_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, data={"dataset": "digits"})
    assert main.main(["--gradcheck", "--config", str(config), "--output", "g.json"]) == 0
    written = json.loads((tmp_path / "g.json").read_text())
    assert written["status"] == "passed" and len(written["rows"]) == 20
    assert all(row["ok"] and row["max_rel_error"] < 1e-6 for row in written["rows"])


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
