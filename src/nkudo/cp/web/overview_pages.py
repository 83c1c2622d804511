"""The dashboard's entry: ``/ui/`` (where to go), the tenant list, and a tenant's overview with its live view.

Why the live overview re-renders the whole fragment instead of patching counters: the overview is a handful
of aggregate statements (``cp.overview.tenant_overview``), cheap enough to re-run per burst of changes, and
a full fragment can never drift from what a reload would show. Bursts (a heartbeat round of 500 agents) are
coalesced: at most one render per ``DEBOUNCE`` seconds per open page, whatever the number of changes, and
open pages that show the same thing share it (``renders.SharedRenders``): one render per burst per tenant
and kind of viewer, whatever the number of browsers.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from nkudo.cp.domain import Permission
from nkudo.cp.feed import Change, ChangeKind
from nkudo.cp.web.context import Page, Route, page, render, see_other, session, session_check
from nkudo.cp.web.renders import RENDERS_KEY
from nkudo.cp.web.sse import SseEvent, sse_stream

#: Changes that can move a number on the overview (RESYNC: the subscriber missed some, re-render anyway).
LIVE_KINDS = frozenset({ChangeKind.AGENT, ChangeKind.SITE, ChangeKind.VM, ChangeKind.PLAN, ChangeKind.RESYNC})
#: Seconds to wait for more changes before re-rendering (at most two renders a second per open page).
DEBOUNCE = 0.5


async def root(request: web.Request) -> web.StreamResponse:
    """Members go to their (first) tenant; admins and members of several tenants choose from the list."""
    ctx = await session(request)
    if not ctx.is_admin and len(ctx.tenants) == 1:
        return see_other(f"/ui/t/{ctx.tenants[0].tenant_id}/")
    return see_other("/ui/tenants")


async def tenants(request: web.Request) -> web.StreamResponse:
    ctx = await session(request)
    return render(request, "tenants.html", None, account=ctx, csrf_token=ctx.csrf_token,
                  tenants=sorted(ctx.tenants, key=lambda m: (m.tenant_name.lower(), m.tenant_id)))


async def _values(pg: Page) -> dict[str, Any]:
    return {"ov": await pg.cp.overview.tenant_overview(pg.principal, pg.tenant_id, pg.cp.clock.now())}


async def overview(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    return render(request, "overview.html", pg, **await _values(pg))


async def overview_events(request: web.Request) -> web.StreamResponse:
    """SSE: the overview fragment, re-rendered after AGENT/SITE/VM/PLAN changes of this tenant (debounced)."""
    pg = await page(request)
    sub = pg.cp.feed.subscribe(pg.tenant_id)

    shared = request.config_dict[RENDERS_KEY]
    # Who sees the same fragment: the tenant, and what the viewer may do (the fragment offers "enroll a host").
    key = ("overview", pg.tenant_id, pg.principal.kind, pg.principal.role, pg.can(Permission.ENROLL))

    async def make() -> str:
        return aiohttp_jinja2.render_string("overview_live.html", request,
                                            {"request": request, "page": pg, **await _values(pg)})

    async def fragment(change: Change) -> list[SseEvent]:
        if change.kind not in LIVE_KINDS:
            return []
        since = asyncio.get_running_loop().time()  # the change has committed: any render from now on shows it
        await asyncio.sleep(DEBOUNCE)
        while sub.get_nowait() is not None:  # coalesce the burst: one render covers them all
            pass
        return [SseEvent("overview", await shared.get(key, since, make))]

    return await sse_stream(request, sub, fragment, still_allowed=session_check(request, pg))


ROUTES: list[Route] = [
    ("GET", "/", root, "root"),
    ("GET", "/tenants", tenants, "tenants"),
    ("GET", "/t/{tenant_id}/", overview, "overview"),
    ("GET", "/t/{tenant_id}/events/overview", overview_events, "overview_events"),
]
