"""Issue 10 item 1: the ``nkudo:vm=`` marker on a device that is not a TAP proves nothing.

The ifalias is writable by anyone with CAP_NET_ADMIN, so a veth, a bridge or a
TUN-mode device carrying ``nkudo:vm=<id>`` is somebody else's device. Every
mutating operation, for every backend, and the agent's start-up reconcile sweep
must leave it exactly as it was. (The ``dummy`` link type is not used: its
kernel module is not loadable on every CI host; veth, bridge and tun are.)

Kernel state is read back with iproute2, never with the code under test.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nkudo.agent.network import HostNetwork
from nkudo.agent.runtime import Agent, AgentConfig
from nkudo.net.errors import NetError
from nkudo.net.hostnet import HostNet
from tests.net.conftest import ip, ip_link

VM = "vm-x"
MARK = f"nkudo:vm={VM}"
# name -> what it is; every one carries the marker of VM.
DECOYS = {
    "decbr0": "bridge",
    "decveth0": "veth (enslaved to decbr0)",
    "decveth0p": "veth peer",
    "dectun0": "TUN-mode tun device",
}


def _make_decoys() -> None:
    ip("link", "add", "decbr0", "type", "bridge")
    ip("link", "add", "decveth0", "type", "veth", "peer", "name", "decveth0p")
    ip("tuntap", "add", "dev", "dectun0", "mode", "tun")
    ip("link", "set", "decveth0", "master", "decbr0")
    for i, name in enumerate(DECOYS):
        ip("link", "set", name, "alias", MARK, "mtu", "1400")
        if name != "dectun0":  # a TUN-mode device has no link-layer address
            ip("link", "set", name, "address", f"02:de:c0:00:00:{i:02x}")
    ip("link", "set", "decbr0", "up")
    ip("link", "set", "decveth0", "up")
    ip("link", "set", "decveth0p", "up")
    # A real bridge for attach attempts.
    ip("link", "add", "br0", "type", "bridge")


def _snapshot() -> dict[str, tuple[Any, ...]]:
    out = {}
    for name in DECOYS:
        d = ip_link(name)
        assert d is not None, f"{name} ({DECOYS[name]}) was deleted"
        out[name] = (
            d["ifindex"],
            d.get("master"),
            d["mtu"],
            d.get("address"),
            "UP" in d["flags"],
            d.get("ifalias"),
            d.get("group"),
            (d.get("linkinfo") or {}).get("info_kind"),
        )
    return out


@pytest.fixture
def decoys(in_netns: str) -> Iterator[dict[str, tuple[Any, ...]]]:
    _make_decoys()
    before = _snapshot()
    yield before
    assert _snapshot() == before


def _refused(call: Callable[[], object], codes: set[str]) -> None:
    with pytest.raises(NetError) as ei:
        call()
    assert ei.value.code in codes, ei.value


def _not_owned_calls(net: HostNet, name: str, own: str) -> list[Callable[[], object]]:
    """Every mutating call that takes a device name or a VM id, aimed at ``name``."""
    return [
        lambda: net.delete_tap(name),
        lambda: net.delete_tap(name, vm_id=VM),
        lambda: net.delete_taps([name]),
        lambda: net.delete_taps([name], vm_id=VM),
        lambda: net.delete_taps([own, name], vm_id=VM),
        lambda: net.attach(name, "br0"),
        lambda: net.detach(name),
        lambda: net.set_mtu(name, 1300),
        lambda: net.set_mac(name, "02:00:00:00:00:99"),
        lambda: net.set_up(name, False),
        lambda: net.set_up(name, True),
    ]


def test_marked_non_taps_are_never_touched(net: HostNet, decoys: dict[str, tuple[Any, ...]]) -> None:
    """Issue 10 item 1: a veth/bridge/TUN device with the nkudo marker is never deleted, changed or listed."""
    own = net.create_tap(VM, 0).name  # a real TAP of the same VM, so listings are not trivially empty
    for name in DECOYS:
        for call in _not_owned_calls(net, name, own):
            _refused(call, {"NET_NOT_OWNED"})
        with pytest.raises(NetError) as ei:
            net.create_tap(VM, 0, name=name, mtu=1300)
        assert ei.value.code == "NET_NAME_TAKEN", ei.value
        assert _snapshot() == decoys, f"{name} ({DECOYS[name]}) changed"
        assert ip_link(own) is not None  # the refused batch changed nothing either
    assert [lk.name for lk in net.list_owned_taps()] == [own]
    assert [lk.name for lk in net.list_owned_taps(VM)] == [own]
    assert all(net.get_link(n).vm_id is None for n in DECOYS)  # type: ignore[union-attr]


def test_agent_sweep_leaves_marked_non_taps_alone(
    backend: str, decoys: dict[str, tuple[Any, ...]], tmp_path: Path
) -> None:
    """Issue 10 item 1: the agent's adapter and its start-up reconcile sweep only remove real TAPs."""
    adapter = HostNetwork(backend)
    try:
        orphan = adapter.net.create_tap(VM, 0).name
        assert adapter.owned_taps() == {orphan: VM}
        assert adapter.remove_taps(VM) == [orphan]
        assert ip_link(orphan) is None
        assert adapter.owned_taps() == {}
        assert adapter.remove_taps(VM) == []
        orphan = adapter.net.create_tap(VM, 1).name
    finally:
        adapter.close()
    root = tmp_path / uuid.uuid4().hex[:6]
    agent = Agent(
        AgentConfig(
            state_dir=str(root / "s"),
            runtime_dir=str(root / "v"),
            snapshot_dir=str(root / "n"),
            image_roots=(str(root),),
            net_backend=backend,
        )
    )
    try:
        report = agent.reconcile()
    finally:
        agent.close()
    assert report["taps_swept"] == [orphan]
    assert ip_link(orphan) is None
