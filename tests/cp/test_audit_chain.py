"""Issue 12 (audit log integrity): every audit event is on a per-tenant (or the global) hash chain, appended under a
lock, checkpointed with a key the database does not hold; tampering with the database directly is detected with
the right reason, on SQLite and PostgreSQL, through the use case, the admin API and the CLI on a copy."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from nkudo.cp import auditchain as ac
from nkudo.cp import models
from nkudo.cp import schema as t
from nkudo.cp.db import Database, sqlite_url
from nkudo.cp.domain import ActorType, PrincipalKind
from nkudo.cp.metrics import Metrics
from nkudo.cp.ports import SystemClock
from nkudo.cp.records import Actor, AuditEntry, Principal, RequestInfo
from nkudo.cp.usecases.audit import AuditLog
from nkudo.cp.usecases.common import audit
from nkudo.cp.usecases.tenancy import Tenancy

from .helpers import REPO, Agent, Server, Tenant
from .pg import Cluster

ADMIN = Principal(PrincipalKind.ADMIN)
E = t.audit_events.c
R = ac.BreakReason


def _log(db: Database, key: Any = None) -> AuditLog:
    return AuditLog(db, metrics=Metrics(), signer=ac.Signer(key or ec.generate_private_key(ec.SECP256R1())))


def _entry(tenant: str | None, i: int) -> AuditEntry:
    return AuditEntry(Actor(ActorType.ADMIN), "test.event", tenant, "thing", f"obj-{i}", {"i": i, "name": "é<>&"})


def _fill(log: AuditLog, tenant: str | None, n: int) -> None:
    async def go() -> None:
        for i in range(n):
            await log.record(RequestInfo(request_id=f"r{i}", source_ip="192.0.2.1"), _entry(tenant, i))

    asyncio.run(go())


def _verify(log: AuditLog, chain: str | None = None) -> Any:
    return asyncio.run(log.verify_chains(chain))


def _sql(db: Database, stmt: Any) -> None:
    db.tx(lambda conn: conn.execute(stmt))


def _row(db: Database, chain: str, seq: int) -> Any:
    return db.tx(lambda conn: conn.execute(sa.select(t.audit_events).where(E.chain == chain, E.seq == seq)).one())


def _chain_with_checkpoint(db: Database, n: int = 6) -> tuple[AuditLog, str]:
    log, tenant = _log(db), str(uuid.uuid4())
    _fill(log, tenant, n)
    assert [c.seq for c in asyncio.run(log.checkpoint()).checkpoints] == [n]
    report = _verify(log)
    assert report.valid and report.total == n and report.chains[0].signed_seq == n, report
    return log, tenant


def _broken(log: AuditLog) -> tuple[str, int, str]:
    report = _verify(log)
    assert not report.valid and report.first_broken is not None, report
    b = report.first_broken
    return b.reason.value, b.seq, b.chain


# --- appending --------------------------------------------------------------------------------------------------


def test_events_are_chained_per_tenant_and_global(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: each event links to the previous one of its chain (tenant, or global when it has no tenant)."""
    from nkudo.cp.usecases import audit as audit_module

    monkeypatch.setattr(audit_module, "_PAGE", 2)  # verification reads in pages: several here
    log, a, b = _log(db), str(uuid.uuid4()), str(uuid.uuid4())
    _fill(log, a, 3)
    _fill(log, None, 2)
    _fill(log, b, 1)
    rows = db.tx(lambda conn: conn.execute(sa.select(t.audit_events).order_by(E.id)).all())
    assert [(r.chain, r.seq) for r in rows] == [(a, 1), (a, 2), (a, 3), ("global", 1), ("global", 2), (b, 1)]
    prev: dict[str, str] = {}
    for r in rows:
        assert r.prev_hash == prev.get(r.chain, ac.GENESIS)
        assert r.entry_hash == ac.link(r.chain, r.seq, r.occurred_at, r.tenant_id, r.actor_type, r.actor_id,
                                       r.action, r.object_type, r.object_id, r.request_id, r.source_ip, r.details,
                                       r.prev_hash)
        prev[r.chain] = r.entry_hash
    report = _verify(log)
    assert report.valid and report.total == 6 and {c.chain for c in report.chains} == {a, b, "global"}


