"""Page 8, "Access": members and their roles, invitations, sessions and API keys of one tenant.

Everyone who can read the tenant sees who has access; only MANAGE (owners, admins) sees the forms. The
forms are a convenience, not the check: each POST goes to a use case with the page's principal, which
refuses a viewer or operator with 403 whatever the browser sent. Secrets created here (an invitation link,
an API key) are rendered in the POST's own response, once, never put in a redirect URL.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from nkudo.cp.domain import Permission, Role
from nkudo.cp.errors import BadRequest, Conflict, NotFound
from nkudo.cp.models import ApiKeyCreate
from nkudo.cp.web.context import (
    Flash,
    FormData,
    Page,
    Route,
    check_csrf,
    field,
    form_errors,
    info,
    int_field,
    page,
    path_uuid,
    render,
    see_other,
)
from nkudo.cp.web.enroll_pages import control_plane_url
from nkudo.errors import ValidationError
from nkudo.wire import codec

ROLES = [Role.VIEWER, Role.OPERATOR, Role.OWNER]


def _role(form: FormData) -> Role:
    raw = field(form, "role", max_chars=16)
    try:
        return Role(raw)
    except ValueError:
        raise BadRequest(f"role must be one of {', '.join(r.value for r in ROLES)}", field="role") from None


def _url(pg: Page) -> str:
    return f"/ui/t/{pg.tenant_id}/access"


async def _render(request: web.Request, pg: Page, *, status: int = 200, **values: Any) -> web.Response:
    cp, p, tid = pg.cp, pg.principal, pg.tenant_id
    manage = pg.can(Permission.MANAGE)
    out: dict[str, Any] = {
        "members": await cp.accounts.list_members(p, tid),
        "invitations": await cp.accounts.list_invitations(p, tid) if manage else [],
        "sessions": await cp.accounts.list_sessions(p, tid, pg.ctx.session_id) if manage else [],
        "api_keys": (await cp.access.list_api_keys(p, tid)).api_keys,
        "roles": ROLES, "errors": {}, "invitation_url": None, "created_key": None, "invite_email": "",
        "invite_role": Role.VIEWER, "key_name": "", "invitation_expires": None,
    }
    out.update(values)
    return render(request, "access.html", pg, status=status, **out)


async def access(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    return await _render(request, pg)


async def invite(request: web.Request) -> web.StreamResponse:
    """Invite by email with a role; the link is shown once (only its hash is stored)."""
    pg = await page(request)
    form = await check_csrf(request, pg)
    email = field(form, "email", required=False, max_chars=320)
    try:
        role = _role(form)
        issued = await pg.cp.accounts.invite(pg.principal, pg.tenant_id, email, role, None, info(request))
    except (ValidationError, Conflict) as exc:
        return await _render(request, pg, status=exc.status if isinstance(exc, Conflict) else 400,
                             errors=form_errors(exc), invite_email=email)
    return await _render(request, pg, invitation_url=control_plane_url(request, pg) + issued.url_path,
                         invitation_expires=issued.expires_at)


async def revoke_invitation(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    await check_csrf(request, pg)
    await pg.cp.accounts.revoke_invitation(pg.principal, pg.tenant_id, path_uuid(request, "invitation_id"),
                                           info(request))
    return see_other(_url(pg), Flash.REVOKED)


async def change_role(request: web.Request) -> web.StreamResponse:
    """A member's new role (``grant`` on an existing member changes it; the use case keeps an owner)."""
    pg = await page(request)
    form = await check_csrf(request, pg)
    uid, role = path_uuid(request, "user_id"), _role(form)
    members = {m.user_id: m for m in await pg.cp.accounts.list_members(pg.principal, pg.tenant_id)}
    if uid not in members:
        raise NotFound("user not found", code="USER_NOT_FOUND")
    await pg.cp.accounts.grant(pg.principal, pg.tenant_id, members[uid].email, role, info(request))
    return see_other(_url(pg), Flash.SAVED)


async def remove_member(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    await check_csrf(request, pg)
    await pg.cp.accounts.revoke_membership(pg.principal, pg.tenant_id, path_uuid(request, "user_id"),
                                           info(request))
    return see_other(_url(pg), Flash.REMOVED)


async def revoke_session(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    await check_csrf(request, pg)
    await pg.cp.accounts.revoke_session(pg.principal, pg.tenant_id, path_uuid(request, "session_id"),
                                        info(request))
    return see_other(_url(pg), Flash.REVOKED)


async def create_api_key(request: web.Request) -> web.StreamResponse:
    """A new API key (the JSON API's model and use case); the key is shown once."""
    pg = await page(request)
    form = await check_csrf(request, pg)
    name = field(form, "name", required=False, max_chars=200)
    try:
        values: dict[str, Any] = {"name": name or "default"}
        ttl = int_field(form, "expires_in_seconds")
        if ttl is not None:
            values["expires_in_seconds"] = ttl
        body = codec.convert(values, ApiKeyCreate)
    except ValidationError as exc:
        return await _render(request, pg, status=400, errors=form_errors(exc), key_name=name)
    created = await pg.cp.access.create_api_key(pg.principal, pg.tenant_id, body, info(request))
    return await _render(request, pg, created_key=created)


async def revoke_api_key(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    await check_csrf(request, pg)
    await pg.cp.access.revoke_api_key(pg.principal, pg.tenant_id, path_uuid(request, "key_id"), info(request))
    return see_other(_url(pg), Flash.REVOKED)


ROUTES: list[Route] = [
    ("GET", "/t/{tenant_id}/access", access, "access"),
    ("POST", "/t/{tenant_id}/access/invitations", invite, "access_invite"),
    ("POST", "/t/{tenant_id}/access/invitations/{invitation_id}/revoke", revoke_invitation, "access_invitation_revoke"),
    ("POST", "/t/{tenant_id}/access/members/{user_id}/role", change_role, "access_member_role"),
    ("POST", "/t/{tenant_id}/access/members/{user_id}/remove", remove_member, "access_member_remove"),
    ("POST", "/t/{tenant_id}/access/sessions/{session_id}/revoke", revoke_session, "access_session_revoke"),
    ("POST", "/t/{tenant_id}/access/api-keys", create_api_key, "access_key_create"),
    ("POST", "/t/{tenant_id}/access/api-keys/{key_id}/revoke", revoke_api_key, "access_key_revoke"),
]
