"""Bridges and TAP devices for Cloud Hypervisor VMs: the public API of the host network layer.

Why this shape: the kernel work is done by a small *driver* with one contract
(``nkudo_native.netlink.NetlinkSocket``, its pure-Python twin
:class:`nkudo.net._nlpy.NetlinkSocket`, or the pyroute2 reference
:class:`nkudo.net._pyroute2.Pyroute2Driver`), and every decision (naming,
ownership, idempotence, error codes, messages) is taken once, here, by
:class:`HostNet`. So all backends fail the same way by construction, and the
test-suite only has to prove that the drivers leave the same kernel state.

Ownership: each TAP carries the ifalias ``nkudo:vm=<vm id>``. A device without
that marker, or one that is not a TAP (see :attr:`nkudo.net.link.Link.vm_id`),
is never modified, adopted or deleted; a TAP with the marker of the same VM is
re-used. The native and twin drivers set the marker before the TAP
becomes persistent, so even a crash mid-creation cannot leak an unmarked TAP.

A :class:`HostNet` holds one netlink socket bound to the network namespace of
the thread that opened it; it is not thread-safe (open one per thread).
Importing this module does not import pyroute2, ``socket`` or ``hashlib``.
"""

from __future__ import annotations

import errno as _errno
import os

from nkudo import _native
from nkudo.log import get_logger
from nkudo.net import rtnl
from nkudo.net.errors import (
    NetBridgeMissing,
    NetError,
    NetInvalidArgument,
    NetInvalidName,
    NetNameTaken,
    NetNotABridge,
    NetNotFound,
    NetNotOwned,
    NetPermissionDenied,
)
from nkudo.net.link import OWNER_PREFIX, Link, LinkCounters

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Protocol

    class Driver(Protocol):
        """What a backend must do; see the contract in ``nkudo_native/netlink.pyx``."""

        def get_link(self, name: str) -> dict[str, object] | None: ...

        def dump_links(self) -> list[dict[str, object]]: ...

        def dump_tap_stats(self) -> list[rtnl.TapStats]: ...

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
        ) -> None: ...

        def new_link(self, name: str, kind: str) -> None: ...

        def del_link(self, index: int = 0, name: str | None = None, *, group: int = -1) -> None: ...

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
        ) -> None: ...

        def close(self) -> None: ...


TAP_PREFIX = "nk"
MAX_NIC_INDEX = 999
MIN_MTU = 68
MAX_MTU = 65535
BACKENDS = ("native", "twin", "pyroute2")
_MAX_VM_ID = rtnl.IFALIASZ - 1 - len(OWNER_PREFIX)

log = get_logger("net")


# --------------------------------------------------------------------------- validation


def validate_name(name: str, what: str = "interface") -> str:
    if not isinstance(name, str) or not rtnl.valid_ifname(name):
        raise NetInvalidName(
            f"{what} name {name!r} is not a valid Linux interface name "
            "(1-15 ASCII bytes, no '/', ':' or whitespace)",
            device=str(name),
            field="name",
        )
    return name


def validate_vm_id(vm_id: str) -> str:
    ok = (
        isinstance(vm_id, str)
        and 0 < len(vm_id) <= _MAX_VM_ID
        and vm_id.isascii()
        and vm_id.isprintable()
        and not any(c.isspace() for c in vm_id)
    )
    if not ok:
        raise NetInvalidArgument(
            f"VM id {vm_id!r} cannot be recorded in a device alias "
            f"(1-{_MAX_VM_ID} printable ASCII characters, no whitespace)",
            field="vm_id",
        )
    return vm_id


def owner_alias(vm_id: str) -> str:
    """The ifalias marking a TAP as owned by ``vm_id``."""
    return OWNER_PREFIX + validate_vm_id(vm_id)


