"""The sans-I/O codec: exact request bytes, strict response parsing, framing twins agree."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nkudo import _native
from nkudo.chapi import codec
from nkudo.chapi.errors import (
    BadRequestError,
    ChProtocolError,
    ConflictError,
    InvalidStateError,
    NotFoundError,
    ServerError,
    TooManyRequestsError,
    VmNotCreatedError,
    status_error,
)
from tests.conftest import require_native

OK_200 = (b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n"
          b"Content-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"version\":\"1.0\"}")
NO_CONTENT = b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"


def test_build_request_matches_ch_remote() -> None:
    assert codec.build_request("PUT", "vm.boot") == (
        b"PUT /api/v1/vm.boot HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
    assert codec.build_request("PUT", "vm.create", b'{"a":1}') == (
        b"PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Length: 7\r\n\r\n{\"a\":1}")
    assert codec.build_request("PUT", "vm.boot", b"").endswith(b"Content-Length: 0\r\n\r\n")


@pytest.mark.parametrize(("method", "endpoint"), [("", "vm.boot"), ("P UT", "vm.boot"), ("PUT", ""),
                                                   ("PUT", "vm.boot HTTP/1.1\r\nX: y"), ("PUT", "../x"),
                                                   ("GÉT", "vm.info")])
def test_build_request_rejects_injection(method: str, endpoint: str) -> None:
    with pytest.raises(ValueError):
        codec.build_request(method, endpoint)


def test_parse_micro_http_responses() -> None:
    r = codec.parse_response(OK_200)
    assert (r.status, r.reason, r.body, r.ok) == (200, "", b'{"version":"1.0"}', True)
    assert r.header("Content-Type") == "application/json"
    assert r.json() == {"version": "1.0"}
    r = codec.parse_response(NO_CONTENT)
    assert (r.status, r.body) == (204, b"")
    # older micro_http sent Content-Length: 0 on 204; a reason phrase is fine too
    assert codec.parse_response(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n").status == 204
    err = codec.parse_response(b'HTTP/1.1 500 \r\nContent-Length: 31\r\n\r\n["Error from API","VM is bad!"]')
    assert err.messages() == ["Error from API", "VM is bad!"]


@pytest.mark.parametrize("body,expected", [(b"", []), (b'["a","b"]', ["a", "b"]), (b'"plain"', ["plain"]),
                                           (b"not json", ["not json"]), (b'{"x":1}', ['{"x":1}'])])
def test_messages_always_a_list_of_strings(body: bytes, expected: list[str]) -> None:
    assert codec.Response(500, "", b"", body).messages() == expected


BAD = {
    "empty": b"",
    "truncated head": b"HTTP/1.1 200 \r\nContent-Le",
    "bad version": b"HTTP/2.0 200 \r\nContent-Length: 0\r\n\r\n",
    "no space": b"HTTP/1.1200 \r\nContent-Length: 0\r\n\r\n",
    "bad code": b"HTTP/1.1 2x0 \r\nContent-Length: 0\r\n\r\n",
    "short status": b"HTTP/1.1 20\r\n\r\n",
    "code glued to reason": b"HTTP/1.1 200OK\r\nContent-Length: 0\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 \r\nContent-Length 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 \r\nContent-Length: 0\r\n folded\r\n\r\n",
    "space in name": b"HTTP/1.1 200 \r\nContent Length: 0\r\n\r\n",
    "bad length": b"HTTP/1.1 200 \r\nContent-Length: -1\r\n\r\n",
    "conflicting lengths": b"HTTP/1.1 200 \r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "chunked": b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "204 with body": b"HTTP/1.1 204 \r\nContent-Length: 2\r\n\r\n{}",
    "missing length": b"HTTP/1.1 200 \r\nServer: x\r\n\r\n{}",
    "truncated body": b"HTTP/1.1 200 \r\nContent-Length: 10\r\n\r\n{}",
    "trailing bytes": b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\n{}xx",
    "non-ascii": b"HTTP/1.1 200 \xc3\xa9\r\nContent-Length: 0\r\n\r\n",
    "control char": b"HTTP/1.1 200 \r\nServer: a\x01b\r\nContent-Length: 0\r\n\r\n",
    "informational": b"HTTP/1.1 100 \r\n\r\n",
    "huge": b"HTTP/1.1 200 \r\nContent-Length: 999999999999\r\n\r\n",
    "head too large": b"HTTP/1.1 200 \r\nX: " + b"a" * 20000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_parse_rejects_malformed(name: str) -> None:
    with pytest.raises(ChProtocolError):
        codec.parse_response(BAD[name])


@given(st.binary(max_size=400))
@settings(max_examples=400, deadline=None)
def test_parse_never_crashes(data: bytes) -> None:
    try:
        codec.parse_response(data)
    except ChProtocolError:
        pass


_http_like = st.lists(
    st.sampled_from([b"HTTP/1.1 ", b"200", b"204", b"100", b" ", b"\r\n", b"\r\n\r\n", b"Content-Length:",
                     b"content-length: ", b"CONTENT-LENGTH:\t", b"5", b"0", b"12", b"abc", b":", b"\t", b"x"]),
    max_size=30).map(b"".join)


@given(st.one_of(st.binary(max_size=300), _http_like))
@settings(max_examples=600, deadline=None)
def test_framing_twins_agree(data: bytes) -> None:
    """The native framing (C) and the codec's (Python) decide identically."""
    require_native("chapi")
    mod = _native.load("chapi")
    assert mod is not None
    assert mod.expected_size(data) == codec.expected_size(data)
    assert mod.expected_size(bytearray(data)) == codec.expected_size(bytearray(data))


