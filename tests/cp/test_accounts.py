"""Issue 13 (accounts): users, login, throttling, sessions, invitations and API-key sessions.

Driven through the real ``ControlPlane`` facade over a real database (a SQLite file and a throwaway
PostgreSQL), with a clock the tests move, so idle and absolute expiry, invitation expiry and the lock-outs are
observed exactly. The CLI is run as a subprocess of the installed ``nkudo-control-plane``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from nkudo.cp import passwords
from nkudo.cp import schema as t
from nkudo.cp.client import Client
from nkudo.cp.config import Settings
from nkudo.cp.db import Database, sqlite_url
from nkudo.cp.domain import PrincipalKind, Role
from nkudo.cp.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthenticated
from nkudo.cp.models import ApiKeyCreate, SiteCreate, TenantCreate
from nkudo.cp.pki import CertificateAuthority
from nkudo.cp.ratelimit import DEFAULT_LIMITS, LockoutPolicy, RouteClass, classify
from nkudo.cp.records import Principal, RequestInfo
from nkudo.cp.service import ControlPlane
from nkudo.cp.usecases.accounts import EMAIL_PATTERN, check_password, parse_email, parse_role
from nkudo.cp.usecases.lockout import LockedOut
from nkudo.errors import ValidationError

from .helpers import start_server

ADMIN = Principal(PrincipalKind.ADMIN)
PASSWORD = "correct horse battery staple"
T0 = dt.datetime(2031, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """The ``ports.Clock`` the tests move by hand."""

    def __init__(self, now: dt.datetime) -> None:
        self.t = now

    def now(self) -> dt.datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


@dataclasses.dataclass
class Env:
    cp: ControlPlane
    clock: Clock
    db: Database
    tenant_id: str = ""

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    def info(self, ip: str = "192.0.2.10") -> RequestInfo:
        return RequestInfo(request_id="req-1", source_ip=ip)

    def audit_rows(self) -> list[Any]:
        with self.db.engine.connect() as conn:
            return list(conn.execute(sa.select(t.audit_events).order_by(t.audit_events.c.id)))


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture(params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path, ca: CertificateAuthority) -> Iterator[Env]:
    """A control plane on a fresh database of each backend, with one tenant, a 5-failure source lock-out."""
    url = sqlite_url(tmp_path) if request.param == "sqlite" else request.getfixturevalue("pg_cluster").create_database()
    db = Database(url, pool_size=4)
    db.migrate()
    clock = Clock(T0)
    settings = Settings(data_dir=tmp_path, lockout=LockoutPolicy(threshold=5, window=900, base=900, max_lock=3600))
    e = Env(ControlPlane(settings, db, ca, "a" * 40, clock=clock), clock, db)
    try:
        e.tenant_id = e.run(e.cp.tenancy.create_tenant(ADMIN, TenantCreate(slug="acme", name="Acme"),
                                                       RequestInfo())).id
        yield e
    finally:
        db.close()


def _user(e: Env, email: str, role: Role | None = None, password: str = PASSWORD) -> str:
    uid = e.run(e.cp.accounts.create_user(email, password))
    if role is not None:
        e.run(e.cp.accounts.grant(ADMIN, e.tenant_id, email, role, RequestInfo()))
    return str(uid)


def test_email_password_and_role_validation() -> None:
    """Issue 13: emails are lower-cased, anchored with \\Z and at most 254 characters; passwords 12..1024."""
    assert parse_email("  Ann.Lee+ops@Example.COM ") == "ann.lee+ops@example.com"
    for bad in ("", "ann", "ann@", "@example.com", "ann@example", "ann@@example.com", "ann@exa mple.com",
                "a" * 65 + "@example.com", "ann@" + "a" * 250 + ".com", "ann..lee@example.com", "ann@-x.com"):
        with pytest.raises(BadRequest) as exc:
            parse_email(bad)
        assert exc.value.code == "INVALID_EMAIL" and exc.value.field == "email" and "email" in str(exc.value)
    assert re.match(EMAIL_PATTERN, "ann@example.com\n") is None  # \Z, not $: no trailing newline
    assert check_password("x" * 12) and check_password("x" * 1024)
    for bad in ("x" * 11, "x" * 1025, ""):
        with pytest.raises(BadRequest) as exc:
            check_password(bad)
        assert exc.value.code == "INVALID_PASSWORD" and exc.value.field == "password"
    assert parse_role("operator") is Role.OPERATOR
    with pytest.raises(BadRequest) as exc:
        parse_role("root")
    assert exc.value.code == "INVALID_ROLE" and exc.value.field == "role"


def test_password_hash_is_argon2id_with_explicit_parameters() -> None:
    """Issue 13: argon2id with the parameters written in passwords.py; a wrong password does not verify."""
    h = passwords.hash_now(PASSWORD)
    assert h.startswith(f"$argon2id$v=19$m={passwords.MEMORY_COST_KIB},t={passwords.TIME_COST},"
                        f"p={passwords.PARALLELISM}$")
    assert passwords.verify_now(h, PASSWORD) and not passwords.verify_now(h, PASSWORD + "x")
    assert not passwords.verify_now("not a hash", PASSWORD) and passwords.needs_rehash("not a hash")
    assert not passwords.needs_rehash(h)


def test_create_user_login_and_same_error_for_unknown_and_wrong(env: Env) -> None:
    """Issue 13: a user logs in with its password; unknown email and wrong password are one and the same error;
    the stored hash is argon2id and neither it nor the password reaches the audit log."""
    uid = _user(env, "Ann@Example.com", Role.OWNER)
    with pytest.raises(Conflict) as dup:
        env.run(env.cp.accounts.create_user("ann@example.com", PASSWORD))
    assert dup.value.code == "USER_EXISTS" and dup.value.field == "email"
    with env.db.engine.connect() as conn:
        stored = conn.execute(sa.select(t.users.c.password_hash).where(t.users.c.id == uid)).scalar_one()
    assert stored.startswith("$argon2id$")

    res = env.run(env.cp.accounts.login("ann@example.com", PASSWORD, "192.0.2.10", env.info(), "Mozilla/5.0\x00\n"))
    ctx = res.context
    assert ctx.user_id == uid and ctx.label == "ann@example.com" and not ctx.is_admin and ctx.api_key_id is None
    assert ctx.csrf_token == hashlib.sha256(("nkudo-csrf:" + res.token).encode()).hexdigest()
    assert [(m.tenant_id, m.tenant_slug, m.role) for m in ctx.tenants] == [(env.tenant_id, "acme", Role.OWNER)]
    assert ctx.expires_at == T0 + dt.timedelta(hours=8)  # idle timeout first
    p = ctx.principal_for(env.tenant_id)
    assert (p.kind, p.tenant_id, p.user_id, p.role) == (PrincipalKind.USER, env.tenant_id, uid, Role.OWNER)
    assert p.actor.id == uid and p.actor.type.value == "USER"
    with pytest.raises(NotFound) as nf:
        ctx.principal_for("00000000-0000-4000-8000-000000000000")
    assert nf.value.code == "TENANT_NOT_FOUND"
    again = env.run(env.cp.accounts.session(res.token))
    assert again is not None and again.session_id == ctx.session_id
    with env.db.engine.connect() as conn:
        row = conn.execute(sa.select(t.sessions)).one()
        last_login = conn.execute(sa.select(t.users.c.last_login_at).where(t.users.c.id == uid)).scalar_one()
    assert row.token_hash == hashlib.sha256(res.token.encode()).hexdigest() and res.token not in str(tuple(row))
    assert row.user_agent == "Mozilla/5.0??" and row.source_ip == "192.0.2.10" and last_login == T0

    errors = []
    for email, pw in (("ann@example.com", PASSWORD + "!"), ("nobody@example.com", PASSWORD)):
        with pytest.raises(Unauthenticated) as exc:
            env.run(env.cp.accounts.login(email, pw, "192.0.2.10", env.info(), None))
        errors.append((exc.value.code, str(exc.value)))
    assert errors[0] == errors[1] and errors[0][0] == "INVALID_LOGIN"

    events = env.audit_rows()
    assert [e.action for e in events if e.action.startswith("user.")] == ["user.create", "user.login"]
    login = next(e for e in events if e.action == "user.login")
    assert (login.actor_type, login.actor_id, login.tenant_id, login.chain) == ("USER", uid, None, "global")
    dump = json.dumps([[str(v) for v in e] for e in events])
    assert PASSWORD not in dump and stored not in dump and "$argon2" not in dump and res.token not in dump


def test_unknown_email_still_costs_one_argon2_verification(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13: a login for an unknown (or disabled) email runs the dummy verification, so its time does not
    tell which emails exist."""
    calls: list[str] = []
    real = passwords._dummy_verify_now

    def counting(password: str) -> None:
        calls.append(password)
        real(password)

    monkeypatch.setattr(passwords, "_dummy_verify_now", counting)
    with pytest.raises(Unauthenticated):
        env.run(env.cp.accounts.login("nobody@example.com", PASSWORD, None, env.info(), None))
    assert calls == [PASSWORD]
    _user(env, "bob@example.com")
    with pytest.raises(Unauthenticated):
        env.run(env.cp.accounts.login("bob@example.com", "wrong password!", None, env.info(), None))
    assert calls == [PASSWORD]  # a known user is verified against its own hash, not the dummy


