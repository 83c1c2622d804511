"""Agent authentication and credential lifecycle: which agent a client certificate acts as, renew, unenroll.

Every agent route is authorised here from current database state (``domain.authorize_agent``): the
certificate must be the agent's current one, or the previous one inside the renewal grace window.
"""

from __future__ import annotations

import datetime as dt
import hmac
from typing import Any

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.engine import Connection, Row

from nkudo.cp import domain
from nkudo.cp import schema as t
from nkudo.cp.config import Settings, crl_distribution_url
from nkudo.cp.domain import ActorType, AgentState, PlanStatus, RevocationReason
from nkudo.cp.errors import Conflict, Unauthenticated
from nkudo.cp.feed import Change, ChangeKind, publish_all
from nkudo.cp.ports import NO_FEED, Authority, Clock, Publisher, Transactions
from nkudo.cp.records import Actor, AgentIdentity, AgentRecord, AuditEntry, RequestInfo
from nkudo.cp.usecases.common import audit, rand_token, recompute_sites, release_work, sha256_hex
from nkudo.wire import messages as wm

_a, _p = t.agents.c, t.plans.c
_B = sa.bindparam
#: Hot-path statements are built once: constructing SQLAlchemy expressions per heartbeat cost more CPU
#: than executing them. ``status = a OR status = b`` instead of ``IN`` avoids per-call expanding parameters.
SEL_AGENT = sa.select(t.agents).where(_a.id == _B("agent_id"))
LEASABLE = sa.or_(_p.leased_by_agent_id.is_(None), _p.leased_by_agent_id == _a.id, _p.lease_expires_at < _B("now"))
#: The heartbeat's agent row plus "is there anything this agent could lease?", so that the (locking) lease
#: query only runs when there is work: one statement instead of two on the common, idle path.
HAS_WORK = sa.exists().where(
    _p.site_id == _a.site_id, sa.or_(_p.status == PlanStatus.PENDING.value, _p.status == PlanStatus.IN_PROGRESS.value),
    LEASABLE,
).label("has_work")
SEL_AGENT_HB = sa.select(t.agents, HAS_WORK).where(_a.id == _B("agent_id"))


def authorized(row: Row[Any] | None, ident: AgentIdentity, now: dt.datetime, *, current_only: bool = False
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


def load_agent(conn: Connection, ident: AgentIdentity, now: dt.datetime, *, current_only: bool = False,
               heartbeat: bool = False) -> AgentRecord:
    """The agent the certificate acts as, read and authorised inside the caller's transaction."""
    if heartbeat:
        row = conn.execute(SEL_AGENT_HB, {"agent_id": ident.cn, "now": now}).first()
    else:
        row = conn.execute(SEL_AGENT, {"agent_id": ident.cn}).first()
    return AgentRecord.of(authorized(row, ident, now, current_only=current_only))


class AgentCredentials:
    """Renew an agent's certificate and refresh token; unenroll an agent (its certificates revoked)."""

    def __init__(self, settings: Settings, db: Transactions, ca: Authority, clock: Clock,
                 feed: Publisher = NO_FEED) -> None:
        self.s = settings
        self.db = db
        self.ca = ca
        self.clock = clock
        self.feed = feed  # issue 13: unenrolled and renewed agents change the live views

    async def unenroll(self, ident: AgentIdentity, req: wm.UnenrollRequest, info: RequestInfo) -> None:
        def tx(conn: Connection) -> AgentRecord:
            now = self.clock.now()
            agent = load_agent(conn, ident, now)
            c = t.certificates.c
            conn.execute(t.agents.update().where(_a.id == agent.id).values(
                state=AgentState.UNENROLLED, cert_serial=None, prev_cert_serial=None, prev_serial_valid_until=None,
                refresh_token_hash=None, unenrolled_at=now))
            conn.execute(t.certificates.update().where(
                c.agent_id == agent.id, sa.or_(c.revoked_at.is_(None), c.revoked_at > now),
            ).values(revoked_at=now, revocation_reason=domain.revocation_reason(req.reason).value))
            conn.execute(t.hosts.update().where(t.hosts.c.current_agent_id == agent.id).values(current_agent_id=None))
            # Give its work back at once instead of waiting for lease expiry.
            release_work(conn, [agent.id], now)
            recompute_sites(conn, [agent.site_id])
            audit(conn, info, AuditEntry(Actor(ActorType.AGENT, agent.id), "agent.unenroll", agent.tenant_id,
                                         "agent", agent.id, {"reason": req.reason}), now)
            return agent

        agent = await self.db.run(tx)
        publish_all(self.feed, [Change(ChangeKind.AGENT, agent.tenant_id, agent.site_id, agent.id),
                                Change(ChangeKind.SITE, agent.tenant_id, agent.site_id, agent.site_id)])

    async def renew(self, ident: AgentIdentity, req: wm.RenewRequest, csr: x509.CertificateSigningRequest,
                    info: RequestInfo) -> wm.RenewResponse:
        def tx(conn: Connection) -> tuple[wm.RenewResponse, AgentRecord]:
            now = self.clock.now()
            agent = load_agent(conn, ident, now, current_only=True)
            presented = sha256_hex(req.refresh_token)
            if not agent.refresh_token_hash or not hmac.compare_digest(presented, agent.refresh_token_hash):
                raise Unauthenticated("refresh token is not valid", code="INVALID_REFRESH_TOKEN",
                                      field="refresh_token")
            issued = self.ca.sign_agent(csr, agent_id=agent.id, tenant_id=agent.tenant_id, site_id=agent.site_id,
                                        ttl=dt.timedelta(seconds=self.s.agent_cert_ttl),
                                        crl_url=crl_distribution_url(self.s))
            refresh = rand_token()
            grace_end = now + dt.timedelta(seconds=self.s.renew_grace)
            res = conn.execute(t.agents.update().where(_a.id == agent.id, _a.cert_serial == agent.cert_serial)
                               .values(cert_serial=issued.serial, cert_expires_at=issued.not_after,
                                       prev_cert_serial=agent.cert_serial, prev_serial_valid_until=grace_end,
                                       refresh_token_hash=sha256_hex(refresh)))
            if res.rowcount != 1:
                raise Conflict("certificate was renewed concurrently", code="RENEW_CONFLICT")
            # Revoked as of the end of the grace period: the CRL lists it (reason superseded) only from then on.
            conn.execute(t.certificates.update().where(t.certificates.c.serial == agent.cert_serial).values(
                revoked_at=grace_end, revocation_reason=RevocationReason.SUPERSEDED.value))
            conn.execute(t.certificates.insert().values(serial=issued.serial, agent_id=agent.id, issued_at=now,
                                                        expires_at=issued.not_after))
            audit(conn, info, AuditEntry(Actor(ActorType.AGENT, agent.id), "agent.renew", agent.tenant_id, "agent",
                                         agent.id, {"old_serial": agent.cert_serial, "new_serial": issued.serial}),
                  now)
            return wm.RenewResponse(client_certificate_pem=issued.pem, ca_certificate_pem=self.ca.cert_pem,
                                    refresh_token=refresh, certificate_expires_at=issued.not_after), agent

        out, agent = await self.db.run(tx)
        self.feed.publish(Change(ChangeKind.AGENT, agent.tenant_id, agent.site_id, agent.id))  # new expiry
        return out
