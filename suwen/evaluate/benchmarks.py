"""Benchmark loaders: MedEvalKit's benchmarks as typed ``Sample`` lists.

Each benchmark reads either a local layout (the files MedEvalKit or the dataset's authors ship,
as found under ``--data``) or the public hub dataset MedEvalKit uses, through ``datasets``
(imported only then; ``pip install -e '.[eval]'``). Options are kept exactly as MedEvalKit
formats them (``choices``: 'A. x' for some benchmarks, 'A.x' for others) because both its
prompt and its scorer see them that way.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from suwen.agent.prompts import REPORT_TASK
from suwen.digests import sha256_of
from suwen.errors import InputError, SuwenError
from suwen.evaluate import prompts
from suwen.evaluate.scoring_medevalkit import Family
from suwen.files import atomic_write_bytes
from suwen.types import AnswerFormat, Question

Kind = Literal["choice", "yes_no", "closed", "open", "report"]
PromptStyle = Literal["medevalkit", "mmmu", "mimic"]

LETTERS = "ABCDEFGHIJ"


class Sample(BaseModel):
    """One benchmark item, everything a prompt, a scorer and the leakage guard need."""

    id: str
    benchmark: str
    question: str
    context: str | None = Field(None, description="PubMedQA's abstract, joined by newlines")
    images: list[str] = Field(default_factory=list, description="Image file paths")
    options: dict[str, str] = Field(default_factory=dict, description="Letter -> option text")
    choices: list[str] = Field(
        default_factory=list, description="Options exactly as MedEvalKit writes them"
    )
    gold: str = Field(description="Option letter, 'yes'/'no', or the reference answer")
    kind: Kind
    question_type: str | None = None
    modality: str | None = None
    body_part: str | None = None
    exclude_pmids: list[str] = Field(default_factory=list)
    exclude_image_sha256: list[str] = Field(default_factory=list)
    prompt_style: PromptStyle = "medevalkit"
    lang: prompts.Lang = Field("en", description="Question language (SLAKE has en and zh)")
    image_labels: bool = Field(
        False, description="MedEvalKit sends '<image_i>: ' before each image (its 'images' layout)"
    )

    @property
    def prompt(self) -> str:
        """The MedEvalKit prompt the plain model is sent."""
        if self.prompt_style == "mmmu":
            if self.kind == "choice":
                return prompts.mmmu_choice_prompt(self.question, list(self.options.values()))
            return prompts.mmmu_open_prompt(self.question)
        if self.kind == "choice":
            if self.context is not None:
                return prompts.pubmedqa_prompt(self.context, self.question, self.choices)
            return prompts.multiple_choice_prompt(self.question, self.choices)
        if self.kind == "yes_no":
            return prompts.yes_no_prompt(self.question)
        if self.kind == "closed":
            return prompts.closed_prompt(self.question, self.lang)
        if self.kind == "open":
            return prompts.open_prompt(self.question, self.lang)
        if self.prompt_style == "mimic":
            return prompts.mimic_report_prompt()
        return prompts.report_prompt()

    def to_question(self, *, guard: bool = True) -> Question:
        """The agent's view: the question (with PubMedQA's context), its answer form, and what
        retrieval must not see unless the leakage guard is off."""
        # A report question is the agent's own report task (as `suwen report` asks it); any
        # other text would reach the report prompt as a clinical indication.
        text = self.question if self.kind != "report" else REPORT_TASK
        if self.context is not None:
            text = f"Context: {self.context}\n\n{text}"
        return Question(
            text=text,
            images=list(self.images),
            answer_format=AnswerFormat(kind=self.kind, options=dict(self.options)),
            exclude_pmids=list(self.exclude_pmids) if guard else [],
            exclude_image_sha256=list(self.exclude_image_sha256) if guard else [],
        )


class DatasetsMissingError(SuwenError):
    """The hub loaders need the optional `datasets` package."""


@dataclass(frozen=True)
class LoadContext:
    """Where a loader reads from and may cache decoded hub images."""

    data: Path | None
    cache_dir: Path


# --------------------------------------------------------------------------------------------
# Small helpers


def letter_choices(options: dict[str, str], sep: str) -> list[str]:
    """'A. text' (sep='. ') or 'A.text' (sep='.'), as the benchmark's MedEvalKit loader does."""
    return [f"{letter}{sep}{text}" for letter, text in options.items()]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read benchmark file: {exc}") from exc


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read benchmark file: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not a JSON line: {exc}") from exc
        if not isinstance(row, dict):
            raise InputError(f"{path}:{number}: expected a JSON object")
        yield row


