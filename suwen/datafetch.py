"""Fetch PubMed from NCBI into a folder: the MedCPT embeddings of all of PubMed (for
``suwen index pubmed-medcpt``) or the PubMed baseline XML (for ``suwen index text``).

Every file is downloaded to ``NAME.part`` and renamed to ``NAME`` only when it is complete and
verified: against the ``.md5`` NCBI publishes beside it when there is one, else against the size
the server states. A stopped download resumes from its ``.part`` with an HTTP Range request (a
dropped connection is resumed in the same run, a killed run by the next); a re-run over a
complete folder verifies every file and fetches nothing. Verified files are remembered in
``.suwen-fetch.json`` (size, modification time, md5), so a re-run rehashes only files that
changed since. The free disk space is checked before the first byte is fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal
from urllib.parse import urljoin

import httpx

from suwen.errors import DownloadError
from suwen.files import atomic_write_json, fsync_dir

MEDCPT_URL = "https://ftp.ncbi.nlm.nih.gov/pub/lu/MedCPT/pubmed_embeddings/"
BASELINE_URL = "https://ftp.ncbi.nlm.nih.gov/pubmed/baseline/"
MEDCPT_CHUNKS = range(0, 38)  # NCBI publishes chunks 0..37
MEDCPT_PARTS = ("embeds_chunk_{n}.npy", "pmids_chunk_{n}.json", "pubmed_chunk_{n}.json")
BASELINE_NAME = re.compile(r'href="(?:[^"]*/)?(pubmed\d+n(\d{4})\.xml\.gz)"')
MD5_LINE = re.compile(r"\b([0-9a-fA-F]{32})\b")
STATE_FILE = ".suwen-fetch.json"
BLOCK = 1 << 20
RETRIES = 5  # dropped connections resumed per file before giving up
TIMEOUT = httpx.Timeout(30.0, read=120.0)


class DataFetchError(DownloadError):
    """A file could not be fetched or verified (one line, naming the file or URL)."""


@dataclass(frozen=True)
class RemoteFile:
    name: str
    url: str
    size: int  # as the server states it
    md5: str | None  # as NCBI publishes it, if it does


Status = Literal["verified", "fetched", "resumed", "refetched"]
CheckedBy = Literal["md5", "size"]  # what a fetched file was checked against


@dataclass(frozen=True)
class FileResult:
    name: str
    status: Status
    size: int
    checked_by: CheckedBy


class FetchProgress:
    """What a caller hears while files download (the CLI draws bars; tests count)."""

    def start(self, name: str, total: int, done: int) -> None:
        """A file starts downloading, ``done`` bytes of ``total`` already on disk."""

    def advance(self, name: str, size: int) -> None:
        """``size`` more bytes of ``name`` arrived."""

    def finish(self, result: FileResult) -> None:
        """``name`` is complete and verified (or was already)."""


def parse_range(text: str | None, default: range, what: str) -> range:
    """``A-B`` (inclusive) or ``N`` to a range inside ``default``; None gives ``default``."""
    if text is None:
        return default
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise DataFetchError(f"{what} {text!r}: expected A-B or N")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else first
    if first > last or first < default.start or last >= default.stop:
        raise DataFetchError(f"{what} {text!r}: must lie within {default.start}-{default.stop - 1}")
    return range(first, last + 1)


def medcpt_names(chunks: range) -> list[str]:
    return [part.format(n=n) for n in chunks for part in MEDCPT_PARTS]


def baseline_names(client: httpx.Client, base_url: str, files: str | None) -> list[str]:
    """The baseline's file names from its HTML listing, optionally numbers ``A-B`` only."""
    listing = _get(client, base_url).text
    found = {int(number): name for name, number in BASELINE_NAME.findall(listing)}
    if not found:
        raise DataFetchError(f"{base_url}: no pubmedNNnNNNN.xml.gz files in the listing")
    wanted = parse_range(files, range(min(found), max(found) + 1), "--files")
    names = [found[number] for number in wanted if number in found]
    if not names:
        raise DataFetchError(f"{base_url}: no file numbered {files}")
    return names


