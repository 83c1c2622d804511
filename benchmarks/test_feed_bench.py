"""Issue 13: 200 live views on one change feed: their idle cost and how fast a result reaches all of them.

The server is a separate process (this file run as a script): a real control plane (``server.build``: the
migrated SQLite database, the CA, real TLS, the JSON API of ``http.build_app``) plus one SSE route built from
``web.sse.sse_stream`` over the control plane's own ``ChangeFeed``, the way the dashboard's live views are.
Its CPU time is read from ``/proc/<pid>/task/*/schedstat``. The test process holds 200 SSE clients (one aiohttp
``ClientSession``) and the simulated agent, which posts real results to ``POST /v1/executions/result``.

Figures:
  (a) server CPU per second while 200 clients are connected and idle (a keepalive every 3 s, 5x the 15 s
      default's rate, so each stream sends exactly one in the 3 s window) and with 0 clients; gate: the idle cost of 200 views is below the CPU of
      ingesting ``IDLE_BUDGET_HEARTBEATS`` heartbeats, measured on the same server in the same run.
  (b) for 50 results: the time from sending the result POST to its event having arrived at all 200 clients;
      gate: the median fan-out < ``FANOUT_RATIO`` x the median POST itself (the fan-out time includes the
      POST, so the ratio bounds what delivering to 200 browsers adds to the ingest path's own latency); p99s
      are recorded and reported, not gated: the p99 of 50 samples is the single worst one, which on a shared
      2-core machine says more about the neighbours than about the feed.
      The figures are measured from the agent's side: a result sent, an event received by every client.

Run: .venv/bin/pytest -q benchmarks/test_feed_bench.py -s
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

from benchmarks.conftest import Benchmark, GateRunFailed, record, time_window

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 200
RESULTS = 50
WARMUP = 5
IDLE_SECONDS = 3.0
#: = IDLE_SECONDS: every stream sends exactly one keepalive in the idle window (5x the 15 s default's rate).
KEEPALIVE = 3.0
HEARTBEATS = 200
#: Gate (a): 200 idle live views cost less CPU per second than ingesting this many heartbeats.
IDLE_BUDGET_HEARTBEATS = 20
#: Gate (b): fan-out to every client p50 < this x result POST p50. The fan-out time contains the POST (the
#: change is published inside it), and the 200 clients' TLS streams are read by one Python process on the
#: same 2 cores as the server: delivering to all of them costs about one more POST (p50 ratio ~1.9 measured),
#: so 3x leaves room for the tail of a shared machine while a per-client database poll or a blocking publish
#: (tens of ms per client) would fail it by far.
FANOUT_RATIO = 3.0
_MARK = b'data: <tr id="execution-'


def _cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` in nanosecond resolution (``/proc/<pid>/stat`` counts 10 ms ticks,
    too coarse for a 3 s idle window)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
    return total / 1e9


# --- the server (separate process) ---------------------------------------------------------------------------


async def _serve(spec: dict[str, Any]) -> None:
    from aiohttp import web

    from nkudo.cp.config import Settings
    from nkudo.cp.feed import Change
    from nkudo.cp.http import build_app
    from nkudo.cp.ratelimit import DISABLED
    from nkudo.cp.server import build, server_ssl_context
    from nkudo.cp.web.sse import SseEvent, sse_stream

    settings = Settings(data_dir=Path(spec["data_dir"]), listen_host="127.0.0.1", listen_port=spec["port"],
                        admin_key=spec["admin_key"])
    # One address enrolls, submits and opens 200 streams: the limits are turned off (not what is measured).
    settings.rate_limits = dict.fromkeys(settings.rate_limits, DISABLED)
    cp = build(settings)
    app = build_app(cp)

    async def events(request: web.Request) -> web.StreamResponse:
        async def render(ch: Change) -> list[SseEvent]:
            return [SseEvent(ch.kind.value, f'<tr id="{ch.kind.value}-{ch.object_id}">\n<td>{ch.plan_id}</td></tr>')]

        async def allowed() -> bool:
            return True

        return await sse_stream(request, cp.feed.subscribe(request.match_info["tenant_id"]), render,
                                keepalive=spec["keepalive"], still_allowed=allowed)

    app.router.add_get("/bench-events/{tenant_id}", events)
    cert, key = cp.ca.write_server_files(settings.data_dir, settings.server_names)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", spec["port"], backlog=1024,
                      ssl_context=server_ssl_context(cert, key, cp.ca.cert_pem)).start()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    cp.feed.close()
    await runner.cleanup()
    cp.db.close()


# --- the clients (test process) ------------------------------------------------------------------------------


async def _measure(srv: Any, tenant_id: str, agent_dir: Path, pid: int) -> dict[str, Any]:
    import aiohttp

    ca = ssl.create_default_context(cafile=str(srv.ca_file))
    mtls = ssl.create_default_context(cafile=str(srv.ca_file))
    mtls.load_cert_chain(agent_dir / "agent.crt", agent_dir / "agent.key")
    arrivals: dict[str, list[float]] = {}
    waiters: dict[str, asyncio.Future[None]] = {}
    connected = 0
    all_connected = asyncio.get_running_loop().create_future()

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal connected
        async with s.get(f"{srv.url}/bench-events/{tenant_id}") as resp:
            if resp.status != 200:
                raise GateRunFailed(f"SSE stream refused: {resp.status}")
            connected += 1
            if connected == CLIENTS:
                all_connected.set_result(None)
            buf = b""
            while chunk := await resp.content.readany():  # as a browser does: whatever arrived, at once
                now = time.perf_counter()
                buf += chunk
                frames, _, buf = buf.rpartition(b"\n\n")
                for frame in frames.split(b"\n\n"):
                    if (at := frame.find(_MARK)) >= 0:
                        eid = frame[at + len(_MARK):].split(b'"', 1)[0].decode()
                        got = arrivals.setdefault(eid, [])
                        got.append(now)
                        w = waiters.get(eid)
                        if len(got) == CLIENTS and w is not None and not w.done():
                            w.set_result(None)

    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=mtls, limit=1)) as agent:

        async def post(path: str, body: Any) -> Any:
            async with agent.post(f"{srv.url}{path}", json=body) as r:
                data = await r.json()
                if r.status not in (200, 202):
                    raise GateRunFailed(f"{path} -> {r.status}: {data}")
                return data

        # Heartbeat ingest CPU (quiet heartbeats, the common case) for the idle gate's yardstick.
        await post("/v1/heartbeat", {"heartbeat_seq": 1, "lease": False})
        c0 = _cpu_seconds(pid)
        for i in range(HEARTBEATS):
            await post("/v1/heartbeat", {"heartbeat_seq": 2 + i, "lease": False})
        out["cpu_per_heartbeat_s"] = (_cpu_seconds(pid) - c0) / HEARTBEATS

        c0 = _cpu_seconds(pid)
        await asyncio.sleep(IDLE_SECONDS)
        out["idle0_cpu_per_s"] = (_cpu_seconds(pid) - c0) / IDLE_SECONDS

        conn = aiohttp.TCPConnector(ssl=ca, limit=0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=None)) as s:
            readers = [asyncio.create_task(client(s)) for _ in range(CLIENTS)]
            await asyncio.wait_for(all_connected, 60)
            await asyncio.sleep(KEEPALIVE * 2)  # settle: every stream past its first keepalive
            c0 = _cpu_seconds(pid)
            await asyncio.sleep(IDLE_SECONDS)
            out["idle200_cpu_per_s"] = (_cpu_seconds(pid) - c0) / IDLE_SECONDS

            posts: list[float] = []
            fanouts: list[float] = []
            firsts: list[float] = []
            seq = 10_000
            for i in range(WARMUP + RESULTS):
                seq += 1
                hb = await post("/v1/heartbeat", {"heartbeat_seq": seq})
                acts = [a for p in hb["pending_plans"] for a in p["actions"]]
                if not acts:
                    raise GateRunFailed("no action leased for the next result")
                eid = acts[0]["execution_id"]
                waiters[eid] = asyncio.get_running_loop().create_future()
                t0 = time.perf_counter()
                res = await post("/v1/executions/result", {"results": [{"execution_id": eid, "status": "SUCCEEDED"}]})
                t1 = time.perf_counter()
                if res["results"][0]["outcome"] != "accepted":
                    raise GateRunFailed(f"result not accepted: {res}")
                await asyncio.wait_for(waiters[eid], 30)
                if i >= WARMUP:
                    posts.append(t1 - t0)
                    fanouts.append(max(arrivals[eid]) - t0)
                    firsts.append(min(arrivals[eid]) - t0)
            for r in readers:
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    out["posts"], out["fanouts"], out["firsts"] = sorted(posts), sorted(fanouts), sorted(firsts)
    return out


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q))] * 1000


@pytest.mark.slow
def test_sse_fanout_200_clients(tmp_path: Path, benchmark: Benchmark) -> None:
    """Gates: 200 idle views cost < the CPU of 20 heartbeats per second; a result reaches all 200 views
    with a median < 3x the result POST's own median (which the fan-out time includes); p99s are recorded."""
    from tests.cp.helpers import Agent, Server, new_tenant
    from tests.cp.pg import free_port

    port, data_dir = free_port(), tmp_path / "cp"
    data_dir.mkdir(mode=0o700)
    admin_key = "bench-admin-" + uuid.uuid4().hex
    spec = {"data_dir": str(data_dir), "port": port, "admin_key": admin_key, "keepalive": KEEPALIVE}
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.test_feed_bench", json.dumps(spec)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf, cwd=REPO)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != b"READY":
            raise GateRunFailed(f"bench server did not start: {log_path.read_text()[-3000:]}")
        srv = Server(proc, port, data_dir, admin_key, "sqlite", None, log_path)
        tenant = new_tenant(srv)
        agent = Agent(srv, tmp_path / "agents").enroll(tenant.token())
        agent.close()
        for i in range(WARMUP + RESULTS):
            tenant.plan([{"type": "CommandExecute", "params": {"command": "/bin/true", "args": [str(i)]}}])
        out, window_s = time_window(benchmark, lambda: asyncio.run(
            _measure(srv, tenant.tenant_id, agent.dir, proc.pid)))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    posts, fanouts = out["posts"], out["fanouts"]
    post_p99, fan_p99 = _pct(posts, 0.99), _pct(fanouts, 0.99)
    post_p50, fan_p50 = _pct(posts, 0.5), _pct(fanouts, 0.5)
    hb_budget = out["cpu_per_heartbeat_s"] * IDLE_BUDGET_HEARTBEATS
    record(benchmark, "feed_sse_fanout_200", clients=CLIENTS, results=len(fanouts), keepalive_s=KEEPALIVE,
           idle0_cpu_ms_per_s=round(out["idle0_cpu_per_s"] * 1e3, 2),
           idle200_cpu_ms_per_s=round(out["idle200_cpu_per_s"] * 1e3, 2),
           cpu_ms_per_heartbeat=round(out["cpu_per_heartbeat_s"] * 1e3, 3),
           idle200_vs_heartbeats=round(out["idle200_cpu_per_s"] / out["cpu_per_heartbeat_s"], 1),
           limit_idle200_heartbeats=IDLE_BUDGET_HEARTBEATS,
           post_p50_ms=round(_pct(posts, 0.5), 2), post_p99_ms=round(post_p99, 2),
           first_client_p50_ms=round(_pct(out["firsts"], 0.5), 2),
           fanout_p50_ms=round(_pct(fanouts, 0.5), 2), fanout_p99_ms=round(fan_p99, 2),
           fanout_vs_post_p99=round(fan_p99 / post_p99, 2), fanout_vs_post_p50=round(fan_p50 / post_p50, 2),
           limit_fanout_vs_post_p50=FANOUT_RATIO,
           window_s=round(window_s, 2), cpus=os.cpu_count())  # fmt: skip
    assert len(fanouts) == RESULTS
    assert out["idle200_cpu_per_s"] < hb_budget, (
        f"200 idle views cost {out['idle200_cpu_per_s'] * 1e3:.2f} ms/s >= {IDLE_BUDGET_HEARTBEATS} heartbeats "
        f"({hb_budget * 1e3:.2f} ms)")
    assert fan_p50 < FANOUT_RATIO * post_p50, f"fan-out p50 {fan_p50:.1f} ms >= {FANOUT_RATIO} x {post_p50:.1f} ms"


if __name__ == "__main__":
    asyncio.run(_serve(json.loads(sys.argv[1])))
