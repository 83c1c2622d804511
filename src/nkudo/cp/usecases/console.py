"""A VM's console tail through the control plane, with no connection into the host (issue 15).

``GET /vms/{vm_id}/console?lines=N`` cannot reach the host: agents only ever call out. So a request is
recorded (one row per VM in ``console_requests``, state ``PENDING``); the agent's next heartbeat is
answered with it (``HeartbeatResponse.console_requests``), and the agent ships the sanitised tail on its
very next heartbeat (``HeartbeatRequest.consoles``), which stores it (``READY``, or ``UNAVAILABLE`` when
the host has no console for that VM). The caller polls the same URL until ``state`` is ``READY``; a tail
younger than :func:`fresh_for` and with at least the lines asked for is answered from the row at once.

The heartbeat's batched authorisation read carries :data:`CONSOLE_WANTED` (is a request pending for this
agent's host?), so an idle heartbeat pays one indexed ``EXISTS`` and never a transaction for this.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.config import Settings
from nkudo.cp.errors import BadRequest, NotFound
from nkudo.cp.ports import Clock, Transactions
from nkudo.cp.records import Principal, iso
from nkudo.vmstate import VmStatus
from nkudo.wire import messages as wm
from nkudo.wire.vocab import ConsoleState

_c, _a = t.console_requests.c, t.agents.c

#: For the heartbeat's authorisation read: whether a console request waits for this agent's host.
CONSOLE_WANTED = sa.exists().where(
    _c.host_id == _a.host_id, _c.state == ConsoleState.PENDING.value
).label("console_wanted")


def fresh_for(heartbeat_interval: int) -> dt.timedelta:
    """How long a shipped tail answers new requests: two heartbeats, so a poll at that pace always sees one."""
    return dt.timedelta(seconds=max(5, 2 * heartbeat_interval))


def reusable(row: Any, host_id: str | None, lines: int, now: dt.datetime, fresh: dt.timedelta) -> bool:
    """Whether a stored answer (``READY`` or ``UNAVAILABLE``) answers a request for ``lines`` lines now."""
    return (
        row is not None and row.state != ConsoleState.PENDING and row.host_id == host_id
        and row.captured_at is not None and now - row.captured_at <= fresh
        and (row.state == ConsoleState.UNAVAILABLE or row.lines >= lines)
    )


def last_lines(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text`` (each ending in a newline)."""
    parts = text.splitlines(keepends=True)
    return "".join(parts[-lines:])


class Consoles:
    def __init__(self, settings: Settings, db: Transactions, clock: Clock) -> None:
        self.s = settings
        self.db = db
        self.clock = clock

    async def get(self, p: Principal, vm_id: str, site_id: str | None, lines: int) -> v.VmConsoleView:
        return await self.db.run(self._get_tx, p, vm_id, site_id, lines)

    def _get_tx(self, conn: Connection, p: Principal, vm_id: str, site_id: str | None,
                lines: int) -> v.VmConsoleView:
        now = self.clock.now()
        vm = t.vms.c
        q = sa.select(vm.site_id, vm.host_id).where(vm.vm_id == vm_id, vm.state != VmStatus.DELETED.value)
        if p.tenant_id is not None:
            q = q.where(vm.tenant_id == p.tenant_id)
        if site_id is not None:
            q = q.where(vm.site_id == site_id)
        found = conn.execute(q.limit(2)).all()
        if not found:
            raise NotFound(f"VM {vm_id!r} not found", code="VM_NOT_FOUND")
        if len(found) > 1:
            raise BadRequest(f"VM id {vm_id!r} exists in several sites; give site_id", field="site_id")
        sid, host_id = found[0].site_id, found[0].host_id
        key = (_c.site_id == sid) & (_c.vm_id == vm_id)
        row = conn.execute(sa.select(t.console_requests).where(key)).first()
        if host_id is None:
            return v.VmConsoleView(vm_id=vm_id, site_id=sid, host_id=None, state=ConsoleState.UNAVAILABLE,
                                   lines=lines, text="", captured_at=None)
        if reusable(row, host_id, lines, now, fresh_for(self.s.heartbeat_interval)):
            assert row is not None
            return v.VmConsoleView(vm_id=vm_id, site_id=sid, host_id=host_id, state=ConsoleState(row.state),
                                   lines=lines, text=last_lines(row.text, lines), captured_at=iso(row.captured_at))
        want = max(lines, row.lines) if row is not None and row.state == ConsoleState.PENDING else lines
        values = {"host_id": host_id, "state": ConsoleState.PENDING.value, "lines": want, "requested_at": now}
        if row is None:
            conn.execute(t.console_requests.insert().values(site_id=sid, vm_id=vm_id, text="", captured_at=None,
                                                            **values))
        else:
            conn.execute(t.console_requests.update().where(key).values(**values))
        return v.VmConsoleView(vm_id=vm_id, site_id=sid, host_id=host_id, state=ConsoleState.PENDING,
                               lines=lines, text="", captured_at=None,
                               retry_after_seconds=min(self.s.heartbeat_interval, 5))

    async def exchange(self, agent_id: str, tails: list[wm.ConsoleTail]) -> list[wm.ConsoleRequest]:
        """Store the tails an agent shipped; return the requests still waiting for its host."""
        return await self.db.run(self._exchange_tx, agent_id, tails)

    def _exchange_tx(self, conn: Connection, agent_id: str, tails: list[wm.ConsoleTail]) -> list[wm.ConsoleRequest]:
        now = self.clock.now()
        agent = conn.execute(sa.select(_a.site_id, _a.host_id).where(_a.id == agent_id)).first()
        if agent is None:
            return []
        for tail in tails:
            # Only a row that asked this very host: an agent cannot answer for a VM of another host or site.
            conn.execute(t.console_requests.update().where(
                _c.site_id == agent.site_id, _c.vm_id == tail.vm_id, _c.host_id == agent.host_id,
            ).values(state=(ConsoleState.READY if tail.found else ConsoleState.UNAVAILABLE).value,
                     text=tail.text, lines=tail.lines, captured_at=now))
        rows = conn.execute(sa.select(_c.vm_id, _c.lines).where(
            _c.host_id == agent.host_id, _c.state == ConsoleState.PENDING.value,
        ).order_by(_c.requested_at).limit(wm.MAX_CONSOLE_REQUESTS)).all()
        return [wm.ConsoleRequest(vm_id=r.vm_id, lines=r.lines) for r in rows]
