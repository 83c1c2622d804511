"""The VM page (issue 13, page 3): spec, state history, the actions that touched it, the console tail, and the
buttons that submit a one-action plan (stop, start, pause, resume, snapshot, delete).

Why a button is a plan: the VM's host is reached only through plans (agents call out, nothing calls in), so
the button builds exactly the body an API client would send and submits it through ``cp.plans.create_plan``
with the page's principal; that use case validates it with the agent's own schemas and refuses a viewer
(403), whatever the form looked like. Each rendered form carries a fresh idempotency key, so a double click
(or a resubmitted POST) yields the same plan, not two.

Why destructive actions confirm on the server: without JavaScript the button leads to a confirmation page
whose form says ``confirmed=yes``; with JavaScript htmx asks (``hx-confirm``) and sends the request itself
(``HX-Request``), and the answer tells it where to go (``HX-Redirect``). A plain POST without the
confirmation never stops or deletes anything.
"""

from __future__ import annotations

import enum
import uuid
from typing import Any

from aiohttp import web

from nkudo.cp.errors import BadRequest, NotFound
from nkudo.cp.models import PlanCreate
from nkudo.cp.pathparams import vm_path_id
from nkudo.cp.web.context import (
    Flash,
    FormData,
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
from nkudo.cp.web.site_pages import site_of
from nkudo.errors import NkudoError
from nkudo.wire import codec
from nkudo.wire.vocab import ActionType

#: Console lines shown on the page (the API's default).
CONSOLE_LINES = 100


class VmButton(enum.StrEnum):
    """The buttons of a VM page, each one plan action (``ActionType``)."""

    STOP = "stop"
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    SNAPSHOT = "snapshot"
    DELETE = "delete"

    @property
    def action_type(self) -> ActionType:
        return _TYPES[self]

    @property
    def destructive(self) -> bool:
        """Asks for a confirmation first (the guest is shut down or the VM is gone)."""
        return self in (VmButton.STOP, VmButton.DELETE)


_TYPES = {VmButton.STOP: ActionType.MICROVM_STOP, VmButton.START: ActionType.MICROVM_START,
          VmButton.PAUSE: ActionType.MICROVM_PAUSE, VmButton.RESUME: ActionType.MICROVM_RESUME,
          VmButton.SNAPSHOT: ActionType.MICROVM_SNAPSHOT, VmButton.DELETE: ActionType.MICROVM_DELETE}


def button_of(raw: str) -> VmButton:
    try:
        return VmButton(raw)
    except ValueError:
        raise BadRequest(f"action must be one of {', '.join(b.value for b in VmButton)}", field="action") from None


def new_key() -> str:
    """A fresh idempotency key for one rendered form (one click, one plan)."""
    return "ui-" + uuid.uuid4().hex


def _vm_path(pg: Page, site_id: str, vm_id: str) -> str:
    return f"/ui/t/{pg.tenant_id}/sites/{site_id}/vms/{vm_id}"


async def _values(request: web.Request, pg: Page, site_id: str, vm_id: str) -> dict[str, Any]:
    site = await site_of(pg, site_id)
    detail = await pg.cp.overview.vm_detail(pg.principal, site_id, vm_id)
    console = None
    if request.query.get("console") == "1":  # on request only: asking for a tail makes the host ship one
        try:
            console = await pg.cp.consoles.get(pg.principal, vm_id, site_id, CONSOLE_LINES)
        except NotFound:
            console = None  # a deleted VM has no console
    return {"site": site, "d": detail, "vm": detail.vm, "console": console, "buttons": list(VmButton),
            "vm_path": _vm_path(pg, site_id, vm_id), "key": new_key(), "errors": {}, "snapshot_name": "",
            "console_lines": CONSOLE_LINES}


async def vm_page(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    site_id, vm_id = path_uuid(request, "site_id"), vm_path_id(request)
    return render(request, "vm.html", pg, **await _values(request, pg, site_id, vm_id))


async def confirm_page(request: web.Request) -> web.StreamResponse:
    """The no-JavaScript confirmation of a destructive action: a page whose form confirms it."""
    pg = await page(request)
    site_id, vm_id = path_uuid(request, "site_id"), vm_path_id(request)
    button = button_of(request.query.get("action", ""))
    values = await _values(request, pg, site_id, vm_id)
    return render(request, "_vm_confirm.html", pg, button=button, **values)


def _plan_body(button: VmButton, vm_id: str, form: FormData) -> PlanCreate:
    """The one-action plan of a button, decoded exactly as the API decodes a submitted plan."""
    params: dict[str, Any] = {"vm_id": vm_id}
    if button is VmButton.SNAPSHOT:
        params["snapshot_name"] = field(form, "snapshot_name", max_chars=64)
    body = {"idempotency_key": field(form, "idempotency_key", max_chars=200),
            "actions": [{"type": button.action_type.value, "params": params}]}
    return codec.convert(body, PlanCreate)


async def vm_action(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    site_id, vm_id = path_uuid(request, "site_id"), vm_path_id(request)
    form = await check_csrf(request, pg)
    button = button_of(field(form, "action", max_chars=16))
    here = _vm_path(pg, site_id, vm_id)
    htmx = request.headers.get("HX-Request") == "true"
    if button.destructive and not htmx and form.get("confirmed") != "yes":
        return see_other(f"{here}/confirm?action={button.value}")
    await site_of(pg, site_id)
    try:
        plan = await pg.cp.plans.create_plan(pg.principal, site_id, _plan_body(button, vm_id, form), info(request))
    except NkudoError as exc:
        if exc.field is None or not exc.field.startswith(("actions[0].params", "snapshot_name")):
            raise
        values = await _values(request, pg, site_id, vm_id)
        values.update(errors={"snapshot_name": exc.message}, snapshot_name=form.get("snapshot_name", ""))
        return render(request, "vm.html", pg, status=400, **values)
    to = see_other(f"/ui/t/{pg.tenant_id}/plans/{plan.plan_id}", Flash.SUBMITTED)
    if htmx:  # htmx would follow a 303 itself and swap the plan page into the form: tell it to navigate
        return web.Response(status=200, headers={"HX-Redirect": to.headers["Location"]})
    return to


ROUTES: list[Route] = [
    ("GET", "/t/{tenant_id}/sites/{site_id}/vms/{vm_id}", vm_page, "vm"),
    ("GET", "/t/{tenant_id}/sites/{site_id}/vms/{vm_id}/confirm", confirm_page, "vm_confirm"),
    ("POST", "/t/{tenant_id}/sites/{site_id}/vms/{vm_id}/actions", vm_action, "vm_action"),
]
