"""What a snapshot directory holds besides the hypervisor's own files, and how it is read back.

Why a record of our own next to the hypervisor's files: a snapshot outlives its VM (MicroVMRestore
brings back a deleted VM, or clones it under a new id), so the directory must say by itself which
VM it belongs to, under which provider it was taken, the VM's specification and its MACs. A
directory without a readable record was not written by this host's agent and is never restored.
The root disk is copied in (reflink or sparse) while the VM is paused for the snapshot: the guest's
memory refers to the disk as it was then, and a restore starts from that copy, never from the
image the VM was once cloned from.
"""

from __future__ import annotations

import os
from typing import Any, Final

import msgspec

#: The agent's record in a snapshot directory (hidden: not listed among the snapshot's files).
META_FILE: Final = ".nkudo-vm.json"
#: The copy of the VM's root disk taken with the snapshot.
ROOTFS_FILE: Final = "rootfs.img"


class SnapshotMeta(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Who the snapshot belongs to and what it needs to be restored."""

    vm_id: str
    name: str
    provider: str
    #: The VM's ``MicroVMCreate`` params (without ``start``), as in its state-store record.
    spec: dict[str, Any]
    #: The MAC of each NIC, in the order of ``spec["nics"]``.
    macs: list[str]


def encode_meta(meta: SnapshotMeta) -> bytes:
    return msgspec.json.encode(meta)


def read_meta(snapshot_dir: str) -> SnapshotMeta | None:
    """The record of ``snapshot_dir``, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(snapshot_dir, META_FILE), "rb") as f:
            return msgspec.json.decode(f.read(), type=SnapshotMeta)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
