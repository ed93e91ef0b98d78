"""The query encoder's ONNX Runtime export: made once, checked against the eager model, cached
privately in the data home, and used by a search process that never imports PyTorch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from suwen.config import Settings
from suwen.indexes import onnx_encoder, text_encoder
from suwen.indexes.onnx_encoder import OnnxQueryEncoder
from suwen.indexes.text_encoder import load_text_encoder, query_encoder
from tests.fixtures_text import text_settings_for

pytestmark = pytest.mark.slow  # one export of MiniLM per session


def onnx_settings(home: Path, minilm_path: Path) -> Settings:
    return text_settings_for(home, minilm_path, query_runtime="auto")


@pytest.fixture(scope="session")
def exported_home(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    home = tmp_path_factory.mktemp("onnx_home")
    assert isinstance(query_encoder(onnx_settings(home, minilm_path)), OnnxQueryEncoder)
    return home


@pytest.fixture(scope="session")
def questions(shared_data: Path) -> list[str]:
    records = json.loads((shared_data / "pubmedqa" / "ori_pqal.json").read_text(encoding="utf-8"))
    return [str(record["QUESTION"]) for record in list(records.values())[:60]]


def export_of(home: Path) -> Path:
    (directory,) = [p for p in (home / "encoders").iterdir() if p.is_dir()]
    return directory


def test_export_is_private_and_records_its_check(exported_home: Path) -> None:
    directory = export_of(exported_home)
    assert (exported_home / "encoders").stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in directory.iterdir()) == [
        "export.json",
        "model.data",
        "model.onnx",
        "tokenizer.json",
    ]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in directory.iterdir())
    record = onnx_encoder.read_record(directory)
    assert record is not None and record.precision in ("int8", "int8_per_token")
    assert record.min_cosine >= onnx_encoder.INT8_MIN_COSINE
    # Both int8 graphs were made and checked; the one kept is the faster of those that passed.
    tried = record.candidates
    assert set(tried) == {"int8", "int8_per_token"}
    assert (
        tried[record.precision]["kept"]
        and tried[record.precision]["min_cosine"] == record.min_cosine
    )
    passed = {name: float(c["probes_ms"]) for name, c in tried.items() if c["kept"]}
    assert record.precision == min(passed, key=passed.__getitem__)
    assert all(
        float(c["min_cosine"]) >= onnx_encoder.INT8_MIN_COSINE for c in tried.values() if c["kept"]
    )
    assert (record.pooling, record.dim, record.max_tokens) == ("mean", 384, 256)


def test_an_export_with_its_weights_inside_the_graph_still_loads(
    exported_home: Path, tmp_path: Path
) -> None:
    """Exports made before the weights moved to their own file hold everything in model.onnx."""
    import onnx

    directory = export_of(exported_home)
    single = tmp_path / "single"
    single.mkdir()
    onnx.save_model(onnx.load(str(directory / "model.onnx")), str(single / "model.onnx"))
    shutil.copy(directory / "tokenizer.json", single / "tokenizer.json")
    manifest = json.loads((directory / "export.json").read_text(encoding="utf-8"))
    manifest["model_bytes"] = (single / "model.onnx").stat().st_size
    (single / "export.json").write_text(json.dumps(manifest), encoding="utf-8")
    old, new = OnnxQueryEncoder.open(single), OnnxQueryEncoder.open(directory)
    assert old is not None and new is not None
    np.testing.assert_allclose(old.encode_query("asthma"), new.encode_query("asthma"), atol=1e-6)


def test_onnx_vectors_match_the_eager_model_on_real_questions(
    exported_home: Path, minilm_path: Path, questions: list[str]
) -> None:
    fast = query_encoder(onnx_settings(exported_home, minilm_path))
    eager = load_text_encoder(str(minilm_path), device="cpu")
    assert isinstance(fast, OnnxQueryEncoder)
    got = np.vstack([fast.encode_query(q) for q in questions])
    cosines = np.sum(got * eager.encode(questions), axis=1)
    assert cosines.min() >= 0.999, cosines.min()
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Batches pad to their longest text; the mask keeps padding out of the mean.
    np.testing.assert_allclose(fast.encode(questions[:7], batch_size=4), got[:7], atol=2e-5)
    assert fast.count_tokens(questions[0]) == eager.count_tokens(questions[0])


def test_a_second_process_finds_the_export_without_torch(
    exported_home: Path, minilm_path: Path, text_home_copy: Path, questions: list[str]
) -> None:
    """A fresh search process over a real index: same top hit as PyTorch, torch never loaded."""
    import shutil

    settings = onnx_settings(text_home_copy, minilm_path)
    # The export an earlier process made in this home.
    shutil.copytree(exported_home / "encoders", text_home_copy / "encoders")
    script = (
        "import json, sys\n"
        "from suwen.config import Settings\n"
        "from suwen.retrieval.text import TextSearcher\n"
        "settings = Settings.model_validate_json(sys.argv[1])\n"
        "with TextSearcher.open(settings) as searcher:\n"
        "    hits = [searcher.search(q, 3, method='dense') for q in json.loads(sys.argv[2])]\n"
        "tops = [found[0].pmid for found in hits]\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'tops': tops}))\n"
    )
    asked = questions[:10]
    run = subprocess.run(
        [sys.executable, "-c", script, settings.model_dump_json(), json.dumps(asked)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["torch"] is False
    from suwen.retrieval.text import TextSearcher

    eager_settings = text_settings_for(text_home_copy, minilm_path, query_runtime="torch")
    with TextSearcher.open(eager_settings) as searcher:
        expected = [[hit.pmid for hit in searcher.search(q, 3, method="dense")] for q in asked]
    # int8 arithmetic may swap near-ties: every top hit is in PyTorch's top 3, most are its top 1.
    assert all(top in three for top, three in zip(result["tops"], expected, strict=True))
    assert sum(top == three[0] for top, three in zip(result["tops"], expected, strict=True)) >= 8


def test_a_rejected_export_falls_back_to_pytorch_once(
    tmp_path: Path, minilm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No export matches (thresholds above 1): queries stay on PyTorch, and later processes do
    not pay for the export again."""
    monkeypatch.setattr(onnx_encoder, "INT8_MIN_COSINE", 1.1)
    monkeypatch.setattr(onnx_encoder, "FLOAT_MIN_COSINE", 1.1)
    settings = onnx_settings(tmp_path, minilm_path)
    encoder = query_encoder(settings)
    assert isinstance(encoder, text_encoder.TextEncoder)
    made = [p.name for p in (tmp_path / "encoders").iterdir()]
    markers = [name for name in made if not name.endswith(onnx_encoder.LOCK_SUFFIX)]
    assert len(markers) == 1 and markers[0].endswith(".rejected"), made

    def no_second_try(*_args: object) -> None:
        raise AssertionError("export tried again")

    monkeypatch.setattr(text_encoder.TextEncoder, "export_onnx", no_second_try)
    assert isinstance(query_encoder(settings), text_encoder.TextEncoder)


