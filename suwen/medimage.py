"""One loader for every medical image format Suwen reads, to 8-bit RGB PIL images.

PNG/JPEG/BMP/GIF/WebP go through Pillow, TIFF (incl. 16-bit) through tifffile, DICOM through
pydicom (modality LUT, then VOI LUT or window, MONOCHROME1 inverted, multi-frame, and a folder of
DICOM files read as one series), NIfTI through nibabel (a 3-D volume gives its middle axial,
coronal and sagittal slices). Wider-than-8-bit data without a window is stretched between its
0.5th and 99.5th percentiles.

Every failure (missing, unsupported, corrupt or truncated file, DICOM without pixel data, a
decompression bomb) raises :class:`~suwen.errors.InputError` with one line naming the file.

Files are hostile until their sizes check out: before any decoder runs, the size of what it
would allocate is read from the file itself and checked against a budget (``MAX_PIXELS`` per 2-D
image, ``MAX_IMAGE_BYTES`` with every sample and bit counted, ``MAX_VOLUME_BYTES`` for what a
volume reader or an inflater may hold). For compressed data that size comes from the codestream
(a JPEG's SOF, a JPEG 2000's SIZ, a PNG's IHDR as Pillow parses it on open), not from a
container that may disagree with it: a DICOM frame's JPEG, a TIFF tile's JPEG. Suwen checks
sizes itself rather than through Pillow's process-wide ``Image.MAX_IMAGE_PIXELS``, so no other
thread's Pillow settings change and a process that lowered or disabled Pillow's guard does not
weaken Suwen's.
"""

from __future__ import annotations

import math
import stat
import threading
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from suwen.codestreams import FrameHeader, frame_header
from suwen.errors import InputError

# Largest 2-D image decoded: Pillow's own decompression-bomb threshold (~89 megapixels), applied
# to every format before any pixel is read.
MAX_PIXELS = 89_478_485
# Largest decoded 2-D image in bytes, every sample and bit counted: an RGBA (or 32-bit) image at
# the pixel limit, which is also what Pillow holds for any 8-bit image of that size.
MAX_IMAGE_BYTES = 4 * MAX_PIXELS
# Most pixel data a reader may hold at once beyond one image: a NIfTI volume (nibabel may read
# a whole volume to cut one slice out of it), a deflated DICOM data set once inflated.
MAX_VOLUME_BYTES = 1 << 30
# Largest number of frames/slices a file may claim (a header can say anything).
MAX_FRAMES = 100_000

PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES
SUPPORTED = "PNG, JPEG, BMP, GIF, WebP, TIFF, DICOM (file or series folder) or NIfTI"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_NIFTI_MAGIC = (b"n+1\x00", b"ni1\x00", b"n+2\x00", b"ni2\x00")

FloatArray = npt.NDArray[np.float64]
_T = TypeVar("_T")
ByteArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Frame:
    """One 2-D view of an image file: the whole image, a frame, or a slice of a volume."""

    image: Image.Image
    label: str = ""  # "" for a plain 2-D image, else e.g. "axial 13/25", "frame 2/10"


def load_image(path: Path) -> Image.Image:
    """The representative RGB image of ``path``: the image itself, or a volume's middle slice.
    The image is remembered as loaded from the file as it was (``loaded_from``) when the file
    did not change while it was read."""
    path = Path(path)
    before = file_identity(path)
    image = load_frames(path, max_frames=1)[0].image
    if before is not None and file_identity(path) == before:
        _remember_source(image, before)
    return image


# -- which file an image was loaded from ------------------------------------------------------

# (resolved path, device, inode, size in bytes, modification time in ns): a file rewritten in
# place or replaced has another identity, so what was derived from its old content is not reused.
FileIdentity = tuple[str, int, int, int, int]

_sources: dict[int, FileIdentity] = {}  # id(image) -> the file it is the loaded image of
_sources_lock = threading.Lock()


