"""Request bodies of the tenant/admin API (the agent's messages live in ``nkudo.wire``)."""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from nkudo.cp.domain import QuotaLimit
from nkudo.wire.actions import Ident
from nkudo.wire.codec import described
from nkudo.wire.messages import Uuid

# Patterns end in ``\Z``: msgspec applies them with ``re.search`` and ``$`` also matches before a trailing
# newline, so ``"acme\n"`` used to pass (issue 10 item 2).
SLUG_PATTERN: Final = described(
    r"^[a-z0-9][a-z0-9-]{0,62}\Z",
    "expected a slug: 1-63 lower-case letters, digits or '-', starting with a letter or digit",
)
#: What a free-text name may not contain anywhere: C0/C1 control characters (NUL, newline, ESC...), line
#: and paragraph separators, zero-width and bidi-override format characters (invisible or reordering
#: text in a listing), and lone surrogates (not encodable as UTF-8).
_NAME_FORBIDDEN: Final = r"\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff\ud800-\udfff"
#: Free-text names: 1-200 characters, no leading or trailing white space, nothing from ``_NAME_FORBIDDEN``.
NAME_PATTERN: Final = described(
    rf"^[^\s{_NAME_FORBIDDEN}](?:[^{_NAME_FORBIDDEN}]{{0,198}}[^\s{_NAME_FORBIDDEN}])?\Z",
    "expected 1-200 characters without control, zero-width or bidi characters and without leading or trailing white space",
)
IDEM_KEY_PATTERN: Final = described(
    r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}\Z",
    "expected 1-200 letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
)

Slug = Annotated[str, msgspec.Meta(pattern=SLUG_PATTERN)]
Name = Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
IdemKey = Annotated[str, msgspec.Meta(pattern=IDEM_KEY_PATTERN)]


class _Strict(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class TenantCreate(_Strict):
    slug: Slug
    name: Name


class ApiKeyCreate(_Strict):
    name: Name = "default"
    expires_in_seconds: Annotated[int, msgspec.Meta(ge=60, le=10 * 365 * 86400)] | None = None


class SiteCreate(_Strict):
    name: Name
    external_key: Name | None = None


class TokenCreate(_Strict):
    site_id: Uuid
    expires_in_seconds: Annotated[int, msgspec.Meta(ge=1, le=7 * 86400)] | None = None


class PlanAction(_Strict):
    type: Annotated[str, msgspec.Meta(max_length=64)]
    params: dict[str, Any]
    action_id: Ident | None = None
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=86400)] | None = None


class PlanCreate(_Strict):
    idempotency_key: IdemKey
    actions: Annotated[list[PlanAction], msgspec.Meta(min_length=1, max_length=100)]


# --- issue 12: tenant quotas ---------------------------------------------------------------------------------

#: One limit's value: 0 admits nothing more; the ceiling only keeps the numbers sane.
QuotaValue = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
_Limit = QuotaValue | None | msgspec.UnsetType


class QuotaUpdate(_Strict):
    """An admin's change to a tenant's quota.

    A named limit is set, null restores its default, an absent one is left as it is (so that
    ``set-quota --max-sites 5`` does not wipe the other overrides).
    """

    max_sites: _Limit = msgspec.UNSET
    max_agents_per_site: _Limit = msgspec.UNSET
    max_vms_per_agent: _Limit = msgspec.UNSET
    max_concurrent_plans: _Limit = msgspec.UNSET
    max_api_keys: _Limit = msgspec.UNSET

    def changes(self) -> dict[QuotaLimit, int | None]:
        """The limits this body names, with their new value (``None``: back to the default)."""
        out: dict[QuotaLimit, int | None] = {}
        for limit in QuotaLimit:
            value = getattr(self, limit.value)
            if value is not msgspec.UNSET:
                out[limit] = value
        return out
