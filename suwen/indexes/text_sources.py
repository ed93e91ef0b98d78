"""Readers for the text sources a PubMed index is built from.

Formats: PubMed baseline/update XML (``.xml``, ``.xml.gz``), PubTator, JSONL, PubMedQA JSON
(``ori_pqal.json`` layout) and PDFs. Every reader streams: it yields one record at a time, so a
30,000-article baseline file never sits in memory whole.

A reader yields three kinds of record:

- :class:`~suwen.types.Document`: an article to (re-)index;
- :class:`Deletion`: a PMID that PubMed withdrew (``<DeleteCitation>`` in update files);
- :class:`SkippedRecord`: one bad record (a JSONL line that is not JSON, an article with no
  PMID) -- the rest of the file is still read.

A file that cannot be read at all, or that breaks part-way (truncated gzip, malformed XML,
non-UTF-8 bytes), raises :class:`~suwen.errors.InputError` naming the file. Records yielded
before the break are complete and valid, so the caller may keep them; re-ingesting the repaired
file later updates them in place.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, cast, get_args
from xml.etree import ElementTree

from suwen.errors import InputError
from suwen.types import Document

SourceFormat = Literal["pubmed-xml", "pubtator", "jsonl", "pubmedqa", "pdf"]
SOURCE_FORMATS: tuple[SourceFormat, ...] = get_args(SourceFormat)

# Extensions looked at when a folder is given; anything else in the folder is ignored silently
# (licences, READMEs next to a corpus are not sources, and naming each would only be noise).
SOURCE_SUFFIXES = (".xml", ".xml.gz", ".gz", ".txt", ".pubtator", ".jsonl", ".json", ".pdf")

_GZIP_MAGIC = b"\x1f\x8b"
_PDF_MAGIC = b"%PDF-"
_PUBTATOR_LINE = re.compile(rb"^\s*\d+\|[ta]\|")
_PUBTATOR_TEXT = re.compile(r"^(\d+)\|([ta])\|(.*)$")
_WHITESPACE = re.compile(r"\s+")
_YEAR = re.compile(r"(1[89]\d\d|20\d\d)")


@dataclass(frozen=True)
class Deletion:
    """A citation PubMed deleted; the index drops it if present."""

    pmid: str
    source: str


@dataclass(frozen=True)
class SkippedRecord:
    """One record that could not be used, with a one-line reason naming where it was."""

    message: str


SourceRecord = Document | Deletion | SkippedRecord


# ---------------------------------------------------------------------------------------------
# Finding and recognising source files


def expand_sources(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files to read from the given files and folders, plus (path, one-line error) for paths
    that give nothing (missing, empty folder)."""
    files: list[Path] = []
    errors: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.name.lower().endswith(SOURCE_SUFFIXES)
            )
            if not found:
                errors.append(
                    (path, f"{path}: folder holds no source files ({', '.join(SOURCE_SUFFIXES)})")
                )
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            errors.append((path, f"{path}: no such file or folder"))
    return files, errors


def _head(path: Path, size: int = 4096) -> bytes:
    """The first bytes of the file's content (decompressed when gzip)."""
    with path.open("rb") as raw:
        start = raw.read(size)
    if start.startswith(_GZIP_MAGIC):
        try:
            with gzip.open(path, "rb") as handle:
                return handle.read(size)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{path}: corrupt gzip file ({exc})") from exc
    return start