def test_the_documented_encoding_is_what_is_hashed(db: Database) -> None:
    """Issue 12: an outside tool following the README (plain json + hashlib) computes the stored hash."""
    import hashlib

    log, tenant = _log(db), str(uuid.uuid4())
    _fill(log, tenant, 2)
    r = _row(db, tenant, 2)
    fields = ["nkudo-audit/1", r.chain, r.seq, r.occurred_at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
              r.tenant_id, r.actor_type, r.actor_id, r.action, r.object_type, r.object_id, r.request_id,
              r.source_ip, r.details, r.prev_hash]
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert hashlib.sha256(text.encode()).hexdigest() == r.entry_hash


def test_a_rolled_back_change_leaves_no_event(db: Database) -> None:
    """Issue 12: the append is part of the change's transaction: a rollback takes the event and the head with it."""
    log, tenant = _log(db), str(uuid.uuid4())
    _fill(log, tenant, 1)

    def failing(conn: Any) -> None:
        audit(conn, RequestInfo(), _entry(tenant, 99), dt.datetime.now(dt.UTC))
        raise RuntimeError("the change fails after its audit append")

    with pytest.raises(RuntimeError):
        db.tx(failing)
    _fill(log, tenant, 1)
    assert [r.seq for r in db.tx(lambda c: c.execute(sa.select(E.seq).where(E.chain == tenant)).all())] == [1, 2]
    assert _verify(log).valid


def test_two_replicas_appending_concurrently_never_fork_a_chain(db: Database) -> None:
    """Issue 12: two writers (separate engines, as two replicas) append to one chain at once: one unbroken chain."""
    tenant, n = str(uuid.uuid4()), 60
    other = Database(db.url, pool_size=2)
    errors: list[BaseException] = []

    def writer(d: Database) -> None:
        try:
            _fill(AuditLog(d), tenant, n)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=writer, args=(d,)) for d in (db, other)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        other.close()
    assert errors == []
    seqs = [r.seq for r in db.tx(lambda c: c.execute(sa.select(E.seq).where(E.chain == tenant).order_by(E.id)).all())]
    assert seqs == list(range(1, 2 * n + 1))
    report = _verify(_log(db), tenant)
    assert report.valid and report.total == 2 * n, report


def test_every_mutating_use_case_appends_to_the_tenant_chain(db: Database) -> None:
    """Issue 12: the use cases' own audit writes (here tenant and site creation) land on the tenant's chain."""
    log = _log(db)

    async def go() -> str:
        tenancy = Tenancy(db, log.clock)
        made = await tenancy.create_tenant(ADMIN, models.TenantCreate(slug="acme", name="Acme"), RequestInfo())
        await tenancy.create_site(ADMIN, made.id, models.SiteCreate(name="s1"), RequestInfo())
        return made.id

    tid = asyncio.run(go())
    rows = db.tx(lambda c: c.execute(sa.select(E.chain, E.seq, E.action).order_by(E.id)).all())
    assert [tuple(r) for r in rows] == [(tid, 1, "tenant.create"), (tid, 2, "site.create")]


# --- tampering ----------------------------------------------------------------------------------------------------


def test_a_changed_field_is_detected(db: Database) -> None:
    """Issue 12: UPDATE of one field of one event -> changed, at that event."""
    log, tenant = _chain_with_checkpoint(db)
    _sql(db, t.audit_events.update().where(E.chain == tenant, E.seq == 3).values(object_id="forged"))
    assert _broken(log) == ("changed", 3, tenant)


def test_a_changed_and_rehashed_event_is_detected(db: Database) -> None:
    """Issue 12: the changed event's own hash recomputed too -> its successor no longer links: changed, at it."""
    log, tenant = _chain_with_checkpoint(db)
    r = _row(db, tenant, 3)
    h = ac.link(r.chain, r.seq, r.occurred_at, r.tenant_id, r.actor_type, r.actor_id, "forged.action",
                r.object_type, r.object_id, r.request_id, r.source_ip, r.details, r.prev_hash)
    _sql(db, t.audit_events.update().where(E.id == r.id).values(action="forged.action", entry_hash=h))
    assert _broken(log) == ("changed", 3, tenant)


