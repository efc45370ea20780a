"""Pictures of what the network learned, written after training (`--plot-dir DIR`).

write_plots() draws five PNG files:
- curves.png            loss and accuracy per epoch, on the training and the test set;
- confusion_matrix.png  how often each true class was predicted as each class, on the test set;
- filters.png           the weights of every first-layer convolution filter, as tiny images;
- feature_maps.png      one test image and what each convolution layer computes from it;
- mistakes.png          the test images the network got wrong, the most confident mistakes first.

Only NumPy and matplotlib are needed: the model and the data come in as arguments, and the layers are
recognised by their class names, so this module never imports main.py (which imports it); it shares
plumbing.write_atomic. matplotlib runs on its Agg backend, which draws into memory and needs no display.
Each figure's size in inches is fixed in advance (figure_size) and it is saved at DPI dots per inch, so each
PNG is exactly size * DPI pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: draw into memory, no window, works on a headless server

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from plumbing import write_atomic

DPI = 100
FIGURE_SIZES = {  # name -> (width, height) in inches; the PNG is width * DPI x height * DPI pixels
    "curves": (11.0, 4.5),
    "confusion_matrix": (7.5, 7.0),
    "filters": (9.0, 5.5),
    "feature_maps": (13.0, 1.0),  # + FEATURE_MAP_ROW inches of height per convolution layer
    "mistakes": (10.0, 11.0),
}
FEATURE_MAP_ROW = 1.25  # inches of height per convolution layer in feature_maps.png
MAX_FILTERS = 64  # filters.png shows at most this many first-layer filters
MAX_CHANNELS = 16  # feature_maps.png shows at most this many channels per convolution layer
MAX_MISTAKES = 25  # mistakes.png shows at most this many misclassified images (a 5 x 5 grid)
IMAGE_CMAP = "gray_r"  # input images: ink dark on white paper, as a digit is written
TITLE_SIZE, LABEL_SIZE, SMALL_SIZE = 14, 11, 9  # font sizes in points: legible at 100% zoom

# Applied only while write_plots draws (plt.rc_context), so importing this module changes no global style.
STYLE = {"font.size": LABEL_SIZE, "axes.titlesize": LABEL_SIZE, "figure.titlesize": TITLE_SIZE,
         "xtick.labelsize": LABEL_SIZE, "ytick.labelsize": LABEL_SIZE, "legend.fontsize": LABEL_SIZE}


def write_plots(plot_dir: Path, model: Any, data: Any, history: list[dict]) -> dict[str, str]:
    """Draw the five pictures into plot_dir and return {name: path of its PNG}.

    model: a main.Sequential (only .layers, .predict_proba and each layer's .forward are used);
    data: a main.Dataset (x_test, y_test, class_names); history: train()'s rows, one per epoch.
    """
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    # The test set is classified once; the confusion matrix and the mistakes both use it. Batches of 32, as
    # main.EVAL_BATCH_SIZE: bounded memory whatever the test set's size.
    probabilities = model.predict_proba(data.x_test, 32) if len(data.x_test) else np.zeros((0, len(data.class_names)))
    figures = {
        "curves": lambda: plot_curves(history),
        "confusion_matrix": lambda: plot_confusion_matrix(data.y_test, probabilities, data.class_names),
        "filters": lambda: plot_filters(model),
        "feature_maps": lambda: plot_feature_maps(model, data.x_test, data.y_test, probabilities, data.class_names),
        "mistakes": lambda: plot_mistakes(data.x_test, data.y_test, probabilities, data.class_names),
    }
    paths = {}
    for name, draw in figures.items():
        path = plot_dir / f"{name}.png"
        open_before = set(plt.get_fignums())
        try:
            with plt.rc_context(STYLE):
                save_figure(draw(), path)
        except BaseException:
            for number in set(plt.get_fignums()) - open_before:  # a figure half drawn when it failed
                plt.close(number)
            raise
        paths[name] = str(path)
    return paths


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Save fig as a PNG atomically (a reader never sees half a picture) and close it, so that memory does
    not grow with every figure."""
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def figure_size(name: str, conv_layer_count: int = 0) -> tuple[float, float]:
    """(width, height) in inches of picture `name`; feature_maps.png grows by one row per convolution
    layer (two at least, so that the input image beside them is not tiny)."""
    width, height = FIGURE_SIZES[name]
    if name == "feature_maps":
        height += FEATURE_MAP_ROW * max(conv_layer_count, 2)
    return width, height


def new_figure(name: str, conv_layer_count: int = 0) -> plt.Figure:
    """An empty figure of the size for `name`; constrained layout keeps labels from overlapping."""
    return plt.figure(figsize=figure_size(name, conv_layer_count), dpi=DPI, layout="constrained")


def note_figure(name: str, title: str, note: str) -> plt.Figure:
    """A figure that explains in words why there is nothing to draw (rather than an empty or missing file)."""
    fig = new_figure(name)
    fig.suptitle(title, fontweight="bold")
    fig.text(0.5, 0.5, note, ha="center", va="center", fontsize=TITLE_SIZE, color="dimgray", wrap=True)
    return fig


def hide_axes(axes: plt.Axes) -> None:
    """No ticks, labels or frame: for image grids, where pixel coordinates mean nothing. (Removing the
    ticks first, rather than only switching the axis off, halves the time to lay out a grid of images.)"""
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_axis_off()


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------


def show_image(axes: plt.Axes, image: np.ndarray) -> None:
    """An input image (H, W, C) in [0, 1]: in colour when it has 3 channels (red, green, blue), else grey."""
    if image.shape[2] == 3:
        axes.imshow(np.clip(image, 0, 1), interpolation="nearest")
    else:
        axes.imshow(image[:, :, 0], cmap=IMAGE_CMAP, vmin=0, vmax=1)


def class_label(class_names: list[str], index: int) -> str:
    """The name of class `index` (a digit, or Fashion-MNIST's article name)."""
    return class_names[index] if 0 <= index < len(class_names) else str(index)


def mistake_title(class_names: list[str], true: int, predicted: int, probability: float,
                  max_line: int = 28) -> str:
    """'true 4 / predicted 9 (87%)': on one line when it is short, else broken after the '/'
    (Fashion-MNIST's 'true Ankle boot / predicted Sneaker (87%)' would not fit above a small image)."""
    first, second = f"true {class_label(class_names, true)} /", f"predicted {class_label(class_names, predicted)}"
    second += f" ({100 * probability:.0f}%)"
    return f"{first} {second}" if len(first) + len(second) < max_line else f"{first}\n{second}"


def tick_rotation(class_names: list[str]) -> int:
    """Degrees to turn the x-axis class names: 0 for digits, 45 for words, which would overlap."""
    return 0 if max((len(name) for name in class_names), default=0) <= 2 else 45


# ------------------------------------------------------------------------------------------------
# The five pictures
# ------------------------------------------------------------------------------------------------


def plot_curves(history: list[dict]) -> plt.Figure:
    """Loss (left) and accuracy (right) per epoch, on the training set and on the set each epoch was scored
    on: the validation set when the run held one out (data.n_val), else the test set."""
    if not history:
        return note_figure("curves", "Training curves", "No epoch was completed (epochs: 0, or the run was\n"
                           "stopped during its first epoch), so there are no curves.")
    fig = new_figure("curves")
    axes_loss, axes_accuracy = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    scored = "val" if "val_loss" in history[-1] else "test"
    names = {"train": "training set", "val": "validation set", "test": "test set"}
    for axes, key, ylabel, scale in ((axes_loss, "loss", "cross-entropy loss", 1),
                                     (axes_accuracy, "accuracy", "accuracy (%)", 100)):
        for split, style in (("train", "o-"), (scored, "s--")):
            values = [scale * row[f"{split}_{key}"] for row in history]
            axes.plot(epochs, values, style, label=names[split])
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        if len(epochs) <= 20:  # a tick at every epoch (whole numbers, even for a single epoch)
            axes.set_xticks(epochs)
        else:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlim(epochs[0] - 0.3, epochs[-1] + 0.3)
        axes.grid(alpha=0.3)
        axes.legend()
    axes_loss.set_title("Loss (lower is better)")
    last = history[-1]
    axes_accuracy.set_title(f"Accuracy: {100 * last[f'{scored}_accuracy']:.1f}% on the {names[scored]} after epoch "
                            f"{last['epoch']}")
    fig.suptitle(f"Training curves: a widening gap between training and {names[scored].split()[0]} means overfitting",
                 fontweight="bold")
    return fig


def confusion_counts(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[t, p] = how many images of true class t were predicted as class p."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predicted), 1)
    return counts


def plot_confusion_matrix(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> plt.Figure:
    """Counts per (true class, predicted class) on the test set, written in the cells; the diagonal is correct."""
    if len(labels) == 0:
        return note_figure("confusion_matrix", "Confusion matrix", "No test images, so nothing to count.")
    num_classes = len(class_names)
    counts = confusion_counts(labels, probabilities.argmax(axis=1), num_classes)
    accuracy = np.trace(counts) / counts.sum()
    fig = new_figure("confusion_matrix")
    axes = fig.subplots()
    image = axes.imshow(counts, cmap="Blues")
    ticks = np.arange(num_classes)
    axes.set_xticks(ticks, [class_label(class_names, i) for i in ticks], rotation=tick_rotation(class_names),
                    ha="right" if tick_rotation(class_names) else "center", rotation_mode="anchor")
    axes.set_yticks(ticks, [class_label(class_names, i) for i in ticks])
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    threshold = counts.max() / 2  # dark cells get white text
    for true in range(num_classes):
        for predicted in range(num_classes):
            count = counts[true, predicted]
            if count:
                axes.text(predicted, true, str(count), ha="center", va="center", fontsize=SMALL_SIZE,
                          color="white" if count > threshold else "black")
    fig.colorbar(image, ax=axes, shrink=0.8, label="test images", ticks=MaxNLocator(integer=True))
    fig.suptitle(f"Confusion matrix: accuracy {100 * accuracy:.1f}% on {counts.sum():,} test images",
                 fontweight="bold")
    axes.set_title("rows: true class, columns: predicted class; off the diagonal = mistakes", fontsize=SMALL_SIZE)
    return fig


def conv_layers(model: Any) -> list[int]:
    """Indices of the model's Conv2D layers."""
    return [i for i, layer in enumerate(model.layers) if type(layer).__name__ == "Conv2D"]


def plot_filters(model: Any) -> plt.Figure:
    """The first convolution layer's filters W[:, :, :, f], one small image each: grey for a grey input (the
    mean over input channels when there are several), in colour for an RGB input (each channel's weights in
    its own colour). Mid-grey is 0, darker a negative weight, lighter a positive one; each filter has its own
    scale, symmetric around 0, so its pattern shows even when its weights are small."""
    indices = conv_layers(model)
    if not indices:
        return note_figure("filters", "First-layer filters", "This model has no convolutional layer,\n"
                           "so there are no filters to show.")
    weights = model.layers[indices[0]].params["W"]  # (k, k, C_in, F)
    kernel_size, _, in_channels, n_filters = weights.shape
    shown = min(n_filters, MAX_FILTERS)
    columns = min(shown, 8 if shown <= 32 else 16)
    rows = math.ceil(shown / columns)
    fig = new_figure("filters")
    axes_grid = fig.subplots(rows, columns, squeeze=False).ravel()
    for f, axes in enumerate(axes_grid):
        hide_axes(axes)
        if f >= shown:
            continue
        kernel = weights[:, :, :, f] if in_channels == 3 else weights[:, :, :, f].mean(axis=2)
        limit = float(np.abs(kernel).max()) or 1.0
        if in_channels == 3:  # weight w of a channel shows as that channel at 0.5 + 0.5 w / limit
            axes.imshow(0.5 + 0.5 * kernel / limit, interpolation="nearest")
        else:
            axes.imshow(kernel, cmap="gray", vmin=-limit, vmax=limit, interpolation="nearest")
        axes.set_title(f"{f + 1}", fontsize=SMALL_SIZE, pad=2)
    channels = {1: "", 3: ", in colour (red, green, blue weights)"}.get(in_channels,
                                                                      f", mean over {in_channels} input channels")
    of = f"{shown} of {n_filters}" if shown < n_filters else f"all {n_filters}"
    fig.suptitle(f"First-layer filters: {of}, {kernel_size}x{kernel_size} weights each{channels}",
                 fontweight="bold")
    legend = ("mid-grey = 0; more red, green or blue = a positive weight on that channel, less = a negative one"
              if in_channels == 3 else "grey = 0, light = positive weight, dark = negative")
    fig.supxlabel(f"{legend}; each filter scaled to its own largest |weight|", fontsize=LABEL_SIZE, color="dimgray")
    return fig


def conv_activations(model: Any, image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Run one image (H, W, C) through the layers one by one (training=False) and keep, for every Conv2D,
    its output after the ReLU that follows it (what the next layer sees): [(label, maps (Ho, Wo, F))]."""
    x, kept, number = image[None], [], 0
    layers = model.layers
    for i, layer in enumerate(layers):
        x = layer.forward(x, training=False)
        if type(layer).__name__ == "Conv2D":
            number += 1
            after_relu = i + 1 < len(layers) and type(layers[i + 1]).__name__ == "ReLU"
            maps = np.maximum(x, 0) if after_relu else x
            kept.append((f"conv {number}{' + ReLU' if after_relu else ''}", maps[0]))
    return kept


def pick_example(labels: np.ndarray, probabilities: np.ndarray) -> int:
    """The test image for feature_maps.png: the first one classified correctly (else the first one)."""
    correct = np.flatnonzero(probabilities.argmax(axis=1) == labels)
    return int(correct[0]) if len(correct) else 0


def plot_feature_maps(model: Any, images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                      class_names: list[str]) -> plt.Figure:
    """One test image (left) and, one row per convolution layer, up to MAX_CHANNELS of its activation maps."""
    indices = conv_layers(model)
    if not indices:
        return note_figure("feature_maps", "Feature maps", "This model has no convolutional layer,\n"
                           "so there are no feature maps to show.")
    if len(images) == 0:
        return note_figure("feature_maps", "Feature maps", "No test images to run through the network.")
    example = pick_example(labels, probabilities)
    activations = conv_activations(model, images[example])
    fig = new_figure("feature_maps", len(activations))
    columns = min(MAX_CHANNELS, max(maps.shape[2] for _, maps in activations))
    outer = fig.add_gridspec(1, 2, width_ratios=[1.3, columns / max(len(activations), 2)])
    input_axes = fig.add_subplot(outer[0])
    show_image(input_axes, images[example])
    input_axes.set_title(f"input: true {class_label(class_names, int(labels[example]))},\npredicted "
                         f"{class_label(class_names, int(probabilities[example].argmax()))}")
    input_axes.set_xticks([])
    input_axes.set_yticks([])
    maps_grid = outer[1].subgridspec(len(activations), 1)
    for row, (label, maps) in enumerate(activations):
        shown = min(maps.shape[2], MAX_CHANNELS)
        row_figure = fig.add_subfigure(maps_grid[row])
        row_figure.suptitle(f"{label}: {maps.shape[0]}x{maps.shape[1]} maps, channels 1-{shown} of {maps.shape[2]}",
                            fontsize=LABEL_SIZE, x=0.0, ha="left")
        axes_row = row_figure.subplots(1, columns, squeeze=False).ravel()
        for channel, axes in enumerate(axes_row):
            hide_axes(axes)
            if channel < shown:
                # Each map on its own scale from 0 (black) to its maximum (bright): where this filter fired.
                axes.imshow(maps[:, :, channel], cmap="magma", vmin=0, vmax=max(float(maps[:, :, channel].max()), 1e-6))
                axes.set_title(str(channel + 1), fontsize=SMALL_SIZE, pad=2)
    fig.suptitle("Feature maps: what each convolution layer computes from one test image "
                 "(bright = strong activation)", fontweight="bold")
    return fig


def plot_mistakes(images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray,
                  class_names: list[str]) -> plt.Figure:
    """Up to MAX_MISTAKES misclassified test images, the most confident mistakes first."""
    predicted = probabilities.argmax(axis=1) if len(labels) else np.zeros(0, dtype=int)
    wrong = np.flatnonzero(predicted != labels)
    if len(wrong) == 0:
        what = f"all {len(labels):,} test images were classified correctly" if len(labels) else "no test images"
        return note_figure("mistakes", "Misclassified test images", f"No mistakes: {what}.")
    confidence = probabilities[wrong, predicted[wrong]]
    shown = wrong[np.argsort(-confidence, kind="stable")][:MAX_MISTAKES]
    columns = 5
    fig = new_figure("mistakes")
    for position, axes in enumerate(fig.subplots(columns, columns, squeeze=False).ravel()):
        hide_axes(axes)
        if position >= len(shown):
            continue
        index = shown[position]
        show_image(axes, images[index])
        axes.set_title(mistake_title(class_names, int(labels[index]), int(predicted[index]),
                                     float(probabilities[index, predicted[index]])), fontsize=SMALL_SIZE)
    which = f"All {len(wrong)}" if len(shown) == len(wrong) else f"{len(shown)} of the {len(wrong):,}"
    fig.suptitle(f"{which} misclassified test images ({100 * len(wrong) / len(labels):.1f}% of "
                 f"{len(labels):,}), most confident first", fontweight="bold")
    return fig
