"""Alembic environment: always driven programmatically with an open connection.

Why no alembic.ini: the control plane's own ``migrate``/``serve`` commands run
the migrations with the connection they already configured (SQLite pragmas,
PostgreSQL advisory lock), so there is no second place to configure a URL.
"""

from __future__ import annotations

from alembic import context

from nkudo.cp.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
