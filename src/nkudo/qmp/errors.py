"""Typed errors of the QMP client.

Why typed: the QEMU provider reacts differently to "QEMU is not there" (start
it again), "QEMU said no" (``GenericError`` for a call in the wrong state,
``CommandNotFound`` for an older QEMU) and "the bytes make no sense" (a bug or
a different program on the socket: never retry blindly).
"""

from __future__ import annotations

from nkudo.errors import NkudoError


class QmpError(NkudoError):
    """Base of every QMP client error."""

    code = "QMP_ERROR"


class QmpProtocolError(QmpError):
    """What came back is not something a QMP server sends (bad JSON, no greeting, unknown id)."""

    code = "QMP_PROTOCOL"


class QmpCommandError(QmpError):
    """QEMU answered a command with ``{"error": {"class": ..., "desc": ...}}``."""

    code = "QMP_COMMAND_FAILED"

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc

    def to_dict(self) -> dict[str, str]:
        out = super().to_dict()
        out.update(command=self.command, qmp_class=self.error_class)
        return out


class GenericError(QmpCommandError):
    """QEMU's catch-all class: most refusals, e.g. ``cont`` when the guest needs a reset."""

    code = "QMP_GENERIC_ERROR"


class CommandNotFoundError(QmpCommandError):
    """The command does not exist in this QEMU (older version, or a typo)."""

    code = "QMP_COMMAND_NOT_FOUND"


class DeviceNotFoundError(QmpCommandError):
    code = "QMP_DEVICE_NOT_FOUND"


class DeviceNotActiveError(QmpCommandError):
    code = "QMP_DEVICE_NOT_ACTIVE"


class KvmMissingCapError(QmpCommandError):
    code = "QMP_KVM_MISSING_CAP"


#: QMP error ``class`` -> exception type (QEMU's ErrorClass enum, qapi/error.json).
ERROR_CLASSES: dict[str, type[QmpCommandError]] = {
    "GenericError": GenericError,
    "CommandNotFound": CommandNotFoundError,
    "DeviceNotFound": DeviceNotFoundError,
    "DeviceNotActive": DeviceNotActiveError,
    "KVMMissingCap": KvmMissingCapError,
}


class QmpTransportError(QmpError):
    """The exchange did not complete at the socket level."""

    code = "QMP_TRANSPORT"

    def __init__(self, message: str, *, errno: int | None = None, stage: str = "?", socket_path: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.stage = stage
        self.socket_path = socket_path


class QmpTimeoutError(QmpTransportError):
    """No complete answer within the call's timeout (QEMU's main loop may just be busy)."""

    code = "QMP_TIMEOUT"
    is_timeout = True
    is_retryable = True


class QmpSocketMissingError(QmpTransportError):
    code = "QMP_SOCKET_MISSING"


class QmpConnectionRefusedError(QmpTransportError):
    code = "QMP_CONNECTION_REFUSED"


class QmpConnectionClosedError(QmpTransportError):
    """QEMU closed the connection (it is exiting, e.g. after ``quit`` or a guest power-off)."""

    code = "QMP_CONNECTION_CLOSED"
