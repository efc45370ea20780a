"""--export FILE.onnx: the model as an ONNX graph, to open in Netron or run with onnxruntime (in Python, in a
browser, on a phone).

The graph, for a model of input (H, W, C):

    image (N, H, W, C) float32 in [0, 1]
      -> Transpose(perm 0, 3, 1, 2)                       to ONNX's (N, C, H, W)
      -> one node per layer:  Conv (weights (F, C, k, k), pads p, strides s), MaxPool / AveragePool (kernel and
         strides of the layer, no padding, no ceil mode), Relu, Tanh, Flatten, Gemm (y = x W + b), BatchNormalization
         (gamma, beta, running mean and variance, eps), Identity for Dropout (evaluation is the identity)
      -> logits (N, classes)
      -> Softmax(axis 1) -> probabilities (N, classes)

ONNX flattens (C, H, W) where numpy-cnn flattens (H, W, C): the rows of the dense layer after a Flatten (and the
per-feature values of a BatchNorm between them) are permuted (torch_twin.flatten_order), so the numbers agree.
The model's metadata (metadata_props) documents the preprocessing and the model: layout, scale, colour, class
names (JSON), input shape, the layer list and the training summary (JSON).

Built with the `onnx` package's helper API (an optional dependency, imported only here), opset OPSET and IR
version IR_VERSION, which the onnxruntime of every supported Python loads. A leaf module: it never imports main.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from errors import ConfigError
from torch_twin import layouts

OPSET = 17
IR_VERSION = 10
PRODUCER = "numpy-cnn"


def node_for(layer: Any, index: int, source: str, layout: dict, initializers: list) -> Any:
    """The ONNX node of one layer reading the value `source`, its output named after the layer; its weights
    (in ONNX's layout) appended to `initializers`. ConfigError naming the layer when ONNX cannot express it."""
    from onnx import helper, numpy_helper

    kind, output = type(layer).__name__, f"layer{index}_{type(layer).__name__.lower()}"

    def weights(*names: str) -> list[str]:
        """Initialisers for the layer's arrays `names` (project names), in ONNX's layout; their names."""
        for name in names:
            array = {**layer.params, **layer.buffers}[name]
            initializers.append(numpy_helper.from_array(
                np.ascontiguousarray(layout[name](array), dtype=np.float32), f"{output}.{name}"))
        return [f"{output}.{name}" for name in names]

    if kind == "Conv2D":
        k, p, s = layer.kernel_size, layer.padding, layer.stride
        return helper.make_node("Conv", [source, *weights("W", "b")], [output], name=output,
                                kernel_shape=[k, k], pads=[p, p, p, p], strides=[s, s])
    if kind in ("MaxPool2D", "AvgPool2D"):
        options = {"count_include_pad": 0} if kind == "AvgPool2D" else {}
        return helper.make_node("MaxPool" if kind == "MaxPool2D" else "AveragePool", [source], [output],
                                name=output, kernel_shape=[layer.pool_size] * 2, strides=[layer.stride] * 2,
                                ceil_mode=0, **options)
    if kind == "Dense":  # Gemm: y = A B + C, A (N, in), B (in, out) in the project's layout with permuted rows
        matrix = np.ascontiguousarray(layout["W"](layer.params["W"]).T, dtype=np.float32)
        initializers.append(numpy_helper.from_array(matrix, f"{output}.W"))
        return helper.make_node("Gemm", [source, f"{output}.W", *weights("b")], [output], name=output)
    if kind == "BatchNorm":
        return helper.make_node("BatchNormalization",
                                [source, *weights("gamma", "beta", "running_mean", "running_var")], [output],
                                name=output, epsilon=float(layer.eps))
    simple = {"ReLU": "Relu", "Tanh": "Tanh", "Flatten": "Flatten", "Dropout": "Identity"}
    if kind not in simple:
        raise ConfigError(f"cannot export to ONNX: model layer {index} ({kind}) has no ONNX equivalent")
    return helper.make_node(simple[kind], [source], [output], name=output)


def onnx_model(model: Any, meta: dict) -> Any:
    """The checked ONNX ModelProto of a project model (main.Sequential) and what its model file records
    (meta: class_names, and model, training, data, preprocess when known). ConfigError for a layer ONNX cannot
    express."""
    import onnx
    from onnx import TensorProto, helper

    height, width, channels = model.input_shape
    initializers: list = []
    nodes = [helper.make_node("Transpose", ["image"], ["image_nchw"], name="nhwc_to_nchw", perm=[0, 3, 1, 2])]
    source = "image_nchw"
    for index, (layer, layout) in enumerate(zip(model.layers, layouts(model))):
        nodes.append(node_for(layer, index, source, layout, initializers))
        source = nodes[-1].output[0]
    nodes[-1].output[0] = "logits"
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1))
    classes = len(meta["class_names"])
    graph = helper.make_graph(
        nodes, "numpy_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", height, width, channels])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        initializers)
    proto = helper.make_model(graph, producer_name=PRODUCER, opset_imports=[helper.make_opsetid("", OPSET)])
    proto.ir_version = IR_VERSION
    proto.doc_string = ("numpy-cnn model. Input 'image': float32 (N, H, W, C), pixel values / 255 in [0, 1]. "
                        "Outputs 'logits' and 'probabilities' (softmax) per class, in the order of class_names.")
    colour = {1: "grey", 3: "RGB"}.get(channels, f"{channels} channels")
    properties = {"layout": "NHWC", "scale": "pixel values / 255, in [0, 1]", "colour": colour,
                  "input_shape": json.dumps([height, width, channels]),
                  "class_names": json.dumps(meta["class_names"])}
    properties.update({key: json.dumps(meta[key]) for key in ("model", "training", "data", "preprocess")
                       if meta.get(key) is not None})
    helper.set_model_props(proto, properties)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(path: Path, model: Any, meta: dict, write: Callable[[Path, Callable[[Any], None]], None]) -> None:
    """Write the ONNX model to path through write(path, writer) (plumbing.write_atomic: whole or not at all)."""
    proto = onnx_model(model, meta)
    data = proto.SerializeToString()
    write(path, lambda f: f.write(data))
