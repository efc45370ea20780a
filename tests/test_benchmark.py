"""bench/benchmark.py: its FLOP count agrees with a count made by hand, and a tiny run completes end to end,
printing the targets table and writing a JSON report whose ratios are consistent with its own timings."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import config_schema
import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "benchmark.py"


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gemm_count_of_the_seed_model_matches_a_hand_count() -> None:
    """Per training image: conv1 forward + dW (no dX: nothing needs it), conv2, dense1 and dense2 forward,
    dW and dX, each 2 * (output values) * (inputs per output) FLOPs."""
    benchmark = load_benchmark()
    model = main.build_model(config_schema.DEFAULT_CONFIG["model"], (28, 28, 1), 10, np.random.default_rng(0))
    gemms = benchmark.model_gemms(model, 32)
    conv1 = 2 * 28 * 28 * 32 * (3 * 3 * 1)
    conv2 = 2 * 14 * 14 * 64 * (3 * 3 * 32)
    dense1, dense2 = 2 * 3136 * 128, 2 * 128 * 10
    expected = 2 * conv1 + 3 * (conv2 + dense1 + dense2)
    assert sum(g["mflop_per_image"] for g in gemms) * 1e6 == pytest.approx(expected)
    assert [(g["layer"], g["op"]) for g in gemms][:3] == [("conv2d_1", "forward"), ("conv2d_1", "dW"),
                                                          ("conv2d_2", "forward")]
    assert len(gemms) == 2 + 3 * 3


def test_tiny_run_without_torch_prints_targets_and_writes_consistent_json(tmp_path: Path) -> None:
    report_file = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--images", "64", "--repeats", "2", "--no-torch",
                           "--threads", "1", "--json", str(report_file)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "PyTorch: hidden by --no-torch" in out and "Targets (from the issue)" in out
    assert "project epoch / GEMM lower bound <= 2.5" in out and "conv2d_2" in out
    report = json.loads(report_file.read_text())
    epochs = report["project"]["epoch_seconds"]["all"]
    bounds, ratios = report["lower_bound_paired_seconds"]["all"], report["lower_bound_paired_ratio"]["all"]
    # Each repeat's ratio is its own epoch over the GEMMs timed in the same worker, and an epoch takes longer
    # than its matrix multiplies alone.
    assert len(epochs) == len(bounds) == 2 and ratios == pytest.approx([e / b for e, b in zip(epochs, bounds)])
    assert all(ratio > 1 for ratio in ratios)
    target = next(row for row in report["targets"] if row["target"].startswith("project epoch / GEMM lower bound"))
    assert target["value"] == f"{report['lower_bound_paired_ratio']['median']:.3f}"
    assert report["lower_bound_ratio_at_start"] == pytest.approx(
        report["project"]["epoch_seconds"]["median"] / report["lower_bound_seconds_at_start"])
    assert report["project"]["training_rss_mib"] > report["project"]["training_rss_after_data_mib"] > 0
    assert "torch" not in report and {row["result"] for row in report["targets"]} <= {"PASS", "MISS", "n/a"}
    # The project trains as `python src/main.py` would (1 thread allowed: 1 worker), and its CPU time covers only
    # the training batches: with one thread, it cannot exceed the wall time by much (the token test set's
    # evaluation, when it was counted, made it 1.8x and more at 64 images).
    assert report["project"]["workers"] == 1 and "on 1 worker thread," in out
    assert report["project"]["cpu_seconds_per_epoch"] < 1.3 * report["project"]["epoch_seconds"]["median"]
    assert "| not run |" in report["markdown"] and "--images 64 --repeats 2 --no-torch" in report["markdown"]


def test_unwritable_json_path_fails_at_once_with_one_line(tmp_path: Path) -> None:
    """--json into a missing parent that cannot be created (under a file) is refused before any measuring."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-torch", "--json", str(blocker / "out.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--json" in done.stderr and "is a file, not a folder" in done.stderr
    assert "preparing the images" not in done.stdout
