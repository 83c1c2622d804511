"""Errors of the host network layer: one stable ``code`` per failure an operator can act on.

Every backend (native, its Python twin, pyroute2) raises these and only these,
so callers and tests match on ``code`` without knowing which backend ran.
Messages always name the device (and the bridge, when one is involved).
"""

from __future__ import annotations

from nkudo.errors import HostError, ValidationError


class NetError(HostError):
    """A network operation failed; ``device`` names the link, ``errno`` the kernel's reason."""

    code = "NET_ERROR"

    def __init__(
        self,
        message: str,
        *,
        device: str | None = None,
        errno: int | None = None,
        code: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, code=code, field=field)
        self.device = device
        self.errno = errno


class NetInvalidName(NetError, ValidationError):
    """An interface name the kernel would reject (empty, > 15 bytes, '/', ':', whitespace)."""

    code = "NET_INVALID_NAME"


class NetInvalidArgument(NetError, ValidationError):
    """A bad MTU, MAC address, uid, NIC index or VM id; nothing was changed."""

    code = "NET_INVALID_ARGUMENT"


class NetBridgeMissing(NetError):
    code = "NET_BRIDGE_MISSING"


class NetNotABridge(NetError):
    code = "NET_NOT_A_BRIDGE"


class NetNameTaken(NetError):
    """The name belongs to a device nkudo does not own (or owns for another VM)."""

    code = "NET_NAME_TAKEN"


class NetNotOwned(NetError):
    """Refused to modify or delete a device that lacks nkudo's owner marker."""

    code = "NET_NOT_OWNED"


class NetNotFound(NetError):
    code = "NET_NOT_FOUND"


class NetPermissionDenied(NetError):
    """CAP_NET_ADMIN is missing in the network namespace that owns the device."""

    code = "NET_PERMISSION_DENIED"
