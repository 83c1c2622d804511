"""QMP (QEMU Machine Protocol) client: sans-I/O codec, socket transport, typed errors.

Use :class:`QmpClient` for a session; :class:`QmpCodec` is the protocol alone.
"""

from __future__ import annotations

from nkudo.qmp.client import QmpClient
from nkudo.qmp.codec import Error, Event, Greeting, Message, QmpCodec, Return
from nkudo.qmp.errors import (
    CommandNotFoundError,
    DeviceNotActiveError,
    DeviceNotFoundError,
    GenericError,
    KvmMissingCapError,
    QmpCommandError,
    QmpConnectionClosedError,
    QmpConnectionRefusedError,
    QmpError,
    QmpProtocolError,
    QmpSocketMissingError,
    QmpTimeoutError,
    QmpTransportError,
)

__all__ = [
    "CommandNotFoundError",
    "DeviceNotActiveError",
    "DeviceNotFoundError",
    "Error",
    "Event",
    "GenericError",
    "Greeting",
    "KvmMissingCapError",
    "Message",
    "QmpClient",
    "QmpCodec",
    "QmpCommandError",
    "QmpConnectionClosedError",
    "QmpConnectionRefusedError",
    "QmpError",
    "QmpProtocolError",
    "QmpSocketMissingError",
    "QmpTimeoutError",
    "QmpTransportError",
    "Return",
]
