"""FAISS vector primitives shared by the vector stores (``suwen.indexes.compressed``).

Vectors are L2-normalised float32 and searched by inner product (= cosine). Each vector carries the
int64 id of its SQLite row, so a hit maps straight back to its metadata.
"""

from __future__ import annotations

import faiss
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]


def normalise(vectors: npt.ArrayLike) -> FloatArray:
    array = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if array.ndim == 1:
        array = array[None, :]
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12), dtype=np.float32)


def exact_index(dim: int) -> faiss.Index:
    """Exact inner-product search with explicit ids (and removal, for re-ingest)."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def add_vectors(index: faiss.Index, vectors: FloatArray, ids: IdArray) -> None:
    if len(ids):
        index.add_with_ids(normalise(vectors), np.ascontiguousarray(ids, dtype=np.int64))


def remove_ids(index: faiss.Index, ids: IdArray) -> int:
    if not len(ids):
        return 0
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
    return int(index.remove_ids(selector))
