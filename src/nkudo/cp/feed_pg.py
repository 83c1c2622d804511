"""The change feed across replicas: PostgreSQL ``NOTIFY``/``LISTEN`` (issue 13).

Why: behind a load balancer, the browser's stream may be held by replica A while the agent's result lands
on replica B. Each process keeps its own in-process ``ChangeFeed``; this bridge forwards every locally
published change to channel ``nkudo_changes`` (after the change committed: ``publish`` is only called then)
and republishes the changes other replicas sent. A compact JSON payload carries the sender's ``origin`` so a
process ignores its own notices, which it already delivered locally.

Why two connections: psycopg serialises commands on one connection, and the listener spends its life
waiting in ``notifies()``; the sender has its own autocommit connection. Both reconnect with exponential
backoff. After the listener reconnects it delivers one ``RESYNC`` to every local subscriber, since notices
sent while it was away are lost (NOTIFY is not queued for absent listeners).

Why a bounded outbox: a database outage must not grow memory on the ingest path; past ``MAX_BACKLOG``
pending changes the outbox collapses into a single ``RESYNC`` for the other replicas.

SQLite deployments are one process: no bridge is started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Annotated

import msgspec
import psycopg

from nkudo.cp.feed import Change, ChangeFeed, ChangeKind
from nkudo.log import get_logger

__all__ = ["CHANNEL", "LISTENER_NAME", "MAX_BACKLOG", "MAX_PAYLOAD", "PgBridge", "decode_payload", "encode_payloads", "libpq_url"]

log = get_logger("cp.feed")
CHANNEL = "nkudo_changes"
#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
MAX_PAYLOAD = 7900
MAX_BACKLOG = 4096
#: ``application_name`` of the LISTEN connections (visible in ``pg_stat_activity``).
LISTENER_NAME = "nkudo-feed-listen"
_Id = Annotated[str, msgspec.Meta(max_length=128)]


class _Wire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One notice on the channel: the sending process and its changes (kind, tenant, site, object, plan)."""

    o: _Id
    c: list[tuple[ChangeKind, _Id, _Id | None, _Id | None, _Id | None]]


_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder(_Wire)


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as libpq understands it (the ``+psycopg`` driver suffix removed)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def encode_payloads(origin: str, changes: list[Change]) -> list[str]:
    """As few payloads as fit under ``MAX_PAYLOAD`` bytes each, changes in order."""
    out: list[str] = []
    batch: list[tuple[str, str, str | None, str | None, str | None]] = []
    size = len(origin) + 16
    for ch in changes:
        item = (ch.kind.value, ch.tenant_id, ch.site_id, ch.object_id, ch.plan_id)
        n = len(_ENC.encode(item)) + 1
        if batch and size + n > MAX_PAYLOAD:
            out.append(_ENC.encode({"o": origin, "c": batch}).decode())
            batch, size = [], len(origin) + 16
        batch.append(item)
        size += n
    if batch:
        out.append(_ENC.encode({"o": origin, "c": batch}).decode())
    return out


def decode_payload(payload: str) -> tuple[str, list[Change]] | None:
    """The origin and changes of a notice; None (and a warning) for anything that is not one."""
    try:
        w = _DEC.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("ignored a malformed change notice", error=str(exc))
        return None
    return w.o, [Change(k, t, s, o, p) for k, t, s, o, p in w.c]


class PgBridge:
    """Forward local changes to ``CHANNEL`` and republish the other replicas' changes locally."""

    def __init__(self, feed: ChangeFeed, url: str, *, backoff: tuple[float, float] = (0.2, 10.0)) -> None:
        self.feed = feed
        self.url = libpq_url(url)
        self.backoff = backoff
        self.listening = asyncio.Event()  # set while LISTEN is active (tests wait for it)
        self.received = 0
        self._out: deque[Change] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.feed.forward = self._forward
        self._tasks = [asyncio.create_task(self._listen(), name="nkudo-feed-listen"),
                       asyncio.create_task(self._send(), name="nkudo-feed-notify")]

    async def stop(self) -> None:
        if self.feed.forward == self._forward:
            self.feed.forward = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _forward(self, change: Change) -> None:
        """Called by ``ChangeFeed.publish``: enqueue only (never blocks)."""
        if change.kind is ChangeKind.RESYNC:
            return  # a local subscriber's overflow marker is not news for other replicas
        if len(self._out) >= MAX_BACKLOG:
            self._out.clear()
            change = Change(ChangeKind.RESYNC, "")
        self._out.append(change)
        self._wake.set()

    def _receive(self, payload: str) -> None:
        got = decode_payload(payload)
        if got is None or got[0] == self.feed.origin:
            return
        for change in got[1]:
            self.received += 1
            self.feed.deliver(change)

    async def _listen(self) -> None:
        delay, first = self.backoff[0], True
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True,
                                                                 application_name=LISTENER_NAME) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if not first:
                        self.feed.deliver(Change(ChangeKind.RESYNC, ""))  # notices were lost while away
                    first, delay = False, self.backoff[0]
                    self.listening.set()
                    while True:
                        async for n in conn.notifies(timeout=30.0):
                            self._receive(n.payload)
                        await conn.execute("SELECT 1")  # idle: prove the connection is still alive
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                log.warning("change feed listener lost its connection; reconnecting", error=type(exc).__name__,
                            retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _send(self) -> None:
        conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        delay = self.backoff[0]
        try:
            while True:
                if not self._out:
                    self._wake.clear()
                    await self._wake.wait()
                batch = list(self._out)
                self._out.clear()
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                    for payload in encode_payloads(self.feed.origin, batch):
                        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                    delay = self.backoff[0]
                except Exception as exc:
                    self._out.extendleft(reversed(batch[-MAX_BACKLOG:]))  # retried after the backoff
                    log.warning("change feed notify failed; retrying", error=type(exc).__name__, retry_in=delay)
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    conn = None
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff[1])
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
