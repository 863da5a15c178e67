"""The step interface: rows in, one result type out, whatever backend runs the step.

A backend prefills the admitted rows (their prompts into their cache slots, then the first generated chunk) or
decodes the running rows (each row's last chunk in, its next chunk out). Either way it returns a StepResult: the
sampled ids and the exact sampler's fallback flags, nothing else; the engine copies both to the host once per step.
A row is anything with the fields of StepRow: the engine passes its Request objects as they are (no conversion: a
T = 1 step of the C++ backend at batch 1 lasts ~0.7 ms, and every tensor built costs ~20 us).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from calm_engine.sampling_params import SamplingParams


class Phase(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


class StepRow(Protocol):
    """What a backend reads of a request (calm_engine.engine.request.Request has these fields)."""

    slot: int  # its KV-cache slot
    seed: int  # its noise key
    chunks_done: int  # chunks generated so far: the step's noise counter (noise.counter)
    fed_prompt: list[int]  # the prompt as the model reads it, whole chunks (prefill)
    last_chunk: list[int]  # the chunk to feed (decode)
    params: SamplingParams

    @property
    def prompt_chunks(self) -> int: ...

    @property
    def next_position(self) -> int: ...  # the chunk position at which last_chunk is fed


@dataclass(frozen=True)
class StepResult:
    """chunks [B, K] int64: every row's sampled next chunk. fell_back [B] bool: rows whose exact sampler reached its
    bound and took Algorithm 2's choice instead, or None where no such sampler can run (the C++ step's T = 1 rows)."""

    chunks: torch.Tensor
    fell_back: torch.Tensor | None = None


class StepBackend(ABC):
    """One way of running a step. `supports` says which rows it can run at all (correctness); which of the backends
    that can runs a step, for speed, is policy.choose_backend's decision alone."""

    name: str

    @abstractmethod
    def supports(self, phase: Phase, rows: Sequence[StepRow]) -> bool: ...

    @abstractmethod
    def prefill(self, rows: Sequence[StepRow]) -> StepResult: ...

    @abstractmethod
    def decode(self, rows: Sequence[StepRow]) -> StepResult: ...
