"""The OpenAI completions protocol: the request schema (validated by pydantic) and the response and chunk shapes.

Fields a likelihood-free model cannot honour are accepted only at their neutral values, so that a client that sends
them gets a 400 saying why instead of a silently different behaviour.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from calm_engine.serve.errors import APIError

MAX_STOP_STRINGS = 16  # each is searched for in every step's text, on the engine's thread

NO_LOGITS = "CALM samples likelihood-free: its generative head gives no token probabilities"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions. Unknown fields and wrong types are refused (strict: "1" is not a number)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    prompt: Any = Field(description="a string, a list of strings, a list of token ids, or a list of such lists")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(default=None, validate_default=True)
    seed: int | None = None
    echo: bool = False
    user: str | None = None
    # Accepted only at their neutral values (see unsupported_fields); typed loosely so the 400 says why.
    best_of: Any = None
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = 0
    frequency_penalty: Any = 0
    suffix: Any = None
    # CALM's own knobs (SamplingParams), and vLLM's ignore_eos for benchmarks.
    num_samples: int | None = Field(default=None, ge=1)
    sampler: Literal["approximate", "exact"] | None = None
    ignore_eos: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        return normalize_prompt(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        return stops


def normalize_prompt(value) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of prompts, each a string or a list of token ids."""

    def is_id(x):
        return isinstance(x, int) and not isinstance(x, bool)

    def is_ids(x):
        return isinstance(x, list) and bool(x) and all(is_id(t) for t in x)

    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list: give at least one prompt")
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(is_id(t) for t in value):
            return [list(value)]
        if all(is_ids(p) for p in value):
            return [list(p) for p in value]
        if any(isinstance(p, list) and not p for p in value):
            raise ValueError("holds an empty list of token ids")
    raise ValueError("must be a string, a list of strings, a list of token ids or a list of lists of token ids")


def unsupported_fields(request: CompletionRequest) -> None:
    """400 for every OpenAI field this model cannot honour at a non-neutral value, saying why."""
    if request.temperature == 0:
        message = (
            f"temperature=0 (greedy decoding) needs the most likely token, and {NO_LOGITS}: use a small temperature "
            "such as 0.1 (the sampler then draws num_samples >= 10 head samples per step)"
        )
        raise APIError(400, message, param="temperature")
    if request.logprobs is not None:
        raise APIError(400, f"logprobs is not supported: {NO_LOGITS}", param="logprobs")
    if request.logit_bias not in (None, {}):
        raise APIError(400, f"logit_bias is not supported: {NO_LOGITS} to bias", param="logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != 0):
            raise APIError(400, f"{name} must be 0 (got {value!r}): {NO_LOGITS} to penalise", param=name)
    if request.best_of is not None:
        best_of = request.best_of
        if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1:
            raise APIError(400, f"best_of must be an integer >= 1, got {best_of!r}", param="best_of")
        if best_of > request.n:
            raise APIError(
                400,
                f"best_of={best_of} > n={request.n} is not supported: ranking completions needs their likelihood, "
                f"and {NO_LOGITS}",
                param="best_of",
            )
    if request.suffix not in (None, ""):
        raise APIError(400, "suffix is not supported: the model only continues a prompt (no infilling)", param="suffix")
    if request.top_p is not None and request.top_p != 1:
        raise APIError(400, f"top_p must be 1 (got {request.top_p!r}): {NO_LOGITS} to truncate", param="top_p")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")


# ---- responses -----------------------------------------------------------------------------------------------------
# Plain dicts serialised with json: one chunk is built for every step of every streaming choice.


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion(completion_id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def completion_chunk(
    completion_id: str, created: int, model: str, choices: list[dict], with_usage: bool, usage_: dict | None = None
) -> dict:
    chunk = {"id": completion_id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage:  # stream_options.include_usage: null on every chunk but the last, which has no choices
        chunk["usage"] = usage_
    return chunk


# json.dumps with these options would build an encoder per call; a streamed event encodes its text with this one.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def to_json(value) -> str:
    """json.dumps(value, ensure_ascii=False, separators=(",", ":")): compact, non-ASCII characters as themselves."""
    return _ENCODER.encode(value)


class ChunkEncoder:
    """The `data:` events of one streamed completion, as to_json(completion_chunk(...)) writes them: the parts that
    do not change are encoded once, and each event fills in one choice's index, text and finish reason (a chunk is
    encoded for every step of every stream, so this is the server's hottest serialisation)."""

    _SLOTS = ("\u0000index", "\u0000text", "\u0000reason")

    def __init__(self, completion_id: str, created: int, model: str, with_usage: bool):
        self._head = (completion_id, created, model, with_usage)
        choice = completion_choice(*self._SLOTS)
        text = to_json(completion_chunk(completion_id, created, model, [choice], with_usage))
        for slot in self._SLOTS:
            text = text.replace(to_json(slot), "\u0000")
        self._parts = text.split("\u0000")
        assert len(self._parts) == 4, "a sentinel appeared in the completion id or the model name"

    def choice(self, index: int, text: str, finish_reason: str | None) -> str:
        p = self._parts
        reason = "null" if finish_reason is None else to_json(finish_reason)
        return f"data: {p[0]}{index}{p[1]}{to_json(text)}{p[2]}{reason}{p[3]}\n\n"

    def usage(self, usage_: dict) -> str:
        return f"data: {to_json(completion_chunk(*self._head[:3], [], True, usage_))}\n\n"


def model_card(model_id: str, created: int, max_model_len: int) -> dict:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "calm-engine"}
    return {**card, "max_model_len": max_model_len}