def describe(client: httpx.Client, base_url: str, names: list[str], md5: bool) -> list[RemoteFile]:
    """Size (HEAD) and, with ``md5``, the published checksum of every file."""
    remote: list[RemoteFile] = []
    for name in names:
        url = urljoin(base_url, name)
        head = _request(client, "HEAD", url)
        length = head.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise DataFetchError(f"{url}: the server states no size")
        checksum = _published_md5(client, url + ".md5") if md5 else None
        remote.append(RemoteFile(name, url, int(length), checksum))
    return remote


def fetch_files(
    client: httpx.Client, remote: list[RemoteFile], folder: Path, progress: FetchProgress
) -> list[FileResult]:
    """Make ``folder`` hold every file of ``remote``, complete and verified."""
    folder.mkdir(parents=True, exist_ok=True)
    state = _load_state(folder)
    existing = {item.name: _is_verified(folder / item.name, item, state) for item in remote}
    needed = sum(item.size - _part_size(folder, item) for item in remote if not existing[item.name])
    check_space(folder, needed)
    results = []
    for item in remote:
        if existing[item.name]:
            result = FileResult(item.name, "verified", item.size, _checked_by(item))
        else:
            had_file = (folder / item.name).exists()
            result = _download(client, item, folder, progress, refetch=had_file)
            state[item.name] = _fingerprint(folder / item.name, item.md5)
            _save_state(folder, state)
        progress.finish(result)
        results.append(result)
    _save_state(folder, state)  # rehashed files are remembered too
    return results


def check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DataFetchError(
            f"{folder}: needs {needed / 1e9:.2f} GB more, only {free / 1e9:.2f} GB free"
        )


def open_client() -> httpx.Client:
    # identity: the bytes on the wire are the file's, so sizes and Range offsets agree.
    headers = {"User-Agent": "suwen", "Accept-Encoding": "identity"}
    return httpx.Client(follow_redirects=True, timeout=TIMEOUT, headers=headers)


# -- one file ------------------------------------------------------------------------------


def _download(
    client: httpx.Client, item: RemoteFile, folder: Path, progress: FetchProgress, refetch: bool
) -> FileResult:
    final, part = folder / item.name, folder / f"{item.name}.part"
    if refetch:
        final.unlink()  # it failed verification
    resumed = part.exists() and 0 < part.stat().st_size <= item.size
    if part.exists() and not resumed:
        part.unlink()  # longer than the file: not ours to trust
    progress.start(item.name, item.size, part.stat().st_size if resumed else 0)
    for attempt in range(RETRIES + 1):
        try:
            _stream_into(client, item, part, progress)
            break
        except httpx.TransportError as exc:
            if attempt == RETRIES:
                raise DataFetchError(f"{item.url}: {_one_line(exc)} ({RETRIES} retries)") from exc
    _verify_part(item, part)
    part.replace(final)
    fsync_dir(folder)
    status: Status = "refetched" if refetch else "resumed" if resumed else "fetched"
    return FileResult(item.name, status, item.size, _checked_by(item))


def _stream_into(
    client: httpx.Client, item: RemoteFile, part: Path, progress: FetchProgress
) -> None:
    offset = part.stat().st_size if part.exists() else 0
    if offset >= item.size:
        return
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with client.stream("GET", item.url, headers=headers) as response:
        _raise_for(response, item.url)
        if offset and response.status_code != 206:
            offset = 0  # the server ignored the range: start over
        with _open_part(part, append=offset > 0) as handle:
            for block in response.iter_raw():  # as it arrives, so a drop loses nothing kept
                handle.write(block)
                progress.advance(item.name, len(block))
            handle.flush()
            os.fsync(handle.fileno())


def _open_part(part: Path, append: bool) -> IO[bytes]:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    return os.fdopen(os.open(part, flags, 0o600), "ab" if append else "wb")


