"""The one vocabulary the agent, the control plane, metrics and the CLI share.

Why one module: the same words (``SUCCEEDED``, ``MicroVMCreate``, ``VM_NOT_FOUND``) used to be
spelt as string literals in a dozen modules, so a typo or a new value in one was a silent
mismatch in another. Each set of values is defined here once, as a ``StrEnum`` (members are
``str``, so JSON, SQL columns and log fields carry exactly the same text as before); VM states
live next door in :mod:`nkudo.vmstate`. Nothing here imports anything of nkudo's.
"""

from __future__ import annotations

import enum
from typing import Final, Literal, cast, get_args


class ExecState(enum.StrEnum):
    """State of one execution (one action of a plan) on the control plane."""

    PENDING = "PENDING"
    LEASED = "LEASED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"


class ResultStatus(enum.StrEnum):
    """How one action ended on the agent (executor outcome, stored result, metrics, CLI)."""

    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    #: Skipped because an earlier action of the plan failed: never journalled, never reported.
    NOT_RUN = "NOT_RUN"

    @property
    def ran(self) -> bool:
        """The action ran to an end (a terminal, recorded, reported result)."""
        return self is not ResultStatus.NOT_RUN

    @property
    def ok(self) -> bool:
        return self is ResultStatus.SUCCEEDED


#: The statuses an agent may report (``ActionResult.status``). A ``Literal`` rather than the enum
#: because msgspec takes no enum subset and ``NOT_RUN`` must stay a 400; checked against
#: :class:`ResultStatus` below so the two cannot drift.
ReportedStatus = Literal["SUCCEEDED", "FAILED", "TIMED_OUT"]
REPORTED: Final = frozenset(s for s in ResultStatus if s.ran)
if set(get_args(ReportedStatus)) != {s.value for s in REPORTED}:  # pragma: no cover - a definition error
    raise AssertionError("ReportedStatus must list exactly the ResultStatus values that ran")


def reported_status(status: ResultStatus) -> ReportedStatus:
    """``status`` as the wire's ``ActionResult.status``; ``NOT_RUN`` is never reported (ValueError)."""
    if status not in REPORTED:
        raise ValueError(f"{status} is not a reportable result status")
    return cast(ReportedStatus, status.value)


class ActionType(enum.StrEnum):
    """The nine plan action types (``nkudo.wire.actions.ACTION_TYPES`` maps each to its params)."""

    MICROVM_CREATE = "MicroVMCreate"
    MICROVM_START = "MicroVMStart"
    MICROVM_STOP = "MicroVMStop"
    MICROVM_DELETE = "MicroVMDelete"
    MICROVM_PAUSE = "MicroVMPause"
    MICROVM_RESUME = "MicroVMResume"
    MICROVM_SNAPSHOT = "MicroVMSnapshot"
    MICROVM_RESTORE = "MicroVMRestore"
    COMMAND_EXECUTE = "CommandExecute"

    @property
    def repeatable(self) -> bool:
        """Whether an interrupted run may be re-driven: VM handlers converge, a command must not run twice."""
        return self is not ActionType.COMMAND_EXECUTE


