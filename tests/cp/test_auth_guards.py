"""Control-plane authentication, authorisation and sessions: one test per guard that a one-line bug could
defeat without any other test failing (the mutation sweep of the auth area).

Driven through the real use cases (``ControlPlane``) on a SQLite file and a throwaway PostgreSQL, with the
clock the tests move (``test_accounts.Env``), so expiry instants are exact. Each docstring names the bug it
catches.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher, Type

from nkudo.cp import passwords
from nkudo.cp import schema as t
from nkudo.cp.config import Settings, check_admin_key, presented_secret
from nkudo.cp.domain import Role
from nkudo.cp.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthenticated
from nkudo.cp.models import ApiKeyCreate, QuotaUpdate, SiteCreate, TenantCreate
from nkudo.cp.records import Principal, RequestInfo
from nkudo.cp.usecases.lockout import LockedOut
from nkudo.cp.usecases.sessions import PASSWORD_MAX, SessionContext
from nkudo.errors import ValidationError

from .test_accounts import ADMIN, PASSWORD, Env, ca, env  # noqa: F401 - the fixtures are used by name

INFO = RequestInfo(request_id="guards", source_ip="192.0.2.44")
FROM_5, FROM_9 = RequestInfo(source_ip="203.0.113.5"), RequestInfo(source_ip="203.0.113.9")
#: ``test_accounts.env`` builds its control plane with this admin key.
ADMIN_KEY = "a" * 40


def _tenant(e: Env, slug: str) -> str:
    return str(e.run(e.cp.tenancy.create_tenant(ADMIN, TenantCreate(slug=slug, name=slug), INFO)).id)


def _owner(e: Env, tenant_id: str, email: str) -> Principal:
    """An owner member of ``tenant_id``, as its dashboard session resolves it."""
    e.run(e.cp.accounts.create_user(email, PASSWORD))
    e.run(e.cp.accounts.grant(ADMIN, tenant_id, email, Role.OWNER, INFO))
    ctx: SessionContext = e.run(e.cp.accounts.login(email, PASSWORD, None, INFO, None)).context
    return ctx.principal_for(tenant_id)


def _refused_admin(e: Env, key: str) -> None:
    with pytest.raises(Unauthenticated) as exc:
        e.run(e.cp.access.authenticate(key, None, "192.0.2.99", INFO))
    assert exc.value.code == "INVALID_ADMIN_KEY"


def test_admin_key_must_match_whole_not_a_prefix_or_extension(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: ``hmac.compare_digest(key, admin_key)`` replaced by a prefix test
    (``admin_key.startswith(key)``) or any comparison that ignores the key's end: one character would do."""
    assert env.run(env.cp.access.authenticate(ADMIN_KEY, None, "192.0.2.99", INFO)).is_admin
    for wrong in (ADMIN_KEY[:-1], ADMIN_KEY[:1], ADMIN_KEY + "a", ADMIN_KEY[:-1] + "b"):
        _refused_admin(env, wrong)
    with pytest.raises(Unauthenticated):
        env.cp.access.authorize_metrics(ADMIN_KEY[:8], None)


def test_api_key_ends_at_its_expiry_instant(env: Env) -> None:  # noqa: F811 - the fixture
    """Bugs caught: the API-key lookup's expiry dropped (an expired key keeps working on the JSON API) or
    ``expires_at > now`` turned into ``>=`` (the key still works at the very instant it expires); the same for
    an API-key dashboard sign-in."""
    key = env.run(env.cp.access.create_api_key(ADMIN, env.tenant_id,
                                               ApiKeyCreate(name="ci", expires_in_seconds=120), INFO))
    env.clock.advance(120 - 0.001)
    assert env.run(env.cp.access.authenticate(None, key.api_key, None, INFO)).key_id == key.id
    env.clock.advance(0.001)  # exactly expires_at
    with pytest.raises(Unauthenticated) as exc:
        env.run(env.cp.access.authenticate(None, key.api_key, None, INFO))
    assert exc.value.code == "INVALID_API_KEY"
    with pytest.raises(Unauthenticated) as login:
        env.run(env.cp.accounts.login_api_key(key.api_key, None, INFO, None))
    assert login.value.code == "INVALID_API_KEY"


