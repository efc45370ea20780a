"""DataParallel: slices of each batch on worker threads must give the whole batch's loss and gradients,
leave BLAS as it found it, and train as well as one thread does."""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    BN_DROPOUT_NET,
    checked_model,
    classifier_head,
    model_section,
    run_cli,
    to_float64,
    write_config,
)
from threadpoolctl import threadpool_info, threadpool_limits

import config_schema
import main
import parallel
import profiling

SMALL_MODEL = model_section({"conv2d": {"filters": 4, "padding": 1}}, "relu", "maxpool2d",
                            {"conv2d": {"filters": 6, "padding": 1}}, "relu", "maxpool2d", *classifier_head(16))


def float64_model(seed: int = 0) -> main.Sequential:
    model = main.build_model(SMALL_MODEL, (12, 12, 1), 10, np.random.default_rng(seed))
    for layer in model.layers:
        to_float64(layer)
    return model


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def digits_data(n_train: int, n_test: int, brightness: float = 1.0) -> main.Dataset:
    """The first n_train + n_test of scikit-learn's 8x8 digits, as a Dataset in [0, brightness]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:n_train + n_test, :, :, None] / 16 * brightness).astype(np.float32)
    labels = digits.target[:n_train + n_test]
    return main.Dataset(images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], main.DIGIT_NAMES,
                        "digits", "test")


def forward_backward(net: Any, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """The first three lines of main.train's step: forward, loss, backward (net: a model or a DataParallel)."""
    loss_fn = main.SoftmaxCrossEntropy()
    logits = net.forward(x)
    loss = loss_fn.forward(logits, labels)
    net.backward(loss_fn.backward())
    return logits, loss


def whole_batch(model: main.Sequential, x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float, list]:
    logits, loss = forward_backward(model, x, labels)
    return logits, loss, [grad.copy() for layer in model.layers for grad in layer.grads.values()]


@pytest.mark.parametrize(("workers", "batch"), [(2, 32), (2, 7), (3, 10), (4, 5), (2, 1), (3, 2)])
def test_slices_on_threads_give_the_whole_batch_gradient(workers: int, batch: int) -> None:
    """float64: logits, mean loss and every weight gradient equal one pass over the whole batch (relative
    1e-12), for even and uneven slices, and for batches smaller than the number of workers."""
    rng = np.random.default_rng(workers * 100 + batch)
    x, labels = rng.random((batch, 12, 12, 1)), rng.integers(0, 10, batch)
    model = float64_model()
    expected_logits, expected_loss, expected_grads = whole_batch(model, x, labels)
    for layer in model.layers:  # stale gradients must be overwritten, not added to
        for grad in layer.grads.values():
            grad[...] = 1e6
    with parallel.DataParallel(model, workers) as net:
        logits, loss = forward_backward(net, x, labels)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-12, atol=1e-14)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    grads = [grad for layer in model.layers for grad in layer.grads.values()]
    assert len(grads) == len(expected_grads) == 8
    for grad, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-14)


def test_replicas_share_weights_and_keep_their_own_gradients() -> None:
    model = float64_model()
    twin = parallel.replicate(model)
    for layer, twin_layer in zip(model.layers, twin.layers):
        for name in layer.params:
            assert twin_layer.params[name] is layer.params[name]
            assert twin_layer.grads[name] is not layer.grads[name]
    model.layers[0].params["W"] += 1.0  # an optimiser step on the model is seen by the replica
    np.testing.assert_array_equal(twin.layers[0].params["W"], model.layers[0].params["W"])