def file_identity(path: Path) -> FileIdentity | None:
    """The identity of the regular file at ``path`` now; None for a folder or no file."""
    try:
        status = path.stat()
        resolved = str(path.resolve())
    except (OSError, RuntimeError):
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    return (resolved, status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


def loaded_from(image: Image.Image) -> FileIdentity | None:
    """The file ``image`` is ``load_image``'s result of (this very object, not a copy or a
    resized or converted image made from it), None otherwise. Like every cache of encoded
    images, this treats a loaded image as never edited in place."""
    with _sources_lock:
        return _sources.get(id(image))


def _remember_source(image: Image.Image, identity: FileIdentity) -> None:
    key = id(image)
    with _sources_lock:
        if key not in _sources:
            # The id may be reused once the image is gone: forget it then.
            weakref.finalize(image, _forget_source, key)
        _sources[key] = identity


def _forget_source(key: int) -> None:
    with _sources_lock:
        _sources.pop(key, None)


def load_frames(path: Path, max_frames: int = 3) -> list[Frame]:
    """Up to ``max_frames`` representative RGB views of ``path`` (one for a plain image)."""
    path = Path(path)
    if max_frames < 1:
        raise ValueError("max_frames must be at least 1")
    if path.is_dir():
        return _guard(path, lambda: _dicom_series_frames(path, max_frames))
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    reader = _reader_for(path)
    return _guard(path, lambda: reader(path, max_frames))


def is_image_path(path: Path) -> bool:
    """Whether a folder walk should treat ``path`` as an image (by suffix, or DICOM magic)."""
    name = path.name.lower()
    if name.endswith(IMAGE_SUFFIXES):
        return True
    return "." not in name and _is_dicom_file(path)


def is_dicom_series_dir(path: Path) -> bool:
    """A folder holding only DICOM files (text sidecars aside): one series."""
    files = [p for p in path.iterdir() if not p.name.startswith(".") and p.suffix != ".txt"]
    return bool(files) and all(p.is_file() and _is_dicom_file(p) for p in files)


# --- dispatch ---------------------------------------------------------------------------------

Reader = Callable[[Path, int], list[Frame]]


def _reader_for(path: Path) -> Reader:
    head = _read_head(path, 348)
    name = path.name.lower()
    if len(head) >= 132 and head[128:132] == b"DICM":
        return _dicom_file_frames
    if head[:4] in _TIFF_MAGIC:
        return _tiff_frames
    if name.endswith(NIFTI_SUFFIXES) or head[344:348] in _NIFTI_MAGIC:
        return _nifti_frames
    if name.endswith(DICOM_SUFFIXES):
        return _dicom_file_frames  # DICOM without the 128-byte preamble
    return _pil_frames


def _guard(path: Path, read: Callable[[], list[Frame]]) -> list[Frame]:
    """Run a reader, turning every decoder failure into a one-line InputError naming the file."""
    frames = guarded(path, read)
    if not frames:
        raise InputError(f"{path}: contains no image")
    return frames


def guarded(path: Path, read: Callable[[], _T]) -> _T:
    """``read()``, with every decoder failure turned into a one-line InputError naming ``path``."""
    try:
        return read()
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused, too many pixels (decompression bomb?): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not a readable image (supported: {SUPPORTED})") from exc
    except MemoryError as exc:
        raise InputError(f"{path}: too large to decode") from exc
    except Exception as exc:  # each decoder has its own exception types; all mean "unusable"
        raise InputError(f"{path}: corrupt or truncated image: {_one_line(exc)}") from exc


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_head(path: Path, size: int) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {_one_line(exc)}") from exc


def _is_dicom_file(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _check_size(
    path: Path, rows: int, columns: int, frames: int = 1, *, samples: int = 1, bits: int = 8
) -> None:
    """Refuse an image whose decoded size (each of ``frames`` images of ``rows`` x ``columns``
    pixels of ``samples`` samples of ``bits`` bits) is beyond the budget."""
    if rows <= 0 or columns <= 0:
        raise InputError(f"{path}: image has no pixels ({rows}x{columns})")
    image_bytes = rows * columns * max(samples, 1) * max((bits + 7) // 8, 1)
    if rows * columns > MAX_PIXELS or frames > MAX_FRAMES or image_bytes > MAX_IMAGE_BYTES:
        raise InputError(
            f"{path}: refused, {columns}x{rows} pixels x {samples} sample(s) of {bits} bits x "
            f"{frames} frame(s) exceeds the limit of {MAX_PIXELS} pixels or {MAX_IMAGE_BYTES} "
            "bytes per image (decompression bomb?)"
        )


def _refuse_volume(path: Path, what: str, size: int) -> None:
    if size > MAX_VOLUME_BYTES:
        raise InputError(
            f"{path}: refused, {what} would take {size} bytes, which exceeds the limit of "
            f"{MAX_VOLUME_BYTES} bytes (decompression bomb?)"
        )


def pick_indices(count: int, wanted: int) -> list[int]:
    """``wanted`` evenly spaced indices out of ``count``, centred (1 -> the middle one)."""
    wanted = max(1, min(wanted, count))
    return sorted({int((i + 0.5) * count / wanted) for i in range(wanted)})


# --- pixel conversion -------------------------------------------------------------------------


def to_uint8(array: npt.ArrayLike) -> ByteArray:
    """Scale any numeric array to 0..255: 8-bit data as is, wider data between its 0.5th and
    99.5th percentiles (robust to a few hot pixels), constant images to black."""
    data = np.asarray(array)
    if data.dtype == np.uint8:
        return data
    values = data.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8)
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:
        low, high = float(finite.min()), float(finite.max())
    return _scale(values, float(low), float(high))


def _scale(values: FloatArray, low: float, high: float) -> ByteArray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.nan_to_num(values, nan=low) - low) / (high - low)
    return np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_rgb(array: npt.ArrayLike) -> Image.Image:
    """A 2-D (gray) or H x W x C array as an 8-bit RGB image."""
    data = np.asarray(array)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim == 3 and data.shape[2] in (3, 4):
        data = data[:, :, :3]
    elif data.ndim != 2:
        raise ValueError(f"unexpected pixel array shape {data.shape}")
    image = Image.fromarray(np.ascontiguousarray(to_uint8(data)))
    return image.convert("RGB")


# --- Pillow (PNG, JPEG, ...) ------------------------------------------------------------------


def _pil_frames(path: Path, max_frames: int) -> list[Frame]:
    _check_declared_size(path)
    # Image.open parses only the header (a PNG's IHDR, a JPEG's SOF, ...); pixels are decoded
    # by load(), after the size it declared has passed the budget.
    with Image.open(path, formats=PIL_FORMATS) as image:
        width, height = image.size
        count = int(getattr(image, "n_frames", 1))
        samples, bits = _pil_layout(image.mode)
        _check_size(path, height, width, count, samples=samples, bits=bits)
        if count == 1:
            return [Frame(_pil_to_rgb(image))]
        frames = []
        for i in pick_indices(count, max_frames):
            image.seek(i)  # one image object, moved frame to frame; each is copied out
            frames.append(Frame(_pil_to_rgb(image), f"frame {i + 1}/{count}"))
        return frames


def _check_declared_size(path: Path) -> None:
    """A PNG's IHDR or a JPEG's SOF, read by Suwen before Pillow opens the file: an oversized
    image is refused whatever Pillow's process-wide limit is set to, and without its warning."""
    head = _read_head(path, _SEGMENT_HEAD)
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 26:
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        _check_size(path, height, width)  # bytes: checked in Pillow's own layout after open
        return
    try:
        header = frame_header(head) if head.startswith(b"\xff\xd8") else None
    except ValueError:
        return  # not this check's business: Pillow reports a broken header in its words
    if header is not None:
        _check_size(path, header.height, header.width)


def _pil_layout(mode: str) -> tuple[int, int]:
    """Samples per pixel and bits per sample Pillow holds an image of ``mode`` in."""
    if mode.startswith("I;16"):
        return 1, 16
    if mode in ("I", "F"):
        return 1, 32
    return Image.getmodebands(mode), 8


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # Wide grayscale: Pillow's convert("RGB") would clip, not scale.
        return to_rgb(np.asarray(image))
    return image.convert("RGB")


# --- TIFF -------------------------------------------------------------------------------------


# TIFF compressions whose segments are whole image codestreams (tifffile decodes them without
# an output size): JPEG, lossy JPEG (DNG) and JPEG 2000 (Aperio, generic). Their headers are
# read before decoding; other such codecs (WebP, JPEG XL, PNG, old-style JPEG...) are refused.
_TIFF_JPEG = frozenset({7, 34892})
_TIFF_J2K = frozenset({33003, 33004, 33005, 34712})
# Bytes read from the start of a segment to find its frame header (after any APPn segments).
_SEGMENT_HEAD = 1 << 18


def _tiff_frames(path: Path, max_frames: int) -> list[Frame]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InputError(f"{path}: TIFF holds no image")
        pages = [page for page in tif.series[0].pages if page is not None]
        if not pages:
            raise InputError(f"{path}: TIFF holds no image")
        chosen = [0] if len(pages) == 1 else pick_indices(len(pages), max_frames)
        for i in chosen:
            _check_tiff_page(path, pages[i], len(pages))
        if len(pages) == 1:
            return [Frame(_tiff_page_rgb(pages[0]))]
        return [Frame(_tiff_page_rgb(pages[i]), f"page {i + 1}/{len(pages)}") for i in chosen]


def _check_tiff_page(path: Path, page: Any, count: int) -> None:
    """The page's decoded size (depth, samples and bit depth counted) within the budget, and
    each image-codec segment no larger than the tile or strip it fills."""
    import tifffile

    key: Any = page.keyframe or page  # the page holding the tags a frame shares
    rows = int(key.imagelength) * max(int(key.imagedepth), 1)
    _check_size(
        path,
        rows,
        int(key.imagewidth),
        count,
        samples=int(key.samplesperpixel),
        bits=int(key.bitspersample),
    )
    compression = int(key.compression)
    if compression not in tifffile.TIFF.IMAGE_COMPRESSIONS:
        return  # tifffile decompresses these into a buffer of the segment's size
    if compression not in _TIFF_JPEG | _TIFF_J2K:
        name = getattr(key.compression, "name", str(compression))
        raise InputError(
            f"{path}: TIFF compression {name} is not supported (its decoded size cannot be "
            "checked before decoding)"
        )
    if key.is_tiled:
        width, height = int(key.tilewidth), int(key.tilelength)
    else:
        width = int(key.imagewidth)
        height = min(int(key.rowsperstrip), int(key.imagelength))
    with path.open("rb") as handle:
        for offset, length in zip(page.dataoffsets, page.databytecounts, strict=False):
            if not length:
                continue  # an empty tile: tifffile fills it without decoding
            handle.seek(int(offset))
            _check_segment(path, handle.read(min(int(length), _SEGMENT_HEAD)), width, height)


def _check_segment(path: Path, head: bytes, width: int, height: int) -> None:
    try:
        header = frame_header(head)
    except ValueError as exc:
        raise InputError(f"{path}: corrupt TIFF tile or strip: {exc}") from exc
    if header is None:
        raise InputError(f"{path}: a TIFF tile or strip is not the codestream it claims to be")
    if header.width > width or header.height > height:
        raise InputError(
            f"{path}: refused, a {header.kind} tile declares {header.width}x{header.height} "
            f"pixels in a {width}x{height} tile (decompression bomb?)"
        )


def _tiff_page_rgb(page: Any) -> Image.Image:
    data = np.asarray(page.asarray())
    if data.ndim == 3 and data.shape[0] in (3, 4) and data.shape[2] not in (3, 4):
        data = np.moveaxis(data, 0, -1)  # planar (separate) samples
    return to_rgb(data)


# --- NIfTI ------------------------------------------------------------------------------------

_PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # name, RAS axis held fixed


def _nifti_frames(path: Path, max_frames: int) -> list[Frame]:
    import nibabel as nib

    image: Any = nib.load(str(path))
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 2 or any(n <= 0 for n in shape):
        raise InputError(f"{path}: NIfTI has no pixels (shape {shape})")
    _check_nifti_data(path, image.header, shape)
    spatial = shape[:3]
    if len(spatial) == 2 or spatial[2] == 1:
        _check_size(path, spatial[1], spatial[0])
        index = (slice(None), slice(None)) + (0,) * (len(shape) - 2)
        return [Frame(to_rgb(np.rot90(np.asarray(image.dataobj[index]))))]
    largest_plane = max(spatial[0] * spatial[1], spatial[0] * spatial[2], spatial[1] * spatial[2])
    if largest_plane > MAX_PIXELS or max(spatial) > MAX_FRAMES:
        raise InputError(
            f"{path}: refused, a {'x'.join(map(str, shape))} volume exceeds the limit of "
            f"{MAX_PIXELS} pixels per slice or {MAX_FRAMES} slices (decompression bomb?)"
        )
    # For each array axis: the RAS axis it holds and whether it runs backwards, so slices read
    # the same way whatever orientation the file was stored in.
    orientation = nib.io_orientation(image.affine)  # type: ignore[no-untyped-call]
    ras_of = {axis: (int(ras), bool(flip < 0)) for axis, (ras, flip) in enumerate(orientation)}
    return [_nifti_plane(image, shape, ras_of, name, fixed) for name, fixed in _PLANES[:max_frames]]


def _check_nifti_data(path: Path, header: Any, shape: tuple[int, ...]) -> None:
    """The header's dimensions x bytes per voxel: all present in the file (uncompressed) and
    the first volume within the budget, since nibabel may read a whole volume to cut a slice."""
    itemsize = int(header.get_data_dtype().itemsize)
    volume = math.prod(shape[:3]) * itemsize
    _refuse_volume(
        path, f"a {'x'.join(map(str, shape[:3]))} volume of {itemsize}-byte voxels", volume
    )
    if path.name.lower().endswith(".gz"):
        return  # the compressed size says nothing; a short stream fails as it is read
    needed = int(header.get_data_offset()) + math.prod(shape) * itemsize
    available = path.stat().st_size
    if needed > available:
        raise InputError(
            f"{path}: truncated NIfTI, its header describes {needed} bytes of data but the file "
            f"holds {available}"
        )


def _nifti_plane(
    image: Any, shape: tuple[int, ...], ras_of: dict[int, tuple[int, bool]], name: str, fixed: int
) -> Frame:
    axis = next(a for a, (ras, _) in ras_of.items() if ras == fixed)
    count = shape[axis]
    position = count // 2
    index: list[int | slice] = [slice(None)] * 3 + [0] * (len(shape) - 3)
    index[axis] = position
    plane = np.asarray(image.dataobj[tuple(index)], dtype=np.float64)
    kept = [a for a in (0, 1, 2) if a != axis]
    if ras_of[kept[0]][0] > ras_of[kept[1]][0]:
        plane, kept = plane.T, kept[::-1]
    for dim, array_axis in enumerate(kept):
        if ras_of[array_axis][1]:
            plane = np.flip(plane, axis=dim)
    # Now indexed [first RAS axis, second RAS axis], both ascending; rot90 puts the second
    # (anterior or superior) at the top.
    return Frame(to_rgb(np.rot90(plane)), f"{name} {position + 1}/{count}")


# --- DICOM ------------------------------------------------------------------------------------


def _read_dicom(path: Path, *, header_only: bool = False) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_inflated_size(path)
    try:
        return pydicom.dcmread(path, force=True, stop_before_pixels=header_only)
    except InvalidDicomError as exc:
        raise InputError(f"{path}: not a DICOM file: {_one_line(exc)}") from exc


def _check_inflated_size(path: Path) -> None:
    """pydicom inflates a deflated data set whole, in one call, before parsing it: measure what
    it would inflate first, in bounded steps, and refuse a zip bomb."""
    from pydicom import uid
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with path.open("rb") as handle:
        try:
            read_preamble(handle, True)
            syntax = _read_file_meta_info(handle).get("TransferSyntaxUID")
        except Exception:  # not this check's business: dcmread reports a broken header
            return
        if syntax != uid.DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = 0
        try:
            while block := handle.read(1 << 20):
                while block:
                    inflated += len(inflater.decompress(block, 1 << 20))
                    _refuse_volume(path, "the deflated DICOM data set", inflated)
                    block = inflater.unconsumed_tail
        except zlib.error:
            return  # corrupt: dcmread reports it


def _dicom_file_frames(path: Path, max_frames: int) -> list[Frame]:
    dataset = _read_dicom(path)
    count = _checked_frame_count(path, dataset)
    if count == 1:
        return [Frame(_dicom_frame_rgb(path, dataset, 0, 1))]
    return [
        Frame(_dicom_frame_rgb(path, dataset, i, count), f"frame {i + 1}/{count}")
        for i in pick_indices(count, max_frames)
    ]


_PIXEL_KEYWORDS = {"PixelData": 0, "FloatPixelData": 32, "DoubleFloatPixelData": 64}


def _checked_frame_count(path: Path, dataset: Any) -> int:
    """The number of frames, after the header's image size has passed the budget and, for
    native (uncompressed) pixel data, the data really holds what the header describes."""
    keyword = next((k for k in _PIXEL_KEYWORDS if k in dataset), None)
    if keyword is None and "Rows" in dataset:
        raise InputError(
            f"{path}: the DICOM header describes an image but the file holds no pixel data "
            "(truncated?)"
        )
    if keyword is None:
        sop_class = dataset.get("SOPClassUID")
        kind = f" ({sop_class.name})" if sop_class is not None else ""
        raise InputError(f"{path}: DICOM file has no pixel data{kind}, nothing to show")
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        count = int(dataset.get("NumberOfFrames") or 1)
        samples = int(dataset.get("SamplesPerPixel") or 1)
        bits = int(dataset.get("BitsAllocated") or _PIXEL_KEYWORDS[keyword] or 8)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: DICOM image size missing or invalid: {_one_line(exc)}") from exc
    _check_size(path, rows, columns, count, samples=samples, bits=bits)
    if not _is_encapsulated(dataset):
        _check_native_length(path, dataset, keyword)
    return count


def _check_native_length(path: Path, dataset: Any, keyword: str) -> None:
    from pydicom.pixels.utils import get_expected_length

    try:
        expected = int(get_expected_length(dataset, "bytes"))
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: DICOM image size missing or invalid: {_one_line(exc)}") from exc
    held = len(dataset[keyword].value or b"")
    if held < expected:
        raise InputError(
            f"{path}: truncated DICOM pixel data, {held} bytes where Rows, Columns, "
            f"SamplesPerPixel, BitsAllocated and NumberOfFrames describe {expected}"
        )


def _transfer_syntax(dataset: Any) -> Any:
    file_meta = getattr(dataset, "file_meta", None)
    return file_meta.get("TransferSyntaxUID") if file_meta is not None else None


def _is_encapsulated(dataset: Any) -> bool:
    syntax = _transfer_syntax(dataset)
    if syntax is not None:
        return bool(syntax.is_encapsulated)
    return "PixelData" in dataset and bool(dataset["PixelData"].is_undefined_length)


def _dicom_frame_rgb(path: Path, dataset: Any, index: int, count: int) -> Image.Image:
    array = _decode_dicom_frame(path, dataset, index, count)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        from pydicom.pixels.processing import apply_color_lut

        return to_rgb(apply_color_lut(array, dataset))
    if array.ndim == 3:
        return to_rgb(array)  # pydicom already converted YBR to RGB
    gray = _apply_voi(array, dataset)
    if photometric == "MONOCHROME1":
        gray = 255 - gray  # MONOCHROME1: the lowest value is displayed white
    return to_rgb(gray)


def _decode_dicom_frame(path: Path, dataset: Any, index: int, count: int) -> Any:
    from pydicom.pixels.utils import pixel_array

    encoded = _checked_encoded_frame(path, dataset, index, count)
    try:
        # Always by index: pydicom then decodes exactly the frame whose header was checked.
        return pixel_array(dataset, index=index)
    except (RuntimeError, NotImplementedError) as exc:
        # pydicom's plugins refuse some real-world JPEG streams (12-bit JPEG Extended, slightly
        # malformed scan headers) that libjpeg-turbo inside imagecodecs decodes fine.
        fallback = None if encoded is None else _imagecodecs_frame(dataset, encoded)
        if fallback is None:
            raise InputError(f"{path}: cannot decode DICOM pixel data: {_one_line(exc)}") from exc
        return fallback


def _checked_encoded_frame(path: Path, dataset: Any, index: int, count: int) -> bytes | None:
    """Frame ``index`` of encapsulated pixel data (None for native data), after the size its
    codestream declares has passed the budget and matched the DICOM header's Rows/Columns."""
    from pydicom import uid
    from pydicom.encaps import get_frame

    if not _is_encapsulated(dataset):
        return None
    offsets = None
    if "ExtendedOffsetTable" in dataset and "ExtendedOffsetTableLengths" in dataset:
        offsets = (dataset.ExtendedOffsetTable, dataset.ExtendedOffsetTableLengths)
    # The same call, with the same arguments, that pydicom's decoders make.
    frame = get_frame(dataset.PixelData, index, extended_offsets=offsets, number_of_frames=count)
    if _transfer_syntax(dataset) == uid.RLELossless:
        return frame  # the RLE decoder fills a buffer sized from the checked Rows/Columns
    which = f"frame {index + 1}/{count}" if count > 1 else "pixel data"
    try:
        header = frame_header(frame)
    except ValueError as exc:
        raise InputError(f"{path}: corrupt DICOM {which}: {exc}") from exc
    if header is None:
        raise InputError(f"{path}: DICOM {which} is not a JPEG or JPEG 2000 codestream")
    _check_size(path, header.height, header.width, count, samples=header.samples, bits=header.bits)
    _check_frame_matches(path, which, header, int(dataset.Rows), int(dataset.Columns))
    return frame


def _check_frame_matches(
    path: Path, which: str, header: FrameHeader, rows: int, columns: int
) -> None:
    if (header.height, header.width) != (rows, columns):
        raise InputError(
            f"{path}: refused, the {header.kind} codestream of its {which} is "
            f"{header.width}x{header.height} pixels but the DICOM header says {columns}x{rows}"
        )


def _imagecodecs_frame(dataset: Any, frame: bytes) -> Any | None:
    from pydicom import uid

    try:
        import imagecodecs
    except ImportError:
        return None
    decoders: dict[Any, Callable[[bytes], Any]] = {
        uid.JPEGBaseline8Bit: imagecodecs.jpeg8_decode,
        uid.JPEGExtended12Bit: imagecodecs.jpeg8_decode,
        uid.JPEGLossless: imagecodecs.ljpeg_decode,
        uid.JPEGLosslessSV1: imagecodecs.ljpeg_decode,
        uid.JPEGLSLossless: imagecodecs.jpegls_decode,
        uid.JPEGLSNearLossless: imagecodecs.jpegls_decode,
        uid.JPEG2000Lossless: imagecodecs.jpeg2k_decode,
        uid.JPEG2000: imagecodecs.jpeg2k_decode,
    }
    decode = decoders.get(_transfer_syntax(dataset))
    if decode is None:
        return None
    # ``frame`` passed _checked_encoded_frame: its codestream's size is within the budget.
    return np.asarray(decode(frame))


def _apply_voi(array: Any, dataset: Any) -> ByteArray:
    """Modality LUT (rescale to e.g. Hounsfield units), then the file's VOI LUT or window, then
    8 bits. Without a VOI the data are stretched."""
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(array, dataset), dtype=np.float64)
    has_voi = "VOILUTSequence" in dataset or (
        "WindowCenter" in dataset and "WindowWidth" in dataset
    )
    if not has_voi:
        return to_uint8(values)
    try:
        windowed = np.asarray(apply_voi_lut(values, dataset), dtype=np.float64)
        # The VOI's output range: the same function applied to the most extreme inputs.
        extremes = np.array([-1e30, 1e30], dtype=np.float64)
        low, high = np.asarray(apply_voi_lut(extremes, dataset), dtype=np.float64)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return to_uint8(values)  # a broken VOI module: show the data rather than refuse it
    if not high > low:
        return to_uint8(windowed)
    return _scale(windowed, float(low), float(high))


