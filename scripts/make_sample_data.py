"""Rebuild ``suwen/sample_data/`` (the sample data that ships in the package) from the shared
data folder, deterministically:

    python scripts/make_sample_data.py ../shared/data suwen/sample_data

What it takes (the README beside the data gives sources and licences):
- 300 PubMedQA PQA-L records (``ori_pqal.json`` layout) outside PubMedQA's official test split,
  so that evaluating on that split never finds its own abstract in the demo index;
- 40 VQA-RAD training images that VQA-RAD's test split never uses (chest, head and abdomen in
  turn), with every training question about them;
- the first closed test question of each organ, with its image (none of them in the case index);
- one DICOM file (pydicom's CT_small.dcm) and one NIfTI volume (MONAI's anatomical.nii, gzipped).
The licence texts in ``LICENSES/`` are copied by hand (they do not change).
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ABSTRACTS = 300
CASE_IMAGES = 40
ORGANS = ("CHEST", "HEAD", "ABD")  # the first test question is the demo's


def main(shared: Path, out: Path) -> None:
    write_pubmedqa(shared / "pubmedqa", out / "pubmedqa")
    write_vqa_rad(shared / "vqa_rad", out / "vqa_rad")
    imaging = out / "imaging"
    imaging.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shared / "imaging" / "dicom" / "CT_small.dcm", imaging / "CT_small.dcm")
    raw = (shared / "imaging" / "nifti" / "anatomical.nii").read_bytes()
    # mtime=0: the same bytes on every rebuild.
    (imaging / "anatomical.nii.gz").write_bytes(gzip.compress(raw, mtime=0))


def write_pubmedqa(source: Path, target: Path) -> None:
    records: dict[str, Any] = json.loads((source / "ori_pqal.json").read_text(encoding="utf-8"))
    test_split = json.loads((source / "test_ground_truth.json").read_text(encoding="utf-8"))
    kept = sorted((pmid for pmid in records if pmid not in test_split), key=int)[:ABSTRACTS]
    target.mkdir(parents=True, exist_ok=True)
    subset = {pmid: records[pmid] for pmid in kept}
    (target / "ori_pqal.json").write_text(json.dumps(subset, indent=1) + "\n", encoding="utf-8")


def write_vqa_rad(source: Path, target: Path) -> None:
    train: list[dict[str, Any]] = json.loads((source / "trainset.json").read_text("utf-8"))
    test: list[dict[str, Any]] = json.loads((source / "testset.json").read_text("utf-8"))
    test_images = {row["image_name"] for row in test}
    cases = _case_images(train, test_images)
    questions = [_first_closed(test, organ) for organ in ORGANS]
    (target / "images").mkdir(parents=True, exist_ok=True)
    for name in sorted(cases | {row["image_name"] for row in questions}):
        shutil.copyfile(source / "images" / name, target / "images" / name)
    kept_train = [row for row in train if row["image_name"] in cases]
    _write_json(target / "trainset.json", kept_train)
    _write_json(target / "testset.json", questions)


def _case_images(train: list[dict[str, Any]], test_images: set[str]) -> set[str]:
    by_organ: dict[str, list[str]] = {organ: [] for organ in ORGANS}
    for row in train:
        name, organ = row["image_name"], row["image_organ"].strip().upper()
        if name not in test_images and organ in by_organ and name not in by_organ[organ]:
            by_organ[organ].append(name)
    for names in by_organ.values():
        names.sort()
    chosen: list[str] = []
    while len(chosen) < CASE_IMAGES and any(by_organ.values()):
        for organ in ORGANS:
            if by_organ[organ] and len(chosen) < CASE_IMAGES:
                chosen.append(by_organ[organ].pop(0))
    return set(chosen)


def _first_closed(test: list[dict[str, Any]], organ: str) -> dict[str, Any]:
    return next(
        row
        for row in test
        if row["answer_type"] == "CLOSED" and row["image_organ"].strip().upper() == organ
    )


def _write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
