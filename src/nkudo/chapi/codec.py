"""Sans-I/O codec for the Cloud Hypervisor API: bytes in, bytes out, no sockets.

Why sans-I/O (in the style of h11): the native transport (Cython) and the
Python transport must give identical results. Keeping request building,
response framing and response parsing here, as pure functions, means the two
transports differ only in how they move bytes, and the codec is tested on its
own with hostile input.

What it speaks is exactly what Cloud Hypervisor's ``micro_http`` server emits
and what ``ch-remote`` sends:

* request: ``<METHOD> /api/v1/<endpoint> HTTP/1.1``, ``Host: localhost``,
  ``Accept: */*``, ``Content-Length`` only when there is a body (body-less
  actions answer 400 to any body, so "no body" and "empty body" differ);
* response: ``HTTP/1.1 <code> <reason?>`` (micro_http sends an empty reason),
  ``Name: value`` headers, ``Content-Length`` on every response except 204
  (and 1xx), then exactly that many body bytes. Chunked transfer coding is
  not implemented by micro_http, so it is rejected here.

The parser is strict: anything else raises :class:`ChProtocolError`, never
an ``IndexError`` or a silent guess.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from nkudo.chapi.errors import ChProtocolError

API_PREFIX = "/api/v1/"
#: A head (status line + headers) larger than this is refused: micro_http's are ~120 bytes.
MAX_HEAD = 16384
#: Largest body accepted (vm.info of a big VM is a few KiB; 64 MiB bounds memory use).
MAX_BODY = 64 << 20

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_ENDPOINT_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
_CRLF2 = b"\r\n\r\n"


@dataclass(slots=True)
class Response:
    """One parsed HTTP response (treat as immutable; not frozen because that costs on the hot path).

    ``raw_headers`` is the validated header block (``Name: value\\r\\n`` lines);
    :attr:`headers` splits it on demand, since callers rarely need more than the
    status and body and the split is measurable on the hot path.
    """

    status: int
    reason: str
    raw_headers: bytes
    body: bytes

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """``(lower-case name, value)`` pairs in wire order."""
        return tuple((n.decode("ascii").lower(), v.decode("ascii")) for n, v in _HEADER_RE.findall(self.raw_headers))

    def header(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.headers:
            if k == low:
                return v
        return None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> object:
        """The body decoded as JSON (``ChProtocolError`` if it is not JSON)."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ChProtocolError(f"response body is not valid JSON: {exc}") from None

    def messages(self) -> list[str]:
        """The server's error chain: CH sends a JSON list of strings (top error first).

        Older servers sent a plain string and some errors have no body at all;
        those are returned as a one-element list (or an empty one), so callers
        always get ``list[str]``.
        """
        if not self.body:
            return []
        try:
            value = json.loads(self.body)
        except ValueError:
            return [self.body.decode("utf-8", "replace")]
        if isinstance(value, list) and all(isinstance(m, str) for m in value):
            return list(value)
        if isinstance(value, str):
            return [value]
        return [self.body.decode("utf-8", "replace")]


def build_request(method: str, endpoint: str, body: bytes | None = None) -> bytes:
    """The exact bytes ``ch-remote`` writes for ``endpoint`` (e.g. ``"vm.boot"``).

    ``body=None`` sends no ``Content-Length`` (a body-less action); ``b""`` sends
    ``Content-Length: 0``. ``method`` is not restricted to GET/PUT so that tests can
    probe the server's answer to other methods, but it must be an HTTP token.
    """
    if body is None:
        return _bodyless(method, endpoint)
    return _head(method, endpoint, f"Content-Length: {len(body)}\r\n\r\n") + body


@functools.lru_cache(maxsize=128)
def _bodyless(method: str, endpoint: str) -> bytes:
    # Polled calls (vmm.ping, vm.info) repeat forever: build their bytes once.
    return _head(method, endpoint, "\r\n")


def _head(method: str, endpoint: str, tail: str) -> bytes:
    if not method or any(c not in _TOKEN for c in method.encode("ascii", "replace")):
        raise ValueError(f"invalid HTTP method {method!r}")
    if not endpoint or any(c not in _ENDPOINT_OK for c in endpoint):
        raise ValueError(f"invalid API endpoint {endpoint!r} (expected e.g. 'vm.boot')")
    return f"{method} {API_PREFIX}{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n{tail}".encode("ascii")


def expected_size(buf: bytes | bytearray) -> int:
    """How many bytes the complete response in ``buf`` has, or -1 if the head is incomplete.

    This is only framing, for deciding when to stop reading; it never raises.
    Rules (the native transport implements the same ones, byte for byte):

    * no ``CRLFCRLF`` yet: -1, unless ``buf`` already exceeds :data:`MAX_HEAD`
      (then ``len(buf)``: stop reading, the parser will reject it);
    * status 204 or 1xx: the head alone;
    * otherwise head + the value of the first ``Content-Length`` header if it is
      1..18 decimal digits surrounded by optional spaces/tabs and at most
      :data:`MAX_BODY`, else the head alone (the parser then reports it).
    """
    h = buf.find(_CRLF2)
    if h < 0:
        return len(buf) if len(buf) > MAX_HEAD else -1
    head_end = h + 4
    if buf[9:10] == b"1" or buf[9:12] == b"204":
        return head_end
    pos = buf.find(b"\r\n")
    while pos < h:
        start = pos + 2
        end = buf.find(b"\r\n", start)
        colon = buf.find(b":", start, end)
        if colon - start == 14 and bytes(buf[start:colon]).lower() == b"content-length":
            value = bytes(buf[colon + 1 : end]).strip(b" \t")
            if 0 < len(value) <= 18 and value.isdigit() and int(value) <= MAX_BODY:
                return head_end + int(value)
            return head_end
        pos = end
    return head_end