def test_replicas_keep_their_own_buffers_across_batches() -> None:
    """Each worker's replica has its own kept arrays (Layer.kept_array), made even if the model had some before
    it was replicated, and keeps them from one batch to the next: two threads never write one buffer."""
    model = main.build_model(model_section({"conv2d": {"filters": 4, "padding": 1}}, "relu", "maxpool2d",
                                           {"conv2d": {"filters": 8, "padding": 1}}, "relu", "maxpool2d",
                                           *classifier_head(16)),
                             (12, 12, 1), 10, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    x, labels = rng.random((8, 12, 12, 1)).astype(np.float32), rng.integers(0, 10, 8)
    loss = main.SoftmaxCrossEntropy()
    loss.forward(model.forward(x), labels)
    model.backward(loss.backward())  # the model's own layers now keep arrays
    with parallel.DataParallel(model, 2) as net:
        kept = []
        for _ in range(2):
            loss.forward(net.forward(x), labels)
            net.backward(loss.backward())
            kept.append([{name: id(array) for name, array in layer.workspace.items()}
                         for replica in net.replicas for layer in replica.layers])
        conv_buffers = [array for replica in net.replicas for layer in replica.layers
                        for array in layer.workspace.values()]
    assert kept[0] == kept[1] and any(kept[0])  # the same arrays in the second batch
    model_buffers = [array for layer in model.layers for array in layer.workspace.values()]
    every_buffer = conv_buffers + model_buffers
    assert len({id(array) for array in every_buffer}) == len(every_buffer)  # nothing shared
    assert not any(np.shares_memory(a, b) for i, a in enumerate(every_buffer) for b in every_buffer[i + 1:])


@pytest.mark.parametrize("n", [0, 1, 33, 100])
def test_parallel_evaluation_equals_one_thread(n: int) -> None:
    rng = np.random.default_rng(n)
    x, labels = rng.random((n, 12, 12, 1)), rng.integers(0, 10, n)
    model = float64_model()
    expected = model.evaluate(x, labels, main.EVAL_BATCH_SIZE)
    with parallel.DataParallel(model, 2) as net:
        loss, accuracy = net.evaluate(x, labels, main.EVAL_BATCH_SIZE)
    assert loss == pytest.approx(expected[0], rel=1e-12, abs=1e-15)
    assert accuracy == expected[1]


def test_blas_runs_one_thread_per_worker_during_training_and_is_restored() -> None:
    """Workers with BLAS threads of their own would fight over the cores; afterwards BLAS is as it was."""
    data = digits_data(200, 100)
    seen = []
    with threadpool_limits(2):
        model = main.build_model(SMALL_MODEL, (8, 8, 1), 10, np.random.default_rng(0))
        result = main.train(model, main.Adam(), data, epochs=1, batch_size=32, rng=np.random.default_rng(1),
                            workers=2, should_stop=lambda: seen.append(blas_threads()) and False)
        assert blas_threads() and set(blas_threads()) == {2}
    assert result.status == "completed" and len(seen) == 7 + 1  # after each batch, and after the epoch
    assert all(threads and set(threads) == {1} for threads in seen)


def test_default_workers_follow_the_blas_thread_count_and_the_work_per_slice() -> None:
    """One worker per BLAS thread, but only as many as get a big enough slice: the default MNIST model's
    first layer makes 28 * 28 * 32 = 25,088 values per image, so batch 32 gives two workers 401,408 each;
    batch 8, or 8x8 digits (2,048 values per image) at batch 32, stay on one thread."""
    mnist_model = main.build_model(config_schema.DEFAULT_CONFIG["model"], (28, 28, 1), 10, np.random.default_rng(0))
    digits_model = main.build_model(config_schema.DEFAULT_CONFIG["model"], (8, 8, 1), 10, np.random.default_rng(0))
    with threadpool_limits(1):
        assert parallel.default_workers() == 1
        assert parallel.default_workers(mnist_model, 32) == 1
    with threadpool_limits(2):
        assert parallel.default_workers() == 2
        assert parallel.default_workers(mnist_model, 32) == 2
        assert parallel.default_workers(mnist_model, 128) == 2
        assert parallel.default_workers(mnist_model, 8) == 1
        assert parallel.default_workers(digits_model, 32) == 1
        assert parallel.default_workers(digits_model, 128) == 1
        assert parallel.default_workers(digits_model, 256) == 2


def test_two_workers_learn_digits_like_one() -> None:
    """The same training with 1 and 2 workers: float32 sums in another order, so the runs are not bit
    for bit equal, but both learn the 8x8 digits to >= 93% and end close to each other."""
    cfg = config_schema.validate_config({"data": {"dataset": "digits", "n_train": 1200, "n_test": 400},
                                "model": {"layers": [{"conv2d": {"filters": 8, "padding": 1}}, "relu", "maxpool2d",
                                                     *classifier_head(32)]},
                                "training": {"epochs": 4, "learning_rate": 0.003}})
    accuracies = []
    for workers in (1, 2):
        rngs = main.make_rngs(0)
        data = main.load_data(cfg["data"])
        model = main.build_model(cfg["model"], data.input_shape, data.num_classes, rngs["init"])
        result = main.train(model, main.make_optimizer(cfg["training"]), data, epochs=4, batch_size=32,
                            rng=rngs["shuffle"], workers=workers)
        assert result.status == "completed"
        accuracies.append(result.history[-1]["test_accuracy"])
    assert min(accuracies) >= 0.93
    assert abs(accuracies[0] - accuracies[1]) <= 0.02


def test_two_workers_stop_cleanly_when_training_diverges() -> None:
    data = digits_data(160, 40, brightness=1e4)
    before = blas_threads()
    model = main.build_model(SMALL_MODEL, (8, 8, 1), 10, np.random.default_rng(0))
    with np.errstate(all="ignore"):
        result = main.train(model, main.SGD(learning_rate=1e6, momentum=0.0), data, epochs=3, batch_size=16,
                            rng=np.random.default_rng(1), workers=2)
    assert result.status == "diverged"
    assert blas_threads() == before


def test_workers_take_the_callers_numpy_error_settings() -> None:
    """np.errstate is per thread: under the caller's errstate(all="raise"), an overflow inside a worker raises
    there too, and under errstate(all="ignore") (what the CLI sets) a worker warns of nothing."""
    model = main.build_model(SMALL_MODEL, (8, 8, 1), 10, np.random.default_rng(0))
    model.layers[0].params["W"] *= np.float32(100)
    x, labels = np.full((8, 8, 8, 1), 1e38, dtype=np.float32), np.arange(8) % 10  # the first layer overflows
    with parallel.DataParallel(model, 2) as net:
        with np.errstate(all="raise"), pytest.raises(FloatingPointError):
            forward_backward(net, x, labels)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("error")  # a RuntimeWarning anywhere would fail the test
            _, loss = forward_backward(net, x, labels)
            net.evaluate(x, labels, main.EVAL_BATCH_SIZE)
    assert not np.isfinite(loss)


def test_a_model_without_input_shape_trains_with_the_default_workers() -> None:
    """Sequential(layers) without input_shape is allowed: default_workers cannot size its activations, so it
    gives the thread count, and train() runs."""
    model = main.Sequential([main.Flatten(), main.Dense(64, 32, rng=np.random.default_rng(0)), main.ReLU(),
                             main.Dense(32, 10, rng=np.random.default_rng(1))])
    assert parallel.default_workers(model, 32) == parallel.default_workers()
    result = main.train(model, main.Adam(), digits_data(128, 32), epochs=1, batch_size=32, rng=np.random.default_rng(2),
                        workers=parallel.default_workers(model, 32))
    assert result.status == "completed" and len(result.history) == 1


def test_profile_with_two_workers_counts_each_layer_once() -> None:
    """A training run records every layer and the optimiser, from every worker; the table shows the workers'
    mean for a layer, since they ran side by side (their sum would count the same wall time twice)."""
    data = digits_data(320, 80)
    model, optimizer = main.build_model(SMALL_MODEL, (8, 8, 1), 10, np.random.default_rng(0)), main.Adam()
    timings = profiling.instrument(model, optimizer)
    result = main.train(model, optimizer, data, epochs=1, batch_size=32, rng=np.random.default_rng(1), workers=2)
    assert {(name, direction) for name in model.names for direction in ("forward", "backward")} <= set(timings.seconds)
    assert ("optimizer", "step") in timings.seconds
    assert [type(layer).__name__ for layer in model.layers][:3] == ["Conv2D", "ReLU", "MaxPool2D"]  # names kept
    table = profiling.profile_table(timings, model.names, result.batches, workers=2)
    assert "conv2d_1" in table and "optimizer step" in table

    timings = profiling.Timings()
    timings.add("conv2d_1", "forward", 0.25)  # worker 1
    timings.add("conv2d_1", "forward", 0.75)  # worker 2
    timings.add("optimizer", "step", 0.5)  # the main thread, once
    table = profiling.profile_table(timings, ["conv2d_1"], 10, workers=2)
    rows = {line.split()[0]: line.split() for line in table.splitlines()}
    assert rows["conv2d_1"][1] == "0.500" and rows["optimizer"][3] == "0.500"


def test_a_failing_worker_leaves_blas_and_the_gradients_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in one worker thread reaches the caller; BLAS gets its threads back and the model's gradients
    are untouched (they are only written once every worker has finished)."""
    rng = np.random.default_rng(3)
    x, labels = rng.random((8, 12, 12, 1)), rng.integers(0, 10, 8)
    model = float64_model()
    for layer in model.layers:
        for grad in layer.grads.values():
            grad[...] = 7.0
    with threadpool_limits(2):
        with pytest.raises(MemoryError, match="worker 2"), parallel.DataParallel(model, 2) as net:
            def fail(x: np.ndarray, training: bool = True) -> np.ndarray:
                raise MemoryError("worker 2 ran out")
            monkeypatch.setattr(net.replicas[1].layers[3], "forward", fail)
            forward_backward(net, x, labels)
        assert set(blas_threads()) == {2}
    assert all((grad == 7.0).all() for layer in model.layers for grad in layer.grads.values())


def test_two_worker_runs_are_repeatable_and_stop_when_asked() -> None:
    """The same seed and the same number of workers give the same numbers, bit for bit; a stop request after
    batch 3 ends the run there, with BLAS restored."""
    data = digits_data(320, 80)
    histories = []
    for _ in range(2):
        model = main.build_model(SMALL_MODEL, (8, 8, 1), 10, np.random.default_rng(0))
        result = main.train(model, main.Adam(), data, epochs=2, batch_size=32, rng=np.random.default_rng(1),
                            workers=2)
        histories.append([{key: value for key, value in row.items() if key not in ("seconds", "images_per_second")}
                          for row in result.history])
    assert histories[0] == histories[1] and len(histories[0]) == 2
    before, calls = blas_threads(), []
    model = main.build_model(SMALL_MODEL, (8, 8, 1), 10, np.random.default_rng(0))
    result = main.train(model, main.Adam(), data, epochs=2, batch_size=32, rng=np.random.default_rng(1), workers=2,
                        should_stop=lambda: calls.append(1) or len(calls) >= 3)
    assert result.status == "interrupted" and result.stopped_at == {"epoch": 1, "batch": 3}
    assert result.batches == 3 and blas_threads() == before


def test_cli_workers_flag_and_key(tmp_path: Path) -> None:
    """--workers 2 runs (and says so); the results record it; 0 workers is a one-line error naming the key."""
    config = write_config(tmp_path, data={"dataset": "digits", "n_train": 200, "n_test": 60},
                          training={"epochs": 1})
    proc = run_cli(["--config", str(config), "--workers", "2", "--output", "r.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 worker threads" in proc.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["config"]["training"]["workers"] == 2 and results["workers"] == 2
    assert results["status"] == "completed"

    proc = run_cli(["--config", str(config), "--output", "auto.json"], cwd=tmp_path)  # null: one, for 8x8 digits
    assert proc.returncode == 0, proc.stderr
    assert "1 worker thread" in proc.stdout
    assert json.loads((tmp_path / "auto.json").read_text())["workers"] == 1

    proc = run_cli(["--config", str(config), "--workers", "0"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --workers: got 0, expected an integer >= 1"  # no "null" on a command line
    (tmp_path / "bad").mkdir()
    bad = write_config(tmp_path / "bad", training={"workers": "many"})
    proc = run_cli(["--config", str(bad)], cwd=tmp_path)
    assert proc.returncode == 2 and "training.workers: got 'many'" in proc.stderr


def test_slice_sums_add_in_rank_order_whatever_order_the_workers_arrive_in() -> None:
    """Float addition is not associative: (1 + 1e8) - 1e8 is 0 in float32, (-1e8 + 1e8) + 1 is 1. The workers
    arrive last rank first, and every one of them must still read the rank-order sum, 0."""
    parts = [np.float32([1.0]), np.float32([1e8]), np.float32([-1e8])]
    sums = parallel.SliceSums(3)
    totals: list = [None] * 3

    def worker(rank: int) -> None:
        time.sleep(0.1 * (2 - rank))
        totals[rank] = sums(parts[rank], rank)

    threads = [threading.Thread(target=worker, args=(rank,)) for rank in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [float(total[0]) for total in totals] == [0.0, 0.0, 0.0]


# ---- worker threads with Dropout and BatchNorm ----------------------------------------------------------------------


def test_dropout_and_batchnorm_on_worker_threads_compute_the_whole_batch() -> None:
    """float64: a network with Dropout and BatchNorm (after a conv and after a dense layer) on 1, 2 and 3 workers
    gives the same logits, weight gradients and running statistics: the masks are drawn for the whole batch in
    the calling thread, and BatchNorm combines the slices' sums into the whole batch's statistics."""
    layers = {"layers": [{"conv2d": {"filters": 3, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu",
                         {"dropout": {"rate": 0.4}}, "flatten", {"dropout": {"rate": 0.2}}, {"dense": {"units": 6}},
                         "batchnorm", "relu", {"dense": {"units": 10}}]}
    results = []
    for workers in (1, 2, 3):
        model = main.build_model(checked_model(layers), (8, 8, 1), 10, np.random.default_rng(0),
                                 np.random.default_rng(9))
        for layer in model.layers:
            to_float64(layer)
        loss_fn = main.SoftmaxCrossEntropy()
        x_rng = np.random.default_rng(5)
        with parallel.DataParallel(model, workers) if workers > 1 else parallel.one_blas_thread(model) as net:
            for batch in (7, 2):  # a batch of 2 on 3 workers: one slice fewer than workers
                x, labels = x_rng.random((batch, 8, 8, 1)), x_rng.integers(0, 10, batch)
                logits = net.forward(x)
                loss_fn.forward(logits, labels)
                net.backward(loss_fn.backward())
        buffers = [buffer.copy() for layer in model.layers for buffer in layer.buffers.values()]
        results.append((logits, [grad.copy() for _, _, grad in main.parameters(model)], buffers))
    assert len(results[0][2]) == 4
    for logits, grads, buffers in results[1:]:
        np.testing.assert_allclose(logits, results[0][0], rtol=1e-10)
        for grad, expected in zip(grads, results[0][1]):
            np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-13)
        for buffer, expected in zip(buffers, results[0][2]):
            np.testing.assert_allclose(buffer, expected, rtol=1e-12)


def test_batchnorm_models_train_on_the_default_workers_and_a_failing_worker_does_not_hang() -> None:
    """BatchNorm does not keep a model on one worker; and when one worker fails while the others wait for its
    share of the statistics, the error reaches the caller instead of leaving them waiting."""
    from threadpoolctl import threadpool_limits

    model = main.build_model(checked_model(BN_DROPOUT_NET), (28, 28, 1), 10, np.random.default_rng(0))
    with threadpool_limits(2):
        assert parallel.default_workers(model, 256) == 2
    x = np.random.default_rng(1).random((8, 28, 28, 1)).astype(np.float32)
    with parallel.DataParallel(model, 2) as net:
        def fail(rows: np.ndarray) -> np.ndarray:
            raise MemoryError("worker 2 ran out")

        net.replicas[1].layers[1].batch_mean = fail
        started = time.monotonic()
        with pytest.raises(MemoryError, match="worker 2"):
            net.forward(x)
        assert time.monotonic() - started < 10
