"""HTTP adapter (aiohttp): routing, decoding, authentication, errors and metrics.

Why aiohttp: it runs on asyncio and exposes the TLS transport, so the verified
peer certificate (chain already checked by OpenSSL against the control-plane
CA) is available to identify agents. Every response that is not a success is
``{"error": {"code", "message"[, "field"]}}``; client mistakes never become a
500 because decoding, size limits and unknown routes are all mapped here.
"""

from __future__ import annotations

import enum
import hashlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nkudo.cp import models, views
from nkudo.cp.domain import AgentState, ExecState, PlanStatus
from nkudo.cp.errors import BadRequest, NotFound, PayloadTooLarge, TooManyRequests, Unauthenticated, status_of
from nkudo.cp.http_limits import LIMITER_KEY, agent_identity, client_address_of, rate_limit_middleware
from nkudo.cp.paging import DEFAULT_LIMIT, MAX_LIMIT
from nkudo.cp.pathparams import path_uuid, vm_path_id
from nkudo.cp.pki import parse_csr
from nkudo.cp.ratelimit import retry_after_header
from nkudo.cp.ratestore import RateLimiter
from nkudo.cp.records import Principal, RequestInfo, stamp
from nkudo.cp.service import ControlPlane
from nkudo.cp.usecases.audit import parse_filter
from nkudo.cp.web.app import build_ui
from nkudo.cp.web.security import is_ui_request, nkudo_error_page
from nkudo.errors import NkudoError
from nkudo.log import get_logger
from nkudo.vmstate import VmStatus
from nkudo.wire import codec
from nkudo.wire import messages as wm
from nkudo.wire.actions import IDENT_PATTERN

log = get_logger("cp.http")
T = TypeVar("T")
E = TypeVar("E", bound=enum.StrEnum)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CP_KEY = web.AppKey("cp", ControlPlane)
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,64}\Z")
_UUID = re.compile(wm.UUID_PATTERN)  # the wire's \Z-anchored pattern: no trailing newline (issue 10 item 2)
_IDENT = re.compile(IDENT_PATTERN)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=codec.encode(obj), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None, route_class: str | None = None) -> web.Response:
    err: dict[str, str] = {"code": code, "message": message}
    if field:
        err["field"] = field
    if route_class:
        err["route_class"] = route_class
    return web.Response(body=codec.encode({"error": err}), status=status, content_type="application/json",
                        headers=headers)


_HTTP_CODES = {400: "BAD_REQUEST", 401: "UNAUTHENTICATED", 403: "FORBIDDEN", 404: "NOT_FOUND",
               405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    cp = request.app[CP_KEY]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    t0 = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except NkudoError as exc:
        status = status_of(exc)
        if status >= 500:
            log.error("request failed", route=route, code=exc.code, error=exc.message)
        if is_ui_request(request):  # e.g. the rate limiter's 429 on a dashboard page: a page, not JSON
            return nkudo_error_page(request, exc)
        if isinstance(exc, TooManyRequests):
            return error_response(status, exc.code, exc.message, exc.field, route_class=exc.route_class,
                                  headers={"Retry-After": retry_after_header(exc.retry_after)})
        return error_response(status, exc.code, exc.message, exc.field)
    except web.HTTPException as exc:
        status = exc.status
        if status == 413:
            return error_response(413, "PAYLOAD_TOO_LARGE", "request body is too large")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(status, _HTTP_CODES.get(status, "HTTP_ERROR"), exc.reason, headers=headers)
    except Exception:
        log.exception("internal error", route=route, method=request.method)
        return error_response(500, "INTERNAL", "internal error")
    finally:
        cp.metrics.observe_request(request.method, route, status, time.perf_counter() - t0)


async def read_body(request: web.Request, type_: type[T]) -> T:
    max_size = request.app[CP_KEY].s.max_body_bytes
    if request.content_length is not None and request.content_length > max_size:
        raise PayloadTooLarge(f"request body exceeds {max_size} bytes")
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {max_size} bytes")
    if not data.strip():
        raise BadRequest("request body must be a JSON object")
    return codec.decode(data, type_)


def request_info(request: web.Request) -> RequestInfo:
    """Request id and source address for the audit log.

    A client's ``X-Request-ID`` is kept only if it is 1-64 printable ASCII characters: header bytes that
    are not UTF-8 arrive as lone surrogates, which PostgreSQL cannot store (a 500 before), and control
    characters do not belong in a log or audit record. Anything else gets a fresh id.
    """
    rid = request.headers.get("X-Request-ID", "").strip()
    if not _REQUEST_ID.match(rid):
        rid = str(uuid.uuid4())
    peer = request.transport.get_extra_info("peername") if request.transport else None
    ip = peer[0] if isinstance(peer, tuple) and peer else None
    return RequestInfo(request_id=rid, source_ip=ip)


async def principal(request: web.Request) -> Principal:
    cp = request.app[CP_KEY]
    return await cp.access.authenticate(request.headers.get("X-Admin-Key"), request.headers.get("X-API-Key"),
                                        client_address_of(request), request_info(request))


def query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer", field=name)
    if not lo <= v <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}", field=name)
    return v


