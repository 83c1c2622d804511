"""The edge agent's Prometheus metrics and the ``/metrics`` HTTP server behind ``--metrics-addr``.

Metric names, types and labels are the Go original's (its phase-3 report), so
existing dashboards keep working; the values are what it never delivered.

=====================================  =========  =========================  ======================================
name                                   type       labels                     value
=====================================  =========  =========================  ======================================
``nkudo_vms_total``                    gauge      ``state``                  VMs in the store by status; every
                                                                             status is emitted (0 included), lower-
                                                                             cased ``VmStatus`` values
``nkudo_vm_cpu_cores``                 gauge      ``vm_id``, ``vm_name``     ``spec["vcpus"]`` of every VM not
                                                                             ``deleted``
``nkudo_vm_memory_bytes``              gauge      ``vm_id``, ``vm_name``     ``spec["memory_mib"] * 2**20``
``nkudo_actions_executed_total``       counter    ``action_type``, ``status`` actions that ran, ``status`` one of
                                                                             ``succeeded``/``failed``/``timed_out``
``nkudo_actions_duration_seconds``     histogram  ``action_type``            wall time of each action that ran
``nkudo_heartbeats_sent_total``        counter    –                          heartbeats the control plane accepted
``nkudo_heartbeat_duration_seconds``   histogram  –                          time of every heartbeat attempt
``nkudo_heartbeat_failures_total``     counter    –                          heartbeats that failed
``nkudo_disk_usage_bytes``             gauge      ``path``                   used bytes of the file system holding
                                                                             ``path`` (``df``'s *Used*)
``nkudo_disk_total_bytes``             gauge      ``path``                   size of that file system
``nkudo_host_cpu_usage_percent``       gauge      –                          host CPU busy % since the last scrape
``nkudo_host_memory_usage_bytes``      gauge      –                          MemTotal − MemAvailable
``nkudo_build_info``                   gauge      ``version``, ``python``    always 1
=====================================  =========  =========================  ======================================

With a ``VmCounterCollector`` (the daemon's), the per-VM kernel counters of :mod:`nkudo.agent.counters`
(``nkudo_vm_network_*_total``, ``nkudo_vm_cpu_seconds_total``...) are collected at scrape time too.

Design choices, and why:

* **Own registry, no globals.** ``AgentMetrics`` owns a ``CollectorRegistry``
  so several agents (tests, the e2e harness) can live in one process, and so
  the control plane's metrics never leak into the agent's exposition.
* **No ``*_created`` series.** ``prometheus_client``'s ``Counter`` and
  ``Histogram`` add a ``<name>_created`` gauge per series, and the only switch
  is process-global (``disable_created_metrics``) which would also change the
  control plane's output in shared test processes. The counters here are a few
  integers behind a lock, exposed through ``CounterMetricFamily`` /
  ``HistogramMetricFamily`` from one custom collector, which gives exactly the
  names above and nothing else.
* **Scrape-time state.** VM, disk and host gauges are computed when Prometheus
  scrapes, straight from the SQLite store / ``statvfs`` / ``psutil``, so they
  can never go stale (the Go original set them once per loop, to 0, and never
  deleted series of removed VMs).
* **State labels.** ``VmStatus`` values lower-cased (``creating``, ``created``,
  ``running``, ``paused``, ``stopped``, ``crashed``, ``error``, ``deleted``),
  all eight always present so ``sum(nkudo_vms_total)`` and per-state panels see
  every series from the first scrape. ``deleted`` counts rows still in the
  store with that status (normally 0: deleted VMs are removed).
* **Heartbeat duration is a histogram** (as in the Go original): histograms
  aggregate across a fleet (``histogram_quantile(0.99, sum by (le) (rate(...)))``),
  summaries do not; and its ``_count`` counts every attempt, so
  ``nkudo_heartbeat_failures_total / nkudo_heartbeat_duration_seconds_count``
  is the failure ratio. Buckets stop at 20 s, the heartbeat's HTTP timeout.
* **Replayed and NOT_RUN actions are not counted**: a replayed result is an
  action that already ran (and was counted) before a restart or a retried plan;
  NOT_RUN never ran. Counting either would inflate ``rate()``.

Only the agent daemon imports this module, so ``prometheus_client`` and
``psutil`` are imported here at module level and never at CLI start-up.
"""

