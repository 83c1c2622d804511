"""The one VM status vocabulary used by the store, the executor, heartbeats and metrics.

The Go original mixed ``running``/``RUNNING``/``Running`` and its metrics were
always zero; every layer here imports this enum instead of spelling strings.
"""

from __future__ import annotations

import enum


class VmStatus(enum.StrEnum):
    CREATING = "CREATING"  # runtime dir / VMM being set up
    CREATED = "CREATED"  # VMM has the config, guest not booted (create with start=false)
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    STOPPED = "STOPPED"  # shut down on purpose; VMM gone, resources kept
    CRASHED = "CRASHED"  # VMM exited without being asked to
    # A live process carries this VM's marker (its API socket path) but is not provably the recorded
    # VMM (e.g. recorded before a launcher exec'd it): never forgotten, ended only by stop/delete.
    UNKNOWN = "UNKNOWN"
    ERROR = "ERROR"
    DELETED = "DELETED"

    def __str__(self) -> str:
        return self.value

    @property
    def has_vmm(self) -> bool:
        """Whether a live VMM process is expected for this status."""
        return self in (VmStatus.CREATED, VmStatus.RUNNING, VmStatus.PAUSED)
