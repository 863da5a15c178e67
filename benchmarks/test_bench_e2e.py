"""End-to-end generation timed by pytest-benchmark on the small shape: the engine, its token-level Llama of the
same backbone, and the official generate side by side when a checkout is configured (benchmarks/official.py).

    python -m pytest benchmarks/test_bench_e2e.py            # the full grid: python benchmarks/e2e.py
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from benchmarks.official import run_official
from benchmarks.shapes import cached_checkpoint
from calm_engine import LLM, SamplingParams

PROMPT_LEN, NEW_TOKENS = 32, 64


@functools.cache
def engine(shape: str) -> LLM:
    return LLM(str(cached_checkpoint(shape)), max_batch_size=8, max_model_len=PROMPT_LEN + NEW_TOKENS + 8)


def prompts(batch: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 8192) for _ in range(PROMPT_LEN)] for _ in range(batch)]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", ["small", "small_token"])
def test_generate(benchmark, shape, batch, temperature):
    torch.set_num_threads(2)
    llm = engine(shape)
    params = SamplingParams(temperature=temperature, max_tokens=NEW_TOKENS, num_samples=200, ignore_eos=True, seed=1)
    benchmark.extra_info["tokens"] = batch * NEW_TOKENS
    outputs = benchmark.pedantic(llm.generate, args=(prompts(batch), params), rounds=3, warmup_rounds=1)
    assert all(len(o.token_ids) == NEW_TOKENS for o in outputs)
    benchmark.extra_info["tokens_per_s"] = batch * NEW_TOKENS / benchmark.stats["median"]


@pytest.mark.parametrize("batch", [1, 8])
def test_official_generate(benchmark, batch):
    """The official generate in its own interpreter (skipped without CALM_OFFICIAL_DIR / CALM_OFFICIAL_PYTHON)."""
    options = dict(batch=batch, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS, temperature=1.0, threads=2, repeats=3)
    # The benchmark's own time includes the subprocess start and model load; the generate time measured inside the
    # subprocess (median of 3) is in extra_info.
    result = benchmark.pedantic(run_official, args=(cached_checkpoint("small"),), kwargs=options, rounds=1)
    benchmark.extra_info.update(tokens_per_s=result["tokens_per_s"], ms_per_step=result["ms_per_step"])
