"""Every pattern-checked string field refuses newlines, NUL, control characters and lookalikes.

Issue 10 item 2: every pattern used ``$``, which ``re.search`` (what msgspec applies) also matches just
before a trailing newline, so a VM created as ``"nl\\n"`` could never be deleted. The fields are found
by walking every msgspec Struct of ``nkudo.wire`` and ``nkudo.cp.models`` (so a new field cannot escape
this test), plus the agent's and the HTTP layer's own compiled patterns.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import nkudo.wire
from nkudo.agent import paths as agent_paths
from nkudo.agent import plan as agent_plan
from nkudo.cp import http as cp_http
from nkudo.cp import models as cp_models
from nkudo.wire import actions as wa
from nkudo.wire import codec
from nkudo.wire import messages as wm


class Kind(Enum):
    """How much of Unicode a field legitimately admits, which decides what must be refused."""

    IDENT = "ident"  # ASCII identifiers: anything else, lookalikes included, is refused
    TEXT = "text"  # free-text names: any script, but no control/format characters or lone surrogates
    PATH = "path"  # host paths: any script, but no control characters or lone surrogates
    ARG = "arg"  # command arguments: anything execve can pass (no NUL, no lone surrogates)
    CONSOLE = "console"  # console text (issue 15): lines and tabs, but no other control/direction character


#: Per pattern: its kind and values it must accept. A new pattern fails ``test_every_pattern_is_known``
#: until it is described here, so it cannot slip past the checks below.
PATTERNS: dict[str, tuple[Kind, list[str]]] = {
    wa.IDENT_PATTERN: (Kind.IDENT, ["vm-1", "a", "Web_01.b", "x" * 64]),
    wa.ACTION_ID_PATTERN: (Kind.IDENT, ["a1", "step:2", "0" * 128]),
    wa.IFNAME_PATTERN: (Kind.IDENT, ["br0", "virbr-1.10", "b" * 15]),
    wa.MAC_PATTERN: (Kind.IDENT, ["52:54:00:12:34:56", "02:AB:cd:00:00:01", "00:00:00:00:00:01"]),
    wa.PATH_PATTERN: (Kind.PATH, ["/", "/var/lib/nkudo/vmlinux", "/images/café.img", "/a/..b/c.."]),
    wa.ARG_PATTERN: (Kind.ARG, ["", "--flag", "two\nlines", "naïve"]),
    wm.UUID_PATTERN: (Kind.IDENT, ["0f8fad5b-d9cb-469f-a165-70867728950e"]),
    wm.HOSTNAME_PATTERN: (Kind.IDENT, ["edge-1.example.com", "h"]),
    wm.SHA256_PATTERN: (Kind.IDENT, ["ab" * 32]),
    wm.ERROR_CODE_PATTERN: (Kind.IDENT, ["INVALID_ARGUMENT", "E"]),
    cp_models.SLUG_PATTERN: (Kind.IDENT, ["acme", "t-0123", "a" * 63]),
    cp_models.NAME_PATTERN: (Kind.TEXT, ["Acme", "Café Zürich", "Кафе", "a b", "x" * 200]),
    cp_models.IDEM_KEY_PATTERN: (Kind.IDENT, ["k", "deploy:2024.1_a-b", "k" * 200]),
    wm.ConsoleText.__metadata__[0].pattern: (Kind.CONSOLE, ["", "login: root\n", "a\tb\nKernel panic\n", "Кафе"]),
}

NEWLINES = ["\n", "\r\n", "\r"]
CONTROLS = ["\x00", "\x01", "\t", "\x1b", "\x7f", "\x85", "\x9f"]
SURROGATES = ["\ud800", "\udfff"]
INVISIBLE = ["\u200b", "\u200e", "\u202e", "\u2028", "\u2066", "\ufeff"]
LOOKALIKES = [
    "\u0430",  # Cyrillic a
    "\u0435",  # Cyrillic e
    "\u043e",  # Cyrillic o
    "\uff41",  # fullwidth a
    "\uff11",  # fullwidth 1
    "\u0131",  # dotless i
    "\u212a",  # Kelvin sign
    "\u017f",  # long s
    "\u00a0",  # no-break space
    " ",
    "/",
]

#: Characters that must be refused wherever they are inserted, per kind.
REFUSED: dict[Kind, list[str]] = {
    Kind.IDENT: NEWLINES + CONTROLS + SURROGATES + INVISIBLE + LOOKALIKES,
    Kind.TEXT: NEWLINES + CONTROLS + SURROGATES + INVISIBLE,
    Kind.PATH: NEWLINES + CONTROLS + SURROGATES,
    Kind.ARG: ["\x00", *SURROGATES],
    Kind.CONSOLE: ["\r", *(c for c in CONTROLS if c != "\t"), *SURROGATES, "\u200e", "\u202e", "\u2028", "\u2066"],
}


@dataclass(frozen=True)
class Target:
    """One pattern-constrained string, and how to check a candidate value against the real field type."""

    name: str
    pattern: str
    accepts: Callable[[str], bool]


def _wire_modules() -> list[Any]:
    mods = [importlib.import_module(m.name) for m in pkgutil.iter_modules(nkudo.wire.__path__, "nkudo.wire.")]
    return [*mods, cp_models]


def _leaves(t: mi.Type, wrap: Callable[[Any], Any]) -> Iterator[tuple[str, Callable[[Any], Any]]]:
    """(pattern, wrap) for each pattern-constrained str reachable in ``t`` without entering a Struct."""
    if isinstance(t, mi.StrType):
        if t.pattern is not None:
            yield t.pattern, wrap
    elif isinstance(t, mi.UnionType):
        for sub in t.types:
            yield from _leaves(sub, wrap)
    elif isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        yield from _leaves(t.item_type, lambda v: wrap([v]))
    elif isinstance(t, mi.DictType):
        assert not list(_leaves(t.key_type, wrap)), "pattern-constrained dict keys: extend this walker"
        yield from _leaves(t.value_type, lambda v: wrap({"k": v}))
    elif isinstance(t, mi.StructType | mi.IntType | mi.BoolType | mi.LiteralType | mi.EnumType | mi.DateTimeType
                    | mi.NoneType | mi.AnyType | mi.FloatType):
        return
    else:
        raise AssertionError(f"unhandled msgspec type {t!r}: extend this walker")


def _struct_targets() -> list[Target]:
    out = []
    seen: set[type] = set()
    for mod in _wire_modules():
        for obj in vars(mod).values():
            if not (isinstance(obj, type) and issubclass(obj, msgspec.Struct)) or obj in seen:
                continue
            seen.add(obj)
            hints = typing.get_type_hints(obj, include_extras=True)
            info = mi.type_info(obj)
            assert isinstance(info, mi.StructType)
            for f in info.fields:
                for i, (pattern, wrap) in enumerate(_leaves(f.type, lambda v: v)):
                    ftype = hints[f.name]

                    def accepts(v: str, ftype: Any = ftype, wrap: Callable[[Any], Any] = wrap) -> bool:
                        try:
                            msgspec.convert(wrap(v), ftype)
                        except msgspec.ValidationError:
                            return False
                        return True

                    out.append(Target(f"{obj.__module__}.{obj.__name__}.{f.name}#{i}", pattern, accepts))
    return out


def _regex_targets() -> list[Target]:
    """Compiled patterns outside msgspec, checked the way their callers check (``.match``)."""
    rx = {
        "agent.plan.ACTION_ID_RE": agent_plan.ACTION_ID_RE,
        "agent.paths.SAFE_COMPONENT": agent_paths.SAFE_COMPONENT,
        "cp.http._UUID": cp_http._UUID,
    }
    def matcher(r: re.Pattern[str]) -> Callable[[str], bool]:
        return lambda v: r.match(v) is not None

    return [Target(n, r.pattern, matcher(r)) for n, r in rx.items()]


TARGETS = _struct_targets() + _regex_targets()


def test_walk_finds_the_known_identifier_fields() -> None:
    """The walk is not vacuous: it reaches every field named in issue 10 item 2."""
    names = {t.name.split("#")[0] for t in TARGETS}
    for expected in ("nkudo.wire.actions.MicroVMCreate.vm_id", "nkudo.wire.actions.MicroVMCreate.name",
                     "nkudo.wire.actions.MicroVMSnapshot.snapshot_name", "nkudo.wire.actions.Nic.bridge",
                     "nkudo.wire.actions.Nic.mac", "nkudo.wire.actions.Disk.path",
                     "nkudo.wire.actions.CommandExecute.command", "nkudo.wire.actions.CommandExecute.args",
                     "nkudo.cp.models.TenantCreate.slug", "nkudo.cp.models.TenantCreate.name",
                     "nkudo.cp.models.SiteCreate.external_key", "nkudo.cp.models.PlanAction.action_id",
                     "nkudo.cp.models.PlanCreate.idempotency_key", "nkudo.wire.messages.VMSummary.vm_id",
                     "nkudo.wire.messages.EnrollRequest.hostname", "agent.plan.ACTION_ID_RE"):
        assert expected in names, expected
    for cls in wa.ACTION_TYPES.values():  # every plan action type is walked
        assert any(n.startswith(f"nkudo.wire.actions.{cls.__name__}.") for n in names), cls


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_every_pattern_is_known_and_anchored(target: Target) -> None:
    """Issue 10 item 2: each pattern is described in PATTERNS and ends in ``\\Z``, never ``$``."""
    assert target.pattern in PATTERNS, f"describe the new pattern of {target.name} in PATTERNS"
    assert target.pattern.endswith(r"\Z") and not target.pattern.endswith("$"), target.pattern


@st.composite
def _valid(draw: st.DrawFn, pattern: str) -> str:
    kind, samples = PATTERNS[pattern]
    if kind is Kind.IDENT:
        return draw(st.sampled_from(samples) | st.from_regex(pattern, fullmatch=True))
    return draw(st.sampled_from(samples))


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_injected_characters_are_refused(target: Target, data: st.DataObject) -> None:
    """Issue 10 item 2: a valid value passes; with a newline, NUL, control or lookalike inserted, it fails."""
    if target.pattern not in PATTERNS:
        pytest.fail(f"describe the new pattern of {target.name} in PATTERNS")
    kind = PATTERNS[target.pattern][0]
    valid = data.draw(_valid(target.pattern), label="valid")
    assert target.accepts(valid), (target.name, valid)
    bad = data.draw(st.sampled_from(REFUSED[kind]), label="bad")
    if kind not in (Kind.ARG, Kind.CONSOLE):
        assert not target.accepts(valid + "\n"), (target.name, valid)
    pos = data.draw(st.integers(0, len(valid)), label="pos")
    inserted = valid[:pos] + bad + valid[pos:]
    assert not target.accepts(inserted), (target.name, inserted)
    if valid and kind is Kind.IDENT:
        replaced = valid[: min(pos, len(valid) - 1)] + bad + valid[min(pos, len(valid) - 1) + 1:]
        assert not target.accepts(replaced), (target.name, replaced)


def test_openapi_patterns_match_the_models() -> None:
    """Issue 10 item 2: the OpenAPI (ECMA ``$``) patterns state exactly the models' ``\\Z`` patterns."""
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "src/nkudo/cp/openapi.yaml").read_text())
    # Keyed by Struct.field: the generated schemas (issue 11) include nkudo.wire's messages, not only cp.models.
    by_field = {".".join(t.name.split("#")[0].split(".")[-2:]): t.pattern for t in TARGETS}
    checked = 0
    for schema_name, schema in spec["components"]["schemas"].items():
        for prop, desc in (schema.get("properties") or {}).items():
            if "pattern" not in desc:
                continue
            model_pattern = by_field.get(f"{schema_name}.{prop}")
            assert model_pattern is not None, (schema_name, prop)
            assert desc["pattern"].endswith("$") and re.sub(r"\\Z\Z", "$", model_pattern) == desc["pattern"], (
                schema_name, prop)
            checked += 1
    assert checked >= 7


