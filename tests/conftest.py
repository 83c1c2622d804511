"""Shared fixtures: real network namespaces, native/twin parametrisation."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from nkudo import _native
from nkudo.host import syscalls


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, /dev/kvm); run the suite as root as CI does")


@contextlib.contextmanager
def entered_netns(name: str) -> Iterator[None]:
    """Enter netns ``name`` in this thread, restoring the original one afterwards."""
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        rc = syscalls.setns(target, syscalls.CLONE_NEWNET)
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc))
        try:
            yield
        finally:
            rc = syscalls.setns(orig, syscalls.CLONE_NEWNET)
            if rc < 0:
                raise OSError(-rc, os.strerror(-rc))
    finally:
        os.close(target)
        os.close(orig)


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A fresh, private network namespace (deleted afterwards, with everything in it)."""
    _require_root()
    name = f"nkt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def in_netns(netns_name: str) -> Iterator[str]:
    """Run the test body inside a fresh private network namespace."""
    with entered_netns(netns_name):
        yield netns_name


@pytest.fixture(params=["native", "twin"])
def impl(request: pytest.FixtureRequest) -> str:
    """Parametrise a test over the native module and its pure-Python twin."""
    return str(request.param)


def require_native(name: str) -> None:
    """Native modules must be built: in CI a missing one is a failure, not a skip."""
    mod = _native.load(name)
    if mod is None:
        if os.environ.get("CI") or not _native.native_disabled():
            pytest.fail(f"native module {name!r} not loaded: {_native.reason(name)}")
        pytest.skip(f"native module {name!r} disabled: {_native.reason(name)}")


def live_pids(*needles: bytes) -> list[int]:
    """Live (non-zombie) processes whose command line contains every one of ``needles``."""
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{e}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and all(n in cmd for n in needles):
            out.append(int(e))
    return out
