"""Mutation sweep of the trust infrastructure: tests that each fail on a one-line bug no other test caught.

Every test names the bug it catches. They go through the public surface: a real control plane (SQLite and
PostgreSQL via the ``server`` fixture) for certificates, CSRs, enrollment and the CRL; the pure rule modules
(``ratelimit``, ``auditchain``) and the use cases for the rules whose edges a clock must reach.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nkudo.cp import auditchain as ac
from nkudo.cp import models
from nkudo.cp import schema as t
from nkudo.cp.config import Settings
from nkudo.cp.db import Database, sqlite_url
from nkudo.cp.domain import ActorType, PrincipalKind
from nkudo.cp.errors import Conflict, Unauthenticated, Unavailable
from nkudo.cp.metrics import Metrics
from nkudo.cp.pki import CertificateAuthority, RevokedEntry, make_csr, parse_csr
from nkudo.cp.records import Actor, AuditEntry, Principal, RequestInfo
from nkudo.cp.usecases.audit import AuditLog
from nkudo.cp.usecases.crl import Crl
from nkudo.cp.usecases.enrollment import Enrollment
from nkudo.cp.usecases.tenancy import Tenancy
from nkudo.wire import messages as wm

from .conftest import FAST
from .helpers import Agent, Server, Tenant, new_tenant, start_server

DAY = 24 * 3600  # the server fixture keeps the default --agent-cert-ttl


def _cert(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _check_agent_cert(server: Server, pem: str, agent_id: str, tenant_id: str, site_id: str) -> None:
    cert = _cert(pem)
    ca = x509.load_pem_x509_certificate(server.ca_file.read_bytes())
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [agent_id]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://nkudo/tenant/{tenant_id}/site/{site_id}/agent/{agent_id}"]
    assert cert.issuer == ca.subject
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now
    lifetime = (cert.not_valid_after_utc - now).total_seconds()
    assert DAY - 120 <= lifetime <= DAY + 5, lifetime


def test_agent_certificates_have_the_client_only_profile(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Enrolled and renewed certificates: not a CA, no certificate or CRL signing, clientAuth only, CN = agent id,
    the SPIFFE SAN naming the token's tenant and site, AKI of our CA, lifetime = --agent-cert-ttl.

    Catches: ``BasicConstraints(ca=True)`` (an agent could mint certificates), ``key_cert_sign=True``, an extra
    EKU, tenant and site swapped in the SAN, the TTL doubled."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    out = agent.enrolled
    assert (out["tenant_id"], out["site_id"]) == (tenant.tenant_id, tenant.site_id)
    _check_agent_cert(server, out["client_certificate_pem"], agent.id, tenant.tenant_id, tenant.site_id)
    st, renewed = agent.post("/v1/renew", {"csr_pem": agent.csr(), "refresh_token": out["refresh_token"]})
    assert st == 200, renewed
    _check_agent_cert(server, renewed["client_certificate_pem"], agent.id, tenant.tenant_id, tenant.site_id)
    agent.close()


def _pem_csr(csr_der: bytes) -> str:
    return x509.load_der_x509_csr(csr_der).public_bytes(serialization.Encoding.PEM).decode()


def _forged_signature_csr() -> str:
    """A well-formed CSR whose self-signature does not verify (the last byte of the signature changed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(x509.load_pem_x509_csr(make_csr(key).encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return _pem_csr(bytes(der))


def _ed25519_csr() -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nkudo-agent")]))
           .sign(ed25519.Ed25519PrivateKey.generate(), None))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_unacceptable_csrs_are_refused_and_leave_the_token(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """A CSR whose signature does not verify (proof of possession), on a curve other than P-256/P-384, or with
    an Ed25519 key is a 400 INVALID_CSR, and the token still enrolls a good CSR afterwards.

    Catches: the ``if not ok`` signature check dropped, the curve check dropped, the final ``else: raise``
    replaced by accepting the key."""
    tok = tenant.token()
    a = Agent(server, agent_dir)
    cases = [
        (_forged_signature_csr(), "signature does not verify"),
        (make_csr(ec.generate_private_key(ec.SECP521R1())), "secp521r1 not accepted"),
        (make_csr(ec.generate_private_key(ec.SECP256K1())), "secp256k1 not accepted"),
        (_ed25519_csr(), "must be ECDSA P-256"),
    ]
    for pem, why in cases:
        st, out = a.enroll_raw(tok, csr_pem=pem)
        assert st == 400 and out["error"]["code"] == "INVALID_CSR" and why in out["error"]["message"], (why, out)
    p384 = Agent(server, agent_dir)
    p384.key = ec.generate_private_key(ec.SECP384R1())
    p384.enroll(tok)  # the token survived every refusal; P-384 is accepted
    p384.heartbeat()
    p384.close()


def _crl(server: Server) -> x509.CertificateRevocationList:
    c = server.client()
    try:
        st, _, body = c.raw("GET", "/v1/crl")
    finally:
        c.close()
    assert st == 200
    crl = x509.load_der_x509_crl(body)
    ca = x509.load_pem_x509_certificate(server.ca_file.read_bytes()).public_key()
    assert isinstance(ca, ec.EllipticCurvePublicKey) and crl.is_signature_valid(ca)
    return crl


def _reason(crl: x509.CertificateRevocationList, pem: str) -> x509.ReasonFlags | None:
    entry = crl.get_revoked_certificate_by_serial_number(_cert(pem).serial_number)
    assert entry is not None, "the certificate is not on the CRL"
    return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason


def test_unenroll_inside_the_renew_grace_revokes_the_previous_certificate_too(
        server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """A compromised agent that renewed a moment ago: unenroll must put the previous certificate (still inside
    its grace window, revocation scheduled for the window's end as ``superseded``) on the CRL at once, as
    ``keyCompromise``, like the current one.

    Catches: unenroll revoking only certificates with no revocation yet (``revoked_at IS NULL`` instead of
    ``IS NULL OR revoked_at > now``): the stolen previous certificate stays off the CRL for the grace window
    and is then listed as merely superseded."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    old = agent.enrolled["client_certificate_pem"]
    st, out = agent.post("/v1/renew", {"csr_pem": agent.csr(), "refresh_token": agent.enrolled["refresh_token"]})
    assert st == 200, out
    agent.install(out["client_certificate_pem"])
    assert agent.post("/v1/unenroll", {"reason": "compromised"})[0] == 204
    crl = _crl(server)
    assert _reason(crl, out["client_certificate_pem"]) == x509.ReasonFlags.key_compromise
    assert _reason(crl, old) == x509.ReasonFlags.key_compromise
    time.sleep(1.3)  # past the grace window (--renew-grace 1): the reason must not turn into superseded
    assert _reason(_crl(server), old) == x509.ReasonFlags.key_compromise
    agent.close()


def test_renew_needs_the_current_certificate(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """The previous certificate keeps heartbeating inside the renew grace window but may not renew: otherwise a
    thief of the old key (with the refresh token it rotated) could fork the agent's identity.

    Catches: ``renew`` loading the agent without ``current_only=True``."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    old_dir = agent.dir / "old"
    old_dir.mkdir()
    for name in ("agent.crt", "agent.key"):
        (old_dir / name).write_bytes((agent.dir / name).read_bytes())
    old = server.client(cert=(old_dir / "agent.crt", old_dir / "agent.key"))
    try:
        st, out = agent.post("/v1/renew", {"csr_pem": agent.csr(), "refresh_token": agent.enrolled["refresh_token"]})
        assert st == 200, out
        agent.install(out["client_certificate_pem"])
        assert old.raw("POST", "/v1/heartbeat", b"{}")[0] == 200  # inside the grace window
        body = json.dumps({"csr_pem": agent.csr(), "refresh_token": out["refresh_token"]}).encode()
        st, _, data = old.raw("POST", "/v1/renew", body)
        assert st == 401 and json.loads(data)["error"]["code"] == "CERTIFICATE_REVOKED", data
        agent.heartbeat()  # the current certificate was not replaced by the refused renew
        st, _ = agent.post("/v1/renew", {"csr_pem": agent.csr(), "refresh_token": out["refresh_token"]})
        assert st == 200
    finally:
        old.close()
        agent.close()


def test_ca_loading_tightens_the_key_and_refuses_half_a_pair(tmp_path: Path) -> None:
    """A CA key found group/world-readable in the data dir is made 0600 when loaded, and a CA certificate file
    without its key file (or the reverse) is refused instead of silently using the data dir's CA.

    Catches: the ``st_mode & 0o077`` repair dropped; the "given together" check dropped."""
    made = CertificateAuthority.load_or_create(tmp_path)
    key = tmp_path / "ca.key"
    os.chmod(key, 0o644)
    again = CertificateAuthority.load_or_create(tmp_path)
    assert again.cert_pem == made.cert_pem and stat.S_IMODE(key.stat().st_mode) == 0o600
    other = CertificateAuthority.generate("given")
    (tmp_path / "given.crt").write_text(other.cert_pem)
    (tmp_path / "given.key").write_bytes(other.key_pem())
    for cert_file, key_file in ((tmp_path / "given.crt", None), (None, tmp_path / "given.key")):
        with pytest.raises(Unavailable) as exc:
            CertificateAuthority.load_or_create(tmp_path, cert_file=cert_file, key_file=key_file)
        assert exc.value.code == "PKI_INVALID" and "together" in str(exc.value)


# --- rate limits keyed by the verified agent ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hb_server(backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Server]:
    """A server that trusts 127.0.0.1 as a proxy and allows 3 heartbeats per agent in a burst.

    On a database of its own: its CA (and so its audit key) is not the session server's, whose verification of
    every chain would otherwise meet checkpoints this one signed at shutdown."""
    url = request.getfixturevalue("pg_cluster").create_database() if backend == "postgres" else None
    srv = start_server(tmp_path_factory.mktemp(f"hb-{backend}"), database_url=url,
                       extra=[*FAST, "--trusted-proxy", "127.0.0.1/32", "--rate-limit-heartbeat", "6/min:3"])
    try:
        yield srv
    finally:
        srv.stop()


def test_heartbeat_buckets_belong_to_the_certificate_not_the_address(hb_server: Server, tmp_path: Path) -> None:
    """Agent routes are limited per verified agent: an agent cannot get fresh buckets by writing another
    X-Forwarded-For (even through a trusted proxy), and two agents behind one address do not share one.

    Catches: ``client_identity`` falling back to the address on agent routes (the ``"agent:" + cn`` return
    dropped)."""
    t = new_tenant(hb_server)
    a = Agent(hb_server, tmp_path).enroll(t.token())
    b = Agent(hb_server, tmp_path).enroll(t.token())
    try:
        codes = [a.mtls.raw("POST", "/v1/heartbeat", b"{}", {"X-Forwarded-For": f"10.9.{i}.1"})[0]
                 for i in range(5)]
        assert codes[:2] == [200, 200] and codes[-1] == 429, codes
        assert b.post("/v1/heartbeat", {})[0] == 200  # same address, its own bucket
    finally:
        a.close()
        b.close()


# --- the audit chain ---------------------------------------------------------------------------------------


def _signed_chain(db: Database, n: int = 6) -> tuple[AuditLog, str]:
    """A tenant chain of ``n`` events with a checkpoint at its head, verified valid."""
    log = AuditLog(db, metrics=Metrics(), signer=ac.Signer(ec.generate_private_key(ec.SECP256R1())))
    tenant = str(uuid.uuid4())

    async def fill() -> None:
        for i in range(n):
            await log.record(RequestInfo(request_id=f"r{i}"), AuditEntry(Actor(ActorType.ADMIN), "test.event", tenant,
                                                                         "thing", f"obj-{i}", {"i": i}))

    asyncio.run(fill())
    assert [c.seq for c in asyncio.run(log.checkpoint()).checkpoints] == [n]
    assert asyncio.run(log.verify_chains()).valid
    return log, tenant


def _first_break(log: AuditLog) -> tuple[str, int, str]:
    report = asyncio.run(log.verify_chains())
    assert not report.valid and report.first_broken is not None, report
    b = report.first_broken
    return b.reason.value, b.seq, b.chain


def _sql(db: Database, stmt: Any) -> None:
    db.tx(lambda conn: conn.execute(stmt))


_E, _H, _K = t.audit_events.c, t.audit_chain_heads.c, t.audit_checkpoints.c


def test_a_deleted_chain_head_is_detected(db: Database) -> None:
    """Deleting a chain's head row must not take the chain out of verification: its events, which no head
    accounts for, are reported (inserted, at the first), also once its checkpoints are deleted too.

    Catches: verification listing chains from the head rows only (or heads and checkpoints); ``verify_chain`` accepting events when there
    is no head (the ``elif events`` branch dropped)."""
    log, tenant = _signed_chain(db)
    _sql(db, t.audit_chain_heads.delete().where(_H.chain == tenant))
    assert _first_break(log) == ("inserted", 1, tenant)
    _sql(db, t.audit_checkpoints.delete().where(_K.chain == tenant))  # now only the events name the chain
    assert _first_break(AuditLog(db, verifier=log.verifier)) == ("inserted", 1, tenant)


def test_a_chain_deleted_but_for_its_checkpoint_is_detected(db: Database) -> None:
    """Deleting every event and the head of a chain leaves its signed checkpoint, which must be reported
    (deleted, at 1) by a verifier that did not sign it (no memory of its own checkpoints).

    Catches: verification listing chains from heads and events only (not from the checkpoints)."""
    log, tenant = _signed_chain(db)
    _sql(db, t.audit_events.delete().where(_E.chain == tenant))
    _sql(db, t.audit_chain_heads.delete().where(_H.chain == tenant))
    fresh = AuditLog(db, verifier=log.verifier)
    assert _first_break(fresh) == ("deleted", 1, tenant)


def test_a_truncated_tail_is_reported_where_it_starts(db: Database) -> None:
    """The last two events deleted and the head moved back to match: the signed checkpoint (at 6) reports the
    chain as deleted from 5, the first missing event.

    Catches: the ``cp.seq > last_seq`` branch of the checkpoint check dropped (the break is then reported at
    the checkpoint's sequence number, hiding that 5 is gone too)."""
    log, tenant = _signed_chain(db)
    four = db.tx(lambda conn: conn.execute(sa.select(_E.entry_hash).where(_E.chain == tenant, _E.seq == 4)).scalar())
    _sql(db, t.audit_events.delete().where(_E.chain == tenant, _E.seq > 4))
    _sql(db, t.audit_chain_heads.update().where(_H.chain == tenant).values(seq=4, entry_hash=four))
    assert _first_break(log) == ("deleted", 5, tenant)


# --- enrollment on a fixed clock ---------------------------------------------------------------------------


class _Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.t = now

    def now(self) -> dt.datetime:
        return self.t


def test_an_enrollment_token_is_dead_at_its_expiry_instant(tmp_path: Path) -> None:
    """The enrollment use case on its ports (real SQLite, the real CA, a fixed clock): a token one second before
    its ``expires_at`` enrolls, one refused at exactly ``expires_at`` says TOKEN_EXPIRED and is not consumed;
    the database holds the token's SHA-256 only; the identity comes from the token's tenant and site.

    Catches: ``tok.expires_at <= now`` weakened to ``<`` (the refusal then claims TOKEN_ALREADY_USED for a
    token nobody used); the ``used_at`` check dropped (a used token then reports only that it expired)."""
    db = Database(sqlite_url(tmp_path), pool_size=1)
    try:
        db.migrate()
        t0 = dt.datetime(2031, 2, 3, 4, 5, 6, tzinfo=dt.UTC)
        clock = _Clock(t0)
        admin = Principal(PrincipalKind.ADMIN)
        tenancy = Tenancy(db, clock)
        enrollment = Enrollment(Settings(data_dir=tmp_path), db, CertificateAuthority.generate(), Metrics(), clock)

        def request(token: str) -> tuple[wm.EnrollRequest, x509.CertificateSigningRequest]:
            pem = make_csr(ec.generate_private_key(ec.SECP256R1()))
            return (wm.EnrollRequest(enrollment_token=token, csr_pem=pem, hostname="h-" + uuid.uuid4().hex[:8]),
                    parse_csr(pem))

        async def scenario() -> None:
            tid = (await tenancy.create_tenant(admin, models.TenantCreate(slug="enr", name="e"), RequestInfo())).id
            sid = (await tenancy.create_site(admin, tid, models.SiteCreate(name="s"), RequestInfo())).id
            body = models.TokenCreate(site_id=sid, expires_in_seconds=60)
            late = await enrollment.issue_token(admin, tid, body, RequestInfo())
            early = await enrollment.issue_token(admin, tid, body, RequestInfo())
            stored = db.tx(lambda c: c.execute(sa.select(t.enrollment_tokens)).all())
            assert sorted(r.token_hash for r in stored) == sorted(
                hashlib.sha256(x.token.encode()).hexdigest() for x in (late, early))
            assert not any(x.token in map(str, r) for r in stored for x in (late, early))  # no plaintext column
            clock.t = t0 + dt.timedelta(seconds=59)
            out = await enrollment.enroll(*request(early.token), RequestInfo())
            assert (out.tenant_id, out.site_id) == (tid, sid)
            clock.t = t0 + dt.timedelta(seconds=60)
            with pytest.raises(Unauthenticated) as exc:
                await enrollment.enroll(*request(late.token), RequestInfo())
            assert exc.value.code == "TOKEN_EXPIRED"
            with pytest.raises(Conflict) as used:  # used, then expired: it was used
                await enrollment.enroll(*request(early.token), RequestInfo())
            assert used.value.code == "TOKEN_ALREADY_USED"
            consumed = {x.id: x.consumed for x in (await enrollment.list_tokens(admin, tid)).tokens}
            assert consumed == {early.token_id: True, late.token_id: False}

        asyncio.run(scenario())
    finally:
        db.close()


# --- CRL signing and readiness ------------------------------------------------------------------------------


def test_crl_entries_carry_no_unspecified_or_unknown_reason(tmp_path: Path) -> None:
    """A stored ``unspecified`` writes no reason code (RFC 5280 prefers that), and a reason this version does
    not know is left out instead of stopping the CRL from being signed; known reasons are kept.

    Catches: ``_reason_flag`` returning ``unspecified`` as a reason code."""
    ca = CertificateAuthority.generate()
    at = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)
    signed = ca.sign_crl([RevokedEntry("a1", at, "unspecified"), RevokedEntry("b2", at, "no-such-reason"),
                          RevokedEntry("c3", at, None), RevokedEntry("d4", at, "keyCompromise")], number=7)
    crl = x509.load_der_x509_crl(signed.der)
    pub = ca.cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and crl.is_signature_valid(pub)
    reasons = {}
    for r in crl:
        ext = [e.value.reason for e in r.extensions if isinstance(e.value, x509.CRLReason)]
        reasons[format(r.serial_number, "x")] = ext
    assert reasons == {"a1": [], "b2": [], "c3": [], "d4": [x509.ReasonFlags.key_compromise]}


def test_readiness_reports_an_expired_ca(tmp_path: Path) -> None:
    """``/readyz``'s CA check (the use case, on a clock past the CA's notAfter) says unhealthy and when it expired.

    Catches: the ``ca_expiry > now`` comparison dropped (an expired CA, whose agent certificates no longer
    verify, reported healthy)."""
    db = Database(sqlite_url(tmp_path), pool_size=1)
    try:
        db.migrate()
        ca = CertificateAuthority.generate()
        expiry = ca.cert.not_valid_after_utc
        clock = _Clock(expiry - dt.timedelta(seconds=1))
        crl = Crl(Settings(data_dir=tmp_path), db, ca, clock)
        assert asyncio.run(crl.readiness()).ca.status == "healthy"
        clock.t = expiry
        got = asyncio.run(crl.readiness()).ca
        assert got.status == "unhealthy" and "expired" in (got.error or "")
    finally:
        db.close()


def test_the_last_unsigned_event_changed_and_rehashed_is_detected_by_the_head(db: Database) -> None:
    """An event past the last checkpoint with no successor, changed and its hash recomputed: only the chain
    head still names its real hash, so verification must report it (changed, at it).

    Catches: the head's ``entry_hash`` no longer compared with the last event's."""
    log, tenant = _signed_chain(db, 3)
    asyncio.run(log.record(RequestInfo(), AuditEntry(Actor(ActorType.ADMIN), "test.event", tenant, "thing", "x")))
    r = db.tx(lambda conn: conn.execute(sa.select(t.audit_events).where(_E.chain == tenant, _E.seq == 4)).one())
    h = ac.link(r.chain, r.seq, r.occurred_at, r.tenant_id, r.actor_type, r.actor_id, "forged.action", r.object_type,
                r.object_id, r.request_id, r.source_ip, r.details, r.prev_hash)
    _sql(db, t.audit_events.update().where(_E.id == r.id).values(action="forged.action", entry_hash=h))
    assert _first_break(log) == ("changed", 4, tenant)
