"""The dashboard's aiohttp sub-application: templates, static files, the security layer and every page's routes.

Mounted by ``nkudo.cp.http.build_app`` at ``/ui/`` (unless ``--no-ui``). Each page module lists its routes
in ``ROUTES``; adding a page is one line in ``MODULES``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import ModuleType

import aiohttp_jinja2
import jinja2
from aiohttp import web
from markupsafe import Markup

from nkudo.cp.service import ControlPlane
from nkudo.cp.web import (
    access_pages,
    audit_pages,
    auth_pages,
    enroll_pages,
    execution_pages,
    live,
    overview_pages,
    plan_pages,
    site_pages,
    vm_pages,
)
from nkudo.cp.web.renders import RENDERS_KEY, SharedRenders
from nkudo.cp.web.security import CP_KEY, add_security_headers, ui_middleware

STATIC = Path(__file__).resolve().parent / "static"

#: The page modules, each with ``ROUTES: list[Route]``. Order does not matter (no two share a path).
MODULES: list[ModuleType] = [
    auth_pages,
    overview_pages,
    enroll_pages,
    access_pages,
    site_pages,  # WEBPAGES
    vm_pages,
    plan_pages,
    execution_pages,
    audit_pages,
    live,
]


Stamp = dt.datetime | str | None


def _dt(value: Stamp) -> dt.datetime | None:
    """Views carry RFC 3339 strings, records carry datetimes: templates format both alike."""
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    return value


def iso(value: Stamp) -> str:
    """RFC 3339 UTC for ``<time datetime>`` (the machine-readable form app.js turns into "3 min ago")."""
    v = _dt(value)
    return "" if v is None else v.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def when(value: Stamp) -> str:
    """A timestamp as people read it in a table: UTC, to the second, no microseconds."""
    v = _dt(value)
    return "—" if v is None else v.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(value: Stamp, now: dt.datetime | None = None) -> str:
    """How long ago (or, for a future time, in how long), coarse: what a glance at a table needs."""
    v = _dt(value)
    if v is None:
        return "never"
    secs = int(((now or dt.datetime.now(dt.UTC)) - v).total_seconds())
    future, secs = secs < 0, abs(secs)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if secs >= size:
            text = f"{secs // size} {unit}"
            break
    else:
        text = f"{secs} s"
    return f"in {text}" if future else f"{text} ago"


_TIMECELL = Markup('<time datetime="%s" title="%s" data-relative>%s</time>')
_BADGE = Markup('<span class="badge badge-%s">%s</span>')


def timecell(value: Stamp) -> Markup:
    """A table's time cell: ``<time>`` with the machine-readable instant, the exact UTC time as its title and
    "3 min ago" as its text (app.js keeps that fresh). One filter, one parse: a site page has hundreds of them,
    and three filters each parsing the string again were a third of its render time."""
    v = _dt(value)
    if v is None:
        return Markup('<span class="muted">never</span>')
    # Markup's % (each argument escaped), not Markup.format: that runs string.Formatter in Python and was 40 %
    # of this filter, itself an eighth of a site page's server time (py-spy); % takes 40 % less per cell.
    return _TIMECELL % (iso(v), when(v), ago(v))


def badge(value: object) -> Markup:
    """A state or health word as a badge (the text carries the meaning; the colour only repeats it): a filter,
    not a macro, because a table row calls it and a Jinja macro call costs several times a Python call."""
    text = str(value)
    return _BADGE % (text.lower(), text)


def gib(n: int | None) -> Markup:
    """A byte count in GiB with one decimal; nothing known (None or 0, as facts_summary reads a missing fact) is
    a dash."""
    return Markup("%.1f GiB") % (n / 2**30) if n else Markup('<span class="muted">—</span>')


def environment(app: web.Application) -> jinja2.Environment:
    """Jinja2 with autoescaping on for every template and undefined names an error (a typo is a test failure,
    never an empty cell)."""
    env = aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("nkudo.cp.web"),
                               autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                               undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(iso=iso, when=when, ago=ago, timecell=timecell, badge=badge, gib=gib)
    return env


def build_ui(cp: ControlPlane) -> web.Application:
    app = web.Application(middlewares=[ui_middleware])
    app[CP_KEY] = cp
    # Keys start with the view's name ("overview", "site"): the metric counts renders per view.
    app[RENDERS_KEY] = SharedRenders(lambda key: cp.metrics.ui_live_renders.labels(str(key[0])).inc()
                                     if isinstance(key, tuple) else None)
    environment(app)
    app.on_response_prepare.append(add_security_headers)
    app.router.add_static("/static/", STATIC, name="static", follow_symlinks=False)
    for module in MODULES:
        for method, path, handler, name in module.ROUTES:
            app.router.add_route(method, path, handler, name=name)
    return app
