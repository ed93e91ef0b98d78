"""Suwen's log: one file in the data home, readable by its owner only, for whoever debugs a
batch run the next morning (a retry, a degraded step, a refused file, an index published).

What is logged is the machinery, never the patient: no question text, no image content, no
answer, no evidence text. Modules log through ``logging.getLogger(__name__)``; only the CLI
attaches the file handler (a library user keeps control of their own logging).
"""

from __future__ import annotations

import logging
import os
from logging.handlers import RotatingFileHandler
from pathlib import Path

LOG_NAME = "suwen.log"
MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 3
FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def log_path(home: Path) -> Path:
    return home / "logs" / LOG_NAME


class _PrivateRotatingHandler(RotatingFileHandler):
    """A rotating file handler whose files (the live one and every rotated one) are 0600
    whatever the umask."""

    def _open(self):  # type: ignore[no-untyped-def]  # the base method is untyped
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, self.mode.replace("w", "a"), encoding=self.encoding)


def configure(home: Path, level: int = logging.INFO) -> Path | None:
    """Send the ``suwen`` loggers to ``<home>/logs/suwen.log`` (0600 in a 0700 folder).
    Returns the file, or None when it cannot be opened (logging never stops a command)."""
    root = logging.getLogger("suwen")
    path = log_path(home)
    for old in [h for h in root.handlers if isinstance(h, _PrivateRotatingHandler)]:
        if old.baseFilename == str(path):
            return path
        root.removeHandler(old)  # another data home in the same process (tests, a library)
        old.close()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        handler = _PrivateRotatingHandler(
            path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8", delay=True
        )
    except OSError:
        return None
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # never to a terminal handler someone else installed
    return path
