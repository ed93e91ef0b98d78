"""Int8 graphs the query-encoder benchmark measures beside the two Suwen's export chooses from.

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
- ``smooth_per_token_int8``: Suwen's ``int8_per_token`` graph (``suwen.indexes.smoothquant``:
  SmoothQuant scaling calibrated on the sample data's abstracts, never on the PubMedQA
  questions the agreement uses) with the feed-forward output products quantised too.
- ``int8_blocks_64``: Suwen's 8-bit blocks with blocks of 64 instead of 32.

Schemes checked for agreement only (``REJECTED``; each fails the 0.999 gate on MiniLM, so their
speed does not matter): 8-bit blocks of 128; ``quantize_dynamic`` with uint8 weights, with
``reduce_range``, with one weight scale per tensor, and SmoothQuant scaling (alpha 0.5 / 0.65 /
0.8) before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from suwen.indexes import smoothquant

REJECTED_SMOOTH_ALPHAS = (0.5, 0.65, 0.8)
REJECTED = (
    "int8_blocks_128",
    "dynamic_int8_uint8_weights",
    "dynamic_int8_reduce_range",
    "dynamic_int8_per_tensor_weights",
    *(f"smooth_dynamic_int8_alpha_{alpha}" for alpha in REJECTED_SMOOTH_ALPHAS),
)


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


def smoothed_graphs(
    float_graph: Path, maxima: dict[str, np.ndarray], targets: dict[str, Path]
) -> None:
    """Write the ``smooth_per_token_int8`` graph and the ``smooth_dynamic_int8_alpha_*`` ones
    ``targets`` asks for, from the activation ``maxima`` Suwen's ``int8_per_token`` export
    calibrates on."""
    smoothed = float_graph.with_name("smoothed.onnx")
    smoothquant.smooth(float_graph, smoothed, maxima)
    smoothquant.per_token_int8(smoothed, targets["smooth_per_token_int8"])
    for alpha in REJECTED_SMOOTH_ALPHAS:
        target = targets.get(f"smooth_dynamic_int8_alpha_{alpha}")
        if target is not None:
            smoothquant.smooth(float_graph, smoothed, maxima, alpha)
            dynamic_int8_all(smoothed, target)
    smoothed.unlink()
    smoothed.with_name("smoothed.onnx.data").unlink()


def dynamic_int8_all(source: Path, target: Path, **change: Any) -> None:
    """ONNX Runtime's ``quantize_dynamic`` as the benchmark's ``dynamic_int8`` row uses it
    (per-channel int8 weights), with ``change`` to its arguments."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    options: dict[str, Any] = {"per_channel": True, "weight_type": QuantType.QInt8, **change}
    quantize_dynamic(source, target, **options)
