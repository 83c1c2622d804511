"""Assemble and run one control-plane process: settings -> database -> CA -> TLS -> HTTP + sweeper."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from pathlib import Path

from aiohttp import web

from nkudo.cp.auditchain import Signer
from nkudo.cp.config import Settings, prepare_data_dir, resolve_admin_key
from nkudo.cp.db import Database, redact_url, sqlite_url
from nkudo.cp.feed_pg import PgBridge
from nkudo.cp.http import build_app, build_health_app
from nkudo.cp.pki import CA_CERT, CA_KEY, CertificateAuthority
from nkudo.cp.service import ControlPlane
from nkudo.errors import ValidationError
from nkudo.log import adopt, flush_repeats, get_logger

log = get_logger("cp.server")


def server_ssl_context(cert: Path, key: Path, ca_pem: str) -> ssl.SSLContext:
    """TLS >= 1.2; a client certificate is optional at the handshake but, when sent, must chain to our CA.

    Agent routes then *require* one (checked per request): enrollment must work
    without a certificate on the same port.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cadata=ca_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def build(settings: Settings) -> ControlPlane:
    """Everything a serving process needs; any misconfiguration (a weak admin key first) fails here, before
    a database is created or a port opened."""
    settings.check()
    prepare_data_dir(settings.data_dir)
    admin_key = resolve_admin_key(settings)
    db = Database(settings.database_url or sqlite_url(settings.data_dir), pool_size=settings.db_pool_size)
    db.migrate()
    ca = CertificateAuthority.load_or_create(
        settings.data_dir, cert_file=settings.ca_cert_file, key_file=settings.ca_key_file,
        require_persistent=settings.require_persistent_pki,
    )
    if settings.ca_cert_file is not None and not (settings.data_dir / CA_KEY).exists():
        # Publish the (public) CA certificate where clients and the admin CLI look for it.
        (settings.data_dir / CA_CERT).write_text(ca.cert_pem)
    cp = ControlPlane(settings, db, ca, admin_key)
    cp.audit.use_keys(audit_signer(settings, ca))
    return cp


def audit_signer(settings: Settings, ca: CertificateAuthority) -> Signer:
    """The key that signs audit checkpoints: ``--audit-key-file``, else the CA key (neither is in the database)."""
    if settings.audit_key_file is None:
        return Signer(ca.key)
    try:
        return Signer.from_pem(settings.audit_key_file.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ValidationError(f"cannot load the audit key {settings.audit_key_file}: {exc}",
                              field="audit_key_file") from None


async def _flusher(cp: ControlPlane) -> None:
    while True:
        await asyncio.sleep(cp.flush_interval)
        flush_repeats()
        try:
            await cp.flush_seen()
        except Exception:
            log.exception("heartbeat flush failed")


async def _sweeper(cp: ControlPlane) -> None:
    while True:
        await asyncio.sleep(cp.s.sweep_interval)
        try:
            await cp.sweep_offline()
        except Exception:
            log.exception("offline sweep failed")


async def _audit_checkpointer(cp: ControlPlane) -> None:
    """Sign every chain head that moved: at start (events from before, a migration's) and every interval."""
    while True:
        await _audit_checkpoint(cp)
        await asyncio.sleep(cp.s.audit_checkpoint_interval)


async def _audit_checkpoint(cp: ControlPlane) -> None:
    try:
        await cp.audit.checkpoint()
    except Exception:
        log.exception("audit checkpoint failed")


async def _audit_verifier(cp: ControlPlane) -> None:
    """Verify every chain at start and then every ``audit_verify_interval`` seconds; log and export the result."""
    while True:
        try:
            r = await cp.audit.verify_chains()
            if r.first_broken is None:
                log.info("audit chains verified", events=r.total, chains=len(r.chains))
            else:
                b = r.first_broken
                log.error("audit chain BROKEN", chain=b.chain, seq=b.seq, event_id=b.event_id, reason=b.reason.value,
                          detail=b.detail)
        except Exception:
            log.exception("audit verification failed")
        await asyncio.sleep(cp.s.audit_verify_interval)


async def _lockout_pruner(cp: ControlPlane) -> None:
    """Issue 12: drop lock-out rows whose failures, lock and level are all over (the table stays small); issue 13:
    likewise dashboard sessions that ended (revoked or past a timeout), which no lookup can match any more."""
    while True:
        await asyncio.sleep(300.0)
        try:
            await cp.lockouts.prune()
        except Exception:
            log.exception("lock-out prune failed")
        try:
            await cp.accounts.prune_sessions()
        except Exception:
            log.exception("session prune failed")


async def serve(settings: Settings, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None
                ) -> None:
    cp = build(settings)
    # aiohttp logs malformed requests with their exception text (request data): same caps and summaries as ours.
    adopt("aiohttp", "asyncio")
    cert, key = cp.ca.write_server_files(settings.data_dir, settings.server_names)
    ctx = server_ssl_context(cert, key, cp.ca.cert_pem)
    runner = web.AppRunner(build_app(cp), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen_host, settings.listen_port, ssl_context=ctx, backlog=1024,
                       reuse_address=True)
    await site.start()
    health_runner: web.AppRunner | None = None
    if settings.health_listen is not None:
        health_runner = web.AppRunner(build_health_app(cp), access_log=None, handle_signals=False)
        await health_runner.setup()
        hhost, hport = settings.health_listen
        await web.TCPSite(health_runner, hhost, hport, reuse_address=True).start()
        log.info("plain-HTTP probe listener (healthz, readyz only)", listen=f"{hhost}:{hport}")
    sweeper = asyncio.create_task(_sweeper(cp)) if settings.sweep_interval > 0 else None
    flusher = asyncio.create_task(_flusher(cp))
    pruner = asyncio.create_task(_lockout_pruner(cp))
    bridge = PgBridge(cp.feed, cp.db.url) if cp.db.is_pg else None  # issue 13: changes reach every replica
    if bridge is not None:
        await bridge.start()
    audit_tasks = [asyncio.create_task(fn(cp)) for fn, every in (
        (_audit_checkpointer, settings.audit_checkpoint_interval), (_audit_verifier, settings.audit_verify_interval))
        if every > 0]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
            loop.add_signal_handler(sig, stop.set)
    log.info("control plane listening", listen=f"{settings.listen_host}:{settings.listen_port}",
             database=redact_url(cp.db.url), data_dir=str(settings.data_dir))
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if sweeper is not None:
            sweeper.cancel()
        flusher.cancel()
        pruner.cancel()
        for task in audit_tasks:
            task.cancel()
        if health_runner is not None:
            await health_runner.cleanup()
        cp.feed.close()  # open live views (SSE streams) end now instead of holding the shutdown
        if bridge is not None:
            await bridge.stop()
        await runner.cleanup()
        await cp.flush_seen()
        if settings.audit_checkpoint_interval > 0:  # seal what this run appended: nothing is left unsigned
            await _audit_checkpoint(cp)
        cp.db.close()