HUGE = b"HTTP/1.1 200 \r\nContent-Length: 99999999999\r\n\r\n"  # over MAX_BODY: stop at the head


def test_framing_cases() -> None:
    require_native("chapi")
    mod = _native.load("chapi")
    assert mod is not None
    cases = [(OK_200, len(OK_200)), (NO_CONTENT, len(NO_CONTENT)), (OK_200[:20], -1), (b"", -1),
             (OK_200[:-3], len(OK_200)), (b"x" * 20000, 20000),
             (HUGE, len(HUGE))]
    for data, want in cases:
        assert codec.expected_size(data) == want, data[:40]
        assert mod.expected_size(data) == want, data[:40]


@pytest.mark.parametrize(("status", "messages", "cls"), [
    (400, ["Bad Request"], BadRequestError),
    (404, ["Not Found"], NotFoundError),
    (404, ["Error from API", "The VM could not boot", "VM config is missing"], VmNotCreatedError),
    (404, ["Error from API", "The VM info is not available", "VM is not created"], VmNotCreatedError),
    (409, ["Error from API", "x", "Identifier n0 is not unique"], ConflictError),
    (429, [], TooManyRequestsError),
    (500, ["Error from API", "The VM could not be paused", "invalid VM state transition: Paused to Paused"],
     InvalidStateError),
    (500, ["Error from API", "The VM could not boot", "VM is already created"], InvalidStateError),
    (500, ["Error from API", "The VM could not be snapshotted", "Cannot snapshot VM",
           "Trying to snapshot while VM is running"], InvalidStateError),
    (500, ["Error from API", "The VM could not boot", "Cannot open the kernel image"], ServerError),
])
def test_status_mapping(status: int, messages: list[str], cls: type) -> None:
    err = status_error("vm.x", status, messages)
    assert type(err) is cls
    assert err.status == status and err.messages == messages and err.endpoint == "vm.x"
    assert all(m in err.message for m in messages)


_valid_responses = st.builds(
    lambda status, reason, headers, body, cl_case: (
        f"HTTP/1.1 {status}{(' ' + reason) if reason is not None else ''}\r\n".encode()
        + b"".join(f"{n}: {v}\r\n".encode() for n, v in headers)
        + ((cl_case + f": {len(body)}\r\n").encode() if status != 204 else b"")
        + b"\r\n"
        + (body if status != 204 else b"")
    ),
    st.sampled_from([200, 204, 400, 404, 500, 101]),
    st.one_of(st.none(), st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)),
    st.lists(st.tuples(st.sampled_from(["Server", "Content-Type", "X-A", "Transfer-Encoding", "content-length"]),
                       st.text(alphabet="abc 12\t", max_size=8)), max_size=3),
    st.binary(max_size=40),
    st.sampled_from(["Content-Length", "content-length", "CONTENT-LENGTH"]),
)


def _outcome(fn: object, data: bytes) -> object:
    try:
        r = fn(data)  # type: ignore[operator]
        return ("ok", r.status, r.reason, r.raw_headers, r.body)
    except ChProtocolError as exc:
        return ("error", str(exc))


@given(st.one_of(_valid_responses, _valid_responses.map(lambda d: d[:-1]), _valid_responses.map(lambda d: d + b"x"),
                 _http_like, st.binary(max_size=200)))
@settings(max_examples=1500, deadline=None)
def test_native_fast_parse_agrees_with_python_parser(data: bytes) -> None:
    """Whenever the native fast path answers, the Python parser accepts with the same values;
    and the public parser gives exactly the Python parser's results and errors."""
    require_native("chapi")
    mod = _native.load("chapi")
    assert mod is not None
    fast = mod.parse_fast(data)
    py = _outcome(codec.parse_response_py, data)
    if fast is not None:
        assert py == ("ok", fast[0], fast[1].decode("ascii"), fast[2], fast[3])
    assert _outcome(codec.parse_response, data) == py


