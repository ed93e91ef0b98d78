"""Batch answering over a folder: questions in, one durable JSONL line per question out.

Questions come from ``FOLDER/questions.jsonl`` or ``FOLDER/questions.csv`` (or a file named with
``--questions``), else from a sidecar ``.txt`` beside each image. Every question that cannot be
used (missing or unreadable image, a path leaving FOLDER, empty question, malformed line,
non-UTF-8 text, duplicate id) becomes an item that carries its error, so it is reported in the
output instead of stopping the run.

The output is suwen/jsonl_log.py's append-only log with one line per question id, on disk
before the question counts as done, so a process killed at any moment (SIGKILL included) leaves
at most one torn final line; the next run drops that line, skips every id already answered, and
retries the ids that recorded an error.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, runtime_checkable

from suwen.errors import InputError, ModelError, SuwenError
from suwen.jsonl_log import AppendLog, LogContents, open_append_log, split_log
from suwen.medimage import IMAGE_SUFFIXES, is_dicom_series_dir, is_image_path, load_image
from suwen.types import AgentResult, AnswerFormat, Question

QUESTION_FILES = ("questions.jsonl", "questions.csv")
DEFAULT_CONCURRENCY = 8
DEFAULT_MAX_QUESTION_CHARS = 20_000  # the setting max_question_chars
# Room on a questions line (or in a sidecar) beyond the question itself: id, image paths,
# options. UTF-8 takes up to 4 bytes a character.
RECORD_SLACK_BYTES = 64 * 1024
READ_CHUNK_BYTES = 1 << 20

Answerer = Callable[[Question], Awaitable[AgentResult]]
ImageCheck = Callable[[Path], object]


@runtime_checkable
class ReadsImages(Protocol):
    """An answerer that decodes every image of a question (priors too) before it asks the
    model, raising InputError naming one it cannot read, as the agent does
    (``runtime.AgentAnswerer``). Batch then leaves the check to it: decoding each image
    twice per question, once to check it and once to answer, costs a process whose cores
    the model server shares (and reads a DICOM series or a volume twice)."""

    reads_images: Literal[True]

    def __call__(self, question: Question) -> Awaitable[AgentResult]: ...


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchItem:
    """One question to answer, or the reason it cannot be asked (then ``question`` is None)."""

    id: str
    where: str = ""
    question: Question | None = None
    images: tuple[str, ...] = ()
    error: str | None = None


@dataclass
class QuestionSet:
    items: list[BatchItem]
    source: str
    notes: list[str] = field(default_factory=list)
    file: Path | None = None  # the questions file, when there is one


@dataclass(frozen=True)
class _Raw:
    """A record as read from a source, before its fields are checked."""

    id: str
    where: str
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def load_questions(
    folder: Path,
    questions_file: Path | None = None,
    max_question_chars: int = DEFAULT_MAX_QUESTION_CHARS,
) -> QuestionSet:
    """Every question for ``folder``: from ``questions_file``, FOLDER/questions.{jsonl,csv}, or
    sidecar .txt files. Raises InputError only when no question source can be read at all.

    Question files are read a line (a CSV record) at a time and sidecars one by one, so memory
    follows the questions kept, not the file; a question longer than ``max_question_chars``
    (or a line too long to hold one) becomes an error item without being read whole."""
    limits = _Limits(max_question_chars)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    root = folder.resolve()
    notes: list[str] = []
    source = questions_file if questions_file is not None else _question_file_in(folder)
    if source is not None:
        raws = list(_read_question_file(source, limits))
        label = str(source)
    else:
        raws = list(_sidecar_records(root, notes, limits))
        label = f"sidecar .txt files in {folder}"
        if not raws:
            raise InputError(
                f"{folder}: no questions found (expected questions.jsonl, questions.csv, "
                "or a .txt beside each image)"
            )
    items = _merge_duplicates([_build_item(raw, root, limits) for raw in raws])
    return QuestionSet(items=items, source=label, notes=notes, file=source)


def _question_file_in(folder: Path) -> Path | None:
    found = [folder / name for name in QUESTION_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise InputError(
            f"{folder}: both questions.jsonl and questions.csv exist; name one with --questions"
        )
    return found[0] if found else None


@dataclass(frozen=True)
class _Limits:
    """How long a question may be, and so how many bytes a record may take."""

    max_chars: int

    @property
    def max_record_bytes(self) -> int:
        return 4 * self.max_chars + RECORD_SLACK_BYTES

    def too_long(self, where: str, chars: int) -> str:
        return (
            f"{where}: the question has {chars} characters; the limit is {self.max_chars} "
            "(setting max_question_chars)"
        )

    def record_too_big(self, where: str, what: str) -> str:
        return (
            f"{where}: {what} longer than {self.max_record_bytes} bytes, more than a question "
            f"of {self.max_chars} characters can take (setting max_question_chars); not read"
        )


def question_length_error(text: str, max_chars: int, where: str) -> str | None:
    """The one-line error for a question longer than ``max_chars`` (setting
    max_question_chars), or None. Every way in (ask, chat, batch) applies it."""
    return _Limits(max_chars).too_long(where, len(text)) if len(text) > max_chars else None


def _read_question_file(path: Path, limits: _Limits) -> Iterator[_Raw]:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".ndjson"):
        raise InputError(f"{path}: questions file must end in .jsonl or .csv")
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"{path}: cannot read questions file: {exc.strerror or exc}") from exc
    with handle:
        if handle.read(3) != b"\xef\xbb\xbf":
            handle.seek(0)
        try:
            if suffix == ".csv":
                yield from _csv_records(path, handle, limits)
            else:
                yield from _jsonl_records(path, handle, limits)
        except OSError as exc:
            raise InputError(f"{path}: cannot read questions file: {exc.strerror or exc}") from exc


def _bounded_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """The file's lines, each read on its own; a line longer than ``limit`` bytes is skipped
    in chunks (never held whole) and given as None."""
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = handle.readline(READ_CHUNK_BYTES)
        yield None


def _jsonl_records(path: Path, handle: BinaryIO, limits: _Limits) -> Iterator[_Raw]:
    for lineno, raw_line in enumerate(_bounded_lines(handle, limits.max_record_bytes), start=1):
        where = f"{path.name}:{lineno}"
        if raw_line is None:
            yield _Raw(where, where, error=limits.record_too_big(where, "line"))
            continue
        raw_line = raw_line.rstrip(b"\r\n")
        if not raw_line.strip():
            continue
        utf8_ok = _is_utf8(raw_line)
        # Decoding with surrogateescape keeps a line with a stray byte parseable, so its id
        # (when the id itself is clean) can name the error line.
        text = raw_line.decode("utf-8", errors="surrogateescape")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield _Raw(where, where, error=f"{where}: malformed JSON line ({exc.msg})")
            continue
        if not isinstance(obj, dict):
            yield _Raw(where, where, error=f"{where}: expected a JSON object per line")
            continue
        yield _record_from_fields(obj, where, utf8_ok)


def _csv_records(path: Path, handle: BinaryIO, limits: _Limits) -> Iterator[_Raw]:
    reader = csv.DictReader(_csv_lines(handle, limits))
    header = reader.fieldnames or []
    missing = {"id", "question"} - set(header)
    if missing:
        raise InputError(f"{path}: CSV header lacks column(s) {', '.join(sorted(missing))}")
    try:
        for row in reader:
            where = f"{path.name}:{reader.line_num}"
            if None in row or any(value is None for value in row.values()):
                yield _Raw(_clean_id(row.get("id")) or where, where, error=_wrong_width(where))
                continue
            fields = {key: value for key, value in row.items() if value != ""}
            yield _record_from_fields(fields, where, not _has_surrogates(fields))
    except csv.Error as exc:
        where = f"{path.name}:{reader.line_num}"
        yield _Raw(where, where, error=f"{where}: malformed CSV ({exc}); rows after it not read")


def _csv_lines(handle: BinaryIO, limits: _Limits) -> Iterator[str]:
    """Text lines for the CSV reader (a quoted field may span several), each bounded."""
    for line in _bounded_lines(handle, limits.max_record_bytes):
        if line is None:
            raise csv.Error(f"a line longer than {limits.max_record_bytes} bytes")
        yield line.decode("utf-8", errors="surrogateescape")


def _wrong_width(where: str) -> str:
    return f"{where}: malformed CSV row (wrong number of fields)"


def _record_from_fields(fields: dict[str, Any], where: str, utf8_ok: bool) -> _Raw:
    item_id = _clean_id(fields.get("id"))
    if item_id is None:
        return _Raw(where, where, error=f"{where}: missing or invalid 'id'")
    if not utf8_ok:
        return _Raw(item_id, where, error=f"{where}: not valid UTF-8 text")
    return _Raw(item_id, where, fields=fields)


def _clean_id(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    return text if text and not _has_surrogates(text) else None


def _sidecar_records(root: Path, notes: list[str], limits: _Limits) -> Iterator[_Raw]:
    """One record per image (or DICOM series folder) with ``<stem>.txt`` beside it; the id is
    the sidecar's path relative to FOLDER without ``.txt``. Images sharing a stem share it."""
    by_sidecar: dict[Path, list[Path]] = {}
    lonely = 0
    for image in _images_under(root):
        sidecar = image.with_name(_stem(image) + ".txt")
        if sidecar.is_file():
            by_sidecar.setdefault(sidecar, []).append(image)
        else:
            lonely += 1
    if lonely:
        notes.append(f"{lonely} image(s) without a sidecar .txt were not asked about")
    for sidecar, images in by_sidecar.items():
        where = sidecar.relative_to(root).as_posix()
        item_id = where.removesuffix(".txt")
        try:
            if sidecar.stat().st_size > limits.max_record_bytes:
                yield _Raw(item_id, where, error=limits.record_too_big(where, "file"))
                continue
            raw = sidecar.read_bytes()
        except OSError as exc:
            yield _Raw(item_id, where, error=f"{where}: cannot read: {exc.strerror or exc}")
            continue
        if not _is_utf8(raw):
            yield _Raw(item_id, where, error=f"{where}: not valid UTF-8 text")
            continue
        text = raw.decode("utf-8").removeprefix("\ufeff")
        rel_images = [image.relative_to(root).as_posix() for image in images]
        yield _Raw(item_id, where, fields={"question": text, "images": rel_images})


