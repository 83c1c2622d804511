"""What a supervised process's end and the host's pidfd support look like (values, no control).

Why a module of its own: :mod:`nkudo.proc.process` (one handle) and
:mod:`nkudo.proc.supervisor` (many) both report these, and they are plain
values that need none of the process-control machinery.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from nkudo.log import get_logger
from nkudo.proc import pidfd_sys

log = get_logger("proc")

FALLBACK_POLL_INTERVAL = 0.1
"""Seconds between liveness checks when no pidfd is available."""


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended.

    ``kind`` is ``"exited"`` (``code`` set), ``"killed"`` (``signal`` set,
    ``core_dumped``) or ``"unknown"`` (not our child: the status went to its
    real parent; ``reason`` says so).
    """

    kind: Literal["exited", "killed", "unknown"]
    code: int | None = None
    signal: int | None = None
    core_dumped: bool = False
    reason: str = ""

    @property
    def known(self) -> bool:
        return self.kind != "unknown"

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "code": self.code,
            "signal": self.signal,
            "core_dumped": self.core_dumped,
            "reason": self.reason,
        }

    def __str__(self) -> str:
        if self.kind == "exited":
            return f"exited with code {self.code}"
        if self.kind == "killed":
            name = signal_name(self.signal or 0)
            return f"killed by {name}" + (" (core dumped)" if self.core_dumped else "")
        return f"exited, status unknown ({self.reason})"

    @classmethod
    def from_wait(cls, res: pidfd_sys.WaitResult) -> ExitStatus:
        if res.code == pidfd_sys.CLD_EXITED:
            return cls("exited", code=res.status)
        return cls("killed", signal=res.status, core_dumped=res.code == pidfd_sys.CLD_DUMPED)

    @classmethod
    def from_waitstatus(cls, status: int) -> ExitStatus:
        if os.WIFEXITED(status):
            return cls("exited", code=os.WEXITSTATUS(status))
        return cls("killed", signal=os.WTERMSIG(status), core_dumped=os.WCOREDUMP(status))


UNKNOWN_NOT_CHILD = "not our child; its parent collected the status"
REAPED_ELSEWHERE = "our child, but reaped by other code in this process"


@dataclass(frozen=True)
class StopResult:
    """Outcome of a graceful stop: ``escalated`` is True when SIGKILL was needed."""

    status: ExitStatus
    escalated: bool
    signals: tuple[int, ...]
    elapsed: float


@dataclass(frozen=True)
class PidfdSupport:
    available: bool
    reason: str


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


@lru_cache(maxsize=1)
def pidfd_support() -> PidfdSupport:
    """Probe once whether pidfd_open and waitid(P_PIDFD) work here (and log the fallback if not).

    ``NKUDO_PIDFD=0`` forces the fallback, for hosts whose seccomp profile
    kills rather than refuses unknown syscalls, and for testing the fallback.
    """
    if os.environ.get("NKUDO_PIDFD", "1").strip().lower() in {"0", "false", "no", "off"}:
        support = PidfdSupport(False, "disabled by NKUDO_PIDFD=0")
    else:
        try:
            fd = os.pidfd_open(os.getpid())
        except (OSError, AttributeError) as exc:
            support = PidfdSupport(False, f"pidfd_open unavailable ({exc}); needs Linux >= 5.3")
        else:
            try:
                os.waitid(pidfd_sys.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
                support = PidfdSupport(True, "pidfd")
            except ChildProcessError:
                support = PidfdSupport(True, "pidfd")
            except OSError as exc:
                support = PidfdSupport(False, f"waitid(P_PIDFD) unavailable ({exc}); needs Linux >= 5.4")
            finally:
                os.close(fd)
    if not support.available:
        log.warn(
            "pidfd unavailable: falling back to pid-based process control",
            reason=support.reason,
            consequence=f"signals are sent by pid after an identity check (small pid-reuse race); "
            f"exits are detected by polling every {FALLBACK_POLL_INTERVAL}s",
        )
    return support
