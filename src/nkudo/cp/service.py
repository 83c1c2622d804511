"""Control-plane operations: each public method is one database transaction.

The HTTP adapter decodes and authenticates, then calls one of these; every
method runs its SQL in a worker thread through ``Database.run`` and asks
``nkudo.cp.domain`` for every decision (authorisation, transitions, status
rollups). Things that must happen once across several replicas rely on the
database: conditional updates (token consumption, result transitions), row
locks with ``SKIP LOCKED`` (plan leasing on PostgreSQL; SQLite serialises
writers with ``BEGIN IMMEDIATE``), and unique constraints (serials, token
hashes, idempotency keys, log sequences).

The one read outside a transaction is the heartbeat's authorisation read: a single statement, batched
across concurrent heartbeats (``nkudo.cp.batching``) and run with ``Database.select``; any heartbeat that
has something to write still runs in its own transaction and re-authorises there.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Row

from nkudo.cp import domain
from nkudo.cp import schema as t
from nkudo.cp.batching import Coalescer
from nkudo.cp.config import Settings, check_admin_key, presented_secret
from nkudo.cp.db import Database
from nkudo.cp.domain import AgentState, ExecState, PlanStatus
from nkudo.cp.errors import Conflict, NotFound, Unauthenticated
from nkudo.cp.metrics import Metrics
from nkudo.cp.models import ApiKeyCreate, PlanCreate, SiteCreate, TenantCreate, TokenCreate
from nkudo.cp.pki import CertificateAuthority
from nkudo.log import get_logger
from nkudo.wire import actions as wa
from nkudo.wire import codec
from nkudo.wire import messages as wm

log = get_logger("cp.service")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso(v: dt.datetime | None) -> str | None:
    return None if v is None else v.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def sha256_hex(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def new_id() -> str:
    return str(uuid.uuid4())


def rand_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who calls a tenant route: the admin (every tenant) or an API key (its tenant only)."""

    kind: Literal["admin", "api_key"]
    tenant_id: str | None = None
    key_id: str | None = None

    @property
    def actor(self) -> tuple[str, str | None]:
        return ("ADMIN", None) if self.kind == "admin" else ("API_KEY", self.key_id)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    request_id: str | None = None
    source_ip: str | None = None


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """The verified client certificate's identity (CN and serial in canonical hex)."""

    cn: str
    serial: str


def _audit(
    conn: Connection, info: RequestInfo, *, actor: tuple[str, str | None], action: str, tenant_id: str | None,
    object_type: str, object_id: str, now: dt.datetime, details: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        t.audit_events.insert().values(
            tenant_id=tenant_id, actor_type=actor[0], actor_id=actor[1], action=action,
            object_type=object_type, object_id=object_id, request_id=info.request_id,
            source_ip=info.source_ip, details=details or {}, occurred_at=now,
        )
    )


# --- serialisers -------------------------------------------------------------


def tenant_json(r: Row[Any]) -> dict[str, Any]:
    return {"id": r.id, "slug": r.slug, "name": r.name, "created_at": iso(r.created_at)}


def site_json(r: Row[Any]) -> dict[str, Any]:
    out = {"id": r.id, "tenant_id": r.tenant_id, "name": r.name, "connectivity_state": r.connectivity_state,
           "created_at": iso(r.created_at)}
    if r.external_key is not None:
        out["external_key"] = r.external_key
    return out


def execution_json(r: Row[Any]) -> dict[str, Any]:
    return {
        "id": r.id, "plan_id": r.plan_id, "tenant_id": r.tenant_id, "site_id": r.site_id,
        "position": r.position, "action_id": r.action_id, "type": r.action_type, "params": r.params,
        "timeout_seconds": r.timeout_seconds, "vm_id": r.vm_id, "state": r.state, "agent_id": r.agent_id,
        "attempts": r.attempts, "error_code": r.error_code, "error_message": r.error_message,
        "created_at": iso(r.created_at), "updated_at": iso(r.updated_at), "started_at": iso(r.started_at),
        "finished_at": iso(r.finished_at),
    }


def plan_json(p: Row[Any], execs: list[Row[Any]], deduplicated: bool = False) -> dict[str, Any]:
    return {
        "plan_id": p.id, "tenant_id": p.tenant_id, "site_id": p.site_id, "idempotency_key": p.idempotency_key,
        "plan_status": p.status, "deduplicated": deduplicated, "created_at": iso(p.created_at),
        "updated_at": iso(p.updated_at), "completed_at": iso(p.completed_at),
        "leased_by_agent_id": p.leased_by_agent_id, "lease_expires_at": iso(p.lease_expires_at),
        "executions": [execution_json(e) for e in execs],
    }


_a, _p, _x = t.agents.c, t.plans.c, t.executions.c
_B = sa.bindparam
#: Hot-path statements are built once: constructing SQLAlchemy expressions per heartbeat cost more CPU
#: than executing them. ``status = a OR status = b`` instead of ``IN`` avoids per-call expanding parameters.
_SEL_AGENT = sa.select(t.agents).where(_a.id == _B("agent_id"))
_LEASABLE = sa.or_(_p.leased_by_agent_id.is_(None), _p.leased_by_agent_id == _a.id, _p.lease_expires_at < _B("now"))
#: The heartbeat's agent row plus "is there anything this agent could lease?", so that the (locking) lease
#: query only runs when there is work: one statement instead of two on the common, idle path.
_HAS_WORK = sa.exists().where(
    _p.site_id == _a.site_id, sa.or_(_p.status == PlanStatus.PENDING.value, _p.status == PlanStatus.IN_PROGRESS.value),
    _LEASABLE,
).label("has_work")
_SEL_AGENT_HB = sa.select(t.agents, _HAS_WORK).where(_a.id == _B("agent_id"))
#: The same for every agent in a batch of concurrent heartbeats (see ``nkudo.cp.batching``), reduced to the
#: columns the authorisation and the "does this heartbeat change anything?" decision need.
_HB_COLUMNS = (_a.id, _a.state, _a.cert_serial, _a.prev_cert_serial, _a.prev_serial_valid_until, _a.vm_digest,
               _a.facts_digest, _a.agent_version, _HAS_WORK)
_SEL_AGENTS_HB = sa.select(*_HB_COLUMNS).where(_a.id.in_(_B("agent_ids", expanding=True)))
#: PostgreSQL: ``= ANY(array)`` keeps one SQL text whatever the batch size, so the driver prepares it once.
_SEL_AGENTS_HB_PG = sa.select(*_HB_COLUMNS).where(
    _a.id == sa.any_(_B("agent_ids", type_=postgresql.ARRAY(sa.String()))))
_HB_TOUCH = t.agents.update().where(_a.id == _B("agent_id")).values(
    last_heartbeat_at=_B("now"), heartbeat_seq=_B("seq"))
_LEASE_CANDIDATES = (
    sa.select(_p.id)
    .where(_p.site_id == _B("site_id"),
           sa.or_(_p.status == PlanStatus.PENDING.value, _p.status == PlanStatus.IN_PROGRESS.value),
           sa.or_(_p.leased_by_agent_id.is_(None), _p.leased_by_agent_id == _B("me"), _p.lease_expires_at < _B("now")))
    .order_by(sa.case((_p.leased_by_agent_id == _B("me2"), 0), else_=1), _p.created_at, _p.id)
    .limit(_B("lim"))
)
_LEASE_CANDIDATES_PG = _LEASE_CANDIDATES.with_for_update(of=t.plans, skip_locked=True)