def test_api_key_session_ends_at_the_key_expiry_instant(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: a session's key-expiry check ``now >= key_expires_at`` turned into ``>`` (or dropped): the
    read-only session of an expired key would live on past the key."""
    key = env.run(env.cp.access.create_api_key(ADMIN, env.tenant_id,
                                               ApiKeyCreate(name="ci", expires_in_seconds=600), INFO))
    res = env.run(env.cp.accounts.login_api_key(key.api_key, None, INFO, None))
    env.clock.advance(590)
    assert env.run(env.cp.accounts.session(res.token)) is not None
    env.clock.advance(10)
    assert env.run(env.cp.accounts.session(res.token)) is None


def test_a_tenant_cannot_revoke_or_list_another_tenants_api_keys(env: Env) -> None:  # noqa: F811
    """Bugs caught: ``revoke_api_key``'s ``api_keys.tenant_id == tenant_id`` dropped (an owner of tenant A
    revokes tenant B's key by its id through A's own path) and ``list_api_keys`` without ``tenant_scope``."""
    other = _tenant(env, "other")
    theirs = env.run(env.cp.access.create_api_key(ADMIN, other, ApiKeyCreate(name="theirs"), INFO))
    mine = env.run(env.cp.access.create_api_key(ADMIN, env.tenant_id, ApiKeyCreate(name="mine"), INFO))
    for p in (_owner(env, env.tenant_id, "own@example.com"),
              env.run(env.cp.access.authenticate(None, mine.api_key, None, INFO))):
        with pytest.raises(NotFound) as nf:
            env.run(env.cp.access.revoke_api_key(p, env.tenant_id, theirs.id, INFO))
        assert nf.value.code == "API_KEY_NOT_FOUND"
        with pytest.raises(NotFound) as listing:
            env.run(env.cp.access.list_api_keys(p, other))
        assert listing.value.code == "TENANT_NOT_FOUND"
    assert env.run(env.cp.access.authenticate(None, theirs.api_key, None, INFO)).tenant_id == other


def test_metrics_refuses_a_wrong_admin_key_and_a_wrong_token(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: ``authorize_metrics`` accepting any ``X-Admin-Key`` that is present (``admin_key is not
    None`` without ``is_admin_key``); the HTTP route drops a wrong key first, the use case must not rely on
    it."""
    env.cp.access.authorize_metrics(ADMIN_KEY, None)
    for key, auth in (("wrong-" + "x" * 40, None), ("wrong-" + "x" * 40, "Bearer wrong-token-0123456789"),
                      (None, f"Bearer {ADMIN_KEY}")):
        with pytest.raises(Unauthenticated) as exc:
            env.cp.access.authorize_metrics(key, auth)
        assert exc.value.code == "UNAUTHENTICATED"


