"""The one loader of compiled modules: each logical module is its native build or its twin.

Why one place (the shape of ``cryptography``'s single ``Binding``): every
compiled module in ``nkudo_native`` has a pure-Python twin, and the choice
between them used to be made by each caller with its own ``try``/``if mod is
None`` and its own error. Here every logical module is registered once, next
to its twin, and :func:`binding` answers for all of them the same way:

- ``native=None``: the compiled module when it loads, else the twin;
- ``native=True``: the compiled module or :class:`NativeUnavailable` (with the
  reason), the rule behind ``require_native`` in the test-suite;
- ``native=False``: the twin.

``NKUDO_NATIVE=0`` forces the twins everywhere (debugging, and the twin half of
the test-suite). The reason a twin is used is recorded once per process and
``nkudo-edge version`` reports it for each module. Kept free of heavy imports:
it sits on the CLI start-up path, and twins are imported only when asked for.
"""

from __future__ import annotations

import importlib
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any


class NativeUnavailable(RuntimeError):
    """The compiled module ``name`` was demanded but is not loaded; ``reason`` says why."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"native module {name!r} unavailable: {reason}")
        self.name = name
        self.reason = reason


class ModuleSpec:
    """Where a logical module's compiled build and its twin live.

    ``surface`` names what the two share: ``"module"`` (a Cython module and a
    twin exposing the same public names) or ``"lib"`` (a cffi module, whose
    functions live on ``.lib``; the twin's ``lib`` has the same function names).
    """

    __slots__ = ("name", "native", "surface", "twin")

    def __init__(self, name: str, native: str, twin: str, surface: str = "module") -> None:
        self.name = name
        self.native = native
        self.twin = twin
        self.surface = surface


#: Logical name -> where its native module and its twin live. Add a line when adding a native module.
MODULES: dict[str, ModuleSpec] = {
    s.name: s
    for s in (
        ModuleSpec("kvm", "nkudo_native.kvm", "nkudo.host._kvm_twin"),
        ModuleSpec("chapi", "nkudo_native.chapi", "nkudo.chapi._twin"),
        ModuleSpec("syscalls", "nkudo_native._syscalls", "nkudo.host._syscalls_twin", "lib"),
        ModuleSpec("pidfd", "nkudo_native._pidfd", "nkudo.proc._pidfd_twin", "lib"),
        ModuleSpec("netlink", "nkudo_native.netlink", "nkudo.net._netlink_twin"),
    )
}
#: Logical name -> importable compiled module (kept for readers of the old table).
NATIVE_MODULES: dict[str, str] = {name: s.native for name, s in MODULES.items()}


class Binding:
    """The module a caller uses for ``name``: ``native`` says which one, ``reason`` why."""

    __slots__ = ("module", "name", "native", "reason")

    def __init__(self, name: str, module: ModuleType, native: bool, reason: str) -> None:
        self.name = name
        self.module = module
        self.native = native
        self.reason = reason

    @property
    def lib(self) -> Any:
        """The functions of a ``"lib"``-surface module (cffi ``lib`` or the twin's ``lib``)."""
        return self.module.lib

    def __repr__(self) -> str:
        kind = "native" if self.native else "twin"
        return f"<Binding {self.name} {kind} {self.module.__name__} ({self.reason})>"


_loaded: dict[str, tuple[ModuleType | None, str]] = {}
_bindings: dict[tuple[str, bool | None], Binding] = {}


def native_disabled() -> bool:
    return os.environ.get("NKUDO_NATIVE", "1").strip().lower() in {"0", "false", "no", "off"}


def _load(name: str) -> tuple[ModuleType | None, str]:
    hit = _loaded.get(name)
    if hit is not None:
        return hit
    target = MODULES[name].native
    if native_disabled():
        result: tuple[ModuleType | None, str] = (None, "disabled by NKUDO_NATIVE=0")
    else:
        try:
            result = (importlib.import_module(target), "native")
        except ImportError as exc:
            result = (None, f"compiled module not importable ({exc})")
    _loaded[name] = result
    return result


def load(name: str) -> ModuleType | None:
    """The compiled module ``name``, or None when its twin must be used."""
    return _load(name)[0]


def reason(name: str) -> str:
    """Why ``name`` is (or is not) native: ``"native"`` or a sentence."""
    return _load(name)[1]


def require(name: str) -> ModuleType:
    """The compiled module ``name``; :class:`NativeUnavailable` when it is not loaded."""
    mod, why = _load(name)
    if mod is None:
        raise NativeUnavailable(name, why)
    return mod


def twin(name: str) -> ModuleType:
    """The pure-Python twin of ``name`` (imported on first use)."""
    return importlib.import_module(MODULES[name].twin)


def binding(name: str, native: bool | None = None) -> Binding:
    """The module to use for ``name`` under the preference ``native`` (see the module docstring)."""
    hit = _bindings.get((name, native))
    if hit is not None:
        return hit
    if native is False:
        b = Binding(name, twin(name), False, "twin requested")
    else:
        mod, why = _load(name)
        if mod is not None:
            b = Binding(name, mod, True, why)
        elif native is True:
            raise NativeUnavailable(name, why)
        else:
            b = Binding(name, twin(name), False, why)
    _bindings[(name, native)] = b
    return b


def public_names(name: str, module: ModuleType) -> frozenset[str]:
    """The names native and twin of ``name`` must share (the test-suite compares them)."""
    ns: object = module.lib if MODULES[name].surface == "lib" else module
    declared = getattr(ns, "__all__", None)
    names = declared if declared is not None else [n for n in dir(ns) if not n.startswith("_")]
    return frozenset(names)


def status() -> list[dict[str, object]]:
    """One record per native module, for ``version`` and the test-suite."""
    out: list[dict[str, object]] = []
    for name, spec in MODULES.items():
        mod, why = _load(name)
        out.append(
            {
                "name": name,
                "module": spec.native,
                "native": mod is not None,
                "reason": why,
                "file": getattr(mod, "__file__", None),
            }
        )
    return out