def _vm_upsert(db: Database) -> Any:
    """The upsert of an agent's reported VMs, built once per process.

    Building this statement (dialect insert, ``excluded``, four ``CASE``) on every heartbeat that changed a
    VM cost ~1.4 ms of CPU, more than executing it. It is run as an executemany (psycopg pipelines it);
    measured, that is cheaper on PostgreSQL than one multi-row "insertmanyvalues" statement, whose long SQL
    text the driver re-parses on every call.
    """
    ins = db.insert(t.vms)
    ex, v = ins.excluded, t.vms.c
    return ins.on_conflict_do_update(
        index_elements=[v.site_id, v.vm_id],
        set_={
            "host_id": ex.host_id, "state": ex.state, "updated_at": ex.updated_at,
            "name": sa.case((ex.name != ex.vm_id, ex.name), else_=v.name),
            "vcpus": sa.case((ex.vcpus > 0, ex.vcpus), else_=v.vcpus),
            "memory_mib": sa.case((ex.memory_mib > 0, ex.memory_mib), else_=v.memory_mib),
            "last_transition_at": sa.case((v.state != ex.state, ex.last_transition_at), else_=v.last_transition_at),
        },
    )


class ControlPlane:
    """The control plane's use cases over one database, one CA and one set of metrics."""

    def __init__(self, settings: Settings, db: Database, ca: CertificateAuthority, admin_key: str,
                 metrics: Metrics | None = None) -> None:
        self.s = settings
        self.db = db
        self.ca = ca
        # Refused here too (not only at start-up): whatever builds a ControlPlane, an empty or weak
        # root credential must not become one that an empty header matches.
        self._admin_key = check_admin_key(admin_key, "the admin key").encode()
        self.metrics = metrics or Metrics()
        # Write-behind of "agent X was seen at T with seq S" for heartbeats that change nothing else:
        # flushed in one batch every ``flush_interval`` (well under the offline threshold) instead of one
        # write transaction per heartbeat.
        self._seen: dict[str, tuple[dt.datetime, int]] = {}
        self.flush_interval = min(1.0, settings.offline_after / 4)
        self._hb_agents: Coalescer[str, Row[Any]] = Coalescer(self._read_hb_agents)
        self._vm_upsert = _vm_upsert(db)
        token = presented_secret(settings.metrics_token)
        self._metrics_token = token.encode() if token is not None else None
        self._crl: _CrlCache | None = None

    # --- authentication of tenant routes ---------------------------------------

    async def authenticate(self, admin_key: str | None, api_key: str | None) -> Principal:
        """The principal behind the request's ``X-Admin-Key`` / ``X-API-Key`` headers.

        A header that is sent is checked even when it is empty: an empty or whitespace-only key is no
        credential (``presented_secret``) and is refused, never compared.
        """
        if admin_key is not None:
            if self.is_admin_key(admin_key):
                return Principal("admin")
            raise Unauthenticated("invalid admin key", code="INVALID_ADMIN_KEY")
        if api_key is not None:
            key = presented_secret(api_key)
            row = None if key is None else await self.db.run(self._api_key_tx, sha256_hex(key), now_utc())
            if row is None:
                raise Unauthenticated("invalid, expired or revoked API key", code="INVALID_API_KEY")
            return Principal("api_key", tenant_id=row[0], key_id=row[1])
        raise Unauthenticated("X-Admin-Key or X-API-Key header required", code="UNAUTHENTICATED")

    def is_admin_key(self, admin_key: str) -> bool:
        """Constant-time check of a presented admin key (no early exit that would leak a prefix match).

        An empty presented key is refused before any comparison, so an empty configured key (which
        ``__init__`` refuses anyway) could never be matched by an empty header.
        """
        key = presented_secret(admin_key)
        return key is not None and hmac.compare_digest(key.encode(), self._admin_key)

    def authorize_metrics(self, admin_key: str | None, authorization: str | None) -> None:
        """``/metrics`` needs the admin key or ``Authorization: Bearer <metrics token>``.

        Why: counters reveal tenant activity and agent counts; the original
        served them to anyone. A separate token lets a scraper in without the
        root credential. Both comparisons are constant-time; empty values never match.
        """
        if admin_key is not None and self.is_admin_key(admin_key):
            return
        if authorization is not None and self._metrics_token is not None:
            scheme, _, token = authorization.strip().partition(" ")
            presented = presented_secret(token)
            if (scheme.lower() == "bearer" and presented is not None
                    and hmac.compare_digest(presented.encode(), self._metrics_token)):
                return
        raise Unauthenticated("X-Admin-Key or a metrics bearer token is required", code="UNAUTHENTICATED")

    @staticmethod
    def _api_key_tx(conn: Connection, key_hash: str, now: dt.datetime) -> tuple[str, str] | None:
        k = t.api_keys.c
        r = conn.execute(
            sa.select(k.tenant_id, k.id).where(
                k.key_hash == key_hash, k.revoked_at.is_(None), sa.or_(k.expires_at.is_(None), k.expires_at > now)
            )
        ).first()
        return None if r is None else (r[0], r[1])

    @staticmethod
    def _require_admin(p: Principal) -> None:
        if p.kind != "admin":
            raise Unauthenticated("this operation needs the admin key", code="ADMIN_REQUIRED")

    @staticmethod
    def _tenant_visible(conn: Connection, p: Principal, tenant_id: str) -> Row[Any]:
        """The tenant row if ``p`` may see it; foreign or unknown ids are the same 404."""
        row = conn.execute(sa.select(t.tenants).where(t.tenants.c.id == tenant_id)).first()
        if row is None or not domain.tenant_visible(p.tenant_id, row.id):
            raise NotFound("tenant not found", code="TENANT_NOT_FOUND")
        return row

    @staticmethod
    def _site_visible(conn: Connection, p: Principal, site_id: str) -> Row[Any]:
        q = sa.select(t.sites).where(t.sites.c.id == site_id)
        row = conn.execute(q).first()
        if row is None or not domain.tenant_visible(p.tenant_id, row.tenant_id):
            raise NotFound("site not found", code="SITE_NOT_FOUND")
        return row

    # --- tenants, keys, sites, tokens -----------------------------------------

    async def create_tenant(self, p: Principal, body: TenantCreate, info: RequestInfo) -> dict[str, Any]:
        self._require_admin(p)
        return await self.db.run(self._create_tenant_tx, p, body, info)

    def _create_tenant_tx(self, conn: Connection, p: Principal, body: TenantCreate, info: RequestInfo
                          ) -> dict[str, Any]:
        now = now_utc()
        tid = new_id()
        if conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.slug == body.slug)).first():
            raise Conflict(f"tenant slug {body.slug!r} already exists", code="TENANT_EXISTS", field="slug")
        conn.execute(t.tenants.insert().values(id=tid, slug=body.slug, name=body.name, created_at=now))
        _audit(conn, info, actor=p.actor, action="tenant.create", tenant_id=tid, object_type="tenant",
               object_id=tid, now=now, details={"slug": body.slug})
        return tenant_json(conn.execute(sa.select(t.tenants).where(t.tenants.c.id == tid)).one())

    async def list_tenants(self, p: Principal) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            q = sa.select(t.tenants).order_by(t.tenants.c.created_at.desc(), t.tenants.c.id)
            if p.tenant_id is not None:
                q = q.where(t.tenants.c.id == p.tenant_id)
            return {"tenants": [tenant_json(r) for r in conn.execute(q)]}

        return await self.db.run(tx)

    async def create_api_key(self, p: Principal, tenant_id: str, body: ApiKeyCreate, info: RequestInfo
                             ) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._tenant_visible(conn, p, tenant_id)
            now = now_utc()
            kid, key = new_id(), "nk_" + rand_token()
            exp = now + dt.timedelta(seconds=body.expires_in_seconds) if body.expires_in_seconds else None
            conn.execute(t.api_keys.insert().values(id=kid, tenant_id=tenant_id, name=body.name,
                                                    key_hash=sha256_hex(key), created_at=now, expires_at=exp))
            _audit(conn, info, actor=p.actor, action="api_key.create", tenant_id=tenant_id, object_type="api_key",
                   object_id=kid, now=now, details={"name": body.name})
            return {"id": kid, "tenant_id": tenant_id, "name": body.name, "api_key": key,
                    "created_at": iso(now), "expires_at": iso(exp)}

        return await self.db.run(tx)

    async def list_api_keys(self, p: Principal, tenant_id: str) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._tenant_visible(conn, p, tenant_id)
            k = t.api_keys.c
            rows = conn.execute(sa.select(t.api_keys).where(k.tenant_id == tenant_id, k.revoked_at.is_(None))
                                .order_by(k.created_at.desc(), k.id))
            return {"api_keys": [{"id": r.id, "tenant_id": r.tenant_id, "name": r.name,
                                  "created_at": iso(r.created_at), "expires_at": iso(r.expires_at)} for r in rows]}

        return await self.db.run(tx)

    async def revoke_api_key(self, p: Principal, tenant_id: str, key_id: str, info: RequestInfo) -> None:
        def tx(conn: Connection) -> None:
            self._tenant_visible(conn, p, tenant_id)
            now = now_utc()
            k = t.api_keys.c
            res = conn.execute(t.api_keys.update().where(k.id == key_id, k.tenant_id == tenant_id,
                                                         k.revoked_at.is_(None)).values(revoked_at=now))
            if res.rowcount != 1:
                raise NotFound("api key not found", code="API_KEY_NOT_FOUND")
            _audit(conn, info, actor=p.actor, action="api_key.revoke", tenant_id=tenant_id, object_type="api_key",
                   object_id=key_id, now=now)

        await self.db.run(tx)

    async def create_site(self, p: Principal, tenant_id: str, body: SiteCreate, info: RequestInfo
                          ) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._tenant_visible(conn, p, tenant_id)
            now = now_utc()
            s = t.sites.c
            if conn.execute(sa.select(s.id).where(s.tenant_id == tenant_id, s.name == body.name)).first():
                raise Conflict(f"site {body.name!r} already exists", code="SITE_EXISTS", field="name")
            sid = new_id()
            conn.execute(t.sites.insert().values(id=sid, tenant_id=tenant_id, name=body.name,
                                                 external_key=body.external_key, connectivity_state="OFFLINE",
                                                 created_at=now))
            _audit(conn, info, actor=p.actor, action="site.create", tenant_id=tenant_id, object_type="site",
                   object_id=sid, now=now, details={"name": body.name})
            return site_json(conn.execute(sa.select(t.sites).where(s.id == sid)).one())

        return await self.db.run(tx)

    async def list_sites(self, p: Principal, tenant_id: str) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._tenant_visible(conn, p, tenant_id)
            s = t.sites.c
            rows = conn.execute(sa.select(t.sites).where(s.tenant_id == tenant_id).order_by(s.created_at.desc(), s.id))
            return {"sites": [site_json(r) for r in rows]}

        return await self.db.run(tx)

    async def issue_token(self, p: Principal, tenant_id: str, body: TokenCreate, info: RequestInfo
                          ) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._tenant_visible(conn, p, tenant_id)
            site = conn.execute(sa.select(t.sites).where(t.sites.c.id == body.site_id)).first()
            if site is None or site.tenant_id != tenant_id:
                raise NotFound("site not found", code="SITE_NOT_FOUND", field="site_id")
            now = now_utc()
            ttl = body.expires_in_seconds or self.s.enrollment_token_ttl
            tok, tid = rand_token(), new_id()
            exp = now + dt.timedelta(seconds=ttl)
            conn.execute(t.enrollment_tokens.insert().values(id=tid, tenant_id=tenant_id, site_id=site.id,
                                                             token_hash=sha256_hex(tok), created_at=now,
                                                             expires_at=exp))
            _audit(conn, info, actor=p.actor, action="enrollment_token.issue", tenant_id=tenant_id,
                   object_type="enrollment_token", object_id=tid, now=now, details={"site_id": site.id})
            return {"token_id": tid, "site_id": site.id, "token": tok, "expires_at": iso(exp), "one_time": True}

        return await self.db.run(tx)

    async def list_tokens(self, p: Principal, tenant_id: str) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._tenant_visible(conn, p, tenant_id)
            e, s = t.enrollment_tokens.c, t.sites.c
            rows = conn.execute(
                sa.select(t.enrollment_tokens, s.name.label("site_name"))
                .join(t.sites, s.id == e.site_id)
                .where(e.tenant_id == tenant_id).order_by(e.created_at.desc(), e.id)
            )
            return {"tokens": [{
                "id": r.id, "site_id": r.site_id, "site_name": r.site_name, "created_at": iso(r.created_at),
                "expires_at": iso(r.expires_at), "consumed": r.used_at is not None, "consumed_at": iso(r.used_at),
                "consumed_by_agent_id": r.used_by_agent_id,
            } for r in rows]}

        return await self.db.run(tx)

    # --- enrollment ------------------------------------------------------------

    async def enroll(self, req: wm.EnrollRequest, csr: x509.CertificateSigningRequest, info: RequestInfo
                     ) -> wm.EnrollResponse:
        """Enroll a host. The CSR was validated by the caller, so a bad CSR never burns the token."""
        try:
            out = await self.db.run(self._enroll_tx, req, csr, info)
        except Exception as exc:
            self.metrics.enrollments.labels(getattr(exc, "code", "ERROR")).inc()
            raise
        self.metrics.enrollments.labels("OK").inc()
        return out

    def _enroll_tx(self, conn: Connection, req: wm.EnrollRequest, csr: x509.CertificateSigningRequest,
                   info: RequestInfo) -> wm.EnrollResponse:
        now = now_utc()
        e = t.enrollment_tokens.c
        tok = conn.execute(sa.select(t.enrollment_tokens).where(e.token_hash == sha256_hex(req.enrollment_token))
                           ).first()
        if tok is None:
            raise Unauthenticated("enrollment token is not valid", code="TOKEN_INVALID", field="enrollment_token")
        if tok.used_at is not None:
            raise Conflict("enrollment token was already used", code="TOKEN_ALREADY_USED", field="enrollment_token")
        if tok.expires_at <= now:
            raise Unauthenticated("enrollment token has expired", code="TOKEN_EXPIRED", field="enrollment_token")
        agent_id = new_id()
        # The conditional update is the single point of truth when two enrollments race for one token:
        # exactly one sees rowcount 1; the other gets TOKEN_ALREADY_USED (PostgreSQL re-checks the WHERE
        # clause after the winner commits; SQLite serialises the transactions).
        res = conn.execute(
            t.enrollment_tokens.update()
            .where(e.id == tok.id, e.used_at.is_(None), e.expires_at > now)
            .values(used_at=now, used_by_agent_id=agent_id)
        )
        if res.rowcount != 1:
            raise Conflict("enrollment token was already used", code="TOKEN_ALREADY_USED", field="enrollment_token")
        h = t.hosts.c
        host = conn.execute(
            sa.select(t.hosts).where(h.site_id == tok.site_id, h.hostname == req.hostname).with_for_update()
        ).first()
        fp = codec.to_builtins(req.host_fingerprint)
        if host is not None and host.current_agent_id is not None:
            # Rolls back the token consumption: the operator can unenroll the old agent and retry.
            raise Conflict(f"host {req.hostname!r} already has an enrolled agent", code="HOST_ALREADY_ENROLLED",
                           field="hostname")
        issued = self.ca.sign_agent(csr, agent_id=agent_id, tenant_id=tok.tenant_id, site_id=tok.site_id,
                                    ttl=dt.timedelta(seconds=self.s.agent_cert_ttl))
        refresh = rand_token()
        if host is None:
            host_id = new_id()
            conn.execute(t.hosts.insert().values(id=host_id, tenant_id=tok.tenant_id, site_id=tok.site_id,
                                                 hostname=req.hostname, fingerprint=fp, created_at=now))
        else:
            host_id = host.id
        conn.execute(t.agents.insert().values(
            id=agent_id, tenant_id=tok.tenant_id, site_id=tok.site_id, host_id=host_id,
            state=AgentState.ONLINE, cert_serial=issued.serial, cert_expires_at=issued.not_after,
            refresh_token_hash=sha256_hex(refresh), agent_version=req.agent_version, os=req.os, arch=req.arch,
            kernel_version=req.kernel_version, heartbeat_seq=0, enrolled_at=now, last_heartbeat_at=now,
        ))
        conn.execute(t.hosts.update().where(h.id == host_id).values(current_agent_id=agent_id, fingerprint=fp))
        conn.execute(t.certificates.insert().values(serial=issued.serial, agent_id=agent_id, issued_at=now,
                                                    expires_at=issued.not_after))
        conn.execute(t.sites.update().where(t.sites.c.id == tok.site_id).values(connectivity_state="ONLINE"))
        _audit(conn, info, actor=("AGENT", agent_id), action="agent.enroll", tenant_id=tok.tenant_id,
               object_type="agent", object_id=agent_id, now=now,
               details={"site_id": tok.site_id, "host_id": host_id, "hostname": req.hostname,
                        "token_id": tok.id, "serial": issued.serial})
        return wm.EnrollResponse(
            agent_id=agent_id, tenant_id=tok.tenant_id, site_id=tok.site_id, host_id=host_id,
            client_certificate_pem=issued.pem, ca_certificate_pem=self.ca.cert_pem, refresh_token=refresh,
            certificate_expires_at=issued.not_after, heartbeat_interval_seconds=self.s.heartbeat_interval,
        )

    # --- agent authentication --------------------------------------------------

    @staticmethod
    def _agent(conn: Connection, ident: AgentIdentity, now: dt.datetime, *, current_only: bool = False,
               heartbeat: bool = False) -> Row[Any]:
        if heartbeat:
            row = conn.execute(_SEL_AGENT_HB, {"agent_id": ident.cn, "now": now}).first()
        else:
            row = conn.execute(_SEL_AGENT, {"agent_id": ident.cn}).first()
        return ControlPlane._authorized(row, ident, now, current_only=current_only)

    @staticmethod
    def _authorized(row: Row[Any] | None, ident: AgentIdentity, now: dt.datetime, *, current_only: bool = False
                    ) -> Row[Any]:
        """``row`` (the agent named by the certificate's CN) if that certificate may act as it, else raise."""
        view = None if row is None else domain.AgentView(
            agent_id=row.id, state=row.state, cert_serial=row.cert_serial,
            prev_cert_serial=None if current_only else row.prev_cert_serial,
            prev_serial_valid_until=row.prev_serial_valid_until,
        )
        denied = domain.authorize_agent(view, ident.cn, ident.serial, now)
        if denied is not None:
            raise Unauthenticated(denied[1], code=denied[0])
        assert row is not None
        return row

    # --- heartbeat and leasing -------------------------------------------------

    async def heartbeat(self, ident: AgentIdentity, req: wm.HeartbeatRequest, vm_digest: str,
                        facts_digest: str | None) -> wm.HeartbeatResponse:
        """Authorise from a fresh read; a heartbeat that changes nothing but "last seen" writes nothing now.

        The read is shared with the heartbeats arriving at the same time (``self._hb_agents``); it still
        starts after this request arrived, so unenroll and revocation by any replica apply at once.
        Everything else (new VM digest or facts, execution updates, an offline agent, work to lease) goes
        through ``_heartbeat_tx``, which re-reads and re-authorises inside its write transaction.
        """
        agent = self._authorized(await self._hb_agents.get(ident.cn), ident, now_utc())
        quiet = (
            agent.state == AgentState.ONLINE and (not agent.has_work or not req.lease) and not req.execution_updates
            and vm_digest == agent.vm_digest and (facts_digest is None or facts_digest == agent.facts_digest)
            and (not req.agent_version or req.agent_version == agent.agent_version)
        )
        if quiet:
            prev = self._seen.get(agent.id)
            if prev is None or prev[1] <= req.heartbeat_seq:
                self._seen[agent.id] = (now_utc(), req.heartbeat_seq)
            plans: list[wm.LeasedPlan] = []
        else:
            plans = await self.db.run(self._heartbeat_tx, ident, req, vm_digest, facts_digest)
        self.metrics.heartbeats.inc()
        return wm.HeartbeatResponse(next_heartbeat_seconds=self.s.heartbeat_interval, pending_plans=plans)

    async def _read_hb_agents(self, agent_ids: list[str]) -> dict[str, Row[Any]]:
        """Authorisation and change-detection columns of a batch of heartbeating agents (one statement)."""
        stmt = _SEL_AGENTS_HB_PG if self.db.is_pg else _SEL_AGENTS_HB
        return {r.id: r for r in await self.db.select(stmt, {"agent_ids": agent_ids, "now": now_utc()})}

    def _flush_seen_tx(self, conn: Connection, seen: dict[str, tuple[dt.datetime, int]]) -> None:
        a = t.agents.c
        conn.execute(
            t.agents.update().where(a.id == _B("aid"), a.state == AgentState.ONLINE.value,
                                    sa.or_(a.last_heartbeat_at.is_(None), a.last_heartbeat_at < _B("seen")))
            .values(last_heartbeat_at=_B("seen"),
                    heartbeat_seq=sa.case((a.heartbeat_seq < _B("seq"), _B("seq2")), else_=a.heartbeat_seq)),
            [{"aid": k, "seen": v[0], "seq": v[1], "seq2": v[1]} for k, v in seen.items()],
        )

    async def flush_seen(self) -> int:
        """Persist buffered "last seen" times (called periodically, before sweeping and at shutdown)."""
        if not self._seen:
            return 0
        seen, self._seen = self._seen, {}
        await self.db.run(self._flush_seen_tx, seen)
        return len(seen)

    def _heartbeat_tx(self, conn: Connection, ident: AgentIdentity, req: wm.HeartbeatRequest, vm_digest: str,
                      facts_digest: str | None) -> list[wm.LeasedPlan]:
        now = now_utc()
        if self.db.is_pg:
            # Losing the last heartbeat timestamp in a crash is harmless; waiting for a WAL flush 1000x/s is not.
            conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
        agent = self._agent(conn, ident, now, heartbeat=True)
        a = t.agents.c
        seq = max(agent.heartbeat_seq, req.heartbeat_seq)
        values: dict[str, Any] = {}
        if req.agent_version and req.agent_version != agent.agent_version:
            values["agent_version"] = req.agent_version
        if agent.state != AgentState.ONLINE:
            values["state"] = AgentState.ONLINE
            conn.execute(t.sites.update().where(t.sites.c.id == agent.site_id).values(connectivity_state="ONLINE"))
            _audit(conn, RequestInfo(), actor=("AGENT", agent.id), action="agent.online",
                   tenant_id=agent.tenant_id, object_type="agent", object_id=agent.id, now=now)
        if facts_digest is not None and facts_digest != agent.facts_digest and req.host_facts is not None:
            values["facts_digest"] = facts_digest
            hv: dict[str, Any] = {"facts": codec.to_builtins(req.host_facts), "last_facts_at": now}
            if req.host_facts.hostname:
                hv["hostname"] = req.host_facts.hostname
            conn.execute(t.hosts.update().where(t.hosts.c.id == agent.host_id).values(**hv))
            if req.host_facts.os:
                values["os"] = req.host_facts.os
            if req.host_facts.arch:
                values["arch"] = req.host_facts.arch
            if req.host_facts.kernel:
                values["kernel_version"] = req.host_facts.kernel
        if vm_digest != agent.vm_digest:
            values["vm_digest"] = vm_digest
            self._sync_vms(conn, agent, req.vms, now)
        if values:
            conn.execute(t.agents.update().where(a.id == agent.id).values(
                last_heartbeat_at=now, heartbeat_seq=seq, **values))
        else:
            conn.execute(_HB_TOUCH, {"agent_id": agent.id, "now": now, "seq": seq})
        for up in req.execution_updates:
            x = t.executions.c
            conn.execute(
                t.executions.update()
                .where(x.id == up.execution_id, x.agent_id == agent.id, x.site_id == agent.site_id,
                       x.state.in_([ExecState.LEASED, ExecState.RUNNING]))
                .values(state=ExecState.RUNNING, updated_at=now, started_at=sa.func.coalesce(x.started_at, now))
            )
        # A probe (`nkudo-edge verify-heartbeat`) asks not to be leased work it would never run.
        return self._lease(conn, agent, now) if agent.has_work and req.lease else []

    def _sync_vms(self, conn: Connection, agent: Row[Any], vms: list[wm.VMSummary], now: dt.datetime) -> None:
        """Upsert the VMs an agent reports, keyed by (agent's site, vm id): no agent can touch another site's VM."""
        if not vms:
            return
        rows = [{"site_id": agent.site_id, "vm_id": v.vm_id, "tenant_id": agent.tenant_id, "host_id": agent.host_id,
                 "name": v.name or v.vm_id, "state": v.state, "vcpus": v.vcpus, "memory_mib": v.memory_mib,
                 "updated_at": now, "last_transition_at": now} for v in vms]
        conn.execute(self._vm_upsert, rows)

    def _lease(self, conn: Connection, agent: Row[Any], now: dt.datetime) -> list[wm.LeasedPlan]:
        """Lease up to N plans of the agent's site to it: its own leases first (renewed), then free or expired ones."""
        p, x = t.plans.c, t.executions.c
        q = _LEASE_CANDIDATES_PG if self.db.is_pg else _LEASE_CANDIDATES
        ids = [r[0] for r in conn.execute(q, {"site_id": agent.site_id, "me": agent.id, "me2": agent.id, "now": now,
                                              "lim": self.s.max_plans_per_lease})]
        if not ids:
            return []
        until = now + dt.timedelta(seconds=self.s.lease_ttl)
        conn.execute(t.plans.update().where(p.id.in_(ids)).values(
            leased_by_agent_id=agent.id, lease_expires_at=until, updated_at=now,
            status=sa.case((p.status == PlanStatus.PENDING, PlanStatus.IN_PROGRESS), else_=p.status),
        ))
        # Hand every non-terminal action of these plans to this agent; actions another (expired) holder had are
        # re-offered, so its late results are rejected as lease lost.
        conn.execute(t.executions.update().where(
            x.plan_id.in_(ids),
            sa.or_(x.state == ExecState.PENDING,
                   sa.and_(x.state.in_([ExecState.LEASED, ExecState.RUNNING]), x.agent_id != agent.id)),
        ).values(state=ExecState.LEASED, agent_id=agent.id, attempts=x.attempts + 1, updated_at=now))
        rows = conn.execute(
            sa.select(t.executions).where(x.plan_id.in_(ids), x.state.in_([ExecState.LEASED, ExecState.RUNNING]))
            .order_by(x.plan_id, x.position)
        ).all()
        by_plan: dict[str, list[wm.LeasedAction]] = {i: [] for i in ids}
        for r in rows:
            by_plan[r.plan_id].append(wm.LeasedAction(execution_id=r.id, action_id=r.action_id, type=r.action_type,
                                                      params=r.params, timeout_seconds=r.timeout_seconds))
        return [wm.LeasedPlan(plan_id=i, site_id=agent.site_id, lease_expires_at=until, actions=acts)
                for i, acts in by_plan.items() if acts]

    async def next_plans(self, ident: AgentIdentity) -> wm.PlansNextResponse:
        def tx(conn: Connection) -> list[wm.LeasedPlan]:
            now = now_utc()
            return self._lease(conn, self._agent(conn, ident, now), now)

        return wm.PlansNextResponse(plans=await self.db.run(tx))

    # --- results, logs ---------------------------------------------------------

    async def report_results(self, ident: AgentIdentity, report: wm.ResultReport, info: RequestInfo
                             ) -> wm.ResultResponse:
        out = await self.db.run(self._results_tx, ident, report, info)
        for o in out:
            self.metrics.results.labels(o.outcome).inc()
        return wm.ResultResponse(results=out)

    def _results_tx(self, conn: Connection, ident: AgentIdentity, report: wm.ResultReport, info: RequestInfo
                    ) -> list[wm.ResultOutcome]:
        now = now_utc()
        agent = self._agent(conn, ident, now)
        x = t.executions.c
        out: list[wm.ResultOutcome] = []
        touched: set[str] = set()
        for r in report.results:
            row = conn.execute(
                sa.select(t.executions).where(x.id == r.execution_id, x.tenant_id == agent.tenant_id,
                                              x.site_id == agent.site_id).with_for_update()
            ).first()
            if row is None or (report.plan_id is not None and row.plan_id != report.plan_id):
                out.append(wm.ResultOutcome(execution_id=r.execution_id, outcome="rejected",
                                            code="EXECUTION_NOT_FOUND"))
                continue
            if r.action_id is not None and r.action_id != row.action_id:
                out.append(wm.ResultOutcome(execution_id=r.execution_id, outcome="rejected", code="ACTION_MISMATCH"))
                continue
            reported = ExecState(r.status)
            decision = domain.result_transition(ExecState(row.state), reported, row.agent_id == agent.id)
            if decision != "accepted":
                code = None if decision == "duplicate" else (
                    "LEASE_LOST" if row.agent_id != agent.id else "ALREADY_FINISHED")
                out.append(wm.ResultOutcome(execution_id=r.execution_id, outcome=decision,  # type: ignore[arg-type]
                                            code=code))
                continue
            ok = reported == ExecState.SUCCEEDED
            conn.execute(t.executions.update().where(x.id == row.id, x.state == row.state).values(
                state=reported, updated_at=now, finished_at=r.finished_at or now,
                started_at=sa.func.coalesce(x.started_at, r.started_at or now),
                error_code=None if ok else (r.error_code or ("TIMED_OUT" if reported == ExecState.TIMED_OUT
                                                              else "ACTION_FAILED")),
                error_message=None if ok else (r.message or "action failed"),
            ))
            if not ok:
                # Later actions of a failed plan will never run: cancel them instead of leaving them pending forever.
                conn.execute(t.executions.update().where(
                    x.plan_id == row.plan_id, x.position > row.position,
                    x.state.in_([ExecState.PENDING, ExecState.LEASED, ExecState.RUNNING]),
                ).values(state=ExecState.CANCELLED, updated_at=now, finished_at=now, error_code="PREVIOUS_FAILED",
                         error_message=f"action {row.action_id} did not succeed"))
            self._apply_vm_result(conn, agent, row, reported, now)
            _audit(conn, info, actor=("AGENT", agent.id), action="execution.result", tenant_id=agent.tenant_id,
                   object_type="execution", object_id=row.id, now=now, details={"state": reported.value})
            touched.add(row.plan_id)
            out.append(wm.ResultOutcome(execution_id=r.execution_id, outcome="accepted"))
        for plan_id in sorted(touched):
            self._rollup(conn, plan_id, now)
        return out

    def _apply_vm_result(self, conn: Connection, agent: Row[Any], ex: Row[Any], status: ExecState,
                         now: dt.datetime) -> None:
        if not ex.vm_id:
            return
        start = bool(ex.params.get("start", True)) if ex.action_type == "MicroVMCreate" else True
        state = domain.vm_state_after(ex.action_type, status, start)
        if state is None:
            return
        v = t.vms.c
        if ex.action_type == "MicroVMCreate":
            ins = self.db.insert(t.vms)
            conn.execute(ins.on_conflict_do_update(
                index_elements=[v.site_id, v.vm_id],
                set_={"state": state, "host_id": agent.host_id, "name": ex.params.get("name", ex.vm_id),
                      "vcpus": ex.params.get("vcpus", 0), "memory_mib": ex.params.get("memory_mib", 0),
                      "updated_at": now, "last_transition_at": now},
            ), {"site_id": ex.site_id, "vm_id": ex.vm_id, "tenant_id": ex.tenant_id, "host_id": agent.host_id,
                "name": ex.params.get("name", ex.vm_id), "state": state, "vcpus": ex.params.get("vcpus", 0),
                "memory_mib": ex.params.get("memory_mib", 0), "updated_at": now, "last_transition_at": now})
        else:
            conn.execute(t.vms.update().where(v.site_id == ex.site_id, v.vm_id == ex.vm_id).values(
                state=state, host_id=agent.host_id, updated_at=now, last_transition_at=now))

    @staticmethod
    def _rollup(conn: Connection, plan_id: str, now: dt.datetime) -> PlanStatus:
        x, p = t.executions.c, t.plans.c
        states = [ExecState(r[0]) for r in conn.execute(sa.select(x.state).where(x.plan_id == plan_id))]
        status = domain.plan_status(states)
        values: dict[str, Any] = {"status": status, "updated_at": now}
        if status in domain.TERMINAL_PLAN:
            values.update(completed_at=now, leased_by_agent_id=None, lease_expires_at=None)
        conn.execute(t.plans.update().where(p.id == plan_id).values(**values))
        return status

    async def ingest_logs(self, ident: AgentIdentity, batch: wm.LogBatch) -> wm.LogBatchResponse:
        accepted, dropped = await self.db.run(self._logs_tx, ident, batch)
        self.metrics.log_lines.labels("accepted").inc(accepted)
        self.metrics.log_lines.labels("dropped").inc(dropped)
        return wm.LogBatchResponse(accepted=accepted, dropped=dropped)

    def _logs_tx(self, conn: Connection, ident: AgentIdentity, batch: wm.LogBatch) -> tuple[int, int]:
        now = now_utc()
        agent = self._agent(conn, ident, now)
        x = t.executions.c
        ex = conn.execute(sa.select(x.id, x.tenant_id).where(
            x.id == batch.execution_id, x.site_id == agent.site_id, x.agent_id == agent.id)).first()
        if ex is None:
            raise NotFound("execution not found for this agent", code="EXECUTION_NOT_FOUND", field="execution_id")
        seen: set[int] = set()
        rows = []
        for ln in batch.lines:
            if ln.seq in seen:
                continue
            seen.add(ln.seq)
            rows.append({"tenant_id": ex.tenant_id, "execution_id": ex.id, "seq": ln.seq, "level": ln.level,
                         "message": ln.message, "emitted_at": ln.ts or now, "ingested_at": now})
        stmt = self.db.insert(t.execution_logs).values(rows).on_conflict_do_nothing(
            index_elements=[t.execution_logs.c.execution_id, t.execution_logs.c.seq]
        ).returning(t.execution_logs.c.seq)
        accepted = len(conn.execute(stmt).all())  # RETURNING: rowcount is unreliable for multi-row upserts
        return accepted, len(batch.lines) - accepted

    # --- unenroll, renew -------------------------------------------------------

    async def unenroll(self, ident: AgentIdentity, req: wm.UnenrollRequest, info: RequestInfo) -> None:
        def tx(conn: Connection) -> None:
            now = now_utc()
            agent = self._agent(conn, ident, now)
            a, x, p = t.agents.c, t.executions.c, t.plans.c
            conn.execute(t.agents.update().where(a.id == agent.id).values(
                state=AgentState.UNENROLLED, cert_serial=None, prev_cert_serial=None, prev_serial_valid_until=None,
                refresh_token_hash=None, unenrolled_at=now))
            conn.execute(t.certificates.update().where(
                t.certificates.c.agent_id == agent.id,
                sa.or_(t.certificates.c.revoked_at.is_(None), t.certificates.c.revoked_at > now),
            ).values(revoked_at=now, revocation_reason="keyCompromise" if req.reason == "compromised"
                     else "cessationOfOperation"))
            conn.execute(t.hosts.update().where(t.hosts.c.current_agent_id == agent.id).values(current_agent_id=None))
            # Give its work back at once instead of waiting for lease expiry.
            conn.execute(t.executions.update().where(
                x.agent_id == agent.id, x.state.in_([ExecState.LEASED, ExecState.RUNNING])
            ).values(state=ExecState.PENDING, agent_id=None, updated_at=now))
            conn.execute(t.plans.update().where(p.leased_by_agent_id == agent.id).values(
                leased_by_agent_id=None, lease_expires_at=None, updated_at=now))
            self._recompute_sites(conn, [agent.site_id])
            _audit(conn, info, actor=("AGENT", agent.id), action="agent.unenroll", tenant_id=agent.tenant_id,
                   object_type="agent", object_id=agent.id, now=now, details={"reason": req.reason})

        await self.db.run(tx)

    async def renew(self, ident: AgentIdentity, req: wm.RenewRequest, csr: x509.CertificateSigningRequest,
                    info: RequestInfo) -> wm.RenewResponse:
        def tx(conn: Connection) -> wm.RenewResponse:
            now = now_utc()
            agent = self._agent(conn, ident, now, current_only=True)
            presented = sha256_hex(req.refresh_token)
            if not agent.refresh_token_hash or not hmac.compare_digest(presented, agent.refresh_token_hash):
                raise Unauthenticated("refresh token is not valid", code="INVALID_REFRESH_TOKEN",
                                      field="refresh_token")
            issued = self.ca.sign_agent(csr, agent_id=agent.id, tenant_id=agent.tenant_id, site_id=agent.site_id,
                                        ttl=dt.timedelta(seconds=self.s.agent_cert_ttl))
            refresh = rand_token()
            grace_end = now + dt.timedelta(seconds=self.s.renew_grace)
            a = t.agents.c
            res = conn.execute(t.agents.update().where(a.id == agent.id, a.cert_serial == agent.cert_serial).values(
                cert_serial=issued.serial, cert_expires_at=issued.not_after, prev_cert_serial=agent.cert_serial,
                prev_serial_valid_until=grace_end, refresh_token_hash=sha256_hex(refresh)))
            if res.rowcount != 1:
                raise Conflict("certificate was renewed concurrently", code="RENEW_CONFLICT")
            conn.execute(t.certificates.update().where(t.certificates.c.serial == agent.cert_serial).values(
                revoked_at=grace_end, revocation_reason="superseded"))
            conn.execute(t.certificates.insert().values(serial=issued.serial, agent_id=agent.id, issued_at=now,
                                                        expires_at=issued.not_after))
            _audit(conn, info, actor=("AGENT", agent.id), action="agent.renew", tenant_id=agent.tenant_id,
                   object_type="agent", object_id=agent.id, now=now,
                   details={"old_serial": agent.cert_serial, "new_serial": issued.serial})
            return wm.RenewResponse(client_certificate_pem=issued.pem, ca_certificate_pem=self.ca.cert_pem,
                                    refresh_token=refresh, certificate_expires_at=issued.not_after)

        return await self.db.run(tx)

    # --- plans (tenant side) ---------------------------------------------------

    @staticmethod
    def validate_plan(body: PlanCreate) -> list[tuple[str, str, Any, int, str | None]]:
        """Check every action with the agent's own schemas; returns (action_id, type, params, timeout, vm_id).

        ``parse_params`` and ``check_action_ids`` are the functions the agent's plan parser calls, so a plan
        the agent would refuse is a 400 naming the field here, not a failure on a host later.
        """
        out = []
        for i, act in enumerate(body.actions):
            parsed = wa.parse_params(act.type, act.params, prefix=f"actions[{i}].params")
            action_id = act.action_id or f"action-{i + 1}"
            timeout = act.timeout_seconds or wa.DEFAULT_TIMEOUTS.get(act.type, wa.DEFAULT_TIMEOUT)
            out.append((action_id, act.type, codec.to_builtins(parsed), timeout, wa.vm_id_of(parsed)))
        wa.check_action_ids([a[0] for a in out])
        return out

    async def create_plan(self, p: Principal, site_id: str, body: PlanCreate, info: RequestInfo
                          ) -> dict[str, Any]:
        actions = self.validate_plan(body)
        digest = hashlib.sha256(codec.encode([site_id, actions])).hexdigest()
        try:
            return await self.db.run(self._create_plan_tx, p, site_id, body.idempotency_key, actions, digest, info)
        except sa.exc.IntegrityError:
            # A concurrent request (maybe on another replica) created the plan for this key first: return it.
            return await self.db.run(self._create_plan_tx, p, site_id, body.idempotency_key, actions, digest, info)

    def _create_plan_tx(self, conn: Connection, p: Principal, site_id: str, key: str,
                        actions: list[tuple[str, str, Any, int, str | None]], digest: str, info: RequestInfo
                        ) -> dict[str, Any]:
        now = now_utc()
        site = self._site_visible(conn, p, site_id)
        ik = t.idempotency_keys.c
        prior = conn.execute(sa.select(t.idempotency_keys).where(ik.tenant_id == site.tenant_id, ik.key == key)
                             .with_for_update()).first()
        if prior is not None:
            if prior.created_at > now - dt.timedelta(seconds=self.s.idempotency_window):
                if prior.request_digest != digest:
                    raise Conflict("idempotency_key was used for a different request within 24 h",
                                   code="IDEMPOTENCY_KEY_REUSED", field="idempotency_key")
                return self._plan_view(conn, prior.plan_id, deduplicated=True)
            conn.execute(t.idempotency_keys.delete().where(ik.tenant_id == site.tenant_id, ik.key == key))
        plan_id = new_id()
        conn.execute(t.plans.insert().values(
            id=plan_id, tenant_id=site.tenant_id, site_id=site.id, idempotency_key=key, request_digest=digest,
            status=PlanStatus.PENDING, created_at=now, updated_at=now))
        conn.execute(t.executions.insert(), [
            {"id": new_id(), "tenant_id": site.tenant_id, "site_id": site.id, "plan_id": plan_id, "position": i,
             "action_id": aid, "action_type": typ, "params": params, "timeout_seconds": timeout, "vm_id": vm_id,
             "state": ExecState.PENDING, "agent_id": None, "attempts": 0, "created_at": now, "updated_at": now}
            for i, (aid, typ, params, timeout, vm_id) in enumerate(actions)
        ])
        conn.execute(t.idempotency_keys.insert().values(tenant_id=site.tenant_id, key=key, plan_id=plan_id,
                                                        request_digest=digest, created_at=now))
        _audit(conn, info, actor=p.actor, action="plan.create", tenant_id=site.tenant_id, object_type="plan",
               object_id=plan_id, now=now, details={"site_id": site.id, "actions": [a[1] for a in actions]})
        return self._plan_view(conn, plan_id, deduplicated=False)

    @staticmethod
    def _plan_view(conn: Connection, plan_id: str, deduplicated: bool = False) -> dict[str, Any]:
        plan = conn.execute(sa.select(t.plans).where(t.plans.c.id == plan_id)).one()
        execs = conn.execute(sa.select(t.executions).where(t.executions.c.plan_id == plan_id)
                             .order_by(t.executions.c.position)).all()
        return plan_json(plan, list(execs), deduplicated)

    def _plan_visible(self, conn: Connection, p: Principal, plan_id: str) -> Row[Any]:
        row = conn.execute(sa.select(t.plans).where(t.plans.c.id == plan_id)).first()
        if row is None or not domain.tenant_visible(p.tenant_id, row.tenant_id):
            raise NotFound("plan not found", code="PLAN_NOT_FOUND")
        return row

    async def get_plan(self, p: Principal, plan_id: str) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._plan_visible(conn, p, plan_id)
            return self._plan_view(conn, plan_id)

        return await self.db.run(tx)

    async def cancel_plan(self, p: Principal, plan_id: str, info: RequestInfo) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            now = now_utc()
            plan = self._plan_visible(conn, p, plan_id)
            x = t.executions.c
            # Only actions no agent has started can be cancelled; running ones finish and report normally.
            conn.execute(t.executions.update().where(
                x.plan_id == plan_id, x.state.in_([ExecState.PENDING, ExecState.LEASED])
            ).values(state=ExecState.CANCELLED, updated_at=now, finished_at=now, error_code="CANCELLED",
                     error_message="plan cancelled"))
            self._rollup(conn, plan_id, now)
            _audit(conn, info, actor=p.actor, action="plan.cancel", tenant_id=plan.tenant_id, object_type="plan",
                   object_id=plan_id, now=now)
            return self._plan_view(conn, plan_id)

        return await self.db.run(tx)

    async def get_execution(self, p: Principal, execution_id: str) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            row = conn.execute(sa.select(t.executions).where(t.executions.c.id == execution_id)).first()
            if row is None or not domain.tenant_visible(p.tenant_id, row.tenant_id):
                raise NotFound("execution not found", code="EXECUTION_NOT_FOUND")
            return execution_json(row)

        return await self.db.run(tx)

    async def execution_logs(self, p: Principal, execution_id: str, after_seq: int, limit: int
                             ) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            row = conn.execute(sa.select(t.executions.c.tenant_id).where(t.executions.c.id == execution_id)).first()
            if row is None or not domain.tenant_visible(p.tenant_id, row.tenant_id):
                raise NotFound("execution not found", code="EXECUTION_NOT_FOUND")
            lg = t.execution_logs.c
            rows = conn.execute(sa.select(t.execution_logs).where(lg.execution_id == execution_id, lg.seq > after_seq)
                                .order_by(lg.seq).limit(limit)).all()
            return {
                "execution_id": execution_id,
                "logs": [{"seq": r.seq, "level": r.level, "message": r.message, "emitted_at": iso(r.emitted_at),
                          "ingested_at": iso(r.ingested_at)} for r in rows],
                "next_after_seq": rows[-1].seq if len(rows) == limit else None,
            }

        return await self.db.run(tx)

    async def list_executions(self, p: Principal, site_id: str, state: str | None, limit: int) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._site_visible(conn, p, site_id)
            x = t.executions.c
            q = sa.select(t.executions).where(x.site_id == site_id)
            if state:
                q = q.where(x.state == state)
            rows = conn.execute(q.order_by(x.created_at.desc(), x.plan_id, x.position).limit(limit))
            return {"executions": [execution_json(r) for r in rows]}

        return await self.db.run(tx)

    async def list_hosts(self, p: Principal, site_id: str) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._site_visible(conn, p, site_id)
            h, a = t.hosts.c, t.agents.c
            rows = conn.execute(
                sa.select(t.hosts, a.state.label("agent_state"), a.last_heartbeat_at)
                .outerjoin(t.agents, a.id == h.current_agent_id)
                .where(h.site_id == site_id).order_by(h.hostname)
            )
            return {"hosts": [{
                "id": r.id, "tenant_id": r.tenant_id, "site_id": r.site_id, "hostname": r.hostname,
                "facts": r.facts, "fingerprint": r.fingerprint, "agent_id": r.current_agent_id,
                "agent_state": r.agent_state or "NONE", "agent_last_heartbeat_at": iso(r.last_heartbeat_at),
                "last_facts_at": iso(r.last_facts_at), "created_at": iso(r.created_at),
            } for r in rows]}

        return await self.db.run(tx)

    async def list_vms(self, p: Principal, site_id: str) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._site_visible(conn, p, site_id)
            v = t.vms.c
            rows = conn.execute(sa.select(t.vms).where(v.site_id == site_id, v.state != "DELETED")
                                .order_by(v.updated_at.desc(), v.vm_id))
            return {"vms": [{
                "vm_id": r.vm_id, "tenant_id": r.tenant_id, "site_id": r.site_id, "host_id": r.host_id,
                "name": r.name, "state": r.state, "vcpus": r.vcpus, "memory_mib": r.memory_mib,
                "updated_at": iso(r.updated_at), "last_transition_at": iso(r.last_transition_at),
            } for r in rows]}

        return await self.db.run(tx)

    async def list_agents(self, p: Principal, site_id: str) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._site_visible(conn, p, site_id)
            a, h = t.agents.c, t.hosts.c
            rows = conn.execute(sa.select(t.agents, h.hostname).join(t.hosts, h.id == a.host_id)
                                .where(a.site_id == site_id).order_by(a.enrolled_at.desc(), a.id))
            return {"agents": [{
                "id": r.id, "site_id": r.site_id, "host_id": r.host_id, "hostname": r.hostname, "state": r.state,
                "agent_version": r.agent_version, "enrolled_at": iso(r.enrolled_at),
                "last_heartbeat_at": iso(r.last_heartbeat_at), "cert_expires_at": iso(r.cert_expires_at),
            } for r in rows]}

        return await self.db.run(tx)

    async def list_audit(self, p: Principal, tenant_id: str, limit: int) -> dict[str, Any]:
        def tx(conn: Connection) -> dict[str, Any]:
            self._tenant_visible(conn, p, tenant_id)
            e = t.audit_events.c
            rows = conn.execute(sa.select(t.audit_events).where(e.tenant_id == tenant_id)
                                .order_by(e.id.desc()).limit(limit))
            return {"events": [{
                "id": r.id, "tenant_id": r.tenant_id, "actor_type": r.actor_type, "actor_id": r.actor_id,
                "action": r.action, "object_type": r.object_type, "object_id": r.object_id,
                "request_id": r.request_id, "source_ip": r.source_ip, "details": r.details,
                "occurred_at": iso(r.occurred_at),
            } for r in rows]}

        return await self.db.run(tx)

    # --- housekeeping ----------------------------------------------------------

    @staticmethod
    def _recompute_sites(conn: Connection, site_ids: list[str]) -> None:
        a, s = t.agents.c, t.sites.c
        for sid in site_ids:
            online = conn.execute(sa.select(a.id).where(a.site_id == sid, a.state == AgentState.ONLINE).limit(1)
                                  ).first()
            conn.execute(t.sites.update().where(s.id == sid).values(
                connectivity_state="ONLINE" if online else "OFFLINE"))

    async def sweep_offline(self) -> int:
        """Mark agents silent for longer than ``offline_after`` OFFLINE (and their sites); idempotent per replica."""
        await self.flush_seen()

        def tx(conn: Connection) -> int:
            now = now_utc()
            cutoff = now - dt.timedelta(seconds=self.s.offline_after)
            a, x, p = t.agents.c, t.executions.c, t.plans.c
            # Only ONLINE agents can go OFFLINE (an UNENROLLED agent stays UNENROLLED: the original flipped it).
            # RETURNING names exactly the rows this replica changed, so a concurrent sweep or heartbeat cannot
            # make us release, count or audit an agent twice.
            stale = conn.execute(t.agents.update().where(a.state == AgentState.ONLINE, a.last_heartbeat_at < cutoff)
                                 .values(state=AgentState.OFFLINE).returning(a.id, a.site_id, a.tenant_id)).all()
            if not stale:
                return 0
            ids = [r.id for r in stale]
            # Give their work back to the site now (the original kept it until lease expiry): executions become
            # PENDING and the plans lease-free, so the next heartbeat of another agent of the site gets them.
            # A late result from the offline agent is then rejected as LEASE_LOST.
            conn.execute(t.executions.update().where(
                x.agent_id.in_(ids), x.state.in_([ExecState.LEASED, ExecState.RUNNING])
            ).values(state=ExecState.PENDING, agent_id=None, updated_at=now))
            conn.execute(t.plans.update().where(p.leased_by_agent_id.in_(ids)).values(
                leased_by_agent_id=None, lease_expires_at=None, updated_at=now))
            self._recompute_sites(conn, sorted({r.site_id for r in stale}))
            for r in stale:
                _audit(conn, RequestInfo(), actor=("SYSTEM", "sweeper"), action="agent.offline",
                       tenant_id=r.tenant_id, object_type="agent", object_id=r.id, now=now)
            return len(stale)

        n = await self.db.run(tx)
        if n:
            self.metrics.swept.inc(n)
            log.info("agents marked offline", count=n)
        return n

    async def refresh_gauges(self) -> None:
        def tx(conn: Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for name, col in (("agents", t.agents.c.state), ("plans", t.plans.c.status),
                              ("executions", t.executions.c.state)):
                out[name] = {r[0]: r[1] for r in conn.execute(sa.select(col, sa.func.count()).group_by(col))}
            return out

        counts = await self.db.run(tx)
        for st in AgentState:
            self.metrics.agents.labels(st.value).set(counts["agents"].get(st.value, 0))
        for ps in PlanStatus:
            self.metrics.plans.labels(ps.value).set(counts["plans"].get(ps.value, 0))
        for es in ExecState:
            self.metrics.executions.labels(es.value).set(counts["executions"].get(es.value, 0))

    def _revoked_tx(self, conn: Connection) -> list[tuple[str, dt.datetime]]:
        c = t.certificates.c
        now = now_utc()
        return sorted((r.serial, r.revoked_at) for r in conn.execute(
            sa.select(c.serial, c.revoked_at).where(c.revoked_at.is_not(None), c.revoked_at <= now,
                                                    c.expires_at > now)))

    async def crl_state(self) -> _CrlCache:
        """The current signed CRL, re-signed when the revoked set changed or half its validity has passed.

        Why cached: signing on every fetch is wasted CPU; why re-read the set
        each time: a revocation (or a renew grace ending) on another replica
        must show up on the next fetch. Re-signing at half-life means a
        relying party never holds a CRL past its nextUpdate (the original
        signed once and let it go stale).
        """
        revoked = await self.db.run(self._revoked_tx)
        now = now_utc()
        cached = self._crl
        if cached is not None and cached.revoked == revoked and now < cached.refresh_at:
            return cached
        # CRL numbers must increase: milliseconds since the epoch does across restarts and replicas.
        number = max(int(now.timestamp() * 1000), (cached.number + 1) if cached else 0)
        validity = dt.timedelta(seconds=self.s.crl_validity)
        pem, this_update, next_update = self.ca.crl_pem(revoked, number=number, validity=validity)
        self._crl = _CrlCache(revoked=revoked, pem=pem, number=number, this_update=this_update,
                              next_update=next_update, refresh_at=this_update + validity / 2)
        return self._crl

    async def crl(self) -> bytes:
        return (await self.crl_state()).pem

    async def readiness(self) -> dict[str, dict[str, Any]]:
        """Dependency checks for ``/readyz``: database round trip, CA usable, CRL current.

        The error texts here are for the admin only; the HTTP layer shows
        unauthenticated probes nothing but ready / not ready.
        """
        checks: dict[str, dict[str, Any]] = {}
        t0 = time.perf_counter()
        try:
            await self.db.run(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
            checks["database"] = {"status": "healthy", "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}
        except Exception as exc:
            checks["database"] = {"status": "unhealthy", "error": f"{type(exc).__name__}: {exc}"[:300]}
        now = now_utc()
        ca_expiry = self.ca.cert.not_valid_after_utc
        checks["ca"] = ({"status": "healthy", "expires_at": iso(ca_expiry)} if ca_expiry > now
                        else {"status": "unhealthy", "error": f"CA certificate expired at {iso(ca_expiry)}"})
        if checks["database"]["status"] != "healthy":
            checks["crl"] = {"status": "unhealthy", "error": "database unavailable"}
        else:
            try:
                st = await self.crl_state()
                checks["crl"] = {"status": "healthy" if st.next_update > now else "unhealthy",
                                 "this_update": iso(st.this_update), "next_update": iso(st.next_update),
                                 "revoked": len(st.revoked)}
            except Exception as exc:
                checks["crl"] = {"status": "unhealthy", "error": f"{type(exc).__name__}: {exc}"[:300]}
        return checks


@dataclass(frozen=True, slots=True)
class _CrlCache:
    revoked: list[tuple[str, dt.datetime]]
    pem: bytes
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    refresh_at: dt.datetime
