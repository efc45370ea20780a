"""--gradcheck from the command line: it passes on the default config and other architectures (deep ReLU networks,
BatchNorm, Dropout, AvgPool2D, Tanh, folder shapes), fails on a broken backward pass, and writes its rows as
documented. main.gradient_check on small models, correct and broken, is tested in test_layers.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    BN_DROPOUT_NET,
    ROOT,
    run_cli,
    small_config_file,
    write_config,
)
from PIL import Image

import main

# ---- the gradient check's results file ------------------------------------------------------------------------------


def test_gradcheck_output_has_its_documented_keys(tmp_path: Path) -> None:
    proc = run_cli(["--config", str(small_config_file(tmp_path)), "--gradcheck", "--output", "g.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    document = json.loads((tmp_path / "g.json").read_text())
    assert set(document) == {"status", "rows", "config", "versions"}
    assert set(document["versions"]) >= {"python", "numpy"}


# ---- the gradient check of a deep ReLU network ----------------------------------------------------------------------


DEEP_RELU = {"layers": [item for _ in range(24) for item in ({"conv2d": {"filters": 4, "padding": 1}}, "relu")]
             + ["flatten", {"dense": {"units": 10}}]}


def test_a_correct_deep_relu_network_passes_with_its_kinks_judged_apart(tmp_path: Path) -> None:
    """With seed 3 some coordinates' +-eps moves a deep ReLU across 0: their central difference measured no
    slope (a whole-model error of 1e-3 before); they are now counted as kinks, and the others must agree."""
    config = small_config_file(tmp_path, model=DEEP_RELU, data={"random_seed": 3})
    proc = run_cli(["--config", str(config), "--gradcheck", "--output", "g.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    whole = json.loads((tmp_path / "g.json").read_text())["rows"][-1]
    assert whole["layer"] == "whole model" and whole["ok"] and whole["max_rel_error"] < 1e-6
    assert whole["kinks"] >= 1 and whole["coords"] + whole["kinks"] == 20


def test_a_broken_backward_in_a_deep_relu_network_still_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(main.ReLU, "backward", lambda self, grad_out: grad_out * self.positive * 0.999)
    config = small_config_file(tmp_path, model=DEEP_RELU, data={"random_seed": 3})
    assert main.main(["--config", str(config), "--gradcheck", "--output", "g.json"]) == main.EXIT_UNEXPECTED
    whole = json.loads((tmp_path / "g.json").read_text())["rows"][-1]
    assert whole["layer"] == "whole model" and not whole["ok"] and whole["coords"] >= 10
    assert "gradient check FAILED" in capsys.readouterr().err


def test_gradcheck_writes_its_rows_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, data={"dataset": "digits"})
    assert main.main(["--gradcheck", "--config", str(config), "--output", "g.json"]) == 0
    written = json.loads((tmp_path / "g.json").read_text())
    assert written["status"] == "passed" and len(written["rows"]) == 20
    assert all(row["ok"] and row["max_rel_error"] < 1e-6 for row in written["rows"])


def test_gradcheck_takes_the_shape_and_classes_of_a_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(tmp_path / "d" / name / f"{i}.png")
    model = {"layers": [{"conv2d": {"filters": 2, "kernel_size": 3, "padding": 1}}, "relu", "flatten",
                        {"dense": {"units": 3}}]}
    write_config(tmp_path, model=model)
    run = run_cli(["--gradcheck", "--data-path", str(tmp_path / "d")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "input (6, 5, 3)" in run.stdout and "gradient check passed" in run.stdout


OTHER_MODELS = {
    "stride-2-no-padding": {"layers": [
        {"conv2d": {"filters": 16, "kernel_size": 5, "stride": 2, "padding": 0}}, "relu",
        {"maxpool2d": {"pool_size": 3, "stride": 2}},
        {"conv2d": {"filters": 8, "kernel_size": 2, "stride": 1, "padding": 0}}, "relu",
        {"maxpool2d": {"pool_size": 2, "stride": 1}},
        "flatten", {"dense": {"units": 32}}, "relu", {"dense": {"units": 10}}]},
    "overlapping-pools-on-digits": {"layers": [
        {"conv2d": {"filters": 8, "kernel_size": 3}}, "relu", {"maxpool2d": {"pool_size": 3, "stride": 1}},
        {"conv2d": {"filters": 12, "kernel_size": 2, "stride": 2, "padding": 1}}, "relu",  # no pooling
        "flatten", {"dense": {"units": 16}}, "relu", {"dense": {"units": 10}}]},
}


def test_gradcheck_passes_on_the_default_config(tmp_path: Path) -> None:
    """The repo's config.yaml, as a user runs it: a table row per tensor, all ok, exit 0."""
    proc = run_cli(["--gradcheck", "--config", str(ROOT / "config.yaml")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.endswith((" ok", " FAIL"))]
    assert len(rows) == 20 and all(line.endswith(" ok") for line in rows)
    assert "gradient check passed: 20/20 tensors ok" in proc.stdout


@pytest.mark.parametrize("name", sorted(OTHER_MODELS))
def test_gradcheck_passes_on_other_architectures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture, name: str) -> None:
    data = {"dataset": "digits"} if "digits" in name else {}
    config = write_config(tmp_path, model=OTHER_MODELS[name], data=data)
    monkeypatch.chdir(tmp_path)
    assert main.main(["--gradcheck", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "gradient check passed" in out and " FAIL" not in out


def test_gradcheck_fails_when_col2im_assigns_instead_of_adding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """The classic col2im bug: overlapping windows overwrite each other's gradient instead of adding up."""
    def col2im_that_assigns(grad_cols: np.ndarray, padded_shape: tuple, stride: int,
                            out: np.ndarray | None = None) -> np.ndarray:
        _, out_h, out_w, k, _, _ = grad_cols.shape
        grad_x = np.zeros(padded_shape, dtype=grad_cols.dtype)
        for di in range(k):
            for dj in range(k):
                grad_x[:, di:di + stride * (out_h - 1) + 1:stride, dj:dj + stride * (out_w - 1) + 1:stride, :] = \
                    grad_cols[:, :, :, di, dj, :]
        return grad_x

    monkeypatch.setattr(main, "col2im", col2im_that_assigns)
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path)
    assert main.main(["--gradcheck", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    failing = [line.split()[:2] for line in captured.out.splitlines() if line.endswith(" FAIL")]
    assert ["conv2d_2", "input"] in failing
    assert "gradient check FAILED" in captured.err and "conv2d_2.input" in captured.err


def test_gradcheck_covers_batchnorm_dropout_avgpool_and_tanh(tmp_path: Path) -> None:
    config = write_config(tmp_path, data={"dataset": "digits"}, model=BN_DROPOUT_NET)
    proc = run_cli(["--gradcheck", "--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.endswith((" ok", " FAIL"))]
    checked = {row[0] for row in rows}
    assert {"batchnorm_1", "batchnorm_2", "dropout_1", "avgpool2d_1", "tanh_1"} <= checked
    assert {(row[0], row[1]) for row in rows} >= {("batchnorm_1", "gamma"), ("batchnorm_2", "beta")}
    assert all(row[-1] == "ok" and math.isfinite(float(row[-2])) for row in rows)
