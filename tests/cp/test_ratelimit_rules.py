"""Issue 12 part 1: the pure rate-limit and lock-out rules (``nkudo.cp.ratelimit``) and the agent's 429 timing."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from pathlib import Path

import pytest

from nkudo.agent.cpclient import parse_retry_after, rate_limited_delay
from nkudo.cp.ratelimit import (
    DISABLED,
    Limit,
    LockoutPolicy,
    LockState,
    RouteClass,
    address_identity,
    after_failure,
    classify,
    client_address,
    gcra,
    parse_limit,
    retry_after_header,
)
from nkudo.errors import ValidationError


def test_gcra_is_a_token_bucket_and_retry_after_is_the_refill_time() -> None:
    """Issue 12: burst requests pass at once, the next waits exactly one token's time (not a constant)."""
    lim = Limit(rate=1 / 10, burst=3)  # 6/min, burst 3
    tat = None
    for _ in range(3):
        d = gcra(tat, 100.0, lim)
        assert d.allowed
        tat = d.tat
    d = gcra(tat, 100.0, lim)
    assert not d.allowed and d.retry_after == pytest.approx(10.0) and d.tat == tat  # refusal spends nothing
    d = gcra(tat, 104.0, lim)
    assert not d.allowed and d.retry_after == pytest.approx(6.0)
    assert gcra(tat, 110.0, lim).allowed
    assert retry_after_header(0.2) == "1" and retry_after_header(6.0) == "6" and retry_after_header(6.01) == "7"


def test_parse_limit() -> None:
    assert parse_limit("10/min:20", "f") == Limit(10 / 60, 20)
    assert parse_limit("5/s", "f") == Limit(5.0, 5)
    assert parse_limit("0", "f") == DISABLED and not DISABLED.enabled
    assert parse_limit(Limit(2.0, 120).spec(), "f") == Limit(2.0, 120)
    for bad in ("", "ten", "10/week", "10/min:", "-1", "10/min:20x", "1e9/s"):
        with pytest.raises(ValidationError) as e:
            parse_limit(bad, "rate_limit_enroll")
        assert e.value.field == "rate_limit_enroll" and "--rate-limit-enroll" in e.value.message


def test_classify() -> None:
    assert classify("/v1/enroll") is RouteClass.ENROLL
    assert classify("/v1/heartbeat") is RouteClass.HEARTBEAT and classify("/v1/plans/next") is RouteClass.HEARTBEAT
    assert classify("/v1/executions/result") is RouteClass.AGENT
    assert classify("/tenants") is RouteClass.MANAGEMENT
    assert classify("/tenants/x/api-keys/y") is RouteClass.MANAGEMENT
    assert classify("/tenants/x/sites") is RouteClass.DEFAULT and classify("/nope") is RouteClass.DEFAULT


def test_forwarded_headers_only_from_trusted_proxies() -> None:
    """Issue 12: X-Forwarded-For/X-Real-IP count only when the peer is a --trusted-proxy; then the rightmost
    hop that is not a trusted proxy is the client (what the client wrote to the left is ignored)."""
    proxies = (ipaddress.ip_network("10.0.0.0/8"),)
    assert client_address("203.0.113.9", "1.2.3.4", "5.6.7.8", proxies) == "203.0.113.9"  # untrusted peer
    assert client_address("203.0.113.9", "1.2.3.4", None, ()) == "203.0.113.9"
    assert client_address("10.0.0.1", "1.2.3.4, 198.51.100.7", None, proxies) == "198.51.100.7"
    assert client_address("10.0.0.1", "198.51.100.7, 10.0.0.2", None, proxies) == "198.51.100.7"
    assert client_address("10.0.0.1", "garbage, 10.0.0.2", None, proxies) == "10.0.0.2"
    assert client_address("10.0.0.1", None, "198.51.100.8", proxies) == "198.51.100.8"
    assert client_address("::ffff:10.0.0.1", "198.51.100.7", None, proxies) == "198.51.100.7"
    assert client_address(None, "1.2.3.4", None, proxies) == "unknown"
    assert address_identity("2001:db8::1") == address_identity("2001:db8::ffff") == "ip:2001:db8::/64"