def query_uuid(request: web.Request, name: str) -> str | None:
    """An optional id in the query string (a 400 naming it when it is not a UUID)."""
    raw = request.query.get(name)
    if raw is not None and not _UUID.match(raw):
        raise BadRequest(f"{name} must be a UUID", field=name)
    return raw


def query_enum(request: web.Request, name: str, type_: type[E]) -> E | None:
    """An optional query parameter that must be one of an enum's values (a 400 naming them otherwise)."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return type_(raw)
    except ValueError:
        raise BadRequest(f"{name} must be one of {', '.join(sorted(m.value for m in type_))}", field=name)


def query_ident(request: web.Request, name: str) -> str | None:
    """An optional VM or action identifier in the query string (the wire's pattern; a 400 naming it otherwise)."""
    raw = request.query.get(name)
    if raw is not None and not _IDENT.match(raw):
        raise BadRequest(f"{name} must be 1-64 letters, digits, '.', '_' or '-'", field=name)
    return raw


def page_args(request: web.Request, default: int = DEFAULT_LIMIT) -> tuple[int, str | None]:
    """``limit`` (1..``paging.MAX_LIMIT``) and the opaque ``cursor`` of a list route (issue 13)."""
    return query_int(request, "limit", default, 1, MAX_LIMIT), request.query.get("cursor")


# --- public -----------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return json_response(views.Health(status="ok", time=stamp(request.app[CP_KEY].clock.now())))


async def readyz(request: web.Request) -> web.Response:
    """Readiness: probes (and agents over mTLS) see only ready / not ready; the admin key also sees the checks.

    Why: which dependency failed and its error text help an attacker as much
    as an operator, so they are not public (the original exposed them).
    """
    cp = request.app[CP_KEY]
    key = request.headers.get("X-Admin-Key")
    if key is not None and not await cp.access.admin_key_ok(key, client_address_of(request), request_info(request)):
        raise Unauthenticated("invalid admin key", code="INVALID_ADMIN_KEY")
    return await _readiness(cp, detailed=key is not None)


async def public_readyz(request: web.Request) -> web.Response:
    """``/readyz`` on the plain-HTTP probe listener: never details, and the admin key is not accepted in clear."""
    return await _readiness(request.app[CP_KEY], detailed=False)


async def _readiness(cp: ControlPlane, *, detailed: bool) -> web.Response:
    checks = await cp.crl.readiness()
    ok = all(c.status == "healthy" for c in (checks.database, checks.ca, checks.crl))
    body = views.Readiness(status="ready" if ok else "not ready", checks=checks if detailed else None)
    return json_response(body, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    cp = request.app[CP_KEY]
    key = request.headers.get("X-Admin-Key")
    if key is not None and not await cp.access.admin_key_ok(key, client_address_of(request), request_info(request)):
        key = None  # a wrong admin key is counted towards the lock-out (issue 12); a bearer token may still do
    try:
        cp.access.authorize_metrics(key, request.headers.get("Authorization"))
    except Unauthenticated as exc:
        return error_response(401, exc.code, exc.message, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    await cp.connectivity.refresh_gauges()
    return web.Response(body=generate_latest(cp.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def crl(request: web.Request) -> web.Response:
    cp = request.app[CP_KEY]
    return web.Response(body=await cp.crl.pem(), content_type="application/x-pem-file",
                        headers={"Cache-Control": "max-age=60"})


async def crl_der(request: web.Request) -> web.Response:
    """The CRL in DER, the form RFC 5280 distribution points serve (issue 12): the agent certificates' CDP."""
    return web.Response(body=await request.app[CP_KEY].crl.der(), content_type="application/pkix-crl",
                        headers={"Cache-Control": "max-age=60"})


async def get_quota(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].quotas.get_quota(p, path_uuid(request, "tenant_id")))


async def set_quota(request: web.Request) -> web.Response:
    p = await principal(request)
    tid = path_uuid(request, "tenant_id")
    body = await read_body(request, models.QuotaUpdate)
    return json_response(await request.app[CP_KEY].quotas.set_quota(p, tid, body, request_info(request)))


# --- tenant / admin ---------------------------------------------------------


async def create_tenant(request: web.Request) -> web.Response:
    p = await principal(request)
    body = await read_body(request, models.TenantCreate)
    return json_response(await request.app[CP_KEY].tenancy.create_tenant(p, body, request_info(request)), 201)


async def list_tenants(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].tenancy.list_tenants(p))


async def create_api_key(request: web.Request) -> web.Response:
    p = await principal(request)
    tid = path_uuid(request, "tenant_id")
    body = await read_body(request, models.ApiKeyCreate)
    return json_response(await request.app[CP_KEY].access.create_api_key(p, tid, body, request_info(request)), 201)


async def list_api_keys(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].access.list_api_keys(p, path_uuid(request, "tenant_id")))


async def revoke_api_key(request: web.Request) -> web.Response:
    p = await principal(request)
    await request.app[CP_KEY].access.revoke_api_key(p, path_uuid(request, "tenant_id"), path_uuid(request, "key_id"),
                                             request_info(request))
    return web.Response(status=204)


async def create_site(request: web.Request) -> web.Response:
    p = await principal(request)
    tid = path_uuid(request, "tenant_id")
    body = await read_body(request, models.SiteCreate)
    return json_response(await request.app[CP_KEY].tenancy.create_site(p, tid, body, request_info(request)), 201)


async def list_sites(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].tenancy.list_sites(p, path_uuid(request, "tenant_id")))


async def issue_token(request: web.Request) -> web.Response:
    p = await principal(request)
    tid = path_uuid(request, "tenant_id")
    body = await read_body(request, models.TokenCreate)
    return json_response(await request.app[CP_KEY].enrollment.issue_token(p, tid, body, request_info(request)), 201)


async def list_tokens(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].enrollment.list_tokens(p, path_uuid(request, "tenant_id")))


