"""Which article each chunk belongs to, as an array the searcher keeps in RAM.

Search needs a chunk's article for every candidate (one hit per article, excluded PMIDs), and
asking SQLite for 200 random chunk rows per query cost 17 ms at 1M chunks once those pages had
left the OS cache, more than the vector search itself. A build therefore writes
``article_keys.npy`` beside the vectors: ``keys[chunk_id]`` is a small integer naming the chunk's
article (equal keys, same article; -1 for ids no chunk has), 4 bytes per chunk id. PMIDs are
read from SQLite only for the ``k`` hits that are shown.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ARTICLE_KEYS = "article_keys.npy"
KeyArray = npt.NDArray[np.int32]


def compute(db: sqlite3.Connection) -> KeyArray:
    """Keys from the chunk rows; scans the (pmid, chunk_no) index only, not the texts."""
    rows = db.execute("SELECT id, pmid FROM chunks ORDER BY pmid, chunk_no").fetchall()
    if not rows:
        return np.full(0, -1, dtype=np.int32)
    ids = np.fromiter((int(row[0]) for row in rows), dtype=np.int64, count=len(rows))
    starts = np.fromiter(
        (i == 0 or rows[i][1] != rows[i - 1][1] for i in range(len(rows))),
        dtype=np.bool_,
        count=len(rows),
    )
    keys = np.full(int(ids.max()) + 1, -1, dtype=np.int32)
    keys[ids] = np.cumsum(starts, dtype=np.int64).astype(np.int32) - 1
    return keys


def write(db: sqlite3.Connection, directory: Path) -> None:
    """Write the keys of ``db``'s chunks into the version being built (atomically)."""
    keys = compute(db)
    partial = directory / f".{ARTICLE_KEYS}.partial"
    with partial.open("wb") as handle:
        np.save(handle, keys, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    partial.replace(directory / ARTICLE_KEYS)


def load(directory: Path, db: sqlite3.Connection, chunks: int) -> KeyArray:
    """The version's keys, or keys computed from ``db`` when the file is missing or does not
    match the version's ``chunks`` (a version built before the file existed)."""
    path = directory / ARTICLE_KEYS
    if path.is_file():
        keys: Any = np.load(path, allow_pickle=False)
        if keys.dtype == np.int32 and keys.ndim == 1 and int((keys >= 0).sum()) == chunks:
            return np.asarray(keys, dtype=np.int32)
    return compute(db)


def lookup(keys: KeyArray, chunk_ids: npt.ArrayLike) -> npt.NDArray[np.int32]:
    """Keys of ``chunk_ids``; -1 for ids outside the array (chunks added since it was made)."""
    ids = np.asarray(chunk_ids, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(keys))
    out = np.full(ids.shape, -1, dtype=np.int32)
    out[inside] = keys[ids[inside]]
    return out
