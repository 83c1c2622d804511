"""Look a link up by name over rtnetlink (stdlib socket transport).

Used by ``check`` and ``hostfacts``; deliberately free of pyroute2 so those
commands start fast.
"""

from __future__ import annotations

import errno as _errno
import os
import socket

from nkudo.errors import HostError, ValidationError
from nkudo.net import rtnl


def _nl_socket() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    s.bind((0, 0))
    return s


def get_link(name: str) -> dict[str, object] | None:
    """Return the link's fields, or None when no link has that name."""
    if not rtnl.valid_ifname(name):
        raise ValidationError(f"interface name {name!r} is not a valid Linux interface name", field="name")
    with _nl_socket() as s:
        seq = 1
        s.send(rtnl.build_getlink_by_name(name, seq))
        while True:
            data = s.recv(65536)
            for mtype, _flags, mseq, payload in rtnl.iter_messages(data):
                if mseq != seq:
                    continue
                if mtype == rtnl.NLMSG_ERROR:
                    err = rtnl.parse_error(payload)
                    if err in (_errno.ENODEV, _errno.ENOENT):
                        return None
                    if err == 0:
                        continue
                    raise HostError(
                        f"netlink lookup of {name!r} failed: {os.strerror(err)}", code="NETLINK_ERROR"
                    )
                if mtype == rtnl.RTM_NEWLINK:
                    return rtnl.parse_link(payload)
