"""Pure-Python twin of ``nkudo_native.chapi``, registered in ``nkudo._native``.

Why a module of its own: the loader hands callers the compiled module or this
one, so both must offer the same public names. The bodies live where they
belong (the codec and the transport); ``parse_fast`` here keeps the native
contract: a tuple for a well-formed response, None for anything else.
"""

from __future__ import annotations

from nkudo.chapi.codec import expected_size, parse_response_py
from nkudo.chapi.errors import ChProtocolError
from nkudo.chapi.transport import roundtrip_py as roundtrip

__all__ = ["expected_size", "parse_fast", "roundtrip"]


def parse_fast(data: bytes) -> tuple[int, bytes, bytes, bytes] | None:
    """``(status, reason, header_block, body)`` of a well-formed response, else None."""
    try:
        r = parse_response_py(data)
    except ChProtocolError:
        return None
    return (r.status, r.reason.encode("ascii"), r.raw_headers, r.body)
