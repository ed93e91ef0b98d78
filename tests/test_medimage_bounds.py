"""Hostile image files are refused, in one line naming the file, before any decoder allocates
what they claim: sizes come from the codestream itself (JPEG SOF, JPEG 2000 SIZ, PNG IHDR), also
inside DICOM and TIFF, and every decoder path (Pillow, pydicom, the imagecodecs fallback,
tifffile, nibabel, pydicom's inflater) is bounded. Peak memory is measured in a subprocess."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import imagecodecs
import nibabel
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image
from pydicom import uid
from pydicom.encaps import encapsulate

from suwen import medimage
from suwen.codestreams import frame_header
from suwen.errors import InputError
from suwen.evaluate.benchmarks import Sample
from suwen.evaluate.runner import plain_responder
from suwen.llm.images import prepare_image
from suwen.medimage import MAX_PIXELS, load_frames, load_image
from tests.fake_model import FakeModel

nib: Any = nibabel
HUGE = 12_000  # 12000 x 12000 = 144 Mpx: above the limit, below Pillow's hard error (2x)


# --- building hostile files -------------------------------------------------------------------


def jpeg_bytes(size: tuple[int, int] = (64, 64), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, "JPEG", quality=20)
    return buffer.getvalue()


def sof_offset(jpeg: bytes) -> int:
    """Offset of the SOF segment's height field (walked independently of suwen.codestreams)."""
    at = 2
    while True:
        marker, length = jpeg[at + 1], struct.unpack(">H", jpeg[at + 2 : at + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return at + 5
        at += 2 + length


def with_jpeg_size(jpeg: bytes, width: int, height: int) -> bytes:
    at = sof_offset(jpeg)
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]


def with_j2k_size(j2k: bytes, width: int, height: int) -> bytes:
    # SIZ: Xsiz@8 Ysiz@12 (offsets 0), tile size XTsiz@24 YTsiz@28 = the image: one tile.
    patched = bytearray(j2k)
    patched[8:16] = struct.pack(">II", width, height)
    patched[24:32] = struct.pack(">II", width, height)
    return bytes(patched)


def dicom_holding(
    template: Path, path: Path, frame: bytes, syntax: Any, rows: int = 8, columns: int = 8
) -> Path:
    """A real CT data set whose pixel data is replaced by one encapsulated 8-bit frame."""
    dataset = pydicom.dcmread(template)
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.Rows, dataset.Columns = rows, columns
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = encapsulate([frame])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    dataset.save_as(path, enforce_file_format=True)
    return path


def png_claiming(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def patch_tiff_tags(path: Path, values: dict[str, int]) -> Path:
    """Overwrite inline tag values of the first page (tifffile wrote them as SHORT or LONG)."""
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags  # type: ignore[union-attr]
        places = {name: (tags[name].valueoffset, tags[name].dtype) for name in values}
    for name, value in values.items():
        offset, dtype = places[name]
        fmt = "<H" if int(dtype) == 3 else "<I"
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw))
    return path


