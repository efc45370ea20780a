"""How fast does numpy-cnn train, compared with PyTorch on the same CPU, and how far is it from the hardware's limit?

Run from the project root:

    python bench/benchmark.py                              # 5,000 images, 5 repeats of 1 epoch: 3-5 minutes
    python bench/benchmark.py --config configs/mnist_best.yaml    # a recipe instead of the default model
    python bench/benchmark.py --images 60000 --repeats 3   # full MNIST-sized epochs: several minutes
    python bench/benchmark.py --threads 1                  # steadier numbers on a busy, shared machine
    python bench/benchmark.py --json bench.json            # also write every number to a file

Flags:
    --config FILE  benchmark the training a config file describes: its network (model.layers), batch size,
                   optimiser (training.optimizer, learning_rate, momentum, weight_decay), learning-rate schedule
                   (training.lr_schedule), worker threads (training.workers), augmentation (data.augment) and seed
                   (data.random_seed). Without it: the built-in defaults (config_schema.DEFAULT_CONFIG), i.e. the
                   default model, batch 32, Adam lr 1e-3, no schedule, no augmentation. The images are always the
                   benchmark's synthetic 28x28 digits (a config of the 8x8 `digits` data set is refused).
    --images N     training images per epoch (synthetic 28x28 seven-segment digits; default 5000)
    --repeats R    how many times each side is measured, alternating project / PyTorch (default 5)
    --epochs E     timed epochs per measurement (default 1); a short warm-up always runs first
    --threads T    threads on both sides (default: every CPU this process may use): PyTorch's threads, and the
                   most worker threads the project may use (parallel.DataParallel, each with one BLAS thread)
    --no-torch     behave as if PyTorch were not installed (report the project alone)
    --json FILE    write all numbers (and the environment) to FILE

What is measured:
- Training, the project: main.train itself, set up as `python src/main.py` sets it up (main.run_training): the
  model of main.build_model with the seed's random streams (main.make_rngs: initial weights, Dropout masks,
  shuffling, augmentation), main.make_optimizer's optimiser, training.workers or else the worker threads
  parallel.default_workers picks (T at most, fewer when the slices of a batch would be too small to pay; BatchNorm
  models too train on all of them), main.learning_rate_schedule over the config's epochs (or the benchmark's, when
  more), and data.augment as main.shift_and_rotate. So the number is exactly what users see in the log ("seconds" of
  an epoch, to the millisecond; the timed epochs have no test set, so that the CPU time, like the seconds, is of
  training alone).
- Training, PyTorch: the same network (torch_twin: Conv2d, BatchNorm2d / BatchNorm1d, ReLU, Tanh, MaxPool2d,
  AvgPool2d, Flatten, Dropout, Linear, from the same initial weights), on the same images, with the same batch
  size and thread count (data kept as one tensor and indexed per batch: no DataLoader); Adam, or AdamW when the
  config has weight decay, or SGD with momentum, the decay decoupled as the project's and on the same tensors
  (conv kernels and dense matrices: a param group of their own); the schedule's PyTorch equivalent, stepped after
  every batch (OneCycleLR, CosineAnnealingLR, StepLR); and the same augmentation done with PyTorch's own ops on
  each NCHW batch (TORCH_AUGMENTATION below).
- Augmentation: the seconds each side spends augmenting the batches of its timed epochs, as a share of the epoch
  time (the target is less than 10% on the project's side).
- Inference: images per second of a forward pass plus softmax at batch 1000 (Sequential.predict_proba), on (at most)
  the first 5,000 images, median of 3 passes.
- Peak memory (RSS) of each worker process; training and inference run in separate processes, so the training figure
  is not inflated by the much larger batch-1000 activations.
- The GEMM lower bound: almost all the arithmetic of a CNN is in a few matrix multiplies (convolutions become matrix
  multiplies through im2col). Their shapes follow from the model; timing np.matmul on exactly those shapes, at the
  config's batch size with T BLAS threads, gives the time an epoch would take if everything else (im2col, col2im,
  pooling, activations, BatchNorm, Adam, Python) were free. (A convolution's dX is one GEMM, as in the project.)
  "project epoch / lower bound" says how much time goes elsewhere; one extra profiled project epoch
  (profiling.instrument, profiling.profile_table) shows where: time per layer and direction, and the optimiser
  step. The table of GEMMs is timed once before the repeats; each training worker times them again right after
  its epoch (both best of 10 rounds), and the target uses those same-minute ratios: on a shared machine whose
  speed drifts, a bound timed minutes away from the epoch would skew the ratio either way.
- CPU time next to wall time, to see how busy the threads were. On a shared machine, BLAS and OpenMP threads that wait
  for each other stall badly when other processes hold the cores: --threads 1 gives steadier numbers.

Every measurement runs in a fresh child process (this script re-invoking itself with the hidden --worker flag,
answering with one JSON line), and the two sides alternate (project, PyTorch, project, PyTorch, ...) so that
other load on the machine hits both alike. PyTorch is optional: without it the project is reported alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
INPUT_SHAPE = (28, 28, 1)  # the synthetic digits' shape, which is MNIST's and Fashion-MNIST's
N_CLASSES = 10
DEFAULT_RECIPE = "built-in defaults (config_schema.DEFAULT_CONFIG)"  # what the report names without --config
INFERENCE_BATCH = 1000
INFERENCE_IMAGES = 5000  # at most this many of the images are classified per inference pass (the rate is what counts)
N_TEST = 100  # a token test set for the warm-up; the timed epochs have none
WARMUP_BATCHES = 20  # first calls allocate buffers, start BLAS threads, build PyTorch's kernels
SEED = 42
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SLOW_BLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
GEMM_ROUNDS = 10  # each GEMM's time is its best of this many rounds (the lower bound: least disturbed)
TARGETS = {"epoch_ratio": 1.0, "epoch_ratio_goal": 0.9, "lower_bound_ratio": 2.5, "training_rss_mib": 150.0,
           "augment_share": 0.10}
TORCH_AUGMENTATION = ("PyTorch ops on each NCHW batch: random shifts and angles drawn as the project draws them, "
                      "one affine matrix per image, F.affine_grid + F.grid_sample (bilinear, zeros outside): the "
                      "transform of main.shift_and_rotate")


# ------------------------------------------------------------------------------------------------
# Helpers used on both sides
# ------------------------------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def import_main() -> Any:
    """The project's module, src/main.py."""
    if str(ROOT / "src") not in sys.path:
        sys.path.insert(0, str(ROOT / "src"))
    import main

    return main


