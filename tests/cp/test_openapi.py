"""The OpenAPI document covers every route, and generated requests never get a 500 or an undocumented status."""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nkudo.cp import openapi_gen, views
from nkudo.cp.http import ROUTES
from nkudo.wire import codec

from . import openapi_check
from .helpers import Agent, Server, Tenant, create_action

SPEC_PATH = Path(__file__).resolve().parents[2] / "src/nkudo/cp/openapi.yaml"
SPEC = yaml.safe_load(SPEC_PATH.read_text())
OPS = [(m.upper(), p, op) for p, item in SPEC["paths"].items() for m, op in item.items() if m != "parameters"]


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    routed = {(m, p) for m, p, _ in ROUTES}
    documented = {(m, p) for m, p, _ in OPS}
    assert routed == documented
    for m, p, op in OPS:
        assert op.get("responses"), (m, p)
        params = set(re.findall(r"{(\w+)}", p))
        declared = {prm.get("name") or prm["$ref"].rsplit("/", 1)[-1]
                    for prm in SPEC["paths"][p].get("parameters", []) if prm.get("in", "path") == "path"
                    or "$ref" in prm}
        assert params <= declared, (p, params, declared)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)

EXAMPLES: dict[str, dict[str, Any]] = {
    "/tenants": {"slug": "x", "name": "X"},
    "/tenants/{tenant_id}/api-keys": {"name": "k"},
    "/tenants/{tenant_id}/sites": {"name": "s"},
    "/tenants/{tenant_id}/enrollment-tokens": {"site_id": str(uuid.uuid4())},
    "/sites/{site_id}/plans": {"idempotency_key": "k", "actions": [create_action("v")]},
    "/v1/enroll": {"enrollment_token": "t", "csr_pem": "x", "hostname": "h"},
    "/v1/heartbeat": {"heartbeat_seq": 1, "vms": [{"vm_id": "a", "state": "RUNNING"}]},
    "/v1/executions/result": {"results": [{"execution_id": str(uuid.uuid4()), "status": "SUCCEEDED"}]},
    "/v1/logs": {"execution_id": str(uuid.uuid4()), "lines": [{"seq": 1, "message": "m"}]},
    "/v1/unenroll": {"reason": "other"},
    "/v1/renew": {"csr_pem": "x", "refresh_token": "r"},
}


@st.composite
def mutated(draw: st.DrawFn, path: str) -> Any:
    base = json.loads(json.dumps(EXAMPLES.get(path, {})))
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return draw(json_values)
    if base and choice == 1:
        base.pop(draw(st.sampled_from(sorted(base))))
    elif base and choice == 2:
        base[draw(st.sampled_from(sorted(base)))] = draw(json_values)
    elif choice == 3:
        base[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    return base


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, str, Any, str, dict[str, str]]:
    method, template, _ = draw(st.sampled_from(OPS))
    path = template
    for name in re.findall(r"{(\w+)}", template):
        value = draw(st.sampled_from(["<real>", "<uuid>", "<text>"]))
        if value == "<uuid>":
            value = str(uuid.uuid4())
        elif value == "<text>":
            value = urllib.parse.quote(draw(st.text(min_size=1, max_size=20)), safe="")
        path = path.replace("{" + name + "}", value if value != "<real>" else "{" + name + "}")
    query = ""
    if any(p.get("in") == "query" or "limit" in p.get("$ref", "") for p in SPEC["paths"][template].get("parameters",
                                                                                                       [])):
        query = draw(st.sampled_from(["", "?limit=5", "?limit=-1", "?limit=abc", "?after_seq=2", "?state=BOGUS"]))
    body = draw(mutated(template)) if method in ("POST", "PUT") else None
    auth = draw(st.sampled_from(["admin", "api_key", "none", "bogus", "agent"]))
    headers = {"X-Request-ID": draw(st.text(alphabet="abcdef0123456789", max_size=80))}
    return method, template, path + query, body, auth, headers


