"""A multi-frame DICOM file in a question is a volume like a series: views over its frames.

The shared data holds no multi-frame file, so the enhanced CT here is made from the shared
4-slice CT series (real pixels; each frame placed and rescaled through its own functional
groups, stored out of order); the RT dose grid and the ultrasound loop are pydicom's own
test files, installed with it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from suwen.errors import InputError
from suwen.volumes import is_volume_path, question_views
from tests.agent_helpers import ask, make_agent, question
from tests.fake_model import FakeModel

BLEED = "Is there an intracranial bleed?"


@pytest.fixture(scope="module")
def series(shared_data: Path) -> Path:
    return shared_data / "imaging" / "dicom" / "monai_ct_series"


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for name, value in attributes.items():
        setattr(item, name, value)
    return item


def enhanced_from(series: Path, path: Path) -> Path:
    """The series as one enhanced multi-frame file: frames shuffled, each frame's position and
    rescale (a different intercept per frame, its stored values shifted to match) in its
    per-frame functional group, orientation and spacing shared."""
    slices = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    random.Random(7).shuffle(slices)
    dataset = slices[0].copy()
    frames, groups = [], []
    for k, source in enumerate(slices):
        stored = source.pixel_array.astype(np.int32) + 10 * k
        frames.append(stored.astype(source.pixel_array.dtype).tobytes())
        position = _item(ImagePositionPatient=source.ImagePositionPatient)
        rescale = _item(RescaleSlope=1, RescaleIntercept=float(source.RescaleIntercept) - 10 * k)
        groups.append(
            _item(
                PlanePositionSequence=Sequence([position]),
                PixelValueTransformationSequence=Sequence([rescale]),
            )
        )
    orientation = _item(ImageOrientationPatient=dataset.ImageOrientationPatient)
    measures = _item(PixelSpacing=dataset.PixelSpacing, SliceThickness=dataset.SliceThickness)
    shared = _item(
        PlaneOrientationSequence=Sequence([orientation]),
        PixelMeasuresSequence=Sequence([measures]),
    )
    for name in ("ImagePositionPatient", "ImageOrientationPatient", "RescaleIntercept"):
        delattr(dataset, name)
    dataset.NumberOfFrames = len(slices)
    dataset.PerFrameFunctionalGroupsSequence = Sequence(groups)
    dataset.SharedFunctionalGroupsSequence = Sequence([shared])
    dataset.PixelData = b"".join(frames)
    dataset.save_as(path)
    return path


def test_an_enhanced_multiframe_file_reads_like_its_series(tmp_path: Path, series: Path) -> None:
    multiframe = enhanced_from(series, tmp_path / "enhanced.dcm")
    assert is_volume_path(multiframe)
    from_file = question_views(multiframe, 6, BLEED)
    from_series = question_views(series, 6, BLEED)
    # Ordered along the normal, each frame at its own position, in the brain window.
    assert [view.label for view in from_file] == [
        f"enhanced.dcm: axial slice {i}/4 at z = {z} mm, window brain (W 80, L 40)"
        for i, z in ((1, "-99.5"), (2, "+103.0"), (3, "+104.3"), (4, "+105.5"))
    ]
    # Each frame's own rescale applied: the same Hounsfield units, the same pixels.
    for mine, theirs in zip(from_file, from_series, strict=True):
        assert np.array_equal(np.asarray(mine.image), np.asarray(theirs.image))


def test_an_rt_dose_grid_is_placed_by_its_frame_offsets() -> None:
    dose = Path(get_testdata_file("rtdose.dcm"))  # 15 frames of 10x10, 5 mm apart
    labels = [view.label for view in question_views(dose, 3, "Where is the dose highest?")]
    # 10 mm pixels, 5 mm between frames: not isotropic, so no reformats.
    assert len(labels) == 3
    positions = [float(label.split("z = ")[1].split(" mm")[0]) for label in labels]
    indices = [int(label.split("slice ")[1].split("/")[0]) - 1 for label in labels]
    assert all(label.startswith("rtdose.dcm: axial slice ") for label in labels)
    assert positions == [round(-761.87 + 5 * i, 1) for i in indices]
    # Stored integers x DoseGridScaling = Gy: a narrow range, shown with its decimals.
    window = labels[0].split("window 1st-99th percentile (")[1]
    low, high = (float(v) for v in window.rstrip(")").split(" to "))
    assert 0 <= low < high < 10 and all(label.endswith(window) for label in labels)


def test_a_colour_loop_gives_evenly_spaced_frames() -> None:
    loop = Path(get_testdata_file("examples_ybr_color.dcm"))  # ultrasound, 30 colour frames
    views = question_views(loop, 4)
    # Centred in four equal parts of the loop, as the frames of any multi-frame image are.
    assert [view.label for view in views] == [
        f"examples_ybr_color.dcm: frame {i}/30" for i in (4, 12, 19, 27)
    ]
    assert all(view.image.size == (320, 240) and view.image.mode == "RGB" for view in views)


def test_frames_at_one_place_are_frames_not_slices(tmp_path: Path, series: Path) -> None:
    multiframe = enhanced_from(series, tmp_path / "cine.dcm")
    dataset = pydicom.dcmread(multiframe)
    for group in dataset.PerFrameFunctionalGroupsSequence:  # a loop: one place, several times
        group.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, 0.0]
    dataset.save_as(multiframe)
    labels = [view.label for view in question_views(multiframe, 6, BLEED)]
    assert labels == [f"cine.dcm: frame {i}/4, window brain (W 80, L 40)" for i in range(1, 5)]


def test_a_multiframe_bomb_is_refused_before_anything_is_allocated(
    tmp_path: Path, shared_data: Path
) -> None:
    # One small JPEG frame; the header claims 100 frames of 4096x4096: 6.7 GB as floats.
    dataset = pydicom.dcmread(shared_data / "imaging" / "dicom" / "JPEG-lossy.dcm")
    dataset.NumberOfFrames = 100
    dataset.Rows = dataset.Columns = 4096
    bomb = tmp_path / "bomb.dcm"
    dataset.save_as(bomb)
    with pytest.raises(InputError) as excinfo:
        question_views(bomb, 6)
    message = str(excinfo.value)
    assert message.startswith(f"{bomb}: refused, 100 frames of 4096x4096 would take ")
    assert "\n" not in message


def test_a_truncated_multiframe_file_is_refused_in_one_line(tmp_path: Path, series: Path) -> None:
    multiframe = enhanced_from(series, tmp_path / "short.dcm")
    dataset = pydicom.dcmread(multiframe)
    dataset.NumberOfFrames = 40  # the data holds 4
    dataset.save_as(multiframe)
    with pytest.raises(InputError, match="truncated DICOM pixel data") as excinfo:
        question_views(multiframe, 6)
    assert "\n" not in str(excinfo.value)


def test_the_model_sees_every_frame_view_with_its_label(tmp_path: Path, series: Path) -> None:
    multiframe = enhanced_from(series, tmp_path / "enhanced.dcm")
    model = FakeModel()
    ask(make_agent(tmp_path, model), question(BLEED, images=[str(multiframe)]))
    look = model.calls_for("look")[0].messages[-1]
    assert len(look.images) == 4
    assert look.image_labels[0] == (
        "Image 1: enhanced.dcm: axial slice 1/4 at z = -99.5 mm, window brain (W 80, L 40)"
    )
