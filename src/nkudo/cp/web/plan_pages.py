"""Plans (issue 13, page 4): a site's plans with a status filter and "next page", the submit form (a JSON
editor), a plan's page with its executions (live until the plan is done) and its cancel button.

Why the form posts the API's own body: the textarea holds exactly what ``POST /sites/{id}/plans`` takes, and
it is decoded by the same ``nkudo.wire.codec`` into the same ``PlanCreate`` and validated by the same
``create_plan`` (the agent's schemas), so the editor can never accept what the API refuses or the reverse. An
error is shown next to the editor with its field path (``actions[0].params.vcpus``) and the text kept.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from nkudo.cp import views as v
from nkudo.cp.domain import TERMINAL_PLAN, PlanStatus
from nkudo.cp.errors import BadRequest, NotFound, status_of
from nkudo.cp.models import PlanCreate
from nkudo.cp.web.context import (
    Flash,
    Page,
    Route,
    check_csrf,
    field,
    info,
    page,
    path_uuid,
    render,
    see_other,
)
from nkudo.cp.web.site_pages import PAGE_ROWS, query_cursor, query_enum, same_tenant, with_query
from nkudo.cp.web.vm_pages import new_key
from nkudo.errors import NkudoError
from nkudo.wire import codec
from nkudo.wire.vocab import ErrorCode

#: What the editor starts with: a valid plan but for the values an operator fills in.
EXAMPLE_ACTIONS: list[dict[str, Any]] = [{"type": "MicroVMCreate", "params": {
    "vm_id": "vm-1", "name": "vm-1", "vcpus": 1, "memory_mib": 512, "kernel_path": "/var/lib/nkudo/vmlinux",
    "nics": [{"bridge": "br0"}]}}]
#: The form's fields an error can be shown next to (anything else is a field inside the JSON body).
SITE_FIELD = "site_id"


def example_body() -> str:
    return json.dumps({"idempotency_key": new_key(), "actions": EXAMPLE_ACTIONS}, indent=2)


async def _sites(pg: Page) -> list[v.SiteView]:
    return (await pg.cp.tenancy.list_sites(pg.principal, pg.tenant_id)).sites


def _chosen_site(sites: list[v.SiteView], site_id: str | None) -> v.SiteView | None:
    """The site of the listing: the one asked for (it must be the tenant's), else the first."""
    if site_id is None:
        return sites[0] if sites else None
    for s in sites:
        if s.id == site_id:
            return s
    raise NotFound("site not found", code="SITE_NOT_FOUND")


async def _list_values(request: web.Request, pg: Page, sites: list[v.SiteView]) -> dict[str, Any]:
    site = _chosen_site(sites, request.query.get("site") or None)
    status = query_enum(request, "status", PlanStatus)
    path = f"/ui/t/{pg.tenant_id}/plans"
    plans: list[v.PlanSummaryView] = []
    nxt = None
    if site is not None:
        out = await pg.cp.plans.list_plans(pg.principal, site.id, limit=PAGE_ROWS, cursor=query_cursor(request),
                                           status=status)
        plans, nxt = out.plans, out.next
    return {"sites": sites, "site": site, "status_filter": status, "statuses": list(PlanStatus), "plans": plans,
            "site_names": {s.id: s.name for s in sites}, "plans_path": path,
            "next_url": with_query(path, request.query, cursor=nxt) if nxt else None}


async def plans_page(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    values = await _list_values(request, pg, await _sites(pg))
    return render(request, "plans.html", pg, body=example_body(), form_site=values["site"].id if values["site"] else "",
                  errors={}, **values)


async def submit_plan(request: web.Request) -> web.StreamResponse:
    """Decode the editor's text as the API decodes a request body, submit it, or show the form again with the
    error next to the field it names (status 400, or 409 for an idempotency key reused for another plan)."""
    pg = await page(request)
    form = await check_csrf(request, pg)
    sites = await _sites(pg)
    site_id = field(form, SITE_FIELD, max_chars=64)
    text = field(form, "body", max_chars=pg.cp.s.max_body_bytes)
    try:
        if not any(s.id == site_id for s in sites):
            raise BadRequest("site_id must be one of this tenant's sites", field=SITE_FIELD)
        body = codec.decode(text.encode(), PlanCreate)
        plan = await pg.cp.plans.create_plan(pg.principal, site_id, body, info(request))
    except NkudoError as exc:
        if not _shown_in_form(exc):
            raise
        values = await _list_values(request, pg, sites)
        name = SITE_FIELD if exc.field == SITE_FIELD else "body"
        return render(request, "plans.html", pg, status=status_of(exc), body=text, form_site=site_id,
                      errors={name: exc.message}, error_field=exc.field, **values)
    return see_other(f"/ui/t/{pg.tenant_id}/plans/{plan.plan_id}", Flash.SUBMITTED)


def _shown_in_form(exc: NkudoError) -> bool:
    """Validation errors of what was typed (400), a reused idempotency key (409) and quota refusals are the
    submitter's to fix in the form; anything else (a role's 403, 404, 5xx) is an error page."""
    return status_of(exc) in (400, 409, 413) or exc.code == ErrorCode.QUOTA_EXCEEDED


async def plan_of(pg: Page, request: web.Request) -> v.PlanView:
    plan = await pg.cp.plans.get_plan(pg.principal, path_uuid(request, "plan_id"))
    same_tenant(pg, plan.tenant_id, "plan")
    return plan


async def plan_values(pg: Page, plan: v.PlanView) -> dict[str, Any]:
    """What the plan page and its live fragment show."""
    site = next((s for s in await _sites(pg) if s.id == plan.site_id), None)
    return {"plan": plan, "site_name": site.name if site else plan.site_id,
            "done": plan.plan_status in TERMINAL_PLAN}


async def plan_page(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    plan = await plan_of(pg, request)
    return render(request, "plan.html", pg, **await plan_values(pg, plan))


async def cancel_plan(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    await check_csrf(request, pg)
    plan = await plan_of(pg, request)
    await pg.cp.plans.cancel_plan(pg.principal, plan.plan_id, info(request))
    return see_other(f"/ui/t/{pg.tenant_id}/plans/{plan.plan_id}", Flash.CANCELLED)


ROUTES: list[Route] = [
    ("GET", "/t/{tenant_id}/plans", plans_page, "plans"),
    ("POST", "/t/{tenant_id}/plans", submit_plan, "plans_submit"),
    ("GET", "/t/{tenant_id}/plans/{plan_id}", plan_page, "plan"),
    ("POST", "/t/{tenant_id}/plans/{plan_id}/cancel", cancel_plan, "plan_cancel"),
]
