"""Pure-Python twin of ``nkudo_native.netlink``: same class, same results, same exceptions.

Why it exists: every native function has a twin (``NKUDO_NATIVE=0`` selects
it, and the test-suite runs both on a live kernel to prove they agree). It uses
the sans-I/O codec in :mod:`nkudo.net.rtnl` over a stdlib netlink socket.

Contract shared with the native module:

* failures of a system call raise ``OSError(errno, strerror, step)`` where
  ``step`` (the exception's ``filename``) names the failing request
  (``"RTM_GETLINK"``, ``"RTM_SETLINK"``, ``"RTM_NEWLINK"``, ``"RTM_DELLINK"``,
  ``"open"``, ``"TUNSETIFF"``, ``"TUNSETOWNER"``, ``"TUNSETPERSIST"``);
* an invalid interface name raises ``ValueError`` before anything is sent;
* links are the dicts of :func:`nkudo.net.rtnl.parse_link`.

A socket is bound to the network namespace of the thread that created it and
is not thread-safe: use one per thread.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
import socket

from nkudo.net import rtnl

_RECV_SIZE = 65536
_STEP = {
    rtnl.RTM_GETLINK: "RTM_GETLINK",
    rtnl.RTM_SETLINK: "RTM_SETLINK",
    rtnl.RTM_NEWLINK: "RTM_NEWLINK",
    rtnl.RTM_DELLINK: "RTM_DELLINK",
}


def _oserror(err: int, step: str) -> OSError:
    return OSError(err, os.strerror(err), step)


def _check_name(name: str) -> None:
    if not rtnl.valid_ifname(name):
        raise ValueError(f"invalid interface name {name!r}")


class NetlinkSocket:
    """An rtnetlink socket in the calling thread's network namespace."""

    def __init__(self) -> None:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            s.bind((0, 0))
        except OSError:
            s.close()
            raise
        self._sock: socket.socket | None = s
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def _s(self) -> socket.socket:
        if self._sock is None:
            raise ValueError("netlink socket is closed")
        return self._sock

    def _transact(self, msg: bytes, seq: int, mtype: int) -> list[bytes]:
        """Send one request; return the payloads of its RTM_NEWLINK answers until the ACK/DONE."""
        s = self._s()
        step = _STEP[mtype]
        try:
            s.send(msg)
        except OSError as exc:
            raise _oserror(exc.errno or _errno.EIO, step) from None
        out: list[bytes] = []
        while True:
            try:
                n = s.recv_into(self._buf, _RECV_SIZE, socket.MSG_TRUNC)
            except OSError as exc:
                raise _oserror(exc.errno or _errno.EIO, step) from None
            if n > _RECV_SIZE:
                raise _oserror(_errno.EMSGSIZE, step)
            for mt, mflags, mseq, payload in rtnl.iter_messages(bytes(self._buf[:n])):
                if mseq != seq:
                    continue
                if mt == rtnl.NLMSG_ERROR:
                    err = rtnl.parse_error(payload)
                    if err:
                        raise _oserror(err, step)
                    return out
                if mt == rtnl.NLMSG_DONE:
                    return out
                if mt == rtnl.RTM_NEWLINK:
                    out.append(payload)
                    if mtype == rtnl.RTM_GETLINK and not mflags & rtnl.NLM_F_MULTI:
                        return out

    def get_link(self, name: str) -> dict[str, object] | None:
        """The link called ``name`` (one RTM_GETLINK by name), or None when absent."""
        _check_name(name)
        seq = self._next_seq()
        try:
            found = self._transact(rtnl.build_getlink_by_name(name, seq), seq, rtnl.RTM_GETLINK)
        except OSError as exc:
            if exc.errno == _errno.ENODEV:
                return None
            raise
        return rtnl.parse_link(found[0]) if found else None

    def dump_links(self) -> list[dict[str, object]]:
        seq = self._next_seq()
        return [rtnl.parse_link(p) for p in self._transact(rtnl.build_dump_links(seq), seq, rtnl.RTM_GETLINK)]

    def dump_tap_stats(self) -> list[rtnl.TapStats]:
        """Every TAP's ``IFLA_STATS64`` counters from one dump (see :func:`nkudo.net.rtnl.parse_tap_stats`)."""
        seq = self._next_seq()
        payloads = self._transact(rtnl.build_dump_tap_stats(seq), seq, rtnl.RTM_GETLINK)
        return [s for s in map(rtnl.parse_tap_stats, payloads) if s is not None]

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
        if index <= 0:
            if name is None:
                raise ValueError("set_link needs an index or a name")
            _check_name(name)
        seq = self._next_seq()
        msg = rtnl.build_setlink(
            seq, index=index, name=name, up=up, mtu=mtu, mac=mac, master=master, alias=alias, group=group
        )
        self._transact(msg, seq, rtnl.RTM_SETLINK)

    def new_link(self, name: str, kind: str) -> None:
        _check_name(name)
        seq = self._next_seq()
        self._transact(rtnl.build_newlink_kind(seq, name, kind), seq, rtnl.RTM_NEWLINK)

    def del_link(self, index: int = 0, name: str | None = None, *, group: int = -1) -> None:
        if index <= 0 and group <= 0:
            if name is None:
                raise ValueError("del_link needs an index, a group or a name")
            _check_name(name)
        seq = self._next_seq()
        self._transact(rtnl.build_dellink(seq, index=index, name=name, group=group), seq, rtnl.RTM_DELLINK)

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
        """Create a persistent TAP and configure it before it becomes persistent.

        Why this order: until TUNSETPERSIST the device lives only as long as our
        fd, so a crash or a failed RTM_SETLINK leaves nothing behind, and a
        persistent device always already carries its owner alias.
        """
        _check_name(name)
        ifr = rtnl.pack_tun_ifreq(name, tun_flags)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _oserror(exc.errno or _errno.EIO, "open") from None
        try:
            step = "TUNSETIFF"
            try:
                fcntl.ioctl(fd, rtnl.TUNSETIFF, ifr)
                if owner >= 0:
                    step = "TUNSETOWNER"
                    fcntl.ioctl(fd, rtnl.TUNSETOWNER, owner)
            except OSError as exc:
                raise _oserror(exc.errno or _errno.EIO, step) from None
            self.set_link(0, name, up=up, mtu=mtu, mac=mac, master=master, alias=alias)
            try:
                fcntl.ioctl(fd, rtnl.TUNSETPERSIST, 1)
            except OSError as exc:
                raise _oserror(exc.errno or _errno.EIO, "TUNSETPERSIST") from None
        finally:
            os.close(fd)
