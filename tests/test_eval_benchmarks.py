"""Benchmark loaders: the shared data's real files, small layout fixtures, and the hub path."""

from __future__ import annotations

import builtins
import csv
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from suwen.errors import InputError
from suwen.evaluate.benchmarks import (
    BENCHMARKS,
    DatasetsMissingError,
    benchmark_named,
    load_benchmark,
)


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_vqa_rad_from_shared_data(shared_data: Path, cache: Path) -> None:
    samples = load_benchmark("VQA-RAD", shared_data, cache)
    assert len(samples) == 451
    kinds = Counter(s.kind for s in samples)
    assert kinds == {"yes_no": 251, "open": 200}  # closed exactly when the answer is yes/no
    first = next(s for s in samples if s.id == "vqa-rad-11")
    assert first.gold == "yes" and first.body_part == "CHEST"
    assert first.prompt == (
        "Is there evidence of an aortic aneurysm?\nPlease output 'yes' or 'no'(no extra output)."
    )
    image = Path(first.images[0])
    assert image.is_file()
    assert first.exclude_image_sha256 == [hashlib.sha256(image.read_bytes()).hexdigest()]
    open_one = next(s for s in samples if s.kind == "open")
    assert open_one.prompt.endswith("\nPlease answer the question concisely.")


def test_pubmedqa_test_split_with_its_pmid_guarded(shared_data: Path, cache: Path) -> None:
    samples = load_benchmark("PubMedQA", shared_data, cache)
    assert len(samples) == 500
    truth = json.loads((shared_data / "pubmedqa/test_ground_truth.json").read_text())
    sample = samples[0]
    pmid = sample.id.removeprefix("pubmedqa-")
    assert sample.exclude_pmids == [pmid]
    assert sample.options[sample.gold] == truth[pmid]
    assert sample.choices == ["A.yes", "B.no", "C.maybe"]
    assert sample.prompt.startswith("Context: ")
    assert sample.prompt.endswith(
        f"\n\nQuestion: {sample.question}\nOptions: \nA.yes\nB.no\nC.maybe\n"
        "Answer with the option's letter from the given choices directly."
    )
    question = sample.to_question()
    assert question.exclude_pmids == [pmid] and question.answer_format.kind == "choice"
    assert question.text.startswith("Context: ") and sample.question in question.text
    assert sample.to_question(guard=False).exclude_pmids == []


def test_medqa_and_mmlu_from_shared_data(shared_data: Path, cache: Path) -> None:
    medqa = load_benchmark("MedQA-USMLE", shared_data, cache)
    assert len(medqa) == 1273
    assert medqa[0].choices[0].startswith("A. ") and medqa[0].gold in "ABCD"
    assert medqa[0].prompt.startswith(f"\nQuestion: {medqa[0].question}\nOptions: \nA. ")
    mmlu = load_benchmark("mmlu-med", shared_data, cache)
    assert len(mmlu) == 1089
    assert Counter(s.question_type for s in mmlu)["anatomy"] == 135
    assert mmlu[0].choices[0].startswith("A.") and not mmlu[0].choices[0].startswith("A. ")


def test_limit_and_seed_pick_the_same_questions_every_time(shared_data: Path, cache: Path) -> None:
    first = [s.id for s in load_benchmark("VQA-RAD", shared_data, cache, limit=20, seed=7)]
    again = [s.id for s in load_benchmark("VQA-RAD", shared_data, cache, limit=20, seed=7)]
    other = [s.id for s in load_benchmark("VQA-RAD", shared_data, cache, limit=20, seed=8)]
    assert first == again and len(first) == 20 and first != other
    everything = [s.id for s in load_benchmark("VQA-RAD", shared_data, cache)]
    assert first == [i for i in everything if i in set(first)]  # benchmark order kept


