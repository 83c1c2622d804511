"""Durable agent state in SQLite (standard library): VMs, action results, identity.

Why SQLite: every write is one transaction, atomic and durable (WAL with
``synchronous=FULL``), so an agent killed with SIGKILL at any instant restarts
with consistent state. The executor's idempotency rests on the ``actions``
table: a row is inserted (state RUNNING) *before* an action's first side
effect and completed after its last, so a restart can tell "never started",
"interrupted" and "finished" apart.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from nkudo.agent.provider import NicPlan, ProcessRecord
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ExecState, ResultStatus

#: 2: the resolved NICs and the create-pending mark are columns of ``vms`` (they were hidden
#: ``_nics_resolved`` / ``_create_pending`` keys of the spec JSON in 1; ``_migrate`` moves them).
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    vm_id       TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    spec        TEXT NOT NULL,
    status      TEXT NOT NULL,
    process     TEXT,
    taps        TEXT NOT NULL DEFAULT '[]',
    runtime_dir TEXT NOT NULL,
    last_error  TEXT,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    nics        TEXT NOT NULL DEFAULT '[]',
    create_pending INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS actions (
    action_id     TEXT PRIMARY KEY,
    params_hash   TEXT NOT NULL,
    type          TEXT NOT NULL,
    vm_id         TEXT,
    execution_id  TEXT,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 1,
    started_at    REAL NOT NULL,
    ended_at      REAL,
    error_code    TEXT,
    error_message TEXT,
    result        TEXT,
    logs          TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS actions_vm ON actions(vm_id);
CREATE TABLE IF NOT EXISTS outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL,
    key          TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   REAL NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    UNIQUE(kind, key)
);
"""

#: States of a journalled action that are final (a recorded result).
TERMINAL = frozenset(s for s in ResultStatus if s.ran)
#: Legacy spec keys of schema 1 (now columns): never part of a spec again.
_LEGACY_NICS, _LEGACY_PENDING = "_nics_resolved", "_create_pending"


