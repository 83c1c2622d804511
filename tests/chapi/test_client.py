"""The typed client against a real simulator process, over both transports."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nkudo.chapi import (
    BadRequestError,
    ChApiError,
    ChClient,
    ChProtocolError,
    ChTimeoutError,
    ChTransportError,
    ConnectionClosedError,
    InvalidStateError,
    PciDeviceInfo,
    SocketMissingError,
    VmmConnectionRefusedError,
    VmNotCreatedError,
    wait_ready,
)
from tests.chsim.simproc import VM_CONFIG, Sim
from tests.conftest import require_native

Spawn = Callable[..., Sim]


def transport_of(impl: str) -> str:
    if impl == "native":
        require_native("chapi")
        return "native"
    return "python"


def test_lifecycle(impl: str, spawn: Spawn, tmp_path: Path) -> None:
    sim = spawn()
    c = ChClient(sim.socket, transport=transport_of(impl))
    assert c.transport_name == transport_of(impl)
    ping = c.ping()
    assert ping.version == "53.0.0" and ping.pid == sim.pid
    with pytest.raises(VmNotCreatedError) as ei:
        c.info()
    assert ei.value.status == 404 and ei.value.messages[-1] == "VM is not created"
    c.create(VM_CONFIG)
    assert c.info().state == "Created"
    c.boot()
    info = c.info()
    assert info.state == "Running" and info.config["memory"]["size"] == 64 << 20
    c.pause()
    with pytest.raises(InvalidStateError) as st:
        c.pause()
    assert st.value.status == 500
    assert st.value.messages == ["Error from API", "The VM could not be paused",
                                 "invalid VM state transition: Paused to Paused"]
    c.resume()
    assert c.info().state == "Running"
    assert isinstance(c.counters(), dict)
    c.reboot()
    c.power_button()
    c.shutdown()
    assert c.info().state == "Created"  # vm.shutdown drops the VM, keeps the config
    c.boot()
    c.delete()
    with pytest.raises(VmNotCreatedError):
        c.boot()
    c.shutdown_vmm()
    assert sim.wait() == 0


def scenario(c: ChClient, snapdir: Path) -> list[Any]:
    """A fixed sequence of calls; returns what each produced (result or exception identity)."""
    out: list[Any] = []
    calls: list[Callable[[], Any]] = [
        lambda: c.request("PUT", "vm.boot").status,
        lambda: c.info(),
        lambda: c.create(VM_CONFIG),
        lambda: c.create(VM_CONFIG),
        lambda: c.add_net({"id": "n0", "tap": "tap0"}),
        lambda: c.boot(),
        lambda: c.snapshot(snapdir),
        lambda: c.pause(),
        lambda: c.snapshot(snapdir),
        lambda: c.resume(),
        lambda: c.remove_device("n0"),
        lambda: c.remove_device("nope"),
        lambda: c.request("PUT", "vm.pause", b"{}"),
        lambda: c.request("GET", "vm.shutdown"),
        lambda: c.request("DELETE", "vm.info"),
        lambda: c.request("GET", "vm.coredump"),
        lambda: c.call("PUT", "vm.create", {"payload": {"kernel": 7}}),
        lambda: c.info(),
    ]
    for fn in calls:
        try:
            res = fn()
            out.append(("ok", res))
        except ChApiError as exc:
            out.append(("err", type(exc).__name__, exc.status, exc.messages, exc.message))
    return out


def test_transports_agree(spawn: Spawn, workdir: Path) -> None:
    """Native and Python transports: same responses, same exceptions, on identical simulators."""
    require_native("chapi")
    results = {}
    for name in ("native", "python"):
        snap = workdir / f"snap-{name}"
        snap.mkdir()
        sim = spawn(name=f"{name}.sock")
        results[name] = [repr(x).replace(str(snap), "SNAP").replace(sim.socket, "SOCK")
                         for x in scenario(ChClient(sim.socket, transport=name), snap)]
    assert results["native"] == results["python"]
    assert "VmNotCreatedError" in results["native"][1] and "InvalidStateError" in results["native"][3]
    assert "BadRequestError" in results["native"][-2]


def _error_of(fn: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(ChApiError) as ei:
        fn()
    return type(ei.value).__name__, ei.value.message


def test_transport_errors_identical(workdir: Path, spawn: Spawn) -> None:
    require_native("chapi")
    missing = str(workdir / "missing.sock")
    stale = str(workdir / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()  # the file stays, nobody listens: ECONNREFUSED like a crashed VMM's socket
    slow = spawn("--sim-delay", "vm.info=3", name="slow.sock")
    closing = spawn("--sim-fail", "vm.counters=close", "--sim-fail", "vm.info=garbage", name="close.sock")
    cases: list[tuple[str, Callable[[ChClient], object], type]] = [
        (missing, lambda c: c.ping(), SocketMissingError),
        (stale, lambda c: c.ping(), VmmConnectionRefusedError),
        (slow.socket, lambda c: c.info(timeout=0.3), ChTimeoutError),
        (closing.socket, lambda c: c.counters(), ConnectionClosedError),
        (closing.socket, lambda c: c.info(), ChProtocolError),
        (str(workdir / ("x" * 120)), lambda c: c.ping(), ChTransportError),
    ]
    for path, fn, cls in cases:
        got = {}
        for name in ("native", "python"):
            c = ChClient(path, transport=name)
            t0 = time.monotonic()
            got[name] = _error_of(functools.partial(fn, c))
            assert time.monotonic() - t0 < 2.5
            assert got[name][0] == cls.__name__, got[name]
        assert got["native"] == got["python"]


def test_timeout_then_server_still_serves(impl: str, spawn: Spawn) -> None:
    sim = spawn("--sim-delay", "vm.info=1.0")
    c = ChClient(sim.socket, transport=transport_of(impl))
    t0 = time.monotonic()
    with pytest.raises(ChTimeoutError) as ei:
        c.info(timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 0.9
    assert ei.value.stage == "recv"
    assert c.ping(timeout=5).version  # answered once the slow call finished


def test_add_net_passes_fds(impl: str, spawn: Spawn) -> None:
    sim = spawn()
    c = ChClient(sim.socket, transport=transport_of(impl))
    c.create(VM_CONFIG)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        assert c.add_net({"id": "n0", "tap": "tap0"}, fds=[r1]) is None  # cold add -> 204
        with pytest.raises(BadRequestError) as ei:
            c.add_net({"id": "n1"}, fds=[r1, r2])  # 2 fds but num_queues defaults to 2 (one pair)
        assert "fds" in ei.value.messages[-1]
        c.boot()
        got = c.add_net({"id": "n2", "num_queues": 4}, fds=[r1, r2])
        assert isinstance(got, PciDeviceInfo) and got.id == "n2" and got.bdf.startswith("0000:00:")
        got = c.add_net({"tap": "tap9"})
        assert got is not None and got.id.startswith("_net")
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)
    recs = [r for r in sim.journal() if r["endpoint"] == "vm.add-net"]
    assert [(r["fds"], r["status"]) for r in recs] == [(1, 204), (2, 400), (2, 200), (0, 200)]
    assert {n["id"] for n in c.info().config["net"]} >= {"n0", "n2"}


def test_wait_ready_waits_for_late_socket(impl: str, spawn: Spawn) -> None:
    t0 = time.monotonic()
    sim = spawn("--sim-start-delay", "0.4", wait=False)
    info = wait_ready(sim.socket, timeout=10, pid=sim.pid, transport=transport_of(impl))
    assert info.pid == sim.pid and time.monotonic() - t0 >= 0.35


def test_wait_ready_fails_fast_when_process_exits(impl: str, spawn: Spawn) -> None:
    sim = spawn("--sim-refuse-start", wait=False)
    t0 = time.monotonic()
    with pytest.raises(ChTransportError) as ei:
        wait_ready(sim.socket, timeout=10, pid=sim.pid, transport=transport_of(impl))
    assert not isinstance(ei.value, ChTimeoutError)
    assert "exited" in ei.value.message and time.monotonic() - t0 < 5
    assert sim.wait() == 1 and "refused" in sim.stderr()


def test_wait_ready_times_out(impl: str, workdir: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(ChTimeoutError) as ei:
        wait_ready(str(workdir / "never.sock"), timeout=0.3, transport=transport_of(impl))
    assert 0.25 < time.monotonic() - t0 < 2
    assert "does not exist" in ei.value.message


def test_slow_call_blocks_other_clients(impl: str, spawn: Spawn) -> None:
    """The VMM serves one request at a time: a ping during a slow boot waits for it."""
    sim = spawn("--sim-boot-delay", "1.0")
    c = ChClient(sim.socket, transport=transport_of(impl))
    c.create(VM_CONFIG)
    booting = threading.Thread(target=c.boot)
    booting.start()
    time.sleep(0.2)
    with pytest.raises(ChTimeoutError):
        c.ping(timeout=0.2)
    t0 = time.monotonic()
    c.ping(timeout=5)
    assert time.monotonic() - t0 > 0.3
    booting.join()
    assert c.info().state == "Running"


def test_native_disabled_selects_python_transport(tmp_path: Path) -> None:
    code = ("from nkudo import _native; from nkudo.chapi import ChClient; "
            "print(_native.load('chapi') is None, ChClient('/x').transport_name)")
    for env, want in (({"NKUDO_NATIVE": "0"}, "True python"), ({"NKUDO_NATIVE": "1"}, "False native")):
        if want.endswith("native"):
            require_native("chapi")
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert out == want
    with pytest.raises(ValueError):
        ChClient("/x", transport="carrier-pigeon")
