"""Transports: move request bytes to the VMM's API socket and the response back.

Two implementations with one contract (see ``nkudo_native/chapi.pyx``):
the compiled ``nkudo_native.chapi.roundtrip`` and :func:`roundtrip_py` here,
written with the ``socket`` module. Both open one connection per request (as
``ch-remote`` does: the server is single-threaded and keeps idle keep-alive
connections registered, so short connections are the polite choice), attach
fds as SCM_RIGHTS to the first ``sendmsg``, read until the codec's framing
says the response is complete, and honour one deadline for the whole
exchange. Errors become ``OSError(errno, stage)`` in both, and
:func:`exchange` turns those into the same typed exceptions.
"""

from __future__ import annotations

import array
import errno as E
import os
import socket
import time
from collections.abc import Callable, Sequence

from nkudo import _native
from nkudo.chapi import codec
from nkudo.chapi.errors import (
    ChTimeoutError,
    ChTransportError,
    ConnectionClosedError,
    SocketMissingError,
    VmmConnectionRefusedError,
)

Roundtrip = Callable[[bytes, bytes, Sequence[int], float], bytes]

#: Linux ``sun_path`` is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: SCM_MAX_FD.
MAX_FDS = 253
_RECV_CHUNK = 4096


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def roundtrip_py(path: bytes, request: bytes, fds: Sequence[int], timeout: float) -> bytes:
    """Pure-Python twin of ``nkudo_native.chapi.roundtrip`` (same results, same errors)."""
    if len(fds) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} file descriptors per request")
    deadline = time.monotonic() + timeout
    if not path or len(path) > MAX_SOCKET_PATH:
        raise OSError(E.ENAMETOOLONG, "connect")
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, "socket") from None
    try:
        stage = "connect"
        try:
            while True:
                sock.settimeout(_remaining(deadline))
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:  # EAGAIN: listen backlog full, the server is busy
                    if _remaining(deadline) == 0.0:
                        raise OSError(E.ETIMEDOUT, stage) from None
                    time.sleep(0.001)
            stage = "send"
            view = memoryview(request)
            sock.settimeout(_remaining(deadline))
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = sock.sendmsg([view], ancillary, socket.MSG_NOSIGNAL)
            else:
                sent = sock.send(view, socket.MSG_NOSIGNAL)
            while sent < len(view):
                sock.settimeout(_remaining(deadline))
                sent += sock.send(view[sent:], socket.MSG_NOSIGNAL)
            stage = "recv"
            buf = bytearray()
            while True:
                want = codec.expected_size(buf)
                if 0 <= want <= len(buf):
                    del buf[want:]
                    break
                sock.settimeout(_remaining(deadline))
                chunk = sock.recv(max(_RECV_CHUNK, want - len(buf)))
                if not chunk:
                    break
                buf += chunk
            return bytes(buf)
        except (TimeoutError, BlockingIOError):
            raise OSError(E.ETIMEDOUT, stage) from None
        except OSError as exc:
            if exc.errno is None or exc.strerror in ("socket", "connect", "send", "recv"):
                raise
            raise OSError(exc.errno, stage) from None
    finally:
        sock.close()


def resolve(transport: str | None) -> tuple[str, Roundtrip]:
    """Pick a transport: ``"native"``, ``"python"`` or None (native when available).

    The choice is ``nkudo._native``'s (the twin's ``roundtrip`` is :func:`roundtrip_py`).
    """
    if transport in (None, "auto", "native", "python"):
        want = {"native": True, "python": False}.get(transport or "auto")
        try:
            b = _native.binding("chapi", want)
        except _native.NativeUnavailable as exc:
            raise ChTransportError(f"native CH API transport unavailable: {exc.reason}") from None
        fn: Roundtrip = b.module.roundtrip
        return ("native" if b.native else "python"), fn
    raise ValueError(f"transport must be 'native', 'python' or None (got {transport!r})")


def exchange(
    fn: Roundtrip, socket_path: str, endpoint: str, request: bytes, fds: Sequence[int], timeout: float,
    bpath: bytes | None = None,
) -> codec.Response:
    """One request/response over ``fn``; typed errors, identical for both transports.

    ``bpath`` is ``os.fsencode(socket_path)`` when the caller has it cached.
    """
    if bpath is None:
        bpath = os.fsencode(socket_path)
    if len(bpath) > MAX_SOCKET_PATH or b"\0" in bpath:
        raise ChTransportError(
            f"{endpoint}: invalid API socket path ({len(bpath)} bytes, Linux allows {MAX_SOCKET_PATH}, "
            f"no NUL): {socket_path}",
            endpoint=endpoint, errno=E.ENAMETOOLONG, stage="connect", socket_path=socket_path,
        )
    if timeout <= 0:
        raise ValueError(f"timeout must be positive (got {timeout})")
    try:
        raw = fn(bpath, request, fds, timeout)
    except OSError as exc:
        raise transport_error(exc, endpoint, socket_path, timeout) from None
    if not raw:
        raise ConnectionClosedError(
            f"{endpoint}: the VMM closed the connection on {socket_path} without answering",
            endpoint=endpoint, errno=None, stage="recv", socket_path=socket_path,
        )
    return codec.parse_response(raw)


def transport_error(exc: OSError, endpoint: str, socket_path: str, timeout: float) -> ChTransportError:
    """Map ``OSError(errno, stage)`` to the typed transport error."""
    num = exc.errno or 0
    stage = exc.strerror or "?"
    cls: type[ChTransportError] = ChTransportError
    if num == E.ETIMEDOUT:
        cls, text = ChTimeoutError, f"no response from {socket_path} within {timeout:g}s ({stage})"
    elif num == E.ENOENT and stage == "connect":
        cls, text = SocketMissingError, f"API socket {socket_path} does not exist"
    elif num == E.ECONNREFUSED:
        cls, text = VmmConnectionRefusedError, f"connection refused on {socket_path} (no VMM listening: stale socket?)"
    elif num in (E.EPIPE, E.ECONNRESET):
        cls, text = ConnectionClosedError, f"connection to {socket_path} closed during {stage}"
    else:
        text = f"{stage} on {socket_path} failed: {os.strerror(num)}"
    return cls(f"{endpoint}: {text}", endpoint=endpoint, errno=num, stage=stage, socket_path=socket_path)
