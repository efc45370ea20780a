"""Checkpoints and --resume: a run killed with SIGKILL (mid-epoch, at an epoch's end, while a checkpoint is being
written) or stopped with Ctrl-C, then resumed, must end bit for bit where the uninterrupted run ends: every
weight, BatchNorm buffer, optimiser array and history value (timings aside). Also: a damaged latest checkpoint
falls back to the one before it, and resuming with another config, a model file or a completed run is refused.

The kills are real: the program runs in a subprocess through a small launcher that wraps checkpoints.py's hook
(or its file writer) to send the process SIGKILL at a chosen batch, so the position of the kill is exact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
from helpers import MAIN, run_cli, write_config, write_idx_split

import checkpoints
import config_schema
import main

SRC = MAIN.parent
N_BATCHES = 19  # 600 training images in batches of 32
TIMING_KEYS = {"seconds", "images_per_second"}

# A launcher: main.main() with a trap set in checkpoints.py by environment variables.
#   KILL_AT_BATCH=N   SIGKILL (or KILL_SIGNAL) right after train()'s hook has run for batch N (and written its
#                     checkpoint, when one was due);
#   KILL_IN_WRITE=N   SIGKILL in the N-th checkpoint write, half-way through the temporary file.
LAUNCHER = textwrap.dedent(f"""
    import os, signal, sys
    sys.path.insert(0, {str(SRC)!r})
    import checkpoints, main

    kill_signal = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))
    if "KILL_AT_BATCH" in os.environ:
        at_batch, on_step = int(os.environ["KILL_AT_BATCH"]), checkpoints.Checkpoints.on_step

        def trapped_on_step(self, position, result):
            on_step(self, position, result)
            if result.batches == at_batch:
                os.kill(os.getpid(), kill_signal)
        checkpoints.Checkpoints.on_step = trapped_on_step
    if "KILL_IN_WRITE" in os.environ:
        in_write, save, writes = int(os.environ["KILL_IN_WRITE"]), checkpoints._save, []

        def trapped_save(f, arrays):
            writes.append(1)
            if len(writes) == in_write:
                f.write(b"PK" + bytes(1000))
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            save(f, arrays)
        checkpoints._save = trapped_save
    sys.exit(main.main(sys.argv[1:]))
""")


def launch(args: list[str], cwd: Path, **trap: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **trap}
    return subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def digits_config(folder: Path, workers: int | None = None, **training: object) -> Path:
    """A small BatchNorm + Dropout network on the digits, with augmentation and a one-cycle schedule:
    every random generator and every kind of state is in play."""
    return write_config(
        folder,
        data={"dataset": "digits", "n_train": 600, "n_test": 200, "augment": {"shift": 1, "rotate": 10}},
        model={"layers": [{"conv2d": {"filters": 4, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu",
                          {"maxpool2d": {"pool_size": 2}}, "flatten", {"dropout": {"rate": 0.25}},
                          {"dense": {"units": 16}}, "relu", {"dense": {"units": 10}}]},
        training={"epochs": 3, "batch_size": 32, "learning_rate": 0.01, "lr_schedule": "one_cycle",
                  "workers": workers, **training},
        output={"checkpoint_every": 5})


def run_ok(args: list[str], cwd: Path, **trap: str) -> subprocess.CompletedProcess:
    done = launch(args, cwd, **trap)
    assert done.returncode == 0, done.stderr
    return done


def assert_same_run(first: Path, second: Path) -> None:
    """Two runs' model files and results files hold the same arrays and history, bit for bit (timings aside)."""
    with np.load(first / "model.npz") as a, np.load(second / "model.npz") as b:
        assert set(a.files) == set(b.files)
        for key in a.files:
            if key != "meta":
                assert np.array_equal(a[key], b[key]), key
        meta_a, meta_b = json.loads(str(a["meta"])), json.loads(str(b["meta"]))
    results = [json.loads((folder / "results.json").read_text()) for folder in (first, second)]
    for history in ([meta_a["training"]["history"], meta_b["training"]["history"]],
                    [results[0]["history"], results[1]["history"]]):
        assert len(history[0]) == len(history[1]) == 3
        for row_a, row_b in zip(*history):
            assert {k: v for k, v in row_a.items() if k not in TIMING_KEYS} == \
                   {k: v for k, v in row_b.items() if k not in TIMING_KEYS}
    assert meta_a["optimizer"] == meta_b["optimizer"]
    assert results[0]["test_loss"] == results[1]["test_loss"]


