"""The audit hash chain and its signed checkpoints (issue 12).

Revision ID: 0003
Revises: 0002

Events written before this revision are chained here, in id order, per chain (their tenant, or ``global``),
so the whole log verifies; they are as trustworthy as the database was until then, and the first checkpoint
the server signs covers them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from nkudo.cp import auditchain
from nkudo.cp.schema import JSONType, UtcDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as b:
        b.add_column(sa.Column("chain", sa.String(36), nullable=True))
        b.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        b.add_column(sa.Column("entry_hash", sa.String(64), nullable=True))
    op.create_table(
        "audit_chain_heads",
        sa.Column("chain", sa.String(36), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.Column("updated_at", UtcDateTime(), nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("chain", sa.String(36), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("entry_hash", sa.String(64), nullable=False),
        sa.Column("signed_at", UtcDateTime(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.UniqueConstraint("chain", "seq", name="uq_audit_checkpoints_chain_seq"),
    )
    _chain_existing_events()
    with op.batch_alter_table("audit_events") as b:
        for name, type_ in (("chain", sa.String(36)), ("seq", sa.BigInteger()), ("prev_hash", sa.String(64)),
                            ("entry_hash", sa.String(64))):
            b.alter_column(name, existing_type=type_, nullable=False)
        b.create_unique_constraint("uq_audit_events_chain_seq", ["chain", "seq"])


def _chain_existing_events() -> None:
    conn = op.get_bind()
    ev = sa.table("audit_events", sa.column("id", BigId), sa.column("tenant_id"), sa.column("actor_type"),
                  sa.column("actor_id"), sa.column("action"), sa.column("object_type"), sa.column("object_id"),
                  sa.column("request_id"), sa.column("source_ip"), sa.column("details", JSONType),
                  sa.column("occurred_at", UtcDateTime()), sa.column("chain"), sa.column("seq"),
                  sa.column("prev_hash"), sa.column("entry_hash"))
    heads = sa.table("audit_chain_heads", sa.column("chain"), sa.column("seq"), sa.column("entry_hash"),
                     sa.column("updated_at", UtcDateTime()))
    state: dict[str, tuple[int, str, object]] = {}
    for r in conn.execute(sa.select(ev).order_by(ev.c.id)).all():
        chain = r.tenant_id or auditchain.GLOBAL_CHAIN
        seq, prev, _ = state.get(chain, (0, auditchain.GENESIS, None))
        details = auditchain.normalise(r.details)
        h = auditchain.link(chain, seq + 1, r.occurred_at, r.tenant_id, r.actor_type, r.actor_id, r.action,
                            r.object_type, r.object_id, r.request_id, r.source_ip, details, prev)
        conn.execute(ev.update().where(ev.c.id == r.id).values(chain=chain, seq=seq + 1, prev_hash=prev,
                                                               entry_hash=h, details=details))
        state[chain] = (seq + 1, h, r.occurred_at)
    for chain, (seq, h, at) in state.items():
        conn.execute(heads.insert().values(chain=chain, seq=seq, entry_hash=h, updated_at=at))


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_chain_heads")
    with op.batch_alter_table("audit_events") as b:
        b.drop_constraint("uq_audit_events_chain_seq", type_="unique")
        for name in ("entry_hash", "prev_hash", "seq", "chain"):
            b.drop_column(name)
