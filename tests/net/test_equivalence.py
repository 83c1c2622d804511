"""Equivalence: native == twin (driver contract), and every backend leaves the same kernel state."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from nkudo import _native
from nkudo.net import _nlpy, rtnl
from nkudo.net.errors import NetError
from nkudo.net.hostnet import HostNet, open_backend, tap_name
from tests.conftest import entered_netns, require_native
from tests.net.conftest import BACKEND_KINDS, ip, ip_links

TAP_FLAGS = rtnl.IFF_TAP | rtnl.IFF_NO_PI | rtnl.IFF_VNET_HDR | rtnl.IFF_TUN_EXCL


def _pair() -> tuple[Any, _nlpy.NetlinkSocket]:
    require_native("netlink")
    mod = _native.load("netlink")
    assert mod is not None
    return mod.NetlinkSocket(), _nlpy.NetlinkSocket()


def _populate() -> None:
    ip("link", "add", "br0", "type", "bridge")
    ip("link", "set", "br0", "up")
    ip("tuntap", "add", "dev", "tp0", "mode", "tap", "user", "1234", "multi_queue")
    ip("link", "set", "tp0", "master", "br0", "alias", "nkudo:vm=α-unicode")
    ip("link", "add", "ve0", "type", "veth", "peer", "name", "ve1")
    ip("link", "set", "ve0", "up", "mtu", "9000")


def test_native_and_twin_parse_identically(in_netns: str) -> None:
    nat, twin = _pair()
    _populate()
    for name in ("lo", "br0", "tp0", "ve0", "ve1"):
        a, b = nat.get_link(name), twin.get_link(name)
        assert a is not None and a == b
    assert nat.get_link("tp0")["tun"] == {
        "type": "tap", "owner": 1234, "pi": False, "vnet_hdr": False, "persist": True, "multi_queue": True,
    }  # fmt: skip
    assert nat.get_link("tp0")["alias"] == "nkudo:vm=α-unicode"
    dump_n, dump_t = nat.dump_links(), twin.dump_links()
    assert dump_n == dump_t and len(dump_n) == 5
    assert nat.get_link("absent0") is None and twin.get_link("absent0") is None


def _outcome(fn: Any) -> tuple[str, int | None, str | None]:
    try:
        fn()
    except OSError as exc:
        return (type(exc).__name__, exc.errno, exc.filename)
    except ValueError as exc:
        return ("ValueError", None, str(exc))
    return ("ok", None, None)


def test_native_and_twin_fail_identically(in_netns: str) -> None:
    nat, twin = _pair()
    _populate()
    cases = [
        lambda s: s.get_link("bad/name"),
        lambda s: s.get_link("x" * 16),
        lambda s: s.set_link(0, "absent0", up=True),
        lambda s: s.set_link(0, None, up=True),
        lambda s: s.set_link(0, "ve0", mtu=70000),
        lambda s: s.set_link(0, "ve0", master=999),
        lambda s: s.new_link("br0", "bridge"),
        lambda s: s.new_link("nb0", "nosuchkind"),
        lambda s: s.del_link(0, "absent0"),
        lambda s: s.del_link(0, None),
        lambda s: s.add_tap("tp0", TAP_FLAGS),
        lambda s: s.add_tap("br0", TAP_FLAGS),
        lambda s: s.add_tap("nt0", TAP_FLAGS, mtu=65535),
        lambda s: s.add_tap("nt1", TAP_FLAGS, master=999),
    ]
    for i, case in enumerate(cases):
        got_n, got_t = _outcome(lambda c=case: c(nat)), _outcome(lambda c=case: c(twin))
        assert got_n == got_t, f"case {i}: native {got_n} != twin {got_t}"
        assert got_n[0] != "ok", f"case {i} should fail"
    # Failed add_tap leaves nothing behind (the device was never made persistent).
    assert nat.get_link("nt0") is None and nat.get_link("nt1") is None


def test_links_equal_across_backends(in_netns: str) -> None:
    require_native("netlink")
    _populate()
    nets = [open_backend(k) for k in BACKEND_KINDS]
    try:
        for name in ("lo", "br0", "tp0", "ve0"):
            links = [n.get_link(name) for n in nets]
            assert links[0] is not None
            assert all(lk == links[0] for lk in links), links
        owned = [sorted(lk.name for lk in n.list_owned_taps()) for n in nets]
        assert owned == [["tp0"]] * 3
    finally:
        for n in nets:
            n.close()


# ------------------------------------------------------------- kernel state after the same calls

_VOLATILE = {"ifindex", "link_index", "link_netnsid", "parent_bus", "parent_dev", "stats", "stats64"}


def _normalise(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {
            k: _normalise(v)
            for k, v in obj.items()
            if k not in _VOLATILE and not k.endswith("_timer") and not k.startswith("inet6")
        }
    if isinstance(obj, list):
        return [_normalise(v) for v in obj]
    return obj


def _scenario(n: HostNet) -> None:
    n.ensure_bridge("br0", create=True, mtu=1450, mac="02:00:00:00:0b:00")
    n.ensure_bridge("br0", create=True)
    n.create_tap("vm-a", 0, bridge="br0", owner_uid=1000, mtu=1400, mac="02:00:00:00:0a:00")
    n.create_tap("vm-a", 1, bridge="br0", multi_queue=True, mac="02:00:00:00:0a:01")
    n.create_tap("vm-b", 0, up=False, vnet_hdr=False, mac="02:00:00:00:0b:01")
    n.create_tap("vm-a", 0, bridge="br0", owner_uid=1000, mtu=1400, mac="02:00:00:00:0a:00")  # re-use
    n.set_mtu(tap_name("vm-b", 0), 1300)
    n.attach(tap_name("vm-b", 0), "br0")
    n.set_up(tap_name("vm-b", 0))
    n.set_mac(tap_name("vm-a", 1), "02:00:00:00:0a:11")
    n.create_tap("vm-c", 0, mac="02:00:00:00:0c:00")
    n.create_tap("vm-c", 1, mac="02:00:00:00:0c:01")
    n.create_tap("vm-c", 2, mac="02:00:00:00:0c:02")
    n.delete_tap(tap_name("vm-c", 0))
    n.delete_taps([tap_name("vm-c", 1), tap_name("vm-c", 2)])
    n.delete_tap(tap_name("vm-c", 0))
    with pytest.raises(NetError):
        n.create_tap("vm-d", 0, name=tap_name("vm-a", 0))


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    names = [f"nkt-{uuid.uuid4().hex[:8]}" for _ in BACKEND_KINDS]
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_same_calls_same_kernel_state(namespaces: list[str]) -> None:
    require_native("netlink")
    states = {}
    for kind, ns in zip(BACKEND_KINDS, namespaces, strict=True):
        with entered_netns(ns), open_backend(kind) as n:
            _scenario(n)
            states[kind] = _normalise(ip_links())
    names = [lk["ifname"] for lk in states["native"]]
    assert names == ["lo", "br0", tap_name("vm-a", 0), tap_name("vm-a", 1), tap_name("vm-b", 0)]
    assert states["native"] == states["twin"]
    assert states["native"] == states["pyroute2"]
