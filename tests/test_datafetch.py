"""`suwen data fetch pubmed-medcpt|pubmed-baseline` against NCBI's layout served on 127.0.0.1:
resumes what a killed run left and what a dropped connection cut, refetches a corrupted file,
fetches nothing on a re-run over a complete folder, refuses in one line (404, md5, no space),
and the fetched folder imports with `suwen index pubmed-medcpt` / `suwen index text`."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from suwen import datafetch
from suwen.cli import app
from suwen.demo import bundled_sample_data
from tests.fake_ncbi import NcbiState, serve_ncbi

MEDCPT = "pub/lu/MedCPT/pubmed_embeddings"
BASELINE = "pubmed/baseline"
CHUNK_SIZES = (12, 8)


def write_medcpt_chunks(folder: Path, dim: int = 384) -> int:
    """Two chunks in NCBI's layout from the sample PubMedQA abstracts, with random vectors."""
    records = json.loads((bundled_sample_data() / "pubmedqa" / "ori_pqal.json").read_text())
    pmids = sorted(records)[: sum(CHUNK_SIZES)]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    start = 0
    for number, size in enumerate(CHUNK_SIZES):
        part = pmids[start : start + size]
        vectors = rng.normal(size=(size, dim)).astype(np.float32)
        np.save(folder / f"embeds_chunk_{number}.npy", vectors)
        (folder / f"pmids_chunk_{number}.json").write_text(json.dumps(part))
        meta = {
            pmid: {
                "t": records[pmid]["QUESTION"],
                "a": " ".join(records[pmid]["CONTEXTS"]),
                "m": "",
                "d": "20200101",
            }
            for pmid in part
        }
        (folder / f"pubmed_chunk_{number}.json").write_text(json.dumps(meta))
        start += size
    return sum(CHUNK_SIZES)


def write_baseline(folder: Path, shared_data: Path) -> list[str]:
    """Two baseline files (one real MEDLINE record each), their .md5 lines and a stray file."""
    folder.mkdir(parents=True)
    xml = (shared_data / "pubmed_xml" / "pubmed-29768149.xml").read_text(encoding="utf-8")
    names = []
    for number, pmid in ((1, "29768149"), (2, "29768150")):
        name = f"pubmed25n{number:04d}.xml.gz"
        data = gzip.compress(xml.replace("29768149", pmid).encode(), mtime=0)
        (folder / name).write_bytes(data)
        md5 = hashlib.md5(data).hexdigest()
        (folder / f"{name}.md5").write_text(f"MD5({name})= {md5}\n")
        names.append(name)
    (folder / "README.txt").write_text("PubMed baseline")
    return names


@pytest.fixture()
def ncbi(tmp_path: Path, shared_data: Path) -> NcbiState:
    root = tmp_path / "ncbi"
    write_medcpt_chunks(root / MEDCPT)
    write_baseline(root / BASELINE, shared_data)
    return NcbiState(root)


def data_bytes(state: NcbiState) -> dict[str, int]:
    """Bytes served per data file (the .md5 lines are read on every run, as they must be)."""
    return {name: size for name, size in state.served.items() if not name.endswith(".md5")}


def suwen(*args: str):
    return CliRunner().invoke(app, list(args))


def test_ranges_parse_and_bad_ones_are_refused():
    assert datafetch.parse_range("3-5", range(38), "--chunks") == range(3, 6)
    assert datafetch.parse_range("7", range(38), "--chunks") == range(7, 8)
    assert datafetch.parse_range(None, range(38), "--chunks") == range(38)
    for bad in ("5-3", "0-38", "a-b"):
        with pytest.raises(datafetch.DataFetchError, match="--chunks"):
            datafetch.parse_range(bad, range(38), "--chunks")


@pytest.mark.slow
def test_medcpt_fetch_resumes_and_the_folder_imports(
    ncbi: NcbiState, tmp_path: Path, suwen_home: Path, minilm_path: Path
):
    target = tmp_path / "embeddings"
    target.mkdir()
    # What a killed run leaves: half of one file in its .part.
    meta = (ncbi.root / MEDCPT / "pubmed_chunk_0.json").read_bytes()
    half = len(meta) // 2
    (target / "pubmed_chunk_0.json.part").write_bytes(meta[:half])
    # And a connection that drops in the middle of another.
    vectors = (ncbi.root / MEDCPT / "embeds_chunk_1.npy").read_bytes()
    ncbi.cut_once["embeds_chunk_1.npy"] = 5000
    with serve_ncbi(ncbi) as url:
        done = suwen(
            "data",
            "fetch",
            "pubmed-medcpt",
            str(target),
            "--chunks",
            "0-1",
            "--base-url",
            url + MEDCPT,
        )
        assert done.exit_code == 0, done.output
        assert ncbi.ranges.count(("pubmed_chunk_0.json", f"bytes={half}-")) == 1
        assert ncbi.served["pubmed_chunk_0.json"] == len(meta) - half  # the half it had: kept
        assert ncbi.served["embeds_chunk_1.npy"] == len(vectors)  # resumed after the cut
        assert ("embeds_chunk_1.npy", "bytes=5000-") in ncbi.ranges
        for name in datafetch.medcpt_names(range(2)):
            assert (target / name).read_bytes() == (ncbi.root / MEDCPT / name).read_bytes()
        assert not list(target.glob("*.part"))

        served = sum(ncbi.served.values())
        again = suwen(
            "data",
            "fetch",
            "pubmed-medcpt",
            str(target),
            "--chunks",
            "0-1",
            "--base-url",
            url + MEDCPT,
        )
        assert again.exit_code == 0 and "6 verified" in again.output
        assert sum(ncbi.served.values()) == served  # nothing fetched

        # Without a published md5 a damaged file is caught by its size, and refetched.
        (target / "pmids_chunk_1.json").write_bytes(b"[")
        fixed = suwen(
            "data",
            "fetch",
            "pubmed-medcpt",
            str(target),
            "--chunks",
            "0-1",
            "--base-url",
            url + MEDCPT,
        )
        assert fixed.exit_code == 0 and "1 refetched" in fixed.output

    imported = suwen(
        "index",
        "pubmed-medcpt",
        str(target),
        "--name",
        "pubmed-fetched",
        "--encoder",
        str(minilm_path),
    )
    assert imported.exit_code == 0, imported.output
    info = json.loads(suwen("index", "list", "--json").output)
    assert {row["name"]: row["count"] for row in info}["pubmed-fetched"] == sum(CHUNK_SIZES)


