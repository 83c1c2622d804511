"""Issue 13: the change feed (one fan-out for every live view), its SSE stream and its PostgreSQL bridge.

The feed is tested on its own (fan-out, tenant filter, overflow, unsubscribe), then inside a real control
plane served over real TLS from a background thread (its ``ControlPlane`` at hand, so the test can subscribe
to the very feed the use cases publish to) with the simulated agent of ``helpers.py``, then across two
control planes on one real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import psycopg
import pytest
from aiohttp import ClientSession, TCPConnector, web

from nkudo.cp.config import Settings
from nkudo.cp.db import Database
from nkudo.cp.domain import PrincipalKind
from nkudo.cp.feed import Change, ChangeFeed, ChangeKind, Subscription, publish_all
from nkudo.cp.feed_pg import LISTENER_NAME, MAX_PAYLOAD, PgBridge, decode_payload, encode_payloads, libpq_url
from nkudo.cp.http import build_app
from nkudo.cp.models import PlanCreate, SiteCreate, TenantCreate
from nkudo.cp.pki import CertificateAuthority
from nkudo.cp.records import Principal, RequestInfo
from nkudo.cp.server import build, server_ssl_context
from nkudo.cp.service import ControlPlane
from nkudo.cp.web.sse import KEEPALIVE, SseEvent, encode_event, sse_stream
from nkudo.errors import ValidationError

from .helpers import Agent, Server, create_action, new_tenant
from .pg import free_port

T = TypeVar("T")
A, B = "tenant-a", "tenant-b"


def _drain(sub: Subscription) -> list[Change]:
    out = []
    while (c := sub.get_nowait()) is not None:
        out.append(c)
    return out


# --- the feed on its own ------------------------------------------------------------------------------------


def test_fan_out_reaches_every_subscriber_of_the_tenant_and_no_other() -> None:
    """A subscriber never sees another tenant's changes; a site filter passes tenant-wide changes too."""
    feed = ChangeFeed()
    a1, a2, b, admin, a_s1 = (feed.subscribe(A), feed.subscribe(A), feed.subscribe(B), feed.subscribe(None),
                              feed.subscribe(A, "s1"))
    changes = [Change(ChangeKind.VM, A, "s1", "vm1"), Change(ChangeKind.VM, A, "s2", "vm2"),
               Change(ChangeKind.AGENT, B, "s9", "ag"), Change(ChangeKind.AUDIT, A)]
    for c in changes:
        feed.publish(c)
    assert _drain(a1) == _drain(a2) == [changes[0], changes[1], changes[3]]
    assert _drain(b) == [changes[2]]
    assert _drain(admin) == changes
    assert _drain(a_s1) == [changes[0], changes[3]]


def test_publish_is_synchronous_and_never_waits_for_a_slow_subscriber() -> None:
    """publish is a plain function: the change is queued before it returns, with no event loop running,
    and a subscriber that never reads holds at most ``maxsize`` changes however much is published."""
    assert not inspect.iscoroutinefunction(ChangeFeed.publish)
    assert not inspect.iscoroutinefunction(ChangeFeed.deliver)
    feed = ChangeFeed(maxsize=64)
    slow, fast = feed.subscribe(A), feed.subscribe(A)
    got = []
    t0 = time.perf_counter()
    for i in range(20_000):
        feed.publish(Change(ChangeKind.LOG, A, "s", f"e{i}"))
        got.extend(_drain(fast))
    assert time.perf_counter() - t0 < 2.0
    assert len(got) == 20_000 and slow.pending() <= 64


def test_overflow_replaces_the_backlog_with_one_resync() -> None:
    """A full queue is cleared and holds one RESYNC (which covers what arrives until it is read); after it
    is read, changes queue as usual."""
    feed = ChangeFeed(maxsize=4)
    sub = feed.subscribe(A)
    for i in range(10):
        feed.publish(Change(ChangeKind.EXECUTION, A, "s", f"e{i}"))
    assert sub.pending() == 1
    assert _drain(sub) == [Change(ChangeKind.RESYNC, A)] and sub.overflows == 1
    after = Change(ChangeKind.PLAN, A, "s", "p")
    feed.publish(after)
    assert _drain(sub) == [after]