_TOKEN_RE = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_VALUE_RE = rb"[ \t]*((?:[\t\x20-\x7e]*[\x21-\x7e])?)[ \t]*\r\n"
_STATUS_RE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: ([\t\x20-\x7e]*))?\r\n")
_HEADER_RE = re.compile(rb"(" + _TOKEN_RE + rb"):" + _VALUE_RE)
_HEADER_BLOCK_RE = re.compile(rb"(?:" + _TOKEN_RE + rb":" + _VALUE_RE + rb")*")


def _native_parse_fast() -> Callable[[bytes], tuple[int, bytes, bytes, bytes] | None] | None:
    """The compiled fast path, or None: the twin's ``parse_fast`` would only re-run the Python parser."""
    from nkudo import _native

    mod = _native.load("chapi")
    return None if mod is None else mod.parse_fast


_fast: list[Callable[[bytes], tuple[int, bytes, bytes, bytes] | None] | None] = []


def parse_response(data: bytes) -> Response:
    """Parse one complete response; strict about everything micro_http guarantees.

    Well-formed responses take the native fast path when it is loaded; anything it
    is not certain about goes to :func:`parse_response_py`, the authority on errors.
    """
    if not _fast:
        _fast.append(_native_parse_fast())
    fast = _fast[0]
    if fast is not None and type(data) is bytes:
        r = fast(data)
        if r is not None:
            return Response(r[0], r[1].decode("ascii"), r[2], r[3])
    return parse_response_py(data)


def parse_response_py(data: bytes) -> Response:
    """The pure-Python parser (twin of ``nkudo_native.chapi.parse_fast`` and the authority on errors)."""
    h = data.find(_CRLF2)
    if h < 0:
        if not data:
            raise ChProtocolError("empty response: the server closed the connection without answering")
        raise ChProtocolError(f"truncated response head ({len(data)} bytes, no blank line)")
    if h + 4 > MAX_HEAD:
        raise ChProtocolError(f"response head larger than {MAX_HEAD} bytes")
    m = _STATUS_RE.match(data, 0, h + 2)
    if m is None:
        first = data[: data.find(b"\r\n")]
        raise ChProtocolError(f"invalid status line {first[:80]!r}")
    status = int(m.group(1))
    reason = (m.group(2) or b"").decode("ascii")
    block = data[m.end() : h + 2]
    if _HEADER_BLOCK_RE.fullmatch(block) is None:
        bad = _HEADER_BLOCK_RE.match(block)
        at = bad.end() if bad else 0
        line = block[at : block.find(b"\r\n", at)]
        raise ChProtocolError(f"malformed header line {line[:80]!r}")
    # The block is valid now; find the framing headers with plain byte searches
    # on a lower-cased copy (regex scans with IGNORECASE cost more than the rest).
    low = b"\r\n" + block.lower()
    length: int | None = None
    i = low.find(b"\r\ncontent-length:")
    while i >= 0:
        e = low.find(b"\r\n", i + 17)
        value = low[i + 17 : e].strip(b" \t")
        if not (value.isdigit() and len(value) <= 18):
            raise ChProtocolError(f"invalid Content-Length {value.decode('ascii')!r}")
        n = int(value)
        if length is not None and n != length:
            raise ChProtocolError("conflicting Content-Length headers")
        length = n
        i = low.find(b"\r\ncontent-length:", e)
    i = low.find(b"\r\ntransfer-encoding:")
    if i >= 0:
        te = low[i + 20 : low.find(b"\r\n", i + 20)].strip(b" \t").decode("ascii")
        raise ChProtocolError(f"unsupported Transfer-Encoding {te!r} (never sent by micro_http)")
    if 100 <= status < 200:
        raise ChProtocolError(f"unexpected informational response {status} (no Expect header was sent)")
    body_start = h + 4
    if length is None:
        if status != 204:
            raise ChProtocolError(f"response {status} without Content-Length")
        length = 0
    elif status == 204 and length != 0:
        raise ChProtocolError(f"204 response with Content-Length {length}")
    if length > MAX_BODY:
        raise ChProtocolError(f"response body of {length} bytes exceeds the {MAX_BODY}-byte limit")
    got = len(data) - body_start
    if got < length:
        raise ChProtocolError(f"truncated response body: expected {length} bytes, got {got}")
    if got > length:
        raise ChProtocolError(f"{got - length} unexpected bytes after the response body")
    return Response(status, reason, block, data[body_start:])
