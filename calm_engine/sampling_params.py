"""SamplingParams: how one request is sampled and when it stops, validated at construction."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field

from calm_engine.engine.noise import MAX_POOLS

SAMPLERS = ("approximate", "exact")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling settings.

    temperature: in (0, 1]; default 1, the model's own distribution (one head sample per step, the fast path;
        `calm generate` defaults to 0.5 for sharper text to read). Below 1 a pool of `num_samples` head samples per step
        feeds the likelihood-free sampler: "approximate" (the paper's Algorithm 2, what the official code does, here
        extended to any T in (0, 1]) or "exact" (Algorithm 1, with at most exact_max_pools pools per step, at most
        engine/noise.py's MAX_POOLS = 32; see engine/sampler.py).
    max_tokens: generated tokens at most; the last chunk is truncated to it.
    seed: makes the request's output reproducible whatever else runs in the batch; None draws a fresh seed.
    stop: a string or a list of strings that end the request; the text is cut before the first one (needs a
        tokenizer). Omit it (or give ()) for none.
    stop_token_ids: a list of ids that end the request like the end-of-sequence id.
    ignore_eos: keep generating after an end-of-sequence id (benchmarks).
    keep_eos_chunk: keep the ids after the end-of-sequence id inside its chunk, as the official generate does
        (default: the request ends at the end-of-sequence id, which is reported, and the rest is dropped).

    Numbers may be numpy or other `numbers.Real` / `numbers.Integral` scalars (np.float32(0.5), np.int64(7)); they are
    stored as Python floats and ints.
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
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_token_ids(self.stop_token_ids))
        object.__setattr__(self, "temperature", _temperature(self.temperature))
        for name, minimum in (("max_tokens", 1), ("num_samples", 1), ("exact_max_pools", 1)):
            object.__setattr__(self, name, _integer(name, getattr(self, name), minimum))
        if self.seed is not None:
            object.__setattr__(self, "seed", _integer("seed", self.seed, 0))
            if self.seed >= 2**63:
                raise ValueError(f"seed must be below 2**63, got {self.seed}")
        if self.exact_max_pools > MAX_POOLS:
            raise ValueError(f"exact_max_pools must be at most {MAX_POOLS}, got {self.exact_max_pools}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.temperature < 1 and self.sampler == "approximate" and self.num_samples < self.inverse_floor:
            raise ValueError(
                f"num_samples={self.num_samples} is below n=floor(1/T)={self.inverse_floor}: the approximate sampler "
                "needs at least n samples to see a patch n times"
            )
        for name in ("ignore_eos", "keep_eos_chunk"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

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


def _integer(name: str, value, minimum: int) -> int:
    """An integral number (int, np.int64, ...; not bool) >= minimum, as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _temperature(given) -> float:
    rule = f"temperature must be in (0, 1], got {given!r}"
    if isinstance(given, bool) or not isinstance(given, numbers.Real):
        raise ValueError(f"{rule} (a {type(given).__name__}, not a number)")
    value = float(given)
    if math.isnan(value):
        raise ValueError(rule)
    if value <= 0:
        raise ValueError(
            f"{rule}: CALM samples likelihood-free and has no greedy T = 0; a small T such as 0.1 (with "
            "num_samples >= 1/T) comes close"
        )
    if value > 1:
        raise ValueError(f"{rule}: CALM samples likelihood-free, and temperatures above 1 have no sampler")
    return value


def _stop_strings(stop) -> tuple[str, ...]:
    if isinstance(stop, (bytes, bytearray)) or not isinstance(stop, (str, Iterable)):
        raise ValueError(f"stop must be a string or a list of strings (omit it for none), got {stop!r}")
    strings = (stop,) if isinstance(stop, str) else tuple(stop)
    for s in strings:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return tuple(strings)


def _stop_token_ids(ids) -> tuple[int, ...]:
    if isinstance(ids, numbers.Integral):
        raise ValueError(f"stop_token_ids must be a list of token ids, got the single number {ids!r}: write [{ids!r}]")
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable):
        raise ValueError(f"stop_token_ids must be a list of token ids (omit it for none), got {ids!r}")
    return tuple(_integer("stop_token_ids", token, 0) for token in ids)