def load_images(data_file: str, n_train: int) -> Any:
    """The cached synthetic images as main.Dataset: float32 (N, 28, 28, 1) in [0, 1], the last N_TEST as test set."""
    import numpy as np

    main = import_main()
    with np.load(data_file) as archive:
        images, labels = archive["images"], archive["labels"].astype(np.int64)
    x = images.astype(np.float32)[..., None]
    x /= 255  # in place: no second full-size temporary on top of the peak RSS
    return main.Dataset(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:], main.DIGIT_NAMES,
                        "synthetic", "synthetic", "benchmark data")


def limit_blas_threads(threads: int) -> Any:
    """threadpoolctl's limit if it is installed (the environment variables were set before numpy started anyway)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads)


# ------------------------------------------------------------------------------------------------
# The recipe: what a config says about training, set up as `python src/main.py` sets it up
# ------------------------------------------------------------------------------------------------


def load_recipe(config_file: str | None) -> dict:
    """The checked config whose training is benchmarked: config_file read and validated as `python src/main.py
    --config FILE` reads it, or the built-in defaults. Raises errors.CNNError (one line) for a config that the
    benchmark cannot run: unreadable or invalid, for images other than 28x28, or with a model that does not fit
    them or does not end in 10 classes."""
    import numpy as np

    main = import_main()
    import config_schema
    from errors import ConfigError

    if config_file is None:
        return config_schema.validate_config({})
    recipe = main.load_config(config_file)
    dataset = recipe["data"]["dataset"]
    if main.input_shape_of(dataset) != INPUT_SHAPE:
        shape = "x".join(map(str, main.input_shape_of(dataset)[:2]))
        raise ConfigError(f"{config_file}: data.dataset {dataset} has {shape} images; the benchmark trains on "
                          "synthetic 28x28 digits, so it times models for 28x28 images only")
    try:
        main.build_model(recipe["model"], INPUT_SHAPE, N_CLASSES, np.random.default_rng(0))
    except ConfigError as error:
        raise ConfigError(f"{config_file}: {error}") from None
    return recipe


def schedule_epochs(recipe: dict, timed_epochs: int) -> int:
    """The epochs the learning-rate schedule spans: the config's (as in `python src/main.py`), or the benchmark's
    timed epochs when those are more (PyTorch's OneCycleLR refuses to step past its end)."""
    return max(recipe["training"]["epochs"], timed_epochs, 1)


class ProjectRun(NamedTuple):
    """What main.run_training builds before it calls main.train."""

    model: Any  # main.Sequential
    optimizer: Any  # main.Optimizer
    workers: int
    learning_rate: Callable[[int], float]  # step -> learning rate
    augment: Callable[[Any], Any] | None  # a batch of images -> the batch augmented
    shuffle: Any  # the generator main.train shuffles with


def project_run(recipe: dict, n_images: int, timed_epochs: int) -> ProjectRun:
    """The model, optimiser, worker threads, learning-rate schedule, augmentation and shuffling generator for
    training on n_images per epoch, built as main.run_training builds them from the config."""
    main = import_main()
    import parallel
    training, augment_cfg = recipe["training"], recipe["data"]["augment"]
    rngs = main.make_rngs(recipe["data"]["random_seed"])
    model = main.build_model(recipe["model"], INPUT_SHAPE, N_CLASSES, rngs["init"], rngs["dropout"])
    optimizer = main.make_optimizer(training)
    workers = training["workers"] or parallel.default_workers(model, training["batch_size"])
    steps_per_epoch = math.ceil(n_images / training["batch_size"])
    learning_rate = main.learning_rate_schedule(training["lr_schedule"], training["learning_rate"], steps_per_epoch,
                                                steps_per_epoch * schedule_epochs(recipe, timed_epochs))
    augment = None
    if augment_cfg["shift"] or augment_cfg["rotate"]:
        def augment(x: Any) -> Any:
            return main.shift_and_rotate(x, rngs["augment"], augment_cfg["shift"], augment_cfg["rotate"])
    return ProjectRun(model, optimizer, workers, learning_rate, augment, rngs["shuffle"])


class TimedAugment:
    """An augmentation function that adds up, in `seconds`, the time its calls take."""

    def __init__(self, augment: Callable[[Any], Any]) -> None:
        self.augment, self.seconds = augment, 0.0

    def __call__(self, images: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.augment(images)
        finally:
            self.seconds += time.perf_counter() - start


def optimizer_name(training: dict) -> str:
    """How PyTorch calls the optimiser the config describes: Adam, AdamW (Adam with weight decay) or SGD."""
    if training["optimizer"] == "sgd":
        return "SGD"
    return "AdamW" if training["weight_decay"] else "Adam"


def describe_recipe(recipe: dict) -> str:
    """One line: batch, optimiser, learning rate and schedule, weight decay, augmentation."""
    training, augment = recipe["training"], recipe["data"]["augment"]
    schedule = training["lr_schedule"]
    text = f"batch {training['batch_size']}, {optimizer_name(training)} lr {training['learning_rate']:g}"
    if training["optimizer"] == "sgd":
        text += f" momentum {training['momentum']:g}"
    if training["weight_decay"]:
        text += f", weight decay {training['weight_decay']:g} (decoupled)"
    if schedule["name"] != "constant":
        settings = ", ".join(f"{key} {value:g}" for key, value in schedule.items() if key != "name")
        text += f", {schedule['name']} schedule" + (f" ({settings})" if settings else "")
    changes = ([f"shifts of up to {augment['shift']} px"] if augment["shift"] else []) \
        + ([f"rotations of up to {augment['rotate']:g} degrees"] if augment["rotate"] else [])
    return text + (f", augmentation: {' and '.join(changes)}" if changes else ", no augmentation")


# ------------------------------------------------------------------------------------------------
# Worker: setup (data, FLOP count, GEMM timing, BLAS information)
# ------------------------------------------------------------------------------------------------


def model_gemms(model: Any, batch_size: int) -> list[dict]:
    """Every matrix multiply one training batch performs, read off the model's layers.

    A layer computing Y = X @ W with X (M, K), W (K, N) needs in training:
      forward  X @ W      (M, K) @ (K, N)
      dW       X^T @ dY   (K, M) @ (M, N)
      dX       dY @ W^T   (M, N) @ (N, K)   -- skipped for the first layer (need_input_grad is False)
    For a convolution, X is the im2col matrix: M = batch * Ho * Wo output pixels, K = k * k * C, N = filters.
    For a dense layer, M = batch, K = in_features, N = units.
    """
    main = import_main()
    gemms, shape, counts = [], tuple(model.input_shape), {}
    for layer in model.layers:
        kind = type(layer).__name__
        counts[kind] = counts.get(kind, 0) + 1
        out_shape = layer.output_shape(shape)
        if isinstance(layer, (main.Conv2D, main.Dense)):
            name = f"{kind.lower()}_{counts[kind]}"
            if isinstance(layer, main.Conv2D):
                k, _, channels, filters = layer.params["W"].shape
                m, kk, n = batch_size * out_shape[0] * out_shape[1], k * k * channels, filters
            else:
                (kk, n), m = layer.params["W"].shape, batch_size
            gemms.append({"layer": name, "op": "forward", "m": m, "k": kk, "n": n, "layout": "X @ W"})
            gemms.append({"layer": name, "op": "dW", "m": kk, "k": m, "n": n, "layout": "X.T @ dY"})
            if getattr(layer, "need_input_grad", True):
                gemms.append({"layer": name, "op": "dX", "m": m, "k": n, "n": kk, "layout": "dY @ W.T"})
        shape = out_shape
    for gemm in gemms:
        gemm["mflop_per_image"] = 2 * gemm["m"] * gemm["k"] * gemm["n"] / batch_size / 1e6
    return gemms


def gemm_operands(gemm: dict, rng: Any) -> tuple[Any, Any]:
    """Random float32 operands, a transposed operand as a transposed view (as `cols.T` is in main.py), not a
    contiguous copy. (For a convolution's dX, main.py multiplies by W offset by offset: the same FLOPs.)"""
    import numpy as np

    m, k, n = gemm["m"], gemm["k"], gemm["n"]
    if gemm["layout"] == "X @ W":
        return rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32)
    if gemm["layout"] == "X.T @ dY":
        return rng.random((k, m), dtype=np.float32).T, rng.random((k, n), dtype=np.float32)
    return rng.random((m, k), dtype=np.float32), rng.random((n, k), dtype=np.float32).T


def time_gemms(gemms: list[dict], rng: Any, rounds: int = GEMM_ROUNDS, min_seconds: float = 0.02) -> list[float]:
    """Best seconds per call of np.matmul for each GEMM.

    The GEMMs take turns (round 1: each GEMM for ~min_seconds, round 2: each again, ...) and each keeps its
    best round, so that a burst of other load on a shared machine spoils one round, not one GEMM's result.
    """
    import numpy as np

    operands = [gemm_operands(gemm, rng) for gemm in gemms]
    calls = []
    for a, b in operands:
        np.matmul(a, b)  # warm-up: thread start, page faults of the output
        start = time.perf_counter()
        np.matmul(a, b)
        calls.append(max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6))))
    best = [math.inf] * len(gemms)
    for _ in range(rounds):
        for index, ((a, b), n_calls) in enumerate(zip(operands, calls)):
            start = time.perf_counter()
            for _ in range(n_calls):
                np.matmul(a, b)
            best[index] = min(best[index], (time.perf_counter() - start) / n_calls)
    return best


