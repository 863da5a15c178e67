"""Driving an engine through its step API with requests arriving and aborted at random, and checking the result
against each request run alone: shared by the CALM and the token-level continuous-batching tests."""

from __future__ import annotations

import random

from calm_engine import LLM, LLMEngine


def run_with_arrivals_and_aborts(
    engine: LLMEngine, requests: dict, rng: random.Random, max_arrivals: int, abort_rate: float
) -> tuple[dict, set]:
    """Add up to `max_arrivals` requests before each step, abort a running or queued one with `abort_rate`, step
    until all are done. Checks on the way: no output after a request finished, streamed ids add up to the final
    ids, the batch never exceeds the engine's slots; at the end every request either finished or was aborted and
    every slot is free again. Returns (finished outputs by id, aborted ids)."""
    slots = engine.cache.slots
    pending = list(requests)
    aborted, finished, streamed = set(), {}, {}
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.randint(0, max_arrivals)):
            if pending:
                request_id = pending.pop(0)
                engine.add_request(request_id, *requests[request_id])
        live = sorted(engine.scheduler.running) + [r.request_id for r in engine.scheduler.waiting]
        if rng.random() < abort_rate and live:  # running or still queued
            victim = rng.choice(live)
            assert engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            assert out.request_id not in finished, "output after finishing"
            streamed.setdefault(out.request_id, []).extend(out.new_token_ids)
            assert streamed[out.request_id] == out.token_ids
            if out.finished:
                finished[out.request_id] = out
        assert len(engine.scheduler.running) <= slots
    assert set(finished) | aborted == set(requests) and not set(finished) & aborted
    assert sorted(engine.scheduler.free_slots) == list(range(slots)), "a slot was not returned"
    return finished, aborted


def assert_each_equals_running_alone(model, requests: dict, finished: dict, max_model_len: int) -> None:
    alone = LLM(model, max_batch_size=1, max_model_len=max_model_len)
    for request_id, out in finished.items():
        expected = alone.generate([requests[request_id][0]], requests[request_id][1])[0]
        assert out.token_ids == expected.token_ids, request_id
        assert out.finish_reason == expected.finish_reason
