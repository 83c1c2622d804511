"""Lock-out: repeated failed authentication from one source locks that source out of that credential type.

The state is one row per (source, credential type) in ``auth_lockouts``, so every replica on one PostgreSQL
sees the same locks and counts (SQLite: one process). Rows are written only when an authentication fails;
a request with a credential reads its source's row in the transaction that checks the credential (API key,
enrollment token) or with one indexed read (admin key). The rule itself is ``ratelimit.after_failure``.
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import schema as t
from nkudo.cp.domain import ActorType
from nkudo.cp.errors import TooManyRequests
from nkudo.cp.ports import Clock, Metrics, Transactions
from nkudo.cp.ratelimit import Credential, LockoutPolicy, LockState, after_failure
from nkudo.cp.records import Actor, AuditEntry, RequestInfo
from nkudo.cp.usecases.common import audit
from nkudo.log import get_logger

log = get_logger("cp.lockout")

_WHAT = {Credential.ADMIN_KEY: "admin-key", Credential.API_KEY: "API-key",
         Credential.ENROLLMENT_TOKEN: "enrollment-token", Credential.PASSWORD: "password"}


class LockedOut(TooManyRequests):
    """429 ``LOCKED_OUT``: this source may not use this credential type until ``retry_after`` has passed."""

    code = "LOCKED_OUT"


def _locked_error(cred: Credential, until: float, now: float) -> LockedOut:
    end = dt.datetime.fromtimestamp(until, dt.UTC).isoformat(timespec="seconds")
    return LockedOut(f"too many failed {_WHAT[cred]} attempts from this address; locked out until {end}",
                     retry_after=until - now, code="LOCKED_OUT")


class Lockouts:
    def __init__(self, policy: LockoutPolicy, db: Transactions, metrics: Metrics, clock: Clock) -> None:
        self.policy = policy
        self.db = db
        self.metrics = metrics
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self.policy.enabled

    def now(self) -> float:
        return self.clock.now().timestamp()

    def check_in(self, conn: Connection, source: str | None, cred: Credential) -> None:
        """Raise ``LockedOut`` if ``source`` is locked out of ``cred`` (inside the caller's transaction)."""
        if not self.policy.enabled or source is None:
            return
        lk = t.auth_lockouts.c
        until = conn.execute(sa.select(lk.locked_until).where(lk.source == source, lk.credential == cred.value)
                             ).scalar()
        self._raise_if_locked(source, cred, until)

    async def check(self, source: str | None, cred: Credential) -> None:
        """``check_in`` for a caller without a transaction (the admin key): one autocommit read."""
        if not self.policy.enabled or source is None:
            return
        lk = t.auth_lockouts.c
        try:
            rows = await self.db.select(sa.select(lk.locked_until).where(lk.source == sa.bindparam("s"),
                                                                         lk.credential == sa.bindparam("c")),
                                        {"s": source, "c": cred.value})
        except sa.exc.SQLAlchemyError as exc:
            # The admin key lives outside the database, so an outage must not turn every admin request (above
            # all the detailed /readyz that diagnoses it) into a 500: the key is still compared, only the
            # lock-out (defence in depth against guessing a 32+ character key) is unavailable meanwhile.
            log.warn("lock-out store unavailable; checking the credential without it", credential=cred.value,
                     error=type(exc).__name__)
            return
        self._raise_if_locked(source, cred, rows[0][0] if rows else None)

    def _raise_if_locked(self, source: str, cred: Credential, until: float | None) -> None:
        now = self.now()
        if until is not None and until > now:
            self.metrics.lockout_refusals.labels(cred.value).inc()
            log.warn("request refused: source is locked out", source=source, credential=cred.value)
            raise _locked_error(cred, until, now)

    async def record_failure(self, source: str | None, cred: Credential, info: RequestInfo) -> None:
        """Count one failed authentication of ``cred`` from ``source``; lock it out at the threshold."""
        if not self.policy.enabled or source is None:
            return
        self.metrics.auth_failures.labels(cred.value).inc()
        try:
            until = await self.db.run(self._failure_tx, source, cred, info)
        except sa.exc.SQLAlchemyError as exc:  # the credential is refused all the same; only the count is lost
            log.warn("lock-out store unavailable; failure not counted", credential=cred.value,
                     error=type(exc).__name__)
            return
        if until is not None:
            self.metrics.lockouts.labels(cred.value).inc()
            log.warn("source locked out after repeated failed authentication", source=source,
                     credential=cred.value,
                     until=dt.datetime.fromtimestamp(until, dt.UTC).isoformat(timespec="seconds"))

    async def prune(self) -> int:
        """Delete rows that say nothing any more: no failure for longer than both the window and the longest
        lock, so the count, the lock and the level are all over (a fresh row would decide the same)."""
        before = self.now() - max(self.policy.window, self.policy.max_lock)

        def tx(conn: Connection) -> int:
            lk = t.auth_lockouts.c
            return int(conn.execute(t.auth_lockouts.delete().where(lk.last_failure < before)).rowcount or 0)

        return await self.db.run(tx)

    def _failure_tx(self, conn: Connection, source: str, cred: Credential, info: RequestInfo) -> float | None:
        lk = t.auth_lockouts.c
        # Insert-if-absent, then lock the row: two replicas counting failures of one source never lose one.
        conn.execute(self.db.insert(t.auth_lockouts).values(source=source, credential=cred.value, failures=0,
                                                            level=0).on_conflict_do_nothing())
        where = sa.and_(lk.source == source, lk.credential == cred.value)
        r = conn.execute(sa.select(t.auth_lockouts).where(where).with_for_update()).one()
        now = self.now()
        state = LockState(r.failures, r.window_start, r.level, r.locked_until, r.last_failure)
        new, until = after_failure(state, now, self.policy)
        if new == state:
            return None
        conn.execute(t.auth_lockouts.update().where(where).values(
            failures=new.failures, window_start=new.window_start, level=new.level, locked_until=new.locked_until,
            last_failure=new.last_failure))
        if until is not None:
            audit(conn, info, AuditEntry(Actor(ActorType.SYSTEM), "auth.lockout", None, "source", source[:64],
                                         {"credential": cred.value, "level": new.level,
                                          "locked_seconds": round(until - now)}),
                  dt.datetime.fromtimestamp(now, dt.UTC))
        return until