@pytest.mark.parametrize("seq", [1, 3, 6])
def test_a_deleted_event_is_detected(db: Database, seq: int) -> None:
    """Issue 12: DELETE of the first, a middle or the last event -> deleted, at its sequence number."""
    log, tenant = _chain_with_checkpoint(db)
    _sql(db, t.audit_events.delete().where(E.chain == tenant, E.seq == seq))
    assert _broken(log) == ("deleted", seq, tenant)


def test_an_inserted_event_is_detected(db: Database) -> None:
    """Issue 12: INSERT of a well-formed event (correct hashes, next sequence number) that no append wrote."""
    log, tenant = _chain_with_checkpoint(db)
    last = _row(db, tenant, 6)
    now = dt.datetime.now(dt.UTC)
    h = ac.link(tenant, 7, now, tenant, "ADMIN", None, "forged", "thing", "x", None, None, {}, last.entry_hash)
    _sql(db, t.audit_events.insert().values(
        tenant_id=tenant, actor_type="ADMIN", actor_id=None, action="forged", object_type="thing", object_id="x",
        request_id=None, source_ip=None, details={}, occurred_at=now, chain=tenant, seq=7,
        prev_hash=last.entry_hash, entry_hash=h))
    assert _broken(log) == ("inserted", 7, tenant)


def test_an_event_inserted_by_renumbering_is_detected(db: Database) -> None:
    """Issue 12: a forged event slipped in at 3 (later events renumbered, the head moved) -> inserted, at 3."""
    log, tenant = _chain_with_checkpoint(db)
    for seq in range(6, 2, -1):
        _sql(db, t.audit_events.update().where(E.chain == tenant, E.seq == seq).values(seq=seq + 1))
    before = _row(db, tenant, 2)
    now = before.occurred_at
    h = ac.link(tenant, 3, now, tenant, "ADMIN", None, "forged", "thing", "x", None, None, {}, before.entry_hash)
    _sql(db, t.audit_events.insert().values(
        tenant_id=tenant, actor_type="ADMIN", actor_id=None, action="forged", object_type="thing", object_id="x",
        request_id=None, source_ip=None, details={}, occurred_at=now, chain=tenant, seq=3,
        prev_hash=before.entry_hash, entry_hash=h))
    _sql(db, t.audit_chain_heads.update().where(t.audit_chain_heads.c.chain == tenant).values(seq=7))
    assert _broken(log) == ("inserted", 3, tenant)


@pytest.mark.parametrize("how", ["seq", "content"])
def test_two_swapped_events_are_detected(db: Database, how: str) -> None:
    """Issue 12: two events exchanged (their sequence numbers, or all their columns but id and seq) -> reordered."""
    log, tenant = _chain_with_checkpoint(db)
    a, b = _row(db, tenant, 2), _row(db, tenant, 4)
    if how == "seq":
        _sql(db, t.audit_events.update().where(E.id == a.id).values(seq=-1))
        _sql(db, t.audit_events.update().where(E.id == b.id).values(seq=2))
        _sql(db, t.audit_events.update().where(E.id == a.id).values(seq=4))
    else:
        cols = [c for c in t.audit_events.c.keys() if c not in ("id", "seq")]
        _sql(db, t.audit_events.update().where(E.id == a.id).values(**{c: getattr(b, c) for c in cols}))
        _sql(db, t.audit_events.update().where(E.id == b.id).values(**{c: getattr(a, c) for c in cols}))
    assert _broken(log) == ("reordered", 2, tenant)


@pytest.mark.parametrize("also_checkpoint", [False, True])
def test_a_consistently_rewritten_chain_fails_at_the_checkpoint(db: Database, also_checkpoint: bool) -> None:
    """Issue 12: history rewritten with every hash and the head recomputed (no key) -> the signed checkpoint fails;
    rewriting the checkpoint's hash too breaks its signature."""
    log, tenant = _chain_with_checkpoint(db)
    prev = _row(db, tenant, 1).entry_hash
    for seq in range(2, 7):
        r = _row(db, tenant, seq)
        obj = "rewritten" if seq == 2 else r.object_id
        h = ac.link(r.chain, r.seq, r.occurred_at, r.tenant_id, r.actor_type, r.actor_id, r.action, r.object_type,
                    obj, r.request_id, r.source_ip, r.details, prev)
        _sql(db, t.audit_events.update().where(E.id == r.id).values(object_id=obj, prev_hash=prev, entry_hash=h))
        prev = h
    _sql(db, t.audit_chain_heads.update().where(t.audit_chain_heads.c.chain == tenant).values(entry_hash=prev))
    if also_checkpoint:
        _sql(db, t.audit_checkpoints.update().where(t.audit_checkpoints.c.chain == tenant).values(entry_hash=prev))
    assert _broken(log) == ("checkpoint_signature_invalid", 6, tenant)
    _fill(log, tenant, 1)  # ... and the next signing round refuses to bless the rewritten history
    assert asyncio.run(log.checkpoint()).checkpoints == []
    assert log.metrics is not None
    assert log.metrics.registry.get_sample_value("nkudo_cp_audit_checkpoints_total", {"outcome": "refused"}) == 1.0


