"""Which article each chunk belongs to, as an array the searcher keeps in RAM.

Search needs a chunk's article for every candidate (one hit per article, excluded PMIDs), and
asking SQLite for a few hundred random chunk rows per query, once those pages have left the OS
cache, costs more than the vector search itself on a large index (the README gives the
figure). A build therefore writes
``article_keys.npy`` beside the vectors: ``keys[chunk_id]`` is a small integer naming the chunk's
article (equal keys, same article; -1 for ids no chunk has), 4 bytes per chunk id. PMIDs are
read from SQLite only for the ``k`` hits that are shown.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from suwen.errors import IndexDamagedError
from suwen.files import atomic_path
from suwen.indexes import file_checks

if TYPE_CHECKING:
    from suwen.indexes.text_store import TextRows

ARTICLE_KEYS = "article_keys.npy"
KeyArray = npt.NDArray[np.int32]


def compute(text_rows: TextRows) -> KeyArray:
    """Keys from the chunk rows; scans the (pmid, chunk_no) index only, not the texts."""
    rows = text_rows.chunk_articles()
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


def write(text_rows: TextRows, directory: Path) -> None:
    """Write the keys of the version's chunks into the version being built (atomically)."""
    keys = compute(text_rows)
    with atomic_path(directory / ARTICLE_KEYS) as partial, partial.open("wb") as handle:
        np.save(handle, keys, allow_pickle=False)


def load(directory: Path, chunks: int) -> KeyArray:
    """The version's keys: the header checked against the file, then memory-mapped and copied
    into RAM; refused unless they name exactly the version's ``chunks``."""
    path = directory / ARTICLE_KEYS
    (length,) = file_checks.npy_shape(path, "int32", 1)
    keys = np.full(0, -1, dtype=np.int32)
    if length:
        mapped: KeyArray = np.load(path, mmap_mode="r", allow_pickle=False)
        keys = np.array(mapped, dtype=np.int32)
    if int((keys >= 0).sum()) != chunks:
        raise IndexDamagedError(f"{path}: keys for {int((keys >= 0).sum())} chunks, not {chunks}")
    return keys


def lookup(keys: KeyArray, chunk_ids: npt.ArrayLike) -> npt.NDArray[np.int32]:
    """Keys of ``chunk_ids``; -1 for ids outside the array (chunks added since it was made)."""
    ids = np.asarray(chunk_ids, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(keys))
    out = np.full(ids.shape, -1, dtype=np.int32)
    out[inside] = keys[ids[inside]]
    return out
