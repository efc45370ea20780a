"""Train a config's network with PyTorch, on one process or many (torchrun, DistributedDataParallel), and write
a .pt that `python src/main.py --load-model FILE.pt` reads back.

    torchrun --nproc-per-node 2 tools/train_torch.py --config configs/fashion.yaml --save-model fashion.pt
    python tools/train_torch.py --config configs/mnist_best.yaml --data-path DIR --epochs 3 --save-model m.pt
    python src/main.py --load-model fashion.pt --predict shirt.png      # the model, back in numpy-cnn

It takes the flags of src/main.py that describe training (--config, --epochs, --batch-size, --learning-rate,
--optimizer, --n-train, --n-test, --seed, --dataset, --data-path, --no-fallback, --output, --save-model) and
trains what they describe, as `python src/main.py` would:
- the same data (main.load_data: the same images, split and seed) and the same initial weights (main.build_model
  with the seed's generator, copied into the PyTorch twin, src/torch_twin.py);
- the same batch: each of the W processes takes 1/W of every batch of training.batch_size images, drawn in the
  order that every process draws from the same seed, and DistributedDataParallel averages the gradients, so a
  step is the step of the whole batch;
- BatchNorm, unlike the NumPy run (and as plain DistributedDataParallel does), normalises over each process's
  slice of the batch; its running statistics are process 0's, which DDP hands to the others before each step;
- the same optimiser and learning-rate schedule (torch_twin.torch_optimizer, torch_twin.torch_schedule, stepped
  after every batch) and the same augmentation (main.shift_and_rotate on each process's slice);
- the same results file (--output: the config, data, per-epoch history, test accuracy and loss, files).

Backend: NCCL when every process has a GPU, else gloo (CPU). Run without torchrun, it is one process. Process 0
scores each epoch on the test set (or validation set) and writes the files; every process logs its own loss.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import main
import plumbing
from errors import CNNError
from modelfile import data_summary

# The flags of src/main.py that this trainer understands; any other is refused.
FLAGS = {"config", "output", "epochs", "batch_size", "learning_rate", "optimizer", "n_train", "n_test", "seed",
         "dataset", "data_path", "no_fallback", "log_level", "save_model"}


def parse(argv: list[str]) -> Any:
    """main's arguments; ConfigError for a flag this trainer does not take or a --save-model that is not .pt."""
    args = main.build_parser().parse_args(argv)
    defaults = vars(main.build_parser().parse_args([]))
    for flag, value in vars(args).items():
        if flag not in FLAGS and value != defaults[flag]:
            raise CNNError(f"--{flag.replace('_', '-')}: not a flag of tools/train_torch.py (it takes "
                           + ", ".join(f"--{name.replace('_', '-')}" for name in sorted(FLAGS)) + ")")
    if args.save_model and Path(args.save_model).suffix.lower() != ".pt":
        raise CNNError(f"--save-model {args.save_model}: tools/train_torch.py writes a PyTorch .pt file")
    return args


