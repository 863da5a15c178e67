"""Load on loopback, bounded in count and time: many requests from 64 concurrent streaming clients, 10% of which
disconnect mid-stream. Every completed stream equals the same seeded request run alone through LLM.generate (so no
chunk was lost or duplicated), the disconnected ones got a prefix of it, /metrics ends with nothing running or
waiting and every KV slot free, and the server still answers.

CI runs 200 requests; CALM_SERVE_LOAD_REQUESTS=1000 runs the issue's full version (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import openai

from tests.serve.conftest import generate_alone, normal_request

REQUESTS = int(os.environ.get("CALM_SERVE_LOAD_REQUESTS", "200"))
CLIENTS = 64
DISCONNECT_EVERY = 10  # request i with i % 10 == 5 leaves after its first chunk of text
DEADLINE_S = 60 + REQUESTS * 0.5
PROMPTS = [
    "The history of the city",
    "To be, or not to be, that is",
    "The module provides functions for",
    "Enter the king, with his",
    "A list of the",
    "When the",
]
STOPS = [" the", "\n", "."]


def make_requests(count: int) -> list[dict]:
    """Mixed requests: T = 1 mostly, 5% below 1, some n = 2, some with stop strings.

    A step with any row below T = 1 runs every row through the sample-pool path (batch x num_samples head samples,
    decoded over the vocabulary), 10-100x slower than a T = 1 step on CPU, hence few such rows and small pools here;
    the exact sampler is tested alone (test_openai_client.py)."""
    rng = random.Random(0)
    requests = []
    for i in range(count):
        request = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randrange(8, 97), "seed": 1000 + 7 * i}
        if i % 20 == 3:
            request |= {"temperature": 0.5, "num_samples": 4}
        if i % 13 == 4:
            request["n"] = 2
        if i % 7 == 2:
            request["stop"] = [rng.choice(STOPS)]
        requests.append(request)
    return requests


def reference(llm, request: dict) -> list:
    """Each choice of `request` run alone through LLM.generate (choice j has seed + j)."""
    params = {
        "temperature": request.get("temperature", 1.0),
        "max_tokens": request["max_tokens"],
        "num_samples": request.get("num_samples", 200),
        "stop": tuple(request.get("stop", ())),
    }
    return [
        generate_alone(llm, request["prompt"], seed=request["seed"] + j, **params) for j in range(request.get("n", 1))
    ]


async def run_one(client: openai.AsyncOpenAI, request: dict, disconnect: bool) -> dict:
    texts, reasons, usage, chunks = {}, {}, None, 0
    extra = {k: request[k] for k in ("num_samples",) if k in request}
    fields = {k: v for k, v in request.items() if k not in extra}
    stream = await client.completions.create(
        model="calm-default", stream=True, stream_options={"include_usage": True}, extra_body=extra, **fields
    )
    async for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                assert choice.index not in reasons, "a choice finished twice"
                reasons[choice.index] = choice.finish_reason
        if disconnect and any(texts.values()):
            await stream.close()
            break
    return {"texts": texts, "reasons": reasons, "usage": usage, "chunks": chunks}


async def run_load(base_url: str, requests: list[dict]) -> list[dict]:
    results: list[dict | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))

    async def client_loop(client):
        for i in next_index:
            results[i] = await run_one(client, requests[i], i % DISCONNECT_EVERY == 5)

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(CLIENTS))), DEADLINE_S)
    return results


def test_load_with_disconnects(server, reference_llm):
    requests = make_requests(REQUESTS)
    before = server.metrics()
    start = time.perf_counter()
    results = asyncio.run(run_load(server.base_url, requests))
    elapsed = time.perf_counter() - start
    samples = server.wait_idle()

    completed = disconnected = 0
    for i, (request, result) in enumerate(zip(requests, results, strict=True)):
        expected = reference(reference_llm, request)
        if i % DISCONNECT_EVERY == 5:
            disconnected += 1
            for index, text in result["texts"].items():
                assert expected[index].text.startswith(text), (i, index)
            continue
        completed += 1
        assert result["texts"] == {j: e.text for j, e in enumerate(expected)}, i
        assert result["reasons"] == {j: e.finish_reason for j, e in enumerate(expected)}, i
        assert result["usage"].completion_tokens == sum(len(e.token_ids) for e in expected), i

    assert samples["calm_requests_running"] == 0 and samples["calm_requests_waiting"] == 0
    assert samples["calm_kv_slots_used"] == 0 and samples["calm_kv_slots_total"] == 64

    def finished(reason):
        key = f'calm_requests_finished_total{{reason="{reason}"}}'
        return samples.get(key, 0) - before.get(key, 0)

    choices = sum(r.get("n", 1) for r in requests)
    assert finished("abort") <= sum(r.get("n", 1) for i, r in enumerate(requests) if i % DISCONNECT_EVERY == 5)
    assert finished("abort") + finished("length") + finished("stop") == choices
    assert normal_request(server.url).status_code == 200
    rate = sum(r["chunks"] for r in results) / elapsed
    print(f"\n{REQUESTS} requests ({completed} whole, {disconnected} left) in {elapsed:.1f} s, {rate:.0f} chunks/s")