def test_account_throttle_and_source_lockout(env: Env) -> None:
    """Issue 13: 10 wrong passwords in 15 min lock the account (a correct password is then refused the same
    way, the lock is audited); 5 from one address lock that address out of password logins."""
    uid = _user(env, "carol@example.com", Role.VIEWER)
    for i in range(10):  # from ten addresses, so the per-address lock-out does not step in first
        with pytest.raises(Unauthenticated):
            env.run(env.cp.accounts.login("carol@example.com", f"wrong password {i}", f"198.51.100.{i}",
                                          env.info(f"198.51.100.{i}"), None))
    with pytest.raises(Unauthenticated) as exc:
        env.run(env.cp.accounts.login("carol@example.com", PASSWORD, "203.0.113.1", env.info(), None))
    assert exc.value.code == "INVALID_LOGIN"
    locks = [e for e in env.audit_rows() if e.action == "user.login_locked"]
    assert len(locks) == 1 and locks[0].object_id == uid and locks[0].details["locked_seconds"] == 900
    env.clock.advance(901)
    assert env.run(env.cp.accounts.login("carol@example.com", PASSWORD, "203.0.113.1", env.info(), None))

    for i in range(5):
        with pytest.raises(Unauthenticated):
            env.run(env.cp.accounts.login(f"x{i}@example.com", PASSWORD, "203.0.113.9", env.info("203.0.113.9"),
                                          None))
    with pytest.raises(LockedOut) as lo:
        env.run(env.cp.accounts.login("carol@example.com", PASSWORD, "203.0.113.9", env.info(), None))
    assert lo.value.status == 429 and lo.value.code == "LOCKED_OUT" and "password" in str(lo.value)


