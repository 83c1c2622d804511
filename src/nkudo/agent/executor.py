"""The plan executor: idempotent, crash-safe execution of validated actions.

Pure orchestration: it knows the state store's interface and a table of
handlers, nothing about hypervisors, sockets or the kernel.

Guarantees:
- a terminal result is recorded per ``action_id`` with the hash of its
  parameters; a redelivered action with the same id and parameters returns the
  recorded result without running again; the same id with other parameters is
  refused with ``ACTION_CONFLICT``;
- an action is journalled (state RUNNING) before its first side effect, so a
  restart after SIGKILL knows it was interrupted: VM actions are re-driven
  (their handlers converge on the desired state and never duplicate a VMM or a
  TAP), host commands are *not* re-run (``INTERRUPTED``), because running a
  command twice is exactly what must never happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nkudo import log
from nkudo.agent.plan import Action
from nkudo.agent.state import OutboxEntry, StateStore
from nkudo.errors import NkudoError
from nkudo.wire.vocab import ActionType, ErrorCode, LogLevel, ResultStatus

# Re-exported names of the shared vocabulary (callers and tests used them from here).
SUCCEEDED, FAILED, TIMED_OUT = ResultStatus.SUCCEEDED, ResultStatus.FAILED, ResultStatus.TIMED_OUT
NOT_RUN = ResultStatus.NOT_RUN
MAX_LOG_LINES = 500
_LOGGER_METHOD = {LogLevel.DEBUG: "debug", LogLevel.INFO: "info", LogLevel.WARN: "warn", LogLevel.ERROR: "error"}


class ActionTimeout(NkudoError):
    """The action's deadline passed; the handler stopped where it was safe to."""

    code = ErrorCode.TIMED_OUT
    is_timeout = True


class ActionContext:
    """What a handler gets besides its params: deadline, log sink, identity."""

    __slots__ = ("_log", "action", "attempt", "deadline", "logs")

    def __init__(self, action: Action, attempt: int, logger: log.Logger) -> None:
        self.action = action
        self.attempt = attempt
        self.deadline = time.monotonic() + action.timeout
        self.logs: list[dict[str, Any]] = []
        self._log = logger

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_deadline(self, what: str) -> None:
        if self.remaining() <= 0:
            raise ActionTimeout(f"{self.action.type} timed out after {self.action.timeout:g}s while {what}")

    def log(self, msg: str, level: LogLevel = LogLevel.INFO, **fields: Any) -> None:
        if len(self.logs) < MAX_LOG_LINES:
            self.logs.append(
                {"ts": time.time(), "level": str(level), "message": msg, **({"fields": fields} if fields else {})}
            )
        getattr(self._log, _LOGGER_METHOD.get(level, "info"))(msg, **fields)


Handler = Callable[[ActionContext, Any], dict[str, Any]]
#: Messages to the control plane derived from one outcome (see ``Executor``).
OutboxFor = Callable[["Outcome"], list[OutboxEntry]]


class Outcome:
    """The result of one action, as reported to the operator and the control plane."""

    __slots__ = (
        "action_id",
        "attempts",
        "ended_at",
        "error_code",
        "error_message",
        "execution_id",
        "label",
        "logs",
        "replayed",
        "result",
        "started_at",
        "status",
        "type",
        "vm_id",
    )

    def __init__(self, action: Action, status: ResultStatus) -> None:
        self.action_id = action.action_id
        self.type = action.type
        self.vm_id = action.vm_id
        self.execution_id = action.execution_id
        self.label = action.label
        self.status = ResultStatus(status)
        self.error_code: str | None = None  # an ErrorCode, or a code another component chose
        self.error_message: str | None = None
        self.result: dict[str, Any] = {}
        self.logs: list[dict[str, Any]] = []
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.replayed = False
        self.attempts = 0

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    @property
    def ok(self) -> bool:
        return self.status.ok

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["duration_seconds"] = self.duration
        return d


