"""A damaged or foreign index is refused in one line through the CLI: exit code 2, the index and
the file named, no traceback, and memory bounded by the files' real sizes (measured as the
child's peak RSS), whatever was done to the files. Also: concurrent image builds never lose a
build's cases, and publishing fsyncs the version and its parent around the move of CURRENT."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from suwen import files
from suwen.indexes import store
from suwen.indexes.compressed import EXACT_FILE
from suwen.indexes.image_store import IMAGES_DB
from suwen.indexes.text_store import TEXT_DB
from tests.fixtures_images import ImageCorpus
from tests.fixtures_text import TEXT_INDEX

# A refusal happens before any model loads: Python, numpy, faiss and the CLI stay well below.
MAX_RSS_BYTES = 600_000_000
Tamper = Callable[[Path], None]


# The child records its own peak RSS at exit: VmHWM belongs to the process image (ru_maxrss
# would carry the parent's peak across fork and exec).
_CHILD = """
import atexit, os
def _peak():
    with open("/proc/self/status") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    with open(os.environ["SUWEN_TEST_RSS_OUT"], "w") as out:
        out.write(peak)
atexit.register(_peak)
from suwen.cli import main
main()
"""


def run_cli(env: dict[str, str], *args: str) -> tuple[int, str, str, int]:
    """The CLI in a child process: (exit code, stdout, stderr, the child's peak RSS in bytes,
    which it records itself at exit)."""
    rss_file = Path(env["SUWEN_HOME"]).parent / f"rss-{threading.get_ident()}.txt"
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        env={**env, "SUWEN_TEST_RSS_OUT": str(rss_file)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    peak_kb = int(rss_file.read_text()) if rss_file.is_file() else 1 << 40
    rss_file.unlink(missing_ok=True)
    return child.returncode, child.stdout, child.stderr, peak_kb * 1024


def assert_refused(result: tuple[int, str, str, int], *named: str, code: int = 3) -> None:
    exit_code, out, err, peak = result
    assert exit_code == code, (exit_code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    for text in named:
        assert text in lines[0], (text, lines[0])
    assert peak < MAX_RSS_BYTES, f"peak RSS {peak / 1e6:.0f} MB"


def live(home: Path, name: str) -> Path:
    version = store.current_version(home / "indexes" / name)
    assert version is not None
    return version


def reseal(version: Path) -> None:
    """Record the tampered files' digests: a foreign index whose manifest is consistent, so
    the parsers' own checks are what must refuse it."""
    store.seal(version)


def faiss_claiming_8_gib(version: Path) -> None:
    """61 bytes: a flat index header whose code vector claims 8 GiB."""
    header = struct.pack("<iqqqbi", 384, 1 << 22, 1 << 20, 1 << 20, 1, 0)
    data = b"IxFI" + header + struct.pack("<Q", 8 << 30) + b"\0" * 16
    assert len(data) == 61
    (version / EXACT_FILE).write_bytes(data)


def npy_claiming_1e11_rows(version: Path) -> None:
    path = version / "article_keys.npy"
    with path.open("r+b") as handle:
        np.lib.format.read_magic(handle)
        start = handle.tell()
        header = handle.read(2)
        length = struct.unpack("<H", header)[0]
        text = repr({"descr": "<i4", "fortran_order": False, "shape": (100_000_000_000,)})
        handle.seek(start + 2)
        handle.write(text.ljust(length - 1).encode("latin1") + b"\n")


