"""The pictures of --plot-dir (src/plots.py): five real PNG files of the promised pixel size, written
atomically, with the right content, and no crash on the corner cases (no epochs, no mistakes, no conv layer,
Fashion-MNIST's long class names).

One small model is trained once for the whole file, on synthetic seven-segment digits (offline, a second).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from helpers import (
    CLASS_FOLDER_NAMES,
    SMALL_FOLDER_MODEL,
    classifier_head,
    model_section,
    run_cli,
    write_config,
)
from PIL import Image

import config_schema
import main
import plots

NAMES = ("curves", "confusion_matrix", "filters", "feature_maps", "mistakes")
TWO_CONV_LAYERS = [{"conv2d": {"filters": 4, "padding": 1}}, "relu", "maxpool2d",
                   {"conv2d": {"filters": 6, "padding": 1}}, "relu", "maxpool2d"]


@pytest.fixture(scope="module")
def trained() -> tuple[main.Sequential, main.Dataset, list[dict]]:
    """A model with two conv layers, trained for two epochs on 28x28 synthetic digits, with its data and history."""
    cfg = config_schema.validate_config({"data": {"dataset": "synthetic", "n_train": 400, "n_test": 200,
                                                  "random_seed": 3},
                                "model": {"layers": [*TWO_CONV_LAYERS, *classifier_head(32)]}})
    data = main.load_data(cfg["data"])
    rngs = main.make_rngs(3)
    model = main.build_model(cfg["model"], data.input_shape, data.num_classes, rngs["init"])
    result = main.train(model, main.make_optimizer(cfg["training"]), data, epochs=2, batch_size=32,
                        rng=rngs["shuffle"])
    assert result.status == "completed"
    return model, data, result.history


def expected_pixels(name: str, conv_layer_count: int) -> tuple[int, int]:
    """(width, height) in pixels that a PNG must have: its figure size in inches times the DPI."""
    width, height = plots.figure_size(name, conv_layer_count)
    return round(width * plots.DPI), round(height * plots.DPI)


def check_pictures(paths: dict[str, str], folder: Path, conv_layer_count: int) -> None:
    """The five PNGs exist in `folder`, alone (no temporary files left), decode, and have the promised size."""
    assert set(paths) == set(NAMES)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}.png" for name in NAMES)
    for name, path in paths.items():
        assert Path(path) == folder / f"{name}.png"
        with Image.open(path) as picture:
            assert picture.format == "PNG"
            assert picture.size == expected_pixels(name, conv_layer_count), name
            pixels = np.asarray(picture.convert("L"))
        assert pixels.std() > 0, f"{name}.png is blank"
        assert Path(path).stat().st_size < 400_000, f"{name}.png is too large for a README"


def texts_of(fig: plt.Figure) -> str:
    """All the text drawn in a figure (titles, notes, tick labels), to check content without OCR."""
    return "\n".join(artist.get_text() for artist in fig.findobj(lambda a: hasattr(a, "get_text")))


def test_corner_cases_draw_a_note_instead_of_crashing(trained: tuple, tmp_path: Path) -> None:
    """No epochs (history []), no mistakes (labels = the model's own predictions) and Fashion-MNIST's ten
    long class names: all five pictures are still written, decodable, at their usual sizes, with no
    temporary file left and every figure closed. (The ordinary case is the CLI test at the end.)"""
    model, data, _ = trained
    few = data.x_test[:12]
    perfect = replace(data, x_test=few, y_test=model.predict(few), class_names=list(main.FASHION_NAMES))
    paths = plots.write_plots(tmp_path, model, perfect, [])
    check_pictures(paths, tmp_path, conv_layer_count=2)
    assert plt.get_fignums() == [], "a figure was left open: memory would grow with every run"


def test_curves_plot_every_epoch_and_say_so_when_there_is_none(trained: tuple) -> None:
    """The curves follow the history row by row (loss, and accuracy in percent); an empty history gives a
    figure that says no epochs were trained."""
    _, _, history = trained
    fig = plots.plot_curves(history)
    axes_loss, axes_accuracy = fig.axes
    train_loss, test_loss = (line.get_ydata() for line in axes_loss.get_lines())
    train_accuracy, test_accuracy = (line.get_ydata() for line in axes_accuracy.get_lines())
    np.testing.assert_allclose(train_loss, [row["train_loss"] for row in history])
    np.testing.assert_allclose(test_loss, [row["test_loss"] for row in history])
    np.testing.assert_allclose(train_accuracy, [100 * row["train_accuracy"] for row in history])
    np.testing.assert_allclose(test_accuracy, [100 * row["test_accuracy"] for row in history])
    assert [line.get_xdata().tolist() for line in axes_loss.get_lines()] == [[1, 2], [1, 2]]
    assert axes_loss.get_xlabel() == "epoch" and "loss" in axes_loss.get_ylabel()
    plt.close(fig)

    empty = plots.plot_curves([])
    assert "No epoch was completed" in texts_of(empty)
    plt.close(empty)


def test_confusion_counts_match_a_loop() -> None:
    """confusion_counts[t, p] counts the samples with true class t and prediction p, like a plain loop."""
    rng = np.random.default_rng(0)
    labels, predicted = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    expected = np.zeros((4, 4), dtype=int)
    for true, guess in zip(labels, predicted):
        expected[true, guess] += 1
    np.testing.assert_array_equal(plots.confusion_counts(labels, predicted, 4), expected)


def test_confusion_matrix_names_classes_on_both_axes_and_shows_accuracy() -> None:
    """With Fashion-MNIST the article names label both axes (turned, so that they do not overlap), every
    non-zero count is written in its cell, and the title gives the accuracy."""
    names = list(main.FASHION_NAMES)
    labels = np.array([0, 0, 1, 9, 9, 9])
    predicted = np.array([0, 6, 1, 9, 9, 7])  # 4 of 6 right
    fig = plots.plot_confusion_matrix(labels, np.eye(10)[predicted], names)
    axes = fig.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == names
    assert [t.get_text() for t in axes.get_yticklabels()] == names
    assert axes.get_xticklabels()[0].get_rotation() == 45
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("predicted class", "true class")
    cells = sorted(t.get_text() for t in axes.texts)
    assert cells == sorted(["1", "1", "1", "2", "1"])  # (0,0) (0,6) (1,1) (9,9)=2 (9,7)
    assert "accuracy 66.7%" in texts_of(fig)
    plt.close(fig)


def test_labels_for_digits_and_articles() -> None:
    """Digit titles stay on one line, 'true 4 / predicted 9 (87%)'; long article names are broken after
    the '/' so they fit above a small image; only words are turned on the x axis."""
    digits = main.DIGIT_NAMES
    assert plots.mistake_title(digits, 4, 9, 0.871) == "true 4 / predicted 9 (87%)"
    title = plots.mistake_title(main.FASHION_NAMES, 9, 0, 0.5)
    assert title == "true Ankle boot /\npredicted T-shirt/top (50%)"
    assert plots.tick_rotation(digits) == 0
    assert plots.tick_rotation(main.FASHION_NAMES) == 45


def test_mistakes_show_the_most_confident_first_and_say_when_there_are_none() -> None:
    """Only misclassified images are shown, at most 25, sorted by the probability of the wrong answer;
    without mistakes the figure says so."""
    rng = np.random.default_rng(1)
    n = 40
    images = rng.random((n, 8, 8, 1)).astype(np.float32)
    labels = np.zeros(n, dtype=int)
    probabilities = np.zeros((n, 10))
    probabilities[:, 0] = 1.0  # right ...
    wrong = np.arange(30)  # ... except the first 30, predicted as 3 with confidence 0.55 .. 0.84
    probabilities[wrong] = 0.0
    probabilities[wrong, 3] = 0.55 + wrong / 100
    probabilities[wrong, 0] = 1 - probabilities[wrong, 3]
    fig = plots.plot_mistakes(images, labels, probabilities, main.DIGIT_NAMES)
    titles = [axes.get_title() for axes in fig.axes if axes.images]
    assert len(titles) == plots.MAX_MISTAKES
    assert titles[0] == "true 0 / predicted 3 (84%)"  # the most confident mistake
    assert titles[-1] == "true 0 / predicted 3 (60%)"
    assert "25 of the 30 misclassified" in texts_of(fig)
    plt.close(fig)

    few = plots.plot_mistakes(images[25:], labels[25:], probabilities[25:], main.DIGIT_NAMES)  # 5 wrong of 15
    assert len([axes for axes in few.axes if axes.images]) == 5
    assert "All 5 misclassified test images (33.3% of 15)" in texts_of(few)
    plt.close(few)

    none = plots.plot_mistakes(images, labels, np.eye(10)[labels], main.DIGIT_NAMES)
    assert "No mistakes" in texts_of(none)
    plt.close(none)


def test_filters_show_every_first_layer_filter(trained: tuple) -> None:
    """Each first-layer filter appears once, as its k x k weights (mean over the input channels)."""
    model, _, _ = trained
    weights = model.layers[0].params["W"]
    fig = plots.plot_filters(model)
    shown = [axes.images[0].get_array() for axes in fig.axes if axes.images]
    assert len(shown) == weights.shape[3]
    for f, image in enumerate(shown):
        np.testing.assert_array_equal(image, weights[:, :, :, f].mean(axis=2))
    plt.close(fig)


def test_feature_maps_are_the_relu_outputs_of_each_conv_layer(trained: tuple) -> None:
    """conv_activations gives, per Conv2D layer, the ReLU output the next layer sees, computed layer by
    layer with training=False: the same numbers as running the model's first layers by hand."""
    model, data, _ = trained
    image = data.x_test[0]
    activations = plots.conv_activations(model, image)
    assert [label for label, _ in activations] == ["conv 1 + ReLU", "conv 2 + ReLU"]
    conv1 = np.maximum(model.layers[0].forward(image[None], training=False), 0)
    np.testing.assert_array_equal(activations[0][1], conv1[0])
    pooled = model.layers[2].forward(conv1, training=False)  # conv -> ReLU -> max pool -> conv -> ReLU
    conv2 = np.maximum(model.layers[3].forward(pooled, training=False), 0)
    np.testing.assert_array_equal(activations[1][1], conv2[0])
    assert activations[1][1].shape == (14, 14, 6)


def test_a_model_without_conv_layers_gets_a_note(tmp_path: Path) -> None:
    """A Dense-only model (no conv2d in model.layers) has no filters or feature maps: both figures say so."""
    model = main.build_model(model_section(*classifier_head(8)), (28, 28, 1), 10, np.random.default_rng(0))
    images = np.zeros((3, 28, 28, 1), dtype=np.float32)
    for fig in (plots.plot_filters(model),
                plots.plot_feature_maps(model, images, np.zeros(3, int), np.eye(10)[[0, 0, 0]], main.DIGIT_NAMES)):
        assert "no convolutional layer" in texts_of(fig)
        plt.close(fig)


def test_a_failed_save_keeps_the_old_picture_and_leaves_no_temporary_file(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """save_figure writes into a temporary file and renames it: if drawing fails midway, the previous
    picture is untouched, the half-written file is removed, and the figure is still closed."""
    target = tmp_path / "curves.png"
    target.write_bytes(b"the old picture")
    fig = plots.plot_curves([])

    def broken_savefig(f: object, **kwargs: object) -> None:
        f.write(b"half a PNG")  # type: ignore[attr-defined]
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.save_figure(fig, target)
    assert target.read_bytes() == b"the old picture"
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]
    assert plt.get_fignums() == []


def test_a_picture_that_fails_leaves_no_open_figure_or_temporary_file(
        trained: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If drawing one picture fails halfway, write_plots raises, the pictures drawn before it are complete
    files, and neither its half-drawn figure nor a temporary file is left behind."""
    model, data, history = trained

    def broken_filters(model: main.Sequential) -> plt.Figure:
        plt.figure()
        raise RuntimeError("broken filters")

    monkeypatch.setattr(plots, "plot_filters", broken_filters)
    small = replace(data, x_test=data.x_test[:20], y_test=data.y_test[:20])
    with pytest.raises(RuntimeError, match="broken filters"):
        plots.write_plots(tmp_path, model, small, history)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png", "curves.png"]
    assert plt.get_fignums() == []


def test_cli_plot_dir_writes_the_pictures_and_lists_them_in_the_results(tmp_path: Path) -> None:
    """`--plot-dir` after a real (tiny) training run on the command line: exit 0, the five PNGs of the
    promised sizes in the folder (and nothing else), and the results JSON lists their paths under files.plots."""
    config = write_config(tmp_path, data={"dataset": "synthetic", "n_train": 200, "n_test": 100},
                          model={"layers": [{"conv2d": {"filters": 4, "padding": 1}}, "relu", "maxpool2d",
                                            *classifier_head(16)]},
                          training={"epochs": 1})  # logs into tmp_path/logs, not into the repo
    run = run_cli(["--config", str(config), "--plot-dir", "pictures", "--output", "results.json"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    listed = results["files"]["plots"]
    check_pictures({name: str(tmp_path / path) for name, path in listed.items()}, tmp_path / "pictures",
                   conv_layer_count=1)
    assert all(Path(path).parent == Path("pictures") for path in listed.values())


# ---- colour models --------------------------------------------------------------------------------------------------


def test_pictures_of_a_colour_model_are_in_colour() -> None:
    """The filters of a colour first layer are drawn as RGB images (each channel's weights in its own colour,
    0 at mid-grey), and mistakes and the feature maps' input as the colour pictures themselves."""
    import matplotlib.pyplot as plt

    import plots

    rng = np.random.default_rng(0)
    model = main.build_model(main.config_schema.check_model(SMALL_FOLDER_MODEL), (12, 12, 3), 10, rng)
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
    fig = plots.plot_mistakes(images, labels, probabilities, CLASS_FOLDER_NAMES)
    drawn = [axes.images[0].get_array() for axes in fig.axes if axes.images]
    assert len(drawn) == 20 and all(image.shape == (12, 12, 3) for image in drawn)
    np.testing.assert_array_equal(drawn[0], images[0])
    plt.close(fig)
    fig = plots.plot_feature_maps(model, images, labels, probabilities, CLASS_FOLDER_NAMES)
    assert any(axes.images and axes.images[0].get_array().shape == (12, 12, 3) for axes in fig.axes)
    plt.close(fig)