async def list_audit(request: web.Request) -> web.Response:
    p, f = await principal(request), parse_filter(request.query, admin=False)
    return json_response(await request.app[CP_KEY].audit.list_audit(p, path_uuid(request, "tenant_id"), f.limit, f))


async def admin_audit_events(request: web.Request) -> web.Response:
    p, f = await principal(request), parse_filter(request.query, admin=True)
    return json_response(await request.app[CP_KEY].audit.list_events(p, f))


async def admin_audit_verify(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].audit.verify(p, query_uuid(request, "tenant_id")))


async def admin_audit_checkpoint(request: web.Request) -> web.Response:
    return json_response(await request.app[CP_KEY].audit.checkpoint_now(await principal(request)))


async def create_plan(request: web.Request) -> web.Response:
    p = await principal(request)
    sid = path_uuid(request, "site_id")
    body = await read_body(request, models.PlanCreate)
    out = await request.app[CP_KEY].plans.create_plan(p, sid, body, request_info(request))
    return json_response(out, 200 if out.deduplicated else 201)


async def get_plan(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].plans.get_plan(p, path_uuid(request, "plan_id")))


async def cancel_plan(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].plans.cancel_plan(p, path_uuid(request, "plan_id"),
                                                               request_info(request)))


async def list_plans(request: web.Request) -> web.Response:
    p, (limit, cursor) = await principal(request), page_args(request)
    sid, status = path_uuid(request, "site_id"), query_enum(request, "status", PlanStatus)
    return json_response(await request.app[CP_KEY].plans.list_plans(p, sid, limit=limit, cursor=cursor, status=status))


async def list_hosts(request: web.Request) -> web.Response:
    p, (limit, cursor) = await principal(request), page_args(request)
    sid = path_uuid(request, "site_id")
    return json_response(await request.app[CP_KEY].inventory.list_hosts(p, sid, limit=limit, cursor=cursor))


async def list_vms(request: web.Request) -> web.Response:
    p, (limit, cursor) = await principal(request), page_args(request)
    sid, state = path_uuid(request, "site_id"), query_enum(request, "state", VmStatus)
    return json_response(await request.app[CP_KEY].inventory.list_vms(p, sid, limit=limit, cursor=cursor, state=state))