def _field(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise InputError(f"{where}: missing field {key!r}")
    return row[key]


def _find(data: Path, *relative: str) -> Path | None:
    """The first existing candidate under ``data`` (the layout's own folder, or a parent)."""
    for rel in relative:
        candidate = data / rel
        if candidate.exists():
            return candidate
    return None


def _require(data: Path, benchmark: str, *relative: str) -> Path:
    found = _find(data, *relative)
    if found is None:
        raise InputError(f"{data}: no {benchmark} files here (looked for {', '.join(relative)})")
    return found


def _yes_no_kind(answer: str) -> Kind:
    # MedEvalKit (VQA-RAD, PathVQA): a question is closed exactly when its answer is yes or no.
    return "yes_no" if answer.strip().lower() in ("yes", "no") else "open"


# --------------------------------------------------------------------------------------------
# Hub access through `datasets`, imported only when a hub loader runs.


def load_hub(path: str, name: str | None = None, split: str | None = None) -> Any:
    try:
        import datasets
    except ModuleNotFoundError as exc:
        raise DatasetsMissingError(
            f"benchmark {path}: loading from the hub needs `datasets`; "
            "run `pip install -e '.[eval]'` (or pass --data with a local copy)"
        ) from exc
    try:
        return datasets.load_dataset(path, name, split=split)
    except Exception as exc:  # network, auth, missing config: all one line for the user
        raise InputError(f"benchmark {path}: cannot load from the hub: {exc}") from exc


def _undecoded(dataset: Any, column: str) -> Any:
    """Keep the image column as the original file bytes, so the leakage guard hashes the same
    bytes an image index would have hashed."""
    import datasets

    return dataset.cast_column(column, datasets.Image(decode=False))


def _store_image(value: Any, cache: Path) -> tuple[str, str]:
    """Write a hub image (``{'bytes', 'path'}``) to the cache by content; return path, sha256."""
    if not isinstance(value, dict) or not value.get("bytes"):
        raise InputError(f"hub image {value!r:.80}: expected undecoded image bytes")
    data: bytes = value["bytes"]
    digest = hashlib.sha256(data).hexdigest()
    suffix = Path(str(value.get("path") or "")).suffix.lower() or ".png"
    target = cache / f"{digest}{suffix}"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, data)
    return str(target), digest


# --------------------------------------------------------------------------------------------
# VQA-RAD


def _vqa_rad_local(data: Path) -> list[Sample]:
    testset = _require(data, "VQA-RAD", "testset.json", "vqa_rad/testset.json")
    images = testset.parent / "images"
    rows = _read_json(testset)
    if not isinstance(rows, list):
        raise InputError(f"{testset}: expected a list of questions")
    samples = []
    for row in rows:
        where = f"{testset} qid {row.get('qid')}"
        image = images / str(_field(row, "image_name", where))
        if not image.is_file():
            raise InputError(f"{where}: image not found: {image}")
        answer = str(_field(row, "answer", where)).strip()
        samples.append(
            Sample(
                id=f"vqa-rad-{row.get('qid')}",
                benchmark="VQA-RAD",
                question=str(_field(row, "question", where)),
                images=[str(image)],
                gold=answer.lower(),
                kind=_yes_no_kind(answer),
                question_type=row.get("question_type"),
                modality="radiology",
                body_part=row.get("image_organ"),
                exclude_image_sha256=[sha256_of(image)],
            )
        )
    return samples


def _vqa_hub(benchmark: str, hub_id: str, ctx: LoadContext) -> list[Sample]:
    dataset = _undecoded(load_hub(hub_id, split="test"), "image")
    samples = []
    for index, row in enumerate(dataset):
        path, digest = _store_image(row["image"], ctx.cache_dir / benchmark)
        answer = str(row["answer"]).strip()
        samples.append(
            Sample(
                id=f"{benchmark.lower()}-{index}",
                benchmark=benchmark,
                question=str(row["question"]),
                images=[path],
                gold=answer.lower(),
                kind=_yes_no_kind(answer),
                modality="pathology" if benchmark == "PathVQA" else "radiology",
                exclude_image_sha256=[digest],
            )
        )
    return samples


def load_vqa_rad(ctx: LoadContext) -> list[Sample]:
    if ctx.data is not None:
        return _vqa_rad_local(ctx.data)
    return _vqa_hub("VQA-RAD", "flaviagiammarino/vqa-rad", ctx)


def load_path_vqa(ctx: LoadContext) -> list[Sample]:
    if ctx.data is not None:
        raise InputError(f"{ctx.data}: PathVQA has no local layout; omit --data to use the hub")
    return _vqa_hub("PathVQA", "flaviagiammarino/path-vqa", ctx)


# --------------------------------------------------------------------------------------------
# SLAKE (local layout: test.json + imgs/, as BoKelvin/SLAKE unpacks), both languages as
# MedEvalKit runs it: its closed-question prompt for every CLOSED question (yes/no answers too),
# its open prompt for OPEN ones, the Chinese prompts for Chinese questions.


