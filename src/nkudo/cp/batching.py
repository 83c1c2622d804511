"""Coalesce concurrent point reads into one batched read.

Why: each heartbeat must be authorised from *current* database state (known
agent, current certificate serial, not unenrolled), and its "does this change
anything?" check needs the agent's stored digests. Done one by one, that read
cost more server CPU than everything else in a heartbeat: a thread hop, a pool
checkout (a ping on PostgreSQL), BEGIN, SELECT and ROLLBACK through SQLAlchemy,
per request. Requests that arrive while a batch is being read are collected
and answered by the *next* single query, so the per-request cost is a future
on the event loop and the per-batch cost is amortised over every request in
the batch.

No caching is involved: every request is answered by a read that started
after the request arrived, so a revocation or unenroll committed by any
replica is seen by the next heartbeat exactly as with one read per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    """``await c.get(key)``: the value for ``key`` from a batched ``fetch(keys)``, or ``None`` if it has none.

    One batch is in flight at a time; while it runs, new keys queue up and form
    the next batch (at most ``max_batch`` keys per fetch). Under light load a
    batch is a single key, so latency is that of a plain read; under heavy load
    batches grow and the cost per key falls. An exception from ``fetch`` fails
    exactly the requests of that batch.
    """

    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], *, max_batch: int = 256) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._waiting: dict[K, list[asyncio.Future[V | None]]] = {}
        self._drainer: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V | None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[V | None] = loop.create_future()
        self._waiting.setdefault(key, []).append(fut)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        batch: dict[K, list[asyncio.Future[V | None]]] = {}
        try:
            while self._waiting:
                batch = self._take_batch()
                try:
                    found = await self._fetch(list(batch))
                except Exception as exc:
                    for futs in batch.values():
                        for f in futs:
                            if not f.done():
                                f.set_exception(exc)
                    continue
                for key, futs in batch.items():
                    value = found.get(key)
                    for f in futs:
                        if not f.done():  # the awaiting request may have been cancelled (client went away)
                            f.set_result(value)
                batch = {}
        finally:
            self._drainer = None
            # Only on cancellation (shutdown): nobody will answer these any more.
            for futs in (*batch.values(), *self._waiting.values()):
                for f in futs:
                    f.cancel()
            self._waiting = {}

    def _take_batch(self) -> dict[K, list[asyncio.Future[V | None]]]:
        if len(self._waiting) <= self._max_batch:
            batch, self._waiting = self._waiting, {}
            return batch
        batch = {}
        for key in list(self._waiting)[: self._max_batch]:
            batch[key] = self._waiting.pop(key)
        return batch
