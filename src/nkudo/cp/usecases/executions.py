"""Executions: results and log lines reported by agents; reading executions and their logs (tenant side)."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import domain
from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.domain import ActorType, ExecState, ResultDecision, VmStateSource
from nkudo.cp.errors import NotFound
from nkudo.cp.feed import Change, ChangeKind, publish_all
from nkudo.cp.paging import DEFAULT_LIMIT, PageKind, after, check_limit, cut, log_seq
from nkudo.cp.ports import NO_FEED, Clock, Metrics, Publisher, Transactions
from nkudo.cp.records import (
    Actor,
    AgentIdentity,
    AgentRecord,
    AuditEntry,
    ExecutionRecord,
    Principal,
    RequestInfo,
    stamp,
)
from nkudo.cp.usecases.agentauth import load_agent
from nkudo.cp.usecases.common import audit, ordering, rollup, seek, site_scope
from nkudo.cp.usecases.overview import VmStateWrite, record_vm_states
from nkudo.cp.usecases.plans import execution_view
from nkudo.wire import messages as wm
from nkudo.wire.vocab import ActionType

_x = t.executions.c


class Executions:
    def __init__(self, db: Transactions, metrics: Metrics, clock: Clock, feed: Publisher = NO_FEED) -> None:
        self.db = db
        self.feed = feed  # issue 13: live views learn of results and log lines
        self.metrics = metrics
        self.clock = clock

    # --- agent side ----------------------------------------------------------

    async def report_results(self, ident: AgentIdentity, report: wm.ResultReport, info: RequestInfo
                             ) -> wm.ResultResponse:
        changes: list[Change] = []
        out = await self.db.run(self._results_tx, ident, report, info, changes)
        publish_all(self.feed, changes)
        for o in out:
            self.metrics.results.labels(o.outcome).inc()
        return wm.ResultResponse(results=out)

    def _results_tx(self, conn: Connection, ident: AgentIdentity, report: wm.ResultReport, info: RequestInfo,
                    changes: list[Change] | None = None) -> list[wm.ResultOutcome]:
        now = self.clock.now()
        agent = load_agent(conn, ident, now)
        changes = [] if changes is None else changes
        changes.clear()  # a retried transaction starts over
        out: list[wm.ResultOutcome] = []
        touched: set[str] = set()
        for r in report.results:
            found = conn.execute(
                sa.select(t.executions).where(_x.id == r.execution_id, _x.tenant_id == agent.tenant_id,
                                              _x.site_id == agent.site_id).with_for_update()
            ).first()
            if found is None or (report.plan_id is not None and found.plan_id != report.plan_id):
                out.append(wm.ResultOutcome(execution_id=r.execution_id, outcome=ResultDecision.REJECTED.value,
                                            code="EXECUTION_NOT_FOUND"))
                continue
            row = ExecutionRecord.of(found)
            if r.action_id is not None and r.action_id != row.action_id:
                out.append(wm.ResultOutcome(execution_id=r.execution_id, outcome=ResultDecision.REJECTED.value,
                                            code="ACTION_MISMATCH"))
                continue
            reported = ExecState(r.status)
            holder = row.agent_id == agent.id
            decision = domain.result_transition(row.state, reported, holder)
            if decision != ResultDecision.ACCEPTED:
                out.append(wm.ResultOutcome(execution_id=r.execution_id, outcome=decision.value,  # type: ignore[arg-type]
                                            code=domain.rejection_code(decision, holder)))
                continue
            error_code, error_message = domain.result_error(reported, r.error_code, r.message)
            conn.execute(t.executions.update().where(_x.id == row.id, _x.state == row.state).values(
                state=reported, updated_at=now, finished_at=r.finished_at or now,
                started_at=sa.func.coalesce(_x.started_at, r.started_at or now),
                error_code=error_code, error_message=error_message,
            ))
            if reported != ExecState.SUCCEEDED:
                # Later actions of a failed plan will never run: cancel them instead of leaving them pending forever.
                conn.execute(t.executions.update().where(
                    _x.plan_id == row.plan_id, _x.position > row.position,
                    _x.state.in_([ExecState.PENDING, ExecState.LEASED, ExecState.RUNNING]),
                ).values(state=ExecState.CANCELLED, updated_at=now, finished_at=now, error_code="PREVIOUS_FAILED",
                         error_message=f"action {row.action_id} did not succeed"))
            self._apply_vm_result(conn, agent, row, reported, now)
            audit(conn, info, AuditEntry(Actor(ActorType.AGENT, agent.id), "execution.result", agent.tenant_id,
                                         "execution", row.id, {"state": reported.value}), now)
            touched.add(row.plan_id)
            changes.append(Change(ChangeKind.EXECUTION, row.tenant_id, row.site_id, row.id, row.plan_id))
            if row.vm_id:
                changes.append(Change(ChangeKind.VM, row.tenant_id, row.site_id, row.vm_id, row.plan_id))
            out.append(wm.ResultOutcome(execution_id=r.execution_id, outcome=ResultDecision.ACCEPTED.value))
        for plan_id in sorted(touched):
            rollup(conn, plan_id, now)
            changes.append(Change(ChangeKind.PLAN, agent.tenant_id, agent.site_id, plan_id, plan_id))
        return out

    def _apply_vm_result(self, conn: Connection, agent: AgentRecord, ex: ExecutionRecord, status: ExecState,
                         now: dt.datetime) -> None:
        if not ex.vm_id:
            return
        state = domain.vm_state_after(ex.action_type, status, domain.create_starts_vm(ex.action_type, ex.params))
        if state is None:
            return
        vm = t.vms.c
        previous = conn.execute(sa.select(vm.state).where(vm.site_id == ex.site_id, vm.vm_id == ex.vm_id)).scalar()
        if previous != state and (previous is not None or ex.action_type == ActionType.MICROVM_CREATE):
            record_vm_states(conn, [VmStateWrite(ex.tenant_id, ex.site_id, ex.vm_id, state, previous,
                                                 VmStateSource.EXECUTION, ex.id)], now)  # issue 13: VM history
        if ex.action_type == ActionType.MICROVM_CREATE:
            name, vcpus, mem = ex.params.get("name", ex.vm_id), ex.params.get("vcpus", 0), ex.params.get("memory_mib", 0)
            ins = self.db.insert(t.vms)
            conn.execute(ins.on_conflict_do_update(
                index_elements=[vm.site_id, vm.vm_id],
                set_={"state": state, "host_id": agent.host_id, "name": name, "vcpus": vcpus, "memory_mib": mem,
                      "updated_at": now, "last_transition_at": now},
            ), {"site_id": ex.site_id, "vm_id": ex.vm_id, "tenant_id": ex.tenant_id, "host_id": agent.host_id,
                "name": name, "state": state, "vcpus": vcpus, "memory_mib": mem, "updated_at": now,
                "last_transition_at": now})
        else:
            conn.execute(t.vms.update().where(vm.site_id == ex.site_id, vm.vm_id == ex.vm_id).values(
                state=state, host_id=agent.host_id, updated_at=now, last_transition_at=now))

    async def ingest_logs(self, ident: AgentIdentity, batch: wm.LogBatch) -> wm.LogBatchResponse:
        changes: list[Change] = []
        accepted, dropped = await self.db.run(self._logs_tx, ident, batch, changes)
        if accepted:
            publish_all(self.feed, changes)
        self.metrics.log_lines.labels("accepted").inc(accepted)
        self.metrics.log_lines.labels("dropped").inc(dropped)
        return wm.LogBatchResponse(accepted=accepted, dropped=dropped)

    def _logs_tx(self, conn: Connection, ident: AgentIdentity, batch: wm.LogBatch,
                 changes: list[Change] | None = None) -> tuple[int, int]:
        now = self.clock.now()
        agent = load_agent(conn, ident, now)
        ex = conn.execute(sa.select(_x.id, _x.tenant_id, _x.plan_id).where(
            _x.id == batch.execution_id, _x.site_id == agent.site_id, _x.agent_id == agent.id)).first()
        if ex is None:
            raise NotFound("execution not found for this agent", code="EXECUTION_NOT_FOUND", field="execution_id")
        seen: set[int] = set()
        rows = []
        for ln in batch.lines:
            if ln.seq in seen:
                continue
            seen.add(ln.seq)
            rows.append({"tenant_id": ex.tenant_id, "execution_id": ex.id, "seq": ln.seq, "level": ln.level,
                         "message": ln.message, "emitted_at": ln.ts or now, "ingested_at": now})
        stmt = self.db.insert(t.execution_logs).values(rows).on_conflict_do_nothing(
            index_elements=[t.execution_logs.c.execution_id, t.execution_logs.c.seq]
        ).returning(t.execution_logs.c.seq)
        accepted = len(conn.execute(stmt).all())  # RETURNING: rowcount is unreliable for multi-row upserts
        if changes is not None:
            changes[:] = [Change(ChangeKind.LOG, ex.tenant_id, agent.site_id, ex.id, ex.plan_id)]
        return accepted, len(batch.lines) - accepted

    # --- tenant side ---------------------------------------------------------

    async def get_execution(self, p: Principal, execution_id: str) -> v.ExecutionView:
        def tx(conn: Connection) -> v.ExecutionView:
            row = conn.execute(sa.select(t.executions).where(_x.id == execution_id)).first()
            if row is None or not domain.tenant_visible(p.tenant_id, row.tenant_id):
                raise NotFound("execution not found", code="EXECUTION_NOT_FOUND")
            return execution_view(row)

        return await self.db.run(tx)

    async def execution_logs(self, p: Principal, execution_id: str, after_seq: int = -1, limit: int = 500, *,
                             cursor: str | None = None) -> v.ExecutionLogs:
        """Log lines after ``after_seq`` (or after the ``cursor``, the previous page's ``next``), ascending."""
        check_limit(limit)
        after_seq = log_seq(cursor) if cursor is not None else after_seq

        def tx(conn: Connection) -> v.ExecutionLogs:
            row = conn.execute(sa.select(_x.tenant_id).where(_x.id == execution_id)).first()
            if row is None or not domain.tenant_visible(p.tenant_id, row.tenant_id):
                raise NotFound("execution not found", code="EXECUTION_NOT_FOUND")
            lg = t.execution_logs.c
            rows = conn.execute(sa.select(t.execution_logs).where(lg.execution_id == execution_id, lg.seq > after_seq)
                                .order_by(lg.seq).limit(limit)).all()
            return v.ExecutionLogs(
                execution_id=execution_id,
                logs=[v.LogEntryView(seq=r.seq, level=r.level, message=r.message, emitted_at=stamp(r.emitted_at),
                                     ingested_at=stamp(r.ingested_at)) for r in rows],
                next_after_seq=rows[-1].seq if len(rows) == limit else None,
                next=str(rows[-1].seq) if len(rows) == limit else None,  # issue 13: the route takes it as cursor
            )

        return await self.db.run(tx)

    async def list_executions(self, p: Principal, site_id: str, state: ExecState | None = None,
                              limit: int = DEFAULT_LIMIT, *, cursor: str | None = None, plan_id: str | None = None,
                              vm_id: str | None = None) -> v.ExecutionList:
        """A page of the site's executions, newest plan first and in plan order (all three keys immutable)."""
        check_limit(limit)
        key = after(PageKind.EXECUTIONS, cursor)

        def tx(conn: Connection) -> v.ExecutionList:
            site_scope(conn, p, site_id)
            q = sa.select(t.executions).where(_x.site_id == site_id)
            if state:
                q = q.where(_x.state == state)
            if plan_id is not None:
                q = q.where(_x.plan_id == plan_id)
            if vm_id is not None:
                q = q.where(_x.vm_id == vm_id)
            order = [(_x.created_at, True), (_x.plan_id, False), (_x.position, False)]
            found = conn.execute(q.where(seek(order, key)).order_by(*ordering(order)).limit(limit + 1)).all()
            rows, nxt = cut(PageKind.EXECUTIONS, found, limit, lambda r: (r.created_at, r.plan_id, r.position))
            return v.ExecutionList(executions=[execution_view(r) for r in rows], next=nxt)

        return await self.db.run(tx)