def test_a_checkpoint_by_another_key_is_invalid(db: Database) -> None:
    """Issue 12: a checkpoint signed with a key the verifier does not trust (a forger's own) is rejected."""
    log, tenant = _chain_with_checkpoint(db)
    _fill(log, tenant, 1)
    forger, last = ac.Signer(ed25519.Ed25519PrivateKey.generate()), _row(db, tenant, 7)
    now = dt.datetime.now(dt.UTC)
    _sql(db, t.audit_checkpoints.insert().values(
        chain=tenant, seq=7, entry_hash=last.entry_hash, signed_at=now, key_id=forger.key_id,
        signature=forger.sign(ac.checkpoint_statement(tenant, 7, last.entry_hash, now))))
    assert _broken(log) == ("checkpoint_signature_invalid", 7, tenant)
    # The server's own signing round will not build on it either.
    assert asyncio.run(log.checkpoint()).checkpoints == []


def test_checkpoints_only_sign_moved_heads_and_the_metric_reports(db: Database) -> None:
    """Issue 12: a second signing round with no new events signs nothing; verification sets the metrics."""
    log, tenant = _chain_with_checkpoint(db)
    assert asyncio.run(log.checkpoint()).checkpoints == []
    _fill(log, tenant, 2)
    report = _verify(log)
    assert report.valid and report.chains[0].unsigned_events == 2
    m = log.metrics
    assert m is not None
    assert m.registry.get_sample_value("nkudo_cp_audit_chain_valid") == 1.0
    assert m.registry.get_sample_value("nkudo_cp_audit_unsigned_events") == 2.0
    _sql(db, t.audit_events.delete().where(E.chain == tenant, E.seq == 2))
    _verify(log)
    assert m.registry.get_sample_value("nkudo_cp_audit_chain_valid") == 0.0
    assert m.registry.get_sample_value("nkudo_cp_audit_verifications_total", {"result": "broken"}) == 1.0


# --- the API and the CLI ------------------------------------------------------------------------------------------


