"""The audit log: reading it, recording events that change nothing else, verifying and checkpointing the chains.

Events of a change are appended by ``common.audit`` in that change's transaction; this module owns the rest
of the aggregate. Verification reads through the autocommit reader (``Transactions.select``), statement by
statement, in an order that makes a concurrent append look like nothing at all: checkpoints first, then the
events, then the head, then any events the head has since gained. So it never holds a write lock (SQLite's
writers keep going) and never reports an append that raced it as tampering.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from nkudo.cp import auditchain as ac
from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.domain import ActorType
from nkudo.cp.errors import BadRequest, Unavailable
from nkudo.cp.paging import MAX_LIMIT, PageKind, after, check_limit, cut
from nkudo.cp.ports import Clock, Metrics, SystemClock, Transactions
from nkudo.cp.records import Actor, AuditEntry, Principal, RequestInfo, stamp
from nkudo.cp.usecases.common import audit, require_admin, tenant_scope
from nkudo.log import get_logger
from nkudo.wire.messages import UUID_PATTERN

log = get_logger("cp.audit")

_E = t.audit_events.c
_H = t.audit_chain_heads.c
_K = t.audit_checkpoints.c
_PAGE = 5000
_CHAIN_COLUMNS = (_E.id, _E.chain, _E.seq, _E.occurred_at, _E.tenant_id, _E.actor_type, _E.actor_id, _E.action,
                  _E.object_type, _E.object_id, _E.request_id, _E.source_ip, _E.details, _E.prev_hash,
                  _E.entry_hash)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which events a listing returns (validated by the HTTP layer); newest first, ``before_id`` pages back."""

    limit: int = 100
    before_id: int | None = None
    action: str | None = None
    actor_type: ActorType | None = None
    object_type: str | None = None
    object_id: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    #: Admin listing only: one chain (a tenant id or ``global``); ``None`` lists every chain.
    chain: str | None = None
    #: Issue 13: the previous page's ``next`` (checked by the listing it belongs to).
    cursor: str | None = None


_ACTION = re.compile(r"[a-z][a-z0-9_.]{0,63}\Z")
_OBJECT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
_OBJECT_ID = re.compile(r"[\x21-\x7e]{1,64}\Z")
_CHAIN = re.compile(rf"(?:{ac.GLOBAL_CHAIN}|{UUID_PATTERN.removeprefix('^').removesuffix(chr(92) + 'Z')})\Z")


def parse_filter(query: Mapping[str, str], *, admin: bool) -> AuditFilter:
    """The listing filter from query parameters: the one definition of what each may hold (400 naming it).

    ``limit`` 1-1000 (100), ``before_id`` a positive event id (the previous page's ``next_before_id``),
    ``action``/``object_type``/``object_id`` exact matches, ``actor_type`` one of ``ActorType``, ``since``/
    ``until`` RFC 3339 times (``until`` exclusive); on the admin listing also ``chain`` (a tenant id or
    ``global``).
    """
    known = {"limit", "before_id", "action", "actor_type", "object_type", "object_id", "since", "until", "cursor"}
    if admin:
        known.add("chain")
    for name in query:
        if name not in known:
            raise BadRequest(f"unknown query parameter {name!r}; known: {', '.join(sorted(known))}", field=name)

    def text(name: str, pattern: re.Pattern[str]) -> str | None:
        raw = query.get(name)
        if raw is not None and not pattern.match(raw):
            raise BadRequest(f"{name} has an invalid value", field=name)
        return raw

    def number(name: str, lo: int, hi: int) -> int | None:
        raw = query.get(name)
        if raw is None:
            return None
        if not raw.isascii() or not raw.isdigit() or not lo <= int(raw) <= hi:
            raise BadRequest(f"{name} must be an integer between {lo} and {hi}", field=name)
        return int(raw)

    def when(name: str) -> dt.datetime | None:
        raw = query.get(name)
        if raw is None:
            return None
        try:
            ts = dt.datetime.fromisoformat(raw)
        except ValueError:
            ts = None
        if ts is None or ts.tzinfo is None:
            raise BadRequest(f"{name} must be an RFC 3339 time with a zone (2024-05-01T12:00:00Z)", field=name)
        return ts.astimezone(dt.UTC)

    actor = query.get("actor_type")
    if actor is not None and actor not in ActorType.__members__.values():
        raise BadRequest(f"actor_type must be one of {', '.join(a.value for a in ActorType)}", field="actor_type")
    return AuditFilter(
        limit=number("limit", 1, MAX_LIMIT) or 100, before_id=number("before_id", 1, 2**62), cursor=query.get("cursor"),
        action=text("action", _ACTION), actor_type=ActorType(actor) if actor is not None else None,
        object_type=text("object_type", _OBJECT_TYPE), object_id=text("object_id", _OBJECT_ID),
        since=when("since"), until=when("until"), chain=text("chain", _CHAIN) if admin else None)