def _dicom_series_frames(folder: Path, max_frames: int) -> list[Frame]:
    files = _series_files(folder)
    ordered = dicom_series_headers(folder, files)
    count = len(ordered)
    frames = []
    for i in pick_indices(count, max_frames):
        image = _guard(ordered[i][0], partial(_dicom_file_frames, ordered[i][0], 1))[0].image
        frames.append(Frame(image, f"slice {i + 1}/{count}" if count > 1 else ""))
    return frames


def _slice_sort_key(path: Path, header: Any) -> tuple[float, float, str]:
    """Order slices by InstanceNumber, then position along the slice normal, then file name."""
    instance = header.get("InstanceNumber")
    return (
        float(instance) if instance is not None else float("inf"),
        _position_along_normal(header),
        path.name,
    )


def _position_along_normal(header: Any) -> float:
    position: Sequence[Any] | None = header.get("ImagePositionPatient")
    orientation: Sequence[Any] | None = header.get("ImageOrientationPatient")
    if not position or len(position) != 3:
        return 0.0
    if not orientation or len(orientation) != 6:
        return float(position[2])
    row = np.array([float(v) for v in orientation[:3]])
    column = np.array([float(v) for v in orientation[3:]])
    return float(np.dot(np.cross(row, column), [float(v) for v in position]))


