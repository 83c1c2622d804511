"""A VMM that is alive but does not answer (busy, or stopped with SIGSTOP) is never taken for a dead one.

Before the fix, ``Provider.state`` turned a timeout into ``None`` ("the VMM does not answer"), so
MicroVMStart force-killed the live VMM with its guest and launched a new one, then reported SUCCEEDED,
and MicroVMPause reported INVALID_STATE "in state None".
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nkudo.agent.provider import Provider, VmPaths
from nkudo.agent.providers.cloud_hypervisor import CloudHypervisorProvider
from nkudo.agent.providers.qemu import QemuProvider
from nkudo.agent.state import StateStore
from nkudo.errors import NkudoError
from nkudo.vmstate import VmStatus
from tests.agent.conftest import Host
from tests.agent.test_lifecycle import _act, _create, _vm_state


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    """The VMM frozen: its socket still accepts (the kernel queues the connection), nothing answers."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_start_of_a_vm_whose_vmm_does_not_answer_keeps_that_vmm(host: Host) -> None:
    """The start times out (CH_TIMEOUT); the VMM and its guest are the ones that were there."""
    h = host
    rc, doc, err = h.apply([_create(h)])
    assert rc == 0, (doc, err)
    [pid] = h.vmm_pids()
    with _stopped(pid):
        rc, doc, err = h.apply([{**_act("start-1", "MicroVMStart"), "timeout_seconds": 8}])
        (o,) = doc["outcomes"]
        assert rc == 1 and (o["status"], o["error_code"]) == ("TIMED_OUT", "CH_TIMEOUT"), (o, err)
        assert h.vmm_pids() == [pid]
    assert _vm_state(h) == "Running"
    s = StateStore(str(h.state))
    try:
        vm = s.get_vm("vm-1")
        assert vm is not None and vm.process is not None and vm.process["pid"] == pid
        assert vm.status == VmStatus.RUNNING
    finally:
        s.close()
    # Once it answers again the same VMM is driven as before.
    rc, doc, err = h.apply([_act("pause-1", "MicroVMPause")])
    assert rc == 0 and doc["outcomes"][0]["result"]["status"] == "PAUSED", (doc, err)
    assert h.vmm_pids() == [pid]


def test_pause_of_a_vm_whose_vmm_does_not_answer_is_timed_out(host: Host) -> None:
    """Not INVALID_STATE "in state None": the VM's state is unknown, the call timed out, nothing changed."""
    h = host
    rc, doc, err = h.apply([_create(h)])
    assert rc == 0, (doc, err)
    [pid] = h.vmm_pids()
    with _stopped(pid):
        rc, doc, err = h.apply([{**_act("pause-1", "MicroVMPause"), "timeout_seconds": 8}])
        (o,) = doc["outcomes"]
        assert rc == 1 and (o["status"], o["error_code"]) == ("TIMED_OUT", "CH_TIMEOUT"), (o, err)
    assert h.vmm_pids() == [pid] and _vm_state(h) == "Running"


def _paths(tmp: Path) -> VmPaths:
    return VmPaths(str(tmp), str(tmp / "api.sock"), str(tmp / "vmm.log"), str(tmp / "console.log"), None, None)


@pytest.mark.parametrize("provider", [CloudHypervisorProvider(), QemuProvider()], ids=["ch", "qemu"])
def test_state_tells_a_silent_vmm_from_one_that_does_not_serve(provider: Provider, tmp_path: Path) -> None:
    """The port's contract, on real sockets: no socket or a refused one is None; a listener that never
    answers (the VMM's thread is busy: the kernel accepted for it) raises the provider's timeout error."""
    p = _paths(tmp_path)
    assert provider.state(p, timeout=0.3) is None  # no socket file
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(p.api_socket)
    stale.close()  # a socket file nobody listens on: refused
    assert provider.state(p, timeout=0.3) is None
    os.unlink(p.api_socket)
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(p.api_socket)
        silent.listen(4)
        with pytest.raises(NkudoError) as e:
            provider.state(p, timeout=0.3)
        assert e.value.is_timeout, e.value