def test_identical_pending_changes_are_coalesced() -> None:
    feed = ChangeFeed()
    sub = feed.subscribe(A)
    c = Change(ChangeKind.LOG, A, "s", "e1", "p1")
    for _ in range(5):
        feed.publish(c)
    publish_all(feed, [c, Change(ChangeKind.PLAN, A, "s", "p1", "p1"), c])
    assert _drain(sub) == [c, Change(ChangeKind.PLAN, A, "s", "p1", "p1")]
    feed.publish(c)  # once consumed, the same notice is news again
    assert _drain(sub) == [c]


def test_leaving_the_context_unsubscribes_and_wakes_a_waiting_reader() -> None:
    async def go() -> None:
        feed = ChangeFeed()
        async with feed.subscribe(A) as sub:
            assert feed.subscribers == 1
            reader = asyncio.create_task(anext(sub))
            await asyncio.sleep(0)
            feed.publish(Change(ChangeKind.SITE, A, "s"))
            assert (await reader).kind is ChangeKind.SITE
            waiting = asyncio.create_task(anext(sub))
            await asyncio.sleep(0)
        assert feed.subscribers == 0
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 1.0)
        feed.publish(Change(ChangeKind.SITE, A, "s"))  # nobody left: nothing queued anywhere
        assert sub.pending() == 0
        feed.close()
        assert feed.subscribe(A).closed  # after shutdown a new stream ends at once

    asyncio.run(go())


# --- the SSE encoder ----------------------------------------------------------------------------------------


def test_sse_encoder_splits_lines_and_strips_cr_and_nul() -> None:
    """A fragment cannot end its event early nor forge another: each of its lines is one ``data:`` line."""
    raw = encode_event(SseEvent("vm-row", "<tr>\r\n<td>a\0</td>\r\n\nevent: evil\rdata: x</tr>", id="42"))
    assert raw == (b"event: vm-row\nid: 42\ndata: <tr>\ndata: <td>a</td>\ndata: \ndata: event: evil\n"
                   b"data: data: x</tr>\n\n")
    assert raw.count(b"\n\n") == 1 and b"\r" not in raw and b"\0" not in raw


@pytest.mark.parametrize("name", ["", "Vm", "vm row", "x" * 65, "vm\n", "ok\nevent: evil"])
def test_sse_event_names_are_validated(name: str) -> None:
    with pytest.raises(ValidationError) as err:
        SseEvent(name, "d")
    assert err.value.code == "INVALID_SSE_EVENT" and err.value.field == "event"


def test_sse_event_ids_are_validated() -> None:
    with pytest.raises(ValidationError) as err:
        SseEvent("ok", "d", id="1\n2")
    assert err.value.field == "id"


# --- a real control plane in-process ------------------------------------------------------------------------


class InProcess:
    """A control plane served over real TLS by a background thread's event loop; ``cp`` is its facade."""

    def __init__(self, data_dir: Path, *, database_url: str | None = None,
                 routes: Sequence[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = ()
                 ) -> None:
        self.port = free_port()
        self.admin_key = "test-admin-" + uuid.uuid4().hex
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.settings = Settings(data_dir=data_dir, listen_host="127.0.0.1", listen_port=self.port,
                                 admin_key=self.admin_key, database_url=database_url)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.allowed = True
        self.call(self._start(list(routes)))

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self, routes: list[Any]) -> None:
        self.cp: ControlPlane = build(self.settings)
        app = build_app(self.cp)
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        cert, key = self.cp.ca.write_server_files(self.settings.data_dir, self.settings.server_names)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port,
                          ssl_context=server_ssl_context(cert, key, self.cp.ca.cert_pem)).start()

    def server(self) -> Server:
        return Server(None, self.port, self.settings.data_dir, self.admin_key,  # type: ignore[arg-type]
                      "sqlite", None, self.settings.data_dir / "no.log")

    def subscribe(self, tenant_id: str | None, site_id: str | None = None) -> Subscription:
        async def sub() -> Subscription:
            return self.cp.feed.subscribe(tenant_id, site_id)

        return self.call(sub())

    def drain(self, sub: Subscription) -> list[Change]:
        async def go() -> list[Change]:
            return _drain(sub)

        return self.call(go())

    def stop(self) -> None:
        async def down() -> None:
            self.cp.feed.close()
            await self.runner.cleanup()

        self.call(down())
        self.cp.db.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _sse_routes(h: list[InProcess]) -> list[tuple[str, str, Any]]:
    """A stream of one tenant's changes, as the dashboard's SSE routes build it (short timings)."""

    async def events(request: web.Request) -> web.StreamResponse:
        me = h[0]

        async def render(ch: Change) -> list[SseEvent]:
            return [SseEvent("change", f"{ch.kind.value}\n{ch.object_id}")]

        async def allowed() -> bool:
            return me.allowed

        return await sse_stream(request, me.cp.feed.subscribe(request.match_info["tenant_id"]), render,
                                keepalive=float(request.query.get("keepalive", "0.2")), still_allowed=allowed,
                                recheck=float(request.query.get("recheck", "30")))

    return [("GET", "/test-events/{tenant_id}", events)]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    holder: list[InProcess] = []
    h = InProcess(tmp_path_factory.mktemp("feed-cp"), routes=_sse_routes(holder))
    holder.append(h)
    try:
        yield h
    finally:
        h.stop()


