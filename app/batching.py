"""Micro-batching: concurrent /localize calls share one model forward.

One worker owns the model. It takes the first waiting query, then whatever else queued meanwhile (up to
`max_batch`), optionally waiting `max_wait` for more. With the default wait of 0 a lone request is never
delayed; under load, queries that arrive during a forward form the next batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchItem:
    payload: Any
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], Sequence[Any]],
        max_batch: int,
        max_wait_s: float,
        on_batch: Callable[[int], None] = lambda size: None,
    ) -> None:
        self.run_batch, self.max_batch, self.max_wait_s, self.on_batch = (
            run_batch,
            max_batch,
            max_wait_s,
            on_batch,
        )
        self.queue: asyncio.Queue[BatchItem] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the service is shutting down"))
        self.executor.shutdown(wait=True)

    async def submit(self, payload: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(BatchItem(payload, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            live = [item for item in batch if not item.future.cancelled()]
            if not live:
                continue
            self.on_batch(len(live))
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [i.payload for i in live])
            except Exception as exc:  # one failure answers the whole batch; the loop goes on
                for item in live:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(live, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
