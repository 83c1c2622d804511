"""Mutation sweep of the trust infrastructure, part two: lock-out, the rate limit shared across replicas, API
key expiry and quotas, the checkpoint statement, and the CRL's time rules on a fixed clock.

Each test names the one-line bug it catches (see ``test_trust_guards.py`` for part one).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from nkudo.cp import auditchain as ac
from nkudo.cp import models
from nkudo.cp import schema as t
from nkudo.cp.config import Settings
from nkudo.cp.db import Database, sqlite_url
from nkudo.cp.domain import ActorType, PrincipalKind
from nkudo.cp.errors import Forbidden, Unauthenticated
from nkudo.cp.metrics import Metrics
from nkudo.cp.pki import CertificateAuthority, make_csr, parse_csr, serial_hex
from nkudo.cp.ratelimit import LockoutPolicy, LockState, after_failure
from nkudo.cp.records import Actor, AgentIdentity, AuditEntry, Principal, RequestInfo
from nkudo.cp.usecases.access import Access
from nkudo.cp.usecases.agentauth import AgentCredentials
from nkudo.cp.usecases.audit import AuditLog
from nkudo.cp.usecases.crl import Crl
from nkudo.cp.usecases.enrollment import Enrollment
from nkudo.cp.usecases.quotas import Quotas
from nkudo.cp.usecases.tenancy import Tenancy
from nkudo.wire import messages as wm

from .conftest import FAST
from .helpers import Agent, new_tenant, start_server
from .pg import Cluster


def test_a_lock_holds_until_its_last_instant() -> None:
    """A source is locked until ``locked_until`` itself: a failure a moment before the end is not counted (it
    cannot start a longer lock), one at the end is.

    Catches: ``LockState.locked`` ending the lock early (``locked_until > now + 1``)."""
    pol = LockoutPolicy(threshold=2, window=60, base=10, max_lock=100)
    s = LockState()
    for now in (0.0, 1.0):
        s, until = after_failure(s, now, pol)
    assert until == 11.0 and s.level == 1
    assert s.locked(10.5) and not s.locked(11.0)
    assert after_failure(s, 10.5, pol) == (s, None)
    after, until = after_failure(s, 11.0, pol)
    assert until is None and after.failures == 1 and after.locked_until == 11.0


def test_replicas_add_up_what_each_admitted(pg_cluster: Cluster, tmp_path: Path) -> None:
    """Heartbeats admitted by two replicas (each from its in-process copy, pushed every 0.25 s) add up in the
    shared bucket: after 6 of a burst of 6, split 3 and 3, a third replica refuses the next one at once.

    Catches: the sync UPSERT keeping the pushing replica's own TAT (``tat = excluded.tat``) instead of adding
    what it spent to the shared one: every replica then admits a burst of its own."""
    url = pg_cluster.create_database()
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    (tmp_path / "ca.key").write_bytes(ca.key_pem())
    extra = [*FAST, "--ca-cert-file", str(tmp_path / "ca.crt"), "--ca-key-file", str(tmp_path / "ca.key"),
             "--rate-limit-heartbeat", "6/min:6"]
    key = "replica-admin-" + uuid.uuid4().hex
    servers = [start_server(tmp_path / f"r{i}", database_url=url, admin_key=key, extra=extra) for i in range(3)]
    agents: list[Agent] = []
    try:
        tenant = new_tenant(servers[0])
        first = Agent(servers[0], tmp_path / "a").enroll(tenant.token())
        agents.append(first)
        for srv in servers[1:]:
            twin = Agent(srv, tmp_path / "a")
            twin.enrolled, twin.key = first.enrolled, first.key
            twin.install(first.enrolled["client_certificate_pem"])
            agents.append(twin)
        a0, a1, a2 = agents
        codes = [a.post("/v1/heartbeat", {})[0] for a in (a0, a1, a0, a0, a1, a1)]
        assert codes == [200] * 6
        time.sleep(1.0)  # several sync intervals: both replicas have pushed what they admitted
        st, body = a2.post("/v1/heartbeat", {})
        assert st == 429 and body["error"]["route_class"] == "heartbeat", body
    finally:
        for a in agents:
            a.close()
        for s in servers:
            s.stop()


class _Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.t = now

    def now(self) -> dt.datetime:
        return self.t


def test_expired_api_keys_stop_working_and_leave_room_in_the_quota(tmp_path: Path) -> None:
    """An API key authenticates until its expiry instant and not at it; ``max_api_keys`` counts live keys, so
    the expired key (like a revoked one) makes room again (use cases on a real SQLite database with a fixed
    clock, so the expiry needs no waiting).

    Catches: the ``expires_at IS NULL OR expires_at > now`` condition dropped from authentication, or from the
    key count (expired keys would hold the tenant at its quota forever)."""
    db = Database(sqlite_url(tmp_path), pool_size=1)
    try:
        db.migrate()
        clock = _Clock(dt.datetime(2031, 2, 3, tzinfo=dt.UTC))
        admin = Principal(PrincipalKind.ADMIN)
        tenancy, quotas = Tenancy(db, clock), Quotas(db, clock)
        access = Access(db, clock, "admin-" + "k" * 40, None)

        async def scenario() -> None:
            tid = (await tenancy.create_tenant(admin, models.TenantCreate(slug="q", name="q"), RequestInfo())).id
            await quotas.set_quota(admin, tid, models.QuotaUpdate(max_api_keys=1), RequestInfo())
            short = await access.create_api_key(admin, tid, models.ApiKeyCreate(name="short", expires_in_seconds=60),
                                                RequestInfo())
            assert (await access.authenticate(None, short.api_key)).tenant_id == tid
            with pytest.raises(Forbidden) as exc:
                await access.create_api_key(admin, tid, models.ApiKeyCreate(name="more"), RequestInfo())
            assert exc.value.code == "QUOTA_EXCEEDED" and exc.value.field == "max_api_keys"
            clock.t += dt.timedelta(seconds=60)
            with pytest.raises(Unauthenticated) as gone:
                await access.authenticate(None, short.api_key)
            assert gone.value.code == "INVALID_API_KEY"
            await access.create_api_key(admin, tid, models.ApiKeyCreate(name="more"), RequestInfo())
            assert (await quotas.get_quota(admin, tid)).usage.api_keys == 1

        asyncio.run(scenario())
    finally:
        db.close()


def test_checkpoints_sign_the_documented_statement(tmp_path: Path) -> None:
    """An outside verifier following the README (plain json + the public key) checks a stored checkpoint: the
    signature covers ``["nkudo-audit-checkpoint/1", chain, seq, entry_hash, signed_at]``.

    Catches: the chain left out of the signed statement (a signature that no longer binds its chain, and that
    no verifier built from the README accepts)."""
    db = Database(sqlite_url(tmp_path), pool_size=1)
    try:
        db.migrate()
        key = ec.generate_private_key(ec.SECP256R1())
        log = AuditLog(db, signer=ac.Signer(key))
        chain = str(uuid.uuid4())
        asyncio.run(log.record(RequestInfo(), AuditEntry(Actor(ActorType.ADMIN), "test.event", chain, "thing", "x")))
        assert len(asyncio.run(log.checkpoint()).checkpoints) == 1
        cp = db.tx(lambda c: c.execute(sa.select(t.audit_checkpoints).where(t.audit_checkpoints.c.chain == chain))
                   .one())
        signed_at = cp.signed_at.replace(tzinfo=dt.UTC) if cp.signed_at.tzinfo is None else cp.signed_at
        statement = json.dumps(["nkudo-audit-checkpoint/1", chain, cp.seq, cp.entry_hash,
                                signed_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")],
                               separators=(",", ":"), ensure_ascii=False).encode()
        key.public_key().verify(base64.b64decode(cp.signature), statement, ec.ECDSA(hashes.SHA256()))
    finally:
        db.close()


def test_the_crl_lists_revocations_from_their_time_until_the_certificate_expires(tmp_path: Path) -> None:
    """The CRL use case on a fixed clock (enroll, renew and unenroll through the use cases, the real CA): a
    renewed certificate is listed from the end of its grace window, not a second before; revoked certificates
    leave the list once they have expired (TLS refuses them anyway), so the CRL does not grow forever.

    Catches: the CRL query's ``expires_at > now`` dropped; its ``revoked_at <= now`` dropped."""
    db = Database(sqlite_url(tmp_path), pool_size=1)
    try:
        db.migrate()
        t0 = dt.datetime.now(dt.UTC)  # the CA stamps notAfter from the real time: start the clock there
        clock = _Clock(t0)
        settings = Settings(data_dir=tmp_path, renew_grace=30.0, agent_cert_ttl=3600.0)
        admin, ca = Principal(PrincipalKind.ADMIN), CertificateAuthority.generate()
        tenancy, enrollment = Tenancy(db, clock), Enrollment(settings, db, ca, Metrics(), clock)
        creds, crl = AgentCredentials(settings, db, ca, clock), Crl(settings, db, ca, clock)

        def csr() -> tuple[str, x509.CertificateSigningRequest]:
            pem = make_csr(ec.generate_private_key(ec.SECP256R1()))
            return pem, parse_csr(pem)

        async def listed() -> set[str]:
            return {e.serial for e in (await crl.state()).revoked}

        async def scenario() -> None:
            tid = (await tenancy.create_tenant(admin, models.TenantCreate(slug="crl", name="c"), RequestInfo())).id
            sid = (await tenancy.create_site(admin, tid, models.SiteCreate(name="s"), RequestInfo())).id
            tok = await enrollment.issue_token(admin, tid, models.TokenCreate(site_id=sid), RequestInfo())
            pem, req = csr()
            out = await enrollment.enroll(wm.EnrollRequest(enrollment_token=tok.token, csr_pem=pem, hostname="h1"),
                                          req, RequestInfo())
            first = serial_hex(x509.load_pem_x509_certificate(out.client_certificate_pem.encode()).serial_number)
            pem, req = csr()
            renewed = await creds.renew(AgentIdentity(out.agent_id, first),
                                        wm.RenewRequest(csr_pem=pem, refresh_token=out.refresh_token), req,
                                        RequestInfo())
            second = serial_hex(x509.load_pem_x509_certificate(
                renewed.client_certificate_pem.encode()).serial_number)
            clock.t = t0 + dt.timedelta(seconds=29)
            assert await listed() == set()  # still inside the grace window
            clock.t = t0 + dt.timedelta(seconds=30)
            assert await listed() == {first}
            await creds.unenroll(AgentIdentity(out.agent_id, second), wm.UnenrollRequest(reason="retired"),
                                 RequestInfo())
            assert await listed() == {first, second}
            clock.t = t0 + dt.timedelta(hours=1, minutes=1)  # both certificates have expired
            assert await listed() == set()

        asyncio.run(scenario())
    finally:
        db.close()
