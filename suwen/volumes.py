"""A question's image files as the labelled views the model sees.

A plain 2-D image is one view. A 3-D volume (a NIfTI file, a DICOM series folder) becomes a
few views, as a radiologist would scroll through it: ``slices`` evenly spaced slices in the
acquisition plane over the part of the volume that is not background, plus one orthogonal
reformat through the middle of that part in each other plane when the voxels are isotropic
(reformats of thick slices are blurred smears). Each view is windowed for its modality and the
question (CT presets: lung, mediastinum, soft tissue, bone, brain; MR and the rest between
percentiles of the foreground) and labelled with its plane, slice position (mm when the header
gives it) and window, e.g. ``anatomical.nii: axial slice 9/25 at z = +2.0 mm, window 1st-99th
percentile (1205 to 12721)``.

Volumes are read through ``suwen.medimage``'s bounded loaders: every size check there holds.
A view's label travels with its PIL image (``Image.info``), so every prompt that shows the
image can name it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from suwen.errors import InputError
from suwen.medimage import (
    MAX_VOLUME_BYTES,
    NIFTI_SUFFIXES,
    dicom_frame_attributes,
    dicom_frames_values,
    dicom_position_mm,
    dicom_series_headers,
    dicom_slice_values,
    is_dicom_series_dir,
    is_multiframe_dicom,
    load_frames,
    load_image,
    nifti_volume,
    pick_indices,
    read_dicom_header,
)

VolumeArray = npt.NDArray[np.float32]

LABEL_KEY = "suwen.label"  # Image.info key: what the prompt says before the image
SOURCE_KEY = "suwen.source"  # Image.info key: the file a view was cut from

# A slice is foreground when at least this share of its voxels is above the background level.
FOREGROUND_SHARE = 0.01
# CT: anything denser than this (Hounsfield units) is the patient, not the air around them.
CT_BACKGROUND_HU = -500.0
# Voxel sizes within this relative spread count as isotropic (reformats look like slices).
ISOTROPIC_TOLERANCE = 0.1
PERCENTILES = (1.0, 99.0)


@dataclass(frozen=True)
class Window:
    """The intensity range shown, from black to white."""

    name: str
    low: float
    high: float
    preset: bool = True  # False: percentiles of this volume

    @classmethod
    def ct(cls, name: str, width: float, level: float) -> Window:
        return cls(name, level - width / 2, level + width / 2)

    @property
    def label(self) -> str:
        if not self.preset:
            # Whole numbers for wide ranges (MR signal); significant digits for narrow ones
            # (an RT dose grid in Gy), where whole numbers would all read the same.
            digits = ".0f" if self.high - self.low >= 10 else ".3g"
            return f"window {self.name} ({self.low:{digits}} to {self.high:{digits}})"
        width, level = self.high - self.low, (self.high + self.low) / 2
        return f"window {self.name} (W {width:.0f}, L {level:.0f})"


# Standard CT display presets (width, level) in Hounsfield units.
CT_WINDOWS: dict[str, Window] = {
    "lung": Window.ct("lung", 1500, -600),
    "mediastinum": Window.ct("mediastinum", 350, 50),
    "soft tissue": Window.ct("soft tissue", 400, 40),
    "bone": Window.ct("bone", 1800, 400),
    "brain": Window.ct("brain", 80, 40),
}
# What a question (or a DICOM's BodyPartExamined) is about -> the CT window that shows it.
_TASK_WORDS: tuple[tuple[str, str], ...] = (
    ("lung", r"lung|pulmon|nodule|emphysem|pneumo|bronch|airway|interstitial|ground.glass"),
    ("bone", r"bone|fractur|osseous|lytic|sclerotic|vertebra|spine|skelet|rib\b|ribs"),
    ("brain", r"brain|head|skull|intracran|hemorrhag|haemorrhag|stroke|infarct|cerebr"),
    ("mediastinum", r"mediastin|lymph|aort|heart|cardiac|pericard|chest|thorax|thorac"),
)


def ct_window_for(question: str, body_part: str = "") -> Window:
    """The CT preset for what the question asks about, else for the body part, else soft
    tissue (the abdomen and most else)."""
    for text in (question, body_part):
        for name, pattern in _TASK_WORDS:
            if re.search(pattern, text, re.IGNORECASE):
                return CT_WINDOWS[name]
    return CT_WINDOWS["soft tissue"]


def percentile_window(values: VolumeArray, foreground: npt.NDArray[np.bool_]) -> Window:
    """The 1st to 99th percentile of the foreground (of everything when there is none)."""
    chosen = values[foreground] if foreground.any() else values.ravel()
    low, high = (float(v) for v in np.percentile(chosen, PERCENTILES))
    if high <= low:
        low, high = float(chosen.min()), float(chosen.max())
    if high <= low:  # a constant volume: shown mid-grey rather than divided by zero
        low, high = low - 1.0, high + 1.0
    return Window("1st-99th percentile", low, high, preset=False)


@dataclass(frozen=True)
class Volume:
    """Voxels indexed ``[slice, row, column]`` in the acquisition plane, slices ascending
    along ``normal``; rows are displayed top to bottom as stored."""

    name: str  # the file or folder name, for labels
    voxels: VolumeArray
    plane: str  # the acquisition plane: axial, coronal or sagittal
    # Per volume axis (slice, row, column): each index's position in mm along the patient
    # axis it steps along (None: the header does not say), and that axis's letter (x, y, z).
    positions: tuple[list[float] | None, list[float] | None, list[float] | None]
    axis_letters: tuple[str, str, str]
    spacing: tuple[float, float, float]  # mm: between slices, rows, columns
    modality: str  # "CT", "MR", ... ("" unknown)
    body_part: str = ""

    @property
    def slice_name(self) -> str:
        """What one index along the first axis is called: a slice in its plane, or a frame
        when the header places the frames nowhere (a cine loop, a frame series)."""
        return f"{self.plane} slice" if self.plane else "frame"


@dataclass(frozen=True)
class View:
    image: Image.Image
    label: str


def is_volume_path(path: Path) -> bool:
    """A NIfTI file, a folder holding a DICOM series or a multi-frame DICOM file (a single
    frame is not a volume)."""
    if path.is_dir():
        return is_dicom_series_dir(path)
    return path.name.lower().endswith(NIFTI_SUFFIXES) or is_multiframe_dicom(path)


def question_views(path: Path, slices: int, question: str = "") -> list[View]:
    """The labelled views of one image file (one unlabelled view for a plain 2-D image)."""
    path = Path(path)
    if slices < 1:
        raise InputError(f"--slices {slices}: must be at least 1")
    if is_volume_path(path) and not path.is_dir() and _colour_frames(path):
        return _frame_views(path, slices)
    volume = read_volume(path) if is_volume_path(path) else None
    if volume is None:
        return [View(load_image(path), "")]
    return volume_views(volume, slices, question)


def _colour_frames(path: Path) -> bool:
    """A multi-frame DICOM of colour frames (an ultrasound or endoscopy loop)."""
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return False
    return int(read_dicom_header(path).get("SamplesPerPixel") or 1) > 1


def _frame_views(path: Path, slices: int) -> list[View]:
    """Evenly spaced frames of a colour loop as they are stored (no window to choose)."""
    views = []
    for frame in load_frames(path, max_frames=slices):
        label = f"{path.name}: {frame.label}" if frame.label else path.name
        views.append(View(labelled(frame.image, label, path.name), label))
    return views


def read_volume(path: Path) -> Volume | None:
    """The volume in ``path`` (None when it holds one 2-D image only)."""
    if path.is_dir():
        return _dicom_series_volume(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return _dicom_multiframe_volume(path)
    try:
        image, voxels = nifti_volume(path)
    except InputError:
        load_image(path)  # a 2-D NIfTI reads as one image; a broken file fails here
        return None
    return _nifti_as_volume(path, image, voxels)


# -- views -----------------------------------------------------------------------------------


def foreground_mask(volume: Volume) -> npt.NDArray[np.bool_]:
    values = volume.voxels
    if volume.modality == "CT":
        air: npt.NDArray[np.bool_] = values > CT_BACKGROUND_HU
        return air
    low, high = (float(v) for v in np.percentile(values, PERCENTILES))
    mask: npt.NDArray[np.bool_] = values > low + 0.1 * (high - low)
    return mask


def foreground_range(mask: npt.NDArray[np.bool_], axis: int) -> tuple[int, int]:
    """First and last index along ``axis`` whose slice is not background (all when none is)."""
    other = tuple(a for a in range(3) if a != axis)
    share = mask.mean(axis=other)
    kept = np.flatnonzero(share >= FOREGROUND_SHARE)
    if kept.size == 0:
        return 0, mask.shape[axis] - 1
    return int(kept[0]), int(kept[-1])


def window_of(volume: Volume, question: str, mask: npt.NDArray[np.bool_]) -> Window:
    if volume.modality == "CT":
        return ct_window_for(question, volume.body_part)
    return percentile_window(volume.voxels, mask)


def volume_views(volume: Volume, slices: int, question: str = "") -> list[View]:
    mask = foreground_mask(volume)
    window = window_of(volume, question, mask)
    first, last = foreground_range(mask, 0)
    count = volume.voxels.shape[0]
    views = []
    for offset in pick_indices(last - first + 1, slices):
        index = first + offset
        where = _position_text(volume, 0, index)
        label = f"{volume.slice_name} {index + 1}/{count}{where}, {window.label}"
        views.append(_view(volume, volume.voxels[index], window, label))
    if volume.plane and _isotropic(volume.spacing):
        views.extend(_reformats(volume, mask, window))
    return views


def _position_text(volume: Volume, axis: int, index: int) -> str:
    positions = volume.positions[axis]
    if positions is None:
        return ""
    return f" at {volume.axis_letters[axis]} = {positions[index]:+.1f} mm"


def _isotropic(spacing: tuple[float, float, float]) -> bool:
    return max(spacing) - min(spacing) <= ISOTROPIC_TOLERANCE * max(spacing)


# The planes a reformat of each acquisition plane shows: (name, volume axis held fixed).
_REFORMATS = {
    "axial": (("coronal", 1), ("sagittal", 2)),
    "coronal": (("axial", 1), ("sagittal", 2)),
    "sagittal": (("axial", 1), ("coronal", 2)),
}


def _reformats(volume: Volume, mask: npt.NDArray[np.bool_], window: Window) -> list[View]:
    views = []
    for name, axis in _REFORMATS.get(volume.plane, ()):
        first, last = foreground_range(mask, axis)
        index = (first + last) // 2
        plane = np.take(volume.voxels, index, axis=axis)
        # Slices run up the screen, as reformats are read (superior or anterior at the top).
        plane = np.flipud(plane)
        count = volume.voxels.shape[axis]
        where = _position_text(volume, axis, index)
        label = f"{name} reformat {index + 1}/{count}{where}, {window.label}"
        views.append(_view(volume, plane, window, label))
    return views


def _view(volume: Volume, plane: VolumeArray, window: Window, label: str) -> View:
    scaled = (np.asarray(plane, dtype=np.float64) - window.low) / (window.high - window.low)
    pixels = np.rint(np.clip(np.nan_to_num(scaled), 0.0, 1.0) * 255.0).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")
    full = f"{volume.name}: {label}"
    return View(labelled(image, full, volume.name), full)


def labelled(image: Image.Image, label: str, source: str) -> Image.Image:
    """``image`` carrying the label prompts show before it and the file it came from."""
    image.info[LABEL_KEY] = label
    image.info[SOURCE_KEY] = source
    return image


def label_of(image: Image.Image) -> str:
    value = image.info.get(LABEL_KEY, "")
    return value if isinstance(value, str) else ""


def source_of(image: Image.Image, default: str = "") -> str:
    value = image.info.get(SOURCE_KEY, default)
    return value if isinstance(value, str) else default


# -- NIfTI -----------------------------------------------------------------------------------

_RAS_LETTERS = "xyz"
_PLANE_OF_AXIS = {0: "sagittal", 1: "coronal", 2: "axial"}  # RAS axis held fixed -> plane


def _nifti_as_volume(path: Path, image: Any, voxels: VolumeArray) -> Volume:
    """The voxels turned to RAS order, then the acquisition axis (the stored third axis, the
    slice axis of nearly every scanner export) moved first."""
    import nibabel as nib

    orientation = nib.io_orientation(image.affine)  # type: ignore[no-untyped-call]
    ras = nib.orientations.apply_orientation(voxels, orientation)  # type: ignore[no-untyped-call]
    to_ras = nib.orientations.inv_ornt_aff(orientation, voxels.shape)  # type: ignore[no-untyped-call]
    affine = np.asarray(image.affine, dtype=np.float64) @ to_ras
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    slice_axis = int(orientation[2][0])  # the RAS axis the stored slices step along
    in_plane = [a for a in (2, 1, 0) if a != slice_axis]  # rows run down the higher RAS axis
    ras_zooms = [zooms[int(np.flatnonzero(orientation[:, 0] == a)[0])] for a in range(3)]
    # [slice, row, column]: rows from the top (superior/anterior) down, columns ascending.
    stacked = np.transpose(ras, (slice_axis, *in_plane))
    stacked = np.flip(stacked, axis=1)
    along = [_ras_positions(affine, axis, ras.shape[axis]) for axis in (slice_axis, *in_plane)]
    along[1] = along[1][::-1]  # rows were flipped
    return Volume(
        name=path.name,
        voxels=np.ascontiguousarray(stacked, dtype=np.float32),
        plane=_PLANE_OF_AXIS[slice_axis],
        positions=(along[0], along[1], along[2]),
        axis_letters=(
            _RAS_LETTERS[slice_axis],
            _RAS_LETTERS[in_plane[0]],
            _RAS_LETTERS[in_plane[1]],
        ),
        spacing=(ras_zooms[slice_axis], ras_zooms[in_plane[0]], ras_zooms[in_plane[1]]),
        modality="CT" if _looks_like_hounsfield(voxels) else "",
    )


def _ras_positions(affine: npt.NDArray[np.float64], axis: int, count: int) -> list[float]:
    """Where each index along RAS-ordered ``axis`` lies on that patient axis (mm)."""
    return [float(affine[axis, axis] * i + affine[axis, 3]) for i in range(count)]


def _looks_like_hounsfield(voxels: VolumeArray) -> bool:
    """NIfTI has no modality field: a volume whose darkest voxels sit at air's -1000 HU is CT."""
    low = float(np.percentile(voxels, 0.5))
    return -1100.0 <= low <= -900.0


