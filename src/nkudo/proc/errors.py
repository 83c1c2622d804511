"""Errors of process control, each with a stable code the agent and operators match on.

Why separate classes rather than one code field: callers handle the cases
differently (a refused adoption means "treat the VM as lost", a gone process
means "it already exited", a spawn failure means "the VM never started").
"""

from __future__ import annotations

from nkudo.errors import HostError


class ProcessError(HostError):
    """A process-control operation failed."""

    code = "PROCESS_ERROR"


class SpawnError(ProcessError):
    """The child could not be started; ``errno`` and ``stage`` say why and where.

    ``stage`` is one of ``"prepare"`` (in the agent: opening the log file,
    resolving the executable, clone/posix_spawn), ``"signals"``, ``"setsid"``,
    ``"stdio"`` or ``"exec"`` (in the child, before the new program ran).
    """

    code = "SPAWN_FAILED"

    def __init__(self, message: str, *, errno: int, stage: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.stage = stage


class AdoptionRefused(ProcessError):
    """The pid does not belong to the recorded process (exited, reused or foreign).

    ``reason`` is one of ``"gone"``, ``"boot"``, ``"start_time"``, ``"exe"``, ``"marker"``.
    """

    code = "ADOPT_REFUSED"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ProcessGone(ProcessError):
    """The process has already exited, so it can no longer be signalled."""

    code = "PROCESS_GONE"


class StopTimeout(ProcessError):
    """The process outlived SIGKILL plus its grace period (stuck in the kernel, D state)."""

    code = "STOP_TIMEOUT"
    is_timeout = True