def _images_under(root: Path) -> Iterator[Path]:
    """Image files and DICOM series folders under ``root``, skipping hidden entries and the
    files inside a series (the series is the image)."""
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        series = [d for d in subdirs if is_dicom_series_dir(here / d)]
        yield from (here / d for d in series)
        subdirs[:] = [d for d in subdirs if d not in series]
        for name in sorted(files):
            path = here / name
            if not name.startswith(".") and is_image_path(path):
                yield path


def _stem(image: Path) -> str:
    lower = image.name.lower()
    suffix = max((s for s in IMAGE_SUFFIXES if lower.endswith(s)), key=len, default="")
    return image.name[: len(image.name) - len(suffix)]


def _build_item(raw: _Raw, root: Path, limits: _Limits) -> BatchItem:
    if raw.error is not None:
        return BatchItem(id=raw.id, where=raw.where, error=raw.error)
    try:
        text = _question_text(raw.fields.get("question"), raw.where)
        too_long = question_length_error(text, limits.max_chars, raw.where)
        if too_long is not None:
            raise InputError(too_long)
        studies = study_fields(raw.fields, raw.where)
        rel_images = [*studies.priors, *studies.current]
        paths = {rel: str(resolve_inside(root, rel, raw.where)) for rel in rel_images}
        answer_format = _answer_format(raw.fields.get("options"), raw.where)
    except InputError as exc:
        return BatchItem(id=raw.id, where=raw.where, error=str(exc))
    question = Question(
        text=text,
        images=[paths[rel] for rel in studies.current],
        prior_images=[paths[rel] for rel in studies.priors],
        image_dates={paths[rel]: date for rel, date in studies.dates.items()},
        answer_format=answer_format,
    )
    return BatchItem(id=raw.id, where=raw.where, question=question, images=tuple(rel_images))


