"""The data Suwen passes between its layers, in one place."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    SerializerFunctionWrapHandler,
    computed_field,
    model_serializer,
)

# How PubMed is searched: dense + BM25 fused (the default), or one of them alone.
TextMethod = Literal["hybrid", "dense", "bm25"]
# How a question is answered: by the agent (look, search, reread, answer with citations), by
# the model alone (plain), or adaptively (plain first, the agent when plain is unsure).
Mode = Literal["agent", "plain", "adaptive"]
# What one pass of the agent's graph runs as; adaptive mode chooses one of them per question.
GraphMode = Literal["agent", "plain"]
# How a text encoder without a sentence-transformers config pools token vectors (auto: by model).
TextPooling = Literal["auto", "cls", "mean"]


class Document(BaseModel):
    """One article (or PDF) as read from a source file."""

    pmid: str = Field(description="PubMed id, or a stable id derived from the file for PDFs")
    title: str = ""
    text: str = ""
    year: int | None = None
    journal: str | None = None
    mesh: list[str] = Field(default_factory=list)
    source: str = Field("", description="File the document was read from")
    # PDFs keep their pages so chunks (and citations) can name a page.
    pages: list[str] | None = None


class Chunk(BaseModel):
    id: str = Field(description="Stable chunk id, e.g. '12345678#0'")
    pmid: str
    text: str
    page: int | None = None


class ImageCase(BaseModel):
    """An indexed image with its caption or report."""

    id: str
    path: str
    caption: str = ""
    modality: str | None = None
    body_part: str | None = None
    source: str | None = None
    frame: str | None = Field(None, description="Slice/frame label for volumes and series")


# Every key a hit had in JSON before text and image hits were told apart, in that order. A
# dumped hit still carries them all (null where they do not apply to its kind), so what batch
# results, --json output and saved conversations hold keeps its shape.
_HIT_JSON_KEYS = (
    *("key", "score", "kind", "index", "source", "text"),
    *("pmid", "chunk_id", "title", "year", "journal", "page"),
    *("case_id", "path", "caption", "modality", "body_part", "methods", "found_by"),
)


class HitBase(BaseModel):
    """What every search result has: its evidence key, score and provenance."""

    key: str = Field(description="Evidence key: 'pmid:<PMID>#<chunk>' or 'case:<id>'")
    score: float
    index: str = Field(description="Index the hit came from")
    source: str = Field("", description="Source file the item was ingested from")
    text: str = Field("", description="The passage, or the case's caption or report")
    # Which retrievers found it (dense, bm25, image, ...), for the trace.
    methods: list[str] = Field(default_factory=list)
    # Which agent searches found it (a PubMed query, or the image it resembles): provenance.
    found_by: list[str] = Field(default_factory=list)

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        row: dict[str, Any] = handler(self)
        return {key: row.get(key) for key in _HIT_JSON_KEYS}


class TextHit(HitBase):
    """A passage of an article (or a page of a PDF) from a PubMed text index."""

    kind: Literal["text"] = "text"
    pmid: str
    chunk_id: str = Field(description="'<PMID>#<chunk>'")
    title: str | None = None
    year: int | None = None
    journal: str | None = None
    page: int | None = None

    def as_search_json(self) -> dict[str, object]:
        """The shape `suwen search ... --json` prints."""
        row: dict[str, object] = {"id": self.key, "score": self.score, "source": self.source}
        return row | {"pmid": self.pmid, "title": self.title, "text": self.text, "page": self.page}


class ImageHit(HitBase):
    """A similar case from an image index; its ``text`` is the case's caption or report."""

    kind: Literal["image"] = "image"
    case_id: str
    path: str = Field(description="The case's image file")
    modality: str | None = None
    body_part: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def caption(self) -> str:
        return self.text

    def as_search_json(self) -> dict[str, object]:
        """The shape `suwen image search ... --json` prints."""
        row: dict[str, object] = {"id": self.key, "score": self.score, "source": self.source}
        return row | {"path": self.path, "caption": self.caption, "text": self.text}


# One search result: a passage or a similar case, told apart by ``kind``.
Hit = Annotated[TextHit | ImageHit, Field(discriminator="kind")]


ChangeKind = Literal["new", "resolved", "larger", "smaller", "stable"]


class Change(BaseModel):
    """One difference between the prior and the current study, as the look step read it."""

    kind: ChangeKind
    finding: str


class Findings(BaseModel):
    """What the **look** step reads off the image(s) and question."""

    modality: str = ""
    body_region: str = ""
    findings: list[str] = Field(default_factory=list)
    candidates: list[str] = Field(default_factory=list, description="Candidate diagnoses")
    to_check: list[str] = Field(default_factory=list, description="What to look up")
    # A follow-up (a prior study among the images): the prior's findings and what changed;
    # ``findings`` then describes the current study.
    prior_findings: list[str] = Field(default_factory=list, description="Prior study findings")
    changes: list[Change] = Field(default_factory=list, description="Prior -> current changes")


class Evidence(BaseModel):
    """A hit the **reread** step judged, with its relevance and the sentence that matters."""

    key: str
    hit: Hit
    relevance: float = Field(ge=0, le=1)
    quote: str = ""
    kept: bool = True

    def citation(self, number: int) -> Citation:
        """This evidence cited as ``[number]``."""
        hit = self.hit
        text = hit if isinstance(hit, TextHit) else None
        return Citation(
            number=number,
            key=self.key,
            pmid=text.pmid if text else None,
            case_id=hit.case_id if isinstance(hit, ImageHit) else None,
            title=text.title if text else None,
            quote=self.quote,
            page=text.page if text else None,
        )


