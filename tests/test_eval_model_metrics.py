"""The model-based report scores (RaTE, GREEN) on the path that would run them, with tiny offline
stand-ins for their packages: the real ones need models that cannot be downloaded here. The
stand-ins keep the packages' call conventions (RaTEScore: predictions then references; GREEN:
references then predictions, mean first in what it returns), so a swapped argument or a
misread result fails here."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from suwen.evaluate import text_metrics
from suwen.evaluate.report import REPORT_METRICS, report_rows

PREDICTIONS = ["Findings: clear lungs. Impression: normal.", "Findings: effusion."]
REFERENCES = ["Findings: clear lungs. Impression: normal.", "Findings: no effusion."]

RATESCORE = """
import os

class RaTEScore:
    def __init__(self, bert_model="RaTE-NER-Deberta", eval_model="BioLORD-2023-C"):
        assert os.environ.get("HF_HUB_OFFLINE") == "1", "the hub must be offline"
        if os.environ.get("STANDIN_NO_MODEL"):
            raise OSError("We couldn't connect to the hub: BioLORD-2023-C not in the cache")

    def compute_score(self, candidates, references):
        assert all(c.startswith("Findings:") for c in candidates)
        return [1.0 if c == r else 0.5 for c, r in zip(candidates, references)]
"""

GREEN_SCORE = """
import os

class GREEN:
    def __init__(self, model_name, output_dir="."):
        assert os.environ.get("HF_HUB_OFFLINE") == "1", "the hub must be offline"
        assert model_name.endswith("GREEN-radllama2-7b") and os.path.isdir(output_dir)

    def __call__(self, refs, hyps):
        scores = [0.8 if "no effusion" in r and h == r else (1.0 if h == r else 0.2)
                  for r, h in zip(refs, hyps)]
        mean = sum(scores) / len(scores)
        return mean, 0.0, scores, "summary", None
"""


STAND_INS = {"RaTEScore": RATESCORE, "green_score": GREEN_SCORE}


@pytest.fixture()
def stand_ins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for package, source in STAND_INS.items():
        folder = tmp_path / package
        folder.mkdir()
        (folder / "__init__.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield tmp_path
    # Imported stand-ins stay in sys.modules (where find_spec looks first) after sys.path is
    # restored: later tests of the same process must see the packages as not installed.
    for package in STAND_INS:
        sys.modules.pop(package, None)


def test_rate_and_green_are_computed_when_their_packages_and_models_are_here(
    stand_ins: Path,
) -> None:
    computed = text_metrics.model_based(PREDICTIONS, REFERENCES)
    assert computed["RaTE"] == pytest.approx(0.75)
    # GREEN's first return value is the mean over (reference, prediction) pairs.
    assert computed["GREEN"] == pytest.approx(0.6)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_model_missing_on_disk_is_not_computed_with_why(
    stand_ins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STANDIN_NO_MODEL", "1")
    computed = text_metrics.model_based(PREDICTIONS, REFERENCES)
    missing = computed["RaTE"]
    assert isinstance(missing, text_metrics.NotComputed)
    assert missing.reason.startswith("RaTEScore with its RaTE-NER-Deberta")
    assert "could not run offline: We couldn't connect to the hub" in missing.reason
    assert computed["GREEN"] == pytest.approx(0.6)


def test_computed_scores_reach_the_report_table() -> None:
    values: dict[str, object] = {key: None for key, _ in REPORT_METRICS}
    values.update({"RaTE": 0.75, "GREEN": {"not_computed": "needs green_score"}})
    metrics = {
        "benchmarks": {
            "MIMIC-CXR": {"modes": {"plain": {"report_metrics": {"n": 2, "values": values}}}}
        }
    }
    row = report_rows(metrics)[0]
    assert row[:3] == ["MIMIC-CXR", "plain", "2"]
    assert row[-2:] == ["75.0", "not computed"]
