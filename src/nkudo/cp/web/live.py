"""The live views of the site, plan and execution pages: server-sent events over the change feed (issue 13).

Why each stream re-reads through the use cases with the page's principal: a ``Change`` is only a hint naming
ids; what a browser receives is rendered from the same use cases as the page, so a live update can never
show more than a reload would. Why debounced: a heartbeat round of 500 agents or a burst of log lines is
many changes; the stream waits ``DEBOUNCE`` seconds, drains what arrived meanwhile, and renders once.

Why the plan and execution streams end: once the plan (or the execution) is terminal nothing will change, so
the stream sends its last render, then ``done`` (the page's ``sse-close``), and returns; an EventSource that
reconnects anyway is answered 204, which tells the browser to stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import aiohttp_jinja2
from aiohttp import web

from nkudo.cp.domain import TERMINAL, TERMINAL_PLAN, Permission
from nkudo.cp.feed import Change, ChangeKind, Subscription
from nkudo.cp.web.context import Page, Route, page, path_uuid, session_check
from nkudo.cp.web.execution_pages import execution_of, execution_values
from nkudo.cp.web.plan_pages import plan_of, plan_values
from nkudo.cp.web.renders import RENDERS_KEY
from nkudo.cp.web.site_pages import site_of, site_values
from nkudo.cp.web.sse import SseEvent, sse_stream

#: Seconds to wait for more changes before rendering (at most two renders a second per open page).
DEBOUNCE = 0.5
#: Log lines read per render of the tail (a longer burst is sent over several renders).
TAIL_ROWS = 1000
TAIL_PAGES = 10
SITE_KINDS = frozenset({ChangeKind.AGENT, ChangeKind.VM, ChangeKind.SITE, ChangeKind.RESYNC})
DONE = SseEvent("done", "")


async def coalesce(sub: Subscription, first: Change, wanted: Callable[[Change], bool]) -> bool:
    """Whether ``first`` or any change arriving within ``DEBOUNCE`` is ``wanted`` (the burst is drained)."""
    hit = wanted(first)
    await asyncio.sleep(DEBOUNCE)
    while (change := sub.get_nowait()) is not None:
        hit = hit or wanted(change)
    return hit


def fragment(request: web.Request, pg: Page, template: str, values: Mapping[str, object], *, csrf: bool = True
             ) -> str:
    """A fragment rendered with what ``render`` gives a page (autoescaped, same template as the page's);
    ``csrf=False`` for one shared between viewers (an empty token: a form in it would be refused)."""
    return aiohttp_jinja2.render_string(template, request, {"request": request, "page": pg, "csrf_token":
                                                            pg.csrf_token if csrf else "", "Permission": Permission,
                                                            **values})


def _ending(check: Callable[[], Awaitable[bool]], ended: list[bool]) -> Callable[[], Awaitable[bool]]:
    """``still_allowed`` that also ends the stream after a live render that sent ``done`` (the browser has
    closed its side by then; this frees ours at the next keepalive instead of when the socket times out)."""
    async def allowed() -> bool:
        return not ended[0] and await check()

    return allowed


async def site_events(request: web.Request) -> web.StreamResponse:
    """The site's health, agents and VMs fragments after AGENT/VM/SITE changes of that site."""
    pg = await page(request)
    site_id = path_uuid(request, "site_id")
    await site_of(pg, site_id)  # 404 before subscribing
    sub = pg.cp.feed.subscribe(pg.tenant_id, site_id)
    shared = request.config_dict[RENDERS_KEY]
    # Browsers with the same site, filters and kind of viewer share one render per burst (web/renders.py);
    # the fragments carry no CSRF token and nothing else of the viewer.
    key = ("site", pg.tenant_id, site_id, pg.principal.kind, pg.principal.role, tuple(sorted(request.query.items())))

    async def make() -> list[tuple[str, str]]:
        values = await site_values(pg, site_id, request)
        return [(name, fragment(request, pg, f"_{name.replace('-', '_')}.html", values, csrf=False))
                for name in ("site-status", "site-agents", "site-vms")]

    async def render(change: Change) -> list[SseEvent]:
        since = asyncio.get_running_loop().time()
        if not await coalesce(sub, change, lambda c: c.kind in SITE_KINDS):
            return []
        return [SseEvent(name, html) for name, html in await shared.get(key, since, make)]

    return await sse_stream(request, sub, render, still_allowed=session_check(request, pg))


async def plan_events(request: web.Request) -> web.StreamResponse:
    """The plan fragment after changes of this plan, until it is terminal."""
    pg = await page(request)
    plan = await plan_of(pg, request)
    if plan.plan_status in TERMINAL_PLAN:
        return web.Response(status=204)
    sub = pg.cp.feed.subscribe(pg.tenant_id, plan.site_id)
    ended = [False]

    async def current() -> tuple[list[SseEvent], bool]:
        values = await plan_values(pg, await plan_of(pg, request))
        events = [SseEvent("plan", fragment(request, pg, "_plan_live.html", values))]
        return ([*events, DONE], True) if values["done"] else (events, False)

    async def render(change: Change) -> list[SseEvent]:
        if not await coalesce(sub, change, lambda c: c.kind is ChangeKind.RESYNC or c.plan_id == plan.plan_id):
            return []
        events, ended[0] = await current()
        return events

    # The first render covers whatever changed between the page's render and this stream's subscription.
    return await sse_stream(request, sub, render, initial=(await current())[0],
                            still_allowed=_ending(session_check(request, pg), ended))


async def execution_events(request: web.Request) -> web.StreamResponse:
    """The execution's status after its changes, and its log lines after ``after`` (or the last event id)."""
    pg = await page(request)
    ex = await execution_of(pg, path_uuid(request, "execution_id"))
    if ex.state in TERMINAL and request.headers.get("Last-Event-ID") is not None:
        return web.Response(status=204)  # a reconnect after the end: nothing more will come
    after = [max(_seq(request.query.get("after")), _seq(request.headers.get("Last-Event-ID")))]
    sub = pg.cp.feed.subscribe(pg.tenant_id, ex.site_id)
    ended = [False]

    async def current() -> tuple[list[SseEvent], bool]:
        now = await execution_of(pg, ex.id)
        events = [SseEvent("exec", fragment(request, pg, "_exec_status.html", execution_values(now)))]
        for _ in range(TAIL_PAGES):
            logs = await pg.cp.executions.execution_logs(pg.principal, ex.id, after[0], TAIL_ROWS)
            if logs.logs:
                after[0] = logs.logs[-1].seq
                events.append(SseEvent("log", fragment(request, pg, "_exec_lines.html", {"lines": logs.logs}),
                                       id=str(after[0])))
            if logs.next is None:
                break
        else:
            return events, False  # more than a burst: the rest follows with the next render
        return ([*events, DONE], True) if now.state in TERMINAL else (events, False)

    def mine(c: Change) -> bool:
        return c.kind is ChangeKind.RESYNC or c.object_id == ex.id or (
            c.kind is ChangeKind.PLAN and c.plan_id == ex.plan_id)

    async def render(change: Change) -> list[SseEvent]:
        if not await coalesce(sub, change, mine):
            return []
        events, ended[0] = await current()
        return events

    return await sse_stream(request, sub, render, initial=(await current())[0],
                            still_allowed=_ending(session_check(request, pg), ended))


def _seq(raw: str | None) -> int:
    """A log position from the query or ``Last-Event-ID`` (-1, "from the start", when absent or not one)."""
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        return -1
    return int(raw)


ROUTES: list[Route] = [
    ("GET", "/t/{tenant_id}/events/sites/{site_id}", site_events, "events_site"),
    ("GET", "/t/{tenant_id}/events/plans/{plan_id}", plan_events, "events_plan"),
    ("GET", "/t/{tenant_id}/events/executions/{execution_id}", execution_events, "events_execution"),
]
