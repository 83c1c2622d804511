"""Pure rules: plan status rollup, execution transitions, result outcomes, agent authorisation."""

from __future__ import annotations

import datetime as dt

import pytest

from nkudo.cp.domain import (
    AgentView,
    ExecState,
    PlanStatus,
    authorize_agent,
    can_transition,
    plan_status,
    result_transition,
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
