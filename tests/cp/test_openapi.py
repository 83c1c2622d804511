"""The OpenAPI document covers every route, and generated requests never get a 500 or an undocumented status."""

from __future__ import annotations

import json
import re
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nkudo.cp.http import ROUTES

from .helpers import Agent, Server, Tenant, create_action

SPEC = yaml.safe_load((Path(__file__).resolve().parents[2] / "src/nkudo/cp/openapi.yaml").read_text())
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