def test_admin_api_lists_verifies_and_checkpoints(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Issue 12: GET /admin/audit/events (filters, paging), POST /admin/audit/verify and /checkpoint; a refused
    enrollment is on the global chain with its source and reason, never the token."""
    admin = server.client(admin=True)
    for i in range(3):
        admin.call("POST", f"/tenants/{tenant.tenant_id}/sites", {"name": f"audit-{i}-{uuid.uuid4().hex[:6]}"})
    bad_token = "not-a-token-" + uuid.uuid4().hex
    st, _ = Agent(server, agent_dir).enroll_raw(bad_token)
    assert st == 401
    page = admin.call("GET", f"/admin/audit/events?chain={tenant.tenant_id}&action=site.create&limit=2")
    assert [e["action"] for e in page["events"]] == ["site.create"] * 2 and page["next_before_id"] is not None
    rest = admin.call("GET", f"/admin/audit/events?chain={tenant.tenant_id}&action=site.create&limit=2"
                             f"&before_id={page['next_before_id']}")
    seqs = [e["seq"] for e in page["events"] + rest["events"]]
    assert len(seqs) >= 4 and seqs == sorted(seqs, reverse=True)
    refused = admin.call("GET", "/admin/audit/events?chain=global&action=agent.enroll_refused")["events"]
    assert refused and refused[0]["details"] == {"reason": "TOKEN_INVALID"} and refused[0]["source_ip"] == "127.0.0.1"
    assert bad_token not in json.dumps(refused)
    own = tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/audit-events?action=api_key.create&limit=1")
    assert [e["action"] for e in own["events"]] == ["api_key.create"]
    made = admin.call("POST", "/admin/audit/checkpoint")["checkpoints"]
    assert tenant.tenant_id in {c["chain"] for c in made}
    report = admin.call("POST", f"/admin/audit/verify?tenant_id={tenant.tenant_id}")
    assert report["valid"] and report["first_broken"] is None and report["chains"][0]["unsigned_events"] == 0
    assert admin.call("POST", "/admin/audit/verify")["valid"]
    for query in ("limit=0", "before_id=x", "actor_type=ROOT", "since=yesterday", "chain=nope", "action=A%20B",
                  "until=2024-01-01T00:00:00"):
        st, _, body = admin.raw("GET", f"/admin/audit/events?{query}")
        assert st == 400 and json.loads(body)["error"]["field"] == query.split("=")[0], (query, body)
    st, _, _ = tenant.client.raw("GET", "/admin/audit/events")
    assert st == 401
    st, _, _ = tenant.client.raw("POST", "/admin/audit/verify")
    assert st == 401


def test_cli_verifies_a_tampered_database(db: Database, tmp_path: Path) -> None:
    """Issue 12: ``nkudo-control-plane audit verify`` reads the database itself (a copy, or PostgreSQL) with only the
    public key, and reports the first broken event and why (exit 1)."""
    from cryptography.hazmat.primitives import serialization

    key = ec.generate_private_key(ec.SECP256R1())
    log, tenant = _log(db, key), str(uuid.uuid4())
    _fill(log, tenant, 4)
    asyncio.run(log.checkpoint())
    pub = tmp_path / "audit.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    where = ["--database-url", db.url] if db.is_pg else ["--data-dir", str(tmp_path)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "nkudo.cp.cli", "audit", "verify", *where, "--audit-key-file",
                               str(pub), *args], capture_output=True, text=True, cwd=REPO, check=False)

    ok = run("--tenant", tenant)
    assert ok.returncode == 0 and "VALID" in ok.stdout, ok.stdout + ok.stderr
    _sql(db, t.audit_events.update().where(E.chain == tenant, E.seq == 2).values(action="forged"))
    bad = run("--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    out = json.loads(bad.stdout)
    assert out["valid"] is False and out["first_broken"]["reason"] == "changed"
    assert out["first_broken"]["chain"] == tenant and out["first_broken"]["seq"] == 2
    text = run()
    assert text.returncode == 1 and f"BROKEN: first broken event chain {tenant} seq 2" in text.stdout, text.stdout


def test_cli_rejects_a_bad_tenant_argument(tmp_path: Path) -> None:
    """Issue 12: ``--tenant`` must be a tenant id or ``global`` (a usage error naming the option)."""
    r = subprocess.run([sys.executable, "-m", "nkudo.cp.cli", "audit", "verify", "--data-dir", str(tmp_path),
                        "--tenant", "x"], capture_output=True, text=True, cwd=REPO, check=False)
    assert r.returncode == 2 and "--tenant" in r.stderr


def test_replicas_on_postgres_append_concurrently_through_the_api(pg_cluster: Cluster, tmp_path: Path) -> None:
    """Issue 12: two ``serve`` processes on one database, each creating sites of one tenant at the same time:
    the tenant's chain stays one unbroken chain."""
    from nkudo.cp.pki import CertificateAuthority

    from .helpers import new_tenant, start_server

    url = pg_cluster.create_database()
    ca = CertificateAuthority.generate()
    (tmp_path / "ca.crt").write_text(ca.cert_pem)
    (tmp_path / "ca.key").write_bytes(ca.key_pem())
    pki = ["--ca-cert-file", str(tmp_path / "ca.crt"), "--ca-key-file", str(tmp_path / "ca.key")]
    admin_key = "audit-admin-" + uuid.uuid4().hex
    servers = [start_server(tmp_path / f"r{i}", database_url=url, admin_key=admin_key, extra=pki) for i in range(2)]
    try:
        tenant = new_tenant(servers[0])
        errors: list[BaseException] = []

        def work(srv: Server) -> None:
            try:
                c = srv.client(admin=True)
                for _ in range(25):
                    c.call("POST", f"/tenants/{tenant.tenant_id}/sites", {"name": "s-" + uuid.uuid4().hex[:8]})
                c.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in servers]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert errors == []
        report = servers[1].client(admin=True).call("POST", f"/admin/audit/verify?tenant_id={tenant.tenant_id}")
        assert report["valid"] and report["chains"][0]["head_seq"] == 2 + 1 + 50, report  # tenant, key, site + 50
    finally:
        for s in servers:
            s.stop()


