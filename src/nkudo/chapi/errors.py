"""Typed errors of the Cloud Hypervisor API client.

Why so many classes: the agent reacts differently to "the VMM is not there"
(restart it), "the VMM is busy" (a timeout during a snapshot is not a death),
"the VM is in the wrong state" (make the call idempotent) and "we sent a bad
request" (a bug: do not retry). Every error carries the server's own error
chain (``messages``, the JSON list CH sends) so logs show the root cause.

Status mapping follows the real server, not the OpenAPI file: 405 is never
sent; a wrong-state call answers 500; 404 means "no VM / no config" on a
``vm.*`` action, "unknown device id" on ``remove-device`` (newer CH), or an
unknown path.
"""

from __future__ import annotations

from nkudo.errors import NkudoError


class ChApiError(NkudoError):
    """Base of every Cloud Hypervisor API client error."""

    code = "CH_API_ERROR"

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
        messages: list[str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.endpoint = endpoint
        self.status = status
        self.messages: list[str] = list(messages or [])

    def to_dict(self) -> dict[str, str]:
        out = super().to_dict()
        if self.endpoint is not None:
            out["endpoint"] = self.endpoint
        if self.status is not None:
            out["status"] = str(self.status)
        if self.messages:
            out["server_messages"] = ": ".join(self.messages)
        return out


class ChProtocolError(ChApiError):
    """The bytes that came back are not a response micro_http could have sent."""

    code = "CH_PROTOCOL"


# --- transport -------------------------------------------------------------------------------


class ChTransportError(ChApiError):
    """The request did not complete at the socket level (no HTTP status)."""

    code = "CH_TRANSPORT"

    def __init__(self, message: str, *, endpoint: str | None = None, errno: int | None = None,
                 stage: str | None = None, socket_path: str | None = None) -> None:
        super().__init__(message, endpoint=endpoint)
        self.errno = errno
        self.stage = stage
        self.socket_path = socket_path


class SocketMissingError(ChTransportError):
    """No API socket file: the VMM has not bound it yet, or it exited cleanly."""

    code = "CH_SOCKET_MISSING"


class VmmConnectionRefusedError(ChTransportError):
    """A socket file without a listener: a stale socket from a crashed VMM."""

    code = "CH_CONNECTION_REFUSED"


class ConnectionClosedError(ChTransportError):
    """The VMM closed or reset the connection before a full response arrived."""

    code = "CH_CONNECTION_CLOSED"


class ChTimeoutError(ChTransportError):
    """No complete response within the call's timeout (the VMM may just be busy)."""

    code = "CH_TIMEOUT"
    is_timeout = True
    is_retryable = True


# --- HTTP status -----------------------------------------------------------------------------


class ChStatusError(ChApiError):
    """The server answered with a non-2xx status; ``messages`` is its error chain."""

    code = "CH_STATUS"


class BadRequestError(ChStatusError):
    """400: body missing/invalid/unexpected, wrong HTTP method, or config validation."""

    code = "CH_BAD_REQUEST"


class NotFoundError(ChStatusError):
    """404: unknown path or (newer CH) unknown device id."""

    code = "CH_NOT_FOUND"


class VmNotCreatedError(NotFoundError):
    """404 from ``VmNotCreated`` / ``VmMissingConfig``: there is no VM (config) yet."""

    code = "CH_VM_NOT_CREATED"


class ConflictError(ChStatusError):
    """409: a device identifier or path is already in use."""

    code = "CH_CONFLICT"


class ServerError(ChStatusError):
    """500: every other VMM error (CH maps nearly everything to 500)."""

    code = "CH_SERVER_ERROR"


class InvalidStateError(ServerError):
    """500 whose error chain says the VM is in the wrong state for the call.

    CH documents these as 405 but sends 500; the state is recognised from the
    error chain text (``VmNotRunning``, ``VmAlreadyCreated``,
    ``InvalidStateTransition``, snapshot-while-running).
    """

    code = "CH_INVALID_STATE"


class TooManyRequestsError(ChStatusError):
    """429: ``vm.resize`` while a vCPU removal is still pending."""

    code = "CH_TOO_MANY_REQUESTS"
    is_retryable = True


_NOT_CREATED_MARKERS = ("VM is not created", "VM config is missing", "The VM is not created")
_STATE_MARKERS = (
    "VM is not running",
    "VM is already created",
    "invalid VM state transition",
    "while VM is running",
    "The VM is not booted",
    "VM is not booted",
)


def status_error(endpoint: str, status: int, messages: list[str]) -> ChStatusError:
    """The typed exception for a non-2xx answer to ``endpoint``."""
    chain = ": ".join(messages) if messages else "(no error body)"
    text = f"{endpoint} failed with HTTP {status}: {chain}"
    cls: type[ChStatusError]
    if status == 400:
        cls = BadRequestError
    elif status == 404:
        cls = VmNotCreatedError if any(m in s for s in messages for m in _NOT_CREATED_MARKERS) else NotFoundError
    elif status == 409:
        cls = ConflictError
    elif status == 429:
        cls = TooManyRequestsError
    elif status == 500:
        cls = InvalidStateError if any(m in s for s in messages for m in _STATE_MARKERS) else ServerError
    else:
        cls = ChStatusError
    return cls(text, endpoint=endpoint, status=status, messages=messages)
