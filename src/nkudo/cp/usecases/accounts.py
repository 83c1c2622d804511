"""Dashboard accounts (issue 13): users, tenant memberships with roles, invitations, login and sessions.

Why users besides API keys: a person needs a login of their own (so the audit log names them and leaving a
team ends their access) and a role narrower than "everything in the tenant". An owner manages the tenant's
members, invitations, API keys and sites; an operator runs plans and enrolls hosts; a viewer reads
(``domain.role_allows``). Passwords are stored as argon2id hashes only (``nkudo.cp.passwords``); invitation
and session tokens as sha256 only. Login, its throttling and the sessions are ``sessions.Logins``, which
``Accounts`` inherits so that ``cp.accounts`` is one use case; the records and input rules are re-exported here.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from nkudo.cp import passwords
from nkudo.cp import schema as t
from nkudo.cp.config import MAX_INVITATION_TTL
from nkudo.cp.domain import ActorType, Permission, PrincipalKind, Role, keeps_an_owner
from nkudo.cp.errors import BadRequest, Conflict, NotFound
from nkudo.cp.ratelimit import Credential
from nkudo.cp.records import Actor, AuditEntry, Principal, RequestInfo
from nkudo.cp.usecases import sessions as ss
from nkudo.cp.usecases.common import NO_REQUEST, audit, new_id, rand_token, require, sha256_hex, tenant_scope
from nkudo.cp.usecases.sessions import (
    ACCOUNT_POLICY,
    EMAIL_PATTERN,
    LoginResult,
    Logins,
    Membership,
    SessionContext,
    SessionView,
    check_password,
    parse_email,
    parse_role,
    presented_password,
)

__all__ = ["ACCOUNT_POLICY", "EMAIL_PATTERN", "Accounts", "InvitationIssued", "InvitationView", "LoginResult",
           "MemberView", "Membership", "SessionContext", "SessionView", "UserView", "check_password",
           "parse_email", "parse_role"]

T = TypeVar("T")

_CLI = Actor(ActorType.SYSTEM, "cli")


# --- views ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberView:
    user_id: str
    email: str
    role: Role
    created_at: dt.datetime
    last_login_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class InvitationView:
    id: str
    email: str
    role: Role
    created_at: dt.datetime
    expires_at: dt.datetime
    accepted_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class InvitationIssued:
    """A new invitation: ``token`` (inside ``url_path``) is shown once; only its sha256 is stored."""

    id: str
    token: str
    url_path: str
    expires_at: dt.datetime


@dataclass(frozen=True, slots=True)
class UserView:
    """A user as the admin CLI lists it."""

    id: str
    email: str
    is_admin: bool
    created_at: dt.datetime
    last_login_at: dt.datetime | None
    disabled_at: dt.datetime | None
    tenants: dict[str, Role]


def _member_view(r: Any) -> MemberView:
    return MemberView(user_id=r.user_id, email=r.email, role=Role(r.role), created_at=r.created_at,
                      last_login_at=r.last_login_at)


def _invitation_view(r: Row[Any]) -> InvitationView:
    return InvitationView(id=r.id, email=r.email, role=Role(r.role), created_at=r.created_at,
                          expires_at=r.expires_at, accepted_at=r.accepted_at)



class Accounts(Logins):
    """Users, memberships and invitations; login and sessions are inherited from ``sessions.Logins``."""

    # --- users (the admin CLI) ----------------------------------------------------------------------------------

    async def create_user(self, email: str, password: str, *, is_admin: bool = False,
                          info: RequestInfo = NO_REQUEST) -> str:
        """A new user (the admin CLI: how the first admin exists before anyone can log in); its id."""
        email = parse_email(email)
        digest = await passwords.hash_password(check_password(password))

        def tx(conn: Connection) -> str:
            now = self.clock.now()
            uid = self._insert_user(conn, email, digest, is_admin, now)
            audit(conn, info, AuditEntry(_CLI, "user.create", None, "user", uid,
                                         {"email": email, "is_admin": is_admin}), now)
            return uid

        return await self._unique_email(tx, email)

    async def _unique_email(self, fn: Callable[..., T], email: str, *args: Any) -> T:
        try:
            return await self.db.run(fn, *args)
        except sa.exc.IntegrityError:  # the unique email: a concurrent creation (maybe on another replica) won
            raise Conflict(f"a user with email {email!r} already exists", code="USER_EXISTS", field="email") from None

    def _insert_user(self, conn: Connection, email: str, digest: str, is_admin: bool, now: dt.datetime) -> str:
        if conn.execute(sa.select(t.users.c.id).where(t.users.c.email == email)).first() is not None:
            raise Conflict(f"a user with email {email!r} already exists", code="USER_EXISTS", field="email")
        uid = new_id()
        conn.execute(t.users.insert().values(id=uid, email=email, password_hash=digest, is_admin=is_admin,
                                             created_at=now, failed_logins=0, lock_level=0))
        return uid

    async def list_users(self) -> list[UserView]:
        """Every user with its memberships (the admin CLI)."""
        def tx(conn: Connection) -> list[UserView]:
            m = t.memberships.c
            roles: dict[str, dict[str, Role]] = {}
            for r in conn.execute(sa.select(m.user_id, m.tenant_id, m.role)):
                roles.setdefault(r.user_id, {})[r.tenant_id] = Role(r.role)
            rows = conn.execute(sa.select(t.users).order_by(t.users.c.email))
            return [UserView(id=r.id, email=r.email, is_admin=bool(r.is_admin), created_at=r.created_at,
                             last_login_at=r.last_login_at, disabled_at=r.disabled_at, tenants=roles.get(r.id, {}))
                    for r in rows]

        return await self.db.run(tx)

    async def disable_user(self, email: str, info: RequestInfo = NO_REQUEST) -> str:
        """Disable a user (the admin CLI): no more logins, and its sessions end now; its id."""
        email = parse_email(email)

        def tx(conn: Connection) -> str:
            now = self.clock.now()
            u = t.users.c
            uid = conn.execute(sa.select(u.id).where(u.email == email)).scalar()
            if uid is None:
                raise NotFound(f"no user with email {email!r}", code="USER_NOT_FOUND", field="email")
            conn.execute(t.users.update().where(u.id == uid, u.disabled_at.is_(None)).values(disabled_at=now))
            ended = ss.end_user_sessions(conn, uid, now)
            audit(conn, info, AuditEntry(_CLI, "user.disable", None, "user", uid, {"sessions_ended": ended}), now)
            return str(uid)

        return await self.db.run(tx)

    # --- memberships --------------------------------------------------------------------------------------------

    async def grant(self, p: Principal, tenant_id: str, email: str, role: Role | str, info: RequestInfo
                    ) -> MemberView:
        """Change a member's role in the tenant; the admin may also add any existing user.

        Why a tenant owner may not add users directly: that would tell it which emails have accounts on this
        control plane and put a tenant into someone's dashboard without their consent; an owner invites, and
        the invitation is accepted with the invitee's password. So for an owner a user that is not a member is
        the same 404 as one that does not exist.
        """
        require(p, Permission.MANAGE)
        email, new = parse_email(email), parse_role(role)

        def tx(conn: Connection) -> MemberView:
            tenant_scope(conn, p, tenant_id)
            now = self.clock.now()
            u, m = t.users.c, t.memberships.c
            q = sa.select(u.id).where(u.email == email)
            if p.kind != PrincipalKind.ADMIN:
                q = q.join(t.memberships, sa.and_(m.user_id == u.id, m.tenant_id == tenant_id))
            uid = conn.execute(q).scalar()
            if uid is None:
                raise NotFound(f"{email} is not a member of this tenant; invite them instead",
                               code="MEMBER_NOT_FOUND", field="email")
            old = self._set_membership(conn, p, tenant_id, uid, new, now)
            audit(conn, info, AuditEntry(p.actor, "membership.grant", tenant_id, "user", uid,
                                         {"role": new.value, "previous_role": old.value if old else None}), now)
            return self._member(conn, tenant_id, uid)

        return await self.db.run(tx)

    def _set_membership(self, conn: Connection, p: Principal | None, tenant_id: str, user_id: str, role: Role,
                        now: dt.datetime) -> Role | None:
        """Insert or change a membership; refuses to demote the tenant's last owner (but for the admin)."""
        m = t.memberships.c
        where = sa.and_(m.user_id == user_id, m.tenant_id == tenant_id)
        old = conn.execute(sa.select(m.role).where(where).with_for_update()).scalar()
        old_role = Role(old) if old is not None else None
        if old_role is None:
            conn.execute(t.memberships.insert().values(user_id=user_id, tenant_id=tenant_id, role=role,
                                                       created_at=now))
        elif old_role != role:
            self._keep_an_owner(conn, p, tenant_id, old_role, role)
            conn.execute(t.memberships.update().where(where).values(role=role))
        return old_role

    def _keep_an_owner(self, conn: Connection, p: Principal | None, tenant_id: str, old: Role | None,
                       new: Role | None) -> None:
        if p is not None and p.kind == PrincipalKind.ADMIN:
            return  # the admin manages tenants with or without owners
        m = t.memberships.c
        owners = conn.execute(sa.select(sa.func.count()).select_from(t.memberships).where(
            m.tenant_id == tenant_id, m.role == Role.OWNER)).scalar_one()
        if not keeps_an_owner(owners, old, new):
            raise Conflict("the tenant's last owner cannot be removed or demoted; make someone else owner first",
                           code="LAST_OWNER", field="user_id")

    def _member(self, conn: Connection, tenant_id: str, user_id: str) -> MemberView:
        m, u = t.memberships.c, t.users.c
        return _member_view(conn.execute(
            sa.select(m.user_id, u.email, m.role, m.created_at, u.last_login_at).join(t.users, u.id == m.user_id)
            .where(m.tenant_id == tenant_id, m.user_id == user_id)).one())

    async def revoke_membership(self, p: Principal, tenant_id: str, user_id: str, info: RequestInfo) -> None:
        """Remove a user from the tenant; its sessions lose the tenant at their next request."""
        require(p, Permission.MANAGE)

        def tx(conn: Connection) -> None:
            tenant_scope(conn, p, tenant_id)
            now = self.clock.now()
            m = t.memberships.c
            where = sa.and_(m.user_id == user_id, m.tenant_id == tenant_id)
            old = conn.execute(sa.select(m.role).where(where).with_for_update()).scalar()
            if old is None:
                raise NotFound("member not found", code="MEMBER_NOT_FOUND", field="user_id")
            self._keep_an_owner(conn, p, tenant_id, Role(old), None)
            conn.execute(t.memberships.delete().where(where))
            audit(conn, info, AuditEntry(p.actor, "membership.revoke", tenant_id, "user", user_id,
                                         {"role": old}), now)

        await self.db.run(tx)

    async def list_members(self, p: Principal, tenant_id: str) -> list[MemberView]:
        require(p, Permission.READ)

        def tx(conn: Connection) -> list[MemberView]:
            tenant_scope(conn, p, tenant_id)
            m, u = t.memberships.c, t.users.c
            rows = conn.execute(sa.select(m.user_id, u.email, m.role, m.created_at, u.last_login_at)
                                .join(t.users, u.id == m.user_id).where(m.tenant_id == tenant_id)
                                .order_by(u.email))
            return [_member_view(r) for r in rows]

        return await self.db.run(tx)

    # --- invitations --------------------------------------------------------------------------------------------

    async def invite(self, p: Principal, tenant_id: str, email: str, role: Role | str, ttl_seconds: float | None,
                     info: RequestInfo) -> InvitationIssued:
        """An invitation link for ``email`` to join the tenant as ``role``, valid ``ttl_seconds`` (default
        ``Settings.invitation_ttl``, at most 30 days); the token is in the answer only."""
        require(p, Permission.MANAGE)
        email, role = parse_email(email), parse_role(role)
        ttl = self.s.invitation_ttl if ttl_seconds is None else ttl_seconds
        if not 60 <= ttl <= MAX_INVITATION_TTL:
            raise BadRequest(f"ttl_seconds must be between 60 and {int(MAX_INVITATION_TTL)} (30 days)",
                             code="INVALID_ARGUMENT", field="ttl_seconds")

        def tx(conn: Connection) -> InvitationIssued:
            tenant_scope(conn, p, tenant_id)
            now = self.clock.now()
            m, u = t.memberships.c, t.users.c
            if conn.execute(sa.select(m.user_id).join(t.users, u.id == m.user_id)
                            .where(m.tenant_id == tenant_id, u.email == email)).first() is not None:
                raise Conflict(f"{email} is already a member of this tenant", code="MEMBER_EXISTS", field="email")
            iid, token, exp = new_id(), rand_token(), now + dt.timedelta(seconds=ttl)
            conn.execute(t.invitations.insert().values(
                id=iid, tenant_id=tenant_id, email=email, role=role, token_hash=sha256_hex(token),
                created_by=p.actor.id or p.actor.type.value, created_at=now, expires_at=exp))
            audit(conn, info, AuditEntry(p.actor, "invitation.create", tenant_id, "invitation", iid,
                                         {"email": email, "role": role.value}), now)
            return InvitationIssued(id=iid, token=token, url_path=f"/ui/invite/{token}", expires_at=exp)

        return await self.db.run(tx)

    async def list_invitations(self, p: Principal, tenant_id: str) -> list[InvitationView]:
        """The tenant's invitations that were not revoked (pending, accepted and expired), newest first."""
        require(p, Permission.READ)

        def tx(conn: Connection) -> list[InvitationView]:
            tenant_scope(conn, p, tenant_id)
            i = t.invitations.c
            rows = conn.execute(sa.select(t.invitations).where(i.tenant_id == tenant_id, i.revoked_at.is_(None))
                                .order_by(i.created_at.desc(), i.id))
            return [_invitation_view(r) for r in rows]

        return await self.db.run(tx)

    async def revoke_invitation(self, p: Principal, tenant_id: str, invitation_id: str, info: RequestInfo) -> None:
        require(p, Permission.MANAGE)

        def tx(conn: Connection) -> None:
            tenant_scope(conn, p, tenant_id)
            now = self.clock.now()
            i = t.invitations.c
            res = conn.execute(t.invitations.update().where(
                i.id == invitation_id, i.tenant_id == tenant_id, i.accepted_at.is_(None), i.revoked_at.is_(None)
            ).values(revoked_at=now))
            if res.rowcount != 1:
                raise NotFound("pending invitation not found", code="INVITATION_NOT_FOUND", field="invitation_id")
            audit(conn, info, AuditEntry(p.actor, "invitation.revoke", tenant_id, "invitation", invitation_id), now)

        await self.db.run(tx)

    def _pending(self, conn: Connection, token: str, now: dt.datetime) -> Row[Any] | None:
        digest = ss.token_hash(token)
        if digest is None:
            return None
        i = t.invitations.c
        return conn.execute(sa.select(t.invitations).where(
            i.token_hash == digest, i.accepted_at.is_(None), i.revoked_at.is_(None), i.expires_at > now)).first()

    async def invitation(self, token: str) -> InvitationView | None:
        """The pending invitation of ``token`` (for the accept page; does not consume it), else ``None``."""
        def tx(conn: Connection) -> InvitationView | None:
            r = self._pending(conn, token, self.clock.now())
            return None if r is None else _invitation_view(r)

        return await self.db.run(tx)

    async def accept_invitation(self, token: str, password: str, info: RequestInfo, user_agent: str | None
                                ) -> LoginResult:
        """Accept an invitation and log in: a new user is created with ``password``; an existing user (same
        email) must give its password. Single use: of concurrent accepts exactly one consumes the token."""
        inv = await self.db.run(lambda conn: self._pending(conn, token, self.clock.now()))
        if inv is None:
            raise NotFound("invitation not found, expired, revoked or already used", code="INVITATION_INVALID")
        user = await self.db.run(self._user_tx, inv.email)
        digest: str | None = None
        if user is None:
            digest = await passwords.hash_password(check_password(password))
        else:
            if (lock := self._source_lock()) is not None:
                await lock.check(info.source_ip, Credential.PASSWORD)
            await self._check_password(user, presented_password(password), info.source_ip, info)
        return await self._unique_email(self._accept_tx, inv.email, inv.email, user.id if user else None, digest,
                                        token, info, user_agent)

    def _accept_tx(self, conn: Connection, email: str, user_id: str | None, digest: str | None, token: str,
                   info: RequestInfo, user_agent: str | None) -> LoginResult:
        now = self.clock.now()
        i = t.invitations.c
        row = self._pending(conn, token, now)
        # The conditional update is the single use: of concurrent accepts, one changes the row, the others none.
        res = None if row is None else conn.execute(t.invitations.update().where(
            i.id == row.id, i.accepted_at.is_(None), i.revoked_at.is_(None), i.expires_at > now
        ).values(accepted_at=now))
        if row is None or res is None or res.rowcount != 1:
            raise NotFound("invitation not found, expired, revoked or already used", code="INVITATION_INVALID")
        if user_id is None:
            if digest is None:  # the caller hashes the new user's password; never store an empty hash
                raise ValueError("a new user needs a password hash")
            user_id = self._insert_user(conn, email, digest, False, now)
            audit(conn, info, AuditEntry(Actor(ActorType.USER, user_id), "user.create", None, "user", user_id,
                                         {"email": email, "invitation_id": row.id}), now)
        self._set_membership(conn, None, row.tenant_id, user_id, Role(row.role), now)
        conn.execute(t.users.update().where(t.users.c.id == user_id).values(last_login_at=now))
        audit(conn, info, AuditEntry(Actor(ActorType.USER, user_id), "invitation.accept", row.tenant_id,
                                     "invitation", row.id, {"user_id": user_id, "role": row.role}), now)
        return ss.open_session(conn, user_id=user_id, api_key_id=None, tenant_id=None, now=now,
                               absolute=self._absolute, idle=self._idle, info=info, user_agent=user_agent)
