"""``nkudo-control-plane``: run the server, migrate, and administer it over HTTPS.

Every flag also reads an ``NKUDO_CP_*`` environment variable (shown in
``--help``); secrets (admin key, API key) are best passed that way or via
files so they stay out of process listings and shell history.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from nkudo import log as nlog
from nkudo.cp import cli_lists
from nkudo.cp.cli_users import user as user_group
from nkudo.errors import NkudoError

F = Callable[..., Any]


def _env(name: str) -> str:
    return "NKUDO_CP_" + name


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--log-level", default="info", envvar=_env("LOG_LEVEL"), show_envvar=True,
              type=click.Choice(["debug", "info", "warn", "error"]))
@click.option("--log-format", default="text", envvar=_env("LOG_FORMAT"), show_envvar=True,
              type=click.Choice(["text", "json"]))
def cli(log_level: str, log_format: str) -> None:
    """nkudo control plane."""
    nlog.configure(log_level, log_format)


def _db_options(f: F) -> F:
    f = click.option("--database-url", envvar=_env("DATABASE_URL"), show_envvar=True, default=None,
                     help="postgresql://... (default: SQLite file in --data-dir)")(f)
    f = click.option("--data-dir", envvar=_env("DATA_DIR"), show_envvar=True, default="/var/lib/nkudo-cp",
                     type=click.Path(file_okay=False, path_type=Path), show_default=True)(f)
    return f


def _rate_limit_options(f: F) -> F:
    """Rate limits per route class, trusted proxies and lock-out (issue 12); see README "Rate limits"."""
    from nkudo.cp.ratelimit import DEFAULT_LIMITS, RouteClass

    for cls in reversed(RouteClass):
        f = click.option(f"--rate-limit-{cls.value}", envvar=_env(f"RATE_LIMIT_{cls.value.upper()}"),
                         show_envvar=True, default=DEFAULT_LIMITS[cls].spec(), show_default=True,
                         help=f"{cls.value} route class: N[/s|/min|/h][:BURST] per client, 0 disables")(f)
    f = click.option("--lockout-max", type=float, default=86400.0, envvar=_env("LOCKOUT_MAX"), show_envvar=True,
                     show_default=True, help="seconds: the longest lock-out")(f)
    f = click.option("--lockout-base", type=float, default=900.0, envvar=_env("LOCKOUT_BASE"), show_envvar=True,
                     show_default=True, help="seconds: the first lock-out (doubling with each further one)")(f)
    f = click.option("--lockout-window", type=float, default=900.0, envvar=_env("LOCKOUT_WINDOW"),
                     show_envvar=True, show_default=True, help="seconds in which the failures are counted")(f)
    f = click.option("--lockout-threshold", type=int, default=5, envvar=_env("LOCKOUT_THRESHOLD"),
                     show_envvar=True, show_default=True,
                     help="failed authentications (admin key, API key, enrollment token, password) from one "
                          "source that lock it out of that credential type; 0 disables")(f)
    f = click.option("--trusted-proxy", "trusted_proxy", multiple=True, envvar=_env("TRUSTED_PROXY"),
                     show_envvar=True, help="CIDR of a proxy whose X-Forwarded-For / X-Real-IP is believed "
                                            "(repeatable; otherwise those headers are ignored)")(f)
    return f


@cli.command()
@_db_options
@click.option("--listen", default="0.0.0.0:8443", envvar=_env("LISTEN"), show_envvar=True, show_default=True)
@click.option("--admin-key", envvar=_env("ADMIN_KEY"), show_envvar=True, default=None,
              help="admin key, at least 32 printable ASCII characters (default: generated once into "
                   "DATA_DIR/admin.key)")
@click.option("--server-name", "server_names", multiple=True, envvar=_env("SERVER_NAMES"), show_envvar=True,
              help="DNS name or IP for the server certificate (repeatable; default localhost, 127.0.0.1)")
@click.option("--ca-cert-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar=_env("CA_CERT_FILE"), show_envvar=True)
@click.option("--ca-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar=_env("CA_KEY_FILE"), show_envvar=True)
@click.option("--require-persistent-pki", is_flag=True, envvar=_env("REQUIRE_PERSISTENT_PKI"), show_envvar=True)
@click.option("--agent-cert-ttl", type=float, default=86400.0, envvar=_env("AGENT_CERT_TTL"), show_envvar=True,
              show_default=True, help="seconds")
@click.option("--enrollment-token-ttl", type=float, default=900.0, envvar=_env("ENROLLMENT_TOKEN_TTL"),
              show_envvar=True, show_default=True, help="seconds")
@click.option("--lease-ttl", type=float, default=45.0, envvar=_env("LEASE_TTL"), show_envvar=True,
              show_default=True, help="seconds")
@click.option("--heartbeat-interval", type=int, default=15, envvar=_env("HEARTBEAT_INTERVAL"), show_envvar=True,
              show_default=True, help="seconds")
@click.option("--offline-after", type=float, default=60.0, envvar=_env("OFFLINE_AFTER"), show_envvar=True,
              show_default=True, help="seconds of silence before an agent is offline")
@click.option("--sweep-interval", type=float, default=15.0, envvar=_env("SWEEP_INTERVAL"), show_envvar=True,
              show_default=True, help="seconds (0 disables the offline sweeper)")
@click.option("--max-plans-per-lease", type=int, default=2, envvar=_env("MAX_PLANS_PER_LEASE"), show_envvar=True,
              show_default=True)
@click.option("--renew-grace", type=float, default=300.0, envvar=_env("RENEW_GRACE"), show_envvar=True,
              show_default=True, help="seconds the previous certificate keeps working after a renew")
@click.option("--max-body-bytes", type=int, default=1024 * 1024, envvar=_env("MAX_BODY_BYTES"), show_envvar=True,
              show_default=True)
@click.option("--db-pool-size", type=int, default=8, envvar=_env("DB_POOL_SIZE"), show_envvar=True,
              show_default=True)
@click.option("--crl-validity", type=float, default=86400.0, envvar=_env("CRL_VALIDITY"), show_envvar=True,
              show_default=True, help="seconds between CRL thisUpdate and nextUpdate (re-signed at half)")
@click.option("--metrics-token", envvar=_env("METRICS_TOKEN"), show_envvar=True, default=None,
              help="bearer token for GET /metrics (the admin key is always accepted too)")
@click.option("--health-listen", envvar=_env("HEALTH_LISTEN"), show_envvar=True, default=None,
              help="HOST:PORT of an optional plain-HTTP listener serving only /healthz and /readyz (probes)")
@click.option("--crl-url", envvar=_env("CRL_URL"), show_envvar=True, default=None,
              help="CRL distribution point written into agent certificates (default: "
                   "https://<first --server-name>:<port>/v1/crl)")
@click.option("--audit-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              envvar=_env("AUDIT_KEY_FILE"), show_envvar=True,
              help="PEM private key (ECDSA, RSA, Ed25519) that signs audit checkpoints (default: the CA key)")
@click.option("--audit-checkpoint-interval", type=float, default=60.0, envvar=_env("AUDIT_CHECKPOINT_INTERVAL"),
              show_envvar=True, show_default=True, help="seconds between signed audit checkpoints (0 disables)")
@click.option("--audit-verify-interval", type=float, default=3600.0, envvar=_env("AUDIT_VERIFY_INTERVAL"),
              show_envvar=True, show_default=True,
              help="seconds between background verifications of every audit chain (0 disables)")
@click.option("--session-idle-timeout", type=float, default=8 * 3600.0, envvar=_env("SESSION_IDLE_TIMEOUT"),
              show_envvar=True, show_default=True, help="seconds without a request that end a dashboard session")
@click.option("--session-absolute-timeout", type=float, default=7 * 86400.0,
              envvar=_env("SESSION_ABSOLUTE_TIMEOUT"), show_envvar=True, show_default=True,
              help="seconds after login that end a dashboard session however active it is")
@click.option("--ui/--no-ui", "ui_enabled", default=True, envvar=_env("UI"), show_envvar=True, show_default=True,
              help="serve the web dashboard under /ui/ on the same TLS listener")
@_rate_limit_options
def serve(data_dir: Path, database_url: str | None, listen: str, admin_key: str | None,
          server_names: Sequence[str], ca_cert_file: Path | None, ca_key_file: Path | None,
          require_persistent_pki: bool, agent_cert_ttl: float, enrollment_token_ttl: float, lease_ttl: float,
          heartbeat_interval: int, offline_after: float, sweep_interval: float, max_plans_per_lease: int,
          renew_grace: float, max_body_bytes: int, db_pool_size: int, crl_validity: float, metrics_token: str | None,
          health_listen: str | None, crl_url: str | None, audit_key_file: Path | None,
          audit_checkpoint_interval: float, audit_verify_interval: float, ui_enabled: bool,
          session_idle_timeout: float, session_absolute_timeout: float,
          **limits: Any) -> None:
    """Run the HTTPS API server (TLS >= 1.2, agent routes need a client certificate from our CA)."""
    import asyncio
    import os

    from nkudo.cp.config import Settings, parse_listen, rate_limit_settings
    from nkudo.cp.server import serve as run

    if admin_key is None and _env("ADMIN_KEY") in os.environ:
        admin_key = os.environ[_env("ADMIN_KEY")]  # click drops an empty variable; an empty key is an error
    host, port = parse_listen(listen)
    names: list[str] = []
    for n in server_names:
        names.extend(x.strip() for x in n.replace(",", " ").split() if x.strip())
    settings = Settings(
        data_dir=data_dir, listen_host=host, listen_port=port, database_url=database_url, admin_key=admin_key,
        server_names=names or ["localhost", "127.0.0.1"], ca_cert_file=ca_cert_file, ca_key_file=ca_key_file,
        require_persistent_pki=require_persistent_pki, agent_cert_ttl=agent_cert_ttl,
        enrollment_token_ttl=enrollment_token_ttl, lease_ttl=lease_ttl, heartbeat_interval=heartbeat_interval,
        offline_after=offline_after, sweep_interval=sweep_interval, max_plans_per_lease=max_plans_per_lease,
        renew_grace=renew_grace, max_body_bytes=max_body_bytes, db_pool_size=db_pool_size,
        crl_validity=crl_validity, metrics_token=metrics_token.strip() if metrics_token else None,
        health_listen=parse_listen(health_listen, "health_listen") if health_listen else None,
        crl_url=crl_url or None, audit_key_file=audit_key_file,
        audit_checkpoint_interval=audit_checkpoint_interval, audit_verify_interval=audit_verify_interval,
        ui_enabled=ui_enabled, session_idle_timeout=session_idle_timeout,
        session_absolute_timeout=session_absolute_timeout, **rate_limit_settings(limits),
    )
    try:  # uvloop makes the TLS event loop noticeably cheaper per request; plain asyncio works too
        import uvloop
    except ImportError:
        asyncio.run(run(settings))
    else:
        uvloop.run(run(settings))


@cli.command()
@_db_options
def migrate(data_dir: Path, database_url: str | None) -> None:
    """Create or upgrade the database schema, then exit."""
    from nkudo.cp.config import prepare_data_dir
    from nkudo.cp.db import Database, sqlite_url

    prepare_data_dir(data_dir)
    db = Database(database_url or sqlite_url(data_dir), pool_size=1)
    try:
        rev = db.migrate()
    finally:
        db.close()
    click.echo(f"schema at revision {rev}")


# --- admin client -------------------------------------------------------------


def _client_options(f: F) -> F:
    f = click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")(f)
    f = click.option("--api-key", envvar=_env("API_KEY"), show_envvar=True, default=None)(f)
    f = click.option("--admin-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     envvar=_env("ADMIN_KEY_FILE"), show_envvar=True)(f)
    f = click.option("--admin-key", envvar=_env("ADMIN_KEY"), show_envvar=True, default=None)(f)
    f = click.option("--ca-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     envvar=_env("CA_FILE"), show_envvar=True, help="CA certificate (DATA_DIR/ca.crt)")(f)
    f = click.option("--server", default="https://localhost:8443", envvar=_env("SERVER"), show_envvar=True,
                     show_default=True)(f)
    return f


def _client(kw: dict[str, Any]) -> Any:
    from nkudo.cp.client import Client

    admin = kw.pop("admin_key")
    admin_file = kw.pop("admin_key_file")
    api = kw.pop("api_key")
    if admin_file is not None and not admin:
        admin = admin_file.read_text().strip()
    if api:
        admin = None  # an explicit API key scopes the command to its tenant
    if not admin and not api:
        raise NkudoError("an admin key (--admin-key[-file]) or an API key (--api-key) is required",
                         code="INVALID_ARGUMENT")
    return Client(kw.pop("server"), ca_file=kw.pop("ca_file"), admin_key=admin, api_key=api)


def _print(obj: Any, as_json: bool, rows_key: str | None = None, cols: Sequence[str] = ()) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2, sort_keys=True))
        return
    rows = obj.get(rows_key, []) if rows_key else [obj]
    cols = list(cols) or (sorted(rows[0]) if rows else [])
    table = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(cols)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for row in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict | list):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


@cli.group()
def tenant() -> None:
    """Tenants (admin key)."""


@tenant.command("create")
@click.option("--slug", required=True)
@click.option("--name", required=True)
@_client_options
def tenant_create(slug: str, name: str, as_json: bool, **kw: Any) -> None:
    out = _client(kw).call("POST", "/tenants", {"slug": slug, "name": name})
    _print(out, as_json, cols=("id", "slug", "name", "created_at"))


@tenant.command("list")
@_client_options
def tenant_list(as_json: bool, **kw: Any) -> None:
    _print(_client(kw).call("GET", "/tenants"), as_json, "tenants", ("id", "slug", "name", "created_at"))


def _quota_value(flag: str, raw: str | None) -> int | None:
    """A ``set-quota`` value: a whole number >= 0, or ``default`` (the server's default again)."""
    if raw is None or raw == "default":
        return None
    if not raw.isdigit():
        raise click.BadParameter(f"{raw!r} is neither a whole number >= 0 nor 'default'", param_hint=flag)
    return int(raw)


@tenant.command("set-quota")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--max-sites", default=None, metavar="N|default")
@click.option("--max-agents-per-site", default=None, metavar="N|default")
@click.option("--max-vms-per-agent", default=None, metavar="N|default")
@click.option("--max-concurrent-plans", default=None, metavar="N|default")
@click.option("--max-api-keys", default=None, metavar="N|default")
@_client_options
def tenant_set_quota(tenant_id: str, as_json: bool, **kw: Any) -> None:
    """Override a tenant's limits (admin key); limits not named keep their value, 'default' restores one."""
    from nkudo.cp.domain import QuotaLimit

    body = {lim.value: _quota_value("--" + lim.value.replace("_", "-"), kw.pop(lim.value)) for lim in QuotaLimit
            if kw.get(lim.value) is not None}
    if not body:
        raise click.UsageError("name at least one limit (--max-sites, --max-agents-per-site, --max-vms-per-agent, "
                               "--max-concurrent-plans, --max-api-keys)")
    for lim in QuotaLimit:
        kw.pop(lim.value, None)
    out = _client(kw).call("PATCH", f"/tenants/{tenant_id}/quota", body)
    if as_json:
        _print(out, True)
        return
    _print({**out["limits"], "overridden": ",".join(out["overridden"]) or "-"}, False)


@cli.group("api-key")
def api_key() -> None:
    """Tenant API keys."""


@api_key.command("create")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--name", default="default", show_default=True)
@click.option("--expires-in", type=int, default=None, help="seconds")
@_client_options
def api_key_create(tenant_id: str, name: str, expires_in: int | None, as_json: bool, **kw: Any) -> None:
    """Create an API key; the key is printed once and stored only hashed."""
    body: dict[str, Any] = {"name": name}
    if expires_in:
        body["expires_in_seconds"] = expires_in
    out = _client(kw).call("POST", f"/tenants/{tenant_id}/api-keys", body)
    _print(out, as_json, cols=("id", "tenant_id", "name", "api_key", "expires_at"))


@cli.group()
def site() -> None:
    """Sites."""


@site.command("create")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--name", required=True)
@_client_options
def site_create(tenant_id: str, name: str, as_json: bool, **kw: Any) -> None:
    out = _client(kw).call("POST", f"/tenants/{tenant_id}/sites", {"name": name})
    _print(out, as_json, cols=("id", "tenant_id", "name", "connectivity_state"))


@site.command("list")
@click.option("--tenant", "tenant_id", required=True)
@_client_options
def site_list(tenant_id: str, as_json: bool, **kw: Any) -> None:
    out = _client(kw).call("GET", f"/tenants/{tenant_id}/sites")
    _print(out, as_json, "sites", ("id", "name", "connectivity_state", "created_at"))


@cli.group()
def token() -> None:
    """Enrollment tokens."""


@token.command("create")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--site", "site_id", required=True)
@click.option("--expires-in", type=int, default=None, help="seconds (default: server's token TTL)")
@_client_options
def token_create(tenant_id: str, site_id: str, expires_in: int | None, as_json: bool, **kw: Any) -> None:
    body: dict[str, Any] = {"site_id": site_id}
    if expires_in:
        body["expires_in_seconds"] = expires_in
    out = _client(kw).call("POST", f"/tenants/{tenant_id}/enrollment-tokens", body)
    _print(out, as_json, cols=("token_id", "site_id", "token", "expires_at"))


@cli.group()
def plan() -> None:
    """Plans."""


@plan.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--site", "site_id", required=True)
@click.option("--idempotency-key", default=None, help="overrides the file's idempotency_key")
@_client_options
def plan_apply(file: Path, site_id: str, idempotency_key: str | None, as_json: bool, **kw: Any) -> None:
    """Apply a plan file (JSON or YAML: {idempotency_key, actions: [{type, params, ...}]})."""
    text = file.read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise NkudoError(f"{file}: a plan file holds an object", code="INVALID_ARGUMENT")
    if idempotency_key:
        doc["idempotency_key"] = idempotency_key
    out = _client(kw).call("POST", f"/sites/{site_id}/plans", doc)
    if as_json:
        _print(out, True)
        return
    click.echo(f"plan {out['plan_id']} {out['plan_status']}{' (deduplicated)' if out['deduplicated'] else ''}")
    _print(out, False, "executions", ("id", "action_id", "type", "state"))


@plan.command("show")
@click.argument("plan_id")
@_client_options
def plan_show(plan_id: str, as_json: bool, **kw: Any) -> None:
    out = _client(kw).call("GET", f"/plans/{plan_id}")
    if as_json:
        _print(out, True)
        return
    click.echo(f"plan {out['plan_id']} {out['plan_status']} site {out['site_id']}")
    _print(out, False, "executions", ("id", "action_id", "type", "state", "agent_id", "error_code"))


@cli.group()
def execution() -> None:
    """Executions."""


@execution.command("show")
@click.argument("execution_id")
@_client_options
def execution_show(execution_id: str, as_json: bool, **kw: Any) -> None:
    out = _client(kw).call("GET", f"/executions/{execution_id}")
    _print(out, as_json, cols=("id", "plan_id", "action_id", "type", "state", "agent_id", "error_code",
                               "error_message"))


@execution.command("logs")
@click.argument("execution_id")
@click.option("--after-seq", type=int, default=-1)
@click.option("--limit", type=int, default=500)
@_client_options
def execution_logs(execution_id: str, after_seq: int, limit: int, as_json: bool, **kw: Any) -> None:
    """Print all log lines (pages through the API)."""
    c = _client(kw)
    lines: list[dict[str, Any]] = []
    while True:
        out = c.call("GET", f"/executions/{execution_id}/logs?after_seq={after_seq}&limit={limit}")
        lines.extend(out["logs"])
        if out["next_after_seq"] is None:
            break
        after_seq = out["next_after_seq"]
    if as_json:
        _print({"execution_id": execution_id, "logs": lines}, True)
        return
    for ln in lines:
        click.echo(f"{ln['emitted_at']} {ln['level']:5} {ln['message']}")


@cli.group()
def agent() -> None:
    """Agents."""


@cli.group()
def audit() -> None:
    """The tamper-evident audit log (reads the database itself, so it works on a copy too)."""


def _audit_db(data_dir: Path, database_url: str | None) -> Any:
    from nkudo.cp.db import Database, sqlite_url

    if database_url is None and not (data_dir / "nkudo.db").is_file():
        raise NkudoError(f"no database in {data_dir} (nkudo.db); pass --data-dir or --database-url",
                         code="INVALID_ARGUMENT")
    return Database(database_url or sqlite_url(data_dir), pool_size=1)


@audit.command("verify")
@_db_options
@click.option("--tenant", "chain", default=None, help="verify only this tenant's chain (a tenant id, or 'global')")
@click.option("--audit-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              envvar=_env("AUDIT_KEY_FILE"), show_envvar=True,
              help="PEM certificate, public or private key checkpoints are signed with (default: DATA_DIR/ca.crt)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def audit_verify(data_dir: Path, database_url: str | None, chain: str | None, audit_key_file: Path | None,
                 as_json: bool) -> None:
    """Verify the audit chains: every event's hash and link, and every checkpoint's signature.

    Exits 1 when a chain is broken, naming its first broken event and why (changed, deleted, inserted,
    reordered, checkpoint_signature_invalid).
    """
    import asyncio

    import msgspec

    from nkudo.cp.auditchain import GLOBAL_CHAIN, Verifier
    from nkudo.cp.usecases.audit import AuditLog
    from nkudo.wire.messages import UUID_PATTERN

    if chain is not None and chain != GLOBAL_CHAIN and not re.match(UUID_PATTERN, chain):
        raise click.BadParameter("a tenant id (UUID) or 'global'", param_hint="--tenant")
    key = audit_key_file or data_dir / "ca.crt"
    try:
        verifier = Verifier.from_pem(key.read_bytes())
    except (OSError, ValueError) as exc:
        raise NkudoError(f"cannot load the audit key {key}: {exc}", code="INVALID_ARGUMENT") from None
    db = _audit_db(data_dir, database_url)
    try:
        report = asyncio.run(AuditLog(db, verifier=verifier).verify_chains(chain))
    finally:
        db.close()
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(report), indent=2, sort_keys=True))
    else:
        for c in report.chains:
            state = "ok" if c.broken is None else f"BROKEN at seq {c.broken.seq} ({c.broken.reason}): {c.broken.detail}"
            click.echo(f"chain {c.chain}: {c.events} events, head {c.head_seq}, signed to {c.signed_seq} "
                       f"({c.unsigned_events} unsigned), {state}")
        b = report.first_broken
        click.echo(f"total {report.total} events in {len(report.chains)} chains: " + (
            "VALID" if b is None else f"BROKEN: first broken event chain {b.chain} seq {b.seq} "
            f"id {b.event_id if b.event_id is not None else '-'}: {b.reason} ({b.detail})"))
    if not report.valid:
        raise NkudoError("the audit log has been tampered with", code="AUDIT_CHAIN_BROKEN")


