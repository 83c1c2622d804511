"""``nkudo-edge run``: heartbeats, leased plans, results and logs, renewal, graceful shutdown.

Two threads. The control thread heartbeats (every interval ±10 %, exponential
backoff while the control plane is unreachable), hands leased actions to the
worker, flushes the durable outbox and renews the certificate at two thirds
of its lifetime. The worker runs actions one at a time through the executor,
so a long action never delays a heartbeat. Results and log batches go through
the outbox table, written in the same transaction as the result itself, and
are deleted only once the control plane acknowledged them: a crash or restart
never loses or duplicates a report (the control plane dedupes by execution id).
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from nkudo import __version__, log
from nkudo.agent import console, renewal
from nkudo.agent.cpclient import CpClient, CpError, CpUnreachable, backoff_delay, jittered, rate_limited_delay
from nkudo.agent.executor import Executor, Outcome
from nkudo.agent.identity import Identity, Pki, load_cert_info, load_identity, save_identity
from nkudo.agent.plan import Action, parse_action
from nkudo.agent.runtime import Agent
from nkudo.agent.state import OutboxEntry, OutboxKind, QueuedReport
from nkudo.errors import NkudoError
from nkudo.wire import messages as wm
from nkudo.wire.codec import WireError, decode, encode, storable_text
from nkudo.wire.vocab import ErrorCode, LogLevel, ResultStatus, reported_status

_log = log.get_logger("daemon")
_T = TypeVar("_T")
HEARTBEAT_META = "heartbeat"
FACTS_EVERY = 40  # heartbeats between host-facts refreshes (~10 min at 15 s)


class IdentityRejected(NkudoError):
    """The control plane no longer accepts this agent (unenrolled, revoked, unknown)."""


class Creds(enum.Enum):
    """What :meth:`Daemon.pickup_credentials` found in ``--pki-dir``."""

    SAME = "same"  # the files in use
    SWITCHED = "switched"  # changed (renewed by another process) and now in use
    PENDING = "pending"  # changed but not usable yet: a renewal is installing them, or they do not match
    GONE = "gone"  # removed


#: Consecutive refusals tolerated while changed credentials on disk are not usable yet.
PENDING_LIMIT = 5


@dataclass
class DaemonConfig:
    interval: float = 15.0
    max_backoff: float = 60.0
    shutdown_timeout: float = 30.0
    once: bool = False
    interval_forced: bool = False  # --heartbeat-interval given: ignore the server's suggestion


def _iso(ts: float | None) -> dt.datetime | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)


def outbox_messages(out: Outcome) -> list[OutboxEntry]:
    """Reports for one outcome: its log batch, then its result (only for control-plane executions)."""
    if not out.execution_id or not out.status.ran:
        return []
    lines = [
        wm.LogLine(
            seq=i, message=storable_text(_line_text(line))[:8000], level=_level(line.get("level")), ts=_iso(line.get("ts"))
        )
        for i, line in enumerate(out.logs[: wm.MAX_LOG_LINES - 1])
    ]
    if out.result:
        summary = json.dumps(out.result, sort_keys=True, default=str)
        lines.append(
            wm.LogLine(
                seq=len(lines), message=storable_text(f"result: {summary}")[:8000], level=LogLevel.INFO, ts=_iso(out.ended_at)
            )
        )
    msgs: list[OutboxEntry] = []
    if lines:
        batch = wm.LogBatch(execution_id=out.execution_id, lines=lines)
        msgs.append(OutboxEntry(OutboxKind.LOGS, out.execution_id, encode(batch).decode()))
    res = wm.ActionResult(
        execution_id=out.execution_id,
        status=reported_status(out.status),
        action_id=(out.label or out.action_id)[:128],
        error_code=out.error_code if out.error_code and out.error_code.replace("_", "").isalnum() else None,
        message=storable_text(out.error_message or "")[:8000],
        started_at=_iso(out.started_at),
        finished_at=_iso(out.ended_at),
    )
    msgs.append(OutboxEntry(OutboxKind.RESULT, out.execution_id, encode(res).decode()))
    return msgs


class _Unreadable(NkudoError):
    """A queued report whose payload does not decode as its kind's wire message."""

    def __init__(self, report: QueuedReport, why: str) -> None:
        super().__init__(why, code=ErrorCode.INVALID_ARGUMENT)
        self.report = report


def _stored(q: QueuedReport, type_: type[_T]) -> _T:
    """The wire message a queued report holds (queued by ``outbox_messages``, so it decodes)."""
    try:
        return decode(q.payload, type_)
    except WireError as exc:
        raise _Unreadable(q, exc.message) from None