class OutboxKind(enum.StrEnum):
    """What a queued report is, i.e. which control-plane route takes it."""

    RESULT = "result"  # a ``wire.messages.ActionResult`` -> POST /v1/executions/result
    LOGS = "logs"  # a ``wire.messages.LogBatch`` -> POST /v1/logs


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One report to queue: at most one per (kind, key); ``payload`` is the encoded wire message."""

    kind: OutboxKind
    key: str
    payload: str


@dataclass(frozen=True, slots=True)
class QueuedReport:
    """One queued report as read back (oldest first), with its row id for ack/failure."""

    id: int
    kind: OutboxKind
    key: str
    payload: str
    attempts: int


class VmRecord:
    """One row of ``vms``.

    ``spec`` is exactly the plan's ``MicroVMCreate`` params (without ``start``); what the agent
    resolved or is doing about it lives in fields of its own: ``nics`` (the TAPs, MACs and bridges
    the VMM is given) and ``create_pending`` (set from insert until the create succeeded; only
    such a record is rolled back when a create fails).
    """

    __slots__ = (
        "create_pending",
        "created_at",
        "last_error",
        "name",
        "nics",
        "process",
        "runtime_dir",
        "spec",
        "status",
        "taps",
        "updated_at",
        "vm_id",
    )

    def __init__(self, row: sqlite3.Row) -> None:
        self.vm_id: str = row["vm_id"]
        self.name: str = row["name"]
        self.spec: dict[str, Any] = json.loads(row["spec"])
        self.status = VmStatus(row["status"])
        self.process: ProcessRecord | None = json.loads(row["process"]) if row["process"] else None
        self.taps: list[str] = json.loads(row["taps"])
        self.nics: list[NicPlan] = [NicPlan(tap=t, mac=m, bridge=b) for t, m, b in json.loads(row["nics"])]
        self.create_pending: bool = bool(row["create_pending"])
        self.runtime_dir: str = row["runtime_dir"]
        self.last_error: str | None = row["last_error"]
        self.created_at: float = row["created_at"]
        self.updated_at: float = row["updated_at"]

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__slots__}
        out["status"] = str(self.status)
        out["nics"] = [{"tap": n.tap, "mac": n.mac, "bridge": n.bridge} for n in self.nics]
        return out


class ActionRecord:
    __slots__ = (
        "action_id",
        "attempts",
        "ended_at",
        "error_code",
        "error_message",
        "execution_id",
        "logs",
        "params_hash",
        "result",
        "started_at",
        "state",
        "type",
        "vm_id",
    )

    def __init__(self, row: sqlite3.Row) -> None:
        self.action_id: str = row["action_id"]
        self.params_hash: str = row["params_hash"]
        self.type: str = row["type"]
        self.vm_id: str | None = row["vm_id"]
        self.execution_id: str | None = row["execution_id"]
        # RUNNING while journalled and unfinished, else the recorded result.
        self.state: ResultStatus | ExecState = (
            ResultStatus(row["state"]) if row["state"] in TERMINAL else ExecState(row["state"])
        )
        self.attempts: int = row["attempts"]
        self.started_at: float = row["started_at"]
        self.ended_at: float | None = row["ended_at"]
        self.error_code: str | None = row["error_code"]
        self.error_message: str | None = row["error_message"]
        self.result: dict[str, Any] = json.loads(row["result"]) if row["result"] else {}
        self.logs: list[dict[str, Any]] = json.loads(row["logs"])

    @property
    def terminal(self) -> bool:
        return isinstance(self.state, ResultStatus)

    @property
    def result_status(self) -> ResultStatus:
        """The recorded result (only for a terminal record)."""
        if not isinstance(self.state, ResultStatus):
            raise ValueError(f"action {self.action_id} has no result yet (state {self.state})")
        return self.state


class StateStore:
    """One SQLite database per agent (``<state-dir>/agent.db``), safe across threads."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "agent.db")
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        (ver,) = self._db.execute("PRAGMA user_version").fetchone()
        if ver > SCHEMA_VERSION:
            raise RuntimeError(
                f"state database {self.path} has schema {ver}, newer than this agent ({SCHEMA_VERSION})"
            )
        self._migrate()
        if ver < SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _migrate(self) -> None:
        """Bring a schema-1 database to 2 in one transaction (an agent killed midway redoes it).

        Why by columns and not by ``user_version``: a fresh database has version 0 too, and
        ``CREATE TABLE IF NOT EXISTS`` leaves an old ``vms`` table without the new columns.
        """
        with self._lock:
            cols = {r[1] for r in self._db.execute("PRAGMA table_info(vms)")}
        if "nics" in cols and "create_pending" in cols:
            return
        with self.tx() as c:
            if "nics" not in cols:
                c.execute("ALTER TABLE vms ADD COLUMN nics TEXT NOT NULL DEFAULT '[]'")
            if "create_pending" not in cols:
                c.execute("ALTER TABLE vms ADD COLUMN create_pending INTEGER NOT NULL DEFAULT 0")
            for vm_id, spec_text in c.execute("SELECT vm_id, spec FROM vms").fetchall():
                spec = json.loads(spec_text)
                nics = spec.pop(_LEGACY_NICS, [])
                pending = bool(spec.pop(_LEGACY_PENDING, False))
                c.execute(
                    "UPDATE vms SET spec=?, nics=?, create_pending=? WHERE vm_id=?",
                    (json.dumps(spec, sort_keys=True), json.dumps(nics), int(pending), vm_id),
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locked) transaction: all or nothing."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    # ----------------------------------------------------------------- meta

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        with self.tx() as c:
            if value is None:
                c.execute("DELETE FROM meta WHERE key=?", (key,))
            else:
                c.execute(
                    "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (key, value),
                )

    # ------------------------------------------------------------------ VMs

    def get_vm(self, vm_id: str) -> VmRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM vms WHERE vm_id=?", (vm_id,)).fetchone()
        return None if row is None else VmRecord(row)

    def list_vms(self) -> list[VmRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM vms ORDER BY vm_id").fetchall()
        return [VmRecord(r) for r in rows]

    def insert_vm(
        self,
        vm_id: str,
        name: str,
        spec: dict[str, Any],
        runtime_dir: str,
        status: VmStatus,
        *,
        create_pending: bool = False,
    ) -> None:
        now = time.time()
        with self.tx() as c:
            c.execute(
                "INSERT INTO vms(vm_id, name, spec, status, runtime_dir, created_at, updated_at, create_pending) "
                "VALUES(?,?,?,?,?,?,?,?)",
                (vm_id, name, json.dumps(spec, sort_keys=True), status.value, runtime_dir, now, now, int(create_pending)),
            )

    _UNSET: Any = object()

    def update_vm(
        self,
        vm_id: str,
        *,
        status: VmStatus | None = None,
        process: ProcessRecord | None = _UNSET,
        taps: list[str] | None = None,
        nics: list[NicPlan] | None = None,
        create_pending: bool | None = None,
        last_error: str | None = _UNSET,
    ) -> None:
        sets: list[str] = ["updated_at=?"]
        args: list[Any] = [time.time()]
        if status is not None:
            sets.append("status=?")
            args.append(status.value)
        if process is not self._UNSET:
            sets.append("process=?")
            args.append(json.dumps(process) if process is not None else None)
        if taps is not None:
            sets.append("taps=?")
            args.append(json.dumps(taps))
        if nics is not None:
            sets.append("nics=?")
            args.append(json.dumps([[n.tap, n.mac, n.bridge] for n in nics]))
        if create_pending is not None:
            sets.append("create_pending=?")
            args.append(int(create_pending))
        if last_error is not self._UNSET:
            sets.append("last_error=?")
            args.append(last_error)
        args.append(vm_id)
        with self.tx() as c:
            c.execute(f"UPDATE vms SET {', '.join(sets)} WHERE vm_id=?", args)  # noqa: S608 - fixed column names

    def delete_vm(self, vm_id: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM vms WHERE vm_id=?", (vm_id,))

    # -------------------------------------------------------------- actions

    def get_action(self, action_id: str) -> ActionRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM actions WHERE action_id=?", (action_id,)).fetchone()
        return None if row is None else ActionRecord(row)

    def begin_action(
        self, action_id: str, params_hash: str, type_: str, vm_id: str | None, execution_id: str | None
    ) -> None:
        """Record that the action is about to run; a retry after a crash bumps ``attempts``."""
        with self.tx() as c:
            c.execute(
                "INSERT INTO actions(action_id, params_hash, type, vm_id, execution_id, state, started_at) "
                "VALUES(?,?,?,?,?,?,?) "
                "ON CONFLICT(action_id) DO UPDATE SET attempts=attempts+1",
                (action_id, params_hash, type_, vm_id, execution_id, ExecState.RUNNING.value, time.time()),
            )

    def finish_action(
        self,
        action_id: str,
        state: ResultStatus,
        *,
        error_code: str | None,
        error_message: str | None,
        result: dict[str, Any],
        logs: list[dict[str, Any]],
        outbox: list[OutboxEntry] | None = None,
    ) -> None:
        """Record the terminal result and, in the same transaction, queue what must be reported."""
        if state not in TERMINAL:
            raise ValueError(f"not a terminal state: {state}")
        with self.tx() as c:
            c.execute(
                "UPDATE actions SET state=?, ended_at=?, error_code=?, error_message=?, result=?, logs=? WHERE action_id=?",
                (
                    ResultStatus(state).value,
                    time.time(),
                    error_code,
                    error_message,
                    json.dumps(result),
                    json.dumps(logs),
                    action_id,
                ),
            )
            for entry in outbox or ():
                self._enqueue(c, entry)

    # --------------------------------------------------------------- outbox

    @staticmethod
    def _enqueue(c: sqlite3.Connection, entry: OutboxEntry) -> None:
        c.execute(
            "INSERT INTO outbox(kind, key, payload, created_at) VALUES(?,?,?,?) ON CONFLICT(kind, key) DO NOTHING",
            (entry.kind.value, entry.key, entry.payload, time.time()),
        )

    def enqueue(self, entry: OutboxEntry) -> None:
        """Queue a message for the control plane (idempotent per kind and key)."""
        with self.tx() as c:
            self._enqueue(c, entry)

    def outbox_peek(self, limit: int = 100) -> list[QueuedReport]:
        """Oldest queued messages first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, kind, key, payload, attempts FROM outbox ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        return [QueuedReport(r[0], OutboxKind(r[1]), r[2], r[3], r[4]) for r in rows]

    def outbox_ack(self, ids: list[int]) -> None:
        if not ids:
            return
        with self.tx() as c:
            c.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids])

    def outbox_failed(self, ids: list[int], error: str) -> None:
        if not ids:
            return
        with self.tx() as c:
            c.executemany(
                "UPDATE outbox SET attempts=attempts+1, last_error=? WHERE id=?",
                [(error[:500], i) for i in ids],
            )

    def outbox_size(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(n)

    def list_actions(self, *, unfinished_only: bool = False) -> list[ActionRecord]:
        with self._lock:
            if unfinished_only:
                rows = self._db.execute(
                    "SELECT * FROM actions WHERE state=? ORDER BY started_at", (ExecState.RUNNING.value,)
                ).fetchall()
            else:
                rows = self._db.execute("SELECT * FROM actions ORDER BY started_at").fetchall()
        return [ActionRecord(r) for r in rows]