async def vm_console(request: web.Request) -> web.Response:
    p = await principal(request)
    vm_id, site_id = vm_path_id(request), query_uuid(request, "site_id")
    lines = query_int(request, "lines", 100, 1, wm.MAX_CONSOLE_LINES)
    return json_response(await request.app[CP_KEY].consoles.get(p, vm_id, site_id, lines))


async def tenant_overview(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].overview.tenant_overview(p, path_uuid(request, "tenant_id")))


async def site_status(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].overview.site_status(p, path_uuid(request, "site_id")))


async def vm_detail(request: web.Request) -> web.Response:
    p = await principal(request)
    site_id, vm_id = path_uuid(request, "site_id"), vm_path_id(request)
    return json_response(await request.app[CP_KEY].overview.vm_detail(p, site_id, vm_id))


async def list_agents(request: web.Request) -> web.Response:
    p, (limit, cursor) = await principal(request), page_args(request)
    sid, state = path_uuid(request, "site_id"), query_enum(request, "state", AgentState)
    return json_response(await request.app[CP_KEY].inventory.list_agents(p, sid, limit=limit, cursor=cursor,
                                                                         state=state))


async def list_executions(request: web.Request) -> web.Response:
    p, (limit, cursor) = await principal(request), page_args(request)
    sid, state = path_uuid(request, "site_id"), query_enum(request, "state", ExecState)
    plan_id, vm_id = query_uuid(request, "plan_id"), query_ident(request, "vm_id")
    return json_response(await request.app[CP_KEY].executions.list_executions(
        p, sid, state, limit, cursor=cursor, plan_id=plan_id, vm_id=vm_id))


async def get_execution(request: web.Request) -> web.Response:
    p = await principal(request)
    return json_response(await request.app[CP_KEY].executions.get_execution(p, path_uuid(request, "execution_id")))


async def execution_logs(request: web.Request) -> web.Response:
    p = await principal(request)
    eid = path_uuid(request, "execution_id")
    after = query_int(request, "after_seq", -1, -1, 2**62)
    limit, cursor = page_args(request, 500)
    return json_response(await request.app[CP_KEY].executions.execution_logs(p, eid, after, limit, cursor=cursor))


# --- agent (mTLS) ---------------------------------------------------------


async def enroll(request: web.Request) -> web.Response:
    """Enroll a host; every refusal is logged with the source address and reason code (never the token).

    Why: this route is unauthenticated, so a token-guessing run must leave a trace. The log's repeat
    summariser turns a flood from one source into one line per window with a count.
    """
    info = request_info(request)
    try:
        req = await read_body(request, wm.EnrollRequest)
        csr = parse_csr(req.csr_pem)  # before the token is looked at: a bad CSR never burns a token
        return json_response(await request.app[CP_KEY].enrollment.enroll(req, csr, info,
                                                                         client_address_of(request)))
    except NkudoError as exc:
        log.warn("enrollment refused", source=info.source_ip, reason=exc.code)
        await request.app[CP_KEY].audit.record_refused_enrollment(info, exc.code)
        raise


async def heartbeat(request: web.Request) -> web.Response:
    ident = agent_identity(request)
    req = await read_body(request, wm.HeartbeatRequest)
    vm_digest = hashlib.sha256(codec.encode(req.vms)).hexdigest()
    facts_digest = hashlib.sha256(codec.encode(req.host_facts)).hexdigest() if req.host_facts else None
    return json_response(await request.app[CP_KEY].heartbeats.heartbeat(ident, req, vm_digest, facts_digest))


async def plans_next(request: web.Request) -> web.Response:
    ident = agent_identity(request)
    return json_response(await request.app[CP_KEY].heartbeats.next_plans(ident))


async def results(request: web.Request) -> web.Response:
    ident = agent_identity(request)
    req = await read_body(request, wm.ResultReport)
    return json_response(await request.app[CP_KEY].executions.report_results(ident, req, request_info(request)), 202)


async def logs(request: web.Request) -> web.Response:
    ident = agent_identity(request)
    req = await read_body(request, wm.LogBatch)
    return json_response(await request.app[CP_KEY].executions.ingest_logs(ident, req), 202)


async def unenroll(request: web.Request) -> web.Response:
    ident = agent_identity(request)
    data = await request.read()
    req = codec.decode(data, wm.UnenrollRequest) if data.strip() else wm.UnenrollRequest()
    await request.app[CP_KEY].credentials.unenroll(ident, req, request_info(request))
    return web.Response(status=204)


