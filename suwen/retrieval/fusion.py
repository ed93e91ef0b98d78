"""Combining ranked lists from several retrievers into one ranking.

Two families, both measured in ``benchmarks/retrieval.py``:

- reciprocal rank fusion (RRF), optionally weighted: uses ranks only, so it needs no score
  calibration, but it throws away how *sure* each retriever was -- a dense top hit far ahead of
  the rest counts the same as a near-tie;
- linear fusion of normalised scores: each list's scores are put on a common scale for this
  query (z-score: standardised by the list's own mean and spread; or scaled by its best hit, or
  min-max), then mixed with fixed weights. It keeps each retriever's confidence -- a dense hit
  far ahead of the rest stays ahead, a near-tie is broken by the other retriever -- which is
  what lets hybrid search beat both of its parts.

Lists hold ``(key, score)`` pairs best first. In linear fusion a key missing from a list gets
that list's lowest normalised score: it ranked below everything the list returned.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, TypeVar

K = TypeVar("K", bound=Hashable)
Ranked = Sequence[tuple[K, float]]

RRF_K = 60  # the constant from Cormack et al. (2009), used unchanged by most systems


def reciprocal_rank_fusion(
    lists: Mapping[str, Ranked[K]],
    weights: Mapping[str, float] | None = None,
    *,
    k: int = RRF_K,
) -> list[tuple[K, float]]:
    """sum over lists of weight / (k + rank), rank counted from 1."""
    fused: dict[K, float] = {}
    for name, ranked in lists.items():
        weight = 1.0 if weights is None else weights.get(name, 0.0)
        for rank, (key, _score) in enumerate(ranked, start=1):
            fused[key] = fused.get(key, 0.0) + weight / (k + rank)
    return sorted(fused.items(), key=lambda item: item[1], reverse=True)


def max_normalise(ranked: Ranked[K]) -> dict[K, float]:
    """Scores divided by the list's best score (a list of non-positive scores maps to 0)."""
    if not ranked:
        return {}
    best = max(score for _key, score in ranked)
    if best <= 0:
        return {key: 0.0 for key, _score in ranked}
    return {key: max(score, 0.0) / best for key, score in ranked}


def min_max_normalise(ranked: Ranked[K]) -> dict[K, float]:
    """Scores mapped linearly onto [0, 1] between the list's worst and best hit."""
    if not ranked:
        return {}
    scores = [score for _key, score in ranked]
    low, high = min(scores), max(scores)
    if high <= low:
        return {key: 1.0 for key, _score in ranked}
    return {key: (score - low) / (high - low) for key, score in ranked}


def z_normalise(ranked: Ranked[K]) -> dict[K, float]:
    """Scores standardised by the list's mean and standard deviation (all-equal lists map to 0)."""
    if not ranked:
        return {}
    scores = [score for _key, score in ranked]
    mean = sum(scores) / len(scores)
    spread = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    if spread <= 0:
        return {key: 0.0 for key, _score in ranked}
    return {key: (score - mean) / spread for key, score in ranked}


Normaliser = Literal["z", "max", "minmax"]
NORMALISERS: dict[str, Callable[[Ranked[Any]], dict[Any, float]]] = {
    "z": z_normalise,
    "max": max_normalise,
    "minmax": min_max_normalise,
}


def linear_fusion(
    lists: Mapping[str, Ranked[K]],
    weights: Mapping[str, float],
    *,
    normalise: Normaliser = "z",
) -> list[tuple[K, float]]:
    """sum over lists of weight * normalised score; missing keys get the list's minimum."""
    scale = NORMALISERS[normalise]
    scaled = {name: scale(ranked) for name, ranked in lists.items()}
    keys = {key for values in scaled.values() for key in values}
    fused = dict.fromkeys(keys, 0.0)
    for name, values in scaled.items():
        if not values:
            continue
        weight, floor = weights.get(name, 0.0), min(values.values())
        for key in keys:
            fused[key] += weight * values.get(key, floor)
    return sorted(fused.items(), key=lambda item: item[1], reverse=True)
