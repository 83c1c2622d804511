"""QMP client: a session over :class:`QmpSocket` driven by :class:`QmpCodec`.

``with QmpClient(path, timeout=5) as c: c.execute("stop")``. Connecting reads
the greeting and negotiates capabilities; events that arrive while waiting for
an answer are kept in :attr:`QmpClient.events` for :meth:`wait_event`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from nkudo.qmp import codec as C
from nkudo.qmp.errors import QmpConnectionClosedError, QmpProtocolError, QmpTimeoutError
from nkudo.qmp.transport import QmpSocket, remaining


class QmpClient:
    def __init__(self, socket_path: str, *, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive (got {timeout})")
        self.path = socket_path
        self.codec = C.QmpCodec()
        self.events: list[C.Event] = []
        self._inbox: list[C.Message] = []
        deadline = time.monotonic() + timeout
        self._sock = QmpSocket(socket_path, timeout)
        try:
            first = self._next(deadline, "greeting")
            if not isinstance(first, C.Greeting):
                raise QmpProtocolError(f"expected the QMP greeting on {socket_path}, got {first!r}")
            self.greeting = first
            self._call("qmp_capabilities", None, (), deadline)
        except BaseException:
            self._sock.close()
            raise

    @property
    def version(self) -> tuple[int, int, int]:
        return self.greeting.version

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def _next(self, deadline: float, what: str) -> C.Message:
        while not self._inbox:
            left = remaining(deadline)
            if left <= 0:
                raise QmpTimeoutError(f"{what}: no answer from {self.path} in time", stage="recv", socket_path=self.path)
            data = self._sock.recv(timeout=left)
            if not data:
                raise QmpConnectionClosedError(
                    f"{what}: QEMU closed {self.path}" + (" mid-message" if self.codec.buffered else ""),
                    stage="recv", socket_path=self.path,
                )  # fmt: skip
            self._inbox.extend(self.codec.feed(data))
        return self._inbox.pop(0)

    def _call(self, command: str, arguments: dict[str, Any] | None, fds: Sequence[int], deadline: float) -> Any:
        cid, data = self.codec.command(command, arguments)
        self._sock.send(data, fds, timeout=max(remaining(deadline), 0.001))
        while True:
            msg = self._next(deadline, command)
            if isinstance(msg, C.Event):
                self.events.append(msg)
                continue
            if isinstance(msg, C.Greeting):
                raise QmpProtocolError(f"{command}: a second greeting on {self.path}")
            if msg.id != cid:  # only one command is ever in flight
                raise QmpProtocolError(f"{command}: answer for {msg.command} ({msg.id}) while waiting for {cid}")
            if isinstance(msg, C.Error):
                raise msg.exception()
            return msg.value

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 5.0, fds: Sequence[int] = ()
    ) -> Any:
        """Run one command and return its ``return`` value; a QMP error raises its typed exception."""
        return self._call(command, arguments, fds, time.monotonic() + timeout)

    def wait_event(self, names: Iterable[str], *, timeout: float) -> C.Event | None:
        """The first event named in ``names`` (already received ones first); None on timeout.

        ``QmpConnectionClosedError`` when QEMU closes the connection first (it exited).
        """
        want = set(names)
        for i, ev in enumerate(self.events):
            if ev.name in want:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._next(deadline, "events")
            except QmpTimeoutError:
                return None
            if isinstance(msg, C.Event):
                if msg.name in want:
                    return msg
                self.events.append(msg)
            else:
                raise QmpProtocolError(f"unexpected answer {msg!r} while waiting for events")

    def status(self, *, timeout: float = 5.0) -> str:
        """QEMU's run state (``prelaunch``, ``running``, ``paused``, ``postmigrate``, ...)."""
        info = self.execute("query-status", timeout=timeout)
        return str(info["status"])
