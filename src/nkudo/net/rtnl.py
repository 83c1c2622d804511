"""Sans-I/O rtnetlink codec: build requests and parse replies as pure functions.

Transports (the Python socket in :mod:`nkudo.net.links`, the native module)
only move the bytes this module produces and consumes.
"""

from __future__ import annotations

import struct

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_OPERSTATE = 16
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_INFO_KIND = 1

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_RTATTR = struct.Struct("=HH")
IFNAMSIZ = 16


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


def build_getlink_by_name(name: str, seq: int) -> bytes:
    body = _IFINFOMSG.pack(0, 0, 0, 0, 0) + rtattr(IFLA_IFNAME, name.encode("ascii") + b"\0")
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK, NLM_F_REQUEST, seq, 0) + body


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
    return -err


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
    if IFLA_LINKINFO in attrs:
        info = parse_attrs(attrs[IFLA_LINKINFO])
        if IFLA_INFO_KIND in info:
            kind = _cstr(info[IFLA_INFO_KIND])
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
    }