def test_events_from_before_the_chain_are_chained_by_the_migration(db: Database) -> None:
    """Issue 12: migration 0003 chains the events already stored (per tenant and global, in id order)."""
    from alembic import command
    from alembic.config import Config

    from nkudo.cp.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    tenant = str(uuid.uuid4())

    def down_and_back(conn: Any, target: str) -> None:
        cfg.attributes["connection"] = conn
        (command.downgrade if target == "0002" else command.upgrade)(cfg, target)

    db.tx(down_and_back, "0002")
    old = sa.table("audit_events", *(sa.column(c) for c in ("tenant_id", "actor_type", "actor_id", "action",
                                                            "object_type", "object_id")),
                   sa.column("details", t.JSONType), sa.column("occurred_at", t.UtcDateTime()))
    for i, tid in enumerate([tenant, None, tenant]):
        _sql(db, old.insert().values(tenant_id=tid, actor_type="ADMIN", actor_id=None, action="old.event",
                                     object_type="thing", object_id=f"o{i}", details={"i": i},
                                     occurred_at=dt.datetime(2024, 1, 1, 0, 0, i, 500, tzinfo=dt.UTC)))
    db.tx(down_and_back, "head")
    rows = db.tx(lambda c: c.execute(sa.select(E.chain, E.seq).order_by(E.id)).all())
    assert [tuple(r) for r in rows] == [(tenant, 1), ("global", 1), (tenant, 2)]
    log = _log(db)
    _fill(log, tenant, 1)
    report = _verify(log)
    assert report.valid and report.total == 4, report


def test_an_unusable_audit_key_file_is_refused_naming_the_flag(tmp_path: Path) -> None:
    """Issue 12: ``--audit-key-file`` that is not a private key stops the server at start, naming the field."""
    from nkudo.cp.config import Settings
    from nkudo.cp.pki import CertificateAuthority
    from nkudo.cp.server import audit_signer
    from nkudo.errors import ValidationError

    ca = CertificateAuthority.generate()
    assert audit_signer(Settings(data_dir=tmp_path), ca).key_id == ac.key_id(ca.key.public_key())
    bad = tmp_path / "audit.pem"
    bad.write_text(ca.cert_pem)  # a certificate, not a private key
    with pytest.raises(ValidationError) as err:
        audit_signer(Settings(data_dir=tmp_path, audit_key_file=bad), ca)
    assert err.value.field == "audit_key_file"
    good = tmp_path / "ed25519.pem"
    from cryptography.hazmat.primitives import serialization

    key = ed25519.Ed25519PrivateKey.generate()
    good.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    assert audit_signer(Settings(data_dir=tmp_path, audit_key_file=good), ca).key_id == ac.key_id(key.public_key())


def test_deleting_the_checkpoints_before_rewriting_is_caught_by_the_signer(db: Database) -> None:
    """Issue 12: checkpoint rows deleted, then history rewritten consistently: the process that signed them
    remembers its last checkpoint, so its verification and its next signing round both fail; a verifier
    without that memory sees every event unsigned."""
    log, tenant = _chain_with_checkpoint(db)
    _sql(db, t.audit_checkpoints.delete())
    prev = ac.GENESIS
    for seq in range(1, 7):
        r = _row(db, tenant, seq)
        h = ac.link(r.chain, r.seq, r.occurred_at, r.tenant_id, r.actor_type, r.actor_id, "rewritten", r.object_type,
                    r.object_id, r.request_id, r.source_ip, r.details, prev)
        _sql(db, t.audit_events.update().where(E.id == r.id).values(action="rewritten", prev_hash=prev, entry_hash=h))
        prev = h
    _sql(db, t.audit_chain_heads.update().where(t.audit_chain_heads.c.chain == tenant).values(entry_hash=prev))
    assert _broken(log) == ("checkpoint_signature_invalid", 6, tenant)
    _fill(log, tenant, 1)
    assert asyncio.run(log.checkpoint()).checkpoints == []
    fresh = _verify(AuditLog(db, verifier=log.verifier), tenant)
    assert fresh.valid and fresh.chains[0].signed_seq == 0 and fresh.chains[0].unsigned_events == 7


