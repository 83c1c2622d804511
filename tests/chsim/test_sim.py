"""nkudo-ch-sim behaves like the real Cloud Hypervisor server (wire notes in shared/reference)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nkudo.chapi import ChClient, InvalidStateError, ServerError, VmNotCreatedError, wait_ready
from nkudo.chapi.errors import BadRequestError
from nkudo.chsim.schema import default_spec_path
from tests.chsim.simproc import VM_CONFIG, Sim, sim_command, wait_gone
from tests.conftest import skip_or_fail

Spawn = Callable[..., Sim]
BODYLESS = ("vm.boot", "vm.delete", "vm.shutdown", "vm.reboot", "vm.pause", "vm.resume", "vm.power-button",
            "vm.nmi", "vmm.shutdown")


def _setup(c: ChClient, state: str) -> None:
    if state == "none":
        return
    c.create(VM_CONFIG)
    if state in ("running", "paused"):
        c.boot()
    if state == "paused":
        c.pause()


# (call, {state: expected status}) from the reference table (HEAD mapping; 405 never sent).
TABLE = {
    "vm.create": {"none": 204, "created": 500, "running": 500, "paused": 500},
    "vm.boot": {"none": 404, "created": 204, "running": 500, "paused": 500},
    "vm.info": {"none": 404, "created": 200, "running": 200, "paused": 200},
    "vm.pause": {"none": 500, "created": 500, "running": 204, "paused": 500},
    "vm.resume": {"none": 500, "created": 500, "running": 500, "paused": 204},
    "vm.shutdown": {"none": 500, "created": 500, "running": 204, "paused": 204},
    "vm.reboot": {"none": 404, "created": 404, "running": 204, "paused": 204},
    "vm.power-button": {"none": 500, "created": 500, "running": 204, "paused": 204},
    "vm.snapshot": {"none": 500, "created": 500, "running": 500, "paused": 204},
    "vm.restore": {"none": 500, "created": 500, "running": 500, "paused": 500},
    "vm.delete": {"none": 204, "created": 204, "running": 204, "paused": 204},
    "vm.counters": {"none": 500, "created": 500, "running": 200, "paused": 200},
    "vmm.ping": {"none": 200, "created": 200, "running": 200, "paused": 200},
}
AFTER = {("vm.shutdown", "running"): "Created", ("vm.shutdown", "paused"): "Created",
         ("vm.reboot", "paused"): "Running", ("vm.pause", "running"): "Paused", ("vm.resume", "paused"): "Running",
         ("vm.boot", "created"): "Running", ("vm.snapshot", "paused"): "Paused"}


@pytest.mark.parametrize("state", ["none", "created", "running", "paused"])
def test_state_machine_status_codes(state: str, spawn: Spawn, workdir: Path) -> None:
    snap = workdir / "snap"
    snap.mkdir()
    for call, by_state in TABLE.items():
        sim = spawn(name=f"{call}.sock")
        c = ChClient(sim.socket)
        _setup(c, state)
        method = "GET" if call in ("vm.info", "vm.counters", "vmm.ping") else "PUT"
        body = {"vm.create": VM_CONFIG, "vm.snapshot": {"destination_url": f"file://{snap}"},
                "vm.restore": {"source_url": f"file://{snap}"}}.get(call)
        resp = c.request(method, call, None if body is None else json.dumps(body).encode())
        assert resp.status == by_state[state], (call, state, resp.messages())
        if resp.status >= 400:
            msgs = json.loads(resp.body)
            assert isinstance(msgs, list) and msgs and all(isinstance(m, str) for m in msgs)
            assert msgs[0] == "Error from API"
        after = AFTER.get((call, state))
        if after:
            assert c.info().state == after, (call, state)
        sim.kill()


def test_http_level_errors(spawn: Spawn) -> None:
    sim = spawn()
    c = ChClient(sim.socket)
    for ep in BODYLESS:
        r = c.request("PUT", ep, b"{}")
        assert (r.status, r.messages()) == (400, ["Bad Request"]), ep
    r = c.request("GET", "vm.nope")
    assert (r.status, r.messages()) == (404, ["Not Found"])
    r = c.request("GET", "vm.coredump")  # not built without guest_debug: unknown path
    assert r.status == 404
    r = c.request("GET", "vm.boot")  # wrong method -> 400 (never 405)
    assert (r.status, r.messages()) == (400, ["Bad Request"])
    r = c.request("PUT", "vm.info")
    assert r.status == 400
    r = c.request("POST", "vm.boot")
    assert (r.status, r.body) == (400, b"")
    r = c.request("PUT", "vm.create")  # no body
    assert r.status == 400
    r = c.request("PUT", "vm.create", b"{not json")
    assert r.status == 400 and r.messages()[0] == "Failed to deserialize JSON"
    r = c.request("PUT", "vm.create", b"[" + b" " * 52000 + b"]")
    assert r.status == 413
    assert c.ping().version  # still alive
    # micro_http's exact framing: empty reason, no Content-Length on 204, JSON type otherwise
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(sim.socket)
    raw.sendall(b"PUT /api/v1/vm.delete HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert raw.recv(4096) == b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
    raw.sendall(b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n")  # keep-alive: second request on the same connection
    data = raw.recv(4096)
    raw.close()
    assert data.startswith(b"HTTP/1.1 404 \r\n") and b"Content-Type: application/json\r\n" in data


def test_schema_validation(spawn: Spawn) -> None:
    spec = default_spec_path()
    if not spec.is_file():
        skip_or_fail(f"OpenAPI spec {spec} absent: body validation cannot be tested")
    sim = spawn()
    c = ChClient(sim.socket)
    bad = [
        ("vm.create", {"cpus": {"boot_vcpus": 1, "max_vcpus": 1}}),  # payload required
        ("vm.create", {"payload": {}, "memory": {"size": "1G"}}),  # wrong type
        ("vm.create", {"payload": {}, "net": [{"pci_device_id": 999}]}),  # uint8 out of range
        ("vm.create", {"payload": {}, "console": {"mode": "Telepathy"}}),  # enum
        ("vm.restore", {"prefault": True}),  # source_url required
        ("vm.remove-device", {"id": 5}),
        ("vm.add-net", []),
    ]
    for ep, body in bad:
        r = c.request("PUT", ep, json.dumps(body).encode())
        assert r.status == 400, (ep, body)
        assert r.messages()[0] == "Failed to deserialize JSON" and len(r.messages()) == 2
    c.create(VM_CONFIG)
    recs = [r for r in sim.journal() if r["endpoint"] != "vmm.ping"]  # wait_ready's pings
    assert [r["schema_valid"] for r in recs] == [False] * len(bad) + [True]
    assert recs[-1]["body"] == VM_CONFIG and recs[-1]["status"] == 204
    assert recs[0]["method"] == "PUT" and recs[0]["path"] == "/api/v1/vm.create"


def test_failed_boot_keeps_vm(spawn: Spawn, workdir: Path) -> None:
    sim = spawn()
    c = ChClient(sim.socket)
    c.create({**VM_CONFIG, "payload": {"kernel": str(workdir / "missing-vmlinux")}})
    with pytest.raises(ServerError) as ei:
        c.boot()
    assert "kernel" in ei.value.messages[-1]
    with pytest.raises(InvalidStateError):  # the half-built VM is kept: "already created"
        c.boot()
    c.delete()
    c.create(VM_CONFIG)
    c.boot()
    assert c.info().state == "Running"


def test_snapshot_and_restore(spawn: Spawn, workdir: Path) -> None:
    snap = workdir / "snap"
    snap.mkdir()
    src = spawn(name="src.sock")
    c = ChClient(src.socket)
    c.create({**VM_CONFIG, "net": [{"id": "n0", "tap": "tap0"}]})
    c.boot()
    with pytest.raises(InvalidStateError) as ei:
        c.snapshot(snap)
    assert ei.value.messages[-1] == "Trying to snapshot while VM is running"
    c.pause()
    with pytest.raises(ServerError):
        c.snapshot(workdir / "does-not-exist")
    with pytest.raises(ServerError):
        c.snapshot("http://example.com/snap")
    c.snapshot(snap)
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "memory-ranges", "state.json"]
    assert (snap / "memory-ranges").stat().st_size == 64 << 20
    assert json.loads((snap / "config.json").read_text())["payload"] == VM_CONFIG["payload"]
    assert c.info().state == "Paused"
    c.resume()

    dst = spawn(name="dst.sock")
    d = ChClient(dst.socket)
    r, w = os.pipe()
    try:
        with pytest.raises(BadRequestError):  # net_fds announces 1 fd, none sent
            d.call("PUT", "vm.restore", {"source_url": f"file://{snap}", "net_fds": [{"id": "n0", "num_fds": 1}]})
        d.restore(snap, net_fds={"n0": [r]})
    finally:
        os.close(r)
        os.close(w)
    info = d.info()
    assert info.state == "Paused" and info.config["net"][0]["id"] == "n0"
    d.resume()
    with pytest.raises(InvalidStateError):
        d.restore(snap)  # not a fresh VMM any more
    again = spawn(name="again.sock")
    ChClient(again.socket).restore(snap, resume=True)
    assert ChClient(again.socket).info().state == "Running"
    cli = spawn("--restore", f"source_url=file://{snap}", name="cli.sock")
    assert ChClient(cli.socket).info().state == "Paused"


def test_vmm_shutdown_and_sigterm_remove_socket(spawn: Spawn) -> None:
    a = spawn(name="a.sock")
    ChClient(a.socket).create(VM_CONFIG)
    ChClient(a.socket).shutdown_vmm()
    assert a.wait() == 0
    assert not os.path.exists(a.socket) and os.path.exists(a.socket + ".lock")
    b = spawn(name="b.sock")
    assert b.terminate() == 0
    assert not os.path.exists(b.socket)


def test_lock_against_second_instance(spawn: Spawn, workdir: Path) -> None:
    first = spawn()
    mode = stat.S_IMODE(os.stat(first.socket).st_mode)
    assert mode & 0o077 == 0, oct(mode)  # umask(0o077)
    second = spawn(wait=False, journal=False)
    assert second.wait() == 1
    assert "ApiSocketInUse" in second.stderr()
    assert ChClient(first.socket).ping()  # the first one's socket was not touched
    first.proc.send_signal(signal.SIGKILL)  # crash: stale socket stays, lock released
    first.wait()
    assert os.path.exists(first.socket)
    third = spawn()
    assert ChClient(third.socket).ping().pid == third.pid


def test_fault_injection(spawn: Spawn) -> None:
    sim = spawn("--sim-fail", "vm.boot=500:1", "--sim-latency", "0.05")
    c = ChClient(sim.socket)
    c.create(VM_CONFIG)
    t0 = time.monotonic()
    with pytest.raises(ServerError) as ei:
        c.boot()
    assert time.monotonic() - t0 >= 0.05
    assert "injected" in ei.value.messages[-1]
    c.boot()  # only once
    env_sim = spawn(name="env.sock", env={"NKUDO_CH_SIM_FAIL": "vm.info=404,vm.pause=500"})
    with pytest.raises(VmNotCreatedError.__mro__[1]):  # NotFoundError (message is not "not created")
        ChClient(env_sim.socket).info()


def test_crash_after_boot(spawn: Spawn) -> None:
    sim = spawn("--sim-crash-after-boot", "0.3")
    c = ChClient(sim.socket)
    c.create(VM_CONFIG)
    c.boot()
    assert sim.wait(timeout=5) == 1
    assert os.path.exists(sim.socket)  # abrupt death: stale socket left behind
    with pytest.raises(Exception) as ei:
        c.ping()
    assert type(ei.value).__name__ == "VmmConnectionRefusedError"


def test_power_button(spawn: Spawn) -> None:
    keep = spawn("--no-shutdown", "--sim-power-off-delay", "0.1", name="keep.sock")
    c = ChClient(keep.socket)
    c.create(VM_CONFIG)
    c.boot()
    c.power_button()
    time.sleep(0.4)
    assert c.info().state == "Created"  # guest powered off, VMM stays with --no-shutdown
    gone = spawn("--sim-power-off-delay", "0.1", name="gone.sock")
    g = ChClient(gone.socket)
    g.create(VM_CONFIG)
    g.boot()
    g.power_button()
    assert gone.wait(timeout=5) == 0 and wait_gone(gone.socket)


def test_cli_configured_mode(spawn: Spawn, workdir: Path) -> None:
    kernel = workdir / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    serial = workdir / "serial.log"
    events = workdir / "events.json"
    sim = spawn("--kernel", str(kernel), "--cmdline", "console=ttyS0 root=/dev/vda", "--cpus", "boot=2,max=4",
                "--memory", "size=1G,shared=on", "--disk", f"path={workdir}/root.raw,id=disk0,readonly=on",
                "--net", "tap=ha-vm1-0,mac=52:54:00:12:34:56,id=net0", "--serial", f"file={serial}",
                "--console", "off", "--event-monitor", f"path={events}", "-v")
    info = ChClient(sim.socket).info()
    assert info.state == "Running"
    cfg = info.config
    assert cfg["cpus"]["boot_vcpus"] == 2 and cfg["cpus"]["max_vcpus"] == 4
    assert cfg["memory"] == {"size": 1 << 30, "shared": True}
    assert cfg["disks"] == [{"path": f"{workdir}/root.raw", "id": "disk0", "readonly": True}]
    assert cfg["net"][0]["mac"] == "52:54:00:12:34:56" and cfg["console"] == {"mode": "Off"}
    assert "booted" in serial.read_text()
    start = sim.journal("start")[0]
    assert start["argv"][-1] == "-v" and start["config"]["payload"]["kernel"] == str(kernel)
    ChClient(sim.socket).shutdown_vmm()
    sim.wait()
    dec, text, names = json.JSONDecoder(), events.read_text(), []
    pos = 0
    while pos < len(text.rstrip()):
        obj, pos = dec.raw_decode(text, pos)
        names.append(f"{obj['source']}:{obj['event']}")
        while pos < len(text) and text[pos].isspace():
            pos += 1
    assert names[:4] == ["vmm:starting", "vm:created", "vm:booting", "vm:booted"] and names[-1] == "vmm:shutdown"


def test_cli_errors_and_version(workdir: Path) -> None:
    cmd = sim_command()
    r = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("cloud-hypervisor v53.0") and "simulator" in r.stdout
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True)
    assert "simulator" in r.stdout and "--sim-fail" in r.stdout
    r = subprocess.run([*cmd, "--api-socket", str(workdir / "x.sock"), "--cpus", "boot=2"], capture_output=True,
                       text=True)
    assert r.returncode == 2  # vm-config flag without a payload: usage error
    r = subprocess.run([*cmd, "--api-socket", str(workdir / "x.sock"), "--kernel", "/dev/null",
                        "--disk", "path=/x,colour=blue"], capture_output=True, text=True)
    assert r.returncode == 1 and "colour" in r.stderr
    r = subprocess.run([*cmd, "--api-socket", str(workdir / "y.sock"), "--kernel", str(workdir / "nope")],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "kernel" in r.stderr and not os.path.exists(workdir / "y.sock")


def test_bare_socket_path_and_readiness(spawn: Spawn, workdir: Path) -> None:
    path = str(workdir / "bare.sock")
    proc = subprocess.Popen([*sim_command(), "--api-socket", path], stderr=subprocess.DEVNULL)
    try:
        assert wait_ready(path, timeout=10, pid=proc.pid).pid == proc.pid
    finally:
        proc.kill()
        proc.wait()
