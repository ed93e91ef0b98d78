"""Case libraries as people have them, for ``suwen index images``.

- A Hugging Face dataset saved on disk (``.parquet`` files, or the ``.arrow`` files
  ``save_to_disk`` writes), such as ROCOv2, PMC-OA, SLAKE or MedPix exports: read in record
  batches of a few dozen rows (bounded memory whatever the dataset's size), each image written
  once under the data home (content-addressed, so a re-run writes nothing new) beside a JSONL
  manifest that the ordinary manifest reader then indexes.
- A study-per-folder export (what a PACS or research export gives): each folder holds one
  DICOM series or some images, and the report as a ``.txt`` inside it. The folder reader asks
  :func:`study_report` for the caption of a series or image that has no sidecar of its own.

Dataset files are hostile input: a cell that is not an image's bytes (PNG, JPEG, TIFF, DICOM)
or a path inside the dataset's folder is skipped with one line, and no cell larger than
``MAX_IMAGE_BYTES`` is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from suwen.errors import InputError
from suwen.files import atomic_path, atomic_write_bytes
from suwen.medimage import is_image_path

DATASET_SUFFIXES = (".parquet", ".arrow")
BATCH_ROWS = 32
MAX_IMAGE_BYTES = 256 * 1024 * 1024
MANIFEST_NAME = "manifest.jsonl"
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"\xff\xd8\xff", ".jpg"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)

WarnFn = Callable[[str], None]


@dataclass(frozen=True)
class DatasetColumns:
    """Which columns of a dataset hold what (the id and modality are optional)."""

    image: str = "image"
    text: str = "caption"
    id: str | None = None
    modality: str | None = None

    def names(self) -> list[str]:
        return [name for name in (self.image, self.text, self.id, self.modality) if name]


# -- Hugging Face datasets on disk ---------------------------------------------------------


def is_dataset(source: Path) -> bool:
    """A .parquet/.arrow file, or a folder holding some (a saved dataset)."""
    if source.is_file():
        return source.suffix.lower() in DATASET_SUFFIXES
    return source.is_dir() and any(True for _ in dataset_files(source))


def dataset_files(source: Path) -> Iterator[Path]:
    if source.is_file():
        yield source
        return
    for path in sorted(source.rglob("*")):
        if path.suffix.lower() in DATASET_SUFFIXES and path.is_file():
            yield path


# The data home's folder of images extracted from datasets (one subfolder per dataset path).
EXTRACTED_IMAGES_DIR = "case_images"


def extraction_dir(home: Path, source: Path) -> Path:
    """Where a dataset's images are written: one folder per dataset path, in the data home."""
    resolved = str(source.expanduser().resolve())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(resolved).stem)[:40] or "dataset"
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:10]
    return home / EXTRACTED_IMAGES_DIR / f"{stem}-{digest}"


def extract_dataset(
    source: Path, target: Path, columns: DatasetColumns, warn: WarnFn
) -> tuple[Path, int]:
    """Write the dataset's images under ``target`` and a manifest naming them with their text;
    returns the manifest and how many rows it names. Rows are read ``BATCH_ROWS`` at a time."""
    target.mkdir(parents=True, exist_ok=True)
    manifest = target / MANIFEST_NAME
    written = 0
    with atomic_path(manifest) as staging, staging.open("w", encoding="utf-8") as out:
        for file in dataset_files(source):
            for number, row in _rows(file, columns):
                line = _manifest_row(file, number, row, columns, target, warn)
                if line is not None:
                    out.write(json.dumps(line) + "\n")
                    written += 1
    if not written:
        raise InputError(f"{source}: no row holds a usable image in column {columns.image!r}")
    return manifest, written


def _rows(file: Path, columns: DatasetColumns) -> Iterator[tuple[int, dict[str, Any]]]:
    number = 0
    for batch in _batches(file, columns):
        values = {name: batch.column(name).to_pylist() for name in columns.names()}
        for index in range(batch.num_rows):
            yield number, {name: values[name][index] for name in values}
            number += 1


