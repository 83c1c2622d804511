"""Tenants and their sites: create and list (admin creates tenants; a tenant key sees only its own)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.domain import Connectivity, Permission
from nkudo.cp.errors import Conflict
from nkudo.cp.feed import Change, ChangeKind
from nkudo.cp.models import SiteCreate, TenantCreate
from nkudo.cp.ports import NO_FEED, Clock, Publisher, Transactions
from nkudo.cp.records import AuditEntry, Principal, RequestInfo, stamp
from nkudo.cp.usecases import quotas
from nkudo.cp.usecases.common import audit, new_id, require, require_admin, tenant_scope


def tenant_view(r: Row[Any]) -> v.TenantView:
    return v.TenantView(id=r.id, slug=r.slug, name=r.name, created_at=stamp(r.created_at))


def site_view(r: Row[Any]) -> v.SiteView:
    return v.SiteView(id=r.id, tenant_id=r.tenant_id, name=r.name, connectivity_state=r.connectivity_state,
                      created_at=stamp(r.created_at), external_key=r.external_key)


class Tenancy:
    def __init__(self, db: Transactions, clock: Clock, feed: Publisher = NO_FEED) -> None:
        self.db = db
        self.clock = clock
        self.feed = feed

    async def create_tenant(self, p: Principal, body: TenantCreate, info: RequestInfo) -> v.TenantView:
        require_admin(p)
        return await self.db.run(self._create_tenant_tx, p, body, info)

    def _create_tenant_tx(self, conn: Connection, p: Principal, body: TenantCreate, info: RequestInfo
                          ) -> v.TenantView:
        now = self.clock.now()
        tid = new_id()
        if conn.execute(sa.select(t.tenants.c.id).where(t.tenants.c.slug == body.slug)).first():
            raise Conflict(f"tenant slug {body.slug!r} already exists", code="TENANT_EXISTS", field="slug")
        conn.execute(t.tenants.insert().values(id=tid, slug=body.slug, name=body.name, created_at=now))
        audit(conn, info, AuditEntry(p.actor, "tenant.create", tid, "tenant", tid, {"slug": body.slug}), now)
        return tenant_view(conn.execute(sa.select(t.tenants).where(t.tenants.c.id == tid)).one())

    async def list_tenants(self, p: Principal) -> v.TenantList:
        def tx(conn: Connection) -> v.TenantList:
            q = sa.select(t.tenants).order_by(t.tenants.c.created_at.desc(), t.tenants.c.id)
            if p.tenant_id is not None:
                q = q.where(t.tenants.c.id == p.tenant_id)
            return v.TenantList(tenants=[tenant_view(r) for r in conn.execute(q)])

        return await self.db.run(tx)

    async def create_site(self, p: Principal, tenant_id: str, body: SiteCreate, info: RequestInfo
                          ) -> v.SiteView:
        require(p, Permission.MANAGE)

        def tx(conn: Connection) -> v.SiteView:
            tenant_scope(conn, p, tenant_id)
            quotas.check_sites(conn, tenant_id)  # issue 12: max_sites
            now = self.clock.now()
            s = t.sites.c
            if conn.execute(sa.select(s.id).where(s.tenant_id == tenant_id, s.name == body.name)).first():
                raise Conflict(f"site {body.name!r} already exists", code="SITE_EXISTS", field="name")
            sid = new_id()
            conn.execute(t.sites.insert().values(id=sid, tenant_id=tenant_id, name=body.name,
                                                 external_key=body.external_key,
                                                 connectivity_state=Connectivity.OFFLINE.value, created_at=now))
            audit(conn, info, AuditEntry(p.actor, "site.create", tenant_id, "site", sid, {"name": body.name}), now)
            return site_view(conn.execute(sa.select(t.sites).where(s.id == sid)).one())

        site = await self.db.run(tx)
        self.feed.publish(Change(ChangeKind.SITE, tenant_id, site.id, site.id))  # committed: open overviews list it
        return site

    async def list_sites(self, p: Principal, tenant_id: str) -> v.SiteList:
        def tx(conn: Connection) -> v.SiteList:
            tenant_scope(conn, p, tenant_id)
            s = t.sites.c
            rows = conn.execute(sa.select(t.sites).where(s.tenant_id == tenant_id).order_by(s.created_at.desc(), s.id))
            return v.SiteList(sites=[site_view(r) for r in rows])

        return await self.db.run(tx)
