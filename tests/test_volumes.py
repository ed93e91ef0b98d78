"""Volumes in a question: a NIfTI file or a DICOM series becomes labelled, windowed views."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from suwen.errors import InputError
from suwen.medimage import dicom_series_headers, dicom_slice_values
from suwen.tools.cases import similar_cases
from suwen.types import ImageHit
from suwen.volumes import CT_WINDOWS, ct_window_for, label_of, question_views, source_of
from tests.agent_helpers import ask, make_agent, question
from tests.fake_model import FakeModel
from tests.fake_search import case_hit
from tests.test_medimage_bounds import nifti_claiming


@pytest.fixture(scope="module")
def nifti(shared_data: Path) -> Path:
    return shared_data / "imaging" / "nifti" / "anatomical.nii"


@pytest.fixture(scope="module")
def series(shared_data: Path) -> Path:
    return shared_data / "imaging" / "dicom" / "monai_ct_series"


def test_nifti_gives_evenly_spaced_axial_slices_and_two_reformats(nifti: Path) -> None:
    views = question_views(nifti, 6, "what is shown?")
    labels = [view.label for view in views]
    # 33x41x25 voxels of 2 mm (isotropic): 6 axial slices plus a coronal and a sagittal.
    assert [label.split(": ")[1].split(" ")[0] for label in labels] == ["axial"] * 6 + [
        "coronal",
        "sagittal",
    ]
    # The affine puts slice k at z = 2k - 16 mm; the slices cover the foreground evenly.
    volume = np.asarray(nib.load(str(nifti)).dataobj, dtype=np.float32)
    positions = [float(label.split("z = ")[1].split(" mm")[0]) for label in labels[:6]]
    indices = [round((z + 16) / 2) for z in positions]
    assert indices == sorted(indices) and len(set(np.diff(indices))) <= 2
    assert all(
        f"axial slice {k + 1}/25 at z = {2 * k - 16:+.1f} mm" in labels[i]
        for i, k in enumerate(indices)
    )
    assert "coronal reformat" in labels[6] and "at y = " in labels[6]
    assert "sagittal reformat" in labels[7] and "at x = " in labels[7]
    # MR (no Hounsfield air): a percentile window of the foreground, named in every label.
    low, high = np.percentile(volume, [1, 99])
    foreground = volume[volume > low + 0.1 * (high - low)]
    w_low, w_high = np.percentile(foreground, [1, 99])
    window = f"window 1st-99th percentile ({w_low:.0f} to {w_high:.0f})"
    assert all(label.endswith(window) for label in labels)
    assert views[0].image.size == (33, 41) and views[0].image.mode == "RGB"
    assert all(label_of(view.image) == view.label for view in views)
    assert {source_of(view.image) for view in views} == {"anatomical.nii"}


def test_slices_skip_the_background(tmp_path: Path) -> None:
    data = np.zeros((20, 20, 40), np.int16)
    data[5:15, 5:15, 10:20] = 1000  # the patient fills slices 10..19 only
    path = tmp_path / "padded.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0])), str(path))
    labels = [view.label for view in question_views(path, 4)]
    slices = [int(label.split("axial slice ")[1].split("/")[0]) for label in labels]
    assert slices == [12, 14, 17, 19] and len(labels) == 4  # 3 mm slices: no reformats
    assert "at z = +33.0 mm" in labels[0]


def test_dicom_series_slices_are_ordered_by_position_with_a_ct_window(series: Path) -> None:
    views = question_views(series, 6, "Is there an intracranial bleed?")
    labels = [view.label for view in views]
    assert labels == [
        f"monai_ct_series: axial slice {i}/4 at z = {z} mm, window brain (W 80, L 40)"
        for i, z in ((1, "-99.5"), (2, "+103.0"), (3, "+104.3"), (4, "+105.5"))
    ]
    # The pixels are Hounsfield units through the brain window: L 40, W 80 -> 0..80 HU.
    first = min(
        dicom_series_headers(series), key=lambda item: float(item[1].ImagePositionPatient[2])
    )
    hu, _ = dicom_slice_values(first[0])
    expected = np.rint(np.clip((hu - 0.0) / 80.0, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(views[0].image)[:, :, 0], expected)


def test_ct_window_follows_the_task_then_the_body_part() -> None:
    assert ct_window_for("Is there a lung nodule?") == CT_WINDOWS["lung"]
    assert ct_window_for("Any rib fracture?") == CT_WINDOWS["bone"]
    assert ct_window_for("Enlarged mediastinal lymph nodes?") == CT_WINDOWS["mediastinum"]
    assert ct_window_for("What is abnormal?", "HEAD") == CT_WINDOWS["brain"]
    assert ct_window_for("What is abnormal?", "ABDOMEN") == CT_WINDOWS["soft tissue"]
    lung = CT_WINDOWS["lung"]
    assert (lung.low, lung.high) == (
        -1350.0,
        150.0,
    ) and lung.label == "window lung (W 1500, L -600)"


def test_plain_images_stay_one_unlabelled_view(shared_data: Path) -> None:
    image = sorted((shared_data / "vqa_rad" / "images").iterdir())[0]
    views = question_views(image, 6)
    assert len(views) == 1 and views[0].label == "" and label_of(views[0].image) == ""


@pytest.mark.parametrize(
    ("shape", "message"),
    [((4000, 4000, 100), "exceeds the limit"), ((256, 256, 128), "truncated NIfTI")],
)
def test_hostile_volumes_are_refused_in_one_line(
    tmp_path: Path, shape: tuple[int, ...], message: str
) -> None:
    path = nifti_claiming(tmp_path / ("v.nii.gz" if shape[0] > 1000 else "v.nii"), shape)
    with pytest.raises(InputError) as excinfo:
        question_views(path, 6)
    text = str(excinfo.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_slices_must_be_positive(nifti: Path) -> None:
    with pytest.raises(InputError, match="--slices 0"):
        question_views(nifti, 0)


class ViewSearch:
    """Scores each case by the view it is shown: case A matches the last view best."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def search_image(
        self, image: Image.Image, k: int = 4, *, exclude_sha256: Collection[str] = ()
    ) -> list[ImageHit]:
        self.seen.append(label_of(image))
        step = len(self.seen)
        return [
            case_hit("A", "a case").model_copy(update={"score": 0.1 * step}),
            case_hit("B", "b case").model_copy(update={"score": 0.5}),
            case_hit(f"only{step}", "once").model_copy(update={"score": 0.05}),
        ][:k]


