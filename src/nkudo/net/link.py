"""A network device as the kernel reports it, and the one rule deciding whether nkudo owns it.

Why a module of its own: ownership is a security decision (a wrong answer lets
the agent delete or re-plumb somebody else's interface), so it is defined once,
here, and every backend's lookups go through :class:`Link`.
"""

from __future__ import annotations

from collections import namedtuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NamedTuple

OWNER_PREFIX = "nkudo:vm="


class TunInfo:
    """The TUN/TAP settings the kernel reports for a device (IFLA_INFO_DATA of kind ``tun``)."""

    __slots__ = ("multi_queue", "owner", "persist", "pi", "type", "vnet_hdr")

    def __init__(self, d: dict[str, object]) -> None:
        self.type = str(d["type"])
        owner = d["owner"]
        self.owner = owner if isinstance(owner, int) else None
        self.pi = bool(d["pi"])
        self.vnet_hdr = bool(d["vnet_hdr"])
        self.persist = bool(d["persist"])
        self.multi_queue = bool(d["multi_queue"])

    def to_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TunInfo) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __repr__(self) -> str:
        return f"TunInfo({self.to_dict()!r})"


class Link:
    """A network device as the kernel reported it at lookup time."""

    __slots__ = ("alias", "flags", "index", "kind", "mac", "master", "mtu", "name", "operstate", "tun", "up")

    def __init__(self, d: dict[str, object]) -> None:
        self.index = int(d["index"])  # type: ignore[call-overload]
        self.name = str(d["name"])
        self.flags = int(d["flags"])  # type: ignore[call-overload]
        self.up = bool(d["up"])
        mtu, master, mac, kind, alias, tun = d["mtu"], d["master"], d["mac"], d["kind"], d["alias"], d["tun"]
        self.mtu = mtu if isinstance(mtu, int) else None
        self.master = master if isinstance(master, int) and master > 0 else None
        self.mac = mac if isinstance(mac, str) else None
        self.kind = kind if isinstance(kind, str) else None
        self.operstate = str(d["operstate"])
        self.alias = alias if isinstance(alias, str) else None
        self.tun = TunInfo(tun) if isinstance(tun, dict) else None

    @property
    def is_tap(self) -> bool:
        """A TUN/TAP device in TAP mode: the only kind of device nkudo ever creates."""
        return self.kind == "tun" and self.tun is not None and self.tun.type == "tap"

    @property
    def vm_id(self) -> str | None:
        """The VM that owns this device, or None if nkudo does not own it.

        Why both conditions: the ifalias is writable by anyone with CAP_NET_ADMIN
        and survives on any kind of device, so the marker alone proves nothing.
        nkudo only ever creates TAPs, hence a veth, a bridge or a TUN-mode device
        carrying ``nkudo:vm=`` is someone else's and is never modified, listed
        or deleted. This is the one ownership test every operation goes through.
        """
        if self.is_tap and self.alias and self.alias.startswith(OWNER_PREFIX):
            return self.alias[len(OWNER_PREFIX) :]
        return None

    def to_dict(self) -> dict[str, object]:
        out = {k: getattr(self, k) for k in self.__slots__}
        out["tun"] = self.tun.to_dict() if self.tun else None
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Link) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.index, self.name))

    def __repr__(self) -> str:
        return (
            f"Link({self.name!r}, index={self.index}, kind={self.kind!r}, up={self.up}, master={self.master})"
        )


if TYPE_CHECKING:

    class LinkCounters(NamedTuple):
        """A device's ``IFLA_STATS64`` counters in the kernel's (the device's) direction."""

        rx_bytes: int
        rx_packets: int
        rx_errors: int
        rx_dropped: int
        tx_bytes: int
        tx_packets: int
        tx_errors: int
        tx_dropped: int

else:
    # Why a namedtuple: one is built per TAP per scrape straight from the driver's tuple (``_make``), in the
    # order of :data:`nkudo.net.rtnl.STATS_FIELDS`, with no per-field copying. Built with ``collections``
    # rather than ``typing.NamedTuple`` because importing ``typing`` costs milliseconds on the native network
    # path's import budget (benchmarks/test_net_bench.py); the type checker sees the class above.
    LinkCounters = namedtuple(
        "LinkCounters",
        ("rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped"),
    )
