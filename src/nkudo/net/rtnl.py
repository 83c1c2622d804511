"""Sans-I/O rtnetlink codec: build requests and parse replies as pure functions.

Transports (the Python socket in
:mod:`nkudo.net._nlpy`) only move the bytes this module produces and consumes.
The native module ``nkudo_native.netlink`` re-implements the hot subset in
Cython and must stay byte-for-byte and dict-for-dict equivalent to it; the
test-suite compares both on live kernels.
"""

from __future__ import annotations

import struct

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_SETLINK = 19

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_GROUP = 27
IFLA_EXT_MASK = 29
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2

# Keeps replies small: per-link statistics are most of a RTM_NEWLINK's bytes.
RTEXT_FILTER_SKIP_STATS = 1 << 3

IFLA_TUN_OWNER = 1
IFLA_TUN_TYPE = 3
IFLA_TUN_PI = 4
IFLA_TUN_VNET_HDR = 5
IFLA_TUN_PERSIST = 6
IFLA_TUN_MULTI_QUEUE = 7

# /dev/net/tun (asm-generic _IOW encodings: x86_64 and aarch64).
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_IFREQ_TUN = struct.Struct("=16sH22x")
IFNAMSIZ = 16
IFALIASZ = 256


def valid_ifname(name: str) -> bool:
    """The kernel's dev_valid_name(): 1..15 bytes, no '/', ':' or whitespace, not '.'/'..'."""
    try:
        raw = name.encode("ascii")
    except UnicodeEncodeError:
        return False
    if not raw or len(raw) >= IFNAMSIZ or name in (".", ".."):
        return False
    return not any(c in raw for c in b"/: \t\n\r\x0b\x0c\x00")


def _align4(n: int) -> int:
    return (n + 3) & ~3


def rtattr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align4(length) - length)


def _link_msg(
    mtype: int, flags: int, seq: int, index: int, ifi_flags: int, change: int, attrs: bytes
) -> bytes:
    body = _IFINFOMSG.pack(0, 0, index, ifi_flags, change) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body


def _ifname_attr(name: str) -> bytes:
    return rtattr(IFLA_IFNAME, name.encode("ascii") + b"\0")


_SKIP_STATS = rtattr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))


def build_getlink_by_name(name: str, seq: int) -> bytes:
    """One link by name: the kernel answers with a single RTM_NEWLINK or ENODEV, never a dump."""
    return _link_msg(RTM_GETLINK, NLM_F_REQUEST, seq, 0, 0, 0, _ifname_attr(name) + _SKIP_STATS)


def build_dump_links(seq: int) -> bytes:
    return _link_msg(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, 0, 0, _SKIP_STATS)


def build_setlink(
    seq: int,
    *,
    index: int = 0,
    name: str | None = None,
    up: bool | None = None,
    mtu: int = 0,
    mac: bytes | None = None,
    master: int = -1,
    alias: str | None = None,
    group: int = -1,
) -> bytes:
    """RTM_SETLINK addressed by ``index`` (> 0) or else by ``name``.

    Sentinels mean "leave unchanged": ``up=None``, ``mtu=0``, ``mac=None``,
    ``master=-1`` (0 releases the port), ``alias=None`` (``""`` clears it),
    ``group=-1``. All changes travel in one message so they cost one round trip.
    """
    attrs = b""
    if index <= 0 and name is not None:
        attrs += _ifname_attr(name)
    if mac is not None:
        attrs += rtattr(IFLA_ADDRESS, mac)
    if mtu > 0:
        attrs += rtattr(IFLA_MTU, _U32.pack(mtu))
    if master >= 0:
        attrs += rtattr(IFLA_MASTER, _U32.pack(master))
    if group >= 0:
        attrs += rtattr(IFLA_GROUP, _U32.pack(group))
    if alias is not None:
        attrs += rtattr(IFLA_IFALIAS, alias.encode("utf-8"))
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    return _link_msg(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, seq, max(index, 0), flags, change, attrs)


def build_newlink_kind(seq: int, name: str, kind: str) -> bytes:
    """Create a link of ``kind`` (e.g. ``bridge``); EXCL so an existing name is an error, not a merge."""
    info = rtattr(IFLA_LINKINFO, rtattr(IFLA_INFO_KIND, kind.encode("ascii") + b"\0"))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return _link_msg(RTM_NEWLINK, flags, seq, 0, 0, 0, _ifname_attr(name) + info)


def build_dellink(seq: int, *, index: int = 0, name: str | None = None, group: int = -1) -> bytes:
    """Delete by ``index`` (> 0), else by ``group`` (>= 1: every link in it, one RCU grace period), else ``name``."""
    if index > 0:
        attrs = b""
    elif group > 0:
        attrs = rtattr(IFLA_GROUP, _U32.pack(group))
    elif name is not None:
        attrs = _ifname_attr(name)
    else:
        raise ValueError("dellink needs an index, a group or a name")
    return _link_msg(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, max(index, 0), 0, 0, attrs)


def pack_tun_ifreq(name: str, flags: int) -> bytes:
    """``struct ifreq`` for TUNSETIFF: 16-byte name, ``short`` flags, padded to 40 bytes."""
    return _IFREQ_TUN.pack(name.encode("ascii"), flags)


