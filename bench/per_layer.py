"""Where does each side's time go? Layer by layer, forward and backward, numpy-cnn against PyTorch on the same
network, batch and thread count, and the memory each NumPy layer allocates per batch.

Run from the project root:

    python bench/per_layer.py                                  # the default network, batch 32, one thread
    python bench/per_layer.py --config configs/mnist_best.yaml # a recipe's network, batch size and optimiser
    python bench/per_layer.py --batch 16 --threads 1           # what each of two worker threads runs
    python bench/per_layer.py --json layers.json               # also write every number to a file

What is measured, per layer and direction, in milliseconds per batch:
- numpy-cnn: the layer's own forward(x, training=True) and backward(grad_out), timed with time.perf_counter around
  each call, layer after layer as main.Sequential runs them; then the optimiser's step.
- PyTorch: the twin network of bench/benchmark.py (same weights), run stage by stage so that each module's
  backward is its own call: every module's input is a leaf tensor, forward under
  torch.profiler.record_function("<layer> forward"), backward as torch.autograd.backward(output, grad) under
  "<layer> backward"; then zero_grad and the optimiser's step. The times are the torch.profiler's CPU totals of
  those labels (each includes its ATen operators). The profiler adds a few microseconds per operator, which makes
  PyTorch's small layers look slower than they run outside it. (PyTorch's profiler prints a line on stderr at
  each start and stop; they cannot be switched off.)
- The two sides alternate, ROUND_BATCHES batches each per round, and each figure is the median over the rounds
  of the mean per batch; the spread of the whole step is printed under the table.
- Memory, NumPy side, in a separate pass with tracemalloc on (it slows every allocation): for each layer and
  direction the peak of the bytes allocated during the call above what was allocated before it ("peak"), and what
  the call leaves allocated (its output plus what the layer keeps for backward, "kept"). NumPy reports its array
  buffers to tracemalloc, so these are the arrays' bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark

main = benchmark.import_main()
import datafiles  # noqa: E402

ROUND_BATCHES = 5  # batches per side per round
SEED = 42


def step_names(model: Any) -> list[str]:
    """The layers' names (conv2d_1, ...), then the loss and the optimiser step."""
    return [*model.names, "loss", "optimizer step"]


