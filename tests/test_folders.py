"""Training on a folder of your own images (src/folders.py): the folder loads to the same arrays as the IDX files
it was written from and trains to the same accuracy; colour images train, save and reload; a messy folder loads
with one warning and then from the cache; bad folders are refused with one line and exit 2."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, find_data, run_cli, write_config, write_idx
from PIL import Image

import config_schema
import folders
import main
import modelfile
from datafiles import IDX_FILES, read_idx

NAMES = ["0_zero", "1_one", "2_two", "3_three", "4_four", "5_five", "6_six", "7_seven", "8_eight", "9_nine"]
SMALL_MODEL = {"layers": [{"conv2d": {"filters": 8, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu",
                          {"maxpool2d": {"pool_size": 2}}, "flatten", {"dense": {"units": 10}}]}


def sample_digits() -> tuple[np.ndarray, np.ndarray]:
    folder, missing = find_data("NUMPY_CNN_MNIST")
    if folder is None:
        pytest.skip(missing)
    return read_idx(folder / "train-images-idx3-ubyte.gz"), read_idx(folder / "train-labels-idx1-ubyte.gz")


def write_class_folders(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str] = NAMES) -> None:
    """images[i] as root/<names[label]>/<i>.png, numbered so that name order within a class is array order."""
    for index, (image, label) in enumerate(zip(images, labels)):
        path = root / names[label] / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)


def colour_digits(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each grey digit (N, H, W) drawn in a random colour on a random background colour: (N, H, W, 3) uint8.
    The two colours differ by at least 200 in the sum of their red, green and blue, so every digit stays legible."""
    ink, paper = rng.integers(0, 256, (2, len(images), 3))
    close = np.abs(ink - paper).sum(axis=1) < 200
    while close.any():
        ink[close], paper[close] = rng.integers(0, 256, (2, int(close.sum()), 3))
        close = np.abs(ink - paper).sum(axis=1) < 200
    alpha = images[..., None] / 255
    return (paper[:, None, None] * (1 - alpha) + ink[:, None, None] * alpha).round().astype(np.uint8)


