"""The defects a hostile-use audit found, each run as a user would (a real process, real files, real devices),
each asserting what the program says now and its exit code. Numbered as the audit numbered them."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import MAIN, run_cli, write_config
from PIL import Image, features

import images
import main
import modelfile
import serve
from errors import DataError

DIGITS = ["--dataset", "digits", "--n-train", "200", "--n-test", "60", "--epochs", "1"]
SMALL_NET = {"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "relu", {"maxpool2d": {"pool_size": 2}}, "flatten",
                        {"dense": {"units": 10}}]}


def small_config(folder: Path, **sections: dict) -> Path:
    data = {"dataset": "digits", "n_train": 200, "n_test": 60, **sections.pop("data", {})}
    training = {"epochs": 1, **sections.pop("training", {})}
    return write_config(folder, data=data, model=sections.pop("model", SMALL_NET), training=training, **sections)


def character_device(folder: Path, name: str, minor: int) -> Path:
    """A private copy of /dev/null (minor 3) or /dev/full (minor 7): the program may replace it by mistake
    without harming the machine's own. Needs root (mknod); skips otherwise."""
    path = folder / name
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except (PermissionError, AttributeError):
        pytest.skip("creating a character device needs root")
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    proc = run_cli(["--config", str(small_config(folder)), "--save-model", "m.npz"], cwd=folder)
    assert proc.returncode == 0, proc.stderr
    return folder / "m.npz"


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].lower().startswith("error: "), stderr
    assert "Traceback" not in stderr and "unexpected" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


# ---- 1. outputs and special files -------------------------------------------------------------------


def test_1_an_output_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path: Path) -> None:
    (tmp_path / "target.json").write_text("{}")
    (tmp_path / "link.json").symlink_to("target.json")
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", "link.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "link.json").is_symlink() and os.readlink(tmp_path / "link.json") == "target.json"
    assert json.loads((tmp_path / "target.json").read_text())["status"] == "completed"


def test_1_a_character_device_is_written_through_not_replaced(tmp_path: Path) -> None:
    null = character_device(tmp_path, "null", 3)
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", str(null), "--save-model", str(null)
                    .replace("null", "m.npz")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISCHR(null.stat().st_mode), "the device was replaced by a regular file"


def test_1_a_full_device_is_exit_4_with_one_line_and_the_other_files_are_written(tmp_path: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", str(full), "--save-model", "m.npz"],
                   cwd=tmp_path)
    assert proc.returncode == main.EXIT_OUTPUT == 4, proc.stderr
    assert proc.stderr == f"ERROR: could not write the results {full} (No space left on device)\n"
    assert stat.S_ISCHR(full.stat().st_mode) and (tmp_path / "m.npz").is_file()


