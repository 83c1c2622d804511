"""QMP codec against recorded exchanges (QEMU 7.2, Debian 12), plus the client against a live QEMU."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nkudo.qmp import (
    CommandNotFoundError,
    Error,
    Event,
    GenericError,
    Greeting,
    QmpClient,
    QmpCodec,
    QmpCommandError,
    QmpConnectionRefusedError,
    QmpProtocolError,
    QmpSocketMissingError,
    Return,
)
from tests.conftest import skip_or_fail
from tests.qemu import guest

# Recorded from qemu-system-x86_64 7.2.22 over its QMP socket (server lines end in \r\n).
GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, '
    b'"package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}\r\n'
)
STOP_EVENT = b'{"timestamp": {"seconds": 1795731467, "microseconds": 879262}, "event": "STOP"}\r\n'
SHUTDOWN_EVENT = (
    b'{"timestamp": {"seconds": 1795732277, "microseconds": 504235}, "event": "SHUTDOWN", '
    b'"data": {"guest": true, "reason": "guest-shutdown"}}\r\n'
)


def negotiated() -> QmpCodec:
    c = QmpCodec()
    assert c.feed(GREETING) == [Greeting((7, 2, 22), "Debian 1:7.2+dfsg-7+deb12u18+b3", ("oob",))]
    cid, data = c.negotiate()
    assert json.loads(data) == {"execute": "qmp_capabilities", "id": cid}
    assert c.feed(b'{"return": {}, "id": "%s"}\r\n' % cid.encode()) == [Return(cid, "qmp_capabilities", {})]
    assert c.state == "ready"
    return c


def test_greeting_then_negotiation_then_commands() -> None:
    c = negotiated()
    cid, data = c.command("query-status")
    assert data.endswith(b"\n") and json.loads(data) == {"execute": "query-status", "id": cid}
    (msg,) = c.feed(b'{"return": {"status": "prelaunch", "singlestep": false, "running": false}, "id": "%s"}\r\n' % cid.encode())
    assert isinstance(msg, Return) and msg.value["status"] == "prelaunch" and msg.command == "query-status"
    assert c.pending == ()


def test_commands_refused_before_greeting_and_before_negotiation() -> None:
    c = QmpCodec()
    with pytest.raises(QmpProtocolError, match="no greeting"):
        c.command("query-status")
    c.feed(GREETING)
    with pytest.raises(QmpProtocolError, match="not negotiated"):
        c.command("query-status")
    c.negotiate()  # allowed


def test_event_interleaved_before_the_answer_and_split_across_reads() -> None:
    c = negotiated()
    cid, _ = c.command("stop")
    stream = STOP_EVENT + b'{"return": {}, "id": "%s"}\r\n' % cid.encode()
    got = []
    for i in range(0, len(stream), 7):  # arbitrary read boundaries
        got += c.feed(stream[i : i + 7])
    assert got == [Event("STOP", {}, 1795731467.879262), Return(cid, "stop", {})]
    (ev,) = c.feed(SHUTDOWN_EVENT)
    assert isinstance(ev, Event) and ev.data == {"guest": True, "reason": "guest-shutdown"}


def test_errors_are_typed() -> None:
    c = negotiated()
    a, _ = c.command("nonexistent")
    b, _ = c.command("getfd", {"fdname": "x"})
    (ea,) = c.feed(b'{"id": "%s", "error": {"class": "CommandNotFound", "desc": "The command nonexistent has not been found"}}\r\n' % a.encode())
    (eb,) = c.feed(b'{"id": "%s", "error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}}\r\n' % b.encode())
    assert isinstance(ea, Error) and isinstance(ea.exception(), CommandNotFoundError)
    assert isinstance(eb, Error) and isinstance(eb.exception(), GenericError)
    assert eb.exception().command == "getfd" and "SCM_RIGHTS" in eb.exception().desc
    unknown = Error("x", "y", "SomeFutureClass", "d").exception()
    assert type(unknown) is QmpCommandError and unknown.error_class == "SomeFutureClass"


@pytest.mark.parametrize(
    "line",
    [
        b"not json\r\n",
        b"[1, 2]\r\n",
        b'{"return": {}, "id": "nk999"}\r\n',  # an id never sent
        b'{"what": 1}\r\n',
        b'{"error": "flat", "id": "nk2"}\r\n',
        b'{"event": 5}\r\n',
    ],
)
def test_hostile_lines_are_protocol_errors(line: bytes) -> None:
    c = negotiated()
    c.command("query-status")
    with pytest.raises(QmpProtocolError):
        c.feed(line)


def test_bad_greetings() -> None:
    for line in (b'{"return": {}}\n', b'{"QMP": {"version": {}}}\n', b'{"QMP": 1}\n'):
        with pytest.raises(QmpProtocolError):
            QmpCodec().feed(line)


def test_partial_line_is_buffered_not_parsed() -> None:
    c = QmpCodec()
    assert c.feed(GREETING[:20]) == [] and c.buffered == 20
    assert len(c.feed(GREETING[20:])) == 1 and c.buffered == 0


# ------------------------------------------------------------------ the client against a live QEMU


@pytest.fixture
def live_qemu(tmp_path: Path) -> Iterator[str]:
    if guest.have_qemu() is None:
        skip_or_fail("qemu-system-x86_64 not installed (scripts/ci-qemu.sh installs qemu-system-x86)")
    sock = str(tmp_path / "qmp.sock")
    p = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "microvm,accel=tcg", "-nodefaults", "-no-user-config", "-display", "none",
         "-S", "-chardev", f"socket,id=qmp,path={sock},server=on,wait=off", "-mon", "chardev=qmp,mode=control"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield sock
    finally:
        p.kill()
        p.wait()


def test_client_against_live_qemu(live_qemu: str) -> None:
    with QmpClient(live_qemu, timeout=5) as c:
        assert c.version[0] >= 7
        assert c.status() == "prelaunch"
        with pytest.raises(CommandNotFoundError):
            c.execute("nkudo-no-such-command")
        with pytest.raises(GenericError, match=r"SCM_RIGHTS|file descriptor"):
            c.execute("getfd", {"fdname": "x"})  # no fd attached
        r, w = os.pipe()
        try:
            c.execute("getfd", {"fdname": "p"}, fds=[r])  # an fd really passed
            c.execute("closefd", {"fdname": "p"})
        finally:
            os.close(r)
            os.close(w)
        c.execute("cont")
        assert c.wait_event(["RESUME"], timeout=5) is not None
        c.execute("stop")
        ev = c.wait_event(["STOP"], timeout=5)
        assert ev is not None and ev.name == "STOP"
        assert c.status() == "paused"


def test_client_transport_errors(tmp_path: Path) -> None:
    with pytest.raises(QmpSocketMissingError):
        QmpClient(str(tmp_path / "absent.sock"), timeout=1)
    import socket

    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # bound, never listening: a stale socket file
    with pytest.raises(QmpConnectionRefusedError):
        QmpClient(path, timeout=1)