def blas_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{key: str(value) for key, value in pool.items()} for pool in threadpool_info()]


def numpy_config_text() -> str:
    """numpy.show_config()'s text (the fallback when threadpoolctl is missing)."""
    import contextlib
    import io

    import numpy as np

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        np.show_config()
    return buffer.getvalue()


def worker_setup(args: argparse.Namespace) -> dict:
    """Write the synthetic images to args.data, count and time the model's GEMMs, describe numpy's BLAS."""
    import numpy as np

    import_main()
    import datafiles
    limit = limit_blas_threads(args.threads)
    total, rng = args.images + N_TEST, np.random.default_rng(SEED)
    images, labels = np.empty((total, 28, 28), np.uint8), np.empty(total, np.uint8)
    for start in range(0, total, 5000):  # in chunks: make_synthetic's temporaries grow with n
        stop = min(start + 5000, total)
        images[start:stop], labels[start:stop] = datafiles.make_synthetic(stop - start, rng)
    np.savez(args.data, images=images, labels=labels)

    recipe = load_recipe(args.config)
    batch_size = recipe["training"]["batch_size"]
    model = project_run(recipe, args.images, args.epochs).model
    gemms = model_gemms(model, batch_size)
    for gemm, seconds in zip(gemms, time_gemms(gemms, rng)):
        gemm["seconds_per_batch"] = seconds
        gemm["gflop_per_second"] = gemm["mflop_per_image"] * batch_size / 1e3 / gemm["seconds_per_batch"]
    # For comparison: a large square GEMM, which BLAS runs near the CPU's peak rate.
    square = {"m": 1024, "k": 1024, "n": 1024, "layout": "X @ W"}
    peak_gflop_per_second = 2 * 1024**3 / 1e9 / time_gemms([square], rng, rounds=5)[0]
    blas = blas_info()  # while the thread limit is in force, so that it shows the threads used
    del limit
    return {"gemms": gemms, "peak_gflop_per_second": peak_gflop_per_second, "summary": model.summary(),
            "blas": blas, "numpy_config": "" if blas else numpy_config_text(), "numpy": np.__version__}


# ------------------------------------------------------------------------------------------------
# Worker: the project (NumPy)
# ------------------------------------------------------------------------------------------------


