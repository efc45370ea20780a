"""Checkpoints: while a run trains, everything it needs to go on exactly where it was, so that a crash, a kill
or a closed laptop costs at most the batches since the last one (--checkpoint-dir, --resume).

A checkpoint is a model file (modelfile's format, so --load-model and --predict read it) with two additions:
a 'checkpoint' entry in its meta (the position in the run, every random generator's state, the running sums of
the epoch under way, the history so far, the config) and the array 'checkpoint.order' (that epoch's shuffle
order). Each run writes into its own folder under the checkpoint folder:

    checkpoints/run-20260101-120000-4242/checkpoint-00000250.npz   (the number: batches trained so far)
                                         checkpoint-00000375.npz   (the last two are kept)
                                         completed.json            (once the run has ended)

Each file is written to a temporary file, flushed to the disk and renamed into place, so a crash while writing
leaves the previous checkpoint as it was; a damaged latest checkpoint is set aside with a warning and the one
before it used. Called by main.run_training through train()'s on_step and resume; a leaf module: it never
imports main (the Position and TrainResult classes and build_model come in as arguments).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from errors import CNNError, ModelFileError
from modelfile import data_summary, load_model, model_file_arrays, restore_optimizer
from plumbing import write_atomic, write_json

log = logging.getLogger("numpy_cnn")

EVERY_SECONDS = 60  # with output.checkpoint_every null: a checkpoint about once a minute of training...
MAX_SHARE = 0.02  # ...but never more often than writing one costs 2% of the time between two
KEEP = 2  # checkpoints kept per run: a crash while writing one leaves the one before
COMPLETED = "completed.json"
COMPARED_SECTIONS = ("data", "model", "training")  # a resumed run must have these as the checkpoint has them


def checkpoint_name(batches: int) -> str:
    """The file of the checkpoint after `batches` training batches: names sort in the order they were written."""
    return f"checkpoint-{batches:08d}.npz"


def data_fingerprint(data: Any) -> dict:
    """What a checkpoint records of the data (main.Dataset) to tell whether a resumed run sees the same images:
    the data summary and a CRC-32 of the training images and labels."""
    crc = zlib.crc32(np.ascontiguousarray(data.y_train), zlib.crc32(np.ascontiguousarray(data.x_train)))
    summary = {key: value for key, value in data_summary(data).items() if key != "note"}
    return {**summary, "crc32_of_training_images": crc}


def compared_config(cfg: dict, workers: int) -> dict:
    """The sections of the config a resumed run must share with its checkpoint, with training.workers resolved
    to the number of worker threads (it decides how BatchNorm's sums are split), as JSON would give them back."""
    sections = {section: cfg[section] for section in COMPARED_SECTIONS}
    sections["training"] = dict(sections["training"], workers=workers)
    return json.loads(json.dumps(sections))


def first_difference(saved: Any, now: Any, path: str) -> str | None:
    """The first key path under which two JSON values differ, with both values, or None when they are equal."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for key in list(saved) + [key for key in now if key not in saved]:
            if key not in saved or key not in now:
                have, lack = ("the checkpoint", "this run") if key in saved else ("this run", "the checkpoint")
                return f"{path}.{key} is set in {have} but not in {lack}"
            difference = first_difference(saved[key], now[key], f"{path}.{key}")
            if difference:
                return difference
        return None
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        for index, (a, b) in enumerate(zip(saved, now)):
            difference = first_difference(a, b, f"{path}[{index}]")
            if difference:
                return difference
        return None
    if saved != now or type(saved) is not type(now):
        return f"{path} is {json.dumps(now)} in this run but {json.dumps(saved)} in the checkpoint"
    return None


def _save(f: Any, arrays: dict[str, np.ndarray]) -> None:
    """np.savez into the open temporary file f, then flush it to the disk: the rename that follows must not
    reach the disk before the data does, or a power cut could leave an empty file under the checkpoint's name."""
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the rename of a checkpoint into it) to the disk, where the system allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class Checkpoints:
    """The checkpoints of one run, in `folder`: on_step (train()'s hook) writes one every `every` batches
    (None: about once a minute) and at the end of every epoch; finish() writes one when the run was interrupted,
    or the completed marker when it ended. model, optimizer, rngs (main.make_rngs's generators, whose state
    is saved in place), data (main.Dataset) and cfg are the run's own; workers is the resolved thread count;
    build_model and parameters are main's (to read a checkpoint back, and the optimiser's weight keys)."""

    def __init__(self, folder: Path, every: int | None, *, model: Any, model_cfg: dict, optimizer: Any,
                 rngs: dict[str, np.random.Generator], data: Any, cfg: dict, workers: int,
                 build_model: Callable[..., Any], parameters: Callable[[Any], Any]) -> None:
        self.folder, self.every = Path(folder), every
        self.build_model, self.parameters = build_model, parameters
        self.model, self.model_cfg, self.optimizer, self.rngs, self.data = model, model_cfg, optimizer, rngs, data
        self.cfg, self.workers = cfg, workers
        self.position: Any = None
        self.result: Any = None
        self.latest: Path | None = None
        self.last_written, self.last_cost = time.monotonic(), 0.0
        self.resumed_from: dict | None = None
        self.fingerprint = data_fingerprint(data)

    @classmethod
    def new_run(cls, root: Path, every: int | None, **run: Any) -> Checkpoints:
        """A fresh folder run-<UTC date>-<time>-<process id> under root for a new run: two runs never share one."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        stem = f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}"
        for attempt in range(1000):
            folder = root / (stem if attempt == 0 else f"{stem}-{attempt}")
            try:
                folder.mkdir()
                return cls(folder, every, **run)
            except FileExistsError:
                continue
        raise CNNError(f"--checkpoint-dir {root}: could not make a new run folder in it")

    # -- writing --------------------------------------------------------------------------------------------

    def on_step(self, position: Any, result: Any) -> None:
        """train()'s hook, between two steps: write a checkpoint when one is due. position and result are
        train()'s own objects, which it updates in place, so finish() sees where the run stopped."""
        self.position, self.result = position, result
        since = time.monotonic() - self.last_written
        if self.every is not None:
            due = position.epoch_ended or result.batches % self.every == 0
        else:  # epochs so short that a checkpoint after each would cost more than MAX_SHARE skip some
            due = since >= self.last_cost / MAX_SHARE and (position.epoch_ended or since >= EVERY_SECONDS)
        if due:
            self.write(position, result)

    def write(self, position: Any, result: Any) -> Path | None:
        """Write the checkpoint of this moment of the run, then delete all but the last KEEP of the run's.
        A checkpoint that cannot be written (a full disk) is an error in the log, not the end of the run; the
        last one written stays the one to resume from. Returns the file written, or None."""
        start = time.monotonic()
        state = {
            "epoch": position.epoch, "batch": position.batch, "n_batches": position.n_batches,
            "total_loss": position.total_loss, "correct": position.correct, "loss": position.loss,
            "batches": result.batches, "history": result.history,
            "rngs": {name: rng.bit_generator.state for name, rng in self.rngs.items()},
            "config": compared_config(self.cfg, self.workers), "data": self.fingerprint,
            "workers": self.workers, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        summary = {"epochs_completed": len(result.history), "test_accuracy": None, "test_loss": None,
                   "status": "checkpoint", "history": result.history, "workers": self.workers,
                   "seed": self.cfg["data"]["random_seed"]}
        arrays = model_file_arrays(self.model, self.model_cfg, self.data, summary, self.optimizer,
                                   checkpoint=state)
        arrays["checkpoint.order"] = position.order
        path = self.folder / checkpoint_name(result.batches)
        try:
            write_atomic(path, lambda f: _save(f, arrays))
        except OSError as error:
            self.last_written = time.monotonic()
            log.error("could not write the checkpoint %s (%s): training goes on; the last checkpoint is %s", path,
                      error.strerror or error, self.latest or "none")
            return None
        _sync_folder(self.folder)
        self.latest = path
        for old in sorted(self.folder.glob("checkpoint-*.npz"))[:-KEEP]:
            old.unlink(missing_ok=True)
        self.last_written = time.monotonic()
        self.last_cost = self.last_written - start
        log.debug("checkpoint %s written in %.3fs", path, self.last_cost)
        return path

    def finish(self, result: Any) -> None:
        """After train(): an interrupted run writes a checkpoint of where it stopped (unless the last one is
        that); a completed one gets its completed marker. A diverged run keeps its last finite checkpoint."""
        if result.status == "interrupted" and self.position is not None:
            if self.latest is None or self.latest.name != checkpoint_name(result.batches):
                self.write(self.position, result)
        elif result.status == "completed":
            try:
                self._mark_completed(result)
            except OSError as error:
                log.error("could not mark the run completed in %s (%s)", self.folder, error.strerror or error)

    def _mark_completed(self, result: Any) -> None:
        write_json(self.folder / COMPLETED, {"status": "completed", "epochs_completed": len(result.history),
                                             "batches": result.batches,
                                             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    # -- resuming -------------------------------------------------------------------------------------------

    def resume(self, position_type: Callable[..., Any], result_type: Callable[..., Any]) -> tuple[Any, Any]:
        """Restore the run from the latest loadable checkpoint in self.folder into the model, the optimiser and
        the random generators (in place); return train()'s resume=(position, result). position_type and
        result_type: main.Position and main.TrainResult. CNNError (one line) when no checkpoint can be
        read or the config or data differ from this run's (resumable_run has checked the rest)."""
        for stale in self.folder.glob(".checkpoint-*.tmp"):  # a write that a crash cut short
            stale.unlink(missing_ok=True)
        path, loaded, order = self._latest_loadable()
        state = loaded.meta["checkpoint"]
        difference = (first_difference(state["config"], compared_config(self.cfg, self.workers), "config")
                      or first_difference(state["data"], self.fingerprint, "data set"))
        if difference:
            raise CNNError(f"--resume: {difference} ({path}); resume with the original command line, or start a "
                           "new run without --resume")
        for source, target in zip(loaded.model.layers, self.model.layers):
            for name, array in {**target.params, **target.buffers}.items():
                array[...] = {**source.params, **source.buffers}[name]
        own_keys = {key: param for key, param, _ in self.parameters(self.model)}
        if loaded.optimizer_state and not restore_optimizer(self.optimizer, loaded, own_keys):
            raise CNNError(f"--resume: {path}: its {loaded.meta['optimizer']['name']} state does not fit this "
                           f"run's {self.optimizer.name} optimiser")
        for name, rng in self.rngs.items():
            rng.bit_generator.state = state["rngs"][name]
        result = result_type(history=state["history"], batches=state["batches"])
        position = position_type(state["epoch"], state["batch"], state["n_batches"], order,
                                 state["total_loss"], state["correct"], state["loss"])
        if position.epoch_ended and result.history and result.history[-1]["epoch"] == position.epoch:
            # That epoch's row is written: go on with the next epoch, whose order train() would draw now.
            position = dataclasses.replace(position, epoch=position.epoch + 1, batch=0, total_loss=0.0, correct=0,
                                           loss=float("nan"), order=self.rngs["shuffle"].permutation(len(order)))
        self.latest, self.position, self.result = path, position, result
        self.resumed_from = {"checkpoint": str(path), "epoch": state["epoch"], "batch": state["batch"]}
        log.info("resuming from %s: epoch %d after %d of %d batches", path, state["epoch"], state["batch"],
                 state["n_batches"])
        return position, result

    def _latest_loadable(self) -> tuple[Path, Any, np.ndarray]:
        """The newest checkpoint that loads, with its model file and shuffle order; damaged ones newer than it
        are renamed to *.damaged with a warning, so that they leave the rotation."""
        for path in sorted(self.folder.glob("checkpoint-*.npz"), reverse=True):
            try:
                loaded = load_model(path, self.build_model)
                if not isinstance(loaded.meta.get("checkpoint"), dict):
                    raise ModelFileError(f"{path}: a model file, not a checkpoint")
                with np.load(path, allow_pickle=False) as archive:
                    order = archive["checkpoint.order"]
                self._check_state(path, loaded.meta["checkpoint"], order)
                return path, loaded, order
            except (ModelFileError, KeyError, TypeError, ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
                message = str(error).removeprefix(f"{path}: ") if isinstance(error, ModelFileError) \
                    else f"{type(error).__name__}: {error}"
                damaged = path.with_suffix(".damaged")
                log.warning("checkpoint %s cannot be read (%s): set aside as %s; trying the one before it", path,
                            message, damaged.name)
                os.replace(path, damaged)
        raise CNNError(f"--resume: no readable checkpoint in {self.folder} (each was damaged: see the warnings)")


    def _check_state(self, path: Path, state: dict, order: np.ndarray) -> None:
        """ModelFileError (or KeyError, TypeError, ValueError) unless a checkpoint entry holds every value
        resume() reads, of the right kinds: a file edited by hand must not end in a traceback."""
        if not all(type(state[key]) is int and state[key] >= 0 for key in ("epoch", "batch", "n_batches", "correct",
                                                                            "batches")):
            raise ModelFileError(f"{path}: its position is not counts of epochs and batches")
        if not all(isinstance(state[key], float) for key in ("total_loss", "loss")) or not isinstance(
                state["history"], list) or not isinstance(state["config"], dict):
            raise ModelFileError(f"{path}: its running sums, history or config are not what a checkpoint holds")
        for name, rng in self.rngs.items():  # a generator of the same kind takes each saved state, or says why not
            type(rng.bit_generator)().state = state["rngs"][name]
        n_train = state["data"]["n_train"]
        if order.dtype.kind not in "iu" or not np.array_equal(np.sort(order), np.arange(n_train)):
            raise ModelFileError(f"{path}: its shuffle order is not an order of {n_train} images")


def find_run(directory: Path) -> Path:
    """The run folder --resume DIR means: DIR itself when it is one, else the most recently written run folder
    in it that holds a checkpoint (or completed). CNNError (one line) when there is none."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CNNError(f"--resume: no checkpoint folder {directory} (is --checkpoint-dir what it was?)")
    if (directory / COMPLETED).exists() or any(directory.glob("checkpoint-*.npz")):
        return directory
    runs = [folder for folder in directory.iterdir() if folder.is_dir() and folder.name.startswith("run-")
            and ((folder / COMPLETED).exists() or any(folder.glob("checkpoint-*.npz")))]
    if not runs:
        raise CNNError(f"--resume: no checkpoint in {directory}: no run has written one there")
    return max(runs, key=lambda folder: (folder.stat().st_mtime_ns, folder.name))


def resumable_run(checkpoint_dir: str | None, resume: str | bool) -> Path:
    """The folder of the run --resume [DIR] continues (resume: DIR, or True for checkpoint_dir), checked before
    any work: CNNError (one line) when there is none, it has no checkpoint, or it already completed."""
    folder = checkpoint_dir if resume is True else resume
    if not folder:
        raise CNNError("--resume: checkpoints are off (output.checkpoint_dir is null): give the folder, --resume DIR")
    run = find_run(Path(folder))
    if (run / COMPLETED).exists():
        raise CNNError(f"--resume: the run in {run} already completed (it has {COMPLETED}); start a new run "
                       "without --resume")
    if not any(run.glob("checkpoint-*.npz")):
        raise CNNError(f"--resume: no checkpoint in {run} (the run stopped before writing one); start it again "
                       "without --resume")
    return run


def for_run(checkpoint_dir: str | None, resume: str | bool | None, every: int | None,
            **run: Any) -> Checkpoints | None:
    """The run's Checkpoints: a new run folder under checkpoint_dir, or with --resume [DIR] (resume: DIR, or True
    for checkpoint_dir) the folder of the run to continue. None when checkpoints are off and not resuming."""
    if resume is None:
        return Checkpoints.new_run(Path(checkpoint_dir), every, **run) if checkpoint_dir else None
    return Checkpoints(resumable_run(checkpoint_dir, resume), every, **run)


def interrupted_line(result: Any, checkpoints: Checkpoints | None, saved_model: str | None) -> str:
    """The last line of an interrupted run: where it stopped and what was kept."""
    where = result.stopped_at or {}
    position = checkpoints.position if checkpoints is not None else None
    n_batches = position.n_batches if position is not None else None
    if n_batches is not None and where.get("batch") == n_batches:
        done, kept = f"interrupted after epoch {where.get('epoch')}", "the test accuracy is that of the model then"
    else:
        of = f" of {n_batches}" if n_batches is not None else ""
        done = f"interrupted in epoch {where.get('epoch')} after {where.get('batch')}{of} batches"
        kept = "the test accuracy is that of the model after those batches"
    if saved_model:
        kept += f", which was saved to {saved_model}"
    if checkpoints is not None and checkpoints.latest is not None:
        kept += f"; checkpoint at {checkpoints.latest} (continue with --resume)"
    else:
        kept += "; no checkpoint (checkpoints are off)"
    return f"{done}: {kept}"
