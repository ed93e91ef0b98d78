"""Build an image index: BiomedCLIP embeddings in FAISS, cases and captions in SQLite.

Input is a manifest (JSONL, JSON list or CSV with ``path``, ``caption`` or ``report``, optional
``modality``, ``body_part``, ``source``, ``id``; paths relative to the manifest's folder) or a
folder of images with sidecar ``.txt`` captions (``scan1.png`` + ``scan1.txt``; a sub-folder of
DICOM files is one series, captioned by ``<folder>.txt`` beside it; in a study-per-folder export
a series or image without its own caption takes the report ``.txt`` inside its folder, see
``image_sources``). Hugging Face datasets on disk are turned into a manifest by ``image_sources``.

Each case is stored as up to ``max_frames`` rows (one per representative frame or slice), each
with its own vector; the vector id is the row id (layout and SQL: ``suwen.indexes.image_store``).
A build holds the index's build lock (a second concurrent build is refused), works on a copy and
publishes a new version atomically (:func:`suwen.indexes.store.new_version`), so a crash or Ctrl-C
leaves the previous version live. Re-adding a case id replaces it; an unchanged
file (same sha256) keeps its vectors and only has its metadata updated.

Bad items (missing file, path outside the folder, unreadable image) are reported through
``warn`` with one line naming the file and skipped; ingest fails only when nothing at all could
be ingested.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suwen.config import Settings
from suwen.digests import sha256_of
from suwen.errors import IndexMismatchError, InputError
from suwen.indexes import store, vectors
from suwen.indexes.image_encoder import ImageEncoder, encoder_id, load_image_encoder
from suwen.indexes.image_store import CaseFields, ImageStore
from suwen.medimage import (
    Frame,
    is_dicom_series_dir,
    is_image_path,
    load_frames,
)

DEFAULT_MAX_FRAMES = 3
MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")

# (stage, done, total): stages are "scan" and "encode" (done/total in cases).
ProgressFn = Callable[[str, int, int], None]
WarnFn = Callable[[str], None]


@dataclass(frozen=True)
class ImageItem:
    """One case to ingest, as read from a manifest line or found in a folder."""

    path: Path
    case_id: str
    caption: str = ""
    modality: str | None = None
    body_part: str | None = None
    source: str = ""
    origin: str = ""  # where it was named, for messages: 'manifest.csv:12' or the file


@dataclass
class IngestSummary:
    name: str
    found: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    frames: int = 0
    uncaptioned: int = 0
    skipped: list[str] = field(default_factory=list)
    cases_total: int = 0
    vectors_total: int = 0

    @property
    def ingested(self) -> int:
        return self.added + self.updated + self.unchanged


# --- reading the input ------------------------------------------------------------------------


def read_items(source: Path, warn: WarnFn) -> list[ImageItem]:
    """The cases named by a manifest or found in a folder; problems go to ``warn``."""
    source = Path(source)
    if source.is_dir():
        items = list(_folder_items(source))
        if not items:
            raise InputError(
                f"{source}: no images found (looked for PNG, JPEG, TIFF, DICOM and NIfTI files)"
            )
        return items
    if not source.is_file():
        raise InputError(f"{source}: no such folder or manifest")
    suffix = source.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise InputError(f"{source}: expected a folder or a .jsonl, .json or .csv manifest")
    rows = _csv_rows(source) if suffix == ".csv" else _json_rows(source, warn)
    items = _dedupe(_manifest_items(source, rows, warn), warn)
    if not items:
        raise InputError(f"{source}: the manifest names no usable image")
    return items


def _json_rows(manifest: Path, warn: WarnFn) -> Iterator[tuple[int, dict[str, Any]]]:
    text = _read_text(manifest)
    if manifest.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{manifest}: invalid JSON: {exc}") from exc
        if not isinstance(data, list):
            raise InputError(f"{manifest}: expected a JSON list of objects")
        yield from enumerate(data, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            warn(f"{manifest}:{number}: invalid JSON line, skipped ({exc.msg})")


def _csv_rows(manifest: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(_read_text(manifest).splitlines())
    columns = {(name or "").strip().lower() for name in reader.fieldnames or []}
    if "path" not in columns:
        raise InputError(f"{manifest}: CSV header has no 'path' column")
    for row in reader:
        clean = {(key or "").strip().lower(): value for key, value in row.items()}
        yield reader.line_num, clean


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read manifest: {exc}") from exc


def _manifest_items(
    manifest: Path, rows: Iterator[tuple[int, dict[str, Any]]], warn: WarnFn
) -> Iterator[ImageItem]:
    base = _absolute(manifest.parent)
    for number, row in rows:
        where = f"{manifest}:{number}"
        if not isinstance(row, dict):
            warn(f"{where}: expected an object with a 'path', skipped")
            continue
        raw = str(row.get("path") or "").strip()
        if not raw:
            warn(f"{where}: no 'path', skipped")
            continue
        path = _inside(base, raw)
        if path is None:
            warn(f"{where}: {raw!r} is outside the manifest's folder {base}, skipped")
            continue
        if not path.exists():
            warn(f"{where}: {path}: no such file, skipped")
            continue
        yield ImageItem(
            path=path,
            case_id=_text(row.get("id")) or path.relative_to(base).as_posix(),
            caption=_caption(row.get("caption")) or _caption(row.get("report")),
            modality=_text(row.get("modality")),
            body_part=_text(row.get("body_part")),
            source=_text(row.get("source")) or str(manifest),
            origin=where,
        )


def _inside(base: Path, raw: str) -> Path | None:
    """``raw`` resolved against ``base``, or None when it points outside ``base``.

    The check is on the normalised path (``..`` and absolute paths), not through symlinks: a
    symlink inside the folder was put there by whoever owns it."""
    candidate = Path(os.path.normpath(base / Path(raw).expanduser()))
    return candidate if candidate == base or base in candidate.parents else None


def _absolute(path: Path) -> Path:
    """Absolute and normalised, without following symlinks (see :func:`_inside`)."""
    return Path(os.path.normpath(Path(path).absolute()))


def _caption(value: Any) -> str:
    """Captions and reports keep their own line breaks; only the ends are trimmed."""
    return "" if value is None else str(value).strip()


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _dedupe(items: Iterator[ImageItem], warn: WarnFn) -> list[ImageItem]:
    by_id: dict[str, ImageItem] = {}
    for item in items:
        if item.case_id in by_id:
            warn(
                f"{item.origin}: id {item.case_id!r} repeats {by_id[item.case_id].origin}; "
                "the later line wins"
            )
        by_id[item.case_id] = item
    return list(by_id.values())


def _folder_items(root: Path) -> Iterator[ImageItem]:
    root = _absolute(root)
    # A study-per-folder export captions a series or image by the report inside its folder.
    from suwen.indexes.image_sources import study_report

    if is_dicom_series_dir(root):
        caption = _sidecar(root.parent / f"{root.name}.txt") or study_report(root)
        yield _item(root, root.name, caption, root)
        return
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        subdirs.sort()
        for name in list(subdirs):
            if name.startswith("."):
                subdirs.remove(name)
            elif is_dicom_series_dir(here / name):
                subdirs.remove(name)  # the whole folder is one case
                series = here / name
                caption = _sidecar(here / f"{name}.txt") or study_report(series)
                yield _item(series, series.relative_to(root).as_posix(), caption, root)
        report: str | None = None
        for name in sorted(files):
            path = here / name
            if not name.startswith(".") and is_image_path(path):
                caption = _sidecar_of(path)
                if not caption and here != root:  # a study folder inside an export
                    report = study_report(here) if report is None else report
                    caption = report
                yield _item(path, path.relative_to(root).as_posix(), caption, root)


def _item(path: Path, case_id: str, caption: str, root: Path) -> ImageItem:
    return ImageItem(
        path=path, case_id=case_id, caption=caption, source=str(root), origin=str(path)
    )


def _sidecar_of(image: Path) -> str:
    name = image.name
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else image.stem
    return _sidecar(image.with_name(f"{stem}.txt"))


def _sidecar(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


# --- building ---------------------------------------------------------------------------------


def build_image_index(
    settings: Settings,
    name: str,
    source: Path,
    *,
    progress: ProgressFn | None = None,
    warn: WarnFn | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    encoder: ImageEncoder | None = None,
) -> IngestSummary:
    """Add the cases in ``source`` to image index ``name`` (created if new) and publish it."""
    store.check_name(name)
    summary = IngestSummary(name=name)

    def skip(message: str) -> None:
        summary.skipped.append(message)
        if warn is not None:
            warn(message)

    items = read_items(Path(source), skip)
    summary.found = len(items)
    if progress is not None:
        progress("scan", len(items), len(items))
    with store.build_lock(settings.indexes_dir, name):
        live = store.live_manifest(settings.indexes_dir, name)
        # The encoder id is known before the model loads: refuse a mismatch without waiting.
        _check_compatible(
            name, live, encoder.id if encoder else encoder_id(settings.image_encoder), None
        )
        encoder = encoder or load_image_encoder(settings)
        _check_compatible(name, live, encoder.id, encoder.dim)
        with store.new_version(settings.indexes_dir, name, copy_current=True) as staging:
            with closing(ImageStore.open_for_build(staging, encoder.dim)) as image_store:
                _ingest(image_store, items, encoder, max_frames, summary, skip, progress)
                if summary.ingested == 0:
                    raise InputError(
                        f"{source}: nothing could be ingested ({len(summary.skipped)} skipped)"
                    )
                image_store.save()
                summary.vectors_total = image_store.vectors.count
                summary.cases_total = image_store.case_count()
            manifest = _manifest(name, live, encoder, source, summary, max_frames)
            store.write_manifest(staging, manifest)
    return summary


def _check_compatible(
    name: str, live: store.IndexManifest | None, encoder: str, dim: int | None
) -> None:
    if live is None:
        return
    if live.kind != "image":
        raise IndexMismatchError(f"index {name!r} is a {live.kind} index, not an image index")
    if live.encoder != encoder or (dim is not None and live.dim != dim):
        raise IndexMismatchError(
            f"index {name!r} was built with image encoder {live.encoder} ({live.dim}-d); the "
            f"configured one is {encoder}: set SUWEN_IMAGE_ENCODER to match, or use a new name"
        )


def _ingest(
    image_store: ImageStore,
    items: list[ImageItem],
    encoder: ImageEncoder,
    max_frames: int,
    summary: IngestSummary,
    skip: WarnFn,
    progress: ProgressFn | None,
) -> None:
    done = 0
    for start in range(0, len(items), encoder.batch_size):
        batch: list[tuple[ImageItem, str, list[Frame]]] = []
        for item in items[start : start + encoder.batch_size]:
            loaded = _load_item(image_store, item, max_frames, summary, skip)
            if loaded is not None:
                batch.append(loaded)
        images = [frame.image for _, _, frames in batch for frame in frames]
        embeddings = encoder.encode_images(images)
        offset = 0
        for item, sha256, frames in batch:
            rows = embeddings[offset : offset + len(frames)]
            offset += len(frames)
            _replace_case(image_store, item, sha256, frames, rows, summary)
        done += min(encoder.batch_size, len(items) - start)
        if progress is not None:
            progress("encode", done, len(items))


def _load_item(
    image_store: ImageStore,
    item: ImageItem,
    max_frames: int,
    summary: IngestSummary,
    skip: WarnFn,
) -> tuple[ImageItem, str, list[Frame]] | None:
    """The item's hash and frames, or None when it is skipped or its file has not changed."""
    try:
        sha256 = sha256_of(item.path)
        stored = image_store.case_hashes(item.case_id)
        if stored and all(found == sha256 for found in stored):
            image_store.update_case_fields(_fields(item))
            summary.unchanged += 1
            return None
        frames = load_frames(item.path, max_frames=max_frames)
    except InputError as exc:
        skip(f"{item.origin}: {exc}" if item.origin != str(item.path) else str(exc))
        return None
    return item, sha256, frames


