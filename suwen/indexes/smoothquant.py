"""The query encoder's int8 graph with activations quantised per token, after SmoothQuant.

One of the graphs :mod:`suwen.indexes.onnx_encoder` tries when it exports a query encoder:

- each weight product's input channels are divided by ``s = max|X|^alpha / max|W|^(1 - alpha)``
  and the weight rows multiplied by ``s`` (the same function; channel outliers move from the
  activations into the weights). The activation maxima are measured once, at export, on
  abstracts of the sample data that ships in the package (never on the probe texts the export
  is checked on);
- each product then runs as int8 weights per output channel times uint8 activations quantised
  per token at run time (each row its own scale: a token with outlier activations spoils only
  its own row), ``MatMulInteger`` with the scales applied after;
- the feed-forward output products (their input is GELU's, where BERT's largest outliers are)
  stay float32: quantised too, MiniLM's vectors moved below the 0.999 gate.

Graph edits go through the ``onnx`` package; nothing here imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SMOOTH_ALPHA = 0.65
CALIBRATION_TEXTS = 200
CALIBRATION_CHARS = 400
CALIBRATION_TOKENS = 256


def sample_abstracts(count: int = CALIBRATION_TEXTS) -> list[str]:
    """The openings of the sample data's PubMed abstract sections (the package's own file)."""
    from suwen.demo import bundled_sample_data  # at export only, not in every search process

    file = bundled_sample_data() / "pubmedqa" / "ori_pqal.json"
    records = json.loads(file.read_text(encoding="utf-8"))
    sections = (str(part) for record in records.values() for part in record["CONTEXTS"])
    return [text[:CALIBRATION_CHARS] for text, _ in zip(sections, range(count), strict=False)]


def weight_products(model: Any) -> list[Any]:
    """The graph's MatMul nodes whose second input is a constant weight."""
    constants = {tensor.name for tensor in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants]


def is_ffn_out(name: str) -> bool:
    """A BERT feed-forward output product, by the exporter's node name."""
    return "/output/dense" in name and "attention/output" not in name


def quantise(
    source: Path,
    target: Path,
    tokenizer: Path,
    inputs: Sequence[str],
    texts: Sequence[str] | None = None,
) -> None:
    """``source``'s float32 graph as the smoothed per-token int8 graph ``target`` (weights in
    ``target.name + '.data'``), calibrated on ``texts`` (default: :func:`sample_abstracts`)."""
    maxima = activation_maxima(source, tokenizer, inputs, texts or sample_abstracts())
    quantise_with(source, target, maxima)


def quantise_with(source: Path, target: Path, maxima: dict[str, np.ndarray]) -> None:
    """As :func:`quantise`, with the activation maxima already measured."""
    smoothed = target.with_name(f"smoothed-{target.name}")
    smooth(source, smoothed, maxima)
    per_token_int8(smoothed, target, lambda name: not is_ffn_out(name))
    smoothed.unlink()
    smoothed.with_name(f"{smoothed.name}.data").unlink()


def activation_maxima(
    source: Path, tokenizer: Path, inputs: Sequence[str], texts: Sequence[str]
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
    probe = source.with_name(f"activations-{source.name}")
    save(model, probe)
    try:
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        encoder = Tokenizer.from_file(str(tokenizer))
        encoder.no_padding()
        encoder.enable_truncation(CALIBRATION_TOKENS)
        maxima: dict[str, np.ndarray] = {}
        for text in texts:
            ids = np.array([encoder.encode(text).ids], dtype=np.int64)
            feeds = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "token_type_ids": np.zeros_like(ids),
            }
            outputs = session.run(names, {k: feeds[k] for k in inputs})
            for name, value in zip(names, outputs, strict=True):
                row = np.abs(np.asarray(value)).reshape(-1, value.shape[-1]).max(axis=0)
                maxima[name] = np.maximum(maxima.get(name, row), row)
    finally:
        probe.unlink(missing_ok=True)
        probe.with_name(f"{probe.name}.data").unlink(missing_ok=True)
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
    steps: list[tuple[str, list[str], dict[str, Any]]] = [
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
    """``model`` as ``target`` with its weights in ``target.name + '.data'`` beside it."""
    import onnx

    (target.parent / f"{target.name}.data").unlink(missing_ok=True)
    onnx.save_model(model, str(target), save_as_external_data=True, location=f"{target.name}.data")
