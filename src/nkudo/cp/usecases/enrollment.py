"""Enrollment: one-time tokens (issue, list) and trading a token plus a CSR for an agent identity."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.engine import Connection

from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.config import Settings, crl_distribution_url
from nkudo.cp.domain import ActorType, AgentState, Connectivity, Permission
from nkudo.cp.errors import Conflict, NotFound, Unauthenticated
from nkudo.cp.feed import Change, ChangeKind, publish_all
from nkudo.cp.models import TokenCreate
from nkudo.cp.ports import NO_FEED, Authority, Clock, Metrics, Publisher, Transactions
from nkudo.cp.ratelimit import Credential
from nkudo.cp.records import Actor, AuditEntry, Principal, RequestInfo, iso, stamp
from nkudo.cp.usecases import quotas
from nkudo.cp.usecases.common import (
    audit,
    new_id,
    rand_token,
    require,
    set_site_connectivity,
    sha256_hex,
    tenant_scope,
)
from nkudo.cp.usecases.lockout import Lockouts
from nkudo.wire import codec
from nkudo.wire import messages as wm


class Enrollment:
    def __init__(self, settings: Settings, db: Transactions, ca: Authority, metrics: Metrics, clock: Clock,
                 lockouts: Lockouts | None = None, feed: Publisher = NO_FEED) -> None:
        self.lockouts = lockouts
        self.feed = feed  # issue 13: a new agent appears on the live views
        self.s = settings
        self.db = db
        self.ca = ca
        self.metrics = metrics
        self.clock = clock

    async def issue_token(self, p: Principal, tenant_id: str, body: TokenCreate, info: RequestInfo
                          ) -> v.TokenIssued:
        require(p, Permission.ENROLL)

        def tx(conn: Connection) -> v.TokenIssued:
            tenant_scope(conn, p, tenant_id)
            site = conn.execute(sa.select(t.sites.c.id, t.sites.c.tenant_id).where(t.sites.c.id == body.site_id)
                                ).first()
            if site is None or site.tenant_id != tenant_id:
                raise NotFound("site not found", code="SITE_NOT_FOUND", field="site_id")
            now = self.clock.now()
            ttl = body.expires_in_seconds or self.s.enrollment_token_ttl
            tok, tid = rand_token(), new_id()
            exp = now + dt.timedelta(seconds=ttl)
            conn.execute(t.enrollment_tokens.insert().values(id=tid, tenant_id=tenant_id, site_id=site.id,
                                                             token_hash=sha256_hex(tok), created_at=now,
                                                             expires_at=exp))
            audit(conn, info, AuditEntry(p.actor, "enrollment_token.issue", tenant_id, "enrollment_token", tid,
                                         {"site_id": site.id}), now)
            return v.TokenIssued(token_id=tid, site_id=site.id, token=tok, expires_at=stamp(exp), one_time=True)

        return await self.db.run(tx)

    async def list_tokens(self, p: Principal, tenant_id: str) -> v.TokenList:
        def tx(conn: Connection) -> v.TokenList:
            tenant_scope(conn, p, tenant_id)
            e, s = t.enrollment_tokens.c, t.sites.c
            rows = conn.execute(
                sa.select(t.enrollment_tokens, s.name.label("site_name"))
                .join(t.sites, s.id == e.site_id)
                .where(e.tenant_id == tenant_id).order_by(e.created_at.desc(), e.id)
            )
            return v.TokenList(tokens=[v.TokenView(
                id=r.id, site_id=r.site_id, site_name=r.site_name, created_at=stamp(r.created_at),
                expires_at=stamp(r.expires_at), consumed=r.used_at is not None, consumed_at=iso(r.used_at),
                consumed_by_agent_id=r.used_by_agent_id,
            ) for r in rows])

        return await self.db.run(tx)

    async def enroll(self, req: wm.EnrollRequest, csr: x509.CertificateSigningRequest, info: RequestInfo,
                     source: str | None = None) -> wm.EnrollResponse:
        """Enroll a host. The CSR was validated by the caller, so a bad CSR never burns the token.

        ``source`` is the client address (issue 12): a source that guessed too many tokens is locked out of
        enrollment (checked in the enrollment's transaction), and every unknown token counts towards that.
        """
        try:
            out = await self.db.run(self._enroll_tx, req, csr, info, source)
        except Exception as exc:
            self.metrics.enrollments.labels(getattr(exc, "code", "ERROR")).inc()
            if self.lockouts is not None and getattr(exc, "code", None) == "TOKEN_INVALID":
                await self.lockouts.record_failure(source, Credential.ENROLLMENT_TOKEN, info)
            raise
        self.metrics.enrollments.labels("OK").inc()
        publish_all(self.feed, [Change(ChangeKind.AGENT, out.tenant_id, out.site_id, out.agent_id),
                                Change(ChangeKind.SITE, out.tenant_id, out.site_id, out.site_id)])
        return out

    def _enroll_tx(self, conn: Connection, req: wm.EnrollRequest, csr: x509.CertificateSigningRequest,
                   info: RequestInfo, source: str | None = None) -> wm.EnrollResponse:
        if self.lockouts is not None:
            self.lockouts.check_in(conn, source, Credential.ENROLLMENT_TOKEN)
        now = self.clock.now()
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
            sa.select(h.id, h.current_agent_id).where(h.site_id == tok.site_id, h.hostname == req.hostname)
            .with_for_update()
        ).first()
        fp = codec.to_builtins(req.host_fingerprint)
        if host is not None and host.current_agent_id is not None:
            # Rolls back the token consumption: the operator can unenroll the old agent and retry.
            raise Conflict(f"host {req.hostname!r} already has an enrolled agent", code="HOST_ALREADY_ENROLLED",
                           field="hostname")
        # Issue 12: max_agents_per_site (a refusal also rolls back the token consumption).
        quotas.check_agents(conn, tok.tenant_id, tok.site_id)
        issued = self.ca.sign_agent(csr, agent_id=agent_id, tenant_id=tok.tenant_id, site_id=tok.site_id,
                                    ttl=dt.timedelta(seconds=self.s.agent_cert_ttl),
                                    crl_url=crl_distribution_url(self.s))
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
        set_site_connectivity(conn, tok.site_id, Connectivity.ONLINE)
        audit(conn, info, AuditEntry(Actor(ActorType.AGENT, agent_id), "agent.enroll", tok.tenant_id, "agent",
                                     agent_id, {"site_id": tok.site_id, "host_id": host_id, "hostname": req.hostname,
                                                "token_id": tok.id, "serial": issued.serial}), now)
        return wm.EnrollResponse(
            agent_id=agent_id, tenant_id=tok.tenant_id, site_id=tok.site_id, host_id=host_id,
            client_certificate_pem=issued.pem, ca_certificate_pem=self.ca.cert_pem, refresh_token=refresh,
            certificate_expires_at=issued.not_after, heartbeat_interval_seconds=self.s.heartbeat_interval,
        )
