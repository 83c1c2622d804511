"""The audit log as a tenant reads it (events are written by ``common.audit`` in each change's transaction)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.ports import Transactions
from nkudo.cp.records import Principal, stamp
from nkudo.cp.usecases.common import tenant_scope


class AuditLog:
    def __init__(self, db: Transactions) -> None:
        self.db = db

    async def list_audit(self, p: Principal, tenant_id: str, limit: int) -> v.AuditEvents:
        def tx(conn: Connection) -> v.AuditEvents:
            tenant_scope(conn, p, tenant_id)
            e = t.audit_events.c
            rows = conn.execute(sa.select(t.audit_events).where(e.tenant_id == tenant_id)
                                .order_by(e.id.desc()).limit(limit))
            return v.AuditEvents(events=[v.AuditEventView(
                id=r.id, tenant_id=r.tenant_id, actor_type=r.actor_type, actor_id=r.actor_id, action=r.action,
                object_type=r.object_type, object_id=r.object_id, request_id=r.request_id, source_ip=r.source_ip,
                details=r.details, occurred_at=stamp(r.occurred_at),
            ) for r in rows])

        return await self.db.run(tx)
