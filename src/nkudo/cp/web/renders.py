"""One render shared by every open page that shows the same thing (issue 13: live views cost per change, not
per browser).

Why: every browser on a tenant's overview holds its own event stream, and each change burst makes each stream
re-render the same fragment from the same use case. Fifty open overviews meant fifty identical renders per
burst, which cost the heartbeat ingest beside them a fifth to a half of its rate in the benchmark with 50
dashboard clients. A render is shared when it *started after* the change the asking stream is answering
(so it cannot show a state older than that change) and is for the same key (tenant and what the viewer may
see); otherwise a new one starts. Pure asyncio: no I/O of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable

#: Entries older than this are dropped when the next render starts (a key nobody watches any more).
KEEP_SECONDS = 60.0


class SharedRenders:
    """Per key, the newest render (started at, its result)."""

    def __init__(self) -> None:
        self._latest: dict[Hashable, tuple[float, asyncio.Future[str]]] = {}
        self.renders = 0  # how many renders really ran (tests and benchmarks read it)

    async def get(self, key: Hashable, since: float, make: Callable[[], Awaitable[str]]) -> str:
        """The HTML for ``key`` from a render that started at or after ``since`` (loop time), reusing the newest
        one when it qualifies, else running ``make``. A failed render is not reused."""
        loop = asyncio.get_running_loop()
        entry = self._latest.get(key)
        if entry is not None and entry[0] >= since and not (entry[1].done() and entry[1].exception()):
            return await asyncio.shield(entry[1])
        now = loop.time()
        fut: asyncio.Future[str] = asyncio.ensure_future(make())
        self.renders += 1
        self._latest = {k: e for k, e in self._latest.items() if now - e[0] < KEEP_SECONDS}
        self._latest[key] = (now, fut)
        return await asyncio.shield(fut)