def _line_text(line: dict[str, Any]) -> str:
    fields = line.get("fields") or {}
    extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    return f"{line.get('message', '')} {extra}".strip()


def _level(v: Any) -> LogLevel:
    return LogLevel(v) if v in _LEVELS else LogLevel.INFO


_LEVELS = frozenset(LogLevel)


class Daemon:
    def __init__(
        self,
        agent: Agent,
        ident: Identity,
        pki: Pki,
        client: CpClient,
        cfg: DaemonConfig,
        *,
        metrics: Any = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.agent = agent
        self.ident = ident
        self.pki = pki
        self.client = client
        self.cfg = cfg
        self.metrics = metrics
        self.rand = rand
        self.interval = (
            cfg.interval if cfg.interval_forced else float(ident.heartbeat_interval or cfg.interval)
        )
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self.work: queue.Queue[list[Action]] = queue.Queue()
        self.known: set[str] = set()  # execution ids queued or run by this process
        self.running: str | None = None
        self.seq = 0
        self.failures = 0
        self.outbox_after = 0.0  # monotonic time before which reports are not sent (a 429's Retry-After)
        self.exit_code = 0
        self.exit_reason = ""
        self._facts: wm.HostFacts | None = None
        # The credential files the client was loaded from (run_run built it just before).
        self._creds = renewal.cred_stamp(pki)
        self._pending = 0
        self.consoles = console.Shipper(agent.cfg.runtime_dir, agent.cfg.console_max_mib)  # issue 15
        self._worker = threading.Thread(target=self._work_loop, name="nkudo-executor", daemon=True)
        # The daemon's own executor over the agent's handlers, its callbacks given here: every result
        # it records queues its reports in the same transaction, and every outcome reaches metrics.
        self.executor = Executor(agent.store, agent.handlers, on_outcome=self._on_outcome, outbox_for=outbox_messages)

    # ------------------------------------------------------------- control

    def request_stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    def run(self) -> int:
        renewal.roll_forward(self.pki)
        report = self.agent.reconcile()
        _log.info("agent starting", agent_id=self.ident.agent_id, site_id=self.ident.site_id,
                  vms=len(self.agent.store.list_vms()), adopted=len(report["adopted"]))  # fmt: skip
        self._worker.start()
        next_beat = 0.0
        while not self.stop_event.is_set():
            now = time.monotonic()
            if now >= next_beat:
                try:
                    self.heartbeat()
                    self.failures = 0
                    next_beat = time.monotonic() + jittered(self.interval, self.rand())
                except CpUnreachable as exc:
                    self.failures += 1
                    delay = backoff_delay(
                        self.failures, min(2.0, self.interval), self.cfg.max_backoff, self.rand()
                    )
                    _log.warn("control plane unreachable; backing off", error=exc.message, retry_in_s=round(delay, 1),
                              failures=self.failures)  # fmt: skip
                    next_beat = time.monotonic() + delay
                except IdentityRejected as exc:
                    self.exit_code, self.exit_reason = 3, exc.message
                    _log.error(
                        "the control plane rejected this agent; stopping", code=exc.code, error=exc.message
                    )
                    break
                except CpError as exc:
                    self.failures += 1
                    delay = backoff_delay(
                        self.failures, min(2.0, self.interval), self.cfg.max_backoff, self.rand()
                    )
                    if exc.rate_limited:  # issue 12: never sooner than the server's Retry-After
                        delay = rate_limited_delay(exc.retry_after, delay, self.rand())
                    _log.warn(
                        "heartbeat refused", code=exc.code, error=exc.message, retry_in_s=round(delay, 1)
                    )
                    next_beat = time.monotonic() + delay
            self.consoles.rotate()
            if self.failures == 0:
                self.pickup_credentials()
                self._flush_outbox()
                self._maybe_renew()
            if self.cfg.once:
                self._drain_once()
                break
            pending = self.agent.store.outbox_size() > 0 and self.failures == 0
            retry = max(1.0, self.outbox_after - time.monotonic()) if pending else 3600.0
            timeout = max(0.0, min(next_beat - time.monotonic(), retry))
            self.wake.wait(timeout)
            self.wake.clear()
        return self._shutdown()

    def _drain_once(self) -> None:
        """--once: run what this heartbeat leased, then report it."""
        self.work.join()
        self._flush_outbox()

    def _shutdown(self) -> int:
        _log.info("stopping: no new work; finishing the running action and flushing reports")
        self.stop_event.set()
        deadline = time.monotonic() + self.cfg.shutdown_timeout
        self.work.put([])  # wake the worker so it can see the stop flag
        self._worker.join(max(0.0, deadline - time.monotonic()))
        if self._worker.is_alive():
            _log.warn("an action is still running; it will be resumed or reported after the restart",
                      execution_id=self.running)  # fmt: skip
        if self.exit_code == 0:
            end = time.monotonic() + min(10.0, max(1.0, deadline - time.monotonic()))
            while self.agent.store.outbox_size() and time.monotonic() < end:
                if not self._flush_outbox():
                    break
        left = self.agent.store.outbox_size()
        if left:
            _log.warn("reports still queued; they are sent after the next start", queued=left)
        self.client.close()
        return self.exit_code

    # ----------------------------------------------------------- heartbeat

    def build_heartbeat(self) -> wm.HeartbeatRequest:
        vms = vm_summaries(self.agent.store)
        facts = None
        if self._facts is None or self.seq % FACTS_EVERY == 0:
            self._facts = host_facts(self.agent)
            facts = self._facts
        updates = (
            [wm.ExecutionProgress(execution_id=self.running)] if self.running and _uuid(self.running) else []
        )
        return wm.HeartbeatRequest(
            heartbeat_seq=self.seq,
            agent_version=__version__,
            host_facts=facts,
            vms=vms,
            execution_updates=updates,
            sent_at=dt.datetime.now(dt.UTC),
            # Issue 15: the VMs' kernel counters from the metrics' collector (one netlink dump, two preads a VM).
            vm_counters=c.heartbeat(self.agent.store.list_vms()) if (c := getattr(self.metrics, "counters", None)) else [],
            consoles=self.consoles.pending,
        )

    def heartbeat(self) -> wm.HeartbeatResponse:
        self.seq += 1
        req = self.build_heartbeat()
        t0 = time.monotonic()
        try:
            try:
                resp = self.client.heartbeat(req)
            except CpError as exc:
                if not exc.identity_gone:
                    raise
                resp = self._retry_with_disk_credentials(req, exc)
        except (CpError, CpUnreachable, IdentityRejected) as exc:
            self._record_heartbeat(False, exc.message)
            if self.metrics is not None:
                self.metrics.heartbeat_failed(time.monotonic() - t0)
            raise
        self._pending = 0
        took = time.monotonic() - t0
        if self.metrics is not None:
            self.metrics.heartbeat_sent(took)
        self._record_heartbeat(True, None)
        if resp.next_heartbeat_seconds and resp.next_heartbeat_seconds > 0 and not self.cfg.interval_forced:
            self.interval = float(resp.next_heartbeat_seconds)
        for plan in resp.pending_plans:
            self._accept_plan(plan)
        if self.consoles.after_heartbeat(req, resp):
            return self.heartbeat()  # the tails asked for go now: an operator is waiting on this round trip
        return resp

    def _record_heartbeat(self, ok: bool, error: str | None) -> None:
        prev = json.loads(self.agent.store.get_meta(HEARTBEAT_META) or "{}")
        now = time.time()
        doc = {
            "last_attempt_at": now,
            "last_success_at": now if ok else prev.get("last_success_at"),
            "status": "connected" if ok else "unreachable",
            "error": error,
            "control_plane": self.ident.control_plane,
        }
        self.agent.store.set_meta(HEARTBEAT_META, json.dumps(doc))

    def _accept_plan(self, plan: wm.LeasedPlan) -> None:
        actions: list[Action] = []
        for la in plan.actions:
            if la.execution_id in self.known:
                continue
            try:
                a = parse_action(
                    {"action_id": la.execution_id, "type": la.type, "params": la.params,
                     "timeout_seconds": la.timeout_seconds, "execution_id": la.execution_id},
                    f"plan {plan.plan_id} action {la.action_id}",
                )  # fmt: skip
            except NkudoError as exc:
                # The control plane validates plans with the same schema; refuse loudly if it did not.
                self._report_invalid(la, exc)
                continue
            a.label = la.action_id
            actions.append(a)
            self.known.add(la.execution_id)
        if actions:
            _log.info("plan leased", plan_id=plan.plan_id, actions=len(actions))
            self.work.put(actions)

    def _report_invalid(self, la: wm.LeasedAction, exc: NkudoError) -> None:
        res = wm.ActionResult(execution_id=la.execution_id, status=reported_status(ResultStatus.FAILED),
                              action_id=la.action_id[:128], error_code=ErrorCode.INVALID_ARGUMENT,
                              message=exc.message[:8000])  # fmt: skip
        self.agent.store.enqueue(OutboxEntry(OutboxKind.RESULT, la.execution_id, encode(res).decode()))
        self.known.add(la.execution_id)

    # -------------------------------------------------------------- worker

    def _work_loop(self) -> None:
        while True:
            actions = self.work.get()
            try:
                if not actions or (self.stop_event.is_set() and not self.cfg.once):
                    return  # the shutdown sentinel, or stopping before this plan started
                for a in actions:
                    if self.stop_event.is_set() and not self.cfg.once:
                        return  # not started: the lease expires and the control plane offers it again
                    self.running = a.execution_id
                    try:
                        out = self.executor.execute(a)
                    finally:
                        self.running = None
                    self.wake.set()  # report promptly
                    if not out.ok:
                        break  # the control plane cancels the rest of the plan
            finally:
                self.work.task_done()

    def _on_outcome(self, out: Outcome) -> None:
        if self.metrics is not None:
            self.metrics.action_finished(out.type, out.status, out.duration, replayed=out.replayed)

    # -------------------------------------------------------------- outbox

    def _flush_outbox(self) -> bool:
        """Send queued reports in order through the typed client routes; True if the queue made progress."""
        progressed = False
        if time.monotonic() < self.outbox_after:
            return progressed
        while True:
            batch = self.agent.store.outbox_peek(50)
            if not batch:
                return progressed
            try:
                for q in batch:
                    if q.kind is OutboxKind.LOGS:
                        self.client.logs(_stored(q, wm.LogBatch))
                        self.agent.store.outbox_ack([q.id])
                results = [q for q in batch if q.kind is OutboxKind.RESULT]
                if results:
                    report = wm.ResultReport(results=[_stored(q, wm.ActionResult) for q in results])
                    for r in self.client.results(report).results:
                        if r.outcome == "rejected":
                            _log.warn(
                                "control plane rejected a result", execution_id=r.execution_id, code=r.code
                            )
                    self.agent.store.outbox_ack([q.id for q in results])
                progressed = True
            except CpUnreachable as exc:
                self.agent.store.outbox_failed([q.id for q in batch], exc.message)
                return progressed
            except CpError as exc:
                if exc.rate_limited:  # issue 12: kept (a 4xx used to drop it) and retried after Retry-After
                    self.outbox_after = time.monotonic() + rate_limited_delay(exc.retry_after, 2.0, self.rand())
                    _log.warn("control plane rate-limited a report; retrying later", code=exc.code,
                              retry_in_s=round(self.outbox_after - time.monotonic(), 1))
                if exc.rate_limited or exc.status >= 500 or exc.identity_gone:
                    self.agent.store.outbox_failed([q.id for q in batch], exc.message)
                    return progressed
                # A 4xx for one message is permanent: drop it (logged) instead of blocking the queue forever.
                _log.error("control plane refused a report; dropping it", code=exc.code, error=exc.message)
                self.agent.store.outbox_ack([batch[0].id])
            except _Unreadable as exc:
                # Queued by this agent, so never expected; dropped like a refused report rather than block the queue.
                _log.error("a queued report cannot be read; dropping it", kind=str(exc.report.kind),
                           key=exc.report.key, error=exc.message)  # fmt: skip
                self.agent.store.outbox_ack([exc.report.id])

    # ------------------------------------------------------------- renewal

    def pickup_credentials(self) -> tuple[Creds, str]:
        """Switch the live TLS context to credentials another process installed (``nkudo-edge renew``).

        Why: the old certificate stops working when the control plane's renew grace ends,
        so a daemon that kept it would lock itself out although valid credentials are on
        disk. ``load_cert_chain`` refuses a key that does not match the certificate, so a
        pair caught half-renamed is never used: it is retried on the next round.
        """
        stamp = renewal.cred_stamp(self.pki)
        if stamp is None:
            return Creds.GONE, f"the credentials in {self.pki.dir} were removed"
        if stamp == self._creds:
            return Creds.SAME, ""
        if renewal.installing(self.pki):
            return Creds.PENDING, f"a renewal is installing new credentials in {self.pki.dir}"
        try:
            self.client.reload(self.pki.cert, self.pki.key, self.pki.ca)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__
            return Creds.PENDING, f"the credentials in {self.pki.dir} changed but cannot be loaded ({reason})"
        self._creds = stamp
        _log.info("switched to the credentials renewed by another process", pki_dir=self.pki.dir)
        return Creds.SWITCHED, ""

    def _retry_with_disk_credentials(self, req: wm.HeartbeatRequest, exc: CpError) -> wm.HeartbeatResponse:
        """The control plane refused the identity in use: before giving up, try the one on disk.

        Re-enrolling is advised only when the credentials on disk are refused too
        (or are the ones that were refused, or are gone).
        """
        refused = f"the control plane no longer accepts this agent ({exc.code}: {exc.message})"
        advice = "enroll the host again with a new token"
        state, why = self.pickup_credentials()
        if state is Creds.SAME:
            raise IdentityRejected(f"{refused}; {advice}", code=exc.code) from None
        if state is Creds.GONE:
            raise IdentityRejected(f"{refused} and {why}; {advice}", code=exc.code) from None
        if state is Creds.PENDING:
            self._pending += 1
            if self._pending >= PENDING_LIMIT:
                raise IdentityRejected(
                    f"{refused}, and {why}; restore valid credentials and restart, or {advice}", code=exc.code
                ) from None
            raise CpError(
                f"the control plane refused the credentials in use and {why}; retrying",
                code=ErrorCode.CREDENTIALS_PENDING,
                status=exc.status,
            ) from None
        try:
            return self.client.heartbeat(req)
        except CpError as again:
            if not again.identity_gone:
                raise
            raise IdentityRejected(
                f"{refused}, nor with the other credentials found in {self.pki.dir} (renewed by another "
                f"process?), which were tried too ({again.code}: {again.message}); {advice}",
                code=again.code,
            ) from None

    def _maybe_renew(self) -> None:
        due = self.ident.renew_due()
        if due is None:  # identity from before validity was recorded: read the certificate once
            info = load_cert_info(self.pki)
            if info is None:
                return
            self.ident.cert_not_before, self.ident.cert_not_after = (
                info.not_before.isoformat(),
                info.not_after.isoformat(),
            )
            save_identity(self.agent.store, self.ident)
            due = info.renew_due()
        if not due:
            return
        stored = load_identity(self.agent.store)
        if (
            stored is not None
            and stored.cert_not_after != self.ident.cert_not_after
            and not stored.renew_due()
        ):
            # `nkudo-edge renew` installed a new certificate (picked up by pickup_credentials).
            self.ident.cert_not_before, self.ident.cert_not_after = (
                stored.cert_not_before,
                stored.cert_not_after,
            )
            return
        try:
            resp = renewal.renew(self.client, self.pki, self.ident.agent_id)
        except (CpError, CpUnreachable) as exc:
            _log.warn("certificate renewal failed; will retry", code=exc.code, error=exc.message)
            return
        self._creds = renewal.cred_stamp(self.pki)
        self.ident.record_cert(resp.client_certificate_pem.encode())
        save_identity(self.agent.store, self.ident)
        _log.info("certificate renewed", expires_at=resp.certificate_expires_at.isoformat())


def vm_summaries(store: Any) -> list[wm.VMSummary]:
    """The VM list every heartbeat carries (the daemon's and verify-heartbeat's alike)."""
    return [
        wm.VMSummary(
            vm_id=vm.vm_id,
            state=vm.status,
            name=vm.name,
            vcpus=int(vm.spec.get("vcpus", 0)),
            memory_mib=int(vm.spec.get("memory_mib", 0)),
        )
        for vm in store.list_vms()
    ]


def _uuid(s: str) -> bool:
    import re

    return re.fullmatch(wm.UUID_PATTERN, s) is not None


def host_facts(agent: Agent) -> wm.HostFacts:
    """The heartbeat's host facts (cheap: psutil, statvfs, the KVM probe without a test VM)."""
    import os

    import psutil

    from nkudo.host import checks
    from nkudo.host.facts import os_release
    from nkudo.host.kvm import probe_kvm

    u = os.uname()
    disks = []
    seen = set()
    for p in (agent.cfg.state_dir, agent.cfg.runtime_dir, agent.cfg.snapshot_dir):
        base = checks.nearest_existing(p)
        try:
            st = os.statvfs(base)
            dev = os.stat(base).st_dev
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        disks.append(
            wm.Disk(
                mountpoint=base, total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize
            )
        )
    hostname = u.nodename
    return wm.HostFacts(
        cpu_cores=psutil.cpu_count(logical=True) or 0,
        memory_total_bytes=psutil.virtual_memory().total,
        storage_total_bytes=sum(d.total_bytes for d in disks),
        disks=disks,
        os=os_release().get("PRETTY_NAME", "linux")[:256],
        arch=u.machine,
        kernel=u.release[:256],
        kvm_available=probe_kvm("/dev/kvm", create_vm=False).ok,
        cloud_hypervisor_available=checks.which(agent.cfg.cloud_hypervisor_bin) is not None,
        hostname=hostname if _hostname_ok(hostname) else None,
    )


def _hostname_ok(h: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", h) is not None
