"""A VM's serial console on disk: bounded by size, read from the end, made safe to show.

The VMM writes the guest's serial port into ``console.log`` in the VM's runtime directory
(Cloud Hypervisor ``serial: {mode: File}``, QEMU ``-chardev file``). Three things are done
with it here, as functions of paths and bytes so that the agent, the CLI and the tests share them.

**Rotation by size, without touching the writer.** Neither VMM reopens the file: Cloud
Hypervisor opens it once with ``File::create`` (``O_WRONLY|O_CREAT|O_TRUNC``, no ``O_APPEND``),
and QEMU's file chardev does the same unless told ``append=on``. Renaming the file away would
leave the VMM writing into the renamed file; copy-and-truncate under a writer without
``O_APPEND`` leaves the writer at its old offset (the file grows back to its old size as a hole)
and loses whatever is written between the copy and the truncate. A pipe or pty read by the
agent would block the guest's serial port, or lose its output, while the agent is down or
restarting. So the file stays where it is and who writes it is never involved: :func:`rotate`
*deallocates* everything but the last ``keep`` bytes with ``fallocate(PUNCH_HOLE)``. The
writer's offset is untouched, no byte is copied or lost, the disk space used stays at about
``keep`` (the apparent size keeps growing; the hole reads as NUL bytes, which the tail
functions skip). It runs from the agent (every heartbeat of ``nkudo-edge run``, and
``nkudo-edge console``), so a stopped agent never blocks a VMM; the file merely grows until
the agent is back. Where the file system cannot punch holes, nothing is deallocated and a
warning says so (``rotate`` returns False).

**One older file.** A VMM (re)started on the same VM truncates ``console.log``, which would
lose the console of the run that crashed. :func:`prepare_for_launch` (called before every
spawn, when no writer exists) renames it to ``console.log.1``; the tail reads across both.

**Untrusted text.** What the guest printed is attacker-controlled: :func:`sanitize` keeps
printable text, newlines and tabs and removes every other control character and every escape
sequence (CSI, OSC, DCS...), so nothing reaches a terminal or a browser that could move the
cursor, retitle a window, hide text or forge lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from nkudo import log
from nkudo.agent import paths as P
from nkudo.errors import NkudoError, ValidationError
from nkudo.wire import messages as wm
from nkudo.wire.messages import CONSOLE_FORBIDDEN
from nkudo.wire.vocab import ErrorCode

_log = log.get_logger("console")

CONSOLE_FILE: Final = "console.log"
PREVIOUS_SUFFIX: Final = ".1"
#: Default size kept per VM (``--console-max-mib``).
DEFAULT_KEEP_MIB: Final = 2
#: The most lines one tail returns (CLI ``--lines``, the control plane's ``?lines=``).
MAX_LINES: Final = 10000
#: The most bytes one tail reads from disk (a guest printing one endless line cannot make it unbounded).
MAX_TAIL_BYTES: Final = 1024 * 1024
_BLOCK: Final = 4096

_FALLOC_FL_KEEP_SIZE: Final = 0x01
_FALLOC_FL_PUNCH_HOLE: Final = 0x02

# Escape sequences (ECMA-48): CSI, OSC (ended by BEL or ST), DCS/SOS/PM/APC strings (ended by ST), the
# 8-bit CSI, and two/three-character escapes (``ESC ( B``, ``ESC c``...). An unfinished one at the end of
# the text is removed too.
_ESCAPES = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"
    r"|\x9b[0-?]*[ -/]*[@-~]"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\|\Z)"
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\|\Z)"
    r"|\x1b[ -/]*[0-~]"
)
# Every other control character but newline and tab: C0, DEL, C1, and the Unicode direction overrides and
# marks that make a terminal or a browser show text in another order than it is stored (the wire's one
# definition: the control plane refuses a tail that still has one).
_CONTROLS = re.compile(f"[{CONSOLE_FORBIDDEN}]")


def sanitize(data: bytes | str) -> str:
    """Console bytes as text safe for a terminal or a browser: printable text, ``\\n`` and ``\\t`` only.

    Invalid UTF-8 becomes U+FFFD; ``\\r\\n`` becomes ``\\n``; escape sequences and the other control
    characters are removed (not replaced: a removed colour code should not leave a mark).
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = text.replace("\r\n", "\n")
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def console_paths(runtime_dir: str) -> tuple[str, str]:
    """(current, previous) console files of a VM's runtime directory."""
    cur = os.path.join(runtime_dir, CONSOLE_FILE)
    return cur, cur + PREVIOUS_SUFFIX


# --------------------------------------------------------------------------- rotation


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    fn = libc.fallocate
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``[offset, offset+length)`` of an open file, keeping its size (raises OSError)."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def first_data(fd: int, size: int) -> int:
    """Offset of the first byte that is not in a hole (``size`` if there is none)."""
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return size
        return 0  # SEEK_DATA unsupported: assume data from the start