def _batches(file: Path, columns: DatasetColumns) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.suffix.lower() == ".parquet":
            parquet = pq.ParquetFile(file)
            _check_columns(file, parquet.schema_arrow.names, columns)
            yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns.names())
            return
        names, batches = _arrow_batches(file)
        _check_columns(file, names, columns)
        for batch in batches:
            # save_to_disk writes large batches: slice them to keep memory bounded.
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(start, BATCH_ROWS).select(columns.names())
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file}: not a readable dataset file: {_one_line(exc)}") from exc


def _arrow_batches(file: Path) -> tuple[list[str], Iterator[Any]]:
    """Column names and record batches of an Arrow stream (what ``save_to_disk`` writes) or
    an Arrow file."""
    import pyarrow as pa

    try:
        stream = pa.ipc.open_stream(file)
        return list(stream.schema.names), iter(stream)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(file)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        return list(reader.schema.names), batches


def _check_columns(file: Path, present: list[str], columns: DatasetColumns) -> None:
    missing = [name for name in columns.names() if name not in present]
    if missing:
        raise InputError(
            f"{file}: no column {', '.join(map(repr, missing))} (columns: {', '.join(present)}); "
            "name them with --image-column / --text-column / --id-column / --modality-column"
        )


def _manifest_row(
    file: Path,
    number: int,
    row: dict[str, Any],
    columns: DatasetColumns,
    target: Path,
    warn: WarnFn,
) -> dict[str, Any] | None:
    where = f"{file.name}:{number}"
    image = _image_file(row[columns.image], file.parent, target, where, warn)
    if image is None:
        return None
    case_id = str(row[columns.id]) if columns.id and row.get(columns.id) is not None else None
    line: dict[str, Any] = {
        "path": image.relative_to(target).as_posix(),
        "id": case_id or f"{file.stem}:{number}",
        "caption": _text(row.get(columns.text)),
        "source": f"{file}:{number}",
    }
    if columns.modality and row.get(columns.modality) is not None:
        line["modality"] = _text(row[columns.modality])
    return line


def _image_file(cell: Any, base: Path, target: Path, where: str, warn: WarnFn) -> Path | None:
    """The cell's image written under ``target`` (bytes, or a path inside ``base``)."""
    data: bytes | None = None
    if isinstance(cell, dict):
        data = cell.get("bytes") or None
        cell = data if data is not None else cell.get("path")
    if isinstance(cell, bytes | bytearray):
        data = bytes(cell)
    elif isinstance(cell, str) and cell:
        data = _read_inside(base, cell, where, warn)
        if data is None:
            return None  # said why
    if data is None:
        warn(f"{where}: no image in this row, skipped")
        return None
    if len(data) > MAX_IMAGE_BYTES:
        warn(f"{where}: image of {len(data)} bytes is over the limit, skipped")
        return None
    suffix = _suffix_of(data)
    if suffix is None:
        warn(f"{where}: not a PNG, JPEG, TIFF or DICOM image, skipped")
        return None
    digest = hashlib.sha256(data).hexdigest()
    path = target / "images" / digest[:2] / f"{digest}{suffix}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
    return path


def _read_inside(base: Path, relative: str, where: str, warn: WarnFn) -> bytes | None:
    path = (base / relative).resolve()
    if not path.is_relative_to(base.resolve()) or not path.is_file():
        warn(f"{where}: image path {relative!r} is not a file inside {base}, skipped")
        return None
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        warn(f"{where}: image of {size} bytes is over the limit, skipped")
        return None
    return path.read_bytes()


def _suffix_of(data: bytes) -> str | None:
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    if data[128:132] == b"DICM":
        return ".dcm"
    return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(_text(item) for item in value)
    return str(value).strip()


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# -- study-per-folder exports ---------------------------------------------------------------


def study_report(folder: Path) -> str:
    """The report of a study folder: its one ``.txt`` that is neither an image's own sidecar
    nor a sub-folder's (``series.txt`` beside ``series/``)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return ""
    stems = {_stem(path) for path in entries if path.is_file() and is_image_path(path)} | {
        path.name for path in entries if path.is_dir()
    }
    reports = [
        path
        for path in entries
        if path.suffix.lower() == ".txt" and path.is_file() and path.stem not in stems
    ]
    if len(reports) != 1:
        return ""  # none, or several and no way to tell which is the report
    try:
        return reports[0].read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem
