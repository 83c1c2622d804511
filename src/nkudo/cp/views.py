"""The control plane's HTTP response bodies: one msgspec Struct per body the tenant/admin API answers with.

Why a module of its own: these are the one definition the OpenAPI document's response schemas are
generated from (``python -m nkudo.cp.openapi_gen``), and the API test suite validates every response it
receives against that document, so a body and its documentation cannot drift apart. The agent routes
answer with the wire models of ``nkudo.wire.messages`` (``EnrollResponse``, ``HeartbeatResponse``...),
which stay the one definition of what goes over the network to an agent.

The bytes are those the API has always sent: field order is the JSON key order, timestamps are the
``iso()`` strings (RFC 3339, UTC, ``Z``), a field that is absent when empty (``SiteView.external_key``,
the readiness details) has a ``None`` default and is omitted (``omit_defaults``), and every other field
is always present, ``null`` where the column is. ``forbid_unknown_fields`` makes the generated schemas
say ``additionalProperties: false``, so a key added to a response without its view fails the tests.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, get_args

import msgspec

from nkudo.cp.domain import ActorType, AgentState, Connectivity, PlanStatus
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ActionType, ExecState, LogLevel

#: A timestamp as every response body spells it: ``iso()`` of a UTC datetime (``2024-05-01T12:00:00.5Z``).
Timestamp = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
#: A server-assigned id (a UUID in its canonical lower-case form).
Id = Annotated[str, msgspec.Meta(extra_json_schema={"format": "uuid"})]

#: A host's agent state; ``NONE`` when no agent is enrolled on it. A ``Literal`` because msgspec takes no
#: union of an enum and another string type; checked against ``AgentState`` below so the two cannot drift.
HostAgentState = Literal["ONLINE", "OFFLINE", "UNENROLLED", "NONE"]
if set(get_args(HostAgentState)) != {s.value for s in AgentState} | {"NONE"}:  # pragma: no cover - definition error
    raise AssertionError("HostAgentState must list the AgentState values and NONE")

CheckStatus = Literal["healthy", "unhealthy"]


class _View(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    pass


# --- errors and probes ------------------------------------------------------


class ErrorDetail(_View):
    """What went wrong: a stable code, a sentence, and the offending field when there is one."""

    code: str
    message: str
    field: str | None = None


class ErrorResponse(_View):
    """The body of every response that is not a success."""

    error: ErrorDetail


class Health(_View):
    """Liveness: the process answers (``GET /healthz``)."""

    status: Literal["ok"]
    time: Timestamp


class ReadinessCheck(_View):
    """One dependency of ``/readyz``; only the fields that apply to it (or its ``error``) are present."""

    status: CheckStatus
    latency_ms: float | None = None
    expires_at: Timestamp | None = None
    this_update: Timestamp | None = None
    next_update: Timestamp | None = None
    revoked: int | None = None
    error: str | None = None


class ReadinessChecks(_View):
    database: ReadinessCheck
    ca: ReadinessCheck
    crl: ReadinessCheck


class Readiness(_View):
    """Ready or not; ``checks`` only for a caller that presented the admin key (they help attackers too)."""

    status: Literal["ready", "not ready"]
    checks: ReadinessChecks | None = None


# --- tenants, API keys, sites, enrollment tokens ----------------------------


class TenantView(_View):
    id: Id
    slug: str
    name: str
    created_at: Timestamp


class TenantList(_View):
    """The admin sees every tenant, an API key only its own."""

    tenants: list[TenantView]


class ApiKeyCreated(_View):
    """A new API key: ``api_key`` is the plaintext, returned this once and stored only hashed."""

    id: Id
    tenant_id: Id
    name: str
    api_key: str
    created_at: Timestamp
    expires_at: Timestamp | None


class ApiKeyView(_View):
    id: Id
    tenant_id: Id
    name: str
    created_at: Timestamp
    expires_at: Timestamp | None


class ApiKeyList(_View):
    """The tenant's keys that are not revoked (never their secret)."""

    api_keys: list[ApiKeyView]


class SiteView(_View):
    id: Id
    tenant_id: Id
    name: str
    connectivity_state: Connectivity
    created_at: Timestamp
    #: Absent (not null) when the site has none.
    external_key: str | None = None


