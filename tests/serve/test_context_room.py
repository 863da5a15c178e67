"""completion_room: exactly the tokens the engine can generate after a prompt, so `max_tokens` is capped right."""

from __future__ import annotations

import pytest

from calm_engine import LLM, SamplingParams
from calm_engine.serve.completions import completion_room

MAX_MODEL_LEN = 32  # 8 chunks of K = 4: the engine's limit is reached in a few steps


@pytest.fixture(scope="module")
def llm():
    return LLM(max_model_len=MAX_MODEL_LEN)


@pytest.mark.parametrize("prompt_tokens", [1, 3, 4, 5, 16, 29, 32])
def test_room_is_what_the_engine_generates(llm, prompt_tokens):
    k, capacity = llm.engine.chunk_size, llm.engine.cache.capacity
    room = completion_room(prompt_tokens, k, capacity)
    prompt = [5] * prompt_tokens
    asked = SamplingParams(max_tokens=room, ignore_eos=True, seed=1)
    more = SamplingParams(max_tokens=room + k, ignore_eos=True, seed=1)
    exact, over = llm.generate([prompt, prompt], [asked, more])
    assert len(exact.token_ids) == room and exact.finish_reason == "length"
    assert len(over.token_ids) == room  # the context, not max_tokens, ended it: room is the engine's limit