OUTPUTS = ["--output", "results.json", "--save-model", "model.npz"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    digits_config(folder)
    run_ok(["--config", "config.yaml", *OUTPUTS], folder)
    return folder


@pytest.mark.parametrize("trap", [
    {"KILL_AT_BATCH": "27"},  # mid-epoch 2, two batches after its last checkpoint (batch 25)
    {"KILL_AT_BATCH": str(N_BATCHES)},  # the end of epoch 1, right after its checkpoint
    {"KILL_IN_WRITE": "6"},  # half-way through writing the checkpoint of batch 25
], ids=["mid-epoch", "epoch-end", "during-write"])
def test_a_run_killed_and_resumed_ends_as_the_uninterrupted_run(uninterrupted: Path, tmp_path: Path,
                                                                 trap: dict) -> None:
    digits_config(tmp_path)
    killed = launch(["--config", "config.yaml", *OUTPUTS], tmp_path, **trap)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "model.npz").exists()
    run = next((tmp_path / "checkpoints").iterdir())
    if "KILL_IN_WRITE" in trap:
        assert list(run.glob(".checkpoint-*.tmp")), "the kill should have left the temporary file"
    resumed = run_ok(["--config", "config.yaml", *OUTPUTS, "--resume"], tmp_path)
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert_same_run(uninterrupted, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    expected_batch = {"KILL_AT_BATCH": 25 - N_BATCHES, "KILL_IN_WRITE": 20 - N_BATCHES}
    stopped = results["resumed_from"]
    assert (tmp_path / stopped["checkpoint"]).parent == run
    if trap.get("KILL_AT_BATCH") == str(N_BATCHES):
        assert (stopped["epoch"], stopped["batch"]) == (1, N_BATCHES)
    else:
        assert (stopped["epoch"], stopped["batch"]) == (2, expected_batch[next(iter(trap))])
    assert (run / "completed.json").is_file()
    assert not list(run.glob(".checkpoint-*.tmp"))


def test_a_resumed_run_killed_again_resumes_exactly(uninterrupted: Path, tmp_path: Path) -> None:
    digits_config(tmp_path)
    assert launch(["--config", "config.yaml", *OUTPUTS], tmp_path, KILL_AT_BATCH="8").returncode == -signal.SIGKILL
    again = launch(["--config", "config.yaml", *OUTPUTS, "--resume"], tmp_path, KILL_AT_BATCH="44")
    assert again.returncode == -signal.SIGKILL, again.stderr
    run_ok(["--config", "config.yaml", *OUTPUTS, "--resume"], tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["resumed_from"]["epoch"] == 3  # batch 40: 2 of epoch 3
    assert_same_run(uninterrupted, tmp_path)


def test_three_worker_batchnorm_runs_are_deterministic_and_resume_exactly(tmp_path: Path) -> None:
    """With three worker threads BatchNorm adds the slices' sums in rank order: two runs agree, and a run
    killed mid-epoch and resumed agrees with them."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        digits_config(folder, workers=3)
    run_ok(["--config", "config.yaml", *OUTPUTS], first)
    killed = launch(["--config", "config.yaml", *OUTPUTS], second, KILL_AT_BATCH="32")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_ok(["--config", "config.yaml", *OUTPUTS, "--resume"], second)
    assert_same_run(first, second)
    assert json.loads((second / "results.json").read_text())["workers"] == 3


def test_ctrl_c_keeps_todays_outputs_leaves_a_checkpoint_and_resumes_exactly(uninterrupted: Path,
                                                                            tmp_path: Path) -> None:
    digits_config(tmp_path)
    stopped = launch(["--config", "config.yaml", *OUTPUTS], tmp_path, KILL_AT_BATCH="23", KILL_SIGNAL="SIGINT")
    assert stopped.returncode == 130, stopped.stderr
    last_line = stopped.stderr.strip().splitlines()[-1]
    assert f"interrupted in epoch 2 after 4 of {N_BATCHES} batches" in last_line, stopped.stderr
    assert "saved to model.npz" in last_line and "checkpoint-00000023.npz" in last_line
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "interrupted"
    run_ok(["--config", "config.yaml", *OUTPUTS, "--resume"], tmp_path)
    assert_same_run(uninterrupted, tmp_path)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


def garble_random_state(path: Path) -> None:
    """A readable model file whose checkpoint entry holds a shuffle generator's state that is no such state."""
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    meta = json.loads(str(arrays["meta"]))
    meta["checkpoint"]["rngs"]["shuffle"]["state"] = "scrambled"
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage, said", [(truncate, "not a numpy-cnn model file"),
                                          (garble_random_state, "TypeError")])
