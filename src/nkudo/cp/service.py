"""The control plane: one object wiring the use cases (``nkudo.cp.usecases``) to their ports.

Each use-case module owns one aggregate and depends only on the ports of ``nkudo.cp.ports``; this facade
builds them over one database, one CA, one set of metrics and the wall clock, and keeps the names the HTTP
layer, the server loop and the tests call. Every use-case call is one database transaction (through
``Database.run``); things that must happen once across several replicas rely on the database: conditional
updates (token consumption, result transitions), row locks with ``SKIP LOCKED`` (plan leasing on
PostgreSQL; SQLite serialises writers with ``BEGIN IMMEDIATE``), and unique constraints (serials, token
hashes, idempotency keys, log sequences).
"""

from __future__ import annotations

import datetime as dt

from nkudo.cp.config import Settings
from nkudo.cp.db import Database
from nkudo.cp.feed import ChangeFeed
from nkudo.cp.metrics import Metrics
from nkudo.cp.pki import CertificateAuthority
from nkudo.cp.ports import Clock, SystemClock
from nkudo.cp.records import AgentIdentity, Principal, RequestInfo, iso
from nkudo.cp.usecases.access import Access
from nkudo.cp.usecases.accounts import Accounts
from nkudo.cp.usecases.agentauth import AgentCredentials
from nkudo.cp.usecases.audit import AuditLog
from nkudo.cp.usecases.connectivity import ConnectivitySweep
from nkudo.cp.usecases.console import Consoles
from nkudo.cp.usecases.crl import Crl
from nkudo.cp.usecases.enrollment import Enrollment
from nkudo.cp.usecases.executions import Executions
from nkudo.cp.usecases.heartbeat import Heartbeats
from nkudo.cp.usecases.inventory import Inventory
from nkudo.cp.usecases.lockout import Lockouts
from nkudo.cp.usecases.overview import Overview
from nkudo.cp.usecases.plans import Plans
from nkudo.cp.usecases.quotas import Quotas
from nkudo.cp.usecases.tenancy import Tenancy

__all__ = ["AgentIdentity", "ControlPlane", "Principal", "RequestInfo", "iso", "now_utc"]


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ControlPlane:
    """The control plane's use cases over one database, one CA and one set of metrics.

    The HTTP layer calls the use cases directly (``cp.tenancy.create_tenant``...); the methods kept here
    are the process-level ones the server loop and the tests use.
    """

    def __init__(self, settings: Settings, db: Database, ca: CertificateAuthority, admin_key: str,
                 metrics: Metrics | None = None, clock: Clock | None = None) -> None:
        self.s = settings
        self.db = db
        self.ca = ca
        self.metrics = metrics or Metrics()
        self.clock: Clock = clock or SystemClock()
        c = self.clock
        self.feed = f = ChangeFeed()  # issue 13: committed changes fanned out to the live views
        self.lockouts = Lockouts(settings.lockout, db, self.metrics, c)  # issue 12: failed-authentication lock-out
        self.access = Access(db, c, admin_key, settings.metrics_token, self.lockouts)
        self.accounts = Accounts(settings, db, c, self.lockouts)  # issue 13: dashboard users and sessions
        self.tenancy = Tenancy(db, c, feed=f)
        self.enrollment = Enrollment(settings, db, ca, self.metrics, c, self.lockouts, feed=f)
        self.credentials = AgentCredentials(settings, db, ca, c, feed=f)
        self.consoles = Consoles(settings, db, c)
        self.heartbeats = Heartbeats(settings, db, self.metrics, c, self.consoles, feed=f)
        self.plans = Plans(settings, db, c, feed=f)
        self.executions = Executions(db, self.metrics, c, feed=f)
        self.inventory = Inventory(db)
        self.overview = Overview(db, c, dt.timedelta(seconds=settings.agent_cert_ttl))  # issue 13: the dashboard's read models
        self.audit = AuditLog(db, c, self.metrics)
        self.crl = Crl(settings, db, ca, c)
        self.quotas = Quotas(db, c)  # issue 12 part 3
        self.connectivity = ConnectivitySweep(settings, db, self.metrics, c, feed=f)

    @property
    def _admin_key(self) -> bytes:
        return self.access.admin_key

    @_admin_key.setter
    def _admin_key(self, value: bytes) -> None:
        self.access.admin_key = value

    @property
    def flush_interval(self) -> float:
        return self.heartbeats.flush_interval

    def is_admin_key(self, admin_key: str) -> bool:
        return self.access.is_admin_key(admin_key)

    async def flush_seen(self) -> int:
        """Persist buffered "last seen" times (called periodically, before sweeping and at shutdown)."""
        return await self.heartbeats.flush_seen()

    async def sweep_offline(self) -> int:
        """Flush buffered heartbeats, then mark agents silent for longer than ``offline_after`` OFFLINE."""
        await self.heartbeats.flush_seen()
        return await self.connectivity.sweep_offline()
