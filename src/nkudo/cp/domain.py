"""Pure decisions of the control plane: state machines and authorisation.

Nothing here knows about HTTP, SQL or certificates' encodings; the service
layer feeds plain values in and applies the answers. That keeps every rule
(who may call what, which transitions are legal, what a plan's status is)
testable in microseconds and identical for SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Final

from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ActionType
from nkudo.wire.vocab import ExecState as ExecState  # defined once in the shared vocabulary (issue 11)


class PlanStatus(enum.StrEnum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class AgentState(enum.StrEnum):
    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"
    UNENROLLED = "UNENROLLED"


class Connectivity(enum.StrEnum):
    """A site's connectivity: ONLINE while at least one of its agents is."""

    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"


class PrincipalKind(enum.StrEnum):
    ADMIN = "admin"
    API_KEY = "api_key"
    USER = "user"  # issue 13: a dashboard user acting in one tenant with its membership's role


class ActorType(enum.StrEnum):
    """Who an audit event names as its actor."""

    ADMIN = "ADMIN"
    API_KEY = "API_KEY"
    AGENT = "AGENT"
    SYSTEM = "SYSTEM"
    USER = "USER"


class Role(enum.StrEnum):
    """A user's role in one tenant (issue 13): what its membership lets it do there."""

    OWNER = "owner"
    OPERATOR = "operator"
    VIEWER = "viewer"


class Permission(enum.StrEnum):
    """What a write (or read) needs: checked once per use case by ``usecases.common.require``."""

    READ = "read"
    OPERATE = "operate"  # submit and cancel plans, VM actions
    ENROLL = "enroll"  # issue enrollment tokens
    MANAGE = "manage"  # sites, API keys, users, invitations, other users' sessions


_ROLE_PERMISSIONS: Final[Mapping[Role, frozenset[Permission]]] = MappingProxyType({
    Role.OWNER: frozenset(Permission),
    Role.OPERATOR: frozenset({Permission.READ, Permission.OPERATE, Permission.ENROLL}),
    Role.VIEWER: frozenset({Permission.READ}),
})


def role_allows(role: Role, perm: Permission) -> bool:
    """Whether ``role`` grants ``perm``: owners everything, operators run work and enroll, viewers read."""
    return perm in _ROLE_PERMISSIONS[role]


def keeps_an_owner(owners: int, old: Role | None, new: Role | None) -> bool:
    """Whether changing one membership from ``old`` to ``new`` (``None``: none) leaves a tenant that has
    ``owners`` owners with at least one: an owner-less tenant could no longer manage its members or keys
    (a tenant that never had an owner, managed by the admin, may stay so)."""
    if owners == 0 or old != Role.OWNER or new == Role.OWNER:
        return True
    return owners > 1


