"""A request's state through the engine (plain Python) and what the engine reports for it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from calm_engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One generation request.

    fed_prompt is the prompt as the model reads it (padded to whole chunks); `chunks_done` counts the chunks
    generated so far, which is also the index of the step's noise counter. `last_chunk` waits to be fed back.
    """

    request_id: str
    prompt_ids: list[int]
    fed_prompt: list[int]
    params: SamplingParams
    seed: int
    chunk_size: int
    stop_ids: frozenset[int]  # ids that end the request: the model's EOS ids (unless ignored) and params.stop_token_ids
    status: Status = Status.WAITING
    slot: int | None = None
    chunks_done: int = 0
    tokens_generated: int = 0  # ids sampled so far, including pads that are not reported
    output_ids: list[int] = field(default_factory=list)
    last_chunk: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None

    @property
    def prompt_chunks(self) -> int:
        return len(self.fed_prompt) // self.chunk_size

    @property
    def next_position(self) -> int:
        """The chunk position at which `last_chunk` is fed."""
        return self.prompt_chunks + self.chunks_done - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass
class RequestOutput:
    """What a step produced for one request: the ids new in this step, all ids so far, and whether it finished.

    finish_reason: "stop" (end-of-sequence id or stop string), "length" (max_tokens or the context), "abort".
    text is set when the request finishes and the model has a tokenizer.
    """

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    text: str | None = None