@dataclass
class StudyFields:
    """A line's images by role: ``current`` (``image``/``images``), ``priors`` (``prior``, or
    an ``images`` entry ``{"path": ..., "role": "prior", "date": ...}``), dates given."""

    current: list[str] = field(default_factory=list)
    priors: list[str] = field(default_factory=list)
    dates: dict[str, str] = field(default_factory=dict)


def study_fields(fields: dict[str, Any], where: str) -> StudyFields:
    studies = StudyFields()
    plain = dict(fields)
    for key in ("image", "images"):
        value = fields.get(key)
        if isinstance(value, list) and any(isinstance(v, dict) for v in value):
            for entry in value:
                _add_study_entry(studies, entry, f"{where}: '{key}'")
            plain[key] = None
    studies.current = _image_list(plain, where) + studies.current
    prior = fields.get("prior")
    if prior is not None:
        studies.priors.extend(_image_list({"prior": prior}, where, keys=("prior",)))
    _add_line_dates(studies, fields, where)
    return studies


def _add_line_dates(studies: StudyFields, fields: dict[str, Any], where: str) -> None:
    """A line's ``"study_date"`` (its current study's) and ``"prior_date"`` (its priors'), for the
    images no ``{"path": ..., "date": ...}`` entry dates."""
    from suwen.studies import normalise_date

    for key, paths in (("study_date", studies.current), ("prior_date", studies.priors)):
        value = fields.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if not paths:
            raise InputError(f"{where}: '{key}' given without the images it dates")
        date = normalise_date(str(value), f"{where}: '{key}'")
        for path in paths:
            studies.dates.setdefault(path, date)


