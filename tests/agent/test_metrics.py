"""The agent's metrics, scraped over real HTTP from a real server and checked with the real promtool.

Every value asserted here is one the test caused (VM rows in a real SQLite store, action and heartbeat
events) or one it reads from the same source independently (statvfs, /proc/meminfo).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from nkudo.agent.metrics import (
    ACTION_BUCKETS,
    HEARTBEAT_BUCKETS,
    AgentMetrics,
    MetricsServer,
    parse_metrics_addr,
)
from nkudo.agent.state import StateStore
from nkudo.errors import HostError, ValidationError
from nkudo.vmstate import VmStatus
from tests.conftest import skip_or_fail

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

#: The names (families) the agent must expose, and nothing else: the Go original's, plus build info.
EXPECTED_FAMILIES = {
    "nkudo_vms_total": ("gauge", {"state"}),
    "nkudo_vm_cpu_cores": ("gauge", {"vm_id", "vm_name"}),
    "nkudo_vm_memory_bytes": ("gauge", {"vm_id", "vm_name"}),
    "nkudo_actions_executed": ("counter", {"action_type", "status"}),
    "nkudo_actions_duration_seconds": ("histogram", {"action_type"}),
    "nkudo_heartbeats_sent": ("counter", set()),
    "nkudo_heartbeat_duration_seconds": ("histogram", set()),
    "nkudo_heartbeat_failures": ("counter", set()),
    "nkudo_disk_usage_bytes": ("gauge", {"path"}),
    "nkudo_disk_total_bytes": ("gauge", {"path"}),
    "nkudo_host_cpu_usage_percent": ("gauge", set()),
    "nkudo_host_memory_usage_bytes": ("gauge", set()),
    "nkudo_build_info": ("gauge", {"version", "python"}),
}

#: promtool's naming lint flags the seed's own name (a gauge ending in _total); the issue fixes the name
#: and the type, so this one lint finding is expected and every other finding fails the test.
ACCEPTED_LINT = 'nkudo_vms_total non-counter metrics should not have "_total" suffix'


def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        return r.read().decode(), r.headers["Content-Type"]


def samples_of(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def run_promtool(text: str) -> None:
    """``promtool check metrics`` must parse the exposition and find no problem but the accepted one."""
    promtool = shutil.which("promtool")
    if promtool is None:
        print("SKIP promtool check: promtool not installed (bash scripts/ci-promtool.sh installs it)")
        skip_or_fail("promtool not installed (bash scripts/ci-promtool.sh installs it)")
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    problems = [ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    # promtool exits 1 for an unparsable exposition, 3 for lint findings only, 0 when clean.
    assert p.returncode in (0, 3), f"promtool rejected the exposition (rc={p.returncode}): {problems}"
    findings = [ln for ln in problems if ln != "All checks passed!"]
    assert findings in ([], [ACCEPTED_LINT]), findings
    assert (p.returncode == 3) == bool(findings)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(str(tmp_path / "state"))
    yield s
    s.close()


@pytest.fixture
def served() -> Iterator[list[MetricsServer]]:
    servers: list[MetricsServer] = []
    yield servers
    for s in servers:
        s.stop()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------ the full scrape


def test_scrape_reports_exactly_what_happened(
    tmp_path: Path, store: StateStore, served: list[MetricsServer]
) -> None:
    rd = str(tmp_path / "vms")
    vms = [
        ("vm-a", "web-1", {"vcpus": 2, "memory_mib": 512}, VmStatus.RUNNING),
        ("vm-b", "web-2", {"vcpus": 4, "memory_mib": 2048}, VmStatus.RUNNING),
        ("vm-c", "db", {"vcpus": 1, "memory_mib": 1024}, VmStatus.STOPPED),
        ("vm-d", "cache", {"vcpus": 1, "memory_mib": 256}, VmStatus.PAUSED),
        ("vm-e", "batch", {"vcpus": 8, "memory_mib": 8192}, VmStatus.CRASHED),
        ("vm-f", "gone", {"vcpus": 16, "memory_mib": 16384}, VmStatus.DELETED),
        ("vm-g", "new", {"vcpus": 3, "memory_mib": 768}, VmStatus.CREATING),
    ]
    for vm_id, name, spec, status in vms:
        store.insert_vm(vm_id, name, spec, rd, status)
    # A status change after insertion is what the scrape must see (scrape time, not insert time).
    store.update_vm("vm-g", status=VmStatus.CREATED)

    state_dir, missing = tmp_path / "state", tmp_path / "not" / "yet" / "created"
    m = AgentMetrics(store, [str(state_dir), str(missing), str(state_dir)], version="9.8.7")

    create_durations = [0.004, 0.2, 1.5, 45.0]
    for d in create_durations:
        m.action_finished("MicroVMCreate", "SUCCEEDED", d)
    m.action_finished("MicroVMCreate", "FAILED", 0.3)
    m.action_finished("MicroVMStop", "TIMED_OUT", 30.0)
    m.action_finished("MicroVMStop", "SUCCEEDED", None)  # counted, not timed
    m.action_finished("MicroVMStart", "NOT_RUN", None)  # never ran: not counted
    m.action_finished("MicroVMCreate", "SUCCEEDED", 9.0, replayed=True)  # already counted before
    hb_ok = [0.02, 0.03, 0.3]
    for d in hb_ok:
        m.heartbeat_sent(d)
    m.heartbeat_failed(12.5)
    m.heartbeat_failed()

    srv = m.serve("127.0.0.1:0")
    assert srv is not None
    served.append(srv)
    assert srv.port > 0 and srv.host == "127.0.0.1"
    text, ctype = scrape(f"http://127.0.0.1:{srv.port}/metrics")
    assert ctype.startswith("text/plain; version=0.0.4")
    s = samples_of(text)

    # Families: exactly the expected names, types and label sets; no *_created or process_* extras.
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(fams) == set(EXPECTED_FAMILIES)
    for name, (mtype, labels) in EXPECTED_FAMILIES.items():
        assert fams[name].type == mtype, name
        for smp in fams[name].samples:
            assert set(smp.labels) - {"le"} == labels, (name, smp.labels)
    assert "# HELP nkudo_vms_total Total number of VMs by state\n# TYPE nkudo_vms_total gauge\n" in text

    # VMs by state: every VmStatus, lower-cased, zeros included.
    expected_states = dict.fromkeys((st.value.lower() for st in VmStatus), 0.0)
    expected_states.update(running=2, stopped=1, paused=1, crashed=1, deleted=1, created=1)
    got_states = {dict(k[1])["state"]: v for k, v in s.items() if k[0] == "nkudo_vms_total"}
    assert got_states == expected_states

    # Per-VM gauges: every VM but the DELETED one.
    got_cpu = {
        dict(k[1])["vm_id"]: (dict(k[1])["vm_name"], v) for k, v in s.items() if k[0] == "nkudo_vm_cpu_cores"
    }
    got_mem = {dict(k[1])["vm_id"]: v for k, v in s.items() if k[0] == "nkudo_vm_memory_bytes"}
    live = [v for v in vms if v[3] is not VmStatus.DELETED]
    assert got_cpu == {vm_id: (name, spec["vcpus"]) for vm_id, name, spec, _ in live}
    assert got_mem == {vm_id: spec["memory_mib"] * 2**20 for vm_id, _, spec, _ in live}
    assert val(s, "nkudo_vm_memory_bytes", vm_id="vm-b", vm_name="web-2") == 2048 * 1024 * 1024

    # Actions: counters by (type, lower-cased status); NOT_RUN and replayed absent.
    got_actions = {
        (dict(k[1])["action_type"], dict(k[1])["status"]): v
        for k, v in s.items()
        if k[0] == "nkudo_actions_executed_total"
    }
    assert got_actions == {
        ("MicroVMCreate", "succeeded"): 4,
        ("MicroVMCreate", "failed"): 1,
        ("MicroVMStop", "timed_out"): 1,
        ("MicroVMStop", "succeeded"): 1,
    }
    # Action histogram: MicroVMCreate observed 5 (4 ok + 1 failed), Stop once (the None was not timed).
    assert val(s, "nkudo_actions_duration_seconds_count", action_type="MicroVMCreate") == 5
    assert val(s, "nkudo_actions_duration_seconds_sum", action_type="MicroVMCreate") == pytest.approx(
        sum(create_durations) + 0.3
    )
    assert val(s, "nkudo_actions_duration_seconds_count", action_type="MicroVMStop") == 1
    assert val(s, "nkudo_actions_duration_seconds_sum", action_type="MicroVMStop") == pytest.approx(30.0)
    assert ("nkudo_actions_duration_seconds_count", frozenset({("action_type", "MicroVMStart")})) not in s
    observed = [*create_durations, 0.3]
    for le in ACTION_BUCKETS:
        got = val(s, "nkudo_actions_duration_seconds_bucket", action_type="MicroVMCreate", le=repr(le))
        assert got == sum(1 for d in observed if d <= le), le
    assert val(s, "nkudo_actions_duration_seconds_bucket", action_type="MicroVMCreate", le="+Inf") == 5

    # Heartbeats: 3 sent, 2 failed; the histogram holds every attempt that had a duration (4).
    assert val(s, "nkudo_heartbeats_sent_total") == 3
    assert val(s, "nkudo_heartbeat_failures_total") == 2
    assert val(s, "nkudo_heartbeat_duration_seconds_count") == 4
    assert val(s, "nkudo_heartbeat_duration_seconds_sum") == pytest.approx(sum(hb_ok) + 12.5)
    for le in HEARTBEAT_BUCKETS:
        got = val(s, "nkudo_heartbeat_duration_seconds_bucket", le=repr(le))
        assert got == sum(1 for d in [*hb_ok, 12.5] if d <= le), le

    # Disks: one series per distinct path; the missing path reports the file system it will land on.
    disk_paths = {dict(k[1])["path"] for k in s if k[0] == "nkudo_disk_total_bytes"}
    assert disk_paths == {str(state_dir), str(missing)}
    for p in (state_dir, missing):
        st = os.statvfs(state_dir)  # missing's nearest existing ancestor is tmp_path: same file system
        assert val(s, "nkudo_disk_total_bytes", path=str(p)) == st.f_blocks * st.f_frsize
        used_now = (st.f_blocks - st.f_bfree) * st.f_frsize
        # Used bytes move with whatever else writes to this file system between scrape and statvfs.
        assert abs(val(s, "nkudo_disk_usage_bytes", path=str(p)) - used_now) < 256 * 2**20
        assert (
            0 < val(s, "nkudo_disk_usage_bytes", path=str(p)) <= val(s, "nkudo_disk_total_bytes", path=str(p))
        )

    # Host: memory = MemTotal - MemAvailable (as /proc/meminfo says now), CPU a percentage.
    meminfo = {
        ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
    }
    mem_used = val(s, "nkudo_host_memory_usage_bytes")
    assert 0 < mem_used < meminfo["MemTotal"]
    assert abs(mem_used - (meminfo["MemTotal"] - meminfo["MemAvailable"])) < 512 * 2**20
    assert 0.0 <= val(s, "nkudo_host_cpu_usage_percent") <= 100.0

    # Build info.
    assert val(s, "nkudo_build_info", version="9.8.7", python=sys.version.split()[0]) == 1

    # render() is the same exposition (modulo the host/disk gauges that move between calls).
    assert {k[0] for k in samples_of(m.render().decode())} == {k[0] for k in s}

    run_promtool(text)


def test_host_cpu_reflects_load_between_scrapes(served: list[MetricsServer]) -> None:
    m = AgentMetrics(None, [], version="0")
    srv = m.serve("127.0.0.1:0")
    assert srv is not None
    served.append(srv)
    scrape(srv.url)  # start a fresh measuring window
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # keep one core busy for the whole window
        pass
    cpu = val(samples_of(scrape(srv.url)[0]), "nkudo_host_cpu_usage_percent")
    # One busy core of os.cpu_count() is at least 100/n percent; allow for scheduling noise.
    assert 100.0 / (os.cpu_count() or 1) * 0.5 < cpu <= 100.0


def test_without_store_vm_series_are_absent_but_families_present() -> None:
    text = AgentMetrics(None, [], version="0").render().decode()
    s = samples_of(text)
    assert not [k for k in s if k[0].startswith(("nkudo_vm", "nkudo_disk"))]
    assert "# TYPE nkudo_vms_total gauge" in text and "# TYPE nkudo_vm_cpu_cores gauge" in text
    run_promtool(text)


def test_unreadable_store_fails_the_vm_series_not_the_scrape(
    store: StateStore, served: list[MetricsServer]
) -> None:
    store.insert_vm("vm-1", "x", {"vcpus": 1, "memory_mib": 64}, "/tmp", VmStatus.RUNNING)
    m = AgentMetrics(store, [], version="0")
    m.heartbeat_sent(0.1)
    srv = m.serve("127.0.0.1:0")
    assert srv is not None
    served.append(srv)
    assert val(samples_of(scrape(srv.url)[0]), "nkudo_vms_total", state="running") == 1
    store.close()  # list_vms now raises sqlite3.ProgrammingError
    s = samples_of(scrape(srv.url)[0])
    assert not [k for k in s if k[0].startswith(("nkudo_vms_total", "nkudo_vm_"))]  # absent, not a false 0
    assert val(s, "nkudo_heartbeats_sent_total") == 1


def test_malformed_spec_gives_no_per_vm_series(store: StateStore) -> None:
    store.insert_vm("vm-1", "odd", {"vcpus": "two"}, "/tmp", VmStatus.RUNNING)
    store.insert_vm("vm-2", "ok", {"vcpus": 2, "memory_mib": 128}, "/tmp", VmStatus.STOPPED)
    s = samples_of(AgentMetrics(store, [], version="0").render().decode())
    assert {dict(k[1])["vm_id"] for k in s if k[0] == "nkudo_vm_cpu_cores"} == {"vm-2"}
    assert {dict(k[1])["vm_id"] for k in s if k[0] == "nkudo_vm_memory_bytes"} == {"vm-2"}
    assert val(s, "nkudo_vms_total", state="running") == 1


# ---------------------------------------------------------------------------------- events


def test_unknown_action_status_is_a_bug_not_a_new_series() -> None:
    m = AgentMetrics(None, [], version="0")
    with pytest.raises(ValueError, match="unknown action status"):
        m.action_finished("MicroVMCreate", "DONE", 1.0)
    assert "nkudo_actions_executed_total{" not in m.render().decode()


def test_observe_outcome_uses_the_executor_fields() -> None:
    from nkudo.agent.executor import Outcome
    from nkudo.agent.plan import parse_action

    m = AgentMetrics(None, [], version="0")
    action = parse_action({"action_id": "op-1", "type": "MicroVMPause", "params": {"vm_id": "vm-1"}})

    def outcome(status: str, started: float, ended: float, replayed: bool = False) -> Outcome:
        o = Outcome(action, status)
        o.started_at, o.ended_at, o.replayed = started, ended, replayed
        return o

    m.observe_outcome(outcome("SUCCEEDED", 100.0, 100.25))
    m.observe_outcome(outcome("SUCCEEDED", 100.0, 100.25, replayed=True))
    m.observe_outcome(outcome("NOT_RUN", 100.0, 100.0))
    s = samples_of(m.render().decode())
    assert val(s, "nkudo_actions_executed_total", action_type="MicroVMPause", status="succeeded") == 1
    assert val(s, "nkudo_actions_duration_seconds_sum", action_type="MicroVMPause") == pytest.approx(0.25)


def test_counting_is_exact_under_concurrency() -> None:
    m = AgentMetrics(None, [], version="0")
    n_threads, per_thread = 8, 500

    def work() -> None:
        for _ in range(per_thread):
            m.action_finished("MicroVMStart", "SUCCEEDED", 0.001)
            m.heartbeat_sent(0.001)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = samples_of(m.render().decode())
    total = n_threads * per_thread
    assert val(s, "nkudo_actions_executed_total", action_type="MicroVMStart", status="succeeded") == total
    assert val(s, "nkudo_actions_duration_seconds_count", action_type="MicroVMStart") == total
    assert val(s, "nkudo_heartbeats_sent_total") == total


def test_two_agents_do_not_share_metrics_or_the_global_registry() -> None:
    from prometheus_client import REGISTRY, generate_latest

    a, b = AgentMetrics(None, [], version="a"), AgentMetrics(None, [], version="b")
    a.heartbeat_sent(0.1)
    assert val(samples_of(a.render().decode()), "nkudo_heartbeats_sent_total") == 1
    assert val(samples_of(b.render().decode()), "nkudo_heartbeats_sent_total") == 0
    assert b"nkudo_" not in generate_latest(REGISTRY)


# ---------------------------------------------------------------------------------- server


def test_openmetrics_negotiation(served: list[MetricsServer]) -> None:
    m = AgentMetrics(None, [], version="1")
    m.heartbeat_sent(0.5)
    srv = m.serve("127.0.0.1:0")
    assert srv is not None
    served.append(srv)
    text, ctype = scrape(srv.url, accept="application/openmetrics-text;version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    fams = {f.name: f for f in parse_openmetrics(text)}  # type: ignore[no-untyped-call]
    assert fams["nkudo_heartbeats_sent"].type == "counter"
    assert [smp.value for smp in fams["nkudo_heartbeats_sent"].samples] == [1]
    assert fams["nkudo_build"].type == "info"
    assert "_created" not in text


def test_only_metrics_path_and_stop_frees_the_port(served: list[MetricsServer]) -> None:
    m = AgentMetrics(None, [], version="1")
    srv = m.serve("127.0.0.1:0")
    assert srv is not None
    port = srv.port
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
    assert ei.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(urllib.request.Request(srv.url, data=b"x", method="POST"), timeout=10)
    assert ei.value.code == 501
    srv.stop()
    srv.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    again = m.serve(f"127.0.0.1:{port}")  # the port is free again
    assert again is not None
    served.append(again)
    assert "nkudo_build_info" in scrape(again.url)[0]


def test_port_in_use_is_a_host_error(served: list[MetricsServer]) -> None:
    m = AgentMetrics(None, [], version="1")
    first = m.serve("127.0.0.1:0")
    assert first is not None
    served.append(first)
    with pytest.raises(HostError) as ei:
        m.serve(f"127.0.0.1:{first.port}")
    assert "--metrics-addr" in ei.value.message and str(first.port) in ei.value.message


def test_all_interfaces_address(served: list[MetricsServer]) -> None:
    srv = AgentMetrics(None, [], version="1").serve(":0")
    assert srv is not None
    served.append(srv)
    assert "nkudo_build_info" in scrape(f"http://127.0.0.1:{srv.port}/metrics")[0]
    if srv.host == "::":  # dual-stack: IPv6 loopback reaches it too
        assert "nkudo_build_info" in scrape(f"http://[::1]:{srv.port}/metrics")[0]


def test_ipv6_loopback_address(served: list[MetricsServer]) -> None:
    if not ipv6_loopback():
        skip_or_fail("this host has no IPv6 loopback")
    srv = AgentMetrics(None, [], version="1").serve("[::1]:0")
    assert srv is not None
    served.append(srv)
    assert srv.host == "::1"
    assert "nkudo_build_info" in scrape(f"http://[::1]:{srv.port}/metrics")[0]


def test_off_serves_nothing() -> None:
    m = AgentMetrics(None, [], version="1")
    assert m.serve("off") is None
    assert m.serve(" OFF ") is None
    assert parse_metrics_addr("off") is None


@pytest.mark.parametrize(
    ("addr", "expected"),
    [
        (":9090", ("", 9090)),
        ("127.0.0.1:9090", ("127.0.0.1", 9090)),
        ("[::1]:9090", ("::1", 9090)),
        ("[::]:0", ("::", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("localhost:9100", ("localhost", 9100)),
        ("edge-1.example.internal:9090", ("edge-1.example.internal", 9090)),
    ],
)
def test_valid_addresses(addr: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_addr(addr) == expected


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "9090",
        "on",
        "127.0.0.1",
        "127.0.0.1:",
        ":http",
        ":-1",
        ":65536",
        ":99999",
        ": 9090",
        "::1:9090",
        "[::1]",
        "[::1]9090",
        "[127.0.0.1]:9090",
        "[nothost]:80",
        "1.2.3.400:80",
        "-bad-:80",
        "a..b:80",
        "host name:80",
        "http://127.0.0.1:9090",
    ],
)
def test_invalid_addresses_name_the_flag(addr: str) -> None:
    m = AgentMetrics(None, [], version="1")
    with pytest.raises(ValidationError) as ei:
        m.serve(addr)
    assert ei.value.field == "--metrics-addr"
    assert "--metrics-addr" in ei.value.message
    assert ei.value.code == "INVALID_ARGUMENT"


def test_cli_startup_does_not_import_prometheus_or_psutil() -> None:
    code = (
        "import sys, nkudo.cli.entry, nkudo.agent.state, nkudo.agent.executor\n"
        "print(sorted(m for m in ('prometheus_client', 'psutil') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