def _vms(state: str) -> list[dict[str, Any]]:
    return [{"vm_id": "vm-a", "name": "vm-a", "state": state, "vcpus": 1, "memory_mib": 256},
            {"vm_id": "vm-b", "name": "vm-b", "state": "RUNNING", "vcpus": 1, "memory_mib": 256}]


def test_heartbeats_and_results_publish_exactly_their_changes(live: InProcess, tmp_path: Path) -> None:
    """After commit: a VM state change -> one VM notice, a quiet heartbeat -> none, a result -> execution,
    VM and plan notices (and the plan's submission and lease before it); another tenant sees nothing."""
    srv = live.server()
    tenant, other = new_tenant(srv), new_tenant(srv)
    sub, other_sub = live.subscribe(tenant.tenant_id), live.subscribe(other.tenant_id)
    tid, sid = tenant.tenant_id, tenant.site_id
    agent = Agent(srv, tmp_path).enroll(tenant.token())
    assert live.drain(sub) == [Change(ChangeKind.AGENT, tid, sid, agent.id), Change(ChangeKind.SITE, tid, sid, sid)]

    agent.heartbeat(heartbeat_seq=1, vms=_vms("RUNNING"))
    assert live.drain(sub) == [Change(ChangeKind.VM, tid, sid)]
    agent.heartbeat(heartbeat_seq=2, vms=_vms("RUNNING"))  # nothing changed: written behind, announced never
    assert live.drain(sub) == []
    agent.heartbeat(heartbeat_seq=3, vms=_vms("STOPPED"))
    assert live.drain(sub) == [Change(ChangeKind.VM, tid, sid)]
    agent.heartbeat(heartbeat_seq=4, vms=_vms("STOPPED"), agent_version="test-2")
    assert live.drain(sub) == [Change(ChangeKind.AGENT, tid, sid, agent.id)]

    plan = tenant.plan([create_action("vm-c")])
    pid = plan["plan_id"]
    assert live.drain(sub) == [Change(ChangeKind.PLAN, tid, sid, pid, pid)]
    leased = agent.heartbeat(heartbeat_seq=5, vms=_vms("STOPPED"))["pending_plans"]
    eid = leased[0]["actions"][0]["execution_id"]
    assert live.drain(sub) == [Change(ChangeKind.PLAN, tid, sid, pid, pid)]
    agent.heartbeat(heartbeat_seq=6, vms=_vms("STOPPED"))  # renewing its own lease is not news
    assert live.drain(sub) == []

    agent.results([{"execution_id": eid, "status": "SUCCEEDED"}])
    assert live.drain(sub) == [Change(ChangeKind.EXECUTION, tid, sid, eid, pid),
                               Change(ChangeKind.VM, tid, sid, "vm-c", pid),
                               Change(ChangeKind.PLAN, tid, sid, pid, pid)]
    st, out = agent.post("/v1/logs", {"execution_id": eid, "lines": [{"seq": 1, "message": "hello"}]})
    assert st == 202 and out["accepted"] == 1, out
    assert live.drain(sub) == [Change(ChangeKind.LOG, tid, sid, eid, pid)]
    agent.results([{"execution_id": eid, "status": "SUCCEEDED"}])  # a duplicate result changes nothing
    assert live.drain(sub) == []
    assert live.drain(other_sub) == []
    agent.close()