def load_slake(ctx: LoadContext) -> list[Sample]:
    root = ctx.data if ctx.data is not None else _hub_snapshot("BoKelvin/SLAKE", ctx)
    test = _require(root, "SLAKE", "test.json", "SLAKE/test.json", "slake/test.json")
    samples = []
    for index, row in enumerate(_read_json(test)):
        where = f"{test} item {index}"
        lang = str(row.get("q_lang", "en"))
        if lang not in ("en", "zh"):
            raise InputError(f"{where}: q_lang {lang!r} is neither 'en' nor 'zh'")
        image = test.parent / "imgs" / str(_field(row, "img_name", where))
        answer = str(_field(row, "answer", where))
        answer_type = str(_field(row, "answer_type", where))
        samples.append(
            Sample(
                id=f"slake-{row.get('qid', index)}",
                benchmark="SLAKE",
                question=str(_field(row, "question", where)),
                images=[str(image)],
                gold=answer,
                kind="open" if answer_type == "OPEN" else "closed",
                question_type=answer_type,
                modality=row.get("modality"),
                body_part=row.get("location"),
                exclude_image_sha256=[sha256_of(image)] if image.exists() else [],
                lang="zh" if lang == "zh" else "en",
            )
        )
    return samples


def _hub_snapshot(repo: str, ctx: LoadContext) -> Path:
    """Hub repositories MedEvalKit reads as files (SLAKE, PMC-VQA): a local snapshot."""
    target = ctx.cache_dir / repo.replace("/", "__")
    if target.exists():
        return target
    try:
        from huggingface_hub import snapshot_download
    except ModuleNotFoundError as exc:
        raise DatasetsMissingError(
            f"benchmark {repo}: needs huggingface_hub; run `pip install -e '.[eval]'`"
        ) from exc
    try:
        snapshot_download(repo, local_dir=str(target), repo_type="dataset")
    except Exception as exc:
        raise InputError(f"benchmark {repo}: cannot download: {exc}") from exc
    raise InputError(
        f"{target}: downloaded {repo}; unpack its image archive(s) there, then run again"
    )


# --------------------------------------------------------------------------------------------
# PMC-VQA (test_2.csv + figures/ or images/)


def load_pmc_vqa(ctx: LoadContext) -> list[Sample]:
    root = ctx.data if ctx.data is not None else _hub_snapshot("RadGenome/PMC-VQA", ctx)
    table = _require(root, "PMC-VQA", "test_2.csv", "PMC-VQA/test_2.csv")
    samples = []
    with table.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        for number, row in enumerate(reader, 2):
            if len(row) != 10:
                raise InputError(f"{table}:{number}: expected 10 columns, got {len(row)}")
            index, figure, _caption, question, a, b, c, d, answer, _split = row
            image = table.parent / "figures" / figure
            if not image.exists():
                image = table.parent / "images" / figure
            # MedEvalKit shows PMC-VQA's choices as stored (they carry their own 'A:' prefix).
            choices = [a, b, c, d]
            options = {
                letter: _strip_letter(text) for letter, text in zip("ABCD", choices, strict=True)
            }
            samples.append(
                Sample(
                    id=f"pmc-vqa-{index}",
                    benchmark="PMC-VQA",
                    question=question,
                    images=[str(image)],
                    options=options,
                    choices=choices,
                    gold=answer.strip(),
                    kind="choice",
                    exclude_image_sha256=[sha256_of(image)] if image.exists() else [],
                )
            )
    return samples


def _strip_letter(text: str) -> str:
    return re.sub(r"^\s*[A-J]\s*[:.)]\s*", "", text).strip()


# --------------------------------------------------------------------------------------------
# OmniMedVQA (QA_information/Open-access/*.json + Images/)


def load_omnimedvqa(ctx: LoadContext) -> list[Sample]:
    if ctx.data is None:
        raise InputError(
            "OmniMedVQA: no hub dataset to read through `datasets`; download "
            "foreverbeliever/OmniMedVQA, unpack it, and pass --data PATH"
        )
    folder = _require(
        ctx.data,
        "OmniMedVQA",
        "QA_information/Open-access",
        "OmniMedVQA/QA_information/Open-access",
    )
    root = folder.parent.parent
    samples: list[Sample] = []
    for file in sorted(folder.glob("*.json")):
        for row in _read_json(file):
            where = f"{file} question {row.get('question_id')}"
            options = {
                letter: str(row[f"option_{letter}"])
                for letter in "ABCD"
                if f"option_{letter}" in row
            }
            gt = str(_field(row, "gt_answer", where))
            gold = next((k for k, v in options.items() if v == gt), gt)
            image = root / str(_field(row, "image_path", where))
            samples.append(
                Sample(
                    id=f"omnimedvqa-{row.get('question_id', len(samples))}",
                    benchmark="OmniMedVQA",
                    question=str(_field(row, "question", where)),
                    images=[str(image)],
                    options=options,
                    choices=letter_choices(options, ". "),
                    gold=gold,
                    kind="choice",
                    question_type=row.get("question_type"),
                    modality=row.get("modality_type"),
                    exclude_image_sha256=[sha256_of(image)] if image.exists() else [],
                )
            )
    return samples


# --------------------------------------------------------------------------------------------
# MMMU medical subjects (validation split, MMMU's own prompt layout)

MMMU_MEDICAL = (
    "Basic_Medical_Science",
    "Clinical_Medicine",
    "Diagnostics_and_Laboratory_Medicine",
    "Pharmacy",
    "Public_Health",
)


