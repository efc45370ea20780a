"""--export FILE.onnx / FILE.pt and --load-model FILE.pt: every recipe in configs/, trained briefly on the real
MNIST sample, gives the same logits in onnxruntime (batch 1 and 256, 1,000 images), in ONNX's reference
evaluator and in PyTorch (the twin with the exported state_dict) as in numpy-cnn; numpy -> .pt -> numpy gives
the very same weights; the command line writes and reads the files, and refuses what it cannot do in one line.
Skipped with a reason where onnx, onnxruntime or torch is not installed (they are optional).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, find_data, run_cli, write_config

import main
import modelfile
from errors import CNNError, ConfigError, ModelFileError
from exports import check_exports, export_model, write_exports
from torch_twin import build_twin, copy_from_state_dict, read_pt, torch_twin

onnx = pytest.importorskip("onnx", reason="onnx is optional: pip install -r requirements-test.txt")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is optional: pip install -r requirements-test.txt")
torch = pytest.importorskip("torch", reason="torch is optional: pip install -r requirements-test.txt")

RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
N_TRAIN, N_TEST = 256, 1000


@pytest.fixture(scope="module")
def sample_data() -> main.Dataset:
    """256 training and 1,000 test images of the real MNIST sample (skip where it is absent)."""
    folder, missing = find_data("NUMPY_CNN_MNIST")
    if folder is None:
        pytest.skip(missing)
    data_cfg = main.load_config(RECIPES[0])["data"]
    data_cfg.update(dataset="mnist", path=str(folder), n_train=N_TRAIN, n_test=N_TEST, n_val=0,
                    allow_synthetic_fallback=False)
    return main.load_data(data_cfg)


def trained(recipe: Path, data: main.Dataset) -> tuple[main.Sequential, dict]:
    """The recipe's model after one epoch on the 256 sample images (its batch size, optimiser and rate), and what
    its model file would record."""
    cfg = main.load_config(recipe)
    rngs = main.make_rngs(0)
    model = main.build_model(cfg["model"], data.input_shape, data.num_classes, rngs["init"], rngs["dropout"])
    result = main.train(model, main.make_optimizer(cfg["training"]), data, epochs=1,
                        batch_size=cfg["training"]["batch_size"], rng=rngs["shuffle"])
    assert result.status == "completed"
    return model, modelfile.model_meta(model, cfg["model"], data, {"epochs_completed": 1, "history": result.history})


def numpy_logits(model: main.Sequential, x: np.ndarray) -> np.ndarray:
    return np.concatenate([model.forward(x[i:i + 250], training=False) for i in range(0, len(x), 250)])


def onnx_logits(path: Path, x: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    parts = [session.run(["logits", "probabilities"], {"image": x[i:i + batch_size]})
             for i in range(0, len(x), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_onnx_export_of_each_recipe_gives_numpy_cnn_s_logits(recipe: Path, sample_data: main.Dataset,
                                                             tmp_path: Path) -> None:
    """onnxruntime's logits equal numpy-cnn's to 1e-4 on 1,000 test images at batch sizes 1 and 256, with no
    argmax disagreement; its probabilities are the softmax; the reference evaluator agrees on 10 images; the
    file passes the full checker and documents its input in the metadata."""
    model, meta = trained(recipe, sample_data)
    path = tmp_path / "model.onnx"
    export_model(str(path), model, meta)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version == 10 and next(o.version for o in proto.opset_import if o.domain == "") <= 21
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits", "probabilities"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["layout"] == "NHWC" and props["colour"] == "grey" and json.loads(props["class_names"]) == \
        sample_data.class_names and json.loads(props["training"])["epochs_completed"] == 1

    x = sample_data.x_test
    ours = numpy_logits(model, x)
    assert np.abs(ours).max() > 1  # trained logits, not all near zero
    for batch_size in (1, 256):
        logits, probabilities = onnx_logits(path, x, batch_size)
        assert np.abs(logits - ours).max() < 1e-4, f"batch {batch_size}"
        assert np.array_equal(logits.argmax(axis=1), ours.argmax(axis=1)), f"batch {batch_size}"
        assert np.abs(probabilities - main.softmax(ours)).max() < 1e-5
    from onnx.reference import ReferenceEvaluator

    reference, = ReferenceEvaluator(proto).run(["logits"], {"image": x[:10]})
    assert np.abs(reference - ours[:10]).max() < 1e-4


def test_a_colour_model_exports_with_its_channels(tmp_path: Path) -> None:
    """Any number of input channels: a 3-channel model with BatchNorm on images and after Flatten (its running
    statistics and gammas made random, so that the permutation of the features matters) gives the same logits."""
    layers = [{"conv2d": {"filters": 4, "kernel_size": 3, "padding": 1, "stride": 2}}, "batchnorm", "relu",
              {"maxpool2d": {"pool_size": 3, "stride": 2}}, "flatten", "batchnorm", {"dense": {"units": 5}}]
    from config_schema import check_model

    model_cfg = check_model({"layers": layers})
    model = main.build_model(model_cfg, (13, 11, 3), 5, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    for layer in model.layers:
        for values in {**layer.params, **layer.buffers}.values():
            values[...] = rng.uniform(0.5, 1.5, values.shape) if values.ndim == 1 else values
    path = tmp_path / "colour.onnx"
    export_model(str(path), model, {"class_names": list("abcde"), "model": model_cfg})
    x = rng.random((20, 13, 11, 3), dtype=np.float32)
    logits, _ = onnx_logits(path, x, 20)
    assert np.abs(logits - model.forward(x, training=False)).max() < 1e-4
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["colour"] == "RGB" and json.loads(props["input_shape"]) == [13, 11, 3]


def test_a_layer_onnx_cannot_express_is_refused_in_one_line(tmp_path: Path) -> None:
    class Attention(main.Layer):
        pass

    model = main.build_model({"layers": [{"flatten": {}}, {"dense": {"units": 10}}]}, (4, 4, 1), 10,
                             np.random.default_rng(0))
    model.layers.insert(1, Attention())
    with pytest.raises(ConfigError, match=r"model layer 1 \(Attention\) has no ONNX equivalent") as error:
        export_model(str(tmp_path / "m.onnx"), model, {"class_names": main.DIGIT_NAMES})
    assert "\n" not in str(error.value) and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_pt_round_trip_gives_the_same_weights_and_torch_gives_the_same_logits(
        recipe: Path, sample_data: main.Dataset, tmp_path: Path) -> None:
    """numpy -> .pt -> numpy: every weight and BatchNorm statistic bit for bit. The twin built from the file's
    layer list, with the file's state_dict (strict), gives numpy-cnn's logits to 1e-4."""
    model, meta = trained(recipe, sample_data)
    path = tmp_path / "model.pt"
    export_model(str(path), model, meta)
    loaded = modelfile.load_model(path, main.build_model)
    for index, (ours, back) in enumerate(zip(model.layers, loaded.model.layers)):
        for name, array in {**ours.params, **ours.buffers}.items():
            restored = {**back.params, **back.buffers}[name]
            assert restored.dtype == array.dtype and np.array_equal(restored, array), f"layer {index} {name}"
    assert loaded.meta["class_names"] == sample_data.class_names and loaded.meta["training"]["epochs_completed"] == 1

    state_dict, stored = read_pt(path)
    twin = build_twin(stored["model"], stored["input_shape"], len(stored["class_names"]), main.build_model)
    twin.load_state_dict(state_dict, strict=True)
    twin.eval()
    x = sample_data.x_test[:256]
    with torch.no_grad():
        theirs = twin(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    ours = model.forward(x, training=False)
    assert np.abs(theirs - ours).max() < 1e-4
    assert np.array_equal(theirs.argmax(axis=1), ours.argmax(axis=1))


def test_a_bare_state_dict_takes_the_layer_list_from_the_config(tmp_path: Path) -> None:
    """A state_dict saved by a PyTorch user (no meta) is read with the config's layer list, input shape and class
    names; without them it is refused in one line; a file that would unpickle an object is refused."""
    layers = main.load_config(ROOT / "configs" / "lenet5.yaml")["model"]
    twin = build_twin(layers, (28, 28, 1), 10, main.build_model, seed=3)
    path = tmp_path / "bare.pt"
    torch.save(twin.state_dict(), path)
    defaults = {"model": layers, "input_shape": [28, 28, 1], "class_names": main.DIGIT_NAMES, "dataset": "mnist"}
    loaded = modelfile.load_model(path, main.build_model, defaults)
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    with torch.no_grad():
        theirs = twin.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    assert np.abs(loaded.model.forward(x, training=False) - theirs).max() < 1e-5
    with pytest.raises(ModelFileError, match="without model, input_shape, class_names"):
        modelfile.load_model(path, main.build_model)
    with pytest.raises(ModelFileError, match="layer list, input shape or class names do not fit"):
        modelfile.load_model(path, main.build_model, dict(defaults, input_shape=[28, 28]))
    wrong = dict(defaults, model=main.load_config(ROOT / "configs" / "keras_mnist.yaml")["model"])
    with pytest.raises(ModelFileError, match="do not fit the layer list"):
        modelfile.load_model(path, main.build_model, wrong)
    torch.save({"state_dict": twin.state_dict(), "meta": Path("x")}, tmp_path / "object.pt")
    with pytest.raises(ModelFileError, match="not a readable PyTorch state_dict"):
        modelfile.load_model(tmp_path / "object.pt", main.build_model, defaults)


def test_a_state_dict_that_does_not_fit_is_refused_in_one_line(tmp_path: Path) -> None:
    """Tensors of the wrong shape (even of the right size), not floats or not finite; a file that is not a
    state_dict; a layer without a PyTorch twin: ModelFileError naming what is wrong."""
    layers = main.load_config(ROOT / "configs" / "mnist_best.yaml")["model"]
    model = main.build_model(layers, (28, 28, 1), 10, np.random.default_rng(0))
    good = build_twin(layers, (28, 28, 1), 10, main.build_model).state_dict()
    for key, value, message in [("0.weight", good["0.weight"].permute(1, 0, 2, 3), r"0\.weight has shape \(1, 32"),
                                ("0.weight", good["0.weight"].double(), None),
                                ("1.running_var", good["1.running_var"].long(), "int64"),
                                ("10.bias", good["10.bias"] * float("nan"), "NaN or infinite")]:
        state = dict(good, **{key: value})
        if message is None:  # float64 is read, in the model's float32
            copy_from_state_dict(model, state, "m.pt")
            assert model.layers[0].params["W"].dtype == np.float32
            continue
        with pytest.raises(ModelFileError, match=message):
            copy_from_state_dict(model, state, "m.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ModelFileError, match="not a PyTorch state_dict"):
        read_pt(tmp_path / "list.pt")
    torch.save({"state_dict": good, "meta": [1]}, tmp_path / "meta.pt")
    with pytest.raises(ModelFileError, match="meta entry is not a mapping"):
        read_pt(tmp_path / "meta.pt")

    class Attention(main.Layer):
        pass

    model.layers.insert(9, Attention())
    with pytest.raises(ModelFileError, match="no PyTorch twin for the layer Attention"):
        torch_twin(model)


def test_check_exports_refuses_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(CNNError, match=r"--export m\.h5: expected a file ending in \.onnx .* or \.pt"):
        check_exports(["m.h5"])
    with pytest.raises(CNNError, match="same file"):
        check_exports([str(tmp_path / "a.onnx"), str(tmp_path / "a.onnx")])
    (tmp_path / "a-file").write_text("")
    model = main.build_model({"layers": [{"flatten": {}}, {"dense": {"units": 10}}]}, (4, 4, 1), 10,
                             np.random.default_rng(0))
    problems = write_exports([str(tmp_path / "a-file" / "m.onnx"), str(tmp_path / "m.pt")], model,
                             {"class_names": main.DIGIT_NAMES})
    assert len(problems) == 1 and "a-file/m.onnx" in problems[0] and (tmp_path / "m.pt").is_file()


def test_the_command_line_exports_after_training_and_from_a_pt_file(mnist_5k: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    """Train 1 epoch and write m.onnx, m.pt and the results; then --load-model m.pt --export again.onnx (no
    training) gives a file with the same logits; m.pt evaluates (--epochs 0); a bad suffix is exit 2 in one line.
    (The last two in this process: main.main, as the command line runs it.)"""
    config = write_config(tmp_path, model={"layers": [{"conv2d": {"filters": 4, "kernel_size": 3}}, "batchnorm",
                                                      "relu", {"maxpool2d": {"pool_size": 2}}, "flatten",
                                                      {"dense": {"units": 10}}]})
    common = ["--config", str(config)]
    run = run_cli([*common, "--data-path", str(mnist_5k), "--n-train", "200", "--n-test", "100", "--epochs", "1",
                   "--export", "m.onnx", "--export", "m.pt", "--output", "r.json"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "r.json").read_text())["files"]["exports"] == ["m.onnx", "m.pt"]
    again = run_cli([*common, "--load-model", "m.pt", "--export", "again.onnx"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    x = np.random.default_rng(0).random((32, 28, 28, 1), dtype=np.float32)
    assert np.abs(onnx_logits(tmp_path / "m.onnx", x, 32)[0] - onnx_logits(tmp_path / "again.onnx", x, 32)[0]
                  ).max() < 1e-6
    monkeypatch.chdir(tmp_path)
    assert main.main([*common, "--load-model", "m.pt", "--epochs", "0", "--data-path", str(mnist_5k),
                      "--n-train", "200", "--n-test", "100"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main.main([*common, "--load-model", "m.pt", "--export", "m.keras"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "expected a file ending in .onnx" in error


@pytest.mark.parametrize(("package", "suffix"), [("onnx", ".onnx"), ("torch", ".pt")])
def test_a_missing_package_is_exit_2_with_the_install_command_before_training(tmp_path: Path, package: str,
                                                                             suffix: str) -> None:
    """Without the package (hidden from the process), --export is refused before any data is read or any
    epoch runs: exit 2, one line naming the command that installs it, no results file."""
    code = (f"import sys; sys.modules[{package!r}] = None; sys.path.insert(0, {str(ROOT / 'src')!r}); "
            "import main; sys.argv[0] = 'main.py'; sys.exit(main.main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "--dataset", "digits", "--epochs", "1", "--output", "r.json",
                          "--export", f"m{suffix}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and f"pip install {package}" in run.stderr, run.stderr
    assert "epoch" not in run.stdout and not (tmp_path / "r.json").exists()
    if package == "torch":  # nor can a .pt file be read
        (tmp_path / "m.pt").write_bytes(b"")
        run = subprocess.run([sys.executable, "-c", code, "--load-model", "m.pt", "--predict", "m.pt"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and "needs PyTorch" in run.stderr, run.stderr
