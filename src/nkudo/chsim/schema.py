"""Request-body validation against Cloud Hypervisor's OpenAPI file.

Why: the simulator must refuse what the real server refuses, or tests pass
against the simulator and fail against CH. The real server deserializes with
serde; the OpenAPI schemas are the documented shape of those structs, so a
body that violates them is answered 400 (``Failed to deserialize JSON``).

OpenAPI 3.0 schemas are close to JSON Schema draft 4; the conversion here
handles what differs: ``nullable``, the integer ``format``s (serde rejects
out-of-range numbers for ``u8``/``i16``/... fields, so they become
``minimum``/``maximum``), and OpenAPI-only keywords. ``$ref``s stay
``#/components/schemas/...`` pointers into one root document.

Loading costs ~150 ms (PyYAML + jsonschema imports), so it is lazy, done once
per process, and can be started in the background with :func:`preload`.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_SPEC = "NKUDO_CH_SPEC"
_OPENAPI_ONLY = ("discriminator", "readOnly", "writeOnly", "xml", "externalDocs", "example", "deprecated")
_INT_RANGES = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (0, (1 << 64) - 1),
}


def default_spec_path() -> Path:
    """``$NKUDO_CH_SPEC`` or the copy shipped as package data."""
    env = os.environ.get(ENV_SPEC, "").strip()
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data" / "cloud-hypervisor.yaml"


def convert(node: Any) -> Any:
    """One OpenAPI 3.0 schema (recursively) as a JSON Schema draft-4 schema."""
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: convert(v) for k, v in node.items() if k not in _OPENAPI_ONLY and k != "nullable"}
    fmt = node.get("format")
    if node.get("type") == "integer" and isinstance(fmt, str) and fmt in _INT_RANGES:
        lo, hi = _INT_RANGES[fmt]
        out.setdefault("minimum", lo)
        out.setdefault("maximum", hi)
    if node.get("nullable") is True:
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        elif "$ref" in out or "allOf" in out or "oneOf" in out or "anyOf" in out:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@dataclass(frozen=True)
class Verdict:
    valid: bool
    message: str = ""


class SpecValidator:
    """Validates request bodies of PUT endpoints by endpoint name (``"vm.create"``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from jsonschema import Draft4Validator

        schemas = convert(spec.get("components", {}).get("schemas", {}))
        self.version = str(spec.get("info", {}).get("version", "?"))
        self.body_schema: dict[str, str] = {}
        for path, item in (spec.get("paths") or {}).items():
            for op in (item or {}).values():
                if not isinstance(op, dict):
                    continue
                ref = (((op.get("requestBody") or {}).get("content") or {}).get("application/json") or {}).get(
                    "schema", {}
                ).get("$ref")
                if isinstance(ref, str):
                    self.body_schema[str(path).lstrip("/")] = ref.rsplit("/", 1)[-1]
        self._validators = {
            ep: Draft4Validator({"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}})
            for ep, name in self.body_schema.items()
        }

    @classmethod
    def load(cls, path: Path) -> SpecValidator:
        import yaml

        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with open(path, "rb") as f:
            spec = yaml.load(f, Loader=loader)  # noqa: S506 - a SafeLoader variant
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: not an OpenAPI document")
        return cls(spec)

    def validate(self, endpoint: str, body: Any) -> Verdict:
        """Check ``body`` against the request schema of ``endpoint`` (valid if it has none)."""
        validator = self._validators.get(endpoint)
        if validator is None:
            return Verdict(True)
        from jsonschema.exceptions import best_match

        err = best_match(validator.iter_errors(body))
        if err is None:
            return Verdict(True)
        where = "/".join(str(p) for p in err.absolute_path)
        name = self.body_schema[endpoint]
        return Verdict(False, f"{name}{'/' + where if where else ''}: {err.message}")


class LazySpec:
    """Loads the spec once, in the background if asked; thread-safe."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._value: SpecValidator | None = None
        self._error: str | None = None
        self._done = False

    def preload(self) -> None:
        if self.path is not None:
            threading.Thread(target=self.get, name="spec-loader", daemon=True).start()

    def get(self) -> SpecValidator | None:
        """The validator, or None when validation is off or the spec failed to load (see ``error``)."""
        if self.path is None:
            return None
        with self._lock:
            if not self._done:
                try:
                    self._value = SpecValidator.load(self.path)
                except Exception as exc:  # any failure disables validation, loudly (see error)
                    self._error = f"{type(exc).__name__}: {exc}"
                self._done = True
        return self._value

    @property
    def error(self) -> str | None:
        self.get()
        return self._error