def load_mmmu_medical(ctx: LoadContext) -> list[Sample]:
    if ctx.data is not None:
        raise InputError(f"{ctx.data}: MMMU has no local layout; omit --data to use the hub")
    samples = []
    for subject in MMMU_MEDICAL:
        dataset = _undecoded(load_hub("MMMU/MMMU", subject, split="validation"), "image_1")
        for row in dataset:
            options = ast.literal_eval(row["options"]) if row["options"] else []
            images = []
            digests = []
            if row.get("image_1"):
                path, digest = _store_image(row["image_1"], ctx.cache_dir / "MMMU")
                images, digests = [path], [digest]
            is_choice = row["question_type"] == "multiple-choice"
            samples.append(
                Sample(
                    id=str(row["id"]),
                    benchmark="MMMU-Med",
                    question=str(row["question"]),
                    images=images,
                    options={LETTERS[i]: str(o) for i, o in enumerate(options)},
                    choices=[f"({LETTERS[i]}) {o}" for i, o in enumerate(options)],
                    gold=str(row["answer"]),
                    kind="choice" if is_choice else "closed",
                    question_type=subject,
                    exclude_image_sha256=digests,
                    prompt_style="mmmu",
                )
            )
    return samples


# --------------------------------------------------------------------------------------------
# MedXpertQA (MM: images/ beside the json; Text)


def _medxpertqa(split: Literal["MM", "Text"], ctx: LoadContext) -> list[Sample]:
    benchmark = f"MedXpertQA-{split}"
    image_root: Path | None = None
    rows: Iterable[dict[str, Any]]
    if ctx.data is not None:
        name = "mm" if split == "MM" else "text"
        file = _require(
            ctx.data,
            benchmark,
            f"{split}/test.jsonl",
            f"{name}/test.jsonl",
            f"MedXpertQA/{split}/test.jsonl",
        )
        rows = list(_iter_jsonl(file))
        image_root = _find(file.parent, "images", "../images")
    else:
        rows = load_hub("TsinghuaC3I/MedXpertQA", split, split="test")
    samples = []
    for row in rows:
        options = {str(k): str(v) for k, v in dict(row["options"]).items()}
        images = [str((image_root or Path("images")) / name) for name in row.get("images") or []]
        samples.append(
            Sample(
                id=str(row["id"]),
                benchmark=benchmark,
                question=str(row["question"]),
                images=images,
                image_labels=bool(images),  # MedEvalKit's MedXpertQA uses its 'images' layout
                options=options,
                choices=letter_choices(options, ". "),
                gold=str(row["label"]),
                kind="choice",
                question_type=row.get("question_type"),
                body_part=row.get("body_system"),
                exclude_image_sha256=[sha256_of(Path(p)) for p in images if Path(p).exists()],
            )
        )
    return samples


def load_medxpertqa_mm(ctx: LoadContext) -> list[Sample]:
    return _medxpertqa("MM", ctx)


def load_medxpertqa_text(ctx: LoadContext) -> list[Sample]:
    return _medxpertqa("Text", ctx)


# --------------------------------------------------------------------------------------------
# Text multiple choice: MedQA, PubMedQA, MedMCQA, MMLU, Medbullets


def _medqa_sample(index: int, row: dict[str, Any], where: str) -> Sample:
    options = {str(k): str(v) for k, v in dict(_field(row, "options", where)).items()}
    return Sample(
        id=f"medqa-{index}",
        benchmark="MedQA-USMLE",
        question=str(_field(row, "question", where)),
        options=options,
        choices=letter_choices(options, ". "),
        gold=str(_field(row, "answer_idx", where)).strip(),
        kind="choice",
        question_type=row.get("meta_info"),
    )


def load_medqa(ctx: LoadContext) -> list[Sample]:
    if ctx.data is not None:
        file = _require(
            ctx.data,
            "MedQA-USMLE",
            "us_4options_test.jsonl",
            "medqa/us_4options_test.jsonl",
            "mcq/medqa/us_4options_test.jsonl",
        )
        return [_medqa_sample(i, row, f"{file}:{i + 1}") for i, row in enumerate(_iter_jsonl(file))]
    dataset = load_hub("GBaker/MedQA-USMLE-4-options", split="test")
    return [
        _medqa_sample(i, dict(row), f"GBaker/MedQA-USMLE-4-options #{i}")
        for i, row in enumerate(dataset)
    ]


PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


def _pubmedqa_sample(pmid: str, question: str, contexts: list[str], decision: str) -> Sample:
    gold = next((k for k, v in PUBMEDQA_OPTIONS.items() if v == decision.strip().lower()), None)
    if gold is None:
        raise InputError(f"PubMedQA {pmid}: answer {decision!r} is not yes/no/maybe")
    return Sample(
        id=f"pubmedqa-{pmid}",
        benchmark="PubMedQA",
        question=question,
        context="\n".join(contexts),
        options=dict(PUBMEDQA_OPTIONS),
        choices=letter_choices(PUBMEDQA_OPTIONS, "."),  # MedEvalKit: f"{letter}.{choice}"
        gold=gold,
        kind="choice",
        exclude_pmids=[pmid],
    )


