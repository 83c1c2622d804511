"""Alembic migrations produce exactly the schema the code uses, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from nkudo.cp.db import Database, sqlite_url
from nkudo.cp.schema import metadata

from .pg import Cluster

#: The newest revision: the last file of the chain in migrations/versions.
HEAD = max(p.name.split("_")[0] for p in (Path(__file__).resolve().parents[2] / "src/nkudo/cp/migrations/versions").glob("0*.py"))


def _diff(db: Database) -> list[object]:
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_migrated_schema_matches_metadata(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = sqlite_url(tmp_path) if kind == "sqlite" else request.getfixturevalue("pg_cluster").create_database()
    db = Database(url, pool_size=1)
    try:
        assert db.current_revision() is None
        assert db.migrate() == HEAD
        assert db.migrate() == HEAD  # idempotent
        assert _diff(db) == []
    finally:
        db.close()


def test_concurrent_migrations_on_postgres(pg_cluster: Cluster) -> None:
    """Several replicas starting at once: the advisory lock lets exactly one migrate, the others see head."""
    import threading

    url = pg_cluster.create_database()
    revs: list[str] = []
    errors: list[BaseException] = []

    def go() -> None:
        db = Database(url, pool_size=1)
        try:
            revs.append(db.migrate())
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=go) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and revs == [HEAD] * 3