def nifti_claiming(path: Path, shape: tuple[int, ...], dtype: Any = np.int16) -> Path:
    """A NIfTI whose header claims ``shape`` but holds only a few voxels."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_qform(np.eye(4), 1)
    header["vox_offset"] = 352
    data = header.binaryblock + b"\0" * 4 + b"\0" * 4096
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def build_hostile(folder: Path, shared_data: Path) -> dict[str, Path]:
    dicom = shared_data / "imaging" / "dicom"
    ct = dicom / "CT_small.dcm"
    big_jpeg = jpeg_bytes((HUGE, HUGE))  # a real, complete 144-megapixel JPEG
    j2k = imagecodecs.jpeg2k_encode(np.full((8, 8), 90, np.uint8), codecformat="J2K")

    lossy = pydicom.dcmread(dicom / "JPEG-lossy.dcm")  # 12-bit: only imagecodecs decodes it
    frame = pydicom.encaps.get_frame(lossy.PixelData, 0, number_of_frames=1)
    lossy.PixelData = encapsulate([with_jpeg_size(frame, HUGE, HUGE)])
    lossy.save_as(folder / "jpeg12-imagecodecs-only.dcm")

    tiff = folder / "rgba16.tif"  # 8000 x 8000 x 4 x 16 bits = 64 Mpx but 512 MB
    tifffile.imwrite(
        tiff,
        np.zeros((8, 8, 4), np.uint16),
        photometric="rgb",
        extrasamples=[2],
        compression="zlib",
    )
    patch_tiff_tags(tiff, {"ImageWidth": 8000, "ImageLength": 8000, "RowsPerStrip": 8000})

    tiled = folder / "jpeg-tiles.tif"
    tifffile.imwrite(tiled, np.full((32, 32), 90, np.uint8), tile=(16, 16), compression="jpeg")
    raw = tiled.read_bytes()
    soi = raw.index(b"\xff\xd8\xff")  # the first tile's codestream
    end = raw.index(b"\xff\xd9", soi) + 2
    tiled.write_bytes(raw[:soi] + with_jpeg_size(raw[soi:end], HUGE, HUGE) + raw[end:])

    native = pydicom.dcmread(ct)
    native.Rows = native.Columns = 4096  # 32 MB of 16-bit pixels described, 32 KB held
    native.save_as(folder / "native-truncated.dcm")

    return {
        "dicom-8x8-holding-12000x12000-jpeg": dicom_holding(
            ct, folder / "jpeg-in-dicom.dcm", big_jpeg, uid.JPEGBaseline8Bit
        ),
        "dicom-8x8-holding-j2k-siz-12000x12000": dicom_holding(
            ct, folder / "j2k-in-dicom.dcm", with_j2k_size(j2k, HUGE, HUGE), uid.JPEG2000Lossless
        ),
        "dicom-12bit-jpeg-imagecodecs-only": folder / "jpeg12-imagecodecs-only.dcm",
        "dicom-native-truncated": folder / "native-truncated.dcm",
        "png-ihdr-12000x12000": png_claiming(folder / "wide.png", HUGE, HUGE),
        "jpeg-sof-12000x12000": _write(
            folder / "wide.jpg", with_jpeg_size(jpeg_bytes(), HUGE, HUGE)
        ),
        "tiff-8000x8000-rgba-16bit": tiff,
        "tiff-jpeg-tile-12000x12000": tiled,
        "nifti-volume-over-budget": nifti_claiming(folder / "volume.nii.gz", (4000, 4000, 100)),
        "nifti-truncated": nifti_claiming(folder / "short.nii", (256, 256, 128)),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


EXPECTED = {
    "dicom-8x8-holding-12000x12000-jpeg": "exceeds the limit",
    "dicom-8x8-holding-j2k-siz-12000x12000": "exceeds the limit",
    "dicom-12bit-jpeg-imagecodecs-only": "exceeds the limit",
    "dicom-native-truncated": "truncated DICOM pixel data",
    "png-ihdr-12000x12000": "exceeds the limit",
    "jpeg-sof-12000x12000": "exceeds the limit",
    "tiff-8000x8000-rgba-16bit": "exceeds the limit",
    "tiff-jpeg-tile-12000x12000": "tile declares 12000x12000 pixels in a 16x16 tile",
    "nifti-volume-over-budget": "exceeds the limit",
    "nifti-truncated": "truncated NIfTI",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    return build_hostile(tmp_path_factory.mktemp("hostile"), shared_data)


def refusal(path: Path, load: Callable[[Path], object] = load_frames) -> str:
    with pytest.raises(InputError) as excinfo:
        load(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


# --- each hostile file is refused with one line -----------------------------------------------


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_hostile_file_is_refused_in_one_line(hostile: dict[str, Path], case: str) -> None:
    assert EXPECTED[case] in refusal(hostile[case])


def test_refusals_happen_before_any_decoder_allocates(
    hostile: dict[str, Path], shared_data: Path, tmp_path: Path
) -> None:
    """In a fresh process, after decoding real files of every kind once (so every decoder is
    imported and warm), the hostile files raise the process's peak RSS by less than 40 MB; the
    smallest of them would need 144 MB decoded (8-bit 12000 x 12000)."""
    warm = [
        shared_data / "imaging" / "dicom" / "JPEG-lossy.dcm",
        shared_data / "imaging" / "dicom" / "CT_small.dcm",
        shared_data / "imaging" / "dicom" / "MR_small_RLE.dcm",
        shared_data / "imaging" / "nifti" / "anatomical.nii",
        sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0],
    ]
    small_tiff = tmp_path / "small.tif"
    tifffile.imwrite(small_tiff, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    warm.append(small_tiff)
    script = f"""
import json, resource, sys
from pathlib import Path
from suwen.errors import InputError
from suwen.evaluate.benchmarks import Sample
from suwen.evaluate.runner import plain_responder
from suwen.medimage import load_frames
for path in {[str(p) for p in warm]!r}:
    load_frames(Path(path))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = {{}}
for case, path in {json.dumps({k: str(v) for k, v in hostile.items()})}.items():
    try:
        load_frames(Path(path))
        outcome = "loaded"
    except InputError as exc:
        outcome = str(exc)
    report[case] = [outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base]
