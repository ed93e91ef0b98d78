"""Vector stores: one interface over an exact index and a compressed one, picked by corpus size.

``ExactStore`` is the flat inner-product index (``IndexIDMap2(IndexFlatIP)``): 4 bytes per
dimension per vector in RAM, exact by construction. It is what small indexes use and what the
reference toolkits use for all of PubMed (~70 GB of RAM for 24M MedCPT vectors).

``CompressedStore`` keeps only compact codes in RAM and re-scores exactly:

* an IVF coarse quantiser with PQ codes read by FAISS's 4-bit "fast-scan" kernels (``PQ{M}x4fs``,
  ``M/2`` bytes of code per vector plus FAISS's 8-byte id) finds a shortlist of ``k'`` candidates
  by scanning ``nprobe`` lists;
* the full vectors live on disk in ``full_vectors.npy`` (float16); a search reads its
  shortlist's rows (``AppendableArray.read_rows``) and re-scores them with exact inner products,
  so the final order is the exact order of whatever the shortlist caught.

The disk-resident float16 vectors are not RAM: a search reads the few rows it re-scores through
the page cache without mapping them into the process.
``bytes_per_vector`` is the in-memory index (codes, ids, centroids, transform) divided by the
vector count, i.e. the size of ``compressed.faiss``.

FAISS ids inside the compressed index are *row numbers* of ``full_vectors.npy``; ``row_ids.npy``
maps a row to the caller's id (the SQLite row id). Both files are append-only: a removed vector
leaves the IVF lists (which are the record of what is live) while its row stays on disk unused,
so a crash can never leave a half-applied removal in them. Nothing is pickled: FAISS files are
written with ``faiss.write_index``, arrays are plain ``.npy`` read with
``allow_pickle=False`` and parameters are JSON.

When ``faiss.get_num_gpus() > 0`` the coarse quantiser is trained and vectors are assigned to
lists on the GPU; the index itself always lives, is saved and is searched on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import faiss
import numpy as np
import numpy.typing as npt

from suwen.errors import IndexDamagedError, IndexMismatchError, InputError, SuwenError
from suwen.files import atomic_path, atomic_write_json
from suwen.indexes import file_checks, vectors
from suwen.indexes.vectors import FloatArray, IdArray, inner_products, normalise

IndexType = Literal["exact", "compressed"]

EXACT_FILE = "vectors.faiss"  # the one name of an exact index's file, text and image alike
COMPRESSED_FILE = "compressed.faiss"
PARAMS_FILE = "compressed.json"
FULL_VECTORS_FILE = "full_vectors.npy"
ROW_IDS_FILE = "row_ids.npy"

# Code budget (setting compressed_code_bytes): 64 bytes of PQ code + FAISS's 8-byte id + block
# padding and centroids stays under 100 bytes per vector for any corpus above a few hundred
# thousand vectors. Smaller codes rank the shortlist less well, so calibration picks a longer one.
CODE_BYTES = 64
MAX_TRAINING_VECTORS = 262_144
MIN_POINTS_PER_LIST = 32
# Shortlist re-scored exactly; calibrated nprobe is the smallest reaching TARGET_RECALL on
# held-out calibration queries (a second, disjoint set is used for the recall we report).
DEFAULT_SHORTLIST = 200
SHORTLIST_LADDER = (DEFAULT_SHORTLIST, 400, 800, 1600)
TARGET_RECALL = 0.97
NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# More lists stop paying when recall@10 gains less than this from one nprobe step to the next.
SATURATED_GAIN = 0.002
RECALL_QUERIES = 200
# One row in HELD_OUT_STRIDE is never used for training, so recall queries are held out.
HELD_OUT_STRIDE = 97
MIN_COMPRESSED_VECTORS = 1_000


class VectorStore(Protocol):
    """What the text and image indexes need from a vector index, whatever its type."""

    directory: Path
    dim: int

    @property
    def index_type(self) -> IndexType: ...

    @property
    def count(self) -> int: ...

    @property
    def trained(self) -> bool: ...

    def train(self, sample: FloatArray) -> None: ...

    def add(self, vectors: npt.ArrayLike, ids: IdArray) -> None: ...

    def remove(self, ids: IdArray) -> int: ...

    def discard_ids_above(self, last_id: int) -> int: ...

    def search(self, queries: npt.ArrayLike, k: int) -> tuple[FloatArray, IdArray]: ...

    def save(self) -> None: ...

    def bytes_per_vector(self) -> float: ...


# ---------------------------------------------------------------------------------------------
# Choosing


def choose_index_type(setting: str, expected_count: int, threshold: int) -> IndexType:
    """The index type for a corpus of ``expected_count`` vectors: the setting, or by size."""
    if setting == "exact":
        return "exact"
    if setting == "compressed":
        if expected_count < MIN_COMPRESSED_VECTORS:
            raise InputError(
                f"index_type 'compressed' needs at least {MIN_COMPRESSED_VECTORS} vectors to "
                f"train on, this corpus has {expected_count}; use index_type 'exact' or 'auto'"
            )
        return "compressed"
    if setting != "auto":
        raise InputError(f"index_type {setting!r}: choose auto, exact or compressed")
    return "compressed" if expected_count > threshold else "exact"


def create_store(
    directory: Path,
    dim: int,
    index_type: IndexType,
    expected_count: int,
    code_bytes: int = CODE_BYTES,
) -> VectorStore:
    """An empty store of ``index_type`` in ``directory`` (a compressed one still needs train)."""
    if index_type == "exact":
        return ExactStore.create(directory, dim)
    params = CompressedParams.for_corpus(dim, expected_count, code_bytes)
    return CompressedStore.create(directory, params)


def open_store(directory: Path, *, writable: bool = False) -> VectorStore:
    """The store saved in ``directory``: compressed if its parameters are there, else exact."""
    if (directory / PARAMS_FILE).is_file():
        return CompressedStore.open(directory, writable=writable)
    if (directory / EXACT_FILE).is_file():
        return ExactStore.open(directory)
    raise IndexDamagedError(f"{directory}: no vector index ({EXACT_FILE} or {PARAMS_FILE}) found")


def check_dim(store: VectorStore, dim: int, what: str) -> None:
    if store.dim != dim:
        raise IndexMismatchError(
            f"{store.directory}: stored vectors have {store.dim} dimensions but {what} "
            f"makes {dim}-dimensional ones"
        )


# ---------------------------------------------------------------------------------------------
# Exact


class ExactStore:
    """``IndexIDMap2(IndexFlatIP)``: exact search, every float in RAM."""

    def __init__(self, directory: Path, index: faiss.Index) -> None:
        self.directory = directory
        self.index = cast(faiss.IndexIDMap2, index)
        self.dim = int(index.d)

    @classmethod
    def create(cls, directory: Path, dim: int) -> ExactStore:
        return cls(directory, vectors.exact_index(dim))

    @classmethod
    def open(cls, directory: Path) -> ExactStore:
        path = directory / EXACT_FILE
        index = file_checks.read_faiss(path)
        if not isinstance(index, faiss.IndexIDMap2) or not isinstance(
            faiss.downcast_index(index.index), faiss.IndexFlatIP
        ):
            raise IndexDamagedError(f"{path}: not an exact inner-product index with ids")
        return cls(directory, index)

    @property
    def index_type(self) -> IndexType:
        return "exact"

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def trained(self) -> bool:
        return True

    def train(self, sample: FloatArray) -> None:
        """Nothing to learn for a flat index."""

    def add(self, vectors_: npt.ArrayLike, ids: IdArray) -> None:
        vectors.add_vectors(self.index, normalise(vectors_), ids)

    def remove(self, ids: IdArray) -> int:
        return vectors.remove_ids(self.index, ids)

    def discard_ids_above(self, last_id: int) -> int:
        """Drop every vector whose id is ``> last_id`` (undo work whose metadata rolled back)."""
        return int(self.index.remove_ids(faiss.IDSelectorRange(last_id + 1, 2**63 - 1)))

    def search(self, queries: npt.ArrayLike, k: int) -> tuple[FloatArray, IdArray]:
        """Top-k (scores, ids) per query; missing slots have id -1."""
        k = max(1, min(k, max(1, self.count)))
        scores, ids = self.index.search(normalise(queries), k)
        return scores.astype(np.float32), ids.astype(np.int64)

    def save(self) -> None:
        _write_faiss(self.index, self.directory / EXACT_FILE)

    def bytes_per_vector(self) -> float:
        # The flat codes plus the id array; IndexIDMap2's reverse hash map adds more on top.
        return float(4 * self.dim + 8)

    def iter_vectors(self, batch: int = 65_536) -> Iterator[tuple[FloatArray, IdArray]]:
        """Every stored (vector, id) pair in batches: for conversion to a compressed store."""
        flat = faiss.downcast_index(self.index.index)
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        for start in range(0, self.count, batch):
            stop = min(start + batch, self.count)
            yield flat.reconstruct_n(start, stop - start).astype(np.float32), ids[start:stop]


# ---------------------------------------------------------------------------------------------
# Compressed


@dataclass(frozen=True)
class CompressedParams:
    """How a compressed index is laid out and searched; saved as JSON next to it."""

    dim: int
    nlist: int
    pq_m: int
    nprobe: int = 16
    shortlist: int = DEFAULT_SHORTLIST
    vector_dtype: str = "float16"
    count: int = 0
    # The last calibration: its recall@10 on question-like queries, on held-out documents, and
    # the vector count it saw.
    recall_at_10: float | None = None
    calibrated_count: int = 0
    document_recall_at_10: float | None = None

    @classmethod
    def for_corpus(
        cls, dim: int, expected_count: int, code_bytes: int = CODE_BYTES
    ) -> CompressedParams:
        """``nlist`` ~ 2 sqrt(n) (bounded by what the training sample can support) and the
        largest 4-bit PQ that divides ``dim`` within ``code_bytes`` of code per vector.

        Fewer, longer lists than the usual 4 sqrt(n): fast-scan makes scanning codes cheap, while
        every list costs a centroid (4 * dim bytes) and up to 31 padding codes in RAM."""
        sample = min(max(expected_count, 1), MAX_TRAINING_VECTORS)
        by_size = 2 ** round(math.log2(max(2.0 * math.sqrt(max(expected_count, 1)), 1.0)))
        nlist = int(max(1, min(by_size, sample // MIN_POINTS_PER_LIST, 65_536)))
        return cls(dim=dim, nlist=nlist, pq_m=_pq_m(dim, code_bytes), nprobe=min(16, nlist))

    @property
    def factory(self) -> str:
        return f"IVF{self.nlist},PQ{self.pq_m}x4fsr"

    @property
    def code_bytes(self) -> int:
        """Bytes of PQ code per vector: 4 bits per sub-quantiser."""
        return self.pq_m // 2

    @classmethod
    def read(cls, path: Path) -> CompressedParams:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            params = cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise IndexDamagedError(
                f"{path}: unreadable compressed-index parameters ({exc})"
            ) from exc
        counts = (params.dim, params.nlist, params.pq_m, params.nprobe, params.shortlist)
        if not all(isinstance(n, int) and n > 0 for n in counts) or not (
            isinstance(params.count, int) and params.count >= 0
        ):
            raise IndexDamagedError(f"{path}: compressed-index parameters out of range")
        if params.vector_dtype not in ("float16", "float32"):
            raise IndexDamagedError(f"{path}: vector dtype {params.vector_dtype!r} unknown")
        return params

    def write(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))


def _pq_m(dim: int, code_bytes: int) -> int:
    """Sub-quantisers for a 4-bit PQ of at most ``code_bytes`` bytes: an even divisor of
    ``dim``."""
    best = 0
    for m in range(2, min(2 * code_bytes, dim) + 1, 2):
        if dim % m == 0:
            best = m
    if best == 0:
        raise InputError(f"vector dimension {dim}: no even PQ split exists; use index_type exact")
    return best


class CompressedStore:
    """IVF + 4-bit PQ (fast-scan) shortlist, exact re-scoring from the vectors on disk."""

    def __init__(
        self, directory: Path, params: CompressedParams, index: faiss.Index, *, writable: bool
    ) -> None:
        self.directory = directory
        self.params = params
        self.dim = params.dim
        self.index = index
        self.writable = writable
        self._full = AppendableArray(directory / FULL_VECTORS_FILE, params.vector_dtype, params.dim)
        self._row_ids = AppendableArray(directory / ROW_IDS_FILE, "int64", None)
        if writable:
            # A write interrupted after the last save left rows the index never saw: drop them.
            self._full.truncate(params.count)
            self._row_ids.truncate(params.count)
        self._rows = params.count
        self._full_view: npt.NDArray[Any] | None = None
        self._ids_view: npt.NDArray[np.int64] | None = None
        self._ivf().nprobe = params.nprobe

    # -- lifecycle -----------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, params: CompressedParams) -> CompressedStore:
        directory.mkdir(parents=True, exist_ok=True)
        for name in (FULL_VECTORS_FILE, ROW_IDS_FILE, COMPRESSED_FILE, PARAMS_FILE):
            (directory / name).unlink(missing_ok=True)
        index = faiss.index_factory(params.dim, params.factory, faiss.METRIC_INNER_PRODUCT)
        return cls(directory, replace(params, count=0), index, writable=True)

    @classmethod
    def open(cls, directory: Path, *, writable: bool = False) -> CompressedStore:
        params = CompressedParams.read(directory / PARAMS_FILE)
        full = file_checks.npy_shape(directory / FULL_VECTORS_FILE, params.vector_dtype, 2)
        ids = file_checks.npy_shape(directory / ROW_IDS_FILE, "int64", 1)
        if full[0] < params.count or ids[0] < params.count or full[1] != params.dim:
            raise IndexDamagedError(
                f"{directory}: {FULL_VECTORS_FILE} {full} and {ROW_IDS_FILE} {ids} do not hold "
                f"the {params.count} {params.dim}-d rows {PARAMS_FILE} records"
            )
        index = file_checks.read_faiss(directory / COMPRESSED_FILE)
        if index.d != params.dim or index.ntotal > params.count:
            raise IndexDamagedError(
                f"{directory}: compressed index ({index.d}-d, {index.ntotal} vectors) does not "
                f"match its parameters ({params.dim}-d, {params.count} rows)"
            )
        return cls(directory, params, index, writable=writable)

    @property
    def index_type(self) -> IndexType:
        return "compressed"

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def rows(self) -> int:
        """Rows on disk, removed ones included."""
        return self._rows

    @property
    def trained(self) -> bool:
        return bool(self.index.is_trained)

    def _ivf(self) -> faiss.IndexIVF:
        return faiss.extract_index_ivf(self.index)

    # -- building ------------------------------------------------------------------------------

    def train(self, sample: FloatArray) -> None:
        """Learn the coarse centroids and PQ codebooks from ``sample`` (on a GPU if present)."""
        sample = normalise(sample)
        if len(sample) < self.params.nlist:
            raise InputError(
                f"{len(sample)} training vectors for {self.params.nlist} lists; "
                "use index_type exact for a corpus this small"
            )
        with _gpu_clustering(self._ivf()), faiss_threads(1):
            self.index.train(sample)

    def add(self, vectors_: npt.ArrayLike, ids: IdArray) -> None:
        """Append vectors (full precision to disk, codes to the index) under caller ``ids``."""
        self._require_writable()
        if not self.trained:
            raise SuwenError(f"{self.directory}: compressed index added to before training")
        matrix = normalise(vectors_)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(matrix) != len(ids):
            raise ValueError(f"{len(matrix)} vectors but {len(ids)} ids")
        if not len(ids):
            return
        if matrix.shape[1] != self.dim:
            raise IndexMismatchError(
                f"{self.directory}: adding {matrix.shape[1]}-d vectors to a {self.dim}-d index"
            )
        rows = np.arange(self._rows, self._rows + len(ids), dtype=np.int64)
        self._full.append(matrix.astype(self.params.vector_dtype))
        self._row_ids.append(ids)
        with _gpu_assignment(self._ivf()):
            self.index.add_with_ids(matrix, rows)
        self._rows += len(ids)
        self._drop_views()

    def remove(self, ids: IdArray) -> int:
        """Remove the vectors of ``ids`` from the index (their rows stay on disk, unused)."""
        self._require_writable()
        wanted = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(wanted) or not self._rows:
            return 0
        rows = np.flatnonzero(np.isin(self.row_ids(), wanted)).astype(np.int64)
        if not len(rows):
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(rows)))

    def discard_ids_above(self, last_id: int) -> int:
        """Drop every vector added under an id ``> last_id`` (ids only grow, so they are the
        newest rows): undoes work whose metadata was rolled back. Returns the rows dropped."""
        self._require_writable()
        row_ids = self.row_ids()
        cut = int(np.searchsorted(row_ids, last_id, side="right"))
        if cut < self._rows and np.any(row_ids[cut:] <= last_id):
            raise SuwenError(f"{self.directory}: row ids are not increasing; cannot roll back")
        dropped = self._rows - cut
        if dropped:
            self.truncate(cut)
        return dropped

    def save(self) -> None:
        """Make the disk state match memory: vectors and ids flushed, index and parameters
        written by rename (parameters last: they say how many rows are valid)."""
        self._require_writable()
        self._full.sync()
        self._row_ids.sync()
        _write_faiss(self.index, self.directory / COMPRESSED_FILE)
        self.params = replace(self.params, count=self._rows)
        self.params.write(self.directory / PARAMS_FILE)

    def truncate(self, rows: int) -> None:
        """Forget rows ``>= rows`` (resume after an interruption); they must not be indexed."""
        self._require_writable()
        if rows > self._rows:
            raise SuwenError(f"{self.directory}: cannot truncate {self._rows} rows to {rows}")
        if rows < self._rows:
            self.index.remove_ids(faiss.IDSelectorRange(rows, self._rows))
        self._full.truncate(rows)
        self._row_ids.truncate(rows)
        self._rows = rows
        self._drop_views()

    def set_search(self, *, nprobe: int | None = None, shortlist: int | None = None) -> None:
        self.params = replace(
            self.params,
            nprobe=nprobe if nprobe is not None else self.params.nprobe,
            shortlist=shortlist if shortlist is not None else self.params.shortlist,
        )
        self._ivf().nprobe = min(self.params.nprobe, self.params.nlist)

    # -- reading -------------------------------------------------------------------------------

    def full_vectors(self) -> npt.NDArray[Any]:
        """The memory-mapped full-precision vectors (rows in insertion order)."""
        if self._full_view is None:
            self._full_view = self._full.view(self._rows)
        return self._full_view

    def row_ids(self) -> npt.NDArray[np.int64]:
        if self._ids_view is None:
            self._ids_view = self._row_ids.view(self._rows)
        return self._ids_view

    def live_rows(self) -> npt.NDArray[np.bool_]:
        """A mask over rows: True where the row's vector is in the index (not removed)."""
        mask = np.zeros(self._rows, dtype=bool)
        invlists = self._ivf().invlists
        if invlists is None:
            return mask
        for list_no in range(invlists.nlist):
            size = invlists.list_size(list_no)
            if size:
                rows = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)
                mask[np.asarray(rows, dtype=np.int64)] = True
        return mask

    def search(self, queries: npt.ArrayLike, k: int) -> tuple[FloatArray, IdArray]:
        """Top-``k`` (scores, ids) per query: a PQ shortlist re-scored exactly."""
        scores, rows = self.search_rows(queries, k)
        ids = np.full(rows.shape, -1, dtype=np.int64)
        found = rows >= 0
        ids[found] = self._ids_of(rows[found])
        return scores, ids

    def _ids_of(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The caller's ids of ``rows``, read from the file (not mapped: see ``read_rows``)."""
        distinct, where = np.unique(rows, return_inverse=True)
        return np.asarray(self._row_ids.read_rows(distinct)[where], dtype=np.int64)

    def search_rows(self, queries: npt.ArrayLike, k: int) -> tuple[FloatArray, IdArray]:
        """Like ``search`` but returning row numbers of ``full_vectors.npy``."""
        matrix = normalise(queries)
        k = max(1, k)
        shortlist = max(self.params.shortlist, 2 * k)
        _, candidates = self.index.search(matrix, min(shortlist, max(self.count, 1)))
        out_scores = np.full((len(matrix), k), -np.inf, dtype=np.float32)
        out_rows = np.full((len(matrix), k), -1, dtype=np.int64)
        for qi, query in enumerate(matrix):
            rows = np.unique(candidates[qi][candidates[qi] >= 0])  # sorted: in file order
            if not len(rows):
                continue
            exact = inner_products(self._full.read_rows(rows), query)
            order = np.argsort(-exact, kind="stable")[:k]
            out_scores[qi, : len(order)] = exact[order]
            out_rows[qi, : len(order)] = rows[order]
        return out_scores, out_rows

    def bytes_per_vector(self) -> float:
        """RAM of the index (codes, ids, centroids) per live vector: the saved file's size."""
        path = self.directory / COMPRESSED_FILE
        size = path.stat().st_size if path.is_file() else len(faiss.serialize_index(self.index))
        return size / max(self.count, 1)

    def disk_bytes_per_vector(self) -> float:
        """Disk (not RAM) for the re-scoring vectors and row ids."""
        return float(np.dtype(self.params.vector_dtype).itemsize * self.dim + 8)

    def layout(self) -> dict[str, Any]:
        """How the index is built, as its manifest records it (``suwen index info`` shows it)."""
        return {
            "pq": self.params.factory,
            "code_bytes_per_vector": self.params.code_bytes,
            "nlist": self.params.nlist,
            "disk_bytes_per_vector": self.disk_bytes_per_vector(),
        }

    def _require_writable(self) -> None:
        if not self.writable:
            raise SuwenError(f"{self.directory}: compressed index opened read-only")

    def _drop_views(self) -> None:
        self._full_view = None
        self._ids_view = None


def open_or_create(directory: Path, dim: int) -> VectorStore:
    """The store in ``directory``, or a new exact one (``finish_store`` compresses it later if
    the corpus grows past the threshold)."""
    if (directory / PARAMS_FILE).is_file() or (directory / EXACT_FILE).is_file():
        return open_store(directory, writable=True)
    return ExactStore.create(directory, dim)


# A compressed index is re-calibrated once it has grown by this factor since the last time.
RECALIBRATE_GROWTH = 1.2


def finish_store(
    vector_store: VectorStore,
    setting: str,
    threshold: int,
    *,
    code_bytes: int = CODE_BYTES,
    progress: Callable[[str], None] | None = None,
) -> tuple[VectorStore, dict[str, Any]]:
    """Save ``vector_store``, compressing it first when the corpus is now large enough (or the
    setting says so), and return the store with what the manifest records about it:
    ``index_type``, ``bytes_per_vector``, ``recall_at_10`` and ``extra`` details."""
    directory = vector_store.directory
    if isinstance(vector_store, ExactStore):
        wanted = choose_index_type(setting, vector_store.count, threshold)
        if wanted == "exact":
            vector_store.save()
            return vector_store, {
                "index_type": "exact",
                "bytes_per_vector": vector_store.bytes_per_vector(),
                "recall_at_10": None,
                "extra": {},
            }
        converted, _ = compress_exact(
            vector_store, directory, code_bytes=code_bytes, progress=progress
        )
        (directory / EXACT_FILE).unlink(missing_ok=True)
        vector_store = converted
    if not isinstance(vector_store, CompressedStore):
        raise SuwenError(f"{directory}: unknown vector store {type(vector_store).__name__}")
    params = vector_store.params
    if vector_store.count > RECALIBRATE_GROWTH * max(params.calibrated_count, 1):
        calibrate_and_measure(vector_store, progress=progress)
    vector_store.save()
    params = vector_store.params
    documents = params.document_recall_at_10
    return vector_store, {
        "index_type": "compressed",
        "bytes_per_vector": round(vector_store.bytes_per_vector(), 2),
        "recall_at_10": None if params.recall_at_10 is None else round(params.recall_at_10, 4),
        "extra": {
            **vector_store.layout(),
            "nprobe": params.nprobe,
            "shortlist": params.shortlist,
            "recall_query_kind": "question-like" if documents is not None else "held-out documents",
            "document_recall_at_10": None if documents is None else round(documents, 4),
        },
    }


# ---------------------------------------------------------------------------------------------
# Training samples, calibration and recall


def held_out(rows: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
    """Rows reserved as recall queries: never part of a training sample."""
    return np.asarray(rows % HELD_OUT_STRIDE == 0)


def training_rows(total: int, size: int, seed: int = 0) -> npt.NDArray[np.int64]:
    """A sorted random sample of at most ``size`` row numbers in ``[0, total)``, held-out rows
    excluded."""
    rng = np.random.default_rng(seed)
    want = min(size, total)
    picked = np.unique(rng.choice(total, size=min(total, want + want // 50 + 8), replace=False))
    return picked[~held_out(picked)][:want].astype(np.int64)


# A real question sits about this far from its own abstract (cosine of PubMedQA questions to
# their abstracts' embeddings): held-out documents moved this far are the calibration queries.
QUESTION_COSINE = 0.73


@dataclass(frozen=True)
class RecallReport:
    """Recall@10 against exact search on question-like queries (what the index is calibrated
    on and reports) and, beside it, on held-out stored documents used as queries."""

    recall_at_10: float
    queries: int
    nprobe: int
    shortlist: int
    calibration: dict[str, float]
    document_recall_at_10: float = 0.0

    def manifest_extra(self) -> dict[str, Any]:
        return {
            "nprobe": self.nprobe,
            "shortlist": self.shortlist,
            "recall_queries": self.queries,
            "recall_query_kind": f"question-like (cosine {QUESTION_COSINE} to a held-out "
            "document, random direction)",
            "document_recall_at_10": round(self.document_recall_at_10, 4),
            "nprobe_calibration": self.calibration,
        }


def question_like(
    documents: FloatArray, rng: np.random.Generator, cosine: float = QUESTION_COSINE
) -> FloatArray:
    """Each document vector turned in a random direction until its cosine to the document is
    ``cosine``: a query that is not a copy of anything stored, as a question is not a copy of
    its abstract, whose own document is still its nearest neighbour."""
    unit = normalise(np.asarray(documents, dtype=np.float32))
    noise = rng.standard_normal(unit.shape).astype(np.float32)
    noise -= np.sum(noise * unit, axis=1, keepdims=True) * unit
    turned = cosine * unit + math.sqrt(1.0 - cosine**2) * normalise(noise)
    return normalise(turned.astype(np.float32))


def calibrate_and_measure(
    store: CompressedStore,
    *,
    candidate_rows: npt.NDArray[np.int64] | None = None,
    target: float = TARGET_RECALL,
    queries: int = RECALL_QUERIES,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> RecallReport:
    """Pick the cheapest search setting whose recall@10 on question-like calibration queries
    reaches ``target`` -- the smallest shortlist, and with it the smallest nprobe -- then
    measure recall@10 against exact search on a second, disjoint set of queries: question-like
    ones (the figure reported) and the held-out documents themselves.

    More lists (nprobe) find neighbours the coarse quantiser put elsewhere; a longer shortlist
    finds those the PQ codes ranked too low. When nprobe stops helping at one shortlist length,
    the next length is tried. If nothing reaches ``target`` the best setting seen is kept.

    Queries start from stored vectors of held-out rows (never trained on: ``held_out`` rows, or
    the caller's ``candidate_rows``). Question-like queries (:func:`question_like`) are searched
    over everything; a document used as a query has its own row excluded from both the exact
    and the compressed top-10 (leave-one-out).
    """
    live_mask = store.live_rows()
    live = np.flatnonzero(live_mask)
    if candidate_rows is None:
        candidate_rows = live[held_out(live)]
    candidates = candidate_rows[live_mask[candidate_rows]]
    if len(candidates) < 4:
        candidates = live
    rng = np.random.default_rng(seed)
    picked = rng.permutation(candidates)[: 2 * queries]
    calibration, evaluation = np.sort(picked[0::2]), np.sort(picked[1::2])
    full = store.full_vectors()
    asked = question_like(np.asarray(full[np.concatenate([calibration, evaluation])]), rng)
    none = np.full(len(picked), -1, dtype=np.int64)
    vectors_ = np.concatenate([asked, np.asarray(full[evaluation], dtype=np.float32)])
    own = np.concatenate([none, evaluation])
    if progress:
        progress(f"exact ground truth for {len(vectors_)} queries")
    truth = exact_top_rows(store, vectors_, own, 10, live_mask)
    split = len(calibration)
    cal = (asked[:split], none[:split], truth[:split])
    curve: dict[str, float] = {}
    best = (-1.0, DEFAULT_SHORTLIST, store.params.nlist)
    for shortlist in SHORTLIST_LADDER:
        recall, nprobe = _walk_nprobe(store, shortlist, cal, target, curve)
        if progress:
            progress(f"shortlist {shortlist}: recall@10 {recall:.3f} at nprobe {nprobe}")
        if recall > best[0]:
            best = (recall, shortlist, nprobe)
        if recall >= target:
            break
    _, shortlist, nprobe = best
    store.set_search(nprobe=nprobe, shortlist=shortlist)
    measured = _recall(store, asked[split:], none[split:], truth[split : len(picked)])
    documents = _recall(store, vectors_[len(picked) :], evaluation, truth[len(picked) :])
    store.params = replace(
        store.params,
        recall_at_10=measured,
        document_recall_at_10=documents,
        calibrated_count=store.count,
    )
    return RecallReport(measured, len(evaluation), nprobe, shortlist, curve, documents)


Queries = tuple[FloatArray, npt.NDArray[np.int64], npt.NDArray[np.int64]]


def _walk_nprobe(
    store: CompressedStore,
    shortlist: int,
    queries: Queries,
    target: float,
    curve: dict[str, float],
) -> tuple[float, int]:
    """(recall, nprobe): the first nprobe reaching ``target`` at this shortlist length, or the
    best one before two steps in a row gained less than SATURATED_GAIN. ``queries``: vectors,
    their own rows (-1: none) and their exact top 10."""
    best_recall, best_nprobe, flat_steps = -1.0, store.params.nlist, 0
    for nprobe in _nprobe_ladder(store.params.nlist):
        store.set_search(nprobe=nprobe, shortlist=shortlist)
        recall = _recall(store, *queries)
        curve[f"{shortlist}/{nprobe}"] = round(recall, 4)
        flat_steps = flat_steps + 1 if recall - best_recall < SATURATED_GAIN else 0
        if recall > best_recall:
            best_recall, best_nprobe = recall, nprobe
        if recall >= target or flat_steps >= 2:
            break
    return best_recall, best_nprobe


def _nprobe_ladder(nlist: int) -> list[int]:
    ladder = [p for p in NPROBE_LADDER if p < nlist]
    return [*ladder, nlist]


def exact_top_rows(
    store: CompressedStore,
    queries: FloatArray,
    own_rows: npt.NDArray[np.int64],
    k: int,
    live_mask: npt.NDArray[np.bool_],
    block: int = 131_072,
) -> npt.NDArray[np.int64]:
    """Exact top-``k`` rows for ``queries`` by brute force over the full vectors, removed rows
    and each query's own row (``own_rows``; -1: none) excluded (one streaming pass, bounded
    memory)."""
    full = store.full_vectors()
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(full), block):
        stop = min(start + block, len(full))
        scores = queries @ np.asarray(full[start:stop], dtype=np.float32).T
        scores[:, ~live_mask[start:stop]] = -np.inf
        own = (own_rows >= start) & (own_rows < stop)
        scores[np.flatnonzero(own), own_rows[own] - start] = -np.inf
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_rows = np.concatenate(
            [best_rows, np.broadcast_to(np.arange(start, stop), scores.shape)], axis=1
        )
        top = np.argpartition(-merged_scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, top, axis=1)
        best_rows = np.take_along_axis(merged_rows, top, axis=1)
    return best_rows


def _recall(
    store: CompressedStore,
    queries: FloatArray,
    own_rows: npt.NDArray[np.int64],
    truth: npt.NDArray[np.int64],
) -> float:
    _, found = store.search_rows(queries, 11)
    hits = 0
    for qi, own in enumerate(own_rows):
        top = [r for r in found[qi] if r != own and r >= 0][:10]
        hits += len(set(top) & set(truth[qi].tolist()))
    return hits / (10 * max(len(own_rows), 1))


def compress_exact(
    exact: ExactStore,
    directory: Path,
    *,
    code_bytes: int = CODE_BYTES,
    progress: Callable[[str], None] | None = None,
) -> tuple[CompressedStore, RecallReport]:
    """Build a compressed store in ``directory`` from every vector of an exact one: train on a
    sample (held-out rows excluded), add all, calibrate nprobe and measure recall."""
    params = CompressedParams.for_corpus(exact.dim, exact.count, code_bytes)
    store = CompressedStore.create(directory, params)
    flat = faiss.downcast_index(exact.index.index)
    rows = training_rows(exact.count, MAX_TRAINING_VECTORS)
    if progress:
        progress(f"training on {len(rows)} of {exact.count} vectors")
    store.train(np.stack([flat.reconstruct(int(r)) for r in rows]))
    for matrix, ids in exact.iter_vectors():
        store.add(matrix, ids)
    report = calibrate_and_measure(store, progress=progress)
    store.save()
    return store, report


@contextlib.contextmanager
def faiss_threads(count: int) -> Iterator[None]:
    """Run FAISS with ``count`` OpenMP threads inside the block.

    PQ training runs thousands of tiny k-means whose OpenMP barriers spin: on a machine whose
    cores are busy with other work, more threads are many times slower than one.
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# GPU helpers (faiss-gpu builds only; the CPU path is the same code with a CPU quantiser)


def _gpus() -> int:
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


@contextlib.contextmanager
def _gpu_clustering(ivf: faiss.IndexIVF) -> Iterator[None]:
    """Train the coarse quantiser's k-means on the GPU(s) when there are any."""
    if _gpus() <= 0:
        yield
        return
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    try:
        yield
    finally:
        ivf.clustering_index = None  # type: ignore[assignment]


@contextlib.contextmanager
def _gpu_assignment(ivf: faiss.IndexIVF) -> Iterator[None]:
    """Assign added vectors to lists with a GPU copy of the coarse quantiser; the lists and
    codes stay on the CPU."""
    if _gpus() <= 0:
        yield
        return
    cpu_quantizer = ivf.quantizer
    gpu_quantizer = faiss.index_cpu_to_all_gpus(cpu_quantizer)
    owned = ivf.own_fields
    ivf.own_fields = False
    ivf.quantizer = gpu_quantizer
    try:
        yield
    finally:
        ivf.quantizer = cpu_quantizer
        ivf.own_fields = owned


# ---------------------------------------------------------------------------------------------
# Files


Span = tuple[int, int, int]  # file offset, bytes, offset in the output buffer


def _read_cached(fd: int, buffer: memoryview, spans: list[Span]) -> list[Span]:
    """Read each span into ``buffer`` if the page cache holds all of it (never waits on disk);
    the spans it did not read (all of them where the system cannot tell). One loop over
    hundreds of spans per search: no call per span but the read itself."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return spans
    preadv = os.preadv
    missing = []
    for span in spans:
        position, size, at = span
        try:
            if preadv(fd, [buffer[at : at + size]], position, flag) == size:
                continue
        except OSError:  # EAGAIN: not all cached; EOPNOTSUPP: a file system without the flag
            pass
        missing.append(span)
    return missing


class AppendableArray:
    """A ``.npy`` file that grows by appending rows, readable at any time with
    ``np.load(path, mmap_mode='r', allow_pickle=False)``.

    The header is written with a fixed size, so the shape can be rewritten in place after each
    append; rows past the header's shape are ignored by readers.
    """

    HEADER_BYTES = 128

    def __init__(self, path: Path, dtype: str, dim: int | None) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.dim = dim
        self.row_bytes = self.dtype.itemsize * (dim or 1)
        self._offset: int | None = None

    def rows_on_disk(self) -> int:
        if not self.path.is_file():
            return 0
        return max(0, (self.path.stat().st_size - self.HEADER_BYTES) // self.row_bytes)

    def append(self, array: npt.NDArray[Any]) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        with self._open() as handle:
            rows = self._header_rows(handle)
            handle.seek(self.HEADER_BYTES + rows * self.row_bytes)
            handle.write(array.tobytes())
            handle.truncate()
            self._write_header(handle, rows + len(array))

    def truncate(self, rows: int) -> None:
        with self._open() as handle:
            handle.truncate(self.HEADER_BYTES + rows * self.row_bytes)
            self._write_header(handle, rows)

    def sync(self) -> None:
        with self._open() as handle:
            handle.flush()
            os.fsync(handle.fileno())

    def view(self, rows: int) -> npt.NDArray[Any]:
        """The first ``rows`` rows, memory-mapped read-only through ``np.load``: for reading
        the file through (calibration, exact search); :meth:`read_rows` reads a few rows."""
        if rows == 0:
            return np.zeros((0,) if self.dim is None else (0, self.dim), dtype=self.dtype)
        try:
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise IndexDamagedError(f"{self.path}: not a readable .npy array ({exc})") from exc
        if array.dtype != self.dtype or len(array) < rows:
            raise IndexDamagedError(
                f"{self.path}: holds {len(array)} rows of {array.dtype}, need {rows}"
            )
        view: npt.NDArray[Any] = array[:rows]
        return view

    def read_rows(self, rows: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
        """Rows ``rows`` (sorted, distinct, within the header's shape) as a new array, read
        with one positioned read per run of adjacent rows.

        Nothing is mapped into the caller: a row comes from the page cache, which keeps it for
        later searches (of this process and others) without counting it in this process's
        resident memory, however many rows a long-lived searcher touches. Rows are first read
        only if cached (``RWF_NOWAIT``); the kernel is then told of every missing run at once
        (``POSIX_FADV_WILLNEED``), so rows on disk are fetched together, not one by one."""
        out = np.empty((len(rows), self.dim) if self.dim else (len(rows),), dtype=self.dtype)
        buffer = out.reshape(-1).view(np.uint8).data
        base = self._data_offset()
        with self.path.open("rb", buffering=0) as handle:
            fd = handle.fileno()
            spans = self._spans(rows, base)
            missing = _read_cached(fd, buffer, spans)
            if missing and hasattr(os, "posix_fadvise"):
                for position, size, _ in missing:
                    os.posix_fadvise(fd, position, size, os.POSIX_FADV_WILLNEED)
            for position, size, at in missing:
                if os.preadv(fd, [buffer[at : at + size]], position) != size:
                    raise IndexDamagedError(f"{self.path}: ends before byte {position + size}")
        return out

    def _data_offset(self) -> int:
        """Where the rows start: after the header this class writes, or any ``.npy`` one
        (read once, with the header checks a store's open makes)."""
        if self._offset is None:
            ndim = 1 if self.dim is None else 2
            _, self._offset = file_checks.npy_layout(self.path, self.dtype.name, ndim)
        return self._offset

    def _spans(self, rows: npt.NDArray[np.int64], base: int) -> list[Span]:
        """(file offset, bytes, offset in the output) of each run of adjacent ``rows``."""
        if not len(rows):
            return []
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], breaks]).tolist()
        stops = np.concatenate([breaks, [len(rows)]]).tolist()
        width = self.row_bytes
        first = rows[starts].tolist()
        return [
            (base + row * width, (stop - start) * width, start * width)
            for row, start, stop in zip(first, starts, stops, strict=True)
        ]

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        if not self.path.exists():
            with self.path.open("wb") as handle:
                self._write_header(handle, 0)
        with self.path.open("r+b") as handle:
            yield handle

    def _header_rows(self, handle: Any) -> int:
        handle.seek(0)
        np.lib.format.read_magic(handle)  # type: ignore[no-untyped-call]
        shape, _, _ = np.lib.format.read_array_header_1_0(handle)  # type: ignore[no-untyped-call]
        return int(shape[0])

    def _write_header(self, handle: Any, rows: int) -> None:
        shape: tuple[int, ...] = (rows,) if self.dim is None else (rows, self.dim)
        text = repr(
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),  # type: ignore[no-untyped-call]
                "fortran_order": False,
                "shape": shape,
            }
        )
        body = text.ljust(self.HEADER_BYTES - 10 - 1) + "\n"
        handle.seek(0)
        handle.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1"))


def _write_faiss(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))
