"""The dashboard's security layer: response headers, the session cookie, CSRF and HTML error pages.

Why all of it in one middleware plus one prepare hook (and not in each page): a page that forgets a check
must still be safe. Every non-GET ``/ui`` request is refused unless it carries a CSRF token bound to the
caller's session (or, before login, to its pre-session cookie), whatever handler it reaches; every response
under ``/ui`` (pages, redirects, errors, static files, event streams) gets the same headers, because the
hook runs when any response is prepared, including those the main application's middlewares produce.
"""

from __future__ import annotations

import hmac
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from html import escape
from urllib.parse import quote

import aiohttp_jinja2
from aiohttp import web

from nkudo.cp.errors import Forbidden, TooManyRequests, status_of
from nkudo.cp.http_limits import LIMITER_KEY
from nkudo.cp.ratelimit import client_address, retry_after_header
from nkudo.cp.records import RequestInfo
from nkudo.cp.service import ControlPlane
from nkudo.cp.usecases.accounts import SessionContext
from nkudo.errors import NkudoError
from nkudo.log import get_logger

log = get_logger("cp.web")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The control plane, on the UI sub-application (``request.config_dict[CP_KEY]``).
CP_KEY = web.AppKey("nkudo.ui.cp", ControlPlane)

SESSION_COOKIE = "nkudo_session"
PRELOGIN_COOKIE = "nkudo_prelogin"
COOKIE_PATH = "/ui/"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
#: The longest cookie value looked at (a session token is 43 characters; anything far longer is not one).
MAX_TOKEN_CHARS = 256
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SESSION = "nkudo.ui.session"

#: Why this policy: nothing inline (no script, style or event-handler attribute), nothing from elsewhere,
#: no framing, no plugins, forms post only to us, and no ``<base>`` that could re-point relative URLs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # invitation tokens are in URLs: never send them to anyone
    "X-Content-Type-Options": "nosniff",
    "Strict-Transport-Security": "max-age=31536000",  # the listener is TLS only
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: Vendored files carry their version in their name, so they never change under the same URL.
IMMUTABLE = "public, max-age=31536000, immutable"

