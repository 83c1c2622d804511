"""End-to-end rig: a real control plane, real agent processes and nkudo-ch-sim, all in one private netns.

The test thread enters the namespace (``in_netns``), so every process it starts and every
socket it opens lives there: the control plane listens on the namespace's own loopback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import live_pids
from tests.cp.helpers import Server, Tenant, new_tenant, start_server
from tests.cp.pg import free_port

EDGE = str(Path(sys.executable).parent / "nkudo-edge")


class EdgeHost:
    """One enrolled (or not yet) edge host: its directories, its simulator wrapper, its agent process."""

    def __init__(self, root: Path, server: Server) -> None:
        self.root = root
        self.server = server
        self.state, self.pki, self.vms, self.snaps = (
            root / "state",
            root / "pki",
            root / "vms",
            root / "snaps",
        )
        self.images = root / "images"
        self.images.mkdir(parents=True)
        (self.images / "vmlinux").write_bytes(b"kernel")
        self.journal = root / "journal.jsonl"
        self.counter = root / "counter"
        self.ch = root / "ch"
        self.set_sim_flags()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "agent.log"
        self.metrics_port = free_port()

    def set_sim_flags(self, *flags: str) -> None:
        all_flags = ["--sim-journal", str(self.journal), *flags]
        self.ch.write_text(
            f"#!{sys.executable}\nimport sys\nfrom nkudo.chsim.main import main\nsys.exit(main({all_flags!r} + sys.argv[1:]))\n"
        )
        self.ch.chmod(0o755)

    def edge(
        self, *args: str, input_text: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EDGE, "--state-dir", str(self.state), *args], capture_output=True, text=True,
                              timeout=timeout, input=input_text)  # fmt: skip

    def agent_args(self) -> list[str]:
        return [
            "--pki-dir", str(self.pki), "--runtime-dir", str(self.vms), "--snapshot-dir", str(self.snaps),
            "--image-root", str(self.images), "--cloud-hypervisor-bin", str(self.ch), "--exec-allow", "/bin/sh",
        ]  # fmt: skip

    def enroll(self, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.edge("enroll", "--control-plane", self.server.url, "--token", token, "--ca-file",
                         str(self.server.ca_file), "--pki-dir", str(self.pki), *extra)  # fmt: skip

    def start(self, *extra: str) -> None:
        assert self.proc is None or self.proc.poll() is not None
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [EDGE, "--state-dir", str(self.state), "--log-format", "json", "run", *self.agent_args(),
             "--heartbeat-interval", "0.5", "--max-backoff", "2", "--metrics-addr", f"127.0.0.1:{self.metrics_port}", *extra],
            stdout=logf, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 40) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def vmm_pids(self) -> list[int]:
        return live_pids(str(self.vms).encode(), b"--api-socket")

    def cleanup(self) -> None:
        self.kill()
        for pid in self.vmm_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_for(pred: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = pred()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture(params=["sqlite"])
def cp_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cp_extra(request: pytest.FixtureRequest) -> list[str]:
    """Extra `serve` flags for one test (parametrize indirectly)."""
    return list(getattr(request, "param", []))


@pytest.fixture
def cp(
    in_netns: str,
    cp_backend: str,
    cp_extra: list[str],
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Server]:
    subprocess.run(["ip", "link", "add", "br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "set", "br0", "up"], check=True)
    url = None
    if cp_backend == "postgres":
        # Its own database, not the cp tests' session one: another CA would sign checkpoints there (see
        # tests/cp/test_ratelimit.py's rl_server).
        url = request.getfixturevalue("pg_cluster").create_database()
    srv = start_server(tmp_path_factory.mktemp("cp"), database_url=url,
                       extra=["--lease-ttl", "3", "--offline-after", "3", "--sweep-interval", "0.5", "--heartbeat-interval", "1",
                              "--renew-grace", "1", *cp_extra])  # fmt: skip
    yield srv
    srv.stop()


@pytest.fixture
def tenant(cp: Server) -> Tenant:
    return new_tenant(cp)


@pytest.fixture
def host(cp: Server) -> Iterator[EdgeHost]:
    root = Path(f"/tmp/nke-{uuid.uuid4().hex[:8]}")  # short: API socket paths must fit in 108 bytes
    root.mkdir()
    h = EdgeHost(root, cp)
    yield h
    h.cleanup()
    subprocess.run(["rm", "-rf", str(root)], check=False)


from tests.cp.conftest import pg_cluster, pg_url  # noqa: E402,F401 - PostgreSQL fixtures for the e2e run
