"""Training on worker threads: each batch split into one slice per CPU, one thread and one model replica each.

main.train uses DataParallel when training.workers (or default_workers) is above 1; the plain loop in
main.train shows the same step on one thread. A leaf module: it never imports main; the model and the loss
come in as arguments.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np

# A worker thread pays off only for a big slice of the batch. With small arrays NumPy's time goes to Python's
# own overhead, which holds the GIL, so threads wait for each other (bench/why_fast.py: "worker threads" and
# "8x8 digits"). The size of the largest activation of a slice tells the two cases apart.
MIN_ACTIVATION_PER_WORKER = 250_000


def blas_threads() -> int:
    """How many threads BLAS would use: every usable CPU, unless OPENBLAS_NUM_THREADS, OMP_NUM_THREADS,
    MKL_NUM_THREADS or a threadpoolctl limit says fewer."""
    from threadpoolctl import threadpool_info

    return max(min((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=1), 1)


def default_workers(model: Any = None, batch_size: int | None = None) -> int:
    """As many training threads as BLAS would use; given the model and the batch size, fewer, so that each
    worker's slice holds at least MIN_ACTIVATION_PER_WORKER values in its largest layer."""
    threads = blas_threads()
    if model is None or model.input_shape is None or batch_size is None:
        return threads
    largest = max(math.prod(row["output_shape"]) for row in model.summary_rows())
    return max(min(threads, batch_size * largest // MIN_ACTIVATION_PER_WORKER), 1)


@contextmanager
def one_blas_thread(model: Any) -> Iterator[Any]:
    """The model on the calling thread alone, BLAS held to one thread too, for as long as the with-block runs.

    Why: when training runs on one worker, a second BLAS thread gains little on these models' matrices on an
    idle machine, and on a machine whose other cores are busy, BLAS threads that wait for each other spin and
    stall: an epoch several times slower (bench/why_fast.py: "BLAS threads with one worker").
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a runtime requirement; without it, BLAS keeps its threads
        yield model
        return
    limit = threadpool_limits(limits=1, user_api="blas")
    try:
        yield model
    finally:
        limit.restore_original_limits()


def replicate(model: Any) -> Any:
    """A twin of the model that shares its weights (the very same arrays) but has its own gradients and its
    own saved activations and its own kept buffers (Layer.workspace), so that it can run another slice of the batch
    at the same time: a buffer shared by the twins would be overwritten by their threads."""
    layers = []
    for layer in model.layers:
        twin = copy.copy(layer)  # shallow: twin.params is the very dict of the very arrays of layer.params
        twin.grads = {name: np.zeros_like(grad) for name, grad in layer.grads.items()}
        twin.workspace = {}
        layers.append(twin)
    return type(model)(layers, model.input_shape)


class DataParallel:
    """A model spread over `workers` threads: forward and backward run each batch as one slice per thread,
    on one replica of the model per slice. It has the model's forward, backward and evaluate, so that
    main.train runs the same four lines of a training step with either.

    Why: NumPy does the elementwise work (im2col, col2im, ReLU, pooling) on one core; only the matrix
    multiplies spread over cores, through BLAS. A slice of the batch per thread keeps every core busy all
    the time: NumPy releases Python's GIL inside its loops, so the threads really do run at once. BLAS is
    held to one thread meanwhile, or its threads and the workers would fight over the cores
    (bench/why_fast.py: "worker threads").

    The gradient is the whole batch's: backward hands each replica its rows of dLoss/dlogits, which the loss
    computed over the whole batch, and the model's grads are the sum of the replicas'. Dropout masks are drawn
    for the whole batch in the calling thread, and BatchNorm layers combine the slices' sums (SliceSums), so
    the run computes what one pass over the whole batch computes. Use as `with DataParallel(model, workers) as
    net:`.
    """

    def __init__(self, model: Any, workers: int = 2) -> None:
        self.model, self.workers = model, max(workers, 1)
        self.replicas: list[Any] = []
        self.parts: list[slice] = []

    def __enter__(self) -> DataParallel:
        self.replicas = [replicate(self.model) for _ in range(self.workers)]
        for rank, replica in enumerate(self.replicas):
            for layer in replica.layers:
                if hasattr(layer, "batch_mean"):  # BatchNorm: statistics of the whole batch, from every slice
                    layer.__class__ = synchronised(type(layer))
                    layer.rank = rank
        self.slice_sums = SliceSums(1)
        from threadpoolctl import threadpool_limits

        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="worker")
        self.blas_limit = threadpool_limits(limits=1, user_api="blas")
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.pool.shutdown()  # first: a worker still running (after another one failed) keeps one BLAS thread
        finally:  # even when a second Ctrl-C interrupts the wait
            self.blas_limit.restore_original_limits()
        self.replicas = []

    def _map(self, function: Callable, *iterables: Iterable) -> list:
        """pool.map(function, *iterables), each call under the calling thread's np.errstate: NumPy keeps its
        error settings per thread, and a new thread starts from the defaults (which warn on overflow). A worker
        that fails breaks the SliceSums barrier, so that no other worker waits for it forever."""
        settings = np.geterr()

        def with_settings(*args: Any) -> Any:
            try:
                with np.errstate(**settings):
                    return function(*args)
            except BaseException:
                self.slice_sums.abort()
                raise
        futures = [self.pool.submit(with_settings, *args) for args in zip(*iterables)]
        wait(futures)
        errors = [future.exception() for future in futures if future.exception() is not None]
        if errors:  # the worker that failed first, rather than the others it woke
            raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        return [future.result() for future in futures]

    def _split(self, n: int) -> list[slice]:
        """`workers` contiguous slices of range(n), as equal as can be (empty ones dropped)."""
        bounds = [n * worker // self.workers for worker in range(self.workers + 1)]
        return [slice(start, stop) for start, stop in zip(bounds, bounds[1:]) if stop > start]

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """The logits (N, K) of the whole batch, each replica computing its slice's rows."""
        self.parts = self._split(len(x))
        if training:
            self._hand_out_dropout_masks(x)
        self._share_slice_sums(len(self.parts))
        replicas = self.replicas[:len(self.parts)]
        return np.concatenate(self._map(lambda replica, part: replica.forward(x[part], training),
                                        replicas, self.parts))

    def backward(self, grad_out: np.ndarray) -> None:
        """Each replica's backward from its rows of dLoss/dlogits; the model's grads become their sum."""
        replicas = self.replicas[:len(self.parts)]
        self._share_slice_sums(len(self.parts))
        self._map(lambda replica, part: replica.backward(grad_out[part]), replicas, self.parts)
        for layer, twins in zip(self.model.layers, zip(*(replica.layers for replica in replicas))):
            for name, grad in layer.grads.items():  # into the model's own arrays, which the optimiser reads
                grad[...] = twins[0].grads[name]
                for twin in twins[1:]:
                    grad += twin.grads[name]

    def _hand_out_dropout_masks(self, x: np.ndarray) -> None:
        """Draw each Dropout layer's mask for the whole batch here, and give every replica its slice of it."""
        shape = x.shape
        for index, layer in enumerate(self.model.layers):
            if hasattr(layer, "draw_mask"):
                mask = layer.draw_mask(shape, x.dtype)
                for replica, part in zip(self.replicas, self.parts):
                    replica.layers[index].next_mask = mask[part]
            shape = (shape[0], *layer.output_shape(shape[1:]))

    def _share_slice_sums(self, parties: int) -> None:
        """A fresh SliceSums for the workers of this pass, given to every replica's BatchNorm layers."""
        self.slice_sums = SliceSums(parties)
        for replica in self.replicas:
            for layer in replica.layers:
                if hasattr(layer, "rank"):
                    layer.slice_sums = self.slice_sums

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int) -> tuple[float, float]:
        """model.evaluate(x, y, batch_size), each worker taking a contiguous part of the set."""
        parts = self._split(len(x))
        results = self._map(lambda replica, part: replica.evaluate(x[part], y[part], batch_size),
                            self.replicas[:len(parts)], parts)
        sizes = [part.stop - part.start for part in parts]
        loss = sum(part_loss * size for (part_loss, _), size in zip(results, sizes)) / max(len(x), 1)
        correct = sum(round(accuracy * size) for (_, accuracy), size in zip(results, sizes))
        return loss, correct / max(len(x), 1)


class SliceSums:
    """Sums an array over the worker threads of one pass: each worker hands in its own part and waits until all
    have, then every worker reads the total. The parts are added in rank order, whichever thread arrives first,
    so that a run gives the same floats every time. The workers' BatchNorm layers call it in the same order (the
    layers run in the same order in every replica), so one SliceSums serves every layer of a pass."""

    def __init__(self, parties: int) -> None:
        self.parts: list[np.ndarray | None] = [None] * parties
        self.total: np.ndarray | None = None
        self.all_added = threading.Barrier(parties, action=self._add_up)  # the action runs once all have added
        self.all_read = threading.Barrier(parties, action=self._clear)  # and this one once all have read

    def _add_up(self) -> None:
        total = self.parts[0]
        for part in self.parts[1:]:
            total = total + part
        self.total = total

    def _clear(self) -> None:
        self.parts, self.total = [None] * len(self.parts), None

    def __call__(self, part: np.ndarray, rank: int = 0) -> np.ndarray:
        """The sum of every worker's part; `rank` is the caller's place in the sum (0, 1, ..., parties - 1)."""
        self.parts[rank] = part
        self.all_added.wait()
        total = self.total
        self.all_read.wait()
        return total

    def abort(self) -> None:
        """Wake every waiting worker with BrokenBarrierError (another worker failed)."""
        self.all_added.abort()
        self.all_read.abort()


_synchronised_classes: dict[type, type] = {}


def synchronised(cls: type) -> type:
    """A subclass of a BatchNorm class whose statistics are those of the whole batch: batch_mean averages over
    every worker's slice (through the layer's slice_sums), and only the replica of rank 0 moves the running
    statistics, which all replicas share. It keeps the class's name."""
    if cls not in _synchronised_classes:
        def batch_mean(self: Any, rows: np.ndarray) -> np.ndarray:
            column_sums_and_m = np.append(np.ones(len(rows), rows.dtype) @ rows, len(rows))
            sums = self.slice_sums(column_sums_and_m, self.rank)
            return (sums[:-1] / sums[-1]).astype(rows.dtype)

        def update_running_statistics(self: Any, mu: np.ndarray, var: np.ndarray, m: int) -> None:
            m_whole = int(self.slice_sums(np.array([m]), self.rank)[0])
            if self.rank == 0:
                cls.update_running_statistics(self, mu, var, m_whole)

        _synchronised_classes[cls] = type(cls.__name__, (cls,), {
            "batch_mean": batch_mean, "update_running_statistics": update_running_statistics,
            "__module__": cls.__module__})
    return _synchronised_classes[cls]
