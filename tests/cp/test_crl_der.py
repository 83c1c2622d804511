"""Issue 12 (CRL): DER at ``/v1/crl``, reason codes per entry, a distribution point in agent certificates.

Against a real control plane (SQLite and PostgreSQL) and checked with the ``openssl`` command line, the tool
a relying party outside nkudo would use: ``openssl crl -inform DER`` reads the list and ``openssl verify
-crl_check`` refuses a revoked agent certificate and accepts a live one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nkudo.cp.config import Settings
from nkudo.errors import ValidationError
from tests.conftest import skip_or_fail

from .conftest import FAST
from .helpers import Agent, Server, Tenant, new_tenant, start_server

EDGE = str(Path(sys.executable).parent / "nkudo-edge")


def _openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        skip_or_fail("the openssl command is not installed")
    return str(path)


def _der_crl(server: Server) -> x509.CertificateRevocationList:
    c = server.client()
    try:
        st, headers, body = c.raw("GET", "/v1/crl")
    finally:
        c.close()
    assert st == 200 and headers["content-type"] == "application/pkix-crl", (st, headers)
    crl = x509.load_der_x509_crl(body)
    pub = x509.load_pem_x509_certificate(server.ca_file.read_bytes()).public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and crl.is_signature_valid(pub)
    return crl


def _serial(pem: str) -> int:
    return x509.load_pem_x509_certificate(pem.encode()).serial_number


def _reason(crl: x509.CertificateRevocationList, serial: int) -> x509.ReasonFlags | None:
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    assert entry is not None, f"serial {serial:x} is not on the CRL"
    return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason


def _cdp(pem: str) -> list[str]:
    ext = x509.load_pem_x509_certificate(pem.encode()).extensions.get_extension_for_class(x509.CRLDistributionPoints)
    return [str(n.value) for dp in ext.value for n in (dp.full_name or [])]


def test_der_crl_carries_reason_codes(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Issue 12 CRL: /v1/crl is DER; compromised -> keyCompromise, retired -> cessationOfOperation, renewed ->
    superseded once the grace period (1 s here) has ended, and not before."""
    compromised = Agent(server, agent_dir).enroll(tenant.token())
    retired = Agent(server, agent_dir).enroll(tenant.token())
    renewed = Agent(server, agent_dir).enroll(tenant.token())
    assert compromised.post("/v1/unenroll", {"reason": "compromised"})[0] == 204
    assert retired.post("/v1/unenroll", {"reason": "retired"})[0] == 204
    t0 = time.monotonic()
    st, out = renewed.post("/v1/renew", {"csr_pem": renewed.csr(), "refresh_token": renewed.enrolled["refresh_token"]})
    assert st == 200, out
    old = _serial(renewed.enrolled["client_certificate_pem"])
    crl = _der_crl(server)
    if time.monotonic() - t0 < 0.8:  # still inside the grace period: the old certificate still works
        assert crl.get_revoked_certificate_by_serial_number(old) is None
    assert _reason(crl, _serial(compromised.enrolled["client_certificate_pem"])) == x509.ReasonFlags.key_compromise
    assert _reason(crl, _serial(retired.enrolled["client_certificate_pem"])) == \
        x509.ReasonFlags.cessation_of_operation
    time.sleep(max(0.0, 1.3 - (time.monotonic() - t0)))
    crl = _der_crl(server)
    assert _reason(crl, old) == x509.ReasonFlags.superseded
    assert crl.get_revoked_certificate_by_serial_number(_serial(out["client_certificate_pem"])) is None
    # The PEM route serves the same list.
    c = server.client()
    pem = x509.load_pem_x509_crl(c.raw("GET", "/v1/crl.pem")[2])
    c.close()
    assert {r.serial_number for r in pem} >= {r.serial_number for r in crl}
    for a in (compromised, retired, renewed):
        a.close()


