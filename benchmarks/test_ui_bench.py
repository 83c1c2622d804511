"""Issue 13: what the dashboard costs the control plane, measured against the heartbeat ingest it serves beside.

Two gates, each a comparison within one run on one server (``nkudo-control-plane serve`` as a process, real
TLS, the UI on, on SQLite and on PostgreSQL):

(a) ``test_site_page_render``: a site with 500 agents and 5,000 VMs (10 per agent, reported by the agents'
    own heartbeats, so the rows are the ones the ingest writes). One side is the server rendering
    ``GET /ui/t/{tenant}/sites/{site}`` for an owner's session over a kept-alive connection: the page's first
    screen, as a browser gets it: the site's health and reasons, the first page of 100 agents (with host facts
    of all 500 hosts looked up), the first page of 100 VMs (of 5,000, ordered by VM id, with a "next page"
    link) and the filter forms. The other side is one heartbeat interval's ingest: every one of the 500 agents
    posts one heartbeat (host facts + its 10 VMs) over its own mTLS keep-alive connection, all at once, from
    a load-generator process (this file run as a script). Both sides are interleaved round by round
    (``time_sides``), each checks its result (200 with the expected rows; 500 heartbeats answered 200), and
    for each call the server process's CPU time is read (``/proc/<pid>/task/*/schedstat``, every thread).
    Gate: the median server CPU of one render is under ``RENDER_SHARE`` of the median server CPU of one
    ingest round: "renders on the server in under 10 % of the time the ingest takes", with the server's own
    time on both sides. Why CPU and not wall time: the ingest round's wall time also contains the load
    generator's 500 TLS clients competing for the same two cores (about half of it), which would flatter the
    ratio, and wall time is what other processes on a shared machine disturb most. Wall times of both sides
    are recorded next to it. On PostgreSQL the database's own processes are in neither side's CPU figure
    (the ingest loses more of its time there than the render, so the ratio is, if anything, pessimistic).

(b) ``test_ingest_with_dashboard_clients``: the heartbeat ingest gate of ``test_cp_bench`` (48 agents for 12 s,
    its load generator unchanged) run twice on the same server: without dashboard clients, and with 50
    "browsers" connected. A browser here is an aiohttp client holding what a browser tab on the dashboard
    holds: the overview's SSE stream and a plan page's SSE stream (the plan is leased and running), with the
    browser's own session cookie (50 logins through the real form). They stand in for Chromium because 50
    headless tabs would take the two cores the measurement needs; what the server does per client (a feed
    subscription, a debounced re-render through the use cases per change burst, keepalives, session checks)
    is the same. Gate: with the clients connected the ingest still meets the ingest gate's rate limit
    (>= 1000 heartbeats/s) without errors, and every overview stream received live updates during the load
    (the clients were really being served) and none ended. Both rates and both p99 latencies are recorded;
    the p99 is not gated here: on a shared 2-core machine the durable-PostgreSQL p99 of the run *without*
    clients already crosses the ingest gate's 200 ms at times, which says nothing about the dashboard.

Run: .venv/bin/pytest -q benchmarks/test_ui_bench.py -s
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks.conftest import Benchmark, GateRunFailed, checked, record, time_sides, time_window
from benchmarks.test_cp_bench import HB_AGENTS, HB_SECONDS, LIMITER, REPO, _run_generator, _setup, _teardown

SITE_AGENTS = 500
VMS_PER_AGENT = 10
#: Gate (a): the site page's server render takes less than this share of one 500-agent heartbeat round.
RENDER_SHARE = 0.10
RENDER_ROUNDS = 10
#: Gate (b): dashboard clients (each: the overview stream + a plan page's stream) during the ingest run.
BROWSERS = 50
#: The ingest gate's rate limit (benchmarks/test_cp_bench.py::test_heartbeat_ingest); its p99 limit, reported.
INGEST_RATE = 1000.0
INGEST_P99_MS = 200.0
#: The dashboard signs everyone in from 127.0.0.1 here: the LOGIN class is raised out of the way.
LOGIN_LIMIT = ["--rate-limit-login", "6000/min:1000"]
_VM_ROW = re.compile(r'<th scope="row"><a href="/ui/t/[0-9a-f-]+/sites/[0-9a-f-]+/vms/vm-')
_AGENT_TABLE = re.compile(r'<table id="agents">.*?<tbody>(.*?)</tbody>', re.S)


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` (schedstat: nanoseconds; ``/proc/<pid>/stat`` ticks are too coarse
    for a 20 ms render)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 1e9


def _facts() -> dict[str, Any]:
    return {"cpu_cores": 32, "memory_total_bytes": 128 << 30, "storage_total_bytes": 4 << 40,
            "disks": [{"mountpoint": "/", "total_bytes": 4 << 40, "free_bytes": 3 << 40}], "os": "linux",
            "arch": "amd64", "kernel": "6.1.0-18-amd64", "kvm_available": True, "cloud_hypervisor_available": True}


def _site_vms(i: int, seq: int) -> list[dict[str, Any]]:
    """Agent ``i``'s 10 VMs; one VM in 50 changes state per round (as a real site's do now and then)."""
    return [{"vm_id": f"vm-{i:03d}-{j}", "name": f"web-{i}-{j}",
             "state": "STOPPED" if (i * VMS_PER_AGENT + j + seq) % 50 == 0 else "RUNNING",
             "vcpus": 2, "memory_mib": 2048} for j in range(VMS_PER_AGENT)]


# --- helper processes (this file run as a script) ---------------------------------------------------------------


async def _rounds(spec: dict[str, Any]) -> None:
    """Heartbeat rounds on command: each ``round`` line on stdin makes every agent post one heartbeat, all at
    once; one JSON line per round answers (wall seconds, 200s, other statuses). Connections stay open between
    rounds, as agents' do between intervals."""
    import aiohttp

    loop = asyncio.get_running_loop()
    sessions = []
    for a in spec["agents"]:
        ctx = ssl.create_default_context(cafile=spec["ca"])
        ctx.load_cert_chain(a["cert"], a["key"])
        sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=1, keepalive_timeout=600)))
    facts = _facts()
    seq = 0

    async def beat(i: int, s: aiohttp.ClientSession) -> int:
        body = {"heartbeat_seq": seq, "agent_version": "1.0.0", "host_facts": facts, "vms": _site_vms(i, seq)}
        async with s.post(f"{spec['url']}/v1/heartbeat", json=body) as r:
            await r.read()
            return r.status

    try:
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "round":
            seq += 1
            t0 = time.perf_counter()
            statuses = await asyncio.gather(*(beat(i, s) for i, s in enumerate(sessions)), return_exceptions=True)
            elapsed = time.perf_counter() - t0
            ok = sum(1 for st in statuses if st == 200)
            sys.stdout.write(json.dumps({"elapsed": elapsed, "ok": ok, "other": [repr(st) for st in statuses
                                                                                 if st != 200][:5]}) + "\n")
            sys.stdout.flush()
    finally:
        for s in sessions:
            await s.close()


