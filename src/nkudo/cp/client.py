"""A small HTTPS client for the control-plane API (used by the admin CLI and tests).

Stdlib only (``http.client`` + ``ssl``): the CLI must start fast and the
client must be an independent implementation from the server's aiohttp stack.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

from nkudo.errors import NkudoError


class ApiCallError(NkudoError):
    """The server answered with an error envelope (``status`` is the HTTP status)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message, code=code, field=field)
        self.status = status


class Client:
    def __init__(
        self, base_url: str, *, ca_file: Path | None = None, ca_pem: str | None = None,
        admin_key: str | None = None, api_key: str | None = None,
        client_cert: tuple[Path, Path] | None = None, timeout: float = 30.0,
    ) -> None:
        u = urllib.parse.urlsplit(base_url)
        if u.scheme != "https" or not u.hostname:
            raise NkudoError(f"server URL must be https://HOST[:PORT] (got {base_url!r})", code="INVALID_ARGUMENT")
        self.host, self.port = u.hostname, u.port or 443
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None, cadata=ca_pem)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if client_cert is not None:
            ctx.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        self.ctx = ctx
        self.headers: dict[str, str] = {"Accept": "application/json"}
        if admin_key:
            self.headers["X-Admin-Key"] = admin_key
        if api_key:
            self.headers["X-API-Key"] = api_key
        self.timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=self.timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
        """One request on a keep-alive connection (reconnects once if the server closed it)."""
        h = {**self.headers, **(headers or {})}
        if body is not None:
            h.setdefault("Content-Type", "application/json")
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=h)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, payload: Any = None, *, expect: tuple[int, ...] = (200, 201, 202, 204)
             ) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        status, _, data = self.raw(method, path, body)
        parsed: Any = json.loads(data) if data else None
        if status not in expect:
            err = (parsed or {}).get("error", {}) if isinstance(parsed, dict) else {}
            raise ApiCallError(status, err.get("code", f"HTTP_{status}"), err.get("message", data.decode()[:200]),
                               err.get("field"))
        return parsed
