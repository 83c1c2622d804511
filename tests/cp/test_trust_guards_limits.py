"""Mutation sweep of the trust infrastructure, part two: lock-out and the rate limit shared across replicas.

Each test names the one-line bug it catches (see ``test_trust_guards.py`` for part one).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from nkudo.cp.pki import CertificateAuthority
from nkudo.cp.ratelimit import LockoutPolicy, LockState, after_failure

from .conftest import FAST
from .helpers import Agent, new_tenant, start_server
from .pg import Cluster


def test_a_lock_holds_until_its_last_instant() -> None:
    """A source is locked until ``locked_until`` itself: a failure a moment before the end is not counted (it
    cannot start a longer lock), one at the end is.

    Catches: ``LockState.locked`` ending the lock early (``locked_until > now + 1``)."""
    pol = LockoutPolicy(threshold=2, window=60, base=10, max_lock=100)
    s = LockState()
    for now in (0.0, 1.0):
        s, until = after_failure(s, now, pol)
    assert until == 11.0 and s.level == 1
    assert s.locked(10.5) and not s.locked(11.0)
    assert after_failure(s, 10.5, pol) == (s, None)
    after, until = after_failure(s, 11.0, pol)
    assert until is None and after.failures == 1 and after.locked_until == 11.0


def test_replicas_add_up_what_each_admitted(pg_cluster: Cluster, tmp_path: Path) -> None:
    """Heartbeats admitted by two replicas (each from its in-process copy, pushed every 0.25 s) add up in the
    shared bucket: after 6 of a burst of 6, split 3 and 3, a third replica refuses the next one at once.

    Catches: the sync UPSERT keeping the pushing replica's own TAT (``tat = excluded.tat``) instead of adding
    what it spent to the shared one: every replica then admits a burst of its own."""
    url = pg_cluster.create_database()
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    (tmp_path / "ca.key").write_bytes(ca.key_pem())
    extra = [*FAST, "--ca-cert-file", str(tmp_path / "ca.crt"), "--ca-key-file", str(tmp_path / "ca.key"),
             "--rate-limit-heartbeat", "6/min:6"]
    key = "replica-admin-" + uuid.uuid4().hex
    servers = [start_server(tmp_path / f"r{i}", database_url=url, admin_key=key, extra=extra) for i in range(3)]
    agents: list[Agent] = []
    try:
        tenant = new_tenant(servers[0])
        first = Agent(servers[0], tmp_path / "a").enroll(tenant.token())
        agents.append(first)
        for srv in servers[1:]:
            twin = Agent(srv, tmp_path / "a")
            twin.enrolled, twin.key = first.enrolled, first.key
            twin.install(first.enrolled["client_certificate_pem"])
            agents.append(twin)
        a0, a1, a2 = agents
        codes = [a.post("/v1/heartbeat", {})[0] for a in (a0, a1, a0, a0, a1, a1)]
        assert codes == [200] * 6
        time.sleep(1.0)  # several sync intervals: both replicas have pushed what they admitted
        st, body = a2.post("/v1/heartbeat", {})
        assert st == 429 and body["error"]["route_class"] == "heartbeat", body
    finally:
        for a in agents:
            a.close()
        for s in servers:
            s.stop()
