"""Dashboard login and sessions (issue 13): the inputs a login takes, the records a session resolves to, the
statements that open, find and end one, and ``Logins``, the login/session half of ``Accounts``.

Kept apart from ``accounts`` (users, memberships, invitations) so that each module stays small; ``Accounts``
(``cp.accounts``) inherits ``Logins``, so callers see one use case. Why a server-side session and not a signed cookie: a
session must end at once when it is revoked, its user disabled, its API key revoked or a membership removed,
so every request resolves its cookie against the database: one indexed read of the token's sha256 (the token
itself is never stored), then the memberships. "Last seen" is written at most once a minute per session, not
per request, so that reading pages costs no write.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from nkudo.cp import passwords
from nkudo.cp import schema as t
from nkudo.cp.config import Settings, presented_secret
from nkudo.cp.domain import ActorType, Permission, PrincipalKind, Role
from nkudo.cp.errors import BadRequest, NotFound, Unauthenticated
from nkudo.cp.ports import Clock, Transactions
from nkudo.cp.ratelimit import Credential, LockoutPolicy, LockState, after_failure
from nkudo.cp.records import Actor, AuditEntry, Principal, RequestInfo
from nkudo.cp.usecases.common import audit, new_id, rand_token, require, sha256_hex, tenant_scope
from nkudo.cp.usecases.lockout import Lockouts
from nkudo.log import get_logger

log = get_logger("cp.accounts")

#: How stale "last seen" may get before a request writes it (the idle timeout is checked against it, so a
#: session may end up to this much earlier than its idle timeout says, never later).
TOUCH_EVERY: Final = dt.timedelta(seconds=60)
USER_AGENT_MAX: Final = 256
#: What a session (or invitation) token can look like (``secrets.token_urlsafe(32)`` is 43 characters):
#: anything else is refused before it is hashed and looked up.
TOKEN_PATTERN: Final = r"[A-Za-z0-9_-]{20,128}\Z"  # noqa: S105 - a pattern, not a secret
_TOKEN = re.compile(TOKEN_PATTERN)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True, slots=True)
class Membership:
    """A tenant a session may act in, and the role it acts with there."""

    tenant_id: str
    tenant_slug: str
    tenant_name: str
    role: Role


@dataclass(frozen=True, slots=True)
class SessionContext:
    """Who a dashboard request is: resolved from its cookie on every request (``Accounts.session``)."""

    session_id: str
    user_id: str | None
    api_key_id: str | None
    label: str  # the user's email, or "API key <name>"
    is_admin: bool
    memberships: list[Membership]
    csrf_token: str
    expires_at: dt.datetime  # the earlier of the idle and the absolute expiry, as of this request
    #: The absolute expiry, which the cookie's lifetime follows: the server ends an idle session itself, and a
    #: cookie that lived only ``idle`` from login would sign out a user who had been active all along.
    ends_at: dt.datetime

    @property
    def tenants(self) -> list[Membership]:
        """The tenants this session may open (for an admin user: every tenant, as owner)."""
        return self.memberships

    def principal_for(self, tenant_id: str) -> Principal:
        """The principal the use cases see for a request in ``tenant_id``; a tenant not listed is a 404.

        An admin user gets the admin principal (every tenant, as with the admin key) that still names the
        user for the audit log; an API-key session gets its key as a read-only (viewer) principal; a member
        gets its membership's role.
        """
        for m in self.memberships:
            if m.tenant_id != tenant_id:
                continue
            if self.is_admin:
                return Principal(PrincipalKind.ADMIN, user_id=self.user_id)
            if self.api_key_id is not None:
                return Principal(PrincipalKind.API_KEY, tenant_id=tenant_id, key_id=self.api_key_id,
                                 role=Role.VIEWER)
            return Principal(PrincipalKind.USER, tenant_id=tenant_id, user_id=self.user_id, role=m.role)
        raise NotFound("tenant not found", code="TENANT_NOT_FOUND")


@dataclass(frozen=True, slots=True)
class LoginResult:
    """A new session: ``token`` is the cookie value (shown once; only its sha256 is stored)."""

    token: str
    context: SessionContext


@dataclass(frozen=True, slots=True)
class SessionView:
    """One live session as the access page lists it."""

    id: str
    label: str
    created_at: dt.datetime
    last_seen_at: dt.datetime
    source_ip: str | None
    user_agent: str | None
    current: bool


def csrf_token_for(token: str) -> str:
    """The CSRF token of a session: derived from its cookie token, so nothing more is stored, yet a page of
    another origin (which cannot read the cookie) cannot compute it."""
    return hashlib.sha256(("nkudo-csrf:" + token).encode()).hexdigest()


def token_hash(token: str) -> str | None:
    """The stored form of a presented token, or ``None`` if it cannot be one of ours (not looked up)."""
    return sha256_hex(token) if _TOKEN.match(token) else None


def clean_user_agent(value: str | None) -> str | None:
    """A User-Agent as it is stored and shown: printable ASCII only, at most ``USER_AGENT_MAX`` characters."""
    if not value:
        return None
    return _UNPRINTABLE.sub("?", value[:USER_AGENT_MAX]) or None


def open_session(conn: Connection, *, user_id: str | None, api_key_id: str | None, tenant_id: str | None,
                 now: dt.datetime, absolute: dt.timedelta, idle: dt.timedelta, info: RequestInfo,
                 user_agent: str | None) -> LoginResult:
    """Insert a session for a user or an API key and return its token with what it resolves to."""
    token = rand_token()
    conn.execute(t.sessions.insert().values(
        id=new_id(), token_hash=sha256_hex(token), user_id=user_id, api_key_id=api_key_id, tenant_id=tenant_id,
        created_at=now, last_seen_at=now, expires_at=now + absolute, revoked_at=None,
        source_ip=info.source_ip[:64] if info.source_ip else None, user_agent=clean_user_agent(user_agent)))
    ctx = load_session(conn, token, now, idle)
    if ctx is None:  # only if the timeouts were not positive, which Settings.check refuses
        raise ValueError("a new session must resolve")
    return LoginResult(token=token, context=ctx)


def _session_row(conn: Connection, token_digest: str) -> Any:
    s, u, k = t.sessions.c, t.users.c, t.api_keys.c
    return conn.execute(
        sa.select(s.id, s.user_id, s.api_key_id, s.tenant_id, s.last_seen_at, s.expires_at, u.email, u.is_admin,
                  u.disabled_at, k.name.label("key_name"), k.revoked_at.label("key_revoked_at"),
                  k.expires_at.label("key_expires_at"))
        .select_from(t.sessions.outerjoin(t.users, u.id == s.user_id).outerjoin(t.api_keys, k.id == s.api_key_id))
        .where(s.token_hash == token_digest, s.revoked_at.is_(None))
    ).first()


def memberships_of(conn: Connection, user_id: str | None, is_admin: bool, key_tenant: str | None
                   ) -> list[Membership]:
    """The tenants a session may open: all for an admin, its key's tenant (viewer) for an API-key session,
    else the user's memberships (read live, so a revoked membership is gone at the next request)."""
    tn = t.tenants.c
    if is_admin:
        rows = conn.execute(sa.select(tn.id, tn.slug, tn.name).order_by(tn.name, tn.id))
        return [Membership(r.id, r.slug, r.name, Role.OWNER) for r in rows]
    if key_tenant is not None:
        rows = conn.execute(sa.select(tn.id, tn.slug, tn.name).where(tn.id == key_tenant))
        return [Membership(r.id, r.slug, r.name, Role.VIEWER) for r in rows]
    m = t.memberships.c
    rows = conn.execute(sa.select(tn.id, tn.slug, tn.name, m.role).join(t.tenants, tn.id == m.tenant_id)
                        .where(m.user_id == user_id).order_by(tn.name, tn.id))
    return [Membership(r.id, r.slug, r.name, Role(r.role)) for r in rows]


