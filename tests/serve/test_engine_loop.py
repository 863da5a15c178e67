"""EngineLoop in-process: aborts land before the next step, refused requests leave no trace, the queue is bounded,
and an engine failure ends every request in flight."""

from __future__ import annotations

import asyncio
import time

import pytest

from calm_engine import LLM, SamplingParams
from calm_engine.serve.engine_loop import EngineFailed, EngineLoop, Mailbox, NotAccepting, QueueFull

TIMEOUT_S = 30


@pytest.fixture
def engine():
    return LLM(max_batch_size=2, max_model_len=256).engine


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT_S))


def long_params(seed: int, temperature: float = 1.0) -> SamplingParams:
    """64 steps; below T = 1 each step draws a pool of 64 head samples, so the request lasts a while."""
    return SamplingParams(max_tokens=256, ignore_eos=True, seed=seed, temperature=temperature, num_samples=64)


def test_abort_frees_the_slot_before_the_next_step(engine):
    steps = []  # (time the step began, ids running in it)
    original_step = engine.step

    def recording_step():
        steps.append((time.perf_counter(), set(engine.scheduler.running)))
        time.sleep(0.002)  # slow the loop a little so that steps interleave with the abort
        return original_step()

    engine.step = recording_step

    async def scenario():
        loop = EngineLoop(engine, max_waiting=0)
        loop.start(asyncio.get_running_loop())
        handle = loop.submit(["a"], [[5, 6, 7]], [long_params(1)])
        await handle.accepted
        await handle.outputs.get()
        await handle.outputs.get()
        aborted_at = time.perf_counter()
        loop.abort(["a"])
        final = None
        while final is None:
            final = next((o for o in await handle.outputs.get() if o.finished), None)
        loop.stop()
        return aborted_at, final

    aborted_at, final = run(scenario())
    assert final.finish_reason == "abort"
    later = [running for began, running in steps if began > aborted_at]
    assert all("a" not in running for running in later[1:])  # at most the step already under way still had it
    assert engine.scheduler.free_slots and not engine.has_unfinished_requests()


def test_refused_request_leaves_nothing_behind(engine):
    async def scenario():
        loop = EngineLoop(engine, max_waiting=2)
        loop.start(asyncio.get_running_loop())
        handle = loop.submit(["ok", "bad"], [[5, 6], [5, 99999]], [long_params(1), long_params(2)])
        with pytest.raises(ValueError, match="99999"):
            await handle.accepted
        assert handle.failed_at == 1
        await asyncio.sleep(0.05)
        stats = loop.stats()
        loop.stop()
        return stats

    stats = run(scenario())
    assert (stats.running, stats.waiting, stats.slots_used) == (0, 0, 0)
    assert not engine.requests and not engine.has_unfinished_requests()


def test_waiting_queue_is_bounded(engine):
    async def scenario():
        loop = EngineLoop(engine, max_waiting=1)  # 2 slots + 1 waiting
        loop.start(asyncio.get_running_loop())
        handle = loop.submit(["a", "b"], [[5], [6]], [long_params(1), long_params(2)])
        loop.submit(["c"], [[7]], [long_params(3)])
        with pytest.raises(QueueFull):
            loop.submit(["d"], [[8]], [long_params(4)])
        await handle.accepted
        loop.abort(["a"])
        while loop.stats().running + loop.stats().waiting > 2:
            await asyncio.sleep(0.005)
        loop.submit(["d"], [[8]], [long_params(4)])  # room again once "a" is gone
        loop.stop()

    run(scenario())


def test_engine_failure_ends_requests_and_refuses_new_ones(engine):
    def broken_step():
        raise RuntimeError("device lost")

    engine.step = broken_step

    async def scenario():
        loop = EngineLoop(engine, max_waiting=4)
        loop.start(asyncio.get_running_loop())
        handle = loop.submit(["a"], [[5]], [long_params(1)])
        await handle.accepted
        item = await handle.outputs.get()
        with pytest.raises(NotAccepting, match="device lost"):
            loop.submit(["b"], [[5]], [long_params(2)])
        return item, loop.accepting

    item, accepting = run(scenario())
    assert isinstance(item, EngineFailed) and "device lost" in str(item) and not accepting


def test_stop_aborts_what_runs(engine):
    async def scenario():
        loop = EngineLoop(engine, max_waiting=4)
        loop.start(asyncio.get_running_loop())
        handle = loop.submit(["a", "b", "c"], [[5], [6], [7]], [long_params(i, temperature=0.5) for i in range(3)])
        await handle.accepted
        await asyncio.to_thread(loop.stop)
        with pytest.raises(NotAccepting):
            loop.submit(["d"], [[5]], [long_params(4)])
        finished = []
        while len(finished) < 3:
            finished += [o for o in await handle.outputs.get() if o.finished]
        return finished

    finished = run(scenario())
    assert sorted(o.request_id for o in finished) == ["a", "b", "c"]
    assert {o.finish_reason for o in finished} == {"abort"}
    assert not engine.has_unfinished_requests()


def test_mailbox_wakes_its_reader_for_the_items_it_wants_or_an_urgent_one():
    async def scenario():
        box = Mailbox(asyncio.get_running_loop())
        box.put_nowait("a", urgent=False)
        assert await box.take_all() == ["a"]  # one is enough by default
        reader = asyncio.ensure_future(box.take_all(3))
        for item in ("b", "c"):
            box.put_nowait(item, urgent=False)
            await asyncio.sleep(0)
            assert not reader.done()
        box.put_nowait("d", urgent=False)
        assert await reader == ["b", "c", "d"]
        reader = asyncio.ensure_future(box.take_all(3))
        box.put_nowait("e", urgent=False)
        await asyncio.sleep(0)
        box.put_nowait("f", urgent=True)  # e.g. a request finished: the reader must not wait for a third step
        assert await reader == ["e", "f"]
        box.put_nowait("g", urgent=True)
        assert await box.take_all(5) == ["g"]  # already there: no wait
        reader = asyncio.ensure_future(box.take_all(2))
        await asyncio.sleep(0)
        reader.cancel()
        box.put_nowait("h", urgent=True)  # no reader waits any more: kept for the next one
        return await box.take_all(4)

    assert run(scenario()) == ["h"]
