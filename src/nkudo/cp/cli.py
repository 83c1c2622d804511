"""``nkudo-control-plane``: run the server, migrate, and administer it over HTTPS.

Every flag also reads an ``NKUDO_CP_*`` environment variable (shown in
``--help``); secrets (admin key, API key) are best passed that way or via
files so they stay out of process listings and shell history.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from nkudo import log as nlog
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
def serve(data_dir: Path, database_url: str | None, listen: str, admin_key: str | None,
          server_names: Sequence[str], ca_cert_file: Path | None, ca_key_file: Path | None,
          require_persistent_pki: bool, agent_cert_ttl: float, enrollment_token_ttl: float, lease_ttl: float,
          heartbeat_interval: int, offline_after: float, sweep_interval: float, max_plans_per_lease: int,
          renew_grace: float, max_body_bytes: int, db_pool_size: int, crl_validity: float, metrics_token: str | None,
          health_listen: str | None) -> None:
    """Run the HTTPS API server (TLS >= 1.2, agent routes need a client certificate from our CA)."""
    import asyncio
    import os

    from nkudo.cp.config import Settings, parse_listen
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


@agent.command("list")
@click.option("--site", "site_id", required=True)
@_client_options
def agent_list(site_id: str, as_json: bool, **kw: Any) -> None:
    out = _client(kw).call("GET", f"/sites/{site_id}/agents")
    _print(out, as_json, "agents", ("id", "hostname", "state", "agent_version", "last_heartbeat_at"))


def main(argv: list[str] | None = None) -> int:
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
