"""The indexes of a data home, opened whatever their kind: what `suwen index info` checks."""

from __future__ import annotations

from pathlib import Path

from suwen.indexes import store
from suwen.indexes.image_store import ImageStore
from suwen.indexes.text_store import TextStore


def open_checked(indexes_dir: Path, name: str) -> tuple[Path, store.IndexManifest]:
    """The live version of index ``name`` and its manifest, after its files were checked
    against the manifest and opened by their own parsers (no model is loaded)."""
    version, manifest = store.open_version(indexes_dir, name)
    if manifest.kind == "text":
        TextStore.open(indexes_dir, name).close()
    else:
        ImageStore.open(indexes_dir, name)[0].close()
    return version, manifest
