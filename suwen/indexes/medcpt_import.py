"""Import NCBI's precomputed MedCPT embeddings of PubMed into a Suwen text index, chunk by chunk.

NCBI publishes MedCPT article embeddings of all of PubMed at
https://ftp.ncbi.nlm.nih.gov/pub/lu/MedCPT/pubmed_embeddings/ as 38 chunks of about 1M articles:

* ``embeds_chunk_N.npy``: ``(rows, 768)`` float32 article vectors (MedCPT-Article-Encoder, [CLS]);
* ``pmids_chunk_N.json``: the list of PMIDs, row-aligned with the array;
* ``pubmed_chunk_N.json``: ``{PMID: {"t": title, "a": abstract, "m": MeSH, "d": date}}``.

The result is an ordinary text index (the same SQLite schema as ``suwen index text``: documents,
one chunk per article, a tantivy BM25 index built from the rows once the last chunk is in) whose
queries are encoded with MedCPT-Query-Encoder.

Bounded memory: arrays are memory-mapped (``np.load(mmap_mode='r')``), the multi-GB metadata file
is parsed as a stream (ijson), and one chunk's PMIDs are the largest thing held.

Resumable: the import works in ``<index>/.medcpt-staging/``, which survives a kill. Per chunk the
vectors are added to the store and the store is saved, then the chunk's rows and a progress row
are committed in one SQLite transaction. A restart skips committed chunks and drops vectors whose
rows never committed, so a kill at any point neither loses nor duplicates an article. A compressed
index is trained once, on a sample drawn across all chunks, before the first chunk is added. The
finished staging directory becomes the index's new live version with one atomic rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ijson
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field

from suwen.config import MEDCPT_ARTICLE, QUERY_ENCODER_OF, Settings
from suwen.errors import IndexDamagedError, IndexMismatchError, InputError
from suwen.files import atomic_write_json
from suwen.indexes import bm25, compressed, store
from suwen.indexes.compressed import CompressedStore, VectorStore
from suwen.indexes.text_index import finish_rows
from suwen.indexes.text_store import SCHEMA_VERSION, MedcptChunkRecord, TextRows
from suwen.types import Document

STAGING = ".medcpt-staging"
PLAN_FILE = "medcpt_import.json"
SOURCE_FORMAT = "medcpt"
MEDCPT_DIM = 768
ADD_BATCH = 32_768
INSERT_BATCH = 5_000
_EMBEDS_RE = re.compile(r"^embeds_chunk_(\d+)\.npy$")


@dataclass(frozen=True)
class ChunkFiles:
    number: int
    embeds: Path
    pmids: Path
    pubmed: Path

    def signature(self) -> str:
        """The three files' sizes: a chunk NCBI has since refreshed is imported again."""
        return ":".join(str(p.stat().st_size) for p in (self.embeds, self.pmids, self.pubmed))


@dataclass(frozen=True)
class ChunkPlan:
    files: ChunkFiles
    rows: int
    dim: int


@dataclass(frozen=True)
class ImportProgress:
    """Sent to the progress callback: ``stage`` is scan, train, chunk, recall or publish."""

    stage: str
    detail: str
    chunks_done: int
    chunks_total: int
    rows_done: int
    rows_total: int


ProgressCallback = Callable[[ImportProgress], None]


class ImportReport(BaseModel):
    index: str
    directory: str
    chunks_found: int = 0
    chunks_imported: int = 0
    chunks_already_done: int = 0
    errors: list[str] = Field(default_factory=list, description="One line per skipped chunk")
    articles_added: int = 0
    articles_replaced: int = 0
    rows_skipped: int = Field(0, description="Vectors without usable metadata, or duplicates")
    documents: int = 0
    vectors: int = 0
    index_type: str = ""
    bytes_per_vector: float | None = None
    recall_at_10: float | None = None
    published: bool = False
    up_to_date: bool = Field(False, description="Every chunk was already in the live index")

    @property
    def imported_anything(self) -> bool:
        return self.chunks_imported > 0 or self.chunks_already_done > 0


# ---------------------------------------------------------------------------------------------
# Finding and checking the files


