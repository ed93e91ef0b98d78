"""Prior and current studies: which of a question's images is the earlier examination.

A follow-up is read against the prior: the user says which images are priors (``--prior``,
a batch line's ``"prior"`` or ``"role": "prior"``); without that, DICOM StudyDates order the
studies (the latest date is the current study, every earlier one a prior). Each image then
carries a label the prompts say before it, ``prior study (1995-09-03): head.dcm``, and a role
the similar-case search reads (it searches with the current study only).
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from suwen.errors import InputError
from suwen.volumes import View, labelled, question_views, source_of

Role = Literal["prior", "current"]
ROLE_KEY = "suwen.role"  # Image.info key: "prior" or "current" (absent: no comparison)
_DATE = re.compile(r"^(\d{4})-?(\d{2})-?(\d{2})$")


@dataclass(frozen=True)
class StudyImage:
    path: str
    role: Role
    date: str | None = None  # YYYY-MM-DD

    @property
    def label(self) -> str:
        return f"{self.role} study ({self.date or 'date unknown'})"


def normalise_date(value: str, what: str) -> str:
    """``YYYYMMDD`` or ``YYYY-MM-DD`` -> ``YYYY-MM-DD`` (InputError naming ``what`` otherwise)."""
    match = _DATE.match(value.strip())
    try:
        if match is None:
            raise ValueError(value)
        year, month, day = (int(part) for part in match.groups())
        return datetime.date(year, month, day).isoformat()
    except ValueError:
        raise InputError(f"{what}: date {value!r} is not YYYY-MM-DD") from None


def given_dates(paths: list[str], dates: list[str], flag: str, images_flag: str) -> dict[str, str]:
    """The study dates given on the command line (``--date``, ``--prior-date``) for ``paths``:
    one date for all of them (the images of one study) or one per path, in order. A date
    given here is the study's date even when the file's DICOM StudyDate says otherwise."""
    if not dates:
        return {}
    normalised = [normalise_date(date, flag) for date in dates]
    if not paths:
        raise InputError(f"{flag}: no {images_flag} image to date")
    if len(dates) not in (1, len(paths)):
        raise InputError(
            f"{flag}: {len(dates)} dates for {len(paths)} {images_flag} images "
            "(give one date for all of them or one per image)"
        )
    if len(normalised) == 1:
        normalised = normalised * len(paths)
    return dict(zip(paths, normalised, strict=True))


def study_date(path: Path) -> str | None:
    """A DICOM file's (or series folder's) StudyDate, read from the header only."""
    from suwen.medimage import dicom_series_headers, is_dicom_series_dir, read_dicom_header

    try:
        if path.is_dir():
            if not is_dicom_series_dir(path):
                return None
            header = dicom_series_headers(path)[0][1]
        elif path.name.lower().endswith((".dcm", ".dicom")) or "." not in path.name:
            header = read_dicom_header(path)
        else:
            return None
    except InputError:
        return None
    value = str(header.get("StudyDate", "") or "")
    try:
        return normalise_date(value, str(path)) if value else None
    except InputError:
        return None  # a malformed date orders nothing


def assign_roles(
    images: list[str], priors: list[str], dates: dict[str, str] | None = None
) -> list[StudyImage]:
    """Priors first (oldest first), then the current study's images. Without priors, StudyDates
    split the images when they differ; with one date or none, every image is current and
    there is no comparison (``compared`` is False)."""
    known = dict(dates or {})
    for path in [*priors, *images]:
        if path not in known:
            found = study_date(Path(path))
            if found is not None:
                known[path] = found
    if not priors:
        dated = {known[p] for p in images if p in known}
        if len(images) > 1 and len(dated) > 1 and all(p in known for p in images):
            latest = max(dated)
            priors = [p for p in images if known[p] < latest]
            images = [p for p in images if known[p] == latest]
    ordered = sorted(priors, key=lambda p: known.get(p, ""))
    return [StudyImage(p, "prior", known.get(p)) for p in ordered] + [
        StudyImage(p, "current", known.get(p)) for p in images
    ]


def compared(studies: list[StudyImage]) -> bool:
    return any(study.role == "prior" for study in studies)


def study_views(
    studies: list[StudyImage], slices: int, question: str = ""
) -> list[tuple[str, Image.Image]]:
    """Every study's views as ``(label, image)``; with a prior among them, each label starts
    with its study's role and date, and each image carries its role."""
    with_roles = compared(studies)
    views: list[tuple[str, Image.Image]] = []
    for study in studies:
        for view in question_views(Path(study.path), slices, question):
            views.append(_study_view(study, view, with_roles))
    return views


def _study_view(study: StudyImage, view: View, with_roles: bool) -> tuple[str, Image.Image]:
    name = Path(study.path).name
    if not with_roles:
        return view.label or name, view.image
    image = view.image
    label = f"{study.label}: {view.label or name}"
    labelled(image, label, source_of(image, name))
    image.info[ROLE_KEY] = study.role
    return label, image


def role_of(image: Image.Image) -> str:
    value = image.info.get(ROLE_KEY, "")
    return value if isinstance(value, str) else ""


def has_prior(images: list[Image.Image]) -> bool:
    return any(role_of(image) == "prior" for image in images)
