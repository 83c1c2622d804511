"""Loads compiled modules from ``nkudo_native`` and remembers why a twin is used.

Every native function has a pure-Python twin. ``NKUDO_NATIVE=0`` forces the
twins everywhere (for debugging and for the twin half of the test-suite);
``nkudo-edge version`` reports the outcome for each module. Kept free of heavy
imports: it sits on the CLI start-up path.
"""

from __future__ import annotations

import importlib
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

# Logical name -> importable module. Add a line when adding a native module.
NATIVE_MODULES: dict[str, str] = {
    "kvm": "nkudo_native.kvm",
    "chapi": "nkudo_native.chapi",
    "sys": "nkudo_native._sys",
    "pidfd": "nkudo_native._pidfd",
    "netlink": "nkudo_native.netlink",
}

_cache: dict[str, tuple[ModuleType | None, str]] = {}


def native_disabled() -> bool:
    return os.environ.get("NKUDO_NATIVE", "1").strip().lower() in {"0", "false", "no", "off"}


def load(name: str) -> ModuleType | None:
    """Return the compiled module ``name``, or None when its twin must be used."""
    return _load(name)[0]


def reason(name: str) -> str:
    """Why ``name`` is (or is not) native: ``"native"`` or a sentence."""
    return _load(name)[1]


def _load(name: str) -> tuple[ModuleType | None, str]:
    hit = _cache.get(name)
    if hit is not None:
        return hit
    target = NATIVE_MODULES[name]
    if native_disabled():
        result: tuple[ModuleType | None, str] = (None, "disabled by NKUDO_NATIVE=0")
    else:
        try:
            result = (importlib.import_module(target), "native")
        except ImportError as exc:
            result = (None, f"compiled module not importable ({exc})")
    _cache[name] = result
    return result


def status() -> list[dict[str, object]]:
    """One record per native module, for ``version`` and the test-suite."""
    out: list[dict[str, object]] = []
    for name, target in NATIVE_MODULES.items():
        mod, why = _load(name)
        out.append(
            {
                "name": name,
                "module": target,
                "native": mod is not None,
                "reason": why,
                "file": getattr(mod, "__file__", None),
            }
        )
    return out