def find_chunks(directory: Path) -> tuple[list[ChunkFiles], list[str]]:
    """The complete chunks in ``directory`` in numeric order, and one line per incomplete one."""
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory of MedCPT embedding chunks")
    numbers = sorted(
        int(match.group(1))
        for path in directory.iterdir()
        if (match := _EMBEDS_RE.match(path.name))
    )
    found, problems = [], []
    for number in numbers:
        files = ChunkFiles(
            number,
            directory / f"embeds_chunk_{number}.npy",
            directory / f"pmids_chunk_{number}.json",
            directory / f"pubmed_chunk_{number}.json",
        )
        missing = [p.name for p in (files.pmids, files.pubmed) if not p.is_file()]
        if missing:
            problems.append(f"chunk {number}: missing {', '.join(missing)}; skipped")
        else:
            found.append(files)
    if not numbers:
        raise InputError(
            f"{directory}: no embeds_chunk_N.npy files (NCBI's MedCPT layout: embeds_chunk_N.npy, "
            "pmids_chunk_N.json, pubmed_chunk_N.json)"
        )
    return found, problems


def open_embeddings(path: Path) -> npt.NDArray[Any]:
    """The chunk's vectors, memory-mapped; a clear error if the file is not a 2-D float array."""
    try:
        array: npt.NDArray[Any] = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
    if array.ndim != 2 or array.dtype.kind != "f" or array.shape[1] == 0:
        raise InputError(f"{path}: expected a 2-D float array, found {array.dtype} {array.shape}")
    return array


