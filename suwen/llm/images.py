"""Images for Qwen2.5-VL: resized within its pixel limits and sent as data URLs.

Qwen2.5-VL sees an image as 28x28-pixel cells (14-pixel patches, merged 2x2), one visual token
each, and its processor resizes every image to multiples of 28 with an area between
``min_pixels`` and ``max_pixels``. Doing the same resize here, before sending, keeps requests
small (a 12-megapixel scan is not shipped to be shrunk on the server), makes the token cost
predictable, and means the server's processor finds nothing left to resize. Images are encoded
as PNG: lossless, so a radiograph's grey levels arrive as they were; a grey image as greyscale
PNG, which the server reads back as the same RGB pixels.

The PNG is written here from the decoded, resized pixels: each row "Up"-filtered (less the row
above it) and deflated at level 1 with run-length matching, which for radiographs makes files
as small as PIL's writer at level 1 makes them, in less than half its time (PIL tries every
filter on every row). Stored, undeflated PNGs would be cheaper still to write, but three times
the bytes cost more than that to serialise, send and parse, once per request that carries the
image, here and on the server.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import threading
import weakref
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from suwen.errors import InputError
from suwen.medimage import MAX_PIXELS, FileIdentity, loaded_from

# Qwen2.5-VL's processor constants.
FACTOR = 28  # patch_size 14 x merge_size 2
MAX_ASPECT_RATIO = 200
# Data URLs kept by the file their image was loaded from, in characters (bytes: base64 is
# ASCII): a few hundred radiographs.
FILE_CACHE_CHARS = 128 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPE = {"L": 0, "RGB": 2}  # 8-bit greyscale, 8-bit truecolour
PNG_FILTER_UP = 2


def describe(image: Image.Image) -> str:
    """How an error names an image: its file when it came from one, else its size."""
    name = getattr(image, "filename", "") or ""
    return f"image {name}" if name else f"image of {image.width}x{image.height} pixels"


def fit_size(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's ``smart_resize``: the (height, width) nearest the original, both multiples of
    28, with the area within [min_pixels, max_pixels] and the aspect ratio kept."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.0f} of a {width}x{height} "
            f"image is above Qwen2.5-VL's limit of {MAX_ASPECT_RATIO}"
        )
    new_h = max(FACTOR, round(height / FACTOR) * FACTOR)
    new_w = max(FACTOR, round(width / FACTOR) * FACTOR)
    if new_h * new_w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        new_h = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        new_w = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif new_h * new_w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * beta / FACTOR) * FACTOR
        new_w = math.ceil(width * beta / FACTOR) * FACTOR
    return _within_aspect_limit(new_h, new_w)


def _within_aspect_limit(height: int, width: int) -> tuple[int, int]:
    """Rounding to the grid can push a ratio just under the limit over it (29x5615 rounds to
    28x5628, 201:1), and the server's processor refuses such an image: the long side is cut
    back to the limit, so what is sent is an image the server keeps as it is."""
    short = min(height, width)
    longest = MAX_ASPECT_RATIO * short // FACTOR * FACTOR
    return (min(height, longest), width) if height > width else (height, min(width, longest))


def visual_tokens(image: Image.Image, min_pixels: int, max_pixels: int) -> int:
    """The prompt tokens one image takes in Qwen2.5-VL once resized within the pixel limits:
    one per 28x28 cell, plus the vision start and end markers around them."""
    height, width = fit_size(image.height, image.width, min_pixels, max_pixels)
    return (height // FACTOR) * (width // FACTOR) + 2


def prepare_image(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Decode (PIL opens files lazily), convert to RGB and resize to Qwen's grid.

    An image that cannot be decoded or sized raises InputError naming it, and so does one
    larger than the loader's pixel limit, before it is decoded (an image Suwen did not load
    itself may still be a lazily opened file)."""
    return _prepared(image, min_pixels, max_pixels, grey=False)


def _prepared(image: Image.Image, min_pixels: int, max_pixels: int, grey: bool) -> Image.Image:
    """``prepare_image``; with ``grey``, an image whose every pixel is grey comes back as its
    8-bit greyscale ("L") equivalent, resized with the same filter (the same values as each
    channel of the RGB result)."""
    if image.width * image.height > MAX_PIXELS:
        raise InputError(
            f"{describe(image)}: refused, {image.width}x{image.height} pixels exceeds the limit "
            f"of {MAX_PIXELS} pixels per image (decompression bomb?)"
        )
    try:
        image.load()
        height, width = fit_size(image.height, image.width, min_pixels, max_pixels)
        if grey and image.mode == "L":
            ready = image
        else:
            ready = image if image.mode == "RGB" else image.convert("RGB")
            if grey and is_grey(ready):
                ready = ready.getchannel(0)
        if (ready.height, ready.width) != (height, width):
            ready = ready.resize((width, height), Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError) as exc:
        # PIL reports truncated or corrupt data as OSError, SyntaxError or ValueError.
        raise InputError(f"{describe(image)}: cannot be used: {exc}") from exc
    return ready


def is_grey(rgb: Image.Image) -> bool:
    """Whether every pixel of an RGB image has R = G = B (most radiographs, stored as RGB)."""
    pixels = np.asarray(rgb)
    return bool(
        np.array_equal(pixels[..., 0], pixels[..., 1])
        and np.array_equal(pixels[..., 1], pixels[..., 2])
    )


