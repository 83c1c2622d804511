"""The admin CLI's list commands (issue 13): one page by default, ``--all`` follows ``next`` to the end.

Why a module of its own: ``cli.py`` holds the option tables and the server commands and is near the size
limit; the list commands are alike (a route, its rows, its columns, its filters), so they are described
once here as data and built by one function. ``cli.py`` calls ``register`` with its groups and its client
helpers, so this module imports nothing from it (no import cycle).

Table output ends with ``more: --cursor <next>`` when another page exists; ``--json`` prints the body as the
API returned it (with ``--all``, the rows of every page and no ``next``).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import click

from nkudo.cp.domain import AgentState, PlanStatus
from nkudo.cp.paging import MAX_LIMIT
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ExecState

Printer = Callable[..., None]
Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True, slots=True)
class Listing:
    """One list command: its group, the route (``{site_id}``/``{tenant_id}`` filled from the options), the
    body's rows key, the table's columns, and the query filters it offers (option name -> allowed values,
    or None for free text checked by the server)."""

    group: str
    path: str
    rows_key: str
    cols: tuple[str, ...]
    filters: tuple[tuple[str, Sequence[str] | None], ...] = ()
    help: str = ""


def _values(enum: Any) -> list[str]:
    return [m.value for m in enum]


LISTINGS: tuple[Listing, ...] = (
    Listing("vm", "/sites/{site_id}/vms", "vms", ("vm_id", "name", "state", "vcpus", "memory_mib", "host_id",
                                                  "updated_at"),
            (("state", _values(VmStatus)),), "A site's VMs by VM id."),
    Listing("host", "/sites/{site_id}/hosts", "hosts", ("id", "hostname", "agent_state", "agent_last_heartbeat_at"),
            help="A site's hosts by hostname."),
    Listing("agent", "/sites/{site_id}/agents", "agents", ("id", "hostname", "state", "agent_version",
                                                           "last_heartbeat_at"),
            (("state", _values(AgentState)),), "A site's agents, newest enrolment first."),
    Listing("plan", "/sites/{site_id}/plans", "plans", ("plan_id", "plan_status", "actions", "created_at",
                                                        "completed_at"),
            (("status", _values(PlanStatus)),), "A site's plans, newest first."),
    Listing("execution", "/sites/{site_id}/executions", "executions", ("id", "plan_id", "action_id", "type",
                                                                       "vm_id", "state", "created_at"),
            (("state", _values(ExecState)), ("plan_id", None), ("vm_id", None)),
            "A site's executions, newest plan first."),
)


def fetch(call: Callable[[str, str], Any], path: str, query: dict[str, str], rows_key: str, *, follow: bool
          ) -> dict[str, Any]:
    """The first page (``follow=False``) or every page's rows in one body (``follow=True``)."""
    out: dict[str, Any] = call("GET", path + "?" + urllib.parse.urlencode(query))
    if not follow:
        return out
    rows = list(out[rows_key])
    while out.get("next"):
        out = call("GET", path + "?" + urllib.parse.urlencode({**query, "cursor": out["next"]}))
        rows += out[rows_key]
    return {rows_key: rows}


def _show(out: dict[str, Any], rows_key: str, cols: Sequence[str], as_json: bool, print_: Printer) -> None:
    if as_json:
        print_(out, True)
        return
    print_(out, False, rows_key, cols)
    if out.get("next"):
        click.echo(f"more: --cursor {out['next']}")


def _paging_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--all", "follow", is_flag=True, help="follow `next` to the last page")(f)
    f = click.option("--cursor", default=None, help="start after this `next` of an earlier page")(f)
    f = click.option("--limit", type=click.IntRange(1, MAX_LIMIT), default=100, show_default=True,
                     help=f"rows per page (at most {MAX_LIMIT})")(f)
    return f


def _command(item: Listing, client_options: Decorator, client: Callable[[dict[str, Any]], Any], print_: Printer
             ) -> click.Command:
    def run(site_id: str, limit: int, cursor: str | None, follow: bool, as_json: bool, **kw: Any) -> None:
        query = {"limit": str(limit)}
        for name, _ in item.filters:
            if (value := kw.pop(name)) is not None:
                query[name] = value
        if cursor:
            query["cursor"] = cursor
        out = fetch(client(kw).call, item.path.format(site_id=site_id), query, item.rows_key, follow=follow)
        _show(out, item.rows_key, item.cols, as_json, print_)

    cmd: Any = client_options(_paging_options(run))
    for name, choices in item.filters:
        cmd = click.option(f"--{name.replace('_', '-')}", name, default=None,
                           type=click.Choice(list(choices)) if choices else None)(cmd)
    cmd = click.option("--site", "site_id", required=True)(cmd)
    return click.command("list", help=item.help)(cmd)


def _audit_command(client_options: Decorator, client: Callable[[dict[str, Any]], Any], print_: Printer) -> click.Command:
    @click.command("list")
    @click.option("--tenant", "tenant_id", default=None, help="the tenant's own chain (default: every chain, admin)")
    @click.option("--action", default=None, help="only events of this action (plan.create, agent.enroll, ...)")
    @_paging_options
    @client_options
    def audit_list(tenant_id: str | None, action: str | None, limit: int, cursor: str | None, follow: bool,
                   as_json: bool, **kw: Any) -> None:
        """Audit events through the API, newest first (the other audit commands read the database)."""
        query = {"limit": str(limit), **({"action": action} if action else {}), **({"cursor": cursor} if cursor else {})}
        path = f"/tenants/{tenant_id}/audit-events" if tenant_id else "/admin/audit/events"
        out = fetch(client(kw).call, path, query, "events", follow=follow)
        _show(out, "events", ("id", "occurred_at", "actor_type", "actor_id", "action", "object_type", "object_id"),
              as_json, print_)

    return audit_list


def register(root: click.Group, client_options: Decorator, client: Callable[[dict[str, Any]], Any], print_: Printer
             ) -> None:
    """Add ``<group> list`` for every listing (creating the ``vm`` and ``host`` groups) and ``audit list``."""
    for item in LISTINGS:
        group = root.commands.get(item.group)
        if group is None:
            group = click.Group(item.group, help={"vm": "VMs.", "host": "Hosts."}.get(item.group))
            root.add_command(group)
        assert isinstance(group, click.Group)
        group.add_command(_command(item, client_options, client, print_))
    audit = root.commands["audit"]
    assert isinstance(audit, click.Group)
    audit.add_command(_audit_command(client_options, client, print_))
