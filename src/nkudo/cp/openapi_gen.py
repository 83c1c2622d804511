"""Regenerate the schemas of ``openapi.yaml`` from the msgspec models: ``python -m nkudo.cp.openapi_gen``.

Why generated: the document used to describe 13 responses as an untyped ``{type: object}`` and its
hand-written schemas could silently disagree with the code. The request models (``nkudo.cp.models``),
the response views (``nkudo.cp.views``) and the agent's wire messages (``nkudo.wire.messages``) are the
one definition; ``msgspec.json.schema_components`` turns them into JSON Schema 2020-12, which is
OpenAPI 3.1's schema dialect, so they go into the document as they are. The rest of the document
(paths, parameters, security, error responses) stays hand-written: only the block between the two
marker comments is replaced, so its layout and comments survive. ``--check`` exits 1 when the file is
stale, and ``tests/cp/test_openapi.py`` fails on it too.

One translation: the models anchor patterns with ``\\Z`` (Python's ``$`` also matches before a trailing
newline, issue 10 item 2), which ECMA-262, the regex dialect of JSON Schema, does not know; there ``$``
without the multiline flag means exactly end of input, so the document says ``$``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

import msgspec
import yaml

from nkudo.cp import models, readviews, views
from nkudo.wire import messages as wm

DOC_PATH: Final = Path(__file__).with_name("openapi.yaml")
BEGIN: Final = "  # --- BEGIN GENERATED SCHEMAS (python -m nkudo.cp.openapi_gen; edit the models, not this) ---\n"
END: Final = "  # --- END GENERATED SCHEMAS ---\n"
REF_TEMPLATE: Final = "#/components/schemas/{name}"

#: Request bodies, in route order.
REQUESTS: Final[tuple[type[msgspec.Struct], ...]] = (
    models.TenantCreate, models.ApiKeyCreate, models.SiteCreate, models.TokenCreate, models.PlanCreate,
    wm.EnrollRequest, wm.HeartbeatRequest, wm.ResultReport, wm.LogBatch, wm.UnenrollRequest, wm.RenewRequest,
    models.QuotaUpdate,  # issue 12 part 3
)
#: Response bodies of the agent routes (the tenant/admin ones are ``views.VIEWS``).
AGENT_RESPONSES: Final[tuple[type[msgspec.Struct], ...]] = (
    wm.EnrollResponse, wm.HeartbeatResponse, wm.PlansNextResponse, wm.ResultResponse, wm.LogBatchResponse,
    wm.RenewResponse,
)


def _ecma(node: Any) -> Any:
    """``node`` with every ``pattern``'s final ``\\Z`` written as ECMA-262's ``$`` (see the module docstring) and
    every description dedented."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                # msgspec releases differ in how they dedent docstrings: clean them here so the document is the
                # same whichever msgspec generated it (the staleness test compares it byte for byte).
                out[key] = inspect.cleandoc(value)
            elif key == "pattern" and isinstance(value, str):
                body = value.removesuffix("\\Z")
                if body == value or "\\Z" in body:
                    raise ValueError(f"pattern {value!r} must end with its only \\Z")
                out[key] = body + "$"
            else:
                out[key] = _ecma(value)
        return out
    if isinstance(node, list):
        return [_ecma(v) for v in node]
    return node


def schemas() -> dict[str, Any]:
    """The document's ``components.schemas``: every request and response model and what they refer to."""
    _, components = msgspec.json.schema_components(REQUESTS + views.VIEWS + readviews.VIEWS + AGENT_RESPONSES,
                                                   ref_template=REF_TEMPLATE)
    return {name: _ecma(components[name]) for name in sorted(components)}


def render(text: str) -> str:
    """``text`` (the document) with the generated block replaced by the current models' schemas."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError("openapi.yaml lacks the generated-schemas marker comments")
    dumped = yaml.safe_dump({"schemas": schemas()}, sort_keys=False, default_flow_style=None, width=110,
                            allow_unicode=True)
    block = "".join("  " + line if line.strip() else line for line in dumped.splitlines(keepends=True))
    return text[: start + len(BEGIN)] + block + text[end:]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nkudo.cp.openapi_gen", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the document is not up to date")
    ap.add_argument("--path", type=Path, default=DOC_PATH)
    args = ap.parse_args(argv)
    current = args.path.read_text(encoding="utf-8")
    fresh = render(current)
    if fresh == current:
        return 0
    if args.check:
        print(f"{args.path} is stale: run python -m nkudo.cp.openapi_gen", file=sys.stderr)
        return 1
    _write_atomic(args.path, fresh)
    print(f"rewrote {args.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
