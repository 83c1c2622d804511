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
        # issue 12 part 2: the audit chain's verification (background verifier, POST /admin/audit/verify)
        self.audit_valid = Gauge("nkudo_cp_audit_chain_valid",
                                 "1 if the last full audit verification found every chain intact, else 0", registry=r)
        self.audit_verifications = Counter("nkudo_cp_audit_verifications_total",
                                           "Full audit-chain verifications by result (valid, broken)", ["result"],
                                           registry=r)
        self.audit_events_verified = Gauge("nkudo_cp_audit_events_verified",
                                           "Events the last full audit verification checked", registry=r)
        self.audit_unsigned_events = Gauge("nkudo_cp_audit_unsigned_events",
                                           "Events not yet covered by a signed checkpoint at the last verification",
                                           registry=r)
        self.audit_last_verified = Gauge("nkudo_cp_audit_last_verification_timestamp_seconds",
                                         "When the last full audit verification finished (Unix time)", registry=r)
        self.audit_checkpoints = Counter("nkudo_cp_audit_checkpoints_total", "Audit checkpoints by outcome",
                                         ["outcome"], registry=r)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        # issue 12 part 1: rate limiting and lock-out
        self.rate_limit = Counter("nkudo_cp_rate_limit_requests_total",
                                  "Requests seen by the rate limiter, by route class and outcome (allowed, rejected)",
                                  ["route_class", "outcome"], registry=r)
        self.auth_failures = Counter("nkudo_cp_auth_failures_total",
                                     "Failed authentications counted towards lock-out, by credential type",
                                     ["credential"], registry=r)
        self.lockouts = Counter("nkudo_cp_lockouts_total", "Sources locked out, by credential type", ["credential"],
                                registry=r)
        self.lockout_refusals = Counter("nkudo_cp_lockout_refusals_total",
                                        "Requests refused because their source is locked out, by credential type",
                                        ["credential"], registry=r)
        self.ui_live_renders = Counter("nkudo_cp_ui_live_renders_total",
                                       "Dashboard live-view renders by view; browsers showing the same view share "
                                       "one render per change burst", ["view"], registry=r)
        self._rate_children: dict[tuple[str, bool], Counter] = {}

    def rate_limited(self, route_class: str, allowed: bool) -> None:
        """Count one rate-limiter decision (children cached: this runs on every request)."""
        key = (route_class, allowed)
        child = self._rate_children.get(key)
        if child is None:
            child = self.rate_limit.labels(route_class, "allowed" if allowed else "rejected")
            self._rate_children[key] = child
        child.inc()

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