async def _browsers(spec: dict[str, Any]) -> None:
    """The dashboard clients: per cookie, the overview stream and the plan stream, read to the end. Prints
    ``{"ready": ...}`` once every stream answered (with the statuses), then on ``mark`` remembers the event
    counts, and on ``stop`` prints the counts since the mark and which streams ended."""
    import aiohttp

    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(cafile=spec["ca"])
    paths = spec["paths"]
    n = len(spec["cookies"]) * len(paths)
    events = [0] * n
    ended = [False] * n
    statuses: list[int] = []
    all_open = asyncio.Event()
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx),
                                      headers={"Cookie": cookie, "Accept": "text/event-stream"},
                                      timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
                for cookie in spec["cookies"]]

    async def stream(k: int, s: aiohttp.ClientSession, path: str) -> None:
        try:
            async with s.get(spec["url"] + path) as r:
                statuses.append(r.status)
                if len(statuses) == n:
                    all_open.set()
                while line := await r.content.readline():
                    if line.startswith(b"event:"):
                        events[k] += 1
        except aiohttp.ClientError:
            pass
        ended[k] = True

    tasks = [asyncio.create_task(stream(k, s, path))
             for k, (s, path) in enumerate((s, p) for s in sessions for p in paths)]
    await asyncio.wait_for(all_open.wait(), 60)
    sys.stdout.write(json.dumps({"ready": sorted(set(statuses))}) + "\n")
    sys.stdout.flush()
    mark = list(events)
    while (line := (await loop.run_in_executor(None, sys.stdin.readline)).strip()) not in ("stop", ""):
        if line == "mark":
            mark = list(events)
    out = {"events": [e - m for e, m in zip(events, mark, strict=True)], "ended": ended, "paths": paths}
    for t in tasks:
        t.cancel()
    for s in sessions:
        await s.close()
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def _helper_main() -> None:
    spec = json.loads(sys.stdin.readline())
    asyncio.run(_rounds(spec) if spec["mode"] == "rounds" else _browsers(spec))


