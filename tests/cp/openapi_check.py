"""Check an API response against ``openapi.yaml``: the hook behind every client the API tests use (issue 11).

``tests.cp.helpers.Server.client`` returns a ``CheckedClient``, so every response any test receives
(successes and errors) must have a status the document lists for its route and a body matching that
status's schema; a mismatch raises ``ResponseMismatch`` (an ``AssertionError``) in the test that made the
request. A request that matches no documented operation (unknown path, or a method the path does not
serve) must get the router's 404/405 in the error envelope.

No conversion is needed: the document is OpenAPI 3.1, whose schemas are JSON Schema 2020-12, so
``jsonschema``'s Draft 2020-12 validator applies them as they are, with the ``$ref`` s resolved
against the document itself.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import urllib.parse
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from nkudo.cp.client import Client

SPEC_PATH = Path(__file__).resolve().parents[2] / "src/nkudo/cp/openapi.yaml"
DOC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
_URI = "urn:nkudo:cp:openapi"
_REGISTRY: Registry[Any] = Registry().with_resource(_URI, Resource.from_contents(DOC, default_specification=DRAFT202012))
_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}

#: How many responses were checked (a test asserts the hook is on the clients the suite uses).
checked = 0

_FORMATS = jsonschema.FormatChecker(formats=("uuid",))


@_FORMATS.checks("date-time", raises=ValueError)
def _is_rfc3339(value: object) -> bool:
    """A timezone-aware ISO 8601 / RFC 3339 timestamp (the ``iso()`` strings); the stdlib has no other check."""
    return not isinstance(value, str) or dt.datetime.fromisoformat(value).tzinfo is not None


class ResponseMismatch(AssertionError):
    """A response the document does not describe (undocumented status, or a body not matching its schema)."""


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    regex: re.Pattern[str]
    responses: dict[str, Any]


def _operations() -> list[Operation]:
    ops = []
    for template, item in DOC["paths"].items():
        rx = re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)) + r"\Z")
        for method, op in item.items():
            if method in _METHODS:
                ops.append(Operation(method.upper(), template, rx, op["responses"]))
    # Static paths first, as the router matches them (``/v1/plans/next`` is no ``{plan_id}``).
    return sorted(ops, key=lambda o: o.template.count("{"))


OPERATIONS = _operations()


def _deref(obj: dict[str, Any]) -> dict[str, Any]:
    """A response object with its ``$ref`` (``#/components/responses/...``) followed."""
    while "$ref" in obj:
        node: Any = DOC
        for part in obj["$ref"].removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        obj = node
    return obj


def _absolute(schema: Any) -> Any:
    """``schema`` with its document-local ``$ref`` s made absolute, so it validates outside the document."""
    if isinstance(schema, dict):
        return {k: (_URI + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else _absolute(v))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_absolute(v) for v in schema]
    return schema


@cache
def _validator(schema_json: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_absolute(json.loads(schema_json)), registry=_REGISTRY,
                                           format_checker=_FORMATS)


def _error_schema() -> str:
    return json.dumps({"$ref": "#/components/schemas/ErrorResponse"})


def find_operation(method: str, path: str) -> Operation | None:
    """The documented operation the server routes ``method path`` to.

    Matched like aiohttp's router: on the percent-decoded path, except that an encoded slash (``%2F``) stays
    encoded and so inside one segment (``/tenants/%2F/sites`` is that route, answered 401 or 404).
    """
    raw = urllib.parse.urlsplit(path).path
    plain = "%2F".join(urllib.parse.unquote(part) for part in re.split("%2[fF]", raw))
    for op in OPERATIONS:
        if op.method == method.upper() and op.regex.match(plain):
            return op
    return None


def check(method: str, path: str, status: int, headers: dict[str, str], body: bytes) -> None:
    """Raise ``ResponseMismatch`` unless the document describes this response of ``method path``."""
    global checked
    checked += 1
    where = f"{method} {path} -> {status}"
    op = find_operation(method, path)
    if op is None:
        if status not in (404, 405, 429):  # 429: the rate limiter runs before routing (issue 12)
            raise ResponseMismatch(f"{where}: no documented operation, yet not the router's 404/405 or a 429")
        schema_json: str | None = _error_schema()
    else:
        if str(status) not in op.responses:
            raise ResponseMismatch(f"{where}: status {status} is not documented for {op.method} {op.template} "
                                   f"(documented: {', '.join(sorted(op.responses))}); body {body[:300]!r}")
        content = _deref(op.responses[str(status)]).get("content")
        if content is None:
            if status == 204 and body:
                raise ResponseMismatch(f"{where}: a 204 with a body")
            return
        if "application/json" not in content:
            return  # PEM, Prometheus text: documented by media type only
        schema_json = json.dumps(content["application/json"]["schema"], sort_keys=True)
    if not headers.get("content-type", "").startswith("application/json"):
        raise ResponseMismatch(f"{where}: content-type {headers.get('content-type')!r}, documented JSON")
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ResponseMismatch(f"{where}: body is not JSON ({exc}): {body[:300]!r}") from None
    errors = sorted(_validator(schema_json).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        detail = "; ".join(f"at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:5])
        raise ResponseMismatch(f"{where}: body does not match the document: {detail}")


class CheckedClient(Client):
    """The API client with every response checked against the OpenAPI document."""

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], bytes]:
        status, resp_headers, data = super().raw(method, path, body, headers)
        check(method, path, status, resp_headers, data)
        return status, resp_headers, data