class Citation(BaseModel):
    number: int
    key: str
    pmid: str | None = None
    case_id: str | None = None
    title: str | None = None
    quote: str = ""
    page: int | None = None


class TokenUsage(BaseModel):
    prompt: int = 0
    completion: int = 0

    def add(self, other: TokenUsage) -> None:
        self.prompt += other.prompt
        self.completion += other.completion


class TraceEvent(BaseModel):
    node: str
    message: str
    seconds: float = 0.0
    degraded: bool = Field(False, description="The step failed and the agent went on without it")


ConfidenceSource = Literal["option-probability", "yes-no-probability", "self-check", "none"]


class Confidence(BaseModel):
    """One answer's confidence before calibration, and what it was read from."""

    value: float | None = Field(None, ge=0, le=1, description="None: could not be measured")
    source: ConfidenceSource = "none"
    distribution: dict[str, float] = Field(
        default_factory=dict, description="Allowed answer -> normalised probability"
    )
    mass: float = Field(
        0.0, ge=0, le=1, description="Next-token probability on the allowed answers together"
    )
    note: str = ""


class Route(BaseModel):
    """Which way adaptive mode went for one question, and why."""

    path: GraphMode
    reason: str
    threshold: float
    plain_answer: str | None = Field(None, description="The plain model's short answer")
    plain_confidence: float | None = None
    changed: str | None = Field(
        None, description="How and why retrieval changed the plain answer (None: it did not)"
    )


class AgentResult(BaseModel):
    question: str
    mode: Mode = "agent"
    answer: str = ""
    short_answer: str | None = None
    citations: list[Citation] = Field(default_factory=list)
    evidence: list[Evidence] = Field(default_factory=list)
    findings: Findings | None = None
    rounds: int = 0
    model_calls: int = 0
    tokens: TokenUsage = Field(default_factory=TokenUsage)
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per node")
    supported: bool = False
    unsupported_sentences: list[str] = Field(default_factory=list)
    removed_citations: list[str] = Field(default_factory=list)
    trace: list[TraceEvent] = Field(default_factory=list)
    thread_id: str | None = None
    # How sure Suwen is (suwen.agent.confidence): calibrated when a calibration map for this
    # model, answer family and mode was found, else the raw value, labelled uncalibrated.
    confidence: float | None = Field(None, ge=0, le=1, description="None: not measured")
    confidence_raw: float | None = Field(None, ge=0, le=1)
    confidence_source: ConfidenceSource = "none"
    calibrated: bool = False
    answer_probabilities: dict[str, float] = Field(
        default_factory=dict, description="Each allowed answer's probability (closed forms)"
    )
    abstained: bool = Field(False, description="Confidence below the abstention threshold")
    route: Route | None = Field(None, description="Adaptive mode: the path taken and why")


class AnswerFormat(BaseModel):
    """The form a benchmark wants the short answer in (free-form for ordinary questions)."""

    kind: Literal["free", "choice", "yes_no", "closed", "open", "report"] = "free"
    options: dict[str, str] = Field(default_factory=dict, description="Letter -> option text")


class Question(BaseModel):
    """One question for the agent, with what retrieval must not see (benchmark leakage guard)."""

    text: str
    images: list[str] = Field(default_factory=list, description="Image file paths")
    prior_images: list[str] = Field(
        default_factory=list, description="Image files of earlier studies (compared against)"
    )
    image_dates: dict[str, str] = Field(
        default_factory=dict, description="Study date (YYYY-MM-DD) per image path, when given"
    )
    answer_format: AnswerFormat = Field(default_factory=AnswerFormat)
    exclude_pmids: list[str] = Field(default_factory=list)
    exclude_image_sha256: list[str] = Field(default_factory=list)
    family: str | None = Field(
        None, description="Benchmark whose calibration map applies (default: the answer form)"
    )


class AgentEvent(BaseModel):
    """Progress the agent streams while it works (nodes starting/finishing, answer tokens)."""

    kind: Literal["node_start", "node_end", "token", "info"]
    node: str = ""
    message: str = ""
    token: str = ""


class ReportFinding(BaseModel):
    """One line of a draft report's findings: the region and what is seen there."""

    region: str = ""
    text: str


class DraftReport(BaseModel):
    """A structured radiology report drafted by ``suwen report``, for a radiologist to review."""

    images: list[str] = Field(default_factory=list)
    prior_images: list[str] = Field(default_factory=list)
    mode: GraphMode = "agent"
    technique: str = ""
    comparison: str = ""
    findings: list[ReportFinding] = Field(default_factory=list)
    impression: str = ""
    text: str = Field("", description="The whole report as written, invalid citations removed")
    citations: list[Citation] = Field(default_factory=list)
    evidence: list[Evidence] = Field(default_factory=list)
    unsupported_sentences: list[str] = Field(
        default_factory=list, description="Findings/impression sentences citing no reference"
    )
    removed_citations: list[str] = Field(default_factory=list)
    reading: Findings | None = Field(None, description="What the look step read off the images")
    model_calls: int = 0
    tokens: TokenUsage = Field(default_factory=TokenUsage)
    trace: list[TraceEvent] = Field(default_factory=list)
    degraded: bool = Field(False, description="The report broke off or a step failed")