def test_disabled_user_cannot_log_in_and_loses_its_sessions(env: Env) -> None:
    """Issue 13: disabling a user ends its sessions at once and refuses its logins like a wrong password."""
    _user(env, "dan@example.com", Role.OPERATOR)
    res = env.run(env.cp.accounts.login("dan@example.com", PASSWORD, None, env.info(), None))
    env.run(env.cp.accounts.disable_user("dan@example.com"))
    assert env.run(env.cp.accounts.session(res.token)) is None
    with pytest.raises(Unauthenticated) as exc:
        env.run(env.cp.accounts.login("dan@example.com", PASSWORD, None, env.info(), None))
    assert exc.value.code == "INVALID_LOGIN"


def test_session_idle_and_absolute_expiry(env: Env) -> None:
    """Issue 13: a session ends after 8 h without a request and 7 days after login whatever happens; "last
    seen" is written at most once a minute."""
    _user(env, "eve@example.com", Role.VIEWER)
    res = env.run(env.cp.accounts.login("eve@example.com", PASSWORD, None, env.info(), None))

    def seen() -> dt.datetime:
        with env.db.engine.connect() as conn:
            return conn.execute(sa.select(t.sessions.c.last_seen_at)).scalar_one()  # type: ignore[no-any-return]

    env.clock.advance(59)
    assert env.run(env.cp.accounts.session(res.token)) is not None and seen() == T0  # no write within a minute
    env.clock.advance(2)
    assert env.run(env.cp.accounts.session(res.token)) is not None and seen() == T0 + dt.timedelta(seconds=61)
    env.clock.advance(8 * 3600 - 1)
    assert env.run(env.cp.accounts.session(res.token)) is not None  # one second before the idle timeout
    env.clock.advance(8 * 3600)
    assert env.run(env.cp.accounts.session(res.token)) is None  # idle

    res = env.run(env.cp.accounts.login("eve@example.com", PASSWORD, None, env.info(), None))
    start = env.clock.now()
    while env.clock.now() < start + dt.timedelta(days=7) - dt.timedelta(hours=7):
        env.clock.advance(7 * 3600)  # active all along: never idle
        assert env.run(env.cp.accounts.session(res.token)) is not None
    env.clock.t = start + dt.timedelta(days=7)
    assert env.run(env.cp.accounts.session(res.token)) is None  # absolute
    assert env.run(env.cp.accounts.session("not a token")) is None
    assert env.run(env.cp.accounts.session("A" * 43)) is None