class ResultDecision(enum.StrEnum):
    """What becomes of one reported result (the wire's ``ResultOutcome.outcome``)."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


TERMINAL = frozenset({ExecState.SUCCEEDED, ExecState.FAILED, ExecState.TIMED_OUT, ExecState.CANCELLED})
ACTIVE = frozenset({ExecState.LEASED, ExecState.RUNNING})
TERMINAL_PLAN = frozenset({PlanStatus.SUCCEEDED, PlanStatus.FAILED, PlanStatus.CANCELLED})

_ALLOWED: dict[ExecState, frozenset[ExecState]] = {
    ExecState.PENDING: frozenset({ExecState.LEASED, ExecState.CANCELLED}),
    # LEASED -> PENDING is a lease given back (unenroll); LEASED -> LEASED is a re-offer.
    ExecState.LEASED: frozenset(
        {ExecState.LEASED, ExecState.PENDING, ExecState.RUNNING, ExecState.CANCELLED} | TERMINAL
    ),
    ExecState.RUNNING: frozenset({ExecState.RUNNING, ExecState.LEASED, ExecState.PENDING} | TERMINAL),
}


def can_transition(src: ExecState, dst: ExecState) -> bool:
    """Whether an execution may move from ``src`` to ``dst`` (terminal states are final)."""
    return dst in _ALLOWED.get(src, frozenset())


def plan_status(states: Iterable[ExecState]) -> PlanStatus:
    """Derive a plan's status from its executions' states.

    Terminal only when every execution is terminal; FAILED if any action failed
    or timed out, CANCELLED if some were cancelled (and none failed), SUCCEEDED
    if all succeeded. Otherwise PENDING until something was leased, then
    IN_PROGRESS.
    """
    s = list(states)
    if not s:
        return PlanStatus.SUCCEEDED
    if all(x in TERMINAL for x in s):
        if any(x in (ExecState.FAILED, ExecState.TIMED_OUT) for x in s):
            return PlanStatus.FAILED
        if any(x == ExecState.CANCELLED for x in s):
            return PlanStatus.CANCELLED
        return PlanStatus.SUCCEEDED
    if all(x == ExecState.PENDING for x in s):
        return PlanStatus.PENDING
    return PlanStatus.IN_PROGRESS


def result_transition(current: ExecState, reported: ExecState, holder_matches: bool) -> ResultDecision:
    """Outcome of an agent's result report for one execution.

    ``accepted``: apply it. ``duplicate``: the same terminal state was already
    recorded (redelivery — answer success, change nothing). ``rejected``: the
    execution is not leased to this agent any more, or already finished
    differently.
    """
    if current in TERMINAL:
        return ResultDecision.DUPLICATE if current == reported and holder_matches else ResultDecision.REJECTED
    if not holder_matches or current not in ACTIVE:
        return ResultDecision.REJECTED
    return ResultDecision.ACCEPTED


def rejection_code(decision: ResultDecision, holder_matches: bool) -> str | None:
    """The code a non-accepted result is answered with: none for a duplicate (it is a success)."""
    if decision != ResultDecision.REJECTED:
        return None
    return "ALREADY_FINISHED" if holder_matches else "LEASE_LOST"


def result_error(reported: ExecState, error_code: str | None, message: str | None) -> tuple[str | None, str | None]:
    """The (error_code, error_message) stored for a reported state: none on success, a default otherwise."""
    if reported == ExecState.SUCCEEDED:
        return None, None
    code = error_code or ("TIMED_OUT" if reported == ExecState.TIMED_OUT else "ACTION_FAILED")
    return code, message or "action failed"


def create_starts_vm(action_type: str, params: dict[str, object]) -> bool:
    """Whether a successful action leaves its VM running: ``MicroVMCreate``/``MicroVMRestore`` with ``start: false`` do not."""
    if action_type in (ActionType.MICROVM_CREATE, ActionType.MICROVM_RESTORE):
        return bool(params.get("start", True))
    return True


_VM_ON_SUCCESS: dict[str, VmStatus] = {
    ActionType.MICROVM_START: VmStatus.RUNNING,
    ActionType.MICROVM_RESUME: VmStatus.RUNNING,
    ActionType.MICROVM_STOP: VmStatus.STOPPED,
    ActionType.MICROVM_PAUSE: VmStatus.PAUSED,
    ActionType.MICROVM_DELETE: VmStatus.DELETED,
}


def vm_state_after(action_type: str, status: ExecState, start: bool = True) -> VmStatus | None:
    """The VM state an execution result implies (``None``: leave the VM record as it is)."""
    if action_type == ActionType.MICROVM_CREATE:
        if status == ExecState.SUCCEEDED:
            return VmStatus.RUNNING if start else VmStatus.STOPPED
        if status in (ExecState.FAILED, ExecState.TIMED_OUT):
            return VmStatus.ERROR
        return None
    if action_type == ActionType.MICROVM_RESTORE and status == ExecState.SUCCEEDED:
        return VmStatus.RUNNING if start else VmStatus.PAUSED  # a restored VM is left paused without start
    if status == ExecState.SUCCEEDED:
        return _VM_ON_SUCCESS.get(action_type)
    return None


@dataclass(frozen=True, slots=True)
class AgentView:
    """What authorisation needs to know about an agent row."""

    agent_id: str
    state: str
    cert_serial: str | None
    prev_cert_serial: str | None
    prev_serial_valid_until: datetime | None


def authorize_agent(agent: AgentView | None, cn: str, serial: str, now: datetime) -> tuple[str, str] | None:
    """Decide whether a verified client certificate may act as ``agent``.

    Returns ``None`` when allowed, else ``(code, message)``. The certificate
    chain was verified by TLS; here we check the certificate is the agent's
    *current* one (or the previous one inside the renewal grace window), which
    also makes every earlier or revoked certificate useless.
    """
    if agent is None or agent.agent_id != cn:
        return ("UNKNOWN_AGENT", "certificate does not belong to a known agent")
    if agent.state == AgentState.UNENROLLED:
        return ("AGENT_UNENROLLED", "agent is unenrolled")
    if agent.cert_serial and serial == agent.cert_serial:
        return None
    if (
        agent.prev_cert_serial
        and serial == agent.prev_cert_serial
        and agent.prev_serial_valid_until is not None
        and now < agent.prev_serial_valid_until
    ):
        return None
    return ("CERTIFICATE_REVOKED", "certificate is no longer valid for this agent")


def heartbeat_is_quiet(*, state: str, has_work: bool, wants_lease: bool, has_updates: bool, vm_digest: str,
                       stored_vm_digest: str | None, facts_digest: str | None, stored_facts_digest: str | None,
                       agent_version: str | None, stored_agent_version: str | None) -> bool:
    """Whether a heartbeat changes nothing but "last seen" (so it is buffered, not written).

    Quiet means: the agent is ONLINE, there is no work it would lease, no execution update, and the VMs,
    facts (when sent) and agent version (when sent) are what is stored.
    """
    return (
        state == AgentState.ONLINE and (not has_work or not wants_lease) and not has_updates
        and vm_digest == stored_vm_digest and (facts_digest is None or facts_digest == stored_facts_digest)
        and (not agent_version or agent_version == stored_agent_version)
    )


def site_connectivity(any_agent_online: bool) -> Connectivity:
    return Connectivity.ONLINE if any_agent_online else Connectivity.OFFLINE


class RevocationReason(enum.StrEnum):
    """RFC 5280 CRL reason codes the control plane records (spelt as ``x509.ReasonFlags`` values)."""

    KEY_COMPROMISE = "keyCompromise"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"


def revocation_reason(unenroll_reason: str | None) -> RevocationReason:
    """The RFC 5280 reason recorded when an agent unenrolls.

    A compromised key says so (relying parties may distrust what it signed before); anything else
    (``retired``, ``decommissioned``...) is a normal end of service.
    """
    if unenroll_reason == "compromised":
        return RevocationReason.KEY_COMPROMISE
    return RevocationReason.CESSATION_OF_OPERATION


# --- tenant quotas (issue 12) -------------------------------------------------------------------------


class QuotaLimit(enum.StrEnum):
    """The per-tenant limits; the value is the field name an API body, the CLI and the error name it by."""

    SITES = "max_sites"
    AGENTS_PER_SITE = "max_agents_per_site"
    VMS_PER_AGENT = "max_vms_per_agent"
    CONCURRENT_PLANS = "max_concurrent_plans"
    API_KEYS = "max_api_keys"


#: The limits of a tenant without an override. Generous on purpose: they stop a runaway script or a
#: compromised key from exhausting a shared control plane, not normal use (the benchmarks run 100 agents on
#: one site, 1,000 concurrent plans and 48 agents with 20 VMs each under them).
DEFAULT_QUOTAS: Final[Mapping[QuotaLimit, int]] = MappingProxyType({
    QuotaLimit.SITES: 1000,
    QuotaLimit.AGENTS_PER_SITE: 1000,
    QuotaLimit.VMS_PER_AGENT: 500,
    QuotaLimit.CONCURRENT_PLANS: 10000,
    QuotaLimit.API_KEYS: 100,
})


def effective_quotas(overrides: Mapping[QuotaLimit, int | None]) -> dict[QuotaLimit, int]:
    """Each limit: the admin's override where there is one, else the default."""
    out = dict(DEFAULT_QUOTAS)
    for limit, value in overrides.items():
        if value is not None:
            out[limit] = value
    return out


