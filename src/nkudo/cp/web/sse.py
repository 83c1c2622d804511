"""Server-sent events over the change feed: one stream per open live view (issue 13).

Why SSE: the browser only listens (htmx's SSE extension swaps each event's HTML fragment into the page), so
a one-way text stream is enough; it passes proxies as an ordinary HTTP response and reconnects on its own.

Why the stream re-asks ``still_allowed``: a session can be revoked or a membership removed while a browser
keeps its stream open for hours; the permission decided when the stream opened must not outlive that. It
is asked before every send and at least every ``recheck`` seconds while idle.

Why the encoder strips CR and NUL and splits lines: SSE frames are line-based; a CR or a blank line inside
``data`` would end the event early and let fragment text inject a forged event; NUL is refused by browsers.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from nkudo.cp.feed import Change, Subscription
from nkudo.errors import ValidationError

__all__ = ["EVENT_NAME", "KEEPALIVE", "SseEvent", "encode_event", "sse_stream"]

#: An event name (the ``sse-swap`` attribute of the page listens for it).
EVENT_NAME = re.compile(r"[a-z0-9_-]{1,64}\Z")
_EVENT_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")
KEEPALIVE = b": keepalive\n\n"
#: Longest time a stream goes without re-checking the session (the contract's bound).
RECHECK = 30.0


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One event: its name, an HTML fragment (newlines allowed) and an optional id."""

    event: str
    data: str
    id: str | None = None

    def __post_init__(self) -> None:
        if not EVENT_NAME.match(self.event):
            raise ValidationError("event must be 1-64 characters of a-z, 0-9, '_' or '-'",
                                  code="INVALID_SSE_EVENT", field="event")
        if self.id is not None and not _EVENT_ID.match(self.id):
            raise ValidationError("id must be 1-128 characters of letters, digits, '_', '.', ':' or '-'",
                                  code="INVALID_SSE_EVENT", field="id")


def encode_event(ev: SseEvent) -> bytes:
    """The wire form: ``event:``, optional ``id:``, one ``data:`` line per line of data, a blank line."""
    data = ev.data.replace("\0", "").replace("\r\n", "\n").replace("\r", "\n")
    lines = [f"event: {ev.event}"]
    if ev.id is not None:
        lines.append(f"id: {ev.id}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def _gone(request: web.Request) -> bool:
    t = request.transport
    return t is None or t.is_closing()


async def sse_stream(request: web.Request, sub: Subscription,
                     render: Callable[[Change], Awaitable[list[SseEvent]]], *, keepalive: float = 15.0,
                     still_allowed: Callable[[], Awaitable[bool]], recheck: float = RECHECK,
                     initial: list[SseEvent] | None = None) -> web.StreamResponse:
    """Stream the rendered changes of ``sub`` until the client leaves or ``still_allowed`` says no.

    ``sub`` is closed (unsubscribed) however the stream ends. ``initial`` events, if any, are sent first
    (e.g. a fresh render after a reconnect). A client that left is noticed at the next wake-up (a change or
    the keepalive, at most ``keepalive`` seconds later) and the handler then returns normally.
    """
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                       "X-Accel-Buffering": "no"})
    loop = asyncio.get_running_loop()
    recheck = min(recheck, RECHECK)
    async with sub:
        try:
            await resp.prepare(request)
            allowed = await still_allowed()
            if initial and allowed:
                await resp.write(b"".join(encode_event(e) for e in initial))
            checked = loop.time()
            while allowed and not _gone(request):
                wait = max(0.0, min(keepalive, checked + recheck - loop.time()))
                change: Change | None = None
                try:
                    async with asyncio.timeout(wait):
                        change = await sub.get()
                except TimeoutError:
                    pass
                except StopAsyncIteration:
                    break  # the feed closed (server shutdown)
                if _gone(request) or not await still_allowed():
                    break
                checked = loop.time()
                events = await render(change) if change is not None else []
                if events:
                    await resp.write(b"".join(encode_event(e) for e in events))
                elif change is None:
                    await resp.write(KEEPALIVE)
        except ConnectionResetError:
            return resp  # the client left while we wrote
    if not _gone(request):
        try:
            await resp.write_eof()
        except ConnectionResetError:
            pass
    return resp
