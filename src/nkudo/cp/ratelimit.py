"""Rate-limit and lock-out rules (pure): route classes, token buckets, client identity, lock-out growth.

Nothing here touches a socket, a clock or a database: the adapters (``nkudo.cp.ratestore``, the HTTP
middleware, ``nkudo.cp.usecases.lockout``) pass the time and the stored state in and apply the answers, so
every rule is testable in microseconds and identical for SQLite, PostgreSQL and any number of replicas.

Why GCRA (the "generic cell rate algorithm") for the token bucket: it *is* a token bucket of ``rate``
tokens a second and ``burst`` capacity, but its whole state is one number per bucket, the theoretical
arrival time (TAT). The shared PostgreSQL bucket is therefore one atomic UPSERT of one float, and the
in-process one a dict of floats. A request at ``now`` is allowed iff ``max(tat, now) + 1/rate - now <=
burst/rate``; it then moves the TAT by ``1/rate``. A refused request does not move it, and the next one is
allowed after ``max(tat, now) + 1/rate - burst/rate - now`` seconds: that is the ``Retry-After``.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nkudo.errors import ValidationError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RouteClass(enum.StrEnum):
    """What a request is, for rate limiting (one bucket per client and class)."""

    ENROLL = "enroll"  # POST /v1/enroll: unauthenticated, per address, strict
    HEARTBEAT = "heartbeat"  # /v1/heartbeat, /v1/plans/next: per agent, sized far above any interval
    AGENT = "agent"  # the other mTLS routes (results, logs, renew, unenroll): per agent
    MANAGEMENT = "management"  # /tenants and /tenants/{id}/api-keys[/...]: per key, moderate
    LOGIN = "login"  # POST /ui/login, POST /ui/invite/{token} (issue 13): per address, strict (password guessing)
    DEFAULT = "default"  # everything else, unknown paths included: generous


class Credential(enum.StrEnum):
    """The credential types a source can be locked out of."""

    ADMIN_KEY = "admin_key"
    API_KEY = "api_key"
    ENROLLMENT_TOKEN = "enrollment_token"  # noqa: S105 - a credential type, not a secret
    PASSWORD = "password"  # noqa: S105 - dashboard logins (issue 13)


@dataclass(frozen=True, slots=True)
class Limit:
    """``rate`` requests a second with bursts of ``burst``; a rate of 0 disables the class."""

    rate: float
    burst: int

    @property
    def enabled(self) -> bool:
        return self.rate > 0 and self.burst > 0

    @property
    def interval(self) -> float:
        """Seconds one request costs (the time one token takes to come back)."""
        return 1.0 / self.rate

    @property
    def tau(self) -> float:
        """The bucket's capacity as time: how far ahead of now the TAT may run."""
        return self.burst / self.rate

    def spec(self) -> str:
        """The flag syntax of this limit (``parse_limit(l.spec())`` gives ``l`` back)."""
        return f"{self.rate * 60:g}/min:{self.burst}" if self.enabled else "0"


DISABLED = Limit(0.0, 0)

#: Defaults. Enrollment is per address and strict (a host enrolls once). A well-behaved agent heartbeats
#: at most once a second (the smallest interval the server hands out) and may poll plans/next besides, so
#: 5/s with a burst of 100 is never reached by one, yet caps what a stolen certificate can do. Tenant and
#: key management is an operator's occasional work; "everything else" (reads, plans, probes) is generous.
DEFAULT_LIMITS: Mapping[RouteClass, Limit] = {
    RouteClass.ENROLL: Limit(10 / 60, 20),
    RouteClass.HEARTBEAT: Limit(5.0, 100),
    RouteClass.AGENT: Limit(20.0, 400),
    RouteClass.MANAGEMENT: Limit(2.0, 120),
    RouteClass.LOGIN: Limit(10 / 60, 10),
    RouteClass.DEFAULT: Limit(20.0, 600),
}

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0,
          "hour": 3600.0}
_LIMIT = re.compile(r"(?P<n>\d{1,9}(?:\.\d{1,6})?)(?:/(?P<unit>[a-z]{1,6}))?(?::(?P<burst>\d{1,9}))?\Z")


def parse_limit(text: str, field: str) -> Limit:
    """``N[/s|/min|/h][:BURST]`` (per minute when no unit; burst defaults to N), or ``0`` to disable.

    Examples: ``10/min:20``, ``5/s:100``, ``0``. Anything else is a 400-style error naming the flag.
    """
    m = _LIMIT.match(text.strip())
    unit = _UNITS.get(m.group("unit") or "min") if m else None
    if m is None or unit is None:
        raise ValidationError(f"--{field.replace('_', '-')} must look like 10/min:20 (N[/s|/min|/h][:BURST]) "
                              f"or 0 to disable; got {text!r}", field=field)
    n = float(m.group("n"))
    if n == 0:
        return DISABLED
    burst = int(m.group("burst")) if m.group("burst") else max(1, math.ceil(n))
    if burst < 1:
        raise ValidationError(f"--{field.replace('_', '-')}: the burst must be at least 1", field=field)
    return Limit(n / unit, burst)


@dataclass(frozen=True, slots=True)
class Decision:
    """One bucket check: allowed or not, the bucket's new TAT, and when to retry if refused."""

    allowed: bool
    tat: float
    retry_after: float