@dataclass(frozen=True, slots=True)
class QuotaBreach:
    """A refused change: which limit, its value, and a sentence for the operator."""

    limit: QuotaLimit
    allowed: int
    message: str


def quota_breach(limit: QuotaLimit, allowed: int, used: int, adding: int = 1) -> QuotaBreach | None:
    """``None`` when ``used + adding`` stays within ``allowed``, else what was exceeded.

    Exactly at the limit is allowed (a limit of 3 admits the third site, refuses the fourth).
    """
    if used + adding <= allowed:
        return None
    return QuotaBreach(limit, allowed, f"tenant quota {limit.value} ({allowed}) would be exceeded: "
                                       f"{used} in use, {adding} more requested")


def projected_vms(existing: Set[str], pending_creates: Set[str], creates: Set[str], deletes: Set[str]) -> int:
    """VMs a site would hold once a plan ran: those reported and those pending plans will create, less the
    plan's deletes, plus the plan's creates (ids, so re-creating a known VM counts once)."""
    return len(((existing | pending_creates) - deletes) | creates)


def vm_quota_breach(per_agent: int, agents: int, existing: Set[str], pending_creates: Set[str],
                    creates: Set[str], deletes: Set[str]) -> QuotaBreach | None:
    """Whether a plan's VM creations exceed ``max_vms_per_agent``.

    A plan is leased whole by one agent of its site, so the plan alone may not create more than one agent
    may hold; and the site as a whole may hold ``per_agent`` VMs for each of its enrolled agents (at least
    one: a plan can be queued before the site's first agent enrolls).
    """
    limit = QuotaLimit.VMS_PER_AGENT
    if len(creates) > per_agent:
        return QuotaBreach(limit, per_agent, f"tenant quota {limit.value} ({per_agent}) would be exceeded: "
                                             f"the plan creates {len(creates)} VMs and runs on one agent")
    allowed = per_agent * max(1, agents)
    total = projected_vms(existing, pending_creates, creates, deletes)
    if total <= allowed:
        return None
    return QuotaBreach(limit, per_agent, f"tenant quota {limit.value} ({per_agent}) would be exceeded: the site "
                                         f"would hold {total} VMs for {max(1, agents)} agent(s) ({allowed} allowed)")