def worker_numpy(args: argparse.Namespace) -> dict:
    """Train (args.task == "train" or "profile") or run inference ("infer") with the project's own code."""
    import numpy as np

    main = import_main()
    import profiling
    limit_blas_threads(args.threads)
    recipe = load_recipe(args.config)
    batch_size = recipe["training"]["batch_size"]
    data = load_images(args.data, args.images)
    rss_with_data = peak_rss_mib()
    # As `python src/main.py` sets up training, down to the worker threads it would choose here (T at most,
    # fewer when slices of a batch would be too small to pay): the project is measured as users run it.
    run = project_run(recipe, args.images, args.epochs)
    model = run.model
    result: dict[str, Any] = {"rss_after_data_mib": rss_with_data, "data_mib": data.x_train.nbytes / 2**20}

    if args.task == "infer":
        images = data.x_train[:INFERENCE_IMAGES]
        model.predict_proba(images[:INFERENCE_BATCH], batch_size=INFERENCE_BATCH)  # warm-up
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            model.predict_proba(images, batch_size=INFERENCE_BATCH)
            seconds.append(time.perf_counter() - start)
        result.update(images_per_second=len(images) / statistics.median(seconds), peak_rss_mib=peak_rss_mib())
        return result

    warmup = main.Dataset(data.x_train[:WARMUP_BATCHES * batch_size], data.y_train[:WARMUP_BATCHES * batch_size],
                          data.x_test, data.y_test, data.class_names, "warm-up", "synthetic")
    main.train(model, run.optimizer, warmup, epochs=1, batch_size=batch_size, rng=run.shuffle, workers=run.workers,
               learning_rate=run.learning_rate, augment=run.augment)
    # The timed epochs have no test set, so that the CPU time is of training alone, as the epochs' "seconds" are
    # (the PyTorch side does not evaluate either).
    train_only = main.Dataset(data.x_train, data.y_train, data.x_test[:0], data.y_test[:0], data.class_names,
                              "benchmark", "synthetic")
    epochs = 1 if args.task == "profile" else args.epochs
    timings = profiling.instrument(model, run.optimizer) if args.task == "profile" else None
    augment = TimedAugment(run.augment) if run.augment is not None else None
    cpu_start = time.process_time()
    history = main.train(model, run.optimizer, train_only, epochs=epochs, batch_size=batch_size, rng=run.shuffle,
                         workers=run.workers, learning_rate=run.learning_rate, augment=augment).history
    result.update(epoch_seconds=[row["seconds"] for row in history], train_accuracy=history[-1]["train_accuracy"],
                  workers=run.workers, cpu_seconds_per_epoch=(time.process_time() - cpu_start) / epochs,
                  augment_seconds=augment.seconds if augment is not None else 0.0, peak_rss_mib=peak_rss_mib())
    if args.task == "profile":
        result["profile"] = profiling.profile_table(timings, model.names, math.ceil(args.images / batch_size),
                                                    run.workers)
    else:
        # The GEMM lower bound once more, in this process, right after the epoch (and after reading the peak
        # RSS, which the GEMMs' operands would raise): this host's speed drifts by up to 1.5x within minutes,
        # so epoch / bound is only a fair ratio when both come from the same minute.
        gemm_seconds = time_gemms(model_gemms(model, batch_size), np.random.default_rng(SEED))
        result["lower_bound_seconds"] = sum(gemm_seconds) * args.images / batch_size
    return result


# ------------------------------------------------------------------------------------------------
# Worker: PyTorch, the same network (the project's PyTorch twin, its optimiser and schedule: src/torch_twin.py)
# ------------------------------------------------------------------------------------------------


def torch_affine(images: Any, angles: Any, shift_rows: Any, shift_cols: Any) -> Any:
    """main.shift_and_rotate's transform in PyTorch: images (N, C, H, W), each moved by its own shift_rows and
    shift_cols (pixels, (N,)) and turned by its own angle (radians, (N,)) about the image's centre, read
    bilinearly, zeros outside.

    F.affine_grid takes, per image, the matrix that maps an output pixel's coordinates to the point it reads,
    in coordinates that run from -1 to 1 across the image (align_corners=True: -1 and 1 are the centres of the
    outer pixels, so a pixel is 2 / (W - 1) wide). The project reads, for output pixel (r, c) relative to the
    centre, the point rotate(angle) applied to (r - shift_rows, c - shift_cols); the matrix below is that, in
    those coordinates, for (x, y) = (column, row).
    """
    import torch
    from torch.nn import functional

    height, width = images.shape[2:]
    half_h, half_w = (height - 1) / 2, (width - 1) / 2
    cos, sin = torch.cos(angles), torch.sin(angles)
    theta = torch.stack([
        torch.stack([cos, sin * half_h / half_w, -(sin * shift_rows + cos * shift_cols) / half_w], dim=1),
        torch.stack([-sin * half_w / half_h, cos, (sin * shift_cols - cos * shift_rows) / half_h], dim=1),
    ], dim=1).to(images.dtype)  # (N, 2, 3)
    grid = functional.affine_grid(theta, list(images.shape), align_corners=True)
    return functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def torch_shift_and_rotate(images: Any, max_shift: int, max_degrees: float) -> Any:
    """PyTorch's augmentation of a batch (N, C, H, W): random shifts of up to max_shift whole pixels in each
    direction and angles of up to max_degrees either way, drawn per image as main.shift_and_rotate draws them
    (from PyTorch's generator), applied by torch_affine."""
    import torch

    n = len(images)
    angles = torch.deg2rad((2 * torch.rand(n, dtype=torch.float64) - 1) * max_degrees)
    shift_rows, shift_cols = torch.randint(-max_shift, max_shift + 1, (2, n)).to(torch.float64)
    return torch_affine(images, angles, shift_rows, shift_cols)


def worker_torch(args: argparse.Namespace) -> dict:
    """The same training (or inference) in PyTorch: same images, initial weights, batch, optimiser, schedule,
    augmentation and threads."""
    import numpy as np
    import torch
    from torch.nn import functional

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    recipe = load_recipe(args.config)  # puts src/ on the path
    from torch_twin import decay_by_hand, torch_optimizer, torch_schedule, torch_twin

    training, augment_cfg = recipe["training"], recipe["data"]["augment"]
    batch_size = training["batch_size"]
    data = load_images(args.data, args.images)
    x = torch.from_numpy(np.ascontiguousarray(data.x_train.transpose(0, 3, 1, 2)))  # NHWC -> NCHW, once
    y = torch.from_numpy(data.y_train)
    del data
    rss_with_data = peak_rss_mib()
    model, _ = torch_twin(project_run(recipe, args.images, args.epochs).model)
    result: dict[str, Any] = {"rss_after_data_mib": rss_with_data, "data_mib": x.numel() * 4 / 2**20}

    if args.task == "infer":
        model.eval()
        with torch.inference_mode():
            images = x[:INFERENCE_IMAGES]

            def predict_proba() -> None:
                for start in range(0, len(images), INFERENCE_BATCH):
                    torch.softmax(model(images[start:start + INFERENCE_BATCH]), dim=1)

            model(images[:INFERENCE_BATCH])  # warm-up
            seconds = []
            for _ in range(3):
                start = time.perf_counter()
                predict_proba()
                seconds.append(time.perf_counter() - start)
        result.update(images_per_second=len(images) / statistics.median(seconds), peak_rss_mib=peak_rss_mib())
        return result

    model.train()
    optimizer, decayed_by_hand = torch_optimizer(model, training)
    augment = None
    if augment_cfg["shift"] or augment_cfg["rotate"]:
        augment = TimedAugment(lambda images: torch_shift_and_rotate(images, augment_cfg["shift"],
                                                                     augment_cfg["rotate"]))

    def epoch(n_images: int, scheduler: Any) -> tuple[float, float, float]:
        """One epoch as main.train does it: shuffle, then per batch augmentation, forward, loss, backward, step
        (and the schedule's step), and the running loss and accuracy. Returns (seconds, CPU seconds, train
        accuracy)."""
        start, correct = time.perf_counter(), 0
        cpu_start = time.process_time()
        order = torch.randperm(n_images)
        for first in range(0, n_images, batch_size):
            chosen = order[first:first + batch_size]
            images, labels = x[chosen], y[chosen]
            if augment is not None:
                images = augment(images)
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = functional.cross_entropy(logits, labels)
            loss.backward()
            decay_by_hand(optimizer, decayed_by_hand, training["weight_decay"])  # SGD's decoupled decay
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            float(loss)
            correct += int((logits.argmax(dim=1) == labels).sum())
        return time.perf_counter() - start, time.process_time() - cpu_start, correct / n_images

    epoch(min(WARMUP_BATCHES * batch_size, len(x)), None)
    if augment is not None:
        augment.seconds = 0.0
    # The schedule starts after the warm-up, as the project's timed main.train starts its steps from 0.
    steps_per_epoch = math.ceil(len(x) / batch_size)
    scheduler = torch_schedule(optimizer, training["lr_schedule"], training["learning_rate"], steps_per_epoch,
                               steps_per_epoch * schedule_epochs(recipe, args.epochs))
    runs = [epoch(len(x), scheduler) for _ in range(args.epochs)]
    result.update(epoch_seconds=[seconds for seconds, _, _ in runs], train_accuracy=runs[-1][2],
                  cpu_seconds_per_epoch=statistics.mean(cpu for _, cpu, _ in runs),
                  augment_seconds=augment.seconds if augment is not None else 0.0, peak_rss_mib=peak_rss_mib())
    return result