def load_pubmedqa(ctx: LoadContext) -> list[Sample]:
    if ctx.data is not None:
        labelled = _require(ctx.data, "PubMedQA", "ori_pqal.json", "pubmedqa/ori_pqal.json")
        split = labelled.parent / "test_ground_truth.json"
        if not split.is_file():
            raise InputError(f"{split}: PubMedQA test split (500 PMIDs) not found")
        items = _read_json(labelled)
        truth = _read_json(split)
        samples = []
        for pmid, decision in truth.items():
            item = items.get(pmid)
            if item is None:
                raise InputError(f"{labelled}: test PMID {pmid} missing")
            where = f"{labelled} {pmid}"
            contexts = _field(item, "CONTEXTS", where)
            question = str(_field(item, "QUESTION", where))
            samples.append(_pubmedqa_sample(pmid, question, list(contexts), str(decision)))
        return samples
    dataset = load_hub("openlifescienceai/pubmedqa", split="test")
    samples = []
    for index, row in enumerate(dataset):
        data = row["data"]
        options = {str(k): str(v) for k, v in dict(data["Options"]).items()}
        pmid = str(row.get("id") or data.get("PMID") or index)
        sample = _pubmedqa_sample(
            pmid, str(data["Question"]), list(data["Context"]), options[data["Correct Option"]]
        )
        samples.append(sample)
    return samples


def load_medmcqa(ctx: LoadContext) -> list[Sample]:
    if ctx.data is not None:
        file = _require(ctx.data, "MedMCQA", "dev.json", "medmcqa/dev.json")
        rows: Iterable[dict[str, Any]] = _iter_jsonl(file)
    else:
        rows = load_hub("openlifescienceai/medmcqa", split="validation")
    samples = []
    for index, row in enumerate(rows):
        options = {"A": row["opa"], "B": row["opb"], "C": row["opc"], "D": row["opd"]}
        samples.append(
            Sample(
                id=f"medmcqa-{row.get('id', index)}",
                benchmark="MedMCQA",
                question=str(row["question"]),
                options={k: str(v) for k, v in options.items()},
                choices=letter_choices({k: str(v) for k, v in options.items()}, ". "),
                gold="ABCD"[int(row["cop"])],
                kind="choice",
                question_type=row.get("subject_name"),
            )
        )
    return samples


# MMLU-Med: the six medical subjects of Lingshu's table; MedEvalKit's own list adds nutrition,
# virology and high_school_biology (see docs/evaluation.md).
MMLU_MEDICAL = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)


def _mmlu_sample(subject: str, index: int, question: str, opts: list[str], gold: str) -> Sample:
    options = {LETTERS[i]: str(text) for i, text in enumerate(opts)}
    return Sample(
        id=f"mmlu-{subject}-{index}",
        benchmark="MMLU-Med",
        question=question,
        options=options,
        choices=letter_choices(options, "."),  # MedEvalKit's MMLU: f"{alpha}.{choice}"
        gold=gold,
        kind="choice",
        question_type=subject,
    )


def load_mmlu_medical(ctx: LoadContext) -> list[Sample]:
    samples = []
    if ctx.data is not None:
        folder = _require(
            ctx.data,
            "MMLU-Med",
            "anatomy_test.csv",
            "mmlu_med/anatomy_test.csv",
            "mcq/mmlu_med/anatomy_test.csv",
        ).parent
        for subject in MMLU_MEDICAL:
            file = folder / f"{subject}_test.csv"
            if not file.is_file():
                raise InputError(f"{file}: MMLU subject file not found")
            with file.open(encoding="utf-8", newline="") as handle:
                for index, row in enumerate(csv.reader(handle)):
                    if len(row) != 6 or row[5] not in "ABCD":
                        raise InputError(f"{file}:{index + 1}: expected question,A,B,C,D,answer")
                    samples.append(_mmlu_sample(subject, index, row[0], row[1:5], row[5]))
        return samples
    for subject in MMLU_MEDICAL:
        for index, row in enumerate(load_hub("cais/mmlu", subject, split="test")):
            gold = "ABCD"[int(row["answer"])]
            samples.append(_mmlu_sample(subject, index, row["question"], row["choices"], gold))
    return samples


def _medbullets(options_count: int, ctx: LoadContext) -> list[Sample]:
    hub_id = {4: "tuenguyen/Medical-Eval-MedBullets_op4", 5: "LangAGI-Lab/medbullets_op5"}
    if ctx.data is not None:
        raise InputError(f"{ctx.data}: Medbullets has no local layout; omit --data")
    samples = []
    for index, row in enumerate(load_hub(hub_id[options_count], split="train")):
        if options_count == 4:
            options = {str(k): str(v) for k, v in dict(row["options"]).items()}
        else:
            options = {L: str(row[f"op{L.lower()}"]) for L in "ABCDE"}
        samples.append(
            Sample(
                id=f"medbullets{options_count}-{index}",
                benchmark=f"Medbullets-op{options_count}",
                question=str(row["question"]),
                options=options,
                choices=letter_choices(options, "."),
                gold=str(row["answer_idx"]).strip(),
                kind="choice",
            )
        )
    return samples


