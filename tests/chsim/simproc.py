"""Spawning real ``nkudo-ch-sim`` processes for tests (killed at teardown, always)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nkudo.chapi import wait_ready


def sim_command() -> list[str]:
    script = Path(sys.executable).parent / "nkudo-ch-sim"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "nkudo.chsim.main"]


class Sim:
    """One simulator process with its socket in a short private directory."""

    def __init__(self, workdir: Path, *args: str, name: str = "api.sock", env: dict[str, str] | None = None,
                 wait: bool = True, journal: bool = True) -> None:
        self.dir = workdir
        self.socket = str(workdir / name)
        self.journal_path = workdir / f"{name}.journal.jsonl"
        self.stderr_path = workdir / f"{name}.stderr"
        cmd = [*sim_command(), "--api-socket", f"path={self.socket}"]
        if journal:
            cmd += ["--sim-journal", str(self.journal_path)]
        self.cmd = [*cmd, *args]
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._err, env={**os.environ, **(env or {})})
        if wait:
            wait_ready(self.socket, timeout=10, pid=self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def journal(self, kind: str = "request") -> list[dict[str, Any]]:
        if not self.journal_path.exists():
            return []
        recs = [json.loads(line) for line in self.journal_path.read_text().splitlines() if line.strip()]
        return [r for r in recs if r.get("kind") == kind]

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._err.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory (sun_path is 108 bytes) removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="chs-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def spawn(workdir: Path) -> Iterator[Any]:
    """``spawn(*args, **kw) -> Sim``; every simulator started is killed at teardown."""
    started: list[Sim] = []

    def _spawn(*args: str, **kw: Any) -> Sim:
        s = Sim(workdir, *args, **kw)
        started.append(s)
        return s

    try:
        yield _spawn
    finally:
        for s in started:
            s.kill()


def wait_gone(path: str, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not os.path.exists(path):
            return True
        time.sleep(0.01)
    return not os.path.exists(path)


VM_CONFIG: dict[str, Any] = {"payload": {"kernel": "/dev/null", "cmdline": "console=ttyS0"},
                             "cpus": {"boot_vcpus": 1, "max_vcpus": 2}, "memory": {"size": 64 << 20}}