def _verify_part(item: RemoteFile, part: Path) -> None:
    size = part.stat().st_size
    if size != item.size:
        part.unlink()
        raise DataFetchError(f"{item.url}: size mismatch, got {size} bytes of {item.size}")
    if item.md5 is not None:
        actual = _md5_of(part)
        if actual != item.md5:
            part.unlink()
            raise DataFetchError(
                f"{item.url}: md5 mismatch, got {actual}, NCBI publishes {item.md5}"
            )


# -- verification state --------------------------------------------------------------------


def _is_verified(path: Path, item: RemoteFile, state: dict[str, dict[str, object]]) -> bool:
    """Whether ``path`` is ``item``, complete: by its remembered fingerprint when the file is
    unchanged since it was verified, else by rehashing (or its size, without a published md5)."""
    if not path.is_file() or path.stat().st_size != item.size:
        return False
    if item.md5 is None:
        return True
    remembered = state.get(item.name)
    current = _stat_key(path)
    if remembered and remembered.get("stat") == current and remembered.get("md5") == item.md5:
        return True
    if _md5_of(path) != item.md5:
        return False
    state[item.name] = {"stat": current, "md5": item.md5}
    return True


def _fingerprint(path: Path, md5: str | None) -> dict[str, object]:
    return {"stat": _stat_key(path), "md5": md5}


def _stat_key(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _load_state(folder: Path) -> dict[str, dict[str, object]]:
    path = folder / STATE_FILE
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no state (or a damaged one): everything is rehashed
    return loaded if isinstance(loaded, dict) else {}


def _save_state(folder: Path, state: dict[str, dict[str, object]]) -> None:
    atomic_write_json(folder / STATE_FILE, state, indent=1)


def _part_size(folder: Path, item: RemoteFile) -> int:
    part = folder / f"{item.name}.part"
    size = part.stat().st_size if part.exists() else 0
    return size if size <= item.size else 0


def _checked_by(item: RemoteFile) -> CheckedBy:
    return "md5" if item.md5 else "size"


def _md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


# -- HTTP ----------------------------------------------------------------------------------


def _get(client: httpx.Client, url: str) -> httpx.Response:
    return _request(client, "GET", url)


def _request(
    client: httpx.Client, method: str, url: str, allow_404: bool = False
) -> httpx.Response:
    try:
        response = client.request(method, url)
    except httpx.TransportError as exc:
        raise DataFetchError(f"{url}: {_one_line(exc)}") from exc
    if not (allow_404 and response.status_code == 404):
        _raise_for(response, url)
    return response


def _published_md5(client: httpx.Client, url: str) -> str | None:
    """NCBI's ``MD5(name)= hex`` line, or None when no checksum is published."""
    response = _request(client, "GET", url, allow_404=True)
    if response.status_code == 404:
        return None
    match = MD5_LINE.search(response.text.rsplit("=", 1)[-1])
    if match is None:
        raise DataFetchError(f"{url}: not an md5 line")
    return match.group(1).lower()


def _raise_for(response: httpx.Response, url: str) -> None:
    if response.status_code == 404:
        raise DataFetchError(f"{url}: not found (404)")
    if response.status_code >= 400:
        raise DataFetchError(f"{url}: HTTP {response.status_code}")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- the two data sets ---------------------------------------------------------------------


def plan_medcpt(client: httpx.Client, base_url: str, chunks: str | None) -> list[RemoteFile]:
    wanted = parse_range(chunks, MEDCPT_CHUNKS, "--chunks")
    return describe(client, _folder_url(base_url), medcpt_names(wanted), md5=True)


def plan_baseline(client: httpx.Client, base_url: str, files: str | None) -> list[RemoteFile]:
    url = _folder_url(base_url)
    return describe(client, url, baseline_names(client, url, files), md5=True)


def _folder_url(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def iter_statuses(results: list[FileResult]) -> Iterator[tuple[Status, int]]:
    for status in ("fetched", "resumed", "refetched", "verified"):
        count = sum(1 for result in results if result.status == status)
        if count:
            yield status, count