def evaluate(twin: Any, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the twin in evaluation mode on NHWC images x."""
    import torch
    from torch.nn import functional

    twin.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            images = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size].transpose(0, 3, 1, 2)))
            labels = torch.from_numpy(y[start:start + batch_size])
            logits = twin(images)
            total += float(functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
    twin.train()
    return total / max(len(x), 1), correct / max(len(x), 1)


def train(args: Any) -> int:
    """The whole run for the parsed arguments (parse); returns the exit code."""
    import torch
    import torch.distributed as dist
    from torch.nn import functional
    from torch.nn.parallel import DistributedDataParallel

    from torch_twin import copy_from_state_dict, decay_by_hand, save_pt, torch_optimizer, torch_schedule, torch_twin

    cfg, origin = main.resolve_config(args)
    plumbing.setup_logging(cfg["logging"])
    distributed = "RANK" in os.environ
    backend = "nccl" if distributed and torch.cuda.is_available() else "gloo"
    if distributed:
        dist.init_process_group(backend)
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    training, seed, augment_cfg = cfg["training"], cfg["data"]["random_seed"], cfg["data"]["augment"]
    torch.manual_seed(seed + rank)  # Dropout masks differ per process, as they differ per image
    if rank == 0:
        plumbing.check_writable(args.output, "--output")
        plumbing.check_writable(args.save_model, "--save-model")
    rngs = main.make_rngs(seed)
    augment_rng = np.random.default_rng([seed, rank])
    data = main.load_data(cfg["data"])
    model = main.build_model(cfg["model"], data.input_shape, data.num_classes, rngs["init"], rngs["dropout"])
    twin = torch_twin(model)[0].to(device)
    net = DistributedDataParallel(twin) if distributed else twin
    optimizer, decayed_by_hand = torch_optimizer(twin, training)
    batch_size, epochs, n_train = training["batch_size"], training["epochs"], len(data.x_train)
    steps_per_epoch = math.ceil(n_train / batch_size)
    scheduler = torch_schedule(optimizer, training["lr_schedule"], training["learning_rate"], steps_per_epoch,
                               steps_per_epoch * epochs)
    x_scored, y_scored, scored_on = ((data.x_val, data.y_val, "val") if len(data.x_val)
                                     else (data.x_test, data.y_test, "test"))
    print(f"process {rank} of {world} ({backend}, {device}): {n_train} training images, batch {batch_size} "
          f"({batch_size // world} or so per process), {epochs} epochs", flush=True)
    history, started_at, start = [], time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_start, total_loss, seen, correct = time.perf_counter(), 0.0, 0, 0
        epoch_lr = optimizer.param_groups[0]["lr"]
        order = rngs["shuffle"].permutation(n_train)  # the same on every process: the same seed
        for first in range(0, n_train, batch_size):
            if min(batch_size, n_train - first) < world:  # a last batch too small to give every process an image
                continue
            mine = np.array_split(order[first:first + batch_size], world)[rank]
            x, labels = data.x_train[mine], data.y_train[mine]
            if augment_cfg["shift"] or augment_cfg["rotate"]:
                x = main.shift_and_rotate(x, augment_rng, augment_cfg["shift"], augment_cfg["rotate"])
            images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
            target = torch.from_numpy(labels).to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = net(images)
            loss = functional.cross_entropy(logits, target)
            loss.backward()
            decay_by_hand(optimizer, decayed_by_hand, training["weight_decay"])  # SGD's decoupled decay
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total_loss += float(loss.detach()) * len(labels)
            seen += len(labels)
            correct += int((logits.argmax(dim=1) == target).sum())
        row = {"epoch": epoch, "learning_rate": epoch_lr, "train_loss": total_loss / seen,
               "train_accuracy": correct / seen, "seconds": round(time.perf_counter() - epoch_start, 3)}
        if rank == 0:
            row[f"{scored_on}_loss"], row[f"{scored_on}_accuracy"] = evaluate(twin, x_scored, y_scored)
        history.append(row)
        scored = (f"  {scored_on} loss {row[f'{scored_on}_loss']:.4f} acc {100 * row[f'{scored_on}_accuracy']:.2f}%"
                  if rank == 0 else "")
        print(f"process {rank}: epoch {epoch}/{epochs}  lr {epoch_lr:.3g}  train loss {row['train_loss']:.4f} "
              f"acc {100 * row['train_accuracy']:.2f}%{scored}  {row['seconds']:.1f}s", flush=True)
    if distributed:
        dist.barrier()
    if rank == 0:
        copy_from_state_dict(model, {key: value.cpu() for key, value in twin.state_dict().items()}, "the twin")
        test_loss, test_accuracy = model.evaluate(data.x_test, data.y_test, main.EVAL_BATCH_SIZE)
        print(f"test accuracy {100 * test_accuracy:.2f}%, test loss {test_loss:.4f}, training took "
              f"{time.perf_counter() - start:.1f}s on {world} process{'es' if world > 1 else ''} ({backend})",
              flush=True)
        summary = {"epochs_completed": epochs, "test_accuracy": test_accuracy, "test_loss": test_loss,
                   "status": "completed", "stopped_at": None, "seed": seed, "history": history,
                   "saved_at": started_at, "workers": world, "trained_with": f"PyTorch DDP ({backend})"}
        files = {}
        if args.save_model:
            meta = {"version": 2, "model": cfg["model"], "input_shape": list(model.input_shape),
                    "class_names": data.class_names, "dataset": data.name, "data": data_summary(data),
                    "training": summary}
            save_pt(Path(args.save_model), model, meta, plumbing.write_atomic)
            files["model"] = args.save_model
            print(f"saved the model to {args.save_model}", flush=True)
        if args.output:
            files["results"] = args.output
            document = {"status": "completed", "started_at": started_at, "config": cfg,
                        "data": dict(data_summary(data), input_shape=list(data.input_shape),
                                     class_names=data.class_names),
                        "model": {"summary": model.summary_rows(), "parameters": model.parameter_count()},
                        "history": history, "epochs_completed": epochs, "test_accuracy": test_accuracy,
                        "test_loss": test_loss, "processes": world, "backend": backend,
                        "train_seconds": round(time.perf_counter() - start, 3), "files": files,
                        "config_from": origin["config"], "versions": plumbing.versions()}
            plumbing.write_json(args.output, document)
    if distributed:
        dist.destroy_process_group()
    return 0


def run(argv: list[str]) -> int:
    """train(argv) with the command line's error handling: one line and exit code 2 for bad input."""
    try:
        return train(parse(argv))
    except CNNError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (SIGINT): stopped", file=sys.stderr)
        return 130
    finally:
        plumbing.close_logging()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