def _where(f: AuditFilter) -> list[sa.ColumnElement[bool]]:
    conds: list[sa.ColumnElement[bool]] = []
    if f.before_id is not None:
        conds.append(_E.id < f.before_id)
    if f.action is not None:
        conds.append(_E.action == f.action)
    if f.actor_type is not None:
        conds.append(_E.actor_type == f.actor_type.value)
    if f.object_type is not None:
        conds.append(_E.object_type == f.object_type)
    if f.object_id is not None:
        conds.append(_E.object_id == f.object_id)
    if f.since is not None:
        conds.append(_E.occurred_at >= f.since)
    if f.until is not None:
        conds.append(_E.occurred_at < f.until)
    if f.chain is not None:
        conds.append(_E.chain == f.chain)
    return conds


def _chain_view(r: Row[Any]) -> v.AuditChainEventView:
    return v.AuditChainEventView(
        id=r.id, chain=r.chain, seq=r.seq, tenant_id=r.tenant_id, actor_type=r.actor_type, actor_id=r.actor_id,
        action=r.action, object_type=r.object_type, object_id=r.object_id, request_id=r.request_id,
        source_ip=r.source_ip, details=r.details, occurred_at=stamp(r.occurred_at), prev_hash=r.prev_hash,
        entry_hash=r.entry_hash)


def _break_view(b: ac.Break | None) -> v.AuditBreakView | None:
    return None if b is None else v.AuditBreakView(chain=b.chain, seq=b.seq, event_id=b.event_id, reason=b.reason,
                                                    detail=b.detail)


def _checkpoint(r: Row[Any]) -> ac.Checkpoint:
    return ac.Checkpoint(r.chain, r.seq, r.entry_hash, r.signed_at, r.key_id, r.signature)