def crl_is_current(cached_revoked: object, revoked: object, now: datetime, refresh_at: datetime) -> bool:
    """A signed CRL is reused while the revoked set is unchanged and half its validity has not passed."""
    return cached_revoked == revoked and now < refresh_at


def next_crl_number(now: datetime, previous: int | None) -> int:
    """CRL numbers must increase: milliseconds since the epoch do across restarts and replicas."""
    return max(int(now.timestamp() * 1000), (previous + 1) if previous is not None else 0)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else ``None``."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token if scheme.lower() == "bearer" else None


def tenant_visible(principal_tenant: str | None, object_tenant: str) -> bool:
    """Admin (``None``) sees every tenant; a tenant key sees only its own objects."""
    return principal_tenant is None or principal_tenant == object_tenant


# --- issue 13: read models (site health, host facts summary, VM state history) ---------------------------


class SiteHealth(enum.StrEnum):
    """A site's health for the dashboard: more than connectivity, so a half-broken site is not "ONLINE"."""

    ONLINE = "ONLINE"
    DEGRADED = "DEGRADED"
    OFFLINE = "OFFLINE"
    EMPTY = "EMPTY"  # no agent enrolled yet: nothing can be offline


class VmStateSource(enum.StrEnum):
    """What recorded a VM state change: an agent's heartbeat or an action's result."""

    HEARTBEAT = "heartbeat"
    EXECUTION = "execution"


#: VM states that make a site DEGRADED: the VMM died unasked, or a process is not provably the VM's.
_UNHEALTHY_VM: Final = (VmStatus.CRASHED, VmStatus.UNKNOWN)