def test_lockout_grows_doubles_expires_and_forgives() -> None:
    """Issue 12: 5 failures in the window lock for base, then 2x base...; a quiet max_lock resets the level;
    failures outside the window start a new count; failures while locked are not counted."""
    pol = LockoutPolicy(threshold=3, window=60, base=10, max_lock=35)
    s, t = LockState(), 0.0
    for i in range(3):
        s, until = after_failure(s, t + i, pol)
    assert until == 2 + 10 and s.level == 1 and s.locked(5) and not s.locked(12.5)
    assert after_failure(s, 5, pol) == (s, None)  # locked: not counted
    for i in range(3):
        s, until = after_failure(s, 20 + i, pol)
    assert until == 22 + 20  # doubled
    for i in range(3):
        s, until = after_failure(s, 50 + i, pol)
    assert until == 52 + 35  # capped at max_lock
    s, until = after_failure(s, 200, pol)
    assert until is None and s.failures == 1 and s.level == 0  # quiet for > max_lock: forgiven
    s2, _ = after_failure(LockState(failures=2, window_start=0, last_failure=1), 61, pol)
    assert s2.failures == 1  # outside the window: a new count
    assert after_failure(LockState(), 0, LockoutPolicy(threshold=0)) == (LockState(), None)  # disabled


def test_agent_waits_at_least_retry_after() -> None:
    """Issue 12: the agent's delay after a 429 is never below Retry-After, nor below 1 s (no hot loop)."""
    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert parse_retry_after("Tue, 01 Jan 2030 00:00:30 GMT", now) == 30.0
    assert parse_retry_after("Tue, 01 Jan 2030 00:00:00 GMT", now + dt.timedelta(seconds=5)) == 0.0
    for rand in (0.0, 0.5, 0.999):
        assert 7.0 <= rate_limited_delay(7.0, 0.5, rand) <= 8.4
        assert rate_limited_delay(0.0, 0.1, rand) >= 1.0
        assert rate_limited_delay(None, 3.0, rand) >= 3.0


class _Clock:
    def __init__(self) -> None:
        self.t = dt.datetime(2031, 1, 1, tzinfo=dt.UTC)

    def now(self) -> dt.datetime:
        return self.t


def test_lockout_rows_are_shared_state_and_pruned_when_over(tmp_path: Path) -> None:
    """Issue 12: the lock-out use case on its ports alone (real SQLite, fixed clock): the threshold locks,
    the lock is refused with LOCKED_OUT until it ends, and rows whose every effect is over are pruned."""
    from nkudo.cp.db import Database, sqlite_url
    from nkudo.cp.metrics import Metrics
    from nkudo.cp.ratelimit import Credential
    from nkudo.cp.records import RequestInfo
    from nkudo.cp.usecases.lockout import LockedOut, Lockouts

    db = Database(sqlite_url(tmp_path), pool_size=1)
    try:
        db.migrate()
        clock = _Clock()
        lk = Lockouts(LockoutPolicy(threshold=2, window=60, base=30, max_lock=100), db, Metrics(), clock)

        async def scenario() -> None:
            for _ in range(2):
                await lk.record_failure("198.51.100.1", Credential.API_KEY, RequestInfo())
            with pytest.raises(LockedOut) as e:
                await lk.check("198.51.100.1", Credential.API_KEY)
            assert e.value.status == 429 and e.value.retry_after == pytest.approx(30)
            await lk.check("198.51.100.2", Credential.API_KEY)  # another source
            await lk.check("198.51.100.1", Credential.ADMIN_KEY)  # another credential type
            await lk.record_failure("198.51.100.3", Credential.ADMIN_KEY, RequestInfo())
            clock.t += dt.timedelta(seconds=90)
            await lk.check("198.51.100.1", Credential.API_KEY)  # the lock is over
            assert await lk.prune() == 0  # but the level still matters until max_lock has passed
            clock.t += dt.timedelta(seconds=20)
            assert await lk.prune() == 2

        asyncio.run(scenario())
    finally:
        db.close()
