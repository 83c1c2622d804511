"""Python transport for QMP: one AF_UNIX stream connection, bytes both ways, one deadline.

Why a connection per client (not per command, unlike the CH API): QMP is a
session (greeting, negotiation, events), and QEMU serves one monitor client at
a time, so the provider connects, does its calls and disconnects. File
descriptors (``getfd`` for a snapshot file) travel as SCM_RIGHTS with the
command that names them. Errors are the typed ones of :mod:`nkudo.qmp.errors`.
"""

from __future__ import annotations

import array
import errno as E
import os
import socket
import time
from collections.abc import Sequence

from nkudo.qmp.errors import (
    QmpConnectionClosedError,
    QmpConnectionRefusedError,
    QmpSocketMissingError,
    QmpTimeoutError,
    QmpTransportError,
)

#: Linux ``sun_path`` is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def _err(exc: OSError, stage: str, path: str, timeout: float) -> QmpTransportError:
    num = exc.errno or 0
    if isinstance(exc, TimeoutError) or num == E.ETIMEDOUT:
        return QmpTimeoutError(f"no answer from QMP socket {path} within {timeout:g}s ({stage})",
                               errno=E.ETIMEDOUT, stage=stage, socket_path=path)  # fmt: skip
    if num == E.ENOENT and stage == "connect":
        return QmpSocketMissingError(f"QMP socket {path} does not exist", errno=num, stage=stage, socket_path=path)
    if num == E.ECONNREFUSED:
        return QmpConnectionRefusedError(
            f"connection refused on {path} (no QEMU listening: stale socket?)", errno=num, stage=stage,
            socket_path=path,
        )  # fmt: skip
    if num in (E.EPIPE, E.ECONNRESET):
        return QmpConnectionClosedError(f"QEMU closed {path} during {stage}", errno=num, stage=stage, socket_path=path)
    return QmpTransportError(f"{stage} on {path} failed: {os.strerror(num)}", errno=num, stage=stage, socket_path=path)


class QmpSocket:
    """A connected QMP stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        bpath = os.fsencode(path)
        if not bpath or len(bpath) > MAX_SOCKET_PATH or b"\0" in bpath:
            raise QmpTransportError(
                f"invalid QMP socket path ({len(bpath)} bytes, Linux allows {MAX_SOCKET_PATH}): {path}",
                errno=E.ENAMETOOLONG, stage="connect", socket_path=path,
            )  # fmt: skip
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.settimeout(max(timeout, 0.001))
            self._sock.connect(bpath)
        except OSError as exc:
            self._sock.close()
            raise _err(exc, "connect", path, timeout) from None

    def send(self, data: bytes, fds: Sequence[int] = (), *, timeout: float) -> None:
        try:
            self._sock.settimeout(max(timeout, 0.001))
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self._sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
            else:
                sent = self._sock.send(data, socket.MSG_NOSIGNAL)
            if sent < len(data):
                self._sock.sendall(data[sent:], socket.MSG_NOSIGNAL)
        except OSError as exc:
            raise _err(exc, "send", self.path, timeout) from None

    def recv(self, *, timeout: float) -> bytes:
        """Some bytes (b"" at EOF). ``QmpTimeoutError`` when nothing arrives within ``timeout``."""
        try:
            self._sock.settimeout(max(timeout, 0.001))
            return self._sock.recv(65536)
        except OSError as exc:
            raise _err(exc, "recv", self.path, timeout) from None

    def close(self) -> None:
        self._sock.close()


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
