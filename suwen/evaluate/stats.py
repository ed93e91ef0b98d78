"""Paired comparison of two modes on the same questions: delta, bootstrap CI, McNemar."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from pydantic import BaseModel, Field


class PairedComparison(BaseModel):
    n: int
    plain_accuracy: float
    agent_accuracy: float
    delta: float = Field(description="agent - plain, in accuracy points (0..1)")
    ci95: tuple[float, float] = Field(description="Paired bootstrap 95% interval of the delta")
    mcnemar_p: float = Field(description="Exact two-sided McNemar p-value")
    fixed: int = Field(description="Wrong in plain mode, right in agent mode")
    broken: int = Field(description="Right in plain mode, wrong in agent mode")


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar test: a binomial test of the discordant pairs at p = 1/2."""
    discordant = fixed + broken
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(fixed, broken) + 1))
    return min(1.0, 2 * tail / float(2**discordant))


def bootstrap_delta_ci(
    plain: Sequence[bool], agent: Sequence[bool], *, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% interval of mean(agent) - mean(plain), resampling questions (pairs)."""
    n = len(plain)
    if n == 0:
        return (0.0, 0.0)
    diffs = [int(a) - int(p) for p, a in zip(plain, agent, strict=True)]
    rng = random.Random(seed)
    deltas = sorted(sum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    low = deltas[int(0.025 * (resamples - 1))]
    high = deltas[math.ceil(0.975 * (resamples - 1))]
    return (low, high)


def compare(
    plain: Sequence[bool], agent: Sequence[bool], *, resamples: int = 10_000, seed: int = 0
) -> PairedComparison:
    """Compare per-question correctness of the two modes (same questions, same order)."""
    if len(plain) != len(agent):
        raise ValueError(f"paired results differ in length: {len(plain)} vs {len(agent)}")
    n = len(plain)
    fixed = sum(1 for p, a in zip(plain, agent, strict=True) if a and not p)
    broken = sum(1 for p, a in zip(plain, agent, strict=True) if p and not a)
    plain_acc = sum(plain) / n if n else 0.0
    agent_acc = sum(agent) / n if n else 0.0
    return PairedComparison(
        n=n,
        plain_accuracy=plain_acc,
        agent_accuracy=agent_acc,
        delta=agent_acc - plain_acc,
        ci95=bootstrap_delta_ci(plain, agent, resamples=resamples, seed=seed),
        mcnemar_p=mcnemar_exact(fixed, broken),
        fixed=fixed,
        broken=broken,
    )
