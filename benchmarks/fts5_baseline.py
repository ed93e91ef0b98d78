"""The SQLite FTS5 BM25 that text indexes used before tantivy, rebuilt from a version's rows
so ``benchmarks/index_scale.py`` can time it beside tantivy on the same chunks and questions.

Suwen itself no longer reads or writes FTS5 tables; this is the baseline only.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

from suwen.files import atomic_path
from suwen.privacy import private_dir

FTS_TABLE = "chunks_fts"
FTS_TOKENIZER = "porter unicode61 remove_diacritics 2"
_WORD = re.compile(r"\w+", re.UNICODE)


def copy_rows(text_db: Path, workdir: Path) -> sqlite3.Connection:
    """A writable copy of a version's SQLite file, to add the FTS5 table to (the version itself
    is left untouched: its manifest records the file's digest)."""
    copy = private_dir(workdir) / "fts5.sqlite"
    with atomic_path(copy) as tmp:
        shutil.copyfile(text_db, tmp)
    return sqlite3.connect(copy)


def create_fts5_table(db: sqlite3.Connection) -> None:
    """Create the FTS5 table from the chunk rows, optimise it and commit."""
    db.execute(
        f"CREATE VIRTUAL TABLE {FTS_TABLE} USING fts5(title, text, tokenize = '{FTS_TOKENIZER}')"
    )
    db.execute(
        f"INSERT INTO {FTS_TABLE} (rowid, title, text) SELECT c.id, d.title, c.text "
        "FROM chunks AS c JOIN documents AS d ON d.pmid = c.pmid"
    )
    db.execute(f"INSERT INTO {FTS_TABLE}({FTS_TABLE}) VALUES ('optimize')")
    db.commit()


def fts_query(text: str, stopwords: frozenset[str]) -> str | None:
    """An FTS5 MATCH expression for free text: its content words, each quoted, joined by OR.

    Quoting makes every word a plain string, so text can never be read as FTS5 syntax; OR
    instead of FTS5's implicit AND lets an article match without containing every word.
    """
    words = [w.lower() for w in _WORD.findall(text)]
    content = [w for w in words if w not in stopwords] or words
    unique = list(dict.fromkeys(content))
    if not unique:
        return None
    return " OR ".join(f'"{word}"' for word in unique)


def fts5_bm25(
    db: sqlite3.Connection, query: str, limit: int, stopwords: frozenset[str]
) -> list[tuple[int, float]]:
    """``(chunk id, score)`` by FTS5's BM25, best first."""
    match = fts_query(query, stopwords)
    if match is None:
        return []
    sql = (
        f"SELECT rowid AS id, -bm25({FTS_TABLE}) AS score FROM {FTS_TABLE} "
        f"WHERE {FTS_TABLE} MATCH ? ORDER BY bm25({FTS_TABLE}) LIMIT ?"
    )
    return [(int(row[0]), float(row[1])) for row in db.execute(sql, (match, limit))]
