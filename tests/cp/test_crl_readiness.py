"""CRL validity and refresh (§10 #30) and readiness without credentials when a dependency fails (§10 #24)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from .conftest import FAST
from .helpers import Agent, Server, new_tenant, start_server


def _fetch_crl(srv: Server) -> x509.CertificateRevocationList:
    c = srv.client()
    try:
        st, _, body = c.raw("GET", "/v1/crl.pem")
    finally:
        c.close()
    assert st == 200 and body.startswith(b"-----BEGIN X509 CRL-----"), body[:100]
    crl = x509.load_pem_x509_crl(body)
    ca = x509.load_pem_x509_certificate(srv.ca_file.read_bytes())
    pub = ca.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(pub)  # signed by the agent CA the clients trust
    assert crl.issuer == ca.subject
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(dt.UTC)
    return crl


def _number(crl: x509.CertificateRevocationList) -> int:
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def test_crl_valid_before_revocations_and_refreshed(backend: str, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    # A database of its own: "before any revocation" must really be the first CRL this CA ever signs.
    url = request.getfixturevalue("pg_cluster").create_database() if backend == "postgres" else None
    srv = start_server(tmp_path / "data", database_url=url, extra=FAST)  # CRL validity 4 s, re-signed at 2 s
    try:
        first = _fetch_crl(srv)
        assert len(first) == 0  # signed and parseable with zero entries (the original served an empty body)
        assert first.next_update_utc - first.last_update_utc == dt.timedelta(seconds=4)
        # Unchanged set and fresh enough: the cached CRL is served as is.
        assert _number(_fetch_crl(srv)) == _number(first)

        t = new_tenant(srv)
        agent = Agent(srv, tmp_path).enroll(t.token())
        st, _ = agent.post("/v1/unenroll", {"reason": "compromised"})
        assert st == 204
        serial = x509.load_pem_x509_certificate(agent.enrolled["client_certificate_pem"].encode()).serial_number
        second = _fetch_crl(srv)  # revocations changed: re-signed at once
        assert _number(second) > _number(first)
        assert [r.serial_number for r in second] == [serial]

        time.sleep(2.2)  # past half the validity: re-signed before nextUpdate, same entries
        third = _fetch_crl(srv)
        assert _number(third) > _number(second)
        assert third.last_update_utc > second.last_update_utc and third.next_update_utc > second.next_update_utc
        assert [r.serial_number for r in third] == [serial]
        admin = srv.client(admin=True)
        crl_check = admin.call("GET", "/readyz")["checks"]["crl"]
        assert crl_check["status"] == "healthy" and crl_check["revoked"] == 1
        admin.close()
        agent.close()
    finally:
        srv.stop()


def test_readyz_not_ready_reveals_nothing_without_admin_key(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Dropping the database makes /readyz 503; only the admin key sees which check failed and why."""
    cluster = request.getfixturevalue("pg_cluster")
    url = cluster.create_database()
    srv = start_server(tmp_path / "data", database_url=url, extra=FAST)
    try:
        import psycopg

        name = url.split("@/", 1)[1].split("?", 1)[0]
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        c = srv.client()
        st, _, body = c.raw("GET", "/readyz")
        assert st == 503 and json.loads(body) == {"status": "not ready"}
        st, _, body = c.raw("GET", "/readyz", headers={"X-Admin-Key": srv.admin_key})
        out = json.loads(body)
        assert st == 503 and out["status"] == "not ready"
        assert out["checks"]["database"]["status"] == "unhealthy" and out["checks"]["database"]["error"]
        assert out["checks"]["ca"]["status"] == "healthy"
        st, _, _ = c.raw("GET", "/healthz")
        assert st == 200  # liveness is not readiness
        c.close()
    finally:
        srv.stop()