async def renew(request: web.Request) -> web.Response:
    ident = agent_identity(request)
    req = await read_body(request, wm.RenewRequest)
    csr = parse_csr(req.csr_pem)
    return json_response(await request.app[CP_KEY].credentials.renew(ident, req, csr, request_info(request)))


#: (method, path, handler). The OpenAPI test checks this table against openapi.yaml.
ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics),
    ("GET", "/v1/crl.pem", crl),
    ("GET", "/v1/crl", crl_der),
    ("POST", "/tenants", create_tenant),
    ("GET", "/tenants", list_tenants),
    ("POST", "/tenants/{tenant_id}/api-keys", create_api_key),
    ("GET", "/tenants/{tenant_id}/api-keys", list_api_keys),
    ("DELETE", "/tenants/{tenant_id}/api-keys/{key_id}", revoke_api_key),
    ("POST", "/tenants/{tenant_id}/sites", create_site),
    ("GET", "/tenants/{tenant_id}/sites", list_sites),
    ("POST", "/tenants/{tenant_id}/enrollment-tokens", issue_token),
    ("GET", "/tenants/{tenant_id}/enrollment-tokens", list_tokens),
    ("GET", "/tenants/{tenant_id}/audit-events", list_audit),
    ("GET", "/tenants/{tenant_id}/quota", get_quota),
    ("PATCH", "/tenants/{tenant_id}/quota", set_quota),
    ("GET", "/admin/audit/events", admin_audit_events),
    ("POST", "/admin/audit/verify", admin_audit_verify),
    ("POST", "/admin/audit/checkpoint", admin_audit_checkpoint),
    ("POST", "/sites/{site_id}/plans", create_plan),
    ("GET", "/sites/{site_id}/plans", list_plans),  # issue 13
    ("GET", "/sites/{site_id}/hosts", list_hosts),
    ("GET", "/sites/{site_id}/vms", list_vms),
    ("GET", "/sites/{site_id}/agents", list_agents),
    ("GET", "/tenants/{tenant_id}/overview", tenant_overview),  # issue 13
    ("GET", "/sites/{site_id}/status", site_status),
    ("GET", "/sites/{site_id}/vms/{vm_id}", vm_detail),
    ("GET", "/vms/{vm_id}/console", vm_console),
    ("GET", "/sites/{site_id}/executions", list_executions),
    ("GET", "/plans/{plan_id}", get_plan),
    ("POST", "/plans/{plan_id}/cancel", cancel_plan),
    ("GET", "/executions/{execution_id}", get_execution),
    ("GET", "/executions/{execution_id}/logs", execution_logs),
    ("POST", "/v1/enroll", enroll),
    ("POST", "/v1/heartbeat", heartbeat),
    ("GET", "/v1/plans/next", plans_next),
    ("POST", "/v1/executions/result", results),
    ("POST", "/v1/logs", logs),
    ("POST", "/v1/unenroll", unenroll),
    ("POST", "/v1/renew", renew),
]


async def probe_not_found(request: web.Request) -> web.Response:
    raise NotFound("the probe listener serves only GET /healthz and GET /readyz", code="NOT_FOUND")


#: The plain-HTTP probe listener (``--health-listen``): liveness and detail-free readiness, nothing else.
HEALTH_ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", public_readyz),
]


def build_health_app(cp: ControlPlane) -> web.Application:
    """Why a second app: probes that cannot do TLS (kubelet httpGet, simple LBs) must not get any API route."""
    app = web.Application(middlewares=[error_middleware], client_max_size=1024)
    app[CP_KEY] = cp
    for method, path, handler in HEALTH_ROUTES:
        app.router.add_route(method, path, handler)
    # Registered last: any other method or path (including POST /healthz) is a 404, not a 405 hinting at routes.
    app.router.add_route("*", "/{tail:.*}", probe_not_found)
    return app


def build_app(cp: ControlPlane) -> web.Application:
    limiter = RateLimiter(cp.s.rate_limits, cp.metrics, cp.db.url if cp.db.is_pg else None,
                          proxies=cp.s.trusted_proxies)
    app = web.Application(middlewares=[error_middleware, rate_limit_middleware], client_max_size=cp.s.max_body_bytes)
    app[CP_KEY] = cp
    app[LIMITER_KEY] = limiter
    app.cleanup_ctx.append(limiter.lifecycle)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    if cp.s.ui_enabled:  # issue 13: the dashboard, on the same listener (its errors are HTML pages)
        app.add_subapp("/ui/", build_ui(cp))
    return app