def worker_versions() -> dict:
    """Library versions and thread setup as seen inside a worker."""
    info = {"python": platform.python_version()}
    if "torch" in sys.modules:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_backend=torch.__config__.parallel_info().splitlines()[-1].strip())
    return info


def run_worker(args: argparse.Namespace) -> None:
    """Child process: measure one thing, print one JSON line."""
    workers = {"setup": worker_setup, "numpy": worker_numpy, "torch": worker_torch}
    result = workers[args.worker](args)
    result.update(worker_versions())
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------
# Parent: orchestration and report
# ------------------------------------------------------------------------------------------------


def call_worker(args: argparse.Namespace, worker: str, task: str = "train") -> dict:
    """Run this script as a child measuring one thing; its last stdout line is the JSON answer."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--task", task,
               "--data", args.data, "--images", str(args.images), "--epochs", str(args.epochs),
               "--threads", str(args.threads)]
    if args.config:  # absolute: the worker runs in the project root, which need not be the caller's folder
        command += ["--config", str(Path(args.config).resolve())]
    env = dict(os.environ, **{name: str(args.threads) for name in THREAD_VARIABLES})
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"error: the {worker} {task} worker failed (exit {done.returncode}):\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def print_gemm_table(setup: dict, images: int, batch_size: int) -> float:
    """The matrix multiplies of one training batch; returns their time per epoch (the lower bound)."""
    print(f"\nWhere the arithmetic is: the matrix multiplies of one training batch of {batch_size} (float32, "
          f"np.matmul, best of {GEMM_ROUNDS} rounds)")
    print(f"{'layer':<10}{'op':<9}{'shape (M x K) @ (K x N)':<30}{'MFLOP/image':>12}{'ms/batch':>10}{'GFLOP/s':>9}")
    print("-" * 80)
    for g in setup["gemms"]:
        shape = f"({g['m']} x {g['k']}) @ ({g['k']} x {g['n']})"
        print(f"{g['layer']:<10}{g['op']:<9}{shape:<30}{g['mflop_per_image']:>12.2f}"
              f"{1e3 * g['seconds_per_batch']:>10.3f}{g['gflop_per_second']:>9.1f}")
    mflop = sum(g["mflop_per_image"] for g in setup["gemms"])
    per_batch = sum(g["seconds_per_batch"] for g in setup["gemms"])
    lower_bound = per_batch * images / batch_size
    print("-" * 80)
    print(f"{'total':<49}{mflop:>12.2f}{1e3 * per_batch:>10.3f}{mflop * batch_size / 1e3 / per_batch:>9.1f}")
    peak = setup["peak_gflop_per_second"]
    print(f"GEMM lower bound: {mflop:.1f} MFLOP per training image x {images:,} images = {mflop * images / 1e3:.0f} "
          f"GFLOP, {lower_bound:.2f} s per epoch at these shapes on this machine")
    print(f"(a 1024 x 1024 x 1024 GEMM runs at {peak:.0f} GFLOP/s here: at that rate the epoch's GEMMs would take "
          f"{mflop * images / 1e3 / peak:.2f} s; thin shapes such as K = 9 or M = {batch_size} run slower)")
    return lower_bound


def markdown_summary(report: dict) -> str:
    """The compact table for the README."""
    project, torch_side, n = report["project"], report.get("torch"), report["config"]["images"]
    augmentation = report["augmentation"]

    def epoch(side: dict) -> str:
        e = side["epoch_seconds"]
        return f"{e['median']:.2f} s ({e['min']:.2f}-{e['max']:.2f})"

    def training_rate(side: dict) -> str:
        return f"{n / side['epoch_seconds']['median']:,.0f}"

    def inference_rate(side: dict) -> str:
        return f"{side['inference_images_per_second']['median']:,.0f}"

    def rss(key: str) -> Callable[[dict], str]:
        return lambda side: f"{side[key]:.0f} MiB"

    def augment_share(side: dict) -> str:
        share = augmentation["share_of_epoch"][side["name"]]["median"]
        return f"{share:.1%}"

    def both(describe: Callable[[dict], str], ratio: str = "") -> tuple[str, str, str]:
        if torch_side is None:
            return describe(project), "not run" if report["config"].get("no_torch") else "not installed", "-"
        return describe(project), describe(torch_side), ratio or "-"

    ratios = {"epoch": f"{report['epoch_ratio']['median']:.2f}", "inference": f"{report['inference_ratio']:.2f}"} \
        if torch_side else {"epoch": "", "inference": ""}
    rows = [
        ("", "project (NumPy)", "PyTorch", "project / PyTorch"),
        ("---", "---:", "---:", "---:"),
        (f"training epoch, {n:,} images (median, min-max)", *both(epoch, ratios["epoch"])),
        ("training images/s", *both(training_rate)),
    ]
    if augmentation["on"]:
        rows.append(("augmentation, share of the epoch (median)", *both(augment_share)))
    rows += [
        ("GEMM lower bound per epoch, timed after each epoch (median; median of epoch / bound)",
         f"{report['lower_bound_paired_seconds']['median']:.2f} s "
         f"({report['lower_bound_paired_ratio']['median']:.2f}x)", "-", "-"),
        (f"inference images/s (batch {INFERENCE_BATCH})", *both(inference_rate, ratios["inference"])),
        ("peak RSS, training", *both(rss("training_rss_mib"))),
        ("peak RSS, inference", *both(rss("inference_rss_mib"))),
    ]
    env, recipe = report["environment"], report["recipe"]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    threads = plural(report["config"]["threads"], "thread")
    lines.append(f"\n{env['cpu']}, {threads}, {env['blas']}; Python {env['python']}, "
                 f"NumPy {env['numpy']}" + (f", PyTorch {env['torch']}" if env.get("torch") else "")
                 + f"; config: {recipe['name']}: {recipe['description']}, float32; {env['date']}; "
                 f"`{report['config']['command']}`")
    return "\n".join(lines)


def summarise_side(name: str, train_runs: list[dict], infer_runs: list[dict]) -> dict:
    """Per side: the median over workers of each worker's median epoch, inference rate and peak RSS."""
    epochs = [statistics.median(run["epoch_seconds"]) for run in train_runs]
    return {
        "name": name,
        "epoch_seconds": spread(epochs),
        "cpu_seconds_per_epoch": statistics.median([run["cpu_seconds_per_epoch"] for run in train_runs]),
        "workers": train_runs[0].get("workers"),  # the project's worker threads (PyTorch: None)
        "train_accuracy": [run["train_accuracy"] for run in train_runs],
        "inference_images_per_second": spread([run["images_per_second"] for run in infer_runs]),
        "training_rss_mib": max(run["peak_rss_mib"] for run in train_runs),
        "training_rss_after_data_mib": max(run["rss_after_data_mib"] for run in train_runs),
        "data_mib": train_runs[0]["data_mib"],
        "inference_rss_mib": max(run["peak_rss_mib"] for run in infer_runs),
    }


