"""A noisy neighbour: run a command beside a process that competes for the machine, to see how a benchmark fares
on a constrained host (a laptop on battery, a shared CI runner, a busy server) on any machine.

Run from the project root:

    python bench/neighbour.py stream -- python bench/benchmark.py --images 2000
    python bench/neighbour.py busy -- python bench/benchmark.py --images 2000
    python bench/neighbour.py stream --seconds 60            # the neighbour alone, for 60 s

Conditions:
    stream  a process copying two STREAM_MIB MiB float64 arrays back and forth in a loop: it streams memory at
            the rate one core can, far beyond every cache, so the command's memory traffic and last-level cache
            are shared with it (and it holds one core).
    busy    a process spinning in a pure-Python loop: one core taken, no memory traffic.

The neighbour starts first, runs until the command ends (or for --seconds without a command), and is never left
behind: it stops itself after --max-seconds whatever happens to this script. The command's exit code is this
script's; its output goes to this script's output.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

STREAM_MIB = 256  # each of the two arrays: far beyond any last-level cache
CONDITIONS = ("stream", "busy")


def stream(deadline: float) -> None:
    """Copy a to b and b to a until the deadline: 2 x STREAM_MIB MiB read and written per round."""
    import numpy as np

    a = np.ones(STREAM_MIB * 2**20 // 8)
    b = np.empty_like(a)
    while time.monotonic() < deadline:
        np.copyto(b, a)
        np.copyto(a, b)


def busy(deadline: float) -> None:
    """Spin on one core until the deadline."""
    count = 0
    while time.monotonic() < deadline:
        for _ in range(10_000):
            count += 1


def run_neighbour(condition: str, seconds: float) -> None:
    """The neighbour's own process: the condition's loop for `seconds`."""
    deadline = time.monotonic() + seconds
    (stream if condition == "stream" else busy)(deadline)


def start_neighbour(condition: str, max_seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--neighbour", condition,
                             "--seconds", str(max_seconds)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run a command (everything after --) beside a process that streams memory (stream) or keeps a "
                    "core busy (busy).",
        epilog="Example: python bench/neighbour.py stream -- python bench/benchmark.py --images 2000")
    parser.add_argument("condition", nargs="?", choices=CONDITIONS, help="what the neighbour does")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="without a command: how long the neighbour runs (default 60)")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="with a command: the neighbour stops after this long even if the command has not "
                             "ended (default 3600)")
    parser.add_argument("--neighbour", choices=CONDITIONS, help=argparse.SUPPRESS)  # the neighbour process itself
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = build_parser()
    args = parser.parse_args(argv[:len(argv) - len(command) - 1] if "--" in argv else argv)
    if args.neighbour:
        run_neighbour(args.neighbour, args.seconds)
        return 0
    if args.condition is None:
        parser.error("name a condition: stream or busy")
    if args.seconds <= 0 or args.max_seconds <= 0:
        parser.error("--seconds and --max-seconds must be positive")
    if not command:
        run_neighbour(args.condition, args.seconds)
        return 0
    neighbour = start_neighbour(args.condition, args.max_seconds)
    try:
        time.sleep(1.0)  # let it reach its loop (and allocate its arrays) before the command starts
        try:
            return subprocess.run(command).returncode
        except OSError as error:
            print(f"error: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        return 130
    finally:
        neighbour.send_signal(signal.SIGTERM)
        neighbour.wait()


if __name__ == "__main__":
    sys.exit(main())
