"""Fixtures: one control-plane process per database backend (SQLite file, throwaway PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nkudo.cp.db import Database, sqlite_url
from tests.conftest import skip_or_fail

from .helpers import Server, Tenant, new_tenant, start_server
from .pg import Cluster, free_port, start_cluster

# Short timings so lease expiry, renewal grace and the offline sweeper are observable in seconds.
FAST = ["--lease-ttl", "2", "--offline-after", "2", "--sweep-interval", "0.5", "--renew-grace", "1",
        "--heartbeat-interval", "5", "--crl-validity", "4",
        # The suite enrolls hundreds of agents, creates hundreds of tenants with the one admin key, and guesses
        # tokens and keys from 127.0.0.1 on one server: the enrollment and management limits and the lock-out
        # are set out of its way here, and tested with explicit small values in test_ratelimit.py (issue 12).
        "--rate-limit-enroll", "6000/min:1000", "--rate-limit-management", "6000/min:1000",
        "--lockout-threshold", "1000"]
#: Bearer token for /metrics, passed through the environment (the way a deployment would pass a secret).
METRICS_TOKEN = "metrics-" + "0123456789abcdef"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A private PostgreSQL cluster; in CI (CI=true) failing to start it fails the run instead of skipping."""
    try:
        cluster = start_cluster()
    except Exception as exc:
        skip_or_fail(f"PostgreSQL not available: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_url(pg_cluster: Cluster) -> str:
    return pg_cluster.create_database()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def server(backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Server]:
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None
    health_port = free_port()
    srv = start_server(tmp_path_factory.mktemp(f"cp-{backend}"), database_url=url,
                       extra=[*FAST, "--health-listen", f"127.0.0.1:{health_port}"],
                       env={"NKUDO_CP_METRICS_TOKEN": METRICS_TOKEN})
    srv.health_port = health_port
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def tenant(server: Server) -> Tenant:
    return new_tenant(server)


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database of its own on each backend, for tests that drive use cases in-process."""
    url = sqlite_url(tmp_path) if request.param == "sqlite" else request.getfixturevalue("pg_cluster").create_database()
    d = Database(url, pool_size=2)
    d.migrate()
    try:
        yield d
    finally:
        d.close()
