"""Signing in and out: email and password, a tenant API key (read only), and accepting an invitation.

Why these forms use a pre-session CSRF cookie (double submit): before login there is no session to bind a
token to, yet a cross-site form that logs the victim into the attacker's account (login CSRF) or accepts an
invitation in their name must fail. ``nkudo_prelogin`` is ``SameSite=Strict`` and ``HttpOnly``: another
site can neither read it nor have the browser send it, so it cannot produce a form whose token matches.
The UI middleware checks it for the routes in ``security.PRE_SESSION_ROUTES``.
"""

from __future__ import annotations

import re

from aiohttp import web

from nkudo.cp.errors import BadRequest, Conflict, NotFound, Unauthenticated
from nkudo.cp.usecases.accounts import LoginResult
from nkudo.cp.web.context import CP_KEY, Flash, Route, field, info, render, see_other, source
from nkudo.cp.web.security import (
    SESSION_COOKIE,
    clear_session_cookie,
    cookie,
    current_session,
    prelogin_token,
    safe_next,
    set_prelogin_cookie,
    set_session_cookie,
)

#: An invitation token as issued (url-safe base64); anything else cannot be one, so it is not looked up.
_INVITE_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}\Z")
_BAD_LOGIN = "Sign-in failed: the email or password is wrong."
_BAD_KEY = "Sign-in failed: the API key is wrong, expired or revoked."


def _user_agent(request: web.Request) -> str | None:
    return request.headers.get("User-Agent")


def _signed_in(request: web.Request, result: LoginResult, to: str) -> web.Response:
    """303 to ``to`` with the new session's cookie, which lives until the session's absolute expiry (not its
    idle one: the server ends an idle session, and the cookie is set only here, at sign-in)."""
    resp = see_other(to)
    now = request.config_dict[CP_KEY].clock.now()
    set_session_cookie(resp, result.token, (result.context.ends_at - now).total_seconds())
    return resp


def _login_page(request: web.Request, *, status: int = 200, error: str | None = None, email: str = "",
                next_path: str = "/ui/", mode: str = "password") -> web.Response:
    new: dict[str, str] = {}
    token = prelogin_token(request, new)
    resp = render(request, "login.html", None, status=status, csrf_token=token, error=error, email=email,
                  next_path=safe_next(next_path), mode=mode)
    set_prelogin_cookie(resp, new)
    return resp


async def login_form(request: web.Request) -> web.StreamResponse:
    if await current_session(request) is not None:
        return see_other(safe_next(request.query.get("next")))
    return _login_page(request, next_path=request.query.get("next", "/ui/"))


async def login(request: web.Request) -> web.StreamResponse:
    """Both sign-in forms post here (one route: the rate limiter's strict LOGIN class covers both): email and
    password, or (a form with ``api_key``) a tenant API key, which gives a read-only session of its tenant."""
    form = await request.post()
    to = safe_next(field(form, "next", required=False))
    cp, src, inf, ua = request.config_dict[CP_KEY], source(request), info(request), _user_agent(request)
    if "api_key" in form:
        key = field(form, "api_key", required=False, max_chars=512)
        try:
            result = await cp.accounts.login_api_key(key, src, inf, ua)
        except (Unauthenticated, BadRequest):
            return _login_page(request, status=401, error=_BAD_KEY, next_path=to, mode="key")
        return _signed_in(request, result, to)
    email = field(form, "email", required=False, max_chars=320)
    password = field(form, "password", required=False, max_chars=1024)
    try:
        result = await cp.accounts.login(email, password, src, inf, ua)
    except (Unauthenticated, BadRequest):
        return _login_page(request, status=401, error=_BAD_LOGIN, email=email, next_path=to)
    return _signed_in(request, result, to)


async def logout(request: web.Request) -> web.StreamResponse:
    """End the session server-side (the cookie alone is not trusted to go away) and clear the cookie."""
    token = cookie(request, SESSION_COOKIE)
    if token is not None:
        await request.config_dict[CP_KEY].accounts.logout(token)
    resp = see_other("/ui/login", Flash.SIGNED_OUT)
    clear_session_cookie(resp)
    return resp


def _invite_token(request: web.Request) -> str:
    token = request.match_info["token"]
    if not _INVITE_TOKEN.match(token):
        raise NotFound("this invitation link is invalid, used or expired", code="INVITATION_NOT_FOUND")
    return token


async def _invite_page(request: web.Request, token: str, *, status: int = 200,
                       error: str | None = None) -> web.Response:
    invitation = await request.config_dict[CP_KEY].accounts.invitation(token)
    if invitation is None:
        raise NotFound("this invitation link is invalid, used or expired", code="INVITATION_NOT_FOUND")
    new: dict[str, str] = {}
    resp = render(request, "invite.html", None, status=status, csrf_token=prelogin_token(request, new),
                  invitation=invitation, error=error)
    set_prelogin_cookie(resp, new)
    return resp


async def invite_form(request: web.Request) -> web.StreamResponse:
    return await _invite_page(request, _invite_token(request))


async def invite_accept(request: web.Request) -> web.StreamResponse:
    """Accept an invitation: a new user sets a password; an existing user proves theirs. Single use."""
    token = _invite_token(request)
    form = await request.post()
    password = field(form, "password", required=False, max_chars=1024)
    if password != field(form, "password_confirm", required=False, max_chars=1024):
        return await _invite_page(request, token, status=400, error="The two passwords differ.")
    cp = request.config_dict[CP_KEY]
    try:
        result = await cp.accounts.accept_invitation(token, password, info(request), _user_agent(request))
    except (BadRequest, Unauthenticated, Conflict) as exc:
        return await _invite_page(request, token, status=exc.status, error=exc.message)
    return _signed_in(request, result, "/ui/")


ROUTES: list[Route] = [
    ("GET", "/login", login_form, "login"),
    ("POST", "/login", login, "login_post"),
    ("POST", "/logout", logout, "logout"),
    ("GET", "/invite/{token}", invite_form, "invite"),
    ("POST", "/invite/{token}", invite_accept, "invite_post"),
]