def _fields(item: ImageItem) -> CaseFields:
    return CaseFields(
        case_id=item.case_id,
        path=str(item.path),
        caption=item.caption,
        modality=item.modality,
        body_part=item.body_part,
        source=item.source,
    )


def _replace_case(
    image_store: ImageStore,
    item: ImageItem,
    sha256: str,
    frames: list[Frame],
    embeddings: vectors.FloatArray,
    summary: IngestSummary,
) -> None:
    labels = [frame.label for frame in frames]
    if image_store.replace_case(_fields(item), sha256, labels, embeddings):
        summary.updated += 1
    else:
        summary.added += 1
    summary.frames += len(frames)
    summary.uncaptioned += 0 if item.caption else 1


def _manifest(
    name: str,
    live: store.IndexManifest | None,
    encoder: ImageEncoder,
    source: Path,
    summary: IngestSummary,
    max_frames: int,
) -> store.IndexManifest:
    sources = list(live.sources) if live is not None else []
    source_text = str(_absolute(source))
    if source_text not in sources:
        sources.append(source_text)
    return store.IndexManifest(
        name=name,
        kind="image",
        encoder=encoder.id,
        dim=encoder.dim,
        count=summary.vectors_total,
        index_type="exact",
        bytes_per_vector=float(encoder.dim * 4),
        sources=sources,
        extra={"cases": summary.cases_total, "max_frames": max_frames},
    )
