"""The certificate revocation list and the readiness checks that depend on it (database, CA, CRL)."""

from __future__ import annotations

import datetime as dt
import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import domain
from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.config import Settings
from nkudo.cp.ports import Authority, Clock, RevokedEntry, Transactions
from nkudo.cp.records import CrlState, iso


class Crl:
    def __init__(self, settings: Settings, db: Transactions, ca: Authority, clock: Clock) -> None:
        self.s = settings
        self.db = db
        self.ca = ca
        self.clock = clock
        self._cached: CrlState | None = None

    def _revoked_tx(self, conn: Connection) -> list[RevokedEntry]:
        """Revocations in force now: a renewed certificate's (``superseded``) only once its grace has ended."""
        c = t.certificates.c
        now = self.clock.now()
        return sorted((RevokedEntry(r.serial, r.revoked_at, r.revocation_reason) for r in conn.execute(
            sa.select(c.serial, c.revoked_at, c.revocation_reason).where(
                c.revoked_at.is_not(None), c.revoked_at <= now, c.expires_at > now))),
            key=lambda e: e.serial)

    async def state(self) -> CrlState:
        """The current signed CRL, re-signed when the revoked set changed or half its validity has passed.

        Why cached: signing on every fetch is wasted CPU; why re-read the set
        each time: a revocation (or a renew grace ending) on another replica
        must show up on the next fetch. Re-signing at half-life means a
        relying party never holds a CRL past its nextUpdate (the original
        signed once and let it go stale).
        """
        revoked = await self.db.run(self._revoked_tx)
        now = self.clock.now()
        cached = self._cached
        if cached is not None and domain.crl_is_current(cached.revoked, revoked, now, cached.refresh_at):
            return cached
        number = domain.next_crl_number(now, cached.number if cached else None)
        validity = dt.timedelta(seconds=self.s.crl_validity)
        signed = self.ca.sign_crl(revoked, number=number, validity=validity)
        self._cached = CrlState(revoked=revoked, der=signed.der, pem=signed.pem, number=number,
                                this_update=signed.this_update, next_update=signed.next_update,
                                refresh_at=signed.this_update + validity / 2)
        return self._cached

    async def pem(self) -> bytes:
        return (await self.state()).pem

    async def der(self) -> bytes:
        """The same CRL in DER (``application/pkix-crl``, RFC 5280 section 4.2.1.13's form for HTTP)."""
        return (await self.state()).der

    async def readiness(self) -> v.ReadinessChecks:
        """Dependency checks for ``/readyz``: database round trip, CA usable, CRL current.

        The error texts here are for the admin only; the HTTP layer shows
        unauthenticated probes nothing but ready / not ready.
        """
        t0 = time.perf_counter()
        try:
            await self.db.run(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
            database = v.ReadinessCheck("healthy", latency_ms=round((time.perf_counter() - t0) * 1000, 2))
        except Exception as exc:
            database = v.ReadinessCheck("unhealthy", error=f"{type(exc).__name__}: {exc}"[:300])
        now = self.clock.now()
        ca_expiry = self.ca.cert.not_valid_after_utc
        ca = (v.ReadinessCheck("healthy", expires_at=iso(ca_expiry)) if ca_expiry > now
              else v.ReadinessCheck("unhealthy", error=f"CA certificate expired at {iso(ca_expiry)}"))
        if database.status != "healthy":
            crl = v.ReadinessCheck("unhealthy", error="database unavailable")
        else:
            try:
                st = await self.state()
                crl = v.ReadinessCheck("healthy" if st.next_update > now else "unhealthy",
                                       this_update=iso(st.this_update), next_update=iso(st.next_update),
                                       revoked=len(st.revoked))
            except Exception as exc:
                crl = v.ReadinessCheck("unhealthy", error=f"{type(exc).__name__}: {exc}"[:300])
        return v.ReadinessChecks(database=database, ca=ca, crl=crl)