class Helper:
    """One helper process (``_rounds`` or ``_browsers``) spoken to a line at a time."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.test_ui_bench"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        self.say(json.dumps(spec))

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            assert self.proc.stderr is not None
            raise GateRunFailed(f"helper exited {self.proc.returncode}: {self.proc.stderr.read()[-3000:]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def ask(self, line: str) -> dict[str, Any]:
        self.say(line)
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(30)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                self.proc.wait()


# --- the test's side ---------------------------------------------------------------------------------------------


def _owner_cookies(srv: Any, tenant: Any, n: int) -> list[str]:
    """``n`` signed-in sessions of one new owner of the tenant (the real CLI, the real login form)."""
    from tests.cp.web.conftest import Dashboard, User

    owner = Dashboard(srv, User("", "")).user(tenant, "owner")
    cookies = []
    for _ in range(n):
        browser = Dashboard(srv, User("", "")).browser()
        browser.login(owner)
        cookies.append("; ".join(f"{k}={v}" for k, v in browser.cookies.items()))
    return cookies


class KeptAlive:
    """GETs of dashboard pages over one TLS connection with a session cookie (as a browser tab makes them)."""

    def __init__(self, srv: Any, cookie: str) -> None:
        self.conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=60,
                                                context=ssl.create_default_context(cafile=str(srv.ca_file)))
        self.cookie = cookie

    def get(self, path: str) -> tuple[int, str]:
        self.conn.request("GET", path, headers={"Cookie": self.cookie, "User-Agent": "nkudo-bench/1"})
        r = self.conn.getresponse()
        return r.status, r.read().decode()

    def close(self) -> None:
        self.conn.close()


def _server_cpu(pid: int, fn: Callable[[], Any], into: list[float]) -> Callable[[], Any]:
    """``fn`` that also appends the server's CPU seconds during each call to ``into``."""

    def run() -> Any:
        c0 = _cpu_seconds(pid)
        out = fn()
        into.append(_cpu_seconds(pid) - c0)
        return out

    return run


def _site_page_ok(result: tuple[int, str]) -> bool:
    """200, 100 VM rows and a next page, 100 agent rows (of 500), the health section."""
    status, body = result
    agents = _AGENT_TABLE.search(body)
    return (status == 200 and len(_VM_ROW.findall(body)) == 100 and 'rel="next"' in body
            and 'id="site-status"' in body and agents is not None and agents.group(1).count("<tr>") == 100)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if s else 0.0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_site_page_render(backend: str, tmp_path: Path, benchmark: Benchmark) -> None:
    """Gate (a): site page render (500 agents, 5,000 VMs) < 10 % of one 500-agent heartbeat round."""
    handles, tenant, agents = _setup(backend, tmp_path, SITE_AGENTS, [*LIMITER["off"], *LOGIN_LIMIT])
    srv = handles[0]
    rounds = tab = None
    try:
        rounds = Helper({"mode": "rounds", "url": srv.url, "ca": str(srv.ca_file), "agents": agents})
        first = rounds.ask("round")  # the first heartbeat of each agent reports its VMs: the site is seeded
        if first["ok"] != SITE_AGENTS:
            raise GateRunFailed(f"seeding round: {first}")
        vms = tenant.client.call("GET", f"/sites/{tenant.site_id}/vms?limit=1000")
        tab = KeptAlive(srv, _owner_cookies(srv, tenant, 1)[0])
        path = f"/ui/t/{tenant.tenant_id}/sites/{tenant.site_id}"
        cpu: dict[str, list[float]] = {"render": [], "ingest": []}
        pid = srv.proc.pid
        ingest = checked(lambda: rounds.ask("round"), lambda out: out["ok"] == SITE_AGENTS,
                         f"a heartbeat round of {SITE_AGENTS} agents")
        render = checked(lambda: tab.get(path), _site_page_ok, "site page with 100 VM and 100 agent rows")
        timings = time_sides(benchmark, {"render": _server_cpu(pid, render, cpu["render"]),
                                         "ingest": _server_cpu(pid, ingest, cpu["ingest"])},
                             primary="render", rounds=RENDER_ROUNDS, warmup_rounds=2)
        page_bytes = len(tab.get(path)[1])
    finally:
        if tab is not None:
            tab.close()
        if rounds is not None:
            rounds.close()
        _teardown(handles)
    wall_ratio = timings["render"].median / timings["ingest"].median
    render_cpu, ingest_cpu = _median(cpu["render"][-RENDER_ROUNDS:]), _median(cpu["ingest"][-RENDER_ROUNDS:])
    ratio = render_cpu / ingest_cpu
    record(benchmark, f"ui_site_page_render_{backend}", agents=SITE_AGENTS, vms=SITE_AGENTS * VMS_PER_AGENT,
           page="site status + first 100 of 500 agents + first 100 of 5,000 VMs", page_bytes=page_bytes,
           render_ms=timings["render"].median_ms, render_p99_ms=round(timings["render"].p99 * 1e3, 2),
           ingest_round_ms=timings["ingest"].median_ms,
           render_server_cpu_ms=round(render_cpu * 1e3, 2), ingest_round_server_cpu_ms=round(ingest_cpu * 1e3, 2),
           ratio=round(ratio, 4), wall_ratio=round(wall_ratio, 4), limit_ratio=RENDER_SHARE, rounds=RENDER_ROUNDS,
           vms_listed_via_api_first_page=len(vms["vms"]))  # fmt: skip
    assert len(vms["vms"]) == 1000 and vms.get("next"), "the site was not seeded with 5,000 VMs"
    assert ratio < RENDER_SHARE, (f"site page: {render_cpu * 1e3:.1f} ms server CPU = {ratio:.1%} of a heartbeat "
                                  f"round's {ingest_cpu * 1e3:.1f} ms (limit {RENDER_SHARE:.0%})")


