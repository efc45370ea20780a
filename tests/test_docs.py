"""The documentation checks itself: every worked example of docs/HOW_IT_WORKS.md is recomputed with the code, and
the README's configuration, flags, commands and length match the program."""

from __future__ import annotations

import importlib
import inspect
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import MAIN, ROOT

import config_schema
import main

DOC_PATH = ROOT / "docs" / "HOW_IT_WORKS.md"
DOC = DOC_PATH.read_text(encoding="utf-8")
BATCH = 32
MNIST_SHAPE = (28, 28, 1)

CHECKED_BLOCK = re.compile(r"<!-- check: ([\w-]+) -->\n(?:```text\n(.*?)```|((?:\|[^\n]*\n)+))", re.DOTALL)
BLOCKS = {match.group(1): match.group(2) or match.group(3) for match in CHECKED_BLOCK.finditer(DOC)}


# ------------------------------------------------------------------------------------------------
# Helpers: reading the page
# ------------------------------------------------------------------------------------------------


def parse_number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def decimals_of(token: str) -> int:
    """How many digits after the decimal point a number was printed with (0 for an integer)."""
    return len(token.split(".")[1]) if "." in token else 0


class Quoted:
    """An array of numbers as the page prints them: the values and the rounding each was printed with."""

    def __init__(self, rows: list[list[str]]) -> None:
        self.values = np.array([[float(t) for t in row] for row in rows])
        self.half_ulp = np.array([[0.5 * 10.0 ** -decimals_of(t) if "." in t else 0.0 for t in row]
                                  for row in rows])

    def assert_matches(self, actual: np.ndarray, what: str) -> None:
        """Equal to `actual` up to the rounding the page printed (integers must be exact)."""
        actual = np.asarray(actual, dtype=np.float64).reshape(self.values.shape)
        allowed = self.half_ulp + 1e-12 * np.abs(actual)
        wrong = np.abs(actual - self.values) > allowed
        assert not wrong.any(), f"{what}: the page says\n{self.values}\nthe code computes\n{actual}"


def checked_arrays(block_name: str) -> dict[str, Quoted]:
    """The named arrays of one `<!-- check: NAME -->` block."""
    assert block_name in BLOCKS, f"docs/HOW_IT_WORKS.md has no block marked <!-- check: {block_name} -->"
    arrays: dict[str, list[list[str]]] = {}
    current: str | None = None
    for line in BLOCKS[block_name].splitlines():
        tokens = line.split()
        if not tokens:
            continue
        if tokens[0].endswith(":") and parse_number(tokens[0][:-1]) is None:
            current, tokens = tokens[0][:-1], tokens[1:]
            arrays[current] = []
        numbers = []
        for token in tokens:  # leading numbers only: a row may end with words
            if parse_number(token) is None:
                break
            numbers.append(token)
        if numbers:
            assert current is not None, f"numbers before any 'name:' line in block {block_name}: {line!r}"
            arrays[current].append(numbers)
    return {name: Quoted(rows) for name, rows in arrays.items() if rows}


def checked_table(block_name: str) -> list[list[str]]:
    """The body rows of a `<!-- check: NAME -->` Markdown table, as lists of stripped cells."""
    assert block_name in BLOCKS, f"docs/HOW_IT_WORKS.md has no table marked <!-- check: {block_name} -->"
    lines = BLOCKS[block_name].strip().splitlines()[2:]  # skip the header and the |---| line
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def shape_in(cell: str) -> tuple[int, ...]:
    """The shape written in a table cell, e.g. '`(32, 28, 28, 1)`' -> (32, 28, 28, 1)."""
    match = re.search(r"\(([\d,\s]+)\)", cell)
    assert match, f"no shape in table cell {cell!r}"
    return tuple(int(part) for part in match.group(1).split(",") if part.strip())


def code_spans_outside_fences(text: str) -> list[str]:
    """Every inline `code span` of the page, ignoring fenced blocks."""
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return re.findall(r"`([^`\n]+)`", prose)