def detect_format(path: Path) -> SourceFormat:
    """The source format of a file, from its content first and its name second."""
    try:
        head = _head(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not head.strip():
        raise InputError(f"{path}: empty file")
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(_PDF_MAGIC):
        return "pdf"
    if stripped.startswith(b"<"):
        if b"<PubmedArticleSet" in head or b"<PubmedArticle" in head or b"<DeleteCitation" in head:
            return "pubmed-xml"
        raise InputError(f"{path}: XML but not a PubMed article set (no <PubmedArticleSet>)")
    if _PUBTATOR_LINE.match(stripped):
        return "pubtator"
    if stripped.startswith(b"{"):
        return _json_kind(path, head)
    if path.name.lower().endswith(".pdf"):
        raise InputError(f"{path}: named .pdf but is not a PDF (no %PDF header)")
    raise InputError(
        f"{path}: unsupported format (expected PubMed XML, PubTator, JSONL, PubMedQA JSON or PDF; "
        "use --format to say which)"
    )


def _first_line(path: Path, limit: int = 1 << 24) -> bytes:
    with _open_bytes(path) as handle:
        for line in handle:
            if line.strip():
                return line[:limit]
    return b""


def _json_kind(path: Path, head: bytes) -> SourceFormat:
    # One object per line with a pmid key is JSONL; a document keyed by PMIDs is PubMedQA.
    try:
        first = json.loads(_first_line(path))
    except (ValueError, OSError, EOFError, zlib.error):
        first = None
    if isinstance(first, dict) and "pmid" in first:
        return "jsonl"
    if re.match(rb'\s*\{\s*"\d+"\s*:\s*\{', head.lstrip(b"\xef\xbb\xbf")):
        return "pubmedqa"
    raise InputError(
        f"{path}: JSON that is neither JSONL with a 'pmid' key nor PubMedQA (PMID-keyed) JSON"
    )


def read_source(path: Path, fmt: SourceFormat | None = None) -> Iterator[SourceRecord]:
    """Records of one source file, in the given format or the detected one."""
    fmt = fmt or detect_format(path)
    readers = {
        "pubmed-xml": read_pubmed_xml,
        "pubtator": read_pubtator,
        "jsonl": read_jsonl,
        "pubmedqa": read_pubmedqa,
        "pdf": read_pdf,
    }
    return readers[fmt](path)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def clean_text(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _open_bytes(path: Path) -> IO[bytes]:
    """The file's bytes, transparently gunzipped."""
    with path.open("rb") as raw:
        magic = raw.read(2)
    if magic == _GZIP_MAGIC:
        return cast(IO[bytes], gzip.open(path, "rb"))
    return path.open("rb")


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file, with a clear error on bad bytes or gzip."""
    line_no = 0
    try:
        with _open_bytes(path) as handle:
            reader = io.TextIOWrapper(handle, encoding="utf-8", errors="strict", newline=None)
            for line in reader:
                line_no += 1
                yield line_no, line
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text at line {line_no + 1} ({exc.reason})") from exc
    except (EOFError, zlib.error, OSError) as exc:
        raise InputError(f"{path}: truncated or corrupt after line {line_no} ({exc})") from exc


def _year_of(value: Any) -> int | None:
    match = _YEAR.search(str(value)) if value is not None else None
    return int(match.group(1)) if match else None


def _pmid_of(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text if text.isdigit() else None


# ---------------------------------------------------------------------------------------------
# PubMed XML


def read_pubmed_xml(path: Path) -> Iterator[SourceRecord]:
    """PubmedArticle records and DeleteCitation PMIDs of a baseline/update file, streamed."""
    source = str(path)
    count = 0
    root: ElementTree.Element | None = None
    try:
        with _open_bytes(path) as handle:
            for event, element in ElementTree.iterparse(handle, events=("start", "end")):
                if root is None:
                    root = element
                if event != "end" or element.tag not in ("PubmedArticle", "DeleteCitation"):
                    continue
                if element.tag == "PubmedArticle":
                    count += 1
                    yield _article_of(element, source, count)
                else:
                    for pmid in element.iter("PMID"):
                        if pmid_text := _pmid_of(pmid.text):
                            yield Deletion(pmid_text, source)
                # Finished records go, so memory stays flat over a whole baseline file.
                root.clear()
    except ElementTree.ParseError as exc:
        raise InputError(f"{path}: malformed XML after {count} article(s) ({exc})") from exc
    except (EOFError, zlib.error, OSError) as exc:
        raise InputError(f"{path}: truncated or corrupt file after {count} article(s)") from exc


def _article_of(element: ElementTree.Element, source: str, number: int) -> SourceRecord:
    citation = element.find("MedlineCitation")
    pmid = _pmid_of(citation.findtext("PMID") if citation is not None else None)
    if citation is None or pmid is None:
        return SkippedRecord(f"{source}: article #{number} has no PMID")
    article = citation.find("Article")
    if article is None:
        return SkippedRecord(f"{source}: PMID {pmid} has no <Article>")
    return Document(
        pmid=pmid,
        title=_inner_text(article.find("ArticleTitle")),
        text=_abstract_of(article),
        year=_pub_year(article),
        journal=clean_text(article.findtext("Journal/Title") or "") or None,
        mesh=[
            clean_text(name.text or "")
            for name in citation.iterfind("MeshHeadingList/MeshHeading/DescriptorName")
            if name.text
        ],
        source=source,
    )


def _inner_text(element: ElementTree.Element | None) -> str:
    # itertext keeps the text inside markup such as <sub>2</sub> and <i>...</i>.
    return clean_text("".join(element.itertext())) if element is not None else ""


def _abstract_of(article: ElementTree.Element) -> str:
    sections = []
    for part in article.iterfind("Abstract/AbstractText"):
        text = _inner_text(part)
        if not text:
            continue
        label = part.get("Label")
        sections.append(f"{label}: {text}" if label else text)
    return "\n".join(sections)


def _pub_year(article: ElementTree.Element) -> int | None:
    date = article.find("Journal/JournalIssue/PubDate")
    if date is not None:
        year = _year_of(date.findtext("Year")) or _year_of(date.findtext("MedlineDate"))
        if year:
            return year
    return _year_of(article.findtext("ArticleDate/Year"))


# ---------------------------------------------------------------------------------------------
# PubTator


def read_pubtator(path: Path) -> Iterator[SourceRecord]:
    """Title and abstract lines of a PubTator file (annotation lines are ignored)."""
    source = str(path)
    current: dict[str, str] = {}
    pmid: str | None = None
    for _line_no, line in _text_lines(path):
        match = _PUBTATOR_TEXT.match(line.rstrip("\r\n"))
        if match is None:
            continue  # annotation or blank line
        line_pmid, kind, text = match.groups()
        if line_pmid != pmid:
            if pmid is not None:
                yield _pubtator_document(pmid, current, source)
            pmid, current = line_pmid, {}
        current[kind] = text
    if pmid is not None:
        yield _pubtator_document(pmid, current, source)


def _pubtator_document(pmid: str, parts: dict[str, str], source: str) -> Document:
    return Document(
        pmid=pmid,
        title=clean_text(parts.get("t", "")),
        text=clean_text(parts.get("a", "")),
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# JSONL


def read_jsonl(path: Path) -> Iterator[SourceRecord]:
    """One article per line: ``pmid``, ``title``, ``abstract``, optional ``year``, ``journal``,
    ``mesh`` (a list or a ';'-separated string)."""
    source = str(path)
    for line_no, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            yield SkippedRecord(f"{source}:{line_no}: not JSON ({exc})")
            continue
        yield _jsonl_document(row, f"{source}:{line_no}", source)


def _jsonl_document(row: Any, where: str, source: str) -> SourceRecord:
    if not isinstance(row, dict):
        return SkippedRecord(f"{where}: expected a JSON object")
    pmid = _pmid_of(row.get("pmid"))
    if pmid is None:
        return SkippedRecord(f"{where}: missing or non-numeric 'pmid'")
    title = clean_text(str(row.get("title") or ""))
    abstract = str(row.get("abstract") or "").strip()
    if not title and not abstract:
        return SkippedRecord(f"{where}: PMID {pmid} has neither title nor abstract")
    mesh = row.get("mesh") or []
    if isinstance(mesh, str):
        mesh = [part for part in (clean_text(p) for p in mesh.split(";")) if part]
    return Document(
        pmid=pmid,
        title=title,
        text=abstract,
        year=_year_of(row.get("year")),
        journal=clean_text(str(row["journal"])) if row.get("journal") else None,
        mesh=[clean_text(str(term)) for term in mesh],
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# PubMedQA


def read_pubmedqa(path: Path) -> Iterator[SourceRecord]:
    """The abstracts behind PubMedQA (``ori_pqal.json`` layout: PMID -> record).

    Each record's ``CONTEXTS`` (with their ``LABELS``) become the document text. PubMedQA does
    not ship the article title, and its ``QUESTION`` is a rewording of that title which the
    benchmark uses as the query, so the title stays empty rather than being faked from it.
    ``LONG_ANSWER`` (the abstract's conclusion) is left out too: it states the answer the
    benchmark asks for.
    """
    source = str(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: PubMedQA JSON must map PMIDs to records")
    for key, record in data.items():
        yield _pubmedqa_document(key, record, source)


def _pubmedqa_document(key: str, record: Any, source: str) -> SourceRecord:
    pmid = _pmid_of(key)
    if pmid is None or not isinstance(record, dict):
        return SkippedRecord(f"{source}: entry {key!r} is not a PMID-keyed PubMedQA record")
    contexts = record.get("CONTEXTS")
    if not isinstance(contexts, list) or not contexts:
        return SkippedRecord(f"{source}: PMID {pmid} has no CONTEXTS")
    labels = record.get("LABELS") or []
    sections = []
    for number, context in enumerate(contexts):
        label = labels[number] if number < len(labels) and labels[number] else None
        text = clean_text(str(context))
        sections.append(f"{label}: {text}" if label else text)
    meshes = record.get("MESHES") or []
    return Document(
        pmid=pmid,
        title="",
        text="\n".join(sections),
        year=_year_of(record.get("YEAR")),
        mesh=[clean_text(str(term)) for term in meshes],
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# PDF


def pdf_document_id(content: bytes) -> str:
    """A stable id for a PDF, from its bytes: the same file ingested again (even after a move
    or rename) updates its document instead of duplicating it."""
    return "pdf-" + hashlib.sha256(content).hexdigest()[:16]


def _pdf_pages(pdf: Any, path: Path) -> tuple[list[str], str]:
    """Page texts and metadata title of an open pymupdf document (closed afterwards)."""
    try:
        if pdf.needs_pass:
            raise InputError(f"{path}: PDF is encrypted")
        pages = [clean_text(page.get_text("text")) for page in pdf]
        title = clean_text((pdf.metadata or {}).get("title") or "")
    finally:
        pdf.close()
    return pages, title


def read_pdf(path: Path) -> Iterator[SourceRecord]:
    """A PDF as one document whose pages are kept apart (chunks and citations name a page)."""
    import pymupdf

    try:
        content = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not content.startswith(_PDF_MAGIC):
        raise InputError(f"{path}: not a PDF (no %PDF header)")
    try:
        opener: Any = pymupdf.open
        pages, meta_title = _pdf_pages(opener(stream=content, filetype="pdf"), path)
    except InputError:
        raise
    except Exception as exc:  # pymupdf raises its own untyped errors on broken files
        raise InputError(f"{path}: unreadable PDF ({exc})") from exc
    if not any(pages):
        raise InputError(f"{path}: PDF has no extractable text (scanned? run OCR first)")
    yield Document(
        pmid=pdf_document_id(content),
        title=meta_title or path.stem,
        text="\n".join(page for page in pages if page),
        source=str(path),
        pages=pages,
    )