def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(uninterrupted: Path, tmp_path: Path,
                                                                  damage: Callable[[Path], None], said: str) -> None:
    digits_config(tmp_path)
    launch(["--config", "config.yaml", *OUTPUTS], tmp_path, KILL_AT_BATCH="31")
    run = next((tmp_path / "checkpoints").iterdir())
    latest, previous = sorted(run.glob("checkpoint-*.npz"), reverse=True)
    damage(latest)
    resumed = run_ok(["--config", "config.yaml", *OUTPUTS, "--resume"], tmp_path)
    output = resumed.stdout + resumed.stderr
    assert f"checkpoint {latest.relative_to(tmp_path)} cannot be read ({said}" in output
    assert f"resuming from {previous.relative_to(tmp_path)}" in output
    assert latest.with_suffix(".damaged").is_file()
    assert_same_run(uninterrupted, tmp_path)


def test_a_checkpoint_is_a_model_file(tmp_path: Path) -> None:
    digits_config(tmp_path)
    run_ok(["--config", "config.yaml"], tmp_path)
    checkpoint = sorted((tmp_path / "checkpoints").glob("run-*/checkpoint-*.npz"))[-1]
    image = tmp_path / "digit.npy"
    np.save(image, np.zeros((8, 8), np.float32))
    predicted = run_cli(["--load-model", str(checkpoint), "--predict", str(image)], tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    assert "digit.npy" in predicted.stdout
    evaluated = run_cli(["--config", "config.yaml", "--load-model", str(checkpoint), "--epochs", "0"], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "test accuracy" in evaluated.stdout + evaluated.stderr


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose run (one worker) was killed at batch 12, after its checkpoint of batch 10."""
    folder = tmp_path_factory.mktemp("killed")
    digits_config(folder, workers=1)
    launch(["--config", "config.yaml"], folder, KILL_AT_BATCH="12")
    return folder


@pytest.mark.parametrize("change, difference", [
    (["--learning-rate", "0.02"], "config.training.learning_rate is 0.02 in this run but 0.01 in the checkpoint"),
    (["--workers", "2"], "config.training.workers is 2 in this run but 1 in the checkpoint"),
    (["--seed", "7"], "config.data.random_seed is 7 in this run but 42 in the checkpoint"),
])
def test_resuming_with_another_config_is_refused(killed_run: Path, change: list[str], difference: str) -> None:
    refused = run_cli(["--config", "config.yaml", "--resume", *change], killed_run)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --resume: ") and difference in refused.stderr
    assert refused.stderr.count("\n") == 1


def test_resuming_on_other_images_under_the_same_config_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (120, 28, 28), np.uint8), rng.integers(0, 10, 120).astype(np.uint8)
    write_idx_split(tmp_path / "idx", "train", images, labels)
    write_config(tmp_path, data={"dataset": "mnist", "path": "idx", "n_train": 90, "n_test": 30},
                 model={"layers": ["flatten", {"dense": {"units": 10}}]}, training={"epochs": 2, "batch_size": 30},
                 output={"checkpoint_every": 1})
    killed = launch(["--config", "config.yaml"], tmp_path, KILL_AT_BATCH="2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    images[:, 0, 0] ^= 1  # one pixel of every image
    write_idx_split(tmp_path / "idx", "train", images, labels)
    refused = run_cli(["--config", "config.yaml", "--resume"], tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: --resume: data set.crc32_of_training_images is "), refused.stderr
    assert "in this run but" in refused.stderr and refused.stderr.count("\n") == 1


def test_resume_refusals(tmp_path: Path) -> None:
    digits_config(tmp_path)
    lines = {}
    lines["model"] = run_cli(["--config", "config.yaml", "--resume", "--load-model", "m.npz"], tmp_path)
    lines["nothing"] = run_cli(["--config", "config.yaml", "--resume"], tmp_path)
    (tmp_path / "empty").mkdir()
    lines["no checkpoint"] = run_cli(["--config", "config.yaml", "--resume", "empty"], tmp_path)
    run_ok(["--config", "config.yaml"], tmp_path)
    lines["completed"] = run_cli(["--config", "config.yaml", "--resume"], tmp_path)
    for name, done in lines.items():
        assert done.returncode == 2, (name, done.stderr)
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, (name, done.stderr)
    assert "--resume continues a run" in lines["model"].stderr
    assert "no checkpoint folder" in lines["nothing"].stderr
    assert "no checkpoint in empty" in lines["no checkpoint"].stderr
    assert "already completed" in lines["completed"].stderr


def test_checkpoints_can_be_turned_off_and_each_run_has_its_own_folder(tmp_path: Path) -> None:
    digits_config(tmp_path)
    run_ok(["--config", "config.yaml", "--checkpoint-dir", "none"], tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    run_ok(["--config", "config.yaml", "--checkpoint-dir", "saved"], tmp_path)
    run_ok(["--config", "config.yaml", "--checkpoint-dir", "saved"], tmp_path)
    runs = sorted((tmp_path / "saved").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert (run / "completed.json").is_file()
        assert len(list(run.glob("checkpoint-*.npz"))) == 2


def bare_checkpoints(folder: Path, every: int | None) -> checkpoints.Checkpoints:
    """Checkpoints of a tiny digits model, built in this process."""
    rngs = main.make_rngs(0)
    model_cfg = config_schema.check_model({"layers": ["flatten", {"dense": {"units": 10}}]})
    model = main.build_model(model_cfg, (8, 8, 1), 10, rngs["init"])
    data = SimpleNamespace(x_train=np.zeros((4, 8, 8, 1), np.float32), y_train=np.arange(4),
                           x_test=np.zeros((2, 8, 8, 1), np.float32), y_test=np.arange(2),
                           class_names=[str(d) for d in range(10)], name="digits", source="sklearn", note="")
    cfg = config_schema.validate_config({"data": {"dataset": "digits"}})
    return checkpoints.Checkpoints(folder, every, model=model, model_cfg=model_cfg, optimizer=main.Adam(), rngs=rngs,
                                   data=data, cfg=cfg, workers=1, build_model=main.build_model,
                                   parameters=main.parameters)


def test_time_based_checkpoints_come_once_a_minute_and_cost_at_most_two_percent(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(checkpoints.time, "monotonic", lambda: clock[0])
    saved = bare_checkpoints(tmp_path, None)
    written, cost = [], [0.0]

    def write(position: SimpleNamespace, result: SimpleNamespace) -> None:
        written.append(clock[0])
        saved.last_written, saved.last_cost = clock[0], cost[0]

    monkeypatch.setattr(saved, "write", write)
    result = SimpleNamespace(batches=0)
    # (time, epoch ended?, what the next write costs)
    for clock[0], epoch_ended, cost[0] in ((10, False, 0.06), (59, False, 0.06), (61, False, 0.06), (62, True, 0.06),
                                           (64, True, 0.06), (130, False, 2.0), (163, True, 2.0), (200, False, 2.0),
                                           (229, True, 2.0), (231, False, 2.0)):
        saved.on_step(SimpleNamespace(epoch_ended=epoch_ended, batch=1, n_batches=9), result)
    # Mid-epoch once a minute. At 0.06 s a write, not within 3 s (0.06 / 2%) of the last, even at an epoch's end
    # (62); at 2 s a write, not within 100 s of the last (163, 200, 229).
    assert written == [61, 64, 130, 231]


def test_a_checkpoint_that_cannot_be_written_is_logged_and_training_goes_on(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    saved = bare_checkpoints(tmp_path, 1)
    position = SimpleNamespace(epoch=1, batch=1, n_batches=2, order=np.arange(4), total_loss=1.0, correct=1,
                               loss=1.0, epoch_ended=False)
    result = SimpleNamespace(batches=1, history=[])
    first = saved.write(position, result)
    assert first is not None and first.is_file()

    def full_disk(path: Path, write: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_atomic", full_disk)
    result.batches = 2
    assert saved.write(position, result) is None
    assert saved.latest == first
    assert "could not write the checkpoint" in caplog.text and "No space left on device" in caplog.text


@pytest.mark.parametrize("output, expected", [
    ({}, {"checkpoint_dir": "checkpoints", "checkpoint_every": None}),
    ({"checkpoint_dir": "none", "checkpoint_every": 50}, {"checkpoint_dir": None, "checkpoint_every": 50}),
    ({"checkpoint_dir": None}, {"checkpoint_dir": None, "checkpoint_every": None}),
    ({"checkpoint_dir": "~/runs"}, {"checkpoint_dir": os.path.expanduser("~/runs"), "checkpoint_every": None}),
])
def test_checkpoint_keys_of_the_config(output: dict, expected: dict) -> None:
    checked = config_schema.validate_config({"output": output})["output"]
    assert {key: checked[key] for key in expected} == expected


@pytest.mark.parametrize("output, message", [
    ({"checkpoint_every": 0}, "output.checkpoint_every: got 0, expected an integer >= 1 or null"),
    ({"checkpoint_every": "often"}, "output.checkpoint_every: got 'often'"),
    ({"checkpoint_dir": ""}, "output.checkpoint_dir: got '', expected a folder (a non-empty string), or none or null"),
    ({"checkpoint_dir": 3}, "output.checkpoint_dir: got 3"),
])
def test_bad_checkpoint_keys_are_one_line(output: dict, message: str) -> None:
    with pytest.raises(config_schema.ConfigError, match="^" + re.escape(message)):
        config_schema.validate_config({"output": output})


def test_a_checkpoint_folder_that_cannot_be_written_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")
    refused = run_cli(["--dataset", "digits", "--n-train", "100", "--n-test", "50", "--checkpoint-dir", "a_file"],
                      tmp_path)
    assert refused.returncode == 2
    assert refused.stderr == "error: --checkpoint-dir a_file: is a file, expected a folder\n"