def resolve(dotted_name: str, module: str = "main") -> object:
    """module.<dotted_name> (e.g. 'Conv2D.forward' in main); raises AttributeError if any part is missing."""
    target: object = importlib.import_module(module)
    for part in dotted_name.removeprefix(f"{module}.").split("."):
        target = getattr(target, part)
    return target


# ------------------------------------------------------------------------------------------------
# Helpers: the real default model
# ------------------------------------------------------------------------------------------------


def default_model() -> main.Sequential:
    """The default architecture with the weights a run with seed 42 starts from."""
    return main.build_model(config_schema.DEFAULT_CONFIG["model"], MNIST_SHAPE, 10, main.make_rngs(42)["init"])


def layer_names(model: main.Sequential) -> list[str]:
    return [row["layer"].split(" ")[0] for row in model.summary_rows()]


def one_training_step_shapes() -> tuple[main.Sequential, list[tuple[int, ...]], set[tuple[int, ...]]]:
    """Run forward, loss and backward on a batch of 32 MNIST-sized images, as train() does.

    Returns the model, the output shape of each layer, and the set of every array shape seen on the way:
    inputs, outputs, gradients, weights, cached arrays, the matrices of the convolutions' multiplies,
    and the transpose of every 2-D one.
    """
    rng = np.random.default_rng(0)
    model = default_model()
    x = rng.random((BATCH, *MNIST_SHAPE), dtype=np.float32)
    labels = rng.integers(0, 10, BATCH)
    seen: set[tuple[int, ...]] = {x.shape}
    outputs = []
    activation = x
    for layer in model.layers:
        activation = layer.forward(activation)
        outputs.append(activation.shape)
        seen.add(activation.shape)
    loss_fn = main.SoftmaxCrossEntropy()
    loss_fn.forward(activation, labels)
    grad: np.ndarray | None = loss_fn.backward()
    for layer in reversed(model.layers):
        seen.add(grad.shape)
        grad = layer.backward(grad)
        if grad is None:
            break
    for layer in model.layers:
        for name, value in vars(layer).items():
            if isinstance(value, np.ndarray):
                seen.add(value.shape)
            elif name in ("padded_shape", "x_shape"):
                seen.add(tuple(value))
        seen.update(p.shape for p in layer.params.values())
        if isinstance(layer, main.Conv2D):
            k, _, channels, filters = layer.params["W"].shape
            windows = math.prod(layer.cols.shape[:3])
            seen.update({(windows, k * k * channels), (k * k * channels, filters), (windows, filters)})
    seen.update(tuple(row["output_shape"]) for row in model.summary_rows())
    seen.update([shape[::-1] for shape in seen if len(shape) == 2])
    return model, outputs, seen


# ------------------------------------------------------------------------------------------------
# The page's structure: names, links, shapes of the default model
# ------------------------------------------------------------------------------------------------


def test_every_function_the_page_names_exists_where_it_links() -> None:
    """Each [`name`](../src/MODULE.py) link names something src/MODULE.py has, and each `Class.method` span
    something src/main.py has."""
    linked = re.findall(r"\[`([^`]+)`\]\(\.\./src/(\w+)\.py[^)]*\)", DOC)
    assert len(linked) >= 30, "the page should link the code it describes"
    methods = [span for span in code_spans_outside_fences(DOC) if re.fullmatch(r"(main\.)?[A-Z]\w*\.\w+", span)]
    missing = []
    names = {(name, module) for name, module in linked if not name.endswith(".py")}  # not the file itself
    for name, module in names | {(method, "main") for method in methods}:
        try:
            resolve(name, module)
        except AttributeError:
            missing.append(f"{module}.{name}")
    assert not missing, f"docs/HOW_IT_WORKS.md names what the code does not have: {sorted(missing)}"
    for name in ("Conv2D.forward", "Conv2D.backward", "im2col", "col2im", "MaxPool2D.backward", "ReLU.backward",
                 "Dense.backward", "SoftmaxCrossEntropy.backward", "Adam.step", "he_normal", "gradient_check"):
        assert name in {linked_name for linked_name, _ in linked}, f"the page never links {name}"


