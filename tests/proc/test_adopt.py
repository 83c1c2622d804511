"""Adoption after the spawning process has exited, and refusal of reused or foreign pids."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import time
from pathlib import Path

import pytest

from nkudo.errors import ValidationError
from nkudo.proc import (
    AdoptionRefused,
    ExitStatus,
    ProcessHandle,
    ProcessIdentity,
    adopt,
    check_identity,
    identify,
    pidfd_support,
    spawn,
)
from tests.proc.conftest import ENV, PY, Reaper, SpawnFn, native_flag, spawn_orphan

pytestmark = pytest.mark.timeout(60)

SOCK = "/run/nkudo/vm-3f2a.sock"
VMM_LIKE = [PY, "-I", "-c", "import time; print('vmm up', flush=True); time.sleep(60)", "--api-socket", SOCK]
STUBBORN_VMM = [
    PY,
    "-I",
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)",
    "--api-socket",
    SOCK,
]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def wait_for_text(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.01)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_adopt_after_spawner_exited(reaper: Reaper, tmp_path: Path, impl: str) -> None:
    native = native_flag(impl)
    log = tmp_path / "vmm.log"
    recorded = spawn_orphan(reaper, log, VMM_LIKE, native=native, marker=SOCK)
    wait_for_text(log, "vmm up")  # output reaches the log although the spawner is gone
    assert recorded.marker == SOCK and recorded.exe == os.path.realpath(PY)
    # The spawner has exited; the orphan now belongs to the reaper helper (our stand-in for init).
    assert parent_of(recorded.pid) == reaper.popens[-1].pid != os.getpid()
    # What the state store would have kept, as JSON, read back by a restarted agent.
    stored = ProcessIdentity.from_json(recorded.to_json())
    assert stored == recorded
    h = reaper.add(adopt(stored, native=native))
    assert h.pidfd is not None and not h.is_child
    assert h.poll() is None
    h.send_signal(signal.SIGTERM)
    st = h.wait(5)
    assert st is not None
    assert st.kind == "unknown" and not st.known and "not our child" in st.reason
    assert st.code is None and st.signal is None
    with pytest.raises(AdoptionRefused) as info:
        adopt(stored, native=native)  # it is gone now
    assert info.value.reason == "gone" and info.value.code == "ADOPT_REFUSED"


def test_adopted_stubborn_process_is_killed(reaper: Reaper, tmp_path: Path, impl: str) -> None:
    native = native_flag(impl)
    log = tmp_path / "vmm.log"
    recorded = spawn_orphan(reaper, log, STUBBORN_VMM, native=native, marker=SOCK)
    wait_for_text(log, "ready")
    h = reaper.add(adopt(recorded, native=native))
    res = h.stop(term_timeout=0.3, kill_timeout=5)
    assert res.escalated and res.signals == (signal.SIGTERM, signal.SIGKILL)
    assert res.status.kind == "unknown"


def test_refuses_mismatched_identity(spawned: SpawnFn, impl: str) -> None:
    native = impl == "native"
    h = spawned(VMM_LIKE, marker=SOCK)
    good = h.identity
    check_identity(good, native=native)
    cases = {
        "start_time": dataclasses.replace(good, start_time=good.start_time - 1),
        "exe": dataclasses.replace(good, exe="/usr/bin/cloud-hypervisor"),
        "boot": dataclasses.replace(good, boot_id="00000000-0000-0000-0000-000000000000"),
        "marker": dataclasses.replace(good, marker="/run/nkudo/other-vm.sock"),
    }
    for reason, ident in cases.items():
        with pytest.raises(AdoptionRefused) as info:
            adopt(ident, native=native)
        assert info.value.reason == reason, info.value
    # Refusal leaves the process alone, and the right identity is still accepted.
    assert h.poll() is None
    with adopt(good, native=native) as again:
        assert again.is_child  # we happen to be its parent here


def test_refuses_foreign_pid(spawned: SpawnFn, impl: str) -> None:
    native = impl == "native"
    h = spawned(["sleep", "60"])
    foreign = dataclasses.replace(h.identity, pid=os.getppid())  # alive, but not the recorded process
    with pytest.raises(AdoptionRefused) as info:
        adopt(foreign, native=native)
    assert info.value.reason == "start_time"
    me = identify(os.getpid())
    with pytest.raises(AdoptionRefused) as info:
        adopt(dataclasses.replace(me, exe="/usr/bin/sleep"), native=native)
    assert info.value.reason == "exe"


def _spawn_at_pid(pid: int, reaper: Reaper, log: Path) -> ProcessHandle | None:
    """Make the kernel hand out ``pid`` again (root: /proc/sys/kernel/ns_last_pid), as reuse would."""
    for _ in range(50):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(str(pid - 1))
            f.flush()
            h = reaper.add(spawn(["sleep", "60"], env=ENV, log_path=log))
        if h.pid == pid:
            return h
        h.kill()
        h.wait(5)
    return None


@pytest.mark.ci_may_skip(reason="a race (another process takes the pid first), not a missing capability")
def test_refuses_reused_pid(reaper: Reaper, tmp_path: Path, impl: str) -> None:
    native = native_flag(impl)
    old = reaper.add(spawn(["sleep", "60"], env=ENV, log_path=tmp_path / "a.log", native=native))
    recorded = old.identity
    old.kill()
    assert old.wait(5) is not None  # reaped: the pid is free for reuse
    time.sleep(0.05)  # start times are in 10 ms ticks; reuse within one tick is indistinguishable
    new = _spawn_at_pid(recorded.pid, reaper, tmp_path / "b.log")
    if new is None:
        pytest.skip("another process kept taking the pid; cannot stage a reuse")
    assert new.identity.exe == recorded.exe  # same program, same pid: only the start time differs
    with pytest.raises(AdoptionRefused) as info:
        adopt(recorded, native=native)
    assert info.value.reason == "start_time"
    assert new.poll() is None  # the innocent successor was not touched


def test_identity_record_validation() -> None:
    good = {
        "pid": 4242,
        "start_time": 123,
        "exe": "/usr/bin/cloud-hypervisor",
        "boot_id": "b",
        "marker": "/s",
    }
    assert ProcessIdentity.from_dict(good).to_dict() == good
    bad = [
        ({**good, "pid": "4242"}, "pid"),
        ({**good, "pid": 1}, "pid"),
        ({**good, "pid": True}, "pid"),
        ({**good, "start_time": -1}, "start_time"),
        ({**good, "exe": "cloud-hypervisor"}, "exe"),
        ({**good, "boot_id": ""}, "boot_id"),
        ({**good, "marker": 5}, "marker"),
    ]
    for data, fieldname in bad:
        with pytest.raises(ValidationError) as info:
            ProcessIdentity.from_dict(data)
        assert info.value.field == fieldname
    with pytest.raises(ValidationError):
        ProcessIdentity.from_json("{not json")


@pytest.mark.usefixtures("fallback")
def test_adopt_in_fallback_mode(reaper: Reaper, tmp_path: Path) -> None:
    assert not pidfd_support().available
    log = tmp_path / "vmm.log"
    recorded = spawn_orphan(reaper, log, VMM_LIKE, native=False, marker=SOCK)
    h = reaper.add(adopt(recorded))
    assert h.pidfd is None
    assert h.poll() is None
    res = h.stop(term_timeout=5)
    assert res.status == ExitStatus("unknown", reason=res.status.reason) and not res.escalated
    with pytest.raises(AdoptionRefused):
        adopt(dataclasses.replace(recorded, start_time=recorded.start_time + 1))
