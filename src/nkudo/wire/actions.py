"""Parameter schemas of every plan action, shared with the agent's executor.

Why strict: an action reaches a customer host and drives Cloud Hypervisor and
the shell. Identifiers follow one pattern, numbers are bounded, paths are
absolute without ``..``, and unknown fields are refused — a typo in a plan is a
400 at the API instead of a silently ignored option on the host.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from nkudo.wire.codec import WireError, convert

#: VM ids, names and snapshot names: 1-64 chars, start alphanumeric, then ``[A-Za-z0-9_.-]``.
IDENT_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: Linux interface names (bridges): at most 15 chars.
IFNAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$"
#: Unicast, locally or globally administered MAC in lower/upper hex with colons.
MAC_PATTERN: Final = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
#: Absolute path without ``..`` components or NUL bytes.
PATH_PATTERN: Final = r"^/(?!.*(^|/)\.\.(/|$))[^\x00]{0,4095}$"

Ident = Annotated[str, msgspec.Meta(pattern=IDENT_PATTERN)]
IfName = Annotated[str, msgspec.Meta(pattern=IFNAME_PATTERN)]
Mac = Annotated[str, msgspec.Meta(pattern=MAC_PATTERN)]
AbsPath = Annotated[str, msgspec.Meta(pattern=PATH_PATTERN, max_length=4096)]
Vcpus = Annotated[int, msgspec.Meta(ge=1, le=256)]
MemoryMiB = Annotated[int, msgspec.Meta(ge=64, le=4 * 1024 * 1024)]
DiskGiB = Annotated[int, msgspec.Meta(ge=1, le=65536)]
Cmdline = Annotated[str, msgspec.Meta(max_length=4096)]
CloudInitDoc = Annotated[str, msgspec.Meta(max_length=64 * 1024)]
Timeout = Annotated[int, msgspec.Meta(ge=1, le=86400)]
Arg = Annotated[str, msgspec.Meta(max_length=4096)]
Command = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class Nic(_Strict):
    bridge: IfName
    mac: Mac | None = None


class Disk(_Strict):
    path: AbsPath
    readonly: bool = False


class CloudInit(_Strict):
    user_data: CloudInitDoc
    meta_data: CloudInitDoc
    network_config: CloudInitDoc | None = None


class MicroVMCreate(_Strict):
    vm_id: Ident
    name: Ident
    vcpus: Vcpus
    memory_mib: MemoryMiB
    nics: Annotated[list[Nic], msgspec.Meta(max_length=16)]
    kernel_path: AbsPath | None = None
    firmware_path: AbsPath | None = None
    initramfs_path: AbsPath | None = None
    cmdline: Cmdline | None = None
    image_path: AbsPath | None = None
    disk_size_gib: DiskGiB | None = None
    disks: Annotated[list[Disk], msgspec.Meta(max_length=16)] | None = None
    cloud_init: CloudInit | None = None
    start: bool = True

    def __post_init__(self) -> None:
        if (self.kernel_path is None) == (self.firmware_path is None):
            raise ValueError("exactly one of kernel_path and firmware_path is required")
        if self.initramfs_path is not None and self.kernel_path is None:
            raise ValueError("initramfs_path requires kernel_path")
        if self.disk_size_gib is not None and self.image_path is None:
            raise ValueError("disk_size_gib requires image_path")


class MicroVMStart(_Strict):
    vm_id: Ident


class MicroVMStop(_Strict):
    vm_id: Ident
    force: bool = False


class MicroVMDelete(_Strict):
    vm_id: Ident


class MicroVMPause(_Strict):
    vm_id: Ident


class MicroVMResume(_Strict):
    vm_id: Ident


class MicroVMSnapshot(_Strict):
    vm_id: Ident
    snapshot_name: Ident


class CommandExecute(_Strict):
    command: Command
    args: Annotated[list[Arg], msgspec.Meta(max_length=256)] = msgspec.field(default_factory=list)
    timeout: Timeout = 60
    dir: AbsPath = "/"


ActionParams = (
    MicroVMCreate
    | MicroVMStart
    | MicroVMStop
    | MicroVMDelete
    | MicroVMPause
    | MicroVMResume
    | MicroVMSnapshot
    | CommandExecute
)

ACTION_TYPES: Final[dict[str, type[ActionParams]]] = {
    "MicroVMCreate": MicroVMCreate,
    "MicroVMStart": MicroVMStart,
    "MicroVMStop": MicroVMStop,
    "MicroVMDelete": MicroVMDelete,
    "MicroVMPause": MicroVMPause,
    "MicroVMResume": MicroVMResume,
    "MicroVMSnapshot": MicroVMSnapshot,
    "CommandExecute": CommandExecute,
}

#: Default per-action timeout (seconds) the agent applies when the plan gives none.
DEFAULT_TIMEOUTS: Final[dict[str, int]] = {
    "MicroVMCreate": 300,
    "MicroVMSnapshot": 600,
}
DEFAULT_TIMEOUT: Final = 120


def parse_params(action_type: str, params: Any, *, prefix: str = "params") -> ActionParams:
    """Validate ``params`` for ``action_type``; raise ``WireError`` naming the bad field."""
    cls = ACTION_TYPES.get(action_type)
    if cls is None:
        raise WireError(
            f"unknown action type {action_type!r} (one of {', '.join(ACTION_TYPES)})",
            field=prefix.rsplit(".", 1)[0] + ".type" if "." in prefix else "type",
        )
    if not isinstance(params, dict):
        raise WireError("params must be an object", field=prefix)
    return convert(params, cls, prefix=prefix)


def vm_id_of(params: ActionParams) -> str | None:
    """The VM an action touches (``None`` for host commands)."""
    return getattr(params, "vm_id", None)