def test_ended_sessions_are_pruned_after_a_day(env: Env) -> None:
    """Issue 13: the session table keeps live sessions and a day of history, not every login ever."""
    _user(env, "pat@example.com", Role.VIEWER)
    out = env.run(env.cp.accounts.login("pat@example.com", PASSWORD, None, env.info(), None))
    live = env.run(env.cp.accounts.login("pat@example.com", PASSWORD, None, env.info(), None))
    env.run(env.cp.accounts.logout(out.token))
    env.clock.advance(7 * 3600)
    assert env.run(env.cp.accounts.session(live.token)) is not None
    assert env.run(env.cp.accounts.prune_sessions()) == 0  # ended, but less than a day ago
    for step in (7 * 3600, 7 * 3600, 3 * 3600 + 1):  # the live one stays in use
        env.clock.advance(step)
        assert env.run(env.cp.accounts.session(live.token)) is not None
    assert env.run(env.cp.accounts.prune_sessions()) == 1
    with env.db.engine.connect() as conn:
        assert conn.execute(sa.select(t.sessions.c.id)).scalars().all() == [live.context.session_id]


def test_session_and_invitation_settings_are_checked(tmp_path: Path) -> None:
    """Issue 13: the idle timeout must be positive and at most the absolute one; invitations last at most 30
    days; the serve command has flags and environment variables for the two timeouts."""
    Settings(data_dir=tmp_path).check()
    for bad, field in (({"session_idle_timeout": 0}, "session_idle_timeout"),
                       ({"session_idle_timeout": 10.0, "session_absolute_timeout": 5.0}, "session_idle_timeout"),
                       ({"invitation_ttl": 31 * 86400.0}, "invitation_ttl"), ({"invitation_ttl": 0}, "invitation_ttl")):
        with pytest.raises(ValidationError) as exc:
            Settings(data_dir=tmp_path, **bad).check()
        assert exc.value.field == field
    helptext = subprocess.run([sys.executable, "-m", "nkudo.cp.cli", "serve", "--help"], capture_output=True,
                              text=True, check=True, cwd=ROOT).stdout
    for flag in ("--session-idle-timeout", "NKUDO_CP_SESSION_IDLE_TIMEOUT", "--session-absolute-timeout",
                 "NKUDO_CP_SESSION_ABSOLUTE_TIMEOUT", "--rate-limit-login", "NKUDO_CP_RATE_LIMIT_LOGIN"):
        assert flag in helptext