from __future__ import annotations

import http.server
import ipaddress
import math
import os
import platform
import re
import socket
import socketserver
import threading
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, generate_latest

from nkudo import log
from nkudo.agent.counters import VmCounterCollector, metric_families
from nkudo.agent.state import StateStore
from nkudo.errors import HostError, ValidationError
from nkudo.vmstate import VmStatus
from nkudo.wire.vocab import ErrorCode, ResultStatus

#: Action wall times range from milliseconds (pause) to minutes (create with an image copy, snapshot).
ACTION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
#: A heartbeat is one HTTPS round trip plus host facts; 20 s is its HTTP timeout.
HEARTBEAT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)

#: Executor statuses that mean "the action ran" → their ``status`` label value.
_COUNTED_STATUSES = {s: s.value.lower() for s in ResultStatus if s.ran}
_ALL_STATUSES = frozenset(ResultStatus)

METRICS_ADDR_FLAG = "--metrics-addr"
DEFAULT_METRICS_ADDR = ":9090"


class _OutcomeLike(Protocol):
    """The fields of ``nkudo.agent.executor.Outcome`` that metrics read (no import: avoids a cycle)."""

    @property
    def type(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def duration(self) -> float | None: ...
    @property
    def replayed(self) -> bool: ...


class _Histogram:
    """Cumulative-bucket histogram state for one label set (not thread-safe: the owner locks)."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)  # per bucket, non-cumulative; +Inf is ``count``
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            acc += n
            out.append((_fmt_bound(bound), float(acc)))
        out.append(("+Inf", float(self.count)))
        return out


def _fmt_bound(b: float) -> str:
    # Same spelling as prometheus_client's own histograms (``1.0``, ``0.005``), so ``le`` values stay stable.
    return repr(float(b))


def _statvfs_nearest(path: str) -> os.statvfs_result:
    """``statvfs`` of ``path`` or, if it does not exist yet, of its nearest existing ancestor.

    Why: the agent's directories (runtime, snapshots) may be created lazily, but the file system
    they will land on is already known and is what the operator needs to watch.
    """
    p = os.path.abspath(path)
    while True:
        try:
            return os.statvfs(p)
        except FileNotFoundError:
            parent = os.path.dirname(p)
            if parent == p:
                raise
            p = parent


class AgentMetrics:
    """All of the agent's metrics, in a registry of its own; thread-safe.

    The daemon calls :meth:`action_finished` (or :meth:`observe_outcome`) for every action outcome,
    :meth:`heartbeat_sent` / :meth:`heartbeat_failed` for every heartbeat attempt, and :meth:`serve`
    once with ``--metrics-addr``. Everything else is read at scrape time.
    """

    def __init__(
        self,
        store: StateStore | None,
        disk_paths: Sequence[str],
        version: str,
        counters: VmCounterCollector | None = None,
    ) -> None:
        self.store = store
        self.counters = counters  # per-VM kernel counters (issue 15), collected at scrape time
        # Label values are absolute paths, deduplicated, in the given order.
        seen: dict[str, None] = {}
        for p in disk_paths:
            seen.setdefault(os.path.normpath(os.path.abspath(p)), None)
        self.disk_paths: tuple[str, ...] = tuple(seen)
        self.version = version
        self._lock = threading.Lock()
        self._actions: dict[tuple[str, str], int] = {}
        self._action_durations: dict[str, _Histogram] = {}
        self._heartbeats_sent = 0
        self._heartbeat_failures = 0
        self._heartbeat_duration = _Histogram(HEARTBEAT_BUCKETS)
        self._log = log.get_logger("metrics")
        # psutil's first cpu_percent(interval=None) call returns a meaningless 0.0; prime it so the
        # first scrape reports usage since the agent started.
        psutil.cpu_percent(interval=None)
        self.registry = CollectorRegistry()
        self.registry.register(_AgentCollector(self))

    # ------------------------------------------------------------ events

    def action_finished(
        self, action_type: str, status: str, duration_s: float | None, *, replayed: bool = False
    ) -> None:
        """Count one action outcome.

        ``status`` is the executor's (``SUCCEEDED``/``FAILED``/``TIMED_OUT``/``NOT_RUN``). ``NOT_RUN``
        and ``replayed`` outcomes are skipped (see the module docstring). ``duration_s`` of ``None``
        counts the action without observing the histogram; a negative one (the executor times actions
        with the wall clock, which can step back) is observed as 0.
        """
        known = status.upper() in _ALL_STATUSES
        if replayed or status.upper() == ResultStatus.NOT_RUN:
            return
        label = _COUNTED_STATUSES.get(ResultStatus(status.upper())) if known else None
        if label is None:
            raise ValueError(
                f"unknown action status {status!r} (expected one of {sorted(s.value for s in _COUNTED_STATUSES)})"
            )
        with self._lock:
            key = (action_type, label)
            self._actions[key] = self._actions.get(key, 0) + 1
            if duration_s is not None and not math.isnan(duration_s):
                h = self._action_durations.get(action_type)
                if h is None:
                    h = self._action_durations[action_type] = _Histogram(ACTION_BUCKETS)
                h.observe(max(0.0, duration_s))

    def observe_outcome(self, outcome: _OutcomeLike) -> None:
        """``action_finished`` from an executor ``Outcome`` (fits ``Executor(on_outcome=...)``)."""
        self.action_finished(outcome.type, outcome.status, outcome.duration, replayed=outcome.replayed)

    def heartbeat_sent(self, duration_s: float) -> None:
        """A heartbeat the control plane accepted, taking ``duration_s`` seconds."""
        with self._lock:
            self._heartbeats_sent += 1
            self._heartbeat_duration.observe(max(0.0, duration_s))

    def heartbeat_failed(self, duration_s: float | None = None) -> None:
        """A failed heartbeat; pass its duration too, so the histogram's ``_count`` counts every attempt."""
        with self._lock:
            self._heartbeat_failures += 1
            if duration_s is not None and not math.isnan(duration_s):
                self._heartbeat_duration.observe(max(0.0, duration_s))

    # ----------------------------------------------------------- exposing

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric, as ``/metrics`` serves it."""
        return generate_latest(self.registry)

    def serve(self, addr: str) -> MetricsServer | None:
        """Serve ``/metrics`` on ``addr`` (``--metrics-addr`` syntax) from a daemon thread.

        Returns ``None`` for ``off``. Raises ``ValidationError`` for a malformed address and
        ``HostError`` if the socket cannot be bound (port in use, address not on this host).
        """
        parsed = parse_metrics_addr(addr)
        if parsed is None:
            return None
        host, port = parsed
        return MetricsServer(self.registry, host, port)

    # --------------------------------------------------------- collection

    def _collect(self) -> Iterable[Metric]:
        yield from self._collect_vms()
        yield from self._collect_events()
        yield from self._collect_host()
        if self.counters is not None and self.store is not None:
            yield from metric_families(self.counters.collect(self.store.list_vms()))
        info = InfoMetricFamily("nkudo_build", "Build information of the nkudo edge agent")
        info.add_metric([], {"version": self.version, "python": platform.python_version()})
        yield info

    def _collect_vms(self) -> Iterable[Metric]:
        states = GaugeMetricFamily("nkudo_vms_total", "Total number of VMs by state", labels=["state"])
        cpu = GaugeMetricFamily(
            "nkudo_vm_cpu_cores", "Number of CPU cores per VM", labels=["vm_id", "vm_name"]
        )
        mem = GaugeMetricFamily(
            "nkudo_vm_memory_bytes", "Memory allocated to each VM in bytes", labels=["vm_id", "vm_name"]
        )
        vms = None
        if self.store is not None:
            try:
                vms = self.store.list_vms()
            except Exception as exc:  # a scrape must not take the agent down; absent series beat wrong ones
                self._log.warning("metrics: cannot list VMs", error=str(exc))
        if vms is not None:
            by_state = dict.fromkeys(VmStatus, 0)
            for vm in vms:
                by_state[vm.status] += 1
                if vm.status is VmStatus.DELETED:
                    continue
                vcpus = _number(vm.spec.get("vcpus"))
                if vcpus is not None:
                    cpu.add_metric([vm.vm_id, vm.name], vcpus)
                mib = _number(vm.spec.get("memory_mib"))
                if mib is not None:
                    mem.add_metric([vm.vm_id, vm.name], mib * 2**20)
            for st, n in by_state.items():
                states.add_metric([st.value.lower()], n)
        yield states
        yield cpu
        yield mem

    def _collect_events(self) -> Iterable[Metric]:
        with self._lock:
            actions = sorted(self._actions.items())
            durations = sorted((t, h.buckets(), h.total) for t, h in self._action_durations.items())
            sent, failures = self._heartbeats_sent, self._heartbeat_failures
            hb_buckets, hb_sum = self._heartbeat_duration.buckets(), self._heartbeat_duration.total
        executed = CounterMetricFamily(
            "nkudo_actions_executed_total", "Total actions executed", labels=["action_type", "status"]
        )
        for (atype, status), n in actions:
            executed.add_metric([atype, status], n)
        yield executed
        dur = HistogramMetricFamily(
            "nkudo_actions_duration_seconds", "Action execution duration in seconds", labels=["action_type"]
        )
        for atype, buckets, total in durations:
            dur.add_metric([atype], buckets, total)
        yield dur
        yield CounterMetricFamily("nkudo_heartbeats_sent_total", "Total heartbeats sent", value=sent)
        hb = HistogramMetricFamily(
            "nkudo_heartbeat_duration_seconds", "Heartbeat execution duration in seconds"
        )
        hb.add_metric([], hb_buckets, hb_sum)
        yield hb
        yield CounterMetricFamily(
            "nkudo_heartbeat_failures_total", "Total heartbeat failures", value=failures
        )

    def _collect_host(self) -> Iterable[Metric]:
        used = GaugeMetricFamily("nkudo_disk_usage_bytes", "Disk usage in bytes by path", labels=["path"])
        total = GaugeMetricFamily(
            "nkudo_disk_total_bytes", "Total disk space in bytes by path", labels=["path"]
        )
        for path in self.disk_paths:
            try:
                st = _statvfs_nearest(path)
            except OSError as exc:
                self._log.warning("metrics: cannot stat file system", path=path, error=str(exc))
                continue
            # df's Size and Used: blocks reserved for root count as neither used nor available.
            total.add_metric([path], st.f_blocks * st.f_frsize)
            used.add_metric([path], (st.f_blocks - st.f_bfree) * st.f_frsize)
        yield used
        yield total
        yield GaugeMetricFamily(
            "nkudo_host_cpu_usage_percent",
            "Host CPU usage percentage",
            value=psutil.cpu_percent(interval=None),
        )
        vm = psutil.virtual_memory()
        yield GaugeMetricFamily(
            "nkudo_host_memory_usage_bytes", "Host memory usage in bytes", value=vm.total - vm.available
        )


def _number(v: Any) -> float | None:
    """A spec field as a number, or ``None`` (no series) when absent or malformed."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


class _AgentCollector:
    """The custom collector: the registry calls ``collect`` on every scrape."""

    def __init__(self, owner: AgentMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        return self._owner._collect()


# ---------------------------------------------------------------- server


def parse_metrics_addr(addr: str) -> tuple[str, int] | None:
    """Parse ``--metrics-addr``: ``off`` → ``None``; ``[host]:port`` → ``(host, port)``.

    Accepted (Go ``net.Listen`` syntax, which the original used): ``:9090`` (all interfaces),
    ``127.0.0.1:9090``, ``[::1]:9090``, ``localhost:9090``; port 0 picks a free port. An empty
    host is returned as ``""``. The CLI can call this while parsing options to fail before starting.
    """
    raw = addr.strip()
    if raw.lower() == "off":
        return None

    def bad(why: str) -> ValidationError:
        return ValidationError(
            f"{METRICS_ADDR_FLAG} {addr!r} is invalid: {why} (use HOST:PORT, :PORT, [IPv6]:PORT or off)",
            field=METRICS_ADDR_FLAG,
        )

    if raw.startswith("["):
        host, sep, port_s = raw[1:].partition("]:")
        if not sep:
            raise bad("an IPv6 address must be written [ADDR]:PORT")
        if not _is_ipv6(host):
            raise bad(f"{host!r} is not an IPv6 address")
    else:
        host, sep, port_s = raw.rpartition(":")
        if not sep:
            raise bad("missing port")
        if ":" in host:
            raise bad("an IPv6 address must be written [ADDR]:PORT")
        if host and not (
            _is_ipv4(host) or (_HOSTNAME.fullmatch(host) and not host.replace(".", "").isdigit())
        ):
            raise bad(f"{host!r} is neither an IP address nor a host name")
    if not (port_s.isascii() and port_s.isdigit()) or int(port_s) > 65535:
        raise bad(f"port {port_s!r} is not a number from 0 to 65535")
    return host, int(port_s)


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _is_ipv4(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
    except ValueError:
        return False
    return True


def _is_ipv6(s: str) -> bool:
    try:
        ipaddress.IPv6Address(s)  # accepts a %zone suffix (fe80::1%eth0)
    except ValueError:
        return False
    return True


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET ``/metrics`` (and ``/`` pointing there); other paths 404, other methods 501 (stdlib)."""

    registry: CollectorRegistry  # set on the per-server subclass
    timeout = 10  # a stalled client cannot hold a handler thread forever
    server_version = "nkudo-edge-metrics"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            try:
                body = encoder(self.registry)
            except Exception as exc:  # a broken collector answers 500 to the scrape, not a dead thread
                log.get_logger("metrics").warning("metrics: collection failed", error=repr(exc))
                self._reply(500, "text/plain; charset=utf-8", f"metrics collection failed: {exc}\n".encode())
                return
            self._reply(200, content_type, body)
        elif path == "/":
            self._reply(200, "text/plain; charset=utf-8", b"nkudo-edge: metrics at /metrics\n")
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found; metrics are at /metrics\n")

    def _reply(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every 15 s would flood the agent's log; errors surface through log_error → debug.
        pass

    def log_error(self, format: str, *args: Any) -> None:
        log.get_logger("metrics").debug("metrics http: " + (format % args))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a scrape in flight never blocks agent shutdown

    def __init__(self, family: socket.AddressFamily, addr: tuple[str, int], handler: type[_Handler]) -> None:
        self.address_family = family
        super().__init__(addr, handler, bind_and_activate=False)
        try:
            if family == socket.AF_INET6 and addr[0] == "::":
                # ":PORT" means every interface, IPv4 included (as Go's net.Listen does).
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, a DNS query that can hang on an edge host
        # without a resolver; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`stop` shuts it down and frees the port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        handler = type("_BoundHandler", (_Handler,), {"registry": registry})
        self._httpd = _bind(host, port, handler)
        self.host: str = str(self._httpd.server_address[0])
        self.port: int = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="nkudo-metrics", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` of this server (loopback when bound to every interface)."""
        host = self.host
        if host in ("", "0.0.0.0"):  # noqa: S104 - only turning "any" into something connectable
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving, close the socket, and wait for the serving thread (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()


def _bind(host: str, port: int, handler: type[_Handler]) -> _Server:
    """Bind ``host:port``; an empty host is every interface (dual-stack, IPv4-only if IPv6 is off)."""
    candidates: list[tuple[socket.AddressFamily, str]]
    if host == "":
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]  # noqa: S104 - ":PORT" asks for it
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ValidationError(
                f"{METRICS_ADDR_FLAG}: cannot resolve {host!r}: {exc.strerror}", field=METRICS_ADDR_FLAG
            )
        candidates = [
            (fam, str(sa[0])) for fam, _, _, _, sa in infos if fam in (socket.AF_INET, socket.AF_INET6)
        ]
    last: OSError | None = None
    for family, bind_host in candidates:
        try:
            return _Server(family, (bind_host, port), handler)
        except OSError as exc:
            last = exc
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    raise HostError(
        f"{METRICS_ADDR_FLAG}: cannot listen on {where}: {last.strerror if last else 'no usable address'}",
        code=ErrorCode.METRICS_BIND_FAILED,
    )
