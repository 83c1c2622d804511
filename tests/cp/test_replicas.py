"""Two ``serve`` processes on one PostgreSQL database: agents polling both never share an action."""

from __future__ import annotations

import threading
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from nkudo.cp.pki import CertificateAuthority

from .helpers import Agent, create_action, new_tenant, start_server
from .pg import Cluster


def test_two_replicas_never_double_lease(pg_cluster: Cluster, tmp_path: Path) -> None:
    url = pg_cluster.create_database()
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    (tmp_path / "ca.key").write_bytes(ca.key_pem())
    pki = ["--ca-cert-file", str(tmp_path / "ca.crt"), "--ca-key-file", str(tmp_path / "ca.key"),
           "--lease-ttl", "60", "--max-plans-per-lease", "3"]
    admin_key = "replica-admin-" + uuid.uuid4().hex
    servers = [start_server(tmp_path / f"r{i}", database_url=url, admin_key=admin_key, extra=pki) for i in range(2)]
    try:
        tenant = new_tenant(servers[0])
        agents = [[Agent(srv, tmp_path / "agents") for srv in servers] for _ in range(8)]
        for pair in agents:  # one identity, one client per replica
            pair[0].enroll(tenant.token())
            pair[1].enrolled = pair[0].enrolled
            pair[1].key = pair[0].key
            pair[1].install(pair[0].enrolled["client_certificate_pem"])
        plans = [tenant.plan([create_action(f"vm-{i}"), {"type": "MicroVMStop", "params": {"vm_id": f"vm-{i}"}},
                              {"type": "MicroVMStart", "params": {"vm_id": f"vm-{i}"}}]) for i in range(40)]
        expected = {e["id"] for p in plans for e in p["executions"]}
        delivered: dict[str, set[str]] = defaultdict(set)
        accepted: dict[str, int] = defaultdict(int)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def work(pair: list[Agent]) -> None:
            try:
                for rnd in range(400):
                    a = pair[rnd % 2]
                    got = a.heartbeat()["pending_plans"]
                    with lock:
                        done = all(accepted[e] for e in expected)
                    if not got and done:
                        return
                    for p in got:
                        for act in p["actions"]:
                            with lock:
                                delivered[act["execution_id"]].add(a.id)
                        out = pair[(rnd + 1) % 2].results(
                            [{"execution_id": act["execution_id"], "status": "SUCCEEDED"} for act in p["actions"]])
                        with lock:
                            for r in out["results"]:
                                if r["outcome"] == "accepted":
                                    accepted[r["execution_id"]] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(pair,)) for pair in agents]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert errors == []
        assert set(delivered) == expected
        doubles = {e: a for e, a in delivered.items() if len(a) > 1}
        assert doubles == {}, f"actions leased to two agents: {doubles}"
        assert all(accepted[e] == 1 for e in expected)
        states = {tenant.client.call("GET", f"/plans/{p['plan_id']}")["plan_status"] for p in plans}
        assert states == {"SUCCEEDED"}
        assert len({a for s in delivered.values() for a in s}) > 1  # the work really was spread
        for pair in agents:
            for a in pair:
                a.close()
    finally:
        for s in servers:
            s.stop()


def test_unenroll_on_one_replica_is_refused_at_once_by_the_other(pg_cluster: Cluster, tmp_path: Path) -> None:
    """Heartbeat authorisation reads are batched, never cached: no window where the other replica accepts."""
    url = pg_cluster.create_database()
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    (tmp_path / "ca.key").write_bytes(ca.key_pem())
    pki = ["--ca-cert-file", str(tmp_path / "ca.crt"), "--ca-key-file", str(tmp_path / "ca.key")]
    admin_key = "replica-admin-" + uuid.uuid4().hex
    servers = [start_server(tmp_path / f"r{i}", database_url=url, admin_key=admin_key, extra=pki) for i in range(2)]
    try:
        tenant = new_tenant(servers[0])
        pairs = [[Agent(srv, tmp_path / "agents") for srv in servers] for _ in range(6)]
        for pair in pairs:
            pair[0].enroll(tenant.token())
            pair[1].enrolled, pair[1].key = pair[0].enrolled, pair[0].key
            pair[1].install(pair[0].enrolled["client_certificate_pem"])

        def beat_all_on_replica_1() -> list[tuple[int, Any]]:
            out: list[tuple[int, Any]] = [(0, None)] * len(pairs)

            def one(i: int) -> None:
                out[i] = pairs[i][1].post("/v1/heartbeat", {"heartbeat_seq": 1})

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(pairs))]
            for th in threads:
                th.start()
            for th in threads:
                th.join(30)
            return out

        assert [st for st, _ in beat_all_on_replica_1()] == [200] * len(pairs)
        st, _ = pairs[0][0].post("/v1/unenroll", {"reason": "decommissioned"})
        assert st == 204
        got = beat_all_on_replica_1()  # immediately, concurrently with valid agents' heartbeats
        assert got[0][0] == 401 and got[0][1]["error"]["code"] == "AGENT_UNENROLLED"
        assert [st for st, _ in got[1:]] == [200] * (len(pairs) - 1)
        for pair in pairs:
            for a in pair:
                a.close()
    finally:
        for s in servers:
            s.stop()