def tap_name(vm_id: str, index: int = 0) -> str:
    """Deterministic TAP name: ``nk`` + 10 hex digits of BLAKE2b(vm id) + NIC index (<= 15 bytes).

    Deterministic so that a restarted agent finds the TAPs of its VMs without
    any state; hashed so that arbitrary VM ids fit the kernel's 15-byte limit.
    """
    import hashlib

    validate_vm_id(vm_id)
    if not isinstance(index, int) or not 0 <= index <= MAX_NIC_INDEX:
        raise NetInvalidArgument(f"NIC index {index!r} must be 0..{MAX_NIC_INDEX}", field="index")
    digest = hashlib.blake2b(vm_id.encode("ascii"), digest_size=5, person=b"nkudo-tap").hexdigest()
    return f"{TAP_PREFIX}{digest}{index}"


def parse_mac(mac: str, device: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` to bytes; unicast only (the kernel refuses multicast on Ethernet)."""
    parts = mac.split(":") if isinstance(mac, str) else []
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        raw = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise NetInvalidArgument(
            f"MAC address {mac!r} for {device!r} must be six hex octets like 02:00:00:00:00:01",
            device=device,
            field="mac",
        )
    if raw[0] & 1 or raw == b"\0" * 6:
        raise NetInvalidArgument(
            f"MAC address {mac!r} for {device!r} must be a non-zero unicast address",
            device=device,
            field="mac",
        )
    return raw


def _check_mtu(mtu: int | None, device: str) -> int:
    if mtu is None:
        return 0
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not MIN_MTU <= mtu <= MAX_MTU:
        raise NetInvalidArgument(f"MTU {mtu!r} for {device!r} must be {MIN_MTU}..{MAX_MTU}", device=device)
    return mtu


def _check_uid(uid: int | None, device: str) -> int:
    if uid is None:
        return -1
    if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid < 0x7FFFFFFF:
        raise NetInvalidArgument(f"owner uid {uid!r} for {device!r} is not a valid uid", device=device)
    return uid


def map_oserror(exc: OSError, action: str, device: str) -> NetError:
    """The one errno-to-error table every backend goes through."""
    err = exc.errno or _errno.EIO
    step = f" ({exc.filename})" if exc.filename else ""
    if err in (_errno.EPERM, _errno.EACCES):
        return NetPermissionDenied(
            f"cannot {action} {device!r}: permission denied{step}; the agent needs CAP_NET_ADMIN "
            "in this network namespace",
            device=device,
            errno=err,
        )
    if err == _errno.ENODEV:
        return NetNotFound(f"cannot {action} {device!r}: no such device{step}", device=device, errno=err)
    return NetError(f"cannot {action} {device!r}: {os.strerror(err)}{step}", device=device, errno=err)


# --------------------------------------------------------------------------- the API


class HostNet:
    """Bridges and TAPs through one driver. Use :func:`open_backend` to get one."""

    def __init__(self, driver: Driver, backend: str) -> None:
        self._d = driver
        self.backend = backend

    def close(self) -> None:
        self._d.close()

    def __enter__(self) -> HostNet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # lookups ---------------------------------------------------------------

    def get_link(self, name: str) -> Link | None:
        """One link by name (a single RTM_GETLINK, never a dump); None when absent."""
        validate_name(name)
        try:
            d = self._d.get_link(name)
        except OSError as exc:
            raise map_oserror(exc, "look up", name) from None
        return Link(d) if d is not None else None

    def _require(self, name: str) -> Link:
        link = self.get_link(name)
        if link is None:
            raise NetNotFound(f"device {name!r} does not exist", device=name)
        return link

    def list_owned_taps(self, vm_id: str | None = None) -> list[Link]:
        """TAPs carrying an nkudo owner marker (of ``vm_id`` if given): the sweep list after a crash."""
        if vm_id is not None:
            validate_vm_id(vm_id)
        try:
            links = [Link(d) for d in self._d.dump_links()]
        except OSError as exc:
            raise map_oserror(exc, "list", "all links") from None
        return [lk for lk in links if lk.vm_id is not None and (vm_id is None or lk.vm_id == vm_id)]

    def tap_stats(self) -> dict[str, dict[str, LinkCounters]]:
        """Counters of every TAP carrying an owner marker, by VM id then TAP name, from one dump.

        Only what exists is returned: a VM whose TAPs are gone has no entry (not zeros, which would read
        as a counter reset). Ownership is :attr:`Link.vm_id`'s rule: a TAP (the driver only returns TAPs)
        whose alias carries the marker.
        """
        try:
            found = self._d.dump_tap_stats()
        except OSError as exc:
            raise map_oserror(exc, "read the counters of", "all TAPs") from None
        out: dict[str, dict[str, LinkCounters]] = {}
        n = len(OWNER_PREFIX)
        for _index, name, alias, stats in found:
            if alias is not None and alias.startswith(OWNER_PREFIX) and len(alias) > n:
                out.setdefault(alias[n:], {})[name] = LinkCounters._make(stats)
        return out

    # bridges ---------------------------------------------------------------

    def _bridge(self, bridge: str) -> Link:
        validate_name(bridge, "bridge")
        br = self.get_link(bridge)
        if br is None:
            raise NetBridgeMissing(f"bridge {bridge!r} does not exist", device=bridge)
        if br.kind != "bridge":
            raise NetNotABridge(
                f"device {bridge!r} is a {br.kind or 'plain'} device, not a bridge", device=bridge
            )
        return br

    def ensure_bridge(
        self, name: str, *, create: bool = False, mtu: int | None = None, mac: str | None = None
    ) -> Link:
        """Make sure bridge ``name`` exists (created only if ``create``) and is up; idempotent."""
        validate_name(name, "bridge")
        want_mtu = _check_mtu(mtu, name)
        want_mac = parse_mac(mac, name) if mac is not None else None
        link = self.get_link(name)
        if link is None:
            if not create:
                raise NetBridgeMissing(
                    f"bridge {name!r} does not exist (create it, or let nkudo create it)", device=name
                )
            try:
                self._d.new_link(name, "bridge")
                log.info("bridge created", bridge=name)
            except OSError as exc:
                if exc.errno != _errno.EEXIST:
                    raise map_oserror(exc, "create bridge", name) from None
        link = self._bridge(name)
        changes: dict[str, object] = {}
        if not link.up:
            changes["up"] = True
        if want_mtu and link.mtu != want_mtu:
            changes["mtu"] = want_mtu
        if want_mac is not None and link.mac != mac.lower():  # type: ignore[union-attr]
            changes["mac"] = want_mac
        if changes:
            try:
                self._d.set_link(link.index, **changes)  # type: ignore[arg-type]
            except OSError as exc:
                raise map_oserror(exc, "configure bridge", name) from None
            link = self._bridge(name)
        return link

    # TAPs ------------------------------------------------------------------

    def create_tap(
        self,
        vm_id: str,
        nic: int = 0,
        *,
        name: str | None = None,
        bridge: str | None = None,
        owner_uid: int | None = None,
        multi_queue: bool = False,
        vnet_hdr: bool = True,
        mtu: int | None = None,
        mac: str | None = None,
        up: bool = True,
    ) -> Link:
        """Create (or re-use, if it carries this VM's marker) a persistent TAP, attached and up.

        ``name`` defaults to :func:`tap_name`. ``owner_uid`` lets an unprivileged
        Cloud Hypervisor open the device; ``multi_queue`` must match what Cloud
        Hypervisor asks for (it uses IFF_MULTI_QUEUE iff num_queues > 2).
        """
        alias = owner_alias(vm_id)
        name = tap_name(vm_id, nic) if name is None else validate_name(name, "TAP")
        uid = _check_uid(owner_uid, name)
        want_mtu = _check_mtu(mtu, name)
        raw_mac = parse_mac(mac, name) if mac is not None else None
        master = self._bridge(bridge).index if bridge is not None else -1
        flags = rtnl.IFF_TAP | rtnl.IFF_NO_PI | rtnl.IFF_TUN_EXCL
        if vnet_hdr:
            flags |= rtnl.IFF_VNET_HDR
        if multi_queue:
            flags |= rtnl.IFF_MULTI_QUEUE
        for attempt in (1, 2):
            try:
                self._d.add_tap(
                    name,
                    flags,
                    uid,
                    up=True if up else None,
                    mtu=want_mtu,
                    mac=raw_mac,
                    master=master,
                    alias=alias,
                )
                log.debug("tap created", tap=name, vm_id=vm_id, bridge=bridge, backend=self.backend)
                break
            except OSError as exc:
                if exc.filename == "TUNSETIFF" and exc.errno in (_errno.EBUSY, _errno.EEXIST, _errno.EINVAL):
                    existing = self.get_link(name)
                    if existing is None:
                        if attempt == 1:
                            continue
                        raise map_oserror(exc, "create TAP", name) from None
                    self._check_reusable(existing, vm_id, bridge)
                    assert existing.tun is not None
                    if existing.tun.multi_queue != multi_queue or existing.tun.owner != (
                        None if uid < 0 else uid
                    ):
                        # Ours, but created with other settings: recreate rather than hand CH a mismatch.
                        log.info("recreating own tap with new settings", tap=name, vm_id=vm_id)
                        self._delete_index(existing.index, name)
                        continue
                    log.debug("re-using own tap", tap=name, vm_id=vm_id)
                    try:
                        self._d.set_link(
                            existing.index, up=bool(up), mtu=want_mtu, mac=raw_mac, master=max(master, 0)
                        )
                    except OSError as exc2:
                        raise self._tap_setlink_error(exc2, name, bridge) from None
                    break
                if exc.filename == "RTM_SETLINK":
                    raise self._tap_setlink_error(exc, name, bridge) from None
                raise map_oserror(exc, "create TAP", name) from None
        link = self.get_link(name)
        if link is None:
            raise NetError(f"TAP {name!r} vanished right after creation", device=name)
        return link

    def _check_reusable(self, existing: Link, vm_id: str, bridge: str | None) -> None:
        if existing.vm_id == vm_id:  # implies a TAP: see Link.vm_id
            return
        owner = (
            f"nkudo VM {existing.vm_id!r}"
            if existing.vm_id
            else ("alias " + repr(existing.alias) if existing.alias else "no nkudo owner marker")
        )
        raise NetNameTaken(
            f"cannot create TAP {existing.name!r} for VM {vm_id!r}: the name is taken by a "
            f"{existing.kind or 'plain'} device with {owner}; nkudo never adopts foreign devices",
            device=existing.name,
        )

    def _tap_setlink_error(self, exc: OSError, name: str, bridge: str | None) -> NetError:
        if exc.errno == _errno.ENODEV and bridge is not None and self.get_link(bridge) is None:
            return NetBridgeMissing(
                f"cannot attach TAP {name!r}: bridge {bridge!r} disappeared", device=name, errno=exc.errno
            )
        return map_oserror(exc, "configure TAP", name)

    def _owned(self, name: str, vm_id: str | None = None) -> Link:
        validate_name(name, "TAP")
        link = self._require(name)
        if link.vm_id is None or (vm_id is not None and link.vm_id != vm_id):
            raise NetNotOwned(
                f"refusing to modify {name!r}: it does not carry the nkudo owner marker"
                + (f" of VM {vm_id!r}" if vm_id else ""),
                device=name,
            )
        return link

    def _set(self, link: Link, action: str, **changes: object) -> None:
        try:
            self._d.set_link(link.index, **changes)  # type: ignore[arg-type]
        except OSError as exc:
            raise map_oserror(exc, action, link.name) from None

    def attach(self, name: str, bridge: str) -> None:
        """Enslave our TAP ``name`` to ``bridge``."""
        link = self._owned(name)
        br = self._bridge(bridge)
        try:
            self._d.set_link(link.index, master=br.index)
        except OSError as exc:
            raise self._tap_setlink_error(exc, name, bridge) from None

    def detach(self, name: str) -> None:
        self._set(self._owned(name), "detach", master=0)

    def set_mtu(self, name: str, mtu: int) -> None:
        self._set(self._owned(name), "set the MTU of", mtu=_check_mtu(mtu, name))

    def set_mac(self, name: str, mac: str) -> None:
        self._set(self._owned(name), "set the MAC of", mac=parse_mac(mac, name))

    def set_up(self, name: str, up: bool = True) -> None:
        self._set(self._owned(name), "bring up" if up else "bring down", up=up)

    def _delete_index(self, index: int, name: str) -> bool:
        try:
            self._d.del_link(index)
        except OSError as exc:
            if exc.errno == _errno.ENODEV:
                return False
            raise map_oserror(exc, "delete", name) from None
        return True

    def delete_tap(self, name: str, *, vm_id: str | None = None) -> bool:
        """Delete our TAP; absent is a no-op (False). Refuses devices without our marker (of ``vm_id``)."""
        validate_name(name, "TAP")
        link = self.get_link(name)
        if link is None:
            log.debug("tap already absent", tap=name)
            return False
        self._check_deletable(link, vm_id)
        deleted = self._delete_index(link.index, name)
        if deleted:
            log.debug("tap deleted", tap=name, vm_id=link.vm_id, backend=self.backend)
        else:
            log.debug("tap already absent", tap=name)
        return deleted

    def _check_deletable(self, link: Link, vm_id: str | None) -> None:
        if link.vm_id is None or (vm_id is not None and link.vm_id != vm_id):
            raise NetNotOwned(
                f"refusing to delete {link.name!r}: it does not carry the nkudo owner marker"
                + (f" of VM {vm_id!r}" if vm_id else "")
                + (f" (alias {link.alias!r})" if link.alias else ""),
                device=link.name,
            )

    def delete_taps(self, names: Iterable[str], *, vm_id: str | None = None) -> list[str]:
        """Delete several of our TAPs in one kernel batch; returns the names deleted.

        Why: each RTM_DELLINK waits for an RCU grace period (~20 ms). The TAPs are
        first moved into a fresh random link group, then one RTM_DELLINK by group
        unregisters them together, paying that wait once. Ownership is checked
        for every name before anything changes.
        """
        links: list[Link] = []
        for name in names:
            validate_name(name, "TAP")
            link = self.get_link(name)
            if link is None:
                log.debug("tap already absent", tap=name)
                continue
            self._check_deletable(link, vm_id)
            links.append(link)
        if len(links) <= 1:
            return [lk.name for lk in links if self._delete_index(lk.index, lk.name)]
        group = 0x40000000 | int.from_bytes(os.urandom(4), "little") & 0x3FFFFFFF
        moved: list[Link] = []
        for lk in links:
            try:
                self._d.set_link(lk.index, group=group)
                moved.append(lk)
            except OSError as exc:
                if exc.errno != _errno.ENODEV:
                    raise map_oserror(exc, "delete", lk.name) from None
        try:
            self._d.del_link(0, group=group)
        except OSError as exc:
            if exc.errno != _errno.ENODEV:
                raise map_oserror(exc, "delete", ", ".join(lk.name for lk in moved)) from None
        log.debug("taps deleted", taps=[lk.name for lk in moved], backend=self.backend)
        return [lk.name for lk in moved]


def open_backend(kind: str = "auto") -> HostNet:
    """Open a :class:`HostNet` in the calling thread's network namespace.

    ``auto`` is the native module when it is loaded (``NKUDO_NATIVE=0`` forces
    the twin); ``native`` insists on it; ``twin`` is the pure-Python raw-socket
    implementation; ``pyroute2`` is the reference implementation.
    """
    if kind == "auto":
        kind = "native" if _native.load("netlink") is not None else "twin"
    driver: Driver
    try:
        if kind in ("native", "twin"):
            try:
                b = _native.binding("netlink", kind == "native")
            except _native.NativeUnavailable as exc:
                raise NetError(
                    f"native netlink module unavailable: {exc.reason}", code="NET_BACKEND_UNAVAILABLE"
                ) from None
            driver = b.module.NetlinkSocket()
        elif kind == "pyroute2":
            from nkudo.net._pyroute2 import Pyroute2Driver

            driver = Pyroute2Driver()
        else:
            raise NetInvalidArgument(f"network backend {kind!r} is not one of {', '.join(BACKENDS)}, auto")
    except OSError as exc:
        raise map_oserror(exc, "open a netlink socket for", kind) from None
    return HostNet(driver, kind)
