"""Page 6, "Enroll a host": issue a one-time enrollment token and show the exact ``nkudo-edge enroll`` command.

Why the token is shown in the POST's own response and not after a redirect: it exists in plaintext only
now (the database keeps its hash), and putting it in a redirect URL would leave it in the browser history.
The response is ``Cache-Control: no-store`` like every page; reloading it re-asks before re-posting.
"""

from __future__ import annotations

import re

from aiohttp import web
from cryptography.hazmat.primitives import hashes

from nkudo.cp.domain import Permission
from nkudo.cp.errors import NotFound
from nkudo.cp.models import TokenCreate
from nkudo.cp.views import TokenIssued
from nkudo.cp.web.context import Page, Route, check_csrf, field, form_errors, info, int_field, page, render
from nkudo.errors import ValidationError
from nkudo.wire import codec

#: Token lifetimes offered (seconds, label); the model allows 1 s .. 7 days, the form offers sensible steps.
TTLS: list[tuple[int, str]] = [(900, "15 minutes"), (3600, "1 hour"), (86400, "1 day"), (7 * 86400, "7 days")]
#: A Host header that can be written into a command line (name or address, optional port); else the settings'.
_HOST = re.compile(r"[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?\Z|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?\Z")


def control_plane_url(request: web.Request, pg: Page) -> str:
    """The URL the browser reached us at (what the host will reach too, usually); the configured name if odd."""
    host = request.host
    if not _HOST.match(host):
        s = pg.cp.s
        host = f"{s.server_names[0]}:{s.listen_port}"
    return f"https://{host}"


def ca_fingerprint(pg: Page) -> str:
    """SHA-256 of the CA certificate, as ``openssl x509 -fingerprint -sha256`` prints it, to check a copied CA."""
    return ":".join(f"{b:02X}" for b in pg.cp.ca.cert.fingerprint(hashes.SHA256()))


def enroll_command(url: str, token: str) -> str:
    """The command to run on the new host (``ca.crt``: the file downloaded from this page)."""
    return f"nkudo-edge enroll --control-plane {url} --token {token} --ca-file ca.crt"


async def _render(request: web.Request, pg: Page, *, status: int = 200, issued: TokenIssued | None = None,
                  errors: dict[str, str] | None = None, site_id: str = "", ttl: int | None = None) -> web.Response:
    sites = (await pg.cp.tenancy.list_sites(pg.principal, pg.tenant_id)).sites if pg.can(Permission.ENROLL) else []
    url = control_plane_url(request, pg)
    return render(request, "enroll.html", pg, status=status, sites=sites, ttls=TTLS, issued=issued,
                  command=enroll_command(url, issued.token) if issued else "", control_plane_url=url,
                  fingerprint=ca_fingerprint(pg), errors=errors or {}, site_id=site_id, ttl=ttl or TTLS[0][0],
                  site_name={s.id: s.name for s in sites})


async def enroll(request: web.Request) -> web.StreamResponse:
    pg = await page(request)
    return await _render(request, pg, site_id=request.query.get("site_id", ""))


async def enroll_post(request: web.Request) -> web.StreamResponse:
    """Issue the token with the page's principal (``issue_token`` refuses a viewer: 403 page)."""
    pg = await page(request)
    form = await check_csrf(request, pg)
    site_id = field(form, "site_id", required=False, max_chars=64)
    try:
        ttl = int_field(form, "expires_in_seconds")
        body = codec.convert({"site_id": site_id, "expires_in_seconds": ttl}, TokenCreate)
    except ValidationError as exc:
        return await _render(request, pg, status=400, errors=form_errors(exc), site_id=site_id)
    try:
        issued = await pg.cp.enrollment.issue_token(pg.principal, pg.tenant_id, body, info(request))
    except NotFound as exc:  # a site of another tenant or a deleted one: said next to the select
        return await _render(request, pg, status=404, errors=form_errors(exc), site_id=site_id)
    return await _render(request, pg, issued=issued, site_id=site_id, ttl=ttl)


async def ca_certificate(request: web.Request) -> web.StreamResponse:
    """The CA certificate the agent checks the control plane with (public; offered as ``ca.crt``)."""
    pg = await page(request)
    return web.Response(text=pg.cp.ca.cert_pem, content_type="application/x-pem-file",
                        headers={"Content-Disposition": 'attachment; filename="ca.crt"'})


ROUTES: list[Route] = [
    ("GET", "/t/{tenant_id}/enroll", enroll, "enroll"),
    ("POST", "/t/{tenant_id}/enroll", enroll_post, "enroll_post"),
    ("GET", "/t/{tenant_id}/enroll/ca.crt", ca_certificate, "enroll_ca"),
]
