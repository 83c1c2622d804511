"""Issue 15 (per-VM counters): every TAP's IFLA_STATS64 from one netlink dump, the same from every backend.

Traffic is real: the test opens the TAP's queue (TUNSETIFF) and writes frames into it (the TAP's rx, what
a guest sends) and sends frames out of it through an AF_PACKET socket (the TAP's tx, what the guest
receives), then reads the counters back through the native module, its twin and pyroute2.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import subprocess
from collections.abc import Iterator

import pytest

from nkudo import _native
from nkudo.net import _nlpy, rtnl
from nkudo.net.hostnet import HostNet, open_backend
from nkudo.net.link import OWNER_PREFIX, LinkCounters
from tests.conftest import require_native
from tests.net.conftest import ip

FRAME = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5" + b"\x00" * 46  # 60 bytes, local ethertype


def _quiet_tap(name: str, alias: str) -> None:
    """A TAP with the given alias, up, with IPv6 off so the kernel sends nothing of its own on it."""
    ip("tuntap", "add", "dev", name, "mode", "tap")
    subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=True, capture_output=True)
    ip("link", "set", name, "alias", alias, "up")


def _send_out(tap: str, fd: int, n: int) -> None:
    """Make the TAP transmit ``n`` frames (read back from its queue).

    Why a loop: the device gets its qdisc only when the kernel notices the carrier (linkwatch, up to a
    second after the queue was opened); until then a frame is dropped by the placeholder qdisc before the
    device sees it, so it is counted nowhere and is simply sent again.
    """
    got = 0
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((tap, 0))
        for _ in range(100):
            s.send(FRAME + b"\x00" * 10)
            if select.select([fd], [], [], 0.1)[0]:
                assert len(os.read(fd, 2048)) == 70
                got += 1
                if got == n:
                    return
    raise AssertionError(f"{tap} transmitted {got} of {n} frames")


@pytest.fixture
def traffic(in_netns: str) -> Iterator[int]:
    """tp0 (VM vm-a) with an open queue: 3 frames in (rx), 2 out (tx); tp1 (VM vm-b) idle; decoys."""
    _quiet_tap("tp0", OWNER_PREFIX + "vm-a")
    _quiet_tap("tp1", OWNER_PREFIX + "vm-b")
    ip("tuntap", "add", "dev", "tn0", "mode", "tun")  # a TUN device with a marker is not a TAP: not ours
    ip("link", "set", "tn0", "alias", OWNER_PREFIX + "vm-c")
    ip("link", "add", "ve0", "type", "veth", "peer", "name", "ve1")
    ip("link", "set", "ve0", "alias", OWNER_PREFIX + "vm-d")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, rtnl.TUNSETIFF, rtnl.pack_tun_ifreq("tp0", rtnl.IFF_TAP | rtnl.IFF_NO_PI))
        for _ in range(3):
            os.write(fd, FRAME)
        _send_out("tp0", fd, 2)
        yield fd
    finally:
        os.close(fd)


def _nat() -> object:
    require_native("netlink")
    mod = _native.load("netlink")
    assert mod is not None
    return mod.NetlinkSocket()


def test_native_and_twin_dump_identical_tap_stats(traffic: int) -> None:
    """Issue 15: the native dump and its twin return the same tuples, TAPs only, with the traffic counted."""
    nat, twin = _nat(), _nlpy.NetlinkSocket()
    a, b = nat.dump_tap_stats(), twin.dump_tap_stats()  # type: ignore[attr-defined]
    assert a == b
    by_name = {name: (alias, LinkCounters._make(st)) for _i, name, alias, st in a}
    assert set(by_name) == {"tp0", "tp1"}  # not the TUN device, not the veth, not lo
    alias, tp0 = by_name["tp0"]
    assert alias == OWNER_PREFIX + "vm-a"
    assert (tp0.rx_packets, tp0.rx_bytes, tp0.tx_packets, tp0.tx_bytes) == (3, 180, 2, 140)
    assert by_name["tp1"][1] == LinkCounters(0, 0, 0, 0, 0, 0, 0, 0)


@pytest.mark.parametrize("kind", ["native", "twin", "pyroute2"])
def test_tap_stats_by_vm_monotonic_and_absent_when_gone(traffic: int, kind: str) -> None:
    """Issue 15: counters by owning VM, equal on every backend, growing with traffic; a deleted TAP reports nothing."""
    if kind == "native":
        require_native("netlink")
    with open_backend(kind) as net, open_backend("twin") as ref:
        first = net.tap_stats()
        assert first == ref.tap_stats()
        assert set(first) == {"vm-a", "vm-b"}
        assert first["vm-a"]["tp0"].rx_packets == 3
        os.write(traffic, FRAME)
        later = net.tap_stats()
        assert later["vm-a"]["tp0"].rx_packets == 4
        assert all(x >= y for x, y in zip(later["vm-a"]["tp0"], first["vm-a"]["tp0"], strict=True))
        ip("link", "del", "tp1")
        gone = net.tap_stats()
        assert "vm-b" not in gone and set(gone) == {"vm-a"}


def test_hostnet_tap_stats_is_one_dump(traffic: int) -> None:
    """Issue 15: all TAPs' counters cost one RTM_GETLINK dump, not one request per TAP."""
    calls: list[str] = []

    class Counting(_nlpy.NetlinkSocket):
        def _transact(self, msg: bytes, seq: int, mtype: int) -> list[bytes]:
            calls.append("getlink" if rtnl.iter_messages(msg)[0][0] == rtnl.RTM_GETLINK else "other")
            return super()._transact(msg, seq, mtype)

    with HostNet(Counting(), "twin") as net:
        assert set(net.tap_stats()) == {"vm-a", "vm-b"}
    assert calls == ["getlink"]
