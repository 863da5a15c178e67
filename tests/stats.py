"""Total-variation distance between distributions and a pass threshold derived from the sample sizes."""

from __future__ import annotations

import math
from collections import Counter


def total_variation(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(x, 0.0) - q.get(x, 0.0)) for x in set(p) | set(q))


def empirical(samples) -> dict:
    counts = Counter(samples)
    total = sum(counts.values())
    return {x: c / total for x, c in counts.items()}


def tv_threshold(p: dict, n1: int, n2: int | None = None, fail_probability: float = 1e-6) -> float:
    """A bound the TV distance between empirical distributions of `p` exceeds with probability < fail_probability.

    One sample of size n1 against the exact p (n2=None), or two independent samples of sizes n1 and n2. Expected
    TV: E|p^_x - p_x| <= sqrt(Var) by Jensen, so E[TV] <= 0.5 * sum_x sqrt(p_x (1 - p_x) v) with v = 1/n1 (+ 1/n2).
    Deviation: one draw moves TV by at most 1/n, so McDiarmid gives P(TV - E[TV] >= t) <= exp(-2 t^2 / v).
    """
    v = 1 / n1 + (1 / n2 if n2 else 0.0)
    expected = 0.5 * sum(math.sqrt(px * (1 - px) * v) for px in p.values())
    return expected + math.sqrt(math.log(1 / fail_probability) * v / 2)