def load_medbullets_op4(ctx: LoadContext) -> list[Sample]:
    return _medbullets(4, ctx)


def load_medbullets_op5(ctx: LoadContext) -> list[Sample]:
    return _medbullets(5, ctx)


# --------------------------------------------------------------------------------------------
# IU-Xray report generation (test.json + images/, the layout MedEvalKit ships)


def load_iu_xray(ctx: LoadContext) -> list[Sample]:
    if ctx.data is None:
        raise InputError(
            "IU-Xray: no hub dataset; put MedEvalKit's datas/IU_XRAY/test.json and the NLM "
            "images/ in a folder and pass --data PATH"
        )
    test = _require(ctx.data, "IU-Xray", "test.json", "IU_XRAY/test.json", "iu_xray/test.json")
    samples = []
    for row in _read_json(test):
        findings = str(row.get("findings", ""))
        impression = str(row.get("impression", ""))
        if not findings.strip() and not impression.strip():
            continue  # MedEvalKit skips studies with neither
        images = [test.parent / "images" / name for name in row.get("image", [])]
        samples.append(
            Sample(
                id=str(row["id"]),
                benchmark="IU-Xray",
                question="",
                images=[str(p) for p in images],
                image_labels=True,  # MedEvalKit's IU_XRAY sends its 'images' layout
                # As MedEvalKit's cal_metrics and report script build the reference: the
                # fields as stored (its "None" for an empty field only reaches the prompt).
                gold=f"Findings: {findings} Impression: {impression}.",
                kind="report",
                modality="x-ray",
                body_part="chest",
                exclude_image_sha256=[sha256_of(p) for p in images if p.exists()],
            )
        )
    return samples


# --------------------------------------------------------------------------------------------
# MIMIC-CXR and CheXpert Plus report generation: MedEvalKit's preprocessed layout (test.json +
# images/, as its MIMIC_CXR and CheXpert_Plus loaders read it) or the datasets' own public
# layouts (MIMIC-CXR-JPG with the MIMIC-CXR reports; CheXpert Plus's report CSV and PNGs).

MIMIC_SPLIT_FILES = ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz")
CHEXPERT_PLUS_CSV = "df_chexpert_plus_240401.csv"
# The reference of one study, as MedEvalKit's report script builds it from the two fields.
_REPORT_SECTION = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.MULTILINE)


def report_gold(findings: str, impression: str) -> str:
    return f"Findings: {findings} Impression: {impression}."


def _report_sample(
    benchmark: str,
    sample_id: str,
    images: list[Path],
    findings: str,
    impression: str,
    *,
    labels: bool,
    style: PromptStyle = "medevalkit",
) -> Sample | None:
    """One study to report on, or None when it has neither findings nor impression (MedEvalKit
    skips those)."""
    if not findings.strip() and not impression.strip():
        return None
    return Sample(
        id=sample_id,
        benchmark=benchmark,
        question="",
        images=[str(p) for p in images],
        image_labels=labels,
        gold=report_gold(findings, impression),
        kind="report",
        modality="x-ray",
        body_part="chest",
        prompt_style=style,
        exclude_image_sha256=[sha256_of(p) for p in images if p.exists()],
    )


def _medevalkit_reports(
    test: Path, benchmark: str, prefix: str, *, many: bool, style: PromptStyle
) -> list[Sample]:
    """MedEvalKit's test.json: rows of ``image`` (a list of names when ``many``, else one name,
    under images/), ``findings`` and ``impression``."""
    rows = _read_json(test)
    if not isinstance(rows, list):
        raise InputError(f"{test}: expected a JSON list of studies")
    samples = []
    for index, row in enumerate(rows):
        names = row.get("image", [])
        names = [names] if isinstance(names, str) else list(names)
        if not many and len(names) != 1:
            raise InputError(f"{test}: study {index}: expected one image, found {len(names)}")
        found = _report_sample(
            benchmark,
            f"{prefix}-{row.get('id', index)}",
            [test.parent / "images" / _relative(str(name), test) for name in names],
            str(row.get("findings") or ""),
            str(row.get("impression") or ""),
            labels=many,  # MIMIC_CXR sends its 'images' layout, CheXpert_Plus its 'image' one
            style=style,
        )
        if found is not None:
            samples.append(found)
    return samples


def _relative(name: str, where: Path) -> Path:
    """A file name from a benchmark file, as a path inside its folder: an absolute path or one
    climbing out with '..' is refused (a file we did not write names no file of ours)."""
    path = Path(name)
    if not name.strip() or path.is_absolute() or ".." in path.parts:
        raise InputError(f"{where}: image path {name!r} is not inside the dataset folder")
    return path