def site_health(agents_online: int, agents_total: int, vm_states: Mapping[str, int]
                ) -> tuple[SiteHealth, list[str]]:
    """A site's health and the plain-text reasons for it (the templates escape them).

    ``agents_total`` counts enrolled agents (online or offline, not unenrolled); ``vm_states`` is VMs per
    state. No agent -> EMPTY; none online -> OFFLINE; some offline or any VM CRASHED/UNKNOWN -> DEGRADED,
    with one reason per cause; otherwise ONLINE. Why reasons: "DEGRADED" alone sends the operator hunting.
    """
    if agents_total <= 0:
        return SiteHealth.EMPTY, []
    if agents_online <= 0:
        return SiteHealth.OFFLINE, [f"all {agents_total} agent{'s' if agents_total != 1 else ''} offline"]
    reasons: list[str] = []
    if agents_online < agents_total:
        reasons.append(f"{agents_total - agents_online} of {agents_total} agents offline")
    for state in _UNHEALTHY_VM:
        n = vm_states.get(state.value, 0)
        if n > 0:
            reasons.append(f"{n} VM{'s' if n != 1 else ''} {state.value}")
    return (SiteHealth.DEGRADED if reasons else SiteHealth.ONLINE), reasons


@dataclass(frozen=True, slots=True)
class FactsSummary:
    """The few host facts an operator scans for: CPU, memory, disk, and whether VMs can run at all."""

    cpu_cores: int
    memory_total_bytes: int
    disk_total_bytes: int
    disk_free_bytes: int
    kvm_available: bool
    cloud_hypervisor_available: bool


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def facts_summary(facts: Mapping[str, object] | None) -> FactsSummary | None:
    """Summarise the stored host facts (``wire.messages.HostFacts`` as JSON); ``None`` before the first report.

    Disk is the sum over the reported mounts (``storage_total_bytes`` when no mount is listed). Tolerant of
    missing or odd values (rows written by older agents): a fact that is not a count reads as 0.
    """
    if facts is None:
        return None
    disks = facts.get("disks")
    mounts = [d for d in disks if isinstance(d, Mapping)] if isinstance(disks, list) else []
    total = sum(_count(d.get("total_bytes")) for d in mounts) if mounts else _count(facts.get("storage_total_bytes"))
    return FactsSummary(
        cpu_cores=_count(facts.get("cpu_cores")), memory_total_bytes=_count(facts.get("memory_total_bytes")),
        disk_total_bytes=total, disk_free_bytes=sum(_count(d.get("free_bytes")) for d in mounts),
        kvm_available=facts.get("kvm_available") is True,
        cloud_hypervisor_available=facts.get("cloud_hypervisor_available") is True,
    )


def vm_state_changes(stored: Mapping[str, str], reported: Iterable[tuple[str, str]]) -> list[tuple[str, str, str | None]]:
    """``(vm_id, new_state, previous_state)`` for each reported VM whose state differs from the stored one.

    A VM not stored yet is a change from ``None`` (its first appearance is history too); a VM reported twice
    counts once, as its last report.
    """
    last = dict(reported)
    return [(vm, state, stored.get(vm)) for vm, state in last.items() if stored.get(vm) != state]


#: The overview's certificate horizon (issue 13: "certificates expiring within 7 days").
CERT_WARNING_HORIZON: Final = _dt.timedelta(days=7)
#: Agents renew at two thirds of a certificate's lifetime (agent/identity.py), so a third is left when all is
#: well; below this fraction the renewal is overdue.
CERT_OVERDUE_FRACTION: Final = 0.3


def cert_warning_window(lifetime: _dt.timedelta) -> _dt.timedelta:
    """How close to expiry an agent certificate must be to be listed as expiring.

    Why not simply 7 days: agent certificates live 24 h by default and are renewed at two thirds of that, so
    every healthy agent is always within 7 days of expiry and a plain 7-day list names them all. The window is
    7 days, or for shorter-lived certificates the part of the lifetime an agent only reaches when its renewal
    is overdue (30 %: a 24 h certificate is listed with under 7.2 h left, 2.4 h after it should have renewed).
    """
    return min(CERT_WARNING_HORIZON, lifetime * CERT_OVERDUE_FRACTION)