# -- DICOM series ----------------------------------------------------------------------------


def _dicom_series_volume(folder: Path) -> Volume | None:
    headers = dicom_series_headers(folder)
    if len(headers) < 2:
        return None
    first = headers[0][1]
    rows, columns = int(first.Rows), int(first.Columns)
    needed = len(headers) * rows * columns * 4
    if needed > MAX_VOLUME_BYTES:
        raise InputError(
            f"{folder}: refused, {len(headers)} slices of {columns}x{rows} would take {needed} "
            f"bytes, which exceeds the limit of {MAX_VOLUME_BYTES} bytes"
        )
    positions = [dicom_position_mm(header) for _, header in headers]
    known = [p for p in positions if p is not None]
    order = list(range(len(headers)))
    if len(known) == len(headers):
        order.sort(key=lambda i: known[i])
    slices = []
    for i in order:
        path, header = headers[i]
        if (int(header.Rows), int(header.Columns)) != (rows, columns):
            raise InputError(f"{path}: slice size differs from the rest of the series {folder}")
        values, _ = dicom_slice_values(path)
        slices.append(values)
    ordered = [known[i] for i in order] if len(known) == len(headers) else None
    in_plane = _dicom_in_plane(first, rows, columns)
    return Volume(
        name=folder.name,
        voxels=np.stack(slices).astype(np.float32, copy=False),
        plane=_dicom_plane(first),
        positions=(ordered, in_plane[0][1], in_plane[1][1]),
        axis_letters=(_dicom_axis_letter(first), in_plane[0][0], in_plane[1][0]),
        spacing=_dicom_spacing(first, ordered),
        modality=str(first.get("Modality", "") or ""),
        body_part=str(first.get("BodyPartExamined", "") or ""),
    )