def report_sections(text: str) -> dict[str, str]:
    """A MIMIC-CXR free-text report's sections by upper-case heading ('FINDINGS:',
    'IMPRESSION:'), each flattened to one line; text before the first heading is dropped."""
    sections: dict[str, str] = {}
    matches = list(_REPORT_SECTION.finditer(text))
    for number, match in enumerate(matches):
        end = matches[number + 1].start() if number + 1 < len(matches) else len(text)
        body = " ".join(text[match.end() : end].split())
        name = " ".join(match.group(1).split()).lower()
        sections[name] = f"{sections[name]} {body}".strip() if name in sections else body
    return sections


def _csv_rows(path: Path, *columns: str) -> Iterator[dict[str, str]]:
    """The rows of a (possibly gzipped) CSV table, read as they stream (CheXpert Plus's report
    table is hundreds of MB), after checking its header names ``columns``."""
    import gzip

    try:
        with (
            gzip.open(path, "rt", encoding="utf-8", newline="")
            if path.suffix == ".gz"
            else path.open(encoding="utf-8", newline="")
        ) as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in columns if name not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}: not the expected table (no column {', '.join(missing)})")
            for row in reader:
                yield {key: value or "" for key, value in row.items() if key is not None}
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        raise InputError(f"{path}: cannot read benchmark file: {exc}") from exc


def _mimic_public(data: Path) -> list[Sample]:
    """MIMIC-CXR-JPG's test split: the split CSV's test rows grouped by study, each study's
    JPGs (files/pNN/pSUBJECT/sSTUDY/DICOM.jpg) and its report (files/pNN/pSUBJECT/sSTUDY.txt,
    in the same tree or under mimic-cxr-reports/), findings and impression read from the
    report's sections."""
    split = _require(data, "MIMIC-CXR", *MIMIC_SPLIT_FILES)
    studies: dict[tuple[str, str], list[str]] = {}
    for row in _csv_rows(split, "dicom_id", "study_id", "subject_id", "split"):
        if row["split"] == "test":
            studies.setdefault((row["subject_id"], row["study_id"]), []).append(row["dicom_id"])
    samples = []
    for (subject, study), dicoms in studies.items():
        folder = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        report = _find(
            split.parent, str(folder / f"s{study}.txt"), f"mimic-cxr-reports/{folder}/s{study}.txt"
        )
        if report is None:
            raise InputError(f"{split.parent}: no report for study s{study} (looked in files/)")
        sections = report_sections(_read_text(report))
        images = [split.parent / folder / f"s{study}" / f"{dicom}.jpg" for dicom in dicoms]
        found = _report_sample(
            "MIMIC-CXR",
            f"mimic-cxr-s{study}",
            images,
            sections.get("findings", ""),
            sections.get("impression", ""),
            labels=True,
            style="mimic",
        )
        if found is not None:
            samples.append(found)
    return samples


def _read_text(path: Path, limit: int = 1 << 20) -> str:
    try:
        if path.stat().st_size > limit:
            raise InputError(f"{path}: {path.stat().st_size} bytes, too large for a report")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read report: {exc}") from exc


def load_mimic_cxr(ctx: LoadContext) -> list[Sample]:
    if ctx.data is None:
        raise InputError(
            "MIMIC-CXR: no hub dataset (PhysioNet credentialed access); pass --data with "
            "MedEvalKit's MIMIC_CXR folder (test.json + images/) or MIMIC-CXR-JPG with its "
            "split CSV, files/ and the reports"
        )
    test = _find(ctx.data, "test.json", "MIMIC_CXR/test.json", "mimic_cxr/test.json")
    if test is not None:
        return _medevalkit_reports(test, "MIMIC-CXR", "mimic-cxr", many=True, style="mimic")
    return _mimic_public(ctx.data)


def _chexpert_plus_public(data: Path) -> list[Sample]:
    """CheXpert Plus's report table (df_chexpert_plus_240401.csv): the rows of its ``valid``
    split with their findings and impression sections; ``path_to_image`` (a .jpg path) is read
    as given, or as the PNG release stores it (PNG/... .png)."""
    table = _require(data, "CheXpert-Plus", CHEXPERT_PLUS_CSV)
    columns = ("path_to_image", "section_findings", "section_impression", "split")
    samples = []
    for row in _csv_rows(table, *columns):
        if row["split"] != "valid":
            continue
        given = _relative(row["path_to_image"], table)
        image = _find(table.parent, str(given), str(Path("PNG") / given.with_suffix(".png")))
        if image is None:
            raise InputError(f"{table.parent}: no image {given} (nor PNG/ of it)")
        found = _report_sample(
            "CheXpert-Plus",
            "chexpert-plus-" + given.with_suffix("").as_posix().replace("/", "-"),
            [image],
            row["section_findings"],
            row["section_impression"],
            labels=False,
        )
        if found is not None:
            samples.append(found)
    return samples


