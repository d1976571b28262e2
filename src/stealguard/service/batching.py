"""A micro-batcher: rows from concurrent requests go through the model as one batch.

    batcher = MicroBatcher(lambda x: defense(x, served.predict_proba(x)), max_batch=512,
                           max_wait_s=0.002)
    probs = await batcher(x)          # from the event loop: (B, C, H, W) -> (B, K)
    probs = batcher.submit(x).result()  # from a thread

One worker thread owns the model. It takes the oldest waiting request, then every request
already queued, then waits at most `max_wait_s` for more while the batch has fewer than
`max_batch` rows; it runs the model once on the concatenation and hands each request its
rows. The event loop only enqueues and awaits a future, so it never blocks on the model.
Under load the queue fills while the model runs, so batches grow by themselves; alone, a
request waits at most `max_wait_s` before it runs.

A request larger than `max_batch` runs by itself (the function splits it if it must).
If the function raises, every request of that batch gets the exception.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from stealguard.errors import ConfigError


@dataclass
class _Item:
    x: torch.Tensor  # (b, C, H, W)
    future: Future[torch.Tensor] = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    max_rows: int = 0

    @property
    def mean_rows(self) -> float:
        return self.rows / self.batches if self.batches else 0.0


class MicroBatcher:
    """Gather concurrent (b_i, C, H, W) requests into one (sum b_i, C, H, W) call of `fn`."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int = 512,
                 max_wait_s: float = 0.002, name: str = "stealguard-batcher",
                 on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ConfigError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.fn, self.max_batch, self.max_wait_s = fn, max_batch, max_wait_s
        self.on_batch = on_batch  # called with the rows of each model call (metrics)
        self.stats = BatchStats()
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._carry: _Item | None = None  # taken from the queue but did not fit the last batch
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, x: torch.Tensor) -> Future[torch.Tensor]:
        """Queue (b, C, H, W) rows; the future resolves to their (b, K) outputs."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        item = _Item(x)
        self._queue.put(item)
        return item.future

    async def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return await asyncio.wrap_future(self.submit(x))

    def close(self, timeout: float | None = 10.0) -> None:
        """Answer what is queued, then stop the worker."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            items = self._gather()
            if items is None:
                return
            self._run(items)

    def _gather(self) -> list[_Item] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        items, rows = [first], first.x.shape[0]
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_batch:
            try:  # everything already queued first, then wait until the deadline
                nxt = self._queue.get_nowait()
            except queue.Empty:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=wait)
                except queue.Empty:
                    break
            if nxt is None:  # closing: answer this batch, stop at the next _gather
                self._queue.put(None)
                break
            if rows + nxt.x.shape[0] > self.max_batch:
                self._carry = nxt  # the first of the next batch
                break
            items.append(nxt)
            rows += nxt.x.shape[0]
        return items

    def _run(self, items: list[_Item]) -> None:
        live = [it for it in items if it.future.set_running_or_notify_cancel()]
        if not live:
            return
        x = live[0].x if len(live) == 1 else torch.cat([it.x for it in live])  # (R, C, H, W)
        try:
            out = self.fn(x)  # (R, K)
        except BaseException as e:  # every waiting request must hear of it
            for it in live:
                it.future.set_exception(e)
            return
        self.stats.batches += 1
        self.stats.rows += x.shape[0]
        self.stats.max_rows = max(self.stats.max_rows, x.shape[0])
        if self.on_batch is not None:
            self.on_batch(int(x.shape[0]))
        start = 0
        for it in live:
            b = it.x.shape[0]
            it.future.set_result(out[start:start + b])
            start += b