def synthetic_batches(n_batches: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """n_batches batches of synthetic 28x28 digits: images (n_batches, batch, 28, 28, 1) float32 in [0, 1], labels."""
    images, labels = datafiles.make_synthetic(n_batches * batch_size, np.random.default_rng(SEED))
    x = (images.astype(np.float32) / 255)[..., None]
    return x.reshape(n_batches, batch_size, 28, 28, 1), labels.astype(np.int64).reshape(n_batches, batch_size)


def numpy_step(model: Any, optimizer: Any, x: np.ndarray, labels: np.ndarray, seconds: dict) -> None:
    """One training step of the project's model, layer by layer, adding each call's seconds to seconds[(name,
    direction)]."""
    loss = main.SoftmaxCrossEntropy()
    for name, layer in zip(model.names, model.layers):
        start = time.perf_counter()
        x = layer.forward(x, training=True)
        seconds[name, "forward"] += time.perf_counter() - start
    start = time.perf_counter()
    loss.forward(x, labels)
    grad = loss.backward()
    seconds["loss", "forward"] += time.perf_counter() - start
    for name, layer in zip(model.names[::-1], model.layers[::-1]):
        start = time.perf_counter()
        grad = layer.backward(grad)
        seconds[name, "backward"] += time.perf_counter() - start
    start = time.perf_counter()
    optimizer.step(model)
    seconds["optimizer step", "backward"] += time.perf_counter() - start


def torch_step(twin: Any, optimizer: Any, names: list[str], x: Any, labels: Any) -> None:
    """One training step of the PyTorch twin, stage by stage, each call under its record_function label."""
    import torch
    from torch.autograd.profiler import record_function

    stages = []
    for name, module in zip(names, twin):
        with record_function(f"{name} forward"):
            out = module(x)
        stages.append((name, x, out))
        x = out.detach().requires_grad_()
    with record_function("loss forward"):
        loss = torch.nn.functional.cross_entropy(x, labels)
        loss.backward()
    grad = x.grad
    for index, (name, inputs, out) in enumerate(stages[::-1]):
        with record_function(f"{name} backward"):
            torch.autograd.backward(out, grad)
        grad = inputs.grad if index < len(stages) - 1 else None
    with record_function("optimizer step backward"):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def torch_round(twin: Any, optimizer: Any, names: list[str], batches: list[tuple[Any, Any]]) -> dict:
    """Seconds per (name, direction), summed over the batches, from torch.profiler's CPU totals."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for x, labels in batches:
            torch_step(twin, optimizer, names, x.requires_grad_(False), labels)
    seconds = {}
    for event in profiler.key_averages():
        if event.key.endswith((" forward", " backward")):
            name, direction = event.key.rsplit(" ", 1)
            seconds[name, direction] = event.cpu_time_total / 1e6
    return seconds


def numpy_memory(model: Any, optimizer: Any, x: np.ndarray, labels: np.ndarray) -> dict:
    """For one training step: per (name, direction), the peak bytes allocated during the call above those
    allocated before it, and the bytes it leaves allocated (tracemalloc)."""
    memory: dict[tuple[str, str], dict[str, int]] = {}

    @contextlib.contextmanager
    def traced(name: str, direction: str) -> Any:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        yield
        current, peak = tracemalloc.get_traced_memory()
        memory[name, direction] = {"peak": peak - before, "kept": current - before}

    loss = main.SoftmaxCrossEntropy()
    tracemalloc.start()
    try:
        for name, layer in zip(model.names, model.layers):
            with traced(name, "forward"):
                x = layer.forward(x, training=True)
        with traced("loss", "forward"):
            loss.forward(x, labels)
            grad = loss.backward()
        for name, layer in zip(model.names[::-1], model.layers[::-1]):
            with traced(name, "backward"):
                grad = layer.backward(grad)
        with traced("optimizer step", "backward"):
            optimizer.step(model)
    finally:
        tracemalloc.stop()
    return memory


def measure(args: argparse.Namespace) -> dict:
    recipe = benchmark.load_recipe(args.config)
    batch_size = args.batch or recipe["training"]["batch_size"]
    n_batches = ROUND_BATCHES * (args.rounds + 1)  # one round of warm-up
    images, labels = synthetic_batches(n_batches, batch_size)
    model = benchmark.project_run(recipe, n_batches * batch_size, 1).model
    optimizer = main.make_optimizer(recipe["training"])
    names = step_names(model)
    has_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    limit = benchmark.limit_blas_threads(args.threads)
    if has_torch:
        import torch

        from torch_twin import torch_optimizer, torch_twin

        torch.set_num_threads(args.threads)
        torch.manual_seed(SEED)
        twin, _ = torch_twin(model)
        twin.train()
        optimizer_of_twin, _ = torch_optimizer(twin, recipe["training"])
        torch_batches = [(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y))
                         for x, y in zip(images, labels)]
    rounds: dict[str, list[dict]] = {"numpy": [], "torch": []}
    for round_number in range(args.rounds + 1):
        batch_numbers = range(round_number * ROUND_BATCHES, (round_number + 1) * ROUND_BATCHES)
        seconds = {(name, direction): 0.0 for name in names for direction in ("forward", "backward")}
        for index in batch_numbers:
            numpy_step(model, optimizer, images[index], labels[index], seconds)
        if round_number:  # round 0 warms up: first calls allocate, start threads, build PyTorch's kernels
            rounds["numpy"].append(seconds)
        if has_torch:
            seconds = torch_round(twin, optimizer_of_twin, model.names, [torch_batches[i] for i in batch_numbers])
            if round_number:
                rounds["torch"].append(seconds)
    memory = numpy_memory(model, optimizer, images[0], labels[0])
    del limit
    sides = ["numpy"] + (["torch"] if has_torch else [])
    rows = []
    for name in names:
        row: dict[str, Any] = {"layer": name}
        for side in sides:
            for direction in ("forward", "backward"):
                per_batch = [r.get((name, direction), 0.0) / ROUND_BATCHES * 1e3 for r in rounds[side]]
                row[f"{side}_{direction}_ms"] = statistics.median(per_batch)
        for direction in ("forward", "backward"):
            used = memory.get((name, direction), {"peak": 0, "kept": 0})
            row[f"numpy_{direction}_peak_bytes"], row[f"numpy_{direction}_kept_bytes"] = used["peak"], used["kept"]
        rows.append(row)
    totals = {side: [sum(r.values()) / ROUND_BATCHES * 1e3 for r in rounds[side]] for side in sides}
    return {"config": args.config or benchmark.DEFAULT_RECIPE, "batch_size": batch_size, "threads": args.threads,
            "rounds": args.rounds, "batches_per_round": ROUND_BATCHES, "cpu": benchmark.cpu_model(),
            "numpy": np.__version__, "torch": torch.__version__ if has_torch else None, "rows": rows,
            "step_ms": {side: benchmark.spread(values) for side, values in totals.items()}}


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f}"


def table(report: dict) -> str:
    """The per-layer table as Markdown."""
    has_torch = report["torch"] is not None
    header = "| layer | NumPy fwd ms | NumPy bwd ms |"
    header += " PyTorch fwd ms | PyTorch bwd ms | NumPy / PyTorch |" if has_torch else ""
    header += " NumPy fwd peak / kept MiB | NumPy bwd peak / kept MiB |"
    lines = [header, "|---" + "|---:" * (header.count("|") - 2) + "|"]
    for row in report["rows"]:
        line = f"| {row['layer']} | {row['numpy_forward_ms']:.3f} | {row['numpy_backward_ms']:.3f} |"
        if has_torch:
            numpy_total = row["numpy_forward_ms"] + row["numpy_backward_ms"]
            torch_total = row["torch_forward_ms"] + row["torch_backward_ms"]
            ratio = f"{numpy_total / torch_total:.2f}" if torch_total > 0 else "-"
            line += f" {row['torch_forward_ms']:.3f} | {row['torch_backward_ms']:.3f} | {ratio} |"
        line += (f" {mib(row['numpy_forward_peak_bytes'])} / {mib(row['numpy_forward_kept_bytes'])} |"
                 f" {mib(row['numpy_backward_peak_bytes'])} / {mib(row['numpy_backward_kept_bytes'])} |")
        lines.append(line)
    totals = {key: sum(row[key] for row in report["rows"]) for key in report["rows"][0] if key != "layer"}
    line = f"| **step** | {totals['numpy_forward_ms']:.3f} | {totals['numpy_backward_ms']:.3f} |"
    if has_torch:
        ratio = ((totals["numpy_forward_ms"] + totals["numpy_backward_ms"])
                 / (totals["torch_forward_ms"] + totals["torch_backward_ms"]))
        line += f" {totals['torch_forward_ms']:.3f} | {totals['torch_backward_ms']:.3f} | {ratio:.2f} |"
    line += (f" {mib(totals['numpy_forward_peak_bytes'])} (sum of peaks) | "
             f"{mib(totals['numpy_backward_peak_bytes'])} (sum of peaks) |")
    return "\n".join([*lines, line])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Per-layer forward and backward times, numpy-cnn against PyTorch "
                                     "(torch.profiler) on the same network and batch, and the bytes each NumPy "
                                     "layer allocates per batch. Run from the project root.")
    parser.add_argument("--config", metavar="FILE", help="a config's network, batch size and optimiser "
                        "(default: the built-in defaults)")
    parser.add_argument("--batch", type=int, help="batch size (default: the config's)")
    parser.add_argument("--threads", type=int, default=1, help="threads on both sides (default 1: what each "
                        "worker thread of training runs on)")
    parser.add_argument("--rounds", type=int, default=10, help=f"alternating rounds of {ROUND_BATCHES} batches "
                        "per side (default 10)")
    parser.add_argument("--no-torch", action="store_true", help="the NumPy side alone")
    parser.add_argument("--json", metavar="FILE", help="write every number to FILE")
    return parser


def main_cli(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("batch", "threads", "rounds"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    from errors import CNNError
    from plumbing import check_writable, write_atomic

    try:
        check_writable(args.json, "--json")
        benchmark.load_recipe(args.config)
    except CNNError as error:
        parser.error(str(error))
    report = measure(args)
    print(f"per layer, {report['config']}: batch {report['batch_size']}, {benchmark.plural(args.threads, 'thread')} "
          f"on each side, median of {args.rounds} alternating rounds of {ROUND_BATCHES} batches; CPU {report['cpu']}"
          f"; NumPy {report['numpy']}" + (f", PyTorch {report['torch']}" if report["torch"] else "") + "\n")
    print(table(report))
    for side, name in (("numpy", "NumPy"), ("torch", "PyTorch")):
        if side in report["step_ms"]:
            step = report["step_ms"][side]
            print(f"\n{name} step: median {step['median']:.2f} ms per batch (rounds {step['min']:.2f}-"
                  f"{step['max']:.2f})", end="")
    print()
    if args.json:
        write_atomic(Path(args.json), lambda f: f.write(json.dumps(report, indent=2) + "\n"), binary=False)
        print(f"all numbers written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