def load_chexpert_plus(ctx: LoadContext) -> list[Sample]:
    if ctx.data is None:
        raise InputError(
            "CheXpert-Plus: no hub dataset (Stanford AIMI download); pass --data with "
            "MedEvalKit's CheXpert_Plus folder (test.json + images/) or CheXpert Plus with "
            f"{CHEXPERT_PLUS_CSV} and its images"
        )
    test = _find(ctx.data, "test.json", "CheXpert_Plus/test.json", "chexpert_plus/test.json")
    if test is not None:
        return _medevalkit_reports(
            test, "CheXpert-Plus", "chexpert-plus", many=False, style="medevalkit"
        )
    return _chexpert_plus_public(ctx.data)


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class Benchmark:
    name: str
    load: Callable[[LoadContext], list[Sample]]
    hub_id: str
    medevalkit_family: Family
    published_key: str | None  # column in Lingshu's published table
    # MedEvalKit's PMC-VQA scorer alone skips the `<answer>` tag extraction.
    extract_answer_tag: bool = True


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("VQA-RAD", load_vqa_rad, "flaviagiammarino/vqa-rad", "vqa", "VQA-RAD"),
    Benchmark("SLAKE", load_slake, "BoKelvin/SLAKE", "slake", "SLAKE"),
    Benchmark("PathVQA", load_path_vqa, "flaviagiammarino/path-vqa", "pathvqa", "PathVQA"),
    Benchmark("PMC-VQA", load_pmc_vqa, "RadGenome/PMC-VQA", "choice", "PMC-VQA", False),
    Benchmark("OmniMedVQA", load_omnimedvqa, "foreverbeliever/OmniMedVQA", "choice", "OmniMedVQA"),
    Benchmark("MMMU-Med", load_mmmu_medical, "MMMU/MMMU", "mmmu", "MMMU-Med"),
    Benchmark(
        "MedXpertQA-MM", load_medxpertqa_mm, "TsinghuaC3I/MedXpertQA", "choice", "MedXpertQA-MM"
    ),
    Benchmark(
        "MedXpertQA-Text",
        load_medxpertqa_text,
        "TsinghuaC3I/MedXpertQA",
        "choice",
        "MedXpertQA-Text",
    ),
    Benchmark("MedQA-USMLE", load_medqa, "GBaker/MedQA-USMLE-4-options", "choice", "MedQA-USMLE"),
    Benchmark("PubMedQA", load_pubmedqa, "openlifescienceai/pubmedqa", "choice", "PubMedQA"),
    Benchmark("MedMCQA", load_medmcqa, "openlifescienceai/medmcqa", "choice", "MedMCQA"),
    Benchmark("MMLU-Med", load_mmlu_medical, "cais/mmlu", "choice", "MMLU-Med"),
    Benchmark(
        "Medbullets-op4",
        load_medbullets_op4,
        "tuenguyen/Medical-Eval-MedBullets_op4",
        "choice",
        None,
    ),
    Benchmark("Medbullets-op5", load_medbullets_op5, "LangAGI-Lab/medbullets_op5", "choice", None),
    Benchmark("IU-Xray", load_iu_xray, "IU_XRAY (MedEvalKit datas/)", "report", None),
    Benchmark("MIMIC-CXR", load_mimic_cxr, "MIMIC-CXR (PhysioNet, local)", "report", None),
    Benchmark("CheXpert-Plus", load_chexpert_plus, "CheXpert Plus (local)", "report", None),
)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(b.name): b for b in BENCHMARKS}
_ALIASES = {
    "medqa": "medqausmle",
    "mmlu": "mmlumed",
    "mmlumedical": "mmlumed",
    "mmmu": "mmmumed",
    "mmmumedicalval": "mmmumed",
    "medbullets": "medbulletsop5",
    "medxpertqa": "medxpertqamm",
    "mimiccxrjpg": "mimiccxr",
    "chexpert": "chexpertplus",
}
_BY_KEY.update({alias: _BY_KEY[target] for alias, target in _ALIASES.items()})


def benchmark_named(name: str) -> Benchmark:
    found = _BY_KEY.get(_key(name))
    if found is None:
        known = ", ".join(b.name for b in BENCHMARKS)
        raise InputError(f"--benchmark {name!r}: unknown benchmark (known: {known})")
    return found


def select(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """A deterministic subset: the same ``limit`` and ``seed`` always pick the same items, in
    the benchmark's own order (so a resumed run asks for exactly the same questions)."""
    if limit is None or limit >= len(samples):
        return samples
    if limit < 1:
        raise InputError(f"--limit {limit}: must be at least 1")
    chosen = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in chosen]


def load_benchmark(
    name: str,
    data: Path | None,
    cache_dir: Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    lang: prompts.Lang | None = None,
) -> list[Sample]:
    """A benchmark's questions (only those in ``lang`` when given), ``limit`` of them."""
    benchmark = benchmark_named(name)
    if data is not None and not data.exists():
        raise InputError(f"--data {data}: not found")
    samples = benchmark.load(LoadContext(data=data, cache_dir=cache_dir))
    if lang is not None:
        samples = [s for s in samples if s.lang == lang]
    if not samples:
        raise InputError(f"{benchmark.name}: no questions found in {data or benchmark.hub_id}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise InputError(f"{benchmark.name}: duplicate sample ids in {data or benchmark.hub_id}")
    return select(samples, limit, seed)