#: ``?next=`` after login: a path of this dashboard only (never ``//host``, a scheme, a backslash or ``..``).
_NEXT = re.compile(r"/ui/(?!/)[A-Za-z0-9\-._~/?=&%+]{0,500}\Z")


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` of the UI app: the headers of every ``/ui`` response, whoever produced it."""
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    if "Cache-Control" not in response.headers:
        static = request.path.startswith("/ui/static/")
        response.headers["Cache-Control"] = (IMMUTABLE if request.path.startswith("/ui/static/vendor/")
                                             else "no-cache" if static else "no-store")


def tokens_match(presented: str | None, expected: str | None) -> bool:
    """Constant-time comparison; an empty value on either side never matches."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def cookie(request: web.Request, name: str) -> str | None:
    value = request.cookies.get(name)
    return value if value and len(value) <= MAX_TOKEN_CHARS else None


async def current_session(request: web.Request) -> SessionContext | None:
    """The session behind the request's cookie (looked up once per request), or None."""
    if _SESSION not in request:
        token = cookie(request, SESSION_COOKIE)
        request[_SESSION] = await request.config_dict[CP_KEY].accounts.session(token) if token else None
    ctx: SessionContext | None = request[_SESSION]
    return ctx


def safe_next(value: str | None) -> str:
    """Where to go after login: ``value`` if it is a local dashboard path, else the dashboard's root."""
    return value if value is not None and _NEXT.match(value) and "/.." not in value else "/ui/"


def login_url(next_path: str) -> str:
    return "/ui/login?next=" + quote(safe_next(next_path), safe="/")


def set_session_cookie(resp: web.StreamResponse, token: str, max_age: float) -> None:
    """The session cookie: script cannot read it, it never travels in clear nor with a cross-site request,
    and it lives no longer than the session's absolute timeout."""
    resp.set_cookie(SESSION_COOKIE, token, path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict",
                    max_age=max(0, int(max_age)))
    resp.del_cookie(PRELOGIN_COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict")


def clear_session_cookie(resp: web.StreamResponse) -> None:
    resp.del_cookie(SESSION_COOKIE, path=COOKIE_PATH, secure=True, httponly=True, samesite="Strict")


def prelogin_token(request: web.Request, resp_cookies: dict[str, str]) -> str:
    """The pre-session CSRF token (double submit): the cookie's value, or a new one to set.

    Why: the login and invitation forms have no session to bind a token to; an attacker's page can neither
    read this ``SameSite=Strict`` cookie nor make the browser send it, so it cannot forge a matching form.
    """
    token = cookie(request, PRELOGIN_COOKIE)
    if token is None:
        token = resp_cookies[PRELOGIN_COOKIE] = secrets.token_urlsafe(32)
    return token


def set_prelogin_cookie(resp: web.StreamResponse, new: dict[str, str]) -> None:
    if PRELOGIN_COOKIE in new:
        resp.set_cookie(PRELOGIN_COOKIE, new[PRELOGIN_COOKIE], path=COOKIE_PATH, secure=True, httponly=True,
                        samesite="Strict")


def request_info(request: web.Request) -> tuple[RequestInfo, str]:
    """The audit record's request info (a fresh request id: a browser sends none worth keeping) and the
    client address the lock-out and throttles key on (``--trusted-proxy`` rules, as on the API)."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    ip = peer[0] if isinstance(peer, tuple) and peer else None
    limiter = request.config_dict.get(LIMITER_KEY)
    source = client_address(ip, request.headers.get("X-Forwarded-For"), request.headers.get("X-Real-IP"),
                            limiter.proxies if limiter is not None else ())
    return RequestInfo(request_id=str(uuid.uuid4()), source_ip=ip), source


async def presented_csrf(request: web.Request) -> str | None:
    """The token a request presents: the ``X-CSRF-Token`` header (htmx) or the form's ``csrf_token``."""
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        value = (await request.post()).get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


#: Routes posted before there is a session (login, invitation accept): their token is the pre-session cookie's.
PRE_SESSION_ROUTES = frozenset({"login_post", "invite_post"})


async def require_csrf(request: web.Request) -> None:
    """Refuse a state-changing request unless it presents the token of its own session (or, on the login and
    invitation forms, its pre-session cookie's): nothing else, not even the other kind of token, will do."""
    presented = await presented_csrf(request)
    name = request.match_info.route.name
    if name in PRE_SESSION_ROUTES:
        expected = cookie(request, PRELOGIN_COOKIE)
    else:
        ctx = await current_session(request)
        if ctx is None and name == "logout":
            return  # signing out of no session changes nothing (an expired page's sign-out button just works)
        expected = ctx.csrf_token if ctx is not None else None
    if not tokens_match(presented, expected):
        raise Forbidden("the form's security token (csrf_token) is missing or wrong: reload the page and try again",
                        code="CSRF_INVALID", field="csrf_token")


@web.middleware
async def ui_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CSRF on every non-GET request, then the handler; errors become HTML pages, redirects plain 303s.

    Why redirects are turned into responses here: the main application's error middleware maps every
    ``HTTPException`` to a JSON error, which would drop a redirect's ``Location``.
    """
    try:
        if request.method not in _SAFE_METHODS and request.match_info.http_exception is None:
            await require_csrf(request)  # (an unknown path or method is refused as such below: 404/405)
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            return web.Response(status=exc.status, headers={k: v for k, v in exc.headers.items()
                                                           if k in ("Location", "HX-Redirect")})
        extra = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_page(request, exc.status, "HTTP_ERROR" if exc.status != 404 else "NOT_FOUND",
                          "This page does not exist." if exc.status == 404 else exc.reason, headers=extra)
    except NkudoError as exc:
        return nkudo_error_page(request, exc)
    except Exception:
        log.exception("internal error", route=request.path, method=request.method)
        return error_page(request, 500, "INTERNAL", "Something went wrong on the server. Try again later.")


def nkudo_error_page(request: web.Request, exc: NkudoError) -> web.Response:
    """The HTML page of a use-case error (also used by the main app's error middleware for ``/ui`` paths)."""
    status = status_of(exc)
    if status >= 500:
        log.error("request failed", route=request.path, code=exc.code, error=exc.message)
    if isinstance(exc, TooManyRequests):
        wait = retry_after_header(exc.retry_after)
        return error_page(request, 429, exc.code, "Too many attempts.", retry_after=wait,
                          headers={"Retry-After": wait})
    return error_page(request, status, exc.code, exc.message)


def error_page(request: web.Request, status: int, code: str, message: str, *, retry_after: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    """An error as a page of the dashboard (escaped; a minimal page if the templates are not reachable)."""
    values = {"request": request, "page": None, "csrf_token": "", "flash": None, "status": status, "code": code,
              "message": message, "retry_after": retry_after}
    ui, current = _ui_app(request), request.match_info.current_app
    try:
        if ui is not None:  # from the main app's middleware (e.g. its rate limiter): render as the UI app would
            request.match_info.current_app = ui
        resp = aiohttp_jinja2.render_template("error.html", request, values, status=status)
    except (RuntimeError, KeyError):  # no template environment reachable: a minimal page, still escaped
        body = f"<!doctype html><title>{status}</title><h1>{status}</h1><p>{escape(message)}</p>"
        resp = web.Response(text=body, status=status, content_type="text/html")
    finally:
        request.match_info.current_app = current
    resp.headers.update(headers or {})
    return resp


def _ui_app(request: web.Request) -> web.Application | None:
    return next((app for app in request.match_info.apps if CP_KEY in app), None)


def is_ui_request(request: web.Request) -> bool:
    """Whether the request was routed into the dashboard (its errors are then pages, not JSON), also when
    asked from the main application's middlewares, which run before the dashboard's."""
    return _ui_app(request) is not None
