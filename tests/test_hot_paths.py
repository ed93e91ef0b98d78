"""What every model call does, done once or in C, with the same result as before: the
structured-output schema, sanitising ASCII text, and the process's logging left alone by the
ONNX quantiser."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import pytest
from pydantic import BaseModel

from suwen.llm.client import response_format_for
from suwen.sanitize import drop_invisible, for_prompt


class Verdict(BaseModel):
    relevant: bool
    reason: str


def test_the_schema_is_generated_once_per_reply_type(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = Verdict.model_json_schema()
    first = response_format_for(Verdict)
    calls: list[object] = []
    monkeypatch.setattr(Verdict, "model_json_schema", lambda *a, **k: calls.append(a) or {})
    assert response_format_for(Verdict) is first and not calls
    assert first["json_schema"] == {"name": "Verdict", "schema": expected, "strict": True}


def _per_character(text: str) -> str:
    """The rule drop_invisible implements, one character at a time."""
    return "".join(
        ch
        for ch in text
        if ch in "\n\t" or unicodedata.category(ch) not in {"Cc", "Cf", "Cs", "Co"}
    )


@pytest.mark.parametrize(
    "text",
    [
        "".join(map(chr, range(128))) * 2,
        "plain abstract text, 12% (n=40); p<0.05\n\tindented",
        "\x1b[31mred\x1b[0m \x00nul \x7fdel \rcr",
        "non-ASCII: caf\u00e9 \u200bzero-width \u202ebidi \x85nel \ufeffbom",
    ],
)
def test_ascii_fast_path_drops_exactly_what_the_per_character_rule_drops(text: str) -> None:
    assert drop_invisible(text) == _per_character(text)


def test_every_code_point_is_dropped_or_kept_as_the_per_character_rule_says() -> None:
    everything = "".join(map(chr, range(0x110000)))  # the non-ASCII path: one class in C
    assert drop_invisible(everything) == _per_character(everything)


def test_ascii_controls_never_reach_a_prompt() -> None:
    assert for_prompt("a\x00b\x1b[0mc\x07d\te\nf") == "ab[0mcd\te\nf"


def test_quantising_an_export_leaves_the_process_logging_as_it_was(tmp_path: Path) -> None:
    """onnxruntime's quantiser calls logging.basicConfig(level=INFO) when imported; without
    care every later HTTP request of a batch run would be logged on stderr."""
    script = textwrap.dedent(
        """
        import logging, sys
        from pathlib import Path
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        from suwen.indexes.onnx_encoder import _quantise

        folder = Path(sys.argv[1])
        weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
            [numpy_helper.from_array(weight, "w")],
        )
        onnx.save(helper.make_model(graph), folder / "a.onnx")
        _quantise(folder / "a.onnx", folder / "b.onnx")
        print(*[node.op_type for node in onnx.load(folder / "b.onnx").graph.node])
        logging.getLogger("httpx").info("HTTP Request: POST /v1/chat/completions")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert run.stdout.split() == ["MatMulNBits"]
    assert "HTTP Request" not in run.stderr
