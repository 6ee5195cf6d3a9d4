"""Rates with Wilson 95% intervals, and domain fidelity with a paired bootstrap interval.

Sample sizes in the lab are small (tens of prompts), where the normal approximation's interval is
badly off near 0% and 100%; Wilson's score interval stays inside [0, 1] and keeps its coverage.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials (``(0, 1)`` when ``n == 0``)."""
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Clamp float noise (e.g. -1e-17) so the interval always lies in [0, 1] and contains p.
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n`` with its point estimate and Wilson 95% interval."""

    k: int
    n: int
    value: float
    ci_low: float
    ci_high: float

    @classmethod
    def of(cls, flags: Sequence[bool]) -> Rate:
        k, n = sum(bool(f) for f in flags), len(flags)
        lo, hi = wilson_interval(k, n)
        return cls(k, n, k / n if n else float("nan"), lo, hi)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fidelity(
    repaired: Sequence[bool], unrepaired: Sequence[bool], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, float | None]:
    """Domain fidelity = accuracy(repaired) / accuracy(unrepaired) on the same task prompts.

    The interval is a paired percentile bootstrap over prompts (both adapters answered the same
    prompts, so resampling pairs keeps their correlation). Resamples whose unrepaired accuracy is 0
    are skipped. ``value`` is ``None`` when the unrepaired adapter got nothing right.
    """
    if len(repaired) != len(unrepaired):
        raise ValueError(f"paired lists differ in length: {len(repaired)} vs {len(unrepaired)}")
    n = len(repaired)
    base = sum(map(bool, unrepaired))
    if n == 0 or base == 0:
        return {"value": None, "ci_low": None, "ci_high": None}
    value = sum(map(bool, repaired)) / base
    rng = random.Random(seed)
    stats: list[float] = []
    pairs = list(zip(map(bool, repaired), map(bool, unrepaired), strict=True))
    for _ in range(n_boot):
        sample = [pairs[rng.randrange(n)] for _ in range(n)]
        b = sum(u for _, u in sample)
        if b:
            stats.append(sum(r for r, _ in sample) / b)
    stats.sort()
    if not stats:
        return {"value": value, "ci_low": None, "ci_high": None}
    lo = stats[int(0.025 * (len(stats) - 1))]
    hi = stats[math.ceil(0.975 * (len(stats) - 1))]
    return {"value": value, "ci_low": lo, "ci_high": hi}
