"""Who is calling: the admin key, tenant API keys (create, list, revoke, authenticate) and the metrics token."""

from __future__ import annotations

import datetime as dt
import hmac

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import domain
from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.config import check_admin_key, presented_secret
from nkudo.cp.domain import Permission, PrincipalKind
from nkudo.cp.errors import NotFound, Unauthenticated
from nkudo.cp.models import ApiKeyCreate
from nkudo.cp.ports import Clock, Transactions
from nkudo.cp.ratelimit import Credential
from nkudo.cp.records import AuditEntry, Principal, RequestInfo, iso, stamp
from nkudo.cp.usecases import quotas
from nkudo.cp.usecases.common import NO_REQUEST, audit, new_id, rand_token, require, sha256_hex, tenant_scope
from nkudo.cp.usecases.lockout import Lockouts

ADMIN = Principal(PrincipalKind.ADMIN)


class Access:
    def __init__(self, db: Transactions, clock: Clock, admin_key: str, metrics_token: str | None,
                 lockouts: Lockouts | None = None) -> None:
        self.db = db
        self.clock = clock
        self.lockouts = lockouts
        # Refused here too (not only at start-up): whatever builds the control plane, an empty or weak
        # root credential must not become one that an empty header matches.
        self.admin_key = check_admin_key(admin_key, "the admin key").encode()
        token = presented_secret(metrics_token)
        self._metrics_token = token.encode() if token is not None else None

    async def authenticate(self, admin_key: str | None, api_key: str | None, source: str | None = None,
                           info: RequestInfo = NO_REQUEST) -> Principal:
        """The principal behind the request's ``X-Admin-Key`` / ``X-API-Key`` headers.

        A header that is sent is checked even when it is empty: an empty or whitespace-only key is no
        credential (``presented_secret``) and is refused, never compared. ``source`` is the client address
        (issue 12 lock-out): while it is locked out of a credential type every key of that type is refused
        (a correct one too, or guessing would go on), and each wrong key (not an empty one, which guesses
        nothing) counts towards its next lock.
        """
        lock = self.lockouts if self.lockouts is not None and self.lockouts.enabled else None
        if admin_key is not None:
            if await self.admin_key_ok(admin_key, source, info):
                return ADMIN
            raise Unauthenticated("invalid admin key", code="INVALID_ADMIN_KEY")
        if api_key is not None:
            key = presented_secret(api_key)
            if key is None:
                if lock is not None:
                    await lock.check(source, Credential.API_KEY)
                row = None
            else:
                row = await self.db.run(self._api_key_tx, sha256_hex(key), self.clock.now(), source)
            if row is None:
                if lock is not None and key is not None:
                    await lock.record_failure(source, Credential.API_KEY, info)
                raise Unauthenticated("invalid, expired or revoked API key", code="INVALID_API_KEY")
            return row
        raise Unauthenticated("X-Admin-Key or X-API-Key header required", code="UNAUTHENTICATED")

    async def admin_key_ok(self, admin_key: str, source: str | None, info: RequestInfo = NO_REQUEST) -> bool:
        """``is_admin_key`` under the lock-out (issue 12): every place that accepts the admin key (API routes,
        ``/readyz``, ``/metrics``) refuses a locked-out source and counts a wrong key, so none of them is a
        side door for guessing it."""
        lock = self.lockouts if self.lockouts is not None and self.lockouts.enabled else None
        if lock is not None:
            await lock.check(source, Credential.ADMIN_KEY)
        if self.is_admin_key(admin_key):
            return True
        if lock is not None and presented_secret(admin_key) is not None:  # an empty header is no guess
            await lock.record_failure(source, Credential.ADMIN_KEY, info)
        return False

    def is_admin_key(self, admin_key: str) -> bool:
        """Constant-time check of a presented admin key (no early exit that would leak a prefix match).

        An empty presented key is refused before any comparison, so an empty configured key (which
        ``__init__`` refuses anyway) could never be matched by an empty header.
        """
        key = presented_secret(admin_key)
        return key is not None and hmac.compare_digest(key.encode(), self.admin_key)

    def authorize_metrics(self, admin_key: str | None, authorization: str | None) -> None:
        """``/metrics`` needs the admin key or ``Authorization: Bearer <metrics token>``.

        Why: counters reveal tenant activity and agent counts; the original
        served them to anyone. A separate token lets a scraper in without the
        root credential. Both comparisons are constant-time; empty values never match.
        """
        if admin_key is not None and self.is_admin_key(admin_key):
            return
        if self._metrics_token is not None:
            presented = presented_secret(domain.bearer_token(authorization))
            if presented is not None and hmac.compare_digest(presented.encode(), self._metrics_token):
                return
        raise Unauthenticated("X-Admin-Key or a metrics bearer token is required", code="UNAUTHENTICATED")

    def _api_key_tx(self, conn: Connection, key_hash: str, now: dt.datetime, source: str | None
                    ) -> Principal | None:
        if self.lockouts is not None:
            self.lockouts.check_in(conn, source, Credential.API_KEY)
        k = t.api_keys.c
        r = conn.execute(
            sa.select(k.tenant_id, k.id).where(
                k.key_hash == key_hash, k.revoked_at.is_(None), sa.or_(k.expires_at.is_(None), k.expires_at > now)
            )
        ).first()
        return None if r is None else Principal(PrincipalKind.API_KEY, tenant_id=r[0], key_id=r[1])

    async def create_api_key(self, p: Principal, tenant_id: str, body: ApiKeyCreate, info: RequestInfo
                             ) -> v.ApiKeyCreated:
        require(p, Permission.MANAGE)

        def tx(conn: Connection) -> v.ApiKeyCreated:
            tenant_scope(conn, p, tenant_id)
            now = self.clock.now()
            quotas.check_api_keys(conn, tenant_id, now)  # issue 12: max_api_keys
            kid, key = new_id(), "nk_" + rand_token()
            exp = now + dt.timedelta(seconds=body.expires_in_seconds) if body.expires_in_seconds else None
            conn.execute(t.api_keys.insert().values(id=kid, tenant_id=tenant_id, name=body.name,
                                                    key_hash=sha256_hex(key), created_at=now, expires_at=exp))
            audit(conn, info, AuditEntry(p.actor, "api_key.create", tenant_id, "api_key", kid, {"name": body.name}),
                  now)
            return v.ApiKeyCreated(id=kid, tenant_id=tenant_id, name=body.name, api_key=key, created_at=stamp(now),
                                   expires_at=iso(exp))

        return await self.db.run(tx)

    async def list_api_keys(self, p: Principal, tenant_id: str) -> v.ApiKeyList:
        def tx(conn: Connection) -> v.ApiKeyList:
            tenant_scope(conn, p, tenant_id)
            k = t.api_keys.c
            rows = conn.execute(sa.select(t.api_keys).where(k.tenant_id == tenant_id, k.revoked_at.is_(None))
                                .order_by(k.created_at.desc(), k.id))
            return v.ApiKeyList(api_keys=[v.ApiKeyView(id=r.id, tenant_id=r.tenant_id, name=r.name,
                                                       created_at=stamp(r.created_at), expires_at=iso(r.expires_at))
                                          for r in rows])

        return await self.db.run(tx)

    async def revoke_api_key(self, p: Principal, tenant_id: str, key_id: str, info: RequestInfo) -> None:
        require(p, Permission.MANAGE)

        def tx(conn: Connection) -> None:
            tenant_scope(conn, p, tenant_id)
            now = self.clock.now()
            k = t.api_keys.c
            res = conn.execute(t.api_keys.update().where(k.id == key_id, k.tenant_id == tenant_id,
                                                         k.revoked_at.is_(None)).values(revoked_at=now))
            if res.rowcount != 1:
                raise NotFound("api key not found", code="API_KEY_NOT_FOUND")
            audit(conn, info, AuditEntry(p.actor, "api_key.revoke", tenant_id, "api_key", key_id), now)

        await self.db.run(tx)