def iter_messages(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split a datagram into (type, flags, seq, payload) tuples."""
    out = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise ValueError("truncated netlink message")
        out.append((mtype, flags, seq, data[off + _NLMSGHDR.size : off + length]))
        off += _align4(length)
    return out


def parse_error(payload: bytes) -> int:
    """Return the errno of an NLMSG_ERROR payload (0 = ACK)."""
    (err,) = struct.unpack_from("=i", payload, 0)
    return -int(err)


def parse_attrs(data: bytes, off: int = 0) -> dict[int, bytes]:
    attrs: dict[int, bytes] = {}
    while off + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, off)
        if length < _RTATTR.size:
            break
        attrs[kind & 0x3FFF] = data[off + _RTATTR.size : off + length]
        off += _align4(length)
    return attrs


def _cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_link(payload: bytes) -> dict[str, object]:
    """Decode an RTM_NEWLINK payload into the fields the agent uses."""
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload, 0)
    attrs = parse_attrs(payload, _IFINFOMSG.size)
    kind = None
    tun: dict[str, object] | None = None
    if IFLA_LINKINFO in attrs:
        info = parse_attrs(attrs[IFLA_LINKINFO])
        if IFLA_INFO_KIND in info:
            kind = _cstr(info[IFLA_INFO_KIND])
        if kind == "tun" and IFLA_INFO_DATA in info:
            tun = parse_tun_info(info[IFLA_INFO_DATA])
    mac = attrs.get(IFLA_ADDRESS)
    oper = attrs.get(IFLA_OPERSTATE)
    return {
        "index": index,
        "name": _cstr(attrs.get(IFLA_IFNAME, b"")),
        "flags": flags,
        "up": bool(flags & IFF_UP),
        "mtu": struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else None,
        "mac": ":".join(f"{b:02x}" for b in mac) if mac else None,
        "master": struct.unpack("=I", attrs[IFLA_MASTER])[0] if IFLA_MASTER in attrs else None,
        "kind": kind,
        "operstate": OPERSTATES[oper[0]] if oper and oper[0] < len(OPERSTATES) else "unknown",
        "alias": _cstr(attrs[IFLA_IFALIAS]) if IFLA_IFALIAS in attrs else None,
        "tun": tun,
    }


def _flag(attrs: dict[int, bytes], kind: int) -> bool:
    v = attrs.get(kind)
    return bool(v and v[0])


def parse_tun_info(data: bytes) -> dict[str, object]:
    """IFLA_INFO_DATA of kind ``tun``: the read-only view of TUNSETIFF/TUNSETOWNER/TUNSETPERSIST."""
    a = parse_attrs(data)
    ttype = a.get(IFLA_TUN_TYPE)
    owner = a.get(IFLA_TUN_OWNER)
    return {
        "type": "tap" if ttype and ttype[0] == IFF_TAP else "tun",
        "owner": _U32.unpack(owner[:4])[0] if owner and len(owner) >= 4 else None,
        "pi": _flag(a, IFLA_TUN_PI),
        "vnet_hdr": _flag(a, IFLA_TUN_VNET_HDR),
        "persist": _flag(a, IFLA_TUN_PERSIST),
        "multi_queue": _flag(a, IFLA_TUN_MULTI_QUEUE),
    }


# --------------------------------------------------------------------------- per-TAP counters (issue 15)

IFLA_STATS64 = 23
#: ``struct rtnl_link_stats64`` starts with these eight u64s (in this order).
_STATS64_HEAD = struct.Struct("=8Q")
#: Index of each field of :data:`STATS_FIELDS` in ``struct rtnl_link_stats64``.
_STATS64_ORDER = (2, 0, 4, 6, 3, 1, 5, 7)
#: What :func:`parse_tap_stats` returns per device, in the kernel's (device's) direction.
STATS_FIELDS = ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped")

#: One TAP's counters: ``(ifindex, name, ifalias or None, eight counters in STATS_FIELDS order)``.
TapStats = tuple[int, str, str | None, tuple[int, int, int, int, int, int, int, int]]

_TUN_KIND_FILTER = rtattr(IFLA_LINKINFO, rtattr(IFLA_INFO_KIND, b"tun\0"))


def build_dump_tap_stats(seq: int) -> bytes:
    """A link dump with statistics, asking the kernel to send only ``tun`` devices.

    Why the kind filter: the kernel skips other devices (``NLM_F_DUMP_FILTERED``) so a host with many
    veths and bridges costs no more than its TAPs; kernels without the filter send everything and
    :func:`parse_tap_stats` drops what is not a TAP, so the result is the same either way.
    """
    return _link_msg(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, 0, 0, 0, _TUN_KIND_FILTER)


def parse_tap_stats(payload: bytes) -> TapStats | None:
    """A TAP's counters from an RTM_NEWLINK payload; None for any other device or one without IFLA_STATS64."""
    _family, _type, index, _flags, _change = _IFINFOMSG.unpack_from(payload, 0)
    attrs = parse_attrs(payload, _IFINFOMSG.size)
    info = attrs.get(IFLA_LINKINFO)
    if info is None:
        return None
    linfo = parse_attrs(info)
    if _cstr(linfo.get(IFLA_INFO_KIND, b"")) != "tun":
        return None
    data = linfo.get(IFLA_INFO_DATA)
    ttype = parse_attrs(data).get(IFLA_TUN_TYPE) if data is not None else None
    if not ttype or ttype[0] != IFF_TAP:
        return None
    raw = attrs.get(IFLA_STATS64)
    if raw is None or len(raw) < _STATS64_HEAD.size:
        return None
    head = _STATS64_HEAD.unpack_from(raw, 0)
    stats = tuple(head[i] for i in _STATS64_ORDER)
    alias = _cstr(attrs[IFLA_IFALIAS]) if IFLA_IFALIAS in attrs else None
    return (index, _cstr(attrs.get(IFLA_IFNAME, b"")), alias, stats)