def _series_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    files = [p for p in files if p.suffix.lower() != ".txt"]
    if not files:
        raise InputError(f"{folder}: empty folder, no DICOM series in it")
    not_dicom = [p.name for p in files if not _is_dicom_file(p)]
    if not_dicom:
        raise InputError(
            f"{folder}: a folder is read as one DICOM series, but {not_dicom[0]} is not DICOM"
        )
    return files


def dicom_series_headers(folder: Path, files: list[Path] | None = None) -> list[tuple[Path, Any]]:
    """The image slices of a series folder as ``(file, header)``, in slice order (pixel data
    not read)."""
    files = _series_files(folder) if files is None else files
    headers = [(path, _read_dicom(path, header_only=True)) for path in files]
    # Slices only: a series folder may also hold reports or presentation states.
    headers = [(path, header) for path, header in headers if "Rows" in header]
    if not headers:
        raise InputError(f"{folder}: no DICOM file in this series folder holds an image")
    return sorted(headers, key=lambda item: _slice_sort_key(item[0], item[1]))


def dicom_position_mm(header: Any) -> float | None:
    """A slice's position along its normal in millimetres (None: the header does not say)."""
    if not header.get("ImagePositionPatient"):
        return None
    return _position_along_normal(header)


def dicom_slice_values(path: Path) -> tuple[npt.NDArray[np.float32], Any]:
    """One single-frame grayscale DICOM slice in its modality's units (Hounsfield units for
    CT), after the same size, length and codestream checks as every other read, and its
    header. Raises InputError naming the file."""

    def read() -> tuple[npt.NDArray[np.float32], Any]:
        from pydicom.pixels.processing import apply_modality_lut

        dataset = _read_dicom(path)
        count = _checked_frame_count(path, dataset)
        if count != 1 or int(dataset.get("SamplesPerPixel") or 1) != 1:
            raise InputError(f"{path}: a volume slice must be one grayscale frame")
        array = _decode_dicom_frame(path, dataset, 0, 1)
        values = np.asarray(apply_modality_lut(array, dataset), dtype=np.float32)
        return values, dataset

    return guarded(path, read)