class SiteList(_View):
    sites: list[SiteView]


class TokenIssued(_View):
    """A new single-use enrollment token: ``token`` is the plaintext, returned this once."""

    token_id: Id
    site_id: Id
    token: str
    expires_at: Timestamp
    one_time: bool


class TokenView(_View):
    id: Id
    site_id: Id
    site_name: str
    created_at: Timestamp
    expires_at: Timestamp
    consumed: bool
    consumed_at: Timestamp | None
    consumed_by_agent_id: Id | None


class TokenList(_View):
    tokens: list[TokenView]


class AuditEventView(_View):
    id: int
    tenant_id: Id
    actor_type: ActorType
    actor_id: str | None
    action: str
    object_type: str
    object_id: str
    request_id: str | None
    source_ip: str | None
    details: dict[str, Any]
    occurred_at: Timestamp


class AuditEvents(_View):
    """A tenant's audit events, newest first."""

    events: list[AuditEventView]


# --- plans and executions ---------------------------------------------------


class ExecutionView(_View):
    """One action of a plan and where it stands."""

    id: Id
    plan_id: Id
    tenant_id: Id
    site_id: Id
    position: int
    action_id: str
    type: ActionType
    params: dict[str, Any]
    timeout_seconds: int
    vm_id: str | None
    state: ExecState
    agent_id: Id | None
    attempts: int
    error_code: str | None
    error_message: str | None
    created_at: Timestamp
    updated_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None


class PlanView(_View):
    """A plan with its executions in order; ``deduplicated`` when an earlier identical submission is returned."""

    plan_id: Id
    tenant_id: Id
    site_id: Id
    idempotency_key: str
    plan_status: PlanStatus
    deduplicated: bool
    created_at: Timestamp
    updated_at: Timestamp
    completed_at: Timestamp | None
    leased_by_agent_id: Id | None
    lease_expires_at: Timestamp | None
    executions: list[ExecutionView]


class ExecutionList(_View):
    """A site's executions, newest first."""

    executions: list[ExecutionView]


class LogEntryView(_View):
    seq: int
    level: LogLevel
    message: str
    emitted_at: Timestamp
    ingested_at: Timestamp


class ExecutionLogs(_View):
    """Log lines with ``seq > after_seq``, ascending; ``next_after_seq`` is set when more may follow."""

    execution_id: Id
    logs: list[LogEntryView]
    next_after_seq: int | None


# --- inventory --------------------------------------------------------------


class HostView(_View):
    id: Id
    tenant_id: Id
    site_id: Id
    hostname: str
    facts: dict[str, Any] | None
    fingerprint: dict[str, Any]
    agent_id: Id | None
    agent_state: HostAgentState
    agent_last_heartbeat_at: Timestamp | None
    last_facts_at: Timestamp | None
    created_at: Timestamp


class HostList(_View):
    hosts: list[HostView]


class VmView(_View):
    vm_id: str
    tenant_id: Id
    site_id: Id
    host_id: Id | None
    name: str
    state: VmStatus
    vcpus: int
    memory_mib: int
    updated_at: Timestamp
    last_transition_at: Timestamp | None


class VmList(_View):
    """A site's VMs as its agents last reported them (deleted ones left out)."""

    vms: list[VmView]


class AgentStatusView(_View):
    """An enrolled agent of a site (current or past) and its health."""

    id: Id
    site_id: Id
    host_id: Id
    hostname: str
    state: AgentState
    agent_version: str
    enrolled_at: Timestamp
    last_heartbeat_at: Timestamp | None
    cert_expires_at: Timestamp | None


class AgentList(_View):
    agents: list[AgentStatusView]


#: Every response body of the tenant/admin API, in the order the OpenAPI document lists them.
VIEWS: Final[tuple[type[msgspec.Struct], ...]] = (
    ErrorResponse, Health, Readiness, TenantView, TenantList, ApiKeyCreated, ApiKeyList, SiteView, SiteList,
    TokenIssued, TokenList, AuditEvents, PlanView, ExecutionView, ExecutionList, ExecutionLogs, HostList, VmList,
    AgentList,
)
