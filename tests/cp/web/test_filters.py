"""The dashboard's template filters: what they render, and that every part is escaped.

They format with ``Markup``'s ``%``, which escapes every argument (``Markup.format`` runs ``string.Formatter``
in Python and was 40 % of ``timecell`` on a site page with hundreds of cells); these tests hold them to the
output ``Markup.format`` gave and catch a part left unescaped.
"""

from __future__ import annotations

import datetime as dt

import pytest
from markupsafe import Markup

from nkudo.cp.web.app import ago, badge, gib, iso, timecell, when

HOSTILE = ['<img src=x onerror=alert(1)>', 'a"b', "it's", "&amp;", "RUNNING"]


@pytest.mark.parametrize("value", [dt.datetime(2026, 12, 8, 1, 2, 3, tzinfo=dt.UTC), "2026-01-02T03:04:05+00:00",
                                   dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)])
def test_timecell_is_what_markup_format_made(value: dt.datetime | str) -> None:
    want = Markup('<time datetime="{}" title="{}" data-relative>{}</time>').format(iso(value), when(value), ago(value))
    assert timecell(value) == want
    assert timecell(None) == Markup('<span class="muted">never</span>')


@pytest.mark.parametrize("text", HOSTILE)
def test_badge_escapes_its_text_in_the_class_and_the_content(text: str) -> None:
    got = badge(text)
    assert got == Markup('<span class="badge badge-{}">{}</span>').format(text.lower(), text)
    assert "<img" not in got and got.count('"') == 2  # only the class attribute's own quotes


def test_gib() -> None:
    assert gib(3 * 2**30 + 2**29) == Markup("3.5 GiB")
    assert gib(0) == gib(None) == Markup('<span class="muted">—</span>')