class Executor:
    def __init__(
        self,
        store: StateStore,
        handlers: dict[str, Handler],
        *,
        on_outcome: Callable[[Outcome], None] | None = None,
        outbox_for: OutboxFor | None = None,
    ) -> None:
        self.store = store
        self.handlers = handlers
        self.on_outcome = on_outcome
        # Messages to the control plane derived from an outcome; written in the same transaction as
        # the result, so a crash can never record a result without queueing its report (or vice versa).
        self.outbox_for = outbox_for
        self.log = log.get_logger("executor")

    def execute(self, action: Action) -> Outcome:
        alog = self.log.bind(
            action_id=action.label or action.action_id,
            action_type=action.type,
            vm_id=action.vm_id,
            execution_id=action.execution_id,
        )
        rec = self.store.get_action(action.action_id)
        if rec is not None and rec.params_hash != action.params_hash:
            out = Outcome(action, FAILED)
            out.error_code = ErrorCode.ACTION_CONFLICT
            out.error_message = f"action_id {action.action_id!r} was already used with different parameters; nothing was executed"
            alog.warn("action id reused with different parameters")
            return self._emit(out)
        if rec is not None and rec.terminal:
            out = Outcome(action, rec.result_status)
            out.error_code, out.error_message = rec.error_code, rec.error_message
            out.result, out.logs = rec.result, rec.logs
            out.started_at, out.ended_at = rec.started_at, rec.ended_at
            out.replayed, out.attempts = True, rec.attempts
            alog.debug("returning recorded result", status=rec.state)
            if self.outbox_for is not None:
                for entry in self.outbox_for(out):
                    self.store.enqueue(entry)  # no-op if still queued; re-sent if acked (CP dedupes)
            return self._emit(out)

        interrupted = rec is not None  # journalled but never finished: the agent died mid-action
        self.store.begin_action(
            action.action_id, action.params_hash, action.type, action.vm_id, action.execution_id
        )
        attempt = (rec.attempts + 1) if rec is not None else 1
        ctx = ActionContext(action, attempt, alog)
        out = Outcome(action, FAILED)
        out.attempts = attempt
        out.started_at = time.time()
        if interrupted and not _repeatable(action.type):
            out.error_code = ErrorCode.INTERRUPTED
            out.error_message = (
                "the agent stopped while this command was running; it is not run a second time"
            )
            ctx.log(out.error_message, LogLevel.WARN)
        else:
            if interrupted:
                ctx.log(f"resuming after an agent restart (attempt {attempt})", LogLevel.WARN)
            handler = self.handlers.get(action.type)
            try:
                if handler is None:
                    raise NkudoError(
                        f"this agent has no handler for {action.type}", code=ErrorCode.UNSUPPORTED_ACTION
                    )
                ctx.check_deadline("starting")
                out.result = handler(ctx, action.params) or {}
                out.status = SUCCEEDED
            except NkudoError as exc:
                # A property of the error type (ActionTimeout, CH/QMP timeouts, a command's time limit).
                out.status = TIMED_OUT if exc.is_timeout else FAILED
                out.error_code, out.error_message = exc.code, exc.message
                out.result = dict(getattr(exc, "result", None) or {})
            except Exception as exc:  # a handler bug must not kill the agent or lose the result
                alog.exception("handler crashed")
                out.error_code, out.error_message = ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        out.ended_at = time.time()
        if out.status != SUCCEEDED:
            ctx.log(
                f"{action.type} {out.status.lower()}: {out.error_message}", LogLevel.ERROR, error_code=out.error_code
            )
        else:
            ctx.log(f"{action.type} succeeded in {out.duration:.3f}s")
        out.logs = ctx.logs
        self.store.finish_action(
            action.action_id,
            out.status,
            error_code=out.error_code,
            error_message=out.error_message,
            result=out.result,
            logs=out.logs,
            outbox=self.outbox_for(out) if self.outbox_for is not None else None,
        )
        return self._emit(out)

    def _emit(self, out: Outcome) -> Outcome:
        if self.on_outcome is not None:
            self.on_outcome(out)
        return out

    def run_plan(self, actions: list[Action], *, stop_on_failure: bool = True) -> list[Outcome]:
        """Run actions in order; after a failure the rest are reported NOT_RUN (and not journalled)."""
        outcomes: list[Outcome] = []
        failed = False
        for a in actions:
            if failed and stop_on_failure:
                o = Outcome(a, NOT_RUN)
                o.error_code = ErrorCode.NOT_RUN
                o.error_message = "not run because an earlier action of the plan failed"
                outcomes.append(o)
                continue
            o = self.execute(a)
            outcomes.append(o)
            failed = failed or not o.ok
        return outcomes


def _repeatable(action_type: str) -> bool:
    """Whether an interrupted action may run again (unknown types: yes, they fail without side effects)."""
    try:
        return ActionType(action_type).repeatable
    except ValueError:
        return True
