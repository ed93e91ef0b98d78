"""The FTS5 table text indexes held before schema 2, rebuilt from a version's rows.

Not used by search or builds (they use ``suwen.indexes.bm25``): the scale benchmark times it
beside tantivy, and tests make schema-1 versions with it.
"""

from __future__ import annotations

import sqlite3

from suwen.indexes.text_index import LEGACY_FTS_TABLE

LEGACY_FTS_TOKENIZER = "porter unicode61 remove_diacritics 2"


def create_fts5_table(db: sqlite3.Connection) -> None:
    """Create schema 1's FTS5 table from the chunk rows, optimise it and commit."""
    db.execute(
        f"CREATE VIRTUAL TABLE {LEGACY_FTS_TABLE} USING fts5(title, text, "
        f"tokenize = '{LEGACY_FTS_TOKENIZER}')"
    )
    db.execute(
        f"INSERT INTO {LEGACY_FTS_TABLE} (rowid, title, text) SELECT c.id, d.title, c.text "
        "FROM chunks AS c JOIN documents AS d ON d.pmid = c.pmid"
    )
    db.execute(f"INSERT INTO {LEGACY_FTS_TABLE}({LEGACY_FTS_TABLE}) VALUES ('optimize')")
    db.commit()
