"""Where the token buckets live: in this process, and on PostgreSQL in one table shared by every replica.

How a check is made (the rules are ``nkudo.cp.ratelimit.gcra``):

* Every bucket has an in-process copy (a dict of TATs). A request the copy already refuses is answered 429
  without touching the database, so a flood from one client costs a dict lookup per request.
* SQLite (one process): the in-process copy is the bucket.
* PostgreSQL, *exact* classes (enroll, management, default): one atomic ``INSERT ... ON CONFLICT DO UPDATE
  ... RETURNING`` on the UNLOGGED ``rate_limit_buckets`` row decides (the row lock serialises replicas), and
  the copy takes the row's TAT: one autocommit statement (one round trip) per request.
* PostgreSQL, *synced* classes (heartbeat and the other agent routes, keyed by the verified agent id): the
  first request of a client on a replica (or the first after ``RESYNC_AFTER`` seconds without news of its
  bucket) is checked exactly, like above; after that the copy decides, and every ``SYNC_INTERVAL`` one batched
  UPSERT adds what each replica spent to the shared row and hands the sum back to every copy. A steady
  heartbeat therefore costs no database round trip; a client that alternates replicas is held to one shared
  rate, and can exceed its burst only by what the other replicas admit within one sync interval.

Database errors never refuse a request (the limiter fails open and logs, summarised): an outage must not
turn into a 429 storm on top of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa

from nkudo.cp.metrics import Metrics
from nkudo.cp.ratelimit import Decision, IPNetwork, Limit, RouteClass, bucket_key, gcra
from nkudo.log import get_logger

log = get_logger("cp.ratelimit")

#: Seconds between two pushes of the synced classes' spending to PostgreSQL.
SYNC_INTERVAL = 0.25
#: In-process buckets kept before expired ones (TAT in the past: a full bucket) are dropped.
MAX_LOCAL = 100_000
SYNCED = frozenset({RouteClass.HEARTBEAT, RouteClass.AGENT})
#: Seconds after which a synced bucket's copy is no longer trusted without an exact check (longer than any
#: heartbeat interval, so a steady agent never pays one; a copy this old may miss another replica's spending).
RESYNC_AFTER = 120.0

_EXACT = sa.text("""
INSERT INTO rate_limit_buckets AS b (bucket, tat, allowed, spent)
VALUES (:k, CAST(:now AS double precision) + :t, true, 0)
ON CONFLICT (bucket) DO UPDATE SET
  tat = CASE WHEN GREATEST(b.tat, CAST(:now AS double precision)) + :t - :now <= :tau
             THEN GREATEST(b.tat, CAST(:now AS double precision)) + :t ELSE b.tat END,
  allowed = GREATEST(b.tat, CAST(:now AS double precision)) + :t - :now <= :tau
RETURNING tat, allowed
""")

# excluded.tat is the local TAT, excluded.spent what this replica admitted since its last push: the shared
# TAT becomes max(shared + spent, local), which is the local TAT itself when only this replica is used.
_SYNC = sa.text("""
INSERT INTO rate_limit_buckets AS b (bucket, tat, allowed, spent)
SELECT u.k, u.tat, true, u.spent
FROM unnest(CAST(:keys AS text[]), CAST(:tats AS double precision[]), CAST(:spent AS double precision[]))
     AS u(k, tat, spent)