def test_hub_loaders_need_datasets(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_datasets(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "datasets":
            raise ModuleNotFoundError("No module named 'datasets'", name="datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    for name in (
        "VQA-RAD",
        "PathVQA",
        "MedQA-USMLE",
        "PubMedQA",
        "MedMCQA",
        "MMLU-Med",
        "MMMU-Med",
        "MedXpertQA-MM",
        "Medbullets-op4",
    ):
        with pytest.raises(DatasetsMissingError, match=r"pip install -e '\.\[eval\]'"):
            load_benchmark(name, None, cache)


def test_names_and_errors(tmp_path: Path, cache: Path) -> None:
    assert benchmark_named("vqa_rad").name == "VQA-RAD"
    assert benchmark_named("MedQA").name == "MedQA-USMLE"
    assert len({b.name for b in BENCHMARKS}) == 17
    with pytest.raises(InputError, match="unknown benchmark"):
        benchmark_named("imagenet")
    with pytest.raises(InputError, match="no MedQA-USMLE files"):
        load_benchmark("MedQA", tmp_path, cache)
    bad = tmp_path / "us_4options_test.jsonl"
    bad.write_text('{"question": "q", "options": {"A": "x"}, "answer_idx": "A"}\nnot json\n')
    with pytest.raises(InputError, match=r"us_4options_test\.jsonl:2"):
        load_benchmark("MedQA", tmp_path, cache)


# -- small layout fixtures for the benchmarks MedEvalKit reads as files ------------------------


def _image(path: Path, shade: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(path)


def test_slake_layout(tmp_path: Path, cache: Path) -> None:
    _image(tmp_path / "imgs/xmlab1/source.jpg")
    rows = [
        {
            "qid": 1,
            "img_name": "xmlab1/source.jpg",
            "question": "Which organ?",
            "answer": "Liver",
            "answer_type": "CLOSED",
            "q_lang": "en",
            "modality": "CT",
            "location": "Abdomen",
        },
        {
            "qid": 2,
            "img_name": "xmlab1/source.jpg",
            "question": "Is it normal?",
            "answer": "Yes",
            "answer_type": "CLOSED",
            "q_lang": "en",
            "modality": "CT",
            "location": "Abdomen",
        },
        {
            "qid": 3,
            "img_name": "xmlab1/source.jpg",
            "question": "What is shown?",
            "answer": "Liver cancer",
            "answer_type": "OPEN",
            "q_lang": "en",
            "modality": "CT",
            "location": "Abdomen",
        },
        {
            "qid": 4,
            "img_name": "xmlab1/source.jpg",
            "question": "哪个器官?",
            "answer": "肝",
            "answer_type": "OPEN",
            "q_lang": "zh",
        },
    ]
    (tmp_path / "test.json").write_text(json.dumps(rows, ensure_ascii=False))
    samples = load_benchmark("SLAKE", tmp_path, cache)
    # As MedEvalKit runs SLAKE: the closed prompt for every CLOSED question (a yes/no answer
    # too), both languages, MedEvalKit's Chinese prompts for the Chinese ones.
    assert [s.kind for s in samples] == ["closed", "closed", "open", "open"]
    assert [s.lang for s in samples] == ["en", "en", "en", "zh"]
    closed = "\nAnswer the question using a single word or phrase."
    assert samples[0].prompt == "Which organ?" + closed
    assert samples[1].prompt == "Is it normal?" + closed
    assert samples[3].prompt == "哪个器官?\n请简要回答该问题。"
    assert samples[0].modality == "CT" and samples[0].exclude_image_sha256
    english = load_benchmark("SLAKE", tmp_path, cache, lang="en")
    assert [s.id for s in english] == [s.id for s in samples[:3]]
    chinese = load_benchmark("SLAKE", tmp_path, cache, lang="zh")
    assert [s.id for s in chinese] == ["slake-4"]


def test_pmc_vqa_layout(tmp_path: Path, cache: Path) -> None:
    _image(tmp_path / "figures/f1.jpg")
    with (tmp_path / "test_2.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "index",
                "Figure_path",
                "Caption",
                "Question",
                "Choice A",
                "Choice B",
                "Choice C",
                "Choice D",
                "Answer",
                "split",
            ]
        )
        writer.writerow(
            [
                "0",
                "f1.jpg",
                "cap",
                "What modality?",
                " A:CT",
                " B:MRI",
                " C:US",
                " D:PET",
                "B",
                "test",
            ]
        )
    [sample] = load_benchmark("PMC-VQA", tmp_path, cache)
    assert sample.options == {"A": "CT", "B": "MRI", "C": "US", "D": "PET"}
    assert sample.choices[1] == " B:MRI" and sample.gold == "B"
    assert benchmark_named("PMC-VQA").extract_answer_tag is False


def test_omnimedvqa_layout(tmp_path: Path, cache: Path) -> None:
    _image(tmp_path / "Images/a/1.png")
    folder = tmp_path / "QA_information/Open-access"
    folder.mkdir(parents=True)
    rows = [
        {
            "question_id": "q1",
            "question": "What is it?",
            "gt_answer": "Fundus",
            "option_A": "CT",
            "option_B": "Fundus",
            "image_path": "Images/a/1.png",
            "question_type": "Modality Recognition",
            "modality_type": "Fundus Photography",
        }
    ]
    (folder / "set.json").write_text(json.dumps(rows))
    [sample] = load_benchmark("OmniMedVQA", tmp_path, cache)
    assert sample.gold == "B" and sample.choices == ["A. CT", "B. Fundus"]
    assert sample.modality == "Fundus Photography" and Path(sample.images[0]).is_file()


def test_iu_xray_and_medxpertqa_layouts(tmp_path: Path, cache: Path) -> None:
    _image(tmp_path / "iu/images/1.png", 1)
    _image(tmp_path / "iu/images/2.png", 2)
    (tmp_path / "iu/test.json").write_text(
        json.dumps(
            [
                {
                    "id": "open_i_1",
                    "image": ["1.png", "2.png"],
                    "findings": "Clear lungs.",
                    "impression": "Normal.",
                },
                {"id": "open_i_2", "image": ["1.png"], "findings": " ", "impression": ""},
            ]
        )
    )
    [report] = load_benchmark("IU-Xray", tmp_path / "iu", cache)
    assert report.kind == "report" and len(report.exclude_image_sha256) == 2
    assert report.gold == "Findings: Clear lungs. Impression: Normal.."
    assert report.prompt.startswith("You are a helpful assistant. Please generate a report")

    _image(tmp_path / "mx/MM/images/x.jpeg")
    (tmp_path / "mx/MM/test.jsonl").write_text(
        json.dumps(
            {
                "id": "MM-1",
                "question": "Diagnosis?",
                "options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"},
                "label": "C",
                "images": ["x.jpeg"],
                "question_type": "Reasoning",
                "body_system": "Skeletal",
            }
        )
        + "\n"
    )
    [mm] = load_benchmark("MedXpertQA-MM", tmp_path / "mx", cache)
    assert mm.gold == "C" and mm.choices[4] == "E. e" and Path(mm.images[0]).is_file()


class _HubRows(list[dict[str, Any]]):
    """A loaded hub split as the loaders use it: iterable rows, and ``cast_column``."""

    def cast_column(self, column: str, feature: Any) -> _HubRows:
        assert feature == ("Image", False), "images must stay undecoded bytes"
        return self


def _fake_datasets(splits: dict[tuple[str, str | None], list[dict[str, Any]]]) -> Any:
    """A stand-in ``datasets`` module serving ``splits`` (hub id, split) -> rows, offline."""
    import types

    module = types.ModuleType("datasets")

    def load_dataset(path: str, name: str | None = None, split: str | None = None) -> _HubRows:
        return _HubRows(splits[(path, split)])

    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    module.Image = lambda decode=True: ("Image", decode)  # type: ignore[attr-defined]
    return module


def test_hub_loaders_map_the_hub_columns_like_the_local_files(
    shared_data: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub path (no --data) on rows in the hub datasets' layouts, built from the same
    questions as the shared files: the samples must match the local loaders' field by field."""
    import sys

    root = shared_data / "vqa_rad"
    testset = json.loads((root / "testset.json").read_text("utf-8"))
    vqa_rows = [
        {
            "image": {"bytes": (root / "images" / r["image_name"]).read_bytes(), "path": "x.jpg"},
            "question": r["question"],
            "answer": r["answer"],
        }
        for r in testset
    ]
    medqa_file = shared_data / "mcq" / "medqa" / "us_4options_test.jsonl"
    medqa_rows = [json.loads(line) for line in medqa_file.read_text("utf-8").splitlines() if line]
    splits = {
        ("flaviagiammarino/vqa-rad", "test"): vqa_rows,
        ("GBaker/MedQA-USMLE-4-options", "test"): medqa_rows,
    }
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(splits))

    local = load_benchmark("VQA-RAD", shared_data, cache)
    hub = load_benchmark("VQA-RAD", None, cache)
    assert len(hub) == len(local) == 451
    for ours, theirs in zip(hub, local, strict=True):
        assert (ours.question, ours.gold, ours.kind, ours.prompt) == (
            theirs.question,
            theirs.gold,
            theirs.kind,
            theirs.prompt,
        )
        # The image is stored once by content, and the leakage guard hashes the same bytes.
        assert ours.exclude_image_sha256 == theirs.exclude_image_sha256
        assert (
            hashlib.sha256(Path(ours.images[0]).read_bytes()).hexdigest()
            == (ours.exclude_image_sha256[0])
        )
    local_mcq = load_benchmark("MedQA-USMLE", shared_data, cache)
    hub_mcq = load_benchmark("MedQA-USMLE", None, cache)
    assert [s.model_dump() for s in hub_mcq] == [s.model_dump() for s in local_mcq]
