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

from nkudo.cp.auditchain import BreakReason
from nkudo.cp.domain import ActorType, AgentState, Connectivity, PlanStatus
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ActionType, ConsoleState, ExecState, LogLevel

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
    #: Set on a 429 RATE_LIMITED: the route class whose limit was reached (issue 12).
    route_class: str | None = None


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
    #: Issue 13: the cursor of the following page (pass it as ``cursor``); absent on the last page.
    next: str | None = None


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
    #: Issue 13: the cursor of the following page (pass it as ``cursor``); absent on the last page.
    next: str | None = None


class PlanSummaryView(_View):
    """A plan without its executions (issue 13): what a list of plans shows; ``actions`` counts its executions."""

    plan_id: Id
    tenant_id: Id
    site_id: Id
    idempotency_key: str
    plan_status: PlanStatus
    actions: int
    created_at: Timestamp
    updated_at: Timestamp
    completed_at: Timestamp | None
    leased_by_agent_id: Id | None
    lease_expires_at: Timestamp | None


class PlanList(_View):
    """A site's plans, newest first."""

    plans: list[PlanSummaryView]
    #: Issue 13: the cursor of the following page (pass it as ``cursor``); absent on the last page.
    next: str | None = None


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
    #: Issue 13: the same position as a cursor (the last ``seq``; pass it as ``cursor``); absent at the end.
    next: str | None = None


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
    #: Issue 13: the cursor of the following page (pass it as ``cursor``); absent on the last page.
    next: str | None = None


class VmRatesView(_View):
    """Per-second rates between a VM's last two counter reports (issue 15); ``null`` across a reset or a gap.

    ``cpu_cores`` is CPU seconds per second of the VMM (1.0 = one core busy).
    """

    interval_seconds: float
    rx_bytes: float | None
    tx_bytes: float | None
    rx_packets: float | None
    tx_packets: float | None
    rx_drops: float | None
    tx_drops: float | None
    cpu_cores: float | None
    read_bytes: float | None
    write_bytes: float | None


class VmCountersView(_View):
    """A VM's latest kernel counters as its agent reported them (issue 15), cumulative; ``null`` = no source.

    Network is in the VM's direction (``rx`` is what it received), over its TAPs; CPU and block bytes are
    its VMM process's. ``rates`` is present once two reports exist.
    """

    at: Timestamp
    rx_bytes: int | None
    rx_packets: int | None
    rx_drops: int | None
    tx_bytes: int | None
    tx_packets: int | None
    tx_drops: int | None
    cpu_ms: int | None
    read_bytes: int | None
    write_bytes: int | None
    rss_bytes: int | None
    rates: VmRatesView | None = None


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
    counters: VmCountersView | None = None  # issue 15: absent until the VM's agent reports counters


class VmList(_View):
    """A site's VMs as its agents last reported them (deleted ones left out)."""

    vms: list[VmView]
    #: Issue 13: the cursor of the following page (pass it as ``cursor``); absent on the last page.
    next: str | None = None


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
    #: Issue 13: the cursor of the following page (pass it as ``cursor``); absent on the last page.
    next: str | None = None


# --- issue 12 part 2: the audit chain ------------------------------------------------------------------


class AuditChainEventView(_View):
    """An audit event with its place in its chain (``chain`` is the tenant id, or ``global``)."""

    id: int
    chain: str
    seq: int
    tenant_id: Id | None
    actor_type: ActorType
    actor_id: str | None
    action: str
    object_type: str
    object_id: str
    request_id: str | None
    source_ip: str | None
    details: dict[str, Any]
    occurred_at: Timestamp
    prev_hash: str
    entry_hash: str


class AuditEventPage(_View):
    """Audit events, newest first; ``next_before_id`` is the ``before_id`` of the next page (null at the end)."""

    events: list[AuditChainEventView]
    next_before_id: int | None
    #: Issue 13: the cursor of the following page (pass it as ``cursor``); absent on the last page.
    next: str | None = None


class AuditBreakView(_View):
    """The first event of a chain verification cannot trust (``event_id`` null when the event is missing)."""

    chain: str
    seq: int
    event_id: int | None
    reason: BreakReason
    detail: str


class AuditChainView(_View):
    """One chain's verification: its events, head, checkpoints, how far signatures cover it, first break."""

    chain: str
    events: int
    head_seq: int
    checkpoints: int
    signed_seq: int
    unsigned_events: int
    broken: AuditBreakView | None


class AuditVerifyReport(_View):
    """The result of verifying the audit chains: valid only if no chain is broken."""

    valid: bool
    total: int
    chains: list[AuditChainView]
    first_broken: AuditBreakView | None
    verified_at: Timestamp


class AuditCheckpointView(_View):
    """A signed checkpoint: the head (seq, hash) of a chain at a time, signed by the audit key ``key_id``."""

    chain: str
    seq: int
    entry_hash: str
    signed_at: Timestamp
    key_id: str
    signature: str


class AuditCheckpoints(_View):
    """The checkpoints one signing round made (chains whose head had not moved are left out)."""

    checkpoints: list[AuditCheckpointView]


# --- issue 15 part 3: a VM's console tail ---------------------------------------------------------------------


class VmConsoleView(_View):
    """A VM's console tail, shipped by its host's agent on a heartbeat (``state`` says whether it is there yet).

    ``text`` never holds a control character but newline and tab (the agent sanitises it, the wire refuses
    anything else); while ``PENDING``, poll again after ``retry_after_seconds``.
    """

    vm_id: str
    site_id: Id
    host_id: Id | None
    state: ConsoleState
    lines: int
    text: str
    captured_at: Timestamp | None
    retry_after_seconds: int | None = None


# --- issue 12 part 3: tenant quotas ----------------------------------------------------------------------------


class QuotaLimits(_View):
    """A tenant's effective limits (its overrides, else the defaults)."""

    max_sites: int
    max_agents_per_site: int
    max_vms_per_agent: int
    max_concurrent_plans: int
    max_api_keys: int


class QuotaUsage(_View):
    """What counts against the tenant-wide limits now (live API keys; PENDING and IN_PROGRESS plans)."""

    sites: int
    api_keys: int
    concurrent_plans: int


class QuotaView(_View):
    """A tenant's quota: the limits in force, which of them an admin overrode, and current use."""

    tenant_id: Id
    limits: QuotaLimits
    overridden: list[str]
    usage: QuotaUsage


#: Every response body of the tenant/admin API, in the order the OpenAPI document lists them.
VIEWS: Final[tuple[type[msgspec.Struct], ...]] = (
    ErrorResponse, Health, Readiness, TenantView, TenantList, ApiKeyCreated, ApiKeyList, SiteView, SiteList,
    TokenIssued, TokenList, AuditEvents, PlanView, ExecutionView, ExecutionList, ExecutionLogs, HostList, VmList,
    AgentList,
    PlanList,  # issue 13: paging
    AuditEventPage, AuditVerifyReport, AuditCheckpoints,  # issue 12 part 2
    VmConsoleView,  # issue 15 part 3
    QuotaView,  # issue 12 part 3
)
