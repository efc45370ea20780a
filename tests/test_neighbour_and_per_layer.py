"""bench/neighbour.py runs a command beside a competing process and never leaves that process behind; bench/
per_layer.py prints a per-layer table whose rows are the model's layers, with timings on both sides and
allocations that account for at least each layer's output."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NEIGHBOUR, PER_LAYER = ROOT / "bench" / "neighbour.py", ROOT / "bench" / "per_layer.py"
# The command run beside the neighbour: the pids of its parent's children (itself and the neighbour), then exit 3.
CHILDREN = ("import os, sys; parent = os.getppid(); "
            "print(open(f'/proc/{parent}/task/{parent}/children').read()); sys.exit(3)")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
@pytest.mark.parametrize("condition", ["stream", "busy"])
def test_neighbour_runs_beside_the_command_and_stops_with_it(condition: str) -> None:
    done = subprocess.run([sys.executable, str(NEIGHBOUR), condition, "--", sys.executable, "-c", CHILDREN],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 3, done.stderr  # the command's exit code
    children = [int(pid) for pid in done.stdout.split()]
    assert len(children) == 2  # the neighbour and the command
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_neighbour_alone_stops_after_its_seconds_and_refuses_a_missing_condition() -> None:
    done = subprocess.run([sys.executable, str(NEIGHBOUR), "busy", "--seconds", "0.5"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run([sys.executable, str(NEIGHBOUR)], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "name a condition" in missing.stderr
    bad = subprocess.run([sys.executable, str(NEIGHBOUR), "busy", "--", "no-such-program-here"],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and bad.stderr.startswith("error: cannot run no-such-program-here")


def test_per_layer_table_has_every_layer_with_times_and_allocations(tmp_path: Path) -> None:
    report_file = tmp_path / "layers.json"
    command = [sys.executable, str(PER_LAYER), "--rounds", "1", "--batch", "8", "--json", str(report_file)]
    if importlib.util.find_spec("torch") is None:
        command.append("--no-torch")
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads(report_file.read_text())
    names = [row["layer"] for row in report["rows"]]
    assert names == ["conv2d_1", "relu_1", "maxpool2d_1", "conv2d_2", "relu_2", "maxpool2d_2", "flatten_1",
                     "dense_1", "relu_3", "dense_2", "loss", "optimizer step"]
    assert all(f"| {name} |" in done.stdout for name in names)
    rows = {row["layer"]: row for row in report["rows"]}
    for name in ("conv2d_1", "conv2d_2", "dense_1"):
        assert rows[name]["numpy_forward_ms"] > 0 and rows[name]["numpy_backward_ms"] > 0
        if report["torch"]:
            assert rows[name]["torch_forward_ms"] > 0 and rows[name]["torch_backward_ms"] > 0
    # A forward pass allocates at least its output: conv2d_1's is (8, 28, 28, 32) float32, relu_1's the same.
    output_bytes = 8 * 28 * 28 * 32 * 4
    assert rows["conv2d_1"]["numpy_forward_peak_bytes"] >= output_bytes
    assert rows["relu_1"]["numpy_forward_peak_bytes"] >= output_bytes
    assert rows["flatten_1"]["numpy_forward_peak_bytes"] < 1024  # a view


def test_per_layer_refuses_an_unwritable_json_path_at_once(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    done = subprocess.run([sys.executable, str(PER_LAYER), "--json", str(blocker / "x.json")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2 and "--json" in done.stderr and "Traceback" not in done.stderr