class AuditLog:
    """Listing, recording, verifying and checkpointing the audit chains.

    ``signer`` signs checkpoints (the CA key or ``--audit-key-file``; never stored in the database);
    ``verifier`` holds the public keys checkpoints are checked against (the signer's by default).
    """

    def __init__(self, db: Transactions, clock: Clock | None = None, metrics: Metrics | None = None,
                 signer: ac.Signer | None = None, verifier: ac.Verifier | None = None) -> None:
        self.db = db
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics
        self.signer = signer
        self.verifier = verifier or (signer.verifier() if signer else ac.Verifier([]))
        #: The newest checkpoint this process signed per chain. Kept outside the database so that deleting
        #: checkpoint rows and then rewriting history consistently still fails here (verify, next signing).
        self._signed: dict[str, ac.Checkpoint] = {}
        #: The last verification of every chain (the server's periodic verifier): what a tenant's members see
        #: of their chain without reading it again on each page view (issue 13's audit page).
        self.last_report: v.AuditVerifyReport | None = None

    def use_keys(self, signer: ac.Signer | None, verifier: ac.Verifier | None = None) -> None:
        """Install the audit key once the server has loaded it (the facade is built before)."""
        self.signer = signer
        self.verifier = verifier or (signer.verifier() if signer else ac.Verifier([]))

    # --- reading -----------------------------------------------------------------

    async def list_audit(self, p: Principal, tenant_id: str, limit: int = 100, flt: AuditFilter | None = None,
                         *, cursor: str | None = None) -> v.AuditEvents:
        """A tenant's own chain, newest first (``flt`` narrows it; ``cursor`` or ``before_id`` pages back)."""
        f = flt or AuditFilter(limit=limit)
        limit = check_limit(f.limit)
        key = after(PageKind.AUDIT, cursor or f.cursor)

        def tx(conn: Connection) -> v.AuditEvents:
            tenant_scope(conn, p, tenant_id)
            resume = _E.id < key[0] if key else sa.true()
            found = conn.execute(sa.select(t.audit_events).where(_E.chain == tenant_id, resume, *_where(f))
                                 .order_by(_E.id.desc()).limit(limit + 1)).all()
            rows, nxt = cut(PageKind.AUDIT, found, limit, lambda r: (r.id,))
            return v.AuditEvents(next=nxt, events=[v.AuditEventView(
                id=r.id, tenant_id=r.tenant_id, actor_type=r.actor_type, actor_id=r.actor_id, action=r.action,
                object_type=r.object_type, object_id=r.object_id, request_id=r.request_id, source_ip=r.source_ip,
                details=r.details, occurred_at=stamp(r.occurred_at),
            ) for r in rows])

        return await self.db.run(tx)

    async def list_events(self, p: Principal, f: AuditFilter) -> v.AuditEventPage:
        """Every chain's events (admin), newest first, with their chain fields."""
        require_admin(p)
        key = after(PageKind.ADMIN_AUDIT, f.cursor)
        resume = _E.id < key[0] if key else sa.true()
        found = await self.db.select(sa.select(*_CHAIN_COLUMNS).where(resume, *_where(f)).order_by(_E.id.desc())
                                     .limit(check_limit(f.limit) + 1), {})
        rows, nxt = cut(PageKind.ADMIN_AUDIT, found, f.limit, lambda r: (r.id,))
        events = [_chain_view(r) for r in rows]
        return v.AuditEventPage(events=events, next_before_id=events[-1].id if len(events) == f.limit else None,
                                next=nxt)

    # --- recording ---------------------------------------------------------------

    async def record(self, info: RequestInfo, entry: AuditEntry) -> None:
        """Append an event that records no change of its own, in a transaction of its own.

        For the security events other parts report: a refused enrollment (``record_refused_enrollment``), a
        lock-out (``tenant_id=None`` puts it in the ``global`` chain, with ``info.source_ip`` as its source).
        Never put a presented secret (token, key) in ``entry.details``: name the reason code instead.
        """
        await self.db.run(lambda conn: audit(conn, info, entry, self.clock.now()))

    async def record_refused_enrollment(self, info: RequestInfo, reason: str) -> None:
        """Log a refused ``/v1/enroll`` to the global chain with its source address and reason code.

        Never raises: the caller is answering the refusal and must not turn it into a 500 (a failure here is
        logged). The presented token is never recorded, only the code (``TOKEN_INVALID``...).
        """
        entry = AuditEntry(Actor(ActorType.SYSTEM), "agent.enroll_refused", None, "source",
                           (info.source_ip or "unknown")[:64], {"reason": reason})
        try:
            await self.record(info, entry)
        except Exception:
            log.exception("could not record a refused enrollment in the audit log", reason=reason)

    # --- verification ------------------------------------------------------------

    async def verify(self, p: Principal, tenant_id: str | None = None) -> v.AuditVerifyReport:
        """``POST /admin/audit/verify``: every chain, or one tenant's."""
        require_admin(p)
        return await self.verify_chains(tenant_id)

    async def chain_status(self, p: Principal, tenant_id: str) -> v.AuditVerifyReport | None:
        """The tenant's chain as this process last verified it (every chain, periodically), for anyone who may
        read the tenant: the result of a verification, not a new one; None before the first has run."""
        await self.db.run(lambda conn: tenant_scope(conn, p, tenant_id))
        last = self.last_report
        if last is None:
            return None
        chains = [c for c in last.chains if c.chain == tenant_id]
        if not chains:  # the tenant's first events came after that verification
            return None
        broken = next((c.broken for c in chains if c.broken is not None), None)
        return v.AuditVerifyReport(valid=broken is None, total=sum(c.events for c in chains), chains=chains,
                                   first_broken=broken, verified_at=last.verified_at)

    async def verify_chains(self, chain: str | None = None) -> v.AuditVerifyReport:
        """Verify every chain (``chain=None``, which also updates the metrics) or one."""
        results = [await self._verify_one(c) for c in await self._chains(chain)]
        chains = [v.AuditChainView(
            chain=r.chain, events=r.events, head_seq=r.head_seq, checkpoints=r.checkpoints, signed_seq=r.signed_seq,
            unsigned_events=max(0, r.head_seq - r.signed_seq), broken=_break_view(r.broken)) for r in results]
        first = next((c.broken for c in chains if c.broken is not None), None)
        total = sum(r.events for r in results)
        report = v.AuditVerifyReport(valid=first is None, total=total, chains=chains, first_broken=first,
                                     verified_at=stamp(self.clock.now()))
        if chain is None:
            self.last_report = report
        if chain is None and self.metrics is not None:
            m = self.metrics
            m.audit_valid.set(1 if report.valid else 0)
            m.audit_verifications.labels("valid" if report.valid else "broken").inc()
            m.audit_events_verified.set(total)
            m.audit_unsigned_events.set(sum(c.unsigned_events for c in chains))
            m.audit_last_verified.set(self.clock.now().timestamp())
        return report

    async def _chains(self, chain: str | None) -> list[str]:
        if chain is not None:
            return [chain]
        names: set[str] = set()
        for stmt in (sa.select(_H.chain), sa.select(_E.chain).distinct(), sa.select(_K.chain).distinct()):
            names.update(r[0] for r in await self.db.select(stmt, {}))
        return sorted(names)

    async def _verify_one(self, chain: str) -> ac.ChainResult:
        cps = [_checkpoint(r) for r in await self.db.select(
            sa.select(t.audit_checkpoints).where(_K.chain == chain).order_by(_K.seq), {})]
        mine = self._signed.get(chain)
        if mine is not None and mine not in cps:  # a checkpoint row we wrote is gone (or altered): check ours
            cps.append(mine)
        events = await self._events(chain, 0)
        head_rows = await self.db.select(sa.select(_H.seq, _H.entry_hash).where(_H.chain == chain), {})
        head = ac.Head(head_rows[0].seq, head_rows[0].entry_hash) if head_rows else None
        last = events[-1].seq if events else 0
        if head is not None and head.seq > last:  # appended while we read (or deleted: then nothing comes)
            events += await self._events(chain, last)
        return await asyncio.to_thread(ac.verify_chain, chain, events, head, cps, self.verifier)

    async def _events(self, chain: str, after: int, upto: int | None = None) -> list[Row[Any]]:
        """The chain's events with ``after < seq <= upto`` in ``(seq, id)`` order, read in pages.

        Why pages: the reader thread also serves the heartbeat's batched reads, which must not queue behind
        one 100,000-row statement. Keyset paging on ``(seq, id)`` keeps even duplicated sequence numbers.
        """
        out: list[Row[Any]] = []
        cond = [_E.chain == chain, _E.seq > after] + ([_E.seq <= upto] if upto is not None else [])
        last: tuple[int, int] | None = None
        while True:
            page_cond = list(cond)
            if last is not None:
                page_cond.append(sa.or_(_E.seq > last[0], sa.and_(_E.seq == last[0], _E.id > last[1])))
            page = await self.db.select(sa.select(*_CHAIN_COLUMNS).where(*page_cond).order_by(_E.seq, _E.id)
                                        .limit(_PAGE), {})
            out += page
            if len(page) < _PAGE:
                return out
            last = (page[-1].seq, page[-1].id)

    # --- checkpoints -------------------------------------------------------------

    async def checkpoint_now(self, p: Principal) -> v.AuditCheckpoints:
        """``POST /admin/audit/checkpoint``: sign every chain head that moved since its last checkpoint."""
        require_admin(p)
        return await self.checkpoint()

    async def checkpoint(self) -> v.AuditCheckpoints:
        """Sign the head of every chain that grew since its last checkpoint (the periodic task calls this).

        The events since the last checkpoint are verified first, and a chain that fails is not signed (the
        error is logged and counted): a checkpoint must never bless a rewritten history. Two replicas signing
        the same head at once store one checkpoint (``(chain, seq)`` is unique).
        """
        signer = self.signer
        if signer is None:
            raise Unavailable("no audit signing key is configured", code="AUDIT_KEY_MISSING")
        heads = await self.db.select(sa.select(_H.chain, _H.seq, _H.entry_hash).where(_H.seq > 0), {})
        latest = sa.select(_K.chain, sa.func.max(_K.seq).label("seq")).group_by(_K.chain).subquery()
        bases = {r.chain: _checkpoint(r) for r in await self.db.select(
            sa.select(t.audit_checkpoints).join(latest, sa.and_(latest.c.chain == _K.chain, latest.c.seq == _K.seq)),
            {})}
        made: list[v.AuditCheckpointView] = []
        for h in heads:
            base, mine = bases.get(h.chain), self._signed.get(h.chain)
            if mine is not None and (base is None or mine.seq > base.seq):
                base = mine  # the rows of our newer checkpoint are gone: verify from what we signed
            if base is not None and base.seq >= h.seq:
                continue
            events = await self._events(h.chain, base.seq if base else 0, h.seq)
            res = await asyncio.to_thread(ac.verify_chain, h.chain, events, ac.Head(h.seq, h.entry_hash), [],
                                          self.verifier, base=base)
            if res.broken is not None:
                b = res.broken
                log.error("audit chain broken: not signing a checkpoint", chain=h.chain, seq=b.seq,
                          reason=b.reason.value, detail=b.detail)
                self._count_checkpoint("refused")
                continue
            now = self.clock.now()
            cp = ac.Checkpoint(h.chain, h.seq, h.entry_hash, now, signer.key_id,
                               signer.sign(ac.checkpoint_statement(h.chain, h.seq, h.entry_hash, now)))
            await self.db.run(self._store_checkpoint, cp)
            self._signed[h.chain] = cp
            made.append(v.AuditCheckpointView(chain=cp.chain, seq=cp.seq, entry_hash=cp.entry_hash,
                                              signed_at=stamp(cp.signed_at), key_id=cp.key_id,
                                              signature=cp.signature))
            self._count_checkpoint("signed")
        return v.AuditCheckpoints(checkpoints=made)

    def _store_checkpoint(self, conn: Connection, cp: ac.Checkpoint) -> None:
        conn.execute(self.db.insert(t.audit_checkpoints).values(
            chain=cp.chain, seq=cp.seq, entry_hash=cp.entry_hash, signed_at=cp.signed_at, key_id=cp.key_id,
            signature=cp.signature).on_conflict_do_nothing(index_elements=["chain", "seq"]))

    def _count_checkpoint(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.audit_checkpoints.labels(outcome).inc()
