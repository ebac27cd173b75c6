"""The micro-batcher (app/batching.py) on its own: failures stay with their query, the worker restarts,
the queue is bounded and requests take turns, a cancelled query never runs."""

from __future__ import annotations

import asyncio

import pytest

from app.batching import MicroBatcher, QueueFull

pytestmark = pytest.mark.anyio


async def test_a_failing_query_fails_alone():
    def run(payloads):
        if "bad" in payloads:
            raise ValueError("bad query")
        return [p.upper() for p in payloads]

    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.05)
    batcher.start()
    try:
        results = await asyncio.gather(
            *(batcher.submit(p) for p in ("a", "bad", "c")), return_exceptions=True
        )
    finally:
        await batcher.stop()
    assert results[0] == "A" and results[2] == "C" and isinstance(results[1], ValueError)


async def test_a_killed_worker_restarts():
    batcher = MicroBatcher(lambda ps: list(ps), max_batch=4, max_wait_s=0)
    batcher.start()
    try:
        assert await batcher.submit(1) == 1
        batcher.task.cancel()  # the worker dies
        await asyncio.sleep(0)
        assert not batcher.alive
        assert await asyncio.wait_for(batcher.submit(2), 5) == 2  # served by the restarted worker
        assert batcher.alive and batcher.restarts == 1
    finally:
        await batcher.stop()


async def test_queue_is_bounded_and_requests_take_turns():
    batches = []

    def run(payloads):
        batches.append(list(payloads))
        return payloads

    batcher = MicroBatcher(run, max_batch=2, max_wait_s=0, max_queued=6, max_cost=2000)
    batcher.start()
    try:
        heavy, light = batcher.new_owner(), batcher.new_owner()
        work = [asyncio.ensure_future(batcher.submit(f"h{i}", heavy, cost=1000)) for i in range(5)]
        work.append(asyncio.ensure_future(batcher.submit("l0", light, cost=10)))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit("one too many")
        await asyncio.gather(*work)
    finally:
        await batcher.stop()
    first_with_light = next(i for i, b in enumerate(batches) if "l0" in b)
    assert first_with_light <= 1  # not behind the heavy request's five queries
    assert all(sum(1000 if p.startswith("h") else 10 for p in b) <= 2010 for b in batches)


async def test_a_cancelled_query_is_dropped_before_it_runs():
    ran = []
    batcher = MicroBatcher(lambda ps: [ran.append(p) or p for p in ps], max_batch=1, max_wait_s=0)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit("first"))
        gone = asyncio.ensure_future(batcher.submit("gone"))
        await asyncio.sleep(0)
        gone.cancel()
        assert await first == "first"
        assert await batcher.submit("after") == "after"
    finally:
        await batcher.stop()
    assert "gone" not in ran
