"""Calibration: how well confidence matches accuracy, maps that make it match, and their file.

Metrics (on confidences in [0, 1] and right/wrong outcomes): expected calibration error over 15
equal-width bins, Brier score, the risk-coverage curve and the area under it (AURC), and the
accuracy of the most confident answers at a given coverage.

Maps: temperature scaling on the confidence's logit (one parameter, fitted by maximum
likelihood) or isotonic regression (monotone, fitted by scikit-learn). ``fit_map`` measures both
on held-out halves of the dev records (two-fold) and keeps the one with the lower held-out ECE,
refitted on all of them. Dev and test never overlap: ``is_dev`` splits every benchmark's
questions by a hash of benchmark and id, so a question is dev or test in every run.

The calibration file (``calibration.json`` in the data home, 0600) holds one map per benchmark
(and per answer form, pooled) and mode, the adaptive-mode threshold learnt for each, and the
model id and Suwen version they belong to; a file for another model is not applied.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from suwen import __version__
from suwen.errors import InputError
from suwen.evaluate.metric_types import Calibration
from suwen.files import atomic_write_json

ECE_BINS = 15
COVERAGES = (0.8, 0.9, 0.95)
DEV_SHARE = 0.3
MIN_FIT = 10  # fewer dev answers than this fit no map
CALIBRATION_FILE = "calibration.json"
MAX_FILE_BYTES = 16 * 1024 * 1024
_EPS = 1e-6

Method = Literal["identity", "temperature", "isotonic"]


# -- metrics ----------------------------------------------------------------------------------


def _arrays(confidence: Sequence[float], correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    if len(confidence) != len(correct):
        raise ValueError("confidence and correct differ in length")
    return np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)


@dataclass(frozen=True)
class ReliabilityBin:
    low: float
    high: float
    count: int
    confidence: float  # mean confidence in the bin
    accuracy: float


def reliability(
    confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1] (a confidence of exactly 1 falls in the last)."""
    conf, right = _arrays(confidence, correct)
    index = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        if count:
            out.append(
                ReliabilityBin(
                    b / bins,
                    (b + 1) / bins,
                    count,
                    float(conf[mask].mean()),
                    float(right[mask].mean()),
                )
            )
    return out


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error: the count-weighted gap between accuracy and confidence."""
    total = len(confidence)
    if total == 0:
        return math.nan
    gaps = (
        b.count * abs(b.accuracy - b.confidence) for b in reliability(confidence, correct, bins)
    )
    return sum(gaps) / total


def brier(confidence: Sequence[float], correct: Sequence[bool]) -> float:
    conf, right = _arrays(confidence, correct)
    return float(np.mean((conf - right) ** 2)) if len(conf) else math.nan


def risk_coverage(
    confidence: Sequence[float], correct: Sequence[bool]
) -> tuple[list[float], list[float]]:
    """``(coverage, risk)`` when answering only the k most confident, k = 1..n (ties in
    confidence are kept together in input order, so the curve does not depend on luck)."""
    conf, right = _arrays(confidence, correct)
    order = np.argsort(-conf, kind="stable")
    errors = np.cumsum(1.0 - right[order])
    k = np.arange(1, len(conf) + 1)
    return list(k / len(conf)), list(errors / k)


def aurc(confidence: Sequence[float], correct: Sequence[bool]) -> float:
    """Area under the risk-coverage curve (lower is better: confident answers are right)."""
    if not len(confidence):
        return math.nan
    return float(np.mean(risk_coverage(confidence, correct)[1]))


def accuracy_at_coverage(
    confidence: Sequence[float], correct: Sequence[bool], coverage: float
) -> float:
    """Accuracy of the ceil(coverage * n) most confident answers."""
    if not len(confidence):
        return math.nan
    conf, right = _arrays(confidence, correct)
    keep = max(1, math.ceil(coverage * len(conf) - 1e-9))
    order = np.argsort(-conf, kind="stable")[:keep]
    return float(right[order].mean())


def calibration_metrics(confidence: Sequence[float], correct: Sequence[bool]) -> Calibration:
    """Every calibration number the report shows, under stable keys."""
    if not len(confidence):
        return {"n": 0, "ece": None, "brier": None, "aurc": None, "acc_at_coverage": {}}
    return {
        "n": len(confidence),
        "ece": ece(confidence, correct),
        "brier": brier(confidence, correct),
        "aurc": aurc(confidence, correct),
        "acc_at_coverage": {
            f"{c:.2f}": accuracy_at_coverage(confidence, correct, c) for c in COVERAGES
        },
    }


# -- maps -------------------------------------------------------------------------------------


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.asarray(np.log(p / (1 - p)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))


class CalibrationMap(BaseModel):
    """A fitted map from raw to calibrated confidence."""

    method: Method = "identity"
    temperature: float = Field(1.0, gt=0)
    knots_x: list[float] = Field(default_factory=list, description="Isotonic breakpoints")
    knots_y: list[float] = Field(default_factory=list)
    fitted_on: int = Field(0, description="Dev answers the map was fitted on")
    heldout_ece: dict[str, float] = Field(
        default_factory=dict, description="Two-fold held-out ECE of raw, temperature, isotonic"
    )

    def apply(self, confidence: float) -> float:
        return float(self.apply_all([confidence])[0])

    def apply_all(self, confidence: Sequence[float]) -> np.ndarray:
        conf = np.asarray(confidence, dtype=float)
        if self.method == "temperature":
            return _sigmoid(_logit(conf) / self.temperature)
        if self.method == "isotonic" and self.knots_x:
            return np.asarray(np.interp(conf, self.knots_x, self.knots_y))
        return conf


def fit_temperature(confidence: Sequence[float], correct: Sequence[bool]) -> CalibrationMap:
    """The temperature T maximising the likelihood of sigmoid(logit(p) / T)."""
    from scipy.optimize import minimize_scalar

    conf, right = _arrays(confidence, correct)
    logits = _logit(conf)

    def nll(log_t: float) -> float:
        p = np.clip(_sigmoid(logits / math.exp(log_t)), _EPS, 1 - _EPS)
        return float(-np.mean(right * np.log(p) + (1 - right) * np.log(1 - p)))

    best = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded")
    return CalibrationMap(
        method="temperature", temperature=math.exp(float(best.x)), fitted_on=len(conf)
    )


def fit_isotonic(confidence: Sequence[float], correct: Sequence[bool]) -> CalibrationMap:
    from sklearn.isotonic import IsotonicRegression

    conf, right = _arrays(confidence, correct)
    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(conf, right)
    return CalibrationMap(
        method="isotonic",
        knots_x=[float(v) for v in model.X_thresholds_],
        knots_y=[float(v) for v in model.y_thresholds_],
        fitted_on=len(conf),
    )


FITTERS = {"temperature": fit_temperature, "isotonic": fit_isotonic}


def _halves(keys: Sequence[str]) -> tuple[list[int], list[int]]:
    first = [i for i, key in enumerate(keys) if _unit_hash("fold", key) < 0.5]
    second = [i for i in range(len(keys)) if i not in set(first)]
    return first, second


def fit_map(
    confidence: Sequence[float], correct: Sequence[bool], keys: Sequence[str]
) -> CalibrationMap | None:
    """The better of temperature and isotonic by two-fold held-out ECE, refitted on all; None
    with fewer than MIN_FIT answers. ``keys`` (question ids) decide the folds."""
    if len(confidence) < MIN_FIT:
        return None
    conf, right = list(confidence), [bool(c) for c in correct]
    folds = _halves(keys)
    scores: dict[str, list[float]] = {"raw": [], "temperature": [], "isotonic": []}
    for train, test in (folds, folds[::-1]):
        if not train or not test:
            continue
        test_conf = [conf[i] for i in test]
        test_right = [right[i] for i in test]
        scores["raw"].append(ece(test_conf, test_right))
        for name, fitter in FITTERS.items():
            fitted = fitter([conf[i] for i in train], [right[i] for i in train])
            scores[name].append(ece(list(fitted.apply_all(test_conf)), test_right))
    heldout = {name: float(np.mean(values)) for name, values in scores.items() if values}
    method = min(("temperature", "isotonic"), key=lambda name: heldout.get(name, math.inf))
    chosen = FITTERS[method](conf, right)
    chosen.heldout_ece = heldout
    return chosen


def routing_threshold(
    plain_confidence: Sequence[float], plain_correct: Sequence[bool], agent_correct: Sequence[bool]
) -> float:
    """The lowest confidence threshold whose routing (plain answer at or above it, the agent
    below) is most accurate on paired dev questions: as accurate as possible, as cheap as that
    allows."""
    conf = np.asarray(plain_confidence, dtype=float)
    plain_right = np.asarray(plain_correct, dtype=float)
    agent_right = np.asarray(agent_correct, dtype=float)
    best_t, best_acc = 1.0 + _EPS, float(agent_right.mean()) if len(conf) else 0.0
    for t in sorted(set(conf.tolist()), reverse=True):
        accuracy = float(np.where(conf >= t, plain_right, agent_right).mean())
        if accuracy >= best_acc:
            best_t, best_acc = t, accuracy
    return min(1.0, best_t)


# -- dev / test split -------------------------------------------------------------------------


def _unit_hash(*parts: str) -> float:
    digest = hashlib.sha256("\0".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_dev(benchmark: str, sample_id: str, share: float = DEV_SHARE) -> bool:
    """Whether a question belongs to the calibration (dev) split; the same answer in every run."""
    return _unit_hash(benchmark, sample_id) < share


# -- the calibration file ---------------------------------------------------------------------


def map_key(family: str, mode: str) -> str:
    return f"{family}/{mode}"


class CalibrationFile(BaseModel):
    """What ``suwen eval --calibrate`` learnt, for one model."""

    model: str
    suwen_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    dev_share: float = DEV_SHARE
    maps: dict[str, CalibrationMap] = Field(default_factory=dict, description="family/mode")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="family -> adaptive threshold (calibrated plain)"
    )

    def find(self, families: Sequence[str], mode: str) -> CalibrationMap | None:
        for family in families:
            found = self.maps.get(map_key(family, mode))
            if found is not None:
                return found
        return None

    def threshold(self, families: Sequence[str]) -> float | None:
        for family in families:
            if family in self.thresholds:
                return self.thresholds[family]
        return None


def calibration_path(home: Path) -> Path:
    return home / CALIBRATION_FILE


def load_calibration(home: Path) -> CalibrationFile | None:
    """The calibration file in ``home``, or None when there is none. A file that is too large
    or not a calibration file is refused in one line."""
    path = calibration_path(home)
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InputError(f"{path}: {size} bytes, too large for a calibration file; refused")
    try:
        return CalibrationFile.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"{path}: not a Suwen calibration file ({first})") from exc


def save_calibration(home: Path, calibration: CalibrationFile) -> Path:
    """Write the file privately (0600) and atomically."""
    path = calibration_path(home)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_json(path, calibration.model_dump(mode="json"))
    return path
