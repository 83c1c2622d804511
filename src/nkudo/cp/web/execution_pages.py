"""The execution page (issue 13, page 5): status, timings, result or error, and its log lines, live-tailed.

Why the tail carries the last ``seq`` shown: the page renders the lines it has, and the live view asks only
for lines after that one (``after=<seq>`` in its URL, then the last sent line's seq as the SSE event id), so
a log of many thousand lines is never sent twice and a burst of lines costs one read per burst.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nkudo.cp import views as v
from nkudo.cp.domain import TERMINAL
from nkudo.cp.paging import MAX_LIMIT
from nkudo.cp.web.context import Page, Route, page, path_uuid, render
from nkudo.cp.web.site_pages import query_cursor, same_tenant, with_query

#: Log lines per page (the live tail appends to the last page).
LOG_ROWS = MAX_LIMIT


async def execution_of(pg: Page, execution_id: str) -> v.ExecutionView:
    ex = await pg.cp.executions.get_execution(pg.principal, execution_id)
    same_tenant(pg, ex.tenant_id, "execution")
    return ex


def execution_values(ex: v.ExecutionView) -> dict[str, Any]:
    """What the status fragment shows (the page and each live update)."""
    return {"ex": ex, "done": ex.state in TERMINAL}


async def execution_page(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    ex = await execution_of(pg, path_uuid(request, "execution_id"))
    logs = await pg.cp.executions.execution_logs(pg.principal, ex.id, -1, LOG_ROWS, cursor=query_cursor(request))
    path = f"/ui/t/{pg.tenant_id}/executions/{ex.id}"
    last = logs.logs[-1].seq if logs.logs else _resumed_after(request)
    live = logs.next is None and ex.state not in TERMINAL
    return render(request, "execution.html", pg, lines=logs.logs, live=live,
                  next_url=with_query(path, request.query, cursor=logs.next) if logs.next else None,
                  events_url=f"/ui/t/{pg.tenant_id}/events/executions/{ex.id}?after={last}",
                  **execution_values(ex))


def _resumed_after(request: web.Request) -> int:
    """The seq a page that starts at ``cursor`` follows (an empty last page tails from there)."""
    cursor = query_cursor(request)
    return int(cursor) if cursor is not None and cursor.isascii() and cursor.isdigit() else -1


ROUTES: list[Route] = [
    ("GET", "/t/{tenant_id}/executions/{execution_id}", execution_page, "execution"),
]
