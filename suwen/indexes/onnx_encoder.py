"""The query encoder as an ONNX Runtime model: one query without PyTorch in the process.

Search encodes one short text per query. Through PyTorch that costs the framework's per-call
overhead on every small matrix product and keeps PyTorch's memory resident in every search
process. So the first time a query encoder is needed (an index build or the first search) its
transformer is exported once to ONNX, checked against the eager model on probe texts, and cached
in the data home (``encoders/<fingerprint>/``: the graph, the tokenizer as ``tokenizer.json``
and ``export.json``, the record of the check; files 0600, never a pickle). A later process finds
the export by the model files' fingerprint and encodes with ONNX Runtime and the ``tokenizers``
package alone: nothing here imports torch except :func:`export`.

The export makes two int8 graphs: the weights of every matrix product as 8-bit integers in
blocks of 32 with int8 arithmetic (``int8``: ONNX Runtime's ``MatMulNBits``, accuracy level 4,
which quantises the activations per block of 32 too, so an outlier value spoils only its own
block), and SmoothQuant-scaled int8 products with activations quantised per token, the
feed-forward outputs float32 (``int8_per_token``: :mod:`suwen.indexes.smoothquant`). A graph
is kept only when every probe's vector stays within :data:`INT8_MIN_COSINE` of the eager
model's; of those that do, the one that encodes the probes faster on this processor (which is
faster depends on its int8 instructions); else the float32 graph when it matches; else no
export (queries then stay on PyTorch). ``export.json`` records what each candidate measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import numpy as np

from suwen.filelock import waited
from suwen.files import atomic_write_text, held_staging, publish_dir
from suwen.indexes import smoothquant
from suwen.indexes.vectors import FloatArray, normalise
from suwen.privacy import private_dir

if TYPE_CHECKING:
    import onnxruntime
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

EXPORT_FORMAT = 2  # 2: the faster of two int8 graphs, and what each candidate measured
MODEL_FILE = "model.onnx"
# The graph's weights, beside it (exports made before have none: all in MODEL_FILE).
WEIGHTS_FILE = "model.data"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "export.json"
STAGING_PREFIX = ".export-"  # an export being made, beside the published ones
LOCK_SUFFIX = ".lock"  # beside an export: held by the one process making it
MANIFEST_MAX_BYTES = 64 * 1024
# An int8 graph is kept only this close to the eager model on every probe; float32 graphs differ
# from eager PyTorch by rounding alone.
INT8_MIN_COSINE = 0.999
FLOAT_MIN_COSINE = 0.99999
INT8_BLOCK = 32
Precision = Literal["int8", "int8_per_token", "float32"]
PRECISIONS: tuple[Precision, ...] = ("int8", "int8_per_token", "float32")
Pooling = Literal["cls", "mean"]

# Questions of the kinds the agent and users ask, short to long; the export is checked on them.
PROBES = (
    "BRCA1",
    "asthma treatment",
    "What is the first-line treatment of mild asthma?",
    "Is metformin associated with lower cancer incidence in type 2 diabetes?",
    "Does early mobilisation after hip fracture surgery reduce 30-day mortality in the elderly?",
    "Which imaging findings distinguish pulmonary embolism from pneumonia on CT angiography?",
    "Are serum procalcitonin levels useful to guide antibiotic therapy in lower respiratory "
    "tract infections in primary care, and do they reduce antibiotic prescribing without harm?",
    "Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?",
    "Magnetic resonance imaging of the knee: meniscal tear, anterior cruciate ligament rupture, "
    "bone marrow oedema and joint effusion after a twisting sports injury in a young adult "
    "athlete; sensitivity and specificity against arthroscopy as the reference standard.",
    "x " * 60,
)


@dataclass(frozen=True)
class ExportRecord:
    """What ``export.json`` says about one export: what it is and how well it matched."""

    model: str
    fingerprint: str
    pooling: Pooling
    dim: int
    max_tokens: int
    inputs: tuple[str, ...]
    precision: Precision
    min_cosine: float
    onnxruntime: str
    model_bytes: int
    # Every graph the export tried: its minimum cosine on the probes, whether it passed the
    # gate, and how long the probes took through it (-1: not timed).
    candidates: dict[str, dict[str, float | bool]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"format": EXPORT_FORMAT, **self.__dict__, "inputs": list(self.inputs)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportRecord:
        if data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"export format {data.get('format')!r}")
        fields = {key: data[key] for key in cls.__dataclass_fields__}
        fields["inputs"] = tuple(str(name) for name in fields["inputs"])
        if fields["pooling"] not in ("cls", "mean") or fields["precision"] not in PRECISIONS:
            raise ValueError("unknown pooling or precision")
        return cls(**fields)


# ---------------------------------------------------------------------------------------------
# Finding an export without loading the model


def model_directory(model: str, marker: str = "config.json") -> Path | None:
    """The local directory holding ``model``'s files (a directory, or the hub cache's snapshot
    holding ``marker``), or None when it is not on this machine."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_absolute() or model.startswith(("hf-hub:", ".")) or model.count("/") != 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, marker)
    return Path(found).parent if isinstance(found, str) else None