def load_session(conn: Connection, token: str, now: dt.datetime, idle: dt.timedelta) -> SessionContext | None:
    """What ``token`` resolves to at ``now``, or ``None``: unknown, revoked, idle or absolutely expired, its
    user disabled, its API key revoked or expired. Touches "last seen" when it is ``TOUCH_EVERY`` old."""
    digest = token_hash(token)
    r = None if digest is None else _session_row(conn, digest)
    if r is None or now >= r.expires_at or now >= r.last_seen_at + idle:
        return None
    if r.user_id is not None:
        if r.disabled_at is not None:
            return None
        label, is_admin = r.email, bool(r.is_admin)
    else:
        if r.key_revoked_at is not None or (r.key_expires_at is not None and now >= r.key_expires_at):
            return None
        label, is_admin = f"API key {r.key_name}", False
    seen = r.last_seen_at
    if now - seen >= TOUCH_EVERY:
        conn.execute(t.sessions.update().where(t.sessions.c.id == r.id).values(last_seen_at=now))
        seen = now
    return SessionContext(
        session_id=r.id, user_id=r.user_id, api_key_id=r.api_key_id, label=label, is_admin=is_admin,
        memberships=memberships_of(conn, r.user_id, is_admin, r.tenant_id if r.api_key_id else None),
        csrf_token=csrf_token_for(token), expires_at=min(r.expires_at, seen + idle), ends_at=r.expires_at)