def gcra(tat: float | None, now: float, limit: Limit) -> Decision:
    """Take one token from the bucket whose TAT is ``tat`` (``None``: a new, full bucket) at ``now``."""
    base = now if tat is None or tat < now else tat
    new = base + limit.interval
    if new - now <= limit.tau * (1 + 1e-9):
        return Decision(True, new, 0.0)
    return Decision(False, base, new - limit.tau - now)


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` in whole seconds, rounded up and at least 1 (a 0 would invite an immediate retry)."""
    return str(max(1, math.ceil(seconds - 1e-6)))


_AGENT_ROUTES = {"/v1/executions/result", "/v1/logs", "/v1/unenroll", "/v1/renew"}


def classify(path: str, method: str = "GET") -> RouteClass:
    """The class of a request path (decoded, as the router sees it); unknown paths are DEFAULT.

    Only the dashboard's password forms (a POST of /ui/login or /ui/invite/{token}) are LOGIN: showing the
    forms costs no password check, so a user reloading the page does not spend the strict bucket.
    """
    if method == "POST" and (path == "/ui/login" or path.startswith("/ui/invite/")):
        return RouteClass.LOGIN
    if path == "/v1/heartbeat" or path == "/v1/plans/next":
        return RouteClass.HEARTBEAT
    if path == "/v1/enroll":
        return RouteClass.ENROLL
    if path in _AGENT_ROUTES:
        return RouteClass.AGENT
    if path == "/tenants" or (path.startswith("/tenants/") and "/api-keys" in path):
        return RouteClass.MANAGEMENT
    return RouteClass.DEFAULT


#: Classes whose client is the verified agent (a certificate from our CA) when one was presented.
AGENT_CLASSES = frozenset({RouteClass.HEARTBEAT, RouteClass.AGENT})


def parse_networks(values: Sequence[str], field: str = "trusted_proxy") -> tuple[IPNetwork, ...]:
    """``--trusted-proxy`` CIDRs (a bare address is a /32 or /128)."""
    out = []
    for v in values:
        for part in v.replace(",", " ").split():
            try:
                out.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValidationError(f"--{field.replace('_', '-')} {part!r} is not an address or CIDR",
                                      field=field) from None
    return tuple(out)


def _ip(text: str | None) -> IPAddress | None:
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _trusted(ip: IPAddress, proxies: Sequence[IPNetwork]) -> bool:
    return any(ip.version == n.version and ip in n for n in proxies)


def client_address(peer: str | None, forwarded_for: str | None, real_ip: str | None,
                   proxies: Sequence[IPNetwork]) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy.

    Why only from trusted proxies: ``X-Forwarded-For`` is whatever the client wrote, so honouring it from
    anyone would let a client pick its own bucket (the original did). Behind trusted proxies the header is
    read from the right: the first hop that is not itself a trusted proxy is the client (the left part is
    again client-written). An unparsable hop stops the walk at the proxy that added it.
    """
    ip = _ip(peer)
    if ip is None:
        return "unknown"
    if not proxies or not _trusted(ip, proxies):
        return str(ip)
    if forwarded_for:
        last = ip
        for hop in reversed(forwarded_for.split(",")):
            h = _ip(hop)
            if h is None:
                return str(last)
            if not _trusted(h, proxies):
                return str(h)
            last = h
        return str(last)
    real = _ip(real_ip)
    return str(real) if real is not None else str(ip)


def address_identity(address: str) -> str:
    """The bucket identity of an address; IPv6 by its /64 (one host usually has a whole /64 to rotate in)."""
    if ":" in address:
        try:
            return "ip:" + str(ipaddress.ip_network(f"{address}/64", strict=False).network_address) + "/64"
        except ValueError:
            return "ip:" + address
    return "ip:" + address


def key_identity(key: str) -> str:
    """The bucket identity of a presented API or admin key: a hash, never the key."""
    return "key:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def bucket_key(cls: RouteClass, identity: str) -> str:
    return f"{cls.value}|{identity}"


# --- lock-out ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    """``threshold`` failures within ``window`` seconds lock a source out for ``base`` seconds, doubling with
    each further lock up to ``max_lock``; a source quiet for ``max_lock`` seconds starts again at ``base``.
    A threshold of 0 disables lock-out."""

    threshold: int = 5
    window: float = 900.0
    base: float = 900.0
    max_lock: float = 86400.0

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def check(self) -> None:
        if self.threshold < 0:
            raise ValidationError("lockout_threshold must not be negative", field="lockout_threshold")
        for name in ("window", "base", "max_lock"):
            if getattr(self, name) <= 0:
                raise ValidationError(f"lockout_{name} must be positive", field=f"lockout_{name}")


@dataclass(frozen=True, slots=True)
class LockState:
    """What is stored per (source, credential type)."""

    failures: int = 0
    window_start: float | None = None
    level: int = 0  # locks so far (the next one lasts base * 2**level)
    locked_until: float | None = None
    last_failure: float | None = None

    def locked(self, now: float) -> bool:
        return self.locked_until is not None and self.locked_until > now


def after_failure(state: LockState, now: float, policy: LockoutPolicy) -> tuple[LockState, float | None]:
    """The state after one more failed authentication, and the end of the lock if this one started a lock.

    Failures while locked are not counted (the request was refused before its credential was looked at).
    A success never resets the count: with one valid key in hand, an attacker could otherwise interleave
    guesses with good requests forever (the original cleared it).
    """
    if not policy.enabled or state.locked(now):
        return state, None
    level = state.level
    if state.last_failure is not None and now - state.last_failure > policy.max_lock:
        level = 0
    if state.window_start is None or now - state.window_start >= policy.window:
        failures, start = 1, now
    else:
        failures, start = state.failures + 1, state.window_start
    if failures >= policy.threshold:
        until = now + min(policy.max_lock, policy.base * 2.0 ** min(level, 60))
        return LockState(0, None, level + 1, until, now), until
    return LockState(failures, start, level, state.locked_until, now), None