def _ingest(srv: Any, agents: list[dict[str, str]]) -> dict[str, Any]:
    out = _run_generator({"mode": "heartbeat", "url": srv.url, "ca": str(srv.ca_file), "agents": agents,
                          "seconds": HB_SECONDS}, timeout=HB_SECONDS + 120)
    lat = out["latencies"]
    out["rate"] = out["count"] / out["elapsed"]
    out["p99_ms"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_ingest_with_dashboard_clients(backend: str, tmp_path: Path, benchmark: Benchmark) -> None:
    """Gate (b): the heartbeat ingest gate holds with 50 dashboard clients connected; both rates reported."""
    handles, tenant, agents = _setup(backend, tmp_path, HB_AGENTS, [*LIMITER["off"], *LOGIN_LIMIT])
    srv = handles[0]
    browsers = None
    try:
        plan = tenant.plan([{"type": "CommandExecute", "params": {"command": "/bin/true"}}])
        cookies = _owner_cookies(srv, tenant, BROWSERS)
        cpu0 = _cpu_seconds(srv.proc.pid)
        alone = _ingest(srv, agents)
        cpu_alone = _cpu_seconds(srv.proc.pid) - cpu0
        paths = [f"/ui/t/{tenant.tenant_id}/events/overview", f"/ui/t/{tenant.tenant_id}/events/plans/{plan['plan_id']}"]
        browsers = Helper({"mode": "browsers", "url": srv.url, "ca": str(srv.ca_file), "cookies": cookies,
                           "paths": paths})
        ready = browsers.answer()
        if ready["ready"] != [200]:
            raise GateRunFailed(f"dashboard streams answered {ready['ready']}")
        time.sleep(1.0)  # the streams' first renders are done: the load alone is measured
        browsers.say("mark")
        cpu1 = _cpu_seconds(srv.proc.pid)
        shared, load_run_s = time_window(benchmark, lambda: _ingest(srv, agents))
        cpu_shared = _cpu_seconds(srv.proc.pid) - cpu1
        seen = browsers.ask("stop")
        plan_now = tenant.client.call("GET", f"/plans/{plan['plan_id']}")
    finally:
        if browsers is not None:
            browsers.close()
        _teardown(handles)
    n = len(paths)
    overview_events = seen["events"][0::n]
    plan_events = seen["events"][1::n]
    record(benchmark, f"ui_ingest_with_{BROWSERS}_browsers_{backend}", browsers=BROWSERS,
           streams_per_browser="overview + plan page", agents=HB_AGENTS, seconds=HB_SECONDS,
           rate_alone_per_s=round(alone["rate"], 1), rate_with_browsers_per_s=round(shared["rate"], 1),
           rate_ratio=round(shared["rate"] / alone["rate"], 3),
           p99_alone_ms=round(alone["p99_ms"], 2), p99_with_browsers_ms=round(shared["p99_ms"], 2),
           errors_alone=alone["errors"], errors_with_browsers=shared["errors"],
           server_cpu_alone_s=round(cpu_alone, 2), server_cpu_with_browsers_s=round(cpu_shared, 2),
           overview_events_min=min(overview_events), overview_events_total=sum(overview_events),
           plan_events_total=sum(plan_events), streams_ended=sum(seen["ended"]),
           plan_status=plan_now["plan_status"], load_run_s=round(load_run_s, 2),
           limit_rate_per_s=INGEST_RATE, limit_p99_ms=INGEST_P99_MS, cpus=os.cpu_count())  # fmt: skip
    assert alone["errors"] == 0 and shared["errors"] == 0
    assert min(overview_events) >= 1, f"an overview stream got no live update during the load: {overview_events}"
    assert not any(seen["ended"]), "a dashboard stream ended during the load"
    assert shared["rate"] >= INGEST_RATE, (f"{shared['rate']:.0f} heartbeats/s with {BROWSERS} browsers < "
                                           f"{INGEST_RATE:.0f} (without them: {alone['rate']:.0f}/s)")


if __name__ == "__main__":
    _helper_main()