def _tenant_sessions(tenant_id: str, now: dt.datetime, idle: dt.timedelta, include_admins: bool) -> sa.Select[Any]:
    """Live sessions of the tenant's members and of its API keys (admin users' only for the admin)."""
    s, u, k, m = t.sessions.c, t.users.c, t.api_keys.c, t.memberships.c
    members = sa.select(m.user_id).where(m.tenant_id == tenant_id)
    by_user = s.user_id.in_(members) if include_admins else sa.and_(s.user_id.in_(members), u.is_admin == sa.false())
    return (sa.select(s.id, s.created_at, s.last_seen_at, s.source_ip, s.user_agent, s.user_id, s.api_key_id,
                      u.email, k.name.label("key_name"))
            .select_from(t.sessions.outerjoin(t.users, u.id == s.user_id).outerjoin(t.api_keys, k.id == s.api_key_id))
            .where(sa.or_(by_user, sa.and_(s.api_key_id.is_not(None), k.tenant_id == tenant_id)),
                   s.revoked_at.is_(None), s.expires_at > now, s.last_seen_at > now - idle))


def tenant_sessions(conn: Connection, tenant_id: str, now: dt.datetime, idle: dt.timedelta, include_admins: bool,
                    current_session_id: str | None) -> list[SessionView]:
    q = _tenant_sessions(tenant_id, now, idle, include_admins).order_by(t.sessions.c.last_seen_at.desc(),
                                                                          t.sessions.c.id)
    return [SessionView(id=r.id, label=r.email if r.user_id else f"API key {r.key_name}", created_at=r.created_at,
                        last_seen_at=r.last_seen_at, source_ip=r.source_ip, user_agent=r.user_agent,
                        current=r.id == current_session_id) for r in conn.execute(q)]


def revoke_tenant_session(conn: Connection, tenant_id: str, session_id: str, now: dt.datetime, idle: dt.timedelta,
                          include_admins: bool) -> Row[Any]:
    """End one live session of the tenant (see ``_tenant_sessions``); any other id is the same 404."""
    q = _tenant_sessions(tenant_id, now, idle, include_admins).where(t.sessions.c.id == session_id)
    row = conn.execute(q).first()
    if row is None:
        raise NotFound("session not found", code="SESSION_NOT_FOUND", field="session_id")
    conn.execute(t.sessions.update().where(t.sessions.c.id == session_id).values(revoked_at=now))
    return row


def end_session(conn: Connection, token: str, now: dt.datetime) -> None:
    """Revoke the session of ``token`` (logout); an unknown or already ended one is no error."""
    digest = token_hash(token)
    if digest is not None:
        s = t.sessions.c
        conn.execute(t.sessions.update().where(s.token_hash == digest, s.revoked_at.is_(None)).values(revoked_at=now))