def test_logout_list_and_revoke_sessions(env: Env) -> None:
    """Issue 13: logout ends a session; an owner lists the tenant's sessions and revokes one (session() is
    then None); a viewer may do neither; another tenant's session is a 404."""
    _user(env, "olga@example.com", Role.OWNER)
    _user(env, "vic@example.com", Role.VIEWER)
    env.run(env.cp.accounts.create_user("root@example.com", PASSWORD, is_admin=True))
    env.run(env.cp.accounts.grant(ADMIN, env.tenant_id, "root@example.com", Role.VIEWER, RequestInfo()))
    root = env.run(env.cp.accounts.login("root@example.com", PASSWORD, None, env.info(), None))
    owner = env.run(env.cp.accounts.login("olga@example.com", PASSWORD, None, env.info(), "owner-browser"))
    viewer = env.run(env.cp.accounts.login("vic@example.com", PASSWORD, None, env.info(), "viewer-browser"))
    gone = env.run(env.cp.accounts.login("vic@example.com", PASSWORD, None, env.info(), None))
    env.run(env.cp.accounts.logout(gone.token))
    assert env.run(env.cp.accounts.session(gone.token)) is None
    env.run(env.cp.accounts.logout(gone.token))  # twice is no error

    p = owner.context.principal_for(env.tenant_id)
    listed = env.run(env.cp.accounts.list_sessions(p, env.tenant_id, owner.context.session_id))
    assert sorted((s.label, s.current, s.user_agent) for s in listed) == [
        ("olga@example.com", True, "owner-browser"), ("vic@example.com", False, "viewer-browser")]
    # An admin user's session is the admin's business: not listed for an owner, not revocable by one.
    assert len(env.run(env.cp.accounts.list_sessions(ADMIN, env.tenant_id, None))) == 3
    with pytest.raises(NotFound):
        env.run(env.cp.accounts.revoke_session(p, env.tenant_id, root.context.session_id, env.info()))
    vp = viewer.context.principal_for(env.tenant_id)
    with pytest.raises(Forbidden) as forbidden:
        env.run(env.cp.accounts.list_sessions(vp, env.tenant_id, None))
    assert forbidden.value.status == 403 and forbidden.value.code == "FORBIDDEN_ROLE"
    with pytest.raises(Forbidden) as forbidden:
        env.run(env.cp.accounts.revoke_session(vp, env.tenant_id, owner.context.session_id, env.info()))
    assert forbidden.value.code == "FORBIDDEN_ROLE"

    other = env.run(env.cp.tenancy.create_tenant(ADMIN, TenantCreate(slug="other", name="Other"), RequestInfo()))
    _user(env, "x@example.com")
    env.run(env.cp.accounts.grant(ADMIN, other.id, "x@example.com", Role.OWNER, RequestInfo()))
    foreign = env.run(env.cp.accounts.login("x@example.com", PASSWORD, None, env.info(), None))
    with pytest.raises(NotFound) as nf:
        env.run(env.cp.accounts.revoke_session(p, env.tenant_id, foreign.context.session_id, env.info()))
    assert nf.value.code == "SESSION_NOT_FOUND"

    env.run(env.cp.accounts.revoke_session(p, env.tenant_id, viewer.context.session_id, env.info()))
    assert env.run(env.cp.accounts.session(viewer.token)) is None
    assert env.run(env.cp.accounts.session(foreign.token)) is not None
    revoke = [e for e in env.audit_rows() if e.action == "session.revoke"]
    assert len(revoke) == 1 and revoke[0].tenant_id == env.tenant_id and revoke[0].actor_type == "USER"


def test_membership_grant_revoke_and_last_owner(env: Env) -> None:
    """Issue 13: revoking a membership takes the tenant out of the member's live session at once; the last
    owner cannot be removed or demoted by a member (the admin may)."""
    olga = _user(env, "olga@example.com", Role.OWNER)
    pete = _user(env, "pete@example.com", Role.OPERATOR)
    owner = env.run(env.cp.accounts.login("olga@example.com", PASSWORD, None, env.info(), None))
    member = env.run(env.cp.accounts.login("pete@example.com", PASSWORD, None, env.info(), None))
    p = owner.context.principal_for(env.tenant_id)
    assert [(m.email, m.role) for m in env.run(env.cp.accounts.list_members(p, env.tenant_id))] == [
        ("olga@example.com", Role.OWNER), ("pete@example.com", Role.OPERATOR)]
    _user(env, "outsider@example.com")  # a user of no tenant: an owner cannot tell it from no user, nor add it
    refusals = []
    for email in ("nobody@example.com", "outsider@example.com"):
        with pytest.raises(NotFound) as nf:
            env.run(env.cp.accounts.grant(p, env.tenant_id, email, Role.VIEWER, env.info()))
        assert nf.value.code == "MEMBER_NOT_FOUND" and nf.value.field == "email"
        refusals.append(str(nf.value).replace(email, "E"))
    assert refusals[0] == refusals[1]
    assert env.run(env.cp.accounts.grant(p, env.tenant_id, "pete@example.com", Role.VIEWER, env.info())
                   ).role == Role.VIEWER
    env.run(env.cp.accounts.grant(p, env.tenant_id, "pete@example.com", Role.OPERATOR, env.info()))
    with pytest.raises(Conflict) as last:
        env.run(env.cp.accounts.revoke_membership(p, env.tenant_id, olga, env.info()))
    assert last.value.code == "LAST_OWNER"
    with pytest.raises(Conflict):
        env.run(env.cp.accounts.grant(p, env.tenant_id, "olga@example.com", Role.VIEWER, env.info()))

    env.run(env.cp.accounts.revoke_membership(p, env.tenant_id, pete, env.info()))
    ctx = env.run(env.cp.accounts.session(member.token))
    assert ctx is not None and ctx.tenants == []
    with pytest.raises(NotFound):
        ctx.principal_for(env.tenant_id)
    with pytest.raises(NotFound) as nf:
        env.run(env.cp.accounts.revoke_membership(p, env.tenant_id, pete, env.info()))
    assert nf.value.code == "MEMBER_NOT_FOUND"
    env.run(env.cp.accounts.revoke_membership(ADMIN, env.tenant_id, olga, env.info()))  # the admin may
    actions = [e.action for e in env.audit_rows() if e.tenant_id == env.tenant_id]
    assert actions.count("membership.grant") == 4 and actions.count("membership.revoke") == 2