@audit.command("checkpoint")
@_db_options
@click.option("--audit-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              envvar=_env("AUDIT_KEY_FILE"), show_envvar=True,
              help="PEM private key that signs checkpoints (default: DATA_DIR/ca.key)")
def audit_checkpoint(data_dir: Path, database_url: str | None, audit_key_file: Path | None) -> None:
    """Sign the head of every chain that grew since its last checkpoint (what the server does periodically)."""
    import asyncio

    from nkudo.cp.auditchain import Signer
    from nkudo.cp.usecases.audit import AuditLog

    key = audit_key_file or data_dir / "ca.key"
    try:
        signer = Signer.from_pem(key.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise NkudoError(f"cannot load the audit key {key}: {exc}", code="INVALID_ARGUMENT") from None
    db = _audit_db(data_dir, database_url)
    try:
        out = asyncio.run(AuditLog(db, signer=signer).checkpoint())
    finally:
        db.close()
    for cp in out.checkpoints:
        click.echo(f"chain {cp.chain}: signed seq {cp.seq} {cp.entry_hash}")
    click.echo(f"{len(out.checkpoints)} checkpoints signed")


# ``vm``/``host``/``agent``/``plan``/``execution``/``audit`` ``list`` with paging (issue 13).
cli_lists.register(cli, _client_options, _client, _print)


cli.add_command(user_group)  # issue 13: nkudo.cp.cli_users


def main(argv: list[str] | None = None) -> int:
    from nkudo.extras import Extra, require

    if (missing := require(Extra.CONTROL_PLANE, "nkudo-control-plane")) is not None:
        return missing  # an agent-only install: one sentence naming the extra, not an ImportError (issue 14)
    try:
        cli.main(args=argv, prog_name="nkudo-control-plane", standalone_mode=False)
    except click.exceptions.Abort:
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except NkudoError as exc:
        status = getattr(exc, "status", None)
        sys.stderr.write(f"nkudo-control-plane: error: {exc}{f' (HTTP {status})' if status else ''}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"nkudo-control-plane: error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
