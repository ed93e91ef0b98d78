"""The one medical image loader, on real DICOM/NIfTI/VQA-RAD files and on crafted bad files."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image

from suwen.errors import InputError
from suwen.medimage import load_frames, load_image

nib: Any = nibabel  # nibabel ships no type hints


def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "imaging" / "dicom"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def assert_rgb_image(image: Image.Image, size: tuple[int, int]) -> None:
    assert image.mode == "RGB"
    assert image.size == size
    data = pixels(image)
    assert data.dtype == np.uint8
    assert data.max() > data.min(), "image came out flat"


def assert_one_line_error(excinfo: pytest.ExceptionInfo[InputError], path: Path) -> str:
    message = str(excinfo.value)
    assert str(path) in message
    assert "\n" not in message
    return message


# --- real files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("CT_small.dcm", (128, 128)),
        ("MR_small.dcm", (64, 64)),
        ("MR_small_RLE.dcm", (64, 64)),
        ("JPEG-lossy.dcm", (256, 1024)),  # 12-bit JPEG Extended, decoded through imagecodecs
    ],
)
def test_shared_dicom_files_load_as_rgb(shared_data: Path, name: str, size: tuple[int, int]):
    frames = load_frames(dicom_dir(shared_data) / name)
    assert len(frames) == 1 and frames[0].label == ""
    assert_rgb_image(frames[0].image, size)


def test_rle_compressed_dicom_decodes_to_the_same_pixels_as_uncompressed(shared_data: Path):
    plain = pixels(load_image(dicom_dir(shared_data) / "MR_small.dcm"))
    rle = pixels(load_image(dicom_dir(shared_data) / "MR_small_RLE.dcm"))
    assert np.array_equal(plain, rle)


def test_dicom_window_is_applied_as_the_standard_linear_voi(shared_data: Path):
    path = dicom_dir(shared_data) / "MR_small.dcm"
    dataset = pydicom.dcmread(path)
    center, width = float(dataset.WindowCenter), float(dataset.WindowWidth)
    values = dataset.pixel_array.astype(float) * float(dataset.get("RescaleSlope", 1)) + float(
        dataset.get("RescaleIntercept", 0)
    )
    # DICOM PS3.3 C.11.2.1.2.1, LINEAR, mapped onto 0..255.
    expected = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    got = pixels(load_image(path))[:, :, 0].astype(float)
    assert np.abs(got - expected).max() <= 1.0


def test_monochrome1_is_inverted(shared_data: Path, tmp_path: Path):
    source = dicom_dir(shared_data) / "MR_small.dcm"
    dataset = pydicom.dcmread(source)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    inverted_path = tmp_path / "mono1.dcm"
    dataset.save_as(inverted_path)
    normal = pixels(load_image(source)).astype(int)
    inverted = pixels(load_image(inverted_path)).astype(int)
    assert np.array_equal(inverted, 255 - normal)


def test_multiframe_dicom_gives_evenly_spaced_labelled_frames(shared_data: Path, tmp_path: Path):
    dataset = pydicom.dcmread(dicom_dir(shared_data) / "CT_small.dcm")
    base = dataset.pixel_array
    stack = np.stack([np.roll(base, 10 * i, axis=1) for i in range(5)]).astype(base.dtype)
    dataset.NumberOfFrames = 5
    dataset.PixelData = stack.tobytes()
    path = tmp_path / "multiframe.dcm"
    dataset.save_as(path)

    frames = load_frames(path, max_frames=3)
    assert [f.label for f in frames] == ["frame 1/5", "frame 3/5", "frame 5/5"]
    # Frame 3 is frame 1 shifted by 20 columns (same histogram, so the same scaling).
    first, third = pixels(frames[0].image), pixels(frames[1].image)
    assert np.array_equal(np.roll(first, 20, axis=1), third)
    assert np.array_equal(pixels(load_image(path)), third), "representative = middle frame"


def test_dicom_series_folder_is_read_in_instance_order(shared_data: Path, tmp_path: Path):
    series = dicom_dir(shared_data) / "monai_ct_series"
    by_instance = sorted(series.iterdir(), key=lambda p: int(pydicom.dcmread(p).InstanceNumber))
    # Copy under names whose alphabetical order is the reverse of the slice order.
    shuffled = tmp_path / "series"
    shuffled.mkdir()
    for rank, path in enumerate(by_instance):
        shutil.copy(path, shuffled / f"{chr(ord('z') - rank)}.dcm")

    for folder in (series, shuffled):
        frames = load_frames(folder, max_frames=4)
        assert [f.label for f in frames] == ["slice 1/4", "slice 2/4", "slice 3/4", "slice 4/4"]
        for frame, path in zip(frames, by_instance, strict=True):
            assert frame.image.size == (16, 16)
            assert np.array_equal(pixels(frame.image), pixels(load_image(path)))


def test_series_folder_ignores_dicom_objects_without_an_image(shared_data: Path, tmp_path: Path):
    folder = tmp_path / "series"
    shutil.copytree(dicom_dir(shared_data) / "monai_ct_series", folder)
    report = pydicom.dcmread(folder / "7106")
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(report, keyword)
    report.save_as(folder / "report.dcm")
    assert [f.label for f in load_frames(folder, max_frames=4)][-1] == "slice 4/4"


def test_multipage_tiff_and_animated_gif_give_distinct_frames(tmp_path: Path):
    rng = np.random.default_rng(0)
    pages = rng.integers(0, 4096, size=(5, 32, 48), dtype=np.uint16)
    tiff = tmp_path / "stack.tif"
    tifffile.imwrite(tiff, pages)
    gif = tmp_path / "cine.gif"
    frames8 = [Image.fromarray(rng.integers(0, 255, (32, 48), dtype=np.uint8)) for _ in range(5)]
    frames8[0].save(gif, save_all=True, append_images=frames8[1:])
    for path, word in ((tiff, "page"), (gif, "frame")):
        frames = load_frames(path, max_frames=3)
        assert [f.label for f in frames] == [f"{word} 1/5", f"{word} 3/5", f"{word} 5/5"]
        arrays = [pixels(f.image) for f in frames]
        assert all(a.shape == (32, 48, 3) for a in arrays)
        assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])


def test_nifti_volume_gives_middle_axial_coronal_sagittal(shared_data: Path):
    path = shared_data / "imaging" / "nifti" / "anatomical.nii"  # 33 x 41 x 25, LAS
    frames = load_frames(path, max_frames=3)
    assert [f.label for f in frames] == ["axial 13/25", "coronal 21/41", "sagittal 17/33"]
    assert [f.image.size for f in frames] == [(33, 41), (33, 25), (41, 25)]
    for frame in frames:
        assert_rgb_image(frame.image, frame.image.size)
    assert np.array_equal(pixels(load_image(path)), pixels(frames[0].image))


def test_nifti_slices_do_not_depend_on_storage_orientation(shared_data: Path, tmp_path: Path):
    original = shared_data / "imaging" / "nifti" / "anatomical.nii"
    reoriented = tmp_path / "ras.nii.gz"
    canonical = nib.as_closest_canonical(nib.load(original))  # LAS -> RAS: x stored reversed
    nib.save(canonical, reoriented)
    assert nib.aff2axcodes(nib.load(reoriented).affine) != nib.aff2axcodes(
        nib.load(original).affine
    )
    for a, b in zip(load_frames(original), load_frames(reoriented), strict=True):
        assert a.label == b.label
        assert np.array_equal(pixels(a.image), pixels(b.image))


def test_sixteen_bit_tiff_is_scaled_not_clipped(tmp_path: Path):
    ramp = np.tile(np.linspace(1000, 60000, 256).astype(np.uint16), (64, 1))
    path = tmp_path / "ramp16.tif"
    tifffile.imwrite(path, ramp)
    data = pixels(load_image(path))
    assert data.shape == (64, 256, 3)
    row = data[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0), "gray levels must keep their order"
    assert len(np.unique(row)) > 200, "16-bit detail must survive as 8-bit steps"


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path):
    ramp = np.tile(np.linspace(0, 4095, 128).astype(np.uint16), (8, 1))  # 12-bit data in 16
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    row = pixels(load_image(path))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0)


def test_vqa_rad_jpeg_loads_as_rgb(shared_data: Path):
    path = shared_data / "vqa_rad" / "images" / "synpic54610.jpg"
    with Image.open(path) as original:
        size = original.size
    assert_rgb_image(load_image(path), size)


# --- bad input --------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def test_decompression_bomb_png_is_refused(tmp_path: Path):
    path = tmp_path / "bomb.png"
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 10 gigapixels, gray
    idat = zlib.compress(b"\0" * 1024)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert "decompression bomb" in assert_one_line_error(excinfo, path)


def test_truncated_jpeg_is_an_input_error(shared_data: Path, tmp_path: Path):
    data = (shared_data / "vqa_rad" / "images" / "synpic54610.jpg").read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert "truncated" in assert_one_line_error(excinfo, path)


def test_dicom_without_pixel_data_is_an_input_error(shared_data: Path, tmp_path: Path):
    dataset = pydicom.dcmread(dicom_dir(shared_data) / "CT_small.dcm")
    del dataset.PixelData
    path = tmp_path / "no-pixels.dcm"
    dataset.save_as(path)
    with pytest.raises(InputError) as excinfo:
        load_frames(path)
    assert "no pixel data" in assert_one_line_error(excinfo, path)


def test_dicom_claiming_huge_dimensions_is_refused_before_decoding(
    shared_data: Path, tmp_path: Path
):
    dataset = pydicom.dcmread(dicom_dir(shared_data) / "CT_small.dcm")
    dataset.Rows = dataset.Columns = 60_000
    path = tmp_path / "huge.dcm"
    dataset.save_as(path)
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert "exceeds the limit" in assert_one_line_error(excinfo, path)


def test_nifti_claiming_huge_dimensions_is_refused(tmp_path: Path):
    path = tmp_path / "huge.nii"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.uint8), np.eye(4)), path)
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])))
    header.set_data_shape((30_000, 30_000, 2))
    raw[:348] = header.binaryblock
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert "exceeds the limit" in assert_one_line_error(excinfo, path)


def test_text_file_named_png_is_an_input_error(tmp_path: Path):
    path = tmp_path / "notes.png"
    path.write_text("not an image at all\n")
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert "not a readable image" in assert_one_line_error(excinfo, path)


def test_corrupt_dicom_pixel_data_is_an_input_error(shared_data: Path, tmp_path: Path):
    data = (dicom_dir(shared_data) / "CT_small.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: len(data) - 20_000])  # pixel data cut short
    with pytest.raises(InputError) as excinfo:
        load_image(path)
    assert_one_line_error(excinfo, path)


def test_missing_file_and_empty_series_folder_are_input_errors(tmp_path: Path):
    missing = tmp_path / "nope.png"
    with pytest.raises(InputError) as excinfo:
        load_image(missing)
    assert_one_line_error(excinfo, missing)
    empty = tmp_path / "empty-series"
    empty.mkdir()
    with pytest.raises(InputError) as excinfo:
        load_image(empty)
    assert_one_line_error(excinfo, empty)
