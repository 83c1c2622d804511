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