print(json.dumps(report))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    report = json.loads(done.stdout)
    assert set(report) == set(EXPECTED)
    for case, (outcome, growth_kb) in report.items():
        assert EXPECTED[case] in outcome, (case, outcome)
        assert growth_kb < 40 * 1024, f"{case}: peak RSS grew by {growth_kb // 1024} MB"


@pytest.mark.parametrize("case", ["png-ihdr-12000x12000", "jpeg-sof-12000x12000"])
def test_oversized_png_and_jpeg_are_refused_before_pillow_opens_them(
    hostile: dict[str, Path], case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever Pillow's process-wide limit says (here: disabled), and without its warning.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "exceeds the limit" in refusal(hostile[case])


# --- every decoder path is bounded ------------------------------------------------------------


def test_imagecodecs_fallback_never_sees_an_oversized_frame(
    hostile: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = imagecodecs.jpeg8_decode

    def counting(data: bytes, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(imagecodecs, "jpeg8_decode", counting)
    refusal(hostile["dicom-12bit-jpeg-imagecodecs-only"])
    assert calls == []


def test_jpeg_lossy_dicom_still_decodes_through_the_imagecodecs_fallback(
    shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = imagecodecs.jpeg8_decode
    monkeypatch.setattr(
        imagecodecs, "jpeg8_decode", lambda data, *a, **k: calls.append(1) or real(data, *a, **k)
    )
    image = load_image(shared_data / "imaging" / "dicom" / "JPEG-lossy.dcm")
    assert image.size == (256, 1024) and calls == [1]


def test_dicom_frame_whose_codestream_disagrees_with_the_header_is_refused(
    shared_data: Path, tmp_path: Path
) -> None:
    ct = shared_data / "imaging" / "dicom" / "CT_small.dcm"
    path = dicom_holding(ct, tmp_path / "mismatch.dcm", jpeg_bytes((64, 48)), uid.JPEGBaseline8Bit)
    assert "codestream of its pixel data is 64x48 pixels but the DICOM header says 8x8" in (
        refusal(path)
    )
    matching = dicom_holding(
        ct, tmp_path / "match.dcm", jpeg_bytes((64, 48)), uid.JPEGBaseline8Bit, rows=48, columns=64
    )
    assert load_image(matching).size == (64, 48)


def test_dicom_frame_that_is_no_codestream_or_is_cut_is_refused(
    shared_data: Path, tmp_path: Path
) -> None:
    ct = shared_data / "imaging" / "dicom" / "CT_small.dcm"
    garbage = dicom_holding(ct, tmp_path / "garbage.dcm", b"\x00" * 64, uid.JPEGBaseline8Bit)
    assert "is not a JPEG or JPEG 2000 codestream" in refusal(garbage)
    cut = dicom_holding(ct, tmp_path / "cut.dcm", jpeg_bytes()[:12], uid.JPEGBaseline8Bit)
    assert "corrupt DICOM pixel data: JPEG: truncated" in refusal(cut)


def test_deflated_dicom_is_inflated_within_the_budget(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = pydicom.dcmread(shared_data / "imaging" / "dicom" / "CT_small.dcm")
    dataset.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    dataset.save_as(path, enforce_file_format=True)
    plain = np.asarray(load_image(shared_data / "imaging" / "dicom" / "CT_small.dcm"))
    assert np.array_equal(np.asarray(load_image(path)), plain)

    # The same file is a bomb once the budget is below its inflated size (~40 KB).
    monkeypatch.setattr(medimage, "MAX_VOLUME_BYTES", 16_384)
    assert "the deflated DICOM data set would take" in refusal(path)


def test_tiff_with_an_unboundable_codec_is_refused_and_wide_tiffs_within_budget_load(
    tmp_path: Path,
) -> None:
    webp = tmp_path / "webp.tif"
    tifffile.imwrite(webp, np.zeros((16, 16, 3), np.uint8), photometric="rgb", compression="webp")
    assert "TIFF compression WEBP is not supported" in refusal(webp)
    rgba16 = tmp_path / "rgba16.tif"
    data = np.arange(32 * 32 * 4, dtype=np.uint16).reshape(32, 32, 4)
    tifffile.imwrite(rgba16, data, photometric="rgb", extrasamples=[2], compression="zlib")
    assert load_image(rgba16).size == (32, 32)
    tiled = tmp_path / "tiles.tif"
    tifffile.imwrite(tiled, np.full((32, 32), 90, np.uint8), tile=(16, 16), compression="jpeg")
    assert load_image(tiled).size == (32, 32)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_request_encoding_refuses_an_oversized_lazy_image_before_decoding(tmp_path: Path) -> None:
    path = png_claiming(tmp_path / "lazy.png", HUGE, HUGE)
    refused = pytest.raises(InputError, match=r"lazy\.png: refused, 12000x12000 pixels exceeds")
    with Image.open(path) as lazy, refused:  # Pillow only warns below twice its limit
        prepare_image(lazy, 3136, 1_000_000)
    assert HUGE * HUGE > MAX_PIXELS


def test_eval_loads_benchmark_images_through_the_same_loader(
    hostile: dict[str, Path], shared_data: Path
) -> None:
    def sample(image: Path) -> Sample:
        return Sample(
            id="q1",
            benchmark="VQA-RAD",
            question="Is it normal?",
            images=[str(image)],
            gold="yes",
            kind="closed",
        )

    model = FakeModel()
    respond = plain_responder(model)
    jpeg = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0]
    asyncio.run(respond(sample(jpeg)))
    assert model.calls[-1].images == 1
    bomb = hostile["dicom-8x8-holding-12000x12000-jpeg"]
    with pytest.raises(InputError, match="exceeds the limit"):
        asyncio.run(respond(sample(bomb)))
    assert len(model.calls) == 1, "a refused image never reaches the model"


# --- the codestream header reader -------------------------------------------------------------


def test_frame_header_reads_jpeg_sof_as_pillow_does(shared_data: Path) -> None:
    path = sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[3]
    header = frame_header(path.read_bytes())
    with Image.open(path) as image:
        assert header is not None and (header.width, header.height) == image.size
        assert header.samples == len(image.getbands()) and header.bits == 8


def test_frame_header_reads_j2k_and_jp2() -> None:
    data = np.zeros((30, 40, 3), np.uint16)
    for fmt in ("J2K", "JP2"):
        header = frame_header(imagecodecs.jpeg2k_encode(data, codecformat=fmt, bitspersample=12))
        assert header is not None and header.kind == "JPEG 2000"
        assert (header.width, header.height, header.samples, header.bits) == (40, 30, 3, 12)


def test_frame_header_refuses_malformed_streams() -> None:
    j2k = imagecodecs.jpeg2k_encode(np.zeros((8, 8), np.uint8), codecformat="J2K")
    tiny_tiles = bytearray(with_j2k_size(j2k, 60_000, 60_000))
    tiny_tiles[24:32] = struct.pack(">II", 16, 16)  # 14 million tiles
    dnl = bytearray(jpeg_bytes())
    dnl[sof_offset(bytes(dnl)) : sof_offset(bytes(dnl)) + 2] = b"\0\0"  # height 0: DNL later
    for data, message in (
        (bytes(tiny_tiles), "tiles"),
        (bytes(dnl), "DNL"),
        (jpeg_bytes()[:20], "truncated"),
        (j2k[:30], "truncated SIZ"),
        (b"\xff\xd8\xff\xda\x00\x02", "no frame header"),
    ):
        with pytest.raises(ValueError, match=message):
            frame_header(data)
    assert frame_header(b"GIF89a...") is None


# --- truncated files ----------------------------------------------------------------------------


def whole_files(folder: Path, shared_data: Path) -> dict[str, Path]:
    rng = np.random.default_rng(7)
    dicom = shared_data / "imaging" / "dicom"
    png, tiff = folder / "noise.png", folder / "noise.tif"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    tifffile.imwrite(tiff, rng.integers(0, 4096, (64, 64), dtype=np.uint16))
    nifti_gz = folder / "anatomical.nii.gz"
    nifti_gz.write_bytes(gzip.compress((shared_data / "imaging/nifti/anatomical.nii").read_bytes()))
    return {
        "png": png,
        "jpeg": sorted((shared_data / "vqa_rad" / "images").glob("*.jpg"))[0],
        "tiff": tiff,
        "dicom-native": dicom / "CT_small.dcm",
        "dicom-jpeg-12bit": dicom / "JPEG-lossy.dcm",
        "dicom-rle": dicom / "MR_small_RLE.dcm",
        "nifti": shared_data / "imaging" / "nifti" / "anatomical.nii",
        "nifti-gz": nifti_gz,
    }


@pytest.mark.parametrize(
    "kind",
    ["png", "jpeg", "tiff", "dicom-native", "dicom-jpeg-12bit", "dicom-rle", "nifti", "nifti-gz"],
)
def test_truncated_file_of_each_format_is_refused_in_one_line(
    kind: str, tmp_path: Path, shared_data: Path
) -> None:
    whole = whole_files(tmp_path, shared_data)[kind]
    load_frames(whole)  # the complete file loads
    data = whole.read_bytes()
    cut = tmp_path / f"cut-{whole.name}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert any(word in refusal(cut) for word in ("truncated", "corrupt"))
