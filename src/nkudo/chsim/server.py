"""The simulator's HTTP/1.1 server on the API Unix socket (micro_http look-alike).

Why hand-written instead of ``http.server``: the simulator must reproduce
what micro_http does on the wire and nothing more: one thread, requests
handled strictly one at a time (a slow call stalls every connection),
keep-alive connections multiplexed with a selector, SCM_RIGHTS fds collected
with the request, a 51 200-byte request body limit (micro_http default up to
CH v53.0), ``Content-Length`` on every response except 204, an empty reason
phrase, ``Server: Cloud Hypervisor API``, and JSON-list error bodies.
"""

from __future__ import annotations

import array
import json
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from nkudo.chsim.schema import LazySpec
from nkudo.chsim.vmm import E_API, ROUTES, ApiFailure, Reply, SimOptions, Vmm

MAX_PAYLOAD = 51200
MAX_LINE = 1024
MAX_HEAD = 8192
MAX_FDS = 253
_METHODS = ("GET", "PUT", "PATCH", "POST", "DELETE", "HEAD", "OPTIONS")


class RequestParseError(Exception):
    """The bytes on a connection are not an HTTP request micro_http would accept."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes | None


@dataclass
class Conn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)  # received via SCM_RIGHTS, not yet handed to a request


def parse_request(buf: bytearray) -> tuple[Request, int] | None:
    """One complete request from the front of ``buf`` and its length, or None if incomplete."""
    h = buf.find(b"\r\n\r\n")
    if h < 0:
        first = buf.find(b"\r\n")
        if (first < 0 and len(buf) > MAX_LINE) or len(buf) > MAX_HEAD:
            raise RequestParseError(400, "Invalid request: line or header too long")
        return None
    try:
        head = bytes(buf[:h]).decode("ascii")
    except UnicodeDecodeError:
        raise RequestParseError(400, "Invalid request: non-ASCII byte in head") from None
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or len(lines[0]) > MAX_LINE:
        raise RequestParseError(400, "Invalid request line")
    method, target, version = parts
    if method not in _METHODS:
        raise RequestParseError(400, f"Unsupported HTTP method {method!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise RequestParseError(400, f"Unsupported HTTP version {version!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise RequestParseError(400, f"Invalid header line {line[:60]!r}")
        headers[name.lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raise RequestParseError(400, "Chunked transfer encoding is not supported")
    cl = headers.get("content-length", "0")
    if not cl.isdigit():
        raise RequestParseError(400, f"Invalid Content-Length {cl!r}")
    length = int(cl)
    if length > MAX_PAYLOAD:
        raise RequestParseError(
            413, f"Request payload with size {length} is larger than the limit of {MAX_PAYLOAD} allowed by server."
        )
    end = h + 4 + length
    if len(buf) < end:
        return None
    body = bytes(buf[h + 4 : end]) if length else None
    return Request(method, target, headers, body), end


def render(status: int, body: bytes | None) -> bytes:
    """A response exactly as micro_http writes it for Cloud Hypervisor."""
    head = f"HTTP/1.1 {status} \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
    if status in (100, 204):
        return (head + "\r\n").encode("ascii")
    payload = body or b""
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    return head.encode("ascii") + payload


class Server:
    def __init__(self, listener: socket.socket, vmm: Vmm, opts: SimOptions, spec: LazySpec,
                 journal: IO[str] | None, log: Callable[[str, str], None]) -> None:
        self.listener = listener
        self.vmm = vmm
        self.opts = opts
        self.spec = spec
        self.journal = journal
        self.log = log
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}

    # -- loop ------------------------------------------------------------------------------

    def serve(self) -> int:
        """Serve until ``vmm.shutdown`` or a guest power-off ends the VMM; returns the exit status."""
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ)
        try:
            while self.vmm.exit_requested is None:
                deadline = self.vmm.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                for key, _ in self.sel.select(timeout):
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._readable(self.conns[key.fd])
                    if self.vmm.exit_requested is not None:
                        break
                self.vmm.tick(time.monotonic())
        finally:
            for c in list(self.conns.values()):
                self._close(c)
            self.sel.close()
        return self.vmm.exit_requested

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.settimeout(10.0)
            self.conns[sock.fileno()] = Conn(sock)
            self.sel.register(sock, selectors.EVENT_READ)

    def _close(self, c: Conn) -> None:
        self.conns.pop(c.sock.fileno(), None)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        for fd in c.fds:
            _close_fd(fd)
        c.fds.clear()
        c.sock.close()

    def _readable(self, c: Conn) -> None:
        try:
            data, anc, _flags, _addr = c.sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        except (TimeoutError, BlockingIOError):
            return
        except OSError:
            self._close(c)
            return
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                c.fds.extend(got)
        if not data:
            self._close(c)
            return
        c.buf += data
        while c.buf:
            try:
                parsed = parse_request(c.buf)
            except RequestParseError as exc:
                self._send(c, render(exc.status, json.dumps(["Bad Request", str(exc)]).encode()))
                self._journal(None, exc.status, None, len(c.fds), None, [str(exc)])
                self._close(c)
                return
            if parsed is None:
                return
            req, used = parsed
            del c.buf[:used]
            fds = list(c.fds)
            c.fds.clear()
            try:
                out = self.respond(req, len(fds))
            finally:
                for fd in fds:
                    _close_fd(fd)
            if out is None:  # injected "close": drop the connection without answering
                self._close(c)
                return
            self._send(c, out)
            if self.vmm.exit_requested is not None:
                return

    def _send(self, c: Conn, data: bytes) -> None:
        try:
            c.sock.sendall(data)
        except OSError as exc:
            self.log("debug", f"client went away before the response was sent: {exc}")

    # -- one request -----------------------------------------------------------------------

    def respond(self, req: Request, nfds: int) -> bytes | None:
        """Handle one request; returns the response bytes (None = close without answering)."""
        if self.opts.latency > 0:
            time.sleep(self.opts.latency)
        target = req.target
        if target.startswith(("http://", "https://")):
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path = target.partition("?")[0]
        endpoint = path[len("/api/v1/"):] if path.startswith("/api/v1/") else None
        body_json: Any = None
        schema_valid: bool | None = None
        status = 500
        reply_body: Any = None
        messages: list[str] | None = None
        try:
            if endpoint is None or endpoint not in ROUTES:
                raise ApiFailure(404, ["Not Found"])
            want_method, kind = ROUTES[endpoint]
            if req.method not in ("GET", "PUT"):
                fancy = endpoint in ("vm.create", "vm.info", "vmm.ping", "vmm.shutdown")
                raise ApiFailure(400, ["Bad Request"] if fancy else None)
            if req.method != want_method:
                raise ApiFailure(400, ["Bad Request"])
            if kind == "none" and req.body is not None:
                raise ApiFailure(400, ["Bad Request"])
            if kind == "body":
                if req.body is None:
                    raise ApiFailure(400, None if endpoint == "vm.create" else ["Bad Request"])
                try:
                    body_json = json.loads(req.body)
                except ValueError as exc:
                    body_json = req.body.decode("utf-8", "replace")
                    raise ApiFailure(400, ["Failed to deserialize JSON", str(exc)]) from None
                validator = self.spec.get()
                if validator is not None:
                    verdict = validator.validate(endpoint, body_json)
                    schema_valid = verdict.valid
                    if not verdict.valid:
                        raise ApiFailure(400, ["Failed to deserialize JSON", verdict.message])
            injected = self._injected(endpoint)
            if injected == "close":
                self._journal(req, None, body_json, nfds, schema_valid, ["connection closed (--sim-fail)"])
                return None
            if injected == "garbage":
                self._journal(req, None, body_json, nfds, schema_valid, ["garbage sent (--sim-fail)"])
                return b"HTTP/1.1 2x0 \r\nContent-Length: nope\r\n\r\n"
            if injected is not None:
                raise ApiFailure(int(injected), [E_API, f"nkudo-ch-sim: injected failure ({endpoint}={injected})"])
            delay = self.opts.delays.get(endpoint, 0.0)
            if delay > 0:
                time.sleep(delay)
            reply: Reply = self.vmm.handle(endpoint, body_json, nfds)
            status, reply_body = reply.status, reply.body
            if reply.exit_after:
                self.vmm.exit_requested = 0
        except ApiFailure as exc:
            status, messages = exc.status, exc.chain
            reply_body = exc.chain
        if status >= 400:
            self.log("info", f"HTTP API error response: {': '.join(messages or [])} ({req.method} {req.target})")
        self._journal(req, status, body_json if req.body is not None else None, nfds, schema_valid, messages)
        raw = None if reply_body is None else json.dumps(reply_body, separators=(",", ":")).encode()
        return render(status, raw)

    def _injected(self, endpoint: str) -> str | None:
        hit = self.opts.fail.get(endpoint)
        if hit is None:
            return None
        action, left = hit
        if left == 0:
            return None
        if left > 0:
            self.opts.fail[endpoint] = (action, left - 1)
        return action

    def _journal(self, req: Request | None, status: int | None, body: Any, nfds: int,
                 schema_valid: bool | None, messages: list[str] | None) -> None:
        if self.journal is None:
            return
        rec: dict[str, Any] = {"kind": "request", "ts": round(time.time(), 6)}
        if req is not None:
            path = req.target
            rec.update(method=req.method, path=path,
                       endpoint=path[len("/api/v1/"):] if path.startswith("/api/v1/") else None)
        rec.update(body=body, fds=nfds, status=status, schema_valid=schema_valid)
        if messages:
            rec["messages"] = messages
        self.journal.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.journal.flush()


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
