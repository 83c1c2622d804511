"""PKI persistence and process configuration: CA survives restarts, key files 0600, persistent-PKI refusal."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from nkudo.cp.pki import CertificateAuthority

from .helpers import Agent, new_tenant, start_server
from .test_migrations import HEAD


def test_ca_persists_and_agents_survive_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(data, extra=["--server-name", "localhost,127.0.0.1,cp.example"])
    try:
        t = new_tenant(srv)
        agent = Agent(srv, tmp_path).enroll(t.token())
        ca_before = srv.ca_file.read_bytes()
        assert stat.S_IMODE(os.stat(data / "ca.key").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(data / "server.key").st_mode) == 0o600
        server_cert = x509.load_pem_x509_certificate((data / "server.crt").read_bytes())
        names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "cp.example" in names.get_values_for_type(x509.DNSName)
        ca_cert = x509.load_pem_x509_certificate(ca_before)
        # §10 #38: issued (and signed) by the internal CA, not self-signed.
        assert server_cert.issuer == ca_cert.subject and server_cert.issuer != server_cert.subject
        server_cert.verify_directly_issued_by(ca_cert)
        log = srv.log_path.read_text()
        assert srv.admin_key not in log and "BEGIN" not in log  # no secrets in logs
    finally:
        srv.stop()
    srv2 = start_server(data, admin_key=srv.admin_key, port=srv.port)
    try:
        assert srv2.ca_file.read_bytes() == ca_before
        # The server certificate re-issued at this start chains to the same (persisted) CA.
        x509.load_pem_x509_certificate((data / "server.crt").read_bytes()).verify_directly_issued_by(ca_cert)
        agent.install((agent.dir / "agent.crt").read_text())  # reconnect with the same certificate
        agent.heartbeat()
        agent.close()
    finally:
        srv2.stop()


def test_generated_admin_key_file(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NKUDO_CP_ADMIN_KEY"}
    r = subprocess.run([sys.executable, "-m", "nkudo.cp.cli", "migrate", "--data-dir", str(tmp_path)], env=env,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and f"schema at revision {HEAD}" in r.stdout
    from nkudo.cp.config import Settings, resolve_admin_key

    key = resolve_admin_key(Settings(data_dir=tmp_path))
    assert key.startswith("nka_") and resolve_admin_key(Settings(data_dir=tmp_path)) == key
    assert stat.S_IMODE(os.stat(tmp_path / "admin.key").st_mode) == 0o600


def test_require_persistent_pki_refuses_without_ca(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "nkudo.cp.cli", "serve", "--data-dir", str(tmp_path / "d"),
                        "--listen", "127.0.0.1:1", "--require-persistent-pki"],
                       env={**os.environ, "NKUDO_CP_ADMIN_KEY": "k" * 32}, capture_output=True, text=True, timeout=30,
                       check=False)
    assert r.returncode != 0 and "PKI_MISSING" in r.stderr


def test_ca_from_files_and_persistent_pki(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate("given-ca")
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    (tmp_path / "ca-key.pem").write_bytes(ca.key_pem())
    srv = start_server(tmp_path / "d", extra=["--ca-cert-file", str(tmp_path / "ca.pem"), "--ca-key-file",
                                              str(tmp_path / "ca-key.pem"), "--require-persistent-pki"])
    try:
        chain = (tmp_path / "d" / "server.crt").read_text()
        leaf = x509.load_pem_x509_certificate(chain.encode())
        assert leaf.issuer == ca.cert.subject
        t = new_tenant(srv)
        got = Agent(srv, tmp_path).enroll(t.token()).enrolled
        assert got["ca_certificate_pem"] == ca.cert_pem
    finally:
        srv.stop()


def test_mismatched_ca_files_are_refused(tmp_path: Path) -> None:
    a, b = CertificateAuthority.generate(), CertificateAuthority.generate()
    with pytest.raises(Exception, match="do not match"):
        CertificateAuthority.from_pem(a.cert_pem.encode(), b.key_pem())


def test_admin_cli_commands(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "d")
    env = {**os.environ, "NKUDO_CP_SERVER": srv.url, "NKUDO_CP_CA_FILE": str(srv.ca_file),
           "NKUDO_CP_ADMIN_KEY": srv.admin_key}

    def run(*args: str, api_key: str | None = None) -> str:
        e = dict(env)
        if api_key:
            e["NKUDO_CP_API_KEY"] = api_key
        r = subprocess.run([sys.executable, "-m", "nkudo.cp.cli", *args], env=e, capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        return r.stdout

    try:
        tenant = json.loads(run("tenant", "create", "--slug", "acme", "--name", "Acme", "--json"))
        assert "acme" in run("tenant", "list")
        key = json.loads(run("api-key", "create", "--tenant", tenant["id"], "--json"))["api_key"]
        site = json.loads(run("site", "create", "--tenant", tenant["id"], "--name", "dc1", "--json", api_key=key))
        table = run("site", "list", "--tenant", tenant["id"], api_key=key)
        assert table.splitlines()[0].split()[:3] == ["ID", "NAME", "CONNECTIVITY_STATE"] and "dc1" in table
        tok = json.loads(run("token", "create", "--tenant", tenant["id"], "--site", site["id"], "--json",
                             api_key=key))["token"]
        agent = Agent(srv, tmp_path).enroll(tok)
        plan_file = tmp_path / "plan.yaml"
        plan_file.write_text("idempotency_key: first\nactions:\n  - type: CommandExecute\n"
                             "    params: {command: /bin/echo, args: [hi]}\n")
        applied = json.loads(run("plan", "apply", str(plan_file), "--site", site["id"], "--json", api_key=key))
        assert applied["plan_status"] == "PENDING"
        assert applied["plan_id"] in run("plan", "show", applied["plan_id"], api_key=key)
        [leased] = agent.heartbeat()["pending_plans"]
        eid = leased["actions"][0]["execution_id"]
        agent.post("/v1/logs", {"execution_id": eid, "lines": [{"seq": i, "message": f"m{i}"} for i in range(7)]})
        agent.results([{"execution_id": eid, "status": "SUCCEEDED"}])
        assert "SUCCEEDED" in run("execution", "show", eid, api_key=key)
        logs = run("execution", "logs", eid, "--limit", "3", api_key=key)  # pages 3+3+1
        assert [ln.split()[-1] for ln in logs.splitlines()] == [f"m{i}" for i in range(7)]
        assert agent.hostname in run("agent", "list", "--site", site["id"], api_key=key)
        # A tenant key cannot create tenants: the CLI reports the server's error and exits non-zero.
        r = subprocess.run([sys.executable, "-m", "nkudo.cp.cli", "tenant", "create", "--slug", "x", "--name", "x"],
                           env={**env, "NKUDO_CP_API_KEY": key}, capture_output=True, text=True, check=False)
        assert r.returncode == 1 and "ADMIN_REQUIRED" in r.stderr
        agent.close()
    finally:
        srv.stop()
