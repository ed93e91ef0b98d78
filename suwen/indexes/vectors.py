"""FAISS vector primitives shared by the vector stores (``suwen.indexes.compressed``).

Vectors are L2-normalised float32 and searched by inner product (= cosine). Each vector carries the
int64 id of its SQLite row, so a hit maps straight back to its metadata.
"""

from __future__ import annotations

import functools
from typing import Any

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


def inner_products(rows: npt.NDArray[Any], query: FloatArray) -> FloatArray:
    """``rows @ query`` in float32 for one query. Float16 rows (a compressed index's re-scoring
    vectors) are widened by ONNX Runtime's vectorised cast: numpy widens float16 one element at
    a time, which for a shortlist of 800 768-d rows costs more than the rest of the search."""
    session = _half_products() if rows.dtype == np.float16 and len(rows) else None
    if session is None:
        return np.asarray(rows.astype(np.float32, copy=False) @ query, dtype=np.float32)
    column = np.ascontiguousarray(query, dtype=np.float32).reshape(-1, 1)
    scores = session.run(None, {"rows": np.ascontiguousarray(rows), "query": column})[0]
    return np.asarray(scores, dtype=np.float32).reshape(-1)


@functools.cache
def _half_products() -> Any:
    """A one-thread session computing Cast(rows, float32) @ query (a column: ONNX Runtime's
    matrix-vector product of a 1-d query is ten times slower), built on first use, or None
    without ONNX Runtime (numpy then widens the rows itself)."""
    try:
        return _build_half_products()
    except ImportError:
        return None


def _build_half_products() -> Any:
    import onnx
    from onnx import TensorProto, helper

    from suwen.indexes.onnx_encoder import runtime_session  # it imports this module

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["rows"], ["wide"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["wide", "query"], ["scores"]),
        ],
        "half_inner_products",
        [
            helper.make_tensor_value_info("rows", TensorProto.FLOAT16, ["rows", "dim"]),
            helper.make_tensor_value_info("query", TensorProto.FLOAT, ["dim", 1]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["rows", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return runtime_session(model.SerializeToString(), threads=1)


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
