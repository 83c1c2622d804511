"""The small ports the control plane's use cases depend on, and nothing else.

Why ports: a use case (``nkudo.cp.usecases``) states what it needs, a transaction runner, a certificate
authority, metrics and a clock, as the narrowest protocol that serves it; ``Database``,
``CertificateAuthority`` and ``Metrics`` satisfy them structurally. A use case therefore never imports the
HTTP layer, and a test can hand it a fixed clock. Metrics are the concrete ``nkudo.cp.metrics.Metrics``
(a registry of counters has no behaviour worth abstracting).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from cryptography import x509
from sqlalchemy.engine import Row

from nkudo.cp.feed import Change
from nkudo.cp.metrics import Metrics
from nkudo.cp.pki import IssuedCert, RevokedEntry, SignedCrl

T = TypeVar("T")

__all__ = ["NO_FEED", "Authority", "Clock", "Metrics", "Publisher", "RevokedEntry", "SystemClock",
           "Transactions"]


class Clock(Protocol):
    """The time every decision of one use-case call is made at (UTC, timezone-aware)."""

    def now(self) -> dt.datetime: ...


class SystemClock:
    """The wall clock."""

    __slots__ = ()

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class Transactions(Protocol):
    """The transaction runner (``nkudo.cp.db.Database``): one call of ``run`` is one transaction."""

    is_pg: bool

    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def select(self, stmt: sa.Executable, params: dict[str, Any]) -> list[Row[Any]]: ...

    def insert(self, table: sa.Table) -> Any: ...


class Authority(Protocol):
    """The certificate authority (``nkudo.cp.pki.CertificateAuthority``) as the use cases see it."""

    @property
    def cert_pem(self) -> str: ...

    @property
    def cert(self) -> x509.Certificate: ...

    def sign_agent(self, csr: x509.CertificateSigningRequest, *, agent_id: str, tenant_id: str, site_id: str,
                   ttl: dt.timedelta, crl_url: str | None = ...) -> IssuedCert: ...

    def sign_crl(self, revoked: Sequence[RevokedEntry], *, number: int, validity: dt.timedelta = ...) -> SignedCrl: ...


class Publisher(Protocol):
    """Where a use case announces a committed change (``nkudo.cp.feed.ChangeFeed``): synchronous, never
    blocks, called only after ``Transactions.run`` returned, so a live view never shows an uncommitted row."""

    def publish(self, change: Change) -> None: ...


class _NoFeed:
    """The publisher of a use case built without a feed (tests driving one use case directly)."""

    __slots__ = ()

    def publish(self, change: Change) -> None:
        pass


NO_FEED: Publisher = _NoFeed()