def is_multiframe_dicom(path: Path) -> bool:
    """A DICOM file whose header says it holds several frames (read without its pixel data;
    a file whose header cannot be read is left to the loader to report)."""
    if path.is_dir() or not _is_dicom_file(path):
        return False
    try:
        return dicom_frame_count(read_dicom_header(path)) > 1
    except InputError:
        return False


def dicom_frame_count(header: Any) -> int:
    """NumberOfFrames as a number (1 when absent or not a number)."""
    try:
        return max(1, int(str(header.get("NumberOfFrames") or 1)))
    except ValueError:
        return 1


def dicom_frames_values(path: Path) -> tuple[npt.NDArray[np.float32], Any]:
    """Every frame of one multi-frame grayscale DICOM file in its modality's units (each
    frame's own rescale from the functional groups of an enhanced file), and its header. The
    header's sizes, native data's length and the whole float32 volume pass the budget before
    anything is allocated; each frame's codestream is checked before it is decoded. Raises
    InputError naming the file."""

    def read() -> tuple[npt.NDArray[np.float32], Any]:
        dataset = _read_dicom(path)
        count = _checked_frame_count(path, dataset)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        if int(dataset.get("SamplesPerPixel") or 1) != 1:
            raise InputError(f"{path}: the frames of a volume must be grayscale")
        _refuse_volume(path, f"{count} frames of {columns}x{rows}", count * rows * columns * 4)
        values = np.empty((count, rows, columns), dtype=np.float32)
        for index in range(count):
            frame = _decode_dicom_frame(path, dataset, index, count)
            values[index] = _frame_modality_values(frame, dataset, index)
        return values, dataset

    return guarded(path, read)


