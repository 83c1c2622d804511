"""Sans-I/O codec for QMP, the QEMU Machine Protocol: bytes in, messages out, no sockets.

Why sans-I/O (like :mod:`nkudo.chapi.codec`): the protocol state machine is
tested on its own against recorded exchanges, and a transport only moves bytes.

What QMP is on the wire (QEMU ``docs/interop/qmp-spec``): one JSON object per
line (QEMU ends each with ``\\r\\n``). The server speaks first with a greeting
``{"QMP": {"version": ..., "capabilities": [...]}}``; the client must send
``qmp_capabilities`` before any other command ("capabilities negotiation
mode"). Then each command ``{"execute": name, "arguments": {...}, "id": X}``
gets exactly one ``{"return": ..., "id": X}`` or ``{"error": {"class": C,
"desc": D}, "id": X}``; asynchronous events ``{"event": NAME, "data": {...},
"timestamp": {...}}`` may arrive at any point in between, also before the
answer of a pending command. Anything else is a protocol error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nkudo.qmp.errors import ERROR_CLASSES, QmpCommandError, QmpProtocolError

#: A line longer than this is refused (query-migrate answers are ~1 KiB).
MAX_LINE = 16 << 20


@dataclass(frozen=True, slots=True)
class Greeting:
    version: tuple[int, int, int]
    package: str
    capabilities: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Return:
    id: str
    command: str
    value: Any


@dataclass(frozen=True, slots=True)
class Error:
    id: str
    command: str
    error_class: str
    desc: str

    def exception(self) -> QmpCommandError:
        """The typed exception for this error (``GenericError``, ``CommandNotFoundError``, ...)."""
        return ERROR_CLASSES.get(self.error_class, QmpCommandError)(self.command, self.error_class, self.desc)


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float | None = None


Message = Greeting | Return | Error | Event


class QmpCodec:
    """The client side of one QMP connection: ``feed`` received bytes, ``command`` bytes to send.

    States: ``greeting`` (nothing received yet) -> ``negotiating`` (greeting seen;
    only ``qmp_capabilities`` may be sent) -> ``ready`` (its answer arrived).
    """

    def __init__(self) -> None:
        self.state = "greeting"
        self.greeting: Greeting | None = None
        self._buf = bytearray()
        self._pending: dict[str, str] = {}  # id -> command name
        self._next_id = 1
        self._negotiation_id: str | None = None

    # ---------------------------------------------------------------- sending

    def command(self, execute: str, arguments: dict[str, Any] | None = None) -> tuple[str, bytes]:
        """Encode a command; returns (id, bytes). Refused before the greeting or before negotiation."""
        if not execute or not isinstance(execute, str):
            raise ValueError("command name must be a non-empty string")
        if self.state == "greeting":
            raise QmpProtocolError(f"{execute}: no greeting from QEMU yet; nothing may be sent")
        if self.state == "negotiating" and execute != "qmp_capabilities":
            raise QmpProtocolError(f"{execute}: capabilities not negotiated yet (send qmp_capabilities first)")
        cid = f"nk{self._next_id}"
        self._next_id += 1
        msg: dict[str, Any] = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        msg["id"] = cid
        self._pending[cid] = execute
        if execute == "qmp_capabilities" and self.state == "negotiating":
            self._negotiation_id = cid
        return cid, json.dumps(msg, separators=(",", ":")).encode() + b"\n"

    def negotiate(self) -> tuple[str, bytes]:
        """``qmp_capabilities`` without optional capabilities (no ``oob``: the agent waits for each answer)."""
        return self.command("qmp_capabilities")

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(self._pending)

    # -------------------------------------------------------------- receiving

    def feed(self, data: bytes) -> list[Message]:
        """Add received bytes; return every message now complete, in order."""
        self._buf += data
        out: list[Message] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE:
                    raise QmpProtocolError(f"a QMP line is longer than {MAX_LINE} bytes")
                return out
            line = bytes(self._buf[:nl]).strip()
            del self._buf[: nl + 1]
            if line:
                out.append(self._parse(line))

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line (non-zero at EOF means QEMU was cut off mid-message)."""
        return len(self._buf)

    def _parse(self, line: bytes) -> Message:
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise QmpProtocolError(f"QMP line is not JSON ({exc}): {line[:200]!r}") from None
        if not isinstance(obj, dict):
            raise QmpProtocolError(f"QMP message is not a JSON object: {line[:200]!r}")
        if self.state == "greeting":
            return self._greeting(obj, line)
        if "event" in obj:
            return self._event(obj, line)
        if "return" in obj or "error" in obj:
            return self._answer(obj, line)
        raise QmpProtocolError(f"unknown QMP message: {line[:200]!r}")

    def _greeting(self, obj: dict[str, Any], line: bytes) -> Greeting:
        qmp = obj.get("QMP")
        if not isinstance(qmp, dict):
            raise QmpProtocolError(f"expected the QMP greeting, got {line[:200]!r}")
        try:
            v = qmp["version"]["qemu"]
            version = (int(v["major"]), int(v["minor"]), int(v["micro"]))
            package = str(qmp["version"].get("package", ""))
            caps = tuple(str(c) for c in qmp.get("capabilities", []))
        except (KeyError, TypeError, ValueError):
            raise QmpProtocolError(f"malformed QMP greeting: {line[:200]!r}") from None
        self.greeting = Greeting(version, package.strip(), caps)
        self.state = "negotiating"
        return self.greeting

    def _event(self, obj: dict[str, Any], line: bytes) -> Event:
        name = obj.get("event")
        data = obj.get("data", {})
        if not isinstance(name, str) or not isinstance(data, dict):
            raise QmpProtocolError(f"malformed QMP event: {line[:200]!r}")
        ts = obj.get("timestamp")
        stamp = None
        if isinstance(ts, dict) and "seconds" in ts:
            try:
                stamp = int(ts["seconds"]) + int(ts.get("microseconds", 0)) / 1e6
            except (TypeError, ValueError):
                raise QmpProtocolError(f"malformed QMP event timestamp: {line[:200]!r}") from None
        return Event(name, data, stamp)

    def _answer(self, obj: dict[str, Any], line: bytes) -> Return | Error:
        cid = obj.get("id")
        if not isinstance(cid, str) or cid not in self._pending:
            raise QmpProtocolError(f"QMP answer for unknown command id {cid!r}: {line[:200]!r}")
        command = self._pending.pop(cid)
        if "error" in obj:
            err = obj["error"]
            if not isinstance(err, dict) or not isinstance(err.get("class"), str):
                raise QmpProtocolError(f"malformed QMP error: {line[:200]!r}")
            return Error(cid, command, err["class"], str(err.get("desc", "")))
        if cid == self._negotiation_id:
            self.state = "ready"
            self._negotiation_id = None
        return Return(cid, command, obj["return"])
