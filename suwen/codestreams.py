"""Frame headers of compressed images, read from the codestream itself without decoding it.

A decoder allocates what the codestream's own header declares (a JPEG's SOF segment, a JPEG
2000's SIZ segment), whatever a container around it says: a DICOM header can claim 8x8 pixels
for a frame whose JPEG declares 12000x12000. Reading these few bytes first lets the loader
refuse a frame before any decoder sees it.
"""

from __future__ import annotations

from dataclasses import dataclass

# JPEG start-of-frame markers (ITU T.81 B.1.1.3): SOF0..SOF15 without DHT (C4), JPG (C8) and DAC
# (CC); F7 is JPEG-LS's SOF55 (T.87), with the same layout.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
# Markers without a length field: TEM and RST0..RST7.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# T.800 numbers tiles with a 16-bit index; more tiles than that is not a valid codestream,
# and a decoder would allocate bookkeeping for each one.
_J2K_MAX_TILES = 65_535


@dataclass(frozen=True)
class FrameHeader:
    """What a codestream says it will decode to."""

    kind: str  # "JPEG" or "JPEG 2000"
    width: int
    height: int
    samples: int  # components per pixel
    bits: int  # bits per sample (the widest component's)

    @property
    def bytes_per_sample(self) -> int:
        return (self.bits + 7) // 8


def frame_header(data: bytes) -> FrameHeader | None:
    """The header of a JPEG, JPEG-LS, JPEG 2000 codestream or JP2 file; None when ``data``
    starts as none of them. A recognised stream with a missing or malformed header raises
    ValueError."""
    if data.startswith(_JPEG_SOI):
        return _jpeg_header(data)
    if data.startswith(_J2K_SOC_SIZ):
        return _j2k_header(data)
    if data.startswith(_JP2_SIGNATURE):
        return _j2k_header(_jp2_codestream(data))
    return None


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def _jpeg_header(data: bytes) -> FrameHeader:
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            raise ValueError(f"JPEG: marker expected at byte {at}")
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        if marker in _JPEG_STANDALONE:
            at += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            raise ValueError("JPEG: no frame header before the image data")
        length = _u16(data, at + 2)
        if length < 2:
            raise ValueError(f"JPEG: invalid segment length at byte {at}")
        if marker in _JPEG_SOF:
            return _jpeg_sof(data[at + 4 : at + 2 + length])
        at += 2 + length
    raise ValueError("JPEG: truncated before its frame header")


def _jpeg_sof(segment: bytes) -> FrameHeader:
    if len(segment) < 6:
        raise ValueError("JPEG: truncated frame header")
    bits, height, width, samples = segment[0], _u16(segment, 1), _u16(segment, 3), segment[5]
    if height == 0:
        # The height would come in a DNL segment after the first scan: decoders then grow
        # their buffer as they go, which cannot be bounded up front.
        raise ValueError("JPEG: frame height deferred to a DNL segment is not supported")
    return FrameHeader("JPEG", width, height, samples, bits)


def _j2k_header(data: bytes) -> FrameHeader:
    # SOC, then SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz, Ssiz...
    if len(data) < 42:
        raise ValueError("JPEG 2000: truncated SIZ segment")
    width, height = _u32(data, 8) - _u32(data, 16), _u32(data, 12) - _u32(data, 20)
    tile_w, tile_h = _u32(data, 24), _u32(data, 28)
    tile_x0, tile_y0 = _u32(data, 32), _u32(data, 36)
    samples = _u16(data, 40)
    if width <= 0 or height <= 0 or tile_w == 0 or tile_h == 0 or samples == 0:
        raise ValueError("JPEG 2000: invalid image or tile size in SIZ")
    if len(data) < 42 + 3 * samples:
        raise ValueError("JPEG 2000: truncated SIZ segment")
    tiles = -(-(_u32(data, 8) - tile_x0) // tile_w) * -(-(_u32(data, 12) - tile_y0) // tile_h)
    if tiles > _J2K_MAX_TILES:
        raise ValueError(f"JPEG 2000: {tiles} tiles, more than a codestream may hold")
    bits = max((data[42 + 3 * c] & 0x7F) + 1 for c in range(samples))
    return FrameHeader("JPEG 2000", width, height, samples, bits)


def _jp2_codestream(data: bytes) -> bytes:
    """The contiguous codestream box (``jp2c``) of a JP2 file."""
    at = 0
    while at + 8 <= len(data):
        length, kind = _u32(data, at), data[at + 4 : at + 8]
        header = 8
        if length == 1:  # 64-bit length follows
            length, header = int.from_bytes(data[at + 8 : at + 16], "big"), 16
        elif length == 0:  # box runs to the end of the file
            length = len(data) - at
        if kind == b"jp2c":
            return data[at + header : at + length]
        if length < header:
            raise ValueError(f"JP2: invalid box length at byte {at}")
        at += length
    raise ValueError("JP2: no codestream box")