def test_admin_user_sees_every_tenant_as_the_admin(env: Env) -> None:
    """Issue 13: an admin user's principal is the admin's (every tenant) yet the audit log names the user."""
    uid = env.run(env.cp.accounts.create_user("root@example.com", PASSWORD, is_admin=True))
    other = env.run(env.cp.tenancy.create_tenant(ADMIN, TenantCreate(slug="other", name="Other"), RequestInfo()))
    res = env.run(env.cp.accounts.login("root@example.com", PASSWORD, None, env.info(), None))
    assert res.context.is_admin
    assert {m.tenant_id for m in res.context.tenants} == {env.tenant_id, other.id}
    assert {m.role for m in res.context.tenants} == {Role.OWNER}
    p = res.context.principal_for(other.id)
    assert p.kind == PrincipalKind.ADMIN and p.tenant_id is None and p.user_id == uid
    env.run(env.cp.tenancy.create_site(p, other.id, SiteCreate(name="s1"), env.info()))
    ev = [e for e in env.audit_rows() if e.action == "site.create"]
    assert [(e.actor_type, e.actor_id) for e in ev] == [("USER", uid)]


def test_invitation_single_use_under_concurrent_accepts(env: Env) -> None:
    """Issue 13: of 10 concurrent accepts of one invitation exactly one wins (a new user with the invited role)."""
    issued = env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "New@Example.com", "operator", None, env.info()))
    assert issued.url_path == f"/ui/invite/{issued.token}"
    assert issued.expires_at == T0 + dt.timedelta(days=7)
    view = env.run(env.cp.accounts.invitation(issued.token))
    assert view is not None and (view.email, view.role, view.accepted_at) == ("new@example.com", Role.OPERATOR, None)

    async def race() -> list[Any]:
        return list(await asyncio.gather(*(env.cp.accounts.accept_invitation(
            issued.token, f"{PASSWORD} {i}", env.info(), None) for i in range(10)), return_exceptions=True))

    out = env.run(race())
    won = [r for r in out if not isinstance(r, BaseException)]
    lost = [r for r in out if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 9, out
    assert all(isinstance(x, NotFound) and x.code == "INVITATION_INVALID" for x in lost), lost
    ctx = won[0].context
    assert ctx.label == "new@example.com" and [(m.tenant_id, m.role) for m in ctx.tenants] == [
        (env.tenant_id, Role.OPERATOR)]
    assert env.run(env.cp.accounts.invitation(issued.token)) is None
    with env.db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.users)).scalar_one() == 1
    inv = env.run(env.cp.accounts.list_invitations(ADMIN, env.tenant_id))
    assert len(inv) == 1 and inv[0].accepted_at == T0
    assert [e.action for e in env.audit_rows() if e.action.startswith("invitation.")] == [
        "invitation.create", "invitation.accept"]


