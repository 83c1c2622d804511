"""The change feed: one in-process fan-out of "something changed" notices to every live view (issue 13).

Why a feed and not polling: with 200 browsers open, a per-client loop that re-reads the database every few
seconds costs 200 queries per period even when nothing happens. Instead the use cases that commit a change
call ``publish`` once, and each connected view (an SSE stream) receives a small ``Change`` naming what moved;
only then does it re-read what it shows. A quiet system costs nothing but the keepalive comments.

Why notices and not data: a ``Change`` carries ids, never rows, so it can be filtered by tenant and site here
and rendered by the subscriber with its own principal (the feed makes no visibility decision beyond the
tenant/site filter, and a notice about a row the subscriber cannot read reveals nothing it could not poll).

Why bounded queues: ``publish`` runs on the ingest path (heartbeats, results); it must never wait for a slow
browser nor let one grow memory. Each subscription holds at most ``maxsize`` pending changes; on overflow the
queue is cleared and replaced by ONE ``RESYNC`` notice (the subscriber re-renders everything), which is
always correct because a notice is only a hint to re-read. Identical pending changes are coalesced.

Pure asyncio, no I/O: the PostgreSQL bridge between replicas lives in ``nkudo.cp.feed_pg``.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

__all__ = ["DEFAULT_QUEUE", "Change", "ChangeFeed", "ChangeKind", "Subscription", "publish_all"]

DEFAULT_QUEUE = 256


class ChangeKind(enum.StrEnum):
    """What kind of object changed; ``RESYNC`` means "you missed some: re-render everything"."""

    AGENT = "agent"
    VM = "vm"
    PLAN = "plan"
    EXECUTION = "execution"
    LOG = "log"
    SITE = "site"
    AUDIT = "audit"
    RESYNC = "resync"


@dataclass(frozen=True, slots=True)
class Change:
    """One notice: the kind of object, its tenant (always: the filter key), and the ids a view needs."""

    kind: ChangeKind
    tenant_id: str
    site_id: str | None = None
    object_id: str | None = None
    plan_id: str | None = None


_RESYNC_TENANT = ""


class _Publisher(Protocol):
    def publish(self, change: Change) -> None: ...


def publish_all(feed: _Publisher, changes: Iterable[Change]) -> None:
    """Publish the changes a committed transaction collected, each distinct one once, in order.

    Why collected: a transaction function runs in a database thread and may be retried; it appends what it
    changed to a list (cleared at its start) and the use case publishes that list once ``run`` returned.
    """
    for change in dict.fromkeys(changes):
        feed.publish(change)


class Subscription:
    """The changes one subscriber may see, in order, through a bounded queue.

    An async iterator of ``Change`` and an async context manager: leaving the ``async with`` block (or
    calling ``close``) unsubscribes, so a disconnected browser leaves nothing behind in the feed.
    """

    __slots__ = (
        "_closed",
        "_feed",
        "_items",
        "_pending",
        "_resync",
        "_waiter",
        "maxsize",
        "overflows",
        "site_id",
        "tenant_id",
    )

    def __init__(self, feed: ChangeFeed, tenant_id: str | None, site_id: str | None, maxsize: int) -> None:
        self.tenant_id = tenant_id
        self.site_id = site_id
        self.maxsize = maxsize
        self.overflows = 0
        self._feed = feed
        self._items: deque[Change] = deque()
        self._pending: set[Change] = set()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._resync = False  # a RESYNC is queued: nothing else needs queueing until it is read

    def wants(self, change: Change) -> bool:
        """The tenant/site filter: ``None`` tenant sees every tenant (admins); a site filter passes
        tenant-wide changes (no site) and changes of that site only."""
        if change.kind is ChangeKind.RESYNC:
            return True
        if self.tenant_id is not None and change.tenant_id != self.tenant_id:
            return False
        return self.site_id is None or change.site_id is None or change.site_id == self.site_id

    def _offer(self, change: Change) -> None:
        """Enqueue without awaiting (called by ``ChangeFeed.publish``)."""
        if self._closed or change in self._pending or self._resync:
            return  # coalesced: an identical notice, or a RESYNC that covers everything, is already waiting
        if change.kind is ChangeKind.RESYNC:
            self._resync = True
        if len(self._items) >= self.maxsize:
            self.overflows += 1
            resync = Change(ChangeKind.RESYNC, self.tenant_id or _RESYNC_TENANT)
            self._items.clear()
            self._items.append(resync)
            self._pending = {resync}
            self._resync = True
        else:
            self._items.append(change)
            self._pending.add(change)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pending(self) -> int:
        return len(self._items)

    def get_nowait(self) -> Change | None:
        """The next change, or None when none is waiting."""
        if not self._items:
            return None
        change = self._items.popleft()
        self._pending.discard(change)
        if change.kind is ChangeKind.RESYNC:
            self._resync = False
        return change

    async def get(self) -> Change:
        """Wait for the next change; raises ``StopAsyncIteration`` once the subscription is closed."""
        while True:
            change = self.get_nowait()
            if change is not None:
                return change
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """Unsubscribe (idempotent); a waiting ``get`` ends with ``StopAsyncIteration``."""
        if not self._closed:
            self._closed = True
            self._feed._remove(self)
            self._wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Change:
        return await self.get()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()


class ChangeFeed:
    """The process's one fan-out point; ``publish`` is synchronous and O(subscribers).

    ``origin`` identifies this process to the PostgreSQL bridge (a replica ignores its own NOTIFYs, which it
    already delivered locally). ``forward`` is set by that bridge: called with each locally published change
    so it can NOTIFY the other replicas; it must not block either.
    """

    def __init__(self, *, maxsize: int = DEFAULT_QUEUE) -> None:
        self.maxsize = maxsize
        self.origin = uuid.uuid4().hex
        self.forward: Callable[[Change], None] | None = None
        self._subs: set[Subscription] = set()
        self._closed = False
        self.published = 0

    def subscribe(self, tenant_id: str | None, site_id: str | None = None) -> Subscription:
        """A new subscription to one tenant's changes (``None``: every tenant, for admins), optionally
        narrowed to one site."""
        sub = Subscription(self, tenant_id, site_id, self.maxsize)
        if self._closed:
            sub.close()  # shutting down: the stream ends at once
        else:
            self._subs.add(sub)
        return sub

    def publish(self, change: Change) -> None:
        """Deliver ``change`` to every subscriber that may see it; call only after the change committed."""
        self.deliver(change)
        if self.forward is not None:
            self.forward(change)

    def deliver(self, change: Change) -> None:
        """Local delivery only (the bridge calls this for changes that came from another replica)."""
        self.published += 1
        for sub in tuple(self._subs):
            if sub.wants(change):
                sub._offer(change)

    def close(self) -> None:
        """End every subscription (server shutdown: each open stream then finishes instead of holding the
        shutdown for its timeout); later subscriptions start closed."""
        self._closed = True
        for sub in tuple(self._subs):
            sub.close()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def _remove(self, sub: Subscription) -> None:
        self._subs.discard(sub)