def test_links_inside_the_page_point_to_existing_headings() -> None:
    """Every [text](#anchor) matches a heading, slugged the way GitHub does it."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", DOC, flags=re.DOTALL), flags=re.MULTILINE)
    slugs = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
    anchors = re.findall(r"\]\(#([^)]+)\)", DOC)
    assert anchors
    assert not set(anchors) - slugs, f"anchors without a heading: {sorted(set(anchors) - slugs)}"


def test_model_table_matches_a_real_forward_pass_of_the_default_model() -> None:
    """The layer table: each output shape for a batch of 32, each weight count, and the total 421,642."""
    assert main.load_config(ROOT / "config.yaml")["model"] == config_schema.validate_config({})["model"], \
        "config.yaml's model is no longer the built-in default the page describes"
    model, outputs, _ = one_training_step_shapes()
    rows = checked_table("model-shapes")
    layer_rows, total_row = rows[1:-1], rows[-1]
    assert shape_in(rows[0][3]) == (BATCH, *MNIST_SHAPE)
    assert len(layer_rows) == len(model.layers)
    summary = model.summary_rows()
    for row, name, output, summary_row in zip(layer_rows, layer_names(model), outputs, summary):
        assert row[1].split(":")[0] == name
        assert shape_in(row[3]) == output, f"{name}: output shape"
        assert int(row[4].replace(",", "")) == summary_row["parameters"], f"{name}: weights"
    assert int(total_row[4].replace(",", "")) == model.parameter_count() == 421_642
    for row, layer in zip(layer_rows, model.layers):
        computed_by = re.search(r"`([^`]+)`", row[2]).group(1)
        assert computed_by == f"{type(layer).__name__}.forward"


def test_every_shape_quoted_in_the_text_occurs_in_a_real_training_step() -> None:
    """Every integer shape in a `code span` is an array shape seen in one real step (so no typo survives),
    and the im2col shapes of both convolutions are all quoted."""
    model, _, seen = one_training_step_shapes()
    examples = {(1, 4, 4, 1), (1, 2, 2, 1), (1, 2, 2, 3, 3, 1), (4, 9), (9, 1), (3, 3, 1, 1)}
    quoted = set()
    for span in code_spans_outside_fences(DOC):
        for inside in re.findall(r"\((\d+(?:,\s*\d+)+,?|\d+,)\)", span):  # (a, b, ...) or (a,), not f(1000)
            quoted.add(tuple(int(part) for part in inside.split(",") if part.strip()))
    assert len(quoted) >= 25
    unknown = quoted - seen - examples
    assert not unknown, f"shapes quoted in docs/HOW_IT_WORKS.md that no array of a training step has: {unknown}"
    for layer in model.layers:
        if isinstance(layer, main.Conv2D):
            k, _, channels, filters = layer.params["W"].shape
            windows = math.prod(layer.cols.shape[:3])
            for shape in (layer.cols.shape, (windows, k * k * channels), (k * k * channels, filters),
                          (windows, filters), layer.padded_shape):
                assert tuple(shape) in quoted, f"the page does not quote the convolution shape {shape}"
        if isinstance(layer, main.MaxPool2D):
            assert layer.winner.shape in quoted, f"the page does not quote the winner masks {layer.winner.shape}"


def test_he_table_matches_the_initialised_weights() -> None:
    """fan_in and √(2/fan_in) of each layer as quoted, and the real weights have about that spread."""
    model = default_model()
    layers = dict(zip(layer_names(model), model.layers))
    rows = checked_table("he-init")
    assert [row[0] for row in rows] == [name for name, layer in layers.items() if layer.params]
    for name, shape_cell, fan_in_cell, std_cell in rows:
        weights = layers[name].params["W"]
        assert shape_in(shape_cell) == weights.shape
        fan_in = math.prod(weights.shape[:-1])  # k*k*C for a convolution, in_features for a dense layer
        assert int(fan_in_cell) == fan_in
        Quoted([[std_cell]]).assert_matches(math.sqrt(2 / fan_in), f"{name} standard deviation")
        # The sample standard deviation of n normal draws is off by about 1/sqrt(2n): allow 4 of those.
        assert abs(weights.std() / math.sqrt(2 / fan_in) - 1) < 4 / math.sqrt(2 * weights.size), name


# ------------------------------------------------------------------------------------------------
# The worked examples
# ------------------------------------------------------------------------------------------------


def edge_detector(kernel: np.ndarray) -> main.Conv2D:
    """A 1-channel, 1-filter 3x3 Conv2D (stride 1, no padding) with the given kernel and bias 0, float64."""
    conv = main.Conv2D(1, 1, 3, stride=1, padding=0, rng=np.random.default_rng(0))
    conv.params["W"] = kernel.reshape(3, 3, 1, 1).astype(np.float64)
    conv.params["b"] = np.zeros(1)
    conv.grads = {name: np.zeros_like(p) for name, p in conv.params.items()}
    conv.need_input_grad = True
    return conv


def test_im2col_example_is_what_im2col_and_Conv2D_compute() -> None:
    """The 4x4 image 1..16: its 4 windows of 9 pixels, and cols @ W of the edge detector."""
    example = checked_arrays("im2col-example")
    image = np.arange(1, 17, dtype=np.float64).reshape(1, 4, 4, 1)
    example["x"].assert_matches(image, "x")
    cols = main.im2col(image, 3, 1)
    assert cols.shape == (1, 2, 2, 3, 3, 1)
    example["cols"].assert_matches(cols.reshape(4, 9), "cols")
    kernel = example["W"].values
    conv = edge_detector(kernel)
    y = conv.forward(image)
    example["y"].assert_matches(y, "y = Conv2D.forward")
    example["y"].assert_matches(cols.reshape(4, 9) @ kernel.reshape(9, 1), "y = cols @ W")


def test_col2im_example_is_what_col2im_and_Conv2D_backward_compute() -> None:
    """Window counts, the adjoint identity (306), and dx, dW, db of the edge detector for grad_out = ones."""
    forward = checked_arrays("im2col-example")
    example = checked_arrays("col2im-example")
    image, kernel = forward["x"].values.reshape(1, 4, 4, 1), forward["W"].values
    cols = main.im2col(image, 3, 1)
    counts = main.col2im(np.ones_like(cols), image.shape, 1)
    example["counts"].assert_matches(counts, "counts")
    example["inner"].assert_matches(cols.sum(), "sum of cols")
    example["inner"].assert_matches((image * counts).sum(), "sum of x * counts")

    grad_out = example["grad_out"].values.reshape(1, 2, 2, 1)
    grad_cols = grad_out.reshape(4, 1) @ kernel.reshape(9, 1).T
    for row in grad_cols:
        example["grad_cols"].assert_matches(row, "a row of grad_out @ W.T")
    conv = edge_detector(kernel)
    conv.forward(image)
    dx = conv.backward(grad_out)
    example["dx"].assert_matches(dx, "dx = Conv2D.backward")
    example["dx"].assert_matches(main.col2im(grad_cols.reshape(cols.shape), image.shape, 1), "dx = col2im")
    example["dW"].assert_matches(conv.grads["W"], "dW")
    example["db"].assert_matches(conv.grads["b"], "db")


def test_col2im_is_the_adjoint_of_im2col_as_the_page_claims() -> None:
    """<im2col(x), G> = <x, col2im(G)> for random x and G, with overlapping and strided windows, and with one
    channel or several."""
    rng = np.random.default_rng(1)
    for kernel_size, stride, channels in ((3, 1, 3), (3, 2, 3), (2, 2, 3), (3, 1, 1), (3, 2, 1)):
        x = rng.standard_normal((2, 7, 6, channels))
        cols = main.im2col(x, kernel_size, stride)
        grad = rng.standard_normal(cols.shape)
        assert np.isclose(np.sum(cols * grad), np.sum(x * main.col2im(grad, x.shape, stride)), rtol=1e-12)


def test_maxpool_example_is_what_MaxPool2D_computes() -> None:
    """Maxima, the 4 winner masks (first maximum wins), the routed gradient, and the wrong x == max version."""
    example = checked_arrays("maxpool-example")
    x = example["x"].values.reshape(1, 4, 4, 1)
    pool = main.MaxPool2D(2)
    y = pool.forward(x)
    example["y"].assert_matches(y, "y")
    side_by_side = np.concatenate([pool.winner[offset, 0, :, :, 0] for offset in range(4)], axis=1)
    assert pool.winner.shape == (4, *y.shape)
    example["winner"].assert_matches(side_by_side, "the winner masks of offsets 0, 1, 2, 3")
    grad_out = example["grad_out"].values.reshape(1, 2, 2, 1)
    grad_in = pool.backward(grad_out)
    example["grad_in"].assert_matches(grad_in, "MaxPool2D.backward")
    upsample = np.ones((2, 2))
    tied = x[0, :, :, 0] == np.kron(y[0, :, :, 0], upsample)
    example["wrong"].assert_matches(tied * np.kron(grad_out[0, :, :, 0], upsample), "the x == max mask")
    assert f"adds up to 1 + 2 + 3 + 4 = {grad_in.sum():g}" in DOC
    assert f"The wrong version adds up to {example['wrong'].values.sum():g}" in DOC


def test_relu_example_is_what_ReLU_computes() -> None:
    """ReLU of a vector with an exact 0, and its gradient, which is 0 at 0."""
    example = checked_arrays("relu-example")
    x = example["x"].values
    assert (x == 0).any(), "the example should contain an exact zero"
    relu = main.ReLU()
    example["y"].assert_matches(relu.forward(x), "ReLU.forward")
    example["dx"].assert_matches(relu.backward(np.ones_like(x)), "ReLU.backward")


def test_products_written_in_the_text_are_right() -> None:
    """Every 'a·b·c = n' (exact) and 'a·b·c ≈ n million' (rounded) the page writes out."""
    products = re.findall(r"(\d+(?:·\d+)+) (=|≈) ([\d,]+)( million)?", DOC)
    assert len(products) >= 6
    for factors, sign, result, million in products:
        product = math.prod(int(factor) for factor in factors.split("·"))
        claimed = int(result.replace(",", ""))
        if sign == "=":
            assert product == claimed and not million, f"{factors} = {product}, not {result}"
        else:
            assert million and round(product / 1e6) == claimed, f"{factors} = {product:,}, not ≈ {result} million"


def test_softmax_example_is_what_SoftmaxCrossEntropy_computes() -> None:
    """Probabilities, loss and gradient of the logits 1000, 999, 998 in float32, without overflow."""
    example = checked_arrays("softmax-example")
    logits = example["logits"].values.astype(np.float32)
    labels = example["label"].values.reshape(1).astype(np.int64)
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(logits)).all(), "the page says exp(1000) alone would be inf in float32"
    loss_fn = main.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, labels)
    example["probs"].assert_matches(loss_fn.probs, "probs")
    example["loss"].assert_matches(loss, "loss")
    example["grad"].assert_matches(loss_fn.backward(), "grad")
    loss_fn.forward(np.array([[2.0, 1.0, 0.0]], dtype=np.float32), labels)
    example["probs"].assert_matches(loss_fn.probs, "probs of 2, 1, 0")


def test_adam_example_is_what_Adam_computes() -> None:
    """Two Adam steps from 0 with fixed gradients: each weight moves by about lr; and the uncorrected step."""
    example = checked_arrays("adam-example")
    gradient = example["g"].values.reshape(3, 1)
    model = main.Sequential([main.Dense(3, 1, rng=np.random.default_rng(0))])
    dense = model.layers[0]
    dense.params = {"W": np.zeros((3, 1)), "b": np.zeros(1)}
    dense.grads = {"W": gradient.copy(), "b": np.zeros(1)}
    adam = main.Adam(learning_rate=1e-3)
    assert (adam.beta1, adam.beta2, adam.eps) == (0.9, 0.999, 1e-8)
    adam.step(model)
    example["after1"].assert_matches(dense.params["W"], "weights after one Adam step")
    adam.step(model)
    example["after2"].assert_matches(dense.params["W"], "weights after two Adam steps")
    # The first step without bias correction: m = 0.1 g, v = 0.001 g^2, straight into the update.
    m, v = (1 - adam.beta1) * gradient, (1 - adam.beta2) * gradient**2
    example["uncorrected"].assert_matches(-adam.learning_rate * m / (np.sqrt(v) + adam.eps), "no bias correction")


def test_gradcheck_output_matches_what_run_gradcheck_prints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """The quoted --gradcheck output is what `python src/main.py --gradcheck` prints for the default config:
    the same header, layers, tensors, shapes and coordinate counts (the errors vary with the machine, so
    only their verdict is compared), and the check passes."""
    monkeypatch.chdir(tmp_path)  # built-in defaults, and the log goes into tmp_path
    exit_code = main.main(["--gradcheck"])
    assert exit_code == main.EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("gradient check of the configured model"))
    printed = [*lines[start + 1:-1], re.sub(r" in [\d.]+s$", "", lines[-1])]
    quoted = BLOCKS["gradcheck-output"].strip().splitlines()
    assert len(quoted) == len(printed)
    assert quoted[:2] == printed[:2] and quoted[-1] == printed[-1]
    error_column = printed[0].index("coords") + len("coords")
    for quoted_line, printed_line in zip(quoted[2:-1], printed[2:-1]):
        assert quoted_line[:error_column] == printed_line[:error_column]
        quoted_error, quoted_result = quoted_line[error_column:].split()
        assert float(quoted_error) < 1e-6 and quoted_result == "ok" == printed_line.split()[-1]


@pytest.mark.parametrize("name", ["im2col-example", "col2im-example", "maxpool-example", "softmax-example",
                                  "adam-example", "relu-example", "gradcheck-output", "model-shapes", "he-init"])
def test_every_checked_block_is_present(name: str) -> None:
    """The page still has each block these tests read (a renamed marker must not silently skip a check)."""
    assert name in BLOCKS and BLOCKS[name].strip()


# ------------------------------------------------------------------------------------------------
# Text that drifts from the code when the code changes
# ------------------------------------------------------------------------------------------------


def test_the_docs_name_the_bias_gradient_as_the_code_computes_it() -> None:
    """HOW_IT_WORKS quotes the bias gradient as Conv2D.backward computes it, and bench/RESULTS.md's speed-trick
    table says the column-sums trick is in the core exactly when main.py uses it."""
    in_core = "column_sums(grad_rows)" in inspect.getsource(main.Conv2D.backward)
    assert ("`column_sums`" in DOC) == in_core
    results = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    row = next(line for line in results.splitlines() if line.startswith("| a. bias gradient"))
    assert row.split("|")[2].strip().startswith("yes" if in_core else "no"), row


def test_docs_and_bench_carry_no_issue_numbers() -> None:
    """The docs say what the code does, not which ticket asked for it."""
    paths = [*(ROOT / "docs").glob("*.md"), *(ROOT / "bench").glob("*.md"), *(ROOT / "bench").glob("*.py"),
             ROOT / "README.md"]
    found = [f"{path.relative_to(ROOT)}: {match.group(0)}" for path in paths
             for match in re.finditer(r"\bissues?\s*#?\d+|\bround two\b", path.read_text(encoding="utf-8"),
                                      re.IGNORECASE)]
    assert not found, found


README_PATH = ROOT / "README.md"
README = README_PATH.read_text(encoding="utf-8")
MAX_LINES = 300

# A lab notebook, not a user guide: times of day, sessions, runs counted between times.
NOTEBOOK_PATTERNS = [
    re.compile(r"\b(at|between) [0-2][0-9]:[0-5][0-9]\b", re.IGNORECASE),
    re.compile(r"\bthis session\b", re.IGNORECASE),
    re.compile(r"\blast session\b", re.IGNORECASE),
    re.compile(r"\bruns between\b", re.IGNORECASE),
]


def section(heading: str) -> str:
    """The text of the README's `## heading` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", README, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {heading}' section"
    return match.group(1)