def _frame_modality_values(frame: Any, dataset: Any, index: int) -> Any:
    from pydicom.pixels.processing import apply_modality_lut

    rescale = dicom_frame_attributes(dataset, index, ("RescaleSlope", "RescaleIntercept"))
    if len(rescale) == 2:
        values = np.asarray(frame, dtype=np.float64) * float(rescale["RescaleSlope"])
        values += float(rescale["RescaleIntercept"])
    else:
        values = np.asarray(apply_modality_lut(frame, dataset), dtype=np.float64)
    if "DoseGridScaling" in dataset:  # RT dose grids: stored integers x scaling = Gy
        values *= float(dataset.DoseGridScaling)
    return values


# Where an enhanced multi-frame file keeps each attribute: the functional group sequence
# (per frame, else shared by all frames) holding it.
_FUNCTIONAL_GROUP_OF = {
    "ImagePositionPatient": "PlanePositionSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "SliceThickness": "PixelMeasuresSequence",
    "SpacingBetweenSlices": "PixelMeasuresSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
}


def dicom_frame_attributes(header: Any, index: int, names: Sequence[str]) -> dict[str, Any]:
    """The ``names`` that apply to frame ``index``: from its per-frame functional group, else
    the shared one, else the top-level header (classic files); absent ones are left out."""
    found: dict[str, Any] = {}
    for name in names:
        for item in _frame_group_items(header, index, _FUNCTIONAL_GROUP_OF.get(name, "")):
            value = item.get(name)
            if value is not None and value != "":
                found[name] = value
                break
    return found