def fingerprint(model: str, pooling: str, marker: str = "config.json") -> str | None:
    """A digest of the model's files (names, sizes, modification times) and of how it is pooled
    (or which tower of it is exported), or None when the model is not on this machine. Changed
    weights mean a new export."""
    directory = model_directory(model, marker)
    if directory is None:
        return None
    # The folder, not the name it was given by: a model reached through a symlink, or by its
    # hub id and by its snapshot folder, is one export.
    digest = hashlib.sha256(f"{EXPORT_FORMAT}\n{directory}\n{pooling}\n".encode())
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(
            f"{file.relative_to(directory)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()[:24]


def export_dir(encoders_dir: Path, key: str) -> Path:
    return encoders_dir / key


# Beside an export key whose export did not match its model: later processes do not retry it.
REJECTED_SUFFIX = ".rejected"


def is_rejected(encoders_dir: Path, key: str) -> bool:
    return (encoders_dir / (key + REJECTED_SUFFIX)).exists()


def mark_rejected(encoders_dir: Path, key: str) -> None:
    atomic_write_text(private_dir(encoders_dir) / (key + REJECTED_SUFFIX), "{}\n")


def read_record(directory: Path) -> ExportRecord | None:
    """The text export in ``directory`` when it is complete and readable, else None."""
    return read_manifest(directory, ExportRecord.from_json, TOKENIZER_FILE)


class _Manifest(Protocol):
    """What every export's record says: the bytes of its graph and weights."""

    @property
    def model_bytes(self) -> int: ...


RecordT = TypeVar("RecordT", bound=_Manifest)


def read_manifest(
    directory: Path, parse: Callable[[dict[str, Any]], RecordT], *files: str
) -> RecordT | None:
    """The record ``parse`` makes of ``directory``'s ``export.json`` (it raises on a field it
    refuses) when the export is complete and readable: the manifest small, the graph and its
    weights of the recorded size, ``files`` present; else None."""
    manifest = directory / MANIFEST_FILE
    try:
        if manifest.stat().st_size > MANIFEST_MAX_BYTES:
            return None
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            return None
        record = parse(data)
        if export_bytes(directory) != record.model_bytes:
            return None
        for name in files:
            (directory / name).stat()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def export_bytes(directory: Path) -> int:
    """The size of the export's graph and, when they are kept apart, its weights."""
    weights = directory / WEIGHTS_FILE
    size = (directory / MODEL_FILE).stat().st_size
    return size + (weights.stat().st_size if weights.exists() else 0)


# ---------------------------------------------------------------------------------------------
# Finding, or making once, a query encoder's export


class _Eager(Protocol):
    """The PyTorch model an export is made from."""

    @property
    def device(self) -> str: ...


EagerT = TypeVar("EagerT", bound=_Eager)
EncoderT = TypeVar("EncoderT")


@dataclass
class ExportCache(Generic[EncoderT]):
    """The exports one process has opened, by folder and thread count, behind one lock."""

    opened: dict[tuple[Path, int], EncoderT] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def find_or_export(
    cache: ExportCache[EncoderT],
    encoders_dir: Path,
    threads: int,
    *,
    fingerprint: Callable[[], str | None],
    load_eager: Callable[[], EagerT],
    read: Callable[[Path], RecordT | None],
    export: Callable[[EagerT, str, Path], RecordT | None],
    open_encoder: Callable[[Path, RecordT, int], EncoderT],
) -> EncoderT | None:
    """The encoder ``open_encoder`` makes of the model's export in ``encoders_dir`` (on
    ``threads`` threads), opened once per process; an export that ``read`` does not find valid
    is made now by ``export`` from the model ``load_eager`` loads. None when the runtime is
    missing, the model is not on this machine, it runs on a GPU, or its export was rejected
    (then, or now: marked, so no later process tries again)."""
    if unavailable_reason() is not None:
        return None
    key = fingerprint()
    if key is None:  # not downloaded yet: load it (which may download), then look again
        load_eager()
        key = fingerprint()
        if key is None:
            return None
    directory = export_dir(encoders_dir, key)
    with cache.lock:
        if (directory, threads) not in cache.opened:
            record = read(directory) or _made_by_one(encoders_dir, key, read, load_eager, export)
            if record is None:
                return None
            cache.opened[(directory, threads)] = open_encoder(directory, record, threads)
        return cache.opened[(directory, threads)]


def _made_by_one(
    encoders_dir: Path,
    key: str,
    read: Callable[[Path], RecordT | None],
    load_eager: Callable[[], EagerT],
    export: Callable[[EagerT, str, Path], RecordT | None],
) -> RecordT | None:
    """The export made now, by one process at a time: processes started together (``suwen
    batch --processes``) wait for the first one's export instead of each making its own."""
    private_dir(encoders_dir)
    with waited(encoders_dir / f"{key}{LOCK_SUFFIX}"):
        return read(export_dir(encoders_dir, key)) or _export_once(
            encoders_dir, key, load_eager, export
        )


def _export_once(
    encoders_dir: Path,
    key: str,
    load_eager: Callable[[], EagerT],
    export: Callable[[EagerT, str, Path], RecordT | None],
) -> RecordT | None:
    """A new export's record, or None when the model runs on a GPU or its export is rejected
    (an earlier rejection is not retried; a new one is marked)."""
    if is_rejected(encoders_dir, key):
        return None
    eager = load_eager()
    if eager.device != "cpu":
        return None
    record = export(eager, key, encoders_dir)
    if record is None:
        mark_rejected(encoders_dir, key)
    return record


# ---------------------------------------------------------------------------------------------
# Encoding with ONNX Runtime


class OnnxQueryEncoder:
    """Text in, L2-normalised float32 vectors out, through ONNX Runtime; thread-safe."""

    def __init__(
        self,
        directory: Path,
        record: ExportRecord,
        threads: int = 0,
        buckets: Sequence[int] = (),
        *,
        spin: bool = True,
    ) -> None:
        """``buckets``: pad a query to the smallest of these lengths that holds it (none: run it
        at its own length, the faster way in ``benchmarks/query_encoder.py``; kept so the
        benchmark can compare); ``spin``: as :func:`runtime_session` (off: kept so the benchmark
        can compare)."""
        from tokenizers import Tokenizer

        self.directory = directory
        self.record = record
        self.name = record.model
        self.pooling: str = record.pooling
        self.dim = record.dim
        self.max_tokens = record.max_tokens
        self.precision = record.precision
        self._tokenizer: Tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(record.max_tokens)
        self._tokenizer_lock = threading.Lock()
        self._session = runtime_session(directory / MODEL_FILE, threads, spin=spin)
        self._buckets = sorted(buckets)

    @classmethod
    def open(cls, directory: Path, threads: int = 0) -> OnnxQueryEncoder | None:
        record = read_record(directory)
        return cls(directory, record, threads) if record is not None else None

    def count_tokens(self, text: str) -> int:
        return len(self._encode_ids(text))

    def encode_query(self, text: str) -> FloatArray:
        """One text's vector, shape ``(1, dim)``."""
        tokens = self._encode_ids(text)
        width = next((b for b in self._buckets if b >= len(tokens)), len(tokens))
        ids = np.zeros((1, width), dtype=np.int64)
        mask = np.zeros_like(ids)
        ids[0, : len(tokens)], mask[0, : len(tokens)] = tokens, 1
        return normalise(self._pool(self._run(ids, mask), mask))

    def encode(self, texts: Sequence[str], *, batch_size: int = 32, **_: Any) -> FloatArray:
        """Vectors for ``texts`` in order; batches padded to their longest text."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = [self._encode_ids(text) for text in texts[start : start + batch_size]]
            width = max(len(row) for row in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for number, row in enumerate(rows):
                ids[number, : len(row)], mask[number, : len(row)] = row, 1
            out[start : start + len(rows)] = self._pool(self._run(ids, mask), mask)
        return normalise(out)

    def _encode_ids(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(self._tokenizer.encode(text).ids)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        wanted = {name: feeds[name] for name in self.record.inputs}
        return np.asarray(self._session.run(None, wanted)[0], dtype=np.float32)

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> FloatArray:
        if self.pooling == "cls":
            return np.ascontiguousarray(hidden[:, 0, :], dtype=np.float32)
        weights = mask[:, :, None].astype(np.float32)
        summed = (hidden * weights).sum(axis=1)
        return np.asarray(summed / np.maximum(weights.sum(axis=1), 1e-9), dtype=np.float32)


def runtime_session(
    model: Path | bytes, threads: int, *, spin: bool = True
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session on the CPU for ``model`` (a file, or a serialised graph), on
    ``threads`` intra-op threads (0: one per core), telemetry off; with ``spin`` off, waiting
    workers sleep even between the operators of one run."""
    ort = _runtime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads  # 0: one per core
    options.inter_op_num_threads = 1
    # Intra-op workers spin between the operators of one run (waking a sleeping worker for
    # each of a BERT's few hundred operators cost about a tenth of a query's latency at the
    # same CPU) and stop spinning when the run ends: a worker left spinning after it burns a
    # core the agent's event loop, other searches and often the model server share.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# Exporting (needs PyTorch; runs once per model)


def export(
    model: SentenceTransformer,
    name: str,
    key: str,
    encoders_dir: Path,
    eager: Callable[[str], FloatArray],
) -> ExportRecord | None:
    """Export ``model`` into ``encoders_dir/key`` and return its record, or None when it cannot
    be exported or no export matches the eager model on the probes (``eager``: one text's
    normalised vector from the model itself)."""
    pooling = _supported_pooling(model)
    if pooling is None or model.device.type != "cpu":
        return None
    built = publish_export(
        encoders_dir, key, lambda staging: _export_into(staging, model, name, key, pooling, eager)
    )
    return read_record(built) if built is not None else None


def publish_export(
    encoders_dir: Path, key: str, build: Callable[[Path], object | None]
) -> Path | None:
    """Run ``build`` in a private staging folder inside ``encoders_dir`` and publish what it
    made as ``encoders_dir/key`` (files 0600, renamed whole: a reader sees all or nothing);
    the published folder, or None when ``build`` returned None or failed (an exporter or
    quantiser failure means: queries stay on PyTorch)."""
    encoders_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    encoders_dir.chmod(0o700)
    try:
        with held_staging(encoders_dir, STAGING_PREFIX) as staging:
            if build(staging) is None:
                return None
            target = export_dir(encoders_dir, key)
            for file in staging.iterdir():
                file.chmod(0o600)
            with contextlib.suppress(OSError):  # another process may have published it meanwhile
                publish_dir(staging, target)
            return target
    except Exception:
        return None


def _export_into(
    staging: Path,
    model: SentenceTransformer,
    name: str,
    key: str,
    pooling: Pooling,
    eager: Callable[[str], FloatArray],
) -> ExportRecord | None:
    """Make each int8 graph, keep the fastest on the probes of those within
    :data:`INT8_MIN_COSINE` of the eager model; the float32 graph when none is."""
    float_graph = staging / "float32.onnx"
    inputs = _export_graph(model, float_graph)
    tokenizer: Any = model.tokenizer
    tokenizer.backend_tokenizer.save(str(staging / TOKENIZER_FILE))
    expected = np.vstack([eager(probe) for probe in PROBES])
    base = ExportRecord(
        model=name,
        fingerprint=key,
        pooling=pooling,
        dim=int(expected.shape[1]),
        max_tokens=int(model.max_seq_length or 512),
        inputs=inputs,
        precision="float32",
        min_cosine=0.0,
        onnxruntime=_runtime().__version__,
        model_bytes=0,
    )
    makers: dict[Precision, Callable[[Path], None]] = {
        "int8": lambda target: _quantise(float_graph, target),
        "int8_per_token": lambda target: smoothquant.quantise(
            float_graph, target, staging / TOKENIZER_FILE, inputs
        ),
    }
    tried = [
        _candidate(staging, base, precision, make, expected) for precision, make in makers.items()
    ]
    kept = [candidate for candidate in tried if candidate.passed]
    if not kept:
        fallback = _candidate(staging, base, "float32", lambda target: None, expected, float_graph)
        tried.append(fallback)
        kept = [fallback] if fallback.passed else []
    if not kept:
        return None
    best = min(kept, key=lambda candidate: candidate.probe_ms)
    for file in (MODEL_FILE, WEIGHTS_FILE):
        (best.folder / file).replace(staging / file)
    for candidate in tried:
        shutil.rmtree(candidate.folder, ignore_errors=True)
    float_graph.unlink(missing_ok=True)
    record = dataclasses.replace(
        best.record,
        model_bytes=export_bytes(staging),
        candidates={c.record.precision: c.summary() for c in tried},
    )
    (staging / MANIFEST_FILE).write_text(json.dumps(record.as_json(), indent=2), encoding="utf-8")
    return record


@dataclass
class _Candidate:
    """One graph an export tried: its folder, how close it came to the eager model, and how
    long the probes took through it."""

    folder: Path
    record: ExportRecord
    passed: bool
    probe_ms: float = float("inf")

    def summary(self) -> dict[str, float | bool]:
        timed = self.probe_ms if self.probe_ms != float("inf") else -1.0
        return {"min_cosine": self.record.min_cosine, "kept": self.passed, "probes_ms": timed}


def _candidate(
    staging: Path,
    base: ExportRecord,
    precision: Precision,
    make: Callable[[Path], None],
    expected: FloatArray,
    graph: Path | None = None,
) -> _Candidate:
    """``make``'s graph (or ``graph`` as it is) in its own folder under ``staging``, checked
    against the eager model's ``expected`` probe vectors and, when it passes, timed on them."""
    folder = staging / f"candidate-{precision}"
    folder.mkdir()
    made = graph or folder / "made.onnx"
    record = dataclasses.replace(base, precision=precision)
    try:
        if graph is None:
            make(made)
        save_with_external_weights(made, folder / MODEL_FILE)
        shutil.copyfile(staging / TOKENIZER_FILE, folder / TOKENIZER_FILE)
        record = dataclasses.replace(record, model_bytes=export_bytes(folder))
        encoder = OnnxQueryEncoder(folder, record, threads=0)
        got = np.vstack([encoder.encode_query(probe) for probe in PROBES])
    except Exception:  # no quantiser, or a graph ONNX Runtime refuses: not this candidate
        return _Candidate(folder, record, passed=False)
    cosine = float(np.min(np.sum(got * expected, axis=1)))
    record = dataclasses.replace(record, min_cosine=round(cosine, 6))
    threshold = FLOAT_MIN_COSINE if precision == "float32" else INT8_MIN_COSINE
    if cosine < threshold:
        return _Candidate(folder, record, passed=False)
    return _Candidate(folder, record, passed=True, probe_ms=_probe_ms(encoder))


def _probe_ms(encoder: OnnxQueryEncoder, passes: int = 3) -> float:
    """The fastest of ``passes`` runs over every probe, one at a time, in milliseconds."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for probe in PROBES:
            encoder.encode_query(probe)
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 2)


def save_with_external_weights(source: Path, target: Path) -> None:
    """``source``'s graph as ``target`` with its weights in :data:`WEIGHTS_FILE` beside it:
    ONNX Runtime maps that file instead of copying every weight out of the parsed graph, which
    roughly halves the memory a search process peaks at while it opens the encoder."""
    import onnx

    model = onnx.load(str(source))
    (target.parent / WEIGHTS_FILE).unlink(missing_ok=True)  # onnx appends to an existing one
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS_FILE,
        size_threshold=1024,
    )
    source.unlink()


def _supported_pooling(model: SentenceTransformer) -> Pooling | None:
    """CLS or mean pooling of one transformer, optionally normalised: what the ONNX path
    reproduces. Any other stack (dense layers, other poolings) stays on PyTorch."""
    modules = list(model)
    if len(modules) < 2 or not hasattr(modules[0], "auto_model"):
        return None
    mode = getattr(modules[1], "pooling_mode", None)
    if mode not in ("cls", "mean") or not getattr(modules[1], "include_prompt", True):
        return None
    if any(type(module).__name__ != "Normalize" for module in modules[2:]):
        return None
    return "cls" if mode == "cls" else "mean"


def _export_graph(model: SentenceTransformer, path: Path) -> tuple[str, ...]:
    """The transformer as an ONNX graph from token ids to its last hidden state, with batch and
    sequence length dynamic; returns the graph's input names."""
    import torch

    features = model.preprocess([PROBES[2]])
    names = tuple(
        name
        for name in ("input_ids", "attention_mask", "token_type_ids")
        if isinstance(features.get(name), torch.Tensor)
    )
    transformer: Any = model[0].auto_model

    class LastHidden(torch.nn.Module):
        """Positional inputs in ``names`` order; the exporter takes no keyword arguments."""

        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            output = self.transformer(**dict(zip(names, tensors, strict=True)), return_dict=True)
            return output.last_hidden_state  # type: ignore[no-any-return]

    axes = {name: {0: "batch", 1: "tokens"} for name in (*names, "last_hidden_state")}
    with torch.no_grad(), quiet_tracing():
        torch.onnx.export(
            LastHidden().eval(),
            tuple(features[name] for name in names),
            str(path),
            input_names=list(names),
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return names


def _quantise(source: Path, target: Path, block: int = INT8_BLOCK) -> None:
    """Weights of every matrix product to 8-bit blocks of ``block`` (:data:`INT8_BLOCK`), int8
    arithmetic."""
    import logging

    import onnx

    with _root_logging_kept():  # importing the quantiser calls logging.basicConfig(INFO)
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

    config = DefaultWeightOnlyQuantConfig(
        block_size=block, is_symmetric=True, accuracy_level=4, bits=8
    )
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node it skips
    try:
        quantiser = MatMulNBitsQuantizer(onnx.load(str(source)), algo_config=config)
        quantiser.process()
        quantiser.model.save_model_to_file(str(target), use_external_data_format=False)
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """The root logger's handlers and level as they were: a library that configures logging
    on import would otherwise make every later INFO record of the process (one per HTTP
    request to the model server) print on stderr."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence the warnings tracing and exporting give for every traced branch, and
    transformers' log lines: the probes check the result instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)


def _runtime() -> Any:
    """onnxruntime, with its event uploader off before any session is made (privacy.enforce
    also sets ORT_DISABLE_TELEMETRY for a library user who never ran the CLI)."""
    import onnxruntime

    onnxruntime.disable_telemetry_events()
    return onnxruntime


def unavailable_reason() -> str | None:
    """Why the ONNX path cannot run here, or None when its packages import."""
    try:
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed"
    return None
