"""One render shared by every open page that shows the same thing (issue 13: live views cost per change, not
per browser).

Why: every browser on a tenant's overview holds its own event stream, and each change burst makes each stream
re-render the same fragment from the same use case. Fifty open overviews meant fifty identical renders per
burst, which cost the heartbeat ingest beside them a fifth to a half of its rate in the benchmark with 50
dashboard clients. A render is shared when it *started after* the change the asking stream is answering
(so it cannot show a state older than that change) and is for the same key (tenant and what the viewer may
see); otherwise a new one starts. Pure asyncio: no I/O of its own (aiohttp only names the app key).

A shared fragment must carry nothing of one viewer: no CSRF token, no email; the live fragments render
from the page's data only (the keys name the role where a fragment offers an action).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")

#: Entries older than this are dropped when the next render starts (a key nobody watches any more).
KEEP_SECONDS = 60.0


class SharedRenders:
    """Per key, the newest render (started at, its result)."""

    def __init__(self, on_render: Callable[[Hashable], None] | None = None) -> None:
        self._latest: dict[Hashable, tuple[float, asyncio.Future[Any]]] = {}
        self.renders = 0  # how many renders really ran
        self._on_render = on_render  # told of each render that runs (the metric of renders per view)

    async def get(self, key: Hashable, since: float, make: Callable[[], Awaitable[T]]) -> T:
        """The result (HTML) for ``key`` from a render that started at or after ``since`` (loop time), reusing the newest
        one when it qualifies, else running ``make``. A failed render is not reused."""
        loop = asyncio.get_running_loop()
        entry = self._latest.get(key)
        if entry is not None and entry[0] >= since and not (entry[1].done() and entry[1].exception()):
            reused: T = await asyncio.shield(entry[1])
            return reused
        now = loop.time()
        fut: asyncio.Future[T] = asyncio.ensure_future(make())
        self.renders += 1
        if self._on_render is not None:
            self._on_render(key)
        self._latest = {k: e for k, e in self._latest.items() if now - e[0] < KEEP_SECONDS}
        self._latest[key] = (now, fut)
        return await asyncio.shield(fut)


#: The UI application's shared renders (one per application: a replica shares among its own browsers).
RENDERS_KEY = web.AppKey("nkudo.ui.renders", SharedRenders)
