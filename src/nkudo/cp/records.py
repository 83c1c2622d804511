"""Typed records that cross the control plane's module boundaries (instead of ``dict[str, Any]`` and rows).

Why dataclasses with slots: they are the cheapest typed record to build per request, and a record names
its fields, so a renamed column breaks mypy instead of a response. Response *bodies* are the view Structs;
these are the values use cases pass each other and the HTTP layer passes in.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Row

from nkudo.cp.domain import ActorType, AgentState, ExecState, Permission, PrincipalKind, Role, role_allows
from nkudo.cp.pki import RevokedEntry


def iso(v: dt.datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``, the one time format of every response body."""
    return None if v is None else v.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did something, as the audit log records it."""

    type: ActorType
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who calls a tenant route: the admin (every tenant), an API key or a dashboard user (one tenant).

    ``role`` limits what a tenant principal may change (issue 13); ``None`` on an API key keeps the JSON
    API's meaning of a tenant key (full access to its tenant). ``user_id`` names a dashboard user, also on
    the admin-equivalent principal of an admin user, so the audit log names the person, not "the admin".
    """

    kind: PrincipalKind
    tenant_id: str | None = None
    key_id: str | None = None
    user_id: str | None = None
    role: Role | None = None

    @property
    def is_admin(self) -> bool:
        """The admin key or an admin user: what the admin-only operations (``require_admin``) accept, and
        so what the dashboard asks before it offers one of them."""
        return self.kind == PrincipalKind.ADMIN

    @property
    def actor(self) -> Actor:
        if self.user_id is not None:
            return Actor(ActorType.USER, self.user_id)
        return Actor(ActorType.ADMIN) if self.kind == PrincipalKind.ADMIN else Actor(ActorType.API_KEY, self.key_id)

    def allows(self, perm: Permission) -> bool:
        """Whether this principal may do what needs ``perm`` (the admin and role-less API keys may do all)."""
        if self.kind == PrincipalKind.ADMIN:
            return True
        if self.role is None:
            return self.kind == PrincipalKind.API_KEY
        return role_allows(self.role, perm)


@dataclass(frozen=True, slots=True)
class RequestInfo:
    request_id: str | None = None
    source_ip: str | None = None


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """The verified client certificate's identity (CN and serial in canonical hex)."""

    cn: str
    serial: str


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit event, written in the transaction of the change it records."""

    actor: Actor
    action: str
    tenant_id: str | None
    object_type: str
    object_id: str
    details: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An authorised agent's row as the agent-side use cases need it (read inside their transaction)."""

    id: str
    tenant_id: str
    site_id: str
    host_id: str
    state: AgentState
    cert_serial: str | None
    refresh_token_hash: str | None
    heartbeat_seq: int
    agent_version: str
    vm_digest: str | None
    facts_digest: str | None
    has_work: bool

    @classmethod
    def of(cls, r: Row[Any]) -> AgentRecord:
        return cls(id=r.id, tenant_id=r.tenant_id, site_id=r.site_id, host_id=r.host_id, state=AgentState(r.state),
                   cert_serial=r.cert_serial, refresh_token_hash=r.refresh_token_hash,
                   heartbeat_seq=r.heartbeat_seq, agent_version=r.agent_version, vm_digest=r.vm_digest,
                   facts_digest=r.facts_digest, has_work=bool(getattr(r, "has_work", True)))


@dataclass(frozen=True, slots=True)
class Scope:
    """A visible tenant-owned object (tenant, site or plan): its id and owning tenant."""

    id: str
    tenant_id: str


@dataclass(frozen=True, slots=True)
class ActionSpec:
    """One validated plan action, in the form it is stored and digested."""

    action_id: str
    type: str
    params: Any
    timeout_seconds: int
    vm_id: str | None

    def as_list(self) -> list[Any]:
        """The digest form (the original digested these five values as a list, in this order)."""
        return [self.action_id, self.type, self.params, self.timeout_seconds, self.vm_id]


@dataclass(frozen=True, slots=True)
class ExecutionRecord:
    """An execution an agent reports a result for."""

    id: str
    plan_id: str
    tenant_id: str
    site_id: str
    position: int
    action_id: str
    action_type: str
    params: dict[str, Any]
    vm_id: str | None
    state: ExecState
    agent_id: str | None

    @classmethod
    def of(cls, r: Row[Any]) -> ExecutionRecord:
        return cls(id=r.id, plan_id=r.plan_id, tenant_id=r.tenant_id, site_id=r.site_id, position=r.position,
                   action_id=r.action_id, action_type=r.action_type, params=r.params, vm_id=r.vm_id,
                   state=ExecState(r.state), agent_id=r.agent_id)


@dataclass(frozen=True, slots=True)
class CrlState:
    """The current signed CRL and the revoked set it was signed for."""

    revoked: list[RevokedEntry]
    der: bytes
    pem: bytes
    number: int
    this_update: dt.datetime
    next_update: dt.datetime
    refresh_at: dt.datetime


def stamp(v: dt.datetime) -> str:
    """``iso`` of a timestamp that is never null."""
    return v.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
