"""Control-plane throughput: heartbeat ingest and plan fan-out, on SQLite and PostgreSQL.

The load generator is a separate process (this file run as a script) using
keep-alive mTLS connections, one per simulated agent, each with its own
certificate; heartbeats carry host facts and 20 VM summaries. The fixture times
each load run once (:func:`time_window`); the gate figures (rate, latency
percentiles) are measured by the generator itself, per request, and go in
``extra_info``.

Run: .venv/bin/pytest -q benchmarks/test_cp_bench.py -s
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import skip_or_fail

from benchmarks.conftest import (
    Benchmark,
    GateRunFailed,
    checked,
    record,
    time_alongside,
    time_sides,
    time_window,
)

REPO = Path(__file__).resolve().parents[1]

HB_AGENTS = 48
HB_SECONDS = 12.0
FAN_PLANS = 1000
FAN_ACTIONS = 5
FAN_AGENTS = 100


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _vms(i: int, flip: bool) -> list[dict[str, Any]]:
    return [{"vm_id": f"vm-{i}-{j}", "name": f"vm-{i}-{j}", "state": "STOPPED" if (flip and j == 0) else "RUNNING",
             "vcpus": 2, "memory_mib": 2048} for j in range(20)]


def _facts() -> dict[str, Any]:
    return {"cpu_cores": 32, "memory_total_bytes": 128 << 30, "storage_total_bytes": 4 << 40,
            "disks": [{"mountpoint": "/", "total_bytes": 4 << 40, "free_bytes": 3 << 40}], "os": "linux",
            "arch": "amd64", "kernel": "6.1.0-18-amd64", "kvm_available": True, "cloud_hypervisor_available": True}


# --- load generator (separate process) ---------------------------------------


async def _heartbeat_load(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    url = spec["url"]
    stop_at = time.monotonic() + spec["seconds"]
    lat: list[float] = []
    errors = 0

    async def agent(i: int, a: dict[str, str]) -> None:
        nonlocal errors
        ctx = ssl.create_default_context(cafile=spec["ca"])
        ctx.load_cert_chain(a["cert"], a["key"])
        conn = aiohttp.TCPConnector(ssl=ctx, limit=1, keepalive_timeout=60)
        seq = 0
        async with aiohttp.ClientSession(connector=conn) as s:
            while time.monotonic() < stop_at:
                seq += 1
                # A VM changes state now and then (every ~50th heartbeat), as on a real host.
                body = {"heartbeat_seq": seq, "agent_version": "1.0.0", "host_facts": _facts(),
                        "vms": _vms(i, (seq // 50) % 2 == 1)}
                t0 = time.perf_counter()
                async with s.post(f"{url}/v1/heartbeat", json=body) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                lat.append(time.perf_counter() - t0)

    t0 = time.monotonic()
    await asyncio.gather(*(agent(i, a) for i, a in enumerate(spec["agents"])))
    elapsed = time.monotonic() - t0
    return {"count": len(lat), "errors": errors, "elapsed": elapsed, "latencies": sorted(lat)}


async def _fanout_load(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    url = spec["url"]
    total = spec["total_executions"]
    done: set[str] = set()
    delivered: dict[str, set[str]] = {}
    accepted = 0

    async def agent(a: dict[str, str]) -> None:
        nonlocal accepted
        ctx = ssl.create_default_context(cafile=spec["ca"])
        ctx.load_cert_chain(a["cert"], a["key"])
        conn = aiohttp.TCPConnector(ssl=ctx, limit=1, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=conn) as s:
            idle = 0
            while len(done) < total:
                async with s.post(f"{url}/v1/heartbeat", json={}) as r:
                    hb = await r.json()
                plans = hb["pending_plans"]
                if not plans:
                    idle += 1
                    await asyncio.sleep(min(0.05 * idle, 0.5))
                    continue
                idle = 0
                for p in plans:
                    for act in p["actions"]:
                        delivered.setdefault(act["execution_id"], set()).add(a["id"])
                    results = [{"execution_id": act["execution_id"], "status": "SUCCEEDED"} for act in p["actions"]]
                    async with s.post(f"{url}/v1/executions/result", json={"results": results}) as r:
                        out = await r.json()
                    for o in out["results"]:
                        if o["outcome"] == "accepted":
                            accepted += 1
                            done.add(o["execution_id"])

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(agent(a) for a in spec["agents"])), timeout=spec["timeout"])
    return {"elapsed": time.monotonic() - t0, "accepted": accepted, "executions_done": len(done),
            "double_leased": sum(1 for v in delivered.values() if len(v) > 1)}


def _generator_main() -> None:
    spec = json.loads(sys.stdin.read())
    fn = _heartbeat_load if spec["mode"] == "heartbeat" else _fanout_load
    out = asyncio.run(fn(spec))
    usage = os.times()
    out["cpu_seconds"] = usage.user + usage.system
    sys.stdout.write(json.dumps(out))


# --- benchmark tests ---------------------------------------------------------


def _run_generator(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "benchmarks.test_cp_bench"], input=json.dumps(spec), capture_output=True, text=True,
                       timeout=timeout, check=False, cwd=REPO)
    if r.returncode != 0:
        raise GateRunFailed(f"load generator exited {r.returncode}: {r.stderr[-3000:]}")
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _setup(backend: str, tmp: Path, n_agents: int, extra: list[str]) -> tuple[Any, Any, list[dict[str, str]]]:
    from tests.cp.helpers import Agent, new_tenant, start_server
    from tests.cp.pg import start_cluster

    cluster = None
    url = None
    if backend == "postgres":
        try:
            cluster = start_cluster(durable=True)
        except Exception as exc:
            skip_or_fail(f"PostgreSQL not available: {exc}")
        url = cluster.create_database()
    srv = start_server(tmp / "cp", database_url=url, extra=extra)
    tenant = new_tenant(srv)
    agents = []
    for _ in range(n_agents):
        a = Agent(srv, tmp / "agents").enroll(tenant.token())
        agents.append({"id": a.id, "cert": str(a.dir / "agent.crt"), "key": str(a.dir / "agent.key")})
        a.close()
    return (srv, cluster), tenant, agents


def _teardown(handles: Any) -> None:
    srv, cluster = handles
    srv.stop()
    if cluster is not None:
        cluster.stop()




#: Issue 12: the setup enrolls every agent from one address, so the enroll class is off in both runs. "off"
#: turns every class off; "on" leaves all others at their defaults and sizes the heartbeat class above the
#: generator's ~21 heartbeats/s per agent, so the run measures what the checks cost (the same whether they
#: pass or refuse), not refusals.
LIMITER = {"off": ["--rate-limit-enroll", "0", "--rate-limit-heartbeat", "0", "--rate-limit-agent", "0",
                   "--rate-limit-management", "0", "--rate-limit-default", "0"],
           "on": ["--rate-limit-enroll", "0", "--rate-limit-heartbeat", "100/s:1000"]}
#: Issue 12 gate: the limiter's cost per heartbeat stays under this share of a heartbeat's server CPU time.
LIMITER_BUDGET_PCT = 10.0


def _limiter_cost_us(url: str | None, n_agents: int, n: int = 20000) -> float:
    """Microseconds the rate-limit middleware adds to one heartbeat request, in process.

    The real middleware and limiter (on PostgreSQL with the shared table) run on aiohttp requests whose TLS
    transport reports an agent certificate; the figure is their time minus that of the same requests
    without the middleware (the handler stand-in reads the agent identity, as the real handler does).
    Measured directly because the end-to-end difference of two 12 s runs on a shared machine is noisier
    than the microseconds it is about; both figures are reported.
    """
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from nkudo.cp import http_limits as cphttp
    from nkudo.cp.db import normalise_url
    from nkudo.cp.metrics import Metrics
    from nkudo.cp.ratelimit import DEFAULT_LIMITS, Limit, RouteClass
    from nkudo.cp.ratestore import RateLimiter

    class Transport:
        def __init__(self, i: int) -> None:
            self.info = {"peername": ("127.0.0.1", 40000 + i), "peercert": {
                "subject": ((("commonName", f"00000000-0000-4000-8000-{i:012d}"),),), "serialNumber": f"{i + 1:X}"}}

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return self.info.get(name, default)

        def is_closing(self) -> bool:
            return False

    limiter = RateLimiter({**DEFAULT_LIMITS, RouteClass.HEARTBEAT: Limit(100.0, 1000)}, Metrics(),
                          None if url is None else normalise_url(url))
    app = web.Application()
    app[cphttp.LIMITER_KEY] = limiter

    async def handler(request: web.Request) -> web.StreamResponse:
        cphttp.agent_identity(request)
        return web.Response()

    def requests() -> list[web.Request]:
        return [make_mocked_request("POST", "/v1/heartbeat", app=app, transport=Transport(i % n_agents))
                for i in range(n)]

    async def run() -> float:
        for r in requests()[:n_agents]:  # on PostgreSQL each agent's first check on a replica is exact
            await cphttp.rate_limit_middleware(r, handler)
        plain, limited = requests(), requests()
        t0 = time.perf_counter()
        for r in plain:
            await handler(r)
        t1 = time.perf_counter()
        for r in limited:
            await cphttp.rate_limit_middleware(r, handler)
        t2 = time.perf_counter()
        return max(0.0, (t2 - t1) - (t1 - t0)) / n * 1e6

    try:
        return asyncio.run(run())
    finally:
        limiter.close()


@pytest.mark.slow
@pytest.mark.parametrize("limiter", ["off", "on"])
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_heartbeat_ingest(backend: str, limiter: str, tmp_path: Path, benchmark: Benchmark) -> None:
    """Gates: >= 1000 heartbeats/s with p99 < 200 ms, no errors, 48 agents for 12 s.

    Throughput and a latency distribution of concurrent requests, measured by the
    load generator in another process: not a fixture timing of one call. The
    fixture times the generator's run once (``load_run_s``); rate and percentiles
    come from the generator's own clock over its load window.
    """
    handles, _tenant, agents = _setup(backend, tmp_path, HB_AGENTS, LIMITER[limiter])
    srv = handles[0]
    try:
        cost_us = _limiter_cost_us(srv.database_url, HB_AGENTS) if limiter == "on" else 0.0
        cpu0 = _cpu_seconds(srv.proc.pid)
        out, load_run_s = time_window(benchmark, lambda: _run_generator(
            {"mode": "heartbeat", "url": srv.url, "ca": str(srv.ca_file), "agents": agents, "seconds": HB_SECONDS},
            timeout=HB_SECONDS + 120))  # fmt: skip
        server_cpu = _cpu_seconds(srv.proc.pid) - cpu0
    finally:
        _teardown(handles)
    lat = out["latencies"]
    rate = out["count"] / out["elapsed"]
    p50 = lat[len(lat) // 2] * 1000
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
    server_us = server_cpu / max(1, out["count"]) * 1e6
    limiter_pct = cost_us / server_us * 100 if server_us else 0.0
    record(benchmark, f"cp_heartbeat_ingest_{backend}_limiter_{limiter}", rate_per_s=round(rate, 1),
           p50_ms=round(p50, 2), limiter=limiter, server_cpu_us_per_heartbeat=round(server_us, 1),
           limiter_cost_us=round(cost_us, 2), limiter_cost_pct=round(limiter_pct, 2),
           limit_limiter_cost_pct=LIMITER_BUDGET_PCT,
           p99_ms=round(p99, 2), heartbeats=out["count"], errors=out["errors"], agents=HB_AGENTS,
           vms_per_heartbeat=20, seconds=round(out["elapsed"], 2), load_run_s=round(load_run_s, 2),
           server_cpu_s=round(server_cpu, 2), generator_cpu_s=round(out["cpu_seconds"], 2),
           cpus=os.cpu_count(), limit_rate_per_s=1000, limit_p99_ms=200)  # fmt: skip
    assert out["errors"] == 0
    assert rate >= 1000, f"{rate:.0f} heartbeats/s < 1000"
    assert p99 < 200, f"p99 {p99:.1f} ms >= 200 ms"
    assert limiter_pct < LIMITER_BUDGET_PCT, f"limiter {cost_us:.1f} us = {limiter_pct:.1f} % of {server_us:.0f} us"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_plan_fanout(backend: str, tmp_path: Path, benchmark: Benchmark) -> None:
    """Gate: 1000 plans x 5 actions fan out to 100 agents, each execution leased once and completed.

    The fixture times the lease-and-complete run of the load generator (another
    process, one round: the plans are consumed); creating the plans is timed
    before it with the fixture's clock and reported.
    """
    # Issue 12: 100 enrollments and 1,000 plan submissions from one address and key, and agents polling as
    # fast as they can: far beyond the per-client defaults, so the limits are raised (not turned off).
    handles, tenant, agents = _setup(backend, tmp_path, FAN_AGENTS, [
        "--rate-limit-enroll", "0", "--rate-limit-default", "100/s:5000", "--rate-limit-heartbeat", "100/s:1000",
        "--rate-limit-agent", "100/s:1000"])
    srv = handles[0]
    try:
        actions = [{"type": "CommandExecute", "params": {"command": "/bin/true", "args": [str(k)]}}
                   for k in range(FAN_ACTIONS)]

        def create_plans() -> None:
            for _ in range(FAN_PLANS):
                tenant.plan(actions, key=uuid.uuid4().hex)

        create_s = time_alongside(benchmark, create_plans, rounds=1).median
        out, fanout_s = time_window(benchmark, lambda: _run_generator(
            {"mode": "fanout", "url": srv.url, "ca": str(srv.ca_file), "agents": agents,
             "total_executions": FAN_PLANS * FAN_ACTIONS, "timeout": 300}, timeout=360))  # fmt: skip
        listing = tenant.client.call("GET", f"/sites/{tenant.site_id}/executions?state=SUCCEEDED&limit=1000")
    finally:
        _teardown(handles)
    record(benchmark, f"cp_plan_fanout_{backend}", plans=FAN_PLANS, actions_per_plan=FAN_ACTIONS, agents=FAN_AGENTS,
           create_seconds=round(create_s, 2), lease_and_complete_seconds=round(out["elapsed"], 2),
           load_run_s=round(fanout_s, 2), executions_done=out["executions_done"], accepted=out["accepted"],
           double_leased=out["double_leased"], generator_cpu_s=round(out["cpu_seconds"], 2))  # fmt: skip
    assert out["double_leased"] == 0
    assert out["accepted"] == FAN_PLANS * FAN_ACTIONS == out["executions_done"]
    assert len(listing["executions"]) == 1000


#: Issue 13: a site this large listed in one response took 600 ms; its first page must be this much faster.
PAGE_VMS = 20_000
PAGE_GATE_X = 20.0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_vm_list_first_page(backend: str, tmp_path: Path, benchmark: Benchmark) -> None:
    """Gate (issue 13): ``GET /sites/{id}/vms`` first page of 100 vs every one of 20,000 VMs, same run.

    Before paging the route answered with all 20,000 VMs at once; the closest request today is following
    ``next`` at the maximum limit (1,000) to the end, which reads and encodes the same rows. The first page
    (the default) must be at least ``PAGE_GATE_X`` times faster. Both sides check what they got.
    """
    handles, tenant, agents = _setup(backend, tmp_path, 1, LIMITER["off"])
    try:
        mtls = handles[0].client(cert=(Path(agents[0]["cert"]), Path(agents[0]["key"])))
        for chunk in range(PAGE_VMS // 1000):  # a heartbeat reports at most 1,000 VMs
            vms = [{"vm_id": f"vm-{chunk:02d}-{j:04d}", "name": f"vm-{chunk}-{j}", "state": "RUNNING", "vcpus": 2,
                    "memory_mib": 2048} for j in range(1000)]
            mtls.call("POST", "/v1/heartbeat", {"vms": vms})
        mtls.close()
        path, c = f"/sites/{tenant.site_id}/vms", tenant.client

        def every_vm() -> int:
            out, n = c.call("GET", f"{path}?limit=1000"), 0
            while True:
                n += len(out["vms"])
                if not out.get("next"):
                    return n
                out = c.call("GET", f"{path}?limit=1000&cursor={out['next']}")

        first_page = checked(lambda: c.call("GET", path), lambda out: len(out["vms"]) == 100 and out["next"],
                             "first page of 100 VMs")
        timings = time_sides(benchmark, {"first_page": first_page,
                                         "all": checked(every_vm, lambda n: n == PAGE_VMS, "every VM")},
                             primary="first_page", rounds=5, warmup_rounds=1)
    finally:
        _teardown(handles)
    ratio = timings["all"].median / timings["first_page"].median
    record(benchmark, f"cp_vm_list_first_page_{backend}", vms=PAGE_VMS, first_page_ms=timings["first_page"].median_ms,
           all_vms_ms=timings["all"].median_ms, ratio=round(ratio, 1), gate_x=PAGE_GATE_X)
    assert ratio >= PAGE_GATE_X, f"first page only {ratio:.1f}x faster than listing all {PAGE_VMS} VMs"


if __name__ == "__main__":
    _generator_main()