@pytest.fixture
def world(server: Server, tenant: Tenant, agent_dir: Path) -> dict[str, Any]:
    agent = Agent(server, agent_dir).enroll(tenant.token())
    plan = tenant.plan([create_action("vm-p")])
    return {
        "server": server, "tenant": tenant, "agent": agent,
        "ids": {"tenant_id": tenant.tenant_id, "site_id": tenant.site_id, "plan_id": plan["plan_id"],
                "execution_id": plan["executions"][0]["id"], "key_id": str(uuid.uuid4())},
        "clients": {"admin": server.client(admin=True), "api_key": server.client(api_key=tenant.api_key),
                    "none": server.client(), "bogus": server.client(api_key="nk_bogus"), "agent": agent.mtls},
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests())
def test_generated_requests_get_documented_statuses(world: dict[str, Any],
                                                    req: tuple[str, str, str, Any, str, dict[str, str]]) -> None:
    method, template, path, body, auth, headers = req
    for name, value in world["ids"].items():
        path = path.replace("{" + name + "}", value)
    client = world["clients"][auth]
    raw = None if body is None else json.dumps(body).encode()
    status, _, data = client.raw(method, path, raw, headers=headers)
    op = SPEC["paths"][template][method.lower()]
    documented = {int(s) for s in op["responses"]}
    assert status != 500, data[:300]
    # An id that is not a path segment anymore (quoted slash etc.) can miss every route: that is a 404 too.
    assert status in documented | {404}, (method, path, status, data[:300])
    if status >= 400:
        err = json.loads(data)["error"]
        assert err["code"] and err["message"]


# --- issue 11: generated schemas, every response described and checked -------------------------------------


def test_document_schemas_are_generated_from_the_models() -> None:
    """Issue 11: the schemas are generated from the msgspec models; a model changed without regenerating fails."""
    text = SPEC_PATH.read_text()
    assert openapi_gen.render(text) == text, "openapi.yaml is stale: run python -m nkudo.cp.openapi_gen"
    assert SPEC["components"]["schemas"] == openapi_gen.schemas()
    assert openapi_gen.main(["--check"]) == 0


def test_generator_check_reports_a_stale_document(tmp_path: Path) -> None:
    """Issue 11: ``--check`` fails on a document whose schemas differ from the models; a run rewrites it."""
    stale = tmp_path / "openapi.yaml"
    stale.write_text(SPEC_PATH.read_text().replace("title: TenantView", "title: Tenant"))
    assert openapi_gen.main(["--check", "--path", str(stale)]) == 1
    assert openapi_gen.main(["--path", str(stale)]) == 0
    assert stale.read_text() == SPEC_PATH.read_text()


def _json_schema(response: dict[str, Any]) -> dict[str, Any] | None:
    content = openapi_check._deref(response).get("content") or {}
    schema: dict[str, Any] | None = content.get("application/json", {}).get("schema")
    return schema


def test_every_json_body_is_a_generated_schema() -> None:
    """Issue 11: 13 routes answered an untyped ``{type: object}``; now every JSON body names a model's schema."""
    generated = set(openapi_gen.schemas())
    for method, path, op in OPS:
        for status, response in op["responses"].items():
            schema = _json_schema(response)
            if schema is None:
                # Only bodies that are not JSON: no content, the Prometheus text and the PEM CRL.
                assert status == "204" or (method, path) in {("GET", "/metrics"), ("GET", "/v1/crl.pem"),
                                                                  ("GET", "/v1/crl")}, (
                    method, path, status)
                continue
            ref = schema.get("$ref", "")
            assert ref.removeprefix("#/components/schemas/") in generated, (method, path, status, schema)
        body = op.get("requestBody")
        if body is not None:
            ref = body["content"]["application/json"]["schema"]["$ref"]
            assert ref.removeprefix("#/components/schemas/") in generated, (method, path)


def test_checker_rejects_what_the_document_does_not_describe() -> None:
    """Issue 11: a body that does not match its schema, or an undocumented status, fails the test that got it."""
    json_ct = {"content-type": "application/json; charset=utf-8"}
    tenant = {"id": str(uuid.uuid4()), "slug": "acme", "name": "Acme", "created_at": "2024-05-01T12:00:00.5Z"}
    openapi_check.check("GET", "/tenants", 200, json_ct, json.dumps({"tenants": [tenant]}).encode())
    bad_bodies = [
        {"tenants": [{**tenant, "slug": 7}]},  # wrong type
        {"tenants": [{**tenant, "extra": 1}]},  # a key the view does not have
        {"tenants": [{k: v for k, v in tenant.items() if k != "name"}]},  # a missing field
        {"tenants": [{**tenant, "created_at": "yesterday"}]},  # not a timestamp
        {"tenants": [{**tenant, "id": "not-a-uuid"}]},
    ]
    for bad in bad_bodies:
        with pytest.raises(openapi_check.ResponseMismatch):
            openapi_check.check("GET", "/tenants", 200, json_ct, json.dumps(bad).encode())
    with pytest.raises(openapi_check.ResponseMismatch, match="not documented"):
        openapi_check.check("GET", "/tenants", 409, json_ct, b'{"error": {"code": "X", "message": "m"}}')
    with pytest.raises(openapi_check.ResponseMismatch):  # an error that is not the error envelope
        openapi_check.check("GET", "/tenants", 401, json_ct, b'{"detail": "nope"}')
    with pytest.raises(openapi_check.ResponseMismatch):  # a success on a path no operation documents
        openapi_check.check("GET", "/nowhere", 200, json_ct, b"{}")
    openapi_check.check("PUT", "/tenants", 405, json_ct, b'{"error": {"code": "METHOD_NOT_ALLOWED", "message": "m"}}')
    with pytest.raises(openapi_check.ResponseMismatch):
        openapi_check.check("DELETE", f"/tenants/{uuid.uuid4()}/api-keys/{uuid.uuid4()}", 204, {}, b"{}")


