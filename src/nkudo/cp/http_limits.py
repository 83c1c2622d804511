"""The rate limiter's HTTP side (issue 12): the middleware, and who the client of a request is.

Kept apart from ``nkudo.cp.http`` (the routes) so that each stays small; ``agent_identity`` lives here
because the limiter keys agent routes by the verified agent and works it out once per request for the
handler too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from nkudo.cp.errors import TooManyRequests, Unauthenticated
from nkudo.cp.pki import serial_hex
from nkudo.cp.ratelimit import (
    AGENT_CLASSES,
    RouteClass,
    address_identity,
    classify,
    client_address,
    key_identity,
    retry_after_header,
)
from nkudo.cp.ratestore import RateLimiter
from nkudo.cp.records import AgentIdentity

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LIMITER_KEY = web.AppKey("limiter", RateLimiter)
#: Per-request values the rate limiter works out once: the client address and the verified agent identity.
CLIENT = "nkudo.client"
AGENT = "nkudo.agent"


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Issue 12: one token per request from the bucket of (client, route class), before authentication and
    before the handler (so unknown paths and bad credentials are paid for too); 429 with ``Retry-After``."""
    limiter = request.app[LIMITER_KEY]
    cls = classify(request.path, request.method)
    if cls not in limiter.active:
        return await handler(request)
    identity = client_identity(request, cls)
    wait = limiter.check_local(cls, identity)
    if wait is None:  # PostgreSQL: the shared bucket decides
        wait = await limiter.check_shared(cls, identity)
    if wait > 0:
        raise TooManyRequests(f"rate limit of the {cls.value} route class exceeded ({limiter.limits[cls].spec()} "
                              f"per client); retry after {retry_after_header(wait)} s",
                              retry_after=wait, route_class=cls.value)
    return await handler(request)


def client_address_of(request: web.Request) -> str:
    """The client's address (``X-Forwarded-For``/``X-Real-IP`` only from ``--trusted-proxy`` peers), once."""
    addr = request.get(CLIENT)
    if addr is None:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ip = peer[0] if isinstance(peer, tuple) and peer else None
        h = request.headers
        addr = client_address(ip, h.get("X-Forwarded-For"), h.get("X-Real-IP"),
                              request.app[LIMITER_KEY].proxies)
        request[CLIENT] = addr
    return str(addr)


def client_identity(request: web.Request, cls: RouteClass) -> str:
    """Whose bucket: the verified agent on agent routes, the presented key's hash on key routes, else the
    address (always the address for enrollment and logins, whose credentials are in their bodies)."""
    if cls in AGENT_CLASSES:
        try:
            return "agent:" + agent_identity(request).cn
        except Unauthenticated:
            pass
    elif cls not in (RouteClass.ENROLL, RouteClass.LOGIN):
        key = request.headers.get("X-API-Key") or request.headers.get("X-Admin-Key")
        if key:
            return key_identity(key.strip())
    return address_identity(client_address_of(request))


def agent_identity(request: web.Request) -> AgentIdentity:
    """Identity from the TLS-verified client certificate (the only way an agent route is authorised)."""
    known = request.get(AGENT)
    if isinstance(known, AgentIdentity):
        return known  # worked out by the rate limiter already
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    if not cert:
        raise Unauthenticated("a client certificate issued by the control plane is required",
                              code="CLIENT_CERT_REQUIRED")
    cn = ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
    serial = cert.get("serialNumber")
    if not cn or not serial:
        raise Unauthenticated("client certificate lacks a subject CN or serial", code="INVALID_CLIENT_CERT")
    request[AGENT] = ident = AgentIdentity(cn=cn, serial=serial_hex(int(serial, 16)))
    return ident
