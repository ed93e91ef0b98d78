"""Int8 graphs the query-encoder benchmark measures beside the one Suwen keeps.

Each takes the float32 ONNX graph of a transformer and writes a quantised one; the benchmark
times them on the MedCPT-shaped BERT-base and checks their cosine to the eager model on the
real MiniLM. Graph edits go through the ``onnx`` package; ONNX Runtime's quantiser is used
where it has the scheme.

- ``dynamic_int8_weights``: ONNX Runtime's ``quantize_dynamic`` restricted to the matrix
  products with constant weights (per-channel int8 weights, activations per tensor at run time);
  the attention products and the embedding table stay float.
- ``per_token_int8``: int8 weights per output channel, activations quantised per token (each
  row its own scale, computed at run time), ``MatMulInteger`` with the scales applied after: a
  token with outlier activations spoils only its own row.
- ``smooth_per_token_int8``: the same after SmoothQuant-style scaling: each input channel of a
  product divided by ``s = max|X|^alpha / max|W|^(1 - alpha)`` (activation maxima measured on
  real PubMed abstracts, never on the PubMedQA questions the agreement uses) and the weight rows
  multiplied by it, which moves channel outliers from the activations into the weights.
- ``smooth_per_token_int8_ffn_out_float``: as above with the feed-forward output products (their
  input is GELU's, where the largest outliers are) left float32.
- ``int8_blocks_64``: Suwen's 8-bit blocks with blocks of 64 instead of 32.

Schemes checked for agreement only (``REJECTED``; each fails the 0.999 gate on MiniLM, so their
speed does not matter): 8-bit blocks of 128; ``quantize_dynamic`` with uint8 weights, with
``reduce_range``, with one weight scale per tensor, and SmoothQuant scaling (alpha 0.5 / 0.65 /
0.8) before it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SMOOTH_ALPHA = 0.65
REJECTED_SMOOTH_ALPHAS = (0.5, 0.65, 0.8)
REJECTED = (
    "int8_blocks_128",
    "dynamic_int8_uint8_weights",
    "dynamic_int8_reduce_range",
    "dynamic_int8_per_tensor_weights",
    *(f"smooth_dynamic_int8_alpha_{alpha}" for alpha in REJECTED_SMOOTH_ALPHAS),
)
CALIBRATION_TEXTS = 200
CALIBRATION_CHARS = 400


def calibration_texts(data: Path, count: int = CALIBRATION_TEXTS) -> list[str]:
    """Titles and abstract openings of real PubMed records (the PubTator corpora)."""
    texts: list[str] = []
    for file in sorted((data / "abstracts").rglob("*.txt")):
        for line in file.read_text(encoding="utf-8", errors="ignore").splitlines():
            parts = line.split("|", 2)
            if len(parts) == 3 and parts[1] in ("t", "a"):
                texts.append(parts[2][:CALIBRATION_CHARS])
            if len(texts) >= count:
                return texts
    return texts


def weight_products(model: Any) -> list[Any]:
    """The graph's MatMul nodes whose second input is a constant weight."""
    constants = {tensor.name for tensor in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def is_ffn_out(name: str) -> bool:
    return "/output/dense" in name and "attention/output" not in name


def dynamic_int8_weights(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        source,
        target,
        per_channel=True,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        extra_options={"MatMulConstBOnly": True},
    )


def dynamic_variants(source: Path, targets: dict[str, Path]) -> None:
    """``quantize_dynamic`` over every MatMul and Gather with uint8 weights, with
    ``reduce_range`` (7-bit weights), and with one weight scale per tensor."""
    from onnxruntime.quantization import QuantType

    changes: dict[str, dict[str, Any]] = {
        "dynamic_int8_uint8_weights": {"weight_type": QuantType.QUInt8},
        "dynamic_int8_reduce_range": {"reduce_range": True},
        "dynamic_int8_per_tensor_weights": {"per_channel": False},
    }
    for name, change in changes.items():
        dynamic_int8_all(source, targets[name], **change)


def activation_maxima(
    source: Path, tokenizer: Path, inputs: tuple[str, ...], texts: list[str]
) -> dict[str, np.ndarray]:
    """Per input channel, the largest |activation| entering each weight product over ``texts``."""
    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    model = onnx.load(str(source))
    names = sorted({node.input[0] for node in weight_products(model)})
    for name in names:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    probe = source.with_name("activations.onnx")
    onnx.save_model(model, str(probe), save_as_external_data=True, location="activations.data")
    session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    encoder = Tokenizer.from_file(str(tokenizer))
    encoder.no_padding()
    encoder.enable_truncation(256)
    maxima: dict[str, np.ndarray] = {}
    for text in texts:
        ids = np.array([encoder.encode(text).ids], dtype=np.int64)
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
        }
        for name, value in zip(
            names, session.run(names, {k: feeds[k] for k in inputs}), strict=True
        ):
            row = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima.get(name, row), row)
    probe.unlink()
    probe.with_name("activations.data").unlink()
    return maxima


