"""Whole runs as a user makes them, minutes long: `pytest tests/ -m slow` (left out of the default run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, write_config


@pytest.mark.slow
def test_default_model_10_epochs_on_real_mnist_sample(tmp_path: Path, mnist_5k: Path) -> None:
    """The default model and training settings, 10 epochs on 4,000 real MNIST digits: >= 96% on the 1,000
    held out, a saved model that predicts the same accuracy when loaded, and the five pictures."""
    config = write_config(tmp_path, data={"path": str(mnist_5k), "n_train": 4000, "n_test": 1000})
    run = run_cli(["--config", str(config), "--output", "r.json", "--save-model", "m.npz", "--plot-dir", "plots"],
                  cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["status"] == "completed" and len(results["history"]) == 10
    assert results["test_accuracy"] >= 0.96
    assert len(results["files"]["plots"]) == 5
    again = run_cli(["--config", str(config), "--load-model", "m.npz", "--epochs", "0", "--output", "r0.json"],
                    cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "r0.json").read_text())["test_accuracy"] == results["test_accuracy"]
