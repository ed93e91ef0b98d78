"""Calibration metrics and maps on synthetic predictions whose true probabilities are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from suwen.errors import InputError
from suwen.evaluate.calibration import (
    CalibrationFile,
    CalibrationMap,
    accuracy_at_coverage,
    aurc,
    brier,
    ece,
    fit_isotonic,
    fit_map,
    fit_temperature,
    is_dev,
    load_calibration,
    reliability,
    risk_coverage,
    routing_threshold,
    save_calibration,
)

N = 20_000


def _calibrated(seed: int, n: int = N) -> tuple[list[float], list[bool]]:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, n)
    return p.tolist(), (rng.uniform(size=n) < p).tolist()


def _overconfident(seed: int, n: int = N) -> tuple[list[float], list[bool]]:
    """Right with probability p, but says sigmoid(3 * logit(p)): temperature 3 undoes it."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.2, 0.8, n)
    said = 1 / (1 + np.exp(-3 * np.log(p / (1 - p))))
    return said.tolist(), (rng.uniform(size=n) < p).tolist()


def test_a_perfectly_calibrated_predictor_has_ece_near_zero() -> None:
    confidence, correct = _calibrated(0)
    assert ece(confidence, correct) < 0.02
    # Brier of a calibrated uniform predictor: E[p(1-p)] = 1/6.
    assert brier(confidence, correct) == pytest.approx(1 / 6, abs=0.01)


def test_an_overconfident_predictor_has_a_large_ece() -> None:
    confidence, correct = _overconfident(1)
    assert ece(confidence, correct) > 0.12
    bins = reliability(confidence, correct)
    top = bins[-1]
    assert top.confidence > 0.9 and top.accuracy < top.confidence - 0.1


def test_isotonic_and_temperature_lower_ece_on_held_out_data() -> None:
    train_conf, train_right = _overconfident(2)
    test_conf, test_right = _overconfident(3)
    raw = ece(test_conf, test_right)
    isotonic = fit_isotonic(train_conf, train_right)
    temperature = fit_temperature(train_conf, train_right)
    assert ece(list(isotonic.apply_all(test_conf)), test_right) < raw / 3
    assert ece(list(temperature.apply_all(test_conf)), test_right) < raw / 3
    assert temperature.temperature == pytest.approx(3.0, rel=0.1)


def test_fit_map_measures_both_methods_on_held_out_halves() -> None:
    confidence, correct = _overconfident(4, n=4000)
    keys = [f"q{i}" for i in range(len(confidence))]
    fitted = fit_map(confidence, correct, keys)
    assert fitted is not None and fitted.method in ("temperature", "isotonic")
    assert set(fitted.heldout_ece) == {"raw", "temperature", "isotonic"}
    best = min(fitted.heldout_ece["temperature"], fitted.heldout_ece["isotonic"])
    assert fitted.heldout_ece[fitted.method] == best < fitted.heldout_ece["raw"]
    assert fitted.fitted_on == 4000
    assert fit_map(confidence[:5], correct[:5], keys[:5]) is None  # too few to fit


def test_risk_coverage_rewards_confident_answers_being_right() -> None:
    correct = [True] * 8 + [False] * 2
    ranked = [0.99 - i * 0.01 for i in range(10)]  # the two wrong ones are least confident
    backwards = list(reversed(ranked))
    assert aurc(ranked, correct) < aurc(backwards, correct)
    coverage, risk = risk_coverage(ranked, correct)
    assert coverage[-1] == 1.0 and risk[-1] == pytest.approx(0.2) and risk[0] == 0.0
    assert accuracy_at_coverage(ranked, correct, 0.8) == 1.0
    assert accuracy_at_coverage(ranked, correct, 0.9) == pytest.approx(8 / 9)
    assert accuracy_at_coverage(backwards, correct, 0.8) == pytest.approx(6 / 8)


def test_routing_threshold_sends_only_unsure_questions_to_the_agent() -> None:
    # Plain is right when confident (>= 0.7) and wrong below; the agent is right below.
    confidence = [0.9, 0.8, 0.7, 0.5, 0.4, 0.3]
    plain = [True, True, True, False, False, False]
    agent = [True, False, True, True, True, True]
    assert routing_threshold(confidence, plain, agent) == 0.7
    # An agent that never helps: answer everything plainly (the cheapest of the best).
    assert routing_threshold(confidence, plain, [False] * 6) == 0.3


def test_dev_split_is_stable_and_about_thirty_percent() -> None:
    ids = [f"q{i}" for i in range(5000)]
    dev = [i for i in ids if is_dev("VQA-RAD", i)]
    assert dev == [i for i in ids if is_dev("VQA-RAD", i)]
    assert 0.27 < len(dev) / len(ids) < 0.33
    assert dev != [i for i in ids if is_dev("PubMedQA", i)]


def test_calibration_file_is_private_and_hostile_files_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    saved = CalibrationFile(
        model="m", maps={"choice/plain": CalibrationMap(method="temperature", temperature=2.0)}
    )
    path = save_calibration(home, saved)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_calibration(home)
    assert loaded is not None and loaded.model == "m" and loaded.suwen_version
    found = loaded.find(["VQA-RAD", "choice"], "plain")
    assert found is not None and found.apply(0.9) == pytest.approx(0.75)
    assert loaded.find(["choice"], "agent") is None

    path.write_text(json.dumps({"maps": 3}))
    with pytest.raises(InputError, match="not a Suwen calibration file"):
        load_calibration(home)
    path.write_bytes(b"\x00" * (17 * 1024 * 1024))
    with pytest.raises(InputError, match="too large"):
        load_calibration(home)
    assert load_calibration(tmp_path / "elsewhere") is None


def test_identity_and_edge_confidences_stay_in_range() -> None:
    for fitted in (
        CalibrationMap(),
        CalibrationMap(method="temperature", temperature=0.5),
        fit_isotonic([0.1, 0.5, 0.9, 0.95], [False, True, True, True]),
    ):
        for p in (0.0, 1.0, 0.5):
            value = fitted.apply(p)
            assert 0.0 <= value <= 1.0 and not math.isnan(value)