ORDER BY u.k
ON CONFLICT (bucket) DO UPDATE SET tat = GREATEST(b.tat + excluded.spent, excluded.tat), spent = excluded.spent
RETURNING bucket, tat
""")

_PRUNE = sa.text("DELETE FROM rate_limit_buckets WHERE tat < :before")


class LocalBuckets:
    """In-process TATs by bucket key."""

    __slots__ = ("synced", "tats")

    def __init__(self) -> None:
        self.tats: dict[str, float] = {}
        self.synced: dict[str, float] = {}  # when each copy was last reconciled with the shared row

    def absorb(self, key: str, tat: float, now: float) -> None:
        """Take a TAT learned from the shared row (never moves the local one back)."""
        if tat > self.tats.get(key, 0.0):
            self.tats[key] = tat
        self.synced[key] = now

    def prune(self, now: float) -> None:
        """Drop buckets that are full again (their TAT is past): absent means full, so nothing changes."""
        self.tats = {k: v for k, v in self.tats.items() if v > now}
        self.synced = {k: v for k, v in self.synced.items() if k in self.tats}


class RateLimiter:
    """One process's limiter: per-class limits, the in-process buckets and, on PostgreSQL, the shared table."""

    def __init__(self, limits: Mapping[RouteClass, Limit], metrics: Metrics, database_url: str | None = None,
                 clock: Callable[[], float] = time.time, proxies: Sequence[IPNetwork] = ()) -> None:
        self.limits = dict(limits)
        self.proxies = tuple(proxies)  # --trusted-proxy: whose X-Forwarded-For / X-Real-IP is believed
        #: The classes with a limit (a disabled class costs the middleware one set lookup).
        self.active = frozenset(c for c, lim in self.limits.items() if lim.enabled)
        self.metrics = metrics
        self.clock = clock
        self.local = LocalBuckets()
        self._engine: sa.Engine | None = None
        self._pool: ThreadPoolExecutor | None = None
        if database_url is not None:
            # No pre-ping (it would double the round trips): a dead connection fails one check open and is
            # replaced by the pool.
            self._engine = sa.create_engine(database_url, pool_size=4, max_overflow=0, isolation_level="AUTOCOMMIT")
            self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="nkudo-ratelimit")
        self._spent: dict[str, tuple[int, Limit]] = {}

    @property
    def shared(self) -> bool:
        return self._engine is not None

    def check_local(self, cls: RouteClass, identity: str) -> float | None:
        """The in-process part of one check, with no await (so a heartbeat pays no coroutine for it).

        Returns the seconds to wait (``0.0``: allowed), or ``None`` when the shared table must decide
        (PostgreSQL: the exact classes, and a synced bucket this replica has no recent news of). A request
        the in-process copy already refuses is refused here on every backend. Counted in the metrics unless
        ``None`` is returned (``check_shared`` counts those).
        """
        limit = self.limits[cls]
        key = f"{cls.value}|{identity}"
        now = self.clock()
        d = gcra(self.local.tats.get(key), now, limit)
        if not d.allowed:
            self.metrics.rate_limited(cls.value, False)
            return d.retry_after
        if self._engine is not None:
            if cls not in SYNCED or now - self.local.synced.get(key, -RESYNC_AFTER) >= RESYNC_AFTER:
                return None
            n, _ = self._spent.get(key, (0, limit))
            self._spent[key] = (n + 1, limit)
        self.local.tats[key] = d.tat
        if len(self.local.tats) > MAX_LOCAL:
            self.local.prune(now)
        self.metrics.rate_limited(cls.value, True)
        return 0.0

    async def check_shared(self, cls: RouteClass, identity: str) -> float:
        """The exact check on the shared row (PostgreSQL): seconds to wait, ``0.0`` when allowed."""
        now = self.clock()
        d = await self._exact(bucket_key(cls, identity), now, self.limits[cls])
        self.metrics.rate_limited(cls.value, d.allowed)
        return d.retry_after

    async def check(self, cls: RouteClass, identity: str) -> float:
        """``check_local``, then ``check_shared`` where the shared table must decide."""
        wait = self.check_local(cls, identity)
        return await self.check_shared(cls, identity) if wait is None else wait

    async def _exact(self, key: str, now: float, limit: Limit) -> Decision:
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        try:
            tat, allowed = await loop.run_in_executor(self._pool, self._exact_now, key, now, limit)
        except Exception as exc:
            log.warn("shared rate-limit check failed; allowing the request", error=str(exc)[:200])
            return Decision(True, now, 0.0)
        self.local.absorb(key, tat, now)
        if allowed:
            return Decision(True, tat, 0.0)
        return Decision(False, tat, max(tat, now) + limit.interval - limit.tau - now)

    def _exact_now(self, key: str, now: float, limit: Limit) -> tuple[float, bool]:
        assert self._engine is not None
        with self._engine.connect() as conn:
            row = conn.execute(_EXACT, {"k": key, "now": now, "t": limit.interval, "tau": limit.tau}).one()
        return float(row[0]), bool(row[1])

    def _sync_now(self, keys: list[str], tats: list[float], spent: list[float]) -> list[tuple[str, float]]:
        assert self._engine is not None
        with self._engine.connect() as conn:
            rows = conn.execute(_SYNC, {"keys": keys, "tats": tats, "spent": spent})
            return [(str(r[0]), float(r[1])) for r in rows]

    async def sync(self) -> int:
        """Push what the synced classes spent here since the last push; take the shared TATs back."""
        if self._engine is None or not self._spent:
            return 0
        batch, self._spent = self._spent, {}
        keys = sorted(batch)
        tats = [self.local.tats.get(k, 0.0) for k in keys]
        spent = [batch[k][0] * batch[k][1].interval for k in keys]
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._pool, self._sync_now, keys, tats, spent)
        now = self.clock()
        for key, tat in rows:
            self.local.absorb(key, tat, now)
        return len(rows)

    async def prune(self) -> None:
        now = self.clock()
        self.local.prune(now)
        if self._engine is not None:
            assert self._pool is not None
            engine = self._engine

            def delete() -> None:
                with engine.connect() as conn:
                    conn.execute(_PRUNE, {"before": now - 60.0})

            await asyncio.get_running_loop().run_in_executor(self._pool, delete)

    async def _background(self) -> None:
        last_prune = time.monotonic()
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                await self.sync()
                if time.monotonic() - last_prune > 60.0:
                    last_prune = time.monotonic()
                    await self.prune()
            except Exception as exc:
                log.warn("rate-limit sync failed; buckets stay local until it works again", error=str(exc)[:200])

    async def lifecycle(self, _app: Any) -> AsyncIterator[None]:
        """aiohttp ``cleanup_ctx``: the sync/prune task for the app's lifetime, then the engine is closed."""
        task = asyncio.create_task(self._background())
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if self._engine is not None:
            try:
                await self.sync()
            except Exception as exc:
                log.warn("last rate-limit sync failed", error=str(exc)[:200])
            self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._engine is not None:
            self._engine.dispose()
