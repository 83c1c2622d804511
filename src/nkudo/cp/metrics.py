"""Prometheus metrics of one control-plane process (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nkudo_cp_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "nkudo_cp_http_request_duration_seconds", "HTTP request latency by route", ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=r,
        )
        self.heartbeats = Counter("nkudo_cp_heartbeats_total", "Heartbeats ingested", registry=r)
        self.enrollments = Counter("nkudo_cp_enrollments_total", "Agent enrollments by outcome", ["outcome"],
                                   registry=r)
        self.results = Counter("nkudo_cp_execution_results_total", "Execution results by outcome", ["outcome"],
                               registry=r)
        self.log_lines = Counter("nkudo_cp_log_lines_total", "Execution log lines by outcome", ["outcome"],
                                 registry=r)
        self.agents = Gauge("nkudo_cp_agents", "Agents by state", ["state"], registry=r)
        self.plans = Gauge("nkudo_cp_plans", "Plans by status", ["status"], registry=r)
        self.executions = Gauge("nkudo_cp_executions", "Executions by state", ["state"], registry=r)
        self.swept = Counter("nkudo_cp_agents_marked_offline_total", "Agents marked offline by the sweeper",
                             registry=r)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request and record its latency.

        Why a cache of labelled children: ``labels()`` builds and locks a label tuple on every call, which is
        a measurable share of a heartbeat's CPU at a thousand requests a second; routes, methods and statuses
        are few, so the children are looked up once each.
        """
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(method, route, str(status)), self.latency.labels(method, route))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