async def _read_events(resp: Any, n: int) -> list[bytes]:
    """The next ``n`` frames (events or comments) of an SSE response."""
    frames: list[bytes] = []
    buf = b""
    while len(frames) < n:
        line = await resp.content.readline()
        if not line:
            break
        buf += line
        if line == b"\n":
            frames.append(buf)
            buf = b""
    return frames


def _client(srv: Server) -> ClientSession:
    return ClientSession(connector=TCPConnector(ssl=ssl.create_default_context(cafile=str(srv.ca_file))))


def _server_tasks(live: InProcess) -> int:
    async def n() -> int:
        return len(asyncio.all_tasks())

    return live.call(n())


def _wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_sse_stream_over_tls_delivers_its_tenants_changes_and_cleans_up(live: InProcess) -> None:
    """Real TLS, a real HTTP client: headers, keepalives, rendered events of its tenant only; when the client
    leaves, the handler ends, its subscription is gone and no task is left behind."""
    srv = live.server()
    tasks_before, subs_before = _server_tasks(live), live.cp.feed.subscribers

    async def go() -> None:
        async with _client(srv) as s, s.get(f"{srv.url}/test-events/{A}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers["Cache-Control"] == "no-store" and resp.headers["X-Accel-Buffering"] == "no"
            assert await _read_events(resp, 1) == [KEEPALIVE]
            assert _wait_for(lambda: live.cp.feed.subscribers == subs_before + 1)
            live.loop.call_soon_threadsafe(live.cp.feed.publish, Change(ChangeKind.VM, B, "s", "theirs"))
            live.loop.call_soon_threadsafe(live.cp.feed.publish, Change(ChangeKind.VM, A, "s", "mine"))
            frames = [f for f in await _read_events(resp, 3) if f != KEEPALIVE]
            assert frames[0] == b"event: change\ndata: vm\ndata: mine\n\n"
            assert b"theirs" not in b"".join(frames)

    asyncio.run(go())
    assert _wait_for(lambda: live.cp.feed.subscribers == subs_before), "subscription left behind"
    assert _wait_for(lambda: _server_tasks(live) <= tasks_before), "a task outlived its stream"


@pytest.mark.parametrize("recheck", ["30", "0.3"])
def test_sse_stream_ends_when_no_longer_allowed(live: InProcess, recheck: str) -> None:
    """A revoked session ends the stream: before the next send (keepalive 0.2 s), or with keepalives 60 s
    apart by the periodic re-check alone (``recheck``, at most 30 s in production)."""
    srv = live.server()
    keepalive = "0.2" if recheck == "30" else "60"

    async def go() -> float:
        async with _client(srv) as s, s.get(f"{srv.url}/test-events/{A}?keepalive={keepalive}&recheck={recheck}"
                                            ) as resp:
            assert resp.status == 200
            await asyncio.sleep(0.3)
            live.allowed = False
            t0 = time.monotonic()
            rest = await asyncio.wait_for(resp.content.read(), 5.0)  # EOF: the server ended the stream
            assert b"data:" not in rest
            return time.monotonic() - t0

    try:
        assert asyncio.run(go()) < 2.0
    finally:
        live.allowed = True


# --- the PostgreSQL bridge ----------------------------------------------------------------------------------


def test_notify_payloads_stay_under_the_limit_and_round_trip() -> None:
    changes = [Change(ChangeKind.LOG, "t" * 36, "s" * 36, f"e{i:034d}", "p" * 36) for i in range(500)]
    payloads = encode_payloads("origin", changes)
    assert len(payloads) > 1 and all(len(p.encode()) <= MAX_PAYLOAD for p in payloads)
    back = [c for p in payloads for c in (decode_payload(p) or ("", []))[1]]
    assert back == changes
    assert decode_payload('{"o":"x","c":[["nope","t",null,null,null]]}') is None
    assert decode_payload("not json") is None


def _control_plane(url: str, data_dir: Path) -> ControlPlane:
    db = Database(url, pool_size=2)
    db.migrate()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return ControlPlane(Settings(data_dir=data_dir), db, CertificateAuthority.load_or_create(data_dir),
                        "test-admin-" + uuid.uuid4().hex)


def test_change_on_one_replica_reaches_a_subscriber_on_another(pg_cluster: Any, tmp_path: Path) -> None:
    """Two control planes on one PostgreSQL: a plan submitted on one is announced to the other's subscriber
    (exactly once), a replica does not receive its own notice twice, other tenants see nothing."""
    url = pg_cluster.create_database()
    cp1, cp2 = _control_plane(url, tmp_path / "r1"), _control_plane(url, tmp_path / "r2")
    admin = Principal(kind=PrincipalKind.ADMIN)
    info = RequestInfo()

    async def go() -> None:
        b1, b2 = PgBridge(cp1.feed, url), PgBridge(cp2.feed, url)
        await b1.start()
        await b2.start()
        try:
            await asyncio.wait_for(asyncio.gather(b1.listening.wait(), b2.listening.wait()), 10)
            tenant = await cp1.tenancy.create_tenant(admin, TenantCreate(slug="t-" + uuid.uuid4().hex[:8],
                                                                         name="t"), info)
            async with cp2.feed.subscribe(tenant.id) as far, cp1.feed.subscribe(tenant.id) as near, \
                    cp2.feed.subscribe("someone-else") as stranger:
                site = await cp1.tenancy.create_site(admin, tenant.id, SiteCreate(name="s1"), info)
                created = Change(ChangeKind.SITE, tenant.id, site.id, site.id)
                assert await asyncio.wait_for(anext(far), 10) == created and near.get_nowait() == created
                plan = await cp1.plans.create_plan(admin, site.id, msgspec.convert(
                    {"idempotency_key": "k1", "actions": [create_action("vm-1")]}, PlanCreate), info)
                want = Change(ChangeKind.PLAN, tenant.id, site.id, plan.plan_id, plan.plan_id)
                assert await asyncio.wait_for(anext(far), 10) == want
                assert near.get_nowait() == want
                await asyncio.sleep(0.5)  # anything more (an echo, a duplicate) would have arrived by now
                assert far.get_nowait() is None and near.get_nowait() is None and stranger.get_nowait() is None
                assert b1.received == 0 and b2.received == 2  # the site, then the plan

                # The listeners' connections die: each replica reconnects and tells its subscribers to
                # re-render (notices sent meanwhile are lost), then changes flow again.
                b2.listening.clear()
                with psycopg.connect(libpq_url(url), autocommit=True) as admin_conn:
                    # This test's database only: a control plane serving other tests on the cluster listens too.
                    killed = admin_conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                                "WHERE application_name = %s AND datname = current_database()",
                                                (LISTENER_NAME,)).fetchall()
                assert len(killed) == 2
                assert (await asyncio.wait_for(anext(far), 10)).kind is ChangeKind.RESYNC
                await asyncio.wait_for(b2.listening.wait(), 10)
                cp1.feed.publish(want)
                assert await asyncio.wait_for(anext(far), 10) == want
        finally:
            await b1.stop()
            await b2.stop()

    try:
        asyncio.run(go())
    finally:
        cp1.db.close()
        cp2.db.close()