def test_invitation_expiry_revocation_and_existing_user(env: Env) -> None:
    """Issue 13: an expired or revoked invitation is refused; an existing user accepts with its own password
    (a wrong one is refused and the invitation stays usable); the TTL is bounded."""
    short = env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "a@example.com", Role.VIEWER, 60, env.info()))
    env.clock.advance(61)
    assert env.run(env.cp.accounts.invitation(short.token)) is None
    with pytest.raises(NotFound) as nf:
        env.run(env.cp.accounts.accept_invitation(short.token, PASSWORD, env.info(), None))
    assert nf.value.code == "INVITATION_INVALID"
    for ttl in (59, 31 * 86400):
        with pytest.raises(BadRequest) as bad:
            env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "a@example.com", Role.VIEWER, ttl, env.info()))
        assert bad.value.field == "ttl_seconds"

    revoked = env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "a@example.com", Role.VIEWER, None, env.info()))
    env.run(env.cp.accounts.revoke_invitation(ADMIN, env.tenant_id, revoked.id, env.info()))
    with pytest.raises(NotFound):
        env.run(env.cp.accounts.accept_invitation(revoked.token, PASSWORD, env.info(), None))

    uid = _user(env, "b@example.com")
    inv = env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "b@example.com", Role.OWNER, None, env.info()))
    with pytest.raises(Unauthenticated) as wrong:
        env.run(env.cp.accounts.accept_invitation(inv.token, "not the password", env.info(), None))
    assert wrong.value.code == "INVALID_LOGIN"
    with pytest.raises(BadRequest) as short_pw:  # a new user's password must meet the policy
        env.run(env.cp.accounts.accept_invitation(
            env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "c@example.com", Role.VIEWER, None,
                                           env.info())).token, "short", env.info(), None))
    assert short_pw.value.field == "password"
    res = env.run(env.cp.accounts.accept_invitation(inv.token, PASSWORD, env.info(), None))
    assert res.context.user_id == uid and [m.role for m in res.context.tenants] == [Role.OWNER]
    with pytest.raises(Conflict) as member:
        env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "b@example.com", Role.VIEWER, None, env.info()))
    assert member.value.code == "MEMBER_EXISTS"


def test_api_key_session_is_read_only_and_ends_with_the_key(env: Env) -> None:
    """Issue 13: an API key logs in to a viewer session of its tenant, which ends when the key is revoked."""
    key = env.run(env.cp.access.create_api_key(ADMIN, env.tenant_id, ApiKeyCreate(name="ci"), RequestInfo()))
    res = env.run(env.cp.accounts.login_api_key(key.api_key, "192.0.2.7", env.info(), None))
    ctx = res.context
    assert ctx.label == "API key ci" and ctx.api_key_id == key.id and ctx.user_id is None
    assert [(m.tenant_id, m.role) for m in ctx.tenants] == [(env.tenant_id, Role.VIEWER)]
    p = ctx.principal_for(env.tenant_id)
    assert (p.kind, p.key_id, p.role) == (PrincipalKind.API_KEY, key.id, Role.VIEWER)
    assert env.run(env.cp.tenancy.list_sites(p, env.tenant_id)).sites == []
    with pytest.raises(Forbidden) as forbidden:
        env.run(env.cp.tenancy.create_site(p, env.tenant_id, SiteCreate(name="s"), env.info()))
    assert forbidden.value.status == 403 and forbidden.value.code == "FORBIDDEN_ROLE"
    owner_listing = env.run(env.cp.accounts.list_sessions(ADMIN, env.tenant_id, None))
    assert [s.label for s in owner_listing] == ["API key ci"]

    env.run(env.cp.access.revoke_api_key(ADMIN, env.tenant_id, key.id, RequestInfo()))
    assert env.run(env.cp.accounts.session(res.token)) is None
    with pytest.raises(Unauthenticated) as bad:
        env.run(env.cp.accounts.login_api_key(key.api_key, "192.0.2.7", env.info(), None))
    assert bad.value.code == "INVALID_API_KEY"
    expiring = env.run(env.cp.access.create_api_key(ADMIN, env.tenant_id,
                                                    ApiKeyCreate(name="tmp", expires_in_seconds=120), RequestInfo()))
    res = env.run(env.cp.accounts.login_api_key(expiring.api_key, None, env.info(), None))
    env.clock.advance(121)
    assert env.run(env.cp.accounts.session(res.token)) is None


def _cli(data_dir: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    exe = ROOT / ".venv" / "bin" / "nkudo-control-plane"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "nkudo.cp.cli"]
    return subprocess.run([*cmd, *args, "--data-dir", str(data_dir)], input=stdin, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, check=False)


