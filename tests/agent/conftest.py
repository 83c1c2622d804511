"""A host for the agent: private network namespace with a bridge, image root, simulator wrapper."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import live_pids

EDGE = str(Path(sys.executable).parent / "nkudo-edge")


class Host:
    """Runs `nkudo-edge apply` inside the namespace, and reads kernel and simulator state."""

    def __init__(self, ns: str, root: Path) -> None:
        self.ns = ns
        self.root = root
        self.state = root / "state"
        self.vms = root / "vms"
        self.snaps = root / "snaps"
        self.images = root / "images"
        self.journal = root / "journal.jsonl"
        self.images.mkdir(parents=True)
        (self.images / "vmlinux").write_bytes(b"\x7fELF fake kernel for the simulator")
        with open(self.images / "base.img", "wb") as f:
            f.truncate(256 * 1024 * 1024)
            f.write(b"rootfs")
        self.sim_flags: list[str] = []
        self.ch = root / "ch"
        self._write_wrapper()

    def _write_wrapper(self) -> None:
        # A Python stand-in (not a shell exec) so the VMM's process identity stays the one spawned.
        flags = ["--sim-journal", str(self.journal), *self.sim_flags]
        self.ch.write_text(
            f"#!{sys.executable}\nimport sys\nfrom nkudo.chsim.main import main\n"
            f"sys.exit(main({flags!r} + sys.argv[1:]))\n"
        )
        self.ch.chmod(0o755)

    def set_sim_flags(self, *flags: str) -> None:
        self.sim_flags = list(flags)
        self._write_wrapper()

    def apply(
        self, actions: list[dict[str, Any]], *extra: str, timeout: float = 120
    ) -> tuple[int, dict[str, Any], str]:
        plan = self.root / f"plan-{uuid.uuid4().hex[:6]}.json"
        plan.write_text(json.dumps({"actions": actions}))
        argv = [
            "ip", "netns", "exec", self.ns, EDGE, "--state-dir", str(self.state), "apply", "--json",
            "--plan", str(plan), "--runtime-dir", str(self.vms), "--snapshot-dir", str(self.snaps),
            "--image-root", str(self.images), "--cloud-hypervisor-bin", str(self.ch), "--bridge", "br0", *extra,
        ]  # fmt: skip
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        doc = json.loads(r.stdout) if r.stdout.strip() else {}
        return r.returncode, doc, r.stderr

    def links(self) -> dict[str, dict[str, Any]]:
        out = subprocess.run(
            ["ip", "-n", self.ns, "-j", "-d", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
        return {lk["ifname"]: lk for lk in json.loads(out)}

    def taps(self) -> dict[str, dict[str, Any]]:
        return {n: lk for n, lk in self.links().items() if lk.get("linkinfo", {}).get("info_kind") == "tun"}

    def requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        recs = [json.loads(x) for x in self.journal.read_text().splitlines() if x.strip()]
        return [
            r
            for r in recs
            if r.get("kind") == "request" and (endpoint is None or r.get("endpoint") == endpoint)
        ]

    def vmm_pids(self) -> list[int]:
        """Live processes whose command line names an API socket under this host's runtime dir."""
        return live_pids(str(self.vms).encode(), b"--api-socket")

    def kill_vmms(self) -> None:
        for pid in self.vmm_pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


@pytest.fixture
def host(netns_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    subprocess.run(["ip", "-n", netns_name, "link", "add", "br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", netns_name, "link", "set", "br0", "up"], check=True)
    # Short root: the API socket path must fit in sun_path (108 bytes).
    root = Path(f"/tmp/nkh-{uuid.uuid4().hex[:8]}")
    root.mkdir()
    h = Host(netns_name, root)
    try:
        yield h
    finally:
        h.kill_vmms()
        subprocess.run(["rm", "-rf", str(root)], check=False)