def smooth(
    source: Path, target: Path, maxima: dict[str, np.ndarray], alpha: float = SMOOTH_ALPHA
) -> None:
    """Divide each weight product's input by ``s`` per channel (one Mul node shared by the
    products reading it) and multiply the weight rows by ``s``: the same function."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    readers: dict[str, list[Any]] = {}
    for node in weight_products(model):
        readers.setdefault(node.input[0], []).append(node)
    for name, nodes in readers.items():
        rows = np.max(
            [np.abs(numpy_helper.to_array(weights[n.input[1]])).max(axis=1) for n in nodes], axis=0
        )
        scale = (
            np.maximum(maxima[name], 1e-5) ** alpha / np.maximum(rows, 1e-5) ** (1 - alpha)
        ).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(1 / scale, f"{name}_smooth"))
        first = min(list(model.graph.node).index(n) for n in nodes)
        model.graph.node.insert(
            first, onnx.helper.make_node("Mul", [name, f"{name}_smooth"], [f"{name}_smoothed"])
        )
        for node in nodes:
            weight = numpy_helper.to_array(weights[node.input[1]])
            weights[node.input[1]].CopyFrom(
                numpy_helper.from_array(weight * scale[:, None], node.input[1])
            )
            node.input[0] = f"{name}_smoothed"
    save(model, target)


def per_token_int8(
    source: Path, target: Path, chosen: Callable[[str], bool] = lambda _: True
) -> None:
    """Every chosen weight product as int8 weights per output channel times uint8 activations
    quantised per token (symmetric, zero point 128), rescaled to float after."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    for name, value in (
        ("pt_127th", np.float32(1 / 127)),
        ("pt_tiny", np.float32(1e-12)),
        ("pt_128", np.float32(128)),
        ("pt_zero", np.uint8(128)),
    ):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    nodes: list[Any] = []
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and chosen(node.name):
            nodes.extend(
                _per_token_product(graph, node, numpy_helper.to_array(weights[node.input[1]]))
            )
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    save(model, target)


def _per_token_product(graph: Any, node: Any, weight: np.ndarray) -> list[Any]:
    from onnx import TensorProto, helper, numpy_helper

    prefix = node.name
    column = (np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127).astype(np.float32)
    quantised = np.clip(np.round(weight / column), -127, 127).astype(np.int8)
    for suffix, value in (
        ("_wq", quantised),
        ("_wzero", np.zeros(weight.shape[1], np.int8)),
        ("_column", column),
    ):
        graph.initializer.append(numpy_helper.from_array(value, prefix + suffix))
    steps = [
        ("Abs", [node.input[0]], {}),
        ("ReduceMax", ["@"], {"axes": [-1], "keepdims": 1}),
        ("Mul", ["@", "pt_127th"], {}),
        ("Max", ["@", "pt_tiny"], {}),  # the row's scale: output 3
        ("Div", [node.input[0], "@3"], {}),
        ("Round", ["@"], {}),
        ("Add", ["@", "pt_128"], {}),
        ("Cast", ["@"], {"to": TensorProto.UINT8}),
        ("MatMulInteger", ["@", prefix + "_wq", "pt_zero", prefix + "_wzero"], {}),
        ("Cast", ["@"], {"to": TensorProto.FLOAT}),
        ("Mul", ["@", "@3"], {}),
    ]
    made: list[Any] = []
    for number, (op, inputs, attributes) in enumerate(steps):
        names = [_step_input(prefix, number, name) for name in inputs]
        made.append(helper.make_node(op, names, [f"{prefix}_pt{number}"], **attributes))
    made.append(
        helper.make_node(
            "Mul", [f"{prefix}_pt{len(steps) - 1}", prefix + "_column"], list(node.output)
        )
    )
    return made


def _step_input(prefix: str, number: int, name: str) -> str:
    if name == "@":
        return f"{prefix}_pt{number - 1}"
    if name.startswith("@"):
        return f"{prefix}_pt{name[1:]}"
    return name


def save(model: Any, target: Path) -> None:
    import onnx

    (target.parent / f"{target.name}.data").unlink(missing_ok=True)
    onnx.save_model(model, str(target), save_as_external_data=True, location=f"{target.name}.data")


def smoothed_graphs(
    float_graph: Path,
    tokenizer: Path,
    inputs: tuple[str, ...],
    data: Path,
    targets: dict[str, Path],
) -> None:
    """Write ``smooth_per_token_int8`` and ``smooth_per_token_int8_ffn_out_float`` graphs, and
    the ``smooth_dynamic_int8_alpha_*`` ones ``targets`` asks for."""
    maxima = activation_maxima(float_graph, tokenizer, inputs, calibration_texts(data))
    smoothed = float_graph.with_name("smoothed.onnx")
    smooth(float_graph, smoothed, maxima)
    per_token_int8(smoothed, targets["smooth_per_token_int8"])
    per_token_int8(
        smoothed, targets["smooth_per_token_int8_ffn_out_float"], lambda name: not is_ffn_out(name)
    )
    for alpha in REJECTED_SMOOTH_ALPHAS:
        target = targets.get(f"smooth_dynamic_int8_alpha_{alpha}")
        if target is not None:
            smooth(float_graph, smoothed, maxima, alpha)
            dynamic_int8_all(smoothed, target)
    smoothed.unlink()
    smoothed.with_name("smoothed.onnx.data").unlink()


def dynamic_int8_all(source: Path, target: Path, **change: Any) -> None:
    """ONNX Runtime's ``quantize_dynamic`` as the benchmark's ``dynamic_int8`` row uses it
    (per-channel int8 weights), with ``change`` to its arguments."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    options: dict[str, Any] = {"per_channel": True, "weight_type": QuantType.QInt8, **change}
    quantize_dynamic(source, target, **options)