@pytest.mark.parametrize("pattern", list(PATTERNS), ids=lambda p: f"{PATTERNS[p][0].value}:{PATTERNS[p][1][0][:16]}")
def test_a_failed_pattern_is_told_in_words(pattern: str) -> None:
    """A value failing a field's pattern was told msgspec's "Expected `str` matching regex '...'" (300
    characters of character classes for a free-text name); every pattern now has a sentence, and the
    error names the field, on the decode path (HTTP bodies, plan files) and the convert path alike."""
    text = codec.pattern_text(pattern)
    assert text is not None, "give the new pattern a sentence with nkudo.wire.codec.described"
    assert text.startswith("expected ") and "regex" not in text and "\\" not in text
    probe = msgspec.defstruct("Probe", [("v", typing.Annotated[str, msgspec.Meta(pattern=pattern)])],
                              forbid_unknown_fields=True)
    with pytest.raises(codec.WireError) as converted:
        codec.convert({"v": "\x01\x00"}, probe)
    errors = [converted.value]
    if pattern != wa.ARG_PATTERN:  # an argument may hold \x01; its only refusals (NUL, surrogates) have their own text
        with pytest.raises(codec.WireError) as decoded:
            codec.decode(b'{"v":"\\u0001"}', probe)
        errors.append(decoded.value)
    for err in errors:
        assert (err.field, err.message) == ("v", f"{text} (field v)")
