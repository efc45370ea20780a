"""`python src/main.py --gradcheck`: passes on the default model and on other architectures, and fails
(exit 1, a FAIL row naming the layer) when a backward pass is broken."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run_cli, write_config

import main

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