def augment_share(run: dict) -> float:
    """The share of a training worker's timed epochs that went into augmenting its batches."""
    return run["augment_seconds"] / sum(run["epoch_seconds"])


def describe_blas(setup: dict) -> str:
    if not setup["blas"]:
        return "BLAS unknown to threadpoolctl (pip install threadpoolctl); numpy.show_config() says:\n" \
               + setup["numpy_config"]
    return "; ".join(f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture', '?')}, "
                     f"{p.get('threading_layer', '?')}), {plural(int(p.get('num_threads', 0)), 'thread')}"
                     for p in setup["blas"])


def describe_environment(args: argparse.Namespace, recipe: dict, has_torch: bool) -> dict:
    """Print (and return) what the numbers depend on: machine, load, settings that slow BLAS down."""
    environment = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "cpus": available_cpus(),
                   "python": platform.python_version(), "platform": platform.platform(),
                   "slow_blas_variables": {v: os.environ[v] for v in SLOW_BLAS_VARIABLES if v in os.environ},
                   "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    print(f"numpy-cnn benchmark of {args.config or DEFAULT_RECIPE}: {args.images:,} synthetic 28x28 images, "
          f"{describe_recipe(recipe)}, float32, {plural(args.threads, 'thread')}, "
          f"{plural(args.repeats, 'repeat')} x {plural(args.epochs, 'epoch')}")
    if args.threads > 1:
        print(f"(the project trains on the worker threads `python src/main.py` would use, at most {args.threads}, "
              f"with one BLAS thread each; PyTorch and the GEMM bound use {plural(args.threads, 'thread')})")
    augment = recipe["data"]["augment"]
    if has_torch and (augment["shift"] or augment["rotate"]):
        print(f"PyTorch's augmentation: {TORCH_AUGMENTATION}")
    print(f"machine: {environment['cpu']}, {environment['cpus']} CPUs usable; {environment['platform']}; "
          f"Python {environment['python']}; {environment['date']}")
    for name, value in environment["slow_blas_variables"].items():
        print(f"WARNING: {name}={value} is set: it can make BLAS much slower. Rerun with "
              f"`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/benchmark.py ...`")
    if (environment["load_average_at_start"] or 0) > 0.5:
        print(f"note: the load average is {environment['load_average_at_start']:.1f}: other processes are using the "
              "CPU, so expect noisy numbers (the medians and the alternation soften that; on a shared machine "
              "--threads 1 is far steadier: threads that wait for each other stall when cores are taken)")
    if not has_torch:
        why = "hidden by --no-torch" if args.no_torch else "not installed (pip install torch)"
        print(f"PyTorch: {why}; reporting the project alone")
    return environment


def median_epoch(run: dict) -> float:
    return statistics.median(run["epoch_seconds"])


def measure(args: argparse.Namespace, recipe: dict, has_torch: bool) -> dict:
    """All the child processes, in order: setup, training pairs, inference pairs, one profiled epoch."""
    runs: dict[str, Any] = {"train": {"project": [], "torch": []}, "infer": {"project": [], "torch": []},
                            "load_averages": []}
    augmenting = bool(recipe["data"]["augment"]["shift"] or recipe["data"]["augment"]["rotate"])
    with tempfile.TemporaryDirectory(prefix="numpy-cnn-bench-") as folder:
        args.data = str(Path(folder) / "images.npz")
        print("\npreparing the images and timing the model's matrix multiplies ...", flush=True)
        runs["setup"] = call_worker(args, "setup")
        print(f"NumPy {runs['setup']['numpy']}, BLAS: {describe_blas(runs['setup'])}")
        where = f"{args.config}'s model.layers" if args.config else "config_schema.DEFAULT_CONFIG['model']"
        print(f"model ({where}):\n{runs['setup']['summary']}")
        runs["lower_bound"] = print_gemm_table(runs["setup"], args.images, recipe["training"]["batch_size"])

        print(f"\ntraining: {plural(args.repeats, 'repeat')}, each side in its own process"
              + (", alternating project / PyTorch" if has_torch else ""))
        header = f"{'repeat':>6}{'project s':>11}{'GEMMs s':>9}{'/ GEMMs':>9}"
        header += f"{'augment':>9}" if augmenting else ""
        header += (f"{'PyTorch s':>11}{'project/PyTorch':>17}" if has_torch else "") + f"{'load average':>14}"
        print(header + "\n" + "-" * len(header))
        train = runs["train"]
        for repeat in range(1, args.repeats + 1):
            train["project"].append(call_worker(args, "numpy"))
            project, bound = median_epoch(train["project"][-1]), train["project"][-1]["lower_bound_seconds"]
            line = f"{repeat:>6}{project:>11.3f}{bound:>9.3f}{project / bound:>9.2f}"
            line += f"{augment_share(train['project'][-1]):>9.1%}" if augmenting else ""
            if has_torch:
                train["torch"].append(call_worker(args, "torch"))
                ratio = project / median_epoch(train["torch"][-1])
                line += f"{median_epoch(train['torch'][-1]):>11.3f}{ratio:>17.2f}"
            runs["load_averages"].append(os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan)
            print(f"{line}{runs['load_averages'][-1]:>14.1f}", flush=True)
        if augmenting:
            print("(augment: the share of the project's epoch spent in data.augment's shift_and_rotate)")

        print(f"\ninference at batch {INFERENCE_BATCH}: {plural(args.repeats, 'repeat')} ...", flush=True)
        for _ in range(args.repeats):
            runs["infer"]["project"].append(call_worker(args, "numpy", "infer"))
            if has_torch:
                runs["infer"]["torch"].append(call_worker(args, "torch", "infer"))

        print("one more project epoch, profiled (profiling.instrument) ...", flush=True)
        runs["profile"] = call_worker(args, "numpy", "profile")["profile"]
    return runs


