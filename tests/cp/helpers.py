"""Test helpers: a control-plane process, tenants, and a simulated agent speaking the wire protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nkudo.cp.client import ApiCallError, Client
from nkudo.cp.pki import make_csr

from .openapi_check import CheckedClient
from .pg import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    admin_key: str
    backend: str
    database_url: str | None
    log_path: Path
    health_port: int | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "ca.crt"

    def client(self, *, admin: bool = False, api_key: str | None = None,
               cert: tuple[Path, Path] | None = None) -> Client:
        """A client whose every response is checked against openapi.yaml (``tests/cp/openapi_check.py``)."""
        return CheckedClient(self.url, ca_file=self.ca_file, admin_key=self.admin_key if admin else None,
                             api_key=api_key, client_cert=cert)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(data_dir: Path, *, database_url: str | None = None, admin_key: str | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None, port: int | None = None) -> Server:
    port = port or free_port()
    admin_key = admin_key or "test-admin-" + uuid.uuid4().hex
    args = [sys.executable, "-m", "nkudo.cp.cli", "--log-level", "info", "serve", "--listen", f"127.0.0.1:{port}",
            "--data-dir", str(data_dir), *(extra or [])]
    if database_url:
        args += ["--database-url", database_url]
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # as the server would: no loose-mode warning
    log_path = data_dir / f"server-{port}.log"
    proc_env = {**os.environ, "NKUDO_CP_ADMIN_KEY": admin_key, **(env or {})}
    with log_path.open("wb") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=proc_env, cwd=REPO)
    srv = Server(proc, port, data_dir, admin_key, "postgres" if database_url else "sqlite", database_url, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{log_path.read_text()}")
        if (data_dir / "server.crt").exists():
            try:
                c = srv.client()
                st, _, _ = c.raw("GET", "/healthz")
                c.close()
                if st == 200:
                    return srv
            except OSError:
                pass
        time.sleep(0.1)
    srv.stop()
    raise RuntimeError(f"server did not become healthy:\n{log_path.read_text()}")


@dataclass
class Tenant:
    server: Server
    tenant_id: str
    api_key: str
    site_id: str
    client: Client = field(repr=False)

    def token(self, site_id: str | None = None, ttl: int | None = None) -> str:
        body: dict[str, Any] = {"site_id": site_id or self.site_id}
        if ttl:
            body["expires_in_seconds"] = ttl
        return str(self.client.call("POST", f"/tenants/{self.tenant_id}/enrollment-tokens", body)["token"])

    def plan(self, actions: list[dict[str, Any]], key: str | None = None, site_id: str | None = None) -> Any:
        return self.client.call("POST", f"/sites/{site_id or self.site_id}/plans",
                                {"idempotency_key": key or uuid.uuid4().hex, "actions": actions})


def new_tenant(server: Server) -> Tenant:
    admin = server.client(admin=True)
    slug = "t-" + uuid.uuid4().hex[:12]
    tid = admin.call("POST", "/tenants", {"slug": slug, "name": slug})["id"]
    key = admin.call("POST", f"/tenants/{tid}/api-keys", {"name": "test"})["api_key"]
    admin.close()
    c = server.client(api_key=key)
    sid = c.call("POST", f"/tenants/{tid}/sites", {"name": "site-" + uuid.uuid4().hex[:6]})["id"]
    return Tenant(server, tid, key, sid, c)


class Agent:
    """A simulated edge agent: its own key, the CSR it sends, the certificate it gets, an mTLS client."""

    def __init__(self, server: Server, workdir: Path, hostname: str | None = None) -> None:
        self.server = server
        self.dir = workdir / uuid.uuid4().hex[:8]
        self.dir.mkdir(parents=True)
        self.hostname = hostname or "host-" + uuid.uuid4().hex[:8]
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.enrolled: dict[str, Any] = {}
        self._client: Client | None = None

    def csr(self) -> str:
        return make_csr(self.key)

    def enroll_raw(self, token: str, **over: Any) -> tuple[int, dict[str, Any]]:
        body = {"enrollment_token": token, "csr_pem": self.csr(), "hostname": self.hostname,
                "host_fingerprint": {"machine_id_sha256": "a" * 64}, "agent_version": "test-1", **over}
        c = self.server.client()
        st, _, data = c.raw("POST", "/v1/enroll", json.dumps(body).encode())
        c.close()
        return st, json.loads(data)

    def enroll(self, token: str) -> Agent:
        st, out = self.enroll_raw(token)
        assert st == 200, out
        self.install(out["client_certificate_pem"])
        self.enrolled = out
        return self

    def install(self, cert_pem: str) -> None:
        (self.dir / "agent.crt").write_text(cert_pem)
        kp = self.dir / "agent.key"
        kp.write_bytes(self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        os.chmod(kp, 0o600)
        if self._client:
            self._client.close()
        self._client = self.server.client(cert=(self.dir / "agent.crt", kp))

    @property
    def id(self) -> str:
        return str(self.enrolled["agent_id"])

    @property
    def mtls(self) -> Client:
        assert self._client is not None
        return self._client

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        st, _, data = self.mtls.raw("POST", path, json.dumps(body).encode())
        return st, (json.loads(data) if data else None)

    def heartbeat(self, **body: Any) -> Any:
        st, out = self.post("/v1/heartbeat", body)
        assert st == 200, out
        return out

    def results(self, items: list[dict[str, Any]]) -> Any:
        st, out = self.post("/v1/executions/result", {"results": items})
        assert st == 202, out
        return out

    def close(self) -> None:
        if self._client:
            self._client.close()


def create_action(vm_id: str, **over: Any) -> dict[str, Any]:
    params = {"vm_id": vm_id, "name": vm_id, "vcpus": 2, "memory_mib": 512, "kernel_path": "/var/lib/nkudo/vmlinux",
              "nics": [{"bridge": "br0"}], **over}
    return {"type": "MicroVMCreate", "params": params}


__all__ = ["Agent", "ApiCallError", "Server", "Tenant", "create_action", "new_tenant", "start_server"]
