"""SamplingParams: how one request is sampled and when it stops, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SAMPLERS = ("approximate", "exact")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings.

    temperature: in (0, 1]. 1 takes one head sample per step. Below 1 a pool of `num_samples` head samples per step
        feeds the likelihood-free sampler: "approximate" (the paper's Algorithm 2, what the official code does, here
        extended to any T in (0, 1]) or "exact" (Algorithm 1, with a bounded number of pools; see engine/sampler.py).
    max_tokens: generated tokens at most; the last chunk is truncated to it.
    seed: makes the request's output reproducible whatever else runs in the batch; None draws a fresh seed.
    stop: strings that end the request; the text is cut before the first one (needs a tokenizer).
    stop_token_ids: ids that end the request like the end-of-sequence id.
    ignore_eos: keep generating after an end-of-sequence id (benchmarks).
    keep_eos_chunk: keep the ids after the end-of-sequence id inside its chunk, as the official generate does
        (default: the request ends at the end-of-sequence id, which is reported, and the rest is dropped).
    """

    temperature: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    num_samples: int = 200
    sampler: str = "approximate"
    exact_max_pools: int = 8
    stop: tuple[str, ...] = field(default=())
    stop_token_ids: tuple[int, ...] = field(default=())
    ignore_eos: bool = False
    keep_eos_chunk: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for token in self.stop_token_ids:
            _check_int("stop_token_ids", token, 0)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 < t <= 1:
            raise ValueError(
                f"temperature must be in (0, 1], got {t!r}: CALM samples likelihood-free, and temperatures above 1 "
                "have no sampler"
            )
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("num_samples", self.num_samples, 1)
        _check_int("exact_max_pools", self.exact_max_pools, 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
            if self.seed >= 2**63:
                raise ValueError(f"seed must be below 2**63, got {self.seed}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.temperature < 1 and self.sampler == "approximate" and self.num_samples < self.inverse_floor:
            raise ValueError(
                f"num_samples={self.num_samples} is below n=floor(1/T)={self.inverse_floor}: the approximate sampler "
                "needs at least n samples to see a patch n times"
            )
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def inverse_temperature(self) -> float:
        return 1.0 / self.temperature

    @property
    def inverse_floor(self) -> int:
        """n = floor(1/T), guarded against 1/0.5 = 1.9999... style rounding."""
        r = self.inverse_temperature
        return int(round(r)) if math.isclose(r, round(r), rel_tol=1e-9) else math.floor(r)

    @property
    def samples_per_step(self) -> int:
        """Head samples drawn per step: one at T = 1, else the pool."""
        return 1 if self.temperature == 1 else self.num_samples


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