class LogLevel(enum.StrEnum):
    """Levels of action log lines (``nkudo.wire.messages.LogLine.level``)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARN = "WARN"
    ERROR = "ERROR"


class ErrorCode(enum.StrEnum):
    """Registry of the stable error codes the agent side produces or acts on.

    Error *classes* say what an error is (``NkudoError.is_timeout``, ``is_retryable``,
    ``CpError.identity_gone``); the codes are what results, operators' scripts and tests match
    on. ``tests/agent/test_vocab.py`` checks that every code spelt in the agent, wire, CLI and
    hypervisor/network/process error modules is registered here.
    """

    # generic (nkudo.errors, nkudo.wire)
    INTERNAL = "INTERNAL"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    HOST_ERROR = "HOST_ERROR"
    USAGE = "USAGE"
    # executor
    ACTION_CONFLICT = "ACTION_CONFLICT"
    INTERRUPTED = "INTERRUPTED"
    NOT_RUN = "NOT_RUN"
    TIMED_OUT = "TIMED_OUT"
    UNSUPPORTED_ACTION = "UNSUPPORTED_ACTION"
    # VM handlers and providers
    BOOT_FAILED = "BOOT_FAILED"
    INVALID_STATE = "INVALID_STATE"
    RESTORE_FAILED = "RESTORE_FAILED"
    SNAPSHOT_EXISTS = "SNAPSHOT_EXISTS"
    SNAPSHOT_FAILED = "SNAPSHOT_FAILED"
    SNAPSHOT_INVALID = "SNAPSHOT_INVALID"
    SNAPSHOT_NOT_FOUND = "SNAPSHOT_NOT_FOUND"
    VM_BROKEN = "VM_BROKEN"
    VM_EXISTS = "VM_EXISTS"
    VM_NOT_FOUND = "VM_NOT_FOUND"
    VM_NOT_RUNNING = "VM_NOT_RUNNING"
    VMM_START_FAILED = "VMM_START_FAILED"
    VMM_STILL_RUNNING = "VMM_STILL_RUNNING"
    # host files and commands
    COMMAND_FAILED = "COMMAND_FAILED"
    COMMAND_NOT_ALLOWED = "COMMAND_NOT_ALLOWED"
    DISK_TOO_LARGE = "DISK_TOO_LARGE"
    FILE_NOT_FOUND = "FILE_NOT_FOUND"
    HOST_IO_ERROR = "HOST_IO_ERROR"
    INSUFFICIENT_SPACE = "INSUFFICIENT_SPACE"
    PATH_ESCAPE = "PATH_ESCAPE"
    PATH_NOT_ALLOWED = "PATH_NOT_ALLOWED"
    PATH_TOO_LONG = "PATH_TOO_LONG"
    METRICS_BIND_FAILED = "METRICS_BIND_FAILED"
    # enrolment and the control plane link
    ALREADY_ENROLLED = "ALREADY_ENROLLED"
    # enrolment refused by the control plane (the CLI advises on each)
    HOST_ALREADY_ENROLLED = "HOST_ALREADY_ENROLLED"
    INVALID_CSR = "INVALID_CSR"
    TOKEN_ALREADY_USED = "TOKEN_ALREADY_USED"  # noqa: S105 - an error code, not a secret
    TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105 - an error code, not a secret
    TOKEN_INVALID = "TOKEN_INVALID"  # noqa: S105 - an error code, not a secret
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"  # issue 12: a tenant limit (the error's field names it)
    NOT_ENROLLED = "NOT_ENROLLED"
    RENEW_NOT_DUE = "RENEW_NOT_DUE"
    CP_BAD_RESPONSE = "CP_BAD_RESPONSE"
    CP_TLS_UNTRUSTED = "CP_TLS_UNTRUSTED"
    CP_UNREACHABLE = "CP_UNREACHABLE"
    # issue 12: the control plane's 429s (the agent waits for Retry-After)
    RATE_LIMITED = "RATE_LIMITED"
    LOCKED_OUT = "LOCKED_OUT"
    CREDENTIALS_PENDING = "CREDENTIALS_PENDING"
    # control-plane answers meaning this agent's identity is gone (see IDENTITY_GONE)
    AGENT_UNENROLLED = "AGENT_UNENROLLED"
    CERTIFICATE_REVOKED = "CERTIFICATE_REVOKED"
    UNKNOWN_AGENT = "UNKNOWN_AGENT"
    # processes (nkudo.proc)
    ADOPT_REFUSED = "ADOPT_REFUSED"
    PROCESS_ERROR = "PROCESS_ERROR"
    PROCESS_GONE = "PROCESS_GONE"
    SPAWN_FAILED = "SPAWN_FAILED"
    STOP_TIMEOUT = "STOP_TIMEOUT"
    # host networking (nkudo.net)
    NET_BACKEND_UNAVAILABLE = "NET_BACKEND_UNAVAILABLE"
    NET_BRIDGE_MISSING = "NET_BRIDGE_MISSING"
    NET_ERROR = "NET_ERROR"
    NET_INVALID_ARGUMENT = "NET_INVALID_ARGUMENT"
    NET_INVALID_NAME = "NET_INVALID_NAME"
    NET_NAME_TAKEN = "NET_NAME_TAKEN"
    NET_NOT_A_BRIDGE = "NET_NOT_A_BRIDGE"
    NET_NOT_FOUND = "NET_NOT_FOUND"
    NET_NOT_OWNED = "NET_NOT_OWNED"
    NET_PERMISSION_DENIED = "NET_PERMISSION_DENIED"
    # Cloud Hypervisor API (nkudo.chapi)
    CH_API_ERROR = "CH_API_ERROR"
    CH_BAD_REQUEST = "CH_BAD_REQUEST"
    CH_CONFLICT = "CH_CONFLICT"
    CH_CONNECTION_CLOSED = "CH_CONNECTION_CLOSED"
    CH_CONNECTION_REFUSED = "CH_CONNECTION_REFUSED"
    CH_INVALID_STATE = "CH_INVALID_STATE"
    CH_NOT_FOUND = "CH_NOT_FOUND"
    CH_PROTOCOL = "CH_PROTOCOL"
    CH_SERVER_ERROR = "CH_SERVER_ERROR"
    CH_SOCKET_MISSING = "CH_SOCKET_MISSING"
    CH_STATUS = "CH_STATUS"
    CH_TIMEOUT = "CH_TIMEOUT"
    CH_TOO_MANY_REQUESTS = "CH_TOO_MANY_REQUESTS"
    CH_TRANSPORT = "CH_TRANSPORT"
    CH_VM_NOT_CREATED = "CH_VM_NOT_CREATED"
    # QEMU QMP (nkudo.qmp)
    QMP_COMMAND_FAILED = "QMP_COMMAND_FAILED"
    QMP_COMMAND_NOT_FOUND = "QMP_COMMAND_NOT_FOUND"
    QMP_CONNECTION_CLOSED = "QMP_CONNECTION_CLOSED"
    QMP_CONNECTION_REFUSED = "QMP_CONNECTION_REFUSED"
    QMP_DEVICE_NOT_ACTIVE = "QMP_DEVICE_NOT_ACTIVE"
    QMP_DEVICE_NOT_FOUND = "QMP_DEVICE_NOT_FOUND"
    QMP_ERROR = "QMP_ERROR"
    QMP_GENERIC_ERROR = "QMP_GENERIC_ERROR"
    QMP_KVM_MISSING_CAP = "QMP_KVM_MISSING_CAP"
    QMP_PROTOCOL = "QMP_PROTOCOL"
    QMP_SOCKET_MISSING = "QMP_SOCKET_MISSING"
    QMP_TIMEOUT = "QMP_TIMEOUT"
    QMP_TRANSPORT = "QMP_TRANSPORT"


#: Control-plane answers that mean this agent's identity is no longer usable: stop, do not retry.
IDENTITY_GONE: Final = frozenset({ErrorCode.UNKNOWN_AGENT, ErrorCode.AGENT_UNENROLLED, ErrorCode.CERTIFICATE_REVOKED})


class ConsoleState(enum.StrEnum):
    """Where a console tail asked of the control plane stands (issue 15, ``GET /vms/{vm_id}/console``)."""

    PENDING = "PENDING"  # asked; the host's agent ships it on its next heartbeat
    READY = "READY"  # shipped: ``text`` holds the tail
    UNAVAILABLE = "UNAVAILABLE"  # the host has no console for this VM (or the VM has no host)