_FRAME_GEOMETRY = (
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
)


def _dicom_multiframe_volume(path: Path) -> Volume:
    """One file of several grayscale frames, read as a series of its frames: each frame's
    position from its functional groups (enhanced CT/MR) or the grid offsets (RT dose),
    frames ordered along the normal when every one is placed, else kept in stored order and
    named frames (no plane, no reformats)."""
    values, header = dicom_frames_values(path)
    count, rows, columns = values.shape
    frames = [_frame_geometry(header, index, count) for index in range(count)]
    known = [p for p in (dicom_position_mm(frame) for frame in frames) if p is not None]
    # Placed: every frame somewhere else along the normal (frames at one place are a loop).
    placed = len(set(known)) == count and bool(frames[0].get("ImageOrientationPatient"))
    order = list(range(count))
    ordered: list[float] | None = None
    if placed:
        order.sort(key=lambda i: known[i])
        ordered = [known[i] for i in order]
    first = frames[order[0]]
    in_plane = _dicom_in_plane(first, rows, columns)
    return Volume(
        name=path.name,
        voxels=np.ascontiguousarray(values[order]),
        plane=_dicom_plane(first) if placed else "",
        positions=(ordered, in_plane[0][1], in_plane[1][1]),
        axis_letters=(_dicom_axis_letter(first), in_plane[0][0], in_plane[1][0]),
        spacing=_dicom_spacing(first, ordered),
        modality=str(header.get("Modality", "") or ""),
        body_part=str(header.get("BodyPartExamined", "") or ""),
    )


