"""Fixtures for process-control tests: real children, always cleaned up, native or twin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from nkudo.proc import AdoptionRefused, ProcessHandle, ProcessIdentity, adopt, pidfd_support, spawn
from tests.conftest import require_native

ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
PY = sys.executable
HELPER = Path(__file__).with_name("adopt_helper.py")


def python_argv(code: str) -> list[str]:
    """A Python child (never a shell): -I so nothing from our environment leaks in."""
    return [PY, "-I", "-c", code]


def native_flag(impl: str) -> bool:
    if impl == "native":
        require_native("pidfd")
        return True
    return False


class Reaper:
    """Tracks everything a test started and SIGKILLs what is still alive at teardown."""

    def __init__(self) -> None:
        self.handles: list[ProcessHandle] = []
        self.identities: list[ProcessIdentity] = []
        self.popens: list[subprocess.Popen[bytes]] = []

    def add(self, h: ProcessHandle) -> ProcessHandle:
        self.handles.append(h)
        return h

    def cleanup(self) -> None:
        for h in self.handles:
            try:
                if h.poll() is None:
                    h.kill()
                    h.wait(5)
            except Exception:
                if h.status is None:
                    try:
                        os.kill(h.pid, signal.SIGKILL)
                    except OSError:
                        pass
            h.close()
        for ident in self.identities:
            try:
                with adopt(ident) as h:
                    h.kill()
                    h.wait(5)
            except AdoptionRefused:
                pass  # already gone
        for p in self.popens:
            if p.stdin is not None:
                p.stdin.close()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    r = Reaper()
    try:
        yield r
    finally:
        r.cleanup()


SpawnFn = Callable[..., ProcessHandle]


@pytest.fixture
def spawned(reaper: Reaper, tmp_path: Path, impl: str) -> SpawnFn:
    """``spawned(argv, **kw)``: spawn with the implementation under test; killed at teardown."""
    native = native_flag(impl)

    def _spawn(argv: Sequence[str], *, log_name: str = "child.log", **kw: object) -> ProcessHandle:
        kw.setdefault("env", ENV)
        return reaper.add(spawn(list(argv), log_path=tmp_path / log_name, native=native, **kw))  # type: ignore[arg-type]

    return _spawn


@pytest.fixture
def fallback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Force the no-pidfd fallback (as on a kernel without pidfd) for one test."""
    monkeypatch.setenv("NKUDO_PIDFD", "0")
    pidfd_support.cache_clear()
    try:
        yield
    finally:
        monkeypatch.delenv("NKUDO_PIDFD")
        pidfd_support.cache_clear()


def spawn_orphan(
    reaper: Reaper, log: Path, argv: Sequence[str], *, native: bool, marker: str | None = None
) -> ProcessIdentity:
    """Spawn ``argv`` from a helper Python process that then exits; return the recorded identity.

    A long-lived reaper helper (a child subreaper standing in for init, which
    does not reap in every container) adopts the orphan, so that neither this
    test process nor the exited spawner is its parent.
    """
    cmd = [PY, str(HELPER), "reaper", str(log), "1" if native else "0", marker or "", *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    reaper.popens.append(p)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, "helper printed no identity"
    ident = ProcessIdentity.from_json(line)
    reaper.identities.append(ident)
    return ident