def image_to_data_url(image: Image.Image, min_pixels: int, max_pixels: int) -> str:
    """A ``data:image/png;base64,...`` URL of the image, resized within the pixel limits.

    A grey image (R = G = B at every pixel, as most radiographs are even when stored as RGB)
    is sent as an 8-bit greyscale PNG: the server reads images as RGB, and converting "L" to
    RGB copies each value into the three channels, so the model sees exactly the pixels of
    the RGB image, while there is a third of the pixels to resize and compress here and about
    a third less base64 to send and decode."""
    prepared = _prepared(image, min_pixels, max_pixels, grey=True)
    return "data:image/png;base64," + base64.b64encode(png_bytes(prepared)).decode("ascii")


def png_bytes(image: Image.Image) -> bytes:
    """An 8-bit PNG of an "L" or "RGB" image, all rows "Up"-filtered in one IDAT chunk."""
    rows = np.asarray(image, dtype=np.uint8).reshape(image.height, -1)
    framed = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    framed[:, 0] = PNG_FILTER_UP
    framed[:, 1:] = rows
    framed[1:, 1:] -= rows[:-1]  # each byte less the one above it, modulo 256
    deflater = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = deflater.compress(framed.tobytes()) + deflater.flush()
    header = struct.pack(
        ">IIBBBBB", image.width, image.height, 8, PNG_COLOUR_TYPE[image.mode], 0, 0, 0
    )
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk: length, type, data and the CRC-32 of type and data."""
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


@dataclass(frozen=True)
class EncodedImage:
    """An image as sent: its PNG data URL, and the SHA-256 of that URL, the content id vLLM
    keeps the image under when a request names it (``uuid``), so that later requests to the
    same server can name the image without sending it again."""

    url: str
    uuid: str

    @classmethod
    def of(cls, url: str) -> EncodedImage:
        return cls(url, hashlib.sha256(url.encode("ascii")).hexdigest())


class ImageEncoder:
    """Data URLs for images, each encoded once per image object, and once per image file.

    The agent sends the same image in several calls of one question (look, reread, answer);
    resizing and PNG-encoding a radiograph costs tens of milliseconds, more than a cached
    prefix takes vLLM to answer. Entries are keyed by object identity and dropped when the
    image is garbage collected, so images are treated as immutable once sent (Suwen never
    edits a decoded image in place). An image ``suwen.medimage.load_image`` read from a file
    is also kept under that file's identity (path, size, modification time), within
    ``file_capacity`` characters, least recently used first out: a similar case shown as a
    worked example, or an image several questions ask about, is loaded again for each
    question but encoded once while its file stays the same, also when several questions ask
    for it at once (the first encodes, the others wait for its URL). Thread-safe: encoding
    runs in worker threads."""

    def __init__(
        self,
        min_pixels: int,
        max_pixels: int,
        capacity: int = 64,
        file_capacity: int = FILE_CACHE_CHARS,
    ) -> None:
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.capacity = capacity
        self.file_capacity = file_capacity
        self._urls: OrderedDict[int, EncodedImage] = OrderedDict()
        self._by_file: OrderedDict[FileIdentity, EncodedImage] = OrderedDict()
        self._file_chars = 0
        self._encoding: dict[FileIdentity, threading.Event] = {}  # files being encoded now
        self._lock = threading.Lock()

    def cached(self, image: Image.Image) -> bool:
        source = loaded_from(image)
        with self._lock:
            return id(image) in self._urls or (source is not None and source in self._by_file)

    def data_url(self, image: Image.Image) -> str:
        return self.encoded(image).url

    def encoded(self, image: Image.Image) -> EncodedImage:
        key = id(image)
        source = loaded_from(image)
        while True:
            with self._lock:
                found = self._lookup(key, source)
                if found is not None:
                    return found
                busy = self._encoding.get(source) if source is not None else None
                if busy is None and source is not None:
                    self._encoding[source] = threading.Event()
            if busy is None:
                break
            busy.wait()  # another question is encoding the same file: use its URL
        try:
            encoded = EncodedImage.of(image_to_data_url(image, self.min_pixels, self.max_pixels))
            with self._lock:
                self._keep(key, image, source, encoded)
        finally:
            if source is not None:
                with self._lock:
                    self._encoding.pop(source).set()
        return encoded

    def _lookup(self, key: int, source: FileIdentity | None) -> EncodedImage | None:
        """Under the lock: the URL kept for the image object, else for its file."""
        url = self._urls.get(key)
        if url is not None:
            self._urls.move_to_end(key)
            return url
        if source is not None and source in self._by_file:
            self._by_file.move_to_end(source)
            return self._by_file[source]
        return None

    def _keep(
        self, key: int, image: Image.Image, source: FileIdentity | None, url: EncodedImage
    ) -> None:
        """Under the lock: ``url`` kept for the image object and for its file."""
        if key not in self._urls:
            # The id may be reused once the image is gone: forget it then.
            weakref.finalize(image, self._forget, key)
        self._urls[key] = url
        while len(self._urls) > self.capacity:
            self._urls.popitem(last=False)
        if source is not None:
            self._keep_for_file(source, url)

    def _keep_for_file(self, source: FileIdentity, url: EncodedImage) -> None:
        """Under the lock: ``url`` kept for ``source``, the oldest dropped beyond capacity."""
        if len(url.url) > self.file_capacity:
            return
        old = self._by_file.pop(source, None)
        self._file_chars += len(url.url) - (len(old.url) if old is not None else 0)
        self._by_file[source] = url
        while self._file_chars > self.file_capacity:
            _, dropped = self._by_file.popitem(last=False)
            self._file_chars -= len(dropped.url)

    def _forget(self, key: int) -> None:
        with self._lock:
            self._urls.pop(key, None)
