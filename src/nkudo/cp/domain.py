"""Pure decisions of the control plane: state machines and authorisation.

Nothing here knows about HTTP, SQL or certificates' encodings; the service
layer feeds plain values in and applies the answers. That keeps every rule
(who may call what, which transitions are legal, what a plan's status is)
testable in microseconds and identical for SQLite and PostgreSQL.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime


class ExecState(enum.StrEnum):
    PENDING = "PENDING"
    LEASED = "LEASED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"


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


def result_transition(current: ExecState, reported: ExecState, holder_matches: bool) -> str:
    """Outcome of an agent's result report for one execution.

    ``accepted``: apply it. ``duplicate``: the same terminal state was already
    recorded (redelivery — answer success, change nothing). ``rejected``: the
    execution is not leased to this agent any more, or already finished
    differently.
    """
    if current in TERMINAL:
        return "duplicate" if current == reported and holder_matches else "rejected"
    if not holder_matches or current not in ACTIVE:
        return "rejected"
    return "accepted"


_VM_ON_SUCCESS = {
    "MicroVMStart": "RUNNING",
    "MicroVMResume": "RUNNING",
    "MicroVMStop": "STOPPED",
    "MicroVMPause": "PAUSED",
    "MicroVMDelete": "DELETED",
}


def vm_state_after(action_type: str, status: ExecState, start: bool = True) -> str | None:
    """The VM state an execution result implies (``None``: leave the VM record as it is)."""
    if action_type == "MicroVMCreate":
        if status == ExecState.SUCCEEDED:
            return "RUNNING" if start else "STOPPED"
        if status in (ExecState.FAILED, ExecState.TIMED_OUT):
            return "ERROR"
        return None
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


def tenant_visible(principal_tenant: str | None, object_tenant: str) -> bool:
    """Admin (``None``) sees every tenant; a tenant key sees only its own objects."""
    return principal_tenant is None or principal_tenant == object_tenant
