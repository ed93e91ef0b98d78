"""Search an image index: image -> similar cases, and text -> images (CLIP text tower).

A searcher holds the index's store (``suwen.indexes.image_store``: vectors in memory and one
read-only SQLite connection; on POSIX an index version replaced later stays readable through it),
shared by every thread; the SQLite reads are serialised by a lock and the encoder serialises its
own calls.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Collection
from concurrent.futures import Future

from PIL import Image

from suwen.config import Settings
from suwen.errors import IndexMismatchError, InputError
from suwen.indexes import store, vectors
from suwen.indexes.image_encoder import ImageQueryEncoder, encoder_id, query_image_encoder
from suwen.indexes.image_store import ImageRow, ImageStore
from suwen.medimage import FileIdentity, loaded_from
from suwen.models import resolve_query_encoder
from suwen.types import ImageHit

# Query embeddings kept by the image file they were computed from (a few kB each).
QUERY_CACHE = 1024


class ImageSearcher:
    """Similar-case search over one image index."""

    def __init__(
        self,
        name: str,
        manifest: store.IndexManifest,
        image_store: ImageStore,
        encoder: ImageQueryEncoder,
    ) -> None:
        self.name = name
        self.manifest = manifest
        self.encoder = encoder
        self._store = image_store
        self._db_lock = threading.Lock()
        self._queries: OrderedDict[FileIdentity, vectors.FloatArray] = OrderedDict()
        self._embedding: dict[FileIdentity, Future[vectors.FloatArray]] = {}
        self._queries_lock = threading.Lock()

    @classmethod
    def open(cls, settings: Settings, name: str | None = None) -> ImageSearcher:
        """The live version of image index ``name`` (default: settings.image_index), refusing one
        built with another encoder than the configured one."""
        name = name or settings.image_index
        image_store, manifest = ImageStore.open(settings.indexes_dir, name)
        try:
            encoder = _encoder_for(settings, name, manifest)
        except BaseException:
            image_store.close()
            raise
        return cls(name, manifest, image_store, encoder)

    @property
    def size(self) -> int:
        return self._store.vectors.count

    def search_image(
        self, image: Image.Image, k: int = 5, *, exclude_sha256: Collection[str] = ()
    ) -> list[ImageHit]:
        """The ``k`` cases most similar to ``image``, best first, one hit per case; cases whose
        file hash is in ``exclude_sha256`` (e.g. the query image itself) are left out."""
        query = self._image_query(image)
        return self._search(query, k, frozenset(exclude_sha256), method="image")

    def _image_query(self, image: Image.Image) -> vectors.FloatArray:
        """The image's embedding. An image ``suwen.medimage.load_image`` read from a file is
        embedded once while the file stays the same (several questions about one image, as
        in VQA datasets, or a chat's follow-ups); the least recently used goes first. A
        question asking while another one's embedding of the same file is under way waits
        for it instead of embedding the file a second time."""
        source = loaded_from(image)
        if source is None:
            return self.encoder.encode_images([image])
        with self._queries_lock:
            if source in self._queries:
                self._queries.move_to_end(source)
                return self._queries[source].copy()
            pending = self._embedding.get(source)
            if pending is None:
                pending = self._embedding[source] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result().copy()
        try:
            query = self.encoder.encode_images([image])
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            with self._queries_lock:
                del self._embedding[source]
        with self._queries_lock:
            self._queries[source] = query.copy()
            while len(self._queries) > QUERY_CACHE:
                self._queries.popitem(last=False)
        pending.set_result(query.copy())
        return query

    def search_text(self, query: str, k: int = 5) -> list[ImageHit]:
        """The ``k`` cases whose images best match ``query`` through the CLIP text tower."""
        if not query.strip():
            raise InputError("empty query: give words to search the images with")
        embedding = self.encoder.encode_texts([query])
        return self._search(embedding, k, frozenset(), method="text->image")

    def close(self) -> None:
        with self._db_lock:
            self._store.close()

    def _search(
        self, query: vectors.FloatArray, k: int, exclude: frozenset[str], method: str
    ) -> list[ImageHit]:
        if k <= 0 or self.size == 0:
            return []
        # Several frames per case and excluded files take slots: fetch more until k cases.
        fetch = min(self.size, max(4 * k, k + 16))
        while True:
            hits = self._collect(query, fetch, k, exclude, method)
            if len(hits) >= k or fetch >= self.size:
                return hits
            fetch = min(self.size, fetch * 4)

    def _collect(
        self, query: vectors.FloatArray, fetch: int, k: int, exclude: frozenset[str], method: str
    ) -> list[ImageHit]:
        scores, ids = self._store.vectors.search(query, fetch)
        rows = self._rows([int(i) for i in ids[0] if i >= 0])
        hits: dict[str, ImageHit] = {}
        for score, vector_id in zip(scores[0], ids[0], strict=True):
            row = rows.get(int(vector_id))
            if row is None or row.sha256 in exclude or row.case_id in hits:
                continue
            hits[row.case_id] = self._hit(row, float(score), method)
            if len(hits) == k:
                break
        return list(hits.values())

    def _rows(self, ids: list[int]) -> dict[int, ImageRow]:
        with self._db_lock:
            return self._store.rows(ids)

    def _hit(self, row: ImageRow, score: float, method: str) -> ImageHit:
        return ImageHit(
            key=f"case:{row.case_id}",
            score=score,
            index=self.name,
            source=row.source or "",
            text=row.caption,
            case_id=row.case_id,
            path=row.path,
            modality=row.modality,
            body_part=row.body_part,
            methods=[method],
        )


def _encoder_for(settings: Settings, name: str, manifest: store.IndexManifest) -> ImageQueryEncoder:
    """The encoder the index was built with (the configured one, or the index's own when it is
    on this machine), refused if its vectors do not have the index's dimension."""
    settings = resolve_query_encoder(manifest, settings, "image").settings  # its own if local
    configured = encoder_id(settings.image_encoder)
    encoder = query_image_encoder(settings)
    if encoder.dim != manifest.dim:
        raise IndexMismatchError(
            f"index {name!r} holds {manifest.dim}-d vectors; {configured} makes {encoder.dim}-d"
        )
    return encoder