@pytest.mark.slow
def test_baseline_fetch_checks_md5_refetches_a_corrupted_file_and_imports(
    ncbi: NcbiState,
    tmp_path: Path,
    suwen_home: Path,
    minilm_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    target = tmp_path / "baseline"
    with serve_ncbi(ncbi) as url:
        done = suwen("data", "fetch", "pubmed-baseline", str(target), "--base-url", url + BASELINE)
        assert done.exit_code == 0, done.output
        assert sorted(path.name for path in target.iterdir() if not path.name.startswith(".")) == [
            "pubmed25n0001.xml.gz",
            "pubmed25n0002.xml.gz",
        ]
        assert "md5 checked" in done.output

        damaged = target / "pubmed25n0001.xml.gz"
        data = bytearray(damaged.read_bytes())
        data[100] ^= 0xFF  # same size, different bytes
        damaged.write_bytes(bytes(data))
        before = dict(ncbi.served)
        fixed = suwen(
            "data",
            "fetch",
            "pubmed-baseline",
            str(target),
            "--files",
            "1-2",
            "--base-url",
            url + BASELINE,
        )
        assert fixed.exit_code == 0 and "1 refetched, 1 verified" in fixed.output
        assert ncbi.served["pubmed25n0001.xml.gz"] == 2 * len(data)
        assert ncbi.served["pubmed25n0002.xml.gz"] == before["pubmed25n0002.xml.gz"]

        served = data_bytes(ncbi)
        again = suwen("data", "fetch", "pubmed-baseline", str(target), "--base-url", url + BASELINE)
        assert again.exit_code == 0 and "2 verified" in again.output
        assert data_bytes(ncbi) == served

    monkeypatch.setenv("SUWEN_TEXT_ENCODER", str(minilm_path))
    files = sorted(str(path) for path in target.glob("*.xml.gz"))
    imported = suwen("index", "text", "--name", "baseline", *files)
    assert imported.exit_code == 0, imported.output
    assert "2 documents" in imported.output


def test_a_published_md5_that_does_not_match_is_one_line_and_keeps_nothing(
    ncbi: NcbiState, tmp_path: Path
):
    md5_file = ncbi.root / BASELINE / "pubmed25n0002.xml.gz.md5"
    md5_file.write_text("MD5(pubmed25n0002.xml.gz)= " + "0" * 32 + "\n")
    target = tmp_path / "baseline"
    with serve_ncbi(ncbi) as url:
        done = suwen("data", "fetch", "pubmed-baseline", str(target), "--base-url", url + BASELINE)
    assert done.exit_code == 5  # a download error
    assert "pubmed25n0002.xml.gz: md5 mismatch" in done.output
    assert not (target / "pubmed25n0002.xml.gz").exists()
    assert not (target / "pubmed25n0002.xml.gz.part").exists()
    assert (target / "pubmed25n0001.xml.gz").is_file()  # the good one is kept


def test_a_missing_url_and_a_full_disk_are_one_line(
    ncbi: NcbiState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import shutil

    with serve_ncbi(ncbi) as url:
        missing = suwen(
            "data",
            "fetch",
            "pubmed-medcpt",
            str(tmp_path / "a"),
            "--chunks",
            "0",
            "--base-url",
            url + "nowhere/",
        )
        assert missing.exit_code == 5
        assert "embeds_chunk_0.npy: not found (404)" in missing.output

        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(datafetch.shutil, "disk_usage", lambda path: usage._replace(free=10))
        full = suwen(
            "data",
            "fetch",
            "pubmed-medcpt",
            str(tmp_path / "b"),
            "--chunks",
            "0-1",
            "--base-url",
            url + MEDCPT,
        )
        assert full.exit_code == 5 and "only 0.00 GB free" in full.output
        assert not any((tmp_path / "b").iterdir())
        assert not ncbi.served
