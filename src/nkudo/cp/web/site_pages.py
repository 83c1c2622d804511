"""The site page (issue 13, page 2): health with its reasons, agents with their host facts, VMs with filter,
sort and "next page"; and the query and scoping helpers the other pages of this family share.

Why the VM sort applies within the page: the VM listing pages by ``vm_id`` (a keyset cursor, stable while
VMs come and go); sorting the whole site by another column would need another keyset per column in the use
case. Within a page of at most ``MAX_LIMIT`` rows, ordering what is shown is presentation, not a rule.

Why every page checks the object's tenant against the path's: an admin's principal sees every tenant, so
``/ui/t/<A>/sites/<site of B>`` would otherwise render B's site under A's name and navigation. The same
404 as a foreign id keeps the URL scheme honest for admins without revealing anything to members (for
them the use case has already refused it).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlencode

from aiohttp import web

from nkudo.cp import readviews as rv
from nkudo.cp import views as v
from nkudo.cp.domain import AgentState
from nkudo.cp.errors import BadRequest, NotFound
from nkudo.cp.web.context import Page, Route, page, path_uuid, render
from nkudo.vmstate import VmStatus

E = TypeVar("E", bound=enum.StrEnum)
#: Rows per page of the site's VM and agent tables.
PAGE_ROWS = 100


class VmSort(enum.StrEnum):
    """The columns the VM table can be ordered by (within the page shown)."""

    ID = "id"
    NAME = "name"
    STATE = "state"
    VCPUS = "vcpus"
    MEMORY = "memory"
    HOST = "host"
    AGE = "age"


# --- helpers shared by the page modules of this family ----------------------------------------------------------


def query_enum(request: web.Request, name: str, type_: type[E]) -> E | None:
    """An optional query parameter holding one of an enum's values; empty means "any" (a form's blank
    choice); anything else is a 400 naming the parameter and its values."""
    raw = request.query.get(name, "")
    if raw == "":
        return None
    try:
        return type_(raw)
    except ValueError:
        raise BadRequest(f"{name} must be one of {', '.join(m.value for m in type_)}", field=name) from None


def query_cursor(request: web.Request, name: str = "cursor") -> str | None:
    """An opaque cursor from the query (the use case decodes and checks it: 400 ``INVALID_CURSOR``)."""
    return request.query.get(name) or None


def same_tenant(pg: Page, tenant_id: str, kind: str) -> None:
    """404 unless the object belongs to the page's tenant (see the module's docstring)."""
    if tenant_id != pg.tenant_id:
        raise NotFound(f"{kind} not found", code=f"{kind.upper()}_NOT_FOUND")


def with_query(path: str, query: Mapping[str, str], **changes: str | None) -> str:
    """``path`` with ``query`` changed by ``changes`` (``None`` removes a parameter), for links that keep
    the other filters (sort headers, "next page")."""
    params = {k: val for k, val in query.items() if val != ""}
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    return path + ("?" + urlencode(sorted(params.items())) if params else "")


async def site_of(pg: Page, site_id: str) -> rv.SiteStatus:
    """The site's status, visible to the principal and of the page's tenant (404 otherwise)."""
    status = await pg.cp.overview.site_status(pg.principal, site_id)
    same_tenant(pg, status.tenant_id, "site")
    return status


# --- the site page -------------------------------------------------------------------------------------------------


_SORT_KEYS: dict[VmSort, Callable[[v.VmView, Mapping[str, str]], Any]] = {
    VmSort.ID: lambda vm, hosts: vm.vm_id,
    VmSort.NAME: lambda vm, hosts: (vm.name.lower(), vm.vm_id),
    VmSort.STATE: lambda vm, hosts: (vm.state.value, vm.vm_id),
    VmSort.VCPUS: lambda vm, hosts: (-vm.vcpus, vm.vm_id),
    VmSort.MEMORY: lambda vm, hosts: (-vm.memory_mib, vm.vm_id),
    VmSort.HOST: lambda vm, hosts: (hosts.get(vm.host_id or "", ""), vm.vm_id),
    VmSort.AGE: lambda vm, hosts: (vm.last_transition_at or vm.updated_at, vm.vm_id),
}


async def site_values(pg: Page, site_id: str, request: web.Request) -> dict[str, Any]:
    """Everything the site page and its live fragments show, from the use cases, for the request's query
    (the live view's URL carries the page's query, so a live update shows the same filter, sort and page)."""
    query = request.query
    state = query_enum(request, "state", VmStatus)
    agent_state = query_enum(request, "agent_state", AgentState)
    sort = query_enum(request, "sort", VmSort) or VmSort.ID
    status = await site_of(pg, site_id)
    p, cp = pg.principal, pg.cp
    vms = await cp.inventory.list_vms(p, site_id, limit=PAGE_ROWS, cursor=query_cursor(request), state=state)
    agents = await cp.inventory.list_agents(p, site_id, limit=PAGE_ROWS, cursor=query_cursor(request, "agents_cursor"),
                                            state=agent_state)
    labels = await cp.inventory.host_labels(p, site_id, {vm.host_id for vm in vms.vms if vm.host_id}
                                            | {a.host_id for a in agents.agents})
    hostnames = {hid: label.hostname for hid, label in labels.items()}
    path = f"/ui/t/{pg.tenant_id}/sites/{site_id}"
    return {
        "site": status, "state": state, "agent_state": agent_state, "sort": sort,
        "vms": sorted(vms.vms, key=lambda vm: _SORT_KEYS[sort](vm, hostnames)),
        "agents": agents.agents, "hostnames": hostnames,
        "facts": {hid: label.facts for hid, label in labels.items()},
        "vm_states": list(VmStatus), "agent_states": list(AgentState), "sorts": list(VmSort),
        "site_path": path,
        "sort_url": {s: with_query(path, query, sort=s.value) for s in VmSort},
        "vms_next": with_query(path, query, cursor=vms.next) if vms.next else None,
        "agents_next": with_query(path, query, agents_cursor=agents.next) if agents.next else None,
        "events_url": with_query(f"/ui/t/{pg.tenant_id}/events/sites/{site_id}", query),
    }


async def site_page(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    site_id = path_uuid(request, "site_id")
    return render(request, "site.html", pg, **await site_values(pg, site_id, request))


ROUTES: list[Route] = [
    ("GET", "/t/{tenant_id}/sites/{site_id}", site_page, "site"),
]