def test_a_stopped_server_leaves_every_event_signed(tmp_path: Path) -> None:
    """Issue 12: the server signs the heads at shutdown, so a copy taken after it stopped has nothing unsigned and
    a consistent rewrite of that copy (hashes and head recomputed, no key) fails verification."""
    from .helpers import new_tenant, start_server

    srv = start_server(tmp_path / "cp")
    try:
        tenant = new_tenant(srv)
    finally:
        srv.stop()
    eng = sa.create_engine(sqlite_url(srv.data_dir))
    with eng.begin() as c:
        rows = c.execute(sa.select(t.audit_events).where(E.chain == tenant.tenant_id).order_by(E.seq)).all()
        assert [r.action for r in rows] == ["tenant.create", "api_key.create", "site.create"]
        assert c.execute(sa.select(sa.func.max(t.audit_checkpoints.c.seq))
                         .where(t.audit_checkpoints.c.chain == tenant.tenant_id)).scalar() == 3
        prev = ac.GENESIS
        for r in rows:
            obj = "forged" if r.seq == 2 else r.object_id
            h = ac.link(r.chain, r.seq, r.occurred_at, r.tenant_id, r.actor_type, r.actor_id, r.action, r.object_type,
                        obj, r.request_id, r.source_ip, r.details, prev)
            c.execute(t.audit_events.update().where(E.id == r.id).values(object_id=obj, prev_hash=prev, entry_hash=h))
            prev = h
        c.execute(t.audit_chain_heads.update().where(t.audit_chain_heads.c.chain == tenant.tenant_id)
                  .values(entry_hash=prev))
    eng.dispose()
    out = subprocess.run([sys.executable, "-m", "nkudo.cp.cli", "audit", "verify", "--data-dir", str(srv.data_dir),
                          "--json"], capture_output=True, text=True, cwd=REPO, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    first = json.loads(out.stdout)["first_broken"]
    assert (first["chain"], first["reason"]) == (tenant.tenant_id, "checkpoint_signature_invalid")


def test_members_see_their_chain_as_the_periodic_verification_last_found_it(db: Database) -> None:
    """Issue 13 (audit page): anyone who may read a tenant sees its chain's last verification, without running
    one; nothing before the first, a break once a verification found it, and another tenant's chain never."""
    from nkudo.cp.errors import NotFound

    log, tenancy = _log(db), Tenancy(db, SystemClock())
    admin = Principal(PrincipalKind.ADMIN)
    tid = str(asyncio.run(tenancy.create_tenant(admin, models.TenantCreate(slug="chain-a", name="a"), RequestInfo())).id)
    other = str(asyncio.run(tenancy.create_tenant(admin, models.TenantCreate(slug="chain-b", name="b"),
                                                  RequestInfo())).id)
    _fill(log, tid, 4)
    member = Principal(PrincipalKind.API_KEY, tenant_id=tid, key_id="k")
    assert asyncio.run(log.chain_status(member, tid)) is None  # not verified yet

    _verify(log)  # what the server's periodic verifier does
    seen = asyncio.run(log.chain_status(member, tid))
    assert seen is not None and seen.valid and [c.chain for c in seen.chains] == [tid]
    assert seen.total == 5  # the tenant's creation event and the four recorded
    with pytest.raises(NotFound):
        asyncio.run(log.chain_status(Principal(PrincipalKind.API_KEY, tenant_id=other, key_id="k2"), tid))

    _sql(db, t.audit_events.update().where(E.chain == tid, E.seq == 3).values(action="tampered"))
    assert asyncio.run(log.chain_status(member, tid)).valid  # the last verification still stands ...
    _verify(log)
    broken = asyncio.run(log.chain_status(member, tid))  # ... until the next one finds the break
    assert broken is not None and not broken.valid and broken.first_broken is not None
    assert broken.first_broken.seq == 3
