"""The pyroute2 driver: reference implementation of the driver contract, for equivalence tests.

Why keep it: pyroute2 is the widely used Python netlink library; proving that
the native module and its twin leave exactly the kernel state pyroute2 leaves
is the best evidence that our hand-built messages are right. It is also a
selectable backend (``open_backend("pyroute2")``). Imported lazily: pyroute2
costs far more to import than the whole native path.

Contract differences handled here: pyroute2 raises ``NetlinkError`` (not
``OSError``) and cannot request IFF_TUN_EXCL, so an existing name is detected
with a lookup first (EBUSY at step TUNSETIFF, like the kernel answers the
native driver), and a failed configuration deletes the TAP it just created.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from nkudo.net import rtnl

_OPER = {s.upper(): s for s in rtnl.OPERSTATES}


def _oserror(exc: BaseException, step: str) -> OSError:
    err = getattr(exc, "code", None) or getattr(exc, "errno", None) or _errno.EIO
    return OSError(err, os.strerror(err), step)


def _to_dict(msg: Any) -> dict[str, object]:
    """pyroute2's decoded ifinfmsg to the dict shape of :func:`nkudo.net.rtnl.parse_link`."""
    kind = None
    tun: dict[str, object] | None = None
    info = msg.get_attr("IFLA_LINKINFO")
    if info is not None:
        kind = info.get_attr("IFLA_INFO_KIND")
        data = info.get_attr("IFLA_INFO_DATA")
        if kind == "tun" and data is not None:
            owner = data.get_attr("IFLA_TUN_OWNER")
            tun = {
                "type": "tap" if data.get_attr("IFLA_TUN_TYPE") == rtnl.IFF_TAP else "tun",
                "owner": owner,
                "pi": bool(data.get_attr("IFLA_TUN_PI")),
                "vnet_hdr": bool(data.get_attr("IFLA_TUN_VNET_HDR")),
                "persist": bool(data.get_attr("IFLA_TUN_PERSIST")),
                "multi_queue": bool(data.get_attr("IFLA_TUN_MULTI_QUEUE")),
            }
    flags = int(msg["flags"])
    oper = msg.get_attr("IFLA_OPERSTATE")
    return {
        "index": int(msg["index"]),
        "name": msg.get_attr("IFLA_IFNAME") or "",
        "flags": flags,
        "up": bool(flags & rtnl.IFF_UP),
        "mtu": msg.get_attr("IFLA_MTU"),
        "mac": msg.get_attr("IFLA_ADDRESS"),
        "master": msg.get_attr("IFLA_MASTER"),
        "kind": kind,
        "operstate": _OPER.get(str(oper).upper(), "unknown") if oper is not None else "unknown",
        "alias": msg.get_attr("IFLA_IFALIAS"),
        "tun": tun,
    }