def _add_study_entry(studies: StudyFields, entry: object, where: str) -> None:
    from suwen.studies import normalise_date

    if isinstance(entry, str):
        studies.current.append(entry)
        return
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise InputError(f'{where}: each entry must be a path or {{"path": ...}}')
    path, role, date = entry["path"], entry.get("role", "current"), entry.get("date")
    if role not in ("prior", "current"):
        raise InputError(f"{where}: role {role!r} must be 'prior' or 'current'")
    (studies.priors if role == "prior" else studies.current).append(path)
    if date is not None:
        studies.dates[path] = normalise_date(str(date), where)


def _question_text(value: object, where: str) -> str:
    if value is None:
        raise InputError(f"{where}: no 'question'")
    if not isinstance(value, str):
        raise InputError(f"{where}: 'question' must be text")
    if not value.strip():
        raise InputError(f"{where}: empty question")
    return value.strip()


def _image_list(
    fields: dict[str, Any], where: str, keys: tuple[str, ...] = ("image", "images")
) -> list[str]:
    images: list[str] = []
    for key in keys:
        value = fields.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            images.extend(_split_image_cell(value))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            images.extend(v for v in value if v.strip())
        else:
            raise InputError(f"{where}: '{key}' must be a path or a list of paths")
    return images


def _split_image_cell(value: str) -> list[str]:
    """A CSV cell (or JSON string) naming images: one path, 'a.png;b.png', or a JSON list."""
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
            return [v for v in parsed if v.strip()]
    return [part.strip() for part in value.split(";") if part.strip()]