def strip_trailing(text: str) -> list[str]:
    """Lines without trailing whitespace, and without blank lines at the end."""
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


@pytest.fixture(scope="module")
def help_text() -> str:
    run = subprocess.run([sys.executable, str(MAIN.relative_to(ROOT)), "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_configuration_points_to_a_config_yaml_that_comments_every_key() -> None:
    """The README sends the reader to config.yaml for the keys, so config.yaml must explain each one: every key
    line (`key: value`) carries a comment, on its line or on a line of its own just above it."""
    assert "[`config.yaml`](config.yaml)" in section("Configuration")
    lines = (ROOT / "config.yaml").read_text(encoding="utf-8").splitlines()
    bare = [line for number, line in enumerate(lines)
            if re.match(r"^\s+[a-z_]+:\s*\S", line) and "#" not in line
            and not (number and lines[number - 1].strip().startswith("#"))
            and not line.strip().startswith("- ")]
    assert not bare, "config.yaml keys without a comment:\n" + "\n".join(bare)


def test_every_flag_of_help_is_in_the_readme(help_text: str) -> None:
    flags = sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text)))
    assert len(flags) >= 10, f"could not read the flags from --help:\n{help_text}"
    missing = [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", README)]
    assert not missing, f"flags of --help missing from README.md: {', '.join(missing)}"


def test_quick_start_commands() -> None:
    quick_start = section("Quick start")
    venv = quick_start.find("python3 -m venv .venv && source .venv/bin/activate")
    install = quick_start.find("pip install -r requirements.txt")
    assert venv >= 0, "the quick start should create and activate a venv"
    assert install > venv, "the quick start should create the venv before pip install"
    commands = [line.split("#")[0].strip() for line in quick_start.splitlines()]
    assert "python src/main.py" in commands
    assert "pytest tests/" in commands


def test_test_command() -> None:
    commands = [line.split("#")[0].strip() for line in section("Tests").splitlines()]
    assert "pytest tests/" in commands


def test_readme_is_short() -> None:
    lines = README.splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; at most {MAX_LINES}"


@pytest.mark.parametrize("pattern", NOTEBOOK_PATTERNS, ids=lambda p: p.pattern)
def test_no_lab_notebook_lines(pattern: re.Pattern) -> None:
    hits = [f"{number}: {line}" for number, line in enumerate(README.splitlines(), start=1) if pattern.search(line)]
    assert not hits, "lab-notebook lines in README.md (measured results go in bench/RESULTS.md tables):\n" \
        + "\n".join(hits)


def test_every_test_file_the_docs_name_exists() -> None:
    """The docs send readers to test files by name (`pytest tests/test_x.py -k ...`): when tests move, so must they."""
    paths = [*(ROOT / "docs").glob("*.md"), *(ROOT / "bench").glob("*.md"), ROOT / "README.md", ROOT / ".ci" / "run"]
    named = {(path.relative_to(ROOT), name) for path in paths
             for name in re.findall(r"tests/(test_\w+\.py)", path.read_text(encoding="utf-8"))}
    missing = sorted(f"{path}: tests/{name}" for path, name in named if not (ROOT / "tests" / name).is_file())
    assert not missing, missing