def test_every_response_of_the_suite_is_checked(server: Server, tenant: Tenant) -> None:
    """Issue 11: the clients the API tests get from ``Server.client`` check each response against the document."""
    before = openapi_check.checked
    tenant.client.call("GET", f"/tenants/{tenant.tenant_id}/sites")
    st_, _, _ = server.client().raw("GET", "/tenants")
    assert st_ == 401
    assert openapi_check.checked == before + 2


VIEW_OF: dict[str, type[Any]] = {
    "/healthz": views.Health, "/readyz": views.Readiness, "/tenants": views.TenantList,
    "/tenants/{tenant_id}/api-keys": views.ApiKeyList, "/tenants/{tenant_id}/sites": views.SiteList,
    "/tenants/{tenant_id}/enrollment-tokens": views.TokenList, "/tenants/{tenant_id}/audit-events": views.AuditEvents,
    "/sites/{site_id}/hosts": views.HostList, "/sites/{site_id}/vms": views.VmList,
    "/sites/{site_id}/agents": views.AgentList, "/sites/{site_id}/executions": views.ExecutionList,
    "/plans/{plan_id}": views.PlanView, "/executions/{execution_id}": views.ExecutionView,
    "/executions/{execution_id}/logs": views.ExecutionLogs,
}


#: The key order of each body as the API sent it before the views existed (the dicts of ``service.py``), written
#: out here, independently of the views, so that a view that reorders, renames or drops a key fails.
KEY_ORDER: dict[str, list[str]] = {
    "Health": ["status", "time"], "Readiness": ["status", "checks"],
    "TenantView": ["id", "slug", "name", "created_at"], "TenantList": ["tenants"],
    "ApiKeyCreated": ["id", "tenant_id", "name", "api_key", "created_at", "expires_at"],
    "ApiKeyView": ["id", "tenant_id", "name", "created_at", "expires_at"], "ApiKeyList": ["api_keys"],
    "SiteView": ["id", "tenant_id", "name", "connectivity_state", "created_at", "external_key"], "SiteList": ["sites"],
    "TokenIssued": ["token_id", "site_id", "token", "expires_at", "one_time"], "TokenList": ["tokens"],
    "TokenView": ["id", "site_id", "site_name", "created_at", "expires_at", "consumed", "consumed_at",
                  "consumed_by_agent_id"],
    "AuditEventView": ["id", "tenant_id", "actor_type", "actor_id", "action", "object_type", "object_id",
                       "request_id", "source_ip", "details", "occurred_at"], "AuditEvents": ["events", "next"],
    "ExecutionView": ["id", "plan_id", "tenant_id", "site_id", "position", "action_id", "type", "params",
                      "timeout_seconds", "vm_id", "state", "agent_id", "attempts", "error_code", "error_message",
                      "created_at", "updated_at", "started_at", "finished_at"], "ExecutionList": ["executions", "next"],
    "PlanView": ["plan_id", "tenant_id", "site_id", "idempotency_key", "plan_status", "deduplicated", "created_at",
                 "updated_at", "completed_at", "leased_by_agent_id", "lease_expires_at", "executions"],
    "ExecutionLogs": ["execution_id", "logs", "next_after_seq", "next"],
    "LogEntryView": ["seq", "level", "message", "emitted_at", "ingested_at"],
    "HostView": ["id", "tenant_id", "site_id", "hostname", "facts", "fingerprint", "agent_id", "agent_state",
                 "agent_last_heartbeat_at", "last_facts_at", "created_at"], "HostList": ["hosts", "next"],
    "VmView": ["vm_id", "tenant_id", "site_id", "host_id", "name", "state", "vcpus", "memory_mib", "updated_at",
               "last_transition_at"], "VmList": ["vms", "next"],
    "AgentStatusView": ["id", "site_id", "host_id", "hostname", "state", "agent_version", "enrolled_at",
                        "last_heartbeat_at", "cert_expires_at"], "AgentList": ["agents", "next"],
}
#: Keys absent (not null) when empty.
OMITTED_WHEN_EMPTY = {("SiteView", "external_key"), ("Readiness", "checks")} | {
    (n, "next") for n in ("AuditEvents", "ExecutionList", "ExecutionLogs", "HostList", "VmList", "AgentList")}  # issue 13