def recipe_record(args: argparse.Namespace, recipe: dict, has_torch: bool) -> dict:
    """What was trained, as --json records it."""
    training = recipe["training"]
    augment = recipe["data"]["augment"]
    return {
        "name": args.config or DEFAULT_RECIPE, "config_file": args.config, "description": describe_recipe(recipe),
        "layers": recipe["model"]["layers"], "seed": recipe["data"]["random_seed"], "augment": augment,
        "training": {key: training[key] for key in ("batch_size", "optimizer", "learning_rate", "momentum",
                                                    "weight_decay", "lr_schedule", "workers")},
        "schedule_epochs": schedule_epochs(recipe, args.epochs),
        "torch_optimizer": optimizer_name(training) if has_torch else None,
        "torch_augmentation": TORCH_AUGMENTATION if has_torch and (augment["shift"] or augment["rotate"]) else None,
    }


def build_report(args: argparse.Namespace, recipe: dict, environment: dict, runs: dict, has_torch: bool) -> dict:
    """Every number, as --json writes it."""
    setup, train, infer = runs["setup"], runs["train"], runs["infer"]
    environment.update(numpy=setup["numpy"], blas=describe_blas(setup))
    report: dict[str, Any] = {
        "config": {"images": args.images, "repeats": args.repeats, "epochs": args.epochs, "threads": args.threads,
                   "no_torch": args.no_torch, "command": " ".join(["python bench/benchmark.py", *sys.argv[1:]]),
                   "config_file": args.config, "batch_size": recipe["training"]["batch_size"],
                   "learning_rate": recipe["training"]["learning_rate"], "inference_batch": INFERENCE_BATCH},
        "recipe": recipe_record(args, recipe, has_torch),
        "environment": environment, "gemms": setup["gemms"], "lower_bound_seconds_at_start": runs["lower_bound"],
        "square_gemm_gflop_per_second": setup["peak_gflop_per_second"],
        "project": summarise_side("project", train["project"], infer["project"]), "profile": runs["profile"],
        "load_averages_after_each_repeat": runs["load_averages"],
    }
    report["lower_bound_ratio_at_start"] = report["project"]["epoch_seconds"]["median"] / runs["lower_bound"]
    report["lower_bound_paired_seconds"] = spread([run["lower_bound_seconds"] for run in train["project"]])
    report["lower_bound_paired_ratio"] = spread([median_epoch(run) / run["lower_bound_seconds"]
                                                 for run in train["project"]])
    augment = recipe["data"]["augment"]
    report["augmentation"] = {
        "on": bool(augment["shift"] or augment["rotate"]), "shift": augment["shift"], "rotate": augment["rotate"],
        "seconds_per_epoch": {"project": spread([run["augment_seconds"] / len(run["epoch_seconds"])
                                                 for run in train["project"]])},
        "share_of_epoch": {"project": spread([augment_share(run) for run in train["project"]])},
    }
    if has_torch:
        first = train["torch"][0]
        environment.update(torch=first["torch"], torch_threads=first["torch_threads"],
                           torch_backend=first["torch_backend"])
        report["torch"] = summarise_side("torch", train["torch"], infer["torch"])
        report["epoch_ratio"] = spread([median_epoch(a) / median_epoch(b)
                                        for a, b in zip(train["project"], train["torch"])])
        report["inference_ratio"] = (report["project"]["inference_images_per_second"]["median"]
                                     / report["torch"]["inference_images_per_second"]["median"])
        report["augmentation"]["seconds_per_epoch"]["torch"] = spread(
            [run["augment_seconds"] / len(run["epoch_seconds"]) for run in train["torch"]])
        report["augmentation"]["share_of_epoch"]["torch"] = spread([augment_share(run) for run in train["torch"]])
        report["augmentation"]["torch_method"] = report["recipe"]["torch_augmentation"]
    report["targets"] = check_targets(report)
    report["markdown"] = markdown_summary(report)
    return report


def check_targets(report: dict) -> list[dict]:
    """The benchmark's targets, each PASS, MISS or n/a (without PyTorch; without augmentation; and, for a config
    file, the targets set for the default model alone)."""
    project, has_torch = report["project"], "torch" in report
    default_model = report["config"]["config_file"] is None
    epoch_ratio = report["epoch_ratio"]["median"] if has_torch else None
    bound_ratio = report["lower_bound_paired_ratio"]["median"]
    goal = "" if epoch_ratio is None or epoch_ratio >= TARGETS["epoch_ratio_goal"] else " (goal met)"
    augmentation = report["augmentation"]
    share = augmentation["share_of_epoch"]["project"]["median"]
    only_default = "" if default_model else " (default model's)"

    def if_default(ok: bool | None) -> bool | None:
        return ok if default_model else None

    checks = [
        (f"epoch time project / PyTorch <= {TARGETS['epoch_ratio']} (goal < {TARGETS['epoch_ratio_goal']})",
         "-" if epoch_ratio is None else f"{epoch_ratio:.2f}{goal}",
         None if epoch_ratio is None else epoch_ratio <= TARGETS["epoch_ratio"]),
        (f"augmentation < {TARGETS['augment_share']:.0%} of a project epoch",
         f"{share:.1%}" if augmentation["on"] else "off",
         share < TARGETS["augment_share"] if augmentation["on"] else None),
        (f"project epoch / GEMM lower bound <= {TARGETS['lower_bound_ratio']}{only_default}",
         f"{bound_ratio:.3f}", if_default(bound_ratio <= TARGETS["lower_bound_ratio"])),  # 3 decimals: 2.501 misses
        (f"inference images/s >= PyTorch's{only_default}",
         f"{report['inference_ratio']:.2f}x" if has_torch else "-",
         if_default(report["inference_ratio"] >= 1.0) if has_torch else None),
        (f"training peak RSS < {TARGETS['training_rss_mib']:.0f} MiB{only_default}",
         f"{project['training_rss_mib']:.0f} MiB",
         if_default(project["training_rss_mib"] < TARGETS["training_rss_mib"])),
    ]
    return [{"target": text, "value": value, "result": verdict(ok)} for text, value, ok in checks]


