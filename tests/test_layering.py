"""The import layering documented in docs/architecture.md, checked on the source (issue 11).

Every ``import`` in ``src/nkudo`` is read with ``ast`` (top-level, inside functions and under
``TYPE_CHECKING`` alike: a lazy import is still a dependency) and resolved to a module of the package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

#: Rank of each top-level part of ``nkudo``: a module imports only lower ranks or its own part.
RANKS: dict[str, int] = {
    "nkudo": 0, "errors": 0, "log": 0, "_native": 0, "extras": 0,  # foundation
    "vmstate": 1, "wire": 2,                           # the shared vocabulary and wire models
    "chapi": 3, "qmp": 3, "net": 3, "proc": 3, "chsim": 3,  # protocols and kernel drivers
    "host": 4,                                         # host probes (use net)
    "agent": 5, "cp": 5,                               # the two applications: never each other
    "cli": 6,                                          # the agent's command line
}
#: Sans-I/O cores: they build and parse, never touch a socket, a process, a file descriptor or a database.
PURE = ("nkudo.chapi.codec", "nkudo.qmp.codec", "nkudo.net.rtnl", "nkudo.agent.plan", "nkudo.cp.domain",
        "nkudo.wire.codec", "nkudo.wire.actions", "nkudo.wire.messages", "nkudo.wire.vocab")
IO_MODULES = frozenset({"socket", "ssl", "subprocess", "sqlite3", "asyncio", "aiohttp", "sqlalchemy", "http",
                        "urllib", "select", "selectors", "fcntl", "threading", "psycopg", "pyroute2"})


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str  # a module of nkudo, or a top-level external module name
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (SRC / "nkudo").rglob("*.py")}


def _resolve(name: str) -> str:
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def _targets(node: ast.Import | ast.ImportFrom, src: str, is_pkg: bool) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
        return
    base = node.module or ""
    if node.level:
        pkg = src.split(".") if is_pkg else src.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join([*pkg, base] if base else pkg)
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules()]
    yield from subs or [base]


@cache
def edges() -> tuple[Edge, ...]:
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for t in _targets(node, name, path.name == "__init__.py"):
                    dst = _resolve(t) if t.startswith("nkudo") else t.split(".")[0]
                    # A module always runs its parent packages first; that is not a dependency to check.
                    if dst and dst != name and not name.startswith(dst + "."):
                        out.append(Edge(name, dst, node.lineno))
    return tuple(out)


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "nkudo"


def test_every_part_has_a_rank() -> None:
    """A new top-level part of the package must be placed in the layering (and in the document)."""
    assert {_part(m) for m in modules()} <= set(RANKS), sorted({_part(m) for m in modules()} - set(RANKS))


def test_no_upward_or_sideways_imports() -> None:
    """Each module imports only lower layers or its own part: so agent and cp never import each other."""
    bad = [f"{e.src}:{e.line} imports {e.dst}" for e in edges() if e.dst.startswith("nkudo")
           and _part(e.dst) != _part(e.src) and RANKS[_part(e.dst)] >= RANKS[_part(e.src)]]
    assert bad == []


def test_no_import_cycles() -> None:
    """No two modules depend on each other, directly or through others (lazy imports included)."""
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for e in edges():
        if e.dst in graph:
            graph[e.src].add(e.dst)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_protocol_cores_do_no_io() -> None:
    """The pure cores (codecs, plan parsing, decision rules) import no socket, process, thread or database."""
    assert set(PURE) <= set(modules())
    bad = [f"{e.src}:{e.line} imports {e.dst}" for e in edges() if e.src in PURE and e.dst in IO_MODULES]
    assert bad == []


def test_use_cases_never_import_the_http_layer() -> None:
    """The control plane's use cases know nothing of aiohttp or the routes that call them."""
    http = {"aiohttp", "nkudo.cp.http", "nkudo.cp.server", "nkudo.cp.cli", "nkudo.cp.client"}
    bad = [f"{e.src}:{e.line} imports {e.dst}" for e in edges()
           if e.src.startswith("nkudo.cp.usecases") and e.dst in http]
    assert bad == []


def test_the_checker_sees_what_it_must() -> None:
    """Guards the walker itself: known edges of each kind are found (an empty walk would pass every test)."""
    found = {(e.src, e.dst) for e in edges()}
    assert ("nkudo.agent.vms", "nkudo.vmstate") in found
    assert ("nkudo.cli.agentcmds", "nkudo.agent.cpclient") in found  # a lazy import inside a function
    assert ("nkudo.chapi.transport", "socket") in found
    assert any(src.startswith("nkudo.cp.usecases") for src, _ in found)
