"""Bridges and TAPs on a real kernel, one private netns per test, for every backend.

Every assertion about kernel state reads it back with iproute2, not with the
code under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nkudo.errors import ValidationError
from nkudo.net.errors import NetError
from nkudo.net.hostnet import HostNet, owner_alias, tap_name
from tests.net.conftest import bridge_ports, ip, ip_link

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- naming (pure)


def test_tap_name_is_deterministic_short_and_distinct() -> None:
    names = {tap_name("vm-1", i) for i in range(10)}
    assert len(names) == 10
    assert tap_name("vm-1", 3) == tap_name("vm-1", 3)
    assert tap_name("vm-1", 0) != tap_name("vm-2", 0)
    long_id = "x" * 200
    for n in (tap_name(long_id, 999), tap_name("a", 0)):
        assert n.startswith("nk") and len(n.encode()) <= 15
    assert owner_alias("vm-1") == "nkudo:vm=vm-1"


@pytest.mark.parametrize("bad", ["", "has space", "é", "x" * 300, "tab\tid"])
def test_tap_name_rejects_bad_vm_ids(bad: str) -> None:
    with pytest.raises(ValidationError) as ei:
        tap_name(bad, 0)
    assert ei.value.code == "NET_INVALID_ARGUMENT"


@pytest.mark.parametrize("idx", [-1, 1000])
def test_tap_name_rejects_bad_index(idx: int) -> None:
    with pytest.raises(NetError) as ei:
        tap_name("vm", idx)
    assert ei.value.code == "NET_INVALID_ARGUMENT"


# ---------------------------------------------------------------- lookups


def test_get_link_lo_and_absent(net: HostNet) -> None:
    lo = net.get_link("lo")
    ref = ip_link("lo")
    assert lo is not None and ref is not None
    assert (lo.index, lo.name, lo.mtu, lo.up) == (ref["ifindex"], "lo", ref["mtu"], "UP" in ref["flags"])
    assert net.get_link("nosuchdev0") is None


@pytest.mark.parametrize("bad", ["", "a" * 16, "a/b", "a:b", "a b", "..", "é"])
def test_invalid_names_are_rejected_before_any_io(net: HostNet, bad: str) -> None:
    with pytest.raises(NetError) as ei:
        net.get_link(bad)
    assert ei.value.code == "NET_INVALID_NAME"
    with pytest.raises(NetError) as ei:
        net.create_tap("vm-1", 0, name=bad)
    assert ei.value.code == "NET_INVALID_NAME"
    assert repr(bad) in ei.value.message


# ---------------------------------------------------------------- bridges


def test_ensure_bridge_missing_create_idempotent(net: HostNet) -> None:
    with pytest.raises(NetError) as ei:
        net.ensure_bridge("br0")
    assert ei.value.code == "NET_BRIDGE_MISSING" and "'br0'" in ei.value.message
    assert ip_link("br0") is None
    br = net.ensure_bridge("br0", create=True, mtu=1450, mac="02:00:00:00:01:00")
    ref = ip_link("br0")
    assert ref is not None
    assert ref["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in ref["flags"] and ref["mtu"] == 1450 and ref["address"] == "02:00:00:00:01:00"
    assert br.index == ref["ifindex"] and br.kind == "bridge" and br.up
    again = net.ensure_bridge("br0", create=True)
    assert again.index == br.index
    # An existing bridge that is down is brought up without create=True.
    ip("link", "set", "br0", "down")
    assert net.ensure_bridge("br0").up
    assert "UP" in (ip_link("br0") or {})["flags"]


def test_ensure_bridge_refuses_non_bridge(net: HostNet) -> None:
    ip("link", "add", "dum0", "type", "veth", "peer", "name", "dum0p")
    with pytest.raises(NetError) as ei:
        net.ensure_bridge("dum0", create=True)
    assert ei.value.code == "NET_NOT_A_BRIDGE" and "'dum0'" in ei.value.message


# ---------------------------------------------------------------- TAP creation


def test_create_tap_full_state(net: HostNet) -> None:
    net.ensure_bridge("br0", create=True)
    link = net.create_tap(
        "vm-1", 0, bridge="br0", owner_uid=4242, mtu=1400, mac="02:11:22:33:44:55", multi_queue=False
    )
    name = tap_name("vm-1", 0)
    ref = ip_link(name)
    assert ref is not None
    assert link.name == name and link.index == ref["ifindex"]
    info = ref["linkinfo"]["info_data"]
    assert ref["linkinfo"]["info_kind"] == "tun"
    assert info["type"] == "tap" and info["persist"] is True and info["vnet_hdr"] is True
    assert info["pi"] is False and info["multi_queue"] is False
    assert str(info["user"]) == "4242"  # iproute2 prints the uid when no passwd entry names it
    assert "UP" in ref["flags"] and ref["mtu"] == 1400 and ref["address"] == "02:11:22:33:44:55"
    assert ref["ifalias"] == "nkudo:vm=vm-1"
    assert ref["master"] == "br0"
    assert bridge_ports()[name] == "br0"
    assert link.vm_id == "vm-1" and link.tun is not None and link.tun.owner == 4242


def test_create_tap_multi_queue_no_bridge_down(net: HostNet) -> None:
    link = net.create_tap("vm-1", 1, multi_queue=True, vnet_hdr=False, up=False)
    ref = ip_link(link.name)
    assert ref is not None
    assert ref["linkinfo"]["info_data"]["multi_queue"] is True
    assert ref["linkinfo"]["info_data"]["vnet_hdr"] is False
    assert "UP" not in ref["flags"] and "master" not in ref
    assert "user" not in ref["linkinfo"]["info_data"]


def test_create_tap_reuses_own_and_recreates_on_mismatch(net: HostNet) -> None:
    net.ensure_bridge("br0", create=True)
    first = net.create_tap("vm-1", 0, bridge="br0")
    ip("link", "set", first.name, "down", "nomaster")
    again = net.create_tap("vm-1", 0, bridge="br0")
    assert again.index == first.index  # same device, re-converged
    ref = ip_link(first.name) or {}
    assert "UP" in ref["flags"] and ref["master"] == "br0"
    mq = net.create_tap("vm-1", 0, bridge="br0", multi_queue=True)
    assert mq.index != first.index
    assert (ip_link(first.name) or {})["linkinfo"]["info_data"]["multi_queue"] is True


def test_name_taken_by_foreign_devices(net: HostNet) -> None:
    name = tap_name("vm-1", 0)
    ip("tuntap", "add", "dev", name, "mode", "tap")
    with pytest.raises(NetError) as ei:
        net.create_tap("vm-1", 0, mtu=1300)
    assert ei.value.code == "NET_NAME_TAKEN" and repr(name) in ei.value.message
    ref = ip_link(name) or {}
    assert "ifalias" not in ref and ref["mtu"] == 1500  # untouched
    # A TAP of another VM is not ours to take either.
    ip("link", "set", name, "alias", "nkudo:vm=vm-2")
    with pytest.raises(NetError) as ei:
        net.create_tap("vm-1", 0)
    assert ei.value.code == "NET_NAME_TAKEN" and "vm-2" in ei.value.message
    # Nor a non-TUN device.
    ip("link", "add", "dum0", "type", "veth", "peer", "name", "dum0p")
    with pytest.raises(NetError) as ei:
        net.create_tap("vm-1", 0, name="dum0")
    assert ei.value.code == "NET_NAME_TAKEN"
    assert (ip_link("dum0") or {})["linkinfo"]["info_kind"] == "veth"


def test_create_tap_bridge_missing_or_wrong_leaves_nothing(net: HostNet) -> None:
    with pytest.raises(NetError) as ei:
        net.create_tap("vm-1", 0, bridge="nobr0")
    assert ei.value.code == "NET_BRIDGE_MISSING" and "'nobr0'" in ei.value.message
    ip("link", "add", "dum0", "type", "veth", "peer", "name", "dum0p")
    with pytest.raises(NetError) as ei:
        net.create_tap("vm-1", 0, bridge="dum0")
    assert ei.value.code == "NET_NOT_A_BRIDGE"
    assert ip_link(tap_name("vm-1", 0)) is None


def test_failed_configuration_rolls_back(net: HostNet) -> None:
    # TAPs accept at most 65521 bytes: the kernel refuses the RTM_SETLINK.
    with pytest.raises(NetError) as ei:
        net.create_tap("vm-1", 0, mtu=65535)
    assert ei.value.code == "NET_ERROR" and tap_name("vm-1", 0) in ei.value.message
    assert ei.value.errno == 22
    assert ip_link(tap_name("vm-1", 0)) is None


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"mtu": 10}, "NET_INVALID_ARGUMENT"),
        ({"mac": "01:00:5e:00:00:01"}, "NET_INVALID_ARGUMENT"),
        ({"mac": "zz"}, "NET_INVALID_ARGUMENT"),
        ({"owner_uid": -5}, "NET_INVALID_ARGUMENT"),
    ],
)
def test_create_tap_argument_errors(net: HostNet, kw: dict[str, object], code: str) -> None:
    with pytest.raises(NetError) as ei:
        net.create_tap("vm-1", 0, **kw)  # type: ignore[arg-type]
    assert ei.value.code == code
    assert ip_link(tap_name("vm-1", 0)) is None


# ---------------------------------------------------------------- modify / delete


def test_modify_own_tap_and_refuse_foreign(net: HostNet) -> None:
    net.ensure_bridge("br0", create=True)
    net.ensure_bridge("br1", create=True)
    t = net.create_tap("vm-1", 0, up=False)
    net.attach(t.name, "br1")
    net.set_mtu(t.name, 1234)
    net.set_mac(t.name, "02:aa:bb:cc:dd:ee")
    net.set_up(t.name)
    ref = ip_link(t.name) or {}
    assert ref["master"] == "br1" and ref["mtu"] == 1234 and ref["address"] == "02:aa:bb:cc:dd:ee"
    assert "UP" in ref["flags"]
    net.detach(t.name)
    net.set_up(t.name, False)
    ref = ip_link(t.name) or {}
    assert "master" not in ref and "UP" not in ref["flags"]
    with pytest.raises(NetError) as ei:
        net.attach(t.name, "nobr")
    assert ei.value.code == "NET_BRIDGE_MISSING"
    ip("link", "add", "dum0", "type", "veth", "peer", "name", "dum0p")
    calls: list[Callable[[], object]] = [
        lambda: net.set_mtu("dum0", 1400),
        lambda: net.attach("dum0", "br0"),
        lambda: net.set_up("dum0"),
    ]
    for call in calls:
        with pytest.raises(NetError) as ei:
            call()
        assert ei.value.code == "NET_NOT_OWNED" and "'dum0'" in ei.value.message
    assert (ip_link("dum0") or {})["mtu"] == 1500
    with pytest.raises(NetError) as ei:
        net.set_mtu("absent0", 1400)
    assert ei.value.code == "NET_NOT_FOUND"


def test_delete_tap(net: HostNet) -> None:
    t = net.create_tap("vm-1", 0)
    assert net.delete_tap(t.name, vm_id="vm-1") is True
    assert ip_link(t.name) is None
    assert net.delete_tap(t.name) is False  # absent: no-op
    ip("tuntap", "add", "dev", "foreign0", "mode", "tap")
    with pytest.raises(NetError) as ei:
        net.delete_tap("foreign0")
    assert ei.value.code == "NET_NOT_OWNED" and "'foreign0'" in ei.value.message
    other = net.create_tap("vm-2", 0)
    with pytest.raises(NetError) as ei:
        net.delete_tap(other.name, vm_id="vm-1")
    assert ei.value.code == "NET_NOT_OWNED"
    assert ip_link("foreign0") is not None and ip_link(other.name) is not None


def test_delete_taps_batch(net: HostNet) -> None:
    names = [net.create_tap("vm-1", i).name for i in range(4)]
    keep = net.create_tap("vm-2", 0).name
    ip("link", "add", "dum0", "type", "veth", "peer", "name", "dum0p")
    with pytest.raises(NetError) as ei:
        net.delete_taps([*names, "dum0"])
    assert ei.value.code == "NET_NOT_OWNED"
    assert all(ip_link(n) is not None for n in names)  # checked before anything changed
    deleted = net.delete_taps([*names, "absent0"], vm_id="vm-1")
    assert sorted(deleted) == sorted(names)
    assert all(ip_link(n) is None for n in names)
    assert ip_link(keep) is not None and ip_link("dum0") is not None


def test_list_owned_taps(net: HostNet) -> None:
    a = [net.create_tap("vm-1", i).name for i in range(2)]
    b = net.create_tap("vm-2", 0).name
    ip("tuntap", "add", "dev", "foreign0", "mode", "tap")
    ip("link", "set", "foreign0", "alias", "someone-else")
    ip("link", "add", "dum0", "type", "veth", "peer", "name", "dum0p")
    ip("link", "set", "dum0", "alias", "nkudo:vm=vm-1")  # marker on a non-TAP: not ours
    assert sorted(lk.name for lk in net.list_owned_taps()) == sorted([*a, b])
    assert sorted(lk.name for lk in net.list_owned_taps("vm-1")) == sorted(a)
    assert {lk.vm_id for lk in net.list_owned_taps()} == {"vm-1", "vm-2"}


# ---------------------------------------------------------------- permission


_DENIED_SCRIPT = """
import json, sys
from nkudo.net.hostnet import open_backend
from nkudo.net.errors import NetError
out = {}
try:
    with open_backend(sys.argv[1]) as n:
        n.create_tap("vm-1", 0)
except NetError as e:
    out = {"code": e.code, "message": e.message}
print(json.dumps(out))
"""


def test_permission_denied(backend: str, netns_name: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    r = subprocess.run(
        [
            "ip", "netns", "exec", netns_name,
            "setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
            sys.executable, "-c", _DENIED_SCRIPT, backend,
        ],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out.get("code") == "NET_PERMISSION_DENIED", r.stdout + r.stderr
    assert tap_name("vm-1", 0) in out["message"]
    r2 = subprocess.run(["ip", "-n", netns_name, "-j", "link", "show"], capture_output=True, text=True)
    assert [lk["ifname"] for lk in json.loads(r2.stdout)] == ["lo"]
