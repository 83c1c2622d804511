"""Dashboard guards that a one-line bug could defeat without any other test failing (the auth mutation sweep),
against a real control plane with the UI (``dashboard`` fixture). Each docstring names the bug it catches."""

from __future__ import annotations

from pathlib import Path

from .conftest import Dashboard
from .test_web_core import post_forms


def test_live_overview_ends_when_the_membership_is_removed(dashboard: Dashboard, tmp_path: Path) -> None:
    """Bug caught: ``session_check`` without its membership test (``any(m.tenant_id == pg.tenant_id ...)``): a
    member removed from the tenant would keep receiving its live overview as long as its session lives."""
    t = dashboard.tenant()
    watcher, owner = dashboard.browser(), dashboard.browser()
    viewer = dashboard.user(t, "viewer")
    watcher.login(viewer)
    owner.login(dashboard.user(t, "owner"))
    stream = watcher.stream(f"/ui/t/{t.tenant_id}/events/overview")
    try:
        assert stream.status == 200
        page = owner.get(f"/ui/t/{t.tenant_id}/access")
        remove = f"/ui/t/{t.tenant_id}/access/members/{viewer.user_id}/remove"
        assert remove in post_forms(page)
        assert owner.post(remove, csrf=owner.csrf(page)).status == 303
        assert watcher.get(f"/ui/t/{t.tenant_id}/").status == 404  # the session lives on, without the tenant
        dashboard.agent(t, tmp_path)  # a change: the stream re-checks before sending, and ends
        assert stream.next_event() is None
    finally:
        stream.close()