def _frame_group_items(header: Any, index: int, group: str) -> list[Any]:
    items: list[Any] = []
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    shared = header.get("SharedFunctionalGroupsSequence") or []
    for groups in ([per_frame[index]] if index < len(per_frame) else [], shared[:1]):
        for item in groups:
            sequence = item.get(group) if group else None
            if sequence:
                items.append(sequence[0])
    return [*items, header]


def nifti_volume(path: Path) -> tuple[Any, npt.NDArray[np.float32]]:
    """A 3-D NIfTI volume as ``(image, voxels as float32)`` in its stored orientation, after its
    header's sizes (and the float copy's) passed the budget. Raises InputError naming the file;
    a 2-D image or a single slice is refused (it is not a volume)."""

    def read() -> tuple[Any, npt.NDArray[np.float32]]:
        import nibabel as nib

        image: Any = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
        if len(shape) < 3 or any(n <= 0 for n in shape) or min(shape[:3]) < 2:
            raise InputError(f"{path}: not a 3-D volume (shape {shape})")
        _check_nifti_data(path, image.header, shape)
        spatial = shape[:3]
        planes = (spatial[0] * spatial[1], spatial[0] * spatial[2], spatial[1] * spatial[2])
        if max(planes) > MAX_PIXELS or max(spatial) > MAX_FRAMES:
            raise InputError(
                f"{path}: refused, a {'x'.join(map(str, shape))} volume exceeds the limit of "
                f"{MAX_PIXELS} pixels per slice or {MAX_FRAMES} slices (decompression bomb?)"
            )
        # nibabel may hand scaled data over as 64-bit floats before the 32-bit copy.
        _refuse_volume(path, "the volume as 64-bit floats", math.prod(spatial) * 8)
        index: tuple[slice | int, ...] = (slice(None),) * 3 + (0,) * (len(shape) - 3)
        return image, np.asarray(image.dataobj[index], dtype=np.float32)

    return guarded(path, read)


def read_dicom_header(path: Path) -> Any:
    """A DICOM file's header without its pixel data (InputError naming the file)."""
    return guarded(path, lambda: _read_dicom(path, header_only=True))
