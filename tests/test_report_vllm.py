"""`suwen report` through a real vLLM server (the tiny random checkpoint on the CPU): the
model's words are random, so this checks what must hold whatever it says: the study's images
(and a prior's) reach the request, the reply is parsed into a report with real accounting."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from suwen.cli import app
from suwen.config import Settings
from suwen.privacy import local_api_key
from suwen.types import DraftReport

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture()
def real_env(
    tiny_model_dir: Path,
    suwen_home: Path,
    vllm_settings: Settings,
    vllm_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shared server (started by now) was started from the fixture's data home: its key.
    key = local_api_key(vllm_settings.home)
    if key:
        monkeypatch.setenv("VLLM_API_KEY", key)
    monkeypatch.setenv("SUWEN_VLM", str(tiny_model_dir))
    monkeypatch.setenv("SUWEN_MAX_TOKENS", "24")
    monkeypatch.setenv("COLUMNS", "200")


def _report(*args: str) -> DraftReport:
    result = CliRunner().invoke(app, ["report", *args, "--json"])
    assert result.exit_code in (0, 1), result.output  # 1: random words may make no report
    return DraftReport.model_validate_json(result.stdout)


def test_report_reaches_real_vllm_with_its_images(
    real_env: None, vllm_url: str, shared_data: Path
) -> None:
    images = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[:2]
    alone = _report(str(images[1]), "--plain", "--vllm-url", vllm_url)
    assert alone.mode == "plain" and alone.model_calls == 1
    assert 0 < alone.tokens.completion <= 24 and alone.text.strip()
    compared = _report(str(images[1]), "--prior", str(images[0]), "--plain", "--vllm-url", vllm_url)
    assert compared.prior_images == [str(images[0])] and compared.model_calls == 1
    # The prior's image (and its label) are in the request: the prompt grew by an image's tokens.
    assert compared.tokens.prompt > alone.tokens.prompt + 64
    volume = shared_data / "imaging" / "nifti" / "anatomical.nii"
    views = _report(str(volume), "--plain", "--slices", "2", "--vllm-url", vllm_url)
    assert views.model_calls == 1 and views.tokens.prompt > 0  # 2 slices + 2 reformats admitted
