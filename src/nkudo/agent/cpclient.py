"""HTTPS client of the control plane's agent API (mTLS, TLS 1.3, keep-alive).

Why http.client: the agent makes a handful of sequential calls per interval;
the standard library's maintained HTTP/1.1 client with an ``ssl.SSLContext``
does that with no extra dependency and no event loop. The connection is kept
alive between calls and replaced when the certificate is renewed
(:meth:`CpClient.reload`), so the live connection never keeps presenting an
old certificate (the Go original locked itself out that way).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import http.client
import json
import math
import socket
import ssl
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any, TypeVar

from nkudo import __version__
from nkudo.errors import NkudoError, ValidationError
from nkudo.wire import messages as wm
from nkudo.wire.codec import WireError, decode, encode
from nkudo.wire.vocab import IDENTITY_GONE, ErrorCode

if TYPE_CHECKING:
    from nkudo.agent.identity import Identity, Pki

T = TypeVar("T")


class CpError(NkudoError):
    """The control plane answered with an error (its code and message are kept)."""

    def __init__(self, message: str, *, code: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.retry_after = retry_after

    @property
    def rate_limited(self) -> bool:
        """A 429 (rate limit or lock-out): retry, but not before ``retry_after`` (issue 12)."""
        return self.status == 429

    @property
    def identity_gone(self) -> bool:
        """The control plane no longer accepts this agent's identity (unenrolled, revoked, unknown)."""
        return self.code in IDENTITY_GONE


class CpUnreachable(NkudoError):
    """No answer from the control plane (DNS, TCP, TLS or timeout)."""

    code = ErrorCode.CP_UNREACHABLE




def parse_base_url(url: str) -> tuple[str, int, str]:
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https" or not u.hostname:
        raise ValidationError(f"--control-plane {url!r} must be an https:// URL", field="control_plane")
    try:
        port = u.port or 443
    except ValueError:
        raise ValidationError(f"--control-plane {url!r} has an invalid port", field="control_plane") from None
    return u.hostname, port, u.path.rstrip("/")