def test_session_ends_at_the_exact_idle_instant(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: ``now >= last_seen_at + idle`` in ``load_session`` turned into ``>`` (a session still valid
    at the very instant its idle timeout ends; the absolute one is pinned in test_accounts)."""
    env.run(env.cp.accounts.create_user("idle@example.com", PASSWORD))
    before = env.run(env.cp.accounts.login("idle@example.com", PASSWORD, None, INFO, None))
    at = env.run(env.cp.accounts.login("idle@example.com", PASSWORD, None, INFO, None))
    env.clock.advance(8 * 3600 - 0.001)
    assert env.run(env.cp.accounts.session(before.token)) is not None
    env.clock.advance(0.001)  # exactly 8 h after the second login, which has not been seen since
    assert env.run(env.cp.accounts.session(at.token)) is None


def test_sessions_of_another_tenant_are_neither_listed_nor_revoked(env: Env) -> None:  # noqa: F811
    """Bugs caught: ``revoke_session`` without ``tenant_scope`` (an owner of A names tenant B in the path and
    ends B's sessions) and ``_tenant_sessions``' API-key branch without ``api_keys.tenant_id == tenant_id``
    (every tenant's API-key sessions listed and revocable by any owner)."""
    other = _tenant(env, "other")
    env.run(env.cp.accounts.create_user("b@example.com", PASSWORD))
    env.run(env.cp.accounts.grant(ADMIN, other, "b@example.com", Role.VIEWER, INFO))
    member = env.run(env.cp.accounts.login("b@example.com", PASSWORD, None, INFO, None))
    key = env.run(env.cp.access.create_api_key(ADMIN, other, ApiKeyCreate(name="b-key"), INFO))
    keyed = env.run(env.cp.accounts.login_api_key(key.api_key, None, INFO, None))
    p = _owner(env, env.tenant_id, "a@example.com")
    listed = env.run(env.cp.accounts.list_sessions(p, env.tenant_id, None))
    assert [s.label for s in listed] == ["a@example.com"]
    for victim in (member, keyed):
        for tenant_id in (env.tenant_id, other):
            with pytest.raises(NotFound):
                env.run(env.cp.accounts.revoke_session(p, tenant_id, victim.context.session_id, INFO))
        assert env.run(env.cp.accounts.session(victim.token)) is not None
    with pytest.raises(NotFound) as nf:
        env.run(env.cp.accounts.list_sessions(p, other, None))
    assert nf.value.code == "TENANT_NOT_FOUND"


def test_disabling_a_user_ends_only_that_users_sessions(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: ``end_user_sessions`` without ``sessions.user_id == user_id`` (disabling one user signs
    everybody out) or disabling that ends none (``load_session``'s disabled check is tested below)."""
    env.run(env.cp.accounts.create_user("gone@example.com", PASSWORD))
    env.run(env.cp.accounts.create_user("stays@example.com", PASSWORD))
    gone = env.run(env.cp.accounts.login("gone@example.com", PASSWORD, None, INFO, None))
    stays = env.run(env.cp.accounts.login("stays@example.com", PASSWORD, None, INFO, None))
    env.run(env.cp.accounts.disable_user("gone@example.com"))
    assert env.run(env.cp.accounts.session(gone.token)) is None
    assert env.run(env.cp.accounts.session(stays.token)) is not None
    disable = [e for e in env.audit_rows() if e.action == "user.disable"]
    assert [e.details["sessions_ended"] for e in disable] == [1]


def test_a_disabled_users_session_resolves_to_nothing(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: ``load_session`` without its ``users.disabled_at`` check. ``disable_user`` also revokes the
    sessions, so the row is marked disabled here directly (as a session opened concurrently with the disable,
    e.g. by an invitation accept on another replica, would be left): the session must still be refused."""
    uid = env.run(env.cp.accounts.create_user("dis@example.com", PASSWORD))
    res = env.run(env.cp.accounts.login("dis@example.com", PASSWORD, None, INFO, None))
    with env.db.engine.begin() as conn:
        conn.execute(t.users.update().where(t.users.c.id == uid).values(disabled_at=env.clock.now()))
    assert env.run(env.cp.accounts.session(res.token)) is None


def test_removing_a_member_from_one_tenant_keeps_its_other_memberships(env: Env) -> None:  # noqa: F811
    """Bug caught: ``revoke_membership``'s ``memberships.tenant_id == tenant_id`` dropped: an owner of A
    removing a user from A would delete that user's memberships in every tenant."""
    other = _tenant(env, "other")
    uid = env.run(env.cp.accounts.create_user("both@example.com", PASSWORD))
    for tid in (env.tenant_id, other):
        env.run(env.cp.accounts.grant(ADMIN, tid, "both@example.com", Role.VIEWER, INFO))
    p = _owner(env, env.tenant_id, "own@example.com")
    env.run(env.cp.accounts.revoke_membership(p, env.tenant_id, uid, INFO))
    assert [m.user_id for m in env.run(env.cp.accounts.list_members(ADMIN, other))] == [uid]
    ctx = env.run(env.cp.accounts.login("both@example.com", PASSWORD, None, INFO, None)).context
    assert [m.tenant_id for m in ctx.tenants] == [other]


def test_a_tenant_cannot_revoke_another_tenants_invitation(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: ``revoke_invitation``'s ``invitations.tenant_id == tenant_id`` dropped (an owner of A
    revokes B's pending invitation by its id through A's own path)."""
    other = _tenant(env, "other")
    theirs = env.run(env.cp.accounts.invite(ADMIN, other, "inv@example.com", Role.VIEWER, None, INFO))
    p = _owner(env, env.tenant_id, "own@example.com")
    with pytest.raises(NotFound) as nf:
        env.run(env.cp.accounts.revoke_invitation(p, env.tenant_id, theirs.id, INFO))
    assert nf.value.code == "INVITATION_NOT_FOUND"
    assert env.run(env.cp.accounts.invitation(theirs.token)) is not None


def test_invitation_accept_obeys_the_account_throttle_and_the_lockout(env: Env) -> None:  # noqa: F811
    """Bugs caught: ``_check_password`` without its account-lock test (``not _lock_state(user).locked(now)``):
    login re-checks the lock in its transaction, but accepting an invitation does not, so a throttled
    account's password would still be tried (and accepted) there; and ``accept_invitation`` without the
    source's PASSWORD lock-out check (a locked-out address could go on guessing through invitation links)."""
    env.run(env.cp.accounts.create_user("held@example.com", PASSWORD))
    inv = env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "held@example.com", Role.VIEWER, None, INFO))
    for i in range(10):  # ten addresses: the account's throttle, not an address's lock-out
        with pytest.raises(Unauthenticated):
            env.run(env.cp.accounts.login("held@example.com", f"wrong {i}", f"198.51.100.{i}",
                                          RequestInfo(source_ip=f"198.51.100.{i}"), None))
    with pytest.raises(Unauthenticated) as exc:
        env.run(env.cp.accounts.accept_invitation(inv.token, PASSWORD, FROM_5, None))
    assert exc.value.code == "INVALID_LOGIN"
    assert env.run(env.cp.accounts.invitation(inv.token)) is not None  # not consumed

    env.clock.advance(901)  # the account's lock is over; now lock one address out instead
    for i in range(5):
        with pytest.raises(Unauthenticated):
            env.run(env.cp.accounts.login(f"nobody{i}@example.com", PASSWORD, "203.0.113.9", INFO, None))
    with pytest.raises(LockedOut):
        env.run(env.cp.accounts.accept_invitation(inv.token, PASSWORD, FROM_9, None))
    res = env.run(env.cp.accounts.accept_invitation(inv.token, PASSWORD, FROM_5, None))
    assert [m.role for m in res.context.tenants] == [Role.VIEWER]


def test_user_disabled_during_the_password_check_gets_no_session(env: Env,  # noqa: F811 - the fixture
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug caught: ``_login_tx`` without its re-check of the user row (``disabled_at`` / lock) under
    ``FOR UPDATE``: the argon2 check runs outside any transaction, so a disable landing in between (another
    request or replica) would still get a session. The disable is run exactly there, after the real check."""
    env.run(env.cp.accounts.create_user("late@example.com", PASSWORD))
    real = passwords.verify_password

    async def verify_then_disable(stored: str, password: str) -> bool:
        ok = await real(stored, password)
        await env.cp.accounts.disable_user("late@example.com")
        return ok

    monkeypatch.setattr(passwords, "verify_password", verify_then_disable)
    with pytest.raises(Unauthenticated) as exc:
        env.run(env.cp.accounts.login("late@example.com", PASSWORD, None, INFO, None))
    assert exc.value.code == "INVALID_LOGIN"
    with env.db.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(t.sessions)).scalar_one() == 0


def test_wrong_api_keys_at_the_dashboard_sign_in_lock_the_address_out(env: Env) -> None:  # noqa: F811
    """Bug caught: ``login_api_key`` without ``record_failure`` for a wrong key: the dashboard's API-key form
    would be a side door for guessing keys that the JSON API's lock-out closes (5 here: ``env``'s policy)."""
    key = env.run(env.cp.access.create_api_key(ADMIN, env.tenant_id, ApiKeyCreate(name="ci"), INFO))
    for i in range(5):
        with pytest.raises(Unauthenticated):
            env.run(env.cp.accounts.login_api_key(f"nk_wrong{i}", "203.0.113.20", INFO, None))
    with pytest.raises(LockedOut):
        env.run(env.cp.accounts.login_api_key(key.api_key, "203.0.113.20", INFO, None))
    with pytest.raises(LockedOut):  # one lock-out per address and credential type, whichever door
        env.run(env.cp.access.authenticate(None, key.api_key, "203.0.113.20", INFO))
    ok = env.run(env.cp.accounts.login_api_key(key.api_key, "203.0.113.21", INFO, None))
    assert ok.context.api_key_id == key.id


def test_login_password_length_is_bounded_exactly(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: ``presented_password``'s ``len(value) > PASSWORD_MAX`` loosened by one (or dropped): the bound
    is what keeps a login from making argon2 hash an arbitrarily long input."""
    env.run(env.cp.accounts.create_user("long@example.com", PASSWORD))
    with pytest.raises(Unauthenticated):  # at the bound: checked (and wrong)
        env.run(env.cp.accounts.login("long@example.com", "x" * PASSWORD_MAX, None, INFO, None))
    with pytest.raises(BadRequest) as exc:  # one over: refused before any hashing
        env.run(env.cp.accounts.login("long@example.com", "x" * (PASSWORD_MAX + 1), None, INFO, None))
    assert exc.value.code == "INVALID_PASSWORD" and exc.value.field == "password"


def test_invitation_ends_at_its_expiry_instant(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: ``_pending``'s ``invitations.expires_at > now`` turned into ``>=`` (the link still shows its
    invitation, and is still offered to be accepted, at the very instant it expires)."""
    inv = env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "late@example.com", Role.VIEWER, 60, INFO))
    env.clock.advance(60 - 0.001)
    assert env.run(env.cp.accounts.invitation(inv.token)) is not None
    env.clock.advance(0.001)
    assert env.run(env.cp.accounts.invitation(inv.token)) is None
    with pytest.raises(NotFound) as exc:
        env.run(env.cp.accounts.accept_invitation(inv.token, PASSWORD, INFO, None))
    assert exc.value.code == "INVITATION_INVALID"


def test_empty_key_headers_guess_nothing_and_a_locked_address_stays_locked(env: Env) -> None:  # noqa: F811
    """Bugs caught: an empty ``X-Admin-Key`` / ``X-API-Key`` counted as a wrong guess (``presented_secret(...)
    is not None`` / ``key is not None`` dropped before ``record_failure``: a client with an empty header would
    lock its own address out), and an empty API key from a locked-out address answered 401 without the
    lock-out check (``lock.check`` dropped from the empty-key branch: the lock-out must hold for every key)."""
    key = env.run(env.cp.access.create_api_key(ADMIN, env.tenant_id, ApiKeyCreate(name="ci"), INFO))
    for empty in ("", "   ", "", "  ", "", ""):  # more than the policy's 5
        for admin, api in ((empty, None), (None, empty)):
            with pytest.raises(Unauthenticated):
                env.run(env.cp.access.authenticate(admin, api, "203.0.113.30", INFO))
    assert env.run(env.cp.access.authenticate(ADMIN_KEY, None, "203.0.113.30", INFO)).is_admin
    assert env.run(env.cp.access.authenticate(None, key.api_key, "203.0.113.30", INFO)).key_id == key.id

    for i in range(5):  # real guesses do lock the address out of API keys
        with pytest.raises(Unauthenticated):
            env.run(env.cp.access.authenticate(None, f"nk_guess{i}", "203.0.113.31", INFO))
    for presented in ("", key.api_key):
        with pytest.raises(LockedOut):
            env.run(env.cp.access.authenticate(None, presented, "203.0.113.31", INFO))


def test_the_admin_key_minimum_is_32_characters(tmp_path: Path) -> None:
    """Bug caught: ``MIN_ADMIN_KEY_CHARS`` lowered (the existing start-up tests use ``MIN_ADMIN_KEY_CHARS - 1``,
    so they follow the constant down): the documented floor is 32 printable characters, whatever the constant."""
    for bad in ("k" * 31, " " + "k" * 31 + "\n"):
        with pytest.raises(ValidationError) as exc:
            check_admin_key(bad, "test")
        assert exc.value.code == "ADMIN_KEY_INVALID"
        with pytest.raises(ValidationError):
            Settings(data_dir=tmp_path, admin_key=bad).check()
    assert check_admin_key(" " + "k" * 32 + "\n", "test") == "k" * 32
    Settings(data_dir=tmp_path, admin_key="k" * 32).check()


def test_secrets_must_be_printable_ascii_throughout(tmp_path: Path) -> None:
    """Bugs caught: ``_PRINTABLE`` losing its ``\\Z`` anchor (a key with a control or non-ASCII character after
    a printable start would pass as printable) and the metrics token's 16-character floor lowered by one."""
    for bad in ("k" * 40 + "\x00", "k" * 20 + "\x01" + "k" * 20, "k" * 40 + "\u00e9", "k" * 20 + " " + "k" * 20):
        assert presented_secret(bad) is None
        with pytest.raises(ValidationError):
            check_admin_key(bad, "test")
    with pytest.raises(ValidationError) as exc:
        Settings(data_dir=tmp_path, metrics_token="m" * 15).check()
    assert exc.value.field == "metrics_token"
    Settings(data_dir=tmp_path, metrics_token="m" * 16).check()


def test_tenant_keys_and_sessions_are_not_the_admin_and_see_only_their_tenant(env: Env) -> None:  # noqa: F811
    """Bugs caught: ``require_admin`` asking "not a user" instead of ``is_admin`` (or ``Principal.is_admin`` true
    for an API key): a tenant API key could create tenants and set quotas; and ``tenant_scope`` without its
    ``tenant_visible`` test (or ``site_scope`` without it): a tenant key or member would reach another tenant's
    objects by naming its id."""
    other = _tenant(env, "other")
    their_site = env.run(env.cp.tenancy.create_site(ADMIN, other, SiteCreate(name="theirs"), INFO)).id
    key = env.run(env.cp.access.create_api_key(ADMIN, env.tenant_id, ApiKeyCreate(name="ci"), INFO))
    keyed = env.run(env.cp.access.authenticate(None, key.api_key, None, INFO))
    session = env.run(env.cp.accounts.login_api_key(key.api_key, None, INFO, None)).context.principal_for(
        env.tenant_id)
    for p in (keyed, session, _owner(env, env.tenant_id, "own@example.com")):
        assert not p.is_admin
        with pytest.raises(Unauthenticated) as exc:
            env.run(env.cp.quotas.set_quota(p, env.tenant_id, QuotaUpdate(max_sites=3), INFO))
        assert exc.value.code == "ADMIN_REQUIRED"
        with pytest.raises(Unauthenticated):
            env.run(env.cp.tenancy.create_tenant(p, TenantCreate(slug="evil", name="evil"), INFO))
        with pytest.raises(NotFound) as nf:
            env.run(env.cp.tenancy.list_sites(p, other))
        assert nf.value.code == "TENANT_NOT_FOUND"
        with pytest.raises(NotFound):
            env.run(env.cp.accounts.list_members(p, other))
        with pytest.raises(NotFound) as site_nf:  # ``site_scope``: the same rule for a site's objects
            env.run(env.cp.inventory.list_hosts(p, their_site))
        assert site_nf.value.code == "SITE_NOT_FOUND"
    assert env.run(env.cp.inventory.list_hosts(ADMIN, their_site)).hosts == []  # the admin sees every tenant


def test_only_managers_revoke_invitations_and_memberships(env: Env) -> None:  # noqa: F811 - the fixture
    """Bugs caught: ``require(p, Permission.MANAGE)`` dropped from ``revoke_invitation`` or ``revoke_membership``
    (test_roles' table lists neither): an operator, a viewer or an API-key session could revoke them."""
    key = env.run(env.cp.access.create_api_key(ADMIN, env.tenant_id, ApiKeyCreate(name="ro"), INFO))
    weak = [env.run(env.cp.accounts.login_api_key(key.api_key, None, INFO, None)).context.principal_for(
        env.tenant_id)]
    for role in (Role.OPERATOR, Role.VIEWER):
        email = f"{role.value}@example.com"
        env.run(env.cp.accounts.create_user(email, PASSWORD))
        env.run(env.cp.accounts.grant(ADMIN, env.tenant_id, email, role, INFO))
        weak.append(env.run(env.cp.accounts.login(email, PASSWORD, None, INFO, None)).context.principal_for(
            env.tenant_id))
    inv = env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "inv@example.com", Role.VIEWER, None, INFO))
    target = env.run(env.cp.accounts.create_user("member@example.com", PASSWORD))
    env.run(env.cp.accounts.grant(ADMIN, env.tenant_id, "member@example.com", Role.VIEWER, INFO))
    for p in weak:
        for call in (env.cp.accounts.revoke_invitation(p, env.tenant_id, inv.id, INFO),
                     env.cp.accounts.revoke_membership(p, env.tenant_id, target, INFO)):
            with pytest.raises(Forbidden) as exc:
                env.run(call)
            assert exc.value.code == "FORBIDDEN_ROLE"
    assert env.run(env.cp.accounts.invitation(inv.token)) is not None
    assert target in [m.user_id for m in env.run(env.cp.accounts.list_members(ADMIN, env.tenant_id))]


def test_an_owner_of_one_tenant_manages_nothing_in_another(env: Env) -> None:  # noqa: F811 - the fixture
    """Bugs caught: ``tenant_scope`` dropped from any tenant-management use case (grant, revoke_membership,
    invite, list/revoke invitations, create/list/revoke API keys, list/revoke sessions). An owner's MANAGE is
    its own tenant's; naming another tenant's id must be the same 404 as an unknown one, and change nothing."""
    other = _tenant(env, "other")
    p = _owner(env, env.tenant_id, "own@example.com")
    uid = env.run(env.cp.accounts.create_user("theirs@example.com", PASSWORD))
    env.run(env.cp.accounts.grant(ADMIN, other, "theirs@example.com", Role.VIEWER, INFO))
    inv = env.run(env.cp.accounts.invite(ADMIN, other, "inv@example.com", Role.VIEWER, None, INFO))
    key = env.run(env.cp.access.create_api_key(ADMIN, other, ApiKeyCreate(name="theirs"), INFO))
    session = env.run(env.cp.accounts.login("theirs@example.com", PASSWORD, None, INFO, None))
    acc, access = env.cp.accounts, env.cp.access
    calls = {
        "grant": acc.grant(p, other, "theirs@example.com", Role.OWNER, INFO),
        "revoke_membership": acc.revoke_membership(p, other, uid, INFO),
        "invite": acc.invite(p, other, "new@example.com", Role.OWNER, None, INFO),
        "list_invitations": acc.list_invitations(p, other),
        "revoke_invitation": acc.revoke_invitation(p, other, inv.id, INFO),
        "create_api_key": access.create_api_key(p, other, ApiKeyCreate(name="mine"), INFO),
        "list_api_keys": access.list_api_keys(p, other),
        "revoke_api_key": access.revoke_api_key(p, other, key.id, INFO),
        "list_sessions": acc.list_sessions(p, other, None),
        "revoke_session": acc.revoke_session(p, other, session.context.session_id, INFO),
    }
    for name, call in calls.items():
        with pytest.raises(NotFound) as nf:
            env.run(call)
        assert nf.value.code == "TENANT_NOT_FOUND", name
    members = env.run(acc.list_members(ADMIN, other))
    assert [(m.user_id, m.role) for m in members] == [(uid, Role.VIEWER)]
    assert [i.id for i in env.run(acc.list_invitations(ADMIN, other))] == [inv.id]
    assert env.run(acc.invitation(inv.token)) is not None
    assert [k.id for k in env.run(access.list_api_keys(ADMIN, other)).api_keys] == [key.id]
    assert env.run(acc.session(session.token)) is not None


def test_accepting_an_invitation_cannot_demote_the_last_owner(env: Env) -> None:  # noqa: F811 - the fixture
    """Bug caught: ``_keep_an_owner`` waiving its rule for ``p is None`` (an invitation accept) as it does for
    the admin: a user made the tenant's only owner after being invited as a viewer would, by accepting, leave
    the tenant without an owner."""
    env.run(env.cp.accounts.create_user("sole@example.com", PASSWORD))
    inv = env.run(env.cp.accounts.invite(ADMIN, env.tenant_id, "sole@example.com", Role.VIEWER, None, INFO))
    env.run(env.cp.accounts.grant(ADMIN, env.tenant_id, "sole@example.com", Role.OWNER, INFO))
    with pytest.raises(Conflict) as exc:
        env.run(env.cp.accounts.accept_invitation(inv.token, PASSWORD, INFO, None))
    assert exc.value.code == "LAST_OWNER"
    assert [m.role for m in env.run(env.cp.accounts.list_members(ADMIN, env.tenant_id))] == [Role.OWNER]


def test_password_hashes_meet_the_owasp_argon2id_minimum() -> None:
    """Bug caught: a weaker argon2 parameter (``MEMORY_COST_KIB``, ``TIME_COST``, ``PARALLELISM``): test_accounts
    compares the hash with the constants, so it follows them down; the floor (OWASP: m=19 MiB, t=2, p=1) is
    written out here, and a hash made with less is re-hashed at the next login."""
    assert passwords.hash_now(PASSWORD).startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    weaker = PasswordHasher(time_cost=1, memory_cost=19456, parallelism=1, type=Type.ID).hash(PASSWORD)
    assert passwords.verify_now(weaker, PASSWORD) and passwords.needs_rehash(weaker)