def resolve_inside(root: Path, relative: str, where: str = "") -> Path:
    """``root / relative`` with symlinks resolved; refuses a path that leaves ``root``. A folder
    is accepted too: a DICOM series is one image."""
    prefix = f"{where}: " if where else ""
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise InputError(f"{prefix}image {relative!r} is outside the folder {root}; refused")
    if not path.exists():
        raise InputError(f"{prefix}image {relative!r} not found")
    return path


def _answer_format(value: object, where: str) -> AnswerFormat:
    if value is None:
        return AnswerFormat()
    options = _options(value, where)
    if not options:
        return AnswerFormat()
    return AnswerFormat(kind="choice", options=options)


def _options(value: object, where: str) -> dict[str, str]:
    if isinstance(value, str):
        value = _parse_options_cell(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) > 26:
            raise InputError(f"{where}: more than 26 options")
        return {chr(ord("A") + i): text for i, text in enumerate(value)}
    if isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return {k.strip(): v for k, v in value.items()}
    raise InputError(f"{where}: 'options' must map letters to text or list the options")


def _parse_options_cell(value: str) -> object:
    """CSV options: a JSON object/list, or options separated by '|'."""
    value = value.strip()
    if value.startswith(("{", "[")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return [part.strip() for part in value.split("|") if part.strip()]


def _merge_duplicates(items: list[BatchItem]) -> list[BatchItem]:
    """An id given more than once is ambiguous: it becomes one error item, asked of nobody."""
    places: dict[str, list[str]] = {}
    for item in items:
        places.setdefault(item.id, []).append(item.where)
    merged: list[BatchItem] = []
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            continue
        seen.add(item.id)
        where = places[item.id]
        if len(where) > 1:
            message = f"duplicate id {item.id!r} (at {', '.join(where)}); give each question one id"
            item = BatchItem(id=item.id, where=where[0], error=message)
        merged.append(item)
    return merged


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _has_surrogates(value: object) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogates(v) for v in value.values())
    return False


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


@dataclass
class PriorOutput:
    """What an existing output file already holds."""

    answered: set[str] = field(default_factory=set)
    error_ids: set[str] = field(default_factory=set)
    torn_tail: bool = False
    unreadable_lines: int = 0


class AnswerLog:
    """The output JSONL, locked for this run. ``append`` returns once the line is on disk."""

    def __init__(self, log: AppendLog, prior: PriorOutput) -> None:
        self.path = log.path
        self.prior = prior
        self._log = log

    def append(self, record: dict[str, Any]) -> None:
        self._log.append(json.dumps(record, ensure_ascii=False))


@contextmanager
def open_answer_log(path: Path) -> Iterator[AnswerLog]:
    """Lock ``path`` against a second writer, read what it holds, drop its torn final line and
    its error lines (those ids are asked again), then open it for appending."""
    with open_append_log(path, "suwen batch") as log:
        prior, keep = classify_prior_output(log.found)
        if keep != log.found.lines:
            log.rewrite(keep)
        yield AnswerLog(log, prior)


def read_prior_output(data: bytes) -> tuple[PriorOutput, list[bytes]]:
    """Classify the lines of an existing output file; returns the lines worth keeping."""
    return classify_prior_output(split_log(data))


def classify_prior_output(found: LogContents) -> tuple[PriorOutput, list[bytes]]:
    """What the output's lines say (a torn final line's id is asked again); the lines worth
    keeping: answers, and lines that are not ours to delete."""
    prior = PriorOutput(torn_tail=found.torn_tail)
    keep: list[bytes] = []
    for line in found.lines:
        record = _parse_output_line(line)
        if record is None:
            if line.strip():
                prior.unreadable_lines += 1
                keep.append(line)  # not ours to delete
            continue
        item_id, is_error = record
        if is_error:
            prior.error_ids.add(item_id)
        else:
            prior.answered.add(item_id)
            keep.append(line)
    prior.error_ids -= prior.answered
    return prior, keep