def _mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class Pyroute2Driver:
    """Same methods, results and exceptions as ``nkudo_native.netlink.NetlinkSocket``."""

    def __init__(self) -> None:
        self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    def _index(self, name: str) -> int:
        found = self._ipr.link_lookup(ifname=name)
        return int(found[0]) if found else 0

    def get_link(self, name: str) -> dict[str, object] | None:
        if not rtnl.valid_ifname(name):
            raise ValueError(f"invalid interface name {name!r}")
        try:
            msgs = self._ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == _errno.ENODEV:
                return None
            raise _oserror(exc, "RTM_GETLINK") from None
        for m in msgs:
            return _to_dict(m)
        return None

    def dump_links(self) -> list[dict[str, object]]:
        try:
            return [_to_dict(m) for m in self._ipr.get_links()]
        except NetlinkError as exc:
            raise _oserror(exc, "RTM_GETLINK") from None

    def dump_tap_stats(self) -> list[rtnl.TapStats]:
        """The reference for the native dump: ``get_links()`` (every device, decoded in full), TAPs kept."""
        try:
            msgs = self._ipr.get_links()
        except NetlinkError as exc:
            raise _oserror(exc, "RTM_GETLINK") from None
        out: list[rtnl.TapStats] = []
        for m in msgs:
            d = _to_dict(m)
            tun = d["tun"]
            st = m.get_attr("IFLA_STATS64")
            if d["kind"] != "tun" or not isinstance(tun, dict) or tun["type"] != "tap" or st is None:
                continue
            stats = tuple(int(st[f]) for f in rtnl.STATS_FIELDS)
            out.append((int(m["index"]), str(d["name"]), d["alias"], stats))  # type: ignore[arg-type]
        return out

    def set_link(
        self,
        index: int = 0,
        name: str | None = None,
        *,
        up: bool | None = None,
        mtu: int = 0,
        mac: bytes | None = None,
        master: int = -1,
        alias: str | None = None,
        group: int = -1,
    ) -> None:
        kw: dict[str, Any] = {}
        if index > 0:
            kw["index"] = index
        elif name is not None:
            if not rtnl.valid_ifname(name):
                raise ValueError(f"invalid interface name {name!r}")
            kw["ifname"] = name
        else:
            raise ValueError("set_link needs an index or a name")
        if up is not None:
            kw["state"] = "up" if up else "down"
        if mtu > 0:
            kw["mtu"] = mtu
        if mac is not None:
            kw["address"] = _mac_str(mac)
        if master >= 0:
            kw["master"] = master
        if alias is not None:
            kw["ifalias"] = alias
        if group >= 0:
            kw["group"] = group
        try:
            self._ipr.link("set", **kw)
        except NetlinkError as exc:
            raise _oserror(exc, "RTM_SETLINK") from None

    def new_link(self, name: str, kind: str) -> None:
        if not rtnl.valid_ifname(name):
            raise ValueError(f"invalid interface name {name!r}")
        try:
            self._ipr.link("add", ifname=name, kind=kind)
        except NetlinkError as exc:
            raise _oserror(exc, "RTM_NEWLINK") from None

    def del_link(self, index: int = 0, name: str | None = None, *, group: int = -1) -> None:
        kw: dict[str, Any]
        if index > 0:
            kw = {"index": index}
        elif group > 0:
            kw = {"group": group}
        elif name is not None:
            if not rtnl.valid_ifname(name):
                raise ValueError(f"invalid interface name {name!r}")
            kw = {"ifname": name}
        else:
            raise ValueError("del_link needs an index, a group or a name")
        try:
            self._ipr.link("del", **kw)
        except NetlinkError as exc:
            raise _oserror(exc, "RTM_DELLINK") from None

    def add_tap(
        self,
        name: str,
        tun_flags: int,
        owner: int = -1,
        *,
        up: bool | None = None,
        mtu: int = 0,
        mac: bytes | None = None,
        master: int = -1,
        alias: str | None = None,
    ) -> None:
        if not rtnl.valid_ifname(name):
            raise ValueError(f"invalid interface name {name!r}")
        if tun_flags & rtnl.IFF_TUN_EXCL and self._index(name):
            raise OSError(_errno.EBUSY, os.strerror(_errno.EBUSY), "TUNSETIFF")
        kw: dict[str, Any] = {
            "ifname": name,
            "kind": "tuntap",
            "mode": "tap",
            "ifr": {
                "no_pi": bool(tun_flags & rtnl.IFF_NO_PI),
                "vnet_hdr": bool(tun_flags & rtnl.IFF_VNET_HDR),
                "multi_queue": bool(tun_flags & rtnl.IFF_MULTI_QUEUE),
                "one_queue": False,
            },
        }
        if owner >= 0:
            kw["uid"] = owner
        try:
            self._ipr.link("add", **kw)
        except (NetlinkError, OSError) as exc:
            raise _oserror(exc, "TUNSETIFF") from None
        try:
            self.set_link(0, name, up=up, mtu=mtu, mac=mac, master=master, alias=alias)
        except OSError:
            try:
                self._ipr.link("del", ifname=name)
            except NetlinkError:
                pass
            raise
