"""Request bodies of the tenant/admin API (the agent's messages live in ``nkudo.wire``)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from nkudo.wire.actions import IDENT_PATTERN
from nkudo.wire.messages import Uuid

Slug = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Name = Annotated[str, msgspec.Meta(pattern=r"^\S(.{0,198}\S)?$")]
IdemKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")]


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
    action_id: Annotated[str, msgspec.Meta(pattern=IDENT_PATTERN)] | None = None
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=86400)] | None = None


class PlanCreate(_Strict):
    idempotency_key: IdemKey
    actions: Annotated[list[PlanAction], msgspec.Meta(min_length=1, max_length=100)]