def print_results(report: dict) -> None:
    n, project, threads = report["config"]["images"], report["project"], report["config"]["threads"]
    print(f"\nWhere the project's time goes (one profiled epoch of {n:,} images, training batches only):"
          f"\n{report['profile']}")
    print(f"\nResults for {report['recipe']['name']}: {report['recipe']['description']}")
    sides = [("project", project)] + ([("PyTorch", report["torch"])] if "torch" in report else [])
    for name, side in sides:
        e, i = side["epoch_seconds"], side["inference_images_per_second"]
        trained_on = f" on {plural(side['workers'], 'worker thread')}" if side.get("workers") else ""
        print(f"{name:<8} epoch median {e['median']:.3f} s (min {e['min']:.3f} - max {e['max']:.3f}){trained_on}, "
              f"{n / e['median']:,.0f} images/s, train accuracy {statistics.median(side['train_accuracy']):.1%}\n"
              f"{'':<8} CPU time {side['cpu_seconds_per_epoch']:.2f} s per epoch "
              f"({side['cpu_seconds_per_epoch'] / (threads * e['median']):.0%} of {plural(threads, 'thread')} "
              "x epoch time)\n"
              f"{'':<8} inference {i['median']:,.0f} images/s (min {i['min']:,.0f} - max {i['max']:,.0f})\n"
              f"{'':<8} peak RSS: training {side['training_rss_mib']:.0f} MiB (imports + data "
              f"{side['training_rss_after_data_mib']:.0f}, of which data {side['data_mib']:.0f}), "
              f"inference {side['inference_rss_mib']:.0f} MiB")
    augmentation = report["augmentation"]
    if augmentation["on"]:
        for key, name in (("project", "project"), ("torch", "PyTorch")):
            if key in augmentation["share_of_epoch"]:
                share, seconds = augmentation["share_of_epoch"][key], augmentation["seconds_per_epoch"][key]
                print(f"augmentation, {name}: {seconds['median']:.3f} s per epoch, {share['median']:.1%} of the "
                      f"epoch (repeats: {', '.join(f'{v:.1%}' for v in share['all'])})")
        if "torch_method" in augmentation:
            print(f"(PyTorch's augmentation: {augmentation['torch_method']})")
    else:
        print("augmentation: off in this config (data.augment)")
    if "torch" in report:
        r = report["epoch_ratio"]
        print(f"epoch time project / PyTorch, pair by pair: {', '.join(f'{v:.2f}' for v in r['all'])}; "
              f"median {r['median']:.2f}")
        print(f"inference images/s project / PyTorch: {report['inference_ratio']:.2f}")
    env = report["environment"]
    if "torch" in report:
        print(f"PyTorch {env['torch']}: {plural(int(env['torch_threads']), 'thread')}, {env['torch_backend']}; "
              f"optimiser {report['recipe']['torch_optimizer']}")
    bound = report["lower_bound_paired_ratio"]
    print(f"project epoch / GEMM lower bound timed in the same process right after it, repeat by repeat: "
          f"{', '.join(f'{v:.2f}' for v in bound['all'])}; median {bound['median']:.2f}")
    print(f"(against the bound timed before all repeats, {report['lower_bound_seconds_at_start']:.2f} s: "
          f"{project['epoch_seconds']['median']:.2f} s / {report['lower_bound_seconds_at_start']:.2f} s = "
          f"{report['lower_bound_ratio_at_start']:.2f})")

    print(f"\nTargets\n{'target':<62}{'value':>18}  result\n" + "-" * 88)
    for row in report["targets"]:
        print(f"{row['target']:<62}{row['value']:>18}  {row['result']}")
    if project["data_mib"] > 0.5 * TARGETS["training_rss_mib"]:
        print(f"(note: the {n:,} training images alone take {project['data_mib']:.0f} MiB as float32)")
    print(f"\nSummary (Markdown)\n\n{report['markdown']}")


def run_benchmark(args: argparse.Namespace, recipe: dict) -> int:
    has_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    environment = describe_environment(args, recipe, has_torch)
    runs = measure(args, recipe, has_torch)
    report = build_report(args, recipe, environment, runs, has_torch)
    print_results(report)
    if args.json:
        import_main()  # puts src/ on the path
        from plumbing import write_atomic

        write_atomic(Path(args.json), lambda f: f.write(json.dumps(report, indent=2) + "\n"), binary=False)
        print(f"\nall numbers written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time training epochs and inference of a numpy-cnn model (the default one, or a config file's "
                    "recipe) against the same network in PyTorch (if installed) on the same CPU, and against the "
                    "GEMM lower bound. Run from the project root.",
        epilog="Examples: python bench/benchmark.py --images 60000 --repeats 3 --json bench.json; "
               "python bench/benchmark.py --config configs/mnist_best.yaml")
    parser.add_argument("--config", metavar="FILE", help="benchmark this config's network, batch size, optimiser, "
                        "learning-rate schedule and augmentation (default: the built-in defaults)")
    parser.add_argument("--images", type=int, default=5000, help="training images per epoch (default 5000; "
                        "60000 for a full MNIST-sized epoch)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per side, alternating (default 5)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per measurement (default 1)")
    parser.add_argument("--threads", type=int, default=available_cpus(),
                        help="threads, the same on both sides: PyTorch's, and the project's worker threads "
                             f"(one BLAS thread each) (default: all usable CPUs, here {available_cpus()})")
    parser.add_argument("--no-torch", action="store_true", help="ignore PyTorch even if it is installed")
    parser.add_argument("--json", metavar="FILE", help="write every number to FILE")
    # Internal: the parent runs this script again as a worker that measures one thing and prints one JSON line.
    parser.add_argument("--worker", choices=("setup", "numpy", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--task", choices=("train", "infer", "profile"), default="train", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("images", "repeats", "epochs", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.worker:
        run_worker(args)
        return 0
    import_main()  # puts src/ on the path
    from errors import CNNError
    from plumbing import check_writable

    try:  # minutes of measuring should not end in an unwritable --json path or a config that cannot run
        check_writable(args.json, "--json")
        recipe = load_recipe(args.config)
    except CNNError as error:
        parser.error(str(error))
    return run_benchmark(args, recipe)


if __name__ == "__main__":
    sys.exit(main())
