"""Adapter from the VM handlers' :class:`NetworkPort` to the host network layer (:mod:`nkudo.net.hostnet`)."""

from __future__ import annotations

import os

from nkudo.agent.provider import NicPlan
from nkudo.net.hostnet import HostNet, open_backend


class HostNetwork:
    """TAPs for VMs: deterministic names, owner marker, attached to their bridge and up."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend
        self._net: HostNet | None = None

    @property
    def net(self) -> HostNet:
        # Opened lazily in the calling thread (the socket binds to that thread's network namespace).
        if self._net is None:
            self._net = open_backend(self.backend)
        return self._net

    def close(self) -> None:
        if self._net is not None:
            self._net.close()
            self._net = None

    def ensure_bridge(self, name: str, *, create: bool = False) -> None:
        self.net.ensure_bridge(name, create=create)

    def ensure_taps(self, vm_id: str, nics: list[tuple[str, str]]) -> list[NicPlan]:
        out = []
        for i, (bridge, mac) in enumerate(nics):
            # Owned by our uid (the VMM runs as the agent's user): an unowned persistent TAP could be
            # attached by any local user while no VMM holds it.
            link = self.net.create_tap(vm_id, i, bridge=bridge, owner_uid=os.geteuid())
            out.append(NicPlan(tap=link.name, mac=mac, bridge=bridge))
        return out

    def remove_taps(self, vm_id: str) -> list[str]:
        names = [lk.name for lk in self.net.list_owned_taps(vm_id)]
        return self.net.delete_taps(names, vm_id=vm_id) if names else []

    def owned_taps(self) -> dict[str, str]:
        return {lk.name: lk.vm_id for lk in self.net.list_owned_taps() if lk.vm_id is not None}