def test_a_new_site_is_announced_to_its_tenant_after_commit(tmp_path: Path) -> None:
    """An open overview lists a site created after it was loaded: site creation publishes SITE (only when it
    committed: a refused duplicate announces nothing)."""
    from nkudo.cp.db import sqlite_url
    from nkudo.cp.errors import Conflict

    (tmp_path / "db").mkdir(mode=0o700)
    cp = _control_plane(sqlite_url(tmp_path / "db"), tmp_path / "cp")
    admin, info = Principal(kind=PrincipalKind.ADMIN), RequestInfo()

    async def go() -> None:
        tenant = await cp.tenancy.create_tenant(admin, TenantCreate(slug="site-feed", name="t"), info)
        async with cp.feed.subscribe(tenant.id) as sub, cp.feed.subscribe("someone-else") as stranger:
            site = await cp.tenancy.create_site(admin, tenant.id, SiteCreate(name="s1"), info)
            assert sub.get_nowait() == Change(ChangeKind.SITE, tenant.id, site.id, site.id)
            with pytest.raises(Conflict):
                await cp.tenancy.create_site(admin, tenant.id, SiteCreate(name="s1"), info)
            assert sub.get_nowait() is None and stranger.get_nowait() is None

    try:
        asyncio.run(go())
    finally:
        cp.db.close()