def test_a_graph_that_cannot_be_made_leaves_the_other(
    tmp_path: Path, minilm_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-token graph failing to build (a quantiser or runtime that refuses it) costs
    nothing: the block graph is kept, and the record says what happened to each."""

    def refused(*_args: object) -> None:
        raise RuntimeError("MatMulInteger is not implemented")

    monkeypatch.setattr(onnx_encoder.smoothquant, "quantise", refused)
    encoder = query_encoder(onnx_settings(tmp_path, minilm_path))
    assert isinstance(encoder, OnnxQueryEncoder) and encoder.precision == "int8"
    record = onnx_encoder.read_record(export_of(tmp_path))
    assert record is not None and not record.candidates["int8_per_token"]["kept"]
    assert sorted(p.name for p in export_of(tmp_path).iterdir()) == [
        "export.json",
        "model.data",
        "model.onnx",
        "tokenizer.json",
    ]


def test_query_runtime_torch_never_uses_the_export(exported_home: Path, minilm_path: Path) -> None:
    settings = text_settings_for(exported_home, minilm_path, query_runtime="torch")
    assert isinstance(query_encoder(settings), text_encoder.TextEncoder)


def test_damaged_or_foreign_exports_are_not_used(exported_home: Path, tmp_path: Path) -> None:
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(export_of(exported_home), directory)
    assert onnx_encoder.read_record(directory) is not None
    manifest = json.loads((directory / "export.json").read_text(encoding="utf-8"))
    damages = ({**manifest, "model_bytes": 5}, {**manifest, "format": 99}, {"format": 1}, [], 7)
    for damaged in damages:
        (directory / "export.json").write_text(json.dumps(damaged), encoding="utf-8")
        assert onnx_encoder.read_record(directory) is None
    (directory / "export.json").write_text(" " * (onnx_encoder.MANIFEST_MAX_BYTES + 1))
    assert onnx_encoder.read_record(directory) is None


def test_changed_model_files_change_the_fingerprint(tmp_path: Path, minilm_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(minilm_path, model)
    before = onnx_encoder.fingerprint(str(model), "auto")
    assert before == onnx_encoder.fingerprint(str(model), "auto")
    assert before != onnx_encoder.fingerprint(str(model), "cls")
    (model / "config.json").write_text((model / "config.json").read_text() + " ")
    assert onnx_encoder.fingerprint(str(model), "auto") != before
    assert onnx_encoder.fingerprint(str(tmp_path / "absent"), "auto") is None


def test_a_query_session_leaves_no_thread_spinning_after_its_run(
    exported_home: Path, minilm_path: Path
) -> None:
    """Workers may spin between one run's operators, but not after it: an idle search process
    (a chat between questions, an agent waiting on the model) must not burn a core the event
    loop and the model server share."""
    import time

    fast = query_encoder(onnx_settings(exported_home, minilm_path))
    assert isinstance(fast, OnnxQueryEncoder)
    session = onnx_encoder.runtime_session(fast.directory / onnx_encoder.MODEL_FILE, threads=2)
    fast._session = session
    fast.encode_query("pleural effusion after cardiac surgery")
    before = time.process_time()
    time.sleep(0.5)
    # A worker left spinning burns about 40-50 ms of a core after each run before it sleeps.
    assert time.process_time() - before < 0.015


_RACE = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
from suwen.indexes import onnx_encoder

encoders, log = Path(sys.argv[1]), Path(sys.argv[2])

def read(directory):
    return "record" if (directory / "made").is_file() else None

def export(eager, key, encoders_dir):
    with log.open("a") as out:
        out.write("export\\n")
    time.sleep(2)  # a real export takes seconds to minutes
    (encoders_dir / key).mkdir()
    (encoders_dir / key / "made").write_text("")
    return "record"

found = onnx_encoder.find_or_export(
    onnx_encoder.ExportCache(), encoders, 1,
    fingerprint=lambda: "key",
    load_eager=lambda: SimpleNamespace(device="cpu"),
    read=read, export=export,
    open_encoder=lambda directory, record, threads: record,
)
print(found)
"""


def test_processes_started_together_make_one_export(tmp_path: Path) -> None:
    """`suwen batch --processes N` starts N agents at once on a data home without the export:
    one makes it (seconds to minutes, a GB or more of memory), the others wait and use it."""
    encoders, log = tmp_path / "encoders", tmp_path / "exports.log"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(encoders), str(log)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [racer.communicate(timeout=60)[0].strip() for racer in racers]
    assert outputs == ["record"] * 3
    assert log.read_text().splitlines() == ["export"]
