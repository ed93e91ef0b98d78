"""The retrieval benchmark (``benchmarks/retrieval.py``): metrics and the JSON it writes, on the
session subset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.retrieval import METHODS, bench_index_name, main, metrics_of
from tests.fixtures_text import TEXT_INDEX, text_settings_for

METRICS = {"recall@1", "recall@5", "recall@10", "mrr"}


def test_metrics_of_ranks() -> None:
    scores = metrics_of([1, 2, 6, None])
    assert scores == {"recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75, "mrr": 0.4167}


@pytest.fixture()
def bench_data(tmp_path: Path, text_corpus: Path) -> Path:
    """The shared-data layout, holding the session subset."""
    data = tmp_path / "data"
    (data / "pubmedqa").mkdir(parents=True)
    (data / "abstracts" / "ncbi_disease").mkdir(parents=True)
    shutil.copy(text_corpus / "pubmedqa_subset.json", data / "pubmedqa" / "ori_pqal.json")
    shutil.copy(text_corpus / "ncbi_subset.txt", data / "abstracts" / "ncbi_disease" / "a.txt")
    return data


def test_bench_retrieval_json(
    bench_data: Path,
    text_index_home: Path,
    minilm_path: Path,
    pubmedqa_subset: dict[str, dict[str, object]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Seed the benchmark index with the session index: same abstracts, so nothing is re-encoded.
    home = tmp_path / "home"
    name = bench_index_name(text_settings_for(home, minilm_path))
    shutil.copytree(text_index_home / "indexes" / TEXT_INDEX, home / "indexes" / name)
    pmid = sorted(pubmedqa_subset)[0]
    paraphrases = tmp_path / "para.json"
    paraphrases.write_text(json.dumps({"queries": {pmid: "a reworded question"}}))
    monkeypatch.setenv("SUWEN_TEXT_ENCODER", str(minilm_path))
    monkeypatch.setenv("SUWEN_DEVICE", "cpu")
    monkeypatch.setenv("SUWEN_HOME", str(home))
    output = tmp_path / "results" / "retrieval.json"

    main(["--data", str(bench_data), "--paraphrases", str(paraphrases),
          "--output", str(output), "--json"])  # fmt: skip

    printed = json.loads(capsys.readouterr().out)
    assert json.loads(output.read_text()) == printed
    for method in METHODS:
        assert set(printed[method]) == METRICS
        assert all(0.0 <= value <= 1.0 for value in printed[method].values())
        assert printed["paraphrase"][method].keys() == METRICS
    assert printed["hybrid"]["recall@10"] >= 0.95  # 60 questions over 120 abstracts
    assert {"rrf", "linear_minmax"} <= set(printed["variants"])
    assert printed["setup"]["queries"] == len(pubmedqa_subset)
    # The seeded index also holds the session's PubMed XML record.
    assert printed["setup"]["documents"] == len(pubmedqa_subset) + 60 + 1
    assert printed["paraphrase"]["queries"] == 1
    assert str(tmp_path) not in output.read_text()  # no machine paths in results


def test_bench_retrieval_needs_the_data_folder(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not the shared data folder"):
        main(["--data", str(tmp_path)])
