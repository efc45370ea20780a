"""What does watching cost? Epoch times of `python src/main.py` without and with `--serve` (the live page), with
one urllib client reading the event stream throughout, as a page would.

Run from the project root:

    python bench/live_overhead.py                           # 3 pairs of runs, 2 epochs each, default model
    python bench/live_overhead.py --pairs 5 --epochs 3 --json live.json

Flags:
    --pairs P      runs per side, alternating without / with --serve (A B A B ...), default 3
    --epochs E     epochs per run (default 2)
    --n-train N    training images (default 4000; the test set is 1000)
    --data-path D  a folder of MNIST IDX files (default: the 5,000-digit sample beside the project, else the
                   synthetic digits)
    --config FILE  the config to run (default: config.yaml's model and training, logging to the console only)
    --json FILE    also write every number to FILE

Each run is the real command line in a fresh process, the same seed and workers on both sides, so the runs do the
same arithmetic (the weights come out bit-identical: tests/test_live.py). The figure is the median epoch time (the
results file's history "seconds": the training loop, scoring excluded) of each side, and the median of the whole
training time ("train_seconds"), which also holds the scoring; the page's epoch-end work runs beside the next
epoch, on a thread of lower priority. On a busy machine the spread of each side says how far to trust the
difference: it is printed next to the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "src" / "main.py"
SAMPLE = ROOT.parent / "shared" / "data" / "mnist-5k"


def read_stream(url: str, seen: list[str]) -> None:
    """One SSE client: read every line of /api/events until the stream ends (after `done`)."""
    with urllib.request.urlopen(url + "api/events", timeout=120) as response:
        for line in response:
            if line.startswith(b"event: "):
                seen.append(line[7:].decode().strip())


def run(config: Path, folder: Path, watched: bool) -> dict:
    """One run of the command line; with `watched`, --serve --port 0 and one stream reader until the end."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(MAIN), "--config", str(config), "--output", "results.json"]
    if not watched:
        subprocess.run(command, cwd=folder, check=True, capture_output=True, timeout=3600)
        return json.loads((folder / "results.json").read_text())
    process = subprocess.Popen([*command, "--serve", "--port", "0"], cwd=folder, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen: list[str] = []
    reader = None
    for line in process.stdout:
        if line.startswith("training done"):
            break
        found = re.search(r"serving the page at (http://\S+/)", line)
        if found:
            reader = threading.Thread(target=read_stream, args=(found.group(1), seen), daemon=True)
            reader.start()
    process.send_signal(signal.SIGINT)
    process.wait(60)
    if reader is not None:
        reader.join(10)
    document = json.loads((folder / "results.json").read_text())
    document["events_read"] = len(seen)
    return document


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--data-path", default=str(SAMPLE) if (SAMPLE / "train-images-idx3-ubyte.gz").is_file()
                        else None)
    parser.add_argument("--config", default=str(ROOT / "config.yaml"))
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    cfg["logging"] = {"level": "INFO", "file": None}
    cfg["data"].update({"n_train": args.n_train, "n_test": 1000, "dataset": "mnist" if args.data_path else "synthetic",
                        "path": args.data_path})
    cfg["training"]["epochs"] = args.epochs
    cfg.setdefault("output", {})["plot_dir"] = None
    sides: dict[str, list[dict]] = {"without --serve": [], "with --serve": []}
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "config.yaml"
        config.write_text(yaml.safe_dump(cfg))
        for pair in range(args.pairs):
            for name, watched in (("without --serve", False), ("with --serve", True)):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                document = run(config, Path(scratch) / f"{pair}-{watched}", watched)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                epochs = [row["seconds"] for row in document["history"]]
                sides[name].append({"epoch_seconds": epochs, "train_seconds": document["train_seconds"],
                                    "cpu_seconds": cpu, "events_read": document.get("events_read")})
                print(f"pair {pair + 1} {name:<16} epochs {', '.join(f'{s:.2f}' for s in epochs)} s, "
                      f"training {document['train_seconds']:.2f} s, process CPU {cpu:.2f} s"
                      + (f", {document['events_read']} events read" if watched else ""), flush=True)
    summary = {}
    for name, runs in sides.items():
        epochs = [s for run_ in runs for s in run_["epoch_seconds"]]
        trains = [run_["train_seconds"] for run_ in runs]
        cpus = [run_["cpu_seconds"] for run_ in runs]
        summary[name] = {"cpu_median": statistics.median(cpus), "cpu_min": min(cpus), "cpu_max": max(cpus),
                         "epoch_median": statistics.median(epochs), "epoch_min": min(epochs), "epoch_max": max(epochs),
                         "train_median": statistics.median(trains), "train_min": min(trains),
                         "train_max": max(trains)}
        print(f"{name:<16} epoch median {summary[name]['epoch_median']:.2f} s (spread {min(epochs):.2f}-"
              f"{max(epochs):.2f}), training median {summary[name]['train_median']:.2f} s "
              f"(spread {min(trains):.2f}-{max(trains):.2f}), process CPU median {statistics.median(cpus):.2f} s "
              f"(spread {min(cpus):.2f}-{max(cpus):.2f})")
    a, b = summary["without --serve"], summary["with --serve"]
    print(f"overhead: epoch {100 * (b['epoch_median'] / a['epoch_median'] - 1):+.1f}%, whole training "
          f"{100 * (b['train_median'] / a['train_median'] - 1):+.1f}%, process CPU "
          f"{100 * (b['cpu_median'] / a['cpu_median'] - 1):+.1f}% (medians of {args.pairs} alternating runs each)")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg, "runs": sides, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
