"""``nkudo-control-plane user ...``: dashboard users, administered on the database itself (issue 13).

Why on the database and not over HTTPS like ``tenant`` or ``site``: the first admin must exist before anyone
can log in to the dashboard, so these commands work like ``migrate`` and ``audit verify`` (same
``--data-dir`` / ``--database-url``), for whoever can read the database anyway. A password is read from stdin
(``--password-stdin``), ``NKUDO_CP_USER_PASSWORD`` or a hidden prompt, never from a flag, so it stays out of
process listings and shell history; it is printed nowhere.

Heavy modules (SQLAlchemy, the use cases) are imported inside the commands, as in ``nkudo.cp.cli``, so that
``--help`` works and an agent-only install gets the one sentence naming the missing extra.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from nkudo.cp.usecases.accounts import Accounts

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
PASSWORD_ENV = "NKUDO_CP_USER_PASSWORD"  # noqa: S105 - the name of the variable, not a password
_ROLES = ("owner", "operator", "viewer")


def _db_options(f: F) -> F:
    f = click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")(f)
    f = click.option("--database-url", envvar="NKUDO_CP_DATABASE_URL", show_envvar=True, default=None,
                     help="postgresql://... (default: SQLite file in --data-dir)")(f)
    f = click.option("--data-dir", envvar="NKUDO_CP_DATA_DIR", show_envvar=True, default="/var/lib/nkudo-cp",
                     type=click.Path(file_okay=False, path_type=Path), show_default=True)(f)
    return f


def _with_accounts(data_dir: Path, database_url: str | None, fn: Callable[[Accounts], Any]) -> Any:
    """Run ``fn`` against the accounts of the database (migrated first: the first admin may come first)."""
    from nkudo.cp.config import Settings, prepare_data_dir
    from nkudo.cp.db import Database, sqlite_url
    from nkudo.cp.ports import SystemClock
    from nkudo.cp.usecases.accounts import Accounts

    if database_url is None:
        prepare_data_dir(data_dir)
    db = Database(database_url or sqlite_url(data_dir), pool_size=1)
    try:
        db.migrate()
        return asyncio.run(fn(Accounts(Settings(data_dir=data_dir), db, SystemClock())))
    finally:
        db.close()


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if PASSWORD_ENV in os.environ:
        return os.environ[PASSWORD_ENV]
    return str(click.prompt("Password", hide_input=True, confirmation_prompt=True))


def _json_value(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


def _emit(obj: dict[str, Any], as_json: bool, text: str) -> None:
    click.echo(json.dumps(_json_value(obj), indent=2, sort_keys=True) if as_json else text)


@click.group()
def user() -> None:
    """Dashboard users (acts on the database directly, like migrate)."""


@user.command("create")
@_db_options
@click.option("--email", required=True)
@click.option("--admin", "is_admin", is_flag=True, help="an admin user sees and manages every tenant")
@click.option("--tenant-id", default=None, help="also make the user a member of this tenant (needs --role)")
@click.option("--role", type=click.Choice(_ROLES), default=None)
@click.option("--password-stdin", is_flag=True,
              help=f"read the password from the first line of stdin (else ${PASSWORD_ENV}, else a prompt)")
def user_create(data_dir: Path, database_url: str | None, as_json: bool, email: str, is_admin: bool,
                tenant_id: str | None, role: str | None, password_stdin: bool) -> None:
    """Create a user and print its id."""
    from nkudo.cp.records import RequestInfo
    from nkudo.cp.usecases.access import ADMIN

    if (tenant_id is None) != (role is None):
        raise click.UsageError("--tenant-id and --role go together")
    password = _password(password_stdin)

    async def go(acc: Accounts) -> dict[str, Any]:
        if tenant_id is not None:
            await acc.list_members(ADMIN, tenant_id)  # an unknown tenant fails before the user is created
        uid = await acc.create_user(email, password, is_admin=is_admin)
        out: dict[str, Any] = {"id": uid, "email": email.strip().lower(), "is_admin": is_admin}
        if tenant_id is not None and role is not None:
            await acc.grant(ADMIN, tenant_id, email, role, RequestInfo())
            out.update(tenant_id=tenant_id, role=role)
        return out

    made = _with_accounts(data_dir, database_url, go)
    _emit(made, as_json, made["id"])


@user.command("list")
@_db_options
def user_list(data_dir: Path, database_url: str | None, as_json: bool) -> None:
    """List users with their memberships."""
    async def go(acc: Accounts) -> list[Any]:
        return await acc.list_users()

    users = _with_accounts(data_dir, database_url, go)
    rows = [{"id": u.id, "email": u.email, "is_admin": u.is_admin, "created_at": u.created_at,
             "last_login_at": u.last_login_at, "disabled_at": u.disabled_at,
             "tenants": {k: r.value for k, r in u.tenants.items()}} for u in users]
    lines = [f"{r['id']}  {r['email']}{'  admin' if r['is_admin'] else ''}"
             f"{'  DISABLED' if r['disabled_at'] else ''}  "
             + (" ".join(f"{k}:{v}" for k, v in r["tenants"].items()) or "-") for r in rows]
    _emit({"users": rows}, as_json, "\n".join(lines) or "no users")


@user.command("grant")
@_db_options
@click.option("--email", required=True)
@click.option("--tenant-id", required=True)
@click.option("--role", type=click.Choice(_ROLES), required=True)
def user_grant(data_dir: Path, database_url: str | None, as_json: bool, email: str, tenant_id: str,
               role: str) -> None:
    """Give a user a role in a tenant (or change it)."""
    from nkudo.cp.records import RequestInfo
    from nkudo.cp.usecases.access import ADMIN

    async def go(acc: Accounts) -> Any:
        return await acc.grant(ADMIN, tenant_id, email, role, RequestInfo())

    m = _with_accounts(data_dir, database_url, go)
    _emit({"user_id": m.user_id, "email": m.email, "tenant_id": tenant_id, "role": m.role.value}, as_json,
          f"{m.user_id}  {m.email}  {tenant_id}:{m.role.value}")


@user.command("disable")
@_db_options
@click.option("--email", required=True)
def user_disable(data_dir: Path, database_url: str | None, as_json: bool, email: str) -> None:
    """Disable a user: no more logins, and its sessions end now."""
    async def go(acc: Accounts) -> str:
        return await acc.disable_user(email)

    uid = _with_accounts(data_dir, database_url, go)
    _emit({"id": uid, "email": email.strip().lower(), "disabled": True}, as_json, uid)
