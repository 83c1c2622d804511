"""What every page module uses: the page's session and principal, rendering, CSRF, redirects and flashes.

A page handler is three steps, like an API handler: ``pg = await page(request)`` (the session and the
``Principal`` for the path's tenant, or a redirect to the login page), a use-case call with ``pg.principal``
(which enforces visibility and roles: the web layer decides nothing), and ``render`` (or ``see_other`` after
a form). Forms call ``check_csrf`` (the middleware has already refused a missing token; this binds the token
to the session of the page, strictly).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp_jinja2
from aiohttp import web
from multidict import MultiDictProxy

from nkudo.cp.domain import Permission
from nkudo.cp.errors import BadRequest, Forbidden
from nkudo.cp.pathparams import path_uuid
from nkudo.cp.records import Principal, RequestInfo
from nkudo.cp.service import ControlPlane
from nkudo.cp.usecases.accounts import Membership, SessionContext
from nkudo.cp.web.security import (
    CP_KEY,
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    cookie,
    current_session,
    login_url,
    presented_csrf,
    request_info,
    tokens_match,
)
from nkudo.errors import NkudoError

__all__ = [
    "CP_KEY",
    "Flash",
    "FormData",
    "Handler",
    "Page",
    "Route",
    "check_csrf",
    "field",
    "form_errors",
    "info",
    "int_field",
    "page",
    "path_uuid",
    "render",
    "see_other",
    "session",
    "session_check",
    "source",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (method, path under /ui, handler, route name): each page module's ``ROUTES`` lists these.
Route = tuple[str, str, Handler, str]
FormData = MultiDictProxy[Any]


class Flash(enum.StrEnum):
    """The one-line confirmations a redirect after a form may show (``?flash=<code>``).

    Why codes and not text in the URL: a link with ``?flash=Your account is locked, call ...`` would let
    anyone put words on our page; only these fixed sentences can appear.
    """

    CREATED = "created"
    SAVED = "saved"
    REVOKED = "revoked"
    REMOVED = "removed"
    INVITED = "invited"
    SUBMITTED = "submitted"
    CANCELLED = "cancelled"
    SIGNED_OUT = "signed-out"


FLASH_TEXT: dict[Flash, str] = {
    Flash.CREATED: "Created.",
    Flash.SAVED: "Saved.",
    Flash.REVOKED: "Revoked.",
    Flash.REMOVED: "Removed.",
    Flash.INVITED: "Invitation created.",
    Flash.SUBMITTED: "Submitted.",
    Flash.CANCELLED: "Cancelled.",
    Flash.SIGNED_OUT: "You are signed out.",
}


@dataclass(frozen=True, slots=True)
class Page:
    """An authenticated page of one tenant: who is looking, with which rights, at which tenant."""

    ctx: SessionContext
    principal: Principal
    tenant: Membership
    csrf_token: str
    cp: ControlPlane

    @property
    def tenant_id(self) -> str:
        return self.tenant.tenant_id

    def can(self, perm: Permission | str) -> bool:
        """Whether to show a form; the use case decides again (a forged POST is still refused there)."""
        return self.principal.allows(Permission(perm))


async def session(request: web.Request) -> SessionContext:
    """The request's session, or a redirect to the login page that comes back here afterwards."""
    ctx = await current_session(request)
    if ctx is None:
        if request.headers.get("HX-Request") == "true":  # htmx would swap the login page into a fragment
            page_url = urlsplit(request.headers.get("HX-Current-URL", ""))
            back = page_url.path + (f"?{page_url.query}" if page_url.query else "")
            raise web.HTTPNoContent(headers={"HX-Redirect": login_url(back)})  # the whole page goes to login
        raise web.HTTPSeeOther(login_url(request.path_qs))
    return ctx


async def page(request: web.Request) -> Page:
    """The session and principal for the path's ``{tenant_id}`` (404 when the session has no such tenant)."""
    ctx = await session(request)
    tid = path_uuid(request, "tenant_id")
    principal = ctx.principal_for(tid)
    tenant = next(m for m in ctx.tenants if m.tenant_id == tid)
    return Page(ctx=ctx, principal=principal, tenant=tenant, csrf_token=ctx.csrf_token, cp=request.config_dict[CP_KEY])


def flash_of(request: web.Request) -> str | None:
    try:
        return FLASH_TEXT[Flash(request.query.get("flash", ""))]
    except ValueError:
        return None


def render(request: web.Request, template: str, page: Page | None, *, status: int = 200, csrf_token: str = "",
           **values: Any) -> web.Response:
    """Render ``template`` (autoescaped) with the page, its CSRF token, the flash and ``values``."""
    ctx: dict[str, Any] = {"request": request, "page": page, "flash": flash_of(request), "Permission": Permission,
                           "csrf_token": page.csrf_token if page is not None else csrf_token, **values}
    return aiohttp_jinja2.render_template(template, request, ctx, status=status)


async def check_csrf(request: web.Request, page: Page) -> FormData:
    """The submitted form, after checking its token against the page's session (403 otherwise)."""
    form = await request.post()
    presented = request.headers.get(CSRF_HEADER) or await presented_csrf(request)
    if not tokens_match(presented, page.csrf_token):
        raise Forbidden("the form's security token (csrf_token) is missing or wrong: reload the page and try again",
                        code="CSRF_INVALID", field=CSRF_FIELD)
    return form


def field(form: FormData, name: str, *, required: bool = True, max_chars: int = 1000) -> str:
    """A text field of a form, stripped; a 400 naming the field when it is missing, a file, or too long."""
    value = form.get(name, "")
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a text field", field=name)
    value = value.strip()
    if required and not value:
        raise BadRequest(f"{name} is required", field=name)
    if len(value) > max_chars:
        raise BadRequest(f"{name} must be at most {max_chars} characters", field=name)
    return value


def int_field(form: FormData, name: str) -> int | None:
    """An optional whole-number field (empty: None); its range is the use case's model's to check."""
    raw = field(form, name, required=False, max_chars=20)
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit():
        raise BadRequest(f"{name} must be a whole number", field=name)
    return int(raw)


def form_errors(exc: NkudoError) -> dict[str, str]:
    """A validation error as {field: sentence}, for showing it next to its input (``_macros.field_error``)."""
    return {exc.field or "form": exc.message}


def see_other(location: str, flash: Flash | None = None) -> web.Response:
    """303 to a GET page after a form (no resubmission on reload), with a fixed confirmation to show."""
    if flash is not None:
        location += ("&" if "?" in location else "?") + urlencode({"flash": flash.value})
    return web.Response(status=303, headers={"Location": location})


def info(request: web.Request) -> RequestInfo:
    """The audit record's request info of this request."""
    return request_info(request)[0]


def source(request: web.Request) -> str:
    """The client address (lock-out and throttle key) of this request."""
    return request_info(request)[1]


def session_check(request: web.Request, pg: Page) -> Callable[[], Awaitable[bool]]:
    """For a live view (``sse_stream``'s ``still_allowed``): is the page's session still valid and still a
    member of the page's tenant? A revoked session or a removed membership ends the stream."""
    token = cookie(request, SESSION_COOKIE)

    async def check() -> bool:
        ctx = await pg.cp.accounts.session(token) if token else None
        return ctx is not None and ctx.session_id == pg.ctx.session_id and any(
            m.tenant_id == pg.tenant_id for m in ctx.tenants)

    return check