def rotate(path: str, keep: int) -> bool:
    """Keep only (about) the last ``keep`` bytes of ``path`` on disk; True unless holes cannot be punched.

    Deallocates whole blocks below ``size - keep``; never moves data, so a VMM writing the file at
    any offset, with or without ``O_APPEND``, is unaffected. Cheap when there is nothing to do.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        size = os.fstat(fd).st_size
        end = (max(size - keep, 0) // _BLOCK) * _BLOCK
        start = (first_data(fd, size) // _BLOCK) * _BLOCK
        if end <= start:
            return True
        try:
            punch_hole(fd, start, end - start)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                _log.warn("console log cannot be rotated: this file system cannot punch holes",
                          path=path, error=exc.strerror)  # fmt: skip
                return False
            raise
        return True
    finally:
        os.close(fd)


def rotate_all(runtime_dir: str, keep: int) -> int:
    """Rotate the console of every VM under ``runtime_dir``; return how many files were looked at.

    Never raises for one VM's file (a VM deleted meanwhile, a permission problem): logged and skipped.
    """
    n = 0
    try:
        entries = os.listdir(runtime_dir)
    except OSError:
        return 0
    for name in entries:
        path = os.path.join(runtime_dir, name, CONSOLE_FILE)
        try:
            rotate(path, keep)
            n += 1
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                _log.warn("console log rotation failed", path=path, error=exc.strerror or str(exc))
    return n


def prepare_for_launch(console_log: str) -> None:
    """Before a VMM is spawned (no writer exists): keep the last run's console as ``console.log.1``.

    Why: both VMMs truncate the file when they open it, and the console of the run that just
    crashed or panicked is exactly what an operator needs to see next.
    """
    try:
        if os.path.getsize(console_log) > 0:
            os.replace(console_log, console_log + PREVIOUS_SUFFIX)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- tails


def position(runtime_dir: str) -> tuple[int, int] | None:
    """(inode, size) of the current console file, or None: where a tail ends and a follow starts."""
    try:
        st = os.stat(console_paths(runtime_dir)[0])
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size


def _read_end(path: str, max_bytes: int, end: int | None = None) -> bytes:
    """The last ``max_bytes`` of ``path`` (up to offset ``end``) that are data (rotation's holes skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    try:
        size = os.fstat(fd).st_size
        if end is not None:
            size = min(size, end)
        start = max(size - max_bytes, first_data(fd, size), 0)
        if start >= size:
            return b""
        return os.pread(fd, size - start, start)
    finally:
        os.close(fd)


def tail_lines(
    runtime_dir: str, lines: int, *, max_bytes: int = MAX_TAIL_BYTES, end: tuple[int, int] | None = None
) -> list[str]:
    """The last ``lines`` lines of a VM's console (``console.log.1`` then ``console.log``), sanitised.

    A last line without its newline yet is included (a panic often ends that way). ``end`` (from
    :func:`position`) stops at that offset, so a :func:`follow` started there repeats and skips nothing.
    """
    if lines <= 0:
        return []
    cur, prev = console_paths(runtime_dir)
    data = _read_end(cur, max_bytes, end[1] if end is not None else None)
    if data.count(b"\n") < lines and len(data) < max_bytes:
        older = _read_end(prev, max_bytes - len(data))
        if older:
            data = (older if older.endswith(b"\n") else older + b"\n") + data
    text = sanitize(data.replace(b"\0", b""))
    out = text.split("\n")
    if out and out[-1] == "":
        out.pop()
    return out[-lines:]


def tail_text(
    runtime_dir: str, lines: int, *, max_bytes: int = MAX_TAIL_BYTES, end: tuple[int, int] | None = None
) -> str:
    """:func:`tail_lines` as one text, each line ended by a newline ("" when the console is empty)."""
    got = tail_lines(runtime_dir, lines, max_bytes=max_bytes, end=end)
    return "".join(line + "\n" for line in got)


def error_tail(runtime_dir: str, lines: int = 20, max_chars: int = 4000) -> str:
    """What a failed create/start adds to its error: the console's last lines, or "" if it is empty."""
    try:
        text = tail_text(runtime_dir, lines, max_bytes=64 * 1024)
    except OSError:
        return ""
    if not text.strip():
        return ""
    if len(text) > max_chars:
        text = "..." + text[-max_chars:]
    return f"; last console lines:\n{text.rstrip()}"


# --------------------------------------------------------------------------- follow


@dataclass
class _Cursor:
    ino: int = -1
    pos: int = 0


def follow(
    runtime_dir: str,
    *,
    start: tuple[int, int] | None = None,
    poll: float = 0.2,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """Sanitised console text as the VMM writes it from ``start`` (a :func:`position`; default: now), until
    ``stop()``.

    Follows the file by name: a VMM restarted on the VM (new file) or a truncation starts it over from the
    beginning of the new content. Text is handed out line by line, so an escape sequence split across two
    writes is still recognised; a partial line longer than 64 KiB is handed out as it is.
    """
    cur, _ = console_paths(runtime_dir)
    c = _Cursor()
    if start is None:
        start = position(runtime_dir)
    if start is not None:
        c.ino, c.pos = start
    carry = b""
    while not stop():
        try:
            st = os.stat(cur)
        except FileNotFoundError:
            time.sleep(poll)
            continue
        if st.st_ino != c.ino or st.st_size < c.pos:
            c.ino, c.pos, carry = st.st_ino, 0, b""
        if st.st_size > c.pos:
            data = _read_from(cur, c, st.st_size)
            buf = carry + data.replace(b"\0", b"")
            cut = buf.rfind(b"\n") + 1
            if cut == 0 and len(buf) > 64 * 1024:
                cut = len(buf)
            carry = buf[cut:]
            if cut:
                yield sanitize(buf[:cut])
            continue
        time.sleep(poll)


def _read_from(path: str, c: _Cursor, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        start = max(c.pos, first_data(fd, size))
        n = min(size - start, MAX_TAIL_BYTES)
        data = os.pread(fd, n, start) if n > 0 else b""
        c.pos = start + len(data)
        return data
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- errors and the control plane

#: Errors of a create/start after which the console is what explains them (the guest panicked, hung...).
_EXPLAINED_BY_CONSOLE: Final = frozenset({ErrorCode.BOOT_FAILED, ErrorCode.VMM_START_FAILED})


def annotate(exc: NkudoError, runtime_dir: str) -> None:
    """Append the console's last lines to a create/start error that timed out or failed to boot.

    Why: "timed out" alone sends the operator hunting; the panic or the hung init is in the console.
    Done in place (type, code and ``is_timeout`` unchanged), once, before a rollback removes the file.
    """
    if not (exc.is_timeout or exc.code in _EXPLAINED_BY_CONSOLE) or "last console lines:" in exc.message:
        return
    tail = error_tail(runtime_dir)
    if tail:
        exc.message += tail
        exc.args = (exc.message,)


@contextmanager
def on_failure(runtime_dir: str) -> Iterator[None]:
    """``with on_failure(dir):`` around a create/start step: see :func:`annotate`."""
    try:
        yield
    except NkudoError as exc:
        annotate(exc, runtime_dir)
        raise


def answer(runtime_dir: str, requests: list[wm.ConsoleRequest]) -> list[wm.ConsoleTail]:
    """The tails the control plane asked for, each sanitised and within the wire's size bound."""
    out: list[wm.ConsoleTail] = []
    for req in requests[: wm.MAX_CONSOLE_REQUESTS]:
        try:
            d = P.safe_join(runtime_dir, req.vm_id, field="vm_id")
        except (ValidationError, NkudoError):
            out.append(wm.ConsoleTail(vm_id=req.vm_id, lines=req.lines, found=False))
            continue
        cur, prev = console_paths(d)
        if not (os.path.exists(cur) or os.path.exists(prev)):
            out.append(wm.ConsoleTail(vm_id=req.vm_id, lines=req.lines, found=False))
            continue
        try:
            got = tail_lines(d, req.lines, max_bytes=4 * wm.MAX_CONSOLE_CHARS)
        except OSError as exc:
            _log.warn("console tail unreadable", vm_id=req.vm_id, error=exc.strerror or str(exc))
            out.append(wm.ConsoleTail(vm_id=req.vm_id, lines=req.lines, found=False))
            continue
        text = ""
        for line in reversed(got):  # whole lines, newest first, while they fit
            if len(text) + len(line) + 1 > wm.MAX_CONSOLE_CHARS:
                break
            text = line + "\n" + text
        out.append(wm.ConsoleTail(vm_id=req.vm_id, lines=req.lines, text=text))
    return out


#: Seconds between two rotation passes of the daemon (a pass is one ``listdir`` and a few ``fstat``).
ROTATE_EVERY: Final = 10.0


class Shipper:
    """The agent daemon's side of console tails: answer requests, ship them, keep the files bounded.

    The control plane asks in a heartbeat's answer; the tails ride in the next heartbeat, which the
    daemon sends at once (:meth:`after_heartbeat` says so) instead of an interval later.
    """

    def __init__(self, runtime_dir: str, keep_mib: int) -> None:
        self.runtime_dir = runtime_dir
        self.keep = keep_mib * 1024 * 1024  # 0: never deallocate
        #: Tails to carry in the next heartbeat (kept until one that carried them succeeds).
        self.pending: list[wm.ConsoleTail] = []
        self._rotated_at = float("-inf")

    def after_heartbeat(self, sent: wm.HeartbeatRequest, resp: wm.HeartbeatResponse) -> bool:
        """After a successful round trip: forget what it delivered, answer what it asked; True = send again now."""
        if sent.consoles:
            self.pending = []
        if resp.console_requests:
            self.pending = answer(self.runtime_dir, resp.console_requests)
        return bool(self.pending) and not sent.consoles

    def rotate(self) -> None:
        """Bound every VM's console file (at most every :data:`ROTATE_EVERY` seconds)."""
        now = time.monotonic()
        if self.keep and now - self._rotated_at >= ROTATE_EVERY:
            self._rotated_at = now
            rotate_all(self.runtime_dir, self.keep)
