"""Header checks for the binary files of an index, before anything is allocated from them.

A FAISS file or a ``.npy`` header states sizes (vector counts, array shapes) that its reader
allocates before it reads the data: a 61-byte file claiming 8 GiB of vectors would make FAISS
allocate 8 GiB. Every such claim is checked against the bytes the file really holds first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np

from suwen.errors import IndexDamagedError

MAX_NPY_HEADER = 10_000  # numpy's own default limit for a trusted header


def read_faiss(path: Path) -> faiss.Index:
    """``faiss.read_index`` of a file whose every stated size was first checked against the
    file: FAISS's in-file mapping mode parses the whole structure mapping the vector data
    instead of allocating it, and fails cleanly on any size the file cannot hold."""
    try:
        faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except (RuntimeError, MemoryError) as exc:
        raise IndexDamagedError(f"{path}: not a complete FAISS index ({_first_line(exc)})") from exc
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as exc:  # pragma: no cover - passed the check above
        raise IndexDamagedError(f"{path}: not a readable FAISS index ({_first_line(exc)})") from exc


def npy_shape(path: Path, dtype: str, ndim: int) -> tuple[int, ...]:
    """The shape a ``.npy`` header states, refused unless it has ``dtype`` and ``ndim``
    dimensions and the file holds at least that many bytes of data."""
    shape, _ = npy_layout(path, dtype, ndim)
    return shape


def npy_layout(path: Path, dtype: str, ndim: int) -> tuple[tuple[int, ...], int]:
    """The shape a ``.npy`` header states and the byte offset its data starts at, checked as
    :func:`npy_shape` checks them."""
    try:
        with path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)  # type: ignore[no-untyped-call]
            read_header: Any = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            header = read_header(handle, max_header_size=MAX_NPY_HEADER)
            offset = handle.tell()
    except (OSError, ValueError, SyntaxError, TypeError) as exc:
        raise IndexDamagedError(f"{path}: not a .npy array ({_first_line(exc)})") from exc
    shape, fortran, found = header
    if found != np.dtype(dtype) or len(shape) != ndim or fortran:
        raise IndexDamagedError(f"{path}: holds {found} {shape}, expected {ndim}-d {dtype}")
    needed = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if offset + needed > size:
        raise IndexDamagedError(
            f"{path}: header states {shape} ({needed} bytes) but the file holds {size - offset}"
        )
    return tuple(int(n) for n in shape), int(offset)


def _first_line(exc: BaseException) -> str:
    """The gist of a library's error: FAISS prefixes its message with a C++ signature."""
    text = " ".join(str(exc).split())
    _, _, reason = text.rpartition("Error: ")
    return (reason or text or type(exc).__name__)[:160]