def _frame_geometry(header: Any, index: int, count: int) -> dict[str, Any]:
    """Frame ``index``'s position, orientation and spacing as a classic slice header has them
    (RT dose: the first frame's position moved along the normal by its grid offset)."""
    geometry = dicom_frame_attributes(header, index, _FRAME_GEOMETRY)
    offsets = header.get("GridFrameOffsetVector") or []
    normal, origin = _dicom_normal(geometry), geometry.get("ImagePositionPatient")
    graded = "PerFrameFunctionalGroupsSequence" not in header and len(offsets) == count
    if graded and normal is not None and origin:
        moved = float(offsets[index]) - float(offsets[0])
        moved_origin = np.asarray([float(v) for v in origin]) + moved * normal
        geometry["ImagePositionPatient"] = [float(v) for v in moved_origin]
    return geometry


def _dicom_normal(header: Any) -> npt.NDArray[np.float64] | None:
    orientation = header.get("ImageOrientationPatient")
    if not orientation or len(orientation) != 6:
        return None
    values = [float(v) for v in orientation]
    return np.asarray(np.cross(values[:3], values[3:]), dtype=np.float64)


def _dicom_plane(header: Any) -> str:
    normal = _dicom_normal(header)
    if normal is None:
        return "axial"
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def _dicom_axis_letter(header: Any) -> str:
    normal = _dicom_normal(header)
    return "z" if normal is None else _RAS_LETTERS[int(np.argmax(np.abs(normal)))]


