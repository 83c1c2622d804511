"""Parameter schemas of every plan action, shared with the agent's executor.

Why strict: an action reaches a customer host and drives Cloud Hypervisor and
the shell. Identifiers follow one pattern, numbers are bounded, paths are
absolute without ``..``, and unknown fields are refused — a typo in a plan is a
400 at the API instead of a silently ignored option on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Final

import msgspec

from nkudo.wire.codec import WireError, convert, described
from nkudo.wire.vocab import ActionType

# Every pattern ends in ``\Z``, never ``$``: msgspec applies patterns with ``re.search``, and ``$`` also
# matches just before a trailing newline, so ``"vm\n"`` would pass and name a VM no one can address again
# (issue 10 item 2). The OpenAPI document states the same patterns with ECMA's ``$``, which has no such hole.

#: VM ids, names and snapshot names: 1-64 chars, start alphanumeric, then ``[A-Za-z0-9_.-]``.
IDENT_PATTERN: Final = described(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z",
    "expected 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
)
#: Action ids and plan ids on the agent (execution ids are UUIDs, plan labels may carry ``:``).
ACTION_ID_PATTERN: Final = described(
    r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z",
    "expected 1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
)
#: Linux interface names (bridges): at most 15 chars.
IFNAME_PATTERN: Final = described(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z",
    "expected an interface name: 1-15 letters, digits, '_', '.' or '-', starting with a letter or digit",
)
#: A unicast, non-zero MAC (the kernel refuses multicast, broadcast and all-zero addresses on a TAP, so
#: the agent would fail late): hex pairs with colons, the first octet's low bit clear.
MAC_PATTERN: Final = described(
    r"^(?!00:00:00:00:00:00\Z)[0-9A-Fa-f][02468ACEace](?::[0-9A-Fa-f]{2}){5}\Z",
    "expected a unicast, non-zero MAC address as six hex pairs with colons (first octet even)",
)
#: Absolute path without ``..`` components, control characters (NUL, newline...) or lone surrogates.
PATH_PATTERN: Final = described(
    r"^/(?!.*(?:^|/)\.\.(?:/|\Z))[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{0,4095}\Z",
    "expected an absolute path without '..' components or control characters",
)
#: A command-line argument: anything but NUL, which ``execve`` cannot pass, and lone surrogates, which have
#: no UTF-8 encoding (newlines and other control characters are legitimate in an argument).
ARG_PATTERN: Final = described(
    r"^[^\x00\ud800-\udfff]*\Z",
    "expected text without NUL characters or lone surrogates",
)

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
Arg = Annotated[str, msgspec.Meta(pattern=ARG_PATTERN, max_length=4096)]
#: The executable of ``CommandExecute``: absolute (the agent runs no shell and searches no ``PATH``).
Command = AbsPath


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


class MicroVMRestore(_Strict):
    """Restore ``snapshot_name`` of ``source_vm_id`` (default: ``vm_id`` itself) as VM ``vm_id``.

    Why ``source_vm_id``: with it the snapshot becomes a clone under a new id (own TAPs, MACs and
    runtime directory); without it the VM comes back as itself after a delete or a crash.
    """

    vm_id: Ident
    snapshot_name: Ident
    source_vm_id: Ident | None = None
    start: bool = True


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
    | MicroVMRestore
    | CommandExecute
)

#: Keyed by ``ActionType`` (a ``str``), so a type decoded as text looks up the same entry.
ACTION_TYPES: Final[dict[str, type[ActionParams]]] = {
    ActionType.MICROVM_CREATE: MicroVMCreate,
    ActionType.MICROVM_START: MicroVMStart,
    ActionType.MICROVM_STOP: MicroVMStop,
    ActionType.MICROVM_DELETE: MicroVMDelete,
    ActionType.MICROVM_PAUSE: MicroVMPause,
    ActionType.MICROVM_RESUME: MicroVMResume,
    ActionType.MICROVM_SNAPSHOT: MicroVMSnapshot,
    ActionType.MICROVM_RESTORE: MicroVMRestore,
    ActionType.COMMAND_EXECUTE: CommandExecute,
}

#: Default per-action timeout (seconds) the agent applies when the plan gives none.
DEFAULT_TIMEOUTS: Final[dict[str, int]] = {
    ActionType.MICROVM_CREATE: 300,
    ActionType.MICROVM_SNAPSHOT: 600,
    ActionType.MICROVM_RESTORE: 600,
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
    parsed = convert(params, cls, prefix=prefix)
    check_params(parsed, prefix=prefix)
    return parsed


def check_params(params: ActionParams, *, prefix: str = "params") -> None:
    """Rules that span several fields of one action (a schema pattern sees one field at a time).

    Why here and not in the agent: the control plane calls this through ``parse_params`` at plan submit,
    so a plan the agent would refuse is a 400 naming the field, not a failure on a host later.
    """
    if isinstance(params, MicroVMCreate):
        first: dict[str, int] = {}
        for i, nic in enumerate(params.nics):
            if nic.mac is None:
                continue
            mac = nic.mac.lower()
            if mac in first:
                raise WireError(
                    f"{prefix}.nics[{i}].mac {nic.mac} is already the MAC of nics[{first[mac]}]; "
                    "each NIC of a VM needs its own MAC",
                    field=f"{prefix}.nics[{i}].mac",
                )
            first[mac] = i


def check_action_ids(action_ids: Sequence[str], *, prefix: str = "actions") -> None:
    """Action ids are unique within a plan: results and logs are keyed by them on both sides."""
    seen: set[str] = set()
    for i, action_id in enumerate(action_ids):
        if action_id in seen:
            raise WireError(f"duplicate action_id {action_id!r}", field=f"{prefix}[{i}].action_id")
        seen.add(action_id)


def vm_id_of(params: ActionParams) -> str | None:
    """The VM an action touches (``None`` for host commands)."""
    return getattr(params, "vm_id", None)
