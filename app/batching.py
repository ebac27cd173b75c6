"""Micro-batching with fairness and bounds: concurrent /localize queries share one model forward.

One worker thread per batcher runs its batches (the service has two batchers, an ordinary and a heavy
lane: app/service.py). Each request's queries wait in their own queue; a batch takes at most one
query per request per pass, cheapest first (cost: the candidates to re-rank), up to `max_batch` queries
and `max_cost`, so a request of 16 expensive queries is served a query at a time and an ordinary query
waits for about one batch, not behind all of them (the cost is aged by waiting: see `_take`).
With the default wait of 0 a lone request is never delayed.

Bounds: at most `max_queued` queries wait (beyond, `QueueFull`: the caller answers 503 with
Retry-After); a cancelled query (deadline passed, client gone) is dropped before it runs. A query that
fails in a batch is retried alone, so only it fails. The worker is restarted if it ever dies; `alive`
says whether it runs (readiness reports it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More queries are waiting than the service accepts."""


@dataclass
class BatchItem:
    payload: Any
    cost: int
    future: asyncio.Future = field(repr=False)
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], Sequence[Any]],
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] = lambda size: None,
        max_queued: int = 1_000_000,
        max_cost: int | None = None,
        aging_s: float = 5.0,
    ) -> None:
        self.run_batch, self.max_batch, self.max_wait_s, self.on_batch = (
            run_batch,
            max_batch,
            max_wait_s,
            on_batch,
        )
        self.max_queued, self.max_cost, self.aging_s = max_queued, max_cost, aging_s
        self.waiting: OrderedDict[int, deque[BatchItem]] = OrderedDict()  # owner -> its queries
        self.queued = 0
        self.arrived: asyncio.Event | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None
        self.restarts = 0
        self._stopping = False
        self._owners = itertools.count()

    # --- life cycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self.arrived = self.arrived or asyncio.Event()
        self.task = asyncio.create_task(self._loop(), name="micro-batcher")
        self.task.add_done_callback(self._on_worker_exit)

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    def _on_worker_exit(self, task: asyncio.Task) -> None:
        if self._stopping:
            return
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        self.restarts += 1
        log.error("the batching worker died (%s); restarting it (restart %d)", reason, self.restarts)
        asyncio.get_running_loop().call_later(0.05, self._restart)

    def _restart(self) -> None:
        if not self._stopping and not self.alive:
            self.start()

    async def stop(self) -> None:
        self._stopping = True
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for queue in self.waiting.values():
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(RuntimeError("the service is shutting down"))
        self.waiting.clear()
        self.executor.shutdown(wait=True)

    # --- submitting ----------------------------------------------------------------------------------

    def new_owner(self) -> int:
        """An id for one request: its queries are taken in turn with other requests' queries."""
        return next(self._owners)

    async def submit(self, payload: Any, owner: int | None = None, cost: int = 1) -> Any:
        """The result for one query; QueueFull at once when too many wait. Cancelling drops the query."""
        if self.queued >= self.max_queued:
            raise QueueFull(f"{self.queued} queries are waiting")
        future = asyncio.get_running_loop().create_future()
        key = self.new_owner() if owner is None else owner
        self.waiting.setdefault(key, deque()).append(BatchItem(payload, cost, future))
        self.queued += 1
        assert self.arrived is not None, "start() the batcher first"
        self.arrived.set()
        return await future

    # --- the worker ----------------------------------------------------------------------------------

    def _take(self, batch: list[BatchItem]) -> bool:
        """Move queries into `batch`, at most one per request per pass; False when none was added.

        Cheapest first, by cost aged by waiting: cost / (1 + waited / aging_s). An ordinary query is not
        kept behind expensive ones, even when those have waited long (at 10x the cost, 45 s with the
        default 5 s); expensive work runs whenever no cheaper work waits."""
        now = time.monotonic()
        heads = []
        for owner, queue in list(self.waiting.items()):
            while queue and queue[0].future.done():  # cancelled: deadline passed or client gone
                queue.popleft()
                self.queued -= 1
            if not queue:
                del self.waiting[owner]
                continue
            head = queue[0]
            aged = head.cost / (1 + (now - head.enqueued) / self.aging_s)
            heads.append(((aged, head.enqueued), owner))
        added, cost = False, sum(item.cost for item in batch)
        for _, owner in sorted(heads):
            if len(batch) >= self.max_batch:
                break
            queue = self.waiting[owner]
            if batch and self.max_cost is not None and cost + queue[0].cost > self.max_cost:
                continue  # a cheaper query may still fit
            item = queue.popleft()
            self.queued -= 1
            batch.append(item)
            cost, added = cost + item.cost, True
            if not queue:
                del self.waiting[owner]
        return added

    async def _next_batch(self) -> list[BatchItem]:
        loop = asyncio.get_running_loop()
        assert self.arrived is not None
        batch: list[BatchItem] = []
        while not batch:
            self.arrived.clear()
            while self._take(batch):
                pass
            if not batch:
                await self.arrived.wait()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch and (remaining := deadline - loop.time()) > 0:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                break
            while self._take(batch):
                pass
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            live = [item for item in await self._next_batch() if not item.future.done()]
            if not live:
                continue
            self.on_batch(len(live))
            payloads = [item.payload for item in live]
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, payloads)
            except Exception as exc:
                if len(live) == 1:
                    _answer(live[0], exception=exc)
                    continue
                # Which query failed? Each alone: only the failing one fails.
                for item in live:
                    if item.future.done():
                        continue
                    try:
                        (result,) = await loop.run_in_executor(self.executor, self.run_batch, [item.payload])
                    except Exception as single:
                        _answer(item, exception=single)
                    else:
                        _answer(item, result=result)
                continue
            for item, result in zip(live, results, strict=True):
                _answer(item, result=result)


def _answer(item: BatchItem, result: Any = None, exception: BaseException | None = None) -> None:
    if item.future.done():
        return
    if exception is not None:
        item.future.set_exception(exception)
    else:
        item.future.set_result(result)
