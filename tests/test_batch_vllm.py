"""`suwen batch` and `suwen ask` through a real vLLM server (the tiny random checkpoint on the
CPU, one server per test session). The model's words are random, so this checks what must hold
whatever it says: one line per question, answers with real model accounting, a clean JSON result.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen.cli import app
from suwen.llm.server import ManagedServer
from suwen.types import AgentResult

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture()
def real_env(
    tiny_model_dir: Path,
    suwen_home: Path,
    vllm_server: ManagedServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The session's server was started from another data home: its key, as a user passes a
    # running server's key.
    monkeypatch.setenv("VLLM_API_KEY", vllm_server.api_key or "")
    monkeypatch.setenv("SUWEN_VLM", str(tiny_model_dir))
    monkeypatch.setenv("SUWEN_MAX_TOKENS", "16")
    monkeypatch.setenv("COLUMNS", "200")


def test_batch_and_ask_through_real_vllm(
    real_env: None, vllm_url: str, shared_data: Path, tmp_path: Path
) -> None:
    tests = json.loads((shared_data / "vqa_rad" / "testset.json").read_text("utf-8"))[:6]
    folder = tmp_path / "study"
    folder.mkdir()
    rows = []
    for item in tests:
        shutil.copy(shared_data / "vqa_rad" / "images" / item["image_name"], folder)
        rows.append(
            {"id": str(item["qid"]), "image": item["image_name"], "question": item["question"]}
        )
    (folder / "questions.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n", "utf-8")
    out = tmp_path / "answers.jsonl"
    args = ["batch", str(folder), "--out", str(out), "--plain", "--vllm-url", vllm_url, "-c", "4"]

    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    lines = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert Counter(line["id"] for line in lines) == Counter(row["id"] for row in rows)
    for line in lines:
        if "error" not in line:
            result = AgentResult.model_validate(line)  # the line is the result plus id, images
            assert result.mode == "plain" and result.answer.strip()
            # The answer and its confidence probe (the self-check of a free answer).
            assert result.model_calls == 2 and result.tokens.completion > 0
            assert result.confidence is not None and 0 <= result.confidence <= 1
    # A second run asks only what has no answer yet, and still leaves one line per id.
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    answered = sum("error" not in line for line in lines)
    assert re.search(rf"answered before \(skipped\)\s*│\s*{answered}\b", second.stdout)
    lines = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    assert sorted(line["id"] for line in lines) == sorted(row["id"] for row in rows)

    image = folder / tests[0]["image_name"]
    question = tests[0]["question"]
    ask_args = ["ask", "--image", str(image), question, "--json", "--plain", "--vllm-url", vllm_url]
    ask = CliRunner().invoke(app, ask_args)
    assert ask.exit_code == 0, ask.output
    result = AgentResult.model_validate_json(ask.stdout)
    assert result.mode == "plain" and result.model_calls == 2
