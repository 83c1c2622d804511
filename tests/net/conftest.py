"""Fixtures for the host network tests: a backend opened inside a private netns, and `ip` readers.

Kernel state is always read back with iproute2 (`ip -j -d link`, `bridge -j link`),
never with the code under test.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from nkudo.net.hostnet import HostNet, open_backend
from tests.conftest import require_native

BACKEND_KINDS = ["native", "twin", "pyroute2"]


@pytest.fixture(params=BACKEND_KINDS)
def backend(request: pytest.FixtureRequest) -> str:
    kind = str(request.param)
    if kind == "native":
        require_native("netlink")
    return kind


@pytest.fixture
def net(backend: str, in_netns: str) -> Iterator[HostNet]:
    with open_backend(backend) as n:
        yield n


def ip_link(name: str) -> dict[str, Any] | None:
    """`ip -j -d link show dev NAME` in the current thread's netns (None if absent)."""
    r = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", name], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    out: list[dict[str, Any]] = json.loads(r.stdout)
    return out[0]


def ip_links() -> list[dict[str, Any]]:
    r = subprocess.run(["ip", "-j", "-d", "link", "show"], capture_output=True, text=True, check=True)
    out: list[dict[str, Any]] = json.loads(r.stdout)
    return out


def bridge_ports() -> dict[str, str]:
    """Port name -> bridge name, from `bridge -j link`."""
    r = subprocess.run(["bridge", "-j", "link"], capture_output=True, text=True, check=True)
    return {p["ifname"]: p["master"] for p in json.loads(r.stdout or "[]")}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
