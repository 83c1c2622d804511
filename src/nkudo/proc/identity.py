"""Who a process is, beyond its pid: the record the state store persists for adoption.

Why more than a pid: after an agent restart the recorded pid may belong to a
different process (the VMM exited and the number was reused). A process is
identified by (boot, pid, start time in clock ticks since boot) - two processes
of one boot never share pid and start time unless the pid is reused within one
clock tick (10 ms at USER_HZ=100). The executable and an optional command-line
marker (e.g. the VM's ``--api-socket`` path) guard against that residue and
make a mismatch easy to explain to an operator.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from nkudo.errors import ValidationError
from nkudo.proc import pidfd_sys
from nkudo.proc.errors import AdoptionRefused, ProcessError

_DELETED = " (deleted)"


@lru_cache(maxsize=1)
def boot_id() -> str:
    """This boot's random id: start times are only comparable within one boot."""
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f.read().strip()


@dataclass(frozen=True)
class ProcessIdentity:
    """Serialisable identity of one process (see module docstring for why each field)."""

    pid: int
    start_time: int
    exe: str
    boot_id: str
    marker: str | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "pid": self.pid,
            "start_time": self.start_time,
            "exe": self.exe,
            "boot_id": self.boot_id,
        }
        if self.marker is not None:
            out["marker"] = self.marker
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ProcessIdentity:
        """Validate a stored record; a corrupt state file must not lead to signalling a random pid."""
        if not isinstance(data, Mapping):
            raise ValidationError("process identity must be an object", field="identity")
        pid = data.get("pid")
        start = data.get("start_time")
        exe = data.get("exe")
        boot = data.get("boot_id")
        marker = data.get("marker")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
            raise ValidationError(f"pid must be an integer > 1 (got {pid!r})", field="pid")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValidationError(
                f"start_time must be a non-negative integer (got {start!r})", field="start_time"
            )
        if not isinstance(exe, str) or not exe.startswith("/"):
            raise ValidationError(f"exe must be an absolute path (got {exe!r})", field="exe")
        if not isinstance(boot, str) or not boot:
            raise ValidationError(f"boot_id must be a non-empty string (got {boot!r})", field="boot_id")
        if marker is not None and (not isinstance(marker, str) or not marker):
            raise ValidationError(
                f"marker must be a non-empty string or absent (got {marker!r})", field="marker"
            )
        return cls(pid=pid, start_time=start, exe=exe, boot_id=boot, marker=marker)

    @classmethod
    def from_json(cls, text: str | bytes) -> ProcessIdentity:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValidationError(f"process identity is not valid JSON: {exc}", field="identity")
        return cls.from_dict(data)


def _exe_of(pid: int) -> str | None:
    """``/proc/<pid>/exe`` target; None when the process has exited (or is a kernel thread)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise ProcessError(f"cannot inspect pid {pid}: {exc.strerror} (the agent needs root)")


def read_identity(pid: int, *, marker: str | None = None, native: bool | None = None) -> ProcessIdentity:
    """Identity of the live process ``pid`` now (``AdoptionRefused(gone)`` if there is none)."""
    try:
        start = pidfd_sys.proc_start_time(pid, native=native)
    except FileNotFoundError:
        raise AdoptionRefused(f"no process with pid {pid}", reason="gone")
    exe = _exe_of(pid)
    if exe is None:
        raise AdoptionRefused(f"pid {pid} has exited or has no executable", reason="gone")
    return ProcessIdentity(
        pid=pid, start_time=start, exe=exe.removesuffix(_DELETED), boot_id=boot_id(), marker=marker
    )


def check_identity(expected: ProcessIdentity, *, native: bool | None = None) -> None:
    """Raise :class:`AdoptionRefused` unless ``expected.pid`` is still the recorded process.

    An executable shown as ``<exe> (deleted)`` matches: the VMM binary may have
    been upgraded in place while the VM kept running.
    """
    pid = expected.pid
    if expected.boot_id != boot_id():
        raise AdoptionRefused(f"pid {pid} was recorded in another boot", reason="boot")
    try:
        start = pidfd_sys.proc_start_time(pid, native=native)
    except FileNotFoundError:
        raise AdoptionRefused(f"pid {pid} has exited", reason="gone")
    except OSError as exc:
        if exc.errno == _errno.ESRCH:
            raise AdoptionRefused(f"pid {pid} has exited", reason="gone")
        raise ProcessError(f"cannot read /proc/{pid}/stat: {exc.strerror}")
    if start != expected.start_time:
        raise AdoptionRefused(
            f"pid {pid} was reused: start time {start} ticks, recorded {expected.start_time}",
            reason="start_time",
        )
    exe = _exe_of(pid)
    if exe is None:
        raise AdoptionRefused(f"pid {pid} has exited", reason="gone")
    if exe != expected.exe and exe != expected.exe + _DELETED:
        raise AdoptionRefused(f"pid {pid} runs {exe}, recorded {expected.exe}", reason="exe")
    if expected.marker is not None:
        args = _cmdline(pid)
        if args is None:
            raise AdoptionRefused(f"pid {pid} has exited", reason="gone")
        want = os.fsencode(expected.marker)
        if not any(want in a for a in args):
            raise AdoptionRefused(
                f"pid {pid} command line lacks the recorded marker {expected.marker!r}", reason="marker"
            )


def _cmdline(pid: int, settle: float = 0.2) -> list[bytes] | None:
    """argv of ``pid``; None if it has exited.

    An empty command line also shows for a moment right after a spawn (the
    kernel lets the parent of a vfork run again before execve has set up the
    new argument pages), so it is re-read for up to ``settle`` seconds before
    being believed.
    """
    deadline = time.monotonic() + settle
    while True:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        if data or time.monotonic() >= deadline:
            return data.split(b"\0")
        time.sleep(0.001)


def identity_after_exec(recorded: ProcessIdentity, *, native: bool | None = None) -> ProcessIdentity:
    """The identity of ``recorded.pid`` now that its final program runs.

    Why: the identity taken right after spawn names whatever was exec'd first; when that is a
    launcher (``#!/bin/sh`` wrapper, ``env``, ``nice``, ``taskset``) which then execs the real
    VMM, the executable changes while pid and start time stay. A record kept with the launcher's
    executable would be refused at the next adoption, so the caller re-reads it once the VMM
    answers on its socket, and confirms through its pidfd afterwards that the process is still
    alive (so the pid read here cannot have been reused). The marker must still be on the final
    command line: a launcher that drops it makes the VMM unrecognisable, which is refused here.
    """
    now = read_identity(recorded.pid, marker=recorded.marker, native=native)
    if now.start_time != recorded.start_time:
        raise AdoptionRefused(
            f"pid {recorded.pid} was reused: start time {now.start_time} ticks, "
            f"recorded {recorded.start_time}",
            reason="start_time",
        )
    check_identity(now, native=native)
    return now