class CpClient:
    def __init__(
        self,
        base_url: str,
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        insecure_skip_verify: bool = False,
        timeout: float = 15.0,
    ) -> None:
        self.base_url = base_url
        self.host, self.port, self.prefix = parse_base_url(base_url)
        self.ca_file = ca_file
        self.insecure = insecure_skip_verify
        self.timeout = timeout
        self._lock = threading.Lock()
        self._conn: http.client.HTTPSConnection | None = None
        self._ctx = self._context(cert_file, key_file)

    def _context(self, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert_file and key_file:
            ctx.load_cert_chain(cert_file, key_file)
        return ctx

    def reload(self, cert_file: str, key_file: str, ca_file: str | None = None) -> None:
        """Switch to a new client certificate: new TLS context, and the old connection is closed."""
        if ca_file is not None:
            self.ca_file = ca_file
        ctx = self._context(cert_file, key_file)
        with self._lock:
            self._ctx = ctx
            self._close_locked()

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        status, payload, _ = self.exchange(method, path, body)
        return status, payload

    def exchange(self, method: str, path: str, body: Any = None) -> tuple[int, bytes, float | None]:
        """One request: status, body and the ``Retry-After`` seconds if the answer had one."""
        data = encode(body) if body is not None else None
        headers = {"User-Agent": f"nkudo-edge/{__version__}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        with self._lock:
            for attempt in (1, 2):
                if self._conn is None:
                    self._conn = http.client.HTTPSConnection(
                        self.host, self.port, timeout=self.timeout, context=self._ctx
                    )
                try:
                    self._conn.request(method, self.prefix + path, body=data, headers=headers)
                    resp = self._conn.getresponse()
                    payload = resp.read()
                    if resp.getheader("Connection", "").lower() == "close":
                        self._close_locked()
                    return resp.status, payload, parse_retry_after(resp.getheader("Retry-After"))
                except ssl.SSLCertVerificationError as exc:
                    self._close_locked()
                    raise CpUnreachable(
                        f"the control plane's certificate at {self.base_url} is not trusted ({exc.verify_message}); "
                        "pass --ca-file with its CA certificate",
                        code=ErrorCode.CP_TLS_UNTRUSTED,
                    ) from None
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                    # A kept-alive connection the server closed: retry once on a fresh one.
                    self._close_locked()
                    if attempt == 2:
                        raise CpUnreachable(
                            f"control plane {self.base_url} closed the connection: {exc}"
                        ) from None
                except (OSError, http.client.HTTPException) as exc:
                    self._close_locked()
                    reason = (
                        exc.strerror
                        if isinstance(exc, OSError) and exc.strerror
                        else str(exc) or type(exc).__name__
                    )
                    if isinstance(exc, socket.timeout | TimeoutError):
                        reason = f"no answer within {self.timeout:g}s"
                    raise CpUnreachable(
                        f"cannot reach the control plane at {self.base_url}: {reason}"
                    ) from None
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: Any, resp_type: type[T] | None) -> T | None:
        status, payload, retry_after = self.exchange(method, path, body)
        if status >= 400:
            raise _error(status, payload, retry_after)
        if resp_type is None or status == 204:
            return None
        try:
            return decode(payload, resp_type)
        except WireError as exc:
            raise CpError(
                f"unexpected answer from the control plane to {path}: {exc.message}",
                code=ErrorCode.CP_BAD_RESPONSE,
                status=status,
            ) from None

    # typed routes --------------------------------------------------------------

    def enroll(self, req: wm.EnrollRequest) -> wm.EnrollResponse:
        out = self.call("POST", "/v1/enroll", req, wm.EnrollResponse)
        assert out is not None
        return out

    def heartbeat(self, req: wm.HeartbeatRequest) -> wm.HeartbeatResponse:
        out = self.call("POST", "/v1/heartbeat", req, wm.HeartbeatResponse)
        assert out is not None
        return out

    def results(self, report: wm.ResultReport) -> wm.ResultResponse:
        out = self.call("POST", "/v1/executions/result", report, wm.ResultResponse)
        assert out is not None
        return out

    def logs(self, batch: wm.LogBatch) -> wm.LogBatchResponse:
        out = self.call("POST", "/v1/logs", batch, wm.LogBatchResponse)
        assert out is not None
        return out

    def unenroll(self, req: wm.UnenrollRequest) -> None:
        self.call("POST", "/v1/unenroll", req, None)

    def renew(self, req: wm.RenewRequest) -> wm.RenewResponse:
        out = self.call("POST", "/v1/renew", req, wm.RenewResponse)
        assert out is not None
        return out


def _error(status: int, payload: bytes, retry_after: float | None = None) -> CpError:
    code, message = f"HTTP_{status}", payload[:200].decode("utf-8", "replace")
    try:
        doc = json.loads(payload)
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
        code = str(err.get("code") or code)
        message = str(err.get("message") or message)
    except ValueError:
        pass
    return CpError(message, code=code, status=status, retry_after=retry_after)


#: Longest wait a Retry-After can ask for that is honoured as given (a day: a lock-out can be that long).
MAX_RETRY_AFTER = 86400.0


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; ``None`` if absent or unreadable."""
    if value is None:
        return None
    v = value.strip()
    if v.isdigit():
        return min(float(v), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    secs = (when - (now or dt.datetime.now(dt.UTC))).total_seconds()
    return None if math.isnan(secs) else min(max(0.0, secs), MAX_RETRY_AFTER)


def rate_limited_delay(retry_after: float | None, fallback: float, rand: float) -> float:
    """How long to wait after a 429: never less than the server's ``Retry-After`` (plus up to 20 % jitter so
    agents refused together do not come back together), the backoff ``fallback`` without one, and at least
    one second either way, so a 429 can never turn into a hot loop."""
    base = fallback if retry_after is None else retry_after
    return max(1.0, base) * (1.0 + 0.2 * rand)


def backoff_delay(failures: int, base: float, cap: float, rand: float) -> float:
    """Exponential backoff with full jitter in [0.5, 1.0] of the step; ``rand`` in [0, 1)."""
    step = min(cap, base * float(2 ** max(0, failures - 1)))
    return step * (0.5 + rand / 2)


def jittered(interval: float, rand: float) -> float:
    """``interval`` ±10 %."""
    return interval * (0.9 + 0.2 * rand)


def client_for(ident: Identity, pki: Pki) -> CpClient:
    """The client of an enrolled agent: its control plane, trusted CA and certificate from ``pki``."""
    return CpClient(
        ident.control_plane,
        ca_file=pki.ca,
        cert_file=pki.cert,
        key_file=pki.key,
        insecure_skip_verify=ident.insecure_skip_verify,
    )
