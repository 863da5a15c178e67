"""The engine end to end on random models: against a plain reference loop, stopping rules, continuous batching."""

from __future__ import annotations

import io
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from calm_engine.kernels.philox import uniform_noise_ref

from calm_engine import LLM, LLMEngine, SamplingParams
from calm_engine.engine.kv_cache import KVCacheError
from calm_engine.engine.noise import counter
from tests.engine.batching import assert_each_equals_running_alone, run_with_arrivals_and_aborts
from tests.model_factory import context_sensitive_model


def reference_generate(model, prompt: list[int], seed: int, max_tokens: int, padding: str = "right") -> list[int]:
    """T = 1 generation with the reference model API, one request alone, the engine's noise convention."""
    k, pad = model.config.chunk_size, model.config.pad_token_id
    missing = [pad] * (-len(prompt) % k)
    fed = prompt + missing if padding == "right" else missing + prompt
    cache = model.new_cache(1)
    hidden = model.hidden_states(torch.tensor([fed]), cache)[:, -1]
    out = []
    for step in range(-(-max_tokens // k)):
        counters = torch.tensor([counter(step)])
        noise = uniform_noise_ref(torch.tensor([seed]), counters, 1, model.config.noise_size)[:, 0]
        patch = model.autoencoder.decode_ids(model.sample_latent(hidden, noise)[:, None])
        out += patch[0].tolist()
        hidden = model.hidden_states(patch, cache)[:, -1]
    return [t for t in out[:max_tokens] if t != pad]


@pytest.fixture(scope="module")
def model():
    return context_sensitive_model(seed=11)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_t1_generation_matches_the_reference_loop(model, padding):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [40] * 4, [3]]
    params = [SamplingParams(max_tokens=n, seed=s, ignore_eos=True) for n, s in [(9, 1), (12, 2), (5, 3), (1, 4)]]
    llm = LLM(model, max_batch_size=3, max_model_len=64, prompt_padding=padding)
    outputs = llm.generate(prompts, params)
    for prompt, p, output in zip(prompts, params, outputs, strict=True):
        assert output.token_ids == reference_generate(model, prompt, p.seed, p.max_tokens, padding)
        assert output.finish_reason == "length" and output.prompt_token_ids == prompt


def test_eos_ends_the_request_inside_a_chunk(model):
    llm = LLM(model, max_batch_size=2, max_model_len=64)
    free = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=40, seed=5, ignore_eos=True))[0].token_ids
    eos = free[6]  # an id first produced in the middle of the second chunk
    first = free.index(eos)
    model.config.__dict__["eos_token_id"] = eos  # the config is frozen; this test swaps its eos id
    try:
        llm = LLM(model, max_batch_size=2, max_model_len=64)
        cut, kept = llm.generate(
            [[5, 6, 7, 8]] * 2,
            [SamplingParams(max_tokens=40, seed=5), SamplingParams(max_tokens=40, seed=5, keep_eos_chunk=True)],
        )
    finally:
        model.config.__dict__["eos_token_id"] = 2
    assert cut.token_ids == free[: first + 1] and cut.finish_reason == "stop"
    chunk_end = (first // 4 + 1) * 4
    assert kept.token_ids == free[:chunk_end] and kept.finish_reason == "stop"


def test_max_tokens_truncates_the_last_chunk(model):
    llm = LLM(model, max_batch_size=2, max_model_len=64)
    long, short = llm.generate(
        [[9, 9, 9, 9]] * 2,
        [SamplingParams(max_tokens=12, seed=8, ignore_eos=True), SamplingParams(max_tokens=7, seed=8, ignore_eos=True)],
    )
    assert short.token_ids == long.token_ids[:7] and len(short.token_ids) == 7


def test_the_context_limit_ends_a_request(model):
    llm = LLM(model, max_batch_size=1, max_model_len=16)  # 4 chunks: a 2-chunk prompt leaves room for 3 outputs
    out = llm.generate([[1] * 8], SamplingParams(max_tokens=100, seed=1, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12


def test_bad_requests_are_refused_without_touching_the_engine(model):
    engine = LLMEngine(model, max_batch_size=2, max_model_len=32)
    engine.add_request("ok", [4, 5, 6, 7], SamplingParams(max_tokens=8, seed=3, ignore_eos=True))
    bad = {
        "empty": ([], ValueError, "empty"),
        "oov": ([1, 2, model.config.vocab_size], ValueError, "vocabulary"),
        "negative": ([1, -1], ValueError, "vocabulary"),
        "long": ([1] * 33, ValueError, "longer than max_model_len"),
        "text": ("hello", ValueError, "tokenizer"),
    }
    for request_id, (prompt, error, message) in bad.items():
        with pytest.raises(error, match=message):
            engine.add_request(request_id, prompt)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", [1, 2, 3, 4])
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.add_request("dict", [1, 2, 3, 4], {"temperature": 0.5})
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    alone = LLM(model, max_batch_size=1, max_model_len=32).generate(
        [[4, 5, 6, 7]], SamplingParams(max_tokens=8, seed=3, ignore_eos=True)
    )
    assert [o.request_id for o in outputs if o.finished] == ["ok"]
    assert outputs[-1].token_ids == alone[0].token_ids


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=0), "temperature"),
        (dict(temperature=1.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(num_samples=0), "num_samples"),
        (dict(temperature=0.25, num_samples=3), "num_samples"),
        (dict(seed=-1), "seed"),
        (dict(sampler="greedy"), "sampler"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_unaligned_prompt_without_pad_id_is_refused():
    model = context_sensitive_model(seed=2, pad_token_id=None)
    engine = LLMEngine(model, max_batch_size=1, max_model_len=32)
    with pytest.raises(ValueError, match="pad_token_id"):
        engine.add_request("a", [1, 2, 3])
    engine.add_request("b", [1, 2, 3, 4], SamplingParams(max_tokens=4, seed=1))  # whole chunks need no pad
    while engine.has_unfinished_requests():
        engine.step()


def test_kv_cache_budget_is_enforced(model):
    with pytest.raises(KVCacheError, match="lower max_batch_size or max_model_len"):
        LLMEngine(model, max_batch_size=64, max_model_len=256, kv_cache_memory=1 << 16)


def test_continuous_batching_equals_running_alone():
    """100 requests of mixed lengths and parameters join and leave a batch of 8 through the step API (with aborts);
    every completed request equals the same request run alone. float64, so that batch-size-dependent rounding
    cannot flip an argmax."""
    model = context_sensitive_model(seed=21).double()
    rng = random.Random(7)
    requests = {}
    for i in range(100):
        temperature = rng.choice([1.0, 1.0, 0.5, 0.7])
        params = SamplingParams(
            temperature=temperature,
            max_tokens=rng.randint(1, 14),
            seed=rng.randint(0, 2**40),
            num_samples=rng.choice([6, 10]),
            sampler=rng.choice(["approximate", "exact"]),
            exact_max_pools=2,
        )
        requests[f"r{i}"] = ([rng.randrange(model.config.vocab_size) for _ in range(rng.randint(1, 13))], params)
    engine = LLMEngine(model, max_batch_size=8, max_model_len=48)
    finished, aborted = run_with_arrivals_and_aborts(engine, requests, rng, max_arrivals=6, abort_rate=0.2)
    assert len(aborted) >= 3 and {out.finish_reason for out in finished.values()} >= {"length"}
    assert_each_equals_running_alone(model, requests, finished, max_model_len=48)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "stream, use_tqdm, shown", [("terminal", True, True), ("terminal", False, False), ("pipe", True, False)]
)
def test_generate_shows_a_progress_bar_on_a_terminal(model, monkeypatch, stream, use_tqdm, shown):
    stderr = FakeTerminal() if stream == "terminal" else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    llm = LLM(model, max_batch_size=3, max_model_len=64)
    outputs = llm.generate([[5, 6, 7, 8]] * 7, SamplingParams(max_tokens=8, seed=1, ignore_eos=True), use_tqdm=use_tqdm)
    assert len(outputs) == 7 and all(o.finished for o in outputs)
    bar = stderr.getvalue()
    assert ("generate: 100%" in bar and "7/7" in bar and "tok/s" in bar) if shown else bar == ""


def test_numpy_numbers_and_tensors_are_the_prompts_and_numbers_they_hold(model):
    llm = LLM(model, max_batch_size=2, max_model_len=64)
    ids = [5, 6, 7, 8, 9]
    expected = llm.generate([ids], SamplingParams(temperature=0.5, num_samples=16, max_tokens=8, seed=3))[0]
    numpy_params = SamplingParams(
        temperature=np.float32(0.5), num_samples=np.int64(16), max_tokens=np.int32(8), seed=np.uint8(3)
    )
    assert type(numpy_params.temperature) is float and type(numpy_params.seed) is int
    for prompt in (torch.tensor(ids), np.array(ids), [np.int64(i) for i in ids], tuple(ids)):
        (output,) = llm.generate(prompt, numpy_params)  # one prompt, not one per id
        assert output.token_ids == expected.token_ids and output.prompt_token_ids == ids
    rows = llm.generate(torch.tensor([ids[:4], ids[1:]]), numpy_params)  # 2-D: a prompt per row
    assert [o.prompt_token_ids for o in rows] == [ids[:4], ids[1:]]


@pytest.mark.parametrize("use_cpu_step", [False, True])
def test_sample_pool_estimate_matches_a_measured_step(use_cpu_step):
    """The pool budget's estimate (sample_row_bytes per sample plus one decode block) against the growth of resident
    memory during a step of 20,000 samples of the default model, from the kernel's high-water mark (ru_maxrss) in a
    fresh process. It fails when a backend's memory grows with the pool faster than the estimate says (a pool decoded
    whole grows by about 55 KB per sample, six times the estimate)."""
    script = f"""
import os, resource
from calm_engine import LLM, SamplingParams
from calm_engine.engine.llm_engine import decode_block_bytes, sample_row_bytes
llm = LLM(max_batch_size=1, use_cpu_step={use_cpu_step})
llm.generate("warm up", SamplingParams(temperature=0.5, max_tokens=4, num_samples=8, seed=0), use_tqdm=False)
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
llm.generate("The history", SamplingParams(temperature=0.5, max_tokens=4, num_samples=20000, seed=0), use_tqdm=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(peak - before, 20000 * sample_row_bytes(llm.model) + decode_block_bytes(llm.model))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    measured, estimate = map(float, result.stdout.split())
    assert 0.5 * measured <= estimate <= 2.0 * measured, (measured, estimate)
