"""Shared fixtures: real network namespaces, native/twin parametrisation."""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from collections.abc import Generator, Iterator
from typing import NoReturn

import pytest

from nkudo import _native
from nkudo.host import syscalls


def in_ci() -> bool:
    """True when ``CI`` is set (as CI services set it): every capability must then be present."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> NoReturn:
    """A capability (root, KVM, PostgreSQL, a system tool) is missing: skip locally, fail under CI.

    Why: CI provisions every capability the suite needs, so a test that skips
    there has silently stopped testing; locally a skip with its reason is the
    helpful answer. Call this at every capability check instead of ``pytest.skip``.
    """
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a missing capability fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "ci_may_skip(reason): this test may skip under CI for a reason other than a missing "
        "capability (e.g. a race it cannot stage); the reason says why",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, object, None]:
    """Under CI, a skip is a failure (unless the test is marked ``ci_may_skip``).

    Why a hook as well as :func:`skip_or_fail`: a future plain ``pytest.skip``
    or ``skipif`` must not quietly stop a test from running in CI.
    """
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker("ci_may_skip") is not None:
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    report.outcome = "failed"
    report.longrepr = f"skipped while CI is set (skips are failures in CI; use skip_or_fail): {reason}"


ci_skip_guard = pytest_runtest_makereport


def _require_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root (network namespaces, /dev/kvm); run the suite as root as CI does")


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
        if in_ci() or not _native.native_disabled():
            pytest.fail(f"native module {name!r} not loaded: {_native.reason(name)}")
        skip_or_fail(f"native module {name!r} disabled: {_native.reason(name)}")


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