def test_cli_user_create_list_grant_disable(tmp_path: Path) -> None:
    """Issue 13: the first admin is made on the database itself; the password comes from stdin or the
    environment, never a flag, and is printed nowhere."""
    data = tmp_path / "cp"
    out = _cli(data, "user", "create", "--email", "Root@Example.com", "--admin", "--password-stdin", "--json",
               stdin=PASSWORD + "\n")
    assert out.returncode == 0, out.stderr
    made = json.loads(out.stdout)
    assert re.fullmatch(r"[0-9a-f-]{36}", made["id"]) and made["email"] == "root@example.com" and made["is_admin"]
    weak = _cli(data, "user", "create", "--email", "w@example.com", "--password-stdin", stdin="short\n")
    assert weak.returncode == 1 and "password" in weak.stderr and "12" in weak.stderr
    dup = _cli(data, "user", "create", "--email", "root@example.com", env={"NKUDO_CP_USER_PASSWORD": PASSWORD})
    assert dup.returncode == 1 and "already exists" in dup.stderr

    db = Database(sqlite_url(data), pool_size=1)
    try:
        tid = asyncio.run(ControlPlane(Settings(data_dir=data), db, CertificateAuthority.generate(), "a" * 40)
                          .tenancy.create_tenant(ADMIN, TenantCreate(slug="acme", name="Acme"), RequestInfo())).id
    finally:
        db.close()
    nowhere = _cli(data, "user", "create", "--email", "op@example.com", "--tenant-id", str(uuid.uuid4()), "--role",
                   "operator", env={"NKUDO_CP_USER_PASSWORD": PASSWORD})
    assert nowhere.returncode == 1 and "tenant not found" in nowhere.stderr  # and no user was made:
    op = _cli(data, "user", "create", "--email", "op@example.com", "--tenant-id", tid, "--role", "operator",
              env={"NKUDO_CP_USER_PASSWORD": PASSWORD})
    assert op.returncode == 0, op.stderr
    op_id = op.stdout.strip()
    bad_role = _cli(data, "user", "grant", "--email", "op@example.com", "--tenant-id", tid, "--role", "god")
    assert bad_role.returncode != 0 and "role" in bad_role.stderr
    assert _cli(data, "user", "grant", "--email", "root@example.com", "--tenant-id", tid, "--role", "viewer"
                ).returncode == 0
    assert _cli(data, "user", "disable", "--email", "op@example.com").returncode == 0
    listed = json.loads(_cli(data, "user", "list", "--json").stdout)
    by_email = {u["email"]: u for u in listed["users"]}
    assert by_email["op@example.com"]["id"] == op_id and by_email["op@example.com"]["disabled_at"] is not None
    assert by_email["op@example.com"]["tenants"] == {tid: "operator"}
    assert by_email["root@example.com"]["tenants"] == {tid: "viewer"} and by_email["root@example.com"]["is_admin"]
    text = _cli(data, "user", "list").stdout
    assert "root@example.com" in text and "op@example.com" in text

    db = Database(sqlite_url(data), pool_size=1)
    try:
        with db.engine.connect() as conn:
            events = [str(tuple(r)) for r in conn.execute(sa.select(t.audit_events))]
            hashes = [r[0] for r in conn.execute(sa.select(t.users.c.password_hash))]
    finally:
        db.close()
    assert all(h.startswith("$argon2id$") for h in hashes) and len(hashes) == 2
    everything = "".join(events) + out.stdout + out.stderr + op.stdout + op.stderr
    assert PASSWORD not in everything and not any(h in everything for h in hashes)


def test_login_route_class_is_per_address_and_only_for_password_posts(tmp_path: Path) -> None:
    """Issue 13: POST /ui/login and POST /ui/invite/{token} spend the strict "login" bucket of the client's
    address (a changing X-API-Key header does not buy a new bucket); showing the forms does not."""
    assert classify("/ui/login", "POST") is RouteClass.LOGIN and classify("/ui/invite/abc", "POST") is RouteClass.LOGIN
    assert classify("/ui/login", "GET") is RouteClass.DEFAULT and classify("/ui/login") is RouteClass.DEFAULT
    assert DEFAULT_LIMITS[RouteClass.LOGIN].spec() == "10/min:10"
    srv = start_server(tmp_path / "cp", extra=["--rate-limit-login", "3/min:3"])
    c = Client(srv.url, ca_file=srv.ca_file)  # not the OpenAPI-checked client: /ui/ is HTML, not the API
    try:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        got = [c.raw("POST", "/ui/login", b"email=a%40example.com&password=x", {**form, "X-API-Key": f"k{i}"})[0]
               for i in range(3)]
        assert 429 not in got, got
        st, h, _ = c.raw("POST", "/ui/invite/" + "A" * 43, b"password=x", {**form, "X-API-Key": "another"})
        assert st == 429 and int(h["retry-after"]) >= 1
        assert 429 not in {c.raw("GET", "/ui/login")[0] for _ in range(5)}
    finally:
        c.close()
        srv.stop()