#: Body -> (its list field, the view of the items).
ITEMS = {"TenantList": ("tenants", "TenantView"), "ApiKeyList": ("api_keys", "ApiKeyView"),
         "SiteList": ("sites", "SiteView"), "TokenList": ("tokens", "TokenView"),
         "AuditEvents": ("events", "AuditEventView"), "ExecutionList": ("executions", "ExecutionView"),
         "PlanView": ("executions", "ExecutionView"), "ExecutionLogs": ("logs", "LogEntryView"),
         "HostList": ("hosts", "HostView"), "VmList": ("vms", "VmView"), "AgentList": ("agents", "AgentStatusView")}


def _assert_key_order(name: str, obj: dict[str, Any]) -> None:
    order = KEY_ORDER[name]
    assert list(obj) == [k for k in order if k in obj], (name, list(obj))
    assert {k for k in order if k not in obj} <= {k for n, k in OMITTED_WHEN_EMPTY if n == name}, (name, list(obj))
    if name in ITEMS:
        field, item_view = ITEMS[name]
        assert obj[field], (name, field)  # the scenario fills every list, so every item view is checked
        for item in obj[field]:
            _assert_key_order(item_view, item)


def test_views_encode_exactly_the_bytes_the_api_sends(server: Server, tenant: Tenant, agent_dir: Path) -> None:
    """Issue 11: each body keeps its keys, their order, nulls and omissions, and its view re-encodes the same bytes.

    So returning the views instead of dicts changes no response, which the restructuring must not.
    """
    admin = server.client(admin=True)
    created: list[tuple[type[Any], bytes]] = []

    def post(client: Any, path: str, body: Any, view: type[Any]) -> Any:
        status, _, data = client.raw("POST", path, json.dumps(body).encode())
        assert status in (200, 201), data
        created.append((view, data))
        return json.loads(data)

    tid = tenant.tenant_id
    post(admin, "/tenants", {"slug": "v-" + uuid.uuid4().hex[:10], "name": "V"}, views.TenantView)
    post(admin, f"/tenants/{tid}/api-keys", {"name": "k", "expires_in_seconds": 3600}, views.ApiKeyCreated)
    post(admin, f"/tenants/{tid}/api-keys", {"name": "k2"}, views.ApiKeyCreated)
    post(admin, f"/tenants/{tid}/sites", {"name": "s-" + uuid.uuid4().hex[:6], "external_key": "ext"}, views.SiteView)
    post(admin, f"/tenants/{tid}/sites", {"name": "s-" + uuid.uuid4().hex[:6]}, views.SiteView)
    token = post(admin, f"/tenants/{tid}/enrollment-tokens", {"site_id": tenant.site_id}, views.TokenIssued)["token"]
    post(admin, f"/tenants/{tid}/enrollment-tokens", {"site_id": tenant.site_id}, views.TokenIssued)
    agent = Agent(server, agent_dir).enroll(token)
    agent.heartbeat(heartbeat_seq=1, vms=[{"vm_id": "vm-v", "state": "RUNNING", "vcpus": 1, "memory_mib": 64}],
                    host_facts={"cpu_cores": 2})
    plan = post(admin, f"/sites/{tenant.site_id}/plans", {"idempotency_key": uuid.uuid4().hex,
                "actions": [create_action("vm-w"), create_action("vm-x")]}, views.PlanView)
    leased = agent.heartbeat(heartbeat_seq=2)["pending_plans"]
    eid = leased[0]["actions"][0]["execution_id"]
    st_, out = agent.post("/v1/logs", {"execution_id": eid, "lines": [{"seq": 1, "message": "hi"}]})
    assert st_ == 202, out
    agent.results([{"execution_id": eid, "status": "FAILED", "message": "boom", "error_code": "E"}])
    post(admin, f"/plans/{plan['plan_id']}/cancel", None, views.PlanView)
    ids = {"tenant_id": tid, "site_id": tenant.site_id, "plan_id": plan["plan_id"], "execution_id": eid}
    for template, view in VIEW_OF.items():
        path = template.format(**ids)
        for query in ("", "?limit=1") if template.endswith("/logs") else ("",):
            status, _, data = admin.raw("GET", path + query)
            assert status == 200, (path, data)
            created.append((view, data))
    seen = set()
    for view, data in created:
        decoded = msgspec.json.decode(data, type=view)
        assert codec.encode(decoded) == data, (view.__name__, data)
        _assert_key_order(view.__name__, json.loads(data))
        seen.add(view.__name__)
    assert seen == set(KEY_ORDER) - {"ApiKeyView", "TokenView", "AuditEventView", "LogEntryView", "HostView",
                                     "VmView", "AgentStatusView"}
    admin.close()
    agent.close()
