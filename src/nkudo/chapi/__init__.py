"""Cloud Hypervisor API client: sans-I/O codec, native + Python transports, typed calls.

Use :class:`ChClient` for calls and :func:`wait_ready` after spawning a VMM.
"""

from __future__ import annotations

from nkudo.chapi.client import ChClient, PciDeviceInfo, PingInfo, Timeouts, VmInfo, wait_ready
from nkudo.chapi.codec import Response, build_request, expected_size, parse_response
from nkudo.chapi.errors import (
    BadRequestError,
    ChApiError,
    ChProtocolError,
    ChStatusError,
    ChTimeoutError,
    ChTransportError,
    ConflictError,
    ConnectionClosedError,
    InvalidStateError,
    NotFoundError,
    ServerError,
    SocketMissingError,
    TooManyRequestsError,
    VmmConnectionRefusedError,
    VmNotCreatedError,
)

__all__ = [
    "BadRequestError",
    "ChApiError",
    "ChClient",
    "ChProtocolError",
    "ChStatusError",
    "ChTimeoutError",
    "ChTransportError",
    "ConflictError",
    "ConnectionClosedError",
    "InvalidStateError",
    "NotFoundError",
    "PciDeviceInfo",
    "PingInfo",
    "Response",
    "ServerError",
    "SocketMissingError",
    "Timeouts",
    "TooManyRequestsError",
    "VmInfo",
    "VmNotCreatedError",
    "VmmConnectionRefusedError",
    "build_request",
    "expected_size",
    "parse_response",
    "wait_ready",
]