def manifest_dim_lots(version: Path) -> None:
    path = version / store.MANIFEST
    data = json.loads(path.read_text())
    data["dim"] = "lots"
    path.write_text(json.dumps(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    with path.open("r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep))


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def flip_header_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[6] ^= 0xFF
    path.write_bytes(bytes(data))


def symlinked_vectors(version: Path) -> None:
    elsewhere = version.parent.parent / "elsewhere.faiss"
    shutil.copy(version / EXACT_FILE, elsewhere)
    (version / EXACT_FILE).unlink()
    (version / EXACT_FILE).symlink_to(elsewhere)


def largest_bm25_file(version: Path) -> Path:
    files = [p for p in (version / "bm25").iterdir() if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def then_resealed(tamper: Tamper) -> Tamper:
    def both(version: Path) -> None:
        tamper(version)
        reseal(version)

    return both


def no_digests(version: Path) -> None:
    path = version / store.MANIFEST
    data = json.loads(path.read_text())
    del data["files"]
    path.write_text(json.dumps(data))


TEXT_CASES: dict[str, tuple[Tamper, tuple[str, ...]]] = {
    "61-byte FAISS claiming 8 GiB": (faiss_claiming_8_gib, (EXACT_FILE, "bytes")),
    "61-byte FAISS claiming 8 GiB, manifest resealed": (
        then_resealed(faiss_claiming_8_gib),
        (EXACT_FILE, "FAISS"),
    ),
    ".npy header claiming 1e11 rows": (npy_claiming_1e11_rows, ("article_keys.npy",)),
    ".npy header claiming 1e11 rows, manifest resealed": (
        then_resealed(npy_claiming_1e11_rows),
        ("article_keys.npy", "header states"),
    ),
    'manifest "dim": "lots"': (manifest_dim_lots, (store.MANIFEST, "dim")),
    "truncated text.sqlite": (lambda v: truncate(v / TEXT_DB), (TEXT_DB, "bytes")),
    "random bytes text.sqlite, manifest resealed": (
        then_resealed(lambda v: random_bytes(v / TEXT_DB)),
        (TEXT_DB, "not a Suwen text index"),
    ),
    "vector file replaced by a symlink": (symlinked_vectors, (EXACT_FILE, "symlink")),
    "truncated BM25 file": (lambda v: truncate(largest_bm25_file(v)), ("bm25",)),
    "header byte edit": (lambda v: flip_header_byte(v / EXACT_FILE), (EXACT_FILE, "digest")),
    "missing file": (lambda v: (v / "article_keys.npy").unlink(), ("article_keys.npy", "missing")),
    "manifest without digests (older Suwen)": (no_digests, (store.MANIFEST, "older Suwen")),
}


@pytest.fixture()
def text_env(text_home_copy: Path, minilm_path: Path) -> dict[str, str]:
    env = dict(os.environ, SUWEN_HOME=str(text_home_copy), HF_HUB_OFFLINE="1")
    env.update(SUWEN_TEXT_ENCODER=str(minilm_path), SUWEN_DEVICE="cpu")
    return env


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_a_tampered_text_index_is_refused_in_one_line(
    case: str, text_home_copy: Path, text_env: dict[str, str]
) -> None:
    tamper, named = TEXT_CASES[case]
    tamper(live(text_home_copy, TEXT_INDEX))
    search = run_cli(text_env, "search", "text", "asthma", "--index", TEXT_INDEX)
    assert_refused(search, TEXT_INDEX, *named)
    assert_refused(run_cli(text_env, "index", "info", TEXT_INDEX), TEXT_INDEX, *named)


@pytest.mark.slow
def test_current_pointing_outside_the_index_is_refused(
    text_home_copy: Path, text_env: dict[str, str]
) -> None:
    root = text_home_copy / "indexes" / TEXT_INDEX
    other = text_home_copy / "indexes" / "other"
    shutil.copytree(live(text_home_copy, TEXT_INDEX), other / "v000001")
    (root / store.CURRENT).write_text("../other/v000001\n")
    result = run_cli(text_env, "search", "text", "asthma", "--index", TEXT_INDEX)
    assert_refused(result, TEXT_INDEX, store.CURRENT, "not a version of this index")


@pytest.fixture()
def image_env(
    suwen_home: Path, tiny_clip_dir: Path, image_corpus: ImageCorpus, tmp_path: Path
) -> dict[str, str]:
    """Two small image indexes, ``a`` and ``b``, of different cases (built through the CLI)."""
    env = dict(os.environ, SUWEN_HOME=str(suwen_home), HF_HUB_OFFLINE="1")
    env.update(SUWEN_IMAGE_ENCODER=str(tiny_clip_dir), SUWEN_DEVICE="cpu")
    for name, ids in (("a", image_corpus.case_ids[:3]), ("b", image_corpus.case_ids[3:8])):
        manifest = _manifest(image_corpus, tmp_path / name, ids)
        code, _, err, _ = run_cli(env, "index", "images", "--name", name, str(manifest))
        assert code == 0, err
    return env


def _manifest(corpus: ImageCorpus, folder: Path, ids: list[str]) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for case_id in ids:
        shutil.copy(corpus.folder / f"{case_id}.jpg", folder / f"{case_id}.jpg")
        lines.append(json.dumps({"path": f"{case_id}.jpg", "id": case_id, "caption": case_id}))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_a_tampered_image_index_is_refused_in_one_line(
    image_env: dict[str, str], suwen_home: Path, image_corpus: ImageCorpus
) -> None:
    query = str(image_corpus.folder / f"{image_corpus.case_ids[0]}.jpg")
    a, b = live(suwen_home, "a"), live(suwen_home, "b")
    assert run_cli(image_env, "search", "image", query, "--index", "a")[0] == 0

    # Vector files swapped between two indexes of the same encoder and dimension.
    a_vectors, b_vectors = (a / EXACT_FILE).read_bytes(), (b / EXACT_FILE).read_bytes()
    (a / EXACT_FILE).write_bytes(b_vectors)
    (b / EXACT_FILE).write_bytes(a_vectors)
    for name in ("a", "b"):
        found = run_cli(image_env, "search", "image", query, "--index", name)
        assert_refused(found, repr(name), EXACT_FILE)
    (a / EXACT_FILE).write_bytes(a_vectors)
    (b / EXACT_FILE).write_bytes(b_vectors)
    assert run_cli(image_env, "search", "image", query, "--index", "a")[0] == 0

    random_bytes(a / IMAGES_DB)
    assert_refused(run_cli(image_env, "search", "image", query, "--index", "a"), IMAGES_DB)
    reseal(a)  # consistent manifest: SQLite itself must refuse the file
    assert_refused(
        run_cli(image_env, "search", "image", query, "--index", "a"), IMAGES_DB, "not a Suwen"
    )
    assert_refused(run_cli(image_env, "index", "info", "a"), IMAGES_DB)


@pytest.mark.slow
def test_two_concurrent_image_builds_lose_no_cases(
    suwen_home: Path, tiny_clip_dir: Path, image_corpus: ImageCorpus, tmp_path: Path
) -> None:
    """Two `suwen index images` into one index at once: each either lands its cases or is
    refused in one line; a refused build's cases are never silently dropped."""
    env = dict(os.environ, SUWEN_HOME=str(suwen_home), HF_HUB_OFFLINE="1")
    env.update(SUWEN_IMAGE_ENCODER=str(tiny_clip_dir), SUWEN_DEVICE="cpu")
    batches = {"first": image_corpus.case_ids[:4], "second": image_corpus.case_ids[4:8]}
    manifests = {key: _manifest(image_corpus, tmp_path / key, ids) for key, ids in batches.items()}
    results: dict[str, tuple[int, str, str, int]] = {}

    def build(key: str) -> None:
        results[key] = run_cli(env, "index", "images", "--name", "shared", str(manifests[key]))

    threads = [threading.Thread(target=build, args=(key,)) for key in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    info = run_cli(env, "index", "info", "shared", "--json")
    cases = json.loads(info[1])["extra"]["cases"]
    landed = [key for key, result in results.items() if result[0] == 0]
    for result in results.values():
        if result[0] != 0:
            assert_refused(result, "'shared'", "being built by another process", code=2)
    assert landed, results
    assert cases == sum(len(batches[key]) for key in landed)


def test_a_second_builder_is_refused_while_the_lock_is_held(
    suwen_home: Path, tiny_clip_dir: Path, image_corpus: ImageCorpus, tmp_path: Path
) -> None:
    env = dict(os.environ, SUWEN_HOME=str(suwen_home), HF_HUB_OFFLINE="1")
    env.update(SUWEN_IMAGE_ENCODER=str(tiny_clip_dir), SUWEN_DEVICE="cpu")
    manifest = _manifest(image_corpus, tmp_path / "m", image_corpus.case_ids[:2])
    with store.build_lock(suwen_home / "indexes", "held"):
        refused = run_cli(env, "index", "images", "--name", "held", str(manifest))
    assert_refused(refused, "'held'", "being built by another process", code=2)
    code, _, err, _ = run_cli(env, "index", "images", "--name", "held", str(manifest))
    assert code == 0, err


def test_publishing_fsyncs_the_version_and_its_parent_around_current(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "idx"
    version = root / "v000001"
    version.mkdir(parents=True)
    synced: list[str] = []
    real_fsync_dir = files.fsync_dir
    real_replace = Path.replace

    def fsync_dir(path: Path) -> None:
        synced.append(path.name)
        real_fsync_dir(path)

    def replace(self: Path, target: str | os.PathLike[str]) -> Path:
        if Path(target).name == store.CURRENT:
            synced.append("CURRENT moves")
        return real_replace(self, target)

    monkeypatch.setattr(store, "fsync_dir", fsync_dir)
    monkeypatch.setattr(files, "fsync_dir", fsync_dir)  # the rename of CURRENT is one write
    monkeypatch.setattr(Path, "replace", replace)
    store.publish(root, version)
    assert synced == ["v000001", "idx", "CURRENT moves", "idx"]
    assert (root / store.CURRENT).read_text().strip() == "v000001"
