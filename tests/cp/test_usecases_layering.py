"""Issue 11: the control plane's use cases stand on their ports, not on the HTTP layer.

Checked statically (no use-case module imports aiohttp, the HTTP adapter or the server) and at run time
(importing every use case loads no aiohttp), plus the size rule, and one use case driven directly with a
fixed clock over a real SQLite database to show the ports are all it needs.
"""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import subprocess
import sys
from pathlib import Path

from nkudo.cp import models
from nkudo.cp.db import Database, sqlite_url
from nkudo.cp.domain import PrincipalKind
from nkudo.cp.records import Principal, RequestInfo
from nkudo.cp.usecases.audit import AuditLog
from nkudo.cp.usecases.tenancy import Tenancy

CP = Path(__file__).resolve().parents[2] / "src" / "nkudo" / "cp"
USECASES = sorted((CP / "usecases").glob("*.py"))
_FORBIDDEN = ("aiohttp", "nkudo.cp.http", "nkudo.cp.server", "nkudo.cp.service", "nkudo.cp.cli")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_use_cases_do_not_import_the_http_layer() -> None:
    """Issue 11: no use-case module imports aiohttp, the HTTP adapter, the server or the facade."""
    assert len(USECASES) >= 10
    bad = {p.name: sorted(m for m in _imports(p) if m.startswith(_FORBIDDEN)) for p in USECASES}
    assert {k: v for k, v in bad.items() if v} == {}


def test_importing_the_use_cases_loads_no_aiohttp() -> None:
    """Issue 11: not even transitively (ports, records, views, domain) does a use case pull in aiohttp."""
    mods = [f"nkudo.cp.usecases.{p.stem}" for p in USECASES if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'aiohttp'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_control_plane_module_over_600_lines() -> None:
    """Issue 11: the control plane's modules stay small (``service.py`` was 1,188 lines)."""
    sizes = {str(p.relative_to(CP)): len(p.read_text().splitlines()) for p in CP.rglob("*.py")}
    assert {k: n for k, n in sizes.items() if n > 600} == {}


class FixedClock:
    def __init__(self, now: dt.datetime) -> None:
        self.t = now

    def now(self) -> dt.datetime:
        return self.t


def test_a_use_case_runs_on_its_ports_alone(tmp_path: Path) -> None:
    """Issue 11: a use case needs only a transaction runner and a clock (here a fixed one), no server."""
    db = Database(sqlite_url(tmp_path), pool_size=1)
    try:
        db.migrate()
        clock = FixedClock(dt.datetime(2031, 2, 3, 4, 5, 6, tzinfo=dt.UTC))
        tenancy, audit = Tenancy(db, clock), AuditLog(db)
        admin = Principal(PrincipalKind.ADMIN)

        async def scenario() -> None:
            made = await tenancy.create_tenant(admin, models.TenantCreate(slug="acme", name="Acme"),
                                               RequestInfo(request_id="r1"))
            assert made.slug == "acme" and made.created_at == "2031-02-03T04:05:06Z"
            key = Principal(PrincipalKind.API_KEY, tenant_id="00000000-0000-4000-8000-000000000000", key_id="k")
            assert (await tenancy.list_tenants(key)).tenants == []  # a tenant key sees only its own tenant
            assert [x.id for x in (await tenancy.list_tenants(admin)).tenants] == [made.id]
            events = (await audit.list_audit(admin, made.id, 10)).events
            assert [(e.action, e.actor_type, e.request_id, e.occurred_at) for e in events] == [
                ("tenant.create", "ADMIN", "r1", "2031-02-03T04:05:06Z")]

        asyncio.run(scenario())
    finally:
        db.close()