def _dicom_in_plane(
    header: Any, rows: int, columns: int
) -> tuple[tuple[str, list[float] | None], tuple[str, list[float] | None]]:
    """For rows and for columns: the patient axis they step along and each one's position
    there (mm), from ImagePositionPatient, ImageOrientationPatient and PixelSpacing."""
    orientation = header.get("ImageOrientationPatient")
    origin = header.get("ImagePositionPatient")
    spacing = header.get("PixelSpacing")
    if not orientation or len(orientation) != 6 or not origin or not spacing:
        return ("y", None), ("x", None)
    along_row = [float(v) for v in orientation[:3]]  # direction of increasing column index
    along_column = [float(v) for v in orientation[3:]]  # direction of increasing row index
    result = []
    for direction, step, count in (
        (along_column, float(spacing[0]), rows),
        (along_row, float(spacing[1]), columns),
    ):
        axis = int(np.argmax(np.abs(direction)))
        start = float(origin[axis])
        positions = [start + i * step * direction[axis] for i in range(count)]
        result.append((_RAS_LETTERS[axis], positions))
    return result[0], result[1]


def _dicom_spacing(header: Any, positions: list[float] | None) -> tuple[float, float, float]:
    pixel = [float(v) for v in (header.get("PixelSpacing") or [1.0, 1.0])]
    if positions is not None and len(positions) > 1:
        between = float(np.median(np.diff(positions)))
    else:
        between = float(header.get("SpacingBetweenSlices") or header.get("SliceThickness") or 1.0)
    return abs(between), pixel[0], pixel[1]