def test_native_fast_parse_takes_the_common_responses() -> None:
    require_native("chapi")
    mod = _native.load("chapi")
    assert mod is not None
    ok = b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    assert mod.parse_fast(ok) == (200, b"", ok[15:ok.index(b"\r\n\r\n") + 2], b"{}")
    assert mod.parse_fast(b"HTTP/1.1 204 No Content\r\n\r\n") == (204, b"No Content", b"", b"")
    assert mod.parse_fast(b"HTTP/1.1 500 \r\nContent-Length: 4\r\n\r\n[\"\"]") is not None


# --- boundaries (issue 10, "tests that must exist") ------------------------------------------------
# Each case is one side of an off-by-one that the tests above let through: ">" vs ">=" on MAX_BODY,
# a trailing byte ignored, a 19th digit accepted (and a 19/20-digit value overflowing a C long long).

_HEAD = b"HTTP/1.1 200 \r\nContent-Length: "


def _resp(length: bytes, body: bytes) -> bytes:
    return _HEAD + length + b"\r\n\r\n" + body


def _head_len(length: bytes) -> int:
    return len(_HEAD) + len(length) + 4


def _assert_rejected(data: bytes, message: str) -> None:
    """The Python parser (authority) and the public parser reject with ``message``; the native fast path
    declines (the Python half runs even where the native module is legitimately disabled)."""
    with pytest.raises(ChProtocolError, match=message):
        codec.parse_response_py(data)
    with pytest.raises(ChProtocolError, match=message):
        codec.parse_response(data)
    require_native("chapi")
    mod = _native.load("chapi")
    assert mod is not None
    assert mod.parse_fast(data) is None


def _assert_accepted(data: bytes, body_len: int) -> None:
    """Both parsers accept with the same body; the fast path really takes it (no silent fallback)."""
    r = codec.parse_response_py(data)
    assert (r.status, len(r.body)) == (200, body_len)
    assert len(codec.parse_response(data).body) == body_len
    require_native("chapi")
    mod = _native.load("chapi")
    assert mod is not None
    fast = mod.parse_fast(data)
    assert fast is not None, "native fast path declined a valid response"
    assert (fast[0], len(fast[3]), fast[3] == r.body) == (200, body_len, True)


def _assert_framing(data: bytes, want: int) -> None:
    assert codec.expected_size(data) == want
    require_native("chapi")
    mod = _native.load("chapi")
    assert mod is not None
    assert mod.expected_size(data) == want


def test_one_trailing_byte_after_the_body_is_rejected() -> None:
    """Issue 10 (tests that must exist): exactly one byte after the body must be an error in both parsers,
    and the framing of both transports stops before it."""
    ok = _resp(b"2", b"{}")
    _assert_accepted(ok, 2)
    _assert_rejected(ok + b"x", "1 unexpected bytes after the response body")
    _assert_rejected(ok[:-1], "truncated response body: expected 2 bytes, got 1")
    _assert_framing(ok + b"x", len(ok))


def test_body_of_exactly_max_body_is_accepted_and_one_more_is_not() -> None:
    """Issue 10 (tests that must exist): Content-Length == MAX_BODY is valid (``>`` not ``>=``);
    MAX_BODY + 1 is refused by both parsers and framed as the head alone by both transports."""
    at = str(codec.MAX_BODY).encode()
    data = _resp(at, b"\0" * codec.MAX_BODY)
    _assert_accepted(data, codec.MAX_BODY)
    _assert_framing(data, len(data))
    del data
    over = str(codec.MAX_BODY + 1).encode()
    data = _resp(over, b"\0" * (codec.MAX_BODY + 1))
    _assert_rejected(data, f"exceeds the {codec.MAX_BODY}-byte limit")
    _assert_framing(data, _head_len(over))


@pytest.mark.parametrize("length", [
    b"0000000000000000002",   # 19 digits, value 2: a 19th digit must not be accepted
    b"9223372036854775810",   # 19 digits, 2**63 + 2: overflows a signed 64-bit integer
    b"18446744073709551618",  # 20 digits, 2**64 + 2: wraps to 2 in 64-bit arithmetic
])
def test_content_length_of_19_or_more_digits_is_rejected(length: bytes) -> None:
    """Issue 10 (tests that must exist): at most 18 digits (so C never overflows); a longer length is
    an error in the Python parser, declined by the fast path, and framed as the head alone."""
    data = _resp(length, b"{}")
    _assert_rejected(data, "invalid Content-Length")
    _assert_framing(data, _head_len(length))


def test_content_length_of_18_digits_is_accepted() -> None:
    """Issue 10 (tests that must exist): the other side of the digit limit: 18 digits are fine."""
    length = b"000000000000000002"
    data = _resp(length, b"{}")
    _assert_accepted(data, 2)
    _assert_framing(data, len(data))