def test_openssl_reads_the_crl_and_verify_crl_check(server: Server, tenant: Tenant, agent_dir: Path,
                                                    tmp_path: Path) -> None:
    """Issue 12 CRL: ``openssl crl -inform DER`` shows the reasons; ``openssl verify -crl_check`` fails for a
    revoked agent certificate and passes for a live one."""
    openssl = _openssl()
    live = Agent(server, agent_dir).enroll(tenant.token())
    gone = Agent(server, agent_dir).enroll(tenant.token())
    assert gone.post("/v1/unenroll", {"reason": "compromised"})[0] == 204
    c = server.client()
    st, _, der = c.raw("GET", "/v1/crl")
    c.close()
    assert st == 200
    (tmp_path / "crl.der").write_bytes(der)
    text = subprocess.run([openssl, "crl", "-inform", "DER", "-in", str(tmp_path / "crl.der"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert f"{_serial(gone.enrolled['client_certificate_pem']):X}" in text.replace(":", "").upper()
    assert "Key Compromise" in text
    subprocess.run([openssl, "crl", "-inform", "DER", "-in", str(tmp_path / "crl.der"), "-out",
                    str(tmp_path / "crl.pem")], check=True)
    for name, agent in (("live", live), ("gone", gone)):
        (tmp_path / f"{name}.crt").write_text(agent.enrolled["client_certificate_pem"])
    verify = [openssl, "verify", "-crl_check", "-CAfile", str(server.ca_file), "-CRLfile", str(tmp_path / "crl.pem")]
    ok = subprocess.run([*verify, str(tmp_path / "live.crt")], capture_output=True, text=True)
    assert ok.returncode == 0 and ": OK" in ok.stdout, ok
    bad = subprocess.run([*verify, str(tmp_path / "gone.crt")], capture_output=True, text=True)
    assert bad.returncode != 0 and "certificate revoked" in bad.stdout + bad.stderr, bad
    live.close()
    gone.close()


def test_agent_certificates_carry_the_servers_crl_url(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Issue 12 CRL: enrolled and renewed certificates name this server's /v1/crl as distribution point."""
    agent = Agent(server, agent_dir).enroll(tenant.token())
    want = [f"https://localhost:{server.port}/v1/crl"]  # first default server name, the listening port
    assert _cdp(agent.enrolled["client_certificate_pem"]) == want
    st, out = agent.post("/v1/renew", {"csr_pem": agent.csr(), "refresh_token": agent.enrolled["refresh_token"]})
    assert st == 200 and _cdp(out["client_certificate_pem"]) == want
    agent.close()


def test_crl_url_flag(tmp_path: Path) -> None:
    """Issue 12 CRL: ``--crl-url`` replaces the distribution point; a URL that is not http(s) is refused."""
    url = "http://crl.example.test/nkudo/agent-ca.crl"
    srv = start_server(tmp_path / "data", extra=[*FAST, "--crl-url", url])
    try:
        t = new_tenant(srv)
        agent = Agent(srv, tmp_path).enroll(t.token())
        assert _cdp(agent.enrolled["client_certificate_pem"]) == [url]
        agent.close()
    finally:
        srv.stop()
    for bad in ("ftp://crl.example.test/x", "http://crl example/x", "https://x/\n"):
        with pytest.raises(ValidationError) as exc:
            Settings(data_dir=tmp_path, crl_url=bad).check()
        assert exc.value.field == "crl_url"


def test_edge_unenroll_reason_reaches_the_crl(server: Server, tenant: Tenant, tmp_path: Path) -> None:
    """Issue 12 CRL: ``nkudo-edge unenroll --reason compromised`` sends the reason: the CRL says keyCompromise."""
    root = tmp_path / "edge"
    state, pki = root / "state", root / "pki"
    edge = [EDGE, "--state-dir", str(state)]
    r = subprocess.run([*edge, "enroll", "--control-plane", server.url, "--token", tenant.token(), "--ca-file",
                        str(server.ca_file), "--pki-dir", str(pki)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    serial = x509.load_pem_x509_certificate((pki / "agent.crt").read_bytes()).serial_number
    bad = subprocess.run([*edge, "unenroll", "--yes", "--reason", "stolen", "--pki-dir", str(pki)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--reason" in bad.stderr
    assert (pki / "agent.crt").exists()  # a usage error changes nothing
    r = subprocess.run([*edge, "unenroll", "--yes", "--json", "--keep-vms", "--reason", "compromised", "--pki-dir",
                        str(pki), "--runtime-dir", str(root / "vms"), "--snapshot-dir", str(root / "snaps"),
                        "--image-root", str(root / "images")],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "NKUDO_LOG_FORMAT": "json"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["control_plane"] == "done"
    assert _reason(_der_crl(server), serial) == x509.ReasonFlags.key_compromise
