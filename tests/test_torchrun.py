"""tools/train_torch.py: a config trained with PyTorch, under torchrun on two CPU processes (gloo, slow test) or
on one, writes a .pt that `src/main.py --load-model` imports, and scores what the NumPy run of the same config on
the same data and epochs scores. Skipped where torch is not installed."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, run_cli, write_config

import main

torch = pytest.importorskip("torch", reason="torch is optional: pip install -r requirements-test.txt")

pytestmark = pytest.mark.torch
TRAINER = ROOT / "tools" / "train_torch.py"
EPOCH_LINE = re.compile(r"process (\d+): epoch (\d+)/\d+ .*train loss ([0-9.]+)")


def train_torch(args: list[str], cwd: Path, processes: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """tools/train_torch.py ARGS, under torchrun with that many processes (0: plain python, one process)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return subprocess.run([*(launcher if processes else [sys.executable]), str(TRAINER), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def losses(stdout: str) -> dict[int, list[float]]:
    """Each process's train loss per epoch, from its log lines."""
    found: dict[int, list[float]] = {}
    for rank, _, loss in EPOCH_LINE.findall(stdout):
        found.setdefault(int(rank), []).append(float(loss))
    return found


def test_one_process_trains_and_writes_a_pt_that_main_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """Without torchrun: one process trains the config on the 8x8 digits, the loss falls, the results file has
    the history, and --load-model m.pt --epochs 0 scores exactly what the trainer reported. Flags the trainer does
    not take, and a --save-model that is not .pt, are exit 2 in one line. (In this process: the trainer's run()
    and main.main, as their command lines call them.)"""
    spec = importlib.util.spec_from_file_location("train_torch", TRAINER)
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 600, "n_test": 300},
                          model={"layers": ["flatten", {"dense": {"units": 32}}, "relu", {"dense": {"units": 10}}]},
                          training={"epochs": 3, "batch_size": 32, "learning_rate": 0.01})
    assert trainer.run(["--config", str(config), "--save-model", "m.pt", "--output", "r.json"]) == 0
    trained = losses(capsys.readouterr().out)[0]
    assert len(trained) == 3 and trained[-1] < trained[0] / 2
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["processes"] == 1 and len(results["history"]) == 3 and results["files"]["model"] == "m.pt"
    assert main.main(["--config", str(config), "--load-model", "m.pt", "--epochs", "0", "--output", "i.json"]) == 0
    assert json.loads((tmp_path / "i.json").read_text())["test_accuracy"] == results["test_accuracy"] > 0.8
    capsys.readouterr()
    for args, message in [(["--export", "m.onnx"], "--export: not a flag of tools/train_torch.py"),
                          (["--save-model", "m.npz"], "writes a PyTorch .pt file")]:
        assert trainer.run(["--config", str(config), *args]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


@pytest.mark.slow
def test_torchrun_on_two_processes_scores_as_the_numpy_run(mnist_5k: Path, tmp_path: Path) -> None:
    """torchrun --nproc-per-node 2 (gloo on the CPU) trains LeNet-5 on 2,000 sample digits for 3 epochs: both
    processes' losses fall, and the imported .pt scores within 1.5 points of `python src/main.py` on the same
    data, epochs and initial weights."""
    data = ["--config", str(ROOT / "configs" / "lenet5.yaml"), "--data-path", str(mnist_5k), "--n-train", "2000",
            "--n-test", "1000", "--epochs", "3"]
    run = train_torch([*data, "--save-model", "m.pt", "--output", "torch.json"], tmp_path, processes=2)
    assert run.returncode == 0, run.stderr
    per_process = losses(run.stdout)
    assert sorted(per_process) == [0, 1]
    for rank, values in per_process.items():
        assert len(values) == 3 and values[-1] < 0.6 * values[0], (rank, values)
    assert json.loads((tmp_path / "torch.json").read_text())["backend"] == "gloo"
    numpy_run = run_cli([*data, "--output", "numpy.json"], cwd=tmp_path, timeout=600)
    assert numpy_run.returncode == 0, numpy_run.stderr
    imported = run_cli([*data[:-2], "--epochs", "0", "--load-model", "m.pt", "--output", "imported.json"],
                       cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    numpy_accuracy = json.loads((tmp_path / "numpy.json").read_text())["test_accuracy"]
    imported_accuracy = json.loads((tmp_path / "imported.json").read_text())["test_accuracy"]
    assert imported_accuracy > 0.85 and abs(imported_accuracy - numpy_accuracy) <= 0.015, \
        (imported_accuracy, numpy_accuracy)