def _parse_output_line(line: bytes) -> tuple[str, bool] | None:
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
        return None
    return obj["id"], "error" in obj


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class BatchProgress:
    """Counts for this run (``total`` excludes questions answered by an earlier run)."""

    total: int
    skipped: int
    done: int = 0
    answered: int = 0
    errors: int = 0
    abstained: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


@dataclass
class BatchSummary:
    questions: int
    skipped: int
    answered: int
    errors: list[tuple[str, str]]
    seconds: float
    notes: list[str]
    abstained: int = 0  # answered, but below the abstention threshold (counted in answered)

    @property
    def complete(self) -> bool:
        """Every question now has an answer or a recorded error."""
        return self.skipped + self.answered + len(self.errors) == self.questions


async def run_batch(
    questions: QuestionSet,
    out: Path,
    answer: Answerer,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    check_image: ImageCheck | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> BatchSummary:
    """Answer every question not already answered in ``out`` (see ``answer_pending``)."""
    with open_answer_log(out) as log:
        return await answer_pending(
            questions,
            log,
            answer,
            concurrency=concurrency,
            check_image=check_image,
            on_progress=on_progress,
        )


async def answer_questions(
    questions: QuestionSet,
    log: AnswerLog,
    start: Callable[[], AbstractAsyncContextManager[Answerer]],
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> BatchSummary:
    """Answer the pending questions (``answer_pending``) with the answerer ``start`` opens,
    started only when one of them can be asked: otherwise the unusable items are recorded
    without a model (``record_unaskable``)."""
    if not needs_model(questions, log):
        return await record_unaskable(questions, log, concurrency=concurrency)
    async with start() as answer:
        return await answer_pending(
            questions, log, answer, concurrency=concurrency, on_progress=on_progress
        )


def pending(questions: QuestionSet, log: AnswerLog) -> list[BatchItem]:
    """The questions the output does not answer yet, in input order."""
    return [item for item in questions.items if item.id not in log.prior.answered]


def needs_model(questions: QuestionSet, log: AnswerLog) -> bool:
    """Whether a pending question can be asked; when none can (all answered, or only unusable
    items left), ``record_unaskable`` finishes the run without starting a model."""
    return any(item.question is not None for item in pending(questions, log))


async def record_unaskable(
    questions: QuestionSet, log: AnswerLog, *, concurrency: int = DEFAULT_CONCURRENCY
) -> BatchSummary:
    """A run that needs no model: the pending unusable items are recorded with their errors."""
    return await answer_pending(questions, log, _no_model, concurrency=concurrency)


async def _no_model(question: Question) -> AgentResult:
    raise ModelError("no model was started for this run")


async def answer_pending(
    questions: QuestionSet,
    log: AnswerLog,
    answer: Answerer,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    check_image: ImageCheck | None = None,
    on_progress: Callable[[BatchProgress], None] | None = None,
) -> BatchSummary:
    """Answer the pending questions ``concurrency`` at a time, appending one line each.

    ``check_image`` decodes each image before the model is asked (default
    ``suwen.medimage.load_image``, or none for an answerer that ``ReadsImages`` itself), so an
    unreadable image is an error line, not an answer guessed without the image.
    """
    if concurrency < 1:
        raise InputError(f"--concurrency {concurrency}: must be at least 1")
    check = image_check(answer, check_image)
    todo = pending(questions, log)
    progress = BatchProgress(total=len(todo), skipped=len(questions.items) - len(todo))
    errors: list[tuple[str, str]] = []
    if on_progress:
        on_progress(progress)

    async def finish(item: BatchItem, record: dict[str, Any]) -> None:
        # fsync in a worker thread: the event loop keeps feeding the model meanwhile.
        await asyncio.to_thread(log.append, record)
        progress.done += 1
        if "error" in record:
            progress.errors += 1
            errors.append((item.id, record["error"]))
        else:
            progress.answered += 1
            progress.abstained += record.get("outcome") == "abstained"
        if on_progress:
            on_progress(progress)

    async def worker(queue: Iterator[BatchItem]) -> None:
        for item in queue:
            await finish(item, await _answer_item(item, answer, check))

    shared = iter(todo)  # workers pull from one iterator: no task per question up front
    workers = min(concurrency, max(1, len(todo)))
    await asyncio.gather(*(worker(shared) for _ in range(workers)))
    return BatchSummary(
        questions=len(questions.items),
        skipped=progress.skipped,
        answered=progress.answered,
        errors=errors,
        seconds=progress.seconds,
        notes=list(questions.notes) + _prior_notes(log.prior, log.path),
        abstained=progress.abstained,
    )


def image_check(answer: Answerer, given: ImageCheck | None) -> ImageCheck | None:
    """The check ``given``; else none when the answerer ``ReadsImages`` itself, else a decode."""
    if given is not None:
        return given
    return None if isinstance(answer, ReadsImages) else load_image


async def _answer_item(
    item: BatchItem, answer: Answerer, check: ImageCheck | None
) -> dict[str, Any]:
    if item.question is None:
        return {"id": item.id, "error": item.error or "unusable question"}
    try:
        await _check_images(item.question, check)
        result = await answer(item.question)
    except Exception as exc:  # one failing question must not stop thousands of others
        return {"id": item.id, "error": error_text(exc)}
    failure = answer_failure(item.question, result)
    if failure is not None:
        return {"id": item.id, "error": failure}
    return result_record(item, result)


def error_text(exc: Exception) -> str:
    """A question's error as its output line says it: Suwen's own one-line message, else the
    exception's type and text."""
    return str(exc) if isinstance(exc, SuwenError) else f"{type(exc).__name__}: {exc}"


async def _check_images(question: Question, check: ImageCheck | None) -> None:
    if check is None:
        return
    for path in [*question.prior_images, *question.images]:
        await asyncio.to_thread(check, Path(path))


def answer_failure(question: Question, result: AgentResult) -> str | None:
    """Why a result is not an answer worth keeping, or None.

    The agent degrades instead of raising when the model fails (it answers without the failed
    step), so a server outage shows up here: no answer text at all, or an answer whose stream
    broke off. Recorded as errors, those questions are asked again on the next run; an answer
    that merely lacks a step (a failed search, say) is kept with its trace.
    """
    degraded = [event for event in result.trace if event.degraded]
    if not result.answer.strip():
        reasons = "; ".join(f"{event.node}: {event.message}" for event in degraded)
        return f"model error: no answer ({reasons})" if reasons else "the model's answer was empty"
    cut = [event for event in degraded if event.node == "answer"]
    # A degraded answer step with its short answer in hand can only mean a broken stream.
    if cut and (question.answer_format.kind == "free" or result.short_answer is not None):
        return f"model error: the answer was cut off ({cut[-1].message})"
    return None


def result_record(item: BatchItem, result: AgentResult) -> dict[str, Any]:
    """The output line of an answered question: its id, images and outcome (``abstained``:
    below the abstention threshold, a best guess that is neither right nor wrong; else
    ``answered``), then the full result."""
    outcome = "abstained" if result.abstained else "answered"
    return {
        "id": item.id,
        "images": list(item.images),
        "outcome": outcome,
        **result.model_dump(mode="json"),
    }


def _prior_notes(prior: PriorOutput, out: Path) -> list[str]:
    notes = []
    if prior.torn_tail:
        notes.append(f"{out}: dropped a partly written last line (that question is asked again)")
    if prior.error_ids:
        notes.append(f"{len(prior.error_ids)} question(s) that failed before are retried")
    if prior.unreadable_lines:
        notes.append(f"{out}: {prior.unreadable_lines} line(s) not in Suwen's format were kept")
    return notes