def read_pmids(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON list of PMIDs ({exc})") from exc
    if not isinstance(data, list) or not all(isinstance(p, str | int) for p in data):
        raise InputError(f"{path}: expected a JSON list of PMIDs")
    return [str(p).strip() for p in data]


def inspect_chunk(files: ChunkFiles) -> ChunkPlan:
    """Check a chunk's array against its PMID list without reading the vectors."""
    array = open_embeddings(files.embeds)
    pmids = read_pmids(files.pmids)
    if len(pmids) != array.shape[0]:
        raise InputError(
            f"{files.pmids}: {len(pmids)} PMIDs for {array.shape[0]} vectors in {files.embeds.name}"
        )
    return ChunkPlan(files, int(array.shape[0]), int(array.shape[1]))


def stream_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(pmid, record)`` pairs of a ``pubmed_chunk_N.json`` file, parsed as a stream."""
    try:
        with path.open("rb") as handle:
            for pmid, record in ijson.kvitems(handle, "", use_float=True):
                yield str(pmid).strip(), record if isinstance(record, dict) else {}
    except (ijson.JSONError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{path}: corrupt or truncated metadata JSON ({exc})") from exc


def record_document(pmid: str, record: dict[str, Any], source: str) -> Document:
    """NCBI's compact record (t, a, m, d) as a Suwen document."""
    date = str(record.get("d") or "")
    return Document(
        pmid=pmid,
        title=str(record.get("t") or "").strip(),
        text=str(record.get("a") or "").strip(),
        year=int(date[:4]) if date[:4].isdigit() else None,
        mesh=_mesh_terms(record.get("m")),
        source=source,
    )


def _mesh_terms(value: Any) -> list[str]:
    # The README does not document the MeSH field's shape: accept a list or a delimited string.
    if isinstance(value, list):
        return [str(term).strip() for term in value if str(term).strip()]
    if isinstance(value, str):
        separator = ";" if ";" in value else "|" if "|" in value else ","
        return [term.strip() for term in value.split(separator) if term.strip()]
    return []


def held_out_pmid(pmid: str) -> bool:
    """Articles reserved as recall queries: never in the compressed index's training sample."""
    return pmid.isdigit() and int(pmid) % compressed.HELD_OUT_STRIDE == 0


# ---------------------------------------------------------------------------------------------
# The import


def import_medcpt(
    settings: Settings,
    directory: Path,
    name: str,
    *,
    encoder: str = MEDCPT_ARTICLE,
    query_encoder: str | None = None,
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Import (or resume importing) every chunk in ``directory`` into text index ``name``."""
    store.check_name(name)
    query_encoder = query_encoder or QUERY_ENCODER_OF.get(encoder, encoder)
    report = ImportReport(index=name, directory=str(directory))
    files, problems = find_chunks(directory)
    report.errors.extend(problems)
    report.chunks_found = len(files) + len(problems)
    with store.build_lock(settings.indexes_dir, name):
        job = _Import(settings, name, encoder, query_encoder, report, progress)
        job.run(files)
    return report


class _Import:
    def __init__(
        self,
        settings: Settings,
        name: str,
        encoder: str,
        query_encoder: str,
        report: ImportReport,
        progress: ProgressCallback | None,
    ) -> None:
        self.settings = settings
        self.name = name
        self.encoder = encoder
        self.query_encoder = query_encoder
        self.report = report
        self.progress = progress
        self.root = store.index_root(settings.indexes_dir, name)
        self.staging = self.root / STAGING
        self.chunks_total = 0
        self.rows_total = 0
        self.chunks_done = 0
        self.rows_done = 0

    def notify(self, stage: str, detail: str) -> None:
        if self.progress is not None:
            self.progress(
                ImportProgress(
                    stage,
                    detail,
                    self.chunks_done,
                    self.chunks_total,
                    self.rows_done,
                    self.rows_total,
                )
            )

    # -- plan ----------------------------------------------------------------------------------

    def run(self, files: list[ChunkFiles]) -> None:
        if self._live_has_all(files):
            self.report.up_to_date = True
            self.report.chunks_already_done = len(files)
            return
        self._prepare_staging()
        db = TextRows.create(self.staging, medcpt_progress=True)
        try:
            imported = db.medcpt_signatures()
            done = {f.number for f in files if imported.get(f.number) == f.signature()}
            plans = self._inspect([f for f in files if f.number not in done])
            self.report.chunks_already_done = len(done)
            self.chunks_total = len(plans) + self.report.chunks_already_done
            self.chunks_done = self.report.chunks_already_done
            self.rows_total = sum(p.rows for p in plans)
            if not plans and not imported:
                return  # nothing readable: leave any live version alone
            vector_store = self._open_store(db, plans)
            for plan in plans:
                vector_store = self._import_chunk(db, vector_store, plan)
            self._finish(db, vector_store)
        finally:
            db.close()

    def _inspect(self, files: list[ChunkFiles]) -> list[ChunkPlan]:
        plans = []
        for files_ in files:
            self.notify("scan", files_.embeds.name)
            try:
                plan = inspect_chunk(files_)
                self._check_dim(plan)
            except InputError as exc:
                self.report.errors.append(f"chunk {files_.number}: {exc}; skipped")
                continue
            plans.append(plan)
        return plans

    def _check_dim(self, plan: ChunkPlan) -> None:
        """All chunks share one dimension: the index's, MedCPT's 768, or the first chunk's."""
        recorded = self._plan_data().get("dim")
        expected = recorded or (MEDCPT_DIM if self.encoder == MEDCPT_ARTICLE else None)
        if expected is not None and plan.dim != expected:
            raise InputError(
                f"{plan.files.embeds}: {plan.dim}-d vectors, but {self.encoder!r} "
                f"vectors in this index are {expected}-d"
            )
        if recorded is None:
            self._write_plan({**self._plan_data(), "dim": plan.dim})

    def _live_has_all(self, files: list[ChunkFiles]) -> bool:
        """True when no import is under way and the live version already holds every chunk as
        it is now on disk: rerunning a finished import copies and republishes nothing."""
        if self.staging.exists() or not files:
            return False
        if store.live_manifest(self.settings.indexes_dir, self.name) is None:
            return False
        live = store.current_version(self.root)
        assert live is not None  # checked just above
        db = TextRows.open_read_only(live)
        try:
            imported = db.medcpt_signatures()
        finally:
            db.close()
        return all(imported.get(f.number) == f.signature() for f in files)

    # -- staging -------------------------------------------------------------------------------

    def _plan_data(self) -> dict[str, Any]:
        path = self.staging / PLAN_FILE
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return data

    def _write_plan(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.staging / PLAN_FILE, data)

    def _prepare_staging(self) -> None:
        """Resume the staging directory, or start one (from the live version, if any)."""
        if (self.staging / PLAN_FILE).is_file():
            plan = self._plan_data()
            if (plan["encoder"], plan["query_encoder"]) != (self.encoder, self.query_encoder):
                raise IndexMismatchError(
                    f"{self.staging}: an unfinished import with encoder {plan['encoder']!r} is "
                    f"there; rerun it with the same encoder or delete that folder"
                )
            return
        shutil.rmtree(self.staging, ignore_errors=True)
        fresh = self.root / f"{STAGING}.new-{os.getpid()}"
        shutil.rmtree(fresh, ignore_errors=True)
        manifest = store.live_manifest(self.settings.indexes_dir, self.name)
        live = store.current_version(self.root)
        fresh_plan: dict[str, Any] = {
            "encoder": self.encoder,
            "query_encoder": self.query_encoder,
        }
        if live is not None and manifest is not None:
            self._check_live(manifest)
            self.notify("scan", f"copying live version {live.name}")
            shutil.copytree(live, fresh)
            (fresh / store.MANIFEST).unlink(missing_ok=True)
            fresh_plan["dim"] = manifest.dim
        else:
            fresh.mkdir(parents=True)
        TextRows.create(fresh, medcpt_progress=True).close()
        atomic_write_json(fresh / PLAN_FILE, fresh_plan)
        fresh.rename(self.staging)  # the staging exists only once it is complete

    def _check_live(self, manifest: store.IndexManifest) -> None:
        live_query = manifest.query_encoder or manifest.encoder
        if manifest.kind != "text" or (manifest.encoder, live_query) != (
            self.encoder,
            self.query_encoder,
        ):
            raise IndexMismatchError(
                f"index {self.name!r} holds {manifest.kind} vectors of {manifest.encoder!r}; "
                f"MedCPT embeddings ({self.encoder!r}) cannot be mixed in; use another --name"
            )

    # -- the vector store ----------------------------------------------------------------------

    def _open_store(self, db: TextRows, plans: list[ChunkPlan]) -> VectorStore:
        """The staging store rolled back to the last committed chunk; created (and, when
        compressed, trained) on first use."""
        plan = self._plan_data()
        dim = int(plan["dim"])
        if "index_type" not in plan:
            existing = db.counts()[1]
            expected = existing + sum(p.rows for p in plans)
            plan["index_type"] = compressed.choose_index_type(
                self.settings.index_type, expected, self.settings.compressed_threshold
            )
            plan["expected_count"] = expected
            self._write_plan(plan)
        index_type = plan["index_type"]
        vector_store = self._existing_store(index_type)
        if vector_store is None:
            vector_store = compressed.create_store(
                self.staging,
                dim,
                index_type,
                int(plan["expected_count"]),
                self.settings.compressed_code_bytes,
            )
            if index_type == "compressed":
                self._train(vector_store, plans)
            vector_store.save()
        compressed.check_dim(vector_store, dim, f"MedCPT chunks for index {self.name!r}")
        if vector_store.index_type != index_type:  # an existing compressed index stays so
            self._write_plan({**self._plan_data(), "index_type": vector_store.index_type})
        vector_store.discard_ids_above(db.last_committed_id())
        return vector_store

    def _existing_store(self, index_type: str) -> VectorStore | None:
        """The store already in staging; an exact one from the live version is converted when
        this import makes the index large enough to compress."""
        has_compressed = (self.staging / compressed.PARAMS_FILE).is_file()
        has_exact = (self.staging / compressed.EXACT_FILE).is_file()
        if has_compressed:
            return compressed.open_store(self.staging, writable=True)
        if not has_exact:
            return None
        exact = compressed.ExactStore.open(self.staging)
        if index_type == "exact":
            return exact
        self.notify("train", f"compressing the existing {exact.count} vectors")
        converted, _ = compressed.compress_exact(
            exact, self.staging, code_bytes=self.settings.compressed_code_bytes
        )
        (self.staging / compressed.EXACT_FILE).unlink()
        return converted

    def _train(self, vector_store: VectorStore, plans: list[ChunkPlan]) -> None:
        """Train on a sample spread over every chunk (PubMed's chunks run oldest to newest, so
        the first chunk alone would be a biased sample), held-out PMIDs excluded."""
        total = sum(p.rows for p in plans)
        budget = min(total, compressed.MAX_TRAINING_VECTORS)
        parts = []
        for plan in plans:
            self.notify("train", f"sampling {plan.files.embeds.name}")
            want = round(budget * plan.rows / max(total, 1))
            rows = compressed.training_rows(plan.rows, want, seed=plan.files.number)
            pmids = read_pmids(plan.files.pmids)
            rows = rows[[not held_out_pmid(pmids[r]) for r in rows]] if len(rows) else rows
            parts.append(np.asarray(open_embeddings(plan.files.embeds)[rows], dtype=np.float32))
        sample = np.concatenate(parts) if parts else np.zeros((0, vector_store.dim), np.float32)
        sample = sample[np.isfinite(sample).all(axis=1)]
        self.notify("train", f"training on {len(sample)} vectors")
        vector_store.train(sample)

    # -- one chunk -----------------------------------------------------------------------------

    def _import_chunk(
        self, db: TextRows, vector_store: VectorStore, plan: ChunkPlan
    ) -> VectorStore:
        """Import one chunk completely or not at all; a corrupt chunk is reported and skipped."""
        self.notify("chunk", f"chunk {plan.files.number}: reading metadata")
        try:
            counts = _ChunkWriter(db, vector_store, plan, self).write()
        except InputError as exc:
            db.rollback()
            self.report.errors.append(f"chunk {plan.files.number}: {exc}; skipped")
            # The store may hold part of this chunk in memory: reload its committed state.
            vector_store = compressed.open_store(self.staging, writable=True)
            vector_store.discard_ids_above(db.last_committed_id())
            self.rows_total -= plan.rows
            return vector_store
        self.report.chunks_imported += 1
        self.report.articles_added += counts.added
        self.report.articles_replaced += counts.replaced
        self.report.rows_skipped += counts.skipped
        self.chunks_done += 1
        return vector_store

    # -- finishing -----------------------------------------------------------------------------

    def _finish(self, db: TextRows, vector_store: VectorStore) -> None:
        documents, chunks = db.counts()
        if vector_store.count != chunks:
            raise IndexDamagedError(
                f"{self.staging}: {vector_store.count} vectors for {chunks} articles; "
                "refusing to publish an inconsistent index (rerun to resume)"
            )
        manifest = self._manifest(documents, chunks)
        if isinstance(vector_store, CompressedStore):
            self.notify("recall", "calibrating nprobe and measuring recall@10 against exact")
            recall = compressed.calibrate_and_measure(
                vector_store,
                candidate_rows=_held_out_rows(db, vector_store),
                progress=lambda message: self.notify("recall", message),
            )
            vector_store.save()
            manifest.recall_at_10 = round(recall.recall_at_10, 4)
            manifest.extra.update(**recall.manifest_extra(), **vector_store.layout())
        manifest.bytes_per_vector = round(vector_store.bytes_per_vector(), 2)
        self.notify("publish", f"building the BM25 index of {chunks} articles")
        bm25.rebuild(self.staging, db.iter_rows())
        finish_rows(db, self.staging)
        db.close()  # the rows are final: nothing may change a file once it is sealed
        store.write_manifest(self.staging, manifest)
        self._publish()
        report = self.report
        report.documents, report.vectors = documents, chunks
        report.index_type = manifest.index_type
        report.bytes_per_vector = manifest.bytes_per_vector
        report.recall_at_10 = manifest.recall_at_10
        report.published = True

    def _manifest(self, documents: int, chunks: int) -> store.IndexManifest:
        plan = self._plan_data()
        return store.IndexManifest(
            name=self.name,
            kind="text",
            encoder=self.encoder,
            query_encoder=self.query_encoder,
            dim=int(plan["dim"]),
            count=chunks,
            index_type=str(plan["index_type"]),
            sources=[self.report.directory],
            extra={
                "documents": documents,
                "chunks": chunks,
                **({"pooling": "cls"} if self.encoder == MEDCPT_ARTICLE else {}),
                "source": "NCBI MedCPT precomputed PubMed embeddings",
                "bm25": bm25.DESCRIPTION,
                "schema_version": SCHEMA_VERSION,
            },
        )

    def _publish(self) -> None:
        """fsync, rename staging to the next version, and point CURRENT at it."""
        self.notify("publish", "publishing")
        store.publish_staging(self.root, self.staging)


@dataclass
class _ChunkCounts:
    added: int = 0
    replaced: int = 0
    skipped: int = 0


class _ChunkWriter:
    """Writes one chunk: metadata rows in one open transaction, then vectors, then the commit."""

    def __init__(
        self, db: TextRows, vector_store: VectorStore, plan: ChunkPlan, job: _Import
    ) -> None:
        self.db = db
        self.store = vector_store
        self.plan = plan
        self.job = job
        self.counts = _ChunkCounts()

    def write(self) -> _ChunkCounts:
        pmids = read_pmids(self.plan.files.pmids)
        row_of = {pmid: row for row, pmid in enumerate(pmids)}  # a repeated PMID: last row wins
        ids_for_rows = np.full(len(pmids), -1, dtype=np.int64)
        replaced = self._insert_metadata(row_of, ids_for_rows)
        del row_of, pmids
        # Rows left without an id: repeated PMIDs, no metadata record, or no title and abstract.
        self.counts.skipped = int(np.count_nonzero(ids_for_rows < 0))
        self.store.remove(np.asarray(replaced, dtype=np.int64))
        self._add_vectors(ids_for_rows)
        self.store.save()
        self._commit(ids_for_rows)
        return self.counts

    def _insert_metadata(
        self, row_of: dict[str, int], ids_for_rows: npt.NDArray[np.int64]
    ) -> list[int]:
        source = str(self.plan.files.pubmed)
        source_id = self._source_id(source)
        replaced: list[int] = []
        now = datetime.now(UTC).isoformat(timespec="seconds")  # once per chunk, not per row
        pending = 0
        for pmid, record in stream_records(self.plan.files.pubmed):
            row = row_of.get(pmid)
            if row is None:
                continue  # metadata for an article without a vector
            doc = record_document(pmid, record, source)
            old = self.db.delete_document(pmid)[0]
            if old and ids_for_rows[row] < 0:
                self.counts.replaced += 1
            replaced.extend(old)
            if not doc.title and not doc.text:
                ids_for_rows[row] = -1
                continue
            ids_for_rows[row] = self.db.insert_document(doc, source_id, [(doc.text, None)], now)[0]
            pending += 1
            if pending % INSERT_BATCH == 0:
                self.job.notify("chunk", f"chunk {self.plan.files.number}: {pending} articles")
        self.counts.added = int(np.count_nonzero(ids_for_rows >= 0)) - self.counts.replaced
        return replaced

    def _source_id(self, path: str) -> int:
        return self.db.upsert_source(path, SOURCE_FORMAT, Path(path).stat().st_size)

    def _add_vectors(self, ids_for_rows: npt.NDArray[np.int64]) -> None:
        """Add vectors in id order (ids grow with insertion, so rows on disk stay sorted by id,
        which is what lets a restart drop uncommitted rows from the end)."""
        embeds = open_embeddings(self.plan.files.embeds)
        order = np.argsort(ids_for_rows, kind="stable")
        order = order[ids_for_rows[order] >= 0]
        for start in range(0, len(order), ADD_BATCH):
            rows = order[start : start + ADD_BATCH]
            batch = np.asarray(embeds[rows], dtype=np.float32)
            if not np.isfinite(batch).all():
                raise InputError(f"{self.plan.files.embeds}: non-finite values in the vectors")
            self.store.add(batch, ids_for_rows[rows])
            self.job.rows_done += len(rows)
            self.job.notify("chunk", f"chunk {self.plan.files.number}: vectors")

    def _commit(self, ids_for_rows: npt.NDArray[np.int64]) -> None:
        last_id = max(int(ids_for_rows.max(initial=-1)), self.db.last_committed_id())
        self.db.record_medcpt_chunk(
            MedcptChunkRecord(
                chunk=self.plan.files.number,
                embeds=str(self.plan.files.embeds),
                signature=self.plan.files.signature(),
                rows=self.plan.rows,
                articles=self.counts.added + self.counts.replaced,
                replaced=self.counts.replaced,
                skipped=self.counts.skipped,
                last_chunk_id=last_id,
            )
        )
        self.db.commit()


def _held_out_rows(db: TextRows, vector_store: CompressedStore) -> npt.NDArray[np.int64]:
    """Rows of articles whose PMIDs were kept out of the training sample."""
    ids = np.asarray(db.numeric_pmid_chunk_ids(compressed.HELD_OUT_STRIDE), dtype=np.int64)
    row_ids = vector_store.row_ids()
    rows = np.minimum(np.searchsorted(row_ids, ids), max(len(row_ids) - 1, 0))
    return rows[row_ids[rows] == ids].astype(np.int64) if len(row_ids) else rows
