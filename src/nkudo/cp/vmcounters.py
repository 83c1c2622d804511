"""Per-VM kernel counters at the control plane (issue 15): how a heartbeat's report is stored and shown.

Why a module of its own: the stored form (written by the heartbeats' write-behind flush) and the view
(read by the VM list) must agree on one field order, and the rate rule (a counter that went down was
reset, so there is no rate across it) is a pure decision that needs no database. Rates come from the
latest report and the one before it, both kept on the VM's row, so no history table is needed.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nkudo.cp import schema as t
from nkudo.cp import views as v
from nkudo.cp.domain import AgentState
from nkudo.cp.records import stamp
from nkudo.wire import messages as wm

#: The stored order of the values (``VmCounters`` after its ``vm_id``).
FIELDS: Final = ("rx_bytes", "rx_packets", "rx_drops", "tx_bytes", "tx_packets", "tx_drops", "cpu_ms",
                 "read_bytes", "write_bytes", "rss_bytes")
#: Cumulative fields that get a rate, and the name of that rate.
_RATES: Final = (("rx_bytes", "rx_bytes"), ("tx_bytes", "tx_bytes"), ("rx_packets", "rx_packets"),
                 ("tx_packets", "tx_packets"), ("rx_drops", "rx_drops"), ("tx_drops", "tx_drops"),
                 ("cpu_ms", "cpu_cores"), ("read_bytes", "read_bytes"), ("write_bytes", "write_bytes"))


def stored(c: wm.VmCounters, at: dt.datetime) -> dict[str, Any]:
    """The JSON kept in ``vms.counters`` for one report received at ``at``."""
    return {"at": stamp(at), "v": [getattr(c, f) for f in FIELDS]}


def _values(doc: Any) -> tuple[dt.datetime, dict[str, int | None]] | None:
    """A stored report, or None when absent or not of the stored form (never a 500 for a bad row)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("v"), list) or len(doc["v"]) != len(FIELDS):
        return None
    try:
        at = dt.datetime.fromisoformat(str(doc["at"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    vals = {f: x if isinstance(x, int) and not isinstance(x, bool) else None for f, x in zip(FIELDS, doc["v"], strict=True)}
    return at, vals


def view(current: Any, previous: Any) -> v.VmCountersView | None:
    """The VM list's counters: the latest report and, when the one before allows it, per-second rates."""
    cur = _values(current)
    if cur is None:
        return None
    at, now = cur
    rates = None
    prev = _values(previous)
    if prev is not None and (secs := (at - prev[0]).total_seconds()) > 0:
        out: dict[str, float | None] = {}
        for field, name in _RATES:
            a, b = now[field], prev[1][field]
            ok = a is not None and b is not None and a >= b  # a smaller value is a reset: no rate across it
            out[name] = round((a - b) / secs / (1000 if field == "cpu_ms" else 1), 3) if ok else None  # type: ignore[operator]
        rates = v.VmRatesView(interval_seconds=round(secs, 3), **out)
    return v.VmCountersView(at=stamp(at), rates=rates, **now)


_v, _ag = t.vms.c, t.agents.c
#: One VM's new report; the previous one moves to ``counters_prev`` in the same statement (SET reads the old
#: row). The VM must be on the reporting agent's site and host, and the agent still online: an agent can only
#: ever write counters of its own VMs.
_UPDATE = t.vms.update().where(
    _v.vm_id == sa.bindparam("vm"),
    _v.site_id == sa.select(_ag.site_id).where(_ag.id == sa.bindparam("aid"),
                                                _ag.state == AgentState.ONLINE.value).scalar_subquery(),
    _v.host_id == sa.select(_ag.host_id).where(_ag.id == sa.bindparam("aid")).scalar_subquery(),
).values(counters_prev=_v.counters, counters=sa.bindparam("c"))


def flush_tx(conn: Connection, reports: dict[str, tuple[dt.datetime, list[wm.VmCounters]]]) -> None:
    """Write the buffered reports (agent id -> (received at, counters)) in one executemany."""
    rows = [{"vm": c.vm_id, "aid": aid, "c": stored(c, at)} for aid, (at, items) in reports.items() for c in items]
    if rows:
        conn.execute(_UPDATE, rows)
