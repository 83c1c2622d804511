"""Pure rules: plan status rollup, execution transitions, result outcomes, agent authorisation."""

from __future__ import annotations

import datetime as dt

import pytest

from nkudo.cp.domain import (
    AgentView,
    Connectivity,
    ExecState,
    PlanStatus,
    ResultDecision,
    authorize_agent,
    bearer_token,
    can_transition,
    create_starts_vm,
    crl_is_current,
    heartbeat_is_quiet,
    next_crl_number,
    plan_status,
    rejection_code,
    result_error,
    result_transition,
    revocation_reason,
    site_connectivity,
    tenant_visible,
    vm_state_after,
)

E = ExecState


@pytest.mark.parametrize(("states", "status"), [
    ([E.PENDING, E.PENDING], PlanStatus.PENDING),
    ([E.LEASED, E.PENDING], PlanStatus.IN_PROGRESS),
    ([E.SUCCEEDED, E.PENDING], PlanStatus.IN_PROGRESS),
    ([E.SUCCEEDED, E.SUCCEEDED], PlanStatus.SUCCEEDED),
    ([E.SUCCEEDED, E.FAILED, E.CANCELLED], PlanStatus.FAILED),
    ([E.TIMED_OUT, E.CANCELLED], PlanStatus.FAILED),
    ([E.CANCELLED, E.CANCELLED], PlanStatus.CANCELLED),
    ([E.SUCCEEDED, E.CANCELLED], PlanStatus.CANCELLED),
    ([E.FAILED, E.RUNNING], PlanStatus.IN_PROGRESS),  # not terminal until everything is
])
def test_plan_status(states: list[ExecState], status: PlanStatus) -> None:
    assert plan_status(states) == status


def test_terminal_states_are_final() -> None:
    for src in (E.SUCCEEDED, E.FAILED, E.TIMED_OUT, E.CANCELLED):
        assert not any(can_transition(src, dst) for dst in E)
    assert can_transition(E.PENDING, E.LEASED) and not can_transition(E.PENDING, E.SUCCEEDED)
    assert can_transition(E.LEASED, E.RUNNING) and can_transition(E.RUNNING, E.TIMED_OUT)


def test_result_outcomes() -> None:
    assert result_transition(E.LEASED, E.SUCCEEDED, True) == "accepted"
    assert result_transition(E.RUNNING, E.FAILED, True) == "accepted"
    assert result_transition(E.RUNNING, E.SUCCEEDED, False) == "rejected"  # lease lost
    assert result_transition(E.SUCCEEDED, E.SUCCEEDED, True) == "duplicate"  # redelivery
    assert result_transition(E.SUCCEEDED, E.FAILED, True) == "rejected"
    assert result_transition(E.PENDING, E.SUCCEEDED, True) == "rejected"  # never leased


def test_vm_state_after() -> None:
    assert vm_state_after("MicroVMCreate", E.SUCCEEDED, start=True) == "RUNNING"
    assert vm_state_after("MicroVMCreate", E.SUCCEEDED, start=False) == "STOPPED"
    assert vm_state_after("MicroVMCreate", E.FAILED) == "ERROR"
    assert vm_state_after("MicroVMStop", E.FAILED) is None  # a failed stop says nothing about the VM
    assert vm_state_after("MicroVMPause", E.SUCCEEDED) == "PAUSED"
    assert vm_state_after("MicroVMDelete", E.SUCCEEDED) == "DELETED"
    assert vm_state_after("MicroVMSnapshot", E.SUCCEEDED) is None


def test_authorize_agent() -> None:
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    a = AgentView("ag", "ONLINE", "cur", "old", now + dt.timedelta(seconds=5))
    assert authorize_agent(a, "ag", "cur", now) is None
    assert authorize_agent(a, "ag", "old", now) is None
    assert authorize_agent(a, "ag", "old", now + dt.timedelta(seconds=6)) == (
        "CERTIFICATE_REVOKED", "certificate is no longer valid for this agent")
    assert authorize_agent(a, "other", "cur", now)[0] == "UNKNOWN_AGENT"  # type: ignore[index]
    assert authorize_agent(None, "ag", "cur", now)[0] == "UNKNOWN_AGENT"  # type: ignore[index]
    gone = AgentView("ag", "UNENROLLED", None, None, None)
    assert authorize_agent(gone, "ag", "cur", now)[0] == "AGENT_UNENROLLED"  # type: ignore[index]
    offline = AgentView("ag", "OFFLINE", "cur", None, None)
    assert authorize_agent(offline, "ag", "cur", now) is None  # offline agents come back by heartbeating