def test_1_a_fifo_is_written_through_to_its_reader(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", "fifo"], cwd=tmp_path)
    reader.join(30)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert json.loads(received[0])["status"] == "completed"


def test_1_a_fifo_nobody_reads_is_exit_4_at_once_not_a_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    proc = run_cli(["--config", str(small_config(tmp_path)), "--output", "fifo"], cwd=tmp_path, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr == "ERROR: could not write the results fifo (a FIFO that no program is reading)\n"


def test_1_a_socket_is_refused_before_training(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    try:
        proc = run_cli(["--config", str(small_config(tmp_path)), "--output", "sock"], cwd=tmp_path)
    finally:
        listener.close()
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--output sock: is a socket, not a file")
    assert "epoch" not in proc.stdout


# ---- 2. a stdout that cannot be written ----------------------------------------------------------------


def run_into(stdout_path: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    with open(stdout_path, "wb") as stdout:
        return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                              text=True, timeout=120)


STDOUT_FULL = "error: cannot write to standard output (No space left on device); every file asked for was written\n"


def test_2_a_full_stdout_still_writes_the_model_and_results_then_exits_4(tmp_path: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    proc = run_into(full, ["--config", str(small_config(tmp_path)), "--save-model", "m.npz", "--output", "r.json"],
                    tmp_path)
    assert proc.returncode == 4
    assert proc.stderr == STDOUT_FULL
    assert (tmp_path / "m.npz").is_file() and json.loads((tmp_path / "r.json").read_text())["status"] == "completed"


def test_2_a_full_stdout_under_predict_and_gradcheck(tmp_path: Path, model_file: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    np.save(tmp_path / "digit.npy", np.eye(8))
    proc = run_into(full, ["--load-model", str(model_file), "--predict", "digit.npy", "--output", "p.json"], tmp_path)
    assert (proc.returncode, proc.stderr) == (4, STDOUT_FULL)
    assert json.loads((tmp_path / "p.json").read_text())["status"] == "predicted"
    proc = run_into(full, ["--config", str(small_config(tmp_path)), "--gradcheck", "--output", "g.json"], tmp_path)
    assert (proc.returncode, proc.stderr) == (4, STDOUT_FULL)
    assert json.loads((tmp_path / "g.json").read_text())["status"] == "passed"


def test_2_a_full_stdout_under_serve_serves_and_ends_with_exit_4(tmp_path: Path, model_file: Path) -> None:
    full = character_device(tmp_path, "full", 7)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(full, "wb") as stdout:
        process = subprocess.Popen([sys.executable, str(MAIN), "--load-model", str(model_file), "--serve", "--port",
                                    str(port)], cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE, text=True)
    try:
        import urllib.request

        deadline, page = time.monotonic() + 60, None
        while page is None and time.monotonic() < deadline:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/model", timeout=5).read()
            except OSError:
                time.sleep(0.2)
        assert page is not None and json.loads(page)["parameters"] > 0
    finally:
        process.send_signal(2)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 4 and stderr == STDOUT_FULL, stderr


def test_2_a_closed_pipe_is_still_141_but_after_the_files_are_written(tmp_path: Path) -> None:
    process = subprocess.Popen([sys.executable, str(MAIN), "--config", str(small_config(tmp_path, training={
        "epochs": 3})), "--save-model", "m.npz", "--output", "r.json"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    first = process.stdout.readline()
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert first.startswith("numpy-cnn: config from")
    assert process.returncode == 141 and stderr == "", stderr
    assert (tmp_path / "m.npz").is_file()
    assert json.loads((tmp_path / "r.json").read_text())["epochs_completed"] == 3


# ---- 12. the gradient check's results file ---------------------------------------------------------------


def test_12_gradcheck_output_has_its_documented_keys(tmp_path: Path) -> None:
    proc = run_cli(["--config", str(small_config(tmp_path)), "--gradcheck", "--output", "g.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    document = json.loads((tmp_path / "g.json").read_text())
    assert set(document) == {"status", "rows", "config", "versions"}
    assert set(document["versions"]) >= {"python", "numpy"}


# ---- 5. image formats: an allow-list ------------------------------------------------------------------


def encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize("format", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_5_every_allowed_format_opens(format: str) -> None:
    if format == "WEBP" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    picture = Image.fromarray((np.eye(16) * 255).astype(np.uint8)).convert("RGB")
    with images.open_image(encoded(picture, format), '"image"') as opened:
        assert opened.format == format and opened.size == (16, 16)


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 0 0 moveto 28 28 lineto stroke\nshowpage\n"


@pytest.mark.parametrize("name, data, kind", [
    ("digit.eps", EPS, "is a PostScript (EPS) file"),
    ("digit.tif", encoded(Image.fromarray(np.eye(8, dtype=np.float32)), "TIFF"), "is a TIFF file"),
    ("digit.ico", encoded(Image.fromarray((np.eye(16) * 255).astype(np.uint8)), "ICO"), "cannot read it as an image"),
])
def test_5_other_formats_are_refused_before_pillow_decodes_them(tmp_path: Path, model_file: Path, name: str,
                                                               data: bytes, kind: str) -> None:
    from PIL import EpsImagePlugin

    with pytest.raises(DataError, match=f"^x: {re.escape(kind)}; the formats read are PNG, JPEG, GIF, BMP or WebP"):
        images.open_image(data, "x")
    (tmp_path / name).write_bytes(data)
    calls: list = []
    original = EpsImagePlugin.Ghostscript
    EpsImagePlugin.Ghostscript = lambda *args, **kwargs: calls.append(args)  # type: ignore[assignment]
    try:
        with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / name))}: {re.escape(kind)}"):
            images.read_image(tmp_path / name)
    finally:
        EpsImagePlugin.Ghostscript = original
    assert not calls
    proc = run_cli(["--load-model", str(model_file), "--predict", name], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, f"{name}: {kind}")


def test_5_the_server_refuses_an_eps_drawing(model_file: Path) -> None:
    loaded = modelfile.load_model(model_file, main.build_model)
    predictor = serve.Predictor(loaded.model, lambda image: images.prepare_image(image, loaded.model.input_shape),
                                main.softmax, loaded.meta["class_names"])
    url = "data:image/png;base64," + base64.b64encode(EPS).decode()
    with pytest.raises(serve.RequestError, match=r'^"image": is a PostScript \(EPS\) file'):
        predictor.predict(url)


# ---- 8. bad input that ended as "unexpected" ----------------------------------------------------------


HUGE_PADDING = {"layers": [{"conv2d": {"filters": 4, "padding": 100000, "stride": 50000}}, "relu", "flatten",
                           {"dense": {"units": 10}}]}


@pytest.mark.parametrize("mode", [[], ["--gradcheck"]])
def test_8_a_huge_padding_is_refused_for_its_padded_input(tmp_path: Path, mode: list[str]) -> None:
    proc = run_cli(["--config", str(small_config(tmp_path, model=HUGE_PADDING)), *mode], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "GiB", "but this machine has")


def test_8_a_model_file_with_a_huge_padding_is_refused_by_predict(tmp_path: Path, model_file: Path) -> None:
    meta = json.loads(str(np.load(model_file)["meta"]))
    meta["model"]["layers"][0] = {"conv2d": {"filters": 4, "kernel_size": 3, "stride": 50000, "padding": 100000}}
    rewrite_model(model_file, tmp_path / "pad.npz", meta=meta)
    np.save(tmp_path / "digit.npy", np.eye(8))
    proc = run_cli(["--load-model", "pad.npz", "--predict", "digit.npy"], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "pad.npz: the stored architecture cannot run here", "GiB")


def test_8_an_absurd_shift_is_refused(tmp_path: Path) -> None:
    config = small_config(tmp_path, data={"augment": {"shift": 10**23}})
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "data.augment.shift: got 100000000000000000000000, expected less than the 8 "
                                       "pixels of a digits image's side")


def test_8_an_optimiser_step_count_of_400_digits_is_refused(tmp_path: Path, model_file: Path) -> None:
    meta = json.loads(str(np.load(model_file)["meta"]))
    meta["optimizer"]["t"] = 10**400
    rewrite_model(model_file, tmp_path / "t.npz", meta=meta)
    proc = run_cli(["--config", str(small_config(tmp_path)), "--load-model", "t.npz"], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "t.npz: not a valid numpy-cnn model file", "a step count from 0 to")


def rewrite_model(source: Path, target: Path, meta: dict | None = None, **arrays: np.ndarray) -> None:
    with np.load(source) as archive:
        contents = {key: archive[key] for key in archive.files}
    if meta is not None:
        contents["meta"] = np.array(json.dumps(meta))
    contents.update(arrays)
    np.savez(target, **contents)


# ---- 9. wrong answers accepted -------------------------------------------------------------------------


def test_9_a_float_image_with_a_nan_is_refused_in_every_float_input(tmp_path: Path, model_file: Path) -> None:
    grey = np.full((28, 28), 0.5, dtype=np.float32)
    grey[3, 3] = np.nan
    np.save(tmp_path / "nan.npy", grey)
    Image.fromarray(grey).save(tmp_path / "nan.tif")
    proc = run_cli(["--load-model", str(model_file), "--predict", "nan.npy", "nan.tif", "--output", "p.json"],
                   cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: nan.npy: it holds NaN or infinite values",
        "error: nan.tif: is a TIFF file; the formats read are PNG, JPEG, GIF, BMP or WebP (and .npy arrays)"]
    json.loads((tmp_path / "p.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))



def test_9_the_float_image_path_refuses_a_nan_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Should an allowed format ever decode to float ("F") greys, a NaN in them is still refused."""
    grey = np.full((28, 28), 0.5, dtype=np.float32)
    grey[3, 3] = np.nan
    monkeypatch.setattr(images, "open_image", lambda *args, **kwargs: Image.fromarray(grey))
    with pytest.raises(DataError, match=r"^x: it holds NaN or infinite values$"):
        images._read_picture(None, None, "x")


def test_9_a_model_file_with_a_negative_variance_is_refused(tmp_path: Path) -> None:
    config = small_config(tmp_path, model={"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "batchnorm", "relu",
                                                      "flatten", {"dense": {"units": 10}}]})
    assert run_cli(["--config", str(config), "--save-model", "bn.npz"], cwd=tmp_path).returncode == 0
    variance = np.load(tmp_path / "bn.npz")["layer1.running_var"].copy()
    variance[0] = -1.0
    rewrite_model(tmp_path / "bn.npz", tmp_path / "bad.npz", **{"layer1.running_var": variance})
    np.save(tmp_path / "digit.npy", np.eye(8))
    for args in (["--predict", "digit.npy"], ["--config", str(config), "--save-model", "again.npz"]):
        proc = run_cli(["--load-model", "bad.npz", *args], cwd=tmp_path)
        assert proc.returncode == 2
        assert_one_error_line(proc.stderr, "bad.npz: layer1.running_var holds negative values, but a variance is >= 0")
    assert not (tmp_path / "again.npz").exists()


# ---- 10. misleading messages ----------------------------------------------------------------------------


def test_10_a_batch_larger_than_the_data_is_sized_by_the_data(tmp_path: Path) -> None:
    proc = run_cli(["--config", str(small_config(tmp_path)), "--batch-size", str(10**9), "--output", "r.json"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["epochs_completed"] == 1


def test_10_divergence_advice_names_the_key_that_caused_it(tmp_path: Path) -> None:
    config = small_config(tmp_path, training={"epochs": 2, "optimizer": "sgd", "learning_rate": 0.01,
                                              "weight_decay": 1000})
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 3
    assert "try a smaller training.weight_decay than 1000" in proc.stderr and "learning rate" not in proc.stderr
    config = small_config(tmp_path, training={"lr_schedule": {"name": "one_cycle", "div_factor": 1e-6},
                                              "learning_rate": 0.01})
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 3
    assert "training.lr_schedule.div_factor 1e-06 is below 1" in proc.stderr


@pytest.mark.parametrize("sections, message", [
    ({"training": {"lr_schedule": {"name": "cosine", "min_lr": 0.1}}},
     "training.lr_schedule.min_lr: got 0.1, expected at most training.learning_rate (0.001)"),
    ({"data": {"augment": {"shift": 8}}}, "data.augment.shift: got 8, expected less than the 8 pixels"),
])
def test_10_values_that_cannot_work_together_are_refused(tmp_path: Path, sections: dict, message: str) -> None:
    proc = run_cli(["--config", str(small_config(tmp_path, **sections))], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, message)


def test_10_a_one_cycle_schedule_of_one_step_warns(tmp_path: Path) -> None:
    config = small_config(tmp_path, training={"lr_schedule": "one_cycle", "batch_size": 256})
    proc = run_cli(["--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: training.lr_schedule one_cycle over 1 step never reaches training.learning_rate" in proc.stderr


def test_10_serve_with_load_model_refuses_output(tmp_path: Path, model_file: Path) -> None:
    proc = run_cli(["--serve", "--load-model", str(model_file), "--output", "x.json"], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--output has no effect with --load-model and --serve")


def test_10_the_start_line_names_where_the_seed_came_from(tmp_path: Path) -> None:
    proc = run_cli(["--config", str(small_config(tmp_path)), "--epochs", "0"], cwd=tmp_path)
    assert "seed 42 (from built-in default)" in proc.stdout.splitlines()[0]
    proc = run_cli(["--config", str(small_config(tmp_path, data={"random_seed": 7})), "--epochs", "0"], cwd=tmp_path)
    assert f"seed 7 (from {tmp_path / 'config.yaml'})" in proc.stdout.splitlines()[0]


def write_idx_folder(folder: Path, images_: np.ndarray, labels: np.ndarray) -> Path:
    """train-images / train-labels IDX files (gzip), as MNIST and Fashion-MNIST ship them."""
    import gzip

    folder.mkdir()
    header = np.array([2051, len(images_), 28, 28], dtype=">u4").tobytes()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images_.astype(np.uint8).tobytes()))
    header = np.array([2049, len(labels)], dtype=">u4").tobytes()
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.astype(np.uint8).tobytes()))
    return folder


def test_10_a_folder_of_garments_trained_as_mnist_is_named(tmp_path: Path) -> None:
    """Fashion-MNIST's garments fill much of the frame (mean brightness 0.29 against MNIST's 0.13)."""
    rng = np.random.default_rng(0)
    garments = np.zeros((300, 28, 28))
    garments[:, 4:24, 6:22] = rng.integers(100, 200, (300, 20, 16))
    folder = write_idx_folder(tmp_path / "fashion", garments, rng.integers(0, 10, 300))
    args = ["--config", str(small_config(tmp_path, data={"dataset": "mnist"})), "--data-path", str(folder),
            "--n-train", "200", "--n-test", "50", "--epochs", "0"]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "these images look like fashion_mnist, not mnist" in proc.stderr
    assert "add --dataset fashion_mnist" in proc.stderr
    proc = run_cli([*args, "--dataset", "fashion_mnist"], cwd=tmp_path)
    assert proc.returncode == 0 and "look like" not in proc.stderr, proc.stderr


def test_10_asking_for_more_images_than_a_folder_holds_ends_with_the_fix(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = write_idx_folder(tmp_path / "small", rng.integers(0, 60, (500, 28, 28)), rng.integers(0, 10, 500))
    proc = run_cli(["--config", str(small_config(tmp_path, data={"dataset": "mnist"})), "--data-path", str(folder),
                    "--n-train", "1000", "--n-test", "200"], cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "n_train + n_test = 1,200 but only 500 images", "add --n-train 400 --n-test 100")


# ---- 3, 4, 6, 7. the server under hostile clients ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail("the server did not start")


def post_png(port: int, png: bytes, timeout: float = 60) -> int:
    import http.client

    body = json.dumps({"image": "data:image/png;base64," + base64.b64encode(png).decode()}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/api/predict", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def big_png(side: int) -> bytes:
    """An RGBA PNG of side x side pixels that compresses well (under the 2 MB body limit), with ink in it."""
    rows, cols = np.indices((side, side))
    rgba = np.zeros((side, side, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[side // 4:3 * side // 4, side // 2 - side // 16:side // 2 + side // 16, :3] = 255
    rgba[..., 0] |= ((rows + cols) % 7 == 0).astype(np.uint8)
    return encoded(Image.fromarray(rgba), "PNG")


def test_3_thirty_concurrent_big_uploads_keep_the_server_under_200_mb(tmp_path: Path, model_file: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    process = subprocess.Popen([sys.executable, str(MAIN), "--load-model", str(model_file), "--serve", "--port",
                                str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_server(port, process)
        assert post_png(port, big_png(2048)) == 400  # refused from its header, before decoding
        upload = big_png(1024)
        assert len(upload) < 2 * 1024 * 1024
        with ThreadPoolExecutor(30) as pool:
            statuses = list(pool.map(lambda _: post_png(port, upload), range(30)))
        status = Path(f"/proc/{process.pid}/status").read_text()
        peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2, statuses
    print(f"peak RSS of the server under 30 concurrent 1024x1024 RGBA uploads: {peak_kb / 1024:.0f} MB; "
          f"answers: {statuses.count(200)} x 200, {statuses.count(503)} x 503")
    assert peak_kb < 200 * 1024


def test_3_the_page_sends_its_drawing_at_the_pad_size() -> None:
    """The page never sends more than MAX_IMAGE_PIXELS: it posts its 280x280 drawing pad, whatever the screen."""
    web = Path(__file__).resolve().parents[1] / "src" / "web"
    page, script = (web / "index.html").read_text(), (web / "app.js").read_text()
    assert '<canvas id="pad" width="280" height="280"' in page and 'pad.toDataURL("image/png")' in script
    assert 280 * 280 <= serve.MAX_IMAGE_PIXELS == 1024 * 1024


@pytest.fixture
def small_server(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[serve.DrawServer]:
    """The server in this process, with a 2-second deadline per request and at most 20 connections."""
    monkeypatch.setattr(serve, "MAX_CONNECTIONS", 20)
    loaded = modelfile.load_model(model_file, main.build_model)
    server = serve.make_server(loaded.model, prepare=lambda image: images.prepare_image(image, (8, 8, 1)),
                               softmax=main.softmax, class_names=loaded.meta["class_names"], info={}, port=0,
                               timeout=2.0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def run_state(port: int) -> str:
    """The live run's state from GET /api/run: training, paused or done."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/run", timeout=10) as response:
        return json.loads(response.read())["state"]


def get_model(port: int, timeout: float = 10) -> int:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/api/model")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_4_a_client_that_trickles_its_request_is_cut_off_at_the_deadline(small_server: serve.DrawServer) -> None:
    """A byte every 0.3 s never trips a per-read timeout; the total deadline (2 s here) closes it all the same."""
    client = socket.create_connection(("127.0.0.1", small_server.port), timeout=10)
    start, closed_after = time.monotonic(), None
    try:
        for byte in b"GET /api/model HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:
            try:
                client.send(bytes([byte]))
            except OSError:
                closed_after = time.monotonic() - start
                break
            client.settimeout(0.3)
            try:
                if client.recv(1024) == b"":
                    closed_after = time.monotonic() - start
                    break
            except socket.timeout:
                pass
    finally:
        client.close()
    assert closed_after is not None and closed_after < 5, "the trickling connection was kept open"


def test_4_beyond_the_connection_cap_a_client_gets_503_and_a_normal_request_is_answered_soon(
        small_server: serve.DrawServer) -> None:
    idle = [socket.create_connection(("127.0.0.1", small_server.port), timeout=10) for _ in range(20)]
    try:
        time.sleep(0.3)
        over = socket.create_connection(("127.0.0.1", small_server.port), timeout=10)
        answer = over.recv(4096)
        over.close()
        assert answer.startswith(b"HTTP/1.1 503 ") and b"too many open connections" in answer
        start = time.monotonic()
        status = None
        while status != 200 and time.monotonic() - start < 10:  # the idle ones are cut off at their deadline
            try:
                status = get_model(small_server.port)
            except OSError:
                time.sleep(0.2)
        assert status == 200 and time.monotonic() - start < 6
    finally:
        for connection in idle:
            connection.close()


def test_7_a_client_that_announces_a_body_and_sends_none_is_closed_not_answered_500(
        small_server: serve.DrawServer) -> None:
    client = socket.create_connection(("127.0.0.1", small_server.port), timeout=10)
    try:
        client.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 1000\r\n\r\n{" % small_server.port)
        answer = b""
        while True:
            chunk = client.recv(4096)
            if not chunk:
                break
            answer += chunk
    finally:
        client.close()
    assert b" 500 " not in answer, answer


def test_6_sigterm_stops_a_server_that_trained_first_with_143(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(MAIN), "--config", str(small_config(tmp_path)), "--serve",
                                "--port", str(port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for_server(port, process)
        deadline = time.monotonic() + 120
        while run_state(port) != "done":  # the page follows training: wait until it only serves
            assert time.monotonic() < deadline, "training did not end"
            time.sleep(0.2)
        assert get_model(port) == 200
        process.send_signal(15)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 143, stderr
    assert "stopping after" not in stderr and "interrupted (SIGTERM)" in stderr


# ---- 11. the gradient check of a deep ReLU network ----------------------------------------------------------

DEEP_RELU = {"layers": [item for _ in range(24) for item in ({"conv2d": {"filters": 4, "padding": 1}}, "relu")]
             + ["flatten", {"dense": {"units": 10}}]}


def test_11_a_correct_deep_relu_network_passes_with_its_kinks_judged_apart(tmp_path: Path) -> None:
    """With seed 3 some coordinates' +-eps moves a deep ReLU across 0: their central difference measured no
    slope (a whole-model error of 1e-3 before); they are now counted as kinks, and the others must agree."""
    config = small_config(tmp_path, model=DEEP_RELU, data={"random_seed": 3})
    proc = run_cli(["--config", str(config), "--gradcheck", "--output", "g.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    whole = json.loads((tmp_path / "g.json").read_text())["rows"][-1]
    assert whole["layer"] == "whole model" and whole["ok"] and whole["max_rel_error"] < 1e-6
    assert whole["kinks"] >= 1 and whole["coords"] + whole["kinks"] == 20


def test_11_a_broken_backward_in_a_deep_relu_network_still_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(main.ReLU, "backward", lambda self, grad_out: grad_out * self.positive * 0.999)
    config = small_config(tmp_path, model=DEEP_RELU, data={"random_seed": 3})
    assert main.main(["--config", str(config), "--gradcheck", "--output", "g.json"]) == main.EXIT_UNEXPECTED
    whole = json.loads((tmp_path / "g.json").read_text())["rows"][-1]
    assert whole["layer"] == "whole model" and not whole["ok"] and whole["coords"] >= 10
    assert "gradient check FAILED" in capsys.readouterr().err
