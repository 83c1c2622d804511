"""Issue 13: the dashboard's pure read-model rules (``nkudo.cp.domain``): site health, host facts summary,
VM state changes. Exhaustive over small inputs, in microseconds."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from nkudo.cp import domain
from nkudo.cp.domain import FactsSummary, SiteHealth, facts_summary, site_health, vm_state_changes
from nkudo.vmstate import VmStatus

_BAD = (VmStatus.CRASHED, VmStatus.UNKNOWN)


def _expected(online: int, total: int, vms: dict[str, int]) -> tuple[SiteHealth, list[str]]:
    """The rule as the issue states it, spelt out independently of the implementation's structure."""
    if total == 0:
        return SiteHealth.EMPTY, []
    if online == 0:
        return SiteHealth.OFFLINE, [f"all {total} agent{'' if total == 1 else 's'} offline"]
    reasons = [f"{total - online} of {total} agents offline"] if online < total else []
    reasons += [f"{vms[s]} VM{'' if vms[s] == 1 else 's'} {s}" for s in ("CRASHED", "UNKNOWN") if vms.get(s)]
    return (SiteHealth.DEGRADED if reasons else SiteHealth.ONLINE), reasons


def test_site_health_exhaustive() -> None:
    """Every agent split up to 4 agents and every mix of 0-2 VMs in each state: the stated rule, exactly."""
    states = [s.value for s in VmStatus]
    seen: set[SiteHealth] = set()
    for total in range(5):
        for online in range(total + 1):
            for counts in itertools.product(range(3), repeat=3):  # CRASHED, UNKNOWN, and one healthy state
                for healthy in (VmStatus.RUNNING, VmStatus.STOPPED, VmStatus.ERROR, VmStatus.PAUSED):
                    vms = {k: n for k, n in zip(("CRASHED", "UNKNOWN", healthy.value), counts, strict=True) if n}
                    assert set(vms) <= set(states)
                    got = site_health(online, total, vms)
                    assert got == _expected(online, total, vms), (online, total, vms)
                    seen.add(got[0])
    assert seen == set(SiteHealth)


@pytest.mark.parametrize(("online", "total", "vms", "health", "reasons"), [
    (0, 0, {"CRASHED": 3}, SiteHealth.EMPTY, []),  # no agent: nothing to be offline, even with stale VMs
    (0, 5, {}, SiteHealth.OFFLINE, ["all 5 agents offline"]),
    (0, 1, {}, SiteHealth.OFFLINE, ["all 1 agent offline"]),
    (3, 5, {"CRASHED": 1}, SiteHealth.DEGRADED, ["2 of 5 agents offline", "1 VM CRASHED"]),
    (5, 5, {"UNKNOWN": 2, "RUNNING": 9}, SiteHealth.DEGRADED, ["2 VMs UNKNOWN"]),
    (5, 5, {"RUNNING": 9, "ERROR": 1, "STOPPED": 2}, SiteHealth.ONLINE, []),
    (1, 1, {"CRASHED": 0}, SiteHealth.ONLINE, []),  # a zero count is no reason
])
def test_site_health_examples(online: int, total: int, vms: dict[str, int], health: SiteHealth,
                              reasons: list[str]) -> None:
    """The reasons are the sentences the dashboard shows next to the status."""
    assert site_health(online, total, vms) == (health, reasons)


def test_facts_summary_from_what_agents_send() -> None:
    """The stored facts are ``wire.messages.HostFacts`` as JSON: disks are summed, KVM is a strict ``true``."""
    facts = {"cpu_cores": 32, "memory_total_bytes": 128 << 30, "storage_total_bytes": 999,
             "disks": [{"mountpoint": "/", "total_bytes": 4 << 40, "free_bytes": 3 << 40},
                       {"mountpoint": "/var", "total_bytes": 1 << 40, "free_bytes": 1 << 30}],
             "kvm_available": True, "cloud_hypervisor_available": False, "os": "linux"}
    assert facts_summary(facts) == FactsSummary(32, 128 << 30, 5 << 40, (3 << 40) + (1 << 30), True, False)
    assert facts_summary(None) is None
    # No mounts listed: the total storage stands in for the disk size, free space is unknown (0).
    assert facts_summary({"storage_total_bytes": 7, "cpu_cores": 2}) == FactsSummary(2, 0, 7, 0, False, False)


@pytest.mark.parametrize("odd", [
    {"cpu_cores": "32", "memory_total_bytes": -1, "kvm_available": "yes", "disks": "sda"},
    {"cpu_cores": True, "memory_total_bytes": 1.5, "disks": [1, None, {"total_bytes": "x"}],
     "cloud_hypervisor_available": 1},
])
def test_facts_summary_tolerates_odd_rows(odd: dict[str, object]) -> None:
    """Rows written by another agent release may hold anything JSON: a non-count reads as 0, never raises."""
    assert facts_summary(odd) == FactsSummary(0, 0, 0, 0, False, False)


def test_vm_state_changes() -> None:
    """Only VMs whose reported state differs from the stored one; a new VM changes from ``None``."""
    stored = {"a": "RUNNING", "b": "STOPPED", "gone": "RUNNING"}
    reported = [("a", "RUNNING"), ("b", "RUNNING"), ("new", "CREATED")]
    assert vm_state_changes(stored, reported) == [("b", "RUNNING", "STOPPED"), ("new", "CREATED", None)]
    assert vm_state_changes(stored, [("a", "RUNNING"), ("b", "STOPPED")]) == []  # a quiet report: no history
    assert vm_state_changes({}, []) == []
    # The same VM twice in one report: its last state counts, once.
    assert vm_state_changes({"a": "RUNNING"}, [("a", "STOPPED"), ("a", "CRASHED")]) == [("a", "CRASHED", "RUNNING")]


def test_cert_warning_window_is_seven_days_or_the_overdue_part_of_a_short_lifetime() -> None:
    """Issue 13's overview lists certificates expiring within 7 days; for the default 24 h agent certificates,
    renewed at two thirds of their life, only the ones whose renewal is overdue (under 30 % left)."""
    day = dt.timedelta(days=1)
    assert domain.cert_warning_window(90 * day) == 7 * day
    assert domain.cert_warning_window(day) == dt.timedelta(hours=7.2)
    assert domain.cert_warning_window(day) < day / 3  # a healthy agent (a third left at renewal) is never listed
    assert domain.cert_warning_window(30 * day) == 7 * day