def test_tenant_visible() -> None:
    assert tenant_visible(None, "t1") and tenant_visible("t1", "t1") and not tenant_visible("t2", "t1")


# --- rules moved out of the service in issue 11 (decided without a database) --------------------------


def test_result_decision_is_typed_and_names_its_code() -> None:
    """Issue 11: the result outcome is an enum, and the rejection code is a pure rule."""
    assert result_transition(E.LEASED, E.SUCCEEDED, True) is ResultDecision.ACCEPTED
    assert rejection_code(ResultDecision.ACCEPTED, True) is None
    assert rejection_code(ResultDecision.DUPLICATE, True) is None  # a redelivery is a success
    assert rejection_code(ResultDecision.REJECTED, False) == "LEASE_LOST"
    assert rejection_code(ResultDecision.REJECTED, True) == "ALREADY_FINISHED"


def test_result_error_defaults() -> None:
    """Issue 11: what error code and message a reported result stores."""
    assert result_error(E.SUCCEEDED, "X", "ignored") == (None, None)
    assert result_error(E.FAILED, None, None) == ("ACTION_FAILED", "action failed")
    assert result_error(E.TIMED_OUT, None, None) == ("TIMED_OUT", "action failed")
    assert result_error(E.FAILED, "VM_NOT_FOUND", "no such vm") == ("VM_NOT_FOUND", "no such vm")


def test_create_starts_vm() -> None:
    assert create_starts_vm("MicroVMCreate", {}) and create_starts_vm("MicroVMCreate", {"start": True})
    assert not create_starts_vm("MicroVMCreate", {"start": False})
    assert create_starts_vm("MicroVMStop", {"start": False})  # only a create's params decide


_QUIET = dict(state="ONLINE", has_work=False, wants_lease=True, has_updates=False, vm_digest="v",
              stored_vm_digest="v", facts_digest=None, stored_facts_digest="f", agent_version="",
              stored_agent_version="1.0")


def test_heartbeat_is_quiet() -> None:
    """Issue 11: the write-behind decision is a pure rule; each change makes a heartbeat non-quiet."""
    assert heartbeat_is_quiet(**_QUIET)  # type: ignore[arg-type]
    assert heartbeat_is_quiet(**{**_QUIET, "facts_digest": "f", "agent_version": "1.0"})  # type: ignore[arg-type]
    assert heartbeat_is_quiet(**{**_QUIET, "has_work": True, "wants_lease": False})  # type: ignore[arg-type]
    for change in ({"state": "OFFLINE"}, {"has_work": True}, {"has_updates": True}, {"vm_digest": "w"},
                   {"facts_digest": "g"}, {"agent_version": "2.0"}):
        assert not heartbeat_is_quiet(**{**_QUIET, **change}), change  # type: ignore[arg-type]


def test_site_connectivity_and_revocation_reason() -> None:
    assert site_connectivity(True) is Connectivity.ONLINE and site_connectivity(False) is Connectivity.OFFLINE
    assert revocation_reason("compromised") == "keyCompromise"
    assert revocation_reason(None) == revocation_reason("decommissioned") == "cessationOfOperation"


def test_crl_rules() -> None:
    """Issue 11: when a cached CRL is reused and how its number grows (monotonic across restarts)."""
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    later = now + dt.timedelta(seconds=1)
    assert crl_is_current([("01", now)], [("01", now)], now, later)
    assert not crl_is_current([("01", now)], [("01", now), ("02", now)], now, later)
    assert not crl_is_current([], [], later, later)
    ms = int(now.timestamp() * 1000)
    assert next_crl_number(now, None) == ms
    assert next_crl_number(now, ms + 50) == ms + 51  # a clock step back never reuses a number


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc" and bearer_token("  bearer  abc ") == " abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None and bearer_token("Bearer") == ""