def test_similar_cases_take_each_case_best_match_over_the_views(nifti: Path) -> None:
    views = question_views(nifti, 6)
    search = ViewSearch()
    hits = asyncio.run(similar_cases(search, [(view.label, view.image) for view in views], k=2))
    assert len(search.seen) == 8  # every view searched
    assert [hit.case_id for hit in hits] == ["A", "B"]  # best k over the volume, not per view
    assert hits[0].score == pytest.approx(0.8) and hits[0].found_by == [
        f"similar to {views[-1].label}"
    ]


def test_the_model_sees_every_view_with_its_label(tmp_path: Path, nifti: Path) -> None:
    model = FakeModel()
    agent = make_agent(tmp_path, model, volume_slices=3)
    result = ask(agent, question("What is shown?", images=[str(nifti)]))
    assert result.answer
    look = model.calls_for("look")[0]
    user = look.messages[-1]
    assert len(user.images) == 5  # 3 slices + 2 reformats
    assert user.image_labels[0].startswith("Image 1: anatomical.nii: axial slice")
    assert user.image_labels[3].startswith("Image 4: anatomical.nii: coronal reformat")
    answer = model.calls_for("answer")[0].messages[-1]
    assert answer.image_labels == user.image_labels


def test_isotropic_dicom_series_gets_reformats_with_positions(
    tmp_path: Path, shared_data: Path
) -> None:
    import pydicom

    source = pydicom.dcmread(shared_data / "imaging" / "dicom" / "CT_small.dcm")
    spacing = float(source.PixelSpacing[0])
    folder = tmp_path / "iso"
    folder.mkdir()
    for i in range(8):  # slices as far apart as the pixels: isotropic voxels
        source.InstanceNumber = i + 1
        source.ImagePositionPatient = [-158.135803, -179.035797, -75.7 + i * spacing]
        source.BodyPartExamined = "CHEST"
        source.save_as(folder / f"s{i}.dcm")
    labels = [view.label for view in question_views(folder, 4, "What is abnormal?")]
    assert len(labels) == 6 and all(x.endswith("window mediastinum (W 350, L 50)") for x in labels)
    assert labels[0].startswith("iso: axial slice ") and " at z = " in labels[0]
    assert "coronal reformat" in labels[4] and " at y = " in labels[4]
    assert "sagittal reformat" in labels[5] and " at x = " in labels[5]
    row = int(labels[4].split("reformat ")[1].split("/")[0]) - 1
    assert f"at y = {-179.035797 + row * spacing:+.1f} mm" in labels[4]


def test_more_views_than_the_server_admits_is_refused_before_any_call(
    tmp_path: Path, nifti: Path
) -> None:
    model = FakeModel()
    agent = make_agent(tmp_path, model, volume_slices=6, vllm_max_images=4)
    with pytest.raises(InputError, match=r"8 images \(volume views counted\).*admits 4"):
        ask(agent, question("What is shown?", images=[str(nifti)]))
    assert model.calls == []


def _series_claiming(folder: Path, source: Path, count: int, size: int) -> Path:
    import pydicom

    folder.mkdir()
    dataset = pydicom.dcmread(source)
    dataset.Rows = dataset.Columns = size  # the header claims far more than the file holds
    for i in range(count):
        dataset.InstanceNumber = i + 1
        dataset.ImagePositionPatient = [0.0, 0.0, float(i)]
        dataset.save_as(folder / f"s{i:02d}.dcm")
    return folder


def test_hostile_series_are_refused_in_one_line(tmp_path: Path, series: Path) -> None:
    source = sorted(series.iterdir())[0]
    huge = _series_claiming(tmp_path / "huge", source, 20, 4096)  # 20 x 4096^2 floats > 1 GiB
    with pytest.raises(InputError) as excinfo:
        question_views(huge, 6)
    assert str(excinfo.value).startswith(f"{huge}: refused, 20 slices of 4096x4096")
    short = _series_claiming(tmp_path / "short", source, 3, 1024)
    with pytest.raises(InputError) as excinfo:
        question_views(short, 6)
    message = str(excinfo.value)
    assert "truncated DICOM pixel data" in message and "\n" not in message
    assert message.startswith(str(short / "s00.dcm"))
