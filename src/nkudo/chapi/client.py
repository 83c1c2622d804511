"""Typed client for the Cloud Hypervisor REST API (one connection per request).

Why per-call timeouts: the VMM's HTTP thread blocks while the VMM thread
works, so a ``vm.snapshot`` of a big guest stalls every other call, ping
included. Each call therefore gets a budget sized to the operation
(:class:`Timeouts`); a ping timing out during a snapshot is a
``ChTimeoutError``, not proof that the VMM died.

Why ``wait_ready``: the socket appears some time after the process starts
(CH binds it before the VMM is fully up, and a CLI-configured VM boots
concurrently). Polling ``vmm.ping`` with short sleeps until a deadline is what
Kata (10 ms) and CH's own integration tests (50 ms) do.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nkudo.chapi import codec
from nkudo.chapi import transport as _tp
from nkudo.chapi.errors import (
    ChApiError,
    ChProtocolError,
    ChTimeoutError,
    ChTransportError,
    status_error,
)

#: VmState values reported by ``vm.info``.
VM_STATES = ("Created", "Running", "Shutdown", "Paused", "BreakPoint")


@dataclass(frozen=True)
class Timeouts:
    """Seconds allowed per call. Defaults follow Kata (1 s API calls, 5 s hotplug) and
    leave room for the slow, server-blocking operations."""

    ping: float = 1.0
    default: float = 5.0
    hotplug: float = 5.0
    create: float = 5.0
    boot: float = 60.0
    shutdown: float = 10.0
    reboot: float = 60.0
    snapshot: float = 600.0
    restore: float = 600.0
    vmm_shutdown: float = 10.0


@dataclass(frozen=True)
class PingInfo:
    version: str
    build_version: str | None = None
    pid: int | None = None
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class VmInfo:
    state: str
    config: dict[str, Any]
    memory_actual_size: int | None = None
    device_tree: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PciDeviceInfo:
    id: str
    bdf: str


class ChClient:
    """Client for one VMM's API socket.

    ``transport``: ``"native"`` (Cython), ``"python"`` (socket module) or None
    (native unless ``NKUDO_NATIVE=0`` or the extension is missing). Both give the
    same results and exceptions.
    """

    def __init__(self, socket_path: str | os.PathLike[str], *, transport: str | None = None,
                 timeouts: Timeouts | None = None) -> None:
        self.socket_path = os.fspath(socket_path)
        self._bpath = os.fsencode(self.socket_path)
        self.transport_name, self._roundtrip = _tp.resolve(transport)
        self.timeouts = timeouts or Timeouts()

    # -- generic --------------------------------------------------------------------------

    def request(self, method: str, endpoint: str, body: bytes | None = None, *,
                fds: Sequence[int] = (), timeout: float | None = None) -> codec.Response:
        """Send one request and return the raw response, whatever its status."""
        data = codec.build_request(method, endpoint, body)
        return _tp.exchange(self._roundtrip, self.socket_path, endpoint, data, fds,
                            timeout if timeout is not None else self.timeouts.default, self._bpath)

    def call(self, method: str, endpoint: str, payload: Mapping[str, Any] | None = None, *,
             fds: Sequence[int] = (), timeout: float | None = None) -> codec.Response:
        """Like :meth:`request`, JSON-encoding ``payload``; non-2xx raises a typed error."""
        body = None if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        resp = self.request(method, endpoint, body, fds=fds, timeout=timeout)
        if not resp.ok:
            raise status_error(endpoint, resp.status, resp.messages())
        return resp

    def _json(self, resp: codec.Response, endpoint: str) -> dict[str, Any]:
        value = resp.json()
        if not isinstance(value, dict):
            raise ChProtocolError(f"{endpoint}: expected a JSON object, got {type(value).__name__}",
                                  endpoint=endpoint, status=resp.status)
        return value

    # -- vmm.* ----------------------------------------------------------------------------

    def ping(self, *, timeout: float | None = None) -> PingInfo:
        resp = self.call("GET", "vmm.ping", timeout=timeout or self.timeouts.ping)
        d = self._json(resp, "vmm.ping")
        version = d.get("version")
        if not isinstance(version, str):
            raise ChProtocolError("vmm.ping: response lacks 'version'", endpoint="vmm.ping")
        pid = d.get("pid")
        return PingInfo(version=version, build_version=d.get("build_version"),
                        pid=pid if isinstance(pid, int) else None,
                        features=tuple(str(f) for f in d.get("features") or ()))

    def shutdown_vmm(self, *, timeout: float | None = None) -> None:
        """``vmm.shutdown``: the VMM deletes the VM, answers, removes its socket and exits."""
        self.call("PUT", "vmm.shutdown", timeout=timeout or self.timeouts.vmm_shutdown)

    # -- vm.* lifecycle -------------------------------------------------------------------

    def create(self, config: Mapping[str, Any], *, timeout: float | None = None) -> None:
        """``vm.create``: store the config (real validation only happens at boot)."""
        self.call("PUT", "vm.create", config, timeout=timeout or self.timeouts.create)

    def boot(self, *, timeout: float | None = None) -> None:
        self.call("PUT", "vm.boot", timeout=timeout or self.timeouts.boot)

    def info(self, *, timeout: float | None = None) -> VmInfo:
        d = self._json(self.call("GET", "vm.info", timeout=timeout), "vm.info")
        state = d.get("state")
        if state not in VM_STATES or not isinstance(d.get("config"), dict):
            raise ChProtocolError(f"vm.info: unexpected state {state!r} or missing config", endpoint="vm.info")
        mem = d.get("memory_actual_size")
        return VmInfo(state=str(state), config=d["config"], memory_actual_size=mem if isinstance(mem, int) else None,
                      device_tree=d.get("device_tree") or {})

    def counters(self, *, timeout: float | None = None) -> dict[str, dict[str, int]]:
        return self._json(self.call("GET", "vm.counters", timeout=timeout), "vm.counters")

    def pause(self, *, timeout: float | None = None) -> None:
        self.call("PUT", "vm.pause", timeout=timeout)

    def resume(self, *, timeout: float | None = None) -> None:
        self.call("PUT", "vm.resume", timeout=timeout)

    def shutdown(self, *, timeout: float | None = None) -> None:
        """``vm.shutdown``: drops the running VM but keeps the config (info then says Created)."""
        self.call("PUT", "vm.shutdown", timeout=timeout or self.timeouts.shutdown)

    def power_button(self, *, timeout: float | None = None) -> None:
        self.call("PUT", "vm.power-button", timeout=timeout)

    def reboot(self, *, timeout: float | None = None) -> None:
        self.call("PUT", "vm.reboot", timeout=timeout or self.timeouts.reboot)

    def delete(self, *, timeout: float | None = None) -> None:
        self.call("PUT", "vm.delete", timeout=timeout or self.timeouts.shutdown)

    # -- snapshot / restore ---------------------------------------------------------------

    def snapshot(self, destination: str | os.PathLike[str], *, timeout: float | None = None) -> None:
        """``vm.snapshot`` into an existing directory (path or ``file://`` URL); VM must be Paused."""
        self.call("PUT", "vm.snapshot", {"destination_url": _file_url(destination)},
                  timeout=timeout or self.timeouts.snapshot)

    def restore(self, source: str | os.PathLike[str], *, resume: bool = False, prefault: bool = False,
                memory_restore_mode: str = "Copy", net_fds: Mapping[str, Sequence[int]] | None = None,
                timeout: float | None = None) -> None:
        """``vm.restore`` into this (fresh) VMM; ``net_fds`` maps net ids to tap fds sent over SCM_RIGHTS."""
        payload: dict[str, Any] = {"source_url": _file_url(source), "prefault": prefault,
                                   "memory_restore_mode": memory_restore_mode, "resume": resume}
        fds: list[int] = []
        if net_fds:
            payload["net_fds"] = [{"id": k, "num_fds": len(v)} for k, v in net_fds.items()]
            for v in net_fds.values():
                fds.extend(v)
        self.call("PUT", "vm.restore", payload, fds=fds, timeout=timeout or self.timeouts.restore)

    # -- devices --------------------------------------------------------------------------

    def add_net(self, config: Mapping[str, Any], *, fds: Sequence[int] = (),
                timeout: float | None = None) -> PciDeviceInfo | None:
        """``vm.add-net``; ``fds`` (tap queue fds) travel as SCM_RIGHTS.

        Returns the PCI info when hot-plugged into a booted VM (200) and None when the
        VM is only created (204: the config was edited, the device appears at boot).
        """
        resp = self.call("PUT", "vm.add-net", config, fds=fds, timeout=timeout or self.timeouts.hotplug)
        if resp.status == 204 or not resp.body:
            return None
        d = self._json(resp, "vm.add-net")
        return PciDeviceInfo(id=str(d.get("id")), bdf=str(d.get("bdf")))

    def remove_device(self, device_id: str, *, timeout: float | None = None) -> None:
        self.call("PUT", "vm.remove-device", {"id": device_id}, timeout=timeout or self.timeouts.hotplug)


def _file_url(target: str | os.PathLike[str]) -> str:
    s = os.fspath(target)
    if s.startswith("file://"):
        return s
    if "://" in s:
        return s  # let the server reject other schemes, as CH does
    return "file://" + os.path.abspath(s)


def wait_ready(socket_path: str | os.PathLike[str], *, timeout: float = 10.0, interval: float = 0.01,
               ping_timeout: float = 1.0, pid: int | None = None, transport: str | None = None) -> PingInfo:
    """Poll ``vmm.ping`` until it answers or ``timeout`` passes.

    ``pid``: fail fast if that process has exited (``kill(pid, 0)``, as Kata does),
    instead of waiting out the deadline for a socket that will never appear.
    Raises ``ChTimeoutError`` carrying the last error seen.
    """
    client = ChClient(socket_path, transport=transport)
    deadline = time.monotonic() + timeout
    last: ChApiError | None = None
    while True:
        if pid is not None and not _alive(pid):
            raise ChTransportError(
                f"VMM process {pid} exited before {client.socket_path} became ready"
                + (f" (last error: {last.message})" if last else ""),
                endpoint="vmm.ping", socket_path=client.socket_path,
            )
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return client.ping(timeout=max(0.001, min(ping_timeout, left)))
        except (ChTransportError, ChProtocolError) as exc:
            last = exc
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(interval, left))
    raise ChTimeoutError(
        f"VMM API {client.socket_path} not ready after {timeout:g}s"
        + (f" (last error: {last.message})" if last else ""),
        endpoint="vmm.ping", socket_path=client.socket_path,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False
