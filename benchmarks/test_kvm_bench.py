"""KVM probe gate: the native probe at least 1.5× faster than its twin (same run).

The fixture times the native probe; the twin is timed between its rounds with
the fixture's clock (``time_sides``). The probe with KVM_CREATE_VM is kernel work
neither side can speed up: it is reported by its own benchmark, not gated.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from tests.conftest import skip_or_fail

from benchmarks.conftest import Benchmark, GateRunFailed, checked, record, time_sides
from nkudo import _native
from nkudo.host import kvm

CAPS = [*kvm.REQUIRED_CAPS.get(kvm.machine_arch(), {}).values(), *kvm.INFO_CAPS.values()]


@pytest.fixture
def native_probe() -> Callable[[str, list[int], bool], kvm.RawProbe]:
    if not os.path.exists("/dev/kvm"):
        skip_or_fail("no /dev/kvm on this host")
    mod = _native.load("kvm")
    if mod is None:
        pytest.fail(f"native kvm module not loaded: {_native.reason('kvm')}")
    return mod.probe  # type: ignore[no-any-return]


def _full_probe(create_vm: bool) -> Callable[[kvm.RawProbe], bool]:
    """True for a probe that opened /dev/kvm, got the stable API and (if asked) created a VM."""

    def ok(r: kvm.RawProbe) -> bool:
        open_err, api, _caps, mmap_size, create_err = r
        return (
            open_err == 0 and api == kvm.KVM_API_VERSION and mmap_size > 0 and (create_err == 0) == create_vm
        )

    return ok


def _probe_ok(*, create_vm: bool) -> Callable[[kvm.RawProbe], None]:
    full = _full_probe(create_vm)

    def ok(r: kvm.RawProbe) -> None:
        if not full(r):
            raise GateRunFailed(f"KVM probe did not succeed: {r!r}")

    return ok


PER_ROUND = 50


def test_kvm_probe_native_vs_twin(
    native_probe: Callable[[str, list[int], bool], kvm.RawProbe], benchmark: Benchmark
) -> None:
    """Gate: native probe (no VM created) >= 1.5x faster than the twin, median of 40 rounds of 50 probes."""
    # A probe that cannot open /dev/kvm returns an errno at once: every result must be a full probe.
    ok = _probe_ok(create_vm=False)

    def nat() -> None:
        for _ in range(PER_ROUND):
            ok(native_probe("/dev/kvm", CAPS, False))

    def twin() -> None:
        for _ in range(PER_ROUND):
            ok(kvm._probe_py("/dev/kvm", CAPS, False))

    res = time_sides(benchmark, {"native": nat, "twin": twin}, primary="native", rounds=40, per_call=PER_ROUND)
    ratio = res["twin"].median / res["native"].median
    record(
        benchmark,
        "kvm_probe",
        native_us=res["native"].median_us,
        twin_us=res["twin"].median_us,
        speedup=round(ratio, 2),
        caps_probed=len(CAPS),
        limit_speedup=1.5,
    )
    assert ratio >= 1.5, f"native KVM probe only {ratio:.2f}x faster than the twin (gate 1.5x)"


def test_kvm_probe_with_create_vm_report(
    native_probe: Callable[[str, list[int], bool], kvm.RawProbe], benchmark: Benchmark
) -> None:
    """Reported, not gated: with KVM_CREATE_VM (~0.6 ms of kernel work) both sides cost about the same."""
    res = time_sides(
        benchmark,
        {
            "native": checked(lambda: native_probe("/dev/kvm", CAPS, True), _full_probe(True), "native probe"),
            "twin": checked(lambda: kvm._probe_py("/dev/kvm", CAPS, True), _full_probe(True), "twin probe"),
        },
        primary="native",
        rounds=40,
    )
    record(
        benchmark,
        "kvm_probe_create_vm",
        with_create_vm_native_us=round(res["native"].median * 1e6, 1),
        with_create_vm_twin_us=round(res["twin"].median * 1e6, 1),
    )