def by_class(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    return images[order], labels[order]


def test_a_folder_written_from_idx_arrays_loads_to_them_and_trains_to_the_same_accuracy(tmp_path: Path) -> None:
    images, labels = sample_digits()
    held = np.random.default_rng(0).permutation(len(labels))[:2000]  # 1,500 for training, 500 for testing
    train, test = by_class(images[held[500:]], labels[held[500:]]), by_class(images[held[:500]], labels[held[:500]])
    idx, folder = tmp_path / "idx", tmp_path / "folder"
    idx.mkdir()
    for (x, y), (image_name, label_name) in zip((train, test), IDX_FILES.values()):
        write_idx(idx / image_name, x)
        write_idx(idx / label_name, y)
    write_class_folders(folder / "train", *train)
    write_class_folders(folder / "test", *test)

    arrays = folders.decoded_arrays(folder, None, None, tmp_path / "cache")
    assert arrays["class_names"] == NAMES and arrays["color"] == "grey" and arrays["skipped"] == []
    for key, expected in zip(("x_train", "y_train", "x_test", "y_test"), (*train, *test)):
        assert np.array_equal(arrays[key], expected), key

    write_config(tmp_path, data={"cache_dir": str(tmp_path / "cache")})
    accuracies = {}
    for name, path in (("idx", idx), ("folder", folder)):
        run = run_cli(["--config", str(ROOT / "configs" / "lenet5.yaml"), "--data-path", str(path), "--epochs", "1",
                       "--n-train", "1200", "--n-test", "500", "--output", str(tmp_path / f"{name}.json")],
                      tmp_path, timeout=300)
        assert run.returncode == 0, run.stderr
        results = json.loads((tmp_path / f"{name}.json").read_text())
        accuracies[name] = results["test_accuracy"]
        assert results["data"]["dataset"] == ("folder" if name == "folder" else "mnist")
    assert results["data"]["class_names"] == NAMES
    assert accuracies["folder"] == accuracies["idx"] > 0.7


def colour_folder(root: Path, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    images, labels = sample_digits()
    chosen = np.random.default_rng(seed).choice(len(labels), n, replace=False)
    coloured = colour_digits(images[chosen], np.random.default_rng(seed))
    write_class_folders(root, coloured, labels[chosen], [str(digit) for digit in range(10)])
    return coloured, labels[chosen]


def test_a_colour_model_trains_saves_reloads_and_predicts(tmp_path: Path) -> None:
    colour_folder(tmp_path / "colour", 400)
    write_config(tmp_path, model=SMALL_MODEL, data={"n_test": 100})
    run = run_cli(["--data-path", str(tmp_path / "colour"), "--epochs", "1", "--save-model", str(tmp_path / "c.npz"),
                   "--output", str(tmp_path / "r.json")], tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["data"]["input_shape"] == [28, 28, 3] and results["data"]["dataset"] == "folder"

    loaded = modelfile.load_model(tmp_path / "c.npz", main.build_model)
    assert loaded.model.input_shape == (28, 28, 3)
    assert loaded.meta["preprocess"] == {"method": "resize", "size": [28, 28], "filter": "bilinear", "color": "rgb"}
    examples = loaded.meta["examples"]
    assert examples["images"].shape == (100, 28, 28, 3) and examples["images"].dtype == np.uint8
    with np.load(tmp_path / "c.npz") as stored:
        for i, layer in enumerate(loaded.model.layers):
            for name, array in {**layer.params, **layer.buffers}.items():
                assert array.tobytes() == stored[modelfile.weight_key(i, name)].tobytes()
    test_accuracy = loaded.model.evaluate(examples["images"].astype(np.float32) / 255, examples["labels"])[1]
    assert test_accuracy == pytest.approx(results["test_accuracy"])  # the examples are the test set's first 100

    Image.fromarray(examples["images"][0]).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(examples["images"][0]).resize((56, 40)).save(tmp_path / "big.jpg")
    run = run_cli(["--predict", str(tmp_path / "grey.png"), str(tmp_path / "big.jpg"), "--load-model",
                   str(tmp_path / "c.npz"), "--output", str(tmp_path / "p.json")], tmp_path)
    assert run.returncode == 0, run.stderr
    predictions = json.loads((tmp_path / "p.json").read_text())["predictions"]
    assert "colour model sees the same grey" in predictions[0]["note"] and "note" not in predictions[1]
    assert "note: " in run.stdout + run.stderr


@pytest.mark.slow
def test_colour_digits_train_to_95_percent(tmp_path: Path) -> None:
    """4,000 sample digits, each drawn twice in random colours, train; 1,000 other digits in colour test."""
    images, labels = sample_digits()
    order, rng, names = np.random.default_rng(0).permutation(len(labels)), np.random.default_rng(1), NAMES
    train, test = order[1000:], order[:1000]
    write_class_folders(tmp_path / "colour" / "train", np.concatenate([colour_digits(images[train], rng),
                                                                       colour_digits(images[train], rng)]),
                        np.concatenate([labels[train], labels[train]]), names)
    write_class_folders(tmp_path / "colour" / "test", colour_digits(images[test], rng), labels[test], names)
    model = {"layers": [{"conv2d": {"filters": 32, "kernel_size": 3, "padding": 1}}, "batchnorm", "relu",
                        {"maxpool2d": {"pool_size": 2}}, {"conv2d": {"filters": 64, "kernel_size": 3, "padding": 1}},
                        "batchnorm", "relu", {"maxpool2d": {"pool_size": 2}}, "flatten", {"dense": {"units": 128}},
                        "relu", {"dense": {"units": 10}}]}
    write_config(tmp_path, model=model, training={"epochs": 5, "learning_rate": 0.003, "batch_size": 32,
                                                  "lr_schedule": "one_cycle"})
    run = run_cli(["--data-path", str(tmp_path / "colour"), "--color", "rgb", "--output", str(tmp_path / "r.json"),
                   "--save-model", str(tmp_path / "c.npz")], tmp_path, timeout=1800)
    assert run.returncode == 0, run.stderr
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["data"]["n_train"] == 8000 and results["data"]["n_test"] == 1000
    assert results["test_accuracy"] >= 0.95


def write_messy_folder(root: Path) -> None:
    """Two classes of pictures in every format and mode, of mixed sizes, with one corrupt PNG, one text file
    named .png and one file of another kind."""
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(root / name / "grey.png")
        Image.fromarray(rng.integers(0, 256, (30, 30, 4), dtype=np.uint8), "RGBA").save(root / name / "alpha.png")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P").save(root / name / "pal.gif")
        Image.fromarray(rng.integers(0, 256, (25, 18, 3), dtype=np.uint8)).save(root / name / "photo.jpg")
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name / "old.bmp")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / name / "web.webp")
        np.save(root / name / "array.npy", rng.random((10, 14)))
        (root / name / "notes.txt").write_text("not an image, and not named like one")
    good = (root / "cats" / "grey.png").read_bytes()
    (root / "cats" / "broken.png").write_bytes(good[:len(good) // 2])
    (root / "dogs" / "text.png").write_text("this is text, not a PNG")


def test_a_messy_folder_loads_with_one_warning_then_from_the_cache(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    write_messy_folder(tmp_path / "messy")
    cfg = dict(config_schema.DEFAULT_CONFIG["data"], path=str(tmp_path / "messy"), image_size=[16, 16],
               cache_dir=str(tmp_path / "cache"), n_test=4)
    with caplog.at_level(logging.INFO, logger="numpy_cnn"):
        start = time.perf_counter()
        first = main.load_data(cfg)
        decoded_in = time.perf_counter() - start
        start = time.perf_counter()
        second = main.load_data(cfg)
        cached_in = time.perf_counter() - start
    print(f"messy folder: decoded in {decoded_in:.3f}s, from the cache in {cached_in:.3f}s")
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 2  # one per load: the second load reports the same skipped files
    assert "skipped 2 files" in warnings[0] and "broken.png" in warnings[0] and "text.png" in warnings[0]
    assert first.source == "folder" and second.source == "cache"
    assert first.input_shape == (16, 16, 3) and first.class_names == ["cats", "dogs"]
    assert len(first.x_train) + len(first.x_test) == 14 and np.bincount(first.y_test).tolist() == [2, 2]
    assert np.array_equal(first.x_train, second.x_train) and first.skipped == second.skipped
    alpha = np.asarray(Image.open(tmp_path / "messy" / "cats" / "alpha.png"))
    white = (alpha[..., :3] * (alpha[..., 3:] / 255) + 255 * (1 - alpha[..., 3:] / 255)).mean()
    decoded = folders.decode(tmp_path / "messy" / "cats" / "alpha.png", None)[0]
    assert decoded.shape == (30, 30, 3) and abs(decoded.mean() - white) < 1  # composited on white


def test_a_grey_folder_is_grey_unless_asked_for_colour(tmp_path: Path) -> None:
    images, labels = sample_digits()
    write_class_folders(tmp_path / "grey", images[::250], labels[::250])
    cfg = dict(config_schema.DEFAULT_CONFIG["data"], path=str(tmp_path / "grey"), cache_dir=str(tmp_path))
    grey = main.load_data(dict(cfg, n_test=5))
    colour = main.load_data(dict(cfg, n_test=5, color="rgb", image_size=[14, 10]))
    assert grey.input_shape == (28, 28, 1) and colour.input_shape == (14, 10, 3)
    assert np.array_equal(colour.x_train[..., 0], colour.x_train[..., 2])
    assert np.bincount(grey.y_test, minlength=10).max() == 1  # stratified: 5 of 10 classes of 2 images


@pytest.mark.parametrize("make, expected", [
    (lambda root: root.mkdir(), "no train-images-idx3-ubyte"),
    (lambda root: (root / "only").mkdir(parents=True), "only one class folder (only)"),
    (lambda root: [(root / name).mkdir(parents=True) for name in "ab"], "no image files in this class folder"),
    (lambda root: [((root / name).mkdir(parents=True), (root / name / "x.png").write_text("text")) for name in "ab"],
     "none of its 2 image files could be read"),
])
def test_bad_folders_get_one_line_and_exit_2(tmp_path: Path, make: object, expected: str) -> None:
    make(tmp_path / "d")
    write_config(tmp_path)
    run = run_cli(["--data-path", str(tmp_path / "d"), "--epochs", "1"], tmp_path)
    assert run.returncode == 2 and expected in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ")


def test_contradictions_and_impossible_settings_are_exit_2(tmp_path: Path) -> None:
    images, labels = sample_digits()
    write_class_folders(tmp_path / "d", images[::100], labels[::100])
    Image.new("L", (30, 30)).save(tmp_path / "d" / NAMES[3] / "99999.png")
    write_config(tmp_path)
    cases = [(["--dataset", "mnist"], "use --dataset folder"),
             (["--image-size", "28"], None),  # resized: it trains
             ([], "is 28x28 but"),
             (["--image-size", "28", "--n-train", "500"], "set it to at most"),
             (["--image-size", "3x"], "--image-size: got '3x'"),
             (["--image-size", "28", "--color", "blue"], "--color: got 'blue'")]
    for flags, expected in cases:
        run = run_cli(["--data-path", str(tmp_path / "d"), "--epochs", "1", "--n-test", "10", *flags], tmp_path)
        if expected is None:
            assert run.returncode == 0, run.stderr
            continue
        assert run.returncode == 2 and expected in run.stderr, (flags, run.stderr)
        assert run.stderr.count("\n") == 1


def test_gradcheck_takes_the_shape_and_classes_of_a_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(tmp_path / "d" / name / f"{i}.png")
    model = {"layers": [{"conv2d": {"filters": 2, "kernel_size": 3, "padding": 1}}, "relu", "flatten",
                        {"dense": {"units": 3}}]}
    write_config(tmp_path, model=model)
    run = run_cli(["--gradcheck", "--data-path", str(tmp_path / "d")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "input (6, 5, 3)" in run.stdout and "gradient check passed" in run.stdout


def test_flip_mirrors_about_half_of_the_images_exactly() -> None:
    images = np.random.default_rng(0).random((200, 5, 7, 3)).astype(np.float32)
    flipped = main.shift_and_rotate(images, np.random.default_rng(1), 0, 0, flip=True)
    same = np.all(np.isclose(flipped, images), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(flipped, images[:, :, ::-1]), axis=(1, 2, 3))
    assert np.all(same ^ mirrored) and 70 < mirrored.sum() < 130


def test_stratified_split_keeps_each_class_share() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = folders.stratified_split(labels, 10, np.random.default_rng(0))
    assert np.bincount(labels[test]).tolist() == [5, 3, 2]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))


FASHION_FOLDERS = ["0_T-shirt_top", "1_Trouser", "2_Pullover", "3_Dress", "4_Coat", "5_Sandal", "6_Shirt",
                   "7_Sneaker", "8_Bag", "9_Ankle boot"]


@pytest.mark.slow
def test_full_fashion_mnist_as_png_folders_equals_its_idx_files(tmp_path: Path, fashion_mnist: Path) -> None:
    """All 70,000 Fashion-MNIST images written as PNG folders load to the IDX arrays (ordered by class) and, with
    the IDX files written in that order, configs/lenet5.yaml reaches exactly the same accuracy on both. Prints
    the load times with and without the cache, and the accuracy on the original IDX files for comparison."""
    source = fashion_mnist
    splits = {split: by_class(read_idx(source / f"{images}.gz"), read_idx(source / f"{labels}.gz"))
              for split, (images, labels) in IDX_FILES.items()}
    (tmp_path / "idx").mkdir()
    for split, (images_name, labels_name) in IDX_FILES.items():
        write_idx(tmp_path / "idx" / images_name, splits[split][0])
        write_idx(tmp_path / "idx" / labels_name, splits[split][1])
        write_class_folders(tmp_path / "folder" / split, *splits[split], FASHION_FOLDERS)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        arrays = folders.decoded_arrays(tmp_path / "folder", None, None, tmp_path / "cache")
        times.append(time.perf_counter() - start)
    assert arrays["source"] == "cache" and arrays["class_names"] == FASHION_FOLDERS
    for key, expected in zip(("x_train", "y_train", "x_test", "y_test"), (*splits["train"], *splits["test"])):
        assert np.array_equal(arrays[key], expected), key
    write_config(tmp_path, data={"cache_dir": str(tmp_path / "cache")}, logging={"file": None})
    accuracies = {}
    for name, path in (("idx", tmp_path / "idx"), ("folder", tmp_path / "folder"), ("original idx", source)):
        start = time.perf_counter()
        run = run_cli(["--config", str(ROOT / "configs" / "lenet5.yaml"), "--data-path", str(path), "--output",
                       str(tmp_path / "r.json")], tmp_path, timeout=3600)
        assert run.returncode == 0, run.stderr
        accuracies[name] = json.loads((tmp_path / "r.json").read_text())["test_accuracy"]
        print(f"{name}: test accuracy {100 * accuracies[name]:.2f}% ({time.perf_counter() - start:.0f}s in all)")
    print(f"70,000 PNG files: decoded in {times[0]:.1f}s, from the cache in {times[1]:.1f}s")
    assert accuracies["folder"] == accuracies["idx"]


def test_pictures_of_a_colour_model_are_in_colour() -> None:
    """The filters of a colour first layer are drawn as RGB images (each channel's weights in its own colour,
    0 at mid-grey), and mistakes and the feature maps' input as the colour pictures themselves."""
    import matplotlib.pyplot as plt

    import plots

    rng = np.random.default_rng(0)
    model = main.build_model(main.config_schema.check_model(SMALL_MODEL), (12, 12, 3), 10, rng)
    weights = model.layers[0].params["W"]
    fig = plots.plot_filters(model)
    shown = [axes.images[0].get_array() for axes in fig.axes if axes.images]
    assert len(shown) == weights.shape[3]
    for f, image in enumerate(shown):
        kernel = weights[:, :, :, f]
        np.testing.assert_allclose(image, 0.5 + 0.5 * kernel / np.abs(kernel).max(), rtol=1e-6)
    plt.close(fig)
    images = rng.random((20, 12, 12, 3)).astype(np.float32)
    labels, probabilities = np.zeros(20, int), np.eye(10)[np.full(20, 3)]
    fig = plots.plot_mistakes(images, labels, probabilities, NAMES)
    drawn = [axes.images[0].get_array() for axes in fig.axes if axes.images]
    assert len(drawn) == 20 and all(image.shape == (12, 12, 3) for image in drawn)
    np.testing.assert_array_equal(drawn[0], images[0])
    plt.close(fig)
    fig = plots.plot_feature_maps(model, images, labels, probabilities, NAMES)
    assert any(axes.images and axes.images[0].get_array().shape == (12, 12, 3) for axes in fig.axes)
    plt.close(fig)


def test_the_results_file_lists_the_skipped_files(tmp_path: Path) -> None:
    write_messy_folder(tmp_path / "messy")
    two_classes = {"layers": [*SMALL_MODEL["layers"][:-1], {"dense": {"units": 2}}]}
    write_config(tmp_path, model=two_classes)
    run = run_cli(["--data-path", str(tmp_path / "messy"), "--image-size", "16", "--n-test", "4", "--epochs", "1",
                   "--batch-size", "4", "--output", str(tmp_path / "r.json")], tmp_path)
    assert run.returncode == 0, run.stderr
    assert (run.stdout + run.stderr).count("WARNING") == 1
    data = json.loads((tmp_path / "r.json").read_text())["data"]
    assert [Path(line.split(":")[0]).name for line in data["skipped_files"]] == ["broken.png", "text.png"]
    assert data["class_names"] == ["cats", "dogs"] and data["input_shape"] == [16, 16, 3]


def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_messy_folder(tmp_path / "messy")
    first = folders.decoded_arrays(tmp_path / "messy", [8, 8], "grey", tmp_path / "cache")
    (cache,) = (tmp_path / "cache").iterdir()
    cache.write_bytes(b"not a zip archive")
    with caplog.at_level(logging.WARNING, logger="numpy_cnn"):
        again = folders.decoded_arrays(tmp_path / "messy", [8, 8], "grey", tmp_path / "cache")
    assert again["source"] == "folder" and np.array_equal(again["x_train"], first["x_train"])
    assert "cannot read the cache" in caplog.text
    assert folders.decoded_arrays(tmp_path / "messy", [8, 8], "grey", tmp_path / "cache")["source"] == "cache"


def test_the_page_offers_the_pad_to_digit_models_and_a_file_drop_to_the_others() -> None:
    import serve

    rng = np.random.default_rng(0)
    grey = main.build_model(main.config_schema.check_model(SMALL_MODEL), (28, 28, 1), 10, rng)
    colour = main.build_model(main.config_schema.check_model(SMALL_MODEL), (20, 16, 3), 10, rng)
    examples = {"images": rng.integers(0, 256, (3, 20, 16, 3), dtype=np.uint8), "labels": np.array([0, 4, 9])}
    assert serve.page_options(grey, {"dataset": "mnist", "class_names": NAMES})["mode"] == "draw"
    fashion = serve.page_options(grey, {"dataset": "fashion_mnist", "class_names": NAMES})
    assert fashion["mode"] == "picture" and fashion["decode"] is None  # the digit recipe, but no pad
    options = serve.page_options(colour, {"dataset": "folder", "class_names": NAMES, "examples": examples})
    assert options["mode"] == "picture" and [e["class"] for e in options["examples"]] == [NAMES[0], NAMES[4], NAMES[9]]
    predictor = serve.Predictor(colour, options["prepare"], main.softmax, NAMES, options["decode"])
    answer = predictor.predict(options["examples"][1]["image"], "lists")
    assert answer["input"]["shape"] == [20, 16, 3] and np.array_equal(answer["input"]["values"], examples["images"][1])
    assert len(answer["layers"]) == len(colour.layers)
    with pytest.raises(serve.RequestError, match="the formats read are PNG, JPEG, GIF, BMP or WebP"):
        predictor.predict("data:image/png;base64,aGVsbG8=")


def test_the_folder_rgb_recipe_trains_on_a_folder_and_serves_its_pictures(tmp_path: Path) -> None:
    colour_folder(tmp_path / "pictures", 60)
    write_config(tmp_path)
    run = run_cli(["--config", str(ROOT / "configs" / "folder_rgb.yaml"), "--data-path", str(tmp_path / "pictures"),
                   "--epochs", "1", "--save-model", str(tmp_path / "m.npz"), "--output", str(tmp_path / "r.json")],
                  tmp_path)
    assert run.returncode == 0, run.stderr
    assert "left-right flips" in run.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["data"]["input_shape"] == [32, 32, 3] and results["data"]["n_test"] == 12  # a fifth, stratified
    meta = modelfile.load_model(tmp_path / "m.npz", main.build_model).meta
    assert meta["preprocess"]["size"] == [32, 32] and meta["examples"]["images"].shape == (12, 32, 32, 3)