def end_user_sessions(conn: Connection, user_id: str, now: dt.datetime) -> int:
    """Revoke every session of a user (disabled)."""
    s = t.sessions.c
    res = conn.execute(t.sessions.update().where(s.user_id == user_id, s.revoked_at.is_(None)).values(revoked_at=now))
    return int(res.rowcount or 0)


# --- the one definition of each input ---------------------------------------------------------------------------

#: An email address as accounts store it: lower case, a dot-atom local part of at most 64 characters, a domain
#: of LDH labels with at least one dot; 254 characters in all (RFC 5321's limit on a path).
EMAIL_PATTERN: Final = (r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                        r"@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
_EMAIL = re.compile(EMAIL_PATTERN)
EMAIL_MAX: Final = 254
PASSWORD_MIN: Final = 12
#: Long enough for any passphrase or manager; bounded so a request cannot make argon2 hash megabytes.
PASSWORD_MAX: Final = 1024
#: The per-account login throttle: 10 failures within 15 minutes lock the account's password login for 15
#: minutes, doubling with each further lock up to a day (``ratelimit.after_failure``).
ACCOUNT_POLICY: Final = LockoutPolicy(threshold=10, window=900.0, base=900.0, max_lock=86400.0)
_LOGIN_REFUSED = "invalid email or password (after repeated failures an account's login pauses for a while)"


def parse_email(value: str, field: str = "email") -> str:
    """``value`` as stored (trimmed, lower case) or a 400 naming ``field``."""
    v = value.strip().lower()
    if len(v) > EMAIL_MAX or len(v.partition("@")[0]) > 64 or not _EMAIL.match(v):
        raise BadRequest(f"{field} must be an email address like name@example.com of at most {EMAIL_MAX} "
                         f"characters", code="INVALID_EMAIL", field=field)
    return v


def check_password(value: str, field: str = "password") -> str:
    """A new password: ``PASSWORD_MIN`` to ``PASSWORD_MAX`` characters (anything else is a 400 naming ``field``)."""
    if not PASSWORD_MIN <= len(value) <= PASSWORD_MAX:
        raise BadRequest(f"{field} must have {PASSWORD_MIN} to {PASSWORD_MAX} characters", code="INVALID_PASSWORD",
                         field=field)
    return value


def parse_role(value: Role | str, field: str = "role") -> Role:
    """A role from a form or flag (``owner``, ``operator``, ``viewer``) or a 400 naming ``field``."""
    try:
        return Role(value)
    except ValueError:
        raise BadRequest(f"{field} must be one of {', '.join(r.value for r in Role)}", code="INVALID_ROLE",
                         field=field) from None


def presented_password(value: str) -> str:
    """A password offered at login: not checked against today's policy (older ones stay valid), only bounded."""
    if len(value) > PASSWORD_MAX:
        raise BadRequest(f"password must have at most {PASSWORD_MAX} characters", code="INVALID_PASSWORD",
                         field="password")
    return value


def _lock_state(r: Row[Any]) -> LockState:
    return LockState(r.failed_logins, r.failure_window_start, r.lock_level, r.locked_until, r.last_failure)


class Logins:
    """Login (password or API key) and the session use cases; see ``accounts`` for why failures count twice.

    Login failures count towards the client address's PASSWORD lock-out (``Lockouts``, like bad API keys) and
    towards the account's own throttle (``ACCOUNT_POLICY`` on the user's row), so neither many addresses against
    one account nor one address against many accounts can guess for long. Unknown emails, wrong passwords and
    locked or disabled accounts get one and the same answer after the same work (``passwords.dummy_verify``),
    so the login form does not reveal which emails have accounts.
    """

    def __init__(self, settings: Settings, db: Transactions, clock: Clock, lockouts: Lockouts | None = None
                 ) -> None:
        self.s = settings
        self.db = db
        self.clock = clock
        self.lockouts = lockouts

    @property
    def _idle(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.s.session_idle_timeout)

    @property
    def _absolute(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.s.session_absolute_timeout)

    def _source_lock(self) -> Lockouts | None:
        return self.lockouts if self.lockouts is not None and self.lockouts.enabled else None

    # --- login ------------------------------------------------------------------------------------------------

    def _user_tx(self, conn: Connection, email: str) -> Row[Any] | None:
        return conn.execute(sa.select(t.users).where(t.users.c.email == email)).first()

    async def _check_password(self, user: Row[Any] | None, password: str, source: str | None,
                              info: RequestInfo) -> Row[Any]:
        """Refuse (``INVALID_LOGIN``) unless ``user`` exists, is enabled, is not throttled and ``password`` is its
        password. Every refusal costs one argon2 verification; a wrong password counts towards the source's
        lock-out and the account's throttle."""
        now = self.clock.now().timestamp()
        if user is None or user.disabled_at is not None:
            await passwords.dummy_verify(password)
            ok = False
        else:
            ok = await passwords.verify_password(user.password_hash, password)
        if ok and user is not None and not _lock_state(user).locked(now):
            return user
        if not ok:
            # The same transaction for an unknown email (it finds no row), so its timing matches too.
            await self.db.run(self._account_failure_tx, user.id if user is not None else None, info)
            if (lock := self._source_lock()) is not None:
                await lock.record_failure(source, Credential.PASSWORD, info)
        raise Unauthenticated(_LOGIN_REFUSED, code="INVALID_LOGIN")

    def _account_failure_tx(self, conn: Connection, user_id: str | None, info: RequestInfo) -> None:
        u = t.users.c
        r = conn.execute(sa.select(t.users).where(u.id == user_id).with_for_update()).first()  # None: IS NULL
        if r is None:
            return
        now = self.clock.now()
        state = _lock_state(r)
        new, until = after_failure(state, now.timestamp(), ACCOUNT_POLICY)
        if new == state:
            return
        conn.execute(t.users.update().where(u.id == r.id).values(
            failed_logins=new.failures, failure_window_start=new.window_start, lock_level=new.level,
            locked_until=new.locked_until, last_failure=new.last_failure))
        if until is not None:
            seconds = round(until - now.timestamp())
            log.warn("account login locked after repeated wrong passwords", user_id=r.id, level=new.level,
                     locked_seconds=seconds)
            audit(conn, info, AuditEntry(Actor(ActorType.SYSTEM), "user.login_locked", None, "user", r.id,
                                         {"level": new.level, "locked_seconds": seconds}), now)

    async def login(self, email: str, password: str, source: str | None, info: RequestInfo,
                    user_agent: str | None) -> LoginResult:
        """A session for the user of ``email`` if ``password`` is its password (see the class docstring)."""
        email, password = parse_email(email), presented_password(password)
        if (lock := self._source_lock()) is not None:
            await lock.check(source, Credential.PASSWORD)
        user = await self.db.run(self._user_tx, email)
        user = await self._check_password(user, password, source, info)
        digest = await passwords.hash_password(password) if passwords.needs_rehash(user.password_hash) else None
        return await self.db.run(self._login_tx, user.id, digest, info, user_agent)

    def _login_tx(self, conn: Connection, user_id: str, digest: str | None, info: RequestInfo,
                  user_agent: str | None) -> LoginResult:
        now = self.clock.now()
        u = t.users.c
        # Disabled or throttled since the password was checked (another request, another replica): still refused.
        r = conn.execute(sa.select(t.users).where(u.id == user_id).with_for_update()).first()
        if r is None or r.disabled_at is not None or _lock_state(r).locked(now.timestamp()):
            raise Unauthenticated(_LOGIN_REFUSED, code="INVALID_LOGIN")
        values: dict[str, Any] = {"last_login_at": now}
        if digest is not None:
            values["password_hash"] = digest  # parameters changed since it was hashed: upgrade it now
        conn.execute(t.users.update().where(u.id == user_id).values(**values))
        audit(conn, info, AuditEntry(Actor(ActorType.USER, user_id), "user.login", None, "user", user_id), now)
        return open_session(conn, user_id=user_id, api_key_id=None, tenant_id=None, now=now, absolute=self._absolute,
                            idle=self._idle, info=info, user_agent=user_agent)

    async def login_api_key(self, api_key: str, source: str | None, info: RequestInfo, user_agent: str | None
                            ) -> LoginResult:
        """A read-only (viewer) session in the tenant of a valid API key; it ends when the key is revoked or
        expires. Wrong keys count towards the source's API-key lock-out, exactly as on the API."""
        key, lock = presented_secret(api_key), self._source_lock()
        result = None
        if key is None:
            if lock is not None:
                await lock.check(source, Credential.API_KEY)
        else:
            result = await self.db.run(self._api_key_login_tx, sha256_hex(key), source, info, user_agent)
        if result is None:
            if lock is not None and key is not None:
                await lock.record_failure(source, Credential.API_KEY, info)
            raise Unauthenticated("invalid, expired or revoked API key", code="INVALID_API_KEY", field="api_key")
        return result

    def _api_key_login_tx(self, conn: Connection, key_digest: str, source: str | None, info: RequestInfo,
                          user_agent: str | None) -> LoginResult | None:
        if (lock := self._source_lock()) is not None:
            lock.check_in(conn, source, Credential.API_KEY)
        now = self.clock.now()
        k = t.api_keys.c
        r = conn.execute(sa.select(k.id, k.tenant_id).where(
            k.key_hash == key_digest, k.revoked_at.is_(None), sa.or_(k.expires_at.is_(None), k.expires_at > now)
        )).first()
        if r is None:
            return None
        audit(conn, info, AuditEntry(Actor(ActorType.API_KEY, r.id), "api_key.login", r.tenant_id, "api_key", r.id),
              now)
        return open_session(conn, user_id=None, api_key_id=r.id, tenant_id=r.tenant_id, now=now,
                            absolute=self._absolute, idle=self._idle, info=info, user_agent=user_agent)

    # --- sessions ---------------------------------------------------------------------------------------------

    async def session(self, token: str) -> SessionContext | None:
        """What a session cookie resolves to now, or ``None`` (unknown, revoked, expired, user disabled...)."""
        if token_hash(token) is None:
            return None  # not one of our tokens: no database round trip
        return await self.db.run(lambda conn: load_session(conn, token, self.clock.now(), self._idle))

    async def logout(self, token: str) -> None:
        if token_hash(token) is not None:
            await self.db.run(lambda conn: end_session(conn, token, self.clock.now()))

    async def list_sessions(self, p: Principal, tenant_id: str, current_session_id: str | None
                            ) -> list[SessionView]:
        """Live sessions of the tenant's members and API keys (admin users' sessions only for the admin)."""
        require(p, Permission.MANAGE)

        def tx(conn: Connection) -> list[SessionView]:
            tenant_scope(conn, p, tenant_id)
            return tenant_sessions(conn, tenant_id, self.clock.now(), self._idle, p.kind == PrincipalKind.ADMIN,
                                   current_session_id)

        return await self.db.run(tx)

    async def revoke_session(self, p: Principal, tenant_id: str, session_id: str, info: RequestInfo) -> None:
        require(p, Permission.MANAGE)

        def tx(conn: Connection) -> None:
            tenant_scope(conn, p, tenant_id)
            now = self.clock.now()
            r = revoke_tenant_session(conn, tenant_id, session_id, now, self._idle, p.kind == PrincipalKind.ADMIN)
            audit(conn, info, AuditEntry(p.actor, "session.revoke", tenant_id, "session", session_id,
                                         {"user_id": r.user_id, "api_key_id": r.api_key_id}), now)

        await self.db.run(tx)

    async def prune_sessions(self) -> int:
        """Delete sessions that ended (revoked, idle or absolutely expired) more than a day ago, so the table
        holds live sessions and recent history only; for the server's periodic pruning."""
        def tx(conn: Connection) -> int:
            s, cut = t.sessions.c, self.clock.now() - dt.timedelta(days=1)
            ended = sa.or_(s.revoked_at < cut, s.expires_at < cut, s.last_seen_at < cut - self._idle)
            return int(conn.execute(t.sessions.delete().where(ended)).rowcount or 0)

        return await self.db.run(tx)
