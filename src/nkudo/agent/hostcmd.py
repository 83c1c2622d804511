"""``CommandExecute``: run an operator-allowed host executable, safely.

Host commands are the most dangerous action a plan can carry, so the default
is deny: only executables the operator listed with ``--exec-allow`` (absolute
paths, compared after resolving symlinks) may run. No shell, ever: argv is
passed as a list. The environment is scrubbed, the working directory must be
an existing directory, the process runs in its own process group so a timeout
kills everything it started, and output is captured up to a cap.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from typing import Any

from nkudo.errors import NkudoError, ValidationError
from nkudo.wire.vocab import ErrorCode

OUTPUT_CAP = 64 * 1024
KILL_GRACE = 2.0
SAFE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/",
}


class CommandFailed(NkudoError):
    code = ErrorCode.COMMAND_FAILED

    def __init__(self, message: str, result: dict[str, Any], code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.result = result


class CommandTimedOut(CommandFailed):
    """The command outlived its time limit and its process group was killed (``result`` has its output so far)."""

    code = ErrorCode.TIMED_OUT
    is_timeout = True


def normalise_allowlist(paths: list[str] | tuple[str, ...]) -> frozenset[str]:
    """Resolve the operator's --exec-allow paths; each must be an absolute path to an executable file."""
    out = set()
    for p in paths:
        if not os.path.isabs(p):
            raise ValidationError(f"--exec-allow {p!r} must be an absolute path", field="exec_allow")
        real = os.path.realpath(p)
        if not os.path.isfile(real) or not os.access(real, os.X_OK):
            raise ValidationError(f"--exec-allow {p!r} is not an executable file", field="exec_allow")
        out.add(real)
    return frozenset(out)


def resolve_command(command: str, allow: frozenset[str]) -> str:
    if not os.path.isabs(command):
        raise ValidationError(
            f"params.command {command!r} must be an absolute path to an allowed executable",
            field="params.command",
        )
    real = os.path.realpath(command)
    if real not in allow:
        raise NkudoError(
            f"params.command {command!r} is not allowed on this host (allow it with --exec-allow)",
            code=ErrorCode.COMMAND_NOT_ALLOWED,
            field="params.command",
        )
    return real


def run_command(
    command: str, args: list[str], *, cwd: str, timeout: float, allow: frozenset[str]
) -> dict[str, Any]:
    """Run ``command args...``; return exit code and capped output, or raise CommandFailed."""
    exe = resolve_command(command, allow)
    for i, a in enumerate(args):
        if "\0" in a:
            raise ValidationError(f"params.args[{i}] contains a NUL byte", field=f"params.args[{i}]")
    if not os.path.isdir(cwd):
        raise ValidationError(f"params.dir {cwd!r} is not an existing directory", field="params.dir")
    started = time.monotonic()
    proc = subprocess.Popen(
        [exe, *args],
        cwd=cwd,
        env=dict(SAFE_ENV),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    bufs = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = {"stdout": False, "stderr": False}
    sel = selectors.DefaultSelector()
    assert proc.stdout is not None and proc.stderr is not None
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    timed_out = False
    deadline = started + timeout
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.data]
                room = OUTPUT_CAP - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > room:
                    truncated[key.data] = True
        if not timed_out:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        if timed_out or proc.poll() is None:
            _kill_group(proc)
        proc.stdout.close()
        proc.stderr.close()
    result = {
        "command": exe,
        "args": list(args),
        "exit_code": proc.returncode,
        "stdout": bufs["stdout"].decode("utf-8", "replace"),
        "stderr": bufs["stderr"].decode("utf-8", "replace"),
        "stdout_truncated": truncated["stdout"],
        "stderr_truncated": truncated["stderr"],
        "duration_seconds": round(time.monotonic() - started, 6),
    }
    if timed_out:
        raise CommandTimedOut(
            f"{exe} did not finish within {timeout:g}s; its process group was killed", result
        )
    if proc.returncode != 0:
        raise CommandFailed(f"{exe} exited with code {proc.returncode}", result)
    return result


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole group, then SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            # The leader is gone; make sure no straggler of its group survives.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        except subprocess.TimeoutExpired:
            continue
