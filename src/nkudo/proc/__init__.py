"""Process control for VMMs through pidfds: spawn detached, adopt after restart, signal, wait, stop.

Public API (see the submodules for why each piece is shaped as it is):

- :func:`spawn` starts a child in its own session with explicit argv/env and a log file;
- :func:`adopt` re-attaches to a recorded :class:`ProcessIdentity` after an agent restart;
- :class:`ProcessHandle` signals, waits (blocking or asyncio) and stops gracefully;
- :class:`Supervisor` watches many processes from one selector thread.
"""

from __future__ import annotations

from nkudo.proc.errors import AdoptionRefused, ProcessError, ProcessGone, SpawnError, StopTimeout
from nkudo.proc.identity import ProcessIdentity, boot_id, check_identity
from nkudo.proc.process import ProcessHandle, adopt, identify, spawn
from nkudo.proc.status import FALLBACK_POLL_INTERVAL, ExitStatus, PidfdSupport, StopResult, pidfd_support
from nkudo.proc.supervisor import Supervisor

__all__ = [
    "FALLBACK_POLL_INTERVAL",
    "AdoptionRefused",
    "ExitStatus",
    "PidfdSupport",
    "ProcessError",
    "ProcessGone",
    "ProcessHandle",
    "ProcessIdentity",
    "SpawnError",
    "StopResult",
    "StopTimeout",
    "Supervisor",
    "adopt",
    "boot_id",
    "check_identity",
    "identify",
    "pidfd_support",
    "spawn",
]
