"""The audit page (issue 13, page 7): the tenant's audit events with the API's filters and "next page", and the
verification of the tenant's hash chain for those who may run it (administrators).

Why the filters go through ``parse_filter``: it is the one definition of what each audit query parameter may
hold (the API's ``GET /tenants/{id}/audit`` uses it), so the page accepts and refuses exactly what the API
does; a refusal is shown next to the field it names. Empty form fields mean "any" and are dropped first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from nkudo.cp import views as v
from nkudo.cp.domain import ActorType
from nkudo.cp.errors import BadRequest
from nkudo.cp.usecases.audit import AuditFilter, parse_filter
from nkudo.cp.web.context import Page, Route, check_csrf, page, render
from nkudo.cp.web.site_pages import with_query

#: The filter fields of the form, in the order shown (``parse_filter`` knows each).
FILTER_FIELDS = ("action", "actor_type", "object_type", "object_id", "since", "until")


def may_verify(pg: Page) -> bool:
    """Whether to offer "Verify chain": ``audit.verify`` accepts only what ``require_admin`` accepts."""
    return pg.principal.is_admin


def _filled(query: Mapping[str, str]) -> dict[str, str]:
    return {k: val for k, val in query.items() if val != ""}


async def _values(request: web.Request, pg: Page, report: v.AuditVerifyReport | None = None) -> tuple[int, dict[str, Any]]:
    query = _filled(request.query)
    errors: dict[str, str] = {}
    try:
        flt = parse_filter(query, admin=False)
    except BadRequest as exc:
        errors[exc.field or "filters"] = exc.message
        flt = None
    events: v.AuditEvents | None = None
    if flt is not None:
        try:
            events = await pg.cp.audit.list_audit(pg.principal, pg.tenant_id, flt.limit, flt)
        except BadRequest as exc:  # a cursor of another list, or altered
            errors[exc.field or "filters"] = exc.message
    path = f"/ui/t/{pg.tenant_id}/audit"
    nxt = events.next if events is not None else None
    return (400 if errors else 200), {
        "events": events.events if events is not None else [], "errors": errors, "query": query,
        "actor_types": list(ActorType), "filter_fields": FILTER_FIELDS, "audit_path": path,
        "next_url": with_query(path, query, cursor=nxt) if nxt else None,
        "may_verify": may_verify(pg), "report": report, "flt": flt or AuditFilter(),
    }


async def audit_page(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    # The server's last periodic verification of this tenant's chain (anyone who may read the tenant).
    status, values = await _values(request, pg, await pg.cp.audit.chain_status(pg.principal, pg.tenant_id))
    return render(request, "audit.html", pg, status=status, **values)


async def verify_chain(request: web.Request) -> web.StreamResponse:
    """Verify the tenant's chain now (administrators; the use case refuses others with 403) and show the
    report on the page. A POST: it reads the whole chain, which no link prefetch should set off."""
    pg = await page(request)
    await check_csrf(request, pg)
    report = await pg.cp.audit.verify(pg.principal, pg.tenant_id)
    status, values = await _values(request, pg, report)
    return render(request, "audit.html", pg, status=status, **values)


ROUTES: list[Route] = [
    ("GET", "/t/{tenant_id}/audit", audit_page, "audit"),
    ("POST", "/t/{tenant_id}/audit/verify", verify_chain, "audit_verify"),
]
